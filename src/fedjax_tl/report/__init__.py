"""`fedjax-tl report DIR [DIR...]`: PNG plots and a markdown summary.

Reads run directories (metrics.jsonl + summary.json), compare directories
(comparison.csv) and sweep directories (sweep.csv); `report()` writes the
PNGs and report.md. The plotting and loading functions serve notebooks too.
"""

from fedjax_tl.report.load import Run, Table, classify, load_run, load_table
from fedjax_tl.report.markdown import compare_table, runs_table, sweep_table
from fedjax_tl.report.plots import plot_accuracy, plot_heatmap, plot_tier_bars
from fedjax_tl.report.story import report
from fedjax_tl.report.sweep import sweep_axes, sweep_means

__all__ = [
    "Run", "Table", "classify", "compare_table", "load_run", "load_table",
    "plot_accuracy", "plot_heatmap", "plot_tier_bars", "report",
    "runs_table", "sweep_axes", "sweep_means", "sweep_table",
]
