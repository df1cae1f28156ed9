"""`--config.KEY=VALUE` overrides on a ConfigDict: parsing and applying
them, with the nearest key suggested for a typo."""

from __future__ import annotations

import ast
import difflib
from typing import Any, Sequence

import ml_collections

from fedjax_tl.errors import ConfigError


def parse_value(text: str) -> Any:
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
        raise ConfigError(f"config.{key}: unknown key{suggest(part, node)}")
      node = node[part]
    if leaf not in node:
      raise ConfigError(f"config.{key}: unknown key{suggest(leaf, node)}")
    value = parse_value(text)
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


def suggest(name: str, node: ml_collections.ConfigDict) -> str:
  close = difflib.get_close_matches(name, list(node.keys()), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""
