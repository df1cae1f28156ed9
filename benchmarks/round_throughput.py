"""Client local steps per second: the vectorized round vs a per-client loop.

Both run in one process, on the same cohorts, from the same server state:

  (a) vectorized: `sim.round(state)`, one jit-compiled program per round with
      the cohort vmapped in chunks of `chunk_size` clients;
  (b) loop: for every valid slot of the round's cohort plan one call of
      the jitted `engine.clients.run_client`, the weighted sums accumulated
      on device by a jitted add, then the same jitted server step.
      Everything is compiled once and reused; the host blocks only at the
      end of the timed rounds (plus one small fetch of the cohort plan per
      round, to skip the invalid slots as the reference loop does).

Client local steps are counted as (#valid clients) x local_steps per round.
Both paths are compiled (warmed up) before timing; each repeat times `--rounds`
consecutive rounds from the same starting state, and the best repeat is
reported (the median too). Repeats of the candidates are interleaved so slow
drift of the machine hits them alike. The last line is `ratio: X`, the
vectorized rate (best chunk size) over the loop rate.

  python benchmarks/round_throughput.py
  python benchmarks/round_throughput.py --chunk-sizes 1,2,4,5,10,20,25,50,100
  python benchmarks/round_throughput.py --model cnn --repeats 2 --rounds 1

With `--torch-peer` (model `preresnet18`), the same rounds also run in
PyTorch as a plain per-client loop at each client's real width
(`benchmarks/peers/torch_resnet.py`, in a subprocess, with torch's default
threads and with one thread; the faster counts), after a check that both
give the same losses of one batch before and after one SGD step at every
tier width; a line `torch ratio: X` (vectorized over torch) precedes the
last line.

  python benchmarks/round_throughput.py --model preresnet18 --torch-peer \
      --clients-per-round 10 --set capacity_mix=a-b-c-d-e
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import config as config_lib
from fedjax_tl import models
from fedjax_tl.client import cross_entropy
from fedjax_tl.engine.clients import num_classes, run_client
from fedjax_tl.engine.round import server_step
from fedjax_tl.runner import auto_chunk_size, build_experiment
from fedjax_tl.simulation import ServerState, Simulation

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")
TORCH_PEER = os.path.join(PEERS, "torch_resnet.py")
TORCH_HINT = ("pip install torch --index-url "
              "https://download.pytorch.org/whl/cpu, or bash "
              "benchmarks/peers/setup.sh pfl, or --torch-python PATH")


def workload_parser(description: str, out_flag: str = "--out"
                    ) -> argparse.ArgumentParser:
  """The flags every benchmark shares: the workload (see make_config),
  `--set` overrides and a JSON output file."""
  p = argparse.ArgumentParser(description=description.split("\n")[0])
  p.add_argument("--model", choices=models.names(), default="mlp")
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
  p.add_argument("--param-masks", action="store_true",
                 help="also time every chunk size with the width masks on the "
                 "params at every local step (activation_masks=False), the "
                 "path activation masks replace")
  p.add_argument("--no-check", action="store_true",
                 help="skip comparing the two paths' resulting params (and "
                 "the torch peer's losses)")
  p.add_argument("--torch-peer", action="store_true",
                 help="preresnet18: also time the same rounds in PyTorch, "
                 "one client after another (peers/torch_resnet.py)")
  p.add_argument("--torch-python", default=None,
                 help="the python with torch for --torch-peer (default: "
                 "this one, else the pfl peer environment's)")
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


def make_loop_round(sim: Simulation, max_clients: int | None = None,
                    client_fn: Callable | None = None,
                    plan_fn: Callable | None = None
                    ) -> Callable[[ServerState], ServerState]:
  """A per-client round: one jitted client per valid slot, sums on device.

  With `max_clients`, only the round's first `max_clients` valid clients run
  (a sample of the loop's cost, to be scaled by the caller; the returned
  state is then not the round's). Compiled functions may be passed in to
  reuse their compilation: `client_fn`, a jitted `run_client` of a
  simulation differing from `sim` in cohort or chunk size only; `plan_fn`,
  `jax.jit(sim.cohort)`.
  """
  plan_fn = plan_fn or jax.jit(sim.cohort)
  client_fn = client_fn or jax.jit(functools.partial(run_client, sim))
  server_fn = jax.jit(functools.partial(server_step, sim))

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
    for i in np.flatnonzero(plan.weight > 0)[:max_clients]:
      delta, train, _, _ = client_fn(sim.arrays, state.params, state.round,
                                  plan.ids[i], plan.fraction[i],
                                  plan.num_steps[i])
      num, den = accumulate(num, den, delta, train, plan.weight[i])
    return server_fn(state, num, den)

  return loop_round


def valid_clients(sim: Simulation, first_round: int, rounds: int,
                  plan_fn: Callable | None = None) -> list[int]:
  """Clients aggregated in each round (`plan_fn`: `jax.jit(sim.cohort)`)."""
  plan_fn = plan_fn or jax.jit(sim.cohort)
  return [int(jax.device_get(plan_fn(sim.arrays, jnp.asarray(r, jnp.int32))
                             .valid.sum()))
          for r in range(first_round, first_round + rounds)]


# -- the PyTorch per-client loop (benchmarks/peers/torch_resnet.py) --


def torch_python(path: str | None) -> str | None:
  """`path`, else this python or the pfl peer environment's, whichever
  imports torch first; None if none does."""
  for python in [path] if path else [
      sys.executable, os.path.join(PEERS, ".venvs", "pfl", "bin", "python")]:
    if os.path.exists(python) and subprocess.run(
        [python, "-c", "import torch"], capture_output=True,
        check=False).returncode == 0:
      return python
  return None


def check_torch(python: str, options: list[str], sim: Simulation,
                params, lr: float, batch: int) -> float:
  """The largest difference between our losses and the torch peer's on one
  batch of the first client, before and after one SGD step, at every tier
  width (from our initial params)."""
  x, y = (np.asarray(a[0, :int(sim.arrays.count[0])][:batch])
          for a in (sim.arrays.x, sim.arrays.y))
  fractions = sorted({float(f) for f in sim.tier_fractions}, reverse=True)
  loss = jax.jit(lambda p, units: cross_entropy(
      sim.model.apply(p, x, units=units), y))
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  ours = []
  for f in fractions:
    units = sim.unit_scales(jnp.float32(f), jnp.int32(0),
                            jax.random.PRNGKey(0))
    value, grads = value_and_grad(params, units)
    stepped = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    ours.append((float(value), float(loss(stepped, units))))
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "check.npz")
    np.savez(path, x=x, y=y, fractions=np.asarray(fractions), lr=lr, **{
        f"param/{layer}/{name}": np.asarray(value)
        for layer, leaves in params.items() for name, value in leaves.items()})
    proc = subprocess.run([python, TORCH_PEER, *options, "--check", path],
                          capture_output=True, text=True, check=True)
  theirs = json.loads(proc.stdout.strip().splitlines()[-1])
  theirs = list(zip(theirs["loss"], theirs["loss_after_step"]))
  print("  losses before, after one step (ours | torch): " + ", ".join(
      f"{f:g}: {a:.5f}, {b:.5f} | {c:.5f}, {d:.5f}"
      for f, (a, b), (c, d) in zip(fractions, ours, theirs)), flush=True)
  return max(abs(a - b) for o, t in zip(ours, theirs) for a, b in zip(o, t))


def setup_torch_peer(args: argparse.Namespace, cfg, sim: Simulation,
                     params) -> dict[str, Any] | None:
  """The torch peer's python and options for the rounds `0..rounds-1` of
  `sim` (their valid clients' widths), after the loss check; None (with a
  hint) without torch."""
  python = torch_python(args.torch_python)
  if python is None:
    print(f"skipping the torch peer: no python with torch ({TORCH_HINT})",
          flush=True)
    return None
  options = [
      "--input-shape", ",".join(map(str, sim.arrays.x.shape[2:])),
      "--num-classes", str(num_classes(sim)),
      "--widths", ",".join(map(str, cfg.resnet_widths)),
      "--local-steps", str(cfg.local_steps),
      "--batch-size", str(cfg.batch_size), "--lr", str(cfg.client_lr),
      "--seed", str(cfg.seed)] + (["--scaler"] if cfg.scaler else [])
  peer = {"python": python}
  if not args.no_check:
    peer["max_loss_diff"] = check_torch(python, options, sim, params,
                                        cfg.client_lr, cfg.batch_size)
    print(f"  max |loss(ours) - loss(torch)|: {peer['max_loss_diff']:.2e}",
          flush=True)
  plan_fn = jax.jit(sim.cohort)
  cohorts = []
  for r in range(args.rounds):
    plan = jax.device_get(plan_fn(sim.arrays, jnp.asarray(r, jnp.int32)))
    cohorts.append([float(f) for f in plan.fraction[plan.weight > 0]])
  peer["options"] = options + ["--cohorts", json.dumps(cohorts),
                               "--repeats", str(args.repeats)]
  return peer


def time_torch_peer(peer: dict[str, Any]) -> dict[str, Any]:
  """Runs the torch peer with torch's default threads and with one thread:
  `peer` with each run's result and the faster's rate."""
  sys.path.insert(0, PEERS)
  import run_peers  # pylint: disable=import-outside-toplevel
  peer["runs"] = [run_peers.run([peer["python"], TORCH_PEER,
                                 *peer["options"], "--threads", str(threads)],
                                timeout=3600)
                  for threads in (0, 1)]
  rates = [r["best_steps_per_second"] for r in peer["runs"]
           if "error" not in r]
  if not rates:
    raise SystemExit("the torch peer failed: " + peer["runs"][0]["error"])
  peer["steps_per_second"] = max(rates)
  return peer


# -- timing --


def run_rounds(step: Callable, state: ServerState, rounds: int) -> float:
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(rounds):
    state = step(state)
  jax.block_until_ready(state)
  return time.perf_counter() - start


def warm_up(candidates: dict[str, Callable], state: ServerState
            ) -> tuple[dict[str, float], dict[str, ServerState]]:
  """Runs every candidate once from `state` (compiling it): the seconds
  each took and the states they returned."""
  seconds, results = {}, {}
  for name, step in candidates.items():
    start = time.perf_counter()
    results[name] = jax.block_until_ready(step(state))
    seconds[name] = time.perf_counter() - start
    print(f"  warm-up {name:<10} {seconds[name]:8.2f}s", flush=True)
  return seconds, results


def time_interleaved(candidates: dict[str, Callable], state: ServerState,
                     repeats: int, rounds: int, per_round: bool = False,
                     max_seconds: float | None = None
                     ) -> dict[str, list[float]]:
  """Seconds of `rounds` consecutive rounds from `state` (per round if
  `per_round`), `repeats` times for each candidate, repeats interleaved so
  slow drift of the machine hits the candidates alike. With `max_seconds`,
  no repeat starts once the timed rounds have taken that long (one always
  runs)."""
  times: dict[str, list[float]] = {name: [] for name in candidates}
  start = time.perf_counter()
  for rep in range(repeats):
    if max_seconds is not None and rep and (
        time.perf_counter() - start > max_seconds):
      break
    for name, step in candidates.items():
      seconds = run_rounds(step, state, rounds)
      times[name].append(seconds / rounds if per_round else seconds)
    print(f"  repeat {rep + 1}/{repeats}: " + ", ".join(
        f"{n}={t[-1]:.4f}s" for n, t in times.items()), flush=True)
  return times


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
  if args.torch_peer and (cfg.model, cfg.norm or "batch", cfg.policy,
                          cfg.client_momentum, cfg.weight_decay) != (
                              "preresnet18", "batch", "heterofl", 0, 0):
    raise SystemExit("--torch-peer mirrors model=preresnet18 with its sBN, "
                     "policy=heterofl and plain client SGD")
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
  peer = (setup_torch_peer(args, cfg, base, state0.params)
          if args.torch_peer else None)

  # Candidates: the loop, then one simulation per chunk size.
  candidates: dict[str, Callable] = {"loop": make_loop_round(base)}
  for c in sizes:
    sim = dataclasses.replace(base, chunk_size=c)
    candidates[f"vmap/{c}"] = (lambda s: lambda st: s.round(st)[0])(sim)
    if args.param_masks:
      sim = dataclasses.replace(sim, activation_masks=False)
      candidates[f"params/{c}"] = (lambda s: lambda st: s.round(st)[0])(sim)

  # Warm up (compile) every candidate and check they agree on round 0.
  compile_s, results = warm_up(candidates, state0)
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

  times = time_interleaved(candidates, state0, args.repeats, args.rounds)

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
  vmaps = [row for row in rows if row["name"].startswith("vmap/")]
  best = max(vmaps, key=lambda r: r["steps_per_second"])

  print()
  print(f"{'path':<12}{'chunk':>6}{'best s':>9}{'steps/s':>11}"
        f"{'median/s':>11}{'compile s':>11}{'x loop':>8}")
  for row in rows:
    chunk = "-" if row["chunk_size"] is None else str(row["chunk_size"])
    path = {"loop": "loop", "vmap": "vectorized", "params": "param-masks"}[
        row["name"].split("/")[0]]
    print(f"{path:<12}{chunk:>6}{row['best_seconds']:>9.3f}"
          f"{row['steps_per_second']:>11.0f}"
          f"{row['median_steps_per_second']:>11.0f}"
          f"{row['compile_seconds']:>11.2f}{row['ratio_vs_loop']:>8.2f}")
  print(f"loop: {loop['steps_per_second']:.0f} client steps/s; vectorized "
        f"(chunk {best['chunk_size']}): {best['steps_per_second']:.0f} "
        f"client steps/s")
  extra = {}
  if args.param_masks:
    by_name = {row["name"]: row for row in rows}
    before = by_name[f"params/{best['chunk_size']}"]
    extra["activation_vs_param_masks"] = (best["steps_per_second"] /
                                          before["steps_per_second"])
    print(f"activation masks / param masks (chunk {best['chunk_size']}): "
          f"{extra['activation_vs_param_masks']:.2f}")

  if peer is not None:
    extra["torch_peer"] = time_torch_peer(peer)
    extra["ratio_vs_torch"] = best["steps_per_second"] / peer[
        "steps_per_second"]
    print(f"torch (per-client loop, the faster of default and 1 thread): "
          f"{peer['steps_per_second']:.1f} client steps/s; loop / torch: "
          f"{loop['steps_per_second'] / peer['steps_per_second']:.2f}")
    print(f"torch ratio: {extra['ratio_vs_torch']:.2f}")

  result = {"machine": info, "config": cfg.to_dict(),
            "args": vars(args), "num_params": num_params,
            "valid_clients_per_round": valid,
            "steps_per_repeat": steps_per_repeat, "rows": rows,
            "best_chunk_size": best["chunk_size"],
            "ratio": best["ratio_vs_loop"], **extra}
  return finish(result, args.json)


if __name__ == "__main__":
  main(sys.argv[1:])
