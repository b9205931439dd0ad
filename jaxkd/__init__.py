"""jaxkd: knowledge distillation in JAX and Flax."""

from jaxkd.losses import (
  distillation_loss,
  hard_cross_entropy,
  kd_loss,
  soft_cross_entropy,
  tempered_log_softmax,
  tempered_softmax,
)

__version__ = "0.1.0"

__all__ = [
  "distillation_loss",
  "hard_cross_entropy",
  "kd_loss",
  "soft_cross_entropy",
  "tempered_log_softmax",
  "tempered_softmax",
]
