"""FedEcover: its units against the authors' pool rule, its round against
the per-client loop, and its global step-size decay by hand."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_tl.errors import ConfigError
from fedjax_tl.policies import capacity
from fedjax_tl.policies.fedecover import step_decay


def _kept(width, size):
  return max(1, math.ceil(width * size - 1e-4))


def _authors_draw(rng, widths, size):
  """The authors' `random_choose_indices` (FedEcover modules/servers/
  fedecover.py, lines 92-129) for one round's clients, pool starting full:
  each client's sorted units."""
  pool, drawn = np.arange(size), []
  for width in widths:
    k = _kept(width, size)
    if k > pool.size:
      held = pool.copy()
      extra = rng.choice(np.setdiff1d(np.arange(size), held), k - held.size,
                         replace=False)
      pool = np.setdiff1d(np.arange(size), extra)
      drawn.append(np.sort(np.concatenate([held, extra])))
    else:
      held = np.sort(rng.choice(pool, k, replace=False))
      pool = np.setdiff1d(pool, held)
      drawn.append(held)
  return drawn


def _replays(units, widths, size):
  """Whether the clients' 0/1 unit vectors are a draw the authors' pool rule
  can make: each holds ceil(p C) units, from the pool while it lasts; a
  client that empties it holds all it had and refills it with every unit
  but the others it drew."""
  pool = set(range(size))
  for held, width in zip(units, widths):
    held = set(np.flatnonzero(held))
    if len(held) != _kept(width, size):
      return False
    if len(held) <= len(pool):
      if not held <= pool:
        return False
      pool -= held
    else:
      if not pool <= held:
        return False
      pool = set(range(size)) - (held - pool)
  return True


def _cohort(widths, key, groups):
  """Every slot's units, as `{group: [slots, C]}`."""
  widths = jnp.asarray(widths, jnp.float32)
  rows = [capacity.covering_units(widths[i], widths, jnp.int32(i), key, groups)
          for i in range(widths.shape[0])]
  return {g: np.stack([np.asarray(r[g]) for r in rows]) for g in groups}


@pytest.mark.parametrize("widths", [
    (0.5, 0.75, 0.5, 0.25, 1.0, 0.125),
    (0.25, 0.25, 0.25, 0.25, 0.25),
    (1.0, 0.3, 0.9, 0.6, 0.6, 0.2, 0.7)])
def test_units_follow_the_authors_pool(widths):
  groups = {"a": 8, "b": 5, "c": 16}
  for seed in range(4):
    units = _cohort(widths, jax.random.key(seed), groups)
    for name, size in groups.items():
      assert _replays(units[name], widths, size), (seed, name)


def test_every_unit_is_held_equally_often_over_whole_cycles():
  # k = 2, 4, 2, 8, 6, 2: 24 units of C = 8, three whole cycles.
  widths = (0.25, 0.5, 0.25, 1.0, 0.75, 0.25)
  units = _cohort(widths, jax.random.key(3), {"g": 8})["g"]
  np.testing.assert_array_equal(units.sum(0), np.full(8, 3.0))
  # Within the first cycle (slots 0-2) the units are disjoint.
  assert units[:3].sum(0).max() == 1


def test_a_slot_of_width_zero_takes_no_units_from_the_others():
  widths = jnp.asarray([0.5, 0.0, 0.5], jnp.float32)
  key = jax.random.key(0)
  first, last = (capacity.covering_units(widths[i], widths, jnp.int32(i),
                                         key, {"g": 8})["g"] for i in (0, 2))
  np.testing.assert_array_equal(np.asarray(first) + np.asarray(last),
                                np.ones(8))


def test_the_draws_are_distributed_as_the_authors():
  """C = 4, k = 2, 3, 2: slot 1 empties the pool and draws one of slot 0's
  units; slot 2 draws 2 of the 3 left. Frequencies of each slot's units and
  of slot 2's overlap with slot 1 (2 units with chance 1/3) against the
  authors' numpy draw."""
  widths, size, n = (0.5, 0.75, 0.5), 4, 3000
  rng = np.random.default_rng(0)
  theirs = np.zeros((n, 3, size))
  for t in range(n):
    for i, held in enumerate(_authors_draw(rng, widths, size)):
      theirs[t, i, held] = 1
  w = jnp.asarray(widths, jnp.float32)

  def slots(key):
    return jnp.stack([capacity.covering_units(w[i], w, jnp.int32(i), key,
                                              {"g": size})["g"]
                      for i in range(3)])

  ours = np.asarray(jax.jit(jax.vmap(slots))(
      jax.random.split(jax.random.key(1), n)))
  for draws in (theirs, ours):
    overlap = (draws[:, 1] * draws[:, 2]).sum(1)
    assert abs((overlap == 2).mean() - 1 / 3) < 0.04
    assert abs((draws[:, 0] * draws[:, 1]).sum(1).mean() - 1) < 1e-9
  np.testing.assert_allclose(ours.mean(0), theirs.mean(0), atol=0.04)
  np.testing.assert_allclose(ours.mean(0), [[0.5] * 4, [0.75] * 4,
                                            [0.5] * 4], atol=0.04)


def test_step_decay_by_hand():
  scale = step_decay(0.5, 10, 30)
  for r, expected in [(0, 1.0), (9, 1.0), (10, 0.5), (29, 0.25),
                      (30, 0.125), (31, 0.125), (500, 0.125)]:
    assert float(scale(jnp.int32(r))) == expected, r


def test_server_step_is_decayed():
  from conftest import small_simulation
  from fedjax_tl.engine.round import server_step
  sim = small_simulation(policy="fedecover", gsd_gamma=0.5, gsd_every=2,
                         gsd_until=4)
  state = sim.init(sim.model.init_params)
  delta = jax.tree.map(lambda p: jnp.full_like(p, 0.1), state.params)
  ones = jax.tree.map(jnp.ones_like, state.params)
  for r, factor in [(1, 1.0), (2, 0.5), (5, 0.25), (9, 0.25)]:
    new = server_step(sim, state._replace(round=jnp.int32(r)), delta, ones)
    for a, b in zip(jax.tree.leaves(new.params),
                    jax.tree.leaves(state.params)):
      # fedavg at server_lr 1: params + factor x the mean delta.
      np.testing.assert_allclose(np.asarray(a), np.asarray(b) + 0.1 * factor,
                                 rtol=1e-6, atol=1e-7)


def test_the_round_equals_the_per_client_loop():
  from conftest import small_simulation
  from test_simulation import _assert_trees_close
  from fedjax_tl.engine.clients import run_client, slot_widths
  from fedjax_tl.simulation import reference_round
  sim = small_simulation(policy="fedecover", chunk_size=4)
  state = sim.init(sim.model.init_params)
  plan = sim.cohort(sim.arrays, state.round, state.width_cap)
  widths = slot_widths(plan)
  # The clients run_client trains hold the pool's draws in slot order
  # (hidden=(16, 8): dense_0's bias holds group 0's units).
  one = jax.jit(functools.partial(run_client, sim))
  held = [np.asarray(one(sim.arrays, state.params, state.round, plan.ids[i],
                         plan.fraction[i], plan.num_steps[i], jnp.int32(i),
                         widths)[1]["dense_0"]["bias"])
          for i in range(sim.num_slots) if plan.valid[i]]
  valid = [float(plan.fraction[i]) for i in range(sim.num_slots)
           if plan.valid[i]]
  assert len(valid) > 2 and _replays(held, valid, 16)
  for _ in range(2):
    expected = reference_round(sim, state)
    state, _ = sim.round(state)
    _assert_trees_close(state.params, expected.params)


def test_gsd_keys_need_fedecover():
  from conftest import tiny_config
  assert tiny_config(policy="fedecover", gsd_gamma=0.5).gsd_gamma == 0.5
  with pytest.raises(ConfigError, match="gsd_every"):
    tiny_config(policy="fedrolex", gsd_every=3)
