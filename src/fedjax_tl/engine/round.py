"""The masked round's body, and the server end every round path shares.

:func:`masked_round` runs the cohort's clients at full size with 0/1 masks,
vmapped in chunks (engine.clients); the tier fast path (tiered.py) runs them
at their sub-models' shapes instead. Both hand their uploads to
:func:`screen_chunk` and their sums to :func:`finish_round` (DP's release,
the server step, accounting); the per-client reference loop
(engine.reference) uses the same :func:`privatize`, :func:`server_step` and
:func:`prune_widths`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_tl import aggregators, faults, privacy, sharding
from fedjax_tl.engine import accounting
from fedjax_tl.engine.clients import run_client, slot_widths
from fedjax_tl.engine.state import (PRIVACY_SALT, UNITS_SALT, Cohort,
                                    DeviceArrays, RoundStats, ServerState,
                                    map_clients)
from fedjax_tl.models.base import Params

# The simulation (simulation.Simulation) is typed `Any`, so this module does
# not import the module that imports it.
Simulation = Any


def masked_round(sim: Simulation, state: ServerState, arrays: DeviceArrays
                 ) -> tuple[ServerState, RoundStats]:
  """The round of `sim` with every client at full size (trace under jit).

  The cohort plan's slots run `sim.chunk_size` at a time in a `lax.scan`;
  each chunk's uploads are screened and added to the weighted sums (or,
  for a stacked aggregator, kept and combined after the scan).
  """
  r = state.round
  plan = sim.cohort(arrays, r, state.width_cap, state.totals["sim_seconds"])
  chunks = jax.tree.map(  # the per-slot fields
      lambda a: a.reshape(-1, sim.chunk_size, *a.shape[1:]),
      plan._replace(overflow=None))
  slots = jnp.arange(sim.num_slots).reshape(-1, sim.chunk_size)
  widths = slot_widths(plan)
  run = map_clients(functools.partial(run_client, sim),
                    in_axes=(None, None, None, 0, 0, 0, 0, None))

  def body(carry, xs: tuple[Cohort, jax.Array]):
    num, den, loss_sum = carry
    # Each device runs chunk_size / mesh size of the chunk's clients; the
    # weighted sums below then all-reduce over the mesh.
    chunk = sharding.constrain_clients(xs[0], sim.mesh)
    deltas, train, stats, traffic = run(
        arrays, state.params, r, chunk.ids, chunk.fraction, chunk.num_steps,
        xs[1], widths)
    deltas, train, weight, excluded, unclipped = screen_chunk(
        sim, deltas, train, chunk.weight, state.privacy["clip_norm"])
    stacked = None
    if sim.aggregator.stacked:  # kept for the statistic after the scan
      stacked = (deltas, train, weight)
    else:
      num, den = aggregators.add_weighted(
          num, den, deltas, train, weight,
          deltas_masked=not sim.policy.weighted_upload)
    loss_sum = loss_sum + accounting.loss_sum(stats.loss, weight)
    return (num, den, loss_sum), (traffic, stats.width, excluded, unclipped,
                                  stacked)

  num, den = aggregators.zeros_like_sums(state.params)
  (num, den, loss_sum), (traffic, widths, excluded, unclipped,
                         stacked) = jax.lax.scan(
      body, (num, den, jnp.zeros((), jnp.float32)), (chunks, slots))
  flat = lambda a: a.reshape(-1)
  if traffic is None:
    # A mask policy's client moves its width's sub-model: one table per
    # round (as the time model reads it), not a count per client.
    traffic = sim.sub_model_costs(plan.fraction)[1:]
  if sim.aggregator.stacked:
    num, den = sim.aggregator.combine(*jax.tree.map(
        lambda a: a.reshape(-1, *a.shape[2:]), stacked))
  new_state, stats = finish_round(sim, state, arrays, plan, num, den,
                                  loss_sum, jax.tree.map(flat, traffic),
                                  flat(excluded), flat(unclipped))
  if sim.policy.prunes_widths:  # an excluded client's width is not trusted
    new_state = prune_widths(
        new_state, plan, jnp.where(flat(excluded), 1.0, flat(widths)))
  return new_state, stats


def screen_chunk(sim: Simulation, deltas: Params, masks: Params | None,
                 weights: jax.Array, clip_norm: jax.Array | None = None
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
  checked = masks if sim.policy.weighted_upload else None
  deltas, checked, weights, excluded = faults.screen(deltas, weights,
                                                     checked)
  masks = masks if checked is None else checked
  unclipped = jnp.zeros(weights.shape, bool)
  if sim.privacy is not None:
    deltas, within = aggregators.clip_by_norm(deltas, clip_norm)
    unclipped = within & (weights > 0)
  return (sim.aggregator.prepare(deltas), masks, weights, excluded,
          unclipped)


def finish_round(sim: Simulation, state: ServerState, arrays: DeviceArrays,
                 plan: Cohort, num: Params, den: Params, loss_sum: jax.Array,
                 traffic: tuple[jax.Array, jax.Array],
                 excluded: jax.Array | None = None,
                 unclipped: jax.Array | None = None
                 ) -> tuple[ServerState, RoundStats]:
  """The server step, accounting and stats that end every round path.

  Args:
    sim: the simulation.
    state: the state the round started from.
    arrays: the per-device arrays.
    plan: the round's cohort plan.
    num, den: the weighted sums of the cohort's deltas and masks. With
      DP's expected denominator (the default) the noised `num` is divided
      by the expected holders (:func:`expected_holders`) instead of `den`,
      which then only feeds the round's stats.
    loss_sum: the weighted sum of the clients' training losses.
    traffic: `[slots]` bytes down and up of each slot's sub-model.
    excluded: `[slots]` bool, aggregated slots whose update was not finite
      (:func:`screen_chunk`); None: none.
    unclipped: `[slots]` bool, aggregated slots whose update was within
      the DP clip norm (:func:`screen_chunk`); None: none.
  """
  if excluded is None:
    excluded = jnp.zeros(plan.ids.shape, bool)
  divisor, expected = den, None
  if sim.privacy is not None and sim.privacy.expected_denominator:
    divisor, expected = expected_holders(sim, state, arrays)
  num, private = privatize(sim, state, plan, num, excluded, unclipped,
                           expected)
  # The round lasts until the last aggregated upload (or the deadline).
  seconds = sim.time_model.round_seconds(arrays, plan,
                                         state.totals["sim_seconds"])
  totals = accounting.tally(state.totals, arrays.tier[plan.ids],
                            len(sim.tier_fractions), plan, traffic,
                            excluded, seconds)
  new_state = server_step(sim, state, num, divisor)._replace(
      totals=totals, privacy=private)
  return new_state, accounting.round_stats(plan, den, loss_sum, excluded)


def privatize(sim: Simulation, state: ServerState, plan: Cohort, num: Params,
              excluded: jax.Array, unclipped: jax.Array | None,
              expected: jax.Array | None = None) -> tuple[Params, dict]:
  """DP-FedAvg's release (privacy.privatize), noised from the round's key
  so that every round path adds the same noise; `expected`: the round's
  expected number of participants (:func:`expected_holders`)."""
  return privacy.privatize(
      sim.privacy, state.privacy, num, plan.weight, plan.overflow,
      excluded, unclipped,
      jax.random.fold_in(sim.round_key(state.round), PRIVACY_SALT), expected)


def expected_holders(sim: Simulation, state: ServerState,
                     arrays: DeviceArrays) -> tuple[Params, jax.Array]:
  """DP-FedAvg's fixed denominator: `(each entry's expected number of
  aggregated clients holding it, the expected number of aggregated
  clients)` this round, `sum_d P(d aggregated) x train_d`.

  `P(d aggregated)` is q x its chance of being online and eligible, if its
  width meets the deadline (engine.cohort.Sampler.inclusion); `train_d` is
  the mask device d trains with this round if drawn (`Simulation.masks`,
  from its own client key), so the sum reads no device's data and not
  who was drawn. A cohort rule's mask (`Policy.slotted`: FedEcover's)
  depends on who was drawn before the device; it is taken here with no
  slot, as a cohort of one (every unit's chance of being held is the same
  ceil(pC)/C in any slot, so the expectation is that of the round). Under
  the label rule (engine.clients.label_rule) a client's output-layer mask
  also depends on the labels it holds, which are its data: the denominator
  counts every holder of the layer.
  First-k policies' masks depend on the width alone and are summed per
  width; other policies' per device, `sim.chunk_size` devices at a time.
  """
  r, params = state.round, state.params
  chance, fraction = sim.sampler.inclusion(
      arrays, sim.seed, r, state.width_cap, state.totals["sim_seconds"])
  if sim.policy.fixed_widths is not None:
    # Every width a device may train: its tier's, or a memory cap's.
    levels = jnp.asarray(sim.time_model.width_levels, jnp.float32)
    nearest = jnp.argmin(jnp.abs(fraction[:, None] - levels[None]), axis=1)
    per_level = jax.ops.segment_sum(chance, nearest, len(levels))
    _, masks = jax.vmap(lambda w: sim.masks(w, params, r, jax.random.key(0))
                        )(levels)
    den = jax.tree.map(lambda m: jnp.tensordot(per_level, m, axes=1), masks)
    return den, chance.sum()
  size = sim.chunk_size
  pad = -chance.shape[0] % size
  ids = jnp.arange(chance.shape[0] + pad).reshape(-1, size)
  chunks = (jnp.pad(chance, (0, pad)).reshape(-1, size),
            jnp.pad(fraction, (0, pad)).reshape(-1, size), ids)

  def train_mask(width, device_id):
    key = jax.random.fold_in(sim.client_key(r, device_id), UNITS_SALT)
    return sim.masks(width, params, r, key)[1]

  def body(den, chunk):
    p, width, device_ids = chunk
    masks = jax.vmap(train_mask)(width, device_ids)
    return jax.tree.map(lambda d, m: d + jnp.tensordot(p, m, axes=1), den,
                        masks), None

  den, _ = jax.lax.scan(body, aggregators.zeros_like_sums(params)[0], chunks)
  return den, chance.sum()


def server_step(sim: Simulation, state: ServerState, num: Params,
                den: Params) -> ServerState:
  """Applies the server optimiser to the masked mean delta.

  The policy's `server_scale` (FedEcover's step-size decay) scales the
  update, and its `refactor` (FlexLoRA's) turns the step into params, else
  it is added to them. A round that aggregated nobody (every client
  excluded, or none online) skips the step: params and optimiser state stay
  as they were.
  """
  mean, held = aggregators.masked_mean(num, den)
  grads = jax.tree.map(jnp.negative, mean)
  updates, opt_state = sim.server_tx.update(grads, state.opt_state,
                                            state.params)
  if sim.policy.server_scale is not None:
    factor = sim.policy.server_scale(state.round)
    updates = jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)
  # A parameter held by no client this round keeps its value.
  updates = jax.tree.map(lambda u, h: jnp.where(h, u, 0), updates, held)
  step = jnp.stack([jnp.any(h) for h in jax.tree.leaves(held)]).any()
  keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(step, n, o), new, old)
  apply = sim.policy.refactor or optax.apply_updates
  return state._replace(
      params=keep(apply(state.params, updates), state.params),
      opt_state=keep(opt_state, state.opt_state), round=state.round + 1)


def prune_widths(state: ServerState, plan: Cohort, widths: jax.Array
                 ) -> ServerState:
  """Lowers the width cap of aggregated clients that pruned their rank."""
  kept = jnp.where(plan.weight > 0, widths, 1.0)
  return state._replace(width_cap=state.width_cap.at[plan.ids].min(kept))
