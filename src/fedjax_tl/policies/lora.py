"""Low-rank adapters on a frozen backbone, and HetLoRA's rank rules.

Every layer of the migrated model that LoRA targets (the model's
`adapter_targets`, by default every layer with a kernel) gets LoRA factors
`lora_a[fan_in, r_max]` and `lora_b[r_max, out]`; the layer runs with
`kernel + lora_a @ lora_b`. The other layers stay frozen. A
client of rank r holds and trains the first r components only (a mask, so one
vmap serves every rank); HetLoRA (Cho et al., EMNLP 2024) merges the clients'
zero-padded factors weighted by the Frobenius norm of their product.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from fedjax_tl.policies.capacity import kept_units
from fedjax_tl.models.axes import Layer
from fedjax_tl.models.base import ModelDef, Params

LORA_KEYS = ("lora_a", "lora_b")


def _fan_in(kernel_shape: Sequence[int]) -> int:
  return math.prod(kernel_shape[:-1])


def add_adapters(params: Params, layers: Sequence[Layer], rank: int,
                 key: jax.Array,
                 targets: Sequence[str] | None = None) -> Params:
  """`params` with fresh LoRA factors on the `targets` layers (None: every
  layer with a kernel).

  `lora_a` is Gaussian with variance 1/fan_in and `lora_b` zero (as LoRA
  initialises them), so the adapted model starts as the backbone.

  Raises:
    ValueError: a target that is not a layer with a kernel.
  """
  out = dict(params)
  if targets is not None:
    wrong = [t for t in targets if "kernel" not in params.get(t, {})]
    if wrong:
      raise ValueError(f"adapter target {wrong[0]!r} is not a layer with a "
                       f"kernel")
  layers = [spec for spec in layers if "kernel" in params[spec.name] and (
      targets is None or spec.name in targets)]
  for spec, layer_key in zip(layers, jax.random.split(key, len(layers))):
    layer = params[spec.name]
    shape = layer["kernel"].shape
    fan_in = _fan_in(shape)
    out[spec.name] = {
        **layer,
        "lora_a": jax.random.normal(layer_key, (fan_in, rank), jnp.float32) /
                  math.sqrt(fan_in),
        "lora_b": jnp.zeros((rank, shape[-1]), jnp.float32)}
  return out


def backbone(params: Params) -> Params:
  """The params without their adapters."""
  return {name: {k: v for k, v in layer.items() if k not in LORA_KEYS}
          for name, layer in params.items()}


def with_backbone(params: Params, backbone_params: Params) -> Params:
  """`params`' adapters on `backbone_params` (e.g. a pretrained model)."""
  return {name: {**layer, **backbone_params[name]}
          for name, layer in params.items()}


def low_rank_update(layer: Params) -> jax.Array:
  """An adapted layer's `a @ b`, shaped as its kernel."""
  return (layer["lora_a"] @ layer["lora_b"]).reshape(layer["kernel"].shape)


def merged(params: Params) -> Params:
  """Backbone kernels with their adapters folded in: `kernel + a @ b`."""
  out = {}
  for name, layer in params.items():
    if "lora_a" in layer:
      layer = {k: v for k, v in layer.items() if k not in LORA_KEYS} | {
          "kernel": layer["kernel"] + low_rank_update(layer)}
    out[name] = layer
  return out


def adapter_model(model: ModelDef, rank: int, seed: int) -> ModelDef:
  """`model` with rank-`rank` adapters: params gain `lora_a`/`lora_b`."""
  params = add_adapters(model.init_params, model.layers, rank,
                        jax.random.fold_in(jax.random.key(seed), 0x10A),
                        model.adapter_targets)
  apply = model.apply
  return dataclasses.replace(
      model, init_params=params,
      apply=lambda p, x, **kwargs: apply(merged(p), x, **kwargs))


def _adapted_layers(params: Params) -> list[Params]:
  return [layer for layer in params.values() if "lora_a" in layer]


def max_rank(params: Params) -> int:
  """r_max: the padded rank of the adapters."""
  return _adapted_layers(params)[0]["lora_a"].shape[-1]


def client_rank(fraction: jax.Array, r_max: int) -> jax.Array:
  """A device of capacity p gets rank ceil(p * r_max), at least 1."""
  return kept_units(fraction, r_max)


def rank_masks(rank: jax.Array, params: Params) -> tuple[Params, Params]:
  """`(present, train)` of a rank-`rank` client.

  The backbone is present (frozen, 0 in `train`); of the adapters, the first
  `rank` components (columns of `lora_a`, rows of `lora_b`) are held and
  trained, the rest are absent (truncation).
  """
  present, train = {}, {}
  for name, layer in params.items():
    if "lora_a" not in layer:  # a layer LoRA does not target: frozen
      present[name] = jax.tree.map(jnp.ones_like, layer)
      train[name] = jax.tree.map(jnp.zeros_like, layer)
      continue
    r_max = layer["lora_a"].shape[-1]
    keep = (jnp.arange(r_max) < rank).astype(jnp.float32)
    adapters = {"lora_a": jnp.broadcast_to(keep, layer["lora_a"].shape),
                "lora_b": jnp.broadcast_to(keep[:, None],
                                           layer["lora_b"].shape)}
    frozen = {k: v for k, v in layer.items() if k not in LORA_KEYS}
    present[name] = {**jax.tree.map(jnp.ones_like, frozen), **adapters}
    train[name] = {**jax.tree.map(jnp.zeros_like, frozen), **adapters}
  return present, train


def held_after_training(params: Params, delta: Params, present: Params
                        ) -> Params:
  """A client's params after training, as it holds them: adapters beyond its
  rank are not part of its model (zeroed)."""
  return jax.tree.map(lambda p, d, m: (p + d) * m, params, delta, present)


def component_norms(layer: Params) -> jax.Array:
  """`[r_max]` `||a_i|| * ||b_i||`: the Frobenius norm of each rank-1 term."""
  return (jnp.linalg.norm(layer["lora_a"], axis=0) *
          jnp.linalg.norm(layer["lora_b"], axis=1))


def self_pruned_rank(params: Params, rank: jax.Array, ratio: float,
                     threshold: float) -> jax.Array:
  """HetLoRA's rank self-pruning, decided after local training.

  The trailing components beyond `floor(ratio * rank)` are dropped when, in
  every layer, their part of the update `||B_tail A_tail||_F` is below
  `threshold` times the whole `||B A||_F`: they carry little of what the
  client learned. The rank never falls below 1.

  Args:
    params: the client's trained params (adapters zero beyond `rank`).
    rank: its current rank.
    ratio: the share of the rank kept when pruning, in (0, 1).
    threshold: the relative norm below which the tail is pruned.
  """
  pruned = jnp.maximum(jnp.floor(ratio * rank).astype(jnp.int32), 1)
  small = jnp.bool_(True)
  for layer in _adapted_layers(params):
    r_max = layer["lora_a"].shape[-1]
    tail = (jnp.arange(r_max) >= pruned) & (jnp.arange(r_max) < rank)
    whole = jnp.linalg.norm(layer["lora_a"] @ layer["lora_b"])
    part = jnp.linalg.norm((layer["lora_a"] * tail) @ layer["lora_b"])
    small = small & (part < threshold * whole)
  return jnp.where(small & (pruned < rank), pruned, rank)


def aggregation_terms(global_params: Params, local: Params, rank: jax.Array,
                      padded: bool = True) -> tuple[Params, Params]:
  """One client's HetLoRA contribution as `(delta, weight)` trees.

  HetLoRA's new global factors are `sum_k w_k pad(F_k) / sum_k w_k`, with
  `F_k` the client's factors zero-padded beyond its rank and
  `w_k = ||B_k A_k||_F` per layer. Relative to the global factors G that is
  the weighted mean of `pad(F_k) - G`, returned with `w_k` as the weight of
  every adapter entry (so a streamed `sum w * delta / sum w` gives it); the
  frozen backbone gets weight 0. The round multiplies `w_k` by the client's
  example count only with `lora_weighting="norm_x_examples"` (hetlora.py).

  The padding pulls every component towards zero by the weight of the
  clients that do not hold it, round after round, so components only large
  ranks hold fade ("rank collapse"). With `padded=False` each component is
  instead averaged over the clients holding it (weights `w_k` on the kept
  components only), as HeteroFL averages widths.
  """
  delta, weight = {}, {}
  for name, layer in local.items():
    if "lora_a" not in layer:  # frozen: no change, no weight
      delta[name] = weight[name] = jax.tree.map(jnp.zeros_like, layer)
      continue
    r_max = layer["lora_a"].shape[-1]
    keep = (jnp.arange(r_max) < rank).astype(jnp.float32)
    a = layer["lora_a"] * keep
    b = layer["lora_b"] * keep[:, None]
    norm = jnp.linalg.norm(a @ b)
    frozen = {k: v for k, v in layer.items() if k not in LORA_KEYS}
    g = global_params[name]
    held_a = 1.0 if padded else jnp.broadcast_to(keep, a.shape)
    held_b = 1.0 if padded else jnp.broadcast_to(keep[:, None], b.shape)
    delta[name] = {**jax.tree.map(jnp.zeros_like, frozen),
                   "lora_a": (a - g["lora_a"]) * held_a,
                   "lora_b": (b - g["lora_b"]) * held_b}
    weight[name] = {**jax.tree.map(jnp.zeros_like, frozen),
                    "lora_a": norm * held_a * jnp.ones_like(a),
                    "lora_b": norm * held_b * jnp.ones_like(b)}
  return delta, weight
