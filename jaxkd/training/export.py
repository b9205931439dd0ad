"""Export: serialise a trained student's forward pass with ``jax.export`` for inference without jaxkd/Flax.

The artifact bakes the variables in and has a symbolic batch dimension, so any
program with jax (and no jaxkd, Flax or model code) can load and call it.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["export_forward", "load_exported"]

PyTree = Any


def export_forward(
  apply_fn: Callable[..., jax.Array],
  variables: PyTree,
  example_input: jax.typing.ArrayLike,
  path: os.PathLike | str,
  *,
  platforms: tuple[str, ...] | None = None,
) -> pathlib.Path:
  """Serialises the forward pass ``images -> logits`` (T=1, eval mode) with ``jax.export``.

  The variables are baked in as constants, and the batch dimension is symbolic,
  so the artifact runs on any batch size without jaxkd, Flax or the model's code:
  ``jax.export.deserialize(path.read_bytes()).call(images)``.

  Args:
    apply_fn: ``apply_fn(variables, images, train=False) -> logits``.
    variables: ``{'params', 'batch_stats'}`` of the student.
    example_input: an input batch fixing the non-batch shape and dtype.
    path: the file to write.
    platforms: target platforms (default: the current backend), e.g. ``('cpu', 'cuda')``.

  Returns:
    The path written.
  """
  example_input = np.asarray(example_input)
  variables = jax.device_get(variables)

  def forward(images: jax.Array) -> jax.Array:
    return apply_fn(variables, images, train=False)

  (batch,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((batch, *example_input.shape[1:]), example_input.dtype)
  exported = jax.export.export(jax.jit(forward), platforms=platforms)(spec)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(exported.serialize())
  return path


def load_exported(path: os.PathLike | str) -> Callable[[jax.typing.ArrayLike], jax.Array]:
  """Loads a :func:`export_forward` artifact as a function ``images -> logits``."""
  exported = jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
  return exported.call
