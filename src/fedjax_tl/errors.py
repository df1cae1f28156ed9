"""The exception types for user mistakes and for runs that cannot go on.

Anything a user can get wrong (a config value, a data file, a checkpoint, a
command-line argument, a work directory) raises :class:`UserError`; the CLI
prints its message on one line and exits with its `exit_code` (2; 3 for
:class:`DivergedError`). Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A bad input from the user; the message names the key (or file) and value."""

  exit_code = 2


class ConfigError(UserError):
  """A bad configuration key or value."""


class DataError(UserError):
  """A bad data file or data set."""


class DivergedError(UserError):
  """The run produced a non-finite model (NaN/Inf): stopped, exit code 3."""

  exit_code = 3
