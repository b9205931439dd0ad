"""Token-level distillation in the step (jaxkd.lm): masking, chunked heads, the top-k cache, placements, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import lm, losses
from jaxkd.lm.transformer import TransformerLM, lm_config
from jaxkd.losses import _sparse as sparse_losses
from jaxkd.models import MLP
from jaxkd.placement import Placement

VOCAB, LENGTH, BATCH = 64, 16, 8


def _module(size="tiny", vocab=VOCAB, layers=None):
  config = lm_config(size, vocab_size=vocab, max_len=LENGTH)
  if layers is not None:
    config["num_layers"] = layers
  return TransformerLM(**config)


@pytest.fixture(scope="module")
def pair():
  teacher_module, student_module = _module(layers=2), _module()
  tokens = np.zeros((2, LENGTH), np.int32)
  teacher_variables = jax.jit(teacher_module.init)(jax.random.key(1), tokens)
  # Plain SGD: the updates compared below are then the gradients themselves (Adam's first step divides by |g|,
  # which turns float32 rounding of near-zero gradients into large differences).
  state = jaxkd.create_train_state(lm.lm_model(student_module), optax.sgd(1.0), {"tokens": tokens}, rng=0)
  return lm.lm_model(teacher_module, name="teacher"), teacher_variables, state


def _batch(seed=0, batch=BATCH):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (batch, LENGTH + 1)).astype(np.int32)
  return {"tokens": tokens[:, :-1], "label": tokens[:, 1:]}


def _step(teacher, kind="forward", **kwargs):
  kwargs.setdefault("placement", "single")
  return jaxkd.make_train_step(
    teacher_apply_fn=teacher, objective=lm.lm_objective(kind, alpha=0.5), donate=False, **kwargs
  )


def _close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def test_step_loss_is_the_token_mean_of_the_reference(pair):
  """The step's loss is (1 - a) CE + a T^2 KL averaged over every token; metrics are the reference's."""
  teacher, teacher_variables, state = pair
  batch = _batch()
  _, metrics = _step(teacher)(state, teacher_variables, batch)

  @jax.jit
  def reference(params, teacher_variables):
    student = state.model.linen_module.apply({"params": params}, batch["tokens"])
    teacher_logits = teacher.linen_module.apply(teacher_variables, batch["tokens"])
    ce = losses.hard_cross_entropy(student, batch["label"])
    kl = losses.kd_loss(student, teacher_logits, 1.0)
    agree = jnp.mean(jnp.argmax(student, -1) == jnp.argmax(teacher_logits, -1))
    teacher_ce = losses.hard_cross_entropy(teacher_logits, batch["label"])
    return jnp.mean(0.5 * ce + 0.5 * kl), jnp.mean(ce), agree, jnp.mean(teacher_ce)

  loss, ce, agreement, teacher_ce = reference(state.params, teacher_variables)
  _close(metrics["loss"], loss)
  _close(metrics["perplexity"], jnp.exp(ce))
  _close(metrics["teacher_perplexity"], jnp.exp(teacher_ce))
  _close(metrics["agreement"], agreement)


@pytest.mark.parametrize("kind", ["forward", "reverse", "gjsd"])
def test_chunked_equals_dense(pair, kind):
  """Heads and losses applied 4 positions at a time give the loss, metrics and update of all positions at once."""
  teacher, teacher_variables, state = pair
  batch = _batch(seed=1)
  dense_state, dense = _step(teacher, kind)(state, teacher_variables, batch)
  chunked_state, chunked = _step(teacher, kind, chunk_size=4)(state, teacher_variables, batch)
  assert sorted(dense) == sorted(chunked)
  _close(chunked, dense)
  _close(chunked_state.params, dense_state.params)


def test_chunked_gradients_equal_dense(pair):
  """The rematerialised scan's gradient is the dense gradient (SGD at rate 1: the update is the gradient)."""
  teacher, teacher_variables, state = pair
  batch = _batch(seed=2)
  dense_state, _ = _step(teacher)(state, teacher_variables, batch)
  chunked_state, _ = _step(teacher, chunk_size=8)(state, teacher_variables, batch)
  dense_grads = jax.tree.map(lambda a, b: a - b, state.params, dense_state.params)
  chunked_grads = jax.tree.map(lambda a, b: a - b, state.params, chunked_state.params)
  _close(chunked_grads, dense_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_padding_and_ignored_labels_equal_slicing(pair, chunk_size):
  """A padding mask and labels of -100 leave the same loss and update as dropping those tokens' rows.

  Rows 4-7 are padding (mask False) in one batch and absent in the other; the update and every metric agree.
  """
  teacher, teacher_variables, state = pair
  full = _batch(seed=3)
  half = {k: v[:4] for k, v in full.items()}
  padded = dict(full, mask=np.arange(BATCH)[:, None].repeat(LENGTH, 1) < 4)
  ignored = dict(full, label=np.where(np.arange(BATCH)[:, None] < 4, full["label"], -100))
  garbage = dict(padded, tokens=np.where(padded["mask"], full["tokens"], VOCAB - 1))
  step = _step(teacher, chunk_size=chunk_size)
  ref_state, ref = step(state, teacher_variables, half)
  for batch in (padded, ignored, garbage):
    new_state, metrics = step(state, teacher_variables, batch)
    _close(metrics, ref, rtol=1e-5, atol=1e-6)
    _close(new_state.params, ref_state.params, rtol=1e-5, atol=1e-6)


def _topk_batch(teacher, teacher_variables, batch, k, temperature=None):
  """The cache's entries; with ``temperature``, the normaliser at it and its record, as JoinedSource adds them."""
  logits = teacher.linen_module.apply(teacher_variables, batch["tokens"])
  top = sparse_losses.teacher_topk(logits, k=k, temperature=1.0 if temperature is None else temperature)
  recorded = {} if temperature is None else {"teacher_topk_temperature": np.full(len(logits), temperature, np.float32)}
  return {
    **batch,
    "teacher_topk_logits": np.asarray(top["topk_logits"]),
    "teacher_topk_indices": np.asarray(top["topk_indices"]).astype(np.uint16),
    "teacher_log_normalizer": np.asarray(top["log_normalizer"]),
    **recorded,
  }


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_topk_with_k_equal_vocab_is_the_dense_step(pair, tail, chunk_size):
  """A cache holding every class (k = V, float32 logits) trains the student exactly as the live teacher does."""
  teacher, teacher_variables, state = pair
  batch = _batch(seed=4)
  _, dense = _step(teacher)(state, teacher_variables, batch)
  dense_state, _ = _step(teacher)(state, teacher_variables, batch)
  cached = _topk_batch(teacher, teacher_variables, batch, VOCAB)
  step = jaxkd.make_train_step(
    objective=lm.lm_objective("topk", alpha=0.5, tail=tail), placement="single", donate=False, chunk_size=chunk_size
  )
  topk_state, metrics = step(state, None, cached)
  _close(metrics["loss"], dense["loss"], rtol=2e-5)
  _close(metrics["loss/topk"], dense["loss/forward"], rtol=2e-5, atol=1e-6)
  _close(metrics["agreement"], dense["agreement"])
  _close(topk_state.params, dense_state.params, rtol=1e-4, atol=1e-5)


def test_topk_small_k_runs_and_differs_from_dense(pair):
  teacher, teacher_variables, state = pair
  batch = _topk_batch(teacher, teacher_variables, _batch(seed=5), 4)
  step = jaxkd.make_train_step(objective=lm.lm_objective("topk", alpha=1.0), placement="single", donate=False)
  _, metrics = step(state, None, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  assert "teacher_perplexity" not in metrics  # a top-k cache does not know the teacher's full distribution


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake CPU) devices")
@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_placements_equal_one_device(pair, devices, chunk_size):
  """shard_map over 2 and 4 devices and pmap give one device's metrics and state, for padded token batches."""
  teacher, teacher_variables, state = pair
  batch = _batch(seed=6)
  batch["mask"] = np.random.default_rng(0).random((BATCH, LENGTH)) < 0.8  # uneven real tokens per device

  def run(placement):
    step = _step(teacher, placement=placement, chunk_size=chunk_size)
    s, t = placement.put(state), placement.put(teacher_variables)
    for _ in range(2):
      s, metrics = step(s, t, batch)
    return placement.to_host(s).params, placement.unreplicate(metrics)

  ref_params, ref = run(Placement.single())
  for placement in (Placement.data_parallel(jax.devices()[:devices]), Placement.pmap(jax.devices()[:devices])):
    params, metrics = run(placement)
    _close(metrics, ref, rtol=1e-5, atol=1e-6)
    _close(params, ref_params, rtol=1e-5, atol=1e-6)


def test_vocabulary_mismatch_is_an_error(pair):
  _, _, state = pair
  other = _module(vocab=VOCAB + 8)
  other_variables = jax.jit(other.init)(jax.random.key(2), np.zeros((2, LENGTH), np.int32))
  with pytest.raises(ValueError, match="student and teacher disagree"):
    _step(lm.lm_model(other, name="teacher"))(state, other_variables, _batch())


def test_cache_mismatches_are_errors(pair):
  teacher, teacher_variables, state = pair
  batch = _topk_batch(teacher, teacher_variables, _batch(seed=7), 4)
  step = jaxkd.make_train_step(objective=lm.lm_objective("topk"), placement="single", donate=False)
  shorter = dict(batch, teacher_topk_logits=batch["teacher_topk_logits"][:, :-1])
  with pytest.raises(ValueError):
    step(state, None, shorter)
  wrong_vocab = dict(batch, teacher_topk_indices=np.full_like(batch["teacher_topk_indices"], VOCAB + 3))
  with pytest.raises(ValueError, match=r"\[0, "):
    step(state, None, wrong_vocab)
  top1 = _topk_batch(teacher, teacher_variables, _batch(seed=7), 1)
  with pytest.raises(ValueError, match="tail='bucket'"):
    step(state, None, top1)
  missing = {k: v for k, v in batch.items() if k != "teacher_topk_indices"}
  with pytest.raises(ValueError, match="teacher_topk_indices"):
    step(state, None, missing)


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_a_bucket_tail_at_another_temperature_than_the_cache_is_an_error(pair, chunk_size):
  """The tail's mass comes from the cached log-normaliser, which holds only at the cache's temperature."""
  teacher, teacher_variables, state = pair
  batch = _topk_batch(teacher, teacher_variables, _batch(seed=8), 4, temperature=2.0)

  def step(temperature, tail="bucket"):
    objective = lm.lm_objective("topk", alpha=0.5, temperature=temperature, tail=tail)
    return jaxkd.make_train_step(objective=objective, placement="single", donate=False, chunk_size=chunk_size)

  with pytest.raises(
    ValueError, match=r"cache's temperature is 2\.0 .*teacher_topk_temperature.*Pass temperature=2\.0"
  ):
    step(1.0)(state, None, batch)
  with pytest.raises(ValueError, match=r"mixes log-normalisers at temperatures \[1\.0, 2\.0\]"):
    step(1.0)(state, None, {**batch, "teacher_topk_temperature": np.where(np.arange(BATCH) < 4, 1.0, 2.0)})
  _, metrics = step(2.0)(state, None, batch)  # Equal temperatures train.
  assert np.isfinite(float(metrics["loss/topk"]))
  step(1.0, tail="renormalize")(state, None, batch)  # The renormalised top k hold at any temperature.
  unrecorded = {k: v for k, v in batch.items() if k != "teacher_topk_temperature"}
  step(1.0)(state, None, unrecorded)  # Batches built without JoinedSource record none: nothing to compare.


def test_chunk_size_errors(pair):
  teacher, teacher_variables, state = pair
  with pytest.raises(ValueError, match="must divide"):
    _step(teacher, chunk_size=5)(state, teacher_variables, _batch())
  with pytest.raises(ValueError, match="chunk_size must be"):
    _step(teacher, chunk_size=0)
  with pytest.raises(ValueError, match="head is separate"):
    _step(teacher.linen_module.apply, chunk_size=4)


def test_lm_model_and_objective_errors():
  with pytest.raises(ValueError, match="no method"):
    lm.lm_model(MLP(hidden_sizes=(4,), num_classes=3))
  with pytest.raises(ValueError, match="kind must be"):
    lm.lm_objective("kl")
  with pytest.raises(ValueError, match="tail must be"):
    lm.sparse_kd(tail="drop")
  with pytest.raises(ValueError, match="beta"):
    lm.token_kd("gjsd", beta=1.0)


def test_chunked_step_needs_a_fraction_of_the_dense_memory():
  """Compiled, not run: the chunked step's temporaries are a fraction of the dense step's at a large vocabulary.

  benchmarks/lm_step.py measures the issue's size (vocabulary 32k, length 512); here a smaller one keeps the
  compile cheap. The logits are [4, 256, 4096] float32 = 16 MiB per copy, the model's own activations ~1 MiB.
  """
  vocab, length = 4096, 256
  config = dict(vocab_size=vocab, num_layers=1, d_model=32, num_heads=2, max_len=length)
  student_module, teacher_module = TransformerLM(**config), TransformerLM(**config)
  tokens = np.zeros((4, length), np.int32)
  teacher_variables = jax.jit(teacher_module.init)(jax.random.key(1), tokens)
  state = jaxkd.create_train_state(lm.lm_model(student_module), optax.sgd(0.1), {"tokens": tokens}, rng=0)
  batch = {"tokens": tokens, "label": tokens}
  teacher = lm.lm_model(teacher_module, name="teacher")

  def temp_bytes(chunk_size):
    step = _step(teacher, chunk_size=chunk_size)
    return step.lower(state, teacher_variables, batch).compile().memory_analysis().temp_size_in_bytes

  dense, chunked = temp_bytes(None), temp_bytes(16)
  assert dense > 3 * 16 * 2**20  # several float32 [batch, length, vocab] buffers at once
  assert chunked <= dense / 4, (chunked, dense)
