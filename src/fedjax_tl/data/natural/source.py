"""The server's source task for a natural data set (`config.source`).

`none`: no pretraining (config.validate then sets pretrain=none); the source
parts are the target test set, which nothing trains on. A tfds name: its
train split is pretrained on, its test split is the source test set (e.g.
emnist/digits before FEMNIST writers, cifar10 before CIFAR-100 clients;
EMNIST's images turned upright, as FEMNIST's are). An
`.npz`: `source_x`, `source_y`, optionally `source_test_x`, `source_test_y`
(else a tenth of the source, the last rows, is held out). Its labels must
lie within the target's classes and its features have the clients' shape.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from fedjax_tl.data.checks import check_dataset
from fedjax_tl.data.federated import Dataset, TransferData
from fedjax_tl.errors import DataError


def with_source(data: TransferData, source: str, *,
                data_dir: str | None = None, seed: int = 0) -> TransferData:
  """`data` with `source_train` / `source_test` from `source`.

  Raises:
    DataError: naming the source: unreadable, features of another shape
      than the clients', labels outside the target's classes.
  """
  if source == "none":
    return data
  if source.endswith(".npz"):
    train, test = _npz_source(pathlib.Path(source))
  else:
    from fedjax_tl.data.tfds_source import load_tfds_splits
    train, test, _ = load_tfds_splits(source, data_dir, seed)
    if source.split("/")[0] == "emnist":
      train, test = _upright(train), _upright(test)
    source = f"tfds data set {source!r}"
  for part, dataset in (("source_train", train), ("source_test", test)):
    check_dataset(source, part, dataset, data.num_classes, data.input_shape)
  facts = {**(data.facts or {}), "source": source,
           "source_examples": len(train)}
  return dataclasses.replace(data, source_train=train, source_test=test,
                             facts=facts)


def _upright(data: Dataset) -> Dataset:
  """tfds' EMNIST images, stored transposed as NIST ships them
  (tensorflow/datasets#812), turned upright as FEMNIST's (and MNIST's) are."""
  return Dataset(x=np.swapaxes(data.x, 1, 2), y=data.y)


def _npz_source(path: pathlib.Path) -> tuple[Dataset, Dataset]:
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {name: archive[name] for name in archive.files}
  except Exception as e:  # missing, not a zip, a damaged array
    raise DataError(f"{path}: not a readable .npz source ({type(e).__name__}"
                    f": {str(e).splitlines()[0][:120] if str(e) else ''})"
                    ) from None
  for name in ("source_x", "source_y"):
    if name not in arrays:
      raise DataError(f"{path}: no array {name!r} (a source .npz holds "
                      "source_x, source_y, optionally source_test_x/_y)")
  x, y = arrays["source_x"], arrays["source_y"]
  if "source_test_x" in arrays and "source_test_y" in arrays:
    test_x, test_y = arrays["source_test_x"], arrays["source_test_y"]
  else:
    held = max(1, len(y) // 10)
    x, y, test_x, test_y = x[:-held], y[:-held], x[-held:], y[-held:]
  return _dataset(path, x, y), _dataset(path, test_x, test_y)


def _dataset(path: pathlib.Path, x: np.ndarray, y: np.ndarray) -> Dataset:
  if x.dtype.kind not in "fiu" or y.dtype.kind not in "iu":
    raise DataError(f"{path}: source features must be real numbers and "
                    f"labels integers, got {x.dtype} and {y.dtype}")
  return Dataset(x=x.astype(np.float32), y=y.astype(np.int32))
