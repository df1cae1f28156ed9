"""FIARSE (Wu, Wang, Wang, Liu, Su, Gao, NeurIPS 2024): importance-aware
sub-model extraction, importance being a parameter's magnitude.

In every round a client of capacity p holds, and trains, the parameters of
largest magnitude in the current global model: with the n parameters of the
cut layers (every convolution, dense and embedding layer, the first and the
output layer included, kernels and biases alike; normalisation layers are
never cut, so every client trains them), k = max(1, floor(p*n)) and t the
k-th largest |w|, a parameter is held iff |w| >= t. The threshold is global,
over the whole model (`fiarse_scope=global`, the authors' main code), or
taken separately in each layer (`fiarse_scope=layer`). Ties at t are all
held (the authors' `>=`), so a tier may hold more than k entries when
magnitudes tie, e.g. zero-initialised biases once t reaches 0; otherwise it
holds exactly k. The mask is re-extracted from the params every round. The
server averages each entry over the clients that trained it, and a tier of
capacity p deploys the top-p magnitude sub-model of the final global model.
The masks are on parameters, not units: no activation masks (`units` is
None), no tier fast path (`fixed_widths` is None).

The authors' code (github.com/HarliWu/FIARSE, commit 281519c):
- fiarse/model/resnet_masked.py, lines 72-93 (`generate_mask`): the
  threshold is `torch.topk(|w|, k=int(numel*model_size)).values[-1]` over
  the concatenation of every masked layer's weight and bias (`to_vector`,
  lines 114-123: conv1, layer1-4 and the output `linear`), and one threshold
  is set on every layer; fiarse/model/model_utils.py, lines 52-63 and
  107-125: a layer's forward multiplies weight and bias by
  `Bern(|w|, threshold)`, i.e. `|w| >= threshold`; lines 191-217: the norm
  layers have `size = 0` and no mask.
- fiarse_layerwise/model/resnet_masked.py, lines 125-142
  (`layer_wise_generate_mask`): one threshold per block (conv1, layer1, ...,
  linear), used for CIFAR-100.
- fiarse/server.py, line 55: each participant's mask is generated from the
  current global model every round; lines 67-88: the deltas are summed and
  each entry divided by the number of clients whose delta is non-zero there
  (global lr 1 by default, fiarse/add_parser_arguments.py line 6); lines
  103-107: a tier is tested with `generate_mask(m_size)` on the global model.
- Settings: ResNet-18 with static batch norm, sizes {1, 1/4, 1/16, 1/64} or
  {1, 0.64, 0.36, 0.16, 0.04} in equal shares, 100 clients, 10 a round, 100
  local SGD steps of batch 20 (README.md).

Departures, where this engine's fixed per-round masks cannot follow:
- The authors' threshold t is fixed for the round but `|w| >= t` is
  re-evaluated at every local step, so a held weight whose magnitude falls
  below t mid-round drops out of the forward pass; here the round's mask is
  fixed, as for every mask policy.
- Their `Bern` (model_utils.py, lines 24-38) is a straight-through mask whose
  backward is d/d|w| of (|w| - t)/(|w| + t) on held entries, so a held
  weight's gradient is multiplied by 1 + 2t|w|/(|w| + t)^2, a factor in
  (1, 1.5] (1.5 at the threshold); here held weights get the plain gradient.
- Their server averages each entry over the clients with a non-zero delta,
  unweighted; here over the clients holding it, weighted by examples as for
  every mask policy.
- `fiarse_scope=layer` takes a threshold per layer of the model's list (each
  convolution or dense layer), where the authors' take one per ResNet block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fedjax_tl.models.base import ModelDef, Params
from fedjax_tl.policies import base

SCOPES = ("global", "layer")


def kept_count(fraction: jax.Array, size: int) -> jax.Array:
  """floor(fraction * size) entries, at least one (the authors'
  `int(numel * model_size)`); the small slack keeps exact products such as
  0.25 * 64 from rounding down. float32: past ~10^6 entries k may be off by
  one."""
  return jnp.clip(jnp.floor(fraction * size + 1e-4), 1, size).astype(
      jnp.int32)


def top_fraction_threshold(magnitudes: jax.Array, fraction: jax.Array
                           ) -> jax.Array:
  """The k-th largest of the 1-D `magnitudes`, k = `kept_count`."""
  size = magnitudes.shape[0]
  # The barrier keeps XLA from constant-folding the sort when the params are
  # constants (the time model's masks of the initial params): seconds each.
  ordered = jnp.sort(jax.lax.optimization_barrier(magnitudes))
  return ordered[size - kept_count(fraction, size)]


def cut_layers(model: ModelDef, params: Params) -> list[list[tuple[str, str]]]:
  """`(layer, param)` pairs of each layer whose params FIARSE cuts: every
  declared layer but the normalisation layers."""
  layers = [[(spec.name, param) for param, _ in spec.params
             if param in params[spec.name]]
            for spec in model.layers if not spec.norm]
  return [layer for layer in layers if layer]


def magnitude_masks(model: ModelDef, width: jax.Array, params: Params, *,
                    scope: str = "global") -> Params:
  """0/1 masks (the tree of `params`): the cut params with |w| >= t, t the
  magnitude of the top `width` fraction over the whole model ("global") or
  over each layer ("layer"); everything else is kept."""
  groups = cut_layers(model, params)
  if scope == "global":
    groups = [[pair for group in groups for pair in group]]
  masks = jax.tree.map(jnp.ones_like, params)
  for group in groups:
    magnitudes = [jnp.abs(params[name][param]) for name, param in group]
    threshold = top_fraction_threshold(
        jnp.concatenate([m.ravel() for m in magnitudes]), width)
    for (name, param), m in zip(group, magnitudes):
      masks[name][param] = (m >= threshold).astype(params[name][param].dtype)
  return masks


def _masks(model: ModelDef, width, params, round_index, key, *, scope: str):
  del round_index, key
  mask = magnitude_masks(model, width, params, scope=scope)
  return mask, mask


def fiarse(options: base.Options) -> base.Policy:
  scope = options.fiarse_scope
  return base.Policy(
      name="fiarse", widths=base.tier_width,
      masks=functools.partial(_masks, scope=scope),
      deployed=functools.partial(magnitude_masks, scope=scope))
