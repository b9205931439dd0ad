"""A training run in its own process, for the trainer's resume and SIGTERM tests.

python tests/_fit_worker.py WORKDIR NUM_STEPS OUT.npz [--slow]
"""

import os
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxkd import state as state_lib  # noqa: E402
from jaxkd import train  # noqa: E402
from jaxkd.models import MLP  # noqa: E402
from jaxkd.training import loop as trainer


class ArrayIterator:
  """Deterministic shuffled batches of in-memory arrays (flat rows) with a saveable position."""

  def __init__(self, images, labels, batch_size, *, seed=0, delay=0.0):
    self.images, self.labels = images, labels
    self.batch_size, self.seed, self.delay = batch_size, seed, delay
    self.epoch, self.index = 0, 0

  def get_state(self):
    return {"epoch": self.epoch, "index": self.index}

  def set_state(self, state):
    self.epoch, self.index = int(state["epoch"]), int(state["index"])

  def __iter__(self):
    return self

  def __next__(self):
    per_epoch = len(self.images) // self.batch_size
    if self.index >= per_epoch:
      self.epoch, self.index = self.epoch + 1, 0
    order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.images))
    rows = order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
    self.index += 1
    if self.delay:
      time.sleep(self.delay)
    return {"image": self.images[rows], "label": self.labels[rows]}


def make_run(workdir, num_steps, *, delay=0.0, stop_after=None, log_every=5, placement="pmap"):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((256, 4, 4, 1)).astype(np.float32)
  labels = (images.reshape(256, -1).sum(-1) > 0).astype(np.int32)
  teacher = MLP(hidden_sizes=(32,), num_classes=2)
  teacher_variables = teacher.init(jax.random.key(1), images[:1])
  student = MLP(hidden_sizes=(16,), num_classes=2, dropout_rate=0.2)
  state = state_lib.create_train_state(student, optax.adam(1e-2), images[:1], rng=3)
  step = train.make_train_step(teacher_apply_fn=teacher.apply, temperature=2.0, alpha=0.7, placement=placement)
  return trainer.fit(
    state,
    train_step=step,
    train_data=ArrayIterator(images, labels, 32, delay=delay),
    num_steps=num_steps,
    teacher_variables=teacher_variables,
    workdir=workdir,
    checkpoint_every=7,
    log_every=log_every,
    stop_after=stop_after,
    progress=False,
  )


if __name__ == "__main__":
  workdir, num_steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  result = make_run(workdir, num_steps, delay=0.05 if "--slow" in sys.argv else 0.0, log_every=1)
  leaves = jax.tree.leaves(jax.device_get(result.state.params))
  np.savez(out, *leaves, step=result.step, preempted=result.preempted)
  sys.exit(143 if result.preempted else 0)
