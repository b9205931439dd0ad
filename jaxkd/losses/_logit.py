"""The post-Hinton logit-based losses: DKD, DIST, logit standardisation, reverse KL and GKD's generalised JSD.

Successors of Hinton's soft-target loss (:mod:`jaxkd.losses`, which re-exports everything here), in the same optax
style: pure functions of arrays, float32 arithmetic whatever the input dtype, the teacher side under
``stop_gradient``, user errors raised from static shapes at trace time. Hyperparameters are keyword-only and
default to the papers' settings. Two kinds of mask appear:

* ``where``, a *class* mask broadcastable to the logits, as in :func:`jaxkd.losses.kd_loss`: classes that are
  False are removed and the distributions renormalised over the rest;
* ``position_mask``, a *position* mask of shape ``logits.shape[:-1]`` (examples, or ``[batch, seq]`` tokens): a
  False position contributes exactly 0 and gets a zero gradient, whatever its logits hold (padding may hold
  garbage, inf or NaN).

As in :mod:`jaxkd.losses`, concrete values are checked at trace time (a temperature that is not finite and > 0,
labels outside ``[0, num_classes)`` at kept positions and GJSD's ``beta`` outside (0, 1) raise ValueError), and
traced ones make the result NaN: a traced temperature that is not finite and > 0 (every kept position), a traced label
out of range (that position), and a teacher row without a distribution at a kept position (NaN or +inf on a kept
class, or −inf on all of them; that position), so that a train step's guard skips the step rather than training on
a silent 0.

References:
  Zhao, Cui, Song, Qiu and Liang, *Decoupled Knowledge Distillation*, CVPR 2022.
  https://arxiv.org/abs/2203.08679
  Huang, You, Wang, Qian and Xu, *Knowledge Distillation from A Stronger Teacher*, NeurIPS 2022.
  https://arxiv.org/abs/2205.10536
  Sun, Ren, Li, Wang and Cao, *Logit Standardization in Knowledge Distillation*, CVPR 2024.
  https://arxiv.org/abs/2403.01427
  Gu, Dong, Wei and Huang, *MiniLLM: Knowledge Distillation of Large Language Models*, ICLR 2024.
  https://arxiv.org/abs/2306.08543
  Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist and Bachem, *On-Policy Distillation of Language Models:
  Learning from Self-Generated Mistakes*, ICLR 2024. https://arxiv.org/abs/2306.13649
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxkd._checks import (
  check_label_range,
  check_labels,
  check_open_unit_interval,
  check_position_mask,
  check_same_shape,
  check_temperature,
  check_where,
)
from jaxkd._numerics import as_float, as_temperature, kl_terms, nan_where, safe_norm, undefined_distribution

__all__ = [
  "dkd_loss",
  "dist_loss",
  "standardize_logits",
  "standardized_kd_loss",
  "reverse_kl_loss",
  "generalized_jsd_loss",
]


def _zero_masked_positions(logits: jax.Array, position_mask: jax.Array | None) -> jax.Array:
  """Replaces the logits of masked positions by zeros before any arithmetic (the first where of double-where)."""
  if position_mask is None:
    return logits
  return jnp.where(position_mask[..., None], logits, 0.0)


def _apply_position_mask(loss: jax.Array, position_mask: jax.Array | None) -> jax.Array:
  if position_mask is None:
    return loss
  return jnp.where(position_mask, loss, 0.0)


def _prepare_pair(
  student_logits: jax.typing.ArrayLike,
  teacher_logits: jax.typing.ArrayLike,
  temperature: Any,
  position_mask: jax.typing.ArrayLike | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """Shared checks: float32, same shapes, temperature > 0, teacher under stop_gradient, masked positions zeroed.

  A traced temperature that is not > 0 comes back as NaN (:func:`jaxkd._numerics.as_temperature`); every loss here
  carries it into its result through the division by T and the T² factor (masked positions stay 0).
  """
  student_logits = as_float(student_logits)
  teacher_logits = jax.lax.stop_gradient(as_float(teacher_logits))
  check_same_shape(student_logits, teacher_logits)
  check_temperature(temperature)
  position_mask = check_position_mask(position_mask, student_logits.shape)
  student_logits = _zero_masked_positions(student_logits, position_mask)
  teacher_logits = _zero_masked_positions(teacher_logits, position_mask)
  return student_logits, teacher_logits, as_temperature(temperature, student_logits.dtype), position_mask


def _log_softmax(logits: jax.Array, temperature: jax.Array, where: jax.typing.ArrayLike | None) -> jax.Array:
  """:func:`jaxkd.losses.tempered_log_softmax` of logits and temperature already through :func:`_prepare_pair`."""
  return jax.nn.log_softmax(logits / temperature, axis=-1, where=check_where(where, logits.shape))


def dkd_loss(
  student_logits: jax.typing.ArrayLike,
  teacher_logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  alpha: jax.typing.ArrayLike = 1.0,
  beta: jax.typing.ArrayLike = 8.0,
  temperature: jax.typing.ArrayLike = 4.0,
  position_mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Decoupled knowledge distillation (DKD): target-class and non-target-class KD, per example.

  With :math:`p = \mathrm{softmax}(z / T)` and the label :math:`y`, the binary
  distribution :math:`b = (p_y, 1 - p_y)` and the distribution over the
  non-target classes :math:`\hat p_i = p_i / (1 - p_y)`, :math:`i \ne y`:

  .. math::
    \mathrm{TCKD} = T^2\, \mathrm{KL}(b^t \,\|\, b^s), \quad
    \mathrm{NCKD} = T^2\, \mathrm{KL}(\hat p^t \,\|\, \hat p^s), \quad
    \ell = \alpha\, \mathrm{TCKD} + \beta\, \mathrm{NCKD}

  Classical KD is the coupled special case
  :math:`T^2 \mathrm{KL}(p^t \| p^s) = \mathrm{TCKD} + (1 - p^t_y)\, \mathrm{NCKD}`
  (the paper's eq. 1); DKD drops the :math:`(1 - p^t_y)` factor that
  suppresses NCKD for confident teachers. :math:`1 - p_y` is computed as a
  ``logsumexp`` over the non-target classes, so it stays accurate when
  :math:`p_y \to 1`. The :math:`T^2` factor follows the authors' code. The
  paper's CIFAR-100 setting is ``alpha=1, beta=8, temperature=4`` (beta tuned
  per teacher, 2 to 8) with the hard-label cross-entropy added at weight 1 and
  the DKD term warmed up linearly over the first 20 epochs; ImageNet uses
  ``alpha=1, beta=0.5, temperature=1`` with a 1-epoch warm-up. The teacher
  side is under ``stop_gradient``.

  A teacher row without a distribution (NaN or +inf, or −inf on every class)
  makes its position NaN; a teacher that rules out every non-target class
  (−inf there) is certain, not broken, and its NCKD is 0.

  Args:
    student_logits: ``[..., num_classes]`` with ``num_classes >= 2``.
    teacher_logits: same shape; may hold −inf for classes the teacher rules out.
    labels: integer class indices in ``[0, num_classes)``, of shape
      ``student_logits.shape[:-1]``; concrete ones out of range raise
      ValueError, traced ones make their position NaN.
    alpha: weight of TCKD.
    beta: weight of NCKD.
    temperature: :math:`T > 0`; a concrete value that is not finite and > 0
      raises ValueError, a traced one makes the loss NaN.
    position_mask: optional boolean mask of shape ``student_logits.shape[:-1]``;
      False positions contribute 0 (and no gradient); their labels are
      ignored and may be anything (e.g. a padding label of -100).

  Returns:
    Per-example loss of shape ``student_logits.shape[:-1]``, float32.

  >>> import jax.numpy as jnp
  >>> z = jnp.array([[3.0, 1.0, 0.0]])
  >>> dkd_loss(z, z, jnp.array([0]))
  Array([0.], dtype=float32)

  References:
    Zhao, Cui, Song, Qiu and Liang, *Decoupled Knowledge Distillation*, CVPR 2022.
    https://arxiv.org/abs/2203.08679
  """
  # The arguments as given: under jit, jnp.asarray makes even NumPy constants tracers, which cannot be checked.
  given_labels, given_mask = labels, position_mask
  student_logits, teacher_logits, temperature, position_mask = _prepare_pair(
    student_logits, teacher_logits, temperature, position_mask
  )
  num_classes = student_logits.shape[-1]
  if num_classes < 2:
    raise ValueError(f"dkd_loss needs at least 2 classes, got logits of shape {tuple(student_logits.shape)}.")
  labels = jnp.asarray(labels)
  check_labels(labels, student_logits.shape)
  check_label_range(given_labels, num_classes, position_mask=given_mask)
  # Out-of-range labels (padding ones such as -100 too) must not reach the gathers below, where -1 would wrap to
  # the last class and NaN would leak into the gradient: they gather class 0 and their positions are made NaN (or
  # 0 when masked) after the arithmetic.
  in_range = (labels >= 0) & (labels < num_classes)
  labels = jnp.where(in_range, labels, 0)
  target = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)

  def binary_and_non_target(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)
    log_p_target = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    log_p_other = jax.nn.logsumexp(log_probs, axis=-1, where=~target)
    binary = jnp.stack([log_p_target, log_p_other], axis=-1)  # [..., 2]
    non_target = jax.nn.log_softmax(logits / temperature, axis=-1, where=~target)  # -inf at the target
    return binary, non_target

  student_binary, student_non_target = binary_and_non_target(student_logits)
  teacher_binary, teacher_non_target = binary_and_non_target(teacher_logits)
  tckd = kl_terms(teacher_binary, student_binary)
  nckd = kl_terms(teacher_non_target, student_non_target)
  alpha = jnp.asarray(alpha, dtype=tckd.dtype)
  beta = jnp.asarray(beta, dtype=tckd.dtype)
  loss = temperature**2 * (alpha * tckd + beta * nckd)
  # The teacher's binary distribution is NaN exactly when its full softmax is; its non-target one may be NaN
  # legitimately (every non-target class at -inf), which the 0 · log 0 handling turns into NCKD = 0.
  loss = nan_where(~in_range | undefined_distribution(teacher_binary), loss)
  return _apply_position_mask(loss, position_mask)


def _pearson(a: jax.Array, b: jax.Array, weights: jax.Array, axis: int, eps: float) -> jax.Array:
  """Weighted Pearson correlation along ``axis``; weights are 0/1 (masked entries drop out)."""
  count = jnp.sum(weights, axis=axis, keepdims=True)
  count = jnp.where(count > 0, count, 1.0)
  a = (a - jnp.sum(weights * a, axis=axis, keepdims=True) / count) * weights
  b = (b - jnp.sum(weights * b, axis=axis, keepdims=True) / count) * weights
  return jnp.sum(a * b, axis=axis) / (safe_norm(a, axis) * safe_norm(b, axis) + eps)


def dist_loss(
  student_logits: jax.typing.ArrayLike,
  teacher_logits: jax.typing.ArrayLike,
  *,
  beta: jax.typing.ArrayLike = 1.0,
  gamma: jax.typing.ArrayLike = 1.0,
  temperature: jax.typing.ArrayLike = 1.0,
  eps: float = 1e-8,
  position_mask: jax.typing.ArrayLike | None = None,
  axis_name: Any = None,
) -> jax.Array:
  r"""DIST: Pearson-correlation matching of probabilities across classes and across the batch (a scalar).

  With :math:`Y = \mathrm{softmax}(Z / T)` of shape ``[B, C]`` for student and
  teacher, and :math:`\rho` the Pearson correlation coefficient
  :math:`\rho(u, v) = \frac{(u - \bar u) \cdot (v - \bar v)}{\|u - \bar u\| \|v - \bar v\| + \epsilon}`:

  .. math::
    \mathcal{L}_\mathrm{inter} = \frac{T^2}{B} \sum_{i=1}^{B} \left(1 - \rho(Y^s_{i,:}, Y^t_{i,:})\right), \quad
    \mathcal{L}_\mathrm{intra} = \frac{T^2}{C} \sum_{j=1}^{C} \left(1 - \rho(Y^s_{:,j}, Y^t_{:,j})\right)

  .. math::
    \ell = \beta\, \mathcal{L}_\mathrm{inter} + \gamma\, \mathcal{L}_\mathrm{intra}

  The intra-class term correlates each class's column of probabilities
  *over the batch*, so this loss is defined per batch and returns a scalar
  (already averaged; do not reduce it again). All leading axes of the logits
  are flattened into the batch ``B`` (tokens of ``[batch, seq, vocab]``
  logits count as examples). Without ``axis_name`` the batch is the local
  one; with ``axis_name`` (inside ``pmap``/``shard_map``/``vmap`` over that
  axis) the logits are ``all_gather``-ed so every device computes the loss of
  the global batch; treat it like a per-device mean loss: the ``lax.pmean``
  of gradients of a ``pmap`` step then gives exactly the gradient of the
  global-batch loss (each device's own gradient is ``num_devices`` times its
  examples' share, as the transpose of ``all_gather`` sums the cotangents).

  The authors' defaults are ``beta=gamma=1`` and ``temperature=1`` (their
  ImageNet setting), next to the hard-label cross-entropy at weight 1;
  CIFAR-100 re-implementations commonly use ``temperature=4``. The teacher
  side is under ``stop_gradient``.

  Args:
    student_logits: ``[..., num_classes]``.
    teacher_logits: same shape.
    beta: weight of the inter-class (per-example) term.
    gamma: weight of the intra-class (per-class, over the batch) term.
    temperature: :math:`T > 0`; a concrete value that is not finite and > 0
      raises ValueError, a traced one makes the loss NaN.
    eps: :math:`\epsilon` in the correlation's denominator (the authors' 1e-8).
    position_mask: optional boolean mask of shape ``student_logits.shape[:-1]``;
      False examples are left out of both terms, as if sliced away.
    axis_name: optional named axis to gather the global batch over.

  Returns:
    The scalar batch loss, float32; NaN if a kept teacher row has NaN or +inf
    (the correlations carry it, no ``where`` can swallow it).

  >>> import jax.numpy as jnp
  >>> z = jnp.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
  >>> dist_loss(z, z).round(4)
  Array(0., dtype=float32)

  References:
    Huang, You, Wang, Qian and Xu, *Knowledge Distillation from A Stronger Teacher*, NeurIPS 2022.
    https://arxiv.org/abs/2205.10536
  """
  student_logits, teacher_logits, temperature, position_mask = _prepare_pair(
    student_logits, teacher_logits, temperature, position_mask
  )
  num_classes = student_logits.shape[-1]
  if position_mask is None:
    position_mask = jnp.ones(student_logits.shape[:-1], jnp.bool_)
  student_logits = student_logits.reshape(-1, num_classes)  # [batch, classes]
  teacher_logits = teacher_logits.reshape(-1, num_classes)
  position_mask = position_mask.reshape(-1)
  if axis_name is not None:
    student_logits, teacher_logits, position_mask = jax.lax.all_gather(
      (student_logits, teacher_logits, position_mask), axis_name, tiled=True
    )
  student_probs = jax.nn.softmax(student_logits / temperature, axis=-1)
  teacher_probs = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  weights = position_mask.astype(student_probs.dtype)[:, None]  # [batch, 1]
  num_kept = jnp.maximum(jnp.sum(weights), 1.0)
  inter = 1.0 - _pearson(student_probs, teacher_probs, jnp.ones_like(student_probs), axis=-1, eps=eps)  # [batch]
  inter = jnp.sum(inter * weights[:, 0]) / num_kept
  intra = 1.0 - _pearson(student_probs, teacher_probs, jnp.broadcast_to(weights, student_probs.shape), 0, eps)
  beta = jnp.asarray(beta, dtype=inter.dtype)
  gamma = jnp.asarray(gamma, dtype=inter.dtype)
  return temperature**2 * (beta * inter + gamma * jnp.mean(intra))


def standardize_logits(
  logits: jax.typing.ArrayLike,
  *,
  eps: float = 1e-7,
  axis: int = -1,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Z-scores logits along the class axis (logit standardisation).

  .. math::
    \mathcal{Z}(z)_i = \frac{z_i - \bar z}{\sigma(z) + \epsilon}, \quad
    \bar z = \frac{1}{K} \sum_k z_k, \quad
    \sigma(z) = \sqrt{\frac{1}{K} \sum_k (z_k - \bar z)^2}

  :math:`\sigma` is the population standard deviation of the paper's
  formula; the authors' PyTorch code uses ``Tensor.std`` (divisor
  :math:`K - 1`), which only rescales the result by
  :math:`\sqrt{(K - 1) / K}`. Constant logits map to zeros with a finite
  gradient.

  Args:
    logits: ``[..., num_classes]``; must be finite on kept classes.
    eps: :math:`\epsilon > 0` added to the standard deviation.
    axis: the class axis.
    where: optional boolean class mask broadcastable to ``logits``; the
      statistics use the kept classes only and masked classes are set to 0.

  Returns:
    Standardised logits with the shape of ``logits``, float32 or wider.

  >>> import jax.numpy as jnp
  >>> standardize_logits(jnp.array([1.0, 3.0])).round(4)
  Array([-1.,  1.], dtype=float32)

  References:
    Sun, Ren, Li, Wang and Cao, *Logit Standardization in Knowledge Distillation*, CVPR 2024.
    https://arxiv.org/abs/2403.01427
  """
  logits = as_float(logits)
  where = check_where(where, logits.shape)
  if where is None:
    where = jnp.ones(logits.shape, jnp.bool_)
  logits = jnp.where(where, logits, 0.0)
  weights = where.astype(logits.dtype)
  count = jnp.maximum(jnp.sum(weights, axis=axis, keepdims=True), 1.0)
  centred = (logits - jnp.sum(weights * logits, axis=axis, keepdims=True) / count) * weights
  variance = jnp.sum(centred * centred, axis=axis, keepdims=True) / count
  positive = variance > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, variance, 1.0)), 0.0)
  return centred / (std + eps)


def standardized_kd_loss(
  student_logits: jax.typing.ArrayLike,
  teacher_logits: jax.typing.ArrayLike,
  *,
  temperature: jax.typing.ArrayLike = 2.0,
  eps: float = 1e-7,
  where: jax.typing.ArrayLike | None = None,
  position_mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""KD on standardised logits: :func:`~jaxkd.losses.kd_loss` of :func:`standardize_logits` of both sides, per example.

  .. math::
    \ell = T^2\, \mathrm{KL}\left(\mathrm{softmax}(\mathcal{Z}(t) / T) \,\|\,
      \mathrm{softmax}(\mathcal{Z}(s) / T)\right)

  Standardising each side with its own mean and standard deviation amounts to
  per-example, per-model temperatures :math:`T \sigma(z)`: the student
  matches the teacher's logit *relations*, not their magnitude. The authors'
  CIFAR-100 setting is a base temperature of 2 (3 for some pairs), the KD
  term at weight 9 and the hard-label cross-entropy at weight 0.1. The teacher
  side is under ``stop_gradient``.

  Args:
    student_logits: ``[..., num_classes]``.
    teacher_logits: same shape; must be finite on kept classes: a teacher row
      with NaN or ±inf there makes its position NaN.
    temperature: base temperature :math:`T > 0`; a concrete value that is not
      finite and > 0 raises ValueError, a traced one makes the loss NaN.
    eps: :math:`\epsilon` of :func:`standardize_logits`.
    where: optional boolean class mask broadcastable to the logits; both the
      statistics and the softmax use the kept classes only.
    position_mask: optional boolean mask of shape ``student_logits.shape[:-1]``;
      False positions contribute 0.

  Returns:
    Per-example loss of shape ``student_logits.shape[:-1]``, float32.

  >>> import jax.numpy as jnp
  >>> standardized_kd_loss(jnp.array([[1.0, 3.0]]), jnp.array([[10.0, 30.0]])).round(4)
  Array([0.], dtype=float32)

  References:
    Sun, Ren, Li, Wang and Cao, *Logit Standardization in Knowledge Distillation*, CVPR 2024.
    https://arxiv.org/abs/2403.01427
  """
  student_logits, teacher_logits, temperature, position_mask = _prepare_pair(
    student_logits, teacher_logits, temperature, position_mask
  )
  student_z = standardize_logits(student_logits, eps=eps, where=where)
  teacher_z = standardize_logits(teacher_logits, eps=eps, where=where)
  student_log_probs = _log_softmax(student_z, temperature, where)
  teacher_log_probs = _log_softmax(teacher_z, temperature, where)
  loss = temperature**2 * kl_terms(teacher_log_probs, student_log_probs)
  # A non-finite teacher logit makes its whole standardised row NaN, which kl_terms' 0 · log 0 would read as 0.
  loss = nan_where(undefined_distribution(teacher_log_probs), loss)
  return _apply_position_mask(loss, position_mask)


def reverse_kl_loss(
  student_logits: jax.typing.ArrayLike,
  teacher_logits: jax.typing.ArrayLike,
  *,
  temperature: jax.typing.ArrayLike = 1.0,
  where: jax.typing.ArrayLike | None = None,
  position_mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Reverse (mode-seeking) KL of the student from the teacher, per example or token.

  .. math::
    \ell = T^2 \sum_i p_i \left(\log p_i - \log q_i\right), \quad
    p = \mathrm{softmax}(s / T),\; q = \mathrm{softmax}(t / T)

  i.e. :math:`T^2\, \mathrm{KL}(p \,\|\, q)`, the mirror of :func:`~jaxkd.losses.kd_loss`
  with the same :math:`T^2` factor (at the usual :math:`T = 1` for language
  models it is the plain divergence). The teacher must give nonzero
  probability wherever the student can: remove classes with ``where``, not with
  −inf teacher logits. The teacher side is under ``stop_gradient``. A NaN or
  +inf teacher logit on a kept class makes its position NaN (the student's
  probabilities, positive on every kept class, carry the teacher's NaN
  log-probabilities into the sum).

  Args:
    student_logits: ``[..., num_classes]``, e.g. ``[batch, seq, vocab]``.
    teacher_logits: same shape.
    temperature: :math:`T > 0`; a concrete value that is not finite and > 0
      raises ValueError, a traced one makes the loss NaN.
    where: optional boolean *class* mask broadcastable to the logits (as in
      :func:`~jaxkd.losses.kd_loss`).
    position_mask: optional boolean *position* mask of shape
      ``student_logits.shape[:-1]``, e.g. the ``[batch, seq]`` token mask of
      padded sequences; False positions contribute exactly 0 and no gradient,
      even if their logits are not finite.

  Returns:
    Per-position loss of shape ``student_logits.shape[:-1]``, float32.

  >>> import jax.numpy as jnp
  >>> reverse_kl_loss(jnp.array([[0.0, 0.0]]), jnp.array([[0.0, 0.0]]))
  Array([0.], dtype=float32)

  References:
    Gu, Dong, Wei and Huang, *MiniLLM: Knowledge Distillation of Large Language Models*, ICLR 2024.
    https://arxiv.org/abs/2306.08543
  """
  student_logits, teacher_logits, temperature, position_mask = _prepare_pair(
    student_logits, teacher_logits, temperature, position_mask
  )
  student_log_probs = _log_softmax(student_logits, temperature, where)
  teacher_log_probs = _log_softmax(teacher_logits, temperature, where)
  return _apply_position_mask(temperature**2 * kl_terms(student_log_probs, teacher_log_probs), position_mask)


def generalized_jsd_loss(
  student_logits: jax.typing.ArrayLike,
  teacher_logits: jax.typing.ArrayLike,
  *,
  beta: jax.typing.ArrayLike = 0.5,
  temperature: jax.typing.ArrayLike = 1.0,
  where: jax.typing.ArrayLike | None = None,
  position_mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Generalised Jensen-Shannon divergence of GKD, per example or token.

  With the teacher :math:`q = \mathrm{softmax}(t / T)`, the student
  :math:`p = \mathrm{softmax}(s / T)` and their mixture
  :math:`m = \beta q + (1 - \beta) p`:

  .. math::
    \ell = T^2 \left[\beta\, \mathrm{KL}(q \,\|\, m) + (1 - \beta)\, \mathrm{KL}(p \,\|\, m)\right]

  For :math:`\beta \to 0`, :math:`\ell / \beta \to T^2\, \mathrm{KL}(q \| p)`
  (forward KL, :func:`~jaxkd.losses.kd_loss`); for :math:`\beta \to 1`,
  :math:`\ell / (1 - \beta) \to T^2\, \mathrm{KL}(p \| q)` (reverse KL,
  :func:`reverse_kl_loss`). At :math:`\beta = 1/2` it is the symmetric
  Jensen-Shannon divergence, bounded by :math:`T^2 \log 2`. :math:`\beta` must
  lie strictly inside (0, 1) — at the end points the divergence is identically
  0; use :func:`~jaxkd.losses.kd_loss` or :func:`reverse_kl_loss` there. The mixture is
  formed in log space (``logaddexp``), so the loss is finite even where either
  distribution underflows. The paper's experiments sweep
  :math:`\beta \in \{0.1, 0.5, 0.9\}` at :math:`T = 1` (0.5 is the common
  default). The teacher side is under ``stop_gradient``. A NaN or +inf teacher
  logit on a kept class makes its position NaN (through the mixture, which the
  student's positive probabilities weigh).

  Args:
    student_logits: ``[..., num_classes]``, e.g. ``[batch, seq, vocab]``.
    teacher_logits: same shape; may hold −inf for classes the teacher rules out.
    beta: interpolation :math:`\beta \in (0, 1)`; a concrete value outside
      raises ValueError, a traced one is used as given.
    temperature: :math:`T > 0`; a concrete value that is not finite and > 0
      raises ValueError, a traced one makes the loss NaN.
    where: optional boolean *class* mask broadcastable to the logits.
    position_mask: optional boolean *position* mask of shape
      ``student_logits.shape[:-1]`` (the ``[batch, seq]`` token mask); False
      positions contribute exactly 0 and no gradient.

  Returns:
    Per-position loss of shape ``student_logits.shape[:-1]``, float32.

  >>> import jax.numpy as jnp
  >>> generalized_jsd_loss(jnp.array([[0.0, 0.0]]), jnp.array([[0.0, 0.0]]), beta=0.1)
  Array([0.], dtype=float32)

  References:
    Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist and Bachem, *On-Policy
    Distillation of Language Models: Learning from Self-Generated Mistakes*,
    ICLR 2024. https://arxiv.org/abs/2306.13649
  """
  student_logits, teacher_logits, temperature, position_mask = _prepare_pair(
    student_logits, teacher_logits, temperature, position_mask
  )
  check_open_unit_interval(beta, "beta", " Use kd_loss (beta -> 0) or reverse_kl_loss (beta -> 1) at the end points.")
  beta = jnp.asarray(beta, dtype=student_logits.dtype)
  student_log_probs = _log_softmax(student_logits, temperature, where)
  teacher_log_probs = _log_softmax(teacher_logits, temperature, where)
  # log m = logaddexp(log beta + log q, log(1 - beta) + log p); classes with q = p = 0 are kept out of logaddexp so
  # that its gradient never sees (-inf) - (-inf).
  both_zero = jnp.isneginf(teacher_log_probs) & jnp.isneginf(student_log_probs)
  mixture_log_probs = jnp.logaddexp(
    jnp.log(beta) + jnp.where(both_zero, 0.0, teacher_log_probs),
    jnp.log1p(-beta) + jnp.where(both_zero, 0.0, student_log_probs),
  )
  mixture_log_probs = jnp.where(both_zero, -jnp.inf, mixture_log_probs)
  loss = beta * kl_terms(teacher_log_probs, mixture_log_probs) + (1.0 - beta) * kl_terms(
    student_log_probs, mixture_log_probs
  )
  return _apply_position_mask(temperature**2 * loss, position_mask)
