"""Preemption: turning SIGTERM / JAX's preemption sync point into a stop decision for the training loop.

Schedulers send SIGTERM some time before they take a TPU/GPU machine away; the
loop in :mod:`jaxkd.trainer` polls :class:`PreemptionGuard` after each step and,
when it says stop, saves a checkpoint and exits so a rerun resumes there.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax

__all__ = ["PreemptionGuard"]


class PreemptionGuard:
  """Turns SIGTERM (what TPU/GPU schedulers send before preemption) into a flag the training loop polls.

  Use as a context manager around the loop and call :meth:`should_stop(step)`
  after each step; when it says True, save, wait for the save, and exit. With
  several processes the decision goes through JAX's preemption sync point
  (the distributed runtime's coordination service also catches SIGTERM), so
  every process stops at the same step.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.signals = signals
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is threading.main_thread():
      for sig in self.signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: Any) -> None:
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      return bool(multihost_utils.reached_preemption_sync_point(int(step))) or self._event.is_set()
    return self._event.is_set()
