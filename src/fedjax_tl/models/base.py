"""A model as the simulation sees it: a pure `apply`, a params dict and the
named axes (:mod:`fedjax_tl.models.axes`) that capacity policies cut.

A model is written as a flax NNX module with an `axes()` method listing its
layers bottom-up with their parameters' axes, and a `dropout_rates` tuple.
:func:`from_module` splits it once: the simulation works on the pure params
dict (`{layer: {param: array}}`) and a pure `apply`, which optionally takes
a PRNG key (train-time dropout) and per-group unit multipliers (width masks
applied to activations instead of parameters).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_tl.models import axes

Params = Any  # a nested dict of arrays


class Options(NamedTuple):
  """The config values a model builder may read (the `model` section)."""
  hidden: Sequence[int] = (256, 256)
  cnn_channels: Sequence[int] = (32, 64)
  cnn_dense: int = 128
  dropout: float | None = None
  conv_impl: str = "auto"


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
  """A model ready for simulation.

  Attributes:
    apply: `apply(params, x[batch, *input_shape], rng=None, units=None) ->
      logits[batch, classes]`. With a PRNG key `rng` the model's dropout is
      on (training); without, the forward is deterministic (evaluation).
      `units`, one `[group size]` vector per width group (by name),
      multiplies each hidden layer's outputs before its activation (see
      `layers.scale_units`).
    init_params: freshly initialised params (a pure dict of arrays).
    layers: the layers and their parameters' named axes, bottom-up.
    dropout: the dropout rate of each of the model's dropout sites, in
      forward order (all 0 or empty: `rng` changes nothing).
    masks_activations: whether `apply` multiplies every group's outputs by
      `units`; width policies then mask activations, which is faster, and
      otherwise mask the params (a model that ignores `units` stays right).
  """
  apply: Callable[..., jax.Array]
  init_params: Params
  layers: tuple[axes.Layer, ...]
  dropout: tuple[float, ...] = ()
  masks_activations: bool = False

  def __post_init__(self):
    self.groups  # checks the axes against the params once, at build time

  @functools.cached_property
  def groups(self) -> dict[str, int]:
    """Units of each width group, in the order the groups first appear."""
    return axes.group_sizes(self.layers, self.init_params)

  @property
  def has_dropout(self) -> bool:
    """Whether a training forward (with `rng`) differs from evaluation."""
    return any(rate > 0 for rate in self.dropout)


def from_module(module: nnx.Module) -> ModelDef:
  """The :class:`ModelDef` of an NNX module with `axes()`, and optionally
  `dropout_rates` and `masks_activations = True` (its `__call__` applies
  `units`)."""
  graphdef, state = nnx.split(module)
  init_params = nnx.to_pure_dict(state)

  def apply(params: Params, x: jax.Array, rng: jax.Array | None = None,
            units=None) -> jax.Array:
    merged = jax.tree.map(lambda a: a, state)
    nnx.replace_by_pure_dict(merged, params)
    return nnx.merge(graphdef, merged)(x, rng, units)

  return ModelDef(apply=apply, init_params=init_params,
                  layers=tuple(module.axes()),
                  dropout=tuple(getattr(module, "dropout_rates", ())),
                  masks_activations=getattr(module, "masks_activations",
                                            False))


def num_params(params: Params) -> int:
  return sum(int(jnp.size(a)) for a in jax.tree.leaves(params))
