"""Batching while one request is in flight: the one primitive behind the broker's
group commit, the SDK's enqueue coalescing and the Worker's batched acks; and
the ways a batch is cut into requests (runs_within, in_halves).

Items submitted while a batch is being sent form the next batch; at most one
batch is in flight. Every submitted item's future is settled, whatever `send`
does (answers, raises, returns the wrong number of outcomes, is cancelled), and
a caller that stops waiting never cancels the batch its item is in; an item
whose caller stopped waiting before its batch was cut is left out of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - an item
O = TypeVar("O")  # noqa: E741 - its outcome


@dataclass(eq=False)
class Pending(Generic[I, O]):
    """An item waiting for its batch, and the future its caller waits on."""

    item: I
    future: asyncio.Future[O]
    submitted: float = field(default_factory=time.monotonic)

    @property
    def abandoned(self) -> bool:
        """The caller stopped waiting (it was cancelled) before it was answered."""
        return self.future.done()

    def settle(self, outcome: O | BaseException) -> None:
        """Answer the caller now, before the rest of its batch is (a `send`
        that sends its batch in parts); the batch's outcomes skip it."""
        _settle(self.future, outcome)


@dataclass(frozen=True)
class Linger:
    """After a batch of n >= 2 items that took t seconds to send, wait up to
    min(`max_s`, `fraction` x t) for n more items on top of those that queued
    meanwhile: callers answered by a batch come straight back with their next
    item, and without the pause they would split into two halves, each riding
    every other batch."""

    fraction: float
    max_s: float


class Batcher(Generic[I, O]):
    """Sends submitted items in batches of at most `max_batch` through `send`,
    one batch at a time. `send` answers each item of a batch, in order, with
    its result or with the exception that item alone fails with; if it raises,
    every item of the batch fails with that, but for those it settled already
    (Pending.settle: a part of the batch answered). `before` (if given) is
    awaited before each batch is taken, to let a burst gather; `linger`
    paces batches as its class says."""

    def __init__(
        self,
        send: Callable[[list[Pending[I, O]]], Awaitable[list[O | BaseException]]],
        *,
        max_batch: int = 1000,
        before: Callable[[], Awaitable[None]] | None = None,
        linger: Linger | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._send = send
        self.max_batch = max_batch
        self._before = before
        self.linger = linger
        self.name = name
        self._queue: list[Pending[I, O]] = []
        self._sending: list[Pending[I, O]] = []  # the batch in flight
        self._task: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        self.closing = False  # no lingering once set: close() wants the last batch out
        self._aborted: BaseException | None = None  # what abort() fails the items with

    def __len__(self) -> int:
        """Items waiting for a batch (not counting the one in flight)."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """A batch is being sent, or items wait for one."""
        return self._task is not None and not self._task.done()

    @property
    def unawaited(self) -> bool:
        """Nobody waits for an item being sent or queued: each one's caller
        went away (it was cancelled), or there is none."""
        return all(pending.abandoned for pending in (*self._sending, *self._queue))

    def post(self, item: I) -> asyncio.Future[O]:
        """Queue `item` and return its future without waiting on it. A failure
        nobody awaits is logged, not reported as "never retrieved"."""
        future: asyncio.Future[O] = asyncio.get_running_loop().create_future()
        self._queue.append(Pending(item, future))
        self._arrived.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=self.name)
        return future

    async def submit(self, item: I) -> O:
        """Queue `item` and return its outcome once its batch was sent."""
        return await self.post(item)

    async def flush(self) -> None:
        """Wait until every item posted so far was sent."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Send what is queued, without lingering, and wait for it."""
        self.closing = True
        self._arrived.set()
        await self.flush()

    async def abort(self, error: BaseException) -> None:
        """Cancel the batch being sent and those queued, their items failing
        with `error`, and wait until that is done."""
        self.closing = True
        self._aborted = error
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        # Those a cancel outside a send left queued (in `before`, or a linger).
        for pending in self._queue:
            _settle(pending.future, error)
        self._queue = []

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            if self._before is not None:
                await self._before()
            # An item whose caller went away while it was queued is not sent:
            # nobody waits for it (an enqueue whose caller timed out, and may
            # enqueue it again).
            self._queue = [pending for pending in self._queue if not pending.abandoned]
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            if not batch:
                continue
            started = loop.time()
            self._sending = batch
            try:
                outcomes = await self._send(batch)
                if len(outcomes) != len(batch):
                    raise RuntimeError(
                        f"{self.name}: {len(outcomes)} outcomes for {len(batch)} items"
                    )
            except asyncio.CancelledError:
                for pending in [*batch, *self._queue]:
                    if self._aborted is None:
                        pending.future.cancel()
                    else:
                        _settle(pending.future, self._aborted)
                self._queue = []
                raise
            except BaseException as exc:  # every item of the batch fails with it
                for pending in batch:
                    _settle(pending.future, exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            finally:
                self._sending = []
            for pending, outcome in zip(batch, outcomes, strict=True):
                _settle(pending.future, outcome)
            await self._linger(len(batch), loop.time() - started)

    async def _linger(self, last: int, took: float) -> None:
        if self.linger is None or last < 2 or self.closing:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(self.linger.max_s, self.linger.fraction * took)
        want = len(self._queue) + last  # those queued meanwhile, plus the callers answered
        while len(self._queue) < want and not self.closing and (left := deadline - loop.time()) > 0:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._arrived.wait()


def _settle(future: asyncio.Future[O], outcome: O | BaseException) -> None:
    if future.done():  # its caller went away
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
        future.add_done_callback(_consume)
    else:
        future.set_result(outcome)


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark a failure as retrieved: whoever awaits it still gets it; a posted item
    that nobody awaits is logged at debug level instead of warned about at exit."""
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.debug("batched item failed: %r", exc)


def runs_within(
    items: Iterable[I], size_of: Callable[[I], int], limit: int, max_items: int | None = None
) -> Iterator[list[I]]:
    """`items` in order, in runs whose sizes (`size_of` each) add up to at most
    `limit`, of at most `max_items` items; an item bigger than `limit` alone.
    A run of `max_items` is yielded before the next item is asked for (items
    read from a pipe: it may be a while)."""
    run: list[I] = []
    size = 0
    for item in items:
        n = size_of(item)
        if run and size + n > limit:
            yield run
            run, size = [], 0
        run.append(item)
        size += n
        if len(run) == max_items:
            yield run
            run, size = [], 0
    if run:
        yield run


async def in_halves(
    send: Callable[[list[I]], Awaitable[Iterable[O]]],
    items: list[I],
    refused: Callable[[Exception], bool],
) -> list[O | Exception]:
    """The outcome of each of `items`, sent in one request. A request
    `refused` as a whole (too large together, or one item bad) goes again in
    halves, down to the items at fault, whose outcome is their refusal: one
    bad item of n costs some 2 x log2(n) requests, where sending each alone
    would take n, one after another. Any other failure raises."""
    try:
        return list(await send(items))
    except Exception as exc:
        if not refused(exc):
            raise
        if len(items) == 1:
            return [exc]
    half = len(items) // 2
    first = await in_halves(send, items[:half], refused)
    return [*first, *await in_halves(send, items[half:], refused)]
