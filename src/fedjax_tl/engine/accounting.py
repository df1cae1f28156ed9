"""A round's accounting: the per-tier traffic, update and exclusion totals,
the simulated clock, the weighted training loss and the round's stats, as
every round path keeps them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.engine.state import Cohort, RoundStats
from fedjax_tl.models.base import Params

_PER_TIER = ("bytes_down", "bytes_up", "updates", "dropped", "excluded")


def tally(totals: dict[str, jax.Array], slot_tier: jax.Array, num_tiers: int,
          plan: Cohort, traffic: tuple[jax.Array, jax.Array],
          excluded: jax.Array, seconds: jax.Array) -> dict[str, jax.Array]:
  """The cumulative totals (`ServerState.totals`) after a round.

  Args:
    totals: the totals the round started from.
    slot_tier: `[slots]` the tier of each slot's device.
    num_tiers: how many tiers there are.
    plan: the round's cohort plan.
    traffic: `[slots]` bytes down and up of each slot's sub-model.
    excluded: `[slots]` bool, aggregated slots whose update was not finite.
    seconds: the simulated seconds the round lasted.
  """
  down, up = traffic
  # [slots, tiers] membership of the online slots, to sum per tier;
  # devices past the deadline downloaded but did not upload.
  member = jax.nn.one_hot(slot_tier, num_tiers) * plan.valid[:, None]
  done = plan.num_steps > 0
  per_tier = member.T @ jnp.stack([down, up * done, done, ~done, excluded],
                                  axis=1).astype(jnp.float32)
  new = {name: totals[name] + per_tier[:, i]
         for i, name in enumerate(_PER_TIER)}
  # Rounds whose every aggregated client was excluded: the model stays.
  num_excluded = excluded.sum()
  new["skipped"] = totals["skipped"] + (
      (num_excluded > 0) & (num_excluded == (plan.weight > 0).sum()))
  new["sim_seconds"] = totals["sim_seconds"] + seconds
  return new


def loss_sum(loss: jax.Array, weights: jax.Array) -> jax.Array:
  """`sum_i w_i loss_i` over the aggregated clients (an excluded client's
  loss may be NaN)."""
  return jnp.sum(jnp.where(weights > 0, loss * weights, 0))


def round_stats(plan: Cohort, den: Params, loss_sum: jax.Array,
                excluded: jax.Array) -> RoundStats:
  """The round's stats from its plan, mask sums and weighted loss sum;
  `excluded`: `[slots]` bool, the aggregated slots whose update was not
  finite."""
  held = sum(jnp.sum(d > 0) for d in jax.tree.leaves(den))
  total = sum(np.size(d) for d in jax.tree.leaves(den))
  entered = (plan.weight > 0) & ~excluded
  return RoundStats(
      train_loss=loss_sum / jnp.maximum(
          jnp.where(entered, plan.weight, 0).sum(), 1e-12),
      participants=plan.valid.sum(), held_fraction=held / total,
      excluded=excluded.sum(), aggregated=entered.sum())
