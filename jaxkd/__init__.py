"""jaxkd: knowledge distillation in JAX and Flax."""

from jaxkd import distributed
from jaxkd.losses import (
  distillation_loss,
  hard_cross_entropy,
  kd_loss,
  soft_cross_entropy,
  tempered_log_softmax,
  tempered_softmax,
)
from jaxkd.train import (
  TrainState,
  create_train_state,
  from_nnx,
  make_eval_step,
  make_train_step,
  summarize_eval,
)

__version__ = "0.1.0"

__all__ = [
  "TrainState",
  "create_train_state",
  "distillation_loss",
  "distributed",
  "from_nnx",
  "hard_cross_entropy",
  "kd_loss",
  "make_eval_step",
  "make_train_step",
  "soft_cross_entropy",
  "summarize_eval",
  "tempered_log_softmax",
  "tempered_softmax",
]
