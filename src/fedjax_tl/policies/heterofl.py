"""HeteroFL (Diao, Ding, Tarokh, ICLR 2021): static-width sub-models.

A client of width p holds the first ceil(p*C) units of every hidden layer;
each parameter is averaged over the clients holding it. "fix" mode: a device
keeps its tier's width; "dynamic": every client's level is redrawn each round
from the tier mix. Its recipe also divides hidden activations by p during
local training (the scaler, option `scaler`) and restricts each client's
softmax to the labels it holds (masked cross-entropy, on by default).
"""

from fedjax_tl.policies import base

MODES = ("fix", "dynamic")


def heterofl(options: base.Options) -> base.Policy:
  widths = (base.redrawn_width if options.heterofl_mode == "dynamic" else
            base.tier_width)
  return base.width_policy(
      "heterofl", scaler=options.scaler, widths=widths,
      fixed_widths=base.tier_levels, defaults=(("masked_ce", True),),
      family="heterofl")
