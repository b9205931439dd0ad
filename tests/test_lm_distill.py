"""experiments.lm_distill: the quick config end to end, its rerun and resume, its data order and its config checks."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import common, lm_distill

ROOT = pathlib.Path(__file__).parent.parent


def quick_config(**overrides):
  """The config ``--config.quick=True`` runs, as the command line resolves it."""
  config = lm_distill.get_config()
  config.quick = True
  config = common.resolve_quick(config, [])
  for key, value in overrides.items():
    config[key] = value
  return config


def read_results(workdir):
  return json.loads((workdir / "results.json").read_text())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  """The quick config through the command line, once for this module; the tests below reuse its sub-runs."""
  workdir = tmp_path_factory.mktemp("lm_distill")
  # XLA's lowest optimisation level about halves the compile time of the run's ~30 small programs, whose steps are
  # too short for slower code to matter. The rerun and resume tests below compile with the default level.
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  command = [sys.executable, "-m", "experiments.lm_distill", f"--workdir={workdir}", "--config.quick=True"]
  out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return workdir, out.stdout


def test_quick_run_reports_every_variant(quick_run):
  workdir, stdout = quick_run
  saved = read_results(workdir)
  config = quick_config()
  names = lm_distill.variant_names(config)
  assert names == [
    "scratch",
    "dense_kd",
    "topk_k8",
    "topk_k1",
    "reverse_kl",
    "gjsd",
    "scratch_equal_time",
    "scratch_cached_time",
  ]
  assert list(saved["runs"]) == names and list(saved["summary"]) == names
  targets = saved["windows"]["test_targets"]
  assert targets == saved["tokens"]["test"] - 1
  for name in names:
    (result,) = saved["runs"][name]
    assert math.isfinite(result["test_bits_per_byte"]) and 0 < result["test_bits_per_byte"] < 10, name
    assert 0 <= result["test_agreement"] <= 1, name
    assert result["test_targets"] == targets, name  # every target of the test split, each once
    assert result["params"] == saved["params"]["student"]["params"]
    assert result["num_steps"] == saved["equal_time_steps"].get(name, 15)
  assert set(saved["equal_time_steps"]) == {"scratch_equal_time", "scratch_cached_time"}
  assert min(saved["equal_time_steps"].values()) >= 1
  assert lm_distill.equal_time_references(config)["scratch_cached_time"] == "topk_k8"  # no k = 32 in quick mode
  assert "At equal wall time, top-8 cache (bucket) is" in (workdir / "results.md").read_text()
  # The teacher trained 4x longer than the students; it is far ahead of them.
  assert saved["teacher"]["test_bits_per_byte"] < saved["runs"]["scratch"][0]["test_bits_per_byte"] - 0.1
  # k = 1 learns from the bucket tail; renormalised it would be scratch exactly (a zero KL).
  topk1 = json.loads((workdir / "students/topk_k1/seed0/inputs.json").read_text())["inputs"]
  assert topk1["objective"]["tail"] == "bucket" and topk1["topk"]["k"] == 1
  assert saved["runs"]["topk_k1"][0]["test_bits_per_byte"] != saved["runs"]["scratch"][0]["test_bits_per_byte"]

  vocab = saved["tokenizer"]["vocab_size"]
  assert vocab == 512 and len(saved["corpus"]["fingerprint"]) == len(saved["tokenizer"]["fingerprint"]) == 64
  cache = saved["cache"]
  assert cache["k"] == 8 and cache["num_windows"] == 15 * 8 and cache["num_tokens"] == 15 * 8 * 64
  assert cache["formula_bytes_per_token"] == {"1": 1 * 4 + 4, "8": 8 * 4 + 4}  # float16 + uint16 per k, + float32
  assert cache["array_bytes_per_token"] == 36
  assert 36 < cache["file_bytes_per_token"] < 36 * 1.2  # + .npy headers, token digests and the JSON records
  assert saved["dense_bytes_per_token"] == 4 * vocab
  assert 0 < cache["teacher_topk_mass"]["1"] < cache["teacher_topk_mass"]["8"] <= 1.0 + 1e-3
  assert saved["topk_vs_dense"]["k"] == 8

  for name in ["tokenizer.json", "tokens/train.npy", "tokens/test.npy", "teacher/test_top1.npy"]:
    assert (workdir / name).exists(), name
  assert (workdir / "topk.png").stat().st_size > 1000
  table = (workdir / "results.md").read_text()
  assert "| model | steps | test bits/byte | agreement |" in table and "top-1 cache (bucket)" in table
  assert "| top-8 cache (bucket) |" in table
  assert "top-8 cache (bucket)" in stdout


def test_rerun_skips_finished_subruns(quick_run, capsys):
  workdir, _ = quick_run
  before = read_results(workdir)
  logs = {path: path.read_text() for path in workdir.rglob("metrics.jsonl")}
  assert len(logs) == 1 + 8  # the teacher and every student

  saved = lm_distill.run(quick_config(), workdir)
  out = capsys.readouterr().out
  assert "resumed" not in out and "stale" not in out
  assert out.count("finished earlier with these inputs; reusing its result") == 1 + 8
  assert {path: path.read_text() for path in workdir.rglob("metrics.jsonl")} == logs  # no step trained again
  assert json.loads(json.dumps(saved["runs"])) == before["runs"]
  assert json.dumps(saved["summary"]) == json.dumps(before["summary"]) and saved["cache"] == before["cache"]


def test_a_stopped_subrun_resumes_where_it_stopped(quick_run, monkeypatch, capsys):
  """A top-k student stopped after 7 of its 15 steps (as a preemption stops it) continues at step 8, with the
  cache's batch 8, to the result of the uninterrupted run."""
  import jaxkd.training.loop

  workdir, _ = quick_run
  run_dir = workdir / "students/topk_k8/seed0"
  original = json.loads((run_dir / "result.json").read_text())
  run_dir.rename(run_dir.with_name("seed0.uninterrupted"))
  fit = jaxkd.training.fit

  def stop_after_7(*args, **kwargs):
    return fit(*args, **kwargs, stop_after=7)

  monkeypatch.setattr(jaxkd.training.loop, "fit", stop_after_7)
  with pytest.raises(SystemExit) as stopped:
    lm_distill.run(quick_config(), workdir)
  assert stopped.value.code == 143
  assert (run_dir / "checkpoints/7").is_dir() and not (run_dir / "result.json").exists()
  monkeypatch.setattr(jaxkd.training.loop, "fit", fit)
  capsys.readouterr()

  saved = lm_distill.run(quick_config(), workdir)
  out = capsys.readouterr().out
  assert f"resumed from {run_dir / 'checkpoints' / '7'} at step 7" in out
  assert json.loads((run_dir / "checkpoints/15/data/metadata").read_text()) == {"next_index": 15}
  (resumed,) = saved["runs"]["topk_k8"]
  # The first run compiled at XLA's lowest optimisation level, this one at the default: equal up to rounding.
  np.testing.assert_allclose(resumed["test_bits_per_byte"], original["test_bits_per_byte"], rtol=1e-4)
  np.testing.assert_allclose(resumed["test_agreement"], original["test_agreement"], atol=2e-3)
  assert json.loads((run_dir / "timing.json").read_text())["timed_steps"] > 0


def test_topk_batches_are_the_students_windows_in_their_order(tmp_path):
  """The cached run reads the windows of the live-teacher runs, batch for batch, and resumes from a saved state."""
  import jax
  import jax.numpy as jnp

  from jaxkd.lm import text, topk_cache

  vocab, length, batch_size = 32, 8, 4
  tokens = np.random.default_rng(0).integers(0, vocab, 2000).astype(np.uint16)
  train = text.TokenSequences(tokens, length=length)
  windows = lm_distill.StudentWindows(train, batch_size=batch_size, num_steps=5, seed=3)
  key = topk_cache.topk_cache_key(
    teacher_fingerprint="t", corpus_fingerprint="c", tokenizer_fingerprint="z", k=6, temperature=1.0,
    length=length, vocab_size=vocab,
  )  # fmt: skip

  def teacher(batch):  # distinct logits, largest at the next token: a known top k
    return jax.nn.one_hot(batch, vocab) * 10.0 + jnp.arange(vocab, dtype=jnp.float32) / vocab

  cache = topk_cache.write_topk_cache(
    tmp_path / "cache", teacher, windows, k=6, key=key, vocab_size=vocab, progress=False
  )
  live = text.token_batches(train, batch_size=batch_size, seed=3)
  cached = lm_distill.topk_batches(windows, cache, k=2, batch_size=batch_size)
  state = None
  for step in range(5):
    expected, batch = next(live), next(cached)
    np.testing.assert_array_equal(batch["tokens"], expected["tokens"])
    np.testing.assert_array_equal(batch["label"], expected["label"])
    assert batch["teacher_topk_indices"].shape == (batch_size, length, 2)
    np.testing.assert_array_equal(batch["teacher_topk_indices"][..., 0], batch["tokens"])  # the one-hot's token
    # Then the largest offset: the last token, or the one before it when the last is the one-hot's.
    second = np.where(batch["tokens"] == vocab - 1, vocab - 2, vocab - 1)
    np.testing.assert_array_equal(batch["teacher_topk_indices"][..., 1], second)
    if step == 1:
      state, after = cached.get_state(), batch
  with pytest.raises(StopIteration):
    next(cached)  # exactly the windows of num_steps batches
  resumed = lm_distill.topk_batches(windows, cache, k=2, batch_size=batch_size)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["tokens"], windows.tokens[2 * batch_size : 3 * batch_size])
  assert not np.array_equal(after["tokens"], windows.tokens[2 * batch_size : 3 * batch_size])


def test_equal_time_steps():
  dense = {"num_steps": 420, "seconds_per_step": 0.5, "wall_seconds": 230.0}
  scratch = {"num_steps": 420, "seconds_per_step": 0.2, "wall_seconds": 95.0}
  assert lm_distill._equal_time_steps(dense, scratch) == 1050
  # A run without steady timing (resumed at its last step) falls back on its wall time per step.
  assert lm_distill._equal_time_steps(dense | {"seconds_per_step": None}, scratch) == 1150


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"topk_ks": (1, 1024)}, "topk_ks=(1, 1024) has a k above vocab_size=512"),
    ({"teacher_size": "huge"}, "teacher_size='huge' must be one of ["),
    ({"seeds": ()}, "seeds=() must be a non-empty sequence"),
    ({"gjsd_beta": 1.0}, "gjsd_beta=1.0 must be a number in (0, 1)"),
    ({"vocab_size": 256}, "vocab_size=256 must be an int in (256, 65536]"),
    ({"tail": "drop"}, "tail='drop' must be one of ['renormalize', 'bucket']"),
  ],
)
def test_bad_configs_stop_before_anything_is_written(tmp_path, overrides, message):
  with pytest.raises(common.ConfigError) as info:
    lm_distill.run(quick_config(**overrides), tmp_path)
  assert message in str(info.value)
  assert not list(tmp_path.iterdir())


def test_a_corpus_budget_that_empties_a_split_is_a_config_error(tmp_path):
  with pytest.raises(common.ConfigError, match=r"max_bytes=10 leaves the train split .* empty"):
    lm_distill.run(quick_config(max_bytes=10), tmp_path)
