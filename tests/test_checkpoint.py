"""Orbax checkpoints: round trip, retention, incomplete and damaged checkpoints, mismatch, teachers."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import checkpoint as ckpt
from jaxkd.models import MLP, ResNet
from jaxkd.state import create_train_state


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
  assert info["step"] == 7 and info["fingerprint"] == ckpt.fingerprint(variables)
  same, _ = ckpt.load_variables(tmp_path / "teacher" / "7")
  assert_trees_equal(same, variables)
  assert ckpt.fingerprint(variables) != ckpt.fingerprint(jax.tree.map(lambda x: x + 1, variables))
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    ckpt.load_variables(tmp_path / "teacher", step=3)
  with pytest.raises(FileNotFoundError, match="no checkpoint directory at"):
    ckpt.load_variables(tmp_path / "nowhere")
