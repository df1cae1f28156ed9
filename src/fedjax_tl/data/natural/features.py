"""A client's examples, as a file holds them, into the simulator's features.

Every reader turns one client's arrays into the same canonical features:
images `x` float32 `[n, H, W, C]` and `y` int32 `[n]`; Shakespeare `text`,
StackOverflow `tokens`, `tags` and `title` (object arrays of str). Anything
else in the file (a wrong dtype, shape or a missing feature) is a DataError
naming the file, the client and the feature.

Pixels: EMNIST's files (fedjax, TFF and LEAF alike) hold floats in [0, 1]
with white paper at 1 and ink at 0; like fedjax's `emnist.preprocess_batch`
they become `1 - pixels` (ink 1, paper 0, as MNIST and tfds' EMNIST have
it). CIFAR-100's uint8 pixels become `pixels / 255` in [0, 1], as the tfds
loader's.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedjax_tl.errors import DataError

# Each kind's features in fedjax's SQLite and TFF's HDF5 files (same names).
TFF_FEATURES = {"femnist": ("pixels", "label"),
                "cifar100": ("image", "label"),
                "shakespeare": ("snippets",),
                "stackoverflow": ("tokens", "tags", "title")}


def feature(features: Mapping[str, Any], name: str, where: str) -> np.ndarray:
  """`features[name]` as an array, or DataError listing what there is."""
  if name not in features:
    raise DataError(f"{where}: no feature {name!r} (has: "
                    f"{', '.join(map(str, features)) or 'none'})")
  return np.asarray(features[name])


def floats(array: np.ndarray, shape: tuple[int, ...], where: str
           ) -> np.ndarray:
  """`array` checked to be `[n, *shape]` real numbers, as float32."""
  if array.dtype == bool or not (np.issubdtype(array.dtype, np.floating) or
                                 np.issubdtype(array.dtype, np.integer)):
    raise DataError(f"{where}: dtype {array.dtype}, expected real numbers")
  if array.ndim < 1 or array.shape[1:] != shape:
    raise DataError(f"{where}: shape {array.shape}, expected [n, "
                    f"{', '.join(map(str, shape))}]")
  return array.astype(np.float32, copy=False)


def labels(array: np.ndarray, where: str) -> np.ndarray:
  """`array` checked to be `[n]` integers, as int32 (range: checks.py)."""
  if not np.issubdtype(array.dtype, np.integer):
    raise DataError(f"{where}: dtype {array.dtype}, expected integer labels")
  if array.ndim != 1:
    raise DataError(f"{where}: shape {array.shape}, expected [n] labels")
  return array.astype(np.int32)


def strings(array: np.ndarray, where: str) -> np.ndarray:
  """`[n]` bytes (UTF-8) or str as an object array of str."""
  array = np.asarray(array)
  if array.ndim != 1 or array.dtype.kind not in "OSU":
    raise DataError(f"{where}: {array.dtype} of shape {array.shape}, "
                    "expected [n] strings")
  out = np.empty(array.shape[0], dtype=object)
  for i, value in enumerate(array):
    if isinstance(value, (bytes, np.bytes_)):
      try:
        value = bytes(value).decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{where}: example {i} is not UTF-8 ({e.reason} at "
                        f"byte {e.start})") from None
    elif not isinstance(value, str):
      raise DataError(f"{where}: example {i} is a {type(value).__name__}, "
                      "expected a string")
    out[i] = str(value)
  return out


def from_tff(kind: str, features: Mapping[str, Any], where: str
             ) -> dict[str, np.ndarray]:
  """A client's fedjax / TFF features (TFF_FEATURES) as canonical ones.

  `where` names the file and client; the checks add the feature's name.
  """
  get = lambda name: feature(features, name, where)
  at = lambda name: f"{where} feature {name!r}"
  if kind == "femnist":
    pixels = floats(get("pixels"), (28, 28), at("pixels"))
    out = {"x": (1.0 - pixels)[..., None], "y": labels(get("label"),
                                                       at("label"))}
  elif kind == "cifar100":
    raw = get("image")
    image = floats(raw, (32, 32, 3), at("image"))
    if np.issubdtype(raw.dtype, np.integer):  # uint8: 0..255
      image = image * np.float32(1 / 255)
    out = {"x": image, "y": labels(get("label"), at("label"))}
  elif kind == "shakespeare":
    out = {"text": strings(get("snippets"), at("snippets"))}
  else:
    out = {name: strings(get(name), at(name))
           for name in TFF_FEATURES[kind]}
  return same_length(out, where)


def same_length(out: dict[str, np.ndarray], where: str
                ) -> dict[str, np.ndarray]:
  """`out`, once its features are checked to hold as many examples."""
  lengths = {name: len(value) for name, value in out.items()}
  if len(set(lengths.values())) > 1:
    raise DataError(f"{where}: features of different lengths "
                    f"({', '.join(f'{k} {v}' for k, v in lengths.items())})")
  return out


def size(examples: Mapping[str, np.ndarray]) -> int:
  """The examples a client's canonical features hold."""
  return len(next(iter(examples.values())))
