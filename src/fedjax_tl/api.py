"""The Python API for scripts and notebooks: configs, runs and results.

`get_config` -> `run` -> `Result` (summary, evaluation records, pandas
frames); `compare` and `run_sweep` return DataFrames. Same checks, files and
numbers as the CLI, which shares the runner underneath.

pandas is imported only for the frames: the light install (`pip install .`)
leaves it out, and `run` and `Result` work without it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

from fedjax_tl import config as config_lib
from fedjax_tl import models, runner
from fedjax_tl.config import ExperimentConfig
from fedjax_tl.data import npz_source
from fedjax_tl.errors import DataError, UserError
from fedjax_tl.experiment.keys import ARRAYS
from fedjax_tl.overrides import parse_value

if TYPE_CHECKING:
  import pandas as pd

# A shipped config `NAME[:arg]`, a config file `path.py[:arg]`, a
# ConfigDict, or None (the default).
ConfigLike = ml_collections.ConfigDict | str | pathlib.Path | None


def _override_text(value: Any) -> str:
  """A Python value as the CLI text that parses back to it."""
  if isinstance(value, np.ndarray):
    value = value.tolist()
  elif isinstance(value, np.generic):  # e.g. np.float64 from a search space
    value = value.item()
  if isinstance(value, list):
    value = tuple(value)
  if isinstance(value, str) and parse_value(value) == value:
    return value  # as typed on the command line, so errors quote it the same
  return repr(value)


def get_config(spec: ConfigLike = None, **overrides: Any
               ) -> ml_collections.ConfigDict:
  """Loads and checks a config, like `--config=SPEC --config.KEY=VALUE`.

  Args:
    spec: a shipped config's name `NAME[:arg]` (`fedjax_tl.configs`), a
      config file `path/to/config.py[:arg]` or a ConfigDict (copied); None
      for the built-in default experiment.
    **overrides: config keys and Python values, e.g. `num_rounds=10`;
      dotted keys as `**{"a.b": 1}`.

  Returns:
    The ConfigDict with the overrides applied, already validated, so a bad
    key or value fails here rather than inside a run.

  Raises:
    ConfigError: an unknown key, a value of the wrong type or out of range
      (the CLI's message, naming the key and value).
  """
  if isinstance(spec, ml_collections.ConfigDict):
    base = ml_collections.ConfigDict(spec)
  else:
    base = config_lib.load_config(None if spec is None else str(spec))
  config = config_lib.apply_overrides(
      base, [(key, _override_text(value)) for key, value in overrides.items()])
  config_lib.validate(config)
  return config


def _pandas() -> Any:
  """The pandas module, or UserError naming the extra that installs it."""
  try:
    import pandas  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError('DataFrames need pandas: pip install "fedjax-tl[notebooks]"'
                    " (or pip install pandas)") from None
  return pandas


# The temporary workdirs of this process's calls without a workdir: each
# stays for `report` and `load_result` while the process lives, and goes
# when it exits (TemporaryDirectory's finalizer), so nothing is left in /tmp.
_TEMPORARY: list[tempfile.TemporaryDirectory] = []


def _workdir(workdir: str | pathlib.Path | None) -> pathlib.Path:
  if workdir is None:
    temporary = tempfile.TemporaryDirectory(prefix="fedjax-tl-",
                                            ignore_cleanup_errors=True)
    _TEMPORARY.append(temporary)
    return pathlib.Path(temporary.name)
  return pathlib.Path(workdir)


@dataclasses.dataclass(frozen=True)
class Result:
  """A finished run: what it wrote in `workdir`, as Python objects.

  Everything but `workdir` is held in memory: a Result stays usable when
  the directory is gone (a run without a workdir has its temporary one
  removed when the Python process exits).

  Attributes:
    workdir: the run's directory (metrics.jsonl, summary.json, checkpoints).
    summary: summary.json: final and per-tier accuracy, bytes, simulated
      seconds, the run's settings.
    records: metrics.jsonl, one dict per evaluated round (round 0 first).
    config: config.json, the validated config as saved.
  """
  workdir: pathlib.Path
  summary: dict[str, Any]
  records: list[dict[str, Any]]
  config: dict[str, Any]

  @property
  def accuracy(self) -> float:
    """The final global accuracy (the widest tier's model)."""
    return self.summary["accuracy"]

  @property
  def worst_tier_accuracy(self) -> float:
    """The final accuracy of the worst tier's deployed model."""
    return self.summary["worst_tier_accuracy"]

  def metrics_frame(self) -> pd.DataFrame:
    """One row per evaluated round (index `round`), the scalar metrics.

    Columns: accuracy, loss, source_accuracy, train_loss, local_accuracy,
    bytes_down, bytes_up, sim_seconds, wall_seconds (and any other scalar a
    record holds), plus `worst_tier_accuracy` and `bytes` (up + down).
    Per-tier figures are in `tier_frame`.
    """
    rows = [{k: v for k, v in r.items() if not isinstance(v, dict)}
            for r in self.records]
    frame = _pandas().DataFrame(rows).set_index("round")
    frame["worst_tier_accuracy"] = [min(r["per_tier_accuracy"].values())
                                    for r in self.records]
    frame["bytes"] = frame["bytes_up"] + frame["bytes_down"]
    return frame

  def tier_frame(self) -> pd.DataFrame:
    """One row per evaluated round and tier (long format).

    Columns: round, tier (its name), then one column per `per_tier_<name>`
    record field without the prefix: accuracy, loss, local_accuracy,
    bytes_down, bytes_up, updates, dropped. E.g. accuracy curves per tier:
    `frame.pivot(index="round", columns="tier", values="accuracy")`.
    """
    rows = []
    for record in self.records:
      fields = {k[len("per_tier_"):]: v for k, v in record.items()
                if k.startswith("per_tier_") and isinstance(v, dict)}
      for tier in record["per_tier_accuracy"]:
        rows.append({"round": record["round"], "tier": tier,
                     **{name: values.get(tier)
                        for name, values in fields.items()}})
    return _pandas().DataFrame(rows)


def load_result(workdir: str | pathlib.Path) -> Result:
  """The Result of a finished run directory (e.g. one the CLI wrote).

  Raises:
    UserError: `workdir` holds no metrics.jsonl and summary.json.
    DataError: one of them is not valid JSON.
  """
  workdir = pathlib.Path(workdir)
  files = {name: workdir / name for name in
           ("summary.json", "metrics.jsonl", "config.json")}
  for name in ("summary.json", "metrics.jsonl"):
    if not files[name].is_file():
      raise UserError(f"{str(workdir)!r}: no {name} (not a finished run "
                      "directory)")
  try:
    summary = json.loads(files["summary.json"].read_text())
    records = [json.loads(line) for line in
               files["metrics.jsonl"].read_text().splitlines() if line.strip()]
    config = (json.loads(files["config.json"].read_text())
              if files["config.json"].is_file() else {})
  except json.JSONDecodeError as e:
    raise DataError(f"{str(workdir)!r}: malformed JSON ({e})") from None
  return Result(workdir, summary, records, config)


def run(config: ConfigLike | ExperimentConfig = None,
        workdir: str | pathlib.Path | None = None,
        *, overwrite: bool = False, progress: bool = True,
        quiet: bool = False, model: Any = None,
        data: Mapping[str, Any] | None = None) -> Result:
  """Runs (or resumes) one experiment, like `fedjax-tl run`.

  Args:
    config: what `get_config` accepts (a ConfigDict, a config file spec or
      None for the default), or a validated ExperimentConfig.
    workdir: where its files go; None for a fresh temporary directory,
      removed when the Python process exits (`Result.workdir` until then).
    overwrite: replace a workdir holding a different experiment.
    progress: show a progress bar.
    quiet: no log lines and no progress bar.
    model: your own model instead of `config.model`: an NNX module (class
      or instance), a Linen module, a `ModelDef` or a builder
      (`models.as_model`); the
      config records its name (`models.register`).
    data: the run's data as arrays instead of `config.data`: the names of
      an `.npz` data set (docs/data.md: `source_x`, `source_y`, the padded
      `clients_x [clients, examples, ...]`, `clients_y`, `clients_count`,
      `test_x`, `test_y`, ...), where `clients={id: {"x": ..., "y": ...}}`
      may replace the padded clients and `num_classes` may be left out
      (largest label + 1). `num_clients` is the data's (an explicit,
      different one is a ConfigError); the config records `data='arrays'`
      and the run's identity the arrays' digest, so a resume needs the same
      arrays. Checked as an `.npz` file is.

  Returns:
    The run's Result.

  Raises:
    ConfigError: a bad config value (before anything runs).
    UserError: a workdir holding a different experiment, without
      `overwrite`; a bad data, trace or checkpoint file; bad `data` arrays
      (DataError).
  """
  if model is not None:
    name = models.register(model)
    config = (dataclasses.replace(config, model=name)
              if isinstance(config, ExperimentConfig) else
              get_config(config, model=name))
  arrays = None
  if data is not None:
    arrays = npz_source.client_arrays(data)
    config = _with_arrays(config, arrays)
  cfg = (config if isinstance(config, ExperimentConfig) else
         config_lib.validate(get_config(config)))
  workdir = _workdir(workdir)
  runner.run(cfg, workdir, overwrite=overwrite, progress=progress,
             quiet=quiet, arrays=arrays)
  return load_result(workdir)


def _with_arrays(config: ConfigLike | ExperimentConfig,
                 arrays: Mapping[str, Any]
                 ) -> ml_collections.ConfigDict | ExperimentConfig:
  """`config` with `data=arrays` and the arrays' `num_clients` (an explicit
  other one, or any in a validated ExperimentConfig, must equal it)."""
  if isinstance(config, ExperimentConfig):
    count = npz_source.check_num_clients(config.num_clients, arrays)
    return dataclasses.replace(config, data=ARRAYS, num_clients=count)
  base = get_config(config)
  count = npz_source.check_num_clients(base.num_clients, arrays)
  return get_config(base, data=ARRAYS, num_clients=count)


def _table(command: Callable[..., list[dict[str, Any]]],
           config: ml_collections.ConfigDict,
           workdir: str | pathlib.Path | None, **options: Any
           ) -> pd.DataFrame:
  """Runs a command writing a CSV table; its rows as a DataFrame whose
  `attrs["workdir"]` says where."""
  pd = _pandas()  # before the runs, not after them
  workdir = _workdir(workdir)
  frame = pd.DataFrame(command(config, workdir, **options))
  frame.attrs["workdir"] = str(workdir)
  return frame


def compare(config: ConfigLike = None,
            workdir: str | pathlib.Path | None = None, *,
            policies: Sequence[str] | None = None, overwrite: bool = False,
            progress: bool = True, quiet: bool = False) -> pd.DataFrame:
  """Runs migration policies side by side, like `fedjax-tl compare`.

  Args:
    config: what `get_config` accepts.
    workdir: where comparison.csv and one run directory per policy go; None
      for a fresh temporary directory (`frame.attrs["workdir"]`).
    policies: the policies to run, instead of `config.compare_policies`.
    overwrite, progress, quiet: as for `run`.

  Returns:
    comparison.csv as a DataFrame, one row per policy (column `policy`):
    global, worst-tier and per-tier (`tier_<name>_accuracy`) accuracy,
    bytes, simulated and wall seconds. Each policy's own Result:
    `load_result(pathlib.Path(frame.attrs["workdir"]) / policy)`.
  """
  overrides = {} if policies is None else {"compare_policies": tuple(policies)}
  return _table(runner.compare, get_config(config, **overrides), workdir,
                overwrite=overwrite, progress=progress, quiet=quiet)


def run_sweep(config: ConfigLike = None,
              workdir: str | pathlib.Path | None = None, *,
              overwrite: bool = False, progress: bool = True,
              quiet: bool = False) -> pd.DataFrame:
  """Runs the config's sweep spec (`sweep_*` keys), like `fedjax-tl sweep`.

  Returns:
    sweep.csv as a DataFrame: one row per setting and seed, the swept values
    then the final accuracies, bytes and simulated seconds;
    `frame.attrs["workdir"]` is where it was written.
  """
  from fedjax_tl import sweep as sweep_lib
  return _table(sweep_lib.sweep, get_config(config), workdir,
                overwrite=overwrite, progress=progress, quiet=quiet)


def write_report(dirs: str | pathlib.Path | Sequence[str | pathlib.Path],
                 out: str | pathlib.Path | None = None) -> list[pathlib.Path]:
  """Plots and summarises run, compare and sweep directories, like
  `fedjax-tl report`; returns the files written (report.md and report.html
  first, then each plot as PNG and SVG)."""
  from fedjax_tl import report
  if isinstance(dirs, (str, pathlib.Path)):
    dirs = [dirs]
  return report.report(dirs, out)
