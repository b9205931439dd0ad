"""Distillation losses: pure functions in the optax style, one family a private file.

Every loss takes arrays first and hyperparameters keyword-only, returns per-example
values (the caller reduces) and computes in float32 whatever the input dtype.

================  ===================================================================
file              family
================  ===================================================================
``_hinton.py``    Hinton's soft targets: tempered softmax, KD, soft/hard cross-entropy
``_logit.py``     later logit losses: DKD, DIST, logit standardisation, reverse KL, GJSD
``_sparse.py``    top-k teacher targets for large vocabularies (the top-k cache's loss)
``_features.py``  feature losses: FitNet, AT, NST, FSP, VID
``_relations.py`` relation losses: SP, RKD, PKT, CC
``_crd.py``       contrastive representation distillation with its memory bank
================  ===================================================================
"""

from jaxkd.losses._crd import (
  CRDHeads,
  CRDMemory,
  crd_init_memory,
  crd_init_state,
  crd_log_normalizers,
  crd_loss,
  crd_sample_contrast_indices,
  crd_step,
  crd_update_memory,
)
from jaxkd.losses._features import (
  HintRegressor,
  VIDRegressor,
  attention_map,
  attention_transfer_loss,
  fitnet_loss,
  fsp_loss,
  fsp_matrix,
  nst_loss,
  vid_loss,
)
from jaxkd.losses._hinton import (
  distillation_loss,
  hard_cross_entropy,
  kd_loss,
  soft_cross_entropy,
  tempered_log_softmax,
  tempered_softmax,
)
from jaxkd.losses._logit import (
  dist_loss,
  dkd_loss,
  generalized_jsd_loss,
  reverse_kl_loss,
  standardize_logits,
  standardized_kd_loss,
)
from jaxkd.losses._relations import (
  cc_loss,
  pkt_loss,
  rkd_angle_loss,
  rkd_distance_loss,
  rkd_loss,
  similarity_preserving_loss,
)
from jaxkd.losses._sparse import TAIL_MODES, sparse_kd_loss, teacher_topk, topk_bytes_per_token

__all__ = [
  "CRDHeads",
  "CRDMemory",
  "HintRegressor",
  "TAIL_MODES",
  "VIDRegressor",
  "attention_map",
  "attention_transfer_loss",
  "cc_loss",
  "crd_init_memory",
  "crd_init_state",
  "crd_log_normalizers",
  "crd_loss",
  "crd_sample_contrast_indices",
  "crd_step",
  "crd_update_memory",
  "dist_loss",
  "distillation_loss",
  "dkd_loss",
  "fitnet_loss",
  "fsp_loss",
  "fsp_matrix",
  "generalized_jsd_loss",
  "hard_cross_entropy",
  "kd_loss",
  "nst_loss",
  "pkt_loss",
  "reverse_kl_loss",
  "rkd_angle_loss",
  "rkd_distance_loss",
  "rkd_loss",
  "similarity_preserving_loss",
  "soft_cross_entropy",
  "sparse_kd_loss",
  "standardize_logits",
  "standardized_kd_loss",
  "teacher_topk",
  "tempered_log_softmax",
  "tempered_softmax",
  "topk_bytes_per_token",
  "vid_loss",
]
