"""DP-FedAvg: Poisson sampling, per-client clipping, noise and accounting.

Clipping is checked against the per-client reference loop (numpy clipping,
every chunk size and the tier fast path) and the fixed-denominator estimator
(McMahan et al.: the noised sum over each entry's expected holders,
sum_d q a_d m_d) by hand, the noise against its closed-form scale (z x C
over the expected holders of each parameter, or the realised ones), the
adaptive clip norm against Andrew et al.'s update computed by hand, and
epsilon against dp-accounting called directly at the largest device's
inclusion chance, q x its availability. The sharded case is in
test_sharding.py.
"""

import dataclasses
import functools
import json

import dp_accounting
import jax
import numpy as np
import pytest
import scipy.stats
from dp_accounting import pld, rdp

from conftest import assert_trees_close, small_simulation, tiny_config
from fedjax_tl import privacy, runner
from fedjax_tl.engine.clients import run_client
from fedjax_tl.simulation import reference_round

COHORT, DEVICES = 10, 40


def _dp(**kwargs):
  values = dict(noise_multiplier=0.0, clip_norm=0.02,
                sampling_rate=COHORT / DEVICES, delta=1e-5)
  values.update(kwargs)
  return privacy.Privacy(**values)


def _aggregated_updates(sim, state):
  """`[(delta, train mask)]` of the round's aggregated clients, one jitted
  client at a time (as numpy trees)."""
  plan = jax.jit(sim.cohort)(sim.arrays, state.round, state.width_cap,
                             state.totals["sim_seconds"])
  one = jax.jit(functools.partial(run_client, sim))
  out = []
  for i in np.flatnonzero(np.asarray(plan.weight) > 0):
    delta, train, _, _ = one(sim.arrays, state.params, state.round,
                             plan.ids[i], plan.fraction[i], plan.num_steps[i])
    out.append(jax.tree.map(np.asarray, (delta, train)))
  return plan, out


def _expected_holders(sim, state):
  """`sum_d q a_d m_d` by hand: every device may be drawn (no memory model,
  deadline or ineligible tier in these simulations), device d w.p. q x its
  availability a_d, holding its tier width's first-k mask m_d."""
  q = sim.privacy.sampling_rate
  chance = q * np.asarray(sim.arrays.availability, np.float64)
  widths = np.asarray(sim.tier_fractions)[np.asarray(sim.arrays.tier)]
  masks = jax.jit(sim.masks)
  den = jax.tree.map(lambda p: np.zeros(p.shape), state.params)
  for p, width in zip(chance, widths):
    _, train = masks(np.float32(width), state.params, state.round,
                     jax.random.key(0))
    den = jax.tree.map(lambda s, m: s + p * np.asarray(m), den, train)
  return den


def _norm(tree):
  return np.sqrt(sum(np.sum(np.square(a, dtype=np.float64))
                     for a in jax.tree.leaves(tree)))


@pytest.mark.parametrize("chunk_size,fast,denominator", [
    (1, False, "expected"), (4, False, "expected"), (4, True, "expected"),
    (4, True, "realised")])
def test_every_client_is_clipped_and_weighs_one(chunk_size, fast,
                                                denominator):
  sim = small_simulation(chunk_size=chunk_size, cohort=COHORT,
                         privacy=_dp(denominator=denominator),
                         tier_fast_path=fast)
  state = sim.init(sim.model.init_params)
  plan, updates = _aggregated_updates(sim, state)
  # Every participant weighs 1 (not its example count), and every update is
  # longer than the clip norm, so each one is scaled down.
  assert set(np.asarray(plan.weight).tolist()) == {0.0, 1.0}
  assert len(updates) >= 3
  assert min(_norm(d) for d, _ in updates) > 2 * sim.privacy.clip_norm
  for _ in range(2):
    expected = reference_round(sim, state)
    state, _ = sim.round(state)
    assert_trees_close(state.params, expected.params, atol=1e-7)
  # By hand, round 1: the sum of the clipped updates over each entry's
  # expected holders (the fixed denominator), or over its realised holders
  # (the option the accountant does not cover: the realised count is
  # released without noise).
  state = sim.init(sim.model.init_params)
  num = jax.tree.map(np.zeros_like, state.params)
  den = jax.tree.map(np.zeros_like, state.params)
  for delta, train in updates:
    scale = sim.privacy.clip_norm / _norm(delta)
    num = jax.tree.map(lambda n, d: n + scale * d, num, delta)
    den = jax.tree.map(lambda s, m: s + m, den, train)
  if denominator == "expected":
    expected = _expected_holders(sim, state)
    assert not all(np.allclose(e, d) for e, d in zip(
        jax.tree.leaves(expected), jax.tree.leaves(den)))
    den = expected
  new, _ = sim.round(state)
  for p, q, n, d in zip(*map(jax.tree.leaves, (state.params, new.params, num,
                                                den))):
    expected = np.asarray(p) + np.where(d > 0, n / np.maximum(d, 1), 0)
    np.testing.assert_allclose(np.asarray(q), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("denominator", ["expected", "realised"])
def test_noise_is_z_clip_over_the_holders_of_each_parameter(denominator):
  z = 3.0
  quiet = small_simulation(chunk_size=4, cohort=COHORT,
                           privacy=_dp(denominator=denominator))
  noisy = dataclasses.replace(quiet, privacy=_dp(noise_multiplier=z,
                                                 denominator=denominator))
  state = quiet.init(quiet.model.init_params)
  _, updates = _aggregated_updates(quiet, state)
  holders = jax.tree.map(lambda *m: np.sum(m, axis=0),
                         *[train for _, train in updates])
  if denominator == "expected":
    # Every entry some device may hold is noised, over its expected
    # holders, whether or not a drawn client held it.
    holders = _expected_holders(quiet, state)
  # Same cohort and clients; only the noise differs (server lr 1).
  a, _ = quiet.round(state)
  b, _ = noisy.round(state)
  standardized, untouched = [], []
  for pa, pb, h in zip(*map(jax.tree.leaves, (a.params, b.params, holders))):
    diff = (np.asarray(pb, np.float64) - np.asarray(pa, np.float64))
    standardized.append((diff * h / (z * quiet.privacy.clip_norm))[h > 0])
    untouched.append(diff[h == 0])
  standardized = np.concatenate(standardized)
  assert standardized.size > 1000
  assert abs(standardized.std() - 1) < 0.06
  assert abs(standardized.mean()) < 0.1
  assert np.all(np.concatenate(untouched) == 0)


def test_adaptive_clip_norm_follows_andrew_et_al():
  base = small_simulation(chunk_size=4, cohort=COHORT, privacy=_dp())
  state = base.init(base.model.init_params)
  _, updates = _aggregated_updates(base, state)
  norms = np.array([_norm(d) for d, _ in updates])
  clip = float(np.quantile(norms, 0.2))  # some within, most beyond
  dp = _dp(clip_norm=clip, adaptive=True, target_quantile=0.5, clip_lr=0.2,
           count_noise=1e-6)
  sim = dataclasses.replace(base, privacy=dp)
  new, _ = sim.round(sim.init(sim.model.init_params))
  # b: the unclipped count over the expected participants, sum_d q a_d
  # (tensorflow_privacy's expected_num_records; the expectation was the
  # share of the realised participants before the fixed denominator).
  expected = dp.sampling_rate * np.sum(np.asarray(sim.arrays.availability,
                                                  np.float64))
  share = np.sum(norms <= clip) / expected
  assert 0 < share < 0.5
  np.testing.assert_allclose(float(new.privacy["clip_norm"]),
                             clip * np.exp(-0.2 * (share - 0.5)), rtol=1e-5)
  # The realised-count option keeps the share of the realised participants.
  realised = dataclasses.replace(sim, privacy=dataclasses.replace(
      dp, denominator="realised"))
  new, _ = realised.round(realised.init(sim.model.init_params))
  np.testing.assert_allclose(
      float(new.privacy["clip_norm"]),
      clip * np.exp(-0.2 * (np.mean(norms <= clip) - 0.5)), rtol=1e-5)
  # Theorem 1's split of z between the updates and the count.
  dp = dataclasses.replace(dp, noise_multiplier=1.0, count_noise=5.0)
  np.testing.assert_allclose(dp.update_noise_multiplier,
                             1 / np.sqrt(1 - 1 / 100))


def test_accountant_is_given_the_largest_inclusion_chance():
  # Device d is drawn w.p. q x a_d (online, then its coin): Poisson
  # sampling at unequal rates, each device's privacy bounded by that of the
  # largest rate, which the accountant is given (not q itself).
  q, z, rounds = COHORT / DEVICES, 1.0, 30
  sim = small_simulation(chunk_size=4, cohort=COHORT,
                         privacy=_dp(noise_multiplier=z), availability=0.5)
  a = np.asarray(sim.arrays.availability, np.float64)
  assert sim.privacy.sampling_rate == q
  assert sim.privacy.inclusion_rate == pytest.approx(q * a.max(), rel=1e-6)
  assert sim.privacy.inclusion_rate < q
  accountant = rdp.RdpAccountant()
  accountant.compose(dp_accounting.PoissonSampledDpEvent(
      q * a.max(), dp_accounting.GaussianDpEvent(z)), rounds)
  assert sim.privacy.epsilon(rounds) == pytest.approx(
      accountant.get_epsilon(1e-5), rel=1e-5)
  assert sim.privacy.epsilon(rounds) < privacy.epsilon(z, q, rounds, 1e-5)
  # Only the devices that may be drawn count: uniform_full_only draws the
  # full-width tier alone.
  full = small_simulation(chunk_size=4, cohort=COHORT, privacy=_dp(),
                          availability=0.5, policy="uniform_full_only")
  tier = np.asarray(full.arrays.tier)
  assert full.privacy.inclusion_rate == pytest.approx(
      q * a[tier == 0].max(), rel=1e-6)
  # With a behaviour trace a device is online for certain while its trace
  # says so: the largest chance is q.
  traced = sim.arrays._replace(online_starts=np.zeros((DEVICES, 1)))
  assert sim.sampler.largest_inclusion(traced) == pytest.approx(q)


def test_expected_denominator_of_per_device_masks():
  # fed_dropout's units are drawn per client: the expected holders are
  # summed device by device, the same in the round and the reference loop.
  sim = small_simulation(chunk_size=4, cohort=COHORT, policy="fed_dropout",
                         privacy=_dp(noise_multiplier=1.0))
  state = sim.init(sim.model.init_params)
  expected = reference_round(sim, state)
  state, _ = sim.round(state)
  assert_trees_close(state.params, expected.params, atol=1e-6)


def test_poisson_sampling_rate_and_slots():
  dp = _dp()
  sim = small_simulation(chunk_size=4, cohort=COHORT, privacy=dp,
                         availability=0.5)
  state = sim.init(sim.model.init_params)
  cohort = jax.jit(jax.vmap(lambda r: sim.cohort(sim.arrays, r)))
  plans = cohort(np.arange(400, dtype=np.int32))
  ids, valid = np.asarray(plans.ids), np.asarray(plans.valid)
  counts = valid.sum(axis=1)
  online = np.asarray(sim.arrays.availability, np.float64)
  # Each device is online w.p. a_i and then chosen w.p. q, independently.
  mean = dp.sampling_rate * online.sum()
  var = np.sum(dp.sampling_rate * online * (1 - dp.sampling_rate * online))
  assert abs(counts.mean() - mean) < 4 * np.sqrt(var / len(counts))
  assert counts.var() == pytest.approx(var, rel=0.25)
  for row, ok in zip(ids, valid):
    assert len(set(row[ok].tolist())) == ok.sum()
  # The slots hold a draw of 40 devices at q = 1/4 but with a 1e-9 chance.
  assert scipy.stats.binom.sf(sim.num_sampled, DEVICES, dp.sampling_rate) < \
      1e-9 or sim.num_sampled == DEVICES
  assert scipy.stats.binom.sf(privacy.slots_for(100), 1000, 0.1) < 1e-9
  assert float(state.privacy["overflow"]) == 0


@pytest.mark.parametrize("name,make", [("rdp", rdp.RdpAccountant),
                                       ("pld", pld.PLDAccountant)])
@pytest.mark.parametrize("z,q,rounds,delta", [
    (1.0, 0.1, 50, 1e-5), (0.7, 0.01, 200, 1e-6), (2.0, 0.5, 3, 1e-3)])
def test_epsilon_is_dp_accounting_s(name, make, z, q, rounds, delta):
  accountant = make()
  accountant.compose(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(z)), rounds)
  expected = accountant.get_epsilon(delta)
  assert privacy.epsilon(z, q, rounds, delta, name) == pytest.approx(
      expected, rel=1e-9)
  assert privacy.epsilon(z, q, 0, delta, name) == 0


def test_run_reports_epsilon_per_evaluation_and_resumes_identically(tmp_path):
  settings = dict(dp=True, dp_noise_multiplier=0.8, dp_clip_norm=0.5,
                  dp_adaptive_clip=True, dp_accountant="pld", eval_every=1,
                  checkpoint_every=1, local_test_examples=0)
  cfg = tiny_config(**settings)
  summary = runner.run(cfg, tmp_path / "full", quiet=True)
  records = [json.loads(line) for line in
             (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  # The accountant's rate: the largest device's chance, q x its
  # availability (the expectation was q before the rate was the true one).
  availability = runner.build_experiment(cfg).population.availability
  q = cfg.clients_per_round / cfg.num_clients * float(availability.max())
  assert summary["dp_accounted_rate"] == pytest.approx(q, rel=1e-6)
  assert records[0]["round"] == 0 and records[0]["dp_epsilon"] == 0
  for record in records[1:]:
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(0.8)), record["round"])
    assert record["dp_epsilon"] == pytest.approx(
        accountant.get_epsilon(cfg.dp_delta), rel=1e-5)
  clips = [r["dp_clip_norm"] for r in records]
  assert clips[0] == 0.5 and len(set(clips)) == len(clips)  # it adapts
  assert summary["dp_epsilon"] == records[-1]["dp_epsilon"]
  assert summary["dp_delta"] == cfg.dp_delta == 1e-5
  # Stopped after 2 rounds and rerun: the same noise, clip norms, epsilon.
  runner.run(tiny_config(**settings, num_rounds=2), tmp_path / "resumed",
             quiet=True)
  runner.run(cfg, tmp_path / "resumed", quiet=True)
  strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_seconds"}
                      for r in rs]
  resumed = [json.loads(line) for line in
             (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert strip(resumed) == strip(records)


def test_privacy_refuses_what_breaks_its_sensitivity():
  from fedjax_tl import aggregators
  for kwargs in (dict(aggregator=aggregators.get("median")),
                 dict(overcommit=1.5)):
    with pytest.raises(ValueError, match="privacy needs"):
      small_simulation(chunk_size=4, cohort=COHORT, privacy=_dp(), **kwargs)


def test_sweep_runs_axis_clips_noises_and_reports_epsilon(tmp_path):
  # Seeds vmapped as runs: each run adapts its own clip norm, and every row
  # reports dp-accounting's epsilon for its rounds.
  import csv
  from conftest import tiny_config_dict
  from fedjax_tl import sweep as sweep_lib
  config = tiny_config_dict(dp=True, dp_noise_multiplier=1.0,
                            dp_adaptive_clip=True, num_rounds=2,
                            pretrain_steps=5, num_clients=20,
                            clients_per_round=4, sweep_seeds=(0, 1),
                            local_test_examples=0)
  sweep_lib.sweep(config, tmp_path, quiet=True)
  with open(tmp_path / "sweep.csv") as f:
    rows = list(csv.DictReader(f))
  # At the largest device's chance of being drawn, 4 / 20 x its
  # availability (4 / 20 before the rate was the true one).
  from fedjax_tl import config as config_lib
  availability = runner.build_experiment(
      config_lib.validate(config)).population.availability
  accountant = rdp.RdpAccountant()
  accountant.compose(dp_accounting.PoissonSampledDpEvent(
      4 / 20 * float(availability.max()), dp_accounting.GaussianDpEvent(1.0)),
      2)
  for row in rows:
    assert float(row["dp_epsilon"]) == pytest.approx(
        accountant.get_epsilon(1e-5), rel=1e-5)
  clips = {float(row["dp_clip_norm"]) for row in rows}
  assert len(clips) == 2 and 1.0 not in clips
