"""Tests for jaxkd.losses: the CRD pieces against a float64 NumPy reference, and the step against its hand composition.

The pmap test uses the 4 fake CPU devices of tests/conftest.py.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.losses import _crd as crd

# ---------------------------------------------------------------- NumPy reference


def np_crd(s, t, memory_student, memory_teacher, contrast, temperature, log_z=None):
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  num_data, num_negatives = len(memory_student), contrast.shape[1] - 1
  noise = num_negatives / num_data  # m P_n

  def nce(anchor, memory, log_z):
    scores = np.einsum("bkd,bd->bk", np.asarray(memory, np.float64)[contrast], anchor) / temperature
    z = math.exp(log_z) if log_z is not None else np.exp(scores).mean() * num_data
    p = np.exp(scores) / z
    log_d1 = np.log(p[:, 0] / (p[:, 0] + noise))
    log_d0 = np.log(noise / (p[:, 1:] + noise)).sum(1)
    return -(log_d1 + log_d0)

  log_z = log_z or (None, None)
  return nce(s, memory_teacher, log_z[0]) + nce(t, memory_student, log_z[1])


def random_features(shape, seed, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def unit_rows(shape, seed):
  x = random_features(shape, seed)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------- the pieces


class ReferenceTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_crd_loss(self):
    s, t = unit_rows((4, 8), 2), unit_rows((4, 8), 3)
    memory = crd.crd_init_memory(jax.random.key(0), 20, 8)
    contrast = crd.crd_sample_contrast_indices(jax.random.key(1), np.array([3, 0, 19, 7]), num_negatives=6, num_data=20)
    contrast = np.asarray(contrast)
    out = self.variant(lambda s, t, m, c: crd.crd_loss(s, t, m, c, temperature=0.5))(s, t, memory, contrast)
    chex.assert_shape(out, (4,))
    np.testing.assert_allclose(out, np_crd(s, t, *memory, contrast, 0.5), rtol=1e-4)
    log_z = (1.5, 2.5)
    out = self.variant(lambda s, t, m, c: crd.crd_loss(s, t, m, c, temperature=0.5, log_normalizers=log_z))(
      s, t, memory, contrast
    )
    np.testing.assert_allclose(out, np_crd(s, t, *memory, contrast, 0.5, log_z), rtol=1e-4)


def test_crd_heads_sampling_update_and_gradients():
  student_features, teacher_features = random_features((4, 2, 2, 3), 22), random_features((4, 10), 23)
  heads = crd.CRDHeads(features=6)
  indices = np.array([5, 0, 31, 17])

  @jax.jit
  def run(student_features, teacher_features):
    variables = heads.init(jax.random.key(0), student_features, teacher_features)
    contrast = crd.crd_sample_contrast_indices(jax.random.key(1), indices, num_negatives=500, num_data=32)
    memory = crd.crd_init_memory(jax.random.key(2), 32, 6)

    def loss(params, memory):
      s, t = heads.apply({"params": params}, student_features, teacher_features)
      return crd.crd_loss(s, t, memory, contrast).mean(), (s, t)

    (param_grads, memory_grads), (s, t) = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], memory)
    teacher_grad = jax.grad(lambda f: heads.apply(variables, student_features, f)[1].sum())(teacher_features)
    updated = crd.crd_update_memory(memory, indices, s, t)
    return variables, contrast, memory, param_grads, memory_grads, teacher_grad, s, t, updated

  variables, contrast, memory, param_grads, memory_grads, teacher_grad, s, t, updated = run(
    student_features, teacher_features
  )
  assert set(variables["params"]) == {"student_embed", "teacher_embed"}
  assert s.shape == t.shape == (4, 6)
  np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0, rtol=1e-6)

  assert contrast.shape == (4, 501) and contrast.dtype == jnp.int32
  np.testing.assert_array_equal(contrast[:, 0], indices)
  assert np.all(np.asarray(contrast[:, 1:]) != indices[:, None])
  assert np.asarray(contrast).min() == 0 and np.asarray(contrast).max() == 31
  assert np.all(np.abs(np.asarray(memory.student)) <= 1 / math.sqrt(2.0))

  for head in ["student_embed", "teacher_embed"]:  # both heads are trained
    assert np.abs(param_grads[head]["kernel"]).sum() > 0
  for bank in memory_grads:  # the memory is not
    np.testing.assert_array_equal(bank, 0.0)
  np.testing.assert_array_equal(teacher_grad, 0.0)  # nor the teacher network

  rows = 0.5 * np.asarray(memory.teacher)[indices] + 0.5 * np.asarray(t)
  np.testing.assert_allclose(updated.teacher[indices], rows / np.linalg.norm(rows, axis=1, keepdims=True), rtol=1e-5)
  untouched = np.setdiff1d(np.arange(32), indices)
  np.testing.assert_array_equal(updated.student[untouched], memory.student[untouched])
  np.testing.assert_allclose(np.linalg.norm(updated.student[indices], axis=1), 1.0, rtol=1e-6)


def test_crd_loss_prefers_the_positive_and_is_per_example_with_fixed_normalizers():
  @jax.jit
  def losses():
    memory = crd.crd_init_memory(jax.random.key(3), 64, 8)
    memory = crd.CRDMemory(*(m / jnp.linalg.norm(m, axis=1, keepdims=True) for m in memory))
    indices = jnp.array([1, 2, 3, 4])
    contrast = crd.crd_sample_contrast_indices(jax.random.key(4), indices, num_negatives=16, num_data=64)
    aligned_s, aligned_t = memory.teacher[indices], memory.student[indices]  # each embedding matches its positive
    random_s = crd.crd_init_memory(jax.random.key(5), 4, 8).student
    random_s = random_s / jnp.linalg.norm(random_s, axis=1, keepdims=True)
    log_z = crd.crd_log_normalizers(aligned_s, aligned_t, memory, contrast)
    aligned = crd.crd_loss(aligned_s, aligned_t, memory, contrast, log_normalizers=log_z)
    shuffled = crd.crd_loss(random_s, aligned_t, memory, contrast, log_normalizers=log_z)
    per_example = jax.vmap(lambda s, t, c: crd.crd_loss(s[None], t[None], memory, c[None], log_normalizers=log_z)[0])(
      aligned_s, aligned_t, contrast
    )
    return aligned, shuffled, per_example

  aligned, shuffled, per_example = losses()
  assert np.all(np.asarray(aligned) < np.asarray(shuffled))
  np.testing.assert_allclose(per_example, aligned, rtol=1e-5)


def test_update_memory_under_pmap_on_four_devices_is_the_global_batch_update():
  devices = jax.local_device_count()
  assert devices == 4, "tests/conftest.py configures 4 fake CPU devices"
  s = random_features((devices, 2, 5), 14)
  memory = crd.crd_init_memory(jax.random.key(0), 16, 5)
  indices = np.arange(devices * 2).reshape(devices, 2) * 2
  updated = jax.pmap(
    lambda m, i, s, t: crd.crd_update_memory(m, i, s, t, momentum=0.5, axis_name="batch"),
    in_axes=(None, 0, 0, 0),
    axis_name="batch",
  )(memory, indices, s, s)
  expected = crd.crd_update_memory(memory, indices.reshape(-1), s.reshape(-1, 5), s.reshape(-1, 5), momentum=0.5)
  for bank, expected_bank in zip(updated, expected, strict=True):
    np.testing.assert_allclose(bank, np.broadcast_to(expected_bank, bank.shape), rtol=1e-6)


# ---------------------------------------------------------------- the step

NUM_DATA, EMBED, NEGATIVES, TEMPERATURE, MOMENTUM = 32, 8, 5, 0.5, 0.5


def _step(s, t, state, index, mask, rng, *, devices=1, global_normalizers=True):
  """crd_step with the data-parallel axis bound by a named vmap over ``devices`` (inputs ``[devices, ...]``)."""
  step = functools.partial(
    crd.crd_step,
    axis_name="batch",
    num_negatives=NEGATIVES,
    temperature=TEMPERATURE,
    momentum=MOMENTUM,
    global_normalizers=global_normalizers,
  )
  return jax.jit(
    jax.vmap(
      lambda s, t, state, i, m: step(s, t, state, index=i, mask=m, rng=rng),
      in_axes=(0, 0, None, 0, 0),
      axis_name="batch",
      axis_size=devices,
    )
  )(s, t, state, index, mask)


def _by_hand(s, t, memory, index, mask, rng, log_z=None):
  """The step composed from the pieces: per-example keys, log Z (the given one, else the batch's), loss, update."""
  contrast = jnp.stack(
    [
      crd.crd_sample_contrast_indices(
        jax.random.fold_in(rng, i), jnp.array([i]), num_negatives=NEGATIVES, num_data=NUM_DATA
      )[0]
      for i in index
    ]
  )
  estimate = crd.crd_log_normalizers(s, t, memory, contrast, temperature=TEMPERATURE)
  log_z = estimate if log_z is None else log_z
  loss = crd.crd_loss(s, t, memory, contrast, temperature=TEMPERATURE, log_normalizers=log_z)
  # Masked rows are simply left out of the update.
  memory = crd.crd_update_memory(memory, index[mask], s[mask], t[mask], momentum=MOMENTUM)
  return loss, memory, jnp.stack(log_z), jnp.stack(estimate)


def test_step_equals_its_hand_composition_keeps_log_z_and_skips_masked_rows():
  state = crd.crd_init_state(jax.random.key(0), NUM_DATA, embed_dim=EMBED)
  assert int(state["log_z_ready"]) == 0
  memory = crd.CRDMemory(**state["memory"])
  index = np.array([3, 17, 0, 29], np.int32)
  mask = np.array([True, True, False, True])
  s, t = unit_rows((4, EMBED), 30), unit_rows((4, EMBED), 31)
  rng = jax.random.key(7)

  loss, new_state = jax.tree.map(lambda x: x[0], _step(s[None], t[None], state, index[None], mask[None], rng))
  expected_loss, expected_memory, expected_log_z, _ = _by_hand(s, t, memory, index, mask, rng)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  np.testing.assert_allclose(new_state["log_z"], expected_log_z, rtol=1e-6)
  assert int(new_state["log_z_ready"]) == 1
  for side in ("student", "teacher"):
    np.testing.assert_allclose(new_state["memory"][side], getattr(expected_memory, side), rtol=1e-6)
    # The masked example's row (index 0) and every row outside the batch are untouched.
    untouched = np.setdiff1d(np.arange(NUM_DATA), index[mask])
    np.testing.assert_array_equal(new_state["memory"][side][untouched], getattr(memory, side)[untouched])
    assert not np.allclose(new_state["memory"][side][index[mask]], getattr(memory, side)[index[mask]])

  # The second step keeps the first batch's log Z, not its own estimate.
  index2, mask2 = np.array([5, 3, 30, 11], np.int32), np.ones(4, bool)
  s2, t2 = unit_rows((4, EMBED), 32), unit_rows((4, EMBED), 33)
  rng2 = jax.random.key(8)
  loss2, state2 = jax.tree.map(lambda x: x[0], _step(s2[None], t2[None], new_state, index2[None], mask2[None], rng2))
  memory1 = crd.CRDMemory(**new_state["memory"])
  log_z1 = (new_state["log_z"][0], new_state["log_z"][1])
  expected_loss2, expected_memory2, _, estimate2 = _by_hand(s2, t2, memory1, index2, mask2, rng2, log_z=log_z1)
  np.testing.assert_array_equal(state2["log_z"], new_state["log_z"])
  assert not np.allclose(estimate2, new_state["log_z"])  # so keeping it is visible in the loss
  np.testing.assert_allclose(loss2, expected_loss2, rtol=1e-6)
  for side in ("student", "teacher"):
    np.testing.assert_allclose(state2["memory"][side], getattr(expected_memory2, side), rtol=1e-6)


def test_step_does_not_depend_on_the_device_layout():
  """Four devices of 2 examples (global normalisers, equal batches) give the one-device step of all 8."""
  state = crd.crd_init_state(jax.random.key(1), NUM_DATA, embed_dim=EMBED)
  index = np.array([4, 9, 1, 22, 31, 0, 13, 7], np.int32)
  mask = np.array([True] * 6 + [False, True])
  s, t = unit_rows((8, EMBED), 40), unit_rows((8, EMBED), 41)
  rng = jax.random.key(9)
  one_loss, one_state = _step(s[None], t[None], state, index[None], mask[None], rng)
  four_loss, four_state = _step(
    s.reshape(4, 2, EMBED), t.reshape(4, 2, EMBED), state, index.reshape(4, 2), mask.reshape(4, 2), rng, devices=4
  )
  np.testing.assert_allclose(four_loss.reshape(-1), one_loss[0], rtol=1e-5)
  for one, four in zip(jax.tree.leaves(one_state), jax.tree.leaves(four_state), strict=True):
    np.testing.assert_allclose(four, np.broadcast_to(one, four.shape), rtol=1e-5, atol=1e-7)
  # Without global normalisers each device keeps its own estimate.
  _, local_state = _step(
    s.reshape(4, 2, EMBED),
    t.reshape(4, 2, EMBED),
    state,
    index.reshape(4, 2),
    mask.reshape(4, 2),
    rng,
    devices=4,
    global_normalizers=False,
  )
  assert not np.allclose(local_state["log_z"], np.broadcast_to(one_state["log_z"], (4, 2)))


# ---------------------------------------------------------------- errors


def test_errors_name_the_shapes():
  s = np.zeros((4, 5), np.float32)
  memory = crd.crd_init_memory(jax.random.key(0), 10, 5)
  contrast = np.zeros((4, 3), np.int32)
  with pytest.raises(ValueError, match=r"both be \[batch, embed_dim\], got \(4, 5\) and \(4, 6\)"):
    crd.crd_loss(s, np.zeros((4, 6)), memory, contrast)
  with pytest.raises(ValueError, match=r"embed_dim 5, got student \(10, 4\)"):
    crd.crd_loss(s, s, crd.crd_init_memory(jax.random.key(0), 10, 4), contrast)
  with pytest.raises(ValueError, match=r"contrast_indices must be integer \[batch, 1 \+ num_negatives\] = \(4, >= 2\)"):
    crd.crd_loss(s, s, memory, np.zeros((4, 1), np.int32))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    crd.crd_loss(s, s, memory, contrast, temperature=0.0)
  with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1.0"):
    crd.crd_update_memory(memory, np.arange(4), s, s, momentum=1.0)
  with pytest.raises(ValueError, match=r"teacher_embed must be \[batch, embed_dim\] = \(4, 5\), got \(4, 6\)"):
    crd.crd_update_memory(memory, np.arange(4), s, np.zeros((4, 6)))
  with pytest.raises(ValueError, match="indices must be integer dataset indices"):
    crd.crd_sample_contrast_indices(jax.random.key(0), np.zeros(4), num_negatives=3, num_data=10)

  state = crd.crd_init_state(jax.random.key(0), 10, embed_dim=5)
  step = functools.partial(crd.crd_step, rng=jax.random.key(1), axis_name="batch")
  with pytest.raises(ValueError, match=r"term 'crd' \(CRD\) needs each example's dataset index in batch\['index'\]"):
    step(s, s, state, index=None, mask=np.ones(4, bool))
  with pytest.raises(ValueError, match=r"index and mask must be \[batch\] = \(4,\)"):
    step(s, s, state, index=np.arange(3), mask=np.ones(4, bool))
  with pytest.raises(ValueError, match=r"index and mask must be \[batch\] = \(4,\)"):
    step(s, s, state, index=np.arange(4), mask=np.ones(5, bool))
