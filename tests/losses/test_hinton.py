"""Tests for jaxkd.losses against a float64 NumPy reference written here."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import jaxkd

SHAPES = [(4, 10), (2, 3, 5), (7,)]
TEMPERATURES = [1.0, 2.0, 4.0, 20.0]


# ---------------------------------------------------------------- NumPy reference


def np_log_softmax(logits, temperature=1.0, where=None):
  z = np.asarray(logits, np.float64) / temperature
  if where is not None:
    z = np.where(where, z, -np.inf)
  z_max = np.max(z, axis=-1, keepdims=True)
  out = z - z_max - np.log(np.sum(np.exp(z - z_max), axis=-1, keepdims=True))
  return out


def np_kd(student_logits, teacher_logits, temperature, where=None):
  log_q = np_log_softmax(teacher_logits, temperature, where)
  log_p = np_log_softmax(student_logits, temperature, where)
  q = np.exp(log_q)
  with np.errstate(invalid="ignore"):
    terms = np.where(q > 0, q * (log_q - log_p), 0.0)
  return temperature**2 * terms.sum(-1)


def np_ce(logits, labels):
  log_p = np_log_softmax(logits)
  return -np.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]


def random_logits(shape, seed, scale=3.0):
  rng = np.random.default_rng(seed)
  return (scale * rng.standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------- values


class ReferenceTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(shape=SHAPES, temperature=TEMPERATURES)
  def test_tempered_softmax(self, shape, temperature):
    logits = random_logits(shape, 0)
    fn = self.variant(lambda z: jaxkd.tempered_softmax(z, temperature))
    np.testing.assert_allclose(fn(logits), np.exp(np_log_softmax(logits, temperature)), rtol=1e-5, atol=1e-7)
    log_fn = self.variant(lambda z: jaxkd.tempered_log_softmax(z, temperature))
    np.testing.assert_allclose(log_fn(logits), np_log_softmax(logits, temperature), rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(shape=SHAPES, temperature=TEMPERATURES)
  def test_kd_loss(self, shape, temperature):
    s, t = random_logits(shape, 1), random_logits(shape, 2)
    out = self.variant(lambda s, t: jaxkd.kd_loss(s, t, temperature))(s, t)
    chex.assert_shape(out, shape[:-1])
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, np_kd(s, t, temperature), rtol=1e-4, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(shape=SHAPES, temperature=TEMPERATURES, alpha=[0.0, 0.3, 0.9, 1.0])
  def test_distillation_loss(self, shape, temperature, alpha):
    s, t = random_logits(shape, 3), random_logits(shape, 4)
    labels = np.random.default_rng(5).integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
    out = self.variant(lambda s, t, y: jaxkd.distillation_loss(s, t, y, temperature, alpha))(s, t, labels)
    expected = alpha * np_kd(s, t, temperature) + (1 - alpha) * np_ce(s, labels)
    chex.assert_shape(out, shape[:-1])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(shape=SHAPES, temperature=TEMPERATURES)
  def test_soft_cross_entropy(self, shape, temperature):
    s, t = random_logits(shape, 6), random_logits(shape, 7)
    target_probs = np.exp(np_log_softmax(t, temperature))
    out = self.variant(lambda s, q: jaxkd.soft_cross_entropy(s, q, temperature))(s, target_probs.astype(np.float32))
    expected = -(target_probs * np_log_softmax(s, temperature)).sum(-1)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # It differs from KL / T² by the target entropy only.
    entropy = -(target_probs * np.log(target_probs)).sum(-1)
    np.testing.assert_allclose(out - entropy, np_kd(s, t, temperature) / temperature**2, rtol=1e-3, atol=1e-4)

  def test_hard_labels_equal_one_hot_targets(self):
    s = random_logits((6, 5), 8)
    labels = np.arange(6) % 5
    np.testing.assert_allclose(
      jaxkd.hard_cross_entropy(s, labels), jaxkd.soft_cross_entropy(s, jax.nn.one_hot(labels, 5)), rtol=1e-6
    )
    np.testing.assert_allclose(jaxkd.hard_cross_entropy(s, labels), np_ce(s, labels), rtol=1e-5)

  def test_vmap(self):
    s, t = random_logits((3, 4, 6), 9), random_logits((3, 4, 6), 10)
    labels = np.zeros((3, 4), np.int32)
    out = jax.vmap(lambda s, t, y: jaxkd.distillation_loss(s, t, y, 2.0, 0.7))(s, t, labels)
    np.testing.assert_allclose(out, jaxkd.distillation_loss(s, t, labels, 2.0, 0.7), rtol=1e-6)
    out = jax.vmap(jaxkd.tempered_softmax, in_axes=(0, None))(s, 3.0)
    np.testing.assert_allclose(out, np.exp(np_log_softmax(s, 3.0)), rtol=1e-5, atol=1e-7)
    out = jax.vmap(jaxkd.kd_loss, in_axes=(0, 0, None))(s, t, 4.0)
    np.testing.assert_allclose(out, np_kd(s, t, 4.0), rtol=1e-4, atol=1e-5)
    out = jax.vmap(jaxkd.soft_cross_entropy, in_axes=(0, 0, None))(s, jax.nn.softmax(t), 1.0)
    np.testing.assert_allclose(out, jaxkd.soft_cross_entropy(s, jax.nn.softmax(t)), rtol=1e-6)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_gradient_identity(temperature):
  """d kd_loss / d s = T (softmax(s/T) - softmax(t/T)) (Hinton et al. 2015, eq. 2 times T²)."""
  s, t = random_logits((5, 10), 11), random_logits((5, 10), 12)
  grad = jax.grad(lambda s: jaxkd.kd_loss(s, t, temperature).sum())(s)
  expected = temperature * (np.exp(np_log_softmax(s, temperature)) - np.exp(np_log_softmax(t, temperature)))
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_high_temperature_limit_is_logit_matching():
  """For zero-mean logits and large T the gradient tends to (s - t) / N (the paper's section 2.1)."""
  num_classes = 10
  s, t = random_logits((5, num_classes), 13, 1.0), random_logits((5, num_classes), 14, 1.0)
  s, t = s - s.mean(-1, keepdims=True), t - t.mean(-1, keepdims=True)
  matching = (s - t) / num_classes
  errors = []
  for temperature in [10.0, 100.0, 1000.0]:
    grad = jax.grad(lambda z, temperature=temperature: jaxkd.kd_loss(z, t, temperature).sum())(s)
    errors.append(np.max(np.abs(grad - matching)))
  assert errors[0] > errors[1] > errors[2], errors
  np.testing.assert_allclose(errors[1] / np.max(np.abs(matching)), 0.0, atol=0.05)


def test_check_grads():
  s, t = random_logits((3, 4), 15, 1.0), random_logits((3, 4), 16, 1.0)
  labels = np.array([0, 3, 1])
  check_grads(lambda s: jaxkd.kd_loss(s, t, 2.0), (s,), order=2, modes=["rev"], atol=1e-2, rtol=1e-2)
  check_grads(lambda s: jaxkd.distillation_loss(s, t, labels, 3.0, 0.5), (s,), order=1, atol=1e-2, rtol=1e-2)
  check_grads(lambda s: jaxkd.soft_cross_entropy(s, jax.nn.softmax(t), 2.0), (s,), order=1, atol=1e-2, rtol=1e-2)


def test_no_gradient_reaches_teacher():
  s, t = random_logits((3, 4), 17), random_logits((3, 4), 18)
  labels = np.array([0, 1, 2])
  for loss in [
    lambda t: jaxkd.kd_loss(s, t, 2.0).sum(),
    lambda t: jaxkd.distillation_loss(s, t, labels, 2.0, 0.5).sum(),
    lambda t: jaxkd.soft_cross_entropy(s, jax.nn.softmax(t)).sum(),
  ]:
    np.testing.assert_array_equal(jax.grad(loss)(t), np.zeros_like(t))


# ---------------------------------------------------------------- invariances


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_invariances(temperature):
  s, t = random_logits((8, 10), 19), random_logits((8, 10), 20)
  base = jaxkd.kd_loss(s, t, temperature)
  shift = np.random.default_rng(21).standard_normal((8, 1)).astype(np.float32) * 5
  np.testing.assert_allclose(jaxkd.kd_loss(s + shift, t - shift, temperature), base, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(jaxkd.kd_loss(t, t, temperature), np.zeros(8), atol=1e-6)
  assert np.all(np.asarray(base) >= 0)


# ---------------------------------------------------------------- numerics


def test_bfloat16_inputs_compute_in_float32():
  s, t = random_logits((16, 10), 22), random_logits((16, 10), 23)
  labels = np.arange(16) % 10
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  for fn in [
    lambda s, t: jaxkd.kd_loss(s, t, 4.0),
    lambda s, t: jaxkd.distillation_loss(s, t, labels, 4.0, 0.5),
    lambda s, t: jaxkd.tempered_softmax(s, 2.0),
  ]:
    out = fn(s16, t16)
    assert out.dtype == jnp.float32
    # The bf16 inputs are the f32 inputs rounded to 8 bits of mantissa; the loss of the rounded inputs in f32
    # must match exactly what the function computes, i.e. no bf16 arithmetic inside.
    exact = fn(np.asarray(s16, np.float32), np.asarray(t16, np.float32))
    np.testing.assert_allclose(out, exact, rtol=1e-6)
    np.testing.assert_allclose(out, fn(s, t), rtol=5e-2, atol=5e-2)


def test_huge_logits_are_finite():
  s, t = random_logits((4, 10), 24) * 1e4, random_logits((4, 10), 25) * 1e4
  labels = np.arange(4)
  for temperature in [1.0, 20.0]:
    value, grad = jax.value_and_grad(lambda s, temperature=temperature: jaxkd.kd_loss(s, t, temperature).sum())(s)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
  value, grad = jax.value_and_grad(lambda s: jaxkd.distillation_loss(s, t, labels, 2.0, 0.5).sum())(s)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_minus_inf_teacher_logits_are_finite():
  s = random_logits((3, 5), 26)
  t = random_logits((3, 5), 27)
  t[:, 1] = -np.inf
  t[0, 4] = -np.inf
  value, grad = jax.value_and_grad(lambda s: jaxkd.kd_loss(s, t, 2.0).sum())(s)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(value, np_kd(s, t, 2.0).sum(), rtol=1e-4)
  value, grad = jax.value_and_grad(lambda s: jaxkd.soft_cross_entropy(s, jaxkd.tempered_softmax(t, 2.0), 2.0).sum())(s)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_where_masks_classes_exactly_and_equals_slicing():
  s, t = random_logits((6, 8), 28), random_logits((6, 8), 29)
  keep = np.array([True, False, True, True, False, True, True, True])
  probs = jaxkd.tempered_softmax(s, 3.0, where=keep)
  np.testing.assert_array_equal(np.asarray(probs)[:, ~keep], 0.0)
  np.testing.assert_allclose(probs[:, keep], np.exp(np_log_softmax(s[:, keep], 3.0)), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jaxkd.kd_loss(s, t, 3.0, where=keep), np_kd(s[:, keep], t[:, keep], 3.0), rtol=1e-4)
  labels = np.array([0, 2, 3, 5, 6, 7])
  sliced_labels = np.searchsorted(np.flatnonzero(keep), labels)
  np.testing.assert_allclose(
    jaxkd.distillation_loss(s, t, labels, 3.0, 0.4, where=keep),
    jaxkd.distillation_loss(s[:, keep], t[:, keep], sliced_labels, 3.0, 0.4),
    rtol=1e-5,
  )
  grad = jax.grad(lambda s: jaxkd.kd_loss(s, t, 3.0, where=keep).sum())(s)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.asarray(grad)[:, ~keep], 0.0)


def test_traced_temperature_under_jit():
  s, t = random_logits((4, 6), 30), random_logits((4, 6), 31)

  @jax.jit
  def loss(s, t, temperature):
    return jaxkd.kd_loss(s, t, temperature)

  for temperature in [1.0, 3.0]:
    np.testing.assert_allclose(loss(s, t, jnp.float32(temperature)), np_kd(s, t, temperature), rtol=1e-4)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("temperature", [0.0, -1.0, -0.5, float("nan")])
def test_bad_temperature_raises(temperature):
  s = random_logits((2, 3), 32)
  for fn in [
    lambda: jaxkd.tempered_softmax(s, temperature),
    lambda: jaxkd.tempered_log_softmax(s, temperature),
    lambda: jaxkd.kd_loss(s, s, temperature),
    lambda: jaxkd.distillation_loss(s, s, np.array([0, 1]), temperature),
    lambda: jaxkd.soft_cross_entropy(s, jax.nn.softmax(s), temperature),
  ]:
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got "):
      fn()
  with pytest.raises(ValueError, match=str(temperature)):
    jaxkd.kd_loss(s, s, temperature)


def test_shape_mismatch_names_both_shapes():
  s, t = random_logits((4, 10), 33), random_logits((4, 9), 34)
  with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 9\)"):
    jaxkd.kd_loss(s, t, 2.0)
  with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 9\)"):
    jaxkd.distillation_loss(s, t, np.zeros(4, np.int32), 2.0)
  with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 9\)"):
    jaxkd.soft_cross_entropy(s, t)
  with pytest.raises(ValueError, match=r"\(4,\).*\(5,\)"):
    jaxkd.distillation_loss(s, s, np.zeros(5, np.int32), 2.0)
  with pytest.raises(TypeError, match="integer"):
    jaxkd.distillation_loss(s, s, np.zeros(4, np.float32), 2.0)
  with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
    jaxkd.distillation_loss(s, s, np.zeros(4, np.int32), 2.0, alpha=1.5)
  with pytest.raises(ValueError, match=r"where of shape \(3,\)"):
    jaxkd.kd_loss(s, s, 2.0, where=np.ones(3, bool))


# ---------------------------------------------------------------- non-finite teachers, unchecked values (issue 13)

# A teacher row with no distribution: NaN (a diverged teacher, a NaN row of a logit cache), +inf, all -inf.
BROKEN_TEACHER_ROWS = {
  "nan": [1.0, np.nan, 2.0, 0.5],
  "plus_inf": [1.0, np.inf, 2.0, 0.5],
  "all_minus_inf": [-np.inf] * 4,
}


def _broken_teacher(kind, seed=40):
  """[3, 4] logits whose row 1 has no distribution; the other rows are ordinary."""
  t = random_logits((3, 4), seed)
  t[1] = BROKEN_TEACHER_ROWS[kind]
  return t


class NonFiniteTeacherTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*BROKEN_TEACHER_ROWS)
  def test_broken_teacher_row_gives_nan_for_that_example(self, kind):
    """The 0 · log 0 handling once read a NaN teacher as probability 0: kd_loss was 0, with zero gradient."""
    s, t = random_logits((3, 4), 41), _broken_teacher(kind)
    clean_t = random_logits((3, 4), 40)
    labels = np.array([0, 3, 1])
    fns = {
      "kd": lambda s, t: jaxkd.kd_loss(s, t, 2.0),
      "soft_cross_entropy": lambda s, t: jaxkd.soft_cross_entropy(s, jaxkd.tempered_softmax(t, 2.0), 2.0),
      # alpha = 1 is where a silent 0 stopped the student; alpha = 0 still says that the teacher is broken.
      **{f"distillation_{a}": lambda s, t, a=a: jaxkd.distillation_loss(s, t, labels, 2.0, a) for a in [0.0, 0.5, 1.0]},
    }
    for name, fn in fns.items():
      out = np.asarray(self.variant(fn)(s, t))
      assert np.isnan(out[1]), (name, out)
      # The other examples keep their values bit for bit.
      np.testing.assert_array_equal(out[[0, 2]], np.asarray(self.variant(fn)(s, clean_t))[[0, 2]], err_msg=name)
      grad = jax.grad(lambda s, fn=fn: fn(s, t).sum())(s)
      assert np.all(np.isfinite(grad)), name

  def test_kd_loss_of_the_issue(self):
    np.testing.assert_array_equal(jaxkd.kd_loss([[2.0, 0.5, -1.0]], [[1.0, np.nan, 2.0]], 2.0), [np.nan])

  def test_legitimate_zero_probabilities_stay_finite(self):
    """-inf on some teacher classes, and anything (NaN included) on classes removed by where, are probability 0."""
    s, t = random_logits((3, 5), 42), random_logits((3, 5), 43)
    keep = np.array([True, True, False, True, True])
    t_masked_nan = t.copy()
    t_masked_nan[:, 2] = np.nan
    t_minus_inf = t.copy()
    t_minus_inf[:, 4] = -np.inf
    labels = np.array([0, 1, 3])
    for fn in [
      lambda s, t, **kw: jaxkd.kd_loss(s, t, 2.0, **kw),
      lambda s, t, **kw: jaxkd.distillation_loss(s, t, labels, 2.0, 0.6, **kw),
    ]:
      np.testing.assert_array_equal(fn(s, t_masked_nan, where=keep), fn(s, t, where=keep))
      value, grad = jax.value_and_grad(lambda s, fn=fn: fn(s, t_masked_nan, where=keep).sum())(s)
      assert np.isfinite(value) and np.all(np.isfinite(grad))
      value, grad = jax.value_and_grad(lambda s, fn=fn: fn(s, t_minus_inf).sum())(s)
      assert np.isfinite(value) and np.all(np.isfinite(grad))
    targets = np.array(jaxkd.tempered_softmax(t, 2.0, where=keep))
    targets[:, 2] = np.nan  # a masked target
    out = jaxkd.soft_cross_entropy(s, targets, 2.0, where=keep)
    np.testing.assert_array_equal(out, jaxkd.soft_cross_entropy(s, np.nan_to_num(targets), 2.0, where=keep))


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize("label", [-1, 5, -100])
def test_concrete_label_out_of_range_raises(label):
  """-1 was scored as the last class."""
  s, t = random_logits((3, 5), 44), random_logits((3, 5), 45)
  labels = np.array([0, label, 2])
  for fn in [
    lambda: jaxkd.hard_cross_entropy(s, labels),
    lambda: jaxkd.distillation_loss(s, t, labels, 2.0, 0.5),
    lambda: jaxkd.hard_cross_entropy(s, jnp.asarray(labels)),  # a concrete JAX array is a value too
    lambda: jax.jit(lambda s: jaxkd.hard_cross_entropy(s, labels))(s),  # a NumPy constant under jit
  ]:
    with pytest.raises(ValueError, match=rf"labels must be in \[0, num_classes=5\), got values in \[{min(label, 0)}, "):
      fn()


@pytest.mark.parametrize("label", [-1, 5, -100, np.iinfo(np.int32).max])
def test_traced_label_out_of_range_gives_nan_for_that_example(label):
  s, t = random_logits((3, 5), 46), random_logits((3, 5), 47)
  good, bad = np.array([0, 4, 2], np.int32), np.array([0, label, 2], np.int32)

  @jax.jit
  def run(s, labels):
    hard = jaxkd.hard_cross_entropy(s, labels)
    combined = jaxkd.distillation_loss(s, t, labels, 2.0, 0.5)
    return hard, combined, jax.grad(lambda s: jaxkd.distillation_loss(s, t, labels, 2.0, 0.5).sum())(s)

  for out, clean in zip(run(s, bad)[:2], run(s, good)[:2], strict=True):
    assert np.isnan(out[1])
    np.testing.assert_array_equal(np.asarray(out)[[0, 2]], np.asarray(clean)[[0, 2]])
  assert np.all(np.isfinite(run(s, bad)[2]))


# ---------------------------------------------------------------- alpha and temperature


@pytest.mark.parametrize("alpha", [np.array(1.5), jnp.asarray(-0.1), np.float32(2.0), np.array([0.5, 1.5]), np.nan])
def test_alpha_of_any_type_is_checked(alpha):
  """np.array(1.5) once passed and gave the label term the weight -0.5."""
  s = random_logits((2, 3), 48)
  with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got "):
    jaxkd.distillation_loss(s, s, np.array([0, 1]), 2.0, np.asarray(alpha) if np.ndim(alpha) else alpha)


def test_alpha_arrays_in_range_and_traced_alpha_are_accepted():
  s, t = random_logits((2, 3), 49), random_logits((2, 3), 50)
  labels = np.array([0, 1])
  expected = jaxkd.distillation_loss(s, t, labels, 2.0, 0.3)
  np.testing.assert_array_equal(jaxkd.distillation_loss(s, t, labels, 2.0, np.float32(0.3)), expected)
  np.testing.assert_array_equal(jaxkd.distillation_loss(s, t, labels, 2.0, jnp.asarray(0.3)), expected)
  traced = jax.jit(lambda a: jaxkd.distillation_loss(s, t, labels, 2.0, a))(jnp.float32(0.3))
  np.testing.assert_allclose(traced, expected, rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -2.0, np.nan, np.inf])
def test_traced_bad_temperature_gives_nan(temperature):
  """Concrete temperatures raise; a traced T = 0 gave a loss of 0 (and T < 0 a finite loss of flipped targets)."""
  s, t = random_logits((3, 4), 51), random_logits((3, 4), 52)
  labels = np.array([0, 1, 2])

  @jax.jit
  def run(temperature):
    return [
      jaxkd.tempered_log_softmax(s, temperature),
      jaxkd.tempered_softmax(s, temperature),
      jaxkd.kd_loss(s, t, temperature),
      jaxkd.soft_cross_entropy(s, jax.nn.softmax(t), temperature),
      jaxkd.distillation_loss(s, t, labels, temperature, 0.5),
    ]

  for out in run(jnp.float32(temperature)):
    assert np.all(np.isnan(out)), out
  for out in run(jnp.float32(2.0)):
    assert np.all(np.isfinite(out))
