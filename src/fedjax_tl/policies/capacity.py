"""Capacity primitives: which units, layers and parameters a client holds.

A mask has the tree structure of the params it masks. Width policies first pick
the hidden units a client keeps (one `[units]` vector per named width group:
first-k, rolling, random, covering); the model's named axes then turn unit
vectors into per-parameter masks, so every width policy shares one mask
builder and one vmap serves every client. Depth policies pick the layers a
client trains.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from fedjax_tl.models import axes
from fedjax_tl.models.axes import Layer, Units
from fedjax_tl.models.base import Params

Groups = Mapping[str, int]  # width group name -> units


def kept_units(fraction: jax.Array, size: int) -> jax.Array:
  """ceil(fraction * size) units, at least one (HeteroFL's rule)."""
  # The small slack keeps exact products such as 0.125 * 256 from rounding up.
  return jnp.clip(jnp.ceil(fraction * size - 1e-4), 1, size).astype(jnp.int32)


def first_k_units(fraction: jax.Array, groups: Groups) -> dict[str, jax.Array]:
  """HeteroFL static width: the first ceil(p*C) units of every width group."""
  return {name: (jnp.arange(size) < kept_units(fraction, size)).astype(
      jnp.float32) for name, size in groups.items()}


def rolling_units(fraction: jax.Array, round_index: jax.Array,
                  groups: Groups) -> dict[str, jax.Array]:
  """FedRolex's rolling window in round r: the units `roll(arange(C), r)[:k]`,
  k = ceil(p*C), i.e. units (i - r) mod C for i < k; unit j is held iff
  (j + r) mod C < k."""
  return {name: (jnp.mod(jnp.arange(size) + round_index, size) < kept_units(
      fraction, size)).astype(jnp.float32) for name, size in groups.items()}


def random_units(fraction: jax.Array, key: jax.Array,
                 groups: Groups) -> dict[str, jax.Array]:
  """A uniformly random ceil(p*C) units of each group."""
  units = {}
  for key_g, (name, size) in zip(jax.random.split(key, len(groups)),
                                 groups.items()):
    # The units whose random scores rank lowest are kept: a uniform subset.
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key_g, (size,))))
    units[name] = (ranks < kept_units(fraction, size)).astype(jnp.float32)
  return units


def _ranks(scores: jax.Array) -> jax.Array:
  """Each entry's position when `scores` are sorted ascending."""
  return jnp.argsort(jnp.argsort(scores))


def _next_cycle(ranks: jax.Array, scores: jax.Array, starts: jax.Array,
                counts: jax.Array, boundary: jax.Array) -> jax.Array:
  """The order of the next cycle of a group's units, as ranks.

  `ranks` orders the cycle ending at stream position `boundary`; `scores`
  `[2, C]` are the next cycle's fresh uniform draws. The client whose
  units `[start, start + count)` cross the boundary holds the cycle's last
  `boundary - start` units and draws its other units first from the next
  cycle, uniformly among the units it does not hold (FedEcover's reload,
  by `scores[0]`); the rest of the cycle (the units it held among them)
  follows in a uniform order of its own (`scores[1]`: ordering the rest by
  `scores[0]` too would put the units it held, which the draw did not
  rank, ahead of the others).
  """
  size = ranks.shape[0]
  crossing = (starts < boundary) & (starts + counts > boundary)
  tail = jnp.sum(jnp.where(crossing, boundary - starts, 0))
  need = jnp.sum(jnp.where(crossing, starts + counts - boundary, 0))
  held = ranks >= size - tail
  drawn = _ranks(scores[0] + 2 * held) < need  # never a held unit
  return _ranks(scores[1] - 2 * drawn)


def covering_units(fraction: jax.Array, widths: jax.Array, index: jax.Array,
                   key: jax.Array, groups: Groups) -> dict[str, jax.Array]:
  """FedEcover's units: slot `index` of a cohort whose slots train `widths`.

  Each group's units form a stream of cycles, each a uniformly random order
  of all C units drawn from `key` (one stream per group, independent).
  The cohort's slots take ceil(p*C) consecutive units of the stream in
  slot order (0 for a slot of width 0), so within a cycle no unit is given
  twice and over a cycle every unit once; a slot crossing a cycle's end
  draws the rest of its units from the next cycle, among those it does not
  hold (:func:`_next_cycle`). `fraction` is the slot's own width (a slot
  of width 0 in `widths` still gets ceil(p*C) units, from where it stands).
  """
  slots = widths.shape[0]
  units = {}
  for key_g, (name, size) in zip(jax.random.split(key, len(groups)),
                                 groups.items()):
    counts = jnp.where(widths > 0, kept_units(widths, size), 0)
    starts = jnp.cumsum(counts) - counts
    scores = jax.random.uniform(key_g, (slots + 1, 2, size))

    def step(ranks, xs, starts=starts, counts=counts, size=size):
      boundary, fresh = xs
      ranks = _next_cycle(ranks, fresh, starts, counts, boundary * size)
      return ranks, ranks

    first = _ranks(scores[0, 0])
    _, later = jax.lax.scan(step, first, (jnp.arange(1, slots + 1),
                                          scores[1:]))
    cycles = jnp.concatenate([first[None], later])
    start, count = starts[index], kept_units(fraction, size)
    cycle, offset = start // size, start % size
    now, after = cycles[cycle], cycles[cycle + 1]
    units[name] = (((now >= offset) & (now < offset + count)) |
                   (after < offset + count - size)).astype(jnp.float32)
  return units


def trained_layers(fraction: jax.Array, num_layers: int) -> jax.Array:
  """`[layers]` 0/1, bottom-up: the top ceil(p*L) layers train (at least 1)."""
  k = kept_units(fraction, num_layers)
  return (jnp.arange(num_layers) >= num_layers - k).astype(jnp.float32)


def masks_from_units(units: Units, layers: Sequence[Layer],
                     params: Params) -> Params:
  """Per-parameter masks (same tree as `params`) from per-group unit masks
  (`axes.masks`: each entry keeps the product of its units)."""
  return axes.masks(units, layers, params)


def width_masks(fraction: jax.Array, layers: Sequence[Layer],
                params: Params) -> Params:
  """Static-width (first-k) masks for one client of width `fraction`."""
  return masks_from_units(
      first_k_units(fraction, axes.group_sizes(layers, params)), layers,
      params)


def deployed_width_masks(fraction: jax.Array, layers: Sequence[Layer],
                         params: Params, scaler: bool = False) -> Params:
  """The first-k slice a width-`fraction` tier deploys, with HeteroFL's
  scaler kept if `scaler` (callers pass False for normalised models, whose
  norms absorb it)."""
  masks = width_masks(fraction, layers, params)
  return scale_hidden(masks, layers, fraction) if scaler else masks


def scale_hidden(masks: Params, layers: Sequence[Layer],
                 fraction: jax.Array) -> Params:
  """HeteroFL's scaler as a mask: hidden layers' outputs divided by `fraction`.

  Scaling a layer's kernel and bias by 1/p scales its outputs by 1/p, also
  through a ReLU, and gives its parameters the same gradients as dividing
  the activations, so the scaler needs no change to the model. The scaled
  parameters are those whose last axis is cut (`axes.scale_outputs`).
  """
  return axes.scale_outputs(masks, layers, 1 / fraction)
