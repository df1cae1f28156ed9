"""Migration policies side by side: `fedjax-tl compare` runs each policy of
`config.compare_policies` as its own experiment and tabulates them.
"""

from __future__ import annotations

import csv
import pathlib
import sys
from typing import Any

import ml_collections

from fedjax_tl.config import policy_variant, unread_keys, validate
from fedjax_tl.experiment.loop import run
from fedjax_tl.experiment.outputs import TARGET_KEYS


def compare(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
            overwrite: bool = False, progress: bool = True,
            quiet: bool = False) -> list[dict[str, Any]]:
  """Runs every policy of `config.compare_policies` side by side.

  Each policy runs as its own experiment in `workdir/<policy>` (resumable
  like `run`) with the same population, data, pretrained model and seed, all
  deterministic from the config; per-policy defaults (masked cross-entropy)
  apply, and a policy's own keys (`Policy.keys`) reach it only. Writes
  `workdir/comparison.csv` and `workdir/comparison.md`.
  """
  workdir = pathlib.Path(workdir)
  # Every value checked before anything runs.
  base = validate(policy_variant(config, config.policy))
  unread_keys(config, base.compare_policies)
  configs = [validate(policy_variant(config, name))
             for name in base.compare_policies]
  rows = []
  for cfg in configs:
    if not quiet:
      print(f"== policy {cfg.policy}", file=sys.stderr, flush=True)
    summary = run(cfg, workdir / cfg.policy, overwrite=overwrite,
                  progress=progress, quiet=quiet)
    row = {"policy": cfg.policy, "accuracy": summary["accuracy"],
           "worst_tier_accuracy": summary["worst_tier_accuracy"],
           "local_accuracy": summary["local_accuracy"]}
    row.update({f"tier_{name}_accuracy": acc
                for name, acc in summary["per_tier_accuracy"].items()})
    row.update({key: summary[key] for key in (
        "bytes_up", "bytes_down", "sim_seconds", "server_flops",
        "server_seconds", "wall_seconds")})
    row.update({key: summary[key] for key in TARGET_KEYS if key in summary})
    rows.append(row)
  with open(workdir / "comparison.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  (workdir / "comparison.md").write_text(format_comparison(rows) + "\n")
  return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
  """The comparison as a markdown table (accuracies to 3 places, MB)."""
  columns = list(rows[0])

  def cell(key, value):
    if value is None:  # e.g. a target never reached
      return "-"
    if key.startswith("bytes"):
      return f"{value / 1e6:.1f} MB"
    if key == "server_flops":
      return f"{value / 1e9:.2f} GFLOP"
    return f"{value:.3f}" if isinstance(value, float) else str(value)

  lines = ["| " + " | ".join(columns) + " |",
           "|" + " --- |" * len(columns)]
  lines += ["| " + " | ".join(cell(k, r[k]) for k in columns) + " |"
            for r in rows]
  return "\n".join(lines)
