"""A language model's output head applied a chunk of positions at a time: the ``[batch, length, vocab]`` logits of
student and teacher never exist whole.

``jaxkd.make_train_step(..., chunk_size=n)`` builds the step with :class:`ChunkedHeads` (the one place the step's
dense/chunked decision is made). The models return their final hidden states (``project=False``); each chunk of
``n`` positions applies the heads to its slice, evaluates the per-token terms and the metric sums, and is
rematerialised in the backward pass (``jax.checkpoint``), so neither pass holds more than one chunk's logits and
probabilities. Per-token terms are sums over positions, so the result equals the dense step up to float32
rounding (tests/lm/test_objectives.py). Peak memory: benchmarks/README.md.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import objective as objective_lib
from jaxkd._step_parts import HeadFns, metric_sums, objective_loss

__all__ = ["ChunkedHeads"]


class ChunkedHeads:
  """The output-head strategy of a chunked step: see the module docstring.

  Args:
    chunk_size: token positions per chunk; it must divide the sequence length.
  """

  project = False

  def __init__(self, chunk_size: int):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
      raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}.")
    self.chunk_size = chunk_size

  def __eq__(self, other: object) -> bool:
    return isinstance(other, ChunkedHeads) and other.chunk_size == self.chunk_size

  def __hash__(self) -> int:
    return hash((ChunkedHeads, self.chunk_size))

  def __repr__(self) -> str:
    return f"ChunkedHeads(chunk_size={self.chunk_size})"

  def check_step(self, objective: objective_lib.Objective, teacher: Any) -> None:
    chunk = self.chunk_size
    if teacher is not None and teacher.head is None:
      raise ValueError(
        "chunk_size needs a teacher whose output head is separate (jaxkd.Model(..., head=...), e.g. from "
        "jaxkd.lm.lm_model(module)); this teacher returns logits."
      )
    bad = [t.name for t in objective.terms if t.scope != "example" or t.init_state is not None]
    if bad or objective.student_layers or objective.teacher_layers:
      raise ValueError(
        f"chunk_size={chunk} evaluates per-token terms chunk by chunk; terms {bad or list(objective.terms)} need the "
        "whole batch (scope other than 'example', state, or features). Use chunk_size=None for this objective."
      )

  def check_batch(self, model: Any, labels_shape: tuple[int, ...]) -> None:
    chunk = self.chunk_size
    if model.head is None:
      raise ValueError(
        f"chunk_size={chunk} needs a student whose output head is separate (jaxkd.Model(..., head=...), e.g. from "
        "jaxkd.lm.lm_model(module)); this student returns logits."
      )
    if len(labels_shape) != 2:
      raise ValueError(f"chunk_size={chunk} needs token labels [batch, length], got labels of shape {labels_shape}.")
    length = labels_shape[1]
    if length % chunk:
      raise ValueError(
        f"chunk_size={chunk} must divide the sequence length {length}; choose a divisor "
        f"(e.g. {math.gcd(length, chunk)})."
      )

  def loss(self, objective, state, inputs, global_count, heads: HeadFns, temperature):
    """The objective over chunks: ``(loss, term values, term states, (metric sums, num_classes))``."""
    labels, mask, batch = inputs["labels"], inputs["mask"], inputs["batch"]
    size, length = labels.shape
    chunk = self.chunk_size
    num_chunks = length // chunk

    def split(x: jax.Array) -> jax.Array:  # [batch, length, ...] -> [chunks, batch, chunk, ...]
      return jnp.moveaxis(x.reshape(size, num_chunks, chunk, *x.shape[2:]), 1, 0)

    per_token = {k: v for k, v in batch.items() if jnp.ndim(v) >= 2 and tuple(jnp.shape(v)[:2]) == (size, length)}
    xs = {
      "hidden": split(inputs["student_logits"]),  # hidden states: the models ran with project=False
      "labels": split(labels),
      "mask": split(mask),
      "batch": {k: split(jnp.asarray(v)) for k, v in per_token.items()},
    }
    if heads.teacher is not None:  # a live teacher's hidden states (cached targets are read from the batch)
      xs["teacher_hidden"] = split(inputs["teacher_logits"])
    num_classes = jax.eval_shape(heads.student, xs["hidden"][0]).shape[-1]

    @jax.checkpoint
    def one_chunk(x: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
      logits = heads.student(x["hidden"]).astype(jnp.float32)
      teacher_logits = None
      if heads.teacher is not None:
        teacher_logits = jax.lax.stop_gradient(heads.teacher(x["teacher_hidden"]).astype(jnp.float32))
      chunk_batch = {**batch, **x["batch"]}
      chunk_inputs = {
        **inputs,
        "student_logits": logits,
        "teacher_logits": teacher_logits,
        "labels": x["labels"],
        "mask": x["mask"],
        "batch": chunk_batch,
      }
      loss, values, _ = objective_loss(objective, state, chunk_inputs, global_count)
      sums = metric_sums(logits, teacher_logits, x["labels"], x["mask"], chunk_batch, temperature=temperature)
      return loss, values, jax.lax.stop_gradient(sums)

    def body(carry, x):
      return jax.tree.map(jnp.add, carry, one_chunk(x)), None

    zeros = jax.tree.map(
      lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(one_chunk, jax.tree.map(lambda v: v[0], xs))
    )
    (loss, values, sums), _ = jax.lax.scan(body, zeros, xs)
    return loss, values, dict(state.term_state), (sums, num_classes)

  def metric_sums(self, carry, *, temperature, teacher_logits, labels, mask, batch):
    return carry
