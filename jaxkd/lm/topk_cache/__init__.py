"""Sparse top-k teacher cache for language-model distillation, sharded so that each host reads only its part.

A dense teacher-logit cache (:mod:`jaxkd.data.logit_cache`) costs ``4 * vocab_size`` bytes per token, which for a
language model is hundreds of kilobytes per token. This cache keeps, per token of a fixed-length sequence dataset
(``N`` sequences of ``L`` tokens), only what a top-k distillation loss needs:

* ``topk_logits`` ``[N, L, k]`` float16: the teacher's ``k`` largest *raw* logits (not divided by the temperature),
  in decreasing order;
* ``topk_indices`` ``[N, L, k]``: their vocabulary ids, uint16 when ``vocab_size <= 65536`` and int32 otherwise;
* ``log_normalizer`` ``[N, L]`` float32: ``logsumexp(logits / T)`` over the *full* vocabulary at the cache's
  temperature ``T``, computed in float32 from the unrounded logits.

So the teacher's tempered log-probabilities of the cached classes are
``topk_logits / T - log_normalizer[..., None]``, and the mass of every other class (the tail bucket) is
``1 - sum(exp(...))``; after float16 rounding that sum can exceed 1 by a hair, so a loss should clip the tail
at 0 (or at a tiny positive value before taking its log).

Why float16 and not bfloat16: float16 keeps 10 mantissa bits to bfloat16's 7, so a logit near 30 is stored to
within 0.016 rather than 0.125 (a ~1.6% rather than ~13% error in its probability); numpy reads float16 natively,
so shards memory-map with plain ``np.load(mmap_mode='r')`` and need no ``ml_dtypes``; and float16's range
(+-65504) is far beyond any sane logit. Logits are clipped to that range before the cast (with a warning) so that
no value becomes inf. Why uint16 indices: a vocabulary of at most 65536 ids fits in 16 bits, which saves
``2 * k`` bytes per token over int32 (a third of the cache).

Bytes per token, ``k * (2 + index_bytes) + 4`` (:func:`cache_bytes_per_token`), against dense float32 logits
(``4 * vocab_size``); tests check every row against the formula and against a cache written to disk:

  ====  ==========  ===========  ===========  ===========  =============
  k     vocab_size  index dtype  top-k bytes  dense bytes  dense / top-k
  ====  ==========  ===========  ===========  ===========  =============
  8     32000       uint16       36           128000       3556x
  32    32000       uint16       132          128000       970x
  128   32000       uint16       516          128000       248x
  8     50257       uint16       36           201028       5584x
  32    50257       uint16       132          201028       1523x
  128   50257       uint16       516          201028       390x
  8     128256      int32        52           513024       9866x
  32    128256      int32        196          513024       2617x
  128   128256      int32        772          513024       665x
  ====  ==========  ===========  ===========  ===========  =============

(32000: Llama 2; 50257: GPT-2; 128256: Llama 3.) A billion tokens at ``k = 32`` take 132 GB instead of 128 TB.

On disk, a cache is a directory::

  shard-00000.topk_logits.npy      float16 [rows, L, k]
  shard-00000.topk_indices.npy     uint16 or int32 [rows, L, k]
  shard-00000.log_normalizer.npy   float32 [rows, L]
  shard-00000.token_digests.npy    uint64 [rows]: a hash of each sequence's tokens
  shard-00000.json                 the shard's sidecar: its rows and the size and SHA-256 of each file
  ...
  manifest.json                    written last: format version, key, k, vocab_size, length, temperature,
                                   dtypes, num_sequences, shard_size, every shard's sidecar record and the
                                   digest of all of these (jaxkd.artifacts.json_digest)

Shard ``s`` holds sequences ``[s * shard_size, min(N, (s + 1) * shard_size))``. Every file is written to a
temporary name and renamed, so a killed writer never leaves a partial file under a final name; a shard's sidecar
is written after its arrays, so a sidecar vouches for a complete shard. Rerunning :func:`write_topk_cache` after a
kill reuses every shard whose sidecar matches the run and whose files verify, and computes the rest. The
manifest, written only when every shard is done, is what :func:`open_topk_cache` requires.

Reading: :func:`open_topk_cache` checks the manifest's digest (a changed temperature or shard start would otherwise
give wrongly tempered or another sequence's targets; a manifest without one, from an older jaxkd, is refused until
:func:`write_topk_cache` is rerun, which reuses the verified shards), then checks it against the caller's key (a
fingerprint of teacher, corpus, tokenizer, k and temperature: :func:`topk_cache_key`) and checks that every shard
file exists with its recorded size, which costs a ``stat`` per file. The SHA-256 of a shard's files is checked when
this process first reads from that shard, not up front, so a host of a multi-host job reads and verifies only its
own shards (:meth:`TopKCache.process_shards`). Arrays are memory-mapped, so reading one sequence touches only its
rows.

The token digests let :class:`JoinedSource` check that sequence ``i`` of the token pipeline is the sequence the
teacher saw at row ``i``: a reordered, re-tokenised or different corpus is an error, not silently wrong targets.

Usage::

  key = topk_cache_key(
    teacher_fingerprint=tree_fingerprint(teacher_params), corpus_fingerprint=corpus_sha256,
    tokenizer_fingerprint=tokenizer_sha256, k=32, temperature=1.0, length=1024, vocab_size=32000)
  teacher_fn = jax.jit(lambda tokens: teacher.apply(teacher_params, tokens))   # [b, L] -> [b, L, V]
  write_topk_cache(workdir / "topk", teacher_fn, sequences, k=32, key=key, vocab_size=32000)  # once
  cache = open_topk_cache(workdir / "topk", key=key, k=32, vocab_size=32000, length=1024)
  rows = cache.process_rows(jax.process_index(), jax.process_count())
  ds = grain.MapDataset.source(JoinedSource(sequences, cache))[rows.start : rows.stop].shuffle(seed=0).batch(8)
"""

from jaxkd.lm.topk_cache._format import (
  ARRAYS,
  FORMAT_VERSION,
  MANIFEST,
  TopKCacheError,
  cache_bytes_per_token,
  index_dtype,
  topk_cache_key,
)
from jaxkd.lm.topk_cache._reader import JoinedSource, TopKCache, open_topk_cache
from jaxkd.lm.topk_cache._writer import write_topk_cache

__all__ = [
  "ARRAYS",
  "FORMAT_VERSION",
  "MANIFEST",
  "JoinedSource",
  "TopKCache",
  "TopKCacheError",
  "cache_bytes_per_token",
  "index_dtype",
  "open_topk_cache",
  "topk_cache_key",
  "write_topk_cache",
]
