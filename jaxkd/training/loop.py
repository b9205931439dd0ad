"""The training loop: place state on devices, step, and run the hooks that log, evaluate, checkpoint and stop.

:func:`fit` is what experiments and users' scripts call once the pieces exist: a student
:class:`~jaxkd.TrainState`, a step from :func:`~jaxkd.make_train_step` (whose ``placement`` puts the state and
teacher on the devices) and an iterator of batches of this process's rows that can report and restore its position
(``get_state()``/``set_state()``, as :mod:`jaxkd.data` iterators do). Logging, the non-finite policy, evaluation,
checkpoints and preemption are hooks (:mod:`jaxkd.training.hooks`); users add their own with ``hooks=``.

Resuming is exact: the checkpoint holds the state (params, optimizer state, BatchNorm statistics, step, dropout
key) and the iterator's position, and the step derives its randomness from ``(rng, step)``, so N steps, a stop,
and N more end bit-identical to 2N uninterrupted steps. A resume with a config other than the checkpoint's is
refused (unless ``allow_config_change=True``), and both that and an unwritable checkpoint directory are found
before the first step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax

from jaxkd.data import batches as data_lib
from jaxkd.state import TrainState
from jaxkd.training import checkpoint as ckpt
from jaxkd.training import hooks as hooks_lib
from jaxkd.training.hooks import Hook, Loop, NonFiniteLossError
from jaxkd.training.metrics import MetricsWriter

__all__ = ["fit", "FitResult", "NonFiniteLossError"]

log = logging.getLogger(__name__)


class StatefulIterator(Protocol):
  def __next__(self) -> Mapping[str, Any]: ...

  def get_state(self) -> Mapping[str, Any]: ...

  def set_state(self, state: Mapping[str, Any]) -> None: ...


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

  state: TrainState
  step: int
  preempted: bool
  resumed_from: int | None
  train_metrics: dict[str, float]
  eval_metrics: dict[str, float]


def fit(
  state: TrainState,
  *,
  train_step: Callable,
  train_data: StatefulIterator | Iterator[Mapping[str, Any]],
  num_steps: int,
  teacher_variables: Any = None,
  workdir: os.PathLike | str | None = None,
  checkpoint_every: int = 0,
  max_to_keep: int = 2,
  best_metric: str | None = None,
  best_mode: str = "max",
  eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
  eval_every: int = 0,
  log_every: int = 100,
  config: Any = None,
  allow_config_change: bool = False,
  meta: Mapping[str, Any] | None = None,
  max_consecutive_nonfinite: int = 20,
  progress: bool | str = True,
  stop_after: int | None = None,
  hooks: Sequence[Hook | Callable[[int, Loop], Any]] = (),
  tensorboard: bool = True,
) -> FitResult:
  """Trains ``state`` for ``num_steps`` steps in total, resuming from ``workdir`` if it has checkpoints.

  Args:
    state: the initial (unreplicated) student state; also the template a checkpoint is restored into.
    train_step: from :func:`jaxkd.make_train_step`; its ``placement`` places the state and teacher, and with
      ``steps_per_call = N > 1`` fit stacks N batches per call (:func:`jaxkd.data.stack`, unless ``train_data``
      already yields such stacks) and the step count advances by N per call.
    train_data: yields batches of this process's rows ``{key: [batch, ...]}`` (or already placed by
      ``placement.put_batch``, as a :class:`jaxkd.data.DevicePrefetcher` does); with ``get_state``/``set_state``
      its position is checkpointed, and restored before the first batch is read.
    num_steps: the step to stop at (a resumed run does only the rest).
    teacher_variables: the frozen teacher's variables (unreplicated), or None.
    workdir: checkpoints go to ``workdir/checkpoints``, step metrics to ``workdir/metrics.jsonl`` and TensorBoard
      event files to ``workdir/tensorboard``; None keeps nothing on disk.
    checkpoint_every: save every this many steps (0: only at the end and on a stop).
    max_to_keep: recent checkpoints to keep (plus the best by ``best_metric``).
    best_metric: an ``eval_fn`` metric by which to keep the best checkpoint.
    best_mode: ``'max'`` or ``'min'``.
    eval_fn: ``eval_fn(unreplicated_state) -> metrics``, run every ``eval_every`` steps and at the end; logged
      with the prefix ``eval_``.
    eval_every: 0 evaluates only at the end.
    log_every: steps between metric fetches (the only host syncs of the loop); 0 logs only at the end.
    config: the resolved run config, stored with each checkpoint. A resume compares it (as JSON) with the
      checkpoint's and refuses to go on with another one; None skips the comparison.
    allow_config_change: resume even when ``config`` differs from the checkpoint's (with a warning naming the
      keys); later checkpoints store the new config.
    meta: provenance stored with each checkpoint (e.g. the teacher's path, step, fingerprint).
    max_consecutive_nonfinite: raise :class:`NonFiniteLossError` after this many skipped (non-finite) steps in a
      row, counted at logging time (after saving the last good state). A ``train_step`` built with
      ``skip_nonfinite=False`` applies non-finite updates, so there the first one raises, at the next logging
      point or checkpoint save, whichever comes first, and is never saved (a save first checks the state itself
      for non-finite values).
    progress: show a tqdm progress bar (a string sets its description).
    stop_after: stop (and save) after this many steps of this call, as a preemption would; for tests and for
      splitting long runs.
    hooks: the user's :class:`jaxkd.training.hooks.Hook` objects (or callables ``fn(step, loop)``, run after every
      call), run after the built-in metrics, non-finite and eval hooks and before the checkpoint is saved.
    tensorboard: also write TensorBoard event files (needs ``tensorboardX``).

  Returns:
    A :class:`FitResult`. ``preempted`` tells the caller to exit and be rerun.

  Raises:
    ValueError: with ``steps_per_call = N``, ``num_steps``, ``checkpoint_every``, ``log_every``, ``eval_every``,
      a hook's period or the restored step is not a multiple of N; ``train_data`` ran out before ``num_steps``;
      or ``config`` differs from the checkpoint's and ``allow_config_change`` is False (before any step).
    jaxkd.training.checkpoint.CheckpointDirectoryError: ``workdir/checkpoints`` cannot be created or written (before any
      step).
  """
  periods = dict(num_steps=num_steps, checkpoint_every=checkpoint_every, log_every=log_every, eval_every=eval_every)
  user_hooks = _user_hooks(train_step, hooks, periods)
  workdir = pathlib.Path(workdir) if workdir is not None else None
  checkpointer = writer = None
  if workdir is not None:
    checkpointer = ckpt.Checkpointer(
      workdir / "checkpoints", max_to_keep=max_to_keep, best_metric=best_metric, best_mode=best_mode
    )
  try:
    state, resumed_from = _restore(checkpointer, state, train_data, config, allow_config_change)
    # Records past the step this run starts from are stale (a run killed after them, before or after a checkpoint):
    # the writer drops them, so metrics.jsonl never holds a step twice.
    start = resumed_from if resumed_from is not None else int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, tensorboard=tensorboard, resumed_from=start) if workdir else None
    loop = _make_loop(train_step, state, teacher_variables, train_data, num_steps, checkpointer, writer)
    all_hooks = [
      *_builtin_hooks(stop_after, log_every, progress, max_consecutive_nonfinite, eval_fn, eval_every),
      *user_hooks,
      hooks_lib.CheckpointHook(checkpoint_every, config=config, meta=meta),
    ]
    _run(loop, train_step, all_hooks)
    if loop.preempted:
      _report_stop(loop)
  finally:
    if checkpointer is not None:
      checkpointer.close()
    if writer is not None:
      writer.close()
  return _fit_result(loop, resumed_from)


def _user_hooks(
  train_step: Callable, hooks: Sequence[Hook | Callable[[int, Loop], Any]], periods: dict[str, int]
) -> list[Hook]:
  """The user's hooks as :class:`Hook` objects, after checking ``train_step`` and that every period (``periods``
  and each hook's) is a multiple of its ``steps_per_call``."""
  if getattr(train_step, "placement", None) is None:
    raise TypeError("train_step must come from jaxkd.make_train_step (fit places the state with its .placement).")
  steps_per_call = getattr(train_step, "steps_per_call", 1)
  user_hooks = [hooks_lib.as_hook(hook) for hook in hooks]
  periods = {**periods, **{f"hooks[{i}].every": hook.every for i, hook in enumerate(user_hooks)}}
  _check_multiples(periods, steps_per_call)
  return user_hooks


def _builtin_hooks(
  stop_after: int | None,
  log_every: int,
  progress: bool | str,
  max_consecutive_nonfinite: int,
  eval_fn: Callable[[TrainState], Mapping[str, float]] | None,
  eval_every: int,
) -> list[Hook]:
  """The hooks that run before the user's: preemption, metrics, the non-finite guard and evaluation."""
  return [
    hooks_lib.PreemptionHook(stop_after),
    hooks_lib.MetricsHook(log_every, progress=progress),
    hooks_lib.NonFiniteHook(max_consecutive_nonfinite),
    *([hooks_lib.EvalHook(eval_fn, eval_every)] if eval_fn is not None else []),
  ]


def _fit_result(loop: Loop, resumed_from: int | None) -> FitResult:
  return FitResult(
    state=loop.host_state(),
    step=loop.step,
    preempted=loop.preempted,
    resumed_from=resumed_from,
    train_metrics=loop.train_metrics,
    eval_metrics=loop.eval_metrics,
  )


def _make_loop(
  train_step: Callable,
  state: TrainState,
  teacher_variables: Any,
  train_data: Any,
  num_steps: int,
  checkpointer: ckpt.Checkpointer | None,
  writer: MetricsWriter | None,
) -> Loop:
  """The loop's shared state, with the student and teacher placed by the step's placement."""
  placement = train_step.placement
  steps_per_call = getattr(train_step, "steps_per_call", 1)
  loop = Loop(
    placement=placement,
    state=placement.put(state),
    teacher_variables=placement.put(teacher_variables) if teacher_variables is not None else None,
    train_data=_stacked(train_data, steps_per_call),
    num_steps=num_steps,
    steps_per_call=steps_per_call,
    skip_nonfinite=getattr(train_step, "skip_nonfinite", True),
    checkpointer=checkpointer,
    writer=writer,
  )
  # A run resumed with another steps_per_call may start between multiples; its periods would never come round.
  _check_multiples({"the restored step": loop.start}, steps_per_call)
  return loop


def _run(loop: Loop, train_step: Callable, hooks: Sequence[Hook]) -> None:
  """The loop itself: a step, then the hooks, until ``num_steps`` or a hook stops it."""
  begun: list[Hook] = []
  try:
    for hook in hooks:
      hook.begin(loop)
      begun.append(hook)
    while not loop.is_last and not loop.stopping:
      try:
        batch = next(loop.train_data)
      except StopIteration:
        raise ValueError(f"train_data ran out at step {loop.step}, before num_steps={loop.num_steps}.") from None
      loop.state, metrics = train_step(loop.state, loop.teacher_variables, batch)
      loop.record(metrics)
      for hook in hooks:
        hook(loop.step, loop)
      if loop.error is not None:
        raise loop.error
  finally:
    for hook in reversed(begun):
      hook.close()


def _restore(
  checkpointer: ckpt.Checkpointer | None, state: TrainState, train_data: Any, config: Any, allow_config_change: bool
) -> tuple[TrainState, Any]:
  """The latest checkpoint's state (or ``state``) and its step (or None); repositions ``train_data``."""
  if checkpointer is None:
    return state, None

  def accept(restored: ckpt.Restored) -> None:
    where = checkpointer.directory / str(restored.step)
    _check_config(restored, config, where, allow_config_change)
    if restored.data_state and hasattr(train_data, "set_state"):
      try:
        train_data.set_state(restored.data_state)
      except (ValueError, KeyError, TypeError) as error:  # Valid JSON, but not a position of this iterator.
        raise ckpt.CheckpointIntegrityError(
          f"its iterator position (the 'data' item of {where}) does not fit the train_data iterator "
          f"({type(error).__name__}: {error}): the item is damaged, or was saved by another data pipeline"
        ) from error

  # A damaged position falls back to the previous checkpoint, as damaged arrays do; a changed config stops the run.
  restored = checkpointer.restore(state, accept=accept)
  if restored is None:
    return state, None
  print(f"jaxkd: resumed from {checkpointer.directory / str(restored.step)} at step {restored.step}", flush=True)
  return restored.state, restored.step


class _Absent:
  def __repr__(self) -> str:
    return "<absent>"


_ABSENT = _Absent()


def _check_config(restored: ckpt.Restored, config: Any, where: pathlib.Path, allow_change: bool) -> None:
  """Refuses to resume a run with another config than its checkpoint's: the rest of the run would silently
  train under other settings (learning rate, temperature, alpha) than the config on disk says."""
  if config is None or not restored.config:
    # Nothing to compare: this call or the checkpoint's run passed no config.
    return
  changes: dict[str, tuple[Any, Any]] = {}
  _config_diff(_stable(restored.config), _stable(ckpt.stored_json(config)), "", changes)
  if not changes:
    return
  listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in changes.items())
  if allow_change:
    log.warning("resuming %s with a changed config (allow_config_change=True): %s", where, listed)
    print(f"jaxkd: resuming {where} with a changed config: {listed}", flush=True)
    return
  raise ValueError(
    f"the config differs from the one stored in the checkpoint {where}: {listed}. Use a new workdir for a run "
    "with other settings, pass the stored config to resume it as it was, or pass allow_config_change=True to "
    "resume it with the new config."
  )


def _stable(value: Any) -> Any:
  """``value`` without the memory addresses that ``repr`` of a function or an object holds (they change per run)."""
  if isinstance(value, str):
    return re.sub(r" at 0x[0-9a-fA-F]+", "", value)
  if isinstance(value, Mapping):
    return {k: _stable(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_stable(v) for v in value]
  return value


def _config_diff(old: Any, new: Any, prefix: str, changes: dict[str, tuple[Any, Any]]) -> None:
  """Adds ``{'dotted.key': (old, new)}`` to ``changes`` for each key where ``old`` and ``new`` differ."""
  if isinstance(old, Mapping) and isinstance(new, Mapping):
    for key in sorted(set(old) | set(new)):
      name = f"{prefix}.{key}" if prefix else str(key)
      _config_diff(old.get(key, _ABSENT), new.get(key, _ABSENT), name, changes)
  elif old != new:
    changes[prefix or "(the whole config)"] = (old, new)


def _stacked(train_data: Any, steps_per_call: int) -> Any:
  """``train_data`` in groups of ``steps_per_call`` batches, the input of a step built with ``steps_per_call``."""
  stacked = getattr(train_data, "stacked_steps", 1)
  if stacked == steps_per_call:
    return train_data
  if stacked != 1:
    raise ValueError(f"train_data stacks {stacked} batches per group, but train_step takes {steps_per_call} per call.")
  return data_lib.stack(train_data, steps_per_call)


def _check_multiples(values: Mapping[str, int], steps_per_call: int) -> None:
  """With N steps per call the step count moves in steps of N, so every period must be a multiple of N."""
  bad = {name: value for name, value in values.items() if value % steps_per_call}
  if bad:
    listed = ", ".join(f"{name}={value}" for name, value in bad.items())
    raise ValueError(f"{listed}: must be multiples of train_step.steps_per_call={steps_per_call}.")


def _report_stop(loop: Loop) -> None:
  if loop.checkpointer is not None:
    loop.checkpointer.wait_until_finished()
  where = loop.checkpointer.directory if loop.checkpointer is not None else "(no workdir)"
  print(
    f"jaxkd: stopping at step {loop.step} ({loop.stop_reason}); checkpoint saved in {where}; rerun to resume.",
    flush=True,
  )
