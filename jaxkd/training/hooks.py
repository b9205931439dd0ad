"""What the training loop does between steps: logging, the non-finite policy, evaluation, checkpoints, preemption.

:func:`jaxkd.training.fit` is a short loop (clu's ``periodic_actions`` shape, as in flax's ``examples/imagenet``)::

  for hook in hooks: hook.begin(loop)
  while loop.step < num_steps and not loop.stopping:
    loop.state, metrics = train_step(loop.state, loop.teacher_variables, next(train_data))
    loop.record(metrics)
    for hook in hooks: hook(loop.step, loop)

A :class:`Hook` runs at the steps that are multiples of its ``every``, at the last step (``at_end``) and, with
``on_stop``, at the step where the loop stops early. Hooks share what they learn through the :class:`Loop`: the
:class:`MetricsHook` publishes the window's means as ``loop.train_metrics``, the :class:`EvalHook` its results as
``loop.eval_metrics``, and any hook may ask the loop to stop (:meth:`Loop.request_stop`), after which the
:class:`CheckpointHook` saves. fit's order: preemption, metrics, non-finite, eval, the user's hooks, checkpoint.

A user hook is a :class:`Hook` subclass with :meth:`Hook.run`, a :class:`Callback`, or any callable
``fn(step, loop)`` (run after every call of the step)::

  fit(..., hooks=[Callback(lambda step, loop: print(step, loop.train_metrics), every=1000)])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxkd.placement import Placement
from jaxkd.state import TrainState
from jaxkd.training import checkpoint as ckpt
from jaxkd.training import preemption
from jaxkd.training.metrics import MetricsWriter, mean_metrics

__all__ = [
  "Callback",
  "CheckpointHook",
  "EvalHook",
  "Hook",
  "Loop",
  "MetricsHook",
  "NonFiniteHook",
  "NonFiniteLossError",
  "PreemptionHook",
  "as_hook",
]

log = logging.getLogger(__name__)

PyTree = Any


class NonFiniteLossError(FloatingPointError):
  """Too many consecutive steps had a non-finite loss (their updates were skipped), or one did under a step
  built with ``skip_nonfinite=False`` (its update was applied)."""


class Loop:
  """The training loop as hooks see it; :func:`jaxkd.training.fit` makes one per call.

  Attributes:
    step: steps done so far (the train state's step).
    start: the step this call of fit started from.
    num_steps: the step the loop ends at.
    steps_per_call: steps of one call of the train step (the step count advances by this much).
    placement: where the step runs (``train_step.placement``).
    state: the placed train state. The next call of the step donates it: read it in a hook, never keep it.
    teacher_variables: the placed teacher variables (or None).
    train_data: the iterator the batches come from (stacked by :func:`jaxkd.data.stack` when
      ``steps_per_call > 1``).
    skip_nonfinite: whether the step skips non-finite updates (False: it applies them).
    checkpointer: where checkpoints go, or None without a workdir.
    writer: where metrics go, or None without a workdir.
    window: the step metrics since the last summary, as the step returned them.
    train_metrics: the last summary of a window (see :meth:`summarize`); ``summary_step`` is its step.
    eval_metrics: the last evaluation's metrics; ``eval_step`` is its step.
    stop_reason: why the loop stops early, or None.
  """

  def __init__(
    self,
    *,
    placement: Placement,
    state: TrainState,
    teacher_variables: PyTree,
    train_data: Any,
    num_steps: int,
    steps_per_call: int = 1,
    skip_nonfinite: bool = True,
    checkpointer: ckpt.Checkpointer | None = None,
    writer: MetricsWriter | None = None,
  ):
    self.placement = placement
    self.state = state
    self.teacher_variables = teacher_variables
    self.train_data = train_data
    self.start = self.step = int(jax.device_get(placement.unreplicate(state.step)))
    self.num_steps = num_steps
    self.steps_per_call = steps_per_call
    self.skip_nonfinite = skip_nonfinite
    self.checkpointer = checkpointer
    self.writer = writer
    self.window: list[Mapping[str, Any]] = []
    self.train_metrics: dict[str, float] = {}
    self.summary_step: int | None = None
    self.eval_metrics: dict[str, float] = {}
    self.eval_step: int | None = None
    self.stop_reason: str | None = None
    self.error: BaseException | None = None
    self._window_start = time.perf_counter()
    self._host_state: tuple[int, TrainState] | None = None

  @property
  def is_last(self) -> bool:
    """Whether ``step`` is the last one."""
    return self.step >= self.num_steps

  @property
  def stopping(self) -> bool:
    """Whether a hook asked the loop to stop early."""
    return self.stop_reason is not None

  @property
  def preempted(self) -> bool:
    """Stopped before ``num_steps`` (and not by an error)."""
    return self.stopping and self.error is None and not self.is_last

  def request_stop(self, reason: str, error: BaseException | None = None) -> None:
    """Stops the loop after this step's hooks (the checkpoint hook saves first); ``error`` is raised then."""
    if self.stop_reason is None:
      self.stop_reason = reason
    if error is not None and self.error is None:
      self.error = error

  def record(self, metrics: Mapping[str, Any]) -> None:
    """Adds one call's metrics to the window and advances ``step``."""
    self.window.append(metrics)
    self.step += self.steps_per_call

  def window_means(self) -> dict[str, float]:
    """:func:`jaxkd.training.metrics.mean_metrics` of the window, with one host transfer (pmap: device 0's copy)."""
    window = [self.placement.unreplicate(m) for m in jax.device_get(self.window)]
    return mean_metrics(window)

  def summarize(self) -> dict[str, float]:
    """The window's means and ``steps_per_s``; publishes them as ``train_metrics`` and starts a new window."""
    summary = self.window_means()
    elapsed = time.perf_counter() - self._window_start
    summary["steps_per_s"] = summary["steps"] / max(elapsed, 1e-9)
    self.train_metrics, self.summary_step = summary, self.step
    self.window = []
    self._window_start = time.perf_counter()
    return summary

  def unreplicated_state(self) -> TrainState:
    """The state as one (device) copy: what ``eval_fn`` gets."""
    return self.placement.unreplicate(self.state)

  def host_state(self) -> TrainState:
    """NumPy copy of the state at this step (fetched once per step)."""
    if self._host_state is None or self._host_state[0] != self.step:
      self._host_state = (self.step, self.placement.to_host(self.state))
    return self._host_state[1]


class Hook:
  """A periodic action of the loop: ``hook(step, loop)`` after every call of the step runs :meth:`run` when due.

  Due at multiples of ``every`` (0: never by period), at the last step if ``at_end``, and at the step where the
  loop stops early if ``on_stop``. Subclasses implement :meth:`run`; :meth:`begin` and :meth:`close` bracket the
  loop (close also runs when it raised).

  Args:
    every: period in steps; with ``steps_per_call = N`` it must be a multiple of N (fit checks).
    at_end: also run at the last step.
    on_stop: also run at the step where the loop stops early (preemption, ``stop_after``, an error).
  """

  def __init__(self, every: int = 0, *, at_end: bool = True, on_stop: bool = False):
    if not isinstance(every, int) or every < 0:
      raise ValueError(f"every must be an int >= 0, got {every!r}.")
    self.every = every
    self.at_end = at_end
    self.on_stop = on_stop

  def due(self, step: int, loop: Loop) -> bool:
    """Whether :meth:`run` runs at ``step``."""
    periodic = bool(self.every) and step % self.every == 0
    return periodic or (self.at_end and loop.is_last) or (self.on_stop and loop.stopping)

  def begin(self, loop: Loop) -> None:
    """Before the first step (after a checkpoint was restored)."""

  def __call__(self, step: int, loop: Loop) -> None:
    if self.due(step, loop):
      self.run(step, loop)

  def run(self, step: int, loop: Loop) -> None:
    """The action."""
    raise NotImplementedError

  def close(self) -> None:
    """After the loop, whatever happened."""


class Callback(Hook):
  """A hook from a function ``fn(step, loop)`` (see :class:`Hook` for ``every``, ``at_end``, ``on_stop``)."""

  def __init__(self, fn: Callable[[int, Loop], Any], every: int = 1, *, at_end: bool = True, on_stop: bool = False):
    super().__init__(every, at_end=at_end, on_stop=on_stop)
    self.fn = fn

  def run(self, step: int, loop: Loop) -> None:
    self.fn(step, loop)

  def __repr__(self) -> str:
    return f"Callback({self.fn!r}, every={self.every})"


def as_hook(hook: Hook | Callable[[int, Loop], Any]) -> Hook:
  """A :class:`Hook` as it is; a plain callable ``fn(step, loop)`` as a :class:`Callback` run after every call."""
  if isinstance(hook, Hook):
    return hook
  if not callable(hook):
    raise TypeError(
      f"a hook must be a jaxkd.training.hooks.Hook or a callable fn(step, loop), got {type(hook).__name__}."
    )
  return Callback(hook, every=1)


class PreemptionHook(Hook):
  """Asks the loop to stop at SIGTERM (:class:`jaxkd.training.preemption.PreemptionGuard`; with several processes a
  SIGTERM to any one stops every process at the same step) or after ``stop_after`` steps of this call; checked after
  every call of the step."""

  def __init__(self, stop_after: int | None = None):
    super().__init__(at_end=False)
    self.stop_after = stop_after
    self._guard = preemption.PreemptionGuard()

  def begin(self, loop: Loop) -> None:
    self._guard.__enter__()
    # Tells JAX's sync point where this call starts: a notice that comes before the first step then stops every
    # process after it, rather than at a step before the start that the loop will never report.
    if self._guard.should_stop(loop.start):
      loop.request_stop(self._reason())

  def due(self, step: int, loop: Loop) -> bool:
    return True

  def run(self, step: int, loop: Loop) -> None:
    # Polled at every step on every process: with several processes all of them must report the same steps.
    if self._guard.should_stop(step):
      loop.request_stop(self._reason())
    elif self.stop_after is not None and step - loop.start >= self.stop_after:
      loop.request_stop("stop_after")

  def _reason(self) -> str:
    return "preemption notice to one of the processes" if self._guard.collective else "SIGTERM"

  def close(self) -> None:
    self._guard.__exit__(None, None, None)


class MetricsHook(Hook):
  """Every ``every`` steps, at the end and on a stop: the window's means (:meth:`Loop.summarize`) to the
  :class:`~jaxkd.training.metrics.MetricsWriter` and the progress bar. These are the loop's only host syncs.

  Args:
    every: steps between summaries (``log_every``); 0 logs only at the end and on a stop.
    progress: show a tqdm progress bar; a string sets its description.
  """

  _BAR_KEYS = ("loss", "accuracy", "agreement")

  def __init__(self, every: int, *, progress: bool | str = False):
    super().__init__(every, at_end=True, on_stop=True)
    self.progress = progress
    self._bar = None
    self._bar_step = 0

  def begin(self, loop: Loop) -> None:
    if self.progress and loop.num_steps > loop.start:
      from tqdm.auto import tqdm

      description = self.progress if isinstance(self.progress, str) else "train"
      self._bar = tqdm(total=loop.num_steps, initial=loop.start, desc=description, unit="step")
      self._bar_step = loop.start

  def run(self, step: int, loop: Loop) -> None:
    summary = loop.summarize()
    if loop.writer is not None:
      loop.writer.write(step, summary)
    if self._bar is not None:
      self._bar.update(step - self._bar_step)
      self._bar_step = step
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in summary.items() if k in self._BAR_KEYS})

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _applied_nonfinite_error(step: int, nonfinite: float, loop: Loop) -> NonFiniteLossError:
  where = "nothing on disk holds"
  if loop.checkpointer is not None:
    where = f"the last checkpoint in {loop.checkpointer.directory} holds"
  return NonFiniteLossError(
    f"{int(nonfinite)} step(s) up to step {step} had a non-finite loss, and train_step was built with "
    f"skip_nonfinite=False, so their updates were applied; the state was not saved ({where} the last "
    "state known to be finite). Lower the learning rate or check the inputs, or use skip_nonfinite=True."
  )


class NonFiniteHook(Hook):
  """The non-finite policy, applied to each summary the :class:`MetricsHook` makes (it runs after it).

  With a step that skips non-finite updates: warns about skipped steps, and after ``max_consecutive`` skipped
  steps in a row stops the loop with :class:`NonFiniteLossError` (the checkpoint hook saves the last good state
  first). With ``skip_nonfinite=False`` the first non-finite step raises at once, unsaved; the
  :class:`CheckpointHook` checks the same before every save, so such a state never reaches a checkpoint.
  """

  def __init__(self, max_consecutive: int = 20):
    super().__init__(at_end=False)
    self.max_consecutive = max_consecutive
    self._consecutive = 0

  def due(self, step: int, loop: Loop) -> bool:
    return loop.summary_step == step

  def run(self, step: int, loop: Loop) -> None:
    nonfinite = int(loop.train_metrics.get("nonfinite", 0))
    if nonfinite and not loop.skip_nonfinite:
      raise _applied_nonfinite_error(step, nonfinite, loop)
    # Counts carry over windows only when a whole window was skipped; else the run recovered within it.
    steps = loop.train_metrics.get("steps", 0)
    self._consecutive = self._consecutive + nonfinite if nonfinite == steps else nonfinite
    if nonfinite:
      log.warning("%d step(s) before step %d had a non-finite loss; their updates were skipped", nonfinite, step)
    if self._consecutive >= self.max_consecutive:
      error = NonFiniteLossError(
        f"{self._consecutive} consecutive steps up to step {step} had a non-finite loss or gradient; "
        "updates were skipped. Lower the learning rate or check the inputs."
      )
      loop.request_stop("non-finite loss", error)


class EvalHook(Hook):
  """Every ``every`` steps (0: only) and at the end: ``eval_fn(loop.unreplicated_state())``, published as
  ``loop.eval_metrics`` and written with the prefix ``eval_``."""

  def __init__(self, eval_fn: Callable[[TrainState], Mapping[str, float]], every: int = 0):
    super().__init__(every, at_end=True)
    self.eval_fn = eval_fn

  def run(self, step: int, loop: Loop) -> None:
    loop.eval_metrics = {k: float(v) for k, v in self.eval_fn(loop.unreplicated_state()).items()}
    loop.eval_step = step
    if loop.writer is not None:
      loop.writer.write(step, loop.eval_metrics, prefix="eval_")


class CheckpointHook(Hook):
  """Every ``every`` steps (0: only), at the end and on a stop: saves the state, the data iterator's position
  (``get_state``) and this step's eval metrics (by which the checkpointer keeps the best) to ``loop.checkpointer``.

  Args:
    every: steps between saves (``checkpoint_every``).
    config: the run's resolved config, stored with each checkpoint.
    meta: provenance stored with each checkpoint.
  """

  def __init__(self, every: int = 0, *, config: Any = None, meta: Mapping[str, Any] | None = None):
    super().__init__(every, at_end=True, on_stop=True)
    self.config = config
    self.meta = meta

  def run(self, step: int, loop: Loop) -> None:
    if loop.checkpointer is None:
      return
    host = loop.host_state()
    if not loop.skip_nonfinite:
      _check_finite_before_save(step, host, loop)
    data_state = loop.train_data.get_state() if hasattr(loop.train_data, "get_state") else None
    metrics = loop.eval_metrics if loop.eval_step == step else None
    loop.checkpointer.save(host, data_state=data_state, config=self.config, meta=self.meta, metrics=metrics)


def _check_finite_before_save(step: int, host: TrainState, loop: Loop) -> None:
  """A step built with skip_nonfinite=False applies non-finite updates: such a state must never overwrite the last
  good checkpoint."""
  if loop.window:
    nonfinite = loop.window_means().get("nonfinite", 0.0)
    if nonfinite:
      raise _applied_nonfinite_error(step, nonfinite, loop)
  # nonfinite only checks the loss: a NaN gradient with a finite loss shows only in the state.
  arrays = jax.tree.leaves((host.params, host.opt_state, host.batch_stats))
  if not all(np.isfinite(x).all() for x in arrays if np.issubdtype(np.asarray(x).dtype, np.inexact)):
    raise NonFiniteLossError(
      f"the state at step {step} holds non-finite values and train_step was built with skip_nonfinite=False, "
      f"so it was not saved (the last checkpoint in {loop.checkpointer.directory} holds the last finite state). "
      "Lower the learning rate or check the loss's gradient, or use skip_nonfinite=True."
    )
