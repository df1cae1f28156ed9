"""Runs as an axis: vmapped runs equal the same runs one after another; sweep."""

import csv
import dataclasses
import functools
import json

import jax
import numpy as np
import pytest

from conftest import (TWO_TIERS, small_simulation, tiny_config,
                      tiny_config_dict)
from fedjax_tl import runner
from fedjax_tl import sweep as sweep_lib
from fedjax_tl.algorithms import server_optimizer
from fedjax_tl.cli import main
from fedjax_tl.client import client_optimizer, make_client_update
from fedjax_tl.config import validate
from fedjax_tl.errors import ConfigError
from fedjax_tl.simulation import Tunable, run_slice, stack_runs
from fedjax_tl.sweep import group_name, sweep_grid, sweep_settings

# small_simulation's client: SGD with momentum 0.5, 3 steps of 4 examples.
_MOMENTUM, _STEPS, _BATCH = 0.5, 3, 4


def _tunable_simulation(algorithm, **kwargs):
  """small_simulation with its configured values as Hparams defaults."""
  sim = small_simulation(algorithm=algorithm, **kwargs)
  server_lr = 0.05 if algorithm == "fedadam" else 1.0
  return dataclasses.replace(sim, tunable=Tunable(
      client_tx=functools.partial(client_optimizer, momentum=_MOMENTUM),
      server_tx=functools.partial(server_optimizer, algorithm),
      client_lr=0.2, server_lr=server_lr, mu=0.05))


def _scalar_simulation(sim, algorithm, seed, client_lr, server_lr, mu):
  """The same simulation built as a single run is today: values baked in."""
  update = make_client_update(sim.model.apply,
                              client_optimizer(client_lr, _MOMENTUM),
                              local_steps=_STEPS, batch_size=_BATCH, mu=mu)
  return dataclasses.replace(sim, seed=seed, client_update=update,
                             server_tx=server_optimizer(algorithm, server_lr))


def _check_vmapped_equals_sequential(algorithm, settings, rounds=2, **kwargs):
  sim = _tunable_simulation(algorithm, **kwargs)
  params = sim.model.init_params
  states = sim.init_runs(params, len(settings))
  hparams = stack_runs([sim.hparams(**s) for s in settings])
  for _ in range(rounds):
    states, _ = sim.round_runs(states, hparams)
  defaults = dict(seed=sim.seed, client_lr=sim.tunable.client_lr,
                  server_lr=sim.tunable.server_lr, mu=sim.tunable.mu)
  for i, setting in enumerate(settings):
    one = _scalar_simulation(sim, algorithm, **{**defaults, **setting})
    state = one.init(params)
    for _ in range(rounds):
      state, _ = one.round(state)
    got = run_slice(states, i)
    assert int(got.round) == rounds
    # FedAdam normalises the mean delta, so float32 rounding differences
    # between the vmapped and the single-run programs grow (to 3e-6).
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(got.params)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5,
                                 atol=5e-6)
    for name, total in state.totals.items():
      np.testing.assert_allclose(np.asarray(got.totals[name]),
                                 np.asarray(total), rtol=1e-6)
  # The settings differ, and so do the runs.
  first = jax.tree.leaves(run_slice(states, 0).params)[0]
  assert all(not np.allclose(first, jax.tree.leaves(
      run_slice(states, i).params)[0]) for i in range(1, len(settings)))


def test_vmapped_runs_equal_the_runs_one_after_another():
  # fedadam: the server learning rate acts through Adam's state. Every
  # value differs from the defaults (client lr 0.2, server lr 0.05, mu 0.05,
  # seed 7) in one run, two values a run (each sequential run compiles its
  # own program, its values baked in); the last is the default run itself.
  _check_vmapped_equals_sequential("fedadam", [
      dict(client_lr=0.05, mu=1.0), dict(server_lr=0.2, seed=3), dict()])


@pytest.mark.slow
def test_vmapped_runs_on_the_tier_fast_path():
  _check_vmapped_equals_sequential(
      "fedavg", [dict(client_lr=0.05, seed=1), dict(server_lr=0.5, mu=0.0)],
      policy="heterofl", tier_fast_path=True,
      tiers=TWO_TIERS)


def test_grid_is_the_product_of_swept_values_times_seeds():
  cfg = tiny_config(sweep_client_lr=(0.1, 0.2), sweep_mu=(0.0, 0.5, 1.0),
                    sweep_seeds=(4, 5))
  grid = sweep_grid(cfg)
  assert len(grid) == 12
  assert grid[:3] == [dict(client_lr=0.1, mu=0.0, seed=4),
                      dict(client_lr=0.1, mu=0.0, seed=5),
                      dict(client_lr=0.1, mu=0.5, seed=4)]
  assert {(g["client_lr"], g["mu"], g["seed"]) for g in grid} == {
      (lr, mu, s) for lr in (0.1, 0.2) for mu in (0.0, 0.5, 1.0)
      for s in (4, 5)}
  # No swept values and no seeds: one run, the config's own.
  assert sweep_grid(tiny_config(seed=9, sweep_seeds=())) == [dict(seed=9)]


@pytest.mark.parametrize("key,value", [
    ("sweep_seeds", (1, 1)), ("sweep_seeds", (-1,)), ("sweep_seeds", (2**31,)),
    ("sweep_client_lr", (0.1, 0.0)), ("sweep_server_lr", (float("nan"),)),
    ("sweep_mu", (-0.5,)), ("sweep_mu", ("a",)), ("sweep_batch", -1),
    ("sweep_alpha", (0.0,)), ("sweep_alpha", (0.5, 0.5)),
    ("sweep_policy", ("heterofl", "nope")), ("sweep_policy", (3,)),
])
def test_bad_sweep_spec_names_key_and_value(key, value):
  with pytest.raises(ConfigError) as e:
    tiny_config(**{key: value})
  assert f"config.{key}=" in str(e.value)


def test_discrete_settings_are_the_product_each_validated_afresh():
  config = tiny_config_dict(sweep_alpha=(0.1, 2), capacity_mix="a1-e1",
                            sweep_policy=("heterofl", "fedrolex"))
  expected = [dict(alpha=a, policy=p) for a in (0.1, 2.0)
              for p in ("heterofl", "fedrolex")]
  # From the ConfigDict or from its validated config: the same settings.
  for given in (config, validate(config)):
    settings = sweep_settings(given)
    assert [s for s, _ in settings] == expected
    for setting, cfg in settings:
      assert (cfg.alpha, cfg.policy) == (setting["alpha"], setting["policy"])
      # Masked cross-entropy is HeteroFL's default, not FedRolex's.
      assert cfg.masked_ce == (setting["policy"] == "heterofl")
      assert cfg.tier_fractions == (1.0, 0.0625)
  assert [group_name(s) for s in expected[:2]] == [
      "alpha-0.1_policy-heterofl", "alpha-0.1_policy-fedrolex"]
  assert sweep_settings(tiny_config(seed=3)) == [({}, tiny_config(seed=3))]
  # A setting the rest of the config refuses is named before anything runs.
  with pytest.raises(ConfigError, match="policy-fedrolex: config.policy="):
    sweep_settings(tiny_config_dict(algorithm="heterofl",
                                    sweep_policy=("heterofl", "fedrolex")))
  with pytest.raises(ConfigError, match="config.sweep_alpha="):
    tiny_config(data="mnist", partition="iid", sweep_alpha=(0.1, 1.0))


def _markdown(path):
  """A markdown table as dicts of cell text."""
  lines = path.read_text().splitlines()
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  return [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
          for line in lines[2:]]


@pytest.mark.slow
def test_sweep_resumes_skipping_finished_settings(tmp_path, monkeypatch):
  config = tiny_config_dict(num_rounds=1, pretrain_steps=5, num_clients=20,
                            clients_per_round=4, sweep_alpha=(0.3, 3.0),
                            sweep_seeds=(0, 1))
  computed = []
  compute = sweep_lib._sweep_setting

  def counting(cfg, *args, **kwargs):
    computed.append(cfg.alpha)
    return compute(cfg, *args, **kwargs)

  monkeypatch.setattr(sweep_lib, "_sweep_setting", counting)
  sweep_lib.sweep(config, tmp_path, quiet=True)
  assert computed == [0.3, 3.0]
  table_bytes = (tmp_path / "sweep.csv").read_bytes()
  with open(tmp_path / "sweep.csv") as f:
    table = list(csv.DictReader(f))
  assert [(float(r["alpha"]), int(r["seed"])) for r in table] == [
      (0.3, 0), (0.3, 1), (3.0, 0), (3.0, 1)]
  # sweep.md: one row per setting, mean and sample std over its seeds.
  summary = _markdown(tmp_path / "sweep.md")
  metrics = [k for k in table[0] if k.endswith("accuracy")]
  assert len(metrics) == 8 and set(metrics) <= set(summary[0])
  for row, alpha in zip(summary, (0.3, 3.0), strict=True):
    assert float(row["alpha"]) == alpha and row["seeds"] == "2"
    for metric in metrics:
      x = [float(r[metric]) for r in table if float(r["alpha"]) == alpha]
      assert row[metric] == f"{np.mean(x):.3f} ± {np.std(x, ddof=1):.3f}"

  # Interrupted before the second setting finished: only it is recomputed,
  # and the tables come out the same.
  (tmp_path / "groups" / "alpha-3.0.json").unlink()
  computed.clear()
  sweep_lib.sweep(config, tmp_path, quiet=True)
  assert computed == [3.0]
  assert (tmp_path / "sweep.csv").read_bytes() == table_bytes
  # A saved setting serves the same config only: not one with more rounds.
  saved = tmp_path / "groups" / "alpha-0.3.json"
  assert sweep_lib._saved_group(saved, sweep_settings(config)[0][1])
  config.num_rounds = 2
  assert sweep_lib._saved_group(saved, sweep_settings(config)[0][1]) is None


def test_cli_sweep_refuses_another_experiment_untouched(tmp_path, capsys):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(
      tiny_config(seed=5).to_dict()))
  before = (workdir / "config.json").read_bytes()
  code = main(["sweep", f"--workdir={workdir}", "--no-progress"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and "--overwrite" in err and len(err.splitlines()) == 1
  assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]
  assert (workdir / "config.json").read_bytes() == before
  # A bad sweep value is one line, exit 2, before anything runs.
  code = main(["sweep", f"--workdir={tmp_path / 'v'}", "--no-progress",
               "--config.sweep_client_lr=(0.1,-2)"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and "config.sweep_client_lr=" in err
  assert not (tmp_path / "v").exists()


@pytest.mark.slow
def test_cli_sweep_writes_a_row_per_setting_and_seed(tmp_path, capsys):
  overrides = dict(num_rounds=2, pretrain_steps=10)
  flags = [f"--config.{k}={v}" for k, v in {
      **overrides, "num_clients": 60, "clients_per_round": 12,
      "hidden": "(16,8)", "local_steps": 3, "batch_size": 5,
      "chunk_size": 4, "eval_every": 2, "checkpoint_every": 2}.items()]
  workdir = tmp_path / "sweep"
  # 2 learning rates x 2 seeds in batches of 3: the last batch is padded.
  code = main(["sweep", f"--workdir={workdir}", "--no-progress", *flags,
               "--config.sweep_client_lr=(0.1,0.3)",
               "--config.sweep_seeds=(0,2)", "--config.sweep_batch=3"])
  out = capsys.readouterr().out
  assert code == 0 and "sweep.csv" in out
  with open(workdir / "sweep.csv") as f:
    table = list(csv.DictReader(f))
  assert [(float(r["client_lr"]), int(r["seed"])) for r in table] == [
      (0.1, 0), (0.1, 2), (0.3, 0), (0.3, 2)]
  assert set(table[0]) == {
      "schema_version", "client_lr", "seed", "accuracy",
      "worst_tier_accuracy", "initial_accuracy",
      "initial_worst_tier_accuracy", "bytes_up",
      "bytes_down", "sim_seconds", *(f"tier_{t}_accuracy" for t in
                                     ("1", "0.5", "0.25", "0.125"))}
  for row in table:
    tiers = [float(row[f"tier_{t}_accuracy"]) for t in ("1", "0.5", "0.25",
                                                          "0.125")]
    assert float(row["worst_tier_accuracy"]) == min(tiers)
    # Each row a TensorBoard run of its own (test_writers reads them back).
    assert list((workdir / "tensorboard" / f"client_lr-{row['client_lr']}" /
                 f"seed-{row['seed']}").glob("events.out.tfevents.*"))
  # A row is what `run` gives for that setting (seed = config.seed).
  cfg = tiny_config(**overrides, client_lr=0.3)
  summary = runner.run(cfg, tmp_path / "run", quiet=True)
  assert abs(summary["accuracy"] - float(table[2]["accuracy"])) < 2e-3
  # Every run of the sweep starts where the run starts (round 0).
  assert {r["initial_accuracy"] for r in table} == {table[0][
      "initial_accuracy"]}
  assert abs(summary["initial_accuracy"] -
             float(table[2]["initial_accuracy"])) < 2e-3
  for key in ("bytes_up", "bytes_down", "sim_seconds"):
    np.testing.assert_allclose(float(table[2][key]), summary[key], rtol=1e-6)
