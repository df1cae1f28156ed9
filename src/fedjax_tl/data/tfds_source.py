"""Image classification sets from tensorflow-datasets, without TensorFlow.

Reads prepared (array_record) data through `tfds.data_source` (random access,
numpy), holds out a source share for server pretraining and partitions the rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedjax_tl.data.federated import Dataset, FederatedData, TransferData
from fedjax_tl.data.partition import METHODS, local_test_indices
from fedjax_tl.data.partition import pad_clients, partition
from fedjax_tl.errors import ConfigError, DataError

# Records read per batched random-access call.
_READ_BATCH = 1024


def load_tfds_transfer(
    name: str,
    num_clients: int,
    *,
    partition_method: str = "dirichlet",
    alpha: float = 0.5,
    min_examples: int = 1,
    max_examples: int | None = None,
    source_fraction: float = 0.1,
    seed: int = 0,
    data_dir: str | None = None,
    image_key: str = "image",
    label_key: str = "label",
    max_train_examples: int | None = None,
    local_test_examples: int = 0,
) -> TransferData:
  """Loads a tfds image classification set as a federated transfer task.

  A random `source_fraction` of the train split becomes `source_train` (the
  server pretrains on it); the rest of the train split is partitioned over the
  clients with :func:`partition`; the test split is `target_test`, and also
  serves as `source_test` (same object: both domains are the same here).
  Each client's own test examples (`client_test`) are drawn, with
  replacement, from the test split with the client's training label mix.

  The data set must already be prepared in `data_dir` in array_record format;
  nothing is downloaded.

  Args:
    name: tfds name, optionally with config and version (`"mnist"`,
      `"emnist/balanced"`, `"fashion_mnist"`, `"cifar10"`, ...).
    num_clients: number of clients.
    partition_method: `"iid"`, `"dirichlet"` or `"quantity"`.
    alpha: Dirichlet concentration of the partition.
    min_examples: fewest examples per client.
    max_examples: most examples per client (also the padded width); examples
      beyond the clients' capacity are left out.
    source_fraction: share of the (used) train split held out for the server,
      in (0, 1).
    seed: seeds the train subset, the source hold-out and the partition.
    data_dir: tfds data directory (default: tfds' own default).
    image_key: feature holding the image.
    label_key: feature holding the class label (a ClassLabel).
    max_train_examples: if set, use a random subset of at most this many
      train examples (read only those).
    local_test_examples: test examples drawn per client (see
      `partition.local_test_indices`; their own random stream, so every other
      array is the same with or without them); 0 gives none.

  Returns:
    TransferData named `name`, images float32 in [0, 1] shaped `[n, H, W, C]`.

  Raises:
    DataError: tensorflow-datasets missing, data set unknown or not prepared,
      or features not as expected.
    ConfigError: a bad argument.
  """
  # Over ~60 lines only for its docstring (14 arguments); the body is short.
  _check_args(partition_method, num_clients, seed, source_fraction,
              local_test_examples, max_train_examples)
  tfds = _import_tfds(name)
  train_src = _open(tfds, name, "train", data_dir)
  test_src = _open(tfds, name, "test", data_dir)
  num_classes = _num_classes(train_src, name, label_key)

  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0]))
  (x_train, y_train, scale), (x_test, y_test, test_scale) = _read_splits(
      train_src, test_src, rng, max_train_examples, num_classes, name,
      image_key, label_key)
  source_ix, client_pool = _hold_out_source(y_train.shape[0], source_fraction,
                                            rng)
  parts = partition(
      y_train[client_pool], num_clients, partition_method, rng, alpha=alpha,
      min_examples=min_examples, max_examples=max_examples)
  clients = pad_clients(
      x_train, y_train, [client_pool[p] for p in parts], max_examples)
  clients.x[...] *= np.float32(1.0 / scale)
  client_test = _client_test(clients, x_test, y_test, test_scale,
                             local_test_examples, seed)

  test = Dataset(x=_unit(x_test, test_scale), y=y_test)
  return TransferData(
      name=name,
      source_train=Dataset(x=_unit(x_train[source_ix], scale),
                           y=y_train[source_ix]),
      source_test=test,
      clients=clients,
      target_test=test,
      num_classes=num_classes,
      client_test=client_test)


def _check_args(partition_method: str, num_clients: int, seed: int,
                source_fraction: float, local_test_examples: int,
                max_train_examples: int | None) -> None:
  """Raises ConfigError for the first out-of-range argument."""
  if partition_method not in METHODS:
    raise ConfigError(
        f"unknown partition method {partition_method!r}; valid choices: "
        f"{', '.join(METHODS)}")
  if num_clients < 1:
    raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
  if seed < 0:
    raise ConfigError(f"seed must be >= 0, got {seed}")
  if not 0.0 < source_fraction < 1.0:
    raise ConfigError(
        f"source_fraction must be in (0, 1), got {source_fraction}")
  if local_test_examples < 0:
    raise ConfigError(
        f"local_test_examples must be >= 0, got {local_test_examples}")
  if max_train_examples is not None and max_train_examples < 2:
    raise ConfigError(
        f"max_train_examples must be >= 2, got {max_train_examples}")


def _import_tfds(name: str) -> Any:
  """The tensorflow_datasets module, or DataError saying how to install it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        f"loading tfds data set {name!r} needs tensorflow-datasets: "
        f'pip install "fedjax-tl[tfds]" ({e})') from e
  return tfds


def _read_splits(
    train_src: Any,
    test_src: Any,
    rng: np.random.Generator,
    max_train_examples: int | None,
    num_classes: int,
    name: str,
    image_key: str,
    label_key: str,
) -> tuple[tuple[np.ndarray, np.ndarray, float],
           tuple[np.ndarray, np.ndarray, float]]:
  """Reads the (subset of the) train split and the test split.

  Returns:
    `(x, y, scale)` of the train split, then of the test split (see `_read`).

  Raises:
    DataError: a record not as expected, or a label outside the classes.
  """
  n_train = len(train_src)
  if max_train_examples is not None and n_train > max_train_examples:
    train_ix = np.sort(rng.choice(n_train, max_train_examples, replace=False))
  else:
    train_ix = np.arange(n_train)
  # Pixels stay in their stored dtype (uint8: 4x smaller) until the final
  # arrays are built.
  train = _read(train_src, train_ix, name, "train", image_key, label_key)
  test = _read(test_src, np.arange(len(test_src)), name, "test", image_key,
               label_key)
  for split, y in (("train", train[1]), ("test", test[1])):
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise DataError(
          f"tfds data set {name!r}: {split} labels outside "
          f"[0, {num_classes}) in feature {label_key!r}")
  return train, test


def _hold_out_source(n: int, source_fraction: float, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Splits `n` examples at random: (server's source, clients' pool).

  Both are sorted indices; the source is `source_fraction` of them.
  """
  n_source = int(round(source_fraction * n))
  if n_source < 1 or n_source >= n:
    raise ConfigError(
        f"source_fraction={source_fraction} of {n} train examples leaves an "
        f"empty source or target part")
  order = rng.permutation(n)
  return np.sort(order[:n_source]), np.sort(order[n_source:])


def _client_test(clients: FederatedData, x_test: np.ndarray,
                 y_test: np.ndarray, test_scale: float,
                 local_test_examples: int, seed: int) -> FederatedData | None:
  """Each client's own test examples, with its training label mix.

  None when `local_test_examples` is 0.
  """
  if not local_test_examples:
    return None
  # A stream of its own: every other array is the same with or without these.
  picks = local_test_indices(
      clients, y_test, local_test_examples,
      np.random.default_rng(np.random.SeedSequence([int(seed), 1])))
  client_test = pad_clients(x_test, y_test, picks, local_test_examples)
  client_test.x[...] *= np.float32(1.0 / test_scale)
  return client_test


def _unit(x: np.ndarray, scale: float) -> np.ndarray:
  """Pixels as float32 in [0, 1]."""
  out = x.astype(np.float32)
  out *= np.float32(1.0 / scale)
  return out


def _open(tfds: Any, name: str, split: str, data_dir: str | None) -> Any:
  """Opens one split as a random-access data source, or raises DataError."""
  where = data_dir if data_dir is not None else "the default tfds data_dir"
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  except Exception as e:  # tfds raises many types here; all mean "unusable".
    if type(e).__name__ == "DatasetNotFoundError":
      raise DataError(
          f"unknown tfds data set {name!r} (see `tfds.list_builders()`)"
      ) from e
    # An unprepared directory (or one prepared as TFRecord, which has no
    # random access) shows up as NotImplementedError; tfds' own text about
    # file formats would mislead, so it is only kept for other errors.
    text = str(e).strip()
    cause = ("" if isinstance(e, NotImplementedError) else
             f" [{type(e).__name__}: {text.splitlines()[0] if text else ''}]")
    raise DataError(
        f"tfds data set {name!r} (split {split!r}) is not prepared in {where}; "
        f"download and prepare it first on a machine with internet, e.g. "
        f"`tfds build {name} --file_format=array_record"
        f"{'' if data_dir is None else ' --data_dir=' + data_dir}`{cause}"
    ) from e


def _num_classes(source: Any, name: str, label_key: str) -> int:
  """The number of classes of `label_key`, from the data set's info."""
  features = source.dataset_info.features
  try:
    feature = features[label_key]
  except KeyError as e:
    raise DataError(
        f"tfds data set {name!r} has no feature {label_key!r} (features: "
        f"{', '.join(features.keys())})") from e
  num_classes = getattr(feature, "num_classes", None)
  if not num_classes:
    raise DataError(
        f"tfds data set {name!r}: feature {label_key!r} is not a class label")
  return int(num_classes)


def _read(
    source: Any,
    indices: np.ndarray,
    name: str,
    split: str,
    image_key: str,
    label_key: str,
) -> tuple[np.ndarray, np.ndarray, float]:
  """Reads the given records.

  Returns:
    `[n, H, W, C]` images in their stored dtype, `[n]` int32 labels, and the
    pixel value meaning 1.0 (255 for uint8 images, 1 for float images).
  """
  images: np.ndarray | None = None
  scale = 1.0
  labels = np.empty(indices.shape[0], dtype=np.int32)
  try:
    fetch = _batch_reader(source)
  except ImportError as e:
    raise _decoder_error(name) from e
  for lo in range(0, indices.shape[0], _READ_BATCH):
    keys = [int(k) for k in indices[lo:lo + _READ_BATCH]]
    try:
      records = fetch(keys)
    except ImportError as e:
      raise _decoder_error(name) from e
    for j, record in enumerate(records, start=lo):
      try:
        image, label = record[image_key], record[label_key]
      except KeyError as e:
        raise DataError(
            f"tfds data set {name!r} ({split}): record has no feature {e} "
            f"(features: {', '.join(record.keys())})") from e
      image = np.asarray(image)
      if image.ndim == 2:
        image = image[..., None]
      if images is None:
        if image.ndim != 3:
          raise DataError(
              f"tfds data set {name!r}: feature {image_key!r} is not an "
              f"image (shape {image.shape})")
        images = np.empty((indices.shape[0],) + image.shape,
                          dtype=image.dtype)
        # Integer pixels (uint8) span their dtype's range; float ones [0, 1].
        if np.issubdtype(image.dtype, np.integer):
          scale = float(np.iinfo(image.dtype).max)
      if image.shape != images.shape[1:]:
        raise DataError(
            f"tfds data set {name!r}: images of different shapes "
            f"({images.shape[1:]} and {image.shape}) are not supported")
      images[j] = image
      labels[j] = label
  if images is None:  # empty split
    images = np.empty((0, 1, 1, 1), dtype=np.float32)
  return images, labels, scale


def _decoder_error(name: str) -> DataError:
  # Without TensorFlow, tfds decodes encoded (PNG/JPEG) images with OpenCV or
  # PIL, and raises ImportError when neither is installed.
  return DataError(
      f"reading tfds data set {name!r} without TensorFlow needs an image "
      f"decoder: pip install pillow (or opencv-python)")


def _batch_reader(source: Any):
  """A function reading a list of records, batched where the source allows."""
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None and len(source) > 0:
    try:
      getitems([0])
    except TypeError:
      # tfds' mock data source installs a `__getitems__` that cannot be
      # called; read record by record there.
      getitems = None
  if getitems is None:
    return lambda keys: [source[k] for k in keys]
  return getitems


def load_tfds_splits(name: str, data_dir: str | None = None, seed: int = 0,
                     max_train_examples: int | None = None
                     ) -> tuple[Dataset, Dataset, int]:
  """A tfds image set's train and test splits whole (a server's source
  task): `(train, test, num_classes)`, images float32 in [0, 1].

  Raises:
    DataError: as `load_tfds_transfer`'s.
  """
  tfds = _import_tfds(name)
  train_src = _open(tfds, name, "train", data_dir)
  test_src = _open(tfds, name, "test", data_dir)
  num_classes = _num_classes(train_src, name, "label")
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0]))
  (x, y, scale), (x_test, y_test, test_scale) = _read_splits(
      train_src, test_src, rng, max_train_examples, num_classes, name,
      "image", "label")
  return (Dataset(x=_unit(x, scale), y=y),
          Dataset(x=_unit(x_test, test_scale), y=y_test), num_classes)
