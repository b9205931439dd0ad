"""The training loop: exact resume, SIGTERM save-and-resume, non-finite handling, best-checkpoint retention, hooks,
steps_per_call, TensorBoard, prefetched data."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import data, train
from jaxkd import state as state_lib
from jaxkd.models import MLP
from jaxkd.placement import Placement
from jaxkd.training import checkpoint as ckpt
from jaxkd.training import hooks
from jaxkd.training import loop as trainer
from jaxkd.training.metrics import read_metrics
from tests.training.test_checkpoint import unwritable_path

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _fit_worker  # noqa: E402

WORKER = pathlib.Path(__file__).parent / "_fit_worker.py"


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def trained(state):
  """What training changes: params, optimizer state, step (not the key or the model)."""
  return leaves((state.params, state.opt_state, state.step))


def test_stop_and_resume_is_bit_identical(tmp_path):
  full = _fit_worker.make_run(tmp_path / "full", 20)
  first = _fit_worker.make_run(tmp_path / "split", 20, stop_after=9)
  assert first.preempted and first.step == 9
  second = _fit_worker.make_run(tmp_path / "split", 20)
  assert second.resumed_from == 9 and second.step == 20 and not second.preempted
  for a, b in zip(leaves(full.state.params), leaves(second.state.params), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(leaves(full.state.opt_state), leaves(second.state.opt_state), strict=True):
    np.testing.assert_array_equal(a, b)
  # Rerunning a finished run does no steps and changes nothing.
  third = _fit_worker.make_run(tmp_path / "split", 20)
  assert third.resumed_from == 20
  for a, b in zip(leaves(full.state.params), leaves(third.state.params), strict=True):
    np.testing.assert_array_equal(a, b)
  assert (tmp_path / "split" / "metrics.jsonl").read_text().count("\n") >= 4


def test_sigterm_saves_then_resumes_exactly(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run(
    [sys.executable, str(WORKER), str(tmp_path / "ref"), "60", str(tmp_path / "ref.npz")],
    check=True,
    env=env,
    timeout=180,
  )
  proc = subprocess.Popen(
    [sys.executable, str(WORKER), str(tmp_path / "run"), "60", str(tmp_path / "run.npz"), "--slow"],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 10):
      time.sleep(0.1)
    assert metrics.exists(), "the training subprocess never logged a step"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 143, output
  assert "stopping at step" in output and "SIGTERM" in output
  stopped = np.load(tmp_path / "run.npz")
  stopped_at = int(stopped["step"])
  assert 10 <= stopped_at < 60 and bool(stopped["preempted"])
  assert ckpt.Checkpointer(tmp_path / "run" / "checkpoints").latest_step() == stopped_at
  # Resume with the same command.
  subprocess.run(
    [sys.executable, str(WORKER), str(tmp_path / "run"), "60", str(tmp_path / "run.npz")],
    check=True,
    env=env,
    timeout=180,
  )
  ref, resumed = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
  assert int(resumed["step"]) == 60
  for key in ref.files:
    np.testing.assert_array_equal(ref[key], resumed[key])


class _NaNAfter:
  def __init__(self, n):
    self.n, self.count = n, 0

  def __next__(self):
    self.count += 1
    images = np.ones((8, 2, 2, 1), np.float32) * (np.nan if self.count > self.n else 1.0)
    return {"image": images, "label": np.zeros(8, np.int32)}


def _tiny_state() -> state_lib.TrainState:
  model = MLP(hidden_sizes=(4,), num_classes=2)
  return state_lib.create_train_state(model, optax.sgd(0.1), np.zeros((1, 2, 2, 1), np.float32), rng=0)


def _fit(state, step, train_data, workdir, **kwargs):
  """Up to 50 single-device steps with checkpoints in ``workdir``, no progress bar."""
  return trainer.fit(
    state,
    train_step=step,
    train_data=train_data,
    num_steps=50,
    workdir=workdir,
    progress=False,
    **kwargs,
  )


def test_nonfinite_steps_are_skipped_then_reported(tmp_path):
  state = _tiny_state()
  step = train.make_train_step(placement="single")
  with pytest.raises(trainer.NonFiniteLossError, match=r"5 consecutive steps up to step 8"):
    _fit(state, step, _NaNAfter(3), tmp_path, log_every=1, max_consecutive_nonfinite=5)
  # The last good parameters were saved, not NaNs.
  restored = ckpt.Checkpointer(tmp_path / "checkpoints").restore(state)
  assert restored.step == 8
  assert all(np.all(np.isfinite(x)) for x in leaves(restored.state.params))


def test_applied_nonfinite_step_stops_before_it_is_saved(tmp_path):
  state = _tiny_state()
  step = train.make_train_step(placement="single", skip_nonfinite=False)
  # Steps 4-6 are NaN and applied; the save due at step 6 must not write that state.
  with pytest.raises(trainer.NonFiniteLossError, match=r"3 step\(s\) up to step 6 .* skip_nonfinite=False"):
    _fit(state, step, _NaNAfter(3), tmp_path, checkpoint_every=3, log_every=100)
  restored = ckpt.Checkpointer(tmp_path / "checkpoints").restore(state)
  assert restored.step == 3
  assert all(np.all(np.isfinite(x)) for x in leaves(restored.state.params))


def test_applied_nan_gradient_with_a_finite_loss_is_not_saved(tmp_path):
  state = _tiny_state()

  def loss_fn(logits, teacher_logits, labels):
    # Finite value (0), NaN gradient (d sqrt(u)/du at 0 is inf, times 0).
    return jnp.sqrt(jnp.sum(logits * 0.0, axis=-1))

  step = train.make_train_step(placement="single", loss_fn=loss_fn, skip_nonfinite=False)
  teacher_logits = np.zeros((8, 2), np.float32)

  class Data:
    def __next__(self):
      return {
        "image": np.ones((8, 2, 2, 1), np.float32),
        "label": np.zeros(8, np.int32),
        "teacher_logits": teacher_logits,
      }

  _, metrics = step(_tiny_state(), None, next(Data()))  # (the step donates its input state)
  assert float(metrics["nonfinite"]) == 0.0  # the loss is finite: only the state shows it
  with pytest.raises(trainer.NonFiniteLossError, match=r"state at step 1 holds non-finite values"):
    _fit(state, step, Data(), tmp_path, checkpoint_every=1, log_every=100)
  assert ckpt.Checkpointer(tmp_path / "checkpoints").restore(state) is None


def test_eval_and_best_checkpoint(tmp_path):
  state = _tiny_state()
  scores = iter([0.2, 0.9, 0.1, 0.3, 0.4])

  class Data:
    def __next__(self):
      return {"image": np.ones((8, 2, 2, 1), np.float32), "label": np.zeros(8, np.int32)}

  result = trainer.fit(
    state,
    train_step=train.make_train_step(placement="single"),
    train_data=Data(),
    num_steps=10,
    workdir=tmp_path,
    eval_fn=lambda s: {"accuracy": next(scores)},
    eval_every=2,
    checkpoint_every=2,
    max_to_keep=1,
    best_metric="accuracy",
    progress=False,
  )
  assert result.eval_metrics == {"accuracy": 0.4}
  manager = ckpt.Checkpointer(tmp_path / "checkpoints", best_metric="accuracy")
  assert manager.all_steps() == [4, 10]
  assert manager.best_step() == 4


class _Ones:
  def __next__(self):
    return {"image": np.ones((8, 2, 2, 1), np.float32), "label": np.zeros(8, np.int32)}


def test_user_hooks_run_at_their_steps_and_see_the_loop(tmp_path):
  seen = {"periodic": [], "every_call": [], "stop": []}

  class Every3(hooks.Hook):
    def run(self, step, loop):
      seen["periodic"].append((step, loop.summary_step == step))

  def every_call(step, loop):
    seen["every_call"].append(step)

  stop_hook = hooks.Callback(lambda step, loop: seen["stop"].append((step, loop.stop_reason)), every=0, on_stop=True)
  trainer.fit(
    _tiny_state(),
    train_step=train.make_train_step(placement="single"),
    train_data=_Ones(),
    num_steps=10,
    log_every=3,
    hooks=[Every3(3), every_call, stop_hook],
    progress=False,
  )
  # Multiples of 3 and the last step; the metrics hook ran before (its summary is this step's).
  assert seen["periodic"] == [(3, True), (6, True), (9, True), (10, True)]
  assert seen["every_call"] == list(range(1, 11))
  assert seen["stop"] == [(10, None)]  # at_end; no stop
  seen["stop"].clear()
  result = trainer.fit(
    _tiny_state(),
    train_step=train.make_train_step(placement="single"),
    train_data=_Ones(),
    num_steps=10,
    stop_after=4,
    hooks=[stop_hook],
    progress=False,
  )
  assert result.preempted and result.step == 4
  assert seen["stop"] == [(4, "stop_after")]
  with pytest.raises(TypeError, match="a hook must be"):
    trainer.fit(
      _tiny_state(),
      train_step=train.make_train_step(placement="single"),
      train_data=_Ones(),
      num_steps=1,
      hooks=[3],
      progress=False,
    )


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
  result = trainer.fit(
    _tiny_state(),
    train_step=train.make_train_step(placement="single"),
    train_data=_Ones(),
    num_steps=6,
    workdir=tmp_path,
    log_every=3,
    eval_fn=lambda state: {"accuracy": 0.5},
    eval_every=3,
    progress=False,
  )
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  records = read_metrics(tmp_path)
  train_records = [r for r in records if "loss" in r]
  eval_records = [r for r in records if "eval_accuracy" in r]
  assert [r["step"] for r in train_records] == [3, 6] and [r["step"] for r in eval_records] == [3, 6]
  assert all({"time", "accuracy", "nonfinite", "steps_per_s"} <= set(r) for r in train_records)
  assert train_records[-1]["steps"] == 3
  assert result.train_metrics["loss"] == pytest.approx(train_records[-1]["loss"])
  assert result.eval_metrics == {"accuracy": 0.5}
  trainer.fit(
    _tiny_state(),
    train_step=train.make_train_step(placement="single"),
    train_data=_Ones(),
    num_steps=3,
    workdir=tmp_path / "plain",
    tensorboard=False,
    progress=False,
  )
  assert (tmp_path / "plain" / "metrics.jsonl").exists() and not (tmp_path / "plain" / "tensorboard").exists()


def _distill_run(workdir, steps_per_call, **kwargs):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((64, 4, 4, 1)).astype(np.float32)
  labels = (images.reshape(64, -1).sum(-1) > 0).astype(np.int32)
  teacher = MLP(hidden_sizes=(8,), num_classes=2)
  teacher_variables = teacher.init(jax.random.key(1), images[:1])
  student = MLP(hidden_sizes=(16,), num_classes=2, dropout_rate=0.2)
  state = state_lib.create_train_state(student, optax.adam(1e-2), images[:1], rng=3)
  step = train.make_train_step(
    teacher_apply_fn=teacher.apply, temperature=2.0, alpha=0.7, placement="single", steps_per_call=steps_per_call
  )
  kwargs = {
    "train_data": _fit_worker.ArrayIterator(images, labels, 16),
    "log_every": 4,
    "checkpoint_every": 4,
    "progress": False,
    **kwargs,
  }
  return trainer.fit(
    state, train_step=step, num_steps=8, teacher_variables=teacher_variables, workdir=workdir, **kwargs
  )


def test_steps_per_call_matches_single_steps(tmp_path):
  single = _distill_run(tmp_path / "one", 1)
  scanned = _distill_run(tmp_path / "four", 4)
  assert scanned.step == single.step == 8
  for a, b in zip(trained(single.state), trained(scanned.state), strict=True):
    np.testing.assert_array_equal(a, b)
  one, four = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "four")
  assert [r["step"] for r in one] == [r["step"] for r in four] == [4, 8]
  for a, b in zip(one, four, strict=True):
    assert a["steps"] == b["steps"] == 4
    for key in ("loss", "ce", "kd_loss", "accuracy", "grad_norm", "nonfinite"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)
  assert ckpt.Checkpointer(tmp_path / "four" / "checkpoints").all_steps() == [4, 8]


@pytest.mark.parametrize(
  "kwargs, message",
  [({"log_every": 3}, r"log_every=3"), ({"checkpoint_every": 6, "eval_every": 2}, r"checkpoint_every=6, eval_every=2")],
)
def test_steps_per_call_needs_multiples(tmp_path, kwargs, message):
  kwargs = {"eval_fn": lambda s: {}, **kwargs}
  with pytest.raises(ValueError, match=message + ".*multiples of train_step.steps_per_call=4"):
    _distill_run(tmp_path, 4, **kwargs)


@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_prefetched_data_resumes_exactly(tmp_path, steps_per_call):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((64, 4, 4, 1)).astype(np.float32)
  labels = (images.reshape(64, -1).sum(-1) > 0).astype(np.int32)

  def prefetched():
    # Stacked before prefetching, so whole [steps, batch, ...] groups are placed ahead (fit does not restack).
    rows = _fit_worker.ArrayIterator(images, labels, 16)
    return data.DevicePrefetcher(data.stack(rows, steps_per_call), placement=Placement.single())

  full = _distill_run(tmp_path / "full", steps_per_call, train_data=prefetched())
  first = _distill_run(tmp_path / "split", steps_per_call, train_data=prefetched(), stop_after=4)
  assert first.preempted and first.step == 4
  # fit repositions the new prefetcher before its first next().
  second = _distill_run(tmp_path / "split", steps_per_call, train_data=prefetched())
  assert second.resumed_from == 4 and second.step == 8
  for a, b in zip(trained(full.state), trained(second.state), strict=True):
    np.testing.assert_array_equal(a, b)


def test_damaged_latest_checkpoint_is_retrained_and_saved_again(tmp_path, capsys):
  first = _fit_worker.make_run(tmp_path, 20)  # saves steps 7, 14, 20 and keeps the last two
  checkpoints = tmp_path / "checkpoints"
  # Damage the final checkpoint's arrays after it was finalised (disk errors, a partial copy).
  for path in (checkpoints / "20" / "model").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(RuntimeError, match="could not be read"):
    ckpt.load_variables(checkpoints, step=20)
  capsys.readouterr()

  second = _fit_worker.make_run(tmp_path, 20)
  out = capsys.readouterr().out
  assert "falling back to the previous checkpoint" in out and "moved the unreadable checkpoint" in out
  assert second.resumed_from == 14 and second.step == 20
  # The retrained final step was saved (not skipped as an existing step), and reads back as the first run ended.
  assert ckpt.Checkpointer(checkpoints).all_steps() == [14, 20]
  variables, info = ckpt.load_variables(checkpoints)
  assert info["step"] == 20
  for a, b in zip(leaves(first.state.params), leaves(variables["params"]), strict=True):
    np.testing.assert_array_equal(a, b)
  # The damaged files are kept aside, outside orbax's steps; a third run resumes from 20 without a fallback.
  assert [p.name.split("-")[0] for p in (checkpoints / ckpt.DAMAGED_DIR).iterdir()] == ["20"]
  third = _fit_worker.make_run(tmp_path, 20)
  assert third.resumed_from == 20 and "falling back" not in capsys.readouterr().out


class _Counting(_Ones):
  """Counts the batches taken: a check that must come before training takes none."""

  def __init__(self):
    self.count = 0

  def __next__(self):
    self.count += 1
    return super().__next__()


def test_resume_with_another_config_is_refused_before_any_step(tmp_path, capsys):
  import ml_collections

  config = {"optimizer": {"learning_rate": 0.1}, "temperature": 2.0, "alpha": 0.7, "hidden": (4,)}
  step = train.make_train_step(placement="single")
  first = _fit(_tiny_state(), step, _Ones(), tmp_path, config=ml_collections.ConfigDict(config), stop_after=2)
  assert first.step == 2
  changed = {**config, "optimizer": {"learning_rate": 0.01}, "temperature": 4.0}
  data = _Counting()
  with pytest.raises(
    ValueError,
    match=r"optimizer\.learning_rate: 0\.1 in the checkpoint, 0\.01 now; temperature: 2\.0 in the checkpoint, "
    r"4\.0 now\. .*allow_config_change=True",
  ):
    _fit(_tiny_state(), step, data, tmp_path, config=changed)
  assert data.count == 0
  # The same config as a plain dict (its tuple comes back from JSON as a list) resumes without complaint.
  same = _fit(_tiny_state(), step, _Ones(), tmp_path, config=config, stop_after=1)
  assert same.resumed_from == 2 and same.step == 3
  capsys.readouterr()
  allowed = _fit(_tiny_state(), step, _Ones(), tmp_path, config=changed, allow_config_change=True)
  assert allowed.resumed_from == 3 and allowed.step == 50
  assert "changed config: optimizer.learning_rate: 0.1 in the checkpoint, 0.01 now" in capsys.readouterr().out
  stored = ckpt.Checkpointer(tmp_path / "checkpoints").restore(_tiny_state()).config
  assert stored["temperature"] == 4.0 and stored["optimizer"] == {"learning_rate": 0.01}


@pytest.mark.parametrize("how", ["read_only", "under_a_file"])
def test_unwritable_workdir_fails_before_any_step(tmp_path, how):
  run = unwritable_path(tmp_path, how)
  parent = run.parent
  data = _Counting()
  try:
    start = time.monotonic()
    with pytest.raises(ckpt.CheckpointDirectoryError, match=f"cannot write checkpoints to {parent / 'run'}"):
      _fit(_tiny_state(), train.make_train_step(placement="single"), data, parent / "run")
    assert time.monotonic() - start < 30  # orbax's own failure came after a 300 s timeout, one save late
  finally:
    if how == "read_only":
      parent.chmod(0o700)
  assert data.count == 0


def test_an_incomplete_iterator_position_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
  """A 'data' item that is valid JSON but not this iterator's position is damage, like damaged arrays."""
  first = _fit_worker.make_run(tmp_path, 20)  # saves steps 7, 14, 20 and keeps the last two
  checkpoints = tmp_path / "checkpoints"
  (checkpoints / "20" / "data" / "metadata").write_text('{"epoch": 0}')  # the position's "index" is gone
  capsys.readouterr()
  second = _fit_worker.make_run(tmp_path, 20)
  out = capsys.readouterr().out
  assert "checkpoint step 20" in out and "iterator position" in out and "falling back" in out
  assert second.resumed_from == 14 and second.step == 20
  assert [p.name.split("-")[0] for p in (checkpoints / ckpt.DAMAGED_DIR).iterdir()] == ["20"]
  for a, b in zip(trained(first.state), trained(second.state), strict=True):
    np.testing.assert_array_equal(a, b)  # retrained from 14 with the right batches: the same run
