"""Writing a top-k cache: the teacher over every sequence, shard by shard, resumable after a kill.

The writer's half of :mod:`jaxkd.lm.topk_cache` (whose docstring describes the format): it reuses every shard
whose sidecar matches the run and whose files verify, computes the rest, and writes the manifest last.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxkd.artifacts import file_fault, mismatched_fields, write_json, write_npy
from jaxkd.lm.topk_cache._format import (
  DIGEST,
  DIGEST_DTYPE,
  FILES,
  FLOAT16_MAX,
  FORMAT_VERSION,
  LOGITS_DTYPE,
  MANIFEST,
  NORMALIZER_DTYPE,
  SHARD_FIELDS,
  TEMPORARY,
  TopKCacheError,
  check_positive_int,
  check_settings,
  index_dtype,
  key_mismatch,
  manifest_digest,
  manifest_fault,
  read_manifest_json,
  shard_name,
  token_digest,
)
from jaxkd.lm.topk_cache._reader import TopKCache, open_topk_cache

_log = logging.getLogger(__name__)


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


def _reusable_shard(
  directory: str, shard: int, start: int, stop: int, header: Mapping[str, Any], digests: np.ndarray
) -> dict[str, Any] | None:
  """The record of a shard a previous run finished with the same settings and rows, or None if it must be computed."""
  name = shard_name(shard)
  path = os.path.join(directory, f"{name}.json")
  if not os.path.exists(path):
    return None
  try:
    sidecar = read_manifest_json(path, "shard sidecar")
  except TopKCacheError as e:
    _log.warning("Top-k cache: recomputing %s: %s", name, e)
    return None
  if sidecar.get("key") != header["key"]:
    raise key_mismatch(directory, sidecar.get("key"), header["key"])
  same_rows = (sidecar.get("start"), sidecar.get("stop")) == (start, stop)
  if not same_rows or mismatched_fields(sidecar, {f: header[f] for f in SHARD_FIELDS}):
    _log.info("Top-k cache: recomputing %s, written with other settings or rows.", name)
    return None
  if not isinstance(sidecar.get("files"), dict) or set(sidecar["files"]) != set(FILES):
    _log.warning("Top-k cache: recomputing %s: its sidecar does not list the files %s.", name, FILES)
    return None
  for record in sidecar["files"].values():
    fault = file_fault(directory, record, verify_sha256=True)
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
  k, vocab_size, temperature = check_settings(k, vocab_size, temperature)
  batch_size, shard_size = check_positive_int("batch_size", batch_size), check_positive_int("shard_size", shard_size)
  if not isinstance(key, str) or not key:
    raise ValueError(f"key must be a non-empty string (topk_cache_key(...)), got {key!r}.")
  reader = _Sequences(sequences, vocab_size)
  directory = os.fspath(directory)
  header = _header(key, k, vocab_size, reader.length, temperature, len(reader), shard_size)
  manifest_path = _prepare_directory(directory, header)
  forward = _forward_fn(teacher_fn, k=k, temperature=temperature, vocab_size=vocab_size, jit=jit)
  shards = _write_shards(directory, reader, forward, header, min(batch_size, shard_size, len(reader)), progress)
  manifest = {**header, "shards": shards}
  write_json(manifest_path, {**manifest, DIGEST: manifest_digest(manifest)}, indent=1)
  return open_topk_cache(directory, key=key, k=k, vocab_size=vocab_size, length=reader.length)


def _header(
  key: str, k: int, vocab_size: int, length: int, temperature: float, num_sequences: int, shard_size: int
) -> dict[str, Any]:
  """The manifest's fields besides its shards: what a finished shard or manifest must share with this run."""
  return {
    "format_version": FORMAT_VERSION,
    "key": key,
    "k": k,
    "vocab_size": vocab_size,
    "length": length,
    "temperature": temperature,
    "dtypes": {
      "topk_logits": LOGITS_DTYPE.str,
      "topk_indices": index_dtype(vocab_size).str,
      "log_normalizer": NORMALIZER_DTYPE.str,
      "token_digests": DIGEST_DTYPE.str,
    },
    "num_sequences": num_sequences,
    "shard_size": shard_size,
    "num_shards": math.ceil(num_sequences / shard_size),
  }


def _prepare_directory(directory: str, header: Mapping[str, Any]) -> str:
  """Creates ``directory``, removes a killed writer's temporaries and a manifest of other settings; its path.

  Raises:
    TopKCacheError: the directory holds a cache written under another key.
  """
  os.makedirs(directory, exist_ok=True)
  for name in os.listdir(directory):
    if TEMPORARY.match(name):  # Left by a killed writer; never under a final name, so never read.
      os.remove(os.path.join(directory, name))
  manifest_path = os.path.join(directory, MANIFEST)
  if os.path.exists(manifest_path):
    old = read_manifest_json(manifest_path, "manifest")
    fault = manifest_fault(manifest_path, old)
    if fault is not None:  # Nothing in it can be trusted, not even its key: the shards' sidecars still guard theirs.
      _log.warning("Top-k cache: rewriting %s: %s.", manifest_path, fault)
      os.remove(manifest_path)
      return manifest_path
    if old.get("key") != header["key"]:
      raise key_mismatch(directory, old.get("key"), header["key"])
    if mismatched_fields(old, header):
      # Shards are about to be rewritten; a reader must not pair the old manifest with new shard files.
      _log.info("Top-k cache: %s was written with other settings; rewriting it.", directory)
      os.remove(manifest_path)
  return manifest_path


def _forward_fn(
  teacher_fn: Callable[[jax.Array], jax.Array], *, k: int, temperature: float, vocab_size: int, jit: bool
) -> Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
  """``tokens -> (top-k logits, ids, log-normaliser)``: the teacher and the reduction, compiled as one or apart."""
  reduce = functools.partial(_reduce, k=k, temperature=temperature)
  if jit:

    @jax.jit
    def forward(tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
      logits = teacher_fn(tokens)
      _check_logits(logits, tokens, vocab_size)  # Static shapes: checked once, as it traces.
      return reduce(logits)

    return forward
  jitted_reduce = jax.jit(reduce)

  def forward(tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    logits = teacher_fn(tokens)
    _check_logits(logits, tokens, vocab_size)
    return jitted_reduce(logits)

  return forward


def _write_shards(
  directory: str,
  reader: _Sequences,
  forward: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]],
  header: Mapping[str, Any],
  batch_size: int,
  progress: bool,
) -> list[dict[str, Any]]:
  """Every shard's record, in order: reused when a previous run finished it for these settings, else computed."""
  num_sequences, shard_size = header["num_sequences"], header["shard_size"]
  shards = []
  with tqdm(total=num_sequences, desc="top-k teacher cache", unit="seq", disable=not progress) as bar:
    for shard in range(header["num_shards"]):
      start, stop = shard * shard_size, min(num_sequences, (shard + 1) * shard_size)
      tokens = reader.rows(start, stop)  # [rows, L]
      digests = np.array([token_digest(row) for row in tokens], dtype=DIGEST_DTYPE)
      record = _reusable_shard(directory, shard, start, stop, header, digests)
      if record is None:
        record = _compute_shard(directory, shard, start, forward, tokens, digests, header, batch_size)
      else:
        _log.info("Top-k cache: reusing %s (sequences %d..%d).", shard_name(shard), start, stop - 1)
      shards.append(record)
      bar.update(stop - start)
  return shards


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
  clipped = int((np.abs(values) > FLOAT16_MAX).sum())
  if clipped:
    _log.warning(
      "Top-k cache: %d top-k logits in %s exceed float16's range and were clipped to +-%g.",
      clipped,
      shard_name(shard),
      FLOAT16_MAX,
    )
  arrays = {
    "topk_logits": np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(LOGITS_DTYPE),
    "topk_indices": indices.astype(header["dtypes"]["topk_indices"]),
    "log_normalizer": log_normalizer.astype(NORMALIZER_DTYPE),
    "token_digests": digests,
  }
  name = shard_name(shard)
  files = {array: write_npy(os.path.join(directory, f"{name}.{array}.npy"), value) for array, value in arrays.items()}
  record = {"index": shard, "start": start, "stop": start + len(tokens), "files": files}
  # After the arrays: a sidecar vouches only for a complete shard.
  write_json(os.path.join(directory, f"{name}.json"), {**{f: header[f] for f in SHARD_FIELDS}, **record}, indent=1)
  return record
