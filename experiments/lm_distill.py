"""Token-level distillation of a small transformer language model on the standard library's code.

A teacher transformer (``lm_config('teacher')``: 4 layers, d 256, 5.2M parameters at the 8192-token vocabulary) is
trained on CPython's standard library (:class:`jaxkd.lm.text.CodeCorpus`, with a byte-level BPE trained on its training
split), and a student (``lm_config('student')``: 2 layers, d 128, 1.4M parameters: 3.6x fewer, 8x fewer without
the tied embedding; the report gives both counts) is trained, per seed from the same initialisation and in the same
data order, as:

* ``scratch``: cross-entropy on the next tokens only;
* ``dense_kd``: 0.5 cross-entropy + 0.5 forward KL at T = 1 against the live teacher (Hinton);
* ``topk_k{k}``: the same with the KL restricted to the teacher's top k, read from a cache
  (:mod:`jaxkd.lm.topk_cache`) written once at k = max(topk_ks) over exactly the training windows the students see,
  in the order they see them; smaller k are its first columns (``lax.top_k`` order, so slicing is exact). The
  tail is one bucket (``config.tail``; see get_config for why not the renormalised tail);
* ``reverse_kl`` and ``gjsd``: reverse KL (MiniLLM) and GKD's generalised JSD (beta 0.5) against the live teacher;
* ``scratch_equal_time`` and ``scratch_cached_time``: the scratch student given as many steps as fit in the
  measured time of the dense-KD run and of the top-32 cached run (top-max(k) when 32 is not among the k): what
  the teacher's cost buys at equal wall time, with a live teacher and with the cache, whose reads are inside the
  timed steps (the one-off cost of writing the cache is reported apart). Steady seconds per step of the first
  seed's runs; compilation is left out of both. Those times come from the runs themselves, minutes apart, so
  another job starting or stopping between them skews the count; ``results.json`` keeps every run's seconds per
  step.

Each student is scored on every target token of the test split (:func:`jaxkd.lm.text.eval_batches`, masked): bits
per byte (tokenizer-independent) and top-1 agreement with the teacher. ``results.md`` has the table (mean ± std
over seeds) and the comparisons (KD against scratch and the seed spread, top-32 against dense in %, equal time,
cache sizes), ``results.json`` everything (corpus and tokenizer fingerprints, parameter counts, per-run results
and timings, cache bytes per token by the cache's formula and on disk against dense float32 ``4 V``), ``topk.png``
bits/byte against k with dense KD and scratch as lines. The workdir also holds the tokenizer (``tokenizer.json``),
the token files (``tokens/``), the cache (``topk_cache/``) and one directory per sub-run.

Reproduce the full run (3 seeds): measured end to end from an empty workdir in 71 minutes on 2 CPU cores
(2026-12-02, jax 0.10.2, partly beside test runs): the teacher's 300 steps at batch 32 took 13 minutes (2.6 s/step;
2.1 s alone), each seed's 9 students of 100-177 steps about 18 minutes with their evaluations of the 229k test
tokens, the cache (1600 windows, 106 MB at k = 128) 34 s. The calibrated sizes of /work/shared/CALIBRATION.md
(teacher 830 steps, students 420) would take about 3 hours here (its teacher step, 0.8 s, is 2.6x faster than the
one measured here), so the steps are cut to fit 90 minutes. Another job on the same cores makes it slower:

  python -m experiments.lm_distill --workdir workdir/lm_distill

The quick variant (one seed; 100 KB per split, a 512-token vocabulary, context 64, ``lm_config('tiny')`` for the
teacher (60 steps) and the students (15 steps), k in {1, 8}; 41 s measured on 2 idle CPU cores, about 2 minutes
beside other jobs; a smoke test of the pipeline, whose differences between variants are noise):

  python -m experiments.lm_distill --workdir workdir/lm_distill_quick --config.quick=True

Rerunning a command skips finished sub-runs and resumes unfinished ones from their checkpoints (the data iterator's
position included), when their inputs (model, corpus and tokenizer fingerprints, steps, settings, teacher, cache
key) are those of this run; a sub-run whose inputs changed is moved aside to ``NAME.stale-N`` and trained again,
and the changed inputs are printed. The tokenizer and token files are rebuilt when the corpus or vocabulary
changes, and the cache (which resumes shard by shard) when its key does (an old one is moved aside). One process.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import common
from experiments._lm_data import (  # re-exported: the experiment's names
  Data,
  StudentWindows,
  cached_reference,
  equal_time_references,
  prepare_data,
  topk_batches,
  topk_tail,
  variant_names,
)
from experiments._lm_report import write_report
from experiments._lm_subrun import Evaluator, describe_module, lm_subrun
from jaxkd.artifacts import tree_fingerprint
from jaxkd.lm.transformer import LM_PRESETS

__all__ = [
  "Data",
  "Evaluator",
  "StudentWindows",
  "cache_stats",
  "cached_reference",
  "equal_time_references",
  "get_config",
  "lm_subrun",
  "prepare_data",
  "run",
  "topk_batches",
  "topk_tail",
  "variant_names",
  "write_report",
]

# The students distilled from the live teacher, and the kind of jaxkd.lm.token_kd term each learns by.
LIVE_KINDS = {"dense_kd": "forward", "reverse_kl": "reverse", "gjsd": "gjsd"}

RULES = {
  "corpus_root": common.Rule("a string ('' for the standard library)", lambda v: isinstance(v, str)),
  "max_bytes": common.POSITIVE_INT,
  "vocab_size": common.Rule("an int in (256, 65536]", lambda v: common.POSITIVE_INT.test(v) and 256 < v <= 65536),
  "context": common.POSITIVE_INT,
  "teacher_size": common.one_of(LM_PRESETS),
  "student_size": common.one_of(LM_PRESETS),
  "teacher_steps": common.POSITIVE_INT,
  "teacher_batch_size": common.POSITIVE_INT,
  "teacher_lr": common.POSITIVE,
  "teacher_seed": common.NON_NEGATIVE_INT,
  "student_steps": common.POSITIVE_INT,
  "batch_size": common.POSITIVE_INT,
  "student_lr": common.POSITIVE,
  "weight_decay": common.NON_NEGATIVE,
  "warmup_fraction": common.Rule("a number in [0, 1)", lambda v: common.NON_NEGATIVE.test(v) and v < 1),
  "grad_clip": common.POSITIVE,
  "alpha": common.FRACTION,
  "temperature": common.POSITIVE,
  "gjsd_beta": common.Rule("a number in (0, 1)", lambda v: common.POSITIVE.test(v) and v < 1),
  "topk_ks": common.sequence_of(common.POSITIVE_INT),
  "tail": common.one_of(("renormalize", "bucket")),
  "seeds": common.sequence_of(common.NON_NEGATIVE_INT),
  "data_seed": common.NON_NEGATIVE_INT,
  "eval_batch_size": common.POSITIVE_INT,
  "cache_batch_size": common.POSITIVE_INT,
  "checkpoint_every": common.NON_NEGATIVE_INT,
  "placement": common.PLACEMENT,
}


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.corpus_root = ""  # "": the running interpreter's standard library.
  config.max_bytes = 8_000_000  # UTF-8 bytes per split at most (the test split, ~0.8 MB, is whole).
  config.vocab_size = 8192
  config.context = 128

  config.teacher_size = "teacher"
  config.teacher_steps = 300  # 830 in CALIBRATION.md; cut to fit 90 minutes here (see the module docstring)
  config.teacher_batch_size = 32
  config.teacher_lr = 2e-3
  config.teacher_seed = 0  # init and data order of the teacher

  config.student_size = "student"
  config.student_steps = 100  # 420 in CALIBRATION.md; likewise
  config.batch_size = 16
  config.student_lr = 3e-3
  # AdamW with a linear warmup and a cosine decay to 0, gradients clipped by global norm; teacher and students.
  config.weight_decay = 0.1
  config.warmup_fraction = 0.05
  config.grad_clip = 1.0

  config.alpha = 0.5  # weight of the distillation term; 1 - alpha on the cross-entropy
  config.temperature = 1.0
  config.gjsd_beta = 0.5
  config.topk_ks = (1, 8, 32, 128)  # one cache at the largest k, the others by slicing it
  # How the KL treats the teacher's mass outside its top k: 'renormalize' (both distributions over the k tokens) or
  # 'bucket' (the rest as one class). 'bucket' because at these short schedules it is the one that helps: measured
  # here (2026-12-02, seed 0, 100 student steps) the renormalised top-8/32/128 students were WORSE than scratch
  # (2.524/2.513/2.436 bits/byte against 2.341), the bucket ones better (2.296/2.282/2.264): renormalising says
  # nothing about the mass outside the top k, which a young student still has to learn. (CALIBRATION.md's
  # 420-step students preferred renormalising by ~0.014.) k = 1 always uses 'bucket': renormalised over one token,
  # both sides are a point mass, the KL is 0 and the run would be scratch's.
  config.tail = "bucket"

  config.seeds = (0, 1, 2)  # student init seeds; every variant of a seed starts from the same init
  config.data_seed = 1  # the students' data order, the same for every seed and variant
  config.eval_batch_size = 32
  config.cache_batch_size = 32
  config.checkpoint_every = 50  # a killed run loses at most 50 steps
  config.placement = "single"

  config.quick = False
  config.quick_overrides = ml_collections.ConfigDict(
    {
      "max_bytes": 100_000,
      "vocab_size": 512,
      "context": 64,
      "teacher_size": "tiny",
      "teacher_steps": 60,
      "teacher_batch_size": 16,
      "student_size": "tiny",
      "student_steps": 15,
      "batch_size": 8,
      "topk_ks": (1, 8),
      "seeds": (0,),
      "eval_batch_size": 64,
      "checkpoint_every": 0,
    }
  )
  return config


# ---------------------------------------------------------------- the experiment


def _check_consistency(config: ml_collections.ConfigDict) -> None:
  """What check_config's per-key rules cannot see: values that must agree with each other."""
  problems = []
  if max(config.topk_ks) > config.vocab_size:
    problems.append(f"topk_ks={tuple(config.topk_ks)} has a k above vocab_size={config.vocab_size}")
  if problems:
    raise common.ConfigError(f"invalid config: {'; '.join(problems)}.")


def _set_aside_other_cache(directory: pathlib.Path, key: str) -> None:
  """Moves a cache (finished or not) written under another key aside, as a stale sub-run is."""
  if not directory.is_dir():
    return
  records = [directory / "manifest.json", *sorted(directory.glob("shard-*.json"))]
  found = next((common.read_dict(path) for path in records if path.exists()), None)
  if found is None or found.get("key") == key:
    return
  stale = common.set_aside(directory)
  print(f"topk_cache: written for another teacher, corpus or setting; moved it to {stale} and writing it again.")


@dataclasses.dataclass
class Experiment:
  """One run's shared pieces: its data, models and evaluator, the teacher once trained, and the top-k cache."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  data: Data
  teacher_module: Any
  student_module: Any
  evaluator: Evaluator
  teacher_result: dict | None = None

  @property
  def shared_inputs(self) -> dict[str, Any]:
    """The inputs of every sub-run, teacher and students."""
    return {
      "corpus": self.data.info["corpus"]["fingerprint"],
      "tokenizer": self.data.info["tokenizer"]["fingerprint"],
      "context": self.config.context,
      "optimizer": {key: self.config[key] for key in ("weight_decay", "warmup_fraction", "grad_clip")},
    }

  @functools.cached_property
  def teacher_variables(self) -> Any:
    from jaxkd.training import checkpoint as ckpt

    run_dir = self.workdir / "teacher"
    variables, info = ckpt.load_variables(run_dir / "checkpoints")
    if tree_fingerprint(variables) != self.teacher_result["variables_fingerprint"]:
      raise RuntimeError(
        f"the teacher checkpoint in {run_dir} is not the one its result.json records (fingerprint "
        f"{info['fingerprint']}); delete {run_dir} to train it again."
      )
    return variables

  @functools.cached_property
  def teacher_top1(self) -> np.ndarray:
    return np.load(self.workdir / "teacher" / "test_top1.npy")

  @property
  def cache_dir(self) -> pathlib.Path:
    return self.workdir / "topk_cache"

  @functools.cached_property
  def cache_key(self) -> str:
    from jaxkd.data import logit_cache
    from jaxkd.lm import topk_cache

    config, info = self.config, self.data.info
    return topk_cache.topk_cache_key(
      teacher_fingerprint=f"{self.teacher_result['variables_fingerprint']}:{logit_cache.describe(self.teacher_module)}",
      corpus_fingerprint=info["corpus"]["fingerprint"],
      tokenizer_fingerprint=info["tokenizer"]["fingerprint"],
      k=max(config.topk_ks),
      temperature=float(config.temperature),
      length=config.context,
      vocab_size=self.data.vocab_size,
      extra={"windows": {"batch_size": config.batch_size, "num_steps": config.student_steps, "seed": config.data_seed}},
    )

  @functools.cached_property
  def windows(self) -> StudentWindows:
    config = self.config
    return StudentWindows(
      self.data.train, batch_size=config.batch_size, num_steps=config.student_steps, seed=config.data_seed
    )

  @functools.cached_property
  def cache(self) -> Any:
    """The top-k cache over the students' windows, written (or resumed) on first use."""
    from jaxkd.lm import topk_cache

    _set_aside_other_cache(self.cache_dir, self.cache_key)
    forward = jax.jit(lambda variables, tokens: self.teacher_module.apply(variables, tokens))
    variables = self.teacher_variables
    start = time.perf_counter()
    opened = topk_cache.write_topk_cache(
      self.cache_dir,
      lambda tokens: forward(variables, tokens),
      self.windows,
      k=max(self.config.topk_ks),
      key=self.cache_key,
      vocab_size=self.data.vocab_size,
      temperature=float(self.config.temperature),
      batch_size=self.config.cache_batch_size,
      jit=False,  # the teacher's variables stay an argument of its jitted forward, not constants in it
    )
    if (common.read_dict(self.cache_dir / "info.json") or {}).get("key") != self.cache_key:
      # Once, after the call that wrote the cache: a rerun that reuses it keeps the first call's seconds.
      info = {"key": self.cache_key, "write_seconds": time.perf_counter() - start} | cache_stats(opened, self.config)
      common.write_json(self.cache_dir / "info.json", info)
    return opened

  def cache_info(self) -> dict:
    """The cache's sizes and write time, read back from ``topk_cache/info.json`` (written with it)."""
    info = common.read_dict(self.cache_dir / "info.json")
    if info is None or info.get("key") != self.cache_key:
      _ = self.cache
      info = common.read_json(self.cache_dir / "info.json")
    return info


def train_teacher(experiment: Experiment) -> dict:
  """The teacher, its test predictions stored beside it for the students' agreement."""
  from jaxkd.lm import text
  from jaxkd.training import checkpoint as ckpt

  config, data = experiment.config, experiment.data

  def save_teacher_outputs(run_dir: pathlib.Path, top1: np.ndarray) -> dict:
    np.save(run_dir / "test_top1.npy", top1)
    variables, info = ckpt.load_variables(run_dir / "checkpoints")
    return {"variables_fingerprint": tree_fingerprint(variables), "checkpoint": info}

  return lm_subrun(
    experiment.workdir,
    "teacher",
    inputs={
      "role": "teacher",
      "model": describe_module(experiment.teacher_module),
      **experiment.shared_inputs,
      "num_steps": config.teacher_steps,
      "batch_size": config.teacher_batch_size,
      "learning_rate": config.teacher_lr,
      "seed": config.teacher_seed,
    },
    module=experiment.teacher_module,
    make_data=lambda: text.token_batches(data.train, batch_size=config.teacher_batch_size, seed=config.teacher_seed),
    num_steps=config.teacher_steps,
    learning_rate=config.teacher_lr,
    seed=config.teacher_seed,
    config=config,
    evaluator=experiment.evaluator,
    after=save_teacher_outputs,
  )


def student_objective(experiment: Experiment, variant: str) -> dict[str, Any]:
  """How ``variant`` learns: its objective, live teacher, data, provenance and the inputs that say so."""
  from jaxkd import lm
  from jaxkd.lm import text

  config, checkpoint = experiment.config, experiment.teacher_result["checkpoint"]
  make_data = functools.partial(
    text.token_batches, experiment.data.train, batch_size=config.batch_size, seed=config.data_seed
  )
  out = {"objective": None, "teacher_module": None, "meta": None, "make_data": make_data, "inputs": {}}
  if variant in LIVE_KINDS:
    kind = LIVE_KINDS[variant]
    description = {"kind": kind, "alpha": config.alpha, "temperature": config.temperature}
    if kind == "gjsd":
      description["beta"] = config.gjsd_beta
    out |= {
      "objective": lm.lm_objective(kind, alpha=config.alpha, temperature=config.temperature, beta=config.gjsd_beta),
      "teacher_module": experiment.teacher_module,
      "meta": {"teacher": checkpoint},
      "inputs": {"objective": description},
    }
  elif variant.startswith("topk_k"):
    k = int(variant.removeprefix("topk_k"))
    tail = topk_tail(k, config)
    out |= {
      "objective": lm.lm_objective("topk", alpha=config.alpha, temperature=config.temperature, tail=tail),
      "meta": {"teacher": checkpoint, "topk_cache": str(experiment.cache_dir)},
      "make_data": lambda: topk_batches(experiment.windows, experiment.cache, k=k, batch_size=config.batch_size),
      "inputs": {
        "objective": {"kind": "topk", "alpha": config.alpha, "temperature": config.temperature, "tail": tail},
        "topk": {"k": k, "cache_key": experiment.cache_key},
      },
    }
  return out


def train_student(experiment: Experiment, variant: str, seed: int, num_steps: int) -> dict:
  """One student of ``variant`` and ``seed`` trained for ``num_steps``."""
  config = experiment.config
  how = student_objective(experiment, variant)
  inputs = {
    "role": "student",
    "variant": variant,
    "model": describe_module(experiment.student_module),
    **experiment.shared_inputs,
    "num_steps": num_steps,
    "batch_size": config.batch_size,
    "learning_rate": config.student_lr,
    "seed": seed,
    "data_seed": config.data_seed,
    # The teacher every student's agreement is measured against (and the distilled ones learn from).
    "teacher": experiment.teacher_result["variables_fingerprint"],
    **how["inputs"],
  }
  return lm_subrun(
    experiment.workdir,
    f"students/{variant}/seed{seed}",
    inputs=inputs,
    module=experiment.student_module,
    make_data=how["make_data"],
    num_steps=num_steps,
    learning_rate=config.student_lr,
    seed=seed,
    config=config,
    evaluator=experiment.evaluator,
    objective=how["objective"],
    teacher_module=how["teacher_module"],
    teacher_variables=lambda: experiment.teacher_variables,
    teacher_top1=lambda: experiment.teacher_top1,
    meta=how["meta"],
  )


def setup(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Experiment:
  """The data, the two models and the evaluator, after the checks the tokenizer's actual size allows."""
  from jaxkd.lm.transformer import TransformerLM, lm_config

  data = prepare_data(config, workdir)
  vocab = data.vocab_size
  if max(config.topk_ks) > vocab:
    raise common.ConfigError(
      f"topk_ks={tuple(config.topk_ks)} has a k above the tokenizer's {vocab} tokens (the text gave fewer merges "
      f"than vocab_size={config.vocab_size}); use k <= {vocab}."
    )
  print(
    f"corpus {data.info['corpus']['fingerprint'][:12]}: train {data.info['corpus']['bytes']['train']} bytes, "
    f"{data.info['tokens']['train']} tokens ({len(data.train)} windows of {config.context}); test "
    f"{data.info['corpus']['bytes']['test']} bytes, {data.info['tokens']['test']} tokens; vocabulary {vocab}",
    flush=True,
  )
  teacher_module = TransformerLM(**lm_config(config.teacher_size, vocab_size=vocab, max_len=config.context))
  student_module = TransformerLM(**lm_config(config.student_size, vocab_size=vocab, max_len=config.context))
  evaluator = Evaluator(data.test, data.corpus.num_bytes("test"), config.eval_batch_size, config.placement)
  return Experiment(config, workdir, data, teacher_module, student_module, evaluator)


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  common.check_config(config, RULES)
  _check_consistency(config)
  experiment = setup(config, workdir)
  experiment.teacher_result = train_teacher(experiment)
  names = variant_names(config)
  runs: dict[str, list[dict]] = {name: [] for name in names}
  references = equal_time_references(config)
  equal_time_steps: dict[str, int] = {}
  report = None
  for seed in config.seeds:
    for variant in names:
      num_steps = config.student_steps
      if variant in references:
        if variant not in equal_time_steps:
          equal_time_steps[variant] = _equal_time_steps(runs[references[variant]][0], runs["scratch"][0])
        num_steps = equal_time_steps[variant]
      runs[variant].append(train_student(experiment, variant, seed, num_steps))
    # A report after every seed: a long run shows its first results early.
    models = {"teacher": experiment.teacher_module, "student": experiment.student_module}
    report = write_report(
      workdir, config, experiment.data, models, experiment.teacher_result, runs, experiment.cache_info, equal_time_steps
    )
  return report


def _equal_time_steps(dense: Mapping[str, Any], scratch: Mapping[str, Any]) -> int:
  """Scratch steps that fit in another run's time (``dense``), by steady seconds per step (compilation left out)."""

  def per_step(result):
    return result["seconds_per_step"] or result["wall_seconds"] / result["num_steps"]

  return max(1, int(round(dense["num_steps"] * per_step(dense) / per_step(scratch))))


def cache_stats(cache: Any, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Sizes of the cache on disk and the teacher's probability mass in its top k, averaged over the cached tokens."""
  from jaxkd.lm import topk_cache

  directory = pathlib.Path(cache.directory)
  num_tokens = len(cache) * cache.length
  file_bytes = sum(path.stat().st_size for path in directory.iterdir() if path.is_file())
  ks = sorted(set(config.topk_ks))
  mass = np.zeros(len(ks))
  for start in range(0, len(cache), 256):
    rows = cache.read(np.arange(start, min(len(cache), start + 256)))
    log_probs = rows["topk_logits"].astype(np.float32) / cache.temperature - rows["log_normalizer"][..., None]
    cumulative = np.cumsum(np.exp(log_probs), axis=-1)  # [rows, L, k]
    mass += [cumulative[..., k - 1].sum() for k in ks]
  return {
    "k": cache.k,
    "num_windows": len(cache),
    "num_tokens": num_tokens,
    "file_bytes": file_bytes,
    "file_bytes_per_token": file_bytes / num_tokens,
    "array_bytes_per_token": cache.bytes_per_token,
    "formula_bytes_per_token": {str(k): topk_cache.cache_bytes_per_token(k, cache.vocab_size) for k in ks},
    "teacher_topk_mass": {str(k): float(m / num_tokens) for k, m in zip(ks, mass, strict=True)},
  }


if __name__ == "__main__":
  common.main(get_config, run)
