"""The jit-compiled federated round, composed of its pieces.

One call of :meth:`Simulation.round` is one compiled program: it draws the
cohort plan (engine.cohort, on the time model of engine.timing), runs the
clients (engine.clients) vmapped in chunks and ends with the server step on
the masked mean (engine.round); the tier fast path (tiered.py) replaces the
middle. This module binds those pieces to one simulation's settings.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_tl import (aggregators, faults, placement, policies, privacy,
                       sharding, tiered)
from fedjax_tl.client import HEAD_RULES, ClientUpdate
from fedjax_tl.data.federated import FederatedData
from fedjax_tl.devices import Population
from fedjax_tl.engine import cohort as cohorts
from fedjax_tl.engine import timing
from fedjax_tl.engine.arrays import device_arrays
from fedjax_tl.engine.reference import reference_round
from fedjax_tl.engine.round import masked_round
from fedjax_tl.engine.runs import RunsAxis, Tunable
from fedjax_tl.engine.state import (SLOTS_SALT, Cohort, DeviceArrays,
                                    Hparams, RoundStats, ServerState,
                                    client_key, round_key, run_slice,
                                    stack_runs)
from fedjax_tl.models.base import ModelDef, Params
from fedjax_tl.weights import without_frozen

# Re-exported: callers import the round's pieces from here.
__all__ = ["Simulation", "Tunable", "reference_round", "run_slice",
           "stack_runs", "ServerState", "RoundStats", "Cohort", "DeviceArrays",
           "Hparams"]

_HETEROFL = policies.get("heterofl")
_MEAN = aggregators.get("mean")


def _slotted(slot: policies.Slot | None) -> tuple[policies.Slot, ...]:
  """The trailing `slot` argument a cohort rule's masks take, if any."""
  return () if slot is None else (slot,)


def _runs_method(name: str) -> property:
  """`RunsAxis.<name>` of a simulation's runs axis, as a method of its own."""
  return property(lambda sim: getattr(sim.runs, name),
                  doc=getattr(RunsAxis, name).__doc__)


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
    masked_ce_head: with `masked_ce`, how the server averages the output
      layer's entries of label c (client.HEAD_RULES): "label_holders"
      (HeteroFL's `combine`) over the clients whose labels include c,
      dropping the other clients' entries of c from their uploads;
      "layer_holders" over every client holding the layer
      (engine.clients.label_rule; mask policies only).
    batch_size, round_deadline, deadline_mode, conv_positions,
      optimizer_slots: the time and memory model's settings
      (engine.timing.TimeModel, :attr:`time_model`).
    tier_fast_path: run each tier's clients at their sub-model's real shape
      (tiered.py; first-k policies only) instead of full size with masks.
    activation_masks: width policies mask their clients' hidden activations
      (:meth:`unit_scales`) instead of multiplying the params by `present`
      at every local step; the same update, faster (client.py).
    overcommit: over-commitment: ceil(overcommit x cohort_size) online
      devices are sampled and the first `cohort_size` to finish aggregated.
    mesh: a `clients` mesh (sharding.make_mesh) the data rows and each
      chunk's clients are split over, params replicated; None: one device.
      `chunk_size` must be a multiple of its size.
    tunable: how the optimisers are rebuilt for a run's Hparams (needed by
      the runs axis only, engine.runs).
    attack: what the devices flagged `arrays.malicious` do (faults.py).
    aggregator: how the server combines the deltas (aggregators.Aggregator);
      a stacked one (median, trimmed mean, Krum) needs the masked path.
    privacy: DP-FedAvg (privacy.Privacy), None for none: devices are
      Poisson-sampled, every participant weighs 1, its update is clipped to
      the clip norm in force and the sum is noised before the mean (over
      the expected holders, engine.round.expected_holders, by default). It
      needs the "mean" aggregator, a mask policy and no over-commitment;
      `create` sets its accounted `inclusion_rate` when it is None.
    frozen: the `layer/param` names no client trains (weights.frozen_names,
      config `weights_freeze`): zero in every client's `train` mask
      (:meth:`masks`), so they are neither trained nor uploaded, and the
      server keeps them bit for bit (no client holds them in its mask, so
      the masked mean leaves them alone).
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
  policy: policies.Policy = _HETEROFL
  masked_ce: bool = False
  masked_ce_head: str = "label_holders"
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
  aggregator: aggregators.Aggregator = _MEAN
  privacy: privacy.Privacy | None = None
  frozen: tuple[str, ...] = ()

  @classmethod
  def create(cls, model: ModelDef, client_update: ClientUpdate,
             server_tx: optax.GradientTransformation, data: FederatedData,
             population: Population, *, cohort_size: int, chunk_size: int,
             local_steps: int, seed: int, data_placement: str = "device",
             policy: policies.Policy = _HETEROFL, masked_ce: bool = False,
             masked_ce_head: str = "label_holders", batch_size: int = 10,
             round_deadline: float = 0.0, deadline_mode: str = "partial",
             conv_positions: tuple[tuple[str, int], ...] | None = None,
             tier_fast_path: bool = False, activation_masks: bool = True,
             overcommit: float = 1.0, optimizer_slots: int = 0,
             mesh: jax.sharding.Mesh | None = None,
             tunable: Tunable | None = None,
             attack: faults.Attack = faults.Attack(),
             aggregator: aggregators.Aggregator = _MEAN,
             privacy: privacy.Privacy | None = None,
             frozen: tuple[str, ...] = ()) -> "Simulation":
    """Binds `data` and `population`; the keywords are the fields' own.

    Args:
      data_placement: "device" (client rows on the device or mesh) or
        "host" (placement.HostRows: kept in host memory, a chunk's rows
        copied in as the round reads them).
      conv_positions: None: a convolutional model's, derived from the data.

    Raises:
      ValueError: DP without the mean aggregator, a mask policy and no
        over-commitment, an unknown `masked_ce_head`, or a chunk size the
        mesh does not divide.
    """
    if privacy is not None and (not aggregator.is_mean or
                                policy.weighted_upload or overcommit > 1):
      raise ValueError("privacy needs the mean aggregator, a mask policy and "
                       "no over-commitment")
    if masked_ce_head not in HEAD_RULES:
      raise ValueError(f"masked_ce_head {masked_ce_head!r} is not one of "
                       f"{', '.join(HEAD_RULES)}")
    if chunk_size % sharding.mesh_size(mesh):
      raise ValueError(f"chunk_size {chunk_size} is not a multiple "
                       f"of the mesh's {mesh.size} devices")
    if conv_positions is None:
      conv_positions = timing.conv_positions(model, data.x.shape[2:])
    proportions = population.tier_counts() / population.num_devices
    sim = cls(model=model, client_update=client_update, server_tx=server_tx,
               arrays=device_arrays(data, population, mesh, data_placement),
               tier_fractions=population.tier_fractions,
               tier_proportions=tuple(proportions.tolist()),
               cohort_size=cohort_size, chunk_size=chunk_size,
               local_steps=local_steps, seed=seed, policy=policy,
               masked_ce=masked_ce, masked_ce_head=masked_ce_head,
               batch_size=batch_size,
               round_deadline=round_deadline, deadline_mode=deadline_mode,
               conv_positions=conv_positions, tier_fast_path=tier_fast_path,
               activation_masks=activation_masks, overcommit=overcommit,
               optimizer_slots=optimizer_slots, mesh=mesh, tunable=tunable,
               attack=attack, aggregator=aggregator, privacy=privacy,
               frozen=tuple(frozen))
    if privacy is not None and privacy.inclusion_rate is None:
      # The accountant's rate: the largest device's chance of being drawn.
      sim = dataclasses.replace(sim, privacy=dataclasses.replace(
          privacy, inclusion_rate=sim.sampler.largest_inclusion(sim.arrays)))
    return sim

  # -- the pieces the round composes --

  @functools.cached_property
  def time_model(self) -> timing.TimeModel:
    """Simulated time, memory and traffic of this simulation's clients."""
    return timing.TimeModel(
        self.model, self.policy, self.tier_fractions, self.local_steps,
        batch_size=self.batch_size, round_deadline=self.round_deadline,
        deadline_mode=self.deadline_mode, conv_positions=self.conv_positions,
        optimizer_slots=self.optimizer_slots, frozen=self.frozen)

  @functools.cached_property
  def sampler(self) -> cohorts.Sampler:
    """How this simulation draws a round's cohort plan."""
    return cohorts.Sampler(self.time_model, self.tier_proportions,
                           self.cohort_size, self.num_sampled, self.num_slots,
                           self.privacy)

  @functools.cached_property
  def runs(self) -> RunsAxis:
    """This simulation's runs axis and its compiled programs."""
    return RunsAxis(self)

  @property
  def num_sampled(self) -> int:
    """Devices sampled per round (engine.cohort.sampled_count)."""
    return cohorts.sampled_count(self.cohort_size, self.overcommit,
                                 self.privacy, int(self.arrays.tier.shape[0]))

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
    return round_key(self.seed, round_index)

  def client_key(self, round_index: jax.Array, device_id: jax.Array
                 ) -> jax.Array:
    """The key of one device in one round: fold_in(fold_in(seed, r), id)."""
    return client_key(self.seed, round_index, device_id)

  def slot(self, round_index: jax.Array, index: jax.Array | None,
           widths: jax.Array | None) -> policies.Slot | None:
    """Cohort slot `index` of the round whose slots train `widths` (0: a
    slot that draws no units), for a cohort rule (`Policy.slotted`); None
    outside a cohort (`index` None) or for other policies."""
    if index is None or not self.policy.slotted:
      return None
    return policies.Slot(
        jax.random.fold_in(self.round_key(round_index), SLOTS_SALT), index,
        widths)

  def cohort(self, arrays: DeviceArrays, round_index: jax.Array,
             width_cap: jax.Array | None = None,
             clock: jax.Array | float = 0.0) -> Cohort:
    """The round's cohort and per-client plan (engine.cohort.Sampler.draw)."""
    return self.sampler.draw(arrays, self.seed, round_index, width_cap, clock)

  def sub_model_costs(self, fraction: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(flops share, bytes down, bytes up)` of width-`fraction` sub-models
    (engine.timing.TimeModel.sub_model_costs)."""
    return self.time_model.sub_model_costs(fraction)

  def memory_report(self) -> dict[str, int]:
    """Counts of devices memory caps below their tier's width, or excludes."""
    return self.time_model.memory_report(self.arrays)

  def unit_scales(self, fraction: jax.Array, round_index: jax.Array,
                  key: jax.Array, slot: policies.Slot | None = None
                  ) -> dict[str, jax.Array] | None:
    """A width policy's `[group size]` multiplier of each width group.

    The unit masks that :meth:`masks` turns into params masks, divided by
    the width with HeteroFL's scaler; None for depth and adapter policies,
    a model that does not apply units, or with `activation_masks` off
    (the client then masks its params), unless the model normalises: its
    norms need the held units. `slot`: the client's place in its cohort
    (:meth:`slot`), for a cohort rule.
    """
    if self.policy.units is None or not self.model.masks_activations:
      return None
    if not self.activation_masks and not self.model.normalised:
      return None
    return self.policy.units(self.model, fraction, round_index, key,
                             *_slotted(slot))

  def masks(self, fraction: jax.Array, params: Params, round_index: jax.Array,
            key: jax.Array, slot: policies.Slot | None = None
            ) -> tuple[Params, Params]:
    """`(present, train)` masks of one client (`Policy.masks`): what a
    width-`fraction` client holds and what it trains (never the `frozen`
    params). Every round path takes its clients' masks from here; `slot`
    (:meth:`slot`) is its place in the cohort, for a cohort rule."""
    present, train = self.policy.masks(self.model, fraction, params,
                                       round_index, key, *_slotted(slot))
    return present, without_frozen(train, self.frozen)

  def step_masks(self, fraction: jax.Array, params: Params,
                 activation: bool) -> Callable | None:
    """FjORD's draw of each local step's `(held, train)` (`Policy.step_masks`;
    `held` as unit vectors with `activation`), never training the `frozen`
    params; None when one sub-model serves every step."""
    if self.policy.step_masks is None:
      return None
    draw = self.policy.step_masks(self.model, self.tier_fractions, fraction,
                                  params, activation)
    if not self.frozen:
      return draw

    def masks(step_key):
      held, train = draw(step_key)
      return held, without_frozen(train, self.frozen)

    return masks

  def reparam(self, fraction: jax.Array, params: Params
              ) -> Callable[[Params], Params] | None:
    """What each local step's forward pass sees of a width-`fraction`
    client's params (`Policy.reparam`, made from the round's global
    `params`); None: the params themselves."""
    if self.policy.reparam is None:
      return None
    return self.policy.reparam(self.model, fraction, params)

  def deployed_masks(self, fraction: jax.Array, params: Params) -> Params:
    """The mask that makes a width-`fraction` tier's deployed model
    (`Policy.deployed`)."""
    return self.policy.deployed(self.model, fraction, params)

  # -- the vectorized round --

  @functools.cached_property
  def _round_jit(self) -> Callable:
    if self.tier_fast_path:
      tiered.check_eligible(self)
    return jax.jit(self.traced_round, **self._jit_shardings)

  @functools.cached_property
  def _rounds_jit(self) -> Callable:
    """`(state, arrays, num_rounds)`: a lax.scan of rounds, one compile per
    distinct `num_rounds`."""

    def scan(state, arrays, num_rounds):
      return jax.lax.scan(lambda s, _: self.traced_round(s, arrays), state,
                          length=num_rounds)

    return jax.jit(scan, static_argnums=2, **self._jit_shardings)

  def traced_round(self, state: ServerState, arrays: DeviceArrays
                   ) -> tuple[ServerState, RoundStats]:
    """One round on this simulation's path: masked, or tiers at their own
    shapes (`tier_fast_path`); traced under jit."""
    if self.tier_fast_path:
      return tiered.tiered_round(self, state, arrays)
    return masked_round(self, state, arrays)

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

  # The runs axis (engine.runs.RunsAxis) under the simulation's own names.
  hparams = _runs_method("hparams")
  with_hparams = _runs_method("with_hparams")
  round_with = _runs_method("round_with")
  round_runs = _runs_method("round_runs")
  init_runs = _runs_method("init_runs")
