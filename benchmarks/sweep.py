"""A sweep of 8 client learning rates x 4 seeds: one vmapped program vs 32 runs.

Both in one process, on the default experiment (`config.default_config()`,
pretraining off: the starting model does not change the cost), from the same
starting state, `--rounds` rounds each:

  (a) vectorized: the 32 runs as one program, `Simulation.round_runs` over a
      leading runs axis of (ServerState, Hparams);
  (b) sequential: the 32 runs one after another, each round the same
      compiled single-run program (`Simulation.round_with`) reused for all.

Compilation (warm-up) is excluded from both: each path runs one round first.
The final params of every run are checked to agree between the two. The last
line is `ratio: X`, the sequential time over the vectorized one.

  python benchmarks/sweep.py
  python benchmarks/sweep.py --rounds 3 --set clients_per_round=50
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from fedjax_tl.runner import build_experiment
from fedjax_tl.simulation import run_slice, stack_runs
import round_throughput


def parse_args(argv=None) -> argparse.Namespace:
  p = round_throughput.workload_parser(__doc__)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--lrs", type=str,
                 default="0.01,0.02,0.03,0.05,0.1,0.15,0.2,0.3",
                 help="client learning rates, comma-separated")
  p.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  info = round_throughput.print_machine()
  cfg = round_throughput.make_config(args)  # pretraining off
  sim = build_experiment(cfg).simulation
  params = sim.model.init_params
  lrs = [float(x) for x in args.lrs.split(",")]
  runs = [sim.hparams(seed=s, client_lr=lr) for lr in lrs
          for s in range(args.seeds)]
  print(f"{len(lrs)} client lrs x {args.seeds} seeds = {len(runs)} runs of "
        f"{args.rounds} rounds; clients={cfg.num_clients} per_round="
        f"{cfg.clients_per_round} chunk={sim.chunk_size} local_steps="
        f"{cfg.local_steps} tier_fast_path={sim.tier_fast_path}", flush=True)

  # (a) vectorized: warm-up (compile) on a throwaway round, then timed.
  hparams = stack_runs(runs)
  start = time.perf_counter()
  jax.block_until_ready(sim.round_runs(sim.init_runs(params, len(runs)),
                                       hparams))
  compile_vec = time.perf_counter() - start
  states = jax.block_until_ready(sim.init_runs(params, len(runs)))
  start = time.perf_counter()
  for _ in range(args.rounds):
    states, _ = sim.round_runs(states, hparams)
  jax.block_until_ready(states)
  vectorized = time.perf_counter() - start

  # (b) sequential: the same single-run program for all 32 runs.
  start = time.perf_counter()
  jax.block_until_ready(sim.round_with(sim.init(params), runs[0]))
  compile_seq = time.perf_counter() - start
  finals = []
  sequential = 0.0
  for hp in runs:
    state = jax.block_until_ready(sim.init(params))
    start = time.perf_counter()
    for _ in range(args.rounds):
      state, _ = sim.round_with(state, hp)
    jax.block_until_ready(state)
    sequential += time.perf_counter() - start
    finals.append(state)

  worst = 0.0
  for i, state in enumerate(finals):
    for a, b in zip(jax.tree.leaves(state.params),
                    jax.tree.leaves(run_slice(states, i).params)):
      a, b = np.asarray(a), np.asarray(b)
      worst = max(worst, float(np.max(np.abs(a - b) / (1e-3 + np.abs(a)))))
  agree = worst < 1e-3
  print(f"compile: vectorized {compile_vec:.1f}s, sequential "
        f"{compile_seq:.1f}s (excluded below)")
  print(f"vectorized: {vectorized:.2f}s for {len(runs)} runs x {args.rounds} "
        f"rounds ({vectorized / args.rounds:.3f}s per round of all runs)")
  print(f"sequential: {sequential:.2f}s "
        f"({sequential / len(runs) / args.rounds:.3f}s per run-round)")
  print(f"agree: {agree} (max relative difference of final params "
        f"{worst:.2e})")
  result = {"machine": info, "runs": len(runs), "rounds": args.rounds,
            "vectorized_seconds": vectorized, "sequential_seconds": sequential,
            "compile_vectorized_seconds": compile_vec,
            "compile_sequential_seconds": compile_seq,
            "max_relative_difference": worst, "agree": agree,
            "ratio": sequential / vectorized}
  if not agree:
    print("error: vectorized and sequential runs disagree", file=sys.stderr)
  return round_throughput.finish(result, args.out)


if __name__ == "__main__":
  main()
