"""The Python API: configs as the CLI reads them, results as DataFrames."""

import json
import pathlib

import pytest

import fedjax_tl
from conftest import tiny_config_dict
from fedjax_tl.cli import main


@pytest.mark.parametrize("overrides,flag", [
    ({"num_rounds": -3}, "--config.num_rounds=-3"),
    ({"nmu_clients": 3}, "--config.nmu_clients=3"),
    ({"policy": "nope"}, "--config.policy=nope"),
    ({"num_rounds": "x"}, "--config.num_rounds=x"),
])
def test_bad_config_raises_the_clis_error(tmp_path, capsys, overrides, flag):
  with pytest.raises(fedjax_tl.ConfigError) as raised:
    fedjax_tl.get_config(**overrides)
  assert main(["run", f"--workdir={tmp_path}", flag]) == 2
  assert capsys.readouterr().err.strip() == f"error: {raised.value}"
  assert not any(tmp_path.iterdir())


def test_get_config_reads_files_and_python_values():
  spec = pathlib.Path(__file__).parent.parent / "configs" / "default.py"
  cfg = fedjax_tl.get_config(spec, num_rounds=7,
                             tier_fractions=[1.0, 0.5],
                             tier_proportions=(0.5, 0.5), client_lr=1,
                             policy="fjord")
  assert cfg.num_rounds == 7 and cfg.policy == "fjord"
  assert cfg.tier_fractions == (1.0, 0.5) and cfg.client_lr == 1.0
  # A ConfigDict is copied, never changed in place.
  again = fedjax_tl.get_config(cfg, num_rounds=9)
  assert again.num_rounds == 9 and cfg.num_rounds == 7


def test_run_result_and_compare_frames_match_the_files(tmp_path):
  # The config of test_runner's compare test: its programs are cached.
  config = tiny_config_dict(num_rounds=2, pretrain_steps=10,
                            compare_policies=("heterofl",))
  result = fedjax_tl.run(config, tmp_path / "cmp" / "heterofl", quiet=True)
  summary = json.loads((result.workdir / "summary.json").read_text())
  records = [json.loads(line) for line in
             (result.workdir / "metrics.jsonl").read_text().splitlines()]
  assert result.summary == summary and result.records == records
  assert result.worst_tier_accuracy == min(
      summary["per_tier_accuracy"].values())

  frame = result.metrics_frame()
  assert list(frame.index) == [r["round"] for r in records] == [0, 2]
  for r in records:
    row = frame.loc[r["round"]]
    assert row["accuracy"] == r["accuracy"]
    assert row["bytes"] == r["bytes_up"] + r["bytes_down"]
    assert row["worst_tier_accuracy"] == min(r["per_tier_accuracy"].values())
  tiers = result.tier_frame()
  assert len(tiers) == 2 * 4
  wide = tiers.pivot(index="round", columns="tier", values="accuracy")
  for r in records:
    for name, acc in r["per_tier_accuracy"].items():
      assert wide.loc[r["round"], name] == acc
      row = tiers[(tiers["round"] == r["round"]) & (tiers["tier"] == name)]
      assert row["bytes_up"].item() == r["per_tier_bytes_up"][name]

  # compare() over the same policy resumes that finished run: same numbers.
  table = fedjax_tl.compare(config, tmp_path / "cmp", quiet=True)
  assert list(table["policy"]) == ["heterofl"]
  assert table.loc[0, "accuracy"] == summary["accuracy"]
  assert table.loc[0, "tier_0.125_accuracy"] == summary["per_tier_accuracy"][
      "0.125"]
  assert table.attrs["workdir"] == str(tmp_path / "cmp")
  loaded = fedjax_tl.load_result(tmp_path / "cmp" / "heterofl")
  assert loaded.summary["accuracy"] == summary["accuracy"]
