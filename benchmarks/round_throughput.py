"""Client local steps per second: the vectorized round vs a per-client loop.

Both run in one process, on the same cohorts, from the same server state:

  (a) vectorized: `sim.round(state)`, one jit-compiled program per round with
      the cohort vmapped in chunks of `chunk_size` clients;
  (b) loop: for every valid slot of the round's cohort plan one call of
      `jax.jit(sim.run_client)`, the weighted sums accumulated on device by a
      jitted add, then the same jitted server step. Everything is compiled
      once and reused; the host blocks only at the end of the timed rounds
      (plus one small fetch of the cohort plan per round, to skip the
      invalid slots as the reference loop does).

Client local steps are counted as (#valid clients) x local_steps per round.
Both paths are compiled (warmed up) before timing; each repeat times `--rounds`
consecutive rounds from the same starting state, and the best repeat is
reported (the median too). Repeats of the candidates are interleaved so slow
drift of the machine hits them alike. The last line is `ratio: X`, the
vectorized rate (best chunk size) over the loop rate.

  python benchmarks/round_throughput.py
  python benchmarks/round_throughput.py --chunk-sizes 1,2,4,5,10,20,25,50,100
  python benchmarks/round_throughput.py --model cnn --repeats 2 --rounds 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import config as config_lib
from fedjax_tl.runner import auto_chunk_size, build_experiment
from fedjax_tl.simulation import ServerState, Simulation


def workload_parser(description: str, out_flag: str = "--out"
                    ) -> argparse.ArgumentParser:
  """The flags every benchmark shares: the workload (see make_config),
  `--set` overrides and a JSON output file."""
  p = argparse.ArgumentParser(description=description.split("\n")[0])
  p.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
  p.add_argument("--clients-per-round", type=int, default=100)
  p.add_argument("--num-clients", type=int, default=1000)
  p.add_argument("--chunk-size", type=int, default=0,
                 help="clients vmapped together; 0 = the runner's automatic "
                 "choice (auto_chunk_size)")
  p.add_argument("--set", dest="overrides", action="append", default=[],
                 metavar="KEY=VALUE",
                 help="extra config override, e.g. --set local_steps=10")
  p.add_argument(out_flag, type=str, default=None,
                 help="write the results to this JSON file")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  p = workload_parser(__doc__, out_flag="--json")
  p.add_argument("--chunk-sizes", type=str, default=None,
                 help="comma list to sweep, e.g. 1,5,10,20,50,100 (0 = auto); "
                 "overrides --chunk-size")
  p.add_argument("--repeats", type=int, default=5,
                 help="timed repeats of each candidate (best is reported)")
  p.add_argument("--rounds", type=int, default=3,
                 help="consecutive rounds per timed repeat")
  p.add_argument("--no-check", action="store_true",
                 help="skip comparing the two paths' resulting params")
  return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> config_lib.ExperimentConfig:
  overrides = [("model", args.model),
               ("clients_per_round", str(args.clients_per_round)),
               ("num_clients", str(args.num_clients)),
               ("chunk_size", str(args.chunk_size)),
               ("pretrain", "none")]
  for item in args.overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
    overrides.append((key.strip(), value.strip()))
  cfg = config_lib.apply_overrides(config_lib.default_config(), overrides)
  return config_lib.validate(cfg)


def chunk_sizes(args: argparse.Namespace, auto: int) -> list[int]:
  if args.chunk_sizes:
    sizes = [int(s) for s in args.chunk_sizes.split(",") if s.strip()]
  else:
    sizes = [args.chunk_size]
  out = []
  for s in sizes:
    s = s or auto
    if s < 1:
      raise SystemExit(f"chunk size {s} must be >= 1 (or 0 = auto)")
    if s not in out:
      out.append(s)
  return out


# -- the per-client loop baseline --


def make_loop_round(sim: Simulation) -> Callable[[ServerState], ServerState]:
  """A per-client round: one jitted client per valid slot, sums on device."""
  plan_fn = jax.jit(sim.cohort)
  client_fn = jax.jit(sim.run_client)
  server_fn = jax.jit(sim.server_step)

  @jax.jit
  def accumulate(num, den, delta, train, weight):
    # Client deltas are zero outside their train mask (as in the round).
    num = jax.tree.map(lambda n, d: n + weight * d, num, delta)
    den = jax.tree.map(lambda s, m: s + weight * m, den, train)
    return num, den

  zeros = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p))

  def loop_round(state: ServerState) -> ServerState:
    # One small host fetch per round: which slots are valid, and their plan.
    plan = jax.device_get(plan_fn(sim.arrays, state.round))
    num = zeros(state.params)
    den = num
    for i in np.flatnonzero(plan.weight > 0):
      delta, train, _, _ = client_fn(sim.arrays, state.params, state.round,
                                  plan.ids[i], plan.fraction[i],
                                  plan.num_steps[i])
      num, den = accumulate(num, den, delta, train, plan.weight[i])
    return server_fn(state, num, den)

  return loop_round


def valid_clients(sim: Simulation, first_round: int, rounds: int) -> list[int]:
  plan_fn = jax.jit(sim.cohort)
  return [int(jax.device_get(plan_fn(sim.arrays, jnp.asarray(r, jnp.int32))
                             .valid.sum()))
          for r in range(first_round, first_round + rounds)]


# -- timing --


def run_rounds(step: Callable, state: ServerState, rounds: int) -> float:
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(rounds):
    state = step(state)
  jax.block_until_ready(state)
  return time.perf_counter() - start


def machine_info() -> dict[str, Any]:
  import jaxlib
  return {"backend": jax.default_backend(),
          "device_count": jax.device_count(),
          "devices": [str(d) for d in jax.devices()],
          "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "platform": platform.platform(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def print_machine() -> dict[str, Any]:
  """Prints and returns :func:`machine_info`."""
  info = machine_info()
  print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()
                                if k != "devices"), flush=True)
  return info


def finish(result: dict[str, Any], out: str | None) -> dict[str, Any]:
  """Writes `result` as JSON to `out` (if given), prints the ratio line."""
  if out:
    with open(out, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")
  print(f"ratio: {result['ratio']:.2f}")
  return result


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  info = print_machine()
  cfg = make_config(args)
  exp = build_experiment(cfg)
  base = exp.simulation
  params = exp.model.init_params
  num_params = sum(int(np.size(a)) for a in jax.tree.leaves(params))
  auto = auto_chunk_size(cfg, num_params)
  sizes = chunk_sizes(args, auto)
  state0 = base.init(params)
  x_shape = tuple(base.arrays.x.shape)
  print(f"model={cfg.model} params={num_params} data={exp.data.name} "
        f"x={x_shape} clients={cfg.num_clients} per_round="
        f"{cfg.clients_per_round} local_steps={cfg.local_steps} "
        f"batch={cfg.batch_size} chunk_sizes={sizes} repeats={args.repeats} "
        f"rounds={args.rounds} (auto chunk size {auto})",
        flush=True)

  valid = valid_clients(base, 0, args.rounds)
  steps_per_repeat = sum(valid) * cfg.local_steps
  print(f"valid clients per round {valid}: {steps_per_repeat} client local "
        f"steps per repeat", flush=True)

  # Candidates: the loop, then one simulation per chunk size.
  candidates: dict[str, Callable] = {"loop": make_loop_round(base)}
  for c in sizes:
    sim = dataclasses.replace(base, chunk_size=c)
    candidates[f"vmap/{c}"] = (lambda s: lambda st: s.round(st)[0])(sim)

  # Warm up (compile) every candidate and check they agree on round 0.
  compile_s, results = {}, {}
  for name, step in candidates.items():
    start = time.perf_counter()
    results[name] = jax.block_until_ready(step(state0))
    compile_s[name] = time.perf_counter() - start
    print(f"  warm-up {name:<10} {compile_s[name]:8.2f}s", flush=True)
  max_diff = {}
  if not args.no_check:
    ref = results["loop"].params
    for name, out in results.items():
      if name == "loop":
        continue
      diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
          jax.tree.leaves(out.params), jax.tree.leaves(ref)))
      max_diff[name] = diff
    print("  max |params(vmap) - params(loop)| after one round: " +
          ", ".join(f"{k}={v:.2e}" for k, v in max_diff.items()), flush=True)

  # Timed repeats, interleaved across candidates.
  times: dict[str, list[float]] = {name: [] for name in candidates}
  for rep in range(args.repeats):
    for name, step in candidates.items():
      times[name].append(run_rounds(step, state0, args.rounds))
    print(f"  repeat {rep + 1}/{args.repeats}: " + ", ".join(
        f"{n}={t[-1]:.3f}s" for n, t in times.items()), flush=True)

  rows = []
  for name, ts in times.items():
    best, median = min(ts), statistics.median(ts)
    rows.append({
        "name": name,
        "chunk_size": None if name == "loop" else int(name.split("/")[1]),
        "best_seconds": best, "median_seconds": median,
        "steps_per_second": steps_per_repeat / best,
        "median_steps_per_second": steps_per_repeat / median,
        "compile_seconds": compile_s[name],
        "max_abs_diff_vs_loop": max_diff.get(name),
    })
  loop = rows[0]
  for row in rows:
    row["ratio_vs_loop"] = row["steps_per_second"] / loop["steps_per_second"]
  vmaps = rows[1:]
  best = max(vmaps, key=lambda r: r["steps_per_second"])

  print()
  print(f"{'path':<12}{'chunk':>6}{'best s':>9}{'steps/s':>11}"
        f"{'median/s':>11}{'compile s':>11}{'x loop':>8}")
  for row in rows:
    chunk = "-" if row["chunk_size"] is None else str(row["chunk_size"])
    path = "loop" if row["chunk_size"] is None else "vectorized"
    print(f"{path:<12}{chunk:>6}{row['best_seconds']:>9.3f}"
          f"{row['steps_per_second']:>11.0f}"
          f"{row['median_steps_per_second']:>11.0f}"
          f"{row['compile_seconds']:>11.2f}{row['ratio_vs_loop']:>8.2f}")
  print(f"loop: {loop['steps_per_second']:.0f} client steps/s; vectorized "
        f"(chunk {best['chunk_size']}): {best['steps_per_second']:.0f} "
        f"client steps/s")

  result = {"machine": info, "config": cfg.to_dict(),
            "args": vars(args), "num_params": num_params,
            "valid_clients_per_round": valid,
            "steps_per_repeat": steps_per_repeat, "rows": rows,
            "best_chunk_size": best["chunk_size"],
            "ratio": best["ratio_vs_loop"]}
  return finish(result, args.json)


if __name__ == "__main__":
  main(sys.argv[1:])
