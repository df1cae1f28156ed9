"""`fedjax-tl compare` and `sweep` trusted like a run (issue 20): clean stops
on SIGINT / SIGTERM (one line, exit 130 / 143, the same command resumes),
a full disk writing comparison.csv / sweep.csv (one line, exit 1, no partial
file) and one owner of the comparison's directory. Each case asserts on the
directory's content as well as on the exit code."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from conftest import (cli_args, cli_env, disk_full_writing, signal_cli,
                      tiny_config_dict)
from fedjax_tl import sweep as sweep_lib
from fedjax_tl.cli import main
from fedjax_tl.experiment import compare as compare_lib
from fedjax_tl.experiment import workdir as workdir_lib

POLICIES = ("heterofl", "fjord")


def _argv(command, workdir, **overrides):
  """The CLI's `command` on the tiny config, every key a flag."""
  return [command, *cli_args(workdir, **overrides)[4:]]


def _fake_run(signal_after=None):
  """compare's `run`, returning a made-up summary at once (no training);
  after the policy `signal_after` it sends this process SIGTERM, as a
  user would between two runs."""
  def run(cfg, workdir, **kwargs):
    del kwargs
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "summary.json").write_text("{}")
    if cfg.policy == signal_after:
      os.kill(os.getpid(), signal.SIGTERM)
    return {"policy": cfg.policy, "accuracy": 0.5,
            "worst_tier_accuracy": 0.25, "slowest_tier": "1",
            "local_accuracy": None, "per_tier_accuracy": {"1": 0.5},
            **dict.fromkeys(("bytes_up", "bytes_down", "sim_seconds",
                             "sim_seconds_per_round", "server_flops", "server_seconds",
                             "wall_seconds"), 1.0)}
  return run


def _one_error(err):
  """The one line an error or a stop prints (compare's "== policy" lines
  aside); no traceback."""
  lines = [line for line in err.strip().splitlines()
           if line.startswith(("error:", "stopped"))]
  assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
  return lines[0]


def _leftovers(root):
  return [p.name for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_compare_stops_between_runs_and_resumes(tmp_path, capsys,
                                                monkeypatch):
  workdir = tmp_path / "cmp"
  monkeypatch.setattr(compare_lib, "run", _fake_run(signal_after="heterofl"))
  code = main(_argv("compare", workdir, compare_policies=POLICIES))
  line = _one_error(capsys.readouterr().err)
  assert code == 143
  assert line == ("stopped before policy fjord (1 of 2 policies done); the "
                  "same command resumes")
  assert sorted(p.name for p in workdir.iterdir()) == [
      workdir_lib.LOCK, "heterofl"]  # no table, nothing partial
  assert (workdir / workdir_lib.LOCK).read_text() == ""  # released
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
  monkeypatch.setattr(compare_lib, "run", _fake_run())
  assert main(_argv("compare", workdir, compare_policies=POLICIES)) == 0
  table = (workdir / "comparison.csv").read_text().splitlines()
  assert [row.split(",")[1] for row in table] == ["policy", *POLICIES]


def test_compare_refuses_a_second_owner(tmp_path, capsys, monkeypatch):
  """The comparison's own directory is locked (one owner), like a run's."""
  workdir = tmp_path / "cmp"
  monkeypatch.setattr(compare_lib, "run", _fake_run())
  with workdir_lib.locked(workdir):
    code = main(_argv("compare", workdir, compare_policies=POLICIES))
  line = _one_error(capsys.readouterr().err)
  assert code == 2 and "in use by another run" in line
  assert f"process {os.getpid()}" in line
  assert [p.name for p in workdir.iterdir()] == [workdir_lib.LOCK]


def test_compare_disk_full_writing_the_table(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "cmp"
  monkeypatch.setattr(compare_lib, "run", _fake_run())
  assert main(_argv("compare", workdir, compare_policies=POLICIES)) == 0
  before = (workdir / "comparison.csv").read_bytes()
  capsys.readouterr()
  disk_full_writing("comparison.csv")(monkeypatch)
  code = main(_argv("compare", workdir, compare_policies=POLICIES))
  line = _one_error(capsys.readouterr().err)
  assert code == 1
  assert line.startswith(f"error: disk full writing {workdir}/comparison.csv")
  assert (workdir / "comparison.csv").read_bytes() == before  # the old one
  assert not _leftovers(workdir)


def _fake_setting(rows_per_setting):
  """sweep's `_sweep_setting` without training: it opens the workdir and
  returns made-up rows."""
  def setting(cfg, workdir, replace, open_workdir, progress, log, stop):
    del workdir, replace, progress, log, stop
    open_workdir()
    return [{"seed": s, "accuracy": cfg.alpha, "worst_tier_accuracy": 0.1}
            for s in range(rows_per_setting)]
  return setting


def test_sweep_disk_full_writing_sweep_csv(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "sweep"
  monkeypatch.setattr(sweep_lib, "_sweep_setting", _fake_setting(2))
  disk_full_writing("sweep.csv")(monkeypatch)
  code = main(_argv("sweep", workdir, sweep_alpha=(0.3, 3.0)))
  line = _one_error(capsys.readouterr().err)
  assert code == 1
  assert line.startswith(f"error: disk full writing {workdir}/sweep.csv")
  assert not (workdir / "sweep.csv").exists() and not _leftovers(workdir)
  # The settings done are saved: the rerun only writes the tables.
  assert sorted(p.name for p in (workdir / "groups").iterdir()) == [
      "alpha-0.3.json", "alpha-3.0.json"]


SWEEP = dict(num_rounds=2, pretrain_steps=5, num_clients=20,
             clients_per_round=4, sweep_alpha=(0.3, 3.0), sweep_seeds=(0,))


@pytest.mark.slow
def test_sweep_stops_on_sigint_and_resumes_to_the_same_tables(
    tmp_path, capsys, monkeypatch):
  """SIGINT in the second setting's rounds: one line, exit 130, the first
  setting saved, no table; the same command reruns only the second and
  writes the uninterrupted sweep's tables."""
  full = tmp_path / "full"
  sweep_lib.sweep(tiny_config_dict(**SWEEP), full, quiet=True)
  from fedjax_tl.engine.runs import RunsAxis
  round_runs, calls = RunsAxis.round_runs, []

  def interrupted(self, states, hparams):
    out = round_runs(self, states, hparams)
    calls.append(1)
    if len(calls) == 3:  # round 1 of the second setting (2 rounds each)
      os.kill(os.getpid(), signal.SIGINT)
    return out
  monkeypatch.setattr(RunsAxis, "round_runs", interrupted)
  workdir = tmp_path / "sweep"
  capsys.readouterr()
  code = main(_argv("sweep", workdir, **SWEEP))
  line = _one_error(capsys.readouterr().err)
  assert code == 130 and len(calls) == 3
  assert line == ("stopped in sweep setting alpha-3.0 (1 of 2 settings "
                  "saved; this one is rerun); the same command resumes")
  assert [p.name for p in (workdir / "groups").iterdir()] == [
      "alpha-0.3.json"]
  assert not (workdir / "sweep.csv").exists() and not _leftovers(workdir)
  assert (workdir / workdir_lib.LOCK).read_text() == ""
  monkeypatch.setattr(RunsAxis, "round_runs", round_runs)
  assert main(_argv("sweep", workdir, **SWEEP)) == 0
  assert (workdir / "groups" / "alpha-0.3.json").read_bytes() == (
      full / "groups" / "alpha-0.3.json").read_bytes()
  for name in ("sweep.csv", "sweep.md"):
    assert (workdir / name).read_bytes() == (full / name).read_bytes()


@pytest.mark.slow
def test_compare_stops_on_sigterm_in_a_run_and_resumes(tmp_path):
  """SIGTERM while the first policy trains (a subprocess): one line naming
  the policy and round, exit 143; the same command ends with the
  uninterrupted comparison's table (host timings aside)."""
  overrides = dict(compare_policies=POLICIES, num_rounds=6, eval_every=1,
                   checkpoint_every=1, pretrain="none",
                   local_test_examples=0)
  workdir, full = tmp_path / "cmp", tmp_path / "full"
  command = ["compare" if a == "run" else a
             for a in cli_args(workdir, **overrides)]
  # The uninterrupted comparison: the same flags, in this process.
  assert main([f"--workdir={full}" if a.startswith("--workdir=") else a
               for a in command[3:]]) == 0
  metrics = workdir / POLICIES[0] / "metrics.jsonl"
  code, err = signal_cli(command, (lambda: metrics.exists() and len(
      metrics.read_text().splitlines()) >= 3, signal.SIGTERM))
  assert code == 143 and "Traceback" not in err, err[-2000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"stopped in policy {POLICIES[0]} (0 of 2 policies "
                         "done) at round "), err[-2000:]
  assert last.endswith("; the same command resumes")
  assert not (workdir / "comparison.csv").exists()
  assert not (workdir / POLICIES[1]).exists()
  done = subprocess.run(command, env=cli_env(), capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]

  def table(root):
    lines = (root / "comparison.csv").read_text().splitlines()
    header = lines[0].split(",")
    host = [header.index(k) for k in ("wall_seconds", "server_seconds")]
    return [[c for i, c in enumerate(line.split(",")) if i not in host]
            for line in lines]
  assert table(workdir) == table(full)
