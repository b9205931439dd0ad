"""One process of the two-process preemption test in ``tests/test_preemption.py``.

python tests/_preempt_worker.py WORKDIR NUM_STEPS OUT_DIR [--marker-at K] [--reference REF_WORKDIR]

with ``JAXKD_COORDINATOR_ADDRESS``, ``JAXKD_NUM_PROCESSES=2`` and ``JAXKD_PROCESS_ID`` set and
``XLA_FLAGS=--xla_force_host_platform_device_count=2``. Each process feeds its rows of fixed global batches to a
data-parallel step over both processes' devices through :func:`jaxkd.training.fit`. With ``--marker-at K``, process
0 writes ``WORKDIR/marker`` after step K and from then on sleeps a little after each step, so that the run is still
going when the test's SIGTERM arrives (the sleep changes no numbers). Process i writes the final params and step to
OUT_DIR/process<i>.npz. With ``--reference``, the same processes then train from scratch in REF_WORKDIR without a
stop, for comparison (``ref_*`` in the npz); they reuse the compiled step, which a third pair would compile again.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import numpy as np
import optax

from jaxkd import distributed, train
from jaxkd import state as state_lib
from jaxkd.models import MLP
from jaxkd.training import loop as trainer
from jaxkd.training.hooks import Callback, Loop

GLOBAL_BATCH = 16
NUM_CLASSES = 3
# Per step after the marker: long enough that the SIGTERM (polled by JAX's notifier once a second) lands mid-run.
_SLOW_STEP_S = 0.2


class GlobalBatches:
  """This process's rows of fixed global batches (batch ``i`` from seed ``[0, i]``), with a saveable position."""

  def __init__(self):
    self.index = 0

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rng = np.random.default_rng([0, self.index])
    self.index += 1
    images = rng.standard_normal((GLOBAL_BATCH, 4, 4, 1)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(GLOBAL_BATCH,)).astype(np.int32)
    return distributed.process_rows({"image": images, "label": labels})


def _marker_hook(marker: pathlib.Path, marker_at: int) -> Callback:
  def after_step(step: int, loop: Loop) -> None:
    if jax.process_index() != 0 or step < marker_at:
      return
    if step == marker_at:
      marker.write_text(str(step))
    time.sleep(_SLOW_STEP_S)

  return Callback(after_step, every=1)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir", type=pathlib.Path)
  parser.add_argument("num_steps", type=int)
  parser.add_argument("out_dir", type=pathlib.Path)
  parser.add_argument("--marker-at", type=int, default=None)
  parser.add_argument("--reference", type=pathlib.Path, default=None)
  args = parser.parse_args()

  # Here, not at import (pytest imports this file for doctests): before anything starts the CPU backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  assert distributed.initialize(), "expected a multi-process run"
  assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
  example = np.zeros((1, 4, 4, 1), np.float32)
  teacher = MLP(hidden_sizes=(16,), num_classes=NUM_CLASSES)
  teacher_variables = jax.jit(teacher.init)(jax.random.key(1), example)  # one compile, not one per operation
  student = MLP(hidden_sizes=(8,), num_classes=NUM_CLASSES, dropout_rate=0.2)
  state = state_lib.create_train_state(student, optax.adam(1e-2), example, rng=3)
  step = train.make_train_step(teacher_apply_fn=teacher.apply, temperature=2.0, alpha=0.7, placement="data_parallel")
  hooks = [] if args.marker_at is None else [_marker_hook(args.workdir / "marker", args.marker_at)]

  def run(workdir: pathlib.Path, hooks: list) -> trainer.FitResult:
    return trainer.fit(
      state,
      train_step=step,
      train_data=GlobalBatches(),
      num_steps=args.num_steps,
      teacher_variables=teacher_variables,
      workdir=workdir,
      log_every=5,
      progress=False,
      tensorboard=False,
      hooks=hooks,
    )

  result = run(args.workdir, hooks)
  out = {"step": result.step, "preempted": result.preempted}
  out.update({f"params_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(result.state.params))})
  if args.reference is not None:
    reference = run(args.reference, [])
    out.update({f"ref_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(reference.state.params))})
  args.out_dir.mkdir(parents=True, exist_ok=True)
  np.savez(args.out_dir / f"process{jax.process_index()}.npz", **out)


if __name__ == "__main__":
  main()
