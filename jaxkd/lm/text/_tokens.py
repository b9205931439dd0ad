"""The byte-level BPE and the token files, each cached beside a JSON record of what it was made from."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

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
from jaxkd.data.datasets import DamagedDataError
from jaxkd.lm.text._corpus import FORMAT, SEPARATOR, CodeCorpus, check_split

_META_SUFFIX = ".meta.json"  # the record beside each file
__all__ = [
  "load_tokens",
  "tokenize_split",
  "tokenizer_fingerprint",
  "train_tokenizer",
]

_log = logging.getLogger("jaxkd.lm.text")  # one logger for the text pipeline, whichever file logs

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
  wanted = {"format": FORMAT, "corpus_fingerprint": corpus.fingerprint, "vocab_size": int(vocab_size)}
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
  check_split(split)
  path = os.fspath(path)
  separator = tokenizer.token_to_id(SEPARATOR)
  if separator is None:
    raise ValueError(f"the tokenizer has no {SEPARATOR!r} token to separate documents; use train_tokenizer's.")
  wanted = {
    "format": FORMAT,
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
