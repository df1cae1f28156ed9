"""`fedjax-tl sweep`: discrete settings x seeds x hyperparameters, as tables.

Discrete settings (`sweep_alpha`, `sweep_policy`) run one after another, each
saved in `workdir/groups/` as it completes, so a rerun resumes; within one,
seeds x continuous values are one program over a vmapped runs axis (Hparams
traced, `sweep_batch` runs at a time). Rows go to `workdir/sweep.csv`, each
setting's mean and spread over seeds to `workdir/sweep.md`, and each row to
the metric writers as a run of its own (`writers.write_sweep`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import re
import sys
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from fedjax_tl import checkpoint, files, runner, schema
from fedjax_tl.config import ExperimentConfig, default_config, validate
from fedjax_tl.errors import ConfigError
from fedjax_tl.evaluation import make_evaluator, statistics_data
from fedjax_tl.experiment import progress as progress_lib
from fedjax_tl.experiment import writers
from fedjax_tl.experiment import stops
from fedjax_tl.experiment.relations import policy_variant, unread_keys
from fedjax_tl.experiment.workdir import locked
from fedjax_tl.simulation import run_slice, stack_runs

# The Hparams a sweep may vary, each from its config key `sweep_<name>`.
SWEPT = ("client_lr", "server_lr", "mu")
# The config keys a sweep runs one value after another (`sweep_<name>`):
# each changes the data partition or the compiled program.
DISCRETE = ("alpha", "policy")


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


def sweep_settings(config: ml_collections.ConfigDict | ExperimentConfig
                   ) -> list[tuple[dict[str, Any], ExperimentConfig]]:
  """The discrete settings of the sweep spec, each with its validated config.

  The grid product of the non-empty `sweep_alpha` and `sweep_policy` tuples
  (the last varying fastest), as `(setting, config)` pairs; `[({}, config)]`
  when neither is set. Each setting is validated afresh, so what validate
  derives from the policy (masked cross-entropy's default) follows the
  setting's policy.

  Raises:
    ConfigError: a bad config, or a setting it does not allow (e.g. a policy
      algorithm=heterofl refuses), naming the setting, key and value.
  """
  if isinstance(config, ExperimentConfig):
    base = config
  elif config.sweep_policy:  # a policy's own keys reach it only
    base = validate(policy_variant(config, config.policy))
    unread_keys(config, base.sweep_policy)
  else:
    base = validate(config)
  axes = {name: getattr(base, f"sweep_{name}") for name in DISCRETE
          if getattr(base, f"sweep_{name}")}
  if not axes:
    return [({}, base)]
  raw = (_config_dict(base) if isinstance(config, ExperimentConfig) else
         ml_collections.ConfigDict(config))
  settings = []
  for values in itertools.product(*axes.values()):
    setting = dict(zip(axes, values))
    variant = (policy_variant(raw, setting["policy"]) if "policy" in setting
               else ml_collections.ConfigDict(raw))
    variant.update(setting)
    try:
      settings.append((setting, validate(variant)))
    except ConfigError as e:
      raise ConfigError(f"sweep setting {group_name(setting)}: {e}") from None
  return settings


def _config_dict(cfg: ExperimentConfig) -> ml_collections.ConfigDict:
  """A ConfigDict validating back to `cfg`, where what validate derives from
  other keys (tiers from capacity_mix; masked_ce at its policy default) is
  left for it to derive again."""
  values = dataclasses.asdict(cfg)
  if cfg.capacity_mix is not None:
    del values["tier_fractions"], values["tier_proportions"]
  if cfg.masked_ce == runner.experiment_policy(cfg).default("masked_ce",
                                                           False):
    values["masked_ce"] = None
  config = default_config()
  config.update(values)
  return config


def group_name(setting: dict[str, Any]) -> str:
  """A discrete setting as a file name, e.g. `alpha-0.1_policy-fedrolex`
  (values exact: floats as their shortest round-trip text)."""
  if not setting:
    return "all"
  text = "_".join(f"{k}-{v!r}" if isinstance(v, float) else f"{k}-{v}"
                  for k, v in setting.items())
  return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def sweep(config: ml_collections.ConfigDict | ExperimentConfig,
          workdir: str | pathlib.Path, *, overwrite: bool = False,
          progress: bool = True, quiet: bool = False) -> list[dict[str, Any]]:
  """Runs the config's sweep spec; writes and returns the rows of sweep.csv.

  Every run starts from the same pretrained model (pretrained once, with the
  config's seed, and saved in `workdir/pretrained`: alpha and policy leave
  the source data alone) on the same population; a run's seed drives its
  federated randomness only (cohorts, unit masks, batches). Each row holds
  the discrete setting (alpha, policy: only swept keys), the swept
  continuous values, the seed, the final global accuracy (the widest
  tier's model, as `run`), the worst tier's, both before federated
  training too (`initial_*`: the same for every run of a setting), each
  tier's accuracy, bytes up and down and simulated seconds; first
  `schema_version` (docs/outputs.md).

  Each discrete setting's rows are saved in `workdir/groups/<name>.json` as
  soon as it completes; rerunning the same sweep in the same workdir skips
  the settings saved there for the same config. `sweep.md` gets one row per
  setting (discrete and continuous values): the mean and sample standard
  deviation over seeds of the global, worst-tier and per-tier accuracy.

  Raises:
    ConfigError: a bad config value or setting (before anything runs).
    UserError: a workdir holding a different experiment, without
      `overwrite`, or in use by another run (its lock).
    DiskFullError: a write found no space (nothing partial left).
    Stopped: SIGINT / SIGTERM (exit 130 / 143): the setting in progress is
      abandoned at the next boundary between compiled calls; the settings
      saved in `groups/` are kept, so the same command resumes.
  """
  # Over ~60 lines only for its docstring; the body is short.
  settings = sweep_settings(config)  # every setting checked before any runs
  base = config if isinstance(config, ExperimentConfig) else validate(config)
  workdir = pathlib.Path(workdir)
  log = (lambda *a: None) if quiet else (
      lambda msg: print(msg, file=sys.stderr, flush=True))
  runner.check_workdir(workdir, base, overwrite)  # read only, unlocked
  # One run at a time in a workdir; SIGINT / SIGTERM stop it at the next
  # boundary between compiled calls (the setting in progress is rerun).
  with stops.stop_on_signals() as stop, locked(workdir):
    replace = runner.check_workdir(workdir, base, overwrite)  # under the lock
    started = False

    def open_workdir() -> None:
      # Only once the first setting's inputs have proved good is anything in
      # the workdir touched (old outputs removed if `replace`).
      nonlocal started
      if not started:
        runner.start_workdir(workdir, base, replace)
        (workdir / "groups").mkdir(exist_ok=True)
        for setting, _ in settings:  # a killed write's temporary file
          files.remove_stale_temporaries(
              workdir / "groups" / f"{group_name(setting)}.json")
        started = True

    rows = []
    for done, (setting, cfg) in enumerate(settings):
      name = group_name(setting)
      group_file = workdir / "groups" / f"{name}.json"
      saved = None if replace else _saved_group(group_file, cfg)
      if saved is not None:
        log(f"sweep: {name}: done earlier ({group_file}), skipped")
        rows += saved
        continue
      if setting:
        log(f"sweep: {name}")
      stop.where = (f"in sweep setting {name} ({done} of {len(settings)} "
                    "settings saved; this one is rerun)")
      group_rows = [{**setting, **row} for row in _sweep_setting(
          cfg, workdir, replace and not started, open_workdir,
          progress and not quiet, log, stop)]
      files.write_text_atomic(group_file, files.dumps(
          {"config": cfg.to_dict(), "rows": group_rows}, indent=1) + "\n")
      rows += group_rows
    stop.check(f"after all {len(settings)} settings ran, before the tables")
    open_workdir()  # a sweep done earlier still rewrites its tables
    # All or nothing; a full disk: one line (DiskFullError), no partial file.
    files.write_csv_atomic(workdir / "sweep.csv", rows)
    files.write_text_atomic(workdir / "sweep.md",
                                 format_sweep_md(summarize_sweep(rows)) + "\n")
    writers.write_sweep(base.writers, workdir, base.to_dict(), rows,
                        base.num_rounds, (*DISCRETE, *SWEPT, "seed"))
    return rows


def _saved_group(path: pathlib.Path, cfg: ExperimentConfig
                 ) -> list[dict[str, Any]] | None:
  """A completed setting's rows, or None: absent, unreadable, saved for
  another config (e.g. fewer rounds) or by a fedjax-tl writing another
  schema_version (its rows lack columns: the setting runs again)."""
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  # Keys that leave the results alone may differ; num_rounds may not.
  same = set(runner.RESUMABLE_KEYS) - {"num_rounds"}
  want = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items()
          if k not in same}
  if not (isinstance(saved, dict) and isinstance(saved.get("config"), dict)
          and saved.get("rows")) or any(
              not isinstance(r, dict) or r.get("schema_version") !=
              schema.SCHEMA_VERSION for r in saved["rows"]):
    return None
  got = {k: v for k, v in saved["config"].items() if k not in same}
  return saved["rows"] if got == want else None


def _sweep_setting(cfg: ExperimentConfig, workdir: pathlib.Path,
                   replace: bool, open_workdir: Callable[[], None],
                   progress: bool, log: Any,
                   stop: stops.StopFlag) -> list[dict[str, Any]]:
  """The rows of one discrete setting: its grid in vmapped batches.

  `replace`: the saved pretrained model is another experiment's;
  `open_workdir` prepares the workdir once the inputs have proved good.
  `stop` is checked between compiled calls (building, pretraining, each
  round of runs): a signal abandons the setting (Stopped), its runs are
  not saved.
  """
  # A few lines over ~60: its steps (pretrain once, batch the grid, save
  # the group) share the experiment's state.
  exp = runner.build_experiment(cfg)
  sim, pop = exp.simulation, exp.population
  stop.check()  # a signal while building: nothing written for it yet
  saved = workdir / "pretrained"
  params, _, fresh = runner.initial_params(exp, None if replace else saved,
                                           log)
  stop.check()  # ... or while pretraining
  open_workdir()
  if fresh:
    checkpoint.save_params(saved, params)
  params = runner.federated_params(exp, params)
  params, _ = runner.prepared_params(exp, params, workdir, False, log)
  evaluate = make_evaluator(
      sim.model, exp.data.target_test, masks_fn=sim.deployed_masks,
      stats_data=statistics_data(sim.model, exp.data.clients),
      **exp.data.counting)
  fractions = np.asarray(pop.tier_fractions, np.float32)
  best = int(np.argmax(pop.tier_fractions))
  # Where every run starts (round 0): the heat maps' colour baseline.
  start, _ = evaluate(sim.init(params).params, fractions)
  initial = {"initial_accuracy": float(start[best]),
             "initial_worst_tier_accuracy": float(start.min())}

  grid = sweep_grid(cfg)
  batch = min(cfg.sweep_batch or len(grid), len(grid))
  num_batches = -(-len(grid) // batch)
  log(f"sweep: {len(grid)} runs of {cfg.num_rounds} rounds, {batch} vmapped "
      f"per program ({num_batches} batch(es))")
  bar = progress_lib.make(num_batches * cfg.num_rounds, 0, progress)
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
      bar.update(1)
      stop.check()
    for i, run in enumerate(runs):
      state = run_slice(states, i)
      acc, _ = evaluate(state.params, fractions)
      totals = {k: np.asarray(v, np.float64) for k, v in state.totals.items()}
      row = {"schema_version": schema.SCHEMA_VERSION, **run,
             "accuracy": float(acc[best]),
             "worst_tier_accuracy": float(acc.min()), **initial}
      row.update({f"tier_{name}_accuracy": float(a)
                  for name, a in zip(pop.tier_names, acc)})
      row.update({"bytes_up": float(totals["bytes_up"].sum()),
                  "bytes_down": float(totals["bytes_down"].sum()),
                  "sim_seconds": float(totals["sim_seconds"]),
                  **runner.privacy_record(sim, state)})
      rows.append(row)
  bar.close()
  log(f"sweep: {len(grid)} runs in {time.perf_counter() - start:.1f}s")
  return rows


def summarize_sweep(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The sweep per setting, seeds pooled: what `sweep.md` shows.

  One dict per setting (its discrete and continuous swept values, in order
  of first appearance) with `seeds` (the number of rows) and, for every
  accuracy column (global, worst tier, each tier), `<column>_mean` and
  `<column>_std`: the sample standard deviation over seeds (None for one).
  """
  keys = [k for k in rows[0] if k in DISCRETE or k in SWEPT]
  metrics = [k for k in rows[0] if k.endswith("accuracy")]
  groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in keys), []).append(row)
  summary = []
  for values, members in groups.items():
    entry = {**dict(zip(keys, values)), "seeds": len(members)}
    for metric in metrics:
      x = np.array([r[metric] for r in members], np.float64)
      entry[f"{metric}_mean"] = float(x.mean())
      entry[f"{metric}_std"] = float(x.std(ddof=1)) if x.size > 1 else None
    summary.append(entry)
  return summary


def format_sweep_md(summary: list[dict[str, Any]]) -> str:
  """:func:`summarize_sweep` as a markdown table, `mean ± std` per cell."""
  keys = [k for k in summary[0] if not k.endswith(("_mean", "_std"))]
  metrics = [k[:-len("_mean")] for k in summary[0] if k.endswith("_mean")]

  def cell(entry, metric):
    mean, std = entry[f"{metric}_mean"], entry[f"{metric}_std"]
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"

  lines = ["| " + " | ".join(keys + metrics) + " |",
           "|" + " --- |" * (len(keys) + len(metrics))]
  lines += ["| " + " | ".join([_text(e[k]) for k in keys] +
                              [cell(e, m) for m in metrics]) + " |"
            for e in summary]
  return "\n".join(lines)


def _text(value: Any) -> str:
  return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def format_sweep(rows: list[dict[str, Any]]) -> str:
  """A short table: swept values, seed, global and worst-tier accuracy."""
  keys = [k for k in rows[0] if k in DISCRETE or k in SWEPT or k == "seed"]
  keys += ["accuracy", "worst_tier_accuracy"]
  header = ["worst_tier" if k == "worst_tier_accuracy" else k for k in keys]
  cells = [[f"{r[k]:.3f}" if k in ("accuracy", "worst_tier_accuracy") else
            _text(r[k]) for k in keys] for r in rows]
  widths = [max(len(h), *(len(c[i]) for c in cells))
            for i, h in enumerate(header)]
  lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
  lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths))
            for row in cells]
  return "\n".join(lines)
