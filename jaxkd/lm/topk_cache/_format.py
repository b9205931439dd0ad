"""The top-k cache's format: file names, dtypes, the key and the checks its reader and writer share.

Apart from :mod:`._reader` and :mod:`._writer` so that neither imports the other's internals: both name files,
check settings and report a key mismatch the same way. The names are public so the two modules can import them;
users import from :mod:`jaxkd.lm.topk_cache`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxkd import losses
from jaxkd.artifacts import ArtifactError, json_digest, read_json_object

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The manifest's field holding json_digest of the rest of it: what every reader trusts is what the writer wrote.
DIGEST = "digest"
# The arrays a reader gets per sequence, in the order of the loss's inputs; token digests are for checks only.
ARRAYS = ("topk_logits", "topk_indices", "log_normalizer")
FILES = (*ARRAYS, "token_digests")
LOGITS_DTYPE = np.dtype("<f2")
NORMALIZER_DTYPE = np.dtype("<f4")
DIGEST_DTYPE = np.dtype("<u8")
FLOAT16_MAX = float(np.finfo(np.float16).max)
# The header fields a shard's sidecar must share with the run for the shard to be reused.
SHARD_FIELDS = ("format_version", "key", "k", "vocab_size", "length", "temperature", "dtypes")
TEMPORARY = re.compile(r"^\.(shard-\d+\.[a-z_]+\.(npy|json)|manifest\.json)\.[0-9a-f]{32}\.tmp$")
SIDECAR = re.compile(r"^shard-\d+\.json$")


class TopKCacheError(ArtifactError):
  """A top-k teacher cache is missing, incomplete, written for other settings, or damaged (a ValueError)."""


def index_dtype(vocab_size: int) -> np.dtype:
  """The dtype of stored vocabulary ids: uint16 when every id fits in 16 bits (``vocab_size <= 65536``), else int32."""
  return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


def cache_bytes_per_token(k: int, vocab_size: int) -> int:
  """Bytes per token of this format's cache (:func:`jaxkd.losses.topk_bytes_per_token` of its dtypes)."""
  return losses.topk_bytes_per_token(k, logit_dtype=LOGITS_DTYPE, index_dtype=index_dtype(vocab_size))


def check_positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)


def check_settings(k: Any, vocab_size: Any, temperature: Any) -> tuple[int, int, float]:
  k, vocab_size = check_positive_int("k", k), check_positive_int("vocab_size", vocab_size)
  if k > vocab_size:
    raise ValueError(f"k ({k}) cannot exceed vocab_size ({vocab_size}); k = vocab_size already keeps every class.")
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
    raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
  return k, vocab_size, float(temperature)


def topk_cache_key(
  *,
  teacher_fingerprint: str,
  corpus_fingerprint: str,
  tokenizer_fingerprint: str,
  k: int,
  temperature: float,
  length: int,
  vocab_size: int,
  extra: Mapping[str, Any] | None = None,
) -> str:
  """Hex SHA-256 naming everything that sets a top-k cache's contents.

  The cache stores this key and :func:`open_topk_cache` refuses a cache whose key differs, so a cache written for
  another teacher, corpus, tokenizer or setting is never read by mistake.

  Args:
    teacher_fingerprint: identifies the teacher's variables and code, e.g.
      :func:`jaxkd.artifacts.tree_fingerprint` of its variables combined with
      :func:`jaxkd.data.logit_cache.describe` of its apply function.
    corpus_fingerprint: identifies the sequences (their source, filtering and order), e.g. a hash of the files.
    tokenizer_fingerprint: identifies the tokenizer (e.g. a hash of its vocabulary file).
    k: classes kept per token.
    temperature: the temperature of the stored log-normaliser.
    length: tokens per sequence.
    vocab_size: the teacher's number of classes.
    extra: further JSON-able facts that change the teacher's outputs (a dtype policy, a model revision).

  Returns:
    64 hex digits: the SHA-256 of a canonical JSON (sorted keys, no whitespace) of all the arguments.

  Raises:
    ValueError: a fingerprint is not a non-empty string, a setting is out of range, or ``extra`` is not JSON-able.
  """
  fingerprints = {"teacher": teacher_fingerprint, "corpus": corpus_fingerprint, "tokenizer": tokenizer_fingerprint}
  for name, value in fingerprints.items():
    if not isinstance(value, str) or not value:
      raise ValueError(f"{name}_fingerprint must be a non-empty string, got {value!r}.")
  k, vocab_size, temperature = check_settings(k, vocab_size, temperature)
  description = {
    "format_version": FORMAT_VERSION,
    "fingerprints": fingerprints,
    "k": k,
    "temperature": temperature,
    "length": check_positive_int("length", length),
    "vocab_size": vocab_size,
    "extra": dict(extra or {}),
  }
  try:
    # No `default=`: a repr could hold a memory address, which would give a new key in every run.
    return json_digest(description, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"extra must hold only JSON values (str, int, finite float, bool, None, lists and dicts), got {extra!r}: {e}. "
      "Describe other objects as strings first (e.g. jaxkd.data.logit_cache.describe)."
    ) from e


def token_digest(tokens: np.ndarray) -> int:
  """A 64-bit hash of one sequence's tokens, as int32, so that int32 and int64 token arrays hash alike."""
  data = np.ascontiguousarray(tokens, dtype="<i4").tobytes()
  return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def shard_name(shard: int) -> str:
  return f"shard-{shard:05d}"


def key_mismatch(directory: str, found: str, wanted: str) -> TopKCacheError:
  return TopKCacheError(
    f"{directory} holds a top-k cache written under key {found}, not the key asked for, {wanted}: another teacher, "
    "corpus, tokenizer, k, temperature or length. Point to another directory, or delete this one (rm -r "
    f"{directory}) and run write_topk_cache to rebuild it."
  )


def manifest_digest(manifest: Mapping[str, Any]) -> str:
  """:func:`jaxkd.artifacts.json_digest` of a manifest's fields other than its digest."""
  return json_digest({name: value for name, value in manifest.items() if name != DIGEST})


def manifest_fault(path: str, manifest: Mapping[str, Any]) -> str | None:
  """Why a manifest's content cannot be trusted (no digest, or one that does not match it); None when it verifies."""
  if DIGEST not in manifest:
    return (
      f"{path} has no digest: it was written by an older jaxkd (format version {manifest.get('format_version')!r}, "
      "before manifests carried one) or its digest field was damaged, so a changed field could not be told"
    )
  if manifest[DIGEST] != manifest_digest(manifest):
    return (
      f"{path} fails its digest check (its content changed after it was written: disk damage, a bad copy or an "
      "edit), so its temperature, settings or shard rows cannot be trusted"
    )
  return None


def read_manifest_json(path: str, what: str) -> dict[str, Any]:
  """The JSON object in a manifest or shard sidecar; :class:`TopKCacheError` naming it when it cannot be read."""
  return read_json_object(
    path,
    what=f"the {what}",
    remedy="It is written atomically, so it was changed afterwards: delete it and rerun write_topk_cache, which "
    "reuses every shard that still verifies.",
    error=TopKCacheError,
  )
