"""lm_distill's sub-runs: one language model trained with :func:`jaxkd.training.fit`, timed, and scored exactly.

The bookkeeping (reuse a finished run, resume an unfinished one, set aside a stale one) is
:func:`experiments.common.resumable`'s, as for every experiment's sub-runs.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common


def describe_module(module: Any) -> dict[str, str]:
  fields = [f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name")]
  return {"class": type(module).__qualname__} | {name: repr(getattr(module, name)) for name in fields}


def optimizer(learning_rate: float, num_steps: int, config: ml_collections.ConfigDict):
  import optax

  warmup = max(1, int(round(config.warmup_fraction * num_steps)))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(num_steps, warmup + 1), 0.0)
  return optax.chain(
    optax.clip_by_global_norm(config.grad_clip), optax.adamw(schedule, weight_decay=config.weight_decay)
  )


class StepTimer:
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


def _add_timing(run_dir: pathlib.Path, wall_seconds: float, timer: StepTimer) -> dict[str, float]:
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
  """Trains one LM in ``workdir/name`` with :func:`jaxkd.training.fit`; resumable and fingerprinted by
  :func:`experiments.common.resumable`, the bookkeeping of :func:`experiments.common.train_subrun`.

  ``inputs`` (JSON) is everything that determines the run, and its fingerprint is that description's; a finished
  run with the same fingerprint is returned as it is, an unfinished one resumes from its last checkpoint, one of
  other inputs is moved aside. ``after`` (the teacher's) writes extra outputs from the run's test predictions
  before ``result.json`` marks it finished.

  Returns:
    ``result.json``: test metrics, ``num_steps``, ``params``, ``wall_seconds`` and ``seconds_per_step`` (steady
    steps, compilation left out) over all calls of fit, and the inputs' ``fingerprint``.
  """
  inputs = common.canonical(inputs)

  def work(run_dir: pathlib.Path) -> dict[str, Any]:
    import jaxkd
    from jaxkd import lm
    from jaxkd.models import count_params
    from jaxkd.training import loop as trainer

    state = jaxkd.create_train_state(
      lm.lm_model(module),
      optimizer(learning_rate, num_steps, config),
      {"tokens": np.zeros((2, config.context), np.int32)},
      rng=seed,
    )
    teacher = lm.lm_model(teacher_module, name="teacher") if teacher_module is not None else None
    step = jaxkd.make_train_step(teacher_apply_fn=teacher, objective=objective, placement=config.placement)
    timer = StepTimer()
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
    top1_of_teacher = teacher_top1() if teacher_top1 else None
    metrics, top1 = evaluator(module, result.state, desc=name, teacher_top1=top1_of_teacher)
    out = {
      "num_steps": num_steps,
      "params": count_params(result.state.params),
      "wall_seconds": timing["wall_seconds"],
      "seconds_per_step": timing["timed_seconds"] / timing["timed_steps"] if timing["timed_steps"] else None,
      **metrics,
    }
    return out | (after(run_dir, top1) if after is not None else {})

  return common.resumable(workdir, name, inputs, work)
