"""The host loop: build an experiment, pretrain, run rounds, evaluate, save.

Everything with a side effect lives here (files, progress, checkpoints); the
rounds themselves are one compiled function each. `build_experiment` and
`run` are the library API a notebook or sweep script calls; the CLI is a thin
layer on top.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np

from fedjax_tl import checkpoint
from fedjax_tl.algorithms import server_optimizer
from fedjax_tl.client import client_optimizer, make_client_update
import ml_collections

from fedjax_tl.config import ExperimentConfig, validate
from fedjax_tl.data.federated import TransferData
from fedjax_tl.device_catalog import profiles_for_tiers
from fedjax_tl.devices import Population, make_population
from fedjax_tl.errors import UserError
from fedjax_tl.evaluation import make_evaluator
from fedjax_tl.models import ModelDef, build_model
from fedjax_tl.policies import DEPTH_POLICIES
from fedjax_tl.simulation import Simulation
from fedjax_tl.transfer import pretrain, reorder_by_importance

# Files this package writes in a workdir; --overwrite removes only these.
OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints",
           "pretrained")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A built experiment: data, population, model and compiled simulation."""
  config: ExperimentConfig
  data: TransferData
  population: Population
  model: ModelDef
  simulation: Simulation


def load_data(cfg: ExperimentConfig) -> TransferData:
  """The experiment's transfer data: embedded digits or a tfds data set."""
  if cfg.data == "digits":
    from fedjax_tl.data.digits import load_digits_transfer
    return load_digits_transfer(
        cfg.num_clients, alpha=cfg.alpha, min_examples=cfg.min_examples,
        max_examples=cfg.max_examples, seed=cfg.seed)
  from fedjax_tl.data.tfds_source import load_tfds_transfer
  return load_tfds_transfer(
      cfg.data, cfg.num_clients, partition_method=cfg.partition,
      alpha=cfg.alpha, min_examples=cfg.min_examples,
      max_examples=cfg.max_examples, source_fraction=cfg.source_fraction,
      seed=cfg.seed, data_dir=cfg.data_dir)


def auto_chunk_size(cfg: ExperimentConfig, num_params: int) -> int:
  """Clients vmapped together when `chunk_size=0`.

  On XLA:CPU a client's work is bound by passes over its own copy of the
  params; a chunk pays off while the chunk's copies stay in cache (about
  1-2 MB; measured with benchmarks/round_throughput.py), and vmapped
  convolutions run poorly (DESIGN.md rule 7). Accelerators favour large
  chunks. Among sizes near the target, the one padding the cohort least.
  """
  if jax.default_backend() == "cpu":
    target = 2 if cfg.model == "cnn" else int(np.clip(
        2_000_000 // (4 * num_params), 1, 32))
  else:
    target = 256
  target = min(target, cfg.clients_per_round)
  candidates = range(max(1, target // 2), target + 1)
  return min(candidates, key=lambda c: (-(-cfg.clients_per_round // c) * c, -c))


def build_experiment(cfg: ExperimentConfig) -> Experiment:
  """Loads data, makes the population and model, binds the simulation."""
  data = load_data(cfg)
  population = make_population(
      cfg.num_clients, cfg.tier_fractions, cfg.tier_proportions,
      min_availability=cfg.min_availability, seed=cfg.seed)
  population = dataclasses.replace(population, profiles=profiles_for_tiers(
      population.tier, cfg.device_classes, seed=cfg.seed,
      jitter=cfg.device_jitter))
  model = build_model(cfg.model, data.input_shape, data.num_classes,
                      seed=cfg.seed, hidden=cfg.hidden,
                      cnn_channels=cfg.cnn_channels, cnn_dense=cfg.cnn_dense)
  update = make_client_update(
      model.apply,
      client_optimizer(cfg.client_lr, cfg.client_momentum, cfg.weight_decay),
      local_steps=cfg.local_steps, batch_size=cfg.batch_size, mu=cfg.mu)
  simulation = Simulation.create(
      model, update,
      server_optimizer(cfg.algorithm, cfg.server_lr, cfg.server_eps),
      data.clients, population, cohort_size=cfg.clients_per_round,
      chunk_size=cfg.chunk_size or auto_chunk_size(
          cfg, sum(np.size(a) for a in jax.tree.leaves(model.init_params))),
      local_steps=cfg.local_steps, seed=cfg.seed, policy=cfg.policy,
      batch_size=cfg.batch_size, round_deadline=cfg.round_deadline,
      deadline_mode=cfg.deadline_mode,
      heterofl_mode=cfg.heterofl_mode, scaler=cfg.scaler,
      masked_ce=cfg.masked_ce)
  return Experiment(cfg, data, population, model, simulation)


def check_workdir(workdir: pathlib.Path, cfg: ExperimentConfig,
                  overwrite: bool) -> bool:
  """Refuses a workdir holding another experiment, unless `overwrite`.

  The same experiment (all keys equal but `num_rounds`) resumes. Nothing is
  written or removed here; returns whether old outputs must be replaced.
  """
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir={str(workdir)!r} is not a directory")
  saved_file = workdir / "config.json"
  if not saved_file.exists():
    return False
  try:
    saved = json.loads(saved_file.read_text())
  except json.JSONDecodeError:
    saved = None
  new = cfg.to_dict()
  if isinstance(saved, dict) and {k: v for k, v in saved.items()
                                  if k != "num_rounds"} == {
                                      k: v for k, v in new.items()
                                      if k != "num_rounds"}:
    return False
  if not overwrite:
    diff = ("unreadable config.json" if not isinstance(saved, dict) else
            ", ".join(f"{k}: {saved.get(k)!r} -> {new[k]!r}" for k in new
                      if k != "num_rounds" and saved.get(k) != new[k])[:300])
    raise UserError(f"--workdir={str(workdir)!r} holds a different "
                    f"experiment ({diff}); use --overwrite to replace it")
  return True


def start_workdir(workdir: pathlib.Path, cfg: ExperimentConfig,
                  replace: bool) -> None:
  """Removes this package's old outputs if `replace`, then saves the config."""
  if replace:
    for name in OUTPUTS:
      path = workdir / name
      if path.is_dir():
        shutil.rmtree(path)
      elif path.exists():
        path.unlink()
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) +
                                       "\n")


def initial_params(exp: Experiment, saved: pathlib.Path | None,
                   log: Any) -> tuple[Any, str, bool]:
  """The params migrated onto the devices.

  Returns `(params, origin, fresh)`: where they came from, and whether they
  were just pretrained (and so should be saved). `saved` is this run's own
  earlier pretrained model, if it may be reused.
  """
  cfg, model = exp.config, exp.model
  if cfg.pretrain == "none":
    return model.init_params, "none", False
  if cfg.pretrain != "source":
    path = pathlib.Path(cfg.pretrain)
    return checkpoint.load_params(path, model.init_params), cfg.pretrain, False
  if saved is not None and saved.exists():
    return checkpoint.load_params(saved, model.init_params), "source", False
  start = time.perf_counter()
  params, loss = pretrain(model.apply, model.init_params,
                          exp.data.source_train, steps=cfg.pretrain_steps,
                          batch_size=cfg.pretrain_batch_size,
                          learning_rate=cfg.pretrain_lr, seed=cfg.seed)
  log(f"pretrained on {exp.data.name} source ({len(exp.data.source_train)} "
      f"examples, {cfg.pretrain_steps} steps) in "
      f"{time.perf_counter() - start:.1f}s, final loss {loss:.3f}")
  return params, "source", True


def run(cfg: ExperimentConfig, workdir: str | pathlib.Path, *,
        overwrite: bool = False, progress: bool = True,
        quiet: bool = False) -> dict[str, Any]:
  """Runs (or resumes) an experiment in `workdir`; returns the summary."""
  start = time.perf_counter()
  workdir = pathlib.Path(workdir)
  log = (lambda *a: None) if quiet else (
      lambda msg: print(msg, file=sys.stderr, flush=True))
  replace = check_workdir(workdir, cfg, overwrite)
  exp = build_experiment(cfg)
  sim, pop = exp.simulation, exp.population
  log(f"{exp.data.name}: {pop.num_devices} devices "
      f"(tiers {dict(zip(pop.tier_names, pop.tier_counts().tolist()))}), "
      f"{cfg.clients_per_round} per round, chunk size {sim.chunk_size}, "
      f"{jax.device_count()} {jax.default_backend()} device(s)")
  saved = workdir / "pretrained"
  params, origin, fresh = initial_params(exp, None if replace else saved, log)
  # Only once the inputs have proved good is anything in the workdir touched.
  start_workdir(workdir, cfg, replace)
  if fresh:
    checkpoint.save_params(saved, params)
  if cfg.policy == "importance":
    params = reorder_by_importance(params, exp.model.layers,
                                   exp.model.group_sizes)
  evaluate = make_evaluator(exp.model, exp.data.target_test,
                            scaler=cfg.scaler)
  evaluate_source = make_evaluator(exp.model, exp.data.source_test)
  # Each tier's deployed model: its width slice, or (depth policies) all of it.
  fractions = np.asarray(pop.tier_fractions, np.float32)
  if cfg.policy in DEPTH_POLICIES:
    fractions = np.ones_like(fractions)

  ckpts = checkpoint.RoundCheckpoints(workdir / "checkpoints",
                                      cfg.keep_checkpoints)
  state = sim.init(params)
  metrics_file = workdir / "metrics.jsonl"
  records: list[dict[str, Any]] = []
  latest = ckpts.latest_round()
  if latest is not None:
    state = ckpts.restore(latest, state)
    log(f"resuming from the checkpoint of round {latest}")
  if metrics_file.exists():
    # Records past the checkpoint are recomputed, identically.
    records = [r for r in map(json.loads, metrics_file.read_text().splitlines())
               if r["round"] <= (latest or 0)]

  def evaluation(round_index: int, train_loss: float | None) -> dict[str, Any]:
    acc, loss = evaluate(state.params, fractions)
    src_acc, _ = evaluate_source(state.params, np.ones(1, np.float32))
    best = int(np.argmax(pop.tier_fractions))
    totals = {k: np.asarray(v, np.float64) for k, v in state.totals.items()}
    per_tier = lambda values: dict(zip(pop.tier_names, values.tolist()))
    return {"round": round_index, "accuracy": float(acc[best]),
            "loss": float(loss[best]),
            "per_tier_accuracy": per_tier(acc),
            "per_tier_loss": per_tier(loss),
            "source_accuracy": float(src_acc[0]), "train_loss": train_loss,
            "bytes_down": float(totals["bytes_down"].sum()),
            "bytes_up": float(totals["bytes_up"].sum()),
            **{f"per_tier_{name}": per_tier(totals[name]) for name in
               ("bytes_down", "bytes_up", "updates", "dropped")},
            "sim_seconds": float(totals["sim_seconds"]),
            "wall_seconds": round(time.perf_counter() - start, 3)}

  def write_metrics() -> None:
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in records))

  if not records:
    records.append(evaluation(0, None))
    write_metrics()
  first = int(state.round)
  rounds = range(first, cfg.num_rounds)
  bar = None
  if progress and not quiet and len(rounds):
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.num_rounds, initial=first, unit="round",
               file=sys.stderr, dynamic_ncols=True)
  for r in rounds:
    state, stats = sim.round(state)
    done = r + 1
    if done % cfg.eval_every == 0 or done == cfg.num_rounds:
      records.append(evaluation(done, float(stats.train_loss)))
      write_metrics()
      if bar is not None:
        bar.set_postfix(acc=f"{records[-1]['accuracy']:.3f}",
                        worst=f"{min(records[-1]['per_tier_accuracy'].values()):.3f}")
    if done % cfg.checkpoint_every == 0 or done == cfg.num_rounds:
      ckpts.save(done, state)
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  ckpts.close()

  final = records[-1]
  if final["round"] != int(state.round):  # e.g. re-running a finished run
    final = evaluation(int(state.round), None)
  summary = {
      "accuracy": final["accuracy"], "loss": final["loss"],
      "per_tier_accuracy": final["per_tier_accuracy"],
      "worst_tier_accuracy": min(final["per_tier_accuracy"].values()),
      "source_accuracy": final["source_accuracy"],
      "initial_accuracy": records[0]["accuracy"],
      "initial_per_tier_accuracy": records[0]["per_tier_accuracy"],
      "bytes_down": final["bytes_down"], "bytes_up": final["bytes_up"],
      "per_tier_bytes_up": final["per_tier_bytes_up"],
      "sim_seconds": final["sim_seconds"],
      "per_tier_dropped": final["per_tier_dropped"],
      "rounds": int(state.round), "num_clients": cfg.num_clients,
      "clients_per_round": cfg.clients_per_round,
      "algorithm": cfg.algorithm, "policy": cfg.policy, "model": cfg.model,
      "data": exp.data.name, "seed": cfg.seed, "pretrain": origin,
      "chunk_size": sim.chunk_size,
      "wall_seconds": round(time.perf_counter() - start, 3),
  }
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """A short human-readable table of the per-tier results."""
  lines = [f"{'tier (width)':<14}{'start':>8}{'final':>8}"]
  for name, acc in summary["per_tier_accuracy"].items():
    lines.append(f"{name:<14}{summary['initial_per_tier_accuracy'][name]:>8.3f}"
                 f"{acc:>8.3f}")
  lines.append(f"global accuracy {summary['accuracy']:.3f} after "
               f"{summary['rounds']} rounds (pretrain={summary['pretrain']}), "
               f"worst tier {summary['worst_tier_accuracy']:.3f}, "
               f"{summary['wall_seconds']:.1f}s")
  return "\n".join(lines)


def compare(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
            overwrite: bool = False, progress: bool = True,
            quiet: bool = False) -> list[dict[str, Any]]:
  """Runs every policy of `config.compare_policies` side by side.

  Each policy runs as its own experiment in `workdir/<policy>` (resumable
  like `run`) with the same population, data, pretrained model and seed, all
  deterministic from the config; per-policy defaults (masked cross-entropy)
  apply. Writes `workdir/comparison.csv` and `workdir/comparison.md`.
  """
  workdir = pathlib.Path(workdir)
  base = validate(config)  # every value checked before anything runs
  configs = []
  for policy in base.compare_policies:
    variant = ml_collections.ConfigDict(config)
    variant.policy = policy
    configs.append(validate(variant))
  rows = []
  for cfg in configs:
    if not quiet:
      print(f"== policy {cfg.policy}", file=sys.stderr, flush=True)
    summary = run(cfg, workdir / cfg.policy, overwrite=overwrite,
                  progress=progress, quiet=quiet)
    row = {"policy": cfg.policy, "accuracy": summary["accuracy"],
           "worst_tier_accuracy": summary["worst_tier_accuracy"]}
    row.update({f"tier_{name}_accuracy": acc
                for name, acc in summary["per_tier_accuracy"].items()})
    row.update({key: summary[key] for key in ("bytes_up", "bytes_down",
                                              "sim_seconds", "wall_seconds")})
    rows.append(row)
  with open(workdir / "comparison.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  (workdir / "comparison.md").write_text(format_comparison(rows) + "\n")
  return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
  """The comparison as a markdown table (accuracies to 3 places, MB)."""
  columns = list(rows[0])

  def cell(key, value):
    if key.startswith("bytes"):
      return f"{value / 1e6:.1f} MB"
    return f"{value:.3f}" if isinstance(value, float) else str(value)

  lines = ["| " + " | ".join(columns) + " |",
           "|" + " --- |" * len(columns)]
  lines += ["| " + " | ".join(cell(k, r[k]) for k in columns) + " |"
            for r in rows]
  return "\n".join(lines)
