"""Partial fine-tuning: depth instead of width.

Every device holds the whole model; a device of capacity p trains only its
top ceil(p*L) of L layers, the rest frozen (present in the forward pass, not
updated), as DepthFL's devices train a prefix of the depth (Kim et al.,
ICLR 2023), here from the top.
"""

from fedjax_tl.policies import base


def partial_finetune(options: base.Options) -> base.Policy:
  del options
  return base.depth_policy("partial_finetune")
