"""Where a long job's time goes, by stage. Library code marks its stages with ``with stage(name):``
(a no-op unless a clock is running); the job opens ``with stage_clock() as clock:`` around its work
and reads ``clock.seconds`` at the end. Accounting is exclusive: time inside a nested stage counts
for the inner stage only (GPTQ run while the alpha search makes a plan is GPTQ's, not the search's),
so the stages add up to the time spent in any of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class StageClock:
    """Exclusive seconds per stage name, in the order the stages first ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: list[tuple[str, float, list[float]]] = []  # per open stage: name, start, [nested seconds]

    def enter(self, name: str) -> None:
        self.seconds.setdefault(name, 0.0)
        self._open.append((name, time.perf_counter(), [0.0]))

    @property
    def current(self) -> str | None:
        """The innermost stage open now (None between stages); safe to read from another thread,
        which may see the one just closed (a sampler's reading, not an account)."""
        try:
            return self._open[-1][0]
        except IndexError:
            return None

    def leave(self) -> None:
        name, start, nested = self._open.pop()
        spent = time.perf_counter() - start
        self.seconds[name] += spent - nested[0]
        if self._open:
            self._open[-1][2][0] += spent


_CLOCK: ContextVar[StageClock | None] = ContextVar("qexport_stage_clock", default=None)


@contextmanager
def stage_clock() -> Iterator[StageClock]:
    """Run a clock for the block: the stages marked inside it (in this thread or context) add to it."""
    clock = StageClock()
    token = _CLOCK.set(clock)
    try:
        yield clock
    finally:
        _CLOCK.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Count the block's time for stage `name` on the running clock, if there is one."""
    clock = _CLOCK.get()
    if clock is None:
        yield
        return
    clock.enter(name)
    try:
        yield
    finally:
        clock.leave()
