"""Tests for jaxkd.methods on 4 fake CPU devices (tests/conftest.py sets the XLA flag).

Losses are checked against the pure catalogue functions evaluated by hand on features captured with Flax's own
``capture_intermediates``; the parallel modes against one device on the same global batch.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import checkpoint, features, losses, methods, relations, train
from jaxkd.models import CNN, count_params

NUM_DEVICES = 4
NUM_CLASSES = 5
BATCH = 16
NUM_DATA = 40

pytestmark = pytest.mark.skipif(
  jax.device_count() < NUM_DEVICES,
  reason="needs 4 (fake CPU) devices: XLA_FLAGS=--xla_force_host_platform_device_count=4 before JAX starts",
)

TEACHER = CNN(features=(8, 16), dense_size=32, num_classes=NUM_CLASSES)
STUDENT = CNN(features=(4, 8), dense_size=16, num_classes=NUM_CLASSES)


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    "image": rng.normal(size=(BATCH, 8, 8, 1)).astype(np.float32),
    "label": rng.integers(0, NUM_CLASSES, size=(BATCH,)).astype(np.int32),
    "index": rng.permutation(NUM_DATA)[:BATCH].astype(np.int64),
  }


@functools.cache
def _teacher_variables():
  return jax.jit(TEACHER.init)(jax.random.key(1), np.zeros((1, 8, 8, 1), np.float32))


def _state(method: methods.Method, tx=None, rng: int = 0) -> train.TrainState:
  return methods.create_method_state(
    method,
    STUDENT,
    tx or optax.sgd(0.01),
    np.zeros((1, 8, 8, 1), np.float32),
    teacher_apply_fn=TEACHER.apply,
    teacher_variables=_teacher_variables(),
    rng=rng,
    num_data=NUM_DATA,
  )


def _intermediate(collections, layer):
  """A layer's output from Flax's own capture_intermediates=True collection."""
  return collections["intermediates"][layer]["__call__"][0]


# ---------------------------------------------------------------- feature capture


class Sower(nn.Module):
  @nn.compact
  def __call__(self, x, *, train: bool = False):
    h = nn.Dense(3)(x.reshape(x.shape[0], -1))
    self.sow("intermediates", "embedding", 2.0 * h)
    return nn.Dense(NUM_CLASSES)(h)


def test_capture_features_by_layer_name():
  x = _batch()["image"]
  variables = jax.jit(STUDENT.init)(jax.random.key(0), x[:1])
  logits, captured, _ = methods.capture_features(STUDENT.apply, variables, x, ["Conv_1", "Dense_0"])
  params = variables["params"]
  h = nn.max_pool(nn.relu(nn.Conv(4, (3, 3)).apply({"params": params["Conv_0"]}, x)), (2, 2), strides=(2, 2))
  conv_1 = nn.Conv(8, (3, 3)).apply({"params": params["Conv_1"]}, h)
  h = nn.max_pool(nn.relu(conv_1), (2, 2), strides=(2, 2)).reshape(BATCH, -1)
  dense_0 = nn.Dense(16).apply({"params": params["Dense_0"]}, h)
  np.testing.assert_allclose(captured["Conv_1"], conv_1, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(captured["Dense_0"], dense_0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(logits, STUDENT.apply(variables, x), rtol=1e-6, atol=1e-6)

  # A value the model sows into 'intermediates' is found by its name too.
  sower = Sower()
  sower_variables = jax.jit(sower.init)(jax.random.key(0), x[:1])
  _, sown, _ = methods.capture_features(sower.apply, sower_variables, x, ["embedding", "Dense_0"])
  np.testing.assert_allclose(sown["embedding"], 2.0 * sown["Dense_0"], rtol=1e-6)

  with pytest.raises(ValueError, match=r"no student layer 'Conv_9'.*'Conv_0', 'Conv_1'"):
    methods.capture_features(STUDENT.apply, variables, x, ["Conv_9"], what="student")
  with pytest.raises(ValueError, match="no teacher layer 'conv_1'"):
    _state(methods.Method([methods.attention_transfer("Conv_1", "conv_1")]))


# ---------------------------------------------------------------- one step against the pure functions

LR = 0.01
HAND_METHOD = methods.Method(
  [
    methods.cross_entropy(weight=0.5),
    methods.kd(weight=0.9, temperature=4.0),
    methods.attention_transfer(["Conv_0", "Conv_1"], ["Conv_0", "Conv_1"], weight=1000.0),
    methods.fitnet("Conv_1", "Conv_1", weight=100.0),
  ]
)


@pytest.fixture(scope="module")
def one_step():
  state = _state(HAND_METHOD, optax.sgd(LR))
  teacher_variables = _teacher_variables()
  teacher_before = jax.tree.map(np.array, teacher_variables)
  step = methods.make_method_train_step(HAND_METHOD, teacher_apply_fn=TEACHER.apply, parallel="single", donate=False)
  batch = _batch()
  new_state, metrics = step(state, teacher_variables, batch)
  return state, new_state, jax.device_get(metrics), batch, teacher_before


@jax.jit
def _hand_loss(params, batch):
  x, labels = batch["image"], batch["label"]
  student_logits, student = STUDENT.apply(
    {"params": params["student"]}, x, train=True, capture_intermediates=True, mutable=["intermediates"]
  )
  teacher_logits, teacher = TEACHER.apply(
    _teacher_variables(), x, capture_intermediates=True, mutable=["intermediates"]
  )
  regressor = features.HintRegressor(features=16)
  regressed = regressor.apply({"params": params["adapters"]["fitnet"]["regressor"]}, _intermediate(student, "Conv_1"))
  parts = {
    "ce": losses.hard_cross_entropy(student_logits, labels).mean(),
    "kd": losses.kd_loss(student_logits, teacher_logits, 4.0).mean(),
    "at": sum(
      features.attention_transfer_loss(_intermediate(student, layer), _intermediate(teacher, layer))
      for layer in ("Conv_0", "Conv_1")
    ).mean(),
    "fitnet": features.fitnet_loss(regressed, _intermediate(teacher, "Conv_1")).mean(),
  }
  total = 0.5 * parts["ce"] + 0.9 * parts["kd"] + 1000.0 * parts["at"] + 100.0 * parts["fitnet"]
  return total, parts


def test_multi_term_loss_is_the_weighted_sum_of_the_pure_functions(one_step):
  state, new_state, metrics, batch, _ = one_step
  (total, parts), grads = jax.value_and_grad(_hand_loss, has_aux=True)(state.params, batch)
  assert total > 0 and all(float(v) > 0 for v in parts.values())
  np.testing.assert_allclose(metrics["loss"], total, rtol=1e-5)
  for name, value in parts.items():
    np.testing.assert_allclose(metrics[f"loss/{name}"], value, rtol=1e-5, err_msg=name)
  # The update is SGD on the gradient of that sum, adapters included.
  expected = jax.tree.map(lambda p, g: p - LR * g, state.params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new_state.params, expected)
  assert metrics["nonfinite"] == 0


def test_adapters_live_in_the_student_params_and_train_while_the_teacher_stays_untouched(one_step):
  state, new_state, _, batch, teacher_before = one_step
  assert set(state.params) == {"student", "adapters"}
  assert set(state.params["adapters"]) == {"fitnet"}  # CE, KD and AT have no adapter
  regressor_before = state.params["adapters"]["fitnet"]["regressor"]
  regressor_after = new_state.params["adapters"]["fitnet"]["regressor"]
  for before, after in zip(jax.tree.leaves(regressor_before), jax.tree.leaves(regressor_after), strict=True):
    assert not np.allclose(before, after)
  # The state holds the student and its adapters, nothing of the teacher.
  student_count = count_params(STUDENT.init(jax.random.key(0), batch["image"][:1]))
  assert count_params(new_state.params) == student_count + count_params(regressor_after)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, _teacher_variables()), teacher_before)
  # The plain student variables give the logits that the state's apply_fn (and so the eval step) gives.
  plain = methods.student_variables(new_state)
  assert set(plain) == {"params", "batch_stats"} and "adapters" not in plain["params"]
  np.testing.assert_allclose(
    STUDENT.apply(plain, batch["image"]), new_state.apply_fn({"params": new_state.params}, batch["image"]), rtol=1e-6
  )
  sums = train.make_eval_step(parallel="single")(new_state, None, {"image": batch["image"], "label": batch["label"]})
  assert int(sums["count"]) == BATCH


# ---------------------------------------------------------------- parallel modes and CRD

PARALLEL_METHOD = methods.Method(
  [
    methods.cross_entropy(),
    methods.attention_transfer("Conv_1", "Conv_1", weight=1000.0),
    methods.rkd("Dense_0", "Dense_0", weight=1.0),
    methods.crd("Dense_0", "Dense_0", weight=0.8, embed_dim=8, num_negatives=8),
  ]
)


def _run(parallel: str, state: train.TrainState, batches):
  teacher_variables = _teacher_variables()
  # No donation: every mode starts from the same host state.
  step = methods.make_method_train_step(
    PARALLEL_METHOD, teacher_apply_fn=TEACHER.apply, parallel=parallel, donate=False
  )
  if parallel == "pmap":
    state, teacher_variables = train.replicate(state), train.replicate(teacher_variables)
    batches = [train.split_for_pmap(b) for b in batches]
  elif parallel == "shard_map":
    mesh = train.make_mesh()
    state, teacher_variables = train.put_replicated(state, mesh), train.put_replicated(teacher_variables, mesh)
    batches = [train.shard_batch(b, mesh) for b in batches]
  history = []
  for batch in batches:
    state, metrics = step(state, teacher_variables, batch)
    history.append(jax.device_get(train.unreplicate(metrics) if parallel == "pmap" else metrics))
  return jax.device_get(state), history


@pytest.fixture(scope="module")
def parallel_runs():
  initial = jax.device_get(_state(PARALLEL_METHOD, optax.sgd(0.05, momentum=0.9)))
  batches = [_batch(1), _batch(2)]
  runs = {parallel: _run(parallel, initial, batches) for parallel in ("single", "pmap", "shard_map")}
  return initial, batches, runs


def test_pmap_and_shard_map_equal_one_device_for_feature_relation_and_crd_terms(parallel_runs):
  _, _, runs = parallel_runs
  single_state, single_history = runs["single"]
  for parallel in ("pmap", "shard_map"):
    state, history = runs[parallel]
    if parallel == "pmap":
      state = train.unreplicate(state)
    for step, (metrics, expected) in enumerate(zip(history, single_history, strict=True)):
      for key in ("loss", "loss/ce", "loss/at", "loss/rkd", "loss/crd", "grad_norm"):
        np.testing.assert_allclose(
          metrics[key], expected[key], rtol=1e-5, atol=1e-5, err_msg=f"{parallel} {key} {step}"
        )
    assert history[1]["loss/rkd"] != history[0]["loss/rkd"]  # the second step saw updated params and a new batch
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
      (state.params, state.batch_stats),
      (single_state.params, single_state.batch_stats),
    )


def test_crd_memory_is_updated_in_the_step_and_identical_across_replicas(parallel_runs):
  initial, batches, runs = parallel_runs
  memory_before = initial.batch_stats["terms"]["crd"]["memory"]
  replicated = runs["pmap"][0].batch_stats["terms"]["crd"]
  for bank in ("student", "teacher"):
    copies = np.asarray(replicated["memory"][bank])  # [devices, num_data, embed_dim]
    for device in range(1, NUM_DEVICES):
      np.testing.assert_array_equal(copies[device], copies[0])
    seen = np.unique(np.concatenate([b["index"] for b in batches]))
    unseen = np.setdiff1d(np.arange(NUM_DATA), seen)
    changed = ~np.isclose(copies[0], memory_before[bank]).all(axis=-1)
    np.testing.assert_array_equal(np.flatnonzero(changed), seen)
    np.testing.assert_array_equal(copies[0][unseen], memory_before[bank][unseen])
    np.testing.assert_allclose(np.linalg.norm(copies[0][seen], axis=-1), 1.0, rtol=1e-5)
  # log Z was fixed on the first (global) batch, as in the authors' code.
  assert np.all(replicated["log_z_ready"] == 1)
  np.testing.assert_allclose(replicated["log_z"][0], runs["single"][0].batch_stats["terms"]["crd"]["log_z"], rtol=1e-5)


def test_local_and_global_batch_relation_terms_under_pmap():
  method = methods.Method(
    [
      methods.cross_entropy(),
      methods.similarity_preserving("Conv_1", "Conv_1", scope="local", name="sp_local"),
      methods.similarity_preserving("Conv_1", "Conv_1", scope="global", name="sp_global"),
    ]
  )
  state = _state(method)
  batch = _batch(3)
  step = methods.make_method_train_step(method, teacher_apply_fn=TEACHER.apply, parallel="pmap")
  student = methods.student_variables(state)
  _, metrics = step(train.replicate(state), train.replicate(_teacher_variables()), train.split_for_pmap(batch))
  metrics = jax.device_get(train.unreplicate(metrics))
  # CNN features are per-example, so the global batch's features can be sliced into the devices' batches.
  _, student_features, _ = methods.capture_features(STUDENT.apply, student, batch["image"], ["Conv_1"])
  _, teacher_features, _ = methods.capture_features(TEACHER.apply, _teacher_variables(), batch["image"], ["Conv_1"])
  s, t = student_features["Conv_1"], teacher_features["Conv_1"]
  per_device = [
    relations.similarity_preserving_loss(s[i : i + BATCH // NUM_DEVICES], t[i : i + BATCH // NUM_DEVICES])
    for i in range(0, BATCH, BATCH // NUM_DEVICES)
  ]
  np.testing.assert_allclose(metrics["loss/sp_local"], np.mean(per_device), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/sp_global"], relations.similarity_preserving_loss(s, t), rtol=1e-5)
  assert not np.isclose(metrics["loss/sp_local"], metrics["loss/sp_global"], rtol=1e-3)


# ---------------------------------------------------------------- checkpoints and errors


def test_checkpoint_round_trip_keeps_adapters_and_crd_memory(parallel_runs, tmp_path):
  trained = train.unreplicate(parallel_runs[2]["pmap"][0])
  manager = checkpoint.Checkpointer(tmp_path / "checkpoints", async_save=False)
  manager.save(trained)
  manager.close()
  template = _state(PARALLEL_METHOD, optax.sgd(0.05, momentum=0.9), rng=7)
  restored = checkpoint.Checkpointer(tmp_path / "checkpoints").restore(template)
  assert restored is not None and restored.step == 2
  assert set(restored.state.params["adapters"]) == {"crd"}
  for saved, loaded in [
    (trained.params, restored.state.params),
    (trained.batch_stats, restored.state.batch_stats),
    (trained.opt_state, restored.state.opt_state),
  ]:
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(saved))
  # A checkpoint read for inference gives the plain student through student_variables.
  variables, _ = checkpoint.load_variables(tmp_path / "checkpoints")
  images = _batch()["image"]
  np.testing.assert_allclose(
    STUDENT.apply(methods.student_variables(variables), images),
    STUDENT.apply(methods.student_variables(trained), images),
    rtol=1e-6,
  )


def test_errors(parallel_runs):
  with pytest.raises(ValueError, match=r"distinct.*\['kd'\]"):
    methods.Method([methods.kd(), methods.kd()])
  with pytest.raises(ValueError, match="num_data"):
    methods.create_method_state(
      methods.Method([methods.crd("Dense_0", "Dense_0", num_negatives=4)]),
      STUDENT,
      optax.sgd(0.1),
      np.zeros((1, 8, 8, 1), np.float32),
      teacher_apply_fn=TEACHER.apply,
      teacher_variables=_teacher_variables(),
      rng=0,
    )
  with pytest.raises(ValueError, match="not a method state"):
    methods.student_variables({"params": {"Conv_0": {}}, "batch_stats": {}})
  with pytest.raises(ValueError, match="scope"):
    methods.rkd("Dense_0", "Dense_0", scope="example")
  # CRD needs each example's dataset index; the step says where to get it (at trace time, before compiling).
  step = methods.make_method_train_step(PARALLEL_METHOD, teacher_apply_fn=TEACHER.apply, parallel="single")
  batch = {k: v for k, v in _batch().items() if k != "index"}
  with pytest.raises(ValueError, match="include_index=True"):
    step(parallel_runs[0], _teacher_variables(), batch)


# ---------------------------------------------------------------- the experiment, end to end


def test_methods_experiment_tiny(tmp_path_factory, tmp_path):
  from experiments import methods as experiment
  from tests.test_datasets import write_idx_dir

  source = tmp_path_factory.mktemp("idx")
  write_idx_dir(source)
  config = experiment.get_config()
  config.source_dir, config.data_dir = str(source), str(tmp_path_factory.mktemp("tfds"))
  config.validation_size = 100
  config.batch_size = 64
  config.parallel = "single"
  config.teacher_features, config.teacher_dense, config.student_features, config.student_dense = (4, 4), 8, (2, 2), 4
  config.teacher_epochs = config.student_epochs = 0.5
  config.methods = ("kd", "crd")
  config.crd_negatives = 16
  experiment.run(config, tmp_path)
  for name in ["results.json", "results.md", "methods.png", "crd/seed0/metrics.jsonl"]:
    assert (tmp_path / name).exists(), name
  saved = common_read(tmp_path / "results.json")
  assert [row["method"] for row in saved["rows"]][:2] == ["teacher", "student from scratch"]
  assert set(saved["methods"]) == {"kd", "crd"}
  assert saved["methods"]["crd"]["loss"] == "CE 1 + CRD 0.8"
  # Adapters are not counted as student parameters.
  assert {r["params"] for m in saved["methods"].values() for r in m["runs"]} == {
    saved["methods"]["kd"]["runs"][0]["params"]
  }
  logged = (tmp_path / "crd" / "seed0" / "metrics.jsonl").read_text()
  assert '"loss/crd"' in logged and '"loss/ce"' in logged
  before = logged
  experiment.run(config, tmp_path)  # finished sub-runs are skipped
  assert (tmp_path / "crd" / "seed0" / "metrics.jsonl").read_text() == before


def common_read(path):
  import json

  return json.loads(path.read_text())


def test_cifar100_pair_traces_every_method_at_its_shapes():
  # The CIFAR-100 setting needs a GPU and tfds's cifar100, neither available here: check the part that can break
  # without them, that every method's layer names exist in resnet32x4/resnet8x4 and the whole step traces at
  # 32x32x3 with 100 classes (abstract evaluation only: no parameters are materialised, nothing is computed).
  from experiments import methods as methods_exp

  config = methods_exp.get_config()
  config.dataset = "cifar100"
  pair = methods_exp.make_pair(config, 100)
  batch_size = 4
  example = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  teacher_variables = jax.eval_shape(lambda x: pair.teacher.init(jax.random.key(0), x, train=False), example)
  batch = {
    "image": jax.ShapeDtypeStruct((batch_size, 32, 32, 3), jnp.float32),
    "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    "index": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
  }
  for name in methods_exp.ALL_METHODS:
    method = methods_exp.build_method(name, pair, config, steps=100)

    def init(teacher_variables, method=method):
      return methods.create_method_state(
        method,
        pair.student,
        optax.adam(1e-3),
        np.zeros((1, 32, 32, 3), np.float32),
        teacher_apply_fn=pair.teacher.apply,
        teacher_variables=teacher_variables,
        rng=0,
        num_data=50000,
      )

    state = jax.eval_shape(init, teacher_variables)
    step = methods.make_method_train_step(method, teacher_apply_fn=pair.teacher.apply, parallel="single")
    _, metrics = jax.eval_shape(step, state, teacher_variables, batch)
    assert metrics["loss"].shape == () and "accuracy" in metrics, name
