"""Input pipeline: in-memory batches with per-process sharding, augmentation, resumable position, device prefetch.

A batch is a dict of this process's rows, NumPy arrays (JAX arrays after :class:`DevicePrefetcher`):

* ``'image'``: float32 ``[batch, height, width, channels]``, ``(pixel / 255 - mean) / std``;
* ``'label'``: int32 ``[batch]``;
* ``'mask'``: bool ``[batch]``, eval batches only; False marks padding;
* ``'teacher_logits'``: float32 ``[batch, num_classes]``, when the iterator is given cached logits;
* ``'index'``: int64 ``[batch]``, the example's ``ArrayDataset.indices`` entry, with ``include_index=True``.

Rows are always flat: how they are split over devices is the :class:`jaxkd.Placement`'s business
(:meth:`~jaxkd.Placement.put_batch`, done by the train step or by :class:`DevicePrefetcher`). :func:`stack`
groups consecutive batches into ``[steps, batch, ...]`` for a step built with ``steps_per_call``.

Every iterator here follows one protocol: ``__next__``, and ``get_state``/``set_state`` for a position that a
checkpoint saves and a resumed run restores (:func:`jaxkd.training.fit` does both).

Why not grain: grain's ``MapDataset``/``DataLoader`` transform and batch record by record in Python (or in worker
processes), which on Fashion-MNIST costs more than a small MLP's training step. The splits jaxkd distils on fit in
memory, so a batch here is one vectorised gather from the whole split plus vectorised augmentation, the per-epoch
order is one ``permutation`` and the iterator position is two integers, which is all grain's checkpointing would
give. For data that does not fit in memory, :func:`jaxkd.data.datasets.load_data_source` returns a random-access source
that grain can read directly.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxkd.data.augment import translate
from jaxkd.data.datasets import ArrayDataset
from jaxkd.placement import Placement

__all__ = [
  "BatchIterator",
  "DevicePrefetcher",
  "normalize",
  "shard_bounds",
  "stack",
  "StackedBatches",
  "transfer_set",
]


def transfer_set(
  dataset: ArrayDataset,
  *,
  keep_classes: Iterable[int] | None = None,
  drop_classes: Iterable[int] | None = None,
  num_examples: int | None = None,
  seed: int = 0,
) -> ArrayDataset:
  """Restricts a dataset to some classes and/or a deterministic random subset.

  Classes keep their original ids (the teacher still has ``num_classes`` outputs),
  examples keep their split order, and ``dataset.indices`` still point into the
  unfiltered split. The filter is recorded in ``filters``, which teacher-logit cache
  keys include.

  Args:
    dataset: the examples to filter.
    keep_classes: if given, only examples with these labels are kept.
    drop_classes: if given, examples with these labels are removed (after ``keep_classes``).
    num_examples: if given, keep this many examples drawn uniformly without replacement
      (after the class filters).
    seed: seed of the subsample.

  Returns:
    A new :class:`ArrayDataset`; arrays are copies, the input is untouched.

  Raises:
    ValueError: a class id out of range, ``num_examples`` < 1 or more than the filtered
      set holds, or nothing left.
  """
  keep = None if keep_classes is None else sorted({int(c) for c in keep_classes})
  drop = None if drop_classes is None else sorted({int(c) for c in drop_classes})
  for what, classes in (("keep_classes", keep), ("drop_classes", drop)):
    bad = [c for c in classes or () if not 0 <= c < dataset.num_classes]
    if bad:
      raise ValueError(f"{what} {bad} out of range [0, {dataset.num_classes}).")
  selected = np.ones(len(dataset), dtype=bool)
  if keep is not None:
    selected &= np.isin(dataset.labels, keep)
  if drop is not None:
    selected &= ~np.isin(dataset.labels, drop)
  positions = np.flatnonzero(selected)
  if num_examples is not None:
    if not 1 <= num_examples <= len(positions):
      raise ValueError(
        f"num_examples must be in [1, {len(positions)}] (the examples left after the class filters), "
        f"got {num_examples}."
      )
    # Sorted, so the subset keeps split order and a larger subsample with the same seed
    # is not a superset by accident of ordering.
    positions = np.sort(np.random.default_rng(seed).choice(positions, size=num_examples, replace=False))
  if len(positions) == 0:
    raise ValueError(f"No examples left in {dataset!r} after keep_classes={keep}, drop_classes={drop}.")
  description = {"keep_classes": keep, "drop_classes": drop, "num_examples": num_examples}
  if num_examples is not None:
    description["seed"] = seed
  return ArrayDataset(
    images=dataset.images[positions],
    labels=dataset.labels[positions],
    num_classes=dataset.num_classes,
    name=dataset.name,
    split=dataset.split,
    indices=dataset.indices[positions],
    filters=(*dataset.filters, description),
  )


def _channel_stats(value: float | Sequence[float], channels: int, what: str) -> np.ndarray:
  value = np.asarray(value, dtype=np.float32).reshape(-1)
  if value.size not in (1, channels):
    raise ValueError(f"{what} must be a number or {channels} per-channel numbers, got {value.size}.")
  return value


def normalize(
  images: np.ndarray, *, mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0
) -> np.ndarray:
  """Maps uint8 pixels to float32 ``(pixel / 255 - mean) / std``, per channel.

  The pipeline and the teacher-logit cache both call this, so cached logits are those of
  the exact inputs the pipeline feeds.

  Args:
    images: uint8 ``[..., channels]``.
    mean: scalar or per-channel mean of the [0, 1]-scaled pixels.
    std: scalar or per-channel standard deviation, > 0.

  Returns:
    float32 array of the same shape.

  >>> normalize(np.array([[0, 255]], dtype=np.uint8)[..., None], mean=0.5, std=0.5)[..., 0]
  array([[-1.,  1.]], dtype=float32)
  """
  channels = images.shape[-1]
  mean = _channel_stats(mean, channels, "mean")
  std = _channel_stats(std, channels, "std")
  if np.any(std <= 0):
    raise ValueError(f"std must be > 0, got {std.tolist()}.")
  # 64-byte aligned output: on the CPU backend jax.device_put aliases an aligned host buffer instead of copying
  # it (NumPy aligns to 16 only), which measured 80-200 us less per 400 KB batch (benchmarks/README.md).
  out = _aligned_empty(images.shape, np.float32)
  np.multiply(images, np.float32(1.0) / (np.float32(255.0) * std), out=out, dtype=np.float32)
  out -= mean / std
  return out


def _aligned_empty(shape: tuple[int, ...], dtype: Any, alignment: int = 64) -> np.ndarray:
  dtype = np.dtype(dtype)
  size = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(size + alignment, np.uint8)
  offset = -raw.ctypes.data % alignment
  return raw[offset : offset + size].view(dtype).reshape(shape)


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser: a bijective, well-mixing hash of uint64 arrays (wraps mod 2**64)."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _example_bits(seed: int, epoch: int, example_ids: np.ndarray) -> np.ndarray:
  """64 random bits per example, a pure function of (seed, epoch, example id).

  Counter-based rather than a stream: an example's augmentation does not depend on the
  batch size, the process count or its position in the shuffled order.
  """
  key = _mix64(np.array([seed % 2**64], dtype=np.uint64))
  key = _mix64(key ^ np.array([epoch % 2**64], dtype=np.uint64))
  return _mix64(key ^ _mix64(example_ids.astype(np.uint64)))


def shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """``[start, stop)`` of a process's contiguous shard; shards are disjoint, cover all, and differ by ≤ 1 in size.

  >>> [shard_bounds(10, i, 3) for i in range(3)]
  [(0, 3), (3, 6), (6, 10)]
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
  return num_examples * process_index // process_count, num_examples * (process_index + 1) // process_count


class BatchIterator:
  """Batches of an in-memory dataset: this process's shard, shuffled per epoch, resumable.

  Training (``train=True``): each epoch is a fresh permutation of this process's shard
  drawn from ``(seed, process_index, epoch)``; the remainder that does not fill a batch is
  dropped, and every process runs the same ``steps_per_epoch``. Images are augmented
  (random translation with zero fill, optional horizontal flip) from
  ``(seed, epoch, example index)``, and the augmented image is the one the batch carries,
  so a teacher run online on ``batch['image']`` sees what the student sees.

  Evaluation (``train=False``): one pass over the shard in order, the last batch padded
  with ``mask=False`` rows (zeros, label 0); every process yields the same number of
  batches (some may be all padding), so every example counts exactly once.

  Shards are contiguous ranges of the dataset (:func:`shard_bounds`) by
  ``jax.process_index()`` of ``jax.process_count()``: each process touches only its own
  examples.

  Args:
    dataset: the (possibly filtered) examples.
    batch_size: global batch size across all processes; each yields
      ``batch_size // process_count`` examples per batch.
    train: training (shuffle, augment, drop remainder, repeat) or evaluation.
    seed: seed of shuffling and augmentation.
    num_epochs: training epochs before ``StopIteration``; None repeats forever.
    mean: scalar or per-channel mean for :func:`normalize`.
    std: scalar or per-channel standard deviation for :func:`normalize`.
    max_translation: largest random shift in pixels, along each axis (training only).
    horizontal_flip: flip half of the images left-right (training only).
    teacher_logits: float ``[len(dataset), num_classes]`` aligned with ``dataset``
      (see :func:`jaxkd.data.logit_cache.cached_teacher_logits`); attached to each batch as
      ``'teacher_logits'``. Not allowed with augmentation, which would make them stale.
    include_index: add ``'index'``, each example's ``dataset.indices`` entry.
    process_index: this process's index; default ``jax.process_index()``.
    process_count: number of processes; default ``jax.process_count()``.

  Attributes:
    steps_per_epoch: batches per training epoch, or in the evaluation pass; the same in
      every process.
    process_batch_size: examples per batch from this process, ``batch_size // process_count``.

  >>> import numpy as np
  >>> from jaxkd.data.datasets import ArrayDataset
  >>> ds = ArrayDataset(np.zeros((10, 28, 28, 1), np.uint8), np.arange(10) % 2, num_classes=2)
  >>> batches = BatchIterator(ds, batch_size=4, train=False, process_index=0, process_count=1)
  >>> [int(b["mask"].sum()) for b in batches]
  [4, 4, 2]
  """

  def __init__(
    self,
    dataset: ArrayDataset,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_epochs: int | None = None,
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
    max_translation: int = 0,
    horizontal_flip: bool = False,
    teacher_logits: np.ndarray | None = None,
    include_index: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
  ):
    if len(dataset) == 0:
      # Caught here: later it is no batch at all, or a mean over zero examples.
      raise ValueError(f"BatchIterator got an empty dataset ({dataset!r}); check the split and filters that made it.")
    self._dataset = dataset
    self.train = train
    self.seed = int(seed)
    self.num_epochs = num_epochs
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    if self.process_count < 1 or not 0 <= self.process_index < self.process_count:
      raise ValueError(
        f"process_index must be in [0, process_count) with process_count >= 1, got process_index "
        f"{self.process_index} of process_count {self.process_count}."
      )
    if batch_size < 1 or batch_size % self.process_count:
      raise ValueError(f"batch_size {batch_size} must be a positive multiple of process_count {self.process_count}.")
    self.batch_size = int(batch_size)
    self.process_batch_size = batch_size // self.process_count
    if max_translation < 0:
      raise ValueError(f"max_translation must be >= 0, got {max_translation}.")
    if not train and (max_translation or horizontal_flip):
      raise ValueError("augmentation (max_translation, horizontal_flip) is for training iterators only.")
    self.max_translation = int(max_translation)
    self.horizontal_flip = bool(horizontal_flip)
    if teacher_logits is not None:
      if self.max_translation or self.horizontal_flip:
        raise ValueError(
          "cached teacher_logits are those of the unaugmented images; with augmentation run the teacher on "
          "batch['image'] instead."
        )
      teacher_logits = np.asarray(teacher_logits)
      if teacher_logits.ndim != 2 or len(teacher_logits) != len(dataset):
        raise ValueError(
          f"teacher_logits must be [len(dataset)={len(dataset)}, num_classes], got shape {teacher_logits.shape}."
        )
    self._teacher_logits = teacher_logits
    self.include_index = include_index
    channels = dataset.images.shape[-1]
    self._mean = _channel_stats(mean, channels, "mean")
    self._std = _channel_stats(std, channels, "std")
    normalize(np.zeros((1, channels), np.uint8), mean=self._mean, std=self._std)  # Validates std > 0 now.

    num_examples = len(dataset)
    start, stop = shard_bounds(num_examples, self.process_index, self.process_count)
    self._shard = np.arange(start, stop)
    if train:
      # The smallest shard sets the step count, so that no process waits on a missing batch.
      self.steps_per_epoch = (num_examples // self.process_count) // self.process_batch_size
      if self.steps_per_epoch == 0:
        raise ValueError(
          f"{num_examples} examples over {self.process_count} processes give no full batch of "
          f"{self.process_batch_size} per process; lower batch_size."
        )
    else:
      self.steps_per_epoch = math.ceil(math.ceil(num_examples / self.process_count) / self.process_batch_size)
    self._epoch = 0
    self._step = 0
    self._order_epoch = -1
    self._order = self._shard

  @property
  def num_examples(self) -> int:
    """Examples in the whole (filtered) dataset, over all processes."""
    return len(self._dataset)

  @property
  def epoch(self) -> int:
    """The epoch the next batch comes from."""
    return self._epoch

  def get_state(self) -> dict[str, Any]:
    """The position of the next batch, as a small JSON-able dict for checkpoints."""
    return {
      "epoch": self._epoch,
      "step": self._step,
      "seed": self.seed,
      "batch_size": self.batch_size,
      "num_examples": self.num_examples,
      "process_index": self.process_index,
      "process_count": self.process_count,
      "train": self.train,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a position saved by :meth:`get_state` of an identically configured iterator.

    Raises:
      ValueError: the state comes from an iterator with a different seed, batch size,
        dataset size, sharding or mode, or its position is out of range.
    """
    mine = self.get_state()
    mismatched = {k: (state.get(k), v) for k, v in mine.items() if k not in ("epoch", "step") and state.get(k) != v}
    if mismatched:
      details = ", ".join(f"{k}: saved {saved!r}, here {here!r}" for k, (saved, here) in mismatched.items())
      raise ValueError(f"iterator state does not match this iterator ({details}).")
    epoch, step = int(state["epoch"]), int(state["step"])
    # A training position wraps to the next epoch at steps_per_epoch; an eval pass may be finished.
    last_step = self.steps_per_epoch - 1 if self.train else self.steps_per_epoch
    if epoch < 0 or not 0 <= step <= last_step:
      raise ValueError(f"iterator state out of range: epoch {epoch}, step {step} of {self.steps_per_epoch}.")
    self._epoch, self._step = epoch, step

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.train:
      if self.num_epochs is not None and self._epoch >= self.num_epochs:
        raise StopIteration
      if self._order_epoch != self._epoch:
        rng = np.random.default_rng([self.seed, self.process_index, self._epoch])
        self._order = self._shard[rng.permutation(len(self._shard))]
        self._order_epoch = self._epoch
      positions = self._order[self._step * self.process_batch_size : (self._step + 1) * self.process_batch_size]
      batch = self._assemble(positions, num_real=len(positions), epoch=self._epoch)
      self._step += 1
      if self._step == self.steps_per_epoch:
        self._epoch, self._step = self._epoch + 1, 0
    else:
      if self._step >= self.steps_per_epoch:
        raise StopIteration
      positions = self._shard[self._step * self.process_batch_size : (self._step + 1) * self.process_batch_size]
      num_real = len(positions)
      # Padding rows read example 0 (any valid row would do) and are zeroed in _assemble.
      positions = np.concatenate([positions, np.zeros(self.process_batch_size - num_real, dtype=positions.dtype)])
      batch = self._assemble(positions, num_real=num_real, epoch=0)
      self._step += 1
    return batch

  def _assemble(self, positions: np.ndarray, *, num_real: int, epoch: int) -> dict[str, np.ndarray]:
    images = self._dataset.images[positions]  # [batch, height, width, channels] uint8
    example_ids = self._dataset.indices[positions]
    if self.train and (self.max_translation or self.horizontal_flip):
      bits = _example_bits(self.seed, epoch, example_ids)
      if self.max_translation:
        span = np.uint64(2 * self.max_translation + 1)
        dy = (bits % span).astype(np.int64) - self.max_translation
        dx = ((bits >> np.uint64(16)) % span).astype(np.int64) - self.max_translation
        images = translate(images, np.stack([dy, dx], axis=1))
      if self.horizontal_flip:
        flip = ((bits >> np.uint64(32)) & np.uint64(1)).astype(bool)
        images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    batch = {
      "image": normalize(images, mean=self._mean, std=self._std),
      "label": self._dataset.labels[positions].astype(np.int32),
    }
    if self._teacher_logits is not None:
      batch["teacher_logits"] = self._teacher_logits[positions].astype(np.float32)
    if self.include_index:
      batch["index"] = example_ids.astype(np.int64)
    if not self.train:
      mask = np.arange(len(positions)) < num_real
      for value in batch.values():
        value[~mask] = 0
      batch["mask"] = mask
    return batch


class StackedBatches:
  """What :func:`stack` returns. ``stacked_steps`` (batches per group) is read by :class:`DevicePrefetcher` and
  :func:`jaxkd.training.fit`."""

  def __init__(self, iterator: Iterator[Mapping[str, Any]], steps: int):
    if not isinstance(steps, int) or steps < 1:
      raise ValueError(f"steps must be an int >= 1, got {steps!r}.")
    self._iterator = iterator
    self.stacked_steps = steps
    self._state = _state_of(iterator)

  def get_state(self) -> dict[str, Any] | None:
    """The wrapped iterator's position after the last group (None if it has no ``get_state``)."""
    return None if self._state is None else dict(self._state)

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Repositions the wrapped iterator (a state from :meth:`get_state`)."""
    _set_state_of(self._iterator, state)
    self._state = _state_of(self._iterator)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    group = [next(self._iterator) for _ in range(self.stacked_steps)]
    self._state = _state_of(self._iterator)
    # NumPy on the host: JAX arrays (already placed batches) come back to the host here, so prefetch the stacked
    # iterator, not the batches it stacks.
    return {key: np.stack([np.asarray(batch[key]) for batch in group]) for key in group[0]}


def stack(iterator: Iterator[Mapping[str, Any]], steps: int) -> StackedBatches | Iterator[Mapping[str, Any]]:
  """Stacks ``steps`` consecutive batches of ``iterator`` into one ``{key: [steps, batch, ...]}``.

  The input of a train step built with ``steps_per_call=steps``; ``steps=1`` returns ``iterator`` itself, since
  such a step takes flat batches. The result keeps the iterator protocol: ``get_state`` is the wrapped iterator's
  position after the last batch of the last group handed out, ``set_state`` repositions it. A group the wrapped
  iterator cannot fill ends the iteration.

  >>> ds = ArrayDataset(np.zeros((10, 2, 2, 1), np.uint8), np.arange(10) % 2, num_classes=2)
  >>> batches = stack(BatchIterator(ds, batch_size=2, train=True, process_index=0, process_count=1), 3)
  >>> next(batches)["image"].shape, batches.get_state()["step"]
  ((3, 2, 2, 2, 1), 3)
  """
  if steps == 1:
    return iterator
  return StackedBatches(iterator, steps)


def _state_of(iterator: Any) -> dict[str, Any] | None:
  return dict(iterator.get_state()) if hasattr(iterator, "get_state") else None


def _set_state_of(iterator: Any, state: Mapping[str, Any]) -> None:
  if not hasattr(iterator, "set_state"):
    raise TypeError(f"{type(iterator).__name__} has no set_state: its position cannot be restored.")
  iterator.set_state(state)


class _End:
  pass


class DevicePrefetcher:
  """Assembles batches in a background thread and places them on devices ``size`` batches ahead.

  Each batch is placed with ``placement.put_batch`` (stacked ``[steps, batch, ...]`` groups from :func:`stack`
  with ``stacked=True``), the layout the train step of that placement takes as it is; without a placement it
  goes to the default device with ``jax.device_put``.

  The thread starts on the first ``next``. Until then :meth:`set_state` repositions the wrapped iterator, so a
  prefetcher can be handed to :func:`jaxkd.training.fit`, which restores a checkpoint's position before it
  iterates; after that the batches read ahead would be wrong and :meth:`set_state` raises. :meth:`get_state` is
  the position after the last batch handed out, not after the ones sitting in the buffer, so checkpoints resume
  exactly.

  Args:
    iterator: the host iterator; owned by the prefetcher from now on.
    placement: where the batches go: the train step's ``step.placement``.
    size: batches placed ahead of the consumer.
  """

  def __init__(self, iterator: Iterator[Mapping[str, Any]], *, placement: Placement | None = None, size: int = 2):
    if size < 1:
      raise ValueError(f"size must be >= 1, got {size}.")
    self._iterator = iterator
    self._state = _state_of(iterator)
    self.stacked_steps = getattr(iterator, "stacked_steps", 1)
    self.placement = placement
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _put(self, batch: Mapping[str, Any]) -> Any:
    if self.placement is None:
      # One device_put for the whole dict: a call per array costs more Python time than a small MLP's step.
      return jax.device_put(batch)
    return self.placement.put_batch(batch, stacked=self.stacked_steps > 1)

  def _offer(self, item: Any) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _work(self) -> None:
    try:
      for batch in self._iterator:
        state = _state_of(self._iterator)
        if not self._offer((self._put(batch), state)):
          return
      self._offer(_End())
    except BaseException as e:  # Re-raised in the consumer's thread, where it can be handled.
      self._offer(e)

  @property
  def started(self) -> bool:
    """Whether the background thread has started reading ahead."""
    return self._thread is not None

  def get_state(self) -> dict[str, Any] | None:
    """Position after the last batch returned by ``next`` (None if the wrapped iterator has no ``get_state``)."""
    return None if self._state is None else dict(self._state)

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Repositions the wrapped iterator; only before the first ``next``.

    Raises:
      RuntimeError: the prefetcher has already started reading ahead.
    """
    if self.started:
      raise RuntimeError(
        "DevicePrefetcher.set_state after the first next(): the batches already read ahead come from the old "
        "position. Call set_state before iterating (fit does), or wrap a repositioned iterator in a new prefetcher."
      )
    _set_state_of(self._iterator, state)
    self._state = _state_of(self._iterator)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._stop.is_set():
      raise StopIteration
    if self._thread is None:
      self._thread = threading.Thread(target=self._work, name="jaxkd-prefetch", daemon=True)
      self._thread.start()
    item = self._queue.get()
    if isinstance(item, _End):
      self._stop.set()
      raise StopIteration
    if isinstance(item, BaseException):
      self._stop.set()
      raise item
    batch, self._state = item
    return batch

  def close(self) -> None:
    """Stops the background thread (if it started); buffered batches are dropped."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def __enter__(self) -> DevicePrefetcher:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
