"""Experiment configuration: the default `ConfigDict`, overrides, validation.

Configs are `ml_collections.ConfigDict`s (the flax / big_vision convention);
`configs/*.py` (shipped as `fedjax_tl.configs`) build on
:func:`default_config`. Every key is declared once in
`experiment/keys.py`; the defaults, the frozen :class:`ExperimentConfig` and
each key's own check derive from that table, and the rules between keys are
written in one place (experiment/relations.py). A bad key or value raises
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

from fedjax_tl.errors import ConfigError, check_config as _check
from fedjax_tl.experiment.keys import BY_NAME, KEYS, SECTIONS, Key
from fedjax_tl.experiment.relations import relations
from fedjax_tl.overrides import apply_overrides  # re-exported

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
  relations(v)
  return ExperimentConfig(**v)
