"""Statistics and tables over per-seed results: mean ± std, paired per-seed differences, markdown tables.

Kept apart from training so that a report writer is a few functions over a results table, testable without a run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def mean_std(values: Iterable[float]) -> dict[str, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  values = [float(v) for v in values]
  return {
    "mean": statistics.fmean(values),
    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    "n": len(values),
  }


def paired_difference(values: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
  """Per-seed differences ``values[i] - reference[i]`` (the same seed's runs), their mean, std and a verdict.

  Runs of one seed share initialisation and data order, so their difference removes most of the seed-to-seed
  variation that an unpaired mean ± std comparison would count twice. The verdict is ``'above'`` or ``'below'``
  when every seed's difference has the same sign and the mean difference exceeds the differences' own standard
  deviation, ``'tie'`` otherwise, and ``None`` for a single seed (no spread to compare with).
  """
  if len(values) != len(reference) or not values:
    raise ValueError(
      f"paired_difference needs one value per seed on both sides, got {len(values)} and {len(reference)}"
    )
  differences = [float(v) - float(r) for v, r in zip(values, reference, strict=True)]
  stats = mean_std(differences)
  verdict = None
  if len(differences) > 1:
    same_sign = all(d > 0 for d in differences) or all(d < 0 for d in differences)
    beyond = same_sign and abs(stats["mean"]) > stats["std"]
    verdict = ("above" if stats["mean"] > 0 else "below") if beyond else "tie"
  return {**stats, "differences": differences, "verdict": verdict}


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
  """A GitHub-markdown table; floats get 4 decimals (1 from 100 up), mean/std dicts print as ``m ± s``."""
  if not rows:
    raise ValueError("markdown_table needs at least one row")
  columns = list(columns or rows[0].keys())

  def number(value: float, like: float) -> str:
    # Decimals follow the magnitude of ``like``, so a mean and its std print alike.
    if math.isnan(value):
      return "nan"
    if abs(like) >= 1e6 or (like != 0 and abs(like) < 1e-3):
      return f"{value:.4g}"
    return f"{value:.1f}" if abs(like) >= 100 else f"{value:.4f}"

  def cell(value: Any) -> str:
    if isinstance(value, Mapping) and "mean" in value:
      return f"{number(value['mean'], value['mean'])} ± {number(value['std'], value['mean'])}"
    if isinstance(value, float):
      return number(value, value)
    return str(value)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
  return "\n".join(lines) + "\n"
