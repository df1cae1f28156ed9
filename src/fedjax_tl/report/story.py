"""`report()`: reads every directory, then writes the PNGs and report.md.

A section per kind of directory (runs together, then each comparison, then
each sweep), each a markdown table followed by its plots.
"""

from __future__ import annotations

import pathlib
import re
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from fedjax_tl.errors import UserError
from fedjax_tl.report.load import Run, Table, classify, load_run, load_table
from fedjax_tl.report.markdown import compare_table, runs_table, sweep_table
from fedjax_tl.report.plots import (X_AXES, plot_accuracy, plot_heatmap,
                                    plot_tier_bars)


def _labels(paths: Sequence[pathlib.Path]) -> list[str]:
  """Short distinct names: the directory names, or paths where they clash."""
  names = [p.resolve().name or str(p) for p in paths]
  return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def _stem(label: str, taken: set[str]) -> str:
  """A file-name prefix for `label`, distinct from those in `taken`."""
  stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_.") or "dir"
  unique, n = stem, 2
  while unique in taken:
    unique, n = f"{stem}_{n}", n + 1
  taken.add(unique)
  return unique


def _bars_width(bars: int) -> float:
  """Figure inches for a bar chart: wider with more bars, within a page."""
  return float(np.clip(0.5 * bars, 6, 14))


def _save(fig: Figure, out: pathlib.Path, name: str,
          written: list[pathlib.Path]) -> str:
  fig.savefig(out / name, dpi=110)
  written.append(out / name)
  return name


def _curves(runs: Sequence[Run], out: pathlib.Path, prefix: str, what: str,
            written: list[pathlib.Path], legend_title: str = "run"
            ) -> list[str]:
  """The three accuracy-per-tier curves of `runs`; returns the PNG names."""
  names = []
  for x, file in (("round", "accuracy_vs_rounds"),
                  ("sim_seconds", "accuracy_vs_sim_time"),
                  ("bytes", "accuracy_vs_bytes")):
    fig = Figure(figsize=(7, 4.5) if len(runs) == 1 else (10, 7),
                 layout="constrained")
    name, _, _ = X_AXES[x]
    plot_accuracy(fig, runs, x, f"{what}: test accuracy per tier vs {name}",
                  legend_title)
    names.append(_save(fig, out, f"{prefix}{file}.png", written))
  return names


def _load_all(paths: Sequence[pathlib.Path], labels: Sequence[str]
              ) -> tuple[list[Run], list[tuple[Table, list[Run]]],
                         list[Table]]:
  """Every directory's results as (runs, compares, sweeps), in `paths` order.

  A compare directory comes with the run directories of its policies that
  exist. Reading everything first means a bad directory fails the report
  before any file is written.
  """
  runs, compares, sweeps = [], [], []
  for path, label in zip(paths, labels):
    kind = classify(path)
    if kind == "run":
      runs.append(load_run(path, label))
    elif kind == "compare":
      table = load_table(path / "comparison.csv", label,
                         ("policy", "accuracy", "worst_tier_accuracy"))
      policy_runs = [load_run(path / str(r["policy"]), str(r["policy"]))
                     for r in table.rows
                     if (path / str(r["policy"]) / "summary.json").is_file()]
      compares.append((table, policy_runs))
    else:
      sweeps.append(load_table(path / "sweep.csv", label,
                               ("accuracy", "worst_tier_accuracy")))
  return runs, compares, sweeps


def _out_dir(paths: Sequence[pathlib.Path],
             out: str | pathlib.Path | None) -> pathlib.Path:
  """The output directory, made: `out`, else DIR/report or ./report."""
  out = pathlib.Path(out) if out is not None else (
      paths[0] / "report" if len(paths) == 1 else pathlib.Path("report"))
  if out.exists() and not out.is_dir():
    raise UserError(f"report: --out={str(out)!r} is not a directory")
  out.mkdir(parents=True, exist_ok=True)
  return out


def _runs_section(runs: Sequence[Run], out: pathlib.Path,
                  written: list[pathlib.Path]) -> list[str]:
  """The run directories together: a table, curves and final-tier bars."""
  md = ["## Runs", "", "Final test accuracy of each tier's deployed model "
        "(3 places), communication and simulated time.", ""]
  md += runs_table(runs) + [""]
  md += [f"- {run.label}: `{run.path}`" for run in runs] + [""]
  what = runs[0].label if len(runs) == 1 else f"{len(runs)} runs"
  pngs = _curves(runs, out, "", what, written)
  fig = Figure(figsize=(_bars_width(len(runs) * len(runs[0].tiers)), 4.5),
               layout="constrained")
  tiers = list(dict.fromkeys(t for run in runs for t in run.tiers))
  plot_tier_bars(fig.add_subplot(), [r.label for r in runs], tiers,
                 [[r.summary["per_tier_accuracy"].get(t) for t in tiers]
                  for r in runs], f"Final test accuracy per tier ({what})",
                 start=[[r.records[0]["per_tier_accuracy"].get(t)
                         for t in tiers] for r in runs])
  pngs.append(_save(fig, out, "tier_accuracy.png", written))
  return md + [f"![{name}]({name})" for name in pngs] + [""]


def _compare_section(table: Table, policy_runs: Sequence[Run], stem: str,
                     out: pathlib.Path, written: list[pathlib.Path]
                     ) -> list[str]:
  """A compare directory: its table, per-policy bars and its runs' curves."""
  md = [f"## Comparison: {table.label}", "", f"`{table.path}`", ""]
  md += compare_table(table) + [""]
  fig = Figure(figsize=(_bars_width(len(table.rows) * len(table.tiers())),
                        4.5), layout="constrained")
  tiers = table.tiers()
  plot_tier_bars(fig.add_subplot(), [str(r["policy"]) for r in table.rows],
                 tiers, [[r[f"tier_{t}_accuracy"] for t in tiers]
                         for r in table.rows],
                 f"Final test accuracy per tier and policy ({table.label})",
                 legend_title="policy")
  pngs = [_save(fig, out, f"{stem}_tiers.png", written)]
  if policy_runs:
    pngs += _curves(policy_runs, out, f"{stem}_", table.label, written,
                    "policy")
  return md + [f"![{name}]({name})" for name in pngs] + [""]


def _sweep_section(table: Table, stem: str, out: pathlib.Path,
                   written: list[pathlib.Path]) -> list[str]:
  """A sweep directory: mean ± std per setting and the heat maps."""
  md = [f"## Sweep: {table.label}", "", f"`{table.path}`: "
        f"{len(table.rows)} runs; per setting, mean ± std over its seeds.", ""]
  md += sweep_table(table) + [""]
  fig = Figure(figsize=(12, 4.5), layout="constrained")
  plot_heatmap(fig, table, f"Sweep {table.label}")
  name = _save(fig, out, f"{stem}_heatmap.png", written)
  return md + [f"![{name}]({name})", ""]


def report(dirs: Sequence[str | pathlib.Path],
           out: str | pathlib.Path | None = None) -> list[pathlib.Path]:
  """Writes plots and `report.md` for run, compare and sweep directories.

  Run directories together: accuracy per tier vs rounds, simulated time and
  bytes (accuracy_vs_{rounds,sim_time,bytes}.png) and final per-tier bars
  (tier_accuracy.png). Each compare directory: per-tier bars per policy
  (NAME_tiers.png) and, from its policies' run directories, the three
  curves (NAME_accuracy_vs_*.png). Each sweep directory: heat maps of mean
  final and worst-tier accuracy over its two most-varied settings
  (NAME_heatmap.png). report.md tabulates every directory and embeds the
  PNGs.

  Args:
    dirs: the directories, of any kind, in the order to report them.
    out: where to write; default DIR/report for one directory, ./report for
      several.

  Returns:
    The files written, report.md first.

  Raises:
    UserError: a path that is not a directory or holds none of the result
      files; DataError (a UserError) for a malformed one. Both before
      anything is written.
  """
  paths = [pathlib.Path(d) for d in dirs]
  if not paths:
    raise UserError("report: no directory given")
  runs, compares, sweeps = _load_all(paths, _labels(paths))
  out = _out_dir(paths, out)

  written: list[pathlib.Path] = []
  taken: set[str] = {"report"}  # report.md's stem
  md = ["# fedjax-tl report", ""]
  if runs:
    md += _runs_section(runs, out, written)
  for table, policy_runs in compares:
    md += _compare_section(table, policy_runs, _stem(table.label, taken),
                           out, written)
  for table in sweeps:
    md += _sweep_section(table, _stem(table.label, taken), out, written)
  md += ["## Files", ""] + [f"- {p.name}" for p in written] + [""]
  (out / "report.md").write_text("\n".join(md))
  return [out / "report.md"] + written
