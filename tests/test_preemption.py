"""The preemption guard: SIGTERM becomes a stop decision, and the previous handler comes back."""

import os

from jaxkd import preemption


def test_preemption_guard_catches_sigterm():
  import signal

  with preemption.PreemptionGuard() as guard:
    assert not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested and guard.should_stop(1)
  assert signal.getsignal(signal.SIGTERM) is not guard._handle
