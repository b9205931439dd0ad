"""One image-classifier sub-run (a teacher, a scratch student or a distilled student) as a value: :class:`SubRun`.

A :class:`SubRun` says everything that determines what a sub-run computes; :func:`train_subrun` trains it in
``workdir/name`` (where it runs and how often it checkpoints are the only other arguments). Its
:attr:`SubRun.description` is the JSON that ``inputs.json`` records, and its :attr:`SubRun.fingerprint` the digest
of that description, so there is one value to keep complete, not a signature and a copy of it kept in step: a field
that changes a run changes its description, and :mod:`experiments._resume` reuses a finished run only for an
equal one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import _resume
from jaxkd import artifacts


@dataclasses.dataclass(frozen=True, eq=False)
class SubRun:
  """What determines one sub-run; two sub-runs are equal when their descriptions are.

  The student learns online from ``teacher_apply_fn`` (on the same augmented batch), or offline from
  ``teacher_logits`` (rows aligned with ``train_set``), or from labels alone when neither is given. With a
  :class:`jaxkd.Objective` as ``method`` it learns online from ``teacher_apply_fn`` by that method's loss terms
  (``loss_fn``, ``alpha`` unused; batches carry ``'index'``, whose largest value sets the number of rows of
  per-example term state such as CRD's memory bank); ``params`` then counts the student alone, without its
  adapters. ``augment`` (:mod:`jaxkd.data.augment`) runs inside the step, once, so a live teacher sees exactly the
  student's augmented view. ``curve_every = E > 0`` also evaluates every eval set every E epochs of training (a
  learning curve; training itself is unchanged). ``config`` (the sub-config the run depends on) and ``meta``
  (provenance, e.g. the teacher checkpoint's) are stored with its checkpoints.
  """

  model: Any
  train_set: Any
  eval_sets: Mapping[str, Any]
  num_epochs: float
  batch_size: int
  learning_rate: float
  seed: int
  mean: Any
  std: Any
  teacher_apply_fn: Callable | None = None
  teacher_variables: Any = None
  teacher_logits: np.ndarray | None = None
  temperature: float = 1.0
  alpha: float = 0.5
  loss_fn: Callable | None = None
  max_translation: int = 0
  weight_decay: float = 0.0
  config: Any = None
  meta: Mapping[str, Any] | None = None
  method: Any = None
  augment: Callable | None = None
  curve_every: float = 0.0

  @functools.cached_property
  def description(self) -> dict[str, Any]:
    """Every field as JSON: models, functions and methods by :func:`jaxkd.data.logit_cache.describe` (a Flax module
    field by field), datasets, teacher logits and variables by :func:`jaxkd.artifacts.tree_fingerprint` of their
    contents. Temperature, alpha and the loss only count where a teacher is; alpha not with a method."""
    distilled = self.teacher_apply_fn is not None or self.teacher_logits is not None
    teacher = None
    if self.teacher_apply_fn is not None:
      teacher = {
        "apply_fn": _describe(self.teacher_apply_fn),
        "variables_sha256": artifacts.tree_fingerprint(self.teacher_variables),
      }
    recorded_teacher = (self.meta or {}).get("teacher")
    config = self.config.to_dict() if isinstance(self.config, ml_collections.ConfigDict) else self.config
    description = {
      "model": _describe_model(self.model),
      "train_set": _describe_dataset(self.train_set),
      "eval_sets": {split: _describe_dataset(dataset) for split, dataset in self.eval_sets.items()},
      "num_epochs": float(self.num_epochs),
      "batch_size": int(self.batch_size),
      "learning_rate": float(self.learning_rate),
      "seed": int(self.seed),
      "mean": np.asarray(self.mean, np.float64).reshape(-1).tolist(),
      "std": np.asarray(self.std, np.float64).reshape(-1).tolist(),
      "max_translation": int(self.max_translation),
      "weight_decay": float(self.weight_decay),
      "teacher": teacher,
      "teacher_logits_sha256": (
        artifacts.tree_fingerprint(self.teacher_logits) if self.teacher_logits is not None else None
      ),
      "teacher_checkpoint": recorded_teacher.get("fingerprint") if isinstance(recorded_teacher, Mapping) else None,
      "temperature": float(self.temperature) if distilled else None,
      "alpha": float(self.alpha) if distilled and self.method is None else None,
      "loss_fn": _describe(self.loss_fn) if distilled and self.loss_fn is not None else None,
      "method": _describe(self.method) if self.method is not None else None,
      "augment": _describe(self.augment) if self.augment is not None else None,
      "curve_every": float(self.curve_every),
      "config": config,
    }
    return _resume.canonical(description)

  @property
  def fingerprint(self) -> str:
    """The digest of :attr:`description`: equal for equal sub-runs, different when any field that counts differs."""
    return _resume.fingerprint(self.description)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, SubRun) and self.description == other.description

  def __hash__(self) -> int:
    return hash(self.fingerprint)


def train_subrun(
  workdir: pathlib.Path, name: str, run: SubRun, *, placement: Any = "pmap", checkpoint_every: int = 500
) -> dict[str, Any]:
  """Trains ``run`` in ``workdir/name``; resumable, and reused when finished (see :mod:`experiments._resume`).

  Returns:
    ``result.json``'s content: the ``fingerprint``, ``num_steps``, ``train_seconds``, ``{split}_accuracy`` and
    ``{split}_errors`` per eval set and ``params``; with ``curve_every``, ``curve``:
    ``[{"epoch", "{split}_accuracy", "{split}_errors"}, ...]``.
  """
  from jaxkd.placement import as_placement

  placement = as_placement(placement)
  work = functools.partial(_train, run, name, placement, checkpoint_every)
  return _resume.resumable(workdir, name, run.description, work, say_reused=False)


def _batches(run: SubRun) -> Any:
  from jaxkd import data as data_lib

  return data_lib.BatchIterator(
    run.train_set,
    batch_size=run.batch_size,
    train=True,
    seed=run.seed,
    mean=run.mean,
    std=run.std,
    max_translation=run.max_translation,
    teacher_logits=run.teacher_logits,
    include_index=run.method is not None,
  )


def _initial_state(run: SubRun, num_steps: int) -> Any:
  import optax

  from jaxkd import state as state_lib

  schedule = optax.cosine_decay_schedule(run.learning_rate, num_steps)
  tx = optax.adamw(schedule, weight_decay=run.weight_decay) if run.weight_decay else optax.adam(schedule)
  example = np.zeros((1, *run.train_set.images.shape[1:]), np.float32)
  if run.method is None:
    return state_lib.create_train_state(run.model, tx, example, rng=run.seed)
  return state_lib.create_train_state(
    run.model,
    tx,
    example,
    rng=run.seed,
    objective=run.method,
    teacher=run.teacher_apply_fn,
    teacher_variables=run.teacher_variables,
    num_data=int(np.max(run.train_set.indices)) + 1,
  )


def _train(run: SubRun, name: str, placement: Any, checkpoint_every: int, run_dir: pathlib.Path) -> dict[str, Any]:
  """Trains (or resumes) ``run`` in ``run_dir`` and evaluates it: the result without its fingerprint."""
  from jaxkd import train as train_lib
  from jaxkd.training import loop as trainer

  steps_per_epoch = _batches(run).steps_per_epoch
  num_steps = max(1, int(round(run.num_epochs * steps_per_epoch)))
  train_step = train_lib.make_train_step(
    teacher_apply_fn=run.teacher_apply_fn,
    objective=run.method,
    loss_fn=run.loss_fn,
    temperature=run.temperature,
    alpha=run.alpha,
    placement=placement,
    augment=run.augment,
  )
  curve_steps = max(1, int(round(run.curve_every * steps_per_epoch))) if run.curve_every > 0 else 0
  # One eval step for the curve's points and the final evaluation: a new one would compile again each time.
  eval_step = train_lib.make_eval_step(placement=placement)

  def eval_fn(state):
    metrics = _evaluate_splits(eval_step, state, run.eval_sets, mean=run.mean, std=run.std)
    return {key: value for key, value in metrics.items() if key != "params"}

  start = time.perf_counter()
  result = trainer.fit(
    _initial_state(run, num_steps),
    train_step=train_step,
    train_data=_maybe_prefetch(_batches(run), placement),
    num_steps=num_steps,
    teacher_variables=run.teacher_variables if run.teacher_apply_fn is not None else None,
    workdir=run_dir,
    checkpoint_every=checkpoint_every,
    log_every=min(100, num_steps),
    config=run.config,
    meta=run.meta,
    progress=name,
    eval_fn=eval_fn if curve_steps else None,
    eval_every=curve_steps,
  )
  if result.preempted:
    raise SystemExit(143)
  out = {"num_steps": num_steps, "train_seconds": time.perf_counter() - start}
  out |= _evaluate_splits(eval_step, result.state, run.eval_sets, mean=run.mean, std=run.std)
  if curve_steps:
    out["curve"] = learning_curve(run_dir / "metrics.jsonl", steps_per_epoch)
  return out


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


def _describe_dataset(dataset: Any) -> dict[str, Any]:
  return {
    "name": dataset.name,
    "split": dataset.split,
    "filters": list(dataset.filters),
    "examples": len(dataset),
    "sha256": artifacts.tree_fingerprint((dataset.images, dataset.labels, dataset.indices)),
  }


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
