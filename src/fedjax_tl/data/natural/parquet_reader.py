"""Hugging Face / flwr-datasets parquet files, partitioned by a column.

`flwrlabs/femnist`: `image` (Hugging Face's Image: a struct of PNG `bytes`
and `path`, 28x28 grey, paper white), `writer_id`, `character` (class 0-61,
LEAF's order); `flwrlabs/shakespeare`: `character_id`, `x` (80-character
window), `y` (the next character). A client is one value of the partition
column, in the order of its first row. These sets ship a train split only:
without a test file, each client's examples are split as LEAF splits them
(windows.split_indices: 90% train; Shakespeare's contiguously, FEMNIST's at
random, seeded).
"""

from __future__ import annotations

import io
import pathlib
from typing import Any, Iterator

import numpy as np

from fedjax_tl.data.natural import features
from fedjax_tl.data.natural.files import import_for
from fedjax_tl.data.natural.windows import join_windows, split_indices
from fedjax_tl.errors import DataError

COLUMNS = {"femnist": ("writer_id", "image", "character"),
           "shakespeare": ("character_id", "x", "y")}


class ParquetReader:
  """Parquet files read whole; `part` "all", or "train" / "test" of LEAF's
  per-client split (seeded by `seed`)."""

  def __init__(self, files: tuple[pathlib.Path, ...], kind: str,
               part: str = "all", seed: int = 0):
    if kind not in COLUMNS:
      raise DataError(f"{files[0]}: no parquet reader for {kind} (only "
                      f"{', '.join(COLUMNS)})")
    (self._pq,) = import_for("parquet", str(files[0]))
    self.files, self.kind, self.part, self.seed = files, kind, part, seed
    self._rows: dict[str, np.ndarray] | None = None
    self._columns: dict[str, list[Any]] = {}

  def _groups(self) -> dict[str, np.ndarray]:
    """Each client's row indices (its part of them), in first-row order."""
    if self._rows is None:
      self._columns = self._read_columns()
      by = np.asarray(self._columns[COLUMNS[self.kind][0]], dtype=object)
      ids, first, inverse = np.unique(by.astype(str), return_index=True,
                                      return_inverse=True)
      order = np.argsort(inverse, kind="stable")
      runs = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
      self._rows = {}
      for c in np.argsort(first):
        rows = runs[c]
        if self.part != "all":
          rng = np.random.default_rng([self.seed, int(c)])
          train, test = split_indices(len(rows), self.kind == "shakespeare",
                                      rng)
          rows = rows[train if self.part == "train" else test]
        self._rows[str(ids[c])] = rows
    return self._rows

  def _read_columns(self) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {name: [] for name in COLUMNS[self.kind]}
    for path in self.files:
      try:
        table = self._pq.read_table(path, columns=list(out))
      except Exception as e:  # pyarrow's ArrowInvalid, KeyError, OSError
        raise DataError(f"{path}: not a {self.kind} parquet file with "
                        f"columns {', '.join(out)} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from None
      for name in out:
        out[name] += table.column(name).to_pylist()
    return out

  def clients(self) -> list[tuple[str, int]]:
    """`(client id, rows)` of every client, in first-row order."""
    return [(c, len(rows)) for c, rows in self._groups().items()]

  def read(self, wanted: set[str] | None = None
           ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """`(client id, canonical features)` of the `wanted` clients."""
    for client_id, rows in self._groups().items():
      if wanted is None or client_id in wanted:
        where = f"{self.files[0]}: client {client_id!r}"
        yield client_id, self._examples(rows, where)

  def _examples(self, rows: np.ndarray, where: str) -> dict[str, np.ndarray]:
    _, first, second = COLUMNS[self.kind]
    a = [self._columns[first][i] for i in rows]
    b = [self._columns[second][i] for i in rows]
    if self.kind == "shakespeare":
      return {"text": join_windows(a, b, where)}
    pixels = np.stack([_png(image, f"{where} row {i}")
                       for i, image in zip(rows, a)]) if len(a) else (
                           np.zeros((0, 28, 28), np.uint8))
    pixels = features.floats(pixels, (28, 28), f"{where} image")
    label = np.asarray(b if b else np.zeros(0, np.int64))
    return {"x": (1.0 - pixels * np.float32(1 / 255))[..., None],
            "y": features.labels(label, f"{where} {second!r}")}


def _png(image: Any, where: str) -> np.ndarray:
  """A Hugging Face Image cell (`{"bytes": png, "path": ...}`) as uint8
  grey pixels."""
  data = image.get("bytes") if isinstance(image, dict) else image
  if not isinstance(data, bytes):
    raise DataError(f"{where}: image is {type(data).__name__}, expected "
                    "PNG bytes")
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(f'{where}: decoding images needs pillow: pip install '
                    '"fedjax-tl[natural]"') from None
  try:
    with Image.open(io.BytesIO(data)) as decoded:
      return np.asarray(decoded.convert("L"))
  except Exception as e:  # PIL raises many types for a damaged image
    raise DataError(f"{where}: not a readable image ({e})") from None
