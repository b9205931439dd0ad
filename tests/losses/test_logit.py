"""Tests for jaxkd.losses against float64 NumPy references written here.

DKD (Zhao et al. 2022), DIST (Huang et al. 2022), logit standardisation (Sun et al. 2024), reverse KL and the
generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import jaxkd
from jaxkd import losses
from jaxkd.losses import _logit as logit_losses

# ---------------------------------------------------------------- NumPy references, from the papers' formulas


def np_log_softmax(logits, temperature=1.0, where=None):
  z = np.asarray(logits, np.float64) / temperature
  if where is not None:
    z = np.where(where, z, -np.inf)
  z_max = np.max(z, axis=-1, keepdims=True)
  return z - z_max - np.log(np.sum(np.exp(z - z_max), axis=-1, keepdims=True))


def np_kl(p, q):
  """sum p log(p / q) over the last axis with 0 log 0 = 0."""
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)


def np_dkd(s, t, labels, alpha, beta, temperature):
  p_s, p_t = np.exp(np_log_softmax(s, temperature)), np.exp(np_log_softmax(t, temperature))
  target = np.eye(s.shape[-1], dtype=bool)[labels]
  ps_y, pt_y = (p_s * target).sum(-1), (p_t * target).sum(-1)
  tckd = np_kl(np.stack([pt_y, 1 - pt_y], -1), np.stack([ps_y, 1 - ps_y], -1))
  # p-hat_i = p_i / (1 - p_y) over the non-target classes; the target entry is 0.
  hat_s = np.where(target, 0.0, p_s) / (1 - ps_y)[..., None]
  hat_t = np.where(target, 0.0, p_t) / (1 - pt_y)[..., None]
  nckd = np_kl(hat_t, np.where(target, 1.0, hat_s))
  return temperature**2 * (alpha * tckd + beta * nckd), tckd, nckd


def np_pearson(a, b, axis, eps=1e-8):
  a = a - a.mean(axis, keepdims=True)
  b = b - b.mean(axis, keepdims=True)
  return (a * b).sum(axis) / (np.sqrt((a * a).sum(axis)) * np.sqrt((b * b).sum(axis)) + eps)


def np_dist(s, t, beta, gamma, temperature):
  num_classes = s.shape[-1]
  y_s = np.exp(np_log_softmax(s, temperature)).reshape(-1, num_classes)
  y_t = np.exp(np_log_softmax(t, temperature)).reshape(-1, num_classes)
  inter = np.mean(1 - np_pearson(y_s, y_t, axis=1))
  intra = np.mean(1 - np_pearson(y_s, y_t, axis=0))
  return temperature**2 * (beta * inter + gamma * intra)


def np_standardize(z, eps=1e-7):
  z = np.asarray(z, np.float64)
  return (z - z.mean(-1, keepdims=True)) / (z.std(-1, keepdims=True) + eps)


def np_forward_kl(s, t, temperature, where=None):
  return temperature**2 * np_kl(
    np.exp(np_log_softmax(t, temperature, where)), np.exp(np_log_softmax(s, temperature, where))
  )


def np_reverse_kl(s, t, temperature, where=None):
  return temperature**2 * np_kl(
    np.exp(np_log_softmax(s, temperature, where)), np.exp(np_log_softmax(t, temperature, where))
  )


def np_gjsd(s, t, beta, temperature, where=None):
  p = np.exp(np_log_softmax(s, temperature, where))
  q = np.exp(np_log_softmax(t, temperature, where))
  m = beta * q + (1 - beta) * p
  return temperature**2 * (beta * np_kl(q, np.where(m > 0, m, 1.0)) + (1 - beta) * np_kl(p, np.where(m > 0, m, 1.0)))


def random_logits(shape, seed, scale=3.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def random_labels(shape, num_classes, seed):
  return np.random.default_rng(seed).integers(0, num_classes, size=shape).astype(np.int32)


# ---------------------------------------------------------------- values


class ReferenceTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((4, 10), 4.0, 1.0, 8.0), ((2, 3, 5), 1.0, 0.5, 0.5))
  def test_dkd(self, shape, temperature, alpha, beta):
    s, t = random_logits(shape, 0), random_logits(shape, 1)
    labels = random_labels(shape[:-1], shape[-1], 2)
    fn = self.variant(lambda s, t, y: logit_losses.dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=temperature))
    out = fn(s, t, labels)
    chex.assert_shape(out, shape[:-1])
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, np_dkd(s, t, labels, alpha, beta, temperature)[0], rtol=1e-4, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((4, 10), 4.0, 1.0, 1.0), ((2, 3, 5), 1.0, 2.0, 0.5))
  def test_dist(self, shape, temperature, beta, gamma):
    s, t = random_logits(shape, 3), random_logits(shape, 4)
    fn = self.variant(lambda s, t: logit_losses.dist_loss(s, t, beta=beta, gamma=gamma, temperature=temperature))
    out = fn(s, t)
    chex.assert_shape(out, ())
    np.testing.assert_allclose(out, np_dist(s, t, beta, gamma, temperature), rtol=1e-4, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((4, 10), 2.0), ((2, 3, 5), 1.0))
  def test_standardize_and_standardized_kd(self, shape, temperature):
    s, t = random_logits(shape, 5), random_logits(shape, 6)
    z = self.variant(lambda z: logit_losses.standardize_logits(z))(s)
    np.testing.assert_allclose(z, np_standardize(s), rtol=1e-5, atol=1e-5)
    out = self.variant(lambda s, t: logit_losses.standardized_kd_loss(s, t, temperature=temperature))(s, t)
    expected = np_forward_kl(np_standardize(s), np_standardize(t), temperature)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((4, 10), 1.0, 0.1), ((2, 3, 5), 4.0, 0.5), ((7,), 2.0, 0.9))
  def test_reverse_kl_and_generalized_jsd(self, shape, temperature, beta):
    s, t = random_logits(shape, 7), random_logits(shape, 8)
    out = self.variant(lambda s, t: logit_losses.reverse_kl_loss(s, t, temperature=temperature))(s, t)
    chex.assert_shape(out, shape[:-1])
    np.testing.assert_allclose(out, np_reverse_kl(s, t, temperature), rtol=1e-4, atol=1e-5)
    out = self.variant(lambda s, t: logit_losses.generalized_jsd_loss(s, t, beta=beta, temperature=temperature))(s, t)
    chex.assert_shape(out, shape[:-1])
    np.testing.assert_allclose(out, np_gjsd(s, t, beta, temperature), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the papers' identities and limits


def test_dkd_decomposes_classical_kd():
  """T² KL(p^t || p^s) = TCKD + (1 - p^t_y) NCKD (Zhao et al. 2022, eq. 1)."""
  s, t = random_logits((6, 7), 9), random_logits((6, 7), 10)
  labels = random_labels((6,), 7, 11)

  @jax.jit
  def parts(temperature):
    tckd = logit_losses.dkd_loss(s, t, labels, alpha=1.0, beta=0.0, temperature=temperature)
    nckd = logit_losses.dkd_loss(s, t, labels, alpha=0.0, beta=1.0, temperature=temperature)
    return tckd, nckd, losses.kd_loss(s, t, temperature)

  for temperature in [1.0, 4.0]:
    tckd, nckd, kd = parts(jnp.float32(temperature))
    teacher_target_prob = np.take_along_axis(np.exp(np_log_softmax(t, temperature)), labels[:, None], -1)[:, 0]
    np.testing.assert_allclose(tckd + (1 - teacher_target_prob) * nckd, kd, rtol=1e-4, atol=1e-6)


def test_dkd_is_accurate_for_a_confident_target():
  """1 - p_y comes from a logsumexp over the other classes: no cancellation when p_y rounds to 1 in float32."""
  s = np.array([[30.0, 0.0, 1.0]], np.float32)
  t = np.array([[25.0, 2.0, 0.0]], np.float32)
  out = jax.jit(lambda s, t: logit_losses.dkd_loss(s, t, np.array([0]), alpha=1.0, beta=1.0, temperature=1.0))(s, t)
  np.testing.assert_allclose(out, np_dkd(s, t, np.array([0]), 1.0, 1.0, 1.0)[0], rtol=1e-4)


def test_generalized_jsd_limits_are_forward_and_reverse_kl():
  """JSD(beta) / beta -> KL(teacher || student) as beta -> 0, JSD(beta) / (1 - beta) -> KL(student || teacher) as
  beta -> 1 (Agarwal et al. 2024, section 3)."""
  s, t = random_logits((5, 8), 12, 1.0), random_logits((5, 8), 13, 1.0)

  @jax.jit
  def relative_errors(small, temperature):
    forward = losses.kd_loss(s, t, temperature)
    reverse = logit_losses.reverse_kl_loss(s, t, temperature=temperature)
    near_zero = logit_losses.generalized_jsd_loss(s, t, beta=small, temperature=temperature) / small
    near_one = logit_losses.generalized_jsd_loss(s, t, beta=1 - small, temperature=temperature) / small
    return jnp.max(jnp.abs(near_zero - forward) / forward), jnp.max(jnp.abs(near_one - reverse) / reverse)

  for temperature in [1.0, 2.0]:
    errors = [relative_errors(jnp.float32(small), jnp.float32(temperature)) for small in [1e-1, 1e-2, 1e-3]]
    assert errors[0][0] > errors[1][0] > errors[2][0], errors
    assert errors[0][1] > errors[1][1] > errors[2][1], errors
    assert max(errors[2]) < 2e-2, errors


def test_generalized_jsd_symmetric_and_bounded_at_one_half():
  s, t = random_logits((6, 9), 14, 10.0), random_logits((6, 9), 15, 10.0)
  jsd = jax.jit(lambda s, t: logit_losses.generalized_jsd_loss(s, t, beta=0.5))
  half = jsd(s, t)
  np.testing.assert_allclose(half, jsd(t, s), rtol=1e-5)
  assert np.all(np.asarray(half) <= np.log(2) + 1e-6) and np.all(np.asarray(half) >= 0)
  # Disjoint supports reach the bound.
  one_hot = np.zeros((6, 9), np.float32)
  one_hot[:, 0], one_hot[:, 1] = 50.0, -50.0
  np.testing.assert_allclose(jsd(one_hot, -one_hot)[0], np.log(2), rtol=1e-5)


def test_standardized_kd_invariances():
  """Z-scoring removes each side's shift and scale (Sun et al. 2024, section 3)."""
  s, t = random_logits((5, 10), 16), random_logits((5, 10), 17)
  rng = np.random.default_rng(18)
  scale, shift = rng.uniform(0.1, 10.0, (5, 1)).astype(np.float32), rng.normal(size=(5, 1)).astype(np.float32)
  loss = jax.jit(lambda s, t: logit_losses.standardized_kd_loss(s, t, temperature=2.0))
  base = loss(s, t)
  np.testing.assert_allclose(loss(scale * s + shift, t), base, rtol=1e-4)
  np.testing.assert_allclose(loss(s, scale * t - shift), base, rtol=1e-4)
  np.testing.assert_allclose(loss(t, 3.0 * t + 1.0), np.zeros(5), atol=1e-5)
  z = np.asarray(jax.jit(logit_losses.standardize_logits)(s))
  np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-6)
  np.testing.assert_allclose(z.std(-1), 1.0, rtol=1e-5)


def test_dist_intra_class_term_is_over_the_batch():
  """The intra-class term correlates each class over the batch: the inter-class term of the transposed
  probabilities. So the loss of a batch is not the mean of its halves' losses."""
  s, t = random_logits((6, 4), 19), random_logits((6, 4), 20)
  intra = jax.jit(lambda s, t: logit_losses.dist_loss(s, t, beta=0.0, gamma=1.0))
  y_s, y_t = np.exp(np_log_softmax(s)), np.exp(np_log_softmax(t))
  np.testing.assert_allclose(intra(s, t), np.mean(1 - np_pearson(y_s.T, y_t.T, axis=1)), rtol=1e-5)
  halves = (intra(s[:3], t[:3]) + intra(s[3:], t[3:])) / 2
  assert not np.isclose(intra(s, t), halves, rtol=1e-2)


def test_dist_global_batch_over_named_axis():
  """With axis_name each device sees the loss of the gathered global batch, and pmean of gradients is exact."""
  s, t = random_logits((4, 3, 6), 21), random_logits((4, 3, 6), 22)
  mask = np.ones((4, 3), bool)
  mask[1, 2] = mask[3, 0] = False

  def value_and_grad(s, t, m, axis_name=None):
    return jax.value_and_grad(lambda s: logit_losses.dist_loss(s, t, position_mask=m, axis_name=axis_name))(s)

  @jax.jit
  def run(s, t, mask):
    per_device = jax.vmap(functools.partial(value_and_grad, axis_name="devices"), axis_name="devices")(s, t, mask)
    return per_device, value_and_grad(s.reshape(12, 6), t.reshape(12, 6), mask.reshape(12))

  (per_device_values, per_device_grads), (whole_value, whole_grad) = run(s, t, mask)
  np.testing.assert_allclose(per_device_values, np.full(4, whole_value), rtol=1e-5)
  np.testing.assert_allclose(per_device_grads.reshape(12, 6) / 4, whole_grad, rtol=1e-4, atol=1e-7)


def _all_losses(labels):
  """The per-position losses, by name, with the position_mask/temperature keywords they share."""
  return {
    "dkd": lambda s, t, **kw: logit_losses.dkd_loss(s, t, labels, **kw),
    "standardized_kd": logit_losses.standardized_kd_loss,
    "reverse_kl": logit_losses.reverse_kl_loss,
    "generalized_jsd": lambda s, t, **kw: logit_losses.generalized_jsd_loss(s, t, beta=0.2, **kw),
  }


def _stacked(labels, names=None):
  """All per-position losses in one function (one compilation per test): [num_losses, *positions]."""
  fns = _all_losses(labels)
  names = names or list(fns)
  return lambda s, t, **kw: jnp.stack([fns[name](s, t, **kw) for name in names])


def test_vmap_per_example_losses():
  s, t = random_logits((3, 4, 6), 23), random_logits((3, 4, 6), 24)
  labels = random_labels((3, 4), 6, 25)

  @jax.jit
  def both(s, t, labels):
    fn = lambda s, t, y: _stacked(y)(s, t, temperature=2.0)  # noqa: E731
    return jax.vmap(fn, out_axes=1)(s, t, labels), fn(s, t, labels)

  vmapped, batched = both(s, t, labels)
  np.testing.assert_allclose(vmapped, batched, rtol=1e-5)


# ---------------------------------------------------------------- gradients


def test_check_grads():
  """One check over all losses: their outputs concatenated, so each is probed by check_grads' random cotangent."""
  s, t = random_logits((3, 5), 26, 1.0), random_logits((3, 5), 27, 1.0)
  labels = np.array([0, 4, 2])

  @jax.jit
  def all_outputs(s):
    outputs = [
      logit_losses.dkd_loss(s, t, labels, alpha=1.0, beta=2.0, temperature=2.0),
      logit_losses.dist_loss(s, t, temperature=2.0),
      logit_losses.standardize_logits(s),
      logit_losses.standardized_kd_loss(s, t),
      logit_losses.reverse_kl_loss(s, t, temperature=2.0),
      logit_losses.generalized_jsd_loss(s, t, beta=0.3),
    ]
    return jnp.concatenate([jnp.ravel(x) for x in outputs])

  check_grads(all_outputs, (s,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_no_gradient_reaches_teacher():
  s, t = random_logits((3, 4), 28), random_logits((3, 4), 29)
  labels = np.array([0, 1, 2])
  grads = jax.jit(jax.jacrev(lambda t: jnp.append(_stacked(labels)(s, t).sum(1), logit_losses.dist_loss(s, t))))(t)
  np.testing.assert_array_equal(grads, 0.0)


# ---------------------------------------------------------------- masks and extreme values


def test_position_mask_on_padded_tokens():
  """[batch, seq, vocab] logits with a [batch, seq] token mask: padding holds garbage, counts for nothing."""
  s, t = random_logits((2, 5, 7), 30), random_logits((2, 5, 7), 31)
  labels = random_labels((2, 5), 7, 32)
  mask = np.array([[True] * 5, [True, True, True, False, False]])
  labels_pad = labels.copy()
  labels_pad[~mask] = -100  # a padding label
  s_pad, t_pad = s.copy(), t.copy()
  s_pad[1, 3:] = np.nan
  t_pad[1, 3] = np.inf
  t_pad[1, 4] = -np.inf

  @jax.jit
  def run(s_pad, t_pad, s, t):
    masked = lambda s: _stacked(labels_pad)(s, t_pad, position_mask=mask)  # noqa: E731
    grads = jax.jacrev(lambda s: masked(s).sum((1, 2)))(s_pad)  # [losses, batch, seq, vocab]
    return masked(s_pad), grads, _stacked(labels)(s, t)

  per_token, grads, clean = run(s_pad, t_pad, s, t)
  assert np.all(np.isfinite(grads))
  np.testing.assert_array_equal(np.asarray(grads)[:, 1, 3:], 0.0)
  np.testing.assert_array_equal(np.asarray(per_token)[:, 1, 3:], 0.0)
  np.testing.assert_allclose(np.asarray(per_token)[:, mask], np.asarray(clean)[:, mask], rtol=1e-6)


def test_dist_position_mask_equals_slicing():
  s, t = random_logits((8, 5), 33), random_logits((8, 5), 34)
  mask = np.array([True, True, False, True, True, False, True, True])
  s_pad = s.copy()
  s_pad[~mask] = np.nan

  @jax.jit
  def run(s_pad, s):
    masked = jax.value_and_grad(lambda s: logit_losses.dist_loss(s, t, temperature=2.0, position_mask=mask))(s_pad)
    return masked, logit_losses.dist_loss(s[mask], t[mask], temperature=2.0)

  (value, grad), sliced = run(s_pad, s)
  np.testing.assert_allclose(value, sliced, rtol=1e-5)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)


def test_class_where_equals_slicing():
  s, t = random_logits((6, 8), 35), random_logits((6, 8), 36)
  keep = np.array([True, False, True, True, False, True, True, True])

  def all_losses(s, t, **kw):
    return jnp.stack(
      [
        logit_losses.reverse_kl_loss(s, t, temperature=2.0, **kw),
        logit_losses.generalized_jsd_loss(s, t, beta=0.7, **kw),
        logit_losses.standardized_kd_loss(s, t, **kw),
      ]
    )

  @jax.jit
  def run(s):
    grads = jax.jacrev(lambda s: all_losses(s, t, where=keep).sum(1))(s)
    standardized = logit_losses.standardize_logits(s, where=keep)
    return all_losses(s, t, where=keep), all_losses(s[:, keep], t[:, keep]), grads, standardized

  masked, sliced, grads, standardized = run(s)
  np.testing.assert_allclose(masked, sliced, rtol=1e-5, atol=1e-7)
  assert np.all(np.isfinite(grads))
  np.testing.assert_array_equal(np.asarray(grads)[..., ~keep], 0.0)
  np.testing.assert_allclose(np.asarray(standardized)[:, keep], np_standardize(s[:, keep]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(standardized)[:, ~keep], 0.0)


def test_huge_and_minus_inf_logits_are_finite():
  s, t = random_logits((4, 10), 37) * 1e4, random_logits((4, 10), 38) * 1e4
  labels = np.arange(4)
  t_inf = t.copy()
  t_inf[:, 7] = -np.inf  # a class the teacher rules out (never the label here)
  # Reverse KL is infinite, and standardisation undefined, for -inf teacher logits: they get the finite teacher.
  with_inf, finite_only = (
    _stacked(labels, ["dkd", "generalized_jsd"]),
    _stacked(labels, ["standardized_kd", "reverse_kl"]),
  )

  @jax.jit
  def run(s, temperature):
    def totals(s):
      return jnp.concatenate(
        [
          with_inf(s, t_inf, temperature=temperature).sum(1),
          finite_only(s, t, temperature=temperature).sum(1),
          logit_losses.dist_loss(s, t, temperature=temperature)[None],
        ]
      )

    return totals(s), jax.jacrev(totals)(s)

  for temperature in [1.0, 20.0]:
    values, grads = run(s, jnp.float32(temperature))
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads)), temperature
  # -inf teacher logits at ordinary scales match the references (the reference underflows at the scale above).
  s, t_inf = s / 1e4, t_inf / 1e4
  out = jax.jit(with_inf)(s, t_inf, temperature=4.0)
  np.testing.assert_allclose(out[0], np_dkd(s, t_inf, labels, 1.0, 8.0, 4.0)[0], rtol=1e-4)
  np.testing.assert_allclose(out[1], np_gjsd(s, t_inf, 0.2, 4.0), rtol=1e-4)


def test_constant_logits_are_finite():
  """Zero variance (standardisation) and zero-variance probability rows and columns (DIST) give finite gradients."""
  s, t = np.zeros((3, 5), np.float32), random_logits((3, 5), 39)

  @jax.jit
  def run(s):
    totals = lambda s: jnp.stack([logit_losses.standardized_kd_loss(s, t).sum(), logit_losses.dist_loss(s, t)])  # noqa: E731
    return logit_losses.standardize_logits(s), totals(s), jax.jacrev(totals)(s)

  standardized, values, grads = run(s)
  np.testing.assert_array_equal(standardized, 0.0)
  assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))


def test_bfloat16_inputs_compute_in_float32():
  s, t = random_logits((6, 10), 40), random_logits((6, 10), 41)
  labels = np.arange(6)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  fn = jax.jit(
    lambda s, t: jnp.append(_stacked(labels)(s, t), jnp.broadcast_to(logit_losses.dist_loss(s, t), (1, 6)), 0)
  )
  out = fn(s16, t16)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, fn(np.asarray(s16, np.float32), np.asarray(t16, np.float32)), rtol=1e-6)


# ---------------------------------------------------------------- the module split


def test_reexported_by_losses_and_the_package():
  """jaxkd.losses re-exports every logit loss, and the package exports them from there: the same objects."""
  for name in logit_losses.__all__:
    assert name in losses.__all__, name
    assert getattr(losses, name) is getattr(logit_losses, name), name
    assert getattr(jaxkd, name) is getattr(logit_losses, name), name


# ---------------------------------------------------------------- errors


def test_errors_name_the_shapes():
  s, t = random_logits((4, 10), 42), random_logits((4, 9), 43)
  labels = np.zeros(4, np.int32)
  for name, fn in _all_losses(labels).items():
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 9\)"):
      fn(s, t)
    with pytest.raises(ValueError, match=r"position_mask must have shape .*\(4,\), got \(5,\)"):
      fn(s, s, position_mask=np.ones(5, bool))
    with pytest.raises(TypeError, match="position_mask must be a boolean mask"):
      fn(s, s, position_mask=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
      fn(s, s, temperature=0.0)
    del name
  with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 9\)"):
    logit_losses.dist_loss(s, t)
  with pytest.raises(ValueError, match=r"labels must have shape .*\(4,\), got \(5,\)"):
    logit_losses.dkd_loss(s, s, np.zeros(5, np.int32))
  with pytest.raises(TypeError, match="integer"):
    logit_losses.dkd_loss(s, s, np.zeros(4, np.float32))
  with pytest.raises(ValueError, match=r"at least 2 classes, got logits of shape \(4, 1\)"):
    logit_losses.dkd_loss(s[:, :1], s[:, :1], labels)
  for beta in [0.0, 1.0, -0.5, 1.5]:
    with pytest.raises(ValueError, match=rf"beta must be in the open interval \(0, 1\), got {beta}.*kd_loss"):
      logit_losses.generalized_jsd_loss(s, s, beta=beta)
  with pytest.raises(ValueError, match=r"where of shape \(3,\)"):
    logit_losses.reverse_kl_loss(s, s, where=np.ones(3, bool))


def test_traced_hyperparameters_under_jit():
  s, t = random_logits((4, 6), 44), random_logits((4, 6), 45)

  @jax.jit
  def loss(s, t, beta, temperature):
    return logit_losses.generalized_jsd_loss(s, t, beta=beta, temperature=temperature)

  for beta, temperature in [(0.2, 1.0), (0.6, 3.0)]:
    np.testing.assert_allclose(
      loss(s, t, jnp.float32(beta), jnp.float32(temperature)), np_gjsd(s, t, beta, temperature), rtol=1e-4
    )


# ---------------------------------------------------------------- non-finite teachers, unchecked values (issue 13)


@pytest.mark.parametrize("kind", ["nan", "plus_inf", "all_minus_inf"])
def test_broken_teacher_row_gives_nan_at_that_position(kind):
  """DKD and standardised KD once read a NaN teacher as probability 0 (loss 0, zero gradient); reverse KL, GJSD and
  DIST carry the NaN by construction. Positions the mask drops stay 0."""
  s, t = random_logits((3, 6), 46), random_logits((3, 6), 47)
  labels = np.array([0, 3, 5])
  broken = t.copy()
  broken[1] = {"nan": [1.0, np.nan, 2.0, 0.5, 0.0, 1.0], "plus_inf": [1.0, np.inf, 2.0, 0.5, 0.0, 1.0]}.get(
    kind, [-np.inf] * 6
  )
  mask = np.array([True, False, True])

  @jax.jit
  def run(t):
    per_position = _stacked(labels)(s, t, temperature=2.0)  # [losses, 3]
    grads = jax.grad(lambda s: jnp.nansum(_stacked(labels)(s, t, temperature=2.0)))(s)
    masked = _stacked(labels)(s, t, temperature=2.0, position_mask=mask)
    return per_position, grads, masked, logit_losses.dist_loss(s, t)

  per_position, grads, masked, dist = run(broken)
  clean, _, clean_masked, _ = run(t)
  assert np.all(np.isnan(np.asarray(per_position)[:, 1])), per_position
  np.testing.assert_array_equal(np.asarray(per_position)[:, [0, 2]], np.asarray(clean)[:, [0, 2]])
  # The other examples' gradients stay clean (the broken one's may be NaN or 0: the step skips it either way).
  assert np.all(np.isfinite(np.asarray(grads)[[0, 2]]))
  np.testing.assert_array_equal(masked, clean_masked)
  assert np.isnan(dist)


def test_dkd_certain_teacher_is_not_broken():
  """-inf on every non-target class: the teacher is certain; NCKD is 0, not NaN (nor is -inf at the target NaN)."""
  s = random_logits((2, 5), 48)
  labels = np.array([1, 3])
  certain = np.full((2, 5), -np.inf, np.float32)
  certain[0, 1] = certain[1, 3] = 2.0
  ruled_out = random_logits((2, 5), 49)
  ruled_out[0, 1] = ruled_out[1, 3] = -np.inf

  @jax.jit
  def run(s, t):
    loss = logit_losses.dkd_loss(s, t, labels, alpha=1.0, beta=8.0, temperature=2.0)
    tckd_only = logit_losses.dkd_loss(s, t, labels, alpha=1.0, beta=0.0, temperature=2.0)
    return loss, tckd_only, jax.grad(lambda s: logit_losses.dkd_loss(s, t, labels).sum())(s)

  loss, tckd_only, grad = run(s, certain)
  np.testing.assert_array_equal(loss, tckd_only)
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
  loss, _, grad = run(s, ruled_out)
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("label", [-1, 6])
def test_dkd_labels_out_of_range(label):
  """Concrete: ValueError naming the range (masked positions may hold anything); traced: NaN at that position."""
  s, t = random_logits((3, 6), 50), random_logits((3, 6), 51)
  labels = np.array([0, label, 5], np.int32)
  with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes=6\), got values in "):
    logit_losses.dkd_loss(s, t, labels)
  mask = np.array([True, False, True])
  np.testing.assert_array_equal(logit_losses.dkd_loss(s, t, labels, position_mask=mask)[1], 0.0)

  @jax.jit
  def run(labels):
    return logit_losses.dkd_loss(s, t, labels), jax.grad(lambda s: logit_losses.dkd_loss(s, t, labels).sum())(s)

  out, grad = run(labels)
  clean, _ = run(np.array([0, 2, 5], np.int32))
  assert np.isnan(out[1])
  np.testing.assert_array_equal(np.asarray(out)[[0, 2]], np.asarray(clean)[[0, 2]])
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("temperature", [0.0, -2.0, np.nan, np.inf])
def test_traced_bad_temperature_gives_nan(temperature):
  """Concrete temperatures raise; a traced T = 0 gave 0 for reverse KL (NaN swallowed) and T < 0 finite losses."""
  s, t = random_logits((3, 5), 52), random_logits((3, 5), 53)
  labels = np.array([0, 2, 4])
  mask = np.array([True, False, True])

  @jax.jit
  def run(temperature):
    per_position = _stacked(labels)(s, t, temperature=temperature, position_mask=mask)
    return per_position, logit_losses.dist_loss(s, t, temperature=temperature)

  per_position, dist = run(jnp.float32(temperature))
  assert np.all(np.isnan(np.asarray(per_position)[:, mask])) and np.isnan(dist), (per_position, dist)
  np.testing.assert_array_equal(np.asarray(per_position)[:, ~mask], 0.0)  # masked positions still count for nothing
  per_position, dist = run(jnp.float32(2.0))
  assert np.all(np.isfinite(per_position)) and np.isfinite(dist)
