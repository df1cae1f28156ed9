"""benchmarks/run_all.py at its smallest: the JSON and markdown it writes.

Timings are never asserted; the vectorized and per-client loop rounds are
checked to agree, the loop being the independent reference.
"""

import importlib.util
import json
import math
import pathlib
import sys

import pytest

RUN_ALL = pathlib.Path(__file__).parent.parent / "benchmarks" / "run_all.py"


@pytest.mark.slow
def test_run_all_item_one_writes_its_schema(tmp_path, monkeypatch):
  # run_all puts benchmarks/ on sys.path; keep that out of later tests.
  monkeypatch.setattr(sys, "path", list(sys.path))
  spec = importlib.util.spec_from_file_location("run_all", RUN_ALL)
  run_all = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(run_all)
  out, md = tmp_path / "r.json", tmp_path / "r.md"
  run_all.main(["--quick", "--only", "1", "--models", "logreg",
                "--sizes", "6", "--num-clients", "40", "--repeats", "1",
                "--out", str(out), "--md", str(md)])

  result = json.loads(out.read_text())
  assert result["mode"] == "quick"
  for key in ("backend", "device_kind", "jax", "jaxlib", "cpu_count"):
    assert key in result["machine"]
  assert len(result["load_average_start"]) == 3
  assert list(result["items"]) == ["1"]
  item = result["items"]["1"]
  assert "error" not in item
  (row,) = item["rows"]
  assert (row["model"], row["clients_per_round"]) == ("logreg", 6)
  for key in ("ratio", "vectorized_steps_per_second", "loop_steps_per_second",
              "vectorized_round_seconds", "loop_round_seconds"):
    assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
  assert item["ratio"] == row["ratio"]
  # Every device online: the round and the whole loop run all 6 clients,
  # and agree (the loop is the per-client reference).
  assert row["valid_clients_per_round"] == [6]
  assert row["loop_clients_per_round"] == [6] and not row["loop_sampled"]
  assert row["max_abs_diff_vs_loop"] < 1e-5
  # Logistic regression on 8x8 digits: a 64x10 kernel and 10 biases.
  assert "| logreg | 650 | 6 |" in md.read_text()
