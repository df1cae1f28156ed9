"""Reading a sweep.csv's structure: which columns are swept settings.

Shared by the heat maps and the markdown sweep table, which both group a
sweep's rows by setting and pool everything else.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from fedjax_tl.report.load import Table

# sweep.csv columns that are results, not swept settings (besides `seed`).
_RESULT_COLUMN = re.compile(
    r"accuracy|loss|bytes|seconds|flops|wall|_(std|mean|min|max|spread)$|"
    r"^(schema_version|dp_(epsilon|delta|clip_norm|overflow))$")


def format_setting(value: Any) -> str:
  """A setting's value as a label: `%g` for a number, else its text."""
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def ordered(values: Sequence[Any]) -> list[Any]:
  """Distinct values: sorted when all numbers, else in order of appearance."""
  distinct = list(dict.fromkeys(values))
  if all(isinstance(v, float) for v in distinct):
    return sorted(distinct)
  return distinct


def sweep_axes(table: Table) -> list[str]:
  """The swept settings of sweep.csv, most distinct values first.

  Every column that is neither `seed` nor a result (accuracy, loss, bytes,
  seconds, ...) is a setting; columns new to sweep.csv are classified the
  same way. Ties keep the file's column order.
  """
  axes = [c for c in table.columns
          if c != "seed" and not _RESULT_COLUMN.search(c)]
  counts = {c: len({r[c] for r in table.rows}) for c in axes}
  return sorted(axes, key=lambda c: -counts[c])


def sweep_means(table: Table, axes: Sequence[str], metric: str
                ) -> dict[tuple[Any, ...], list[float]]:
  """The `metric` values of each setting of `axes` (other columns pooled)."""
  groups: dict[tuple[Any, ...], list[float]] = {}
  for row in table.rows:
    if row.get(metric) is not None:
      groups.setdefault(tuple(row[a] for a in axes), []).append(row[metric])
  return groups
