"""lm_step's settings, models and the variants each table times: the jaxkd steps, dense against chunked against
cached top-k, and epochs read from a top-k cache against scratch epochs. :mod:`benchmarks.lm_step` times them and
writes the tables.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks._lm_step_reference import (  # re-exported: the references the tables compare with
  ALPHA,
  LEARNING_RATE,
  WEIGHT_DECAY,
  make_hand_step,
  torch_variant,
  xla_cost,
)
from jaxkd import lm
from jaxkd.lm.text import TokenSequences, token_batches
from jaxkd.lm.topk_cache import JoinedSource, topk_cache_key, write_topk_cache
from jaxkd.lm.transformer import TransformerLM, lm_config
from jaxkd.losses import teacher_topk
from jaxkd.state import create_train_state
from jaxkd.train import make_train_step

SETTINGS: dict[str, dict[str, Any]] = {
  "cpu": dict(
    teacher="teacher",
    student="student",
    vocab=8192,
    length=128,
    batch=16,
    memory=(32768, 512, 8),
    chunks=(32, 64, 128),
    k=32,
    epoch_sequences=64,
    rounds=5,
    block_s=0.3,
  ),
  "gpu": dict(
    teacher="gpu_teacher",
    student="gpu_student",
    vocab=32768,
    length=1024,
    batch=8,
    memory=(32768, 1024, 8),
    chunks=(64, 128, 256),
    k=32,
    epoch_sequences=128,
    rounds=7,
    block_s=0.3,
  ),
  "quick": dict(
    teacher="tiny",
    student="tiny",
    vocab=256,
    length=16,
    batch=4,
    memory=(256, 16, 4),  # the timed size: the memory table reuses the timed steps' compilations
    chunks=(8,),
    k=8,
    epoch_sequences=8,
    rounds=2,
    block_s=0.01,
  ),
}


def make_models(
  setting: str, *, vocab: int, length: int, dtype: Any = jnp.float32
) -> tuple[TransformerLM, TransformerLM]:
  """``(teacher, student)`` modules of a setting's presets."""
  config = SETTINGS[setting]
  teacher = TransformerLM(**lm_config(config["teacher"], vocab_size=vocab, max_len=length), dtype=dtype)
  student = TransformerLM(**lm_config(config["student"], vocab_size=vocab, max_len=length), dtype=dtype)
  return teacher, student


def describe(module: TransformerLM) -> str:
  return f"{module.num_layers}x{module.d_model}"


def param_count(module: TransformerLM, length: int = 1) -> int:
  shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, length), jnp.int32))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


@functools.cache
def optimizer() -> optax.GradientTransformation:
  """``optax.adamw``, one object: a train state holds it as static data, so compilations are shared only with it."""
  return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def random_tokens(batch: int, length: int, vocab: int, *, seed: int = 0) -> dict[str, np.ndarray]:
  """``{'tokens', 'label'}`` int32 ``[batch, length]``: a random window and its next tokens."""
  window = np.random.default_rng(seed).integers(0, vocab, size=(batch, length + 1)).astype(np.int32)
  return {"tokens": window[:, :-1], "label": window[:, 1:]}


def topk_batch(teacher: TransformerLM, teacher_variables: Any, batch: dict[str, np.ndarray], k: int) -> dict:
  """The batch with the teacher's top k as a top-k cache stores it (float16 logits, uint16 ids)."""
  top = teacher_topk(jax.jit(teacher.apply)(teacher_variables, batch["tokens"]), k=k)
  return {
    **batch,
    "teacher_topk_logits": np.asarray(top["topk_logits"]).astype(np.float16),
    "teacher_topk_indices": np.asarray(top["topk_indices"]).astype(np.uint16),
    "teacher_log_normalizer": np.asarray(top["log_normalizer"]),
  }


# ---------------------------------------------------------------------------------------------------------------------
# Timed variants.


def _jaxkd_variant(name: str, step: Any, state: Any, teacher_variables: Any, batch: dict, host: list) -> common.Variant:
  holder = {"state": state}

  def run(n: int) -> None:
    start = time.thread_time()
    state = holder["state"]
    for _ in range(n):
      state, _ = step(state, teacher_variables, batch)
    host.append((time.thread_time() - start) / n * 1e6)
    holder["state"] = jax.block_until_ready(state)

  return common.Variant(name, run)


def _first_step(step: Any, state: Any, teacher_variables: Any, batch: dict) -> tuple[Any, float]:
  state, metrics = step(state, teacher_variables, batch)
  return state, float(np.mean(metrics["loss"]))


@dataclasses.dataclass
class Speed:
  """What :func:`speed_variants` builds."""

  variants: list[common.Variant]
  first_loss: dict[str, float]
  host_us: dict[str, list[float]]
  costs: dict[str, dict[str, float]]
  hand_step: Any


def speed_variants(
  teacher: TransformerLM,
  student: TransformerLM,
  teacher_variables: Any,
  batch: dict[str, np.ndarray],
  *,
  torch: Any = None,
  dtype: Any = jnp.float32,
  use_gpu: bool = False,
) -> Speed:
  """The speed table's variants, the loss of each one's first step from the same parameters, their host µs per
  step, XLA's FLOP and byte counts of the JAX ones, and the hand-written step."""
  tx = optimizer()
  init_state = create_train_state(lm.lm_model(student), tx, {"tokens": batch["tokens"][:1]}, rng=0)
  # Host copies: the hand-written step donates its params, and device_put of a device array is that same array.
  host_params = jax.device_get(init_state.params)
  first_loss: dict[str, float] = {}
  host_us: dict[str, list[float]] = {}
  costs: dict[str, dict[str, float]] = {}
  variants, hand_steps = [], {}
  for name, skip_nonfinite in (("jaxkd", True), ("jaxkd_noskip", False)):
    step = make_train_step(
      teacher_apply_fn=lm.lm_model(teacher, name="teacher"),
      objective=lm.lm_objective("forward", alpha=ALPHA),
      placement="single",
      skip_nonfinite=skip_nonfinite,
    )
    state, t_vars = step.placement.put(init_state), step.placement.put(teacher_variables)
    placed = step.placement.put_batch(batch)
    state, first_loss[name] = _first_step(step, state, t_vars, placed)
    # TrainStep.lower lowers the jit a call runs: with the same arguments it reuses its compilation.
    costs[name] = xla_cost(step.lower(state, t_vars, placed).compile())
    variants.append(_jaxkd_variant(name, step, state, t_vars, placed, host_us.setdefault(name, [])))

  t_vars, tokens, labels = jax.device_put((teacher_variables, batch["tokens"], batch["label"]))
  for name, metrics in (("hand", False), ("hand_metrics", True)):
    hand_step = hand_steps[name] = make_hand_step(teacher, student, tx, ALPHA, metrics=metrics)
    params = jax.device_put(host_params)
    hand = {"params": params, "opt_state": tx.init(params)}
    hand["params"], hand["opt_state"], loss, *_ = hand_step(hand["params"], hand["opt_state"], t_vars, tokens, labels)
    first_loss[name] = float(loss)
    costs[name] = xla_cost(hand_step.lower(hand["params"], hand["opt_state"], t_vars, tokens, labels).compile())

    host = host_us.setdefault(name, [])

    def run_hand(n: int, hand_step=hand_step, hand=hand, host=host) -> None:
      start = time.thread_time()
      params, opt_state = hand["params"], hand["opt_state"]
      for _ in range(n):
        params, opt_state, *_ = hand_step(params, opt_state, t_vars, tokens, labels)
      host.append((time.thread_time() - start) / n * 1e6)
      hand.update(jax.block_until_ready({"params": params, "opt_state": opt_state}))

    variants.append(common.Variant(name, run_hand))
  if torch is not None:
    variant, first_loss["torch"] = torch_variant(
      torch,
      teacher,
      student,
      jax.device_get(teacher_variables["params"]),
      host_params,
      batch,
      dtype=dtype,
      use_gpu=use_gpu,
    )
    variants.append(variant)
  return Speed(variants, first_loss, host_us, costs, hand_steps["hand"])


def chunk_steps(teacher: TransformerLM, chunks: Sequence[int], k: int) -> dict[str, tuple[Any, bool]]:
  """``{name: (step, needs_teacher)}`` of the chunking table: dense, each chunk size, top-k dense and chunked."""
  teacher_model = lm.lm_model(teacher, name="teacher")
  forward = lm.lm_objective("forward", alpha=ALPHA)
  topk = lm.lm_objective("topk", alpha=ALPHA)
  steps = {"dense": (make_train_step(teacher_apply_fn=teacher_model, objective=forward, placement="single"), True)}
  for chunk in chunks:
    step = make_train_step(teacher_apply_fn=teacher_model, objective=forward, placement="single", chunk_size=chunk)
    steps[f"chunk{chunk}"] = (step, True)
  steps[f"topk{k}"] = (make_train_step(objective=topk, placement="single"), False)
  middle = sorted(chunks)[len(chunks) // 2]
  steps[f"topk{k}_chunk{middle}"] = (make_train_step(objective=topk, placement="single", chunk_size=middle), False)
  return steps


def _memory(compiled: Any) -> dict[str, float]:
  stats = compiled.memory_analysis()
  if stats is None:  # a backend without memory statistics
    return {}
  temp, argument = stats.temp_size_in_bytes, stats.argument_size_in_bytes
  output, alias = stats.output_size_in_bytes, stats.alias_size_in_bytes
  return {
    "temp_mb": temp / 2**20,
    "total_mb": (argument + output - alias + temp) / 2**20,
    "argument_mb": argument / 2**20,
    "output_mb": output / 2**20,
    "alias_mb": alias / 2**20,
  }


def memory_rows(
  steps: dict[str, tuple[Any, bool]],
  hand_step: Any,
  teacher: TransformerLM,
  student: TransformerLM,
  *,
  batch: int,
  k: int,
) -> dict[str, dict[str, float]]:
  """Memory of the chunking table's ``steps`` (and of ``hand_step``) at the modules' vocabulary and length.

  Each step is lowered with placed arguments of its shapes (zeros; the teacher's variables filled on the host) and
  compiled, not run. ``TrainStep.lower`` lowers the jit a call runs after its host-side checks, so this is the
  compilation a call makes (and reuses it when the step has already run at these shapes).
  """
  length, tx = student.max_len, optimizer()
  tokens = np.zeros((batch, length), np.int32)
  init_state = create_train_state(lm.lm_model(student), tx, {"tokens": tokens[:1]}, rng=0)
  teacher_variables = common.host_variables(teacher, tokens[:1], seed=1)
  plain = {"tokens": tokens, "label": tokens}
  cached = {
    **plain,
    "teacher_topk_logits": np.zeros((batch, length, k), np.float16),
    "teacher_topk_indices": np.zeros((batch, length, k), np.uint16),
    "teacher_log_normalizer": np.zeros((batch, length), np.float32),
  }
  rows = {}
  for name, (step, needs_teacher) in steps.items():
    start = time.perf_counter()
    state = step.placement.put(init_state)
    t_vars = step.placement.put(teacher_variables) if needs_teacher else None
    placed = step.placement.put_batch(plain if needs_teacher else cached)
    rows[name] = _memory(step.lower(state, t_vars, placed).compile())
    rows[name]["compile_s"] = time.perf_counter() - start
  start = time.perf_counter()
  params = jax.device_put(jax.device_get(init_state.params))
  args = jax.device_put((teacher_variables, tokens, tokens))
  rows["hand"] = _memory(hand_step.lower(params, tx.init(params), *args).compile())
  rows["hand"]["compile_s"] = time.perf_counter() - start
  return rows


def chunk_variants(
  steps: dict[str, tuple[Any, bool]],
  student: TransformerLM,
  teacher_variables: Any,
  batch: dict[str, np.ndarray],
  cached_batch: dict[str, np.ndarray],
) -> tuple[list[common.Variant], dict[str, float], dict[str, dict[str, float]]]:
  """The chunking table's timed variants of ``steps``, their first-step losses and their memory at this size."""
  init_state = create_train_state(lm.lm_model(student), optimizer(), {"tokens": batch["tokens"][:1]}, rng=0)
  variants, first_loss, memory = [], {}, {}
  for name, (step, needs_teacher) in steps.items():
    state = step.placement.put(init_state)
    t_vars = step.placement.put(teacher_variables) if needs_teacher else None
    placed = step.placement.put_batch(batch if needs_teacher else cached_batch)
    memory[name] = _memory(step.lower(state, t_vars, placed).compile())
    state, first_loss[name] = _first_step(step, state, t_vars, placed)
    variants.append(_jaxkd_variant(name, step, state, t_vars, placed, []))
  return variants, first_loss, memory


class _Epochs:
  """``run(n)``: ``n`` shuffled epochs, each reading its batches from ``batches(seed)`` and stepping on them."""

  def __init__(self, name: str, step: Any, state: Any, batches: Any):
    self.name, self.step, self.state, self.batches = name, step, state, batches
    self.epoch = 0

  def run(self, n: int) -> None:
    state = self.state
    for _ in range(n):
      self.epoch += 1
      for batch in self.batches(self.epoch):
        # Placed as jaxkd.data.DevicePrefetcher places batches (without its thread).
        state, _ = self.step(state, None, self.step.placement.put_batch(batch))
    self.state = jax.block_until_ready(state)

  def variant(self) -> common.Variant:
    return common.Variant(self.name, self.run, warmup=1, units_per_block=1)


def cache_variants(
  teacher: TransformerLM,
  student: TransformerLM,
  teacher_variables: Any,
  *,
  num_sequences: int,
  length: int,
  batch_size: int,
  k: int,
  cache_dir: str,
  topk_step: Any = None,
) -> tuple[list[common.Variant], dict[str, Any]]:
  """The cache table's epoch variants over a top-k cache written to ``cache_dir``, and facts about the cache.

  ``topk_step``: the cached step to time (``make_train_step(objective=lm_objective('topk'))`` by default).
  """
  vocab = student.vocab_size
  tokens = np.random.default_rng(2).integers(0, vocab, size=num_sequences * length + 1).astype(np.uint16)
  sequences = TokenSequences(tokens, length=length)
  key = topk_cache_key(
    teacher_fingerprint="benchmarks.lm_step random teacher",
    corpus_fingerprint=f"random tokens {num_sequences}x{length}",
    tokenizer_fingerprint="none",
    k=k,
    temperature=1.0,
    length=length,
    vocab_size=vocab,
  )
  start = time.perf_counter()
  cache = write_topk_cache(
    cache_dir,
    lambda t: teacher.apply(teacher_variables, t),
    sequences,
    k=k,
    key=key,
    vocab_size=vocab,
    batch_size=batch_size,
    shard_size=max(batch_size, num_sequences // 2),
    progress=False,
  )
  facts = {
    "cache_build_s": time.perf_counter() - start,
    "cache_bytes_per_token": cache.bytes_per_token,
    "num_sequences": num_sequences,
    "steps_per_epoch": num_sequences // batch_size,
    "cache_shards": cache.num_shards,
  }
  read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # as token_batches reads

  def items(source: Any) -> Any:
    def batches(seed: int) -> Any:
      dataset = grain.MapDataset.source(source).shuffle(seed=seed).batch(batch_size, drop_remainder=True)
      return dataset.to_iter_dataset(read_options)

    return batches

  def scratch_batched(seed: int) -> Any:
    return token_batches(sequences, batch_size=batch_size, seed=seed, num_epochs=1, shard_index=0, shard_count=1)

  def read_batch(indices: Sequence[int]) -> dict[str, np.ndarray]:
    indices = np.asarray(indices)
    teacher_part = {f"teacher_{name}": value for name, value in cache.read(indices).items()}
    return {**sequences.gather(indices), **teacher_part}

  def cached_batched(seed: int) -> Any:
    dataset = grain.MapDataset.range(len(sequences)).shuffle(seed=seed)
    return dataset.batch(batch_size, drop_remainder=True, batch_fn=read_batch).to_iter_dataset(read_options)

  scratch = make_train_step(placement="single")  # no teacher: cross-entropy only
  topk = topk_step or make_train_step(objective=lm.lm_objective("topk", alpha=ALPHA), placement="single")
  init_state = create_train_state(
    lm.lm_model(student), optimizer(), {"tokens": tokens[None, :length].astype(np.int32)}, rng=0
  )
  epochs = [
    _Epochs("scratch_items", scratch, scratch.placement.put(init_state), items(sequences)),
    _Epochs("cached_items", topk, topk.placement.put(init_state), items(JoinedSource(sequences, cache))),
    _Epochs("scratch_batched", scratch, scratch.placement.put(init_state), scratch_batched),
    _Epochs("cached_batched", topk, topk.placement.put(init_state), cached_batched),
  ]
  return [e.variant() for e in epochs], facts
