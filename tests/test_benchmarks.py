"""Smoke test of benchmarks/: every benchmark runs at tiny sizes and writes the results its README promises.

Timings are not asserted (they belong to the benchmarks themselves); only that each benchmark runs, compares
what it says it compares, and that the variants it times do the same work (equal first-step losses).
"""

import json

import jax
import numpy as np
import pytest

from benchmarks import common, run, train_step

STEP_ROW_KEYS = {
  "batch",
  "flops_per_step",
  "matmul_gflops",
  "jaxkd_pmap_steps_s",
  "jaxkd_single_steps_s",
  "jaxkd_noskip_steps_s",
  "hand_steps_s",
  "jaxkd_pmap_vs_hand",
  "jaxkd_single_vs_hand",
  "jaxkd_noskip_vs_hand",
  "jaxkd_pmap_fraction_of_matmul",
  "hand_fraction_of_matmul",
  "jaxkd_pmap_host_us",
  "first_loss",
}
PIPELINE_ROW_KEYS = {
  "student",
  "steps_per_epoch",
  "step_rate_steps_s",
  "step_only_epoch_s",
  "epoch_cached_s",
  "epoch_online_s",
  "cached_epoch_over_step",
  "online_over_cached",
}


def _check_train_step(written):
  assert written["student_forward_flops_per_example"] > 0
  assert written["teacher_forward_flops_per_example"] > written["student_forward_flops_per_example"]
  for row in written["rows"]:
    assert STEP_ROW_KEYS <= set(row), STEP_ROW_KEYS - set(row)
    assert row["flops_per_step"] == row["batch"] * (
      written["teacher_forward_flops_per_example"] + 3 * written["student_forward_flops_per_example"]
    )
    assert all(np.isfinite(row[k]) and row[k] > 0 for k in STEP_ROW_KEYS if k.endswith(("_steps_s", "_vs_hand")))
    # jaxkd and the hand-written step start from the same parameters and do the same work.
    first = row["first_loss"]
    np.testing.assert_allclose(first["jaxkd_single"], first["hand"], rtol=1e-5)
    np.testing.assert_allclose(first["jaxkd_noskip"], first["hand"], rtol=1e-5)
    if "MLP" in written["pair"] or jax.local_device_count() == 1:  # per-device BatchNorm statistics differ
      np.testing.assert_allclose(first["jaxkd_pmap"], first["hand"], rtol=1e-5)


def _check_pipeline(written):
  assert {r["batches"] for r in written["pipeline_rows"]} == {"with teacher_logits", "images only"}
  assert all(r["examples_s"] > 0 for r in written["pipeline_rows"])
  for row in written["rows"]:
    assert PIPELINE_ROW_KEYS <= set(row), PIPELINE_ROW_KEYS - set(row)
    assert row["steps_per_epoch"] == written["num_examples"] // written["batch_size"]


def test_quick_run_writes_every_result(tmp_path):
  # One test, not a module fixture shared by several: under pytest-xdist each worker would rerun the fixture.
  results = run.run_all(setting="quick", with_torch=False, out_dir=str(tmp_path))
  assert set(results) == set(run.BENCHMARKS)
  for name in run.BENCHMARKS:
    written = json.loads((tmp_path / f"{name}.json").read_text())
    assert written["benchmark"] == name
    assert written["environment"]["local_device_count"] == jax.local_device_count()
    assert written["table"].startswith("| ")
    if name.startswith("train_step_"):
      _check_train_step(written)
    else:
      _check_pipeline(written)


def test_forward_flops_counts_dense_and_conv_layers():
  from jaxkd.models import CNN, MLP

  example = jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32)

  def flops(model):
    return common.forward_flops(model, jax.eval_shape(model.init, jax.random.key(0), example), example)

  assert flops(MLP((800, 800))) == 2 * (784 * 800 + 800 * 800 + 800 * 10)
  # conv 3x3x1->32 on 28x28, pool, conv 3x3x32->64 on 14x14, pool, dense 7*7*64->256, dense 256->10
  expected = 2 * (28 * 28 * 32 * 9 + 14 * 14 * 64 * 9 * 32 + 7 * 7 * 64 * 256 + 256 * 10)
  assert flops(CNN()) == expected


def test_torch_peer_runs_when_installed():
  torch = pytest.importorskip("torch")
  teacher, student, shape, _ = train_step.make_pair("mlp", setting="quick", dtype=np.float32)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, *shape)).astype(np.float32)
  labels = rng.integers(0, 10, size=4).astype(np.int32)
  variant = train_step.torch_variant(torch, teacher, student, images, labels, dtype=np.float32, use_gpu=False)
  variant.run(2)
  assert variant.name == "torch"


def test_torch_absent_is_a_note(monkeypatch, capsys):
  import builtins

  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("no torch")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  assert common.import_torch() is None
  assert "torch is not installed" in capsys.readouterr().out
