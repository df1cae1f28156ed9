"""Normalisation over the units a client holds.

A client of width p holds some of a width group's units (channels, features);
the rest are zero. Its normalisation layers must behave as the same layers
of its sub-model at its real shape: statistics over the held units only, and
outputs zero on the units it lacks (a norm's bias would otherwise switch
them on). The held units come from the width policy's `units` vector for
the layer's group (non-zero = held; None = all held).

- Group norm (LayerNorm is one group): per example, over the norm's axes
  and the channels of each group. Channel groups are formed over the held
  channels in order, `group(j) = floor(rank(j) * G / k)` for the j-th of k
  held channels, which is how the sub-model at its real shape splits its k
  channels when G divides k (otherwise the groups are as even as they can
  be), for any mask pattern taken in index order (a FedRolex window that
  wraps is ranked by index, not from its start).
- Batch norm without running statistics (HeteroFL's static batch norm,
  sBN): per channel, over the batch and the norm's axes; channels do not
  mix, so a mask changes only which outputs are zeroed. At evaluation it
  takes statistics computed on data (`evaluation.norm_statistics`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

EPS = 1e-5  # PyTorch's default, which HeteroFL's and FedRolex's models use


def _held(held: jax.Array | None, channels: int, dtype) -> jax.Array:
  return (jnp.ones(channels, dtype) if held is None else
          (held != 0).astype(dtype))


def group_norm(x: jax.Array, held: jax.Array | None, *, groups: int,
               axes: Sequence[int], eps: float = EPS) -> jax.Array:
  """`x[batch, ..., C]` normalised per example over `axes` and the held
  channels of each of `groups` channel groups; zero on channels not held.

  Args:
    x: the inputs, channels last.
    held: `[C]` non-zero on the held channels; None for all.
    groups: channel groups (1: LayerNorm over `axes` and the channels).
    axes: the axes besides the channels to normalise over (the spatial
      axes of an image; () for the features of each token).
  """
  # Statistics in float32 (a bfloat16 count of channels stops at 256).
  dtype, x = x.dtype, x.astype(jnp.promote_types(x.dtype, jnp.float32))
  channels = x.shape[-1]
  mask = _held(held, channels, x.dtype)
  count = jnp.maximum(jnp.sum(mask != 0, dtype=jnp.int32), 1)
  rank = jnp.cumsum(mask != 0, dtype=jnp.int32) - 1
  gid = rank * groups // count
  onehot = (gid[:, None] == jnp.arange(groups)[None]) * mask[:, None]
  per_group = onehot.sum(0) * math.prod(x.shape[a] for a in axes)
  per_group = jnp.maximum(per_group, 1)

  def group_mean(values):  # [batch, ..., C] -> per channel, its group's mean
    sums = values.sum(axis=tuple(axes), keepdims=True) if axes else values
    return (sums @ onehot / per_group) @ onehot.T

  centred = x - group_mean(x)
  var = group_mean(centred**2)
  return (centred * jax.lax.rsqrt(var + eps) * mask).astype(dtype)


def batch_norm(x: jax.Array, held: jax.Array | None,
               stats: tuple[jax.Array, jax.Array] | None = None, *,
               eps: float = EPS) -> tuple[jax.Array, tuple[jax.Array,
                                                         jax.Array]]:
  """`x[batch, ..., C]` normalised per channel over every axis but the
  channels, with the batch's statistics or the given `(mean, var)`; zero
  on channels not held. Returns `(normalised, (batch mean, batch var))`,
  the variance unbiased as PyTorch's running statistics take it."""
  dtype, x = x.dtype, x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mask = _held(held, x.shape[-1], x.dtype)
  reduce = tuple(range(x.ndim - 1))
  n = 1
  for a in reduce:
    n *= x.shape[a]
  batch_mean = x.mean(reduce)
  batch_var = ((x - batch_mean)**2).mean(reduce)
  mean, var = (batch_mean, batch_var) if stats is None else stats
  return (((x - mean) * jax.lax.rsqrt(var + eps) * mask).astype(dtype),
          (batch_mean, batch_var * n / max(n - 1, 1)))


class Norm(nnx.Module):
  """A normalisation layer with a scale and a bias per channel.

  `kind` is "group" (`groups` channel groups; 1 is LayerNorm over `axes` and
  the channels) or "batch" (HeteroFL's sBN). `axes` are the non-channel
  axes of one example it normalises over, counted from the batch axis
  (`(1, 2)` for images, `()` for token features).
  """

  def __init__(self, channels: int, *, kind: str = "group", groups: int = 1,
               axes: Sequence[int] = (1, 2), group: str | None = None,
               rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init: scale 1, bias 0
    if kind not in ("group", "batch"):
      raise ValueError(f"norm kind must be 'group' or 'batch', not {kind!r}")
    self.kind, self.groups, self.axes = kind, groups, tuple(axes)
    # `group` names the width group in the params' metadata, for models
    # that name their axes there (models.base.axes_from_metadata).
    meta = {} if group is None else {"width_axes": (group,)}
    self.scale = nnx.Param(jnp.ones(channels, jnp.float32), **meta)
    self.bias = nnx.Param(jnp.zeros(channels, jnp.float32), **meta)

  def __call__(self, x: jax.Array, held: jax.Array | None = None,
               stats: tuple[jax.Array, jax.Array] | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """`(outputs, batch statistics)`; the statistics are None for a group
    norm."""
    if self.kind == "batch":
      y, batch = batch_norm(x, held, stats)
    else:
      y, batch = group_norm(x, held, groups=self.groups, axes=self.axes), None
    mask = _held(held, x.shape[-1], x.dtype)
    return (y * self.scale[...].astype(x.dtype) +
            self.bias[...].astype(x.dtype)) * mask, batch
