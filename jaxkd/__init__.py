"""jaxkd: knowledge distillation in JAX and Flax."""

from jaxkd import distributed, features, methods, relations
from jaxkd.losses import (
  dist_loss,
  distillation_loss,
  dkd_loss,
  generalized_jsd_loss,
  hard_cross_entropy,
  kd_loss,
  reverse_kl_loss,
  soft_cross_entropy,
  standardize_logits,
  standardized_kd_loss,
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
  "dist_loss",
  "distillation_loss",
  "distributed",
  "dkd_loss",
  "features",
  "generalized_jsd_loss",
  "from_nnx",
  "hard_cross_entropy",
  "kd_loss",
  "make_eval_step",
  "make_train_step",
  "methods",
  "relations",
  "reverse_kl_loss",
  "soft_cross_entropy",
  "standardize_logits",
  "standardized_kd_loss",
  "summarize_eval",
  "tempered_log_softmax",
  "tempered_softmax",
]
