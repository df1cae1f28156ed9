"""The round's shared types: server state, cohort plan, device arrays, stats,
keys and their salts, and how a chunk's clients are mapped; every round path
(the masked round, the tier fast path, the per-client reference) builds on
these.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_tl.models.base import Params

# Salts that separate the independent streams drawn from one round key, and
# from one client's key.
COHORT_SALT, CLIENT_SALT, PRIVACY_SALT, SLOTS_SALT = 0, 1, 2, 3
LEVEL_SALT, UNITS_SALT, TRAIN_SALT = 0, 1, 2


def round_key(seed: int | jax.Array, round_index: jax.Array) -> jax.Array:
  """The key of one round: fold_in(seed, round)."""
  return jax.random.fold_in(jax.random.key(seed), round_index)


def client_key(seed: int | jax.Array, round_index: jax.Array,
               device_id: jax.Array) -> jax.Array:
  """The key of one device in one round: fold_in(fold_in(seed, r), id)."""
  return jax.random.fold_in(
      jax.random.fold_in(round_key(seed, round_index), CLIENT_SALT), device_id)


class ServerState(NamedTuple):
  """Everything a round reads and writes; all of it is checkpointed."""
  params: Params
  opt_state: optax.OptState
  round: jax.Array  # int32 scalar: the index of the next round
  # Cumulative accounting per tier, `[tiers]` float32 each: bytes_down (what
  # clients were sent: their sub-model), bytes_up (what they returned: what
  # they trained), updates (client updates received), dropped, excluded
  # (updates dropped as non-finite); scalars: skipped (rounds whose every
  # update was excluded), sim_seconds.
  totals: dict[str, jax.Array]
  # `[devices]` float32: the largest width each device will train, 1 unless
  # lowered while training (HetLoRA's rank self-pruning).
  width_cap: jax.Array
  # DP-FedAvg's state (privacy.initial_state): the clip norm in force
  # and the sampled devices that found no slot; zeros without DP.
  privacy: dict[str, jax.Array]


class RoundStats(NamedTuple):
  """Scalars describing one round."""
  train_loss: jax.Array    # weighted mean client training loss
  participants: jax.Array  # cohort slots holding an online device
  held_fraction: jax.Array  # share of parameters some client updated
  # Aggregated clients whose update held NaN or Inf: given weight 0.
  excluded: jax.Array
  # Clients whose update entered the aggregate (weight > 0, not excluded):
  # 0 in a skipped round (no one online, or every update excluded), whose
  # `train_loss` is then a mean over nothing.
  aggregated: jax.Array


class Cohort(NamedTuple):
  """A round's cohort plan, `[slots]` each (padded to a multiple of the chunk)."""
  ids: jax.Array        # device ids
  valid: jax.Array      # slot holds an online device
  fraction: jax.Array   # hidden-width fraction the device trains
  weight: jax.Array     # aggregation weight (examples; 0 if not aggregated)
  num_steps: jax.Array  # local steps the device completes before the deadline
  finish: jax.Array     # simulated seconds until its upload ends
  # DP's Poisson draw: chosen devices beyond the slots (a scalar, not per
  # slot); None without DP.
  overflow: jax.Array | None = None


class DeviceArrays(NamedTuple):
  """Per-device arrays the round reads: data and population, on device."""
  x: jax.Array             # [devices, max_examples, ...]
  y: jax.Array             # [devices, max_examples]
  count: jax.Array         # [devices]
  tier: jax.Array          # [devices]
  availability: jax.Array  # [devices]
  compute_gflops: jax.Array  # [devices] sustained training GFLOP/s
  up_kbps: jax.Array       # [devices]
  down_kbps: jax.Array     # [devices]
  # [devices] bytes a training job may use (None: no memory check).
  memory_bytes: jax.Array | None = None
  # A behaviour trace's online intervals (traces.Intervals), None when
  # availability is a per-round probability: starts and ends `[devices, K]`,
  # period `[devices]`.
  online_starts: jax.Array | None = None
  online_ends: jax.Array | None = None
  online_period: jax.Array | None = None
  # [devices] bool: the devices mounting `Simulation.attack` (None: none).
  malicious: jax.Array | None = None


class Hparams(NamedTuple):
  """One run's values that a round may take traced: the runs axis.

  Stacked along a leading axis, R runs of a simulation vmap as one program
  (:meth:`Simulation.round_runs`). A run's seed replaces the simulation's in
  every federated draw (cohorts, unit masks, batches, per-step widths); the
  data, population and starting model are the same for every run.
  """
  seed: jax.Array       # int32
  client_lr: jax.Array  # float32
  server_lr: jax.Array  # float32
  mu: jax.Array         # float32, FedProx's coefficient


def map_clients(fn: Callable, in_axes: Sequence[int | None]) -> Callable:
  """`jax.vmap(fn, in_axes)` over a chunk's clients; a chunk of one runs `fn`
  unbatched (its outputs given the leading axis of one).

  A size-1 vmap still turns every matmul into a batched one, which
  XLA:CPU runs about 15% slower for convolutional clients (measured on
  2 cores); `runner.auto_chunk_size` picks chunks of one there.
  """
  batched = jax.vmap(fn, in_axes=in_axes)

  def run(*args):
    mapped = [a for a, axis in zip(args, in_axes) if axis == 0]
    if jax.tree.leaves(mapped)[0].shape[0] != 1:
      return batched(*args)
    args = [a if axis is None else jax.tree.map(lambda v: v[0], a)
            for a, axis in zip(args, in_axes)]
    return jax.tree.map(lambda v: jnp.expand_dims(v, 0), fn(*args))

  return run


def stack_runs(trees: Sequence[Any]) -> Any:
  """Trees of the same structure stacked along a new leading runs axis."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def run_slice(tree: Any, index: int) -> Any:
  """Run `index` of a tree with a leading runs axis."""
  return jax.tree.map(lambda a: a[index], tree)
