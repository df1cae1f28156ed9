"""The Python API: configs as the CLI reads them, results as DataFrames."""

import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import fedjax_tl
from conftest import cli_env, tiny_config_dict
from fedjax_tl import api
from fedjax_tl.cli import main
from fedjax_tl.data import npz_source


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


def _digits_arrays(num_clients=12):
  """A small data set as `.npz` arrays, from the digits task."""
  from fedjax_tl.data.digits import load_digits_transfer
  task = load_digits_transfer(num_clients, seed=0)
  return {"num_classes": np.int64(task.num_classes),
          "source_x": task.source_train.x, "source_y": task.source_train.y,
          "clients_x": task.clients.x, "clients_y": task.clients.y,
          "clients_count": task.clients.count,
          "test_x": task.target_test.x, "test_y": task.target_test.y}


def test_client_mapping_is_padded_as_by_hand():
  rng = np.random.default_rng(0)
  sizes = {"ann": 3, "bob": 1, "cy": 5}
  clients = {cid: {"x": rng.normal(size=(n, 4, 2)),
                   "y": rng.integers(0, 7, size=n)}
             for cid, n in sizes.items()}
  arrays = npz_source.client_arrays({
      "clients": clients, "source_x": np.zeros((1, 4, 2)),
      "source_y": np.zeros(1, int), "test_x": np.zeros((1, 4, 2)),
      "test_y": np.zeros(1, int)})
  # By hand: client i is the mapping's i-th id, its rows first, zeros after.
  expected_x, expected_y = np.zeros((3, 5, 4, 2)), np.zeros((3, 5), int)
  for i, c in enumerate(clients.values()):
    expected_x[i, :len(c["y"])], expected_y[i, :len(c["y"])] = c["x"], c["y"]
  np.testing.assert_array_equal(arrays["clients_x"], expected_x)
  np.testing.assert_array_equal(arrays["clients_y"], expected_y)
  np.testing.assert_array_equal(arrays["clients_count"], [3, 1, 5])
  labels = np.concatenate([c["y"] for c in clients.values()])
  assert arrays["num_classes"] == labels.max() + 1


@pytest.mark.parametrize("data,message", [
    ({"clients": {"a": {"x": np.zeros((2, 3))}}},
     "data=['clients']['a']: expected {'x': [n, ...], 'y': [n]}, got keys "
     "['x']"),
    ({"clients": {"a": {"x": np.zeros((2, 3)), "y": np.zeros(2, int)},
                  "b": {"x": np.zeros((2, 4)), "y": np.zeros(2, int)}}},
     "data=['clients']['b']: x of shape (2, 4) and y of shape (2,); "
     "expected x [n, *(3,)] and y [n]"),
    ({"clients": {}, "clients_x": np.zeros((1, 1, 1))},
     "data=: clients and clients_x both given"),
    ({"source_x": np.zeros((2, 3)), "clientsx": 1},
     "data=: unknown array 'clientsx' (did you mean 'clients_x'?)"),
])
def test_bad_arrays_raise_one_line_naming_them(data, message):
  with pytest.raises(fedjax_tl.DataError) as raised:
    fedjax_tl.run(tiny_config_dict(), data=data)
  assert str(raised.value).startswith(message)


def test_conflicting_num_clients_names_both(tmp_path):
  arrays = _digits_arrays()
  with pytest.raises(fedjax_tl.ConfigError,
                     match=r"config.num_clients=60 but data= holds 12 clients"):
    fedjax_tl.run(tiny_config_dict(), tmp_path, data=arrays)
  assert not any(tmp_path.iterdir())


def test_arrays_run_like_their_npz_file_and_leave_no_directory(
    tmp_path, monkeypatch):
  # The reference: the same arrays through an .npz file (config.data=PATH),
  # the path the CLI takes; from Python, as a mapping of client id to
  # arrays, num_clients from the data and no workdir given.
  arrays = _digits_arrays()
  np.savez(tmp_path / "d.npz", **arrays)
  config = tiny_config_dict(num_rounds=2, clients_per_round=4,
                            pretrain_steps=10, num_clients=None)
  expected = fedjax_tl.run(
      fedjax_tl.get_config(config, data=str(tmp_path / "d.npz"),
                           num_clients=12), tmp_path / "file", quiet=True)
  count = arrays.pop("clients_count")
  clients = {f"device{i}": {"x": x[:n], "y": y[:n]} for i, (x, y, n) in
             enumerate(zip(arrays.pop("clients_x"), arrays.pop("clients_y"),
                           count))}
  temp = tmp_path / "tmp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  result = fedjax_tl.run(config, data={**arrays, "clients": clients},
                         quiet=True)
  assert result.config["num_clients"] == 12
  assert result.config["data"] == "arrays"
  for key in ("accuracy", "per_tier_accuracy", "bytes_up"):
    assert result.summary[key] == expected.summary[key], key
  assert [r["accuracy"] for r in result.records] == [
      r["accuracy"] for r in expected.records]
  # The workdir is a temporary one, removed at the process's exit (here, by
  # hand), and the Result stays usable after.
  assert result.workdir.parent == temp
  api._TEMPORARY.pop().cleanup()
  assert not any(temp.iterdir())
  assert result.metrics_frame().loc[2, "accuracy"] == result.accuracy


def test_runs_without_workdir_leave_nothing_in_tmp(tmp_path):
  # A process whose calls made temporary workdirs: gone once it exits.
  code = ("import fedjax_tl.api as api; d = api._workdir(None); "
          "(d / 'metrics.jsonl').write_text('{}'); print(d)")
  out = subprocess.run([sys.executable, "-c", code], check=True,
                       capture_output=True, text=True,
                       env=dict(cli_env(), TMPDIR=str(tmp_path))).stdout
  assert pathlib.Path(out.strip()).parent == tmp_path
  assert not any(tmp_path.iterdir())


def test_data_arrays_on_the_command_line_is_one_line(tmp_path, capsys):
  assert main(["run", f"--workdir={tmp_path / 'w'}", "--config.data=arrays",
               "--config.num_clients=5", "--config.clients_per_round=2"]) == 2
  assert capsys.readouterr().err == (
      "error: config.data='arrays' names arrays given from Python "
      "(fedjax_tl.run(config, data=...)); from the command line, save them "
      "as an .npz file (docs/data.md)\n")
  assert not any(tmp_path.iterdir())
