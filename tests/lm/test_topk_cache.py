"""Tests for jaxkd.lm.topk_cache: exact top-k round trip, resumption, lazy verification, sharding and the grain join."""

import concurrent.futures
import hashlib
import json
import logging
import os
import pickle
import re
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import artifacts
from jaxkd.lm import topk_cache
from jaxkd.lm.topk_cache import JoinedSource, TopKCacheError, open_topk_cache, topk_cache_key, write_topk_cache

V, L, N, SHARD, K, T = 50, 8, 13, 4, 5, 2.0  # Shards of 4, 4, 4 and 1 sequences.
_rng = np.random.default_rng(0)
W = (3 * _rng.normal(size=(V, V))).astype(np.float32)  # The fake teacher: logits = one_hot(tokens) @ W.
TOKENS = _rng.integers(0, V, size=(N, L), dtype=np.int32)


def teacher_fn(tokens):
  return jnp.asarray(W)[tokens]  # [b, L, V]


class Source:
  """A token pipeline's random-access source: ``{'tokens', 'label'}`` dicts."""

  def __init__(self, tokens):
    self.tokens = tokens

  def __len__(self):
    return len(self.tokens)

  def __getitem__(self, i):
    return {"tokens": self.tokens[i], "label": np.roll(self.tokens[i], -1)}

  def __repr__(self):
    return "Source()"


class CountingTeacher:
  """``teacher_fn`` called per batch (with ``jit=False``) that counts calls and can die like a killed process."""

  def __init__(self, die_on_call=None):
    self.calls, self.die_on_call = 0, die_on_call
    self.forward = jax.jit(teacher_fn)

  def __call__(self, tokens):
    self.calls += 1
    if self.calls == self.die_on_call:
      raise RuntimeError("killed")
    return self.forward(tokens)


def make_key(**changes):
  parts = dict(teacher_fingerprint="teacher", corpus_fingerprint="corpus", tokenizer_fingerprint="tok")
  parts.update(k=K, temperature=T, length=L, vocab_size=V)
  return topk_cache_key(**{**parts, **changes})


KEY = make_key()


def write(directory, teacher=teacher_fn, sequences=None, **kwargs):
  settings = dict(k=K, key=KEY, vocab_size=V, temperature=T, batch_size=4, shard_size=SHARD, progress=False)
  settings.update(kwargs)
  return write_topk_cache(directory, teacher, Source(TOKENS) if sequences is None else sequences, **settings)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("topk") / "cache"
  write(directory)
  return directory


@pytest.fixture
def copy(cache_dir, tmp_path):
  """A private copy of the written cache, for tests that damage it."""
  return shutil.copytree(cache_dir, tmp_path / "cache")


def file_hashes(directory):
  return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in sorted(os.listdir(directory))}


def test_round_trip_equals_lax_top_k(cache_dir):
  cache = open_topk_cache(cache_dir, key=KEY, k=K, vocab_size=V, length=L)
  logits = W[TOKENS]  # [N, L, V]
  values, indices = jax.lax.top_k(jnp.asarray(logits), K)
  assert len(cache) == N and (cache.k, cache.vocab_size, cache.length, cache.key) == (K, V, L, KEY)
  assert cache.shard_ranges == [(0, 4), (4, 8), (8, 12), (12, 13)]
  batch = cache.read(np.arange(N))
  assert batch["topk_logits"].dtype == np.float16 and batch["topk_logits"].shape == (N, L, K)
  assert batch["topk_indices"].dtype == np.uint16 and batch["log_normalizer"].dtype == np.float32
  np.testing.assert_array_equal(batch["topk_indices"], np.asarray(indices))
  # Raw logits, rounded once to float16: within half a float16 ulp of the teacher's.
  np.testing.assert_array_equal(batch["topk_logits"], np.asarray(values).astype(np.float16))
  np.testing.assert_allclose(batch["topk_logits"], np.asarray(values), rtol=2**-11)
  log_normalizer = np.log(np.exp(logits.astype(np.float64) / T).sum(-1))
  np.testing.assert_allclose(batch["log_normalizer"], log_normalizer, rtol=1e-5, atol=1e-5)
  # One sequence, a batch in any order across shards, and negative indices agree.
  order = np.array([12, 0, 5, 5, 11, -1])
  gathered = cache.read(order)
  for row, i in enumerate(order):
    for name, value in cache[i].items():
      np.testing.assert_array_equal(gathered[name][row], value)
      np.testing.assert_array_equal(value, batch[name][i])
  with pytest.raises(IndexError, match="out of range"):
    cache[N]
  with pytest.raises(IndexError, match=r"indices \[-14, 13\] are out of range"):
    cache.read([0, -14, 13])


def test_an_array_of_sequences_gives_the_same_cache(cache_dir, tmp_path):
  write(tmp_path, sequences=TOKENS, batch_size=3)  # Another batching too: batches never cross shards.
  assert file_hashes(tmp_path) == file_hashes(cache_dir)


def test_k_equal_to_vocab_keeps_every_class(tmp_path):
  cache = write(tmp_path, k=V, key=make_key(k=V))
  batch = cache.read(np.arange(N))
  np.testing.assert_array_equal(np.sort(batch["topk_indices"], axis=-1), np.broadcast_to(np.arange(V), (N, L, V)))
  # With every class kept, the normaliser is the logsumexp of the stored logits (up to their float16 rounding).
  stored = batch["topk_logits"].astype(np.float64) / T
  np.testing.assert_allclose(np.log(np.exp(stored).sum(-1)), batch["log_normalizer"], rtol=1e-3)


def test_a_vocabulary_over_65536_stores_int32_indices(tmp_path):
  vocab_size = 70_000
  cache = write(
    tmp_path,
    lambda tokens: jnp.sin(tokens[..., None] * jnp.arange(vocab_size) * 1e-3),
    sequences=TOKENS[:3, :2],
    k=4,
    vocab_size=vocab_size,
    key="big",
  )
  assert cache.index_dtype == np.int32 and cache[0]["topk_indices"].dtype == np.int32
  assert cache.bytes_per_token == topk_cache.cache_bytes_per_token(4, vocab_size) == 4 * (2 + 4) + 4
  assert topk_cache.index_dtype(65_536) == np.uint16 and topk_cache.index_dtype(65_537) == np.int32


def test_bytes_per_token_is_the_formula_on_disk_and_in_the_docstring_table(cache_dir):
  cache = open_topk_cache(cache_dir, key=KEY)
  assert cache.bytes_per_token == topk_cache.cache_bytes_per_token(K, V) == K * (2 + 2) + 4
  # The three arrays' files hold exactly that payload plus one .npy header each.
  files = [name for name in os.listdir(cache_dir) if name.endswith(tuple(f".{a}.npy" for a in topk_cache.ARRAYS))]
  headers = sum(os.path.getsize(cache_dir / name) - np.load(cache_dir / name).nbytes for name in files)
  payload = sum(os.path.getsize(cache_dir / name) for name in files) - headers
  assert len(files) == 3 * cache.num_shards and payload == cache.bytes_per_token * N * L
  assert 0 < headers <= 128 * len(files)
  rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(uint16|int32)\s+(\d+)\s+(\d+)\s+(\d+)x$", topk_cache.__doc__, re.M)
  assert len(rows) == 9
  for k, vocab_size, dtype, sparse, dense, ratio in rows:
    k, vocab_size = int(k), int(vocab_size)
    assert topk_cache.index_dtype(vocab_size) == np.dtype(dtype)
    assert int(sparse) == topk_cache.cache_bytes_per_token(k, vocab_size)
    assert int(dense) == 4 * vocab_size and int(ratio) == round(4 * vocab_size / int(sparse))


def test_key_is_canonical_and_changes_with_every_part():
  assert re.fullmatch(r"[0-9a-f]{64}", KEY) and make_key() == KEY
  assert make_key(extra={"a": 1, "b": [2]}) == make_key(extra={"b": [2], "a": 1})
  changes = [
    {"teacher_fingerprint": "other"},
    {"corpus_fingerprint": "other"},
    {"tokenizer_fingerprint": "other"},
    {"k": K + 1},
    {"temperature": 1.0},
    {"length": L + 1},
    {"vocab_size": V + 1},
    {"extra": {"dtype": "bfloat16"}},
  ]
  assert len({KEY, *(make_key(**change) for change in changes)}) == len(changes) + 1
  with pytest.raises(ValueError, match="JSON"):
    make_key(extra={"fn": object()})
  with pytest.raises(ValueError, match="corpus_fingerprint"):
    make_key(corpus_fingerprint="")
  with pytest.raises(ValueError, match="cannot exceed vocab_size"):
    make_key(k=V + 1)


def test_opening_the_wrong_cache_is_an_error_that_says_what_to_do(cache_dir, tmp_path):
  with pytest.raises(TopKCacheError, match="run write_topk_cache first"):
    open_topk_cache(tmp_path, key=KEY)
  other = make_key(teacher_fingerprint="another teacher")
  with pytest.raises(TopKCacheError, match=f"{KEY}.*{other}.*delete") as error:
    open_topk_cache(cache_dir, key=other)
  assert "another teacher, corpus, tokenizer" in str(error.value)
  for name, actual in (("k", K), ("vocab_size", V), ("length", L)):
    with pytest.raises(TopKCacheError, match=f"has {name} = {actual}, but {name} = {actual + 1} was asked for"):
      open_topk_cache(cache_dir, key=KEY, **{name: actual + 1})
  # Nor is a cache written over by a run under another key.
  with pytest.raises(TopKCacheError, match="another directory|delete"):
    write(cache_dir, key=other)


def test_a_flipped_byte_fails_only_its_shard_and_rewriting_repairs_only_it(cache_dir, copy):
  path = copy / "shard-00001.topk_logits.npy"
  data = bytearray(path.read_bytes())
  data[-3] ^= 0x01  # In the payload: the file keeps its size, so only the checksum can tell.
  path.write_bytes(bytes(data))
  cache = open_topk_cache(copy, key=KEY)  # Opening does not read shard contents.
  for i in (0, 3, 8, 12):
    cache[i]
  with pytest.raises(TopKCacheError, match=r"shard 1 .*SHA-256.*write_topk_cache"):
    cache[5]
  with pytest.raises(TopKCacheError, match="shard 1 "):
    cache.read(np.array([0, 4]))
  teacher = CountingTeacher()
  repaired = write(copy, teacher, jit=False)
  assert teacher.calls == 1  # Shard 1's one batch.
  assert file_hashes(copy) == file_hashes(cache_dir)
  np.testing.assert_array_equal(repaired[5]["topk_logits"][:, 0], W[TOKENS[5]].max(-1).astype(np.float16))


def test_a_missing_or_truncated_shard_file_is_an_error(copy):
  os.remove(copy / "shard-00002.topk_indices.npy")
  with pytest.raises(TopKCacheError, match="shard-00002.topk_indices.npy is missing.*write_topk_cache"):
    open_topk_cache(copy, key=KEY)
  write(copy)
  path = copy / "shard-00003.log_normalizer.npy"
  path.write_bytes(path.read_bytes()[:-4])
  with pytest.raises(TopKCacheError, match="shard-00003.log_normalizer.npy has .* bytes.*truncated"):
    open_topk_cache(copy, key=KEY)


def test_a_killed_write_resumes_from_its_finished_shards(cache_dir, tmp_path):
  dying = CountingTeacher(die_on_call=3)  # One call per shard: killed while computing shard 2.
  with pytest.raises(RuntimeError, match="killed"):
    write(tmp_path, dying, jit=False)
  assert not (tmp_path / "manifest.json").exists()
  with pytest.raises(TopKCacheError, match="incomplete.*Rerun"):
    open_topk_cache(tmp_path, key=KEY)
  # What else a kill can leave: a temporary file, and an array of an unfinished shard without its sidecar.
  (tmp_path / ".shard-00002.topk_logits.npy.0123456789abcdef0123456789abcdef.tmp").write_bytes(b"partial")
  (tmp_path / "shard-00002.topk_logits.npy").write_bytes(b"garbage")
  finished = {name: (tmp_path / name).stat().st_mtime_ns for name in os.listdir(tmp_path) if "shard-0000" in name}
  teacher = CountingTeacher()
  cache = write(tmp_path, teacher, jit=False)
  assert teacher.calls == 2  # Shards 2 and 3 only.
  assert file_hashes(tmp_path) == file_hashes(cache_dir)  # As if never interrupted (the temporary file is gone).
  for name in ("shard-00000.json", "shard-00001.topk_logits.npy"):
    assert (tmp_path / name).stat().st_mtime_ns == finished[name]
  # A complete cache is reused whole.
  again = CountingTeacher()
  write(tmp_path, again, jit=False)
  assert again.calls == 0 and len(cache) == N


def test_finished_shards_of_other_tokens_under_the_same_key_are_an_error(copy):
  changed = TOKENS.copy()
  changed[6, 0] = (changed[6, 0] + 1) % V
  with pytest.raises(TopKCacheError, match=r"shard-00001 .*sequences \[6\].*corpus_fingerprint"):
    write(copy, sequences=changed)


def test_process_shards_partition_the_shards_into_contiguous_blocks(cache_dir):
  cache = open_topk_cache(cache_dir, key=KEY)
  for count in range(1, cache.num_shards + 1):
    blocks = [cache.process_shards(p, count) for p in range(count)]
    assert sum(blocks, []) == list(range(cache.num_shards))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    rows = [cache.process_rows(p, count) for p in range(count)]
    assert [i for r in rows for i in r] == list(range(N))
  assert cache.process_shards(1, 3) == [2] and cache.process_rows(1, 3) == range(8, 12)
  with pytest.raises(TopKCacheError, match="4 shards, fewer than the 5 processes.*shard_size <= 2"):
    cache.process_shards(0, 5)
  with pytest.raises(ValueError, match="process_index"):
    cache.process_shards(2, 2)


def test_joined_source_merges_sequences_with_their_teacher_entries(cache_dir):
  cache = open_topk_cache(cache_dir, key=KEY)
  joined = JoinedSource(Source(TOKENS), cache)
  item = joined[6]
  entries = {"teacher_topk_logits", "teacher_topk_indices", "teacher_log_normalizer", "teacher_topk_temperature"}
  assert set(item) == {"tokens", "label", *entries}
  np.testing.assert_array_equal(item["tokens"], TOKENS[6])
  for name, value in cache[6].items():
    np.testing.assert_array_equal(item[f"teacher_{name}"], value)
  # The normaliser's temperature, for the step to check against a bucket-tail objective's.
  assert item["teacher_topk_temperature"].dtype == np.float32 and item["teacher_topk_temperature"] == T
  assert set(JoinedSource(TOKENS, cache)[0]) == {"tokens", *entries}
  with pytest.raises(TopKCacheError, match="12 sequences but the top-k cache .* has 13"):
    JoinedSource(TOKENS[:-1], cache)
  with pytest.raises(TopKCacheError, match=r"shape \(9,\).*length 8"):
    JoinedSource(np.concatenate([TOKENS, TOKENS[:, :1]], axis=1), cache)[0]
  with pytest.raises(TopKCacheError, match="sequence 0's tokens are not those the teacher saw.*another order"):
    JoinedSource(TOKENS[::-1], cache)[0]


def test_grain_batches_the_joined_source_and_slices_it_per_process(cache_dir):
  cache = pickle.loads(pickle.dumps(open_topk_cache(cache_dir, key=KEY)))  # As grain's workers receive it.
  joined = JoinedSource(Source(TOKENS), cache)
  batches = list(grain.MapDataset.source(joined).batch(4))
  assert [len(b["tokens"]) for b in batches] == [4, 4, 4, 1]
  expected = cache.read(np.arange(N))
  for name, value in expected.items():
    stacked = np.concatenate([b[f"teacher_{name}"] for b in batches])
    assert stacked.dtype == value.dtype
    np.testing.assert_array_equal(stacked, value)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), np.roll(TOKENS, -1, axis=1))
  np.testing.assert_array_equal(np.concatenate([b["teacher_topk_temperature"] for b in batches]), np.full(N, T))
  rows = cache.process_rows(1, 2)
  local = list(grain.MapDataset.source(joined)[rows.start : rows.stop].shuffle(seed=0).batch(2))
  seen = np.concatenate([b["tokens"] for b in local])
  assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, TOKENS[rows.start : rows.stop].tolist()))


def test_teacher_and_sequence_errors_are_caught_before_anything_is_written(tmp_path, caplog):
  with pytest.raises(ValueError, match=r"logits \[batch, length, vocab_size\] = \(4, 8, 51\), got \(4, 8, 50\)"):
    write(tmp_path, vocab_size=V + 1)
  out_of_range = TOKENS.copy()
  out_of_range[2, 3] = V
  with pytest.raises(ValueError, match=r"sequences \[2\] hold token ids outside \[0, vocab_size=50\)"):
    write(tmp_path, sequences=out_of_range)
  with pytest.raises(ValueError, match="non-finite.*sequences \\[0, 1, 2, 3\\]"):
    write(tmp_path, lambda tokens: teacher_fn(tokens) * jnp.nan)
  with pytest.raises(ValueError, match="cannot exceed vocab_size"):
    write(tmp_path, k=V + 1)
  assert not [name for name in os.listdir(tmp_path) if name.endswith(".json")]
  with caplog.at_level(logging.WARNING, logger="jaxkd.lm.topk_cache"):
    cache = write(tmp_path, lambda tokens: teacher_fn(tokens) * 1e5)
  assert "clipped" in caplog.text
  assert np.isfinite(cache[0]["topk_logits"]).all() and cache[0]["topk_logits"].max() == np.float16(65504)


def test_each_shard_is_verified_once_when_first_read_even_from_many_threads(cache_dir, monkeypatch):
  hashed, file_sha256 = [], artifacts.file_sha256

  def counting_sha256(path):
    hashed.append(os.path.basename(path))
    return file_sha256(path)

  monkeypatch.setattr(artifacts, "file_sha256", counting_sha256)  # The file hash of every artifact's check.
  cache = open_topk_cache(cache_dir, key=KEY)
  assert hashed == []  # Opening reads no shard.
  cache[9]
  assert sorted(hashed) == sorted(f"shard-00002.{name}.npy" for name in (*topk_cache.ARRAYS, "token_digests"))
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    items = list(pool.map(cache.__getitem__, [i % N for i in range(64)]))
  assert len(hashed) == 4 * cache.num_shards  # Each of the 4 files of each shard, once.
  for i, item in enumerate(items):
    np.testing.assert_array_equal(item["topk_indices"], cache[i % N]["topk_indices"])


def _edit_manifest(directory, edit):
  """Rewrites the manifest as valid JSON with one change, as a flipped bit in a digit would leave it."""
  path = directory / "manifest.json"
  manifest = json.loads(path.read_text())
  edit(manifest)
  path.write_text(json.dumps(manifest, indent=1, sort_keys=True))


@pytest.mark.parametrize(
  "edit",
  [
    lambda m: m.update(temperature=3.0),  # 2.0 -> 3.0: every consumer would temper with the wrong T.
    lambda m: m["shards"][3].update(start=11),  # cache[12] would read another sequence's targets.
    lambda m: m["shards"][1]["files"]["topk_logits"].update(sha256="0" * 64),
  ],
  ids=["temperature", "shard_start", "file_sha256"],
)
def test_a_changed_manifest_fails_its_digest_and_rewriting_repairs_it(cache_dir, copy, edit):
  _edit_manifest(copy, edit)
  with pytest.raises(TopKCacheError, match=r"manifest.json.*fails its digest.*rerun write_topk_cache") as error:
    open_topk_cache(copy, key=KEY)
  assert str(copy) in str(error.value)
  teacher = CountingTeacher()
  repaired = write(copy, teacher, jit=False)
  assert teacher.calls == 0  # Every shard still verifies: only the manifest is rewritten.
  assert file_hashes(copy) == file_hashes(cache_dir)
  assert repaired.temperature == T and repaired.shard_ranges[3] == (12, 13)


def test_a_manifest_without_a_digest_is_refused_until_rewritten(cache_dir, copy):
  _edit_manifest(copy, lambda m: m.pop("digest"))  # As an older jaxkd wrote it.
  with pytest.raises(TopKCacheError, match=r"manifest.json has no digest.*older jaxkd.*rerun write_topk_cache"):
    open_topk_cache(copy, key=KEY)
  write(copy)
  assert file_hashes(copy) == file_hashes(cache_dir)


def test_an_out_of_range_index_names_the_valid_range(cache_dir):
  cache = open_topk_cache(cache_dir, key=KEY)
  for index in (N, -N - 1, 10**6):
    with pytest.raises(
      IndexError, match=rf"sequence index {index} is out of range.*13 sequences: 0\.\.12 \(or -13\.\.-1"
    ):
      cache[index]
    with pytest.raises(IndexError, match=r"13 sequences: 0\.\.12"):
      JoinedSource(TOKENS, cache)[index]
  with pytest.raises(IndexError, match=r"indices \[13\] are out of range.*0\.\.12"):
    cache.read([13])
