"""Pretrained weights in and out: a params file read by name, loaded into a
model under big_vision-style `load` / `dont_load` regexes and a renaming,
and the `freeze` regexes that say what no client trains.

A params file is an `.npz` (:func:`save_npz` writes one), a `.safetensors`
file or an orbax checkpoint directory: `checkpoint.save_params`'s (a run's
`pretrained`) or a round checkpoint (`checkpoints/<round>`). A parameter is
named `layer/param`, as in `ModelDef.init_params` (`blocks/0/up/kernel` for
a nested layer); a stored name without a `/` has its dots read as `/`
(`dense_0.kernel`). Every regex must match a whole name (`re.fullmatch`).
A mapping rule `regex=replacement` (split at its last `=`) renames the
file's names with `re.sub`, the rules applied in order, before they are
matched against the model's.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from fedjax_tl import files
from fedjax_tl.errors import ConfigError, DataError, UserError

Params = Any  # `{layer: {param: array}}`, as ModelDef.init_params

FORMATS = "an .npz, a .safetensors file or an orbax checkpoint directory"
# The names an error message lists before it says how many more there are.
_SHOWN = 6


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """`{"layer/param": array}` of a params tree (nested dicts, any depth)."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{name}/"))
    else:
      flat[name] = value
  return flat


def path_problem(value: Any) -> str | None:
  """What `value` must be to name a params file (None when it does)."""
  if not isinstance(value, str) or not value:
    return f"must be the path of {FORMATS}"
  path = pathlib.Path(value)
  try:
    exists, is_dir = path.exists(), path.is_dir()
  except (OSError, ValueError) as e:  # a name too long, a NUL byte
    return f"is not a usable path ({e.__class__.__name__})"
  if not exists:
    return f"no such file (expected {FORMATS})"
  if not is_dir and path.suffix not in (".npz", ".safetensors"):
    return f"must be {FORMATS}"
  return None


def read_params(path: str | pathlib.Path, origin: str | None = None
                ) -> dict[str, np.ndarray]:
  """The params stored in a file, `{"layer/param": array}` in stored order.

  Raises:
    DataError: naming `origin` (the path if None): no such file, an
      unknown format, an unreadable file, a non-numeric array or two
      stored names that read as one.
  """
  path = pathlib.Path(path)
  origin = origin or repr(str(path))
  problem = path_problem(str(path))
  if problem is not None:
    raise DataError(f"{origin}: {problem}")
  try:
    if path.is_dir():
      stored = _read_orbax(path, origin)
    elif path.suffix == ".npz":
      with np.load(path, allow_pickle=False) as npz:
        stored = {name: npz[name] for name in npz.files}
    else:
      from safetensors.numpy import load_file
      stored = load_file(str(path))
  except UserError as e:  # orbax's, already in one line
    raise DataError(str(e)) from None
  except Exception as e:  # zip, numpy and safetensors raise many types
    text = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    raise DataError(f"{origin}: cannot be read as {FORMATS} ({text})"
                    ) from None
  params = {}
  for key, value in stored.items():
    value = np.asarray(value)
    name = key if "/" in key else key.replace(".", "/")
    if not np.issubdtype(value.dtype, np.number):
      raise DataError(f"{origin}: {key!r} holds {value.dtype} values, not "
                      "numbers")
    if name in params:
      raise DataError(f"{origin}: two stored names read as {name!r}")
    params[name] = value
  return params


def _read_orbax(path: pathlib.Path, origin: str) -> dict[str, Any]:
  """The params of a `checkpoint.save_params` directory, or of a round
  checkpoint (`checkpoints/<round>`, whose server state holds them)."""
  from fedjax_tl import checkpoint
  if (path / "state").is_dir():
    state = checkpoint.load_params(path / "state", origin=origin)
    if not isinstance(state, Mapping) or not isinstance(state.get("params"),
                                                        Mapping):
      raise DataError(f"{origin}: a checkpoint whose state holds no params")
    return flatten(state["params"])
  return flatten(checkpoint.load_params(path, origin=origin))


def save_npz(params: Params, path: str | pathlib.Path) -> pathlib.Path:
  """Writes params as an `.npz` of `layer/param` arrays; returns the path.

  The file is written whole or not at all (`files.replacing`: a random
  temporary name beside it, renamed into place); a full disk is one
  DiskFullError.
  """
  path = pathlib.Path(path)
  with files.replacing(path) as f:
    np.savez(f, **{name: np.asarray(value)
                   for name, value in flatten(params).items()})
  return path


# -- regexes and renaming ------------------------------------------------------

def regex_problem(patterns: str | Sequence[str]) -> str | None:
  """What is wrong with a regex or a tuple of them (None when nothing)."""
  patterns = [patterns] if isinstance(patterns, str) else patterns
  if not isinstance(patterns, (list, tuple)) or not all(
      isinstance(p, str) for p in patterns):
    return "must be a regular expression, or a tuple of them"
  for pattern in patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      return f"{pattern!r} is not a regular expression ({e})"
  return None


def parse_mapping(rules: Iterable[str]) -> list[tuple[str, str]]:
  """`regex=replacement` rules as `(regex, replacement)` pairs, each split
  at its last `=`."""
  pairs = []
  for rule in rules:
    pattern, sep, replacement = rule.rpartition("=")
    if not sep or not pattern:
      raise ValueError(f"{rule!r} is not regex=replacement")
    pairs.append((pattern, replacement))
  return pairs


def mapping_problem(rules: Sequence[str]) -> str | None:
  """What is wrong with `regex=replacement` rules (None when nothing)."""
  for rule in rules:
    try:
      ((pattern, replacement),) = parse_mapping([rule])
      re.sub(pattern, replacement, "")  # compiles the replacement too
    except (ValueError, re.error) as e:
      return (f"{rule!r}: {e}" if isinstance(e, re.error) else
              f"must be regex=replacement rules; {e}")
  return None


def _rules(mapping: Mapping[str, str] | Sequence[tuple[str, str]] | None
           ) -> list[tuple[str, str]]:
  if mapping is None:
    return []
  return list(mapping.items() if isinstance(mapping, Mapping) else mapping)


def matching(names: Iterable[str], patterns: str | Sequence[str],
             key: str) -> list[str]:
  """The names any of `patterns` matches whole, in order.

  Raises:
    ConfigError: naming `config.<key>`, for a pattern that matches none
      of `names` (most likely a typo).
  """
  names = list(names)
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  compiled = [re.compile(p) for p in patterns]
  for pattern, regex in zip(patterns, compiled):
    if not any(regex.fullmatch(name) for name in names):
      raise ConfigError(
          f"config.{key}={pattern!r}: matches no parameter of the model "
          f"({_listed(names)})")
  return [n for n in names if any(r.fullmatch(n) for r in compiled)]


def _listed(names: Sequence[str]) -> str:
  """Up to _SHOWN names, and how many more."""
  more = len(names) - _SHOWN
  return ", ".join(names[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


# -- loading -----------------------------------------------------------------

def load_into(params: Params, loaded: Mapping[str, Any], *,
              load: str | Sequence[str] = ".*",
              dont_load: Sequence[str] = (),
              mapping: Mapping[str, str] | Sequence[tuple[str, str]] |
              None = None, origin: str = "the weights file"
              ) -> tuple[Params, dict[str, list[str]]]:
  """`params` with the selected ones taken from `loaded` by name.

  A parameter of `params` whose name matches `load` and no `dont_load`
  pattern is taken from `loaded` (as `read_params` gives it), whose names
  are first renamed by `mapping` (`(regex, replacement)` pairs or a dict,
  applied in order with `re.sub`); it must be there with the same shape,
  and is cast to the parameter's dtype. The others keep their values
  (the fresh init).

  Returns:
    The new params, and a report `{"loaded": [...], "reinitialised":
    [...], "unused": [...]}`: the model's names taken from the file and
    left alone, in the model's order, and the file's names not taken.

  Raises:
    DataError: naming `origin` and the selected parameters (the first
      three in the model's order) missing from the file or whose shapes
      differ (both given), or two of the file's names renamed into one.
    ConfigError: a `load` or `dont_load` pattern that matches no parameter.
  """
  flat = flatten(params)
  source = {}  # the model's name -> the file's
  for stored in loaded:
    name = stored
    for pattern, replacement in _rules(mapping):
      name = re.sub(pattern, replacement, name)
    if name in source:
      raise DataError(f"{origin}: {source[name]!r} and {stored!r} are both "
                      f"renamed {name!r} (weights_map)")
    source[name] = stored
  wanted = set(matching(flat, load, "weights_load"))
  if dont_load:
    wanted -= set(matching(flat, dont_load, "weights_dont_load"))
  new, report = {}, {"loaded": [], "reinitialised": [], "unused": []}
  misfits = []  # each selected parameter the file does not give as it is
  for name, value in flat.items():
    if name not in wanted:
      new[name] = value
      report["reinitialised"].append(name)
      continue
    stored, shape = source.get(name), tuple(value.shape)
    array = None if stored is None else np.asarray(loaded[stored])
    if array is None:
      misfits.append(f"{name!r} {shape} is not in the file")
    elif array.shape != shape:
      as_stored = "" if stored == name else f" (stored as {stored!r})"
      misfits.append(f"{name!r}{as_stored} has shape {array.shape} in the "
                     f"file but {shape} in the model")
    else:
      new[name] = jnp.asarray(array.astype(value.dtype, copy=False))
      report["loaded"].append(name)
  if misfits:
    more = len(misfits) - 3
    names = ""
    if any(m.endswith("not in the file") for m in misfits):
      renamed = " after weights_map" if _rules(mapping) else ""
      names = (f"; the file's {len(source)} names{renamed}: "
               f"{_listed(list(source))}")
    raise DataError(
        f"{origin}: parameter {'; '.join(misfits[:3])}"
        f"{f' (and {more} more)' if more > 0 else ''}{names}; keep the "
        "model's with weights_dont_load (e.g. a new head), or rename with "
        "weights_map")
  taken = {source[name] for name in report["loaded"]}
  report["unused"] = [name for name in loaded if name not in taken]
  return unflatten(new, params), report


def reset(params: Params, fresh: Params, patterns: Sequence[str],
          key: str = "pretrain_reinit") -> tuple[Params, list[str]]:
  """`params` with those `patterns` match set back to `fresh` (the model's
  init): a new head after pretraining on another label set. Returns the
  new params and the names reset, in the model's order.

  Raises:
    ConfigError: naming `config.<key>`, for a pattern matching nothing.
  """
  flat, init = flatten(params), flatten(fresh)
  names = matching(flat, patterns, key)
  return unflatten({n: init[n] if n in names else v for n, v in flat.items()},
                   params), names


def unflatten(flat: Mapping[str, Any], like: Params) -> Params:
  """`flat` (`{"layer/param": value}`) in the two-level layout of `like`."""
  return {layer: {param: flat[f"{layer}/{param}"] for param in values}
          for layer, values in like.items()}


def load_file(params: Params, path: str | pathlib.Path, *,
              load: str | Sequence[str] = ".*",
              dont_load: Sequence[str] = (),
              mapping: Mapping[str, str] | Sequence[tuple[str, str]] |
              None = None, origin: str | None = None
              ) -> tuple[Params, dict[str, list[str]]]:
  """:func:`load_into` from the file at `path` (:func:`read_params`)."""
  origin = origin or repr(str(path))
  return load_into(params, read_params(path, origin), load=load,
                   dont_load=dont_load, mapping=mapping, origin=origin)


# -- freezing ----------------------------------------------------------------

def frozen_names(params: Params, freeze: Sequence[str]) -> tuple[str, ...]:
  """The names of the parameters `freeze` matches, in the model's order.

  Raises:
    ConfigError: a pattern that matches no parameter (`weights_freeze`).
  """
  if not freeze:
    return ()
  return tuple(matching(flatten(params), freeze, "weights_freeze"))


def freeze_mask(params: Params, freeze: Sequence[str]) -> Params:
  """A 0/1 tree shaped like `params`: 0 where `freeze` matches."""
  frozen = set(frozen_names(params, freeze))
  return {layer: {param: (jnp.zeros_like if f"{layer}/{param}" in frozen
                          else jnp.ones_like)(value)
                  for param, value in values.items()}
          for layer, values in params.items()}


def without_frozen(train: Params, frozen: Sequence[str]) -> Params:
  """A `train` mask with the `frozen` parameters (by name) zeroed."""
  if not frozen:
    return train
  return {layer: {param: (jnp.zeros_like(mask) if f"{layer}/{param}" in
                          frozen else mask)
                  for param, mask in masks.items()}
          for layer, masks in train.items()}
