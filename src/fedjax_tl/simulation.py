"""The jit-compiled federated round: cohort, plans, masks, local training, merge.

One call of :meth:`Simulation.round` is one compiled program: it draws the
cohort from `fold_in(seed, round)`, builds each client's capacity masks from
its tier, runs the clients vmapped in chunks (a `lax.scan` over chunks with
streamed weighted sums, so memory grows with the chunk, not the cohort) and
applies the server optimiser to the masked mean delta.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl import aggregators, capacity, cost, policies
from fedjax_tl.client import ClientUpdate, held_labels
from fedjax_tl.data.federated import FederatedData
from fedjax_tl.device_catalog import class_for_width, profiles_for_tiers
from fedjax_tl.devices import Population, sample_cohort
from fedjax_tl.models.base import ModelDef, Params

# Salts that separate the independent streams drawn from one round key, and
# from one client's key.
_COHORT_SALT, _CLIENT_SALT = 0, 1
_LEVEL_SALT, _UNITS_SALT, _TRAIN_SALT = 0, 1, 2


class ServerState(NamedTuple):
  """Everything a round reads and writes; all of it is checkpointed."""
  params: Params
  opt_state: optax.OptState
  round: jax.Array  # int32 scalar: the index of the next round
  # Cumulative accounting per tier, `[tiers]` float32 each: bytes_down (what
  # clients were sent: their sub-model), bytes_up (what they returned: what
  # they trained) and updates (client updates received).
  totals: dict[str, jax.Array]


class RoundStats(NamedTuple):
  """Scalars describing one round."""
  train_loss: jax.Array    # weighted mean client training loss
  participants: jax.Array  # cohort slots holding an online device
  held_fraction: jax.Array  # share of parameters some client updated


class Cohort(NamedTuple):
  """A round's cohort plan, `[slots]` each (padded to a multiple of the chunk)."""
  ids: jax.Array        # device ids
  valid: jax.Array      # slot holds an online device
  fraction: jax.Array   # hidden-width fraction the device trains
  weight: jax.Array     # aggregation weight (examples; 0 if not aggregated)
  num_steps: jax.Array  # local steps the device completes before the deadline
  finish: jax.Array     # simulated seconds until its upload ends


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


@dataclasses.dataclass(frozen=True)
class Simulation:
  """A federated simulation bound to its data, population and model.

  Attributes:
    model: the model definition (apply, layer specs).
    client_update: the local update of one client (see client.py).
    server_tx: the server optimiser, fed the pseudo-gradient `-mean_delta`.
    arrays: device-resident per-device data and population.
    tier_fractions: width fraction of each tier, `[tiers]`.
    tier_proportions: share of devices in each tier (HeteroFL's mix).
    cohort_size: M, devices per round.
    chunk_size: clients vmapped together; the cohort is padded to a multiple.
    local_steps: the fixed number of local steps.
    seed: the experiment seed; every draw derives from it and the round.
    policy: the width migration policy (see policies.py).
    heterofl_mode: "fix" (a device keeps its tier) or "dynamic".
    scaler: HeteroFL's scaler: during local training, the outputs of each
      hidden layer of a width-p sub-model are divided by p.
    masked_ce: HeteroFL's masked cross-entropy: a client's training softmax
      runs over the labels it holds only.
    batch_size: examples per local step (for the time model).
    round_deadline: simulated seconds a round may last, 0 for none.
    deadline_mode: "partial" (late devices do fewer local steps) or "drop".
    conv_positions: output positions per example of each conv layer (FLOPs).
  """
  model: ModelDef
  client_update: ClientUpdate
  server_tx: optax.GradientTransformation
  arrays: DeviceArrays
  tier_fractions: tuple[float, ...]
  tier_proportions: tuple[float, ...]
  cohort_size: int
  chunk_size: int
  local_steps: int
  seed: int
  policy: str = "heterofl"
  heterofl_mode: str = "fix"
  scaler: bool = False
  masked_ce: bool = False
  batch_size: int = 10
  round_deadline: float = 0.0
  deadline_mode: str = "partial"
  conv_positions: tuple[tuple[str, int], ...] = ()

  @classmethod
  def create(cls, model: ModelDef, client_update: ClientUpdate,
             server_tx: optax.GradientTransformation, data: FederatedData,
             population: Population, **kwargs: Any) -> "Simulation":
    profiles = population.profiles
    if profiles is None:  # a tier-only population: its nearest-width class
      profiles = profiles_for_tiers(
          population.tier, [class_for_width(f)
                            for f in population.tier_fractions],
          seed=0, jitter=0.0)
    if model.layers and len(model.init_params[model.layers[0].name][
        "kernel"].shape) == 4:
      kwargs.setdefault("conv_positions", tuple(cost.conv_positions(
          data.x.shape[2:], model.layers, model.init_params).items()))
    arrays = DeviceArrays(
        x=jnp.asarray(data.x), y=jnp.asarray(data.y),
        count=jnp.asarray(data.count, jnp.int32),
        tier=jnp.asarray(population.tier, jnp.int32),
        availability=jnp.asarray(population.availability, jnp.float32),
        compute_gflops=jnp.asarray(profiles.compute_gflops, jnp.float32),
        up_kbps=jnp.asarray(profiles.up_kbps, jnp.float32),
        down_kbps=jnp.asarray(profiles.down_kbps, jnp.float32))
    proportions = population.tier_counts() / population.num_devices
    return cls(model=model, client_update=client_update, server_tx=server_tx,
               arrays=arrays, tier_fractions=population.tier_fractions,
               tier_proportions=tuple(proportions.tolist()), **kwargs)

  @property
  def num_slots(self) -> int:
    return -(-self.cohort_size // self.chunk_size) * self.chunk_size

  def init(self, params: Params) -> ServerState:
    zeros = jnp.zeros(len(self.tier_fractions), jnp.float32)
    return ServerState(params=params, opt_state=self.server_tx.init(params),
                       round=jnp.asarray(0, jnp.int32),
                       totals={"bytes_down": zeros, "bytes_up": zeros,
                               "updates": zeros, "dropped": zeros,
                               "sim_seconds": jnp.zeros((), jnp.float32)})

  # -- pieces shared by the vectorized round and the per-client reference --

  def round_key(self, round_index: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(self.seed), round_index)

  def client_key(self, round_index: jax.Array, device_id: jax.Array):
    """The key of one device in one round: fold_in(fold_in(seed, r), id)."""
    return jax.random.fold_in(
        jax.random.fold_in(self.round_key(round_index), _CLIENT_SALT),
        device_id)

  def cohort(self, arrays: DeviceArrays, round_index: jax.Array) -> Cohort:
    """The round's cohort and per-client plan, padded to `num_slots`."""
    key = jax.random.fold_in(self.round_key(round_index), _COHORT_SALT)
    fractions = jnp.asarray(self.tier_fractions, jnp.float32)
    eligible = policies.eligible_devices(self.policy, fractions, arrays.tier)
    ids, valid = sample_cohort(key, arrays.availability * eligible,
                               self.cohort_size)
    pad = self.num_slots - self.cohort_size
    ids = jnp.pad(ids, (0, pad))
    valid = jnp.pad(valid, (0, pad))
    level_keys = jax.vmap(lambda i: jax.random.fold_in(
        self.client_key(round_index, i), _LEVEL_SALT))(ids)
    fraction = policies.client_fractions(
        self.policy, fractions, jnp.asarray(self.tier_proportions,
                                            jnp.float32),
        arrays.tier[ids], level_keys, self.heterofl_mode)
    # Simulated time: the device's speed scaled to its sub-model's FLOPs,
    # plus its sub-model's bytes over its bandwidths.
    flops_share, down_bytes, up_bytes = self.sub_model_costs(fraction)
    ms_per_sample = self._full_flops / (arrays.compute_gflops[ids] * 1e6)
    step_secs = cost.step_seconds(ms_per_sample, flops_share,
                                  batch_size=self.batch_size)
    comm_secs = cost.comm_seconds(down_bytes, up_bytes, arrays.down_kbps[ids],
                                  arrays.up_kbps[ids])
    deadline = self.round_deadline if self.round_deadline > 0 else jnp.inf
    outcome = cost.apply_deadline(step_secs, comm_secs, deadline,
                                  local_steps=self.local_steps,
                                  mode=self.deadline_mode)
    weight = arrays.count[ids].astype(jnp.float32) * valid * (
        outcome.participates)
    return Cohort(ids, valid, fraction, weight, outcome.steps,
                  outcome.finish_seconds)

  @property
  def _full_flops(self) -> jax.Array:
    """Forward FLOPs per example of the full model."""
    return cost.forward_flops(self.model.layers, self.model.init_params, None,
                              dict(self.conv_positions))

  def sub_model_costs(self, fraction: jax.Array):
    """`(flops share, bytes down, bytes up)` of width-`fraction` sub-models.

    Every policy's sub-model at a width has the size of the first-k one (a
    FjORD client is charged for its largest width), so the costs are those
    of the nearest of the tier widths and full width, computed once per
    round from mask shapes, not per client.
    """
    widths = jnp.asarray((*self.tier_fractions, 1.0), jnp.float32)
    params = self.model.init_params  # only shapes are read

    def costs(width):
      present, train = self.masks(width, params, jnp.int32(0),
                                  jax.random.key(0))
      held = jax.tree.map(lambda m: m != 0, present)
      return (cost.flops_fraction(self.model.layers, params, held,
                                  dict(self.conv_positions)),
              cost.mask_bytes(present), cost.mask_bytes(train))

    table = jax.vmap(costs)(widths)
    nearest = jnp.argmin(jnp.abs(fraction[:, None] - widths[None, :]), axis=1)
    return tuple(column[nearest] for column in table)

  def masks(self, fraction: jax.Array, params: Params, round_index: jax.Array,
            key: jax.Array) -> tuple[Params, Params]:
    """`(present, train)` masks of one client.

    Width policies train all they hold; with HeteroFL's scaler, `present`
    also divides each hidden layer's outputs by the width fraction. Depth
    policies hold everything and train the top layers only.
    """
    if self.policy in policies.DEPTH_POLICIES:
      layers = self.model.layers
      trained = policies.trained_layers(fraction, len(layers))
      present = jax.tree.map(jnp.ones_like, params)
      train = {spec.name: jax.tree.map(
          lambda p: jnp.full_like(p, trained[i]), params[spec.name])
               for i, spec in enumerate(layers)}
      return present, train
    units = policies.unit_masks(self.policy, fraction, round_index, key,
                                self.model.group_sizes)
    train = capacity.masks_from_units(units, self.model.layers, params)
    present = (capacity.scale_hidden(train, self.model.layers, fraction)
               if self.scaler else train)
    return present, train

  def server_step(self, state: ServerState, num: Params, den: Params
                  ) -> ServerState:
    """Applies the server optimiser to the masked mean delta."""
    mean, held = aggregators.masked_mean(num, den)
    grads = jax.tree.map(jnp.negative, mean)
    updates, opt_state = self.server_tx.update(grads, state.opt_state,
                                               state.params)
    # A parameter held by no client this round keeps its value.
    updates = jax.tree.map(lambda u, h: jnp.where(h, u, 0), updates, held)
    return state._replace(params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, round=state.round + 1)

  def run_client(self, arrays: DeviceArrays, params: Params,
                 round_index: jax.Array, device_id: jax.Array,
                 fraction: jax.Array, num_steps: jax.Array):
    """One client's `(delta, train_mask, stats, (bytes_down, bytes_up))`."""
    key = self.client_key(round_index, device_id)
    present, train = self.masks(fraction, params, round_index,
                                jax.random.fold_in(key, _UNITS_SALT))
    x, y, count = (arrays.x[device_id], arrays.y[device_id],
                   arrays.count[device_id])
    step_masks = None
    if self.policy == "fjord":
      fractions = jnp.asarray(self.tier_fractions, jnp.float32)

      def step_masks(step_key):
        width = policies.fjord_width(step_key, fractions, fraction)
        masks = capacity.width_masks(width, self.model.layers,
                                     self.model.group_sizes, params)
        return masks, masks
    label_mask = None
    if self.masked_ce:
      num_classes = params[self.model.layers[-1].name]["bias"].shape[-1]
      label_mask = held_labels(y, count, num_classes)
    delta, stats = self.client_update(
        params, present, train, x, y, count, num_steps,
        jax.random.fold_in(key, _TRAIN_SALT), label_mask, step_masks)
    traffic = (cost.mask_bytes(present), cost.mask_bytes(train))
    return delta, train, stats, traffic

  # -- the vectorized round --

  @functools.cached_property
  def _round_jit(self) -> Callable:
    return jax.jit(self._round)

  def round(self, state: ServerState) -> tuple[ServerState, RoundStats]:
    """Runs one round; compiled once, reused for every round."""
    return self._round_jit(state, self.arrays)

  def _round(self, state: ServerState, arrays: DeviceArrays):
    r = state.round
    plan = self.cohort(arrays, r)
    chunks = jax.tree.map(
        lambda a: a.reshape(-1, self.chunk_size, *a.shape[1:]), plan)
    run = jax.vmap(self.run_client, in_axes=(None, None, None, 0, 0, 0))

    num_tiers = len(self.tier_fractions)

    def body(carry, chunk: Cohort):
      num, den, loss_sum, per_tier = carry
      deltas, train, stats, (down, up) = run(
          arrays, state.params, r, chunk.ids, chunk.fraction, chunk.num_steps)
      num, den = aggregators.add_weighted(num, den, deltas, train,
                                          chunk.weight, deltas_masked=True)
      loss_sum = loss_sum + jnp.sum(stats.loss * chunk.weight)
      # [slots, tiers] membership of the online slots, to sum per tier;
      # devices past the deadline downloaded but did not upload.
      member = jax.nn.one_hot(arrays.tier[chunk.ids], num_tiers) * (
          chunk.valid[:, None])
      done = chunk.num_steps > 0
      per_tier = per_tier + member.T @ jnp.stack(
          [down, up * done, done, ~done], axis=1).astype(jnp.float32)
      return (num, den, loss_sum, per_tier), None

    num, den = aggregators.zeros_like_sums(state.params)
    (num, den, loss_sum, per_tier), _ = jax.lax.scan(
        body, (num, den, jnp.zeros((), jnp.float32),
               jnp.zeros((num_tiers, 4), jnp.float32)), chunks)
    new_state = self.server_step(state, num, den)
    totals = {name: state.totals[name] + per_tier[:, i] for i, name in
              enumerate(("bytes_down", "bytes_up", "updates", "dropped"))}
    # The round lasts until the last aggregated upload (or the deadline).
    round_seconds = jnp.max(jnp.where(plan.weight > 0, plan.finish, 0.0))
    totals["sim_seconds"] = state.totals["sim_seconds"] + round_seconds
    new_state = new_state._replace(totals=totals)
    held = jax.tree.leaves(jax.tree.map(lambda d: jnp.sum(d > 0), den))
    total = sum(np.size(a) for a in jax.tree.leaves(den))
    stats = RoundStats(
        train_loss=loss_sum / jnp.maximum(plan.weight.sum(), 1e-12),
        participants=plan.valid.sum(),
        held_fraction=sum(held) / total)
    return new_state, stats


def reference_round(sim: Simulation, state: ServerState) -> ServerState:
  """The same round as a plain per-client loop with numpy aggregation.

  The independent reference for the vectorized round (tests, benchmarks):
  one jitted client at a time, sums accumulated in float64 numpy.
  """
  plan = jax.jit(sim.cohort)(sim.arrays, state.round)
  one = jax.jit(sim.run_client)
  num = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), state.params)
  den = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), state.params)
  for i in range(sim.num_slots):
    weight = float(plan.weight[i])
    if weight == 0:
      continue
    delta, train, _, _ = one(sim.arrays, state.params, state.round,
                             plan.ids[i], plan.fraction[i], plan.num_steps[i])
    num = jax.tree.map(lambda n, d, m: n + weight * np.asarray(d) *
                       np.asarray(m), num, delta, train)
    den = jax.tree.map(lambda s, m: s + weight * np.asarray(m), den, train)
  as32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  return jax.jit(sim.server_step)(state, as32(num), as32(den))
