"""Progress over rounds, on stderr: a tqdm bar on a terminal; in a log file
or pipe (no TTY), one plain line every few rounds and no carriage returns.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

# About how many lines a run prints without a TTY.
LOG_LINES = 15


def make(total: int, done: int, show: bool, stream: TextIO | None = None
         ) -> Any:
  """A progress display of rounds `done` to `total` on `stream` (stderr):
  tqdm on a TTY, `LogLines` elsewhere, `Silent` when `show` is off or no
  round is left. Each has tqdm's `update(n)`, `set_postfix(**fields)` and
  `close()`."""
  stream = sys.stderr if stream is None else stream
  if not show or done >= total:
    return Silent()
  if not stream.isatty():
    return LogLines(total, done, stream)
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=done, unit="round", file=stream,
              dynamic_ncols=True)


class Silent:
  """A progress display that shows nothing."""

  def set_postfix(self, **fields: Any) -> None:
    del fields

  def update(self, n: int) -> None:
    del n

  def close(self) -> None:
    pass


def _clock(seconds: float) -> str:
  """`seconds` as [h:]mm:ss."""
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return (f"{hours}:" if hours else "") + f"{minutes:02d}:{secs:02d}"


class LogLines:
  """Progress for a log: a line whenever the round passes a multiple of
  `every` (about `LOG_LINES` lines a run) and at the last round, e.g.

    round 12/50  acc 0.912  worst 0.801  3.41 rounds/s  ETA 00:11

  with the latest `set_postfix` fields. The rate and ETA are timed from the
  end of the first call, so the first compilation does not count (`-`
  until then).
  """

  def __init__(self, total: int, done: int, stream: TextIO):
    self.total, self.done, self.stream = total, done, stream
    self.every = max(1, math.ceil((total - done) / LOG_LINES))
    self.postfix: dict[str, Any] = {}
    self.first: tuple[int, float] | None = None  # (round, time) of call 1

  def set_postfix(self, **fields: Any) -> None:
    self.postfix = fields

  def update(self, n: int) -> None:
    before, self.done = self.done, self.done + n
    now = time.perf_counter()
    if self.first is None:
      self.first = (self.done, now)
    if (self.done // self.every == before // self.every and
        self.done < self.total):
      return
    rounds, seconds = self.done - self.first[0], now - self.first[1]
    rate = rounds / seconds if rounds > 0 and seconds > 0 else None
    fields = [f"round {self.done}/{self.total}",
              *(f"{key} {value}" for key, value in self.postfix.items()),
              "- rounds/s  ETA -" if rate is None else
              f"{rate:.3g} rounds/s  ETA "
              f"{_clock((self.total - self.done) / rate)}"]
    print("  ".join(fields), file=self.stream, flush=True)

  def close(self) -> None:
    pass
