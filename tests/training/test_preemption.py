"""The preemption guard: SIGTERM becomes a stop decision, one process alone or every process at the same step."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from jax.experimental import multihost_utils

from jaxkd import state as state_lib
from jaxkd import train
from jaxkd.models import MLP
from jaxkd.training import checkpoint as ckpt
from jaxkd.training import loop as trainer
from jaxkd.training import preemption
from jaxkd.training.hooks import Callback
from jaxkd.training.metrics import read_metrics

_WORKER = pathlib.Path(__file__).with_name("_preempt_worker.py")
# Bounds, not expectations. Starting (imports, compiling) can take half a minute on two busy cores; after the
# SIGTERM a fixed pair saves and exits in seconds, where the bug this guards against hung for minutes.
_START_TIMEOUT_S = 120
_STOP_TIMEOUT_S = 60
_NUM_STEPS = 100
_MARKER_AT = 8


def test_preemption_guard_catches_sigterm():
  with preemption.PreemptionGuard() as guard:
    assert not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested and guard.should_stop(1)
  assert signal.getsignal(signal.SIGTERM) is not guard._handle


def test_a_previous_handler_from_outside_python_is_left_in_place(monkeypatch):
  original = signal.getsignal(signal.SIGTERM)
  real_signal = signal.signal

  def from_c(sig, handler):
    real_signal(sig, handler)
    return None  # what signal.signal returns when the previous handler was installed by C code (e.g. JAX's)

  monkeypatch.setattr(signal, "signal", from_c)
  try:
    with preemption.PreemptionGuard() as guard:
      pass
    assert signal.getsignal(signal.SIGTERM) == guard._handle
  finally:
    real_signal(signal.SIGTERM, original)


class _FakeSyncPoint:
  """JAX's preemption sync point as its C++ side computes it: one past the largest step reported when notified."""

  def __init__(self):
    self.reported: list[int] = []
    self.sync_step: int | None = None

  def notify(self, other_processes_step: int) -> None:
    self.sync_step = max([*self.reported[-1:], other_processes_step]) + 1

  def __call__(self, step: int) -> bool:
    self.reported.append(step)
    return step == self.sync_step


@pytest.fixture
def two_processes(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  sync_point = _FakeSyncPoint()
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", sync_point)
  return sync_point


def test_with_several_processes_only_the_sync_point_decides(two_processes):
  handler = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionGuard() as guard:
    # JAX's runtime catches SIGTERM itself; a Python handler would replace it.
    assert guard.collective and signal.getsignal(signal.SIGTERM) is handler
    assert not guard.should_stop(0)
    # Steps a multi-step call skipped are reported one by one: the sync point can be any of them.
    assert not guard.should_stop(4)
    two_processes.notify(other_processes_step=5)
    assert guard.should_stop(8)
    assert not guard.should_stop(12)
  assert two_processes.reported == list(range(13))
  assert signal.getsignal(signal.SIGTERM) is handler


def test_without_jax_preemption_service_nothing_is_caught(monkeypatch, caplog):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  calls = []

  def disabled(step):
    calls.append(step)
    raise RuntimeError("Preemption sync manager has not been initialized.")

  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", disabled)
  handler = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionGuard() as guard:
    assert signal.getsignal(signal.SIGTERM) is handler
    assert not guard.should_stop(1) and not guard.should_stop(2)
  assert calls == [1]  # asked once, then known to be off
  assert "not caught" in caplog.text


def test_a_sigterm_stops_fit_after_the_next_step_and_logs_the_partial_window(tmp_path):
  images = np.random.default_rng(0).standard_normal((64, 4, 4, 1)).astype(np.float32)
  batches = iter([{"image": images[i : i + 8], "label": np.arange(8) % 2} for i in range(0, 64, 8)])
  student = MLP(hidden_sizes=(8,), num_classes=2)
  state = state_lib.create_train_state(student, optax.sgd(0.1), images[:1], rng=0)
  step = train.make_train_step(placement="single")
  handler = signal.getsignal(signal.SIGTERM)

  def sigterm_at_3(step, loop):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  result = trainer.fit(
    state,
    train_step=step,
    train_data=batches,
    num_steps=8,
    workdir=tmp_path,
    log_every=5,
    progress=False,
    tensorboard=False,
    hooks=[Callback(sigterm_at_3)],
  )
  assert result.preempted and result.step == 4
  assert signal.getsignal(signal.SIGTERM) is handler
  # The stop writes the window since the last log (steps 1 to 4), though 4 is not a multiple of log_every.
  assert [(r["step"], r["steps"]) for r in read_metrics(tmp_path)] == [(4, 4)]
  assert ckpt.Checkpointer(tmp_path / "checkpoints").all_steps() == [4]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


class _Pair:
  """Two worker processes of one run on 127.0.0.1, their output in ``log_dir/<name><i>.log``."""

  def __init__(self, log_dir: pathlib.Path, name: str, args: list[str]):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 4 devices are not the worker's 2
    env.update(
      JAXKD_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
      JAXKD_NUM_PROCESSES="2",
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      # Compiling is most of a worker's time: the resumed pair reuses what the first pair compiled.
      JAX_COMPILATION_CACHE_DIR=str(log_dir / "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    self.log_paths = [log_dir / f"{name}{i}.log" for i in range(2)]
    self.processes = []
    for i, log_path in enumerate(self.log_paths):
      with open(log_path, "w") as log:
        self.processes.append(
          subprocess.Popen(
            [sys.executable, str(_WORKER), *args],
            env={**env, "JAXKD_PROCESS_ID": str(i)},
            stdout=log,
            stderr=subprocess.STDOUT,
          )
        )

  def wait(self, timeout_s: float) -> list[str]:
    """Each process's output once both exited (killed after ``timeout_s``); asserts both exited with 0."""
    deadline = time.monotonic() + timeout_s
    try:
      for process in self.processes:
        process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      pass
    finally:
      self.kill()
    outputs = [path.read_text() for path in self.log_paths]
    report = "\n".join(
      f"--- process {i} (exit {p.returncode}) ---\n{out[-3000:]}"
      for i, (p, out) in enumerate(zip(self.processes, outputs, strict=True))
    )
    assert all(p.returncode == 0 for p in self.processes), f"not both exited within {timeout_s} s:\n{report}"
    return outputs

  def kill(self) -> None:
    for process in self.processes:
      if process.poll() is None:
        process.kill()
        process.wait()


def _wait_for(path: pathlib.Path, pair: _Pair) -> None:
  deadline = time.monotonic() + _START_TIMEOUT_S
  while not path.exists():
    if time.monotonic() > deadline or any(p.poll() is not None for p in pair.processes):
      pair.kill()
      logs = "\n".join(p.read_text()[-3000:] for p in pair.log_paths)
      raise AssertionError(f"the workers never reached step {_MARKER_AT}:\n{logs}")
    time.sleep(0.05)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes_exactly(tmp_path):
  workdir = tmp_path / "run"
  run_args = [str(workdir), str(_NUM_STEPS), str(tmp_path / "out")]
  pair = _Pair(tmp_path, "stopped", [*run_args, "--marker-at", str(_MARKER_AT)])
  try:
    _wait_for(workdir / "marker", pair)
    pair.processes[0].send_signal(signal.SIGTERM)  # only process 0, as a scheduler taking one host away would
    outputs = pair.wait(_STOP_TIMEOUT_S)
  finally:
    pair.kill()
  stops = [re.findall(r"jaxkd: stopping at step (\d+)", out) for out in outputs]
  assert all(len(found) == 1 for found in stops), outputs
  stopped_at = int(stops[0][0])
  assert int(stops[1][0]) == stopped_at, f"the processes stopped at steps {stops}"
  assert _MARKER_AT < stopped_at < _NUM_STEPS
  assert ckpt.Checkpointer(workdir / "checkpoints").all_steps() == [stopped_at]
  # Only process 0 writes the log, and the stop writes the partial window since the last multiple of 5.
  steps = [record["step"] for record in read_metrics(workdir)]
  assert steps == sorted({*range(5, stopped_at + 1, 5), stopped_at})

  # The same command resumes; then the same two processes train uninterrupted from scratch, the reference (two
  # processes like the run it is compared with: gloo's sums need not match one process's to the bit).
  resumed = _Pair(tmp_path, "resumed", [*run_args, "--reference", str(tmp_path / "reference")])
  outputs = resumed.wait(_START_TIMEOUT_S)
  assert all(f"at step {stopped_at}" in out for out in outputs), outputs
  for i in range(2):
    with np.load(tmp_path / "out" / f"process{i}.npz") as saved:
      assert int(saved["step"]) == _NUM_STEPS and not bool(saved["preempted"])
      names = [name for name in saved.files if name.startswith("params_")]
      assert names and len(names) == sum(name.startswith("ref_") for name in saved.files)
      for name in names:
        np.testing.assert_array_equal(saved[name], saved[name.replace("params_", "ref_")], err_msg=f"{i}: {name}")
  steps = [record["step"] for record in read_metrics(workdir)]
  assert steps == sorted(set(steps)) and steps[-1] == _NUM_STEPS
