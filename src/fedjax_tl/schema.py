"""The results files' schema: its version and the per-tier cost columns.

summary.json, comparison.csv, comparison_tiers.csv and sweep.csv carry
`schema_version` (docs/outputs.md describes every field). Files without one
were written before per-tier costs (version 1): readers still take them,
showing what they lack as missing; a newer version than this code knows is
refused in one line. Kept free of jax so `fedjax-tl report` reads results
with no engine.
"""

from __future__ import annotations

from typing import Any

from fedjax_tl.errors import DataError

# 1: the unversioned files before per-tier costs; 2: per-tier costs.
SCHEMA_VERSION = 2

# comparison_tiers.csv's per-tier columns, each read from summary.json's
# `{tier: value}` entry of the same meaning (docs/outputs.md).
TIER_COLUMNS = {
    "accuracy": "per_tier_accuracy",
    "initial_accuracy": "initial_per_tier_accuracy",
    "params": "per_tier_params",
    "model_bytes": "per_tier_model_bytes",
    "forward_flops": "per_tier_flops",
    "train_flops_per_step": "per_tier_train_flops_per_step",
    "train_memory_bytes": "per_tier_train_memory_bytes",
    "client_bytes_down": "per_tier_client_bytes_down",
    "client_bytes_up": "per_tier_client_bytes_up",
    "bytes_down_per_round": "per_tier_bytes_down_per_round",
    "bytes_up_per_round": "per_tier_bytes_up_per_round",
    "bytes_down": "per_tier_bytes_down",
    "bytes_up": "per_tier_bytes_up",
    "round_seconds": "per_tier_round_seconds",
}


def version(record: dict[str, Any], where: str) -> int:
  """A file's schema version (1 when it has none).

  Raises:
    DataError: a version newer than this code's, or not a whole number,
      naming the file.
  """
  value = record.get("schema_version")
  if value is None or value == "":
    return 1
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = float("nan")
  if not number.is_integer() or number < 1:
    raise DataError(f"{where}: schema_version={value!r} is not a version "
                    "number")
  if number > SCHEMA_VERSION:
    raise DataError(f"{where}: schema_version={int(number)} is newer than "
                    f"this fedjax-tl reads ({SCHEMA_VERSION}); upgrade "
                    "fedjax-tl")
  return int(number)


def tier_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
  """summary.json's per-tier figures as one dict per tier, tiers in order.

  Each holds `tier`, every :data:`TIER_COLUMNS` column (None where the
  summary lacks it, e.g. a version-1 summary's costs) and `slowest`: whether
  the tier's devices take the longest round (`slowest_tier`).
  """
  slowest = summary.get("slowest_tier")
  rows = []
  for tier in summary["per_tier_accuracy"]:
    row: dict[str, Any] = {"tier": tier}
    for column, key in TIER_COLUMNS.items():
      row[column] = (summary.get(key) or {}).get(tier)
    row["slowest"] = None if slowest is None else tier == slowest
    rows.append(row)
  return rows
