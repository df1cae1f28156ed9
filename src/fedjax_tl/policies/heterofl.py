"""HeteroFL (Diao, Ding, Tarokh, ICLR 2021): static-width sub-models.

A client of width p holds the first ceil(p*C) units of every hidden layer;
each parameter is averaged over the clients holding it. "fix" mode: a device
keeps its tier's width; "dynamic": every client's level is redrawn each round
from the tier mix. Its recipe also divides hidden activations by p during
local training (the scaler, option `scaler`) and restricts each client's
softmax to the labels it holds (masked cross-entropy, on by default); with
it the output layer's entries of label c are averaged over the clients whose
labels include c only, as the authors' `Federation.combine` does with
`label_split` (github.com/diaoenmao/HeteroFL-Computation-and-Communication-
Efficient-Federated-Learning-for-Heterogeneous-Clients, src/fed.py, lines
193-210 at cc40f3e; `masked_ce_head`, engine.clients.label_rule).
"""

from fedjax_tl.policies import base

MODES = ("fix", "dynamic")


def heterofl(options: base.Options) -> base.Policy:
  return base.width_policy(
      "heterofl", scaler=options.scaler,
      widths=base.levels(options.heterofl_mode),
      fixed_widths=base.tier_levels, defaults=(("masked_ce", True),),
      family="heterofl")
