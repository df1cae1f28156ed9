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


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_run_all_item_one_writes_its_schema(tmp_path, monkeypatch):
  # run_all puts benchmarks/ on sys.path; keep that out of later tests.
  monkeypatch.setattr(sys, "path", list(sys.path))
  run_all = _load("run_all", RUN_ALL)
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


def test_run_peers_summarizes_repeats_by_median(monkeypatch):
  monkeypatch.setattr(sys, "path", list(sys.path))
  run_peers = _load("run_peers", RUN_ALL.parent / "peers" / "run_peers.py")
  result = lambda sps, dropout=False: {"steps_per_second": sps,
                                       "dropout": dropout}
  found = {
      ("mlp", 1000, "pfl"): [(("2 processes", result(4000.0)), 48000.0),
                             (("1 process", result(5000.0)), 45000.0),
                             (("2 processes", result(4500.0)), 36000.0)],
      ("cnn", 50, "fedjax"): [(("jit", result(70.0, True)), None)],
      ("cnn", 50, "flower"): [(None, None)],
      # The peer failed, ours ran: our rate is still reported.
      ("mlp", 100, "flower"): [(None, 40000.0)],
  }
  mlp, cnn, flower, failed_peer = run_peers.summarize(found)
  assert (failed_peer["peer_sps"], failed_peer["ours_sps"],
          failed_peer["ratios"]) == (None, 40000.0, [])
  assert (mlp["peer_sps"], mlp["ours_sps"]) == (4500.0, 45000.0)
  assert mlp["ratios"] == [12.0, 9.0, 8.0]
  assert mlp["note"] == " (1 process, 2 processes)"
  assert (cnn["peer_sps"], cnn["ours_sps"], cnn["ratios"]) == (70.0, None, [])
  assert cnn["note"] == " (dropout)"
  assert (flower["peer_sps"], flower["ratios"]) == (None, [])
  text = run_peers.table([mlp, cnn, flower]).splitlines()
  assert text[0].endswith("| ratio (ours/peer) | ratio range |")
  assert text[2] == ("| mlp | 1,000 | pfl (1 process, 2 processes) | 4,500 | "
                     "45,000 | 9.00 | 8.00-12.00 |")
  assert text[3] == "| cnn | 50 | fedjax (dropout) | 70 | - | - | - |"
  assert text[4] == "| cnn | 50 | flower | - | - | - | - |"
