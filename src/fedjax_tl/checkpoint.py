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
import gc
import hashlib
import json
import logging
import pathlib
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjax_tl import files
from fedjax_tl.errors import UserError

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
      files.remove_orbax_temporaries(self._directory, "*")
    return files.space_checked(self._directory / str(step),
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
  with files.space_checked(path, "the pretrained model", lambda:
                     files.remove_orbax_temporaries(path.parent, path.name)):
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
