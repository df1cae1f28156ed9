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
holds exactly k. The mask is re-extracted from the params every round.

Local training follows the authors': t is fixed for the round, but each
local step's forward pass runs on `w * (|w| >= t)` of the client's current
params (`Policy.reparam`, `thresholded`), so a held weight that SGD moves
below t leaves the forward pass, and gets no gradient, for the rest of the
round; an entry not held at the round's start is never updated, so it never
joins. The gradient is the plain one on the entries in the step's forward
and none elsewhere: the authors' `Bern`, written as a straight-through
estimator, returns a bool tensor, which PyTorch's autograd never
differentiates, so its `backward` (the factor 1 + 2t|w|/(|w| + t)^2 on held
weights) never runs (checked with PyTorch: the mask has
`requires_grad=False` and the backward is not called). A client uploads its
delta on the round-start mask (`train`), zero elsewhere, and the server
averages each entry over the clients whose delta is non-zero there
(`Policy.changed_only`), so a holder that left an entry unchanged (a ReLU
unit off on its data) does not dilute the others' average. A tier of
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
- fiarse/worker.py (`local_training`): plain SGD (no momentum, no weight
  decay) through the masked layers at every step; the upload is `cache -
  current` of every entry, zero where the client never had a gradient.
- fiarse/model/model_utils.py, lines 24-38: `Bern`'s forward is `scores >=
  threshold`, a bool, so its backward is dead code (above).

Departures left:
- Their server's average is unweighted; here each client is weighted by
  its example count, as for every mask policy (FedAvg's n_k). Their runs
  (`--partitioner balanced`, data/data_utils.py `BalancedDirichlet`) give
  every client N/n examples, where the two agree.
- Their client sends its whole dense delta and the server the whole model;
  here traffic counts the held entries only (docs/policies.md).
- With a client optimiser they do not use (momentum, weight decay), a
  weight that left the forward still moves by its momentum or decay and may
  rejoin, as in PyTorch; but entries off the round-start mask are never
  updated here, where PyTorch's weight decay would shrink them too.
- `fiarse_scope=layer` takes a threshold per layer of the model's list (each
  convolution or dense layer), where the authors' take one per ResNet block.
"""

from __future__ import annotations

import functools
from typing import Callable

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


def magnitude_thresholds(model: ModelDef, width: jax.Array, params: Params,
                         *, scope: str = "global"
                         ) -> dict[tuple[str, str], jax.Array]:
  """`{(layer, param): t}` for every cut param: t the magnitude of the top
  `width` fraction over the whole model ("global") or over its layer
  ("layer")."""
  groups = cut_layers(model, params)
  if scope == "global":
    groups = [[pair for group in groups for pair in group]]
  thresholds = {}
  for group in groups:
    threshold = top_fraction_threshold(jnp.concatenate(
        [jnp.abs(params[name][param]).ravel() for name, param in group]),
        width)
    thresholds.update((pair, threshold) for pair in group)
  return thresholds


def held(w: jax.Array, threshold: jax.Array) -> jax.Array:
  """0/1 like `w`: `|w| >= threshold` (the authors' `Bern` forward), with no
  gradient."""
  return jax.lax.stop_gradient((jnp.abs(w) >= threshold).astype(w.dtype))


def magnitude_masks(model: ModelDef, width: jax.Array, params: Params, *,
                    scope: str = "global") -> Params:
  """0/1 masks (the tree of `params`): the cut params with |w| >= t, t the
  magnitude of the top `width` fraction over the whole model ("global") or
  over each layer ("layer"); everything else is kept."""
  masks = jax.tree.map(jnp.ones_like, params)
  for (name, param), threshold in magnitude_thresholds(
      model, width, params, scope=scope).items():
    masks[name][param] = held(params[name][param], threshold)
  return masks


def thresholded(model: ModelDef, width: jax.Array, params: Params, *,
                scope: str = "global") -> Callable[[Params], Params]:
  """`local -> params` as a local step's forward sees them: each cut param
  times `|w| >= t` of its current value, t fixed from the round's global
  `params` (`Policy.reparam`; the authors' masked layers, model_utils.py
  lines 52-63 and 107-125). The mask has no gradient: a held weight gets
  the plain gradient, an entry off it none (their `Bern` returns a bool
  tensor, which PyTorch's autograd does not differentiate, so its
  `backward` never runs)."""
  thresholds = magnitude_thresholds(model, width, params, scope=scope)

  def forward_params(local: Params) -> Params:
    seen = {name: dict(layer) for name, layer in local.items()}
    for (name, param), threshold in thresholds.items():
      w = local[name][param]
      seen[name][param] = w * held(w, threshold)
    return seen

  return forward_params


def _masks(model: ModelDef, width, params, round_index, key, *, scope: str):
  del round_index, key
  mask = magnitude_masks(model, width, params, scope=scope)
  return mask, mask


def fiarse(options: base.Options) -> base.Policy:
  scope = options.fiarse_scope
  return base.Policy(
      name="fiarse", widths=base.tier_width,
      masks=functools.partial(_masks, scope=scope),
      deployed=functools.partial(magnitude_masks, scope=scope),
      reparam=functools.partial(thresholded, scope=scope),
      changed_only=True, keys=("fiarse_scope",))
