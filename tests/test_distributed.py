"""Tests for jaxkd.distributed: a real two-process run on 127.0.0.1, and the single-process helpers."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxkd import distributed, train
from jaxkd.placement import Placement

_WORKER = pathlib.Path(__file__).with_name("_multihost_worker.py")
_TIMEOUT_S = 150


def _load_worker():
  spec = importlib.util.spec_from_file_location("_multihost_worker", _WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _reference(worker) -> dict[str, np.ndarray]:
  """The same steps in this one process, on one device, over the whole global batches."""
  state, _, teacher_variables, step_kwargs = worker.setup()
  step = train.make_train_step(placement="single", **step_kwargs)
  state, teacher_variables = step.placement.put(state), step.placement.put(teacher_variables)
  for batch in worker.global_batches():
    state, _ = step(state, teacher_variables, batch)
  state = step.placement.to_host(state)
  return worker.flatten("ref", {"params": state.params, "batch_stats": state.batch_stats})


def test_two_processes_match_one_process(tmp_path):
  worker = _load_worker()
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker sets its own device count
  env.update(JAXKD_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXKD_NUM_PROCESSES="2", JAX_PLATFORMS="cpu")
  outputs = [tmp_path / f"process{i}.npz" for i in range(2)]
  logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
  processes = [
    subprocess.Popen(
      [sys.executable, str(_WORKER), str(out)],
      env={**env, "JAXKD_PROCESS_ID": str(i)},
      stdout=log,
      stderr=subprocess.STDOUT,
    )
    for i, (out, log) in enumerate(zip(outputs, logs, strict=True))
  ]
  try:
    for process in processes:
      process.wait(timeout=_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    pass
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  text = []
  for i, log in enumerate(logs):
    log.seek(0)
    text.append(f"--- process {i} (exit {processes[i].returncode}) ---\n{log.read()[-4000:]}")
    log.close()
  assert all(p.returncode == 0 for p in processes), "\n".join(text)

  reference = _reference(worker)
  initial = worker.flatten("ref", {"params": worker.setup()[0].params})
  assert max(float(np.max(np.abs(reference[k] - v))) for k, v in initial.items()) > 1e-3, "training must move params"
  for out in outputs:
    got = dict(np.load(out))
    # Every example of the global batch is counted once, across both processes.
    assert int(got.pop("pmap/eval_count")) == worker.GLOBAL_BATCH
    for mode in ("pmap", "shard_map", "sharded"):
      for name, expected in reference.items():
        key = name.replace("ref/", f"{mode}/", 1)
        np.testing.assert_allclose(got[key], expected, atol=1e-5, err_msg=f"{out.name}: {key}")


def test_process_batch_slice():
  assert distributed.process_batch_slice(8, process_index=1, process_count=4) == slice(2, 4)
  assert distributed.process_batch_slice(8) == slice(0, 8)
  with pytest.raises(ValueError, match=r"global batch size 10 does not divide over 4 processes"):
    distributed.process_batch_slice(10, process_index=0, process_count=4)


def test_initialize_single_process_is_a_noop(monkeypatch):
  monkeypatch.setattr(distributed, "_multiprocess", None)
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
  assert distributed.initialize() is False
  # Idempotent: the first answer stands whatever later calls are given.
  assert distributed.initialize(num_processes=2, process_id=0, coordinator_address="127.0.0.1:1") is False
  assert not jax.distributed.is_initialized()


def test_initialize_rejects_a_bad_env(monkeypatch):
  monkeypatch.setattr(distributed, "_multiprocess", None)
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
  with pytest.raises(ValueError, match="JAXKD_NUM_PROCESSES must be an integer, got 'two'"):
    distributed.initialize()


def test_assemble_batch_is_the_placements_put_batch():
  if jax.device_count() < 4:
    pytest.skip("needs 4 (fake CPU) devices: XLA_FLAGS=--xla_force_host_platform_device_count=4")
  batch = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "label": np.arange(8, dtype=np.int32)}
  assert distributed.process_rows(batch)["label"].shape == (8,)  # one process holds every row
  pmap = Placement.pmap(jax.local_devices()[:4])
  pmap_batch = distributed.assemble_batch(batch, pmap)
  assert pmap_batch["image"].shape == (4, 2, 3) and pmap.is_placed_batch(pmap_batch)
  np.testing.assert_array_equal(np.asarray(pmap_batch["image"]).reshape(8, 3), batch["image"])
  mesh = Placement.data_parallel(jax.devices()[:4])
  sharded = distributed.assemble_batch(batch, mesh)
  assert sharded["image"].shape == (8, 3) and mesh.is_placed_batch(sharded)
  assert sharded["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  np.testing.assert_array_equal(np.asarray(sharded["image"]), batch["image"])
  single = distributed.assemble_batch(batch, "single")
  assert single["label"].devices() == {jax.local_devices()[0]}
  with pytest.raises(ValueError, match="batch size 6 does not divide over 4 devices"):
    distributed.assemble_batch({"x": np.zeros((6, 2))}, pmap)
  with pytest.raises(ValueError, match="placement must be a jaxkd.Placement or one of"):
    distributed.assemble_batch(batch, "tpu")
