"""PNG plots of experiment results with a non-interactive backend (matplotlib is imported only when one is drawn)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence


def plot_lines(
  path: os.PathLike | str,
  series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
  *,
  xlabel: str,
  ylabel: str,
  title: str = "",
  logx: bool = False,
  hlines: Mapping[str, float] | None = None,
) -> None:
  """One line per named ``(x, y)`` series, saved as PNG with a non-interactive backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for name, (xs, ys) in series.items():
    ax.plot(xs, ys, marker="o", label=name)
  for name, y in (hlines or {}).items():
    ax.axhline(y, linestyle="--", linewidth=1, label=name, color="grey" if "scratch" in name else "black")
  if logx:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_bars(
  path: os.PathLike | str,
  values: Mapping[str, float],
  *,
  ylabel: str,
  title: str = "",
  errors: Mapping[str, float] | None = None,
  hlines: Mapping[str, float] | None = None,
) -> None:
  """A bar per named value (optional error bars and reference lines), saved as PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(values)
  fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 4))
  yerr = [errors.get(n, 0.0) for n in names] if errors else None
  ax.bar(names, [values[n] for n in names], yerr=yerr, capsize=3)
  for i, (name, y) in enumerate((hlines or {}).items()):
    ax.axhline(y, linestyle="--", linewidth=1, label=name, color=f"C{i + 1}")  # C0 is the bars' colour
  lo = min(list(values.values()) + list((hlines or {}).values()))
  hi = max(list(values.values()) + list((hlines or {}).values()))
  ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if hlines:
    ax.legend()
  plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
