"""The method catalogue side by side: one teacher, one student, every distillation method at its paper's setting.

A CNN teacher is trained on Fashion-MNIST, then a smaller CNN student from scratch and once per method, each
online from the teacher inside the same train step (:mod:`jaxkd.methods`), with the loss weights and
hyperparameters the papers (or the CRD benchmark's code, RepDistiller) recommend, as listed in the catalogue's
docstrings; nothing is tuned here. The methods: logits (KD, DKD, DIST, logit-standardised KD, reverse KL,
generalised JSD), features (FitNet, AT, NST, FSP, VID) and relations (SP, RKD, PKT, CC, CRD). Each reports the
student's test accuracy; ``results.md`` and ``results.json`` hold the table, ``methods.png`` the bar chart with
the scratch student and the teacher as lines.

The Fashion-MNIST pair: teacher ``CNN(features=(32, 64), dense_size=256)`` (824,458 parameters), student
``CNN(features=(4, 8), dense_size=32)`` (13,242, 62x fewer), chosen so the teacher is 5.6 points above the scratch
student and the methods separate beyond their seed spread; 5 student epochs, seeds 0, 1, 2. Features are the ReLU'd
conv outputs (``Conv_0`` at 28x28, ``Conv_1`` at 14x14; FitNet's hint is ``Conv_1``, SP uses ``Conv_1``) and the
penultimate ReLU'd dense layer (``Dense_0``: RKD, PKT, CC, CRD). The channel counts differ, so FSP maps the
student's layers to the teacher's widths with trained 1x1 connectors (not in the paper).

Reproduce the README's table (measured 2026-12-03 on 2 CPU cores: 2 h 23 min of wall time beside other jobs, the
teacher 15 minutes, a student 1.5-3 minutes, VID 10 and CRD 17 per seed; two copies of the command with disjoint
``--config.methods`` can share the workdir to use both cores; rerun the whole command last for the full table).
With the paper's 16384 negatives (the default, drop the flag) CRD alone takes about an hour per seed here, since
every step gathers 64 x 16384 rows of each memory bank:

  python -m experiments.methods --workdir workdir/methods --config.crd_negatives=1024

The quick variant (3.5 minutes measured on 2 CPU cores: 10000 training and 2000 test examples, a 2-epoch teacher
and 2-epoch students, 1024 CRD negatives; a smoke test of the pipeline, whose differences between methods are
mostly noise):

  python -m experiments.methods --workdir workdir/methods_quick --config.quick=True

CIFAR-100 with RepDistiller's resnet32x4 -> resnet8x4 pair (``jaxkd.models.ResNet``, stem 32, widths 64/128/256,
5 or 1 blocks per stage; features are the three stage outputs and the pooled final map), for a machine with an
accelerator and the tfds ``cifar100`` dataset prepared (not runnable offline here); 240 epochs at batch 64 as in
RepDistiller, with Adam and a cosine schedule rather than its SGD steps, random translation by 4 pixels and no
flips:

  python -m experiments.methods --workdir workdir/methods_cifar100 --config.dataset=cifar100 \\
    --config.teacher_epochs=240 --config.student_epochs=240 --config.teacher_dropout=0 --config.max_translation=4

Rerunning a command skips finished sub-runs and resumes unfinished ones from their checkpoints when their inputs are
unchanged; a sub-run whose inputs changed (a method's setting, the teacher) is moved aside to ``NAME.stale-N`` and
trained again.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import common

ALL_METHODS = (
  "kd",
  "dkd",
  "dist",
  "lskd",
  "reverse_kl",
  "gjsd",
  "fitnet",
  "at",
  "nst",
  "fsp",
  "vid",
  "sp",
  "rkd",
  "pkt",
  "cc",
  "crd",
)

LABELS = {
  "kd": "KD (Hinton 2015)",
  "dkd": "DKD (Zhao 2022)",
  "dist": "DIST (Huang 2022)",
  "lskd": "logit-standardised KD (Sun 2024)",
  "reverse_kl": "reverse KL (Gu 2024)",
  "gjsd": "generalised JSD (Agarwal 2024)",
  "fitnet": "FitNet (Romero 2015)",
  "at": "AT (Zagoruyko 2017)",
  "nst": "NST (Huang 2017)",
  "fsp": "FSP (Yim 2017)",
  "vid": "VID (Ahn 2019)",
  "sp": "SP (Tung 2019)",
  "rkd": "RKD (Park 2019)",
  "pkt": "PKT (Passalis 2018)",
  "cc": "CC (Peng 2019)",
  "crd": "CRD (Tian 2020)",
}


# What the literature reports for each method against KD, in accuracy points on CIFAR-100's resnet32x4 -> resnet8x4
# (the pair this module's cifar100 config reproduces): CRD's benchmark (Tian et al. 2020, Table 1; RepDistiller, KD
# at 73.33) for the methods it reran; DKD's and DIST's own papers on the same pair. Logit standardisation, reverse KL
# and GJSD report gains over KD in their own papers (LSKD as a pre-process of KD; the last two on language models),
# with no number on this pair. A published difference within +-0.5 points counts as a tie: the benchmark reports
# means without spreads, and 0.5 points is about its seed-to-seed spread.
PUBLISHED_VS_KD: dict[str, float | str] = {
  "dkd": 2.99,
  "dist": 2.98,
  "lskd": "above",
  "reverse_kl": "above",
  "gjsd": "above",
  "fitnet": 0.17,
  "at": 0.11,
  "nst": -0.03,
  "fsp": -0.71,
  "vid": -0.24,
  "sp": -0.39,
  "rkd": -1.43,
  "pkt": 0.31,
  "cc": -0.36,
  "crd": 2.18,
}
PUBLISHED_TIE = 0.5


def published_ordering(name: str) -> str | None:
  """``'above'``, ``'below'`` or ``'tie'``: the published ordering of a method against KD (None if none)."""
  published = PUBLISHED_VS_KD.get(name)
  if published is None or isinstance(published, str):
    return published
  if abs(published) < PUBLISHED_TIE:
    return "tie"
  return "above" if published > 0 else "below"


def _published_cell(name: str) -> str:
  published = PUBLISHED_VS_KD.get(name)
  if published is None:
    return ""
  if isinstance(published, str):
    return f"{published} (own paper)"
  return f"{published:+.2f} ({published_ordering(name)})"


def _paired_cell(paired: dict) -> str:
  # Accuracy points (x100), the scale the papers report in.
  cell = f"{100 * paired['mean']:+.2f} ± {100 * paired['std']:.2f}"
  return f"{cell} ({paired['verdict']})" if paired["verdict"] else cell


def _ordering_summary(per_method: dict) -> str:
  """Which methods reproduce the published ordering against KD here, by the paired verdicts."""
  if "kd" not in per_method or not any(entry.get("vs_kd", {}).get("verdict") for entry in per_method.values()):
    return ""
  groups: dict[str, list[str]] = {"reproduced": [], "not reproduced": []}
  for name, entry in per_method.items():
    if name == "kd" or published_ordering(name) is None:
      continue
    verdict = entry["vs_kd"]["verdict"]
    groups["reproduced" if verdict == published_ordering(name) else "not reproduced"].append(
      f"{LABELS.get(name, name)} (published {published_ordering(name)}, here {verdict})"
    )
  return (
    "\nA method's difference to KD is paired by seed (the same seed's runs share initialisation and data order); "
    "it is 'above' or 'below' KD when every seed's difference has the same sign and the mean exceeds the "
    "differences' std, else a 'tie'. Against the published ordering (PUBLISHED_VS_KD in experiments/methods.py):\n"
    + "".join(f"- {key}: {', '.join(names) or 'none'}\n" for key, names in groups.items())
  )


# The config entries each sub-run depends on (its fingerprint and checkpoints keep these alone). A method's own
# settings (crd_negatives, dkd_warmup_fraction) are in its described Objective, so they rerun that method alone.
TEACHER_KEYS = (*common.DATA_KEYS, "max_translation", *(f"teacher_{k}" for k in ("features", "dense", "dropout")))
STUDENT_KEYS = (*common.DATA_KEYS, "max_translation", "student_features", "student_dense")

RULES = {
  **common.DATA_RULES,
  "max_translation": common.NON_NEGATIVE_INT,
  "teacher_features": common.sequence_of(common.POSITIVE_INT),
  "teacher_dense": common.POSITIVE_INT,
  "teacher_dropout": common.DROPOUT,
  "teacher_epochs": common.POSITIVE,
  "teacher_lr": common.POSITIVE,
  "student_features": common.sequence_of(common.POSITIVE_INT),
  "student_dense": common.POSITIVE_INT,
  "student_epochs": common.POSITIVE,
  "student_lr": common.POSITIVE,
  "seeds": common.sequence_of(common.NON_NEGATIVE_INT),
  "methods": common.sequence_of(common.one_of(ALL_METHODS), allow_empty=True),
  "crd_negatives": common.POSITIVE_INT,
  "dkd_warmup_fraction": common.FRACTION,
}


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.dataset = "fashion_mnist"  # or "cifar100" (resnet32x4 -> resnet8x4; needs tfds's prepared cifar100).
  config.data_dir = ""  # tfds data dir; "" means tfds's default (~/tensorflow_datasets).
  config.source_dir = ""  # directory of IDX files; "" searches the default places.
  config.validation_size = 5000  # held out of the training split (unused for choices: hyperparameters are fixed).
  config.train_subset = 0  # 0: the whole remaining training split.
  config.test_subset = 0  # 0: the whole test split.
  config.batch_size = 64  # RepDistiller's; PKT's weight and the relation losses depend on it.
  config.placement = "pmap"
  config.max_translation = 0

  # The Fashion-MNIST pair (CIFAR-100 uses RepDistiller's resnet32x4 and resnet8x4).
  config.teacher_features = (32, 64)
  config.teacher_dense = 256
  config.teacher_dropout = 0.3
  config.teacher_epochs = 10.0
  config.teacher_lr = 1e-3

  config.student_features = (4, 8)
  config.student_dense = 32
  config.student_epochs = 5.0
  config.student_lr = 1e-3
  config.seeds = (0, 1, 2)

  config.methods = ALL_METHODS
  config.crd_negatives = 16384  # the paper's K
  config.dkd_warmup_fraction = 20 / 240  # DKD warms up over 20 of its 240 epochs

  config.quick = False
  config.quick_overrides = ml_collections.ConfigDict(
    {
      "train_subset": 10000,
      "test_subset": 2000,
      "teacher_epochs": 2.0,
      "student_epochs": 2.0,
      "crd_negatives": 1024,
      "seeds": (0,),
    }
  )
  return config


# ---------------------------------------------------------------- the teacher-student pairs


@dataclasses.dataclass(frozen=True)
class Pair:
  """A teacher, a student and the layers each method reads (student layers, teacher layers)."""

  teacher: Any
  student: Any
  hint: tuple[str, str]  # FitNet's guided and hint layers: the middle of each network
  stages: tuple[tuple[str, ...], tuple[str, ...]]  # AT, NST, VID, FSP: stage outputs
  last_map: tuple[str, str]  # SP: the last feature map
  embedding: tuple[str, str]  # RKD, PKT, CC, CRD: the penultimate features
  feature_fn: Callable | None  # applied to the stage outputs and the last map
  embedding_fn: Callable | None  # applied to the penultimate features
  fsp_adapt_channels: bool
  mean: Any
  std: Any


def make_pair(config: ml_collections.ConfigDict, num_classes: int) -> Pair:
  from jaxkd import methods
  from jaxkd.models import CNN, ResNet

  if config.dataset == "cifar100":
    teacher = ResNet(stage_sizes=(5, 5, 5), widths=(64, 128, 256), stem_width=32, num_classes=num_classes)
    student = ResNet(stage_sizes=(1, 1, 1), widths=(64, 128, 256), stem_width=32, num_classes=num_classes)
    teacher_stages = ("_ResidualBlock_4", "_ResidualBlock_9", "_ResidualBlock_14")
    student_stages = ("_ResidualBlock_0", "_ResidualBlock_1", "_ResidualBlock_2")
    return Pair(
      teacher=teacher,
      student=student,
      hint=(student_stages[1], teacher_stages[1]),
      stages=(student_stages, teacher_stages),
      last_map=(student_stages[-1], teacher_stages[-1]),
      embedding=(student_stages[-1], teacher_stages[-1]),
      feature_fn=None,  # block outputs are already ReLU'd
      embedding_fn=methods.global_average_pool,
      fsp_adapt_channels=False,
      mean=(0.5071, 0.4865, 0.4409),
      std=(0.2673, 0.2564, 0.2762),
    )
  teacher = CNN(
    features=tuple(config.teacher_features),
    dense_size=config.teacher_dense,
    num_classes=num_classes,
    dropout_rate=config.teacher_dropout,
  )
  student = CNN(features=tuple(config.student_features), dense_size=config.student_dense, num_classes=num_classes)
  mean, std = common.pixel_stats(config.dataset)
  return Pair(
    teacher=teacher,
    student=student,
    hint=("Conv_1", "Conv_1"),
    stages=(("Conv_0", "Conv_1"), ("Conv_0", "Conv_1")),
    last_map=("Conv_1", "Conv_1"),
    embedding=("Dense_0", "Dense_0"),
    feature_fn=jax.nn.relu,  # the layers' outputs are pre-activation
    embedding_fn=jax.nn.relu,
    fsp_adapt_channels=True,
    mean=mean,
    std=std,
  )


def build_method(name: str, pair: Pair, config: ml_collections.ConfigDict, steps: int):
  """The :class:`jaxkd.Objective` ``name`` at its paper's setting, next to the hard-label cross-entropy.

  The papers' hyperparameters are the catalogue's defaults (:mod:`jaxkd.methods`, one place); only this
  experiment's own choices are written here: T = 4 for DIST and the divergences (CIFAR-100 practice), PKT's weight
  scaled to the batch size, CRD's number of negatives and the DKD warm-up length.
  """
  import jaxkd
  from jaxkd import methods as m

  (s_hint, t_hint), (s_stages, t_stages) = pair.hint, pair.stages
  (s_map, t_map), (s_embed, t_embed) = pair.last_map, pair.embedding
  fn, embed_fn = pair.feature_fn, pair.embedding_fn
  builders = {
    "kd": lambda: [m.cross_entropy(weight=0.1), m.kd()],
    "dkd": lambda: [
      m.cross_entropy(weight=1.0),
      m.dkd(warmup_steps=int(config.dkd_warmup_fraction * steps)),
    ],
    "dist": lambda: [m.cross_entropy(weight=1.0), m.dist(temperature=4.0)],
    "lskd": lambda: [m.cross_entropy(weight=0.1), m.standardized_kd()],
    # KD's setting, mirrored: the papers' T = 1 is for language models.
    "reverse_kl": lambda: [m.cross_entropy(weight=0.1), m.reverse_kl(weight=0.9, temperature=4.0)],
    "gjsd": lambda: [m.cross_entropy(weight=0.1), m.generalized_jsd(weight=0.9, beta=0.5, temperature=4.0)],
    "fitnet": lambda: [m.cross_entropy(), m.fitnet(s_hint, t_hint, feature_fn=fn)],
    "at": lambda: [m.cross_entropy(), m.attention_transfer(s_stages, t_stages, feature_fn=fn)],
    "nst": lambda: [m.cross_entropy(), m.nst(s_stages, t_stages, feature_fn=fn)],
    "fsp": lambda: [
      m.cross_entropy(),
      m.fsp(s_stages, t_stages, adapt_channels=pair.fsp_adapt_channels, feature_fn=fn),
    ],
    "vid": lambda: [m.cross_entropy(), m.vid(s_stages, t_stages, feature_fn=fn)],
    "sp": lambda: [m.cross_entropy(), m.similarity_preserving(s_map, t_map, feature_fn=fn)],
    "rkd": lambda: [m.cross_entropy(), m.rkd(s_embed, t_embed, feature_fn=embed_fn)],
    "pkt": lambda: [
      m.cross_entropy(),
      m.pkt(s_embed, t_embed, weight=30000.0 / config.batch_size, feature_fn=embed_fn),
    ],
    "cc": lambda: [m.cross_entropy(), m.cc(s_embed, t_embed, feature_fn=embed_fn)],
    "crd": lambda: [
      m.cross_entropy(),
      m.crd(s_embed, t_embed, num_negatives=config.crd_negatives, feature_fn=embed_fn),
    ],
  }
  if name not in builders:
    raise ValueError(f"unknown method {name!r}; choose from {sorted(builders)}.")
  return jaxkd.Objective(builders[name](), name=name)


def describe(method) -> str:
  """``CE 1 + KD 0.9``: the terms and their weights (schedules print as their final weight)."""
  parts = []
  for term in method.terms:
    weight = term.weight(np.iinfo(np.int32).max) if callable(term.weight) else term.weight
    parts.append(f"{term.name.upper()} {float(weight):g}")
  return " + ".join(parts)


# ---------------------------------------------------------------- the run


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  common.check_config(config, RULES)
  trained = train_runs(config, workdir)
  per_method = compare_methods(trained["methods"], trained["scratch_runs"])
  return write_report(config, workdir, trained, per_method)


def train_runs(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """The teacher, every seed's scratch student and every method's students: their results."""
  fit_set, _, test_set = common.load_splits(config)
  # CRD's memory bank has a row per training example: batch['index'] must count the fit set from 0.
  fit_set = dataclasses.replace(fit_set, indices=np.arange(len(fit_set)))
  pair = make_pair(config, fit_set.num_classes)
  data = dict(
    train_set=fit_set,
    eval_sets={"test": test_set},
    batch_size=config.batch_size,
    mean=pair.mean,
    std=pair.std,
    max_translation=config.max_translation,
  )
  print(f"{config.dataset}: {len(fit_set)} training and {len(test_set)} test examples", flush=True)
  teacher_run = common.SubRun(
    model=pair.teacher,
    num_epochs=config.teacher_epochs,
    learning_rate=config.teacher_lr,
    seed=0,
    config=common.subconfig(config, TEACHER_KEYS),
    **data,
  )
  teacher_result = common.train_subrun(workdir, "teacher", teacher_run, placement=config.placement)
  teacher_variables, teacher_info = common.load_subrun_variables(workdir, "teacher")
  steps = max(1, int(round(config.student_epochs * (len(fit_set) // config.batch_size))))

  def student_run(name: str, seed: int, method=None) -> dict:
    student_subrun = common.SubRun(
      model=pair.student,
      num_epochs=config.student_epochs,
      learning_rate=config.student_lr,
      seed=seed,
      teacher_apply_fn=pair.teacher.apply if method is not None else None,
      teacher_variables=teacher_variables if method is not None else None,
      temperature=4.0,
      method=method,
      meta={"teacher": teacher_info, "method": describe(method)} if method is not None else None,
      config=common.subconfig(config, STUDENT_KEYS),
      **data,
    )
    return common.train_subrun(workdir, f"{name}/seed{seed}", student_subrun, placement=config.placement)

  scratch_runs = [student_run("scratch", seed) for seed in config.seeds]
  methods = {}
  for name in config.methods:
    method = build_method(name, pair, config, steps)
    methods[name] = {"loss": describe(method), "runs": [student_run(name, seed, method) for seed in config.seeds]}
  return {
    "sizes": {"train": len(fit_set), "test": len(test_set)},
    "teacher": teacher_result,
    "teacher_checkpoint": teacher_info,
    "scratch_runs": scratch_runs,
    "methods": methods,
  }


def compare_methods(methods: Mapping[str, dict], scratch_runs: list[dict]) -> dict[str, dict]:
  """Per method: its loss, mean ± std test accuracy, runs, and paired per-seed differences to scratch and to KD."""

  def accuracies(runs):
    return [r["test_accuracy"] for r in runs]

  per_method = {}
  for name, entry in methods.items():
    runs = entry["runs"]
    per_method[name] = {"loss": entry["loss"], "test_accuracy": common.mean_std(accuracies(runs)), "runs": runs}
    per_method[name]["vs_scratch"] = common.paired_difference(accuracies(runs), accuracies(scratch_runs))
  for name, entry in per_method.items():
    if "kd" in per_method and name != "kd":
      entry["vs_kd"] = common.paired_difference(accuracies(entry["runs"]), accuracies(per_method["kd"]["runs"]))
  return per_method


def report_rows(trained: Mapping[str, Any], per_method: Mapping[str, dict]) -> list[dict]:
  """The teacher, scratch and one row per method with its paired verdicts and the published ordering."""
  scratch = common.mean_std(r["test_accuracy"] for r in trained["scratch_runs"])
  rows = [
    {"method": "teacher", "loss": "CE 1", "test_accuracy": trained["teacher"]["test_accuracy"]},
    {"method": "student from scratch", "loss": "CE 1", "test_accuracy": scratch},
  ]
  for name, entry in per_method.items():
    rows.append(
      {
        "method": LABELS.get(name, name),
        "loss": entry["loss"],
        "test_accuracy": entry["test_accuracy"],
        "vs_scratch": _paired_cell(entry["vs_scratch"]),
        "vs_kd": _paired_cell(entry["vs_kd"]) if "vs_kd" in entry else "",
        "published_vs_kd": _published_cell(name),
        "train_seconds": float(np.mean([r["train_seconds"] for r in entry["runs"]])),
      }
    )
  return rows


def write_report(config, workdir: pathlib.Path, trained: Mapping[str, Any], per_method: Mapping[str, dict]) -> dict:
  """``results.md``, ``results.json`` and ``methods.png``."""
  teacher_result, sizes = trained["teacher"], trained["sizes"]
  scratch = common.mean_std(r["test_accuracy"] for r in trained["scratch_runs"])
  rows = report_rows(trained, per_method)
  columns = ["method", "loss", "test_accuracy", "vs_scratch", "vs_kd", "published_vs_kd", "train_seconds"]
  table = common.markdown_table(rows, columns)
  student_params = per_method[config.methods[0]]["runs"][0]["params"] if per_method else None
  summary = (
    f"{config.dataset}: teacher {teacher_result['params']} parameters, student {student_params}; "
    f"{sizes['train']} training examples, {sizes['test']} test examples, {config.student_epochs:g} student epochs "
    f"at batch {config.batch_size}, seeds {list(config.seeds)}. Each method's weights are its paper's; none is "
    "tuned.\n"
  )
  summary += _ordering_summary(per_method)
  (workdir / "results.md").write_text(f"# methods\n\n{table}\n{summary}")
  results = {
    "config": config.to_dict(),
    "rows": rows,
    "teacher": teacher_result,
    "scratch": scratch,
    "methods": per_method,
    "teacher_checkpoint": trained["teacher_checkpoint"],
  }
  common.write_json(workdir / "results.json", results)
  if per_method:
    common.plot_bars(
      workdir / "methods.png",
      {name: per_method[name]["test_accuracy"]["mean"] for name in per_method},
      errors={name: per_method[name]["test_accuracy"]["std"] for name in per_method} if len(config.seeds) > 1 else None,
      hlines={"teacher": teacher_result["test_accuracy"], "scratch": scratch["mean"]},
      ylabel="student test accuracy",
      title=f"{config.dataset}: distillation methods",
    )
  print(table + "\n" + summary, flush=True)
  return results


if __name__ == "__main__":
  common.main(get_config, run)
