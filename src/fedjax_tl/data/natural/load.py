"""A natural data set's files into the padded arrays the engine takes.

The cap rule (`max_client_examples`): a client keeps its first N examples in
the file's order (fedjax's and TFF's order; as TFF's `take(N)` and fedjax's
`max_examples` preprocessing do), the rest is cut and counted. Clients are
the first `num_clients` train clients in the file's order that hold any
example; their test examples come from the test file (by client id), or,
for sources shipping one split, from LEAF's per-client split.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from fedjax_tl.data.federated import Dataset, FederatedData, TransferData
from fedjax_tl.data.natural.files import KINDS, Files, find_files
from fedjax_tl.data.natural.hdf5_reader import HDF5Reader
from fedjax_tl.data.natural.leaf_reader import LeafReader
from fedjax_tl.data.natural.parquet_reader import ParquetReader
from fedjax_tl.data.natural.sqlite_reader import SQLiteReader
from fedjax_tl.errors import DataError

READERS = {"sqlite": SQLiteReader, "hdf5": HDF5Reader, "leaf": LeafReader,
           "parquet": ParquetReader}
Examples = dict[str, np.ndarray]


def open_readers(files: Files, kind: str, seed: int = 0
                 ) -> tuple[Any, Any, str]:
  """`(train reader, test reader, how the test split was made)`.

  Raises:
    DataError: no test file for a format whose source ships one.
  """
  if files.test is not None:
    return (READERS[files.format](files.train, kind),
            READERS[files.format](files.test, kind), test_split(files))
  if files.format == "parquet":
    return (ParquetReader(files.train, kind, "train", seed),
            ParquetReader(files.train, kind, "test", seed),
            test_split(files))
  raise DataError(f"{files.origin}: no test file beside it (its name with "
                  f"'test' for 'train'); {kind} comes as train and test "
                  f"files: {KINDS[kind].where}")


def test_split(files: Files) -> str:
  """How the test split of `files` is made (for the log)."""
  if files.test is not None:
    return "the source's test files"
  return "LEAF's per-client split (90% train), seeded"


def train_clients(reader: Any, num_clients: int | None, origin: str
                  ) -> list[tuple[str, int]]:
  """The first `num_clients` (None: all) train clients holding examples."""
  listing = [(c, n) for c, n in reader.clients() if n > 0]
  if not listing:
    raise DataError(f"{origin}: no client holds any example")
  if num_clients is not None and num_clients > len(listing):
    raise DataError(f"{origin}: holds {len(listing)} clients with examples "
                    f"but config.num_clients={num_clients}")
  return listing[:num_clients]


def count_clients(kind: str, data_path: str, data_format: str = "auto"
                  ) -> int:
  """The train clients (holding any example) of a natural data set."""
  files = find_files(kind, data_path, data_format)
  reader, _, _ = open_readers(files, kind)
  return len(train_clients(reader, None, files.origin))


def pad_images(clients: Iterable[tuple[str, Examples]], ids: list[str],
               width: int, shape: tuple[int, ...]) -> FederatedData:
  """`clients`' examples (those of `ids`) padded to `width`: each keeps
  its first `width` examples; absent ones have none."""
  row = {client_id: i for i, client_id in enumerate(ids)}
  x = np.zeros((len(ids), width) + shape, np.float32)
  y = np.zeros((len(ids), width), np.int32)
  count = np.zeros(len(ids), np.int32)
  for client_id, examples in clients:
    if client_id in row:
      r, n = row[client_id], min(len(examples["y"]), width)
      x[r, :n], y[r, :n], count[r] = examples["x"][:n], examples["y"][:n], n
  return FederatedData(x=x, y=y, count=count, client_ids=tuple(ids))


def capped_width(sizes: Iterable[int], cap: int | None) -> int:
  """The padded width: the largest client, at most `cap`, at least 1."""
  largest = max(sizes, default=0)
  return max(1, largest if cap is None else min(largest, cap))


def cut_facts(sizes: list[int], cap: int | None) -> dict[str, Any]:
  """What the cap cut: examples and clients, and the share of examples."""
  cut = [max(0, n - cap) for n in sizes] if cap is not None else [0]
  total = sum(sizes)
  return {"max_client_examples": cap, "examples_cut": int(sum(cut)),
          "clients_cut": int(sum(c > 0 for c in cut)),
          "examples_cut_fraction": round(sum(cut) / total, 6) if total else 0.}


def load_natural_transfer(kind: str, data_path: str, *,
                          data_format: str = "auto",
                          num_clients: int | None = None,
                          max_client_examples: int | None = None,
                          seed: int = 0) -> TransferData:
  """Reads a natural image data set (femnist, cifar100) as TransferData.

  `clients` are the train clients (ids kept), capped; `client_test` their
  own test examples, capped alike (None for CIFAR-100, whose test clients
  are others); `target_test` every test example of the chosen clients
  (CIFAR-100: of every test client), uncapped. The source task is left to
  the caller: `source_train` and `source_test` are `target_test` here.

  Raises:
    DataError: naming the file and what is wrong with it.
  """
  spec = KINDS[kind]
  if spec.task != "image":
    raise DataError(f"{kind}: a text data set; read it with "
                    "read_client_texts (its task is built elsewhere)")
  files = find_files(kind, data_path, data_format)
  train, test, split = open_readers(files, kind, seed)
  listing = train_clients(train, num_clients, files.origin)
  ids, sizes = [c for c, _ in listing], [n for _, n in listing]
  clients = pad_images(train.read(set(ids)), ids,
                       capped_width(sizes, max_client_examples), spec.shape)
  _check_read(clients, sizes, max_client_examples, files.origin)
  test_ids = ids if spec.same_test_clients else None
  held = list(test.read(None if test_ids is None else set(test_ids)))
  client_test = None
  if spec.same_test_clients:
    client_test = pad_images(held, ids, capped_width(
        (len(e["y"]) for _, e in held), max_client_examples), spec.shape)
  target = _concat(held, spec.shape, files.origin)
  facts = {"files": files.origin, "format": files.format,
           "test_split": split, "clients": len(ids),
           "examples": int(sum(sizes)), "test_examples": len(target),
           **cut_facts(sizes, max_client_examples)}
  return TransferData(name=kind, source_train=target, source_test=target,
                      clients=clients, target_test=target,
                      num_classes=spec.num_classes, client_test=client_test,
                      facts=facts)


def _check_read(clients: FederatedData, sizes: list[int], cap: int | None,
                origin: str) -> None:
  """Each client got the examples its listing promised."""
  expected = np.minimum(sizes, cap if cap is not None else max(sizes))
  short = np.flatnonzero(clients.count != expected)
  if short.size:
    i = int(short[0])
    raise DataError(f"{origin}: client {clients.client_ids[i]!r} lists "
                    f"{sizes[i]} examples but {int(clients.count[i])} were "
                    "read")


def _concat(held: list[tuple[str, Examples]], shape: tuple[int, ...],
            origin: str) -> Dataset:
  if not any(len(e["y"]) for _, e in held):
    raise DataError(f"{origin}: the test file holds no example of the "
                    "chosen clients")
  return Dataset(
      x=np.concatenate([e["x"] for _, e in held]).reshape((-1,) + shape),
      y=np.concatenate([e["y"] for _, e in held]).astype(np.int32))
