"""A run's summary (summary.json): the final record's figures per tier, the
initial ones, the costs of each tier, what reaching the target took, and how
the run was set up; and the table `fedjax-tl run` prints from it.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import cost, files, schema, sharding
from fedjax_tl.engine import timing
from fedjax_tl.experiment.build import Experiment
from fedjax_tl.experiment.outputs import Metrics, data_record, privacy_record
from fedjax_tl.models import num_params

TARGET_KEYS = ("target_accuracy", "rounds_to_target", "sim_seconds_to_target",
               "bytes_to_target")


def time_to_target(records: list[dict[str, Any]],
                   target: float | None) -> dict[str, Any]:
  """What reaching a global accuracy of `target` took (the TARGET_KEYS).

  The first evaluated record (metrics.jsonl order) whose `accuracy` is >=
  `target` gives its round, simulated seconds and bytes up + down; all three
  are None when no record reaches it, and the dict is empty when `target` is
  None (no target set).
  """
  if target is None:
    return {}
  hit = next((r for r in records if r["accuracy"] >= target), None)
  return {"target_accuracy": target,
          "rounds_to_target": None if hit is None else hit["round"],
          "sim_seconds_to_target": None if hit is None else hit["sim_seconds"],
          "bytes_to_target": None if hit is None else
                             hit["bytes_up"] + hit["bytes_down"]}


def model_record(exp: Experiment) -> dict[str, Any]:
  """The model's size: `num_params` (the global model the server holds),
  and each tier's deployed sub-model's parameters, their bytes
  (`cost.mask_bytes`) and forward FLOPs per example (`cost.forward_flops`:
  2 per multiply-add, kernels only)."""
  sim = exp.simulation
  params = sim.model.init_params
  positions = dict(sim.time_model.conv_positions)
  names = exp.population.tier_names

  @jax.jit  # one program, compiled once for every tier (see tier_cost_record)
  def sizes(fraction):
    mask = sim.deployed_masks(fraction, params)
    return (cost.mask_count(mask, params), cost.mask_bytes(mask, params),
            cost.forward_flops(sim.model.layers, params, mask, positions))

  params_, bytes_, flops = [], [], []
  for fraction in exp.population.tier_fractions:
    count, size, forward = sizes(jnp.float32(fraction))
    params_.append(int(count))
    bytes_.append(float(size))
    flops.append(float(forward))
  return {"num_params": num_params(params),
          "per_tier_params": dict(zip(names, params_)),
          "per_tier_model_bytes": dict(zip(names, bytes_)),
          "per_tier_flops": dict(zip(names, flops))}


def tier_cost_record(exp: Experiment, final: dict[str, Any],
                     rounds: int) -> dict[str, Any]:
  """summary.json's per-tier costs of training (`TimeModel.tier_costs` at
  the width each device trains) and traffic: each tier's totals from the
  `final` record and their mean per round over `rounds`, and the tier whose
  devices' rounds last longest (None where no tier trains)."""
  sim, names = exp.simulation, exp.population.tier_names
  # One compiled program for the widths and the costs: op by op, their few
  # hundred small ops each compiled on first use took seconds.
  costs = timing.tier_costs_numpy(jax.jit(
      lambda arrays: sim.time_model.tier_cost_arrays(
          arrays, *sim.sampler.device_widths(arrays, sim.seed)))(sim.arrays))
  per_tier = lambda values: dict(zip(names, (
      None if not np.isfinite(v) else float(v) for v in values)))
  record = {f"per_tier_{key}": per_tier(values)
            for key, values in costs.items()}
  for way in ("down", "up"):
    total = np.array([final[f"per_tier_bytes_{way}"][n] for n in names])
    record[f"per_tier_bytes_{way}_per_round"] = per_tier(
        total / rounds if rounds else np.full(len(names), np.nan))
  seconds = costs["round_seconds"]
  record["slowest_tier"] = (names[int(np.nanargmax(seconds))]
                            if np.isfinite(seconds).any() else None)
  return record


def summarize(exp: Experiment, metrics: Metrics, state: Any, origin: str,
              server_cost: dict[str, float], memory: dict[str, int]
              ) -> dict[str, Any]:
  """The run's summary.json: the final record's figures, the initial ones,
  what reaching the target took, and how the run was set up."""
  cfg, sim, records = exp.config, exp.simulation, metrics.records
  final = metrics.final(state)
  return {
      "schema_version": schema.SCHEMA_VERSION,
      "accuracy": final["accuracy"], "loss": final["loss"],
      "per_tier_accuracy": final["per_tier_accuracy"],
      "worst_tier_accuracy": min(final["per_tier_accuracy"].values()),
      "source_accuracy": final["source_accuracy"],
      "local_accuracy": final["local_accuracy"],
      "per_tier_local_accuracy": final["per_tier_local_accuracy"],
      "initial_local_accuracy": records[0].get("local_accuracy"),
      "initial_accuracy": records[0]["accuracy"],
      "initial_per_tier_accuracy": records[0]["per_tier_accuracy"],
      "bytes_down": final["bytes_down"], "bytes_up": final["bytes_up"],
      "per_tier_bytes_down": final["per_tier_bytes_down"],
      "per_tier_bytes_up": final["per_tier_bytes_up"],
      **tier_cost_record(exp, final, int(state.round)),
      "sim_seconds": final["sim_seconds"],
      "sim_seconds_per_round": (final["sim_seconds"] / int(state.round)
                                if int(state.round) else None),
      **time_to_target(records, cfg.target_accuracy),
      "per_tier_dropped": final["per_tier_dropped"],
      "excluded_total": final["excluded_total"],
      "skipped_rounds": final["skipped_rounds"],
      "attack": cfg.attack, "aggregator": cfg.aggregator,
      **({} if sim.privacy is None else {
          "dp_noise_multiplier": cfg.dp_noise_multiplier,
          "dp_sampling_rate": sim.privacy.sampling_rate,
          "dp_accounted_rate": sim.privacy.accounted_rate,
          "dp_denominator": sim.privacy.denominator,
          "dp_accountant": cfg.dp_accountant,
          **privacy_record(sim, state)}),
      "rounds": int(state.round), "num_clients": cfg.num_clients,
      "clients_per_round": cfg.clients_per_round,
      "algorithm": cfg.algorithm, "policy": cfg.policy, "model": cfg.model,
      "data": exp.data.name, "data_facts": data_record(exp),
      **model_record(exp), "seed": cfg.seed,
      "pretrain": origin,
      **({} if exp.weights is None else {"weights": exp.weights}),
      "chunk_size": sim.chunk_size, "chunk_size_reason": exp.chunk_reason,
      **exp.placement.summary(), "rounds_per_call": cfg.rounds_per_call,
      "mesh_devices": sharding.mesh_size(sim.mesh), **server_cost, **memory,
      "wall_seconds": round(time.perf_counter() - metrics.start, 3),
  }


def write_summary(workdir: pathlib.Path, summary: dict[str, Any]) -> None:
  """Writes summary.json atomically, as strict JSON (non-finite: null)."""
  files.write_json_atomic(workdir / "summary.json", summary)


def format_summary(summary: dict[str, Any]) -> str:
  """A short human-readable table of the per-tier results and costs (an
  older summary.json's missing costs show as "-")."""
  num = lambda v, scale, spec: "-" if v is None else format(v / scale, spec)
  lines = [f"{'tier (width)':<14}{'start':>8}{'final':>8}{'params':>11}"
           f"{'train MB':>10}{'MFLOP/step':>12}{'MB/round':>10}{'s/round':>9}"]
  for row in schema.tier_rows(summary):
    per_round = (None if row["bytes_down_per_round"] is None else
                 row["bytes_down_per_round"] + row["bytes_up_per_round"])
    seconds = num(row["round_seconds"], 1, ".3g") + (
        "*" if row["slowest"] else "")
    lines.append(f"{row['tier']:<14}{num(row['initial_accuracy'], 1, '.3f'):>8}"
                 f"{num(row['accuracy'], 1, '.3f'):>8}"
                 f"{num(row['params'], 1, ',.0f'):>11}"
                 f"{num(row['train_memory_bytes'], 1e6, '.3g'):>10}"
                 f"{num(row['train_flops_per_step'], 1e6, '.3g'):>12}"
                 f"{num(per_round, 1e6, '.3g'):>10}{seconds:>9}")
  lines.append(f"global accuracy {summary['accuracy']:.3f} after "
               f"{summary['rounds']} rounds (pretrain={summary['pretrain']}), "
               f"worst tier {summary['worst_tier_accuracy']:.3f}, "
               f"{summary['wall_seconds']:.1f}s"
               + ("" if not summary.get("server_flops") else
                  f"; server {summary['server_flops'] / 1e9:.2f} GFLOP")
               + ("; * slowest tier" if summary.get("slowest_tier") else ""))
  return "\n".join(lines)
