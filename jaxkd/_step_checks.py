"""Host-side checks of a step's inputs, before anything compiles, with messages that name sizes and remedies.

Private to the package: :mod:`jaxkd.train` uses :class:`StepChecker`. Shapes of the model outputs come from
``jax.eval_shape`` (no FLOPs) and are cached per model and batch signature, so later steps only compare tuples.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import modeling
from jaxkd.placement import Placement, empty_batch_error

__all__ = ["StepChecker"]

PyTree = Any


class StepChecker:
  """Validates ``(state, teacher_variables, batch)`` of a train or eval step."""

  def __init__(
    self,
    placement: Placement,
    *,
    teacher: modeling.Model | None,
    needs_teacher: bool,
    label_key: str,
    mask_key: str,
    ignore_index: int,
    stacked: bool,
    heads: Any = None,
    objective: Any = None,
  ):
    self.placement = placement
    self.teacher = teacher
    self.needs_teacher = needs_teacher
    self.label_key = label_key
    self.mask_key = mask_key
    self.ignore_index = ignore_index
    self.stacked = stacked
    self.heads = heads  # the step's output-head strategy (jaxkd._step_parts.OutputHeads), or None
    self.objective = objective  # the step's jaxkd.objective.Objective, whose terms check the batch, or None
    self._passed: dict[Any, int] = {}  # batch signature -> number of classes, for signatures already checked

  def check(self, state: Any, teacher_variables: PyTree, batch: Mapping[str, Any], *, placed: bool) -> None:
    model = getattr(state, "model", None)
    if model is None:
      raise ValueError("the state has no model adapter: make it with jaxkd.create_train_state.")
    self._check_sources(model, teacher_variables, batch)
    labels = batch[self.label_key]
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise TypeError(f"batch['{self.label_key}'] must hold integer class indices, got dtype {labels.dtype}.")
    if self.mask_key in batch:
      mask = batch[self.mask_key]
      if mask.dtype != jnp.bool_:
        raise TypeError(f"batch['{self.mask_key}'] must be boolean (False = padding), got dtype {mask.dtype}.")
      if np.shape(mask) != np.shape(labels):
        raise ValueError(
          f"batch['{self.mask_key}'] must have the labels' shape {tuple(np.shape(labels))}, "
          f"got {tuple(np.shape(mask))}."
        )
    self._check_not_empty(batch, placed=placed)
    if not placed:
      self._check_rows(batch)
    self.placement.check_replicated("state", state)
    if self.teacher is not None:
      self.placement.check_replicated("teacher_variables", teacher_variables)

    signature = (model, tuple((k, np.shape(v), np.dtype(v.dtype)) for k, v in batch.items()), placed)
    if signature not in self._passed:
      self._passed[signature] = self._check_shapes(model, state, teacher_variables, batch, placed=placed)
    self._check_label_range(labels, batch, self._passed[signature])
    self._check_topk(batch, self._passed[signature])
    if self.objective is not None:
      self.objective.check_batch(batch)

  def _check_sources(self, model: modeling.Model, teacher_variables: PyTree, batch: Mapping[str, Any]) -> None:
    if self.label_key not in batch:
      keys = sorted(batch)
      raise ValueError(f"the batch has no labels batch['{self.label_key}'] (it has {keys}); set label_key=... .")
    model.check_batch(batch)
    if self.teacher is not None:
      self.teacher.check_batch(batch)
      if "teacher_logits" in batch:
        raise ValueError(
          "got both teacher_apply_fn and batch['teacher_logits']: use one source of teacher logits "
          "(drop the cached logits from the batch, or make the step with teacher_apply_fn=None)."
        )
      if not jax.tree.leaves(teacher_variables):
        raise ValueError("teacher_apply_fn is set but teacher_variables is empty: pass the teacher's variables.")
    elif self.needs_teacher and "teacher_logits" not in batch:
      raise ValueError(
        "every term of the objective reads the teacher, but the step has no teacher_apply_fn and the batch no "
        "'teacher_logits'; pass one, or add a student-only term such as jaxkd.objective.cross_entropy()."
      )

  def _check_not_empty(self, batch: Mapping[str, Any], *, placed: bool) -> None:
    """A batch of 0 rows, on the host or placed, is a ValueError here rather than an error inside the model."""
    # The leading axes that count rows: [batch], [steps, batch], and pmap's [devices, ...] in front when placed.
    row_axes = 1 + self.stacked + (placed and self.placement.use_pmap)
    for key, value in batch.items():
      shape = tuple(np.shape(value))
      if 0 in shape[:row_axes]:
        raise empty_batch_error(key, shape)

  def _check_rows(self, batch: Mapping[str, Any]) -> None:
    axis = 1 if self.stacked else 0
    for key, value in batch.items():
      shape = tuple(np.shape(value))
      if len(shape) <= axis:
        what = "[steps, batch, ...] (steps_per_call > 1)" if self.stacked else "[batch, ...]"
        raise ValueError(f"batch['{key}'] must be laid out {what}, got shape {shape}.")
      self.placement.check_batch_size(key, shape, axis=axis)
    sizes = {k: np.shape(v)[: axis + 1] for k, v in batch.items()}
    if len(set(sizes.values())) > 1:
      raise ValueError(f"all batch entries must have the same leading (batch) axes, got {sizes}.")

  def _per_device(self, tree: PyTree, *, batched: bool, placed: bool) -> PyTree:
    return jax.tree.map(
      lambda x: self.placement.per_device_struct(x, batched=batched, stacked=self.stacked, placed=placed), tree
    )

  def _check_shapes(self, model: modeling.Model, state: Any, teacher_variables: PyTree, batch, *, placed) -> int:
    per_device = self._per_device(dict(batch), batched=True, placed=placed)
    variables = {"params": state.params}
    if jax.tree.leaves(state.batch_stats):
      variables["batch_stats"] = state.batch_stats
    variables = self._per_device(variables, batched=False, placed=False)
    labels = tuple(per_device[self.label_key].shape)
    if self.heads is not None:
      self.heads.check_batch(model, labels)
    logits = _logits_shape(model, variables, per_device)
    if tuple(logits.shape[:-1]) != labels:
      raise ValueError(
        f"student logits of shape {tuple(logits.shape)} (per device) do not match labels of shape {labels}: "
        "expected logits [..., num_classes] with leading axes equal to the labels' shape."
      )
    num_classes = logits.shape[-1]
    self._warn_unsynchronised_batch_stats(model, variables, per_device)
    if self.teacher is not None:
      teacher_variables = self._per_device(teacher_variables, batched=False, placed=False)
      teacher = _logits_shape(self.teacher, teacher_variables, per_device)
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
    return num_classes

  def _warn_unsynchronised_batch_stats(self, model: modeling.Model, variables: PyTree, batch) -> None:
    """Warns once when BatchNorm statistics will be per device: the numbers then depend on the batch split."""
    shards = self.placement.data_size
    if shards == 1 or "batch_stats" not in variables:
      return
    axis = self.placement.data_axis

    def forward(v: PyTree, b: Mapping[str, Any]) -> Any:
      return model(v, b, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])

    # A model that synchronises its statistics reduces over the data axis in its train-mode forward pass.
    jaxpr = str(jax.make_jaxpr(forward, axis_env=[(axis, shards)])(variables, batch))
    if "psum" not in jaxpr and "pmean" not in jaxpr:
      warnings.warn(
        f"the {model.name}'s BatchNorm statistics are computed per device ({shards} devices of {self.placement!r}): "
        f"the results depend on how the batch is split and differ from one device's. Name the axis in the layers "
        f"(nn.BatchNorm(axis_name='{axis}')) to synchronise them.",
        stacklevel=4,
      )

  def _check_label_range(self, labels: Any, batch: Mapping[str, Any], num_classes: int) -> None:
    # Only host (NumPy) labels are range-checked: checking device arrays would block on a device-to-host copy
    # every step. An out-of-range label on device makes its cross-entropy NaN, so a train step skips the update
    # and reports nonfinite=1.
    if isinstance(labels, np.ndarray) and labels.size:
      real = labels[np.asarray(batch[self.mask_key])] if self.mask_key in batch else labels
      real = real[real != self.ignore_index]
      if real.size and (real.min() < 0 or real.max() >= num_classes):
        raise ValueError(
          f"labels must be in [0, num_classes={num_classes}) (or {self.ignore_index}, ignored), got values in "
          f"[{real.min()}, {real.max()}]."
        )

  def _check_topk(self, batch: Mapping[str, Any], num_classes: int) -> None:
    """A top-k cache's entries (jaxkd.lm.topk_cache.JoinedSource) against the labels and the student's vocabulary.

    Host indices are range-checked here (a cache made with another tokenizer or vocabulary); device ones make the
    loss NaN at that token (jaxkd.losses), so the step is skipped and counted.
    """
    if "teacher_topk_indices" not in batch:
      return
    labels = tuple(np.shape(batch[self.label_key]))
    indices = batch["teacher_topk_indices"]
    for key in ("teacher_topk_logits", "teacher_topk_indices", "teacher_log_normalizer"):
      if key in batch:
        shape = tuple(np.shape(batch[key]))
        if shape[: len(labels)] != labels:
          raise ValueError(
            f"batch['{key}'] of shape {shape} does not match the labels {labels}: the top-k cache was written for "
            "other sequences (another length or batch); rebuild it for these token windows."
          )
    if isinstance(indices, np.ndarray) and indices.size:
      low, high = int(indices.min()), int(indices.max())
      if low < 0 or high >= num_classes:
        raise ValueError(
          f"batch['teacher_topk_indices'] holds token ids in [{low}, {high}] but the student's vocabulary is "
          f"[0, {num_classes}): the top-k cache comes from another tokenizer or teacher vocabulary."
        )


def _logits_shape(model: modeling.Model, variables: PyTree, batch: Mapping[str, Any]) -> jax.ShapeDtypeStruct:
  """The logits' abstract value, or a ValueError saying how to adapt the model when calling it fails."""
  try:
    logits, _, _ = jax.eval_shape(lambda v, b: model(v, b, train=False), variables, batch)
  except TypeError as error:
    message = str(error)
    if "argument" in message:  # unexpected / missing keyword or positional arguments: a calling-convention mismatch
      raise ValueError(
        f"calling the {model.name} failed: {message}. Say how it is called: jaxkd.modeling.Model / as_model("
        f"..., inputs=(batch keys passed positionally), input_kwargs={{keyword: batch key}}, train_flag='train' | "
        f"'training' | 'deterministic' | None); it was called with inputs={list(model.inputs)}, "
        f"input_kwargs={dict(model.input_kwargs)}, train_flag={model.train_flag!r}."
      ) from error
    raise
  return logits
