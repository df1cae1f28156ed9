"""Round time of the masked path vs the tier fast path on the four-tier mix.

Both run in one process, on the same cohorts, from the same server state, with
the default experiment (`config.default_config()`: tiers 1, 1/2, 1/4, 1/8,
25% each, HeteroFL first-k widths):

  (a) masked: every client at full shape with 0/1 masks
      (`engine.round.masked_round`);
  (b) tiered: each tier's clients at their sub-model's real shape
      (`tiered.tiered_round`), sums scattered back to full size.

Both are compiled (warmed up) first and checked to agree after one round;
each repeat times `--rounds` consecutive rounds from the same starting state,
repeats interleaved, best reported (the median too). The last line is
`ratio: X`, the masked round time over the tiered one.

  python benchmarks/tier_fast_path.py
  python benchmarks/tier_fast_path.py --hidden 512,512
  python benchmarks/tier_fast_path.py --model cnn --clients-per-round 20
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import config as config_lib
from fedjax_tl import tiered
from fedjax_tl.runner import build_experiment
import round_throughput


def parse_args(argv=None) -> argparse.Namespace:
  p = round_throughput.workload_parser(__doc__)
  p.add_argument("--hidden", type=str, default=None,
                 help="mlp hidden widths, e.g. 512,512 (default: the "
                 "config's)")
  p.add_argument("--repeats", type=int, default=7,
                 help="timed repeats of each path (best is reported)")
  p.add_argument("--rounds", type=int, default=3,
                 help="consecutive rounds per timed repeat")
  return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> config_lib.ExperimentConfig:
  """round_throughput's config (pretraining off), with `--hidden`."""
  if args.hidden:
    args.overrides.append(f"hidden=({args.hidden},)")
  return round_throughput.make_config(args)


def tier_clients(sim, rounds: int) -> list[list[int]]:
  """Aggregated clients of each tier width, per round."""
  plan_fn = jax.jit(sim.cohort)
  widths = np.asarray(tiered.tier_widths(sim))
  out = []
  for r in range(rounds):
    plan = jax.device_get(plan_fn(sim.arrays, jnp.asarray(r, jnp.int32)))
    group = np.argmin(np.abs(plan.fraction[:, None] - widths[None]), axis=1)
    out.append([int(np.sum((group == g) & (plan.weight > 0)))
                for g in range(len(widths))])
  return out


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  info = round_throughput.print_machine()
  cfg = make_config(args)
  base = build_experiment(cfg).simulation
  paths = {"masked": dataclasses.replace(base, tier_fast_path=False),
           "tiered": dataclasses.replace(base, tier_fast_path=True)}
  tiered.check_eligible(paths["tiered"])
  params = base.model.init_params
  num_params = sum(int(np.size(a)) for a in jax.tree.leaves(params))
  state0 = base.init(params)
  print(f"model={cfg.model} hidden={cfg.hidden} params={num_params} "
        f"policy={cfg.policy} tiers={cfg.tier_fractions} "
        f"proportions={cfg.tier_proportions} clients={cfg.num_clients} "
        f"per_round={cfg.clients_per_round} chunk={base.chunk_size} "
        f"local_steps={cfg.local_steps} batch={cfg.batch_size} "
        f"repeats={args.repeats} rounds={args.rounds}", flush=True)
  counts = tier_clients(base, args.rounds)
  print(f"aggregated clients per tier width {tiered.tier_widths(base)}, "
        f"per round: {counts}", flush=True)

  steps = {name: (lambda s: lambda st: s.round(st)[0])(sim)
           for name, sim in paths.items()}
  compile_s, after_one = round_throughput.warm_up(steps, state0)
  max_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(after_one["masked"].params),
      jax.tree.leaves(after_one["tiered"].params)))
  print(f"  max |params(tiered) - params(masked)| after one round: "
        f"{max_diff:.2e}", flush=True)

  times = round_throughput.time_interleaved(steps, state0, args.repeats,
                                            args.rounds, per_round=True)

  rows = [{"path": name, "best_round_seconds": min(ts),
           "median_round_seconds": statistics.median(ts),
           "compile_seconds": compile_s[name]} for name, ts in times.items()]
  ratio = rows[0]["best_round_seconds"] / rows[1]["best_round_seconds"]
  print()
  print(f"{'path':<8}{'best s/round':>14}{'median s/round':>16}"
        f"{'compile s':>11}")
  for row in rows:
    print(f"{row['path']:<8}{row['best_round_seconds']:>14.4f}"
          f"{row['median_round_seconds']:>16.4f}"
          f"{row['compile_seconds']:>11.2f}")
  result = {"machine": info, "config": cfg.to_dict(), "args": vars(args),
            "num_params": num_params, "chunk_size": base.chunk_size,
            "tier_widths": list(tiered.tier_widths(base)),
            "clients_per_tier": counts, "rows": rows,
            "max_abs_diff_after_one_round": max_diff, "ratio": ratio}
  return round_throughput.finish(result, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
