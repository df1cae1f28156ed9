"""`fedjax-tl report DIR [DIR...]`: PNG plots and a markdown summary.

Reads run directories (metrics.jsonl + summary.json), compare directories
(comparison.csv) and sweep directories (sweep.csv); draws with matplotlib's
object API (no pyplot, so a notebook's backend is left alone).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import re
from typing import Any, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fedjax_tl.errors import DataError, UserError

# sweep.csv columns that are results, not swept settings (besides `seed`).
_RESULT_COLUMN = re.compile(
    r"accuracy|loss|bytes|seconds|flops|wall|_(std|mean|min|max|spread)$")
_STYLES = ("-", "--", ":", "-.")


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
  """A run directory; its metrics.jsonl and summary.json must exist."""
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
  """A CSV results file with at least the `needed` columns."""
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


# ---------------------------------------------------------------- plotting

def _scale(values: np.ndarray, units: Sequence[tuple[str, float]]
           ) -> tuple[float, str]:
  """The largest unit (name, size) that keeps the maximum >= 1."""
  top = float(np.nanmax(values)) if np.size(values) else 0.0
  chosen = units[0]
  for unit in units:
    if top >= unit[1]:
      chosen = unit
  return chosen[1], chosen[0]


_X_AXES = {
    "round": ("rounds", "round", None),
    "sim_seconds": ("simulated time", "simulated time ({unit})",
                    (("s", 1.0), ("min", 60.0), ("h", 3600.0))),
    "bytes": ("communication", "communication, up + down ({unit})",
              (("B", 1.0), ("kB", 1e3), ("MB", 1e6), ("GB", 1e9),
               ("TB", 1e12))),
}


def _x_values(run: Run, x: str) -> np.ndarray:
  if x == "bytes":
    return np.array([r["bytes_up"] + r["bytes_down"] for r in run.records],
                    np.float64)
  return np.array([r[x] for r in run.records], np.float64)


def plot_accuracy(fig: Figure, runs: Sequence[Run], x: str = "round",
                  title: str | None = None, legend_title: str = "run"
                  ) -> None:
  """Per-tier test accuracy against rounds, simulated time or bytes.

  One run: one axes, a line per tier. Several: a panel per tier, a line per
  run (one colour each), so any number of runs stays readable.

  Args:
    fig: the figure to draw in (empty).
    runs: the runs to overlay.
    x: "round", "sim_seconds" or "bytes" (up + down).
    title: the figure's title; a default names the x axis.
    legend_title: what the runs are (several runs only).
  """
  name, label, units = _X_AXES[x]
  xs = [_x_values(run, x) for run in runs]
  size, unit = (1.0, "") if units is None else _scale(np.concatenate(xs),
                                                        units)
  xlabel = label.format(unit=unit)
  tiers = list(dict.fromkeys(t for run in runs for t in run.tiers))
  if len(runs) == 1:
    ax = fig.add_subplot()
    for tier in tiers:
      ax.plot(xs[0] / size, [r["per_tier_accuracy"][tier]
                             for r in runs[0].records],
              marker="o", markersize=3, label=f"width {tier}")
    ax.legend(title="tier", fontsize="small")
    axes = [ax]
  else:
    cols = min(len(tiers), 2)
    rows = -(-len(tiers) // cols)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True,
                        squeeze=False).ravel().tolist()
    for ax in axes[len(tiers):]:
      ax.set_visible(False)
    for ax, tier in zip(axes, tiers):
      for i, (run, xv) in enumerate(zip(runs, xs)):
        if tier in run.tiers:
          ax.plot(xv / size, [r["per_tier_accuracy"][tier]
                              for r in run.records],
                  color=f"C{i % 10}", linestyle=_STYLES[i // 10 % 4],
                  marker="o", markersize=3, label=run.label)
      ax.set_title(f"tier width {tier}", fontsize="medium")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title=legend_title, loc="outside right upper",
               fontsize="small")
    axes = axes[:len(tiers)]
  for ax in axes:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.label_outer()  # shared axes: labels on the outer panels only
  fig.suptitle(title or f"Test accuracy per tier vs {name}")


def plot_tier_bars(ax: Axes, names: Sequence[str], tiers: Sequence[str],
                   values: Sequence[Sequence[float | None]],
                   title: str, legend_title: str = "run",
                   start: Sequence[Sequence[float | None]] | None = None
                   ) -> None:
  """Grouped bars: a group per tier, a bar per name, its value on top.

  Args:
    ax: where to draw.
    names: the bars of each group (runs or policies).
    tiers: the groups, as tier names.
    values: `values[i][j]`, accuracy of `names[i]` on `tiers[j]` (None: not
      drawn).
    title: the axes title.
    legend_title: what the names are.
    start: like `values`, the accuracy before federated training, drawn as
      a black tick on each bar (None: no ticks).
  """
  width = 0.8 / max(len(names), 1)
  centres = np.arange(len(tiers))
  for i, (name, row) in enumerate(zip(names, values)):
    offsets = centres - 0.4 + width * (i + 0.5)
    kept = [(o, v) for o, v in zip(offsets, row) if v is not None]
    if not kept:
      continue
    bars = ax.bar([o for o, _ in kept], [v for _, v in kept], width,
                  label=name, color=f"C{i % 10}")
    if len(names) * len(tiers) <= 24:  # labels stay legible
      ax.bar_label(bars, fmt="%.3f", fontsize="x-small", padding=1)
    if start is not None:
      ticks = [(o, v) for o, v in zip(offsets, start[i]) if v is not None]
      ax.hlines([v for _, v in ticks], [o - width / 2 for o, _ in ticks],
                [o + width / 2 for o, _ in ticks], color="black",
                linewidth=2, zorder=3,
                label="before federated training" if i == 0 else None)
  ax.set_xticks(centres, [f"width {t}" for t in tiers])
  ax.set_xlabel("tier (deployed model's width)")
  ax.set_ylabel("final test accuracy")
  ax.set_ylim(0, 1.08)
  ax.set_title(title)
  ax.legend(title=legend_title, fontsize="small", loc="upper right",
            ncols=max(1, math.ceil(len(names) / 6)))
  ax.grid(axis="y", alpha=0.3)


def _format(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def _ordered(values: Sequence[Any]) -> list[Any]:
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


def plot_heatmap(fig: Figure, table: Table, title: str) -> tuple[str, str]:
  """Mean final and worst-tier accuracy over the two most-varied settings.

  Everything else (seeds, other settings) is averaged. Returns the (x, y)
  settings drawn; with one swept setting, y is a single row.
  """
  axes = sweep_axes(table)
  x_axis = axes[0] if axes else None
  y_axis = axes[1] if len(axes) > 1 else None
  xs = _ordered([r[x_axis] for r in table.rows]) if x_axis else [None]
  ys = _ordered([r[y_axis] for r in table.rows]) if y_axis else [None]
  panels = fig.subplots(1, 2, squeeze=False)[0]
  for ax, metric, name in zip(panels, ("accuracy", "worst_tier_accuracy"),
                              ("final accuracy", "worst-tier accuracy")):
    groups = sweep_means(table, [a for a in (y_axis, x_axis) if a], metric)
    grid = np.full((len(ys), len(xs)), np.nan)
    for i, y in enumerate(ys):
      for j, x in enumerate(xs):
        key = tuple(v for v, a in ((y, y_axis), (x, x_axis)) if a)
        if key in groups:
          grid[i, j] = np.mean(groups[key])
    image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label(f"mean {name}")
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(ys)):
      for j in range(len(xs)):
        if np.isfinite(grid[i, j]):
          ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center",
                  fontsize="small",
                  color="black" if grid[i, j] > middle else "white")
    ax.set_xticks(range(len(xs)), [_format(x) for x in xs])
    ax.set_yticks(range(len(ys)), [_format(y) for y in ys])
    ax.set_xlabel(x_axis or "(no swept setting)")
    ax.set_ylabel(y_axis or "")
    ax.set_title(name)
  pooled = ["seeds"] + [a for a in axes[2:]]
  fig.suptitle(f"{title} (mean over {', '.join(pooled)})")
  return x_axis, y_axis


# ---------------------------------------------------------------- markdown

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
    cells = [_format(v) for v in key] + [str(len(values))]
    for m in metrics:
      v = np.asarray(stats[m].get(key, []), np.float64)
      cells.append("-" if not v.size else
                   f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if v.size > 1 else
                   f"{v.mean():.3f}")
    rows.append(cells)
  return _table(header, rows)


# ---------------------------------------------------------------- report

def _labels(paths: Sequence[pathlib.Path]) -> list[str]:
  """Short distinct names: the directory names, or paths where they clash."""
  names = [p.resolve().name or str(p) for p in paths]
  return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def _stem(label: str, taken: set[str]) -> str:
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
    name, _, _ = _X_AXES[x]
    plot_accuracy(fig, runs, x, f"{what}: test accuracy per tier vs {name}",
                  legend_title)
    names.append(_save(fig, out, f"{prefix}{file}.png", written))
  return names


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
  labels = _labels(paths)
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
  out = pathlib.Path(out) if out is not None else (
      paths[0] / "report" if len(paths) == 1 else pathlib.Path("report"))
  if out.exists() and not out.is_dir():
    raise UserError(f"report: --out={str(out)!r} is not a directory")
  out.mkdir(parents=True, exist_ok=True)

  written: list[pathlib.Path] = []
  taken: set[str] = {"report"}
  md = ["# fedjax-tl report", ""]
  if runs:
    md += ["## Runs", "", "Final test accuracy of each tier's deployed model "
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
    md += [f"![{name}]({name})" for name in pngs] + [""]
  for table, policy_runs in compares:
    stem = _stem(table.label, taken)
    md += [f"## Comparison: {table.label}", "", f"`{table.path}`", ""]
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
    md += [f"![{name}]({name})" for name in pngs] + [""]
  for table in sweeps:
    stem = _stem(table.label, taken)
    md += [f"## Sweep: {table.label}", "", f"`{table.path}`: "
           f"{len(table.rows)} runs; per setting, mean ± std over its seeds.",
           ""]
    md += sweep_table(table) + [""]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    plot_heatmap(fig, table, f"Sweep {table.label}")
    name = _save(fig, out, f"{stem}_heatmap.png", written)
    md += [f"![{name}]({name})", ""]
  md += ["## Files", ""] + [f"- {p.name}" for p in written] + [""]
  (out / "report.md").write_text("\n".join(md))
  return [out / "report.md"] + written
