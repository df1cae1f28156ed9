"""The simulated time and memory model of a round.

How long a client's local steps and transfers take on its device, who meets
the round deadline, how long the round lasts, and which widths fit in memory.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import cost, policies, traces
from fedjax_tl.engine.state import Cohort, DeviceArrays
from fedjax_tl.models.base import ModelDef
from fedjax_tl.weights import without_frozen


def conv_positions(model: ModelDef, input_shape: Sequence[int]
                   ) -> tuple[tuple[str, int], ...]:
  """Output positions per example of each conv layer, and of each dense
  layer applied per token (`cost.conv_positions`), of `model` fed
  `input_shape` examples; () for a model of plain dense layers."""
  return tuple(cost.conv_positions(input_shape, model.layers,
                                   model.init_params).items())


# The figures of `TimeModel.tier_costs`, in summary.json's order.
TIER_COSTS = ("train_flops_per_step", "train_memory_bytes",
              "client_bytes_down", "client_bytes_up", "round_seconds")


def tier_costs_numpy(costs: dict[str, jax.Array]) -> dict[str, np.ndarray]:
  """`TimeModel.tier_cost_arrays`'s figures as numpy, in TIER_COSTS order
  (a jitted call returns a dict's keys sorted)."""
  return {key: np.asarray(costs[key]) for key in TIER_COSTS}


def _nearest(fraction: jax.Array, widths: jax.Array) -> jax.Array:
  """`[len(fraction)]` the index of the width in `widths` nearest each."""
  return jnp.argmin(jnp.abs(fraction[:, None] - widths[None, :]), axis=1)


def online(arrays: DeviceArrays, clock: jax.Array | float = 0.0) -> jax.Array:
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


@dataclasses.dataclass(frozen=True, eq=False)
class TimeModel:
  """A round's simulated seconds and a sub-model's memory and traffic.

  Costs are read from mask shapes only, so one table per round serves every
  client: a client's time is its device's speed scaled to its sub-model's
  FLOPs, plus its sub-model's bytes over its bandwidths.

  Attributes:
    model: the model definition (layer specs; `init_params` for shapes).
    policy: the migration policy, whose masks define each width's sub-model.
    tier_fractions: width fraction of each tier, `[tiers]`.
    local_steps: the fixed number of local steps.
    batch_size: examples per local step.
    round_deadline: simulated seconds a round may last, 0 for none.
    deadline_mode: "partial" (late devices do fewer local steps) or "drop".
    conv_positions: output positions per example of each conv layer (FLOPs).
    optimizer_slots: client optimiser state values per trained weight (1
      with momentum, else 0), for the memory estimate.
    frozen: the params no client trains (`Simulation.frozen`): neither
      uploaded nor given gradients.
  """
  model: ModelDef
  policy: policies.Policy
  tier_fractions: tuple[float, ...]
  local_steps: int
  batch_size: int = 10
  round_deadline: float = 0.0
  deadline_mode: str = "partial"
  conv_positions: tuple[tuple[str, int], ...] = ()
  optimizer_slots: int = 0
  frozen: tuple[str, ...] = ()

  def _masks(self, width: jax.Array):
    """`(present, train)` of a width's sub-model; its shapes are what count."""
    present, train = self.policy.masks(self.model, width,
                                       self.model.init_params, jnp.int32(0),
                                       jax.random.key(0))
    return present, without_frozen(train, self.frozen)

  @property
  def full_flops(self) -> jax.Array:
    """Forward FLOPs per example of the full model."""
    return cost.forward_flops(self.model.layers, self.model.init_params, None,
                              dict(self.conv_positions))

  def sub_model_costs(self, fraction: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(flops share, bytes down, bytes up)` of width-`fraction` sub-models.

    Every policy's sub-model at a width has the size of the first-k one (a
    FjORD client is charged for its largest width), so the costs are those
    of the nearest of the tier widths and full width, computed once per
    round from mask shapes, not per client.
    """
    widths = jnp.asarray((*self.tier_fractions, 1.0), jnp.float32)
    params = self.model.init_params  # only shapes are read

    def costs(width):
      present, train = self._masks(width)
      held = jax.tree.map(lambda m: m != 0, present)
      return (cost.flops_fraction(self.model.layers, params, held,
                                  dict(self.conv_positions)),
              *self.policy.traffic(present, train))

    table = jax.vmap(costs)(widths)
    nearest = _nearest(fraction, widths)
    return tuple(column[nearest] for column in table)

  def schedule(self, arrays: DeviceArrays, ids: jax.Array,
               fraction: jax.Array, valid: jax.Array, keep: int | None = None
               ) -> cost.DeadlineOutcome:
    """Each slot's local steps, participation and finish time.

    Args:
      arrays: the per-device arrays (speeds, bandwidths).
      ids: `[slots]` device ids.
      fraction: `[slots]` width each slot trains.
      valid: `[slots]` bool, slots holding an online device.
      keep: with over-commitment, how many uploads the server waits for: only
        the first `keep` to finish participate (the others get 0 steps);
        None: every slot that meets the deadline.
    """
    outcome = self.deadline_outcome(arrays, ids, fraction)
    if keep is None:
      return outcome
    # The server stops waiting once `keep` uploads are in; infinite finish
    # times (dropped) are never kept.
    kept = cost.first_to_finish(outcome.finish_seconds, keep, valid)
    return outcome._replace(participates=outcome.participates & kept,
                            steps=jnp.where(kept, outcome.steps, 0))

  def deadline_outcome(self, arrays: DeviceArrays, ids: jax.Array,
                       fraction: jax.Array) -> cost.DeadlineOutcome:
    """Each device's steps and finish time at `fraction`, under the round
    deadline: its speed scaled to the sub-model's FLOPs, plus its
    sub-model's bytes over its bandwidths (no over-commitment)."""
    flops_share, down_bytes, up_bytes = self.sub_model_costs(fraction)
    ms_per_sample = self.full_flops / (arrays.compute_gflops[ids] * 1e6)
    step_secs = cost.step_seconds(ms_per_sample, flops_share,
                                  batch_size=self.batch_size)
    comm_secs = cost.comm_seconds(down_bytes, up_bytes, arrays.down_kbps[ids],
                                  arrays.up_kbps[ids])
    deadline = self.round_deadline if self.round_deadline > 0 else jnp.inf
    return cost.apply_deadline(step_secs, comm_secs, deadline,
                               local_steps=self.local_steps,
                               mode=self.deadline_mode)

  def tier_costs(self, arrays: DeviceArrays, fraction: jax.Array,
                 trains: jax.Array) -> dict[str, np.ndarray]:
    """:meth:`tier_cost_arrays` as numpy, computed by one compiled program
    (op by op, its few hundred small ops each compiled on first use took
    seconds)."""
    return tier_costs_numpy(jax.jit(self.tier_cost_arrays)(arrays, fraction,
                                                           trains))

  def tier_cost_arrays(self, arrays: DeviceArrays, fraction: jax.Array,
                       trains: jax.Array) -> dict[str, jax.Array]:
    """What a device of each tier holds, runs and sends: `[tiers]` arrays.

    From the same masks and cost functions the rounds use, at the width
    each device trains (`Sampler.device_widths`: `fraction` `[devices]`,
    `trains` `[devices]` bool, False for devices that never train), the
    mean over each tier's training devices (NaN for a tier with none) of:
    `train_flops_per_step` (`cost.step_flops` of the sub-model a client
    trains), `train_memory_bytes` (:meth:`training_memory`),
    `client_bytes_down` / `client_bytes_up` (one client's traffic in a
    round, `Policy.traffic`) and `round_seconds`: a round's download,
    local steps and upload on the device (:meth:`deadline_outcome`;
    devices that miss the deadline are left out of this one).
    """
    widths = jnp.asarray((*self.tier_fractions, 1.0), jnp.float32)
    memory = self.training_memory(widths)[_nearest(fraction, widths)]
    share, down, up = self.sub_model_costs(fraction)
    tier = jnp.asarray(arrays.tier)
    finish = self.deadline_outcome(arrays, jnp.arange(tier.shape[0]),
                                   fraction).finish_seconds
    one_hot = jax.nn.one_hot(tier, len(self.tier_fractions))

    def tier_mean(values, counted):
      member = one_hot * counted[:, None]
      count = member.sum(0)
      total = member.T @ jnp.where(counted, values, 0.0)
      return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)

    flops = cost.step_flops(share * self.full_flops,
                            batch_size=self.batch_size)
    return {"train_flops_per_step": tier_mean(flops, trains),
            "train_memory_bytes": tier_mean(memory, trains),
            "client_bytes_down": tier_mean(down, trains),
            "client_bytes_up": tier_mean(up, trains),
            "round_seconds": tier_mean(finish, trains & jnp.isfinite(finish))}

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
      present, train = self._masks(width)
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

  def memory_report(self, arrays: DeviceArrays) -> dict[str, int]:
    """Counts of devices memory caps below their tier's width, or excludes."""
    if arrays.memory_bytes is None:
      return {"memory_capped": 0, "memory_excluded": 0}
    cap = np.asarray(jax.jit(self.memory_caps)(arrays))
    width = np.asarray(self.tier_fractions, np.float32)[np.asarray(
        arrays.tier)]
    return {"memory_capped": int(np.sum((cap > 0) & (cap < width))),
            "memory_excluded": int(np.sum(cap == 0))}
