"""The artifact contract: every file jaxkd writes and later trusts goes through here.

One fingerprint for pytrees (:func:`tree_fingerprint`), one digest for JSON values
(:func:`json_digest`) and for files (:func:`file_sha256`), one atomic write
(:func:`write_atomically`, and :func:`write_json` over it), one reader of JSON
sidecars that names the damaged file (:func:`read_json`), and one error type for an
artifact that does not match what the reader expects (:class:`ArtifactError`).
Caches (teacher logits, top-k targets), token files, checkpoint digests and the
experiments' sub-run records all use these, so a damaged or stale file is caught the
same way everywhere: by a digest, with a message naming the file and the remedy.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = [
  "ArtifactError",
  "file_sha256",
  "json_digest",
  "read_json",
  "tree_fingerprint",
  "write_atomically",
  "write_json",
]


class ArtifactError(ValueError):
  """A file jaxkd wrote is missing, damaged, or does not match what its reader expects."""


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


def json_digest(value: Any, *, default: Callable[[Any], Any] | None = None) -> str:
  """Hex SHA-256 of ``value`` as canonical JSON (sorted keys, no whitespace): a key for a description."""
  encoded = json.dumps(value, sort_keys=True, separators=(",", ":"), default=default)
  return hashlib.sha256(encoded.encode()).hexdigest()


def file_sha256(path: str | os.PathLike, *, chunk_bytes: int = 1 << 20) -> str:
  """Hex SHA-256 of a file's bytes, read in chunks (files larger than memory are fine)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(chunk_bytes):
      digest.update(chunk)
  return digest.hexdigest()


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


def read_json(path: str | os.PathLike, *, what: str = "file", remedy: str = "") -> Any:
  """The JSON value in ``path``; a missing, unreadable or malformed file is an :class:`ArtifactError`.

  Args:
    path: the file.
    what: what the file is, for the message (``"top-k cache manifest"``).
    remedy: what the user should do, appended to the message (``"delete the directory and rerun"``).
  """
  try:
    with open(path, "rb") as f:
      return json.loads(f.read())
  except FileNotFoundError as e:
    raise ArtifactError(f"{what} {os.fspath(path)!r} is missing. {remedy}".strip()) from e
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ArtifactError(f"{what} {os.fspath(path)!r} is damaged ({e}). {remedy}".strip()) from e
