"""Crashes and damaged checkpoints: a resumed run ends with the same numbers.

A run killed with SIGKILL (mid-round, mid-checkpoint-write) and restarted,
or one whose newest checkpoints were damaged, must write exactly the
metrics and summary of an uninterrupted run (`wall_seconds` aside).
"""

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import time

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cli_args, cli_env, tiny_config
from fedjax_tl import checkpoint, runner

TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Summary and metrics fields that describe the host, not the experiment.
HOST_FIELDS = ("wall_seconds", "free_bytes", "data_placement_reason")


def _records(workdir):
  records = [json.loads(line) for line in
             (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k not in HOST_FIELDS}
          for r in records]


def _summary(workdir):
  summary = json.loads((workdir / "summary.json").read_text())
  return {k: v for k, v in summary.items() if k not in HOST_FIELDS}


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
  expected = _records(tmp_path / "full")
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
  assert _records(workdir) == expected
  assert _summary(workdir) == _summary(tmp_path / "full")


# -- kill -9 --

CLI_CONFIG = dict(num_rounds=12, eval_every=1, checkpoint_every=1,
                  keep_checkpoints=2, pretrain="none", local_test_examples=0)


def _kill_when(workdir, ready, delay):
  """Runs the CLI, SIGKILLs it `delay` s after `ready(entries)` holds.

  `entries` are the names in `workdir/checkpoints`. Returns the names there
  right after the kill.
  """
  checkpoints = workdir / "checkpoints"
  proc = subprocess.Popen(cli_args(workdir, **CLI_CONFIG), env=cli_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 300
  try:
    while proc.poll() is None and time.monotonic() < deadline:
      if checkpoints.is_dir() and ready(set(os.listdir(checkpoints))):
        time.sleep(delay)
        break
      time.sleep(0.001)
    assert proc.poll() is None, ("finished before the kill: "
                                 f"{proc.stderr.read().decode()[-500:]}")
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
    proc.stderr.close()
  return set(os.listdir(checkpoints))


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_equals_uninterrupted(tmp_path):
  rng = np.random.default_rng(6)
  workdir = tmp_path / "killed"
  # During a checkpoint write: as soon as orbax's temporary directory of a
  # step from 2 to 5 appears (a write takes tens of milliseconds). The
  # uninterrupted run goes on meanwhile, in this process.
  first = int(rng.integers(2, 6))
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    killed = pool.submit(_kill_when, workdir, lambda names: any(
        n.endswith(TMP_SUFFIX) and int(n.split(".")[0]) >= first
        for n in names), delay=float(rng.uniform(0, 0.002)))
    runner.run(tiny_config(**CLI_CONFIG), tmp_path / "full", quiet=True)
    left = killed.result()
  assert any(n.endswith(TMP_SUFFIX) for n in left), left
  # During a round: right after a later step's checkpoint is complete.
  second = int(rng.integers(first + 2, 10))
  _kill_when(workdir, lambda names: str(second) in names,
             delay=float(rng.uniform(0, 0.02)))
  assert not (workdir / "summary.json").exists()
  # The same command again, to the end.
  proc = subprocess.run(cli_args(workdir, **CLI_CONFIG), env=cli_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "resuming from the checkpoint of round" in proc.stderr
  assert json.loads((workdir / "config.json").read_text()) == json.loads(
      (tmp_path / "full" / "config.json").read_text())
  assert _records(workdir) == _records(tmp_path / "full")
  assert _summary(workdir) == _summary(tmp_path / "full")
  assert not any(n.endswith(TMP_SUFFIX)
                 for n in os.listdir(workdir / "checkpoints"))
