"""User-level differential privacy: DP-FedAvg's sampling, clipping and noise.

DP-FedAvg (McMahan et al., ICLR 2018): each round every device takes part
independently with probability q (Poisson sampling), each participant's
update is clipped to an L2 norm of at most C and weighted equally, and the
server adds Gaussian noise of standard deviation z x C to the sum before
dividing by the expected number of participants, qW (the paper's
fixed-denominator estimator, its Algorithm 1 and section 2; per parameter:
the expected number of participants holding it). Dividing by the realised
count instead (`denominator="realised"`) releases that count without noise,
which the accounting below does not cover.
Adaptive clipping (Andrew et al., NeurIPS 2021) moves C geometrically towards
a quantile of the update norms, using a noised count of unclipped updates
(over the expected participants, as tensorflow_privacy's
`QuantileAdaptiveClipSumQuery` normalises it by `expected_num_records`).
The (epsilon, delta) spent is that of the Poisson-subsampled Gaussian
mechanism composed once per round, from Google's `dp-accounting` (RDP or PLD),
at the largest chance any device has of taking part (q x its availability).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

from fedjax_tl.models.base import Params

ACCOUNTANTS = ("rdp", "pld")
# What the noised sum is divided by: each entry's expected number of holders
# (the fixed-denominator estimator, covered by the accounting) or the
# realised number (released without noise: not covered).
DENOMINATORS = ("expected", "realised")
# A round's Poisson draw overflows its fixed slots with at most this chance.
OVERFLOW_PROBABILITY = 1e-9
_NOISE_SALT, _COUNT_SALT = 0xD9, 0xC7


@dataclasses.dataclass(frozen=True)
class Privacy:
  """DP-FedAvg's parameters.

  Attributes:
    noise_multiplier: z, the noise's standard deviation over the clip norm
      (for the updates and the adaptive clipping's count together).
    clip_norm: C, each update's L2 norm bound (the start with `adaptive`).
    sampling_rate: q, each online device's chance of taking part in a round.
    delta: the delta that epsilon is reported at.
    accountant: "rdp" or "pld" (dp-accounting's RdpAccountant or
      PLDAccountant, add-or-remove-one adjacency).
    adaptive: adapt C each round (Andrew et al.'s geometric update).
    target_quantile: gamma, the share of updates C aims to leave unclipped.
    clip_lr: eta, the geometric update's learning rate.
    count_noise: sigma_b, the standard deviation of the noise on the count
      of unclipped updates; must exceed z / 2.
    denominator: "expected" (default): the noised sum is divided, entry by
      entry, by the expected number of participants holding the entry
      (engine.round.expected_holders), and the adaptive clipping's count by
      the expected number of participants, none of which depends on who
      took part; "realised": by the numbers that did (the estimator
      released without noise, not covered by :meth:`epsilon`).
    inclusion_rate: the per-round chance of taking part the accountant is
      given: the largest over devices of q x its chance of being online and
      eligible (engine.cohort.Sampler.largest_inclusion, which
      `Simulation.create` fills in); None: q.
  """
  noise_multiplier: float
  clip_norm: float
  sampling_rate: float
  delta: float
  accountant: str = "rdp"
  adaptive: bool = False
  target_quantile: float = 0.5
  clip_lr: float = 0.2
  count_noise: float = 0.0
  denominator: str = "expected"
  inclusion_rate: float | None = None

  @property
  def accounted_rate(self) -> float:
    """The sampling rate the accountant composes: `inclusion_rate`, else q."""
    return (self.sampling_rate if self.inclusion_rate is None else
            self.inclusion_rate)

  @property
  def expected_denominator(self) -> bool:
    """Whether the release divides by expected counts (the default)."""
    return self.denominator == "expected"

  @property
  def update_noise_multiplier(self) -> float:
    """z_delta, the updates' share of z.

    With adaptive clipping the count is a second Gaussian query on the same
    clients; Andrew et al. (Theorem 1) charge both as one Gaussian mechanism
    of multiplier z when z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).
    """
    z = self.noise_multiplier
    if not self.adaptive or z == 0:
      return z
    return (z**-2 - (2 * self.count_noise)**-2)**-0.5

  def release(self, num: Params, state: dict[str, jax.Array],
              unclipped: jax.Array, participants: jax.Array, key: jax.Array
              ) -> tuple[Params, dict[str, jax.Array]]:
    """The noised sum of clipped updates, and the next clip norm.

    Args:
      num: the sum of the participants' clipped updates (shaped like params).
      state: the privacy state (:func:`initial_state`).
      unclipped: how many participants' updates were within the clip norm.
      participants: how many clients were aggregated (expected, with the
        expected denominator): the count's denominator.
      key: the round's noise key.

    Returns:
      `(num + N(0, (z_delta C)^2) on every entry, state with the next C)`.
    """
    clip = state["clip_norm"]
    std = self.update_noise_multiplier * clip
    leaves, treedef = jax.tree.flatten(num)
    keys = jax.random.split(jax.random.fold_in(key, _NOISE_SALT), len(leaves))
    noisy = treedef.unflatten([
        leaf + std.astype(leaf.dtype) * jax.random.normal(k, leaf.shape,
                                                          leaf.dtype)
        for leaf, k in zip(leaves, keys)])
    if self.adaptive:
      count = unclipped + self.count_noise * jax.random.normal(
          jax.random.fold_in(key, _COUNT_SALT))
      share = count / jnp.maximum(participants, 1)
      step = jnp.where(participants > 0, share - self.target_quantile, 0.0)
      state = {**state, "clip_norm": clip * jnp.exp(-self.clip_lr * step)}
    return noisy, state

  def epsilon(self, rounds: int) -> float:
    """The epsilon spent after `rounds` rounds, at `delta` (inf if z = 0)."""
    return epsilon(self.noise_multiplier, self.accounted_rate, rounds,
                   self.delta, self.accountant)


def initial_state(config: Privacy | None) -> dict[str, jax.Array]:
  """The privacy part of the server state: the clip norm in force and the
  cumulative count of sampled devices that found no slot (zeros without
  DP, so every server state has the same structure)."""
  clip = 0.0 if config is None else config.clip_norm
  return {"clip_norm": jnp.asarray(clip, jnp.float32),
          "overflow": jnp.zeros((), jnp.float32)}


def privatize(config: Privacy | None, state: dict[str, jax.Array],
              num: Params, weight: jax.Array, overflow: jax.Array | None,
              excluded: jax.Array, unclipped: jax.Array | None,
              key: jax.Array, expected: jax.Array | None = None
              ) -> tuple[Params, dict[str, jax.Array]]:
  """DP-FedAvg's release of a round: `(num + Gaussian noise, next state)`.

  Args:
    config: DP's parameters; None: `(num, state)` unchanged.
    state: the privacy state the round started from (:func:`initial_state`).
    num: the sum of the aggregated clients' clipped updates.
    weight: `[slots]` aggregation weights of the round's cohort plan.
    overflow: the cohort's sampled devices that found no slot (a scalar).
    excluded: `[slots]` bool, aggregated slots whose update was not finite.
    unclipped: `[slots]` bool, aggregated slots whose update was within the
      clip norm; None: none.
    key: the round's privacy key; every round path passes the same one, so
      every path adds the same noise.
    expected: the round's expected number of participants; with
      `config.expected_denominator` the adaptive clipping's share of
      unclipped updates is over it, else over the aggregated clients.
  """
  if config is None:
    return num, state
  aggregated = (weight > 0) & ~excluded
  count = (jnp.zeros((), jnp.float32) if unclipped is None else
           (unclipped & aggregated).sum().astype(jnp.float32))
  participants = aggregated.sum().astype(jnp.float32)
  if config.expected_denominator and expected is not None:
    participants = jnp.asarray(expected, jnp.float32)
  num, private = config.release(num, state, count, participants, key)
  return num, {**private, "overflow": private["overflow"] + overflow}


def slots_for(expected: float) -> int:
  """Slots a Poisson-sampled cohort of `expected` devices needs so that a
  round overflows them with probability below OVERFLOW_PROBABILITY (a
  Poisson tail, which bounds the binomial's)."""
  import scipy.stats  # only here: its import costs every run a second
  return max(1, int(scipy.stats.poisson.isf(OVERFLOW_PROBABILITY, expected))
             + 1)


@functools.lru_cache(maxsize=256)
def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int,
            delta: float, accountant: str = "rdp") -> float:
  """(epsilon, `delta`)-DP of `rounds` Poisson-subsampled Gaussian rounds.

  Computed afresh from the count (the accountant's whole state, so a resumed
  run reports the same figures) with dp-accounting, add-or-remove-one
  adjacency of one device's data.
  """
  if rounds == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  import dp_accounting  # imported on use: the package is slow to load
  from dp_accounting import pld, rdp
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
      rounds)
  tracker = (rdp.RdpAccountant() if accountant == "rdp" else
             pld.PLDAccountant())
  # RDP skips the fractional orders its series does not converge for, and
  # warns through absl for each; the epsilon is the minimum over the rest.
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    return float(tracker.compose(event).get_epsilon(delta))
  finally:
    absl_log.setLevel(level)

