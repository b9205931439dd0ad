"""Training around the step: the loop, its hooks, checkpoints, metrics, evaluation, export.

================  ======================================================================
module            job
================  ======================================================================
``loop``          ``fit``: a short loop over a step and hooks, resumable
``hooks``         the hooks: metrics, evaluation, checkpoints, non-finite guard, preemption
``checkpoint``    orbax checkpoints with integrity digests and fallback past damage
``metrics``       metrics to ``metrics.jsonl`` and TensorBoard
``preemption``    SIGTERM and multi-host preemption sync points
``evaluation``    evaluation over a split with padded, masked batches
``export``        ``jax.export`` of a trained student for inference
================  ======================================================================
"""

from jaxkd.training import checkpoint, evaluation, export, hooks, loop, metrics, preemption
from jaxkd.training.checkpoint import Checkpointer, load_variables
from jaxkd.training.evaluation import evaluate
from jaxkd.training.export import export_forward, load_exported
from jaxkd.training.hooks import (
  Callback,
  CheckpointHook,
  EvalHook,
  Hook,
  Loop,
  MetricsHook,
  NonFiniteHook,
  PreemptionHook,
)
from jaxkd.training.loop import FitResult, NonFiniteLossError, fit
from jaxkd.training.metrics import MetricsWriter, read_metrics
from jaxkd.training.preemption import PreemptionGuard

__all__ = [
  "Callback",
  "CheckpointHook",
  "Checkpointer",
  "EvalHook",
  "FitResult",
  "Hook",
  "Loop",
  "MetricsHook",
  "MetricsWriter",
  "NonFiniteHook",
  "NonFiniteLossError",
  "PreemptionGuard",
  "PreemptionHook",
  "checkpoint",
  "evaluate",
  "evaluation",
  "export",
  "export_forward",
  "fit",
  "hooks",
  "load_exported",
  "load_variables",
  "loop",
  "metrics",
  "preemption",
  "read_metrics",
]
