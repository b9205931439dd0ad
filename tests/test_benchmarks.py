"""Smoke test of benchmarks/: every benchmark runs at tiny sizes and writes the results its README promises.

Timings are not asserted (they belong to the benchmarks themselves); only that each benchmark runs, compares
what it says it compares, and that the variants it times do the same work (equal first-step losses).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, lm_step, pipeline, run, train_step

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
  "epoch_fm_s",
  "fm_over_online",
  "cached_epoch_over_step",
  "online_over_cached",
}


LM_SPEED_ROW_KEYS = {
  "batch",
  "jaxkd_tokens_s",
  "jaxkd_noskip_tokens_s",
  "hand_tokens_s",
  "jaxkd_vs_hand",
  "jaxkd_noskip_vs_hand",
  "jaxkd_vs_hand_cpu",
  "hand_metrics_vs_hand",
  "jaxkd_host_us",
  "first_loss",
}
LM_MEMORY_KEYS = {"temp_mb", "total_mb", "argument_mb", "output_mb", "alias_mb", "compile_s"}
LM_CACHE_ROW_KEYS = {"reading", "scratch_epoch_s", "cached_epoch_s", "cached_over_scratch", "cached_tokens_s"}


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


def _check_lm_step(written):
  config = lm_step.SETTINGS[written["setting"]]
  (row,) = written["rows"]
  assert LM_SPEED_ROW_KEYS <= set(row), LM_SPEED_ROW_KEYS - set(row)
  assert row["batch"] == written["batch_size"] == config["batch"]
  # jaxkd's step, without the guard, and the hand-written one start from the same parameters and do the same work.
  first = row["first_loss"]
  np.testing.assert_allclose(first["jaxkd"], first["hand"], rtol=1e-5)
  np.testing.assert_allclose(first["jaxkd_noskip"], first["hand"], rtol=1e-5)
  np.testing.assert_allclose(first["hand_metrics"], first["hand"], rtol=1e-6)
  assert {"jaxkd", "jaxkd_noskip", "hand", "hand_metrics"} <= set(row["cost"])

  k, chunks = config["k"], config["chunks"]
  middle = sorted(chunks)[len(chunks) // 2]
  timed = ["dense", *(f"chunk{c}" for c in chunks), f"topk{k}", f"topk{k}_chunk{middle}"]
  assert [r["step"] for r in written["chunk_rows"]] == [*timed, "hand"]
  chunk_rows = {r["step"]: r for r in written["chunk_rows"]}
  for name, chunk_row in chunk_rows.items():
    assert LM_MEMORY_KEYS <= set(chunk_row), (name, LM_MEMORY_KEYS - set(chunk_row))
    assert chunk_row["temp_mb"] > 0 and chunk_row["total_mb"] >= chunk_row["temp_mb"]
    assert f"| {name} |" in written["chunk_table"]
    if name in timed:
      assert chunk_row["tokens_s"] > 0 and chunk_row["timed_size_temp_mb"] > 0
  assert chunk_rows["dense"]["total_vs_dense"] == 1.0
  # Chunking changes where the logits exist, not the loss; the top-k steps share theirs.
  for chunk in chunks:
    np.testing.assert_allclose(chunk_rows[f"chunk{chunk}"]["first_loss"], first["jaxkd"], rtol=1e-5)
  np.testing.assert_allclose(chunk_rows[f"topk{k}_chunk{middle}"]["first_loss"], chunk_rows[f"topk{k}"]["first_loss"])
  np.testing.assert_allclose(chunk_rows["dense"]["first_loss"], first["jaxkd"], rtol=1e-6)

  cache = written["cache"]
  assert cache["steps_per_epoch"] == config["epoch_sequences"] // config["batch"]
  assert cache["cache_bytes_per_token"] == k * (2 + 2) + 4  # float16 logits, uint16 ids, float32 normaliser
  assert [r["reading"] for r in written["cache_rows"]] == ["grain per-item source", "vectorised batch reads"]
  for cache_row in written["cache_rows"]:
    assert LM_CACHE_ROW_KEYS <= set(cache_row), LM_CACHE_ROW_KEYS - set(cache_row)
  for key in ("chunk_table", "cache_table"):
    assert written[key].startswith("| ")


def test_quick_run_writes_every_result(tmp_path):
  # One test, not a module fixture shared by several: under pytest-xdist each worker would rerun the fixture.
  # lm_step runs in its own test below (as run_all runs it), so that `-k lm` selects it.
  only = [name for name in run.BENCHMARKS if name not in ("lm_step", "sharded")]
  results = run.run_all(setting="quick", only=only, with_torch=False, out_dir=str(tmp_path))
  assert set(results) == set(only)
  for name in only:
    written = json.loads((tmp_path / f"{name}.json").read_text())
    assert written["benchmark"] == name
    assert written["environment"]["local_device_count"] == jax.local_device_count()
    assert written["table"].startswith("| ")
    if name.startswith("train_step_"):
      _check_train_step(written)
    else:
      _check_pipeline(written)


def test_pipeline_with_the_cnn_teacher_times_function_matching(tmp_path):
  written = pipeline.run(setting="quick", teacher="cnn", out_dir=str(tmp_path))
  assert written["teacher"].startswith("CNN") and written["teacher_kind"] == "cnn"
  _check_pipeline(written)
  for row in written["rows"]:
    assert row["epoch_fm_s"] > 0 and row["fm_over_online"] > 0


def test_lm_step_quick_run_writes_its_tables(tmp_path):
  results = run.run_all(setting="quick", only=["lm_step"], with_torch=False, out_dir=str(tmp_path))
  assert set(results) == {"lm_step"}
  written = json.loads((tmp_path / "lm_step.json").read_text())
  assert written["benchmark"] == "lm_step"
  assert written["environment"]["local_device_count"] == jax.local_device_count()
  assert written["table"].startswith("| ")
  _check_lm_step(written)


def test_sharded_quick_run_writes_its_tables(tmp_path):
  from benchmarks import sharded

  results = run.run_all(setting="quick", only=["sharded"], out_dir=str(tmp_path))
  written = json.loads((tmp_path / "sharded.json").read_text())
  assert written == json.loads(json.dumps(sharded.common.to_jsonable(results["sharded"])))
  rows = {row["placement"]: row for row in written["rows"]}
  assert set(rows) == {"replicated", "model2", "model4", "model4_bf16"}  # the tests' 4 fake devices
  whole = rows["replicated"]["teacher_mb_per_device"]
  for name, ways in (("model2", 2), ("model4", 4), ("model4_bf16", 8)):
    assert rows[name]["teacher_mb_per_device"] == pytest.approx(whole / ways, rel=0.05), name
    assert rows[name]["tokens_per_s"] > 0 and rows[name]["vs_replicated"] > 0
  assert rows["model4"]["argument_mb"] < rows["replicated"]["argument_mb"]
  samplers = {row["sampler"]: row for row in written["sampler_rows"]}
  assert set(samplers) == {"kv_cache", "no_cache"} and all(row["same_tokens"] for row in samplers.values())
  assert written["table"].startswith("| ") and written["sampler_table"].startswith("| ")


def test_lm_step_gpu_models_have_the_documented_sizes():
  # The --gpu path's models, from shapes only (nothing compiles or allocates).
  teacher, student = lm_step.make_models("gpu", vocab=32768, length=1024, dtype=jnp.bfloat16)
  assert 320e6 < lm_step.param_count(teacher) < 350e6
  assert 55e6 < lm_step.param_count(student) < 65e6


def test_lm_step_bfloat16_jaxkd_and_hand_agree():
  # The --gpu dtype path at tiny sizes: bfloat16 models, jaxkd's step and the hand-written one take the same step.
  config = lm_step.SETTINGS["quick"]
  teacher, student = lm_step.make_models("quick", vocab=config["vocab"], length=config["length"], dtype=jnp.bfloat16)
  batch = lm_step.random_tokens(2, config["length"], config["vocab"])
  teacher_variables = jax.jit(teacher.init)(jax.random.key(1), batch["tokens"][:1])
  speed = lm_step.speed_variants(teacher, student, teacher_variables, batch, dtype=jnp.bfloat16)
  assert [v.name for v in speed.variants] == ["jaxkd", "jaxkd_noskip", "hand", "hand_metrics"]
  np.testing.assert_allclose(speed.first_loss["jaxkd"], speed.first_loss["hand"], rtol=1e-3)
  np.testing.assert_allclose(speed.first_loss["hand_metrics"], speed.first_loss["hand"], rtol=1e-6)
  assert all(cost["gflop"] > 0 for cost in speed.costs.values())


def test_lm_torch_peer_is_the_same_model_and_loss():
  torch = pytest.importorskip("torch")
  config = lm_step.SETTINGS["quick"]
  teacher, student = lm_step.make_models("quick", vocab=config["vocab"], length=config["length"])
  batch = lm_step.random_tokens(2, config["length"], config["vocab"])
  teacher_variables = jax.jit(teacher.init)(jax.random.key(1), batch["tokens"][:1])
  student_variables = jax.jit(student.init)(jax.random.key(2), batch["tokens"][:1])
  variant, first_loss = lm_step.torch_variant(
    torch,
    teacher,
    student,
    teacher_variables["params"],
    student_variables["params"],
    batch,
    dtype=np.float32,
    use_gpu=False,
  )
  # The same weights in both frameworks give the same loss: 0.5 CE + 0.5 KL, per-token means.
  teacher_logits = teacher.apply(teacher_variables, batch["tokens"])
  logits = student.apply(student_variables, batch["tokens"])
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][..., None], axis=-1)[..., 0]
  t_log_probs, log_probs = jax.nn.log_softmax(teacher_logits), jax.nn.log_softmax(logits)
  kl = jnp.sum(jnp.exp(t_log_probs) * (t_log_probs - log_probs), axis=-1)
  np.testing.assert_allclose(first_loss, float(jnp.mean(0.5 * ce + 0.5 * kl)), rtol=1e-4)
  variant.run(1)
  assert variant.name == "torch"


def test_forward_flops_counts_dense_and_conv_layers():
  from jaxkd.models import CNN, MLP

  example = jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32)

  def flops(model):
    return common.layer_matmul_flops(model, jax.eval_shape(model.init, jax.random.key(0), example), example)

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
