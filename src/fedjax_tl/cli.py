"""`fedjax-tl` command line: `fedjax-tl run --config=... --workdir=...`.

Config overrides use dotted flags, `--config.num_rounds=20`. User mistakes
(bad flags, config values, data, checkpoints) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fedjax_tl.errors import UserError

_PREFIX = "--config."


class _Parser(argparse.ArgumentParser):
  """argparse, but a usage mistake is one line and exit code 2."""

  def error(self, message: str):
    raise UserError(f"{self.prog}: {message}")


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  rest, overrides = [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith(_PREFIX):
      key, eq, value = arg[len(_PREFIX):].partition("=")
      if not eq:
        value = next(it, None)
        if value is None:
          raise UserError(f"{arg}: missing value")
      if not key:
        raise UserError(f"{arg}: missing key after --config.")
      overrides.append((key, value))
    else:
      rest.append(arg)
  return rest, overrides


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="fedjax-tl", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True,
                              parser_class=_Parser)
  run = sub.add_parser("run", help="run (or resume) one experiment")
  run.add_argument("--config", default=None,
                   help="config file, path.py[:arg] (default: the built-in "
                        "default experiment, as configs/default.py)")
  run.add_argument("--workdir", default="runs/default",
                   help="where metrics, checkpoints and the summary go")
  run.add_argument("--overwrite", action="store_true",
                   help="replace a workdir holding a different experiment")
  run.add_argument("--no-progress", action="store_true",
                   help="no progress bar")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    from fedjax_tl import config as config_lib
    cfg = config_lib.validate(config_lib.apply_overrides(
        config_lib.load_config(args.config), overrides))
    from fedjax_tl import runner
    summary = runner.run(cfg, args.workdir, overwrite=args.overwrite,
                         progress=not args.no_progress)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(runner.format_summary(summary))
  print(f"wrote {args.workdir}/summary.json and metrics.jsonl")
  return 0


if __name__ == "__main__":
  sys.exit(main())
