"""Sparse top-k teacher cache for language-model distillation, sharded so that each host reads only its part.

A dense teacher-logit cache (:mod:`jaxkd.logit_cache`) costs ``4 * vocab_size`` bytes per token, which for a
language model is hundreds of kilobytes per token. This cache keeps, per token of a fixed-length sequence dataset
(``N`` sequences of ``L`` tokens), only what a top-k distillation loss needs:

* ``topk_logits`` ``[N, L, k]`` float16: the teacher's ``k`` largest *raw* logits (not divided by the temperature),
  in decreasing order;
* ``topk_indices`` ``[N, L, k]``: their vocabulary ids, uint16 when ``vocab_size <= 65536`` and int32 otherwise;
* ``log_normalizer`` ``[N, L]`` float32: ``logsumexp(logits / T)`` over the *full* vocabulary at the cache's
  temperature ``T``, computed in float32 from the unrounded logits.

So the teacher's tempered log-probabilities of the cached classes are
``topk_logits / T - log_normalizer[..., None]``, and the mass of every other class (the tail bucket) is
``1 - sum(exp(...))``; after float16 rounding that sum can exceed 1 by a hair, so a loss should clip the tail
at 0 (or at a tiny positive value before taking its log).

Why float16 and not bfloat16: float16 keeps 10 mantissa bits to bfloat16's 7, so a logit near 30 is stored to
within 0.016 rather than 0.125 (a ~1.6% rather than ~13% error in its probability); numpy reads float16 natively,
so shards memory-map with plain ``np.load(mmap_mode='r')`` and need no ``ml_dtypes``; and float16's range
(+-65504) is far beyond any sane logit. Logits are clipped to that range before the cast (with a warning) so that
no value becomes inf. Why uint16 indices: a vocabulary of at most 65536 ids fits in 16 bits, which saves
``2 * k`` bytes per token over int32 (a third of the cache).

Bytes per token, ``k * (2 + index_bytes) + 4`` (:func:`cache_bytes_per_token`), against dense float32 logits
(``4 * vocab_size``); tests check every row against the formula and against a cache written to disk:

  ====  ==========  ===========  ===========  ===========  =============
  k     vocab_size  index dtype  top-k bytes  dense bytes  dense / top-k
  ====  ==========  ===========  ===========  ===========  =============
  8     32000       uint16       36           128000       3556x
  32    32000       uint16       132          128000       970x
  128   32000       uint16       516          128000       248x
  8     50257       uint16       36           201028       5584x
  32    50257       uint16       132          201028       1523x
  128   50257       uint16       516          201028       390x
  8     128256      int32        52           513024       9866x
  32    128256      int32        196          513024       2617x
  128   128256      int32        772          513024       665x
  ====  ==========  ===========  ===========  ===========  =============

(32000: Llama 2; 50257: GPT-2; 128256: Llama 3.) A billion tokens at ``k = 32`` take 132 GB instead of 128 TB.

On disk, a cache is a directory::

  shard-00000.topk_logits.npy      float16 [rows, L, k]
  shard-00000.topk_indices.npy     uint16 or int32 [rows, L, k]
  shard-00000.log_normalizer.npy   float32 [rows, L]
  shard-00000.token_digests.npy    uint64 [rows]: a hash of each sequence's tokens
  shard-00000.json                 the shard's sidecar: its rows and the size and SHA-256 of each file
  ...
  manifest.json                    written last: format version, key, k, vocab_size, length, temperature,
                                   dtypes, num_sequences, shard_size and every shard's sidecar record

Shard ``s`` holds sequences ``[s * shard_size, min(N, (s + 1) * shard_size))``. Every file is written to a
temporary name and renamed, so a killed writer never leaves a partial file under a final name; a shard's sidecar
is written after its arrays, so a sidecar vouches for a complete shard. Rerunning :func:`write_topk_cache` after a
kill reuses every shard whose sidecar matches the run and whose files verify, and computes the rest. The
manifest, written only when every shard is done, is what :func:`open_topk_cache` requires.

Reading: :func:`open_topk_cache` checks the manifest against the caller's key (a fingerprint of teacher, corpus,
tokenizer, k and temperature: :func:`topk_cache_key`) and checks that every shard file exists with its recorded
size, which costs a ``stat`` per file. The SHA-256 of a shard's files is checked when this process first reads
from that shard, not up front, so a host of a multi-host job reads and verifies only its own shards
(:meth:`TopKCache.process_shards`). Arrays are memory-mapped, so reading one sequence touches only its rows.

The token digests let :class:`JoinedSource` check that sequence ``i`` of the token pipeline is the sequence the
teacher saw at row ``i``: a reordered, re-tokenised or different corpus is an error, not silently wrong targets.

Usage::

  key = topk_cache_key(
    teacher_fingerprint=tree_fingerprint(teacher_params), corpus_fingerprint=corpus_sha256,
    tokenizer_fingerprint=tokenizer_sha256, k=32, temperature=1.0, length=1024, vocab_size=32000)
  teacher_fn = jax.jit(lambda tokens: teacher.apply(teacher_params, tokens))   # [b, L] -> [b, L, V]
  write_topk_cache(workdir / "topk", teacher_fn, sequences, k=32, key=key, vocab_size=32000)  # once
  cache = open_topk_cache(workdir / "topk", key=key, k=32, vocab_size=32000, length=1024)
  rows = cache.process_rows(jax.process_index(), jax.process_count())
  ds = grain.MapDataset.source(JoinedSource(sequences, cache))[rows.start : rows.stop].shuffle(seed=0).batch(8)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import operator
import os
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxkd import losses
from jaxkd.artifacts import write_atomically

__all__ = [
  "JoinedSource",
  "TopKCache",
  "TopKCacheError",
  "index_dtype",
  "open_topk_cache",
  "cache_bytes_per_token",
  "topk_cache_key",
  "write_topk_cache",
]

_log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The arrays a reader gets per sequence, in the order of the loss's inputs; token digests are for checks only.
ARRAYS = ("topk_logits", "topk_indices", "log_normalizer")
_FILES = (*ARRAYS, "token_digests")
_LOGITS_DTYPE = np.dtype("<f2")
_NORMALIZER_DTYPE = np.dtype("<f4")
_DIGEST_DTYPE = np.dtype("<u8")
_FLOAT16_MAX = float(np.finfo(np.float16).max)
# The header fields a shard's sidecar must share with the run for the shard to be reused.
_SHARD_FIELDS = ("format_version", "key", "k", "vocab_size", "length", "temperature", "dtypes")
_TEMPORARY = re.compile(r"^\.(shard-\d+\.[a-z_]+\.(npy|json)|manifest\.json)\.[0-9a-f]{32}\.tmp$")
_SIDECAR = re.compile(r"^shard-\d+\.json$")


class TopKCacheError(ValueError):
  """A top-k teacher cache is missing, incomplete, written for other settings, or damaged."""


def index_dtype(vocab_size: int) -> np.dtype:
  """The dtype of stored vocabulary ids: uint16 when every id fits in 16 bits (``vocab_size <= 65536``), else int32."""
  return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


def cache_bytes_per_token(k: int, vocab_size: int) -> int:
  """Bytes per token of this format's cache (:func:`jaxkd.losses.topk_bytes_per_token` of its dtypes)."""
  return losses.topk_bytes_per_token(k, logit_dtype=_LOGITS_DTYPE, index_dtype=index_dtype(vocab_size))


def _check_positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)


def _check_settings(k: Any, vocab_size: Any, temperature: Any) -> tuple[int, int, float]:
  k, vocab_size = _check_positive_int("k", k), _check_positive_int("vocab_size", vocab_size)
  if k > vocab_size:
    raise ValueError(f"k ({k}) cannot exceed vocab_size ({vocab_size}); k = vocab_size already keeps every class.")
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
    raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
  return k, vocab_size, float(temperature)


def topk_cache_key(
  *,
  teacher_fingerprint: str,
  corpus_fingerprint: str,
  tokenizer_fingerprint: str,
  k: int,
  temperature: float,
  length: int,
  vocab_size: int,
  extra: Mapping[str, Any] | None = None,
) -> str:
  """Hex SHA-256 naming everything that sets a top-k cache's contents.

  The cache stores this key and :func:`open_topk_cache` refuses a cache whose key differs, so a cache written for
  another teacher, corpus, tokenizer or setting is never read by mistake.

  Args:
    teacher_fingerprint: identifies the teacher's variables and code, e.g.
      :func:`jaxkd.artifacts.tree_fingerprint` of its variables combined with
      :func:`jaxkd.logit_cache.describe` of its apply function.
    corpus_fingerprint: identifies the sequences (their source, filtering and order), e.g. a hash of the files.
    tokenizer_fingerprint: identifies the tokenizer (e.g. a hash of its vocabulary file).
    k: classes kept per token.
    temperature: the temperature of the stored log-normaliser.
    length: tokens per sequence.
    vocab_size: the teacher's number of classes.
    extra: further JSON-able facts that change the teacher's outputs (a dtype policy, a model revision).

  Returns:
    64 hex digits: the SHA-256 of a canonical JSON (sorted keys, no whitespace) of all the arguments.

  Raises:
    ValueError: a fingerprint is not a non-empty string, a setting is out of range, or ``extra`` is not JSON-able.
  """
  fingerprints = {"teacher": teacher_fingerprint, "corpus": corpus_fingerprint, "tokenizer": tokenizer_fingerprint}
  for name, value in fingerprints.items():
    if not isinstance(value, str) or not value:
      raise ValueError(f"{name}_fingerprint must be a non-empty string, got {value!r}.")
  k, vocab_size, temperature = _check_settings(k, vocab_size, temperature)
  description = {
    "format_version": FORMAT_VERSION,
    "fingerprints": fingerprints,
    "k": k,
    "temperature": temperature,
    "length": _check_positive_int("length", length),
    "vocab_size": vocab_size,
    "extra": dict(extra or {}),
  }
  try:
    # No `default=`: a repr could hold a memory address, which would give a new key in every run.
    encoded = json.dumps(description, sort_keys=True, separators=(",", ":"), allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"extra must hold only JSON values (str, int, finite float, bool, None, lists and dicts), got {extra!r}: {e}. "
      "Describe other objects as strings first (e.g. jaxkd.logit_cache.describe)."
    ) from e
  return hashlib.sha256(encoded.encode()).hexdigest()


def _token_digest(tokens: np.ndarray) -> int:
  """A 64-bit hash of one sequence's tokens, as int32, so that int32 and int64 token arrays hash alike."""
  data = np.ascontiguousarray(tokens, dtype="<i4").tobytes()
  return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class _Sequences:
  """Token rows of an ``[N, L]`` array or of a source whose items are ``{'tokens': [L]}`` dicts (or ``[L]`` arrays)."""

  def __init__(self, sequences: Any, vocab_size: int):
    self.array = np.asarray(sequences) if isinstance(sequences, (np.ndarray, jax.Array)) else None
    if self.array is not None and self.array.ndim != 2:
      raise ValueError(f"sequences given as an array must be [num_sequences, length], got shape {self.array.shape}.")
    self.sequences, self.vocab_size = sequences, vocab_size
    if len(sequences) == 0:
      raise ValueError("sequences is empty: there is nothing to cache.")
    self.length = len(self._row(0))

  def __len__(self) -> int:
    return len(self.sequences)

  def _row(self, i: int) -> np.ndarray:
    if self.array is not None:
      tokens = self.array[i]
    else:
      item = self.sequences[i]
      tokens = np.asarray(item["tokens"] if isinstance(item, Mapping) else item)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"sequence {i}'s tokens must be integers [length], got {tokens.dtype}{tokens.shape}.")
    return tokens

  def rows(self, start: int, stop: int) -> np.ndarray:
    """int32 ``[stop - start, length]``, checked for shape and range."""
    if self.array is not None:
      tokens = self.array[start:stop]
    else:
      rows = [self._row(i) for i in range(start, stop)]
      for i, row in enumerate(rows):
        if len(row) != self.length:
          raise ValueError(
            f"every sequence must have the same length: sequence 0 has {self.length} tokens, sequence {start + i} has "
            f"{len(row)}. Pad or pack the sequences to one length first."
          )
      tokens = np.stack(rows)
    if not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"tokens must be integers, got {tokens.dtype}.")
    bad = np.flatnonzero(((tokens < 0) | (tokens >= self.vocab_size)).any(axis=1))
    if len(bad):
      raise ValueError(
        f"sequences {(start + bad[:5]).tolist()} hold token ids outside [0, vocab_size={self.vocab_size}) (range "
        f"{tokens.min()}..{tokens.max()}). Check that the tokenizer and vocab_size belong to this teacher."
      )
    return tokens.astype(np.int32)


def _reduce(logits: jax.Array, *, k: int, temperature: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k raw logits, their ids and the tempered log-normaliser, all in float32."""
  logits = logits.astype(jnp.float32)
  values, indices = jax.lax.top_k(logits, k)  # [b, L, k] each
  return values, indices, jax.nn.logsumexp(logits / temperature, axis=-1)  # [b, L]


def _check_logits(logits: Any, tokens: Any, vocab_size: int) -> None:
  expected = (*tokens.shape, vocab_size)
  if tuple(logits.shape) != expected:
    raise ValueError(
      f"teacher_fn must map tokens {tuple(tokens.shape)} to logits [batch, length, vocab_size] = {expected}, got "
      f"{tuple(logits.shape)}. Check vocab_size (the teacher's output size, including any padding of the vocabulary)."
    )


class _HashingWriter:
  """A file wrapper that hashes and counts what is written; ``np.save`` writes through it chunk by chunk."""

  def __init__(self, f: Any):
    self.f, self.digest, self.size = f, hashlib.sha256(), 0

  def write(self, data: bytes) -> int:
    self.digest.update(data)
    self.size += len(data)
    return self.f.write(data)


def _save_array(directory: str, name: str, array: np.ndarray) -> dict[str, Any]:
  """Writes ``array`` as ``.npy`` atomically; returns its file record (name, size, SHA-256, shape, dtype)."""
  writers = []

  def write(f: Any) -> None:
    writers.append(_HashingWriter(f))
    np.save(writers[-1], array, allow_pickle=False)

  write_atomically(os.path.join(directory, name), write)
  return {
    "file": name,
    "bytes": writers[-1].size,
    "sha256": writers[-1].digest.hexdigest(),
    "shape": list(array.shape),
    "dtype": array.dtype.str,
  }


def _write_json(path: str, value: Any) -> None:
  encoded = json.dumps(value, indent=1, sort_keys=True).encode()
  write_atomically(path, lambda f: f.write(encoded))


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def _file_fault(directory: str, record: Mapping[str, Any], *, hash_it: bool) -> str | None:
  """Why the file of ``record`` cannot be trusted, or None when it is present, of its size and (if hashed) intact."""
  path = os.path.join(directory, record["file"])
  try:
    size = os.path.getsize(path)
  except OSError as e:
    return f"{path} is missing ({type(e).__name__}: {e})"
  if size != record["bytes"]:
    return f"{path} has {size} bytes, not the {record['bytes']} written (a truncated or partial copy?)"
  if hash_it and _file_sha256(path) != record["sha256"]:
    return f"{path} fails its SHA-256 check (its bytes changed after it was written: disk damage or a bad copy)"
  return None


def _shard_name(shard: int) -> str:
  return f"shard-{shard:05d}"


def _key_mismatch(directory: str, found: str, wanted: str) -> TopKCacheError:
  return TopKCacheError(
    f"{directory} holds a top-k cache written under key {found}, not the key asked for, {wanted}: another teacher, "
    "corpus, tokenizer, k, temperature or length. Point to another directory, or delete this one (rm -r "
    f"{directory}) and run write_topk_cache to rebuild it."
  )


def _read_json(path: str, what: str) -> dict[str, Any]:
  try:
    with open(path, "rb") as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise TopKCacheError(
      f"the {what} {path} is unreadable ({type(e).__name__}: {e}). It is written atomically, so it was changed "
      "afterwards: delete it and rerun write_topk_cache, which reuses every shard that still verifies."
    ) from e
  if not isinstance(value, dict):
    raise TopKCacheError(f"the {what} {path} is not a JSON object; delete it and rerun write_topk_cache.")
  return value


def _reusable_shard(
  directory: str, shard: int, start: int, stop: int, header: Mapping[str, Any], digests: np.ndarray
) -> dict[str, Any] | None:
  """The record of a shard a previous run finished with the same settings and rows, or None if it must be computed."""
  name = _shard_name(shard)
  path = os.path.join(directory, f"{name}.json")
  if not os.path.exists(path):
    return None
  try:
    sidecar = _read_json(path, "shard sidecar")
  except TopKCacheError as e:
    _log.warning("Top-k cache: recomputing %s: %s", name, e)
    return None
  if sidecar.get("key") != header["key"]:
    raise _key_mismatch(directory, sidecar.get("key"), header["key"])
  same_rows = (sidecar.get("start"), sidecar.get("stop")) == (start, stop)
  if not same_rows or any(sidecar.get(f) != header[f] for f in _SHARD_FIELDS):
    _log.info("Top-k cache: recomputing %s, written with other settings or rows.", name)
    return None
  if not isinstance(sidecar.get("files"), dict) or set(sidecar["files"]) != set(_FILES):
    _log.warning("Top-k cache: recomputing %s: its sidecar does not list the files %s.", name, _FILES)
    return None
  for record in sidecar["files"].values():
    fault = _file_fault(directory, record, hash_it=True)
    if fault is not None:
      _log.warning("Top-k cache: recomputing %s: %s.", name, fault)
      return None
  stored = np.load(os.path.join(directory, sidecar["files"]["token_digests"]["file"]), allow_pickle=False)
  changed = np.flatnonzero(stored != digests)
  if len(changed):
    raise TopKCacheError(
      f"{name} of {directory} was written under this key for other tokens: sequences {(start + changed[:5]).tolist()} "
      "differ from what the teacher saw. The corpus or tokenizer changed but its fingerprint did not, so the key "
      "cannot tell the two apart: give topk_cache_key a corpus_fingerprint/tokenizer_fingerprint that changes with "
      f"them (or delete {directory} to rebuild it)."
    )
  return {f: sidecar[f] for f in ("index", "start", "stop", "files")}


def write_topk_cache(
  directory: str | os.PathLike,
  teacher_fn: Callable[[jax.Array], jax.Array],
  sequences: Any,
  *,
  k: int,
  key: str,
  vocab_size: int,
  temperature: float = 1.0,
  batch_size: int = 64,
  shard_size: int = 1024,
  progress: bool = True,
  jit: bool = True,
) -> TopKCache:
  """Runs the teacher over every sequence and stores its top-k logits in ``directory``; resumes a killed run.

  Shards whose sidecar matches this run (key, settings, rows) and whose files pass their SHA-256 check are
  reused, the others computed, so rerunning after a kill (or after a shard was damaged) computes only what is
  missing. The manifest is written last: until it exists, :func:`open_topk_cache` refuses the directory. One
  writer per directory: two writers at once may pair one's sidecar with the other's arrays (caught on reading).

  Args:
    directory: where the cache goes (created if missing).
    teacher_fn: ``teacher_fn(tokens) -> logits``: int32 ``[batch, length]`` to ``[batch, length, vocab_size]``
      (any float dtype), in inference mode.
    sequences: int ``[num_sequences, length]`` (numpy or JAX), or a random-access source (``__len__`` and
      ``__getitem__``) whose items are dicts with ``'tokens'`` int ``[length]`` (or the token arrays themselves).
      Read in order, one shard at a time.
    k: classes kept per token, ``1 <= k <= vocab_size``.
    key: :func:`topk_cache_key` of this teacher, corpus, tokenizer and of the same ``k``, ``temperature``,
      ``length`` and ``vocab_size``; stored and checked on every open.
    vocab_size: the size of the teacher's last axis.
    temperature: ``T`` of the stored ``log_normalizer = logsumexp(logits / T)``; the logits are stored raw.
    batch_size: sequences per teacher call (capped at ``shard_size``). The last batch of a shard is padded, so the
      teacher compiles once; a ``shard_size`` that is a multiple of it wastes no padding.
    shard_size: sequences per shard: the unit of resumption, of verification and of hosts' reads.
    progress: show a tqdm progress bar.
    jit: compile ``teacher_fn`` together with the top-k reduction (one XLA program). With False,
      ``teacher_fn`` is called as given once per batch (so it should be jitted already, e.g. with its own
      shardings over the local devices) and only the reduction is compiled here.

  Returns:
    The cache, opened with :func:`open_topk_cache`.

  Raises:
    TopKCacheError: ``directory`` holds a cache (or shards) written under another key, or a finished shard holds
      other tokens than ``sequences`` does now under the same key.
    ValueError: an argument is out of range, the sequences are ragged or hold ids outside ``[0, vocab_size)``,
      ``teacher_fn`` returns the wrong shape, or the teacher's logits are non-finite (that shard is not written).
  """
  k, vocab_size, temperature = _check_settings(k, vocab_size, temperature)
  batch_size, shard_size = _check_positive_int("batch_size", batch_size), _check_positive_int("shard_size", shard_size)
  if not isinstance(key, str) or not key:
    raise ValueError(f"key must be a non-empty string (topk_cache_key(...)), got {key!r}.")
  reader = _Sequences(sequences, vocab_size)
  num_sequences, length = len(reader), reader.length
  num_shards = math.ceil(num_sequences / shard_size)
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  header = {
    "format_version": FORMAT_VERSION,
    "key": key,
    "k": k,
    "vocab_size": vocab_size,
    "length": length,
    "temperature": temperature,
    "dtypes": {
      "topk_logits": _LOGITS_DTYPE.str,
      "topk_indices": index_dtype(vocab_size).str,
      "log_normalizer": _NORMALIZER_DTYPE.str,
      "token_digests": _DIGEST_DTYPE.str,
    },
    "num_sequences": num_sequences,
    "shard_size": shard_size,
    "num_shards": num_shards,
  }
  for name in os.listdir(directory):
    if _TEMPORARY.match(name):  # Left by a killed writer; never under a final name, so never read.
      os.remove(os.path.join(directory, name))
  manifest_path = os.path.join(directory, MANIFEST)
  if os.path.exists(manifest_path):
    old = _read_json(manifest_path, "manifest")
    if old.get("key") != key:
      raise _key_mismatch(directory, old.get("key"), key)
    if any(old.get(f) != v for f, v in header.items()):
      # Shards are about to be rewritten; a reader must not pair the old manifest with new shard files.
      _log.info("Top-k cache: %s was written with other settings; rewriting it.", directory)
      os.remove(manifest_path)

  batch_size = min(batch_size, shard_size, num_sequences)
  reduce = functools.partial(_reduce, k=k, temperature=temperature)
  if jit:

    @jax.jit
    def forward(tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
      logits = teacher_fn(tokens)
      _check_logits(logits, tokens, vocab_size)  # Static shapes: checked once, as it traces.
      return reduce(logits)
  else:
    jitted_reduce = jax.jit(reduce)

    def forward(tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
      logits = teacher_fn(tokens)
      _check_logits(logits, tokens, vocab_size)
      return jitted_reduce(logits)

  shards = []
  with tqdm(total=num_sequences, desc="top-k teacher cache", unit="seq", disable=not progress) as bar:
    for shard in range(num_shards):
      start, stop = shard * shard_size, min(num_sequences, (shard + 1) * shard_size)
      tokens = reader.rows(start, stop)  # [rows, L]
      digests = np.array([_token_digest(row) for row in tokens], dtype=_DIGEST_DTYPE)
      record = _reusable_shard(directory, shard, start, stop, header, digests)
      if record is None:
        record = _compute_shard(directory, shard, start, forward, tokens, digests, header, batch_size)
      else:
        _log.info("Top-k cache: reusing %s (sequences %d..%d).", _shard_name(shard), start, stop - 1)
      shards.append(record)
      bar.update(stop - start)
  _write_json(manifest_path, {**header, "shards": shards})
  return open_topk_cache(directory, key=key, k=k, vocab_size=vocab_size, length=length)


def _compute_shard(
  directory: str,
  shard: int,
  start: int,
  forward: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]],
  tokens: np.ndarray,
  digests: np.ndarray,
  header: Mapping[str, Any],
  batch_size: int,
) -> dict[str, Any]:
  outputs = []
  for b in range(0, len(tokens), batch_size):
    chunk = tokens[b : b + batch_size]
    num_real = len(chunk)
    if num_real < batch_size:  # A fixed batch shape: the teacher compiles once.
      chunk = np.concatenate([chunk, np.zeros((batch_size - num_real, chunk.shape[1]), chunk.dtype)])
    # Dispatch is asynchronous: the next batch is queued while this one runs; results are fetched below.
    outputs.append((forward(jnp.asarray(chunk)), num_real))
  values, indices, log_normalizer = (
    np.concatenate([np.asarray(out[i])[:num_real] for out, num_real in outputs]) for i in range(3)
  )  # [rows, L, k], [rows, L, k], [rows, L]
  bad = np.flatnonzero(~(np.isfinite(values).all(axis=(1, 2)) & np.isfinite(log_normalizer).all(axis=1)))
  if len(bad):
    raise ValueError(
      f"the teacher's logits are non-finite (NaN or inf) in sequences {(start + bad[:5]).tolist()} ({len(bad)} of "
      f"shard {shard}); the shard was not written. Check the teacher's variables (a diverged checkpoint?) and "
      "teacher_fn; finished shards are kept for when it is fixed (a fixed teacher needs a new key, though)."
    )
  clipped = int((np.abs(values) > _FLOAT16_MAX).sum())
  if clipped:
    _log.warning(
      "Top-k cache: %d top-k logits in %s exceed float16's range and were clipped to +-%g.",
      clipped,
      _shard_name(shard),
      _FLOAT16_MAX,
    )
  arrays = {
    "topk_logits": np.clip(values, -_FLOAT16_MAX, _FLOAT16_MAX).astype(_LOGITS_DTYPE),
    "topk_indices": indices.astype(header["dtypes"]["topk_indices"]),
    "log_normalizer": log_normalizer.astype(_NORMALIZER_DTYPE),
    "token_digests": digests,
  }
  name = _shard_name(shard)
  files = {array: _save_array(directory, f"{name}.{array}.npy", value) for array, value in arrays.items()}
  record = {"index": shard, "start": start, "stop": start + len(tokens), "files": files}
  # After the arrays: a sidecar vouches only for a complete shard.
  _write_json(os.path.join(directory, f"{name}.json"), {**{f: header[f] for f in _SHARD_FIELDS}, **record})
  return record


def open_topk_cache(
  directory: str | os.PathLike,
  *,
  key: str,
  k: int | None = None,
  vocab_size: int | None = None,
  length: int | None = None,
) -> TopKCache:
  """Opens a cache written by :func:`write_topk_cache`, checking that it is the one asked for.

  Checks the manifest's key and (when given) ``k``, ``vocab_size`` and ``length``, and that every shard file is
  present with its recorded size (a ``stat`` each). File contents are checked against their SHA-256 lazily: when
  this process first reads from a shard (:class:`TopKCache`).

  Args:
    directory: the cache directory.
    key: the :func:`topk_cache_key` the cache must have been written under.
    k: the expected classes per token, or None to accept the cache's.
    vocab_size: the expected vocabulary size, or None.
    length: the expected tokens per sequence, or None.

  Raises:
    TopKCacheError: no manifest (never written, or the writer was interrupted), an unreadable manifest or another
      format version, another key, k, vocab_size or length, or a missing or truncated shard file.
  """
  directory = os.fspath(directory)
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    if os.path.isdir(directory) and any(_SIDECAR.match(name) for name in os.listdir(directory)):
      raise TopKCacheError(
        f"the top-k cache in {directory} is incomplete (it has shards but no {MANIFEST}): write_topk_cache was "
        "interrupted. Rerun it with the same arguments; it reuses the finished shards."
      )
    raise TopKCacheError(f"no top-k cache in {directory} (no {MANIFEST}): run write_topk_cache first.")
  manifest = _read_json(path, "manifest")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise TopKCacheError(
      f"{path} has format version {manifest.get('format_version')!r}; this jaxkd reads version {FORMAT_VERSION}. "
      f"Delete {directory} and rerun write_topk_cache."
    )
  if manifest.get("key") != key:
    raise _key_mismatch(directory, manifest.get("key"), key)
  for name, wanted in (("k", k), ("vocab_size", vocab_size), ("length", length)):
    if wanted is not None and manifest.get(name) != wanted:
      raise TopKCacheError(
        f"the top-k cache in {directory} has {name} = {manifest[name]}, but {name} = {wanted} was asked for. A key "
        f"from topk_cache_key includes {name}, so this key was computed with other settings than the cache's: "
        f"recompute the key with {name}={wanted} and write a cache for it in another directory (or delete this one)."
      )
  faults = [
    fault
    for shard in manifest["shards"]
    for record in shard["files"].values()
    if (fault := _file_fault(directory, record, hash_it=False)) is not None
  ]
  if faults:
    raise TopKCacheError(
      f"the top-k cache in {directory} is damaged: {'; '.join(faults[:3])}"
      f"{f' (and {len(faults) - 3} more)' if len(faults) > 3 else ''}. Rerun write_topk_cache with the same "
      "arguments: it recomputes only the shards that fail verification."
    )
  return TopKCache(directory, manifest)


class TopKCache:
  """Random access to a top-k teacher cache, by sequence index; a grain ``RandomAccessDataSource``.

  Made by :func:`open_topk_cache`. Shards are memory-mapped when first read; at that point this process checks
  their files' SHA-256 (reading each shard file once), so a damaged shard raises :class:`TopKCacheError` when, and
  only when, it is read. Safe to share between threads; picklable for grain's worker processes, where each worker
  maps and verifies the shards it reads.
  """

  def __init__(self, directory: str, manifest: Mapping[str, Any]):
    self._directory = directory
    self._manifest = manifest
    self._starts = np.array([shard["start"] for shard in manifest["shards"]], dtype=np.int64)
    self._open: dict[int, dict[str, np.ndarray]] = {}
    # One lock per shard, so that verifying one shard (reading it whole) does not stall readers of the others.
    self._lock = threading.Lock()
    self._shard_locks: dict[int, threading.Lock] = {}

  def __getstate__(self) -> dict[str, Any]:
    # Memory maps and locks do not cross processes; each process maps (and verifies) what it reads.
    return {"directory": self._directory, "manifest": self._manifest}

  def __setstate__(self, state: Mapping[str, Any]) -> None:
    self.__init__(state["directory"], state["manifest"])

  def __repr__(self) -> str:
    # Stable across runs: grain's checkpoints record a source by its repr.
    return f"TopKCache({self._directory!r}, key={self.key!r})"

  @property
  def directory(self) -> str:
    return self._directory

  @property
  def key(self) -> str:
    return self._manifest["key"]

  @property
  def k(self) -> int:
    return self._manifest["k"]

  @property
  def vocab_size(self) -> int:
    return self._manifest["vocab_size"]

  @property
  def length(self) -> int:
    """Tokens per sequence."""
    return self._manifest["length"]

  @property
  def temperature(self) -> float:
    """``T`` of ``log_normalizer = logsumexp(logits / T)``."""
    return self._manifest["temperature"]

  @property
  def index_dtype(self) -> np.dtype:
    return np.dtype(self._manifest["dtypes"]["topk_indices"])

  @property
  def num_shards(self) -> int:
    return len(self._manifest["shards"])

  @property
  def shard_ranges(self) -> list[tuple[int, int]]:
    """``(start, stop)`` sequence indices of each shard."""
    return [(shard["start"], shard["stop"]) for shard in self._manifest["shards"]]

  @property
  def bytes_per_token(self) -> float:
    """Bytes of the three arrays' data on disk per token (the .npy headers and token digests not counted)."""
    total = sum(
      math.prod(record["shape"]) * np.dtype(record["dtype"]).itemsize
      for shard in self._manifest["shards"]
      for name, record in shard["files"].items()
      if name in ARRAYS
    )
    return total / (len(self) * self.length)

  def __len__(self) -> int:
    return self._manifest["num_sequences"]

  def _index(self, index: Any) -> int:
    index = operator.index(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"sequence index {index} is out of range for a top-k cache of {len(self)} sequences.")
    return index

  def _shard_of(self, indices: np.ndarray) -> np.ndarray:
    return np.searchsorted(self._starts, indices, side="right") - 1

  def _shard(self, shard: int) -> dict[str, np.ndarray]:
    """The memory-mapped arrays of ``shard``, verified against their SHA-256 the first time."""
    arrays = self._open.get(shard)  # No lock: a dict read is atomic and an entry, once set, never changes.
    if arrays is not None:
      return arrays
    with self._lock:
      shard_lock = self._shard_locks.setdefault(shard, threading.Lock())
    with shard_lock:
      arrays = self._open.get(shard)  # Another thread may have opened it while this one waited.
      if arrays is not None:
        return arrays
      records = self._manifest["shards"][shard]["files"]
      for record in records.values():
        fault = _file_fault(self._directory, record, hash_it=True)
        if fault is not None:
          raise TopKCacheError(
            f"shard {shard} of the top-k cache in {self._directory} is damaged: {fault}. Rerun write_topk_cache "
            "with the same arguments: it recomputes only the shards that fail verification."
          )
      arrays = {}
      for name, record in records.items():
        path = os.path.join(self._directory, record["file"])
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if list(array.shape) != record["shape"] or array.dtype.str != record["dtype"]:
          raise TopKCacheError(
            f"{path} holds {array.dtype}{array.shape}, not the {record['dtype']}{tuple(record['shape'])} the manifest "
            "records; rerun write_topk_cache with the same arguments to rewrite it."
          )
        arrays[name] = array
      self._open[shard] = arrays
      return arrays

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """``{'topk_logits': float16 [L, k], 'topk_indices': [L, k], 'log_normalizer': float32 [L]}`` of a sequence."""
    index = self._index(index)
    shard = int(self._shard_of(np.array([index]))[0])
    arrays = self._shard(shard)
    row = index - int(self._starts[shard])
    return {name: np.array(arrays[name][row]) for name in ARRAYS}  # Copies: small, and free of the file.

  def read(self, indices: Any) -> dict[str, np.ndarray]:
    """A batch: each array stacked over ``indices`` (any order, repeats allowed), reading each shard once.

    Returns:
      ``{'topk_logits': float16 [B, L, k], 'topk_indices': [B, L, k], 'log_normalizer': float32 [B, L]}``.
    """
    given = np.asarray(indices)
    if given.ndim != 1 or not (np.issubdtype(given.dtype, np.integer) or given.size == 0):
      raise ValueError(f"indices must be a 1-D integer array, got {given.dtype}{given.shape}.")
    indices = given.astype(np.int64)
    indices = np.where(indices < 0, indices + len(self), indices)
    outside = (indices < 0) | (indices >= len(self))
    if outside.any():
      raise IndexError(
        f"sequence indices {given[outside][:5].tolist()} are out of range for a top-k cache of {len(self)} sequences."
      )
    shards = self._shard_of(indices)
    out = {
      "topk_logits": np.empty((len(indices), self.length, self.k), _LOGITS_DTYPE),
      "topk_indices": np.empty((len(indices), self.length, self.k), self.index_dtype),
      "log_normalizer": np.empty((len(indices), self.length), _NORMALIZER_DTYPE),
    }
    for shard in np.unique(shards):
      where = shards == shard
      arrays = self._shard(int(shard))
      rows = indices[where] - self._starts[shard]
      for name in ARRAYS:
        out[name][where] = arrays[name][rows]
    return out

  def check_tokens(self, index: int, tokens: Any) -> None:
    """Raises :class:`TopKCacheError` unless ``tokens`` are the tokens the teacher saw at sequence ``index``."""
    index = self._index(index)
    shard = int(self._shard_of(np.array([index]))[0])
    stored = int(self._shard(shard)["token_digests"][index - int(self._starts[shard])])
    if _token_digest(np.asarray(tokens)) != stored:
      raise TopKCacheError(
        f"sequence {index}'s tokens are not those the teacher saw at that index in the top-k cache in "
        f"{self._directory}: the sequences are in another order, or from another corpus or tokenizer than the "
        "cache's. Join the cache with the same sequences, unshuffled, that write_topk_cache was given (shuffle "
        "after joining)."
      )

  def process_shards(self, process_index: int, process_count: int) -> list[int]:
    """The shards process ``process_index`` of ``process_count`` should read: contiguous, disjoint, covering all.

    Shards are split as evenly as possible (the first ``num_shards % process_count`` processes get one more), so
    processes can differ by a shard's rows; a training loop must agree on a common number of steps.

    Raises:
      TopKCacheError: more processes than shards (one would have no data).
      ValueError: ``process_index`` is not in ``[0, process_count)``.
    """
    process_count = _check_positive_int("process_count", process_count)
    if isinstance(process_index, bool) or not isinstance(process_index, (int, np.integer)):
      raise ValueError(f"process_index must be an integer, got {process_index!r}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, process_count={process_count}), got {process_index}.")
    if process_count > self.num_shards:
      raise TopKCacheError(
        f"the top-k cache in {self._directory} has {self.num_shards} shards, fewer than the {process_count} "
        f"processes, so some would read nothing. Rewrite it with shard_size <= {len(self) // process_count} "
        "(in another directory, or after deleting this one)."
      )
    per_process, extra = divmod(self.num_shards, process_count)
    first = process_index * per_process + min(process_index, extra)
    return list(range(first, first + per_process + (process_index < extra)))

  def process_rows(self, process_index: int, process_count: int) -> range:
    """The sequence indices of :meth:`process_shards`, one contiguous range."""
    shards = self.process_shards(process_index, process_count)
    ranges = self.shard_ranges
    return range(ranges[shards[0]][0], ranges[shards[-1]][1])


class JoinedSource:
  """Each sequence joined with its teacher top-k entries: a grain ``RandomAccessDataSource`` for distillation.

  Item ``i`` is sequence ``i``'s dict (e.g. ``{'tokens', 'label'}`` from the token pipeline; ``{'tokens'}`` when
  ``sequences`` is an array) plus ``teacher_topk_logits`` float16 ``[L, k]``, ``teacher_topk_indices`` ``[L, k]``
  and ``teacher_log_normalizer`` float32 ``[L]``. The numbers of sequences and their lengths must match the cache,
  and (with ``check_tokens``) each sequence's tokens must hash to what the teacher saw at that index, which catches
  a shuffled, re-tokenised or different corpus. Shuffle, slice and batch after joining, not before.
  """

  def __init__(self, sequences: Any, cache: TopKCache, *, check_tokens: bool = True):
    if len(sequences) != len(cache):
      raise TopKCacheError(
        f"sequences has {len(sequences)} sequences but the top-k cache in {cache.directory} has {len(cache)}: "
        "join the cache with the sequences it was written from."
      )
    self._sequences, self._cache, self._check_tokens = sequences, cache, check_tokens

  def __len__(self) -> int:
    return len(self._cache)

  def __repr__(self) -> str:
    return f"JoinedSource({self._sequences!r}, {self._cache!r}, check_tokens={self._check_tokens})"

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = self._cache._index(index)
    item = self._sequences[index]
    item = dict(item) if isinstance(item, Mapping) else {"tokens": item}
    tokens = np.asarray(item["tokens"])
    if tokens.shape != (self._cache.length,):
      raise TopKCacheError(
        f"sequence {index} has tokens of shape {tokens.shape}, but the top-k cache in {self._cache.directory} "
        f"holds sequences of length {self._cache.length}: join it with the sequences it was written from."
      )
    if self._check_tokens:
      self._cache.check_tokens(index, tokens)
    item.update({f"teacher_{name}": value for name, value in self._cache[index].items()})
    return item
