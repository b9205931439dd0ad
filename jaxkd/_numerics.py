"""Numerical helpers shared by the loss modules: float32 promotion and NaN-free gradients at the edges.

Private to the package: the names are public so that the loss modules of :mod:`jaxkd.losses` (``_hinton``,
``_logit``, ``_features``, ``_relations``, ``_crd``...) share one definition of each (one ``l2_normalize``, not a
copy per module), but users should not import them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
  "as_float",
  "cross_entropy_terms",
  "kl_terms",
  "safe_norm",
  "l2_normalize",
  "nan_where",
  "undefined_distribution",
  "as_temperature",
]


def as_float(x: jax.typing.ArrayLike) -> jax.Array:
  """Promotes to at least float32: bf16/fp16 logits lose too much in a softmax.

  >>> as_float(jnp.ones(2, jnp.bfloat16)).dtype
  dtype('float32')
  """
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy_terms(target_probs: jax.Array, log_probs: jax.Array) -> jax.Array:
  """``target_probs * log_probs`` with 0 · log 0 = 0 and 0 · (−inf) = 0.

  The inner ``where`` keeps −inf out of the product so that its gradient is 0,
  not NaN (the double-where trick).
  """
  nonzero = target_probs > 0
  safe_log_probs = jnp.where(nonzero, log_probs, 0.0)
  return jnp.where(nonzero, target_probs * safe_log_probs, 0.0)


def kl_terms(p_log_probs: jax.Array, q_log_probs: jax.Array) -> jax.Array:
  """Summed ``p (log p - log q)`` over the class axis with 0 · log 0 = 0."""
  p = jnp.exp(p_log_probs)
  return jnp.sum(cross_entropy_terms(p, p_log_probs) - cross_entropy_terms(p, q_log_probs), axis=-1)


def safe_norm(x: jax.Array, axis: int | tuple[int, ...] = -1, keepdims: bool = False) -> jax.Array:
  """Euclidean norm whose gradient at the zero vector is 0 instead of NaN (double-where)."""
  squared = jnp.sum(x * x, axis=axis, keepdims=keepdims)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` with a finite gradient at the zero vector (``torch.nn.functional.normalize``)."""
  return x / jnp.maximum(safe_norm(x, axis=axis, keepdims=True), eps)


def nan_where(undefined: jax.Array, values: jax.Array) -> jax.Array:
  """``values`` with NaN where ``undefined`` (broadcast), a select on the output only.

  The safe-arithmetic ``where`` of 0 · log 0 turns NaN into 0 as readily as it does −inf, so an undefined input
  (a NaN teacher) would vanish into a zero loss with a zero gradient. Selecting NaN afterwards, instead of changing
  the arithmetic, keeps every defined value bit for bit and the gradient of defined entries as it was. Use it on
  final results only: XLA:CPU can turn ``exp`` of a selected NaN constant into garbage (jax-ml/jax#29537).
  """
  return jnp.where(undefined, jnp.nan, values)


def undefined_distribution(log_probs: jax.Array, axis: int = -1) -> jax.Array:
  """True where a row of log-probabilities holds NaN: its logits had NaN or +inf on a kept class, or were all −inf.

  A −inf logit on some classes (the teacher rules them out) or a class removed by ``where`` gives a log-probability
  of −inf, not NaN, so legitimate zero probabilities are never flagged.
  """
  return jnp.any(jnp.isnan(log_probs), axis=axis)


def as_temperature(temperature: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike) -> jax.Array:
  """``temperature`` as an array of ``dtype``; a *traced* one that is not finite and > 0 becomes NaN.

  Concrete temperatures were checked (and raised on) at trace time, so they pass untouched. A traced one (a
  schedule, an argument of ``jit``) cannot raise; T = 0 would otherwise give a silent 0 (its NaN swallowed by the
  0 · log 0 handling) and T < 0 a finite loss of flipped distributions. As NaN it reaches every result through the
  division by T and the T² factor. The select is on the scalar, not on the results, so no softmax downstream sees a
  selected NaN constant (see :func:`nan_where`).
  """
  array = jnp.asarray(temperature, dtype=dtype)
  if not isinstance(temperature, jax.core.Tracer):
    return array
  return jnp.where(jnp.isfinite(array) & (array > 0), array, jnp.nan)
