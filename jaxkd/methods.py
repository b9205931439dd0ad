"""The catalogue of distillation methods: each a :class:`jaxkd.objective.LossTerm` with its paper's defaults.

A method is an :class:`jaxkd.objective.Objective` of terms, e.g. cross-entropy next to one of these; the step
(:func:`jaxkd.make_train_step` with ``objective=``) runs it in any placement, with the same gradient reduction,
non-finite skip and metrics, plus ``metrics['loss/<term name>']`` for each term (unweighted; ``metrics['loss']`` is
the weighted total).

Features. Layers are named by their Flax linen module path, e.g. ``'Conv_1'`` or ``'_ResidualBlock_4'``, and the
output of their ``__call__`` is taken (``capture_intermediates``; the models are not edited). A value a model
``sow``\\ s into ``'intermediates'`` is found by its path too (``'Block_0/features'``). Both networks run on the same
batch in the step: the teacher in eval mode under ``stop_gradient``, the student in train mode. Feature terms need
linen modules; logit terms work with any model (NNX included).

Example (CE + KD + attention transfer, CNN teacher and student)::

  from jaxkd import methods
  method = jaxkd.Objective(
    [
      methods.cross_entropy(weight=1.0),
      methods.kd(weight=0.9, temperature=4.0),
      methods.attention_transfer(["Conv_0", "Conv_1"], ["Conv_0", "Conv_1"], weight=1000.0),
    ]
  )
  state = jaxkd.create_train_state(
    student, optax.adam(1e-3), images[:1], rng=0, objective=method, teacher=teacher,
    teacher_variables=teacher_variables,
  )
  step = jaxkd.make_train_step(teacher_apply_fn=teacher, objective=method, placement="single")
  for batch in batches:  # a jaxkd.data.BatchIterator; include_index=True for CRD
    state, metrics = step(state, teacher_variables, batch)  # metrics['loss/at'], metrics['loss/kd'], ...
  logits = student.apply({"params": state.params, "batch_stats": state.batch_stats}, images)

Adapter parameters (regressors, CRD's heads) live in ``state.adapters`` and term states (CRD's memory bank) in
``state.term_state``: ``state.params`` is the plain student.

The constructors (:func:`kd`, :func:`dkd`, :func:`dist`, :func:`standardized_kd`, :func:`reverse_kl`,
:func:`generalized_jsd`, :func:`fitnet`, :func:`attention_transfer`, :func:`nst`, :func:`fsp`, :func:`vid`,
:func:`similarity_preserving`, :func:`rkd`, :func:`pkt`, :func:`cc`, :func:`crd`) default to the weights and
hyperparameters the papers (or the CRD benchmark's code, RepDistiller) use, as documented in :mod:`jaxkd.losses`,
:mod:`jaxkd.losses`, :mod:`jaxkd.losses` and :mod:`jaxkd.losses`; those methods are trained with
:func:`cross_entropy` at weight 1 next to them (Hinton's KD: 0.1 and 0.9; logit standardisation: 0.1 and 9).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.objective import LossTerm, Schedule, TermInputs, cross_entropy, kd, layer_paths

__all__ = [
  "global_average_pool",
  "linear_warmup",
  "cross_entropy",
  "kd",
  "dkd",
  "dist",
  "standardized_kd",
  "reverse_kl",
  "generalized_jsd",
  "fitnet",
  "attention_transfer",
  "nst",
  "fsp",
  "vid",
  "similarity_preserving",
  "rkd",
  "pkt",
  "cc",
  "crd",
]

Scope = str
Weight = Schedule
FeatureFn = Callable[[jax.Array], jax.Array]

# ---------------------------------------------------------------------------------------------------------------------
# Helpers for terms.


def global_average_pool(x: jax.Array) -> jax.Array:
  """``[batch, ..., channels] -> [batch, channels]``: the mean over the spatial axes (a ``feature_fn``).

  >>> global_average_pool(jnp.ones((2, 4, 4, 3))).shape
  (2, 3)
  """
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x


def linear_warmup(weight: float, steps: int) -> Callable[[jax.Array], jax.Array]:
  """A term weight rising linearly from 0 to ``weight`` over ``steps`` steps (DKD's warm-up).

  >>> float(linear_warmup(8.0, 4)(jnp.asarray(1)))
  2.0
  """
  if steps <= 0:
    return lambda step: jnp.asarray(weight, jnp.float32)
  return lambda step: weight * jnp.minimum(jnp.asarray(step, jnp.float32) / steps, 1.0)


def _feature(features: Mapping[str, jax.Array], layer: str, feature_fn: FeatureFn | None) -> jax.Array:
  x = features[layer]
  return x if feature_fn is None else feature_fn(x)


def _pairs(student_layers: str | Sequence[str], teacher_layers: str | Sequence[str]) -> tuple[tuple, tuple]:
  student_layers, teacher_layers = layer_paths(student_layers), layer_paths(teacher_layers)
  if len(student_layers) != len(teacher_layers) or not student_layers:
    raise ValueError(f"student and teacher layers must pair up one to one, got {student_layers} and {teacher_layers}.")
  return student_layers, teacher_layers


def _weight(weight: Weight, warmup_steps: int) -> Weight:
  return linear_warmup(weight, warmup_steps) if warmup_steps and not callable(weight) else weight


def _check_scope(scope: str, allowed: tuple[str, ...] = ("local", "global")) -> None:
  if scope not in allowed:
    raise ValueError(f"scope must be one of {allowed}, got {scope!r}.")


# ---------------------------------------------------------------------------------------------------------------------
# The catalogue: logits.


def dkd(
  *,
  weight: Weight = 1.0,
  alpha: float = 1.0,
  beta: float = 8.0,
  temperature: float = 4.0,
  warmup_steps: int = 0,
  name: str = "dkd",
) -> LossTerm:
  """Decoupled KD, per example (:func:`jaxkd.losses.dkd_loss`); CIFAR-100: ``alpha=1, beta=8, T=4``, CE at 1.

  ``warmup_steps`` ramps the weight linearly from 0 (the paper warms DKD up over its first 20 epochs).
  """

  def fn(inputs: TermInputs) -> jax.Array:
    return losses.dkd_loss(
      inputs.student_logits, inputs.teacher_logits, inputs.labels, alpha=alpha, beta=beta, temperature=temperature
    )

  return LossTerm(name, fn, _weight(weight, warmup_steps))


def dist(
  *,
  weight: Weight = 1.0,
  beta: float = 1.0,
  gamma: float = 1.0,
  temperature: float = 1.0,
  scope: Scope = "global",
  name: str = "dist",
) -> LossTerm:
  """DIST, one scalar per batch (:func:`jaxkd.losses.dist_loss`): ``beta=gamma=1``, CE at 1.

  The authors use :math:`T = 1` on ImageNet; CIFAR-100 re-implementations use :math:`T = 4`. The intra-class
  term correlates over the batch: ``scope='global'`` (default) over the global batch, ``'local'`` per device.
  """
  _check_scope(scope)

  def fn(inputs: TermInputs) -> jax.Array:
    return losses.dist_loss(
      inputs.student_logits,
      inputs.teacher_logits,
      beta=beta,
      gamma=gamma,
      temperature=temperature,
      position_mask=inputs.mask,
      axis_name=inputs.batch_axis,
    )

  return LossTerm(name, fn, weight, scope=scope)


def standardized_kd(*, weight: Weight = 9.0, temperature: float = 2.0, name: str = "lskd") -> LossTerm:
  """KD on z-scored logits, per example (:func:`jaxkd.losses.standardized_kd_loss`): weight 9 at T=2, CE at 0.1."""
  return LossTerm(
    name,
    lambda inputs: losses.standardized_kd_loss(inputs.student_logits, inputs.teacher_logits, temperature=temperature),
    weight,
  )


def reverse_kl(*, weight: Weight = 1.0, temperature: float = 1.0, name: str = "reverse_kl") -> LossTerm:
  """Reverse KL, per example (:func:`jaxkd.losses.reverse_kl_loss`)."""
  return LossTerm(
    name,
    lambda inputs: losses.reverse_kl_loss(inputs.student_logits, inputs.teacher_logits, temperature=temperature),
    weight,
  )


def generalized_jsd(
  *, weight: Weight = 1.0, beta: float = 0.5, temperature: float = 1.0, name: str = "gjsd"
) -> LossTerm:
  """Generalised Jensen-Shannon divergence, per example (:func:`jaxkd.losses.generalized_jsd_loss`)."""
  return LossTerm(
    name,
    lambda inputs: losses.generalized_jsd_loss(
      inputs.student_logits, inputs.teacher_logits, beta=beta, temperature=temperature
    ),
    weight,
  )


# ---------------------------------------------------------------------------------------------------------------------
# The catalogue: features.


def fitnet(
  student_layer: str,
  teacher_layer: str,
  *,
  weight: Weight = 100.0,
  kernel_size: Sequence[int] | None = None,
  feature_fn: FeatureFn | None = None,
  name: str = "fitnet",
) -> LossTerm:
  """FitNet hint, per example (:func:`jaxkd.losses.fitnet_loss`) through a trained :class:`HintRegressor`.

  RepDistiller's weight 100 (CE at 1), hint and guided layers in the middle of the networks. The regressor maps
  the student's channels to the teacher's; spatial sizes must agree.
  """

  def fn(inputs: TermInputs) -> jax.Array:
    student = _feature(inputs.student_features, student_layer, feature_fn)
    teacher = _feature(inputs.teacher_features, teacher_layer, feature_fn)
    regressor = losses.HintRegressor(features=teacher.shape[-1], kernel_size=kernel_size)
    return losses.fitnet_loss(inputs.adapter("regressor", regressor, student), teacher)

  return LossTerm(name, fn, weight, (student_layer,), (teacher_layer,))


def attention_transfer(
  student_layers: str | Sequence[str],
  teacher_layers: str | Sequence[str],
  *,
  weight: Weight = 1000.0,
  p: float = 2.0,
  feature_fn: FeatureFn | None = None,
  name: str = "at",
) -> LossTerm:
  """Attention transfer summed over layer pairs, per example (:func:`jaxkd.losses.attention_transfer_loss`).

  :math:`\\beta = 1000` (the authors' code and RepDistiller), CE at 1.
  """
  student_layers, teacher_layers = _pairs(student_layers, teacher_layers)

  def fn(inputs: TermInputs) -> jax.Array:
    return sum(
      losses.attention_transfer_loss(
        _feature(inputs.student_features, s, feature_fn), _feature(inputs.teacher_features, t, feature_fn), p=p
      )
      for s, t in zip(student_layers, teacher_layers, strict=True)
    )

  return LossTerm(name, fn, weight, student_layers, teacher_layers)


def nst(
  student_layers: str | Sequence[str],
  teacher_layers: str | Sequence[str],
  *,
  weight: Weight = 50.0,
  degree: int = 2,
  constant: float = 0.0,
  feature_fn: FeatureFn | None = None,
  name: str = "nst",
) -> LossTerm:
  """Neuron selectivity transfer summed over layer pairs, per example (:func:`jaxkd.losses.nst_loss`).

  The paper's polynomial kernel ``degree=2, constant=0``; RepDistiller's weight 50, CE at 1.
  """
  student_layers, teacher_layers = _pairs(student_layers, teacher_layers)

  def fn(inputs: TermInputs) -> jax.Array:
    return sum(
      losses.nst_loss(
        _feature(inputs.student_features, s, feature_fn),
        _feature(inputs.teacher_features, t, feature_fn),
        degree=degree,
        constant=constant,
      )
      for s, t in zip(student_layers, teacher_layers, strict=True)
    )

  return LossTerm(name, fn, weight, student_layers, teacher_layers)


def _pool_to(x: jax.Array, spatial: tuple[int, ...]) -> jax.Array:
  """Average-pools ``[batch, h, w, c]`` down to ``spatial`` (integer factors), as RepDistiller's FSP does."""
  if x.shape[1:-1] == tuple(spatial):
    return x
  factors = [a // b for a, b in zip(x.shape[1:-1], spatial, strict=True)]
  if any(f < 1 or a != f * b for f, a, b in zip(factors, x.shape[1:-1], spatial, strict=True)):
    raise ValueError(f"cannot pool features of shape {tuple(x.shape)} to spatial size {tuple(spatial)}.")
  return nn.avg_pool(x, tuple(factors), strides=tuple(factors))


def fsp(
  student_layers: Sequence[str],
  teacher_layers: Sequence[str],
  *,
  weight: Weight = 50.0,
  adapt_channels: bool = False,
  feature_fn: FeatureFn | None = None,
  name: str = "fsp",
) -> LossTerm:
  """FSP summed over consecutive layer pairs, per example (:func:`jaxkd.losses.fsp_loss`); weight 50, CE at 1.

  Layers ``(l_0, l_1, ..., l_n)`` give the flow matrices of ``(l_0, l_1), (l_1, l_2), ...``; the larger map of
  each pair is average-pooled to the smaller's size. FSP needs the student's and teacher's channel counts to
  agree; ``adapt_channels=True`` (not in the paper) maps each student layer to the teacher's width with a
  trained 1×1 :class:`~jaxkd.losses.HintRegressor` first, for pairs whose widths differ. The paper's
  separate FSP-only first stage is not reproduced: the term trains next to the cross-entropy from the start.
  """
  student_layers, teacher_layers = _pairs(student_layers, teacher_layers)
  if len(student_layers) < 2:
    raise ValueError(f"fsp needs at least two layers per network, got {student_layers} and {teacher_layers}.")

  def fn(inputs: TermInputs) -> jax.Array:
    student = [_feature(inputs.student_features, layer, feature_fn) for layer in student_layers]
    teacher = [_feature(inputs.teacher_features, layer, feature_fn) for layer in teacher_layers]
    if adapt_channels:
      student = [
        inputs.adapter(f"connector{i}", losses.HintRegressor(features=t.shape[-1]), s)
        for i, (s, t) in enumerate(zip(student, teacher, strict=True))
      ]
    total = 0.0
    for i in range(len(student) - 1):
      s_first, s_second, t_first, t_second = student[i], student[i + 1], teacher[i], teacher[i + 1]
      s_first = _pool_to(s_first, s_second.shape[1:-1])
      t_first = _pool_to(t_first, t_second.shape[1:-1])
      total = total + losses.fsp_loss(s_first, s_second, t_first, t_second)
    return total

  return LossTerm(name, fn, weight, student_layers, teacher_layers)


def vid(
  student_layers: str | Sequence[str],
  teacher_layers: str | Sequence[str],
  *,
  weight: Weight = 1.0,
  init_variance: float = 5.0,
  eps: float = 1e-5,
  feature_fn: FeatureFn | None = None,
  name: str = "vid",
) -> LossTerm:
  """VID summed over layer pairs, per example (:func:`jaxkd.losses.vid_loss`), one trained
  :class:`~jaxkd.losses.VIDRegressor` per pair; RepDistiller's weight 1 (CE at 1), initial variance 5.
  """
  student_layers, teacher_layers = _pairs(student_layers, teacher_layers)

  def fn(inputs: TermInputs) -> jax.Array:
    total = 0.0
    for i, (s, t) in enumerate(zip(student_layers, teacher_layers, strict=True)):
      student = _feature(inputs.student_features, s, feature_fn)
      teacher = _feature(inputs.teacher_features, t, feature_fn)
      head = losses.VIDRegressor(features=teacher.shape[-1], init_variance=init_variance, eps=eps)
      mean, variance = inputs.adapter(f"pair{i}", head, student)
      total = total + losses.vid_loss(mean, variance, teacher)
    return total

  return LossTerm(name, fn, weight, student_layers, teacher_layers)


# ---------------------------------------------------------------------------------------------------------------------
# The catalogue: relations and CRD.


def similarity_preserving(
  student_layers: str | Sequence[str],
  teacher_layers: str | Sequence[str],
  *,
  weight: Weight = 3000.0,
  scope: Scope = "global",
  feature_fn: FeatureFn | None = None,
  name: str = "sp",
) -> LossTerm:
  """Similarity-preserving KD summed over layer pairs, one scalar per batch
  (:func:`jaxkd.losses.similarity_preserving_loss`); :math:`\\gamma = 3000`, CE at 1.
  """
  _check_scope(scope)
  student_layers, teacher_layers = _pairs(student_layers, teacher_layers)

  def fn(inputs: TermInputs) -> jax.Array:
    return sum(
      losses.similarity_preserving_loss(
        _feature(inputs.student_features, s, feature_fn),
        _feature(inputs.teacher_features, t, feature_fn),
        where=inputs.mask,
        axis_name=inputs.batch_axis,
      )
      for s, t in zip(student_layers, teacher_layers, strict=True)
    )

  return LossTerm(name, fn, weight, student_layers, teacher_layers, scope=scope)


def _relation_term(
  name: str,
  loss: Callable[..., jax.Array],
  student_layer: str,
  teacher_layer: str,
  *,
  weight: Weight,
  scope: Scope,
  feature_fn: FeatureFn | None,
  **loss_kwargs: Any,
) -> LossTerm:
  """A batch-defined term on one student and one teacher layer: ``loss(student, teacher, where=, axis_name=)``."""
  _check_scope(scope)

  def fn(inputs: TermInputs) -> jax.Array:
    return loss(
      _feature(inputs.student_features, student_layer, feature_fn),
      _feature(inputs.teacher_features, teacher_layer, feature_fn),
      where=inputs.mask,
      axis_name=inputs.batch_axis,
      **loss_kwargs,
    )

  return LossTerm(name, fn, weight, (student_layer,), (teacher_layer,), scope=scope)


def rkd(
  student_layer: str,
  teacher_layer: str,
  *,
  weight: Weight = 1.0,
  distance_weight: float = 25.0,
  angle_weight: float = 50.0,
  scope: Scope = "global",
  feature_fn: FeatureFn | None = None,
  name: str = "rkd",
) -> LossTerm:
  """Relational KD (distance 25, angle 50), one scalar per batch (:func:`jaxkd.losses.rkd_loss`); CE at 1."""
  return _relation_term(
    name,
    losses.rkd_loss,
    student_layer,
    teacher_layer,
    weight=weight,
    scope=scope,
    feature_fn=feature_fn,
    distance_weight=distance_weight,
    angle_weight=angle_weight,
  )


def pkt(
  student_layer: str,
  teacher_layer: str,
  *,
  weight: Weight = 30000.0 / 64,
  scope: Scope = "global",
  feature_fn: FeatureFn | None = None,
  name: str = "pkt",
) -> LossTerm:
  """PKT, one scalar per batch (:func:`jaxkd.losses.pkt_loss`); CE at 1.

  RepDistiller's weight 30000 multiplies a double sum divided by :math:`b^2` with :math:`b = 64`; this loss is
  the paper's per-anchor mean, so the same strength is about ``30000 / batch_size`` (the default, for 64).
  """
  return _relation_term(
    name, losses.pkt_loss, student_layer, teacher_layer, weight=weight, scope=scope, feature_fn=feature_fn
  )


def cc(
  student_layer: str,
  teacher_layer: str,
  *,
  weight: Weight = 1.0,
  gamma: float = 0.4,
  taylor_order: int | None = 2,
  scope: Scope = "global",
  feature_fn: FeatureFn | None = None,
  name: str = "cc",
) -> LossTerm:
  """Correlation congruence (Gaussian RBF, 2nd-order Taylor, :math:`\\gamma = 0.4`), one scalar per batch
  (:func:`jaxkd.losses.cc_loss`); CE at 1.

  The catalogue gives no weight for this kernel form (RepDistiller's 0.02 is for a different loss); the default 1
  is unvalidated.
  """
  return _relation_term(
    name,
    losses.cc_loss,
    student_layer,
    teacher_layer,
    weight=weight,
    scope=scope,
    feature_fn=feature_fn,
    gamma=gamma,
    taylor_order=taylor_order,
  )


def crd(
  student_layer: str,
  teacher_layer: str,
  *,
  weight: Weight = 0.8,
  embed_dim: int = 128,
  num_negatives: int = 16384,
  temperature: float = 0.07,
  momentum: float = 0.5,
  global_normalizers: bool = True,
  feature_fn: FeatureFn | None = None,
  name: str = "crd",
) -> LossTerm:
  """Contrastive representation distillation, per example (:func:`jaxkd.losses.crd_step`), with its memory bank.

  The paper's settings are the defaults (128-d embeddings, :math:`K = 16384` negatives, :math:`\\tau = 0.07`,
  momentum 0.5, weight 0.8, CE at 1). The embedding heads (:class:`~jaxkd.losses.CRDHeads`) are adapters; the memory
  bank (``num_data`` rows) is term state, updated in the step from the *global* batch, so replicas stay identical.
  Batches need ``'index'``, each example's row in ``[0, num_data)`` (``BatchIterator(include_index=True)``;
  re-index a filtered dataset with ``indices=np.arange(len(dataset))``). Sampling and the :math:`\\log Z`
  estimate are described in :mod:`jaxkd.losses`.
  """
  if num_negatives < 1 or embed_dim < 1:
    raise ValueError(f"need num_negatives >= 1 and embed_dim >= 1, got {num_negatives} and {embed_dim}.")

  def init_state(rng: jax.Array, num_data: int) -> dict[str, Any]:
    return losses.crd_init_state(rng, num_data, embed_dim=embed_dim)

  def fn(inputs: TermInputs) -> tuple[jax.Array, dict[str, Any]]:
    student = _feature(inputs.student_features, student_layer, feature_fn)
    teacher = _feature(inputs.teacher_features, teacher_layer, feature_fn)
    student_embed, teacher_embed = inputs.adapter("heads", losses.CRDHeads(features=embed_dim), student, teacher)
    return losses.crd_step(
      student_embed,
      teacher_embed,
      inputs.state,
      index=inputs.index,
      mask=inputs.mask,
      rng=inputs.rng,
      axis_name=inputs.axis_name,
      num_negatives=num_negatives,
      temperature=temperature,
      momentum=momentum,
      global_normalizers=global_normalizers,
      name=name,
    )

  return LossTerm(name, fn, weight, (student_layer,), (teacher_layer,), init_state=init_state)
