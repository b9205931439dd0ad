"""Language-model distillation: token-level objectives, the top-k cache, text, on-policy KD.

================  ======================================================================
module            job
================  ======================================================================
``objectives``    token-level KD objectives and the chunked-head model adapter
``topk_cache``    the teacher's top-k next-token targets, written once, read by shards
``text``          the standard-library code corpus, a byte-level BPE, token streaming
``transformer``   a small decoder-only transformer with a KV-cached sampler
``on_policy``     GKD and sequence-level KD: continuations sampled beside the step
================  ======================================================================
"""

from jaxkd.lm import objectives, on_policy, text, topk_cache, transformer
from jaxkd.lm.objectives import KINDS, TOPK_KEYS, lm_model, lm_objective, sparse_kd, token_kd
from jaxkd.lm.on_policy import Completions
from jaxkd.lm.topk_cache import JoinedSource, TopKCache, TopKCacheError, open_topk_cache, write_topk_cache
from jaxkd.lm.transformer import TransformerLM, lm_config

__all__ = [
  "KINDS",
  "TOPK_KEYS",
  "Completions",
  "JoinedSource",
  "TopKCache",
  "TopKCacheError",
  "TransformerLM",
  "lm_config",
  "lm_model",
  "lm_objective",
  "objectives",
  "on_policy",
  "open_topk_cache",
  "sparse_kd",
  "text",
  "token_kd",
  "topk_cache",
  "transformer",
  "write_topk_cache",
]
