"""Token files as windows of next-token predictions: resumable training batches and exact evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np

from jaxkd.data.batches import shard_bounds

__all__ = [
  "TokenBatches",
  "TokenSequences",
  "bits_per_byte",
  "eval_batches",
  "num_eval_batches",
  "token_batches",
]


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
