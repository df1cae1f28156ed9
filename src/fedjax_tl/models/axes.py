"""Named parameter axes: the one description of what a width policy can cut.

A model lists its layers bottom-up, and for each parameter of a layer one
entry per array axis: `None` for an axis no policy cuts (an input's
features, a convolution's window, the logits) or an :class:`Axis` naming the
width group the axis runs over. A width group is a set of hidden units that
every sub-model keeps or drops together, wherever they appear:

- a dense layer writes group `h` (kernel `(.., Axis("h"))`, bias
  `(Axis("h"),)`) and the next reads it (kernel `(Axis("h"), ..)`);
- a normalisation layer's scale and bias run over a group;
- several layers writing into one group form a residual stream;
- attention heads are a group whose units are `head_dim` entries wide
  (`Axis("heads", per_unit=head_dim)`);
- a flatten of `[H, W, C]` repeats a channel group H*W times
  (`Axis("channels", repeat=H * W)`).

An axis of length `repeat x units x per_unit` is laid out in that order
(row-major), so unit `j` of the group owns the entries `[r, j, :]` for every
`r`. Masks, the first-k sub-model at its real shape (the tier fast path),
importance ordering and, through the masks, FLOP, byte and memory accounting
are all computed here from the names, so one description serves every
policy. The group sizes themselves are read off the parameter shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp

Params = Any  # {layer: {param: array}}
Units = Mapping[str, jax.Array]  # group name -> `[units]` vector


@dataclasses.dataclass(frozen=True)
class Axis:
  """A parameter axis that runs over the units of width group `group`.

  Attributes:
    group: the width group's name.
    repeat: how often the group repeats along the axis, outermost (a flatten
      of `[H, W, C]` repeats its C channels H*W times).
    per_unit: consecutive entries per unit, innermost (an attention head's
      `head_dim` features).
  """
  group: str
  repeat: int = 1
  per_unit: int = 1

  def expand(self, units: jax.Array) -> jax.Array:
    """A `[units]` vector spread over the axis's entries."""
    if self.per_unit > 1:
      units = jnp.repeat(units, self.per_unit)
    return jnp.tile(units, self.repeat) if self.repeat > 1 else units

  def split(self, x: jax.Array, dim: int) -> jax.Array:
    """`x` with axis `dim` split into `[repeat, units, per_unit]`."""
    units = x.shape[dim] // (self.repeat * self.per_unit)
    return x.reshape(*x.shape[:dim], self.repeat, units, self.per_unit,
                     *x.shape[dim + 1:])


AxisLike = Axis | str | None
Axes = tuple[Axis | None, ...]  # one entry per array axis of a parameter


def _axis(a: AxisLike) -> Axis | None:
  return Axis(a) if isinstance(a, str) else a


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer: its key in the params dict and its parameters' axes.

  Attributes:
    name: the layer's key in the params dict; a model lists layers bottom-up
      (depth policies train the top ones).
    params: `(param name, axes)` pairs, one axis entry per array axis.
    positions: a convolution's output positions per example (before any
      pooling), for FLOP and memory counts; None for dense layers.
    norm: a normalisation layer: its statistics run over the units a client
      holds, and HeteroFL's scaler, which divides the outputs of the layers
      that compute from their inputs, leaves it alone.
  FLOPs and LoRA adapters read a layer's `kernel` (`[..., in, out]`).
  """
  name: str
  params: tuple[tuple[str, Axes], ...]
  positions: int | None = None
  norm: bool = False

  @property
  def axes(self) -> dict[str, Axes]:
    return dict(self.params)

  def cuts(self, group: str) -> Iterator[tuple[str, int, Axis]]:
    """`(param, dim, axis)` of every axis of this layer over `group`."""
    for param, axes in self.params:
      for dim, axis in enumerate(axes):
        if axis is not None and axis.group == group:
          yield param, dim, axis


def layer(name: str, *, positions: int | None = None, norm: bool = False,
          **params: Sequence[AxisLike]) -> Layer:
  """A layer whose parameters have the given axes (names as strings)."""
  return Layer(name, tuple((p, tuple(_axis(a) for a in axes))
                           for p, axes in params.items()), positions, norm)


def dense(name: str, inputs: AxisLike, outputs: AxisLike, *,
          bias: bool = True, positions: int | None = None) -> Layer:
  """A dense layer: kernel `[in, out]`, bias `[out]` (if `bias`);
  `positions`: the vectors it maps per example (a sequence's tokens)."""
  return layer(name, positions=positions, kernel=(inputs, outputs),
               **({"bias": (outputs,)} if bias else {}))


def conv(name: str, inputs: AxisLike, outputs: AxisLike,
         positions: int | None = None, *, bias: bool = True) -> Layer:
  """A convolution: kernel `[h, w, in, out]`, bias `[out]` (if `bias`)."""
  return layer(name, positions=positions,
               kernel=(None, None, inputs, outputs),
               **({"bias": (outputs,)} if bias else {}))


def norm(name: str, features: AxisLike, positions: int | None = None
         ) -> Layer:
  """A normalisation layer: scale and bias `[features]` (`positions`: per
  example, on conv features, for the memory count)."""
  return layer(name, positions=positions, norm=True, scale=(features,),
               bias=(features,))


def _leaves(layers: Sequence[Layer], tree: Params
            ) -> Iterator[tuple[str, str, Axes]]:
  for spec in layers:
    for param, axes in spec.params:
      if param in tree[spec.name]:
        yield spec.name, param, axes


def group_sizes(layers: Sequence[Layer], params: Params) -> dict[str, int]:
  """Units of each width group, in the order the groups first appear.

  Raises:
    ValueError: a declared layer or parameter is missing from `params`, an
      axis list does not match its parameter's rank, or two axes disagree on
      a group's size.
  """
  sizes: dict[str, int] = {}
  for spec in layers:
    if spec.name not in params:
      raise ValueError(f"layer {spec.name!r} is declared but not in the "
                       f"params ({', '.join(params)})")
    for param, axes in spec.params:
      if param not in params[spec.name]:
        raise ValueError(f"{spec.name}.{param} is declared but not in the "
                         f"params")
      shape = params[spec.name][param].shape
      if len(axes) != len(shape):
        raise ValueError(f"{spec.name}.{param} has shape {tuple(shape)} but "
                         f"{len(axes)} declared axes")
      for dim, axis in enumerate(axes):
        if axis is None:
          continue
        block = axis.repeat * axis.per_unit
        if shape[dim] % block:
          raise ValueError(f"{spec.name}.{param} axis {dim} has {shape[dim]} "
                           f"entries, not a multiple of {block}")
        units = shape[dim] // block
        if sizes.setdefault(axis.group, units) != units:
          raise ValueError(
              f"{spec.name}.{param} axis {dim} gives group {axis.group!r} "
              f"{units} units; another axis gives {sizes[axis.group]}")
  return sizes


def masks(units: Units, layers: Sequence[Layer], params: Params) -> Params:
  """Per-parameter masks (the tree of `params`) from per-group unit vectors.

  An entry's mask is the product of its units' values over the entry's cut
  axes; axes that are not cut, and parameters no layer declares, are kept.
  """
  declared = {(name, param): axes
              for name, param, axes in _leaves(layers, params)}
  out = {}
  for name, layer_params in params.items():
    out[name] = {}
    for param, value in layer_params.items():
      mask = jnp.ones((), value.dtype)
      axes = declared.get((name, param), ())
      for dim, axis in enumerate(axes):
        if axis is not None:
          vector = axis.expand(units[axis.group])
          mask = mask * vector.reshape(
              (1,) * dim + (-1,) + (1,) * (len(axes) - dim - 1))
      out[name][param] = jnp.broadcast_to(mask.astype(value.dtype),
                                          value.shape)
  return out


def scale_outputs(tree: Params, layers: Sequence[Layer],
                  factor: jax.Array) -> Params:
  """`tree` with every parameter whose last axis is cut (a layer's outputs
  over a group: kernels and biases of hidden layers) times `factor`, in
  the layers the scaler applies to (not `Layer.norm`)."""
  scaled = {(spec.name, param) for spec in layers if not spec.norm
            for param, axes in spec.params
            if param in tree[spec.name] and axes and axes[-1] is not None}
  return {name: {param: value * factor if (name, param) in scaled else value
                 for param, value in layer_params.items()}
          for name, layer_params in tree.items()}


def _map_cuts(tree: Params, layers: Sequence[Layer], fn) -> Params:
  """`tree` with `fn(value, dim, axis)` applied along every cut axis."""
  out = {name: dict(layer_params) for name, layer_params in tree.items()}
  for name, param, axes in _leaves(layers, tree):
    value = out[name][param]
    for dim, axis in enumerate(axes):
      if axis is not None:
        value = fn(value, dim, axis)
    out[name][param] = value
  return out


def first_k(tree: Params, layers: Sequence[Layer],
            kept: Mapping[str, int]) -> Params:
  """The first-k sub-model of `tree` at its real shape: `kept[g]` units of
  each group `g` (any tree shaped like the params, e.g. masks)."""
  def take(value, dim, axis):
    split = axis.split(value, dim)
    split = jax.lax.slice_in_dim(split, 0, kept[axis.group], axis=dim + 1)
    return split.reshape(*value.shape[:dim], -1, *value.shape[dim + 1:])
  return _map_cuts(tree, layers, take)


def pad_first_k(sub: Params, like: Params,
                layers: Sequence[Layer]) -> Params:
  """Scatters a :func:`first_k` tree back to the shapes of `like`, zeros
  in the units it lacks."""
  sizes = group_sizes(layers, like)

  def pad(value, dim, axis):
    split = axis.split(value, dim)
    widths = [(0, 0)] * split.ndim
    widths[dim + 1] = (0, sizes[axis.group] - split.shape[dim + 1])
    split = jnp.pad(split, widths)
    return split.reshape(*value.shape[:dim], -1, *value.shape[dim + 1:])
  return _map_cuts(sub, layers, pad)


def permute(tree: Params, layers: Sequence[Layer], group: str,
            order: jax.Array) -> Params:
  """`tree` with group `group`'s units reordered (`order[i]` becomes unit
  i) along every axis over the group."""
  def take(value, dim, axis):
    if axis.group != group:
      return value
    split = jnp.take(axis.split(value, dim), order, axis=dim + 1)
    return split.reshape(value.shape)
  return _map_cuts(tree, layers, take)


def unit_norms(params: Params, layers: Sequence[Layer], group: str
               ) -> tuple[jax.Array | None, jax.Array | None]:
  """`(incoming, outgoing)` L2 norms `[units]` of group `group`'s units.

  Incoming: the entries of the parameters whose last axis is the group (the
  layers that write the units: kernels and biases); outgoing: those with
  the group on another axis (the layers that read them). None where no
  parameter does.
  """
  sums: list[jax.Array | None] = [None, None]
  for spec in layers:
    for param, dim, axis in spec.cuts(group):
      value = params[spec.name][param]
      side = 0 if dim == value.ndim - 1 else 1
      # Units last (incoming) or first (outgoing), the layout the sums of a
      # dense layer's columns and rows have (the same rounding).
      split = jnp.moveaxis(axis.split(value, dim), dim + 1, -1 if side == 0
                           else 0)
      squares = (jnp.sum(split.reshape(-1, split.shape[-1])**2, 0)
                 if side == 0 else
                 jnp.sum(split.reshape(split.shape[0], -1)**2, 1))
      sums[side] = squares if sums[side] is None else sums[side] + squares
  return tuple(None if s is None else jnp.sqrt(s) for s in sums)


def held_units(mask: Params, layers: Sequence[Layer]) -> dict[str, jax.Array]:
  """`{group: [units]}` 0/1, the units a mask keeps: those of a parameter
  that writes the group (its last axis) with any kept entry."""
  held = {}
  for spec in layers:
    for param, axes in spec.params:
      axis = axes[-1] if axes else None
      if axis is None or axis.group in held or param not in mask[spec.name]:
        continue
      value = mask[spec.name][param]
      value = jnp.moveaxis(axis.split(value, value.ndim - 1), -2, 0)
      held[axis.group] = jnp.any(value.reshape(value.shape[0], -1) != 0,
                                 axis=1).astype(jnp.float32)
  return held
