"""Input pipeline and whole epochs on Fashion-MNIST: does the data feed keep the train step busy?

Measured, the compared variants in alternation (see :mod:`benchmarks.common`):

* ``pipeline``: examples/s of the input pipeline alone, one training epoch of
  :class:`jaxkd.data.BatchIterator` + :class:`jaxkd.data.DevicePrefetcher` (batches placed on the devices and
  waited for, no step), with cached teacher logits in the batch and without.
* per student MLP (784-100-10 and 784-800-800-10 by default), against a teacher MLP 784-1200-1200-10:

  - ``step``: the pure step rate of the offline (cached-logit) distillation step on one batch held on device,
    scaled to an epoch: ``steps_per_epoch * seconds_per_step``;
  - ``epoch_cached``: a full epoch end to end, pipeline + offline step (cached teacher logits in the batch);
  - ``epoch_online``: a full epoch end to end, pipeline + online step (the teacher runs inside the step);
  - ``epoch_fm``: function matching (Beyer et al. 2022): the online step with mixup computed inside it
    (:func:`jaxkd.data.augment.mixup`, Beta(1, 1) per example) and KD only, the main job's function-matching arm;
  - ``epoch_scan``: ``epoch_cached`` with ``steps_per_call=STEPS_PER_CALL`` (``lax.scan`` over that many
    stacked batches per call, :func:`jaxkd.data.stack`), NumPy batches straight to the step.

  ``epoch_cached / step`` is what the pipeline costs on top of the step (target <= 1.10), ``epoch_scan / step``
  the same with several steps per call; ``epoch_online / epoch_cached`` is what running the teacher in every step
  costs against reading cached logits, ``epoch_fm / epoch_online`` what the on-device mixup adds to it (target
  <= 1.10).

``--teacher cnn`` uses the main job's CNN teacher (conv32-conv64-dense256) instead of the MLP 784-1200-1200-10.

The teacher is randomly initialised (speed does not depend on its weights). Building the logit cache
(:func:`jaxkd.data.logit_cache.cached_teacher_logits`, one teacher pass over the split) is timed once and reported.

Run (about 2 minutes on 2 CPU cores; reads the prepared Fashion-MNIST)::

  python -m benchmarks.pipeline
  python -m benchmarks.pipeline --batch_size 256 --placement pmap
  python -m benchmarks.pipeline --gpu --dtype bfloat16

Writes ``<out>/pipeline.json``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from benchmarks import common
from jaxkd.data import BatchIterator, DevicePrefetcher, stack
from jaxkd.data.augment import mixup
from jaxkd.data.datasets import NORMALIZATION, ArrayDataset, load
from jaxkd.data.logit_cache import cached_teacher_logits
from jaxkd.models import CNN, MLP
from jaxkd.placement import Placement, as_placement
from jaxkd.state import create_train_state
from jaxkd.train import make_train_step

TEMPERATURE = 4.0
ALPHA = 0.9
# Steps per call of the epoch_scan variant: about 0.1 s of the 784-100-10 student's steps at batch 128 on 2 cores.
STEPS_PER_CALL = 8

SETTINGS = {
  "cpu": {"students": ((100,), (800, 800)), "teacher": (1200, 1200), "batch_size": 128, "rounds": 3},
  "gpu": {"students": ((100,), (800, 800)), "teacher": (1200, 1200), "batch_size": 512, "rounds": 5},
  "quick": {"students": ((8,),), "teacher": (16,), "batch_size": 32, "rounds": 2, "num_examples": 256},
}


def _synthetic(num_examples: int) -> ArrayDataset:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(num_examples, 28, 28, 1), dtype=np.uint8)
  return ArrayDataset(images, rng.integers(0, 10, size=num_examples), num_classes=10, name="synthetic", split="train")


def _describe(hidden: Sequence[int]) -> str:
  return f"784-{'-'.join(map(str, hidden))}-10"


class _Epochs:
  """Builds the iterators of one configuration; every call starts a fresh one-epoch pipeline, as a user loop does."""

  def __init__(
    self,
    data: ArrayDataset,
    *,
    batch_size: int,
    placement: Placement,
    mean,
    std,
    teacher_logits=None,
    steps: int = 1,
    prefetch: bool = True,
  ):
    self.kwargs = dict(
      batch_size=batch_size, train=True, num_epochs=1, mean=mean, std=std, teacher_logits=teacher_logits
    )
    self.data = data
    self.placement = placement
    self.steps = steps
    self.prefetch = prefetch
    self.epoch = 0

  def __call__(self) -> Any:
    self.epoch += 1
    batches = stack(BatchIterator(self.data, seed=self.epoch, **self.kwargs), self.steps)
    if self.prefetch:
      return DevicePrefetcher(batches, placement=self.placement, size=2)
    return _Closing(batches)

  @property
  def steps_per_epoch(self) -> int:
    return BatchIterator(self.data, **self.kwargs).steps_per_epoch


class _Closing:
  """A context manager around a plain iterator, like DevicePrefetcher's."""

  def __init__(self, iterator: Any):
    self.iterator = iterator

  def __enter__(self) -> Any:
    return self.iterator

  def __exit__(self, *exc_info: Any) -> None:
    pass


def _time_student(
  student: MLP,
  placement: Placement,
  cached_epochs: _Epochs,
  scan_epochs: _Epochs,
  plain_epochs: _Epochs,
  online: tuple[Any, Any],
  fm_step: Any,
  rounds: int,
  block_s: float,
  log: bool,
) -> common.Timings:
  """Pure offline step on a held batch, offline epoch and online epoch, in alternation, for one student."""
  offline_step = make_train_step(temperature=TEMPERATURE, alpha=ALPHA, placement=placement)
  scan_step = make_train_step(
    temperature=TEMPERATURE, alpha=ALPHA, placement=placement, steps_per_call=scan_epochs.steps
  )
  online_step, online_teacher = online
  tx = optax.adam(1e-3)
  example = cached_epochs.data.images[:1].astype(np.float32)
  names = ("step", "cached", "online", "scan", "fm")
  states = {name: placement.put(create_train_state(student, tx, example, rng=0)) for name in names}
  with cached_epochs() as batches:
    held = next(batches)  # one batch on device, reused by the pure step
  with plain_epochs() as batches:
    held_plain = next(batches)
  # Compile both steps outside the timed epochs.
  states["step"], _ = offline_step(states["step"], None, held)
  states["cached"], _ = offline_step(states["cached"], None, held)
  states["online"], _ = online_step(states["online"], online_teacher, held_plain)
  states["fm"], _ = fm_step(states["fm"], online_teacher, held_plain)
  with scan_epochs() as batches:
    states["scan"], _ = scan_step(states["scan"], None, next(batches))
  jax.block_until_ready(states)

  def run_steps(n: int) -> None:
    state = states["step"]
    for _ in range(n):
      state, _ = offline_step(state, None, held)
    states["step"] = jax.block_until_ready(state)

  def epoch_variant(name: str, epochs: _Epochs, step, teacher_variables) -> common.Variant:
    def run_epochs(n: int) -> None:
      state = states[name]
      for _ in range(n):
        with epochs() as batches:
          for batch in batches:
            state, _ = step(state, teacher_variables, batch)
      states[name] = jax.block_until_ready(state)

    return common.Variant(f"epoch_{name}", run_epochs, warmup=0, units_per_block=1)

  variants = [
    common.Variant("step", run_steps, warmup=1),
    epoch_variant("cached", cached_epochs, offline_step, None),
    epoch_variant("online", plain_epochs, online_step, online_teacher),
    epoch_variant("fm", plain_epochs, fm_step, online_teacher),
    epoch_variant("scan", scan_epochs, scan_step, None),
  ]
  return common.interleave(variants, rounds=rounds, block_s=block_s, log=log)


EPOCH_COLUMNS = [
  *("student", "step_rate_steps_s", "step_only_epoch_s", "epoch_cached_s", "cached_epoch_over_step"),
  *("epoch_scan_s", "scan_epoch_over_step"),
  *("cached_epoch_over_step_cpu", "epoch_online_s", "online_over_cached", "online_over_cached_cpu"),
  *("epoch_fm_s", "fm_over_online"),
]


def _teacher_logits(teacher: Any, data: Any, *, mean: Any, std: Any) -> tuple[Any, Any, float]:
  """Host-made teacher variables, the teacher's logits of every example through the logit cache (in a temporary
  directory), and the seconds the cache took to build."""
  teacher_variables = common.host_variables(teacher, np.zeros((1, *data.images.shape[1:]), np.float32), seed=1)
  with tempfile.TemporaryDirectory() as cache_dir:
    start = time.perf_counter()
    logits = cached_teacher_logits(
      functools.partial(teacher.apply, train=False), teacher_variables, data, cache_dir=cache_dir, mean=mean, std=std
    )
    return teacher_variables, logits, time.perf_counter() - start


def _load_data(setting: str, dataset: str, config: dict) -> tuple[Any, Any, Any]:
  """``(data, mean, std)``: synthetic images for the smoke test, else the dataset's training split."""
  if setting == "quick" or dataset == "synthetic":
    mean, std = NORMALIZATION["fashion_mnist"]
    return _synthetic(config.get("num_examples", 60_000)), mean, std
  start = time.perf_counter()
  data = load(dataset, "train")
  print(f"loaded {data!r} in {time.perf_counter() - start:.1f} s", flush=True)
  mean, std = NORMALIZATION[dataset]
  return data, mean, std


def _make_teacher(teacher: str, config: dict, compute_dtype: Any) -> tuple[Any, str]:
  """The online teacher module and its description: the setting's MLP or the main job's CNN."""
  if teacher == "cnn":
    module = CNN(features=(32, 64), dense_size=256, num_classes=10, dropout_rate=0.3, dtype=compute_dtype)
    return module, "CNN conv32-conv64-dense256"
  return MLP(config["teacher"], dtype=compute_dtype), _describe(config["teacher"])


def epoch_sources(data: Any, logits: Any, **epoch_kwargs: Any) -> dict[str, _Epochs]:
  """The epochs timed: with cached logits, images only, and groups of STEPS_PER_CALL for the scanned step."""
  return {
    "cached": _Epochs(data, teacher_logits=logits, **epoch_kwargs),
    "plain": _Epochs(data, **epoch_kwargs),
    # NumPy groups straight to the scanned step: the prefetcher's thread costs more than it hides on CPU.
    "scan": _Epochs(data, teacher_logits=logits, steps=STEPS_PER_CALL, prefetch=False, **epoch_kwargs),
  }


def pipeline_alone(epochs: dict[str, _Epochs], data_name: str, batch_size: int, placement, *, rounds, log) -> dict:
  """Table (a): epochs of batches alone (no step), with and without teacher logits."""
  cached_epochs, plain_epochs = epochs["cached"], epochs["plain"]
  title = f"pipeline alone: BatchIterator + DevicePrefetcher, {data_name}, batch {batch_size}, {placement!r}"
  examples_per_epoch = cached_epochs.steps_per_epoch * cached_epochs.kwargs["batch_size"]

  def pipeline_variant(name: str, epochs: _Epochs) -> common.Variant:
    def run_epochs(n: int) -> None:
      for _ in range(n):
        with epochs() as batches:
          for batch in batches:
            jax.block_until_ready(batch)

    return common.Variant(name, run_epochs, warmup=0, units_per_block=1)

  timings = common.interleave(
    [pipeline_variant("pipeline_cached", cached_epochs), pipeline_variant("pipeline_plain", plain_epochs)],
    rounds=rounds,
    log=log,
  )
  rows = [
    {
      "batches": {"pipeline_cached": "with teacher_logits", "pipeline_plain": "images only"}[name],
      "examples_s": examples_per_epoch / statistics.median(timings.wall[name]),
      "epoch_s": statistics.median(timings.wall[name]),
      "epoch_cpu_s": statistics.median(timings.cpu[name]),
    }
    for name in timings.wall
  ]
  table = common.print_table(title, rows, ["batches", "examples_s", "epoch_s", "epoch_cpu_s"])
  return {"rows": rows, "table": table}


def time_students(
  students, teacher, teacher_variables, epochs: dict, placement, compute_dtype, rounds, block_s, log
) -> list[tuple[Sequence[int], common.Timings]]:
  """Each student's timings of a held-batch step and of the cached, online, function-matching and scanned epochs."""
  online_step = make_train_step(
    teacher_apply_fn=teacher.apply, temperature=TEMPERATURE, alpha=ALPHA, placement=placement
  )
  online = (online_step, placement.put(teacher_variables))
  fm_step = make_train_step(
    teacher_apply_fn=teacher.apply, temperature=1.0, alpha=1.0, placement=placement, augment=mixup(alpha=1.0)
  )
  out = []
  for hidden in students:
    student = MLP(hidden, dtype=compute_dtype)
    timings = _time_student(
      student, placement, epochs["cached"], epochs["scan"], epochs["plain"], online, fm_step, rounds, block_s, log
    )
    out.append((hidden, timings))
  return out


def epochs_title(data_name: str, batch_size: int, placement: Any, teacher_description: str) -> str:
  return (
    f"epochs on {data_name}, batch {batch_size}, {placement!r}, scan of {STEPS_PER_CALL} steps (target "
    f"cached_epoch_over_step <= 1.10, fm_over_online <= 1.10; teacher {teacher_description}; _cpu: by process CPU "
    "time)"
  )


def student_row(hidden: Sequence[int], timings: common.Timings, steps_per_epoch: int) -> dict[str, Any]:
  """Table (b)/(c)'s row of one student: epochs against steps, online against cached, fm against online."""
  # The scanned epoch covers whole groups of STEPS_PER_CALL steps only.
  scan_steps = steps_per_epoch // STEPS_PER_CALL * STEPS_PER_CALL
  step_epoch = [s * steps_per_epoch for s in timings.wall["step"]]
  wall, cpu = timings.wall, timings.cpu
  return {
    "student": _describe(hidden),
    "steps_per_epoch": steps_per_epoch,
    "step_rate_steps_s": 1.0 / statistics.median(wall["step"]),
    "step_only_epoch_s": statistics.median(step_epoch),
    "epoch_cached_s": statistics.median(wall["epoch_cached"]),
    "epoch_online_s": statistics.median(wall["epoch_online"]),
    "cached_epoch_over_step": common.median_ratio(wall["epoch_cached"], step_epoch),
    "epoch_scan_s": statistics.median(wall["epoch_scan"]),
    "scan_epoch_over_step": common.median_ratio(wall["epoch_scan"], [s * scan_steps for s in wall["step"]]),
    "online_over_cached": common.median_ratio(wall["epoch_online"], wall["epoch_cached"]),
    "epoch_fm_s": statistics.median(wall["epoch_fm"]),
    "fm_over_online": common.median_ratio(wall["epoch_fm"], wall["epoch_online"]),
    "cached_epoch_over_step_cpu": common.median_ratio(cpu["epoch_cached"], [s * steps_per_epoch for s in cpu["step"]]),
    "online_over_cached_cpu": common.median_ratio(cpu["epoch_online"], cpu["epoch_cached"]),
    "seconds_rounds": {"wall": wall, "cpu": cpu},
  }


def run(
  *,
  setting: str = "cpu",
  students: Sequence[Sequence[int]] | None = None,
  batch_size: int | None = None,
  placement: str = "pmap",
  dtype: str = "float32",
  rounds: int | None = None,
  dataset: str = "fashion_mnist",
  out_dir: str | None = None,
  log: bool = False,
  teacher: str = "mlp",
) -> dict[str, Any]:
  """Runs the pipeline benchmark, prints its tables and writes ``pipeline.json``.

  Args:
    setting: ``'cpu'``, ``'gpu'`` or ``'quick'`` (synthetic data, tiny models: the smoke test).
    students: hidden sizes of each student MLP.
    batch_size: global batch size.
    placement: the step's placement (``'pmap'``, ``'single'`` or ``'data_parallel'``).
    dtype: the students' and teacher's computation dtype.
    rounds: alternation rounds.
    dataset: ``'fashion_mnist'`` (or ``'mnist'``), the training split; ``'synthetic'`` for random images.
    out_dir: where the JSON goes.
    log: print every round's times.
    teacher: ``'mlp'`` (the setting's MLP teacher) or ``'cnn'`` (the main job's CNN teacher).
  """
  config = SETTINGS[setting]
  block_s = 0.01 if setting == "quick" else 1.0
  students = tuple(tuple(s) for s in (students or config["students"]))
  batch_size = batch_size or config["batch_size"]
  rounds = rounds or config["rounds"]
  compute_dtype = common.dtype_of(dtype)
  placement_name, placement = placement, as_placement(placement)
  data, mean, std = _load_data(setting, dataset, config)
  teacher_name = teacher
  teacher, teacher_description = _make_teacher(teacher, config, compute_dtype)
  teacher_variables, logits, cache_build_s = _teacher_logits(teacher, data, mean=mean, std=std)
  print(
    f"pipeline: {data.name} ({len(data)} examples), batch {batch_size}, placement={placement!r}, teacher "
    f"{teacher_description}, {dtype}, {jax.local_device_count()} local device(s), {common.cpu_cores()} "
    f"cores, {rounds} rounds; logit cache built in {cache_build_s:.1f} s",
    flush=True,
  )
  epochs = epoch_sources(data, logits, batch_size=batch_size, placement=placement, mean=mean, std=std)
  steps_per_epoch = epochs["cached"].steps_per_epoch
  # (a) The pipeline alone.
  alone = pipeline_alone(epochs, data.name, batch_size, placement, rounds=rounds, log=log)

  # (b), (c) and online vs cached, per student.
  timed = time_students(students, teacher, teacher_variables, epochs, placement, compute_dtype, rounds, block_s, log)
  rows = [student_row(hidden, timings, steps_per_epoch) for hidden, timings in timed]
  table = common.print_table(epochs_title(data.name, batch_size, placement, teacher_description), rows, EPOCH_COLUMNS)
  results = {
    "benchmark": "pipeline",
    "dataset": data.name,
    "num_examples": len(data),
    "batch_size": batch_size,
    "placement": placement_name,
    "steps_per_call": STEPS_PER_CALL,
    "dtype": dtype,
    "teacher": teacher_description,
    "teacher_kind": teacher_name,
    "temperature": TEMPERATURE,
    "alpha": ALPHA,
    "rounds": rounds,
    "logit_cache_build_s": cache_build_s,
    "pipeline_rows": alone["rows"],
    "pipeline_table": alone["table"],
    "rows": rows,
    "table": table,
    "environment": common.environment(),
  }
  common.write_results(out_dir, "pipeline", results)
  return results


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--placement", default="pmap", choices=("pmap", "single", "data_parallel"))
  parser.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "mnist", "synthetic"))
  parser.add_argument("--gpu", action="store_true", help="GPU settings (batch 512)")
  parser.add_argument("--quick", action="store_true", help="synthetic data and tiny models, for the smoke test")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
  parser.add_argument("--log", action="store_true", help="print every round's times")
  parser.add_argument("--teacher", default="mlp", choices=("mlp", "cnn"), help="the teacher run online")
  args = parser.parse_args(argv)
  run(
    setting="quick" if args.quick else "gpu" if args.gpu else "cpu",
    batch_size=args.batch_size,
    placement=args.placement,
    dtype=args.dtype,
    rounds=args.rounds,
    dataset=args.dataset,
    out_dir=args.out,
    log=args.log,
    teacher=args.teacher,
  )


if __name__ == "__main__":
  main()
