"""The host loop: build an experiment, pretrain, run rounds, evaluate, save.

Everything with a side effect lives here (files, progress, checkpoints); the
rounds themselves are one compiled function each. `build_experiment` and
`run` are the library API a notebook or sweep script calls; the CLI is a thin
layer on top.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_tl import (aggregators, checkpoint, cost, faults, placement,
                       policies, privacy, sharding, traces)
from fedjax_tl.algorithms import server_optimizer
from fedjax_tl.client import client_optimizer, make_client_update

from fedjax_tl.config import ExperimentConfig, validate
from fedjax_tl.data.checks import check_transfer_data
from fedjax_tl.data.federated import FederatedData, TransferData
from fedjax_tl.device_catalog import profiles_for_tiers
from fedjax_tl.devices import Population, make_population
from fedjax_tl.errors import ConfigError, DataError, UserError
from fedjax_tl.evaluation import make_evaluator, make_local_evaluator
from fedjax_tl.models import ModelDef, build_model
from fedjax_tl.placement import Placement
from fedjax_tl.simulation import Simulation, Tunable
from fedjax_tl.policies.transfer import pretrain

# Files this package writes in a workdir; --overwrite removes only these.
OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints",
           "pretrained", "sweep.csv", "sweep.md", "groups", *(
               f"{name}.json" for name in policies.names_where(
                   lambda p: p.prepare is not None)))  # prepared_params


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A built experiment: data, population, model and compiled simulation."""
  config: ExperimentConfig
  data: TransferData
  population: Population
  model: ModelDef
  simulation: Simulation
  # Why the chunk size is what it is, and where the client data went; both
  # logged and in summary.json.
  chunk_reason: str = ""
  placement: Placement | None = None


def load_data(cfg: ExperimentConfig) -> TransferData:
  """The experiment's transfer data: embedded digits, a user's `.npz` file or
  a tfds data set, checked (labels, finite features, shapes, empty clients).

  Raises:
    DataError: naming the file (or data set) and the problem.
  """
  if cfg.data == "digits":
    from fedjax_tl.data.digits import load_digits_transfer
    data, origin = load_digits_transfer(
        cfg.num_clients, alpha=cfg.alpha, min_examples=cfg.min_examples,
        max_examples=cfg.max_examples, seed=cfg.seed,
        local_test_examples=cfg.local_test_examples), "digits"
  elif cfg.data.endswith(".npz"):
    from fedjax_tl.data.npz_source import load_npz_transfer
    data, origin = load_npz_transfer(cfg.data, cfg.num_clients), cfg.data
  else:
    from fedjax_tl.data.tfds_source import load_tfds_transfer
    data, origin = load_tfds_transfer(
        cfg.data, cfg.num_clients, partition_method=cfg.partition,
        alpha=cfg.alpha, min_examples=cfg.min_examples,
        max_examples=cfg.max_examples, source_fraction=cfg.source_fraction,
        seed=cfg.seed, data_dir=cfg.data_dir,
        local_test_examples=cfg.local_test_examples), (
            f"tfds data set {cfg.data!r}")
  check_transfer_data(data, origin)
  if cfg.model != "mlp" and len(data.input_shape) != 3:
    raise DataError(f"{origin}: config.model={cfg.model!r} needs image "
                    f"features [height, width, channels], got "
                    f"{data.input_shape}")
  return data


def auto_chunk_size(cfg: ExperimentConfig, num_params: int,
                    num_devices: int = 1) -> int:
  """Clients vmapped together when `chunk_size=0`.

  On XLA:CPU a client's work is bound by passes over its own copy of the
  params; a chunk pays off while the chunk's copies stay in cache (about
  1-2 MB; measured with benchmarks/round_throughput.py), and vmapped
  convolutions run poorly (DESIGN.md rule 7). Accelerators favour large
  chunks. Among sizes near the target, the one padding the cohort least.
  On a mesh of `num_devices`, rounded up to a multiple of it (every device
  runs the same share of each chunk).
  """
  target = min(_chunk_target(cfg, num_params)[0], cfg.clients_per_round)
  candidates = range(max(1, target // 2), target + 1)
  size = min(candidates, key=lambda c: (-(-cfg.clients_per_round // c) * c, -c))
  return -(-size // num_devices) * num_devices


def _chunk_target(cfg: ExperimentConfig, num_params: int) -> tuple[int, str]:
  """The chunk size `auto_chunk_size` aims at, and why."""
  if jax.default_backend() != "cpu":
    return 256, "accelerators favour large chunks"
  if cfg.model in ("cnn", "simple_cnn"):
    return 1, ("XLA:CPU: one CNN client's matmuls already fill the cores; "
               "a lone client runs unbatched, larger chunks measured slower")
  # At least 2: a lone client of an MLP too wide for the cache measured
  # slower than two (64-512-512-10: 4,714 vs 5,673-5,862 steps/s).
  return int(np.clip(2_000_000 // (4 * num_params), 2, 32)), (
      f"XLA:CPU: a chunk's copies of the {num_params:,} params fit in ~2 MB "
      "of cache (at least 2)")


def choose_chunk_size(cfg: ExperimentConfig, num_params: int,
                      num_devices: int = 1) -> tuple[int, str]:
  """`(chunk size, reason)`: `config.chunk_size`, or `auto_chunk_size`'s."""
  if cfg.chunk_size:
    return cfg.chunk_size, "set by config.chunk_size"
  size = auto_chunk_size(cfg, num_params, num_devices)
  target, why = _chunk_target(cfg, num_params)
  return size, (f"automatic: target {target} ({why}), the size near it "
                f"that pads the {cfg.clients_per_round}-client cohort least"
                + (f", a multiple of {num_devices} devices"
                   if num_devices > 1 else ""))


def auto_tier_fast_path(cfg: ExperimentConfig, num_params: int) -> bool:
  """Whether tiers run at their own shapes when `tier_fast_path=None`.

  On for first-k policies, except on XLA:CPU for models under 50,000
  parameters: there the tiered program's longer compilation (about 9 s more
  for the default MLP) outweighs what it saves per round
  (benchmarks/tier_fast_path.py: 1.37x per round on the 9,610-parameter
  default MLP, 3.7x on a 64-512-512-10 one).
  """
  if (experiment_policy(cfg).fixed_widths is None or
      experiment_aggregator(cfg).stacked):  # stacked: on the masked path
    return False
  return jax.default_backend() != "cpu" or num_params >= 50_000


def experiment_policy(cfg: ExperimentConfig) -> policies.Policy:
  """The config's migration policy, with its options from the config."""
  return policies.make(cfg.policy, policies.Options(
      **{key: getattr(cfg, key) for key in policies.Options._fields}))


def experiment_aggregator(cfg: ExperimentConfig) -> aggregators.Aggregator:
  """The config's aggregator, with its options from the config."""
  return aggregators.make(cfg.aggregator, aggregators.Options(
      **{key: getattr(cfg, key) for key in aggregators.Options._fields}))


def build_experiment(cfg: ExperimentConfig) -> Experiment:
  """Loads data, makes the population and model, binds the simulation."""
  data = load_data(cfg)
  model = build_model(cfg.model, data.input_shape, data.num_classes,
                      seed=cfg.seed, hidden=cfg.hidden,
                      cnn_channels=cfg.cnn_channels, cnn_dense=cfg.cnn_dense,
                      dropout=cfg.dropout, conv_impl=cfg.conv_impl)
  policy = experiment_policy(cfg)
  # The model the devices train (adapters on the backbone for adapter
  # policies).
  sim_model = policy.adapt_model(model, cfg.seed)
  population = device_population(cfg, sim_model, data.clients.x.shape[2:])
  num_params = sum(np.size(a) for a in jax.tree.leaves(sim_model.init_params))
  mesh = experiment_mesh(cfg)
  chunk_size, chunk_reason = choose_chunk_size(cfg, num_params,
                                               sharding.mesh_size(mesh))
  where = place_data(cfg, data.clients, population, mesh)
  update = make_client_update(
      sim_model.apply,
      client_optimizer(cfg.client_lr, cfg.client_momentum, cfg.weight_decay),
      local_steps=cfg.local_steps, batch_size=cfg.batch_size, mu=cfg.mu,
      self_distill=cfg.fjord_distill,
      compute_dtype=jnp.dtype(cfg.compute_dtype),
      unroll=cfg.unroll_local_steps, dropout=sim_model.has_dropout)
  simulation = Simulation.create(
      sim_model, update,
      server_optimizer(cfg.algorithm, cfg.server_lr, cfg.server_eps),
      data.clients, population, cohort_size=cfg.clients_per_round,
      chunk_size=chunk_size, mesh=mesh, data_placement=where.where,
      local_steps=cfg.local_steps, seed=cfg.seed, policy=policy,
      batch_size=cfg.batch_size, round_deadline=cfg.round_deadline,
      deadline_mode=cfg.deadline_mode,
      masked_ce=cfg.masked_ce,
      tier_fast_path=(cfg.tier_fast_path if cfg.tier_fast_path is not None
                      else auto_tier_fast_path(cfg, num_params)),
      overcommit=cfg.overcommit,
      optimizer_slots=int(cfg.client_momentum > 0),
      attack=faults.Attack(cfg.attack, cfg.attack_scale),
      aggregator=experiment_aggregator(cfg),
      privacy=dp_config(cfg),
      tunable=Tunable(
          client_tx=functools.partial(client_optimizer,
                                      momentum=cfg.client_momentum,
                                      weight_decay=cfg.weight_decay),
          server_tx=functools.partial(server_optimizer, cfg.algorithm,
                                      eps=cfg.server_eps),
          client_lr=cfg.client_lr, server_lr=cfg.server_lr, mu=cfg.mu))
  return Experiment(cfg, data, population, model, simulation,
                    chunk_reason=chunk_reason, placement=where)


def dp_config(cfg: ExperimentConfig) -> privacy.Privacy | None:
  """DP-FedAvg's parameters from the `dp*` keys, None with dp=False."""
  if not cfg.dp:
    return None
  return privacy.Privacy(
      noise_multiplier=cfg.dp_noise_multiplier, clip_norm=cfg.dp_clip_norm,
      sampling_rate=cfg.clients_per_round / cfg.num_clients,
      delta=cfg.dp_delta, accountant=cfg.dp_accountant,
      adaptive=cfg.dp_adaptive_clip, target_quantile=cfg.dp_target_quantile,
      clip_lr=cfg.dp_clip_lr, count_noise=cfg.dp_count_noise)


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


def place_data(cfg: ExperimentConfig, clients: FederatedData,
               population: Population,
               mesh: jax.sharding.Mesh | None) -> Placement:
  """Where the client data goes (`config.data_placement`, placement.choose).

  Raises:
    ConfigError: "device" and the data does not fit, or host-placed data
      under more than one process (not supported: the host callback runs on
      the first device only).
  """
  where = placement.choose(
      cfg.data_placement,
      placement.data_bytes(clients, population, sharding.mesh_size(mesh)),
      *placement.free_memory())
  if where.where == "host" and jax.process_count() > 1:
    raise ConfigError(f"config.data_placement={cfg.data_placement!r}: host "
                      f"placement ({where.reason}) needs a single process, "
                      f"not {jax.process_count()}")
  return where


def experiment_mesh(cfg: ExperimentConfig) -> jax.sharding.Mesh | None:
  """The `clients` mesh of `num_devices` devices (None for one device).

  Raises:
    ConfigError: if `num_devices` exceeds the devices there are, or an
      explicit `chunk_size` is not a multiple of the mesh size.
  """
  available = jax.device_count()
  if cfg.num_devices > available:
    raise ConfigError(f"config.num_devices={cfg.num_devices!r}: only "
                      f"{available} device(s) available")
  mesh = sharding.make_mesh(cfg.num_devices)
  size = sharding.mesh_size(mesh)
  if cfg.chunk_size % size:
    raise ConfigError(f"config.chunk_size={cfg.chunk_size!r}: must be a "
                      f"multiple of the {size} mesh devices (num_devices="
                      f"{cfg.num_devices}), or 0 for automatic")
  return mesh


def device_population(cfg: ExperimentConfig, model: ModelDef,
                      input_shape: tuple[int, ...]) -> Population:
  """Tiers, per-device figures and availability of the experiment's devices.

  Each tier's device class gives compute, memory and bandwidth (jittered);
  `device_trace` replaces compute and bandwidth by a FedScale capacity trace
  (its `computation` taken as ms per sample of `model`, see
  DeviceProfiles.with_capacity_trace). Availability: `uniform` keeps
  U(min_availability, 1) per device, `device_class` the class's figure,
  `trace` the `behave_trace` intervals queried at the simulated clock.
  With an attack, `attack_fraction` of the devices are malicious
  (faults.malicious_devices, from the seed).

  Raises:
    DataError: a trace file that cannot be read or is malformed.
  """
  population = make_population(
      cfg.num_clients, cfg.tier_fractions, cfg.tier_proportions,
      min_availability=cfg.min_availability, seed=cfg.seed)
  profiles = profiles_for_tiers(population.tier, cfg.device_classes,
                                seed=cfg.seed, jitter=cfg.device_jitter)
  if cfg.device_trace is not None:
    flops = cost.forward_flops(model.layers, model.init_params, None,
                               cost.conv_positions(input_shape, model.layers,
                                                   model.init_params))
    profiles = profiles.with_capacity_trace(
        traces.load_device_capacity(cfg.device_trace), float(flops))
  population = dataclasses.replace(population, profiles=profiles)
  if cfg.attack != "none":
    population = dataclasses.replace(
        population, malicious=faults.malicious_devices(
            cfg.num_clients, cfg.attack_fraction, cfg.seed))
  if cfg.availability == "device_class":
    population = dataclasses.replace(population,
                                     availability=profiles.availability)
  elif cfg.availability == "trace":
    online = traces.availability_intervals(
        traces.load_behave_trace(cfg.behave_trace), cfg.num_clients)
    # The share of its period each device is online, for display only.
    population = dataclasses.replace(
        population, online=online, availability=traces.online_fraction(
            *online))
  return population


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


# Keys a run may change and still resume: they do not change its results.
RESUMABLE_KEYS = ("num_rounds", "rounds_per_call", "data_placement")


def check_workdir(workdir: pathlib.Path, cfg: ExperimentConfig,
                  overwrite: bool) -> bool:
  """Refuses a workdir holding another experiment, unless `overwrite`.

  The same experiment (all keys equal but the RESUMABLE_KEYS) resumes.
  Nothing is written or removed here; returns whether old outputs must be
  replaced.
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
                                  if k not in RESUMABLE_KEYS} == {
                                      k: v for k, v in new.items()
                                      if k not in RESUMABLE_KEYS}:
    return False
  if not overwrite:
    diff = ("unreadable config.json" if not isinstance(saved, dict) else
            ", ".join(f"{k}: {saved.get(k)!r} -> {new[k]!r}" for k in new
                      if k not in RESUMABLE_KEYS and saved.get(k) != new[k]
                      )[:300])
    raise UserError(f"--workdir={str(workdir)!r} holds a different "
                    f"experiment ({diff}); use --overwrite to replace it")
  return True


def start_workdir(workdir: pathlib.Path, cfg: ExperimentConfig,
                  replace: bool) -> None:
  """Removes this package's old outputs if `replace`, then saves the config."""
  if replace:
    # config.json last: a run killed while replacing still names the old
    # experiment, so its leftover checkpoints are never resumed as the new.
    for name in sorted(OUTPUTS, key=lambda name: name == "config.json"):
      path = workdir / name
      if path.is_dir():
        shutil.rmtree(path)
      elif path.exists():
        path.unlink()
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoint.write_text_atomic(workdir / "config.json",
                               json.dumps(cfg.to_dict(), indent=2) + "\n")


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
    try:
      return checkpoint.load_params(saved, model.init_params), "source", False
    except UserError as e:
      # This run's own copy: pretraining again gives the same params.
      aside = checkpoint.move_aside(saved)
      log(f"{e}; moved to {aside.name}, pretraining again")
  start = time.perf_counter()
  params, loss = pretrain(model.apply, model.init_params,
                          exp.data.source_train, steps=cfg.pretrain_steps,
                          batch_size=cfg.pretrain_batch_size,
                          learning_rate=cfg.pretrain_lr, seed=cfg.seed)
  log(f"pretrained on {exp.data.name} source ({len(exp.data.source_train)} "
      f"examples, {cfg.pretrain_steps} steps) in "
      f"{time.perf_counter() - start:.1f}s, final loss {loss:.3f}")
  return params, "source", True


def federated_params(exp: Experiment, params: Any) -> Any:
  """The pretrained params as the policy starts from them (`Policy.start`:
  reordered by importance, under fresh adapters, ...)."""
  sim = exp.simulation
  return sim.policy.start(params, sim.model)


def prepared_params(exp: Experiment, params: Any, workdir: pathlib.Path,
                    resuming: bool, log: Any) -> tuple[Any, dict[str, float]]:
  """The params after the policy's server preparation (`Policy.prepare`,
  e.g. distillation into the tiers' widths), and the server's cost.

  Returns the params and `{"server_flops", "server_seconds"}` (zeros for a
  policy without preparation), which it saves in `workdir/<policy>.json`.
  A run resuming from a checkpoint restores its state, so it skips the
  preparation and reports the saved cost.
  """
  cfg, policy = exp.config, exp.simulation.policy
  if policy.prepare is None:
    return params, {"server_flops": 0.0, "server_seconds": 0.0}
  cost_file = workdir / f"{policy.name}.json"
  if resuming and cost_file.exists():
    return params, json.loads(cost_file.read_text())
  params, cost = policy.prepare(policies.ServerPrep(
      exp.model, params, exp.data.source_train, cfg.tier_fractions, cfg.seed))
  log(f"{policy.name}: the server prepared widths "
      f"{', '.join(cfg.tier_names)} before round 0: "
      f"{cost.flops / 1e9:.2f} GFLOP in {cost.seconds:.1f}s, final loss "
      f"{cost.loss:.3f}")
  record = {"server_flops": cost.flops,
            "server_seconds": round(cost.seconds, 3)}
  checkpoint.write_text_atomic(cost_file, json.dumps(record, indent=2) + "\n")
  return params, record


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
      f"{sharding.describe(sim.mesh)}")
  log(f"chunk size {sim.chunk_size}: {exp.chunk_reason}")
  log(f"data: {exp.placement.reason}")
  memory = sim.memory_report()
  if any(memory.values()):
    log(f"memory: {memory['memory_capped']} devices train a narrower model "
        f"than their tier's, {memory['memory_excluded']} fit none and are "
        "never sampled")
  for line in fault_notes(exp):
    log(line)
  if sim.privacy is not None:
    dp = sim.privacy
    log(f"DP-FedAvg: sampling rate {dp.sampling_rate:g} ({sim.num_slots} "
        f"slots), noise multiplier {dp.noise_multiplier:g} (updates "
        f"{dp.update_noise_multiplier:.4g}), clip norm {dp.clip_norm:g}"
        f"{' adaptive' if dp.adaptive else ''}; after {cfg.num_rounds} "
        f"rounds epsilon {dp.epsilon(cfg.num_rounds):.3f} at delta "
        f"{dp.delta:g} ({dp.accountant})")
  saved = workdir / "pretrained"
  params, origin, fresh = initial_params(exp, None if replace else saved, log)
  # Global arrays on the mesh: under jax.distributed, orbax saves only those.
  params = sharding.replicate(params, sim.mesh)
  # Only once the inputs have proved good is anything in the workdir touched.
  start_workdir(workdir, cfg, replace)
  if fresh:
    checkpoint.save_params(saved, params)
  params = federated_params(exp, params)
  # Each tier's deployed model (Simulation.deployed_masks): its width slice,
  # all of it (depth policies), or the backbone with its rank's adapters.
  evaluate = make_evaluator(sim.model, exp.data.target_test,
                            masks_fn=sim.deployed_masks)
  evaluate_source = make_evaluator(sim.model, exp.data.source_test,
                                   masks_fn=sim.deployed_masks)
  evaluate_local = None if exp.data.client_test is None else (
      make_local_evaluator(sim.model, exp.data.clients, exp.data.client_test,
                           exp.data.num_classes, pop.tier,
                           len(pop.tier_fractions),
                           masks_fn=sim.deployed_masks))
  fractions = np.asarray(pop.tier_fractions, np.float32)

  ckpts = checkpoint.RoundCheckpoints(workdir / "checkpoints",
                                      cfg.keep_checkpoints)
  # The newest checkpoint that reads back intact (bad ones are moved aside,
  # each reported in one line); only the structure of `like` matters.
  restored, latest = ckpts.restore_latest(sim.init(params), log)
  params, server_cost = prepared_params(exp, params, workdir,
                                       restored is not None, log)
  state = sim.init(params)
  metrics_file = workdir / "metrics.jsonl"
  records: list[dict[str, Any]] = []
  if restored is not None:
    state = restored
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
    local, tier_local = (None, None) if evaluate_local is None else (
        evaluate_local(state.params, fractions))
    faulty = excluded_counts(totals, records[-1] if records else None)
    if faulty["skipped_rounds"] and not (records and records[-1].get(
        "skipped_rounds")):  # said once per run
      log(f"by round {round_index}: a round's every client update was "
          "non-finite (NaN/Inf) and excluded; such rounds leave the model "
          "unchanged (skipped_rounds in metrics.jsonl)")
    return {"round": round_index, "accuracy": float(acc[best]),
            "loss": float(loss[best]),
            "per_tier_accuracy": per_tier(acc),
            "per_tier_loss": per_tier(loss),
            "source_accuracy": float(src_acc[0]), "train_loss": train_loss,
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
            "wall_seconds": round(time.perf_counter() - start, 3)}

  def write_metrics() -> None:
    # Atomic: a run killed mid-write keeps the previous, complete file.
    checkpoint.write_text_atomic(
        metrics_file, "".join(json.dumps(r) + "\n" for r in records))

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
  done = first
  while done < cfg.num_rounds:
    # Several rounds per compiled call; the host acts only between calls.
    num = rounds_in_call(done, cfg)
    state, stats = sim.rounds(state, num)
    done += num
    if done % cfg.eval_every == 0 or done == cfg.num_rounds:
      records.append(evaluation(done, float(stats.train_loss[-1])))
      write_metrics()
      if bar is not None:
        bar.set_postfix(acc=f"{records[-1]['accuracy']:.3f}",
                        worst=f"{min(records[-1]['per_tier_accuracy'].values()):.3f}")
    if done % cfg.checkpoint_every == 0 or done == cfg.num_rounds:
      ckpts.save(done, state)
    if bar is not None:
      bar.update(num)
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
      "local_accuracy": final["local_accuracy"],
      "per_tier_local_accuracy": final["per_tier_local_accuracy"],
      "initial_local_accuracy": records[0].get("local_accuracy"),
      "initial_accuracy": records[0]["accuracy"],
      "initial_per_tier_accuracy": records[0]["per_tier_accuracy"],
      "bytes_down": final["bytes_down"], "bytes_up": final["bytes_up"],
      "per_tier_bytes_up": final["per_tier_bytes_up"],
      "sim_seconds": final["sim_seconds"],
      **time_to_target(records, cfg.target_accuracy),
      "per_tier_dropped": final["per_tier_dropped"],
      "excluded_total": final["excluded_total"],
      "skipped_rounds": final["skipped_rounds"],
      "attack": cfg.attack, "aggregator": cfg.aggregator,
      **({} if sim.privacy is None else {
          "dp_noise_multiplier": cfg.dp_noise_multiplier,
          "dp_sampling_rate": sim.privacy.sampling_rate,
          "dp_accountant": cfg.dp_accountant,
          **privacy_record(sim, state)}),
      "rounds": int(state.round), "num_clients": cfg.num_clients,
      "clients_per_round": cfg.clients_per_round,
      "algorithm": cfg.algorithm, "policy": cfg.policy, "model": cfg.model,
      "data": exp.data.name, "seed": cfg.seed, "pretrain": origin,
      "chunk_size": sim.chunk_size, "chunk_size_reason": exp.chunk_reason,
      **exp.placement.summary(), "rounds_per_call": cfg.rounds_per_call,
      "mesh_devices": sharding.mesh_size(sim.mesh), **server_cost, **memory,
      "wall_seconds": round(time.perf_counter() - start, 3),
  }
  checkpoint.write_text_atomic(workdir / "summary.json",
                               json.dumps(summary, indent=2) + "\n")
  return summary


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


def rounds_in_call(done: int, cfg: ExperimentConfig) -> int:
  """Rounds the next compiled call runs after `done` rounds.

  `rounds_per_call`, cut short at the next evaluation, checkpoint or the
  last round, so the host still evaluates and saves where the config says;
  a few distinct counts at most, each compiled once.
  """
  stops = (cfg.num_rounds, done + cfg.eval_every - done % cfg.eval_every,
           done + cfg.checkpoint_every - done % cfg.checkpoint_every)
  return min(cfg.rounds_per_call, *(stop - done for stop in stops))


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
  for name in base.compare_policies:
    variant = ml_collections.ConfigDict(config)
    variant.policy = name
    configs.append(validate(variant))
  rows = []
  for cfg in configs:
    if not quiet:
      print(f"== policy {cfg.policy}", file=sys.stderr, flush=True)
    summary = run(cfg, workdir / cfg.policy, overwrite=overwrite,
                  progress=progress, quiet=quiet)
    row = {"policy": cfg.policy, "accuracy": summary["accuracy"],
           "worst_tier_accuracy": summary["worst_tier_accuracy"],
           "local_accuracy": summary["local_accuracy"]}
    row.update({f"tier_{name}_accuracy": acc
                for name, acc in summary["per_tier_accuracy"].items()})
    row.update({key: summary[key] for key in (
        "bytes_up", "bytes_down", "sim_seconds", "server_flops",
        "server_seconds", "wall_seconds")})
    row.update({key: summary[key] for key in TARGET_KEYS if key in summary})
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
    if value is None:  # e.g. a target never reached
      return "-"
    if key.startswith("bytes"):
      return f"{value / 1e6:.1f} MB"
    if key == "server_flops":
      return f"{value / 1e9:.2f} GFLOP"
    return f"{value:.3f}" if isinstance(value, float) else str(value)

  lines = ["| " + " | ".join(columns) + " |",
           "|" + " --- |" * len(columns)]
  lines += ["| " + " | ".join(cell(k, r[k]) for k in columns) + " |"
            for r in rows]
  return "\n".join(lines)
