"""Any model that returns logits trains through make_train_step: flags, outputs, inputs, NNX (jaxkd.modeling)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxkd import modeling, train
from jaxkd.state import create_train_state

NUM_CLASSES = 5


def _data(batch_size: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    "image": rng.normal(size=(batch_size, 4, 4, 1)).astype(np.float32),
    "label": rng.integers(0, NUM_CLASSES, size=(batch_size,)).astype(np.int32),
  }


class Training(nn.Module):
  """Keras-style flag name, and dropout that must be on only in train mode."""

  @nn.compact
  def __call__(self, x, training: bool = False):
    x = nn.Dense(16)(x.reshape(x.shape[0], -1))
    x = nn.Dropout(0.5, deterministic=not training)(x)
    return nn.Dense(NUM_CLASSES)(x)


class Deterministic(nn.Module):
  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    x = nn.Dense(16)(x.reshape(x.shape[0], -1))
    x = nn.Dropout(0.5, deterministic=deterministic)(x)
    return nn.Dense(NUM_CLASSES)(x)


class NoFlag(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))


class TupleOut(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    features = nn.Dense(16)(x.reshape(x.shape[0], -1))
    return nn.Dense(NUM_CLASSES)(features), features


class DictOut(nn.Module):
  key: str = "logits"

  @nn.compact
  def __call__(self, x, train: bool = False):
    features = nn.Dense(16)(x.reshape(x.shape[0], -1))
    return {"features": features, self.key: nn.Dense(NUM_CLASSES)(features)}


@pytest.mark.parametrize("model", [Training(), Deterministic(), NoFlag(), TupleOut(), DictOut()], ids=type)
def test_any_flag_and_output_trains(model):
  teacher = NoFlag()
  teacher_variables = jax.jit(teacher.init)(jax.random.key(1), _data()["image"])
  state = create_train_state(model, optax.adam(1e-2), _data()["image"], rng=0)
  step = train.make_train_step(teacher_apply_fn=teacher, temperature=2.0, alpha=1.0, placement="single")
  losses = []
  for _ in range(25):
    state, metrics = step(state, teacher_variables, _data())
    losses.append(float(metrics["kd_loss"]))
  assert losses[-1] < 0.5 * losses[0], losses


def test_train_flag_is_set_per_mode():
  seen = []

  class Spy(nn.Module):
    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
      seen.append(deterministic)
      return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))

  state = create_train_state(Spy(), optax.sgd(0.1), _data()["image"], rng=0)
  assert state.model.train_flag == "deterministic"
  seen.clear()
  train.make_train_step(placement="single", donate=False)(state, None, _data())
  assert seen[-1] is False  # traced in train mode: deterministic=False (the input check's shape run is eval mode)
  seen.clear()
  train.make_eval_step(placement="single")(state, None, _data())
  assert seen and set(seen) == {True}


def test_output_mismatches_say_how_to_adapt():
  state = create_train_state(DictOut(key="scores"), optax.sgd(0.1), _data()["image"], rng=0, logits="scores")
  state, metrics = train.make_train_step(placement="single")(state, None, _data())
  assert np.isfinite(float(metrics["loss"]))
  with pytest.raises(ValueError, match=r"returns a dict with keys \['features', 'scores'\].*logits='<key>'"):
    create_train_state(DictOut(key="scores"), optax.sgd(0.1), _data()["image"], rng=0)
    train.make_train_step(placement="single")(
      create_train_state(DictOut(key="scores"), optax.sgd(0.1), _data()["image"], rng=0), None, _data()
    )
  with pytest.raises(ValueError, match=r"reads batch entries \['tokens'\] but the batch has no \['tokens'\]"):
    state = create_train_state(NoFlag(), optax.sgd(0.1), _data()["image"], rng=0)
    bad = create_train_state(NoFlag(), optax.sgd(0.1), {"tokens": _data()["image"]}, rng=0, inputs=("tokens",))
    train.make_train_step(placement="single")(bad, None, _data())


def test_wrong_flag_is_a_valueerror_naming_the_fix():
  def apply_fn(variables, x, *, train):  # a teacher function whose flag is required and named train
    del train
    return x.reshape(x.shape[0], -1)[:, :NUM_CLASSES] @ variables["w"]

  teacher = modeling.Model(apply_fn, train_flag=None, name="teacher")
  state = create_train_state(NoFlag(), optax.sgd(0.1), _data()["image"], rng=0)
  step = train.make_train_step(teacher_apply_fn=teacher, placement="single")
  with pytest.raises(ValueError, match=r"calling the teacher failed: .*train_flag='train'"):
    step(state, {"w": np.eye(NUM_CLASSES, dtype=np.float32)}, _data())


def test_nnx_module_as_teacher_names_from_nnx():
  teacher = nnx.Linear(16, NUM_CLASSES, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"NNX module \(Linear\).*jaxkd.from_nnx"):
    train.make_train_step(teacher_apply_fn=teacher)


class TinyLM(nn.Module):
  """Token ids in, next-token logits out; the attention mask zeroes masked positions' embeddings."""

  vocab: int = 11

  @nn.compact
  def __call__(self, tokens, *, attention_mask, train: bool = False):
    assert jnp.issubdtype(tokens.dtype, jnp.integer), tokens.dtype  # never cast by compute_dtype
    x = nn.Embed(self.vocab, 8)(tokens) * attention_mask[..., None]
    x = x + jnp.cumsum(x, axis=1)  # causal mixing
    return nn.Dense(self.vocab)(x)


def _tokens(seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 11, size=(4, 6)).astype(np.int32)
  attention_mask = np.ones((4, 6), np.float32)
  attention_mask[:, 4:] = 0.0  # two padded positions per row
  labels = np.roll(tokens, -1, axis=1)
  labels[:, 3:] = -100  # padding and the last real token have no next-token label
  return {"tokens": tokens, "attention_mask": attention_mask, "label": labels}


@pytest.mark.parametrize("compute_dtype", [None, jnp.bfloat16])
def test_token_model_with_attention_mask_and_ignored_labels(compute_dtype):
  lm = TinyLM()
  options = dict(inputs=("tokens",), input_kwargs={"attention_mask": "attention_mask"})
  state = create_train_state(lm, optax.adam(1e-2), _tokens(), rng=0, **options)
  teacher = modeling.as_model(TinyLM(), name="teacher", **options)
  teacher_variables = jax.jit(lambda k, b: lm.init(k, b["tokens"], attention_mask=b["attention_mask"]))(
    jax.random.key(5), _tokens()
  )
  step = train.make_train_step(
    teacher_apply_fn=teacher, temperature=2.0, alpha=0.5, placement="single", compute_dtype=compute_dtype, donate=False
  )
  batch = _tokens()
  new_state, metrics = step(state, teacher_variables, batch)
  # The loss is the mean over the 12 real tokens only: recompute it by hand.
  real = batch["label"] != -100
  student_logits = lm.apply({"params": state.params}, batch["tokens"], attention_mask=batch["attention_mask"])
  teacher_logits = lm.apply(teacher_variables, batch["tokens"], attention_mask=batch["attention_mask"])
  labels = np.where(real, batch["label"], 0)
  from jaxkd.losses import distillation_loss

  expected = distillation_loss(student_logits, teacher_logits, labels, 2.0, 0.5)[real].mean()
  tolerance = 1e-6 if compute_dtype is None else 5e-2
  np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=tolerance)
  # Positions with label -100 get no gradient: changing their labels changes nothing.
  other = {**batch, "label": np.where(real, batch["label"], -100)}
  assert float(step(state, teacher_variables, other)[1]["loss"]) == pytest.approx(float(metrics["loss"]))
  assert float(metrics["nonfinite"]) == 0.0 and int(new_state.step) == 1


def test_nnx_student_goes_back_into_its_module():
  class Net(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
      self.linear = nnx.Linear(16, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
      return self.linear(x.reshape(x.shape[0], -1))

  module = Net(rngs=nnx.Rngs(0))
  state = create_train_state(module, optax.sgd(0.5), rng=0)
  step = train.make_train_step(placement="single", donate=False)
  for _ in range(3):
    state, _ = step(state, None, _data())
  nnx.update(module, state.params)  # the README's way back
  expected = state.model({"params": state.params, "batch_stats": state.batch_stats}, _data(), train=False)[0]
  np.testing.assert_allclose(module(jnp.asarray(_data()["image"])), expected, rtol=1e-6)


class NNXNet(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(16, 16, rngs=rngs)
    self.out = nnx.Linear(16, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))


def _student(kind: str):
  if kind == "nnx":
    return NNXNet(rngs=nnx.Rngs(0))
  return {"training": Training(), "tuple": TupleOut(), "dict": DictOut()}[kind]


@pytest.mark.parametrize("num_devices", [1, 2, 4])
@pytest.mark.parametrize("kind", ["training", "tuple", "dict", "nnx"])
def test_user_models_train_through_fit_on_any_mesh(kind, num_devices, tmp_path):
  """The issue's bar: own model, any flag/output, any optax optimizer, a temperature schedule, 1/2/4 devices."""
  from jaxkd import placement as placement_lib
  from jaxkd.training import loop as trainer

  teacher = NoFlag()
  teacher_variables = jax.jit(teacher.init)(jax.random.key(1), _data()["image"])
  state = create_train_state(_student(kind), optax.lamb(1e-2), _data()["image"], rng=0)
  step = train.make_train_step(
    teacher_apply_fn=teacher,
    temperature=optax.linear_schedule(4.0, 1.0, transition_steps=8),
    alpha=0.9,
    placement=placement_lib.Placement.data_parallel(jax.devices()[:num_devices]),
  )
  batches = iter([_data(batch_size=8, seed=i % 2) for i in range(8)])
  result = trainer.fit(
    state,
    train_step=step,
    train_data=batches,
    num_steps=8,
    teacher_variables=teacher_variables,
    workdir=tmp_path,
    log_every=4,
    progress=False,
  )
  assert result.step == 8 and np.isfinite(result.train_metrics["loss"])
  assert result.train_metrics["temperature"] == pytest.approx((2.5 + 2.125 + 1.75 + 1.375) / 4)
  moved = jax.tree.map(
    lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), result.state.params, state.params
  )
  assert max(jax.tree.leaves(moved)) > 1e-4
