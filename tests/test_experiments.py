"""Every experiment end to end on tiny settings, and the main job's quick setting on real Fashion-MNIST."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import cnn_to_mlp, common, hinton2015, methods, omit_class
from tests.data.test_datasets import REAL_FASHION_MNIST, write_idx_dir


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  """300 training and 100 test examples in real IDX files, prepared once into a tfds data dir."""
  source = tmp_path_factory.mktemp("idx")
  write_idx_dir(source)
  return str(source), str(tmp_path_factory.mktemp("tfds"))


def tiny(config, data, **overrides):
  config.source_dir, config.data_dir = data
  config.validation_size = 100
  config.batch_size = 64
  config.placement = "single"
  for key, value in overrides.items():
    config[key] = value
  return config


def read_results(workdir):
  return json.loads((workdir / "results.json").read_text())


def test_cnn_to_mlp_tiny(tiny_data, tmp_path):
  config = tiny(
    cnn_to_mlp.get_config(),
    tiny_data,
    teacher_features=(4, 4),
    teacher_dense=8,
    teacher_epochs=1,
    student_epochs=1,
    temperatures=(1.0, 4.0),
    alphas=(0.9,),
    seeds=(0, 1),
    latency_repeats=2,
    fm_epochs=2.0,
    fm_sweep_epochs=1.0,
    curve_every=1.0,
  )
  cnn_to_mlp.run(config, tmp_path)
  for name in ["results.json", "results.md", "sweep.png", "accuracy.png", "patience.png", "teacher/metrics.jsonl"]:
    assert (tmp_path / name).exists(), name
  saved = read_results(tmp_path)
  assert set(saved) >= {"rows", "sweep", "best", "gap_closed", "teacher", "scratch", "distilled", "teacher_checkpoint"}
  assert [row["model"].split()[0] for row in saved["rows"]] == ["teacher", "student", "student,", "student", "student"]
  fm = saved["function_matching"]
  assert [row["temperature"] for row in fm["sweep"]] == [1.0, 2.0] and fm["temperature"] in (1.0, 2.0)
  for run in fm["distilled"] + fm["scratch"]:
    # The learning curve: both splits after each epoch; the last point is the run's final result.
    assert [point["epoch"] for point in run["curve"]] == [1.0, 2.0]
    assert run["curve"][-1]["test_errors"] == run["test_errors"]
  assert [point["epoch"] for point in fm["curve"]] == [1.0, 2.0]
  assert fm["baseline"] in fm["baselines"]
  teacher_errors = saved["teacher"]["test_errors"]
  baseline = fm["baselines"][fm["baseline"]]["mean"]
  if baseline > teacher_errors:
    expected = np.mean([(baseline - r["test_errors"]) / (baseline - teacher_errors) for r in fm["distilled"]])
    np.testing.assert_allclose(fm["gap_closed"]["mean"], expected)
  else:
    assert fm["gap_closed"] is None  # no gap to close
  inputs = json.loads((tmp_path / "function_matching" / f"T{fm['temperature']:g}_seed0" / "inputs.json").read_text())
  assert "mixup" in inputs["inputs"]["augment"] and inputs["inputs"]["alpha"] == 1.0
  assert "Function matching" in (tmp_path / "results.md").read_text()
  for row in saved["rows"]:
    assert row["params"] > 0 and row["flops_per_example"] > 0 and row["latency_b1_ms"] > 0
  assert len(saved["sweep"]) == 2 and len(saved["distilled"]) == 2
  assert 0.0 <= saved["teacher"]["test_accuracy"] <= 1.0
  assert "| model | test_accuracy |" in (tmp_path / "results.md").read_text()
  # Rerunning skips every finished sub-run: no training step is logged again.
  before = (tmp_path / "teacher" / "metrics.jsonl").read_text()
  cnn_to_mlp.run(config, tmp_path)
  assert (tmp_path / "teacher" / "metrics.jsonl").read_text() == before


def parameters_only(config, teacher, student, dataset):
  """cnn_to_mlp.model_costs without the compiles and timings that test_cnn_to_mlp_tiny covers."""
  import jax

  from jaxkd.models import count_params

  example = np.zeros((1, *dataset.images.shape[1:]), np.float32)
  costs = {"flops_per_example": 1.0, "latency_b1_ms": 1.0, "latency_b256_ms": 1.0}
  return {
    name: {"params": count_params(model.init(jax.random.key(0), example))} | costs
    for name, model in (("teacher", teacher), ("student", student))
  }


def test_cnn_to_mlp_reruns_what_a_config_change_made_stale(tiny_data, tmp_path, capsys, monkeypatch):
  """Issue 13: a changed student was reported with the old one's accuracy; a changed teacher was a shape error."""
  monkeypatch.setattr(cnn_to_mlp, "model_costs", parameters_only)
  config = tiny(
    cnn_to_mlp.get_config(),
    tiny_data,
    teacher_features=(4,),
    teacher_dense=8,
    teacher_epochs=1,
    student_epochs=1,
    temperatures=(2.0,),
    alphas=(0.9,),
    seeds=(0,),
    latency_repeats=1,
    function_matching=False,
  )
  cnn_to_mlp.run(config, tmp_path)
  teacher_log = (tmp_path / "teacher" / "metrics.jsonl").read_text()
  capsys.readouterr()

  config.student_hidden = (5,)
  saved = cnn_to_mlp.run(config, tmp_path)
  out = capsys.readouterr().out
  assert (tmp_path / "teacher" / "metrics.jsonl").read_text() == teacher_log  # the teacher did not change: reused
  assert "teacher: " not in out
  assert "scratch/seed0: finished with other inputs" in out and "sweep/T2_alpha0.9: finished with other" in out
  assert "changed model.hidden_sizes: tuple[100] -> tuple[5]" in out
  params = 28 * 28 * 5 + 5 + 5 * 10 + 10
  assert [row["params"] for row in saved["rows"][1:]] == [params, params]
  assert saved["scratch"][0]["params"] == saved["distilled"][0]["params"] == params  # results of the MLP[5] itself
  assert "MLP[5]" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "scratch" / "seed0.stale-1" / "result.json").exists()

  config.teacher_dense = 16
  saved = cnn_to_mlp.run(config, tmp_path)  # was a flax shape error: the old teacher's variables, the new module
  out = capsys.readouterr().out
  assert "teacher: finished with other inputs" in out and "changed model.dense_size: 8 -> 16" in out
  assert "sweep/T2_alpha0.9: finished with other inputs" in out and "changed teacher_logits_sha256: " in out
  assert "scratch/seed0: " not in out  # no teacher in it: still valid
  assert saved["teacher"]["params"] == saved["rows"][0]["params"]


@pytest.mark.parametrize(
  "module, key, value, message",
  [
    (cnn_to_mlp, "seeds", ("abc",), "seeds=('abc',) must be a non-empty sequence, each an int >= 0"),
    (cnn_to_mlp, "seeds", (), "seeds=() must be a non-empty sequence"),
    (cnn_to_mlp, "temperatures", (0.0,), "temperatures=(0.0,) must be a non-empty sequence, each a number > 0"),
    (cnn_to_mlp, "alphas", (1.5,), "alphas=(1.5,) must be a non-empty sequence, each a number in [0, 1]"),
    (cnn_to_mlp, "student_epochs", 0.0, "student_epochs=0.0 must be a number > 0"),
    (cnn_to_mlp, "placement", "tpu", "placement='tpu' must be 'single', 'pmap'"),
    (hinton2015, "sweep_widths", (), "sweep_widths=() must be a non-empty sequence, each an int >= 1"),
    (hinton2015, "teacher_dropout", 1.0, "teacher_dropout=1.0 must be a number in [0, 1)"),
    (omit_class, "shift_step", 0.0, "shift_step=0.0 must be a number > 0"),
    (omit_class, "alpha", -0.5, "alpha=-0.5 must be a number in [0, 1]"),
    (methods, "methods", ("kd", "nope"), "methods=('kd', 'nope') must be a sequence, each one of ['kd'"),
    (methods, "batch_size", 0, "batch_size=0 must be an int >= 1"),
  ],
)
def test_bad_configs_stop_every_experiment_before_it_trains(tmp_path, module, key, value, message):
  config = module.get_config()
  config[key] = value
  # No data either: were the check gone, the run would stop at once instead of training on the real dataset.
  config.dataset, config.data_dir = "jaxkd_no_such_dataset", str(tmp_path / "tfds")
  (tmp_path / "work").mkdir()
  with pytest.raises(common.ConfigError) as info:
    module.run(config, tmp_path / "work")
  assert message in str(info.value)
  assert not list((tmp_path / "work").iterdir())  # nothing trained, nothing written


@pytest.mark.parametrize(
  "module, overrides, message",
  [
    (cnn_to_mlp, {"validation_size": 300}, "validation_size=300 must leave examples to train on: 'fashion_mnist' has"),
    (cnn_to_mlp, {"train_subset": 250}, "train_subset=250 is more than the 200 training examples left"),
    (cnn_to_mlp, {"test_subset": 101}, "test_subset=101 is more than the 100 test examples"),
    (omit_class, {"omitted_class": 10}, "omitted_class=10 must be a class of 'fashion_mnist', 0 to 9"),
  ],
)
def test_configs_that_do_not_fit_the_data_stop_before_training(tiny_data, tmp_path, module, overrides, message):
  config = tiny(module.get_config(), tiny_data, **overrides)
  with pytest.raises(common.ConfigError, match=re.escape(message)):
    module.run(config, tmp_path)
  assert not list(tmp_path.iterdir())


def test_the_command_line_reports_a_bad_config_in_one_line(tmp_path):
  argv = ["cnn_to_mlp", f"--workdir={tmp_path}", "--config.seeds=abc", "--config.dataset=jaxkd_no_such_dataset"]
  argv.append(f"--config.data_dir={tmp_path / 'tfds'}")
  with pytest.raises(SystemExit, match=r"^cnn_to_mlp: invalid config: seeds=\('abc',\) must be a non-empty"):
    common.main(cnn_to_mlp.get_config, cnn_to_mlp.run, argv)


def test_hinton2015_tiny(tiny_data, tmp_path):
  config = tiny(
    hinton2015.get_config(),
    tiny_data,
    teacher_hidden=(16, 16),
    student_hidden=(8, 8),
    teacher_epochs=1,
    student_epochs=1,
    sweep_epochs=0.25,
    sweep_temperatures=(1.0, 20.0),
    sweep_widths=(8, 4),
  )
  hinton2015.run(config, tmp_path)
  saved = read_results(tmp_path)
  assert len(saved["rows"]) == 3 and len(saved["sweep"]) == 4
  assert {row["width"] for row in saved["sweep"]} == {8, 4}
  assert saved["paper_mnist"] == {"teacher_errors": 67, "scratch_errors": 146, "distilled_errors": 74}
  assert (tmp_path / "temperature_sweep.png").stat().st_size > 1000
  # The distilled student records which teacher it learned from.
  meta_dirs = list((tmp_path / "distilled_T20" / "checkpoints").glob("*/meta"))
  assert meta_dirs


def test_omit_class_tiny(tiny_data, tmp_path):
  config = tiny(
    omit_class.get_config(), tiny_data, teacher_hidden=(16,), student_hidden=(8,), teacher_epochs=1, student_epochs=1
  )
  omit_class.run(config, tmp_path)
  saved = read_results(tmp_path)
  assert saved["transfer_set_size"] == 200 - 20  # 200 fit examples, labels cycle so a tenth are 3s.
  assert len(saved["curves"]["test"]["errors"]) == len(saved["shifts"])
  assert (tmp_path / "bias_shift.png").exists()


def test_bias_shift_counts():
  import numpy as np

  logits = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 2.5], [1.0, 0.0, 0.5]])
  labels = np.array([0, 2, 2])
  predictions = omit_class.predictions_with_shift(logits, 2, np.array([0.0, 1.0, 5.0]))
  np.testing.assert_array_equal(predictions, [[0, 1, 0], [0, 2, 2], [2, 2, 2]])
  total, on_class = omit_class.error_counts(predictions, labels, 2)
  np.testing.assert_array_equal(total, [2, 0, 1])
  np.testing.assert_array_equal(on_class, [2, 0, 0])


def test_main_job_quick_on_real_fashion_mnist(tmp_path):
  """The README's main job at --config.quick=True, through its command line."""
  if not os.path.exists(os.path.join(REAL_FASHION_MNIST, "train-images-idx3-ubyte.gz")):
    if os.environ.get("JAXKD_REQUIRE_REAL_DATA"):
      pytest.fail(f"JAXKD_REQUIRE_REAL_DATA is set but {REAL_FASHION_MNIST} has no Fashion-MNIST")
    pytest.skip(f"real Fashion-MNIST not installed in {REAL_FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
  root = pathlib.Path(__file__).parent.parent
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  command = [sys.executable, "-m", "experiments.cnn_to_mlp", f"--workdir={tmp_path}", "--config.quick=True"]
  command.append(f"--config.data_dir={tmp_path / 'tfds'}")
  out = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  saved = read_results(tmp_path)
  assert saved["config"]["train_subset"] == 10000
  # A CNN trained briefly on Fashion-MNIST is far above chance (10%); so is the MLP student.
  assert saved["teacher"]["test_accuracy"] > 0.75
  assert all(r["test_accuracy"] > 0.7 for r in saved["scratch"] + saved["distilled"])
  assert "Cached-logit distillation (4 epochs) closes" in out.stdout
  assert "Function matching (KD only, teacher online on the same mixup view" in out.stdout
  fm = saved["function_matching"]
  assert all(r["test_accuracy"] > 0.7 for r in fm["distilled"] + fm["scratch"])


def test_learning_curve_reads_eval_entries_by_epoch(tmp_path):
  path = tmp_path / "metrics.jsonl"
  records = [
    {"step": 10, "time": 0.0, "loss": 1.0},  # a training summary: not a curve point
    {"step": 20, "time": 1.0, "eval_test_errors": 50, "eval_test_accuracy": 0.5},
    {"step": 40, "time": 2.0, "eval_test_errors": 40, "eval_test_accuracy": 0.6},
    {"step": 40, "time": 3.0, "eval_test_errors": 30, "eval_test_accuracy": 0.7},  # evaluated again on a resume
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  assert common.learning_curve(path, steps_per_epoch=20) == [
    {"epoch": 1.0, "test_errors": 50, "test_accuracy": 0.5},
    {"epoch": 2.0, "test_errors": 30, "test_accuracy": 0.7},
  ]
