"""Evaluation over a whole split: every real example counted once, in any placement.

:func:`evaluate` sums an :class:`jaxkd.train.EvalStep`'s results over an iterator of batches and turns them into
means; :func:`pad_batches` cuts plain arrays into fixed-size batches whose last one is padded and masked (so the
step compiles once); :func:`make_eval_fn` binds them into the ``eval_fn(state) -> metrics`` that
:func:`jaxkd.training.fit` calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jaxkd.train import EvalStep, summarize_eval

__all__ = ["pad_batches", "evaluate", "make_eval_fn"]

PyTree = Any


def pad_batches(
  arrays: Mapping[str, np.ndarray], *, batch_size: int, mask_key: str = "mask"
) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-size batches of ``arrays`` (entries of equal length), the last padded with zeros and ``mask`` False.

  >>> batches = list(pad_batches({"x": np.arange(5), "label": np.arange(5)}, batch_size=2))
  >>> [b["mask"].tolist() for b in batches]
  [[True, True], [True, True], [True, False]]
  """
  lengths = {key: len(value) for key, value in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"all arrays must have the same length, got {lengths}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if mask_key in arrays:
    raise ValueError(f"arrays already have a {mask_key!r} entry; pad_batches makes it.")
  total = next(iter(lengths.values()))
  for start in range(0, total, batch_size):
    rows = min(batch_size, total - start)
    batch = {}
    for key, value in arrays.items():
      chunk = np.asarray(value[start : start + rows])
      if rows < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - rows, *chunk.shape[1:]), chunk.dtype)])
      batch[key] = chunk
    batch[mask_key] = np.arange(batch_size) < rows
    yield batch


def evaluate(
  eval_step: EvalStep, state: PyTree, teacher_variables: PyTree, batches: Iterable[Mapping[str, Any]]
) -> dict[str, float]:
  """Means over the real examples of ``batches`` (``accuracy``, ``ce``, ``count``; teacher metrics with one).

  ``state`` and ``teacher_variables`` are host or device trees; they are put on ``eval_step.placement`` here.
  """
  placement = eval_step.placement
  placed_state = placement.put(state)
  placed_teacher = placement.put(teacher_variables) if teacher_variables is not None else None
  total = None
  for batch in batches:
    sums = placement.to_host(eval_step(placed_state, placed_teacher, batch))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  if total is None:
    raise ValueError("evaluate got no batches: the evaluation set is empty.")
  return summarize_eval(total)


def make_eval_fn(
  eval_step: EvalStep,
  data: Mapping[str, np.ndarray] | Callable[[], Iterable[Mapping[str, Any]]],
  *,
  batch_size: int | None = None,
  teacher_variables: PyTree = None,
) -> Callable[[PyTree], dict[str, float]]:
  """``eval_fn(state) -> metrics`` for :func:`jaxkd.training.fit`.

  Args:
    eval_step: from :func:`jaxkd.make_eval_step`.
    data: plain arrays (cut with :func:`pad_batches` into ``batch_size`` batches), or a function returning a fresh
      iterable of batches each time (e.g. ``lambda: BatchIterator(test_set, batch_size=1000, train=False)``).
    batch_size: for plain arrays.
    teacher_variables: for teacher metrics, when ``eval_step`` has a teacher.
  """
  if isinstance(data, Mapping):
    if batch_size is None:
      raise ValueError("make_eval_fn needs batch_size to batch plain arrays.")
    arrays = dict(data)

    def batches() -> Iterable[Mapping[str, Any]]:
      return pad_batches(arrays, batch_size=batch_size)

  elif callable(data):
    batches = data
  else:
    raise TypeError(f"data must be a dict of arrays or a function returning batches, got {type(data).__name__}.")

  def eval_fn(state: PyTree) -> dict[str, float]:
    return evaluate(eval_step, state, teacher_variables, batches())

  return eval_fn
