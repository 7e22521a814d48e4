"""How much work the event loop does between the turns it gives other tasks."""

from __future__ import annotations

import asyncio
import itertools
from types import TracebackType
from typing import Any


class TopicsBetweenTurns:
    """Within `async with`, counts the topics `committer` answers a cached
    query for (each some tens of µs of the loop's time, a head decoded when
    no state of it is at hand): `read` in all, and `stretch`, the most read
    while no other task had a turn (a ticker looks at the count at every
    turn of the loop)."""

    def __init__(self, committer: Any) -> None:
        self.committer = committer
        self.read = 0
        self._seen: list[int] = []
        self._done = False
        self._ticker: asyncio.Task[None] | None = None

    @property
    def stretch(self) -> int:
        seen = self._seen
        return max((b - a for a, b in itertools.pairwise(seen)), default=0)

    async def __aenter__(self) -> TopicsBetweenTurns:
        original = self.committer._as_committed

        def counted(*args: Any, **kw: Any) -> Any:
            self.read += 1
            return original(*args, **kw)

        self.committer._as_committed = counted
        self._ticker = asyncio.create_task(self._tick())
        await asyncio.sleep(0)  # the ticker's first look
        return self

    async def _tick(self) -> None:
        while not self._done:
            self._seen.append(self.read)
            await asyncio.sleep(0)
        self._seen.append(self.read)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done = True
        assert self._ticker is not None
        await self._ticker
        del self.committer._as_committed  # the class's again
