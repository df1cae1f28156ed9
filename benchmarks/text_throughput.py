"""Shakespeare next-character prediction: client local steps per second of
the LSTM and of the Transformer LM, the vectorized round against the
per-client loop of the same model, in one run.

The corpus is generated at a realistic size: `--roles` speaking roles (700;
fedjax's train split has 715) with skewed snippet counts (1 + lognormal,
median ~9, mean ~20, the largest roles hundreds, as in fedjax's 16,068
snippets) of lognormal lengths (median 120 characters), some unicode. Each
role's snippets become fedjax's 80-token sequences (data.text), capped at
`--max-sequences` per role (the padded width). Both models train on the
same clients, cohorts and tiers (HeteroFL's first-k widths), with
`loss_ignored` = PAD, from the same initial state.

For each model the candidates are the per-client loop
(round_throughput.make_loop_round: one jitted client at a time), the
vectorized round (masks) and the vectorized round on the tier fast path
(each tier's sub-model at its real shape); repeats are interleaved and the
best is reported. The last lines give each model's `ratio` (best
vectorized over loop).

  python benchmarks/text_throughput.py                       # fedjax's sizes
  python benchmarks/text_throughput.py --roles 700 --clients-per-round 10 \
      --local-steps 5 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from typing import Any, Callable

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from round_throughput import (finish, make_loop_round, print_machine,  # noqa: E402
                              time_interleaved, valid_clients, warm_up)

from fedjax_tl.algorithms import server_optimizer  # noqa: E402
from fedjax_tl.client import client_optimizer, make_client_update  # noqa: E402
from fedjax_tl.data import text  # noqa: E402
from fedjax_tl.devices import make_population  # noqa: E402
from fedjax_tl.models import build_model  # noqa: E402
from fedjax_tl.simulation import Simulation  # noqa: E402

TIERS = (1.0, 0.5, 0.25, 0.125)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--roles", type=int, default=700)
  p.add_argument("--max-sequences", type=int, default=64,
                 help="80-token sequences kept per role (the padded width)")
  p.add_argument("--clients-per-round", type=int, default=10)
  p.add_argument("--local-steps", type=int, default=5)
  p.add_argument("--batch-size", type=int, default=10)
  p.add_argument("--chunk-size", type=int, default=10)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--models", default="lstm,transformer")
  p.add_argument("--lstm", default="8:256,256", help="embed:hidden,...")
  p.add_argument("--transformer", default="128:4:256:2",
                 help="embed:heads:mlp:layers")
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def corpus(roles: int, seed: int = 0) -> list[list[str]]:
  """Per-role snippets, skewed in count and length (module docstring)."""
  rng = np.random.default_rng(seed)
  chars = np.array(list(text.VOCAB.decode() + "    eeettaoé—"))
  counts = np.minimum(1 + rng.lognormal(np.log(8), 1.3, roles), 800)
  return [["".join(rng.choice(chars, int(n)))
           for n in np.clip(rng.lognormal(np.log(120), 1.0, int(c)), 1,
                            3000)]
          for c in counts.astype(int)]


def model_options(name: str, args: argparse.Namespace) -> dict[str, Any]:
  if name == "lstm":
    embed, hidden = args.lstm.split(":")
    return dict(embed_dim=int(embed),
                hidden=tuple(int(h) for h in hidden.split(",")))
  embed, heads, mlp, layers = (int(v) for v in args.transformer.split(":"))
  return dict(embed_dim=embed, num_heads=heads, mlp_dim=mlp,
              num_layers=layers)


def simulation(name: str, data, args: argparse.Namespace) -> Simulation:
  model = build_model(name, (text.SEQ_LEN,), text.VOCAB_SIZE, seed=0,
                      **model_options(name, args))
  population = make_population(data.num_clients, TIERS, (0.25,) * 4,
                               min_availability=0.5, seed=0)
  update = make_client_update(
      model.apply, client_optimizer(0.5), local_steps=args.local_steps,
      batch_size=args.batch_size, loss_ignored=text.LOSS_IGNORED)
  return Simulation.create(
      model, update, server_optimizer("fedavg", 1.0), data, population,
      cohort_size=args.clients_per_round, chunk_size=args.chunk_size,
      local_steps=args.local_steps, seed=0, batch_size=args.batch_size)


def time_model(name: str, data, args: argparse.Namespace) -> dict[str, Any]:
  """Loop, vectorized and fast-path steps/s of one model."""
  sim = simulation(name, data, args)
  params = sim.model.init_params
  size = sum(int(np.size(a)) for a in jax.tree.leaves(params))
  state = sim.init(params)
  steps = sum(valid_clients(sim, 0, args.rounds)) * args.local_steps
  print(f"\n{name}: {size} params, {model_options(name, args)}; {steps} "
        f"client steps per repeat", flush=True)
  fast = dataclasses.replace(sim, tier_fast_path=True)
  candidates: dict[str, Callable] = {
      "loop": make_loop_round(sim),
      "vectorized": lambda st: sim.round(st)[0],
      "fast path": lambda st: fast.round(st)[0]}
  compile_s, results = warm_up(candidates, state)
  diff = {n: max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(out.params), jax.tree.leaves(results["loop"].params)))
          for n, out in results.items() if n != "loop"}
  print("  max |params - loop's| after one round: " + ", ".join(
      f"{n}={d:.1e}" for n, d in diff.items()), flush=True)
  times = time_interleaved(candidates, state, args.repeats, args.rounds)
  rates = {n: steps / min(t) for n, t in times.items()}
  for n, t in times.items():
    print(f"  {n:<11} {rates[n]:9.1f} client steps/s (best {min(t):.3f}s, "
          f"median {statistics.median(t):.3f}s, compile {compile_s[n]:.1f}s)")
  best = max(rates["vectorized"], rates["fast path"])
  return {"params": size, "steps_per_repeat": steps,
          "steps_per_second": rates, "max_abs_diff_vs_loop": diff,
          "ratio": best / rates["loop"]}


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  info = print_machine()
  snippets = corpus(args.roles)
  data, cut = text.federated_text(snippets, max_sequences=args.max_sequences)
  real = int(data.count.sum())
  print(f"corpus: {args.roles} roles, {sum(map(len, snippets))} snippets, "
        f"{real} sequences kept ({cut} cut by --max-sequences "
        f"{args.max_sequences}); sequences per role median "
        f"{int(np.median(data.count))}, max {int(data.count.max())}",
        flush=True)
  out = {"machine": info, "args": vars(args), "models": {}}
  for name in args.models.split(","):
    out["models"][name] = time_model(name, data, args)
  for name, row in out["models"].items():
    print(f"{name} ratio (vectorized / loop): {row['ratio']:.2f}")
  out["ratio"] = min(row["ratio"] for row in out["models"].values())
  return finish(out, args.json)


if __name__ == "__main__":
  main()
