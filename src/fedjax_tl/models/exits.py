"""Early exits: a classifier at each depth of a model, as DepthFL and
ScaleFL train them.

:func:`with_exits` adds to a model with `exit_points` (models.base.ExitPoint)
one linear classifier per point, `exit_i`, reading the point's features
globally average-pooled over their positions; the model's own output layer
is the deepest exit. The exits split the layers into depth blocks: block i
holds the layers after exit i-1 up to exit i (`depth_blocks`), so a device
that holds the first d blocks holds d exits. The model's `apply(...,
exits=True)` returns every exit's logits; `apply` alone their mean, the
ensemble DepthFL predicts with (:func:`ensemble` over the exits a sub-model
holds), or with `prediction="deepest"` the deepest exit, as ScaleFL
predicts (:func:`predict`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_tl.models import axes
from fedjax_tl.models.base import ModelDef, Params


def _head(layer: Params, features: jax.Array) -> jax.Array:
  pooled = features.reshape(features.shape[0], -1, features.shape[-1]).mean(1)
  return pooled @ layer["kernel"] + layer["bias"]


def _output_layer(model: ModelDef) -> str:
  """The model's output layer: its top layer (the deepest exit)."""
  return model.layers[-1].name


def with_exits(model: ModelDef, seed: int, prediction: str = "mean"
               ) -> ModelDef:
  """`model` with an early-exit classifier at each of its exit points.

  Exit i is `exit_i`, `{"kernel": [channels, classes], "bias": [classes]}`
  (LeCun-normal kernel and zero bias, as flax's Linear), cut on its input
  axis with the features' width group; its layer follows the layer it reads
  from. The params the model had keep their values. A model without exit
  points is one depth block, its output the only exit. `prediction` is how
  a sub-model predicts (`ModelDef.exit_prediction`, :func:`predict`).
  """
  output = _output_layer(model)
  classes = model.init_params[output]["bias"].shape[-1]
  keys = jax.random.split(jax.random.key(seed), len(model.exit_points))
  params, heads = dict(model.init_params), []
  by_layer = {}
  for i, (point, key) in enumerate(zip(model.exit_points, keys)):
    name = f"exit_{i}"
    params[name] = {
        "kernel": nnx.initializers.lecun_normal()(
            key, (point.channels, classes), jnp.float32),
        "bias": jnp.zeros((classes,), jnp.float32)}
    by_layer[point.after] = axes.dense(name, point.group, None)
    heads.append(name)
  layers = []
  for layer in model.layers:
    layers.append(layer)
    if layer.name in by_layer:
      layers.append(by_layer[layer.name])
  names = tuple(heads)
  base_apply = model.apply

  def apply(params: Params, x: jax.Array, rng: jax.Array | None = None,
            units=None, *, exits: bool = False, **kwargs):
    base = {k: v for k, v in params.items() if k not in names}
    if kwargs.get("collect"):  # a static batch norm's statistics
      return base_apply(base, x, rng, units, **kwargs)
    if not names:
      logits = base_apply(base, x, rng, units, **kwargs)
      return logits[None] if exits else logits
    logits, features = base_apply(base, x, rng, units, features=True,
                                  **kwargs)
    stacked = jnp.stack([_head(params[n], f).astype(logits.dtype)
                         for n, f in zip(names, features)] + [logits])
    if exits:
      return stacked
    return stacked[-1] if prediction == "deepest" else stacked.mean(0)

  return ModelDef(apply=apply, init_params=params, layers=tuple(layers),
                  dropout=model.dropout,
                  masks_activations=model.masks_activations,
                  static_batch_norm=model.static_batch_norm,
                  adapter_targets=model.adapter_targets,
                  exits=names + (output,), exit_prediction=prediction)


def depth_blocks(model: ModelDef) -> np.ndarray:
  """`[layers]` int: the depth block of each of `model.layers` (the index
  of the first exit at or above it)."""
  blocks, block = [], 0
  for layer in model.layers:
    blocks.append(block)
    if layer.name in model.exits:
      block += 1
  return np.minimum(np.asarray(blocks, np.int32), len(model.exits) - 1)


def held_exits(model: ModelDef, mask: Params) -> jax.Array:
  """`[exits]` bool: the exits whose classifier `mask` holds (any entry)."""
  return jnp.stack([
      jnp.any(jnp.stack([jnp.any(m != 0) for m in jax.tree.leaves(
          mask[name])])) for name in model.exits])


def ensemble(logits: jax.Array, held: jax.Array) -> jax.Array:
  """The mean of the held exits' logits (`[exits, ...]` -> `[...]`), as
  DepthFL predicts (the authors' `test`: the outputs summed and divided
  by their number)."""
  weights = held.astype(logits.dtype)
  weights = weights / jnp.maximum(weights.sum(), 1)
  return jnp.tensordot(weights, logits, axes=1)


def deepest(logits: jax.Array, held: jax.Array) -> jax.Array:
  """The deepest held exit's logits (`[exits, ...]` -> `[...]`), as
  ScaleFL predicts (the authors' `predict.validate` reports the last
  output of `model(x, manual_early_exit_index=level's exits)`)."""
  return logits[deepest_index(held)]


def deepest_index(held: jax.Array) -> jax.Array:
  """The index of the deepest exit `held[exits]` marks."""
  return jnp.argmax(held * (1 + jnp.arange(held.shape[0])))


PREDICTIONS = {"mean": ensemble, "deepest": deepest}


def predict(logits: jax.Array, held: jax.Array, prediction: str
            ) -> jax.Array:
  """A sub-model's prediction from its exits' logits `[exits, ...]`:
  `prediction` "mean" (:func:`ensemble`) or "deepest" (:func:`deepest`)
  of the exits it holds (`held`)."""
  return PREDICTIONS[prediction](logits, held)


def start(params: Params, model: ModelDef) -> Params:
  """The pretrained params under the exit model's fresh classifiers."""
  return {**model.init_params, **params}
