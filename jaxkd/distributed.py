"""Multi-process (multi-host) start-up and the rows each process feeds to the train step.

Every process runs the same program. Call :func:`initialize` first, before anything touches a JAX device; then
each process feeds only its own rows of each global batch, flat ``{key: [rows, ...]}``, and the step's
:class:`jaxkd.Placement` lays them out: :meth:`~jaxkd.Placement.data_parallel` assembles one global array over
every process's devices (:func:`jax.make_array_from_process_local_data`), :meth:`~jaxkd.Placement.pmap` splits
them over this process's devices and ``jax.pmap`` joins the processes.

:func:`process_batch_slice` names the rows, :func:`process_rows` takes them from a batch every process holds
whole, and :func:`assemble_batch` (``placement.put_batch``) places them ahead of the step, which otherwise does it.

Example (two processes, each started with its own ``JAXKD_PROCESS_ID``)::

  JAXKD_COORDINATOR_ADDRESS=10.0.0.1:1234 JAXKD_NUM_PROCESSES=2 JAXKD_PROCESS_ID=0 python train.py

  jaxkd.distributed.initialize()
  step = jaxkd.make_train_step(teacher_apply_fn=teacher.apply, placement=jaxkd.Placement.data_parallel())
  state, teacher_variables = step.placement.put(state), step.placement.put(teacher_variables)
  for global_batch in batches:
    state, metrics = step(state, teacher_variables, jaxkd.distributed.process_rows(global_batch))
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxkd.placement import Placement, as_placement

__all__ = ["initialize", "process_batch_slice", "process_rows", "assemble_batch"]

_log = logging.getLogger(__name__)

ENV_COORDINATOR_ADDRESS = "JAXKD_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXKD_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXKD_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAXKD_LOCAL_DEVICE_IDS"

# None until initialize() has decided; then whether this is a multi-process run.
_multiprocess: bool | None = None


def _env_int(name: str, environ: Mapping[str, str]) -> int | None:
  value = environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name} must be an integer, got {value!r}.") from None


def _env_ids(name: str, environ: Mapping[str, str]) -> list[int] | None:
  value = environ.get(name)
  if not value:
    return None
  try:
    return [int(part) for part in value.split(",")]
  except ValueError:
    raise ValueError(f"environment variable {name} must be comma-separated integers, got {value!r}.") from None


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: int | Sequence[int] | None = None,
  **kwargs: Any,
) -> bool:
  """Starts JAX's multi-process runtime, or does nothing for a single process.

  Arguments left as None are read from ``JAXKD_COORDINATOR_ADDRESS``,
  ``JAXKD_NUM_PROCESSES``, ``JAXKD_PROCESS_ID`` and ``JAXKD_LOCAL_DEVICE_IDS``
  (comma-separated). Then:

  * ``num_processes == 1``: nothing to start (a no-op).
  * some values known: :func:`jax.distributed.initialize` gets them and
    auto-detects the rest (Cloud TPU, SLURM, Open MPI, Kubernetes); missing
    values it cannot detect raise its ValueError.
  * nothing known: :func:`jax.distributed.initialize` auto-detects; when it
    finds no cluster (its ValueError about undefined arguments, raised before
    it connects to anything) this is a single process and a no-op. If JAX's
    backends have already started, nothing can be started: a warning is
    logged and the backend's own process count stands.

  Idempotent: later calls return the first call's answer and change nothing.
  Must run before any JAX computation or device query in the process.

  Args:
    coordinator_address: ``host:port`` of process 0's coordination service.
    num_processes: total number of processes.
    process_id: this process's index in ``[0, num_processes)``.
    local_device_ids: the local devices this process uses.
    **kwargs: passed to :func:`jax.distributed.initialize` (e.g. ``initialization_timeout``).

  Returns:
    True when running with several processes, False for a single process.
  """
  global _multiprocess
  if _multiprocess is not None:
    return _multiprocess
  if jax.distributed.is_initialized():
    _multiprocess = True
    return _multiprocess

  environ = os.environ
  if coordinator_address is None:
    coordinator_address = environ.get(ENV_COORDINATOR_ADDRESS) or None
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES, environ)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID, environ)
  if local_device_ids is None:
    local_device_ids = _env_ids(ENV_LOCAL_DEVICE_IDS, environ)

  if num_processes == 1:
    _multiprocess = False
    return _multiprocess
  args = dict(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    local_device_ids=local_device_ids,
    **kwargs,
  )
  if coordinator_address is None and num_processes is None and process_id is None:
    try:
      jax.distributed.initialize(**args)
    except ValueError as error:
      if jax.distributed.is_initialized():
        raise
      _log.info("No multi-process cluster detected (%s): running as a single process.", error)
      _multiprocess = False
      return _multiprocess
    except RuntimeError as error:
      # JAX's backends already started (a device query or computation ran first), so nothing can be
      # started now; with no configuration given, keep whatever the backend has rather than failing.
      _log.warning("jax.distributed not started: %s", error)
      _multiprocess = jax.process_count() > 1
      return _multiprocess
  else:
    jax.distributed.initialize(**args)
  _multiprocess = jax.process_count() > 1
  _log.info(
    "JAX process %d of %d, %d local devices.", jax.process_index(), jax.process_count(), jax.local_device_count()
  )
  return _multiprocess


def process_batch_slice(
  global_batch_size: int, *, process_index: int | None = None, process_count: int | None = None
) -> slice:
  """The contiguous rows of a global batch that this process feeds.

  Process ``p`` of ``n`` feeds rows ``[p * b / n, (p + 1) * b / n)``: the rows
  that land on its devices for ``pmap`` and for the mesh of
  :meth:`jaxkd.Placement.data_parallel` (devices in process order).

  Raises:
    ValueError: when ``global_batch_size`` does not divide over the processes.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} does not divide over {process_count} processes.")
  per_process = global_batch_size // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


def process_rows(global_batch: Any) -> Any:
  """This process's rows (:func:`process_batch_slice`) of a host batch that every process holds whole."""
  sizes = {np.shape(x)[0] for x in jax.tree.leaves(global_batch)}
  if len(sizes) != 1:
    raise ValueError(f"all batch entries must have the same batch size, got sizes {sorted(sizes)}.")
  rows = process_batch_slice(sizes.pop())
  return jax.tree.map(lambda x: x[rows], global_batch)


def assemble_batch(local_batch: Any, placement: Placement | str | None = None) -> Any:
  """Places this process's rows for the train and eval steps: ``placement.put_batch(local_batch)``.

  The step places NumPy rows itself; placing them ahead (e.g. in a background thread, as
  :class:`jaxkd.data.DevicePrefetcher` does) takes the transfer off the step's critical path.

  Args:
    local_batch: this process's rows, flat ``{key: [rows, ...]}`` host arrays.
    placement: the step's placement (``step.placement``) or its shorthand (see :func:`jaxkd.placement.as_placement`).

  Returns:
    pmap: ``[local_devices, rows // local_devices, ...]`` arrays on this process's devices; otherwise global arrays
    sharded along the placement's data axis.
  """
  return as_placement(placement).put_batch(local_batch)
