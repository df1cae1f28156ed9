"""The host loop: outputs, resume, determinism, workdir safety, the CLI."""

import json
import subprocess

import jax
import numpy as np
import pytest

import csv

from conftest import (cli_args, cli_env, host_free_records, tiny_config,
                      tiny_config_dict)
from fedjax_tl import checkpoint, runner
from fedjax_tl.cli import main


def _final_params(workdir, cfg):
  exp = runner.build_experiment(cfg)
  ckpts = checkpoint.RoundCheckpoints(workdir / "checkpoints", 2)
  state = ckpts.restore(ckpts.latest_round(),
                        exp.simulation.init(exp.model.init_params))
  ckpts.close()
  return state.params


def test_run_writes_metrics_summary_and_resumes_identically(tmp_path):
  cfg = tiny_config()
  full = runner.run(cfg, tmp_path / "full", quiet=True)
  assert full["rounds"] == 4 and full["num_clients"] == 60
  for key in ("accuracy", "per_tier_accuracy", "clients_per_round",
              "wall_seconds", "pretrain"):
    assert key in full
  records = host_free_records(tmp_path / "full")
  assert [r["round"] for r in records] == [0, 2, 4]
  assert set(records[-1]["per_tier_accuracy"]) == {"1", "0.5", "0.25", "0.125"}

  # Stop after 2 rounds, then run the same command to the end.
  runner.run(tiny_config(num_rounds=2), tmp_path / "resumed", quiet=True)
  resumed = runner.run(cfg, tmp_path / "resumed", quiet=True)
  assert host_free_records(tmp_path / "resumed") == records
  assert resumed["accuracy"] == full["accuracy"]
  for a, b in zip(jax.tree.leaves(_final_params(tmp_path / "full", cfg)),
                  jax.tree.leaves(_final_params(tmp_path / "resumed", cfg))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_same_summary_whatever_the_chunk_size(tmp_path):
  a = runner.run(tiny_config(chunk_size=3, pretrain="none"), tmp_path / "a",
                 quiet=True)
  b = runner.run(tiny_config(chunk_size=12, pretrain="none"), tmp_path / "b",
                 quiet=True)
  np.testing.assert_allclose(a["accuracy"], b["accuracy"], atol=1e-6)
  for name in a["per_tier_accuracy"]:
    np.testing.assert_allclose(a["per_tier_accuracy"][name],
                               b["per_tier_accuracy"][name], atol=1e-6)


def test_pretrained_checkpoint_path_and_workdir_safety(tmp_path, capsys):
  cfg = tiny_config(num_rounds=2)
  runner.run(cfg, tmp_path / "src", quiet=True)
  # A saved pretrained model can seed another experiment.
  from_path = runner.run(
      tiny_config(num_rounds=2, pretrain=str(tmp_path / "src" / "pretrained")),
      tmp_path / "dst", quiet=True)
  assert from_path["pretrain"] == str(tmp_path / "src" / "pretrained")
  # A different experiment in the same workdir is refused, files untouched.
  before = {p.name: p.read_bytes() for p in (tmp_path / "src").glob("*.json*")}
  code = main(["run", f"--workdir={tmp_path / 'src'}", "--no-progress",
               "--config.seed=5"])
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "seed" in err and "--overwrite" in err
  after = {p.name: p.read_bytes() for p in (tmp_path / "src").glob("*.json*")}
  assert before == after


@pytest.mark.parametrize("args,fragment", [
    (["--config.num_rounds=-3"], "config.num_rounds=-3"),
    (["--config.nmu_clients=3"], "did you mean 'num_clients'"),
    (["--config.pretrain=/no/such/ckpt"], "/no/such/ckpt"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--config=/no/such.py"], "no such config file"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, fragment):
  workdir = tmp_path / "w"
  code = main(["run", f"--workdir={workdir}", "--no-progress",
               "--config.num_clients=60", "--config.clients_per_round=6",
               "--config.num_rounds=1", "--config.hidden=(8,)", *args])
  err = capsys.readouterr().err.strip()
  assert code == 2, err
  assert len(err.splitlines()) == 1 and fragment in err


@pytest.mark.slow
def test_cli_end_to_end_as_a_module(tmp_path):
  # The tiny config, whose programs the in-process tests leave in the
  # compilation cache: the subprocess pays for its start, not for XLA.
  workdir = tmp_path / "cli"
  proc = subprocess.run(cli_args(workdir, num_rounds=3, eval_every=1),
                        env=cli_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["rounds"] == 3 and summary["clients_per_round"] == 12
  assert "global accuracy" in proc.stdout
  assert len(host_free_records(workdir)) == 4


def test_compare_runs_each_policy_like_run_and_tabulates(tmp_path):
  config = tiny_config_dict(num_rounds=2, pretrain_steps=10,
                            compare_policies=("heterofl", "fjord"))
  rows = runner.compare(config, tmp_path / "cmp", quiet=True)
  with open(tmp_path / "cmp" / "comparison.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["policy"] for r in table] == ["heterofl", "fjord"]
  assert set(table[0]) >= {"accuracy", "worst_tier_accuracy", "bytes_up",
                           "bytes_down", "wall_seconds", "tier_0.125_accuracy"}
  assert "| fjord |" in (tmp_path / "cmp" / "comparison.md").read_text()
  # Each policy's events in its own directory: side by side in TensorBoard.
  for policy in ("heterofl", "fjord"):
    assert list((tmp_path / "cmp" / policy / "tensorboard").glob(
        "events.out.tfevents.*"))
  # Each row is what a plain run of that policy gives.
  alone = runner.run(tiny_config(num_rounds=2, pretrain_steps=10,
                                 policy="fjord"), tmp_path / "alone",
                     quiet=True)
  assert float(table[1]["accuracy"]) == alone["accuracy"]
  assert float(table[1]["bytes_up"]) == alone["bytes_up"]
  assert rows[1]["worst_tier_accuracy"] == alone["worst_tier_accuracy"]
  # Every file carries the schema version; comparison_tiers.csv holds a row
  # per (policy, tier) with that run's per-tier figures.
  assert alone["schema_version"] == 2
  assert {r["schema_version"] for r in table} == {"2"}
  with open(tmp_path / "cmp" / "comparison_tiers.csv") as f:
    tiers = list(csv.DictReader(f))
  names = ("1", "0.5", "0.25", "0.125")
  assert [(r["policy"], r["tier"]) for r in tiers] == [
      (p, t) for p in ("heterofl", "fjord") for t in names]
  for row in tiers[4:]:
    tier = row["tier"]
    assert float(row["accuracy"]) == alone["per_tier_accuracy"][tier]
    assert float(row["initial_accuracy"]) == alone[
        "initial_per_tier_accuracy"][tier]
    assert float(row["train_memory_bytes"]) == alone[
        "per_tier_train_memory_bytes"][tier]
    assert float(row["bytes_up"]) == alone["per_tier_bytes_up"][tier]
    # The mean per round is the total over the 2 rounds run.
    assert float(row["bytes_down_per_round"]) == alone[
        "per_tier_bytes_down"][tier] / 2
    assert (row["slowest"] == "True") == (tier == alone["slowest_tier"])
  assert sum(alone["per_tier_bytes_up"].values()) == pytest.approx(
      alone["bytes_up"], rel=1e-6)


def test_format_summary_shows_each_tiers_cost_and_reads_older_summaries():
  summary = {
      "schema_version": 2, "accuracy": 0.7, "rounds": 4, "pretrain": "source",
      "worst_tier_accuracy": 0.5, "wall_seconds": 3.0, "server_flops": 2.41e9,
      "per_tier_accuracy": {"1": 0.7, "0.5": 0.5},
      "initial_per_tier_accuracy": {"1": 0.6, "0.5": 0.25},
      "per_tier_params": {"1": 9610, "0.5": 4810},
      "per_tier_train_memory_bytes": {"1": 2.5e6, "0.5": 1.25e6},
      "per_tier_train_flops_per_step": {"1": 3e6, "0.5": 1.5e6},
      "per_tier_bytes_down_per_round": {"1": 1e6, "0.5": 0.5e6},
      "per_tier_bytes_up_per_round": {"1": 1e6, "0.5": 0.25e6},
      "per_tier_round_seconds": {"1": 0.5, "0.5": 1.5},
      "slowest_tier": "0.5"}
  lines = runner.format_summary(summary).splitlines()
  assert lines[1].split() == ["1", "0.600", "0.700", "9,610", "2.5", "3",
                              "2", "0.5"]
  assert lines[2].split() == ["0.5", "0.250", "0.500", "4,810", "1.25",
                              "1.5", "0.75", "1.5*"]
  assert "server 2.41 GFLOP" in lines[-1]
  # A summary.json of schema 1 has accuracies only: its costs show as "-".
  old = {k: v for k, v in summary.items()
         if k in ("accuracy", "rounds", "pretrain", "worst_tier_accuracy",
                  "wall_seconds", "per_tier_accuracy",
                  "initial_per_tier_accuracy")}
  lines = runner.format_summary(old).splitlines()
  assert lines[2].split() == ["0.5", "0.250", "0.500"] + ["-"] * 5
