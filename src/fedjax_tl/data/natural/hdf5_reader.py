"""TensorFlow Federated's HDF5 files (`tff.simulation.HDF5ClientData`).

A top-level group `examples` with one subgroup per client, named by its id,
holding one dataset per feature (`examples/<client>/<feature>`, all of the
same length). Clients are taken in sorted id order, as TFF lists them.
"""

from __future__ import annotations

import pathlib
from typing import Any, Iterator

import numpy as np

from fedjax_tl.data.natural import features
from fedjax_tl.data.natural.files import import_for
from fedjax_tl.errors import DataError


class HDF5Reader:
  """A TFF HDF5 file (or several: their clients in turn)."""

  def __init__(self, files: tuple[pathlib.Path, ...], kind: str):
    self.files, self.kind = files, kind
    (self._h5py,) = import_for("hdf5", str(files[0]))

  def _groups(self, path: pathlib.Path) -> Iterator[tuple[str, Any]]:
    """`(client id, its group)` in sorted id order."""
    try:
      handle = self._h5py.File(path, "r")
    except OSError as e:
      raise DataError(f"{path}: cannot open as HDF5 ({str(e)[:120]})"
                      ) from None
    with handle:
      examples = handle.get("examples")
      if not isinstance(examples, self._h5py.Group):
        raise DataError(f"{path}: no group 'examples' (has: "
                        f"{', '.join(handle.keys()) or 'nothing'}); expected "
                        "TFF's examples/<client>/<feature>")
      for client_id in sorted(examples.keys()):
        group = examples[client_id]
        if not isinstance(group, self._h5py.Group):
          raise DataError(f"{path}: examples/{client_id} is not a group of "
                          "features")
        yield client_id, group

  def clients(self) -> list[tuple[str, int]]:
    """`(client id, examples)` of every client, in sorted id order."""
    out = []
    for path in self.files:
      for client_id, group in self._groups(path):
        name = features.TFF_FEATURES[self.kind][0]
        where = f"{path}: client {client_id!r}"
        out.append((client_id, _length(group, name, where)))
    return out

  def read(self, wanted: set[str] | None = None
           ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """`(client id, canonical features)` of the `wanted` clients (None:
    all), in sorted id order."""
    for path in self.files:
      for client_id, group in self._groups(path):
        if wanted is not None and client_id not in wanted:
          continue
        where = f"{path}: client {client_id!r}"
        try:
          arrays = {name: group[name][()] for name in group.keys()
                    if name in features.TFF_FEATURES[self.kind]}
        except (OSError, TypeError, ValueError) as e:
          raise DataError(f"{where}: cannot read its features "
                          f"({str(e)[:120]})") from None
        yield client_id, features.from_tff(self.kind, arrays, where)


def _length(group: Any, name: str, where: str) -> int:
  """The examples of a client group: its feature `name`'s length."""
  if name not in group:
    raise DataError(f"{where}: no feature {name!r} (has: "
                    f"{', '.join(group.keys()) or 'none'})")
  shape = getattr(group[name], "shape", None)
  if not shape:
    raise DataError(f"{where}: feature {name!r} is not an array of examples")
  return int(shape[0])
