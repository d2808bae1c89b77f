"""Progress that works in a terminal and in a log file alike.

In a terminal: a rich progress bar. When stderr is not a terminal (a SLURM log, ``> run.log 2>&1``), a bar
is drawn once, at the end, which tells a reader nothing for an hour; there, a plain unwrapped line (done /
total, rate, ETA) is logged every ``BENCH_SUITE_PROGRESS_S`` seconds (default 30) and at the end.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("bench_suite.progress")


def interactive() -> bool:
    return sys.stderr.isatty()


def interval_s() -> float:
    try:
        return float(os.environ.get("BENCH_SUITE_PROGRESS_S", "30"))
    except ValueError:
        return 30.0


def duration(seconds: float) -> str:
    """Seconds the way the paper's Table 3 writes them: 0.42s, 12.6s, 20m05s, 1h57m."""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Tracker:
    """``advance(n, note)`` after each unit of work; ``close()`` at the end. ``enabled=False``: silent."""

    def __init__(self, what: str, total: int, *, enabled: bool = True, unit: str = "", transient: bool = False):
        self.what, self.total, self.unit = what, total, unit
        self.done = 0
        self.note = ""  # what the last unit was (shown in the plain lines)
        self.enabled = enabled
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if enabled and interactive():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(f"{what} {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), transient=transient)
            self.bar.start()
            self.task = self.bar.add_task("", total=total)

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        self.note = note or self.note
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, advance=n, description=note)
            return
        now = time.monotonic()
        if now - self.last >= interval_s() and self.done < self.total:
            self.last = now
            log.info(self.line(self.note))

    def line(self, note: str = "") -> str:
        elapsed = time.monotonic() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        unit = f" {self.unit}" if self.unit else ""
        return (f"{self.what}: {self.done}/{self.total}{unit} in {duration(elapsed)} "
                f"({rate:.2f}{unit}/s{eta}){f'; last: {note}' if note else ''}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        elif self.enabled and self.done:
            log.info(self.line(self.note))
        self.enabled = False
