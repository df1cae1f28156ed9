"""A user's own transfer data set: one `.npz` file (`config.data=PATH`) or
the same arrays in memory (`fedjax_tl.run(config, data=...)`).

The arrays (no pickles) are already split the simulator's way: the server's
source set, the clients' padded examples and a test set. A file and arrays
from Python take one path, `arrays_transfer`, so they pass the same checks;
from Python the clients may also come as a mapping of client id to that
client's `{"x": ..., "y": ...}` (`client_arrays` pads them).
"""

from __future__ import annotations

import difflib
import pathlib
from typing import Any, Mapping

import numpy as np

from fedjax_tl.data.checks import check_transfer_data
from fedjax_tl.data.federated import Dataset, FederatedData, TransferData
from fedjax_tl.errors import ConfigError, DataError

REQUIRED = ("num_classes", "source_x", "source_y", "clients_x", "clients_y",
            "clients_count", "test_x", "test_y")
# source_test_*: held-out source data (default: the test set); client_test_*:
# each client's own test examples, padded like clients_* (local accuracy).
OPTIONAL = ("source_test_x", "source_test_y", "client_test_x", "client_test_y",
            "client_test_count")
FORMAT = (
    "num_classes (scalar int), source_x [n, ...] / source_y [n], "
    "clients_x [clients, examples, ...] / clients_y [clients, examples] / "
    "clients_count [clients], test_x [m, ...] / test_y [m]")


def _read(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Every array of the file, read eagerly so any damage shows up here."""
  try:
    with np.load(path, allow_pickle=False) as archive:
      if not hasattr(archive, "files"):  # a bare .npy, not an archive
        raise DataError(f"{path}: a single array, expected an .npz archive "
                        f"of {FORMAT}")
      return {name: archive[name] for name in archive.files}
  except DataError:
    raise
  except OSError as e:
    if not path.is_file():
      raise DataError(f"{path}: no such data file") from None
    raise DataError(f"{path}: cannot read the data file ({e})") from None
  except Exception as e:  # a damaged zip or array can fail many ways
    text = str(e).strip().splitlines()
    raise DataError(f"{path}: not a readable .npz archive "
                    f"({type(e).__name__}: {text[0][:120] if text else ''})"
                    ) from None


def _real(path: str, name: str, array: np.ndarray) -> np.ndarray:
  if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or
                                 np.issubdtype(array.dtype, np.floating)):
    raise DataError(f"{path}: {name} must hold real numbers, got dtype "
                    f"{array.dtype}")
  with np.errstate(over="ignore"):  # too large for float32: Inf, reported
    return array.astype(np.float32)


def _integers(path: str, name: str, array: np.ndarray) -> np.ndarray:
  if not np.issubdtype(array.dtype, np.integer):
    raise DataError(f"{path}: {name} must hold integers, got dtype "
                    f"{array.dtype}")
  return array


def _padded(path: str, arrays: Mapping[str, np.ndarray],
            prefix: str) -> FederatedData:
  x = _real(path, f"{prefix}_x", arrays[f"{prefix}_x"])
  y = _integers(path, f"{prefix}_y", arrays[f"{prefix}_y"])
  count = _integers(path, f"{prefix}_count", arrays[f"{prefix}_count"])
  if y.shape == x.shape[:2] and count.shape == x.shape[:1] and x.ndim >= 3:
    # Padding is never read as data but enters masked sums as x * 0: zero it
    # so that a NaN there cannot leak in.
    real = np.arange(x.shape[1])[None, :] < count[:, None]
    x = np.where(real.reshape(real.shape + (1,) * (x.ndim - 2)), x, 0)
    y = np.where(real, y, 0)
  return FederatedData(x=x, y=y, count=count)


def _check_names(path: str, arrays: Mapping[str, Any]) -> None:
  """Raises DataError for an unknown or missing array, or half a group."""
  for name in arrays:
    if name not in REQUIRED + OPTIONAL:
      close = difflib.get_close_matches(name, REQUIRED + OPTIONAL, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise DataError(f"{path}: unknown array {name!r}{hint}")
  missing = [name for name in REQUIRED if name not in arrays]
  if missing:
    raise DataError(f"{path}: missing array(s) {', '.join(missing)}; an "
                    f"npz data set holds {FORMAT}")
  for group in (("source_test_x", "source_test_y"),
                ("client_test_x", "client_test_y", "client_test_count")):
    given = [name for name in group if name in arrays]
    if given and len(given) != len(group):
      raise DataError(f"{path}: {', '.join(given)} without "
                      f"{', '.join(n for n in group if n not in given)}")


def _num_classes(path: str, classes: np.ndarray) -> int:
  """The `num_classes` array as an int, or DataError unless a scalar >= 1."""
  if classes.shape != () or not np.issubdtype(classes.dtype, np.integer) or \
      not 1 <= int(classes) <= 2**31 - 1:
    raise DataError(f"{path}: num_classes must be a scalar integer >= 1, "
                    f"got {_describe(classes)}")
  return int(classes)


def load_npz_transfer(path: str | pathlib.Path,
                      num_clients: int) -> TransferData:
  """Loads and checks a transfer data set saved with `np.savez`.

  Args:
    path: the `.npz` file; arrays (see FORMAT): `num_classes`, `source_x`,
      `source_y`, `clients_x`, `clients_y`, `clients_count`, `test_x`,
      `test_y`, optionally `source_test_x/_y` and `client_test_x/_y/_count`.
      Features are real numbers (cast to float32); labels integers in
      `[0, num_classes)`; client `i` holds its first `clients_count[i]`
      rows, the rest is padding.
    num_clients: the simulated devices (`config.num_clients`); must equal
      the file's clients.

  Returns:
    TransferData named after the file; `target_test` is `test_*`.

  Raises:
    DataError: naming the file and the problem (unreadable, missing or
      unknown arrays, bad dtypes or shapes, NaN or Inf features, labels out
      of range, clients without examples, a different number of clients).
  """
  path = pathlib.Path(path)
  return arrays_transfer(_read(path), str(path), num_clients, name=path.name)


def arrays_transfer(arrays: Mapping[str, Any], path: str, num_clients: int,
                    name: str = "arrays") -> TransferData:
  """`load_npz_transfer` for arrays already in memory (`path` names them in
  errors): the same checks, the same TransferData, named `name`."""
  _check_names(path, arrays)
  arrays = {key: np.asarray(value) for key, value in arrays.items()}
  classes = _num_classes(path, arrays["num_classes"])

  def dataset(prefix: str) -> Dataset:
    return Dataset(x=_real(path, f"{prefix}_x", arrays[f"{prefix}_x"]),
                   y=_integers(path, f"{prefix}_y", arrays[f"{prefix}_y"]))

  test = dataset("test")
  data = TransferData(
      name=name, source_train=dataset("source"),
      source_test=(dataset("source_test") if "source_test_x" in arrays
                   else test),
      clients=_padded(path, arrays, "clients"), target_test=test,
      num_classes=classes,
      client_test=(_padded(path, arrays, "client_test")
                   if "client_test_x" in arrays else None))
  check_transfer_data(data, path)
  if data.clients.num_clients != num_clients:
    raise DataError(f"{path}: holds {data.clients.num_clients} clients but "
                    f"config.num_clients={num_clients}; they must match")
  return _as_int32(data)


def _describe(array: np.ndarray) -> str:
  return (f"{array.dtype} of shape {array.shape}" if array.shape
          else repr(array.item()))


def _as_int32(data: TransferData) -> TransferData:
  """Labels and counts as int32, once checked to be in range."""
  def cast(part: Any) -> Any:
    if part is None:
      return None
    if isinstance(part, FederatedData):
      return FederatedData(x=part.x, y=part.y.astype(np.int32),
                           count=part.count.astype(np.int32))
    return Dataset(x=part.x, y=part.y.astype(np.int32))
  test = cast(data.target_test)
  return TransferData(
      name=data.name, source_train=cast(data.source_train),
      source_test=(test if data.source_test is data.target_test
                   else cast(data.source_test)),
      clients=cast(data.clients), target_test=test,
      num_classes=data.num_classes, client_test=cast(data.client_test))


def client_arrays(data: Mapping[str, Any]) -> dict[str, Any]:
  """`fedjax_tl.run`'s `data=` as the `.npz` arrays (see FORMAT).

  `data` holds the `.npz` names, except that `clients` may replace
  `clients_x`/`clients_y`/`clients_count`: a mapping of client id to that
  client's `{"x": [n, ...], "y": [n]}`, padded here to the longest client
  (client `i` is the mapping's `i`-th id). `num_classes` may be left out:
  then it is the largest label + 1. Everything else is checked later by
  `arrays_transfer`, as for a file.

  Raises:
    DataError: `data` is not a mapping; `clients` beside `clients_*`;
      a client without `x` and `y` or with a different feature shape.
  """
  where = "data="
  if not isinstance(data, Mapping):
    raise DataError(f"{where}: expected a mapping of {FORMAT} (or clients="
                    f"{{id: {{'x': ..., 'y': ...}}}}), got "
                    f"{type(data).__name__}")
  arrays = dict(data)
  if "clients" in arrays:
    given = [n for n in ("clients_x", "clients_y", "clients_count")
             if n in arrays]
    if given:
      raise DataError(f"{where}: clients and {', '.join(given)} both given; "
                      "the clients come one way or the other")
    arrays.update(_pad(arrays.pop("clients"), f"{where}['clients']"))
  if "num_classes" not in arrays:
    labels = [np.asarray(arrays[n]) for n in
              ("source_y", "clients_y", "test_y", "source_test_y",
               "client_test_y") if n in arrays]
    if all(np.issubdtype(y.dtype, np.integer) for y in labels) and \
        any(y.size for y in labels):
      arrays["num_classes"] = np.int64(
          max(int(y.max()) for y in labels if y.size) + 1)
  _check_names(where, arrays)
  return arrays


def _pad(clients: Any, where: str) -> dict[str, np.ndarray]:
  """Per-client `{"x", "y"}` arrays as padded `clients_x/_y/_count`."""
  if not isinstance(clients, Mapping) or not clients:
    raise DataError(f"{where}: expected a non-empty mapping of client id to "
                    "{'x': [n, ...], 'y': [n]}")
  xs, ys = [], []
  for cid, arrays in clients.items():
    if not isinstance(arrays, Mapping) or set(arrays) != {"x", "y"}:
      raise DataError(f"{where}[{cid!r}]: expected {{'x': [n, ...], "
                      f"'y': [n]}}, got {_keys(arrays)}")
    x, y = np.asarray(arrays["x"]), np.asarray(arrays["y"])
    if x.ndim < 2 or y.shape != x.shape[:1] or \
        (xs and x.shape[1:] != xs[0].shape[1:]):
      expected = (f"x [n, *{xs[0].shape[1:]}]" if xs else "x [n, ...]")
      raise DataError(f"{where}[{cid!r}]: x of shape {x.shape} and y of "
                      f"shape {y.shape}; expected {expected} and y [n]")
    xs.append(x)
    ys.append(y)
  width = max(1, max(len(y) for y in ys))
  clients_x = np.zeros((len(xs), width, *xs[0].shape[1:]),
                       np.result_type(*xs))
  clients_y = np.zeros((len(ys), width), np.result_type(*ys))
  for i, (x, y) in enumerate(zip(xs, ys)):
    clients_x[i, :len(x)], clients_y[i, :len(y)] = x, y
  return {"clients_x": clients_x, "clients_y": clients_y,
          "clients_count": np.array([len(y) for y in ys], np.int64)}


def _keys(value: Any) -> str:
  return (f"keys {sorted(map(str, value))}" if isinstance(value, Mapping)
          else type(value).__name__)


def check_num_clients(explicit: int | None, arrays: Mapping[str, Any]
                      ) -> int:
  """The run's `num_clients`: the data's, or ConfigError if an explicit
  `config.num_clients` says otherwise."""
  count = np.asarray(arrays["clients_count"])
  if count.ndim != 1:
    raise DataError(f"data=: clients_count must be [clients], got shape "
                    f"{count.shape}")
  found = count.shape[0]
  if explicit is not None and explicit != found:
    raise ConfigError(f"config.num_clients={explicit} but data= holds "
                      f"{found} clients; leave num_clients unset (it is "
                      "taken from the data) or make them match")
  return found
