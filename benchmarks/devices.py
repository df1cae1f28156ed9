"""Rounds per second on 1 and on 8 forced CPU devices (a `clients` mesh).

Each device count runs in its own subprocess (XLA's forced host device count
is fixed when jax starts) on the same config, chunk size included (a multiple
of 8): the runner's experiment with `num_devices` set, rounds from the
model's initial params (no pretraining). Each worker compiles with one
round, then times `--repeats` runs of `--rounds` consecutive rounds and
reports the best. The last line is `ratio: X`, 8-device over 1-device rounds
per second.

Forced CPU devices share the machine's cores, so on a 2-core machine expect a
ratio near 1 or below: there this is a demonstration that the sharded program
runs and agrees, not a speed-up; real devices (GPUs, hosts) are what it is for.

  python benchmarks/devices.py
  python benchmarks/devices.py --clients-per-round 128 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEVICE_COUNTS = (1, 8)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num-clients", type=int, default=500)
  p.add_argument("--clients-per-round", type=int, default=64)
  p.add_argument("--chunk-size", type=int, default=16,
                 help="clients vmapped together (a multiple of 8)")
  p.add_argument("--policy", default="heterofl")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--worker", type=int, default=None,
                 help=argparse.SUPPRESS)  # internal: run on this many devices
  return p.parse_args(argv)


def worker(args: argparse.Namespace) -> dict[str, float]:
  """Times rounds in this process on `args.worker` devices."""
  import jax

  from fedjax_tl import config as config_lib
  from fedjax_tl.runner import build_experiment
  cfg = config_lib.default_config()
  cfg.num_clients = args.num_clients
  cfg.clients_per_round = args.clients_per_round
  cfg.chunk_size = args.chunk_size
  cfg.policy = args.policy
  cfg.num_devices = args.worker
  sim = build_experiment(config_lib.validate(cfg)).simulation
  state = sim.init(sim.model.init_params)
  jax.block_until_ready(sim.round(state))  # compile
  best = float("inf")
  for _ in range(args.repeats):
    start = time.perf_counter()
    s = state
    for _ in range(args.rounds):
      s, _ = sim.round(s)
    jax.block_until_ready(s)
    best = min(best, time.perf_counter() - start)
  return {"devices": jax.device_count(),
          "rounds_per_second": args.rounds / best}


def measure(num_devices: int, argv: list[str] | None = None
            ) -> dict[str, float]:
  """Rounds per second on `num_devices` forced CPU devices (a subprocess)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
  proc = subprocess.run(
      [sys.executable, __file__, *(argv or []), f"--worker={num_devices}"],
      env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{num_devices}-device worker failed:\n{proc.stderr}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> float:
  args = parse_args(argv)
  if args.worker is not None:
    print(json.dumps(worker(args)))
    return 0.0
  argv = sys.argv[1:] if argv is None else argv
  rates = {}
  for n in DEVICE_COUNTS:
    result = measure(n, argv)
    rates[n] = result["rounds_per_second"]
    print(f"{n} device(s): {rates[n]:.2f} rounds/s", flush=True)
  print(f"cpu cores: {os.cpu_count()}; config: {args.num_clients} clients, "
        f"{args.clients_per_round} per round, chunk {args.chunk_size}, "
        f"policy {args.policy}")
  ratio = rates[8] / rates[1]
  print(f"ratio: {ratio:.2f}")
  return ratio


if __name__ == "__main__":
  main()
