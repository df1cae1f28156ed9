"""The exception types for user mistakes and for runs that cannot go on.

Anything a user can get wrong (a config value, a data file, a checkpoint, a
command-line argument, a work directory) raises :class:`UserError`; the CLI
prints its message on one line and exits with its `exit_code` (2; 3 for
:class:`DivergedError`; 1 for :class:`DiskFullError`). A run stopped by
SIGINT / SIGTERM raises :class:`Stopped` (exit 130 / 143). Everything else is
a bug and keeps its traceback.
"""

import errno
import signal


class UserError(Exception):
  """A bad input from the user; the message names the key (or file) and value."""

  exit_code = 2


class ConfigError(UserError):
  """A bad configuration key or value."""


class DataError(UserError):
  """A bad data file or data set."""


def check_config(ok: bool, key: str, value: object, requirement: str
                 ) -> None:
  """Raises ConfigError "config.KEY=VALUE: REQUIREMENT" unless `ok`."""
  if not ok:
    raise ConfigError(f"config.{key}={value!r}: {requirement}")


class DivergedError(UserError):
  """The run produced a non-finite model (NaN/Inf): stopped, exit code 3."""

  exit_code = 3


class DiskFullError(UserError):
  """A write failed for lack of space (ENOSPC, EDQUOT); nothing partial was
  left. An OS failure, not a user mistake: exit code 1, but one line."""

  exit_code = 1

  # The errno values that mean "no space left" (disk full or over quota).
  ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

  def __init__(self, path, what: str):
    super().__init__(
        f"disk full writing {path} ({what}); nothing partial was left; free "
        "space and rerun to resume")


class Stopped(BaseException):
  """The run was stopped by SIGINT or SIGTERM at a boundary between compiled
  calls, its checkpoint writes finished. A BaseException (like
  KeyboardInterrupt), so that no `except Exception` takes it for a failure
  (e.g. of a checkpoint read). Exit code 128 + the signal's number."""

  def __init__(self, signum: int, where: str, abandoned: bool = False):
    self.signum, self.where = signum, where
    # A second signal: checkpoint writes were cut mid-way, and orbax's
    # writer threads, waiting for them, would keep the interpreter from
    # exiting (it joins them); the CLI then leaves at once (os._exit).
    self.abandoned = abandoned
    self.exit_code = 128 + signum
    self.signal_name = signal.Signals(signum).name
    super().__init__(f"stopped {where}; the same command resumes")

  def within(self, context: str) -> "Stopped":
    """The same stop, its place named within `context` (e.g. the policy of
    a comparison), for a command made of several runs."""
    return Stopped(self.signum, f"{context} {self.where}", self.abandoned)
