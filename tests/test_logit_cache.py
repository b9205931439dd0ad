"""Tests for jaxkd.logit_cache: exact logits, reuse, and no stale reuse after any change."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import data, logit_cache
from jaxkd.datasets import ArrayDataset
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
  assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
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
  assert len(list(tmp_path.glob("*.npy"))) == 2
  if change in ("teacher_variables", "dataset_content"):
    mean, std = new_kwargs["mean"], new_kwargs["std"]
    expected = np.asarray(model.apply(new_variables, jnp.asarray(data.normalize(new_ds.images, mean=mean, std=std))))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_unreadable_cache_file_is_recomputed(teacher, tmp_path):
  model, variables = teacher
  ds = make_dataset()
  apply_fn = CountingApply(model)
  expected = logit_cache.cached_teacher_logits(apply_fn, variables, ds, cache_dir=tmp_path)
  (path,) = tmp_path.glob("*.npy")
  path.write_bytes(path.read_bytes()[:100])  # Truncated, as by a full disk.
  logits = logit_cache.cached_teacher_logits(apply_fn, variables, ds, cache_dir=tmp_path)
  assert apply_fn.traces == 2
  np.testing.assert_array_equal(logits, expected)
  np.testing.assert_array_equal(np.load(path), expected)


def test_variables_fingerprint_sees_structure_and_values():
  a = {"params": {"w": np.zeros((2, 2), np.float32)}}
  assert logit_cache.variables_fingerprint(a) == logit_cache.variables_fingerprint({"params": {"w": jnp.zeros((2, 2))}})
  assert logit_cache.variables_fingerprint(a) != logit_cache.variables_fingerprint({"params": {"v": np.zeros((2, 2))}})
  assert logit_cache.variables_fingerprint(a) != logit_cache.variables_fingerprint({"params": {"w": np.zeros((4,))}})
  assert logit_cache.variables_fingerprint(a) != logit_cache.variables_fingerprint(
    {"params": {"w": np.zeros((2, 2), np.float16)}}
  )


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
