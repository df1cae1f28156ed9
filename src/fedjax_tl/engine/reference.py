"""The round as a plain per-client loop: the independent reference that tests
and benchmarks hold the vectorized round (and the tier fast path) to.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.engine.clients import run_client, slot_widths
from fedjax_tl.engine.round import privatize, prune_widths, server_step
from fedjax_tl.engine.state import UNITS_SALT, ServerState, stack_runs

# The simulation (simulation.Simulation) is typed `Any`, so this module does
# not import the module that imports it.
Simulation = Any


def _jitted(sim: Simulation, fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn(sim, ...)` jitted once per simulation, so a test's second
  reference round traces and compiles nothing again. Kept in the
  simulation's `__dict__`, as `functools.cached_property` keeps its values
  (the frozen dataclass is not hashable, so no outside cache can key on
  it)."""
  cache = sim.__dict__.setdefault("_reference_jits", {})
  if fn not in cache:
    cache[fn] = jax.jit(functools.partial(fn, sim))
  return cache[fn]


def reference_round(sim: Simulation, state: ServerState) -> ServerState:
  """The same round as a plain per-client loop with numpy aggregation.

  The independent reference for the vectorized round (tests, benchmarks):
  one jitted client at a time, sums accumulated in float64 numpy. A client
  whose upload is not finite is skipped; "clip" and DP clip in numpy; a
  stacked aggregator gets the aggregated clients' uploads stacked (only
  theirs). DP's noise is the round's own draw (engine.round.privatize);
  its expected denominator is summed device by device
  (:func:`expected_holders`).
  """
  plan = _jitted(sim, _cohort)(sim.arrays, state.round, state.width_cap,
                             state.totals["sim_seconds"])
  one = _jitted(sim, run_client)
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
                                 plan.num_steps[i], jnp.int32(i),
                                 slot_widths(plan))
    delta, train = (jax.tree.map(np.asarray, t) for t in (delta, train))
    if not all(np.isfinite(a).all() for a in jax.tree.leaves((delta, train))):
      excluded[i] = True
      continue  # no part in the aggregate
    if stats.width is not None:
      widths[i] = float(stats.width)
    bound = (float(state.privacy["clip_norm"]) if sim.privacy is not None else
             sim.aggregator.clip_norm)
    if bound is not None:
      delta, unclipped[i] = _clip(delta, bound)
    uploads.append((delta, train, weight))
    num = jax.tree.map(lambda n, d, m: n + weight * d * m, num, delta, train)
    den = jax.tree.map(lambda s, m: s + weight * m, den, train)
  if sim.aggregator.stacked and uploads:
    num, den = sim.aggregator.combine(*stack_runs(
        [jax.tree.map(jnp.asarray, u) for u in uploads]))
  as32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  expected = None
  if sim.privacy is not None and sim.privacy.expected_denominator:
    den, expected = expected_holders(sim, state)
  num, private = _jitted(sim, privatize)(
      state, plan, as32(num), excluded, unclipped, expected)
  state = _jitted(sim, server_step)(
      state, num, as32(den))._replace(privacy=private)
  if sim.policy.prunes_widths:
    state = prune_widths(state, plan, jnp.asarray(widths))
  return state


def expected_holders(sim: Simulation, state: ServerState
                     ) -> tuple[Any, float]:
  """DP's fixed denominator as a loop over devices in float64:
  `(sum_d P(d aggregated) x train_d, sum_d P(d aggregated))`, each
  device's mask from its own client key (engine.round.expected_holders)."""
  chance, fraction = _jitted(sim, _inclusion)(
      sim.arrays, sim.seed, state.round, state.width_cap,
      state.totals["sim_seconds"])
  masks = _jitted(sim, _masks)
  den = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), state.params)
  for d in np.flatnonzero(np.asarray(chance) > 0):
    key = jax.random.fold_in(sim.client_key(state.round, d), UNITS_SALT)
    _, train = masks(fraction[d], state.params, state.round, key)
    p = float(chance[d])
    den = jax.tree.map(lambda s, m: s + p * np.asarray(m, np.float64), den,
                       train)
  return den, float(np.sum(np.asarray(chance, np.float64)))


def _clip(delta: Any, bound: float) -> tuple[Any, bool]:
  """`(delta scaled to an L2 norm of at most bound, whether it was within)`,
  the norm taken in float64."""
  norm = np.sqrt(sum(np.sum(np.square(d, dtype=np.float64))
                     for d in jax.tree.leaves(delta)))
  return (jax.tree.map(lambda d: d * min(1.0, bound / max(norm, 1e-30)),
                       delta), norm <= bound)


def _cohort(sim: Simulation, *args: Any) -> Any:
  return sim.cohort(*args)


def _inclusion(sim: Simulation, *args: Any) -> Any:
  return sim.sampler.inclusion(*args)


def _masks(sim: Simulation, *args: Any) -> Any:
  return sim.masks(*args)
