"""`fedjax-tl report DIR [DIR...]`: plots, report.md and report.html.

Reads run directories (metrics.jsonl + summary.json), compare directories
(comparison.csv, comparison_tiers.csv) and sweep directories (sweep.csv);
`report()` writes the plots (PNG and SVG), report.md and a self-contained
report.html. The plotting and loading functions serve notebooks too.
"""

from fedjax_tl.report.html import to_html
from fedjax_tl.report.load import Run, Table, classify, load_run, load_table
from fedjax_tl.report.markdown import (compare_table, runs_table, sweep_table,
                                       tier_table)
from fedjax_tl.report.plots import (best_policy, pareto_front, plot_accuracy,
                                    plot_heatmap, plot_pareto, plot_tier_bars)
from fedjax_tl.report.story import report
from fedjax_tl.report.sweep import sweep_axes, sweep_means

__all__ = [
    "Run", "Table", "best_policy", "classify", "compare_table", "load_run",
    "load_table", "pareto_front", "plot_accuracy", "plot_heatmap",
    "plot_pareto", "plot_tier_bars", "report", "runs_table", "sweep_axes",
    "sweep_means", "sweep_table", "tier_table", "to_html",
]
