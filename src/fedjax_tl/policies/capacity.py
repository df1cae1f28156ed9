"""Capacity primitives: which units, layers and parameters a client holds.

A mask has the tree structure of the params it masks. Width policies first pick
the hidden units a client keeps (one `[units]` vector per hidden group: first-k,
rolling, random); the layer specs then turn unit vectors into per-parameter
masks, so every width policy shares one mask builder and one vmap serves every
client. Depth policies pick the layers a client trains.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from fedjax_tl.models.base import LayerSpec, Params


def kept_units(fraction: jax.Array, size: int) -> jax.Array:
  """ceil(fraction * size) units, at least one (HeteroFL's rule)."""
  # The small slack keeps exact products such as 0.125 * 256 from rounding up.
  return jnp.clip(jnp.ceil(fraction * size - 1e-4), 1, size).astype(jnp.int32)


def first_k_units(fraction: jax.Array,
                  group_sizes: Sequence[int]) -> tuple[jax.Array, ...]:
  """HeteroFL static width: the first ceil(p*C) units of every hidden group."""
  return tuple((jnp.arange(size) < kept_units(fraction, size)).astype(
      jnp.float32) for size in group_sizes)


def rolling_units(fraction: jax.Array, round_index: jax.Array,
                  group_sizes: Sequence[int]) -> tuple[jax.Array, ...]:
  """A rolling window: unit j is held iff (j - r) mod C < ceil(p*C)."""
  return tuple(
      (jnp.mod(jnp.arange(size) - round_index, size) < kept_units(
          fraction, size)).astype(jnp.float32) for size in group_sizes)


def random_units(fraction: jax.Array, key: jax.Array,
                 group_sizes: Sequence[int]) -> tuple[jax.Array, ...]:
  """A uniformly random ceil(p*C) units of each group."""
  units = []
  for key_g, size in zip(jax.random.split(key, len(group_sizes)),
                         group_sizes):
    # The units whose random scores rank lowest are kept: a uniform subset.
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key_g, (size,))))
    units.append((ranks < kept_units(fraction, size)).astype(jnp.float32))
  return tuple(units)


def trained_layers(fraction: jax.Array, num_layers: int) -> jax.Array:
  """`[layers]` 0/1, bottom-up: the top ceil(p*L) layers train (at least 1)."""
  k = kept_units(fraction, num_layers)
  return (jnp.arange(num_layers) >= num_layers - k).astype(jnp.float32)


def masks_from_units(units: Sequence[jax.Array], layers: Sequence[LayerSpec],
                     params: Params) -> Params:
  """Per-parameter masks (same tree as `params`) from per-group unit masks.

  A kernel's last axis is its output units and its second-to-last its input
  units (dense `[in, out]`, conv `[h, w, in, out]`); a bias follows its outputs.
  Input and logit axes are always kept.
  """
  masks = {}
  for spec in layers:
    layer = params[spec.name]
    kernel_shape = layer["kernel"].shape
    n_in, n_out = kernel_shape[-2], kernel_shape[-1]
    u_in = (jnp.ones(n_in) if spec.in_group is None
            else jnp.tile(units[spec.in_group], spec.in_repeat))
    u_out = jnp.ones(n_out) if spec.out_group is None else units[spec.out_group]
    kernel = (u_in[:, None] * u_out[None, :]).astype(layer["kernel"].dtype)
    kernel = jnp.broadcast_to(kernel, kernel_shape)
    masks[spec.name] = {"kernel": kernel,
                        "bias": u_out.astype(layer["bias"].dtype)}
  return masks


def width_masks(fraction: jax.Array, layers: Sequence[LayerSpec],
                group_sizes: Sequence[int], params: Params) -> Params:
  """Static-width (first-k) masks for one client of width `fraction`."""
  return masks_from_units(first_k_units(fraction, group_sizes), layers, params)


def deployed_width_masks(fraction: jax.Array, layers: Sequence[LayerSpec],
                         group_sizes: Sequence[int], params: Params,
                         scaler: bool = False) -> Params:
  """The first-k slice a width-`fraction` tier deploys, with HeteroFL's
  scaler kept if it trained with one (our models have no normalisation
  layer to absorb it)."""
  masks = width_masks(fraction, layers, group_sizes, params)
  return scale_hidden(masks, layers, fraction) if scaler else masks


def scale_hidden(masks: Params, layers: Sequence[LayerSpec],
                 fraction: jax.Array) -> Params:
  """HeteroFL's scaler as a mask: hidden layers' outputs divided by `fraction`.

  Scaling a layer's kernel and bias by 1/p scales its outputs by 1/p, also
  through a ReLU, and gives its parameters the same gradients as dividing
  the activations, so the scaler needs no change to the model.
  """
  hidden = {spec.name for spec in layers if spec.out_group is not None}
  return {name: jax.tree.map(lambda m: m / fraction, layer)
          if name in hidden else layer for name, layer in masks.items()}
