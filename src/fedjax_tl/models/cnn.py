"""Plain convolutional networks: a configurable CNN and pfl-research's
CIFAR-10 `simple_cnn`."""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
from flax import nnx

from fedjax_tl.models import axes
from fedjax_tl.models.base import ModelDef, Options, from_module
from fedjax_tl.models.layers import (conv2d, dropout, fan_in_init,
                                     max_pool_2x2, resolve_conv_impl,
                                     scale_units, unit_scale)

# nnx.Conv's own default, drawn as a matrix (the same values, compiled faster).
CONV_INIT = fan_in_init(nnx.initializers.lecun_normal())


def _classifier(module: nnx.Module, x: jax.Array, rng: jax.Array | None,
                units: Mapping[str, jax.Array] | None) -> jax.Array:
  """Both CNNs' top: dropout, flatten, `dense_0` + ReLU, dropout, `head`."""
  x = dropout(x, module.dropout_rates[0], rng, 0)
  x = x.reshape(x.shape[0], -1)
  x = jax.nn.relu(scale_units(module.dense_0(x), units, "dense"))
  x = dropout(x, module.dropout_rates[1], rng, 1)
  return module.head(x)


class CNN(nnx.Module):
  """`conv_i` (3x3 same) + ReLU + 2x2 max-pool per channel width, dropout,
  `dense_0` + ReLU, dropout, `head`.

  Width groups: `channels_i`, the output channels of `conv_i`, and `dense`,
  the units of `dense_0`; the flatten repeats the last channel group once
  per spatial position.
  """

  masks_activations = True  # __call__ applies `units`

  def __init__(self, input_shape: Sequence[int], channels: Sequence[int],
               dense: int, num_classes: int, *, dropout: float = 0.0,
               conv_impl: str = "auto", rngs: nnx.Rngs):
    self.conv_impl = resolve_conv_impl(conv_impl)
    height, width, in_channels = input_shape
    self.num_conv = len(channels)
    chans = [in_channels, *channels]
    self.positions = []
    for i in range(len(channels)):
      setattr(self, f"conv_{i}", nnx.Conv(chans[i], chans[i + 1], (3, 3),
                                          padding="SAME", rngs=rngs,
                                          kernel_init=CONV_INIT))
      self.positions.append(height * width)
      height, width = max(height // 2, 1), max(width // 2, 1)
    self.spatial = height * width
    self.dense_0 = nnx.Linear(self.spatial * chans[-1], dense, rngs=rngs)
    self.head = nnx.Linear(dense, num_classes, rngs=rngs)
    # Sites: after the convolutions, after dense_0 (as in simple_cnn).
    self.dropout_rates = (float(dropout),) * 2

  def __call__(self, x: jax.Array, rng: jax.Array | None = None,
               units: Mapping[str, jax.Array] | None = None) -> jax.Array:
    for i in range(self.num_conv):
      x = jax.nn.relu(conv2d(getattr(self, f"conv_{i}"), x, self.conv_impl,
                             unit_scale(units, f"channels_{i}")))
      if x.shape[1] > 1 and x.shape[2] > 1:
        x = max_pool_2x2(x, self.conv_impl)
    return _classifier(self, x, rng, units)

  def axes(self) -> tuple[axes.Layer, ...]:
    groups = [None] + [f"channels_{i}" for i in range(self.num_conv)]
    flat = axes.Axis(groups[-1], repeat=self.spatial) if groups[-1] else None
    return (*(axes.conv(f"conv_{i}", groups[i], groups[i + 1],
                        self.positions[i]) for i in range(self.num_conv)),
            axes.dense("dense_0", flat, "dense"),
            axes.dense("head", "dense", None))


class SimpleCNN(nnx.Module):
  """pfl-research's CIFAR-10 `simple_cnn`.

  conv 32 (3x3 valid) + ReLU, conv 64 (3x3 valid) + ReLU, 2x2 max-pool,
  dropout 0.25, flatten (12,544 features for 32x32x3), dense 128 + ReLU,
  dropout 0.5, dense `num_classes`; Glorot-uniform kernels, zero biases.
  Width groups: `channels_0`, `channels_1`, `dense`.
  """

  CONV = (32, 64)
  DENSE = 128
  DROPOUT = (0.25, 0.5)

  masks_activations = True  # __call__ applies `units`

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               dropout: float | None = None, conv_impl: str = "auto",
               rngs: nnx.Rngs):
    self.conv_impl = resolve_conv_impl(conv_impl)
    height, width, in_channels = input_shape
    if min(height, width) < 6:
      raise ValueError(f"simple_cnn needs inputs of at least 6x6, not "
                       f"{height}x{width}")
    init = nnx.initializers.glorot_uniform()
    c0, c1 = self.CONV
    self.conv_0 = nnx.Conv(in_channels, c0, (3, 3), padding="VALID",
                           kernel_init=init, rngs=rngs)
    self.conv_1 = nnx.Conv(c0, c1, (3, 3), padding="VALID", kernel_init=init,
                           rngs=rngs)
    self.positions = ((height - 2) * (width - 2), (height - 4) * (width - 4))
    self.spatial = ((height - 4) // 2) * ((width - 4) // 2)
    self.dense_0 = nnx.Linear(self.spatial * c1, self.DENSE, kernel_init=init,
                              rngs=rngs)
    self.head = nnx.Linear(self.DENSE, num_classes, kernel_init=init,
                           rngs=rngs)
    self.dropout_rates = (self.DROPOUT if dropout is None else
                          (float(dropout),) * 2)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None,
               units: Mapping[str, jax.Array] | None = None) -> jax.Array:
    x = jax.nn.relu(conv2d(self.conv_0, x, self.conv_impl,
                           unit_scale(units, "channels_0")))
    x = jax.nn.relu(conv2d(self.conv_1, x, self.conv_impl,
                           unit_scale(units, "channels_1")))
    x = max_pool_2x2(x, self.conv_impl)
    return _classifier(self, x, rng, units)

  def axes(self) -> tuple[axes.Layer, ...]:
    return (axes.conv("conv_0", None, "channels_0", self.positions[0]),
            axes.conv("conv_1", "channels_0", "channels_1", self.positions[1]),
            axes.dense("dense_0", axes.Axis("channels_1", repeat=self.spatial),
                       "dense"),
            axes.dense("head", "dense", None))


def cnn(input_shape: Sequence[int], num_classes: int, seed: int,
        options: Options) -> ModelDef:
  """`CNN` with `options.cnn_channels` and `options.cnn_dense`."""
  return from_module(CNN(input_shape, options.cnn_channels, options.cnn_dense,
                         num_classes, dropout=options.dropout or 0.0,
                         conv_impl=options.conv_impl,
                         rngs=nnx.Rngs(params=seed)))


def simple_cnn(input_shape: Sequence[int], num_classes: int, seed: int,
               options: Options) -> ModelDef:
  """`SimpleCNN` (its own widths; `options.dropout` None keeps its rates)."""
  return from_module(SimpleCNN(input_shape, num_classes,
                               dropout=options.dropout,
                               conv_impl=options.conv_impl,
                               rngs=nnx.Rngs(params=seed)))
