"""Which natural data set, which files, which format.

A natural data set is named by `config.data` (a KIND) and found at
`config.data_path`: its train file, or a directory holding the train and test
files. The format (FORMATS) is recognised from the train file's first bytes
unless `config.data_format` says it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from types import ModuleType

from fedjax_tl.errors import DataError

FORMATS = ("sqlite", "hdf5", "leaf", "parquet")
_FEDJAX = "https://storage.googleapis.com/gresearch/fedjax"
_TFF = "https://storage.googleapis.com/tff-datasets-public"
_LEAF = "https://github.com/TalwalkarLab/leaf (data/{}/preprocess.sh)"


@dataclasses.dataclass(frozen=True)
class Kind:
  """A natural data set.

  Attributes:
    name: `config.data`.
    task: "image" (x [H, W, C] float32, y int) or "text" (strings).
    shape: an image's [H, W, C]; () for text.
    num_classes: image labels (0 for text).
    where: where users get its files, one line.
    same_test_clients: its test file holds the train clients' own test
      examples (by id); False for CIFAR-100, whose 100 test clients are
      others than its 500 train clients.
  """
  name: str
  task: str
  shape: tuple[int, ...]
  num_classes: int
  where: str
  same_test_clients: bool = True


KINDS = {kind.name: kind for kind in (
    Kind("femnist", "image", (28, 28, 1), 62,
         f"fedjax: {_FEDJAX}/emnist/federated_emnist_train.sqlite and "
         f"_test.sqlite; TFF: {_TFF}/fed_emnist.tar.bz2 (fed_emnist_train.h5, "
         f"_test.h5); LEAF: {_LEAF.format('femnist')}; Hugging Face: "
         "flwrlabs/femnist (parquet)"),
    Kind("shakespeare", "text", (), 0,
         f"fedjax: {_FEDJAX}/shakespeare/shakespeare_train.sqlite and "
         f"_test.sqlite; TFF: {_TFF}/shakespeare.tar.bz2; LEAF: "
         f"{_LEAF.format('shakespeare')}; Hugging Face: flwrlabs/shakespeare "
         "(parquet)"),
    Kind("cifar100", "image", (32, 32, 3), 100,
         f"TFF: {_TFF}/fed_cifar100.tar.bz2 (fed_cifar100_train.h5, "
         "_test.h5); fedjax: federated_cifar100_train.sqlite and _test.sqlite "
         "as fedjax.datasets.cifar100.load_data() writes them", False),
    Kind("stackoverflow", "text", (), 0,
         f"fedjax: {_FEDJAX}/stackoverflow/stackoverflow_train.sqlite and "
         f"_test.sqlite; TFF: {_TFF}/stackoverflow.tar.bz2"),
)}

# First bytes of each format (JSON: its first non-blank character).
_MAGIC = ((b"SQLite format 3\x00", "sqlite"), (b"\x89HDF\r\n\x1a\n", "hdf5"),
          (b"PAR1", "parquet"), (b"{", "leaf"))
_MODULES = {"sqlite": ("msgpack",), "hdf5": ("h5py",), "leaf": (),
            "parquet": ("pyarrow.parquet",)}


def detect_format(path: pathlib.Path) -> str:
  """The format of `path` from its first bytes, or DataError."""
  try:
    with open(path, "rb") as f:
      head = f.read(64)
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  for magic, name in _MAGIC:
    if head.lstrip().startswith(magic):
      return name
  raise DataError(f"{path}: not a natural data file (no SQLite, HDF5, "
                  "parquet or JSON header; expected one of "
                  f"{', '.join(FORMATS)})")


def import_for(fmt: str, origin: str) -> list[ModuleType]:
  """The libraries format `fmt` needs, or DataError with the install hint."""
  modules = []
  for name in _MODULES[fmt]:
    try:
      modules.append(importlib.import_module(name))
    except ImportError:
      raise DataError(f"{origin}: reading {fmt} files needs "
                      f"{name.split('.')[0]}: pip install "
                      '"fedjax-tl[natural]"') from None
  return modules


@dataclasses.dataclass(frozen=True)
class Files:
  """The files of a natural data set: train, test (None: not found), format."""
  train: tuple[pathlib.Path, ...]
  test: tuple[pathlib.Path, ...] | None
  format: str

  @property
  def origin(self) -> str:
    return str(self.train[0]) if len(self.train) == 1 else (
        f"{self.train[0].parent}/ ({len(self.train)} files)")


def find_files(kind: str, data_path: str, data_format: str = "auto") -> Files:
  """The train and test files at `data_path` (a train file or directory).

  A file: the test file is its name with the last "train" made "test" (in
  its directory name too, LEAF's data/train/ and data/test/). A directory:
  its train/ and test/ subdirectories' files, else its files named *train*
  (and the same names with "test").

  Raises:
    DataError: nothing at `data_path` (naming where users get the data), no
      train file in a directory, or a file of an unknown format.
  """
  path = pathlib.Path(data_path)
  if not path.exists():
    raise DataError(f"{path}: no such {kind} data file or directory; get it "
                    f"from {KINDS[kind].where}")
  train = _train_files(path, kind) if path.is_dir() else (path,)
  test = _test_files(train)
  fmt = detect_format(train[0]) if data_format == "auto" else data_format
  return Files(train, test, fmt)


def _train_files(directory: pathlib.Path, kind: str
                 ) -> tuple[pathlib.Path, ...]:
  if (directory / "train").is_dir():
    found = sorted(p for p in (directory / "train").iterdir() if p.is_file())
  else:
    found = sorted(p for p in directory.iterdir()
                   if p.is_file() and "train" in p.name)
  if not found:
    raise DataError(f"{directory}: no train file (a train/ directory or a "
                    f"file named *train*); get {kind} from "
                    f"{KINDS[kind].where}")
  return tuple(found)


def _swap(text: str) -> str:
  """`text` with its last "train" replaced by "test"."""
  head, sep, tail = text.rpartition("train")
  return head + "test" + tail if sep else text


def _test_files(train: tuple[pathlib.Path, ...]
                ) -> tuple[pathlib.Path, ...] | None:
  """The test file of each train file (swapped names), if all exist; else a
  sibling test/ directory's files; else None."""
  test = []
  for file in train:
    parent = file.parent
    if parent.name == "train":
      parent = parent.parent / "test"
    candidate = parent / _swap(file.name)
    if candidate == file or not candidate.is_file():
      candidates = sorted(parent.glob("*test*")) if parent.is_dir() else []
      if parent != file.parent and candidates:
        return tuple(p for p in candidates if p.is_file())
      return None
    test.append(candidate)
  return tuple(test)
