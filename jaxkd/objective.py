"""A distillation objective: weighted loss terms on logits and features, the one extension point of the step.

An :class:`Objective` is a tuple of :class:`LossTerm`\\ s. Each term computes one loss from a :class:`TermInputs`
(logits of both networks, labels, the batch, captured features, its adapters and its state) and carries a weight
(a number or a schedule ``step -> weight``). :func:`jaxkd.make_train_step` minimises the weighted sum;
``make_train_step(temperature=T, alpha=a)`` is the two-term objective ``[cross_entropy(weight=1 - a),
kd(weight=a, temperature=T)]`` (:func:`hinton`). The catalogue of published methods is :mod:`jaxkd.methods`.

Local or global batch. A term's ``scope`` says what its loss is defined over:

* ``'example'``: a per-example (or per-token) loss of the labels' shape; averaged over the real examples (or
  tokens) of the global batch, identical in every placement.
* ``'global'``: one scalar over the global batch (relation losses, DIST): ``inputs.batch_axis`` names the data
  axis, the loss ``all_gather``\\ s its inputs, and every placement gives the same loss and gradients.
* ``'local'``: one scalar over each device's batch (``inputs.batch_axis`` is None); the step minimises the
  example-weighted mean of the devices' losses, which depends on how the batch is split.

Scalar losses are weighted by each device's share of the real examples before the gradients are summed over
devices, which for ``'global'`` terms gives exactly the gradient of the global-batch loss: the transpose of
``all_gather`` sums the devices' cotangents, and the shares sum to 1.

Adapters (FitNet's regressor, CRD's heads) are linen modules a term applies with :meth:`TermInputs.adapter`; their
parameters live in ``TrainState.adapters`` and train with the student. Term state (CRD's memory bank) lives in
``TrainState.term_state``; a stateful term keeps its replicas identical itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import _checks, losses

__all__ = [
  "IGNORE_INDEX",
  "TOPK_INDICES",
  "TOPK_KEYS",
  "TOPK_LOGITS",
  "TOPK_LOG_NORMALIZER",
  "TOPK_TEMPERATURE",
  "MIX_LABEL",
  "MIX_WEIGHT",
  "LossTerm",
  "TermInputs",
  "Objective",
  "Schedule",
  "value_at",
  "cross_entropy",
  "kd",
  "per_example",
  "hinton",
  "layer_paths",
]

PyTree = Any
Scope = Literal["example", "local", "global"]
# A number, or an optax-style schedule step -> value.
Schedule = float | Callable[[jax.Array], jax.typing.ArrayLike]
_SCOPES = ("example", "local", "global")


def value_at(value: Schedule, step: jax.Array) -> jax.typing.ArrayLike:
  """A schedule's value at ``step`` (float32), or a number unchanged (so constants stay Python numbers)."""
  if callable(value):
    return jnp.asarray(value(step), jnp.float32)
  return value


@dataclasses.dataclass
class TermInputs:
  """What a :class:`LossTerm`'s ``fn`` sees: one device's share of one step.

  Attributes:
    student_logits: float32 ``[..., num_classes]`` (``[batch]`` or ``[batch, length]`` leading axes).
    teacher_logits: float32, same shape, under ``stop_gradient``; None when the step has no teacher.
    labels: int, the leading axes of the logits (positions to ignore hold 0 and are False in ``mask``).
    mask: bool, the labels' shape; False marks padding and ignored labels.
    batch: this device's batch, every entry (token ids, attention masks, ...).
    student_features: ``{layer: array}`` for the term's ``student_layers``.
    teacher_features: ``{layer: array}`` for the term's ``teacher_layers``, under ``stop_gradient``.
    index: int32 ``[batch]`` dataset indices (``batch['index']``), or None.
    rng: a key for this term and step, the same on every device.
    step: the state's step (int32 scalar).
    axis_name: the data-parallel axis (size 1 on one device); for collectives a term always needs.
    batch_axis: ``axis_name`` for ``scope='global'`` terms, else None.
    state: the term's state (from ``init_state``), or None.
  """

  student_logits: jax.Array
  teacher_logits: jax.Array | None
  labels: jax.Array
  mask: jax.Array
  batch: Mapping[str, jax.Array]
  student_features: Mapping[str, jax.Array]
  teacher_features: Mapping[str, jax.Array]
  index: jax.Array | None
  rng: jax.Array
  step: jax.Array
  axis_name: str
  batch_axis: str | None
  state: Any = None
  adapter_params: Mapping[str, Any] | None = dataclasses.field(default=None, repr=False)
  adapter_rng: jax.Array | None = dataclasses.field(default=None, repr=False)
  initialized: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

  def adapter(self, name: str, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Applies the term's adapter ``name`` (a linen module with only ``'params'``) to ``args``.

    When the state is created the module is initialised on the example features (its parameters stored under
    ``state.adapters[term][name]``); in the step it is applied with the trained parameters. The module must be
    built the same way both times (e.g. its width from the features' static shapes).
    """
    if self.adapter_params is None:
      if name in self.initialized:
        raise ValueError(f"adapter {name!r} is applied twice in one term; give each adapter its own name.")
      rng = jax.random.fold_in(self.adapter_rng, len(self.initialized))
      variables = module.init(rng, *args, **kwargs)
      extra = sorted(set(variables) - {"params"})
      if extra:
        raise ValueError(f"adapter {name!r} has collections {extra}; adapters may only have 'params'.")
      self.initialized[name] = variables["params"]
      return module.apply(variables, *args, **kwargs)
    if name not in self.adapter_params:
      raise ValueError(
        f"adapter {name!r} has no parameters in the state (it has {sorted(self.adapter_params)}); "
        "was the state made by create_train_state with this objective?"
      )
    return module.apply({"params": self.adapter_params[name]}, *args, **kwargs)


def layer_paths(layers: str | Sequence[str]) -> tuple[str, ...]:
  """Layer paths as a tuple (one string allowed); ValueError for empty or non-string entries."""
  layers = (layers,) if isinstance(layers, str) else tuple(layers)
  if not all(isinstance(layer, str) and layer for layer in layers):
    raise ValueError(f"layers must be non-empty module paths such as 'Conv_1', got {layers!r}.")
  return layers


@dataclasses.dataclass(frozen=True)
class LossTerm:
  """One weighted loss of an :class:`Objective`.

  Attributes:
    name: the term's key: ``metrics['loss/<name>']``, ``state.adapters[name]``; unique in its objective.
    fn: ``fn(inputs: TermInputs)`` returning the loss: float of the labels' shape for ``scope='example'``, a
      scalar otherwise; with ``init_state``, ``(loss, new_state)``.
    weight: a number, or a schedule ``weight(step) -> scalar`` (e.g. :func:`jaxkd.methods.linear_warmup`).
    student_layers: student layer paths ``fn`` reads from ``inputs.student_features``.
    teacher_layers: teacher layer paths ``fn`` reads from ``inputs.teacher_features``.
    scope: ``'example'``, ``'local'`` or ``'global'`` (see the module docstring).
    init_state: ``init_state(rng, num_data) -> state`` for a term that keeps state between steps.
    needs_teacher: False for terms that read only the student and the labels (cross-entropy).
    check_batch: ``check_batch(batch)``, called on the host with the step's batch before every step (before
      anything compiles), raising ValueError for a batch the term would silently misread (e.g.
      :func:`jaxkd.lm.sparse_kd` against a cache of another temperature). It sees the batch as given to the step:
      host arrays, or device arrays when the batch was placed already; it should read only NumPy values (reading a
      device array would wait for a device-to-host copy every step).
  """

  name: str
  fn: Callable[[TermInputs], Any]
  weight: Schedule = 1.0
  student_layers: tuple[str, ...] = ()
  teacher_layers: tuple[str, ...] = ()
  scope: Scope = "example"
  init_state: Callable[[jax.Array, int], PyTree] | None = None
  needs_teacher: bool = True
  check_batch: Callable[[Mapping[str, Any]], None] | None = None

  def __post_init__(self):
    if not self.name or "/" in self.name:
      raise ValueError(f"a term name must be a non-empty string without '/', got {self.name!r}.")
    if self.scope not in _SCOPES:
      raise ValueError(f"scope must be one of {_SCOPES}, got {self.scope!r}.")
    _checks.check_weight(self.weight, name=f"weight of term {self.name!r}")
    object.__setattr__(self, "student_layers", layer_paths(self.student_layers))
    object.__setattr__(self, "teacher_layers", layer_paths(self.teacher_layers))


@dataclasses.dataclass(frozen=True)
class Objective:
  """Loss terms whose weighted sum the student minimises.

  Attributes:
    terms: the :class:`LossTerm`\\ s, with distinct names.
    name: a label for tables and logs.
    temperature: :math:`T` (number or schedule) of the step's ``kd_loss`` metric, reported next to the terms;
      None takes :func:`jaxkd.make_train_step`'s ``temperature``.

  >>> Objective([cross_entropy(), kd()]).student_layers
  ()
  """

  terms: tuple[LossTerm, ...]
  name: str = ""
  temperature: Schedule | None = None

  def __post_init__(self):
    terms = tuple(self.terms)
    if not terms or not all(isinstance(t, LossTerm) for t in terms):
      raise TypeError(f"an Objective needs one or more LossTerms, got {self.terms!r}.")
    names = [t.name for t in terms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise ValueError(f"term names must be distinct, got {duplicates} more than once; pass name=... to rename.")
    if self.temperature is not None:
      _checks.check_temperature_or_schedule(self.temperature)
    object.__setattr__(self, "terms", terms)

  @property
  def student_layers(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(layer for t in self.terms for layer in t.student_layers))

  @property
  def teacher_layers(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(layer for t in self.terms for layer in t.teacher_layers))

  @property
  def needs_teacher(self) -> bool:
    return any(t.needs_teacher for t in self.terms)

  @property
  def stateful(self) -> bool:
    return any(t.init_state is not None for t in self.terms)

  def check_batch(self, batch: Mapping[str, Any]) -> None:
    """Runs every term's host-side :attr:`LossTerm.check_batch` on ``batch`` (the step does, before each step)."""
    for term in self.terms:
      if term.check_batch is not None:
        term.check_batch(batch)


# ---------------------------------------------------------------------------------------------------------------------
# The terms every objective is made of.


# Labels with this value are ignored by every term and metric (Hugging Face's convention for padding and prompt
# tokens); the step masks them out.
IGNORE_INDEX = -100
# Batch entries of a mixed batch (jaxkd.data.augment's mixup and cutmix): the partner's label and the mixing weight.
MIX_LABEL, MIX_WEIGHT = "mix_label", "mix_weight"
# Batch entries of cached sparse teacher targets (jaxkd.lm.topk_cache.JoinedSource adds them, jaxkd.lm.sparse_kd
# reads them): the teacher's top-k logits and token ids, sorted (the first is its top-1), and log Z at the cache's T.
TOPK_LOGITS, TOPK_INDICES, TOPK_LOG_NORMALIZER = "teacher_topk_logits", "teacher_topk_indices", "teacher_log_normalizer"
TOPK_KEYS = (TOPK_LOGITS, TOPK_INDICES, TOPK_LOG_NORMALIZER)
# float32 [batch]: the temperature of each example's TOPK_LOG_NORMALIZER (JoinedSource records the cache's), which a
# term using the normaliser checks on the host (jaxkd.lm.sparse_kd with tail='bucket').
TOPK_TEMPERATURE = "teacher_topk_temperature"


def cross_entropy(*, weight: Schedule = 1.0, name: str = "ce") -> LossTerm:
  """Hard-label cross-entropy, per example (:func:`jaxkd.losses.hard_cross_entropy`).

  On a mixed batch (``batch['mix_label']`` and ``batch['mix_weight']`` :math:`\\lambda` from
  :mod:`jaxkd.data.augment`) it is :math:`\\lambda\\,\\mathrm{CE}(y) + (1 - \\lambda)\\,\\mathrm{CE}(y')`, the mixed
  label's cross-entropy.
  """

  def fn(inputs: TermInputs) -> jax.Array:
    ce = losses.hard_cross_entropy(inputs.student_logits, inputs.labels)
    if MIX_LABEL not in inputs.batch:
      return ce
    weight = jnp.asarray(inputs.batch[MIX_WEIGHT], jnp.float32)
    partner = losses.hard_cross_entropy(inputs.student_logits, inputs.batch[MIX_LABEL])
    return weight * ce + (1.0 - weight) * partner

  return LossTerm(name, fn, weight, needs_teacher=False)


def kd(*, weight: Schedule = 0.9, temperature: Schedule = 4.0, name: str = "kd") -> LossTerm:
  """Hinton's KD, :math:`T^2\\,\\mathrm{KL}`, per example (:func:`jaxkd.losses.kd_loss`); ``temperature`` may be
  a schedule.

  RepDistiller's setting (Tian et al. 2020): weight 0.9 at :math:`T = 4`, cross-entropy at 0.1.
  """
  _checks.check_temperature_or_schedule(temperature)
  return LossTerm(
    name,
    lambda inputs: losses.kd_loss(inputs.student_logits, inputs.teacher_logits, value_at(temperature, inputs.step)),
    weight,
  )


def per_example(
  loss_fn: Callable[..., jax.Array], *, weight: Schedule = 1.0, name: str = "loss", needs_teacher: bool = True
) -> LossTerm:
  """A term from ``loss_fn(student_logits, teacher_logits, labels)`` returning a per-example loss.

  When ``loss_fn`` also takes a ``batch`` keyword it receives the device's batch (attention masks, token ids).
  """
  import inspect

  try:
    takes_batch = "batch" in inspect.signature(loss_fn).parameters
  except (TypeError, ValueError):
    takes_batch = False

  def fn(inputs: TermInputs) -> jax.Array:
    extra = {"batch": inputs.batch} if takes_batch else {}
    return loss_fn(inputs.student_logits, inputs.teacher_logits, inputs.labels, **extra)

  return LossTerm(name, fn, weight, needs_teacher=needs_teacher)


def hinton(*, temperature: Schedule = 1.0, alpha: Schedule = 0.5) -> Objective:
  """Hinton et al.'s objective: ``alpha`` x KD at ``temperature`` + ``(1 - alpha)`` x cross-entropy.

  Both may be schedules. The cross-entropy weight is computed as ``1 - float32(alpha)``, as
  :func:`jaxkd.losses.distillation_loss` does, so the step's loss equals it bit for bit.
  """
  _checks.check_alpha(alpha)
  if callable(alpha):
    ce_weight: Schedule = lambda step: 1.0 - jnp.asarray(alpha(step), jnp.float32)  # noqa: E731
    kd_weight: Schedule = alpha
  else:
    # NumPy float32 scalars: hashable constants, and the same float32 arithmetic as distillation_loss's.
    kd_weight = np.float32(alpha)
    ce_weight = np.float32(1.0) - kd_weight
  return Objective(
    (cross_entropy(weight=ce_weight), kd(weight=kd_weight, temperature=temperature)),
    name="kd",
    temperature=temperature,
  )
