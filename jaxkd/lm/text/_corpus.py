"""The code corpus: source files split by a hash of their path, fingerprinted by their contents."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sysconfig
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = [
  "EXCLUDED_DIRS",
  "FORMAT",
  "SEPARATOR",
  "SPLITS",
  "CodeCorpus",
  "SourceFile",
  "check_split",
]

_log = logging.getLogger("jaxkd.lm.text")  # one logger for the text pipeline, whichever file logs

SPLITS = ("train", "validation", "test")
# Directory names left out at any depth (see the module docstring for why).
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
# The tokenizer's only special token; it precedes every document in a token file.
SEPARATOR = "<|endoftext|>"
# Bumped when the meaning of a fingerprint or of a token file changes, so old files are not taken for new ones.
FORMAT = 1
# The UTF-8 encoding of U+FFFD, the character errors="replace" puts where bytes do not decode.
_REPLACEMENT_BYTES = "\ufffd".encode()


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One document of a :class:`CodeCorpus`.

  Attributes:
    path: path relative to the corpus root, with ``/`` separators.
    size: bytes on disk.
    sha256: hex SHA-256 of those bytes.
    num_bytes: UTF-8 bytes of the decoded text (``size`` unless some bytes did not decode).
    replacements: undecodable byte sequences, each replaced by U+FFFD.
    split: ``'train'``, ``'validation'`` or ``'test'``.
    rank: the hash of ``path`` as a fraction in [0, 1); sets the split and the order under a byte budget.
  """

  path: str
  size: int
  sha256: str
  num_bytes: int
  replacements: int
  split: str
  rank: float


def _path_rank(relative_path: str) -> float:
  return int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") / 2.0**64


def _decode(raw: bytes) -> tuple[str, int]:
  """``raw`` decoded as UTF-8 with errors replaced, and how many replacements that made."""
  text = raw.decode("utf-8", errors="replace")
  # A U+FFFD that is really in the file is the valid sequence EF BF BD, which no undecodable span can swallow
  # (EF is a lead byte), so the replacements are the U+FFFDs of the text that the bytes do not hold.
  return text, text.count("\ufffd") - raw.count(_REPLACEMENT_BYTES)


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")


class CodeCorpus:
  """The ``.py`` files under a directory (by default the standard library), split by a hash of their paths.

  Every file is read once here, to hash it and to count its decoded bytes; texts are read again, and checked
  against that hash, when asked for.

  Args:
    root: the directory to read; default the running interpreter's standard library,
      ``sysconfig.get_paths()["stdlib"]``.
    fractions: shares of ``('train', 'validation', 'test')``, non-negative and summing to 1.
    max_bytes: budget of UTF-8 bytes per split, or None for all files. A split then holds its files in the order
      of their path hashes up to (not including) the first that would exceed the budget: a deterministic random
      sample, and a larger budget only adds files.
    suffix: file name ending of the documents.

  Attributes:
    root: the directory read.
    all_files: every document, split or not, as :class:`SourceFile` sorted by path.
    fingerprint: hex SHA-256 of the sorted ``(path, size, sha256)`` of all files, ``fractions`` and
      ``max_bytes``; the name of this corpus in results. The root is left out, so the same files elsewhere give
      the same fingerprint.

  Raises:
    ValueError: ``root`` holds no matching file, or ``fractions`` or ``max_bytes`` are invalid.
  """

  def __init__(
    self,
    root: str | os.PathLike | None = None,
    *,
    fractions: Sequence[float] = (0.9, 0.05, 0.05),
    max_bytes: int | None = None,
    suffix: str = ".py",
  ):
    self.root = os.fspath(root) if root is not None else sysconfig.get_paths()["stdlib"]
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
      raise ValueError(f"fractions must be 3 non-negative shares of {SPLITS} summing to 1, got {fractions}.")
    if max_bytes is not None and max_bytes < 1:
      raise ValueError(f"max_bytes must be a positive number of bytes per split or None, got {max_bytes}.")
    self.fractions = fractions
    self.max_bytes = None if max_bytes is None else int(max_bytes)
    self.suffix = suffix
    if not os.path.isdir(self.root):
      raise ValueError(f"corpus root {self.root} is not a directory.")
    bounds = np.cumsum(fractions)
    files = []
    for relative_path in _list_files(self.root, suffix):
      with open(os.path.join(self.root, relative_path), "rb") as f:
        raw = f.read()
      text, replacements = _decode(raw)
      rank = _path_rank(relative_path)
      # min() keeps a rank just below 1 in 'test' when float rounding leaves the last bound under 1.
      split = SPLITS[min(int(np.searchsorted(bounds, rank, side="right")), len(SPLITS) - 1)]
      num_bytes = len(raw) if not replacements else len(text.encode())
      files.append(
        SourceFile(relative_path, len(raw), hashlib.sha256(raw).hexdigest(), num_bytes, replacements, split, rank)
      )
    if not files:
      raise ValueError(f"corpus root {self.root} holds no {suffix} file outside {sorted(EXCLUDED_DIRS)}.")
    self.all_files: tuple[SourceFile, ...] = tuple(files)
    self._selected = {split: self._select(split) for split in SPLITS}
    digest = hashlib.sha256()
    digest.update(
      json.dumps(
        {"format": FORMAT, "fractions": fractions, "max_bytes": self.max_bytes, "suffix": suffix}, sort_keys=True
      ).encode()
    )
    for file in self.all_files:
      digest.update(f"\n{file.path}\0{file.size}\0{file.sha256}".encode())
    self.fingerprint = digest.hexdigest()
    bad = [file.path for file in files if file.replacements]
    if bad:
      _log.warning(
        "Corpus %s: %d files have bytes that are not UTF-8 (replaced by U+FFFD): %s", self.root, len(bad), bad[:5]
      )

  def _select(self, split: str) -> tuple[SourceFile, ...]:
    candidates = sorted((file for file in self.all_files if file.split == split), key=lambda file: file.rank)
    if self.max_bytes is not None:
      total = 0
      for count, file in enumerate(candidates):
        if total + file.num_bytes > self.max_bytes:
          candidates = candidates[:count]
          break
        total += file.num_bytes
    return tuple(sorted(candidates, key=lambda file: file.path))

  def source_files(self, split: str) -> tuple[SourceFile, ...]:
    """The documents of ``split`` (within the byte budget), sorted by path."""
    check_split(split)
    return self._selected[split]

  def files(self, split: str) -> list[str]:
    """Relative paths of the documents of ``split``, sorted; the order of documents everywhere."""
    return [file.path for file in self.source_files(split)]

  def num_bytes(self, split: str) -> int:
    """UTF-8 bytes of the text of ``split``: the denominator of :func:`bits_per_byte`."""
    return sum(file.num_bytes for file in self.source_files(split))

  def replacements(self, split: str) -> int:
    """Undecodable byte sequences in ``split``, each read as one U+FFFD (0 for the standard library)."""
    return sum(file.replacements for file in self.source_files(split))

  def texts(self, split: str) -> Iterator[str]:
    """The documents of ``split`` in :meth:`files` order, decoded as UTF-8 with undecodable bytes replaced.

    Raises:
      RuntimeError: a file changed since the corpus was listed, so the fingerprint no longer names the text.
    """
    for file in self.source_files(split):
      path = os.path.join(self.root, file.path)
      with open(path, "rb") as f:
        raw = f.read()
      if hashlib.sha256(raw).hexdigest() != file.sha256:
        raise RuntimeError(
          f"{path} changed after the corpus was listed (fingerprint {self.fingerprint[:12]}); make a new CodeCorpus."
        )
      yield _decode(raw)[0]

  def __repr__(self) -> str:
    sizes = ", ".join(f"{split}: {len(self._selected[split])} files" for split in SPLITS)
    return f"CodeCorpus({self.root!r}, {sizes}, fingerprint={self.fingerprint[:12]})"


def _list_files(root: str, suffix: str) -> list[str]:
  found = []
  for directory, subdirectories, names in os.walk(root):
    subdirectories[:] = [name for name in subdirectories if name not in EXCLUDED_DIRS]
    relative = os.path.relpath(directory, root)
    for name in names:
      if name.endswith(suffix) and os.path.isfile(os.path.join(directory, name)):
        found.append(name if relative == "." else f"{relative.replace(os.sep, '/')}/{name}")
  return sorted(found)
