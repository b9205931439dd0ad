"""Teachers and students split over a (data, model) mesh: rules, equality with one device, memory, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jaxkd
from jaxkd import lm
from jaxkd import sharding as sharding_lib
from jaxkd.lm.transformer import TransformerLM, lm_config
from jaxkd.placement import Placement

VOCAB, LENGTH, BATCH = 64, 16, 8
needs_4 = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake CPU) devices")


def _module(size="tiny", layers=None):
  config = lm_config(size, vocab_size=VOCAB, max_len=LENGTH)
  if layers is not None:
    config["num_layers"] = layers
  return TransformerLM(**config)


@pytest.fixture(scope="module")
def pair():
  teacher_module, student_module = _module("tiny", layers=2), _module()
  tokens = np.zeros((2, LENGTH), np.int32)
  teacher_variables = jax.device_get(jax.jit(teacher_module.init)(jax.random.key(1), tokens))
  state = jaxkd.create_train_state(lm.lm_model(student_module), optax.adam(1e-3), {"tokens": tokens}, rng=0)
  return lm.lm_model(teacher_module, name="teacher"), teacher_variables, jax.device_get(state)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (BATCH, LENGTH + 1)).astype(np.int32)
  return {"tokens": tokens[:, :-1], "label": tokens[:, 1:], "mask": rng.random((BATCH, LENGTH)) < 0.8}


def _step(teacher, placement):
  return jaxkd.make_train_step(
    teacher_apply_fn=teacher, objective=lm.lm_objective("forward", alpha=0.5), placement=placement, donate=False
  )


def _run(pair, placement, *, teacher_dtype=None, steps=3):
  """``steps`` steps; the history of metrics and how many XLA compilations the steps after the first needed."""
  teacher, teacher_variables, state = pair
  step = _step(teacher, placement)
  s, t = placement.put(state), placement.put(teacher_variables, dtype=teacher_dtype)
  history = []
  for i in range(steps):
    if i == 1:
      compiles_before = len(_BACKEND_COMPILES)
    s, metrics = step(s, t, _batch(i))
    history.append(placement.to_host(metrics))
  recompiles = len(_BACKEND_COMPILES) - compiles_before if steps > 1 else 0
  return recompiles, s, t, history


_BACKEND_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
  lambda event, duration, **_: _BACKEND_COMPILES.append(event) if event.endswith("backend_compile_duration") else None
)


def _close(a, b, rtol, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


# ---------------------------------------------------------------------------------------------------- the rules


def test_fsdp_default_splits_the_largest_divisible_dimension():
  assert sharding_lib.fsdp_spec((64, 256), axis="model", size=4) == P(None, "model")
  assert sharding_lib.fsdp_spec((256, 64), axis="model", size=4) == P("model")
  assert sharding_lib.fsdp_spec((6,), axis="model", size=4) == P()  # nothing divisible: replicated
  assert sharding_lib.fsdp_spec((), axis="model", size=4) == P()
  assert sharding_lib.fsdp_spec((8, 8), axis="model", size=4) == P("model")  # ties: the first
  tree = {"w": np.zeros((8, 12), np.float32), "count": np.zeros((), np.int32), "ids": np.zeros((8,), np.int32)}
  specs = sharding_lib.partition_specs(tree, axis_sizes={"data": 1, "model": 4})
  assert specs == {"w": P(None, "model"), "count": P(), "ids": P()}  # integers stay whole


def test_rules_match_paths_first_wins_and_reach_optimizer_moments(pair):
  _, _, state = pair
  rules = [(r"attn/\w+/kernel", P(None, "model")), (r"embedding", P("model")), (r"kernel", P("model"))]
  specs = sharding_lib.partition_specs(state, axis_sizes={"data": 2, "model": 2}, rules=rules)
  named = {sharding_lib.path_name(p): s for p, s in jax.tree_util.tree_flatten_with_path(specs)[0]}
  kernels = [n for n in named if n.endswith("kernel") and "/attn/" in n]
  assert kernels and all(named[n] == P(None, "model") for n in kernels)
  assert named["params/block_0/mlp_in/kernel"] == P("model")  # the first matching rule wins
  assert named["params/embed/embedding"] == P("model") and named["params/final_norm/scale"] == P()
  # The same parameter's Adam moments follow it.
  assert any(n.startswith("params/") for n in kernels) and any("/mu/" in n for n in kernels)
  assert any("/nu/" in n for n in kernels)
  assert named["step"] == P()


@pytest.mark.parametrize(
  "rules, message",
  [
    ([(r"no_such_layer", P("model"))], r"partition rules \['no_such_layer'\] match no leaf.*params/"),
    ([(r"embedding", P(None, None, "model"))], r"names 3 dimensions; the array has 2"),
    ([(r"embedding", P("tensor"))], r"mesh axes \['tensor'\], which the mesh"),
    ([(r"[", P())], r"not a valid regular expression"),
    ([("embedding",)], r"a \(regex, PartitionSpec\) pair"),
  ],
)
def test_bad_rules_are_clear_errors(pair, rules, message):
  _, teacher_variables, _ = pair
  with pytest.raises(ValueError, match=message):
    sharding_lib.partition_specs(teacher_variables, axis_sizes={"data": 2, "model": 2}, rules=rules)


def test_a_mesh_that_does_not_divide_a_dimension_is_an_error():
  tree = {"params": {"w": np.zeros((6, 10), np.float32)}}
  with pytest.raises(ValueError, match=r"splits dimension 1 of params/w \(shape \(6, 10\), size 10\) over model = 4"):
    sharding_lib.partition_specs(tree, axis_sizes={"data": 1, "model": 4}, rules=[("w", P(None, "model"))])


@needs_4
def test_placement_sharded_errors():
  with pytest.raises(ValueError, match=r"model=3 must be an int >= 1 that divides the 4 devices"):
    Placement.sharded(3, devices=jax.devices()[:4])
  with pytest.raises(ValueError, match="partition rules need a model axis"):
    Placement.single().put({"w": np.zeros(2)}, rules=[("w", P())])
  placement = Placement.sharded(2, devices=jax.devices()[:4])
  assert repr(placement) == "Placement.sharded(2 x 2 devices, axes=('data', 'model'))"
  assert placement.data_size == 2 and placement.local_shards == 2


# ------------------------------------------------------------------------------------- the step, split and whole


@needs_4
@pytest.mark.parametrize("model", [2, 4])
def test_sharded_step_equals_one_device_and_compiles_once(pair, model):
  """Teacher and student state split over the model axis: the same losses and parameters as one device."""
  _, ref_state, _, ref_history = _run(pair, Placement.single())
  placement = Placement.sharded(model, devices=jax.devices()[:4])
  recompiles, state, teacher, history = _run(pair, placement)
  _close(history, ref_history, rtol=2e-5, atol=2e-6)
  _close(placement.to_host(state).params, jax.device_get(ref_state.params), rtol=2e-5, atol=2e-6)
  assert recompiles == 0  # the state keeps its layout from step to step
  # Every large parameter is split: each device holds 1/model of it, its Adam moments alike.
  kernel = state.params["block_0"]["attn"]["query"]["kernel"]
  assert kernel.sharding.spec != P() and kernel.addressable_shards[0].data.size * model == kernel.size
  mu = state.opt_state[0].mu["block_0"]["attn"]["query"]["kernel"]
  assert mu.sharding.spec == kernel.sharding.spec


def _bytes_per_device(tree):
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


@needs_4
def test_teacher_bytes_per_device_fall_with_the_model_axis(pair):
  """Held bytes of the teacher per device: 1/model of the replicated copy (up to small replicated leaves), and
  half again in bfloat16; the compiled step's argument bytes fall alike."""
  teacher, teacher_variables, state = pair
  whole = _bytes_per_device(Placement.data_parallel(jax.devices()[:4]).put(teacher_variables))
  argument_bytes = {}
  for model in (1, 2, 4):
    placement = Placement.sharded(model, devices=jax.devices()[:4])
    held = _bytes_per_device(placement.put(teacher_variables))
    assert whole / model <= held <= whole / model * 1.02, (model, held, whole)
    placed = placement.put(teacher_variables)
    compiled = _step(teacher, placement).lower(placement.put(state), placed, _batch()).compile()
    argument_bytes[model] = compiled.memory_analysis().argument_size_in_bytes
  assert argument_bytes[4] < argument_bytes[2] < argument_bytes[1]
  bf16 = Placement.sharded(4, devices=jax.devices()[:4]).put(teacher_variables, dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
  assert _bytes_per_device(bf16) * 2 == pytest.approx(whole / 4, rel=0.02)


@needs_4
def test_bfloat16_teacher_is_close_to_float32(pair):
  placement = Placement.sharded(2, devices=jax.devices()[:4])
  _, _, _, exact = _run(pair, placement, steps=1)
  _, _, _, half = _run(pair, placement, teacher_dtype=jnp.bfloat16, steps=1)
  assert half[0]["teacher_perplexity"] == pytest.approx(exact[0]["teacher_perplexity"], rel=2e-2)
  assert half[0]["loss"] == pytest.approx(exact[0]["loss"], rel=2e-2)


@needs_4
def test_sharded_state_checkpoints_restore_onto_another_mesh(pair, tmp_path):
  """A state trained on a 2 x 2 mesh saves through orbax and resumes on 1 x 4 exactly as it would have on 2 x 2."""
  from jaxkd.training.checkpoint import Checkpointer

  teacher, teacher_variables, template = pair
  first = Placement.sharded(2, devices=jax.devices()[:4])
  _, state, _, _ = _run(pair, first, steps=2)
  checkpointer = Checkpointer(tmp_path / "ckpt")
  checkpointer.save(first.to_host(state))
  checkpointer.wait_until_finished()

  second = Placement.sharded(4, devices=jax.devices()[:4])
  restored = Checkpointer(tmp_path / "ckpt").restore(template)
  assert restored is not None and restored.step == 2
  resumed = second.put(restored.state)
  assert resumed.params["embed"]["embedding"].sharding.mesh.shape["model"] == 4
  batch = _batch(7)
  after_resume, _ = _step(teacher, second)(resumed, second.put(teacher_variables), batch)
  uninterrupted, _ = _step(teacher, first)(state, first.put(teacher_variables), batch)
  _close(second.to_host(after_resume).params, first.to_host(uninterrupted).params, rtol=2e-5, atol=2e-6)
