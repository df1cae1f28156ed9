"""Building an experiment from a validated config: data, population, model,
policy, aggregator and the bound simulation (chunk size, mesh, placement).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import (aggregators, cost, faults, models, placement,
                       policies, privacy, sharding, traces)
from fedjax_tl.algorithms import server_optimizer
from fedjax_tl.client import client_optimizer, make_client_update
from fedjax_tl.config import ExperimentConfig
from fedjax_tl.data.checks import check_transfer_data
from fedjax_tl.data.federated import FederatedData, TransferData
from fedjax_tl.device_catalog import profiles_for_tiers
from fedjax_tl.devices import Population, make_population
from fedjax_tl.errors import ConfigError, DataError
from fedjax_tl.experiment import memory
from fedjax_tl.experiment.chunks import choose_chunk_size
from fedjax_tl.experiment.keys import ARRAYS, NATURAL_DATASETS, TEXT_MODELS
from fedjax_tl.models import ModelDef, build_model
from fedjax_tl.placement import Placement
from fedjax_tl.simulation import Simulation, Tunable
from fedjax_tl.weights import (flatten, frozen_names, load_file, matching,
                               parse_mapping)


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
  # What init_weights loaded and weights_freeze froze (`weights_record`);
  # None when neither is set.
  weights: dict[str, Any] | None = None


# The built-in models of images only.
CONV_MODELS = ("cnn", "simple_cnn", "preresnet18", "resnet18", "mobilenetv2")


def load_data(cfg: ExperimentConfig,
              arrays: Mapping[str, Any] | None = None) -> TransferData:
  """The experiment's transfer data: embedded digits, a user's `.npz` file
  or the same arrays from Python (`arrays`, with `data=arrays`), a tfds data
  set or a natural one (data/natural/; shakespeare as data/text.py's
  next-character task), checked (labels, finite features, shapes, empty
  clients).

  Raises:
    DataError: naming the file (or data set) and the problem.
  """
  if arrays is not None and cfg.data != ARRAYS:
    raise DataError(f"arrays given but config.data={cfg.data!r}; arrays "
                    f"need config.data={ARRAYS!r} (fedjax_tl.run sets it)")
  if arrays is None and cfg.data == ARRAYS:
    raise DataError(f"config.data={ARRAYS!r} names arrays given from Python "
                    "(fedjax_tl.run(config, data=...)); from the command "
                    "line, save them as an .npz file (docs/data.md)")
  if cfg.data == ARRAYS:
    from fedjax_tl.data.npz_source import arrays_transfer
    data, origin = arrays_transfer(arrays, "data=", cfg.num_clients), "data="
  elif cfg.data == "digits":
    from fedjax_tl.data.digits import load_digits_transfer
    data, origin = load_digits_transfer(
        cfg.num_clients, alpha=cfg.alpha, min_examples=cfg.min_examples,
        max_examples=cfg.max_examples, seed=cfg.seed,
        local_test_examples=cfg.local_test_examples), "digits"
  elif cfg.data == "shakespeare":
    from fedjax_tl.data.text import load_text_transfer
    data = load_text_transfer(
        cfg.data, cfg.data_path, data_format=cfg.data_format,
        num_clients=cfg.num_clients,
        max_client_examples=cfg.max_client_examples, seed=cfg.seed)
    origin = data.facts["files"]
  elif cfg.data in NATURAL_DATASETS:
    from fedjax_tl.data.natural import load_natural_transfer
    from fedjax_tl.data.natural.source import with_source
    data = with_source(load_natural_transfer(
        cfg.data, cfg.data_path, data_format=cfg.data_format,
        num_clients=cfg.num_clients,
        max_client_examples=cfg.max_client_examples, seed=cfg.seed),
        cfg.source, data_dir=cfg.data_dir, seed=cfg.seed)
    origin = data.facts["files"]
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
  _check_model_reads(cfg, data, origin)
  return data


def _check_model_reads(cfg: ExperimentConfig, data: TransferData,
                       origin: str) -> None:
  """The built-in model can read the data: images for the conv models,
  token sequences (integer ids, a label per position) for the lstm, and
  for the transformer either, 1-D inputs being read as token ids."""
  x, y = data.clients.x, data.clients.y
  tokens = np.issubdtype(x.dtype, np.integer) and y.shape == x.shape
  shape = data.input_shape
  if cfg.model in CONV_MODELS and len(shape) != 3:
    raise DataError(f"{origin}: config.model={cfg.model!r} needs image "
                    f"features [height, width, channels], got {shape}")
  if cfg.model in TEXT_MODELS and len(shape) == 1 and not tokens:
    raise DataError(f"{origin}: config.model={cfg.model!r} reads inputs of "
                    f"shape {shape} as token ids, but these are not a text "
                    f"task's ({x.dtype} features; a text task has integer "
                    "ids and a label per position)")
  if cfg.model == "mlp" and tokens:
    raise DataError(f"{origin}: config.model='mlp' cannot read token "
                    "sequences (lstm, transformer)")


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


def build_experiment(cfg: ExperimentConfig,
                     arrays: Mapping[str, Any] | None = None) -> Experiment:
  """Loads data (`arrays`: see `load_data`), makes the population and
  model, binds the simulation.

  A plan that cannot fit this machine's memory is refused first
  (memory.check_memory: from the data's header where it has one, before
  loading; else once loaded, before the model is built).
  """
  header = None if arrays is not None else memory.header_before_loading(cfg)
  if header is not None:
    memory.check_memory(cfg, header)
  data = load_data(cfg, arrays)
  if header is None:
    memory.check_memory(cfg, memory.loaded_header(data))
  model = build_model(cfg.model, data.input_shape, data.num_classes,
                      seed=cfg.seed, **{key: getattr(cfg, key)
                                        for key in models.Options._fields})
  model, loaded = model_weights(cfg, model)
  policy = experiment_policy(cfg)
  # The model the devices train (adapters on the backbone for adapter
  # policies).
  sim_model = policy.adapt_model(model, cfg.seed)
  # The model's own names: an adapter policy's adapters are never frozen.
  frozen = frozen_names(model.init_params, cfg.weights_freeze)
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
      unroll=cfg.unroll_local_steps, dropout=sim_model.has_dropout,
      loss_ignored=data.loss_ignored)
  simulation = Simulation.create(
      sim_model, update,
      server_optimizer(cfg.algorithm, cfg.server_lr, cfg.server_eps),
      data.clients, population, cohort_size=cfg.clients_per_round,
      chunk_size=chunk_size, mesh=mesh, data_placement=where.where,
      local_steps=cfg.local_steps, seed=cfg.seed, policy=policy,
      batch_size=cfg.batch_size, round_deadline=cfg.round_deadline,
      deadline_mode=cfg.deadline_mode,
      masked_ce=cfg.masked_ce, masked_ce_head=cfg.masked_ce_head,
      tier_fast_path=(cfg.tier_fast_path if cfg.tier_fast_path is not None
                      else auto_tier_fast_path(cfg, num_params)),
      overcommit=cfg.overcommit,
      optimizer_slots=int(cfg.client_momentum > 0),
      attack=faults.Attack(cfg.attack, cfg.attack_scale),
      aggregator=experiment_aggregator(cfg),
      privacy=dp_config(cfg), frozen=frozen,
      tunable=Tunable(
          client_tx=functools.partial(client_optimizer,
                                      momentum=cfg.client_momentum,
                                      weight_decay=cfg.weight_decay),
          server_tx=functools.partial(server_optimizer, cfg.algorithm,
                                      eps=cfg.server_eps),
          client_lr=cfg.client_lr, server_lr=cfg.server_lr, mu=cfg.mu))
  return Experiment(cfg, data, population, model, simulation,
                    chunk_reason=chunk_reason, placement=where,
                    weights=weights_record(cfg, loaded, frozen))


def model_weights(cfg: ExperimentConfig, model: ModelDef
                  ) -> tuple[ModelDef, dict[str, list[str]] | None]:
  """The model with `init_weights` loaded over its fresh init (by the
  `weights_*` keys, weights.load_file), and the load's report; the model
  as it is, and None, without `init_weights`.

  The loaded params are then the model's `init_params`: pretrain=none
  starts the federation from them, pretrain=source pretrains them further.

  Raises:
    DataError: the file cannot be read, or a parameter it must give is
      missing from it or shaped otherwise (the first three named).
    ConfigError: a `weights_load` / `weights_dont_load` (or
      `pretrain_reinit`) regex that matches no parameter.
  """
  if cfg.pretrain_reinit:  # applied after pretraining; refused before it
    matching(flatten(model.init_params), cfg.pretrain_reinit,
             "pretrain_reinit")
  if cfg.init_weights is None:
    return model, None
  params, report = load_file(
      model.init_params, cfg.init_weights, load=cfg.weights_load,
      dont_load=cfg.weights_dont_load,
      mapping=parse_mapping(cfg.weights_map),
      origin=f"config.init_weights={cfg.init_weights!r}")
  return dataclasses.replace(model, init_params=params), report


def weights_record(cfg: ExperimentConfig,
                   loaded: dict[str, list[str]] | None,
                   frozen: tuple[str, ...]) -> dict[str, Any] | None:
  """summary.json's `weights`: the file, the names loaded from it,
  re-initialised and left unused in it (with `init_weights`), and the
  names frozen; None when neither key is set."""
  if loaded is None and not frozen:
    return None
  return {"file": cfg.init_weights, **(loaded or {}), "frozen": list(frozen)}


def dp_config(cfg: ExperimentConfig) -> privacy.Privacy | None:
  """DP-FedAvg's parameters from the `dp*` keys, None with dp=False (the
  accountant's `inclusion_rate` is set by `Simulation.create`, from the
  population's availabilities)."""
  if not cfg.dp:
    return None
  return privacy.Privacy(
      noise_multiplier=cfg.dp_noise_multiplier, clip_norm=cfg.dp_clip_norm,
      sampling_rate=cfg.clients_per_round / cfg.num_clients,
      delta=cfg.dp_delta, accountant=cfg.dp_accountant,
      adaptive=cfg.dp_adaptive_clip, target_quantile=cfg.dp_target_quantile,
      clip_lr=cfg.dp_clip_lr, count_noise=cfg.dp_count_noise,
      denominator=cfg.dp_denominator)


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


