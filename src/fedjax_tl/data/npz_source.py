"""A user's own transfer data set from one `.npz` file (`config.data=PATH`).

The file holds numpy arrays (no pickles) already split the simulator's way:
the server's source set, the clients' padded examples and a test set.
"""

from __future__ import annotations

import difflib
import pathlib
from typing import Any

import numpy as np

from fedjax_tl.data.checks import check_transfer_data
from fedjax_tl.data.federated import Dataset, FederatedData, TransferData
from fedjax_tl.errors import DataError

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


def _real(path: pathlib.Path, name: str, array: np.ndarray) -> np.ndarray:
  if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or
                                 np.issubdtype(array.dtype, np.floating)):
    raise DataError(f"{path}: {name} must hold real numbers, got dtype "
                    f"{array.dtype}")
  with np.errstate(over="ignore"):  # too large for float32: Inf, reported
    return array.astype(np.float32)


def _integers(path: pathlib.Path, name: str, array: np.ndarray) -> np.ndarray:
  if not np.issubdtype(array.dtype, np.integer):
    raise DataError(f"{path}: {name} must hold integers, got dtype "
                    f"{array.dtype}")
  return array


def _padded(path: pathlib.Path, arrays: dict[str, np.ndarray],
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


def _check_names(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
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


def _num_classes(path: pathlib.Path, classes: np.ndarray) -> int:
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
  arrays = _read(path)
  _check_names(path, arrays)
  classes = _num_classes(path, arrays["num_classes"])

  def dataset(prefix: str) -> Dataset:
    return Dataset(x=_real(path, f"{prefix}_x", arrays[f"{prefix}_x"]),
                   y=_integers(path, f"{prefix}_y", arrays[f"{prefix}_y"]))

  test = dataset("test")
  data = TransferData(
      name=path.name, source_train=dataset("source"),
      source_test=(dataset("source_test") if "source_test_x" in arrays
                   else test),
      clients=_padded(path, arrays, "clients"), target_test=test,
      num_classes=classes,
      client_test=(_padded(path, arrays, "client_test")
                   if "client_test_x" in arrays else None))
  check_transfer_data(data, str(path))
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
