"""The work directory: which experiment owns it, and what this package writes
there (config.json first; --overwrite removes only this package's outputs).
"""

from __future__ import annotations

import json
import pathlib
import shutil

from fedjax_tl import checkpoint, policies
from fedjax_tl.config import ExperimentConfig
from fedjax_tl.errors import UserError

# Files this package writes in a workdir; --overwrite removes only these.
OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints",
           "pretrained", "sweep.csv", "sweep.md", "groups", *(
               f"{name}.json" for name in policies.names_where(
                   lambda p: p.prepare is not None)))  # prepared_params



# Keys a run may change and still resume: they do not change its results.
RESUMABLE_KEYS = ("num_rounds", "rounds_per_call", "data_placement")


def check_workdir(workdir: pathlib.Path, cfg: ExperimentConfig,
                  overwrite: bool) -> bool:
  """Refuses a workdir holding another experiment, unless `overwrite`.

  The same experiment (all keys equal but the RESUMABLE_KEYS) resumes.
  Nothing is written or removed here; returns whether old outputs must be
  replaced.
  """
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir={str(workdir)!r} is not a directory")
  saved_file = workdir / "config.json"
  if not saved_file.exists():
    return False
  try:
    saved = json.loads(saved_file.read_text())
  except json.JSONDecodeError:
    saved = None
  new = cfg.to_dict()
  if isinstance(saved, dict) and {k: v for k, v in saved.items()
                                  if k not in RESUMABLE_KEYS} == {
                                      k: v for k, v in new.items()
                                      if k not in RESUMABLE_KEYS}:
    return False
  if not overwrite:
    diff = ("unreadable config.json" if not isinstance(saved, dict) else
            ", ".join(f"{k}: {saved.get(k)!r} -> {new[k]!r}" for k in new
                      if k not in RESUMABLE_KEYS and saved.get(k) != new[k]
                      )[:300])
    raise UserError(f"--workdir={str(workdir)!r} holds a different "
                    f"experiment ({diff}); use --overwrite to replace it")
  return True


def start_workdir(workdir: pathlib.Path, cfg: ExperimentConfig,
                  replace: bool) -> None:
  """Removes this package's old outputs if `replace`, then saves the config."""
  if replace:
    # config.json last: a run killed while replacing still names the old
    # experiment, so its leftover checkpoints are never resumed as the new.
    for name in sorted(OUTPUTS, key=lambda name: name == "config.json"):
      path = workdir / name
      if path.is_dir():
        shutil.rmtree(path)
      elif path.exists():
        path.unlink()
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoint.write_text_atomic(workdir / "config.json",
                               json.dumps(cfg.to_dict(), indent=2) + "\n")


