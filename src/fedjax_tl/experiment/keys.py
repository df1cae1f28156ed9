"""Every config key, declared once: name, default, type, allowed values, help.

The `ConfigDict` defaults (`config.default_config`), the frozen typed
`ExperimentConfig` and each key's own check are all derived from `KEYS`; only
the rules between keys are written by hand (experiment/relations.py). A key
whose default is None is optional: None means "derived from other keys" or
"off", as its help says.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Sequence

from fedjax_tl import aggregators, models, policies, weights
from fedjax_tl.client import HEAD_RULES
from fedjax_tl.device_catalog import CATALOGUE
from fedjax_tl.experiment import writers
from fedjax_tl.faults import ATTACKS
from fedjax_tl.models.layers import CONV_IMPLS
from fedjax_tl.privacy import ACCOUNTANTS, DENOMINATORS

SECTIONS = ("data", "population", "model", "policy", "client", "server",
            "aggregator", "privacy", "faults", "run", "sweep")
ALGORITHMS = ("fedavg", "fedprox", "fedadam", "fedyogi", "heterofl")
MODELS = models.names()
# The built-in models that read token ids (next-character prediction).
TEXT_MODELS = ("lstm", "transformer")
NORMS = ("batch", "layer", "group")
TFDS_DATASETS = ("mnist", "emnist", "fashion_mnist", "cifar10")
# Natural federated data sets, read from config.data_path (data/natural/).
NATURAL_DATASETS = ("femnist", "shakespeare", "cifar100", "stackoverflow")
DATA_FORMATS = ("auto", "sqlite", "hdf5", "leaf", "parquet")
PARTITIONS = ("iid", "dirichlet", "quantity")
DEADLINE_MODES = ("partial", "drop")
COMPUTE_DTYPES = ("float32", "bfloat16")
DATA_PLACEMENTS = ("auto", "device", "host")
AVAILABILITY = ("uniform", "device_class", "trace")


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key.

  Attributes:
    name: the key.
    default: its default; None makes it optional (None is then allowed).
    help: one line for `fedjax-tl config`.
    section: one of SECTIONS.
    kind: "int", "float", "bool", "str", or a tuple of them: "ints",
      "floats", "strs".
    choices: the allowed values (of each element, for a tuple), or a
      function returning them (a registry's names).
    low, high: bounds of the value (of each element); `low_open` /
      `high_open` exclude them.
    empty: for a tuple, what an empty one means (None: it must not be empty).
    distinct: a tuple's elements must not repeat.
    check: a further test of the value, returning what it must be when it
      fails (None when it passes).
    follows: the resumable key (workdir.RESUMABLE_KEYS) that config.validate
      derives this key's value from when it is left None. The derived value
      is part of the run's identity, so a run resumed with that key changed
      would derive another and is refused (workdir.check_workdir), naming
      the old value to pass.
  """
  name: str
  default: Any
  help: str
  section: str
  kind: str
  choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  empty: str | None = None
  distinct: bool = False
  check: Callable[[Any], str | None] | None = None
  follows: str | None = None

  @property
  def allowed(self) -> tuple[Any, ...] | None:
    return tuple(self.choices() if callable(self.choices) else self.choices
                 ) if self.choices is not None else None

  @property
  def python_type(self) -> type:
    return {"int": int, "float": float, "bool": bool, "str": str}.get(
        self.kind, tuple)


# config.data of a run whose arrays came from Python (`fedjax_tl.run(config,
# data=...)`); the arrays themselves are not config (their digest is in the
# run's identity).
ARRAYS = "arrays"


def _data(value: Any) -> str | None:
  if isinstance(value, str) and (value in ("digits", ARRAYS) or
                                 value.endswith(".npz") or
                                 value in NATURAL_DATASETS or
                                 value.split("/")[0] in TFDS_DATASETS):
    return None
  return (f"must be digits, one of {', '.join(TFDS_DATASETS)}, a natural "
          f"data set ({', '.join(NATURAL_DATASETS)}), the path of an .npz "
          f"file or {ARRAYS} (fedjax_tl.run's data=)")


def _source(value: Any) -> str | None:
  if isinstance(value, str) and (value == "none" or value.endswith(".npz") or
                                 value.split("/")[0] in TFDS_DATASETS):
    return None
  return (f"must be none, a tfds name ({', '.join(TFDS_DATASETS)}, e.g. "
          "emnist/digits) or the path of an .npz file")


def _model(value: Any) -> str | None:
  if not isinstance(value, str):
    return "must be a model name"
  try:
    models.resolve(value)
  except ValueError as e:
    return str(e).replace(f"model {value!r}: ", "").replace(
        f"unknown model {value!r}; models are", "must be one of")
  return None


def _path(what: str) -> Callable[[Any], str | None]:
  return lambda value: (None if isinstance(value, str) and value else
                        f"must be {what}")


def _pretrain(value: Any) -> str | None:
  if not isinstance(value, str) or not value:
    return "must be 'source', 'none' or a checkpoint path"
  if value in ("source", "none") or pathlib.Path(value).exists():
    return None
  return "no such checkpoint (expected 'source', 'none' or a path)"


def _seed(value: int) -> str | None:
  return None if value < 2**31 else ("must be < 2**31 (an int32 inside the "
                                     "compiled round)")


def _keys(section: str, *rows: tuple) -> list[Key]:
  """`Key(name, default, help, section, kind, **options)` for each row
  `(name, default, kind, help[, options])`."""
  return [Key(name, default, help, section, kind, **(rest[0] if rest else {}))
          for name, default, kind, help, *rest in rows]


_POSITIVE = dict(low=0, low_open=True)
_FRACTION = dict(low=0, high=1, low_open=True)

KEYS: tuple[Key, ...] = tuple(
    _keys("data",
          ("data", "digits", "str", "digits (embedded, offline), a tfds name "
           "(prepared data), an .npz file, or arrays: fedjax_tl.run(config, "
           "data=...) sets it", dict(check=_data)),
          ("data_dir", None, "str", "tfds data directory (None: tfds' own)",
           dict(check=_path("a path"))),
          ("data_path", None, "str", "natural data: the train file, or the "
           "directory of the train and test files",
           dict(check=_path("a path"))),
          ("data_format", "auto", "str", "natural data: the file format "
           "(auto: recognised from the file's first bytes)",
           dict(choices=DATA_FORMATS)),
          ("max_client_examples", None, "int", "natural data: examples kept "
           "per client, its first N in the file's order (None: all, padded "
           "to the largest client)", dict(low=1)),
          ("source", "none", "str", "natural data: the server's source task "
           "for pretraining: none (no pretraining), a tfds name or an .npz "
           "file of source_x/source_y", dict(check=_source)),
          ("partition", "dirichlet", "str", "tfds only: how the target data "
           "is split over devices", dict(choices=PARTITIONS)),
          ("alpha", 0.5, "float", "Dirichlet concentration of each device's "
           "label mix", _POSITIVE),
          ("min_examples", 8, "int", "fewest examples per device",
           dict(low=1)),
          ("max_examples", 48, "int", "most examples per device",
           dict(low=1)),
          ("source_fraction", 0.1, "float", "tfds only: share of train held "
           "by the server as the source task", _FRACTION),
          ("local_test_examples", 10, "int", "held-out test examples per "
           "device with its label mix, for local accuracy (0: none)",
           dict(low=0))) +
    _keys("population",
          ("num_clients", None, "int", "devices in the population (None: "
           "1000, or a natural data set's train clients)", dict(low=1)),
          ("clients_per_round", 100, "int", "cohort size M per round",
           dict(low=1)),
          ("tier_fractions", (1.0, 0.5, 0.25, 0.125), "floats",
           "hidden-width fraction of each capacity tier",
           dict(distinct=True, **_FRACTION)),
          ("tier_proportions", (0.25, 0.25, 0.25, 0.25), "floats",
           "share of devices in each tier (sums to 1)"),
          ("capacity_mix", None, "str", "tiers in HeteroFL's notation, e.g. "
           "a6-b10-c11-d18-e55 (levels a-e: widths 1..1/16, with counts)"),
          ("min_availability", 0.3, "float", "device i is online w.p. "
           "U(min_availability, 1)", _FRACTION),
          ("device_classes", None, "strs", "device class of each tier "
           f"({', '.join(CATALOGUE)}); None: nearest the tier's width",
           dict(choices=tuple(CATALOGUE))),
          ("device_jitter", 0.25, "float", "per-device spread of compute and "
           "bandwidth around the class's", dict(low=0)),
          ("round_deadline", 0.0, "float", "simulated seconds a round may "
           "last (0: none)", dict(low=0)),
          ("deadline_mode", "partial", "str", "late devices do fewer local "
           "steps (partial) or are dropped", dict(choices=DEADLINE_MODES)),
          ("overcommit", 1.0, "float", "sample ceil(overcommit x M) devices, "
           "aggregate the first M to finish", dict(low=1)),
          ("device_trace", None, "str", "FedScale client_device_capacity "
           "file: per-device compute and bandwidth",
           dict(check=_path("the path of a trace file (pickle or JSON)"))),
          ("behave_trace", None, "str", "FedScale client_behave_trace file: "
           "online iff the trace says so",
           dict(check=_path("the path of a trace file (pickle or JSON)"))),
          ("availability", None, "str", "who is online: uniform, "
           "device_class or trace (None: trace with behave_trace, else "
           "uniform)", dict(choices=AVAILABILITY))) +
    _keys("model",
          ("model", "mlp", "str", "the model: " + ", ".join(MODELS) +
           ", or module:attr for your own", dict(check=_model)),
          ("hidden", None, "ints", "mlp hidden widths; lstm layer sizes "
           "(None: the model's own, (128,) for mlp, (256, 256) for lstm)",
           dict(low=1)),
          ("cnn_channels", (32, 64), "ints", "cnn conv channels",
           dict(low=1)),
          ("cnn_dense", 128, "int", "cnn dense width", dict(low=1)),
          ("norm", None, "str", "preresnet18, resnet18 and mobilenetv2 "
           "normalisation: static batch norm (HeteroFL's sBN), layer norm or "
           "group norm (None: the model's own, group for resnet18, else "
           "batch)",
           dict(choices=NORMS)),
          ("resnet_widths", (64, 128, 256, 512), "ints",
           "preresnet18 and resnet18 stage widths", dict(low=1)),
          ("norm_groups", 4, "int", "channel groups of norm=group",
           dict(low=1)),
          ("embed_dim", None, "int", "transformer embedding (residual "
           "stream) width; lstm token embedding (None: the model's own, "
           "256 for transformer, 8 for lstm)", dict(low=1)),
          ("num_heads", 8, "int", "transformer attention heads (head_dim "
           "= embed_dim / num_heads)", dict(low=1)),
          ("mlp_dim", 512, "int", "transformer MLP hidden units",
           dict(low=1)),
          ("num_layers", 4, "int", "transformer blocks", dict(low=1)),
          ("patch", 0, "int", "transformer on images: patch x patch "
           "patches as tokens (0: each row is a token)", dict(low=0)),
          ("dropout", None, "float", "train-time dropout rate (None: the "
           "model's own)", dict(low=0, high=1, high_open=True)),
          ("conv_impl", "auto", "str", "convolutions as im2col matmuls, "
           "lax.conv (xla) or auto (im2col on CPU)",
           dict(choices=CONV_IMPLS)),
          ("pretrain", None, "str", "source (pretrain on the source "
           "task), none (from scratch) or a checkpoint path (None: source, "
           "but none for natural data with source=none)",
           dict(check=_pretrain)),
          ("pretrain_steps", 600, "int", "pretraining SGD steps",
           dict(low=0)),
          ("pretrain_batch_size", 64, "int", "pretraining batch size",
           dict(low=1)),
          ("pretrain_lr", 0.05, "float", "pretraining learning rate",
           _POSITIVE),
          ("pretrain_reinit", (), "strs", "regexes of params set back to "
           "their fresh init after pretraining on the source (e.g. head/.* "
           "when the source's labels name other classes: cifar10 before "
           "cifar100)", dict(empty="none", check=weights.regex_problem)),
          ("init_weights", None, "str", "params file loaded over the "
           f"model's fresh init, before any pretraining: {weights.FORMATS} "
           "(None: off)", dict(check=weights.path_problem)),
          ("weights_load", ".*", "str", "init_weights: regex of the params "
           "taken from the file (whole names, layer/param)",
           dict(check=weights.regex_problem)),
          ("weights_dont_load", (), "strs", "init_weights: regexes of params "
           "left at their fresh init (e.g. head/.* for a new head)",
           dict(empty="none", check=weights.regex_problem)),
          ("weights_map", (), "strs", "init_weights: regex=replacement "
           "renamings of the file's names, in order",
           dict(empty="none", check=weights.mapping_problem)),
          ("weights_freeze", (), "strs", "regexes of params no client trains "
           "(a frozen backbone)",
           dict(empty="none", check=weights.regex_problem))) +
    _keys("policy",
          ("policy", "heterofl", "str", "the migration policy",
           dict(choices=policies.names)),
          ("heterofl_mode", "fix", "str", "heterofl, importance, distill: a "
           "device keeps its level (fix) or it is redrawn each round "
           "(dynamic)",
           dict(choices=policies.HETEROFL_MODES)),
          ("scaler", False, "bool", "HeteroFL's scaler: hidden activations "
           "divided by the width while training"),
          ("masked_ce", None, "bool", "softmax over a client's own labels "
           "(None: the policy's default, on for HeteroFL's family)"),
          ("masked_ce_head", "label_holders", "str", "masked_ce: the output "
           "layer's entries of label c averaged over the clients holding c "
           "(label_holders, HeteroFL's) or every client (layer_holders)",
           dict(choices=HEAD_RULES)),
          ("fjord_distill", False, "bool", "fjord: the largest sub-model "
           "teaches the width drawn for each step"),
          ("lora_rank", 16, "int", "hetlora, flexlora: adapter rank r_max (a "
           "device of width p gets ceil(p r_max))", dict(low=1)),
          ("lora_prune_ratio", 0.0, "float", "hetlora: share of its rank a "
           "client keeps when it self-prunes (0: off)",
           dict(low=0, high=1, high_open=True)),
          ("lora_prune_threshold", 0.1, "float", "hetlora: the tail's "
           "relative norm below which it is pruned", _FRACTION),
          ("lora_aggregation", "padded", "str", "hetlora: zero-padded, "
           "norm-weighted merge (padded) or per-component holders",
           dict(choices=policies.LORA_AGGREGATIONS)),
          ("lora_weighting", "norm", "str", "hetlora: a client's merge "
           "weight, ||B A||_F over the cohort (norm, the paper's) or times "
           "its example count (norm_x_examples)",
           dict(choices=policies.LORA_WEIGHTINGS)),
          ("distill_steps", 300, "int", "distill: server distillation steps",
           dict(low=0)),
          ("distill_temperature", 4.0, "float", "distill: softmax "
           "temperature", _POSITIVE),
          ("distill_lr", 0.05, "float", "distill: learning rate", _POSITIVE),
          ("distill_batch_size", 64, "int", "distill: batch size",
           dict(low=1)),
          ("distill_labels", True, "bool", "distill: also fit the source "
           "labels"),
          ("exit_kd_weight", 1.0, "float", "depthfl: weight of the "
           "distillation between a client's exits", dict(low=0)),
          ("exit_kd_rampup", 300, "int", "depthfl: rounds over which that "
           "weight ramps up, exp(-5 (1 - r/R)^2) (0: constant)",
           dict(low=0)),
          ("fiarse_scope", "global", "str", "fiarse: the top-p magnitude "
           "threshold over the whole model (global, the authors') or each "
           "layer (layer)", dict(choices=policies.FIARSE_SCOPES)),
          ("gsd_gamma", 0.9, "float", "fedecover: the global step-size "
           "decay's factor per interval (1: no decay)",
           dict(low=0, high=1, low_open=True)),
          ("gsd_every", 10, "int", "fedecover: rounds between step-size "
           "decays (T_di)", dict(low=1)),
          ("gsd_until", 200, "int", "fedecover: the round after which the "
           "step size stays (T_ds)", dict(low=0)),
          ("scalefl_widths", (0.7, 0.7, 0.75, 1.0), "floats", "scalefl: "
           "the width of each of L levels; a device of capacity p is at "
           "level ceil(p L) (the authors' vertical_scale_ratios)", _FRACTION),
          ("scalefl_kd_gamma", 0.05, "float", "scalefl: the authors' "
           "KD_gamma, the distillation weight from the deepest held exit "
           "(as their KLDivLoss, over the classes too; 0: off)", dict(low=0)),
          ("scalefl_kd_temperature", 3.0, "float", "scalefl: the "
           "distillation's temperature (the authors' KD_T)", _POSITIVE),
          ("scalefl_kd_start", None, "int", "scalefl: the first round index "
           "(from 0) with distillation on (None: the authors' rule, the first "
           "r > num_rounds / 4, i.e. num_rounds // 4 + 1, resolved into the "
           "run's identity: extending a run to more rounds needs the old "
           "value passed)", dict(low=0, follows="num_rounds"))) +
    _keys("client",
          ("local_steps", 5, "int", "local SGD steps per round", dict(low=1)),
          ("batch_size", 10, "int", "examples per local step", dict(low=1)),
          ("client_lr", 0.1, "float", "client learning rate", _POSITIVE),
          ("client_momentum", 0.0, "float", "client SGD momentum",
           dict(low=0, high=1, high_open=True)),
          ("weight_decay", 0.0, "float", "client weight decay", dict(low=0)),
          ("mu", None, "float", "FedProx's proximal coefficient (None: 0.01 "
           "for fedprox, else 0)", dict(low=0)),
          ("compute_dtype", "float32", "str", "local training's forward and "
           "backward dtype", dict(choices=COMPUTE_DTYPES)),
          ("unroll_local_steps", None, "bool", "unroll the local-step loop "
           "(None: on for convolutional models)")) +
    _keys("server",
          ("algorithm", "fedavg", "str", "the server optimiser recipe",
           dict(choices=ALGORITHMS)),
          ("num_rounds", 50, "int", "federated rounds", dict(low=1)),
          ("server_lr", None, "float", "server learning rate (None: 0.01 for "
           "fedadam and fedyogi, else 1)", _POSITIVE),
          ("server_eps", 1e-3, "float", "fedadam / fedyogi tau", _POSITIVE)) +
    _keys("aggregator",
          ("aggregator", "mean", "str", "how the server combines the deltas",
           dict(choices=aggregators.names)),
          ("clip_norm", 1.0, "float", "clip: bound on each update's norm",
           _POSITIVE),
          ("trim_fraction", 0.2, "float", "trimmed_mean: share dropped at "
           "each end", dict(low=0, high=0.5, high_open=True)),
          ("krum_f", None, "int", "Krum's assumed attackers (None: the "
           "expected attackers in a cohort)", dict(low=0)),
          ("krum_m", None, "int", "multi_krum's selected clients (None: "
           "M - krum_f)", dict(low=1))) +
    _keys("privacy",
          ("dp", False, "bool", "DP-FedAvg: Poisson sampling, clipping, "
           "Gaussian noise"),
          ("dp_noise_multiplier", 1.0, "float", "noise std / clip norm",
           dict(low=0)),
          ("dp_clip_norm", 1.0, "float", "each update's clip norm (the "
           "start, with adaptive clipping)", _POSITIVE),
          ("dp_adaptive_clip", False, "bool", "the clip norm follows a "
           "quantile of the update norms"),
          ("dp_target_quantile", 0.5, "float", "adaptive clipping's "
           "quantile", dict(low=0, high=1, low_open=True, high_open=True)),
          ("dp_clip_lr", 0.2, "float", "adaptive clipping's learning rate",
           _POSITIVE),
          ("dp_count_noise", None, "float", "adaptive clipping's count noise "
           "(None: max(M / 20, dp_noise_multiplier))", _POSITIVE),
          ("dp_delta", None, "float", "delta of the reported epsilon (None: "
           "min(1e-5, 1 / num_clients))",
           dict(low=0, high=1, low_open=True, high_open=True)),
          ("dp_accountant", "rdp", "str", "dp-accounting's accountant",
           dict(choices=ACCOUNTANTS)),
          ("dp_denominator", "expected", "str", "the noised sum over each "
           "entry's expected holders (expected, McMahan et al.'s fixed "
           "denominator) or realised ones (not covered by the accountant)",
           dict(choices=DENOMINATORS))) +
    _keys("faults",
          ("attack", "none", "str", "what malicious devices do",
           dict(choices=ATTACKS)),
          ("attack_fraction", 0.2, "float", "share of malicious devices",
           dict(low=0, high=1)),
          ("attack_scale", 10.0, "float", "sign_flip / scale factor",
           _POSITIVE)) +
    _keys("run",
          ("seed", 0, "int", "the experiment seed; every draw derives from it",
           dict(low=0, check=_seed)),
          ("chunk_size", 0, "int", "clients vmapped together (0: automatic)",
           dict(low=0)),
          ("rounds_per_call", 1, "int", "rounds run as one compiled call "
           "between evaluations", dict(low=1)),
          ("data_placement", "auto", "str", "client data on the device, in "
           "host memory, or auto", dict(choices=DATA_PLACEMENTS)),
          ("memory_check", True, "bool", "refuse up front a plan whose "
           "estimated memory (client data, model, a round's chunk) exceeds "
           "this machine's (False: try anyway)"),
          ("num_devices", 0, "int", "devices of the clients mesh (0: all, 1: "
           "no mesh)", dict(low=0)),
          ("tier_fast_path", None, "bool", "run each tier at its sub-model's "
           "real shape (None: automatic)"),
          ("eval_every", 5, "int", "rounds between evaluations", dict(low=1)),
          ("target_accuracy", None, "float", "a global accuracy to reach: "
           "its rounds, time and bytes are reported (None: off)",
           _FRACTION),
          ("checkpoint_every", 10, "int", "rounds between checkpoints",
           dict(low=1)),
          ("keep_checkpoints", 2, "int", "checkpoints kept", dict(low=1)),
          ("writers", writers.DEFAULT, "str", "where the metrics go, comma-"
           f"separated: {', '.join(writers.NAMES)} (jsonl always; "
           "docs/configs.md)", dict(check=writers.check)),
          ("compare_policies", ("heterofl", "importance", "distill", "fjord",
                                "fedrolex", "fed_dropout", "partial_finetune",
                                "hetlora", "uniform_smallest",
                                "uniform_full_only"), "strs",
           "the policies `fedjax-tl compare` runs side by side",
           dict(choices=policies.names, distinct=True))) +
    _keys("sweep",
          ("sweep_seeds", (0, 1, 2, 3), "ints", "seeds of the federated "
           "randomness, one run each", dict(low=0, high=2**31,
                                             high_open=True, distinct=True,
                                             empty="the config's seed")),
          ("sweep_client_lr", (), "floats", "client learning rates swept",
           dict(distinct=True, empty="not swept", **_POSITIVE)),
          ("sweep_server_lr", (), "floats", "server learning rates swept",
           dict(distinct=True, empty="not swept", **_POSITIVE)),
          ("sweep_mu", (), "floats", "FedProx mu values swept",
           dict(low=0, distinct=True, empty="not swept")),
          ("sweep_alpha", (), "floats", "partition alphas swept, one after "
           "another", dict(distinct=True, empty="not swept", **_POSITIVE)),
          ("sweep_policy", (), "strs", "policies swept, one after another",
           dict(choices=policies.names, distinct=True, empty="not swept")),
          ("sweep_batch", 0, "int", "runs vmapped per program (0: all)",
           dict(low=0))))

BY_NAME: dict[str, Key] = {key.name: key for key in KEYS}
