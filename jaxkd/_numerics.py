"""Numerical helpers shared by the loss modules: float32 promotion and NaN-free gradients at the edges.

Private to the package: the names are public so that :mod:`jaxkd.losses`, :mod:`jaxkd.logit_losses`,
:mod:`jaxkd.features` and :mod:`jaxkd.relations` can import them, but users should not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["as_float", "cross_entropy_terms", "kl_terms", "safe_norm"]


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
