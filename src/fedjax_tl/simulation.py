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
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl import (aggregators, cost, faults, placement, policies,
                       privacy, sharding, tiered, traces)
from fedjax_tl.client import ClientUpdate, held_labels
from fedjax_tl.data.federated import FederatedData
from fedjax_tl.device_catalog import class_for_width, profiles_for_tiers
from fedjax_tl.devices import Population, poisson_cohort, sample_cohort
from fedjax_tl.engine.state import (CLIENT_SALT, COHORT_SALT, LEVEL_SALT,
                                    PRIVACY_SALT, TRAIN_SALT, UNITS_SALT,
                                    Cohort, DeviceArrays, Hparams, RoundStats,
                                    ServerState, map_clients, run_slice,
                                    stack_runs)
from fedjax_tl.models.base import ModelDef, Params

_BYTES_PER_MB = 2.0**20  # device memory figures are in MiB


@dataclasses.dataclass(frozen=True)
class Tunable:
  """How a simulation rebuilds its optimisers for a run's :class:`Hparams`.

  Attributes:
    client_tx: the client optimiser of a (possibly traced) learning rate.
    server_tx: the server optimiser of a (possibly traced) learning rate.
    client_lr, server_lr, mu: the configured values (the default run).
  """
  client_tx: Callable[[Any], optax.GradientTransformation]
  server_tx: Callable[[Any], optax.GradientTransformation]
  client_lr: float
  server_lr: float
  mu: float


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
    policy: the migration policy (policies.Policy): who trains which
      sub-model, its masks, traffic and deployed models.
    masked_ce: HeteroFL's masked cross-entropy: a client's training softmax
      runs over the labels it holds only.
    batch_size: examples per local step (for the time model).
    round_deadline: simulated seconds a round may last, 0 for none.
    deadline_mode: "partial" (late devices do fewer local steps) or "drop".
    conv_positions: output positions per example of each conv layer (FLOPs).
    tier_fast_path: run each tier's clients at their sub-model's real shape
      (tiered.py; first-k policies only) instead of full size with masks.
    activation_masks: width policies mask their clients' hidden activations
      (:meth:`unit_scales`) instead of multiplying the params by `present`
      at every local step; the same update, faster (client.py).
    overcommit: over-commitment: ceil(overcommit x cohort_size) online
      devices are sampled and the first `cohort_size` to finish aggregated.
    optimizer_slots: client optimiser state values per trained weight (1
      with momentum, else 0), for the memory estimate.
    mesh: a `clients` mesh (sharding.make_mesh) the data rows and each
      chunk's clients are split over, params replicated; None: one device.
      `chunk_size` must be a multiple of its size.
    tunable: how the optimisers are rebuilt for a run's Hparams (needed by
      :meth:`round_with` and :meth:`round_runs` only).
    attack: what the devices flagged `arrays.malicious` do (faults.py).
    aggregator: how the server combines the deltas (aggregators.Aggregator);
      a stacked one (median, trimmed mean, Krum) needs the masked path.
    privacy: DP-FedAvg (privacy.Privacy), None for none: devices are
      Poisson-sampled, every participant weighs 1, its update is clipped to
      the clip norm in force and the sum is noised before the mean. It
      needs the "mean" aggregator, a mask policy and no over-commitment.
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
  policy: policies.Policy = policies.get("heterofl")
  masked_ce: bool = False
  batch_size: int = 10
  round_deadline: float = 0.0
  deadline_mode: str = "partial"
  conv_positions: tuple[tuple[str, int], ...] = ()
  tier_fast_path: bool = False
  activation_masks: bool = True
  overcommit: float = 1.0
  optimizer_slots: int = 0
  mesh: jax.sharding.Mesh | None = None
  tunable: Tunable | None = None
  attack: faults.Attack = faults.Attack()
  aggregator: aggregators.Aggregator = aggregators.get("mean")
  privacy: privacy.Privacy | None = None

  @classmethod
  def create(cls, model: ModelDef, client_update: ClientUpdate,
             server_tx: optax.GradientTransformation, data: FederatedData,
             population: Population, *, data_placement: str = "device",
             **kwargs: Any) -> "Simulation":
    """Binds `data` and `population`; `data_placement` is "device" (client
    rows on the device or mesh) or "host" (placement.HostRows: kept in host
    memory, a chunk's rows copied in as the round reads them)."""
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
    dp = kwargs.get("privacy")
    if dp is not None and (
        not kwargs.get("aggregator", cls.aggregator).is_mean or
        kwargs.get("policy", cls.policy).weighted_upload or
        kwargs.get("overcommit", 1.0) > 1):
      raise ValueError("privacy needs the mean aggregator, a mask policy and "
                       "no over-commitment")
    mesh = kwargs.get("mesh")
    if kwargs["chunk_size"] % sharding.mesh_size(mesh):
      raise ValueError(f"chunk_size {kwargs['chunk_size']} is not a multiple "
                       f"of the mesh's {mesh.size} devices")
    # Client data is the bulk: its rows are split over the mesh; the
    # population vectors are small and replicated.
    if data_placement == "host":
      rows = placement.HostRows(data.x), placement.HostRows(data.y)
    else:
      rows = sharding.shard_rows(data.x, mesh), sharding.shard_rows(data.y,
                                                                    mesh)
    arrays = DeviceArrays(
        x=rows[0], y=rows[1],
        count=jnp.asarray(data.count, jnp.int32),
        tier=jnp.asarray(population.tier, jnp.int32),
        availability=jnp.asarray(population.availability, jnp.float32),
        compute_gflops=jnp.asarray(profiles.compute_gflops, jnp.float32),
        up_kbps=jnp.asarray(profiles.up_kbps, jnp.float32),
        down_kbps=jnp.asarray(profiles.down_kbps, jnp.float32),
        memory_bytes=jnp.asarray(profiles.memory_mb * _BYTES_PER_MB,
                                 jnp.float32))
    if population.online is not None:
      arrays = arrays._replace(
          online_starts=jnp.asarray(population.online.starts, jnp.float32),
          online_ends=jnp.asarray(population.online.ends, jnp.float32),
          online_period=jnp.asarray(population.online.finish_time,
                                    jnp.float32))
    if population.malicious is not None:
      arrays = arrays._replace(malicious=jnp.asarray(population.malicious,
                                                     bool))
    arrays = arrays._replace(**sharding.replicate(
        {k: v for k, v in arrays._asdict().items()
         if k not in ("x", "y") and v is not None}, mesh))
    proportions = population.tier_counts() / population.num_devices
    return cls(model=model, client_update=client_update, server_tx=server_tx,
               arrays=arrays, tier_fractions=population.tier_fractions,
               tier_proportions=tuple(proportions.tolist()), **kwargs)

  @property
  def num_sampled(self) -> int:
    """Devices sampled per round: `cohort_size`, more with over-commitment;
    with DP, enough slots for a Poisson draw of `cohort_size` expected."""
    if self.privacy is not None:
      return min(privacy.slots_for(self.cohort_size),
                 int(self.arrays.tier.shape[0]))
    return cost.overcommit_size(self.cohort_size, self.overcommit)

  @property
  def num_slots(self) -> int:
    return -(-self.num_sampled // self.chunk_size) * self.chunk_size

  def init(self, params: Params) -> ServerState:
    zeros = jnp.zeros(len(self.tier_fractions), jnp.float32)
    state = ServerState(params=params, opt_state=self.server_tx.init(params),
                        round=jnp.asarray(0, jnp.int32),
                        totals={"bytes_down": zeros, "bytes_up": zeros,
                                "updates": zeros, "dropped": zeros,
                                "excluded": zeros,
                                "skipped": jnp.zeros((), jnp.float32),
                                "sim_seconds": jnp.zeros((), jnp.float32)},
                        width_cap=jnp.ones(self.arrays.tier.shape,
                                           jnp.float32),
                        privacy=privacy.initial_state(self.privacy))
    return sharding.replicate(state, self.mesh)

  # -- pieces shared by the vectorized round and the per-client reference --

  def round_key(self, round_index: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(self.seed), round_index)

  def client_key(self, round_index: jax.Array, device_id: jax.Array):
    """The key of one device in one round: fold_in(fold_in(seed, r), id)."""
    return jax.random.fold_in(
        jax.random.fold_in(self.round_key(round_index), CLIENT_SALT),
        device_id)

  def cohort(self, arrays: DeviceArrays, round_index: jax.Array,
             width_cap: jax.Array | None = None,
             clock: jax.Array | float = 0.0) -> Cohort:
    """The round's cohort and per-client plan, padded to `num_slots`.

    `width_cap[devices]`, if given, caps each device's width (ServerState).
    `clock` is the simulated seconds at the round's start (the cumulative
    `sim_seconds` total): with a behaviour trace, a device is online iff its
    trace says so at that time (:meth:`online`). A device's width is capped
    to what fits its memory and a device that fits no width is never sampled
    (:meth:`memory_caps`). With over-commitment, `num_sampled` devices are
    drawn and only the first `cohort_size` to finish (after the deadline
    rule) are aggregated; the others are folded into `dropped`: they
    downloaded, but their plan has 0 steps and weight 0.
    """
    key = jax.random.fold_in(self.round_key(round_index), COHORT_SALT)
    fractions = jnp.asarray(self.tier_fractions, jnp.float32)
    eligible = self.policy.eligible(fractions, arrays.tier)
    memory_cap = None
    if arrays.memory_bytes is not None:
      memory_cap = self.memory_caps(arrays)
      eligible = eligible & (memory_cap > 0)
    candidates = self.online(arrays, clock) * eligible
    overflow = None
    if self.privacy is not None:
      ids, valid, overflow = poisson_cohort(
          key, candidates, self.privacy.sampling_rate, self.num_sampled)
    else:
      ids, valid = sample_cohort(key, candidates, self.num_sampled)
    pad = self.num_slots - self.num_sampled
    ids = jnp.pad(ids, (0, pad))
    valid = jnp.pad(valid, (0, pad))
    level_keys = jax.vmap(lambda i: jax.random.fold_in(
        self.client_key(round_index, i), LEVEL_SALT))(ids)
    fraction = self.policy.widths(
        fractions, jnp.asarray(self.tier_proportions, jnp.float32),
        arrays.tier[ids], level_keys)
    if width_cap is not None:
      fraction = jnp.minimum(fraction, width_cap[ids])
    if memory_cap is not None:
      fraction = jnp.minimum(fraction, memory_cap[ids])
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
    participates, steps = outcome.participates, outcome.steps
    if self.privacy is None and self.num_sampled > self.cohort_size:
      # Over-commitment: the server stops waiting once `cohort_size` uploads
      # are in; infinite finish times (dropped) are never kept.
      kept = cost.first_to_finish(outcome.finish_seconds, self.cohort_size,
                                  valid)
      participates = participates & kept
      steps = jnp.where(kept, steps, 0)
    # DP-FedAvg weighs every participant alike: a device's influence is
    # bounded by the clip norm alone, not by its example count too.
    size = 1.0 if self.privacy is not None else arrays.count[ids].astype(
        jnp.float32)
    weight = size * valid * participates
    return Cohort(ids, valid, fraction, weight, steps,
                  outcome.finish_seconds, overflow)

  def online(self, arrays: DeviceArrays,
             clock: jax.Array | float = 0.0) -> jax.Array:
    """`[devices]` float32 chance each device is online in a round.

    Without a behaviour trace, the population's per-round probability; with
    one, 1 or 0: whether `traces.available_at(clock)`, the trace repeating
    with its period. The clock is float32 seconds (1/16 s resolution up to
    about 12 days of simulated time).
    """
    if arrays.online_starts is None:
      return arrays.availability
    return traces.available_at(
        clock, arrays.online_starts, arrays.online_ends,
        arrays.online_period).astype(jnp.float32)

  def round_seconds(self, arrays: DeviceArrays, plan: Cohort,
                    clock: jax.Array) -> jax.Array:
    """Simulated seconds a round lasts: until its last aggregated upload.

    With a behaviour trace a round that aggregates nobody still lets time
    pass, or availability would never change: it lasts the deadline, or
    without one until some device's next online interval starts.
    """
    seconds = jnp.max(jnp.where(plan.weight > 0, plan.finish, 0.0))
    if arrays.online_starts is None:
      return seconds
    idle = (jnp.float32(self.round_deadline) if self.round_deadline > 0 else
            traces.seconds_until_online(clock, arrays.online_starts,
                                        arrays.online_period))
    return jnp.where(jnp.any(plan.weight > 0), seconds, idle)

  def training_memory(self, widths: jax.Array) -> jax.Array:
    """`[widths]` bytes to train each width's sub-model (this policy's masks).

    `cost.training_memory_bytes` of the client's `present` and `train` masks:
    4 bytes x (held params + trained params x (1 + optimizer_slots) +
    batch_size x every layer's kept outputs). Depth policies hold the full
    model and train its top layers, so they are covered by their masks too.
    """
    params = self.model.init_params  # only shapes are read

    def need(width):
      present, train = self.masks(width, params, jnp.int32(0),
                                  jax.random.key(0))
      return cost.training_memory_bytes(
          self.model.layers, params, present, train,
          batch_size=self.batch_size, positions=dict(self.conv_positions),
          optimizer_slots=self.optimizer_slots)

    return jax.vmap(need)(jnp.asarray(widths, jnp.float32))

  @property
  def width_levels(self) -> tuple[float, ...]:
    """The widths a device may be capped to: the tier widths and 1."""
    return tuple(sorted({*self.tier_fractions, 1.0}))

  def memory_caps(self, arrays: DeviceArrays) -> jax.Array:
    """`[devices]` the largest width level whose training fits in memory.

    0 for a device that fits none of the widths the policy may give it
    (`Policy.smallest_width`): it is never sampled.
    """
    widths = jnp.asarray(self.width_levels, jnp.float32)
    fits = self.training_memory(widths)[None, :] <= arrays.memory_bytes[:, None]
    cap = jnp.max(jnp.where(fits, widths[None, :], 0.0), axis=1)
    smallest = self.policy.smallest_width(self.width_levels)
    return jnp.where(cap >= smallest, cap, 0.0)

  def memory_report(self) -> dict[str, int]:
    """Counts of devices memory caps below their tier's width, or excludes."""
    if self.arrays.memory_bytes is None:
      return {"memory_capped": 0, "memory_excluded": 0}
    cap = np.asarray(jax.jit(self.memory_caps)(self.arrays))
    width = np.asarray(self.tier_fractions, np.float32)[np.asarray(
        self.arrays.tier)]
    return {"memory_capped": int(np.sum((cap > 0) & (cap < width))),
            "memory_excluded": int(np.sum(cap == 0))}

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
              *self.policy.traffic(present, train))

    table = jax.vmap(costs)(widths)
    nearest = jnp.argmin(jnp.abs(fraction[:, None] - widths[None, :]), axis=1)
    return tuple(column[nearest] for column in table)

  def unit_scales(self, fraction: jax.Array, round_index: jax.Array,
                  key: jax.Array) -> tuple[jax.Array, ...] | None:
    """A width policy's `[group_size]` multiplier of each hidden group.

    The unit masks that :meth:`masks` turns into params masks, divided by
    the width with HeteroFL's scaler; None for depth and adapter policies,
    or with `activation_masks` off (the client then masks its params).
    """
    if not self.activation_masks or self.policy.units is None:
      return None
    return self.policy.units(self.model, fraction, round_index, key)

  def masks(self, fraction: jax.Array, params: Params, round_index: jax.Array,
            key: jax.Array) -> tuple[Params, Params]:
    """`(present, train)` masks of one client (`Policy.masks`).

    Width policies train all they hold; with HeteroFL's scaler, `present`
    also divides each hidden layer's outputs by the width fraction. Depth
    policies hold everything and train the top layers only. Adapter policies
    hold the frozen backbone and train the adapters' first ceil(p*r_max)
    components.
    """
    return self.policy.masks(self.model, fraction, params, round_index, key)

  def deployed_masks(self, fraction: jax.Array, params: Params) -> Params:
    """The mask that makes a width-`fraction` tier's deployed model.

    Width policies deploy the first-k slice (with HeteroFL's scaler when it
    trained with one); depth policies the whole model; adapter policies the
    backbone with the adapters truncated to the tier's rank.
    """
    return self.policy.deployed(self.model, fraction, params)

  def server_step(self, state: ServerState, num: Params, den: Params
                  ) -> ServerState:
    """Applies the server optimiser to the masked mean delta.

    A round that aggregated nobody (every client excluded, or none online)
    skips the step: params and optimiser state stay as they were.
    """
    mean, held = aggregators.masked_mean(num, den)
    grads = jax.tree.map(jnp.negative, mean)
    updates, opt_state = self.server_tx.update(grads, state.opt_state,
                                               state.params)
    # A parameter held by no client this round keeps its value.
    updates = jax.tree.map(lambda u, h: jnp.where(h, u, 0), updates, held)
    step = jnp.stack([jnp.any(h) for h in jax.tree.leaves(held)]).any()
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(step, n, o), new, old)
    return state._replace(
        params=keep(optax.apply_updates(state.params, updates), state.params),
        opt_state=keep(opt_state, state.opt_state), round=state.round + 1)

  def malicious(self, arrays: DeviceArrays, device_id: jax.Array
                ) -> jax.Array | None:
    """Whether a device mounts `self.attack` (None without an attack)."""
    if self.attack.kind == "none" or arrays.malicious is None:
      return None
    return arrays.malicious[device_id]

  @property
  def num_classes(self) -> int:
    return self.model.init_params[self.model.layers[-1].name]["bias"].shape[-1]

  def run_client(self, arrays: DeviceArrays, params: Params,
                 round_index: jax.Array, device_id: jax.Array,
                 fraction: jax.Array, num_steps: jax.Array):
    """One client's `(delta, mask, stats, traffic)`.

    The round adds `weight * mask * delta` and `weight * mask` to its sums.
    For mask policies `mask` is the 0/1 train mask and `delta` is zero off
    it; for adapter policies they are HetLoRA's padded-factor difference and
    norm weight (lora.aggregation_terms), and `stats.width` is the width
    the client keeps after rank self-pruning. A malicious device's labels
    and upload are corrupted here (`self.attack`), so every round path
    sees the same attack. `traffic` is an adapter client's `(bytes_down,
    bytes_up)` (its upload depends on its pruning); None for mask policies,
    whose clients move their width's sub-model (:meth:`sub_model_costs`).
    """
    key = self.client_key(round_index, device_id)
    present, train = self.masks(fraction, params, round_index,
                                jax.random.fold_in(key, UNITS_SALT))
    units = self.unit_scales(fraction, round_index,
                             jax.random.fold_in(key, UNITS_SALT))
    x, y, count = (arrays.x[device_id], arrays.y[device_id],
                   arrays.count[device_id])
    malicious = self.malicious(arrays, device_id)
    y = self.attack.labels(y, malicious, self.num_classes)
    step_masks = None
    if self.policy.step_masks is not None:
      step_masks = self.policy.step_masks(self.model, self.tier_fractions,
                                          fraction, params, units is not None)
    label_mask = None
    if self.masked_ce:
      label_mask = held_labels(y, count, self.num_classes)
    delta, stats = self.client_update(
        params, present, train, x, y, count, num_steps,
        jax.random.fold_in(key, TRAIN_SALT), label_mask, step_masks,
        units=units)
    traffic = None
    if self.policy.upload is not None:
      down, _ = self.policy.traffic(present, train)
      delta, train, width, up = self.policy.upload.terms(params, delta,
                                                         present, fraction)
      traffic = (down, up)
      stats = stats._replace(width=width)
    return self.attack.delta(delta, malicious), train, stats, traffic

  def _prune_widths(self, state: ServerState, plan: Cohort,
                    widths: jax.Array) -> ServerState:
    """Lowers the width cap of aggregated clients that pruned their rank."""
    kept = jnp.where(plan.weight > 0, widths, 1.0)
    return state._replace(width_cap=state.width_cap.at[plan.ids].min(kept))

  # -- the vectorized round --

  @functools.cached_property
  def _round_jit(self) -> Callable:
    if self.tier_fast_path:
      tiered.check_eligible(self)
    return jax.jit(self._any_round, **self._jit_shardings)

  @functools.cached_property
  def _rounds_jit(self) -> Callable:
    """`(state, arrays, num_rounds)`: a lax.scan of rounds, one compile per
    distinct `num_rounds`."""

    def scan(state, arrays, num_rounds):
      return jax.lax.scan(lambda s, _: self._any_round(s, arrays), state,
                          length=num_rounds)

    return jax.jit(scan, static_argnums=2, **self._jit_shardings)

  def _any_round(self, state: ServerState, arrays: DeviceArrays
                 ) -> tuple[ServerState, RoundStats]:
    """One round on this simulation's path: masked, or tiers at their own
    shapes (`tier_fast_path`); traced under jit."""
    if self.tier_fast_path:
      return tiered.tiered_round(self, state, arrays)
    return self._round(state, arrays)

  @property
  def data_placement(self) -> str:
    """Where the client rows live: "host" (placement.HostRows) or "device"."""
    return ("host" if isinstance(self.arrays.x, placement.HostRows) else
            "device")

  @property
  def _jit_shardings(self) -> dict[str, Any]:
    """With a mesh, a round's outputs (state, stats) come back replicated."""
    if self.mesh is None:
      return {}
    return {"out_shardings": jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec())}

  def round(self, state: ServerState) -> tuple[ServerState, RoundStats]:
    """Runs one round; compiled once, reused for every round."""
    return self._round_jit(state, self.arrays)

  def rounds(self, state: ServerState, num_rounds: int
             ) -> tuple[ServerState, RoundStats]:
    """Runs `num_rounds` rounds as one compiled call (a `lax.scan`).

    The same rounds as calling :meth:`round` `num_rounds` times, with the
    stats stacked along a leading `[num_rounds]` axis. Each distinct
    `num_rounds` compiles once; 1 is :meth:`round`'s own program.
    """
    if num_rounds == 1:
      state, stats = self.round(state)
      return state, jax.tree.map(lambda a: a[None], stats)
    return self._rounds_jit(state, self.arrays, num_rounds)

  def _round(self, state: ServerState, arrays: DeviceArrays):
    r = state.round
    plan = self.cohort(arrays, r, state.width_cap, state.totals["sim_seconds"])
    chunks = jax.tree.map(  # the per-slot fields
        lambda a: a.reshape(-1, self.chunk_size, *a.shape[1:]),
        plan._replace(overflow=None))
    run = map_clients(self.run_client, in_axes=(None, None, None, 0, 0, 0))

    def body(carry, chunk: Cohort):
      num, den, loss_sum = carry
      # Each device runs chunk_size / mesh size of the chunk's clients; the
      # weighted sums below then all-reduce over the mesh.
      chunk = sharding.constrain_clients(chunk, self.mesh)
      deltas, train, stats, traffic = run(
          arrays, state.params, r, chunk.ids, chunk.fraction, chunk.num_steps)
      deltas, train, weight, excluded, unclipped = self.screen_chunk(
          deltas, train, chunk.weight, state.privacy["clip_norm"])
      stacked = None
      if self.aggregator.stacked:  # kept for the statistic after the scan
        stacked = (deltas, train, weight)
      else:
        num, den = aggregators.add_weighted(
            num, den, deltas, train, weight,
            deltas_masked=not self.policy.weighted_upload)
      loss_sum = loss_sum + self.loss_sum(stats.loss, weight)
      return (num, den, loss_sum), (traffic, stats.width, excluded, unclipped,
                                    stacked)

    num, den = aggregators.zeros_like_sums(state.params)
    (num, den, loss_sum), (traffic, widths, excluded, unclipped,
                           stacked) = jax.lax.scan(
        body, (num, den, jnp.zeros((), jnp.float32)), chunks)
    flat = lambda a: a.reshape(-1)
    if traffic is None:
      # A mask policy's client moves its width's sub-model: one table per
      # round (as the time model reads it), not a count per client.
      traffic = self.sub_model_costs(plan.fraction)[1:]
    if self.aggregator.stacked:
      num, den = self.aggregator.combine(*jax.tree.map(
          lambda a: a.reshape(-1, *a.shape[2:]), stacked))
    new_state, stats = self.finish_round(state, arrays, plan, num, den,
                                         loss_sum, jax.tree.map(flat, traffic),
                                         flat(excluded), flat(unclipped))
    if self.policy.prunes_widths:  # an excluded client's width is not trusted
      new_state = self._prune_widths(
          new_state, plan, jnp.where(flat(excluded), 1.0, flat(widths)))
    return new_state, stats

  def screen_chunk(self, deltas: Params, masks: Params, weights: jax.Array,
                   clip_norm: jax.Array | None = None
                   ) -> tuple[Params, Params, jax.Array, jax.Array, jax.Array]:
    """A chunk's uploads as the server takes them.

    A client whose upload holds NaN or Inf is excluded (faults.screen:
    weight 0, delta zeroed); the rest are prepared for the aggregator
    (clipped for "clip"), or with DP clipped to `clip_norm` (the norm in
    force, `ServerState.privacy`). `masks` are checked too for adapter
    policies (their norm weights come from the trained values). Returns
    `(deltas, masks, weights, excluded[clients], unclipped[clients])`,
    `unclipped` marking the aggregated clients whose update was within
    the DP clip norm (all False without DP).
    """
    checked = masks if self.policy.weighted_upload else None
    deltas, checked, weights, excluded = faults.screen(deltas, weights,
                                                       checked)
    masks = masks if checked is None else checked
    unclipped = jnp.zeros(weights.shape, bool)
    if self.privacy is not None:
      deltas, within = aggregators.clip_by_norm(deltas, clip_norm)
      unclipped = within & (weights > 0)
    return (self.aggregator.prepare(deltas), masks, weights, excluded,
            unclipped)

  @staticmethod
  def loss_sum(loss: jax.Array, weights: jax.Array) -> jax.Array:
    """`sum_i w_i loss_i` over the aggregated clients (an excluded client's
    loss may be NaN)."""
    return jnp.sum(jnp.where(weights > 0, loss * weights, 0))

  def finish_round(self, state: ServerState, arrays: DeviceArrays,
                   plan: Cohort, num: Params, den: Params,
                   loss_sum: jax.Array, traffic: tuple[jax.Array, jax.Array],
                   excluded: jax.Array | None = None,
                   unclipped: jax.Array | None = None
                   ) -> tuple[ServerState, RoundStats]:
    """The server step, accounting and stats that end every round path.

    Args:
      state: the state the round started from.
      arrays: the per-device arrays.
      plan: the round's cohort plan.
      num, den: the weighted sums of the cohort's deltas and masks.
      loss_sum: the weighted sum of the clients' training losses.
      traffic: `[slots]` bytes down and up of each slot's sub-model.
      excluded: `[slots]` bool, aggregated slots whose update was not finite
        (:meth:`screen_chunk`); None: none.
      unclipped: `[slots]` bool, aggregated slots whose update was within
        the DP clip norm (:meth:`screen_chunk`); None: none.
    """
    down, up = traffic
    if excluded is None:
      excluded = jnp.zeros(plan.ids.shape, bool)
    num, private = self.privatize(state, plan, num, excluded, unclipped)
    # [slots, tiers] membership of the online slots, to sum per tier;
    # devices past the deadline downloaded but did not upload.
    member = jax.nn.one_hot(arrays.tier[plan.ids], len(self.tier_fractions)
                            ) * plan.valid[:, None]
    done = plan.num_steps > 0
    per_tier = member.T @ jnp.stack([down, up * done, done, ~done, excluded],
                                    axis=1).astype(jnp.float32)
    totals = {name: state.totals[name] + per_tier[:, i] for i, name in
              enumerate(("bytes_down", "bytes_up", "updates", "dropped",
                         "excluded"))}
    # Rounds whose every aggregated client was excluded: the model stays.
    num_excluded = excluded.sum()
    totals["skipped"] = state.totals["skipped"] + (
        (num_excluded > 0) & (num_excluded == (plan.weight > 0).sum()))
    # The round lasts until the last aggregated upload (or the deadline).
    clock = state.totals["sim_seconds"]
    totals["sim_seconds"] = clock + self.round_seconds(arrays, plan, clock)
    new_state = self.server_step(state, num, den)._replace(totals=totals,
                                                           privacy=private)
    held = sum(jnp.sum(d > 0) for d in jax.tree.leaves(den))
    total = sum(np.size(d) for d in jax.tree.leaves(den))
    stats = RoundStats(
        train_loss=loss_sum / jnp.maximum(
            jnp.where(excluded, 0, plan.weight).sum(), 1e-12),
        participants=plan.valid.sum(), held_fraction=held / total,
        excluded=num_excluded)
    return new_state, stats

  def privatize(self, state: ServerState, plan: Cohort, num: Params,
                excluded: jax.Array, unclipped: jax.Array | None
                ) -> tuple[Params, dict]:
    """DP-FedAvg's release: `(num + Gaussian noise, next privacy state)`.

    Without DP, `(num, state.privacy)` unchanged. The noise is drawn from
    the round's key, so every round path adds the same noise.
    """
    if self.privacy is None:
      return num, state.privacy
    aggregated = (plan.weight > 0) & ~excluded
    count = (jnp.zeros((), jnp.float32) if unclipped is None else
             (unclipped & aggregated).sum().astype(jnp.float32))
    num, private = self.privacy.release(
        num, state.privacy, count, aggregated.sum().astype(jnp.float32),
        jax.random.fold_in(self.round_key(state.round), PRIVACY_SALT))
    return num, {**private, "overflow": private["overflow"] + plan.overflow}

  # -- the runs axis: a run's seed and continuous hyperparameters traced --

  def hparams(self, seed: int | None = None, client_lr: float | None = None,
              server_lr: float | None = None, mu: float | None = None
              ) -> Hparams:
    """A run's :class:`Hparams`; a value left out is the configured one."""
    t = self._tunable()
    pick = lambda value, default: default if value is None else value
    return Hparams(seed=jnp.asarray(pick(seed, self.seed), jnp.int32),
                   client_lr=jnp.asarray(pick(client_lr, t.client_lr),
                                         jnp.float32),
                   server_lr=jnp.asarray(pick(server_lr, t.server_lr),
                                         jnp.float32),
                   mu=jnp.asarray(pick(mu, t.mu), jnp.float32))

  def with_hparams(self, hparams: Hparams) -> "Simulation":
    """This simulation running as the run `hparams` (traced or concrete).

    The run's seed replaces `seed`, its learning rates rebuild the client
    and server optimisers (:class:`Tunable`) and its mu replaces the
    client's FedProx coefficient. An optimiser's state does not depend on
    its learning rate (SGD, Adam, Yogi), so :meth:`init` serves every run.
    """
    t = self._tunable()
    return dataclasses.replace(
        self, seed=hparams.seed, server_tx=t.server_tx(hparams.server_lr),
        client_update=functools.partial(
            self.client_update, run_tx=t.client_tx(hparams.client_lr),
            run_mu=hparams.mu))

  def round_with(self, state: ServerState, hparams: Hparams
                 ) -> tuple[ServerState, RoundStats]:
    """One round of the run `hparams`: the same as :meth:`round` of a
    simulation built with its values, but one program serves every value."""
    return self._round_with_jit(state, hparams, self.arrays)

  def round_runs(self, states: ServerState, hparams: Hparams
                 ) -> tuple[ServerState, RoundStats]:
    """One round of R runs as one compiled program (vmapped over runs).

    `states` and `hparams` carry a leading runs axis (:func:`stack_runs`,
    :meth:`init_runs`); so do the returned state and stats.
    """
    return self._runs_jit(states, hparams, self.arrays)

  def init_runs(self, params: Params, num_runs: int) -> ServerState:
    """`num_runs` copies of :meth:`init`, stacked along a leading runs axis."""
    return stack_runs([self.init(params)] * num_runs)

  def _tunable(self) -> Tunable:
    if self.tunable is None:
      raise ValueError("hyperparameters as values (the runs axis) need "
                       "Simulation.tunable")
    return self.tunable

  def _hparams_round(self, state: ServerState, hparams: Hparams,
                     arrays: DeviceArrays) -> tuple[ServerState, RoundStats]:
    return self.with_hparams(hparams)._any_round(state, arrays)

  @functools.cached_property
  def _round_with_jit(self) -> Callable:
    return jax.jit(self._hparams_round)

  @functools.cached_property
  def _runs_jit(self) -> Callable:
    return jax.jit(jax.vmap(self._hparams_round, in_axes=(0, 0, None)))


def reference_round(sim: Simulation, state: ServerState) -> ServerState:
  """The same round as a plain per-client loop with numpy aggregation.

  The independent reference for the vectorized round (tests, benchmarks):
  one jitted client at a time, sums accumulated in float64 numpy. A client
  whose upload is not finite is skipped; "clip" and DP clip in numpy; a
  stacked aggregator gets the aggregated clients' uploads stacked (only
  theirs). DP's noise is the round's own draw (:meth:`Simulation.privatize`).
  """
  plan = jax.jit(sim.cohort)(sim.arrays, state.round, state.width_cap,
                             state.totals["sim_seconds"])
  one = jax.jit(sim.run_client)
  num = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), state.params)
  den = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), state.params)
  widths = np.ones(sim.num_slots, np.float32)
  unclipped = np.zeros(sim.num_slots, bool)
  excluded = np.zeros(sim.num_slots, bool)
  uploads = []
  for i in range(sim.num_slots):
    weight = float(plan.weight[i])
    if weight == 0:
      continue
    delta, train, stats, _ = one(sim.arrays, state.params, state.round,
                                 plan.ids[i], plan.fraction[i],
                                 plan.num_steps[i])
    delta, train = (jax.tree.map(np.asarray, t) for t in (delta, train))
    if not all(np.isfinite(a).all() for a in jax.tree.leaves((delta, train))):
      excluded[i] = True
      continue  # no part in the aggregate
    if stats.width is not None:
      widths[i] = float(stats.width)
    bound = (float(state.privacy["clip_norm"]) if sim.privacy is not None else
             sim.aggregator.clip_norm)
    if bound is not None:
      norm = np.sqrt(sum(np.sum(np.square(d, dtype=np.float64))
                         for d in jax.tree.leaves(delta)))
      unclipped[i] = norm <= bound
      delta = jax.tree.map(lambda d: d * min(1.0, bound / max(norm, 1e-30)),
                           delta)
    uploads.append((delta, train, weight))
    num = jax.tree.map(lambda n, d, m: n + weight * d * m, num, delta, train)
    den = jax.tree.map(lambda s, m: s + weight * m, den, train)
  if sim.aggregator.stacked and uploads:
    num, den = sim.aggregator.combine(*stack_runs(
        [jax.tree.map(jnp.asarray, u) for u in uploads]))
  as32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  num, private = jax.jit(sim.privatize)(state, plan, as32(num), excluded,
                                        unclipped)
  state = jax.jit(sim.server_step)(state, num, as32(den))._replace(
      privacy=private)
  if sim.policy.prunes_widths:
    state = sim._prune_widths(state, plan, jnp.asarray(widths))
  return state
