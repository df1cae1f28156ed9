"""Tests for time and bytes to a target accuracy (`config.target_accuracy`)."""

import json

import pytest

from conftest import tiny_config
from fedjax_tl.errors import ConfigError
from fedjax_tl.runner import format_comparison, run, time_to_target


def _record(round_index, accuracy, sim_seconds, up, down):
  return {"round": round_index, "accuracy": accuracy,
          "sim_seconds": sim_seconds, "bytes_up": up, "bytes_down": down,
          "per_tier_accuracy": {"1": accuracy}}


RECORDS = [_record(0, 0.40, 0.0, 0.0, 0.0),
           _record(5, 0.55, 12.5, 100.0, 400.0),
           _record(10, 0.71, 30.0, 220.0, 800.0),
           _record(15, 0.69, 41.0, 330.0, 1200.0),
           _record(20, 0.80, 55.5, 440.0, 1600.0)]


@pytest.mark.parametrize("target, expected", [
    (0.7, (10, 30.0, 1020.0)),  # first reached at round 10, not later
    (0.71, (10, 30.0, 1020.0)),  # reaching means >=
    (0.75, (20, 55.5, 2040.0)),
    (0.4, (0, 0.0, 0.0)),  # the starting model already reaches it
    (0.9, (None, None, None)),  # never reached
])
def test_time_to_target(target, expected):
  got = time_to_target(RECORDS, target)
  assert got == {"target_accuracy": target, "rounds_to_target": expected[0],
                 "sim_seconds_to_target": expected[1],
                 "bytes_to_target": expected[2]}


def test_no_target_adds_nothing():
  assert time_to_target(RECORDS, None) == {}


def test_comparison_table_shows_unreached_targets():
  rows = [{"policy": "heterofl", "accuracy": 0.8, "rounds_to_target": 10,
           "bytes_to_target": 2.5e6},
          {"policy": "fjord", "accuracy": 0.6, "rounds_to_target": None,
           "bytes_to_target": None}]
  lines = format_comparison(rows).splitlines()
  assert lines[2] == "| heterofl | 0.800 | 10 | 2.5 MB |"
  assert lines[3] == "| fjord | 0.600 | - | - |"


@pytest.mark.parametrize("value", [0.0, -0.1, 1.01])
def test_bad_target(value):
  with pytest.raises(ConfigError, match="config.target_accuracy="):
    tiny_config(target_accuracy=value)


def test_target_in_summary(tmp_path):
  summary = run(tiny_config(num_rounds=2, eval_every=1, target_accuracy=0.01),
                tmp_path, quiet=True)
  # Any model beats 1%: reached by the starting model, at no cost.
  assert summary["rounds_to_target"] == 0
  assert summary["bytes_to_target"] == 0.0
  assert summary["sim_seconds_to_target"] == 0.0
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved["target_accuracy"] == 0.01
