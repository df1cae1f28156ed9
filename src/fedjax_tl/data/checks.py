"""Load-time checks of a transfer data set, whatever its source.

Every loader's output passes :func:`check_transfer_data` before anything is
built on it, so a bad label, a NaN feature or an empty client is one
:class:`~fedjax_tl.errors.DataError` naming the file and the problem.
"""

from __future__ import annotations

import numpy as np

from fedjax_tl.data.federated import Dataset, FederatedData, TransferData
from fedjax_tl.errors import DataError


def _first(flags: np.ndarray) -> str:
  """`N (first at index i)` for a boolean array over examples."""
  where = np.argwhere(flags)
  index = tuple(int(i) for i in where[0])
  return f"{len(where)} (first at index {index[0] if len(index) == 1 else index})"


def _check_features(origin: str, part: str, x: np.ndarray,
                    real: np.ndarray | None, sequence: bool) -> None:
  """Finite float features; for a sequence task (`sequence`: a label per
  position) integer token ids too, non-negative."""
  tokens = sequence and np.issubdtype(x.dtype, np.integer)
  if not (tokens or np.issubdtype(x.dtype, np.floating)):
    raise DataError(f"{origin}: {part} features must be floating point (or, "
                    "with a label per position, integer token ids), got "
                    f"dtype {x.dtype}")
  lead = 1 if real is None else real.ndim  # example axes
  if not all(x.shape[lead:]):
    raise DataError(f"{origin}: {part} features have an empty shape "
                    f"{x.shape[lead:]}")
  good = (x >= 0) if tokens else np.isfinite(x)
  good = good.reshape(x.shape[:lead] + (-1,)).all(-1)
  bad = ~good if real is None else real & ~good
  if bad.any():
    what = ("negative token ids" if tokens else
            "non-finite (NaN or Inf) features")
    raise DataError(f"{origin}: {part} has {what} in {_first(bad)} examples")


def _check_labels(origin: str, part: str, y: np.ndarray, num_classes: int,
                  real: np.ndarray | None) -> None:
  if not np.issubdtype(y.dtype, np.integer):
    raise DataError(f"{origin}: {part} labels must be integers, got dtype "
                    f"{y.dtype}")
  bad = (y < 0) | (y >= num_classes)
  bad = bad.reshape(bad.shape[:1 if real is None else real.ndim] + (-1,))
  bad = bad.any(-1)  # per example (a sequence's targets together)
  if real is not None:
    bad &= real
  if bad.any():
    values = y[bad]
    example = int(values[(values < 0) | (values >= num_classes)][0])
    raise DataError(f"{origin}: {part} labels outside [0, {num_classes}) in "
                    f"{_first(bad)} examples (e.g. {example})")


def _labels_fit(x: np.ndarray, y: np.ndarray, lead: int) -> bool:
  """Whether `y` holds one label per example (the `lead` example axes of
  `x`), or one per position of a sequence (`x[..., T]` token ids)."""
  return (y.shape == x.shape[:lead] or
          (x.ndim == lead + 1 and y.shape == x.shape))


def check_dataset(origin: str, part: str, data: Dataset, num_classes: int,
                  feature_shape: tuple[int, ...]) -> None:
  """Checks a centralised part: shapes, finite features, labels in range."""
  x, y = np.asarray(data.x), np.asarray(data.y)
  if x.ndim < 2 or not _labels_fit(x, y, 1):
    raise DataError(f"{origin}: {part} has features of shape {x.shape} but "
                    f"labels of shape {y.shape} (expected [n, ...] and [n], "
                    "or [n, T] and [n, T] for sequences)")
  if x.shape[0] == 0:
    raise DataError(f"{origin}: {part} has no examples")
  if x.shape[1:] != feature_shape:
    raise DataError(f"{origin}: {part} features are {x.shape[1:]}, but "
                    f"the clients' are {feature_shape}")
  _check_features(origin, part, x, None, y.shape == x.shape)
  _check_labels(origin, part, y, num_classes, None)


def check_federated(origin: str, part: str, data: FederatedData,
                    num_classes: int, allow_empty: bool = False) -> None:
  """Checks padded client data: shapes, counts, the real examples' values.

  Padding (rows past a client's `count`) is not looked at.
  """
  x, y, count = np.asarray(data.x), np.asarray(data.y), np.asarray(data.count)
  if x.ndim < 3 or not _labels_fit(x, y, 2):
    raise DataError(f"{origin}: {part} has features of shape {x.shape} but "
                    f"labels of shape {y.shape} (expected [clients, "
                    "examples, ...] and [clients, examples], or [clients, "
                    "examples, T] both for sequences)")
  if x.shape[0] == 0:
    raise DataError(f"{origin}: {part} has no clients")
  if count.shape != (x.shape[0],) or not np.issubdtype(count.dtype,
                                                        np.integer):
    raise DataError(f"{origin}: {part} counts must be [{x.shape[0]}] "
                    f"integers (one per client), got {count.dtype} "
                    f"{count.shape}")
  ids = data.client_ids
  if ids is not None and len(ids) != x.shape[0]:
    raise DataError(f"{origin}: {part} has {len(ids)} client ids for "
                    f"{x.shape[0]} clients")
  outside = (count < 0) | (count > x.shape[1])
  if outside.any():
    raise DataError(f"{origin}: {part} counts must be in [0, {x.shape[1]}] "
                    f"(the examples per client); {_first(outside)} are not")
  if not allow_empty and (count == 0).any():
    empty = np.flatnonzero(count == 0)
    raise DataError(f"{origin}: {part} has {len(empty)} client(s) without "
                    f"examples (first: client {int(empty[0])})")
  real = np.arange(x.shape[1])[None, :] < count[:, None]
  _check_features(origin, part, x, real, y.shape == x.shape)
  _check_labels(origin, part, y, num_classes, real)


def check_transfer_data(data: TransferData, origin: str) -> None:
  """Checks every part of `data`; `origin` names its file or source.

  Raises:
    DataError: `"<origin>: <part> ..."` for mismatched shapes, features
      that are not finite floats, labels outside `[0, num_classes)`,
      clients without examples, or an empty centralised part.
  """
  num_classes = data.num_classes
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise DataError(f"{origin}: num_classes must be an integer >= 1, got "
                    f"{num_classes!r}")
  check_federated(origin, "clients", data.clients, int(num_classes))
  feature_shape = tuple(np.shape(data.clients.x)[2:])
  for part, dataset in (("target_test", data.target_test),
                        ("source_train", data.source_train),
                        ("source_test", data.source_test)):
    if part == "source_test" and dataset is data.target_test:
      continue  # one test set serving both domains
    check_dataset(origin, part, dataset, int(num_classes), feature_shape)
  if data.client_test is not None:
    # A device may lack test examples (none of its classes in the pool).
    check_federated(origin, "client_test", data.client_test,
                    int(num_classes), allow_empty=True)
    test_shape = np.shape(data.client_test.x)
    if test_shape[0] != data.clients.num_clients or \
        tuple(test_shape[2:]) != feature_shape:
      raise DataError(f"{origin}: client_test is {test_shape} but clients "
                      f"is {np.shape(data.clients.x)} (expected the same "
                      "clients and features)")
