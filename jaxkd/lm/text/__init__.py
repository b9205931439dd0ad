"""An offline text corpus for language-model distillation: Python source files, a byte-level BPE, token windows.

Three private files behind this face: ``_corpus`` (the corpus and its splits), ``_tokens`` (the tokenizer and the
token files with their records), ``_windows`` (windows, training batches, evaluation, bits per byte).

The corpus (:class:`CodeCorpus`) is the running interpreter's standard library: every ``.py`` file under
``sysconfig.get_paths()["stdlib"]``, except those under a directory named ``site-packages``, ``dist-packages``,
``test``, ``tests``, ``idlelib`` or ``__pycache__`` at any depth (installed packages are not the standard library;
the test suites and IDLE are large, repetitive and partly machine-generated). Any other directory can stand in
(``root=``). It needs no network and is on every machine that runs jaxkd, but its contents depend on the Python
version, so results name it by :attr:`CodeCorpus.fingerprint`, which covers every file's path, size and content
hash, the split fractions and the byte budget, and not where the files lie.

Each file is one document, assigned to ``'train'``, ``'validation'`` or ``'test'`` by a hash of its relative path
(90/5/5 by default): the split of a file never depends on which other files exist, so a new Python release moves
only the files it adds or removes.

The pipeline, each step cached on disk next to a JSON record (``<file>.meta.json``) of what it was made from:

1. :func:`train_tokenizer`: a byte-level BPE (Hugging Face ``tokenizers``) trained on the training split, with
   :data:`SEPARATOR` as its only special token. Byte level means every text round-trips exactly, so
   :func:`bits_per_byte` compares models with different tokenizers.
2. :func:`tokenize_split`: a split's documents, each preceded by the separator, concatenated into one uint16
   array saved as ``.npy`` (memory-mapped when read back) with a SHA-256 checksum.
3. :class:`TokenSequences`: the token array cut into windows of ``length`` predictions; :func:`token_batches`
   streams shuffled, per-process, resumable training batches from it with grain; :func:`eval_batches` walks a
   split once, in order, scoring every token but the first exactly once.

Batches are dicts of this process's rows, NumPy arrays:

* ``'tokens'``: int32 ``[batch, length]``, the model's input;
* ``'label'``: int32 ``[batch, length]``, the next token at each position (``label[:, t] = tokens[:, t + 1]``
  within a window, and the window's last label is the first token of the next window);
* ``'mask'``: bool ``[batch, length]``, :func:`eval_batches` only; False marks padding (whole padding rows and the
  unfilled end of the split's last window), whose tokens and labels are 0.

A file that was damaged after it was written (a checksum that does not match, a truncated array, an unreadable
record) is never used and never silently replaced: it raises :class:`jaxkd.data.DamagedDataError` naming the
file to delete, because damage on disk is worth a look and every file here is rebuilt by deleting it. A file made
from something else (another corpus, tokenizer, split or vocabulary size) raises ValueError naming both sides,
unless ``overwrite=True`` asks to rebuild it. Files are written under a temporary name and renamed, so a crash
or processes writing at once never leave a partial file under the final name.

Usage::

  corpus = CodeCorpus(max_bytes=8_000_000)
  tokenizer = train_tokenizer(corpus, vocab_size=8192, path=workdir / "tokenizer.json")
  train = TokenSequences(tokenize_split(corpus, tokenizer, "train", path=workdir / "train.npy"), length=128)
  batches = token_batches(train, batch_size=32, seed=0)          # infinite, resumable with get_state/set_state
  test = TokenSequences(tokenize_split(corpus, tokenizer, "test", path=workdir / "test.npy"), length=128)
  total_nats = sum(...)                                          # summed cross-entropy over eval_batches(test, ...)
  print(bits_per_byte(total_nats, corpus.num_bytes("test")))
"""

from jaxkd.lm.text._corpus import EXCLUDED_DIRS, SEPARATOR, SPLITS, CodeCorpus, SourceFile
from jaxkd.lm.text._tokens import load_tokens, tokenize_split, tokenizer_fingerprint, train_tokenizer
from jaxkd.lm.text._windows import (
  TokenBatches,
  TokenSequences,
  bits_per_byte,
  eval_batches,
  num_eval_batches,
  token_batches,
)

__all__ = [
  "EXCLUDED_DIRS",
  "SEPARATOR",
  "SPLITS",
  "CodeCorpus",
  "SourceFile",
  "TokenBatches",
  "TokenSequences",
  "bits_per_byte",
  "eval_batches",
  "load_tokens",
  "num_eval_batches",
  "token_batches",
  "tokenize_split",
  "tokenizer_fingerprint",
  "train_tokenizer",
]
