"""Experiment configuration: the default `ConfigDict`, overrides, validation.

Configs are `ml_collections.ConfigDict`s (the flax / big_vision convention);
`configs/*.py` build on :func:`default_config`. A config is checked once, at
the boundary, into the frozen :class:`ExperimentConfig`; a bad key or value
raises :class:`~fedjax_tl.errors.ConfigError` naming both.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import pathlib
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

from fedjax_tl import aggregators
from fedjax_tl.cost import overcommit_size
from fedjax_tl.device_catalog import CATALOGUE, class_for_width
from fedjax_tl.errors import ConfigError
from fedjax_tl.faults import ATTACKS
from fedjax_tl.models.base import CONV_IMPLS
from fedjax_tl.privacy import ACCOUNTANTS

from fedjax_tl import policies
from fedjax_tl.policies import HETEROFL_MODES, LORA_AGGREGATIONS

DEADLINE_MODES = ("partial", "drop")
COMPUTE_DTYPES = ("float32", "bfloat16")
DATA_PLACEMENTS = ("auto", "device", "host")
AVAILABILITY = ("uniform", "device_class", "trace")
ALGORITHMS = ("fedavg", "fedprox", "fedadam", "fedyogi", "heterofl")
MODELS = ("mlp", "cnn", "simple_cnn")  # simple_cnn: pfl-research's CIFAR-10 model
TFDS_DATASETS = ("mnist", "emnist", "fashion_mnist", "cifar10")
PARTITIONS = ("iid", "dirichlet", "quantity")
# HeteroFL's capacity levels: width of each (`capacity_mix`).
CAPACITY_LEVELS = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}


def default_config() -> ml_collections.ConfigDict:
  """The default offline experiment: pretrained digits onto 1,000 devices."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Data: "digits" (embedded, offline) or a tfds name (needs prepared data).
  c.data = "digits"
  c.data_dir = config_dict.placeholder(str)
  c.partition = "dirichlet"  # tfds only; digits is always label-skewed.
  c.alpha = 0.5  # Dirichlet concentration of each device's label mix.
  c.min_examples = 8
  c.max_examples = 48
  c.source_fraction = 0.1  # tfds only: share of train held by the server.
  # Held-out test examples per device, with its training label mix, for
  # local (label-masked) accuracy; 0 = none.
  c.local_test_examples = 10
  # Population.
  c.num_clients = 1000
  c.clients_per_round = 100
  c.tier_fractions = (1.0, 0.5, 0.25, 0.125)  # hidden-width fraction per tier
  c.tier_proportions = (0.25, 0.25, 0.25, 0.25)
  # Or both at once in HeteroFL's notation, e.g. "a1-b1-c1-d1-e1" or
  # "a6-b10-c11-d18-e55": levels a-e are widths 1, 1/2, 1/4, 1/8, 1/16, each
  # with a count (default 1), normalised to proportions.
  c.capacity_mix = config_dict.placeholder(str)
  c.min_availability = 0.3  # device i is online w.p. U(min_availability, 1)
  # Device class of each tier (device_catalog.CATALOGUE): its compute and
  # bandwidth, jittered per device, give simulated time. Default: the class
  # whose width is nearest the tier's (flagship 1, midrange 1/2, lowend 1/4,
  # iot 1/8).
  c.device_classes = config_dict.placeholder(tuple)
  c.device_jitter = 0.25
  c.round_deadline = 0.0  # simulated seconds; 0 = no deadline
  c.deadline_mode = "partial"  # "partial": fewer local steps; "drop"
  # Over-commitment: sample ceil(overcommit x clients_per_round) online
  # devices, aggregate the first clients_per_round to finish.
  c.overcommit = 1.0
  # FedScale-format traces (local pickle or JSON files; None = off).
  # device_trace (client_device_capacity): per-device compute and bandwidth
  # instead of the device class's; behave_trace (client_behave_trace): a
  # device is online iff its trace says so at the simulated clock.
  c.device_trace = config_dict.placeholder(str)
  c.behave_trace = config_dict.placeholder(str)
  # Who is online each round: "uniform" (U(min_availability, 1) per device),
  # "device_class" (the device class's figure, jittered) or "trace" (needs
  # behave_trace). Default: "trace" if behave_trace is set, else "uniform".
  c.availability = config_dict.placeholder(str)
  # Model.
  c.model = "mlp"
  c.hidden = (128,)  # mlp hidden widths: the 64-128-10 benchmark MLP
  c.cnn_channels = (32, 64)
  c.cnn_dense = 128
  # Train-time dropout rate at every dropout site of the model; None = the
  # model's own (0 for mlp and cnn, 0.25 and 0.5 for simple_cnn).
  c.dropout = config_dict.placeholder(float)
  # How cnn / simple_cnn convolutions run: "im2col" (shifted slices and one
  # matmul; several times faster on XLA:CPU, above all inside the round's
  # loops and under vmap), "xla" (lax.conv) or "auto" (im2col on CPU, xla on
  # accelerators). The same function either way.
  c.conv_impl = "auto"
  # Transfer: "source" pretrains on the source task, "none" starts from
  # scratch, anything else is the path of a saved pretrained checkpoint.
  c.pretrain = "source"
  c.pretrain_steps = 600
  c.pretrain_batch_size = 64
  c.pretrain_lr = 0.05
  # policy=distill: the server distils the pretrained model into every tier's
  # first-k sub-model before fine-tuning (transfer.distill), on the source
  # train set, with its labels (distill_labels) or without. Defaults measured
  # on the default experiment (README): T=4 edges out T=2; 1,000 steps or no
  # labels change the tiers by under a point.
  c.distill_steps = 300
  c.distill_temperature = 4.0
  c.distill_lr = 0.05
  c.distill_batch_size = 64
  c.distill_labels = True
  # Federated fine-tuning.
  c.algorithm = "fedavg"
  c.policy = "heterofl"  # the width migration policy, see policies.py
  c.heterofl_mode = "fix"  # "dynamic": levels redrawn from the mix each round
  # HeteroFL's masked cross-entropy (default on for heterofl and importance)
  # and scaler (default off: without the normalisation layers HeteroFL's
  # models have, it makes width-1/8 sub-models diverge; see README).
  c.scaler = False
  c.masked_ce = config_dict.placeholder(bool)
  # hetlora: adapter rank r_max (a device of width p gets ceil(p*r_max)) and
  # rank self-pruning (keep this share of the rank when the tail's part of
  # the update is below the threshold; 0 = off).
  # fjord: FjORD's self-distillation (the client's largest sub-model
  # teaches the width drawn for each step).
  c.fjord_distill = False
  c.lora_rank = 16
  c.lora_prune_ratio = 0.0
  c.lora_prune_threshold = 0.1
  # "padded": HetLoRA's zero-padded, norm-weighted merge; "holders": each
  # rank component averaged over the clients holding it.
  c.lora_aggregation = "padded"
  c.num_rounds = 50
  c.local_steps = 5
  c.batch_size = 10
  c.client_lr = 0.1
  c.client_momentum = 0.0
  c.weight_decay = 0.0
  c.mu = config_dict.placeholder(float)  # FedProx; default 0.01 for fedprox
  c.server_lr = config_dict.placeholder(float)  # default per algorithm
  c.server_eps = 1e-3  # fedadam / fedyogi tau
  c.chunk_size = 0  # clients vmapped together; 0 = automatic
  # Rounds run as one compiled call (a lax.scan) between evaluations and
  # checkpoints; the results are the same for every value.
  c.rounds_per_call = 1
  # Where the client data lives: "device" (raise if it does not fit),
  # "host" (host memory, each chunk's rows copied in as the round needs
  # them) or "auto" (device when it fits, else host).
  c.data_placement = "auto"
  # Devices whose `clients` mesh the cohort and client data are split over:
  # 0 = all (every host's, under jax.distributed), 1 = no mesh.
  c.num_devices = 0
  # Local training's forward/backward dtype: "float32" or "bfloat16" (params,
  # optimiser state, deltas and aggregation stay float32).
  c.compute_dtype = "float32"
  # Unroll the local-step loop; None = automatic: on for the cnn (XLA:CPU
  # runs convolutions in a rolled loop several times slower), off for mlp.
  c.unroll_local_steps = config_dict.placeholder(bool)
  # Run each tier at its sub-model's real shape (first-k policies only, see
  # tiered.py) instead of full size with masks; None = automatic (see
  # runner.auto_tier_fast_path).
  c.tier_fast_path = config_dict.placeholder(bool)
  # Faults (faults.py). A share `attack_fraction` of the devices (drawn from
  # the seed) is malicious: "sign_flip" uploads -attack_scale x its delta,
  # "scale" attack_scale x its delta, "label_flip" trains on labels C-1-y.
  c.attack = "none"
  c.attack_fraction = 0.2
  c.attack_scale = 10.0
  # The server's aggregator (aggregators.Aggregator): "mean", "clip" (each
  # update's norm clipped to clip_norm), "median", "trimmed_mean" (drop
  # trim_fraction at each end), "krum", "multi_krum" (krum_f assumed
  # attackers, krum_m selected). median, trimmed_mean and (multi_)krum hold
  # the cohort's deltas at once and need the masked path (tier_fast_path
  # not True). krum_f None: the expected attackers in a cohort,
  # round(attack_fraction x clients_per_round) with an attack, else 0;
  # krum_m None: clients_per_round - krum_f.
  c.aggregator = "mean"
  c.clip_norm = 1.0
  c.trim_fraction = 0.2
  c.krum_f = config_dict.placeholder(int)
  c.krum_m = config_dict.placeholder(int)
  # User-level differential privacy, DP-FedAvg (privacy.py): each online
  # device takes part in a round w.p. clients_per_round / num_clients,
  # every participant weighs 1 and its update is clipped to dp_clip_norm,
  # the sum gets N(0, (dp_noise_multiplier x clip)^2) noise per entry
  # before the mean. dp_adaptive_clip: the clip norm follows the
  # dp_target_quantile of the update norms (Andrew et al. 2021; learning
  # rate dp_clip_lr, count noise dp_count_noise, default the larger of
  # expected clients / 20 and dp_noise_multiplier). Epsilon at dp_delta
  # (default min(1e-5, 1 / num_clients)) from dp-accounting's dp_accountant
  # ("rdp" or "pld").
  c.dp = False
  c.dp_noise_multiplier = 1.0
  c.dp_clip_norm = 1.0
  c.dp_adaptive_clip = False
  c.dp_target_quantile = 0.5
  c.dp_clip_lr = 0.2
  c.dp_count_noise = config_dict.placeholder(float)
  c.dp_delta = config_dict.placeholder(float)
  c.dp_accountant = "rdp"
  # Host loop.
  c.eval_every = 5
  # A global accuracy to reach: summary.json then reports the rounds,
  # simulated seconds and bytes (up + down) it took. None = off.
  c.target_accuracy = config_dict.placeholder(float)
  c.checkpoint_every = 10
  c.keep_checkpoints = 2
  # `fedjax-tl compare`: the policies run side by side.
  c.compare_policies = ("heterofl", "importance", "distill", "fjord",
                        "fedrolex", "fed_dropout", "partial_finetune",
                        "hetlora", "uniform_smallest", "uniform_full_only")
  # `fedjax-tl sweep`: the grid product of the non-empty value tuples below,
  # times the seeds (empty: the config's seed), each run one setting of the
  # config. Seeds vary the federated randomness (cohorts, masks, batches) on
  # one population, data set and pretrained model (those use `seed`).
  # Runs vmap as one program, `sweep_batch` runs at a time (0 = all).
  c.sweep_seeds = (0, 1, 2, 3)
  c.sweep_client_lr = ()
  c.sweep_server_lr = ()
  c.sweep_mu = ()
  # Discrete axes, run one after another (each changes the data partition or
  # the compiled program): the partition's Dirichlet alpha and the policy.
  c.sweep_alpha = ()
  c.sweep_policy = ()
  c.sweep_batch = 0
  return c


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A validated, immutable experiment configuration (see default_config)."""
  seed: int
  data: str
  data_dir: str | None
  partition: str
  alpha: float
  min_examples: int
  max_examples: int
  source_fraction: float
  local_test_examples: int
  num_clients: int
  clients_per_round: int
  tier_fractions: tuple[float, ...]
  tier_proportions: tuple[float, ...]
  capacity_mix: str | None
  min_availability: float
  device_classes: tuple[str, ...]
  device_jitter: float
  round_deadline: float
  deadline_mode: str
  overcommit: float
  device_trace: str | None
  behave_trace: str | None
  availability: str
  model: str
  hidden: tuple[int, ...]
  cnn_channels: tuple[int, ...]
  cnn_dense: int
  dropout: float | None
  conv_impl: str
  pretrain: str
  pretrain_steps: int
  pretrain_batch_size: int
  pretrain_lr: float
  distill_steps: int
  distill_temperature: float
  distill_lr: float
  distill_batch_size: int
  distill_labels: bool
  algorithm: str
  policy: str
  heterofl_mode: str
  scaler: bool
  masked_ce: bool
  fjord_distill: bool
  lora_rank: int
  lora_prune_ratio: float
  lora_prune_threshold: float
  lora_aggregation: str
  num_rounds: int
  local_steps: int
  batch_size: int
  client_lr: float
  client_momentum: float
  weight_decay: float
  mu: float
  server_lr: float
  server_eps: float
  chunk_size: int
  rounds_per_call: int
  data_placement: str
  num_devices: int
  compute_dtype: str
  unroll_local_steps: bool
  tier_fast_path: bool | None
  attack: str
  attack_fraction: float
  attack_scale: float
  aggregator: str
  clip_norm: float
  trim_fraction: float
  krum_f: int
  krum_m: int
  dp: bool
  dp_noise_multiplier: float
  dp_clip_norm: float
  dp_adaptive_clip: bool
  dp_target_quantile: float
  dp_clip_lr: float
  dp_count_noise: float
  dp_delta: float
  dp_accountant: str
  eval_every: int
  target_accuracy: float | None
  checkpoint_every: int
  keep_checkpoints: int
  compare_policies: tuple[str, ...]
  sweep_seeds: tuple[int, ...]
  sweep_client_lr: tuple[float, ...]
  sweep_server_lr: tuple[float, ...]
  sweep_mu: tuple[float, ...]
  sweep_alpha: tuple[float, ...]
  sweep_policy: tuple[str, ...]
  sweep_batch: int

  @property
  def tier_names(self) -> tuple[str, ...]:
    """Tier names from their width fractions, e.g. ('1', '0.5', '0.25')."""
    return tuple(f"{f:g}" for f in self.tier_fractions)

  def to_dict(self) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()}


def load_config(spec: str | None) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` (its `get_config([arg])`), or the default."""
  if spec is None:
    return default_config()
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"--config={spec!r}: no such config file {path!r}")
  module_spec = importlib.util.spec_from_file_location(
      f"fedjax_tl_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # A broken config file is a user error.
    raise ConfigError(f"--config={spec!r}: cannot load: {e}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config={spec!r}: the file defines no get_config()")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # The user's code; its failure is theirs to fix.
    raise ConfigError(f"--config={spec!r}: get_config() raised "
                      f"{type(e).__name__}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"--config={spec!r}: get_config() returned a "
                      f"{type(config).__name__}, not a ConfigDict")
  return config


def _parse_value(text: str) -> Any:
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return tuple(value) if isinstance(value, list) else value


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[tuple[str, str]]
                    ) -> ml_collections.ConfigDict:
  """Applies `(dotted.key, text value)` pairs, checking keys and types."""
  config = ml_collections.ConfigDict(config)  # a copy; callers keep theirs
  for key, text in overrides:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node or not isinstance(node[part],
                                            ml_collections.ConfigDict):
        raise ConfigError(f"config.{key}: unknown key{_suggest(part, node)}")
      node = node[part]
    if leaf not in node:
      raise ConfigError(f"config.{key}: unknown key{_suggest(leaf, node)}")
    value = _parse_value(text)
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not \
        isinstance(value, bool):
      value = float(value)
    if isinstance(current, tuple) and not isinstance(value, tuple):
      value = (value,)
    for candidate in (value, text):  # e.g. a str field given "123"
      try:
        node[leaf] = candidate
        break
      except TypeError:
        continue
    else:
      expected = node.get_ref(leaf).get_type() if current is None else type(
          current)
      raise ConfigError(f"config.{key}={text!r}: expected {expected.__name__}")
  return config


def _suggest(name: str, node: ml_collections.ConfigDict) -> str:
  close = difflib.get_close_matches(name, list(node.keys()), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _finite(value: int | float) -> bool:
  try:
    return math.isfinite(value)
  except OverflowError:  # an int beyond float range
    return False


def _check(ok: bool, key: str, value: Any, requirement: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}={value!r}: {requirement}")


def parse_capacity_mix(mix: str
                       ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """HeteroFL's capacity mix (e.g. "a6-b10-c11-d18-e55") as
  `(tier_fractions, tier_proportions)`, tiers in the order written.

  Levels a, b, c, d, e are widths 1, 1/2, 1/4, 1/8, 1/16; the number after a
  level is its count of devices (1 when left out; "a-e" is half at a, half at
  e); counts are normalised to proportions.

  Raises:
    ConfigError: naming `capacity_mix` and the value, for an unknown level,
      a repeated level, a bad count or a zero total.
  """
  def fail(requirement):
    _check(False, "capacity_mix", mix, requirement)

  if not isinstance(mix, str) or not mix.strip():
    fail("must be a mix such as 'a1-b1-c1-d1-e1'")
  fractions, counts = [], []
  for part in mix.strip().split("-"):
    level, count = part[:1], part[1:]
    if level not in CAPACITY_LEVELS:
      fail(f"unknown level {part!r}; levels are "
           f"{', '.join(CAPACITY_LEVELS)} (widths 1, 1/2, 1/4, 1/8, 1/16), "
           "each optionally followed by a count")
    if CAPACITY_LEVELS[level] in fractions:
      fail(f"repeats level {level!r}")
    if count and not (count.isascii() and count.isdigit()):
      fail(f"bad count {count!r} of level {level!r} (must be an integer "
           ">= 0)")
    fractions.append(CAPACITY_LEVELS[level])
    counts.append(int(count) if count else 1)
  total = sum(counts)
  if total == 0:
    fail("the counts sum to 0")
  return tuple(fractions), tuple(c / total for c in counts)


def validate(config: ml_collections.ConfigDict) -> ExperimentConfig:
  """Checks every field of a ConfigDict into a frozen ExperimentConfig."""
  raw = config.to_dict()
  fields = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
  for key in raw:
    if key not in fields:
      close = difflib.get_close_matches(key, list(fields), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"config.{key}: unknown key{hint}")
  for key in fields:
    if key not in raw:
      raise ConfigError(f"config.{key}: missing key")

  v = dict(raw)
  algorithm = v["algorithm"]
  _check(algorithm in ALGORITHMS, "algorithm", algorithm,
         f"must be one of {', '.join(ALGORITHMS)}")
  if v["server_lr"] is None:
    v["server_lr"] = 0.01 if algorithm in ("fedadam", "fedyogi") else 1.0
  if v["mu"] is None:
    v["mu"] = 0.01 if algorithm == "fedprox" else 0.0

  def integer(key, low=None):
    value = v[key]
    _check(isinstance(value, int) and not isinstance(value, bool), key, value,
           "must be an integer")
    if low is not None:
      _check(value >= low, key, value, f"must be >= {low}")

  def number(key, low=None, high=None, low_open=False):
    value = v[key]
    _check(isinstance(value, (int, float)) and not isinstance(value, bool)
           and _finite(value), key, value, "must be a finite number")
    v[key] = float(value)
    if low is not None:
      ok = value > low if low_open else value >= low
      _check(ok, key, value, f"must be {'>' if low_open else '>='} {low}")
    if high is not None:
      _check(value <= high, key, value, f"must be <= {high}")

  def choice(key, options):
    _check(v[key] in options, key, v[key], f"must be one of {', '.join(options)}")

  def int_tuple(key):
    value = v[key]
    _check(isinstance(value, (tuple, list)) and len(value) > 0 and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 1
        for x in value), key, value, "must be a non-empty tuple of integers >= 1")
    v[key] = tuple(value)

  integer("seed", 0)
  _check(v["seed"] < 2**31, "seed", v["seed"],
         "must be < 2**31 (an int32 inside the compiled round)")
  _check(isinstance(v["data"], str) and (
      v["data"] == "digits" or v["data"].split("/")[0] in TFDS_DATASETS or
      v["data"].endswith(".npz")), "data", v["data"],
         f"must be digits, one of {', '.join(TFDS_DATASETS)} or the path of "
         "an .npz file")
  choice("partition", PARTITIONS)
  number("alpha", 0, low_open=True)
  integer("min_examples", 1)
  integer("max_examples", 1)
  _check(v["max_examples"] >= v["min_examples"], "max_examples",
         v["max_examples"], f"must be >= min_examples ({v['min_examples']})")
  number("source_fraction", 0, 1, low_open=True)
  integer("local_test_examples", 0)
  integer("num_clients", 1)
  integer("clients_per_round", 1)
  _check(v["clients_per_round"] <= v["num_clients"], "clients_per_round",
         v["clients_per_round"], f"must be <= num_clients ({v['num_clients']})")
  if v["capacity_mix"] is not None:
    defaults = default_config()
    for key in ("tier_fractions", "tier_proportions"):
      _check(isinstance(v[key], (tuple, list)) and
             tuple(v[key]) == tuple(defaults[key]), "capacity_mix",
             v["capacity_mix"], f"sets the tiers, so config.{key}="
             f"{v[key]!r} must be left at its default; set only one")
    v["tier_fractions"], v["tier_proportions"] = parse_capacity_mix(
        v["capacity_mix"])
  fractions = v["tier_fractions"]
  _check(isinstance(fractions, (tuple, list)) and len(fractions) > 0 and all(
      isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1
      for f in fractions), "tier_fractions", fractions,
         "must be a non-empty tuple of fractions in (0, 1]")
  v["tier_fractions"] = tuple(float(f) for f in fractions)
  props = v["tier_proportions"]
  _check(isinstance(props, (tuple, list)) and len(props) == len(fractions),
         "tier_proportions", props,
         f"must have one entry per tier ({len(fractions)})")
  _check(all(isinstance(p, (int, float)) and not isinstance(p, bool) and p >= 0
             for p in props) and abs(sum(props) - 1) < 1e-6,
         "tier_proportions", props, "must be >= 0 and sum to 1")
  v["tier_proportions"] = tuple(float(p) for p in props)
  _check(len(set(v["tier_fractions"])) == len(fractions), "tier_fractions",
         fractions, "must not repeat a fraction")
  number("min_availability", 0, 1, low_open=True)
  if v["device_classes"] is None:
    v["device_classes"] = tuple(class_for_width(f)
                                for f in v["tier_fractions"])
  classes = v["device_classes"]
  _check(isinstance(classes, (tuple, list)) and len(classes) == len(fractions)
         and all(isinstance(c, str) and c in CATALOGUE for c in classes),
         "device_classes", classes,
         f"must name one device class per tier ({len(fractions)}) among "
         f"{', '.join(CATALOGUE)}")
  v["device_classes"] = tuple(classes)
  number("device_jitter", 0)
  number("round_deadline", 0)
  choice("deadline_mode", DEADLINE_MODES)
  number("overcommit", 1)
  sampled = overcommit_size(v["clients_per_round"], v["overcommit"])
  _check(sampled <= v["num_clients"], "overcommit", v["overcommit"],
         f"samples {sampled} devices a round, more than num_clients "
         f"({v['num_clients']})")
  for key in ("device_trace", "behave_trace"):
    if v[key] is not None:
      _check(isinstance(v[key], str) and v[key] != "", key, v[key],
             "must be the path of a trace file (pickle or JSON)")
  if v["availability"] is None:
    v["availability"] = "uniform" if v["behave_trace"] is None else "trace"
  choice("availability", AVAILABILITY)
  _check(v["availability"] != "trace" or v["behave_trace"] is not None,
         "availability", v["availability"],
         "needs behave_trace (a client_behave_trace file)")
  _check(v["availability"] == "trace" or v["behave_trace"] is None,
         "availability", v["availability"],
         "must be 'trace' when behave_trace is set")
  choice("model", MODELS)
  choice("conv_impl", CONV_IMPLS)
  int_tuple("hidden")
  int_tuple("cnn_channels")
  integer("cnn_dense", 1)
  if v["dropout"] is not None:
    number("dropout", 0)
    _check(v["dropout"] < 1, "dropout", v["dropout"], "must be in [0, 1)")
  _check(isinstance(v["pretrain"], str) and v["pretrain"] != "", "pretrain",
         v["pretrain"], "must be 'source', 'none' or a checkpoint path")
  if v["pretrain"] not in ("source", "none"):
    _check(pathlib.Path(v["pretrain"]).exists(), "pretrain", v["pretrain"],
           "no such checkpoint (expected 'source', 'none' or a path)")
  integer("pretrain_steps", 0)
  integer("pretrain_batch_size", 1)
  number("pretrain_lr", 0, low_open=True)
  integer("distill_steps", 0)
  number("distill_temperature", 0, low_open=True)
  number("distill_lr", 0, low_open=True)
  integer("distill_batch_size", 1)
  _check(isinstance(v["distill_labels"], bool), "distill_labels",
         v["distill_labels"], "must be True or False")
  choice("policy", policies.names())
  policy = policies.make(v["policy"])
  choice("heterofl_mode", HETEROFL_MODES)
  if v["masked_ce"] is None:
    v["masked_ce"] = policy.default("masked_ce", False)
  for key in ("scaler", "masked_ce"):
    _check(isinstance(v[key], bool), key, v[key], "must be True or False")
  _check(isinstance(v["fjord_distill"], bool), "fjord_distill",
         v["fjord_distill"], "must be True or False")
  stepped = policies.names_where(lambda p: p.step_masks is not None)
  _check(not v["fjord_distill"] or policy.step_masks is not None,
         "fjord_distill", v["fjord_distill"],
         f"needs policy={' or '.join(stepped)} (policy={v['policy']!r})")
  integer("lora_rank", 1)
  number("lora_prune_ratio", 0)
  _check(v["lora_prune_ratio"] < 1, "lora_prune_ratio",
         v["lora_prune_ratio"], "must be in [0, 1) (0 = no pruning)")
  number("lora_prune_threshold", 0, 1, low_open=True)
  choice("lora_aggregation", LORA_AGGREGATIONS)
  if algorithm == "heterofl":
    family = policies.names_where(lambda p: p.family == "heterofl")
    _check(policy.family == "heterofl", "policy", v["policy"],
           f"must be one of {', '.join(family)} when "
           "algorithm=heterofl")
  integer("num_rounds", 1)
  integer("local_steps", 1)
  integer("batch_size", 1)
  number("client_lr", 0, low_open=True)
  number("client_momentum", 0, 1)
  _check(v["client_momentum"] < 1, "client_momentum", v["client_momentum"],
         "must be < 1")
  number("weight_decay", 0)
  number("mu", 0)
  number("server_lr", 0, low_open=True)
  number("server_eps", 0, low_open=True)
  integer("chunk_size", 0)
  integer("rounds_per_call", 1)
  choice("data_placement", DATA_PLACEMENTS)
  integer("num_devices", 0)
  choice("compute_dtype", COMPUTE_DTYPES)
  if v["unroll_local_steps"] is None:
    v["unroll_local_steps"] = v["model"] in ("cnn", "simple_cnn")
  _check(isinstance(v["unroll_local_steps"], bool), "unroll_local_steps",
         v["unroll_local_steps"], "must be True or False")
  _check(v["tier_fast_path"] is None or isinstance(v["tier_fast_path"], bool),
         "tier_fast_path", v["tier_fast_path"],
         "must be True, False or None (automatic)")
  if v["tier_fast_path"]:
    first_k = policies.names_where(lambda p: p.fixed_widths is not None)
    _check(policy.fixed_widths is not None, "tier_fast_path",
           v["tier_fast_path"], f"needs a first-k width policy (one of "
           f"{', '.join(first_k)}), not policy={v['policy']!r}")
  choice("attack", ATTACKS)
  number("attack_fraction", 0, 1)
  number("attack_scale", 0, low_open=True)
  choice("aggregator", aggregators.names())
  number("clip_norm", 0, low_open=True)
  number("trim_fraction", 0)
  _check(v["trim_fraction"] < 0.5, "trim_fraction", v["trim_fraction"],
         "must be in [0, 0.5) (a share dropped at each end)")
  _check(not (v["tier_fast_path"] and
              aggregators.make(v["aggregator"]).stacked),
         "tier_fast_path", v["tier_fast_path"],
         f"must not be True with aggregator={v['aggregator']!r}: it stacks "
         "the cohort's deltas on the masked path (leave tier_fast_path "
         "unset)")
  cohort = v["clients_per_round"]
  if v["krum_f"] is None:
    v["krum_f"] = (int(round(v["attack_fraction"] * cohort))
                   if v["attack"] != "none" else 0)
  integer("krum_f", 0)
  least = aggregators.get(v["aggregator"], krum_f=v["krum_f"]).min_cohort
  _check(cohort >= least, "krum_f", v["krum_f"],
         f"aggregator={v['aggregator']!r} needs clients_per_round ({cohort}) "
         f">= {least} (Krum: 2 x krum_f + 3)")
  if v["krum_m"] is None:
    v["krum_m"] = max(cohort - v["krum_f"], 1)
  integer("krum_m", 1)
  _check(v["krum_m"] <= cohort, "krum_m", v["krum_m"],
         f"must be <= clients_per_round ({cohort})")
  _check_privacy(v)
  integer("eval_every", 1)
  if v["target_accuracy"] is not None:
    number("target_accuracy", 0, 1, low_open=True)
  integer("checkpoint_every", 1)
  integer("keep_checkpoints", 1)
  names = v["compare_policies"]
  _check(isinstance(names, (tuple, list)) and len(names) > 0 and all(
      n in policies.names() for n in names) and len(set(names)) == len(
          names), "compare_policies", names,
         f"must be distinct names among {', '.join(policies.names())}")
  v["compare_policies"] = tuple(names)
  _check_sweep(v)
  if v["data_dir"] is not None:
    _check(isinstance(v["data_dir"], str), "data_dir", v["data_dir"],
           "must be a path")
  return ExperimentConfig(**v)


def _check_privacy(v: dict[str, Any]) -> None:
  """Checks the `dp*` keys in place, filling in the defaults."""
  def flag(key):
    _check(isinstance(v[key], bool), key, v[key], "must be True or False")

  def real(key, requirement, is_ok):
    value = v[key]
    _check(isinstance(value, (int, float)) and not isinstance(value, bool)
           and _finite(value) and is_ok(value), key, value, requirement)
    v[key] = float(value)

  flag("dp")
  flag("dp_adaptive_clip")
  real("dp_noise_multiplier", "must be a number >= 0", lambda x: x >= 0)
  real("dp_clip_norm", "must be a number > 0", lambda x: x > 0)
  real("dp_target_quantile", "must be in (0, 1)", lambda x: 0 < x < 1)
  real("dp_clip_lr", "must be a number > 0", lambda x: x > 0)
  if v["dp_count_noise"] is None:  # Andrew et al.'s m / 20, and > z / 2
    v["dp_count_noise"] = max(v["clients_per_round"] / 20.0,
                              v["dp_noise_multiplier"])
  real("dp_count_noise", "must be a number > 0", lambda x: x > 0)
  if v["dp_delta"] is None:
    v["dp_delta"] = min(1e-5, 1.0 / v["num_clients"])
  real("dp_delta", "must be in (0, 1)", lambda x: 0 < x < 1)
  _check(v["dp_accountant"] in ACCOUNTANTS, "dp_accountant",
         v["dp_accountant"], f"must be one of {', '.join(ACCOUNTANTS)}")
  if not v["dp"]:
    return
  z = v["dp_noise_multiplier"]
  _check(not v["dp_adaptive_clip"] or z == 0 or v["dp_count_noise"] > z / 2,
         "dp_count_noise", v["dp_count_noise"],
         f"must be > dp_noise_multiplier / 2 ({z / 2:g}) with "
         "dp_adaptive_clip: the count's noise takes part of the budget")
  _check(aggregators.make(v["aggregator"]).is_mean, "aggregator",
         v["aggregator"],
         "must be 'mean' with dp=True (DP clips and noises the mean)")
  _check(not policies.make(v["policy"]).weighted_upload, "policy",
         v["policy"],
         "cannot run with dp=True: its merge weighs clients by their update "
         "norms, which DP's equal weights exclude")
  _check(v["overcommit"] == 1.0, "overcommit", v["overcommit"],
         "must be 1 with dp=True (devices are Poisson-sampled)")


def _check_sweep(v: dict[str, Any]) -> None:
  """Checks the sweep spec (`sweep_*` keys) in place, as tuples."""
  def values(key, is_ok, requirement):
    items = v[key]
    _check(isinstance(items, (tuple, list)) and all(map(is_ok, items)) and
           len(set(items)) == len(items), key, items,
           f"must be a tuple of distinct {requirement} (empty: not swept)")
    v[key] = tuple(items)

  def real(x):
    return (isinstance(x, (int, float)) and not isinstance(x, bool) and
            math.isfinite(x))

  # Seeds are int32 inside the compiled round.
  values("sweep_seeds", lambda x: isinstance(x, int) and not isinstance(
      x, bool) and 0 <= x < 2**31, "integers in [0, 2**31)")
  values("sweep_client_lr", lambda x: real(x) and x > 0, "numbers > 0")
  values("sweep_server_lr", lambda x: real(x) and x > 0, "numbers > 0")
  values("sweep_mu", lambda x: real(x) and x >= 0, "numbers >= 0")
  values("sweep_alpha", lambda x: real(x) and x > 0, "numbers > 0")
  values("sweep_policy", lambda x: isinstance(x, str) and
         x in policies.names(),
         f"policies among {', '.join(policies.names())}")
  for key in ("sweep_client_lr", "sweep_server_lr", "sweep_mu",
              "sweep_alpha"):
    v[key] = tuple(float(x) for x in v[key])
  _check(not v["sweep_alpha"] or v["data"] == "digits" or
         v["partition"] != "iid", "sweep_alpha", v["sweep_alpha"],
         "needs a partition that uses alpha (partition=dirichlet or "
         "quantity, not iid)")
  batch = v["sweep_batch"]
  _check(isinstance(batch, int) and not isinstance(batch, bool) and
         batch >= 0, "sweep_batch", batch,
         "must be an integer >= 0 (0: all runs in one program)")
