"""LEAF's Shakespeare examples (80-character windows and the next character)
back into each role's text, and the per-client train/test split of sources
that ship one split only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedjax_tl.errors import DataError


def join_windows(xs: Sequence[str], ys: Sequence[str], where: str
                 ) -> np.ndarray:
  """Snippets (object array of str) from windows `xs` and next characters
  `ys`: each run of consecutive windows (`xs[i + 1] == xs[i][1:] + ys[i]`,
  LEAF's stride 1) is one snippet, `xs[start] + ys[start] + ...`."""
  if len(xs) != len(ys):
    raise DataError(f"{where}: {len(xs)} x but {len(ys)} y")
  snippets: list[str] = []
  parts: list[str] = []
  window = None
  for i, (x, y) in enumerate(zip(xs, ys)):
    if not isinstance(x, str) or not isinstance(y, str) or len(y) != 1:
      raise DataError(f"{where}: example {i} is x={str(x)[:20]!r}, "
                      f"y={str(y)[:20]!r}; expected a string and one "
                      "character")
    if x != window:
      if parts:
        snippets.append("".join(parts))
      parts = [x]
    parts.append(y)
    window = x[1:] + y
  if parts:
    snippets.append("".join(parts))
  out = np.empty(len(snippets), dtype=object)
  out[:] = snippets
  return out


def split_indices(n: int, contiguous: bool, rng: np.random.Generator,
                  window: int = 80) -> tuple[np.ndarray, np.ndarray]:
  """LEAF's split of one client's `n` examples (utils/split_data.py,
  `--sf 0.9`): `max(1, int(0.9 n))` train examples (1 of 2); the rest test.

  `contiguous` (Shakespeare's windows): train the first ones, test those
  from `n_train + window - 1` on (no window overlaps a train one); else a
  random train subset (sorted), test the others. A client of one example is
  train only.
  """
  if n < 2:
    return np.arange(n), np.arange(0)
  n_train = 1 if n == 2 else max(1, int(0.9 * n))
  if contiguous:
    return np.arange(n_train), np.arange(n_train + window - 1, n)
  train = np.sort(rng.choice(n, n_train, replace=False))
  return train, np.setdiff1d(np.arange(n), train)
