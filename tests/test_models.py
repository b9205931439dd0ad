"""Shapes, parameter counts and train/eval behaviour of the reference models."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.models import CNN, MLP, ResNet, count_params


def test_mlp_matches_paper_sizes():
  variables = MLP(hidden_sizes=(1200, 1200)).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  # 784*1200+1200 + 1200*1200+1200 + 1200*10+10
  assert count_params(variables) == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10


def test_dropout_only_in_training():
  model = MLP(hidden_sizes=(32,), dropout_rate=0.5, input_dropout_rate=0.2)
  x = jnp.ones((4, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  eval_a, eval_b = model.apply(variables, x), model.apply(variables, x)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  train_b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(train_a, train_b)


def test_cnn_and_resnet_shapes():
  x = jnp.zeros((2, 28, 28, 1))
  variables = CNN().init(jax.random.key(0), x)
  assert CNN().apply(variables, x).shape == (2, 10)
  x = jnp.zeros((2, 32, 32, 3))
  model = ResNet(num_classes=100)
  variables = model.init(jax.random.key(0), x)
  assert set(variables) == {"params", "batch_stats"}
  logits, updates = model.apply(variables, x + 1.0, train=True, mutable=["batch_stats"])
  assert logits.shape == (2, 100)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"], updates["batch_stats"])
  assert any(jax.tree.leaves(changed))


def test_bfloat16_compute_keeps_float32_params():
  model = MLP(hidden_sizes=(16,), dtype=jnp.bfloat16)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  assert model.apply(variables, jnp.ones((2, 4, 4, 1))).dtype == jnp.bfloat16
