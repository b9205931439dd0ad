"""Pure distillation losses in the optax style: Hinton's soft targets and the cross-entropies around them.

Every function here is a pure function of arrays: per-example outputs (the caller
reduces), hyperparameters after the arrays, float32 arithmetic whatever the input
dtype, and user errors raised from static shapes at trace time.

What is checked where: shapes, dtypes and *concrete* values (Python, NumPy or JAX
numbers and arrays: a temperature that is not finite and > 0, an ``alpha`` outside
[0, 1], a label outside ``[0, num_classes)``) raise ValueError/TypeError at trace
time. Traced values cannot raise; they make the result NaN instead, so that a train
step's non-finite guard skips and counts the step: a traced temperature that is not
finite and > 0 (the whole result), a traced label out of range (that example), and
teacher logits with no distribution, i.e. NaN or +inf on a kept class, or a row of
−inf (that example). A −inf teacher logit on some classes and classes removed by
``where`` are legitimate zero probabilities: they contribute 0, with finite gradients.

The post-Hinton logit-based losses (DKD, DIST, logit standardisation, reverse KL,
generalised JSD) live in ``_logit.py`` beside this file; :mod:`jaxkd.losses` is the face of both.

References:
  Hinton, Vinyals and Dean, *Distilling the Knowledge in a Neural Network*, 2015.
  https://arxiv.org/abs/1503.02531
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd._checks import (
  check_closed_unit_interval,
  check_label_range,
  check_labels,
  check_same_shape,
  check_temperature,
  check_where,
)
from jaxkd._numerics import (
  as_float,
  as_temperature,
  cross_entropy_terms,
  kl_terms,
  nan_where,
  undefined_distribution,
)

__all__ = [
  "tempered_softmax",
  "tempered_log_softmax",
  "kd_loss",
  "distillation_loss",
  "soft_cross_entropy",
  "hard_cross_entropy",
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
      are allowed under ``jit``, e.g. for schedules). A concrete value that is
      not finite and > 0 raises ValueError; a traced one makes the output NaN.
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
  return _tempered_log_softmax(logits, as_temperature(temperature, logits.dtype), axis, where)


def _tempered_log_softmax(
  logits: jax.Array, temperature: jax.Array, axis: int, where: jax.typing.ArrayLike | None
) -> jax.Array:
  """The arithmetic of :func:`tempered_log_softmax`, for callers that checked the temperature already."""
  return jax.nn.log_softmax(logits / temperature, axis=axis, where=check_where(where, logits.shape))


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
    temperature: :math:`T > 0`; concrete values that are not finite and > 0
      raise ValueError, traced ones make the output NaN.
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

  A teacher row without a distribution (NaN or +inf on a kept class, or −inf on
  all of them: a diverged teacher, a NaN row in a logit cache) gives NaN for
  that example, not the 0 that 0 · log 0 handling would make of it, so that a
  train step's guard skips the step instead of silently not distilling.

  Args:
    student_logits: ``[..., num_classes]``.
    teacher_logits: same shape as ``student_logits``; may hold −inf for
      classes the teacher rules out (probability 0, contributing 0).
    temperature: :math:`T > 0`; a concrete value that is not finite and > 0
      raises ValueError, a traced one makes the loss NaN.
    where: optional boolean class mask broadcastable to the logits; both
      distributions are renormalised over the kept classes (subset
      distillation). The teacher's masked classes may hold anything, NaN
      included.

  Returns:
    Per-example loss of shape ``student_logits.shape[:-1]``, float32.

  >>> import jax.numpy as jnp
  >>> kd_loss(jnp.array([[1.0, 2.0]]), jnp.array([[1.0, 2.0]]), 4.0)
  Array([0.], dtype=float32)
  >>> kd_loss(jnp.array([[2.0, 0.5, -1.0]]), jnp.array([[1.0, jnp.nan, 2.0]]), 2.0)
  Array([nan], dtype=float32)

  References:
    Hinton et al., *Distilling the Knowledge in a Neural Network*, 2015.
  """
  student_logits = as_float(student_logits)
  teacher_logits = jax.lax.stop_gradient(as_float(teacher_logits))
  check_same_shape(student_logits, teacher_logits)
  check_temperature(temperature)
  temperature = as_temperature(temperature, student_logits.dtype)
  teacher_log_probs = _tempered_log_softmax(teacher_logits, temperature, -1, where)
  student_log_probs = _tempered_log_softmax(student_logits, temperature, -1, where)
  loss = temperature**2 * kl_terms(teacher_log_probs, student_log_probs)
  return nan_where(undefined_distribution(teacher_log_probs), loss)


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
  Targets are treated as constants (``stop_gradient``). A NaN target on a kept
  class makes that example's loss NaN (it is not taken for a zero probability).

  Args:
    student_logits: ``[..., num_classes]``.
    target_probs: same shape, rows summing to 1 over the kept classes.
    temperature: :math:`T > 0` applied to the student only; a concrete value
      that is not finite and > 0 raises ValueError, a traced one makes the loss
      NaN.
    where: optional boolean class mask broadcastable to the logits; masked
      targets may hold anything.

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
  check_temperature(temperature)
  student_log_probs = _tempered_log_softmax(
    student_logits, as_temperature(temperature, student_logits.dtype), -1, where
  )
  if where is not None:
    target_probs = jnp.where(check_where(where, target_probs.shape), target_probs, 0.0)
  loss = -jnp.sum(cross_entropy_terms(target_probs, student_log_probs), axis=-1)
  # A NaN target is not a zero probability; the student's NaN log-probabilities (a bad traced T) carry themselves.
  return nan_where(undefined_distribution(target_probs), loss)


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

  Checked statically (ValueError): concrete labels outside
  ``[0, num_classes)``, a concrete ``alpha`` outside [0, 1] (NumPy and JAX
  values included), a concrete temperature that is not finite and > 0. Made
  NaN: the examples of traced out-of-range labels or of teacher rows without a
  distribution (as in :func:`kd_loss`; whatever ``alpha``, since
  :math:`0 \cdot \mathrm{NaN}` is NaN), and the whole result for a traced
  temperature that is not > 0. A traced ``alpha`` is used as given.

  Args:
    student_logits: ``[..., num_classes]``.
    teacher_logits: same shape as ``student_logits``.
    labels: integer class indices in ``[0, num_classes)``, of shape
      ``student_logits.shape[:-1]``.
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
  # The range check reads the labels as given: jnp.asarray would make a NumPy constant a tracer under jit.
  label_array = jnp.asarray(labels)
  check_labels(label_array, student_logits.shape)
  check_label_range(labels, student_logits.shape[-1])
  check_closed_unit_interval(alpha, "alpha")
  soft = kd_loss(student_logits, teacher_logits, temperature, where=where)
  hard = _hard_cross_entropy(student_logits, label_array, where)
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

  A label outside ``[0, num_classes)`` is an error, never a class: concrete
  labels raise ValueError naming the range; a traced one (under ``jit``) makes
  its example's loss NaN rather than scoring, say, -1 as the last class.

  Args:
    logits: ``[..., num_classes]``.
    labels: integer class indices in ``[0, num_classes)``, of shape
      ``logits.shape[:-1]``.
    where: optional boolean class mask broadcastable to the logits.

  Returns:
    Per-example loss of shape ``logits.shape[:-1]``, float32.

  >>> import jax.numpy as jnp
  >>> hard_cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([1]))
  Array([0.6931472], dtype=float32)
  """
  logits = as_float(logits)
  label_array = jnp.asarray(labels)
  check_labels(label_array, logits.shape)
  check_label_range(labels, logits.shape[-1])
  return _hard_cross_entropy(logits, label_array, where)


def _hard_cross_entropy(logits: jax.Array, labels: jax.Array, where: jax.typing.ArrayLike | None) -> jax.Array:
  """The arithmetic of :func:`hard_cross_entropy`, for callers that checked its arguments."""
  in_range = (labels >= 0) & (labels < logits.shape[-1])
  # Out-of-range labels gather class 0 and are then replaced by NaN: the gather itself never wraps -1 around to
  # the last class, and the NaN is selected after it, so it reaches no gradient.
  safe_labels = jnp.where(in_range, labels, 0)
  log_probs = _tempered_log_softmax(logits, jnp.asarray(1.0, dtype=logits.dtype), -1, where)
  loss = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  return nan_where(~in_range, loss)
