"""Tests for jaxkd.train (the step) on 4 fake CPU devices (tests/conftest.py sets the XLA flag)."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxkd import train
from jaxkd.losses import distillation_loss, kd_loss
from jaxkd.modeling import from_nnx
from jaxkd.models import MLP, ResNet
from jaxkd.placement import Placement, as_placement, pmean_inexact, psum
from jaxkd.state import TrainState, create_train_state

NUM_DEVICES = 4
NUM_CLASSES = 5

pytestmark = pytest.mark.skipif(
  jax.device_count() < NUM_DEVICES,
  reason="needs 4 (fake CPU) devices: XLA_FLAGS=--xla_force_host_platform_device_count=4 before JAX starts",
)


class SyncBNNet(nn.Module):
  """Dense-BatchNorm-Dense; BatchNorm synchronised over 'data', so any split of the batch gives the same numbers."""

  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name="data")(x)
    return nn.Dense(self.num_classes)(nn.relu(x))


def _data(batch_size: int = 32, seed: int = 0, num_classes: int = NUM_CLASSES) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    "image": rng.normal(size=(batch_size, 4, 4, 1)).astype(np.float32),
    "label": rng.integers(0, num_classes, size=(batch_size,)).astype(np.int32),
  }


@functools.cache
def _teacher(num_classes: int = NUM_CLASSES):
  """A fixed teacher, shared by the tests (steps never donate or change teacher variables)."""
  teacher = MLP(hidden_sizes=(32,), num_classes=num_classes)
  return teacher, jax.jit(teacher.init)(jax.random.key(1), np.zeros((1, 4, 4, 1), np.float32))


def _state(model: nn.Module | None = None, tx=None) -> TrainState:
  model = model or SyncBNNet()
  tx = tx or optax.sgd(0.1, momentum=0.9)
  return create_train_state(model, tx, np.zeros((1, 4, 4, 1), np.float32), rng=jax.random.key(0))


PLACEMENTS = ("single", "pmap", "data_parallel")


def _place(placement: str, state, teacher_variables):
  """Puts state and teacher where the placement wants them; batches go in flat, in every placement."""
  placement = as_placement(placement)
  return placement.put(state), placement.put(teacher_variables)


def _host(placement: str, tree):
  return as_placement(placement).to_host(tree)


def _max_abs_diff(a, b) -> float:
  """Largest elementwise difference between two pytrees of the same structure."""
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  return max(jax.tree.leaves(diffs))


def _run(placement, batches, *, model=None, **step_kwargs):
  teacher, teacher_variables = _teacher()
  step = train.make_train_step(teacher_apply_fn=teacher.apply, placement=placement, **step_kwargs)
  state, placed_teacher = step.placement.put(_state(model)), step.placement.put(teacher_variables)
  for batch in batches:
    state, metrics = step(state, placed_teacher, batch)
  return step.placement.to_host(state), step.placement.to_host(metrics)


def test_pmap_data_parallel_and_single_device_agree():
  batches = [_data(seed=s) for s in range(3)]
  kwargs = dict(temperature=2.0, alpha=0.7)
  results = {mode: _run(mode, batches, **kwargs) for mode in PLACEMENTS}
  # Meshes of 1, 2 and 4 devices: one device is a one-device mesh, not another code path.
  for n in (1, 2):
    results[f"mesh{n}"] = _run(Placement.data_parallel(jax.devices()[:n]), batches, **kwargs)
  single_state, single_metrics = results["single"]
  assert int(single_state.step) == 3
  for mode in ("pmap", "data_parallel", "mesh1", "mesh2"):
    state, metrics = results[mode]
    assert int(state.step) == 3
    # BatchNorm statistics included: they are part of what must agree.
    assert _max_abs_diff(state.params, single_state.params) < 1e-5, mode
    assert _max_abs_diff(state.batch_stats, single_state.batch_stats) < 1e-5, mode
    for name in single_metrics:
      np.testing.assert_allclose(metrics[name], single_metrics[name], atol=1e-5, err_msg=f"{mode}: {name}")
  # The state did move, so agreement is not trivially about an unchanged state.
  assert _max_abs_diff(single_state.params, _state().params) > 1e-3


@pytest.mark.parametrize("parallel", ["single", "pmap", "data_parallel"])
@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_step_traces_once_and_donates_the_state(parallel, skip_nonfinite):
  """What the benchmarks rely on: no retracing from step to step, and the state's buffers reused, not copied."""
  teacher, teacher_variables = _teacher()
  traces = []

  def counting_apply(variables, images, **kwargs):
    traces.append(type(images).__name__)  # runs when traced (and in the input check's eval_shape), not per call
    return teacher.apply(variables, images, **kwargs)

  step = train.make_train_step(teacher_apply_fn=counting_apply, placement=parallel, skip_nonfinite=skip_nonfinite)
  state, placed_teacher = _place(parallel, _state(), teacher_variables)
  state, _ = step(state, placed_teacher, _data(seed=1))
  traced = len(traces)
  assert traced > 0
  for seed in range(2, 5):
    previous = state
    state, _ = step(state, placed_teacher, _data(seed=seed))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(previous.params)), "state not donated"
  assert len(traces) == traced, f"retraced: {traces}"
  assert int(_host(parallel, state).step) == 4


def test_resnet_with_per_device_batchnorm_pmap_matches_shard_map():
  """jaxkd.models.ResNet keeps per-device BatchNorm statistics: pmap and shard_map still agree."""
  model = ResNet(stage_sizes=(1,), widths=(4,), stem_width=4, num_classes=NUM_CLASSES)
  rng = np.random.default_rng(0)
  batches = [
    {"image": rng.normal(size=(8, 8, 8, 3)).astype(np.float32), "label": np.arange(8, dtype=np.int32) % NUM_CLASSES}
    for _ in range(2)
  ]
  teacher_variables = {"w": np.asarray(rng.normal(size=(8 * 8 * 3, NUM_CLASSES)), np.float32)}

  def teacher_apply(variables, images, *, train=False):
    return images.reshape(images.shape[0], -1) @ variables["w"]

  results = {}
  for parallel in ("pmap", "data_parallel"):
    state = create_train_state(model, optax.sgd(0.1), batches[0]["image"][:1], rng=jax.random.key(0))
    step = train.make_train_step(teacher_apply_fn=teacher_apply, placement=parallel)
    state, placed_teacher = _place(parallel, state, teacher_variables)
    # Said once, at the first step: the statistics depend on how the batch is split.
    with pytest.warns(UserWarning, match=r"BatchNorm statistics are computed per device \(4 devices.*axis_name='data'"):
      state, _ = step(state, placed_teacher, batches[0])
    for batch in batches[1:]:
      state, _ = step(state, placed_teacher, batch)
    results[parallel] = _host(parallel, state)
  assert jax.tree.leaves(results["pmap"].batch_stats)
  assert _max_abs_diff(results["pmap"].params, results["data_parallel"].params) < 1e-5
  assert _max_abs_diff(results["pmap"].batch_stats, results["data_parallel"].batch_stats) < 1e-5


def test_dropout_is_reproducible_and_differs_across_devices():
  model = MLP(hidden_sizes=(32,), num_classes=NUM_CLASSES, dropout_rate=0.5)
  one_shard = _data(8)
  same_on_every_device = jax.tree.map(lambda x: np.concatenate([x] * NUM_DEVICES), one_shard)

  def run(parallel, batch):
    teacher, teacher_variables = _teacher()
    step = train.make_train_step(teacher_apply_fn=teacher.apply, placement=parallel)
    state, teacher_variables = _place(parallel, _state(model, optax.sgd(0.1)), teacher_variables)
    for _ in range(2):
      state, _ = step(state, teacher_variables, batch)
    return _host(parallel, state).params

  first, again = run("pmap", same_on_every_device), run("pmap", same_on_every_device)
  assert _max_abs_diff(first, again) == 0.0, "same seed, same data: bit-identical"
  # With one dropout key for all devices, identical shards would give the single-device result (whose key
  # is device 0's); different keys per device make the averaged gradient differ.
  assert _max_abs_diff(first, run("single", one_shard)) > 1e-4


def test_training_mask_ignores_padding():
  model = MLP(hidden_sizes=(32,), num_classes=NUM_CLASSES)  # no BatchNorm: padding cannot leak into statistics
  real = _data(30, seed=4)
  padded = {
    "image": np.concatenate([real["image"], np.full((2, 4, 4, 1), 7.0, np.float32)]),
    "label": np.concatenate([real["label"], np.full(2, 3, np.int32)]),
    "mask": np.arange(32) < 30,
  }
  results = {}
  for parallel, batch in (("single", real), ("pmap", padded)):
    teacher, teacher_variables = _teacher()
    step = train.make_train_step(teacher_apply_fn=teacher.apply, placement=parallel)
    state, teacher_variables = _place(parallel, _state(model), teacher_variables)
    for _ in range(2):
      state, metrics = step(state, teacher_variables, batch)
    results[parallel] = _host(parallel, (state.params, metrics))
  assert _max_abs_diff(results["pmap"], results["single"]) < 1e-5


def test_offline_cached_logits_match_online_teacher():
  teacher, teacher_variables = _teacher()
  batch = _data()
  online = train.make_train_step(teacher_apply_fn=teacher.apply, temperature=3.0, placement="single")
  offline = train.make_train_step(temperature=3.0, placement="single")
  cached = {**batch, "teacher_logits": np.asarray(teacher.apply(teacher_variables, batch["image"]))}
  state_online, metrics_online = online(_state(), teacher_variables, batch)
  state_offline, metrics_offline = offline(_state(), None, cached)
  assert _max_abs_diff(state_online.params, state_offline.params) < 1e-6
  assert set(metrics_online) == set(metrics_offline)
  for name in metrics_online:
    np.testing.assert_allclose(metrics_offline[name], metrics_online[name], atol=1e-6, err_msg=name)


def test_no_teacher_trains_with_cross_entropy():
  step = train.make_train_step(placement="single", alpha=0.3)
  state, metrics = step(_state(), None, _data())
  assert set(metrics) == {"loss", "ce", "accuracy", "grad_norm", "nonfinite", "loss/ce", "weight/ce"}
  # The loss is the plain cross-entropy, whatever alpha says.
  np.testing.assert_allclose(metrics["loss"], metrics["ce"], rtol=1e-6)


def test_teacher_is_frozen_and_gets_no_gradient():
  teacher, teacher_variables = _teacher()
  before = jax.tree.map(np.array, teacher_variables)
  step = train.make_train_step(teacher_apply_fn=teacher.apply, placement="single")
  state = _state()
  for seed in range(3):
    state, _ = step(state, teacher_variables, _data(seed=seed))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(teacher_variables), before)

  no_donation = train.make_train_step(teacher_apply_fn=teacher.apply, placement="single", donate=False)
  state = _state()
  grads = jax.grad(lambda variables: no_donation(state, variables, _data())[1]["loss"])(teacher_variables)
  assert jax.tree.leaves(grads)
  for leaf in jax.tree.leaves(grads):
    assert not np.any(np.asarray(leaf)), "the teacher must get exactly zero gradient"


def test_student_learns_from_soft_targets_only():
  """alpha=1 and every label 0: only the teacher's soft targets carry information."""
  num_classes = 4

  def teacher_apply(variables, images, *, train=False):
    del train
    return 4.0 * images.reshape(images.shape[0], -1) @ variables["w"]  # a sharp linear teacher

  teacher_variables = {"w": jax.random.normal(jax.random.key(7), (16, num_classes))}
  rng = np.random.default_rng(3)
  images = rng.normal(size=(256, 4, 4, 1)).astype(np.float32)
  held_out = {"image": rng.normal(size=(256, 4, 4, 1)).astype(np.float32), "label": np.zeros(256, np.int32)}
  student = MLP(hidden_sizes=(32,), num_classes=num_classes)
  state = create_train_state(student, optax.adam(1e-2), images[:1], rng=jax.random.key(0))
  step = train.make_train_step(teacher_apply_fn=teacher_apply, temperature=2.0, alpha=1.0, placement="single")
  evaluate = train.make_eval_step(teacher_apply_fn=teacher_apply, placement="single")
  before = train.summarize_eval(evaluate(state, teacher_variables, held_out))
  for i in range(150):
    rows = slice((i % 4) * 64, (i % 4 + 1) * 64)
    state, metrics = step(state, teacher_variables, {"image": images[rows], "label": np.zeros(64, np.int32)})
  after = train.summarize_eval(evaluate(state, teacher_variables, held_out))
  # Threshold: 90% top-1 agreement with the teacher on held-out inputs (chance is about 25%).
  assert after["agreement"] >= 0.9, (before, after)
  assert after["agreement"] > before["agreement"] + 0.3
  assert float(metrics["ce"]) > 0.0 and float(metrics["kd_loss"]) < 0.5


def test_nnx_student_and_nnx_teacher():
  class NNXNet(nnx.Module):
    def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
      self.hidden = nnx.Linear(16, 32, rngs=rngs)
      self.norm = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
      self.dropout = nnx.Dropout(0.1, rngs=rngs)
      self.out = nnx.Linear(32, num_classes, rngs=rngs)

    def __call__(self, x):
      x = x.reshape((x.shape[0], -1))
      return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))

  teacher_apply, teacher_variables = from_nnx(NNXNet(NUM_CLASSES, rngs=nnx.Rngs(1)))
  teacher_before = jax.tree.map(np.array, teacher_variables)
  state = create_train_state(NNXNet(NUM_CLASSES, rngs=nnx.Rngs(0)), optax.adam(1e-2), rng=jax.random.key(0))
  stats_before = jax.tree.map(np.array, state.batch_stats)
  assert jax.tree.leaves(stats_before), "BatchStat variables go to state.batch_stats"
  step = train.make_train_step(teacher_apply_fn=teacher_apply, temperature=2.0, alpha=1.0, placement="pmap")
  state, teacher_variables = as_placement("pmap").put(state), as_placement("pmap").put(teacher_variables)
  batch = _data(64)
  losses = []
  for _ in range(30):
    state, metrics = step(state, teacher_variables, batch)
    losses.append(float(as_placement("pmap").unreplicate(metrics)["kd_loss"]))
  assert losses[-1] < 0.5 * losses[0], losses
  final = as_placement("pmap").unreplicate(state)
  assert _max_abs_diff(final.batch_stats, stats_before) > 1e-3, "running statistics must update"
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(as_placement("pmap").unreplicate(teacher_variables)), teacher_before
  )


@pytest.mark.parametrize("parallel", ["single", "pmap", "data_parallel"])
def test_compiles_once(parallel):
  def loss_fn(student_logits, teacher_logits, labels):
    return distillation_loss(student_logits, teacher_logits, labels, 2.0, 0.5)

  chex.clear_trace_counter()  # the counter is global: start from zero in each parametrisation
  counted = chex.assert_max_traces(loss_fn, n=1)
  teacher, teacher_variables = _teacher()
  step = train.make_train_step(teacher_apply_fn=teacher.apply, loss_fn=counted, placement=parallel)
  state, teacher_variables = _place(parallel, _state(), teacher_variables)
  for seed in range(3):
    state, _ = step(state, teacher_variables, _data(seed=seed))
  assert int(np.asarray(_host(parallel, state.step))) == 3


def test_one_device_axis_has_no_all_reduce():
  # A one-participant all-reduce is kept by XLA and copied every gradient buffer each step; on a one-device axis
  # the sum is the value itself, so the step must not emit the collective (benchmarks/README.md).
  def body(x):
    return psum(x, "batch"), pmean_inexact(x, "batch")

  one = jax.pmap(body, axis_name="batch", devices=jax.local_devices()[:1])
  hlo_one = one.lower(jnp.ones((1, 8))).as_text()
  hlo_all = jax.pmap(body, axis_name="batch").lower(jnp.ones((jax.local_device_count(), 8))).as_text()
  assert "all_reduce" not in hlo_one and "all-reduce" not in hlo_one
  assert "all_reduce" in hlo_all or "all-reduce" in hlo_all
  np.testing.assert_array_equal(one(jnp.arange(8.0)[None])[0], jnp.arange(8.0)[None])


def test_nonfinite_loss_skips_the_update():
  teacher, teacher_variables = _teacher()
  step = train.make_train_step(teacher_apply_fn=teacher.apply, placement="pmap")
  state, teacher_variables = _place("pmap", _state(), teacher_variables)
  state, _ = step(state, teacher_variables, _data(seed=1))  # momentum is non-zero now
  before = jax.device_get(as_placement("pmap").unreplicate(state))
  bad = _data(seed=2)
  bad["image"][3] = np.nan  # one example on one device poisons the global loss
  state, metrics = step(state, teacher_variables, bad)
  after = jax.device_get(as_placement("pmap").unreplicate(state))
  metrics = as_placement("pmap").unreplicate(metrics)
  assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
  jax.tree.map(np.testing.assert_array_equal, after.batch_stats, before.batch_stats)
  assert int(after.step) == int(before.step) + 1  # documented: the step still counts

  state, metrics = step(state, teacher_variables, _data(seed=3))
  assert float(as_placement("pmap").unreplicate(metrics)["nonfinite"]) == 0.0
  assert _max_abs_diff(as_placement("pmap").unreplicate(state).params, before.params) > 0


@pytest.mark.parametrize("parallel", ["single", "pmap"])
def test_nonfinite_logits_are_wrong_predictions_in_eval_and_train_metrics(parallel):
  """argmax of a NaN row is class 0: such a row must count as incorrect and as disagreement, not as a hit."""
  teacher, teacher_variables = _teacher()
  state, teacher_variables = _place(parallel, _state(), teacher_variables)
  evaluate = train.make_eval_step(teacher_apply_fn=teacher.apply, placement=parallel)
  nan = {"image": np.full((32, 4, 4, 1), np.nan, np.float32), "label": np.zeros(32, np.int32)}  # 0: argmax of NaN
  sums = _host(parallel, evaluate(state, teacher_variables, nan))
  means = train.summarize_eval(sums)
  assert means["count"] == 32 and np.isnan(means["ce"])
  assert (means["accuracy"], means["teacher_accuracy"], means["agreement"]) == (0.0, 0.0, 0.0)
  # Half the rows non-finite: the counts are those of the finite half alone.
  data = _data(seed=4)
  data["label"][:16] = 0
  half = dict(data, image=np.where(np.arange(32)[:, None, None, None] < 16, np.nan, data["image"]))
  finite_half = dict(data, mask=np.arange(32) >= 16)
  got, expected = (_host(parallel, evaluate(state, teacher_variables, b)) for b in (half, finite_half))
  for name in ("correct", "teacher_correct", "agreement"):
    assert int(got[name]) == int(expected[name]), name
  step = train.make_train_step(teacher_apply_fn=teacher.apply, placement=parallel, donate=False)
  _, metrics = step(state, teacher_variables, nan)
  metrics = as_placement(parallel).unreplicate(metrics)
  assert float(metrics["nonfinite"]) == 1.0
  for name in ("accuracy", "teacher_accuracy", "agreement"):
    assert float(metrics[name]) == 0.0, name


def test_skip_nonfinite_false_applies_every_update():
  teacher, teacher_variables = _teacher()
  guarded = train.make_train_step(teacher_apply_fn=teacher.apply, placement="single")
  unguarded = train.make_train_step(teacher_apply_fn=teacher.apply, placement="single", skip_nonfinite=False)
  assert guarded.skip_nonfinite and not unguarded.skip_nonfinite
  # The guard is the conditional and the gradient norm; without it neither is in the program.
  args = (_state(), teacher_variables, _data())
  assert "cond[" in str(jax.make_jaxpr(guarded)(*args))
  assert "cond[" not in str(jax.make_jaxpr(unguarded)(*args))

  # On finite data both take the same step and report the same metrics, less grad_norm.
  state_g, metrics_g = guarded(*args)
  state_u, metrics_u = unguarded(_state(), teacher_variables, _data())
  assert _max_abs_diff(state_g.params, state_u.params) == 0.0
  assert set(metrics_g) - set(metrics_u) == {"grad_norm"}
  for name in metrics_u:
    np.testing.assert_array_equal(metrics_u[name], metrics_g[name], err_msg=name)

  # A non-finite step is reported and, as documented, applied.
  bad = _data(seed=2)
  bad["image"][3] = np.nan
  state_u, metrics_u = unguarded(state_u, teacher_variables, bad)
  assert float(metrics_u["nonfinite"]) == 1.0
  assert not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state_u.params)))


def test_bfloat16_compute():
  seen_dtypes = []

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
      x = x.reshape((x.shape[0], -1))
      logits = nn.Dense(NUM_CLASSES)(nn.relu(nn.Dense(32)(x)))  # dtype=None: computes in the inputs' dtype
      seen_dtypes.append(logits.dtype)
      return logits

  teacher, teacher_variables = _teacher()
  batches = [_data(seed=s) for s in range(3)]
  results = {}
  for dtype in (None, jnp.bfloat16):
    seen_dtypes.clear()
    step = train.make_train_step(teacher_apply_fn=teacher.apply, placement="single", compute_dtype=dtype)
    state = _state(Net(), optax.sgd(0.1))
    for batch in batches:
      state, metrics = step(state, teacher_variables, batch)
    results[dtype] = (state, metrics)
    assert seen_dtypes[-1] == (dtype or jnp.float32)  # the traced student really ran in that dtype
  state, metrics = results[jnp.bfloat16]
  reference_state, reference_metrics = results[None]
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params)), "master params stay float32"
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.opt_state))
  assert metrics["loss"].dtype == jnp.float32
  np.testing.assert_allclose(metrics["loss"], reference_metrics["loss"], rtol=2e-2)
  assert _max_abs_diff(state.params, reference_state.params) < 2e-2


def test_eval_counts_each_real_example_once():
  teacher, teacher_variables = _teacher()
  state = _state()
  state, _ = train.make_train_step(teacher_apply_fn=teacher.apply, placement="single")(
    state, teacher_variables, _data()
  )
  real = _data(30, seed=5)
  padded = {
    "image": np.concatenate([real["image"], np.zeros((2, 4, 4, 1), np.float32)]),
    "label": np.concatenate([real["label"], np.zeros(2, np.int32)]),
    "mask": np.arange(32) < 30,
  }
  expected = train.make_eval_step(teacher_apply_fn=teacher.apply, placement="single")(state, teacher_variables, real)
  assert int(expected["count"]) == 30
  for parallel in ("pmap", "data_parallel"):
    evaluate = train.make_eval_step(teacher_apply_fn=teacher.apply, placement=parallel)
    sums = _host(parallel, evaluate(*_place(parallel, state, teacher_variables), padded))
    assert set(sums) == set(expected)
    for name in ("count", "correct", "teacher_correct", "agreement"):
      assert int(sums[name]) == int(expected[name]), (parallel, name)
    for name in ("ce_sum", "kd_loss_sum"):
      np.testing.assert_allclose(sums[name], expected[name], rtol=1e-5, err_msg=f"{parallel}: {name}")
  # Accumulated over two batches, then averaged.
  total = jax.tree.map(lambda a, b: a + b, expected, expected)
  means = train.summarize_eval(total)
  assert means["count"] == 60
  assert means["accuracy"] == pytest.approx(int(expected["correct"]) / 30)
  assert means["ce"] == pytest.approx(float(expected["ce_sum"]) / 30, rel=1e-6)
  assert set(means) == {"count", "accuracy", "ce", "teacher_accuracy", "agreement", "kd_loss"}


def test_create_train_state():
  # A list-valued attribute makes a linen module unhashable; init must still work.
  state = create_train_state(MLP(hidden_sizes=[8], num_classes=3), optax.sgd(0.1), np.zeros((1, 4)), rng=0)
  assert state.params["Dense_1"]["kernel"].shape == (8, 3)
  assert state.batch_stats == {} and state.step.dtype == jnp.int32 and int(state.step) == 0
  assert jnp.issubdtype(state.rng.dtype, jax.dtypes.prng_key)
  with pytest.raises(ValueError, match="needs example_input"):
    create_train_state(MLP(), optax.sgd(0.1), rng=0)


def test_replicate_round_trip_keeps_typed_keys():
  state = _state()
  replicated = as_placement("pmap").put(state)
  assert replicated.step.shape == (NUM_DEVICES,)
  assert jnp.issubdtype(replicated.rng.dtype, jax.dtypes.prng_key) and replicated.rng.shape == (NUM_DEVICES,)
  back = as_placement("pmap").unreplicate(replicated)
  assert jax.random.key_data(back.rng).tolist() == jax.random.key_data(state.rng).tolist()
  assert _max_abs_diff(back.params, state.params) == 0


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs: ValueError before anything compiles, with the sizes in the message.


def _never_traced(student_logits, teacher_logits, labels):
  raise AssertionError("the step must reject bad input before tracing")


def _bad_step(parallel: str, teacher_num_classes: int | None = NUM_CLASSES):
  teacher_apply, teacher_variables = (None, None)
  if teacher_num_classes is not None:
    teacher, teacher_variables = _teacher(teacher_num_classes)
    teacher_apply = teacher.apply
  step = train.make_train_step(teacher_apply_fn=teacher_apply, loss_fn=_never_traced, placement=parallel)
  return step, teacher_variables


def test_error_pmap_state_not_replicated():
  step, teacher_variables = _bad_step("pmap")
  with pytest.raises(ValueError, match=r"state replicated over the 4 local devices.*placement.put\(state\)"):
    step(_state(), as_placement("pmap").put(teacher_variables), _data())


@pytest.mark.parametrize("placement", ["pmap", "data_parallel"])
def test_error_batch_does_not_divide_over_devices(placement):
  step, teacher_variables = _bad_step(placement)
  state, teacher_variables = _place(placement, _state(), teacher_variables)
  with pytest.raises(ValueError, match=r"batch size 30 of batch\['image'\] does not divide over the 4 devices"):
    step(state, teacher_variables, _data(30))
  with pytest.raises(ValueError, match=r"batch size 30 does not divide over 4 devices"):
    as_placement("pmap").split_for_pmap(_data(30))
  # Placing a batch on a mesh directly names the entry too (JAX's own IndivisibleError did not); pmap's split above.
  if placement == "data_parallel":
    with pytest.raises(ValueError, match=r"batch size 30 of batch\['image'\] does not divide over the 4 devices"):
      as_placement(placement).put_batch(_data(30))


@pytest.mark.parametrize("placement", ["single", "pmap", "data_parallel"])
def test_error_empty_batch(placement):
  step, teacher_variables = _bad_step(placement)
  state, teacher_variables = _place(placement, _state(), teacher_variables)
  empty = {"image": np.zeros((0, 4, 4, 1), np.float32), "label": np.zeros(0, np.int32)}
  teacher, _ = _teacher()
  evaluate = train.make_eval_step(teacher_apply_fn=teacher.apply, placement=placement)
  for run in (step, evaluate):
    with pytest.raises(
      ValueError, match=r"the batch is empty: batch\['image'\] has shape \(0, 4, 4, 1\).*Skip empty batches"
    ):
      run(state, teacher_variables, empty)


def test_error_student_and_teacher_classes_differ():
  step, teacher_variables = _bad_step("single", teacher_num_classes=7)
  with pytest.raises(
    ValueError, match=r"student logits \(32, 5\) \(5 classes\), teacher logits \(32, 7\) \(7 classes\)"
  ):
    step(_state(), teacher_variables, _data())
  offline, _ = _bad_step("single", teacher_num_classes=None)
  cached = {**_data(), "teacher_logits": np.zeros((32, 7), np.float32)}
  with pytest.raises(ValueError, match=r"teacher_logits'\] of shape \(32, 7\).*\(32, 5\) \(5 classes\)"):
    offline(_state(), None, cached)


def test_error_labels_out_of_range():
  step, teacher_variables = _bad_step("single")
  batch = _data()
  batch["label"][4] = NUM_CLASSES
  with pytest.raises(
    ValueError, match=r"labels must be in \[0, num_classes=5\) \(or -100, ignored\), got values in \[0, 5\]"
  ):
    step(_state(), teacher_variables, batch)
  batch["label"][4] = -1
  with pytest.raises(ValueError, match=r"got values in \[-1, 4\]"):
    step(_state(), teacher_variables, batch)
  # Padding rows may hold anything: only real examples are checked.
  batch["mask"] = np.arange(32) != 4
  evaluate = train.make_eval_step(teacher_apply_fn=_teacher()[0].apply, placement="single")
  assert int(evaluate(_state(), teacher_variables, batch)["count"]) == 31


def test_error_labels_do_not_match_logits():
  step, teacher_variables = _bad_step("single")
  batch = {**_data(), "label": np.zeros((32, 2), np.int32)}
  with pytest.raises(ValueError, match=r"student logits of shape \(32, 5\).*labels of shape \(32, 2\)"):
    step(_state(), teacher_variables, batch)
  with pytest.raises(TypeError, match="integer class indices, got dtype float32"):
    step(_state(), teacher_variables, {**_data(), "label": np.zeros(32, np.float32)})


def test_error_two_teacher_sources_and_bad_modes():
  step, teacher_variables = _bad_step("single")
  with pytest.raises(ValueError, match="both teacher_apply_fn and batch\\['teacher_logits'\\]"):
    step(_state(), teacher_variables, {**_data(), "teacher_logits": np.zeros((32, 5), np.float32)})
  with pytest.raises(ValueError, match="placement must be a jaxkd.Placement or one of"):
    train.make_train_step(placement="pjit")
  with pytest.raises(ValueError, match="alpha must be in"):
    train.make_train_step(alpha=1.5)
  # NumPy and JAX scalars are values too (np.array(1.5) once gave the label term weight -0.5).
  with pytest.raises(ValueError, match="alpha must be in"):
    train.make_train_step(alpha=np.array(1.5))
  with pytest.raises(ValueError, match="alpha must be in"):
    train.make_train_step(alpha=jnp.asarray(-0.1))
  with pytest.raises(ValueError, match="temperature must be"):
    train.make_train_step(temperature=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Objectives, schedules, several steps per call.


def test_default_loss_is_distillation_loss_bit_for_bit():
  """make_train_step(temperature, alpha) is the two-term objective; its loss is distillation_loss's, exactly."""
  teacher, teacher_variables = _teacher()
  model = MLP(hidden_sizes=(32,), num_classes=NUM_CLASSES)
  state = _state(model)
  batch = _data()
  step = train.make_train_step(
    teacher_apply_fn=teacher.apply, temperature=3.0, alpha=0.7, placement="single", donate=False
  )
  _, metrics = step(state, teacher_variables, batch)

  # Under jit, as the step is: eager evaluation rounds differently on some CPUs (AVX-512 EPYC: by one ulp) since
  # XLA fuses the compiled expression's reductions differently from op-by-op dispatch.
  @jax.jit
  def expected_loss(params, teacher_variables, batch):
    student_logits = model.apply({"params": params}, batch["image"])
    teacher_logits = teacher.apply(teacher_variables, batch["image"])
    per_example = distillation_loss(student_logits, teacher_logits, batch["label"], 3.0, 0.7)
    return jnp.sum(per_example) / np.float32(32)

  expected = expected_loss(state.params, teacher_variables, batch)
  np.testing.assert_array_equal(np.asarray(metrics["loss"]), np.asarray(expected))
  assert float(metrics["weight/kd"]) == pytest.approx(0.7) and float(metrics["weight/ce"]) == pytest.approx(0.3)


def test_temperature_and_alpha_schedules():
  teacher, teacher_variables = _teacher()
  temperature = optax.linear_schedule(4.0, 1.0, transition_steps=3)
  alpha = optax.linear_schedule(1.0, 0.5, transition_steps=3)
  step = train.make_train_step(
    teacher_apply_fn=teacher.apply, temperature=temperature, alpha=alpha, placement="single", donate=False
  )
  state = _state(MLP(hidden_sizes=(32,), num_classes=NUM_CLASSES))
  logged = []
  for seed in range(4):
    state, metrics = step(state, teacher_variables, _data(seed=seed))
    logged.append((float(metrics["temperature"]), float(metrics["weight/kd"]), float(metrics["weight/ce"])))
  np.testing.assert_allclose(logged, [(4, 1, 0), (3, 5 / 6, 1 / 6), (2, 2 / 3, 1 / 3), (1, 0.5, 0.5)], rtol=1e-6)
  # A constant schedule is the constant: same loss and update.
  constant = train.make_train_step(
    teacher_apply_fn=teacher.apply, temperature=lambda s: 2.0, alpha=lambda s: 0.3, placement="single", donate=False
  )
  plain = train.make_train_step(
    teacher_apply_fn=teacher.apply, temperature=2.0, alpha=0.3, placement="single", donate=False
  )
  a, metrics_a = constant(_state(), teacher_variables, _data())
  b, metrics_b = plain(_state(), teacher_variables, _data())
  np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-6)
  assert _max_abs_diff(a.params, b.params) < 1e-6


def test_loss_fn_sees_the_batch():
  teacher, teacher_variables = _teacher()
  seen = {}

  def loss_fn(student_logits, teacher_logits, labels, *, batch):
    seen.update(batch)
    return jnp.where(batch["weight"] > 0, distillation_loss(student_logits, teacher_logits, labels, 2.0, 0.5), 0.0)

  batch = {**_data(), "weight": np.ones(32, np.float32)}
  step = train.make_train_step(teacher_apply_fn=teacher.apply, loss_fn=loss_fn, placement="single")
  _, metrics = step(_state(), teacher_variables, batch)
  assert "weight" in seen and float(metrics["loss"]) > 0


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_steps_per_call_equals_single_steps_bit_for_bit(placement):
  teacher, teacher_variables = _teacher()
  batches = [_data(seed=s) for s in range(4)]
  model = MLP(hidden_sizes=(32,), num_classes=NUM_CLASSES, dropout_rate=0.2)
  one = train.make_train_step(teacher_apply_fn=teacher.apply, temperature=2.0, placement=placement)
  four = train.make_train_step(teacher_apply_fn=teacher.apply, temperature=2.0, placement=placement, steps_per_call=4)
  state, placed_teacher = _place(placement, _state(model, optax.adam(1e-2)), teacher_variables)
  single_metrics = []
  for batch in batches:
    state, metrics = one(state, placed_teacher, batch)
    single_metrics.append(_host(placement, metrics))
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)  # [4, 32, ...]
  scanned_state, scanned_metrics = four(*_place(placement, _state(model, optax.adam(1e-2)), teacher_variables), stacked)
  state, scanned_state = _host(placement, state), _host(placement, scanned_state)
  assert int(scanned_state.step) == 4
  jax.tree.map(np.testing.assert_array_equal, scanned_state.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, scanned_state.opt_state, state.opt_state)
  scanned_metrics = _host(placement, scanned_metrics)
  for i, metrics in enumerate(single_metrics):
    for name, value in metrics.items():
      np.testing.assert_array_equal(scanned_metrics[name][i], value, err_msg=f"step {i}: {name}")


# ---------------------------------------------------------------------------------------------------------------------
# Values no host check sees (issue 13): a broken teacher or a label on device out of range makes the loss NaN, and
# the guard skips and counts the step instead of training through it.


def _assert_skipped(step, state, teacher_variables, batch):
  """One step on ``batch``: reported non-finite, params, optimizer state and BatchNorm statistics unchanged."""
  placement = step.placement
  before = jax.device_get(placement.to_host(state))
  state, metrics = step(state, teacher_variables, batch)
  after, metrics = jax.device_get(placement.to_host(state)), placement.to_host(metrics)
  assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
  jax.tree.map(np.testing.assert_array_equal, after.batch_stats, before.batch_stats)
  assert int(after.step) == int(before.step) + 1
  return state


def test_cached_teacher_logits_with_a_nan_row_skip_the_update():
  """A NaN row in a logit cache once gave kd_loss 0: at alpha = 1 the step trained on nothing, reported finite."""
  teacher, teacher_variables = _teacher()
  step = train.make_train_step(temperature=2.0, alpha=1.0, placement="data_parallel")
  state = step.placement.put(_state())

  def cached(seed):
    batch = _data(seed=seed)
    return {**batch, "teacher_logits": np.array(teacher.apply(teacher_variables, batch["image"]))}

  state, _ = step(state, None, cached(0))  # momentum is non-zero now
  broken = cached(1)
  broken["teacher_logits"][5] = np.nan  # one row, on one of the 4 devices
  state = _assert_skipped(step, state, None, broken)
  state, metrics = step(state, None, cached(2))
  assert float(metrics["nonfinite"]) == 0.0 and np.isfinite(float(metrics["loss"]))


def test_diverged_teacher_skips_the_update():
  teacher, teacher_variables = _teacher()
  diverged = jax.tree.map(lambda x: np.asarray(x).copy(), teacher_variables)
  kernel = jax.tree.leaves(diverged)[1]
  kernel[0, 0] = np.nan  # every output of the teacher is NaN now
  step = train.make_train_step(teacher_apply_fn=teacher.apply, temperature=2.0, alpha=1.0, placement="single")
  state, _ = step(_state(), teacher_variables, _data())
  assert np.all(np.isnan(teacher.apply(diverged, _data()["image"])))
  state = _assert_skipped(step, state, diverged, _data(seed=1))
  state, metrics = step(state, teacher_variables, _data(seed=2))
  assert float(metrics["nonfinite"]) == 0.0


def test_device_labels_out_of_range_skip_the_update():
  """Host labels raise before compiling; on device, -1 was scored as the last class. Now the loss is NaN, whatever
  the objective reads: also with a loss that ignores the labels."""
  teacher, teacher_variables = _teacher()

  def kd_only(student_logits, teacher_logits, labels):
    del labels
    return kd_loss(student_logits, teacher_logits, 2.0)

  def on_device(labels, mask=None):
    mask = np.ones(32, bool) if mask is None else mask
    return {**_data(seed=1), "label": jnp.asarray(labels), "mask": jnp.asarray(mask)}  # one structure, one compile

  for step in (
    train.make_train_step(teacher_apply_fn=teacher.apply, alpha=1.0, placement="single"),
    train.make_train_step(teacher_apply_fn=teacher.apply, loss_fn=kd_only, placement="single"),
  ):
    state, _ = step(_state(), teacher_variables, on_device(_data()["label"]))
    for label in (-1, NUM_CLASSES):
      labels = _data(seed=1)["label"].copy()
      labels[4] = label
      state = _assert_skipped(step, state, teacher_variables, on_device(labels))
      # A padding row may hold any label, and -100 is ignored: both steps train.
      state, metrics = step(state, teacher_variables, on_device(labels, np.arange(32) != 4))
      assert float(metrics["nonfinite"]) == 0.0
      labels[4] = train.IGNORE_INDEX
      state, metrics = step(state, teacher_variables, on_device(labels))
      assert float(metrics["nonfinite"]) == 0.0
