"""Tests for jaxkd.losses against float64 NumPy references written from the papers' formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

from jaxkd.losses import _features as features

# ---------------------------------------------------------------- NumPy references


def np_fitnet(student_regressed, teacher):
  diff = np.asarray(student_regressed, np.float64) - teacher
  return (diff**2).reshape(len(diff), -1).mean(-1)


def np_attention_map(x, p=2.0):
  x = np.asarray(x, np.float64)
  q = (np.abs(x) ** p).sum(-1).reshape(len(x), -1)  # the paper's sum over channels
  return q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)


def np_attention_transfer(s, t, p=2.0):
  return ((np_attention_map(s, p) - np_attention_map(t, p)) ** 2).mean(-1)


def np_nst(s, t, degree=2, constant=0.0):
  def channels(x):
    x = np.asarray(x, np.float64).reshape(len(x), -1, x.shape[-1]).transpose(0, 2, 1)  # [batch, channels, positions]
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  fs, ft = channels(s), channels(t)
  out = []
  for a, b in zip(fs, ft, strict=True):
    c_s, c_t = len(a), len(b)
    k = lambda u, v: (u @ v + constant) ** degree  # noqa: E731
    mmd = sum(k(b[i], b[j]) for i in range(c_t) for j in range(c_t)) / c_t**2
    mmd += sum(k(a[i], a[j]) for i in range(c_s) for j in range(c_s)) / c_s**2
    mmd -= 2 * sum(k(a[j], b[i]) for i in range(c_t) for j in range(c_s)) / (c_s * c_t)
    out.append(mmd)
  return np.array(out)


def np_fsp_matrix(a, b):
  a = np.asarray(a, np.float64).reshape(len(a), -1, a.shape[-1])
  b = np.asarray(b, np.float64).reshape(len(b), -1, b.shape[-1])
  hw = a.shape[1]
  return np.stack([sum(np.outer(a[n, s], b[n, s]) for s in range(hw)) / hw for n in range(len(a))])


def np_vid(mean, variance, teacher):
  nll = 0.5 * (np.log(variance) + (np.asarray(teacher, np.float64) - mean) ** 2 / variance)
  return nll.reshape(len(nll), -1).mean(-1)


def random_features(shape, seed, scale=1.0, relu=False):
  x = scale * np.random.default_rng(seed).standard_normal(shape)
  return np.maximum(x, 0.0).astype(np.float32) if relu else x.astype(np.float32)


# ---------------------------------------------------------------- values


class ReferenceTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((3, 4, 4, 5),), ((2, 6),), ((2, 3, 7),))
  def test_fitnet(self, shape):
    s, t = random_features(shape, 0), random_features(shape, 1)
    out = self.variant(features.fitnet_loss)(s, t)
    chex.assert_shape(out, shape[:1])
    np.testing.assert_allclose(out, np_fitnet(s, t), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((2.0,), (1.0,), (4.0,))
  def test_attention_transfer(self, p):
    s, t = random_features((3, 4, 5, 6), 2, relu=True), random_features((3, 4, 5, 9), 3, relu=True)
    fn = self.variant(lambda s, t: features.attention_transfer_loss(s, t, p=p))
    np.testing.assert_allclose(fn(s, t), np_attention_transfer(s, t, p), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(features.attention_map(s, p=p), np_attention_map(s, p), rtol=1e-5, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((2, 0.0), (1, 0.0), (3, 1.0))
  def test_nst(self, degree, constant):
    s, t = random_features((2, 3, 3, 4), 4, relu=True), random_features((2, 3, 3, 6), 5, relu=True)
    fn = self.variant(lambda s, t: features.nst_loss(s, t, degree=degree, constant=constant))
    np.testing.assert_allclose(fn(s, t), np_nst(s, t, degree, constant), rtol=1e-4, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fsp(self):
    s1, s2 = random_features((2, 4, 4, 3), 6), random_features((2, 4, 4, 5), 7)
    t1, t2 = random_features((2, 8, 8, 3), 8), random_features((2, 8, 8, 5), 9)
    np.testing.assert_allclose(self.variant(features.fsp_matrix)(s1, s2), np_fsp_matrix(s1, s2), rtol=1e-5, atol=1e-6)
    expected = ((np_fsp_matrix(s1, s2) - np_fsp_matrix(t1, t2)) ** 2).mean((1, 2))
    np.testing.assert_allclose(self.variant(features.fsp_loss)(s1, s2, t1, t2), expected, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_vid(self):
    mean, t = random_features((3, 4, 4, 5), 10), random_features((3, 4, 4, 5), 11)
    variance = np.random.default_rng(12).uniform(0.1, 3.0, 5).astype(np.float32)
    out = self.variant(features.vid_loss)(mean, variance, t)
    chex.assert_shape(out, (3,))
    np.testing.assert_allclose(out, np_vid(mean, variance, t), rtol=1e-5)


# ---------------------------------------------------------------- properties from the papers


def test_attention_transfer_invariances():
  """Normalised attention ignores the features' scale and channel count; a different map is penalised."""
  s = random_features((2, 4, 4, 3), 13, relu=True)
  np.testing.assert_allclose(
    features.attention_transfer_loss(s, 7.0 * np.concatenate([s, s], -1)), np.zeros(2), atol=1e-7
  )
  q = np.asarray(features.attention_map(s))
  np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, rtol=1e-6)
  assert np.all(np.asarray(features.attention_transfer_loss(s, s[:, ::-1])) > 0)


def test_nst_linear_kernel_is_distance_of_mean_channels():
  """With k(x, y) = x^T y the MMD is the squared distance between the mean normalised channels."""
  s, t = random_features((2, 3, 3, 4), 14), random_features((2, 3, 3, 6), 15)

  def mean_channel(x):
    x = x.reshape(len(x), -1, x.shape[-1]).transpose(0, 2, 1).astype(np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).mean(1)

  expected = ((mean_channel(s) - mean_channel(t)) ** 2).sum(-1)
  np.testing.assert_allclose(features.nst_loss(s, t, degree=1), expected, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(features.nst_loss(t, 3.0 * t), np.zeros(2), atol=1e-6)


def test_hint_regressor_dense_is_a_1x1_conv():
  x = random_features((2, 5, 5, 3), 16)
  dense = features.HintRegressor(features=7)
  conv = features.HintRegressor(features=7, kernel_size=(1, 1))
  conv3 = features.HintRegressor(features=7, kernel_size=(3, 3))

  @jax.jit
  def run(x):
    variables = dense.init(jax.random.key(0), x)
    layer = variables["params"]["Dense_0"]
    conv_params = {"params": {"Conv_0": {"kernel": layer["kernel"][None, None], "bias": layer["bias"]}}}
    return dense.apply(variables, x), conv.apply(conv_params, x), conv3.apply(conv3.init(jax.random.key(1), x), x)

  out, conv_out, conv3_out = run(x)
  assert out.shape == conv3_out.shape == (2, 5, 5, 7)
  np.testing.assert_allclose(conv_out, out, rtol=1e-5, atol=1e-6)


def test_vid_regressor_and_the_optimal_variance():
  x, t = random_features((4, 3, 3, 6), 17), random_features((4, 3, 3, 5), 18)
  head = features.VIDRegressor(features=5, init_variance=5.0)
  variables = jax.jit(head.init)(jax.random.key(0), x)
  assert len(variables["params"]) == 4  # three 1x1 conv (dense) layers and the variance parameter

  def loss(params):
    mean, variance = head.apply({"params": params}, x)
    return features.vid_loss(mean, variance, t).mean(), (mean, variance)

  @jax.jit
  def run(params):
    grads, (mean, variance) = jax.grad(loss, has_aux=True)(params)
    # The loss is minimised over each channel's variance by that channel's mean squared error.
    optimal = jnp.mean((t - mean) ** 2, axis=(0, 1, 2))
    grad_at_optimum = jax.grad(lambda v: features.vid_loss(mean, v, t).sum())(optimal)
    return grads, mean, variance, grad_at_optimum

  grads, mean, variance, grad_at_optimum = run(variables["params"])
  assert mean.shape == (4, 3, 3, 5) and variance.shape == (5,)
  np.testing.assert_allclose(variance, np.full(5, 5.0), rtol=1e-5)
  np.testing.assert_allclose(grad_at_optimum, 0.0, atol=1e-5)
  assert np.abs(grads["variance_logit"]).sum() > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_vmap_per_example_losses():
  s, t = random_features((3, 2, 4, 4, 5), 19), random_features((3, 2, 4, 4, 6), 20)

  def all_losses(s, t):
    return jnp.stack(
      [features.attention_transfer_loss(s, t), features.nst_loss(s, t), features.fitnet_loss(s, t[..., :5])]
    )

  vmapped, looped = jax.jit(
    lambda s, t: (jax.vmap(all_losses)(s, t), [all_losses(a, b) for a, b in zip(s, t, strict=True)])
  )(s, t)
  np.testing.assert_allclose(vmapped, np.stack(looped), rtol=1e-5)


# ---------------------------------------------------------------- gradients


def test_check_grads():
  """One check over all losses, outputs concatenated, each probed by check_grads' random cotangent."""
  s, t = random_features((2, 3, 3, 4), 21), random_features((2, 3, 3, 5), 22)
  s_hint, t_hint = random_features((2, 3, 3, 5), 23), random_features((2, 3, 3, 5), 24)
  variance = np.array([0.5, 1.0, 2.0, 1.5, 0.7], np.float32)

  @jax.jit
  def all_losses(s, s_hint, variance):
    return jnp.concatenate(
      [
        features.fitnet_loss(s_hint, t_hint),
        features.attention_transfer_loss(s, t),
        features.nst_loss(s, t),
        features.fsp_loss(s, s_hint, t[..., :4], t),
        features.vid_loss(s_hint, variance, t_hint),
      ]
    )

  check_grads(all_losses, (s, s_hint, variance), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def _all_losses(s, t):
  """Every loss with s in the student's place and t in the teacher's: [num_losses, batch]."""
  return jnp.stack(
    [
      features.fitnet_loss(s, t),
      features.attention_transfer_loss(s, t),
      features.nst_loss(s, t),
      features.fsp_loss(s, s, t, t),
      features.vid_loss(s, jnp.full(s.shape[-1], 1e-5), t),
    ]
  )


def test_no_gradient_reaches_teacher():
  s, t = random_features((2, 3, 3, 4), 25), random_features((2, 3, 3, 4), 26)
  np.testing.assert_array_equal(jax.jit(jax.jacrev(lambda t: _all_losses(s, t)))(t), 0.0)


# ---------------------------------------------------------------- extreme values


def test_dead_and_huge_activations_are_finite():
  """All-zero maps (dead ReLUs) hit the 0/0 of the normalisations; large activations must not overflow."""
  t = random_features((2, 3, 3, 4), 27, relu=True)
  dead = np.zeros((2, 3, 3, 4), np.float32)
  dead_channel = random_features((2, 3, 3, 4), 28, relu=True)
  dead_channel[..., 1] = 0.0
  huge = random_features((2, 3, 3, 4), 29, scale=1e4)
  values_and_grads = jax.jit(lambda s: (_all_losses(s, t), jax.jacrev(_all_losses)(s, t)))
  for s in [dead, dead_channel, huge]:
    values, grads = values_and_grads(s)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))


def test_bfloat16_inputs_compute_in_float32():
  s, t = random_features((2, 4, 4, 3), 30), random_features((2, 4, 4, 3), 31)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  fn = jax.jit(_all_losses)
  out = fn(s16, t16)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, fn(np.asarray(s16, np.float32), np.asarray(t16, np.float32)), rtol=1e-6)


# ---------------------------------------------------------------- errors


def test_errors_name_the_shapes():
  a, b = np.zeros((2, 4, 4, 3), np.float32), np.zeros((2, 4, 4, 5), np.float32)
  with pytest.raises(ValueError, match=r"student_regressed \(2, 4, 4, 3\) and teacher_features \(2, 4, 4, 5\)"):
    features.fitnet_loss(a, b)
  with pytest.raises(ValueError, match=r"at least 2 axes .* got shape \(3,\)"):
    features.fitnet_loss(np.zeros(3), np.zeros(3))
  with pytest.raises(
    ValueError, match=r"all but the channel axis, got student \(2, 4, 4, 3\) and teacher \(2, 8, 8, 5\)"
  ):
    features.attention_transfer_loss(a, np.zeros((2, 8, 8, 5)))
  with pytest.raises(
    ValueError, match=r"all but the channel axis, got student \(2, 4, 4, 3\) and teacher \(3, 4, 4, 5\)"
  ):
    features.nst_loss(a, np.zeros((3, 4, 4, 5)))
  with pytest.raises(ValueError, match=r"at least 3 axes .* got shape \(2, 3\)"):
    features.attention_map(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="p must be > 0"):
    features.attention_map(a, p=0.0)
  with pytest.raises(ValueError, match="degree must be an integer >= 1, got 0"):
    features.nst_loss(a, b, degree=0)
  with pytest.raises(ValueError, match=r"\(2, 4, 4, 3\) and \(2, 2, 2, 5\)"):
    features.fsp_matrix(a, np.zeros((2, 2, 2, 5)))
  with pytest.raises(ValueError, match=r"FSP matrices must have the same shape, got student \(2, 3, 5\).*\(2, 5, 5\)"):
    features.fsp_loss(a, b, b, b)
  with pytest.raises(ValueError, match=r"variance of shape \(4,\) does not broadcast against mean of shape"):
    features.vid_loss(a, np.ones(4), a)
  with pytest.raises(ValueError, match=r"need init_variance > eps > 0"):
    features.VIDRegressor(features=3, init_variance=0.0).init(jax.random.key(0), a)


# ---------------------------------------------------------------- a broken teacher example stays non-finite


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_feature_losses_keep_a_broken_teacher_example_non_finite(bad):
  rng = np.random.default_rng(53)
  s, t = rng.normal(size=(3, 4, 4, 2)).astype(np.float32), rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
  broken = t.copy()
  broken[1, 2, 3, 0] = bad

  @jax.jit
  def all_losses(s, t):  # [losses, batch]
    return jnp.stack(
      [
        features.fitnet_loss(s, t),
        features.attention_transfer_loss(s, t),
        features.nst_loss(s, t),
        features.fsp_loss(s, s, t, t),
        features.vid_loss(s, jnp.ones(2), t),
      ]
    )

  out, clean = np.asarray(all_losses(s, broken)), np.asarray(all_losses(s, t))
  assert not np.any(np.isfinite(out[:, 1])), out
  np.testing.assert_array_equal(out[:, [0, 2]], clean[:, [0, 2]])
