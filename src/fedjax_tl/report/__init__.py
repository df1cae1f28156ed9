"""`fedjax-tl report DIR [DIR...]`: plots, report.md and report.html.

Reads run directories (metrics.jsonl + summary.json), compare directories
(comparison.csv, comparison_tiers.csv) and sweep directories (sweep.csv);
`report()` writes the plots (PNG and SVG), report.md and a self-contained
report.html. The plotting and loading functions serve notebooks too.
"""

import importlib

# Each name from the submodule that defines it, loaded on first use: the
# tables (`markdown`, `load`) serve `compare` without matplotlib, whose
# import costs every `fedjax-tl run` a second or more.
_WHERE = {
    "to_html": "html", "Run": "load", "Table": "load", "classify": "load",
    "load_run": "load", "load_table": "load", "compare_table": "markdown",
    "runs_table": "markdown", "sweep_table": "markdown",
    "tier_table": "markdown", "best_policy": "plots", "pareto_front": "plots",
    "plot_accuracy": "plots", "plot_heatmap": "plots", "plot_pareto": "plots",
    "plot_tier_bars": "plots", "report": "story", "sweep_axes": "sweep",
    "sweep_means": "sweep",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
  if name not in _WHERE:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
  return sorted({*globals(), *_WHERE})
