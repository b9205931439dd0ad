"""Tests for jaxkd.losses against float64 NumPy references written here.

The references compute the two top-k losses from the teacher's *full* logits: the renormalised KL over the k
classes, and the KL of the (k + 1)-bucket distributions whose tail is the sum of the probabilities outside the k.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxkd import losses
from jaxkd.losses import _sparse as sparse_losses
from jaxkd.losses._sparse import sparse_kd_loss, teacher_topk, topk_bytes_per_token

TAILS = ("renormalize", "bucket")

# ---------------------------------------------------------------- NumPy references


def np_log_softmax(logits, temperature=1.0):
  z = np.asarray(logits, np.float64) / temperature
  z_max = np.max(z, axis=-1, keepdims=True)
  return z - z_max - np.log(np.sum(np.exp(z - z_max), axis=-1, keepdims=True))


def np_kl(p, q):
  """sum p log(p / q) over the last axis with 0 log 0 = 0."""
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)


def np_renormalized(student, teacher, indices, temperature):
  """T² KL of the softmaxes over the k classes ``indices`` of both full logits."""
  gather = lambda z: np.take_along_axis(np.asarray(z, np.float64), indices, axis=-1)  # noqa: E731
  p = np.exp(np_log_softmax(gather(teacher), temperature))
  q = np.exp(np_log_softmax(gather(student), temperature))
  return temperature**2 * np_kl(p, q)


def np_bucket(student, teacher, indices, temperature):
  """T² KL of the (k + 1)-class distributions: the k classes, then the summed mass of all the others."""

  def buckets(logits):
    probs = np.exp(np_log_softmax(logits, temperature))
    inside = np.zeros(probs.shape, bool)
    np.put_along_axis(inside, indices, True, axis=-1)
    tail = np.where(inside, 0.0, probs).sum(-1, keepdims=True)
    return np.concatenate([np.take_along_axis(probs, indices, axis=-1), tail], axis=-1)

  return temperature**2 * np_kl(buckets(teacher), buckets(student))


def np_dense(student, teacher, temperature):
  return temperature**2 * np_kl(
    np.exp(np_log_softmax(teacher, temperature)), np.exp(np_log_softmax(student, temperature))
  )


def np_logsumexp(logits, temperature=1.0):
  z = np.asarray(logits, np.float64) / temperature
  z_max = z.max(-1)
  return z_max + np.log(np.exp(z - z_max[..., None]).sum(-1))


# ---------------------------------------------------------------- data

# One set of shapes for most tests: the loss's compiled core is reused across them instead of compiled per test.
SHAPE, VOCAB, K = (2, 3), 8, 3


def random_logits(shape, seed, scale=2.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def random_indices(shape, vocab_size, k, seed):
  """Distinct indices per row, in random order (not the teacher's top k: the losses must not rely on it)."""
  order = np.argsort(np.random.default_rng(seed).random((*shape, vocab_size)), axis=-1)
  return order[..., :k].astype(np.int32)


def sparse_teacher(teacher, indices, temperature):
  """The cache's three arrays for arbitrary ``indices`` of full teacher logits."""
  topk_logits = np.take_along_axis(teacher, indices, axis=-1)
  return topk_logits, indices, np_logsumexp(teacher, temperature).astype(np.float32)


def standard_case(seed, k=K, temperature=1.0, scale=2.0):
  """Student and teacher logits ``[2, 3, 8]`` and a cache of ``k`` random indices of the teacher."""
  student = random_logits((*SHAPE, VOCAB), seed, scale)
  teacher = random_logits((*SHAPE, VOCAB), seed + 1000, scale)
  return student, teacher, sparse_teacher(teacher, random_indices(SHAPE, VOCAB, k, seed + 2000), temperature)


# ---------------------------------------------------------------- teacher_topk


def test_teacher_topk_matches_numpy():
  teacher = random_logits((*SHAPE, VOCAB), 0)
  rounded = np.asarray(jnp.asarray(teacher, jnp.bfloat16).astype(jnp.float32))
  for k in (1, K, VOCAB):
    for temperature in (1.0, 2.0):
      cache = teacher_topk(teacher.astype(jnp.bfloat16), k=k, temperature=temperature)
      assert cache["topk_logits"].dtype == jnp.float32 and cache["log_normalizer"].dtype == jnp.float32
      assert cache["topk_indices"].dtype == jnp.int32
      assert cache["topk_logits"].shape == cache["topk_indices"].shape == (*SHAPE, k)
      np.testing.assert_array_equal(cache["topk_logits"], -np.sort(-rounded, axis=-1)[..., :k])
      gathered = np.take_along_axis(rounded, np.asarray(cache["topk_indices"]), -1)
      np.testing.assert_array_equal(gathered, cache["topk_logits"])
      # The normaliser runs over the full vocabulary, whatever k.
      np.testing.assert_allclose(cache["log_normalizer"], np_logsumexp(rounded, temperature), rtol=1e-6)


def test_teacher_topk_then_bucket_matches_reference():
  """The cache as teacher_topk writes it, at T = 2, fed to the bucket loss."""
  student, teacher, _ = standard_case(1)
  cache = teacher_topk(teacher, k=K, temperature=2.0)
  expected = np_bucket(student, teacher, np.asarray(cache["topk_indices"]), 2.0)
  got = sparse_kd_loss(student, **cache, temperature=2.0, tail="bucket")
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- references and exactness


def test_matches_numpy_references():
  for k in (1, K, VOCAB - 1):
    for temperature in (1.0, 2.0):
      student, teacher, (topk_logits, indices, log_normalizer) = standard_case(3 + k, k, temperature)
      renormalized = sparse_kd_loss(
        student, topk_logits, indices, log_normalizer, temperature=temperature, tail="renormalize"
      )
      bucket = sparse_kd_loss(student, topk_logits, indices, log_normalizer, temperature=temperature, tail="bucket")
      expected = np_renormalized(student, teacher, indices, temperature)
      np.testing.assert_allclose(renormalized, expected, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(bucket, np_bucket(student, teacher, indices, temperature), rtol=1e-5, atol=1e-7)
      # Coarsening never increases a KL (data processing): the bucket loss is at most the dense one.
      assert np.all(np.asarray(bucket) <= np_dense(student, teacher, temperature) * (1 + 1e-5) + 1e-7)


def test_renormalize_needs_no_normalizer_and_is_the_default():
  student, _, (topk_logits, indices, log_normalizer) = standard_case(6)
  explicit = sparse_kd_loss(student, topk_logits, indices, log_normalizer, tail="renormalize")
  np.testing.assert_array_equal(sparse_kd_loss(student, topk_logits, indices), explicit)
  np.testing.assert_array_equal(sparse_kd_loss(student, topk_logits, indices, log_normalizer + 5.0), explicit)


kd_loss = jax.jit(losses.kd_loss)


@pytest.mark.parametrize("tail", TAILS)
def test_full_vocabulary_equals_kd_loss(tail):
  """k = V, the indices in any order: both modes are Hinton's dense loss (the bucket's empty tail is dropped)."""
  for temperature in (1.0, 2.0):
    student, teacher, cache = standard_case(9, VOCAB, temperature, scale=3.0)
    expected = kd_loss(student, teacher, temperature)
    np.testing.assert_allclose(
      sparse_kd_loss(student, *cache, temperature=temperature, tail=tail), expected, rtol=1e-5, atol=1e-6
    )
    # And as teacher_topk writes it (decreasing order).
    cache = teacher_topk(teacher, k=VOCAB, temperature=temperature)
    got = sparse_kd_loss(student, **cache, temperature=temperature, tail=tail)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", TAILS)
def test_zero_when_student_matches_teacher(tail):
  _, teacher, cache = standard_case(12)
  np.testing.assert_allclose(sparse_kd_loss(teacher, *cache, tail=tail), 0.0, atol=1e-6)


def test_bucket_when_top_k_hold_all_or_none_of_the_mass():
  """A teacher certain of its top k (tail mass 0, Σ p_i rounding to ≥ 1), and one with every top-k logit −inf."""
  student, teacher, (topk_logits, indices, log_normalizer) = standard_case(13)
  certain = np.full(teacher.shape, -40.0, np.float32)
  np.put_along_axis(certain, indices[..., :2], np.array([30.0, 29.0], np.float32), axis=-1)
  got = sparse_kd_loss(student, *sparse_teacher(certain, indices, 1.0), tail="bucket")
  np.testing.assert_allclose(got, np_bucket(student, certain, indices, 1.0), rtol=1e-5)
  # All top-k logits -inf: the teacher puts all its mass in the tail, a legitimate distribution.
  nowhere = np.full(topk_logits.shape, -np.inf, np.float32)
  got = sparse_kd_loss(student, nowhere, indices, log_normalizer, tail="bucket")
  outside = np.exp(np.take_along_axis(np_log_softmax(student), indices, -1)).sum(-1)
  np.testing.assert_allclose(got, -np.log1p(-outside), rtol=1e-5)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("tail", TAILS)
def test_16bit_cache(tail):
  """A cache as stored: 16-bit logits and uint16 indices are computed as their float32/int32 values."""
  student, teacher, _ = standard_case(14)
  cache = teacher_topk(teacher, k=K)
  reference = sparse_kd_loss(student, **cache, tail=tail)
  for logit_dtype in (jnp.bfloat16, jnp.float16):
    stored = dict(cache, topk_logits=cache["topk_logits"].astype(logit_dtype))
    got = sparse_kd_loss(
      student.astype(logit_dtype), **dict(stored, topk_indices=stored["topk_indices"].astype(jnp.uint16)), tail=tail
    )
    assert got.dtype == jnp.float32
    as_float32 = dict(stored, topk_logits=stored["topk_logits"].astype(jnp.float32))
    expected = sparse_kd_loss(student.astype(logit_dtype).astype(jnp.float32), **as_float32, tail=tail)
    np.testing.assert_array_equal(got, expected)
    # And the rounding costs little against the float32 cache.
    np.testing.assert_allclose(got, reference, rtol=0.1, atol=1e-2)


# ---------------------------------------------------------------- masks and bad values


def test_position_mask_equals_slicing():
  """[batch, seq] token mask: padding holds NaN, inf and out-of-range indices, and counts for nothing."""
  student, _, (topk_logits, indices, log_normalizer) = standard_case(16, temperature=2.0)
  mask = np.array([[True, True, True], [True, False, False]])
  student_pad, topk_pad, indices_pad, normalizer_pad = student.copy(), topk_logits.copy(), indices.copy(), None
  student_pad[1, 1:] = np.nan
  student_pad[1, 2, 0] = np.inf
  topk_pad[1, 1] = np.nan
  topk_pad[1, 2] = np.inf
  indices_pad[1, 1] = -1  # concrete, but masked: no error
  indices_pad[1, 2] = 1000
  normalizer_pad = log_normalizer.copy()
  normalizer_pad[1, 1:] = np.nan

  @jax.jit
  def run(student_pad, student):
    outputs = []
    for tail in TAILS:
      masked = lambda s, tail=tail: sparse_kd_loss(  # noqa: E731
        s, topk_pad, indices_pad, normalizer_pad, temperature=2.0, tail=tail, position_mask=mask
      )
      sliced = lambda s, tail=tail: sparse_kd_loss(  # noqa: E731
        s, topk_logits[mask], indices[mask], log_normalizer[mask], temperature=2.0, tail=tail
      )
      outputs.append(
        (
          masked(student_pad),
          jax.grad(lambda s: masked(s).sum())(student_pad),  # noqa: B023
          sliced(student[mask]),
          jax.grad(lambda s: sliced(s).sum())(student[mask]),  # noqa: B023
        )
      )
    return outputs

  for per_token, grads, per_token_sliced, grads_sliced in run(student_pad, student):
    np.testing.assert_array_equal(np.asarray(per_token)[~mask], 0.0)
    np.testing.assert_array_equal(np.asarray(grads)[~mask], 0.0)
    assert np.all(np.isfinite(grads))
    np.testing.assert_allclose(np.asarray(per_token)[mask], per_token_sliced, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grads)[mask], grads_sliced, rtol=1e-5, atol=1e-7)


def test_traced_out_of_range_indices_give_nan():
  """Under jit indices cannot raise: their positions are NaN (not a clamped class), the others untouched."""
  student, _, (topk_logits, indices, log_normalizer) = standard_case(19)
  bad = indices.copy()
  bad[0, 1, 2] = VOCAB
  bad[1, 0, 0] = -1
  broken = np.array([[False, True, False], [True, False, False]])

  @jax.jit
  def run(indices):
    outputs = []
    for tail in TAILS:
      loss = lambda s: sparse_kd_loss(s, topk_logits, indices, log_normalizer, tail=tail)  # noqa: E731, B023
      outputs.append((loss(student), jax.grad(lambda s: jnp.nansum(loss(s)))(student)))  # noqa: B023
    return outputs

  for (per_token, grads), (clean, _) in zip(run(bad), run(indices), strict=True):
    assert np.all(np.isnan(np.asarray(per_token)[broken]))
    np.testing.assert_array_equal(np.asarray(per_token)[~broken], np.asarray(clean)[~broken])
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(np.asarray(grads)[broken], 0.0)


@pytest.mark.parametrize(
  "tail,kind",
  [
    ("renormalize", "nan_logit"),
    ("renormalize", "plus_inf_logit"),
    ("renormalize", "all_minus_inf"),
    ("bucket", "nan_logit"),
    ("bucket", "plus_inf_logit"),
    ("bucket", "nan_normalizer"),
    ("bucket", "inf_normalizer"),
  ],
)
def test_broken_teacher_gives_nan_at_that_position(tail, kind):
  student, _, (topk_logits, indices, log_normalizer) = standard_case(22)
  if kind == "nan_logit":
    topk_logits[0, 1, 1] = np.nan
  elif kind == "plus_inf_logit":
    topk_logits[0, 1, 0] = np.inf
  elif kind == "all_minus_inf":
    topk_logits[0, 1] = -np.inf
  elif kind == "nan_normalizer":
    log_normalizer[0, 1] = np.nan
  else:
    log_normalizer[0, 1] = np.inf
  broken = np.zeros(SHAPE, bool)
  broken[0, 1] = True
  loss = lambda s, position_mask=None: sparse_kd_loss(  # noqa: E731
    s, topk_logits, indices, log_normalizer, tail=tail, position_mask=position_mask
  )
  per_token = np.asarray(loss(student))
  assert np.all(np.isnan(per_token[broken])) and np.all(np.isfinite(per_token[~broken])), per_token
  grads = jax.grad(lambda s: jnp.nansum(loss(s)))(student)
  assert np.all(np.isfinite(grads))
  np.testing.assert_array_equal(np.asarray(grads)[broken], 0.0)
  np.testing.assert_array_equal(loss(student, ~broken)[broken], 0.0)  # masked, it counts for nothing


def test_traced_bad_temperature_gives_nan():
  student, _, (topk_logits, indices, log_normalizer) = standard_case(25)
  mask = np.array([[True, False, True], [True, True, False]])

  @jax.jit
  def run(temperature):
    return jnp.stack(
      [
        sparse_kd_loss(
          student, topk_logits, indices, log_normalizer, temperature=temperature, tail=tail, position_mask=mask
        )
        for tail in TAILS
      ]
    )

  for temperature in (0.0, -2.0, np.nan, np.inf):
    per_token = np.asarray(run(jnp.float32(temperature)))
    assert np.all(np.isnan(per_token[:, mask])), (temperature, per_token)
    np.testing.assert_array_equal(per_token[:, ~mask], 0.0)
  assert np.all(np.isfinite(run(jnp.float32(2.0))))


# ---------------------------------------------------------------- gradients, jit, vmap


def test_check_grads():
  student, _, (topk_logits, indices, log_normalizer) = standard_case(28, temperature=2.0, scale=1.0)

  @jax.jit
  def both(s):
    return jnp.concatenate(
      [sparse_kd_loss(s, topk_logits, indices, log_normalizer, temperature=2.0, tail=tail).ravel() for tail in TAILS]
    )

  check_grads(both, (student,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_renormalize_gradient_is_analytic():
  """d/ds of renormalize is T (q̃ - p̃) on the k classes and 0 elsewhere (the T² and 1/T combine)."""
  student, _, (topk_logits, indices, log_normalizer) = standard_case(31, temperature=2.0)
  loss = lambda s: sparse_kd_loss(s, topk_logits, indices, log_normalizer, temperature=2.0).sum()  # noqa: E731
  p = np.exp(np_log_softmax(topk_logits, 2.0))
  q = np.exp(np_log_softmax(np.take_along_axis(student, indices, -1), 2.0))
  expected = np.zeros_like(student)
  np.put_along_axis(expected, indices, 2.0 * (q - p), axis=-1)
  np.testing.assert_allclose(jax.grad(loss)(student), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", TAILS)
def test_extreme_logits_have_finite_gradients(tail):
  signs = np.sign(random_logits((*SHAPE, VOCAB), 34))
  student, teacher = (1e4 * signs).astype(np.float32), (-1e4 * np.roll(signs, 1, axis=-1)).astype(np.float32)
  cache = teacher_topk(teacher, k=K)
  value, grads = jax.value_and_grad(lambda s: sparse_kd_loss(s, **cache, tail=tail).sum())(student)
  assert np.isfinite(value) and np.all(np.isfinite(grads)), (value, grads)


def test_no_gradient_reaches_teacher():
  student, _, (topk_logits, indices, log_normalizer) = standard_case(35)

  def both(topk_logits, log_normalizer):
    return sum(sparse_kd_loss(student, topk_logits, indices, log_normalizer, tail=tail).sum() for tail in TAILS)

  for grads in jax.grad(both, argnums=(0, 1))(topk_logits, log_normalizer):
    np.testing.assert_array_equal(grads, 0.0)


@pytest.mark.parametrize("tail", TAILS)
def test_jit_and_vmap(tail):
  student, _, (topk_logits, indices, log_normalizer) = standard_case(37, temperature=2.0)
  args = (student, topk_logits, indices.astype(np.uint16), log_normalizer)
  eager = sparse_kd_loss(*args, temperature=2.0, tail=tail)
  jitted = jax.jit(lambda *a: sparse_kd_loss(*a[:-1], temperature=a[-1], tail=tail))(*args, jnp.float32(2.0))
  mapped = jax.vmap(lambda *a: sparse_kd_loss(*a, temperature=2.0, tail=tail))(*args)
  assert eager.shape == jitted.shape == mapped.shape == SHAPE
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  np.testing.assert_allclose(mapped, eager, rtol=1e-6)


# ---------------------------------------------------------------- errors


def _valid():
  student, _, (topk_logits, indices, log_normalizer) = standard_case(40)
  return student, topk_logits, indices, log_normalizer


@pytest.mark.parametrize(
  "change,error,match",
  [
    (
      lambda s, t, i, z: (s[:, :2], t, i, z),
      ValueError,
      r"topk_logits must have shape .*\(2, 2\) \+ \(k,\), got \(2, 3, 3\)",
    ),
    (
      lambda s, t, i, z: (s, t, i[..., :1], z),
      ValueError,
      r"same shape .*topk_logits \(2, 3, 3\) and topk_indices \(2, 3, 1\)",
    ),
    (lambda s, t, i, z: (s, t, i.astype(np.float32), z), TypeError, "topk_indices must be integer"),
    (lambda s, t, i, z: (s, t, i.astype(bool), z), TypeError, "topk_indices must be integer"),
    (
      lambda s, t, i, z: (s, np.zeros((2, 3, 9)), np.zeros((2, 3, 9), np.int32), z),
      ValueError,
      r"k = topk_logits.shape\[-1\] must be in \[1, vocab_size=8\]",
    ),
    (
      lambda s, t, i, z: (s, t[..., :0], i[..., :0], z),
      ValueError,
      r"must be in \[1, vocab_size=8\], got topk_logits \(2, 3, 0\)",
    ),
    (lambda s, t, i, z: (s, t, i, z[:, :2]), ValueError, r"log_normalizer must have shape .*\(2, 3\), got \(2, 2\)"),
    (lambda s, t, i, z: (s[0, 0, 0], t, i, z), ValueError, "need a vocabulary axis"),
    (
      lambda s, t, i, z: (s, t, np.where(i == i[0, 0, 0], -1, i), z),
      ValueError,
      r"topk_indices must be in \[0, vocab_size=8\), got values in \[-1,",
    ),
    (
      lambda s, t, i, z: (s, t, np.full(i.shape, 8, np.uint16), z),
      ValueError,
      r"topk_indices must be in \[0, vocab_size=8\), got values in \[8, 8\]",
    ),
  ],
)
def test_argument_errors(change, error, match):
  for tail in TAILS:
    with pytest.raises(error, match=match):
      sparse_kd_loss(*change(*_valid()), tail=tail)


def test_option_errors():
  student, topk_logits, indices, log_normalizer = _valid()
  with pytest.raises(ValueError, match='tail="bucket" needs the teacher\'s log_normalizer'):
    sparse_kd_loss(student, topk_logits, indices, tail="bucket")
  with pytest.raises(ValueError, match=r"tail must be one of \('renormalize', 'bucket'\), got 'topk'"):
    sparse_kd_loss(student, topk_logits, indices, log_normalizer, tail="topk")
  for temperature in (0.0, -1.0, np.nan, np.inf):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
      sparse_kd_loss(student, topk_logits, indices, log_normalizer, temperature=temperature)
  with pytest.raises(ValueError, match=r"position_mask must have shape .*\(2, 3\), got \(2,\)"):
    sparse_kd_loss(student, topk_logits, indices, position_mask=np.ones(2, bool))
  with pytest.raises(TypeError, match="position_mask must be a boolean mask"):
    sparse_kd_loss(student, topk_logits, indices, position_mask=np.ones(SHAPE, np.float32))
  # The concrete range check only looks at kept positions.
  bad = indices.copy()
  bad[0, 1] = 17
  mask = np.ones(SHAPE, bool)
  mask[0, 1] = False
  assert np.isfinite(sparse_kd_loss(student, topk_logits, bad, log_normalizer, position_mask=mask)).all()
  with pytest.raises(ValueError, match=r"got values in \[17, 17\]"):
    sparse_kd_loss(student, topk_logits, bad, log_normalizer, position_mask=~mask)


def test_teacher_topk_errors():
  teacher = random_logits((2, 5), 42)
  for k in (0, 6):
    with pytest.raises(ValueError, match=r"k must be in \[1, vocab_size=5\] \(teacher_logits \(2, 5\)\), got k="):
      teacher_topk(teacher, k=k)
  for k in (2.0, True):
    with pytest.raises(TypeError, match="k must be an integer"):
      teacher_topk(teacher, k=k)
  with pytest.raises(ValueError, match="need a vocabulary axis"):
    teacher_topk(np.float32(1.0), k=1)
  with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
    teacher_topk(teacher, k=2, temperature=0.0)


# ---------------------------------------------------------------- cache size


@pytest.mark.parametrize(
  "k,kwargs,expected",
  [
    (8, {}, 36),
    (32, {}, 132),
    (32, {"index_dtype": "int32"}, 196),
    (8, {"index_dtype": jnp.int32, "logit_dtype": jnp.float32}, 68),
    (8, {"logit_dtype": "bfloat16", "with_normalizer": False}, 32),
  ],
)
def test_topk_bytes_per_token(k, kwargs, expected):
  assert topk_bytes_per_token(k, **kwargs) == expected
  # Matches the arrays a cache actually holds.
  logit_dtype = jnp.dtype(kwargs.get("logit_dtype", "float16"))
  index_dtype = jnp.dtype(kwargs.get("index_dtype", "uint16"))
  normalizer = 4 if kwargs.get("with_normalizer", True) else 0
  assert expected == np.zeros(k, logit_dtype).nbytes + np.zeros(k, index_dtype).nbytes + normalizer


def test_topk_bytes_per_token_errors():
  with pytest.raises(ValueError, match="k must be an integer >= 1"):
    topk_bytes_per_token(0)
  with pytest.raises(TypeError, match="logit_dtype must be a floating dtype"):
    topk_bytes_per_token(8, logit_dtype="int16")
  with pytest.raises(TypeError, match="index_dtype must be an integer dtype"):
    topk_bytes_per_token(8, index_dtype="float32")


def test_public_names():
  assert set(sparse_losses.__all__) == {"TAIL_MODES", "teacher_topk", "sparse_kd_loss", "topk_bytes_per_token"}
