"""`fedjax-tl sweep`: seeds x continuous hyperparameters as vmapped runs.

Each discrete setting's grid is one program over a runs axis (Hparams traced,
`sweep_batch` runs at a time); the rows go to `workdir/sweep.csv`.
"""

from __future__ import annotations

import csv
import itertools
import pathlib
import sys
import time
from typing import Any

import ml_collections
import numpy as np

from fedjax_tl import checkpoint, runner
from fedjax_tl.config import ExperimentConfig, validate
from fedjax_tl.evaluation import make_evaluator
from fedjax_tl.simulation import run_slice, stack_runs

# The Hparams a sweep may vary, each from its config key `sweep_<name>`.
SWEPT = ("client_lr", "server_lr", "mu")


def sweep_grid(cfg: ExperimentConfig) -> list[dict[str, Any]]:
  """The runs of the sweep spec, as `Simulation.hparams` keyword arguments.

  The grid product of the non-empty `sweep_<name>` tuples (in SWEPT order,
  the last varying fastest), each setting repeated for every seed of
  `sweep_seeds` (the config's `seed` when empty). Only swept names appear.
  """
  axes = {name: getattr(cfg, f"sweep_{name}") for name in SWEPT
          if getattr(cfg, f"sweep_{name}")}
  seeds = cfg.sweep_seeds or (cfg.seed,)
  return [{**dict(zip(axes, values)), "seed": seed}
          for values in itertools.product(*axes.values()) for seed in seeds]


def sweep(config: ml_collections.ConfigDict | ExperimentConfig,
          workdir: str | pathlib.Path, *, overwrite: bool = False,
          progress: bool = True, quiet: bool = False) -> list[dict[str, Any]]:
  """Runs the config's sweep spec; writes and returns the rows of sweep.csv.

  Every run starts from the same pretrained model (pretrained once, with the
  config's seed, and saved in `workdir/pretrained`) on the same population
  and data; a run's seed drives its federated randomness only (cohorts,
  unit masks, batches). Each row holds the swept values, the seed, the final
  global accuracy (the widest tier's model, as `run`), the worst tier's and
  each tier's accuracy, bytes up and down and simulated seconds.

  Raises:
    ConfigError: a bad config value (before anything runs).
    UserError: a workdir holding a different experiment, without
      `overwrite`.
  """
  cfg = config if isinstance(config, ExperimentConfig) else validate(config)
  workdir = pathlib.Path(workdir)
  log = (lambda *a: None) if quiet else (
      lambda msg: print(msg, file=sys.stderr, flush=True))
  replace = runner.check_workdir(workdir, cfg, overwrite)
  # Discrete settings (one compiled program each) run one after another;
  # today the spec has one, the config itself.
  rows = []
  for setting in (cfg,):
    rows += _sweep_setting(setting, workdir, replace, progress and not quiet,
                           log)
  with open(workdir / "sweep.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return rows


def _sweep_setting(cfg: ExperimentConfig, workdir: pathlib.Path,
                   replace: bool, progress: bool, log: Any
                   ) -> list[dict[str, Any]]:
  """The rows of one discrete setting: its grid in vmapped batches."""
  exp = runner.build_experiment(cfg)
  sim, pop = exp.simulation, exp.population
  saved = workdir / "pretrained"
  params, _, fresh = runner.initial_params(exp, None if replace else saved,
                                           log)
  # Only once the inputs have proved good is anything in the workdir touched.
  runner.start_workdir(workdir, cfg, replace)
  if fresh:
    checkpoint.save_params(saved, params)
  params = runner.federated_params(exp, params)
  if cfg.policy == "distill":
    params, _ = runner.distilled_params(exp, params, workdir, False, log)
  evaluate = make_evaluator(sim.model, exp.data.target_test,
                            masks_fn=sim.deployed_masks)
  fractions = np.asarray(pop.tier_fractions, np.float32)
  best = int(np.argmax(pop.tier_fractions))

  grid = sweep_grid(cfg)
  batch = min(cfg.sweep_batch or len(grid), len(grid))
  num_batches = -(-len(grid) // batch)
  log(f"sweep: {len(grid)} runs of {cfg.num_rounds} rounds, {batch} vmapped "
      f"per program ({num_batches} batch(es))")
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=num_batches * cfg.num_rounds, unit="round",
               file=sys.stderr, dynamic_ncols=True)
  rows = []
  start = time.perf_counter()
  for first in range(0, len(grid), batch):
    runs = grid[first:first + batch]
    # A short last batch repeats its last run: one program for every batch.
    hparams = stack_runs([sim.hparams(**run) for run in
                          runs + [runs[-1]] * (batch - len(runs))])
    states = sim.init_runs(params, batch)
    for _ in range(cfg.num_rounds):
      states, _ = sim.round_runs(states, hparams)
      if bar is not None:
        bar.update(1)
    for i, run in enumerate(runs):
      state = run_slice(states, i)
      acc, _ = evaluate(state.params, fractions)
      totals = {k: np.asarray(v, np.float64) for k, v in state.totals.items()}
      row = {**run, "accuracy": float(acc[best]),
             "worst_tier_accuracy": float(acc.min())}
      row.update({f"tier_{name}_accuracy": float(a)
                  for name, a in zip(pop.tier_names, acc)})
      row.update({"bytes_up": float(totals["bytes_up"].sum()),
                  "bytes_down": float(totals["bytes_down"].sum()),
                  "sim_seconds": float(totals["sim_seconds"])})
      rows.append(row)
  if bar is not None:
    bar.close()
  log(f"sweep: {len(grid)} runs in {time.perf_counter() - start:.1f}s")
  return rows


def format_sweep(rows: list[dict[str, Any]]) -> str:
  """A short table: swept values, seed, global and worst-tier accuracy."""
  keys = [k for k in rows[0] if k in SWEPT or k == "seed"]
  keys += ["accuracy", "worst_tier_accuracy"]
  header = ["worst_tier" if k == "worst_tier_accuracy" else k for k in keys]
  cells = [[f"{r[k]:.3f}" if k in ("accuracy", "worst_tier_accuracy") else
            f"{r[k]:g}" for k in keys] for r in rows]
  widths = [max(len(h), *(len(c[i]) for c in cells))
            for i, h in enumerate(header)]
  lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
  lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths))
            for row in cells]
  return "\n".join(lines)
