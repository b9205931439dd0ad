"""What a trained model costs at inference: XLA's operation count of a forward pass and its measured latency.

Not to be confused with :func:`benchmarks.common.layer_matmul_flops`, which counts only the multiply-adds of
Dense and Conv layers from their shapes (what a training-step throughput is quoted against); the count here is
what XLA compiled, every operation included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def xla_forward_flops(apply_fn: Callable, variables: Any, example_input: np.ndarray) -> float:
  """XLA's cost-analysis count of floating-point operations of one compiled forward pass at batch 1.

  Every operation XLA kept counts (biases, activations, normalisation, as fused), so it is what a deployed
  forward does, and it can be compared across architectures of any layer kinds (the CNN teacher and the MLP
  student of cnn_to_mlp). The experiments' results call it ``flops_per_example``.
  """
  compiled = jax.jit(apply_fn).lower(variables, example_input[:1]).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, Sequence):  # older JAX returned a list with one dict per device
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def inference_latency(
  apply_fn: Callable, variables: Any, example_input: np.ndarray, *, batch_size: int, repeats: int = 50
) -> float:
  """Median seconds of a jit-compiled forward pass at ``batch_size``, after warm-up."""
  inputs = jax.device_put(np.repeat(example_input[:1], batch_size, axis=0))
  forward = jax.jit(apply_fn)
  for _ in range(3):
    jax.block_until_ready(forward(variables, inputs))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(forward(variables, inputs))
    times.append(time.perf_counter() - start)
  return float(np.median(times))
