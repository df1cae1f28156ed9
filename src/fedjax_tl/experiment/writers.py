"""Metric writers: where a run's metrics records go besides metrics.jsonl.

`config.writers` names them, comma-separated (default "jsonl,tensorboard"):

- **jsonl**: metrics.jsonl, one record per evaluation (`outputs.Metrics`
  keeps it; it is what resume rebuilds from, so it is always written).
- **tensorboard**: event files in `WORKDIR/tensorboard/`, written with
  tensorboardX (no TensorFlow); every scalar of every record, tagged so each
  quantity's tiers share one chart (`accuracy/tier_0.5`), and the config as
  hparams with the final metrics.
- **wandb**, **mlflow**: the same scalars and config, to Weights & Biases
  (offline unless `WANDB_MODE` says otherwise) and to MLflow (a SQLite store
  in `WORKDIR/mlruns/` unless `MLFLOW_TRACKING_URI` says otherwise).
  Optional packages, imported only when named.

The interface is clu's `metric_writers` one (`write_scalars`,
`write_hparams`, `flush`, `close`) without clu, which would bring
TensorFlow. A writer sees a run's whole history each time it opens: a
resumed run replays the records restored from the checkpoint into fresh
event files (the old ones of that directory removed), so every step is
written once and the events equal metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import pathlib
import sys
import time
from typing import Any, Mapping, Protocol, Sequence

from fedjax_tl import files
from fedjax_tl.errors import ConfigError

# Writer name -> (module imported, what to pip install).
PACKAGES = {"jsonl": None, "tensorboard": ("tensorboardX", "tensorboardX"),
            "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
NAMES = tuple(PACKAGES)
DEFAULT = "jsonl,tensorboard"

# The workdir entries the writers create (workdir.OUTPUTS lists them).
OUTPUTS = ("tensorboard", "wandb", "mlruns")
EVENTS_DIR = "tensorboard"
_EVENTS_PREFIX = "events.out.tfevents."

# A metrics record's scalar keys and their tags; keys not listed go to
# "other/<key>", so a key a later version adds is still written.
_TAGS = {"accuracy": "accuracy/global", "source_accuracy": "accuracy/source",
         "local_accuracy": "accuracy/local", "loss": "loss/global",
         "train_loss": "loss/train", "bytes_up": "bytes/up",
         "bytes_down": "bytes/down", "sim_seconds": "time/simulated_s",
         "wall_seconds": "time/wall_s", "excluded": "faults/excluded",
         "excluded_total": "faults/excluded_total",
         "skipped_rounds": "faults/skipped_rounds",
         "worst_tier_accuracy": "accuracy/worst_tier",
         "dp_epsilon": "privacy/epsilon", "dp_delta": "privacy/delta",
         "dp_clip_norm": "privacy/clip_norm",
         "dp_overflow": "privacy/overflow"}
# A record's per-tier keys (`per_tier_<name>`, a dict tier -> value) and the
# group of their tags `<group>/tier_<tier>`; unlisted ones: `<name>/tier_..`.
_TIER_GROUPS = {"accuracy": "accuracy", "loss": "loss",
                "local_accuracy": "local_accuracy", "bytes_up": "bytes/up",
                "bytes_down": "bytes/down", "updates": "clients/updates",
                "dropped": "faults/dropped", "excluded": "faults/excluded"}
# The final metrics shown beside the hparams (tags, or groups ending in /).
_HPARAM_METRICS = ("accuracy/", "loss/global", "bytes/up", "bytes/down",
                   "time/simulated_s", "privacy/epsilon")


def check(value: Any) -> str | None:
  """What `config.writers` must be when `value` is wrong (keys.py's check):
  an unknown or repeated name, a list without jsonl, or a writer whose
  package is not installed (with the pip command that installs it); None
  when it is right."""
  if not isinstance(value, str):
    return f"must be a comma-separated list of {', '.join(NAMES)}"
  names = [n.strip() for n in value.split(",") if n.strip()]
  unknown = [n for n in names if n not in PACKAGES]
  if unknown:
    return f"unknown writer {unknown[0]!r}; writers are {', '.join(NAMES)}"
  if len(set(names)) < len(names):
    return "names a writer twice"
  if "jsonl" not in names:
    return "must include jsonl (metrics.jsonl: resume and the report read it)"
  for name in names:
    module, package = PACKAGES[name] or (None, None)
    if module is not None and not _installed(module):
      return (f"the {name} writer needs the {package} package, which is not "
              f"installed: pip install {package} (or drop {name})")
  if "mlflow" in names and "MLFLOW_TRACKING_URI" not in os.environ and \
      not _installed("sqlalchemy"):  # mlflow-skinny has no SQLite store
    return ("the mlflow writer's own store (a SQLite file in the workdir) "
            "needs the full mlflow package: pip install mlflow (or set "
            "MLFLOW_TRACKING_URI to a tracking server)")
  return None


def parse(value: Any) -> tuple[str, ...]:
  """`config.writers` as its names; ConfigError naming the key and value
  when `check` refuses it."""
  problem = check(value)
  if problem is not None:
    raise ConfigError(f"config.writers={value!r}: {problem}")
  return tuple(n.strip() for n in value.split(",") if n.strip())


def _installed(module: str) -> bool:
  # A module already imported (or put in sys.modules by a test) counts.
  return module in sys.modules or importlib.util.find_spec(module) is not None


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
  """A metrics record's numbers as writer tags -> values (`round` is the
  step; None, e.g. no train loss at round 0, is left out)."""
  out = {}
  for key, value in record.items():
    if key == "round" or value is None:
      continue
    if isinstance(value, Mapping):
      name = key.removeprefix("per_tier_")
      group = _TIER_GROUPS.get(name, name)
      out.update({f"{group}/tier_{tier}": float(v)
                  for tier, v in value.items() if v is not None})
    elif isinstance(value, (int, float)):  # bools are ints
      out[_TAGS.get(key, f"other/{key}")] = float(value)
  return out


def hparam_metrics(final: Mapping[str, float]) -> dict[str, float]:
  """The final scalars shown beside the hparams (accuracies, loss, bytes,
  simulated time, epsilon): the columns of TensorBoard's HParams table."""
  return {tag: v for tag, v in final.items() if any(
      tag.startswith(m) if m.endswith("/") else tag == m
      for m in _HPARAM_METRICS)}


def flat_hparams(config: Mapping[str, Any]) -> dict[str, Any]:
  """A config as hparams: numbers, bools and strings kept, None as "None",
  tuples and lists as their JSON text (what every backend accepts)."""
  return {k: ("None" if v is None else v if isinstance(v, (bool, int, float,
                                                           str))
              else json.dumps(v)) for k, v in config.items()}


class Writer(Protocol):
  """One backend (clu's MetricWriter's methods we use)."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    ...

  def write_hparams(self, hparams: Mapping[str, Any],
                    metrics: Mapping[str, float]) -> None:
    """The run's config and final metrics, once, when the run is done."""

  def flush(self) -> None:
    ...

  def close(self) -> None:
    ...


class TensorBoardWriter:
  """One event file in `directory`, written by tensorboardX's protobufs.

  Opening removes the directory's earlier event files (only those): the
  caller replays the whole history, so no step is written twice. Written
  synchronously (tensorboardX's SummaryWriter writes from a thread that
  dies silently on a full disk, after which its bounded queue blocks the
  run); a full disk is DiskFullError naming the file, which is removed.
  """

  def __init__(self, directory: pathlib.Path):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2, summary_pb2
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    with self._space_checked(directory):
      directory.mkdir(parents=True, exist_ok=True)
      for path in directory.iterdir():
        if path.name.startswith(_EVENTS_PREFIX) and path.is_file():
          path.unlink()
      self._writer = EventsWriter(str(directory / "events"))
    self.path = next(directory.glob(_EVENTS_PREFIX + "*"))  # the one left

  def _space_checked(self, path: pathlib.Path):
    return files.space_checked(path, "TensorBoard events", self._remove)

  def _remove(self) -> None:
    # A partial event file goes; the next start replays the whole history.
    if getattr(self, "path", None) is not None:
      self.path.unlink(missing_ok=True)

  def _write(self, summary: Any, step: int = 0) -> None:
    with self._space_checked(self.path):
      self._writer.write_event(self._event(
          wall_time=time.time(), step=step, summary=summary))
      self._writer.flush()  # each record visible to TensorBoard at once

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._write(self._summary(value=[
        self._summary.Value(tag=tag, simple_value=value)
        for tag, value in scalars.items()]), step)

  def write_hparams(self, hparams: Mapping[str, Any],
                    metrics: Mapping[str, float]) -> None:
    # The HParams plugin's experiment, session start and end; the metrics'
    # values are this run's scalars of those tags.
    from tensorboardX.summary import hparams as summaries
    for summary in summaries(dict(hparams), dict(metrics)):
      self._write(summary)

  def flush(self) -> None:
    with self._space_checked(self.path):
      self._writer.flush()

  def close(self) -> None:
    with self._space_checked(self.path):
      self._writer.close()


class WandbWriter:
  """One Weights & Biases run per process, files in `WORKDIR/wandb`;
  offline unless WANDB_MODE is set."""

  def __init__(self, directory: pathlib.Path, name: str,
               config: Mapping[str, Any]):
    wandb = importlib.import_module("wandb")
    directory.mkdir(parents=True, exist_ok=True)
    options = {} if "WANDB_MODE" in os.environ else {"mode": "offline"}
    self._run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "fedjax-tl"), name=name,
        dir=str(directory.parent), config=dict(config), **options)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._run.log(dict(scalars), step=step)

  def write_hparams(self, hparams: Mapping[str, Any],
                    metrics: Mapping[str, float]) -> None:
    self._run.config.update(dict(hparams), allow_val_change=True)
    self._run.summary.update(dict(metrics))

  def flush(self) -> None:
    pass  # wandb writes in the background; finish() waits for it

  def close(self) -> None:
    self._run.finish()


class MlflowWriter:
  """One MLflow run per process: the config as params, the scalars as
  metrics (tags with "/" kept); a SQLite store `WORKDIR/mlruns/mlflow.db`
  unless MLFLOW_TRACKING_URI is set."""

  def __init__(self, directory: pathlib.Path, name: str,
               config: Mapping[str, Any]):
    self._mlflow = mlflow = importlib.import_module("mlflow")
    if "MLFLOW_TRACKING_URI" not in os.environ:
      # A database store: MLflow 3 refuses a plain directory (file store).
      directory.mkdir(parents=True, exist_ok=True)
      mlflow.set_tracking_uri(f"sqlite:///{directory.resolve()}/mlflow.db")
    if "MLFLOW_EXPERIMENT_NAME" not in os.environ:
      mlflow.set_experiment("fedjax-tl")
    self._run = mlflow.start_run(run_name=name)
    # MLflow caps a param's text at 500 characters.
    mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._mlflow.log_metrics(dict(scalars), step=step)

  def write_hparams(self, hparams: Mapping[str, Any],
                    metrics: Mapping[str, float]) -> None:
    pass  # params are logged at the start and MLflow keeps them immutable

  def flush(self) -> None:
    pass

  def close(self) -> None:
    self._mlflow.end_run()


class Writers:
  """The backends of `config.writers` but jsonl, as one writer."""

  def __init__(self, backends: Sequence[Writer]):
    self.backends = list(backends)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for backend in self.backends:
      backend.write_scalars(step, scalars)

  def write_record(self, record: Mapping[str, Any]) -> None:
    """One metrics record, at its round."""
    self.write_scalars(int(record["round"]), scalars(record))

  def write_hparams(self, hparams: Mapping[str, Any],
                    metrics: Mapping[str, float]) -> None:
    for backend in self.backends:
      backend.write_hparams(hparams, metrics)

  def finish(self, config: Mapping[str, Any],
             final: Mapping[str, Any]) -> None:
    """The config as hparams beside the final record's headline metrics."""
    self.write_hparams(flat_hparams(config), hparam_metrics(scalars(final)))

  def flush(self) -> None:
    for backend in self.backends:
      backend.flush()

  def close(self) -> None:
    for backend in self.backends:
      backend.close()


def open_writers(names: str, workdir: pathlib.Path, config: Mapping[str, Any],
                 run: str = "") -> Writers:
  """The writers of `names` (`config.writers`) for a run in `workdir`.

  `run`: a sweep's run, written in `tensorboard/<run>/` and named so in W&B
  and MLflow (default: the workdir's name, e.g. the policy of a
  `compare`). Under jax.distributed only process 0 writes.
  """
  import jax
  if jax.process_index() != 0:
    return Writers([])
  hparams, name = flat_hparams(config), run or workdir.resolve().name
  result = Writers([])
  try:
    for writer in parse(names):
      if writer == "tensorboard":
        result.backends.append(TensorBoardWriter(workdir / EVENTS_DIR / run))
      elif writer == "wandb":
        result.backends.append(WandbWriter(workdir / "wandb", name, hparams))
      elif writer == "mlflow":
        result.backends.append(MlflowWriter(workdir / "mlruns", name,
                                             hparams))
  except BaseException:  # those opened already are closed again
    with contextlib.suppress(Exception):
      result.close()
    raise
  return result


@contextlib.contextmanager
def opened(names: str, workdir: pathlib.Path, config: Mapping[str, Any],
           run: str = ""):
  """`open_writers` for a `with` block, closed however it ends; a failure
  while closing after another (e.g. a full disk) does not hide the first."""
  writer = open_writers(names, workdir, config, run)
  try:
    yield writer
  except BaseException:
    with contextlib.suppress(Exception):
      writer.close()
    raise
  writer.close()


def write_sweep(names: str, workdir: pathlib.Path, config: Mapping[str, Any],
                rows: Sequence[Mapping[str, Any]], step: int,
                run_keys: Sequence[str]) -> None:
  """A sweep's rows (sweep.csv's), each as its own run at `step` (the
  rounds run): `tensorboard/<run>/` named by the row's `run_keys` values
  (its discrete setting, swept values and seed), the row's numbers as
  scalars and `config` with those values as hparams, so TensorBoard's
  HParams table lists the sweep."""
  for row in rows:
    keys = [k for k in run_keys if k in row]
    hparams = {**config, **{k: row[k] for k in keys}}
    record = {"round": step, "per_tier_accuracy": {}}
    for key, value in row.items():
      if key.startswith("tier_") and key.endswith("_accuracy"):
        record["per_tier_accuracy"][key[5:-len("_accuracy")]] = value
      elif key not in keys:
        record[key] = value
    with opened(names, workdir, hparams,
                run="/".join(f"{k}-{row[k]}" for k in keys)) as writer:
      writer.write_record(record)
      writer.finish(hparams, record)
