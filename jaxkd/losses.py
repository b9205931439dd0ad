"""Pure distillation losses in the optax style: Hinton's soft targets and the cross-entropies around them.

Every function here is a pure function of arrays: per-example outputs (the caller
reduces), hyperparameters after the arrays, float32 arithmetic whatever the input
dtype, and user errors raised from static shapes at trace time.

The post-Hinton logit-based losses (DKD, DIST, logit standardisation, reverse KL,
generalised JSD) live in :mod:`jaxkd.logit_losses` and are re-exported here.

References:
  Hinton, Vinyals and Dean, *Distilling the Knowledge in a Neural Network*, 2015.
  https://arxiv.org/abs/1503.02531
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from jaxkd._checks import check_labels, check_same_shape, check_temperature, check_where
from jaxkd._numerics import as_float, cross_entropy_terms, kl_terms
from jaxkd.logit_losses import (
  dist_loss,
  dkd_loss,
  generalized_jsd_loss,
  reverse_kl_loss,
  standardize_logits,
  standardized_kd_loss,
)

__all__ = [
  "tempered_softmax",
  "tempered_log_softmax",
  "kd_loss",
  "distillation_loss",
  "soft_cross_entropy",
  "hard_cross_entropy",
  "check_temperature",
  "dkd_loss",
  "dist_loss",
  "standardize_logits",
  "standardized_kd_loss",
  "reverse_kl_loss",
  "generalized_jsd_loss",
]


def tempered_log_softmax(
  logits: jax.typing.ArrayLike,
  temperature: jax.typing.ArrayLike = 1.0,
  *,
  axis: int = -1,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Log-probabilities of the softmax of ``logits / temperature``.

  .. math::
    \log p_i = \frac{z_i}{T} - \log \sum_{j \in \mathcal{K}} \exp\left(\frac{z_j}{T}\right)

  where :math:`\mathcal{K}` is the set of kept classes (all classes when
  ``where`` is None). Masked-out classes get :math:`-\infty`.

  Args:
    logits: unnormalised scores, ``[..., num_classes]``.
    temperature: :math:`T > 0`; a Python number, or an array (traced values
      are allowed under ``jit``, e.g. for schedules).
    axis: the class axis.
    where: optional boolean mask broadcastable to ``logits``; False classes are
      removed and the distribution renormalised over the rest.

  Returns:
    float32 (or wider) log-probabilities with the shape of ``logits``.

  >>> import jax.numpy as jnp
  >>> tempered_log_softmax(jnp.array([0.0, 0.0]), 2.0)
  Array([-0.6931472, -0.6931472], dtype=float32)

  References:
    Hinton et al., *Distilling the Knowledge in a Neural Network*, 2015.
  """
  check_temperature(temperature)
  logits = as_float(logits)
  where = check_where(where, logits.shape)
  temperature = jnp.asarray(temperature, dtype=logits.dtype)
  return jax.nn.log_softmax(logits / temperature, axis=axis, where=where)


def tempered_softmax(
  logits: jax.typing.ArrayLike,
  temperature: jax.typing.ArrayLike = 1.0,
  *,
  axis: int = -1,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Softmax of ``logits / temperature`` ("soft targets" for :math:`T > 1`).

  .. math::
    p_i = \frac{\exp(z_i / T)}{\sum_{j \in \mathcal{K}} \exp(z_j / T)}

  Masked-out classes (``where`` False) get probability exactly 0.

  Args:
    logits: unnormalised scores, ``[..., num_classes]``.
    temperature: :math:`T > 0`.
    axis: the class axis.
    where: optional boolean mask broadcastable to ``logits``.

  Returns:
    Probabilities with the shape of ``logits``, float32 or wider.

  >>> import jax.numpy as jnp
  >>> tempered_softmax(jnp.array([0.0, 0.0]), 4.0)
  Array([0.5, 0.5], dtype=float32)

  References:
    Hinton et al., *Distilling the Knowledge in a Neural Network*, 2015.
  """
  return jnp.exp(tempered_log_softmax(logits, temperature, axis=axis, where=where))


def kd_loss(
  student_logits: jax.typing.ArrayLike,
  teacher_logits: jax.typing.ArrayLike,
  temperature: jax.typing.ArrayLike = 1.0,
  *,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Hinton's soft-target loss, per example.

  .. math::
    \ell = T^2 \sum_i q_i \left(\log q_i - \log p_i\right), \quad
    q = \mathrm{softmax}(t / T),\; p = \mathrm{softmax}(s / T)

  i.e. :math:`T^2 \, \mathrm{KL}(q \,\|\, p)`. The :math:`T^2` keeps gradient
  magnitudes comparable across temperatures (the paper, section 2), since
  :math:`\partial \ell / \partial s = T (p - q)`. The teacher side is wrapped in
  ``stop_gradient``: no gradient ever reaches the teacher.

  Args:
    student_logits: ``[..., num_classes]``.
    teacher_logits: same shape as ``student_logits``; may hold −inf for
      classes the teacher rules out.
    temperature: :math:`T > 0`.
    where: optional boolean class mask broadcastable to the logits; both
      distributions are renormalised over the kept classes (subset
      distillation).

  Returns:
    Per-example loss of shape ``student_logits.shape[:-1]``, float32.

  >>> import jax.numpy as jnp
  >>> kd_loss(jnp.array([[1.0, 2.0]]), jnp.array([[1.0, 2.0]]), 4.0)
  Array([0.], dtype=float32)

  References:
    Hinton et al., *Distilling the Knowledge in a Neural Network*, 2015.
  """
  student_logits = as_float(student_logits)
  teacher_logits = jax.lax.stop_gradient(as_float(teacher_logits))
  check_same_shape(student_logits, teacher_logits)
  check_temperature(temperature)
  temperature = jnp.asarray(temperature, dtype=student_logits.dtype)
  teacher_log_probs = tempered_log_softmax(teacher_logits, temperature, where=where)
  student_log_probs = tempered_log_softmax(student_logits, temperature, where=where)
  return temperature**2 * kl_terms(teacher_log_probs, student_log_probs)


def soft_cross_entropy(
  student_logits: jax.typing.ArrayLike,
  target_probs: jax.typing.ArrayLike,
  temperature: jax.typing.ArrayLike = 1.0,
  *,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Cross-entropy of the student at temperature ``T`` against given probabilities.

  .. math::
    \ell = -\sum_i q_i \log \mathrm{softmax}(s / T)_i

  For targets that are already probabilities: cached or ensembled teacher
  outputs, label smoothing. It differs from :func:`kd_loss` by the target's
  entropy (a constant) and by the missing :math:`T^2` factor; multiply by
  :math:`T^2` yourself to mix it with hard-label terms at high temperature.
  Targets are treated as constants (``stop_gradient``).

  Args:
    student_logits: ``[..., num_classes]``.
    target_probs: same shape, rows summing to 1 over the kept classes.
    temperature: :math:`T > 0` applied to the student only.
    where: optional boolean class mask broadcastable to the logits.

  Returns:
    Per-example loss of shape ``student_logits.shape[:-1]``, float32.

  >>> import jax.numpy as jnp
  >>> soft_cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([[0.5, 0.5]]))
  Array([0.6931472], dtype=float32)

  References:
    Hinton et al., *Distilling the Knowledge in a Neural Network*, 2015.
  """
  student_logits = as_float(student_logits)
  target_probs = jax.lax.stop_gradient(as_float(target_probs))
  check_same_shape(student_logits, target_probs, what="target_probs")
  student_log_probs = tempered_log_softmax(student_logits, temperature, where=where)
  if where is not None:
    target_probs = jnp.where(check_where(where, target_probs.shape), target_probs, 0.0)
  return -jnp.sum(cross_entropy_terms(target_probs, student_log_probs), axis=-1)


def distillation_loss(
  student_logits: jax.typing.ArrayLike,
  teacher_logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  temperature: jax.typing.ArrayLike = 1.0,
  alpha: jax.typing.ArrayLike = 0.5,
  *,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Hinton's combined objective: soft targets plus hard labels, per example.

  .. math::
    \ell = \alpha \, T^2 \, \mathrm{KL}\left(\mathrm{softmax}(t/T) \,\|\,
      \mathrm{softmax}(s/T)\right) + (1 - \alpha) \left(-\log \mathrm{softmax}(s)_y\right)

  The hard-label term uses the student at :math:`T = 1`, as it runs after
  training. With ``where`` both terms are restricted to the kept classes;
  labels must then be kept classes (a masked label has infinite loss).

  Args:
    student_logits: ``[..., num_classes]``.
    teacher_logits: same shape as ``student_logits``.
    labels: integer class indices of shape ``student_logits.shape[:-1]``.
    temperature: :math:`T > 0` for the soft term.
    alpha: weight :math:`\alpha \in [0, 1]` of the soft term.
    where: optional boolean class mask broadcastable to the logits.

  Returns:
    Per-example loss of shape ``student_logits.shape[:-1]``, float32.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[2.0, 0.0]]); t = jnp.array([[2.0, 0.0]])
  >>> distillation_loss(s, t, jnp.array([0]), 4.0, alpha=1.0)
  Array([0.], dtype=float32)

  References:
    Hinton et al., *Distilling the Knowledge in a Neural Network*, 2015.
  """
  student_logits = as_float(student_logits)
  teacher_logits = as_float(teacher_logits)
  check_same_shape(student_logits, teacher_logits)
  labels = jnp.asarray(labels)
  check_labels(labels, student_logits.shape)
  if isinstance(alpha, numbers.Number) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
  soft = kd_loss(student_logits, teacher_logits, temperature, where=where)
  hard = hard_cross_entropy(student_logits, labels, where=where)
  alpha = jnp.asarray(alpha, dtype=soft.dtype)
  return alpha * soft + (1.0 - alpha) * hard


def hard_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Cross-entropy at :math:`T = 1` against integer labels, per example.

  .. math::
    \ell = -\log \mathrm{softmax}(z)_y

  Args:
    logits: ``[..., num_classes]``.
    labels: integer class indices of shape ``logits.shape[:-1]``.
    where: optional boolean class mask broadcastable to the logits.

  Returns:
    Per-example loss of shape ``logits.shape[:-1]``, float32.

  >>> import jax.numpy as jnp
  >>> hard_cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([1]))
  Array([0.6931472], dtype=float32)
  """
  logits = as_float(logits)
  labels = jnp.asarray(labels)
  check_labels(labels, logits.shape)
  log_probs = tempered_log_softmax(logits, 1.0, where=where)
  return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
