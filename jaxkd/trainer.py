"""The training loop: place state on devices, step, log, evaluate, checkpoint, resume, stop on SIGTERM.

:func:`fit` is what experiments and users' scripts call once the pieces exist: a
student :class:`~jaxkd.train.TrainState`, a step from :func:`~jaxkd.train.make_train_step`,
and an iterator of batches that can report and restore its position
(``get_state()``/``set_state()``, as :mod:`jaxkd.data` iterators do).

Resuming is exact: the checkpoint holds the state (params, optimizer state,
BatchNorm statistics, step, dropout key) and the iterator's position, and the step
derives its randomness from ``(rng, step)``, so N steps, a stop, and N more end
bit-identical to 2N uninterrupted steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import numpy as np

from jaxkd import checkpoint as ckpt
from jaxkd import preemption
from jaxkd import train as train_lib

__all__ = ["fit", "FitResult", "MetricsLogger", "NonFiniteLossError"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """Too many consecutive steps had a non-finite loss (their updates were skipped), or one did under a step
  built with ``skip_nonfinite=False`` (its update was applied)."""


class StatefulIterator(Protocol):
  def __next__(self) -> Mapping[str, Any]: ...

  def get_state(self) -> Mapping[str, Any]: ...

  def set_state(self, state: Mapping[str, Any]) -> None: ...


class MetricsLogger:
  """Appends one JSON object per logged step to a ``.jsonl`` file (line-buffered, so a kill loses nothing)."""

  def __init__(self, path: os.PathLike | str):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = self.path.open("a", buffering=1)

  def log(self, step: int, **metrics: Any) -> None:
    record = {"step": int(step), "time": time.time()}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record) + "\n")

  def close(self) -> None:
    self._file.close()


def _to_python(value: Any) -> Any:
  if isinstance(value, np.ndarray | np.generic | jax.Array):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


@dataclasses.dataclass
class FitResult:
  """What :func:`fit` returns.

  Attributes:
    state: the final student state, unreplicated.
    step: the step reached.
    preempted: True when a SIGTERM stopped the run early (after saving).
    resumed_from: the checkpoint step the run started from, or None.
    train_metrics: the mean of the last logging window's step metrics.
    eval_metrics: the last evaluation's metrics ({} without ``eval_fn``).
  """

  state: train_lib.TrainState
  step: int
  preempted: bool
  resumed_from: int | None
  train_metrics: dict[str, float]
  eval_metrics: dict[str, float]


def _place(tree: Any, parallel: str, mesh: Any) -> Any:
  if parallel == "pmap":
    return train_lib.replicate(tree)
  if parallel == "shard_map":
    return train_lib.put_replicated(tree, mesh)
  # A copy: the step donates its input state, and the caller's arrays must survive (e.g. as a template).
  return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else jax.device_put(x), tree)


def _unplace(state: Any, parallel: str) -> Any:
  return train_lib.unreplicate(state) if parallel == "pmap" else state


def _mean_metrics(window: list[Mapping[str, Any]], parallel: str) -> dict[str, float]:
  """One host transfer for a whole logging window; pmap metrics are identical per device."""
  window = jax.device_get(window)
  keys = window[0].keys()
  out = {}
  for key in keys:
    values = [np.asarray(m[key]) for m in window]
    values = [v.reshape(-1)[0] if parallel == "pmap" else v for v in values]
    if key == "nonfinite":
      out[key] = float(np.sum(values))
    else:
      finite = [float(v) for v in values if np.isfinite(v)]
      out[key] = float(np.mean(finite)) if finite else float("nan")
  return out


def _is_factory(train_data: Any) -> bool:
  return callable(train_data) and not hasattr(train_data, "__next__")


def fit(
  state: train_lib.TrainState,
  *,
  train_step: Callable,
  train_data: StatefulIterator | Iterator[Mapping[str, Any]] | Callable[[Mapping[str, Any] | None], Any],
  num_steps: int,
  teacher_variables: Any = None,
  parallel: str = "pmap",
  mesh: Any = None,
  workdir: os.PathLike | str | None = None,
  checkpoint_every: int = 0,
  max_to_keep: int = 2,
  best_metric: str | None = None,
  best_mode: str = "max",
  eval_fn: Callable[[train_lib.TrainState], Mapping[str, float]] | None = None,
  eval_every: int = 0,
  log_every: int = 100,
  config: Any = None,
  meta: Mapping[str, Any] | None = None,
  max_consecutive_nonfinite: int = 20,
  progress: bool | str = True,
  stop_after: int | None = None,
) -> FitResult:
  """Trains ``state`` for ``num_steps`` steps in total, resuming from ``workdir`` if it has checkpoints.

  Args:
    state: the initial (unreplicated) student state; also the template a
      checkpoint is restored into.
    train_step: from :func:`jaxkd.train.make_train_step` with the same ``parallel``.
    train_data: yields batches in the layout ``parallel`` needs; with
      ``get_state``/``set_state`` its position is checkpointed and restored.
      Or a factory ``train_data(data_state) -> iterator`` called once with the
      restored position (None on a fresh start): the form to use with a
      :class:`jaxkd.data.DevicePrefetcher`, which must not be repositioned
      once it has started reading ahead.
    num_steps: the step to stop at (a resumed run does only the rest).
    teacher_variables: the frozen teacher's variables (unreplicated), or None.
    parallel: ``'pmap'``, ``'shard_map'`` or ``'single'``.
    mesh: for ``'shard_map'``; defaults to :func:`jaxkd.train.make_mesh`.
    workdir: checkpoints go to ``workdir/checkpoints`` and step metrics to
      ``workdir/metrics.jsonl``; None keeps nothing on disk.
    checkpoint_every: save every this many steps (0: only at the end and on SIGTERM).
    max_to_keep: recent checkpoints to keep (plus the best by ``best_metric``).
    best_metric: an ``eval_fn`` metric by which to keep the best checkpoint.
    best_mode: ``'max'`` or ``'min'``.
    eval_fn: ``eval_fn(unreplicated_state) -> metrics``, run every ``eval_every``
      steps and at the end.
    eval_every: 0 evaluates only at the end.
    log_every: steps between metric fetches (the only host syncs of the loop).
    config: the resolved run config, stored with each checkpoint.
    meta: provenance stored with each checkpoint (e.g. the teacher's path, step, fingerprint).
    max_consecutive_nonfinite: raise :class:`NonFiniteLossError` after this
      many skipped (non-finite) steps in a row, counted at logging time. A
      ``train_step`` built with ``skip_nonfinite=False`` applies non-finite
      updates, so there the first one raises, at the next logging point or
      checkpoint save, whichever comes first, and is never saved (a save first
      checks the state itself for non-finite values).
    progress: show a tqdm progress bar (a string sets its description).
    stop_after: stop (and save) after this many steps of this call, as a
      preemption would; for tests and for splitting long runs.

  Returns:
    A :class:`FitResult`. ``preempted`` tells the caller to exit and be rerun.
  """
  if parallel == "shard_map" and mesh is None:
    mesh = train_lib.make_mesh()
  workdir = pathlib.Path(workdir) if workdir is not None else None
  manager = None
  resumed_from = None
  data_state = None
  if workdir is not None:
    manager = ckpt.Checkpointer(
      workdir / "checkpoints", max_to_keep=max_to_keep, best_metric=best_metric, best_mode=best_mode
    )
    restored = manager.restore(state)
    if restored is not None:
      state, resumed_from, data_state = restored.state, restored.step, restored.data_state
      if data_state and not _is_factory(train_data) and hasattr(train_data, "set_state"):
        train_data.set_state(data_state)
      print(f"jaxkd: resumed from {manager.directory / str(restored.step)} at step {restored.step}", flush=True)
  owns_data = _is_factory(train_data)
  if owns_data:
    train_data = train_data(data_state or None)
  start = int(jax.device_get(state.step))
  logger = MetricsLogger(workdir / "metrics.jsonl") if workdir is not None else None

  device_state = _place(state, parallel, mesh)
  device_teacher = _place(teacher_variables, parallel, mesh) if teacher_variables is not None else None

  def host_state() -> train_lib.TrainState:
    return jax.device_get(_unplace(device_state, parallel))

  # A step built with skip_nonfinite=False applies a non-finite update, so the state after it must never be
  # saved over the last good checkpoint: such a step stops the run at the first logging point or save after it.
  skips_nonfinite = getattr(train_step, "skip_nonfinite", True)

  def stop_if_applied_nonfinite(step: int, nonfinite: float) -> None:
    if nonfinite and not skips_nonfinite:
      where = f"the last checkpoint in {manager.directory} holds" if manager is not None else "nothing on disk holds"
      raise NonFiniteLossError(
        f"{int(nonfinite)} step(s) up to step {step} had a non-finite loss, and train_step was built with "
        f"skip_nonfinite=False, so their updates were applied; the state was not saved ({where} the last "
        "state known to be finite). Lower the learning rate or check the inputs, or use skip_nonfinite=True."
      )

  def save(step: int, metrics: Mapping[str, float] | None = None) -> None:
    if manager is None:
      return
    host = host_state()
    if not skips_nonfinite:
      if window:
        stop_if_applied_nonfinite(step, _mean_metrics(window, parallel).get("nonfinite", 0.0))
      # nonfinite only checks the loss there: a NaN gradient with a finite loss shows only in the state.
      arrays = jax.tree.leaves((host.params, host.opt_state, host.batch_stats))
      if not all(np.isfinite(x).all() for x in arrays if np.issubdtype(np.asarray(x).dtype, np.inexact)):
        raise NonFiniteLossError(
          f"the state at step {step} holds non-finite values and train_step was built with skip_nonfinite=False, "
          f"so it was not saved (the last checkpoint in {manager.directory} holds the last finite state). "
          "Lower the learning rate or check the loss's gradient, or use skip_nonfinite=True."
        )
    data_state = train_data.get_state() if hasattr(train_data, "get_state") else None
    manager.save(host, data_state=data_state, config=config, meta=meta, metrics=metrics)

  bar = None
  if progress and num_steps > start:
    from tqdm.auto import tqdm

    bar = tqdm(total=num_steps, initial=start, desc=progress if isinstance(progress, str) else "train", unit="step")

  window: list[Mapping[str, Any]] = []
  train_metrics: dict[str, float] = {}
  eval_metrics: dict[str, float] = {}
  consecutive_nonfinite = 0
  preempted = False
  step = start
  window_start = time.perf_counter()
  try:
    with preemption.PreemptionGuard() as guard:
      while step < num_steps:
        batch = next(train_data)
        device_state, metrics = train_step(device_state, device_teacher, batch)
        step += 1
        window.append(metrics)
        last = step == num_steps
        if len(window) >= log_every or last:
          train_metrics = _mean_metrics(window, parallel)
          elapsed = time.perf_counter() - window_start
          train_metrics["steps_per_s"] = len(window) / max(elapsed, 1e-9)
          nonfinite = int(train_metrics.get("nonfinite", 0))
          stop_if_applied_nonfinite(step, nonfinite)
          consecutive_nonfinite = consecutive_nonfinite + nonfinite if nonfinite == len(window) else nonfinite
          if nonfinite:
            log.warning("%d step(s) before step %d had a non-finite loss; their updates were skipped", nonfinite, step)
          if logger:
            logger.log(step, **train_metrics)
          if bar is not None:
            bar.update(len(window))
            bar.set_postfix({k: f"{v:.4g}" for k, v in train_metrics.items() if k in ("loss", "accuracy", "agreement")})
          window = []
          window_start = time.perf_counter()
          if consecutive_nonfinite >= max_consecutive_nonfinite:
            save(step)
            raise NonFiniteLossError(
              f"{consecutive_nonfinite} consecutive steps up to step {step} had a non-finite loss or gradient; "
              "updates were skipped. Lower the learning rate or check the inputs."
            )
        do_eval = eval_fn is not None and (last or (eval_every and step % eval_every == 0))
        if do_eval:
          eval_metrics = {k: float(v) for k, v in eval_fn(_unplace(device_state, parallel)).items()}
          if logger:
            logger.log(step, **{f"eval_{k}": v for k, v in eval_metrics.items()})
        stop_requested = guard.should_stop(step) or (stop_after is not None and step - start >= stop_after)
        if (checkpoint_every and step % checkpoint_every == 0) or last or stop_requested:
          save(step, eval_metrics if do_eval else None)
        if stop_requested and not last:
          preempted = True
          if manager is not None:
            manager.wait_until_finished()
          where = manager.directory if manager else "(no workdir)"
          reason = "SIGTERM" if guard.requested else "stop_after"
          print(
            f"jaxkd: stopping at step {step} ({reason}); checkpoint saved in {where}; rerun to resume.",
            flush=True,
          )
          break
  finally:
    if owns_data and hasattr(train_data, "close"):
      train_data.close()
    if bar is not None:
      bar.close()
    if manager is not None:
      manager.close()
    if logger:
      logger.close()
  return FitResult(
    state=host_state(),
    step=step,
    preempted=preempted,
    resumed_from=resumed_from,
    train_metrics=train_metrics,
    eval_metrics=eval_metrics,
  )
