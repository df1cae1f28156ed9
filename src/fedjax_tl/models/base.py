"""Flax NNX models as pure functions of a params dict, plus their width spec.

A model is defined as an NNX module and split once: the simulation works on the
pure params dict (`{layer_name: {'kernel', 'bias'}}`) and a pure `apply`. The
:class:`LayerSpec` tuple says which hidden unit group feeds and leaves each
layer, which is all that capacity masks need to address widths and depths.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Params = Any  # a nested dict of arrays


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """How one layer's parameters map onto hidden unit groups.

  Attributes:
    name: the layer's key in the params dict; layers are listed bottom-up.
    in_group: index of the hidden group feeding it, None for the model input.
    out_group: index of the hidden group it produces, None for the logits.
    in_repeat: how often each input unit repeats along the kernel's input axis
      (a flatten of `[H, W, C]` repeats each of C channels H*W times).
  """
  name: str
  in_group: int | None
  out_group: int | None
  in_repeat: int = 1


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """A model ready for simulation.

  Attributes:
    apply: `apply(params, x[batch, *input_shape]) -> logits[batch, classes]`.
    init_params: freshly initialised params (a pure dict of arrays).
    layers: the layer specs, bottom-up.
    group_sizes: number of units in each hidden group.
  """
  apply: Callable[[Params, jax.Array], jax.Array]
  init_params: Params
  layers: tuple[LayerSpec, ...]
  group_sizes: tuple[int, ...]


class MLP(nnx.Module):
  """Flatten, then `dense_i` + ReLU for each hidden width, then `head`."""

  def __init__(self, in_features: int, hidden: Sequence[int],
               num_classes: int, *, rngs: nnx.Rngs):
    widths = [in_features, *hidden]
    self.num_hidden = len(hidden)
    for i in range(len(hidden)):
      setattr(self, f"dense_{i}", nnx.Linear(widths[i], widths[i + 1],
                                             rngs=rngs))
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for i in range(self.num_hidden):
      x = jax.nn.relu(getattr(self, f"dense_{i}")(x))
    return self.head(x)

  def layer_specs(self) -> tuple[LayerSpec, ...]:
    specs = [LayerSpec(f"dense_{i}", i - 1 if i else None, i)
             for i in range(self.num_hidden)]
    last = self.num_hidden - 1 if self.num_hidden else None
    return (*specs, LayerSpec("head", last, None))


class CNN(nnx.Module):
  """`conv_i` (3x3 same) + ReLU + 2x2 max-pool per channel width, `dense_0`, `head`."""

  def __init__(self, input_shape: Sequence[int], channels: Sequence[int],
               dense: int, num_classes: int, *, rngs: nnx.Rngs):
    height, width, in_channels = input_shape
    self.num_conv = len(channels)
    chans = [in_channels, *channels]
    for i in range(len(channels)):
      setattr(self, f"conv_{i}", nnx.Conv(chans[i], chans[i + 1], (3, 3),
                                          padding="SAME", rngs=rngs))
      height, width = max(height // 2, 1), max(width // 2, 1)
    self.spatial = height * width
    self.dense_0 = nnx.Linear(self.spatial * chans[-1], dense, rngs=rngs)
    self.head = nnx.Linear(dense, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_conv):
      x = jax.nn.relu(getattr(self, f"conv_{i}")(x))
      if x.shape[1] > 1 and x.shape[2] > 1:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(self.dense_0(x))
    return self.head(x)

  def layer_specs(self) -> tuple[LayerSpec, ...]:
    specs = [LayerSpec(f"conv_{i}", i - 1 if i else None, i)
             for i in range(self.num_conv)]
    n = self.num_conv
    return (*specs, LayerSpec("dense_0", n - 1, n, in_repeat=self.spatial),
            LayerSpec("head", n, None))


def _as_model_def(module: nnx.Module, group_sizes: Sequence[int]) -> ModelDef:
  graphdef, state = nnx.split(module)
  init_params = nnx.to_pure_dict(state)

  def apply(params: Params, x: jax.Array) -> jax.Array:
    merged = jax.tree.map(lambda a: a, state)
    nnx.replace_by_pure_dict(merged, params)
    return nnx.merge(graphdef, merged)(x)

  return ModelDef(apply=apply, init_params=init_params,
                  layers=module.layer_specs(), group_sizes=tuple(group_sizes))


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *,
                seed: int, hidden: Sequence[int] = (256, 256),
                cnn_channels: Sequence[int] = (32, 64),
                cnn_dense: int = 128) -> ModelDef:
  """Builds `mlp` or `cnn` for inputs `[*input_shape]` (e.g. `(8, 8, 1)`)."""
  rngs = nnx.Rngs(params=seed)
  if name == "mlp":
    module = MLP(math.prod(input_shape), hidden, num_classes, rngs=rngs)
    return _as_model_def(module, hidden)
  if name == "cnn":
    module = CNN(input_shape, cnn_channels, cnn_dense, num_classes, rngs=rngs)
    return _as_model_def(module, (*cnn_channels, cnn_dense))
  raise ValueError(f"unknown model {name!r}")


def num_params(params: Params) -> int:
  return sum(int(jnp.size(a)) for a in jax.tree.leaves(params))
