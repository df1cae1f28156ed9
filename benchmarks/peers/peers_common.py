"""The peer benchmarks' shared workloads, synthetic data, timing and report.

Imported by every benchmark script here, each in its own virtual environment,
so it needs nothing but the standard library and numpy.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
  """A synthetic FedAvg workload, the same for every peer.

  Attributes:
    name: `mlp` or `cnn`.
    num_clients: clients in the population.
    examples: examples per client (all clients hold the same number).
    input_shape: one example's shape (channels last).
    num_classes: labels.
    batch_size: examples per local step.
    epochs: local epochs (so `local_steps = epochs * examples / batch_size`).
    client_lr: client SGD learning rate.
    server_lr: server SGD learning rate (1 = plain FedAvg).
    cohorts: the clients-per-round settings measured.
  """
  name: str
  num_clients: int
  examples: int
  input_shape: tuple[int, ...]
  num_classes: int
  batch_size: int
  epochs: int
  client_lr: float
  server_lr: float
  cohorts: tuple[int, ...]

  @property
  def local_steps(self) -> int:
    return self.epochs * self.examples // self.batch_size


WORKLOADS = {
    # Linear(64,128) + ReLU + Linear(128,10).
    "mlp": Workload("mlp", 1000, 50, (64,), 10, 10, 1, 0.1, 1.0, (100, 1000)),
    # pfl-research's CIFAR-10 benchmark setting with its `simple_cnn`.
    "cnn": Workload("cnn", 1000, 50, (32, 32, 3), 10, 10, 1, 0.1, 1.0, (50,)),
}

# The pfl `simple_cnn` layer sizes every peer builds.
CNN_CONV = (32, 64)        # 3x3 valid convolutions
CNN_DENSE = 128
CNN_DROPOUT = (0.25, 0.5)  # after the max-pool, after the dense layer
CNN_FLAT = 14 * 14 * 64    # 32 -> 30 -> 28 -> pool 14: 12,544 features


def client_data(workload: Workload, cid: int, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
  """Client `cid`'s examples `(x[examples, *input_shape] float32,
  y[examples] int32)`, a pure function of `(seed, cid)` so that peers making
  data per client (Flower) and peers holding it all agree."""
  rng = np.random.default_rng([seed, cid])
  x = rng.standard_normal((workload.examples, *workload.input_shape),
                          dtype=np.float32)
  y = rng.integers(0, workload.num_classes, workload.examples, dtype=np.int32)
  return x, y


def all_client_data(workload: Workload, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Every client's data stacked: `x[clients, examples, ...]`, `y[clients,
  examples]`."""
  xs, ys = zip(*(client_data(workload, c, seed)
                 for c in range(workload.num_clients)))
  return np.stack(xs), np.stack(ys)


def parse_args(description: str, argv=None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
  """The options every benchmark script takes (plus `extra(parser)`'s)."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--workload", choices=sorted(WORKLOADS), default="mlp")
  p.add_argument("--clients-per-round", type=int, default=None,
                 help="default: the workload's first setting")
  p.add_argument("--rounds", type=int, default=5,
                 help="timed rounds, after the warm-up rounds")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed rounds first (compilation, caches, actors)")
  p.add_argument("--quick", action="store_true",
                 help="2 timed rounds (a smoke run; noisier figures)")
  p.add_argument("--seed", type=int, default=0)
  if extra is not None:
    extra(p)
  args = p.parse_args(argv)
  if args.quick:
    args.rounds = min(args.rounds, 2)
  workload = WORKLOADS[args.workload]
  if args.clients_per_round is None:
    args.clients_per_round = workload.cohorts[0]
  if not 1 <= args.clients_per_round <= workload.num_clients:
    p.error(f"--clients-per-round={args.clients_per_round} must be in "
            f"[1, {workload.num_clients}]")
  if args.rounds < 1 or args.warmup < 0:
    p.error(f"--rounds={args.rounds} must be >= 1 and --warmup={args.warmup} "
            ">= 0")
  return args


def time_rounds(run_round: Callable[[int], Any], warmup: int, rounds: int
                ) -> list[float]:
  """Runs `warmup` untimed then `rounds` timed rounds; `run_round(i)` must
  return only when round `i` has finished. Returns the timed rounds'
  seconds."""
  for r in range(warmup):
    start = time.perf_counter()
    run_round(r)
    print(f"  warm-up round {r}: {time.perf_counter() - start:.2f}s",
          file=sys.stderr, flush=True)
  seconds = []
  for r in range(warmup, warmup + rounds):
    start = time.perf_counter()
    run_round(r)
    seconds.append(time.perf_counter() - start)
    print(f"  round {r}: {seconds[-1]:.3f}s", file=sys.stderr, flush=True)
  return seconds


def package_versions(*names: str) -> dict[str, str]:
  """Installed versions of the named distributions (None if absent)."""
  out = {}
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def report(peer: str, args: argparse.Namespace, seconds: list[float],
           packages: tuple[str, ...], **extra: Any) -> dict[str, Any]:
  """Prints the result as one JSON line (the last line of stdout), with the
  installed versions of `packages`.

  `steps_per_second` is clients per round x local steps over the mean timed
  round; `best_steps_per_second` uses the fastest round.
  """
  workload = WORKLOADS[args.workload]
  steps = args.clients_per_round * workload.local_steps
  result = {
      "peer": peer, "workload": workload.name,
      "clients_per_round": args.clients_per_round,
      "local_steps": workload.local_steps, "rounds": len(seconds),
      "round_seconds": seconds,
      "steps_per_second": steps * len(seconds) / sum(seconds),
      "best_steps_per_second": steps / min(seconds),
      "median_round_seconds": statistics.median(seconds),
      "versions": {"python": platform.python_version(),
                   **package_versions(*packages)},
      **extra}
  print(json.dumps(result), flush=True)
  return result
