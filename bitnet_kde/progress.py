"""Progress of long loops for output that is not a terminal (log files, notebooks, CI).

A terminal gets live bars (rich for collection, Lightning's bar for training); a pipe gets
nothing from them until the end. `RateLog` fills that gap: one log line at a steady interval
with items done/total, rate and ETA, so a log shows that a four-minute collection is moving.
"""

from __future__ import annotations

import logging
import math
import sys
import time


def interactive() -> bool:
    """True when standard output is a terminal (live progress bars render there)."""
    return sys.stdout.isatty()


def format_eta(seconds: float | None) -> str:
    """`1h02m`, `4m05s`, `12s`, or `?` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class RateLog:
    """Log `<what>: done/total (pct), rate <unit>/s, ETA ...` at most every `every_s` seconds.

    `update(done)` is cheap to call on every item; it logs when the interval has passed since the
    last line, and always for the last item. `extra` text (e.g. tokens, loss) is appended.
    `clock` is injectable so tests can drive time.
    """

    def __init__(self, log: logging.Logger, what: str, total: int | None, unit: str = "items",
                 every_s: float = 30.0, clock=time.monotonic):
        self.log, self.what, self.total, self.unit = log, what, total, unit
        self.every_s, self.clock = every_s, clock
        self.start = self.last = clock()
        self.done0 = 0

    def restart(self, done: int = 0) -> None:
        """Measure the rate from here (e.g. after a resume started counting at `done`)."""
        self.start = self.last = self.clock()
        self.done0 = done

    def line(self, done: int, extra: str = "") -> str:
        """The progress line for `done` items at the current time."""
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = (done - self.done0) / elapsed
        if self.total:
            eta = (self.total - done) / rate if rate > 0 else None
            head = f"{self.what}: {done}/{self.total} ({100 * done / self.total:.0f}%)"
            tail = f", ETA {format_eta(eta)}"
        else:
            head, tail = f"{self.what}: {done}", ""
        return f"{head}, {rate:.2f} {self.unit}/s{tail}" + (f", {extra}" if extra else "")

    def update(self, done: int, extra: str = "") -> bool:
        """Log a line if `every_s` has passed (or this is the last item); True when it logged."""
        now = self.clock()
        last_item = self.total is not None and done >= self.total
        if now - self.last < self.every_s and not last_item:
            return False
        self.last = now
        self.log.info(self.line(done, extra))
        return True
