"""Distillation methods as weighted loss terms on logits and intermediate features, inside the train step.

A :class:`Method` is a tuple of :class:`LossTerm`\\ s: each names the student and teacher layers it reads, computes
one loss from a :class:`TermInputs` (logits, labels, captured features, its adapters and its state), and carries a
weight. :func:`make_method_train_step` plugs the weighted sum into :func:`jaxkd.train.make_train_step` (through its
``objective`` hook), so a method runs in the same ``pmap`` / ``shard_map`` / ``single`` step, with the same
gradient reduction, non-finite skip and metrics, plus ``metrics['loss/<term name>']`` for each term (unweighted;
``metrics['loss']`` is the weighted total).

Features. Layers are named by their Flax linen module path, e.g. ``'Conv_1'`` or ``'_ResidualBlock_4'``, and the
output of their ``__call__`` is taken (``capture_intermediates``; the models are not edited). A value a model
``sow``\\ s into ``'intermediates'`` is found by its path too (``'Block_0/features'``). Both networks run on the same
images in the step: the teacher in eval mode under ``stop_gradient``, the student in train mode.

Adapters. Learned heads (FitNet's regressor, VID's regressor and variance, CRD's embedding heads) are linen modules a
term applies with :meth:`TermInputs.adapter`. Their parameters live in the student's state and train with it:
``state.params = {'student': ..., 'adapters': {term: {adapter: ...}}}``; they are saved in the student's checkpoint,
never in the teacher's. ``state.apply_fn`` applies the student alone, so :func:`jaxkd.train.make_eval_step`,
:func:`jaxkd.checkpoint.export_forward` and the trainer work unchanged; :func:`student_variables` gives the plain
student variables for inference or export.

Term state. A term with ``init_state`` (CRD's memory bank) keeps its state in the non-trainable collection,
``state.batch_stats = {'student': <BatchNorm statistics>, 'terms': {term: ...}}`` (entries only where non-empty), so
it is checkpointed and restored with the rest of the student, and updated inside the step. Term states are never
averaged over devices: a stateful term keeps its replicas identical itself (CRD gathers the global batch before
updating its bank).

Local or global batch. A term's ``scope`` says what its loss is defined over:

* ``'example'``: a per-example loss ``[batch]``; averaged over the real examples of the global batch, like
  :func:`jaxkd.train.make_train_step`'s loss (identical in every parallel mode).
* ``'global'``: one scalar over the global batch (relation losses, DIST): ``inputs.batch_axis`` names the data axis,
  the loss ``all_gather``\\ s its inputs, and pmap, shard_map and a single device give the same loss and gradients.
* ``'local'``: one scalar over each device's batch (``inputs.batch_axis`` is None); the step minimises the
  example-weighted mean of the devices' losses, which depends on how the batch is split.

Scalar losses are weighted by each device's share of the real examples before the psum of the gradients, which for
``'global'`` terms gives exactly the gradient of the global-batch loss: the transpose of ``all_gather`` sums the
devices' cotangents, and the shares sum to 1 (tested against one device with pmap and shard_map).

Example (CE + KD + attention transfer, CNN teacher and student)::

  from jaxkd import methods
  method = methods.Method(
    [
      methods.cross_entropy(weight=1.0),
      methods.kd(weight=0.9, temperature=4.0),
      methods.attention_transfer(["Conv_0", "Conv_1"], ["Conv_0", "Conv_1"], weight=1000.0),
    ]
  )
  state = methods.create_method_state(
    method, student, optax.adam(1e-3), images[:1], teacher_apply_fn=teacher.apply,
    teacher_variables=teacher_variables, rng=0,
  )
  step = methods.make_method_train_step(method, teacher_apply_fn=teacher.apply, parallel="single")
  for batch in batches:  # a jaxkd.data.BatchIterator; include_index=True for CRD
    state, metrics = step(state, teacher_variables, batch)  # metrics['loss/at'], metrics['loss/kd'], ...
  logits = student.apply(methods.student_variables(state), images)

The catalogue constructors (:func:`kd`, :func:`dkd`, :func:`dist`, :func:`standardized_kd`, :func:`reverse_kl`,
:func:`generalized_jsd`, :func:`fitnet`, :func:`attention_transfer`, :func:`nst`, :func:`fsp`, :func:`vid`,
:func:`similarity_preserving`, :func:`rkd`, :func:`pkt`, :func:`cc`, :func:`crd`) default to the weights and
hyperparameters the papers (or the CRD benchmark's code, RepDistiller) use, as documented in :mod:`jaxkd.losses`,
:mod:`jaxkd.features` and :mod:`jaxkd.relations`; those methods are trained with :func:`cross_entropy` at weight 1
next to them (Hinton's KD: 0.1 and 0.9; logit standardisation: 0.1 and 9).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkd import features as features_lib
from jaxkd import losses, relations
from jaxkd import train as train_lib

__all__ = [
  "LossTerm",
  "TermInputs",
  "Method",
  "create_method_state",
  "make_method_train_step",
  "student_variables",
  "capture_features",
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

PyTree = Any
Scope = Literal["example", "local", "global"]
Weight = float | Callable[[jax.Array], jax.Array]
FeatureFn = Callable[[jax.Array], jax.Array]

_SCOPES = ("example", "local", "global")
# A key stream for the terms, apart from the dropout keys fold_in(fold_in(rng, step), device).
_TERM_STREAM = 0x7E4D


# ---------------------------------------------------------------------------------------------------------------------
# Specs.


@dataclasses.dataclass
class TermInputs:
  """What a :class:`LossTerm`'s ``fn`` sees: one device's share of one step.

  Attributes:
    student_logits: float32 ``[batch, num_classes]``.
    teacher_logits: float32 ``[batch, num_classes]``, under ``stop_gradient``.
    labels: int ``[batch]``.
    mask: bool ``[batch]``; False marks padding (all True in training batches).
    student_features: ``{layer: array}`` for the term's ``student_layers``.
    teacher_features: ``{layer: array}`` for the term's ``teacher_layers``, under ``stop_gradient``.
    index: int32 ``[batch]`` dataset indices (``batch['index']``), or None when the batch has none.
    rng: a key for this term and step, the same on every device (fold in example indices or
      ``lax.axis_index`` for per-example or per-device randomness).
    step: the state's step (int32 scalar).
    axis_name: the data-parallel axis (size 1 on one device); for collectives a term always needs.
    batch_axis: ``axis_name`` for ``scope='global'`` terms (pass it as a loss's ``axis_name``), else None.
    state: the term's state (from ``init_state``), or None.
  """

  student_logits: jax.Array
  teacher_logits: jax.Array
  labels: jax.Array
  mask: jax.Array
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

    At :func:`create_method_state` the module is initialised on the example features (and its parameters
    stored under ``params['adapters'][term][name]``); in the step it is applied with the trained parameters.
    The module must be built the same way both times (e.g. its width from the features' static shapes).
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
        "was the state made by create_method_state with this method?"
      )
    return module.apply({"params": self.adapter_params[name]}, *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class LossTerm:
  """One weighted loss of a :class:`Method`.

  Attributes:
    name: the term's key: ``metrics['loss/<name>']``, ``params['adapters'][name]``; unique in its method.
    fn: ``fn(inputs: TermInputs)`` returning the loss: float ``[batch]`` for ``scope='example'``, a scalar
      otherwise; with ``init_state``, ``(loss, new_state)``.
    weight: a float, or a schedule ``weight(step) -> scalar`` (e.g. :func:`linear_warmup`).
    student_layers: student layer paths ``fn`` reads from ``inputs.student_features``.
    teacher_layers: teacher layer paths ``fn`` reads from ``inputs.teacher_features``.
    scope: ``'example'``, ``'local'`` or ``'global'`` (see the module docstring).
    init_state: ``init_state(rng, num_data) -> state`` for a term that keeps state between steps.
  """

  name: str
  fn: Callable[[TermInputs], Any]
  weight: Weight = 1.0
  student_layers: tuple[str, ...] = ()
  teacher_layers: tuple[str, ...] = ()
  scope: Scope = "example"
  init_state: Callable[[jax.Array, int], PyTree] | None = None

  def __post_init__(self):
    if not self.name or "/" in self.name:
      raise ValueError(f"a term name must be a non-empty string without '/', got {self.name!r}.")
    if self.scope not in _SCOPES:
      raise ValueError(f"scope must be one of {_SCOPES}, got {self.scope!r}.")
    object.__setattr__(self, "student_layers", _layers(self.student_layers))
    object.__setattr__(self, "teacher_layers", _layers(self.teacher_layers))


@dataclasses.dataclass(frozen=True)
class Method:
  """A distillation method: loss terms whose weighted sum the student minimises.

  Attributes:
    terms: the :class:`LossTerm`\\ s, with distinct names.
    name: a label for tables and logs.

  >>> Method([cross_entropy(), kd()]).student_layers
  ()
  """

  terms: tuple[LossTerm, ...]
  name: str = ""

  def __post_init__(self):
    terms = tuple(self.terms)
    if not terms or not all(isinstance(t, LossTerm) for t in terms):
      raise TypeError(f"a Method needs one or more LossTerms, got {self.terms!r}.")
    names = [t.name for t in terms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise ValueError(f"term names must be distinct, got {duplicates} more than once; pass name=... to rename.")
    object.__setattr__(self, "terms", terms)

  @property
  def student_layers(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(layer for t in self.terms for layer in t.student_layers))

  @property
  def teacher_layers(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(layer for t in self.terms for layer in t.teacher_layers))

  @property
  def stateful(self) -> bool:
    return any(t.init_state is not None for t in self.terms)


def _layers(layers: str | Sequence[str]) -> tuple[str, ...]:
  layers = (layers,) if isinstance(layers, str) else tuple(layers)
  if not all(isinstance(layer, str) and layer for layer in layers):
    raise ValueError(f"layers must be non-empty module paths such as 'Conv_1', got {layers!r}.")
  return layers


# ---------------------------------------------------------------------------------------------------------------------
# Features, variables and the student's apply.


def _capture_filter(layers: Sequence[str]) -> Callable[[nn.Module, str], bool]:
  wanted = frozenset(layers)
  return lambda module, method_name: method_name == "__call__" and "/".join(module.path) in wanted


def _available(intermediates: Mapping[str, Any], prefix: str = "") -> list[str]:
  names = []
  for key, value in intermediates.items():
    path = f"{prefix}{key}"
    if key == "__call__":
      continue
    if isinstance(value, Mapping):
      if "__call__" in value:
        names.append(path)
      names += _available(value, path + "/")
    else:
      names.append(path)  # a sown value
  return names


def _lookup(intermediates: Mapping[str, Any], layer: str) -> jax.Array:
  """The first recorded value at ``layer`` (``'A/B'``: a module's ``__call__`` output or a sown value)."""
  node: Any = intermediates
  for part in layer.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      raise KeyError(layer)
    node = node[part]
  if isinstance(node, Mapping):
    if "__call__" not in node:
      raise KeyError(layer)
    node = node["__call__"]
  values = node if isinstance(node, tuple | list) else (node,)
  return values[0]


def capture_features(
  apply_fn: Callable[..., Any],
  variables: PyTree,
  images: jax.Array,
  layers: Sequence[str],
  *,
  train: bool = False,
  rngs: Mapping[str, jax.Array] | None = None,
  mutable: Sequence[str] = (),
  what: str = "model",
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
  """Runs a linen ``apply`` and returns its output with the named layers' ``__call__`` outputs.

  Args:
    apply_fn: a linen ``Module.apply`` (it must accept ``capture_intermediates`` and ``mutable``).
    variables: the model's variables.
    images: the input batch.
    layers: module paths such as ``'Conv_1'`` or ``'Block_0/Dense_1'`` (the first call's output is taken), or
      paths of values the model sows into ``'intermediates'``.
    train: passed to the model.
    rngs: passed to the model (``{'dropout': key}``).
    mutable: other collections to update (``['batch_stats']`` in train mode).
    what: the model's name in error messages.

  Returns:
    ``(logits, {layer: features}, updates)`` with ``updates`` the other mutable collections.

  Raises:
    ValueError: naming the model's layers when one of ``layers`` is not among them.
  """
  out, updates = apply_fn(
    variables,
    images,
    train=train,
    rngs=rngs,
    mutable=["intermediates", *mutable],
    capture_intermediates=_capture_filter(layers),
  )
  updates = dict(updates)
  intermediates = updates.pop("intermediates", {})
  found = {}
  for layer in layers:
    try:
      found[layer] = _lookup(intermediates, layer)
    except KeyError:
      raise ValueError(
        f"no {what} layer {layer!r}; the {what}'s layers are {_layer_names(apply_fn, variables, images)} (module "
        "paths whose __call__ output is taken, or values sown into 'intermediates')."
      ) from None
  return out, found, updates


def _layer_names(apply_fn: Callable[..., Any], variables: PyTree, images: jax.Array) -> list[str]:
  """Every capturable layer path of a model, from an abstract (shapes-only) run that captures them all."""
  structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), (variables, images))
  run = lambda v, x: apply_fn(v, x, train=False, mutable=["intermediates"], capture_intermediates=True)[1]  # noqa: E731
  return _available(dict(jax.eval_shape(run, *structs)).get("intermediates", {}))


def _split_batch_stats(batch_stats: Mapping[str, Any]) -> tuple[PyTree, dict[str, Any]]:
  batch_stats = batch_stats or {}
  return batch_stats.get("student", {}), dict(batch_stats.get("terms", {}))


def _pack_batch_stats(student: PyTree, terms: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  if train_lib._has_leaves(student):
    out["student"] = student
  if terms:
    out["terms"] = dict(terms)
  return out


def student_variables(state_or_variables: Any) -> dict[str, Any]:
  """The plain student ``{'params', 'batch_stats'}`` of a method state (or of its variables/checkpoint).

  Adapters and term state are dropped: the result is what ``student.apply`` takes for inference or
  :func:`jaxkd.checkpoint.export_forward`.

  Args:
    state_or_variables: a :class:`jaxkd.TrainState` from :func:`create_method_state`, or
      ``{'params', 'batch_stats'}`` laid out the same way (e.g. from :func:`jaxkd.checkpoint.load_variables`).
  """
  if isinstance(state_or_variables, train_lib.TrainState):
    params, batch_stats = state_or_variables.params, state_or_variables.batch_stats
  else:
    params, batch_stats = state_or_variables["params"], state_or_variables.get("batch_stats", {})
  if not isinstance(params, Mapping) or "student" not in params:
    keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
    raise ValueError(f"not a method state: its params have no 'student' entry (they have {keys}).")
  student_stats, _ = _split_batch_stats(batch_stats)
  return {"params": params["student"], "batch_stats": student_stats}


@dataclasses.dataclass(frozen=True)
class _StudentApply:
  """``state.apply_fn`` of a method state: applies the student alone to method-state variables."""

  module: nn.Module

  def __call__(
    self,
    variables: Mapping[str, Any],
    images: jax.Array,
    *,
    train: bool = False,
    rngs: Mapping[str, jax.Array] | None = None,
    mutable: bool | str | Sequence[str] = False,
    **kwargs: Any,
  ) -> Any:
    inner = student_variables(variables)
    if not train_lib._has_leaves(inner["batch_stats"]):
      inner = {"params": inner["params"]}
    if not mutable:
      return self.module.apply(inner, images, train=train, rngs=rngs, **kwargs)
    collections = [mutable] if isinstance(mutable, str) else mutable
    logits, updates = self.module.apply(inner, images, train=train, rngs=rngs, mutable=collections, **kwargs)
    updates = dict(updates)
    if collections is True or "batch_stats" in collections:
      _, terms = _split_batch_stats(variables.get("batch_stats", {}))
      updates["batch_stats"] = _pack_batch_stats(updates.get("batch_stats", {}), terms)
    return logits, updates


# ---------------------------------------------------------------------------------------------------------------------
# State and step.


def _term_inputs(
  term: LossTerm,
  *,
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  labels: jax.Array,
  mask: jax.Array,
  student_features: Mapping[str, jax.Array],
  teacher_features: Mapping[str, jax.Array],
  index: jax.Array | None,
  rng: jax.Array,
  step: jax.Array,
  axis_name: str,
  state: Any,
  adapter_params: Any,
  adapter_rng: jax.Array | None = None,
) -> TermInputs:
  return TermInputs(
    student_logits=student_logits,
    teacher_logits=teacher_logits,
    labels=labels,
    mask=mask,
    student_features={layer: student_features[layer] for layer in term.student_layers},
    teacher_features={layer: teacher_features[layer] for layer in term.teacher_layers},
    index=index,
    rng=rng,
    step=step,
    axis_name=axis_name,
    batch_axis=axis_name if term.scope == "global" else None,
    state=state,
    adapter_params=adapter_params,
    adapter_rng=adapter_rng,
  )


def _split_output(term: LossTerm, output: Any) -> tuple[jax.Array, Any]:
  if term.init_state is None:
    return output, None
  if not (isinstance(output, tuple) and len(output) == 2):
    raise ValueError(f"term {term.name!r} has init_state, so its fn must return (loss, new_state).")
  return output


def create_method_state(
  method: Method,
  student: nn.Module,
  tx: optax.GradientTransformation,
  example_input: jax.typing.ArrayLike,
  *,
  teacher_apply_fn: Callable[..., Any],
  teacher_variables: PyTree,
  rng: jax.Array | int,
  num_data: int | None = None,
) -> train_lib.TrainState:
  """Initialises a student :class:`jaxkd.TrainState` for ``method``: the student, its adapters and term states.

  The student is initialised as :func:`jaxkd.train.create_train_state` does; both networks are then run (shapes
  only) on two copies of ``example_input`` to check the method's layer names and give each term its example
  features, on which its adapters are initialised.

  Args:
    method: the :class:`Method`.
    student: a linen module, ``student.apply(variables, images, train=...)``.
    tx: the optimizer; it updates the student and the adapters.
    example_input: images ``[batch, H, W, C]`` (the first is used).
    teacher_apply_fn: the teacher's linen ``apply`` (e.g. ``teacher.apply``).
    teacher_variables: the teacher's variables (read for shapes only; never stored in the state).
    rng: a typed key, a legacy ``PRNGKey`` or an int seed.
    num_data: dataset size, for terms with state (CRD's memory bank: one row per ``batch['index']`` value).

  Returns:
    A state with ``params = {'student', 'adapters'}``, ``batch_stats = {'student', 'terms'}`` (each entry only
    when non-empty), ``step`` int32 0 and ``apply_fn`` applying the student alone.
  """
  init_rng, state_rng = jax.random.split(train_lib._as_typed_key(rng))
  params_rng, dropout_rng, adapter_rng, term_rng = jax.random.split(init_rng, 4)
  example = np.asarray(example_input)[:1]
  variables = dict(train_lib._init_linen(student, {"params": params_rng, "dropout": dropout_rng}, example))
  unsupported = sorted(set(variables) - {"params", "batch_stats"})
  if unsupported:
    raise ValueError(
      f"only the 'params' and 'batch_stats' collections are supported, the student also has {unsupported}."
    )
  if method.stateful and num_data is None:
    stateful = [t.name for t in method.terms if t.init_state is not None]
    raise ValueError(f"terms {stateful} keep per-example state: pass num_data (the training set's size).")
  term_states = {
    t.name: t.init_state(jax.random.fold_in(term_rng, i), num_data)
    for i, t in enumerate(method.terms)
    if t.init_state is not None
  }

  # Two examples: relation losses need at least two.
  images = jnp.asarray(np.concatenate([example, example]))

  def shapes(apply_fn, model_variables, layers, what):
    def run(v, x):
      logits, feats, _ = capture_features(apply_fn, v, x, layers, what=what)
      return logits, feats

    return jax.eval_shape(run, model_variables, images)

  student_vars = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
  student_logits, student_features = shapes(student.apply, student_vars, method.student_layers, "student")
  teacher_logits, teacher_features = shapes(teacher_apply_fn, teacher_variables, method.teacher_layers, "teacher")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
      f"student and teacher disagree: student logits {student_logits.shape}, teacher logits {teacher_logits.shape}."
    )
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731

  def init_adapters(key: jax.Array, s_logits, t_logits, s_features, t_features, states) -> dict[str, Any]:
    adapters = {}
    for i, term in enumerate(method.terms):
      inputs = _term_inputs(
        term,
        student_logits=s_logits.astype(jnp.float32),
        teacher_logits=t_logits.astype(jnp.float32),
        labels=jnp.zeros((2,), jnp.int32),
        mask=jnp.ones((2,), jnp.bool_),
        student_features=s_features,
        teacher_features=t_features,
        index=jnp.arange(2, dtype=jnp.int32),
        rng=jax.random.fold_in(key, 2 * i),
        step=jnp.zeros((), jnp.int32),
        axis_name="batch",
        state=states.get(term.name),
        adapter_params=None,
        adapter_rng=jax.random.fold_in(key, 2 * i + 1),
      )
      term.fn(inputs)
      if inputs.initialized:
        adapters[term.name] = inputs.initialized
    return adapters

  def init_on_one_device(*args):
    # Under a named axis of size 1, so that terms' collectives trace as they do in the step.
    args = jax.tree.map(lambda x: x[None], args)
    out = jax.vmap(init_adapters, axis_name="batch", axis_size=1)(*args)
    return jax.tree.map(lambda x: x[0], out)

  example_args = (student_logits, teacher_logits, student_features, teacher_features)
  adapters = jax.jit(init_on_one_device)(adapter_rng, *zeros(example_args), term_states)

  params = {"student": variables["params"]}
  if adapters:
    params["adapters"] = adapters
  state = train_lib.TrainState.create(
    apply_fn=_StudentApply(student),
    params=params,
    tx=tx,
    rng=state_rng,
    batch_stats=_pack_batch_stats(variables.get("batch_stats", {}), term_states),
  )
  return state.replace(step=jnp.zeros((), jnp.int32))


def _term_weight(weight: Weight, step: jax.Array) -> jax.Array:
  value = weight(step) if callable(weight) else weight
  return jnp.asarray(value, jnp.float32)


def _method_objective(
  method: Method, teacher_apply_fn: Callable[..., Any], params: PyTree, ctx: train_lib.StepContext
) -> tuple[jax.Array, dict[str, Any]]:
  """The ``objective`` hook of :func:`jaxkd.train.make_train_step` for a :class:`Method` (one device)."""
  state = ctx.state
  if not isinstance(state.apply_fn, _StudentApply):
    raise ValueError("a method step needs a state made by jaxkd.methods.create_method_state.")
  student = state.apply_fn.module
  axis = ctx.axis_name
  labels = ctx.batch["label"]
  mask = ctx.mask
  index = ctx.batch.get("index")
  index = None if index is None else jnp.asarray(index).astype(jnp.int32)

  teacher_vars = train_lib._cast_params(ctx.teacher_variables, ctx.compute_dtype)
  teacher_logits, teacher_features, _ = capture_features(
    teacher_apply_fn, teacher_vars, ctx.images, method.teacher_layers, what="teacher"
  )
  teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  teacher_features = jax.lax.stop_gradient(teacher_features)

  # Casting inside the differentiated function: float32 master params get float32 gradients.
  params = train_lib._cast_floating(params, ctx.compute_dtype)
  student_stats, term_states = _split_batch_stats(state.batch_stats)
  student_vars = {"params": params["student"]}
  mutable = []
  if train_lib._has_leaves(student_stats):
    student_vars["batch_stats"] = student_stats
    mutable.append("batch_stats")
  student_logits, student_features, updates = capture_features(
    student.apply,
    student_vars,
    ctx.images,
    method.student_layers,
    train=True,
    rngs={"dropout": ctx.rng},
    mutable=mutable,
    what="student",
  )
  student_logits = student_logits.astype(jnp.float32)
  if mutable:
    # Same dtypes as before keeps the state's avals fixed: one compilation, working donation.
    new_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), updates["batch_stats"], student_stats)
    student_stats = train_lib._inexact_pmean(new_stats, axis)

  adapters = params.get("adapters", {})
  local_count = jnp.sum(mask, dtype=jnp.float32)
  term_key = jax.random.fold_in(jax.random.fold_in(state.rng, _TERM_STREAM), state.step)
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  new_term_states = dict(term_states)
  for position, term in enumerate(method.terms):
    inputs = _term_inputs(
      term,
      student_logits=student_logits,
      teacher_logits=teacher_logits,
      labels=labels,
      mask=mask,
      student_features=student_features,
      teacher_features=teacher_features,
      index=index,
      rng=jax.random.fold_in(term_key, position),
      step=state.step,
      axis_name=axis,
      state=term_states.get(term.name),
      adapter_params=adapters.get(term.name, {}),
    )
    value, new_state = _split_output(term, term.fn(inputs))
    value = jnp.asarray(value, jnp.float32)
    if term.scope == "example":
      if value.shape != labels.shape:
        raise ValueError(
          f"term {term.name!r} has scope 'example' and must return a per-example loss of shape "
          f"{tuple(labels.shape)}, got {tuple(value.shape)}."
        )
      contribution = train_lib._masked_sum(value, mask) / ctx.global_count
    else:
      if value.shape != ():
        raise ValueError(
          f"term {term.name!r} has scope {term.scope!r} and must return a scalar, got shape {tuple(value.shape)}."
        )
      # Each device's share of the real examples: the shares sum to 1 over the axis, so the psum'd gradient is
      # the gradient of the global-batch loss ('global') or of the example-weighted mean of local losses ('local').
      contribution = value * local_count / ctx.global_count
    metrics[f"loss/{term.name}"] = contribution
    total = total + _term_weight(term.weight, state.step) * contribution
    if term.init_state is not None:
      old = term_states[term.name]
      new_term_states[term.name] = jax.tree.map(lambda new, old: jnp.asarray(new).astype(old.dtype), new_state, old)

  aux = {
    "logits": student_logits,
    "teacher_logits": teacher_logits,
    "batch_stats": _pack_batch_stats(student_stats, new_term_states),
    "metrics": metrics,
  }
  return total, aux


def make_method_train_step(
  method: Method,
  *,
  teacher_apply_fn: Callable[..., Any],
  temperature: float = 1.0,
  parallel: train_lib.Parallel = "pmap",
  axis_name: str = "batch",
  mesh: jax.sharding.Mesh | None = None,
  compute_dtype: Any = None,
  donate: bool = True,
) -> Callable[[train_lib.TrainState, Any, Mapping[str, Any]], tuple[train_lib.TrainState, dict[str, jax.Array]]]:
  """Builds ``step(state, teacher_variables, batch) -> (state, metrics)`` minimising ``method``'s weighted terms.

  The step is :func:`jaxkd.train.make_train_step` with the method as its ``objective``: same layouts, input
  checks, gradient reduction over ``axis_name``, non-finite skip (term states are kept too) and metrics, plus
  ``metrics['loss/<term>']``, each term's unweighted loss over the global batch (the example-weighted mean of
  the devices' losses for ``'local'`` terms); ``metrics['loss']`` is their weighted sum. Batches need
  ``'index'`` (:class:`jaxkd.data.BatchIterator` with ``include_index=True``) for CRD.

  Args:
    method: the :class:`Method`.
    teacher_apply_fn: the teacher's linen ``apply``; run in eval mode on the step's images, under
      ``stop_gradient``.
    temperature: :math:`T` of the ``kd_loss`` metric (not of any term).
    parallel: ``'pmap'``, ``'shard_map'`` or ``'single'``.
    axis_name: the data-parallel axis name.
    mesh: for ``'shard_map'``.
    compute_dtype: as in :func:`jaxkd.train.make_train_step`.
    donate: donate the input state.

  Returns:
    The compiled step; the state must come from :func:`create_method_state`.
  """
  if teacher_apply_fn is None:
    raise ValueError("a method step needs the teacher's apply function (teacher_apply_fn=teacher.apply).")
  objective = functools.partial(_method_objective, method, teacher_apply_fn)
  return train_lib.make_train_step(
    teacher_apply_fn=teacher_apply_fn,
    temperature=temperature,
    parallel=parallel,
    axis_name=axis_name,
    mesh=mesh,
    compute_dtype=compute_dtype,
    donate=donate,
    objective=objective,
  )


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
  student_layers, teacher_layers = _layers(student_layers), _layers(teacher_layers)
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


def cross_entropy(*, weight: Weight = 1.0, name: str = "ce") -> LossTerm:
  """Hard-label cross-entropy, per example (:func:`jaxkd.losses.hard_cross_entropy`)."""
  return LossTerm(name, lambda inputs: losses.hard_cross_entropy(inputs.student_logits, inputs.labels), weight)


def kd(*, weight: Weight = 0.9, temperature: float = 4.0, name: str = "kd") -> LossTerm:
  """Hinton's KD, :math:`T^2\\,\\mathrm{KL}`, per example (:func:`jaxkd.losses.kd_loss`).

  RepDistiller's setting (Tian et al. 2020): weight 0.9 at :math:`T = 4`, cross-entropy at 0.1.
  """
  losses.check_temperature(temperature)
  return LossTerm(
    name, lambda inputs: losses.kd_loss(inputs.student_logits, inputs.teacher_logits, temperature), weight
  )


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
  """FitNet hint, per example (:func:`jaxkd.features.fitnet_loss`) through a trained :class:`HintRegressor`.

  RepDistiller's weight 100 (CE at 1), hint and guided layers in the middle of the networks. The regressor maps
  the student's channels to the teacher's; spatial sizes must agree.
  """

  def fn(inputs: TermInputs) -> jax.Array:
    student = _feature(inputs.student_features, student_layer, feature_fn)
    teacher = _feature(inputs.teacher_features, teacher_layer, feature_fn)
    regressor = features_lib.HintRegressor(features=teacher.shape[-1], kernel_size=kernel_size)
    return features_lib.fitnet_loss(inputs.adapter("regressor", regressor, student), teacher)

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
  """Attention transfer summed over layer pairs, per example (:func:`jaxkd.features.attention_transfer_loss`).

  :math:`\\beta = 1000` (the authors' code and RepDistiller), CE at 1.
  """
  student_layers, teacher_layers = _pairs(student_layers, teacher_layers)

  def fn(inputs: TermInputs) -> jax.Array:
    return sum(
      features_lib.attention_transfer_loss(
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
  """Neuron selectivity transfer summed over layer pairs, per example (:func:`jaxkd.features.nst_loss`).

  The paper's polynomial kernel ``degree=2, constant=0``; RepDistiller's weight 50, CE at 1.
  """
  student_layers, teacher_layers = _pairs(student_layers, teacher_layers)

  def fn(inputs: TermInputs) -> jax.Array:
    return sum(
      features_lib.nst_loss(
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
  """FSP summed over consecutive layer pairs, per example (:func:`jaxkd.features.fsp_loss`); weight 50, CE at 1.

  Layers ``(l_0, l_1, ..., l_n)`` give the flow matrices of ``(l_0, l_1), (l_1, l_2), ...``; the larger map of
  each pair is average-pooled to the smaller's size. FSP needs the student's and teacher's channel counts to
  agree; ``adapt_channels=True`` (not in the paper) maps each student layer to the teacher's width with a
  trained 1×1 :class:`~jaxkd.features.HintRegressor` first, for pairs whose widths differ. The paper's
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
        inputs.adapter(f"connector{i}", features_lib.HintRegressor(features=t.shape[-1]), s)
        for i, (s, t) in enumerate(zip(student, teacher, strict=True))
      ]
    total = 0.0
    for i in range(len(student) - 1):
      s_first, s_second, t_first, t_second = student[i], student[i + 1], teacher[i], teacher[i + 1]
      s_first = _pool_to(s_first, s_second.shape[1:-1])
      t_first = _pool_to(t_first, t_second.shape[1:-1])
      total = total + features_lib.fsp_loss(s_first, s_second, t_first, t_second)
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
  """VID summed over layer pairs, per example (:func:`jaxkd.features.vid_loss`), one trained
  :class:`~jaxkd.features.VIDRegressor` per pair; RepDistiller's weight 1 (CE at 1), initial variance 5.
  """
  student_layers, teacher_layers = _pairs(student_layers, teacher_layers)

  def fn(inputs: TermInputs) -> jax.Array:
    total = 0.0
    for i, (s, t) in enumerate(zip(student_layers, teacher_layers, strict=True)):
      student = _feature(inputs.student_features, s, feature_fn)
      teacher = _feature(inputs.teacher_features, t, feature_fn)
      head = features_lib.VIDRegressor(features=teacher.shape[-1], init_variance=init_variance, eps=eps)
      mean, variance = inputs.adapter(f"pair{i}", head, student)
      total = total + features_lib.vid_loss(mean, variance, teacher)
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
  (:func:`jaxkd.relations.similarity_preserving_loss`); :math:`\\gamma = 3000`, CE at 1.
  """
  _check_scope(scope)
  student_layers, teacher_layers = _pairs(student_layers, teacher_layers)

  def fn(inputs: TermInputs) -> jax.Array:
    return sum(
      relations.similarity_preserving_loss(
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
  """Relational KD (distance 25, angle 50), one scalar per batch (:func:`jaxkd.relations.rkd_loss`); CE at 1."""
  return _relation_term(
    name,
    relations.rkd_loss,
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
  """PKT, one scalar per batch (:func:`jaxkd.relations.pkt_loss`); CE at 1.

  RepDistiller's weight 30000 multiplies a double sum divided by :math:`b^2` with :math:`b = 64`; this loss is
  the paper's per-anchor mean, so the same strength is about ``30000 / batch_size`` (the default, for 64).
  """
  return _relation_term(
    name, relations.pkt_loss, student_layer, teacher_layer, weight=weight, scope=scope, feature_fn=feature_fn
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
  (:func:`jaxkd.relations.cc_loss`); CE at 1.

  The catalogue gives no weight for this kernel form (RepDistiller's 0.02 is for a different loss); the default 1
  is unvalidated.
  """
  return _relation_term(
    name,
    relations.cc_loss,
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
  """Contrastive representation distillation, per example (:func:`jaxkd.relations.crd_loss`), with its memory bank.

  The paper's settings are the defaults (128-d embeddings, :math:`K = 16384` negatives, :math:`\\tau = 0.07`,
  momentum 0.5, weight 0.8, CE at 1). The embedding heads (:class:`~jaxkd.relations.CRDHeads`) are adapters; the
  :class:`~jaxkd.relations.CRDMemory` bank (``num_data`` rows) is term state, updated in the step from the
  *global* batch, so replicas stay identical. Batches need ``'index'``, each example's row in ``[0, num_data)``
  (``BatchIterator(include_index=True)``; re-index a filtered dataset with ``indices=np.arange(len(dataset))``).

  Negatives are drawn per example from a key of ``(step, index)``, so they do not depend on the device layout.
  As in the authors' code, the partition-function estimates :math:`\\log Z` are taken on the first batch and
  then kept (in the term state): from the global first batch with ``global_normalizers`` (pmap == one device),
  else from each device's own first batch.
  """
  if num_negatives < 1 or embed_dim < 1:
    raise ValueError(f"need num_negatives >= 1 and embed_dim >= 1, got {num_negatives} and {embed_dim}.")

  def init_state(rng: jax.Array, num_data: int) -> dict[str, Any]:
    memory = relations.crd_init_memory(rng, num_data, embed_dim)
    return {
      "memory": {"student": memory.student, "teacher": memory.teacher},
      "log_z": jnp.zeros((2,), jnp.float32),
      "log_z_ready": jnp.zeros((), jnp.int32),
    }

  def fn(inputs: TermInputs) -> tuple[jax.Array, dict[str, Any]]:
    if inputs.index is None:
      raise ValueError(
        f"term {name!r} (CRD) needs each example's dataset index in batch['index']: "
        "use jaxkd.data.BatchIterator(..., include_index=True)."
      )
    student = _feature(inputs.student_features, student_layer, feature_fn)
    teacher = _feature(inputs.teacher_features, teacher_layer, feature_fn)
    student_embed, teacher_embed = inputs.adapter("heads", relations.CRDHeads(features=embed_dim), student, teacher)
    memory = relations.CRDMemory(**inputs.state["memory"])
    num_data = memory.student.shape[0]
    index = inputs.index

    def sample(i: jax.Array) -> jax.Array:
      key = jax.random.fold_in(inputs.rng, i)
      return relations.crd_sample_contrast_indices(key, i[None], num_negatives=num_negatives, num_data=num_data)[0]

    contrast = jax.vmap(sample)(index)  # [batch, 1 + num_negatives]
    estimate = jnp.stack(
      relations.crd_log_normalizers(student_embed, teacher_embed, memory, contrast, temperature=temperature)
    )  # [2]
    if global_normalizers:
      # Z is a mean over the scores; with equal per-device batches the global mean is the mean of the devices'.
      gathered = jax.lax.all_gather(estimate, inputs.axis_name)  # [devices, 2]
      estimate = jax.nn.logsumexp(gathered, axis=0) - math.log(gathered.shape[0])
    ready = inputs.state["log_z_ready"] > 0
    log_z = jnp.where(ready, inputs.state["log_z"], estimate)
    loss = relations.crd_loss(
      student_embed, teacher_embed, memory, contrast, temperature=temperature, log_normalizers=(log_z[0], log_z[1])
    )
    # Padding rows point past the bank: their (dropped) updates leave it untouched.
    update_index = jnp.where(inputs.mask, index, num_data)
    memory = relations.crd_update_memory(
      memory, update_index, student_embed, teacher_embed, momentum=momentum, axis_name=inputs.axis_name
    )
    new_state = {
      "memory": {"student": memory.student, "teacher": memory.teacher},
      "log_z": log_z,
      "log_z_ready": jnp.ones((), jnp.int32),
    }
    return loss, new_state

  return LossTerm(name, fn, weight, (student_layer,), (teacher_layer,), init_state=init_state)
