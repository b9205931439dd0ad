"""Preemption: turning SIGTERM / JAX's preemption sync point into a stop decision for the training loop.

Schedulers send SIGTERM some time before they take a TPU/GPU machine away; the
loop in :mod:`jaxkd.training.loop` polls :class:`PreemptionGuard` after each step and,
when it says stop, saves a checkpoint and exits so a rerun resumes there.

With several processes the stop must be collective: a process that stops on its own enters the checkpoint's
barrier while the others enter the next step's all-reduce, and all of them hang. JAX's distributed runtime
(:func:`jax.distributed.initialize`, with ``jax_enable_preemption_service`` on, its default) already catches
SIGTERM in C++: its notifier tells the coordination service, which agrees with every process on a step one past the
furthest any of them has reported, and :func:`jax.experimental.multihost_utils.reached_preemption_sync_point`
says True at that step on every process. The guard then relies on that alone and installs no Python handler, which
would replace JAX's (one handler per signal per process) and leave the notifier deaf.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax

__all__ = ["PreemptionGuard"]

log = logging.getLogger(__name__)


class PreemptionGuard:
  """Turns SIGTERM (what TPU/GPU schedulers send before preemption) into a stop decision the training loop polls.

  Use as a context manager around the loop and call :meth:`should_stop(step)` after each step, on every process
  with the same steps; when it says True, save, wait for the save, and exit.

  One process: a Python handler for ``signals`` sets a flag, and the previous handlers come back on exit.
  Several processes: the decision is JAX's preemption sync point, so a SIGTERM to any one process stops every
  process at the same step; ``signals`` is not used (JAX's runtime listens for SIGTERM) and no handler is
  installed. Without JAX's preemption service (``jax_enable_preemption_service=False``) nothing is caught: a
  SIGTERM ends the process as if there were no guard, and a warning says so.

  Args:
    signals: the signals that stop a single-process run.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.signals = signals
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}
    self._collective = False
    self._sync_available = True
    self._last_step: int | None = None

  def __enter__(self) -> PreemptionGuard:
    self._collective = jax.process_count() > 1
    self._last_step = None
    if self._collective:
      return self
    if threading.current_thread() is threading.main_thread():
      for sig in self.signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      # None: the previous handler was not installed from Python (e.g. JAX's C++ one after a one-process
      # jax.distributed.initialize) and cannot be put back; ours stays, and only sets the flag.
      if handler is not None:
        signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: Any) -> None:
    self._event.set()

  @property
  def requested(self) -> bool:
    """Whether this process's own handler caught a signal (single-process runs only)."""
    return self._event.is_set()

  @property
  def collective(self) -> bool:
    """Whether the decision is JAX's preemption sync point (several processes), set on entering."""
    return self._collective

  def should_stop(self, step: int) -> bool:
    """Whether to stop (and save) after ``step``; with several processes, True on all of them at one step.

    With several processes every process must call this with the same, increasing steps. Steps skipped since the
    last call (a step function that runs N steps per call) are reported to JAX one by one: its sync point is one
    past the furthest step any process reported, and it answers True only when given exactly that step.
    """
    step = int(step)
    if not self._collective:
      return self._event.is_set()
    first = step if self._last_step is None or step <= self._last_step else self._last_step + 1
    self._last_step = step
    reached = False
    for counter in range(first, step + 1):
      # No short cut after a True: JAX keeps the last step reported, which must be ``step`` (orbax's save reports
      # the step it saves to the same counter).
      reached = self._reached_sync_point(counter) or reached
    return reached

  def _reached_sync_point(self, step: int) -> bool:
    if not self._sync_available:
      return False
    from jax.experimental import multihost_utils

    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError as error:  # JAX's preemption service is off: there is no collective stop to take part in.
      self._sync_available = False
      log.warning("SIGTERM will not stop this multi-process run at a common step (%s); it is not caught.", error)
      return False
