"""The one exception type for user mistakes.

Anything a user can get wrong (a config value, a data file, a checkpoint, a
command-line argument) raises :class:`UserError`; the CLI prints its message on
one line and exits with code 2. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A bad input from the user; the message names the key (or file) and value."""


class ConfigError(UserError):
  """A bad configuration key or value."""


class DataError(UserError):
  """A bad data file or data set."""
