"""Token-level distillation of a small transformer language model on the standard library's code.

A teacher transformer (``lm_config('teacher')``: 4 layers, d 256, 5.2M parameters at the 8192-token vocabulary) is
trained on CPython's standard library (:class:`jaxkd.text.CodeCorpus`, with a byte-level BPE trained on its training
split), and a student (``lm_config('student')``: 2 layers, d 128, 1.4M parameters: 3.6x fewer, 8x fewer without
the tied embedding; the report gives both counts) is trained, per seed from the same initialisation and in the same
data order, as:

* ``scratch``: cross-entropy on the next tokens only;
* ``dense_kd``: 0.5 cross-entropy + 0.5 forward KL at T = 1 against the live teacher (Hinton);
* ``topk_k{k}``: the same with the KL restricted to the teacher's top k, read from a cache
  (:mod:`jaxkd.topk_cache`) written once at k = max(topk_ks) over exactly the training windows the students see,
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

Each student is scored on every target token of the test split (:func:`jaxkd.text.eval_batches`, masked): bits
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
import hashlib
import json
import math
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common
from jaxkd.lm.transformer import LM_PRESETS

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


def variant_names(config: ml_collections.ConfigDict) -> list[str]:
  """The students of one seed, in the order they are trained and tabled."""
  topk = [f"topk_k{k}" for k in sorted(set(config.topk_ks), reverse=True)]
  equal_time = ["scratch_equal_time", *(["scratch_cached_time"] if topk else [])]
  return ["scratch", "dense_kd", *topk, "reverse_kl", "gjsd", *equal_time]


def cached_reference(config: ml_collections.ConfigDict) -> str:
  """The cached run whose wall time ``scratch_cached_time`` gets, and that the report compares with dense KD."""
  ks = sorted(set(config.topk_ks))
  return f"topk_k{32 if 32 in ks else ks[-1]}"


def equal_time_references(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Each equal-time scratch arm and the run whose measured time it is given."""
  return {"scratch_equal_time": "dense_kd", "scratch_cached_time": cached_reference(config)}


# ---------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
  """The corpus, tokenizer and token windows every sub-run reads."""

  corpus: Any
  tokenizer: Any
  vocab_size: int  # the tokenizer's actual size (at most config.vocab_size)
  train: Any  # TokenSequences
  test: Any
  info: dict


def prepare_data(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Data:
  """Corpus, BPE tokenizer (trained once, saved in the workdir) and the train and test token windows."""
  from jaxkd.lm import text

  corpus = text.CodeCorpus(config.corpus_root or None, max_bytes=config.max_bytes)
  for split in ("train", "test"):
    if not corpus.source_files(split):
      smallest = min((f.num_bytes for f in corpus.all_files if f.split == split), default=None)
      raise common.ConfigError(
        f"max_bytes={config.max_bytes} leaves the {split} split of {corpus.root} empty (its smallest file has "
        f"{smallest} bytes); raise --config.max_bytes."
      )
  tokenizer_path = workdir / "tokenizer.json"
  # A tokenizer of another corpus or size is rebuilt: every sub-run records the tokenizer's fingerprint, so the
  # sub-runs made with the old one are moved aside when they are next asked for.
  tokenizer = text.train_tokenizer(corpus, vocab_size=config.vocab_size, path=tokenizer_path, overwrite=True)
  tokens = {
    split: text.tokenize_split(corpus, tokenizer, split, path=workdir / "tokens" / f"{split}.npy", overwrite=True)
    for split in ("train", "test")
  }
  train = text.TokenSequences(tokens["train"], length=config.context)
  test = text.TokenSequences(tokens["test"], length=config.context)
  if len(train) < max(config.batch_size, config.teacher_batch_size):
    raise common.ConfigError(
      f"the training split has {len(train)} windows of {config.context} tokens, fewer than a batch "
      f"(batch_size={config.batch_size}, teacher_batch_size={config.teacher_batch_size}); raise max_bytes."
    )
  info = {
    "corpus": {
      "root": corpus.root,
      "fingerprint": corpus.fingerprint,
      "max_bytes": corpus.max_bytes,
      "files": {split: len(corpus.files(split)) for split in ("train", "test")},
      "bytes": {split: corpus.num_bytes(split) for split in ("train", "test")},
    },
    "tokenizer": {
      "path": str(tokenizer_path),
      "fingerprint": text.tokenizer_fingerprint(tokenizer),
      "vocab_size": tokenizer.get_vocab_size(),
    },
    "tokens": {split: int(len(array)) for split, array in tokens.items()},
    "windows": {"train": len(train), "test_targets": test.num_targets},
  }
  return Data(corpus, tokenizer, tokenizer.get_vocab_size(), train, test, info)


class StudentWindows:
  """The training windows the students see, in the order they see them: a grain source of ``{'tokens', 'label'}``.

  Drawn from :func:`jaxkd.text.token_batches` with the students' batch size and data seed, so row ``i`` is the
  ``i``-th window of the live-teacher and scratch runs; the top-k cache is written over these rows.
  """

  def __init__(self, train: Any, *, batch_size: int, num_steps: int, seed: int):
    from jaxkd.lm import text

    batches = text.token_batches(train, batch_size=batch_size, seed=seed, shard_index=0, shard_count=1)
    drawn = [next(batches) for _ in range(num_steps)]
    self.tokens = np.concatenate([b["tokens"] for b in drawn])  # [num_steps * batch_size, length]
    self.label = np.concatenate([b["label"] for b in drawn])
    self.digest = hashlib.sha256(self.tokens.tobytes() + self.label.tobytes()).hexdigest()

  def __len__(self) -> int:
    return len(self.tokens)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"tokens": self.tokens[index], "label": self.label[index]}

  def __repr__(self) -> str:  # stable: grain's checkpoints name a source by its repr
    return f"StudentWindows({len(self)} windows of {self.tokens.shape[1]}, sha256={self.digest[:16]})"


def topk_tail(k: int, config: ml_collections.ConfigDict) -> str:
  """The tail mode of the top-k run: ``config.tail``, but 'bucket' for k = 1 (see get_config)."""
  return "bucket" if k == 1 else config.tail


def _slice_topk(batch: dict[str, np.ndarray], *, k: int) -> dict[str, np.ndarray]:
  # The cache stores lax.top_k order: its first k columns are the top k, and the log-normaliser is unchanged.
  batch = dict(batch)
  for key in ("teacher_topk_logits", "teacher_topk_indices"):
    batch[key] = np.ascontiguousarray(batch[key][..., :k])
  return batch


def topk_batches(windows: StudentWindows, cache: Any, *, k: int, batch_size: int) -> Any:
  """The students' batches joined with the cache's top k, in order; a grain iterator with get_state/set_state."""
  import grain

  from jaxkd.lm import topk_cache

  dataset = grain.MapDataset.source(topk_cache.JoinedSource(windows, cache)).batch(batch_size, drop_remainder=True)
  if k < cache.k:
    dataset = dataset.map(functools.partial(_slice_topk, k=k))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


# ---------------------------------------------------------------- sub-runs


def _describe_module(module: Any) -> dict[str, str]:
  fields = [f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name")]
  return {"class": type(module).__qualname__} | {name: repr(getattr(module, name)) for name in fields}


def _optimizer(learning_rate: float, num_steps: int, config: ml_collections.ConfigDict):
  import optax

  warmup = max(1, int(round(config.warmup_fraction * num_steps)))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(num_steps, warmup + 1), 0.0)
  return optax.chain(
    optax.clip_by_global_norm(config.grad_clip), optax.adamw(schedule, weight_decay=config.weight_decay)
  )


class _StepTimer:
  """A fit hook timing the steady steps of one call of fit: from the end of its first step (compiled by then) to
  its last step, synchronising with the device at those two points only."""

  def __init__(self):
    self.first: tuple[int, float] | None = None
    self.last: tuple[int, float] | None = None

  def __call__(self, step: int, loop: Any) -> None:
    if self.first is None or step == loop.num_steps:
      jax.block_until_ready(loop.state.params)
      mark = (step, time.perf_counter())
      if self.first is None:
        self.first = mark
      else:
        self.last = mark

  def timed(self) -> tuple[int, float]:
    if self.first is None or self.last is None:
      return 0, 0.0
    return self.last[0] - self.first[0], self.last[1] - self.first[1]


def _add_timing(run_dir: pathlib.Path, wall_seconds: float, timer: _StepTimer) -> dict[str, float]:
  """Adds this call of fit to ``timing.json``, so that a resumed run reports the time of all its calls."""
  path = run_dir / "timing.json"
  timing = common.read_json(path) if path.exists() else {"wall_seconds": 0.0, "timed_steps": 0, "timed_seconds": 0.0}
  steps, seconds = timer.timed()
  timing = {
    "wall_seconds": timing["wall_seconds"] + wall_seconds,
    "timed_steps": timing["timed_steps"] + steps,
    "timed_seconds": timing["timed_seconds"] + seconds,
  }
  common.write_json(path, timing)
  return timing


@dataclasses.dataclass
class Evaluator:
  """Exact test-split scores: bits per byte from :func:`jaxkd.make_eval_step`'s summed cross-entropy over every
  target token, and top-1 agreement with the teacher's predictions (computed once, stored with the teacher)."""

  test: Any
  num_bytes: int
  batch_size: int
  placement: Any

  def __post_init__(self):
    import jaxkd

    self.eval_step = jaxkd.make_eval_step(placement=self.placement)
    self._templates: dict[Any, Any] = {}

  def __call__(self, module: Any, state: Any, *, desc: str, teacher_top1: np.ndarray | None = None) -> tuple:
    """``(metrics, top1)``: the scores and the model's top-1 prediction at every target, ``[num_targets]``."""
    from tqdm.auto import tqdm

    from jaxkd import train
    from jaxkd.lm import text

    # One template state per module: the eval step then compiles once per model, not once per run's optimizer.
    template = self._templates.setdefault(module, state)
    placement = self.eval_step.placement
    placed = placement.put(template.replace(params=state.params))
    total, predictions = None, []
    batches = text.eval_batches(self.test, batch_size=self.batch_size)
    num_batches = text.num_eval_batches(self.test, batch_size=self.batch_size)
    for batch in tqdm(batches, total=num_batches, desc=f"{desc} eval", leave=False):
      sums = jax.tree.map(lambda x: np.asarray(x, np.float64), placement.to_host(self.eval_step(placed, None, batch)))
      total = sums if total is None else jax.tree.map(np.add, total, sums)
      predictions.append(np.asarray(_top1(module, state.params, batch["tokens"]))[batch["mask"]])
    top1 = np.concatenate(predictions)  # [num_targets], in the order of the split
    means = train.summarize_eval(total)
    metrics = {
      "test_bits_per_byte": text.bits_per_byte(float(total["ce_sum"]), self.num_bytes),
      "test_ce": means["ce"],
      "test_token_accuracy": means["accuracy"],
      "test_targets": int(means["count"]),
    }
    if teacher_top1 is not None:
      metrics["test_agreement"] = float(np.mean(top1 == teacher_top1))
    return metrics, top1


@functools.partial(jax.jit, static_argnums=0)
def _top1(module: Any, params: Any, tokens: Any) -> jax.Array:
  return jnp.argmax(module.apply({"params": params}, tokens), axis=-1).astype(jnp.int32)


def lm_subrun(
  workdir: pathlib.Path,
  name: str,
  *,
  inputs: Mapping[str, Any],
  module: Any,
  make_data: Callable[[], Any],
  num_steps: int,
  learning_rate: float,
  seed: int,
  config: ml_collections.ConfigDict,
  evaluator: Evaluator,
  objective: Any = None,
  teacher_module: Any = None,
  teacher_variables: Callable[[], Any] | None = None,
  teacher_top1: Callable[[], np.ndarray] | None = None,
  meta: Mapping[str, Any] | None = None,
  after: Callable[[pathlib.Path, np.ndarray], dict] | None = None,
) -> dict[str, Any]:
  """Trains one LM in ``workdir/name`` with :func:`jaxkd.trainer.fit`; resumable, fingerprinted like
  :func:`experiments.common.train_subrun` (which is for image classifiers).

  ``inputs`` (JSON) is everything that determines the run; a finished run with the same fingerprint is returned
  as it is, an unfinished one resumes from its last checkpoint, one of other inputs is moved aside. ``after``
  (the teacher's) writes extra outputs from the run's test predictions before ``result.json`` marks it finished.

  Returns:
    ``result.json``: test metrics, ``num_steps``, ``params``, ``wall_seconds`` and ``seconds_per_step`` (steady
    steps, compilation left out) over all calls of fit, and the inputs' ``fingerprint``.
  """
  inputs = json.loads(json.dumps(inputs, sort_keys=True))
  fingerprint = common.inputs_fingerprint(inputs)
  run_dir = workdir / name
  # The bookkeeping of common.train_subrun: reuse a finished run, keep an unfinished one, set aside a stale one.
  finished = common.finished_or_set_aside(run_dir, name, fingerprint, inputs)
  if finished is not None:
    print(f"{name}: finished earlier with these inputs; reusing its result.", flush=True)
    return finished
  run_dir.mkdir(parents=True, exist_ok=True)
  common.write_json(run_dir / common.INPUTS_FILE, {"fingerprint": fingerprint, "inputs": inputs})

  import jaxkd
  from jaxkd import lm
  from jaxkd.models import count_params
  from jaxkd.training import loop as trainer

  state = jaxkd.create_train_state(
    lm.lm_model(module),
    _optimizer(learning_rate, num_steps, config),
    {"tokens": np.zeros((2, config.context), np.int32)},
    rng=seed,
  )
  teacher = lm.lm_model(teacher_module, name="teacher") if teacher_module is not None else None
  step = jaxkd.make_train_step(teacher_apply_fn=teacher, objective=objective, placement=config.placement)
  timer = _StepTimer()
  start = time.perf_counter()
  result = trainer.fit(
    state,
    train_step=step,
    train_data=make_data(),
    num_steps=num_steps,
    teacher_variables=teacher_variables() if teacher is not None else None,
    workdir=run_dir,
    checkpoint_every=config.checkpoint_every,
    log_every=min(50, num_steps),
    config=inputs,
    meta=meta,
    progress=name,
    hooks=[timer],
  )
  timing = _add_timing(run_dir, time.perf_counter() - start, timer)
  if result.preempted:
    raise SystemExit(143)
  metrics, top1 = evaluator(module, result.state, desc=name, teacher_top1=teacher_top1() if teacher_top1 else None)
  out = {
    "fingerprint": fingerprint,
    "num_steps": num_steps,
    "params": count_params(result.state.params),
    "wall_seconds": timing["wall_seconds"],
    "seconds_per_step": timing["timed_seconds"] / timing["timed_steps"] if timing["timed_steps"] else None,
    **metrics,
  }
  if after is not None:
    out |= after(run_dir, top1)
  common.write_json(run_dir / "result.json", out)
  return out


# ---------------------------------------------------------------- the experiment


def _check_consistency(config: ml_collections.ConfigDict) -> None:
  """What check_config's per-key rules cannot see: values that must agree with each other."""
  problems = []
  if max(config.topk_ks) > config.vocab_size:
    problems.append(f"topk_ks={tuple(config.topk_ks)} has a k above vocab_size={config.vocab_size}")
  if problems:
    raise common.ConfigError(f"invalid config: {'; '.join(problems)}.")


def _read_record(path: pathlib.Path) -> dict | None:
  """The JSON object in ``path``, or None when it is missing or unreadable."""
  try:
    value = common.read_json(path)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def _set_aside_other_cache(directory: pathlib.Path, key: str) -> None:
  """Moves a cache (finished or not) written under another key aside, as a stale sub-run is."""
  if not directory.is_dir():
    return
  records = [directory / "manifest.json", *sorted(directory.glob("shard-*.json"))]
  found = next((_read_record(path) for path in records if path.exists()), None)
  if found is None or found.get("key") == key:
    return
  n = 1
  while directory.with_name(f"{directory.name}.stale-{n}").exists():
    n += 1
  stale = directory.with_name(f"{directory.name}.stale-{n}")
  directory.rename(stale)
  print(f"topk_cache: written for another teacher, corpus or setting; moved it to {stale} and writing it again.")


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  common.check_config(config, RULES)
  _check_consistency(config)

  from jaxkd import lm
  from jaxkd.data import logit_cache
  from jaxkd.lm import text, topk_cache
  from jaxkd.lm.transformer import TransformerLM, lm_config
  from jaxkd.training import checkpoint as ckpt

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
  shared_inputs = {
    "corpus": data.info["corpus"]["fingerprint"],
    "tokenizer": data.info["tokenizer"]["fingerprint"],
    "context": config.context,
    "optimizer": {key: config[key] for key in ("weight_decay", "warmup_fraction", "grad_clip")},
  }

  # ---- the teacher, its test predictions stored beside it for the students' agreement
  def save_teacher_outputs(run_dir: pathlib.Path, top1: np.ndarray) -> dict:
    np.save(run_dir / "test_top1.npy", top1)
    variables, info = ckpt.load_variables(run_dir / "checkpoints")
    return {"variables_fingerprint": logit_cache.variables_fingerprint(variables), "checkpoint": info}

  teacher_result = lm_subrun(
    workdir,
    "teacher",
    inputs={
      "role": "teacher",
      "model": _describe_module(teacher_module),
      **shared_inputs,
      "num_steps": config.teacher_steps,
      "batch_size": config.teacher_batch_size,
      "learning_rate": config.teacher_lr,
      "seed": config.teacher_seed,
    },
    module=teacher_module,
    make_data=lambda: text.token_batches(data.train, batch_size=config.teacher_batch_size, seed=config.teacher_seed),
    num_steps=config.teacher_steps,
    learning_rate=config.teacher_lr,
    seed=config.teacher_seed,
    config=config,
    evaluator=evaluator,
    after=save_teacher_outputs,
  )
  teacher_fingerprint = teacher_result["variables_fingerprint"]

  @functools.cache
  def teacher_variables():
    variables, info = ckpt.load_variables(workdir / "teacher" / "checkpoints")
    if logit_cache.variables_fingerprint(variables) != teacher_fingerprint:
      raise RuntimeError(
        f"the teacher checkpoint in {workdir / 'teacher'} is not the one its result.json records (fingerprint "
        f"{info['fingerprint']}); delete {workdir / 'teacher'} to train it again."
      )
    return variables

  @functools.cache
  def teacher_top1():
    return np.load(workdir / "teacher" / "test_top1.npy")

  # ---- the students' windows and the top-k cache over them (built only when a top-k run needs them)
  cache_k = max(config.topk_ks)
  cache_dir = workdir / "topk_cache"
  cache_key = topk_cache.topk_cache_key(
    teacher_fingerprint=f"{teacher_fingerprint}:{logit_cache.describe(teacher_module)}",
    corpus_fingerprint=data.info["corpus"]["fingerprint"],
    tokenizer_fingerprint=data.info["tokenizer"]["fingerprint"],
    k=cache_k,
    temperature=float(config.temperature),
    length=config.context,
    vocab_size=vocab,
    extra={"windows": {"batch_size": config.batch_size, "num_steps": config.student_steps, "seed": config.data_seed}},
  )

  @functools.cache
  def windows():
    return StudentWindows(
      data.train, batch_size=config.batch_size, num_steps=config.student_steps, seed=config.data_seed
    )

  @functools.cache
  def cache():
    _set_aside_other_cache(cache_dir, cache_key)
    forward = jax.jit(lambda variables, tokens: teacher_module.apply(variables, tokens))
    variables = teacher_variables()
    start = time.perf_counter()
    opened = topk_cache.write_topk_cache(
      cache_dir,
      lambda tokens: forward(variables, tokens),
      windows(),
      k=cache_k,
      key=cache_key,
      vocab_size=vocab,
      temperature=float(config.temperature),
      batch_size=config.cache_batch_size,
      jit=False,  # the teacher's variables stay an argument of its jitted forward, not constants in it
    )
    if (_read_record(cache_dir / "info.json") or {}).get("key") != cache_key:
      # Once, after the call that wrote the cache: a rerun that reuses it keeps the first call's seconds.
      info = {"key": cache_key, "write_seconds": time.perf_counter() - start} | cache_stats(opened, config)
      common.write_json(cache_dir / "info.json", info)
    return opened

  def cache_info():
    """The cache's sizes and write time, read back from ``topk_cache/info.json`` (written with it)."""
    info = _read_record(cache_dir / "info.json")
    if info is None or info.get("key") != cache_key:
      cache()
      info = common.read_json(cache_dir / "info.json")
    return info

  # ---- the students
  def student(variant: str, seed: int, num_steps: int) -> dict:
    objective, teacher, meta, extra = None, None, None, {}
    make_data = functools.partial(text.token_batches, data.train, batch_size=config.batch_size, seed=config.data_seed)
    if variant in LIVE_KINDS:
      kind = LIVE_KINDS[variant]
      objective = lm.lm_objective(kind, alpha=config.alpha, temperature=config.temperature, beta=config.gjsd_beta)
      teacher, meta = teacher_module, {"teacher": teacher_result["checkpoint"]}
      extra = {"objective": {"kind": kind, "alpha": config.alpha, "temperature": config.temperature}}
      if kind == "gjsd":
        extra["objective"]["beta"] = config.gjsd_beta
    elif variant.startswith("topk_k"):
      k = int(variant.removeprefix("topk_k"))
      tail = topk_tail(k, config)
      objective = lm.lm_objective("topk", alpha=config.alpha, temperature=config.temperature, tail=tail)
      meta = {"teacher": teacher_result["checkpoint"], "topk_cache": str(cache_dir)}
      extra = {
        "objective": {"kind": "topk", "alpha": config.alpha, "temperature": config.temperature, "tail": tail},
        "topk": {"k": k, "cache_key": cache_key},
      }

      def make_data():
        return topk_batches(windows(), cache(), k=k, batch_size=config.batch_size)

    inputs = {
      "role": "student",
      "variant": variant,
      "model": _describe_module(student_module),
      **shared_inputs,
      "num_steps": num_steps,
      "batch_size": config.batch_size,
      "learning_rate": config.student_lr,
      "seed": seed,
      "data_seed": config.data_seed,
      # The teacher every student's agreement is measured against (and the distilled ones learn from).
      "teacher": teacher_fingerprint,
      **extra,
    }
    return lm_subrun(
      workdir,
      f"students/{variant}/seed{seed}",
      inputs=inputs,
      module=student_module,
      make_data=make_data,
      num_steps=num_steps,
      learning_rate=config.student_lr,
      seed=seed,
      config=config,
      evaluator=evaluator,
      objective=objective,
      teacher_module=teacher,
      teacher_variables=teacher_variables,
      teacher_top1=teacher_top1,
      meta=meta,
    )

  names = variant_names(config)
  runs: dict[str, list[dict]] = {name: [] for name in names}
  references = equal_time_references(config)
  equal_time_steps: dict[str, int] = {}
  report = None
  for seed in config.seeds:
    for variant in names:
      if variant in references:
        if variant not in equal_time_steps:
          equal_time_steps[variant] = _equal_time_steps(runs[references[variant]][0], runs["scratch"][0])
        runs[variant].append(student(variant, seed, equal_time_steps[variant]))
      else:
        runs[variant].append(student(variant, seed, config.student_steps))
    # A report after every seed: a long run shows its first results early.
    report = write_report(
      workdir, config, data, teacher_module, student_module, teacher_result, runs, cache_info, equal_time_steps
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


def _param_counts(module: Any, context: int) -> dict[str, int]:
  from jaxkd.models import count_params

  shapes = jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, context), np.int32))
  total = count_params(shapes["params"])
  embedding = module.vocab_size * module.d_model
  return {"params": total, "params_without_embedding": total - embedding}


def write_report(
  workdir: pathlib.Path,
  config: ml_collections.ConfigDict,
  data: Data,
  teacher_module: Any,
  student_module: Any,
  teacher_result: Mapping[str, Any],
  runs: Mapping[str, list[dict]],
  cache_info: Callable[[], dict],
  equal_time_steps: Mapping[str, int],
) -> dict:
  """``results.json``, ``results.md`` and ``topk.png`` from the runs so far (variants of the seeds done)."""
  vocab = data.vocab_size
  done = {name: results for name, results in runs.items() if results}
  summary = {
    name: {
      "test_bits_per_byte": common.mean_std(r["test_bits_per_byte"] for r in results),
      "test_agreement": common.mean_std(r["test_agreement"] for r in results),
      "wall_seconds": common.mean_std(r["wall_seconds"] for r in results),
      "seconds_per_step": common.mean_std(r["seconds_per_step"] or math.nan for r in results),
      "num_steps": results[0]["num_steps"],
    }
    for name, results in done.items()
  }
  params = {
    "teacher": _param_counts(teacher_module, config.context),
    "student": _param_counts(student_module, config.context),
  }
  ratio = {key: params["teacher"][key] / params["student"][key] for key in params["teacher"]}

  cache = cache_info() if any(name.startswith("topk_k") for name in done) else None
  bytes_column = {"dense_kd": 4 * vocab, "reverse_kl": 4 * vocab, "gjsd": 4 * vocab}
  if cache is not None:
    for k, size in cache["formula_bytes_per_token"].items():
      bytes_column[f"topk_k{k}"] = size

  labels = {
    "scratch": "scratch",
    "dense_kd": f"dense KD (forward KL, alpha {config.alpha:g}, T {config.temperature:g})",
    "reverse_kl": "reverse KL, live teacher",
    "gjsd": f"GJSD (beta {config.gjsd_beta:g}), live teacher",
    "scratch_equal_time": "scratch at dense KD's wall time",
    "scratch_cached_time": f"scratch at the top-{cached_reference(config).removeprefix('topk_k')} run's wall time",
  }
  rows = [
    {
      "model": f"teacher ({config.teacher_size})",
      "steps": teacher_result["num_steps"],
      "test bits/byte": teacher_result["test_bits_per_byte"],
      "agreement": "",
      "wall s": teacher_result["wall_seconds"],
      "s/step": teacher_result["seconds_per_step"] or math.nan,
      "teacher bytes/token": "",
    }
  ]
  for name, stats in summary.items():
    if name.startswith("topk_k"):
      k = int(name.removeprefix("topk_k"))
      labels[name] = f"top-{k} cache ({topk_tail(k, config)})"
    label = labels[name]
    rows.append(
      {
        "model": label,
        "steps": stats["num_steps"],
        "test bits/byte": stats["test_bits_per_byte"],
        "agreement": stats["test_agreement"],
        "wall s": stats["wall_seconds"],
        "s/step": stats["seconds_per_step"],
        "teacher bytes/token": bytes_column.get(name, ""),
      }
    )
  table = common.markdown_table(rows)

  def bpb(name):
    return summary[name]["test_bits_per_byte"] if name in summary else None

  comparisons = {}
  scratch = bpb("scratch")
  for name in summary:
    if name == "scratch" or scratch is None:
      continue
    stats = bpb(name)
    gain = scratch["mean"] - stats["mean"]
    spread = max(scratch["std"], stats["std"])
    teacher_gap = scratch["mean"] - teacher_result["test_bits_per_byte"]
    comparisons[name] = {
      "gain_over_scratch": gain,
      "seed_spread": spread if stats["n"] > 1 else None,
      "beats_scratch_beyond_spread": bool(gain > spread) if stats["n"] > 1 else None,
      "gap_closed": gain / teacher_gap if teacher_gap > 0 else None,
    }
  topk_vs_dense = None
  ks = sorted(int(n.removeprefix("topk_k")) for n in summary if n.startswith("topk_k"))
  if ks and "dense_kd" in summary:
    k = int(cached_reference(config).removeprefix("topk_k"))
    dense, top = bpb("dense_kd")["mean"], bpb(f"topk_k{k}")["mean"]
    gain = scratch["mean"] - dense
    topk_vs_dense = {
      "k": k,
      "difference_percent": 100 * (top - dense) / dense,
      # Only meaningful when dense KD gained something over scratch.
      "share_of_dense_gain": (scratch["mean"] - top) / gain if gain > 0 else None,
    }

  lines = [
    "Bits per byte: lower is better; gains below are scratch's bits/byte minus the variant's (positive: better).",
    f"Corpus: {config.corpus_root or 'the standard library'} ({data.info['corpus']['files']['train']} training files, "
    f"{data.info['corpus']['bytes']['train']} bytes; fingerprint {data.info['corpus']['fingerprint'][:12]}); "
    f"byte-level BPE of {vocab} tokens (fingerprint {data.info['tokenizer']['fingerprint'][:12]}); context "
    f"{config.context}; test split {data.info['corpus']['bytes']['test']} bytes, {data.info['tokens']['test']} tokens, "
    "every target scored.",
    f"Teacher ({config.teacher_size}): {params['teacher']['params']:,} parameters "
    f"({params['teacher']['params_without_embedding']:,} without the embedding); student ({config.student_size}): "
    f"{params['student']['params']:,} ({params['student']['params_without_embedding']:,}); the student is "
    f"{ratio['params']:.1f}x smaller ({ratio['params_without_embedding']:.1f}x without embeddings).",
    f"Seeds: {len(next(iter(done.values())))} of {len(config.seeds)} ({tuple(config.seeds)}), the same init and "
    "data order for every variant of a seed; mean ± std over seeds.",
  ]
  for name, c in comparisons.items():
    if c["beats_scratch_beyond_spread"] is None:
      verdict = "one seed: no spread to compare with"
    else:
      verdict = (
        f"{'more' if c['beats_scratch_beyond_spread'] else 'NOT more'} than the seed spread {c['seed_spread']:.4f}"
      )
    gap = f"; {c['gap_closed']:.0%} of the scratch-teacher gap" if c["gap_closed"] is not None else ""
    lines.append(f"- {name}: {c['gain_over_scratch']:+.4f} bits/byte below scratch ({verdict}{gap}).")
  if topk_vs_dense is not None:
    share = topk_vs_dense["share_of_dense_gain"]
    lines.append(
      f"Top-{topk_vs_dense['k']} cache vs dense KD: {topk_vs_dense['difference_percent']:+.2f}% bits/byte"
      + (
        f"; it keeps {share:.0%} of dense KD's gain over scratch."
        if share is not None
        else " (dense KD did not beat scratch)."
      )
    )
  if equal_time_steps and "scratch" in summary:
    sps = {name: summary[name]["seconds_per_step"]["mean"] for name in summary}
    cached = [sps[n] / sps["scratch"] for n in summary if n.startswith("topk_k")]
    fits = "; ".join(
      f"{steps} scratch steps fit in {labels.get(reference, reference)}'s {config.student_steps}"
      for name, steps in equal_time_steps.items()
      for reference in [equal_time_references(config)[name]]
    )
    lines.append(
      f"Equal time: {fits} (by seed {config.seeds[0]}'s steady step times); over all seeds a dense-KD step took "
      f"{sps['dense_kd'] / sps['scratch']:.2f}x a scratch step"
      + (f" and a cached step {min(cached):.2f}-{max(cached):.2f}x." if cached else ".")
    )
    for name, reference in equal_time_references(config).items():
      if name in summary and reference in summary:
        difference = bpb(name)["mean"] - bpb(reference)["mean"]
        spread = max(bpb(name)["std"], bpb(reference)["std"])
        lines.append(
          f"At equal wall time, {labels[reference]} is {abs(difference):.4f} bits/byte "
          f"{'below' if difference > 0 else 'above'} {labels[name]} "
          f"({'more' if abs(difference) > spread else 'NOT more'} than the seed spread {spread:.4f})."
        )
  if cache is not None:
    formula = cache["formula_bytes_per_token"][str(cache["k"])]
    mass = ", ".join(f"k={k}: {m:.2f}" for k, m in cache["teacher_topk_mass"].items())
    lines.append(
      f"Cache: k = {cache['k']} over the {cache['num_windows']} training windows the students see "
      f"({cache['num_tokens']} tokens): {cache['file_bytes'] / 1e6:.1f} MB on disk, "
      f"{cache['file_bytes_per_token']:.1f} bytes/token (the formula's {formula}); dense float32 logits would take "
      f"{4 * vocab} bytes/token. Written in {cache['write_seconds']:.0f} s. The teacher's mean probability in its "
      f"top k: {mass}."
    )
  text_md = "# lm_distill\n\n" + table + "\n" + "\n".join(lines) + "\n"
  (workdir / "results.md").write_text(text_md)

  if ks:
    hlines = {"dense KD": bpb("dense_kd")["mean"], "scratch": scratch["mean"]}
    if "scratch_equal_time" in summary:
      hlines["scratch, dense KD's time"] = bpb("scratch_equal_time")["mean"]
    if "scratch_cached_time" in summary:
      hlines["scratch, cached run's time"] = bpb("scratch_cached_time")["mean"]
    common.plot_lines(
      workdir / "topk.png",
      {
        f"top-k cache ({config.tail}{'; k=1: bucket' if 1 in ks else ''})": (
          ks,
          [bpb(f"topk_k{k}")["mean"] for k in ks],
        )
      },
      xlabel="k (teacher tokens kept per position)",
      ylabel="test bits per byte",
      title=f"{config.student_size} student from a {config.teacher_size} teacher",
      logx=True,
      hlines=hlines,
    )
  results = {
    "config": config.to_dict(),
    **data.info,
    "params": params,
    "param_ratio": ratio,
    "teacher": dict(teacher_result),
    "runs": {name: list(results) for name, results in done.items()},
    "summary": summary,
    "comparisons": comparisons,
    "topk_vs_dense": topk_vs_dense,
    "equal_time_steps": equal_time_steps,
    "cache": cache,
    "dense_bytes_per_token": 4 * vocab,
    "rows": rows,
  }
  common.write_json(workdir / "results.json", results)
  print(text_md, flush=True)
  return results


if __name__ == "__main__":
  common.main(get_config, run)
