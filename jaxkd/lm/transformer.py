"""A decoder-only transformer language model with KV-cache sampling, for sequence-level distillation.

:class:`TransformerLM` is a pre-norm GPT-style model: token embedding, ``num_layers`` blocks of causal self-attention
with rotary position embeddings (RoPE) on queries and keys and a GELU MLP, a final RMSNorm and an output projection
tied to the embedding (``embed.attend``) or separate. It is written in Flax **linen**, not NNX, for two reasons: the
rest of jaxkd (train state, checkpoints, feature capture by module path) is built around linen variable dicts, and
linen's ``'cache'`` collection makes KV-cached decoding a pure function ``(variables, cache, tokens) -> (logits,
cache)`` that ``jit`` and ``lax.scan`` take as they are (the pattern of flax's ``examples/lm1b`` and ``wmt``).

Calling conventions::

  logits = model.apply(variables, tokens)                                   # [batch, length, vocab], float32
  hidden = model.apply(variables, tokens, method=model.hidden)              # [batch, length, d_model]
  logits = model.apply(variables, hidden, method=model.logits_from_hidden)  # the output projection alone

Dropout draws from the ``'dropout'`` RNG stream when ``train=True``. Attention is causal only: padding is left to
the loss mask, since a causal model's outputs at real positions never see the padding after them.

Decoding: :func:`init_cache` makes an empty cache for a batch size and a maximum length; ``model.apply({'params':
params, 'cache': cache}, tokens, decode=True, mutable=['cache'])`` appends ``tokens`` (one token, or a whole prompt)
to the cache and returns their logits and the new cache. :func:`sample` prefills the prompt in one such call and
then generates inside a ``lax.scan``; :func:`sample_uncached` is the slow reference that reruns the full forward
pass on the growing sequence.

>>> model = TransformerLM(**lm_config("tiny", vocab_size=64, max_len=16))
>>> tokens = jnp.zeros((2, 16), jnp.int32)
>>> variables = jax.jit(model.init)(jax.random.key(0), tokens)
>>> jax.jit(model.apply)(variables, tokens).shape
(2, 16, 64)
>>> sample(model, variables["params"], tokens[:, :4], max_new_tokens=3, rng=jax.random.key(1)).shape
(2, 7)
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
  "TransformerLM",
  "LM_PRESETS",
  "lm_config",
  "apply_rope",
  "init_cache",
  "sample",
  "sample_with_logits",
  "sample_uncached",
]

PyTree = Any

# Architecture presets; lm_config adds the vocabulary and the maximum length. Parameter counts for a 32768-token
# vocabulary with tied embeddings: tiny 12k + 1M embedding, student 0.4M + 4.2M, teacher 3.1M + 8.4M,
# gpu_student 39M + 21M (about 60M), gpu_teacher 302M + 34M (about 336M).
LM_PRESETS: dict[str, dict[str, int]] = {
  "tiny": dict(num_layers=1, d_model=32, num_heads=2),
  "student": dict(num_layers=2, d_model=128, num_heads=2),
  "teacher": dict(num_layers=4, d_model=256, num_heads=4),
  "gpu_student": dict(num_layers=8, d_model=640, num_heads=10),
  "gpu_teacher": dict(num_layers=24, d_model=1024, num_heads=16),
}


def lm_config(size: str, vocab_size: int, max_len: int) -> dict[str, Any]:
  """Keyword arguments of :class:`TransformerLM` for a named preset (see :data:`LM_PRESETS`).

  Args:
    size: one of ``'tiny'`` (tests), ``'student'``, ``'teacher'`` (CPU experiments), ``'gpu_student'`` (about 60M
      parameters at a 32768-token vocabulary) and ``'gpu_teacher'`` (about 336M).
    vocab_size: number of token ids.
    max_len: longest sequence the model accepts.

  Returns:
    A new dict, e.g. ``TransformerLM(**lm_config('student', vocab_size=512, max_len=128), dropout_rate=0.1)``.

  >>> lm_config("teacher", vocab_size=512, max_len=128)
  {'num_layers': 4, 'd_model': 256, 'num_heads': 4, 'vocab_size': 512, 'max_len': 128}
  """
  if size not in LM_PRESETS:
    raise ValueError(f"Unknown transformer preset {size!r}; choose one of {sorted(LM_PRESETS)}.")
  return dict(LM_PRESETS[size], vocab_size=vocab_size, max_len=max_len)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), rotate-half form, computed in float32.

  Rotating queries and keys by angles proportional to their positions makes their dot product depend only on the
  offset between the positions, which is what lets a KV cache store keys already rotated.

  Args:
    x: ``[batch, length, heads, head_dim]`` with an even ``head_dim``.
    positions: ``[length]`` integer positions of the ``length`` entries.
    base: wavelength base of the frequencies.

  Returns:
    ``x`` rotated, same shape and dtype.

  References:
    Su et al., *RoFormer: Enhanced Transformer with Rotary Position Embedding*, 2021.
    https://arxiv.org/abs/2104.09864
  """
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[:, None] * inv_freq  # [length, head_dim / 2]
  sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _residual_init(num_layers: int) -> nn.initializers.Initializer:
  # GPT-2's scaling of the projections that write into the residual stream: 2 per block, so the stream's variance
  # at initialisation stays O(1) however deep the model is.
  return nn.initializers.variance_scaling(1.0 / (2 * num_layers), "fan_in", "normal")


class _CausalSelfAttention(nn.Module):
  num_heads: int
  num_layers: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, decode: bool) -> jax.Array:
    batch, length, d_model = x.shape
    head_dim = d_model // self.num_heads
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
    heads = (batch, length, self.num_heads, head_dim)  # the shape of q, k and v
    q, k, v = (dense(d_model, name=name)(x).reshape(heads) for name in ("query", "key", "value"))
    if not decode:
      positions = jnp.arange(length)
      q, k = apply_rope(q, positions), apply_rope(k, positions)
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    else:
      out = self._attend_with_cache(q, k, v)
    out = out.reshape(batch, length, d_model)
    return dense(d_model, kernel_init=_residual_init(self.num_layers), name="out")(out)

  def _attend_with_cache(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    batch, length = q.shape[:2]
    initializing = self.is_initializing()
    if not initializing and not self.has_variable("cache", "cached_key"):
      raise ValueError(
        "decode=True needs a KV cache: apply with variables={'params': params, 'cache': init_cache(model, batch, "
        "max_length)} and mutable=['cache']."
      )
    # At init the cache is sized by the tokens given: init_cache(model, batch, max_length) passes [batch, max_length].
    cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if initializing:
      positions = jnp.arange(length)
      q, k = apply_rope(q, positions), apply_rope(k, positions)
      return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    cache_batch, cache_len = cached_key.value.shape[:2]
    if batch != cache_batch:
      raise ValueError(f"decode=True: tokens have batch size {batch} but the cache was made for {cache_batch}.")
    if length > cache_len:
      raise ValueError(f"decode=True: {length} tokens do not fit in a cache of length {cache_len}.")
    index = cache_index.value
    if not isinstance(index, jax.core.Tracer) and int(index) + length > cache_len:
      raise ValueError(
        f"decode=True: the cache holds {int(index)} of {cache_len} positions; {length} more tokens overflow it. "
        "Make the cache with init_cache(model, batch, max_length) for a larger max_length."
      )
    positions = index + jnp.arange(length, dtype=jnp.int32)  # [length]
    q, k = apply_rope(q, positions), apply_rope(k, positions)
    keys = lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype), (0, index, 0, 0))
    values = lax.dynamic_update_slice(cached_value.value, v.astype(cached_value.value.dtype), (0, index, 0, 0))
    cached_key.value, cached_value.value, cache_index.value = keys, values, index + length
    # Each new query sees the cached positions up to its own; empty slots lie after it and are masked with them.
    mask = jnp.arange(cache_len)[None, :] <= positions[:, None]  # [length, cache_len]
    out = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask=mask[None, None])
    # Under jit an overflow cannot raise; dynamic_update_slice would clamp it into the wrong slots, so say NaN.
    return jnp.where(index + length <= cache_len, out, jnp.nan)


class _Block(nn.Module):
  num_heads: int
  d_ff: int
  num_layers: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, decode: bool) -> jax.Array:
    d_model = x.shape[-1]
    h = nn.RMSNorm(epsilon=1e-6, dtype=self.dtype, name="attn_norm")(x)
    h = _CausalSelfAttention(self.num_heads, self.num_layers, dtype=self.dtype, name="attn")(h, decode=decode)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = nn.RMSNorm(epsilon=1e-6, dtype=self.dtype, name="mlp_norm")(x)
    h = nn.gelu(nn.Dense(self.d_ff, use_bias=False, dtype=self.dtype, name="mlp_in")(h))
    h = nn.Dense(
      d_model, use_bias=False, dtype=self.dtype, kernel_init=_residual_init(self.num_layers), name="mlp_out"
    )(h)
    return x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)


class TransformerLM(nn.Module):
  """Decoder-only pre-norm transformer language model with RoPE and an optional KV cache.

  Built with ``setup()`` so that :meth:`hidden` and :meth:`logits_from_hidden` can be applied on their own
  (``model.apply(variables, x, method=model.hidden)``) and share the embedding with ``__call__``.

  Attributes:
    vocab_size: number of token ids.
    num_layers: number of transformer blocks.
    d_model: width of the residual stream.
    num_heads: attention heads; must divide ``d_model`` into an even head size (RoPE rotates pairs).
    max_len: longest sequence accepted (and longest KV cache).
    d_ff: width of the MLP; None means ``4 * d_model``.
    dropout_rate: dropout on the embeddings and on each residual branch (``train=True`` only).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32, and the logits are float32,
      computed from a float32 output projection because the distillation losses compare near-equal distributions.
    tie_embeddings: output projection by the transposed token embedding (``embed.attend``) rather than a separate
      Dense layer.
  """

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  max_len: int
  d_ff: int | None = None
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  tie_embeddings: bool = True

  def __post_init__(self):
    super().__post_init__()
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "max_len"):
      value = getattr(self, name)
      if not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"TransformerLM.{name} must be a positive integer, got {value!r}.")
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}.")
    if (self.d_model // self.num_heads) % 2:
      raise ValueError(
        f"The head size d_model / num_heads = {self.d_model // self.num_heads} must be even for rotary embeddings."
      )
    if self.d_ff is not None and (not isinstance(self.d_ff, numbers.Integral) or self.d_ff < 1):
      raise ValueError(f"TransformerLM.d_ff must be a positive integer or None, got {self.d_ff!r}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")

  def setup(self):
    # The embedding computes in float32 so that embed.attend, the tied output projection, gives float32 logits.
    self.embed = nn.Embed(self.vocab_size, self.d_model, dtype=jnp.float32, name="embed")
    self.embed_dropout = nn.Dropout(self.dropout_rate)
    self.blocks = [
      _Block(
        self.num_heads,
        self.d_ff or 4 * self.d_model,
        self.num_layers,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        name=f"block_{i}",
      )
      for i in range(self.num_layers)
    ]
    self.final_norm = nn.RMSNorm(epsilon=1e-6, dtype=self.dtype, name="final_norm")
    if not self.tie_embeddings:
      self.lm_head = nn.Dense(self.vocab_size, use_bias=False, dtype=jnp.float32, name="lm_head")

  def __call__(self, tokens: jax.typing.ArrayLike, *, train: bool = False, decode: bool = False) -> jax.Array:
    """Next-token logits.

    Args:
      tokens: ``[batch, length]`` integer token ids in ``[0, vocab_size)``, ``length <= max_len``.
      train: enable dropout (draws from the ``'dropout'`` RNG stream).
      decode: append ``tokens`` to the KV cache in the ``'cache'`` collection (apply with ``mutable=['cache']``)
        and attend to everything cached so far; positions continue from the cache index.

    Returns:
      ``[batch, length, vocab_size]`` float32 logits; position ``t`` predicts token ``t + 1``.
    """
    return self.logits_from_hidden(self.hidden(tokens, train=train, decode=decode))

  def hidden(self, tokens: jax.typing.ArrayLike, *, train: bool = False, decode: bool = False) -> jax.Array:
    """Final-normed hidden states before the output projection.

    Args:
      tokens: ``[batch, length]`` integer token ids (see ``__call__``).
      train: enable dropout.
      decode: use the KV cache (see ``__call__``).

    Returns:
      ``[batch, length, d_model]`` in the computation dtype.
    """
    tokens = jnp.asarray(tokens)
    _check_tokens(tokens, max_len=self.max_len)
    # The embedding is initialised with variance 1 / d_model (it doubles as the output projection); the sqrt
    # rescales the residual stream to unit variance.
    x = self.embed(tokens).astype(self.dtype) * jnp.asarray(math.sqrt(self.d_model), self.dtype)
    x = self.embed_dropout(x, deterministic=not train)  # [batch, length, d_model]
    for block in self.blocks:
      x = block(x, train=train, decode=decode)
    return self.final_norm(x)

  def logits_from_hidden(self, hidden: jax.typing.ArrayLike) -> jax.Array:
    """The output projection alone: ``[batch, ..., d_model]`` hidden states to ``[batch, ..., vocab_size]`` float32
    logits."""
    hidden = jnp.asarray(hidden, jnp.float32)
    if hidden.shape[-1:] != (self.d_model,):
      raise ValueError(f"hidden must end in d_model={self.d_model}, got shape {tuple(hidden.shape)}.")
    if self.tie_embeddings:
      return self.embed.attend(hidden)
    return self.lm_head(hidden)


def _check_tokens(tokens: jax.Array, *, max_len: int, name: str = "tokens") -> None:
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{name} must be integer token ids, got dtype {tokens.dtype} (shape {tuple(tokens.shape)}).")
  if tokens.ndim != 2:
    raise ValueError(f"{name} must be [batch, length], got shape {tuple(tokens.shape)}.")
  if tokens.shape[1] > max_len:
    raise ValueError(f"{name} have length {tokens.shape[1]} > max_len={max_len} (shape {tuple(tokens.shape)}).")


def init_cache(module: TransformerLM, batch_size: int, max_length: int) -> PyTree:
  """An empty KV cache (the ``'cache'`` collection) for ``batch_size`` sequences of up to ``max_length`` tokens.

  Shapes come from ``jax.eval_shape`` of ``module.init(..., decode=True)``, so no parameters are initialised.

  Args:
    module: the model.
    batch_size: number of sequences decoded together.
    max_length: positions the cache holds, prompt included; at most ``module.max_len``.

  Returns:
    A pytree of zeros: per block ``cached_key`` and ``cached_value`` ``[batch, max_length, heads, head_dim]`` in the
    computation dtype and a scalar int32 ``cache_index``.
  """
  if batch_size < 1 or max_length < 1:
    raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}.")
  if max_length > module.max_len:
    raise ValueError(f"max_length={max_length} exceeds the model's max_len={module.max_len}.")
  tokens = jax.ShapeDtypeStruct((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(functools.partial(module.init, decode=True), jax.random.key(0), tokens)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def _as_variables(params: PyTree) -> dict[str, PyTree]:
  # TransformerLM's parameters never have a top-level 'params' entry, so its presence means a variables dict.
  if isinstance(params, Mapping) and "params" in params:
    return {"params": params["params"]}
  return {"params": params}


def _check_sample_args(
  module: TransformerLM, prompt: jax.typing.ArrayLike, max_new_tokens: int, temperature: Any, greedy: bool, top_k: Any
) -> tuple[jax.Array, bool]:
  prompt = jnp.asarray(prompt)
  _check_tokens(prompt, max_len=module.max_len, name="prompt")
  if prompt.shape[1] < 1:
    raise ValueError(f"prompt needs at least one token, got shape {tuple(prompt.shape)}.")
  if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be a non-negative Python int, got {max_new_tokens!r}.")
  if prompt.shape[1] + max_new_tokens > module.max_len:
    raise ValueError(
      f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} = {prompt.shape[1] + max_new_tokens} "
      f"exceeds the model's max_len={module.max_len}."
    )
  if top_k is not None and (not isinstance(top_k, numbers.Integral) or not 1 <= top_k <= module.vocab_size):
    raise ValueError(f"top_k must be None or an int in [1, vocab_size={module.vocab_size}], got {top_k!r}.")
  if not isinstance(temperature, jax.core.Tracer):
    if not math.isfinite(float(temperature)) or float(temperature) < 0:
      raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}.")
    # Temperature 0 is the limit of sampling: the argmax.
    greedy = greedy or float(temperature) == 0.0
  return prompt.astype(jnp.int32), bool(greedy)


def _choose_token(logits: jax.Array, key: jax.Array, temperature: Any, *, greedy: bool, top_k: int | None) -> jax.Array:
  """``[batch, vocab]`` logits to ``[batch]`` int32 tokens; the one rule both samplers share."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if top_k is not None:
    kth = lax.top_k(logits, top_k)[0][..., -1:]  # [batch, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "greedy", "top_k"))
def _sample_cached(
  module: TransformerLM,
  variables: PyTree,
  prompt: jax.Array,
  rng: jax.Array,
  temperature: Any,
  *,
  max_new_tokens: int,
  greedy: bool,
  top_k: int | None,
) -> tuple[jax.Array, jax.Array]:
  batch, prompt_len = prompt.shape
  choose = functools.partial(_choose_token, temperature=temperature, greedy=greedy, top_k=top_k)
  cache = init_cache(module, batch, prompt_len + max_new_tokens)
  # Prefill: the whole prompt in one cached call; its last position predicts the first new token.
  logits, updates = module.apply({**variables, "cache": cache}, prompt, decode=True, mutable=["cache"])
  first_logits = logits[:, -1]  # [batch, vocab]
  first = choose(first_logits, jax.random.fold_in(rng, 0))

  def step(carry, i):
    cache, token = carry
    logits, updates = module.apply({**variables, "cache": cache}, token[:, None], decode=True, mutable=["cache"])
    logits = logits[:, 0]  # [batch, vocab]
    token = choose(logits, jax.random.fold_in(rng, i))
    return (updates["cache"], token), (token, logits)

  _, (tokens, step_logits) = lax.scan(step, (updates["cache"], first), jnp.arange(1, max_new_tokens))
  new_tokens = jnp.concatenate([first[:, None], tokens.T], axis=1)  # [batch, max_new_tokens]
  new_logits = jnp.concatenate([first_logits[:, None], step_logits.transpose(1, 0, 2)], axis=1)
  return jnp.concatenate([prompt, new_tokens], axis=1), new_logits


def sample_with_logits(
  module: TransformerLM,
  params: PyTree,
  prompt: jax.typing.ArrayLike,
  *,
  max_new_tokens: int,
  rng: jax.Array,
  temperature: float = 1.0,
  greedy: bool = False,
  top_k: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Autoregressive sampling with a KV cache, returning the logits each new token was drawn from.

  The prompt is prefilled in one cached forward pass; the new tokens are generated one at a time in a
  ``lax.scan``, each attending to the cache. New token ``i`` (0-based) is drawn with the key
  ``jax.random.fold_in(rng, i)``, so :func:`sample_uncached` with the same ``rng`` draws the same tokens.
  The whole computation is compiled once per (module, shapes, ``max_new_tokens``, ``greedy``, ``top_k``);
  ``temperature`` is a traced argument and may change without recompiling (0 means greedy, decided when concrete).

  Args:
    module: the model.
    params: its parameters (``variables['params']``), or the variables dict itself.
    prompt: ``[batch, prompt_len]`` integer token ids, ``prompt_len >= 1``.
    max_new_tokens: number of tokens to generate (static); ``prompt_len + max_new_tokens <= module.max_len``.
    rng: a PRNG key.
    temperature: divides the logits before sampling; 0 means greedy.
    greedy: take the argmax instead of sampling.
    top_k: sample only among the ``top_k`` highest logits (ties with the k-th included).

  Returns:
    ``(tokens, logits)``: ``[batch, prompt_len + max_new_tokens]`` int32 tokens, the prompt first, and
    ``[batch, max_new_tokens, vocab_size]`` float32 logits, where ``logits[:, i]`` (before temperature and top-k)
    predicted ``tokens[:, prompt_len + i]``.
  """
  prompt, greedy = _check_sample_args(module, prompt, max_new_tokens, temperature, greedy, top_k)
  if max_new_tokens == 0:
    return prompt, jnp.zeros((prompt.shape[0], 0, module.vocab_size), jnp.float32)
  return _sample_cached(
    module,
    _as_variables(params),
    prompt,
    rng,
    jnp.asarray(temperature, jnp.float32),
    max_new_tokens=int(max_new_tokens),
    greedy=greedy,
    top_k=top_k,
  )


def sample(
  module: TransformerLM,
  params: PyTree,
  prompt: jax.typing.ArrayLike,
  *,
  max_new_tokens: int,
  rng: jax.Array,
  temperature: float = 1.0,
  greedy: bool = False,
  top_k: int | None = None,
) -> jax.Array:
  """Autoregressive sampling with a KV cache: :func:`sample_with_logits` without the logits.

  Returns:
    ``[batch, prompt_len + max_new_tokens]`` int32 tokens, the prompt first.
  """
  tokens, _ = sample_with_logits(
    module,
    params,
    prompt,
    max_new_tokens=max_new_tokens,
    rng=rng,
    temperature=temperature,
    greedy=greedy,
    top_k=top_k,
  )
  return tokens


@functools.partial(jax.jit, static_argnames=("module", "greedy", "top_k"))
def _uncached_step(
  module: TransformerLM,
  variables: PyTree,
  tokens: jax.Array,
  position: jax.Array,
  key: jax.Array,
  temperature: Any,
  *,
  greedy: bool,
  top_k: int | None,
) -> jax.Array:
  logits = module.apply(variables, tokens)  # [batch, total, vocab]: the full forward pass, no cache
  logits = lax.dynamic_index_in_dim(logits, position - 1, axis=1, keepdims=False)  # [batch, vocab]
  token = _choose_token(logits, key, temperature, greedy=greedy, top_k=top_k)
  return lax.dynamic_update_slice(tokens, token[:, None], (0, position))


def sample_uncached(
  module: TransformerLM,
  params: PyTree,
  prompt: jax.typing.ArrayLike,
  *,
  max_new_tokens: int,
  rng: jax.Array,
  temperature: float = 1.0,
  greedy: bool = False,
  top_k: int | None = None,
) -> jax.Array:
  """Reference sampler: reruns the full forward pass over the sequence for every new token, without a cache.

  Quadratically slower than :func:`sample`, and a Python loop; it exists to check the cached path. Same arguments,
  same key use (``jax.random.fold_in(rng, i)`` for new token ``i``) and same result as :func:`sample`. The sequence
  lives in a ``[batch, prompt_len + max_new_tokens]`` buffer whose not-yet-generated positions hold zeros, so the
  forward pass compiles once rather than once per length; causal attention keeps those zeros from reaching the
  logits that are read.

  Returns:
    ``[batch, prompt_len + max_new_tokens]`` int32 tokens, the prompt first.
  """
  prompt, greedy = _check_sample_args(module, prompt, max_new_tokens, temperature, greedy, top_k)
  batch, prompt_len = prompt.shape
  tokens = jnp.concatenate([prompt, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
  variables = _as_variables(params)
  temperature = jnp.asarray(temperature, jnp.float32)
  for i in range(max_new_tokens):
    position = jnp.asarray(prompt_len + i, jnp.int32)
    key = jax.random.fold_in(rng, i)
    tokens = _uncached_step(module, variables, tokens, position, key, temperature, greedy=greedy, top_k=top_k)
  return tokens
