"""Shared machinery for experiment modules: command line, config checks, sub-runs, tables, plots, model costs.

Every experiment module defines ``get_config()`` and ``run(config, workdir)``, and ends
with ``if __name__ == "__main__": common.main(get_config, run)``, which gives it the
command line ``python -m experiments.NAME --workdir DIR [--config.KEY=VALUE ...]``.
``run`` starts with :func:`check_config`, so a bad value stops it before anything trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import pathlib
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxkd.training.metrics import to_python as _to_python

__all__ = [
  "ConfigError",
  "Rule",
  "check_config",
  "main",
  "markdown_table",
  "mean_std",
  "one_of",
  "read_json",
  "resolve_quick",
  "sequence_of",
  "subconfig",
  "subrun_inputs",
  "train_subrun",
  "write_json",
]

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
  if workdir.exists() and not workdir.is_dir():
    raise SystemExit(
      f"{argv[0]}: --workdir {workdir} is a file, not a directory; pass a directory (it is created if missing)."
    )
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a file on the path above it, no permission, a read-only disk
    raise SystemExit(f"{argv[0]}: cannot create --workdir {workdir} ({type(e).__name__}: {e}).") from e
  try:
    return run(config, workdir)
  except ConfigError as e:  # raised before any training: the message is all the user needs, not a traceback
    raise SystemExit(f"{argv[0]}: {e}") from e


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


# ---------------------------------------------------------------- config checks


class ConfigError(ValueError):
  """Config values that cannot work, all named in one message; raised before anything trains."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a config value must be: ``test(value)`` is True when it is, ``requirement`` says it in words."""

  requirement: str
  test: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_placement(value: Any) -> bool:
  from jaxkd.placement import as_placement

  try:
    as_placement(value)
  except (TypeError, ValueError):
    return False
  return True


POSITIVE = Rule("a number > 0", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE = Rule("a number >= 0", lambda v: _is_number(v) and v >= 0)
FRACTION = Rule("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1)
DROPOUT = Rule("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)
POSITIVE_INT = Rule("an int >= 1", lambda v: _is_int(v) and v >= 1)
NON_NEGATIVE_INT = Rule("an int >= 0", lambda v: _is_int(v) and v >= 0)
SUBSET = Rule("an int >= 0 (0: all)", NON_NEGATIVE_INT.test)
NAME = Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v))
BOOL = Rule("True or False", lambda v: isinstance(v, bool))
PLACEMENT = Rule("'single', 'pmap', 'data_parallel' or 'shard_map'", _is_placement)


def sequence_of(rule: Rule, *, allow_empty: bool = False) -> Rule:
  """A tuple or list (non-empty unless ``allow_empty``) whose every item passes ``rule``; never a string."""
  return Rule(
    f"a {'' if allow_empty else 'non-empty '}sequence, each {rule.requirement}, e.g. '(1, 2)'",
    lambda v: isinstance(v, (tuple, list)) and (allow_empty or len(v) > 0) and all(rule.test(x) for x in v),
  )


def one_of(choices: Iterable[Any]) -> Rule:
  choices = tuple(choices)
  return Rule(f"one of {list(choices)}", lambda v: v in choices)


# The keys load_splits reads; every experiment has them.
DATA_RULES: Mapping[str, Rule] = {
  "dataset": NAME,
  "validation_size": POSITIVE_INT,
  "train_subset": SUBSET,
  "test_subset": SUBSET,
  "batch_size": POSITIVE_INT,
  "placement": PLACEMENT,
}
# The data keys every sub-run depends on (data_dir and source_dir say where the data is, not what it is).
DATA_KEYS = ("dataset", "validation_size", "train_subset", "test_subset", "batch_size")


def check_config(config: ml_collections.ConfigDict, rules: Mapping[str, Rule]) -> None:
  """Checks each key of ``config`` that ``rules`` names (a rule for an absent key is skipped).

  Raises:
    ConfigError: naming every key that breaks its rule, its value and what it must be.
  """
  problems = [
    f"{key}={config[key]!r} must be {rule.requirement}"
    for key, rule in rules.items()
    if key in config and not rule.test(config[key])
  ]
  if problems:
    raise ConfigError(f"invalid config: {'; '.join(problems)}. Fix it on the command line with --config.KEY=VALUE.")


def subconfig(config: ml_collections.ConfigDict, keys: Iterable[str]) -> ml_collections.ConfigDict:
  """The entries of ``config`` that one sub-run depends on: its fingerprint, and the config its checkpoints keep.

  Only those: a sweep's other values or a plot setting changing must not make a finished teacher stale.
  """
  return ml_collections.ConfigDict({key: config[key] for key in keys if key in config})


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


def paired_difference(values: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
  """Per-seed differences ``values[i] - reference[i]`` (the same seed's runs), their mean, std and a verdict.

  Runs of one seed share initialisation and data order, so their difference removes most of the seed-to-seed
  variation that an unpaired mean ± std comparison would count twice. The verdict is ``'above'`` or ``'below'``
  when every seed's difference has the same sign and the mean difference exceeds the differences' own standard
  deviation, ``'tie'`` otherwise, and ``None`` for a single seed (no spread to compare with).
  """
  if len(values) != len(reference) or not values:
    raise ValueError(
      f"paired_difference needs one value per seed on both sides, got {len(values)} and {len(reference)}"
    )
  differences = [float(v) - float(r) for v, r in zip(values, reference, strict=True)]
  stats = mean_std(differences)
  verdict = None
  if len(differences) > 1:
    same_sign = all(d > 0 for d in differences) or all(d < 0 for d in differences)
    beyond = same_sign and abs(stats["mean"]) > stats["std"]
    verdict = ("above" if stats["mean"] > 0 else "below") if beyond else "tie"
  return {**stats, "differences": differences, "verdict": verdict}


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
  from jaxkd.data.datasets import NORMALIZATION

  if dataset not in NORMALIZATION:
    return 0.5, 0.25
  (mean,), (std,) = NORMALIZATION[dataset]
  return mean, std


def load_splits(config: ml_collections.ConfigDict):
  """``(fit, validation, test)`` ArrayDatasets: validation is the last ``config.validation_size`` training examples.

  ``config.train_subset`` (when > 0) keeps a deterministic random subset of the fit split.
  """
  from jaxkd import data as data_lib
  from jaxkd.data import datasets

  kwargs = {"data_dir": config.data_dir or None, "source_dir": config.source_dir or None}
  num_train = len(datasets.load_data_source(config.dataset, "train", **kwargs))
  # A validation_size past the split would slice from the end (train[:-5]) and quietly shrink the fit split.
  if not 0 < config.validation_size < num_train:
    raise ConfigError(
      f"validation_size={config.validation_size} must leave examples to train on: {config.dataset!r} has "
      f"{num_train} training examples, so use 1 to {num_train - 1}."
    )
  num_fit = num_train - config.validation_size
  if config.train_subset > num_fit:
    raise ConfigError(
      f"train_subset={config.train_subset} is more than the {num_fit} training examples left after "
      f"validation_size={config.validation_size}; use at most {num_fit} (0: all of them)."
    )
  fit_set = datasets.load(config.dataset, f"train[:{num_fit}]", **kwargs)
  val_set = datasets.load(config.dataset, f"train[{num_fit}:]", **kwargs)
  test_set = datasets.load(config.dataset, "test", **kwargs)
  if config.get("test_subset", 0) > len(test_set):
    raise ConfigError(
      f"test_subset={config.test_subset} is more than the {len(test_set)} test examples; use at most "
      f"{len(test_set)} (0: all of them)."
    )
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
  from jaxkd.training import evaluation

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
  augment: Callable | None = None,
  curve_every: float = 0.0,
) -> dict[str, Any]:
  """Trains one model (teacher, scratch student or distilled student) in ``workdir/name``; resumable.

  ``workdir/name/inputs.json`` records everything that determines the sub-run (see
  :func:`subrun_inputs`) and its fingerprint, which ``result.json`` repeats. On a rerun
  a finished sub-run with the same fingerprint is reused and an unfinished one resumes
  from its last checkpoint; one with other inputs (or from before fingerprints) is
  moved aside to ``workdir/name.stale-N``, with a message naming what changed, and
  trained again from scratch, so that no result mixes two settings. The
  student learns online from ``teacher_apply_fn`` (on the same augmented batch), or
  offline from ``teacher_logits`` (rows aligned with ``train_set``), or from labels
  alone when neither is given. With a :class:`jaxkd.Objective` as ``method`` it
  learns online from ``teacher_apply_fn`` by that method's loss terms (``loss_fn``,
  ``alpha`` unused; batches carry ``'index'``, whose largest value sets the number of
  rows of per-example term state such as CRD's memory bank); ``params`` then counts
  the student alone, without its adapters. ``augment`` (:mod:`jaxkd.augment`) runs inside
  the step, once, so a live teacher sees exactly the student's augmented view.
  ``curve_every = E > 0`` also evaluates every eval set every E epochs of training (a
  learning curve; training itself is unchanged).

  Returns:
    ``result.json``'s content: ``{split}_accuracy`` and ``{split}_errors`` per eval set,
    ``num_steps``, ``train_seconds``, ``params`` and the inputs' ``fingerprint``; with
    ``curve_every``, ``curve``: ``[{"epoch", "{split}_accuracy", "{split}_errors"}, ...]``.
  """
  # First, while the arguments are the only locals. A new argument must be added to subrun_inputs (or here to
  # _NOT_INPUTS), or this raises TypeError: nothing that changes a sub-run may escape its fingerprint.
  inputs = subrun_inputs(**{key: value for key, value in locals().items() if key not in _NOT_INPUTS})
  import optax

  from jaxkd import data as data_lib
  from jaxkd import state as state_lib
  from jaxkd import train as train_lib
  from jaxkd.placement import as_placement
  from jaxkd.training import loop as trainer

  placement = as_placement(placement)
  fingerprint = inputs_fingerprint(inputs)
  run_dir = workdir / name
  result_path = run_dir / "result.json"
  finished = finished_or_set_aside(run_dir, name, fingerprint, inputs)
  if finished is not None:
    return finished
  run_dir.mkdir(parents=True, exist_ok=True)
  write_json(run_dir / INPUTS_FILE, {"fingerprint": fingerprint, "inputs": inputs})

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
    augment=augment,
  )
  curve_steps = max(1, int(round(curve_every * steps_per_epoch))) if curve_every > 0 else 0
  # One eval step for the curve's points and the final evaluation: a new one would compile again each time.
  eval_step = train_lib.make_eval_step(placement=placement)

  def eval_fn(state):
    metrics = _evaluate_splits(eval_step, state, eval_sets, mean=mean, std=std)
    return {key: value for key, value in metrics.items() if key != "params"}

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
    eval_fn=eval_fn if curve_steps else None,
    eval_every=curve_steps,
  )
  if result.preempted:
    raise SystemExit(143)
  train_seconds = time.perf_counter() - start
  out = {"fingerprint": fingerprint, "num_steps": num_steps, "train_seconds": train_seconds}
  out |= _evaluate_splits(eval_step, result.state, eval_sets, mean=mean, std=std)
  if curve_steps:
    out["curve"] = learning_curve(run_dir / "metrics.jsonl", steps_per_epoch)
  write_json(result_path, out)
  return out


def learning_curve(metrics_path: pathlib.Path, steps_per_epoch: int) -> list[dict[str, float]]:
  """The ``eval_`` entries of a sub-run's ``metrics.jsonl`` by epoch; a step logged twice (a resumed run
  evaluates its last step again) keeps its last entry."""
  by_step: dict[int, dict[str, float]] = {}
  for line in metrics_path.read_text().splitlines():
    record = json.loads(line)
    evals = {key.removeprefix("eval_"): value for key, value in record.items() if key.startswith("eval_")}
    if evals:
      by_step[int(record["step"])] = evals
  return [{"epoch": step / steps_per_epoch, **by_step[step]} for step in sorted(by_step)]


def _evaluate_splits(eval_step: Callable, state: Any, eval_sets: Mapping[str, Any], *, mean: Any, std: Any) -> dict:
  """``{split}_accuracy`` and ``{split}_errors`` per eval set, and the student's ``params``."""
  from jaxkd.models import count_params

  out: dict[str, Any] = {}
  for split, dataset in eval_sets.items():
    metrics = evaluate(eval_step, state, None, dataset, batch_size=1000, mean=mean, std=std)
    out[f"{split}_accuracy"] = metrics["accuracy"]
    out[f"{split}_errors"] = int(round((1.0 - metrics["accuracy"]) * metrics["count"]))
  out["params"] = count_params(state.params)  # the student alone: adapters live in state.adapters
  return out


INPUTS_FILE = "inputs.json"
# train_subrun's arguments that say where a sub-run lives, runs and saves, not what it computes.
_NOT_INPUTS = ("workdir", "name", "placement", "checkpoint_every")


def subrun_inputs(
  *,
  model: Any,
  train_set: Any,
  eval_sets: Mapping[str, Any],
  num_epochs: float,
  batch_size: int,
  learning_rate: float,
  seed: int,
  mean: Any,
  std: Any,
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
  method: Any = None,
  augment: Callable | None = None,
  curve_every: float = 0.0,
) -> dict[str, Any]:
  """What determines a :func:`train_subrun` (its arguments but the placement and checkpoint interval), as JSON.

  Models, functions and methods are described by :func:`jaxkd.logit_cache.describe` (a Flax module by its
  fields), datasets and teacher logits by a hash of their contents, the teacher's variables by
  :func:`jaxkd.utils.tree_fingerprint`. Temperature, alpha and the loss only count where a teacher is.
  """
  from jaxkd.artifacts import tree_fingerprint

  distilled = teacher_apply_fn is not None or teacher_logits is not None
  teacher = None
  if teacher_apply_fn is not None:
    teacher = {"apply_fn": _describe(teacher_apply_fn), "variables_sha256": tree_fingerprint(teacher_variables)}
  recorded_teacher = (meta or {}).get("teacher")
  inputs = {
    "model": _describe_model(model),
    "train_set": _describe_dataset(train_set),
    "eval_sets": {split: _describe_dataset(dataset) for split, dataset in eval_sets.items()},
    "num_epochs": float(num_epochs),
    "batch_size": int(batch_size),
    "learning_rate": float(learning_rate),
    "seed": int(seed),
    "mean": np.asarray(mean, np.float64).reshape(-1).tolist(),
    "std": np.asarray(std, np.float64).reshape(-1).tolist(),
    "max_translation": int(max_translation),
    "weight_decay": float(weight_decay),
    "teacher": teacher,
    "teacher_logits_sha256": _array_digest(teacher_logits) if teacher_logits is not None else None,
    "teacher_checkpoint": recorded_teacher.get("fingerprint") if isinstance(recorded_teacher, Mapping) else None,
    "temperature": float(temperature) if distilled else None,
    "alpha": float(alpha) if distilled and method is None else None,
    "loss_fn": _describe(loss_fn) if distilled and loss_fn is not None else None,
    "method": _describe(method) if method is not None else None,
    "config": config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config,
  }
  # Only when set, so that the fingerprints of runs made before these arguments existed stay valid.
  if augment is not None:
    inputs["augment"] = _describe(augment)
  if curve_every:
    inputs["curve_every"] = float(curve_every)
  # One JSON round trip: tuples become lists, so what is compared is what the file holds.
  return json.loads(json.dumps(inputs, sort_keys=True, default=_to_python))


def inputs_fingerprint(inputs: Mapping[str, Any]) -> str:
  """The SHA-256 (first 32 hex digits) of a sub-run's JSON inputs: what decides whether a finished run is reused."""
  return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def _describe(value: Any) -> str:
  from jaxkd.data.logit_cache import describe

  try:
    return describe(value)
  except ValueError:
    # Undescribable parts (an object whose repr is its address) only weaken the check; the address would break it.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def _describe_model(model: Any) -> dict[str, str]:
  """A Flax module field by field, so that a changed hyperparameter is named as such."""
  if not dataclasses.is_dataclass(model):
    return {"model": _describe(model)}
  fields = [f.name for f in dataclasses.fields(model) if f.name not in ("parent", "name")]
  return {"class": f"{type(model).__module__}.{type(model).__qualname__}"} | {
    name: _describe(getattr(model, name)) for name in fields
  }


def _array_digest(*arrays: Any) -> str:
  digest = hashlib.blake2b(digest_size=16)
  for array in arrays:
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.data)
  return digest.hexdigest()


def _describe_dataset(dataset: Any) -> dict[str, Any]:
  return {
    "name": dataset.name,
    "split": dataset.split,
    "filters": list(dataset.filters),
    "examples": len(dataset),
    "blake2b": _array_digest(dataset.images, dataset.labels, dataset.indices),
  }


def finished_or_set_aside(
  run_dir: pathlib.Path, name: str, fingerprint: str, inputs: Mapping[str, Any]
) -> dict[str, Any] | None:
  """A finished sub-run's result when its fingerprint is ``fingerprint``; else None, after moving a stale one aside.

  An unfinished sub-run with this fingerprint stays where it is, to resume.
  """
  if not run_dir.is_dir():
    return None
  recorded = _read_dict(run_dir / INPUTS_FILE)
  result = _read_dict(run_dir / "result.json")
  if result is not None and result.get("fingerprint") == fingerprint:
    return result
  if result is not None:
    fingerprinted = "fingerprint" in result
    why = "finished with other inputs" if fingerprinted else "finished before sub-runs recorded their inputs"
  elif (run_dir / "result.json").exists():
    why = "its result.json is unreadable"
  elif (recorded is not None and recorded.get("fingerprint") == fingerprint) or not any(run_dir.iterdir()):
    return None
  else:
    why = "an unfinished run of other inputs" if recorded is not None else "an unfinished run without recorded inputs"
  stale = _stale_path(run_dir)
  run_dir.rename(stale)
  lines = [f"{name}: {why}; moved it to {stale} and training it again from scratch."]
  if recorded is not None and isinstance(recorded.get("inputs"), Mapping):
    lines += [f"  changed {key}: {old} -> {new}" for key, (old, new) in _changes(recorded["inputs"], inputs).items()]
  print("\n".join(lines), flush=True)
  return None


def _read_dict(path: pathlib.Path) -> dict[str, Any] | None:
  """The JSON object in ``path``; None when it is missing (an older sub-run) or unreadable (half-written)."""
  try:
    value = read_json(path)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def _stale_path(run_dir: pathlib.Path) -> pathlib.Path:
  n = 1
  while run_dir.with_name(f"{run_dir.name}.stale-{n}").exists():
    n += 1
  return run_dir.with_name(f"{run_dir.name}.stale-{n}")


def _changes(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[str, str]]:
  """``{'dotted.key': (old, new)}`` for each leaf that differs, values shortened for printing."""
  if isinstance(old, Mapping) and isinstance(new, Mapping):
    changes = {}
    for key in sorted(set(old) | set(new)):
      changes |= _changes(old.get(key, "(absent)"), new.get(key, "(absent)"), f"{prefix}.{key}" if prefix else key)
    return changes
  if old == new:
    return {}

  def short(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 100 else text[:97] + "..."

  return {prefix or "(all)": (short(old), short(new))}


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
  from jaxkd.training import checkpoint as ckpt

  return ckpt.load_variables(workdir / name / "checkpoints")
