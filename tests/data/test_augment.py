"""Tests for jaxkd.data.augment: NumPy references, placement independence, and one augmented view for both networks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import data, objective, train
from jaxkd.data import augment
from jaxkd.models import MLP
from jaxkd.placement import Placement
from jaxkd.state import create_train_state

NUM_CLASSES = 5
KEY = jax.random.key(3)

AUGMENTATIONS = {
  "compose": augment.compose(augment.random_translate(max_shift=2), augment.random_flip(), augment.mixup()),
  "cutmix": augment.cutmix(),
}

pytestmark = pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (fake CPU) devices, see tests/conftest.py")


def _batch(size: int = 8, shape=(6, 5, 2), seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    "image": rng.normal(size=(size, *shape)).astype(np.float32),
    "label": rng.integers(0, NUM_CLASSES, size=(size,)).astype(np.int32),
  }


def _rows(size: int, start: int = 0) -> jax.Array:
  return jnp.arange(start, start + size, dtype=jnp.int32)


def _numpy(tree):
  return jax.tree.map(np.asarray, tree)


@functools.cache
def _jitted(augmentation):
  """One compiled function per augmentation: op-by-op dispatch of the vmapped draws is slower to run than to jit."""
  return jax.jit(augmentation)


def _apply(augmentation, batch, key=KEY, rows=None):
  rows = _rows(jnp.shape(batch["image"])[0]) if rows is None else rows
  return _numpy(_jitted(augmentation)(batch, key, rows))


# ---------------------------------------------------------------------------------------------------------------------
# Each augmentation against a NumPy reference.


@pytest.mark.parametrize("alpha, per_batch", [(0.4, False), (1.0, True)])
def test_mixup_is_the_convex_combination_with_the_partner(alpha, per_batch):
  batch = _batch()
  out = _apply(augment.mixup(alpha=alpha, per_batch=per_batch), batch, rows=_rows(8, start=6))
  lam, partner = out["mix_weight"], np.arange(8) ^ 1
  assert lam.dtype == np.float32 and lam.shape == (8,)
  assert np.all((lam >= 0) & (lam < 1))
  assert (np.unique(lam).size == 1) == per_batch
  weight = lam[:, None, None, None]
  np.testing.assert_allclose(out["image"], weight * batch["image"] + (1 - weight) * batch["image"][partner], atol=1e-6)
  np.testing.assert_array_equal(out["mix_label"], batch["label"][partner])
  np.testing.assert_array_equal(out["label"], batch["label"])


def test_mixup_p0_is_the_identity_and_p_mixes_some():
  batch = _batch(size=32)
  out = _apply(augment.mixup(p=0.0), batch)
  np.testing.assert_array_equal(out["image"], batch["image"])
  np.testing.assert_array_equal(out["mix_weight"], np.ones(32, np.float32))
  np.testing.assert_array_equal(out["mix_label"], batch["label"])
  half = _apply(augment.mixup(p=0.5), batch)["mix_weight"]
  assert 0 < np.sum(half < 1) < 32


def test_mixing_leaves_padding_and_ignored_partners_out():
  batch = _batch()
  batch["mask"] = np.array([1, 1, 1, 0, 1, 1, 1, 1], bool)
  batch["label"][5] = train.IGNORE_INDEX
  for augmentation in (augment.mixup(), augment.cutmix()):
    out = _apply(augmentation, batch)
    # Rows 2 and 4 have a padding and an ignored partner: not mixed, and their mix_label is their own label.
    for row in (2, 4):
      assert out["mix_weight"][row] == 1.0
      np.testing.assert_array_equal(out["image"][row], batch["image"][row])
      assert out["mix_label"][row] == batch["label"][row]
    # Row 5 (ignored, so masked in the loss) mixes with row 4; no mix_label is -100 (its CE would be NaN).
    assert out["mix_label"][5] == batch["label"][4] and out["mix_weight"][5] < 1
    assert np.all(out["mix_weight"][[0, 1, 6, 7]] < 1)


def test_cutmix_pastes_a_box_and_weights_labels_by_its_area():
  batch = _batch(size=16)
  out = _apply(AUGMENTATIONS["cutmix"], batch)
  images, partner = batch["image"], np.arange(16) ^ 1
  areas = []
  for row in range(16):
    pasted = np.all(out["image"][row] == images[partner[row]], axis=-1) & np.any(
      out["image"][row] != images[row], axis=-1
    )  # [height, width]
    box = np.outer(pasted.any(axis=1), pasted.any(axis=0))
    np.testing.assert_array_equal(pasted, box)  # a rectangle, all channels
    np.testing.assert_array_equal(out["image"][row][~box], images[row][~box])  # outside it: unchanged
    np.testing.assert_allclose(out["mix_weight"][row], 1 - box.sum() / box.size, rtol=1e-6)
    areas.append(box.sum())
  assert max(areas) > 0
  np.testing.assert_array_equal(out["mix_label"][np.array(areas) > 0], batch["label"][partner][np.array(areas) > 0])


def test_random_translate_matches_the_host_translate():
  batch = _batch(size=16)
  out = _apply(augment.random_translate(max_shift=2), batch)
  shifts = []
  for row in range(16):
    image = batch["image"][row : row + 1]
    found = [
      (dy, dx)
      for dy in range(-2, 3)
      for dx in range(-2, 3)
      if np.array_equal(data.translate(image, np.array([[dy, dx]]))[0], out["image"][row])
    ]
    assert len(found) == 1, found
    shifts.append(found[0])
  assert len(set(shifts)) > 3
  np.testing.assert_array_equal(out["label"], batch["label"])
  crop = _apply(augment.random_crop(padding=2), batch)
  np.testing.assert_array_equal(crop["image"], out["image"])


def test_random_flip_flips_some_images_left_right():
  batch = _batch(size=16)
  out = _apply(augment.random_flip(), batch)["image"]
  flipped = batch["image"][:, :, ::-1]
  is_flipped = np.all(out == flipped, axis=(1, 2, 3))
  assert np.all(is_flipped | np.all(out == batch["image"], axis=(1, 2, 3)))
  assert 0 < is_flipped.sum() < 16
  np.testing.assert_array_equal(_apply(augment.random_flip(p=1.0), batch)["image"], flipped)
  np.testing.assert_array_equal(_apply(augment.random_flip(p=0.0), batch)["image"], batch["image"])


# ---------------------------------------------------------------------------------------------------------------------
# Keys: per (key, global row), never per position.


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_an_example_draws_the_same_whichever_share_holds_it(name):
  """Two devices' halves augmented apart (rows 0-3 and 4-7) equal the whole batch: what placements rely on."""
  augmentation, batch = AUGMENTATIONS[name], _batch(size=16)
  whole = _apply(augmentation, batch)
  halves = [_apply(augmentation, {k: v[s : s + 8] for k, v in batch.items()}, rows=_rows(8, s)) for s in (0, 8)]
  for entry in whole:
    np.testing.assert_array_equal(np.concatenate([h[entry] for h in halves]), whole[entry], err_msg=entry)


def test_same_key_same_output_and_another_step_another():
  augmentation, batch = AUGMENTATIONS["compose"], _batch(size=16)
  first = _apply(augmentation, batch)
  # Built again: no state between calls, the draws are a function of (key, rows) alone.
  rebuilt = augment.compose(augment.random_translate(max_shift=2), augment.random_flip(), augment.mixup())
  jax.tree.map(np.testing.assert_array_equal, _apply(rebuilt, batch), first)
  other = _apply(augmentation, batch, key=jax.random.fold_in(KEY, 1))
  assert not np.allclose(other["image"], first["image"])
  assert not np.allclose(other["mix_weight"], first["mix_weight"])


# ---------------------------------------------------------------------------------------------------------------------
# In the step.


PROJECTION = np.random.default_rng(7).normal(size=(6 * 5 * 2, NUM_CLASSES)).astype(np.float32)


def _linear_teacher(variables, image, **kwargs):
  """Teacher logits: a fixed projection of the image it is given."""
  return image.reshape(image.shape[0], -1) @ variables["params"]["w"]


def _teacher_saw_the_batch(inputs):
  """The student's batch projected as the teacher does it: 0 when the teacher read the same (augmented) array."""
  image = inputs.batch["image"]
  return jnp.max(jnp.abs(inputs.teacher_logits - image.reshape(image.shape[0], -1) @ PROJECTION))


OBJECTIVE = objective.Objective(
  (
    objective.cross_entropy(weight=0.3),
    objective.kd(weight=0.7, temperature=2.0),
    objective.LossTerm("consistent", _teacher_saw_the_batch, weight=0.0, scope="local"),
    objective.LossTerm("mixed", lambda inputs: 1.0 - inputs.batch["mix_weight"], weight=0.0, needs_teacher=False),
  )
)


def _state(seed: int = 0):
  model = MLP(hidden_sizes=(16,), num_classes=NUM_CLASSES)
  return create_train_state(model, optax.sgd(0.1), np.zeros((1, 6, 5, 2), np.float32), rng=jax.random.key(seed))


def _step(placement: Placement, augmentation):
  step = train.make_train_step(
    teacher_apply_fn=_linear_teacher, objective=OBJECTIVE, augment=augmentation, placement=placement
  )
  return step, step.placement.put({"params": {"w": PROJECTION}})


@functools.cache
def _one_step_per_placement() -> dict[str, tuple]:
  """(params, metrics) after one step of translate, flip and mixup on 1 device, a 2-device mesh and pmap over 2."""
  placements = {
    "single": Placement.single(),
    "data_parallel": Placement.data_parallel(jax.devices()[:2]),
    "pmap": Placement.pmap(jax.devices()[:2]),
  }
  results = {}
  for name, placement in placements.items():
    step, teacher_variables = _step(placement, AUGMENTATIONS["compose"])
    state, metrics = step(step.placement.put(_state()), teacher_variables, _batch(size=16, seed=1))
    results[name] = step.placement.to_host((state.params, metrics))
  return results


@pytest.mark.parametrize("placement", ["single", "data_parallel", "pmap"])
def test_teacher_and_student_see_the_same_augmented_image(placement):
  _, metrics = _one_step_per_placement()[placement]
  assert metrics["loss/consistent"] == 0.0
  assert metrics["loss/mixed"] > 0.1  # what both saw was mixed
  # The step trained on the mixed labels' CE, not on the clean labels' CE the metric reports.
  assert abs(metrics["loss/ce"] - metrics["ce"]) > 1e-4


def test_every_placement_draws_the_same_augmentation():
  """The same draws for each global row whichever device holds it, so the same update."""
  results = _one_step_per_placement()
  params, metrics = results["single"]
  for placement in ("data_parallel", "pmap"):
    other_params, other_metrics = results[placement]
    for name in metrics:
      np.testing.assert_allclose(other_metrics[name], metrics[name], rtol=1e-5, atol=1e-6, err_msg=placement + name)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), other_params, params)


def test_resumed_run_augments_as_an_uninterrupted_one():
  """Two steps in a row equal step 1, the state through the host, then step 2 (the key comes from the step)."""
  step, teacher_variables = _step(Placement.single(), augment.compose(augment.random_translate(), augment.cutmix()))
  batches = [_batch(seed=2), _batch(seed=3)]
  state, _ = step(step.placement.put(_state()), teacher_variables, batches[0])
  saved = step.placement.to_host(state)
  straight, straight_metrics = step(state, teacher_variables, batches[1])
  resumed, resumed_metrics = step(step.placement.put(jax.device_get(saved)), teacher_variables, batches[1])
  straight, resumed = step.placement.to_host((straight, resumed))
  assert int(resumed.step) == 2
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
  for name in straight_metrics:
    np.testing.assert_array_equal(resumed_metrics[name], straight_metrics[name], err_msg=name)


def test_mixup_without_teacher_trains_on_the_mixed_labels():
  """The scratch loss is λ CE(y) + (1 - λ) CE(y'), on the images and λ the step drew (NumPy reference)."""
  seen = []
  mixup = augment.mixup()

  def recording(batch, key, rows):
    jax.debug.callback(lambda k, r: seen.append((k, r)), jax.random.key_data(key), rows)
    return mixup(batch, key, rows)

  state, batch = _state(), _batch()
  step = train.make_train_step(augment=recording, placement=Placement.single())
  params = jax.device_get(state.params)
  _, metrics = step(step.placement.put(state), None, batch)
  [(key_data, rows)] = seen
  mixed = _apply(mixup, batch, jax.random.wrap_key_data(key_data), rows)
  logits = np.asarray(state.model.apply_fn({"params": params}, mixed["image"]), np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  ce, partner_ce = (-log_probs[np.arange(8), mixed[k]] for k in ("label", "mix_label"))
  lam = mixed["mix_weight"]
  expected = np.mean(lam * ce + (1 - lam) * partner_ce)
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
  assert abs(expected - ce.mean()) > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# Errors, from static shapes, at trace time.


def test_errors():
  batch = _batch()
  with pytest.raises(ValueError, match="per-device batch must be even, got 7"):
    augment.mixup()(_batch(size=7), KEY, _rows(7))
  with pytest.raises(ValueError, match=r"no entry 'pixels' \(it has \['image', 'label'\]\)"):
    augment.random_flip(image_key="pixels")(batch, KEY, _rows(8))
  with pytest.raises(ValueError, match=r"must be images \[batch, height, width, channels\], got shape \(8, 60\)"):
    augment.random_translate()({**batch, "image": batch["image"].reshape(8, -1)}, KEY, _rows(8))
  with pytest.raises(ValueError, match="already mixed"):
    augment.compose(augment.mixup(), augment.cutmix())(batch, KEY, _rows(8))
  with pytest.raises(ValueError, match="rows must be int"):
    augment.random_flip()(batch, KEY, _rows(4))
  with pytest.raises(ValueError, match=r"int class labels \[batch\]"):
    augment.cutmix()({**batch, "label": np.zeros((8, 3), np.int32)}, KEY, _rows(8))
  with pytest.raises(TypeError, match="floating images"):
    augment.mixup()({**batch, "image": np.zeros((8, 6, 5, 2), np.uint8)}, KEY, _rows(8))
  with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
    augment.mixup(alpha=0.0)
  with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 1.5"):
    augment.cutmix(p=1.5)
  with pytest.raises(ValueError, match="padding must be an int >= 0"):
    augment.random_crop(padding=-1)
  with pytest.raises(TypeError, match="augmentation 1 must be a function"):
    augment.compose(augment.random_flip(), "flip")


def test_odd_per_device_batch_is_an_error_in_the_step():
  step = train.make_train_step(augment=augment.mixup(), placement=Placement.data_parallel(jax.devices()[:2]))
  with pytest.raises(ValueError, match="per-device batch must be even, got 3"):
    step(step.placement.put(_state()), None, _batch(size=6))


def test_cached_teacher_logits_with_augmentation_are_an_error():
  """Cached logits are of the unaugmented input: distilling an augmented view towards them is refused."""
  step = train.make_train_step(augment=augment.mixup(), placement="single")
  batch = dict(_batch(size=4), teacher_logits=np.zeros((4, NUM_CLASSES), np.float32))
  with pytest.raises(ValueError, match="unaugmented input"):
    step(_state(), None, batch)
