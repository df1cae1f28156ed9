"""Migration policies side by side: `fedjax-tl compare` runs each policy of
`config.compare_policies` as its own experiment and tabulates them.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import ml_collections

from fedjax_tl import files, schema
from fedjax_tl.config import validate
from fedjax_tl.experiment.relations import policy_variant, unread_keys
from fedjax_tl.errors import Stopped
from fedjax_tl.experiment import stops
from fedjax_tl.experiment.loop import run
from fedjax_tl.experiment.summary import TARGET_KEYS
from fedjax_tl.experiment.workdir import locked
from fedjax_tl.report.markdown import tier_table

# What compare writes in its workdir, beside a directory per policy.
TABLES = ("comparison.csv", "comparison_tiers.csv", "comparison.md")


def compare(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
            overwrite: bool = False, progress: bool = True,
            quiet: bool = False) -> list[dict[str, Any]]:
  """Runs every policy of `config.compare_policies` side by side.

  Each policy runs as its own experiment in `workdir/<policy>` (resumable
  like `run`) with the same population, data, pretrained model and seed, all
  deterministic from the config; per-policy defaults (masked cross-entropy)
  apply, and a policy's own keys (`Policy.keys`) reach it only. Writes
  `workdir/comparison.csv` (a row per policy), `comparison_tiers.csv` (a
  row per policy and tier: accuracy and cost) and `comparison.md`
  (atomically).

  Holds `workdir`'s lock throughout (a second comparison there is refused
  at once, exit 2). SIGINT / SIGTERM stop it (Stopped, exit 130 / 143,
  naming the policy): within a run as `run` stops; between runs at once;
  the same command resumes, the finished runs returning their summaries.
  """
  workdir = pathlib.Path(workdir)
  # Every value checked before anything runs.
  base = validate(policy_variant(config, config.policy))
  unread_keys(config, base.compare_policies)
  configs = [validate(policy_variant(config, name))
             for name in base.compare_policies]
  # One comparison at a time in `workdir` (each run also locks its own);
  # SIGINT / SIGTERM between runs stop it like a run's (each run installs
  # its own handlers over these, restoring them when it ends).
  with stops.stop_on_signals() as stop, locked(workdir):
    for name in TABLES:  # a killed write's temporaries
      files.remove_stale_temporaries(workdir / name)
    rows, tier_rows = [], []
    for done, cfg in enumerate(configs):
      stop.check(f"before policy {cfg.policy} ({done} of {len(configs)} "
                 "policies done)")
      if not quiet:
        print(f"== policy {cfg.policy}", file=sys.stderr, flush=True)
      try:
        summary = run(cfg, workdir / cfg.policy, overwrite=overwrite,
                      progress=progress, quiet=quiet)
      except Stopped as e:
        raise e.within(f"in policy {cfg.policy} ({done} of {len(configs)} "
                       "policies done)") from None
      rows.append(comparison_row(summary))
      tier_rows += [{"schema_version": schema.SCHEMA_VERSION,
                     "policy": cfg.policy, **row}
                    for row in schema.tier_rows(summary)]
    stop.check(f"after all {len(configs)} policies ran, before the tables")
    # All or nothing; a full disk: one line (DiskFullError), no partial file.
    files.write_csv_atomic(workdir / "comparison.csv", rows)
    files.write_csv_atomic(workdir / "comparison_tiers.csv", tier_rows)
    files.write_text_atomic(workdir / "comparison.md",
                                 format_comparison(rows, tier_rows) + "\n")
  return rows


def comparison_row(summary: dict[str, Any]) -> dict[str, Any]:
  """A policy's row of comparison.csv, from its summary.json: accuracies,
  traffic, simulated time, the slowest tier and the server's own cost (the
  per-tier costs go to comparison_tiers.csv)."""
  row = {"schema_version": schema.SCHEMA_VERSION,
         "policy": summary["policy"], "accuracy": summary["accuracy"],
         "worst_tier_accuracy": summary["worst_tier_accuracy"],
         "local_accuracy": summary["local_accuracy"]}
  row.update({f"tier_{name}_accuracy": acc
              for name, acc in summary["per_tier_accuracy"].items()})
  row.update({key: summary[key] for key in (
      "bytes_up", "bytes_down", "sim_seconds", "sim_seconds_per_round",
      "slowest_tier", "server_flops", "server_seconds", "wall_seconds")})
  row.update({key: summary[key] for key in TARGET_KEYS if key in summary})
  return row


def format_comparison(rows: list[dict[str, Any]],
                      tier_rows: list[dict[str, Any]] | None = None) -> str:
  """The comparison as markdown: a row per policy (accuracies to 3 places,
  MB, GFLOP), then with `tier_rows` (comparison_tiers.csv's rows) each
  tier's costs (`report.markdown.tier_table`)."""
  columns = [k for k in rows[0] if k != "schema_version"]

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
  if tier_rows:
    lines += ["", "Per tier: what each tier's devices hold, run and send "
              "(docs/outputs.md).", ""] + tier_table(tier_rows, "policy")
  return "\n".join(lines)
