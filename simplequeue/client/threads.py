"""Where a Worker's handlers in threads run: a pool of its own, as many threads
as its concurrency. asyncio.to_thread's default pool has min(32, cores + 4)
threads, which every to_thread and run_in_executor(None, ...) of the process
shares: a Worker(concurrency=16) of plain functions ran 6 at once on 2 cores,
its other jobs waiting in the pool's queue with their leases renewed."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

# The pool of the Worker whose handler runs in this context (its job's task
# copies it); None: asyncio's default pool.
_pool: contextvars.ContextVar[ThreadPoolExecutor | None] = contextvars.ContextVar(
    "simplequeue_thread_pool", default=None
)


async def in_thread(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """asyncio.to_thread(fn, ...), on the pool of the Worker running this job."""
    pool = _pool.get()
    if pool is None:
        return await asyncio.to_thread(fn, *args, **kwargs)
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(pool, call)


def use_pool(pool: ThreadPoolExecutor | None) -> None:
    """Handlers run from this context on in `pool`."""
    _pool.set(pool)
