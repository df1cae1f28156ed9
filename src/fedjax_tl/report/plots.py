"""The report's plots: accuracy curves, per-tier bars and sweep heat maps.

Draws with matplotlib's object API (no pyplot, so a notebook's backend is
left alone) into a Figure or Axes the caller makes and saves.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fedjax_tl.report.load import Run, Table
from fedjax_tl.report.sweep import (format_setting, ordered, sweep_axes,
                                    sweep_means)

_STYLES = ("-", "--", ":", "-.")

# x axis -> (name in titles, axis label, units as (name, size) or None).
X_AXES = {
    "round": ("rounds", "round", None),
    "sim_seconds": ("simulated time", "simulated time ({unit})",
                    (("s", 1.0), ("min", 60.0), ("h", 3600.0))),
    "bytes": ("communication", "communication, up + down ({unit})",
              (("B", 1.0), ("kB", 1e3), ("MB", 1e6), ("GB", 1e9),
               ("TB", 1e12))),
}


def _scale(values: np.ndarray, units: Sequence[tuple[str, float]]
           ) -> tuple[float, str]:
  """The largest unit (name, size) that keeps the maximum >= 1."""
  top = float(np.nanmax(values)) if np.size(values) else 0.0
  chosen = units[0]
  for unit in units:
    if top >= unit[1]:
      chosen = unit
  return chosen[1], chosen[0]


def _x_values(run: Run, x: str) -> np.ndarray:
  if x == "bytes":
    return np.array([r["bytes_up"] + r["bytes_down"] for r in run.records],
                    np.float64)
  return np.array([r[x] for r in run.records], np.float64)


def _one_run_axes(fig: Figure, run: Run, xv: np.ndarray,
                  tiers: Sequence[str]) -> list[Axes]:
  """One axes, a line per tier."""
  ax = fig.add_subplot()
  for tier in tiers:
    ax.plot(xv, [r["per_tier_accuracy"][tier] for r in run.records],
            marker="o", markersize=3, label=f"width {tier}")
  ax.legend(title="tier", fontsize="small")
  return [ax]


def _panel_per_tier(fig: Figure, runs: Sequence[Run],
                    xs: Sequence[np.ndarray], tiers: Sequence[str],
                    legend_title: str) -> list[Axes]:
  """A panel per tier, a line per run; returns the visible panels."""
  cols = min(len(tiers), 2)
  rows = -(-len(tiers) // cols)
  axes = fig.subplots(rows, cols, sharex=True, sharey=True,
                      squeeze=False).ravel().tolist()
  for ax in axes[len(tiers):]:
    ax.set_visible(False)
  for ax, tier in zip(axes, tiers):
    for i, (run, xv) in enumerate(zip(runs, xs)):
      if tier in run.tiers:
        # 10 colours x 4 line styles tell 40 runs apart.
        ax.plot(xv, [r["per_tier_accuracy"][tier] for r in run.records],
                color=f"C{i % 10}", linestyle=_STYLES[i // 10 % 4],
                marker="o", markersize=3, label=run.label)
    ax.set_title(f"tier width {tier}", fontsize="medium")
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, title=legend_title, loc="outside right upper",
             fontsize="small")
  return axes[:len(tiers)]


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
  name, label, units = X_AXES[x]
  xs = [_x_values(run, x) for run in runs]
  size, unit = (1.0, "") if units is None else _scale(np.concatenate(xs),
                                                        units)
  xs = [xv / size for xv in xs]
  tiers = list(dict.fromkeys(t for run in runs for t in run.tiers))
  if len(runs) == 1:
    axes = _one_run_axes(fig, runs[0], xs[0], tiers)
  else:
    axes = _panel_per_tier(fig, runs, xs, tiers, legend_title)
  for ax in axes:
    ax.set_xlabel(label.format(unit=unit))
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


def _heatmap_panel(fig: Figure, ax: Axes, grid: np.ndarray, name: str,
                   xs: Sequence, ys: Sequence) -> None:
  """Draws `grid` (rows ys, columns xs) with a colour bar and its values."""
  image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
  colorbar = fig.colorbar(image, ax=ax)
  colorbar.set_label(f"mean {name}")
  finite = grid[np.isfinite(grid)]
  middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
  for i in range(len(ys)):
    for j in range(len(xs)):
      if np.isfinite(grid[i, j]):
        # Dark text on the bright half of viridis, light on the dark half.
        ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center",
                fontsize="small",
                color="black" if grid[i, j] > middle else "white")
  ax.set_xticks(range(len(xs)), [format_setting(x) for x in xs])
  ax.set_yticks(range(len(ys)), [format_setting(y) for y in ys])


def plot_heatmap(fig: Figure, table: Table, title: str) -> tuple[str, str]:
  """Mean final and worst-tier accuracy over the two most-varied settings.

  Everything else (seeds, other settings) is averaged.

  Args:
    fig: the figure to draw in (empty); gets two panels.
    table: a sweep.csv.
    title: the figure's title, before the list of what is averaged.

  Returns:
    The (x, y) settings drawn; with one swept setting, y is None and the
    grid a single row.
  """
  axes = sweep_axes(table)
  x_axis = axes[0] if axes else None
  y_axis = axes[1] if len(axes) > 1 else None
  xs = ordered([r[x_axis] for r in table.rows]) if x_axis else [None]
  ys = ordered([r[y_axis] for r in table.rows]) if y_axis else [None]
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
    _heatmap_panel(fig, ax, grid, name, xs, ys)
    ax.set_xlabel(x_axis or "(no swept setting)")
    ax.set_ylabel(y_axis or "")
    ax.set_title(name)
  pooled = ["seeds"] + [a for a in axes[2:]]
  fig.suptitle(f"{title} (mean over {', '.join(pooled)})")
  return x_axis, y_axis
