"""Reading result directories for `fedjax-tl report`.

A run directory holds metrics.jsonl + summary.json, a compare directory
comparison.csv (and, from schema version 2, comparison_tiers.csv), a sweep
directory sweep.csv; malformed files, or files of a newer schema version,
raise DataError.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
from typing import Any, Sequence

from fedjax_tl import schema
from fedjax_tl.errors import DataError, UserError


@dataclasses.dataclass(frozen=True)
class Run:
  """A run directory's results: `label` names it in legends and tables."""
  label: str
  path: pathlib.Path
  summary: dict[str, Any]
  records: list[dict[str, Any]]

  @property
  def tiers(self) -> list[str]:
    return list(self.summary["per_tier_accuracy"])


@dataclasses.dataclass(frozen=True)
class Table:
  """A CSV results table (comparison.csv or sweep.csv): rows of values."""
  label: str
  path: pathlib.Path
  columns: list[str]
  rows: list[dict[str, Any]]

  def tiers(self) -> list[str]:
    """Tier names, from the `tier_<name>_accuracy` columns."""
    return [c[len("tier_"):-len("_accuracy")] for c in self.columns
            if c.startswith("tier_") and c.endswith("_accuracy")]


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f"{str(path)!r}: malformed JSON ({e})") from None


def load_run(path: pathlib.Path, label: str) -> Run:
  """Reads a run directory.

  Args:
    path: the directory; its metrics.jsonl and summary.json must exist.
    label: the name to give it in legends and tables.

  Returns:
    The run's summary and evaluation records.

  Raises:
    UserError: a file is missing; DataError (a UserError) for a malformed
      one.
  """
  for name in ("metrics.jsonl", "summary.json"):
    if not (path / name).is_file():
      raise UserError(f"report: {str(path)!r} has no {name} (a run directory "
                      "holds metrics.jsonl and summary.json)")
  summary = _read_json(path / "summary.json")
  try:
    records = [json.loads(line) for line in
               (path / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
  except json.JSONDecodeError as e:
    raise DataError(f"{str(path / 'metrics.jsonl')!r}: malformed JSON ({e})"
                    ) from None
  if not isinstance(summary, dict) or "per_tier_accuracy" not in summary:
    raise DataError(f"{str(path / 'summary.json')!r}: no per_tier_accuracy")
  schema.version(summary, repr(str(path / "summary.json")))
  if not records or any("per_tier_accuracy" not in r for r in records):
    raise DataError(f"{str(path / 'metrics.jsonl')!r}: no evaluation records "
                    "with per_tier_accuracy")
  return Run(label, path, summary, records)


def _number(text: str) -> Any:
  """A CSV cell as a float where it is one (empty -> None), else the text."""
  if text == "":
    return None
  try:
    return float(text)
  except ValueError:
    return text


def load_table(path: pathlib.Path, label: str,
               needed: Sequence[str]) -> Table:
  """Reads a CSV results file (comparison.csv or sweep.csv).

  Args:
    path: the CSV file.
    label: the name to give it in headings and titles.
    needed: columns it must have.

  Returns:
    Its columns and rows, numbers as floats and empty cells as None.

  Raises:
    DataError: malformed CSV, a `needed` column missing, or no rows.
  """
  try:
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      rows = [{k: _number(v or "") for k, v in row.items()} for row in reader]
      columns = list(reader.fieldnames or [])
  except (csv.Error, UnicodeDecodeError) as e:
    raise DataError(f"{str(path)!r}: malformed CSV ({e})") from None
  missing = [c for c in needed if c not in columns]
  if missing or not rows:
    raise DataError(f"{str(path)!r}: " + (f"no column {missing[0]!r}"
                                          if missing else "no rows"))
  for row in rows:
    schema.version(row, repr(str(path)))
  return Table(label, path, columns, rows)


def classify(path: pathlib.Path) -> str:
  """What a directory holds: "sweep", "compare" or "run".

  Raises:
    UserError: it is not a directory, or holds none of the three.
  """
  if not path.is_dir():
    raise UserError(f"report: {str(path)!r} is not a directory")
  if (path / "sweep.csv").is_file():
    return "sweep"
  if (path / "comparison.csv").is_file():
    return "compare"
  if (path / "metrics.jsonl").is_file() or (path / "summary.json").is_file():
    return "run"
  raise UserError(f"report: {str(path)!r} holds no metrics.jsonl + "
                  "summary.json (run), comparison.csv (compare) or sweep.csv "
                  "(sweep)")
