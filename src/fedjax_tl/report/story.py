"""`report()`: reads every directory, then writes the plots (PNG and SVG),
report.md and report.html.

A section per kind of directory (runs together, then each comparison, then
each sweep), each its tables followed by its plots.
"""

from __future__ import annotations

import io
import pathlib
import re
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from fedjax_tl import files, schema
from fedjax_tl.errors import UserError
from fedjax_tl.report.html import write_html
from fedjax_tl.report.load import Run, Table, classify, load_run, load_table
from fedjax_tl.report.markdown import (compare_table, runs_table, sweep_table,
                                       tier_table)
from fedjax_tl.report.plots import (COSTS, X_AXES, plot_accuracy,
                                    plot_heatmap, plot_pareto, plot_tier_bars)
from fedjax_tl.report.sweep import format_setting, sweep_axes

# Fonts that stay readable when a figure fills a slide.
SLIDE_STYLE = {"font.size": 13, "axes.titlesize": 14, "axes.labelsize": 13,
               "legend.fontsize": 12, "xtick.labelsize": 12,
               "ytick.labelsize": 12, "figure.titlesize": 16,
               "svg.hashsalt": "fedjax-tl"}


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
  """Saves `fig` as NAME.png and NAME.svg, each whole or not at all
  (`files.write_bytes_atomic`); returns the PNG's name."""
  for suffix, options in (("png", {"dpi": 110}),
                          ("svg", {"metadata": {"Date": None}})):
    image = io.BytesIO()
    fig.savefig(image, format=suffix, **options)
    files.write_bytes_atomic(out / f"{name}.{suffix}", image.getvalue())
    written.append(out / f"{name}.{suffix}")
  return f"{name}.png"


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
    names.append(_save(fig, out, f"{prefix}{file}", written))
  return names


def _load_all(paths: Sequence[pathlib.Path], labels: Sequence[str]
              ) -> tuple[list[Run], list[tuple[Table, list[dict] | None,
                                               list[Run]]], list[Table]]:
  """Every directory's results as (runs, compares, sweeps), in `paths` order.

  A compare directory comes with comparison_tiers.csv's rows (None for a
  directory written before it existed) and the run directories of its
  policies that exist. Reading everything first means a bad directory
  fails the report before any file is written.
  """
  runs, compares, sweeps = [], [], []
  for path, label in zip(paths, labels):
    kind = classify(path)
    if kind == "run":
      runs.append(load_run(path, label))
    elif kind == "compare":
      table = load_table(path / "comparison.csv", label,
                         ("policy", "accuracy", "worst_tier_accuracy"))
      tiers = path / "comparison_tiers.csv"
      tier_rows = None if not tiers.is_file() else [
          {**r, "tier": format_setting(r["tier"])}  # "1", not 1.0
          for r in load_table(tiers, label,
                              ("policy", "tier", "accuracy")).rows]
      policy_runs = [load_run(path / str(r["policy"]), str(r["policy"]))
                     for r in table.rows
                     if (path / str(r["policy"]) / "summary.json").is_file()]
      compares.append((table, tier_rows, policy_runs))
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
  md += ["What each tier's devices hold, run and send (docs/outputs.md; "
         "\"-\": not in an older summary.json).", ""]
  md += tier_table([{"run": run.label, **row} for run in runs
                    for row in schema.tier_rows(run.summary)], "run") + [""]
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
  pngs.append(_save(fig, out, "tier_accuracy", written))
  return md + [f"![{name}]({name})" for name in pngs] + [""]


def _compare_section(table: Table, tier_rows: list[dict] | None,
                     policy_runs: Sequence[Run], stem: str,
                     out: pathlib.Path, written: list[pathlib.Path]
                     ) -> list[str]:
  """A compare directory: its tables, each tier's accuracy against its own
  cost (bytes, memory, time), per-policy bars and its runs' curves."""
  md = [f"## Comparison: {table.label}", "", f"`{table.path}`", ""]
  md += compare_table(table) + [""]
  pngs = []
  if tier_rows is None:
    md += ["No per-tier costs: this comparison.csv predates "
           "comparison_tiers.csv (schema version 1); rerun the same "
           "`fedjax-tl compare` command to add them (finished runs are not "
           "run again).", ""]
  else:
    md += ["Per tier: accuracy before federated training and final, and "
           "what the tier's devices hold, run and send.", ""]
    md += tier_table(tier_rows, "policy") + [""]
    best = {}
    for cost, (_, _, _, what) in COSTS.items():
      fig = Figure(figsize=(13, 9), layout="constrained")
      best = plot_pareto(fig, tier_rows, cost, f"{table.label}: each tier's "
                         f"final accuracy vs its own {what}")
      pngs.append(_save(fig, out, f"{stem}_pareto_{cost}", written))
    md += ["Most accurate policy per tier (★ in the figures; the dashed "
           "line is the Pareto front, the best accuracy at each cost): " +
           ", ".join(f"tier {t}: {p}" for t, p in best.items()) + ".", ""]
  fig = Figure(figsize=(_bars_width(len(table.rows) * len(table.tiers())),
                        4.5), layout="constrained")
  tiers = table.tiers()
  plot_tier_bars(fig.add_subplot(), [str(r["policy"]) for r in table.rows],
                 tiers, [[r[f"tier_{t}_accuracy"] for t in tiers]
                         for r in table.rows],
                 f"Final test accuracy per tier and policy ({table.label})",
                 legend_title="policy")
  pngs.append(_save(fig, out, f"{stem}_tiers", written))
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
  fig = Figure(figsize=(14, 6), layout="constrained")
  axes = sweep_axes(table)[:2]
  plot_heatmap(fig, table, f"Sweep of {' × '.join(axes) or 'seeds'} "
               f"({table.label})")
  name = _save(fig, out, f"{stem}_heatmap", written)
  return md + [f"![{name}]({name})", ""]


def report(dirs: Sequence[str | pathlib.Path],
           out: str | pathlib.Path | None = None) -> list[pathlib.Path]:
  """Writes plots, `report.md` and `report.html` for run, compare and sweep
  directories.

  Run directories together: accuracy per tier vs rounds, simulated time and
  bytes (accuracy_vs_{rounds,sim_time,bytes}) and final per-tier bars
  (tier_accuracy). Each compare directory: each tier's final accuracy
  against that tier's own traffic, training memory and simulated round
  time, with the Pareto front and the best policy
  (NAME_pareto_{bytes,memory,time}), per-tier bars per policy (NAME_tiers)
  and, from its policies' run directories, the three curves
  (NAME_accuracy_vs_*). Each sweep directory: heat maps of final and
  worst-tier accuracy, mean ± std over seeds, over its two most-varied
  settings (NAME_heatmap). Every plot is a PNG and an SVG. report.md
  tabulates every directory (per-tier costs included) and embeds the PNGs;
  report.html is the same in one self-contained file (PNGs inline, no
  network).

  Args:
    dirs: the directories, of any kind, in the order to report them.
    out: where to write; default DIR/report for one directory, ./report for
      several.

  Returns:
    The files written, report.md and report.html first.

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
  taken: set[str] = {"report"}  # report.md's and report.html's stem
  md = ["# fedjax-tl report", ""]
  with matplotlib.rc_context(SLIDE_STYLE):
    if runs:
      md += _runs_section(runs, out, written)
    for table, tier_rows, policy_runs in compares:
      md += _compare_section(table, tier_rows, policy_runs,
                             _stem(table.label, taken), out, written)
    for table in sweeps:
      md += _sweep_section(table, _stem(table.label, taken), out, written)
  md += ["## Files", ""] + [f"- {p.name}" for p in written] + [""]
  files.write_text_atomic(out / "report.md", "\n".join(md))
  write_html(md, out, out / "report.html")
  return [out / "report.md", out / "report.html"] + written
