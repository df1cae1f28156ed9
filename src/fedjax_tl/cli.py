"""The command line: `fedjax-tl run|compare|sweep --config=... --workdir=...`,
`fedjax-tl report DIR [DIR...] --out=OUTDIR`, `fedjax-tl config`.

Config overrides use dotted flags, `--config.num_rounds=20`. User mistakes
(bad flags, config values, data, checkpoints, work directories) print one
line and exit 2; a run whose model turns non-finite prints one line and
exits 3; a full disk, one line and exit 1; SIGINT / SIGTERM stop a run at
the next boundary between compiled calls, one line, exit 130 / 143
(EXIT_CODES).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Sequence

from fedjax_tl.errors import Stopped, UserError
from fedjax_tl.experiment import stops  # light: no jax

_PREFIX = "--config."
_CONFIG_HELP = ("a shipped config by name, NAME[:arg] (e.g. compare_migration; "
                "fedjax_tl.configs.names()), or a config file, path.py[:arg] "
                "(default: the built-in default experiment, configs/default.py)")

EXIT_CODES = """\
exit codes:
  0  done (summary.json written)
  1  a bug or an OS failure (traceback); a full disk (ENOSPC, EDQUOT) is
     one line "error: disk full writing PATH (what)", no partial file
     left, the last good checkpoint intact: free space and rerun
  2  a user mistake, one line "error: ...": bad flag, config, data or
     checkpoint; a workdir in use by another run (names its pid), holding
     another experiment, a config.json fedjax-tl did not write, checkpoints
     of another identity or outputs without config.json, num_rounds
     below the rounds already done, or a plan that cannot fit this
     machine's memory (refused up front with the estimate and the limit;
     --config.memory_check=False tries anyway). Nothing in the workdir is
     changed.
  3  diverged, one line naming the round: the global model or the
     pretraining loss became NaN/Inf; the last finite checkpoint is kept
     (never a NaN one) and named; rerunning resumes from it.
  130 / 143  stopped by SIGINT (Ctrl-C) / SIGTERM, one line "stopped at
     round N; the same command resumes": the round in progress and its
     evaluation finish, round N is checkpointed, the writes in flight
     finish (a second signal: at once). While importing jax or reading
     the config, "stopped before the run started"; during building or
     pretraining, "stopped before any round ran": nothing is written.
     compare names the policy (finished runs are kept); sweep abandons
     the setting in progress (the saved ones are kept); the same command
     resumes either.

the work directory (docs/reliability.md):
  one owner   an exclusive lock on WORKDIR/.lock for the whole run, sweep or
              comparison (released by the kernel when the process dies; it
              holds the pid)
  identity    every checkpoint carries the run's identity (config without
              num_rounds / rounds_per_call / data_placement / memory_check,
              data and pretrained digests) and the metrics records up to its
              round; a run resumes only from its own, and rebuilds a missing
              or damaged metrics.jsonl from them
  ours only   --overwrite removes only the outputs WORKDIR/
              .fedjax_tl_manifest.json lists; a config.json fedjax-tl did not
              write is refused whatever the flags
  strict JSON every JSON file written holds null, never NaN or Infinity
  atomic      every file is written to a random temporary name and renamed
              (comparison.csv and sweep.csv too); a killed write's leftover
              is removed by the next run
"""


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
  for name, help_text, workdir in (
      ("run", "run (or resume) one experiment", "runs/default"),
      ("compare", "run config.compare_policies side by side and tabulate",
       "runs/compare"),
      ("sweep", "run the config's sweep spec (sweep_*) as vmapped runs",
       "runs/sweep")):
    command = sub.add_parser(
        name, help=help_text, epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_argument("--config", default=None, help=_CONFIG_HELP)
    command.add_argument("--workdir", default=workdir,
                         help="where metrics, checkpoints and summaries go")
    command.add_argument("--overwrite", action="store_true",
                         help="replace a workdir of fedjax-tl holding a "
                              "different experiment (removes only what its "
                              "manifest lists)")
    command.add_argument("--no-progress", action="store_true",
                         help="no progress bar")
    command.add_argument("--coordinator", default=None,
                         help="multi-host: HOST:PORT of process 0; every "
                              "process runs the same command (jax.distributed)")
    command.add_argument("--num-processes", type=int, default=None,
                         help="multi-host: how many processes in all")
    command.add_argument("--process-id", type=int, default=None,
                         help="multi-host: this process's index, 0 to N-1")
  keys = sub.add_parser(
      "config", help="list the config keys by section, with their values "
      "(defaults, or those of --config and overrides) and help")
  keys.add_argument("--config", default=None, help=_CONFIG_HELP)
  keys.add_argument("--section", action="append", default=None,
                    help="only this section (repeatable): one of "
                         "data, population, model, policy, client, server, "
                         "aggregator, privacy, faults, run, sweep")
  report = sub.add_parser(
      "report", help="plot and summarise run, compare and sweep directories")
  report.add_argument("dirs", nargs="+", metavar="DIR",
                      help="a run (metrics.jsonl + summary.json), compare "
                           "(comparison.csv) or sweep (sweep.csv) directory")
  report.add_argument("--out", default=None,
                      help="where the plots, report.md and report.html go "
                           "(default: DIR/report for one DIR, ./report for "
                           "several)")
  return parser


class _Outside(stops.StopFlag):
  """SIGINT / SIGTERM outside a run's own handlers (`entry`'s): while Python
  imports jax and reads the config, and after the run.

  Raised there as an exception, a signal can land inside an extension
  module's initialisation (an ImportError or an abort) or in an `except
  Exception` that swallows it (and the run goes on), so the first is only
  noted: `main` stops at its next check, or the run's handlers take it
  over and stop before any round (stops.stop_on_signals). After the run it
  is ignored: the outputs are complete. A second signal leaves at once, one
  line, with nothing written by this run. Once a stop is being reported,
  signals are ignored (a second Ctrl-C must not add a line or a traceback).
  """

  def __init__(self) -> None:
    super().__init__()
    self.where = "before the run started"
    self.reported = False

  def handle(self, signum: int, frame: object) -> None:
    del frame
    if self.reported:
      return
    if self.signum is None:
      self.signum = signum
      return
    self.reported = True
    print(f"stopped by {signal.Signals(signum).name} (signalled twice)",
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


_outside: _Outside | None = None  # under `entry`


def entry() -> None:
  """The `fedjax-tl` command and `python -m fedjax_tl`: `main`, with SIGINT
  and SIGTERM outside a run's own handlers held for a safe point
  (:class:`_Outside`), and ignored once `main` has returned (only the
  interpreter's teardown, joining jax's and orbax's threads, is left)."""
  global _outside
  _outside = _Outside()
  for signum in stops.SIGNALS:
    signal.signal(signum, _outside.handle)
  code = main()
  for signum in stops.SIGNALS:
    signal.signal(signum, signal.SIG_IGN)
  sys.exit(code)


def _check_signals() -> None:
  """Stops (Stopped) if a signal came outside a run's handlers so far."""
  if _outside is not None:
    _outside.check()


def _report_stop(message: object, code: int) -> int:
  """Prints a stop's one line, further signals ignored from here on."""
  if _outside is not None:
    _outside.reported = True
  print(message, file=sys.stderr)
  return code


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    if args.command == "report":
      if overrides:
        raise UserError(f"report: takes no --config.{overrides[0][0]} "
                        "overrides")
      from fedjax_tl import report
      written = report.report(args.dirs, args.out)
      plots = sum(p.suffix == ".png" for p in written)
      print(f"wrote {written[0].name}, {written[1].name} (self-contained) "
            f"and {plots} plot(s) as PNG and SVG in {written[0].parent}")
      return 0
    if args.command == "config":
      from fedjax_tl import config as config_lib
      from fedjax_tl.experiment.keys import SECTIONS
      for section in args.section or ():
        if section not in SECTIONS:
          raise UserError(f"config: --section={section!r}: must be one of "
                          f"{', '.join(SECTIONS)}")
      config = config_lib.apply_overrides(
          config_lib.load_config(args.config), overrides)
      print(config_lib.describe_keys(config, args.section or SECTIONS))
      return 0
    if args.coordinator is not None:
      import jax  # before any device is touched
      jax.distributed.initialize(args.coordinator, args.num_processes,
                                 args.process_id)
    from fedjax_tl import config as config_lib
    from fedjax_tl import runner
    config = config_lib.apply_overrides(config_lib.load_config(args.config),
                                        overrides)
    _check_signals()  # one held while jax loaded or the config ran
    options = dict(overwrite=args.overwrite, progress=not args.no_progress)
    if args.command == "compare":
      rows = runner.compare(config, args.workdir, **options)
    elif args.command == "sweep":
      from fedjax_tl import sweep
      rows = sweep.sweep(config, args.workdir, **options)
    else:
      summary = runner.run(config_lib.validate(config), args.workdir,
                           **options)
  except Stopped as e:
    code = _report_stop(e, e.exit_code)
    if e.abandoned:  # a second signal: at once, not joining orbax's threads
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
    return code
  except KeyboardInterrupt:  # main without `entry`, outside a run
    return _report_stop("stopped by SIGINT", 128 + signal.SIGINT)
  except UserError as e:
    # One line even when the offending value holds a line break.
    message = str(e).replace("\r", "\\r").replace("\n", "\\n")
    print(f"error: {message}", file=sys.stderr)
    return e.exit_code
  if args.command == "compare":
    print(runner.format_comparison(rows))
    print(f"wrote {args.workdir}/comparison.csv, comparison_tiers.csv (each "
          "tier's accuracy and cost) and comparison.md")
  elif args.command == "sweep":
    print(sweep.format_sweep(rows))
    print(f"wrote {args.workdir}/sweep.csv and sweep.md")
  else:
    print(runner.format_summary(summary))
    print(f"wrote {args.workdir}/summary.json and metrics.jsonl")
  return 0


if __name__ == "__main__":
  sys.exit(main())
