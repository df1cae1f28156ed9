"""Uniform baselines: one sub-model for everyone, whatever its capacity.

- `uniform_smallest`: every device trains the smallest tier's first-k slice.
- `uniform_full_only`: only devices able to hold the full model take part.
- `full`: every device trains the full model (capacity ignored: an upper
  bound, not a deployable strategy).
"""

import jax.numpy as jnp

from fedjax_tl.policies import base


def _smallest(tier_widths, tier_shares, tiers, keys):
  del tier_shares, keys
  return jnp.full(tiers.shape, jnp.min(tier_widths), jnp.float32)


def _full(tier_widths, tier_shares, tiers, keys):
  del tier_widths, tier_shares, keys
  return jnp.ones(tiers.shape, jnp.float32)


def _full_capable(tier_widths, device_tiers):
  return tier_widths[device_tiers] >= 1.0


def uniform_smallest(options: base.Options) -> base.Policy:
  return base.width_policy(
      "uniform_smallest", scaler=options.scaler, widths=_smallest,
      fixed_widths=lambda tier_widths, levels: (min(tier_widths),))


def uniform_full_only(options: base.Options) -> base.Policy:
  return base.width_policy(
      "uniform_full_only", scaler=options.scaler, eligible=_full_capable,
      smallest_width=lambda levels: 1.0,
      fixed_widths=lambda tier_widths, levels: (1.0,))


def full(options: base.Options) -> base.Policy:
  # Memory caps lower a device's width to a level below 1 that stays
  # eligible, so with a memory model every level is a static width.
  return base.width_policy(
      "full", scaler=options.scaler, widths=_full,
      fixed_widths=lambda tier_widths, levels: (
          (1.0,) if levels is None else tuple(sorted(levels, reverse=True))))
