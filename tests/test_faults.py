"""Faults in the federation: non-finite updates, attackers, robust aggregators.

Robust statistics are checked against numpy loops by hand; rounds with faults
against `reference_round` (a per-client loop that skips non-finite clients in
numpy).
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (nan_updates, random_federated, small_simulation,
                      tiny_config)
from fedjax_tl import aggregators, faults, runner
from fedjax_tl import config as config_lib
from fedjax_tl.engine.clients import run_client
from fedjax_tl.errors import ConfigError
from fedjax_tl.evaluation import make_evaluator
from fedjax_tl.experiment import outputs
from fedjax_tl.simulation import reference_round


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


# -- the masked statistics against numpy by hand --


def _np_trimmed_mean(values, holds, trim):
  out = np.zeros(values.shape[1])
  for c in range(values.shape[1]):
    v = np.sort(values[holds[:, c], c])
    k = int(np.floor(trim * len(v)))
    out[c] = v[k:len(v) - k].mean() if len(v) else 0.0
  return out


def _np_krum_scores(values, holds, participants, f):
  num, size = values.shape
  neighbours = max(participants.sum() - f - 2, 1)
  scores = np.full(num, np.inf)
  for i in np.flatnonzero(participants):
    dist = []
    for j in np.flatnonzero(participants):
      both = holds[i] & holds[j]
      if j != i:  # squared distance on shared coordinates, scaled to size
        dist.append(np.sum((values[i, both] - values[j, both])**2) * size /
                    both.sum() if both.any() else np.inf)
    scores[i] = np.sum(np.sort(dist)[:neighbours])
  return scores


def test_masked_statistics_match_numpy():
  # Jitted: one compile each serves every trial.
  median_fn = jax.jit(aggregators.masked_median)
  trimmed_fn = jax.jit(aggregators.masked_trimmed_mean, static_argnums=2)
  scores_fn = jax.jit(aggregators.krum_scores, static_argnums=3)
  select_fn = jax.jit(aggregators.krum_select, static_argnums=(3, 4))
  rng = np.random.default_rng(0)
  for trial in range(4):
    num, size = 9, 40
    values = rng.normal(size=(num, size)).astype(np.float32)
    # Nested first-k holdings (like width tiers) plus random holes; column 0
    # held by nobody, column 1 by one client.
    widths = rng.integers(1, size + 1, num)
    holds = (np.arange(size)[None] < widths[:, None]) & (
        rng.random((num, size)) < 0.8)
    holds[:, 0] = False
    holds[:, 1] = np.arange(num) == trial
    participants = rng.random(num) < 0.85
    holds &= participants[:, None]
    count = holds.sum(0)

    median, held = median_fn(values, holds)
    expected = [np.median(values[holds[:, c], c]) if count[c] else 0.0
                for c in range(size)]
    np.testing.assert_allclose(np.asarray(median), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(held), count > 0)
    trimmed, _ = trimmed_fn(values, holds, 0.25)
    np.testing.assert_allclose(np.asarray(trimmed),
                               _np_trimmed_mean(values, holds, 0.25),
                               rtol=1e-5, atol=1e-6)

    f = 2
    scores = np.asarray(scores_fn(values, holds, participants, f))
    expected = _np_krum_scores(values, holds, participants, f)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    for m in (1, 3):
      selected = np.asarray(select_fn(values, holds, participants, f, m))
      np.testing.assert_array_equal(
          np.flatnonzero(selected), np.sort(np.argsort(expected,
                                                       kind="stable")[:m]))

  # Clipping: each client's whole upload to norm <= clip_norm.
  tree = {"a": jnp.asarray(values[:, :30].reshape(num, 5, 6)),
          "b": jnp.asarray(values[:, 30:])}
  clipped, within = aggregators.clip_by_norm(tree, 2.0)
  norms = np.linalg.norm(values, axis=1)
  factor = np.minimum(1.0, 2.0 / norms)
  np.testing.assert_allclose(np.asarray(clipped["b"]),
                             values[:, 30:] * factor[:, None], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(within), norms <= 2.0)


# -- attacks --


def test_attacks_corrupt_only_the_malicious_devices():
  flags = faults.malicious_devices(1000, 0.2, seed=3)
  assert flags.sum() == 200
  np.testing.assert_array_equal(flags, faults.malicious_devices(1000, 0.2, 3))
  assert not np.array_equal(flags, faults.malicious_devices(1000, 0.2, 4))

  honest = small_simulation(3)
  malicious = np.zeros(40, bool)
  malicious[5] = True
  arrays = honest.arrays._replace(malicious=jnp.asarray(malicious))
  params, r = honest.model.init_params, jnp.int32(0)

  def delta(sim, arrays, device):
    run = jax.jit(functools.partial(run_client, sim))
    return run(arrays, params, r, jnp.int32(device), jnp.float32(0.5),
               jnp.int32(3))[0]

  base = {d: delta(honest, arrays, d) for d in (5, 6)}
  flip = dataclasses.replace(honest, attack=faults.Attack("sign_flip", 3.0))
  _assert_trees_close(delta(flip, arrays, 5),
                      jax.tree.map(lambda d: -3 * d, base[5]), atol=1e-6)
  _assert_trees_close(delta(flip, arrays, 6), base[6], atol=0)
  scale = faults.Attack("scale", 4.0)  # the same path with another factor
  _assert_trees_close(scale.delta(base[5], jnp.asarray(True)),
                      jax.tree.map(lambda d: 4 * d, base[5]), atol=1e-6)
  _assert_trees_close(scale.delta(base[5], jnp.asarray(False)), base[5],
                      atol=0)
  # label_flip: the same as an honest device trained on labels 9 - y.
  labels = dataclasses.replace(honest, attack=faults.Attack("label_flip"))
  flipped = arrays._replace(y=arrays.y.at[5].set(9 - arrays.y[5]))
  _assert_trees_close(delta(labels, arrays, 5), delta(honest, flipped, 5),
                      atol=1e-6)
  _assert_trees_close(delta(labels, arrays, 6), base[6], atol=0)


# -- rounds with a non-finite client and attackers --


def _faulty(sim, poisoned=1, attackers=2):
  """`sim` with its first `poisoned` aggregated clients of round 0 fed NaN
  features and the next `attackers` flagged malicious."""
  state = sim.init(sim.model.init_params)
  plan = jax.jit(sim.cohort)(sim.arrays, state.round, state.width_cap)
  ids = np.asarray(plan.ids)[np.asarray(plan.weight) > 0]
  malicious = np.zeros(sim.arrays.count.shape[0], bool)
  malicious[ids[poisoned:poisoned + attackers]] = True
  arrays = sim.arrays._replace(
      x=sim.arrays.x.at[ids[:poisoned]].set(jnp.nan),
      malicious=jnp.asarray(malicious))
  return dataclasses.replace(sim, arrays=arrays), state, len(ids)


# trimmed_mean shares median's path (its statistic is checked above).
@pytest.mark.parametrize("kind", ["mean", "clip", "median", "multi_krum"])
def test_round_with_faults_equals_reference(kind):
  aggregator = aggregators.get(kind, clip_norm=0.5, trim_fraction=0.2,
                               krum_f=1, krum_m=4)
  sim, state, aggregated = _faulty(small_simulation(
      3, attack=faults.Attack("sign_flip", 3.0), aggregator=aggregator))
  expected = reference_round(sim, state)
  new, stats = sim.round(state)
  assert int(stats.excluded) == 1
  assert int(stats.aggregated) == aggregated - 1  # all but the NaN client
  assert float(new.totals["excluded"].sum()) == 1
  assert float(new.totals["skipped"]) == 0
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(new.params))
  _assert_trees_close(new.params, expected.params)
  assert np.isfinite(float(stats.train_loss))
  if kind == "clip":  # the tier fast path screens and clips alike
    fast, fast_stats = dataclasses.replace(sim, tier_fast_path=True).round(
        state)
    _assert_trees_close(fast.params, new.params)
    assert int(fast_stats.excluded) == 1
    assert int(fast_stats.aggregated) == aggregated - 1
    np.testing.assert_allclose(float(fast_stats.train_loss),
                               float(stats.train_loss), rtol=1e-5)


def test_a_round_with_every_update_excluded_leaves_the_model_unchanged():
  sim, state, aggregated = _faulty(small_simulation(3, algorithm="fedadam"),
                                   poisoned=40, attackers=0)
  new, stats = sim.round(state)
  assert aggregated > 0 and int(stats.excluded) == aggregated
  assert int(stats.aggregated) == 0
  assert outputs.train_loss(_as_call(stats)) is None  # missing, not 0
  assert float(new.totals["skipped"]) == 1
  assert int(new.round) == 1
  for before, after in zip(jax.tree.leaves((state.params, state.opt_state)),
                           jax.tree.leaves((new.params, new.opt_state))):
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


def _as_call(stats):
  """One round's stats as `Simulation.rounds` returns them: a leading
  rounds axis, what `outputs.train_loss` reads."""
  return jax.tree.map(lambda a: jnp.asarray(a)[None], stats)


def test_a_round_with_nobody_online_reports_no_loss():
  sim = small_simulation(3)
  offline = dataclasses.replace(sim, arrays=sim.arrays._replace(
      availability=jnp.zeros_like(sim.arrays.availability)))
  state = offline.init(offline.model.init_params)
  new, stats = offline.round(state)
  assert (int(stats.participants), int(stats.aggregated)) == (0, 0)
  assert int(stats.excluded) == 0
  assert outputs.train_loss(_as_call(stats)) is None
  for before, after in zip(jax.tree.leaves(state.params),
                           jax.tree.leaves(new.params)):
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


def test_a_zero_training_loss_is_reported_not_taken_for_a_skipped_round():
  """Every label 0 and the head's bias for class 0 at 1e4: each client's
  cross-entropy is exactly 0.0 in float32 (the other classes' exp
  underflows), its gradient exactly 0. The round aggregated clients, so
  its loss is 0.0, not missing (a `loss == 0.0` guess said missing)."""
  data = random_federated(num_clients=40)
  data = dataclasses.replace(data, y=np.zeros_like(data.y))
  sim = small_simulation(3, data=data)
  params = sim.model.init_params
  params = {**params, "head": {**params["head"], "bias": params["head"][
      "bias"].at[0].set(1e4)}}
  state = sim.init(params)
  plan = jax.jit(sim.cohort)(sim.arrays, state.round, state.width_cap)
  by_hand = int((np.asarray(plan.weight) > 0).sum())
  new, stats = sim.rounds(state, 1)
  assert by_hand > 0 and int(stats.aggregated[0]) == by_hand
  assert float(stats.train_loss[0]) == 0.0
  assert outputs.train_loss(stats) == 0.0
  _assert_trees_close(new.params, params, rtol=0, atol=0)


# -- configuration --


@pytest.mark.parametrize("overrides,fragment", [
    (dict(attack="flip"), "config.attack='flip'"),
    (dict(attack_fraction=1.5), "config.attack_fraction=1.5"),
    (dict(attack_scale=0.0), "config.attack_scale=0.0"),
    (dict(aggregator="mode"), "config.aggregator='mode'"),
    (dict(trim_fraction=0.5), "config.trim_fraction=0.5"),
    (dict(aggregator="median", tier_fast_path=True),
     "config.tier_fast_path=True"),
    (dict(aggregator="krum", krum_f=5), "config.krum_f=5"),
    (dict(aggregator="multi_krum", krum_m=13), "config.krum_m=13"),
    (dict(clip_norm=-1.0), "config.clip_norm=-1.0"),
])
def test_bad_fault_config_names_key_and_value(overrides, fragment):
  with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
    tiny_config(**overrides)


def test_fault_config_defaults():
  cfg = tiny_config(attack="sign_flip", attack_fraction=0.25,
                    aggregator="multi_krum")
  assert (cfg.krum_f, cfg.krum_m) == (3, 9)  # 25% of a cohort of 12
  assert tiny_config().krum_f == 0
  assert not runner.auto_tier_fast_path(
      tiny_config(aggregator="median", hidden=(512, 512)), 10**6)
  defaults = config_lib.validate(config_lib.default_config())
  assert (defaults.attack, defaults.aggregator) == ("none", "mean")


@pytest.mark.slow
def test_runner_counts_non_finite_updates(tmp_path, monkeypatch, capsys):
  # Every client update comes back NaN (a broken client library): every
  # round is skipped, so the model and its accuracy never change.
  from fedjax_tl.experiment import build as build_lib
  monkeypatch.setattr(build_lib, "make_client_update",
                      nan_updates(build_lib.make_client_update))
  cfg = tiny_config(num_rounds=3, eval_every=1)
  summary = runner.run(cfg, tmp_path, progress=False)
  records = [json.loads(line) for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["skipped_rounds"] for r in records] == [0, 1, 2, 3]
  updates = [sum(r["per_tier_updates"].values()) for r in records]
  assert updates[1] > 0
  assert [r["excluded_total"] for r in records] == updates
  assert [r["excluded"] for r in records] == [0] + list(np.diff(updates))
  assert [sum(r["per_tier_excluded"].values()) for r in records] == updates
  assert all(r["accuracy"] == records[0]["accuracy"] for r in records)
  assert (summary["skipped_rounds"], summary["excluded_total"]) == (
      3, updates[-1])
  assert capsys.readouterr().err.count("non-finite") == 1  # said once


@pytest.mark.slow
def test_sign_flip_attackers_break_the_mean_but_not_the_median():
  # The default experiment (1,000 devices, digits, pretrained on the source
  # task) cut to 5 rounds; 20% of the devices upload -10 x their update.
  cfg = config_lib.default_config()
  cfg.attack = "sign_flip"
  exp = runner.build_experiment(config_lib.validate(cfg))
  params, _, _ = runner.initial_params(exp, None, log=lambda *_: None)
  params = runner.federated_params(exp, params)
  sim = exp.simulation
  evaluate = make_evaluator(sim.model, exp.data.target_test)

  def accuracy(variant):
    state = variant.init(params)
    for _ in range(5):
      state, _ = variant.round(state)
    return float(evaluate(state.params, np.ones(1, np.float32))[0][0])

  # Attack-free: the same devices, all honest (the attacked mean's program).
  honest = sim.arrays._replace(malicious=jnp.zeros_like(sim.arrays.malicious))
  clean = accuracy(dataclasses.replace(sim, arrays=honest))
  attacked = accuracy(sim)
  robust = accuracy(dataclasses.replace(
      sim, aggregator=aggregators.get("median")))
  assert attacked < clean - 0.3  # FedAvg collapses
  assert robust > clean - 0.05
