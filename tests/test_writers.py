"""Metric writers: TensorBoard event files, W&B and MLflow (fakes) against
metrics.jsonl; resume writes each step once; config.writers checks."""

import collections
import importlib.util
import json
import sys
import types

import numpy as np
import pytest

from conftest import tiny_config, tiny_config_dict
from fedjax_tl import config as config_lib
from fedjax_tl import runner
from fedjax_tl.cli import main
from fedjax_tl.errors import ConfigError
from fedjax_tl.experiment import writers


def _jsonl(workdir):
  return [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]


def _numbers(record):
  """The record's numbers but its round, by hand: top-level ones and each
  per-tier dict's, None left out."""
  out = []
  for key, value in record.items():
    if key == "round" or value is None:
      continue
    if isinstance(value, dict):
      out += [float(v) for v in value.values() if v is not None]
    else:
      out.append(float(value))
  return out


def _assert_logged(record, logged, cast=float):
  """`logged` (tag -> value at the record's round) holds every number of
  the record once, and the tags a user looks for carry the right ones."""
  assert sorted(logged.values()) == sorted(cast(x) for x in
                                           _numbers(record))
  assert logged["accuracy/global"] == cast(record["accuracy"])
  for tier, acc in record["per_tier_accuracy"].items():
    assert logged[f"accuracy/tier_{tier}"] == cast(acc)
    assert logged[f"loss/tier_{tier}"] == cast(record["per_tier_loss"][tier])
    assert logged[f"bytes/up/tier_{tier}"] == cast(
        record["per_tier_bytes_up"][tier])
  assert logged["bytes/up"] == cast(record["bytes_up"])
  assert logged["bytes/down"] == cast(record["bytes_down"])
  assert logged["time/simulated_s"] == cast(record["sim_seconds"])
  assert logged["faults/excluded_total"] == cast(record["excluded_total"])
  assert ("loss/train" in logged) == (record["train_loss"] is not None)


def _events(directory):
  """Every scalar of the event files in `directory`, as tensorboard reads
  them: {step: {tag: value}} (a step written twice fails), and the hparams
  plugin's contents."""
  from tensorboard.backend.event_processing import event_accumulator as ea
  from tensorboard.plugins.hparams import plugin_data_pb2
  # Every event as written: no purge of a step that comes again.
  acc = ea.EventAccumulator(str(directory), size_guidance={ea.SCALARS: 0},
                            purge_orphaned_data=False)
  acc.Reload()
  by_step = collections.defaultdict(dict)
  for tag in acc.Tags()["scalars"]:
    for event in acc.Scalars(tag):
      assert tag not in by_step[event.step], (tag, event.step)
      by_step[event.step][tag] = event.value
  hparams = {}
  for tag, content in acc.PluginTagToContent("hparams").items():
    hparams[tag] = plugin_data_pb2.HParamsPluginData.FromString(content)
  return dict(by_step), hparams


class _FakeRun:
  """What a wandb run was given."""

  def __init__(self, calls, kwargs):
    self.calls = calls
    calls.append(("init", kwargs))
    self.config = types.SimpleNamespace(
        update=lambda d, **kw: calls.append(("config", dict(d))))
    self.summary = types.SimpleNamespace(
        update=lambda d: calls.append(("summary", dict(d))))

  def log(self, data, step):
    self.calls.append(("log", step, dict(data)))

  def finish(self):
    self.calls.append(("finish",))


def _fake_modules(monkeypatch):
  """Fake wandb and mlflow modules recording their calls (one list each)."""
  wandb_calls, mlflow_calls = [], []
  wandb = types.ModuleType("wandb")
  wandb.init = lambda **kwargs: _FakeRun(wandb_calls, kwargs)
  mlflow = types.ModuleType("mlflow")
  record = lambda name: (lambda *a, **kw: mlflow_calls.append((name, a, kw)))
  for name in ("set_tracking_uri", "set_experiment", "start_run",
               "log_params", "log_metrics", "end_run"):
    setattr(mlflow, name, record(name))
  monkeypatch.setitem(sys.modules, "wandb", wandb)
  monkeypatch.setitem(sys.modules, "mlflow", mlflow)
  # The SQLite store's dependency, whatever this machine has.
  monkeypatch.setitem(sys.modules, "sqlalchemy",
                      types.ModuleType("sqlalchemy"))
  monkeypatch.delenv("WANDB_MODE", raising=False)
  monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
  return wandb_calls, mlflow_calls


def test_events_wandb_and_mlflow_equal_metrics_jsonl_resumed_once(
    tmp_path, monkeypatch):
  wandb_calls, mlflow_calls = _fake_modules(monkeypatch)
  all_writers = "jsonl,tensorboard,wandb,mlflow"
  workdir = tmp_path / "w"
  # Two rounds, then the same command with four: resumes from round 2.
  runner.run(tiny_config(num_rounds=2, writers=all_writers), workdir,
             quiet=True)
  first_wandb = len(wandb_calls)
  cfg = tiny_config(writers=all_writers)
  runner.run(cfg, workdir, quiet=True)
  records = _jsonl(workdir)
  assert [r["round"] for r in records] == [0, 2, 4]

  # TensorBoard: one event file (the first run's replaced), each step once,
  # every scalar equal to metrics.jsonl's (stored as float32).
  files = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert len(files) == 1
  events, hparams = _events(workdir / "tensorboard")
  assert sorted(events) == [0, 2, 4]
  for record in records:
    _assert_logged(record, events[record["round"]], cast=np.float32)
  start = hparams["_hparams_/session_start_info"].session_start_info.hparams
  assert start["policy"].string_value == cfg.policy
  assert start["num_rounds"].number_value == 4
  assert start["tier_fractions"].string_value == "[1.0, 0.5, 0.25, 0.125]"
  metric_tags = {m.name.tag for m in
                 hparams["_hparams_/experiment"].experiment.metric_infos}
  assert {"accuracy/global", "accuracy/tier_0.125", "bytes/up"} <= metric_tags

  # W&B: the resumed run's own run, offline, the whole history once.
  second = wandb_calls[first_wandb:]
  assert second[0][0] == "init" and second[0][1]["mode"] == "offline"
  assert second[0][1]["config"]["seed"] == cfg.seed
  logs = [c for c in second if c[0] == "log"]
  assert [c[1] for c in logs] == [0, 2, 4]
  for record, (_, _, data) in zip(records, logs):
    _assert_logged(record, data)
  summary = next(c[1] for c in second if c[0] == "summary")
  assert summary["accuracy/global"] == records[-1]["accuracy"]
  assert second[-1] == ("finish",)

  # MLflow: a file store in the workdir, params, then the same scalars.
  runs = [i for i, c in enumerate(mlflow_calls) if c[0] == "start_run"]
  second = mlflow_calls[runs[1]:]
  uris = [c[1][0] for c in mlflow_calls if c[0] == "set_tracking_uri"]
  assert uris[-1] == f"sqlite:///{(workdir / 'mlruns').resolve()}/mlflow.db"
  params = next(c[1][0] for c in second if c[0] == "log_params")
  assert params["num_rounds"] == "4"
  logs = [c for c in second if c[0] == "log_metrics"]
  assert [c[2]["step"] for c in logs] == [0, 2, 4]
  for record, (_, (data,), _) in zip(records, logs):
    _assert_logged(record, data)
  assert second[-1][0] == "end_run"


def test_overwrite_removes_the_event_files(tmp_path):
  workdir = tmp_path / "w"
  runner.run(tiny_config(num_rounds=1, eval_every=1), workdir, quiet=True)
  manifest = json.loads((workdir / ".fedjax_tl_manifest.json").read_text())
  assert "tensorboard" in manifest["outputs"]
  (workdir / "tensorboard" / "events.out.tfevents.0.old").write_bytes(b"")
  runner.run(tiny_config(num_rounds=1, eval_every=1, seed=3), workdir,
             overwrite=True, quiet=True, progress=False)
  names = [p.name for p in (workdir / "tensorboard").iterdir()]
  assert len(names) == 1 and not names[0].endswith(".old")
  # Without tensorboard in writers, no events are written.
  runner.run(tiny_config(num_rounds=1, eval_every=1, writers="jsonl"),
             tmp_path / "plain", quiet=True)
  assert not (tmp_path / "plain" / "tensorboard").exists()


def test_tags_group_each_quantity_by_tier():
  record = {"round": 3, "accuracy": 0.5, "loss": 1.5, "train_loss": None,
            "per_tier_accuracy": {"1": 0.5, "0.5": 0.25},
            "per_tier_dropped": {"1": 2, "0.5": 0},
            "bytes_up": 10.0, "dp_epsilon": 1.25, "future_key": 7,
            "per_tier_future": {"1": 1.0}, "local_accuracy": None}
  assert writers.scalars(record) == {
      "accuracy/global": 0.5, "loss/global": 1.5,
      "accuracy/tier_1": 0.5, "accuracy/tier_0.5": 0.25,
      "faults/dropped/tier_1": 2.0, "faults/dropped/tier_0.5": 0.0,
      "bytes/up": 10.0, "privacy/epsilon": 1.25, "other/future_key": 7.0,
      "future/tier_1": 1.0}
  # Tags never collide: the known keys map to distinct ones.
  tags = list(writers._TAGS.values()) + [
      f"{g}/tier_x" for g in writers._TIER_GROUPS.values()]
  assert len(tags) == len(set(tags))


@pytest.mark.parametrize("value,fragment", [
    ("jsonl,tensorbord", "unknown writer 'tensorbord'"),
    ("tensorboard", "must include jsonl"),
    ("jsonl,jsonl", "names a writer twice"),
    ("jsonl,wandb", "pip install wandb"),
    ("jsonl,mlflow", "the mlflow package, which is not installed: pip "
                     "install mlflow"),
    ("jsonl,mlflow,skinny", "needs the full mlflow package: pip install "
                            "mlflow (or set MLFLOW_TRACKING_URI"),
])
def test_bad_writers_exit_2_with_one_line_before_any_work(
    tmp_path, capsys, monkeypatch, value, fragment):
  absent = ("wandb", "mlflow", "sqlalchemy")  # whatever this machine has
  if value == "jsonl,mlflow,skinny":  # mlflow-skinny: no SQLite store
    value, absent = "jsonl,mlflow", ("sqlalchemy",)
    monkeypatch.setitem(sys.modules, "mlflow", types.ModuleType("mlflow"))
  monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
  for module in absent:
    monkeypatch.delitem(sys.modules, module, raising=False)
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if
                      name in absent else find_spec(name, *a))
  with pytest.raises(ConfigError, match="config.writers="):
    config_lib.validate(tiny_config_dict(writers=value))
  workdir = tmp_path / "w"
  code = main(["run", f"--workdir={workdir}", "--no-progress",
               f"--config.writers={value}"])
  err = capsys.readouterr().err.strip()
  assert code == 2, err
  assert len(err.splitlines()) == 1 and fragment in err
  assert f"config.writers={value!r}" in err
  assert not workdir.exists()


def test_sweep_rows_are_runs_side_by_side_with_their_hparams(tmp_path):
  rows = [{"client_lr": lr, "seed": seed, "accuracy": 0.5 + lr + seed,
           "worst_tier_accuracy": 0.25, "tier_1_accuracy": 0.5 + lr + seed,
           "tier_0.5_accuracy": 0.25, "bytes_up": 1e6 * (seed + 1),
           "bytes_down": 2e6, "sim_seconds": 3.5}
          for lr in (0.1, 0.3) for seed in (0, 2)]
  config = tiny_config().to_dict()
  writers.write_sweep("jsonl,tensorboard", tmp_path, config, rows, 7,
                      ("alpha", "policy", "client_lr", "seed"))
  for row in rows:
    directory = (tmp_path / "tensorboard" / f"client_lr-{row['client_lr']}"
                 / f"seed-{row['seed']}")
    events, hparams = _events(directory)
    assert list(events) == [7]
    assert events[7] == {
        "accuracy/global": np.float32(row["accuracy"]),
        "accuracy/worst_tier": np.float32(0.25),
        "accuracy/tier_1": np.float32(row["tier_1_accuracy"]),
        "accuracy/tier_0.5": np.float32(0.25),
        "bytes/up": np.float32(row["bytes_up"]),
        "bytes/down": np.float32(2e6), "time/simulated_s": np.float32(3.5)}
    start = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert start["client_lr"].number_value == row["client_lr"]
    assert start["seed"].number_value == row["seed"]
    assert start["num_clients"].number_value == config["num_clients"]


def test_a_full_disk_is_one_error_and_no_partial_event_file(tmp_path,
                                                           monkeypatch):
  import errno
  from tensorboardX import record_writer
  from fedjax_tl.errors import DiskFullError
  writer = writers.TensorBoardWriter(tmp_path / "tb")
  writer.write_scalars(0, {"accuracy/global": 0.5})

  def full(self, data):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(record_writer.RecordWriter, "write", full)
  with pytest.raises(DiskFullError, match="TensorBoard events"):
    writer.write_scalars(2, {"accuracy/global": 0.75})
  assert not list((tmp_path / "tb").iterdir())
