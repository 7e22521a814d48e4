"""The batching primitive behind group commit, enqueue coalescing and batched acks."""

from __future__ import annotations

import asyncio

import pytest

from simplequeue.batching import Batcher, Linger, Pending


class Recorder:
    """A `send` that records its batches and answers each item doubled,
    releasing each batch only when the test says so."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, batch: list[Pending[int, int]]) -> list[int | BaseException]:
        self.batches.append([p.item for p in batch])
        self.started.set()
        await self.release.wait()
        return [p.item * 2 for p in batch]


async def test_items_that_arrive_during_a_batch_form_the_next_one() -> None:
    send = Recorder()
    batcher: Batcher[int, int] = Batcher(send)
    first = asyncio.ensure_future(batcher.submit(1))
    await send.started.wait()
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0)
    send.release.set()
    assert await asyncio.gather(first, *rest) == [2, 4, 6, 8]
    assert send.batches == [[1], [2, 3, 4]]


async def test_batches_are_cut_at_max_batch() -> None:
    send = Recorder()
    send.release.set()
    batcher: Batcher[int, int] = Batcher(send, max_batch=2)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(5))) == [0, 2, 4, 6, 8]
    assert send.batches == [[0, 1], [2, 3], [4]]


async def test_a_failing_send_fails_every_item_of_its_batch_and_the_next_batch_still_goes() -> None:
    calls = 0

    async def send(batch: list[Pending[int, int]]) -> list[int | BaseException]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.01)
            raise KeyError("id")  # what a proxy's HTML did to the old coalescer
        return [p.item for p in batch]

    batcher: Batcher[int, int] = Batcher(send)
    first = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    later = asyncio.ensure_future(batcher.submit(9))
    outcomes = await asyncio.gather(*first, return_exceptions=True)
    assert all(isinstance(o, KeyError) for o in outcomes)
    assert await later == 9


async def test_wrong_number_of_outcomes_fails_the_batch_instead_of_hanging() -> None:
    async def send(batch: list[Pending[int, int]]) -> list[int | BaseException]:
        return [1]

    batcher: Batcher[int, int] = Batcher(send)
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True), 5
    )
    assert all(isinstance(o, RuntimeError) for o in outcomes)


async def test_an_item_can_fail_alone() -> None:
    async def send(batch: list[Pending[int, int]]) -> list[int | BaseException]:
        return [ValueError(p.item) if p.item % 2 else p.item for p in batch]

    batcher: Batcher[int, int] = Batcher(send)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    assert outcomes[0::2] == [0, 2]
    assert all(isinstance(o, ValueError) for o in outcomes[1::2])


async def test_a_caller_that_goes_away_does_not_cancel_the_batch() -> None:
    send = Recorder()
    batcher: Batcher[int, int] = Batcher(send)
    leaving = asyncio.ensure_future(batcher.submit(1))
    staying = asyncio.ensure_future(batcher.submit(2))
    await send.started.wait()
    leaving.cancel()
    send.release.set()
    assert await staying == 4
    assert send.batches == [[1, 2]]


async def test_send_sees_which_callers_went_away() -> None:
    seen: list[bool] = []
    started, gate = asyncio.Event(), asyncio.Event()

    async def send(batch: list[Pending[int, int]]) -> list[int | BaseException]:
        started.set()
        await gate.wait()
        seen.extend(p.abandoned for p in batch)
        return [p.item for p in batch]

    batcher: Batcher[int, int] = Batcher(send)
    leaving = asyncio.ensure_future(batcher.submit(1))
    staying = asyncio.ensure_future(batcher.submit(2))
    await started.wait()  # their batch was cut: the caller leaves while it is sent
    leaving.cancel()
    await asyncio.sleep(0)
    gate.set()
    assert await staying == 2
    assert seen == [True, False]


async def test_cancelling_the_batcher_settles_every_future() -> None:
    send = Recorder()
    batcher: Batcher[int, int] = Batcher(send)
    waiting = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await send.started.wait()
    queued = asyncio.ensure_future(batcher.submit(7))
    await asyncio.sleep(0)
    assert batcher._task is not None
    batcher._task.cancel()
    outcomes = await asyncio.wait_for(
        asyncio.gather(*waiting, queued, return_exceptions=True), timeout=5
    )
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)


async def test_flush_waits_for_posted_items_and_failures_nobody_awaits_are_kept_quiet() -> None:
    sent: list[int] = []

    async def send(batch: list[Pending[int, int]]) -> list[int | BaseException]:
        await asyncio.sleep(0.01)
        sent.extend(p.item for p in batch)
        return [RuntimeError("nobody listens") for _ in batch]

    batcher: Batcher[int, int] = Batcher(send)
    futures = [batcher.post(i) for i in range(3)]
    await batcher.flush()
    assert sent == [0, 1, 2]
    assert all(f.done() for f in futures)
    assert not batcher.busy


async def test_before_runs_ahead_of_each_batch_so_a_burst_gathers() -> None:
    send = Recorder()
    send.release.set()

    async def three_turns() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    batcher: Batcher[int, int] = Batcher(send, before=three_turns)

    async def staggered(i: int) -> int:
        for _ in range(i):
            await asyncio.sleep(0)
        return await batcher.submit(i)

    assert await asyncio.gather(*(staggered(i) for i in range(3))) == [0, 2, 4]
    assert send.batches == [[0, 1, 2]]


@pytest.mark.parametrize("linger", [None, Linger(fraction=10.0, max_s=1.0)])
async def test_linger_keeps_closed_loop_callers_in_one_batch(linger: Linger | None) -> None:
    """Four callers that each send their next item as soon as they are answered:
    without the linger, two arrive while the batch that answered the others is
    being taken, and batches alternate in halves; with it, they stay whole."""
    batches: list[int] = []

    async def send(batch: list[Pending[int, int]]) -> list[int | BaseException]:
        batches.append(len(batch))
        await asyncio.sleep(0.01)
        return [p.item for p in batch]

    batcher: Batcher[int, int] = Batcher(send, linger=linger)

    async def caller(i: int) -> None:
        for _ in range(3):
            await batcher.submit(i)
            for _ in range(i):  # callers come back a few loop turns apart
                await asyncio.sleep(0)

    await asyncio.gather(*(caller(i) for i in range(4)))
    if linger is None:
        assert max(batches[1:]) < 4
    else:
        assert batches == [4, 4, 4]


async def test_abort_fails_the_batch_in_flight_and_those_queued_and_stops() -> None:
    """For a stop that cannot wait for a send any longer: every item fails with
    the error given, and no task is left to send anything after."""
    started = asyncio.Event()

    async def never_answers(batch: list[Pending[int, int]]) -> list[int | BaseException]:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    batcher: Batcher[int, int] = Batcher(never_answers, max_batch=1, name="stuck")
    first = batcher.post(1)
    await started.wait()
    second = batcher.post(2)  # queued behind the first
    await batcher.abort(TimeoutError("gave up"))
    for future in (first, second):
        with pytest.raises(TimeoutError, match="gave up"):
            await future
    assert not batcher.busy
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "stuck"]


async def test_abort_while_lingering_fails_what_is_queued() -> None:
    """Cancelled between batches (lingering for more callers), the items
    queued meanwhile fail too: none is left waiting for ever."""
    recorder = Recorder()
    recorder.release.set()
    batcher: Batcher[int, int] = Batcher(
        recorder, linger=Linger(fraction=1e9, max_s=60.0), name="lingering"
    )
    assert await asyncio.gather(batcher.post(1), batcher.post(2)) == [2, 4]
    queued = batcher.post(3)  # the batcher lingers for a second caller
    await batcher.abort(TimeoutError("gave up"))
    with pytest.raises(TimeoutError, match="gave up"):
        await queued
    assert not batcher.busy


async def test_an_item_whose_caller_went_away_while_queued_is_not_sent() -> None:
    """Nobody awaits it: sent, it would land for nobody (an enqueue whose
    caller timed out, and may enqueue again)."""
    send = Recorder()
    batcher: Batcher[int, int] = Batcher(send)
    first = asyncio.ensure_future(batcher.submit(1))
    await send.started.wait()
    leaving = asyncio.ensure_future(batcher.submit(2))
    staying = asyncio.ensure_future(batcher.submit(3))
    gone = asyncio.ensure_future(batcher.submit(4))
    await asyncio.sleep(0)
    leaving.cancel()
    gone.cancel()
    send.release.set()
    assert await asyncio.gather(first, staying) == [2, 6]
    assert send.batches == [[1], [3]]


async def test_a_batch_whose_callers_all_went_away_while_queued_is_not_sent() -> None:
    send = Recorder()
    send.release.set()
    gate = asyncio.Event()

    async def gated() -> None:
        await gate.wait()

    batcher: Batcher[int, int] = Batcher(send, before=gated)
    gone = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    for caller in gone:
        caller.cancel()
    gate.set()
    await asyncio.wait_for(batcher.flush(), 5)
    assert send.batches == []
