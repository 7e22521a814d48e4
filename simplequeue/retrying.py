"""Retries whose first try costs nothing: the committer's writes and the SDK's
requests nearly always succeed at once, and one pass through tenacity's
AsyncRetrying loop costs ~40 µs (its action chain), a few percent of a round
trip on localfs. The policy (what to retry, waits, stops) stays tenacity's.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying

T = TypeVar("T")


async def first_then_retrying(
    once: Callable[[], Awaitable[T]], retrying: Callable[[float], AsyncRetrying]
) -> T:
    """`once()`; if it raises, tenacity takes over as if its loop had made that
    first try: `retrying(elapsed)` builds the loop (elapsed: the seconds the
    first try took, for a stop measured from the start), which is handed the
    failure as its first attempt. So an error it does not retry is raised as
    is, the first retry waits what the loop's second attempt waits, and a loop
    that stops raises tenacity's RetryError as it would have. (Tenacity's
    `before`/`after` callbacks and statistics would not see the first try as
    its own: neither caller uses them.)"""
    started = time.monotonic()  # the clock tenacity's stops measure with
    try:
        return await once()
    except Exception as exc:
        first: Exception | None = exc
    async for attempt in retrying(time.monotonic() - started):
        with attempt:
            if first is not None:
                error, first = first, None
                try:
                    raise error
                finally:
                    del error  # its traceback holds this frame: no cycle keeps it alive
            return await once()
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
