"""How much work the event loop does between the turns it gives other tasks."""

from __future__ import annotations

import asyncio
import itertools
from types import TracebackType
from typing import Any


class DecodesBetweenTurns:
    """Within `async with`, counts the heads `committer` decodes (each some
    60 µs of the loop's time): `decoded` in all, and `stretch`, the most
    decoded while no other task had a turn (a ticker looks at the count at
    every turn of the loop)."""

    def __init__(self, committer: Any) -> None:
        self.committer = committer
        self.decoded = 0
        self._seen: list[int] = []
        self._done = False
        self._ticker: asyncio.Task[None] | None = None

    @property
    def stretch(self) -> int:
        seen = self._seen
        return max((b - a for a, b in itertools.pairwise(seen)), default=0)

    async def __aenter__(self) -> DecodesBetweenTurns:
        original = self.committer._from_bytes

        def counted(*args: Any, **kw: Any) -> Any:
            self.decoded += 1
            return original(*args, **kw)

        self.committer._from_bytes = counted
        self._ticker = asyncio.create_task(self._tick())
        await asyncio.sleep(0)  # the ticker's first look
        return self

    async def _tick(self) -> None:
        while not self._done:
            self._seen.append(self.decoded)
            await asyncio.sleep(0)
        self._seen.append(self.decoded)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done = True
        assert self._ticker is not None
        await self._ticker
        del self.committer._from_bytes  # the class's again
