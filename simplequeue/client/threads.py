"""Where a Worker's handlers in threads run: a pool of its own, as many threads
as its concurrency. asyncio.to_thread's default pool has min(32, cores + 4)
threads, which every to_thread and run_in_executor(None, ...) of the process
shares: a Worker(concurrency=16) of plain functions ran 6 at once on 2 cores,
its other jobs waiting in the pool's queue with their leases renewed.

The job tells the Worker while its thread runs: a thread cannot be stopped, so
a timeout or a lost lease waits for it, and cancels what runs on the event
loop after it (an awaitable it handed back) as a coroutine handler's.

A function that raises StopIteration raises RuntimeError from it instead, as
PEP 479 has a generator's: asyncio cannot set StopIteration on a future, and
the call would never return (its job held, heartbeated, for ever)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class InThread(Protocol):
    """A job told whether its handler runs in a thread now."""

    def thread_started(self) -> None: ...

    def thread_ended(self) -> None: ...


# The pool of the Worker whose handler runs in this context (its job's task
# copies it), and its job; None: asyncio's default pool.
_running: contextvars.ContextVar[tuple[ThreadPoolExecutor, InThread] | None] = (
    contextvars.ContextVar("simplequeue_thread_pool", default=None)
)


async def in_thread(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """asyncio.to_thread(fn, ...), on the pool of the Worker running this job,
    which is told while the thread runs (until it ends: cancelled, the call
    returns at once, and a thread that started runs on). A StopIteration of
    fn's is raised as a RuntimeError from it (_no_stop_iteration)."""
    running = _running.get()
    if running is None:
        return await asyncio.to_thread(_no_stop_iteration, fn, *args, **kwargs)
    pool, job = running
    loop = asyncio.get_running_loop()
    run = contextvars.copy_context().run
    thread = pool.submit(functools.partial(run, _no_stop_iteration, fn, *args, **kwargs))
    job.thread_started()
    try:
        result = await asyncio.wrap_future(thread, loop=loop)
    except asyncio.CancelledError:
        if thread.done():  # it never started
            job.thread_ended()
        else:  # the job is told as the thread ends (not before: it runs on)

            def ended(_: object) -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(job.thread_ended)

            thread.add_done_callback(ended)
        raise
    except BaseException:
        job.thread_ended()
        raise
    # Told as its result is handed on: a handler that returns it ends in this
    # same step, before anyone told it ended can cancel what runs after it.
    job.thread_ended()
    return result


def _no_stop_iteration(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """fn(...), in the thread; its StopIteration a RuntimeError: set on the
    future that carries the call back to the loop, StopIteration is a
    TypeError in a loop callback ("cannot be raised into a Future"), and the
    future is never done."""
    try:
        return fn(*args, **kwargs)
    except StopIteration as exc:
        name = getattr(fn, "__qualname__", None) or repr(fn)
        raise RuntimeError(f"{name} raised StopIteration") from exc


def run_jobs_on(pool: ThreadPoolExecutor, job: InThread) -> None:
    """Handlers run from this context on in `pool`, for `job`."""
    _running.set((pool, job))
