"""The report's plots: accuracy curves, per-tier bars, accuracy against each
tier's own cost (Pareto fronts) and sweep heat maps.

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


def _heatmap_panel(fig: Figure, ax: Axes, groups: dict[tuple, list[float]],
                   keys: np.ndarray, name: str, baseline: float,
                   baseline_what: str, xs: Sequence, ys: Sequence) -> None:
  """Draws the mean of each cell's values (rows ys, columns xs), coloured
  from `baseline` up, each cell annotated `mean ± std (n)`.

  `keys[i, j]` is the `groups` key of cell (i, j), None where no run is.
  """
  mean = np.full(keys.shape, np.nan)
  for index, key in np.ndenumerate(keys):
    if key is not None and key in groups:
      mean[index] = np.mean(groups[key])
  finite = mean[np.isfinite(mean)]
  top = max(float(finite.max()) if finite.size else baseline, baseline + 1e-9)
  image = ax.imshow(mean, cmap="viridis", aspect="auto", origin="lower",
                    vmin=baseline, vmax=top)
  below = finite.size and finite.min() < baseline
  colorbar = fig.colorbar(image, ax=ax, extend="min" if below else "neither")
  colorbar.set_label(f"mean {name}\n(colour from {baseline:.3f}: "
                     f"{baseline_what})")
  middle = (baseline + top) / 2
  for (i, j), key in np.ndenumerate(keys):
    if not np.isfinite(mean[i, j]):
      continue
    values = np.asarray(groups[key], np.float64)
    spread = (f"\n± {values.std(ddof=1):.3f}" if values.size > 1 else "")
    # Dark text on the bright half of viridis, light on the dark half.
    ax.text(j, i, f"{mean[i, j]:.3f}{spread}\n(n={values.size})",
            ha="center", va="center", fontsize="small",
            color="black" if mean[i, j] > middle else "white")
  ax.set_xticks(range(len(xs)), [format_setting(x) for x in xs])
  ax.set_yticks(range(len(ys)), [format_setting(y) for y in ys])


def _baseline(table: Table, metric: str, groups: dict[tuple, list[float]]
              ) -> tuple[float, str]:
  """Where a heat map's colours start, and what that value is: the mean
  accuracy before federated training where sweep.csv has it
  (`initial_<metric>`), else the lowest cell mean."""
  start = [r[f"initial_{metric}"] for r in table.rows
           if isinstance(r.get(f"initial_{metric}"), float)]
  if start:
    return float(np.mean(start)), "before federated training"
  means = [np.mean(v) for v in groups.values()]
  return (float(min(means)) if means else 0.0), "the lowest cell"


def plot_heatmap(fig: Figure, table: Table, title: str) -> tuple[str, str]:
  """Final and worst-tier accuracy over the two most-varied settings: each
  cell's mean, spread (sample std) and count of runs (seeds, and any other
  settings pooled), colours from the accuracy before federated training
  (the lowest cell's mean for a sweep.csv without it).

  Args:
    fig: the figure to draw in (empty); gets two panels.
    table: a sweep.csv.
    title: the figure's title, before what is pooled.

  Returns:
    The (x, y) settings drawn; with one swept setting, y is None and the
    grid a single row.
  """
  axes = sweep_axes(table)
  x_axis = axes[0] if axes else None
  y_axis = axes[1] if len(axes) > 1 else None
  xs = ordered([r[x_axis] for r in table.rows]) if x_axis else [None]
  ys = ordered([r[y_axis] for r in table.rows]) if y_axis else [None]
  keys = np.empty((len(ys), len(xs)), object)
  for i, y in enumerate(ys):
    for j, x in enumerate(xs):
      keys[i, j] = tuple(v for v, a in ((y, y_axis), (x, x_axis)) if a)
  panels = fig.subplots(1, 2, squeeze=False)[0]
  for ax, metric, name in zip(panels, ("accuracy", "worst_tier_accuracy"),
                              ("final accuracy", "worst-tier accuracy")):
    groups = sweep_means(table, [a for a in (y_axis, x_axis) if a], metric)
    baseline, what = _baseline(table, metric, groups)
    _heatmap_panel(fig, ax, groups, keys, name, baseline, what, xs, ys)
    ax.set_xlabel(x_axis or "(no swept setting)")
    ax.set_ylabel(y_axis or "")
    ax.set_title(name)
  seeds = len({r.get("seed") for r in table.rows})
  pooled = f"{seeds} seed{'s' * (seeds != 1)}" + "".join(
      f", {a}" for a in axes[2:] if len({r[a] for r in table.rows}) > 1)
  fig.suptitle(f"{title}: mean ± std over {pooled} (n runs per cell)")
  return x_axis, y_axis


# Pareto plot cost -> (comparison_tiers.csv columns summed, axis label,
# units, title).
COSTS = {
    "bytes": (("bytes_down", "bytes_up"),
              "the tier's download + upload, all rounds ({unit})",
              X_AXES["bytes"][2], "communication"),
    "memory": (("train_memory_bytes",), "training memory per device ({unit})",
               (("B", 1.0), ("kB", 1e3), ("MB", 1e6), ("GB", 1e9)),
               "device memory"),
    "time": (("round_seconds",), "simulated seconds per round on the "
             "tier's devices ({unit})", X_AXES["sim_seconds"][2],
             "simulated time"),
}


def pareto_front(costs: Sequence[float], accuracies: Sequence[float]
                 ) -> list[int]:
  """Indices of the points no other point beats: none has a cost as low
  and an accuracy as high, one of them strictly. Ordered by cost; NaN
  points are never on it; equal points are kept together.
  """
  points = [(float(c), -float(a), i) for i, (c, a) in
            enumerate(zip(costs, accuracies))
            if np.isfinite(c) and np.isfinite(a)]
  front: list[int] = []
  best = last = None
  for c, negative, i in sorted(points):
    a = -negative
    if best is None or a > best or (a == best and (c, a) == last):
      front.append(i)
      best, last = a, (c, a)
  return front


def best_policy(costs: Sequence[float], accuracies: Sequence[float]
                ) -> int | None:
  """The index of the most accurate point (ties: the cheaper, then the
  first); None when no point has an accuracy."""
  ranked = [(-float(a), float(c) if np.isfinite(c) else np.inf, i)
            for i, (c, a) in enumerate(zip(costs, accuracies))
            if np.isfinite(a)]
  return min(ranked)[2] if ranked else None


def plot_pareto(fig: Figure, rows: Sequence[dict], cost: str,
                title: str) -> dict[str, str | None]:
  """Each tier's final accuracy against that tier's own cost, a panel per
  tier, each policy a point (one colour each), the Pareto front (highest
  accuracy for the lowest cost) drawn and named, the best policy marked.

  Args:
    fig: the figure to draw in (empty).
    rows: comparison_tiers.csv's rows (`policy`, `tier`, `accuracy` and the
      cost columns).
    cost: "bytes", "memory" or "time" (:data:`COSTS`).
    title: the figure's title.

  Returns:
    The best policy of each tier (None where no policy has an accuracy).
  """
  columns, label, units, _ = COSTS[cost]
  tiers = list(dict.fromkeys(str(r["tier"]) for r in rows))
  policies = list(dict.fromkeys(str(r["policy"]) for r in rows))

  def value(r):
    parts = [r.get(c) for c in columns]
    return (np.nan if any(not isinstance(v, (int, float)) for v in parts)
            else float(sum(parts)))

  all_costs = np.array([value(r) for r in rows], np.float64)
  size, unit = _scale(all_costs[np.isfinite(all_costs)], units)
  cols = min(len(tiers), 2)
  axes = fig.subplots(-(-len(tiers) // cols), cols, squeeze=False).ravel()
  for ax in axes[len(tiers):]:
    ax.set_visible(False)
  best_of = {}
  for ax, tier in zip(axes, tiers):
    mine = [r for r in rows if str(r["tier"]) == tier]
    names = [str(r["policy"]) for r in mine]
    xs = np.array([value(r) for r in mine]) / size
    ys = np.array([np.nan if r.get("accuracy") is None else r["accuracy"]
                   for r in mine], np.float64)
    for name, x, y in zip(names, xs, ys):
      i = policies.index(name)
      ax.scatter(x, y, s=70, color=f"C{i % 10}", marker="os^Dv"[i // 10 % 5],
                 label=name, zorder=3)
    front = pareto_front(xs, ys)
    ax.plot(xs[front], ys[front], color="0.3", linestyle="--", linewidth=1.5,
            drawstyle="steps-post", zorder=2,
            label="Pareto front" if tier == tiers[0] else None)
    for i in front:
      ax.annotate(names[i], (xs[i], ys[i]), textcoords="offset points",
                  xytext=(6, -12), fontsize="small")
    best = best_policy(xs, ys)
    best_of[tier] = None if best is None else names[best]
    if best is not None:
      ax.scatter(xs[best], ys[best], s=320, marker="*", facecolor="none",
                 edgecolor="black", linewidth=1.5, zorder=4)
      ax.set_title(f"tier {tier}: best {names[best]} ({ys[best]:.3f})",
                   fontsize="medium")
    ax.set_xlabel(label.format(unit=unit))
    ax.set_ylabel("final test accuracy")
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, title="policy", loc="outside right upper",
             fontsize="small")
  fig.suptitle(title)
  return best_of
