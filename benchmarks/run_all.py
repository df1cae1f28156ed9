"""The benchmark suite of issue 5 in one process, each figure against a
baseline measured in the same run; results as JSON and a markdown table.

Items (`--only 1,3,...` picks some):

  1. client local steps/s, vectorized round vs a per-client jit loop (same
     math, round_throughput.make_loop_round), for logistic regression (the
     mlp without hidden layers), the default MLP and the CNN, at 100, 1,000
     and 10,000 clients per round. Above `--loop-cap` clients the loop runs
     only the round's first `--loop-cap` clients and its rate is taken from
     those (the table says so).
  2. pfl-research's CIFAR-10 setting (benchmarks/peers `cnn` workload, random
     data): seconds per round, projected hours for 1,500 rounds; baseline:
     the per-client loop on the same simulation.
  3. achieved FLOP/s of that round (3 x forward FLOPs per example step, from
     fedjax_tl.cost) as a fraction of a jitted dense float32 matmul.
  4. peak RSS (and device memory on accelerators) of the default model at
     1,000 vs 10,000 clients per round (population 10,000, same chunk size),
     each in a fresh subprocess: the process's peak and the peak during the
     rounds alone.
  5. rounds/s on 1 vs 8 forced CPU devices (benchmarks/devices.py).
  6. 8 client lrs x 4 seeds, one vectorized program vs 32 runs one after
     another (benchmarks/sweep.py).

  python benchmarks/run_all.py --quick --out /tmp/q.json --md /tmp/q.md
  python benchmarks/run_all.py --out run_all.json --md run_all.md
  python benchmarks/run_all.py --only 1 --models mlp --sizes 100,1000

Quick mode shrinks every item (sizes, rounds, cohorts) so the suite runs in
a few minutes; its figures are smoke figures. Results are written after every
item, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.join(_HERE, "peers")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import devices as devices_bench  # noqa: E402
import round_throughput as rt  # noqa: E402
import sweep as sweep_bench  # noqa: E402
from fedjax_tl import config as config_lib  # noqa: E402
from fedjax_tl import cost  # noqa: E402
from fedjax_tl.engine.clients import run_client  # noqa: E402
from fedjax_tl.runner import auto_chunk_size, build_experiment  # noqa: E402

ITEMS = (1, 2, 3, 4, 5, 6)
MODELS = ("logreg", "mlp", "cnn")
CNN_ROUNDS_TARGET = 1500  # rounds of pfl-research's CIFAR-10 benchmark
CNN_COHORT = 50           # its clients per round

# Full mode, and what --quick changes.
FULL = dict(sizes="100,1000,10000", cnn_sizes="100,1000,10000", rounds=1,
            repeats=3, budget=60.0, loop_cap=1000,
            cnn_clients_per_round=CNN_COHORT,
            cnn_rounds=2, cnn_loop_cap=10, cnn_chunk_size=0,
            memory_sizes="1000,10000",
            matmul=0, devices_args="", sweep_args="--rounds 3",
            compile_cache="")
QUICK = dict(sizes="100,1000", cnn_sizes="100", rounds=1, repeats=2,
             budget=10.0, loop_cap=200, cnn_clients_per_round=2, cnn_rounds=1,
             cnn_loop_cap=1, cnn_chunk_size=0, memory_sizes="200,2000",
             matmul=0, devices_args="--num-clients 200 --clients-per-round 32 "
             "--rounds 2 --repeats 1", sweep_args="--rounds 1",
             # Compilation dominates a quick run; no figure includes it.
             compile_cache=os.path.join(tempfile.gettempdir(),
                                        "fedjax_tl_bench_cache"))

HELP = dict(
    sizes="item 1: clients per round (logreg, mlp)",
    cnn_sizes="item 1: clients per round (cnn)",
    rounds="item 1: rounds per timed repeat",
    repeats="item 1: timed repeats (best reported)",
    budget="items 1-2: no repeat starts past this many timed seconds",
    loop_cap="item 1: loop clients run per round (more: sampled, scaled)",
    cnn_clients_per_round="items 2-3: clients per round of the cnn workload",
    cnn_rounds="items 2-3: timed rounds",
    cnn_loop_cap="items 2-3: loop clients run per round",
    cnn_chunk_size="items 2-3: clients vmapped together; 0 = automatic",
    memory_sizes="item 4: SMALL,LARGE clients per round",
    matmul="item 3: matmul side; 0 = 2048 on CPU, 8192 on accelerators",
    devices_args="item 5: benchmarks/devices.py flags",
    sweep_args="item 6: benchmarks/sweep.py flags",
    compile_cache="JAX compilation cache directory ('' = none)")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="small sizes and few rounds (a smoke run)")
  p.add_argument("--out", default=None, help="write the results as JSON")
  p.add_argument("--md", default=None, help="write a markdown table")
  p.add_argument("--only", default=",".join(map(str, ITEMS)),
                 help="comma list of items to run, e.g. 1,3")
  p.add_argument("--models", default=",".join(MODELS),
                 help="item 1's models, among " + ", ".join(MODELS))
  p.add_argument("--num-clients", type=int, default=1000,
                 help="item 1's population (at least the largest size)")
  for key, value in FULL.items():
    p.add_argument("--" + key.replace("_", "-"), type=type(value),
                   default=None, help=f"{HELP[key]}; full mode: {value!r}, "
                   f"quick: {QUICK[key]!r}")
  p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for key, value in (QUICK if args.quick else FULL).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  try:
    args.only = sorted({int(i) for i in args.only.split(",") if i.strip()})
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.cnn_sizes = [int(s) for s in args.cnn_sizes.split(",") if s.strip()]
    args.memory_sizes = [int(s) for s in args.memory_sizes.split(",")]
  except ValueError as e:
    p.error(f"expected comma lists of integers: {e}")
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  if not set(args.only) <= set(ITEMS):
    p.error(f"--only={args.only}: items are {ITEMS}")
  if not set(args.models) <= set(MODELS):
    p.error(f"--models={args.models}: models are {MODELS}")
  if len(args.memory_sizes) != 2 or min(args.memory_sizes) < 1:
    p.error(f"--memory-sizes={args.memory_sizes}: expected SMALL,LARGE")
  if (min(args.sizes + args.cnn_sizes, default=0) < 1 or args.rounds < 1
      or args.repeats < 1):
    p.error("--sizes, --cnn-sizes, --rounds and --repeats must be >= 1")
  return args


def experiment_config(model: str, clients_per_round: int, num_clients: int,
                      chunk_size: int = 0) -> config_lib.ExperimentConfig:
  """The default experiment (digits, four tiers, HeteroFL), pretraining off,
  every device online so each round runs `clients_per_round` clients.

  `logreg` is the mlp without hidden layers: the model builder takes an
  empty `hidden`; the config's validation asks for at least one hidden
  layer (widths are what policies vary), so it is set after validation.
  """
  cfg = config_lib.validate(config_lib.apply_overrides(
      config_lib.default_config(),
      [("model", "mlp" if model == "logreg" else model),
       ("clients_per_round", str(clients_per_round)),
       ("num_clients", str(num_clients)), ("chunk_size", str(chunk_size)),
       ("min_availability", "1.0"), ("pretrain", "none")]))
  if model == "logreg":
    cfg = dataclasses.replace(cfg, hidden=())
  return cfg


def num_params(params: Any) -> int:
  return sum(int(np.size(a)) for a in jax.tree.leaves(params))


def max_abs_diff(a: Any, b: Any) -> float:
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def compare_loop(sim, rounds: int, repeats: int, budget: float,
                 loop_cap: int | None, client_fn: Callable | None = None
                 ) -> dict[str, Any]:
  """Client local steps/s of `sim.round` and of the per-client loop on the
  same cohorts, best of up to `repeats` (fewer past `budget` seconds); the
  loop runs at most `loop_cap` clients a round (with `client_fn`, see
  round_throughput.make_loop_round)."""
  plan_fn = jax.jit(sim.cohort)
  valid = rt.valid_clients(sim, 0, rounds, plan_fn)
  sampled = loop_cap is not None and max(valid) > loop_cap
  cap = loop_cap if sampled else None
  candidates = {"vectorized": lambda st: sim.round(st)[0],
                "loop": rt.make_loop_round(sim, cap, client_fn, plan_fn)}
  state0 = sim.init(sim.model.init_params)
  compile_s, after_one = rt.warm_up(candidates, state0)
  times = rt.time_interleaved(candidates, state0, repeats, rounds,
                              max_seconds=budget)
  loop_clients = [min(v, cap or v) for v in valid]
  vec_rate = sum(valid) * sim.local_steps / min(times["vectorized"])
  loop_rate = sum(loop_clients) * sim.local_steps / min(times["loop"])
  return {
      "clients_per_round": sim.cohort_size, "chunk_size": sim.chunk_size,
      "valid_clients_per_round": valid,
      "loop_clients_per_round": loop_clients, "loop_sampled": sampled,
      "vectorized_steps_per_second": vec_rate,
      "loop_steps_per_second": loop_rate,
      "repeats": len(times["vectorized"]),
      "vectorized_round_seconds": min(times["vectorized"]) / rounds,
      # The loop's time for the whole cohort (scaled when sampled).
      "loop_round_seconds": sum(valid) * sim.local_steps / loop_rate / rounds,
      "compile_seconds": compile_s,
      "max_abs_diff_vs_loop": (None if sampled else max_abs_diff(
          after_one["vectorized"].params, after_one["loop"].params)),
      "ratio": vec_rate / loop_rate}


# -- the items --


def item_client_steps(args: argparse.Namespace) -> dict[str, Any]:
  """Item 1: vectorized vs loop client steps/s per model and cohort size."""
  sizes_of = {m: args.cnn_sizes if m == "cnn" else args.sizes
              for m in args.models}
  population = max(args.num_clients, *(max(s) for s in sizes_of.values()))
  rows = []
  for model, sizes in sizes_of.items():
    # One population per model; each size only changes the cohort (and the
    # runner's automatic chunk size for it).
    base = build_experiment(experiment_config(model, min(sizes),
                                              population)).simulation
    params = num_params(base.model.init_params)
    # Compiled once for every size.
    client_fn = jax.jit(functools.partial(run_client, base))
    for size in sizes:
      chunk = auto_chunk_size(experiment_config(model, size, population),
                              params)
      sim = dataclasses.replace(base, cohort_size=size, chunk_size=chunk)
      print(f"[1] {model} ({params} params), {size} clients per round, "
            f"chunk {chunk}", flush=True)
      row = compare_loop(sim, args.rounds, args.repeats, args.budget,
                         args.loop_cap, client_fn)
      row.update(model=model, num_params=params)
      rows.append(row)
      print(f"[1] {model}@{size}: vectorized "
            f"{row['vectorized_steps_per_second']:.0f}, loop "
            f"{row['loop_steps_per_second']:.0f} client steps/s, ratio "
            f"{row['ratio']:.2f}", flush=True)
  return {"title": "client local steps/s: vectorized vs per-client loop",
          "population": population, "rounds": args.rounds,
          "repeats": args.repeats, "budget": args.budget,
          "loop_cap": args.loop_cap, "rows": rows,
          "ratio": min(r["ratio"] for r in rows)}


def cnn_simulation(clients_per_round: int, chunk_size: int):
  """The peers' `cnn` workload as benchmarks/peers/ours.py builds it."""
  import ours  # benchmarks/peers; imported late, it builds 600 MB of data
  # With its dropout, as the peers run it.
  sim, info = ours.make_simulation(argparse.Namespace(
      workload="cnn", seed=0, clients_per_round=clients_per_round,
      chunk_size=chunk_size, no_dropout=False))
  return sim, info


def item_cnn_round(args: argparse.Namespace, memo: dict) -> dict[str, Any]:
  """Item 2: seconds per round of the pfl CIFAR-10 setting."""
  if "cnn" in memo:
    return memo["cnn"]
  n = args.cnn_clients_per_round
  sim, info = cnn_simulation(n, args.cnn_chunk_size)
  print(f"[2] cnn workload: {n} clients per round, chunk {sim.chunk_size}, "
        f"{info['num_params']} params", flush=True)
  row = compare_loop(sim, args.cnn_rounds, 1, args.budget, args.cnn_loop_cap)
  seconds = row["vectorized_round_seconds"]
  # Rounds of the benchmark's own cohort, scaled by cohort size if smaller.
  scale = CNN_COHORT / n
  result = {
      "title": "pfl-research CIFAR-10 setting (cnn workload), per round",
      "clients_per_round": n, "chunk_size": sim.chunk_size,
      "local_steps": sim.local_steps, "batch_size": sim.batch_size,
      "num_params": info["num_params"], "rounds": args.cnn_rounds,
      "round_seconds": seconds,
      "steps_per_second": row["vectorized_steps_per_second"],
      "loop_round_seconds": row["loop_round_seconds"],
      "loop_steps_per_second": row["loop_steps_per_second"],
      "loop_sampled": row["loop_sampled"],
      "projected_hours": seconds * scale * CNN_ROUNDS_TARGET / 3600,
      "projection_scaled_from": None if n == CNN_COHORT else n,
      "ratio": row["ratio"], "rows": [row]}
  memo["cnn"] = (result, sim)
  return memo["cnn"]


def matmul_flops_per_second(size: int, repeats: int = 5) -> float:
  """Best-of-`repeats` FLOP/s of a jitted float32 `[size,size] @ [size,size]`
  on the default device: the practical peak."""
  a, b = jax.random.normal(jax.random.key(0), (2, size, size), jnp.float32)
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(a, b))
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def item_flops(args: argparse.Namespace, memo: dict) -> dict[str, Any]:
  """Item 3: the cnn round's achieved FLOP/s over the matmul peak."""
  cnn, sim = item_cnn_round(args, memo)
  forward = float(cost.forward_flops(sim.model.layers, sim.model.init_params,
                                     None, dict(sim.conv_positions)))
  # Backward costs about twice the forward: 3x forward per example step.
  per_step = 3 * forward * sim.batch_size
  achieved = per_step * cnn["steps_per_second"]
  # 0: large enough to be compute-bound on the device at hand.
  size = args.matmul or (2048 if jax.default_backend() == "cpu" else 8192)
  peak = matmul_flops_per_second(size)
  print(f"[3] cnn: {per_step / 1e9:.3f} GFLOP per client step, "
        f"{achieved / 1e9:.1f} GFLOP/s; matmul {size}^3: "
        f"{peak / 1e9:.1f} GFLOP/s", flush=True)
  return {"title": "cnn round FLOP/s as a fraction of a dense matmul",
          "flops_per_client_step": per_step,
          "achieved_flops_per_second": achieved,
          "loop_flops_per_second": per_step * cnn["loop_steps_per_second"],
          "matmul_size": size, "matmul_flops_per_second": peak,
          "ratio": achieved / peak}


def rss_high_water(reset: bool = False) -> int | None:
  """This process's peak RSS in bytes since the last reset (Linux: VmHWM;
  `reset` starts a new high-water mark); None where /proc lacks it."""
  try:
    with open("/proc/self/status") as f:
      peak = next(int(line.split()[1]) * 1024 for line in f
                  if line.startswith("VmHWM:"))
    if reset:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak
  except (OSError, StopIteration, ValueError):
    return None


def memory_worker(spec: str) -> dict[str, Any]:
  """In a fresh process: peak RSS of rounds of the default model.

  The process's peak is often set before any round, by loading data and
  compiling, whatever the cohort; so the peak during the timed rounds alone
  is measured too (high-water mark reset before them). Not ru_maxrss: on
  Linux it keeps the parent's RSS at fork across exec.
  """
  clients, population, chunk = (int(s) for s in spec.split(","))
  sim = build_experiment(experiment_config(
      "mlp", clients, population, chunk)).simulation
  state = jax.block_until_ready(sim.init(sim.model.init_params))
  state = jax.block_until_ready(sim.round(state)[0])  # compiles
  setup = rss_high_water(reset=True)
  start = time.perf_counter()
  for _ in range(2):
    state, stats = sim.round(state)
  jax.block_until_ready(state)
  seconds = (time.perf_counter() - start) / 2
  rounds = rss_high_water()
  if setup is None or rounds is None:  # no /proc: the process's ru_maxrss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024)
  else:
    peak = max(setup, rounds)
  device = jax.devices()[0].memory_stats() or {}
  return {"clients_per_round": clients, "num_clients": population,
          "chunk_size": sim.chunk_size,
          "participants": int(stats.participants),
          "peak_rss_bytes": peak, "setup_peak_rss_bytes": setup,
          "rounds_peak_rss_bytes": rounds,
          "device_peak_bytes": device.get("peak_bytes_in_use"),
          "round_seconds": seconds}


def run_memory_worker(clients: int, population: int, chunk: int
                      ) -> dict[str, Any]:
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__),
       f"--memory-worker={clients},{population},{chunk}"],
      capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"memory worker ({clients} clients) failed:\n"
                       f"{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def item_memory(args: argparse.Namespace) -> dict[str, Any]:
  """Item 4: peak memory at two cohort sizes, same population and chunk."""
  small, large = args.memory_sizes
  rows, chunk = [], 0  # the smaller cohort's automatic chunk size, for both
  for n in (small, large):
    print(f"[4] memory: {n} clients per round of {large}, chunk "
          f"{chunk or 'auto'}", flush=True)
    rows.append(run_memory_worker(n, large, chunk))
    chunk = rows[0]["chunk_size"]
    print(f"[4] {n}: peak RSS {rows[-1]['peak_rss_bytes'] / 2**20:.0f} MiB, "
          f"during rounds {mib(rows[-1]['rounds_peak_rss_bytes'])}, "
          f"{rows[-1]['participants']} clients in "
          f"{rows[-1]['round_seconds']:.2f} s/round", flush=True)
  ratio = rows[1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"]
  rounds = None
  if rows[0]["rounds_peak_rss_bytes"] and rows[1]["rounds_peak_rss_bytes"]:
    rounds = (rows[1]["rounds_peak_rss_bytes"] /
              rows[0]["rounds_peak_rss_bytes"])
  device = None
  if rows[0]["device_peak_bytes"] and rows[1]["device_peak_bytes"]:
    device = rows[1]["device_peak_bytes"] / rows[0]["device_peak_bytes"]
  return {"title": "peak memory vs clients per round (default model)",
          "chunk_size": chunk, "num_clients": large, "rows": rows,
          "completed": rows[1]["participants"] == large,
          "rounds_ratio": rounds, "device_ratio": device, "ratio": ratio}


def item_devices(args: argparse.Namespace) -> dict[str, Any]:
  """Item 5: rounds/s on 1 and 8 forced CPU devices (subprocesses)."""
  argv = args.devices_args.split()
  rows = []
  for n in devices_bench.DEVICE_COUNTS:
    print(f"[5] {n} forced CPU device(s) {' '.join(argv)}", flush=True)
    rows.append({"devices": n, **devices_bench.measure(n, argv)})
    print(f"[5] {n}: {rows[-1]['rounds_per_second']:.2f} rounds/s",
          flush=True)
  return {"title": "rounds/s, 8 vs 1 forced CPU devices", "args": argv,
          "rows": rows,
          "ratio": rows[-1]["rounds_per_second"] / rows[0][
              "rounds_per_second"]}


def item_sweep(args: argparse.Namespace) -> dict[str, Any]:
  """Item 6: the 32-run sweep, vectorized vs sequential."""
  argv = args.sweep_args.split()
  print(f"[6] sweep {' '.join(argv)}", flush=True)
  result = sweep_bench.main(argv)
  result.pop("machine", None)
  return {"title": "8 lrs x 4 seeds: one vectorized program vs 32 runs",
          "args": argv, **result}


# -- output --


def fmt(x: float | None, digits: int = 0) -> str:
  return "-" if x is None else f"{x:,.{digits}f}"


def loads(average: list[float]) -> str:
  return "/".join(f"{x:.1f}" for x in average)


def mib(x: int | None) -> str:
  return "-" if x is None else f"{x / 2**20:,.0f} MiB"


def summary_rows(items: dict[str, Any]) -> list[tuple[str, ...]]:
  """(item, measured, value, baseline, baseline value, ratio) per item."""
  rows = []
  for key, r in items.items():
    if "error" in r:
      rows.append((key, r.get("title", ""), "error", "", "", "-"))
      continue
    if key == "2":
      scaled = (f", scaled from {r['clients_per_round']}"
                if r["projection_scaled_from"] else "")
      rows.append((key, f"cnn round, {r['clients_per_round']} clients "
                   f"(chunk {r['chunk_size']})",
                   f"{r['round_seconds']:.2f} s/round, "
                   f"{r['steps_per_second']:.1f} steps/s; "
                   f"{r['projected_hours']:.2f} h per {CNN_ROUNDS_TARGET:,} "
                   f"rounds of {CNN_COHORT}{scaled}",
                   "per-client loop" + (" (sampled)" if r["loop_sampled"]
                                        else ""),
                   f"{r['loop_round_seconds']:.2f} s/round", f"{r['ratio']:.2f}"))
    elif key == "3":
      loop = r["loop_flops_per_second"] / r["matmul_flops_per_second"]
      rows.append((key, "cnn round FLOP/s (the per-client loop's, and its "
                   "fraction)",
                   f"{r['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s "
                   f"(loop {r['loop_flops_per_second'] / 1e9:.1f}, "
                   f"{loop:.3f})",
                   f"f32 matmul {r['matmul_size']}^3",
                   f"{r['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s",
                   f"{r['ratio']:.3f}"))
    elif key == "4":
      small, large = r["rows"]
      what = (f"{large['clients_per_round']:,} clients/round of "
              f"{r['num_clients']:,} (chunk {r['chunk_size']}, completed: "
              f"{r['completed']})")
      base = f"{small['clients_per_round']:,} clients/round"
      rows.append((key, "peak RSS of the process, " + what,
                   mib(large["peak_rss_bytes"]), base,
                   mib(small["peak_rss_bytes"]), f"{r['ratio']:.2f}"))
      if r["rounds_ratio"]:
        rows.append((key, "peak RSS during the timed rounds",
                     mib(large["rounds_peak_rss_bytes"]), base,
                     mib(small["rounds_peak_rss_bytes"]),
                     f"{r['rounds_ratio']:.2f}"))
      if r["device_ratio"]:
        rows.append((key, "peak device memory", mib(
            large["device_peak_bytes"]), base,
                     mib(small["device_peak_bytes"]),
                     f"{r['device_ratio']:.2f}"))
    elif key == "5":
      one, many = r["rows"][0], r["rows"][-1]
      rows.append((key, f"{many['devices']} forced CPU devices",
                   f"{many['rounds_per_second']:.2f} rounds/s",
                   f"{one['devices']} device",
                   f"{one['rounds_per_second']:.2f} rounds/s",
                   f"{r['ratio']:.2f}"))
    elif key == "6":
      rows.append((key, f"{r['runs']} runs x {r['rounds']} rounds, "
                   f"vectorized (agree: {r['agree']})",
                   f"{r['vectorized_seconds']:.2f} s", "sequential",
                   f"{r['sequential_seconds']:.2f} s", f"{r['ratio']:.2f}"))
  return rows


def markdown(result: dict[str, Any]) -> str:
  m = result["machine"]
  lines = [
      f"# fedjax_tl benchmark suite ({result['mode']})", "",
      f"- command: `{result['command']}`",
      f"- device: {m['device_kind']} ({m['backend']}, {m['device_count']} "
      f"device(s)), {m['cpu_count']} CPU cores, {m['platform']}",
      f"- jax {m['jax']}, jaxlib {m['jaxlib']}, python {m['python']}",
      f"- date {result['date']}; load average (1/5/15 min) at start "
      f"{loads(result['load_average_start'])}, at end "
      f"{loads(result['load_average_end'])}; "
      f"{result['seconds']:.0f} s in all", ""]
  items = result["items"]
  one = items.get("1")
  if one and "error" not in one:
    lines += [
        "## 1. Client local steps/s, vectorized round vs per-client loop",
        "", f"Population {one['population']:,} (all online), "
        f"{one['rounds']} round(s) per repeat, best of up to "
        f"{one['repeats']} (none started past {one['budget']:.0f} s); "
        f"{one['seconds']:.0f} s ({one['cpu_seconds']:.0f} CPU s).", "",
        "| model | params | clients/round | chunk | vectorized steps/s "
        "| loop steps/s | x loop | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in one["rows"]:
      note = (f"loop: first {r['loop_clients_per_round'][0]:,} clients of "
              "each round, rate scaled" if r["loop_sampled"] else "")
      lines.append(
          f"| {r['model']} | {r['num_params']:,} | "
          f"{r['clients_per_round']:,} | {r['chunk_size']} | "
          f"{fmt(r['vectorized_steps_per_second'])} | "
          f"{fmt(r['loop_steps_per_second'])} | {r['ratio']:.2f} | {note} |")
    lines.append("")
  rows = summary_rows({k: v for k, v in items.items() if k != "1"})
  if rows or (one and "error" in one):
    lines += ["## 2-6", "",
              "| item | measured | value | baseline | baseline value "
              "| ratio | s (CPU s) |",
              "| --- | --- | --- | --- | --- | ---: | ---: |"]
    if one and "error" in one:
      rows.insert(0, ("1", one["title"], "error", "", "", "-"))
    lines += ["| " + " | ".join(r) + f" | {items[r[0]]['seconds']:.0f} "
              f"({items[r[0]]['cpu_seconds']:.0f}) |" for r in rows]
    lines.append("")
  return "\n".join(lines)


def use_compile_cache(path: str) -> str | None:
  """Keeps compiled programs in `path` (for the worker subprocesses too),
  unless a cache is set already; returns the cache in use."""
  current = jax.config.jax_compilation_cache_dir
  if path and not current:
    jax.config.update("jax_compilation_cache_dir", path)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    return path
  return current


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and its finished children."""
  return sum(u.ru_utime + u.ru_stime for u in (
      resource.getrusage(resource.RUSAGE_SELF),
      resource.getrusage(resource.RUSAGE_CHILDREN)))


def write(result: dict[str, Any], args: argparse.Namespace) -> None:
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")
  if args.md:
    with open(args.md, "w") as f:
      f.write(markdown(result))


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.memory_worker:
    out = memory_worker(args.memory_worker)
    print(json.dumps(out))
    return out
  start = time.perf_counter()
  info = rt.print_machine()
  info["device_kind"] = jax.devices()[0].device_kind
  args.compile_cache = use_compile_cache(args.compile_cache)
  result = {
      "mode": "quick" if args.quick else "full",
      "command": "python benchmarks/run_all.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": info, "load_average_start": os.getloadavg(),
      "settings": {k: v for k, v in vars(args).items()
                   if k not in ("out", "md", "memory_worker")},
      "items": {}}
  memo: dict = {}
  steps: dict[int, Callable[[], dict[str, Any]]] = {
      1: lambda: item_client_steps(args),
      2: lambda: item_cnn_round(args, memo)[0],
      3: lambda: item_flops(args, memo),
      4: lambda: item_memory(args),
      5: lambda: item_devices(args),
      6: lambda: item_sweep(args)}
  failed = False
  for item in args.only:
    begin, cpu = time.perf_counter(), cpu_seconds()
    try:
      out = steps[item]()
    except Exception as e:  # pylint: disable=broad-except
      # One item failing must not lose the others' figures.
      traceback.print_exc()
      out = {"error": f"{type(e).__name__}: {e}"}
      failed = True
    if item >= 3:
      memo.clear()  # the cnn workload's data (600 MB) is done with
    out["seconds"] = time.perf_counter() - begin
    # With other jobs on the machine, CPU time says how much it got.
    out["cpu_seconds"] = cpu_seconds() - cpu
    out["load_average"] = os.getloadavg()
    result["items"][str(item)] = out
    result["load_average_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - start
    write(result, args)
    print(f"[{item}] done in {out['seconds']:.0f} s ("
          f"{out['cpu_seconds']:.0f} CPU s); ratio "
          f"{out.get('ratio', 'n/a')}", flush=True)
  print()
  print(markdown(result))
  if failed:
    raise SystemExit(1)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
