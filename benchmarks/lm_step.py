"""Language-model distillation step: speed against hand-written JAX and PyTorch, chunked-head memory, top-k cache.

Three tables, each timed in one run with the variants in alternation (:mod:`benchmarks.common`), all on the same
:class:`jaxkd.transformer.TransformerLM` teacher and student (``lm_config`` presets) and random tokens:

1. **speed**: tokens/s of the live-teacher LM KD step, ``alpha * KL(teacher || student) + (1 - alpha) * CE`` at
   ``T = 1``, ``alpha = 0.5``, a masked mean over tokens, ``optax.adamw(1e-3)``:

   * ``jaxkd``: ``make_train_step(teacher_apply_fn=lm.lm_model(teacher), objective=lm.lm_objective('forward',
     alpha=0.5), placement='single')`` called as a user calls it (host-side checks included), batch placed with
     ``step.placement.put_batch``;
   * ``jaxkd_noskip``: the same with ``skip_nonfinite=False`` (no gradient norm, no conditional update);
   * ``hand``: the same step written directly (:func:`make_hand_step`): teacher ``apply`` under
     ``stop_gradient``, student ``apply``, ``log_softmax``, the masked mean, ``jax.value_and_grad``, ``tx.update``,
     one ``jax.jit`` with params and optimizer state donated;
   * ``torch``: the same step in PyTorch eager as TRL's and DistillKit's trainers write it (:func:`torch_variant`):
     a GPT-style model of the same size and weights (pre-RMSNorm, RoPE, causal ``F.scaled_dot_product_attention``,
     tanh-GELU MLP, tied embeddings), teacher under ``torch.no_grad()``, ``0.5 * F.cross_entropy + 0.5 *
     F.kl_div(F.log_softmax(s), F.log_softmax(t), log_target=True, reduction='batchmean')`` over the ``[tokens,
     vocab]`` logits (a per-token mean), ``torch.optim.AdamW(lr=1e-3, weight_decay=1e-4)`` (optax's adamw defaults),
     ``torch.set_num_threads(cores XLA uses)``.

   * ``hand_metrics``: ``hand`` plus the metrics jaxkd's step reports, written out (:func:`hand_metrics`: CE,
     perplexity, accuracy, KL, teacher CE, accuracy and perplexity, agreement), to show what they cost.

   ``gflop`` and ``gb_accessed`` are XLA's counts (``compiled.cost_analysis()``) for jaxkd / hand / hand_metrics:
   what each step does, whatever the load of the machine. Target: **jaxkd/hand >= 0.97**.

2. **chunking**: the step with the output head applied to all positions at once (``dense``), per chunk of positions
   in a rematerialised ``lax.scan`` (``make_train_step(chunk_size=c)``, ``chunk<c>``), and the cached top-k step
   (``topk<k>``: ``lm_objective('topk')``, no teacher network, the batch carrying the teacher's top k). Step time in
   alternation at the speed table's size, and memory from the compiled step without running it, at a larger
   vocabulary and length: ``step.lower(state, teacher_variables, batch).compile().memory_analysis()`` with placed
   zeros of the right shapes (``TrainStep.lower`` lowers the jit a call runs after its host-side checks, so the
   same computation and the same compilation a call makes). ``temp`` is XLA's ``temp_size_in_bytes`` (buffers live
   inside the step), ``total`` is ``argument + output - alias + temp`` (the donated state counted once);
   ``timed_size_temp_mb`` is ``temp`` at the timed size. The hand-written step's memory is the last row.
   Target: **chunked/dense total <= 0.25**.

3. **cache**: a top-k cache (``k`` logits, indices, normaliser) of ``epoch_sequences`` random token windows written
   with :func:`jaxkd.topk_cache.write_topk_cache` to a temporary directory, then whole epochs (shuffled, batches
   read inside the timed epoch) of the cached top-k step against epochs of the scratch step (cross-entropy only,
   ``make_train_step()`` without a teacher), each pair reading its batches the same way:

   * ``scratch_items`` / ``cached_items``: ``grain.MapDataset.source(...)`` of :class:`jaxkd.text.TokenSequences`
     (scratch) or of :class:`jaxkd.topk_cache.JoinedSource` over it (cached; token digests checked per sequence),
     ``.shuffle(seed).batch(batch)``, grain's per-item reads stacked;
   * ``scratch_batched`` / ``cached_batched``: :func:`jaxkd.text.token_batches` (one vectorised gather per batch)
     and the same grain pipeline whose ``batch_fn`` adds :meth:`jaxkd.topk_cache.TopKCache.read` of the batch's
     indices.

   Target: **cached/scratch epoch <= 1.10**.

Settings (``--quick``: tiny, for the smoke test; ``--gpu``: about 335M -> 60M parameters)::

  setting  teacher -> student             vocab   length  batch  memory at (vocab, length, batch)  chunks        k
  cpu      teacher (4x256) -> student     8192    128     16     32768, 512, 8                     32, 64, 128   32
  gpu      gpu_teacher -> gpu_student     32768   1024    8      32768, 1024, 8                    64, 128, 256  32
  quick    tiny -> tiny                   256     16      4      the timed size                    8             8

Run (11 minutes on 2 CPU cores at load average 8-10 from other jobs)::

  python -m benchmarks.lm_step
  python -m benchmarks.lm_step --rounds 5 --no_torch
  python -m benchmarks.lm_step --gpu                  # bfloat16 unless --dtype float32
  python -m benchmarks.lm_step --quick --out /tmp/bench

``--dtype bfloat16`` builds every JAX model with ``TransformerLM(dtype=bfloat16)`` (float32 params, logits and
losses) and runs PyTorch under ``torch.autocast(bfloat16)``. Writes ``<out>/lm_step.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from jaxkd import lm
from jaxkd.lm.text import TokenSequences, token_batches
from jaxkd.lm.topk_cache import JoinedSource, topk_cache_key, write_topk_cache
from jaxkd.lm.transformer import TransformerLM, lm_config
from jaxkd.losses._sparse import teacher_topk
from jaxkd.state import create_train_state
from jaxkd.train import make_train_step

ALPHA = 0.5
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4  # optax.adamw's default, given to torch.optim.AdamW explicitly (its default is 1e-2)

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
# The hand-written step.


def make_hand_step(
  teacher: TransformerLM,
  student: TransformerLM,
  tx: optax.GradientTransformation,
  alpha: float,
  *,
  metrics: bool = False,
):
  """The LM KD step written directly in JAX + optax: what jaxkd's step should cost no more than.

  ``step(params, opt_state, teacher_variables, tokens, labels) -> (params, opt_state, loss)``; with ``metrics``
  also the metrics jaxkd's step reports (:func:`hand_metrics`), as a fourth result.
  """

  def loss_fn(params, teacher_variables, tokens, labels):
    teacher_logits = jax.lax.stop_gradient(teacher.apply(teacher_variables, tokens)).astype(jnp.float32)
    logits = student.apply({"params": params}, tokens, train=True).astype(jnp.float32)
    teacher_log_probs = jax.nn.log_softmax(teacher_logits)
    log_probs = jax.nn.log_softmax(logits)
    kd = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - log_probs), axis=-1)
    mask = labels != -100
    ce = -jnp.take_along_axis(log_probs, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    per_token = alpha * kd + (1.0 - alpha) * ce
    return jnp.sum(jnp.where(mask, per_token, 0.0)) / jnp.maximum(jnp.sum(mask), 1), (logits, teacher_logits)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, teacher_variables, tokens, labels):
    if metrics:
      (loss, (logits, teacher_logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, teacher_variables, tokens, labels
      )
    else:
      loss, grads = jax.value_and_grad(lambda *args: loss_fn(*args)[0])(params, teacher_variables, tokens, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if metrics:
      return params, opt_state, loss, hand_metrics(logits, teacher_logits, labels)
    return params, opt_state, loss

  return step


def hand_metrics(logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """The metrics jaxkd's LM step reports, written out from the two ``[batch, length, vocab]`` logits.

  Masked means over tokens of the cross-entropy (and perplexity), top-1 accuracy, ``KL(teacher || student)``,
  the teacher's accuracy, cross-entropy and perplexity, and student-teacher top-1 agreement: each one more pass
  over the logits, computed (as jaxkd computes them) outside the differentiated function.
  """
  mask = labels != -100
  safe = jnp.where(mask, labels, 0)[..., None]
  log_probs, teacher_log_probs = jax.nn.log_softmax(logits), jax.nn.log_softmax(teacher_logits)
  predictions, teacher_predictions = jnp.argmax(logits, axis=-1), jnp.argmax(teacher_logits, axis=-1)
  count = jnp.maximum(jnp.sum(mask), 1)

  def mean(values: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, values.astype(jnp.float32), 0.0)) / count

  ce = mean(-jnp.take_along_axis(log_probs, safe, axis=-1)[..., 0])
  teacher_ce = mean(-jnp.take_along_axis(teacher_log_probs, safe, axis=-1)[..., 0])
  kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - log_probs), axis=-1)
  return {
    "ce": ce,
    "perplexity": jnp.exp(ce),
    "accuracy": mean(predictions == labels),
    "kd_loss": mean(kl),
    "teacher_accuracy": mean(teacher_predictions == labels),
    "teacher_ce": teacher_ce,
    "teacher_perplexity": jnp.exp(teacher_ce),
    "agreement": mean(predictions == teacher_predictions),
  }


def _cost(compiled: Any) -> dict[str, float]:
  """XLA's count of a compiled step's FLOPs and bytes accessed: what it does, whatever the machine's load."""
  analysis = compiled.cost_analysis() or {}
  if isinstance(analysis, list | tuple):  # older jax: one dict per computation
    analysis = analysis[0] if analysis else {}
  return {"gflop": analysis.get("flops", math.nan) / 1e9, "gb_accessed": analysis.get("bytes accessed", math.nan) / 1e9}


# ---------------------------------------------------------------------------------------------------------------------
# PyTorch peer.


def _torch_lm(torch: Any, module: TransformerLM) -> Any:
  """A PyTorch GPT-style LM computing what ``module`` computes (same layers, same parameter shapes)."""
  import torch.nn.functional as F  # noqa: N812

  nn = torch.nn
  d, heads, length = module.d_model, module.num_heads, module.max_len
  head_dim, d_ff = d // heads, module.d_ff or 4 * module.d_model
  half = head_dim // 2
  inv_freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float32) / half))
  angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq  # [length, head_dim / 2]

  def rope(x: Any) -> Any:  # [batch, heads, length, head_dim], rotate-half form, in float32
    n = x.shape[2]
    cos, sin = angles[:n].cos().to(x.device), angles[:n].sin().to(x.device)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.attn_norm, self.mlp_norm = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
      self.query, self.key, self.value, self.out = (nn.Linear(d, d, bias=False) for _ in range(4))
      self.mlp_in, self.mlp_out = nn.Linear(d, d_ff, bias=False), nn.Linear(d_ff, d, bias=False)

    def forward(self, x: Any) -> Any:
      batch, n, _ = x.shape
      h = self.attn_norm(x)
      q, k, v = (proj(h).view(batch, n, heads, head_dim).transpose(1, 2) for proj in (self.query, self.key, self.value))
      attended = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
      x = x + self.out(attended.transpose(1, 2).reshape(batch, n, d))
      return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x)), approximate="tanh"))

  class LM(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(module.vocab_size, d)
      self.blocks = nn.ModuleList(Block() for _ in range(module.num_layers))
      self.final_norm = nn.RMSNorm(d, eps=1e-6)

    def forward(self, tokens: Any) -> Any:
      x = self.embed(tokens) * math.sqrt(d)
      for block in self.blocks:
        x = block(x)
      return F.linear(self.final_norm(x).float(), self.embed.weight)  # tied output projection, float32 logits

  return LM()


def _load_jax_params(torch: Any, model: Any, params: Any) -> None:
  """Copies a TransformerLM's params into :func:`_torch_lm`'s model (Dense kernels transposed)."""
  state = {"embed.weight": params["embed"]["embedding"], "final_norm.weight": params["final_norm"]["scale"]}
  for i, _ in enumerate(model.blocks):
    block = params[f"block_{i}"]
    state[f"blocks.{i}.attn_norm.weight"] = block["attn_norm"]["scale"]
    state[f"blocks.{i}.mlp_norm.weight"] = block["mlp_norm"]["scale"]
    for name in ("query", "key", "value", "out"):
      state[f"blocks.{i}.{name}.weight"] = np.asarray(block["attn"][name]["kernel"]).T
    for name in ("mlp_in", "mlp_out"):
      state[f"blocks.{i}.{name}.weight"] = np.asarray(block[name]["kernel"]).T
  tensors = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}
  model.load_state_dict(tensors, strict=True)


def torch_variant(
  torch: Any,
  teacher: TransformerLM,
  student: TransformerLM,
  teacher_params: Any,
  student_params: Any,
  batch: dict[str, np.ndarray],
  *,
  dtype: Any,
  use_gpu: bool,
  alpha: float = ALPHA,
) -> tuple[common.Variant, float]:
  """The step as TRL/DistillKit write it, eager, with the JAX models' weights; and its first-step loss."""
  import torch.nn.functional as F  # noqa: N812

  device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(common.cpu_cores())
  t_model, s_model = _torch_lm(torch, teacher), _torch_lm(torch, student)
  _load_jax_params(torch, t_model, teacher_params)
  _load_jax_params(torch, s_model, student_params)
  t_model, s_model = t_model.to(device).eval(), s_model.to(device).train()
  optimizer = torch.optim.AdamW(s_model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  x = torch.from_numpy(batch["tokens"].astype(np.int64)).to(device)
  y = torch.from_numpy(batch["label"].astype(np.int64)).to(device)
  autocast_dtype = torch.bfloat16 if dtype == jnp.bfloat16 else None
  vocab = student.vocab_size

  def one_step() -> Any:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
      with torch.no_grad():
        teacher_logits = t_model(x)
      logits = s_model(x)
    logits, teacher_logits = logits.float().view(-1, vocab), teacher_logits.float().view(-1, vocab)
    ce = F.cross_entropy(logits, y.view(-1), ignore_index=-100)
    kd = F.kl_div(
      F.log_softmax(logits, dim=-1), F.log_softmax(teacher_logits, dim=-1), log_target=True, reduction="batchmean"
    )
    loss = (1.0 - alpha) * ce + alpha * kd
    loss.backward()
    optimizer.step()
    return loss

  first_loss = float(one_step().item())

  def run(n: int) -> None:
    for _ in range(n):
      one_step()
    if device == "cuda":
      torch.cuda.synchronize()

  return common.Variant("torch", run, warmup=1), first_loss


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
    costs[name] = _cost(step.lower(state, t_vars, placed).compile())
    variants.append(_jaxkd_variant(name, step, state, t_vars, placed, host_us.setdefault(name, [])))

  t_vars, tokens, labels = jax.device_put((teacher_variables, batch["tokens"], batch["label"]))
  for name, metrics in (("hand", False), ("hand_metrics", True)):
    hand_step = hand_steps[name] = make_hand_step(teacher, student, tx, ALPHA, metrics=metrics)
    params = jax.device_put(host_params)
    hand = {"params": params, "opt_state": tx.init(params)}
    hand["params"], hand["opt_state"], loss, *_ = hand_step(hand["params"], hand["opt_state"], t_vars, tokens, labels)
    first_loss[name] = float(loss)
    costs[name] = _cost(hand_step.lower(hand["params"], hand["opt_state"], t_vars, tokens, labels).compile())

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


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark.


def run(
  *,
  setting: str = "cpu",
  dtype: str | None = None,
  batch_size: int | None = None,
  rounds: int | None = None,
  block_s: float | None = None,
  with_torch: bool = True,
  out_dir: str | None = None,
  log: bool = False,
) -> dict[str, Any]:
  """Runs the three tables, prints them and writes ``lm_step.json``.

  Args:
    setting: ``'cpu'``, ``'gpu'`` or ``'quick'`` (tiny, for the smoke test); see the module docstring.
    dtype: ``'float32'`` or ``'bfloat16'``, the models' computation dtype; default bfloat16 for ``'gpu'``.
    batch_size: sequences per step (default per setting).
    rounds: alternation rounds per table.
    block_s: seconds per timed block.
    with_torch: include the PyTorch peer when torch is installed.
    out_dir: where the JSON goes (``benchmarks/results`` by default).
    log: print every round's times.
  """
  config = SETTINGS[setting]
  dtype = dtype or ("bfloat16" if setting == "gpu" else "float32")
  compute_dtype = common.dtype_of(dtype)
  vocab, length = config["vocab"], config["length"]
  batch_size = batch_size or config["batch"]
  rounds = rounds or config["rounds"]
  block_s = config["block_s"] if block_s is None else block_s
  chunks, k = config["chunks"], config["k"]
  teacher, student = make_models(setting, vocab=vocab, length=length, dtype=compute_dtype)
  torch = common.import_torch("the PyTorch eager peer") if with_torch else None
  tokens_per_step = batch_size * length
  description = (
    f"TransformerLM {config['teacher']} {describe(teacher)} ({param_count(teacher) / 1e6:.1f}M) -> "
    f"{config['student']} {describe(student)} ({param_count(student) / 1e6:.1f}M), vocab {vocab}, length {length}, "
    f"batch {batch_size}, {dtype}"
  )
  print(
    f"lm_step: {description}, {jax.local_device_count()} local device(s), {common.cpu_cores()} cores, {rounds} rounds",
    flush=True,
  )
  began = time.perf_counter()
  batch = random_tokens(batch_size, length, vocab)
  teacher_variables = jax.jit(teacher.init)(jax.random.key(1), batch["tokens"][:1])

  # 1. Speed: jaxkd vs hand-written JAX vs PyTorch.
  speed = speed_variants(
    teacher, student, teacher_variables, batch, torch=torch, dtype=compute_dtype, use_gpu=setting == "gpu"
  )
  variants, first_loss, host_us, costs = speed.variants, speed.first_loss, speed.host_us, speed.costs
  timings = common.interleave(variants, rounds=rounds, block_s=block_s, log=log)
  wall, cpu = timings.wall, timings.cpu
  row: dict[str, Any] = {"batch": batch_size, "length": length, "vocab": vocab}
  for variant in variants:
    row[f"{variant.name}_tokens_s"] = tokens_per_step / statistics.median(wall[variant.name])
    if variant.name in host_us:
      row[f"{variant.name}_host_us"] = statistics.median(host_us[variant.name])
  for name in ("jaxkd", "jaxkd_noskip", "hand_metrics"):
    row[f"{name}_vs_hand"] = common.median_ratio(wall["hand"], wall[name])
    row[f"{name}_vs_hand_cpu"] = common.median_ratio(cpu["hand"], cpu[name])
  for name in ("jaxkd", "jaxkd_noskip"):
    if "torch" in wall:
      row[f"{name}_vs_torch"] = common.median_ratio(wall["torch"], wall[name])
      row[f"{name}_vs_torch_cpu"] = common.median_ratio(cpu["torch"], cpu[name])
  row["first_loss"] = first_loss
  row["cost"] = costs
  names = ("jaxkd", "hand", "hand_metrics")
  row["gb_accessed"] = " / ".join(f"{costs[n]['gb_accessed']:.2f}" for n in names)
  row["gflop"] = " / ".join(f"{costs[n]['gflop']:.1f}" for n in names)
  row["seconds_per_step_rounds"] = {"wall": wall, "cpu": cpu}
  speed_rows = [row]
  columns = ["batch", "jaxkd_tokens_s", "jaxkd_noskip_tokens_s", "hand_tokens_s", "jaxkd_vs_hand"]
  columns += ["jaxkd_noskip_vs_hand", "jaxkd_vs_hand_cpu", "jaxkd_noskip_vs_hand_cpu"]
  columns += ["hand_metrics_tokens_s", "hand_metrics_vs_hand", "hand_metrics_vs_hand_cpu"]
  if torch is not None:
    columns += ["torch_tokens_s", "jaxkd_vs_torch", "jaxkd_vs_torch_cpu"]
  columns += ["jaxkd_host_us", "hand_host_us", "gflop", "gb_accessed"]
  speed_table = common.print_table(
    f"lm_step speed ({description}; forward KL, alpha {ALPHA}; target jaxkd/hand >= 0.97; _cpu: by process CPU "
    "time; gflop, gb_accessed: XLA's counts for jaxkd / hand / hand_metrics)",
    speed_rows,
    columns,
  )
  print(f"[speed: {time.perf_counter() - began:.0f} s]", flush=True)
  began = time.perf_counter()

  # 2. Dense vs chunked vs top-k: time at this size, memory compiled at the memory size.
  cached_batch = topk_batch(teacher, teacher_variables, batch, k)
  steps = chunk_steps(teacher, chunks, k)
  variants, chunk_first_loss, timed_memory = chunk_variants(steps, student, teacher_variables, batch, cached_batch)
  timings = common.interleave(variants, rounds=rounds, block_s=block_s, log=log)
  mem_vocab, mem_length, mem_batch = config["memory"]
  start = time.perf_counter()
  if (mem_vocab, mem_length, mem_batch) == (vocab, length, batch_size):  # the compilations made for timing
    memory = memory_rows(steps, speed.hand_step, teacher, student, batch=mem_batch, k=k)
  else:
    mem_teacher, mem_student = make_models(setting, vocab=mem_vocab, length=mem_length, dtype=compute_dtype)
    mem_hand = make_hand_step(mem_teacher, mem_student, optimizer(), ALPHA)
    mem_steps = chunk_steps(mem_teacher, chunks, k)
    memory = memory_rows(mem_steps, mem_hand, mem_teacher, mem_student, batch=mem_batch, k=k)
  memory_s = time.perf_counter() - start
  chunk_rows = []
  for name in [v.name for v in variants] + ["hand"]:
    chunk_row: dict[str, Any] = {"step": name}
    if name in timings.wall:
      chunk_row["step_ms"] = statistics.median(timings.wall[name]) * 1e3
      chunk_row["tokens_s"] = tokens_per_step / statistics.median(timings.wall[name])
      chunk_row["speed_vs_dense"] = common.median_ratio(timings.wall["dense"], timings.wall[name])
      chunk_row["speed_vs_dense_cpu"] = common.median_ratio(timings.cpu["dense"], timings.cpu[name])
      chunk_row["timed_size_temp_mb"] = timed_memory[name].get("temp_mb")
      chunk_row["first_loss"] = chunk_first_loss[name]
    chunk_row.update(memory[name])
    if "total_mb" in memory[name] and "total_mb" in memory["dense"]:
      chunk_row["temp_vs_dense"] = memory[name]["temp_mb"] / memory["dense"]["temp_mb"]
      chunk_row["total_vs_dense"] = memory[name]["total_mb"] / memory["dense"]["total_mb"]
    chunk_rows.append(chunk_row)
  chunk_table = common.print_table(
    f"lm_step chunking: time at vocab {vocab}, length {length}, batch {batch_size}; memory compiled at vocab "
    f"{mem_vocab}, length {mem_length}, batch {mem_batch} (target chunked/dense total <= 0.25)",
    chunk_rows,
    ["step", "step_ms", "tokens_s", "speed_vs_dense", "speed_vs_dense_cpu", "timed_size_temp_mb"]
    + ["temp_mb", "total_mb", "temp_vs_dense", "total_vs_dense"],
  )
  print(f"[chunking: {time.perf_counter() - began:.0f} s, of which memory compiles {memory_s:.0f} s]", flush=True)
  began = time.perf_counter()

  # 3. Cached top-k epochs vs scratch epochs, cache read inside the timed epoch.
  with tempfile.TemporaryDirectory() as cache_dir:
    variants, cache_facts = cache_variants(
      teacher,
      student,
      teacher_variables,
      num_sequences=config["epoch_sequences"],
      length=length,
      batch_size=batch_size,
      k=k,
      cache_dir=cache_dir,
      topk_step=steps[f"topk{k}"][0],  # the chunking table's, already compiled for these shapes
    )
    timings = common.interleave(variants, rounds=rounds, block_s=block_s, log=log)
  cache_rows = []
  for cached, scratch in (("cached_items", "scratch_items"), ("cached_batched", "scratch_batched")):
    cache_rows.append(
      {
        "reading": "grain per-item source" if cached == "cached_items" else "vectorised batch reads",
        "scratch_epoch_s": statistics.median(timings.wall[scratch]),
        "cached_epoch_s": statistics.median(timings.wall[cached]),
        "cached_over_scratch": common.median_ratio(timings.wall[cached], timings.wall[scratch]),
        "cached_over_scratch_cpu": common.median_ratio(timings.cpu[cached], timings.cpu[scratch]),
        "cached_tokens_s": cache_facts["steps_per_epoch"] * tokens_per_step / statistics.median(timings.wall[cached]),
        "seconds_rounds": {"wall": timings.wall, "cpu": timings.cpu},
      }
    )
  cache_table = common.print_table(
    f"lm_step cache: epochs of {cache_facts['steps_per_epoch']} steps, top-{k} cache "
    f"({cache_facts['cache_bytes_per_token']:.0f} B/token, built in {cache_facts['cache_build_s']:.1f} s) vs "
    "scratch (target cached/scratch <= 1.10)",
    cache_rows,
    ["reading", "scratch_epoch_s", "cached_epoch_s", "cached_over_scratch", "cached_over_scratch_cpu"]
    + ["cached_tokens_s"],
  )
  print(f"[cache: {time.perf_counter() - began:.0f} s]", flush=True)

  results = {
    "benchmark": "lm_step",
    "setting": setting,
    "models": description,
    "teacher_params": param_count(teacher),
    "student_params": param_count(student),
    "dtype": dtype,
    "vocab": vocab,
    "length": length,
    "batch_size": batch_size,
    "alpha": ALPHA,
    "temperature": 1.0,
    "optimizer": f"adamw(lr={LEARNING_RATE}, weight_decay={WEIGHT_DECAY})",
    "k": k,
    "chunks": list(chunks),
    "memory_size": {"vocab": mem_vocab, "length": mem_length, "batch": mem_batch},
    "memory_compile_s": memory_s,
    "rounds": rounds,
    "torch": None if torch is None else torch.__version__,
    "rows": speed_rows,
    "table": speed_table,
    "chunk_rows": chunk_rows,
    "chunk_table": chunk_table,
    "cache": cache_facts,
    "cache_rows": cache_rows,
    "cache_table": cache_table,
    "environment": common.environment(),
  }
  common.write_results(out_dir, "lm_step", results)
  return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gpu", action="store_true", help="GPU sizes: gpu_teacher -> gpu_student, vocab 32768, L 1024")
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
  parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="default bfloat16 with --gpu")
  parser.add_argument("--batch_size", type=int, default=None, help="sequences per step")
  parser.add_argument("--rounds", type=int, default=None, help="alternation rounds per table")
  parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch peer")
  parser.add_argument("--log", action="store_true", help="print every round's times")


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_arguments(parser)
  args = parser.parse_args(argv)
  run(
    setting="quick" if args.quick else "gpu" if args.gpu else "cpu",
    dtype=args.dtype,
    batch_size=args.batch_size,
    rounds=args.rounds,
    with_torch=not args.no_torch,
    out_dir=args.out,
    log=args.log,
  )


if __name__ == "__main__":
  main()
