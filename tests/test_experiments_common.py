"""The experiment machinery: command line, table builder, plot writers, logging, model costs."""

import ml_collections
import numpy as np
import pytest

from experiments import common
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
  variables = model.init(__import__("jax").random.key(0), x)
  flops = common.flops_per_example(model.apply, variables, x)
  # Two matmuls dominate: 2*784*100 + 2*100*10 multiply-adds; XLA adds biases and the ReLU.
  assert 2 * (784 * 100 + 100 * 10) <= flops <= 1.1 * 2 * (784 * 100 + 100 * 10)
  latency = common.inference_latency(model.apply, variables, x, batch_size=4, repeats=5)
  assert 0 < latency < 1.0
