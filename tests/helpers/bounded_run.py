"""Running a Worker in a test that must fail, not hang, when a job never ends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tests.helpers.until import until_async


async def run_bounded(
    worker: Any, done: Callable[[], Awaitable[bool]], within: float = 10.0
) -> None:
    """Run `worker` until `done()` holds, then stop it; each within `within`
    seconds, else AssertionError: a job whose handler never ends keeps
    stop() draining for ever, and `await worker.stop()` would hang the suite
    (run() is cancelled then, which makes stop() return)."""
    run = asyncio.create_task(worker.run())
    try:
        await until_async(done, within)
    finally:
        stop = asyncio.create_task(worker.stop())
        ended, _ = await asyncio.wait([stop, run], timeout=within)
        if len(ended) < 2:
            run.cancel()
            await asyncio.gather(run, stop, return_exceptions=True)
            raise AssertionError(f"stop() and run() did not return within {within:g} s")
    await run  # what it raised, if anything
