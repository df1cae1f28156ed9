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
  """comparison.csv's accuracies (3 places), MB, simulated seconds and the
  server's own cost (GFLOP), one row per policy."""
  tiers = table.tiers()
  header = (["policy", "accuracy", "worst tier"] +
            [f"tier {t}" for t in tiers] +
            ["MB up + down", "simulated s", "slowest tier", "server GFLOP"])
  rows = [[str(r["policy"]), _cell(r["accuracy"]),
           _cell(r["worst_tier_accuracy"])] +
          [_cell(r[f"tier_{t}_accuracy"]) for t in tiers] +
          [_significant(((r.get("bytes_up") or 0) +
                         (r.get("bytes_down") or 0)) / 1e6),
           _significant(r.get("sim_seconds")),
           "-" if r.get("slowest_tier") is None else
           format_setting(r["slowest_tier"]),  # a tier name read as 0.5
           _significant(_scaled(r.get("server_flops"), 1e9))]
          for r in table.rows]
  return _table(header, rows)


def _scaled(value: float | None, unit: float) -> float | None:
  return None if value is None else value / unit


def _sum(*values: float | None) -> float | None:
  return None if any(v is None for v in values) else sum(values)


def _byte_unit(values: Sequence[float | None]) -> tuple[str, float]:
  """kB, MB or GB: the largest unit that keeps a column's top value >= 1."""
  top = max((v for v in values if v is not None), default=0.0)
  return next(((name, size) for name, size in (("GB", 1e9), ("MB", 1e6))
               if top >= size), ("kB", 1e3))


def tier_table(rows: Sequence[dict[str, Any]], name: str) -> list[str]:
  """Each tier's accuracy and cost, one row per (`name`, tier).

  `rows`: comparison_tiers.csv's rows (or `schema.tier_rows` with `name`
  added): accuracy before federated training and final, deployed
  parameters and bytes, training memory, MFLOP per local step, bytes down
  and up per round (the tier's clients together, mean over rounds) and in
  total, and simulated seconds of a round on the tier's devices (the
  slowest tier's marked). Each byte column in one unit (kB, MB or GB, in
  its header); missing figures (older files) show as "-".
  """
  byte_columns = {
      "model": [r.get("model_bytes") for r in rows],
      "train memory": [r.get("train_memory_bytes") for r in rows],
      "down / round": [r.get("bytes_down_per_round") for r in rows],
      "up / round": [r.get("bytes_up_per_round") for r in rows],
      "down + up total": [_sum(r.get("bytes_down"), r.get("bytes_up"))
                          for r in rows]}
  units = {k: _byte_unit(v) for k, v in byte_columns.items()}
  header = ([name, "tier", "accuracy (start → final)", "params"] +
            [f"{k} {units[k][0]}" for k in byte_columns] +
            ["MFLOP / step", "s / round"])
  table = []
  for i, r in enumerate(rows):
    seconds = _significant(r.get("round_seconds"))
    if r.get("slowest") in (True, "True", 1.0):
      seconds += " (slowest)"
    table.append(
        [str(r[name]), str(r["tier"]),
         f"{_cell(r.get('initial_accuracy'))} → {_cell(r.get('accuracy'))}",
         "-" if r.get("params") is None else f"{int(r['params']):,}"] +
        [_significant(_scaled(v[i], units[k][1]))
         for k, v in byte_columns.items()] +
        [_significant(_scaled(r.get("train_flops_per_step"), 1e6)), seconds])
  return _table(header, table)


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
