"""The experiment machinery: command line, table builder, plot writers, logging, model costs."""

import dataclasses
import json

import jax
import ml_collections
import numpy as np
import pytest

import jaxkd
from experiments import common
from jaxkd.data import augment
from jaxkd.models import MLP


def test_markdown_table():
  rows = [
    {"model": "teacher", "accuracy": 0.91234, "errors": 877, "acc": {"mean": 0.9, "std": 0.01}},
    {"model": "student", "accuracy": 0.5, "errors": 12},
  ]
  table = common.markdown_table(rows, ["model", "accuracy", "errors", "acc"])
  lines = table.strip().split("\n")
  assert lines[0] == "| model | accuracy | errors | acc |"
  assert lines[1] == "|---|---|---|---|"
  assert lines[2] == "| teacher | 0.9123 | 877 | 0.9000 ± 0.0100 |"
  assert lines[3] == "| student | 0.5000 | 12 |  |"
  wide = common.markdown_table([{"errors": {"mean": 1089.0, "std": 6.557}, "flops": 8.699e6, "tiny": 2.5e-5}])
  assert wide.split("\n")[2] == "| 1089.0 ± 6.6 | 8.699e+06 | 2.5e-05 |"
  with pytest.raises(ValueError, match="at least one row"):
    common.markdown_table([])


def test_paired_difference():
  # Seeds move both arms together: unpaired, 0.90 ± 0.01 vs 0.89 ± 0.01 overlap; paired, every seed is +0.01.
  above = common.paired_difference([0.90, 0.91, 0.89], [0.89, 0.90, 0.88])
  assert above["mean"] == pytest.approx(0.01) and above["std"] == pytest.approx(0.0, abs=1e-12)
  assert above["differences"] == pytest.approx([0.01, 0.01, 0.01]) and above["verdict"] == "above"
  assert common.paired_difference([0.88, 0.89], [0.90, 0.905])["verdict"] == "below"
  # Mixed signs, or a mean inside the differences' spread, is a tie.
  assert common.paired_difference([0.91, 0.89, 0.90], [0.90, 0.90, 0.90])["verdict"] == "tie"
  assert common.paired_difference([0.901, 0.95, 0.902], [0.90, 0.90, 0.90])["verdict"] == "tie"
  assert common.paired_difference([0.9], [0.8])["verdict"] is None
  with pytest.raises(ValueError, match="one value per seed on both sides, got 2 and 3"):
    common.paired_difference([0.9, 0.9], [0.9, 0.9, 0.9])


def test_plots_are_png(tmp_path):
  common.plot_lines(
    tmp_path / "a.png", {"w=30": ([1, 2, 4], [0.5, 0.6, 0.55])}, xlabel="T", ylabel="acc", hlines={"teacher": 0.7}
  )
  common.plot_bars(tmp_path / "b.png", {"kd": 0.9, "dkd": 0.91}, ylabel="acc", errors={"kd": 0.01})
  for name in ["a.png", "b.png"]:
    data = (tmp_path / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_resolve_quick_keeps_explicit_overrides():
  config = ml_collections.ConfigDict({"quick": True, "num_epochs": 20, "subset": 0, "lr": 1e-3})
  config.quick_overrides = {"num_epochs": 1, "subset": 500}
  resolved = common.resolve_quick(config, ["prog", "--config.quick=True", "--config.num_epochs=5"])
  assert resolved.num_epochs == 20  # explicit on the command line: quick does not override it
  assert resolved.subset == 500
  config.quick = False
  assert common.resolve_quick(config, ["prog"]).subset == 0


def test_main_parses_overrides(tmp_path):
  def get_config():
    config = ml_collections.ConfigDict({"quick": False, "num_epochs": 20, "name": "x"})
    config.quick_overrides = {"num_epochs": 2}
    return config

  seen = {}

  def run(config, workdir):
    seen.update(config=config, workdir=workdir)
    return 7

  out = common.main(get_config, run, ["prog", f"--workdir={tmp_path}/w", "--config.quick=True", "--config.name=y"])
  assert out == 7
  assert seen["config"].num_epochs == 2 and seen["config"].name == "y"
  assert seen["workdir"].is_dir()


def test_json_helpers(tmp_path):
  common.write_json(tmp_path / "r.json", {"a": np.float32(1.5)})
  assert common.read_json(tmp_path / "r.json") == {"a": 1.5}
  assert common.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2**0.5), "n": 2}


def test_flops_and_latency():
  model = MLP(hidden_sizes=(100,))
  x = np.zeros((1, 28, 28, 1), np.float32)
  variables = model.init(jax.random.key(0), x)
  flops = common.xla_forward_flops(model.apply, variables, x)
  # Two matmuls dominate: 2*784*100 + 2*100*10 multiply-adds; XLA adds biases and the ReLU.
  assert 2 * (784 * 100 + 100 * 10) <= flops <= 1.1 * 2 * (784 * 100 + 100 * 10)
  latency = common.inference_latency(model.apply, variables, x, batch_size=4, repeats=5)
  assert 0 < latency < 1.0


# ---------------------------------------------------------------- config checks and the command line


def test_check_config_names_every_bad_value_at_once():
  config = ml_collections.ConfigDict(
    {"seeds": ("abc",), "temperatures": (0.0, 2.0), "alphas": (0.5, 1.5), "epochs": 0.0, "batch_size": True}
  )
  rules = {
    "seeds": common.sequence_of(common.NON_NEGATIVE_INT),
    "temperatures": common.sequence_of(common.POSITIVE),
    "alphas": common.sequence_of(common.FRACTION),
    "epochs": common.POSITIVE,
    "batch_size": common.POSITIVE_INT,
    "absent": common.POSITIVE,  # not in this config: skipped
  }
  with pytest.raises(common.ConfigError) as info:
    common.check_config(config, rules)
  message = str(info.value)
  assert "seeds=('abc',) must be a non-empty sequence, each an int >= 0" in message
  assert "temperatures=(0.0, 2.0) must be a non-empty sequence, each a number > 0" in message
  assert "alphas=(0.5, 1.5) must be a non-empty sequence, each a number in [0, 1]" in message
  assert "epochs=0.0 must be a number > 0" in message
  assert "batch_size=True must be an int >= 1" in message
  assert "absent" not in message
  config = ml_collections.ConfigDict({"seeds": (), "temperatures": (1.0,), "alphas": (0.0, 1.0), "batch_size": 8})
  with pytest.raises(common.ConfigError, match=r"^invalid config: seeds=\(\) must be a non-empty sequence[^;]*$"):
    common.check_config(config, rules)
  config.seeds = (0, 3)
  common.check_config(config, rules)


def test_main_refuses_a_workdir_that_is_a_file(tmp_path):
  def get_config():
    return ml_collections.ConfigDict({"quick": False})

  def run(config, workdir):
    raise AssertionError("run must not start")

  (tmp_path / "file").write_text("x")
  with pytest.raises(SystemExit, match=f"--workdir {tmp_path / 'file'} is a file, not a directory"):
    common.main(get_config, run, ["prog", f"--workdir={tmp_path / 'file'}"])
  with pytest.raises(SystemExit, match=f"cannot create --workdir {tmp_path / 'file' / 'sub'} "):
    common.main(get_config, run, ["prog", f"--workdir={tmp_path / 'file' / 'sub'}"])


def test_main_reports_a_config_error_without_a_traceback(tmp_path):
  def get_config():
    return ml_collections.ConfigDict({"quick": False, "seeds": (0, 1)})

  def run(config, workdir):
    common.check_config(config, {"seeds": common.sequence_of(common.NON_NEGATIVE_INT)})
    return "trained"

  with pytest.raises(SystemExit, match=r"^prog: invalid config: seeds=\('abc',\) must be a non-empty sequence"):
    common.main(get_config, run, ["prog", f"--workdir={tmp_path}", "--config.seeds=abc"])
  assert common.main(get_config, run, ["prog", f"--workdir={tmp_path}", "--config.seeds=(4,)"]) == "trained"


# ---------------------------------------------------------------- sub-runs: reuse only what the same inputs made


def tiny_set(num_examples: int = 64, *, seed: int = 0, split: str = "train"):
  from jaxkd.data.datasets import ArrayDataset

  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(num_examples, 6, 6, 1), dtype=np.uint8)
  return ArrayDataset(images, np.arange(num_examples) % 4, num_classes=4, name="tiny", split=split)


TRAIN, TEST = tiny_set(), tiny_set(32, seed=1, split="test")


def make_subrun(**overrides):
  kwargs = dict(
    model=MLP(hidden_sizes=(8,), num_classes=4),
    train_set=TRAIN,
    eval_sets={"test": TEST},
    num_epochs=1.0,
    batch_size=16,
    learning_rate=1e-3,
    seed=0,
    mean=0.5,
    std=0.25,
    config=ml_collections.ConfigDict({"student_lr": 1e-3}),
  )
  return common.SubRun(**(kwargs | overrides))


def subrun(workdir, name="student", **overrides):
  return common.train_subrun(workdir, name, make_subrun(**overrides), placement="single")


def test_a_subrun_is_reused_for_the_same_inputs_and_rerun_for_others(tmp_path, capsys):
  # The report of issue 13: a narrower student reused the wider one's result (its accuracy beside its own name).
  wide = subrun(tmp_path)
  log = (tmp_path / "student" / "metrics.jsonl").read_text()
  assert subrun(tmp_path, model=MLP(hidden_sizes=(8,), num_classes=4)) == wide  # an equal model: reused
  assert (tmp_path / "student" / "metrics.jsonl").read_text() == log  # not trained again
  assert "moved it" not in capsys.readouterr().out
  recorded = common.read_json(tmp_path / "student" / "inputs.json")
  assert recorded["fingerprint"] == wide["fingerprint"] and len(wide["fingerprint"]) == 32
  narrow = subrun(tmp_path, model=MLP(hidden_sizes=(3,), num_classes=4))
  out = capsys.readouterr().out
  assert f"student: finished with other inputs; moved it to {tmp_path / 'student.stale-1'}" in out
  assert "changed model.hidden_sizes: tuple[8] -> tuple[3]" in out
  assert narrow["params"] == 6 * 6 * 3 + 3 + 3 * 4 + 4 != wide["params"]
  assert common.read_json(tmp_path / "student.stale-1" / "result.json") == wide  # kept aside, not mixed in
  assert subrun(tmp_path, model=MLP(hidden_sizes=(3,), num_classes=4)) == narrow  # the new one is reused
  assert "moved it" not in capsys.readouterr().out


def test_old_and_unfinished_subruns_of_other_inputs_are_set_aside(tmp_path, capsys):
  (tmp_path / "student").mkdir()
  common.write_json(tmp_path / "student" / "result.json", {"test_accuracy": 0.99, "params": 39760})
  result = subrun(tmp_path)
  assert "student: finished before sub-runs recorded their inputs" in capsys.readouterr().out
  assert result["params"] != 39760 and "fingerprint" in result
  assert common.read_json(tmp_path / "student.stale-1" / "result.json")["params"] == 39760
  # Unfinished with the same inputs: resumed in place (here at its last step), nothing set aside.
  (tmp_path / "student" / "result.json").unlink()
  resumed = subrun(tmp_path)
  assert {k: v for k, v in resumed.items() if k != "train_seconds"} == {
    k: v for k, v in result.items() if k != "train_seconds"
  }
  assert "moved it" not in capsys.readouterr().out
  # Unfinished with other inputs: set aside, under the next free number.
  (tmp_path / "student" / "result.json").unlink()
  recorded = common.read_json(tmp_path / "student" / "inputs.json")
  recorded["inputs"]["seed"], recorded["fingerprint"] = 7, "0" * 32
  common.write_json(tmp_path / "student" / "inputs.json", recorded)
  subrun(tmp_path)
  out = capsys.readouterr().out
  assert f"student: an unfinished run of other inputs; moved it to {tmp_path / 'student.stale-2'}" in out
  assert "changed seed: 7 -> 0" in out
  assert (tmp_path / "student.stale-2" / "checkpoints").is_dir()


def inputs(**overrides):
  return make_subrun(**overrides).description


def test_subrun_inputs_see_every_input_that_changes_a_run():
  teacher = MLP(hidden_sizes=(5,), num_classes=4)
  variables = jax.tree.map(np.asarray, teacher.init(jax.random.key(0), np.zeros((1, 6, 6, 1), np.float32)))
  logits = np.random.default_rng(0).normal(size=(len(TRAIN), 4)).astype(np.float32)
  online = {"teacher_apply_fn": teacher.apply, "teacher_variables": variables, "temperature": 2.0}
  offline = {"teacher_logits": logits, "temperature": 2.0, "alpha": 0.9}
  changes = {  # (the run, the same run changed) -> the key that tells them apart
    "model.hidden_sizes": ({}, {"model": MLP(hidden_sizes=(3,), num_classes=4)}),
    "learning_rate": ({}, {"learning_rate": 3e-3}),
    "seed": ({}, {"seed": 1}),
    "num_epochs": ({}, {"num_epochs": 2.0}),
    "batch_size": ({}, {"batch_size": 8}),
    "mean": ({}, {"mean": 0.4}),
    "max_translation": ({}, {"max_translation": 2}),
    "train_set": ({}, {"train_set": tiny_set(seed=5)}),
    "eval_sets": ({}, {"eval_sets": {"test": tiny_set(16, seed=1, split="test")}}),
    "config": ({}, {"config": ml_collections.ConfigDict({"student_lr": 2e-3})}),
    "teacher_logits_sha256": (offline, offline | {"teacher_logits": logits + 1.0}),
    "temperature": (offline, offline | {"temperature": 4.0}),
    "alpha": (offline, offline | {"alpha": 0.5}),
    "teacher_checkpoint": (
      offline | {"meta": {"teacher": {"fingerprint": "a"}}},
      offline | {"meta": {"teacher": {"fingerprint": "b"}}},
    ),
    "teacher": (online, online | {"teacher_variables": jax.tree.map(lambda x: x + 1.0, variables)}),
    "method": ({}, {"method": jaxkd.Objective([jaxkd.methods.cross_entropy(weight=0.5)])}),
    "std": ({}, {"std": 0.3}),
    "weight_decay": ({}, {"weight_decay": 1e-4}),
    "loss_fn": (offline, offline | {"loss_fn": jaxkd.losses.dkd_loss}),
    "augment": ({}, {"augment": augment.mixup(alpha=0.2)}),
    "curve_every": ({}, {"curve_every": 0.5}),
    "teacher.apply_fn": (online, online | {"teacher_apply_fn": MLP(hidden_sizes=(6,), num_classes=4).apply}),
  }
  changed_fields = set()
  for key, (before, after) in changes.items():
    old, new = inputs(**before), inputs(**after)
    differing = {k for k in old if old[k] != new[k]}
    assert differing == {key.split(".")[0]}, (key, differing)
    # One value: the fingerprint is the description's, so a changed description is a changed fingerprint.
    assert make_subrun(**before).fingerprint != make_subrun(**after).fingerprint, key
    assert make_subrun(**before) != make_subrun(**after), key
    changed_fields |= {field for field in after if after.get(field) is not before.get(field)}
  # Every field of a SubRun is among those changed above: none can change a run without changing its fingerprint.
  assert changed_fields == {field.name for field in dataclasses.fields(common.SubRun)}
  # Equal inputs, made anew: equal descriptions; temperature and alpha do not count without a teacher.
  assert inputs() == inputs(model=MLP(hidden_sizes=(8,), num_classes=4), temperature=3.0, alpha=0.1)
  assert json.loads(json.dumps(inputs(**online))) == inputs(**online)  # what the file holds is what is compared
  equal = make_subrun(model=MLP(hidden_sizes=(8,), num_classes=4), temperature=3.0)
  assert equal == make_subrun() and equal.fingerprint == make_subrun().fingerprint
  assert hash(equal) == hash(make_subrun()) and len(equal.fingerprint) == 32


def test_an_equal_subrun_reuses_the_finished_result(tmp_path, capsys):
  first = common.train_subrun(tmp_path, "student", make_subrun(), placement="single")
  log = (tmp_path / "student" / "metrics.jsonl").read_text()
  again = make_subrun(model=MLP(hidden_sizes=(8,), num_classes=4))  # made anew, equal
  assert common.train_subrun(tmp_path, "student", again, placement="single") == first
  assert (tmp_path / "student" / "metrics.jsonl").read_text() == log  # not trained again
  assert "moved it" not in capsys.readouterr().out
  assert (
    first["fingerprint"] == again.fingerprint == common.read_json(tmp_path / "student" / "inputs.json")["fingerprint"]
  )


def test_main_refuses_a_flag_given_twice(tmp_path):
  """absl appends a repeated tuple flag ((4, 8) then (8, 16) trained (4, 8, 8, 16)) and keeps a scalar's last."""

  def get_config():
    return ml_collections.ConfigDict({"quick": False, "features": (4, 8), "lr": 0.1})

  def run(config, workdir):
    return config.features, config.lr

  argv = ["prog", f"--workdir={tmp_path}", "--config.features=(4, 8)", "--config.features=(8, 16)"]
  with pytest.raises(SystemExit, match=r"--config.features is given twice"):
    common.main(get_config, run, argv)
  with pytest.raises(SystemExit, match=r"--config.lr is given twice"):
    common.main(get_config, run, ["prog", f"--workdir={tmp_path}", "--config.lr=1", "--config.lr", "2"])
  assert common.main(get_config, run, ["prog", f"--workdir={tmp_path}", "--config.features=(8, 16)"]) == ((8, 16), 0.1)


def test_synthetic_refuses_steps_below_one(tmp_path, capsys):
  from experiments import synthetic

  for steps in ("-5", "0"):
    with pytest.raises(SystemExit):
      synthetic.main(["--workdir", str(tmp_path / "syn"), "--steps", steps])
    assert "--steps must be >= 1" in capsys.readouterr().err
  assert not (tmp_path / "syn" / "results.json").exists()
