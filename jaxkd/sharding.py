"""Partition rules: which parameter is split over which mesh axis, by its path.

A teacher bigger than one device is split over the ``'model'`` axis of a 2-D mesh (``('data', 'model')``, see
:meth:`jaxkd.Placement.sharded`); the step then runs data-parallel over ``'data'`` and lets XLA gather each
weight where it is used (FSDP-style: every device keeps ``1/model`` of each split array). This module decides the
:class:`~jax.sharding.PartitionSpec` of every leaf of a tree:

* **rules** are ``(regex, PartitionSpec)`` pairs matched against a leaf's path, written ``params/Dense_0/kernel``
  (a train state's optimizer moments end in the same path, ``opt_state/0/mu/Dense_0/kernel``, so one rule places
  a parameter and its Adam moments alike). The first rule whose regex is found in the path (``re.search``) wins;
  leaves no rule matches are replicated. A rule that matches no leaf is an error (a typo would otherwise silently
  replicate a large teacher), and so is a spec whose mesh axes do not divide the dimension it splits.
* **no rules** (``rules=None``) is the default: every floating leaf is split along its largest dimension that the
  model axis divides, as Tunix's and MaxText's FSDP defaults do; leaves with no such dimension (a bias of odd size,
  scalars) and non-floating leaves (step counters, PRNG keys) are replicated.

Example::

  rules = [(r"Dense_\\d+/kernel", P(None, "model")), (r"Embed_0/embedding", P("model", None))]
  specs = jaxkd.sharding.partition_specs(teacher_variables, axis_sizes={"data": 2, "model": 4}, rules=rules)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

__all__ = ["Rules", "path_name", "fsdp_spec", "partition_specs"]

PyTree = Any
Rules = Sequence[tuple[str, P]]


def path_name(path: tuple) -> str:
  """A leaf's path as rules match it: ``params/Dense_0/kernel`` (dict keys, attributes and indices alike)."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_floating(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return False
  return bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))  # NumPy's own issubdtype misses bfloat16


def fsdp_spec(shape: Sequence[int], *, axis: str, size: int) -> P:
  """Splits the largest dimension of ``shape`` that ``size`` divides over ``axis`` (the first of equal ones);
  ``P()`` (replicated) when none does or the array is a scalar."""
  candidates = [(dim, i) for i, dim in enumerate(shape) if dim >= size and dim % size == 0]
  if size == 1 or not candidates:
    return P()
  _, index = max(candidates, key=lambda c: (c[0], -c[1]))
  return P(*([None] * index), axis)


def _spec_axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def _check_spec(name: str, shape: tuple[int, ...], spec: P, axis_sizes: Mapping[str, int], rule: str) -> None:
  if len(spec) > len(shape):
    raise ValueError(
      f"partition rule {rule!r} gives {name} (shape {shape}) the spec {spec}, which names {len(spec)} dimensions; "
      f"the array has {len(shape)}. Write a spec with at most {len(shape)} entries."
    )
  for dim, entry in enumerate(spec):
    axes = _spec_axes(entry)
    unknown = [a for a in axes if a not in axis_sizes]
    if unknown:
      raise ValueError(
        f"partition rule {rule!r} splits {name} over mesh axes {unknown}, which the mesh {dict(axis_sizes)} lacks."
      )
    ways = math.prod(axis_sizes[a] for a in axes)
    if shape[dim] % ways:
      raise ValueError(
        f"partition rule {rule!r} splits dimension {dim} of {name} (shape {shape}, size {shape[dim]}) over "
        f"{'x'.join(axes)} = {ways} devices, which does not divide it. Choose a mesh whose "
        f"{'x'.join(axes)} size divides {shape[dim]}, or a rule that splits another dimension."
      )


def partition_specs(
  tree: PyTree, *, axis_sizes: Mapping[str, int], model_axis: str = "model", rules: Rules | None = None
) -> PyTree:
  """The :class:`PartitionSpec` of every leaf of ``tree`` (a tree of the same structure).

  Args:
    tree: arrays (or anything with ``shape`` and ``dtype``): variables, a train state.
    axis_sizes: the mesh's axis sizes, ``{'data': 2, 'model': 4}`` (``dict(mesh.shape)``).
    model_axis: the axis the default rule splits over.
    rules: ``(regex, PartitionSpec)`` pairs, first match wins, unmatched leaves replicated; None for the FSDP
      default described in the module docstring.

  Raises:
    ValueError: a rule that matches no leaf, a spec longer than its array, naming an axis the mesh lacks, or
      splitting a dimension its axes do not divide. Each message names the rule, the leaf and the fix.
  """
  if model_axis not in axis_sizes:
    raise ValueError(f"the mesh {dict(axis_sizes)} has no model axis {model_axis!r} to split parameters over.")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  if rules is None:
    size = axis_sizes[model_axis]
    specs = [fsdp_spec(np.shape(leaf), axis=model_axis, size=size) if _is_floating(leaf) else P() for _, leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, specs)

  compiled = []
  for rule in rules:
    if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[1], P)):
      raise ValueError(f"a partition rule is a (regex, PartitionSpec) pair, got {rule!r}.")
    try:
      compiled.append((rule[0], re.compile(rule[0]), rule[1]))
    except re.error as error:
      raise ValueError(f"partition rule {rule[0]!r} is not a valid regular expression: {error}.") from None
  used = [False] * len(compiled)
  specs = []
  for path, leaf in leaves:
    name = path_name(path)
    spec = P()
    for i, (pattern, regex, rule_spec) in enumerate(compiled):
      if regex.search(name):
        used[i] = True
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
          break  # keys stay replicated whatever a broad rule says
        _check_spec(name, tuple(np.shape(leaf)), rule_spec, axis_sizes, pattern)
        spec = rule_spec
        break
    specs.append(spec)
  unused = [pattern for (pattern, _, _), hit in zip(compiled, used, strict=True) if not hit]
  if unused:
    examples = ", ".join(path_name(p) for p, _ in leaves[:6])
    raise ValueError(
      f"partition rules {unused} match no leaf of the tree (its paths look like: {examples}). Rules are regular "
      "expressions searched in these paths; fix the pattern or drop the rule."
    )
  return jax.tree_util.tree_unflatten(treedef, specs)
