"""Natural federated data sets, read from the files their projects publish.

FEMNIST, CIFAR-100, Shakespeare and StackOverflow as fedjax's SQLite, TFF's
HDF5, LEAF's JSON or Hugging Face's parquet files (files.py says where each
is got), none needing TensorFlow. Images become the padded FederatedData the
engine takes (`load_natural_transfer`), the clients' ids kept; texts stay
per-client strings (`read_client_texts`).
"""

from __future__ import annotations

from fedjax_tl.data.natural.files import FORMATS, KINDS, find_files
from fedjax_tl.data.natural.load import (count_clients, load_natural_transfer,
                                         open_readers, train_clients)

__all__ = ["FORMATS", "KINDS", "count_clients", "find_files",
           "load_natural_transfer", "read_client_texts", "read_text_splits"]

# Each text kind's canonical features (features.py).
TEXT_FEATURES = {"shakespeare": ("text",),
                 "stackoverflow": ("tokens", "tags", "title")}


def read_client_texts(kind: str, data_path: str, *, data_format: str = "auto",
                      num_clients: int | None = None, split: str = "train",
                      seed: int = 0
                      ) -> tuple[list[str], dict[str, list[list[str]]]]:
  """A text data set's clients and their strings, unicode kept.

  Args:
    kind: "shakespeare" (feature `text`: each role's snippets; LEAF's and
      parquet's windows joined back into text) or "stackoverflow" (`tokens`,
      space-separated; `tags`, '|'-separated; `title`).
    data_path, data_format: as `load_natural_transfer`'s.
    num_clients: the first this many train clients holding examples (None:
      all); the test split gives the same clients' test strings.
    split: "train" or "test".

  Returns:
    `(client ids, {feature: [each client's strings]})`, clients in the train
    file's order (a client without test strings has an empty list).
  """
  ids, texts = read_text_splits(kind, data_path, data_format=data_format,
                                num_clients=num_clients, splits=(split,),
                                seed=seed)
  return ids, texts[split]


def read_text_splits(kind: str, data_path: str, *, data_format: str = "auto",
                     num_clients: int | None = None,
                     splits: tuple[str, ...] = ("train", "test"),
                     seed: int = 0
                     ) -> tuple[list[str], dict[str, dict[str, list]]]:
  """:func:`read_client_texts` of several splits from one opening of the
  files: `(client ids, {split: {feature: [each client's strings]}})`."""
  files = find_files(kind, data_path, data_format)
  train, test, _ = open_readers(files, kind, seed)
  ids = [c for c, _ in train_clients(train, num_clients, files.origin)]
  names = TEXT_FEATURES[kind]
  out = {}
  for split in splits:
    reader = train if split == "train" else test
    found = {c: examples for c, examples in reader.read(set(ids))}
    out[split] = {name: [list(found[c][name]) if c in found else []
                         for c in ids] for name in names}
  return ids, out
