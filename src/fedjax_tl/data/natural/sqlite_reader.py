"""fedjax's SQLite files (`fedjax.core.sqlite_federated_data`).

One table, `federated_data(client_id BLOB PRIMARY KEY, data BLOB,
num_examples INTEGER)`, one row per client in rowid order; `data` is
`zlib.compress(msgpack(examples))`, `examples` a dict of feature name to
numpy array, each array a msgpack extension: code 1 for a numeric ndarray
(a nested msgpack of `(shape, dtype name, C-order bytes)`), code 4 for an
array of bytes (`(shape, flat list of bytes)`), code 3 for a numpy scalar.
"""

from __future__ import annotations

import pathlib
import sqlite3
import zlib
from typing import Any, Iterator

import numpy as np

from fedjax_tl.data.natural import features
from fedjax_tl.data.natural.files import import_for
from fedjax_tl.errors import DataError

SCHEMA = ("fedjax's table federated_data(client_id BLOB, data BLOB, "
          "num_examples INTEGER)")


def _ext_array(msgpack: Any, code: int, data: bytes) -> Any:
  """Decodes fedjax's msgpack extension types (see the module doc)."""
  if code in (1, 3):
    shape, dtype, buffer = msgpack.unpackb(data, raw=True)
    array = np.frombuffer(buffer, dtype=np.dtype(dtype.decode())).reshape(
        shape)
    return array[()] if code == 3 else array
  if code == 4:
    shape, flat = msgpack.unpackb(data, raw=True)
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(shape)
  raise ValueError(f"unknown msgpack extension type {code}")


class SQLiteReader:
  """A fedjax SQLite file (or several: their clients in turn)."""

  def __init__(self, files: tuple[pathlib.Path, ...], kind: str):
    self.files, self.kind = files, kind
    (self._msgpack,) = import_for("sqlite", str(files[0]))

  def _rows(self, path: pathlib.Path, columns: str) -> Iterator[tuple]:
    try:
      connection = sqlite3.connect(path.resolve().as_uri() + "?mode=ro",
                                   uri=True)
    except sqlite3.Error as e:
      raise DataError(f"{path}: cannot open as SQLite ({e})") from None
    try:
      yield from connection.execute(
          f"SELECT {columns} FROM federated_data ORDER BY rowid")
    except sqlite3.Error as e:
      raise DataError(f"{path}: damaged or not a fedjax SQLite file ({e}); "
                      f"expected {SCHEMA}") from None
    finally:
      connection.close()

  def clients(self) -> list[tuple[str, int]]:
    """`(client id, examples)` of every client, in the files' order."""
    out = []
    for path in self.files:
      for client_id, size in self._rows(path, "client_id, num_examples"):
        if not isinstance(size, int) or size < 0:
          raise DataError(f"{path}: client {_id(client_id)!r} has "
                          f"num_examples {size!r}, expected an integer >= 0")
        out.append((_id(client_id), size))
    return out

  def read(self, wanted: set[str] | None = None
           ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """`(client id, canonical features)` of the `wanted` clients (None:
    all), in the files' order."""
    for path in self.files:
      for raw_id, blob, size in self._rows(path,
                                           "client_id, data, num_examples"):
        client_id = _id(raw_id)
        if wanted is not None and client_id not in wanted:
          continue
        where = f"{path}: client {client_id!r}"
        examples = features.from_tff(self.kind, self._decode(blob, where),
                                     where)
        if features.size(examples) != size:
          raise DataError(f"{where}: num_examples is {size} but its data "
                          f"holds {features.size(examples)} examples")
        yield client_id, examples

  def _decode(self, blob: Any, where: str) -> dict[str, Any]:
    msgpack = self._msgpack
    try:
      tree = msgpack.unpackb(
          zlib.decompress(blob), raw=False,
          ext_hook=lambda code, data: _ext_array(msgpack, code, data))
    except Exception as e:  # zlib, msgpack and numpy each fail their way
      raise DataError(f"{where}: data is not zlib-compressed fedjax msgpack "
                      f"({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(tree, dict):
      raise DataError(f"{where}: data holds a {type(tree).__name__}, "
                      "expected a dict of feature arrays")
    return tree


def _id(client_id: Any) -> str:
  """A client id (fedjax stores bytes) as str."""
  if isinstance(client_id, bytes):
    return client_id.decode("utf-8", errors="backslashreplace")
  return str(client_id)
