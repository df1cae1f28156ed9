"""Importance-ordered slicing: HeteroFL's first-k sub-models of a pretrained
model whose hidden units were first reordered by importance.

Before round 0 the server permutes every hidden group's units, most
important first (transfer.reorder_by_importance: the product of a unit's
incoming and outgoing weight norms); the permuted model computes the same
function, and each first-k sub-model keeps the pretrained units that matter
most. The rest is HeteroFL's recipe, its fix or dynamic levels
(`heterofl_mode`) included.
"""

from fedjax_tl.policies import base, transfer


def _reordered(params, model):
  return transfer.reorder_by_importance(params, model.layers)


def importance(options: base.Options) -> base.Policy:
  return base.width_policy(
      "importance", scaler=options.scaler,
      widths=base.levels(options.heterofl_mode), fixed_widths=base.tier_levels,
      start=_reordered, defaults=(("masked_ce", True),), family="heterofl")
