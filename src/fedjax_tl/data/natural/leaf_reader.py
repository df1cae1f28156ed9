"""LEAF's JSON files (github.com/TalwalkarLab/leaf, data/<name>/data/).

Each file: `{"users": [id, ...], "num_samples": [n, ...], "user_data":
{id: {"x": [...], "y": [...]}}}`; LEAF's split puts the train files in
data/train/ and the test files in data/test/. FEMNIST's `x` is a 784-long
list of pixels in [0, 1] (paper 1, ink 0) and `y` the class (0-61);
Shakespeare's `x` an 80-character window and `y` the next character.
Clients come in the files' `users` order.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Iterator

import numpy as np

from fedjax_tl.data.natural import features
from fedjax_tl.data.natural.windows import join_windows
from fedjax_tl.errors import DataError


def _load(path: pathlib.Path) -> dict[str, Any]:
  try:
    with open(path, "rb") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} "
                    f"column {e.colno})") from None
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read ({e})") from None
  for key, kind in (("users", list), ("user_data", dict)):
    if not isinstance(data, dict) or not isinstance(data.get(key), kind):
      raise DataError(f"{path}: no {key!r} {kind.__name__}; expected LEAF's "
                      "{users, num_samples, user_data}")
  return data


class LeafReader:
  """LEAF JSON files: their users in turn."""

  def __init__(self, files: tuple[pathlib.Path, ...], kind: str):
    if kind not in ("femnist", "shakespeare"):
      raise DataError(f"{files[0]}: LEAF has no {kind} data set (only "
                      "femnist and shakespeare are read)")
    self.files, self.kind = files, kind
    self._parsed: dict[pathlib.Path, dict[str, Any]] = {}  # parsed once

  def clients(self) -> list[tuple[str, int]]:
    """`(user, examples)` of every user, in the files' order."""
    return [(user, n) for user, _, n in self._users()]

  def _users(self) -> Iterator[tuple[str, Any, int]]:
    for path in self.files:
      if path not in self._parsed:
        self._parsed[path] = _load(path)
      data = self._parsed[path]
      sizes = data.get("num_samples")
      for i, user in enumerate(data["users"]):
        record = data["user_data"].get(user)
        if not isinstance(record, dict) or not isinstance(
            record.get("y"), list):
          raise DataError(f"{path}: user {user!r} has no user_data "
                          "{x: [...], y: [...]}")
        n = len(record["y"])
        if isinstance(sizes, list) and i < len(sizes) and sizes[i] != n:
          raise DataError(f"{path}: user {user!r}: num_samples says "
                          f"{sizes[i]} but y holds {n}")
        yield str(user), (path, record), n

  def read(self, wanted: set[str] | None = None
           ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """`(user, canonical features)` of the `wanted` users (None: all)."""
    for user, (path, record), _ in self._users():
      if wanted is not None and user not in wanted:
        continue
      where = f"{path}: user {user!r}"
      yield user, self._examples(record, where)

  def _examples(self, record: dict[str, Any], where: str
                ) -> dict[str, np.ndarray]:
    xs, ys = record.get("x"), record["y"]
    if not isinstance(xs, list):
      raise DataError(f"{where}: no 'x' list")
    if self.kind == "shakespeare":
      return {"text": join_windows(xs, ys, where)}
    try:
      pixels = np.asarray(xs if xs else np.zeros((0, 784)))
      label = np.asarray(ys if ys else np.zeros(0, np.int64))
    except ValueError:
      raise DataError(f"{where}: x is not a list of equal-length pixel "
                      "lists") from None
    pixels = features.floats(pixels, (784,), f"{where} x")
    out = {"x": (1.0 - pixels).reshape(-1, 28, 28, 1),
           "y": features.labels(label, f"{where} y")}
    return features.same_length(out, where)
