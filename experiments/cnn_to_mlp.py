"""Compression as a deployment sees it: a small CNN teacher distilled into an MLP many times smaller.

The main job of jaxkd's README. On Fashion-MNIST (Debian's ``dataset-fashion-mnist``,
found offline), it trains a CNN teacher, then an MLP student from scratch and the same
MLP distilled from the teacher's cached logits, with temperature and alpha chosen on
a validation split carved from the training set (never on the test set), over several
seeds. It reports, per model, test accuracy, parameters, FLOPs per example and
measured CPU inference latency at batch 1 and 256, and the fraction of the
scratch-to-teacher error gap that distillation closes.

It also trains function-matching students (Beyer et al. 2022): KD only, with the
teacher run online inside the step on the student's own mixup view, T chosen on
validation, beside a scratch student with the same mixup and epochs (the fair
baseline), with test and validation errors every ``curve_every`` epochs
(``patience.png``: the share of the gap closed against epochs). The gap is measured
against the better of the two scratch students.

Reproduce the full run (37 minutes measured on 2 CPU cores beside a test run, 2026-12-02; of which 15 minutes
are the three 60-epoch function-matching students, whose online teacher makes an epoch 7-8x a cached one):

  python -m experiments.cnn_to_mlp --workdir workdir/cnn_to_mlp

The quick variant (about 3 minutes; fewer epochs, one seed, a smaller sweep):

  python -m experiments.cnn_to_mlp --workdir workdir/cnn_to_mlp_quick --config.quick=True

Rerunning a command skips finished sub-runs and resumes unfinished ones from their
checkpoints, when their inputs (model, data, settings, teacher) are those of this run;
a sub-run whose inputs changed, say with ``--config.student_hidden="(50,)"``, is moved
aside to ``NAME.stale-N`` and trained again, and the changed inputs are printed.
Outputs in the workdir: ``results.json``, ``results.md``, ``sweep.png``,
``accuracy.png``, ``patience.png``, and per sub-run ``inputs.json``, ``metrics.jsonl`` and checkpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from collections.abc import Mapping

import ml_collections
import numpy as np

from experiments import common

# The config entries each sub-run depends on (its fingerprint and checkpoints keep these alone): a new sweep value
# or latency_repeats leaves the finished teacher and students valid. Seeds, T and alpha are explicit arguments.
TEACHER_KEYS = (
  *common.DATA_KEYS,
  "teacher_features",
  "teacher_dense",
  "teacher_dropout",
  "teacher_epochs",
  "teacher_lr",
)
STUDENT_KEYS = (*common.DATA_KEYS, "student_hidden", "student_epochs", "student_lr")
# Function matching and its scratch baseline: their epochs and T are explicit arguments.
FM_KEYS = (*common.DATA_KEYS, "student_hidden", "student_lr", "mixup_alpha")

RULES = {
  **common.DATA_RULES,
  "teacher_features": common.sequence_of(common.POSITIVE_INT),
  "teacher_dense": common.POSITIVE_INT,
  "teacher_dropout": common.DROPOUT,
  "teacher_epochs": common.POSITIVE,
  "teacher_lr": common.POSITIVE,
  "student_hidden": common.sequence_of(common.POSITIVE_INT, allow_empty=True),
  "student_epochs": common.POSITIVE,
  "student_lr": common.POSITIVE,
  "temperatures": common.sequence_of(common.POSITIVE),
  "alphas": common.sequence_of(common.FRACTION),
  "seeds": common.sequence_of(common.NON_NEGATIVE_INT),
  "latency_repeats": common.POSITIVE_INT,
  "function_matching": common.BOOL,
  "fm_epochs": common.POSITIVE,
  "fm_temperatures": common.sequence_of(common.POSITIVE),
  "fm_sweep_epochs": common.POSITIVE,
  "mixup_alpha": common.POSITIVE,
  "curve_every": common.POSITIVE,
}


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.dataset = "fashion_mnist"
  config.data_dir = ""  # tfds data dir; "" means tfds's default (~/tensorflow_datasets).
  config.source_dir = ""  # directory of IDX files; "" searches the default places.
  config.validation_size = 5000  # carved from the end of the training split, for choosing T and alpha.
  config.train_subset = 0  # 0: the whole remaining training split.
  config.test_subset = 0  # 0: the whole test split.
  config.batch_size = 128
  config.placement = "pmap"

  config.teacher_features = (32, 64)
  config.teacher_dense = 256
  config.teacher_dropout = 0.3
  config.teacher_epochs = 10.0
  config.teacher_lr = 1e-3

  config.student_hidden = (100,)
  config.student_epochs = 40.0
  config.student_lr = 1e-3

  # Chosen on the validation split with the first seed; the test split only reports.
  config.temperatures = (1.0, 2.0, 4.0)
  config.alphas = (0.5, 0.9)
  config.seeds = (0, 1, 2)

  # Function matching (Beyer et al. 2022, "a good teacher is patient and consistent"): KD only (alpha = 1) from the
  # teacher run online on the student's own mixup view (Beta(mixup_alpha) per example, computed inside the step),
  # for a long schedule, beside a scratch student trained with the same mixup and epochs (the fair baseline: or the
  # gain could be the augmentation's). T is chosen on the validation split with seed 0 at fm_sweep_epochs; the
  # learning curve (val and test errors every curve_every epochs) shows what patience buys.
  config.function_matching = True
  # CALIBRATION.md (one seed): 1026 errors at epoch 40 of a 100-epoch run, 1003 at 100, 972 at 300. 60 epochs fit
  # the 90-minute budget here with 3 seeds: an online step (the CNN teacher's forward) costs several scratch steps.
  config.fm_epochs = 60.0
  config.fm_temperatures = (1.0, 2.0)
  config.fm_sweep_epochs = 15.0
  config.mixup_alpha = 1.0
  config.curve_every = 10.0

  config.latency_repeats = 50
  config.quick = False
  config.quick_overrides = ml_collections.ConfigDict(
    {
      "train_subset": 10000,
      "teacher_epochs": 2.0,
      "student_epochs": 4.0,
      "temperatures": (1.0, 4.0),
      "alphas": (0.9,),
      "seeds": (0,),
      "latency_repeats": 10,
      "fm_epochs": 4.0,
      "fm_sweep_epochs": 2.0,
      "curve_every": 2.0,
    }
  )
  return config


@dataclasses.dataclass
class Runs:
  """Every sub-run's result of one cnn_to_mlp run: what the report is written from."""

  sizes: dict[str, int]  # examples in the fit, validation and test splits
  teacher: dict
  teacher_info: dict
  sweep: list[dict]
  best: dict
  scratch: list[dict]
  distilled: list[dict]
  fm: dict | None
  costs: dict[str, dict[str, float]]


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  common.check_config(config, RULES)
  return write_report(config, workdir, train_runs(config, workdir))


def train_runs(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Runs:
  """The teacher, the (T, alpha) sweep, every seed's scratch and distilled students, and function matching."""
  from jaxkd.data import logit_cache
  from jaxkd.models import CNN, MLP

  mean, std = common.pixel_stats(config.dataset)
  fit_set, val_set, test_set = common.load_splits(config)
  num_classes = fit_set.num_classes
  data = dict(
    train_set=fit_set, eval_sets={"val": val_set, "test": test_set}, batch_size=config.batch_size, mean=mean, std=std
  )
  print(f"transfer set: {len(fit_set)} examples; validation {len(val_set)}; test {len(test_set)}", flush=True)

  teacher = CNN(
    features=tuple(config.teacher_features),
    dense_size=config.teacher_dense,
    num_classes=num_classes,
    dropout_rate=config.teacher_dropout,
  )
  student = MLP(hidden_sizes=tuple(config.student_hidden), num_classes=num_classes)
  teacher_run = common.SubRun(
    model=teacher,
    num_epochs=config.teacher_epochs,
    learning_rate=config.teacher_lr,
    seed=0,
    config=common.subconfig(config, TEACHER_KEYS),
    **data,
  )
  teacher_result = common.train_subrun(workdir, "teacher", teacher_run, placement=config.placement)
  teacher_variables, teacher_info = common.load_subrun_variables(workdir, "teacher")
  # The transfer set is not augmented, so the teacher's logits are computed once and reused by every student.
  teacher_logits = logit_cache.cached_teacher_logits(
    teacher.apply, teacher_variables, fit_set, cache_dir=workdir / "cache", mean=mean, std=std
  )

  def student_run(name, seed, temperature=None, alpha=None):
    distil = temperature is not None
    student_subrun = common.SubRun(
      model=student,
      num_epochs=config.student_epochs,
      learning_rate=config.student_lr,
      seed=seed,
      teacher_logits=teacher_logits if distil else None,
      temperature=temperature or 1.0,
      alpha=alpha if distil else 0.5,
      meta={"teacher": teacher_info} if distil else None,
      config=common.subconfig(config, STUDENT_KEYS),
      **data,
    )
    return common.train_subrun(workdir, name, student_subrun, placement=config.placement)

  sweep = []
  for temperature, alpha in itertools.product(config.temperatures, config.alphas):
    result = student_run(f"sweep/T{temperature:g}_alpha{alpha:g}", config.seeds[0], temperature, alpha)
    sweep.append({"temperature": temperature, "alpha": alpha, "val_accuracy": result["val_accuracy"]})
  best = max(sweep, key=lambda row: row["val_accuracy"])

  scratch = [student_run(f"scratch/seed{seed}", seed) for seed in config.seeds]
  distilled = []
  for seed in config.seeds:
    # Seed 0's distilled student is the sweep's run with the chosen (T, alpha): the same inputs, so reused.
    first = seed == config.seeds[0]
    chosen = f"T{best['temperature']:g}_alpha{best['alpha']:g}"
    name = f"sweep/{chosen}" if first else f"distilled/{chosen}_seed{seed}"
    distilled.append(student_run(name, seed, best["temperature"], best["alpha"]))

  fm = None
  if config.function_matching:
    fm = function_matching(config, workdir, student, teacher, teacher_variables, teacher_info, data)
  sizes = {"fit": len(fit_set), "val": len(val_set), "test": len(test_set)}
  costs = model_costs(config, teacher, student, fit_set)
  return Runs(sizes, teacher_result, teacher_info, sweep, best, scratch, distilled, fm, costs)


def _row(model: str, runs: list[dict], costs: Mapping[str, float]) -> dict:
  return {
    "model": model,
    "test_accuracy": common.mean_std(r["test_accuracy"] for r in runs),
    "test_errors": common.mean_std(r["test_errors"] for r in runs),
    **costs,
  }


def report_rows(config: ml_collections.ConfigDict, runs: Runs) -> list[dict]:
  """The results table: the teacher, the scratch and distilled students, and the function-matching pair."""
  best, student_costs = runs.best, runs.costs["student"]
  teacher = {
    "model": "teacher (CNN)",
    "test_accuracy": runs.teacher["test_accuracy"],
    "test_errors": runs.teacher["test_errors"],
    **runs.costs["teacher"],
  }
  rows = [
    teacher,
    _row(f"student MLP{list(config.student_hidden)} from scratch", runs.scratch, student_costs),
    _row(f"student distilled (T={best['temperature']:g}, alpha={best['alpha']:g})", runs.distilled, student_costs),
  ]
  if runs.fm is not None:
    rows[2:2] = [
      _row(
        f"student, function matching (online teacher, mixup, T={runs.fm['temperature']:g}, "
        f"{config.fm_epochs:g} epochs)",
        runs.fm["distilled"],
        student_costs,
      ),
      _row(f"student from scratch, same mixup and {config.fm_epochs:g} epochs", runs.fm["scratch"], student_costs),
    ]
  return rows


def gap_closed(runs: Runs) -> float:
  """The share of the scratch-to-teacher test-accuracy gap the cached-logit students close (nan without a gap)."""
  scratch = common.mean_std(r["test_accuracy"] for r in runs.scratch)["mean"]
  distilled = common.mean_std(r["test_accuracy"] for r in runs.distilled)["mean"]
  gap = runs.teacher["test_accuracy"] - scratch
  return (distilled - scratch) / gap if gap > 0 else float("nan")


def write_report(config: ml_collections.ConfigDict, workdir: pathlib.Path, runs: Runs) -> dict:
  """``results.md``, ``results.json``, ``sweep.png`` and ``accuracy.png`` (and ``patience.png``) from the runs."""
  fm_report = function_matching_report(config, runs.fm, runs.teacher, runs.scratch, workdir) if runs.fm else None
  rows = report_rows(config, runs)
  columns = ["model", "test_accuracy", "test_errors", "params", "flops_per_example", "latency_b1_ms", "latency_b256_ms"]
  table = common.markdown_table(rows, columns)
  closed, costs = gap_closed(runs), runs.costs
  summary = (
    f"Dataset {config.dataset}, transfer set {runs.sizes['fit']} examples, {len(config.seeds)} seed(s). "
    f"T and alpha chosen on {runs.sizes['val']} validation examples. "
    f"Cached-logit distillation ({config.student_epochs:g} epochs) closes {closed:.1%} of the "
    "scratch-to-teacher accuracy gap. "
    f"The student has {costs['teacher']['params'] / costs['student']['params']:.1f}x fewer parameters and "
    f"{costs['teacher']['flops_per_example'] / costs['student']['flops_per_example']:.0f}x fewer FLOPs.\n"
    + (fm_report["summary"] if fm_report else "")
  )
  sweep_table = common.markdown_table(runs.sweep, ["temperature", "alpha", "val_accuracy"])
  (workdir / "results.md").write_text(
    f"# cnn_to_mlp\n\n{table}\n{summary}\n## Validation sweep (seed {config.seeds[0]})\n\n{sweep_table}"
  )
  results = {
    "config": config.to_dict(),
    "rows": rows,
    "sweep": runs.sweep,
    "best": runs.best,
    "gap_closed": closed,
    "teacher": runs.teacher,
    "scratch": runs.scratch,
    "distilled": runs.distilled,
    "teacher_checkpoint": runs.teacher_info,
    "function_matching": fm_report["results"] if fm_report else None,
  }
  common.write_json(workdir / "results.json", results)
  plot_results(config, workdir, runs)
  print(table + "\n" + summary, flush=True)
  return results


def plot_results(config: ml_collections.ConfigDict, workdir: pathlib.Path, runs: Runs) -> None:
  """``sweep.png`` (validation accuracy against T, a line per alpha) and ``accuracy.png`` (test accuracy bars)."""
  series = {}
  for alpha in config.alphas:
    points = [row for row in runs.sweep if row["alpha"] == alpha]
    series[f"alpha={alpha:g}"] = ([p["temperature"] for p in points], [p["val_accuracy"] for p in points])
  common.plot_lines(
    workdir / "sweep.png",
    series,
    xlabel="temperature T",
    ylabel="validation accuracy",
    title="Distilled MLP student: validation accuracy vs T",
    logx=True,
    hlines={"teacher": runs.teacher["val_accuracy"], "scratch": runs.scratch[0]["val_accuracy"]},
  )
  scratch_acc = common.mean_std(r["test_accuracy"] for r in runs.scratch)
  distilled_acc = common.mean_std(r["test_accuracy"] for r in runs.distilled)
  common.plot_bars(
    workdir / "accuracy.png",
    {"teacher": runs.teacher["test_accuracy"], "scratch": scratch_acc["mean"], "distilled": distilled_acc["mean"]},
    errors={"scratch": scratch_acc["std"], "distilled": distilled_acc["std"]},
    ylabel="test accuracy",
    title=f"{config.dataset}: CNN teacher -> MLP student",
  )


def function_matching(config, workdir, student, teacher, teacher_variables, teacher_info, data) -> dict:
  """The function-matching students (T chosen on validation, then every seed) and their mixup scratch baseline."""
  from jaxkd.data import augment

  mixup = augment.mixup(alpha=config.mixup_alpha)  # per example, p = 1: every image is mixed

  def fm_run(name, seed, num_epochs, temperature=None, curve=True):
    distil = temperature is not None
    fm_subrun = common.SubRun(
      model=student,
      num_epochs=num_epochs,
      learning_rate=config.student_lr,
      seed=seed,
      teacher_apply_fn=teacher.apply if distil else None,
      teacher_variables=teacher_variables if distil else None,
      temperature=temperature or 1.0,
      alpha=1.0 if distil else 0.5,  # function matching: the teacher's soft labels only
      augment=mixup,
      meta={"teacher": teacher_info} if distil else None,
      curve_every=config.curve_every if curve else 0.0,
      config=common.subconfig(config, FM_KEYS),
      **data,
    )
    return common.train_subrun(workdir, name, fm_subrun, placement=config.placement)

  sweep = []
  for temperature in config.fm_temperatures:
    result = fm_run(f"fm_sweep/T{temperature:g}", config.seeds[0], config.fm_sweep_epochs, temperature, curve=False)
    sweep.append({"temperature": temperature, "val_accuracy": result["val_accuracy"]})
  temperature = max(sweep, key=lambda row: row["val_accuracy"])["temperature"]
  name = f"function_matching/T{temperature:g}"
  distilled = [fm_run(f"{name}_seed{seed}", seed, config.fm_epochs, temperature) for seed in config.seeds]
  scratch = [fm_run(f"scratch_mixup/seed{seed}", seed, config.fm_epochs) for seed in config.seeds]
  return {"sweep": sweep, "temperature": temperature, "distilled": distilled, "scratch": scratch}


def _mean_curve(runs: list[dict], key: str) -> tuple[list[float], list[float]]:
  """Epochs and the mean over runs of ``key`` at each epoch every run evaluated."""
  epochs = sorted(set.intersection(*({point["epoch"] for point in run["curve"]} for run in runs)))
  means = [float(np.mean([p[key] for run in runs for p in run["curve"] if p["epoch"] == e])) for e in epochs]
  return epochs, means


def function_matching_report(config, fm, teacher_result, scratch, workdir) -> dict:
  """Gap closed by function matching against the stronger scratch baseline, its patience curve and plot."""
  teacher_errors = teacher_result["test_errors"]
  fm_errors = common.mean_std(r["test_errors"] for r in fm["distilled"])
  baselines = {
    f"scratch, {config.student_epochs:g} epochs, no augmentation": common.mean_std(r["test_errors"] for r in scratch),
    f"scratch, mixup, {config.fm_epochs:g} epochs": common.mean_std(r["test_errors"] for r in fm["scratch"]),
  }
  # The fair reference is the better scratch student: gains over a weaker one would be partly the baseline's loss.
  baseline_name = min(baselines, key=lambda name: baselines[name]["mean"])
  baseline = baselines[baseline_name]["mean"]
  gap = baseline - teacher_errors

  def closed(errors):
    return (baseline - errors) / gap if gap > 0 else float("nan")

  # None when the teacher is no better than scratch (tiny test runs): there is no gap to close.
  gap_closed = common.mean_std(closed(r["test_errors"]) for r in fm["distilled"]) if gap > 0 else None
  epochs, fm_curve = _mean_curve(fm["distilled"], "test_errors")
  scratch_epochs, scratch_curve = _mean_curve(fm["scratch"], "test_errors")
  curve = [{"epoch": e, "test_errors": m, "gap_closed": closed(m)} for e, m in zip(epochs, fm_curve, strict=True)]
  common.plot_lines(
    workdir / "patience.png",
    {
      f"function matching (T={fm['temperature']:g})": (epochs, [closed(m) for m in fm_curve]),
      "scratch, same mixup": (scratch_epochs, [closed(m) for m in scratch_curve]),
    },
    xlabel=f"training epochs (one run of {config.fm_epochs:g}, cosine schedule; mean of {len(config.seeds)} seeds)",
    ylabel=f"share of the gap closed (0: {baseline_name}; 1: teacher)",
    title="Patience: gap closed against epochs (test split)",
    hlines={"goal: half the gap": 0.5, "scratch reference": 0.0},
  )
  verdict = "more" if fm_errors["mean"] + fm_errors["std"] < baseline - baselines[baseline_name]["std"] else "NOT more"
  summary = (
    f"Function matching (KD only, teacher online on the same mixup view, T={fm['temperature']:g} chosen on "
    f"validation from {list(config.fm_temperatures)} at {config.fm_sweep_epochs:g} epochs, {config.fm_epochs:g} "
    f"epochs): {fm_errors['mean']:.1f} ± {fm_errors['std']:.1f} test errors against {baseline:.1f} for the "
    f"better scratch student ({baseline_name}; {verdict} than the seed spreads apart) and {teacher_errors} for "
    + (
      f"the teacher: it closes {gap_closed['mean']:.1%} ± {gap_closed['std']:.1%} of the scratch-to-teacher gap "
      "(goal 50%). Along the way: "
      if gap_closed is not None
      else "the teacher: the teacher is not better than scratch, so there is no gap to close. Along the way: "
    )
    + ", ".join(f"epoch {p['epoch']:g}: {p['gap_closed']:.0%}" for p in curve)
    + ".\n"
  )
  results = {
    "sweep": fm["sweep"],
    "temperature": fm["temperature"],
    "distilled": fm["distilled"],
    "scratch": fm["scratch"],
    "baselines": baselines,
    "baseline": baseline_name,
    "gap_closed": gap_closed,
    "curve": curve,
  }
  return {"summary": summary, "results": results}


def model_costs(config, teacher, student, dataset) -> dict[str, dict[str, float]]:
  """Parameters, XLA-counted FLOPs per example and median jit latency (ms) at batch 1 and 256, on this machine."""
  import jax

  from jaxkd.models import count_params

  example = np.zeros((1, *dataset.images.shape[1:]), np.float32)
  out = {}
  for name, model in (("teacher", teacher), ("student", student)):
    variables = model.init(jax.random.key(0), example)
    out[name] = {
      "params": count_params(variables),
      "flops_per_example": common.xla_forward_flops(model.apply, variables, example),
      "latency_b1_ms": 1e3
      * common.inference_latency(model.apply, variables, example, batch_size=1, repeats=config.latency_repeats),
      "latency_b256_ms": 1e3
      * common.inference_latency(model.apply, variables, example, batch_size=256, repeats=config.latency_repeats),
    }
  return out


if __name__ == "__main__":
  common.main(get_config, run)
