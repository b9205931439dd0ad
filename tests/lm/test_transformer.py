"""The transformer language model: shapes, causality, KV-cached decoding against the uncached forward pass, the
samplers, argument errors, dropout and preset sizes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.lm.transformer import (
  TransformerLM,
  apply_rope,
  init_cache,
  lm_config,
  sample,
  sample_uncached,
  sample_with_logits,
)
from jaxkd.models import count_params

VOCAB, MAX_LEN, BATCH, LENGTH = 61, 16, 2, 12


@pytest.fixture(scope="module")
def model():
  return TransformerLM(**lm_config("tiny", vocab_size=VOCAB, max_len=MAX_LEN))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(0), (BATCH, LENGTH), 0, VOCAB, dtype=jnp.int32)


@pytest.fixture(scope="module")
def variables(model, tokens):
  return jax.jit(model.init)(jax.random.key(1), tokens)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, variables, tokens):
  return model.apply(variables, tokens)


def test_shapes_dtypes_and_call_is_hidden_then_projection(model, variables, tokens):
  @jax.jit
  def outputs(variables, tokens):
    hidden = model.apply(variables, tokens, method=model.hidden)
    return model.apply(variables, tokens), hidden, model.apply(variables, hidden, method=model.logits_from_hidden)

  logits, hidden, projected = outputs(variables, tokens)
  assert logits.shape == (BATCH, LENGTH, VOCAB) and logits.dtype == jnp.float32
  assert hidden.shape == (BATCH, LENGTH, model.d_model)
  np.testing.assert_allclose(projected, logits, atol=1e-5, rtol=1e-5)
  # Tied embeddings: no separate output layer.
  assert set(variables["params"]) == {"embed", "block_0", "final_norm"}


def test_bfloat16_compute_and_untied_head():
  model = TransformerLM(
    **lm_config("tiny", vocab_size=VOCAB, max_len=MAX_LEN), dtype=jnp.bfloat16, tie_embeddings=False
  )
  tokens = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  assert variables["params"]["lm_head"]["kernel"].shape == (model.d_model, VOCAB)
  assert jax.eval_shape(model.apply, variables, tokens).dtype == jnp.float32
  assert jax.eval_shape(functools.partial(model.apply, method=model.hidden), variables, tokens).dtype == jnp.bfloat16


def test_causal(model, variables, tokens):
  t = 7
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
  before, after = _forward(model, variables, tokens), _forward(model, variables, changed)
  np.testing.assert_array_equal(before[:, :t], after[:, :t])
  assert not np.allclose(before[:, t:], after[:, t:])


def test_rope_depends_only_on_offset():
  q, k = jax.random.normal(jax.random.key(2), (2, 1, 1, 1, 8))
  score = jax.jit(lambda i, j: jnp.sum(apply_rope(q, i[None]) * apply_rope(k, j[None])))
  np.testing.assert_allclose(score(jnp.array(3), jnp.array(1)), score(jnp.array(12), jnp.array(10)), rtol=1e-5)
  assert not np.isclose(score(jnp.array(3), jnp.array(1)), score(jnp.array(3), jnp.array(2)))


def test_cached_decoding_matches_full_forward(model, variables, tokens):
  full = _forward(model, variables, tokens)
  step = jax.jit(lambda cache, x: model.apply({**variables, "cache": cache}, x, decode=True, mutable=["cache"]))
  cache = init_cache(model, BATCH, LENGTH)
  outputs = []
  for t in range(LENGTH):
    logits, updates = step(cache, tokens[:, t : t + 1])  # [batch, 1, vocab]
    outputs.append(logits)
    cache = updates["cache"]
  # (The samplers' tests cover a whole-prompt prefill.)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=1e-5, rtol=1e-5)
  assert int(cache["block_0"]["attn"]["cache_index"]) == LENGTH
  # The cache is full: one more token is an error when the index is concrete, and NaN logits under jit.
  with pytest.raises(ValueError, match="overflow"):
    model.apply({**variables, "cache": cache}, tokens[:, :1], decode=True, mutable=["cache"])
  logits, _ = step(cache, tokens[:, :1])
  assert np.all(np.isnan(logits))
  decode_shapes = lambda cache, x: model.apply({**variables, "cache": cache}, x, decode=True, mutable=["cache"])  # noqa: E731
  with pytest.raises(ValueError, match="do not fit"):
    jax.eval_shape(decode_shapes, init_cache(model, BATCH, 4), tokens)
  with pytest.raises(ValueError, match="needs a KV cache"):
    jax.eval_shape(lambda x: model.apply(variables, x, decode=True, mutable=["cache"]), tokens)


def test_greedy_sample_matches_uncached_and_full_forward(model, variables, tokens):
  prompt, new = tokens[:, :4], 8
  rng = jax.random.key(3)
  cached, logits = sample_with_logits(model, variables["params"], prompt, max_new_tokens=new, rng=rng, greedy=True)
  assert cached.shape == (BATCH, 4 + new) and cached.dtype == jnp.int32
  np.testing.assert_array_equal(cached[:, :4], prompt)
  uncached = sample_uncached(model, variables, prompt, max_new_tokens=new, rng=rng, greedy=True)
  np.testing.assert_array_equal(cached, uncached)
  # The returned logits are the full forward pass's at the positions that predicted each new token.
  full = _forward(model, variables, cached)
  np.testing.assert_allclose(logits, full[:, 3:-1], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(cached[:, 4:], jnp.argmax(full[:, 3:-1], axis=-1))
  # Temperature 0 is greedy.
  np.testing.assert_array_equal(sample(model, variables, prompt, max_new_tokens=new, rng=rng, temperature=0.0), cached)


def test_temperature_top_k_sample_matches_uncached(model, variables, tokens):
  prompt, new = tokens[:, :4], 8
  # Under an outer jit, as a caller would run it; the temperature is then traced.
  jitted = jax.jit(functools.partial(sample, model, max_new_tokens=new, top_k=8))
  first = jitted(variables, prompt, rng=jax.random.key(4), temperature=2.0)
  uncached = sample_uncached(
    model, variables, prompt, max_new_tokens=new, rng=jax.random.key(4), temperature=2.0, top_k=8
  )
  np.testing.assert_array_equal(first, uncached)
  second = jitted(variables, prompt, rng=jax.random.key(5), temperature=2.0)
  assert not np.array_equal(first, second)
  # Every sampled token is among the 8 most likely under the model.
  full = _forward(model, variables, first)
  ranks = jnp.sum(full[:, 3:-1] > jnp.take_along_axis(full[:, 3:-1], first[:, 4:, None], axis=-1), axis=-1)
  assert np.all(ranks < 8)


def test_errors(model, variables, tokens):
  rng = jax.random.key(0)
  with pytest.raises(ValueError, match="max_len"):
    model.apply(variables, jnp.zeros((1, MAX_LEN + 1), jnp.int32))
  with pytest.raises(ValueError, match="integer"):
    model.apply(variables, tokens.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    model.apply(variables, tokens[0])
  with pytest.raises(ValueError, match="max_len"):
    sample(model, variables, tokens, max_new_tokens=MAX_LEN - LENGTH + 1, rng=rng)
  with pytest.raises(ValueError, match="top_k"):
    sample(model, variables, tokens[:, :2], max_new_tokens=2, rng=rng, top_k=VOCAB + 1)
  with pytest.raises(ValueError, match="temperature"):
    sample(model, variables, tokens[:, :2], max_new_tokens=2, rng=rng, temperature=-1.0)
  with pytest.raises(ValueError, match="max_len"):
    init_cache(model, BATCH, MAX_LEN + 1)
  with pytest.raises(ValueError, match="not divisible"):
    TransformerLM(vocab_size=VOCAB, num_layers=1, d_model=30, num_heads=4, max_len=MAX_LEN)
  with pytest.raises(ValueError, match="even"):
    TransformerLM(vocab_size=VOCAB, num_layers=1, d_model=12, num_heads=4, max_len=MAX_LEN)
  with pytest.raises(ValueError, match="Unknown transformer preset"):
    lm_config("huge", vocab_size=VOCAB, max_len=MAX_LEN)


def test_dropout_only_in_training(model, variables, tokens):
  dropout_model = TransformerLM(**lm_config("tiny", vocab_size=VOCAB, max_len=MAX_LEN), dropout_rate=0.5)

  @jax.jit
  def outputs(key_a, key_b):
    apply = lambda key, train: dropout_model.apply(variables, tokens, train=train, rngs={"dropout": key})  # noqa: E731
    return apply(key_a, True), apply(key_b, True), apply(key_a, False), apply(key_b, False)

  train_a, train_b, eval_a, eval_b = outputs(jax.random.key(1), jax.random.key(2))
  assert not np.allclose(train_a, train_b)
  np.testing.assert_array_equal(eval_a, eval_b)
  np.testing.assert_allclose(eval_a, _forward(model, variables, tokens), atol=1e-6)  # eval ignores the rate
  np.testing.assert_array_equal(outputs(jax.random.key(1), jax.random.key(1))[0], train_a)


@pytest.mark.parametrize(
  "size, low, high",
  [
    ("tiny", 1.0e6, 1.2e6),
    ("student", 4e6, 5e6),
    ("teacher", 10e6, 13e6),
    ("gpu_student", 40e6, 90e6),
    ("gpu_teacher", 250e6, 400e6),
  ],
)
def test_preset_sizes(size, low, high):
  model = TransformerLM(**lm_config(size, vocab_size=32768, max_len=1024))
  # eval_shape: shapes only, so a 336M-parameter model allocates nothing.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))
  assert low <= count_params(shapes) <= high
