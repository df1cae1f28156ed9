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
import inspect
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_tl.models import axes, norms

Params = Any  # a nested dict of arrays


class ExitPoint(NamedTuple):
  """Where an early-exit classifier may read a model's features: after
  layer `after` (a name in `ModelDef.layers`), features of `channels`
  units in width group `group` (None: uncut), `[batch, ..., channels]`, as
  the module's `__call__(..., features=True)` returns them in order."""
  after: str
  group: str | None
  channels: int


class Options(NamedTuple):
  """The config values a model builder may read (the `model` section)."""
  hidden: Sequence[int] = (256, 256)
  cnn_channels: Sequence[int] = (32, 64)
  cnn_dense: int = 128
  dropout: float | None = None
  conv_impl: str = "auto"
  resnet_widths: Sequence[int] = (64, 128, 256, 512)
  norm: str | None = None  # "batch" (static), "layer", "group"; None: own
  norm_groups: int = 4
  # None: the model's own (the transformer's 256, HeteroFL's WikiText-2
  # shape; the lstm's 8, fedjax's Shakespeare model).
  embed_dim: int | None = None
  num_heads: int = 8
  mlp_dim: int = 512
  num_layers: int = 4
  patch: int = 0  # image patches as tokens (0: rows)


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
    static_batch_norm: whether the model has batch norms without running
      statistics (HeteroFL's sBN): they use the batch's statistics in
      training, and at evaluation those of data, which `apply(...,
      collect=True)` returns and `apply(..., stats=...)` takes.
    adapter_targets: the layers LoRA adapts (None: every layer with a
      kernel).
    exit_points: where early exits may be added (models.exits), bottom-up;
      the model's own output is the deepest exit. Empty: no early exits
      (the module's `__call__` then need not take `features`).
    exits: the exit classifiers' layers of a model with early exits
      (models.exits.with_exits), bottom-up, the output layer last; its
      `apply(..., exits=True)` returns `[exits, batch, classes]` logits.
      Empty: one output.
    exit_prediction: how a sub-model of an early-exit model predicts
      (models.exits.predict): "mean", the mean of the exits it holds
      (DepthFL), or "deepest", its deepest held exit (ScaleFL).
  """
  apply: Callable[..., jax.Array]
  init_params: Params
  layers: tuple[axes.Layer, ...]
  dropout: tuple[float, ...] = ()
  masks_activations: bool = False
  static_batch_norm: bool = False
  adapter_targets: tuple[str, ...] | None = None
  exit_points: tuple[ExitPoint, ...] = ()
  exits: tuple[str, ...] = ()
  exit_prediction: str = "mean"

  def __post_init__(self):
    self.groups  # checks the axes against the params once, at build time
    if self.normalised and not self.masks_activations:
      raise ValueError("a model with normalisation layers over width groups "
                       "must apply `units` (masks_activations = True): its "
                       "norms need the units a client holds")

  @functools.cached_property
  def groups(self) -> dict[str, int]:
    """Units of each width group, in the order the groups first appear."""
    return axes.group_sizes(self.layers, self.init_params)

  @property
  def normalised(self) -> bool:
    """Whether the model has normalisation layers over width groups: their
    statistics need the held units (`units`) in every forward, and they
    absorb HeteroFL's scaler, which is then the identity at evaluation."""
    return any(layer.norm for layer in self.layers)

  @property
  def has_dropout(self) -> bool:
    """Whether a training forward (with `rng`) differs from evaluation."""
    return any(rate > 0 for rate in self.dropout)


WIDTH_AXES = "width_axes"  # param metadata naming a param's width groups
POSITIONS = "positions"  # param metadata: a conv's output positions

# Flax's own norms count every unit, held or not: over a width group they
# would not be the sub-model's norms (`models.norms.Norm` is).
_FLAX_NORMS = (nnx.LayerNorm, nnx.GroupNorm, nnx.BatchNorm, nnx.RMSNorm)


def _layer_name(path: tuple) -> str:
  return "/".join(map(str, path)) or "root"


def _node(module: nnx.Module, path: tuple) -> Any:
  for key in path:
    module = (module[key] if isinstance(key, int) or isinstance(
        module, Mapping) else getattr(module, key))
  return module


def _module_order(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
  """The paths of `node`'s sub-modules in the order they were assigned
  (list items in order): a model's layers bottom-up, as it builds them."""
  yield prefix
  items = (enumerate(node) if isinstance(node, (list, tuple, nnx.List))
           else node.items() if isinstance(node, Mapping)
           else vars(node).items() if isinstance(node, nnx.Module) else ())
  for key, value in items:
    if isinstance(value, (nnx.Module, list, tuple, Mapping)):
      yield from _module_order(value, prefix + (key,))


def axes_from_metadata(module: nnx.Module, flat: Sequence[tuple]
                       ) -> tuple[axes.Layer, ...]:
  """The layers of a module whose params name their width groups in their
  metadata (`nnx.Linear(..., kernel_metadata={"width_axes": (None, "h")})`;
  `"positions"` gives a convolution's output positions), in the order the
  module assigned them (depth policies count layers bottom-up)."""
  found: dict[str, dict[str, Any]] = {}
  for path, variable in flat:
    meta = variable.get_metadata()
    name = _layer_name(path[:-1])
    entry = found.setdefault(name, {"params": {}, "positions": None,
                                    "node": path[:-1]})
    if meta.get(WIDTH_AXES) is not None:
      entry["params"][path[-1]] = meta[WIDTH_AXES]
    entry["positions"] = meta.get(POSITIONS, entry["positions"])
  layers = []
  for name, entry in found.items():
    node = _node(module, entry["node"])
    if isinstance(node, _FLAX_NORMS) and entry["params"]:
      raise ValueError(
          f"{name}: a flax {type(node).__name__} over a width group would "
          f"count the units a client lacks; use fedjax_tl.models.norms.Norm")
    layers.append(axes.layer(name, positions=entry["positions"],
                             norm=isinstance(node, norms.Norm),
                             **entry["params"]))
  order = {_layer_name(path): i for i, path in
           enumerate(_module_order(module))}
  return tuple(sorted(layers, key=lambda layer: order.get(layer.name,
                                                          len(order))))


def from_module(module: nnx.Module) -> ModelDef:
  """The :class:`ModelDef` of an NNX module.

  Its width groups come from its `axes()` method if it has one, else from
  its params' `width_axes` metadata (:func:`axes_from_metadata`). Nested
  modules are flattened: the layer `blocks/0/up` holds the params of
  `module.blocks[0].up`. Optional attributes: `dropout_rates`,
  `masks_activations = True` (its `__call__(x, rng, units)` multiplies each
  group's outputs by `units[group]`), `static_batch_norm`, an
  `adapter_targets()` method (the layers LoRA adapts) and an
  `exit_points()` method (:class:`ExitPoint`s; its `__call__(...,
  features=True)` then returns `(logits, [features at each point])`). Its
  `__call__` is given `rng` and `units` only if it takes them; variables
  other than params (e.g. an `nnx.Dropout`'s key) stay as they are.
  """
  graphdef, state, rest = nnx.split(module, nnx.Param, ...)
  flat = list(nnx.to_flat_state(state))
  where = {}
  init_params: dict[str, dict[str, Any]] = {}
  for path, variable in flat:
    name = _layer_name(path[:-1])
    where[name] = path[:-1]
    init_params.setdefault(name, {})[path[-1]] = variable.get_value()
  layers = (tuple(module.axes()) if hasattr(module, "axes") else
            axes_from_metadata(module, flat))
  takes = inspect.signature(type(module).__call__).parameters
  passed = [arg for arg in ("rng", "units") if arg in takes]

  def apply(params: Params, x: jax.Array, rng: jax.Array | None = None,
            units=None, **kwargs) -> jax.Array:
    nested: dict = {}
    for name, layer in params.items():
      node = nested
      for key in where[name]:
        node = node.setdefault(key, {})
      node.update(layer)
    merged = jax.tree.map(lambda a: a, state)
    nnx.replace_by_pure_dict(merged, nested)
    given = {"rng": rng, "units": units}
    # Fresh copies of the other variables too: a call must not share (or,
    # under jit, mutate) another's.
    return nnx.merge(graphdef, merged, jax.tree.map(lambda a: a, rest))(
        x, **{arg: given[arg] for arg in passed}, **kwargs)

  return ModelDef(apply=apply, init_params=init_params, layers=layers,
                  dropout=tuple(getattr(module, "dropout_rates", ())),
                  masks_activations=getattr(module, "masks_activations",
                                            False),
                  static_batch_norm=getattr(module, "static_batch_norm",
                                            False),
                  adapter_targets=(tuple(module.adapter_targets())
                                   if hasattr(module, "adapter_targets")
                                   else None),
                  exit_points=(tuple(module.exit_points())
                               if hasattr(module, "exit_points") else ()))


def num_params(params: Params) -> int:
  return sum(int(jnp.size(a)) for a in jax.tree.leaves(params))
