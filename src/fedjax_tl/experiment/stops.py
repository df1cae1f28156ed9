"""Clean stops: SIGINT and SIGTERM during a run set a flag that the host loop
checks at the boundaries between compiled calls (docs/reliability.md).

A compiled call (a round, an evaluation, the pretraining) is never cut in
the middle: the run stops at the next boundary, saves the rounds done, waits
for the checkpoint writes in flight and raises :class:`Stopped` (one line,
exit 130 / 143). A second signal while stopping raises it at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

from fedjax_tl.errors import Stopped

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
  """Which signal asked the run to stop (None: none yet), and where the run
  is (`where`, for the message of a second signal)."""

  def __init__(self) -> None:
    self.signum: int | None = None
    self.where = "before any round ran"

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None:  # a second signal: no more waiting
      raise Stopped(signum, f"{self.where} (signalled twice: checkpoint "
                    "writes in flight abandoned)", abandoned=True)
    self.signum = signum

  def check(self, where: str | None = None) -> None:
    """Raises Stopped (naming `where`, else the last place set) when a
    signal came; `where` becomes the place a second signal names."""
    self.where = where or self.where
    if self.signum is not None:
      raise Stopped(self.signum, self.where)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
  """Installs the SIGINT / SIGTERM handlers of a run (only in the main
  thread: elsewhere Python delivers no signals) and restores the previous
  ones when the run ends, however it ends.

  When the previous handler is another StopFlag's (a comparison around its
  runs, the command around everything), a signal it noted but did not act
  on yet stops this run at its first check, and one this run noted after
  its last check is handed back to it: none is lost between the two."""
  flag = StopFlag()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
  outer = getattr(previous[signal.SIGINT], "__self__", None)
  outer = outer if isinstance(outer, StopFlag) else None
  if outer is not None:
    flag.signum = outer.signum
  for signum in SIGNALS:
    signal.signal(signum, flag.handle)
  try:
    yield flag
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    if outer is not None and outer.signum is None:
      outer.signum = flag.signum
