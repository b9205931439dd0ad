"""Argument validation of jaxkd's functions, owned once here.

Private to the package (like optax's ``_src/utils.py``): the names are public so that :mod:`jaxkd.losses` and
:mod:`jaxkd.losses` can import them, but users should not. Every check runs on static shapes and dtypes, or
on concrete values, at trace time; traced values pass through (the losses turn a traced temperature that is not
> 0, or a traced label out of range, into a NaN loss: see :mod:`jaxkd._numerics`).
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "check_temperature",
  "check_same_shape",
  "check_where",
  "check_labels",
  "check_label_range",
  "check_position_mask",
  "check_open_unit_interval",
  "check_closed_unit_interval",
  "check_alpha",
  "check_weight",
  "check_temperature_or_schedule",
  "check_features",
  "check_feature_pair",
  "check_same_positions",
]


def check_temperature(temperature: Any, *, name: str = "temperature") -> None:
  """Raises ValueError for a concrete temperature that is not > 0.

  Traced temperatures (schedules under ``jit``) cannot be checked without a
  host round-trip, so they pass through; the losses make their result NaN when
  they are not > 0 (:func:`jaxkd._numerics.as_temperature`).

  >>> check_temperature(2.0)
  >>> check_temperature(0.0)
  Traceback (most recent call last):
  ...
  ValueError: temperature must be a finite number > 0, got 0.0.
  """
  if isinstance(temperature, jax.core.Tracer):
    return
  if isinstance(temperature, numbers.Number) or isinstance(temperature, (np.ndarray, np.generic, jax.Array)):
    value = np.asarray(temperature)
    if value.size and (not np.all(np.isfinite(value)) or np.any(value <= 0)):
      raise ValueError(f"{name} must be a finite number > 0, got {temperature!r}.")
    return
  raise TypeError(f"{name} must be a number or an array, got {type(temperature).__name__}: {temperature!r}.")


def check_same_shape(student_logits: jax.Array, teacher_logits: jax.Array, *, what: str = "teacher_logits") -> None:
  """Raises ValueError unless both logits have the same shape, with a class axis."""
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
      f"student_logits and {what} must have the same shape, got student_logits "
      f"{tuple(student_logits.shape)} and {what} {tuple(teacher_logits.shape)}."
    )
  if student_logits.ndim < 1:
    raise ValueError(f"logits need a class axis, got a scalar of shape {tuple(student_logits.shape)}.")


def check_where(where: jax.typing.ArrayLike | None, logits_shape: tuple[int, ...]) -> jax.Array | None:
  """Checks a boolean class mask and broadcasts it to ``logits_shape`` (None stays None)."""
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
  try:
    np.broadcast_shapes(where.shape, logits_shape)
  except ValueError:
    raise ValueError(
      f"where of shape {tuple(where.shape)} does not broadcast against logits of shape {tuple(logits_shape)}."
    ) from None
  return jnp.broadcast_to(where, logits_shape)


def check_labels(labels: jax.Array, logits_shape: tuple[int, ...]) -> None:
  """Raises unless ``labels`` are integer class indices of shape ``logits_shape[:-1]``."""
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}.")
  if labels.shape != tuple(logits_shape[:-1]):
    raise ValueError(
      f"labels must have shape logits.shape[:-1] = {tuple(logits_shape[:-1])}, got {tuple(labels.shape)} "
      f"(logits {tuple(logits_shape)})."
    )


def check_label_range(labels: Any, num_classes: int, *, position_mask: Any = None) -> None:
  """Raises ValueError for concrete labels outside [0, num_classes) (at the positions ``position_mask`` keeps).

  Pass the caller's arguments as given: ``jnp.asarray`` under ``jit`` makes even a NumPy constant a tracer. Traced
  labels (or a traced mask) pass, and the losses make their out-of-range examples NaN instead. Call it after
  :func:`check_labels` and :func:`check_position_mask`, which fix the shapes.

  >>> check_label_range(np.array([0, 2]), 3)
  >>> check_label_range(np.array([0, -1]), 3)
  Traceback (most recent call last):
  ...
  ValueError: labels must be in [0, num_classes=3), got values in [-1, 0].
  """
  if isinstance(labels, jax.core.Tracer) or isinstance(position_mask, jax.core.Tracer):
    return
  values = np.asarray(labels)
  if position_mask is not None:
    values = values[np.broadcast_to(np.asarray(position_mask), values.shape)]
  if values.size and (values.min() < 0 or values.max() >= num_classes):
    raise ValueError(
      f"labels must be in [0, num_classes={num_classes}), got values in [{values.min()}, {values.max()}]."
    )


def check_position_mask(position_mask: jax.typing.ArrayLike | None, logits_shape: tuple[int, ...]) -> jax.Array | None:
  """Checks a boolean position mask of shape ``logits_shape[:-1]`` and returns it as an array (None stays None)."""
  if position_mask is None:
    return None
  position_mask = jnp.asarray(position_mask)
  if position_mask.dtype != jnp.bool_:
    raise TypeError(f"position_mask must be a boolean mask, got dtype {position_mask.dtype}.")
  if position_mask.shape != tuple(logits_shape[:-1]):
    raise ValueError(
      f"position_mask must have shape logits.shape[:-1] = {tuple(logits_shape[:-1])}, got "
      f"{tuple(position_mask.shape)} (logits {tuple(logits_shape)})."
    )
  return position_mask


def check_open_unit_interval(value: Any, name: str, hint: str = "") -> None:
  """Raises ValueError for a concrete ``value`` outside (0, 1); ``hint`` is appended to the message."""
  if isinstance(value, jax.core.Tracer):
    return
  array = np.asarray(value)
  if array.size and not np.all((array > 0) & (array < 1)):
    raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}.{hint}")


def check_closed_unit_interval(value: Any, name: str) -> None:
  """Raises ValueError for a concrete ``value`` (Python, NumPy or JAX, any shape) outside [0, 1]; traced values pass.

  >>> check_closed_unit_interval(np.array(1.5), "alpha")
  Traceback (most recent call last):
  ...
  ValueError: alpha must be in [0, 1], got array(1.5).
  """
  if isinstance(value, jax.core.Tracer):
    return
  if not isinstance(value, numbers.Number | np.ndarray | np.generic | jax.Array):
    raise TypeError(f"{name} must be a number or an array, got {type(value).__name__}: {value!r}.")
  array = np.asarray(value)
  # Written so that NaN fails too.
  if array.size and not np.all((array >= 0.0) & (array <= 1.0)):
    raise ValueError(f"{name} must be in [0, 1], got {value!r}.")


def _concrete_number(value: Any) -> float | None:
  """A concrete scalar's value (Python, NumPy or JAX), None for schedules and traced values."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, numbers.Number | np.ndarray | np.generic | jax.Array) and np.ndim(value) == 0:
    return float(np.asarray(value))
  raise TypeError(f"expected a number or a schedule (step -> value), got {type(value).__name__}: {value!r}.")


def check_alpha(alpha: Any, *, name: str = "alpha") -> None:
  """Raises ValueError for a concrete ``alpha`` outside [0, 1] (NumPy and JAX scalars included); schedules pass."""
  if _concrete_number(alpha) is not None:
    check_closed_unit_interval(alpha, name)


def check_weight(weight: Any, *, name: str = "weight") -> None:
  """Raises ValueError for a concrete loss weight that is negative or not finite; schedules pass."""
  value = _concrete_number(weight)
  if value is not None and not (np.isfinite(value) and value >= 0.0):
    raise ValueError(f"{name} must be a finite number >= 0, got {weight!r}.")


def check_temperature_or_schedule(temperature: Any, *, name: str = "temperature") -> None:
  """:func:`check_temperature` for numbers; a schedule ``step -> T`` passes (its values are traced)."""
  if not callable(temperature):
    check_temperature(temperature, name=name)


# ---------------------------------------------------------------- feature losses (jaxkd.losses)


def check_features(x: jax.Array, name: str, min_ndim: int = 2) -> None:
  """Raises ValueError for features with fewer than ``min_ndim`` axes."""
  if x.ndim < min_ndim:
    raise ValueError(f"{name} must have at least {min_ndim} axes ([batch, ..., channels]), got shape {tuple(x.shape)}.")


def check_feature_pair(student: jax.Array, teacher: jax.Array, student_name: str, teacher_name: str) -> None:
  """Raises ValueError unless two feature maps have the same shape, naming both."""
  if student.shape != teacher.shape:
    raise ValueError(
      f"{student_name} and {teacher_name} must have the same shape, got {student_name} {tuple(student.shape)} and "
      f"{teacher_name} {tuple(teacher.shape)}."
    )


def check_same_positions(student: jax.Array, teacher: jax.Array, what: str = "features") -> None:
  """Batch and spatial axes must agree; channel counts may differ."""
  if student.ndim != teacher.ndim or student.shape[:-1] != teacher.shape[:-1]:
    raise ValueError(
      f"student and teacher {what} must agree on all but the channel axis, got student {tuple(student.shape)} and "
      f"teacher {tuple(teacher.shape)}."
    )
