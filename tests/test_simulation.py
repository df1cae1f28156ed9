"""The vectorized, chunked round against a per-client Python loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_simulation
from fedjax_tl.devices import make_population, sample_cohort
from fedjax_tl.engine.state import map_clients
from fedjax_tl.simulation import reference_round

_simulation = small_simulation


def _assert_trees_close(a, b, atol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                               atol=atol)


@pytest.mark.parametrize("chunk_size,algorithm,policy", [
    (3, "fedavg", {}),
    (10, "fedavg", {}),
    (3, "fedadam", {}),
    (10, "fedadam", {}),
    (4, "fedavg", dict(policy="heterofl", scaler=True, masked_ce=True)),
    (4, "fedavg", dict(policy="heterofl", heterofl_mode="dynamic")),
    (4, "fedavg", dict(policy="fedrolex")),
    (4, "fedavg", dict(policy="fed_dropout")),
    (4, "fedavg", dict(policy="uniform_full_only")),
    (4, "fedadam", dict(policy="partial_finetune")),
    (4, "fedavg", dict(policy="fjord")),
])
def test_vectorized_round_equals_per_client_loop(chunk_size, algorithm, policy):
  sim = _simulation(chunk_size, algorithm, **policy)
  state = sim.init(sim.model.init_params)
  for _ in range(2):  # the second round starts from a trained model
    expected = reference_round(sim, state)
    state, stats = sim.round(state)
    _assert_trees_close(state.params, expected.params)
    assert int(state.round) == int(expected.round)
  assert int(stats.participants) > 0


def test_results_do_not_depend_on_chunk_size():
  states = []
  for chunk_size in (1, 4, 10):
    sim = _simulation(chunk_size)
    state = sim.init(sim.model.init_params)
    for _ in range(2):
      state, _ = sim.round(state)
    states.append(state.params)
  _assert_trees_close(states[0], states[1])
  _assert_trees_close(states[0], states[2])


def test_map_clients_is_vmap_also_for_a_chunk_of_one():
  def fn(shared, x, pair):
    return {"sum": shared * x.sum(), "pair": (pair[0] + x, pair[1] * 2)}

  in_axes = (None, 0, 0)
  for size in (1, 3):
    x = np.arange(size * 4, dtype=np.float32).reshape(size, 4)
    pair = (np.ones((size, 4), np.float32), np.arange(size, dtype=np.int32))
    got = map_clients(fn, in_axes)(np.float32(2), x, pair)
    expected = {"sum": 2 * x.sum(axis=1),
                "pair": (pair[0] + x, pair[1] * 2)}
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      assert g.shape == e.shape
      np.testing.assert_array_equal(np.asarray(g), e)


def test_no_recompilation_after_the_first_round():
  sim = _simulation(5)
  state = sim.init(sim.model.init_params)
  for _ in range(4):
    state, _ = sim.round(state)
  assert sim._round_jit._cache_size() == 1


def test_parameters_no_client_holds_keep_their_value():
  # Only the smallest tier online: units beyond its width are held by nobody.
  sim = _simulation(5, algorithm="fedadam")
  tier = np.asarray(sim.arrays.tier)
  availability = np.where(tier == 2, 1.0, 0.0).astype(np.float32)
  sim = dataclasses.replace(sim, arrays=sim.arrays._replace(
      availability=jnp.asarray(availability)))
  state = sim.init(sim.model.init_params)
  new, stats = sim.round(state)
  k0 = int(np.ceil(0.25 * 16))
  before = np.asarray(state.params["dense_0"]["kernel"])
  after = np.asarray(new.params["dense_0"]["kernel"])
  np.testing.assert_array_equal(after[:, k0:], before[:, k0:])
  assert np.any(after[:, :k0] != before[:, :k0])
  assert float(stats.held_fraction) < 1


def test_cohort_prefers_online_devices_and_pads_with_zero_weight():
  availability = jnp.asarray([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
  ids, valid = sample_cohort(jax.random.key(0), availability, 5)
  ids, valid = np.asarray(ids), np.asarray(valid)
  assert len(set(ids.tolist())) == 5
  assert sorted(ids[valid].tolist()) == [0, 2, 5]
  assert not np.any(np.isin(ids[~valid], [0, 2, 5]))
  sim = _simulation(4, cohort=10, availability=0.05)
  plan = sim.cohort(sim.arrays, jnp.int32(3))
  assert plan.ids.shape == (12,)  # 10 slots padded to a multiple of 4
  weight, valid = np.asarray(plan.weight), np.asarray(plan.valid)
  assert np.all(weight[~valid] == 0)
  assert np.all(weight[valid] == np.asarray(sim.arrays.count)[
      np.asarray(plan.ids)[valid]])


def test_population_tiers_follow_proportions():
  population = make_population(1000, (1, 0.5, 0.25, 0.125), (0.1, 0.2, 0.3, 0.4),
                               min_availability=0.3, seed=0)
  np.testing.assert_array_equal(population.tier_counts(), [100, 200, 300, 400])
  assert population.availability.min() >= 0.3


@pytest.mark.parametrize("policy", ["heterofl", "fed_dropout", "fedrolex",
                                    "partial_finetune"])
def test_traffic_accounting_counts_each_tiers_sub_model_by_hand(policy):
  sim = _simulation(4, cohort=10, policy=policy)
  state = sim.init(sim.model.init_params)
  plan = sim.cohort(sim.arrays, state.round)
  new, _ = sim.round(state)
  tiers = np.asarray(sim.arrays.tier)[np.asarray(plan.ids)]
  valid = np.asarray(plan.valid)

  def held(p):  # the width-p MLP (64-16-8-10): ceil(p*C) units per group
    k0, k1 = int(np.ceil(p * 16)), int(np.ceil(p * 8))
    return 64 * k0 + k0 + k0 * k1 + k1 + k1 * 10 + 10

  for t, p in enumerate(sim.tier_fractions):
    down = up = held(p)
    if policy == "partial_finetune":  # all held, the top ceil(3p) trained
      layer_sizes = [64 * 16 + 16, 16 * 8 + 8, 8 * 10 + 10]
      down, up = held(1.0), sum(layer_sizes[3 - int(np.ceil(3 * p)):])
    clients = int(np.sum(valid & (tiers == t)))
    assert float(new.totals["updates"][t]) == clients
    assert float(new.totals["bytes_up"][t]) == 4 * up * clients
    assert float(new.totals["bytes_down"][t]) == 4 * down * clients


@pytest.mark.parametrize("mode", ["drop", "partial"])
def test_simulated_time_and_deadline_by_hand(mode):
  from fedjax_tl.device_catalog import CATALOGUE
  classes = [CATALOGUE[n] for n in ("flagship_phone", "midrange_phone",
                                    "lowend_phone")]  # tiers 1, 1/2, 1/4
  free = _simulation(4, cohort=10, batch_size=4)
  plan = free.cohort(free.arrays, jnp.int32(0))
  ids, valid = np.asarray(plan.ids), np.asarray(plan.valid)
  tiers = np.asarray(free.arrays.tier)[ids]
  full_flops = 2 * (64 * 16 + 16 * 8 + 8 * 10)
  step, comm = np.zeros(len(ids)), np.zeros(len(ids))
  for i, t in enumerate(tiers):
    p, c = free.tier_fractions[t], classes[t]
    k0, k1 = int(np.ceil(p * 16)), int(np.ceil(p * 8))
    share = 2 * (64 * k0 + k0 * k1 + k1 * 10) / full_flops
    ms = full_flops / (c.compute_gflops * 1e9) * 1e3
    step[i] = 3 * 4 * ms * share / 1000
    held_bytes = 4 * (64 * k0 + k0 + k0 * k1 + k1 + k1 * 10 + 10)
    comm[i] = held_bytes * 8 / 1000 / (c.down_mbps * 1000) + (
        held_bytes * 8 / 1000 / (c.up_mbps * 1000))
  np.testing.assert_allclose(np.asarray(plan.finish), comm + 3 * step,
                             rtol=1e-5)
  assert np.all(np.asarray(plan.num_steps) == 3)

  # A deadline between two tiers' finish times (every device of a tier has
  # its class's figures here, so ties sit exactly on tier boundaries).
  finishes = np.unique((comm + 3 * step)[valid])
  deadline = float(finishes[:2].mean())
  sim = _simulation(4, cohort=10, batch_size=4, round_deadline=deadline,
                    deadline_mode=mode)
  plan = sim.cohort(sim.arrays, jnp.int32(0))
  if mode == "drop":
    expected_steps = np.where(comm + 3 * step <= deadline, 3, 0)
  else:
    expected_steps = np.clip(np.floor((deadline - comm) / step), 0, 3)
  np.testing.assert_array_equal(np.asarray(plan.num_steps), expected_steps)
  weight = np.asarray(plan.weight)
  assert np.all(weight[expected_steps == 0] == 0)
  assert np.any(expected_steps[valid] == 0) and np.any(expected_steps[valid] > 0)
  # The round still equals the per-client loop, stragglers and all.
  state = sim.init(sim.model.init_params)
  new, _ = sim.round(state)
  _assert_trees_close(new.params, reference_round(sim, state).params)
  late = valid & (expected_steps == 0)
  assert float(new.totals["dropped"].sum()) == late.sum()
  np.testing.assert_allclose(float(new.totals["sim_seconds"]), np.max(
      np.where(weight > 0, np.where(expected_steps > 0, comm + expected_steps
                                    * step, 0), 0)), rtol=1e-5)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_activation_masks_round_equals_the_param_mask_loop(model):
  # Width masks on activations (the default) against the per-client loop
  # masking the params at every local step, with HeteroFL's scaler and
  # masked cross-entropy on (the mlp round is the one compiled above).
  sim = _simulation(4, model=model, policy="heterofl", scaler=True,
                    masked_ce=True)
  assert sim.activation_masks
  state = sim.init(sim.model.init_params)
  expected = reference_round(
      dataclasses.replace(sim, activation_masks=False), state)
  state, stats = sim.round(state)
  _assert_trees_close(state.params, expected.params)
  assert int(stats.participants) > 0
