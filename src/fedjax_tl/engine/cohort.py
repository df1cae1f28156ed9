"""Drawing a round's cohort plan: who is sampled, at what width, for how many
local steps and with what aggregation weight (engine.state.Cohort), on top of
the time and memory model (engine.timing).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_tl import cost, privacy
from fedjax_tl.devices import poisson_cohort, sample_cohort
from fedjax_tl.engine import timing
from fedjax_tl.engine.state import (COHORT_SALT, LEVEL_SALT, Cohort,
                                    DeviceArrays, client_key, round_key)


def sampled_count(cohort_size: int, overcommit: float,
                  dp: privacy.Privacy | None, num_devices: int) -> int:
  """Devices sampled per round: `cohort_size`, more with over-commitment;
  with DP, enough slots for a Poisson draw of `cohort_size` expected."""
  if dp is not None:
    return min(privacy.slots_for(cohort_size), num_devices)
  return cost.overcommit_size(cohort_size, overcommit)


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
  """How a round's cohort is drawn and planned.

  Attributes:
    time: the time and memory model (its policy and tier widths too).
    tier_proportions: share of devices in each tier (HeteroFL's mix).
    cohort_size: M, devices aggregated per round.
    num_sampled: devices sampled per round (:func:`sampled_count`).
    num_slots: `num_sampled` padded to a multiple of the chunk size.
    dp: DP-FedAvg's parameters (Poisson sampling, every participant
      weighing 1), None for none.
  """
  time: timing.TimeModel
  tier_proportions: tuple[float, ...]
  cohort_size: int
  num_sampled: int
  num_slots: int
  dp: privacy.Privacy | None = None

  def candidates(self, arrays: DeviceArrays, clock: jax.Array | float
                 ) -> tuple[jax.Array, jax.Array | None]:
    """`([devices] chance of being drawn, [devices] memory cap or None)`.

    A device the policy does not let train, or that fits no width in its
    memory (`TimeModel.memory_caps`), is never drawn.
    """
    fractions = jnp.asarray(self.time.tier_fractions, jnp.float32)
    eligible = self.time.policy.eligible(fractions, arrays.tier)
    memory_cap = None
    if arrays.memory_bytes is not None:
      memory_cap = self.time.memory_caps(arrays)
      eligible = eligible & (memory_cap > 0)
    return timing.online(arrays, clock) * eligible, memory_cap

  def draw(self, arrays: DeviceArrays, seed: int | jax.Array,
           round_index: jax.Array, width_cap: jax.Array | None = None,
           clock: jax.Array | float = 0.0) -> Cohort:
    """The round's cohort and per-client plan, padded to `num_slots`.

    Args:
      arrays: the per-device arrays.
      seed: the run's seed; every draw derives from it and the round.
      round_index: the round.
      width_cap: `[devices]`, if given, caps each device's width
        (ServerState.width_cap).
      clock: the simulated seconds at the round's start: with a behaviour
        trace, a device is online iff its trace says so at that time.

    A device's width is capped to what fits its memory. With
    over-commitment, `num_sampled` devices are drawn and only the first
    `cohort_size` to finish (after the deadline rule) are aggregated; the
    others are folded into `dropped`: they downloaded, but their plan has 0
    steps and weight 0.
    """
    key = jax.random.fold_in(round_key(seed, round_index), COHORT_SALT)
    candidates, memory_cap = self.candidates(arrays, clock)
    overflow = None
    if self.dp is not None:
      ids, valid, overflow = poisson_cohort(
          key, candidates, self.dp.sampling_rate, self.num_sampled)
    else:
      ids, valid = sample_cohort(key, candidates, self.num_sampled)
    pad = self.num_slots - self.num_sampled
    ids = jnp.pad(ids, (0, pad))
    valid = jnp.pad(valid, (0, pad))
    level_keys = jax.vmap(lambda i: jax.random.fold_in(
        client_key(seed, round_index, i), LEVEL_SALT))(ids)
    fraction = self.time.policy.widths(
        jnp.asarray(self.time.tier_fractions, jnp.float32),
        jnp.asarray(self.tier_proportions, jnp.float32),
        arrays.tier[ids], level_keys)
    if width_cap is not None:
      fraction = jnp.minimum(fraction, width_cap[ids])
    if memory_cap is not None:
      fraction = jnp.minimum(fraction, memory_cap[ids])
    overcommitted = self.dp is None and self.num_sampled > self.cohort_size
    outcome = self.time.schedule(
        arrays, ids, fraction, valid,
        keep=self.cohort_size if overcommitted else None)
    # DP-FedAvg weighs every participant alike: a device's influence is
    # bounded by the clip norm alone, not by its example count too.
    size = 1.0 if self.dp is not None else arrays.count[ids].astype(
        jnp.float32)
    weight = size * valid * outcome.participates
    return Cohort(ids, valid, fraction, weight, outcome.steps,
                  outcome.finish_seconds, overflow)
