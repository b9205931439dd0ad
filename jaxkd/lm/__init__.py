"""Language-model distillation: token-level objectives, the top-k cache, text, on-policy KD.

================  ======================================================================
module            job
================  ======================================================================
``objectives``    token-level KD objectives and the model adapter that keeps the output head apart
``chunked``       the step's output head applied a chunk of positions at a time (``chunk_size=``)
``topk_cache``    the teacher's top-k next-token targets, written once, read by shards
``text``          the standard-library code corpus, a byte-level BPE, token streaming
``transformer``   a small decoder-only transformer with a KV-cached sampler
``on_policy``     GKD and sequence-level KD: continuations sampled beside the step
================  ======================================================================
"""

from jaxkd.lm import chunked, objectives, on_policy, text, topk_cache, transformer
from jaxkd.lm.chunked import ChunkedHeads
from jaxkd.lm.objectives import KINDS, TOPK_KEYS, lm_model, lm_objective, sparse_kd, token_kd
from jaxkd.lm.on_policy import Completions
from jaxkd.lm.topk_cache import JoinedSource, TopKCache, TopKCacheError, open_topk_cache, write_topk_cache
from jaxkd.lm.transformer import TransformerLM, lm_config

__all__ = [
  "ChunkedHeads",
  "Completions",
  "JoinedSource",
  "KINDS",
  "TOPK_KEYS",
  "TopKCache",
  "TopKCacheError",
  "TransformerLM",
  "chunked",
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
