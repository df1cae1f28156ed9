"""Cold seconds of a run's summary costs: op by op vs one compiled program.

A run's summary.json holds each tier's costs (`summary.tier_cost_record`:
`Sampler.device_widths` and `TimeModel.tier_cost_arrays`) and its deployed
models' sizes (`summary.model_record`). They run once per run, at its end,
so their first call, compilation included, is what a user waits for. Each
way runs in a fresh process (neither shares the other's compiled ops):

  (a) op by op: the same functions called without jit, as before;
  (b) compiled: `tier_cost_record` and `model_record` as they are (one
      jitted program each).

Both are checked to agree (relative 1e-6: jit may round float32 seconds in
the last place). Repeats alternate the two, best reported; the last line is
`ratio: X`, op by op over compiled.

  python benchmarks/summary_costs.py
  python benchmarks/summary_costs.py --policy fjord --num-clients 1000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np


def child(way: str, policy: str, num_clients: int) -> dict:
  """Builds the experiment, then times one way's first call of both."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fedjax_tl import config as config_lib, cost, runner
  from fedjax_tl.engine import timing
  from fedjax_tl.experiment import summary as summary_lib
  cfg = config_lib.default_config()
  cfg.policy, cfg.num_clients, cfg.pretrain_steps = policy, num_clients, 0
  exp = runner.build_experiment(config_lib.validate(cfg))
  sim = exp.simulation
  start = time.perf_counter()
  if way == "compiled":
    names = exp.population.tier_names
    final = {f"per_tier_bytes_{w}": dict.fromkeys(names, 0.0)
             for w in ("down", "up")}
    record = summary_lib.tier_cost_record(exp, final, 1)
    costs = [record[f"per_tier_{key}"][n] for key in timing.TIER_COSTS
             for n in names]
    sizes = summary_lib.model_record(exp)
    sizes = [v for key in ("per_tier_params", "per_tier_model_bytes",
                           "per_tier_flops") for v in sizes[key].values()]
  else:
    costs = timing.tier_costs_numpy(sim.time_model.tier_cost_arrays(
        sim.arrays, *sim.sampler.device_widths(sim.arrays, sim.seed)))
    costs = [None if not np.isfinite(v) else float(v)
             for key in timing.TIER_COSTS for v in costs[key]]
    params, positions = sim.model.init_params, dict(
        sim.time_model.conv_positions)
    masks = [sim.deployed_masks(jnp.float32(f), params)
             for f in exp.population.tier_fractions]
    sizes = ([int(cost.mask_count(m, params)) for m in masks] +
             [float(cost.mask_bytes(m, params)) for m in masks] +
             [float(cost.forward_flops(sim.model.layers, params, m,
                                       positions)) for m in masks])
  return {"seconds": time.perf_counter() - start, "costs": costs,
          "sizes": sizes}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--policy", default="heterofl")
  p.add_argument("--num-clients", type=int, default=100)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(child(args.child, args.policy, args.num_clients)))
    return
  seconds = {"op_by_op": [], "compiled": []}
  results = {}
  for _ in range(args.repeats):
    for way in seconds:
      out = subprocess.run(
          [sys.executable, __file__, f"--child={way}",
           f"--policy={args.policy}", f"--num-clients={args.num_clients}"],
          check=True, capture_output=True, text=True).stdout
      results[way] = json.loads(out.splitlines()[-1])
      seconds[way].append(results[way]["seconds"])
  old, new = results["op_by_op"], results["compiled"]
  assert old["sizes"] == new["sizes"], (old["sizes"], new["sizes"])
  nan = lambda xs: [np.nan if x is None else x for x in xs]
  np.testing.assert_allclose(nan(new["costs"]), nan(old["costs"]), rtol=1e-6)
  for way, times in seconds.items():
    print(f"{way}: best {min(times):.3f}s of {times}")
  print(f"ratio: {min(seconds['op_by_op']) / min(seconds['compiled']):.2f}")


if __name__ == "__main__":
  main()
