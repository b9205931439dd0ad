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

from jaxkd.metrics import to_python as _to_python

__all__ = ["main", "resolve_quick", "write_json", "read_json", "mean_std", "markdown_table"]

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
  """A GitHub-markdown table; floats get 4 decimals (1 from 100 up), mean/std dicts print as ``m ± s``."""
  if not rows:
    raise ValueError("markdown_table needs at least one row")
  columns = list(columns or rows[0].keys())

  def number(value: float, like: float) -> str:
    # Decimals follow the magnitude of ``like``, so a mean and its std print alike.
    if math.isnan(value):
      return "nan"
    if abs(like) >= 1e6 or (like != 0 and abs(like) < 1e-3):
      return f"{value:.4g}"
    return f"{value:.1f}" if abs(like) >= 100 else f"{value:.4f}"

  def cell(value: Any) -> str:
    if isinstance(value, Mapping) and "mean" in value:
      return f"{number(value['mean'], value['mean'])} ± {number(value['std'], value['mean'])}"
    if isinstance(value, float):
      return number(value, value)
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
  for i, (name, y) in enumerate((hlines or {}).items()):
    ax.axhline(y, linestyle="--", linewidth=1, label=name, color=f"C{i + 1}")  # C0 is the bars' colour
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


# ---------------------------------------------------------------- data


def pixel_stats(dataset: str) -> tuple[float, float]:
  """Mean and standard deviation of pixel / 255 for one-channel datasets (jaxkd.datasets.NORMALIZATION)."""
  from jaxkd.datasets import NORMALIZATION

  if dataset not in NORMALIZATION:
    return 0.5, 0.25
  (mean,), (std,) = NORMALIZATION[dataset]
  return mean, std


def load_splits(config: ml_collections.ConfigDict):
  """``(fit, validation, test)`` ArrayDatasets: validation is the last ``config.validation_size`` training examples.

  ``config.train_subset`` (when > 0) keeps a deterministic random subset of the fit split.
  """
  from jaxkd import data as data_lib
  from jaxkd import datasets

  kwargs = {"data_dir": config.data_dir or None, "source_dir": config.source_dir or None}
  num_fit = len(datasets.load_data_source(config.dataset, "train", **kwargs)) - config.validation_size
  fit_set = datasets.load(config.dataset, f"train[:{num_fit}]", **kwargs)
  val_set = datasets.load(config.dataset, f"train[{num_fit}:]", **kwargs)
  test_set = datasets.load(config.dataset, "test", **kwargs)
  if config.get("test_subset"):
    test_set = data_lib.transfer_set(test_set, num_examples=config.test_subset, seed=0)
  if config.train_subset:
    fit_set = data_lib.transfer_set(fit_set, num_examples=config.train_subset, seed=0)
  return fit_set, val_set, test_set


# ---------------------------------------------------------------- sub-runs


def evaluate(
  eval_step: Callable,
  state: Any,
  teacher_variables: Any,
  dataset: Any,
  *,
  batch_size: int,
  mean: float,
  std: float,
  teacher_logits: np.ndarray | None = None,
) -> dict[str, float]:
  """Student (and teacher) metrics over a whole split, each example counted once."""
  from jaxkd import data as data_lib
  from jaxkd import evaluation

  iterator = data_lib.BatchIterator(
    dataset, batch_size=batch_size, train=False, mean=mean, std=std, teacher_logits=teacher_logits
  )
  return evaluation.evaluate(eval_step, state, teacher_variables, iterator)


def train_subrun(
  workdir: pathlib.Path,
  name: str,
  *,
  model: Any,
  train_set: Any,
  eval_sets: Mapping[str, Any],
  num_epochs: float,
  batch_size: int,
  learning_rate: float,
  seed: int,
  mean: float,
  std: float,
  placement: Any = "pmap",
  teacher_apply_fn: Callable | None = None,
  teacher_variables: Any = None,
  teacher_logits: np.ndarray | None = None,
  temperature: float = 1.0,
  alpha: float = 0.5,
  loss_fn: Callable | None = None,
  max_translation: int = 0,
  weight_decay: float = 0.0,
  config: Any = None,
  meta: Mapping[str, Any] | None = None,
  checkpoint_every: int = 500,
  method: Any = None,
) -> dict[str, Any]:
  """Trains one model (teacher, scratch student or distilled student) in ``workdir/name``; resumable.

  A finished sub-run has ``workdir/name/result.json`` and is skipped when the
  experiment is rerun; an unfinished one resumes from its last checkpoint. The
  student learns online from ``teacher_apply_fn`` (on the same augmented batch), or
  offline from ``teacher_logits`` (rows aligned with ``train_set``), or from labels
  alone when neither is given. With a :class:`jaxkd.Objective` as ``method`` it
  learns online from ``teacher_apply_fn`` by that method's loss terms (``loss_fn``,
  ``alpha`` unused; batches carry ``'index'``, whose largest value sets the number of
  rows of per-example term state such as CRD's memory bank); ``params`` then counts
  the student alone, without its adapters.

  Returns:
    ``result.json``'s content: ``{split}_accuracy`` and ``{split}_errors`` per eval set,
    ``num_steps``, ``train_seconds`` and ``params``.
  """
  import optax

  from jaxkd import data as data_lib
  from jaxkd import state as state_lib
  from jaxkd import train as train_lib
  from jaxkd import trainer
  from jaxkd.placement import as_placement

  placement = as_placement(placement)
  run_dir = workdir / name
  result_path = run_dir / "result.json"
  if result_path.exists():
    return read_json(result_path)
  run_dir.mkdir(parents=True, exist_ok=True)

  def make_iterator():
    return data_lib.BatchIterator(
      train_set,
      batch_size=batch_size,
      train=True,
      seed=seed,
      mean=mean,
      std=std,
      max_translation=max_translation,
      teacher_logits=teacher_logits,
      include_index=method is not None,
    )

  steps_per_epoch = make_iterator().steps_per_epoch
  num_steps = max(1, int(round(num_epochs * steps_per_epoch)))
  schedule = optax.cosine_decay_schedule(learning_rate, num_steps)
  tx = optax.adamw(schedule, weight_decay=weight_decay) if weight_decay else optax.adam(schedule)
  example = np.zeros((1, *train_set.images.shape[1:]), np.float32)
  if method is None:
    state = state_lib.create_train_state(model, tx, example, rng=seed)
  else:
    state = state_lib.create_train_state(
      model,
      tx,
      example,
      rng=seed,
      objective=method,
      teacher=teacher_apply_fn,
      teacher_variables=teacher_variables,
      num_data=int(np.max(train_set.indices)) + 1,
    )
  train_step = train_lib.make_train_step(
    teacher_apply_fn=teacher_apply_fn,
    objective=method,
    loss_fn=loss_fn,
    temperature=temperature,
    alpha=alpha,
    placement=placement,
  )
  start = time.perf_counter()
  result = trainer.fit(
    state,
    train_step=train_step,
    train_data=_maybe_prefetch(make_iterator(), placement),
    num_steps=num_steps,
    teacher_variables=teacher_variables if teacher_apply_fn is not None else None,
    workdir=run_dir,
    checkpoint_every=checkpoint_every,
    log_every=min(100, num_steps),
    config=config,
    meta=meta,
    progress=name,
  )
  if result.preempted:
    raise SystemExit(143)
  train_seconds = time.perf_counter() - start
  eval_step = train_lib.make_eval_step(placement=placement)
  out: dict[str, Any] = {"num_steps": num_steps, "train_seconds": train_seconds}
  for split, dataset in eval_sets.items():
    metrics = evaluate(eval_step, result.state, None, dataset, batch_size=1000, mean=mean, std=std)
    out[f"{split}_accuracy"] = metrics["accuracy"]
    out[f"{split}_errors"] = int(round((1.0 - metrics["accuracy"]) * metrics["count"]))
  from jaxkd.models import count_params

  out["params"] = count_params(result.state.params)  # the student alone: adapters live in state.adapters
  write_json(result_path, out)
  return out


def _maybe_prefetch(iterator: Any, placement: Any) -> Any:
  """Prefetches to accelerators; on the CPU the extra copy of a background device_put costs more than it hides.

  Measured here (2 cores, epoch time over the held-batch step time, benchmarks/README.md item 5): for a
  784-100-10 student (0.7 ms steps) NumPy batches straight to the step 1.17, through
  :class:`jaxkd.data.DevicePrefetcher` 1.38; for 784-800-800-10 (6 ms steps) the other way round, 1.19 and 1.06.
  The prefetcher's thread costs most where steps are shortest, so the CPU default is the one without it.
  """
  from jaxkd import data as data_lib

  return iterator if jax.default_backend() == "cpu" else data_lib.DevicePrefetcher(iterator, placement=placement)


def load_subrun_variables(workdir: pathlib.Path, name: str) -> tuple[dict, dict]:
  """The final ``{'params', 'batch_stats'}`` of a finished sub-run and its provenance (path, step, fingerprint)."""
  from jaxkd import checkpoint as ckpt

  return ckpt.load_variables(workdir / name / "checkpoints")
