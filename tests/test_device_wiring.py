"""Device options in experiments: traces, availability, memory, overcommit.

Each is checked against a hand computation (intervals, closed-form seconds,
memory by parameter count, a numpy argsort) and the per-client loop.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_federated, tiny_config, tiny_config_dict
from fedjax_tl import cli
from fedjax_tl import config as config_lib
from fedjax_tl.algorithms import server_optimizer
from fedjax_tl.client import client_optimizer, make_client_update
from fedjax_tl.errors import ConfigError, DataError
from fedjax_tl.models import build_model
from fedjax_tl.runner import device_population, experiment_policy
from fedjax_tl.simulation import Simulation, reference_round

SHAPE = (8, 8, 1)  # 64 inputs; the MLP is 64-16-8-10
FULL_FLOPS = 2 * (64 * 16 + 16 * 8 + 8 * 10)
BEHAVE = {  # client id -> online intervals; periods 100 s and 40 s
    0: {"active": [10, 50], "inactive": [20, 70], "finish_time": 100},
    1: {"active": [0], "inactive": [5], "finish_time": 40},
    2: {"active": [15], "inactive": [60], "finish_time": 100},
    3: {"active": [], "inactive": [], "finish_time": 100},
}


def _write(path, obj):
  path.write_text(json.dumps(obj))
  return str(path)


def _capacity(num):
  """Distinct speeds and bandwidths, so no two devices finish together."""
  return {i: {"computation": 5.0 + 3.7 * i, "communication": 900.0 + 61 * i}
          for i in range(num)}


def _build(cfg, memory_mb=None):
  """A simulation of `cfg` on random data, its population from the runner."""
  model = build_model("mlp", SHAPE, 10, seed=0, hidden=(16, 8))
  population = device_population(cfg, model, SHAPE)
  if memory_mb is not None:
    population = dataclasses.replace(population, profiles=dataclasses.replace(
        population.profiles, memory_mb=np.asarray(memory_mb, np.float32)))
  update = make_client_update(
      model.apply, client_optimizer(0.2, cfg.client_momentum),
      local_steps=cfg.local_steps, batch_size=cfg.batch_size, mu=0.0)
  return Simulation.create(
      model, update, server_optimizer("fedavg", 1.0),
      random_federated(num_clients=cfg.num_clients, shape=SHAPE), population,
      cohort_size=cfg.clients_per_round, chunk_size=cfg.chunk_size,
      local_steps=cfg.local_steps, seed=cfg.seed,
      policy=experiment_policy(cfg),
      batch_size=cfg.batch_size, round_deadline=cfg.round_deadline,
      deadline_mode=cfg.deadline_mode, overcommit=cfg.overcommit,
      optimizer_slots=int(cfg.client_momentum > 0))


def _online_by_hand(num_devices, t):
  keys = sorted(BEHAVE)
  online = []
  for d in range(num_devices):
    entry = BEHAVE[keys[d % len(keys)]]
    norm = math.fmod(t, entry["finish_time"])
    online.append(any(a <= norm <= b for a, b in zip(entry["active"],
                                                     entry["inactive"])))
  return np.asarray(online)


def _sub_model(p):
  """`(kept units per hidden layer, params held)` of the width-p MLP."""
  k0, k1 = math.ceil(16 * p), math.ceil(8 * p)
  return (k0, k1), 64 * k0 + k0 + k0 * k1 + k1 + k1 * 10 + 10


def _finish_by_hand(sim, ids, fractions, capacity):
  """Upload end times of a trace-driven cohort, no deadline (closed form)."""
  keys = sorted(capacity)
  out = []
  for d, p in zip(ids, fractions):
    (k0, k1), held = _sub_model(p)
    entry = capacity[keys[d % len(keys)]]
    share = 2 * (64 * k0 + k0 * k1 + k1 * 10) / FULL_FLOPS
    step = 3 * sim.batch_size * entry["computation"] * share / 1000
    comm = 2 * 4 * held * 8 / 1000 / entry["communication"]
    out.append(comm + sim.local_steps * step)
  return np.asarray(out)


def _assert_trees_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                               atol=2e-6)


def _at_clock(sim, t):
  state = sim.init(sim.model.init_params)
  totals = dict(state.totals, sim_seconds=jnp.float32(t))
  return state._replace(totals=totals)


# -- behaviour trace: availability at the simulated clock --

def test_behave_trace_availability_by_hand(tmp_path):
  # 20 slots: at most 15 of the 60 devices are online at these times but 30
  # at t = 55, so both the exact online set and a full cohort are checked.
  cfg = tiny_config(behave_trace=_write(tmp_path / "behave.json", BEHAVE),
                    clients_per_round=20)
  assert cfg.availability == "trace"  # implied by behave_trace
  sim = _build(cfg)
  cohort = jax.jit(sim.cohort)
  for t in (0.0, 12.0, 55.0, 137.0, 95.0):
    online = _online_by_hand(cfg.num_clients, t)
    plan = cohort(sim.arrays, jnp.int32(1), None, jnp.float32(t))
    ids, valid = np.asarray(plan.ids), np.asarray(plan.valid)
    assert np.all(online[ids[valid]])
    assert valid.sum() == min(online.sum(), cfg.clients_per_round)
    if online.sum() <= cfg.clients_per_round:
      assert set(ids[valid].tolist()) == set(np.flatnonzero(online).tolist())
    # The round reads its clock from the state's cumulative sim_seconds.
    _, stats = sim.round(_at_clock(sim, t))
    assert int(stats.participants) == valid.sum()


def test_clock_advances_with_simulated_time_and_past_idle_rounds(tmp_path):
  cfg = tiny_config(behave_trace=_write(tmp_path / "behave.json", BEHAVE))
  sim = _build(cfg)
  # At t = 75 nobody is online; the soonest start is trace 1's next period
  # (75 mod 40 = 35, restarting at 40), 5 s later.
  t = 75.0
  assert not _online_by_hand(cfg.num_clients, t).any()
  state, stats = sim.round(_at_clock(sim, t))
  assert int(stats.participants) == 0
  np.testing.assert_allclose(float(state.totals["sim_seconds"]), 80.0)
  # The next round starts at 80, where device-1 traces are online.
  state, stats = sim.round(state)
  assert int(stats.participants) == min(
      _online_by_hand(cfg.num_clients, 80.0).sum(), cfg.clients_per_round)
  assert float(state.totals["sim_seconds"]) > 80.0


# -- capacity trace: compute and bandwidth per device --

def test_capacity_trace_step_seconds_closed_form(tmp_path):
  capacity = _capacity(7)  # 60 devices map onto 7 keys modulo
  cfg = tiny_config(device_trace=_write(tmp_path / "cap.json", capacity))
  sim = _build(cfg)
  plan = sim.cohort(sim.arrays, jnp.int32(0))
  ids, fractions = np.asarray(plan.ids), np.asarray(plan.fraction)
  np.testing.assert_allclose(np.asarray(plan.finish),
                             _finish_by_hand(sim, ids, fractions, capacity),
                             rtol=1e-5)
  keys = sorted(capacity)
  np.testing.assert_allclose(
      np.asarray(sim.arrays.up_kbps),
      [capacity[keys[d % 7]]["communication"] for d in range(60)])


def test_device_class_availability_comes_from_the_profiles():
  cfg = tiny_config(availability="device_class")
  model = build_model("mlp", SHAPE, 10, seed=0, hidden=(16, 8))
  population = device_population(cfg, model, SHAPE)
  np.testing.assert_array_equal(population.availability,
                                population.profiles.availability)
  uniform = device_population(tiny_config(), model, SHAPE)
  assert uniform.availability.min() >= 0.3  # U(min_availability, 1)
  np.testing.assert_array_equal(uniform.tier, population.tier)


# -- memory --

def _memory_by_hand(p, batch, slots, policy="heterofl"):
  if policy == "partial_finetune":
    sizes = [64 * 16 + 16, 16 * 8 + 8, 8 * 10 + 10]
    trained = sum(sizes[3 - math.ceil(p * 3):])
    return 4 * (sum(sizes) + trained * (1 + slots) + batch * (16 + 8 + 10))
  (k0, k1), held = _sub_model(p)
  return 4 * (held * (2 + slots) + batch * (k0 + k1 + 10))


@pytest.mark.parametrize("policy,momentum", [
    ("heterofl", 0.0), ("heterofl", 0.9), ("fedrolex", 0.0),
    ("partial_finetune", 0.9)])
def test_memory_caps_widths_and_excludes_devices_by_hand(policy, momentum):
  cfg = tiny_config(policy=policy, client_momentum=momentum,
                    min_availability=0.99)
  sim0 = _build(cfg)
  tier = np.asarray(sim0.arrays.tier)
  widths = sim0.tier_fractions  # (1, 0.5, 0.25, 0.125)
  slots = int(momentum > 0)
  need = {p: _memory_by_hand(p, cfg.batch_size, slots, policy)
          for p in widths}
  # Device d gets room for width target[d] exactly, or less than the
  # smallest width for every fifth device.
  rng = np.random.default_rng(0)
  target = np.asarray(widths)[rng.integers(0, 4, cfg.num_clients)]
  memory = np.asarray([need[p] for p in target], np.float64)
  memory[::5] = need[0.125] - 1
  sim = _build(cfg, memory_mb=memory / 2**20)
  # The largest width whose need fits (depth policies train ceil(p*3) layers,
  # so 1/8 and 1/4 need the same), 0 below the smallest width.
  cap = np.asarray([max((p for p in widths if need[p] <= m), default=0.0)
                    for m in memory])
  np.testing.assert_allclose(
      np.asarray(sim.time_model.memory_caps(sim.arrays)), cap)
  tier_width = np.asarray(widths)[tier]
  assert sim.memory_report() == {
      "memory_capped": int(np.sum((cap > 0) & (cap < tier_width))),
      "memory_excluded": int(np.sum(cap == 0))}
  for r in range(3):
    plan = sim.cohort(sim.arrays, jnp.int32(r))
    ids, valid = np.asarray(plan.ids), np.asarray(plan.valid)
    assert np.all(cap[ids[valid]] > 0)  # an excluded device is never online
    np.testing.assert_allclose(np.asarray(plan.fraction)[valid], np.minimum(
        tier_width[ids[valid]], cap[ids[valid]]))
  # summary.json's training memory per tier: the mean need of the width
  # each of the tier's devices trains (capped), excluded devices left out.
  costs = sim.time_model.tier_costs(
      sim.arrays, *sim.sampler.device_widths(sim.arrays, sim.seed))
  trained = np.minimum(tier_width, cap)
  for i in range(len(widths)):
    mine = (tier == i) & (cap > 0)
    np.testing.assert_allclose(costs["train_memory_bytes"][i], np.mean(
        [need[w] for w in trained[mine]]) if mine.any() else np.nan,
                               rtol=1e-6)


def test_default_population_is_never_capped():
  sim = _build(tiny_config())
  assert sim.memory_report() == {"memory_capped": 0, "memory_excluded": 0}


# -- over-commitment --

@pytest.mark.parametrize("overcommit,deadline", [(2.0, 0.0), (1.5, 0.0),
                                                 (2.0, 1.3)])
def test_overcommit_keeps_the_first_to_finish(tmp_path, overcommit, deadline):
  capacity = _capacity(60)
  cfg = tiny_config(device_trace=_write(tmp_path / "cap.json", capacity),
                    overcommit=overcommit, clients_per_round=6,
                    min_availability=0.999, round_deadline=deadline,
                    deadline_mode="drop")
  sim = _build(cfg)
  sampled = math.ceil(overcommit * 6)
  assert sim.num_sampled == sampled
  assert sim.num_slots == -(-sampled // cfg.chunk_size) * cfg.chunk_size
  plan = sim.cohort(sim.arrays, jnp.int32(0))
  ids, valid = np.asarray(plan.ids), np.asarray(plan.valid)
  finish = _finish_by_hand(sim, ids, np.asarray(plan.fraction), capacity)
  on_time = valid & (finish <= (deadline or np.inf))
  assert deadline == 0 or (valid & ~on_time).any()
  slots = np.flatnonzero(on_time)
  kept = slots[np.argsort(finish[slots], kind="stable")[:6]]
  expected = np.zeros(len(ids), bool)
  expected[kept] = True
  np.testing.assert_array_equal(np.asarray(plan.weight) > 0, expected)
  np.testing.assert_array_equal(np.asarray(plan.num_steps) > 0, expected)
  # Discarded and late devices downloaded but count as dropped.
  state = sim.init(sim.model.init_params)
  new, _ = sim.round(state)
  assert float(new.totals["updates"].sum()) == expected.sum()
  assert float(new.totals["dropped"].sum()) == valid.sum() - expected.sum()
  np.testing.assert_allclose(float(new.totals["sim_seconds"]),
                             finish[expected].max(), rtol=1e-5)


# -- the vectorized round equals the per-client loop with each option on --

@pytest.mark.parametrize("option", ["behave", "capacity", "memory",
                                    "overcommit", "device_class"])
def test_vectorized_round_equals_reference_with_option(tmp_path, option):
  overrides, memory = {}, None
  if option == "behave":
    overrides["behave_trace"] = _write(tmp_path / "b.json", BEHAVE)
  elif option == "capacity":
    overrides["device_trace"] = _write(tmp_path / "c.json", _capacity(9))
  elif option == "overcommit":
    overrides.update(overcommit=1.5, device_trace=_write(
        tmp_path / "c.json", _capacity(60)))
  elif option == "device_class":
    overrides["availability"] = "device_class"
  cfg = tiny_config(client_momentum=0.5, **overrides)
  if option == "memory":
    big = _memory_by_hand(1.0, cfg.batch_size, 1)
    memory = np.where(np.arange(cfg.num_clients) % 3 == 0,
                      _memory_by_hand(0.25, cfg.batch_size, 1), big) / 2**20
  sim = _build(cfg, memory_mb=memory)
  state = _at_clock(sim, 55.0)  # several behaviour traces online at 55 s
  for _ in range(2):
    expected = reference_round(sim, state)
    state, stats = sim.round(state)
    _assert_trees_close(state.params, expected.params)
  assert int(stats.participants) > 0


# -- configuration and file errors --

@pytest.mark.parametrize("overrides,needle", [
    (dict(availability="trace"), "config.availability='trace': needs"),
    (dict(availability="bogus"), "config.availability='bogus'"),
    (dict(behave_trace="b.json", availability="device_class"),
     "must be 'trace' when behave_trace"),
    (dict(overcommit=0.5), "config.overcommit=0.5: must be >= 1"),
    (dict(overcommit=5.5), "config.overcommit=5.5: samples 66 devices"),
    (dict(device_trace=""), "config.device_trace=''"),
])
def test_config_errors_name_key_and_value(overrides, needle):
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
    config_lib.validate(tiny_config_dict(**overrides))


def test_overcommit_product_is_not_rounded_up_by_float_error():
  cfg = tiny_config(overcommit=1.12, clients_per_round=25)
  assert math.ceil(1.12 * 25) == 29  # 28.000000000000004: the float trap
  assert _build(cfg).num_sampled == 28


@pytest.mark.parametrize("key", ["device_trace", "behave_trace"])
def test_bad_trace_file_is_a_data_error_naming_it(tmp_path, key):
  bad = tmp_path / "broken.json"
  bad.write_text("{not json")
  model = build_model("mlp", SHAPE, 10, seed=0, hidden=(16, 8))
  with pytest.raises(DataError, match="broken.json"):
    device_population(tiny_config(**{key: str(bad)}), model, SHAPE)


def test_cli_exits_2_on_a_missing_trace(tmp_path, capsys):
  missing = tmp_path / "nowhere.pkl"
  code = cli.main(["run", f"--workdir={tmp_path / 'run'}",
                   "--config.num_clients=20", "--config.clients_per_round=4",
                   f"--config.behave_trace={missing}"])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "nowhere.pkl" in err[0]
  assert not (tmp_path / "run").exists()
