"""A short, real distillation on synthetic data: teacher, scratch student, distilled student.

Reproduce (about 10 s on 2 CPU cores):

  python -m experiments.synthetic --workdir /tmp/jaxkd_synthetic

The task: 20-dimensional inputs from 10 Gaussian clusters with overlapping tails, a
wide MLP teacher trained on hard labels, then a narrow MLP student trained either
from scratch on 300 labelled examples or distilled from the teacher's soft targets
on the same subset. Results go to ``WORKDIR/results.json``.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxkd
from jaxkd import artifacts
from jaxkd.models import MLP


def make_data(seed: int, num_examples: int, num_classes: int = 10, dim: int = 20):
  rng = np.random.default_rng(seed)
  centers = np.random.default_rng(0).standard_normal((num_classes, dim)) * 1.5
  labels = rng.integers(0, num_classes, num_examples)
  inputs = centers[labels] + rng.standard_normal((num_examples, dim)) * 1.6
  return inputs.astype(np.float32)[:, :, None, None], labels.astype(np.int32)


def train(model, inputs, labels, *, teacher_logits=None, temperature=1.0, alpha=0.0, steps=1000, seed=0):
  params = model.init(jax.random.key(seed), inputs[:1])["params"]
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, t):
    def loss_fn(params):
      logits = model.apply({"params": params}, x)
      if t is None:
        return jaxkd.hard_cross_entropy(logits, y).mean()
      return jaxkd.distillation_loss(logits, t, y, temperature, alpha).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(inputs), 64)
    t = None if teacher_logits is None else teacher_logits[idx]
    params, opt_state = step(params, opt_state, inputs[idx], labels[idx], t)
  return params


def accuracy(model, params, inputs, labels) -> float:
  logits = model.apply({"params": params}, inputs)
  return float(jnp.mean(jnp.argmax(logits, -1) == labels))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=1000, help="training steps of each model, >= 1")
  args = parser.parse_args(argv)
  if args.steps < 1:  # 0 or fewer would write a results.json of untrained models
    parser.error(f"--steps must be >= 1, got {args.steps}")
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)

  train_x, train_y = make_data(1, 20000)
  test_x, test_y = make_data(2, 5000)
  teacher, student = MLP(hidden_sizes=(512, 512)), MLP(hidden_sizes=(256,))
  teacher_params = train(teacher, train_x, train_y, steps=args.steps)
  # The student sees only 300 labelled examples; the teacher labels them softly.
  small_x, small_y = train_x[:300], train_y[:300]
  teacher_logits = teacher.apply({"params": teacher_params}, small_x)
  scratch = train(student, small_x, small_y, steps=args.steps, seed=1)
  distilled = train(
    student, small_x, small_y, teacher_logits=teacher_logits, temperature=4.0, alpha=0.9, steps=args.steps, seed=1
  )
  results = {
    "teacher_accuracy": accuracy(teacher, teacher_params, test_x, test_y),
    "scratch_student_accuracy": accuracy(student, scratch, test_x, test_y),
    "distilled_student_accuracy": accuracy(student, distilled, test_x, test_y),
  }
  artifacts.write_json(workdir / "results.json", results, sort_keys=False)
  for name, value in results.items():
    print(f"{name:30s} {value:.4f}")
  return results


if __name__ == "__main__":
  main()
