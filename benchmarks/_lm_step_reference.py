"""The references lm_step's jaxkd step is timed against: the same step written by hand in JAX and in PyTorch eager.

Kept apart from the benchmark's tables so that what is compared is read in one place; :mod:`benchmarks.lm_step`
re-exports :func:`make_hand_step`, :func:`hand_metrics` and :func:`torch_variant`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from jaxkd.lm.transformer import TransformerLM

ALPHA = 0.5
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4  # optax.adamw's default, given to torch.optim.AdamW explicitly (its default is 1e-2)


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


def xla_cost(compiled: Any) -> dict[str, float]:
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
