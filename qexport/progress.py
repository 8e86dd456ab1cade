"""Progress of long work: library code reports ``Tick`` events through a callback; the CLI's
``ProgressPrinter`` renders them as a bar with ETA on a terminal, or one line per unit when piped.

Library code never prints: it calls ``progress(Tick(...))`` if a callback was given. A tick with
``done == 0`` announces a task (useful before a long first unit); ``total == 0`` means the count
is unknown and no ETA is shown.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True, kw_only=True)
class Tick:
    """``done`` of ``total`` units of the task ``task`` are finished; ``detail`` names the last one."""

    task: str
    done: int
    total: int
    detail: str = ""


Progress = Callable[[Tick], None]


def report(progress: Progress | None, task: str, done: int, total: int, detail: str = "") -> None:
    """Call progress with one tick, if a callback was given."""
    if progress is not None:
        progress(Tick(task=task, done=done, total=total, detail=detail))


def duration(seconds: float) -> str:
    """A short human duration: 42s, 3m05s, 1h02m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


BAR_WIDTH = 24


class ProgressPrinter:
    """Renders ticks: on a terminal one line per task, redrawn in place (``[####----] 3/8 ETA 12s``),
    ended with a newline when the task changes or ``close()`` is called; when piped, one complete
    line per tick."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.task: str | None = None
        self.task_start = 0.0
        self.start = time.perf_counter()
        self._open = False  # a terminal line is drawn and not yet ended

    def __call__(self, tick: Tick) -> None:
        now = time.perf_counter()
        if tick.task != self.task:
            self._end_line()
            self.task, self.task_start = tick.task, now
        text = self._text(tick, now - self.task_start)
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r\x1b[2K" + text[:width])
            self._open = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def say(self, message: str) -> None:
        """A plain message line (ends a drawn bar first)."""
        self._end_line()
        self.task = None
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> float:
        """End the current line; returns the seconds since the printer was made."""
        self._end_line()
        return time.perf_counter() - self.start

    def _end_line(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def _text(self, tick: Tick, elapsed: float) -> str:
        detail = f"  {tick.detail}" if tick.detail else ""
        if tick.total <= 0:
            return f"{tick.task}: {tick.done} done, {duration(elapsed)}{detail}"
        frac = min(1.0, tick.done / tick.total)
        if tick.done == 0:
            eta = "ETA -"
        elif tick.done >= tick.total:
            eta = f"took {duration(elapsed)}"
        else:
            eta = f"ETA {duration(elapsed / tick.done * (tick.total - tick.done))}"
        count = f"{tick.done}/{tick.total} {100 * frac:3.0f}%"
        if self.tty:
            filled = int(BAR_WIDTH * frac)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            return f"{tick.task} [{bar}] {count} {eta}{detail}"
        return f"{tick.task}: {count}, {duration(elapsed)} elapsed, {eta}{detail}"


class Units:
    """Counts the units of one task of known size and reports each as a tick."""

    def __init__(self, progress: Progress | None, task: str, total: int) -> None:
        self.progress, self.task, self.total, self.count = progress, task, total, 0

    def start(self, detail: str = "") -> None:
        """Announce the task (a tick with nothing done yet)."""
        report(self.progress, self.task, self.count, self.total, detail)

    def done(self, detail: str = "", n: int = 1) -> None:
        """n more units finished."""
        self.count += n
        report(self.progress, self.task, self.count, self.total, detail)
