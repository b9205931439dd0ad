"""An offline text corpus for language-model distillation: Python source files, a byte-level BPE, token windows.

The corpus (:class:`CodeCorpus`) is the running interpreter's standard library: every ``.py`` file under
``sysconfig.get_paths()["stdlib"]``, except those under a directory named ``site-packages``, ``dist-packages``,
``test``, ``tests``, ``idlelib`` or ``__pycache__`` at any depth (installed packages are not the standard library;
the test suites and IDLE are large, repetitive and partly machine-generated). Any other directory can stand in
(``root=``). It needs no network and is on every machine that runs jaxkd, but its contents depend on the Python
version, so results name it by :attr:`CodeCorpus.fingerprint`, which covers every file's path, size and content
hash, the split fractions and the byte budget, and not where the files lie.

Each file is one document, assigned to ``'train'``, ``'validation'`` or ``'test'`` by a hash of its relative path
(90/5/5 by default): the split of a file never depends on which other files exist, so a new Python release moves
only the files it adds or removes.

The pipeline, each step cached on disk next to a JSON record (``<file>.meta.json``) of what it was made from:

1. :func:`train_tokenizer`: a byte-level BPE (Hugging Face ``tokenizers``) trained on the training split, with
   :data:`SEPARATOR` as its only special token. Byte level means every text round-trips exactly, so
   :func:`bits_per_byte` compares models with different tokenizers.
2. :func:`tokenize_split`: a split's documents, each preceded by the separator, concatenated into one uint16
   array saved as ``.npy`` (memory-mapped when read back) with a SHA-256 checksum.
3. :class:`TokenSequences`: the token array cut into windows of ``length`` predictions; :func:`token_batches`
   streams shuffled, per-process, resumable training batches from it with grain; :func:`eval_batches` walks a
   split once, in order, scoring every token but the first exactly once.

Batches are dicts of this process's rows, NumPy arrays:

* ``'tokens'``: int32 ``[batch, length]``, the model's input;
* ``'label'``: int32 ``[batch, length]``, the next token at each position (``label[:, t] = tokens[:, t + 1]``
  within a window, and the window's last label is the first token of the next window);
* ``'mask'``: bool ``[batch, length]``, :func:`eval_batches` only; False marks padding (whole padding rows and the
  unfilled end of the split's last window), whose tokens and labels are 0.

A file that was damaged after it was written (a checksum that does not match, a truncated array, an unreadable
record) is never used and never silently replaced: it raises :class:`jaxkd.datasets.DamagedDataError` naming the
file to delete, because damage on disk is worth a look and every file here is rebuilt by deleting it. A file made
from something else (another corpus, tokenizer, split or vocabulary size) raises ValueError naming both sides,
unless ``overwrite=True`` asks to rebuild it. Files are written under a temporary name and renamed, so a crash
or processes writing at once never leave a partial file under the final name.

Usage::

  corpus = CodeCorpus(max_bytes=8_000_000)
  tokenizer = train_tokenizer(corpus, vocab_size=8192, path=workdir / "tokenizer.json")
  train = TokenSequences(tokenize_split(corpus, tokenizer, "train", path=workdir / "train.npy"), length=128)
  batches = token_batches(train, batch_size=32, seed=0)          # infinite, resumable with get_state/set_state
  test = TokenSequences(tokenize_split(corpus, tokenizer, "test", path=workdir / "test.npy"), length=128)
  total_nats = sum(...)                                          # summed cross-entropy over eval_batches(test, ...)
  print(bits_per_byte(total_nats, corpus.num_bytes("test")))
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxkd.artifacts import (
  ArtifactError,
  ArtifactMismatchError,
  array_sha256,
  mismatch_message,
  read_json_object,
  write_atomically,
  write_json,
)
from jaxkd.data.batches import shard_bounds
from jaxkd.data.datasets import DamagedDataError

__all__ = [
  "EXCLUDED_DIRS",
  "SEPARATOR",
  "SPLITS",
  "CodeCorpus",
  "SourceFile",
  "TokenBatches",
  "TokenSequences",
  "bits_per_byte",
  "eval_batches",
  "load_tokens",
  "num_eval_batches",
  "token_batches",
  "tokenize_split",
  "tokenizer_fingerprint",
  "train_tokenizer",
]

_log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# Directory names left out at any depth (see the module docstring for why).
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
# The tokenizer's only special token; it precedes every document in a token file.
SEPARATOR = "<|endoftext|>"
# Bumped when the meaning of a fingerprint or of a token file changes, so old files are not taken for new ones.
_FORMAT = 1
_META_SUFFIX = ".meta.json"
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


def _check_split(split: str) -> None:
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
        {"format": _FORMAT, "fractions": fractions, "max_bytes": self.max_bytes, "suffix": suffix}, sort_keys=True
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
    _check_split(split)
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


# ---------------------------------------------------------------------------------------------------------------
# Files with a record of what they were made from.


def _meta_path(path: str) -> str:
  return path + _META_SUFFIX


def _write_meta(path: str, meta: Mapping[str, Any]) -> None:
  write_json(_meta_path(path), dict(meta))


def _read_meta(path: str) -> dict[str, Any] | None:
  """The record of ``path``; None when there is none."""
  meta_path = _meta_path(path)
  if not os.path.exists(meta_path):
    return None
  try:
    return read_json_object(meta_path, what=f"the record of {path}", remedy="Delete both files to rebuild.")
  except ArtifactError as e:
    raise DamagedDataError(str(e)) from e


def _mismatch(path: str, recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
  """A sentence naming what ``path`` was made from against what is asked for; None when they agree."""
  return mismatch_message(path, recorded, wanted, remedy="Pass overwrite=True to rebuild it, or use another path.")


def _prepare_overwrite(path: str) -> None:
  # The record goes first: a crash before the new record is written leaves a file without one, which is rebuilt,
  # never a new file under an old record.
  for stale in (_meta_path(path), path):
    if os.path.exists(stale):
      os.remove(stale)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer.


def tokenizer_fingerprint(tokenizer: tokenizers.Tokenizer) -> str:
  """Hex SHA-256 of ``tokenizer.to_str()``: its vocabulary, merges, special tokens and pipeline."""
  return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def _new_tokenizer() -> tokenizers.Tokenizer:
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  return tokenizer


def train_tokenizer(
  corpus: CodeCorpus, *, vocab_size: int = 8192, path: str | os.PathLike, overwrite: bool = False
) -> tokenizers.Tokenizer:
  """A byte-level BPE trained on ``corpus``'s training split, or the one already saved at ``path`` for it.

  The tokenizer has 256 byte tokens, :data:`SEPARATOR` (id 0) and merges up to ``vocab_size`` tokens (fewer when
  the text runs out of pairs to merge). It is saved as JSON at ``path`` with a record ``<path>.meta.json`` of the
  corpus fingerprint, the vocabulary size asked for and the tokenizer's own fingerprint.

  Args:
    corpus: only its ``'train'`` split is read.
    vocab_size: tokens in the vocabulary, in ``(256, 65536]`` (so ids fit uint16).
    path: the tokenizer's JSON file.
    overwrite: retrain when ``path`` holds a tokenizer of another corpus or size (or one without a record).

  Returns:
    The tokenizer. Encode text with ``encode_special_tokens = True`` (as :func:`tokenize_split` does) so that a
    literal ``<|endoftext|>`` in a text is read as text.

  Raises:
    ValueError: ``vocab_size`` is out of range; or ``path`` holds a tokenizer made for another corpus or size, or
      one without a record, and ``overwrite`` is False (the message names both fingerprints).
    DamagedDataError: the tokenizer at ``path`` is not the one its record names, or either file is unreadable.
  """
  if not 256 < vocab_size <= 65536:
    raise ValueError(f"vocab_size must be in (256, 65536] (256 byte tokens, ids that fit uint16), got {vocab_size}.")
  path = os.fspath(path)
  wanted = {"format": _FORMAT, "corpus_fingerprint": corpus.fingerprint, "vocab_size": int(vocab_size)}
  if os.path.exists(path):
    meta = _read_meta(path)
    if meta is None:
      problem = f"{path} exists but has no record {_meta_path(path)} of the corpus it was trained on"
      problem += f" (this corpus: {corpus.fingerprint}); pass overwrite=True to retrain it, or use another path."
    else:
      problem = _mismatch(path, meta, wanted)
    if problem is None:
      try:
        tokenizer = tokenizers.Tokenizer.from_file(path)
      except Exception as e:  # tokenizers raises a bare Exception for a malformed file.
        raise DamagedDataError(f"tokenizer {path} is unreadable ({e}); delete it and its record to retrain.") from e
      if tokenizer_fingerprint(tokenizer) != meta.get("tokenizer_fingerprint"):
        raise DamagedDataError(
          f"tokenizer {path} is not the one its record {_meta_path(path)} names (fingerprint "
          f"{tokenizer_fingerprint(tokenizer)}, recorded {meta.get('tokenizer_fingerprint')}): it was edited or "
          "damaged. Delete both files to retrain."
        )
      _log.info("Tokenizer: reusing %s.", path)
      return tokenizer
    if not overwrite:
      raise ArtifactMismatchError(problem)
    _prepare_overwrite(path)

  tokenizer = _new_tokenizer()
  trainer = trainers.BpeTrainer(
    vocab_size=int(vocab_size),
    special_tokens=[SEPARATOR],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  files = corpus.source_files("train")
  if not files:
    raise ValueError(f"{corpus!r} has no training file to train a tokenizer on.")
  tokenizer.train_from_iterator(corpus.texts("train"), trainer=trainer, length=len(files))
  text = tokenizer.to_str()
  write_atomically(path, lambda f: f.write(text.encode()))
  _write_meta(
    path,
    {
      **wanted,
      "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
      "actual_vocab_size": tokenizer.get_vocab_size(),
      "separator": SEPARATOR,
      "tokenizers_version": tokenizers.__version__,
    },
  )
  return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Token files.


def _token_dtype(tokenizer: tokenizers.Tokenizer) -> np.dtype:
  return np.dtype(np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32)


def load_tokens(path: str | os.PathLike) -> np.ndarray:
  """The token array saved at ``path`` by :func:`tokenize_split`, memory-mapped read-only, after checking it.

  Raises:
    FileNotFoundError: no file or no record.
    DamagedDataError: the file is truncated, unreadable, of another size or dtype than recorded, or fails its
      checksum; the message names it and says to delete it.
  """
  path = os.fspath(path)
  meta = _read_meta(path)
  if meta is None or not os.path.exists(path):
    raise FileNotFoundError(f"no token file {path} with its record {_meta_path(path)}; make it with tokenize_split.")
  return _load_checked(path, meta)


def _load_checked(path: str, meta: Mapping[str, Any]) -> np.ndarray:
  remedy = "Delete it (and its record) to tokenize again."
  try:
    tokens = np.load(path, mmap_mode="r", allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise DamagedDataError(f"token file {path} is unreadable or truncated ({type(e).__name__}: {e}). {remedy}") from e
  if tokens.ndim != 1 or tokens.dtype.str != meta.get("dtype") or len(tokens) != meta.get("num_tokens"):
    raise DamagedDataError(
      f"token file {path} holds {tokens.dtype.str}{tokens.shape}, but its record says {meta.get('dtype')}"
      f"[{meta.get('num_tokens')}]. {remedy}"
    )
  if array_sha256(tokens) != meta.get("sha256"):
    raise DamagedDataError(f"token file {path} fails its checksum: it changed after it was written. {remedy}")
  return tokens


def _encode_documents(
  tokenizer: tokenizers.Tokenizer, texts: Iterator[str], separator: int, documents_per_call: int
) -> np.ndarray:
  """``[sep, doc_1..., sep, doc_2..., ...]`` of ``texts``, in the tokenizer's token dtype."""
  dtype = _token_dtype(tokenizer)
  pieces = []
  literal_special = tokenizer.encode_special_tokens
  # A literal "<|endoftext|>" in a document is text, not a separator; the setting is not part of to_str(), so the
  # fingerprint is unaffected.
  tokenizer.encode_special_tokens = True
  try:
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which halves the time here.
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    while chunk := list(itertools.islice(texts, documents_per_call)):
      for encoding in encode_batch(chunk, add_special_tokens=False):
        pieces.append(np.array([separator], dtype))
        pieces.append(np.asarray(encoding.ids, dtype))
  finally:
    tokenizer.encode_special_tokens = literal_special
  return np.concatenate(pieces)


def tokenize_split(
  corpus: CodeCorpus,
  tokenizer: tokenizers.Tokenizer,
  split: str,
  *,
  path: str | os.PathLike,
  overwrite: bool = False,
  documents_per_call: int = 256,
) -> np.ndarray:
  """All documents of ``split`` as one token array, each preceded by :data:`SEPARATOR`; cached at ``path``.

  ``[sep, doc_1..., sep, doc_2..., ...]``: every token of every document is a prediction target (the first
  token, a separator, is the only one that is not), so the cross-entropy summed over all ``num_tokens - 1``
  targets, divided by ``corpus.num_bytes(split)``, is the bits per byte of the text (:func:`bits_per_byte`); the
  separators between documents are predicted too, a small cost every model pays alike.

  The array is saved with ``np.save`` (so ``np.load(path, mmap_mode='r')`` reads it) and a record
  ``<path>.meta.json`` of the corpus and tokenizer fingerprints, the split, ``num_tokens``, ``num_bytes`` and the
  array's SHA-256. A file whose record matches is checked against its checksum and reused.

  Args:
    corpus: the corpus.
    tokenizer: from :func:`train_tokenizer` (any tokenizer with :data:`SEPARATOR` in its vocabulary).
    split: ``'train'``, ``'validation'`` or ``'test'``.
    path: the ``.npy`` file.
    overwrite: retokenize when ``path`` holds another corpus's, tokenizer's or split's tokens.
    documents_per_call: documents per ``encode_batch`` call (bounds the memory of the encodings).

  Returns:
    uint16 (uint32 for a vocabulary over 65536) ``[num_tokens]``, memory-mapped read-only.

  Raises:
    ValueError: ``split`` is unknown; the split is empty; the tokenizer has no :data:`SEPARATOR`; or ``path`` holds
      tokens made from something else and ``overwrite`` is False.
    DamagedDataError: the file at ``path`` or its record is damaged (the message names it and says to delete it).
  """
  _check_split(split)
  path = os.fspath(path)
  separator = tokenizer.token_to_id(SEPARATOR)
  if separator is None:
    raise ValueError(f"the tokenizer has no {SEPARATOR!r} token to separate documents; use train_tokenizer's.")
  wanted = {
    "format": _FORMAT,
    "corpus_fingerprint": corpus.fingerprint,
    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
    "split": split,
  }
  if os.path.exists(path):
    meta = _read_meta(path)
    if meta is None:
      # The data is written before its record: a file without one is what a crash in between leaves.
      _log.info("Token file %s has no record; tokenizing again.", path)
    else:
      problem = _mismatch(path, meta, wanted)
      if problem is None:
        _log.info("Tokens: reusing %s.", path)
        return _load_checked(path, meta)
      if not overwrite:
        raise ArtifactMismatchError(problem)
    _prepare_overwrite(path)

  files = corpus.source_files(split)
  if not files:
    raise ValueError(f"split {split!r} of {corpus!r} has no file to tokenize.")
  tokens = _encode_documents(tokenizer, corpus.texts(split), separator, documents_per_call)
  meta = {
    **wanted,
    "num_tokens": len(tokens),
    "num_bytes": corpus.num_bytes(split),
    "num_documents": len(files),
    "dtype": tokens.dtype.str,
    "separator_id": separator,
    "sha256": array_sha256(tokens),
  }
  write_atomically(path, lambda f: np.save(f, tokens, allow_pickle=False))
  _write_meta(path, meta)
  return _load_checked(path, meta)


# ---------------------------------------------------------------------------------------------------------------
# Windows and batches.


class TokenSequences:
  """Windows of ``length`` next-token predictions over a token array; a grain ``RandomAccessDataSource``.

  Window ``i`` reads ``tokens[i * length : (i + 1) * length + 1]``: its inputs are the first ``length`` tokens and
  its labels the last ``length``. Windows share only their boundary token (the last label of one is the first
  input of the next), so every target position ``1 .. len(self) * length`` is in exactly one window; the
  ``num_targets - len(self) * length`` targets left over (fewer than ``length``) are scored by
  :func:`eval_batches`' last, partly masked window. Each window starts without context: a model sees at most
  ``length`` tokens back.

  Args:
    tokens: 1-D integer array, e.g. the memory-mapped result of :func:`tokenize_split`.
    length: predictions per window (the model's context).

  >>> source = TokenSequences(np.arange(10, dtype=np.uint16), length=4)
  >>> len(source), source[1]["tokens"].tolist(), source[1]["label"].tolist()
  (2, [4, 5, 6, 7], [5, 6, 7, 8])
  """

  def __init__(self, tokens: np.ndarray, *, length: int):
    if getattr(tokens, "ndim", None) != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"tokens must be a 1-D integer array, got {getattr(tokens, 'dtype', type(tokens))}.")
    if length < 1:
      raise ValueError(f"length must be >= 1, got {length}.")
    if len(tokens) < 2:
      raise ValueError(f"{len(tokens)} tokens hold no prediction target; a split needs at least 2.")
    self.tokens = tokens
    self.length = int(length)
    self._offsets = np.arange(self.length + 1)

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)

  @property
  def num_targets(self) -> int:
    """Predicted positions in the whole array: every token but the first."""
    return len(self.tokens) - 1

  def __len__(self) -> int:
    """Full windows; the targets after them are :func:`eval_batches`' only."""
    return self.num_targets // self.length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"window {index} out of range for {len(self)} windows.")
    return {key: value[0] for key, value in self.gather(np.array([index % len(self)])).items()}

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Windows ``indices`` (each in ``[0, len(self))``): ``{'tokens', 'label'}``, int32 ``[len(indices), length]``.

    One fancy-indexing read of the token array, so a batch costs one copy whatever its size.
    """
    indices = np.asarray(indices, dtype=np.int64)
    windows = np.asarray(self.tokens[indices[:, None] * self.length + self._offsets]).astype(np.int32)
    return {"tokens": windows[:, :-1], "label": windows[:, 1:]}

  def __repr__(self) -> str:
    return f"TokenSequences({len(self)} windows of {self.length}, {self.num_tokens} tokens)"


def _resolve_shards(shard_index: int | None, shard_count: int | None, batch_size: int) -> tuple[int, int, int]:
  shard_index = jax.process_index() if shard_index is None else int(shard_index)
  shard_count = jax.process_count() if shard_count is None else int(shard_count)
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(
      f"shard_index must be in [0, shard_count) with shard_count >= 1, got {shard_index} of {shard_count}."
    )
  if batch_size < 1 or batch_size % shard_count:
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of shard_count {shard_count}.")
  return shard_index, shard_count, batch_size // shard_count


class TokenBatches:
  """A grain iterator of training batches that checks, on restore, that a saved position is one of its own.

  :meth:`get_state` is a small JSON-able dict (grain's position plus the pipeline's settings) for a checkpoint;
  :meth:`set_state` of an identically built iterator continues with exactly the batch that would have come next.
  """

  def __init__(self, dataset: grain.IterDataset, settings: Mapping[str, Any]):
    self._iterator = iter(dataset)
    self.settings = dict(settings)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._iterator.get_state(), **self.settings}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a position saved by :meth:`get_state`.

    Raises:
      ValueError: the state comes from a pipeline with other settings (windows, batch size, seed, sharding...).
    """
    mismatched = {key: (state.get(key), value) for key, value in self.settings.items() if state.get(key) != value}
    if mismatched:
      details = ", ".join(f"{key}: saved {saved!r}, here {here!r}" for key, (saved, here) in mismatched.items())
      raise ValueError(f"iterator state does not match this pipeline ({details}).")
    self._iterator.set_state(dict(state["grain"]))


def token_batches(
  source: TokenSequences,
  *,
  batch_size: int,
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: int | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
  drop_remainder: bool = True,
  read_options: grain.ReadOptions | None = None,
) -> TokenBatches:
  """Training batches ``{'tokens', 'label'}`` (int32 ``[batch_size // shard_count, length]``) of ``source``.

  Built with grain: ``MapDataset.range(len(source)).shuffle(seed).repeat(num_epochs)``, the same global order in
  every process, of which process ``shard_index`` takes every ``shard_count``-th window, batched with one
  vectorised read of the token array per batch. Each process reads only its own windows, and the rows of batch
  ``k`` over all processes are exactly global batch ``k`` of a one-process run with the same ``batch_size``, so the
  data order does not depend on the number of processes. Each epoch is shuffled anew (grain folds the epoch into
  the seed). With a finite ``num_epochs`` the total is first cut to a multiple of ``shard_count`` (at most
  ``shard_count - 1`` windows of the last epoch), so that every process yields the same number of batches.

  Args:
    source: the windows.
    batch_size: global rows per step over all processes; a multiple of ``shard_count``.
    seed: shuffle seed, in ``[0, 2**32)``.
    shuffle: False keeps window order (epochs then repeat exactly).
    num_epochs: passes over the windows, or None for an endless stream.
    shard_index: this process's shard; default ``jax.process_index()``.
    shard_count: number of shards; default ``jax.process_count()``.
    drop_remainder: drop a last batch with fewer rows (finite ``num_epochs`` only).
    read_options: grain's; default no reader threads, since a batch is one slice of a memory-mapped array, cheaper
      than a thread handoff (:class:`jaxkd.data.DevicePrefetcher` overlaps batches with the step).

  Returns:
    A :class:`TokenBatches` iterator with ``get_state``/``set_state``.

  Raises:
    ValueError: ``source`` has no window, or an argument is out of range.
  """
  shard_index, shard_count, process_batch_size = _resolve_shards(shard_index, shard_count, batch_size)
  if len(source) == 0:
    raise ValueError(f"{source!r} has no full window: fewer than length + 1 = {source.length + 1} tokens.")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}.")
  dataset = grain.MapDataset.range(len(source))
  if shuffle:
    dataset = dataset.shuffle(seed=int(seed))
  dataset = dataset.repeat(num_epochs)
  if num_epochs is not None:
    dataset = dataset[: len(dataset) - len(dataset) % shard_count]
  dataset = dataset[shard_index::shard_count]
  dataset = dataset.batch(
    process_batch_size,
    drop_remainder=drop_remainder,
    batch_fn=lambda indices: source.gather(np.asarray(indices)),
  )
  if read_options is None:
    read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  settings = {
    "num_windows": len(source),
    "length": source.length,
    "batch_size": int(batch_size),
    "seed": int(seed),
    "shuffle": bool(shuffle),
    "num_epochs": num_epochs,
    "shard_index": shard_index,
    "shard_count": shard_count,
    "drop_remainder": bool(drop_remainder),
  }
  return TokenBatches(dataset.to_iter_dataset(read_options), settings)


def _num_eval_windows(source: TokenSequences) -> int:
  return math.ceil(source.num_targets / source.length)


def num_eval_batches(source: TokenSequences, *, batch_size: int, shard_count: int | None = None) -> int:
  """Batches :func:`eval_batches` yields, the same in every process."""
  shard_count = jax.process_count() if shard_count is None else int(shard_count)
  _, shard_count, process_batch_size = _resolve_shards(0, shard_count, batch_size)
  return math.ceil(math.ceil(_num_eval_windows(source) / shard_count) / process_batch_size)


def eval_batches(
  source: TokenSequences,
  *,
  batch_size: int,
  shard_index: int | None = None,
  shard_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Every target of the token array once, in order: batches ``{'tokens', 'label', 'mask'}``, ``[rows, length]``.

  The full windows of ``source``, then (when ``num_targets`` is not a multiple of ``length``) one last window of
  the remaining targets, its unfilled positions padded with token 0 and ``mask`` False; the last batch is filled
  with padding rows (``mask`` all False). ``mask.sum()`` over all batches of all processes is ``num_targets``
  (``num_tokens - 1``), the count :func:`bits_per_byte` needs. Process ``shard_index`` takes a contiguous range
  of the windows (:func:`jaxkd.data.shard_bounds`), and every process yields :func:`num_eval_batches` batches.

  Args:
    source: the windows.
    batch_size: global rows per batch over all processes; a multiple of ``shard_count``.
    shard_index: this process's shard; default ``jax.process_index()``.
    shard_count: number of shards; default ``jax.process_count()``.

  >>> source = TokenSequences(np.arange(10, dtype=np.uint16), length=4)
  >>> batches = list(eval_batches(source, batch_size=2, shard_index=0, shard_count=1))
  >>> [b["mask"].sum(axis=1).tolist() for b in batches]
  [[4, 4], [1, 0]]
  """
  shard_index, shard_count, process_batch_size = _resolve_shards(shard_index, shard_count, batch_size)
  num_batches = num_eval_batches(source, batch_size=batch_size, shard_count=shard_count)
  start, stop = shard_bounds(_num_eval_windows(source), shard_index, shard_count)
  length, num_targets = source.length, source.num_targets
  for step in range(num_batches):
    windows = np.arange(start + step * process_batch_size, start + (step + 1) * process_batch_size)
    # Targets of window w are positions w * length + 1 .. w * length + length; padding rows have none.
    real_rows = windows < stop
    targets = np.clip(num_targets - windows * length, 0, length) * real_rows  # [rows]
    mask = np.arange(length) < targets[:, None]  # [rows, length]
    # Read only what exists: clamp positions into the array, then zero whatever the mask leaves out.
    positions = np.minimum(windows[:, None] * length + np.arange(length + 1), num_targets)  # [rows, length + 1]
    read = np.asarray(source.tokens[positions]).astype(np.int32)
    tokens, label = read[:, :-1], read[:, 1:]
    yield {"tokens": np.where(mask, tokens, 0), "label": np.where(mask, label, 0), "mask": mask}


def bits_per_byte(total_nats: float, num_bytes: int) -> float:
  r"""Bits per UTF-8 byte of text: a model's cross-entropy that does not depend on its tokenizer.

  .. math::

    \mathrm{bpb} = \frac{\sum_t -\log p(x_t \mid x_{<t})}{\ln 2 \cdot \text{num\_bytes}}

  Args:
    total_nats: cross-entropy in nats summed (not averaged) over every predicted token of a split, i.e. the
      ``mask`` True positions of :func:`eval_batches`, ``num_tokens - 1`` of them.
    num_bytes: the split's UTF-8 bytes, :meth:`CodeCorpus.num_bytes`.

  >>> round(bits_per_byte(100 * math.log(2), 50), 6)
  2.0
  """
  if num_bytes <= 0:
    raise ValueError(f"num_bytes must be positive, got {num_bytes}.")
  return float(total_nats) / math.log(2) / num_bytes
