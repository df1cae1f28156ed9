"""The tier fast path: each tier's clients train at their sub-model's real shape.

For first-k width policies a width-p client holds the first ceil(p*C) units of
every width group, so it can run on sliced params instead of full-size ones
with 0/1 masks; the round runs each tier width as its own loop over only the
chunks it needs, then scatters the tiers' sums back into full-size sums.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import aggregators, sharding
from fedjax_tl.policies import capacity
from fedjax_tl.models import axes
from fedjax_tl.engine import accounting
from fedjax_tl.engine.clients import local_update
from fedjax_tl.engine.round import finish_round, screen_chunk
from fedjax_tl.engine.state import (UNITS_SALT, DeviceArrays, RoundStats,
                                    ServerState, map_clients)

# The round that dispatches here (simulation.Simulation) is typed `Any`, so
# this backend does not import the module that imports it.
Simulation = Any


def kept_counts(width: float, groups: Mapping[str, int]) -> dict[str, int]:
  """The number of units a width-`width` sub-model keeps in each group."""
  with jax.ensure_compile_time_eval():  # static shapes, also under jit
    return {name: int(capacity.kept_units(np.float32(width), size))
            for name, size in groups.items()}


def tier_widths(sim: Simulation) -> tuple[float, ...]:
  """The static widths a round's clients can train under `sim.policy`
  (`Policy.fixed_widths`; memory caps, `engine.timing.TimeModel.memory_caps`,
  may lower a width to another of the width levels)."""
  levels = (None if sim.arrays.memory_bytes is None else
            sim.time_model.width_levels)
  return sim.policy.fixed_widths(sim.tier_fractions, levels)


def chunk_sizes(chunk_size: int) -> tuple[int, ...]:
  """The chunk sizes a tier's clients run in: whole chunks, then a tail.

  A tier's client count varies by round, so its last chunk is partly
  padding; a smaller tail chunk bounds that waste to a quarter chunk per
  tier, at the price of compiling the client twice.
  """
  return (chunk_size,) if chunk_size < 8 else (chunk_size, chunk_size // 4)


def check_eligible(sim: Simulation) -> None:
  """Raises ValueError unless `sim.policy` is a first-k policy without a
  `reparam` or `changed_only` rule and the aggregator streams (a stacked
  one runs on the masked path)."""
  if sim.policy.fixed_widths is None:
    raise ValueError(f"tier_fast_path needs a first-k width policy, not "
                     f"{sim.policy.name!r}")
  if sim.policy.reparam is not None or sim.policy.changed_only:
    raise ValueError(f"tier_fast_path does not run a Policy.reparam or "
                     f"changed_only rule ({sim.policy.name!r})")
  if sim.aggregator.stacked:
    raise ValueError(f"tier_fast_path does not stack the cohort's deltas, "
                     f"which aggregator {sim.aggregator.name!r} needs")


def tiered_round(sim: Simulation, state: ServerState, arrays: DeviceArrays
                 ) -> tuple[ServerState, RoundStats]:
  """The round of `sim` with every tier at its real shape (trace under jit).

  The same cohort plan, client keys, batches and weights as the masked
  round, so it gives the same result; only the aggregated clients run, each
  tier's in chunks (see :func:`chunk_sizes`), so a round costs about the sum
  over tiers of (clients x sub-model cost).
  """
  # Over ~60 lines: one traced program whose closures (a tier's client, its
  # chunks, its sums) share the round's plan, keys and sums.
  check_eligible(sim)
  r, params, layers = state.round, state.params, sim.model.layers
  plan = sim.cohort(arrays, r, state.width_cap, state.totals["sim_seconds"])
  widths = tier_widths(sim)
  # Each slot's width is one of `widths` (first-k policies draw tier widths).
  group = jnp.argmin(jnp.abs(plan.fraction[:, None] -
                             jnp.asarray(widths, jnp.float32)[None]), axis=1)
  sizes = chunk_sizes(sim.chunk_size)

  def client(sub, present, train, units, device_id, num_steps):
    # As engine.clients.run_client, on the tier's sliced params and masks.
    delta, stats, malicious, upload = local_update(
        sim, arrays, sub, present, train, sim.client_key(r, device_id),
        device_id, num_steps, units=units)
    # `upload`: the client's own mask under the label rule (its output
    # layer's entries of the labels it holds), else None (`train`).
    return sim.attack.delta(delta, malicious), stats, upload

  run = map_clients(client, in_axes=(None, None, None, None, 0, 0))

  def tier_sums(g: int, width: float, flags: jax.Array):
    """This width's `(num, den, loss)` sums, and `flags[2, slots]` updated
    with its clients whose update was not finite (row 0) or was within the
    DP clip norm (row 1)."""
    kept = kept_counts(width, sim.model.groups)
    # First-k masks are the same for every client of a width (no key).
    present, train = sim.masks(jnp.float32(width), params, r,
                               jax.random.fold_in(jax.random.key(0),
                                                  UNITS_SALT))
    sub, present, train = (axes.first_k(t, layers, kept)
                           for t in (params, present, train))
    # With activation masks: the kept units' multipliers (the scaler's).
    units = sim.unit_scales(jnp.float32(width), r, jax.random.key(0))
    if units is not None:
      units = {g: u[:kept[g]] for g, u in units.items()}
    member = (group == g) & (plan.weight > 0)
    count = member.sum()
    # This tier's aggregated slots first, then padding enough for a chunk.
    order = jnp.pad(jnp.argsort(~member, stable=True), (0, max(sizes)))

    def add_chunks(size, num_chunks, first, carry):
      """Adds `num_chunks` chunks of `size` slots from position `first` on."""

      def body(c, carry):
        num, den, loss, flags = carry
        start = first + c * size
        slots = jax.lax.dynamic_slice(order, (start,), (size,))
        if size % sharding.mesh_size(sim.mesh) == 0:
          # Split the chunk's clients over the mesh (a tail chunk too small
          # to split runs replicated).
          slots = sharding.constrain_clients(slots, sim.mesh)
        weight = plan.weight[slots] * (start + jnp.arange(size) < count)
        deltas, stats, uploads = run(sub, present, train, units,
                                     plan.ids[slots], plan.num_steps[slots])
        deltas, _, weight, bad, unclipped = screen_chunk(
            sim, deltas, None, weight, state.privacy["clip_norm"])
        # Deltas are zero off their masks: `train`, shared by the chunk, or
        # each client's own under the label rule.
        num = jax.tree.map(lambda n, d: n + jnp.tensordot(weight, d, axes=1),
                           num, deltas)
        if uploads is None:
          den = jax.tree.map(lambda s, m: s + weight.sum() * m, den, train)
        else:
          den = jax.tree.map(
              lambda s, m: s + jnp.tensordot(weight, m, axes=1), den, uploads)
        return (num, den, loss + accounting.loss_sum(stats.loss, weight),
                flags.at[:, slots].max(jnp.stack([bad, unclipped])))

      return jax.lax.fori_loop(0, num_chunks, body, carry)

    carry = (*aggregators.zeros_like_sums(sub), jnp.zeros((), jnp.float32),
             flags)
    done = jnp.zeros((), jnp.int32)
    for i, size in enumerate(sizes):
      # Whole chunks of each size; the last size also takes the remainder.
      left = count - done
      num_chunks = left // size if i + 1 < len(sizes) else -(-left // size)
      carry = add_chunks(size, num_chunks, done, carry)
      done = done + num_chunks * size
    num, den, loss, flags = carry
    return (axes.pad_first_k(num, params, layers),
            axes.pad_first_k(den, params, layers),
            loss, flags)

  num, den = aggregators.zeros_like_sums(params)
  loss_sum = jnp.zeros((), jnp.float32)
  flags = jnp.zeros((2, *plan.ids.shape), bool)
  for g, width in enumerate(widths):
    num_g, den_g, loss_g, flags = tier_sums(g, width, flags)
    num = jax.tree.map(jnp.add, num, num_g)
    den = jax.tree.map(jnp.add, den, den_g)
    loss_sum = loss_sum + loss_g

  # A slot's traffic is its width's sub-model, whether or not it was
  # aggregated.
  _, down, up = sim.sub_model_costs(plan.fraction)
  return finish_round(sim, state, arrays, plan, num, den, loss_sum,
                      (down, up), *flags)
