"""Checkpoints with orbax: the server state every n rounds, pretrained params.

A round checkpoint holds the whole `ServerState` (params, optimiser state,
round index, cumulative totals including the simulated device clock
`totals["sim_seconds"]` that trace availability and over-commitment read,
per-device width caps) plus a SHA-256 digest of it. Nothing else needs
saving: every random draw (cohort, masks, batches) comes from
`fold_in(seed, round)`, so the RNG is stateless and a resumed run replays the
same stream. Orbax writes each step to a temporary directory and renames it
when complete, so a run killed mid-write leaves the previous checkpoint
intact; a step whose files were damaged afterwards fails to load or fails
its digest, and is moved aside (never deleted) for the one before it.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import glob
import hashlib
import io
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjax_tl.errors import DiskFullError, UserError

# Step directories that failed to load are renamed to `corrupt-<step>`.
CORRUPT_PREFIX = "corrupt-"


class CorruptCheckpointError(UserError):
  """A round checkpoint that cannot be read, or whose contents changed."""


def state_digest(tree: Any) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes, in tree order."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype.str}|"
                  f"{array.shape}\n".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def first_non_finite(tree: Any) -> str | None:
  """The path (`jax.tree_util.keystr`) of the first floating leaf holding a
  NaN or Inf, or None when every value is finite."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.asarray(leaf)
    if np.issubdtype(array.dtype, np.inexact) and \
        not np.isfinite(array).all():
      return jax.tree_util.keystr(path)
  return None


def _disk_full(e: BaseException | None) -> bool:
  """Whether `e` (or what it was raised from) says there is no space left:
  an OSError with ENOSPC / EDQUOT, or, from a library that wraps it (orbax,
  tensorstore), the C library's message for them."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in DiskFullError.ERRNOS:
      return True
    if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


@contextlib.contextmanager
def space_checked(path: pathlib.Path, what: str,
                  partial: Callable[[], Any] = lambda: None):
  """Turns a write failing for lack of space into DiskFullError (one line
  naming `path` and `what`, exit 1), once `partial()` has removed what the
  write left."""
  try:
    yield
  except Exception as e:  # orbax may wrap the OSError in its own type
    if not _disk_full(e):
      raise
    partial()
    raise DiskFullError(path, what) from None


def _remove_orbax_tmp(directory: pathlib.Path, name: str) -> None:
  """Removes orbax's temporary directories of step (or path) `name`, what an
  interrupted write leaves."""
  for tmp in directory.glob(f"{name}.orbax-checkpoint-tmp*"):
    shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: pathlib.Path, text: str) -> None:
  """Writes `path` so that a crash leaves either the old or the new text.

  The text goes to a new temporary file beside it (a random name, created
  exclusively and never through a symlink: `tempfile.mkstemp` opens with
  O_EXCL | O_NOFOLLOW), is flushed to disk, and replaces `path` by
  `os.replace` (atomic on POSIX; a symlink at `path` is replaced, not
  followed). On any failure the temporary file is removed; a full disk is
  DiskFullError naming `path`.
  """
  path = pathlib.Path(path)
  with space_checked(path, path.name):
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                               dir=path.parent)
    try:
      os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would have created it
      with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
      raise


def write_csv_atomic(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
  """`rows` as CSV (a header of the first row's keys), written like
  :func:`write_text_atomic`: all or nothing, a full disk one DiskFullError."""
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  write_text_atomic(path, text.getvalue())


def remove_stale_temporaries(path: pathlib.Path) -> None:
  """Removes what a write of `path` left beside it when its process was
  killed mid-write (SIGKILL runs no cleanup): the temporary files of
  :func:`write_text_atomic` and orbax's temporary directories
  (`NAME.orbax-checkpoint-tmp*`, e.g. of :func:`save_params`).

  Only regular files named as `mkstemp` names them (`.NAME.` + 8 random
  characters + `.tmp`), and directories; a symlink is never followed nor
  removed. Call it while holding the directory's lock: another writer's
  file is in flight.
  """
  path = pathlib.Path(path)
  for tmp in path.parent.glob(f".{glob.escape(path.name)}.{'?' * 8}.tmp"):
    if tmp.is_file() and not tmp.is_symlink():
      with contextlib.suppress(OSError):
        tmp.unlink()
  _remove_orbax_tmp(path.parent, glob.escape(path.name))


def _read_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


_UMASK = _read_umask()


def strict_json(value: Any) -> Any:
  """`value` with every non-finite float (NaN, Inf) as None, so that it
  dumps as strict JSON (`null`)."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict_json(v) for v in value]
  return value


def dumps(value: Any, **options: Any) -> str:
  """Strict JSON text of `value` (non-finite floats as null)."""
  return json.dumps(strict_json(value), allow_nan=False, **options)


def write_json_atomic(path: pathlib.Path, value: Any) -> None:
  """Writes `value` as strict, indented JSON with `write_text_atomic`."""
  write_text_atomic(path, dumps(value, indent=2) + "\n")


@contextlib.contextmanager
def _quiet_orbax():
  """Silences orbax's and tensorstore's own reports of a failed read.

  A damaged step makes orbax log errors and leaves coroutines whose
  exceptions Python prints at garbage collection; the caller reports the
  failure in one line of its own instead.
  """
  logger = logging.getLogger("absl")
  level, hook = logger.level, sys.unraisablehook
  logger.setLevel(logging.CRITICAL)
  sys.unraisablehook = lambda _: None
  try:
    yield
  finally:
    gc.collect()  # the failed read's coroutines, while the hook is muted
    sys.unraisablehook = hook
    logger.setLevel(level)


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return (text.splitlines()[0] if text else type(e).__name__)[:160]


def history(lines: list[str]) -> dict[str, Any]:
  """A checkpoint's copy of metrics.jsonl up to its round: the record
  count, the SHA-256 of the file's text and the lines themselves."""
  text = "".join(line + "\n" for line in lines)
  return {"records": len(lines), "lines": list(lines),
          "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _history_intact(saved: dict[str, Any]) -> bool:
  """Whether a checkpoint's saved history (if any) matches its digest."""
  record = saved.get("history")
  if record is None:
    return True
  return (isinstance(record, dict) and isinstance(record.get("lines"), list)
          and all(isinstance(line, str) for line in record["lines"])
          and history(record["lines"]) == record)


class RoundCheckpoints:
  """The server states of a run, `workdir/checkpoints/<round>`.

  Each step holds the state and a small JSON item (`digest`) with the
  round, the state's SHA-256 and what the caller adds (the run's identity
  and its metrics history); orbax renames a step into place only once both
  are written. `read_only` (a reader, not the run holding the workdir's
  lock): nothing is created, cleaned up or moved aside.
  """

  def __init__(self, directory: pathlib.Path, keep: int,
               read_only: bool = False):
    self._directory = pathlib.Path(directory).absolute()
    self._read_only = read_only
    self.metadata: dict[str, Any] | None = None  # the restored step's
    self._pending: int | None = None  # the step saved last
    # Leftover `<step>.orbax-checkpoint-tmp*` directories are incomplete
    # writes of a killed run; orbax removes them here.
    with _quiet_orbax():  # a damaged step's metadata is reported on restore
      self._manager = ocp.CheckpointManager(
          self._directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=keep, create=not read_only, read_only=read_only,
              cleanup_tmp_directories=not read_only))

  def latest_round(self) -> int | None:
    return self._manager.latest_step()

  def rounds(self) -> list[int]:
    """The rounds with a checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def saved_metadata(self, round_index: int) -> Any:
    """The step's JSON item as saved (read directly, no state restored),
    or None when it cannot be read."""
    try:
      return json.loads((self._directory / str(round_index) / "digest" /
                         "metadata").read_text())
    except (OSError, ValueError):
      return None

  def restore(self, round_index: int, like: Any) -> Any:
    """Restores the state saved at `round_index`, structured like `like`;
    its JSON item goes to `self.metadata`.

    Raises:
      CorruptCheckpointError: the step cannot be read, or its contents do
        not match the digest saved with them.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      with _quiet_orbax():
        restored = self._manager.restore(round_index, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            digest=ocp.args.JsonRestore()))
      state, saved = restored["state"], restored["digest"]
    except Exception as e:  # orbax and tensorstore raise many types
      raise CorruptCheckpointError(
          f"checkpoint of round {round_index} is unreadable "
          f"({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(saved, dict) or saved.get("round") != round_index or \
        saved.get("sha256") != state_digest(state) or \
        not _history_intact(saved):
      raise CorruptCheckpointError(
          f"checkpoint of round {round_index} does not match its digest")
    self.metadata = saved
    return state

  def restore_latest(self, like: Any, log: Callable[[str], None]
                     ) -> tuple[Any, int | None]:
    """The newest checkpoint that restores and matches its digest.

    Each bad step is reported in one line through `log` and moved aside to
    `checkpoints/corrupt-<step>` (never deleted; left in place when
    `read_only`), then the step before it is tried. Returns `(state,
    round)`, or `(None, None)` when no checkpoint is good (saying so if
    there were any).
    """
    steps = self.rounds()
    for step in reversed(steps):
      try:
        return self.restore(step, like), step
      except CorruptCheckpointError as e:
        if self._read_only:
          log(f"{e}; trying the one before")
          continue
        moved = self._move_aside(step)
        log(f"{e}; moved to {moved.relative_to(self._directory.parent)}, "
            "trying the one before")
    if steps:
      log("no readable checkpoint left; starting from round 0")
    return None, None

  def _move_aside(self, step: int) -> pathlib.Path:
    target = move_aside(self._directory / str(step))
    self._manager.reload()
    return target

  def save(self, round_index: int, state: Any,
           metadata: dict[str, Any] | None = None) -> None:
    """Saves `state` at `round_index` with its digest and `metadata` (JSON:
    e.g. the run's identity and `history(...)`) in the same step."""
    if self._read_only:
      raise RuntimeError("a read-only RoundCheckpoints saves nothing")
    digest = {**(metadata or {}), "round": round_index,
              "sha256": state_digest(state)}
    self._pending = round_index
    with self._space_checked():
      self._manager.save(round_index, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          digest=ocp.args.JsonSave(digest)))

  def _space_checked(self):
    """A full disk while saving (or finishing) the step `self._pending`:
    DiskFullError, once the other writes in flight have finished and every
    temporary step directory left is removed (an async write's failure may
    surface at the next save); the complete steps are intact."""
    step = self._pending

    def partial():
      with contextlib.suppress(Exception):
        self._manager.wait_until_finished()
      _remove_orbax_tmp(self._directory, "*")
    return space_checked(self._directory / str(step),
                         f"checkpoint of round {step}", partial)

  def close(self) -> None:
    with self._space_checked():
      self._manager.wait_until_finished()
    self._manager.close()


def move_aside(path: pathlib.Path) -> pathlib.Path:
  """Renames a bad file or directory to `corrupt-<name>` (or `-2`, `-3`...
  when taken) beside it, keeping it for inspection; returns the new path."""
  target = path.with_name(f"{CORRUPT_PREFIX}{path.name}")
  n = 1
  while target.exists():
    n += 1
    target = path.with_name(f"{CORRUPT_PREFIX}{path.name}-{n}")
  if jax.process_index() == 0:  # one process renames a shared directory
    path.rename(target)
  return target


def save_params(path: pathlib.Path, params: Any) -> None:
  """Saves a params tree (e.g. the pretrained model) at `path`."""
  path = pathlib.Path(path).absolute()
  with space_checked(path, "the pretrained model", lambda:
                     _remove_orbax_tmp(path.parent, path.name)):
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, params)


def load_params(path: pathlib.Path, like: Any = None, *,
                origin: str | None = None) -> Any:
  """Loads params saved by :func:`save_params`, checked against `like` (as
  saved when None). Errors name `origin` (the path by default)."""
  path = pathlib.Path(path)
  origin = origin or f"pretrained checkpoint {str(path)!r}"
  if not path.exists():
    raise UserError(f"{origin}: no such path")
  abstract = None if like is None else jax.tree.map(
      ocp.utils.to_shape_dtype_struct, like)
  try:
    with _quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(path.absolute(), abstract)
  except Exception as e:  # orbax raises many types for unreadable input
    raise UserError(f"{origin}: cannot be loaded"
                    f"{'' if like is None else ' for this model'} "
                    f"({_first_line(e)})") from None
