"""Orbax checkpoints: round trip, retention, incomplete and damaged checkpoints, mismatch, teachers."""

import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd.artifacts import tree_fingerprint
from jaxkd.models import MLP, ResNet
from jaxkd.state import create_train_state
from jaxkd.training import checkpoint as ckpt


def small_state(hidden=(16,), seed=0, model=None):
  model = model or MLP(hidden_sizes=hidden)
  return create_train_state(model, optax.adam(1e-2), np.zeros((2, 4, 4, 1), np.float32), rng=seed)


def perturbed(state, scale):
  """A state with different numbers in every leaf, as after training."""
  bump = lambda x: x + scale if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
  return state.replace(
    params=jax.tree.map(bump, state.params), opt_state=jax.tree.map(bump, state.opt_state), step=state.step + 7
  )


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bit_exact(tmp_path):
  state = perturbed(small_state(model=ResNet(stage_sizes=(1,), widths=(4,), stem_width=4)), 0.25)
  manager = ckpt.Checkpointer(tmp_path / "ckpt")
  assert manager.restore(state) is None
  manager.save(state, data_state={"epoch": 3, "index": 5}, config={"lr": 0.1}, meta={"teacher": "x"})
  manager.wait_until_finished()
  template = small_state(model=ResNet(stage_sizes=(1,), widths=(4,), stem_width=4), seed=1)
  restored = manager.restore(template)
  assert restored.step == 7
  assert restored.data_state == {"epoch": 3, "index": 5}
  assert restored.config == {"lr": 0.1} and restored.meta == {"teacher": "x"}
  assert_trees_equal(restored.state.params, state.params)
  assert_trees_equal(restored.state.batch_stats, state.batch_stats)
  assert_trees_equal(restored.state.opt_state, state.opt_state)
  assert int(restored.state.step) == 7
  np.testing.assert_array_equal(jax.random.key_data(restored.state.rng), jax.random.key_data(state.rng))
  manager.close()


def test_keeps_last_k_and_best(tmp_path):
  manager = ckpt.Checkpointer(tmp_path, max_to_keep=2, best_metric="accuracy", best_mode="max", async_save=False)
  state = small_state()
  for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7), (5, 0.65)]:
    manager.save(state.replace(step=jnp.int32(step)), metrics={"accuracy": accuracy})
  assert manager.all_steps() == [2, 4, 5]
  assert manager.best_step() == 2
  assert manager.latest_step() == 5
  manager.close()


def test_incomplete_checkpoint_is_ignored(tmp_path, caplog):
  manager = ckpt.Checkpointer(tmp_path, async_save=False)
  state = perturbed(small_state(), 1.0)
  manager.save(state)
  # What a process killed in the middle of a save leaves behind: orbax's unfinalised temporary directory.
  (tmp_path / "9.orbax-checkpoint-tmp-1234567").mkdir()
  (tmp_path / "9.orbax-checkpoint-tmp-1234567" / "model").mkdir()
  manager = ckpt.Checkpointer(tmp_path, async_save=False)
  assert manager.latest_step() == 7
  with caplog.at_level("WARNING"):
    restored = manager.restore(small_state())
  assert restored.step == 7
  assert "incomplete checkpoint" in caplog.text and "9.orbax-checkpoint-tmp" in caplog.text


def test_damaged_latest_falls_back_to_previous(tmp_path, capsys):
  manager = ckpt.Checkpointer(tmp_path, async_save=False)
  state = small_state()
  manager.save(perturbed(state, 1.0))  # step 7
  manager.save(perturbed(state, 1.0).replace(step=jnp.int32(8)))
  for path in (tmp_path / "8" / "train").rglob("*"):
    if path.is_file() and "manifest" in path.name or path.suffix == "" and path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b"garbage")
  shutil.rmtree(tmp_path / "8" / "train" / "d", ignore_errors=True)
  restored = ckpt.Checkpointer(tmp_path).restore(small_state())
  assert restored.step == 7
  assert "falling back to the previous checkpoint" in capsys.readouterr().out


def test_mismatched_model_names_the_parameter(tmp_path):
  manager = ckpt.Checkpointer(tmp_path, async_save=False)
  manager.save(small_state(hidden=(16,)))
  with pytest.raises(
    ckpt.CheckpointMismatchError,
    match=r"model/params/Dense_0/bias has shape \(16,\) in the checkpoint but \(32,\) in the model",
  ) as info:
    manager.restore(small_state(hidden=(32,)))
  assert str(tmp_path) in str(info.value)
  with pytest.raises(
    ckpt.CheckpointMismatchError, match=r"Dense_1/bias has shape \(10,\) in the checkpoint but \(16,\)"
  ):
    manager.restore(small_state(hidden=(16, 16)))
  resnet = small_state(model=ResNet(stage_sizes=(1,), widths=(4,), stem_width=4))
  with pytest.raises(
    ckpt.CheckpointMismatchError, match=r"model/batch_stats/.* is in the model but not in the checkpoint"
  ):
    manager.restore(resnet)


def test_load_teacher_variables_only(tmp_path):
  teacher = perturbed(small_state(hidden=(8,)), 0.5)
  manager = ckpt.Checkpointer(tmp_path / "teacher", async_save=False)
  manager.save(teacher)
  manager.close()
  variables, info = ckpt.load_variables(tmp_path / "teacher")
  assert set(variables) == {"params", "batch_stats"}
  assert_trees_equal(variables["params"], teacher.params)
  assert info["step"] == 7 and info["fingerprint"] == tree_fingerprint(variables)[: ckpt.FINGERPRINT_DIGITS]
  same, _ = ckpt.load_variables(tmp_path / "teacher" / "7")
  assert_trees_equal(same, variables)
  assert tree_fingerprint(variables) != tree_fingerprint(jax.tree.map(lambda x: x + 1, variables))
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    ckpt.load_variables(tmp_path / "teacher", step=3)
  with pytest.raises(FileNotFoundError, match="no checkpoint directory at"):
    ckpt.load_variables(tmp_path / "nowhere")


def _random_bits(seed):
  """A 16-256-10 MLP state with params of random bits at step 7 + seed.

  Zstd stores random bits uncompressed, so bytes flipped in them still decode (to other values), and the
  kernels (16 and 10 KiB) are too big for orbax's b-tree nodes, which are CRC-checked: they go to data files.
  """
  rng = np.random.default_rng(seed)
  bits = lambda x: rng.integers(0, 2**32, x.shape, dtype=np.uint32).view(np.float32)  # noqa: E731
  state = small_state(hidden=(256,))
  return state.replace(params=jax.tree.map(bits, state.params), step=jnp.int32(7 + seed))


def _flip_array_bytes(step_dir, count=16):
  """Flips ``count`` bytes in the middle of the largest data file of the step's ``model`` item (inside a kernel)."""
  files = [p for p in (step_dir / "model").rglob("*") if p.is_file() and p.parent.name == "d"]
  path = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  for i in range(middle, middle + count):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def test_flipped_bytes_in_array_data_are_caught(tmp_path, capsys):
  manager = ckpt.Checkpointer(tmp_path, async_save=False)
  good = _random_bits(0)  # step 7
  manager.save(good)
  manager.save(_random_bits(1))  # step 8
  manager.close()
  _flip_array_bytes(tmp_path / "8")

  # load_variables reads no corrupted value: it warns and reads step 7; asked for step 8 it raises.
  variables, info = ckpt.load_variables(tmp_path)
  assert info["step"] == 7
  assert_trees_equal(variables["params"], good.params)
  with pytest.raises(ckpt.CheckpointIntegrityError, match=r"8.*'model' item do not match the SHA-256"):
    ckpt.load_variables(tmp_path, step=8)

  template = small_state(hidden=(256,))
  restored = ckpt.Checkpointer(tmp_path).restore(template)
  assert restored.step == 7
  assert_trees_equal(restored.state.params, good.params)
  out = capsys.readouterr().out
  assert "CheckpointIntegrityError" in out and "falling back to the previous checkpoint" in out
  # The damaged step was moved aside, so a save of step 8 is written again.
  assert [p.name.split("-")[0] for p in (tmp_path / ckpt.DAMAGED_DIR).iterdir()] == ["8"]
  manager = ckpt.Checkpointer(tmp_path, async_save=False)
  assert manager.all_steps() == [7]
  assert manager.save(restored.state.replace(step=jnp.int32(8)))
  assert_trees_equal(manager.restore(template).state.params, good.params)


def test_no_intact_checkpoint_raises_integrity_error(tmp_path):
  manager = ckpt.Checkpointer(tmp_path, async_save=False)
  manager.save(_random_bits(0))
  _flip_array_bytes(tmp_path / "7")
  with pytest.raises(ckpt.CheckpointIntegrityError, match=r"no checkpoint could be read.*move the step directories"):
    manager.restore(small_state(hidden=(256,)))
  assert issubclass(ckpt.CheckpointIntegrityError, ValueError)
  # Nothing is moved when no checkpoint can be read: the cause may be the reader, not the files.
  assert manager.all_steps() == [7] and not (tmp_path / ckpt.DAMAGED_DIR).exists()
  with pytest.raises(ckpt.CheckpointIntegrityError, match="no checkpoint in .* could be read"):
    ckpt.load_variables(tmp_path)


def test_model_in_another_dtype_restores_cast_after_the_check(tmp_path):
  # The digest is of the float32 arrays on disk; a bfloat16 model reads them cast, not as a damaged checkpoint.
  state = perturbed(small_state(), 0.3)
  manager = ckpt.Checkpointer(tmp_path, async_save=False)
  manager.save(state)
  template = small_state()
  template = template.replace(params=jax.tree.map(lambda x: x.astype(jnp.bfloat16), template.params))
  restored = manager.restore(template)
  assert restored.step == 7 and manager.all_steps() == [7]
  for x, y in zip(jax.tree.leaves(restored.state.params), jax.tree.leaves(state.params), strict=True):
    assert x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y).astype(jnp.bfloat16))


def test_checkpoint_without_integrity_record_still_restores(tmp_path, caplog):
  state = perturbed(small_state(), 1.0)
  manager = ckpt.Checkpointer(tmp_path, async_save=False)
  manager.save(state)
  manager.close()
  # What a checkpoint saved before jaxkd recorded digests looks like.
  shutil.rmtree(tmp_path / "7" / "integrity")
  with caplog.at_level("DEBUG", logger="jaxkd.training.checkpoint"):
    restored = ckpt.Checkpointer(tmp_path).restore(small_state())
    variables, _ = ckpt.load_variables(tmp_path)
  assert restored.step == 7
  assert_trees_equal(restored.state.params, state.params)
  assert_trees_equal(variables["params"], state.params)
  assert "no integrity record" in caplog.text


def unwritable_path(tmp_path, how):
  """A checkpoint path this process cannot create: under a read-only directory, or under a file."""
  if how == "read_only":
    if os.geteuid() == 0:
      pytest.skip("root writes into read-only directories; the 'under_a_file' case covers root")
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o500)
    return parent / "run"
  (tmp_path / "a_file").write_text("not a directory")
  return tmp_path / "a_file" / "run"


@pytest.mark.parametrize("how", ["read_only", "under_a_file"])
def test_unwritable_directory_fails_at_once_naming_it(tmp_path, how):
  path = unwritable_path(tmp_path, how) / "checkpoints"
  try:
    start = time.monotonic()
    with pytest.raises(ckpt.CheckpointDirectoryError, match=f"cannot write checkpoints to {path}") as info:
      ckpt.Checkpointer(path)
    assert time.monotonic() - start < 30  # orbax's own failure came after a 300 s timeout
    assert isinstance(info.value, OSError) and "writable" in str(info.value)
  finally:
    if how == "read_only":
      (tmp_path / "read_only").chmod(0o700)  # so that pytest can remove it
