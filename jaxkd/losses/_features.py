"""Feature-based distillation: pure per-example losses on intermediate activations, plus the small trainable heads.

Features are channels-last, as Flax produces them: ``[batch, ..., channels]`` (``[batch, height, width, channels]``
for convolutional maps, ``[batch, features]`` or ``[batch, seq, features]`` otherwise). Every loss returns one value
per example (the caller reduces), computes in float32 and puts the teacher's features under ``stop_gradient``.
NaN or inf in an example's features (a diverged teacher, a NaN row in a feature cache) makes that example's loss
NaN or inf: no safe ``where`` here turns it into 0, so a train step's guard skips the step.

The reductions inside each example follow the authors' or the CRD benchmark's code (RepDistiller, Tian et al.
2020), so that their loss weights carry over; each docstring states how that relates to the paper's formula.
RepDistiller's weights, for reference: FitNet 100, attention transfer 1000, NST 50, FSP 50, VID 1.

References:
  Tian, Krishnan and Isola, *Contrastive Representation Distillation*, ICLR 2020 (the benchmark and its code).
  https://arxiv.org/abs/1910.10699
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd._checks import check_feature_pair, check_features, check_same_positions
from jaxkd._numerics import as_float, l2_normalize

__all__ = [
  "HintRegressor",
  "fitnet_loss",
  "attention_map",
  "attention_transfer_loss",
  "nst_loss",
  "fsp_matrix",
  "fsp_loss",
  "VIDRegressor",
  "vid_loss",
]


def _per_example_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


# ---------------------------------------------------------------- FitNet


class HintRegressor(nn.Module):
  """FitNet's regressor: maps the student's guided layer to the teacher's hint width.

  With ``kernel_size=None`` it is a dense layer on the channel axis, which for
  ``[batch, height, width, channels]`` maps is exactly a 1×1 convolution; give
  a ``kernel_size`` for a spatial convolution (``'SAME'`` padding, so spatial
  sizes must already agree). Its parameters are trained with the student and
  dropped after distillation.

  Attributes:
    features: the teacher's channel count.
    kernel_size: optional convolution window, e.g. ``(3, 3)``.
    use_bias: whether to add a bias.
    dtype: computation dtype; parameters stay float32.
  """

  features: int
  kernel_size: Sequence[int] | None = None
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kernel_size is None:
      return nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype)(x)
    return nn.Conv(self.features, tuple(self.kernel_size), padding="SAME", use_bias=self.use_bias, dtype=self.dtype)(x)


def fitnet_loss(student_regressed: jax.typing.ArrayLike, teacher_features: jax.typing.ArrayLike) -> jax.Array:
  r"""FitNet hint loss: mean squared error between regressed student and teacher features, per example.

  .. math::
    \ell = \frac{1}{D} \left\| u_h - r(v_g) \right\|_2^2

  with :math:`u_h` the teacher's hint, :math:`r(v_g)` the regressed
  student's guided layer (:class:`HintRegressor`) and :math:`D` the number of
  feature elements per example. The paper writes :math:`\frac12 \|\cdot\|^2`
  (i.e. :math:`D/2` times this); the mean follows RepDistiller, whose weight
  for it is 100.

  Args:
    student_regressed: ``[batch, ...]``, the regressor's output.
    teacher_features: same shape.

  Returns:
    Per-example loss of shape ``[batch]``, float32.

  >>> import jax.numpy as jnp
  >>> fitnet_loss(jnp.ones((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3)))
  Array([1., 1.], dtype=float32)

  References:
    Romero, Ballas, Kahou, Chassang, Gatta and Bengio, *FitNets: Hints for Thin Deep Nets*, ICLR 2015.
    https://arxiv.org/abs/1412.6550
  """
  student_regressed = as_float(student_regressed)
  teacher_features = jax.lax.stop_gradient(as_float(teacher_features))
  check_feature_pair(student_regressed, teacher_features, "student_regressed", "teacher_features")
  check_features(student_regressed, "student_regressed")
  return _per_example_mean(jnp.square(student_regressed - teacher_features))


# ---------------------------------------------------------------- attention transfer


def attention_map(features: jax.typing.ArrayLike, *, p: float = 2.0) -> jax.Array:
  r"""Normalised spatial attention map of a channels-last feature map.

  .. math::
    Q = \mathrm{vec}\left(\frac{1}{C} \sum_{c=1}^{C} |A_c|^p\right), \quad
    \hat Q = \frac{Q}{\max(\|Q\|_2, 10^{-12})}

  (the mean over channels equals the paper's sum up to a factor that the
  normalisation removes).

  Args:
    features: ``[batch, ..., channels]``, e.g. ``[batch, height, width, channels]``.
    p: the exponent :math:`p > 0` (2 in the paper).

  Returns:
    ``[batch, positions]`` unit-norm maps (all-zero activations give a zero map).

  >>> import jax.numpy as jnp
  >>> attention_map(jnp.ones((1, 2, 2, 3)))
  Array([[0.5, 0.5, 0.5, 0.5]], dtype=float32)

  References:
    Zagoruyko and Komodakis, *Paying More Attention to Attention*, ICLR 2017.
    https://arxiv.org/abs/1612.03928
  """
  features = as_float(features)
  check_features(features, "features", min_ndim=3)
  if not p > 0:
    raise ValueError(f"p must be > 0, got {p!r}.")
  magnitude = features * features if p == 2 else jnp.abs(features) ** p
  attention = jnp.mean(magnitude, axis=-1).reshape(features.shape[0], -1)  # [batch, positions]
  return l2_normalize(attention)


def attention_transfer_loss(
  student_features: jax.typing.ArrayLike, teacher_features: jax.typing.ArrayLike, *, p: float = 2.0
) -> jax.Array:
  r"""Attention transfer: squared distance between normalised attention maps, per example.

  .. math::
    \ell = \frac{1}{HW} \left\| \hat Q_S - \hat Q_T \right\|_2^2

  with :math:`\hat Q` from :func:`attention_map`. The paper's formula
  (:math:`\frac{\beta}{2} \|\hat Q_S - \hat Q_T\|_p`, a norm not squared)
  differs; this is the authors' code (``(at(x) - at(y)).pow(2).mean()``),
  with :math:`\beta = 1000` there and in RepDistiller, summed over the layer
  pairs. The channel counts of student and teacher may differ; their spatial
  sizes must agree (pool the larger map first).

  Args:
    student_features: ``[batch, height, width, student_channels]``.
    teacher_features: ``[batch, height, width, teacher_channels]``.
    p: the exponent of :func:`attention_map`.

  Returns:
    Per-example loss of shape ``[batch]``, float32.

  >>> import jax.numpy as jnp
  >>> attention_transfer_loss(jnp.ones((2, 4, 4, 3)), 5.0 * jnp.ones((2, 4, 4, 8)))
  Array([0., 0.], dtype=float32)

  References:
    Zagoruyko and Komodakis, *Paying More Attention to Attention*, ICLR 2017.
    https://arxiv.org/abs/1612.03928
  """
  student_features = as_float(student_features)
  teacher_features = jax.lax.stop_gradient(as_float(teacher_features))
  check_same_positions(student_features, teacher_features)
  difference = attention_map(student_features, p=p) - attention_map(teacher_features, p=p)
  return jnp.mean(jnp.square(difference), axis=-1)


# ---------------------------------------------------------------- neuron selectivity transfer


def nst_loss(
  student_features: jax.typing.ArrayLike,
  teacher_features: jax.typing.ArrayLike,
  *,
  degree: int = 2,
  constant: float = 0.0,
) -> jax.Array:
  r"""Neuron selectivity transfer: squared MMD between the student's and teacher's channel activations, per example.

  Each channel :math:`c` contributes a sample: its activation map over the
  :math:`HW` positions, L2-normalised, :math:`f^c / \|f^c\|_2`. With the
  polynomial kernel :math:`k(x, y) = (x^\top y + c)^d`:

  .. math::
    \ell = \frac{1}{C_T^2} \sum_{i, i'} k(f_T^i, f_T^{i'})
      + \frac{1}{C_S^2} \sum_{j, j'} k(f_S^j, f_S^{j'})
      - \frac{2}{C_S C_T} \sum_{i, j} k(f_S^j, f_T^i)

  The paper's choice is ``degree=2, constant=0`` (its best kernel;
  RepDistiller's weight for it is 50). With ``degree=1`` it is the squared
  distance between the mean normalised channels.

  Args:
    student_features: ``[batch, height, width, student_channels]``.
    teacher_features: ``[batch, height, width, teacher_channels]``; spatial
      sizes must agree.
    degree: the kernel's degree :math:`d \ge 1`.
    constant: the kernel's constant :math:`c`.

  Returns:
    Per-example loss of shape ``[batch]``, float32.

  >>> import jax.numpy as jnp
  >>> nst_loss(jnp.ones((1, 2, 2, 3)), jnp.ones((1, 2, 2, 5)))
  Array([0.], dtype=float32)

  References:
    Huang and Wang, *Like What You Like: Knowledge Distill via Neuron Selectivity Transfer*, 2017.
    https://arxiv.org/abs/1707.01219
  """
  student_features = as_float(student_features)
  teacher_features = jax.lax.stop_gradient(as_float(teacher_features))
  check_same_positions(student_features, teacher_features)
  check_features(student_features, "student_features", min_ndim=3)
  if not (isinstance(degree, int) and degree >= 1):
    raise ValueError(f"degree must be an integer >= 1, got {degree!r}.")

  def channels(x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, positions, channels]
    return l2_normalize(jnp.swapaxes(x, 1, 2))  # [batch, channels, positions], unit rows

  def kernel_mean(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean((jnp.einsum("bip,bjp->bij", a, b) + constant) ** degree, axis=(1, 2))

  student, teacher = channels(student_features), channels(teacher_features)
  return kernel_mean(teacher, teacher) + kernel_mean(student, student) - 2.0 * kernel_mean(student, teacher)


# ---------------------------------------------------------------- flow of solution procedure


def fsp_matrix(first_features: jax.typing.ArrayLike, second_features: jax.typing.ArrayLike) -> jax.Array:
  r"""FSP (flow) matrix: the Gram matrix between two layers' channels, averaged over positions.

  .. math::
    G_{ij} = \frac{1}{HW} \sum_{s=1}^{HW} F^1_{s,i}\, F^2_{s,j}

  Args:
    first_features: ``[batch, height, width, m]``.
    second_features: ``[batch, height, width, n]``; spatial sizes must agree
      (pool the larger map first, as RepDistiller does).

  Returns:
    ``[batch, m, n]``, float32.

  >>> import jax.numpy as jnp
  >>> fsp_matrix(jnp.ones((1, 2, 2, 1)), 3.0 * jnp.ones((1, 2, 2, 2)))
  Array([[[3., 3.]]], dtype=float32)

  References:
    Yim, Joo, Bae and Kim, *A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
    Transfer Learning*, CVPR 2017.
  """
  first_features = as_float(first_features)
  second_features = as_float(second_features)
  check_features(first_features, "first_features", min_ndim=3)
  if first_features.ndim != second_features.ndim or first_features.shape[:-1] != second_features.shape[:-1]:
    raise ValueError(
      f"the two layers of an FSP matrix must agree on all but the channel axis, got {tuple(first_features.shape)} "
      f"and {tuple(second_features.shape)}."
    )
  batch = first_features.shape[0]
  first = first_features.reshape(batch, -1, first_features.shape[-1])  # [batch, positions, m]
  second = second_features.reshape(batch, -1, second_features.shape[-1])  # [batch, positions, n]
  return jnp.einsum("bsi,bsj->bij", first, second) / first.shape[1]


def fsp_loss(
  student_first: jax.typing.ArrayLike,
  student_second: jax.typing.ArrayLike,
  teacher_first: jax.typing.ArrayLike,
  teacher_second: jax.typing.ArrayLike,
) -> jax.Array:
  r"""FSP loss for one pair of layers: squared distance between student and teacher flow matrices, per example.

  .. math::
    \ell = \frac{1}{mn} \left\| G_S - G_T \right\|_F^2

  with :math:`G` from :func:`fsp_matrix`. The paper sums
  :math:`\lambda_i \|G_S^i - G_T^i\|_F^2` over layer pairs with equal
  :math:`\lambda_i` (sum this over pairs yourself); the mean over the
  :math:`mn` entries follows RepDistiller (weight 50). Student and teacher must
  have the same channel counts at the two layers, so their matrices match.

  Args:
    student_first: ``[batch, height, width, m]``.
    student_second: ``[batch, height, width, n]``.
    teacher_first: ``[batch, height', width', m]``.
    teacher_second: ``[batch, height', width', n]``.

  Returns:
    Per-example loss of shape ``[batch]``, float32.

  >>> import jax.numpy as jnp
  >>> a, b = jnp.ones((2, 4, 4, 3)), jnp.ones((2, 4, 4, 5))
  >>> fsp_loss(a, b, a, b)
  Array([0., 0.], dtype=float32)

  References:
    Yim, Joo, Bae and Kim, *A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
    Transfer Learning*, CVPR 2017.
  """
  student = fsp_matrix(student_first, student_second)
  teacher = jax.lax.stop_gradient(fsp_matrix(teacher_first, teacher_second))
  if student.shape != teacher.shape:
    raise ValueError(
      f"student and teacher FSP matrices must have the same shape, got student {tuple(student.shape)} (from "
      f"{tuple(np.shape(student_first))} and {tuple(np.shape(student_second))}) and teacher {tuple(teacher.shape)}."
    )
  return jnp.mean(jnp.square(student - teacher), axis=(1, 2))


# ---------------------------------------------------------------- variational information distillation


def _inverse_softplus(y: float) -> float:
  return float(np.log(np.expm1(y)))


class VIDRegressor(nn.Module):
  r"""VID's variational head: a mean regressor and a learned per-channel variance.

  The mean is a small network of 1×1 convolutions (dense layers on the channel
  axis) with ReLUs between them, from the student's width to the teacher's;
  the variance is :math:`\sigma_c^2 = \mathrm{softplus}(\alpha_c) + \epsilon`
  with one free parameter per teacher channel, initialised so that
  :math:`\sigma_c^2` starts at ``init_variance``. The defaults follow
  RepDistiller (three layers, hidden width = teacher width, initial variance 5,
  :math:`\epsilon = 10^{-5}`). The head is trained with the student.

  Attributes:
    features: the teacher's channel count.
    hidden_features: width of the hidden layers (default: ``features``).
    num_layers: number of dense (1×1 conv) layers, at least 1.
    init_variance: the variance at initialisation, > ``eps``.
    eps: lower bound :math:`\epsilon > 0` of the variance.
    dtype: computation dtype of the regressor; the variance stays float32.

  Returns from ``__call__``: ``(mean, variance)`` with ``mean`` of shape
  ``[..., features]`` and ``variance`` of shape ``[features]``.
  """

  features: int
  hidden_features: int | None = None
  num_layers: int = 3
  init_variance: float = 5.0
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}.")
    if not self.init_variance > self.eps > 0:
      raise ValueError(f"need init_variance > eps > 0, got init_variance={self.init_variance}, eps={self.eps}.")
    hidden = self.hidden_features or self.features
    for _ in range(self.num_layers - 1):
      x = nn.relu(nn.Dense(hidden, dtype=self.dtype)(x))
    mean = nn.Dense(self.features, dtype=self.dtype)(x)
    alpha = self.param(
      "variance_logit",
      nn.initializers.constant(_inverse_softplus(self.init_variance - self.eps)),
      (self.features,),
      jnp.float32,
    )
    return mean, jax.nn.softplus(alpha) + self.eps


def vid_loss(
  mean: jax.typing.ArrayLike, variance: jax.typing.ArrayLike, teacher_features: jax.typing.ArrayLike
) -> jax.Array:
  r"""VID: Gaussian negative log-likelihood of the teacher's features under the student's prediction, per example.

  .. math::
    \ell = \frac{1}{D} \sum_{n=1}^{D} \frac12 \left(\log \sigma_n^2 + \frac{(t_n - \mu_n)^2}{\sigma_n^2}\right)

  over the :math:`D` feature elements of the example, with :math:`\mu` and
  :math:`\sigma^2` from :class:`VIDRegressor` (``variance`` is per channel and
  broadcast over positions). Minimising it maximises a variational lower bound
  on the mutual information between teacher and student features. The paper's
  loss is the sum over elements, with the constant :math:`\frac12 \log 2\pi`;
  the mean without the constant follows RepDistiller (weight 1). Gradients
  reach both ``mean`` and ``variance``.

  Args:
    mean: ``[batch, ..., channels]``, the regressed student features.
    variance: positive, broadcastable to ``mean``, usually ``[channels]``.
    teacher_features: same shape as ``mean``.

  Returns:
    Per-example loss of shape ``[batch]``, float32.

  >>> import jax.numpy as jnp
  >>> vid_loss(jnp.zeros((2, 3)), jnp.ones(3), jnp.ones((2, 3)))
  Array([0.5, 0.5], dtype=float32)

  References:
    Ahn, Hu, Damianou, Lawrence and Dai, *Variational Information Distillation for Knowledge Transfer*,
    CVPR 2019. https://arxiv.org/abs/1904.05835
  """
  mean = as_float(mean)
  variance = as_float(variance)
  teacher_features = jax.lax.stop_gradient(as_float(teacher_features))
  check_feature_pair(mean, teacher_features, "mean", "teacher_features")
  check_features(mean, "mean")
  try:
    np.broadcast_shapes(variance.shape, mean.shape)
  except ValueError:
    raise ValueError(
      f"variance of shape {tuple(variance.shape)} does not broadcast against mean of shape {tuple(mean.shape)}."
    ) from None
  negative_log_likelihood = 0.5 * (jnp.log(variance) + jnp.square(teacher_features - mean) / variance)
  return _per_example_mean(jnp.broadcast_to(negative_log_likelihood, mean.shape))
