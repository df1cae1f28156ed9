"""Files written whole or not at all: a crash, a kill or a full disk leaves
the old file or the new one, never part of one; a full disk is one
DiskFullError naming the file. No jax here: `report` writes through it too.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, BinaryIO, Callable, Iterator

from fedjax_tl.errors import DiskFullError


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


def remove_orbax_temporaries(directory: pathlib.Path, name: str) -> None:
  """Removes orbax's temporary directories of step (or path) `name` (a glob
  pattern), what an interrupted write leaves."""
  for tmp in directory.glob(f"{name}.orbax-checkpoint-tmp*"):
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def replacing(path: pathlib.Path) -> Iterator[BinaryIO]:
  """A binary file whose contents replace `path` when the block ends, so
  that a crash leaves either the old or the new file.

  The file is a new temporary one beside `path` (a random name, created
  exclusively and never through a symlink: `tempfile.mkstemp` opens with
  O_EXCL | O_NOFOLLOW); it is flushed to disk and replaces `path` by
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
      with os.fdopen(fd, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
      raise


def write_bytes_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to `path` whole or not at all (:func:`replacing`)."""
  with replacing(path) as f:
    f.write(data)


def write_text_atomic(path: pathlib.Path, text: str) -> None:
  """`text` as UTF-8, written like :func:`write_bytes_atomic`."""
  write_bytes_atomic(path, text.encode("utf-8"))


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
  (`NAME.orbax-checkpoint-tmp*`, e.g. of `checkpoint.save_params`).

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
  remove_orbax_temporaries(path.parent, glob.escape(path.name))


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
