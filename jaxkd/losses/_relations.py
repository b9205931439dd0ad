"""Relation-based distillation: losses on the relations between the examples of a batch.

The relation losses (similarity-preserving, RKD, PKT, correlation congruence) compare batch×batch (or
batch×batch×batch) structures, so each returns **one scalar per batch**, already averaged: do not reduce it again.
Inputs are ``[batch, ...]`` and flattened to ``[batch, features]``; student and teacher widths may differ.

Local or global batch: by default the relations are taken over the batch the function is given (the local,
per-device batch under data parallelism). Pass ``axis_name`` (inside ``jax.pmap``, ``shard_map`` or
``jax.vmap(..., axis_name=...)``) to ``all_gather`` the inputs over that axis first, so that every device computes
the loss of the global batch. Treat that copy like a per-device mean of per-example losses: the gradient reduction
that turns the devices' gradients of their local means into the gradient of the global mean also turns these into
the gradient of the global-batch relation loss (under ``pmap``: ``lax.pmean`` of the gradients; the transpose of
``all_gather`` sums every device's cotangent, so each device gets ``num_devices`` times its examples' share). Tested
with ``pmap`` and named ``vmap``; under ``shard_map`` the values agree too.

``where`` is an optional boolean *example* mask of shape ``[batch]`` (e.g. padding in the last batch): False examples
are left out of every relation, as if sliced away, and get zero gradient whatever their features hold.

A kept example with NaN or ±inf features (a diverged teacher, a NaN row in a feature cache) makes the batch loss NaN,
so that a train step's guard skips the step; where the arithmetic's safe ``where`` would turn it into 0 (RKD's
distances, PKT's probabilities) the loss is made NaN explicitly.

RepDistiller's loss weights (Tian et al. 2020), for reference: SP 3000, RKD 1 (with distance 25 and angle 50
inside), PKT 30000, CC 0.02 (for its own simplified CC, not the kernel form here).

CRD, a per-example contrastive loss against a memory bank, is in :mod:`jaxkd.losses`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd._numerics import as_float, cross_entropy_terms, l2_normalize, nan_where, safe_norm

__all__ = [
  "similarity_preserving_loss",
  "rkd_distance_loss",
  "rkd_angle_loss",
  "rkd_loss",
  "pkt_loss",
  "cc_loss",
]


def _prepare(
  student: jax.typing.ArrayLike,
  teacher: jax.typing.ArrayLike,
  where: jax.typing.ArrayLike | None,
  axis_name: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Float32, teacher under stop_gradient, flattened to [batch, features], masked rows zeroed, gathered."""
  student = as_float(student)
  teacher = jax.lax.stop_gradient(as_float(teacher))
  if student.ndim < 2 or teacher.ndim < 2 or student.shape[0] != teacher.shape[0]:
    raise ValueError(
      f"student and teacher must be [batch, ...] with the same batch size, got student {tuple(student.shape)} and "
      f"teacher {tuple(teacher.shape)}."
    )
  batch = student.shape[0]
  student = student.reshape(batch, -1)  # [batch, student_features]
  teacher = teacher.reshape(batch, -1)  # [batch, teacher_features]
  if where is None:
    mask = jnp.ones((batch,), jnp.bool_)
  else:
    mask = jnp.asarray(where)
    if mask.dtype != jnp.bool_:
      raise TypeError(f"where must be a boolean example mask, got dtype {mask.dtype}.")
    if mask.shape != (batch,):
      raise ValueError(f"where must have shape [batch] = ({batch},), got {tuple(mask.shape)}.")
    # The first where of double-where: masked rows never reach the arithmetic.
    student = jnp.where(mask[:, None], student, 0.0)
    teacher = jnp.where(mask[:, None], teacher, 0.0)
  if axis_name is not None:
    student, teacher, mask = jax.lax.all_gather((student, teacher, mask), axis_name, tiled=True)
  if student.shape[0] < 2:
    raise ValueError(f"relation losses need at least 2 examples in the batch, got {student.shape[0]}.")
  return student, teacher, mask


def _nonfinite(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """Whether the (masked, gathered) features hold NaN or inf: masked rows were zeroed, so only kept ones count."""
  return ~(jnp.all(jnp.isfinite(student)) & jnp.all(jnp.isfinite(teacher)))


def _pair_mask(mask: jax.Array, *, diagonal: bool) -> jax.Array:
  pairs = mask[:, None] & mask[None, :]
  if not diagonal:
    pairs = pairs & ~jnp.eye(mask.shape[0], dtype=jnp.bool_)
  return pairs


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _huber(x: jax.Array) -> jax.Array:
  """Smooth L1 (Huber with delta = 1), as ``torch.nn.functional.smooth_l1_loss``."""
  absolute = jnp.abs(x)
  return jnp.where(absolute < 1.0, 0.5 * x * x, absolute - 0.5)


# ---------------------------------------------------------------- similarity-preserving


def similarity_preserving_loss(
  student: jax.typing.ArrayLike,
  teacher: jax.typing.ArrayLike,
  *,
  where: jax.typing.ArrayLike | None = None,
  axis_name: Any = None,
) -> jax.Array:
  r"""Similarity-preserving KD: match the row-normalised batch Gram matrices (a scalar per batch).

  With :math:`Q` the ``[b, features]`` flattened activations,

  .. math::
    \tilde G = \mathrm{rownorm}(Q Q^\top), \quad
    \ell = \frac{1}{b^2} \left\| \tilde G_T - \tilde G_S \right\|_F^2

  where ``rownorm`` divides each row by its L2 norm. The paper sums this over
  layer pairs with weight :math:`\gamma` (3000 in the paper and RepDistiller).

  Args:
    student: ``[batch, ...]`` student activations.
    teacher: ``[batch, ...]`` teacher activations (any width).
    where: optional boolean example mask ``[batch]``.
    axis_name: optional named axis: the loss is then over the gathered global batch.

  Returns:
    The scalar batch loss, float32.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  >>> similarity_preserving_loss(x, 3.0 * x)
  Array(0., dtype=float32)

  References:
    Tung and Mori, *Similarity-Preserving Knowledge Distillation*, ICCV 2019.
    https://arxiv.org/abs/1907.09682
  """
  student, teacher, mask = _prepare(student, teacher, where, axis_name)
  student_gram = l2_normalize(student @ student.T)  # [batch, batch]
  teacher_gram = l2_normalize(teacher @ teacher.T)
  count = jnp.maximum(jnp.sum(mask), 1).astype(student.dtype)
  return jnp.sum(jnp.square(teacher_gram - student_gram)) / count**2


# ---------------------------------------------------------------- relational KD


def _pairwise_distances(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Euclidean distance matrix from the Gram matrix of the centred rows, with finite gradients at 0."""
  weights = mask[:, None].astype(x.dtype)
  x = (x - jnp.sum(x * weights, axis=0) / jnp.maximum(jnp.sum(weights), 1.0)) * weights
  gram = x @ x.T
  norms = jnp.diagonal(gram)
  squared = jnp.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def rkd_distance_loss(
  student: jax.typing.ArrayLike,
  teacher: jax.typing.ArrayLike,
  *,
  where: jax.typing.ArrayLike | None = None,
  axis_name: Any = None,
) -> jax.Array:
  r"""RKD distance-wise loss: Huber loss between mean-normalised pairwise distances (a scalar per batch).

  .. math::
    \psi_D(x_i, x_j) = \frac{\|x_i - x_j\|_2}{\mu}, \quad
    \mu = \frac{1}{|\mathcal{P}|} \sum_{(i, j) \in \mathcal{P}} \|x_i - x_j\|_2, \quad
    \ell = \frac{1}{|\mathcal{P}|} \sum_{(i, j) \in \mathcal{P}} l_\delta\left(\psi_D(t_i, t_j), \psi_D(s_i, s_j)\right)

  over the ordered pairs :math:`\mathcal{P} = \{(i, j): i \ne j\}`, with
  :math:`l_\delta` the Huber (smooth-L1) loss at :math:`\delta = 1`; student
  and teacher are each normalised by their own :math:`\mu`. The authors' code
  averages over all :math:`b^2` entries, diagonal zeros included (a factor
  :math:`(b - 1) / b` from this). Paper's weight: 25.

  Args:
    student: ``[batch, ...]`` student embeddings.
    teacher: ``[batch, ...]`` teacher embeddings (any width).
    where: optional boolean example mask ``[batch]``.
    axis_name: optional named axis: the loss is then over the gathered global batch.

  Returns:
    The scalar batch loss, float32; NaN if a kept example's embeddings are not finite.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
  >>> rkd_distance_loss(x, 2.0 * x + 1.0)
  Array(0., dtype=float32)

  References:
    Park, Kim, Lu and Cho, *Relational Knowledge Distillation*, CVPR 2019.
    https://arxiv.org/abs/1904.05068
  """
  student, teacher, mask = _prepare(student, teacher, where, axis_name)
  pairs = _pair_mask(mask, diagonal=False)

  def normalized_distances(x: jax.Array) -> jax.Array:
    distances = _pairwise_distances(x, mask)
    mean = _masked_mean(distances, pairs)
    return distances / jnp.where(mean > 0, mean, 1.0)

  loss = _masked_mean(_huber(normalized_distances(student) - normalized_distances(teacher)), pairs)
  # The zero-distance where of the safe square root reads NaN as a distance of 0.
  return nan_where(_nonfinite(student, teacher), loss)


def _angles(x: jax.Array) -> jax.Array:
  """cos of the angle at x_a between x_b and x_c: [a, b, c]; 0 where x_b or x_c coincides with x_a."""
  directions = l2_normalize(x[None, :, :] - x[:, None, :])  # [a, b, features]: unit (x_b - x_a)
  return jnp.einsum("abf,acf->abc", directions, directions)


def rkd_angle_loss(
  student: jax.typing.ArrayLike,
  teacher: jax.typing.ArrayLike,
  *,
  where: jax.typing.ArrayLike | None = None,
  axis_name: Any = None,
) -> jax.Array:
  r"""RKD angle-wise loss: Huber loss between the cosines of the angles of all triplets (a scalar per batch).

  .. math::
    \psi_A(x_i, x_j, x_k) = \left\langle \frac{x_j - x_i}{\|x_j - x_i\|_2},
      \frac{x_k - x_i}{\|x_k - x_i\|_2} \right\rangle, \quad
    \ell = \frac{1}{|\mathcal{T}|} \sum_{(i, j, k) \in \mathcal{T}}
      l_\delta\left(\psi_A(t_i, t_j, t_k), \psi_A(s_i, s_j, s_k)\right)

  over the triplets :math:`\mathcal{T} = \{(i, j, k): j \ne i, k \ne i\}` (the
  angle at vertex :math:`i`), with the Huber loss at :math:`\delta = 1`. The
  authors' code averages over all :math:`b^3` entries (a factor
  :math:`(b - 1)^2 / b^2` from this). Memory is :math:`O(b^2 d + b^3)`.
  Paper's weight: 50.

  Args:
    student: ``[batch, ...]`` student embeddings.
    teacher: ``[batch, ...]`` teacher embeddings (any width).
    where: optional boolean example mask ``[batch]``.
    axis_name: optional named axis: the loss is then over the gathered global batch.

  Returns:
    The scalar batch loss, float32.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
  >>> rkd_angle_loss(x, 2.0 * x + 1.0)
  Array(0., dtype=float32)

  References:
    Park, Kim, Lu and Cho, *Relational Knowledge Distillation*, CVPR 2019.
    https://arxiv.org/abs/1904.05068
  """
  student, teacher, mask = _prepare(student, teacher, where, axis_name)
  pairs = _pair_mask(mask, diagonal=False)  # [i, j]: j != i, both kept
  triplets = pairs[:, :, None] & pairs[:, None, :]  # [i, j, k]
  return _masked_mean(_huber(_angles(student) - _angles(teacher)), triplets)


def rkd_loss(
  student: jax.typing.ArrayLike,
  teacher: jax.typing.ArrayLike,
  *,
  distance_weight: jax.typing.ArrayLike = 25.0,
  angle_weight: jax.typing.ArrayLike = 50.0,
  where: jax.typing.ArrayLike | None = None,
  axis_name: Any = None,
) -> jax.Array:
  r"""RKD: the weighted sum of :func:`rkd_distance_loss` and :func:`rkd_angle_loss` (a scalar per batch).

  .. math::
    \ell = \lambda_D\, \ell_D + \lambda_A\, \ell_A

  with the paper's :math:`\lambda_D = 25`, :math:`\lambda_A = 50`.

  Args:
    student: ``[batch, ...]`` student embeddings.
    teacher: ``[batch, ...]`` teacher embeddings (any width).
    distance_weight: :math:`\lambda_D`.
    angle_weight: :math:`\lambda_A`.
    where: optional boolean example mask ``[batch]``.
    axis_name: optional named axis: the loss is then over the gathered global batch.

  Returns:
    The scalar batch loss, float32.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
  >>> rkd_loss(x, -x)
  Array(0., dtype=float32)

  References:
    Park, Kim, Lu and Cho, *Relational Knowledge Distillation*, CVPR 2019.
    https://arxiv.org/abs/1904.05068
  """
  distance = rkd_distance_loss(student, teacher, where=where, axis_name=axis_name)
  angle = rkd_angle_loss(student, teacher, where=where, axis_name=axis_name)
  return distance_weight * distance + angle_weight * angle


# ---------------------------------------------------------------- probabilistic knowledge transfer


def pkt_loss(
  student: jax.typing.ArrayLike,
  teacher: jax.typing.ArrayLike,
  *,
  eps: float = 1e-7,
  where: jax.typing.ArrayLike | None = None,
  axis_name: Any = None,
) -> jax.Array:
  r"""PKT: KL divergence between the cosine-kernel conditional probabilities of the batch (a scalar per batch).

  With the cosine-similarity kernel
  :math:`K(a, b) = \frac12 \left(\frac{a^\top b}{\|a\|_2 \|b\|_2} + 1\right) \in [0, 1]`:

  .. math::
    p_{j|i} = \frac{K(x_i, x_j)}{\sum_{k \ne i} K(x_i, x_k)}, \quad
    \ell = \frac{1}{b} \sum_i \sum_{j \ne i} p^t_{j|i} \log \frac{p^t_{j|i}}{p^s_{j|i}}

  i.e. the mean over anchors :math:`i` of
  :math:`\mathrm{KL}(P^t_{\cdot|i} \| P^s_{\cdot|i})`, as in the paper.
  RepDistiller's code includes the self-similarity :math:`j = i` and divides
  the double sum by :math:`b^2`; its weight 30000 therefore corresponds to
  about :math:`30000 / b` here. Norms are computed as
  :math:`\|x\|_2 + \epsilon`, as in the authors' code.

  Args:
    student: ``[batch, ...]`` student features.
    teacher: ``[batch, ...]`` teacher features (any width).
    eps: added to the norms.
    where: optional boolean example mask ``[batch]``.
    axis_name: optional named axis: the loss is then over the gathered global batch.

  Returns:
    The scalar batch loss, float32; NaN if a kept example's features are not finite.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  >>> abs(float(pkt_loss(x, 5.0 * x))) < 1e-6  # invariant to the features' scale
  True

  References:
    Passalis and Tefas, *Learning Deep Representations with Probabilistic Knowledge Transfer*, ECCV 2018.
    https://arxiv.org/abs/1803.10837
  """
  student, teacher, mask = _prepare(student, teacher, where, axis_name)
  pairs = _pair_mask(mask, diagonal=False)

  def log_conditionals(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = x / (safe_norm(x, keepdims=True) + eps)
    kernel = jnp.where(pairs, 0.5 * (x @ x.T + 1.0), 0.0)  # [anchor, other]
    kernel = jnp.maximum(kernel, 0.0)  # rounding can leave a cosine a hair below -1
    totals = jnp.sum(kernel, axis=-1, keepdims=True)
    probs = kernel / jnp.where(totals > 0, totals, 1.0)
    positive = probs > 0
    return probs, jnp.where(positive, jnp.log(jnp.where(positive, probs, 1.0)), -jnp.inf)

  teacher_probs, teacher_log_probs = log_conditionals(teacher)
  _, student_log_probs = log_conditionals(student)
  kl = jnp.sum(
    cross_entropy_terms(teacher_probs, teacher_log_probs) - cross_entropy_terms(teacher_probs, student_log_probs),
    axis=-1,
  )  # [anchor]
  # NaN kernels give NaN probabilities, which the 0 · log 0 handling takes for zeros.
  return nan_where(_nonfinite(student, teacher), _masked_mean(kl, mask))


# ---------------------------------------------------------------- correlation congruence


def cc_loss(
  student: jax.typing.ArrayLike,
  teacher: jax.typing.ArrayLike,
  *,
  gamma: float = 0.4,
  taylor_order: int | None = 2,
  where: jax.typing.ArrayLike | None = None,
  axis_name: Any = None,
) -> jax.Array:
  r"""Correlation congruence: match the batch correlation (Gaussian RBF kernel) matrices (a scalar per batch).

  On L2-normalised embeddings :math:`f` (so that
  :math:`\|f_i - f_j\|^2 = 2 - 2 f_i^\top f_j`), the Gaussian RBF kernel is

  .. math::
    k(f_i, f_j) = \exp(-\gamma \|f_i - f_j\|^2)
      = e^{-2\gamma} \exp(2\gamma f_i^\top f_j)
      \approx \sum_{p=0}^{P} e^{-2\gamma} \frac{(2\gamma)^p}{p!} (f_i^\top f_j)^p

  and with :math:`C_{ij} = k(f_i, f_j)` for student and teacher,

  .. math::
    \ell = \frac{1}{b^2} \left\| C_T - C_S \right\|_F^2 .

  ``taylor_order=P`` uses the paper's P-order Taylor expansion (the paper's
  choice: :math:`P = 2`, :math:`\gamma = 0.4`); ``taylor_order=None`` uses the
  exact kernel. This is the paper's kernel form; RepDistiller's "CC" (weight
  0.02) is a different, simplified loss.

  Args:
    student: ``[batch, ...]`` student embeddings.
    teacher: ``[batch, ...]`` teacher embeddings (any width).
    gamma: the kernel's :math:`\gamma > 0`.
    taylor_order: :math:`P \ge 0`, or None for the exact kernel.
    where: optional boolean example mask ``[batch]``.
    axis_name: optional named axis: the loss is then over the gathered global batch.

  Returns:
    The scalar batch loss, float32.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  >>> abs(float(cc_loss(x, 5.0 * x))) < 1e-6  # invariant to the features' scale
  True

  References:
    Peng, Jin, Liu, Zhou, Wu, Liu, Li and Zhang, *Correlation Congruence for Knowledge Distillation*, ICCV 2019.
    https://arxiv.org/abs/1904.01802
  """
  if taylor_order is not None and not (isinstance(taylor_order, int) and taylor_order >= 0):
    raise ValueError(f"taylor_order must be an integer >= 0 or None, got {taylor_order!r}.")
  student, teacher, mask = _prepare(student, teacher, where, axis_name)

  def correlation(x: jax.Array) -> jax.Array:
    x = l2_normalize(x)
    similarity = x @ x.T
    if taylor_order is None:
      return jnp.exp(-2.0 * gamma * (1.0 - similarity))
    terms = [(2.0 * gamma) ** p / math.factorial(p) * similarity**p for p in range(taylor_order + 1)]
    return math.exp(-2.0 * gamma) * sum(terms)

  pairs = _pair_mask(mask, diagonal=True)
  count = jnp.maximum(jnp.sum(mask), 1).astype(student.dtype)
  return jnp.sum(jnp.where(pairs, jnp.square(correlation(teacher) - correlation(student)), 0.0)) / count**2
