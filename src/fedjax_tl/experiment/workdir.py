"""The work directory: who owns it, which experiment it holds, and what this
package writes there.

- **One owner**: a run holds an exclusive OS lock on `WORKDIR/.lock`
  (`fcntl.flock`, released by the kernel when the process ends, however it
  ends); the file holds the holder's pid while it runs. A second run exits 2
  at once naming that pid.
- **Ours only**: `WORKDIR/.fedjax_tl_manifest.json` lists the output names
  this package claimed (free when it first started there); `--overwrite`
  removes only those. A config.json this package did not write is refused
  whatever the flags.
- **One identity**: the run's identity (its config without the
  RESUMABLE_KEYS, the data's and the pretrained model's digests) is saved in
  every checkpoint; a run resumes only from checkpoints of its own identity.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any

from fedjax_tl import checkpoint, files, policies
from fedjax_tl.config import ExperimentConfig
from fedjax_tl.errors import UserError
from fedjax_tl.experiment.keys import BY_NAME
from fedjax_tl.experiment.writers import OUTPUTS as WRITER_OUTPUTS

# Files this package writes in a workdir; --overwrite removes only those of
# them the workdir's manifest lists.
OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints",
           "pretrained", "corrupt-pretrained", "sweep.csv", "sweep.md",
           "groups", *WRITER_OUTPUTS,
           *(f"{name}.json" for name in policies.names_where(
               lambda p: p.prepare is not None)))  # prepared_params
LOCK = ".lock"
MANIFEST = ".fedjax_tl_manifest.json"
_TOOL = "fedjax-tl"

# Keys a run may change and still resume: they do not change its results.
RESUMABLE_KEYS = ("num_rounds", "rounds_per_call", "data_placement",
                  "writers", "memory_check")


def _name(workdir: pathlib.Path) -> str:
  return f"--workdir={str(workdir)!r}"


def _lexists(path: pathlib.Path) -> bool:
  return os.path.lexists(path)


def read_manifest(workdir: pathlib.Path) -> list[str] | None:
  """The output names this package claimed in `workdir`, or None when it
  holds no (readable) manifest of ours."""
  try:
    saved = json.loads((workdir / MANIFEST).read_text())
  except (OSError, ValueError):
    return None
  if not (isinstance(saved, dict) and saved.get("tool") == _TOOL and
          isinstance(saved.get("outputs"), list)):
    return None
  return [n for n in saved["outputs"] if n in OUTPUTS]


def _config_part(cfg: ExperimentConfig) -> dict[str, Any]:
  """The config as JSON reads it back, without the RESUMABLE_KEYS."""
  return {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items()
          if k not in RESUMABLE_KEYS}


def _looks_like_ours(saved: Any, new: dict[str, Any]) -> bool:
  """A config.json of this package written before manifests existed."""
  return (isinstance(saved, dict) and bool(saved) and set(saved) <= set(new)
          and {"algorithm", "policy", "num_rounds", "seed"} <= set(saved))


def check_workdir(workdir: pathlib.Path, cfg: ExperimentConfig,
                  overwrite: bool) -> bool:
  """Refuses a workdir that is not this experiment's to resume.

  The same experiment (all keys equal but the RESUMABLE_KEYS) resumes; one
  of ours holding another experiment is replaced only with `overwrite`; a
  config.json this package did not write, or outputs without a config.json
  and manifest, are refused whatever the flags. Checkpoints of another
  config or past `num_rounds` are refused. Nothing is written or removed
  here; returns whether old outputs must be replaced.
  """
  if _lexists(workdir) and not workdir.is_dir():
    raise UserError(f"{_name(workdir)} is not a directory")
  if not workdir.exists():
    return False
  manifest, saved_file = read_manifest(workdir), workdir / "config.json"
  new = json.loads(json.dumps(cfg.to_dict()))
  if not _lexists(saved_file):
    present = [n for n in OUTPUTS if _lexists(workdir / n)]
    if not present:
      return False
    if manifest is None:
      raise UserError(
          f"{_name(workdir)} holds {', '.join(present)} but neither "
          f"config.json nor {MANIFEST}: cannot tell which experiment (or "
          "tool) wrote them; nothing was changed: use another --workdir")
    if not overwrite:
      raise UserError(
          f"{_name(workdir)} holds {', '.join(present)} but no config.json: "
          "cannot tell which experiment wrote them, so nothing is resumed; "
          "use --overwrite to replace them, or another --workdir")
    return True
  try:
    saved = json.loads(saved_file.read_text())
  except (OSError, ValueError):
    saved = None
  if manifest is None and not _looks_like_ours(saved, new):
    raise UserError(
        f"{_name(workdir)} holds a config.json that fedjax-tl did not write "
        f"(no {MANIFEST}); it is left alone whatever the flags: use "
        "another --workdir")
  strip = lambda d: {k: v for k, v in d.items() if k not in RESUMABLE_KEYS}
  if isinstance(saved, dict) and strip(saved) == strip(new):
    check_checkpoints(workdir, {"config": _config_part(cfg)},
                      cfg.num_rounds)
    return False
  if not overwrite:
    if isinstance(saved, dict):
      _refuse_moved_followers(workdir, saved, new)
    diff = ("unreadable config.json" if not isinstance(saved, dict) else
            ", ".join(f"{k}: {saved.get(k)!r} -> {new[k]!r}" for k in new
                      if k not in RESUMABLE_KEYS and saved.get(k) != new[k]
                      )[:300])
    raise UserError(f"{_name(workdir)} holds a different "
                    f"experiment ({diff}); use --overwrite to replace it")
  return True


def _refuse_moved_followers(workdir: pathlib.Path, saved: dict[str, Any],
                            new: dict[str, Any]) -> None:
  """Refuses, saying how to resume, a config that differs from the saved
  one only in keys derived from a resumable key it changed: ScaleFL's
  `scalefl_kd_start` left unset follows `num_rounds`, so extending the run
  moves the start under the rounds already done. Passing the old value
  resumes it. Returns when the configs differ otherwise."""
  differ = [BY_NAME[k] for k in new
            if k not in RESUMABLE_KEYS and saved.get(k) != new[k]]
  if not differ or any(key.follows is None or saved.get(key.name) is None
                       or saved.get(key.follows) == new[key.follows]
                       for key in differ):
    return
  held = ", ".join(
      f"{key.name}={saved[key.name]!r}, not {new[key.name]!r} (when unset "
      f"it follows {key.follows}: {saved.get(key.follows)!r} there, "
      f"{new[key.follows]!r} here)" for key in differ)
  flags = " ".join(f"--config.{key.name}={saved[key.name]!r}"
                   for key in differ)
  raise UserError(f"{_name(workdir)} holds this run with {held}; pass "
                  f"{flags} to extend it as it ran, or --overwrite to "
                  "replace it")


def run_identity(cfg: ExperimentConfig, exp: Any, params: Any
                 ) -> dict[str, Any]:
  """What a checkpoint must match to be resumed: the config without the
  RESUMABLE_KEYS (and its digest), the digest of the data (the clients'
  arrays and the target test set) and of the pretrained params."""
  config = _config_part(cfg)
  data = exp.data
  return {"config": config,
          "config_sha256": hashlib.sha256(json.dumps(
              config, sort_keys=True).encode()).hexdigest(),
          "data_sha256": checkpoint.state_digest(
              (data.clients.x, data.clients.y, data.clients.count,
               data.target_test.x, data.target_test.y)),
          "pretrained_sha256": checkpoint.state_digest(params)}


def identity_difference(saved: Any, ours: dict[str, Any]) -> str | None:
  """What differs between a checkpoint's identity and `ours` (only the
  parts `ours` holds), in a few words; None when they agree."""
  if not isinstance(saved, dict):
    return "it carries no identity (written by an older fedjax-tl)"
  parts = []
  if "config" in ours and saved.get("config") != ours["config"]:
    old = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    keys = list(ours["config"]) + [k for k in old if k not in ours["config"]]
    parts.append("config " + ", ".join(
        f"{k}: {old.get(k)!r} -> {ours['config'].get(k)!r}" for k in keys
        if old.get(k) != ours["config"].get(k)))
  for key, what in (("data_sha256", "the data"),
                    ("pretrained_sha256", "the pretrained model")):
    if key in ours and saved.get(key) != ours[key]:
      parts.append(f"{what} (sha256 {str(saved.get(key))[:12]} -> "
                   f"{ours[key][:12]})")
  return "; ".join(parts)[:300] or None


def check_checkpoints(workdir: pathlib.Path, identity: dict[str, Any],
                      num_rounds: int | None = None) -> None:
  """Refuses (UserError) checkpoints of another identity, and rounds done
  past `num_rounds`; reads only, so nothing is touched. Steps whose JSON
  cannot be read are left to the restore (damaged: moved aside)."""
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return
  steps = sorted(int(p.name) for p in directory.iterdir()
                 if p.name.isdigit() and p.is_dir())
  if num_rounds is not None and steps and steps[-1] > num_rounds:
    raise UserError(
        f"{_name(workdir)} has {steps[-1]} rounds done (checkpoints/"
        f"{steps[-1]}) but config.num_rounds={num_rounds}: asking for fewer "
        f"rounds than are done is refused; use num_rounds>={steps[-1]}, or "
        "another --workdir")
  for step in reversed(steps):
    try:
      saved = json.loads((directory / str(step) / "digest" / "metadata"
                          ).read_text())
    except (OSError, ValueError):
      continue
    diff = identity_difference(
        saved.get("identity") if isinstance(saved, dict) else None, identity)
    if diff:
      raise UserError(
          f"checkpoint of round {step} in {_name(workdir)} is not this "
          f"run's ({diff}); nothing was resumed or changed: use another "
          "--workdir")


@contextlib.contextmanager
def locked(workdir: pathlib.Path):
  """Holds the workdir's exclusive lock (`WORKDIR/.lock`, created with the
  workdir if need be) for the `with` block.

  A second holder is refused at once (UserError naming the pid written in
  the lock file). The kernel releases the lock when the process dies, so a
  killed run leaves no stale lock. A workdir this call created is removed
  again if the block fails while it holds nothing but the lock. Under
  jax.distributed only process 0 takes the lock.
  """
  import jax
  if jax.process_index() != 0:
    yield
    return
  if _lexists(workdir) and not workdir.is_dir():
    raise UserError(f"{_name(workdir)} is not a directory")
  created = not workdir.exists()
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW |
                 os.O_CLOEXEC, 0o644)
  except OSError as e:
    raise UserError(f"{_name(workdir)}: cannot create its lock file "
                    f"{LOCK} ({e.strerror})") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
    os.close(fd)
    raise UserError(
        f"{_name(workdir)} is in use by another run (process "
        f"{holder or 'unknown'} holds {workdir / LOCK}); wait for it to end "
        "or stop it") from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
  ok = False
  try:
    yield
    ok = True
  finally:
    if not ok and created and os.listdir(workdir) == [LOCK]:
      os.unlink(workdir / LOCK)  # a refused fresh run leaves nothing behind
      os.rmdir(workdir)
    else:
      os.ftruncate(fd, 0)  # the pid goes with the holder
    os.close(fd)  # releases the lock


def start_workdir(workdir: pathlib.Path, cfg: ExperimentConfig,
                  replace: bool) -> None:
  """Removes this package's old outputs if `replace` (only the names the
  manifest lists; all OUTPUTS for a workdir of ours written before
  manifests), claims the free output names in the manifest, removes the
  temporary files a killed run's atomic writes left, then saves the
  config."""
  manifest = read_manifest(workdir) if workdir.exists() else None
  if replace:
    # config.json last: a run killed while replacing still names the old
    # experiment, so its leftover checkpoints are never resumed as the new.
    names = OUTPUTS if manifest is None else manifest
    for name in sorted(names, key=lambda name: name == "config.json"):
      path = workdir / name
      if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
      elif _lexists(path):
        path.unlink()
  workdir.mkdir(parents=True, exist_ok=True)
  claimed = set(manifest or ()) | {n for n in OUTPUTS
                                   if not _lexists(workdir / n)}
  if manifest is None and _lexists(workdir / "config.json"):
    claimed = set(OUTPUTS)  # ours (check_workdir), from before manifests
  for name in (*claimed, MANIFEST):  # a killed run's half-written files
    files.remove_stale_temporaries(workdir / name)
  if manifest is None or claimed != set(manifest):
    files.write_json_atomic(workdir / MANIFEST, {
        "tool": _TOOL, "outputs": sorted(claimed)})
  files.write_json_atomic(workdir / "config.json", cfg.to_dict())
