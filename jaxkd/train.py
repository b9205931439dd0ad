"""The distillation train and eval steps under data parallelism.

A student is trained against a frozen teacher's logits. One per-device step body
uses named-axis collectives over ``axis_name`` and is wrapped three ways:

* ``parallel='pmap'``: :func:`jax.pmap`; every array (state, teacher variables,
  batch) carries a leading axis of size ``jax.local_device_count()``
  (:func:`replicate` the state and teacher variables, :func:`split_for_pmap` the batch).
* ``parallel='shard_map'``: :func:`jax.jit` of :func:`jax.shard_map` over a 1-D
  mesh; the batch keeps its flat ``[batch, ...]`` layout, sharded along
  ``axis_name`` (:func:`shard_batch`), the state and teacher replicated
  (:func:`put_replicated`).
* ``parallel='single'``: :func:`jax.jit` on one device, flat layout, no helpers
  needed. The body runs under a ``vmap`` of axis size 1 named ``axis_name`` so
  that the collectives (and models that synchronise BatchNorm over
  ``axis_name``) work unchanged.

All three give the same numbers on the same global batch (up to float
rounding) when the model's BatchNorm synchronises over ``axis_name``
(``nn.BatchNorm(axis_name='batch')``). With per-device BatchNorm (the
:mod:`jaxkd.models` default) ``pmap`` and ``shard_map`` still agree, but
statistics are computed per device, so they differ from one device's
statistics over the whole batch.

Batches are dicts: ``'image'`` (float ``[..., H, W, C]``), ``'label'`` (int32),
optionally ``'teacher_logits'`` (float32 ``[..., num_classes]``, offline
distillation from a cache) and ``'mask'`` (bool, False marks padding).

Models are called as ``apply_fn(variables, images, train=..., rngs=..., mutable=...)``:
linen's ``Module.apply`` as it is, or an NNX module through :func:`from_nnx`.

Example (4 devices, pmap)::

  state = create_train_state(student, optax.adam(1e-3), images[:1], rng=jax.random.key(0))
  step = make_train_step(teacher_apply_fn=teacher.apply, temperature=4.0, alpha=0.9)
  state, teacher_variables = replicate(state), replicate(teacher_variables)
  for batch in batches:
    state, metrics = step(state, teacher_variables, split_for_pmap(batch))
  metrics = unreplicate(metrics)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkd.losses import check_temperature, distillation_loss, hard_cross_entropy, kd_loss

__all__ = [
  "TrainState",
  "create_train_state",
  "from_nnx",
  "make_train_step",
  "StepContext",
  "make_eval_step",
  "summarize_eval",
  "replicate",
  "unreplicate",
  "split_for_pmap",
  "make_mesh",
  "put_replicated",
  "shard_batch",
]

Parallel = Literal["pmap", "shard_map", "single"]
# (variables, images, *, train, rngs=None, mutable=False) -> logits or (logits, updated collections)
ApplyFn = Callable[..., Any]
# (student_logits, teacher_logits, labels) -> per-example loss [batch]
LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
PyTree = Any

_PARALLEL_MODES = ("pmap", "shard_map", "single")


class TrainState(train_state.TrainState):
  """Student state: params, optimizer state, BatchNorm statistics and a dropout key.

  Attributes:
    rng: typed PRNG key (``jax.random.key``); the step derives its dropout key
      as ``fold_in(fold_in(rng, step), device_index)`` and never changes it.
    batch_stats: the ``'batch_stats'`` collection of BatchNorm models, ``{}``
      for models without one.
  """

  rng: jax.Array
  batch_stats: Any = struct.field(default_factory=dict)


def _as_typed_key(rng: Any) -> jax.Array:
  """Accepts an int seed, a typed key or a legacy uint32 ``PRNGKey``."""
  if isinstance(rng, int):
    return jax.random.key(rng)
  rng = jnp.asarray(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)


def from_nnx(module: nnx.Module) -> tuple[ApplyFn, dict[str, Any]]:
  """Adapts a Flax NNX module to the functional ``apply_fn(variables, x, ...)`` convention.

  The module is split once with :func:`flax.nnx.split` into a graph definition,
  its :class:`~flax.nnx.Param` state, its :class:`~flax.nnx.BatchStat` state and
  the rest (RNG streams and any other variables). The returned ``apply_fn``
  merges them back on every call (inside the compiled step), sets train or eval
  mode, and, when ``mutable`` is given, returns the updated BatchNorm statistics
  the way linen does.

  The "rest" state is held by ``apply_fn`` as a constant: it should be small
  (RNG keys and counters). When ``rngs={'dropout': key}`` is passed every RNG
  stream of the module is reseeded from ``key``, so dropout follows the train
  step's key rather than the module's own counters.

  Args:
    module: an NNX module whose ``__call__`` takes the images and returns logits.

  Returns:
    ``(apply_fn, variables)`` with ``variables = {'params': ..., 'batch_stats': ...}``,
    usable as a student (:func:`create_train_state` calls this for NNX modules) or
    as a teacher (``teacher_apply_fn=apply_fn``, ``teacher_variables=variables``).
  """
  graphdef, params, batch_stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
  stream_tags = sorted({node.tag for _, node in nnx.iter_graph(module) if isinstance(node, nnx.RngStream)})

  def apply_fn(
    variables: Mapping[str, Any],
    images: jax.Array,
    *,
    train: bool = False,
    rngs: Mapping[str, jax.Array] | None = None,
    mutable: bool | Sequence[str] = False,
  ) -> Any:
    # copy=True: fresh Variables inside the trace; the closed-over ones must not be mutated from inside it.
    model = nnx.merge(graphdef, variables["params"], variables.get("batch_stats", batch_stats), rest, copy=True)
    if train:
      model.train()
    else:
      model.eval()
    if rngs is not None and "dropout" in rngs and stream_tags:
      nnx.reseed(model, **{tag: jax.random.fold_in(rngs["dropout"], i) for i, tag in enumerate(stream_tags)})
    logits = model(images)
    if not mutable:
      return logits
    _, _, new_batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return logits, {"batch_stats": new_batch_stats}

  return apply_fn, {"params": params, "batch_stats": batch_stats}


@functools.partial(jax.jit, static_argnums=0)
def _init_hashable(model: nn.Module, rngs: dict[str, jax.Array], example_input: jax.Array) -> dict[str, Any]:
  return model.init(rngs, example_input, train=False)


def _init_linen(model: nn.Module, rngs: dict[str, jax.Array], example_input: jax.Array) -> dict[str, Any]:
  """``model.init(..., train=False)`` under jit; equal (hashable) modules share one compiled init."""
  try:
    hash(model)
  except TypeError:  # e.g. a list-valued attribute: compile for this module alone
    return jax.jit(functools.partial(model.init, train=False))(rngs, example_input)
  return _init_hashable(model, rngs, example_input)


def create_train_state(
  model: nn.Module | nnx.Module,
  tx: optax.GradientTransformation,
  example_input: jax.typing.ArrayLike | None = None,
  *,
  rng: jax.Array | int,
) -> TrainState:
  """Initialises a student :class:`TrainState` (unreplicated, on the default device).

  Args:
    model: a linen module called as ``model.apply(variables, images, train=...)``,
      or an NNX module (already initialised; adapted with :func:`from_nnx`).
    tx: the optimizer.
    example_input: images ``[batch, H, W, C]`` for ``model.init(..., train=False)``;
      ignored for NNX modules.
    rng: a typed key (``jax.random.key``), a legacy ``PRNGKey`` or an int seed;
      split into the init key and the state's dropout key.

  Returns:
    A state with ``step`` int32 0, float32 params as initialised, ``batch_stats``
    (``{}`` without BatchNorm) and ``rng``.
  """
  init_rng, state_rng = jax.random.split(_as_typed_key(rng))
  if isinstance(model, nnx.Module):
    apply_fn, variables = from_nnx(model)
  else:
    if example_input is None:
      raise ValueError("create_train_state needs example_input to initialise a linen module.")
    params_rng, dropout_rng = jax.random.split(init_rng)
    variables = dict(_init_linen(model, {"params": params_rng, "dropout": dropout_rng}, example_input))
    apply_fn = model.apply
  unsupported = sorted(set(variables) - {"params", "batch_stats"})
  if unsupported:
    raise ValueError(
      f"only the 'params' and 'batch_stats' collections are supported, the model also has {unsupported}."
    )
  state = TrainState.create(
    apply_fn=apply_fn,
    params=variables["params"],
    tx=tx,
    rng=state_rng,
    batch_stats=variables.get("batch_stats", {}),
  )
  # A Python int step would be weakly typed under jit; a fixed int32 keeps one compiled step.
  return state.replace(step=jnp.zeros((), jnp.int32))


# ---------------------------------------------------------------------------------------------------------------------
# Placement helpers.


def replicate(tree: PyTree, devices: Sequence[jax.Device] | None = None, *, axis_name: str = "batch") -> PyTree:
  """Copies every leaf to each local device with a leading device axis, for ``pmap``.

  Each device receives its own copy directly (no ``[devices, ...]`` stack is
  built on one device first). Typed PRNG keys are supported.

  Args:
    tree: a pytree of arrays (a :class:`TrainState`, teacher variables).
    devices: defaults to ``jax.local_devices()``, the order ``pmap`` uses.
    axis_name: the step's ``axis_name``. The copies get the sharding ``pmap``
      gives its own outputs (a mesh axis of that name), so the state returned
      by the first step does not trigger a second compilation.

  Returns:
    The pytree with leaves of shape ``[len(devices), *leaf.shape]``.
  """
  devices = list(devices or jax.local_devices())
  sharding = NamedSharding(Mesh(np.array(devices), (axis_name,)), P(axis_name))

  def put(leaf: Any) -> jax.Array:
    leaf = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
    copies = [jax.device_put(leaf[None], device) for device in devices]
    return jax.make_array_from_single_device_arrays((len(devices), *leaf.shape), sharding, copies)

  return jax.tree.map(put, tree)


def unreplicate(tree: PyTree) -> PyTree:
  """Takes the first device's copy of every leaf of a ``pmap`` output or :func:`replicate` result."""

  def first(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array):
      # Reading one shard avoids gathering all copies to the host.
      return leaf.addressable_shards[0].data[0]
    return leaf[0]

  return jax.tree.map(first, tree)


def split_for_pmap(batch: PyTree, num_devices: int | None = None) -> PyTree:
  """Reshapes a flat ``[batch, ...]`` (process-local) batch to ``[devices, batch // devices, ...]``.

  Raises:
    ValueError: when the batch size does not divide over the devices.
  """
  num_devices = num_devices or jax.local_device_count()

  def split(x: Any) -> Any:
    if x.shape[0] % num_devices:
      raise ValueError(
        f"batch size {x.shape[0]} does not divide over {num_devices} devices (got an array of shape {tuple(x.shape)})."
      )
    return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])  # [devices, per_device, ...]

  return jax.tree.map(split, batch)


def make_mesh(axis_name: str = "batch", devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over all (global) devices, in process order.

  Process order makes each process's rows of the global batch a contiguous
  block, the block :func:`jaxkd.distributed.process_batch_slice` names.
  """
  return Mesh(np.array(devices or jax.devices()), (axis_name,))


def put_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
  """Replicates every leaf over ``mesh`` (``NamedSharding(mesh, P())``), for ``shard_map``.

  Works with several processes: each puts its own (identical) copy on its addressable devices.
  """
  sharding = NamedSharding(mesh, P())

  def put(leaf: Any) -> jax.Array:
    leaf = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
    # In the mesh's device order: typed PRNG keys are assembled by position, not by device.
    copies = [jax.device_put(leaf, device) for device in sharding.addressable_devices_indices_map(leaf.shape)]
    return jax.make_array_from_single_device_arrays(leaf.shape, sharding, copies)

  return jax.tree.map(put, tree)


def shard_batch(batch: PyTree, mesh: Mesh, axis_name: str = "batch") -> PyTree:
  """Assembles a global batch sharded along ``axis_name`` from each process's rows, for ``shard_map``.

  With one process ``batch`` is the whole batch; with several, each process
  passes its own contiguous rows (:func:`jaxkd.distributed.process_batch_slice`)
  and gets back the same global array.
  """
  sharding = NamedSharding(mesh, P(axis_name))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


# ---------------------------------------------------------------------------------------------------------------------
# The per-device bodies.


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What an ``objective`` hook of :func:`make_train_step` sees: one device's share of one step.

  Attributes:
    state: the student state as it entered the step.
    teacher_variables: the teacher's variables (per device), as passed to the step.
    batch: this device's batch (``'image'``, ``'label'`` and whatever else the batch holds, e.g. ``'index'``).
    images: ``batch['image']`` cast to ``compute_dtype``.
    mask: bool ``[batch]``, False marks padding (all True without ``batch['mask']``).
    global_count: float32 number of real examples in the global batch (over ``axis_name``).
    rng: the dropout key, ``fold_in(fold_in(state.rng, state.step), axis_index)``.
    axis_name: the data-parallel axis (size 1 in ``'single'`` mode).
    compute_dtype: as given to :func:`make_train_step`.
  """

  state: TrainState
  teacher_variables: Any
  batch: Mapping[str, jax.Array]
  images: jax.Array
  mask: jax.Array
  global_count: jax.Array
  rng: jax.Array
  axis_name: str
  compute_dtype: Any


# objective(params, ctx) -> (loss, aux); see make_train_step.
Objective = Callable[[PyTree, StepContext], tuple[jax.Array, Mapping[str, Any]]]


@dataclasses.dataclass(frozen=True)
class _Config:
  teacher_apply_fn: ApplyFn | None
  loss_fn: LossFn | None
  temperature: float
  axis_name: str
  compute_dtype: Any
  objective: Objective | None = None
  skip_nonfinite: bool = True


def _cast_floating(tree: PyTree, dtype: Any) -> PyTree:
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _cast_params(variables: Any, dtype: Any) -> Any:
  """Casts the 'params' collection only: BatchNorm running statistics stay in float32."""
  if dtype is None or variables is None:
    return variables
  if isinstance(variables, Mapping) and "params" in variables:
    return {**variables, "params": _cast_floating(variables["params"], dtype)}
  return _cast_floating(variables, dtype)


def _has_leaves(tree: PyTree) -> bool:
  return bool(jax.tree.leaves(tree))


def _apply_student(
  apply_fn: ApplyFn, params: PyTree, batch_stats: PyTree, images: jax.Array, *, train: bool, rng: jax.Array | None
) -> tuple[jax.Array, PyTree]:
  variables = {"params": params}
  if _has_leaves(batch_stats):
    variables["batch_stats"] = batch_stats
  rngs = {"dropout": rng} if rng is not None else None
  if train and _has_leaves(batch_stats):
    logits, updates = apply_fn(variables, images, train=True, rngs=rngs, mutable=["batch_stats"])
    # Same dtypes as before keeps the state's avals fixed: one compilation, working donation.
    new_batch_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), updates["batch_stats"], batch_stats)
    return logits, new_batch_stats
  return apply_fn(variables, images, train=train, rngs=rngs), batch_stats


def _teacher_logits(cfg: _Config, teacher_variables: Any, batch: Mapping[str, Any], images: jax.Array):
  if cfg.teacher_apply_fn is not None:
    logits = cfg.teacher_apply_fn(_cast_params(teacher_variables, cfg.compute_dtype), images, train=False)
  elif "teacher_logits" in batch:
    logits = batch["teacher_logits"]
  else:
    return None
  return jax.lax.stop_gradient(jnp.asarray(logits, jnp.float32))


def _mask(batch: Mapping[str, Any]) -> jax.Array:
  labels = batch["label"]
  return batch["mask"] if "mask" in batch else jnp.ones(labels.shape, jnp.bool_)


def _masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask, values.astype(jnp.float32), 0.0))


def _psum(tree: PyTree, axis_name: str) -> PyTree:
  """``lax.psum``, skipped on a one-device axis where the sum is the value itself.

  XLA keeps a one-participant all-reduce: it copied every gradient buffer through the collective each step
  (pmap on one device ran about 10% slower than the single-device step, benchmarks/README.md).
  """
  if jax.lax.axis_size(axis_name) == 1:
    return tree
  return jax.lax.psum(tree, axis_name)


def _inexact_pmean(tree: PyTree, axis_name: str) -> PyTree:
  if jax.lax.axis_size(axis_name) == 1:
    return tree
  return jax.tree.map(lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def _train_body(
  cfg: _Config, state: TrainState, teacher_variables: Any, batch: Mapping[str, Any]
) -> tuple[TrainState, dict[str, jax.Array]]:
  axis = cfg.axis_name
  # A constant index on a one-device axis keeps the key unbatched under the 'single' wrapper's vmap, and with it
  # the dropout masks, activations and weight gradients (measured: half the speed otherwise).
  device_index = jax.lax.axis_index(axis) if jax.lax.axis_size(axis) > 1 else 0
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), device_index)
  images = batch["image"]
  if cfg.compute_dtype is not None:
    images = images.astype(cfg.compute_dtype)
  labels = batch["label"]
  mask = _mask(batch)
  # Normalising by the global count of real examples makes the psum'd gradient the gradient of the
  # global mean: a pmean of per-device means when every device holds the same number of examples.
  global_count = _psum(jnp.sum(mask, dtype=jnp.float32), axis)
  if cfg.objective is None:
    teacher_logits = _teacher_logits(cfg, teacher_variables, batch, images)

    def objective(params: PyTree) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
      # Casting here, inside the differentiated function, gives float32 gradients for float32 master params.
      params = _cast_floating(params, cfg.compute_dtype)
      logits, new_batch_stats = _apply_student(state.apply_fn, params, state.batch_stats, images, train=True, rng=rng)
      logits = logits.astype(jnp.float32)
      if teacher_logits is None:
        per_example = hard_cross_entropy(logits, labels)
      else:
        per_example = cfg.loss_fn(logits, teacher_logits, labels)
      if per_example.shape != labels.shape:
        raise ValueError(
          f"loss_fn must return a per-example loss of shape {tuple(labels.shape)} (the labels' shape), "
          f"got {tuple(per_example.shape)}."
        )
      return _masked_sum(per_example, mask) / global_count, (logits, new_batch_stats)

    (local_loss, (logits, new_batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    new_batch_stats = _inexact_pmean(new_batch_stats, axis)
    extra_sums = {}
  else:
    ctx = StepContext(state, teacher_variables, batch, images, mask, global_count, rng, axis, cfg.compute_dtype)
    (local_loss, aux), grads = jax.value_and_grad(cfg.objective, has_aux=True)(state.params, ctx)
    logits = aux["logits"].astype(jnp.float32)
    teacher_logits = aux.get("teacher_logits")
    new_batch_stats = aux["batch_stats"]  # already reduced over the axis by the objective
    extra_sums = dict(aux.get("metrics", {}))
  grads = _psum(grads, axis)
  loss = _psum(local_loss, axis)
  if cfg.skip_nonfinite:
    grad_norm = optax.tree.norm(grads)
    # Every device sees the same psum'd loss and gradients, so all take the same decision.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # lax.cond rather than jnp.where: a select keeps the old params and optimizer state alive beside the new
    # ones, so XLA copied them every step (benchmarks/README.md); the conditional updates donated buffers in place.
    new_state = jax.lax.cond(
      finite,
      lambda s: s.apply_gradients(grads=grads, batch_stats=new_batch_stats),
      lambda s: s.replace(step=s.step + 1),
      state,
    )
  else:
    # No gradient norm: it is a full extra pass over the gradients, which is what the guard costs (5% of a
    # batch-32 MLP step on 2 CPU cores, benchmarks/README.md). The loss check is a scalar and stays.
    grad_norm = None
    finite = jnp.isfinite(loss)
    new_state = state.apply_gradients(grads=grads, batch_stats=new_batch_stats)

  predictions = jnp.argmax(logits, axis=-1)
  sums = {
    "ce": _masked_sum(hard_cross_entropy(logits, labels), mask),
    "accuracy": _masked_sum(predictions == labels, mask),
  }
  if teacher_logits is not None:
    teacher_predictions = jnp.argmax(teacher_logits, axis=-1)
    sums["kd_loss"] = _masked_sum(kd_loss(logits, teacher_logits, cfg.temperature), mask)
    sums["teacher_accuracy"] = _masked_sum(teacher_predictions == labels, mask)
    sums["agreement"] = _masked_sum(predictions == teacher_predictions, mask)
  metrics = jax.tree.map(lambda s: s / global_count, _psum(sums, axis))
  metrics.update(_psum(extra_sums, axis))
  metrics["loss"] = loss
  if grad_norm is not None:
    metrics["grad_norm"] = grad_norm
  metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
  return new_state, metrics


def _eval_body(
  cfg: _Config, state: TrainState, teacher_variables: Any, batch: Mapping[str, Any]
) -> dict[str, jax.Array]:
  images = batch["image"]
  if cfg.compute_dtype is not None:
    images = images.astype(cfg.compute_dtype)
  labels = batch["label"]
  mask = _mask(batch)
  params = _cast_floating(state.params, cfg.compute_dtype)
  logits, _ = _apply_student(state.apply_fn, params, state.batch_stats, images, train=False, rng=None)
  logits = logits.astype(jnp.float32)
  teacher_logits = _teacher_logits(cfg, teacher_variables, batch, images)
  predictions = jnp.argmax(logits, axis=-1)
  sums = {
    "count": jnp.sum(mask, dtype=jnp.int32),
    "correct": jnp.sum(mask & (predictions == labels), dtype=jnp.int32),
    "ce_sum": _masked_sum(hard_cross_entropy(logits, labels), mask),
  }
  if teacher_logits is not None:
    teacher_predictions = jnp.argmax(teacher_logits, axis=-1)
    sums["teacher_correct"] = jnp.sum(mask & (teacher_predictions == labels), dtype=jnp.int32)
    sums["agreement"] = jnp.sum(mask & (predictions == teacher_predictions), dtype=jnp.int32)
    sums["kd_loss_sum"] = _masked_sum(kd_loss(logits, teacher_logits, cfg.temperature), mask)
  return _psum(sums, cfg.axis_name)


def summarize_eval(sums: Mapping[str, jax.typing.ArrayLike]) -> dict[str, float]:
  """Turns (accumulated) eval sums into means over the real examples.

  Accumulate the per-batch results of :func:`make_eval_step` first, e.g. with
  ``total = jax.tree.map(operator.add, total, sums)`` (``unreplicate`` them in pmap mode).

  Returns:
    ``accuracy``, ``ce`` and, when a teacher was used, ``teacher_accuracy``,
    ``agreement`` and ``kd_loss``, as Python floats; plus ``count``.
  """
  count = float(np.asarray(sums["count"]))
  denominator = max(count, 1.0)  # An empty eval set reports zeros rather than NaN.
  means = {
    "count": count,
    "accuracy": float(np.asarray(sums["correct"])) / denominator,
    "ce": float(np.asarray(sums["ce_sum"])) / denominator,
  }
  if "teacher_correct" in sums:
    means["teacher_accuracy"] = float(np.asarray(sums["teacher_correct"])) / denominator
    means["agreement"] = float(np.asarray(sums["agreement"])) / denominator
    means["kd_loss"] = float(np.asarray(sums["kd_loss_sum"])) / denominator
  return means


# ---------------------------------------------------------------------------------------------------------------------
# Wrapping and host-side input checks.


def _wrap(body: Callable, parallel: str, axis_name: str, mesh: Mesh | None, donate: bool) -> Callable:
  donate_argnums = (0,) if donate else ()
  if parallel == "pmap":
    return jax.pmap(body, axis_name=axis_name, donate_argnums=donate_argnums)
  if parallel == "shard_map":
    # check_vma=False keeps pmap's semantics for the explicit collectives: with check_vma=True, autodiff
    # already sums the gradients of replicated params over the axis, and the body's psum would count them twice.
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(axis_name)), out_specs=P(), check_vma=False)
    return jax.jit(mapped, donate_argnums=donate_argnums)

  def single(state, teacher_variables, batch):
    # vmap over a dummy axis of size 1 names the axis for the collectives (and synchronised BatchNorm). The
    # state and batch are not mapped: mapping the batch turned every weight gradient into a batched dot with a
    # batch axis of 1, plus transposes and copies (about half the speed of the plain step on CPU).
    def unmapped(_, state, teacher_variables, batch):
      return body(state, teacher_variables, batch)

    out = jax.vmap(unmapped, in_axes=(0, None, None, None), axis_name=axis_name, axis_size=1)(
      jnp.zeros((1,), jnp.int32), state, teacher_variables, batch
    )
    return jax.tree.map(lambda x: x[0], out)

  return jax.jit(single, donate_argnums=donate_argnums)


def _shape_struct(x: Any, drop_leading: int = 0, batch: int | None = None) -> jax.ShapeDtypeStruct:
  shape = tuple(np.shape(x))[drop_leading:]
  if batch is not None:
    shape = (batch, *shape[1:])
  return jax.ShapeDtypeStruct(shape, x.dtype)


class _Checker:
  """Validates inputs on the host before the first compilation, with messages that name the sizes.

  Shapes of the model outputs come from ``jax.eval_shape`` (no FLOPs) and are cached
  per model and input shape, so later steps only compare tuples.
  """

  def __init__(self, cfg: _Config, parallel: str, mesh: Mesh | None):
    self.cfg = cfg
    self.parallel = parallel
    self.mesh = mesh
    self._cache: dict[Any, Any] = {}
    self._passed: dict[Any, int] = {}  # batch signature -> number of classes, for signatures already checked

  def _num_shards(self) -> int:
    if self.parallel == "pmap":
      return jax.local_device_count()
    if self.parallel == "shard_map":
      return self.mesh.shape[self.cfg.axis_name]
    return 1

  def _per_device(self, tree: Any, *, replicated: bool) -> Any:
    """Per-device abstract values of a pytree of arrays."""
    if self.parallel == "pmap":
      return jax.tree.map(lambda x: _shape_struct(x, drop_leading=1), tree)
    if self.parallel == "shard_map" and not replicated:
      return jax.tree.map(lambda x: _shape_struct(x, batch=x.shape[0] // self._num_shards()), tree)
    return jax.tree.map(_shape_struct, tree)

  def _check_layout(self, state: TrainState, teacher_variables: Any, batch: Mapping[str, Any]) -> None:
    n = self._num_shards()
    for key, value in batch.items():
      shape = tuple(np.shape(value))
      if self.parallel == "pmap":
        if not shape or shape[0] != n:
          raise ValueError(
            f"pmap needs batch['{key}'] laid out [local_devices={n}, per_device_batch, ...], got shape {shape}; "
            f"use split_for_pmap(batch)."
          )
      elif not shape:
        raise ValueError(f"batch['{key}'] must have a leading batch axis, got a scalar.")
      elif self.parallel == "shard_map" and shape[0] % n:
        raise ValueError(
          f"batch size {shape[0]} of batch['{key}'] does not divide over the {n} devices of mesh axis "
          f"'{self.cfg.axis_name}'."
        )
    sizes = {k: np.shape(v)[: 2 if self.parallel == "pmap" else 1] for k, v in batch.items()}
    if len(set(sizes.values())) > 1:
      raise ValueError(f"all batch entries must have the same leading (batch) axes, got {sizes}.")
    if self.parallel == "pmap":
      # The fast path runs every step; the loop below only finds the offending leaf for the message.
      leaves = jax.tree.leaves((state, teacher_variables))
      if all(getattr(leaf, "ndim", 0) and leaf.shape[0] == n for leaf in leaves):
        return
      for name, tree in (("state", state), ("teacher_variables", teacher_variables)):
        for leaf in jax.tree.leaves(tree):
          if not np.shape(leaf) or np.shape(leaf)[0] != n:
            raise ValueError(
              f"pmap needs {name} replicated over the {n} local devices (leading axis {n}), got a leaf of shape "
              f"{tuple(np.shape(leaf))}; use replicate({name})."
            )

  def _student_logits(self, state: TrainState, images: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    key = ("student", id(state.apply_fn), images.shape, images.dtype)
    if key not in self._cache:
      params = self._per_device(state.params, replicated=True)
      batch_stats = self._per_device(state.batch_stats, replicated=True)
      apply = functools.partial(_apply_student, state.apply_fn, train=False, rng=None)
      self._cache[key] = jax.eval_shape(lambda p, b, x: apply(p, b, x)[0], params, batch_stats, images)
    return self._cache[key]

  def _teacher_logits(self, teacher_variables: Any, images: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    key = ("teacher", images.shape, images.dtype)
    if key not in self._cache:
      variables = self._per_device(teacher_variables, replicated=True)
      apply = functools.partial(self.cfg.teacher_apply_fn, train=False)
      self._cache[key] = jax.eval_shape(apply, variables, images)
    return self._cache[key]

  def __call__(self, state: TrainState, teacher_variables: Any, batch: Mapping[str, Any]) -> None:
    if not isinstance(batch, Mapping) or "image" not in batch or "label" not in batch:
      keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
      raise ValueError(f"a batch must be a dict with 'image' and 'label' (optionally 'teacher_logits', 'mask'): {keys}")
    if self.cfg.teacher_apply_fn is not None and "teacher_logits" in batch:
      raise ValueError(
        "got both teacher_apply_fn and batch['teacher_logits']: use one source of teacher logits "
        "(drop the cached logits from the batch, or make the step with teacher_apply_fn=None)."
      )
    if self.cfg.teacher_apply_fn is not None and not _has_leaves(teacher_variables):
      raise ValueError("teacher_apply_fn is set but teacher_variables is empty: pass the teacher's variables.")
    self._check_layout(state, teacher_variables, batch)
    labels = batch["label"]
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise TypeError(f"batch['label'] must hold integer class indices, got dtype {labels.dtype}.")
    if "mask" in batch:
      if batch["mask"].dtype != jnp.bool_:
        raise TypeError(f"batch['mask'] must be boolean (False = padding), got dtype {batch['mask'].dtype}.")
      if np.shape(batch["mask"]) != np.shape(labels):
        raise ValueError(
          f"batch['mask'] must have the labels' shape {tuple(np.shape(labels))}, got {tuple(np.shape(batch['mask']))}."
        )

    # Model-output shapes depend only on the batch's shapes and the models: check each signature once.
    signature = (id(state.apply_fn), tuple((k, np.shape(v), np.dtype(v.dtype)) for k, v in batch.items()))
    if signature in self._passed:
      self._check_label_range(labels, batch, self._passed[signature])
      return
    per_device = self._per_device(dict(batch), replicated=False)
    logits = self._student_logits(state, per_device["image"])
    label_shape = tuple(per_device["label"].shape)
    if tuple(logits.shape[:-1]) != label_shape:
      raise ValueError(
        f"student logits of shape {tuple(logits.shape)} (per device) do not match labels of shape "
        f"{label_shape}: expected logits [..., num_classes] with leading axes equal to the labels' shape."
      )
    num_classes = logits.shape[-1]
    if self.cfg.teacher_apply_fn is not None:
      teacher = self._teacher_logits(teacher_variables, per_device["image"])
      if tuple(teacher.shape) != tuple(logits.shape):
        raise ValueError(
          f"student and teacher disagree: student logits {tuple(logits.shape)} ({num_classes} classes), "
          f"teacher logits {tuple(teacher.shape)} ({teacher.shape[-1]} classes)."
        )
    elif "teacher_logits" in batch:
      cached = tuple(per_device["teacher_logits"].shape)
      if cached != tuple(logits.shape):
        raise ValueError(
          f"batch['teacher_logits'] of shape {cached} (per device) does not match the student logits "
          f"{tuple(logits.shape)} ({num_classes} classes)."
        )

    self._passed[signature] = num_classes
    self._check_label_range(labels, batch, num_classes)

  @staticmethod
  def _check_label_range(labels: Any, batch: Mapping[str, Any], num_classes: int) -> None:
    # Only host (NumPy) labels are range-checked: checking device arrays would block on a device-to-host copy
    # every step. An out-of-range label on device makes its cross-entropy NaN (the gather fills with NaN), so a
    # train step skips the update and reports nonfinite=1; negative labels on device index from the end.
    if isinstance(labels, np.ndarray) and labels.size:
      real = labels[np.asarray(batch["mask"])] if "mask" in batch else labels
      if real.size and (real.min() < 0 or real.max() >= num_classes):
        raise ValueError(
          f"labels must be in [0, num_classes={num_classes}), got values in [{real.min()}, {real.max()}]."
        )


def _check_parallel(parallel: str, axis_name: str, mesh: Mesh | None) -> Mesh | None:
  if parallel not in _PARALLEL_MODES:
    raise ValueError(f"parallel must be one of {_PARALLEL_MODES}, got {parallel!r}.")
  if parallel != "shard_map":
    return None
  mesh = mesh if mesh is not None else make_mesh(axis_name)
  if tuple(mesh.axis_names) != (axis_name,):
    raise ValueError(f"shard_map needs a 1-D mesh with axis {axis_name!r}, got axes {tuple(mesh.axis_names)}.")
  return mesh


def make_train_step(
  *,
  teacher_apply_fn: ApplyFn | None = None,
  loss_fn: LossFn | None = None,
  temperature: float = 1.0,
  alpha: float = 0.5,
  parallel: Parallel = "pmap",
  axis_name: str = "batch",
  mesh: Mesh | None = None,
  compute_dtype: Any = None,
  donate: bool = True,
  objective: Objective | None = None,
  skip_nonfinite: bool = True,
) -> Callable[[TrainState, Any, Mapping[str, Any]], tuple[TrainState, dict[str, jax.Array]]]:
  r"""Builds the compiled distillation step ``step(state, teacher_variables, batch) -> (state, metrics)``.

  Where the teacher logits come from, decided by the batch's structure at trace time:

  * ``teacher_apply_fn`` given: the teacher runs inside the step on the same
    images as the student, in eval mode (``train=False``, nothing mutable),
    under ``stop_gradient``. ``teacher_variables`` is an argument, never a
    closed-over constant, so the executable does not embed the teacher.
  * ``teacher_apply_fn=None`` and ``'teacher_logits'`` in the batch: offline
    distillation from cached logits.
  * ``teacher_apply_fn=None`` and no ``'teacher_logits'``: plain cross-entropy
    on the labels (training a teacher, or a student from scratch); ``loss_fn``,
    ``alpha`` and ``teacher_variables`` (pass ``None``) are unused.

  Giving both a ``teacher_apply_fn`` and cached logits is a ValueError.

  The per-example loss is averaged over the real examples (``'mask'``, when
  present) of the global batch. Gradients and the loss are summed over
  ``axis_name`` after normalising by the global example count (the same as a
  pmean of per-device means), BatchNorm statistics are pmean'd. Padding rows
  still pass through the model, so they do enter per-batch BatchNorm
  statistics; a batch with no real example has a NaN loss and is skipped.
  The dropout key is ``fold_in(fold_in(state.rng, state.step), axis_index)``:
  reproducible, different on every device and every step.

  A non-finite loss or gradient norm skips the update: params, optimizer state
  and BatchNorm statistics stay as they were, ``step`` still advances (so the
  next step draws fresh dropout and schedules keyed on ``state.step`` move on;
  the optimizer's own counters do not), and ``metrics['nonfinite']`` is 1.
  The check costs one pass over the gradients (their global norm) and makes the
  update wait for all of them; ``skip_nonfinite=False`` drops it.

  Bad inputs raise ValueError/TypeError on the host before anything compiles:
  layout not matching ``parallel``, batch size not dividing over the mesh,
  student/teacher class counts differing, logits not matching the labels, and
  labels outside ``[0, num_classes)`` when they are NumPy arrays (device arrays
  are not range-checked, to avoid a blocking copy each step; an out-of-range
  label there makes the loss NaN, so the update is skipped and reported as
  ``nonfinite``).

  Args:
    teacher_apply_fn: ``apply(teacher_variables, images, train=False) -> logits``,
      e.g. ``teacher_model.apply``; None for cached logits or cross-entropy.
    loss_fn: ``(student_logits, teacher_logits, labels) -> [batch]`` per-example loss;
      defaults to :func:`jaxkd.losses.distillation_loss` with ``temperature`` and ``alpha``.
    temperature: :math:`T` of the default loss and of the ``kd_loss`` metric.
    alpha: weight of the soft term in the default loss.
    parallel: ``'pmap'``, ``'shard_map'`` or ``'single'`` (see the module docstring).
    axis_name: the data-parallel axis name; also what synchronised BatchNorm layers should name.
    mesh: for ``'shard_map'``, a 1-D mesh with axis ``axis_name``; defaults to :func:`make_mesh`.
    compute_dtype: e.g. ``jnp.bfloat16``: student and teacher params and the images are cast to
      it inside the step (the params inside the differentiated function, so float32 master params get
      float32 gradients); logits, loss and metrics stay float32. A module's own ``dtype`` attribute still
      decides the dtype its layers compute in.
    donate: donate the input state's buffers to the output (``donate_argnums=0``).
    objective: a hook that replaces the per-device loss (what :mod:`jaxkd.methods` plugs in); ``loss_fn`` and
      ``alpha`` are then unused, and ``teacher_apply_fn`` only serves the input checks. Called as
      ``objective(state.params, ctx)`` with a :class:`StepContext` and differentiated with respect to the params,
      it returns ``(loss, aux)``: ``loss`` is this device's contribution, whose sum over ``axis_name`` is the
      global loss (e.g. a masked sum of per-example losses divided by ``ctx.global_count``); ``aux`` holds
      ``'logits'`` (the student's, ``[batch, num_classes]``), ``'teacher_logits'`` (or None), ``'batch_stats'``
      (the new ``state.batch_stats``, already reduced over ``axis_name`` as the objective sees fit) and optionally
      ``'metrics'``: per-device contributions, summed over ``axis_name`` into extra entries of ``metrics``. The
      rest of the step (gradient psum, the non-finite skip, the update, the standard metrics) is unchanged.
    skip_nonfinite: skip the update of a step whose loss or gradient norm is not finite (above). False applies
      every update as a hand-written step does: no ``grad_norm`` metric, ``nonfinite`` then only checks the loss
      and a non-finite step does change the state (usually to NaN). Saves a pass over the gradients: measured
      5% of the step rate for the MLP pair at batch 32 on 2 CPU cores, 1% at 128, nothing measurable at 512
      (benchmarks/README.md). Given such a step, :func:`jaxkd.trainer.fit` stops at its first non-finite step.

  Returns:
    ``step(state, teacher_variables, batch) -> (state, metrics)``. ``metrics`` holds float32 scalars
    (per device in pmap mode, identical on every device): ``loss``, ``ce`` (hard-label cross-entropy),
    ``accuracy``, ``grad_norm`` (global L2 norm of the reduced gradient; not with ``skip_nonfinite=False``),
    ``nonfinite``; with a teacher ``kd_loss``
    (:math:`T^2`-scaled KL, unweighted), ``teacher_accuracy`` and ``agreement`` (student/teacher top-1).
  """
  check_temperature(temperature)
  if isinstance(alpha, int | float) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
  mesh = _check_parallel(parallel, axis_name, mesh)
  if loss_fn is None:
    loss_fn = functools.partial(distillation_loss, temperature=temperature, alpha=alpha)
  cfg = _Config(teacher_apply_fn, loss_fn, temperature, axis_name, compute_dtype, objective, skip_nonfinite)
  compiled = _wrap(functools.partial(_train_body, cfg), parallel, axis_name, mesh, donate)
  check = _Checker(cfg, parallel, mesh)

  def step(
    state: TrainState, teacher_variables: Any, batch: Mapping[str, Any]
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    check(state, teacher_variables, batch)
    return compiled(state, teacher_variables, dict(batch))

  # fit() reads this to tell a skipped non-finite step from an applied one.
  step.skip_nonfinite = skip_nonfinite
  return step


def make_eval_step(
  *,
  teacher_apply_fn: ApplyFn | None = None,
  temperature: float = 1.0,
  parallel: Parallel = "pmap",
  axis_name: str = "batch",
  mesh: Mesh | None = None,
  compute_dtype: Any = None,
) -> Callable[[TrainState, Any, Mapping[str, Any]], dict[str, jax.Array]]:
  """Builds ``eval(state, teacher_variables, batch) -> sums`` over the real examples of a batch.

  The student (and teacher) run in eval mode. Only examples with ``mask`` True
  (all, without a mask) count, and the sums are psum'd over ``axis_name``, so a
  padded final batch counts each real example exactly once. Teacher logits come
  from ``teacher_apply_fn``, else ``batch['teacher_logits']``, else there is no
  teacher and the teacher entries are absent.

  Args:
    teacher_apply_fn: as in :func:`make_train_step`.
    temperature: :math:`T` of the ``kd_loss_sum`` entry.
    parallel: ``'pmap'``, ``'shard_map'`` or ``'single'``.
    axis_name: the data-parallel axis name.
    mesh: for ``'shard_map'``; defaults to :func:`make_mesh`.
    compute_dtype: as in :func:`make_train_step`.

  Returns:
    ``eval(state, teacher_variables, batch)`` returning ``count``, ``correct`` (int32) and ``ce_sum``; with a
    teacher also ``teacher_correct``, ``agreement`` (int32) and ``kd_loss_sum``. Sum them over batches and
    turn them into means with :func:`summarize_eval`.
  """
  check_temperature(temperature)
  mesh = _check_parallel(parallel, axis_name, mesh)
  cfg = _Config(teacher_apply_fn, None, temperature, axis_name, compute_dtype)
  compiled = _wrap(functools.partial(_eval_body, cfg), parallel, axis_name, mesh, donate=False)
  check = _Checker(cfg, parallel, mesh)

  def evaluate(state: TrainState, teacher_variables: Any, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    check(state, teacher_variables, batch)
    return compiled(state, teacher_variables, dict(batch))

  return evaluate
