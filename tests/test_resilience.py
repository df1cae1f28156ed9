"""Crashes and damaged checkpoints: a resumed run ends with the same numbers.

A run killed with SIGKILL (mid-round, mid-checkpoint-write) and restarted,
or one whose newest checkpoints were damaged, must write exactly the
metrics and summary of an uninterrupted run (`wall_seconds` aside).
"""

import collections
import json
import os
import shutil
import signal
import subprocess
import time

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (cli_args, cli_env, host_free_records,
                      host_free_summary, tiny_config)
from fedjax_tl import checkpoint, runner
from fedjax_tl.experiment import workdir as workdir_lib

TMP_SUFFIX = ".orbax-checkpoint-tmp"

def _damage(path, how):
  """Damages one file the way a bad disk or an interrupted copy would."""
  raw = path.read_bytes()
  if how == "delete":
    path.unlink()
  elif how == "truncate":
    path.write_bytes(raw[:len(raw) // 2])
  elif how == "garbage":
    path.write_bytes(np.random.default_rng(0).bytes(max(len(raw), 8)))
  else:  # one flipped bit: orbax itself reads it back without complaint
    data = bytearray(raw)
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _data_files(step_dir):
  """The array chunks of a step (orbax keeps more than one copy of some)."""
  return sorted(p for p in (step_dir / "state").rglob("*")
                if p.is_file() and p.parent.name == "d")


# -- damaged checkpoints: RoundCheckpoints on a small state, no simulation --

def _state(step):
  return {"params": {"w": jnp.arange(200, dtype=jnp.float32) * step,
                     "b": jnp.full((3, 4), step, jnp.float32)},
          "round": jnp.asarray(step, jnp.int32)}


@pytest.mark.parametrize("target,how", [
    ("data", "flip"), ("data", "delete"), ("digest", "edit"),
    ("metadata", "truncate"), ("state", "swap")])
def test_damaged_checkpoints_fall_back_step_by_step(tmp_path, target, how):
  directory = tmp_path / "checkpoints"
  ckpts = checkpoint.RoundCheckpoints(directory, keep=3)
  for step in (1, 2, 3):
    ckpts.save(step, _state(step))
  ckpts.close()
  (tmp_path / "metrics.jsonl").write_text("keep me\n")
  # The two newest steps damaged the same way.
  for step in (3, 2):
    step_dir = directory / str(step)
    if how == "edit":  # valid JSON, another state's digest
      (step_dir / "digest" / "metadata").write_text(json.dumps(
          {"round": step, "sha256": checkpoint.state_digest(_state(1))}))
      continue
    if how == "swap":  # readable arrays, but another step's
      shutil.rmtree(step_dir / "state")
      shutil.copytree(directory / "1" / "state", step_dir / "state")
      continue
    victims = {"data": _data_files(directory / str(step)),
               "digest": [directory / str(step) / "digest" / "metadata"],
               "metadata": [directory / str(step) / "state" / "_METADATA"]}
    for victim in victims[target]:
      _damage(victim, how)
  lines = []
  ckpts = checkpoint.RoundCheckpoints(directory, keep=3)
  state, step = ckpts.restore_latest(_state(0), lines.append)
  assert step == 1
  np.testing.assert_array_equal(state["params"]["w"], np.arange(200))
  np.testing.assert_array_equal(state["params"]["b"], np.ones((3, 4)))
  # One line per bad step, naming it; the bad steps kept aside, not deleted.
  assert len(lines) == 2 and all("\n" not in line for line in lines)
  assert "round 3" in lines[0] and "round 2" in lines[1]
  assert sorted(p.name for p in directory.iterdir()) == [
      "1", "corrupt-2", "corrupt-3"]
  assert (tmp_path / "metrics.jsonl").read_text() == "keep me\n"
  # Saving goes on from the good step.
  ckpts.save(2, _state(2))
  ckpts.close()
  assert checkpoint.RoundCheckpoints(directory, 3).restore(
      2, _state(0))["round"] == 2


def test_no_good_checkpoint_starts_from_round_0(tmp_path):
  directory = tmp_path / "checkpoints"
  ckpts = checkpoint.RoundCheckpoints(directory, keep=2)
  ckpts.save(4, _state(4))
  ckpts.close()
  (directory / "corrupt-4").mkdir()  # the fallback name is taken
  (directory / "corrupt-4" / "note").write_text("an earlier bad step")
  for victim in _data_files(directory / "4"):
    _damage(victim, "garbage")
  lines = []
  state, step = checkpoint.RoundCheckpoints(directory, 2).restore_latest(
      _state(0), lines.append)
  assert state is None and step is None
  assert len(lines) == 2 and "round 4" in lines[0]
  assert lines[1] == "no readable checkpoint left; starting from round 0"
  assert (directory / "corrupt-4" / "note").exists()
  assert (directory / "corrupt-4-2" / "state").is_dir()


# -- resuming restores everything a round reads --

BEHAVE = {  # online intervals (s); periods 100 s and 40 s
    0: {"active": [10, 50], "inactive": [20, 70], "finish_time": 100},
    1: {"active": [0], "inactive": [5], "finish_time": 40},
    2: {"active": [15, 80], "inactive": [60, 99], "finish_time": 100},
}


@pytest.mark.slow
def test_resume_after_damage_under_trace_and_overcommit(tmp_path, capsys):
  """The device clock and over-commitment survive a resume from round 2.

  Trace availability reads the simulated clock (`totals["sim_seconds"]`)
  and over-commitment keeps the first devices to finish, so a state
  restored without them would choose other cohorts.
  """
  behave = tmp_path / "behave.json"
  behave.write_text(json.dumps(BEHAVE))
  capacity = tmp_path / "capacity.json"
  capacity.write_text(json.dumps({
      i: {"computation": 5.0 + 3.7 * i, "communication": 900.0 + 61 * i}
      for i in range(13)}))
  cfg = tiny_config(behave_trace=str(behave), device_trace=str(capacity),
                    overcommit=1.5, checkpoint_every=1, keep_checkpoints=4,
                    eval_every=1, pretrain="none", local_test_examples=0)
  runner.run(cfg, tmp_path / "full", quiet=True)
  expected = host_free_records(tmp_path / "full")
  clock = [r["sim_seconds"] for r in expected]
  assert clock[0] == 0 and all(a < b for a, b in zip(clock, clock[1:]))

  workdir = tmp_path / "damaged"
  runner.run(cfg, workdir, quiet=True)
  for victim in _data_files(workdir / "checkpoints" / "4"):
    _damage(victim, "flip")
  _damage(workdir / "checkpoints" / "3" / "digest" / "metadata", "truncate")
  capsys.readouterr()
  runner.run(cfg, workdir, progress=False)
  log = capsys.readouterr().err.splitlines()
  assert [line for line in log if "checkpoint of round" in line and
          "moved to" in line] == [
              line for line in log if "round 4" in line or "round 3" in line]
  assert sum("round 4" in line for line in log) == 1
  assert sum("round 3" in line for line in log) == 1
  assert "resuming from the checkpoint of round 2" in log
  assert host_free_records(workdir) == expected
  assert host_free_summary(workdir) == host_free_summary(tmp_path / "full")


# -- kill -9 at random moments: a seeded table of trials --

CLI_CONFIG = dict(num_rounds=40, eval_every=1, checkpoint_every=1,
                  keep_checkpoints=2, pretrain="none", local_test_examples=0)
KILLS = 20
# Where a trial aims its SIGKILL: while the run starts (building, compiling,
# restoring: a random delay after it takes the lock), while orbax writes a
# step (its temporary directory present) or between writes (a random delay
# after a step is complete).
MOMENTS = ("start", "write", "between")


def _steps(workdir):
  """The complete checkpoint steps (orbax's temporary directories aside)."""
  checkpoints = workdir / "checkpoints"
  names = os.listdir(checkpoints) if checkpoints.is_dir() else ()
  return sorted(int(n) for n in names if n.isdigit())


def _temporary_steps(workdir):
  """orbax's temporary step directories, as (name, inode): a new write
  of the same step is another directory."""
  checkpoints = workdir / "checkpoints"
  if not checkpoints.is_dir():
    return set()
  return {(e.name, e.inode()) for e in os.scandir(checkpoints)
          if TMP_SUFFIX in e.name}


def _kill_at(workdir, moment, rng):
  """Runs the CLI and SIGKILLs it at `moment` (MOMENTS), aimed 1-3 steps
  past the newest complete one. Returns where the kill hit (from what it
  left: a temporary step directory is a checkpoint write), the newest step
  before the run, its return code and stderr."""
  before = max(_steps(workdir), default=None)
  stale = _temporary_steps(workdir)  # a previous kill's, until cleaned
  target = (before or 0) + int(rng.integers(1, 4))
  delay = float(rng.uniform(0, 2.0) if moment == "start" else
                rng.uniform(0, 0.05))
  checkpoints, lock = workdir / "checkpoints", workdir / workdir_lib.LOCK
  proc = subprocess.Popen(cli_args(workdir, **CLI_CONFIG), env=cli_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)

  def ready():
    if moment == "start":
      return lock.exists() and lock.read_text().strip() == str(proc.pid)
    names = set(os.listdir(checkpoints)) if checkpoints.is_dir() else set()
    done = [int(n) for n in names if n.isdigit()]
    if moment == "write":  # or, missed, any later step complete
      return any(int(n.split(".")[0]) >= target for n, _ in
                 _temporary_steps(workdir) - stale) or any(
                     d > target for d in done)
    return any(d >= target for d in done)

  try:
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not ready():
      time.sleep(0.001)
    time.sleep(delay if moment != "write" else 0)
    assert proc.poll() is None, f"finished first: {proc.stderr.read()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
    proc.wait()
  hit = ("checkpoint write" if _temporary_steps(workdir) - stale else
         "between writes" if max(_steps(workdir), default=-1) > (
             -1 if before is None else before) else
         "starting (building, compiling, restoring)")
  return hit, before, proc.returncode, err


def _check_killed(workdir, before, err, full):
  """What a SIGKILL must leave: no summary, the lock free, every metrics
  line the uninterrupted run's, every complete step of this run's identity
  holding its records; a resume said it started from the newest step."""
  assert not (workdir / "summary.json").exists()
  with workdir_lib.locked(workdir):  # released by the kernel
    pass
  expected = host_free_records(full)
  if (workdir / "metrics.jsonl").exists():
    records = host_free_records(workdir)
    assert records == expected[:len(records)]
  identity = _checkpoint_meta(full, max(_steps(full)))["identity"]
  steps = _steps(workdir)
  for step in steps:
    if not (workdir / "checkpoints" / str(step) / "digest" /
            "metadata").exists():
      # An old step orbax's garbage collection was deleting: never the
      # newest, and the restore never reads it.
      assert step < steps[-1], steps
      continue
    meta = _checkpoint_meta(workdir, step)
    assert meta["identity"] == identity, step
    assert meta["history"]["records"] == step + 1, step
  assert "Traceback" not in err and "corrupt" not in err, err[-2000:]
  resumed = [line for line in err.splitlines()
             if line.startswith("resuming from the checkpoint of round")]
  if before is not None and resumed:
    assert resumed == [f"resuming from the checkpoint of round {before}"]


def _checkpoint_meta(workdir, step):
  return json.loads((workdir / "checkpoints" / str(step) / "digest" /
                     "metadata").read_text())


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_equals_uninterrupted(tmp_path):
  """KILLS seeded SIGKILLs, one a process, chained on one workdir: each run
  resumes what the one before left and is killed in turn, so each trial is
  one process start (what CI can afford), and every resume is checked. The
  last run, let finish, ends with the uninterrupted run's numbers."""
  full = tmp_path / "full"
  runner.run(tiny_config(**CLI_CONFIG), full, quiet=True)
  rng = np.random.default_rng(20)
  workdir, hits = tmp_path / "killed", collections.Counter()
  for trial in range(KILLS):
    moment = MOMENTS[int(rng.choice(3, p=(0.25, 0.45, 0.3)))]
    hit, before, code, err = _kill_at(workdir, moment, rng)
    assert code == -signal.SIGKILL, (trial, err[-2000:])
    _check_killed(workdir, before, err, full)
    hits[hit] += 1
    print(f"kill {trial}: aimed at {moment}, hit {hit}", flush=True)
  print(f"{KILLS} kills: {dict(hits)}")
  assert hits["checkpoint write"] >= 5 and len(hits) == 3, hits
  last = max(_steps(workdir))
  proc = subprocess.run(cli_args(workdir, **CLI_CONFIG), env=cli_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"resuming from the checkpoint of round {last}" in proc.stderr
  assert json.loads((workdir / "config.json").read_text()) == json.loads(
      (full / "config.json").read_text())
  assert host_free_records(workdir) == host_free_records(full)
  assert host_free_summary(workdir) == host_free_summary(full)
  assert not any(TMP_SUFFIX in n for n in os.listdir(workdir / "checkpoints"))
  assert not [p.name for p in workdir.iterdir() if p.name.endswith(".tmp")]
