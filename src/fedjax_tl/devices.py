"""The simulated device population: devices are rows of arrays, not objects.

Each device has a capacity tier (the hidden-width fraction it can train) and
an availability (the probability it is online in a given round). Each round a
fixed-size cohort is drawn among the devices that are online; when fewer are
online the missing slots are padding, marked invalid and weighted 0.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.traces import capacity_arrays

if TYPE_CHECKING:
  from fedjax_tl.traces import Intervals


@dataclasses.dataclass(frozen=True)
class Population:
  """A device population.

  Attributes:
    tier: `[devices]` int32 index into `tier_fractions`.
    availability: `[devices]` float32 probability of being online per round.
    tier_fractions: hidden-width fraction of each tier.
    tier_names: display name of each tier.
    profiles: per-device compute, memory and bandwidth, when the population
      was drawn from the device catalogue (None for tier-only populations).
    online: each device's online intervals from a FedScale behaviour trace;
      when set, a device is online in a round iff the trace says so at the
      simulated clock, and `availability` is informative only.
    malicious: `[devices]` bool, the devices mounting an attack
      (faults.malicious_devices); None: all honest.
  """
  tier: np.ndarray
  availability: np.ndarray
  tier_fractions: tuple[float, ...]
  tier_names: tuple[str, ...]
  profiles: DeviceProfiles | None = None
  online: Intervals | None = None
  malicious: np.ndarray | None = None

  @property
  def num_devices(self) -> int:
    return int(self.tier.shape[0])

  def tier_counts(self) -> np.ndarray:
    return np.bincount(self.tier, minlength=len(self.tier_fractions))


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceProfiles:
  """Per-device figures, one row per device (arrays, not objects).

  Attributes:
    device_class: `[devices]` int32 index into `class_names`.
    compute_gflops: `[devices]` float32 sustained training GFLOP/s.
    memory_mb: `[devices]` float32 memory available to training (MB).
    up_kbps: `[devices]` float32 uplink bandwidth (kbit/s, 1 kbit = 1000 bit).
    down_kbps: `[devices]` float32 downlink bandwidth (kbit/s).
    availability: `[devices]` float32 probability of being online per round.
    class_names: name of each device class.
    class_width_fractions: default width fraction of each class.
  """
  device_class: np.ndarray
  compute_gflops: np.ndarray
  memory_mb: np.ndarray
  up_kbps: np.ndarray
  down_kbps: np.ndarray
  availability: np.ndarray
  class_names: tuple[str, ...]
  class_width_fractions: tuple[float, ...]

  @property
  def num_devices(self) -> int:
    return int(self.device_class.shape[0])

  def ms_per_sample(self, flops_per_sample: float) -> np.ndarray:
    """`[devices]` forward-pass ms per sample of a model of that many FLOPs."""
    return (flops_per_sample / (self.compute_gflops * 1e9) * 1e3).astype(
        np.float32)

  def with_capacity_trace(self, capacity: Mapping[Hashable, Mapping[str,
                                                                    float]],
                          flops_per_sample: float) -> "DeviceProfiles":
    """These profiles with compute and bandwidth from a FedScale capacity trace.

    Device `i` takes trace key `keys[i % len(keys)]` (traces.assign_traces).
    FedScale's runtime charges a client's `computation` figure (inference ms
    per sample, measured on FedScale's own model) unchanged whatever model it
    trains; we do the same: it is taken as the forward ms per sample of our
    full model of `flops_per_sample` FLOPs, i.e. a sustained speed of
    `flops_per_sample / (computation x 1e6)` GFLOP/s, so
    :meth:`ms_per_sample` gives the trace figure back and sub-models scale by
    their FLOPs share. The trace's one `communication` (kbit/s) is both the
    uplink and the downlink. Memory and availability stay the class's.
    """
    ms, kbps = capacity_arrays(capacity, self.num_devices)
    gflops = flops_per_sample / (ms.astype(np.float64) * 1e6)
    return dataclasses.replace(self, compute_gflops=gflops.astype(np.float32),
                               up_kbps=kbps, down_kbps=kbps.copy())

  def to_population(self) -> Population:
    """A :class:`Population` whose tiers are the device classes."""
    return Population(tier=self.device_class, availability=self.availability,
                      tier_fractions=self.class_width_fractions,
                      tier_names=self.class_names, profiles=self)


def make_population(num_devices: int, tier_fractions: Sequence[float],
                    tier_proportions: Sequence[float], *,
                    min_availability: float, seed: int,
                    tier_names: Sequence[str] | None = None) -> Population:
  """Assigns tiers in the given proportions (exactly, up to rounding)."""
  rng = np.random.default_rng([seed, 0xDE71CE])
  proportions = np.asarray(tier_proportions, np.float64)
  counts = np.floor(proportions * num_devices).astype(int)
  # Hand the remainder to the tiers with the largest fractional parts.
  remainder = num_devices - counts.sum()
  counts[np.argsort(-(proportions * num_devices - counts))[:remainder]] += 1
  tier = rng.permutation(np.repeat(np.arange(len(counts)), counts))
  availability = rng.uniform(min_availability, 1.0, num_devices)
  names = tuple(tier_names) if tier_names else tuple(
      f"{f:g}" for f in tier_fractions)
  return Population(tier=tier.astype(np.int32),
                    availability=availability.astype(np.float32),
                    tier_fractions=tuple(float(f) for f in tier_fractions),
                    tier_names=names)


def sample_cohort(key: jax.Array, availability: jax.Array,
                  cohort_size: int) -> tuple[jax.Array, jax.Array]:
  """Draws `cohort_size` distinct devices, online ones first.

  Args:
    key: the round's key.
    availability: `[devices]` probability each device is online.
    cohort_size: the fixed number of slots M.

  Returns:
    `(ids[M], valid[M])`: device ids, and whether the slot holds an online
    device (offline picks fill the slots only when too few are online).
  """
  online_key, order_key = jax.random.split(key)
  online = jax.random.uniform(online_key, availability.shape) < availability
  return _fill_slots(order_key, online, cohort_size)


def poisson_cohort(key: jax.Array, availability: jax.Array,
                   sampling_rate: float, num_slots: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Poisson sampling (DP-FedAvg): each device online and chosen w.p. q,
  independently of the others.

  Args:
    key: the round's key.
    availability: `[devices]` chance each device is online (0 for devices
      that may not take part).
    sampling_rate: q.
    num_slots: the fixed number of slots (privacy.slots_for).

  Returns:
    `(ids[slots], valid[slots], overflow)`: the chosen devices first, then
    unchosen ones as invalid padding; `overflow` (float32) counts chosen
    devices beyond the slots, left out of the round.
  """
  online_key, coin_key, order_key = jax.random.split(key, 3)
  shape = availability.shape
  chosen = ((jax.random.uniform(online_key, shape) < availability) &
            (jax.random.uniform(coin_key, shape) < sampling_rate))
  ids, valid = _fill_slots(order_key, chosen, num_slots)
  overflow = jnp.maximum(chosen.sum() - num_slots, 0).astype(jnp.float32)
  return ids, valid, overflow


def _fill_slots(key: jax.Array, chosen: jax.Array, num_slots: int
                ) -> tuple[jax.Array, jax.Array]:
  """`num_slots` distinct devices in a random order, the `chosen` ones
  first: `(ids, chosen[ids])`."""
  # Uniform priorities, unchosen devices pushed behind every chosen one.
  priority = jax.random.uniform(key, chosen.shape) + jnp.where(chosen, 0.0,
                                                                2.0)
  _, ids = jax.lax.top_k(-priority, num_slots)
  return ids.astype(jnp.int32), chosen[ids]
