"""jaxkd: knowledge distillation in JAX and Flax."""

from jaxkd import (
  crd,
  distributed,
  evaluation,
  features,
  hooks,
  lm,
  methods,
  objective,
  on_policy,
  relations,
  sharding,
  transformer,
)
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
from jaxkd.modeling import Model, from_nnx
from jaxkd.objective import LossTerm, Objective
from jaxkd.placement import Placement
from jaxkd.sparse_losses import sparse_kd_loss, teacher_topk
from jaxkd.state import TrainState, create_train_state
from jaxkd.train import make_eval_step, make_train_step, summarize_eval

__version__ = "0.1.0"

__all__ = [
  "LossTerm",
  "Model",
  "Objective",
  "Placement",
  "TrainState",
  "create_train_state",
  "crd",
  "dist_loss",
  "distillation_loss",
  "distributed",
  "evaluation",
  "hooks",
  "dkd_loss",
  "features",
  "generalized_jsd_loss",
  "from_nnx",
  "hard_cross_entropy",
  "kd_loss",
  "lm",
  "make_eval_step",
  "make_train_step",
  "methods",
  "objective",
  "on_policy",
  "relations",
  "reverse_kl_loss",
  "sharding",
  "soft_cross_entropy",
  "sparse_kd_loss",
  "standardize_logits",
  "standardized_kd_loss",
  "summarize_eval",
  "tempered_log_softmax",
  "teacher_topk",
  "tempered_softmax",
  "transformer",
]
