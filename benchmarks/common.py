"""Shared benchmark machinery: interleaved timing, FLOP counting, matmul reference rate, tables, results files.

Timings on a shared machine drift with the load from other jobs. Every benchmark here therefore runs the
variants it compares in alternation (round 1: A, B, C; round 2: B, C, A; ...), times each in a block of
several calls ended by ``block_until_ready``, and reports medians over rounds. Ratios are the median of the
per-round ratios, so a load change between rounds cancels out of them.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import artifacts

__all__ = [
  "Timings",
  "Variant",
  "cpu_cores",
  "environment",
  "layer_matmul_flops",
  "host_variables",
  "import_torch",
  "interleave",
  "matmul_variant",
  "median_ratio",
  "print_table",
  "to_jsonable",
  "write_results",
]

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Variant:
  """One timed thing: ``run(n)`` does ``n`` units of work and returns only when they have finished.

  Attributes:
    name: label in tables and results.
    run: does ``n`` units (steps, matmuls, epochs) and blocks until the device is done.
    warmup: units run once before timing (compilation, first-call caches).
    units_per_block: fixed block size; None calibrates it to about ``block_s`` seconds.
  """

  name: str
  run: Callable[[int], Any]
  warmup: int = 2
  units_per_block: int | None = None


def cpu_cores() -> int:
  """Cores this process may run on (what XLA's CPU thread pool sizes itself to)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _calibrate(variant: Variant, block_s: float, max_units: int) -> int:
  n, elapsed = 1, 0.0
  while True:
    start = time.perf_counter()
    variant.run(n)
    elapsed = time.perf_counter() - start
    if elapsed >= block_s / 4 or n >= max_units:
      break
    n *= 4
  return max(1, min(max_units, round(n * block_s / max(elapsed, 1e-9))))


@dataclasses.dataclass
class Timings:
  """Seconds per unit of every round, per variant: wall-clock and this process's CPU time (all threads).

  On an oversubscribed machine wall time includes waiting for a core; CPU time counts only the cycles the
  process used, so its ratios are steadier under load (but include thread pools' spin-waiting).
  """

  wall: dict[str, list[float]]
  cpu: dict[str, list[float]]


def interleave(
  variants: Sequence[Variant], *, rounds: int, block_s: float = 0.3, max_units: int = 10_000, log: bool = False
) -> Timings:
  """Times variants in alternation.

  Each round runs every variant once for a block of units, in an order rotated by one position per round so
  that no variant always follows the same neighbour.
  """
  sizes = {}
  for variant in variants:
    if variant.warmup:
      variant.run(variant.warmup)
    sizes[variant.name] = variant.units_per_block or _calibrate(variant, block_s, max_units)
  timings = Timings({v.name: [] for v in variants}, {v.name: [] for v in variants})
  for r in range(rounds):
    order = [variants[(i + r) % len(variants)] for i in range(len(variants))]
    for variant in order:
      n = sizes[variant.name]
      wall, cpu = time.perf_counter(), time.process_time()
      variant.run(n)
      timings.cpu[variant.name].append((time.process_time() - cpu) / n)
      timings.wall[variant.name].append((time.perf_counter() - wall) / n)
    if log:
      print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.2f} ms" for k, v in timings.wall.items()))
  return timings


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
  """Median over rounds of ``numerator[r] / denominator[r]``."""
  return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def matmul_variant(size: int, dtype: Any = jnp.float32) -> tuple[Variant, float]:
  """A ``size``x``size`` jnp.dot as a variant, and its FLOPs per call (``2 * size**3``)."""
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=(size, size)), dtype) for _ in range(2))
  matmul = jax.jit(jnp.dot)

  def run(n: int) -> None:
    out = None
    for _ in range(n):
      out = matmul(a, b)
    jax.block_until_ready(out)

  return Variant(f"matmul_{size}", run, warmup=1), 2.0 * size**3


def layer_matmul_flops(model: nn.Module, variables: Any, example_input: Any) -> int:
  """The multiply-add FLOPs of the Dense and Conv layers of one inference forward pass, counted from their shapes.

  The count a training step's throughput is quoted against (``2 * params``-style arithmetic, the same for every
  framework), unlike :func:`experiments.common.xla_forward_flops` and :func:`benchmarks.lm_step.xla_cost`, which
  read XLA's cost analysis of a compiled computation (every operation it kept, as fused).

  For every ``nn.Dense`` and ``nn.Conv`` call: ``2 * output_elements * kernel_fan_in``, where the fan-in is
  the product of the kernel shape without its last (output) axis (``in`` for Dense, ``kh * kw * c_in`` for
  Conv). Biases, activations, normalisation and pooling are left out. Shapes come from ``jax.eval_shape``, so
  nothing runs.
  """
  total = 0

  def count(next_fun, args, kwargs, context):
    nonlocal total
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, nn.Dense | nn.Conv):
      kernel_shape = context.module.variables["params"]["kernel"].shape
      total += 2 * math.prod(out.shape) * math.prod(kernel_shape[:-1])
    return out

  with nn.intercept_methods(count):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, example_input)
  return total


def host_variables(model: nn.Module, example_input: Any, *, seed: int = 0) -> Any:
  """Variables of ``model``'s shapes filled with NumPy on the host: no XLA compilation of the initialisers.

  Kernels are drawn from N(0, 1 / fan_in); everything else is what flax initialises it to (biases and BatchNorm
  means 0, scales and variances 1). For teachers whose weights do not matter to a timing: compiling a
  ResNet's random initialisers takes seconds on a CPU.
  """
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), example_input)
  rng = np.random.default_rng(seed)

  def fill(path: Any, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
    name = getattr(path[-1], "key", None)
    if name == "kernel":
      fan_in = math.prod(leaf.shape[:-1])
      return rng.normal(0.0, 1.0 / math.sqrt(fan_in), size=leaf.shape).astype(leaf.dtype)
    if name in ("scale", "var"):
      return np.ones(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def import_torch(reason: str = "the PyTorch comparison") -> Any:
  """``torch`` when installed, else None after printing that ``reason`` is skipped."""
  try:
    import torch
  except ImportError:
    print(f"note: torch is not installed; skipping {reason} (pip install -e '.[bench]').")
    return None
  return torch


def environment(**extra: Any) -> dict[str, Any]:
  """Versions, devices and machine facts recorded with every result."""
  info = {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "local_device_count": jax.local_device_count(),
    "cpu_cores": cpu_cores(),
    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  try:
    import flax
    import optax

    info.update(flax=flax.__version__, optax=optax.__version__)
  except ImportError:  # pragma: no cover
    pass
  info.update(extra)
  return info


def _cell(value: Any) -> str:
  if isinstance(value, float):
    if not math.isfinite(value):
      return "-"
    if abs(value) >= 1000:
      return f"{value:,.0f}"
    if abs(value) >= 10:
      return f"{value:.1f}"
    return f"{value:.3f}"
  return "-" if value is None else str(value)


def print_table(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """Prints rows as a Markdown table under ``title`` and returns the table's text."""
  lines = [f"| {' | '.join(columns)} |", f"|{'|'.join('---' for _ in columns)}|"]
  lines += [f"| {' | '.join(_cell(row.get(c)) for c in columns)} |" for row in rows]
  text = "\n".join(lines)
  print(f"\n## {title}\n\n{text}\n", flush=True)
  return text


def to_jsonable(value: Any) -> Any:
  """``value`` with string keys, NumPy values as lists and numbers, and non-finite floats as None (JSON's null)."""
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [to_jsonable(v) for v in value]
  if isinstance(value, np.generic | np.ndarray):
    return value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_results(out_dir: str | os.PathLike | None, name: str, results: Mapping[str, Any]) -> pathlib.Path:
  """Writes ``results`` to ``out_dir/name.json`` (``benchmarks/results`` by default) and returns the path."""
  path = pathlib.Path(out_dir or DEFAULT_OUT) / f"{name}.json"
  artifacts.write_json(path, to_jsonable(results), indent=2, sort_keys=False)
  print(f"wrote {path}", flush=True)
  return path


def parse_sizes(text: str) -> tuple[int, ...]:
  """``"32,128"`` -> ``(32, 128)``."""
  return tuple(int(s) for s in text.split(",") if s.strip())


def dtype_of(name: str) -> Any:
  """``'float32'`` / ``'bfloat16'`` -> the jnp dtype."""
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
  except KeyError:
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {name!r}.") from None
