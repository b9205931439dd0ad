"""One process of the two-process test in ``tests/test_distributed.py``.

Run as ``python tests/_multihost_worker.py OUT.npz`` with ``JAXKD_COORDINATOR_ADDRESS``,
``JAXKD_NUM_PROCESSES`` and ``JAXKD_PROCESS_ID`` set. Each process gets 2 CPU devices,
feeds its own rows of fixed global batches to the pmap and the shard_map step, and
writes the final student params (and eval sums) to OUT.npz; a third run splits teacher and state over a
(data 2, model 2) mesh. Both placements get flat rows. The test imports
:func:`setup` and :func:`global_batches` from here so that its one-process reference
run uses the same model, optimizer and data.
"""

from __future__ import annotations

import sys

NUM_STEPS = 3
GLOBAL_BATCH = 16
NUM_CLASSES = 5


def setup():
  """The student state, teacher and step settings shared with the reference run."""
  import flax.linen as nn
  import jax
  import numpy as np
  import optax

  from jaxkd import state as state_lib
  from jaxkd.models import MLP

  class Student(nn.Module):
    """BatchNorm synchronised over the placements' data axis, so any split of the batch gives the same numbers."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
      x = x.reshape((x.shape[0], -1))
      x = nn.Dense(16)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name="data")(x)
      return nn.Dense(NUM_CLASSES)(nn.relu(x))

  teacher = MLP(hidden_sizes=(8,), num_classes=NUM_CLASSES)
  example = np.zeros((1, 4, 4, 1), np.float32)
  teacher_variables = teacher.init(jax.random.key(1), example)
  state = state_lib.create_train_state(Student(), optax.sgd(0.1, momentum=0.9), example, rng=jax.random.key(0))
  step_kwargs = dict(teacher_apply_fn=teacher.apply, temperature=2.0, alpha=0.7)
  return state, teacher.apply, teacher_variables, step_kwargs


def global_batches():
  """Fixed global batches, identical in every process."""
  import numpy as np

  rng = np.random.default_rng(0)
  return [
    {
      "image": rng.normal(size=(GLOBAL_BATCH, 4, 4, 1)).astype(np.float32),
      "label": rng.integers(0, NUM_CLASSES, size=(GLOBAL_BATCH,)).astype(np.int32),
    }
    for _ in range(NUM_STEPS)
  ]


def flatten(prefix: str, tree) -> dict:
  """``{'prefix/params/Dense_0/kernel': array}``: plain names for ``np.savez``."""
  import numpy as np
  from flax import traverse_util

  return {f"{prefix}/{k}": np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def main(out_path: str) -> None:
  import jax

  # Before anything starts the CPU backend: 2 devices per process, gloo for cross-process collectives.
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")

  import numpy as np

  from jaxkd import distributed, train
  from jaxkd.placement import Placement

  assert distributed.initialize(), "expected a multi-process run"
  assert distributed.initialize(), "initialize must be idempotent"
  assert jax.process_count() == 2 and jax.local_device_count() == 2 and jax.device_count() == 4

  state, teacher_apply, teacher_variables, step_kwargs = setup()
  batches = global_batches()
  results = {}

  # pmap: every process feeds its own flat rows; the placement splits them over its devices.
  placement = Placement.pmap()
  step = train.make_train_step(placement=placement, **step_kwargs)
  evaluate = train.make_eval_step(teacher_apply_fn=teacher_apply, placement=placement)
  pmap_state, pmap_teacher = placement.put(state), placement.put(teacher_variables)
  for batch in batches:
    pmap_state, _ = step(
      pmap_state, pmap_teacher, distributed.assemble_batch(distributed.process_rows(batch), placement)
    )
  # Unplaced rows work too: the step places them itself.
  sums = placement.to_host(evaluate(pmap_state, pmap_teacher, distributed.process_rows(batches[0])))
  final = placement.to_host(pmap_state)
  results.update(flatten("pmap", {"params": final.params, "batch_stats": final.batch_stats}))
  results["pmap/eval_count"] = np.asarray(sums["count"])

  # data_parallel: one global mesh over both processes' devices.
  placement = Placement.data_parallel()
  step = train.make_train_step(placement=placement, **step_kwargs)
  sm_state, sm_teacher = placement.put(state), placement.put(teacher_variables)
  for batch in batches:
    local = distributed.process_rows(batch)
    sm_state, _ = step(sm_state, sm_teacher, distributed.assemble_batch(local, placement))
  final = placement.to_host({"params": sm_state.params, "batch_stats": sm_state.batch_stats})
  results.update(flatten("shard_map", final))

  # sharded: a (data 2, model 2) mesh, each process's two devices one model group; teacher and student state split
  # over the model axis (FSDP default), each process feeding its own rows along the data axis.
  placement = Placement.sharded(2)
  assert placement.local_shards == 1
  step = train.make_train_step(placement=placement, **step_kwargs)
  sh_state, sh_teacher = placement.put(state), placement.put(teacher_variables)
  kernel = sh_teacher["params"]["Dense_0"]["kernel"]
  assert kernel.addressable_shards[0].data.size * 2 == kernel.size, "the teacher must be split over the model axis"
  for batch in batches:
    sh_state, _ = step(sh_state, sh_teacher, distributed.assemble_batch(distributed.process_rows(batch), placement))
  final = placement.to_host({"params": sh_state.params, "batch_stats": sh_state.batch_stats})
  results.update(flatten("sharded", final))

  np.savez(out_path, **results)


if __name__ == "__main__":
  main(sys.argv[1])
