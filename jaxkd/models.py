"""Reference Flax (linen) models for distillation experiments and tests.

Every model is called as ``model.apply(variables, images, train=...)`` and returns
logits ``[batch, num_classes]``. Images are ``[batch, height, width, channels]``;
MLPs flatten them. Dropout draws from the ``'dropout'`` RNG stream and BatchNorm
keeps its statistics in the ``'batch_stats'`` collection, the conventions the
jaxkd train step relies on.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["MLP", "CNN", "ResNet", "count_params"]


class MLP(nn.Module):
  """Fully connected ReLU network (Hinton et al. 2015 use 784-1200-1200-10 and 784-800-800-10).

  Attributes:
    hidden_sizes: widths of the hidden layers.
    num_classes: number of output logits.
    dropout_rate: dropout after each hidden layer (training only).
    input_dropout_rate: dropout on the flattened input (the paper's teacher uses 0.2).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
  """

  hidden_sizes: Sequence[int] = (800, 800)
  num_classes: int = 10
  dropout_rate: float = 0.0
  input_dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)  # [batch, features]
    if self.input_dropout_rate:
      x = nn.Dropout(self.input_dropout_rate, deterministic=not train)(x)
    for width in self.hidden_sizes:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class CNN(nn.Module):
  """Small convolutional classifier: conv-pool-conv-pool-dense (about 92% on Fashion-MNIST).

  Attributes:
    features: channels of the two conv layers.
    dense_size: width of the hidden dense layer.
    num_classes: number of output logits.
    dropout_rate: dropout before the output layer (training only).
    dtype: computation dtype; parameters stay float32.
  """

  features: Sequence[int] = (32, 64)
  dense_size: int = 256
  num_classes: int = 10
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x.astype(self.dtype)
    for channels in self.features:
      x = nn.relu(nn.Conv(channels, (3, 3), dtype=self.dtype)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense_size, dtype=self.dtype)(x))
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class _ResidualBlock(nn.Module):
  channels: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)  # noqa: E731
    residual = x
    y = nn.Conv(self.channels, (3, 3), strides=self.strides, use_bias=False, dtype=self.dtype)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.channels, (3, 3), use_bias=False, dtype=self.dtype)(y)
    y = norm()(y)
    if residual.shape != y.shape:
      residual = nn.Conv(self.channels, (1, 1), strides=self.strides, use_bias=False, dtype=self.dtype)(residual)
      residual = norm()(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """CIFAR-style ResNet with BatchNorm for 32×32 inputs (RepDistiller's resnetNxK family).

  ``ResNet(stage_sizes=(5, 5, 5), widths=(64, 128, 256))`` is resnet32x4;
  ``ResNet(stage_sizes=(1, 1, 1), widths=(64, 128, 256))`` is resnet8x4.

  Attributes:
    stage_sizes: residual blocks per stage; each stage after the first halves
      the resolution.
    widths: channels per stage.
    stem_width: channels of the first convolution.
    num_classes: number of output logits.
    dtype: computation dtype; parameters stay float32.
  """

  stage_sizes: Sequence[int] = (1, 1, 1)
  widths: Sequence[int] = (16, 32, 64)
  stem_width: int = 16
  num_classes: int = 10
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x.astype(self.dtype)
    x = nn.Conv(self.stem_width, (3, 3), use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x))
    for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = _ResidualBlock(width, strides, dtype=self.dtype)(x, train=train)
    x = jnp.mean(x, axis=(1, 2))  # [batch, channels]: global average pool
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def count_params(params) -> int:
  """Number of scalar parameters in a pytree."""
  return int(sum(leaf.size for leaf in jax.tree.leaves(params)))
