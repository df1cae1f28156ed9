"""The report's markdown tables: runs, a comparison, a sweep.

Each function returns the table's lines; accuracies get 3 decimal places,
bytes and seconds 4 significant digits.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from fedjax_tl.report.load import Run, Table
from fedjax_tl.report.sweep import format_setting, sweep_axes, sweep_means


def _cell(value: Any) -> str:
  """A table cell: 3 decimal places for a number, "-" when missing."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if isinstance(value, float):
    return f"{value:.3f}"
  return str(value)


def _significant(value: float | None) -> str:
  """Bytes and seconds span orders of magnitude: 4 significant digits."""
  return "-" if value is None else f"{value:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] +
          ["| " + " | ".join(row) + " |" for row in rows])


def runs_table(runs: Sequence[Run]) -> list[str]:
  """One row per run: settings, final accuracies (3 places), MB, seconds."""
  tiers = list(dict.fromkeys(t for run in runs for t in run.tiers))
  header = (["run", "policy", "algorithm", "rounds", "accuracy",
             "worst tier"] + [f"tier {t}" for t in tiers] +
            ["MB up + down", "simulated s"])
  rows = []
  for run in runs:
    s = run.summary
    rows.append([run.label, str(s.get("policy", "-")),
                 str(s.get("algorithm", "-")), str(s.get("rounds", "-")),
                 _cell(s["accuracy"]), _cell(s["worst_tier_accuracy"])] +
                [_cell(s["per_tier_accuracy"].get(t)) for t in tiers] +
                [_significant((s["bytes_up"] + s["bytes_down"]) / 1e6),
                 _significant(s["sim_seconds"])])
  return _table(header, rows)


def compare_table(table: Table) -> list[str]:
  """comparison.csv's accuracies (3 places) and MB, one row per policy."""
  tiers = table.tiers()
  header = (["policy", "accuracy", "worst tier"] +
            [f"tier {t}" for t in tiers] + ["MB up + down", "simulated s"])
  rows = [[str(r["policy"]), _cell(r["accuracy"]),
           _cell(r["worst_tier_accuracy"])] +
          [_cell(r[f"tier_{t}_accuracy"]) for t in tiers] +
          [_significant(((r.get("bytes_up") or 0) +
                         (r.get("bytes_down") or 0)) / 1e6),
           _significant(r.get("sim_seconds"))] for r in table.rows]
  return _table(header, rows)


def sweep_table(table: Table) -> list[str]:
  """One row per setting: mean and std over its rows (seeds)."""
  axes = [a for a in sweep_axes(table)
          if len({r[a] for r in table.rows}) > 1]
  metrics = ["accuracy", "worst_tier_accuracy"]
  stats = {m: sweep_means(table, axes, m) for m in metrics}
  header = axes + ["seeds", "accuracy (mean ± std)",
                   "worst tier (mean ± std)"]
  rows = []
  for key, values in stats["accuracy"].items():
    cells = [format_setting(v) for v in key] + [str(len(values))]
    for m in metrics:
      v = np.asarray(stats[m].get(key, []), np.float64)
      cells.append("-" if not v.size else
                   f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if v.size > 1 else
                   f"{v.mean():.3f}")
    rows.append(cells)
  return _table(header, rows)
