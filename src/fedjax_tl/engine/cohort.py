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
    eligible, memory_cap = self._eligible(arrays)
    return timing.online(arrays, clock) * eligible, memory_cap

  def _eligible(self, arrays: DeviceArrays
                ) -> tuple[jax.Array, jax.Array | None]:
    """`([devices] bool whether the device may ever train, [devices] memory
    cap or None)`: the policy lets it, and a width fits its memory."""
    fractions = jnp.asarray(self.time.tier_fractions, jnp.float32)
    eligible = self.time.policy.eligible(fractions, arrays.tier)
    memory_cap = None
    if arrays.memory_bytes is not None:
      memory_cap = self.time.memory_caps(arrays)
      eligible = eligible & (memory_cap > 0)
    return eligible, memory_cap

  def device_widths(self, arrays: DeviceArrays, seed: int | jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """`([devices] the width each device trains when drawn, [devices] bool
    whether it ever trains)`, as the rounds decide them: the policy's
    eligibility and width (round 0's draw where the policy redraws widths
    each round), capped by what fits the device's memory."""
    eligible, memory_cap = self._eligible(arrays)
    ids = jnp.arange(arrays.tier.shape[0])
    return (self.widths(arrays, seed, jnp.int32(0), ids, None, memory_cap),
            eligible)

  def widths(self, arrays: DeviceArrays, seed: int | jax.Array,
             round_index: jax.Array, ids: jax.Array,
             width_cap: jax.Array | None, memory_cap: jax.Array | None
             ) -> jax.Array:
    """`[len(ids)]` the width each of the devices `ids` trains this round if
    it is drawn: the policy's (its tier's, or redrawn from the device's
    level key), capped by `width_cap` and by what fits its memory."""
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
    return fraction

  def inclusion(self, arrays: DeviceArrays, seed: int | jax.Array,
                round_index: jax.Array, width_cap: jax.Array | None = None,
                clock: jax.Array | float = 0.0
                ) -> tuple[jax.Array, jax.Array]:
    """Under DP's Poisson sampling, `([devices] chance each device is
    aggregated this round, [devices] the width it trains if it is)`.

    A device is aggregated when it is online and eligible (its chance
    :meth:`candidates`), its coin of probability q falls and its width
    meets the deadline rule (`TimeModel.schedule`, a function of its speed
    and width only). None of this reads the devices' data, so the chances
    are DP-FedAvg's fixed denominator (engine.round.expected_holders).
    """
    ids = jnp.arange(arrays.tier.shape[0])
    candidates, memory_cap = self.candidates(arrays, clock)
    fraction = self.widths(arrays, seed, round_index, ids, width_cap,
                           memory_cap)
    outcome = self.time.schedule(arrays, ids, fraction,
                                 jnp.ones(ids.shape, bool))
    return (self.dp.sampling_rate * candidates * outcome.participates,
            fraction)

  def largest_inclusion(self, arrays: DeviceArrays) -> float:
    """The largest chance any device has of being drawn in a round under
    DP's Poisson sampling: q x the largest availability among the devices
    that may be drawn (with a behaviour trace a device is online with
    certainty while its trace says so: q). The accountant's sampling rate
    (privacy.Privacy.inclusion_rate): each device's privacy is that of
    Poisson sampling at its own chance, which this bounds."""
    fractions = jnp.asarray(self.time.tier_fractions, jnp.float32)
    eligible = self.time.policy.eligible(fractions, arrays.tier)
    if arrays.memory_bytes is not None:
      eligible = eligible & (self.time.memory_caps(arrays) > 0)
    online = (jnp.ones(eligible.shape, jnp.float32)
              if arrays.online_starts is not None else arrays.availability)
    return self.dp.sampling_rate * float(jnp.max(online * eligible))

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
    fraction = self.widths(arrays, seed, round_index, ids, width_cap,
                           memory_cap)
    overcommitted = self.dp is None and self.num_sampled > self.cohort_size
    outcome = self.time.schedule(
        arrays, ids, fraction, valid,
        keep=self.cohort_size if overcommitted else None)
    # DP-FedAvg weighs every participant alike: a device's influence is
    # bounded by the clip norm alone, not by its example count too. HetLoRA
    # weighs a client by its update's norm alone (Policy.weighs_examples).
    by_count = self.dp is None and self.time.policy.weighs_examples
    size = arrays.count[ids].astype(jnp.float32) if by_count else 1.0
    weight = size * valid * outcome.participates
    return Cohort(ids, valid, fraction, weight, outcome.steps,
                  outcome.finish_seconds, overflow)
