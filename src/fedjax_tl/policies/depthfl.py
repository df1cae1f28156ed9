"""DepthFL (Kim, Kim, Jeon, Park et al., ICLR 2023): depth-wise sub-models
with a classifier at every depth and mutual self-distillation.

The model gets an early-exit classifier at each of its exit points
(models.exits: after the hidden layers of an MLP, after stages 1-3 of a
ResNet; the model's own output is the deepest), which splits it into E
depth blocks. A device of capacity p holds and trains the first
`d = ceil(p * E)` blocks with their d classifiers; its loss sums, over its
classifiers, the cross-entropy plus a weight times the mean KL divergence
from each of its other classifiers (their outputs fixed, temperature 1):
mutual self-distillation (client.exit_loss). The weight ramps up as
`exit_kd_weight * exp(-5 (1 - min(r, R) / R)^2)` over the first
`R = exit_kd_rampup` rounds. The server averages every parameter over the
clients holding it; a tier predicts with the mean of its classifiers'
logits.

Source: the Flower baseline by the paper's authors,
github.com/adap/flower/tree/main/baselines/depthfl (commit 1df316e):
`depthfl/models.py` (`KLLoss`, `_train_one_epoch`: `criterion(out_i) +
consistency_weight * KL(out_i, out_j.detach()) / (n - 1)`; `test`: the
classifiers' outputs summed and divided by their number), `client.py`
(`consistency_weight_constant = 300`, the ramp above), `strategy.py`
(`aggregate`: each parameter averaged over the clients that hold it).
Its settings: ResNet-18 with GroupNorm or BatchNorm, 100 clients, 10% per
round, 5 local epochs of batch 50, SGD lr 0.1 decayed by 0.998 per round,
weight decay 1e-3, 1,000 rounds, four equal groups of depth 1-4; Flower's
table: 76.06% on CIFAR-100 (HeteroFL 57.61%).

Where this differs: the authors' early classifiers read their stage
through an attention module and separable-convolution bottlenecks
(`scala_i`, `attention_i` in `depthfl/resnet.py`); here each is a linear
classifier on the globally pooled features. The authors' server runs
FedDyn on top (`strategy.FedDyn`); here the server optimiser is the
config's `algorithm` (FedAvg by default), which weighs clients by their
examples where the authors' mean is unweighted.
"""

import functools

import jax
import jax.numpy as jnp

from fedjax_tl.client import ExitTerms
from fedjax_tl.models import exits
from fedjax_tl.models.base import ModelDef
from fedjax_tl.policies import base, capacity


def held_blocks(model: ModelDef, width: jax.Array) -> jax.Array:
  """`[layers]` 0/1: the layers of the first ceil(p * E) depth blocks."""
  depth = capacity.kept_units(width, len(model.exits))
  return (jnp.asarray(exits.depth_blocks(model)) < depth).astype(jnp.float32)


def block_masks(model: ModelDef, width: jax.Array, params) -> dict:
  """A mask like `params`: 1 on the layers of the first ceil(p * E) depth
  blocks (:func:`held_blocks`), 0 on the others."""
  held = held_blocks(model, width)
  return {spec.name: jax.tree.map(lambda p: jnp.full_like(p, held[i]),
                                  params[spec.name])
          for i, spec in enumerate(model.layers)}


def _depth_masks(model: ModelDef, width, params, round_index=None, key=None):
  del round_index, key
  mask = block_masks(model, width, params)
  return mask, mask


def rampup(round_index: jax.Array, rounds: int) -> jax.Array:
  """DepthFL's consistency ramp, `exp(-5 (1 - min(r, R) / R)^2)` (1 for
  R = 0)."""
  if rounds <= 0:
    return jnp.float32(1.0)
  phase = 1.0 - jnp.minimum(round_index, rounds) / rounds
  return jnp.exp(-5.0 * phase * phase).astype(jnp.float32)


def exit_terms(model: ModelDef, train, round_index, *, mutual: bool,
               options: base.Options) -> ExitTerms:
  """A client's exits (those its `train` mask holds) and the round's
  distillation weight, at temperature 1 as the authors distil."""
  return ExitTerms(
      held=exits.held_exits(model, train),
      kd_weight=options.exit_kd_weight * rampup(round_index,
                                                options.exit_kd_rampup),
      temperature=jnp.float32(1.0), mutual=jnp.bool_(mutual))


def depthfl(options: base.Options) -> base.Policy:
  return base.Policy(
      name="depthfl", widths=base.tier_width, masks=_depth_masks,
      deployed=lambda model, width, params: _depth_masks(model, width,
                                                         params)[0],
      adapt_model=exits.with_exits,
      start=exits.start,
      exit_terms=functools.partial(exit_terms, mutual=True, options=options),
      keys=("exit_kd_weight", "exit_kd_rampup"))
