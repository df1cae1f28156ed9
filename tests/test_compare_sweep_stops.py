"""`fedjax-tl compare` and `sweep` trusted like a run (issue 20): clean stops
on SIGINT / SIGTERM (one line, exit 130 / 143, the same command resumes),
kill -9 at seeded moments (the same command ends as an uninterrupted one),
a full disk at each file they write (one line, exit 1, no partial file)
and one owner of the comparison's directory. Each case asserts on the
directory's content as well as on the exit code."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess

import numpy as np
import pytest

from conftest import (cli_args, cli_env, disk_full_in_events,
                      disk_full_writing, host_free_records,
                      host_free_summary, host_free_table, partial_files,
                      paused_writing, signal_cli, snapshot, tiny_config_dict,
                      writing)
from fedjax_tl import sweep as sweep_lib
from fedjax_tl.cli import main
from fedjax_tl.experiment import compare as compare_lib
from fedjax_tl.experiment import workdir as workdir_lib

POLICIES = ("heterofl", "fjord")


def _argv(command, workdir, **overrides):
  """The CLI's `command` on the tiny config, every key a flag."""
  return [command, *cli_args(workdir, **overrides)[4:]]


def _cli(command, workdir, **overrides):
  """`_argv` as a `python -m fedjax_tl` command line (a subprocess)."""
  return [*cli_args(workdir, **overrides)[:3],
          *_argv(command, workdir, **overrides)]


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


def _fake_setting(rows_per_setting):
  """sweep's `_sweep_setting` without training: it opens the workdir and
  returns made-up rows."""
  def setting(cfg, workdir, replace, open_workdir, progress, log, stop):
    del workdir, replace, progress, log, stop
    open_workdir()
    return [{"seed": s, "accuracy": cfg.alpha, "worst_tier_accuracy": 0.1}
            for s in range(rows_per_setting)]
  return setting


def _fake(command, workdir, monkeypatch):
  """`command` in `workdir` without training: compare's runs and sweep's
  settings made up (`_fake_run`, `_fake_setting`); returns its argv."""
  if command == "compare":
    monkeypatch.setattr(compare_lib, "run", _fake_run())
    return _argv(command, workdir, compare_policies=POLICIES)
  monkeypatch.setattr(sweep_lib, "_sweep_setting", _fake_setting(2))
  return _argv(command, workdir, sweep_alpha=(0.3, 3.0))


def _without_events(snap):
  """A `snapshot` without the TensorBoard event files (named by the time
  they were opened)."""
  return {k: v for k, v in snap.items() if "tfevents" not in k}


# Each file compare and sweep write themselves (a run's own files: see
# tests/test_workdir_trust.py), and the fault that fails its write.
WRITE_SITES = [
    ("compare", "comparison.csv"), ("compare", "comparison_tiers.csv"),
    ("compare", "comparison.md"), ("sweep", "groups/alpha-3.0.json"),
    ("sweep", "sweep.csv"), ("sweep", "sweep.md"),
    ("sweep", "tensorboard/alpha-0.3/seed-0")]


@pytest.mark.parametrize("command,target", WRITE_SITES)
def test_disk_full_at_each_write_site(command, target, tmp_path, capsys,
                                      monkeypatch):
  """ENOSPC writing one of the files of a finished compare / sweep (a
  setting's groups/ file removed first, so its setting runs again): one
  line naming the file, exit 1, nothing partial, every other file as it
  was; the same command, the disk freed, writes it again."""
  workdir = tmp_path / command
  argv = _fake(command, workdir, monkeypatch)
  assert main(argv) == 0
  finished = snapshot(workdir)
  if target.startswith("groups/"):
    (workdir / target).unlink()  # its setting is rerun
  before = snapshot(workdir)
  fdopen = os.fdopen
  events = target.startswith("tensorboard/")
  if events:  # write_sweep's rows are written at the rounds run
    disk_full_in_events(tiny_config_dict().num_rounds)(monkeypatch)
  else:
    disk_full_writing(pathlib.Path(target).name)(monkeypatch)
  capsys.readouterr()
  code = main(argv)
  line = _one_error(capsys.readouterr().err)
  assert code == 1
  what = "TensorBoard events" if events else pathlib.Path(target).name
  assert line.startswith(f"error: disk full writing {workdir / target}"), line
  assert line.endswith(f" ({what}); nothing partial was left; free space "
                       "and rerun to resume"), line
  after = snapshot(workdir)
  assert not partial_files(workdir)
  if events:  # the failed event file removed, the tables written before
    assert not list((workdir / target).iterdir())
    before = {k: v for k, v in before.items() if not k.startswith(target)}
    after = {k: v for k, v in after.items() if not k.startswith(target)}
  assert after == before
  monkeypatch.undo()
  _fake(command, workdir, monkeypatch)
  assert os.fdopen is fdopen
  assert main(argv) == 0
  assert _without_events(snapshot(workdir)) == _without_events(finished)


# The real (trained) compare and sweep of the slow tests: tiny (a process
# is mostly importing JAX and building), metrics.jsonl only (TensorBoard's
# import would cost each process another second or so).
CONFIGS = {
    "compare": dict(compare_policies=POLICIES, num_rounds=6, eval_every=1,
                    checkpoint_every=1, pretrain="none", num_clients=20,
                    clients_per_round=4, local_test_examples=0,
                    writers="jsonl"),
    "sweep": dict(num_rounds=2, pretrain_steps=5, num_clients=20,
                  clients_per_round=4, sweep_alpha=(0.3, 3.0),
                  sweep_seeds=(0,), writers="jsonl")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """`uninterrupted(command)`: the directory of `command` of CONFIGS run
  to the end in this process, once per module (the slow tests share it)."""
  done = {}

  def get(command):
    if command not in done:
      workdir = tmp_path_factory.mktemp(command) / "full"
      assert main(_argv(command, workdir, **CONFIGS[command])) == 0
      done[command] = workdir
    return done[command]
  return get


@pytest.mark.slow
def test_sweep_stops_on_sigint_and_resumes_to_the_same_tables(
    uninterrupted, tmp_path, capsys, monkeypatch):
  """SIGINT in the second setting's rounds: one line, exit 130, the first
  setting saved, no table; the same command reruns only the second and
  writes the uninterrupted sweep's tables."""
  full = uninterrupted("sweep")
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
  code = main(_argv("sweep", workdir, **CONFIGS["sweep"]))
  line = _one_error(capsys.readouterr().err)
  assert code == 130 and len(calls) == 3
  assert line == ("stopped in sweep setting alpha-3.0 (1 of 2 settings "
                  "saved; this one is rerun); the same command resumes")
  assert [p.name for p in (workdir / "groups").iterdir()] == [
      "alpha-0.3.json"]
  assert not (workdir / "sweep.csv").exists() and not partial_files(workdir)
  assert (workdir / workdir_lib.LOCK).read_text() == ""
  monkeypatch.setattr(RunsAxis, "round_runs", round_runs)
  assert main(_argv("sweep", workdir, **CONFIGS["sweep"])) == 0
  assert (workdir / "groups" / "alpha-0.3.json").read_bytes() == (
      full / "groups" / "alpha-0.3.json").read_bytes()
  for name in ("sweep.csv", "sweep.md"):
    assert (workdir / name).read_bytes() == (full / name).read_bytes()


@pytest.mark.slow
def test_compare_stops_on_sigterm_in_a_run_and_resumes(uninterrupted,
                                                       tmp_path):
  """SIGTERM while the first policy trains (a subprocess): one line naming
  the policy and round, exit 143; the same command ends with the
  uninterrupted comparison's table (host timings aside)."""
  workdir, full = tmp_path / "cmp", uninterrupted("compare")
  command = _cli("compare", workdir, **CONFIGS["compare"])
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
  for name in compare_lib.TABLES:
    assert host_free_table(workdir / name) == host_free_table(full / name)


# -- kill -9 of compare and sweep themselves: a seeded chain of trials --

# What each command writes itself, compared with the uninterrupted one's
# (compare's host timings aside; sweep's byte for byte).
KILL_OUTPUTS = {"compare": compare_lib.TABLES,
                "sweep": ("groups/alpha-0.3.json", "groups/alpha-3.0.json",
                          "sweep.csv", "sweep.md")}
# The moments of a chain's trials, in order (each resumes what the one
# before left): a seeded delay after the command takes its lock (building,
# pretraining, compiling); a seeded delay after some work is saved (a
# policy's n-th metrics record; sweep's pretrained model or first setting);
# mid-write of one of its own files, chosen by the seed.
KILL_MOMENTS = ("start", "work", "write")


def _kill_trial(command, workdir, moment, rng):
  """Runs `command` (the CLI, resuming what is in `workdir`) and SIGKILLs
  it at `moment`; returns what it aimed at and its stderr."""
  cli = _cli(command, workdir, **CONFIGS[command])
  lock = workdir / workdir_lib.LOCK
  stale = lock.read_text() if lock.exists() else ""  # a killed holder's pid
  delay, ready = 0.0, None
  if moment == "start":
    delay = float(rng.uniform(0, 1.5))  # all a fast machine's start takes
    ready = lambda: lock.exists() and lock.read_text() not in ("", stale)
    aim = f"{delay:.2f} s after taking the lock"
  elif moment == "work" and command == "compare":
    policy = POLICIES[int(rng.integers(len(POLICIES)))]
    records = int(rng.integers(1, CONFIGS[command]["num_rounds"] + 2))
    delay = float(rng.uniform(0, 0.05))
    metrics = workdir / policy / "metrics.jsonl"
    ready = lambda: metrics.exists() and len(
        metrics.read_text().splitlines()) >= records
    aim = f"{delay:.3f} s after {policy}'s record {records - 1}"
  elif moment == "work":
    anchor = ("pretrained", "groups/alpha-0.3.json")[int(rng.integers(2))]
    delay = float(rng.uniform(0, 0.5))
    ready = lambda: (workdir / anchor).exists()
    aim = f"{delay:.2f} s after {anchor} was saved"
  else:  # mid-write of a file not yet complete (or a table, rewritten)
    names = [n for n in KILL_OUTPUTS[command] if not n.startswith(
        "groups/") or not (workdir / n).exists()]
    name = names[int(rng.integers(len(names)))]
    cli = paused_writing(cli, pathlib.Path(name).name)
    ready = lambda: writing(workdir / name)
    aim = f"writing {name}"
  code, err = signal_cli(cli, (ready, signal.SIGKILL), delay=delay)
  assert code == -signal.SIGKILL, err[-2000:]
  return aim, err


def _same_outputs(command, workdir, full, complete=False):
  """Each file `command` wrote in `workdir` (all of them if `complete`)
  equals the uninterrupted one's; so does every finished policy run."""
  for name in KILL_OUTPUTS[command]:
    if not complete and not (workdir / name).exists():
      continue
    if command == "compare":
      assert host_free_table(workdir / name) == host_free_table(full / name)
    else:
      assert (workdir / name).read_bytes() == (full / name).read_bytes()
  for policy in POLICIES if command == "compare" else ():
    run_dir = workdir / policy
    if complete or (run_dir / "metrics.jsonl").exists():
      records = host_free_records(run_dir)
      expected = host_free_records(full / policy)
      assert records == (expected if complete else expected[:len(records)])
    if complete or (run_dir / "summary.json").exists():
      assert host_free_summary(run_dir) == host_free_summary(full / policy)


def _locks_free(workdir):
  """The kernel released every lock the killed process held: the
  command's and its runs'."""
  for lock in workdir.rglob(workdir_lib.LOCK):
    with workdir_lib.locked(lock.parent):
      pass


@pytest.mark.slow
@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_kill_9_then_the_same_command_ends_as_uninterrupted(
    command, uninterrupted, tmp_path):
  """SIGKILL of `compare` / `sweep` at seeded moments (KILL_MOMENTS), one
  process each, chained on one directory. After each kill: every lock
  free, no file of the command's partial (each one present is the
  uninterrupted command's), no traceback. Then the same command ends with
  the uninterrupted command's tables and nothing partial left (the killed
  writes' temporary files removed)."""
  full, workdir = uninterrupted(command), tmp_path / "killed"
  rng = np.random.default_rng(21 if command == "compare" else 22)
  for trial, moment in enumerate(KILL_MOMENTS):
    aim, err = _kill_trial(command, workdir, moment, rng)
    print(f"{command} kill {trial}: {aim}; left "
          f"{partial_files(workdir) or 'nothing partial'}", flush=True)
    assert "Traceback" not in err, err[-2000:]
    _locks_free(workdir)
    _same_outputs(command, workdir, full)
  done = subprocess.run(_cli(command, workdir, **CONFIGS[command]),
                        env=cli_env(), capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  _same_outputs(command, workdir, full, complete=True)
  assert not partial_files(workdir), partial_files(workdir)
  _locks_free(workdir)
