"""Tests for jaxkd.data.logit_cache: exact logits, reuse, and no stale reuse after any change."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import data
from jaxkd.artifacts import tree_fingerprint
from jaxkd.data import logit_cache
from jaxkd.data.datasets import ArrayDataset
from jaxkd.models import MLP

MEAN, STD = 0.3, 0.4


def make_dataset(num_examples: int = 150) -> ArrayDataset:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(num_examples, 6, 6, 1), dtype=np.uint8)
  return ArrayDataset(images, np.arange(num_examples) % 4, num_classes=4, name="toy", split="train")


@pytest.fixture(scope="module")
def teacher():
  model = MLP(hidden_sizes=(16,), num_classes=4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))
  return model, variables


class CountingApply:
  """``model.apply`` in inference mode that counts traces, i.e. real computations."""

  def __init__(self, model):
    self.model = model
    self.traces = 0

  def __call__(self, variables, images):
    self.traces += 1
    return self.model.apply(variables, images, train=False)

  def __repr__(self):
    # What sets its outputs, without the trace count: the cache key of a callable object is its repr.
    return f"CountingApply({self.model!r})"


def reference_logits(model, variables, images):
  return np.asarray(model.apply(variables, jnp.asarray(data.normalize(images, mean=MEAN, std=STD))))


def test_logits_are_the_teachers_on_normalised_images(teacher):
  model, variables = teacher
  ds = make_dataset()
  # 150 examples in batches of 64 over 4 devices: the last batch is padded.
  logits = logit_cache.compute_teacher_logits(
    functools.partial(model.apply, train=False), variables, ds.images, mean=MEAN, std=STD, batch_size=64
  )
  assert logits.shape == (150, 4) and logits.dtype == np.float32
  np.testing.assert_allclose(logits, reference_logits(model, variables, ds.images), rtol=1e-5, atol=1e-5)


def test_cache_is_reused(teacher, tmp_path):
  model, variables = teacher
  ds = make_dataset()
  apply_fn = CountingApply(model)
  first = logit_cache.cached_teacher_logits(apply_fn, variables, ds, cache_dir=tmp_path, mean=MEAN, std=STD)
  assert apply_fn.traces == 1
  second = logit_cache.cached_teacher_logits(apply_fn, variables, ds, cache_dir=tmp_path, mean=MEAN, std=STD)
  assert apply_fn.traces == 1  # Nothing recomputed.
  np.testing.assert_array_equal(first, second)
  files = sorted(p.name for p in tmp_path.iterdir())
  assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npz")
  description = json.loads((tmp_path / files[0]).read_text())
  assert description["data"]["name"] == "toy" and description["data"]["split"] == "train"


def perturbed_variables(variables):
  leaves, treedef = jax.tree.flatten(variables)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].add(1e-3)
  return jax.tree.unflatten(treedef, leaves)


def edited_dataset(ds):
  images = ds.images.copy()
  images[17, 2, 3, 0] ^= 1  # One bit of one pixel; same name, split and size.
  return ArrayDataset(images, ds.labels, num_classes=ds.num_classes, name=ds.name, split=ds.split)


@pytest.mark.parametrize(
  "change",
  [
    "teacher_variables",
    "dataset_content",
    "dataset_split",
    "filters",
    "normalisation",
    "key_parts",
    "teacher_module",
  ],
)
def test_any_change_recomputes(teacher, tmp_path, change):
  model, variables = teacher
  ds = make_dataset()
  apply_fn = CountingApply(model)
  kwargs = {"cache_dir": tmp_path, "mean": MEAN, "std": STD}
  logit_cache.cached_teacher_logits(apply_fn, variables, ds, **kwargs)
  assert apply_fn.traces == 1
  new_variables, new_ds, new_kwargs, new_apply = variables, ds, dict(kwargs), apply_fn
  if change == "teacher_variables":
    new_variables = perturbed_variables(variables)
  elif change == "dataset_content":
    new_ds = edited_dataset(ds)
  elif change == "dataset_split":
    new_ds = ArrayDataset(ds.images, ds.labels, num_classes=4, name="toy", split="test")
  elif change == "filters":
    new_ds = data.transfer_set(ds, num_examples=len(ds), seed=0)  # Same examples, but a different recipe.
  elif change == "normalisation":
    new_kwargs["std"] = 0.5
  elif change == "key_parts":
    new_kwargs["key_parts"] = {"dtype": "bfloat16"}
  elif change == "teacher_module":
    # Same variables, different module hyperparameters: a bound apply carries its module's repr.
    new_apply = MLP(hidden_sizes=(16,), num_classes=4, dtype=jnp.bfloat16).apply
  logits = logit_cache.cached_teacher_logits(new_apply, new_variables, new_ds, **new_kwargs)
  if new_apply is apply_fn:
    assert apply_fn.traces == 2
  assert len(list(tmp_path.glob("*.npz"))) == 2
  if change in ("teacher_variables", "dataset_content"):
    mean, std = new_kwargs["mean"], new_kwargs["std"]
    expected = np.asarray(model.apply(new_variables, jnp.asarray(data.normalize(new_ds.images, mean=mean, std=std))))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_unreadable_cache_file_is_recomputed(teacher, tmp_path):
  model, variables = teacher
  ds = make_dataset()
  apply_fn = CountingApply(model)
  expected = logit_cache.cached_teacher_logits(apply_fn, variables, ds, cache_dir=tmp_path)
  (path,) = tmp_path.glob("*.npz")
  path.write_bytes(path.read_bytes()[:100])  # Truncated, as by a full disk.
  logits = logit_cache.cached_teacher_logits(apply_fn, variables, ds, cache_dir=tmp_path)
  assert apply_fn.traces == 2
  np.testing.assert_array_equal(logits, expected)
  np.testing.assert_array_equal(np.load(path)["logits"], expected)


def flip_bytes(path, data: bytes) -> None:
  """Inverts the bytes of the first occurrence of ``data`` in the file, as a disk or a copy might damage it."""
  raw = bytearray(path.read_bytes())
  start = raw.find(data)
  assert start >= 0
  raw[start : start + len(data)] = bytes(b ^ 0xFF for b in data)
  path.write_bytes(bytes(raw))


def rewrite(path, logits, *, checksum=None) -> None:
  """The cache file with other logits and, unless given, the checksum it had (as a damaged file would)."""
  checksum = checksum if checksum is not None else str(np.load(path)["sha256"])
  with open(path, "wb") as f:
    np.savez(f, logits=logits, sha256=np.array(checksum))


@pytest.mark.parametrize("damage", ["flipped_bytes", "changed_logits", "nan_row", "nan_row_with_its_checksum"])
def test_damaged_cache_file_is_recomputed_with_a_warning(teacher, tmp_path, caplog, damage):
  model, variables = teacher
  ds = make_dataset()
  apply_fn = CountingApply(model)
  expected = logit_cache.cached_teacher_logits(apply_fn, variables, ds, cache_dir=tmp_path)
  (path,) = tmp_path.glob("*.npz")
  if damage == "flipped_bytes":
    flip_bytes(path, expected[40].tobytes())  # One example's logits, inside the stored array.
  else:
    damaged = expected.copy()
    if damage == "changed_logits":
      damaged[40, 1] += 0.5
    else:
      damaged[40] = np.nan
    checksum = logit_cache._checksum(damaged) if damage == "nan_row_with_its_checksum" else None
    rewrite(path, damaged, checksum=checksum)
  with caplog.at_level("WARNING", logger="jaxkd.data.logit_cache"):
    logits = logit_cache.cached_teacher_logits(apply_fn, variables, ds, cache_dir=tmp_path)
  assert apply_fn.traces == 2  # Recomputed, not read.
  np.testing.assert_array_equal(logits, expected)
  np.testing.assert_array_equal(np.load(path)["logits"], expected)  # and the file repaired.
  (message,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert str(path) in message and "recomputing" in message
  reason = {
    "flipped_bytes": "unreadable",  # The zip's CRC catches it before the checksum does.
    "changed_logits": "fails its checksum",
    "nan_row": "fails its checksum",
    "nan_row_with_its_checksum": "non-finite logits for 1 examples (first: [40])",
  }[damage]
  assert reason in message


def test_non_finite_teacher_logits_are_an_error_and_not_cached(teacher, tmp_path):
  model, variables = teacher
  ds = make_dataset()

  def broken(variables, images):
    logits = model.apply(variables, images)
    return logits.at[3].set(jnp.inf).at[7, 0].set(jnp.nan)

  with pytest.raises(ValueError, match=r"non-finite \(NaN or inf\) for 2 of 150 examples \(first: \[3, 7\]\)"):
    logit_cache.cached_teacher_logits(broken, variables, ds, cache_dir=tmp_path)
  assert not list(tmp_path.glob("*.npz"))


def test_two_lambdas_with_the_same_variables_do_not_share_an_entry(teacher, tmp_path):
  model, variables = teacher
  ds = make_dataset()
  plain = lambda v, x: model.apply(v, x)  # noqa: E731 - the point is two functions with one qualified name
  doubled = lambda v, x: 2.0 * model.apply(v, x)  # noqa: E731
  first = logit_cache.cached_teacher_logits(plain, variables, ds, cache_dir=tmp_path)
  second = logit_cache.cached_teacher_logits(doubled, variables, ds, cache_dir=tmp_path)
  np.testing.assert_allclose(second, 2.0 * first, rtol=1e-6)
  assert len(list(tmp_path.glob("*.npz"))) == 2


def test_closures_of_one_function_do_not_share_an_entry(teacher, tmp_path):
  model, variables = teacher
  ds = make_dataset()

  def scaled(scale):
    return lambda v, x: scale * model.apply(v, x)

  once = logit_cache.cached_teacher_logits(scaled(1.0), variables, ds, cache_dir=tmp_path)
  thrice = logit_cache.cached_teacher_logits(scaled(3.0), variables, ds, cache_dir=tmp_path)
  np.testing.assert_allclose(thrice, 3.0 * once, rtol=1e-6)
  again = logit_cache.cached_teacher_logits(scaled(3.0), variables, ds, cache_dir=tmp_path)  # Same closure: reused.
  np.testing.assert_array_equal(again, thrice)
  assert len(list(tmp_path.glob("*.npz"))) == 2


class Opaque:
  """A callable whose repr is only its address: nothing tells two of them apart."""

  def __init__(self, model, scale):
    self.model, self.scale = model, scale

  def __call__(self, variables, images):
    return self.scale * self.model.apply(variables, images)


def test_a_callable_without_a_stable_description_is_refused_unless_named(teacher, tmp_path):
  model, variables = teacher
  ds = make_dataset()
  with pytest.raises(ValueError, match=r"apply_fn is a .*test_logit_cache.Opaque object .* apply_description="):
    logit_cache.cached_teacher_logits(Opaque(model, 1.0), variables, ds, cache_dir=tmp_path)
  with pytest.raises(ValueError, match=r"apply_fn closure variable 'opaque' is a .*Opaque object"):
    opaque = Opaque(model, 1.0)
    logit_cache.cached_teacher_logits(lambda v, x: opaque(v, x), variables, ds, cache_dir=tmp_path)
  assert not list(tmp_path.glob("*.npz"))
  one = logit_cache.cached_teacher_logits(Opaque(model, 1.0), variables, ds, cache_dir=tmp_path, apply_description="x1")
  two = logit_cache.cached_teacher_logits(Opaque(model, 2.0), variables, ds, cache_dir=tmp_path, apply_description="x2")
  np.testing.assert_allclose(two, 2.0 * one, rtol=1e-6)


def test_describe_is_stable_and_tells_apart_what_acts_differently():
  model = MLP(hidden_sizes=(16,), num_classes=4)
  assert logit_cache.describe(model) == logit_cache.describe(MLP(hidden_sizes=(16,), num_classes=4))
  assert logit_cache.describe(model) != logit_cache.describe(MLP(hidden_sizes=(8,), num_classes=4))
  assert logit_cache.describe(functools.partial(model.apply, train=False)) != logit_cache.describe(
    functools.partial(model.apply, train=True)
  )
  weights = np.arange(6.0).reshape(2, 3)
  assert logit_cache.describe({"w": weights}) != logit_cache.describe({"w": weights + 1})
  assert "0x" not in logit_cache.describe(jax.jit(lambda v, x: model.apply(v, x)))


def test_teacher_variables_are_keyed_by_the_one_tree_fingerprint():
  a = {"params": {"w": np.zeros((2, 2), np.float32)}}
  assert tree_fingerprint(a) == tree_fingerprint({"params": {"w": jnp.zeros((2, 2))}})
  assert tree_fingerprint(a) != tree_fingerprint({"params": {"v": np.zeros((2, 2))}})
  assert tree_fingerprint(a) != tree_fingerprint({"params": {"w": np.zeros((4,))}})
  assert tree_fingerprint(a) != tree_fingerprint({"params": {"w": np.zeros((2, 2), np.float16)}})
  _, description = logit_cache.cache_key(lambda v, x: x, a, np.zeros((1, 2, 2, 1), np.uint8))
  assert description["teacher"]["variables_sha256"] == tree_fingerprint(a)
  assert not hasattr(logit_cache, "variables_fingerprint")  # one fingerprint: jaxkd.artifacts.tree_fingerprint


def test_pipeline_carries_cached_logits_aligned_with_its_images(teacher, tmp_path):
  model, variables = teacher
  ds = data.transfer_set(make_dataset(), keep_classes=[0, 1, 3])
  logits = logit_cache.cached_teacher_logits(
    functools.partial(model.apply, train=False), variables, ds, cache_dir=tmp_path, mean=MEAN, std=STD
  )
  it = data.BatchIterator(
    ds, batch_size=16, train=True, seed=1, mean=MEAN, std=STD, teacher_logits=logits, process_index=0, process_count=1
  )
  for batch in [next(it) for _ in range(3)]:
    expected = np.asarray(model.apply(variables, jnp.asarray(batch["image"])))
    np.testing.assert_allclose(batch["teacher_logits"], expected, rtol=1e-5, atol=1e-5)


def test_rejects_non_image_input(teacher, tmp_path):
  model, variables = teacher
  with pytest.raises(ValueError, match=r"images must be uint8 \[num_examples, height, width, channels\], got float32"):
    logit_cache.cached_teacher_logits(model.apply, variables, np.zeros((4, 6, 6, 1), np.float32), cache_dir=tmp_path)
