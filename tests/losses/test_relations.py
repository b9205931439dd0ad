"""Tests for jaxkd.losses against float64 NumPy references written from the papers' formulas.

The global-batch tests use the 4 fake CPU devices of tests/conftest.py.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

from jaxkd.losses import _relations as relations

# ---------------------------------------------------------------- NumPy references


def flat(x):
  x = np.asarray(x, np.float64)
  return x.reshape(len(x), -1)


def np_huber(x):
  return np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5)


def np_sp(s, t):
  def gram(x):
    g = flat(x) @ flat(x).T
    return g / np.linalg.norm(g, axis=1, keepdims=True)

  return ((gram(t) - gram(s)) ** 2).sum() / len(s) ** 2


def np_rkd_distance(s, t):
  b = len(s)
  off_diagonal = ~np.eye(b, dtype=bool)

  def distances(x):
    x = flat(x)
    d = np.sqrt(((x[:, None] - x[None, :]) ** 2).sum(-1))
    return d / d[off_diagonal].mean()

  return np_huber(distances(s) - distances(t))[off_diagonal].mean()


def np_rkd_angle(s, t):
  def angles(x):
    x = flat(x)
    b = len(x)
    out = np.zeros((b, b, b))
    for i in range(b):
      for j in range(b):
        for k in range(b):
          if j != i and k != i:
            u, v = x[j] - x[i], x[k] - x[i]
            out[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    return out

  b = len(s)
  valid = np.array([[[j != i and k != i for k in range(b)] for j in range(b)] for i in range(b)])
  return np_huber(angles(s) - angles(t))[valid].mean()


def np_pkt(s, t, eps=1e-7):
  def conditionals(x):
    x = flat(x)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
    k = 0.5 * (x @ x.T + 1)
    np.fill_diagonal(k, 0.0)
    return k / k.sum(1, keepdims=True)

  p_t, p_s = conditionals(t), conditionals(s)
  off_diagonal = ~np.eye(len(s), dtype=bool)
  ratio = np.where(off_diagonal, p_t, 1.0) / np.where(off_diagonal, p_s, 1.0)
  return np.where(off_diagonal, p_t * np.log(ratio), 0.0).sum(1).mean()


def np_cc(s, t, gamma=0.4, order=2):
  def correlation(x):
    x = flat(x)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    if order is None:
      sq = ((x[:, None] - x[None, :]) ** 2).sum(-1)
      return np.exp(-gamma * sq)
    sim = x @ x.T
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim**p for p in range(order + 1))

  return ((correlation(t) - correlation(s)) ** 2).sum() / len(s) ** 2


def random_features(shape, seed, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


RELATION_LOSSES = {
  "sp": (relations.similarity_preserving_loss, np_sp),
  "rkd_distance": (relations.rkd_distance_loss, np_rkd_distance),
  "rkd_angle": (relations.rkd_angle_loss, np_rkd_angle),
  "pkt": (relations.pkt_loss, np_pkt),
  "cc": (relations.cc_loss, np_cc),
  "cc_exact": (lambda s, t, **kw: relations.cc_loss(s, t, taylor_order=None, gamma=0.6, **kw), None),
}


# ---------------------------------------------------------------- values


class ReferenceTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*[(name,) for name in RELATION_LOSSES if name != "cc_exact"])
  def test_relation_loss(self, name):
    fn, reference = RELATION_LOSSES[name]
    s, t = random_features((6, 5), 0), random_features((6, 2, 4), 1, scale=3.0)
    out = self.variant(fn)(s, t)
    chex.assert_shape(out, ())
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference(s, t), rtol=1e-4, atol=1e-6)


def test_cc_exact_kernel_and_taylor_convergence():
  s, t = random_features((6, 5), 4), random_features((6, 3), 5)
  orders = [None, 1, 3, 8]
  values = jax.jit(lambda s, t: [relations.cc_loss(s, t, gamma=0.6, taylor_order=p) for p in orders])(s, t)
  exact = values[0]
  np.testing.assert_allclose(exact, np_cc(s, t, 0.6, None), rtol=1e-4)
  errors = [abs(value - exact) for value in values[1:]]
  assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5 * exact, errors


# ---------------------------------------------------------------- invariances from the papers


def test_invariances():
  s = random_features((6, 5), 6)
  all_losses = jax.jit(lambda s, t: jnp.stack([fn(s, t) for fn, _ in RELATION_LOSSES.values()]))
  # Every relation here ignores the features' scale.
  np.testing.assert_allclose(all_losses(s, 5.0 * s), 0.0, atol=1e-6)
  # RKD's distances and angles also ignore rotation and translation.
  rotation = np.linalg.qr(np.random.default_rng(7).standard_normal((5, 5)))[0].astype(np.float32)
  rkd = [list(RELATION_LOSSES).index("rkd_distance"), list(RELATION_LOSSES).index("rkd_angle")]
  np.testing.assert_allclose(np.asarray(all_losses(s, 3.0 * s @ rotation + 2.0))[rkd], 0.0, atol=1e-6)
  assert np.all(all_losses(s, random_features((6, 5), 8)) > 1e-4)


# ---------------------------------------------------------------- masks, global batch


def _all_relations(s, t, where, axis_name):
  return jnp.stack([fn(s, t, where=where, axis_name=axis_name) for fn, _ in RELATION_LOSSES.values()])


def test_where_equals_slicing_and_masked_rows_get_no_gradient():
  s, t = random_features((7, 5), 9), random_features((7, 3), 10)
  keep = np.array([True, False, True, True, True, False, True])
  s_pad, t_pad = s.copy(), t.copy()
  s_pad[~keep], t_pad[1] = np.nan, np.inf

  @jax.jit
  def run(s_pad, t_pad, s, t):
    masked = lambda s: _all_relations(s, t_pad, keep, None)  # noqa: E731
    return masked(s_pad), jax.jacrev(masked)(s_pad), _all_relations(s[keep], t[keep], None, None)

  masked, grads, sliced = run(s_pad, t_pad, s, t)
  np.testing.assert_allclose(masked, sliced, rtol=1e-5, atol=1e-7)
  assert np.all(np.isfinite(grads))
  np.testing.assert_array_equal(np.asarray(grads)[:, ~keep], 0.0)


def test_axis_name_gives_the_global_batch_under_vmap_and_its_gradient_after_pmean():
  devices, per_device = 4, 3
  s, t = random_features((devices, per_device, 5), 11), random_features((devices, per_device, 3), 12)
  keep = np.ones((devices, per_device), bool)
  keep[2, 1] = False
  w = random_features((5, 5), 13)  # shared student weights

  def values_and_grad(w, s, t, m, axis_name):
    def total(w):
      values = _all_relations(s @ w, t, m, axis_name)
      return values.sum(), values

    (_, values), grad = jax.value_and_grad(total, has_aux=True)(w)
    return values, grad

  per_device_values, per_device_grads = jax.jit(
    jax.vmap(functools.partial(values_and_grad, axis_name="batch"), in_axes=(None, 0, 0, 0), axis_name="batch")
  )(w, s, t, keep)
  whole_values, whole_grad = jax.jit(functools.partial(values_and_grad, axis_name=None))(
    w, s.reshape(-1, 5), t.reshape(-1, 3), keep.reshape(-1)
  )
  # Every device holds different examples yet computes the loss of the whole batch.
  np.testing.assert_allclose(per_device_values, np.broadcast_to(whole_values, (devices, len(whole_values))), rtol=1e-5)
  # Each device's gradient is num_devices x its examples' share; their mean (pmean) is the global gradient.
  np.testing.assert_allclose(per_device_grads.mean(0), whole_grad, rtol=1e-4, atol=1e-6)


def test_axis_name_under_pmap_on_four_devices():
  devices = jax.local_device_count()
  assert devices == 4, "tests/conftest.py configures 4 fake CPU devices"
  s, t = random_features((devices, 2, 5), 14), random_features((devices, 2, 3), 15)

  def some_relations(s, t, axis_name=None):
    return jnp.stack(
      [
        relations.similarity_preserving_loss(s, t, axis_name=axis_name),
        relations.pkt_loss(s, t, axis_name=axis_name),
      ]
    )

  out = jax.pmap(functools.partial(some_relations, axis_name="batch"), axis_name="batch")(s, t)
  np.testing.assert_allclose(
    out, np.broadcast_to(some_relations(s.reshape(-1, 5), t.reshape(-1, 3)), out.shape), rtol=1e-5
  )


# ---------------------------------------------------------------- gradients and extreme values


def test_check_grads():
  """One check over all relation losses stacked, each probed by check_grads' random cotangent."""
  s, t = random_features((5, 4), 16), random_features((5, 3), 17)
  check_grads(jax.jit(lambda s: _all_relations(s, t, None, None)), (s,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_degenerate_and_huge_features_are_finite():
  """Duplicate rows (zero distances, zero angles), zero rows (0/0 in normalisations) and large scales."""
  t = random_features((6, 3), 18)
  duplicates = random_features((6, 4), 19)
  duplicates[1] = duplicates[0]
  zeros = random_features((6, 4), 20)
  zeros[2] = 0.0
  huge = random_features((6, 4), 21, scale=1e4)
  values_and_grads = jax.jit(lambda s: (_all_relations(s, t, None, None), jax.jacrev(_all_relations)(s, t, None, None)))
  for s in [duplicates, zeros, huge, np.zeros((6, 4), np.float32)]:
    values, grads = values_and_grads(s)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
  teacher_grads = jax.jit(jax.jacrev(lambda t: _all_relations(duplicates, t, None, None)))(t)
  np.testing.assert_array_equal(teacher_grads, 0.0)  # no gradient reaches the teacher


# ---------------------------------------------------------------- errors


def test_errors_name_the_shapes():
  s = np.zeros((4, 5), np.float32)
  for fn, _ in RELATION_LOSSES.values():
    with pytest.raises(ValueError, match=r"same batch size, got student \(4, 5\) and teacher \(3, 5\)"):
      fn(s, np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"same batch size, got student \(4,\)"):
      fn(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match=r"where must have shape \[batch\] = \(4,\), got \(4, 1\)"):
      fn(s, s, where=np.ones((4, 1), bool))
    with pytest.raises(TypeError, match="where must be a boolean example mask"):
      fn(s, s, where=np.ones(4))
    with pytest.raises(ValueError, match="at least 2 examples in the batch, got 1"):
      fn(s[:1], s[:1])
  with pytest.raises(ValueError, match="taylor_order must be an integer >= 0 or None, got -1"):
    relations.cc_loss(s, s, taylor_order=-1)


# ---------------------------------------------------------------- a broken example stays non-finite


@functools.cache
def _all_relation_losses():
  """Every relation loss, stacked, compiled once for all parametrisations."""
  fns = [
    relations.similarity_preserving_loss,
    relations.rkd_distance_loss,
    relations.rkd_angle_loss,
    relations.rkd_loss,
    relations.pkt_loss,
    relations.cc_loss,
  ]
  return jax.jit(lambda s, t, **kw: jnp.stack([fn(s, t, **kw) for fn in fns]))


@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_relation_losses_keep_a_broken_example_non_finite_unless_masked(side, bad):
  """RKD's distances and PKT's probabilities once read a NaN example as distance 0 and probability 0."""
  rng = np.random.default_rng(54)
  s, t = rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
  broken = (s if side == "student" else t).copy()
  broken[2, 1] = bad
  s_bad, t_bad = (broken, t) if side == "student" else (s, broken)
  keep = np.arange(5) != 2
  all_losses = _all_relation_losses()
  assert not np.any(np.isfinite(all_losses(s_bad, t_bad))), all_losses(s_bad, t_bad)
  # Masked, the example is left out as if sliced away.
  np.testing.assert_allclose(all_losses(s_bad, t_bad, where=keep), all_losses(s[keep], t[keep]), rtol=1e-5)
