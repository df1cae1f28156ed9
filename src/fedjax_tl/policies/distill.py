"""Server distillation into nested sub-models, then HeteroFL's slicing.

Before round 0 the server distils the pretrained model into its own first-k
sub-models: every tier's width trained jointly on the pretrained model's
soft labels, as slimmable networks are (Yu et al., ICLR 2019; in-place
distillation from "Universally slimmable networks", Yu & Huang, ICCV 2019),
so each tier starts from a sub-model that already works
(transfer.distill). The rest is HeteroFL's recipe, its fix or dynamic
levels (`heterofl_mode`) included: the distilled widths are the tiers' and a
dynamic draw picks among them.
"""

import functools

from fedjax_tl.policies import base, transfer


def _distilled(prep: base.ServerPrep, *, options: base.Options):
  model = prep.model
  return transfer.distill(
      model.apply, prep.params, prep.source, layers=model.layers,
      widths=prep.tier_widths,
      steps=options.distill_steps, batch_size=options.distill_batch_size,
      learning_rate=options.distill_lr,
      temperature=options.distill_temperature,
      use_labels=options.distill_labels, seed=prep.seed,
      scaler=options.scaler)


def distill(options: base.Options) -> base.Policy:
  return base.width_policy(
      "distill", scaler=options.scaler,
      widths=base.levels(options.heterofl_mode), fixed_widths=base.tier_levels,
      prepare=functools.partial(_distilled, options=options),
      defaults=(("masked_ce", True),), family="heterofl",
      keys=("distill_steps", "distill_temperature", "distill_lr",
            "distill_batch_size", "distill_labels"))
