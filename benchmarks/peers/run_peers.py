"""Runs every available peer and fedjax_tl on the peer workloads, one table.

Each peer runs in its own virtual environment (made by setup.sh; a peer whose
environment is missing is skipped), ours in this one, each as a subprocess
printing one JSON line. A peer run in several ways (pfl: one process and two
under torchrun) counts with its fastest. The table's ratio is ours over the
peer, in client local steps per second (> 1: ours is faster).

  python benchmarks/peers/run_peers.py --quick
  python benchmarks/peers/run_peers.py --out peers.json
  python benchmarks/peers/run_peers.py --workloads cnn --peers pfl
  python benchmarks/peers/run_peers.py --repeats 3 --peers pfl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import peers_common as common  # noqa: E402

PEERS = ("fedjax", "pfl", "flower")

# Per peer: (variant name, command prefix before the script's own options).
# `{py}` is the peer environment's python.
VARIANTS = {
    "fedjax": [("jit", ["{py}", "fedjax_bench.py"])],
    # torch's default of one thread per core collapses on a busy machine.
    "pfl": [("1 process", ["{py}", "pfl_bench.py"]),
            ("1 process, 1 thread", ["{py}", "pfl_bench.py", "--threads", "1"]),
            ("2 processes", ["{py}", "-m", "torch.distributed.run",
                             "--standalone", "--nproc_per_node", "2",
                             "pfl_bench.py"])],
    "flower": [("1 cpu/client", ["{py}", "flower_bench.py",
                                 "--cpus-per-client", "1"])],
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workloads", default="mlp,cnn",
                 help="comma list of " + ", ".join(common.WORKLOADS))
  p.add_argument("--peers", default=",".join(PEERS),
                 help="comma list of " + ", ".join(PEERS))
  p.add_argument("--rounds", type=int, default=None,
                 help="timed rounds per run (default: each script's own)")
  p.add_argument("--quick", action="store_true",
                 help="2 timed rounds per run (a smoke run)")
  p.add_argument("--timeout", type=float, default=1800,
                 help="seconds one run may take before it is killed")
  p.add_argument("--venvs", default=os.environ.get(
      "PEERS_VENVS", os.path.join(HERE, ".venvs")),
                 help="where setup.sh made the peer environments")
  p.add_argument("--repeats", type=int, default=1,
                 help="run the whole comparison this many times, ours and "
                 "the peers alternating; the table shows each figure's "
                 "median and the median (and range) of the per-repeat ratios")
  p.add_argument("--out", default=None, help="write all results as JSON")
  args = p.parse_args(argv)
  args.workloads = [w for w in args.workloads.split(",") if w]
  args.peers = [x for x in args.peers.split(",") if x]
  for w in args.workloads:
    if w not in common.WORKLOADS:
      p.error(f"--workloads: unknown workload {w!r}")
  for x in args.peers:
    if x not in PEERS:
      p.error(f"--peers: unknown peer {x!r}")
  if args.repeats < 1:
    p.error(f"--repeats={args.repeats} must be >= 1")
  return args


def peer_python(venvs: str, peer: str) -> str | None:
  """The peer environment's python, None if setup.sh did not finish it."""
  venv = os.path.join(venvs, peer)
  python = os.path.join(venv, "bin", "python")
  ok = os.path.exists(os.path.join(venv, ".complete")) and os.path.exists(
      python)
  return python if ok else None


def run(command: list[str], timeout: float) -> dict[str, Any]:
  """Runs one benchmark; its result is the last JSON line of its stdout."""
  print("$ " + " ".join(command), flush=True)
  start = time.perf_counter()
  try:
    proc = subprocess.run(command, cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f}s"}
  wall = time.perf_counter() - start
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("{"):
      result = json.loads(line)
      result["wall_seconds"] = wall
      print(f"  {result['steps_per_second']:.0f} client steps/s "
            f"({wall:.0f}s)", flush=True)
      return result
  tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
  print(f"  failed (exit {proc.returncode}):\n{tail}", flush=True)
  return {"error": f"exit {proc.returncode}: {tail[-2000:]}"}


def script_options(args: argparse.Namespace, workload: str,
                   clients: int) -> list[str]:
  options = ["--workload", workload, "--clients-per-round", str(clients)]
  if args.rounds:
    options += ["--rounds", str(args.rounds)]
  if args.quick:
    options.append("--quick")
  return options


def table(rows: list[dict[str, Any]]) -> str:
  """The markdown table of the comparison (medians over repeats)."""
  repeated = any(len(row["ratios"]) > 1 for row in rows)
  lines = ["| workload | clients/round | peer | peer steps/s | ours steps/s "
           "| ratio (ours/peer) |" + (" ratio range |" if repeated else ""),
           "| --- | ---: | --- | ---: | ---: | ---: |" +
           (" ---: |" if repeated else "")]
  fmt = lambda v: ("-" if v is None else f"{v:,.0f}" if v >= 100 else
                   f"{v:.3g}")
  for row in rows:
    ratios = row["ratios"]
    line = (f"| {row['workload']} | {row['clients_per_round']:,} | "
            f"{row['peer']}{row['note']} | {fmt(row['peer_sps'])} | "
            f"{fmt(row['ours_sps'])} | "
            f"{'-' if not ratios else f'{statistics.median(ratios):.2f}'} |")
    if repeated:
      line += (" - |" if not ratios else
               f" {min(ratios):.2f}-{max(ratios):.2f} |")
    lines.append(line)
  return "\n".join(lines)


def median_or_none(values: list[float]) -> float | None:
  return statistics.median(values) if values else None


def summarize(found: dict[tuple, list[tuple[tuple[str, dict] | None,
                                             float | None]]]
              ) -> list[dict[str, Any]]:
  """One table row per `(workload, clients, peer)` from its repeats.

  `found` maps each to a list with one entry per repeat: the peer's best
  `(variant, result)` (None if every variant failed) and our steps/s (None
  if ours failed). A row holds the median peer and our rates and the ratio
  (ours / peer) of every repeat where both ran.
  """
  rows = []
  for (name, clients, peer), repeats in found.items():
    bests = [best for best, _ in repeats if best is not None]
    variants = sorted({variant for variant, _ in bests})
    notes = ((variants if len(VARIANTS[peer]) > 1 else []) +
             (["dropout"] if any(r.get("dropout") for _, r in bests)
              else []))
    note = f" ({', '.join(notes)})" if notes else ""
    rows.append({
        "workload": name, "clients_per_round": clients, "peer": peer,
        "note": note,
        "peer_sps": median_or_none([r["steps_per_second"] for _, r in bests]),
        "ours_sps": median_or_none([o for _, o in repeats if o is not None]),
        "ratios": [o / best[1]["steps_per_second"] for best, o in repeats
                   if best is not None and o is not None]})
  return rows


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  pythons = {peer: peer_python(args.venvs, peer) for peer in args.peers}
  for peer, python in pythons.items():
    if python is None:
      print(f"skipping {peer}: no finished environment in {args.venvs} "
            f"(run: bash benchmarks/peers/setup.sh {peer})", flush=True)
  runs = []
  # (workload, clients, peer) -> per repeat: the peer's best variant and
  # its result (None if every variant failed), and our rate
  found: dict[tuple, list[tuple[tuple[str, dict] | None, float | None]]] = {}
  for repeat in range(args.repeats):
    if args.repeats > 1:
      print(f"# repeat {repeat + 1} of {args.repeats}", flush=True)
    for name in args.workloads:
      for clients in common.WORKLOADS[name].cohorts:
        options = script_options(args, name, clients)
        ours = run([sys.executable, "ours.py", *options], args.timeout)
        runs.append({"peer": "ours", "variant": "vmap", "repeat": repeat,
                     **ours})
        for peer, python in pythons.items():
          if python is None:
            continue
          best = None
          for variant, prefix in VARIANTS[peer]:
            command = [part.format(py=python) for part in prefix] + options
            result = run(command, args.timeout)
            runs.append({"peer": peer, "variant": variant, "repeat": repeat,
                         **result})
            if "error" not in result and (
                best is None or result["steps_per_second"] >
                best[1]["steps_per_second"]):
              best = (variant, result)
          found.setdefault((name, clients, peer), []).append(
              (best, ours.get("steps_per_second")))
  rows = summarize(found)
  text = table(rows)
  print()
  print(text)
  result = {"args": {k: v for k, v in vars(args).items()}, "rows": rows,
            "runs": runs, "table": text}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
