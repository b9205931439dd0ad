"""Tests for jaxkd.data: batch format, shuffling, sharding, padding, filters, augmentation, resume, prefetch, stack."""

import itertools
import json

import jax
import numpy as np
import pytest

from jaxkd import data
from jaxkd.data.datasets import ArrayDataset
from jaxkd.placement import Placement

NUM_EXAMPLES = 103  # Prime: no batch size divides it, so remainders and padding always show.


def make_dataset(num_examples: int = NUM_EXAMPLES, *, num_classes: int = 5, channels: int = 1) -> ArrayDataset:
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, size=(num_examples, 8, 8, channels), dtype=np.uint8)
  labels = np.arange(num_examples) % num_classes
  return ArrayDataset(images, labels, num_classes=num_classes, name="toy", split="train")


def batches(iterator, count=None):
  return list(itertools.islice(iterator, count))


def iterator(ds=None, **kwargs):
  kwargs = {"batch_size": 10, "train": True, "process_index": 0, "process_count": 1, "include_index": True, **kwargs}
  return data.BatchIterator(make_dataset() if ds is None else ds, **kwargs)


# --- format --------------------------------------------------------------------------------


def test_train_batch_format_and_values():
  ds = make_dataset(channels=3)
  mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
  batch = next(iterator(ds, mean=mean, std=std))
  assert sorted(batch) == ["image", "index", "label"]
  assert batch["image"].shape == (10, 8, 8, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (10,) and batch["label"].dtype == np.int32
  expected = (ds.images[batch["index"]] / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(batch["label"], ds.labels[batch["index"]])


def test_eval_batch_has_mask():
  batch = next(iterator(train=False, include_index=False))
  assert sorted(batch) == ["image", "label", "mask"]
  assert batch["mask"].dtype == np.bool_ and batch["mask"].all()


def test_batches_are_flat_process_rows_whatever_the_devices():
  batch = next(iterator(batch_size=12))
  assert batch["image"].shape == (12, 8, 8, 1) and batch["label"].shape == (12,)


def test_normalize_matches_formula():
  images = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1)
  np.testing.assert_allclose(data.normalize(images, mean=0.2, std=0.5)[0, 0, :, 0], [-0.4, 0.0, 1.6], atol=1e-6)
  with pytest.raises(ValueError, match="std must be > 0"):
    data.normalize(images, std=0.0)
  with pytest.raises(ValueError, match="mean must be a number or 1 per-channel numbers, got 3"):
    data.normalize(images, mean=(0.1, 0.2, 0.3))


# --- order, epochs, sharding ---------------------------------------------------------------


def test_train_epochs_are_seeded_permutations_without_remainder():
  it = iterator(seed=3)
  assert it.steps_per_epoch == NUM_EXAMPLES // 10
  epochs = [np.concatenate([b["index"] for b in batches(it, it.steps_per_epoch)]) for _ in range(2)]
  for order in epochs:
    assert len(order) == 100 and len(set(order)) == 100  # Remainder dropped, no repeats.
  assert not np.array_equal(epochs[0], epochs[1])
  again = iterator(seed=3)
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches(again, 20)]), np.concatenate(epochs))
  other = np.concatenate([b["index"] for b in batches(iterator(seed=4), 10)])
  assert not np.array_equal(other, epochs[0])


def test_num_epochs_stops():
  assert len(batches(iterator(num_epochs=2))) == 2 * (NUM_EXAMPLES // 10)


@pytest.mark.parametrize("process_count", [1, 3, 4])
def test_eval_shards_are_disjoint_cover_everything_and_align(process_count):
  per_process = []
  for process_index in range(process_count):
    it = iterator(train=False, batch_size=4 * process_count, process_index=process_index, process_count=process_count)
    got = batches(it)
    assert len(got) == it.steps_per_epoch  # Same count everywhere, or pmap/shard_map would hang.
    start, stop = data.shard_bounds(NUM_EXAMPLES, process_index, process_count)
    seen = np.concatenate([b["index"][b["mask"]] for b in got])
    np.testing.assert_array_equal(seen, np.arange(start, stop))  # Only its own share, in order.
    per_process.append((len(got), seen))
  assert len({count for count, _ in per_process}) == 1
  everything = np.concatenate([seen for _, seen in per_process])
  np.testing.assert_array_equal(np.sort(everything), np.arange(NUM_EXAMPLES))


def test_train_shards_are_disjoint_each_epoch():
  process_count = 3
  epochs = {}
  for process_index in range(process_count):
    it = iterator(batch_size=6, process_index=process_index, process_count=process_count)
    assert it.steps_per_epoch == (NUM_EXAMPLES // 3) // 2
    start, stop = data.shard_bounds(NUM_EXAMPLES, process_index, process_count)
    for epoch in range(2):
      seen = np.concatenate([b["index"] for b in batches(it, it.steps_per_epoch)])
      assert seen.min() >= start and seen.max() < stop
      epochs.setdefault(epoch, []).append(seen)
  for seen in epochs.values():
    everything = np.concatenate(seen)
    assert len(set(everything)) == len(everything)


def test_last_eval_batch_is_padded_and_masked():
  ds = make_dataset()
  got = batches(iterator(ds, train=False, teacher_logits=np.ones((NUM_EXAMPLES, 5), np.float32)))
  assert len(got) == 11
  last = got[-1]
  np.testing.assert_array_equal(last["mask"], np.arange(10) < 3)
  assert (last["image"][3:] == 0).all() and (last["label"][3:] == 0).all()
  assert (last["teacher_logits"][3:] == 0).all() and (last["teacher_logits"][:3] == 1).all()
  assert sum(int(b["mask"].sum()) for b in got) == NUM_EXAMPLES


def test_shard_bounds():
  bounds = [data.shard_bounds(10, i, 4) for i in range(4)]
  assert bounds == [(0, 2), (2, 5), (5, 7), (7, 10)]
  with pytest.raises(ValueError, match=r"process_index must be in \[0, 4\), got 4"):
    data.shard_bounds(10, 4, 4)


# --- transfer-set filters ------------------------------------------------------------------


def test_keep_and_drop_classes():
  ds = make_dataset()
  kept = data.transfer_set(ds, keep_classes=[1, 3])
  assert set(kept.labels) == {1, 3} and len(kept) == np.isin(ds.labels, [1, 3]).sum()
  np.testing.assert_array_equal(kept.images, ds.images[kept.indices])
  dropped = data.transfer_set(kept, drop_classes=[3])
  assert set(dropped.labels) == {1}
  assert dropped.filters == (
    {"keep_classes": [1, 3], "drop_classes": None, "num_examples": None},
    {"keep_classes": None, "drop_classes": [3], "num_examples": None},
  )
  assert dropped.num_classes == 5  # Ids are not renumbered: the teacher still has 5 outputs.


def test_subsample_is_deterministic_and_ordered():
  ds = make_dataset()
  a = data.transfer_set(ds, drop_classes=[0], num_examples=30, seed=1)
  b = data.transfer_set(ds, drop_classes=[0], num_examples=30, seed=1)
  c = data.transfer_set(ds, drop_classes=[0], num_examples=30, seed=2)
  np.testing.assert_array_equal(a.indices, b.indices)
  assert not np.array_equal(a.indices, c.indices)
  assert len(a) == 30 and (np.diff(a.indices) > 0).all() and 0 not in set(a.labels)
  assert a.filters[-1]["seed"] == 1


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"keep_classes": [5]}, r"keep_classes \[5\] out of range \[0, 5\)"),
    ({"drop_classes": [-1, 2]}, r"drop_classes \[-1\] out of range"),
    ({"num_examples": 104}, r"num_examples must be in \[1, 103\]"),
    ({"keep_classes": [1], "drop_classes": [1]}, "No examples left"),
  ],
)
def test_filter_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    data.transfer_set(make_dataset(), **kwargs)


# --- resume --------------------------------------------------------------------------------


@pytest.mark.parametrize("train, consumed", [(True, 13), (True, 10), (False, 4)])
def test_state_round_trip_resumes_exactly(train, consumed):
  kwargs = {"train": train, "seed": 7}
  if train:
    kwargs["max_translation"] = 1
  it = iterator(**kwargs)
  batches(it, consumed)
  state = json.loads(json.dumps(it.get_state()))
  expected = batches(it, 5)
  resumed = iterator(**kwargs)
  resumed.set_state(state)
  for want, got in zip(expected, batches(resumed, 5), strict=True):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_state_from_a_different_iterator_is_rejected():
  state = iterator(seed=1).get_state()
  with pytest.raises(ValueError, match="seed: saved 1, here 2"):
    iterator(seed=2).set_state(state)
  with pytest.raises(ValueError, match="batch_size: saved 10, here 20"):
    iterator(seed=1, batch_size=20).set_state(state)
  with pytest.raises(ValueError, match="out of range: epoch 0, step 10 of 10"):
    iterator(seed=1).set_state({**state, "step": 10})


def test_prefetcher_state_is_that_of_the_batches_handed_out():
  it = iterator(seed=5)
  reference = iterator(seed=5)
  with data.DevicePrefetcher(it, size=2) as prefetched:
    got = batches(prefetched, 3)
    batches(reference, 3)
    assert prefetched.get_state() == reference.get_state()  # Not the 2 buffered ahead.
  resumed = iterator(seed=5)
  resumed.set_state(prefetched.get_state())
  np.testing.assert_array_equal(next(resumed)["index"], next(reference)["index"])
  np.testing.assert_array_equal(np.asarray(got[0]["image"]), next(iterator(seed=5))["image"])


# --- augmentation --------------------------------------------------------------------------


def reference_translate(image, dy, dx):
  out = np.zeros_like(image)
  height, width = image.shape[:2]
  for y in range(height):
    for x in range(width):
      if 0 <= y - dy < height and 0 <= x - dx < width:
        out[y, x] = image[y - dy, x - dx]
  return out


def test_translate_matches_reference():
  images = np.random.default_rng(0).integers(1, 256, size=(6, 5, 7, 2), dtype=np.uint8)
  shifts = np.array([[0, 0], [1, -2], [-3, 3], [1, -2], [5, 0], [0, -7]])
  out = data.translate(images, shifts)
  for image, (dy, dx), got in zip(images, shifts, out, strict=True):
    np.testing.assert_array_equal(got, reference_translate(image, dy, dx))


def find_shift(original, augmented, max_shift):
  for dy, dx in itertools.product(range(-max_shift, max_shift + 1), repeat=2):
    if np.array_equal(reference_translate(original, dy, dx), augmented):
      return dy, dx
  return None


def test_translation_is_a_zero_filled_shift_seeded_per_example():
  ds = make_dataset()
  it = iterator(ds, max_translation=2, seed=11)
  batch = next(it)
  raw = np.round(batch["image"] * 255).astype(np.uint8)  # mean 0, std 1: exact inverse.
  shifts = [find_shift(ds.images[i], image, 2) for i, image in zip(batch["index"], raw, strict=True)]
  assert None not in shifts and len(set(shifts)) > 1
  # The same example gets the same shift whatever the batch size (seed, epoch, index only).
  small = [batch, *batches(it, 4)]  # The first 50 examples of the epoch, at positions 0-9 of their batches.
  bigger = next(iterator(ds, max_translation=2, seed=11, batch_size=50))  # The same 50, at positions 0-49.
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in small]), bigger["index"])
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in small]), bigger["image"])
  # Another seed moves the same examples differently.
  other = iterator(ds, max_translation=2, seed=12)
  other_batch = next(other)
  other_raw = np.round(other_batch["image"] * 255).astype(np.uint8)
  other_shifts = [find_shift(ds.images[i], img, 2) for i, img in zip(other_batch["index"], other_raw, strict=True)]
  assert other_shifts != shifts


def test_each_epoch_draws_new_augmentations():
  it = iterator(max_translation=2, batch_size=100)  # One step per epoch: the epochs share at least 97 examples.
  first, second = next(it), next(it)
  by_index = dict(zip(first["index"], first["image"], strict=True))
  pairs = [(by_index[i], image) for i, image in zip(second["index"], second["image"], strict=True) if i in by_index]
  assert sum(not np.array_equal(a, b) for a, b in pairs) > len(pairs) // 2


def test_horizontal_flip_flips_about_half():
  ds = make_dataset(200)
  batch = next(iterator(ds, horizontal_flip=True, batch_size=200))
  raw = np.round(batch["image"] * 255).astype(np.uint8)
  original = ds.images[batch["index"]]
  flipped = np.array([np.array_equal(r, o[:, ::-1]) for r, o in zip(raw, original, strict=True)])
  unchanged = np.array([np.array_equal(r, o) for r, o in zip(raw, original, strict=True)])
  assert (flipped ^ unchanged).all()
  assert 60 < flipped.sum() < 140


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"train": False, "max_translation": 2}, "augmentation .* is for training iterators only"),
    ({"max_translation": -1}, "max_translation must be >= 0"),
    ({"horizontal_flip": True, "teacher_logits": np.zeros((NUM_EXAMPLES, 5))}, "cached teacher_logits are those of"),
    ({"teacher_logits": np.zeros((NUM_EXAMPLES - 1, 5))}, r"teacher_logits must be \[len\(dataset\)=103"),
    ({"batch_size": 10, "process_count": 3}, "batch_size 10 must be a positive multiple of process_count 3"),
    ({"batch_size": 104}, "give no full batch of 104 per process"),
  ],
)
def test_invalid_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    iterator(**kwargs)


@pytest.mark.parametrize("train", [True, False])
def test_an_empty_dataset_is_refused_up_front(train):
  # Evaluation used to yield no batch at all, training a "lower batch_size" that no batch size could satisfy.
  with pytest.raises(ValueError, match=r"BatchIterator got an empty dataset \(ArrayDataset\(name='toy'"):
    iterator(make_dataset(0), train=train)


@pytest.mark.parametrize(
  "process_index, process_count", [(0, 0), (2, 2), (-1, 2)], ids=["no_processes", "index_too_large", "negative"]
)
def test_process_index_and_count_are_checked(process_index, process_count):
  # process_count 0 was a ZeroDivisionError from `batch_size % process_count`.
  with pytest.raises(ValueError, match=rf"got process_index {process_index} of process_count {process_count}"):
    iterator(process_index=process_index, process_count=process_count)


# --- teacher logits and devices ------------------------------------------------------------


def test_teacher_logits_follow_the_shuffle():
  ds = data.transfer_set(make_dataset(), drop_classes=[2])
  teacher_logits = np.stack([ds.indices, -ds.indices], axis=1).astype(np.float32)  # Row j names example j.
  for batch in batches(iterator(ds, teacher_logits=teacher_logits, seed=2), 12):
    np.testing.assert_array_equal(batch["teacher_logits"][:, 0], batch["index"])


def test_prefetch_places_pmap_batches_on_local_devices():
  placement = Placement.pmap(jax.local_devices()[:4])
  it = iterator(batch_size=8, num_epochs=1)
  with data.DevicePrefetcher(it, placement=placement) as prefetched:
    got = batches(prefetched)
  assert len(got) == NUM_EXAMPLES // 8
  image = got[0]["image"]
  assert isinstance(image, jax.Array) and image.shape == (4, 2, 8, 8, 1)
  assert {shard.device for shard in image.addressable_shards} == set(jax.local_devices()[:4])
  assert placement.is_placed_batch(got[0])
  first = next(iterator(batch_size=8))
  np.testing.assert_array_equal(np.asarray(image).reshape(8, 8, 8, 1), first["image"])


def test_prefetch_flat_batches_with_a_mesh_placement():
  placement = Placement.data_parallel(jax.local_devices()[:4])
  with data.DevicePrefetcher(iterator(batch_size=8), placement=placement) as prefetched:
    batch = next(prefetched)
  assert batch["image"].shape == (8, 8, 8, 1) and placement.is_placed_batch(batch)
  assert batch["label"].sharding.spec == jax.sharding.PartitionSpec("data")
  with data.DevicePrefetcher(iterator(batch_size=8)) as prefetched:
    assert isinstance(next(prefetched)["image"], jax.Array)


def test_prefetch_set_state_before_the_start_resumes_exactly_and_after_it_raises():
  reference = iterator(seed=5)
  batches(reference, 4)
  saved = reference.get_state()
  expected = batches(reference, 3)
  prefetched = data.DevicePrefetcher(iterator(seed=5), placement=Placement.single())
  assert not prefetched.started
  prefetched.set_state(saved)
  assert prefetched.get_state() == saved
  got = batches(prefetched, 3)
  for want, have in zip(expected, got, strict=True):
    for key in want:
      np.testing.assert_array_equal(np.asarray(have[key]), want[key])
  assert prefetched.get_state() == reference.get_state()
  with pytest.raises(RuntimeError, match="set_state after the first next"):
    prefetched.set_state(saved)
  prefetched.close()


def test_stack_groups_consecutive_batches_and_keeps_the_position():
  plain, stacked = iterator(seed=2), data.stack(iterator(seed=2), 3)
  assert stacked.stacked_steps == 3
  group = next(stacked)
  singles = batches(plain, 3)
  for key in singles[0]:
    assert group[key].shape == (3, *singles[0][key].shape)
    np.testing.assert_array_equal(group[key], np.stack([b[key] for b in singles]))
  assert stacked.get_state() == plain.get_state()
  resumed = data.stack(iterator(seed=2), 3)
  resumed.set_state(stacked.get_state())
  np.testing.assert_array_equal(next(resumed)["index"], next(stacked)["index"])
  # A group the iterator cannot fill ends the iteration.
  assert len(batches(data.stack(iterator(num_epochs=1), 4))) == (NUM_EXAMPLES // 10) // 4
  with pytest.raises(ValueError, match="steps must be an int >= 1"):
    data.stack(iterator(), 0)
  flat = iterator()
  assert data.stack(flat, 1) is flat  # a step with steps_per_call=1 takes flat batches


def test_prefetch_places_stacked_groups_for_the_step():
  placement = Placement.pmap(jax.local_devices()[:4])
  with data.DevicePrefetcher(data.stack(iterator(batch_size=8), 2), placement=placement) as prefetched:
    group = next(prefetched)
  assert group["image"].shape == (4, 2, 2, 8, 8, 1)  # [devices, steps, per_device, ...]


def test_prefetch_reraises_errors_from_the_iterator():
  class Failing:
    def get_state(self):
      return {}

    def __iter__(self):
      yield {"image": np.zeros((2, 8, 8, 1), np.float32)}
      raise RuntimeError("disk on fire")

  prefetched = data.DevicePrefetcher(Failing())
  next(prefetched)
  with pytest.raises(RuntimeError, match="disk on fire"):
    next(prefetched)
  with pytest.raises(StopIteration):
    next(prefetched)
  prefetched.close()
