"""The student's train state: parameters, optimizer state, BatchNorm statistics, adapters, loss-term state, key.

Every field is explicit (flax ``examples/imagenet`` habit) and checkpointed: ``adapters`` holds the parameters of
learned heads that loss terms apply (FitNet's regressor, CRD's embedding heads), trained with the student but never
part of it; ``term_state`` holds what a loss term carries between steps (CRD's memory bank). ``params`` is always the
student's own parameters, what inference, export and a later distillation need.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from flax.training import train_state

from jaxkd import modeling
from jaxkd.objective import Objective, TermInputs

__all__ = ["TrainState", "create_train_state", "as_typed_key"]

PyTree = Any


def _has_leaves(tree: PyTree) -> bool:
  return bool(jax.tree.leaves(tree))


class TrainState(train_state.TrainState):
  """Student state.

  Attributes:
    rng: typed PRNG key; the step derives its dropout key as ``fold_in(fold_in(rng, step), device_index)``.
    batch_stats: the ``'batch_stats'`` collection of BatchNorm models, ``{}`` without one.
    adapters: ``{term: {adapter: params}}`` of the objective's learned heads, ``{}`` without any.
    term_state: ``{term: state}`` of stateful loss terms, ``{}`` without any.
    model: how the step calls the student (:class:`jaxkd.modeling.Model`); ``apply_fn`` is its ``apply_fn``.

  The optimizer updates ``params`` alone when there are no adapters (``opt_state = tx.init(params)``, so any
  optax transformation that reads the parameter tree sees the student's), else ``{'student': params, 'adapters':
  adapters}`` together.
  """

  rng: jax.Array
  batch_stats: Any = struct.field(default_factory=dict)
  adapters: Any = struct.field(default_factory=dict)
  term_state: Any = struct.field(default_factory=dict)
  model: modeling.Model | None = struct.field(pytree_node=False, default=None)

  @property
  def trainable(self) -> PyTree:
    """What the optimizer updates (see the class docstring)."""
    if _has_leaves(self.adapters):
      return {"student": self.params, "adapters": self.adapters}
    return self.params

  def apply_gradients(self, *, grads: PyTree, **changes: Any) -> TrainState:
    """One optimizer update from gradients of :attr:`trainable`; ``step`` + 1."""
    trainable = self.trainable
    updates, opt_state = self.tx.update(grads, self.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    if _has_leaves(self.adapters):
      changes.update(params=trainable["student"], adapters=trainable["adapters"])
    else:
      changes.update(params=trainable)
    return self.replace(step=self.step + 1, opt_state=opt_state, **changes)


def as_typed_key(rng: Any) -> jax.Array:
  """Accepts an int seed, a typed key or a legacy uint32 ``PRNGKey``."""
  if isinstance(rng, int):
    return jax.random.key(rng)
  rng = jnp.asarray(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_hashable(module: nn.Module, flag: tuple, rngs: dict[str, jax.Array], args: tuple, kwargs: dict) -> Any:
  return module.init(rngs, *args, **dict(flag), **kwargs)


def _init_linen(model: modeling.Model, rngs: dict[str, jax.Array], batch: Mapping[str, Any]) -> dict[str, Any]:
  """``module.init`` in eval mode under jit; equal (hashable) modules share one compiled init."""
  module = model.linen_module
  args = tuple(np.asarray(batch[key]) for key in model.inputs)
  kwargs = {name: np.asarray(batch[key]) for name, key in model.input_kwargs.items()}
  flag = tuple(model.flag_kwargs(False).items()) if model.train_flag else ()
  try:
    hash(module)
  except TypeError:  # e.g. a list-valued attribute: compile for this module alone
    return jax.jit(lambda r, a, k: module.init(r, *a, **dict(flag), **k))(rngs, args, kwargs)
  return _init_hashable(module, flag, rngs, args, kwargs)


def _example_batch(example: Any, model: modeling.Model) -> dict[str, Any]:
  if isinstance(example, Mapping):
    model.check_batch(example)
    return {k: np.asarray(v)[:2] for k, v in example.items()}
  if len(model.batch_keys) != 1:
    raise ValueError(f"the student reads {list(model.batch_keys)}: pass example_input as a batch dict.")
  return {model.batch_keys[0]: np.asarray(example)[:2]}


def create_train_state(
  model: nn.Module | nnx.Module | modeling.Model,
  tx: optax.GradientTransformation,
  example_input: Any = None,
  *,
  rng: jax.Array | int,
  inputs: str | tuple[str, ...] = ("image",),
  input_kwargs: Mapping[str, str] | None = None,
  train_flag: str | None = "auto",
  logits: int | str | None = None,
  objective: Objective | None = None,
  teacher: Any = None,
  teacher_variables: PyTree = None,
  num_data: int | None = None,
) -> TrainState:
  """Initialises a student :class:`TrainState` (unplaced, on the default device).

  Args:
    model: a linen module (initialised here on ``example_input`` in eval mode), an NNX module (already
      initialised; adapted with :func:`jaxkd.from_nnx`) or a :class:`jaxkd.modeling.Model` of a linen module.
    tx: the optimizer (any optax transformation).
    example_input: an example batch dict, or the single input array (``[batch, ...]``); for linen init, and to
      trace the objective's adapters and features.
    rng: a typed key, a legacy ``PRNGKey`` or an int seed; split into the init key and the state's key.
    inputs, input_kwargs, train_flag, logits: how the step calls the model (:func:`jaxkd.modeling.as_model`).
    objective: an :class:`jaxkd.objective.Objective` with adapters or term state (e.g. from
      :mod:`jaxkd.methods`); their parameters and states are initialised here. Needs ``teacher`` and
      ``teacher_variables`` when its terms read teacher features.
    teacher: the teacher (anything :func:`jaxkd.modeling.as_model` takes), for the objective's shapes only.
    teacher_variables: the teacher's variables (read for shapes only; never stored in the state).
    num_data: dataset size, for terms with per-example state (CRD's memory bank, one row per ``batch['index']``).

  Returns:
    A state with ``step`` int32 0, float32 params as initialised, ``batch_stats``, ``adapters`` and
    ``term_state`` (``{}`` when empty) and the model adapter.
  """
  init_rng, state_rng = jax.random.split(as_typed_key(rng))
  params_rng, dropout_rng, adapter_rng, term_rng = jax.random.split(init_rng, 4)
  if isinstance(model, nnx.Module):
    apply_fn, variables = modeling.from_nnx(model)
    # from_nnx's apply_fn takes train= and switches the module's mode itself, whatever its __call__ takes.
    model = modeling.Model(apply_fn, inputs=inputs, input_kwargs=input_kwargs or {}, logits=logits, name="student")
  else:
    model = modeling.as_model(
      model, inputs=inputs, input_kwargs=input_kwargs, train_flag=train_flag, logits=logits, name="student"
    )
    if model.linen_module is None:
      raise ValueError(
        "create_train_state needs a linen or NNX module (or a jaxkd.modeling.Model of a linen module) to "
        "initialise; for an apply function with existing variables build the state with TrainState.create."
      )
    if example_input is None:
      raise ValueError("create_train_state needs example_input to initialise a linen module.")
    batch = _example_batch(example_input, model)
    variables = dict(_init_linen(model, {"params": params_rng, "dropout": dropout_rng}, batch))
  unsupported = sorted(set(variables) - {"params", "batch_stats"})
  if unsupported:
    raise ValueError(
      f"only the 'params' and 'batch_stats' collections are supported, the model also has {unsupported}."
    )
  adapters, term_state = {}, {}
  if objective is not None and (objective.stateful or _needs_adapters_init(objective)):
    if example_input is None:
      raise ValueError("an objective with adapters or term state needs example_input to trace its terms.")
    batch = _example_batch(example_input, model)
    term_state = _init_term_states(objective, term_rng, num_data)
    adapters = _init_adapters(objective, model, variables, batch, teacher, teacher_variables, adapter_rng, term_state)
  state = TrainState.create(
    apply_fn=model.apply_fn,
    params=variables["params"],
    tx=tx,
    rng=state_rng,
    batch_stats=variables.get("batch_stats", {}),
    adapters=adapters,
    term_state=term_state,
    model=model,
  )
  if _has_leaves(adapters):  # TrainState.create initialised the optimizer on params alone
    state = state.replace(opt_state=tx.init(state.trainable))
  # A Python int step would be weakly typed under jit; a fixed int32 keeps one compiled step.
  return state.replace(step=jnp.zeros((), jnp.int32))


def _needs_adapters_init(objective: Objective) -> bool:
  # Any term may create adapters; only feature terms and stateful ones do in the catalogue, but tracing is cheap.
  return bool(objective.student_layers or objective.teacher_layers)


def _init_term_states(objective: Objective, rng: jax.Array, num_data: int | None) -> dict[str, Any]:
  if objective.stateful and num_data is None:
    stateful = [t.name for t in objective.terms if t.init_state is not None]
    raise ValueError(f"terms {stateful} keep per-example state: pass num_data (the training set's size).")
  return {
    t.name: t.init_state(jax.random.fold_in(rng, i), num_data)
    for i, t in enumerate(objective.terms)
    if t.init_state is not None
  }


def _init_adapters(
  objective: Objective,
  model: modeling.Model,
  variables: PyTree,
  batch: Mapping[str, Any],
  teacher: Any,
  teacher_variables: PyTree,
  key: jax.Array,
  term_state: Mapping[str, Any],
) -> dict[str, Any]:
  """Runs both networks (shapes only) to check layer names, then initialises each term's adapters."""
  if objective.teacher_layers and (teacher is None or teacher_variables is None):
    raise ValueError(
      f"the objective reads teacher layers {list(objective.teacher_layers)}: pass teacher= and teacher_variables= "
      "to create_train_state."
    )
  # Two examples: relation losses need at least two.
  batch = {k: np.concatenate([v[:1], v[:1]]) for k, v in batch.items()}
  student_vars = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
  s_logits, s_features, _ = jax.eval_shape(
    lambda v, b: model(v, b, train=False, capture=objective.student_layers), student_vars, batch
  )
  t_logits, t_features = s_logits, {}
  if teacher is not None:
    teacher_model = modeling.as_model(teacher, inputs=model.inputs, input_kwargs=model.input_kwargs, name="teacher")
    t_logits, t_features, _ = jax.eval_shape(
      lambda v, b: teacher_model(v, b, train=False, capture=objective.teacher_layers), teacher_variables, batch
    )
    if t_logits.shape != s_logits.shape:
      raise ValueError(
        f"student and teacher disagree: student logits {s_logits.shape}, teacher logits {t_logits.shape}."
      )
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731

  def init(key, s_logits, t_logits, s_features, t_features, states):
    adapters = {}
    for i, term in enumerate(objective.terms):
      inputs = TermInputs(
        student_logits=s_logits,
        teacher_logits=t_logits,
        labels=jnp.zeros(s_logits.shape[:-1], jnp.int32),
        mask=jnp.ones(s_logits.shape[:-1], jnp.bool_),
        batch={},
        student_features={layer: s_features[layer] for layer in term.student_layers},
        teacher_features={layer: t_features[layer] for layer in term.teacher_layers},
        index=jnp.arange(2, dtype=jnp.int32),
        rng=jax.random.fold_in(key, 2 * i),
        step=jnp.zeros((), jnp.int32),
        axis_name="data",
        batch_axis="data" if term.scope == "global" else None,
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
    out = jax.vmap(init, axis_name="data", axis_size=1)(*args)
    return jax.tree.map(lambda x: x[0], out)

  examples = (s_logits, t_logits, s_features, t_features)
  return jax.jit(init_on_one_device)(key, *zeros(examples), dict(term_state))
