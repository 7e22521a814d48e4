"""The long polls waiting on one topic, in the order they came.

A commit wakes every one of them, and a time wakes those due by then (the
topic's next look at the store, a token of its rate), oldest first either way:
they try again in that order, in one batch, and so the oldest takes the first
job. Each waits for its own wake-up, not for a timer of its own: timers due at
the same moment fire in no set order, and a worker that had waited 20 seconds
lost a job to one that had just come.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
from dataclasses import dataclass, field

# Wake-ups this close to each other are one: the waiters of one tick each work
# its time out from their own reading of the clock.
SAME_MOMENT = 0.001


@dataclass(order=True)
class _Waiter:
    since: float  # its place in the line: when its long poll began (monotonic)
    n: int  # among those that began at the same moment, the order they came
    wake_at: float = field(compare=False)
    woken: asyncio.Future[bool] = field(compare=False)


class WaitingLine:
    """Long polls waiting for a change of one topic, oldest first."""

    def __init__(self) -> None:
        self._line: list[_Waiter] = []  # by place in the line
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._numbers = itertools.count()

    def __len__(self) -> int:
        return len(self._line)

    async def wait(self, seconds: float, since: float | None = None) -> bool:
        """Wait for wake_all() (True) or `seconds` (False). `since` (monotonic):
        the waiter's place in the line, when its long poll began (now if not
        given); a poll that waits again keeps its place."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiter = _Waiter(
            now if since is None else since,
            next(self._numbers),
            now + max(0.0, seconds),
            loop.create_future(),
        )
        bisect.insort(self._line, waiter)
        if waiter.wake_at < self._timer_at:
            self._arm(waiter.wake_at)
        try:
            return await waiter.woken
        finally:
            self._leave(waiter)

    def wake_all(self) -> None:
        """Wake every waiter, oldest first: the topic changed."""
        line, self._line = self._line, []
        self._arm(math.inf)
        for waiter in line:
            if not waiter.woken.done():
                waiter.woken.set_result(True)

    def _leave(self, waiter: _Waiter) -> None:
        i = bisect.bisect_left(self._line, waiter)
        if i < len(self._line) and self._line[i] is waiter:
            del self._line[i]

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if math.isfinite(at):
            self._timer = asyncio.get_running_loop().call_at(at, self._wake_due)

    def _wake_due(self) -> None:
        """Wake, oldest first, those whose time has come."""
        self._timer, self._timer_at = None, math.inf
        by = asyncio.get_running_loop().time() + SAME_MOMENT
        due = [w for w in self._line if w.wake_at <= by]
        self._line = [w for w in self._line if w.wake_at > by]
        for waiter in due:
            if not waiter.woken.done():
                waiter.woken.set_result(False)
        if self._line:
            self._arm(min(w.wake_at for w in self._line))
