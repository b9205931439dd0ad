"""Reading a top-k cache: open and check the manifest, then map and verify each shard when first read.

The reader's half of :mod:`jaxkd.lm.topk_cache` (whose docstring describes the format).
"""

from __future__ import annotations

import math
import operator
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxkd.artifacts import file_fault
from jaxkd.lm.topk_cache._format import (
  ARRAYS,
  FORMAT_VERSION,
  LOGITS_DTYPE,
  MANIFEST,
  NORMALIZER_DTYPE,
  SIDECAR,
  TopKCacheError,
  check_positive_int,
  key_mismatch,
  manifest_fault,
  read_manifest_json,
  token_digest,
)
from jaxkd.objective import TOPK_TEMPERATURE


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
    if os.path.isdir(directory) and any(SIDECAR.match(name) for name in os.listdir(directory)):
      raise TopKCacheError(
        f"the top-k cache in {directory} is incomplete (it has shards but no {MANIFEST}): write_topk_cache was "
        "interrupted. Rerun it with the same arguments; it reuses the finished shards."
      )
    raise TopKCacheError(f"no top-k cache in {directory} (no {MANIFEST}): run write_topk_cache first.")
  manifest = read_manifest_json(path, "manifest")
  fault = manifest_fault(path, manifest)
  if fault is not None:
    raise TopKCacheError(
      f"the top-k cache in {directory} cannot be read: {fault}. To repair it, rerun write_topk_cache with the same "
      "arguments into this directory: it verifies every shard against its own sidecar, reuses those intact and "
      f"rewrites {MANIFEST}."
    )
  if manifest.get("format_version") != FORMAT_VERSION:
    raise TopKCacheError(
      f"{path} has format version {manifest.get('format_version')!r}; this jaxkd reads version {FORMAT_VERSION}. "
      f"Delete {directory} and rerun write_topk_cache."
    )
  if manifest.get("key") != key:
    raise key_mismatch(directory, manifest.get("key"), key)
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
    if (fault := file_fault(directory, record, verify_sha256=False)) is not None
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

  def _valid_range(self) -> str:
    return f"{len(self)} sequences: 0..{len(self) - 1} (or -{len(self)}..-1 from the end)"

  def _index(self, index: Any) -> int:
    given = operator.index(index)
    index = given + len(self) if given < 0 else given
    if not 0 <= index < len(self):
      raise IndexError(
        f"sequence index {given} is out of range for the top-k cache in {self._directory}, which holds "
        f"{self._valid_range()}."
      )
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
        fault = file_fault(self._directory, record, verify_sha256=True)
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
        f"sequence indices {given[outside][:5].tolist()} are out of range for the top-k cache in {self._directory}, "
        f"which holds {self._valid_range()}."
      )
    shards = self._shard_of(indices)
    out = {
      "topk_logits": np.empty((len(indices), self.length, self.k), LOGITS_DTYPE),
      "topk_indices": np.empty((len(indices), self.length, self.k), self.index_dtype),
      "log_normalizer": np.empty((len(indices), self.length), NORMALIZER_DTYPE),
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
    if token_digest(np.asarray(tokens)) != stored:
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
    process_count = check_positive_int("process_count", process_count)
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
  ``sequences`` is an array) plus ``teacher_topk_logits`` float16 ``[L, k]``, ``teacher_topk_indices`` ``[L, k]`` and
  ``teacher_log_normalizer`` float32 ``[L]``, and ``teacher_topk_temperature`` float32 ``[]``: the cache's
  temperature, against which the step checks a ``sparse_kd(tail='bucket')`` objective's. The numbers of sequences and
  their lengths must match the cache, and (with ``check_tokens``) each sequence's tokens must hash to what the teacher
  saw at that index, which catches a shuffled, re-tokenised or different corpus. Shuffle, slice and batch after
  joining, not before.
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
    item[TOPK_TEMPERATURE] = np.asarray(self._cache.temperature, np.float32)
    return item
