"""Waiting for a condition that has no event to await."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait for a condition that has no event to await (another process's
    state, a background duty's effect on disk)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def until_async(condition: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """until() for a condition that must be asked for (another process's
    answer to a request)."""
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
