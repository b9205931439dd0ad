"""Where the train and eval steps run: one object that owns devices, layouts and the way back to the host.

A :class:`Placement` is made once and handed to :func:`jaxkd.make_train_step` (and through the step to
:func:`jaxkd.training.fit` and the experiments). Nothing else in jaxkd branches on how the step is parallelised.
It is built on a :class:`jax.sharding.Mesh` with a data-parallel axis (``'data'`` by default):

* :meth:`Placement.data_parallel` (the default): ``jax.jit`` of ``jax.shard_map`` over a 1-D mesh of every
  device of every process. Batches are global arrays sharded along ``'data'``; state and teacher are replicated
  (``NamedSharding(mesh, P())``).
* :meth:`Placement.single`: the same on a one-device mesh. It is not a separate code path: the collectives see an
  axis of size one (and are skipped, see :func:`psum`).
* :meth:`Placement.pmap`: ``jax.pmap`` over this process's devices, the design's pmap-sharded step. State and
  teacher carry a leading device axis (:meth:`put` does that), batches are split ``[devices, per_device, ...]``.
* :meth:`Placement.sharded`: a 2-D mesh ``('data', 'model')``. Batches are split along ``'data'`` as above;
  :meth:`put` splits parameters (and optimizer states) over ``'model'`` by partition rules
  (:mod:`jaxkd.sharding`: FSDP-style by default), optionally casting them (a frozen teacher in bfloat16). The
  step is ``jax.shard_map`` manual over ``'data'`` only: inside the body the model axis is automatic, so XLA
  gathers each split weight where it is used and every device holds ``1/model`` of each split array. Outputs keep
  the state's shardings, so the step compiles once.

Every mode takes the same inputs: a flat batch ``{key: [batch, ...]}`` of this process's rows (NumPy or JAX arrays),
the state and teacher variables placed with :meth:`put`; :meth:`to_host` brings results back. The per-device step
body sees ``[per_device_batch, ...]`` and the named axis ``data_axis`` in all three, so pmap, shard_map and one
device give the same numbers on the same global batch (up to float rounding), with two exceptions that come from
the model, not the step: BatchNorm layers that do not name ``data_axis`` keep per-device statistics, and dropout
draws a different key on each device (``fold_in(key, device index)``), so a model with dropout sees other masks
when the batch is split differently.

Default and why: ``data_parallel`` runs through ``jax.jit``, which is where JAX is developed (``pmap`` is in
maintenance mode and is itself built on ``jit`` + ``shard_map``), takes multi-process global arrays directly, and
has room for a ``'model'`` mesh axis; on one device it is the one-device mesh. The step speed of both is in
benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkd import sharding as sharding_lib

__all__ = ["Placement", "as_placement", "empty_batch_error", "psum", "pmean_inexact"]

PyTree = Any


def psum(tree: PyTree, axis_name: str) -> PyTree:
  """``lax.psum``, skipped on a one-device axis where the sum is the value itself.

  XLA keeps a one-participant all-reduce: it copied every gradient buffer through the collective each step
  (pmap on one device ran about 10% slower than the single-device step, benchmarks/README.md).
  """
  if jax.lax.axis_size(axis_name) == 1:
    return tree
  return jax.lax.psum(tree, axis_name)


def pmean_inexact(tree: PyTree, axis_name: str) -> PyTree:
  """``lax.pmean`` of the floating leaves (BatchNorm statistics), skipped on a one-device axis."""
  if jax.lax.axis_size(axis_name) == 1:
    return tree
  return jax.tree.map(lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def _host_array(leaf: Any) -> Any:
  return leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)


class Placement:
  """Devices and layouts of a step: how it is compiled, where state and batches go, how results come back.

  Make one with :meth:`data_parallel` (default), :meth:`single` or :meth:`pmap`.

  Attributes:
    mesh: the device mesh: ``(data_axis,)``, or ``(data_axis, model_axis)`` for :meth:`sharded`.
    data_axis: the data-parallel axis name; synchronised BatchNorm layers should name it.
    model_axis: the axis parameters are split over (None: every device holds whole copies).
    rules: the default partition rules of :meth:`put` (None: FSDP-style, see :mod:`jaxkd.sharding`).
    use_pmap: True for the ``jax.pmap`` adapter.
  """

  def __init__(
    self,
    mesh: Mesh,
    *,
    data_axis: str = "data",
    model_axis: str | None = None,
    rules: sharding_lib.Rules | None = None,
    use_pmap: bool = False,
  ):
    expected = (data_axis,) if model_axis is None else (data_axis, model_axis)
    if tuple(mesh.axis_names) != expected:
      raise ValueError(
        f"a Placement needs a mesh with axes {expected} (data axis {data_axis!r}"
        + (f", model axis {model_axis!r}" if model_axis else "")
        + f"), got axes {tuple(mesh.axis_names)}."
      )
    if use_pmap and model_axis is not None:
      raise ValueError("pmap replicates parameters on every device; use Placement.sharded for a model axis.")
    if use_pmap and any(d.process_index != jax.process_index() for d in mesh.devices.flat):
      raise ValueError("a pmap Placement holds this process's devices only (pmap joins the processes itself).")
    self.mesh = mesh
    self.data_axis = data_axis
    self.model_axis = model_axis
    self.rules = rules
    self.use_pmap = use_pmap
    self._replicated = NamedSharding(mesh, P())
    self._sharded = NamedSharding(mesh, P(data_axis))

  # --------------------------------------------------------------------------------------------------- constructors

  @classmethod
  def data_parallel(cls, devices: Sequence[jax.Device] | None = None, *, data_axis: str = "data") -> Placement:
    """``jit`` + ``shard_map`` over all devices of all processes, in process order.

    Process order makes each process's rows of the global batch a contiguous block, the block
    :func:`jaxkd.distributed.process_batch_slice` names.
    """
    return cls(Mesh(np.array(devices or jax.devices()), (data_axis,)), data_axis=data_axis)

  @classmethod
  def single(cls, device: jax.Device | None = None, *, data_axis: str = "data") -> Placement:
    """One device (the default device unless given): a one-device mesh."""
    return cls(Mesh(np.array([device or jax.local_devices()[0]]), (data_axis,)), data_axis=data_axis)

  @classmethod
  def pmap(cls, devices: Sequence[jax.Device] | None = None, *, data_axis: str = "data") -> Placement:
    """``jax.pmap`` over this process's devices (default: all local devices)."""
    return cls(Mesh(np.array(devices or jax.local_devices()), (data_axis,)), data_axis=data_axis, use_pmap=True)

  @classmethod
  def sharded(
    cls,
    model: int,
    *,
    devices: Sequence[jax.Device] | None = None,
    rules: sharding_lib.Rules | None = None,
    data_axis: str = "data",
    model_axis: str = "model",
  ) -> Placement:
    """A ``(data, model)`` mesh of all devices (default) with ``model`` devices per model group.

    Consecutive devices form a model group, so with several processes each group stays within one process's
    devices (the fast links) when ``model`` divides a process's device count. ``rules`` are the default partition
    rules of :meth:`put` (None: FSDP-style, :mod:`jaxkd.sharding`).
    """
    devices = list(devices or jax.devices())
    if not isinstance(model, int) or model < 1 or len(devices) % model:
      raise ValueError(
        f"model={model!r} must be an int >= 1 that divides the {len(devices)} devices; the data axis gets the rest."
      )
    mesh = Mesh(np.array(devices).reshape(len(devices) // model, model), (data_axis, model_axis))
    return cls(mesh, data_axis=data_axis, model_axis=model_axis, rules=rules)

  def __repr__(self) -> str:
    if self.model_axis is not None:
      return (
        f"Placement.sharded({self.data_size} x {self.mesh.shape[self.model_axis]} devices, "
        f"axes=({self.data_axis!r}, {self.model_axis!r}))"
      )
    kind = "pmap" if self.use_pmap else ("single" if self.mesh.size == 1 else "data_parallel")
    return f"Placement.{kind}({self.mesh.size} devices, data_axis={self.data_axis!r})"

  # ------------------------------------------------------------------------------------------------------- sizes

  @property
  def local_devices(self) -> list[jax.Device]:
    """This process's devices of the mesh, in mesh order."""
    return [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]

  @property
  def data_size(self) -> int:
    """How many ways a global batch is split (the data axis's size)."""
    return int(self.mesh.shape[self.data_axis])

  @property
  def local_shards(self) -> int:
    """How many ways this process's rows of a batch are split (its devices' distinct places on the data axis)."""
    if self.model_axis is None:
      return len(self.local_devices)
    data_dim = self.mesh.axis_names.index(self.data_axis)
    local = {
      index[data_dim]
      for index in np.ndindex(self.mesh.devices.shape)
      if self.mesh.devices[index].process_index == jax.process_index()
    }
    return len(local)

  # --------------------------------------------------------------------------------------------------- compiling

  def wrap(
    self,
    body: Callable,
    *,
    donate_state: bool,
    batched_argnums: Sequence[int] = (2,),
    stacked: bool = False,
    returns_state: bool = False,
  ) -> Callable:
    """Compiles the per-device ``body(*args)``: arguments in ``batched_argnums`` are split along the data axis
    (their axis 1 when ``stacked``: ``[steps, batch, ...]``), the others replicated; outputs are replicated
    (identical on every device). With a model axis, non-batched arguments keep the shardings :meth:`put` gave them
    and, when ``returns_state``, the body's first output (the new state) keeps the first argument's."""
    batched = set(batched_argnums)
    batch_spec = P(None, self.data_axis) if stacked else P(self.data_axis)
    donate = (0,) if donate_state else ()
    if self.use_pmap:
      # With several processes pmap must span every process's devices (devices=None), or its collectives would
      # only reduce within each process; each process still feeds its own local devices.
      devices = None if jax.process_count() > 1 else self.local_devices
      return jax.pmap(body, axis_name=self.data_axis, devices=devices, donate_argnums=donate)

    def compiled(*args: Any) -> Any:
      specs = tuple(batch_spec if i in batched else P() for i in range(len(args)))
      # check_vma=False keeps pmap's semantics for the body's explicit collectives: with check_vma=True autodiff
      # already sums the gradients of replicated params over the axis, and the body's psum would count them twice.
      # With a model axis only the data axis is manual: the model axis stays XLA's, which gathers split weights.
      manual = frozenset({self.data_axis}) if self.model_axis is not None else frozenset()
      mapped = jax.shard_map(body, mesh=self.mesh, in_specs=specs, out_specs=P(), axis_names=manual, check_vma=False)
      return mapped(*args)

    if self.model_axis is None:
      return jax.jit(compiled, donate_argnums=donate)
    return _KeepStateSharding(compiled, donate, self._replicated, returns_state)

  # --------------------------------------------------------------------------------------------------- placing

  def put(self, tree: PyTree, *, rules: sharding_lib.Rules | None = None, dtype: Any = None) -> PyTree:
    """Places state or teacher variables on the placement's devices (always a copy).

    pmap: every leaf gets a leading axis of size ``local_shards``; with a model axis, each leaf is split by the
    partition rules (``rules``, else the placement's, else FSDP-style; :mod:`jaxkd.sharding`); otherwise
    ``NamedSharding(mesh, P())``. Each device receives its own copy directly (no stack is built on one device
    first); typed PRNG keys work.

    Args:
      tree: a train state or variables, on the host or on devices.
      rules: partition rules for this tree (a model axis only).
      dtype: cast floating leaves to this dtype first, e.g. ``jnp.bfloat16`` for a frozen teacher (which keeps no
        optimizer state; a student's state keeps its float32 master weights).
    """
    if rules is not None and self.model_axis is None:
      raise ValueError(f"partition rules need a model axis; {self!r} has none (use Placement.sharded).")
    if dtype is not None:
      tree = jax.tree.map(lambda x: _cast_floating(x, dtype), tree)
    if self.model_axis is not None:
      return self._put_sharded(tree, rules if rules is not None else self.rules)
    if self.use_pmap:
      devices = self.local_devices
      sharding = NamedSharding(Mesh(np.array(devices), (self.data_axis,)), P(self.data_axis))

      def put_stacked(leaf: Any) -> jax.Array:
        leaf = _host_array(leaf)
        copies = [jax.device_put(leaf[None], device) for device in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *leaf.shape), sharding, copies)

      return jax.tree.map(put_stacked, tree)

    def put_replicated(leaf: Any) -> jax.Array:
      leaf = _host_array(leaf)
      # In the mesh's device order: typed PRNG keys are assembled by position, not by device. A fresh copy on
      # each device also keeps the caller's arrays alive when the step donates the placed ones.
      devices = self._replicated.addressable_devices_indices_map(leaf.shape)
      copies = [jax.device_put(leaf, device, may_alias=False) for device in devices]
      return jax.make_array_from_single_device_arrays(leaf.shape, self._replicated, copies)

    return jax.tree.map(put_replicated, tree)

  def _put_sharded(self, tree: PyTree, rules: sharding_lib.Rules | None) -> PyTree:
    specs = sharding_lib.partition_specs(
      tree, axis_sizes=dict(self.mesh.shape), model_axis=self.model_axis, rules=rules
    )

    def put_leaf(leaf: Any, spec: P) -> jax.Array:
      leaf = _host_array(leaf)
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        devices = self._replicated.addressable_devices_indices_map(leaf.shape)
        copies = [jax.device_put(leaf, device, may_alias=False) for device in devices]
        return jax.make_array_from_single_device_arrays(leaf.shape, self._replicated, copies)
      sharding = NamedSharding(self.mesh, spec)
      if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return jax.device_put(leaf, sharding)  # already global: reshard on device
      host = np.asarray(leaf)
      # Each device gets its own slice of the host value (no full copy on any device); works across processes.
      return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put_leaf, tree, specs)

  def is_placed_batch(self, batch: Mapping[str, Any], *, stacked: bool = False) -> bool:
    """True when every entry already has the layout :meth:`put_batch` gives (with the same ``stacked``)."""
    leaves = jax.tree.leaves(batch)
    # Tracers (a step called under an outer jit or make_jaxpr) have no concrete placement: treat them as rows.
    if not leaves or not all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) for x in leaves):
      return False
    if self.use_pmap:
      devices = set(self.local_devices)
      return all(
        x.ndim >= 1 and x.shape[0] == len(devices) and len(x.sharding.device_set) == len(devices) for x in leaves
      ) and all(x.sharding.device_set == devices for x in leaves)
    sharded = NamedSharding(self.mesh, P(None, self.data_axis)) if stacked else self._sharded
    return all(x.ndim >= (2 if stacked else 1) and x.sharding.is_equivalent_to(sharded, x.ndim) for x in leaves)

  def check_batch_size(self, key: str, shape: tuple[int, ...], *, axis: int = 0) -> None:
    """Raises ValueError when a batch entry's rows (its axis ``axis``) do not divide over this process's devices."""
    if len(shape) <= axis:
      raise ValueError(f"batch['{key}'] must have a batch axis at position {axis}, got shape {shape}.")
    rows = shape[axis]
    if rows == 0:
      raise empty_batch_error(key, shape)
    if rows % self.local_shards:
      raise ValueError(
        f"batch size {rows} of batch['{key}'] does not divide over the {self.local_shards} devices of "
        f"{self!r} (got an array of shape {shape})."
      )

  def put_batch(self, batch: PyTree, *, stacked: bool = False) -> PyTree:
    """Places this process's flat rows ``[batch, ...]`` (``[steps, batch, ...]`` when ``stacked``) for the step.

    pmap: ``[devices, per_device, ...]`` (``[devices, steps, per_device, ...]``); otherwise a global array
    sharded along ``data_axis`` (assembled from every process's rows with several processes).
    """
    if self.use_pmap:
      sharding = NamedSharding(Mesh(np.array(self.local_devices), (self.data_axis,)), P(self.data_axis))
      return jax.device_put(self.split_for_pmap(batch, stacked=stacked), sharding)
    if self.mesh.size == 1:
      return jax.device_put(batch, self.local_devices[0])
    spec = P(None, self.data_axis) if stacked else P(self.data_axis)
    sharding = NamedSharding(self.mesh, spec)
    try:
      if jax.process_count() > 1:
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
      return jax.device_put(batch, sharding)
    except ValueError:  # JAX's IndivisibleError: name the entry, its rows and the devices instead
      for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        self.check_batch_size(jax.tree_util.keystr(path).strip("[]'\""), tuple(np.shape(x)), axis=int(stacked))
      raise

  def split_for_pmap(self, batch: PyTree, *, stacked: bool = False) -> PyTree:
    """``[batch, ...]`` -> ``[devices, batch // devices, ...]`` (``[steps, batch, ...]`` -> ``[devices, steps,
    batch // devices, ...]``), a free reshape for NumPy rows of this process."""
    n = self.local_shards

    def split(x: Any) -> Any:
      axis = 1 if stacked else 0
      rows = x.shape[axis]
      if rows % n:
        raise ValueError(
          f"batch size {rows} does not divide over {n} devices (got an array of shape {tuple(x.shape)})."
        )
      if not stacked:
        return x.reshape(n, rows // n, *x.shape[1:])  # [devices, per_device, ...]
      x = x.reshape(x.shape[0], n, rows // n, *x.shape[2:])  # [steps, devices, per_device, ...]
      return x.swapaxes(0, 1)  # [devices, steps, per_device, ...]

    return jax.tree.map(split, batch)

  # ------------------------------------------------------------------------------------------------ coming back

  def unreplicate(self, tree: PyTree) -> PyTree:
    """The value of a replicated output as one (device) array per leaf: pmap's first copy, else the array itself."""
    if not self.use_pmap:
      return tree

    def first(leaf: Any) -> Any:
      if isinstance(leaf, jax.Array):
        # Reading one shard avoids gathering all copies to the host.
        return leaf.addressable_shards[0].data[0]
      return leaf[0]

    return jax.tree.map(first, tree)

  def to_host(self, tree: PyTree) -> PyTree:
    """NumPy copies of a replicated or model-sharded output (state, metrics, eval sums).

    A leaf split over devices of several processes is gathered from all of them first (every process must call).
    """

    def gathered(leaf: Any) -> Any:
      if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(leaf, tiled=True)
      return leaf

    return jax.device_get(jax.tree.map(gathered, self.unreplicate(tree)))

  # ------------------------------------------------------------------------------------------------ input checks

  def per_device_struct(
    self, x: Any, *, batched: bool, stacked: bool = False, placed: bool = False
  ) -> jax.ShapeDtypeStruct:
    """What the body sees of one argument leaf (for shape checks with ``jax.eval_shape``).

    Args:
      x: a leaf as the step receives it.
      batched: a batch entry (split along the data axis) rather than state or teacher (replicated by :meth:`put`).
      stacked: batch entries carry a leading ``[steps]`` axis that the body scans over.
      placed: the batch entry was already placed by :meth:`put_batch` (else it holds this process's rows).
    """
    shape = tuple(np.shape(x))
    if not batched:
      return jax.ShapeDtypeStruct(shape[1:] if self.use_pmap else shape, x.dtype)  # pmap: put()'s device axis
    if self.use_pmap and placed:
      shape = shape[1:]  # [devices, (steps,) per_device, ...]
    else:
      axis = 1 if stacked else 0
      # Rows of this process split over its devices, or a global array split over the whole mesh.
      shards = self.data_size if placed else self.local_shards
      shape = (*shape[:axis], shape[axis] // shards, *shape[axis + 1 :])
    if stacked:
      shape = shape[1:]
    return jax.ShapeDtypeStruct(shape, x.dtype)

  def check_replicated(self, name: str, tree: PyTree) -> None:
    """Raises ValueError when a pmap argument was not put on the devices with :meth:`put`."""
    if not self.use_pmap:
      return
    n = self.local_shards
    for leaf in jax.tree.leaves(tree):
      if not np.shape(leaf) or np.shape(leaf)[0] != n:
        raise ValueError(
          f"pmap needs {name} replicated over the {n} local devices (leading axis {n}), got a leaf of shape "
          f"{tuple(np.shape(leaf))}; use placement.put({name})."
        )


def _cast_floating(leaf: Any, dtype: Any) -> Any:
  leaf_dtype = getattr(leaf, "dtype", None)
  if leaf_dtype is None or jax.dtypes.issubdtype(leaf_dtype, jax.dtypes.prng_key):
    return leaf
  if not jnp.issubdtype(leaf_dtype, jnp.floating):
    return leaf
  return leaf.astype(dtype) if isinstance(leaf, jax.Array) else np.asarray(leaf).astype(dtype)


class _KeepStateSharding:
  """``jax.jit`` of a partly manual ``shard_map`` whose outputs keep the shardings the inputs came with.

  XLA would otherwise choose the new state's layout itself, and the next step, seeing other input shardings,
  would compile again. One jit per input layout: the state's shardings become its output shardings.
  """

  def __init__(self, fn: Callable, donate: tuple[int, ...], replicated: NamedSharding, returns_state: bool):
    self._fn, self._donate, self._replicated, self._returns_state = fn, donate, replicated, returns_state
    self._jitted: dict[Any, Callable] = {}

  def _for(self, args: tuple) -> Callable:
    if not self._returns_state:
      key = None
      out_shardings: Any = self._replicated
    else:
      shardings = jax.tree.map(lambda x: getattr(x, "sharding", self._replicated), args[0])
      leaves, treedef = jax.tree.flatten(shardings)
      key = (treedef, tuple(leaves))
      out_shardings = (shardings, self._replicated)
    if key not in self._jitted:
      self._jitted[key] = jax.jit(self._fn, donate_argnums=self._donate, out_shardings=out_shardings)
    return self._jitted[key]

  def __call__(self, *args: Any) -> Any:
    return self._for(args)(*args)

  def lower(self, *args: Any) -> Any:
    return self._for(args).lower(*args)


def empty_batch_error(key: str, shape: tuple[int, ...]) -> ValueError:
  """The error for a batch without rows: a step has nothing to average over (and a model's reshape divides by 0)."""
  return ValueError(
    f"the batch is empty: batch['{key}'] has shape {tuple(shape)}, no examples to train or evaluate on. Skip empty "
    "batches before the step (e.g. batch with drop_remainder=True, or filter out a last batch of 0 rows)."
  )


def as_placement(placement: Placement | str | None) -> Placement:
  """A :class:`Placement` from itself, None (:meth:`Placement.data_parallel`) or a shorthand string:
  ``'data_parallel'`` (also ``'shard_map'``), ``'single'`` or ``'pmap'``."""
  if placement is None:
    return Placement.data_parallel()
  if isinstance(placement, Placement):
    return placement
  makers = {
    "data_parallel": Placement.data_parallel,
    "shard_map": Placement.data_parallel,
    "single": Placement.single,
    "pmap": Placement.pmap,
  }
  if placement not in makers:
    raise ValueError(f"placement must be a jaxkd.Placement or one of {sorted(makers)}, got {placement!r}.")
  return makers[placement]()
