"""The artifact contract: every file jaxkd writes and later trusts goes through here.

One fingerprint for pytrees (:func:`tree_fingerprint`), one digest for JSON values
(:func:`json_digest`), arrays (:func:`array_sha256`) and files (:func:`file_sha256`), one
atomic write (:func:`write_atomically`, and :func:`write_json` and :func:`write_npy` over
it), one record of a written file and its check (:func:`write_npy`, :func:`file_fault`),
one reader of JSON sidecars that names the damaged file (:func:`read_json`,
:func:`read_json_object`), one comparison of a sidecar with what the caller asks for
(:func:`mismatched_fields`, :func:`mismatch_message`, :func:`check_record`), and one
error type for an artifact that does not match what the reader expects
(:class:`ArtifactError`, :class:`ArtifactMismatchError`); the modules' own errors
(``TopKCacheError``, ``CheckpointIntegrityError``...) subclass it.
Caches (teacher logits, top-k targets), token files, checkpoint digests and the
experiments' sub-run records all use these, so a damaged or stale file is caught the
same way everywhere: by a digest, with a message naming the file and the remedy.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

__all__ = [
  "ArtifactError",
  "ArtifactMismatchError",
  "HashingWriter",
  "array_sha256",
  "check_record",
  "file_fault",
  "file_sha256",
  "json_digest",
  "mismatch_message",
  "mismatched_fields",
  "read_json",
  "read_json_object",
  "tree_fingerprint",
  "write_atomically",
  "write_json",
  "write_npy",
]


class ArtifactError(ValueError):
  """A file jaxkd wrote is missing, damaged, or does not match what its reader expects."""


class ArtifactMismatchError(ArtifactError):
  """An intact artifact made from other inputs than the reader asks for (another corpus, key, size...)."""


def tree_fingerprint(tree: Any) -> str:
  """Hex SHA-256 of a pytree's structure and contents (paths, dtypes, shapes, bytes).

  Any change to any leaf, however small, changes it. Used to key the teacher-logit
  cache and to record which teacher checkpoint a student learned from.
  """
  digest = hashlib.sha256()
  leaves, treedef = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
  digest.update(str(treedef).encode())
  for path, leaf in leaves:
    leaf = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype.str}|{leaf.shape}|".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def json_digest(
  value: Any,
  *,
  default: Callable[[Any], Any] | None = None,
  allow_nan: bool = True,
  separators: tuple[str, str] | None = (",", ":"),
) -> str:
  """Hex SHA-256 of ``value`` as canonical JSON (sorted keys, no whitespace): a key for a description.

  ``allow_nan=False`` refuses NaN and inf (a ValueError), ``default`` describes other objects (as in ``json.dumps``).
  ``separators=None`` gives json's default spacing, which keys written before this function existed used: passing
  it keeps those keys (and the files named by them) valid.
  """
  encoded = json.dumps(value, sort_keys=True, separators=separators, default=default, allow_nan=allow_nan)
  return hashlib.sha256(encoded.encode()).hexdigest()


def array_sha256(array: np.ndarray, *, layout: bool = False, chunk_items: int = 1 << 22) -> str:
  """Hex SHA-256 of an array's bytes in C order, hashed in chunks (a memory map is never read whole at once).

  With ``layout``, the digest starts with the dtype and shape (``'<f4(10, 3)'``), so that the same bytes under
  another shape or dtype differ.
  """
  digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode()) if layout else hashlib.sha256()
  flat = array.reshape(-1)
  for start in range(0, len(flat), chunk_items):
    digest.update(np.ascontiguousarray(flat[start : start + chunk_items]).data)
  return digest.hexdigest()


def file_sha256(path: str | os.PathLike, *, chunk_bytes: int = 1 << 20) -> str:
  """Hex SHA-256 of a file's bytes, read in chunks (files larger than memory are fine)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(chunk_bytes):
      digest.update(chunk)
  return digest.hexdigest()


class HashingWriter:
  """A file wrapper that hashes and counts what is written; ``np.save`` writes through it chunk by chunk."""

  def __init__(self, f: Any):
    self.f, self.digest, self.size = f, hashlib.sha256(), 0

  def write(self, data: bytes) -> int:
    self.digest.update(data)
    self.size += len(data)
    return self.f.write(data)


def write_atomically(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
  """Calls ``write(file)`` on a temporary file beside ``path``, then renames it to ``path``.

  A reader never sees a half-written file: a crash leaves either the old file or none (the temporary is removed).
  The parent directory is created when missing.
  """
  path = os.fspath(path)
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
  try:
    with open(tmp, "wb") as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(
  path: str | os.PathLike,
  value: Any,
  *,
  indent: int | None = 2,
  sort_keys: bool = True,
  default: Callable[[Any], Any] | None = None,
) -> None:
  """Writes ``value`` as JSON to ``path`` atomically (see :func:`write_atomically`)."""
  encoded = json.dumps(value, indent=indent, sort_keys=sort_keys, default=default).encode()
  write_atomically(path, lambda f: f.write(encoded))


def write_npy(path: str | os.PathLike, array: np.ndarray) -> dict[str, Any]:
  """Writes ``array`` as ``.npy`` atomically, hashing it as it goes; returns its record for :func:`file_fault`.

  The record is ``{'file': basename, 'bytes', 'sha256', 'shape', 'dtype'}``: a sidecar that keeps it can later
  check the file's presence and size (a ``stat``) and, when it reads the file, its bytes.
  """
  writers = []

  def write(f: Any) -> None:
    writers.append(HashingWriter(f))
    np.save(writers[-1], array, allow_pickle=False)

  write_atomically(path, write)
  return {
    "file": os.path.basename(os.fspath(path)),
    "bytes": writers[-1].size,
    "sha256": writers[-1].digest.hexdigest(),
    "shape": list(array.shape),
    "dtype": array.dtype.str,
  }


def file_fault(directory: str | os.PathLike, record: Mapping[str, Any], *, verify_sha256: bool) -> str | None:
  """Why the file of a :func:`write_npy` record cannot be trusted; None when present, of its size and intact.

  Args:
    directory: where the record's ``file`` lies.
    record: ``{'file', 'bytes', 'sha256', ...}``.
    verify_sha256: also read the file and check its SHA-256 (:func:`file_sha256`); otherwise only a ``stat``.
  """
  path = os.path.join(os.fspath(directory), record["file"])
  try:
    size = os.path.getsize(path)
  except OSError as e:
    return f"{path} is missing ({type(e).__name__}: {e})"
  if size != record["bytes"]:
    return f"{path} has {size} bytes, not the {record['bytes']} written (a truncated or partial copy?)"
  if verify_sha256 and file_sha256(path) != record["sha256"]:
    return f"{path} fails its SHA-256 check (its bytes changed after it was written: disk damage or a bad copy)"
  return None


def read_json(
  path: str | os.PathLike, *, what: str = "file", remedy: str = "", error: type[Exception] = ArtifactError
) -> Any:
  """The JSON value in ``path``; a missing, unreadable or malformed file is an :class:`ArtifactError`.

  Args:
    path: the file.
    what: what the file is, for the message (``"top-k cache manifest"``).
    remedy: what the user should do, appended to the message (``"delete the directory and rerun"``).
    error: the exception type to raise (a caller's own, e.g. a subclass of :class:`ArtifactError`).
  """
  try:
    with open(path, "rb") as f:
      return json.loads(f.read())
  except FileNotFoundError as e:
    raise error(f"{what} {os.fspath(path)!r} is missing. {remedy}".strip()) from e
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise error(f"{what} {os.fspath(path)!r} is damaged ({e}). {remedy}".strip()) from e


def read_json_object(
  path: str | os.PathLike, *, what: str = "file", remedy: str = "", error: type[Exception] = ArtifactError
) -> dict[str, Any]:
  """:func:`read_json` of a sidecar or manifest, which must hold a JSON object (a dict); else ``error``."""
  value = read_json(path, what=what, remedy=remedy, error=error)
  if not isinstance(value, dict):
    raise error(f"{what} {os.fspath(path)!r} is not a JSON object. {remedy}".strip())
  return value


def mismatched_fields(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
  """The keys of ``wanted`` whose value in ``recorded`` differs (a missing key counts as None), in order."""
  return [key for key in wanted if recorded.get(key) != wanted[key]]


def mismatch_message(
  path: str | os.PathLike, recorded: Mapping[str, Any], wanted: Mapping[str, Any], *, what: str = "", remedy: str = ""
) -> str | None:
  """A sentence naming the file, each differing field (recorded and asked for) and the remedy; None when they agree.

  >>> mismatch_message("a.npy", {"split": "test"}, {"split": "train"}, remedy="Rebuild it.")
  "a.npy was made from something else (split: file 'test', asked 'train'). Rebuild it."
  """
  differing = mismatched_fields(recorded, wanted)
  if not differing:
    return None
  details = "; ".join(f"{key}: file {recorded.get(key)!r}, asked {wanted[key]!r}" for key in differing)
  return f"{what} {os.fspath(path)} was made from something else ({details}). {remedy}".strip()


def check_record(
  path: str | os.PathLike,
  recorded: Mapping[str, Any],
  wanted: Mapping[str, Any],
  *,
  what: str = "",
  remedy: str = "",
  error: type[Exception] = ArtifactMismatchError,
) -> None:
  """Raises ``error`` with :func:`mismatch_message` unless ``recorded`` agrees with ``wanted`` on every key."""
  problem = mismatch_message(path, recorded, wanted, what=what, remedy=remedy)
  if problem is not None:
    raise error(problem)
