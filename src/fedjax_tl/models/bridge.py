"""A user's flax Linen module as a model, through flax's `nnx.bridge`.

A Linen module names its width groups where it makes its params, as an NNX
module does with `width_axes` metadata: its initializers are wrapped in
:func:`with_width_axes`, one name per array axis (None: an axis no policy
cuts), e.g. a hidden dense layer writing group `h`::

  nn.Dense(64, kernel_init=with_width_axes(nn.initializers.lecun_normal(),
                                           (None, "h")),
           bias_init=with_width_axes(nn.initializers.zeros, ("h",)))

The boxed params are plain arrays to Linen's own `init` and `apply`, and
become NNX params with `width_axes` metadata through the bridge. Linen
checks that a param has the shape its initializer gives, so within a
sub-model's forward (the tier fast path's first-k params at their real
shape) the wrapped initializer gives the sub-model's shape.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import errors, linen, nnx
from flax.nnx.bridge import variables as bridge_variables

from fedjax_tl.models import axes
from fedjax_tl.models.base import POSITIONS, WIDTH_AXES, ModelDef, from_module

# Linen's norms count every unit, held or not (see `base._FLAX_NORMS`).
_LINEN_NORMS = (linen.LayerNorm, linen.GroupNorm, linen.BatchNorm,
                linen.RMSNorm)
# The units of each width group in the forward being traced.
_UNITS: contextvars.ContextVar[Mapping[str, int] | None] = (
    contextvars.ContextVar("units", default=None))


def with_width_axes(fn: Callable[..., jax.Array],
                    names: Sequence[axes.AxisLike],
                    positions: int | None = None) -> Callable[..., Any]:
  """Wraps a Linen initializer so that its param names its width groups.

  Args:
    fn: the initializer, e.g. `nn.initializers.lecun_normal()`.
    names: one entry per array axis of the param: a width group's name (or
      an `axes.Axis`), or None for an axis no policy cuts.
    positions: a convolution's output positions per example, for FLOP and
      memory counts.
  """
  metadata = {WIDTH_AXES: tuple(names)}
  if positions is not None:
    metadata[POSITIONS] = positions
  named = axes.layer("", param=names).axes["param"]

  def init(key, shape, *args, **kwargs) -> nnx.bridge.NNXMeta:
    units = _UNITS.get()
    if units is not None:  # `first_k`'s shape: repeat x units x per_unit
      shape = tuple(n if a is None else a.repeat * units[a.group] * a.per_unit
                    for n, a in zip(shape, named))
    return nnx.bridge.NNXMeta(nnx.Param, fn(key, shape, *args, **kwargs),
                              metadata)

  return init


def _as_nnx(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Linen params as NNX params, keeping their order (the order Linen
  created them in: forward, so bottom-up)."""
  return {key: _as_nnx(value) if isinstance(value, Mapping) else
          bridge_variables.to_nnx_var("params", value)
          for key, value in tree.items()}


def from_linen(module: linen.Module, input_shape: Sequence[int],
               num_classes: int, seed: int) -> ModelDef:
  """The :class:`ModelDef` of a Linen module, initialised as its own
  `module.init(jax.random.key(seed), x[1, *input_shape])` does.

  Its params name their width groups with :func:`with_width_axes`; its
  layers are its param-holding sub-modules by their Linen names (`Dense_0`,
  `block/up`, ...) in the order it creates them. Its `__call__(x)` must map
  `[batch, *input_shape]` to `[batch, num_classes]` logits, deterministically
  (no dropout) and with params only (no batch statistics).

  Raises:
    ValueError: a module that needs a dropout key, has variables other than
      params, puts a Linen norm over a width group, or gives other logits.
  """
  name = type(module).__name__
  kinds: dict[str, type] = {}

  def record(call, args, kwargs, context):
    kinds.setdefault("/".join(context.module.path), type(context.module))
    return call(*args, **kwargs)

  x = jnp.zeros((1, *input_shape), jnp.float32)
  with linen.intercept_methods(record):
    variables = module.init(jax.random.key(seed), x)
  if set(variables) - {"params"}:
    raise ValueError(f"{name}: a Linen model may hold params only, not "
                     f"{sorted(set(variables) - {'params'})}")
  try:
    logits = module.apply(variables, x)
  except errors.InvalidRngError as e:
    raise ValueError(f"{name}: a Linen model must be deterministic (its "
                     f"dropout is not supported): {e}") from None
  if jnp.shape(logits) != (1, num_classes):
    raise ValueError(f"{name}: inputs [1, {', '.join(map(str, input_shape))}]"
                     f" give outputs {list(jnp.shape(logits))}, not the "
                     f"[1, {num_classes}] logits")
  bridged = nnx.bridge.ToNNX(module)
  for key, value in _as_nnx(variables["params"]).items():
    setattr(bridged, key, nnx.data(value))
  model = from_module(bridged)
  for layer in model.layers:
    if layer.params and issubclass(
        kinds.get(layer.name, object), _LINEN_NORMS):
      raise ValueError(
          f"{layer.name}: a Linen {kinds[layer.name].__name__} over a width "
          f"group would count the units a client lacks")

  def apply(params, *args, **kwargs) -> jax.Array:
    token = _UNITS.set(axes.group_sizes(model.layers, params))
    try:
      return model.apply(params, *args, **kwargs)
    finally:
      _UNITS.reset(token)

  return dataclasses.replace(model, apply=apply)


__all__ = ["from_linen", "with_width_axes"]
