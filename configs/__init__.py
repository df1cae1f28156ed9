"""The experiment configs that ship with fedjax_tl, by name.

Each `NAME.py` here defines `get_config([arg])`. Load one by its bare name,
`fedjax-tl run --config=compare_migration` or
`fedjax_tl.configs.get("compare_migration")`; a path to any config file
(`--config=path/to/mine.py[:arg]`) is still accepted. Installed, this
directory is the package `fedjax_tl.configs`; in a checkout it is the
top-level `configs/` (the one source of both).
"""

from __future__ import annotations

import pathlib

DIRECTORY = pathlib.Path(__file__).resolve().parent


def names() -> tuple[str, ...]:
  """The shipped configs' names, sorted (e.g. 'compare_migration')."""
  return tuple(sorted(p.stem for p in DIRECTORY.glob("*.py")
                      if not p.stem.startswith("_")))


def path(name: str) -> pathlib.Path | None:
  """The file of the shipped config `name`, or None if there is none."""
  return DIRECTORY / f"{name}.py" if name in names() else None


def get(name: str, arg: str | None = None):
  """The shipped config `name` (its `get_config(arg)`), a ConfigDict.

  Raises:
    ConfigError: no shipped config of that name (naming those that exist),
      or one that fails to load.
  """
  from fedjax_tl.config import load_config
  return load_config(name if arg is None else f"{name}:{arg}")
