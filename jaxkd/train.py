"""The distillation train and eval steps: one per-device body, placed by a :class:`jaxkd.Placement`.

The body owns everything that must agree between devices: the forward passes (teacher in eval mode under
``stop_gradient``, student in train mode), the objective's weighted terms, normalisation by the global count of
real examples or tokens, and the reduction of gradients, BatchNorm statistics and metrics over the data axis.
The placement decides how it is compiled (``jit`` + ``shard_map`` over a mesh, or ``pmap``) and lays out inputs.

Batches are dicts of this process's rows ``[batch, ...]``: the model's inputs (``'image'`` by default; token
ids, attention masks, positions...), ``'label'`` (int, ``[batch]`` or ``[batch, length]`` for tokens; -100 is
ignored as Hugging Face users pass it), optionally ``'mask'`` (bool, False marks padding),
``'teacher_logits'`` (offline distillation from a cache) and whatever the objective reads (``'index'``).

Example (every device of every process)::

  state = jaxkd.create_train_state(student, optax.adam(1e-3), images[:1], rng=0)
  step = jaxkd.make_train_step(teacher_apply_fn=teacher.apply, temperature=4.0, alpha=0.9)
  state, teacher_variables = step.placement.put(state), step.placement.put(teacher_variables)
  for batch in batches:
    state, metrics = step(state, teacher_variables, batch)
  state = step.placement.to_host(state)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkd import _step_checks, _step_parts, modeling
from jaxkd import objective as objective_lib
from jaxkd.losses import hard_cross_entropy, kd_loss
from jaxkd.placement import Placement, as_placement, pmean_inexact, psum
from jaxkd.state import TrainState

__all__ = ["make_train_step", "make_eval_step", "summarize_eval", "TrainStep", "EvalStep", "IGNORE_INDEX"]

PyTree = Any
# Re-exported: the constant's home is jaxkd.objective, beside the other batch entries the terms read.
IGNORE_INDEX = objective_lib.IGNORE_INDEX
# The augmentation's key stream: the same key on every device, per-example draws keyed by the global row.
_AUGMENT_STREAM = 0xA06


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static description of a step: what the body needs besides its arguments."""

  objective: objective_lib.Objective
  teacher: modeling.Model | None
  axis: str
  compute_dtype: Any
  skip_nonfinite: bool
  label_key: str
  mask_key: str
  plain_objective: objective_lib.Objective | None  # used when the batch brings no teacher logits
  # How outputs become the loss and metrics: whole logits, or a language model's head a chunk at a time.
  heads: _step_parts.OutputHeads = _step_parts.DenseHeads()
  augment: Callable[..., Mapping[str, Any]] | None = None  # augment(batch, key, rows) -> batch, inside the step


# ---------------------------------------------------------------------------------------------------------------------
# Pieces of the body (per device).


def _labels_and_mask(spec: _Spec, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
  labels = batch[spec.label_key]
  mask = batch[spec.mask_key] if spec.mask_key in batch else jnp.ones(labels.shape, jnp.bool_)
  ignored = labels == IGNORE_INDEX
  # Ignored positions get class 0, so their (masked) loss stays finite and never reaches a gradient as NaN.
  return jnp.where(ignored, 0, labels), mask & ~ignored


def _labels_out_of_range(labels: jax.Array, mask: jax.Array, num_classes: int) -> jax.Array:
  """Whether a real position's label is outside [0, num_classes) (ignored ones are class 0 by now).

  Host labels were range-checked before compiling (jaxkd._step_checks); device ones cannot be without a copy to the
  host every step, so the step makes its loss NaN instead, and the non-finite guard skips and counts it, whatever
  the objective does with labels (a soft-target-only objective never reads them, and -1 must not train as the last
  class).
  """
  return jnp.any(mask & ((labels < 0) | (labels >= num_classes)))


def _cast_params(variables: PyTree, dtype: Any) -> PyTree:
  """Casts the 'params' collection only: BatchNorm running statistics stay in float32."""
  if dtype is None or variables is None:
    return variables
  return {**variables, "params": modeling.cast_floating(variables["params"], dtype)}


def _teacher_outputs(spec: _Spec, teacher_variables: PyTree, batch: Mapping[str, Any], *, project: bool = True):
  """``(teacher_logits, teacher_features)`` under ``stop_gradient``; ``(None, {})`` without a teacher.

  With ``project=False`` a teacher with a head returns its hidden states instead of logits (chunked heads).
  """
  if spec.teacher is not None:
    logits, features, _ = spec.teacher(
      _cast_params(teacher_variables, spec.compute_dtype),
      batch,
      train=False,
      capture=spec.objective.teacher_layers,
      compute_dtype=spec.compute_dtype,
      project=project,
    )
  elif "teacher_logits" in batch:
    logits, features = batch["teacher_logits"], {}
  else:
    return None, {}
  return jax.lax.stop_gradient(jnp.asarray(logits, jnp.float32)), jax.lax.stop_gradient(features)


def _student_variables(state: TrainState, params: PyTree) -> tuple[dict[str, Any], list[str]]:
  variables = {"params": params}
  if jax.tree.leaves(state.batch_stats):
    variables["batch_stats"] = state.batch_stats
    return variables, ["batch_stats"]
  return variables, []


def _train_body(
  spec: _Spec, state: TrainState, teacher_variables: PyTree, batch: Mapping[str, Any]
) -> tuple[TrainState, dict[str, jax.Array]]:
  axis = spec.axis
  # A constant index on a one-device axis keeps the dropout key (and the masks, activations and weight gradients
  # that depend on it) free of the axis: measured half the speed otherwise.
  device_index = jax.lax.axis_index(axis) if jax.lax.axis_size(axis) > 1 else 0
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), device_index)
  if spec.augment is not None:
    batch = _augmented(spec, state, batch, device_index)
  labels, mask = _labels_and_mask(spec, batch)
  # Normalising by the global count of real examples (or tokens) makes the summed gradient the gradient of the
  # global mean: a pmean of per-device means when every device holds the same number of them.
  global_count = psum(jnp.sum(mask, dtype=jnp.float32), axis)
  teacher_logits, teacher_features = _teacher_outputs(spec, teacher_variables, batch, project=spec.heads.project)
  objective = spec.objective if teacher_logits is not None else spec.plain_objective
  temperature = objective_lib.value_at(spec.objective.temperature, state.step)  # of the kd_loss metric
  index = batch.get("index")

  def loss_fn(trainable: PyTree):
    # The inverse of TrainState.trainable: the optimizer's tree holds the adapters only when there are some.
    if jax.tree.leaves(state.adapters):
      params, adapters = trainable["student"], trainable["adapters"]
    else:
      params, adapters = trainable, {}
    # Casting here, inside the differentiated function, gives float32 gradients for float32 master params.
    variables, mutable = _student_variables(state, modeling.cast_floating(params, spec.compute_dtype))
    outputs, features, updates = state.model(
      variables,
      batch,
      train=True,
      rngs={"dropout": rng},
      mutable=mutable,
      capture=objective.student_layers,
      compute_dtype=spec.compute_dtype,
      project=spec.heads.project,
    )
    batch_stats = state.batch_stats
    if mutable:
      # Same dtypes as before keeps the state's avals fixed: one compilation, working donation.
      batch_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), updates["batch_stats"], batch_stats)
    inputs = dict(
      student_logits=outputs,
      teacher_logits=teacher_logits,
      labels=labels,
      mask=mask,
      batch=batch,
      student_features=features,
      teacher_features=teacher_features,
      index=None if index is None else jnp.asarray(index).astype(jnp.int32),
      axis_name=axis,
      adapters=adapters,
    )
    loss, values, term_state, carry = spec.heads.loss(
      objective, state, inputs, global_count, _head_fns(spec, state, variables, teacher_variables), temperature
    )
    return loss, (carry, batch_stats, values, term_state)

  (local_loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
  carry, batch_stats, values, term_state = aux
  sums, num_classes = spec.heads.metric_sums(
    carry, temperature=temperature, teacher_logits=teacher_logits, labels=labels, mask=mask, batch=batch
  )
  # NaN on one device is NaN in the summed loss every device sees, so all of them skip the update.
  local_loss = jnp.where(_labels_out_of_range(labels, mask, num_classes), jnp.nan, local_loss)
  batch_stats = pmean_inexact(batch_stats, axis)
  grads = psum(grads, axis)
  loss = psum(local_loss, axis)
  new_state, finite, grad_norm = _update(spec, state, grads, loss, batch_stats=batch_stats, term_state=term_state)
  metrics = _finish_metrics(spec, state.step, sums, global_count, objective, labels)
  metrics.update({f"loss/{name}": value for name, value in psum(values, axis).items()})
  metrics["loss"] = loss
  if grad_norm is not None:
    metrics["grad_norm"] = grad_norm
  metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
  return new_state, metrics


def _head_fns(spec: _Spec, state: TrainState, variables: PyTree, teacher_variables: PyTree) -> _step_parts.HeadFns:
  """The output heads bound to their variables, for head strategies that apply them (None where a model has none)."""
  student = None if state.model.head is None else functools.partial(state.model.head, variables)
  teacher = None
  if spec.teacher is not None and spec.teacher.head is not None:
    teacher = functools.partial(spec.teacher.head, _cast_params(teacher_variables, spec.compute_dtype))
  return _step_parts.HeadFns(student, teacher)


def _augmented(spec: _Spec, state: TrainState, batch: Mapping[str, Any], device_index: Any) -> dict[str, Any]:
  """The batch after ``spec.augment``, computed once: teacher and student both read the array it returns.

  Its key depends on the state's key and step only, and each example's draws on its row in the global batch, so
  the augmented batch is the same under every placement and after a resume (tests/test_augment.py).
  """
  if spec.teacher is None and ("teacher_logits" in batch or objective_lib.TOPK_INDICES in batch):
    raise ValueError(
      "augment= with cached teacher logits would distil the student's augmented view towards the teacher's output "
      "on the unaugmented input (the inconsistent teaching Beyer et al. 2022 warn against): pass the teacher as "
      "teacher_apply_fn so it sees the same augmented batch, or drop augment=."
    )
  size = jnp.shape(batch[spec.label_key])[0]
  rows = device_index * size + jnp.arange(size, dtype=jnp.int32)
  key = jax.random.fold_in(jax.random.fold_in(state.rng, _AUGMENT_STREAM), state.step)
  return dict(spec.augment(dict(batch), key, rows))


def _update(spec: _Spec, state: TrainState, grads: PyTree, loss: jax.Array, **changes: Any):
  """The optimizer update, skipped when the loss or gradient norm is not finite: ``(state, finite, grad_norm)``."""
  if not spec.skip_nonfinite:
    # No gradient norm: it is a full extra pass over the gradients, which is what the guard costs (5% of a
    # batch-32 MLP step on 2 CPU cores, benchmarks/README.md). The loss check is a scalar and stays.
    return state.apply_gradients(grads=grads, **changes), jnp.isfinite(loss), None
  grad_norm = optax.tree.norm(grads)
  # Every device sees the same summed loss and gradients, so all take the same decision.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # lax.cond rather than jnp.where: a select keeps the old params and optimizer state alive beside the new
  # ones, so XLA copied them every step (benchmarks/README.md); the conditional updates donated buffers in place.
  new_state = jax.lax.cond(
    finite,
    lambda s: s.apply_gradients(grads=grads, **changes),
    lambda s: s.replace(step=s.step + 1),
    state,
  )
  return new_state, finite, grad_norm


def _finish_metrics(spec, step, sums, global_count, objective, labels) -> dict[str, jax.Array]:
  metrics = jax.tree.map(lambda s: s / global_count, psum(sums, spec.axis))
  if labels.ndim >= 2:
    # Token-level: perplexities of the batch's real tokens (exp of the per-token cross-entropy, nats).
    metrics["perplexity"] = jnp.exp(metrics["ce"])
    if "teacher_ce" in metrics:
      metrics["teacher_perplexity"] = jnp.exp(metrics["teacher_ce"])
  # The current values of schedules, logged beside the losses.
  if "kd_loss" in metrics:
    metrics["temperature"] = jnp.asarray(objective_lib.value_at(spec.objective.temperature, step), jnp.float32)
  for term in objective.terms:
    metrics[f"weight/{term.name}"] = jnp.asarray(objective_lib.value_at(term.weight, step), jnp.float32)
  return metrics


def _scanned(body: Callable) -> Callable:
  """N steps in one call: ``lax.scan`` of the body over batches stacked on a leading axis."""

  def run(state: TrainState, teacher_variables: PyTree, batches: Mapping[str, Any]):
    return jax.lax.scan(lambda s, b: body(s, teacher_variables, b), state, batches)

  return run


def _eval_body(spec: _Spec, state: TrainState, teacher_variables: PyTree, batch: Mapping[str, Any]):
  labels, mask = _labels_and_mask(spec, batch)
  variables, _ = _student_variables(state, modeling.cast_floating(state.params, spec.compute_dtype))
  logits, _, _ = state.model(variables, batch, train=False, compute_dtype=spec.compute_dtype)
  logits = logits.astype(jnp.float32)
  teacher_logits, _ = _teacher_outputs(spec, teacher_variables, batch)
  # A row with a non-finite logit (argmax would say class 0) is an incorrect prediction and a disagreement.
  predictions = _step_parts.predictions(logits, invalid=_step_parts.STUDENT_INVALID)
  sums = {
    "count": jnp.sum(mask, dtype=jnp.int32),
    "correct": jnp.sum(mask & (predictions == labels), dtype=jnp.int32),
    "ce_sum": _step_parts.masked_sum(hard_cross_entropy(logits, labels), mask),
  }
  if teacher_logits is not None:
    teacher_predictions = _step_parts.predictions(teacher_logits, invalid=_step_parts.TEACHER_INVALID)
    sums["teacher_correct"] = jnp.sum(mask & (teacher_predictions == labels), dtype=jnp.int32)
    sums["agreement"] = jnp.sum(mask & (predictions == teacher_predictions), dtype=jnp.int32)
    temperature = objective_lib.value_at(spec.objective.temperature, state.step)
    sums["kd_loss_sum"] = _step_parts.masked_sum(kd_loss(logits, teacher_logits, temperature), mask)
  return psum(sums, spec.axis)


def summarize_eval(sums: Mapping[str, jax.typing.ArrayLike]) -> dict[str, float]:
  """Turns (accumulated) eval sums into means over the real examples.

  Returns:
    ``accuracy``, ``ce`` and, when a teacher was used, ``teacher_accuracy``, ``agreement`` and ``kd_loss``, as
    Python floats; plus ``count``.
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
# The step objects.


class _Step:
  """What train and eval steps share: placement of the batch, host-side checks, the compiled body."""

  def __init__(self, spec: _Spec, placement: Placement, compiled: Callable, *, stacked: bool):
    self._spec = spec
    self.placement = placement
    self._compiled = compiled
    self._stacked = stacked
    self._checker = _step_checks.StepChecker(
      placement,
      teacher=spec.teacher,
      needs_teacher=spec.plain_objective is None,
      label_key=spec.label_key,
      mask_key=spec.mask_key,
      ignore_index=IGNORE_INDEX,
      stacked=stacked,
      heads=spec.heads,
      objective=spec.objective,
    )

  def __call__(self, state: TrainState, teacher_variables: PyTree, batch: Mapping[str, Any]) -> Any:
    return self._compiled(state, teacher_variables, self._prepare(state, teacher_variables, batch))

  def lower(self, state: TrainState, teacher_variables: PyTree, batch: Mapping[str, Any]) -> Any:
    """The step lowered for these arguments, without running it (``jax.stages.Lowered``).

    ``step.lower(state, teacher_variables, batch).compile().memory_analysis()`` gives the compiled step's
    buffer sizes; ``.cost_analysis()`` its FLOPs. Abstract arguments (``jax.ShapeDtypeStruct``) are not
    accepted: the host checks read the batch.
    """
    return self._compiled.lower(state, teacher_variables, self._prepare(state, teacher_variables, batch))

  def _prepare(self, state: TrainState, teacher_variables: PyTree, batch: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
      raise ValueError(f"a batch must be a dict of arrays, got {type(batch).__name__}.")
    if self.placement.is_placed_batch(batch, stacked=self._stacked):
      self._checker.check(state, teacher_variables, batch, placed=True)
      return dict(batch)
    self._checker.check(state, teacher_variables, batch, placed=False)
    if self.placement.use_pmap:
      # NumPy rows: a free reshape; pmap transfers each device's share itself.
      return dict(self.placement.split_for_pmap(batch, stacked=self._stacked))
    if self.placement.mesh.size == 1:
      return dict(batch)  # jit places host arrays on the one device itself
    return dict(self.placement.put_batch(batch, stacked=self._stacked))


class TrainStep(_Step):
  """``step(state, teacher_variables, batch) -> (state, metrics)``, from :func:`make_train_step`.

  Attributes:
    placement: where the step runs; put state and teacher variables with ``step.placement.put``.
    objective: the loss terms it minimises.
    skip_nonfinite: whether a non-finite step is skipped (True) or applied.
    steps_per_call: batches per call (stacked ``[steps, batch, ...]`` when > 1).
  """

  def __init__(self, spec: _Spec, placement: Placement, *, donate: bool, steps_per_call: int):
    body = _bind(_train_body, spec)
    if steps_per_call > 1:
      body = _scanned(body)
    compiled = placement.wrap(body, donate_state=donate, stacked=steps_per_call > 1, returns_state=True)
    super().__init__(spec, placement, compiled, stacked=steps_per_call > 1)
    self.objective = spec.objective
    self.skip_nonfinite = spec.skip_nonfinite
    self.steps_per_call = steps_per_call


class EvalStep(_Step):
  """``evaluate(state, teacher_variables, batch) -> sums``, from :func:`make_eval_step`."""

  def __init__(self, spec: _Spec, placement: Placement):
    compiled = placement.wrap(_bind(_eval_body, spec), donate_state=False)
    super().__init__(spec, placement, compiled, stacked=False)


def _bind(body: Callable, spec: _Spec) -> Callable:
  def bound(state, teacher_variables, batch):
    return body(spec, state, teacher_variables, batch)

  return bound


def _objective(
  objective: objective_lib.Objective | None, loss_fn: Callable | None, temperature: Any, alpha: Any
) -> tuple[objective_lib.Objective, objective_lib.Objective | None]:
  """The step's objective, and the one it trains on when the batch brings no teacher logits (None: an error)."""
  if objective is not None:
    if loss_fn is not None:
      raise ValueError("give either objective= or loss_fn=, not both (a loss_fn is a one-term objective).")
    if objective.temperature is None:  # the kd_loss metric's T: the step's, unless the objective states its own
      objective = dataclasses.replace(objective, temperature=temperature)
    student_only = tuple(t for t in objective.terms if not t.needs_teacher)
    if not student_only:
      return objective, None
    return objective, objective_lib.Objective(student_only, name=objective.name, temperature=temperature)
  # Without a teacher the default objectives train a teacher or a scratch student: cross-entropy at weight 1.
  plain = objective_lib.Objective((objective_lib.cross_entropy(),), name="ce", temperature=temperature)
  if loss_fn is not None:
    return objective_lib.Objective(
      (objective_lib.per_example(loss_fn),), name="loss_fn", temperature=temperature
    ), plain
  return objective_lib.hinton(temperature=temperature, alpha=alpha), plain


def make_train_step(
  *,
  teacher_apply_fn: Any = None,
  objective: objective_lib.Objective | None = None,
  loss_fn: Callable | None = None,
  temperature: objective_lib.Schedule = 1.0,
  alpha: objective_lib.Schedule = 0.5,
  placement: Placement | str | None = None,
  compute_dtype: Any = None,
  donate: bool = True,
  skip_nonfinite: bool = True,
  steps_per_call: int = 1,
  label_key: str = "label",
  mask_key: str = "mask",
  teacher_inputs: tuple[str, ...] | None = None,
  chunk_size: int | None = None,
  augment: Callable[..., Mapping[str, Any]] | None = None,
) -> TrainStep:
  r"""Builds the compiled distillation step ``step(state, teacher_variables, batch) -> (state, metrics)``.

  The objective, from the most general to the most common:

  * ``objective``: an :class:`jaxkd.objective.Objective` (weighted loss terms, e.g. a method of
    :mod:`jaxkd.methods`);
  * ``loss_fn(student_logits, teacher_logits, labels[, batch=])``: a per-example loss, as a one-term objective;
  * ``temperature`` and ``alpha`` (numbers or schedules ``step -> value``): Hinton's ``alpha`` x KD at
    ``temperature`` + ``(1 - alpha)`` x cross-entropy (:func:`jaxkd.objective.hinton`).

  Where the teacher logits come from, decided by the batch's structure at trace time: ``teacher_apply_fn`` (run
  inside the step on the same batch as the student, in eval mode, under ``stop_gradient``; its variables are an
  argument, never a constant baked into the executable); else ``batch['teacher_logits']`` (offline distillation);
  else there is no teacher and the student trains on cross-entropy alone (the objective's teacher terms are
  unused). Giving both is a ValueError.

  The loss is averaged over the real examples (or tokens) of the global batch: ``batch[mask_key]`` False and
  labels equal to -100 are left out. Gradients are summed over devices after that normalisation, BatchNorm
  statistics averaged. The dropout key is ``fold_in(fold_in(state.rng, state.step), device_index)``.

  A non-finite loss or gradient norm skips the update (params, optimizer state, BatchNorm statistics and term
  states stay, ``step`` advances) and reports ``metrics['nonfinite'] = 1``; ``skip_nonfinite=False`` drops that
  guard (it costs one pass over the gradients, benchmarks/README.md) and applies every update. Bad values that
  cannot be checked without a copy to the host make the loss NaN, and so take this path: a label on device outside
  ``[0, num_classes)`` other than -100 (a NumPy one raises, below), and, in jaxkd's losses, teacher logits without
  a distribution (NaN or +inf: a diverged teacher, a NaN row of a logit cache; see :func:`jaxkd.losses.kd_loss`).

  Bad inputs raise ValueError/TypeError on the host before anything compiles (see :mod:`jaxkd._step_checks`).

  Args:
    teacher_apply_fn: the teacher: a linen module or its ``apply``, an apply function, or a
      :class:`jaxkd.modeling.Model` (to set its inputs, train flag or logits entry); None for cached logits.
      An NNX teacher goes through :func:`jaxkd.from_nnx` first.
    objective: the loss terms (above).
    loss_fn: a per-example loss (above).
    temperature: :math:`T` of the default objective and of the ``kd_loss`` metric; a number or a schedule.
    alpha: weight of the KD term in the default objective; a number in [0, 1] or a schedule.
    placement: a :class:`jaxkd.Placement` (default :meth:`~jaxkd.Placement.data_parallel`) or its shorthand
      ``'data_parallel'``, ``'single'``, ``'pmap'``.
    compute_dtype: e.g. ``jnp.bfloat16``: params and floating inputs are cast to it inside the step (integer
      inputs such as token ids never are); logits, loss and metrics stay float32; master params stay float32.
    donate: donate the input state's buffers to the output.
    skip_nonfinite: skip the update of a non-finite step (above).
    steps_per_call: run this many steps per call with ``lax.scan``; the batch then carries a leading axis of
      that size (``[steps, batch, ...]``, :func:`jaxkd.training.fit` stacks them) and metrics come back per step.
      Identical results to as many single calls, less Python dispatch per step for small models.
    label_key: the batch entry holding the labels.
    mask_key: the batch entry holding the padding mask.
    teacher_inputs: batch keys the teacher reads, when it differs from the student (default: the student's).
    chunk_size: for language models whose :class:`jaxkd.Model` has a ``head`` (:func:`jaxkd.lm.lm_model`): apply
      the output heads and the per-token terms to this many positions at a time (it must divide the length), so
      the float32 ``[batch, length, vocab]`` logits and probabilities of student and teacher never exist whole
      (peak memory in benchmarks/README.md); None applies the heads to every position at once.
    augment: ``augment(batch, key, rows) -> batch``, applied on device at the start of the step, once, so that
      teacher and student see the same augmented input (Beyer et al.'s "consistent teaching"); ``rows`` are the
      examples' int32 rows in the global batch, ``key`` is the same on every device, so every placement draws the
      same augmentation for an example, and a resumed run the same as an uninterrupted one. See
      :mod:`jaxkd.data.augment` (mixup, cutmix, crops, flips). Mixing sets ``batch['mix_label']`` and
      ``batch['mix_weight']``, which :func:`jaxkd.objective.cross_entropy` reads; a ``loss_fn`` reading ``labels``
      sees the first example's label only. With cached teacher logits it is an error (they are of the unaugmented
      input).

  Returns:
    A :class:`TrainStep`. ``metrics`` hold float32 scalars (per device under pmap, identical on each;
    ``[steps]`` with ``steps_per_call``): ``loss``, ``ce``, ``accuracy``, ``grad_norm`` (not with
    ``skip_nonfinite=False``), ``nonfinite``, ``loss/<term>`` (each term's unweighted value over the global batch)
    and ``weight/<term>`` (its current weight); with a teacher ``kd_loss`` (:math:`T^2`-scaled KL at the
    current ``temperature``, also logged), ``teacher_accuracy`` and ``agreement``.
  """
  # temperature and alpha are checked where they enter an objective (jaxkd.objective.hinton, kd, Objective).
  if not isinstance(steps_per_call, int) or steps_per_call < 1:
    raise ValueError(f"steps_per_call must be an int >= 1, got {steps_per_call!r}.")
  objective, plain = _objective(objective, loss_fn, temperature, alpha)
  placement = as_placement(placement)
  spec = _make_spec(
    objective, plain, teacher_apply_fn, placement, compute_dtype, skip_nonfinite, label_key, mask_key, teacher_inputs
  )
  if chunk_size is not None:
    # The step's one dense/chunked decision. Chunking is a language-model concern, so its code lives in jaxkd.lm.
    from jaxkd.lm.chunked import ChunkedHeads

    heads = ChunkedHeads(chunk_size)
    heads.check_step(objective, spec.teacher)
    spec = dataclasses.replace(spec, heads=heads)
  if augment is not None:
    if not callable(augment):
      raise TypeError(f"augment must be a function augment(batch, key, rows) -> batch, got {augment!r}.")
    spec = dataclasses.replace(spec, augment=augment)
  return TrainStep(spec, placement, donate=donate, steps_per_call=steps_per_call)


def _make_spec(
  objective, plain, teacher, placement, compute_dtype, skip_nonfinite, label_key, mask_key, teacher_inputs
):
  teacher_model = None
  if teacher is not None:
    options = {} if teacher_inputs is None else {"inputs": teacher_inputs}
    teacher_model = modeling.as_model(teacher, name="teacher", **options)
  return _Spec(
    objective=objective,
    teacher=teacher_model,
    axis=placement.data_axis,
    compute_dtype=compute_dtype,
    skip_nonfinite=skip_nonfinite,
    label_key=label_key,
    mask_key=mask_key,
    plain_objective=plain,
  )


def make_eval_step(
  *,
  teacher_apply_fn: Any = None,
  temperature: float = 1.0,
  placement: Placement | str | None = None,
  compute_dtype: Any = None,
  label_key: str = "label",
  mask_key: str = "mask",
  teacher_inputs: tuple[str, ...] | None = None,
) -> EvalStep:
  """Builds ``evaluate(state, teacher_variables, batch) -> sums`` over the real examples of a batch.

  Student and teacher run in eval mode. Only examples with ``mask`` True (and labels other than -100) count, and
  the sums are added over devices, so a padded final batch counts each real example exactly once. Sum the
  results over batches and turn them into means with :func:`summarize_eval`
  (:func:`jaxkd.training.evaluation.evaluate` does both).

  Returns:
    ``evaluate`` returning ``count``, ``correct`` (int32) and ``ce_sum``; with a teacher also
    ``teacher_correct``, ``agreement`` (int32) and ``kd_loss_sum`` (at ``temperature``). A row of logits with a
    non-finite value is an incorrect prediction (and a disagreement), whatever its argmax; its ``ce_sum`` is NaN.
  """
  objective = objective_lib.Objective((objective_lib.cross_entropy(),), name="eval", temperature=temperature)
  placement = as_placement(placement)
  spec = _make_spec(
    objective, objective, teacher_apply_fn, placement, compute_dtype, True, label_key, mask_key, teacher_inputs
  )
  return EvalStep(spec, placement)
