"""Progress in a log (no TTY): plain lines every few rounds, no carriage
returns, a rate and ETA that leave the first compilation out."""

import io
import re

from conftest import tiny_config, tiny_config_dict
from fedjax_tl import runner, sweep
from fedjax_tl.experiment import progress


def test_log_lines_every_few_rounds_timed_after_the_first_call(monkeypatch):
  # The first call takes 100 s (compiling), every later round 0.5 s.
  clock = iter([100.0 + 0.5 * i for i in range(50)])
  monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
  stream = io.StringIO()
  bar = progress.make(50, 0, True, stream)
  assert isinstance(bar, progress.LogLines) and bar.every == 4  # 50 / 15
  for done in range(1, 51):
    if done % 10 == 0:
      bar.set_postfix(acc="0.900", worst="0.800")
    bar.update(1)
  bar.close()
  text = stream.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  # Rounds 4, 8, ..., 48 and the last: 13 lines (about LOG_LINES).
  assert [int(re.match(r"round (\d+)/50", l).group(1)) for l in lines] == [
      *range(4, 49, 4), 50]
  # 2 rounds/s from the end of round 1 on: round 4 has 46 rounds, 23 s left.
  assert lines[0] == "round 4/50  2 rounds/s  ETA 00:23"
  assert lines[2] == "round 12/50  acc 0.900  worst 0.800  2 rounds/s  ETA 00:19"
  assert lines[-1].endswith("2 rounds/s  ETA 00:00")


def test_log_lines_resumed_and_in_calls_of_several_rounds():
  stream = io.StringIO()
  bar = progress.make(100, 70, True, stream)  # resumed at round 70
  assert bar.every == 2
  for _ in range(6):
    bar.update(5)  # rounds_per_call=5: every call passes a multiple
  lines = stream.getvalue().splitlines()
  assert [l.split()[1] for l in lines] == [f"{r}/100" for r in
                                           range(75, 101, 5)]
  assert lines[0].endswith("- rounds/s  ETA -")  # timed from call 1's end
  assert isinstance(progress.make(100, 100, True, stream), progress.Silent)
  assert isinstance(progress.make(100, 0, False, stream), progress.Silent)


def test_a_run_without_a_tty_logs_progress_lines(tmp_path, capsys):
  cfg = tiny_config(num_rounds=4, eval_every=2, checkpoint_every=2)
  runner.run(cfg, tmp_path / "w", progress=True)
  err = capsys.readouterr().err
  assert "\r" not in err
  lines = [l for l in err.splitlines() if l.startswith("round ")]
  assert [l.split()[1] for l in lines] == ["1/4", "2/4", "3/4", "4/4"]
  assert re.fullmatch(r"round 4/4  acc \d\.\d{3}  worst \d\.\d{3}  "
                      r"\S+ rounds/s  ETA 00:00", lines[-1]), lines[-1]
  runner.run(cfg, tmp_path / "q", progress=True, quiet=True)
  assert "round " not in capsys.readouterr().err


def test_a_sweep_without_a_tty_logs_progress_lines(tmp_path, capsys):
  config = tiny_config_dict(num_rounds=2, pretrain_steps=5, num_clients=20,
                            clients_per_round=4, sweep_alpha=(0.3, 3.0))
  sweep.sweep(config, tmp_path)
  err = capsys.readouterr().err
  assert "\r" not in err
  # One vmapped batch per setting (alpha is discrete), 2 rounds each.
  lines = [l for l in err.splitlines() if l.startswith("round ")]
  assert [l.split()[1] for l in lines] == ["1/2", "2/2"] * 2
