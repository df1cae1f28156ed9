"""Experiment configuration: the default `ConfigDict`, overrides, validation.

Configs are `ml_collections.ConfigDict`s (the flax / big_vision convention);
`configs/*.py` (shipped as `fedjax_tl.configs`) build on
:func:`default_config`. Every key is declared once in
`experiment/keys.py`; the defaults, the frozen :class:`ExperimentConfig` and
each key's own check derive from that table, and the rules between keys are
written in one place (:func:`_relations`). A bad key or value raises
:class:`~fedjax_tl.errors.ConfigError` naming both.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import math
import pathlib
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

from fedjax_tl import aggregators, policies
from fedjax_tl.cost import overcommit_size
from fedjax_tl.device_catalog import class_for_width
from fedjax_tl.errors import ConfigError
from fedjax_tl.experiment.keys import (BY_NAME, KEYS, NATURAL_DATASETS,
                                       SECTIONS, Key)
from fedjax_tl.overrides import apply_overrides  # re-exported

# The built-in models that read token ids (next-character prediction).
TEXT_MODELS = ("lstm", "transformer")

# HeteroFL's capacity levels: width of each (`capacity_mix`).
CAPACITY_LEVELS = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}


def default_config() -> ml_collections.ConfigDict:
  """The default offline experiment: pretrained digits onto 1,000 devices."""
  c = ml_collections.ConfigDict()
  for key in KEYS:
    c[key.name] = (config_dict.placeholder(key.python_type)
                   if key.default is None else key.default)
  return c


def _tier_names(self) -> tuple[str, ...]:
  """Tier names from their width fractions, e.g. ('1', '0.5', '0.25')."""
  return tuple(f"{f:g}" for f in self.tier_fractions)


def _to_dict(self) -> dict[str, Any]:
  """The values as JSON-ready Python (tuples as lists)."""
  return {k: (list(v) if isinstance(v, tuple) else v)
          for k, v in dataclasses.asdict(self).items()}


def _annotation(key: Key) -> Any:
  element = {"ints": int, "floats": float, "strs": str}.get(key.kind)
  kind = tuple[element, ...] if element else key.python_type
  return kind | None if key.default is None else kind


ExperimentConfig = dataclasses.make_dataclass(
    "ExperimentConfig", [(key.name, _annotation(key)) for key in KEYS],
    frozen=True, namespace={"tier_names": property(_tier_names),
                            "to_dict": _to_dict})
ExperimentConfig.__module__ = __name__
ExperimentConfig.__doc__ = ("A validated, immutable experiment configuration: "
                            "one field per key of experiment/keys.py.")


def describe_keys(config: ml_collections.ConfigDict | None = None,
                  sections: Sequence[str] = SECTIONS) -> str:
  """Every key of `sections` by section, with its value in `config` (the
  default if None, and the default beside a value that differs) and its help
  (`fedjax-tl config`)."""
  lines = []
  for section in sections:
    lines.append(f"[{section}]")
    for key in (k for k in KEYS if k.section == section):
      value = key.default if config is None else config.get(key.name)
      if isinstance(value, list):
        value = tuple(value)
      changed = "" if value == key.default else f"  (default {key.default!r})"
      lines.append(f"  {key.name} = {value!r}{changed}")
      lines.append(f"      {key.help}")
  return "\n".join(lines)


def _config_file(spec: str, path: str) -> pathlib.Path:
  """The file `path` names: itself if it exists, else a shipped config's
  (a bare name such as 'compare_migration', no directory or suffix)."""
  file = pathlib.Path(path)
  if file.is_file():
    return file
  if file.name != path or file.suffix:
    raise ConfigError(f"--config={spec!r}: no such config file {path!r}")
  # The shipped configs/: a subpackage installed, the checkout's configs/
  # otherwise (fedjax_tl/__init__.py); it imports nothing of the package.
  configs = importlib.import_module("fedjax_tl.configs")
  shipped = configs.path(path)
  if shipped is None:
    raise ConfigError(f"--config={spec!r}: no config file or shipped config "
                      f"{path!r}; shipped configs: "
                      f"{', '.join(configs.names())}")
  return shipped


def load_config(spec: str | None) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` or a shipped config by its name,
  `NAME[:arg]` (its `get_config([arg])`); the default if None."""
  if spec is None:
    return default_config()
  path, _, arg = spec.partition(":")
  file = _config_file(spec, path)
  module_spec = importlib.util.spec_from_file_location(
      f"fedjax_tl_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SystemExit as e:  # sys.exit() in a config file ends nothing here
    raise ConfigError(f"--config={spec!r}: cannot load: the file called "
                      f"sys.exit({e.code!r})") from None
  except Exception as e:  # A broken config file is a user error.
    raise ConfigError(f"--config={spec!r}: cannot load: {e}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config={spec!r}: the file defines no get_config()")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except SystemExit as e:
    raise ConfigError(f"--config={spec!r}: get_config() called "
                      f"sys.exit({e.code!r})") from None
  except Exception as e:  # The user's code; its failure is theirs to fix.
    raise ConfigError(f"--config={spec!r}: get_config() raised "
                      f"{type(e).__name__}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"--config={spec!r}: get_config() returned a "
                      f"{type(config).__name__}, not a ConfigDict")
  return config


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


# -- each key's own check, from its declaration ------------------------------

def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
  if not isinstance(x, (int, float)) or isinstance(x, bool):
    return False
  try:
    return math.isfinite(x)
  except OverflowError:  # an int beyond float range
    return False


def _bounds(key: Key) -> str:
  """The key's range in words: '>= 1', '> 0' or 'in (0, 1]'."""
  low, high = (None if x is None else x if isinstance(x, int) else f"{x:g}"
               for x in (key.low, key.high))
  if low is not None and high is not None:
    return (f"in {'(' if key.low_open else '['}{low}, {high}"
            f"{')' if key.high_open else ']'}")
  if low is not None:
    return f"{'>' if key.low_open else '>='} {low}"
  return f"{'<' if key.high_open else '<='} {high}"


def _in_bounds(key: Key, x: float) -> bool:
  low_ok = key.low is None or (x > key.low if key.low_open else x >= key.low)
  high_ok = key.high is None or (x < key.high if key.high_open else
                                 x <= key.high)
  return low_ok and high_ok


def _element_ok(key: Key, x: Any) -> bool:
  kind = key.kind.rstrip("s")  # "ints" -> "int"
  if kind == "str":
    return isinstance(x, str) and (key.allowed is None or x in key.allowed)
  ok = _is_int(x) if kind == "int" else _is_number(x)
  return ok and _in_bounds(key, x)


def _check_tuple(key: Key, value: Any) -> tuple:
  element = {"ints": "integers", "floats": "numbers", "strs": "names"}[
      key.kind]
  if key.kind == "strs" and key.allowed is not None:
    element += f" among {', '.join(key.allowed)}"
  elif key.low is not None or key.high is not None:
    element += f" {_bounds(key)}"
  requirement = (f"must be a {'' if key.empty else 'non-empty '}tuple of "
                 f"{'distinct ' if key.distinct else ''}{element}" +
                 (f" (empty: {key.empty})" if key.empty else ""))
  ok = (isinstance(value, (tuple, list)) and (key.empty or len(value) > 0) and
        all(_element_ok(key, x) for x in value))
  ok = ok and not (key.distinct and len(set(value)) < len(value))
  _check(ok, key.name, value, requirement)
  return tuple(float(x) for x in value) if key.kind == "floats" else tuple(
      value)


def _check_key(key: Key, value: Any) -> Any:
  """`value` checked against its declaration (None passes for optional
  keys), as its type (floats as float, tuples as tuple)."""
  if value is None and key.default is None:
    return None
  if key.kind in ("ints", "floats", "strs"):
    value = _check_tuple(key, value)
  elif key.kind == "bool":
    _check(isinstance(value, bool), key.name, value, "must be True or False")
  elif key.kind == "int":
    _check(_is_int(value), key.name, value, "must be an integer")
  elif key.kind == "float":
    _check(_is_number(value), key.name, value, "must be a finite number")
    value = float(value)
  if key.allowed is not None and key.kind == "str":
    _check(value in key.allowed, key.name, value,
           f"must be one of {', '.join(key.allowed)}")
  elif key.kind in ("int", "float") and (key.low is not None or
                                         key.high is not None):
    _check(_in_bounds(key, value), key.name, value, f"must be {_bounds(key)}")
  if key.check is not None:
    requirement = key.check(value)
    _check(requirement is None, key.name, value, requirement)
  return value


# -- validation ---------------------------------------------------------------

def validate(config: ml_collections.ConfigDict) -> ExperimentConfig:
  """Checks every key of a ConfigDict into a frozen ExperimentConfig."""
  raw = config.to_dict()
  for key in raw:
    if key not in BY_NAME:
      close = difflib.get_close_matches(key, list(BY_NAME), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"config.{key}: unknown key{hint}")
  for key in BY_NAME:
    if key not in raw:
      raise ConfigError(f"config.{key}: missing key")
  v = dict(raw)
  if v["capacity_mix"] is not None:  # it sets the tiers it is checked against
    for name in ("tier_fractions", "tier_proportions"):
      _check(isinstance(v[name], (tuple, list)) and
             tuple(v[name]) == BY_NAME[name].default, "capacity_mix",
             v["capacity_mix"], f"sets the tiers, so config.{name}="
             f"{v[name]!r} must be left at its default; set only one")
    v["tier_fractions"], v["tier_proportions"] = parse_capacity_mix(
        v["capacity_mix"])
  for key in KEYS:
    v[key.name] = _check_key(key, v[key.name])
  _relations(v)
  return ExperimentConfig(**v)


def _model_sizes(v: dict[str, Any]) -> None:
  """`hidden` and `embed_dim` left None: the model's own sizes (the lstm's
  are fedjax's Shakespeare model's)."""
  lstm = v["model"] == "lstm"
  if v["hidden"] is None:
    v["hidden"] = (256, 256) if lstm else (128,)
  if v["embed_dim"] is None:
    v["embed_dim"] = 8 if lstm else 256


def _relations(v: dict[str, Any]) -> None:
  """The rules between keys, in place: defaults derived from other keys
  (a key left None), and combinations that cannot run."""
  _data_relations(v)
  algorithm = v["algorithm"]
  if v["server_lr"] is None:
    v["server_lr"] = 0.01 if algorithm in ("fedadam", "fedyogi") else 1.0
  if v["mu"] is None:
    v["mu"] = 0.01 if algorithm == "fedprox" else 0.0
  _check(len(v["resnet_widths"]) == 4, "resnet_widths", v["resnet_widths"],
         "must give the widths of the 4 stages")
  _check(v["max_examples"] >= v["min_examples"], "max_examples",
         v["max_examples"], f"must be >= min_examples ({v['min_examples']})")
  cohort = v["clients_per_round"]
  _check(cohort <= v["num_clients"], "clients_per_round", cohort,
         f"must be <= num_clients ({v['num_clients']})")
  _tiers(v)
  sampled = overcommit_size(cohort, v["overcommit"])
  _check(sampled <= v["num_clients"], "overcommit", v["overcommit"],
         f"samples {sampled} devices a round, more than num_clients "
         f"({v['num_clients']})")
  if v["availability"] is None:
    v["availability"] = "uniform" if v["behave_trace"] is None else "trace"
  _check(v["availability"] != "trace" or v["behave_trace"] is not None,
         "availability", v["availability"],
         "needs behave_trace (a client_behave_trace file)")
  _check(v["availability"] == "trace" or v["behave_trace"] is None,
         "availability", v["availability"],
         "must be 'trace' when behave_trace is set")
  if v["unroll_local_steps"] is None:
    v["unroll_local_steps"] = v["model"] in ("cnn", "simple_cnn")
  _model_sizes(v)
  _weights_relations(v)
  _policy_relations(v)
  _aggregator_relations(v)
  _privacy_relations(v)
  _check(not v["sweep_alpha"] or v["data"] == "digits" or
         v["partition"] != "iid", "sweep_alpha", v["sweep_alpha"],
         "needs a partition that uses alpha (partition=dirichlet or "
         "quantity, not iid)")


def _data_relations(v: dict[str, Any]) -> None:
  """Natural data's keys; `num_clients` and `pretrain` when left None."""
  _check(v["data"] != "stackoverflow", "data", v["data"],
         "is read (fedjax_tl.data.natural.read_client_texts) but its task "
         "is not built yet; natural data sets: femnist, cifar100, "
         "shakespeare")
  _check(v["model"] != "lstm" or v["data"] == "shakespeare", "model",
         v["model"], f"reads token ids, not data={v['data']!r}'s images "
         "(data=shakespeare)")
  natural = v["data"] in NATURAL_DATASETS
  if not natural:
    for name in ("data_path", "data_format", "max_client_examples",
                 "source"):
      _check(v[name] == BY_NAME[name].default, name, v[name],
             f"is for natural data ({', '.join(NATURAL_DATASETS)}), not "
             f"data={v['data']!r}")
    v["num_clients"] = 1000 if v["num_clients"] is None else v["num_clients"]
    v["pretrain"] = v["pretrain"] or "source"
    return
  _check(v["data_path"] is not None, "data", v["data"],
         "needs config.data_path (the train file or its directory)")
  if v["data"] == "shakespeare":
    _check(v["source"] == "none", "source", v["source"],
           "is an image task; shakespeare has no source task (pretrain=none, "
           "or a checkpoint path)")
    _check(v["model"] in TEXT_MODELS or ":" in v["model"], "model",
           v["model"], "cannot read text: shakespeare needs a sequence "
           f"model ({', '.join(TEXT_MODELS)}, or your own)")
    _check(v["attack"] != "label_flip", "attack", v["attack"],
           "flips class labels; a text task's targets are characters and "
           "markers (sign_flip or scale attack text models)")
  if v["num_clients"] is None:
    from fedjax_tl.data.natural import count_clients  # reads the file
    v["num_clients"] = count_clients(v["data"], v["data_path"],
                                     v["data_format"])
  if v["pretrain"] is None:
    v["pretrain"] = "none" if v["source"] == "none" else "source"
  _check(v["pretrain"] != "source" or v["source"] != "none", "pretrain",
         v["pretrain"], f"needs a source task for data={v['data']!r}: set "
         "config.source (a tfds name or .npz), or pretrain=none")
  _check(policies.make(v["policy"]).prepare is None or v["source"] != "none",
         "policy", v["policy"], "prepares on the server's source data: set "
         "config.source (a tfds name or .npz)")


def _tiers(v: dict[str, Any]) -> None:
  fractions, props = v["tier_fractions"], v["tier_proportions"]
  _check(len(props) == len(fractions), "tier_proportions", props,
         f"must have one entry per tier ({len(fractions)})")
  _check(all(p >= 0 for p in props) and abs(sum(props) - 1) < 1e-6,
         "tier_proportions", props, "must be >= 0 and sum to 1")
  if v["device_classes"] is None:
    v["device_classes"] = tuple(class_for_width(f) for f in fractions)
  classes = v["device_classes"]
  _check(len(classes) == len(fractions), "device_classes", classes,
         f"must name one device class per tier ({len(fractions)})")


def _weights_relations(v: dict[str, Any]) -> None:
  _check(not v["pretrain_reinit"] or v["pretrain"] == "source",
         "pretrain_reinit", v["pretrain_reinit"], "resets params after "
         f"pretraining on the source, but pretrain={v['pretrain']!r}")
  if v["init_weights"] is None:
    for name in ("weights_load", "weights_dont_load", "weights_map"):
      _check(v[name] == BY_NAME[name].default, name, v[name],
             "needs init_weights (the file to load from)")
  else:
    _check(v["pretrain"] in ("source", "none"), "init_weights",
           v["init_weights"], f"replaces the fresh init, which pretrain="
           f"{v['pretrain']!r} (a checkpoint) replaces whole; set only one "
           "(pretrain=none or source)")


def _policy_relations(v: dict[str, Any]) -> None:
  policy = policies.make(v["policy"])
  # The policy's defaults for keys left None, those derived from other keys
  # included (ScaleFL's distillation start from num_rounds): the resolved
  # value, not the rule, is in the config and the run's identity.
  for key, _ in policy.defaults:
    if v[key] is None:
      v[key] = policy.default(key, config=v)
  if v["masked_ce"] is None:  # off outside HeteroFL's family
    v["masked_ce"] = False
  stepped = policies.names_where(lambda p: p.step_masks is not None)
  _check(not v["fjord_distill"] or policy.step_masks is not None,
         "fjord_distill", v["fjord_distill"],
         f"needs policy={' or '.join(stepped)} (policy={v['policy']!r})")
  family = policies.names_where(lambda p: p.family == "heterofl")
  # Only HeteroFL's family redraws levels; elsewhere the key did nothing.
  _check(v["heterofl_mode"] == "fix" or policy.family == "heterofl",
         "heterofl_mode", v["heterofl_mode"],
         f"redraws HeteroFL's levels each round, which only policy="
         f"{' or '.join(family)} implement (policy={v['policy']!r})")
  _check(not (v["masked_ce"] and policy.exit_terms), "masked_ce",
         v["masked_ce"], f"is HeteroFL's; policy={v['policy']!r} trains "
         f"early exits over every label")
  for key, readers in policies.owned_keys().items():
    # A policy's own keys did nothing under another policy.
    _check(v[key] == BY_NAME[key].default or key in policy.keys, key,
           v[key], f"is read by policy={' or '.join(readers)} only "
           f"(policy={v['policy']!r})")
  if v["algorithm"] == "heterofl":
    _check(policy.family == "heterofl", "policy", v["policy"],
           f"must be one of {', '.join(family)} when algorithm=heterofl")
  if v["tier_fast_path"]:
    first_k = policies.names_where(lambda p: p.fixed_widths is not None)
    _check(policy.fixed_widths is not None, "tier_fast_path",
           v["tier_fast_path"], f"needs a first-k width policy (one of "
           f"{', '.join(first_k)}), not policy={v['policy']!r}")


def policy_variant(config: ml_collections.ConfigDict, name: str
                   ) -> ml_collections.ConfigDict:
  """`config` for policy `name` (compare, sweep): the other policies' own
  keys (`Policy.keys`), which `name` does not read, back at their
  defaults."""
  variant = ml_collections.ConfigDict(config)
  variant.policy = name
  own = policies.make(name).keys if name in policies.names() else ()
  for key in policies.owned_keys():
    if key not in own and key in variant:
      variant[key] = BY_NAME[key].default
  return variant


def unread_keys(config: ml_collections.ConfigDict,
                names: Sequence[str]) -> None:
  """Refuses a policy's own key set in `config` when none of the policies
  `names` (a compare's or sweep's) reads it."""
  for key, readers in policies.owned_keys().items():
    value = config[key] if key in config else None
    if isinstance(value, list):
      value = tuple(value)
    if value is not None and value != BY_NAME[key].default:
      _check(any(name in readers for name in names), key, config[key],
             f"is read by policy={' or '.join(readers)}, which "
             f"{', '.join(names)} do not include")


def _aggregator_relations(v: dict[str, Any]) -> None:
  cohort = v["clients_per_round"]
  _check(not (v["tier_fast_path"] and
              aggregators.make(v["aggregator"]).stacked),
         "tier_fast_path", v["tier_fast_path"],
         f"must not be True with aggregator={v['aggregator']!r}: it stacks "
         "the cohort's deltas on the masked path (leave tier_fast_path "
         "unset)")
  if v["krum_f"] is None:
    v["krum_f"] = (int(round(v["attack_fraction"] * cohort))
                   if v["attack"] != "none" else 0)
  least = aggregators.get(v["aggregator"], krum_f=v["krum_f"]).min_cohort
  _check(cohort >= least, "krum_f", v["krum_f"],
         f"aggregator={v['aggregator']!r} needs clients_per_round ({cohort}) "
         f">= {least} (Krum: 2 x krum_f + 3)")
  if v["krum_m"] is None:
    v["krum_m"] = max(cohort - v["krum_f"], 1)
  _check(v["krum_m"] <= cohort, "krum_m", v["krum_m"],
         f"must be <= clients_per_round ({cohort})")


def _privacy_relations(v: dict[str, Any]) -> None:
  if v["dp_count_noise"] is None:  # Andrew et al.'s m / 20, and > z / 2
    v["dp_count_noise"] = max(v["clients_per_round"] / 20.0,
                              v["dp_noise_multiplier"])
  if v["dp_delta"] is None:
    v["dp_delta"] = min(1e-5, 1.0 / v["num_clients"])
  if not v["dp"]:
    return
  # The accountant is an extra (the light install leaves it out): said here,
  # before any data is built, not at the first evaluation.
  _check(importlib.util.find_spec("dp_accounting") is not None, "dp",
         v["dp"], "needs dp-accounting for the privacy accounting: "
         'pip install "fedjax-tl[dp]"')
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
         "cannot run with dp=True: an adapter policy's merge weighs its "
         "uploads by its own rule (HetLoRA's update norms, FlexLoRA's "
         "products in the kernel's slot), which DP's equal weights and "
         "expected holders exclude")
  _check(v["overcommit"] == 1.0, "overcommit", v["overcommit"],
         "must be 1 with dp=True (devices are Poisson-sampled)")
