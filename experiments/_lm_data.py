"""lm_distill's variants and data: the students' names, the corpus, tokenizer and token windows, the top-k batches.

Kept apart from the training and the report so that both read the same definitions of what a variant is and what
it sees.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import ml_collections
import numpy as np

from experiments._cli import ConfigError
from jaxkd import artifacts


def variant_names(config: ml_collections.ConfigDict) -> list[str]:
  """The students of one seed, in the order they are trained and tabled."""
  topk = [f"topk_k{k}" for k in sorted(set(config.topk_ks), reverse=True)]
  equal_time = ["scratch_equal_time", *(["scratch_cached_time"] if topk else [])]
  return ["scratch", "dense_kd", *topk, "reverse_kl", "gjsd", *equal_time]


def cached_reference(config: ml_collections.ConfigDict) -> str:
  """The cached run whose wall time ``scratch_cached_time`` gets, and that the report compares with dense KD."""
  ks = sorted(set(config.topk_ks))
  return f"topk_k{32 if 32 in ks else ks[-1]}"


def equal_time_references(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Each equal-time scratch arm and the run whose measured time it is given."""
  return {"scratch_equal_time": "dense_kd", "scratch_cached_time": cached_reference(config)}


# ---------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
  """The corpus, tokenizer and token windows every sub-run reads."""

  corpus: Any
  tokenizer: Any
  vocab_size: int  # the tokenizer's actual size (at most config.vocab_size)
  train: Any  # TokenSequences
  test: Any
  info: dict


def prepare_data(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Data:
  """Corpus, BPE tokenizer (trained once, saved in the workdir) and the train and test token windows."""
  from jaxkd.lm import text

  corpus = text.CodeCorpus(config.corpus_root or None, max_bytes=config.max_bytes)
  for split in ("train", "test"):
    if not corpus.source_files(split):
      smallest = min((f.num_bytes for f in corpus.all_files if f.split == split), default=None)
      raise ConfigError(
        f"max_bytes={config.max_bytes} leaves the {split} split of {corpus.root} empty (its smallest file has "
        f"{smallest} bytes); raise --config.max_bytes."
      )
  tokenizer_path = workdir / "tokenizer.json"
  # A tokenizer of another corpus or size is rebuilt: every sub-run records the tokenizer's fingerprint, so the
  # sub-runs made with the old one are moved aside when they are next asked for.
  tokenizer = text.train_tokenizer(corpus, vocab_size=config.vocab_size, path=tokenizer_path, overwrite=True)
  tokens = {
    split: text.tokenize_split(corpus, tokenizer, split, path=workdir / "tokens" / f"{split}.npy", overwrite=True)
    for split in ("train", "test")
  }
  train = text.TokenSequences(tokens["train"], length=config.context)
  test = text.TokenSequences(tokens["test"], length=config.context)
  if len(train) < max(config.batch_size, config.teacher_batch_size):
    raise ConfigError(
      f"the training split has {len(train)} windows of {config.context} tokens, fewer than a batch "
      f"(batch_size={config.batch_size}, teacher_batch_size={config.teacher_batch_size}); raise max_bytes."
    )
  info = {
    "corpus": {
      "root": corpus.root,
      "fingerprint": corpus.fingerprint,
      "max_bytes": corpus.max_bytes,
      "files": {split: len(corpus.files(split)) for split in ("train", "test")},
      "bytes": {split: corpus.num_bytes(split) for split in ("train", "test")},
    },
    "tokenizer": {
      "path": str(tokenizer_path),
      "fingerprint": text.tokenizer_fingerprint(tokenizer),
      "vocab_size": tokenizer.get_vocab_size(),
    },
    "tokens": {split: int(len(array)) for split, array in tokens.items()},
    "windows": {"train": len(train), "test_targets": test.num_targets},
  }
  return Data(corpus, tokenizer, tokenizer.get_vocab_size(), train, test, info)


class StudentWindows:
  """The training windows the students see, in the order they see them: a grain source of ``{'tokens', 'label'}``.

  Drawn from :func:`jaxkd.lm.text.token_batches` with the students' batch size and data seed, so row ``i`` is the
  ``i``-th window of the live-teacher and scratch runs; the top-k cache is written over these rows.
  """

  def __init__(self, train: Any, *, batch_size: int, num_steps: int, seed: int):
    from jaxkd.lm import text

    batches = text.token_batches(train, batch_size=batch_size, seed=seed, shard_index=0, shard_count=1)
    drawn = [next(batches) for _ in range(num_steps)]
    self.tokens = np.concatenate([b["tokens"] for b in drawn])  # [num_steps * batch_size, length]
    self.label = np.concatenate([b["label"] for b in drawn])
    self.digest = artifacts.tree_fingerprint({"tokens": self.tokens, "label": self.label})

  def __len__(self) -> int:
    return len(self.tokens)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"tokens": self.tokens[index], "label": self.label[index]}

  def __repr__(self) -> str:  # stable: grain's checkpoints name a source by its repr
    return f"StudentWindows({len(self)} windows of {self.tokens.shape[1]}, sha256={self.digest[:16]})"


def topk_tail(k: int, config: ml_collections.ConfigDict) -> str:
  """The tail mode of the top-k run: ``config.tail``, but 'bucket' for k = 1 (see get_config)."""
  return "bucket" if k == 1 else config.tail


def _slice_topk(batch: dict[str, np.ndarray], *, k: int) -> dict[str, np.ndarray]:
  # The cache stores lax.top_k order: its first k columns are the top k, and the log-normaliser is unchanged.
  batch = dict(batch)
  for key in ("teacher_topk_logits", "teacher_topk_indices"):
    batch[key] = np.ascontiguousarray(batch[key][..., :k])
  return batch


def topk_batches(windows: StudentWindows, cache: Any, *, k: int, batch_size: int) -> Any:
  """The students' batches joined with the cache's top k, in order; a grain iterator with get_state/set_state."""
  import grain

  from jaxkd.lm import topk_cache

  dataset = grain.MapDataset.source(topk_cache.JoinedSource(windows, cache)).batch(batch_size, drop_remainder=True)
  if k < cache.k:
    dataset = dataset.map(functools.partial(_slice_topk, k=k))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
