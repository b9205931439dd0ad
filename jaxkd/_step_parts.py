"""Pieces of the per-device step body that every way of producing the outputs shares.

Private to the package. :mod:`jaxkd.train` runs the body; how the student's (and a live teacher's) outputs become
the objective's loss and the metric sums is an *output head strategy*, chosen once when the step is built:
:class:`DenseHeads` here (the models return logits, seen whole), or :class:`jaxkd.lm.chunked.ChunkedHeads` (a
language model's output head applied a chunk of positions at a time). Both evaluate the objective with
:func:`objective_loss` and the metrics with :func:`metric_sums`, so the two paths compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from jaxkd import objective as objective_lib
from jaxkd.losses import hard_cross_entropy, kd_loss
from jaxkd.state import TrainState

__all__ = [
  "STUDENT_INVALID",
  "TEACHER_INVALID",
  "DenseHeads",
  "HeadFns",
  "OutputHeads",
  "masked_sum",
  "metric_sums",
  "objective_loss",
  "predictions",
]

PyTree = Any
# A key stream for the loss terms, apart from the dropout keys fold_in(fold_in(rng, step), device).
_TERM_STREAM = 0x7E4D


class HeadFns(NamedTuple):
  """The output heads with their variables bound: ``head(hidden) -> logits`` (None: the model has none)."""

  student: Callable[[jax.Array], jax.Array] | None
  teacher: Callable[[jax.Array], jax.Array] | None


class OutputHeads(Protocol):
  """How the step turns model outputs into the objective's loss and the metric sums (one per step, static)."""

  #: whether the models apply their output head themselves (True: they return logits).
  project: bool

  def check_step(self, objective: objective_lib.Objective, teacher: Any) -> None:
    """Raises ValueError when the objective or the teacher cannot be evaluated this way (at build time)."""

  def check_batch(self, model: Any, labels_shape: tuple[int, ...]) -> None:
    """Raises ValueError when the student or the per-device labels cannot be evaluated this way (host side)."""

  def loss(
    self,
    objective: objective_lib.Objective,
    state: Any,
    inputs: dict[str, Any],
    global_count: jax.Array,
    heads: HeadFns,
    temperature: jax.typing.ArrayLike,
  ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any], Any]:
    """``(loss, term values, new term states, carry)`` inside the differentiated function."""

  def metric_sums(
    self, carry: Any, *, temperature: jax.typing.ArrayLike, teacher_logits: Any, labels: Any, mask: Any, batch: Any
  ) -> tuple[dict[str, jax.Array], Any]:
    """``(metric sums, num_classes)`` from ``carry``, outside the differentiated function."""


class DenseHeads:
  """The models return logits; the objective sees them whole and the metrics come from them after the gradient."""

  project = True

  def check_step(self, objective: objective_lib.Objective, teacher: Any) -> None:
    pass

  def check_batch(self, model: Any, labels_shape: tuple[int, ...]) -> None:
    pass

  def loss(self, objective, state, inputs, global_count, heads, temperature):
    inputs = {**inputs, "student_logits": inputs["student_logits"].astype(jnp.float32)}
    loss, values, term_state = objective_loss(objective, state, inputs, global_count)
    return loss, values, term_state, inputs["student_logits"]

  def metric_sums(self, carry, *, temperature, teacher_logits, labels, mask, batch):
    # The metrics from the logits outside the differentiated function (inside it, XLA fused them with the loss and
    # the loss moved by an ulp from jaxkd.losses.distillation_loss's).
    logits = carry
    return metric_sums(logits, teacher_logits, labels, mask, batch, temperature=temperature), logits.shape[-1]

  def __eq__(self, other: object) -> bool:
    return type(other) is DenseHeads

  def __hash__(self) -> int:
    return hash(DenseHeads)


# What predictions() gives a non-finite row of the student's and of the teacher's logits: no label, and not each other.
STUDENT_INVALID, TEACHER_INVALID = -1, -2


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask, values.astype(jnp.float32), 0.0))


def predictions(logits: jax.Array, *, invalid: int) -> jax.Array:
  """The argmax class of each row, or ``invalid`` where the row has a non-finite logit.

  ``argmax`` of a NaN row is class 0, which would count as correct for label 0 and agree with another NaN row.
  ``invalid`` is a negative id no label has (the step's masked positions count for nothing either way); give the
  student and the teacher different ones, so that two non-finite rows do not agree. Finite rows are unchanged.
  """
  return jnp.where(jnp.isfinite(logits).all(axis=-1), jnp.argmax(logits, axis=-1), invalid)


def objective_loss(
  objective: objective_lib.Objective, state: TrainState, inputs: dict[str, Any], global_count: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
  """The weighted sum of the terms (this device's share), each term's unweighted value, new term states."""
  mask, labels = inputs["mask"], inputs["labels"]
  local_count = jnp.sum(mask, dtype=jnp.float32)
  term_key = jax.random.fold_in(jax.random.fold_in(state.rng, _TERM_STREAM), state.step)
  per_position, scalar = None, None
  values, new_states = {}, dict(state.term_state)
  for position, term in enumerate(objective.terms):
    if term.init_state is not None and term.name not in state.term_state:
      raise ValueError(
        f"term {term.name!r} keeps state between steps but the train state has none for it: make the state with "
        "jaxkd.create_train_state(..., objective=<this objective>, num_data=<training set size>)."
      )
    output = term.fn(_term_inputs(term, inputs, state, jax.random.fold_in(term_key, position)))
    if term.init_state is not None:
      if not (isinstance(output, tuple) and len(output) == 2):
        raise ValueError(f"term {term.name!r} has init_state, so its fn must return (loss, new_state).")
      output, new_state = output
      old = state.term_state[term.name]
      new_states[term.name] = jax.tree.map(lambda new, old: jnp.asarray(new).astype(old.dtype), new_state, old)
    value = jnp.asarray(output, jnp.float32)
    weight = objective_lib.value_at(term.weight, state.step)
    if term.scope == "example":
      if value.shape != labels.shape:
        raise ValueError(
          f"term {term.name!r} has scope 'example' and must return a loss of the labels' shape "
          f"{tuple(labels.shape)}, got {tuple(value.shape)}."
        )
      values[term.name] = masked_sum(value, mask) / global_count
      # Per-position terms are summed before the masked mean: for Hinton's two terms this is the expression
      # jaxkd.losses.distillation_loss evaluates, so the step's loss equals it bit for bit.
      weighted = weight * value
      per_position = weighted if per_position is None else per_position + weighted
    else:
      if value.shape != ():
        raise ValueError(
          f"term {term.name!r} has scope {term.scope!r} and must return a scalar, got shape {tuple(value.shape)}."
        )
      # Each device's share of the real examples: the shares sum to 1 over the axis, so the summed gradient is
      # the gradient of the global-batch loss ('global') or of the example-weighted mean of local losses ('local').
      values[term.name] = value * local_count / global_count
      scalar = weight * values[term.name] if scalar is None else scalar + weight * values[term.name]
  loss = masked_sum(per_position, mask) / global_count if per_position is not None else 0.0
  if scalar is not None:
    loss = loss + scalar
  return jnp.asarray(loss, jnp.float32), values, new_states


def _term_inputs(
  term: objective_lib.LossTerm, inputs: Mapping[str, Any], state: TrainState, rng: jax.Array
) -> objective_lib.TermInputs:
  return objective_lib.TermInputs(
    student_logits=inputs["student_logits"],
    teacher_logits=inputs["teacher_logits"],
    labels=inputs["labels"],
    mask=inputs["mask"],
    batch=inputs["batch"],
    student_features={layer: inputs["student_features"][layer] for layer in term.student_layers},
    teacher_features={layer: inputs["teacher_features"][layer] for layer in term.teacher_layers},
    index=inputs["index"],
    rng=rng,
    step=state.step,
    axis_name=inputs["axis_name"],
    batch_axis=inputs["axis_name"] if term.scope == "global" else None,
    state=state.term_state.get(term.name),
    adapter_params=inputs["adapters"].get(term.name, {}),
  )


def metric_sums(logits, teacher_logits, labels, mask, batch, *, temperature) -> dict[str, jax.Array]:
  """This device's masked sums of the metrics (the step divides them by the global count of real positions)."""
  # A row with a non-finite logit predicts nothing: incorrect, and in disagreement with the teacher.
  student_predictions = predictions(logits, invalid=STUDENT_INVALID)
  token_level = labels.ndim >= 2
  sums = {
    "ce": masked_sum(hard_cross_entropy(logits, labels), mask),
    "accuracy": masked_sum(student_predictions == labels, mask),
  }
  if teacher_logits is not None:
    teacher_predictions = predictions(teacher_logits, invalid=TEACHER_INVALID)
    sums["kd_loss"] = masked_sum(kd_loss(logits, teacher_logits, temperature), mask)
    sums["teacher_accuracy"] = masked_sum(teacher_predictions == labels, mask)
    sums["agreement"] = masked_sum(student_predictions == teacher_predictions, mask)
    if token_level:
      sums["teacher_ce"] = masked_sum(hard_cross_entropy(teacher_logits, labels), mask)
  elif objective_lib.TOPK_INDICES in batch:
    # A top-k cache knows the teacher's top-1 token (its first index: lax.top_k sorts), not its full distribution.
    teacher_predictions = jnp.asarray(batch[objective_lib.TOPK_INDICES])[..., 0].astype(jnp.int32)
    sums["teacher_accuracy"] = masked_sum(teacher_predictions == labels, mask)
    sums["agreement"] = masked_sum(student_predictions == teacher_predictions, mask)
  return sums
