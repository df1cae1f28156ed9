"""What a run reports as it goes: its opening log lines and the metrics
records (metrics.jsonl, one per evaluation); the summary at its end is
experiment/summary.py's.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from fedjax_tl import checkpoint, files, sharding
from fedjax_tl.errors import UserError
from fedjax_tl.evaluation import (make_evaluator, make_local_evaluator,
                                  statistics_data)
from fedjax_tl.experiment import writers
from fedjax_tl.experiment.build import Experiment
from fedjax_tl.policies import capacity
from fedjax_tl.simulation import Simulation

Log = Callable[[str], None]


def logger(quiet: bool) -> Log:
  """A log that prints lines to stderr, or drops them when `quiet`."""
  if quiet:
    return lambda message: None
  return lambda message: print(message, file=sys.stderr, flush=True)


def describe(exp: Experiment, memory: dict[str, int]) -> list[str]:
  """The log lines that open a run: population, chunk, data placement,
  memory caps (`memory`: `Simulation.memory_report()`), faults and DP's
  budget."""
  cfg, sim, pop = exp.config, exp.simulation, exp.population
  lines = [f"{exp.data.name}: {pop.num_devices} devices (tiers "
           f"{dict(zip(pop.tier_names, pop.tier_counts().tolist()))}), "
           f"{cfg.clients_per_round} per round, chunk size {sim.chunk_size}, "
           f"{sharding.describe(sim.mesh)}",
           f"chunk size {sim.chunk_size}: {exp.chunk_reason}",
           f"data: {exp.placement.reason}", data_note(data_record(exp))]
  if any(memory.values()):
    lines.append(f"memory: {memory['memory_capped']} devices train a narrower "
                 f"model than their tier's, {memory['memory_excluded']} fit "
                 "none and are never sampled")
  lines += fault_notes(exp) + weights_notes(exp) + exit_notes(exp)
  if sim.privacy is not None:
    dp = sim.privacy
    lines.append(
        f"DP-FedAvg: sampling rate {dp.sampling_rate:g} ({sim.num_slots} "
        f"slots; accounted at {dp.accounted_rate:g}, the largest device's "
        f"chance), mean over the {dp.denominator} holders, noise "
        f"multiplier {dp.noise_multiplier:g} (updates "
        f"{dp.update_noise_multiplier:.4g}), clip norm {dp.clip_norm:g}"
        f"{' adaptive' if dp.adaptive else ''}; after {cfg.num_rounds} "
        f"rounds epsilon {dp.epsilon(cfg.num_rounds):.3f} at delta "
        f"{dp.delta:g} ({dp.accountant})")
  return lines


def exit_notes(exp: Experiment) -> list[str]:
  """The early exits of a depth method's model (models.exits) and the
  depth each tier holds; empty for models with one output."""
  exits = exp.simulation.model.exits
  if not exits:
    return []
  tiers = exp.population.tier_names
  depths = [int(capacity.kept_units(np.float32(f), len(exits)))
            for f in exp.simulation.tier_fractions]
  line = (f"early exits: {len(exits)} ({', '.join(exits)}); exits held per "
          f"tier: {dict(zip(tiers, depths))}")
  if len(exits) == 1:
    line += (" -- the model has no exit points, so every tier holds all of "
             "it (give the mlp 2+ hidden layers, or use resnet18 or "
             "preresnet18)")
  return [line]


def data_record(exp: Experiment) -> dict[str, Any]:
  """summary.json's `data_facts`: the clients' real examples, the padded
  width, the padding waste (padded cells per real one: 0 when every client
  fills the width) and what the loader adds (a natural data set's files,
  format, test split and the examples its cap cut)."""
  clients = exp.data.clients
  real = int(np.sum(clients.count))
  cells = clients.num_clients * clients.max_examples
  return {"client_examples": real, "padded_width": clients.max_examples,
          "padding_waste": round((cells - real) / max(real, 1), 4),
          **(exp.data.facts or {})}


def data_note(record: dict[str, Any]) -> str:
  """The log line of `data_record`."""
  line = (f"clients' data: {record['client_examples']:,} examples padded to "
          f"{record['padded_width']} per client, padding waste "
          f"{record['padding_waste']:.2f} (padded cells per real one)")
  if record.get("format"):
    line += (f"; {record['format']} from {record['files']}, test: "
             f"{record['test_split']}")
  if record.get("examples_cut"):
    line += (f"; max_client_examples={record['max_client_examples']} cut "
             f"{record['examples_cut']:,} examples "
             f"({100 * record['examples_cut_fraction']:.1f}%) from "
             f"{record['clients_cut']} clients")
  return line


def fault_notes(exp: Experiment) -> list[str]:
  """Log lines on the attack and on a stacked aggregator's memory."""
  cfg, sim, notes = exp.config, exp.simulation, []
  if exp.population.malicious is not None:
    notes.append(f"attack {cfg.attack}: {int(exp.population.malicious.sum())}"
                 f" malicious devices (attack_scale {cfg.attack_scale:g})")
  if sim.aggregator.stacked:
    size = sum(np.size(a) for a in jax.tree.leaves(sim.model.init_params))
    notes.append(f"aggregator {cfg.aggregator} holds the whole cohort's "
                 f"deltas and masks at once: 2 x {sim.num_slots} slots x "
                 f"{size:,} params = {8 * sim.num_slots * size / 2**20:.1f} "
                 "MiB (grows with clients_per_round, not chunk_size)")
  return notes


def weights_notes(exp: Experiment) -> list[str]:
  """Log lines on what init_weights loaded and weights_freeze froze."""
  record, notes = exp.weights, []
  if record is None:
    return notes
  shown = lambda names: ", ".join(names[:8]) + (
      f" and {len(names) - 8} more" if len(names) > 8 else "")
  if record["file"] is not None:
    notes.append(f"weights from {record['file']}: loaded "
                 f"{len(record['loaded'])} ({shown(record['loaded'])}), "
                 f"re-initialised {len(record['reinitialised'])}"
                 + (f" ({shown(record['reinitialised'])})"
                    if record["reinitialised"] else "")
                 + (f"; {len(record['unused'])} in the file unused "
                    f"({shown(record['unused'])})" if record["unused"]
                    else ""))
  if record["frozen"]:
    notes.append(f"frozen (trained by no client): {len(record['frozen'])} "
                 f"({shown(record['frozen'])})")
  return notes


def privacy_record(sim: Simulation, state: Any) -> dict[str, Any]:
  """The privacy figures of a metrics record ({} without DP).

  Epsilon is dp-accounting's for the rounds run so far (`state.round`, the
  accountant's whole state), so a resumed run reports the same figures;
  None (JSON null) without noise, where no epsilon holds.
  """
  dp = sim.privacy
  if dp is None:
    return {}
  epsilon = dp.epsilon(int(state.round))
  return {"dp_epsilon": epsilon if np.isfinite(epsilon) else None,
          "dp_delta": dp.delta,
          "dp_clip_norm": float(state.privacy["clip_norm"]),
          "dp_overflow": int(round(float(state.privacy["overflow"])))}


class Metrics:
  """The run's metrics records and metrics.jsonl, one record per evaluation.

  Each record evaluates the global model as every tier deploys it
  (`Simulation.deployed_masks`: its width slice, all of it for depth
  policies, the backbone with its rank's adapters for adapter policies) on
  the target test set, the source test set and, with per-device test data,
  each device's own labels; and adds the cumulative traffic, fault and
  privacy figures of the server state.
  """

  def __init__(self, exp: Experiment, path: pathlib.Path, start: float,
               log: Log, writer: writers.Writers | None = None):
    sim, data, pop = exp.simulation, exp.data, exp.population
    self.exp, self.path, self.start, self.log = exp, path, start, log
    # The other writers of config.writers: each record goes to them too.
    self.writer = writers.Writers([]) if writer is None else writer
    self.records: list[dict[str, Any]] = []
    self._lines: list[str] = []  # the records as metrics.jsonl holds them
    options = dict(masks_fn=sim.deployed_masks,
                   stats_data=statistics_data(sim.model, data.clients))
    self._target = make_evaluator(sim.model, data.target_test, **options,
                                  **data.counting)
    # No source task (natural data with source=none: the source parts are
    # the target's test set as placeholders): no source accuracy.
    self._source = None if data.source_train is data.target_test else (
        make_evaluator(sim.model, data.source_test, **options,
                       **data.counting))
    self._local = None if data.client_test is None else make_local_evaluator(
        sim.model, data.clients, data.client_test, data.num_classes, pop.tier,
        len(pop.tier_fractions), **options,
        accuracy_ignored=data.accuracy_ignored)

  def resume(self, latest: int | None, saved: dict[str, Any] | None
             ) -> None:
    """Takes the records saved with the restored checkpoint of round
    `latest` (`checkpoint.history`), or none without one (a fresh start).

    metrics.jsonl must begin with those records (those past them are
    recomputed, identically); a missing, truncated, damaged or edited file
    is rebuilt from them, saying so in one line.
    """
    self.records, self._lines = [], []
    if latest is None:
      return
    if not isinstance(saved, dict):  # check_checkpoints requires one
      raise UserError(f"checkpoint of round {latest} holds no metrics "
                      "history (written by an older fedjax-tl)")
    self._lines = list(saved["lines"])
    self.records = [json.loads(line) for line in self._lines]
    for record in self.records:  # the writers start afresh (writers.py)
      self.writer.write_record(record)
    try:
      found = self.path.read_text().split("\n")
    except OSError:
      found = None
    if found is not None and found[:len(self._lines)] == self._lines:
      if len(found) != len(self._lines) + 1 or found[-1]:
        self._write()  # drop the records past the checkpoint
      return
    if found is None:
      why = "is missing"
    else:
      at = next(i for i, (a, b) in enumerate(zip(found, self._lines + [None]))
                if a != b)
      why = (f"has {at} of its {len(self._lines)} records" if at ==
             len(found) - 1 and not found[-1] else
             f"differs from it at line {at + 1} (damaged or edited)")
    self.log(f"metrics.jsonl {why}; rebuilt from the {len(self._lines)} "
             f"records saved with the checkpoint of round {latest}")
    self._write()

  def history(self) -> dict[str, Any]:
    """The records so far, as a checkpoint saves them."""
    return checkpoint.history(self._lines)

  def _write(self) -> None:
    files.write_text_atomic(
        self.path, "".join(line + "\n" for line in self._lines))

  def add(self, state: Any, round_index: int,
          train_loss: float | None) -> dict[str, Any]:
    """Evaluates `state`, appends the record and rewrites metrics.jsonl
    atomically (a run killed mid-write keeps the previous, whole file).
    Records are strict JSON: a non-finite value is null."""
    record = files.strict_json(
        self.evaluate(state, round_index, train_loss))
    self.records.append(record)
    self._lines.append(files.dumps(record))
    self._write()
    self.writer.write_record(record)
    return record

  def final(self, state: Any) -> dict[str, Any]:
    """The record of the state's round (evaluated anew if none is saved,
    e.g. when a finished run is run again)."""
    last = self.records[-1]
    if last["round"] == int(state.round):
      return last
    return self.evaluate(state, int(state.round), None)

  def evaluate(self, state: Any, round_index: int,
               train_loss: float | None) -> dict[str, Any]:
    """One metrics record of `state` after `round_index` rounds."""
    sim, pop = self.exp.simulation, self.exp.population
    fractions = np.asarray(pop.tier_fractions, np.float32)
    acc, loss = self._target(state.params, fractions)
    src_acc = None if self._source is None else float(
        self._source(state.params, np.ones(1, np.float32))[0][0])
    best = int(np.argmax(pop.tier_fractions))
    totals = {k: np.asarray(v, np.float64) for k, v in state.totals.items()}
    per_tier = lambda values: dict(zip(pop.tier_names, values.tolist()))
    local, tier_local = (None, None) if self._local is None else (
        self._local(state.params, fractions))
    previous = self.records[-1] if self.records else None
    faulty = excluded_counts(totals, previous)
    if faulty["skipped_rounds"] and not (previous and previous.get(
        "skipped_rounds")):  # said once per run
      self.log(f"by round {round_index}: a round's every client update was "
               "non-finite (NaN/Inf) and excluded; such rounds leave the "
               "model unchanged (skipped_rounds in metrics.jsonl)")
    return {"round": round_index, "accuracy": float(acc[best]),
            "loss": float(loss[best]),
            "per_tier_accuracy": per_tier(acc),
            "per_tier_loss": per_tier(loss),
            "source_accuracy": src_acc, "train_loss": train_loss,
            "local_accuracy": local,
            "per_tier_local_accuracy": None if tier_local is None else dict(
                zip(pop.tier_names, (None if np.isnan(a) else float(a)
                                     for a in tier_local))),
            "bytes_down": float(totals["bytes_down"].sum()),
            "bytes_up": float(totals["bytes_up"].sum()),
            **{f"per_tier_{name}": per_tier(totals[name]) for name in
               ("bytes_down", "bytes_up", "updates", "dropped", "excluded")},
            **faulty, "sim_seconds": float(totals["sim_seconds"]),
            **privacy_record(sim, state),
            "wall_seconds": round(time.perf_counter() - self.start, 3)}


def excluded_counts(totals: dict[str, np.ndarray],
                    previous: dict[str, Any] | None) -> dict[str, int]:
  """A metrics record's counts of non-finite client updates.

  `excluded`: updates excluded since the `previous` record (each round's
  count with eval_every=1); `excluded_total`: since the start;
  `skipped_rounds`: rounds whose every update was excluded (the model left
  unchanged). From the checkpointed totals, so a resumed run counts alike.
  """
  total = int(round(float(totals["excluded"].sum())))
  before = 0 if previous is None else previous.get("excluded_total", 0)
  return {"excluded": total - before, "excluded_total": total,
          "skipped_rounds": int(round(float(totals["skipped"])))}


def train_loss(stats: Any) -> float | None:
  """The last round's mean client training loss; None when no client's
  update was aggregated (`RoundStats.aggregated` is 0: a skipped round, no
  one online or every update excluded), where the engine's weighted mean
  over nothing is no loss at all. A loss of exactly 0 from aggregated
  clients is a loss. (A non-finite one would be written as null anyway:
  strict JSON.)"""
  if int(stats.aggregated[-1]) == 0:
    return None
  loss = float(stats.train_loss[-1])
  return loss if np.isfinite(loss) else None
