"""jaxkd: knowledge distillation in JAX and Flax.

The core sits at the top level (objective, methods, modeling, state, placement, sharding,
distributed, train); each family is a sub-package whose ``__init__`` is its face:
:mod:`jaxkd.losses`, :mod:`jaxkd.data`, :mod:`jaxkd.lm`, :mod:`jaxkd.training`. The README's
"Layout" section is the map.
"""

import sys as _sys

from jaxkd import (
  artifacts,
  data,
  distributed,
  lm,
  losses,
  methods,
  modeling,
  models,
  objective,
  placement,
  sharding,
  state,
  train,
  training,
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
  sparse_kd_loss,
  standardize_logits,
  standardized_kd_loss,
  teacher_topk,
  tempered_log_softmax,
  tempered_softmax,
)
from jaxkd.modeling import Model, from_nnx
from jaxkd.objective import LossTerm, Objective
from jaxkd.placement import Placement
from jaxkd.state import TrainState, create_train_state
from jaxkd.train import make_eval_step, make_train_step, summarize_eval
from jaxkd.training import fit

__version__ = "0.1.0"

# The flat module paths of jaxkd <= 0.1 (``jaxkd.trainer``, ``from jaxkd.topk_cache import ...``) name the
# same module objects in their new homes, so imports, attributes and monkeypatching keep working.
_MOVED = {
  "augment": data.augment,
  "checkpoint": training.checkpoint,
  "crd": losses._crd,
  "datasets": data.datasets,
  "evaluation": training.evaluation,
  "export": training.export,
  "features": losses._features,
  "hooks": training.hooks,
  "logit_cache": data.logit_cache,
  "logit_losses": losses._logit,
  "metrics": training.metrics,
  "on_policy": lm.on_policy,
  "preemption": training.preemption,
  "relations": losses._relations,
  "sparse_losses": losses._sparse,
  "text": lm.text,
  "topk_cache": lm.topk_cache,
  "trainer": training.loop,
  "transformer": lm.transformer,
  "utils": artifacts,
}
for _name, _module in _MOVED.items():
  _sys.modules[f"{__name__}.{_name}"] = _module
  globals()[_name] = _module
del _name, _module

__all__ = [
  "LossTerm",
  "Model",
  "Objective",
  "Placement",
  "TrainState",
  "artifacts",
  "create_train_state",
  "data",
  "dist_loss",
  "distillation_loss",
  "distributed",
  "dkd_loss",
  "fit",
  "from_nnx",
  "generalized_jsd_loss",
  "hard_cross_entropy",
  "kd_loss",
  "lm",
  "losses",
  "make_eval_step",
  "make_train_step",
  "methods",
  "modeling",
  "models",
  "objective",
  "placement",
  "reverse_kl_loss",
  "sharding",
  "soft_cross_entropy",
  "sparse_kd_loss",
  "standardize_logits",
  "standardized_kd_loss",
  "state",
  "summarize_eval",
  "teacher_topk",
  "tempered_log_softmax",
  "tempered_softmax",
  "train",
  "training",
]
