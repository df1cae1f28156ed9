"""Injects crashes and checkpoint damage many times; prints the README table.

kill: runs `python -m fedjax_tl run` on a small config, SIGKILLs it at a
random round, either while orbax writes that round's checkpoint or just
after, reruns the same command and compares metrics.jsonl and summary.json
with an uninterrupted run (host-dependent fields such as wall_seconds
aside). damage: saves three round checkpoints of a small state, damages one
random file of the newest (delete, truncate, garbage, one flipped bit) and
restores: the outcome is the step restored and whether its values are the
ones saved. signal: sends SIGINT or SIGTERM at a uniformly random moment of
an uninterrupted run's wall time (imports, pretraining, compilation, rounds,
checkpoint writes), half the trials a second SIGINT 0-0.5 s later; the stop
must print one line and no traceback, exit 130 / 143 (or 0 if the run
finished first), and the same command must then end with the uninterrupted
run's numbers.

  python benchmarks/fault_trials.py --kills 10 --damages 200 --signals 20
  python benchmarks/fault_trials.py --kills 0 --damages 0 --signals 20 \
      --signal-within 3   # the start: importing jax, reading the config
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import jax.numpy as jnp
import numpy as np

from fedjax_tl import checkpoint

TMP_SUFFIX = ".orbax-checkpoint-tmp"
HOST_FIELDS = ("wall_seconds", "free_bytes", "data_placement_reason")
CONFIG = dict(num_clients=60, clients_per_round=12, hidden=(16, 8),
              num_rounds=12, local_steps=3, batch_size=5, pretrain_steps=30,
              eval_every=1, checkpoint_every=1, keep_checkpoints=2,
              chunk_size=4)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--kills", type=int, default=10)
  p.add_argument("--damages", type=int, default=200)
  p.add_argument("--signals", type=int, default=0)
  p.add_argument("--signal-within", type=float, default=None,
                 help="send the signals within this many seconds of the "
                      "start (e.g. 3: importing jax, reading the config); "
                      "default: the uninterrupted run's wall time")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def _command(workdir: pathlib.Path) -> list[str]:
  return [sys.executable, "-m", "fedjax_tl", "run", f"--workdir={workdir}",
          "--no-progress",
          *(f"--config.{k}={v}" for k, v in CONFIG.items())]


def _outputs(workdir: pathlib.Path) -> tuple[list, dict]:
  def strip(record):
    return {k: v for k, v in record.items() if k not in HOST_FIELDS}
  records = [strip(json.loads(line)) for line in
             (workdir / "metrics.jsonl").read_text().splitlines()]
  return records, strip(json.loads((workdir / "summary.json").read_text()))


def kill_trial(workdir: pathlib.Path, rng: np.random.Generator,
               expected: tuple[list, dict]) -> tuple[str, bool]:
  """One SIGKILL and rerun; returns (where it hit, outputs identical)."""
  step = int(rng.integers(1, CONFIG["num_rounds"]))
  during_write = bool(rng.integers(2))
  target = f"{step}{TMP_SUFFIX}" if during_write else str(step)
  proc = subprocess.Popen(_command(workdir), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  checkpoints = workdir / "checkpoints"
  while proc.poll() is None:
    names = set(os.listdir(checkpoints)) if checkpoints.is_dir() else set()
    # The temporary directory can come and go between two polls; a later
    # step's then stands in for it.
    if target in names or any(n.split(".")[0].isdigit() and
                              int(n.split(".")[0]) > step for n in names):
      if not during_write:
        time.sleep(rng.uniform(0, 0.02))
      os.kill(proc.pid, signal.SIGKILL)
      break
    time.sleep(0.001)
  proc.wait()
  left = os.listdir(checkpoints) if checkpoints.is_dir() else []
  hit = ("finished before the kill" if proc.returncode == 0 else
         "checkpoint write" if any(n.endswith(TMP_SUFFIX) for n in left)
         else "round (between writes)")
  subprocess.run(_command(workdir), check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  return hit, _outputs(workdir) == expected


def signal_trial(workdir: pathlib.Path, rng: np.random.Generator,
                 expected: tuple[list, dict], span: float) -> tuple[str, bool]:
  """One SIGINT / SIGTERM (maybe a second SIGINT) at a random moment of
  `span` seconds, then the same command; returns (what the stop printed or
  what went wrong, outputs identical after the rerun)."""
  signum = (signal.SIGINT, signal.SIGTERM)[int(rng.integers(2))]
  delay = float(rng.uniform(0, span))
  second = float(rng.uniform(0, 0.5)) if rng.integers(2) else None
  proc = subprocess.Popen(_command(workdir), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  time.sleep(delay)
  if proc.poll() is None:
    proc.send_signal(signum)
    if second is not None:
      time.sleep(second)
      if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
  err = proc.communicate()[1]
  lines = [l for l in err.splitlines() if l.startswith("stopped")]
  code = proc.returncode
  twice = second is not None and "twice" in err
  if code == 0:
    hit = "finished before the signal"
  elif "Traceback" in err or code not in (130, 143) or len(lines) != 1:
    hit = f"BAD STOP (exit {code}): {err.strip().splitlines()[-1:]}"
  else:
    where = lines[0].split(";")[0].removeprefix("stopped ")
    where = ("before the run started" if where.startswith("by ") else
             next((w for w in ("before the run started", "before any round")
                   if w in where), "at a round boundary"))
    hit = f"exit {code}, one line, {where}{', signalled twice' if twice else ''}"
  subprocess.run(_command(workdir), check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  return hit, _outputs(workdir) == expected


def _state(step: int) -> dict:
  return {"w": jnp.arange(500, dtype=jnp.float32) * step,
          "b": jnp.full((4, 8), step, jnp.float32),
          "round": jnp.asarray(step, jnp.int32)}


def damage_trial(directory: pathlib.Path, rng: np.random.Generator) -> str:
  """Damages one file of the newest of 3 steps; describes the restore."""
  ckpts = checkpoint.RoundCheckpoints(directory, keep=3)
  for step in (1, 2, 3):
    ckpts.save(step, _state(step))
  ckpts.close()
  files = sorted(p for p in (directory / "3").rglob("*") if p.is_file())
  victim = files[int(rng.integers(len(files)))]
  raw = victim.read_bytes()
  how = ("delete", "truncate", "garbage", "flip")[int(rng.integers(4))]
  if how == "delete":
    victim.unlink()
  elif how == "truncate":
    victim.write_bytes(raw[:int(rng.integers(len(raw)))])
  elif how == "garbage":
    victim.write_bytes(rng.bytes(len(raw)))
  else:
    data = bytearray(raw)
    data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    victim.write_bytes(bytes(data))
  lines = []
  state, step = checkpoint.RoundCheckpoints(directory, 3).restore_latest(
      _state(0), lines.append)
  exact = step is not None and all(
      np.array_equal(a, b) for a, b in zip(
          (state["w"], state["b"], state["round"]),
          _state(step).values()))
  if not exact:
    return "WRONG VALUES RESTORED"
  if step == 3:
    return "harmless (step 3 restored intact, digest matches)"
  return f"detected in {len(lines)} log line(s), fell back to step {step}"


def main(argv=None) -> None:
  args = parse_args(argv)
  rng = np.random.default_rng(args.seed)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    if args.kills or args.signals:
      start = time.perf_counter()
      subprocess.run(_command(tmp / "reference"), check=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      span = time.perf_counter() - start
      expected = _outputs(tmp / "reference")
    if args.kills:
      outcomes = collections.Counter()
      for i in range(args.kills):
        hit, same = kill_trial(tmp / f"kill{i}", rng, expected)
        outcomes[f"hit {hit}: {'identical' if same else 'DIFFERENT'}"] += 1
        print(f"kill {i}: {hit}, {'identical' if same else 'DIFFERENT'}",
              file=sys.stderr, flush=True)
      rows.append(("SIGKILL at a random round, rerun the same command",
                   args.kills, outcomes))
    if args.signals:
      outcomes = collections.Counter()
      for i in range(args.signals):
        hit, same = signal_trial(tmp / f"signal{i}", rng, expected,
                                 args.signal_within or span)
        outcomes[f"{hit}: {'identical' if same else 'DIFFERENT'}"] += 1
        print(f"signal {i}: {hit}, {'identical' if same else 'DIFFERENT'}",
              file=sys.stderr, flush=True)
      within = (f"in the first {args.signal_within:g} s" if
                args.signal_within else "at a random moment")
      rows.append((f"SIGINT or SIGTERM {within} (half with a second "
                   "SIGINT), rerun the same command", args.signals, outcomes))
    if args.damages:
      outcomes = collections.Counter(
          damage_trial(tmp / f"damage{i}", rng) for i in range(args.damages))
      rows.append(("one random file of the newest checkpoint deleted, "
                   "truncated, overwritten or one bit flipped", args.damages,
                   outcomes))
  print("| fault injected | trials | outcome |")
  print("| --- | --- | --- |")
  for fault, trials, outcomes in rows:
    print(f"| {fault} | {trials} | " + "; ".join(
        f"{n} {what}" for what, n in sorted(outcomes.items())) + " |")


if __name__ == "__main__":
  main()
