"""ScaleFL (Ilhan, Su, Liu, CVPR 2023): sub-models cut in width and in depth
together, early exits, and self-distillation from the deepest held exit.

The model gets an early-exit classifier at each of its E exit points
(models.exits, as for DepthFL), which split it into E depth blocks. The
authors give each of L complexity levels a width and a number of exits
(`--vertical_scale_ratios`, default 0.7, 0.7, 0.75, 1; and
`--horizontal_scale_ratios` 1, 2, 3, 4 of E = 4 exits; README: MSDNet
0.65, 0.7, 0.85, 1, EfficientNet-B4 0.65, 0.65, 0.82, 1, BERT 0.4, 0.55,
0.75, 1, always with one more exit per level). Here a device of capacity
p is at level `l = ceil(p L)` of the L widths `scalefl_widths` (the
authors' default), and holds:

- width `w = scalefl_widths[l - 1]`: the first `ceil(w C)` units of every
  width group (HeteroFL's first-k; `scaler` divides by w as the authors'
  `Scaler`);
- depth `d = ceil(p E)`: the first d depth blocks, their exits included
  (DepthFL's `held_blocks`); with L = E = 4 and p = l / 4 this is the
  authors' `l` exits.

Its loss (client.exit_loss, `mutual=False`) over its held exits i = 1..n:
`sum_i i (CE_i + g KL_i) / (n (n + 1) / 2)`, KL_i the distillation from
the deepest held exit at temperature `T = scalefl_kd_temperature` (3, the
authors' KD_T, times T^2), `g = scalefl_kd_gamma / classes` from round
index `scalefl_kd_start` on, else 0. Left unset, the start is the authors'
rule, the first round index r with `r > num_rounds / 4`: `floor(num_rounds /
4) + 1`, resolved when the config is validated (`authors_kd_start`). The
server averages every parameter over the clients that hold it; a tier
predicts with its deepest held exit (`ModelDef.exit_prediction =
"deepest"`).

Source: github.com/git-disl/scale-fl (commit c2084e4): `args.py` lines
96-105 (KD_gamma 0, KD_T 3, the scale ratios); `fed.py` lines 105-112
(a client's level, width and exits), 155-178 (`average_weights`: each
entry averaged over the clients whose local model holds it and had a
gradient), 229-265 (`get_local_split`); `utils/grad_traceback.py` lines
9-33 (`filter`: the first `int(scale C)` channels); `train.py` lines
37-60 (the exit weights `j + 1`, `gamma_active = round > num_rounds *
0.25`, the normalisation); `models/model_utils.py` lines 14-35 (`KDLoss`:
`KLDivLoss()` of `log_softmax(pred / T)` and `softmax(output[-1] / T)`
times gamma T^2); `models/resnet.py` lines 229-274 (the forward stops at
the level's last exit); `predict.py` lines 36-49, 100-161 (a level's
local model is evaluated at its exits, the last one reported).

Where this differs:
- The level is a function of p (`ceil(p L)`), and the depth `ceil(p E)`:
  the authors assign levels to clients in fixed shares and pair each
  level with a hand-set (width, exits). With the default tiers 1, 1/2,
  1/4, 1/8 and L = 4, tiers 1/4 and 1/8 are both level 1.
- Width `ceil(w C)` units, the simulator's rule, where the authors keep
  `int(w C)`.
- The early classifiers are linear on globally pooled features; the
  authors' (ResNet) read their layer through three 3x3 conv + BN + ReLU
  layers first (`models/resnet.py`, `Classifier`).
- The teacher (the deepest held exit) is a fixed target, as in
  client.exit_loss; the authors' `output[-1]` is not detached, so their
  distillation also moves the deepest exit. Their `KLDivLoss()` averages
  over the batch and the classes: kept, as the weight `gamma / classes`.
- The start is a round index (`scalefl_kd_start`), resolved from
  `num_rounds` once and kept in the run's config and identity. Extending a
  run (`num_rounds` is resumable) with the start left unset would move it
  under the rounds already done, so that is refused (workdir.py);
  `--config.scalefl_kd_start=N` with the old N extends the run, with the
  numbers of a straight run of the new length that starts at N.
- The authors' README runs for CIFAR leave `KD_gamma` at 0 (no
  distillation); their only non-zero value is 0.05 (BERT on AG News),
  which is the default here.
- Aggregation is the config's server optimiser over the holders' deltas
  weighted by example counts (FedAvg by default); the authors' mean is
  unweighted. They average batch-norm running statistics over all clients;
  the simulator's norms keep no running statistics.
- Their `validate` appends to `[AverageMeter()] * exits`, one meter shared
  by all exits, so the accuracy it reports is the mean over the level's
  exits of each exit's accuracy; the deepest held exit is what its code
  means to report and what a tier predicts with here.

Not first-k in the tier fast path's sense (the kept width is w, not p, and
the deeper blocks are cut), so no `fixed_widths`: the masked round runs it.
"""

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fedjax_tl.client import ExitTerms
from fedjax_tl.models import exits
from fedjax_tl.models.base import ModelDef
from fedjax_tl.policies import base, capacity
from fedjax_tl.policies.depthfl import block_masks


def level_width(width: jax.Array, widths) -> jax.Array:
  """The width multiplier of a device of capacity p: that of its level
  `ceil(p L)` among the L `widths`."""
  table = jnp.asarray(widths, jnp.float32)
  return table[capacity.kept_units(width, len(widths)) - 1]


def _times(tree, mask):
  return jax.tree.map(jnp.multiply, tree, mask)


def exit_weights(held: jax.Array) -> jax.Array:
  """`[exits]`: the i-th held exit weighs `i / (n (n + 1) / 2)`, n held."""
  held = held.astype(jnp.float32)
  rank = jnp.cumsum(held) * held
  return rank / jnp.maximum(rank.sum(), 1.0)


def authors_kd_start(config: Mapping[str, Any]) -> int:
  """The authors' distillation start for the config's values: the first
  round index r with `gamma_active = r > num_rounds * 0.25` (train.py)."""
  return config["num_rounds"] // 4 + 1


def exit_terms(model: ModelDef, train, round_index, *,
               options: base.Options) -> ExitTerms:
  """A client's exits (those `train` holds), their weights, and the
  distillation from the deepest of them, on from round index
  `scalefl_kd_start`."""
  held = exits.held_exits(model, train)
  classes = model.init_params[model.exits[-1]]["bias"].shape[-1]
  active = round_index >= options.scalefl_kd_start
  return ExitTerms(
      held=held,
      kd_weight=jnp.where(active, options.scalefl_kd_gamma / classes,
                          0.0).astype(jnp.float32),
      temperature=jnp.float32(options.scalefl_kd_temperature),
      mutual=jnp.bool_(False), weights=exit_weights(held))


def scalefl(options: base.Options) -> base.Policy:
  widths = options.scalefl_widths
  cut = base.width_policy("scalefl", scaler=options.scaler)

  def masks(model, width, params, round_index, key):
    depth = block_masks(model, width, params)
    present, train = cut.masks(model, level_width(width, widths), params,
                               round_index, key)
    return _times(present, depth), _times(train, depth)

  def units(model, width, round_index, key):
    # The deeper blocks are off the loss (their exits are not held) and
    # off `train`, which masks the delta.
    return cut.units(model, level_width(width, widths), round_index, key)

  def deployed(model, width, params):
    return _times(cut.deployed(model, level_width(width, widths), params),
                  block_masks(model, width, params))

  return base.Policy(
      name="scalefl", widths=base.tier_width, masks=masks, units=units,
      deployed=deployed,
      adapt_model=functools.partial(exits.with_exits, prediction="deepest"),
      start=exits.start,
      exit_terms=functools.partial(exit_terms, options=options),
      defaults=(("scalefl_kd_start", authors_kd_start),),
      keys=("scalefl_widths", "scalefl_kd_gamma", "scalefl_kd_temperature",
            "scalefl_kd_start"))
