"""Tests for jaxkd.lm.text: corpus splits and fingerprints, tokenizer and token caches, windows, grain streaming."""

import json
import math
import os
import sysconfig

import numpy as np
import pytest

from jaxkd.data.datasets import DamagedDataError
from jaxkd.lm import text

VOCAB_SIZE = 320
LENGTH = 16


def write_corpus(root, num_files: int = 60, seed: int = 0) -> None:
  """Python-like files of varied sizes, some in directories the corpus must skip."""
  rng = np.random.default_rng(seed)
  names = ["alpha", "beta", "gamma", "delta", "value", "result", "index", "count"]
  for i in range(num_files):
    lines = [f'"""Module {i}: generated for tests."""', "", "import os", ""]
    for j in range(int(rng.integers(2, 8))):
      a, b = rng.choice(names, 2)
      lines += [f"def {a}_{j}({b}, n={j}):", f"  # é ü {i} <|endoftext|> stays text", f"  return {b} * n + {i}", ""]
    package = os.path.join(root, f"pkg{i % 4}")
    os.makedirs(package, exist_ok=True)
    with open(os.path.join(package, f"mod_{i}.py"), "w", encoding="utf-8") as f:
      f.write("\n".join(lines))
  for skipped in ("test", "tests", "site-packages", "dist-packages", "idlelib", "pkg1/__pycache__", "pkg2/tests"):
    os.makedirs(os.path.join(root, skipped), exist_ok=True)
    with open(os.path.join(root, skipped, "skipped.py"), "w") as f:
      f.write("x = 1\n")
  with open(os.path.join(root, "pkg0", "notes.txt"), "w") as f:
    f.write("not python\n")


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  write_corpus(root)
  return root


@pytest.fixture(scope="module")
def corpus(corpus_root):
  return text.CodeCorpus(corpus_root, fractions=(0.6, 0.2, 0.2))


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
  return text.train_tokenizer(corpus, vocab_size=VOCAB_SIZE, path=tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def train_tokens(corpus, tokenizer, tmp_path_factory):
  return text.tokenize_split(corpus, tokenizer, "train", path=tmp_path_factory.mktemp("tokens") / "train.npy")


# --- Corpus -----------------------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_covers_every_file(corpus, corpus_root):
  splits = {split: corpus.files(split) for split in text.SPLITS}
  every = sorted(path for paths in splits.values() for path in paths)
  assert every == sorted(f.path for f in corpus.all_files)
  assert len(every) == len(set(every)) == 60  # Disjoint, and the skipped directories and .txt are out.
  assert not any("test" in path or "__pycache__" in path or "site-packages" in path for path in every)
  for paths in splits.values():
    assert paths == sorted(paths)
  again = text.CodeCorpus(corpus_root, fractions=(0.6, 0.2, 0.2))
  assert {split: again.files(split) for split in text.SPLITS} == splits
  assert again.fingerprint == corpus.fingerprint
  # 60 files at 60/20/20: binomial standard deviations are ~4 files.
  assert 24 <= len(splits["train"]) <= 48 and len(splits["validation"]) >= 4 and len(splits["test"]) >= 4
  for f in corpus.all_files:
    assert f.split == ("train" if f.rank < 0.6 else "validation" if f.rank < 0.8 else "test")


def test_num_bytes_and_texts_agree(corpus):
  for split in text.SPLITS:
    documents = list(corpus.texts(split))
    assert len(documents) == len(corpus.files(split))
    assert corpus.num_bytes(split) == sum(len(d.encode()) for d in documents)
  assert corpus.replacements("train") == 0


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
  (tmp_path / "a.py").write_bytes(b"x = '\xff\xfe' # \xef\xbf\xbd is a real U+FFFD\n")
  corpus = text.CodeCorpus(tmp_path, fractions=(1.0, 0.0, 0.0))
  (document,) = corpus.texts("train")
  assert corpus.replacements("train") == 2
  assert document.count("\ufffd") == 3
  assert corpus.num_bytes("train") == len(document.encode())


def test_fingerprint_changes_with_content_budget_and_fractions(tmp_path):
  write_corpus(tmp_path, num_files=12)
  base = text.CodeCorpus(tmp_path)
  assert text.CodeCorpus(tmp_path, max_bytes=10**9).fingerprint != base.fingerprint
  assert text.CodeCorpus(tmp_path, fractions=(0.8, 0.1, 0.1)).fingerprint != base.fingerprint
  path = tmp_path / "pkg0" / "mod_0.py"
  original = path.read_bytes()
  path.write_bytes(original.replace(b"return", b"retorn", 1))  # Same size, other content.
  assert text.CodeCorpus(tmp_path).fingerprint != base.fingerprint
  # The stale corpus refuses to serve text that its fingerprint no longer names.
  with pytest.raises(RuntimeError, match="mod_0.py changed"):
    list(base.texts(next(f.split for f in base.all_files if f.path == "pkg0/mod_0.py")))
  path.write_bytes(original)
  assert text.CodeCorpus(tmp_path).fingerprint == base.fingerprint
  # A new file changes the fingerprint but no other file's split.
  (tmp_path / "pkg0" / "new.py").write_text("y = 2\n")
  grown = text.CodeCorpus(tmp_path)
  assert grown.fingerprint != base.fingerprint
  assert {f.path: f.split for f in grown.all_files if f.path != "pkg0/new.py"} == {
    f.path: f.split for f in base.all_files
  }


def test_max_bytes_takes_a_prefix_of_the_hash_order(corpus_root, corpus):
  full = sorted(corpus.source_files("train"), key=lambda f: f.rank)
  budget = sum(f.num_bytes for f in full[:5]) + full[5].num_bytes - 1  # Five fit, the sixth does not.
  small = text.CodeCorpus(corpus_root, fractions=(0.6, 0.2, 0.2), max_bytes=budget)
  assert small.files("train") == sorted(f.path for f in full[:5])
  assert small.num_bytes("train") <= budget
  assert small.fingerprint != corpus.fingerprint
  assert set(small.files("test")) <= set(corpus.files("test"))


def test_bad_arguments():
  with pytest.raises(ValueError, match="fractions"):
    text.CodeCorpus(fractions=(0.5, 0.2, 0.2))
  with pytest.raises(ValueError, match="max_bytes"):
    text.CodeCorpus(max_bytes=0)
  with pytest.raises(ValueError, match="split"):
    text.CodeCorpus(os.path.dirname(__file__)).files("dev")


def test_real_standard_library_lists_and_splits():
  corpus = text.CodeCorpus()
  assert corpus.root == sysconfig.get_paths()["stdlib"]
  paths = [f.path for f in corpus.all_files]
  assert "os.py" in paths and "json/decoder.py" in paths
  assert not any(part in text.EXCLUDED_DIRS for path in paths for part in path.split("/")[:-1])
  sizes = {split: corpus.num_bytes(split) for split in text.SPLITS}
  total = sum(f.num_bytes for f in corpus.all_files)
  assert sum(sizes.values()) == total > 5_000_000
  assert 0.8 < sizes["train"] / total < 0.97
  # A budget takes the longest prefix of the split in path-hash order that fits. How much that is depends on the
  # interpreter: 3.11's first files fill ~1 MB, 3.13's meet pydoc_data/topics.py (823 KB) at 236 KB.
  quick = text.CodeCorpus(max_bytes=1_000_000)
  ranked = sorted((f for f in corpus.all_files if f.split == "train"), key=lambda f: f.rank)
  taken = quick.source_files("train")
  assert sorted(f.path for f in taken) == sorted(f.path for f in ranked[: len(taken)])
  assert quick.num_bytes("train") == sum(f.num_bytes for f in ranked[: len(taken)]) <= 1_000_000
  assert sum(f.num_bytes for f in ranked[: len(taken) + 1]) > 1_000_000
  assert quick.fingerprint != corpus.fingerprint


# --- Tokenizer ----------------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_reloads(corpus, tokenizer, tmp_path_factory):
  assert 257 < tokenizer.get_vocab_size() <= VOCAB_SIZE
  assert tokenizer.token_to_id(text.SEPARATOR) == 0
  sample = "def f(x):\n\treturn x  # naïve ☃ 😀\r\n"
  assert tokenizer.decode(tokenizer.encode(sample).ids) == sample
  # The files hold a literal "<|endoftext|>", text only when special tokens are not parsed (as tokenize_split does).
  tokenizer.encode_special_tokens = True
  try:
    for document in corpus.texts("test"):
      assert tokenizer.decode(tokenizer.encode(document).ids) == document
  finally:
    tokenizer.encode_special_tokens = False
  path = tmp_path_factory.getbasetemp() / "tok0" / "tokenizer.json"
  meta = json.loads((path.parent / "tokenizer.json.meta.json").read_text())
  assert meta["corpus_fingerprint"] == corpus.fingerprint and meta["vocab_size"] == VOCAB_SIZE
  before = os.stat(path).st_mtime_ns
  reloaded = text.train_tokenizer(corpus, vocab_size=VOCAB_SIZE, path=path)
  assert os.stat(path).st_mtime_ns == before  # Loaded, not retrained.
  assert text.tokenizer_fingerprint(reloaded) == text.tokenizer_fingerprint(tokenizer) == meta["tokenizer_fingerprint"]


def test_tokenizer_for_another_corpus_or_size_is_refused_unless_overwritten(corpus, tokenizer, tmp_path):
  path = tmp_path / "tokenizer.json"
  text.train_tokenizer(corpus, vocab_size=VOCAB_SIZE, path=path)
  with pytest.raises(ValueError, match="vocab_size: file 320, asked 300"):
    text.train_tokenizer(corpus, vocab_size=300, path=path)
  other = text.CodeCorpus(corpus.root, fractions=(0.5, 0.25, 0.25))
  with pytest.raises(ValueError) as info:
    text.train_tokenizer(other, vocab_size=VOCAB_SIZE, path=path)
  assert corpus.fingerprint in str(info.value) and other.fingerprint in str(info.value)
  retrained = text.train_tokenizer(other, vocab_size=VOCAB_SIZE, path=path, overwrite=True)
  assert json.loads((tmp_path / "tokenizer.json.meta.json").read_text())["corpus_fingerprint"] == other.fingerprint
  assert text.train_tokenizer(other, vocab_size=VOCAB_SIZE, path=path).to_str() == retrained.to_str()


def test_edited_tokenizer_is_damaged(corpus, tmp_path):
  path = tmp_path / "tokenizer.json"
  text.train_tokenizer(corpus, vocab_size=VOCAB_SIZE, path=path)
  saved = json.loads(path.read_text())
  saved["model"]["merges"] = saved["model"]["merges"][:-1]
  path.write_text(json.dumps(saved))
  with pytest.raises(DamagedDataError, match="tokenizer.json is not the one its record"):
    text.train_tokenizer(corpus, vocab_size=VOCAB_SIZE, path=path)


@pytest.mark.parametrize("vocab_size", [256, 65537])
def test_vocab_size_is_validated(corpus, tmp_path, vocab_size):
  with pytest.raises(ValueError, match="vocab_size"):
    text.train_tokenizer(corpus, vocab_size=vocab_size, path=tmp_path / "t.json")


# --- Token files --------------------------------------------------------------------------------------------------


def test_token_file_holds_separated_documents(corpus, tokenizer, train_tokens, tmp_path_factory):
  assert train_tokens.dtype == np.uint16 and isinstance(train_tokens, np.memmap)
  starts = np.flatnonzero(train_tokens == 0)
  assert starts[0] == 0 and len(starts) == len(corpus.files("train"))
  documents = [tokenizer.decode(part.tolist()) for part in np.split(np.asarray(train_tokens), starts)[1:]]
  assert [d[len(text.SEPARATOR) :] if d.startswith(text.SEPARATOR) else d for d in documents] == list(
    corpus.texts("train")
  )
  # The literal "<|endoftext|>" in the files was encoded as text, and the setting was restored.
  assert all("<|endoftext|>" in d for d in documents) and not tokenizer.encode_special_tokens
  path = tmp_path_factory.getbasetemp() / "tokens0" / "train.npy"
  meta = json.loads((path.parent / "train.npy.meta.json").read_text())
  assert meta["num_tokens"] == len(train_tokens) and meta["num_bytes"] == corpus.num_bytes("train")
  assert meta["tokenizer_fingerprint"] == text.tokenizer_fingerprint(tokenizer)
  np.testing.assert_array_equal(text.load_tokens(path), train_tokens)


def test_token_file_reused_damage_and_mismatch(corpus, tokenizer, tmp_path):
  path = tmp_path / "val.npy"
  tokens = np.array(text.tokenize_split(corpus, tokenizer, "validation", path=path))
  before = os.stat(path).st_mtime_ns
  np.testing.assert_array_equal(text.tokenize_split(corpus, tokenizer, "validation", path=path), tokens)
  assert os.stat(path).st_mtime_ns == before

  # Another split (or corpus, or tokenizer) under the same path: refused, naming both, unless overwrite.
  with pytest.raises(ValueError, match="split: file 'validation', asked 'test'"):
    text.tokenize_split(corpus, tokenizer, "test", path=path)
  text.tokenize_split(corpus, tokenizer, "test", path=path, overwrite=True)
  text.tokenize_split(corpus, tokenizer, "validation", path=path, overwrite=True)

  raw = bytearray(path.read_bytes())
  raw[-3] ^= 0x01
  path.write_bytes(bytes(raw))
  with pytest.raises(DamagedDataError, match=r"val\.npy fails its checksum.*Delete it"):
    text.tokenize_split(corpus, tokenizer, "validation", path=path)
  path.write_bytes(bytes(raw[:-10]))
  with pytest.raises(DamagedDataError, match=r"val\.npy is unreadable or truncated.*Delete it"):
    text.load_tokens(path)

  # A file without its record is what a crash between the two writes leaves: it is rebuilt.
  os.remove(tmp_path / "val.npy.meta.json")
  np.testing.assert_array_equal(text.tokenize_split(corpus, tokenizer, "validation", path=path), tokens)


# --- Windows and batches ------------------------------------------------------------------------------------------


def test_windows_shift_labels_by_one(train_tokens):
  source = text.TokenSequences(train_tokens, length=LENGTH)
  assert len(source) == (len(train_tokens) - 1) // LENGTH
  for index in (0, 1, len(source) - 1):
    window = source[index]
    start = index * LENGTH
    np.testing.assert_array_equal(window["tokens"], train_tokens[start : start + LENGTH])
    np.testing.assert_array_equal(window["label"], train_tokens[start + 1 : start + LENGTH + 1])
    assert window["tokens"].dtype == window["label"].dtype == np.int32
  np.testing.assert_array_equal(source[-1]["label"], source[len(source) - 1]["label"])
  with pytest.raises(IndexError):
    source[len(source)]


@pytest.mark.parametrize("num_tokens,length", [(41, 8), (45, 8), (5, 8), (100, 1)])
def test_eval_batches_score_every_target_once(num_tokens, length):
  tokens = np.arange(num_tokens, dtype=np.uint16) + 1
  source = text.TokenSequences(tokens, length=length)
  for shard_count in (1, 2):
    seen = []
    for shard_index in range(shard_count):
      batches = list(text.eval_batches(source, batch_size=4, shard_index=shard_index, shard_count=shard_count))
      assert len(batches) == text.num_eval_batches(source, batch_size=4, shard_count=shard_count)
      for batch in batches:
        assert batch["tokens"].shape == batch["label"].shape == batch["mask"].shape == (4 // shard_count, length)
        assert batch["mask"].dtype == bool
        assert np.all(batch["label"][batch["mask"]] == batch["tokens"][batch["mask"]] + 1)
        assert not batch["tokens"][~batch["mask"]].any() and not batch["label"][~batch["mask"]].any()
        seen.extend(batch["label"][batch["mask"]].tolist())
    # Labels are token values, so every target position appears once: 2 .. num_tokens.
    assert sorted(seen) == list(range(2, num_tokens + 1))
    assert len(seen) == source.num_targets == num_tokens - 1


def test_eval_batches_on_token_file(train_tokens):
  source = text.TokenSequences(train_tokens, length=LENGTH)
  batches = text.eval_batches(source, batch_size=8, shard_index=0, shard_count=1)
  assert sum(int(b["mask"].sum()) for b in batches) == len(train_tokens) - 1


def windows_of(batches):
  """The first token position of each row, identifying its window (tokens are arange)."""
  return [row for batch in batches for row in (batch["tokens"][:, 0] // LENGTH).tolist()]


def test_shards_are_disjoint_and_cover_an_epoch():
  source = text.TokenSequences(np.arange(LENGTH * 40 + 1, dtype=np.uint16), length=LENGTH)
  kwargs = dict(seed=3, num_epochs=1, drop_remainder=False)
  whole = list(text.token_batches(source, batch_size=6, shard_index=0, shard_count=1, **kwargs))
  shards = [list(text.token_batches(source, batch_size=6, shard_index=i, shard_count=2, **kwargs)) for i in (0, 1)]
  assert sorted(windows_of(whole)) == list(range(40))
  assert windows_of(whole) != list(range(40))  # Shuffled.
  assert set(windows_of(shards[0])).isdisjoint(windows_of(shards[1]))
  assert sorted(windows_of(shards[0]) + windows_of(shards[1])) == list(range(40))
  assert len(shards[0]) == len(shards[1])
  # Batch k of the two processes together is batch k of one process.
  for k, batch in enumerate(whole):
    assert sorted(windows_of([shards[0][k], shards[1][k]])) == sorted(windows_of([batch]))
  for batch in whole[:-1]:
    assert batch["tokens"].shape == (6, LENGTH) and batch["tokens"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], batch["tokens"] + 1)


def test_epochs_differ_and_drop_remainder():
  source = text.TokenSequences(np.arange(LENGTH * 10 + 1, dtype=np.uint16), length=LENGTH)
  batches = list(text.token_batches(source, batch_size=4, seed=0, num_epochs=2, shard_index=0, shard_count=1))
  assert len(batches) == 20 // 4 and all(b["tokens"].shape == (4, LENGTH) for b in batches)
  order = windows_of(batches)
  assert sorted(order[:10]) == list(range(10)) and order[:10] != order[10:]
  ordered = text.token_batches(source, batch_size=5, shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
  assert windows_of(ordered) == list(range(10))


def test_get_state_set_state_resumes_exactly():
  source = text.TokenSequences(np.arange(LENGTH * 23 + 1, dtype=np.uint16), length=LENGTH)

  def make(**overrides):
    kwargs = dict(batch_size=4, seed=7, num_epochs=None, shard_index=1, shard_count=2) | overrides
    return text.token_batches(source, **kwargs)

  uninterrupted = make()
  expected = [next(uninterrupted) for _ in range(30)]  # Several epochs of an endless stream.
  interrupted = make()
  for _ in range(13):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.get_state()))  # As a checkpoint stores it.
  resumed = make()
  resumed.set_state(state)
  for want in expected[13:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(got["label"], want["label"])
  with pytest.raises(ValueError, match="seed: saved 7, here 8"):
    make(seed=8).set_state(state)


def test_token_batches_validate():
  source = text.TokenSequences(np.arange(LENGTH * 4 + 1, dtype=np.uint16), length=LENGTH)
  with pytest.raises(ValueError, match="multiple of shard_count"):
    text.token_batches(source, batch_size=3, shard_index=0, shard_count=2)
  with pytest.raises(ValueError, match="no full window"):
    text.token_batches(text.TokenSequences(np.arange(5), length=LENGTH), batch_size=2, shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match="1-D integer"):
    text.TokenSequences(np.zeros(10, np.float32), length=4)


def test_bits_per_byte():
  assert text.bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
  # A uniform model over 256 byte values scores 8 bits per byte.
  assert text.bits_per_byte(1000 * math.log(256), 1000) == pytest.approx(8.0)
  with pytest.raises(ValueError, match="num_bytes"):
    text.bits_per_byte(1.0, 0)
