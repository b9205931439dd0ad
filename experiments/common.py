"""Shared machinery for experiment modules: command line, logging, tables, plots, model costs.

Every experiment module defines ``get_config()`` and ``run(config, workdir)``, and ends
with ``if __name__ == "__main__": common.main(get_config, run)``, which gives it the
command line ``python -m experiments.NAME --workdir DIR [--config.KEY=VALUE ...]``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

# ---------------------------------------------------------------- command line


def main(
  get_config: Callable[[], ml_collections.ConfigDict],
  run: Callable[[ml_collections.ConfigDict, pathlib.Path], Any],
  argv: Sequence[str] | None = None,
) -> Any:
  """Parses ``--workdir`` and ``--config.KEY=VALUE`` overrides, then calls ``run(config, workdir)``.

  ``--config.quick=True`` applies the module's ``config.quick_overrides`` to every
  field the command line did not set itself, so ``--config.quick=True
  --config.num_epochs=5`` keeps 5 epochs.
  """
  from absl import flags
  from ml_collections import config_flags

  argv = list(sys.argv if argv is None else argv)
  flag_values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.", flag_values=flag_values)
  # config_flags registers one flag per `--config.KEY` it finds in sys_argv, so it must see our argv.
  config_flags.DEFINE_config_dict("config", get_config(), flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  if flag_values.workdir is None:
    raise SystemExit(f"{argv[0]}: --workdir is required")
  config = resolve_quick(flag_values.config, argv)
  workdir = pathlib.Path(flag_values.workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  return run(config, workdir)


def resolve_quick(config: ml_collections.ConfigDict, argv: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies ``config.quick_overrides`` when ``config.quick``, except where the command line set a field."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not config.get("quick") or "quick_overrides" not in config:
    return config
  explicit = {arg.split("=", 1)[0][len("--config.") :] for arg in argv if arg.startswith("--config.")}
  for key, value in config.quick_overrides.items():
    if key not in explicit:
      config[key] = value
  return config


# ---------------------------------------------------------------- logging and results


class MetricsLogger:
  """Appends one JSON object per logged step to ``metrics.jsonl`` (line-buffered, survives a kill)."""

  def __init__(self, path: os.PathLike | str):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = self.path.open("a", buffering=1)

  def log(self, step: int, **metrics: Any) -> None:
    record = {"step": int(step), "time": time.time()}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record) + "\n")

  def close(self) -> None:
    self._file.close()


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


def write_json(path: os.PathLike | str, data: Any) -> None:
  """Writes atomically (temp file + rename) so a killed run never leaves half a file."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_to_python))
  tmp.replace(path)


def read_json(path: os.PathLike | str) -> Any:
  return json.loads(pathlib.Path(path).read_text())


def mean_std(values: Iterable[float]) -> dict[str, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  values = [float(v) for v in values]
  return {
    "mean": statistics.fmean(values),
    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    "n": len(values),
  }


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
  """A GitHub-markdown table; floats get 4 significant decimals, mean/std dicts print as ``m ± s``."""
  if not rows:
    raise ValueError("markdown_table needs at least one row")
  columns = list(columns or rows[0].keys())

  def cell(value: Any) -> str:
    if isinstance(value, Mapping) and "mean" in value:
      return f"{cell(value['mean'])} ± {cell(value['std'])}"
    if isinstance(value, float):
      if math.isnan(value):
        return "nan"
      return f"{value:.4g}" if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3) else f"{value:.4f}"
    return str(value)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def plot_lines(
  path: os.PathLike | str,
  series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
  *,
  xlabel: str,
  ylabel: str,
  title: str = "",
  logx: bool = False,
  hlines: Mapping[str, float] | None = None,
) -> None:
  """One line per named ``(x, y)`` series, saved as PNG with a non-interactive backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for name, (xs, ys) in series.items():
    ax.plot(xs, ys, marker="o", label=name)
  for name, y in (hlines or {}).items():
    ax.axhline(y, linestyle="--", linewidth=1, label=name, color="grey" if "scratch" in name else "black")
  if logx:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_bars(
  path: os.PathLike | str,
  values: Mapping[str, float],
  *,
  ylabel: str,
  title: str = "",
  errors: Mapping[str, float] | None = None,
  hlines: Mapping[str, float] | None = None,
) -> None:
  """A bar per named value (optional error bars and reference lines), saved as PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(values)
  fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 4))
  yerr = [errors.get(n, 0.0) for n in names] if errors else None
  ax.bar(names, [values[n] for n in names], yerr=yerr, capsize=3)
  for name, y in (hlines or {}).items():
    ax.axhline(y, linestyle="--", linewidth=1, label=name)
  lo = min(list(values.values()) + list((hlines or {}).values()))
  hi = max(list(values.values()) + list((hlines or {}).values()))
  ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if hlines:
    ax.legend()
  plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------- model costs


def flops_per_example(apply_fn: Callable, variables: Any, example_input: np.ndarray) -> float:
  """XLA's count of floating-point operations of one forward pass at batch 1."""
  compiled = jax.jit(apply_fn).lower(variables, example_input[:1]).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, Sequence):  # older JAX returned a list with one dict per device
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def inference_latency(
  apply_fn: Callable, variables: Any, example_input: np.ndarray, *, batch_size: int, repeats: int = 50
) -> float:
  """Median seconds of a jit-compiled forward pass at ``batch_size``, after warm-up."""
  inputs = jax.device_put(np.repeat(example_input[:1], batch_size, axis=0))
  forward = jax.jit(apply_fn)
  for _ in range(3):
    jax.block_until_ready(forward(variables, inputs))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(forward(variables, inputs))
    times.append(time.perf_counter() - start)
  return float(np.median(times))
