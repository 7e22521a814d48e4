"""The Worker against a real broker: heartbeats, acks, nacks with backoff,
dead letters after max_attempts, batch claims, stop() and drain."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Container
from typing import Any

import pytest
from aiohttp import web

from simplequeue.api import MAX_BATCH, MAX_ERROR, MAX_LEASE
from simplequeue.client import Backoff, Client, Done, Job, SyncClient, Tasks, Worker, calls_within
from simplequeue.client import worker as worker_module
from simplequeue.client.client import LastCall, last_call
from simplequeue.client.worker import AHEAD_MAX, TAKE_BACK_WITHIN, ClaimAhead
from simplequeue.errors import (
    BrokerUnavailable,
    InvalidRequest,
    PayloadTooLarge,
    SimpleQueueError,
    Unauthorized,
)
from simplequeue.objstore.memfs import MemStore
from simplequeue.state import Policy
from tests.helpers.bounded_run import run_bounded
from tests.helpers.bounding_proxy import BoundingProxy
from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.faults import FaultyStore
from tests.helpers.head_reads import HeadReads
from tests.helpers.logs import Said
from tests.helpers.until import until

StartBroker = Callable[..., Awaitable[Any]]
FAST = Backoff(base=0.01, cap=0.05)


@pytest.fixture
async def broker(start_broker: StartBroker) -> Any:
    return await start_broker(MemStore())


@pytest.fixture
async def q(broker: Any) -> Any:
    async with Client(broker.url, topic="w") as client:
        yield client


async def wait_until(broker: Any, done: Callable[[], Awaitable[bool]]) -> None:
    """Return once `done()` holds, checked each time a batch lands on the broker."""
    async with asyncio.timeout(30):
        while not await done():
            await broker.committer.wait_changed("w", 1.0)


async def run_until(worker: Worker, broker: Any, done: Callable[[], Awaitable[bool]]) -> None:
    """Run the worker until `done()` holds, then stop it."""
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(broker, done)
    finally:
        await worker.stop()
        await task


async def test_worker_acks_with_the_handlers_return_value(q: Client, broker: Any) -> None:
    ids = await q.enqueue_many([{"n": i} for i in range(20)])

    async def double(job: Job) -> int:
        return int(job.payload["n"]) * 2

    worker = Worker(q, double, concurrency=4, wait=0.5, handle_signals=False)
    await run_until(worker, broker, lambda: _completed(q, 20))
    assert worker.processed == 20
    for i, job_id in enumerate(ids):
        assert (await q.job(job_id)).result == i * 2


async def _completed(q: Client, n: int) -> bool:
    return (await q.status())["completed"] >= n


async def test_heartbeats_keep_a_long_job_from_redelivery(q: Client, broker: Any) -> None:
    job_id = await q.enqueue("slow")
    release = asyncio.Event()
    deliveries = 0

    async def slow(job: Job) -> str:
        nonlocal deliveries
        deliveries += 1
        await release.wait()
        return "finished"

    worker = Worker(q, slow, lease=1.0, heartbeat_every=0.2, wait=0.2, handle_signals=False)
    task = asyncio.create_task(worker.run())
    # Hold the job until its lease has been renewed past three original leases.
    first_expiry = None
    async with asyncio.timeout(30):
        while True:
            job = await q.job(job_id)
            if job.status == "claimed":
                first_expiry = first_expiry or job.lease_expires_at
                assert first_expiry is not None and job.lease_expires_at is not None
                if job.lease_expires_at > first_expiry + 3:
                    break
            await broker.committer.wait_changed("w", 1.0)  # the next heartbeat
    assert await q.claim("thief") is None  # never re-delivered while it runs
    release.set()
    await wait_until(broker, lambda: _completed(q, 1))
    await worker.stop()
    await task
    job = await q.job(job_id)
    assert (job.status, job.result, job.attempts, deliveries) == ("completed", "finished", 1, 1)


async def test_a_raising_handler_ends_dead_after_max_attempts(q: Client, broker: Any) -> None:
    job_id = await q.enqueue("poison", max_attempts=3)
    calls = 0

    async def boom(job: Job) -> None:
        nonlocal calls
        calls += 1
        raise ValueError(f"cannot handle attempt {job.attempts}")

    worker = Worker(q, boom, wait=0.2, backoff=FAST, handle_signals=False)

    async def dead() -> bool:
        return (await q.status())["dead"] == 1

    await run_until(worker, broker, dead)
    [job] = await q.dead()
    assert (job.id, job.attempts, calls) == (job_id, 3, 3)
    assert job.last_error is not None and "ValueError: cannot handle attempt 3" in job.last_error


def test_backoff_is_exponential_capped_and_jittered() -> None:
    b = Backoff(base=1, cap=60, jitter=0.5)
    # 2.0 ** 1025 overflows: a job with unlimited attempts gets there
    for attempts, full in [(1, 1), (2, 2), (3, 4), (7, 60), (30, 60), (1026, 60), (10**6, 60)]:
        delays = [b.delay(attempts) for _ in range(200)]
        assert all(full * 0.5 <= d <= full for d in delays)
        assert len(set(delays)) > 1


@pytest.mark.parametrize(
    "bad",
    [
        {"base": -1.0},
        {"cap": math.inf},
        {"cap": math.nan},
        {"base": 400 * 86400.0},
        {"jitter": 1.5},
        {"jitter": -0.1},
    ],
)
def test_a_backoff_the_broker_would_refuse_is_refused_as_it_is_made(bad: dict[str, float]) -> None:
    """Every nack of its delays would be refused (a delay is 0 to a year): the
    Worker only logged that, and its failing jobs waited out their leases."""
    with pytest.raises(ValueError, match="Backoff"):
        Backoff(**bad)


def test_a_worker_given_a_sync_client_runs_its_jobs_or_refuses_it() -> None:
    """Worker(SyncClient(...), h) was accepted: each claim_many() claimed its
    jobs (blocking the loop), then awaiting its list raised TypeError, logged
    as "claim failed", and it claimed again a second later: no job ran, each
    attempt spent as its lease ran out, until dead (review of the SDK, round
    28). It is refused as it is made, saying what to give instead (not the
    SyncClient's own .client: its connections belong to its loop)."""
    refused = pytest.raises(TypeError, match=r"needs a Client, not a SyncClient: make one")
    with SyncClient("http://127.0.0.1:9") as sync, refused:
        Worker(sync, lambda job: None)  # type: ignore[arg-type]


@pytest.mark.parametrize("handler", [None, "send_email", 42])
async def test_a_handler_that_is_not_callable_is_refused_as_the_worker_is_made(
    q: Client, handler: Any
) -> None:
    """Worker(q, None) (a handler looked up in a dict that had no such name, a
    string where a function was meant) was accepted, and every job it
    claimed failed ("'NoneType' object is not callable"), nacked until its
    attempts were spent: one such Worker sent the whole topic to the dead
    jobs (review of the Worker, round 34). TypeError as it is made, before
    any job is claimed, as a SyncClient in the client's place is refused."""
    with pytest.raises(TypeError, match=r"handler must be callable, not (NoneType|str|int)"):
        Worker(q, handler, handle_signals=False)


async def test_a_worker_given_a_sync_clients_client_fails_at_once(
    start_broker: StartBroker,
) -> None:
    """Worker refuses a SyncClient (above), and not its `.client`, whose
    connections belong to the SyncClient's loop, in another thread: every
    claim and settings read raised RuntimeError ("in use in an event loop
    running in another thread"), logged with its traceback twice a second,
    for ever, run() neither returning nor raising, no job claimed (review
    finding). run() raises that RuntimeError at once."""
    broker = await start_broker(MemStore())
    sync = await asyncio.to_thread(SyncClient, broker.url, topic="w")
    try:
        await asyncio.to_thread(sync.enqueue, 1)
        worker = Worker(sync.client, lambda job: None, handle_signals=False)
        run = asyncio.ensure_future(worker.run())
        done, _ = await asyncio.wait([run], timeout=3.0)
        if not done:
            await worker.stop()
            await run
        assert done, "run() went on, failing every claim, for 3 s"
        with pytest.raises(RuntimeError, match="another thread"):
            run.result()
    finally:
        await asyncio.to_thread(sync.close)


class _OddDelays(Worker):
    def retry_delay(self, job: Job, error: Exception) -> float:
        if job.payload == "raises":
            raise RuntimeError("injected: retry_delay broke")
        delays: dict[str, Any] = {"negative": -5.0, "huge": 1e12, "nan": math.nan, "none": None}
        return delays[job.payload]  # type: ignore[no-any-return]


async def test_a_failed_job_is_nacked_whatever_retry_delay_says(q: Client, broker: Any) -> None:
    """A subclass's retry_delay that raises or answers a delay the broker refuses
    (negative, past a year, NaN) still gets its job nacked: it was left
    claimed, to its lease, its error not kept."""
    ids = await q.enqueue_many(["raises", "negative", "huge", "nan", "none"])

    def fail(job: Job) -> None:
        raise ValueError("the handler failed")

    worker = _OddDelays(q, fail, concurrency=5, max_jobs=5, prefetch=0, handle_signals=False)
    await asyncio.wait_for(worker.run(), 30)
    assert worker.failed == 5
    jobs = [await q.job(i) for i in ids]
    assert {job.payload: (job.status, job.attempts) for job in jobs} == {
        "raises": ("delayed", 1),
        "negative": ("pending", 1),
        "huge": ("delayed", 1),
        "nan": ("delayed", 1),
        "none": ("delayed", 1),
    }
    assert all("the handler failed" in (job.last_error or "") for job in jobs)


async def test_stop_drains_running_jobs(q: Client) -> None:
    await q.enqueue_many(["a", "b", "c"])
    started = asyncio.Event()
    release = asyncio.Event()
    running = 0

    async def hold(job: Job) -> str:
        nonlocal running
        running += 1
        if running == 3:
            started.set()
        await release.wait()
        return job.payload  # type: ignore[no-any-return]

    worker = Worker(q, hold, concurrency=3, wait=0.2, handle_signals=False)
    task = asyncio.create_task(worker.run())
    await started.wait()
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0)
    assert not stopping.done()  # it waits for the three running jobs
    release.set()
    await stopping
    await task
    assert (await q.status())["completed"] == 3


async def test_run_cancelled_while_draining_stops_at_once_and_stop_returns(q: Client) -> None:
    """stop() waits for the drain when the task running run() is cancelled (a
    TaskGroup's sibling failed, a wait_for around run() ran out). run()'s
    cleanup was cut short at the drain's wait: stop() never returned, the
    signal handlers stayed, and the jobs' heartbeats went on renewing their
    leases (review finding). Now the drain stops at once: the handler is
    cancelled, the job buffered dropped, both left to their leases."""
    first, second = await q.enqueue_many(["slow", "buffered"])
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(job: Job) -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    worker = Worker(q, handler, concurrency=1, wait=0.2, heartbeat_every=0.05, handle_signals=False)
    run = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 10)
    # The second job claimed ahead, its heartbeats going (a buffered job's too).
    await until(lambda: len(worker._ready) == 1 and worker._ready[0].beats is not None)
    stopping = asyncio.create_task(worker.stop())
    await until(lambda: bool(worker._idle._waiters))  # type: ignore[attr-defined]
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await asyncio.wait_for(stopping, 5)
    assert cancelled.is_set()
    beating = [t for t in asyncio.all_tasks() if "_heartbeats" in repr(t.get_coro())]
    assert not beating, beating
    for job_id in (first, second):
        assert (await q.job(job_id)).status == "claimed"  # left to its lease


async def test_a_handler_that_stops_its_worker_is_acked_and_run_returns(q: Client) -> None:
    """`await worker.stop()` from a handler (a job that says "stop") waited
    for the jobs to finish, its own handler among them: it never returned,
    run() neither, and the job stayed claimed until its lease ran out."""
    await q.enqueue("stop", id="pill")
    worker: Worker

    async def handler(job: Job) -> str:
        await worker.stop()
        return "stopped"

    worker = Worker(q, handler, wait=0.2, handle_signals=False)
    await asyncio.wait_for(worker.run(), 10)
    assert (await q.job("pill")).status == "completed"


@pytest.mark.parametrize("how", ["shield", "wait_for", "gather"])
async def test_a_handler_that_awaits_stop_through_another_task_is_acked_and_run_returns(
    q: Client, how: str
) -> None:
    """shield, wait_for and gather run stop() in a task of their own: 5eeb458
    spared only the handler's own task the wait, and those waited for every
    job, the handler awaiting them among them: run() never returned."""
    await q.enqueue("stop", id="pill")
    worker: Worker

    async def handler(job: Job) -> str:
        if how == "shield":
            await asyncio.shield(worker.stop())
        elif how == "wait_for":
            await asyncio.wait_for(worker.stop(), 5)
        else:
            await asyncio.gather(worker.stop(), asyncio.sleep(0))
        return "stopped"

    worker = Worker(q, handler, wait=0.2, handle_signals=False)
    await asyncio.wait_for(worker.run(), 10)
    assert (await q.job("pill")).status == "completed"


@pytest.mark.parametrize("meet", ["before stop", "after stop"])
async def test_two_jobs_that_stop_the_worker_are_both_acked(q: Client, meet: str) -> None:
    """Each stop() from a job waited for every job but its own: two calling
    it at once waited for each other, for ever ("before stop"). And a job
    whose stop() returned was waited for again by the other's stop(): each
    then waited for what the other did next ("after stop")."""
    await q.enqueue("stop", id="pill1")
    await q.enqueue("stop", id="pill2")
    meeting = asyncio.Barrier(2)  # the two handlers wait for each other there
    worker: Worker

    async def handler(job: Job) -> str:
        if meet == "before stop":
            await meeting.wait()
        elif job.id == "pill2":
            await until(lambda: len(worker._parked) == 1)  # pill1 waits in stop()
        await worker.stop()
        if meet == "after stop":
            await meeting.wait()
        return "stopped"

    worker = Worker(q, handler, concurrency=2, wait=0.2, handle_signals=False)
    await asyncio.wait_for(worker.run(), 10)
    assert [(await q.job(j)).status for j in ("pill1", "pill2")] == ["completed"] * 2


async def test_stop_from_a_handler_returns_once_the_jobs_claimed_ahead_ran(q: Client) -> None:
    """With one slot, the jobs claimed ahead could not start while the
    handler waiting in stop() held it: stop() returned before them, and the
    caller's clean-up (closing its client) ran under them."""
    await q.enqueue("stop", id="pill")
    await q.enqueue_many(["a", "b", "c"])
    events: list[str] = []
    worker: Worker

    async def handler(job: Job) -> str:
        if job.payload == "stop":
            await until(lambda: len(worker._ready) == 3)  # claimed ahead, waiting for the slot
            await worker.stop()
            events.append("stop returned")
            return "stopped"
        events.append(f"ran {job.payload}")
        return "ok"

    worker = Worker(q, handler, concurrency=1, prefetch=3, wait=0.2, handle_signals=False)
    await asyncio.wait_for(worker.run(), 10)
    assert events == ["ran a", "ran b", "ran c", "stop returned"]


async def test_one_job_that_calls_stop_twice_at_once_while_another_runs(q: Client) -> None:
    """The first of a job's two stop() calls to return unparked the job: the
    other then waited for that job, its own, for ever."""
    await q.enqueue("slow", id="slow")
    await q.enqueue("stop", id="pill")
    release = asyncio.Event()
    worker: Worker

    async def handler(job: Job) -> str:
        if job.payload == "slow":
            await release.wait()
            return "slow done"
        asyncio.get_running_loop().call_later(0.2, release.set)
        await asyncio.gather(worker.stop(), worker.stop())
        return "stopped"

    worker = Worker(q, handler, concurrency=2, wait=0.2, handle_signals=False)
    await asyncio.wait_for(worker.run(), 10)
    assert [(await q.job(j)).status for j in ("slow", "pill")] == ["completed"] * 2


async def test_a_stop_from_a_task_a_handler_started_keeps_to_the_concurrency(q: Client) -> None:
    """stop() in a task the handler started lent the job's slot to the jobs
    claimed ahead while the handler went on working: with concurrency=1, two
    handlers ran at once."""
    await q.enqueue("stop", id="pill")
    await q.enqueue_many(["a", "b"])
    now = most = 0
    stopping: list[asyncio.Task[None]] = []
    worker: Worker

    async def handler(job: Job) -> str:
        nonlocal now, most
        now += 1
        most = max(most, now)
        try:
            if job.payload == "stop":
                await until(lambda: len(worker._ready) == 2)
                stopping.append(asyncio.create_task(worker.stop()))
            await asyncio.sleep(0.2)  # still working
            return "ok"
        finally:
            now -= 1

    worker = Worker(q, handler, concurrency=1, prefetch=2, wait=0.2, handle_signals=False)
    await asyncio.wait_for(worker.run(), 10)
    await stopping[0]
    assert most == 1


async def test_a_handler_that_stops_waiting_in_stop_starts_no_job_past_the_concurrency(
    q: Client,
) -> None:
    """A handler waiting in stop() lends its slot to the jobs claimed ahead.
    One that waited there within a bound (asyncio.timeout) and then went on
    working took its slot back, and the next job started when the one it
    lent its slot to ended: with concurrency=1, two handlers worked at once
    for as long as it ran on. It and the job it lent its slot to may overlap
    (README); no other job starts until they are within the concurrency."""
    await q.enqueue("stop", id="pill")
    await q.enqueue_many(["a", "b"])
    now = most = 0  # handlers working (not waiting in stop())
    beside: dict[str, int] = {}  # handlers working as each job started
    worker: Worker

    def working(n: int) -> None:
        nonlocal now, most
        now += n
        most = max(most, now)

    async def handler(job: Job) -> str:
        beside[job.payload] = now
        working(1)
        try:
            if job.payload == "stop":
                await until(lambda: len(worker._ready) == 2)
                working(-1)  # its slot is lent while it waits
                try:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await worker.stop()  # waits a moment for the others
                finally:
                    working(1)
            await asyncio.sleep(0.3)
            return "ok"
        finally:
            working(-1)

    worker = Worker(q, handler, concurrency=1, prefetch=2, wait=0.2, handle_signals=False)
    await asyncio.wait_for(worker.run(), 10)
    assert beside == {"stop": 0, "a": 0, "b": 0}
    assert most == 2  # the pill and "a", which it lent its slot to
    assert worker.processed == 3


async def test_a_handler_cut_short_in_stop_does_not_wait_for_the_job_it_lent_its_slot_to(
    q: Client,
) -> None:
    """A handler cut short in stop() (a timeout around it) waited until the job
    it lent its slot to ended. That job may need what the handler holds (a
    connection of a pool sized to the concurrency, a lock): neither ended,
    and run() never returned (review). It goes on at once."""
    await q.enqueue("stop", id="pill")
    await q.enqueue("b", id="b")
    pool = asyncio.Semaphore(1)  # connections: one per slot
    worker: Worker

    async def handler(job: Job) -> str:
        async with pool:  # a connection, for the whole job
            if job.payload == "stop":
                await until(lambda: len(worker._ready) == 1)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await worker.stop()  # waits a moment for the others
        return "ok"

    worker = Worker(q, handler, concurrency=1, prefetch=1, wait=0.2, handle_signals=False)
    await asyncio.wait_for(worker.run(), 10)
    assert worker.processed == 2


async def test_stop_from_a_task_a_handler_started_waits_for_the_jobs(q: Client) -> None:
    """Tasks a handler starts copy its context: stop() there returned at once
    too, with jobs still running (their acks then failed under a client
    closed next). Only the handler's own task is spared the wait."""
    await q.enqueue("slow", id="slow")
    await q.enqueue("stop", id="pill")
    release = asyncio.Event()
    spawned: list[asyncio.Task[None]] = []
    worker: Worker

    async def handler(job: Job) -> str:
        if job.payload == "stop":
            spawned.append(asyncio.create_task(worker.stop()))
            return "stopping"
        await release.wait()
        return "slow done"

    worker = Worker(q, handler, concurrency=2, wait=0.2, handle_signals=False)
    run = asyncio.create_task(worker.run())
    await until(lambda: bool(spawned))
    done, _ = await asyncio.wait(spawned, timeout=0.3)
    assert not done  # it waits: the slow job runs
    release.set()
    await asyncio.wait_for(run, 10)
    await spawned[0]
    assert worker.processed == 2 and (await q.job("slow")).status == "completed"


class CountingClient(Client):
    """Records how many jobs each batch claim returned."""

    batches: list[int]

    async def claim_many(
        self,
        worker_id: str,
        count: int,
        lease: float | None = None,
        wait: float = 0,
        *,
        attempt_id: str | None = None,
        held: Container[tuple[str, str | None]] | None = None,
    ) -> list[Job]:
        jobs = await super().claim_many(
            worker_id, count, lease, wait, attempt_id=attempt_id, held=held
        )
        self.batches.append(len(jobs))
        return jobs


async def test_worker_claims_in_batches(broker: Any) -> None:
    async with CountingClient(broker.url, topic="w") as q:
        q.batches = []
        await q.enqueue_many(list(range(40)))
        seen: list[int] = []

        async def record(job: Job) -> None:
            seen.append(job.payload)

        worker = Worker(q, record, concurrency=8, wait=0.2, handle_signals=False)
        await run_until(worker, broker, lambda: _completed(q, 40))
    assert sorted(seen) == list(range(40))
    # Each claim asks for half the capacity: 8 slots plus a buffer of twice that.
    assert q.batches[0] == (8 + 16) // 2


async def test_short_jobs_are_claimed_far_ahead(broker: Any) -> None:
    """Without a fixed prefetch the buffer grows with the rate jobs end at:
    no-op jobs are soon claimed in batches larger than a buffer of twice the
    concurrency allows (fewer requests and writes per job). Slow jobs keep the
    small buffer: test_claim_ahead_sizes_the_buffer_from_the_rate_and_the_round_trip."""
    async with CountingClient(broker.url, topic="w") as q:
        q.batches = []
        for start in range(0, 3000, 1000):
            await q.enqueue_many(list(range(start, start + 1000)))

        async def nothing(job: Job) -> None:
            return None

        worker = Worker(q, nothing, concurrency=4, wait=0.2, handle_signals=False)
        await run_until(worker, broker, lambda: _completed(q, 3000))
    fixed_buffer_claim = (4 + 2 * 4 + 1) // 2
    assert max(q.batches) > fixed_buffer_claim, q.batches
    assert worker.buffer_size > 2 * 4
    assert max(q.batches) <= (4 + AHEAD_MAX * 4 + 1) // 2  # never past the cap


async def test_jobs_held_ahead_past_the_buffers_size_once_jobs_slow_down_are_given_back(
    broker: Any,
) -> None:
    """Short jobs grow the buffer to hundreds (ClaimAhead); when jobs slow
    down, its size shrinks, but the jobs held ahead stayed, each heartbeated
    every third of its lease while it waited its turn, none given back for
    idle workers: 2,576 heartbeats in 15 s for 1,120 jobs of 0.2 s whose own
    run needed none (concurrency 16, lease 3 s; review finding). A buffered
    job whose heartbeat comes due while the buffer is over its size has the
    jobs past it given back (one release for many, the attempt uncounted)."""
    async with FaultProxy(broker.url).running() as proxy, Client(proxy.url, topic="w") as q:
        for start in range(0, 6000, 1000):
            await q.enqueue_many(list(range(start, start + 1000)))
        slow = False

        async def handler(job: Job) -> None:
            if slow:
                await asyncio.sleep(0.1)  # 80 jobs a second: a buffer of 16 (the floor)

        # Heartbeats every second; a job's own run needs none.
        worker = Worker(q, handler, concurrency=8, lease=3.0, handle_signals=False)
        run = asyncio.create_task(worker.run())
        try:
            await until(lambda: len(worker._ready) >= 150, within=30)
            slow = True
            held = len(worker._ready)
            before = proxy.requests["/topics/w/heartbeat"]
            await asyncio.sleep(4.0)  # each job held ahead would be renewed three times
            beats = proxy.requests["/topics/w/heartbeat"] - before
            releases = proxy.requests["/topics/w/release"]
            given_back = worker.given_back
        finally:
            worker.request_stop()
            worker._on_signal()  # give back what is still held: no need to run it all
            await run
    assert given_back >= held // 4, f"{given_back} of {held} jobs held ahead given back"
    assert releases <= 5, f"{releases} release requests for {given_back} jobs"
    assert beats < held // 2, f"{beats} heartbeats for {held} jobs held ahead"


def test_claim_ahead_sizes_the_buffer_from_the_rate_and_the_round_trip() -> None:
    now = [0.0]
    ahead = ClaimAhead(concurrency=4, clock=lambda: now[0])
    assert ahead.size == 8  # twice the concurrency until something is measured

    def run(jobs_per_s: float, seconds: float) -> None:
        for _ in range(int(jobs_per_s * seconds)):
            now[0] += 1 / jobs_per_s
            ahead.ended()

    ahead.claimed(0.010, asked=6, got=6, wait=0)
    run(1_000, 1.0)  # 1,000/s x 10 ms x 4 round trips = 40 jobs
    assert 38 <= ahead.size <= 42
    run(4_000, 1.0)  # 160
    assert 155 <= ahead.size <= 165
    run(20_000, 1.0)  # 800: capped at AHEAD_MAX x 4
    assert ahead.size == AHEAD_MAX * 4
    run(50, 2.0)  # slow jobs: 50/s x 10 ms x 4 = 2, under the floor
    assert ahead.size == 8
    ahead.claimed(5.0, asked=6, got=1, wait=5)  # a long poll answered short: not a round trip
    run(1_000, 1.0)
    assert 38 <= ahead.size <= 42
    run(0.5, 20.0)  # jobs that end seconds apart: the buffer shrinks back
    assert ahead.size == 8


def test_claim_ahead_times_only_claims_that_could_not_long_poll() -> None:
    """A long poll is answered in full too when jobs come while it waits (an
    idle Worker, then a burst): its wait is no round trip. After a claim
    answered in full (had_jobs) the Worker sends the next with no wait: that
    one's time is."""
    ahead = ClaimAhead(concurrency=4)
    assert not ahead.had_jobs  # the first claims long-poll
    ahead.claimed(1.5, asked=6, got=6, wait=5)
    assert ahead._trip is None and ahead.had_jobs
    ahead.claimed(0.01, asked=6, got=6, wait=0)
    assert ahead._trip == 0.01
    ahead.claimed(0.01, asked=6, got=0, wait=0)  # the topic ran out: the next one long-polls
    assert not ahead.had_jobs


class TimedClaims(ClaimAhead):
    """Records the claims' times it took for round trips."""

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency)
        self.trips: list[float] = []

    def claimed(self, seconds: float, *asked_got_wait: Any) -> None:
        before = self._trip
        super().claimed(seconds, *asked_got_wait)
        if self._trip != before:
            self.trips.append(seconds)


async def test_a_long_poll_answered_in_full_is_not_taken_for_a_claims_round_trip(
    broker: Any, q: Client
) -> None:
    """An idle Worker's long poll, answered in full when a burst came while it
    waited, was taken for a claim's round trip (claims answered short were
    not): 1.5 s instead of ~1 ms, the buffer jumped to its cap (64 x
    concurrency) and one Worker claimed the burst for itself: with
    concurrency 2, some 90 jobs of a second each that other workers could
    have run."""
    for _ in range(2):
        await q.enqueue_many([{"payload": 0} for _ in range(1000)])

    async def sleep(job: Job) -> None:
        await asyncio.sleep(job.payload)

    worker = Worker(q, sleep, concurrency=2, wait=2, handle_signals=False)
    worker.ahead = ahead = TimedClaims(2)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(broker, lambda: _completed(q, 2000))
        size = worker.buffer_size
        assert ahead.trips  # the busy topic's claims were timed
        await asyncio.sleep(1.5)  # idle: its claims long-poll
        await q.enqueue_many([{"payload": 1} for _ in range(100)])
        await asyncio.sleep(0.5)
        held = len(worker._ready) + len(worker._running)
        assert max(ahead.trips) < 1.5, (
            f"a long poll of {max(ahead.trips):.3f} s taken for a round trip;"
            f" buffer {size} -> {worker.buffer_size}; {held} one-second jobs held"
        )
        assert held <= worker.concurrency + 2 * size, (held, size)
    finally:
        worker._on_signal()  # the jobs claimed ahead go back, unrun
        await task


def test_claim_ahead_never_asks_for_more_than_a_claim_may_carry() -> None:
    """A claim of more than api.MAX_BATCH jobs is refused: a large worker's
    buffer stops short of it, and so does each claim it sends."""
    now = [0.0]
    ahead = ClaimAhead(concurrency=200, clock=lambda: now[0])
    ahead.claimed(0.25, asked=300, got=300, wait=0)
    for _ in range(20_000):
        now[0] += 1 / 20_000
        ahead.ended()
    assert ahead.size == MAX_BATCH


async def test_a_large_worker_claims_within_the_apis_batch_limit(broker: Any) -> None:
    async with CountingClient(broker.url, topic="w") as q:
        q.batches = []
        await q.enqueue_many(list(range(1000)))
        await q.enqueue_many(list(range(1000, 1500)))

        async def nothing(job: Job) -> None:
            return None

        worker = Worker(q, nothing, concurrency=1200, prefetch=0, wait=0.2, handle_signals=False)
        await run_until(worker, broker, lambda: _completed(q, 1500))
    assert max(q.batches) == MAX_BATCH


async def test_worker_without_prefetch_claims_only_free_slots(broker: Any) -> None:
    async with CountingClient(broker.url, topic="w") as q:
        q.batches = []
        await q.enqueue_many(list(range(20)))

        async def nothing(job: Job) -> None:
            return None

        worker = Worker(q, nothing, concurrency=4, prefetch=0, wait=0.2, handle_signals=False)
        await run_until(worker, broker, lambda: _completed(q, 20))
    assert max(q.batches) == 4


async def test_a_worker_without_a_buffer_sends_one_claim_per_job_of_a_trickle(
    broker: Any,
) -> None:
    """A claim answered in full was followed by one sent with no wait, for
    ClaimAhead to time, which sizes nothing when `prefetch` is given. With
    none and one slot (`work --concurrency 1`) every claim that gets a job is
    answered in full: each job of a trickle cost a claim answered empty
    besides, before the long poll that waits for the next (review: 22
    claims for 10 jobs)."""
    async with CountingClient(broker.url, topic="w") as q:
        q.batches = []
        done = asyncio.Event()

        async def handler(job: Job) -> None:
            done.set()

        worker = Worker(q, handler, concurrency=1, prefetch=0, wait=5.0, handle_signals=False)
        run = asyncio.create_task(worker.run())
        try:
            for i in range(10):
                await until(lambda: bool(q.batches) and not worker._ready)
                await asyncio.sleep(0.1)  # the worker is idle: long polling
                done.clear()
                await q.enqueue(i)
                await asyncio.wait_for(done.wait(), 10)
            await asyncio.sleep(0.3)
        finally:
            await worker.stop()
            await run
    assert worker.processed == 10
    assert len(q.batches) <= 12, q.batches


async def test_prefetched_jobs_keep_their_leases_and_are_run_by_the_drain(
    q: Client, broker: Any
) -> None:
    ids = await q.enqueue_many(["first", "second", "third"])
    release = asyncio.Event()
    ran: list[str] = []

    async def one_at_a_time(job: Job) -> None:
        ran.append(job.payload)
        await release.wait()

    worker = Worker(
        q,
        one_at_a_time,
        concurrency=1,
        prefetch=2,
        lease=1.0,
        heartbeat_every=0.2,
        wait=0.2,
        handle_signals=False,
    )
    task = asyncio.create_task(worker.run())
    # The first job runs; the other two wait in the buffer, their leases renewed
    # well past the first one's end.
    first_expiry: float | None = None
    async with asyncio.timeout(30):
        while True:
            waiting = await q.job(ids[2])
            if waiting.status == "claimed":
                assert waiting.lease_expires_at is not None
                first_expiry = first_expiry or waiting.lease_expires_at
                if waiting.lease_expires_at > first_expiry + 2:
                    break
            await broker.committer.wait_changed("w", 1.0)
    assert ran == ["first"]
    assert await q.claim("thief") is None  # nothing was given back meanwhile
    stopping = asyncio.create_task(worker.stop())
    release.set()
    await stopping
    await task
    assert sorted(ran) == ["first", "second", "third"]
    for job_id in ids:
        job = await q.job(job_id)
        assert (job.status, job.attempts) == ("completed", 1)


async def test_a_prefetched_job_whose_lease_is_lost_is_dropped_not_run(
    q: Client, broker: Any
) -> None:
    _first, second = await q.enqueue_many(["first", "second"])
    release = asyncio.Event()
    runs: list[tuple[str, int]] = []

    async def hold_the_first(job: Job) -> None:
        runs.append((job.payload, job.attempts))
        if job.payload == "first":
            await release.wait()

    worker = Worker(
        q,
        hold_the_first,
        concurrency=1,
        prefetch=1,
        heartbeat_every=0.05,
        wait=0.2,
        handle_signals=False,
    )
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(30):
        while (await q.job(second)).status != "claimed":
            await broker.committer.wait_changed("w", 1.0)
        await q.nack(second)  # someone else gives it back while it waits in the buffer
        # The worker's next heartbeat finds it lost; it claims it afresh.
        while (await q.job(second)).attempts < 2 or (await q.job(second)).status != "claimed":
            await broker.committer.wait_changed("w", 1.0)
    release.set()
    await wait_until(broker, lambda: _completed(q, 2))
    await worker.stop()
    await task
    assert runs == [("first", 1), ("second", 2)]  # never run on the lease it lost


async def test_a_buffered_job_whose_lease_ran_out_while_the_loop_was_busy_is_not_started(
    broker_process: Any,
) -> None:
    """A buffered job was started whenever a slot freed, its lease checked
    only by its heartbeats: held up past the lease (CPU work in an async
    handler, a GC pause), the loop ran none, and the Worker started a job
    the broker had given to another client meanwhile (lease 1 s)."""
    # A broker of its own process: it reaps while this process's loop is busy.
    broker = broker_process("--backend", "memfs")
    thief_got: list[Job] = []
    thief_done = threading.Event()
    runs: list[tuple[str, int]] = []

    def thief() -> None:
        with SyncClient(broker.url, topic="w") as other:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and "second" not in [j.payload for j in thief_got]:
                thief_got.extend(other.claim_many("thief", 2, wait=1))
        thief_done.set()

    async with Client(broker.url, topic="w") as q:
        await q.settings(lease=1.0)
        await q.enqueue_many([{"payload": "first", "priority": 1}, {"payload": "second"}])

        async def hold_the_loop(job: Job) -> None:
            runs.append((job.payload, job.attempts))
            if job.payload == "first":
                # Once "second" waits in the buffer: the loop held (blocking
                # work on it) until the broker gave "second" to another client.
                await until(lambda: len(worker._ready) > 0)
                threading.Thread(target=thief, daemon=True).start()
                thief_done.wait(20)
                # Past the lease by half of it more: the Worker's end of the
                # lease may lag the broker's by the time its claim's answer
                # waited to be read (ms; 3 ms was all the margin, and "second"
                # was started about 1 run in 30 under load).
                time.sleep(0.5)  # noqa: ASYNC251 (the loop held, as the test means)

        worker = Worker(q, hold_the_loop, concurrency=1, prefetch=1, wait=0.2, handle_signals=False)
        task = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(30):
                await until(thief_done.is_set)
                # The worker goes on: "second" is dropped, or started (the fault).
                await until(lambda: not worker._ready)
                await until(lambda: not worker._running)
        finally:
            await worker.stop()
            await task
    assert "second" in [j.payload for j in thief_got]
    # Started on the lease that ran out: attempt 1. (On a loaded machine the
    # thief's lease may run out too, and the Worker claim it afresh: attempt 3.)
    assert runs[0] == ("first", 1) and ("second", 1) not in runs, runs


class GatedClient(Client):
    """Holds every claim until `gate` opens; records how many were in flight."""

    gate: asyncio.Event
    two_in_flight: asyncio.Event
    in_flight = 0
    most_in_flight = 0
    asked: list[int]

    async def claim_many(
        self,
        worker_id: str,
        count: int,
        lease: float | None = None,
        wait: float = 0,
        *,
        attempt_id: str | None = None,
        held: Container[tuple[str, str | None]] | None = None,
    ) -> list[Job]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.in_flight == 2:
            self.two_in_flight.set()
        self.asked.append(count)
        try:
            await self.gate.wait()
            return await super().claim_many(
                worker_id, count, lease, wait, attempt_id=attempt_id, held=held
            )
        finally:
            self.in_flight -= 1


async def test_a_second_claim_is_on_its_way_while_the_first_is_answered(broker: Any) -> None:
    async with GatedClient(broker.url, topic="w") as q:
        q.gate, q.two_in_flight, q.asked = asyncio.Event(), asyncio.Event(), []
        await q.enqueue_many(list(range(100)))

        async def nothing(job: Job) -> None:
            return None

        worker = Worker(q, nothing, concurrency=8, wait=0.2, handle_signals=False)
        task = asyncio.create_task(worker.run())
        async with asyncio.timeout(30):
            await q.two_in_flight.wait()
        assert q.asked == [12, 12]  # each half of the capacity (8 running + 16 buffered)
        q.gate.set()
        await run_until(worker, broker, lambda: _completed(q, 100))
        await task
    assert q.most_in_flight == 2  # never more
    assert worker.processed == 100


class LateFirstAnswerClient(Client):
    """The first claim is answered by the broker first, but its answer reaches
    the worker after the second claim's."""

    calls = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.first_answered = asyncio.Event()
        self.second_returned = asyncio.Event()

    async def claim_many(
        self,
        worker_id: str,
        count: int,
        lease: float | None = None,
        wait: float = 0,
        *,
        attempt_id: str | None = None,
        held: Container[tuple[str, str | None]] | None = None,
    ) -> list[Job]:
        self.calls += 1
        if self.calls == 1:
            jobs = await super().claim_many(
                worker_id, count, lease, wait, attempt_id=attempt_id, held=held
            )
            self.first_answered.set()
            await self.second_returned.wait()
            return jobs
        if self.calls == 2:
            await self.first_answered.wait()
            jobs = await super().claim_many(
                worker_id, count, lease, wait, attempt_id=attempt_id, held=held
            )
            self.second_returned.set()
            return jobs
        return await super().claim_many(
            worker_id, count, lease, wait, attempt_id=attempt_id, held=held
        )


async def test_claims_in_flight_hand_their_jobs_over_in_the_order_they_were_sent(
    broker: Any,
) -> None:
    async with LateFirstAnswerClient(broker.url, topic="w") as q:
        await q.enqueue_many(list(range(6)))
        order: list[int] = []

        async def record(job: Job) -> None:
            order.append(job.payload)

        worker = Worker(q, record, concurrency=1, prefetch=1, wait=0.2, handle_signals=False)
        await run_until(worker, broker, lambda: _completed(q, 6))
    assert order == list(range(6))  # oldest first, though the first answer came last


async def test_a_claims_jobs_do_not_wait_for_an_earlier_claims_long_poll(
    q: Client, broker: Any
) -> None:
    """Two claims in flight on a quiet topic, both long polls: a job came, the
    second got it, and its jobs waited in order behind the first, which
    answered only at the next job or when its wait was out (5 s). Measured on
    a Worker with jobs enqueued 1.3 s apart: a tenth of them started 1.3 s
    late (round 25). They wait ORDER_GRACE at most now. Here the first claim
    long-polls until the job has run."""
    await q.enqueue("job")
    ran = asyncio.Event()
    real = q.claim_many
    calls = 0

    async def claim_many(worker_id: str, count: int, *args: Any, **named: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # a long poll that finds nothing until the job has run
            await ran.wait()
            return []
        return await real(worker_id, count, *args, **named)

    q.claim_many = claim_many  # type: ignore[method-assign]

    async def run_it(job: Job) -> None:
        ran.set()

    worker = Worker(q, run_it, concurrency=2, prefetch=2, wait=5, handle_signals=False)
    await run_until(worker, broker, lambda: _completed(q, 1))
    assert ran.is_set()


class FailingFirstClient(Client):
    """Its first `failures` claims fail as if the broker were away."""

    failures = 0

    async def claim_many(
        self,
        worker_id: str,
        count: int,
        lease: float | None = None,
        wait: float = 0,
        *,
        attempt_id: str | None = None,
        held: Container[tuple[str, str | None]] | None = None,
    ) -> list[Job]:
        if self.failures > 0:
            self.failures -= 1
            raise BrokerUnavailable("injected: no broker")
        return await super().claim_many(
            worker_id, count, lease, wait, attempt_id=attempt_id, held=held
        )


async def test_the_worker_claims_again_after_both_claims_in_flight_failed(broker: Any) -> None:
    async with FailingFirstClient(broker.url, topic="w") as q:
        q.failures = 2  # both claims in flight at the start
        await q.enqueue_many(list(range(10)))

        async def nothing(job: Job) -> None:
            return None

        worker = Worker(q, nothing, concurrency=2, wait=0.2, handle_signals=False)
        await run_until(worker, broker, lambda: _completed(q, 10))
    assert (q.failures, worker.processed) == (0, 10)


class FirstClaimBreaks(Client):
    """Its first claim fails with an error that is not the SDK's."""

    broke = False

    async def claim_many(
        self,
        worker_id: str,
        count: int,
        lease: float | None = None,
        wait: float = 0,
        *,
        attempt_id: str | None = None,
        held: Container[tuple[str, str | None]] | None = None,
    ) -> list[Job]:
        if not self.broke:
            self.broke = True
            raise RuntimeError("injected: not an error of the SDK")
        return await super().claim_many(
            worker_id, count, lease, wait, attempt_id=attempt_id, held=held
        )


async def test_a_claim_failing_with_an_error_not_the_sdks_is_logged_and_claiming_goes_on(
    broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with FirstClaimBreaks(broker.url, topic="w") as q:
        await q.enqueue_many(list(range(3)))

        async def nothing(job: Job) -> None:
            return None

        worker = Worker(q, nothing, concurrency=1, prefetch=0, wait=0.2, handle_signals=False)
        with caplog.at_level(logging.WARNING, logger="simplequeue.worker"):
            await run_until(worker, broker, lambda: _completed(q, 3))
    [record] = [r for r in caplog.records if "claim failed" in r.getMessage()]
    assert record.name == "simplequeue.worker" and record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


async def test_a_worker_whose_claims_are_refused_for_good_stops_and_raises_why(
    start_broker: StartBroker,
) -> None:
    """A claim refused for good (a wrong token, a 400) was logged as failed
    and sent again every second, for ever: run() never returned, no job ran,
    and nothing said so but the log. The worker now stops claiming, runs what
    it holds, and raises the refusal."""
    broker = await start_broker(MemStore(), token="t0k")
    async with Client(broker.url, topic="w", token="wrong") as q:

        async def nothing(job: Job) -> None:
            return None

        worker = Worker(q, nothing, handle_signals=False)
        with pytest.raises(Unauthorized):
            await asyncio.wait_for(worker.run(), 15)
        with pytest.raises(Unauthorized):  # again, not a run that claims nothing
            await asyncio.wait_for(worker.run(), 15)
        with pytest.raises(ValueError, match="lease"):  # the broker refuses past 12 h
            Worker(q, nothing, lease=86_400, handle_signals=False)


async def test_a_burst_worker_on_a_url_that_routes_nowhere_does_not_say_the_topic_is_empty(
    start_broker: StartBroker,
) -> None:
    """A broker URL whose path is wrong (URLs may carry one, for a proxy's
    prefix) gets the broker's 404 for every route: a burst worker took it
    for "nothing to claim", logged "the topic is empty: stopping" and
    returned, its jobs untouched (a Worker without burst idled for ever;
    review finding). It gives up as on a 400, and raises why."""
    broker = await start_broker(MemStore())
    async with Client(broker.url + "/queue", topic="w") as q:

        async def nothing(job: Job) -> None:
            return None

        worker = Worker(q, nothing, burst=True, handle_signals=False)
        with pytest.raises(SimpleQueueError, match="no route"):
            await asyncio.wait_for(worker.run(), 15)


async def test_a_burst_worker_raises_when_no_broker_answers() -> None:
    """A burst worker returns once the topic is empty; with no broker to say
    so it claimed again every second, for ever (a script draining a queue
    hung). A claim that no broker answered, after the client's retries, ends
    its run with BrokerUnavailable."""
    async with Client("http://127.0.0.1:9", topic="w", retries=2, retry_budget=1) as q:

        async def nothing(job: Job) -> None:
            return None

        worker = Worker(q, nothing, burst=True, handle_signals=False)
        with pytest.raises(BrokerUnavailable):
            await asyncio.wait_for(worker.run(), 15)


async def test_a_claim_answered_again_with_the_jobs_the_worker_runs_gives_none_back(
    q: Client, broker: Any
) -> None:
    """A proxy (or a broker at fault) answering a claim with an earlier, larger
    claim's answer again: the first claim got three jobs, the next asked for
    the one free slot and was answered those three. claim_many held the
    answer to one job, releasing the other two at the broker, before the
    Worker dropped the jobs it holds: another client claimed them while their
    handlers ran here (review finding). The claim is told what the Worker
    holds (`held`): none of it is returned, nor released."""
    await q.enqueue_many(["a", "b", "c"])
    running: set[str] = set()
    finish = asyncio.Event()

    async def slow(job: Job) -> None:
        running.add(job.id)
        await finish.wait()

    async with FaultProxy(broker.url).running() as proxy, Client(proxy.url, topic="w") as via:
        proxy.fail("/claim", "pass", "replay")  # no settings read first: prefetch 0
        worker = Worker(via, slow, concurrency=4, prefetch=0, wait=0.2, handle_signals=False)
        run = asyncio.create_task(worker.run())
        try:
            # The third claim goes out once the replayed second one was handled.
            await until(lambda: len(running) == 3 and proxy.requests["/topics/w/claim"] >= 3)
            await asyncio.gather(*via._releases)  # any release of "extras" claim_many started
            stolen = await q.claim_many("thief", 3)
            assert stolen == [], f"jobs running here were given back: {[j.id for j in stolen]}"
            assert proxy.requests["/topics/w/release"] == 0
        finally:
            finish.set()
            await worker.stop()
            await run
    assert worker.processed == 3
    assert (await q.status())["completed"] == 3


# --- acks -------------------------------------------------------------------------------


class AckCountingClient(Client):
    """Records the size of every ack request, and counts those the broker
    refused whole for their size (a 413)."""

    ack_batches: list[int]
    refused = 0

    async def ack_many(self, acks: Any) -> list[dict[str, Any]]:
        acks = list(acks)
        self.ack_batches.append(len(acks))
        try:
            return await super().ack_many(acks)
        except PayloadTooLarge:
            self.refused += 1
            raise


async def test_acks_of_jobs_that_end_together_share_a_request(broker: Any) -> None:
    async with AckCountingClient(broker.url, topic="w") as q:
        q.ack_batches = []
        await q.enqueue_many(list(range(30)))

        async def nothing(job: Job) -> None:
            return None

        worker = Worker(q, nothing, concurrency=30, prefetch=0, wait=0.2, handle_signals=False)
        await run_until(worker, broker, lambda: _completed(q, 30))
    assert sum(q.ack_batches) == 30
    assert len(q.ack_batches) < 30 and max(q.ack_batches) > 1


async def test_ack_batches_are_bounded_by_bytes_not_only_by_count(broker: Any) -> None:
    """Acks rode batches of up to 1,000 whatever their results weighed: 300
    results of 40 KB that ended together went as one 12 MB request, refused
    (413, --max-body 1 MiB), then in halves, refused again, down to requests
    that fit: 15 refused of 31, every byte encoded and sent four times. They
    go in requests of 512 KB at most now, as the CLI's enqueue sends jobs."""
    async with AckCountingClient(broker.url, topic="w") as q:
        q.ack_batches = []
        await q.enqueue_many(list(range(300)))
        ended = asyncio.Event()

        async def large(job: Job) -> str:
            await ended.wait()
            return "x" * 40_000

        worker = Worker(q, large, concurrency=300, prefetch=0, wait=1, handle_signals=False)
        task = asyncio.create_task(worker.run())
        try:
            await until(lambda: len(worker._running) == 300)
            ended.set()
            await wait_until(broker, lambda: _completed(q, 300))
        finally:
            await worker.stop()
            await task
    assert worker.processed == 300
    assert q.refused == 0, f"{q.refused} of {len(q.ack_batches)} ack requests refused"
    assert sum(q.ack_batches) == 300 and max(q.ack_batches) > 1


class FirstAckRequestBreaks(Client):
    """The first ack request is held until the job `other` has ended (so that its
    ack is queued behind it), then fails with an error that is not the SDK's."""

    other = ""
    broke = False
    acking: asyncio.Event

    async def ack_many(self, acks: Any) -> list[dict[str, Any]]:
        acks = list(acks)
        if not self.broke:
            self.broke = True
            self.acking.set()
            [task] = [t for t in asyncio.all_tasks() if t.get_name() == f"job:{self.other}"]
            await asyncio.wait([task])
            raise RuntimeError("injected: the ack request broke")
        return await super().ack_many(acks)


async def test_a_failed_ack_request_is_logged_and_the_acks_queued_behind_it_still_go(
    broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with FirstAckRequestBreaks(broker.url, topic="w") as q:
        first, second = await q.enqueue_many(["first", "second"])
        q.other, q.acking = second, asyncio.Event()

        async def handle(job: Job) -> str:
            if job.payload == "second":
                await q.acking.wait()  # the first job's ack request is on its way
            return str(job.payload)

        worker = Worker(q, handle, concurrency=2, prefetch=0, wait=0.2, handle_signals=False)

        async def second_done() -> bool:
            return (await q.job(second)).status == "completed"

        with caplog.at_level(logging.ERROR):
            await run_until(worker, broker, second_done)
        assert (await q.job(first)).status == "claimed"  # its ack was lost: redelivered later
    assert any("1 acks failed" in r.getMessage() for r in caplog.records)


class SecondHalfFails(Client):
    """Refuses whole (a 400) an ack request of several acks; of the halves it
    is then sent in, the first lands and the second fails as a broker that
    could not be reached (its retries spent)."""

    sizes: list[int]

    async def ack_many(self, acks: Any) -> list[dict[str, Any]]:
        acks = list(acks)
        self.sizes.append(len(acks))
        if len(acks) > 1:
            raise InvalidRequest("injected: refused whole")
        if len(self.sizes) > 2:
            raise BrokerUnavailable("injected: the second half failed")
        return await super().ack_many(acks)


async def test_acks_that_landed_in_a_half_before_the_other_failed_count_as_landed(
    broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A request refused whole goes again in halves; when the second failed,
    the whole run counted as failed: the first half's acks, committed, were
    counted unacked and logged "will be redelivered"."""
    async with SecondHalfFails(broker.url, topic="w") as q:
        q.sizes = []
        ids = await q.enqueue_many(["first", "second"])
        both = asyncio.Event()

        async def together(job: Job) -> None:
            if job.payload == "second":
                both.set()
            await both.wait()  # they end in one turn of the loop: their acks share a request

        worker = Worker(q, together, concurrency=2, prefetch=0, wait=0.2, handle_signals=False)
        with caplog.at_level(logging.ERROR):
            await run_until(worker, broker, lambda: _completed(q, 1))
        statuses = sorted([(await q.job(job_id)).status for job_id in ids])
    assert q.sizes == [2, 1, 1]
    assert statuses == ["claimed", "completed"]  # the ack lost: its job redelivered later
    assert (worker.processed, worker.unacked) == (1, 1)
    assert any("1 acks failed" in r.getMessage() for r in caplog.records)


# --- handlers ---------------------------------------------------------------------------


def failures_logged(caplog: pytest.LogCaptureFixture, job_id: str) -> list[logging.LogRecord]:
    """Records of `job_id`'s handler failures on the simplequeue.worker logger."""
    return [
        r
        for r in caplog.records
        if r.name == "simplequeue.worker" and job_id in r.getMessage() and r.exc_info
    ]


async def test_a_handler_failure_is_logged_with_its_traceback(
    q: Client, broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = await q.enqueue("poison", max_attempts=1)

    async def boom(job: Job) -> None:
        raise ValueError("no such item")

    worker = Worker(q, boom, wait=0.2, handle_signals=False)
    with caplog.at_level(logging.WARNING, logger="simplequeue.worker"):
        await run_until(worker, broker, lambda: _dead(q, 1))
    [record] = failures_logged(caplog, job_id)
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert "ValueError: no such item" in caplog.text
    assert "Traceback" in caplog.text and "in boom" in caplog.text


async def _dead(q: Client, n: int) -> bool:
    return (await q.status())["dead"] >= n


async def test_a_handler_error_longer_than_max_body_still_nacks_its_job(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """An error quoting a large payload or response, sent whole in the nack
    (the broker keeps api.MAX_ERROR characters of it), was over the broker's
    --max-body: the nack was refused (413) and the job sat claimed until its
    lease ran out, its error not kept and its backoff ignored. The log keeps
    it whole."""
    broker = await start_broker(MemStore(), max_body=64 * 1024)
    async with Client(broker.url, topic="w") as q:
        job_id = await q.enqueue({"n": 1}, max_attempts=1)
        text = "upstream answered: " + "x" * 100_000

        async def fails(job: Job) -> None:
            raise ValueError(text)

        worker = Worker(q, fails, wait=0.2, lease=30, backoff=FAST, handle_signals=False)
        with caplog.at_level(logging.WARNING, logger="simplequeue.worker"):
            await run_until(worker, broker, lambda: _dead(q, 1))
        job = await q.job(job_id)
        assert job.last_error == f"ValueError: {text}"[:MAX_ERROR]
        assert f"ValueError: {text}" in caplog.text
        assert "could not settle" not in caplog.text


async def test_a_plain_function_runs_in_a_thread_and_its_return_value_acks(
    q: Client, broker: Any
) -> None:
    ids = await q.enqueue_many([1, 2, 3])
    loop_thread = threading.get_ident()
    threads: set[int] = set()

    def triple(job: Job) -> int:  # blocking code is welcome here
        threads.add(threading.get_ident())
        return int(job.payload) * 3

    worker = Worker(q, triple, wait=0.2, handle_signals=False)
    await run_until(worker, broker, lambda: _completed(q, 3))
    assert [(await q.job(i)).result for i in ids] == [3, 6, 9]
    assert threads and loop_thread not in threads


@pytest.mark.parametrize("as_task", [False, True])
async def test_plain_functions_run_as_many_at_once_as_the_concurrency(
    q: Client, broker: Any, as_task: bool
) -> None:
    """Handlers in threads ran on asyncio's default pool, min(32, cores + 4)
    threads shared by the process: a Worker(concurrency=12) ran 6 at once on 2
    cores, its other jobs waiting in the pool's queue. Twelve handlers meet at
    a barrier of twelve."""
    n = 12
    meet = threading.Barrier(n, timeout=10)

    def met() -> str:
        meet.wait()  # BrokenBarrierError, and the job fails, if fewer run at once
        return "met"

    def handler(job: Job) -> str:
        return met()

    tasks = Tasks()
    meet_task = tasks.task(name="meet")(met)
    if as_task:
        ids = [await meet_task.enqueue(q) for _ in range(n)]
    else:
        ids = await q.enqueue_many(list(range(n)))
    worker = Worker(
        q, tasks if as_task else handler, concurrency=n, max_jobs=n, handle_signals=False
    )
    # 6 threads or fewer: the barrier times out after 10 s; 12 meet at once
    await asyncio.wait_for(worker.run(), 30)
    assert [await q.result(i, timeout=5) for i in ids] == ["met"] * n
    assert (worker.processed, worker.failed) == (n, 0)


async def test_a_partial_of_a_plain_function_runs_in_a_thread_too(q: Client, broker: Any) -> None:
    job_id = await q.enqueue(5)

    def scale(factor: int, job: Job) -> int:
        assert threading.get_ident() != loop_thread
        return factor * int(job.payload)

    loop_thread = threading.get_ident()
    worker = Worker(q, functools.partial(scale, 10), wait=0.2, handle_signals=False)
    await run_until(worker, broker, lambda: _completed(q, 1))
    assert (await q.job(job_id)).result == 50


async def test_a_plain_function_that_returns_a_coroutine_has_it_awaited(
    q: Client, broker: Any
) -> None:
    job_id = await q.enqueue(4)

    async def square(job: Job) -> int:
        return int(job.payload) ** 2

    worker = Worker(q, lambda job: square(job), wait=0.2, handle_signals=False)
    await run_until(worker, broker, lambda: _completed(q, 1))
    assert (await q.job(job_id)).result == 16


async def test_a_plain_function_that_raises_fails_the_job_with_its_error(
    q: Client, broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = await q.enqueue("x", max_attempts=1)

    def refuse(job: Job) -> None:
        raise PermissionError("not today")

    worker = Worker(q, refuse, wait=0.2, handle_signals=False)
    with caplog.at_level(logging.WARNING, logger="simplequeue.worker"):
        await run_until(worker, broker, lambda: _dead(q, 1))
    [job] = await q.dead()
    assert (job.id, job.last_error) == (job_id, "PermissionError: not today")
    assert failures_logged(caplog, job_id)


@pytest.mark.parametrize("in_pool", [True, False])
async def test_a_plain_function_raising_stop_iteration_fails_its_job_and_stop_returns(
    q: Client, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, in_pool: bool
) -> None:
    """`next(iter(rows))` on an empty result raised StopIteration in the
    handler's thread, which asyncio cannot set on a future ("StopIteration
    interacts badly with generators"): the future was never done, the job's
    heartbeats renewed its lease for ever, its slot stayed taken and stop()
    never returned (review of the Worker, round 34). It fails its job as a
    RuntimeError, as PEP 479 has a generator's StopIteration, from the
    Worker's pool or from asyncio.to_thread's (in_thread without a Worker's)."""
    if not in_pool:
        monkeypatch.setattr(worker_module, "run_jobs_on", lambda pool, held: None)
    job_id = await q.enqueue("x", max_attempts=1)

    def first_row(job: Job) -> Any:
        return next(iter([]))

    worker = Worker(q, first_row, wait=0.2, lease=1.0, backoff=FAST, handle_signals=False)
    with caplog.at_level(logging.WARNING, logger="simplequeue.worker"):
        await run_bounded(worker, lambda: _dead(q, 1), within=5.0)
    [job] = await q.dead()
    assert job.id == job_id
    assert job.last_error is not None and job.last_error.startswith("RuntimeError: ")
    assert job.last_error.endswith(".first_row raised StopIteration"), job.last_error
    assert failures_logged(caplog, job_id)
    assert (worker.failed, worker.processed) == (1, 0)


async def test_a_handler_that_cannot_be_called_fails_the_job_at_once(
    q: Client, broker: Any
) -> None:
    job_id = await q.enqueue("x", max_attempts=1)

    async def takes_nothing() -> None:
        return None

    worker = Worker(q, takes_nothing, wait=0.2, handle_signals=False)  # type: ignore[arg-type]
    await run_until(worker, broker, lambda: _dead(q, 1))
    [job] = await q.dead()
    assert job.id == job_id and job.last_error is not None
    assert job.last_error.startswith("TypeError:") and "argument" in job.last_error


class Counter:
    """A callable object that is no coroutine function and returns a plain value."""

    def __call__(self, job: Job) -> int:
        return 1


class AsyncDoubler:
    async def __call__(self, job: Job) -> int:
        return 2 * int(job.payload)


class Dispatcher:
    """A callable object that returns an awaitable (as a task registry does)."""

    def __call__(self, job: Job) -> Awaitable[int]:
        return AsyncDoubler()(job)


async def test_a_callable_that_returns_no_awaitable_fails_the_job_at_once(
    q: Client, broker: Any
) -> None:
    job_id = await q.enqueue("x", max_attempts=1)
    worker = Worker(q, Counter(), wait=0.2, handle_signals=False)
    await run_until(worker, broker, lambda: _dead(q, 1))
    [job] = await q.dead()
    assert job.id == job_id and job.last_error is not None
    assert "returned int, not an awaitable" in job.last_error


async def test_callable_objects_that_are_or_return_coroutines_ack(q: Client, broker: Any) -> None:
    for n, handler in enumerate([AsyncDoubler(), Dispatcher()], 1):
        job_id = await q.enqueue(n)
        worker = Worker(q, handler, wait=0.2, handle_signals=False)
        await run_until(worker, broker, functools.partial(_completed, q, n))
        assert (await q.job(job_id)).result == 2 * n


async def test_a_result_that_cannot_be_sent_fails_its_job_not_the_ack_batch(
    q: Client, broker: Any
) -> None:
    good = await q.enqueue("good")
    bad = await q.enqueue("bad", max_attempts=1)

    async def answer(job: Job) -> Any:
        return object() if job.payload == "bad" else "fine"

    # Both jobs end in the same turns of the loop: their acks would share a batch.
    worker = Worker(q, answer, concurrency=2, prefetch=0, wait=0.2, handle_signals=False)

    async def settled() -> bool:
        counts = await q.status()
        return (counts["completed"], counts["dead"]) == (1, 1)

    await run_until(worker, broker, settled)
    assert (await q.job(good)).result == "fine"
    failed = await q.job(bad)
    assert failed.status == "dead" and failed.last_error is not None
    assert "cannot be sent as JSON" in failed.last_error


async def test_a_handler_that_overruns_its_timeout_is_cancelled_and_the_job_failed(
    q: Client, broker: Any
) -> None:
    job_id = await q.enqueue("stuck", max_attempts=2)
    cancelled: list[int] = []

    async def stuck(job: Job) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(job.attempts or 0)
            raise

    worker = Worker(q, stuck, timeout=0.2, backoff=FAST, wait=0.2, handle_signals=False)
    await run_until(worker, broker, lambda: _dead(q, 1))
    [job] = await q.dead()
    assert (job.id, job.attempts, cancelled) == (job_id, 2, [1, 2])  # each attempt counted
    assert job.last_error is not None and "timed out after 0.2 s" in job.last_error
    assert worker.failed == 2


async def test_a_plain_function_that_overruns_its_timeout_fails_the_job_when_it_returns(
    q: Client, broker: Any
) -> None:
    """A thread cannot be stopped: past its timeout its job stays held (given
    back, it could run twice at once) and its slot taken (the next job does
    not start beside it); it fails as the thread returns, whatever it returned."""
    job_id = await q.enqueue("blocked", max_attempts=1)
    await q.enqueue("next", id="next")
    release = threading.Event()
    started: list[str] = []

    def blocked(job: Job) -> str:
        started.append(job.payload)
        if job.payload == "blocked":
            release.wait(30)
        return "done"

    overran = Said("ran past its timeout")
    logging.getLogger("simplequeue.worker").addHandler(overran)
    worker = Worker(
        q, blocked, concurrency=1, timeout=0.2, prefetch=0, wait=0.2, handle_signals=False
    )
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(overran.said.wait(), 10)
        assert (await q.job(job_id)).status == "claimed"
        assert started == ["blocked"]  # the one slot is still the thread's
        release.set()
        await wait_until(broker, lambda: _dead(q, 1))
        assert (await q.result("next", timeout=5)) == "done"
    finally:
        release.set()
        logging.getLogger("simplequeue.worker").removeHandler(overran)
        await worker.stop()
        await task
    [job] = await q.dead()
    assert job.id == job_id and job.last_error is not None
    assert "timed out after 0.2 s" in job.last_error


class NackBreaks(Client):
    """Every nack fails with an error that is not the SDK's."""

    async def nack(self, job: Job | str, delay: float = 0, error: str | None = None) -> str:
        raise RuntimeError("injected: the nack broke")


async def test_a_nack_failing_with_an_error_not_the_sdks_is_logged(
    broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with NackBreaks(broker.url, topic="w") as q:
        job_id = await q.enqueue("x")
        failed = asyncio.Event()

        async def boom(job: Job) -> None:
            failed.set()
            raise ValueError("boom")

        worker = Worker(q, boom, wait=0.2, handle_signals=False)
        run = asyncio.create_task(worker.run())
        with caplog.at_level(logging.WARNING, logger="simplequeue.worker"):
            async with asyncio.timeout(30):
                await failed.wait()
            await worker.stop()
            await run
    [record] = [r for r in caplog.records if "could not settle" in r.getMessage()]
    assert job_id in record.getMessage() and record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


async def run_script(script: str, *args: str) -> tuple[int, str, str]:
    """Run `script` in a Python process of its own (signals sent to it reach it
    alone): its exit status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


TWO_WORKERS_AND_SIGTERM = """
import asyncio, os, signal, sys
from simplequeue.client import Client, Worker

async def main(url, own_handler):
    loop = asyncio.get_running_loop()
    told = asyncio.Event()
    if own_handler:
        loop.add_signal_handler(signal.SIGTERM, told.set)
    clients = [Client(url, topic=t) for t in ("a", "b")]
    workers = [Worker(q, lambda job: None, wait=0.2) for q in clients]
    runs = [asyncio.create_task(w.run()) for w in workers]
    await asyncio.sleep(0)  # both run(): their signal handling is set up
    os.kill(os.getpid(), signal.SIGTERM)
    if own_handler:
        await asyncio.wait_for(told.wait(), 10)  # the application's, not replaced
        told.clear()
        for w in workers:
            await w.stop()
        os.kill(os.getpid(), signal.SIGTERM)  # still the application's
        await asyncio.wait_for(told.wait(), 10)
    else:
        await asyncio.wait_for(asyncio.gather(*runs), 10)  # every one drains
    for q in clients:
        await q.close()
    print("ok")

asyncio.run(main(sys.argv[1], sys.argv[2] == "own"))
"""


@pytest.mark.parametrize("handler", ["workers", "own"])
async def test_sigterm_stops_every_worker_of_a_process_and_an_own_handler_is_kept(
    broker: Any, handler: str
) -> None:
    """Each Worker installed its own SIGTERM handler, replacing the one before:
    only the last Worker drained, and the application's handler was gone."""
    code, out, err = await run_script(TWO_WORKERS_AND_SIGTERM, broker.url, handler)
    assert (code, out.strip()) == (0, "ok"), err[-2000:]


SIGINT_AFTER_WORKERS = """
import asyncio, os, signal, sys
from simplequeue.client import Client, Worker

async def main():
    async with Client(sys.argv[1], topic="empty") as q:
        workers = [Worker(q, lambda job: None, burst=True) for _ in range(2)]
        await asyncio.gather(*(w.run() for w in workers))
    print("handler:", signal.getsignal(signal.SIGINT), flush=True)
    os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, after the Workers returned
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        print("main cancelled", flush=True)  # asyncio.run()'s own Ctrl-C handling
        raise

try:
    asyncio.run(main())
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
"""


async def test_a_worker_gives_back_asyncio_runs_ctrl_c_handler_when_it_returns(
    broker: Any,
) -> None:
    """Worker.run() takes SIGINT over with loop.add_signal_handler (it leaves
    asyncio.run()'s own handler be: _handled_already) and, as the last
    Worker returned, loop.remove_signal_handler(SIGINT) installed
    signal.default_int_handler, not the handler it found. asyncio.run()'s
    Ctrl-C handling (cancel the main task, so that its `finally` and `async
    with` blocks run, then raise KeyboardInterrupt) was gone for the rest of
    the program: a Ctrl-C after a burst Worker raised KeyboardInterrupt
    wherever the loop happened to be, and the main task was never cancelled
    (review of what operators run, round 30)."""
    code, out, err = await run_script(SIGINT_AFTER_WORKERS, broker.url)
    assert code == 0, err[-2000:]
    assert "Runner._on_sigint" in out, out  # the handler it found
    assert "main cancelled" in out and "KeyboardInterrupt" in out, out


# --- heartbeats -------------------------------------------------------------------------


async def test_a_heartbeat_that_meets_a_500_is_logged_and_the_next_one_goes_out(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture
) -> None:
    broker = await start_broker(MemStore())
    async with FaultProxy(broker.url).running() as proxy, Client(proxy.url, topic="w") as q:
        job_id = await q.enqueue("long")
        proxy.fail("/heartbeat", "500")  # a status the client does not retry
        runs = 0

        async def long(job: Job) -> str:
            nonlocal runs
            runs += 1
            # Heartbeats past a lease's worth (2.4 s), each 0.2 s: a lease of
            # 2 s leaves room for a loaded machine's late ones (0.6 s, three
            # intervals, ran out beside a suite and four helpers).
            while proxy.requests["/topics/w/heartbeat"] < 12:
                await broker.committer.wait_changed("w", 1.0)
            return "done"

        worker = Worker(q, long, lease=2, heartbeat_every=0.2, wait=0.2, handle_signals=False)
        with caplog.at_level(logging.WARNING, logger="simplequeue.worker"):
            await run_until(worker, broker, lambda: _completed(q, 1))
        job = await q.job(job_id)
    assert (job.status, job.result, job.attempts, runs) == ("completed", "done", 1, 1)
    assert "heartbeat failed" in caplog.text and "500" in caplog.text


# Heartbeats that land after the first, 0.1 s apart: past a lease of 1 s, which
# leaves room for a loaded machine's late ones (0.3 s, three intervals, ran out
# when the process was stopped 0.15 s now and then).
ENOUGH = 12


class OneHeartbeatBreaks(Client):
    """Its first heartbeat fails with an error that is not the SDK's; it counts
    the heartbeats that land after it, and says when ENOUGH did."""

    broke = False
    landed = 0
    enough_landed: asyncio.Event

    async def heartbeat(self, job: Job | str, lease: float | None = None) -> float:
        if not self.broke:
            self.broke = True
            raise OSError("injected: not an error of the SDK")
        expires = await super().heartbeat(job, lease)
        self.landed += 1
        if self.landed == ENOUGH:
            self.enough_landed.set()
        return expires


class FirstHeartbeatHangs(Client):
    """Its first heartbeat is never answered; it counts those that land after,
    and says when ENOUGH did."""

    hung = False
    landed = 0
    enough_landed: asyncio.Event

    async def heartbeat(self, job: Job | str, lease: float | None = None) -> float:
        if not self.hung:
            self.hung = True
            await asyncio.Event().wait()  # no answer, ever (until cancelled)
        expires = await super().heartbeat(job, lease)
        self.landed += 1
        if self.landed == ENOUGH:
            self.enough_landed.set()
        return expires


@pytest.mark.parametrize("client_class", [OneHeartbeatBreaks, FirstHeartbeatHangs])
async def test_heartbeats_go_on_after_one_that_failed_or_got_no_answer(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture, client_class: type[Any]
) -> None:
    """After a heartbeat that failed with an error not the SDK's, or that got
    no answer, the next ones go out on time, while it waits until the lease's
    end: awaited for the client's timeout (30 s, a whole default lease), one
    unanswered heartbeat let the lease run out while the handler ran on (the
    job ran twice)."""
    broker = await start_broker(MemStore())
    async with client_class(broker.url, topic="w") as q:
        q.enough_landed = asyncio.Event()
        job_id = await q.enqueue("long")
        runs = 0

        async def long(job: Job) -> str:
            nonlocal runs
            runs += 1
            # Past the lease the first heartbeat would have renewed (bounded:
            # if no heartbeat lands again, the job fails).
            await asyncio.wait_for(q.enough_landed.wait(), 5)
            return "done"

        worker = Worker(
            q, long, lease=1, heartbeat_every=0.1, wait=0.2, backoff=FAST, handle_signals=False
        )
        with caplog.at_level(logging.WARNING, logger="simplequeue.worker"):
            await run_until(worker, broker, lambda: _completed(q, 1))
        job = await q.job(job_id)
    assert (job.status, job.attempts, runs) == ("completed", 1, 1)
    assert "heartbeat failed" in caplog.text


class SlowFirstAck(Client):
    """Holds its first ack request until ENOUGH heartbeats have landed since
    (past the test's lease of 1 s; at most 5 s), then sends it."""

    acking = False
    beats_since = 0
    renewed: asyncio.Event

    async def heartbeat(self, job: Job | str, lease: float | None = None) -> float:
        expires = await super().heartbeat(job, lease)
        if self.acking:
            self.beats_since += 1
            if self.beats_since == ENOUGH:
                self.renewed.set()
        return expires

    async def ack_many(self, acks: Any) -> list[dict[str, Any]]:
        acks = list(acks)
        if not self.acking:
            self.acking = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.renewed.wait(), 5)
        return await super().ack_many(acks)


def test_a_renewal_read_late_counts_from_when_its_heartbeat_was_sent() -> None:
    """A heartbeat's answer read long after it came (the loop held up by
    blocking work in a handler) moved the lease's end to when it was read
    plus what the broker said was left: seconds past the broker's own end,
    and a buffered job whose lease ran out meanwhile could be started. The
    renewal counts from when the heartbeat was sent, however late its answer
    is read."""
    job = Job(id="j", status="claimed", lease_token="k")
    held = worker_module._Claimed(job, 1.0, 100.0)
    assert worker_module._renewed_until(held, 100.0) == 101.0


class SlowHeadWrites(MemStore):
    """A store whose topics' commits take `slow` seconds once it is set: an S3
    PUT slow under load, retried."""

    slow = 0.0

    async def put_if(self, key: str, data: bytes, **kw: Any) -> str:
        if self.slow and key.startswith("topics/"):
            await asyncio.sleep(self.slow)
        return await super().put_if(key, data, **kw)


async def test_a_slow_commit_of_each_heartbeat_keeps_the_job(start_broker: StartBroker) -> None:
    """The broker's commit of each renewal takes 0.4 of the lease: every
    heartbeat lands. Counted from when the heartbeat was sent, less what the
    broker said was left after its write (tried in round 34), the lease's
    end fell short of the broker's by the write, and the running job was
    taken for lost, its handler cancelled, at 0.36 of the lease (review of
    round 34's change). A lease from when it was sent keeps it."""
    lease = 1.5
    store = SlowHeadWrites()
    broker = await start_broker(store)
    async with Client(broker.url, topic="w") as q:
        await q.settings(lease=lease)
        store.slow = 0.4 * lease
        status, runs = await _one_job_longer_than_its_lease(q, lease)
    assert (status, runs) == ("completed", [1])


async def _one_job_longer_than_its_lease(q: Client, lease: float) -> tuple[str, list[int]]:
    """A Worker runs one job (max_attempts 1) that takes two leases: its
    status once finished, and the attempts its handler ran at."""
    job_id = await q.enqueue("long", max_attempts=1)
    runs: list[int] = []

    async def longer_than_its_lease(job: Job) -> str:
        runs.append(job.attempts or 0)
        await asyncio.sleep(2 * lease)  # the work itself
        return "done"

    worker = Worker(q, longer_than_its_lease, prefetch=0, wait=0.2, handle_signals=False)
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(30):
            finished = await q.job(job_id, wait=20)
    finally:
        await worker.stop()
        await task
    return finished.status, runs


async def test_the_lease_is_renewed_until_the_ack_is_answered(start_broker: StartBroker) -> None:
    """The heartbeats stopped when the handler returned, before its ack was
    sent: an ack queued or slow past the lease let the job be claimed again
    and run twice."""
    broker = await start_broker(MemStore())
    async with SlowFirstAck(broker.url, topic="w") as q:
        q.renewed = asyncio.Event()
        job_id = await q.enqueue("quick")
        runs = 0

        async def quick(job: Job) -> str:
            nonlocal runs
            runs += 1
            return "done"

        worker = Worker(
            q, quick, lease=1, heartbeat_every=0.1, prefetch=0, wait=0.2, handle_signals=False
        )
        await run_until(worker, broker, lambda: _completed(q, 1))
        job = await q.job(job_id)
    assert (job.status, job.attempts, runs) == ("completed", 1, 1)
    assert q.renewed.is_set()


async def test_stop_of_a_worker_that_never_ran_returns(q: Client) -> None:
    worker = Worker(q, lambda job: None, handle_signals=False)
    await asyncio.wait_for(worker.stop(), 5)  # waited for ever


class TimedHeartbeats(Client):
    """Records when each heartbeat was sent, and what lease it asked for."""

    sent: list[float]
    leases: list[float | None]
    six_sent: asyncio.Event

    async def heartbeat(self, job: Job | str, lease: float | None = None) -> float:
        self.sent.append(asyncio.get_running_loop().time())
        self.leases.append(lease)
        if len(self.sent) == 6:
            self.six_sent.set()
        return await super().heartbeat(job, lease)


async def test_without_a_lease_the_brokers_is_used_and_renewed_every_third_of_it(
    start_broker: StartBroker,
) -> None:
    lease = 0.9
    broker = await start_broker(MemStore(), policy=Policy(default_lease=lease))
    async with TimedHeartbeats(broker.url, topic="w") as q:
        q.sent, q.leases, q.six_sent = [], [], asyncio.Event()
        job_id = await q.enqueue("long")
        held: list[float] = []

        async def long(job: Job) -> str:
            assert job.lease_expires_at is not None and job.claimed_at is not None
            held.append(job.lease_expires_at - job.claimed_at)
            await q.six_sent.wait()  # two leases' worth of heartbeats
            return "done"

        worker = Worker(q, long, wait=0.2, handle_signals=False)
        await run_until(worker, broker, lambda: _completed(q, 1))
        job = await q.job(job_id)
    assert held == [pytest.approx(lease)]  # the broker's lease, not one the worker chose
    assert set(q.leases) == {None}  # each heartbeat renews the claim's own lease
    gaps = [b - a for a, b in zip(q.sent, q.sent[1:], strict=False)]
    assert min(gaps) >= lease / 3 * 0.9  # a third of the lease apart (never much faster)
    assert (job.status, job.attempts) == ("completed", 1)  # never reaped


class ErringClock(MemStore):
    """A store whose clock a broker knows only to within 0.3 s, as one on S3
    does after its first answer (Date headers count whole seconds)."""

    def clock_ahead(self, now: float) -> float:
        return 0.3

    def clock_behind(self, now: float) -> float:
        return 0.3


async def test_a_third_of_the_lease_is_counted_from_when_the_lease_counts(
    start_broker: StartBroker,
) -> None:
    """A broker counts a lease from a little after the claim (heartbeat_at: the
    claim's time plus its clock's error), so that no error shortens it: the
    Worker beats every third of the lease, not of the lease and that error."""
    lease = 0.9
    broker = await start_broker(ErringClock(), policy=Policy(default_lease=lease))
    async with Client(broker.url, topic="w") as q:
        await q.enqueue("long")
        job = await q.claim("w1")
        assert job is not None and job.claimed_at is not None and job.heartbeat_at is not None
        assert job.lease_expires_at is not None
        assert job.heartbeat_at - job.claimed_at == pytest.approx(0.3)
        assert job.lease_expires_at - job.heartbeat_at == pytest.approx(lease)
        worker = Worker(q, lambda job: None, handle_signals=False)
        assert worker._heartbeat_interval(job) == pytest.approx(lease / 3)


@pytest.mark.parametrize("expires", [1e300, 1e12])
async def test_a_claims_lease_past_the_apis_longest_is_taken_for_the_longest(
    q: Client, expires: float
) -> None:
    """The Worker took a job's lease from its claim's answer unbounded
    (lease_expires_at less heartbeat_at, any finite span): a garbage 1e300
    (a proxy's, a broken broker's) made it beat once in 1e300/3 s, never,
    and never take the lease for lost (review of the Worker, round 34). No
    lease is longer than the API's MAX_LEASE (12 h): a longer one is taken
    for that."""
    worker = Worker(q, lambda job: None, handle_signals=False)
    job = Job(
        "j", "claimed", attempts=1, claimed_at=1000.0, heartbeat_at=1000.0,
        lease_expires_at=expires, lease_token="t",
    )  # fmt: skip
    assert worker._lease_of(job) == MAX_LEASE
    assert worker._heartbeat_interval(job) == pytest.approx(MAX_LEASE / 3)


async def test_claims_and_heartbeats_answer_the_latest_the_stores_time_may_be(
    start_broker: StartBroker,
) -> None:
    """A claim's and a heartbeat's answers say the broker's `now`, with its
    clock's error added as to a lease's start: what a lease has left when
    the answer came is at least lease_expires_at less it."""
    lease = 0.9
    broker = await start_broker(ErringClock(), policy=Policy(default_lease=lease))
    async with Client(broker.url, topic="w") as q:
        await q.enqueue("long")
        claiming, renewing = LastCall(), LastCall()
        with last_call(claiming):
            [job] = await q.claim_many("w1", 1)
        with last_call(renewing):
            expires = await q.heartbeat(job)
    assert job.lease_expires_at is not None and job.heartbeat_at is not None
    assert claiming.now is not None and renewing.now is not None
    assert 0 <= claiming.now - job.heartbeat_at < 0.2  # not 0.3 less: the error is in both
    assert lease - 0.2 < expires - renewing.now <= lease


# The store write that commits a claim takes this long (a slow S3 PUT, one
# retried after a 503 SlowDown): the broker counts the lease from before it.
SLOW_PUT = 1.2


async def test_a_claim_committed_by_a_slow_write_is_renewed_before_its_lease_ends(
    start_broker: StartBroker,
) -> None:
    """The broker counts a lease from its `now` as it applies the claim, before
    the write that commits it; the Worker counted it from when the answer
    came, its first heartbeat a third of the lease after that. Lease 1.5 s,
    the claim's write 1.2 s: the lease ran out before the first heartbeat,
    and another worker claimed the job 0.3 s after its handler started. The
    answer says the broker's `now`: the lease counts from when it began."""
    lease = 1.5
    faulty = FaultyStore(MemStore())
    broker = await start_broker(faulty)
    async with Client(broker.url, topic="w") as q, Client(broker.url, topic="w") as other:
        await q.settings(lease=lease)
        job_id = await q.enqueue("once")
        started = asyncio.Event()
        release = asyncio.Event()

        async def handler(job: Job) -> None:
            started.set()
            await release.wait()

        worker = Worker(q, handler, concurrency=1, prefetch=0, wait=0.2, handle_signals=False)
        faulty.faults = ["held"]  # the claim's commit: held until `held` is set
        task = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(30):
                await faulty.holding.wait()
            await asyncio.sleep(SLOW_PUT)  # the slow write itself, not synchronisation
            faulty.held.set()
            async with asyncio.timeout(30):
                await started.wait()
            # While the handler runs, nobody else may claim the job.
            stolen = await other.claim("thief", wait=2 * lease)
            assert stolen is None, f"job {job_id} claimed by another worker while its handler ran"
        finally:
            release.set()
            await worker.stop()
            await task


class SlowAnswers(FaultProxy):
    """Passes every request on at once; answers those whose path ends with
    one of `slow`'s keys that many seconds after the broker did (a broker
    whose writes are slow, or a slow network back)."""

    slow: dict[str, float]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        answer = await super().handle(request)
        late = next((s for suffix, s in self.slow.items() if request.path.endswith(suffix)), 0.0)
        if late:
            await asyncio.sleep(late)  # the slow answer itself, not synchronisation
        return answer


async def test_heartbeats_that_land_but_are_answered_slowly_keep_the_job(
    start_broker: StartBroker,
) -> None:
    """Each heartbeat had only until the next was due, and the lease moved
    only when one was answered within that: lease 1.5 s, every heartbeat
    renewing it but answered 0.6 s after it landed, the Worker took the
    lease for lost and cancelled a job of 3 s (max_attempts 1: dead), while
    the broker kept it claimed. Each has until the lease's end now, and
    they overlap."""
    lease = 1.5
    broker = await start_broker(MemStore())
    proxy = SlowAnswers(broker.url)
    proxy.slow = {"/heartbeat": 0.4 * lease}  # past a third of the lease, well within it
    async with proxy.running(), Client(proxy.url, topic="w") as q:
        await q.settings(lease=lease)
        status, runs = await _one_job_longer_than_its_lease(q, lease)
    assert (status, runs) == ("completed", [1])


# --- cancellation -----------------------------------------------------------------------


def job_task(job_id: str) -> asyncio.Task[Any]:
    """The Worker's task running `job_id` (it names them so)."""
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == f"job:{job_id}"]
    return task


async def test_a_job_cancelled_from_outside_is_cancelled_not_taken_for_a_lost_lease(
    q: Client, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = await q.enqueue("held")
    started = asyncio.Event()

    async def hold(job: Job) -> None:
        started.set()
        await asyncio.Event().wait()

    worker = Worker(q, hold, wait=0.2, handle_signals=False)
    run = asyncio.create_task(worker.run())
    with caplog.at_level(logging.INFO, logger="simplequeue.worker"):
        async with asyncio.timeout(30):
            await started.wait()
        task = job_task(job_id)
        task.cancel()
        await asyncio.wait([task])
        await worker.stop()
        await run
    assert task.cancelled()  # the cancellation went through, it was not swallowed
    assert "lost its lease" not in caplog.text
    job = await q.job(job_id)
    assert (job.status, job.attempts) == ("claimed", 1)  # left to its lease


async def test_a_handler_whose_lease_is_lost_is_cancelled_and_the_job_runs_again(
    q: Client, broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = await q.enqueue("taken")
    started = asyncio.Event()
    cancelled: list[int] = []

    async def hold_the_first_attempt(job: Job) -> str:
        if job.attempts == 1:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(job.attempts)
                raise
        return "second time"

    worker = Worker(q, hold_the_first_attempt, heartbeat_every=0.05, wait=0.2, handle_signals=False)
    run = asyncio.create_task(worker.run())
    with caplog.at_level(logging.WARNING, logger="simplequeue.worker"):
        async with asyncio.timeout(30):
            await started.wait()
        await q.nack(job_id)  # someone else gives it back: the next heartbeat finds it lost
        await wait_until(broker, lambda: _completed(q, 1))
        await worker.stop()
        await run
    job = await q.job(job_id)
    assert (job.status, job.result, job.attempts, cancelled) == ("completed", "second time", 2, [1])
    assert f"job {job_id}: lost its lease" in caplog.text


# --- burst and max_jobs -----------------------------------------------------------------


async def test_a_burst_worker_returns_once_the_topic_is_empty(q: Client) -> None:
    await q.enqueue_many(list(range(7)))

    async def nothing(job: Job) -> None:
        return None

    # A long poll would hold the last claim for `wait`; a burst worker does not wait.
    worker = Worker(q, nothing, concurrency=2, wait=30, burst=True, handle_signals=False)
    async with asyncio.timeout(10):
        await worker.run()
    assert worker.processed == 7
    assert (await q.status())["completed"] == 7


async def test_a_burst_worker_on_an_empty_topic_returns_at_once(q: Client) -> None:
    async def never(job: Job) -> None:
        raise AssertionError("no job to run")

    worker = Worker(q, never, wait=30, burst=True, handle_signals=False)
    async with asyncio.timeout(10):
        await worker.run()
    assert (worker.processed, worker.failed) == (0, 0)


async def test_a_burst_worker_runs_again_what_a_running_job_gave_back(q: Client) -> None:
    job_id = await q.enqueue("flaky")

    async def fail_once(job: Job) -> str:
        if job.attempts == 1:
            raise RuntimeError("first try")
        return "second try"

    # With a buffer, a second claim is on its way, and finds nothing, while the
    # first attempt runs; its nack (no delay) puts the job back before the end.
    worker = Worker(
        q, fail_once, concurrency=1, backoff=Backoff(base=0), burst=True, handle_signals=False
    )
    async with asyncio.timeout(10):
        await worker.run()
    job = await q.job(job_id)
    assert (job.status, job.result, job.attempts) == ("completed", "second try", 2)


async def test_max_jobs_stops_after_that_many_jobs_whatever_their_outcome(q: Client) -> None:
    await q.enqueue_many(list(range(6)))

    async def odd_fails(job: Job) -> None:
        if job.payload % 2:
            raise ValueError("odd")

    worker = Worker(
        q, odd_fails, concurrency=2, max_jobs=3, backoff=Backoff(base=60), handle_signals=False
    )
    async with asyncio.timeout(10):
        await worker.run()
    assert worker.processed + worker.failed == 3
    counts = await q.status()
    assert counts["completed"] + counts["delayed"] == 3 and counts["pending"] == 3


# --- Done: acks with follow-up jobs (SPEC 9) --------------------------------------------


async def test_a_handler_returning_done_acks_with_its_follow_ups(q: Client, broker: Any) -> None:
    await q.enqueue({"step": 1}, id="a")

    async def step(job: Job) -> Any:
        n = job.payload["step"]
        if n == 3:
            return "last"  # a plain value: the result, nothing enqueued
        return Done(f"step {n}", enqueue=[{"step": n + 1}])

    worker = Worker(q, step, wait=0.2, handle_signals=False)
    await run_until(worker, broker, lambda: _completed(q, 3))
    assert [await q.result(i, timeout=5) for i in ("a", "a:0", "a:0:0")] == [
        "step 1",
        "step 2",
        "last",
    ]
    assert (await q.status())["enqueued"] == 3


async def test_a_plain_function_may_return_done_with_follow_ups_for_other_topics(
    q: Client, broker: Any
) -> None:
    await q.enqueue("x", id="a")

    def fan_out(job: Job) -> Done:
        specs = [{"payload": n, "topic": "fanned", "id": f"f{n}", "priority": n} for n in range(3)]
        return Done(enqueue=specs)

    worker = Worker(q, fan_out, wait=0.2, handle_signals=False)
    await run_until(worker, broker, lambda: _completed(q, 1))
    async with q.for_topic("fanned") as fanned, asyncio.timeout(10):
        while (await fanned.status())["pending"] < 3:
            await broker.committer.wait_changed("fanned", 1.0)
        job = await fanned.claim("w")
        assert job is not None and (job.id, job.payload) == ("f2", 2)  # highest priority first
    assert (await q.job("a")).result is None


@pytest.mark.parametrize(
    ("follow_up", "error"),
    [
        ({"payload": 1, "topic": "bad.name"}, "follow-up 0"),
        ({"payload": 1, "dealy": 5}, "unknown field `dealy`"),
        (object(), "a follow-up job cannot be sent as JSON"),
    ],
)
async def test_a_done_with_a_follow_up_that_cannot_be_sent_fails_its_job(
    q: Client, broker: Any, follow_up: Any, error: str
) -> None:
    job_id = await q.enqueue("x", max_attempts=1)

    async def bad(job: Job) -> Done:
        return Done("never", enqueue=[follow_up])

    worker = Worker(q, bad, wait=0.2, handle_signals=False)
    await run_until(worker, broker, lambda: _dead(q, 1))
    job = await q.job(job_id)
    assert job.last_error is not None and error in job.last_error
    assert (await q.status())["enqueued"] == 1
    assert (worker.processed, worker.failed) == (0, 1)


@pytest.mark.parametrize("bounded_by", ["broker", "proxy"])
async def test_an_ack_the_broker_refuses_fails_its_job_and_no_other(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture, bounded_by: str
) -> None:
    """An ack too large alone, for the broker's --max-body or for a proxy
    bounding bodies on its own (its 413 page, a BrokerError), fails its job
    saying so: it would be as large, and refused, every time it ran again."""
    async with contextlib.AsyncExitStack() as stack:
        if bounded_by == "broker":
            broker = await start_broker(MemStore(), max_body=64 * 1024)
            url = broker.url
        else:
            broker = await start_broker(MemStore())
            proxy = BoundingProxy(broker.url, 64 * 1024)
            url = (await stack.enter_async_context(proxy.running())).url
        q = await stack.enter_async_context(Client(url, topic="w"))
        await q.enqueue_many(
            [{"payload": {"size": n}, "id": f"j{n}", "max_attempts": 1} for n in (10, 100_000, 20)]
        )

        async def echo(job: Job) -> Done:  # j100000's ack is over the bound
            return Done(job.id, enqueue=[{"payload": "x" * job.payload["size"], "topic": "o"}])

        worker = Worker(q, echo, concurrency=3, wait=0.2, handle_signals=False)
        with caplog.at_level(logging.WARNING, logger="simplequeue.worker"):
            await run_until(worker, broker, lambda: _settled(q, 3))
        assert (await q.job("j10")).status == (await q.job("j20")).status == "completed"
        refused = await q.job("j100000")
        assert refused.status == "dead" and refused.last_error is not None
        assert "the broker refused the ack" in refused.last_error
        assert (worker.processed, worker.failed) == (2, 1)
        assert "job j100000 failed" in caplog.text


async def test_worker_acks_a_proxy_finds_too_large_together_are_halved_not_redelivered(
    start_broker: StartBroker,
) -> None:
    """Acks of up to 512 KB a request through a proxy bounding bodies at
    256 KiB: the proxy's own 413 page (a BrokerError, not the API's
    PayloadTooLarge) was not a refusal the Worker halved, as the SDK's
    coalesced enqueues do, so every ack request failed, its acks dropped
    ("will be redelivered"), and each job ran again once its lease was out,
    though each ack alone fits: after 8 s, 0 of 40 completed."""
    broker = await start_broker(MemStore())
    runs: collections.Counter[str] = collections.Counter()
    proxy = BoundingProxy(broker.url, 256 * 1024)
    async with proxy.running(), Client(proxy.url, topic="w") as q:
        await q.enqueue_many([{"payload": n, "id": f"j{n}"} for n in range(40)])

        async def handler(job: Job) -> str:
            runs[job.id] += 1
            return "x" * 20_000  # 40 of them: 800 KB of acks, each 20 KB

        worker = Worker(q, handler, concurrency=40, lease=2, wait=0.2, handle_signals=False)
        task = asyncio.create_task(worker.run())
        try:
            # Each ack lands in well under a second; redelivered, a job
            # waits its 2 s lease out first.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(8):
                    while (await q.status())["completed"] < 40:
                        await broker.committer.wait_changed("w", 1.0)
            completed = (await q.status())["completed"]
        finally:
            await worker.stop()
            await task
    twice = sorted(job_id for job_id, n in runs.items() if n > 1)
    assert not twice and worker.unacked == 0, (
        f"{completed} of 40 completed, {len(twice)} jobs ran more than once,"
        f" {worker.unacked} acks dropped,"
        f" {proxy.refused['/topics/w/ack']} ack requests refused by the proxy"
    )


async def _settled(q: Client, n: int) -> bool:
    counts = await q.status()
    return counts["completed"] + counts["dead"] >= n


async def test_a_burst_worker_runs_the_follow_ups_of_its_own_acks_before_it_returns(
    q: Client,
) -> None:
    await q.enqueue(0, id="chain")

    async def next_link(job: Job) -> Any:
        return Done(job.payload, enqueue=[job.payload + 1]) if job.payload < 4 else "end"

    # Each ack leaves the next job; a claim that finds the topic empty while
    # the ack is on its way must not end the run.
    worker = Worker(q, next_link, concurrency=1, burst=True, handle_signals=False)
    async with asyncio.timeout(10):
        await worker.run()
    assert worker.processed == 5
    assert (await q.status())["completed"] == 5


class HangingHeartbeat(Client):
    """Its heartbeats hang until cancelled; a nack records how many were still
    in flight when it went out."""

    in_flight = 0
    in_flight_at_nack: list[int]
    beating: asyncio.Event

    async def heartbeat(self, job: Job | str, lease: float | None = None) -> float:
        self.in_flight += 1
        self.beating.set()
        try:
            await asyncio.Event().wait()  # never answered
        finally:
            self.in_flight -= 1
        raise AssertionError("unreachable")

    async def nack(self, job: Job | str, delay: float = 0, error: str | None = None) -> str:
        self.in_flight_at_nack.append(self.in_flight)
        return await super().nack(job, delay, error)


async def test_a_failed_jobs_heartbeats_stop_before_its_nack_goes_out(
    start_broker: StartBroker,
) -> None:
    """A heartbeat still in flight when the nack lands is answered LeaseLost
    (logged as a lost lease, for a job the worker itself gave back): the
    heartbeats are stopped first."""
    broker = await start_broker(MemStore())
    async with HangingHeartbeat(broker.url, topic="w") as q:
        q.in_flight_at_nack, q.beating = [], asyncio.Event()
        await q.enqueue("x")

        async def fails_mid_heartbeat(job: Job) -> None:
            await q.beating.wait()
            raise RuntimeError("boom")

        worker = Worker(
            q, fails_mid_heartbeat, heartbeat_every=0.01, backoff=FAST, handle_signals=False
        )
        await run_until(worker, broker, lambda: _nacked(q))
    assert q.in_flight_at_nack == [0]


async def _nacked(q: HangingHeartbeat) -> bool:
    return bool(q.in_flight_at_nack)


HOLDING_TWO = """
import asyncio, os, signal, sys, threading
from simplequeue.client import Client, Worker

started = threading.Event()  # set by each script's handler

async def holding_two(q, handler):
    # A Worker running the first job of q, the second claimed ahead.
    worker = Worker(q, handler, concurrency=1, prefetch=1, wait=0.2)
    run = asyncio.create_task(worker.run())
    await asyncio.to_thread(started.wait, 10)
    while (await q.status())["claimed"] < 2:  # the second job claimed ahead
        await asyncio.sleep(0.02)
    return worker, run
"""


SECOND_SIGNAL = (
    HOLDING_TWO
    + """
async def main(url):
    async def handler(job):
        started.set()
        await asyncio.Event().wait()  # a job that will not end by itself

    async with Client(url, topic="w") as q:
        worker, run = await holding_two(q, handler)
        os.kill(os.getpid(), signal.SIGTERM)  # drains: it would wait for ever
        await asyncio.sleep(0.2)
        assert not run.done()
        os.kill(os.getpid(), signal.SIGTERM)  # stops now
        await asyncio.wait_for(run, 10)
    print("ok")

asyncio.run(main(sys.argv[1]))
"""
)


async def test_a_second_signal_stops_the_drain_and_gives_the_jobs_back(
    q: Client, broker: Any
) -> None:
    """A second Ctrl-C (or SIGTERM) while the Worker drains did nothing: a job
    that would not end kept the process up, and only SIGKILL stopped it, its
    jobs left to their leases. Now the second signal stops it at once: the job
    claimed ahead is given back unrun (its attempt uncounted), the running one
    interrupted and given back at once, its attempt spent."""
    running, ahead = await q.enqueue_many(["runs", "waits"])
    code, out, err = await run_script(SECOND_SIGNAL, broker.url)
    assert (code, out.strip()) == (0, "ok"), err[-2000:]
    assert "second signal: stopping now" in err
    interrupted, unrun = await q.job(running), await q.job(ahead)
    assert (interrupted.status, interrupted.attempts) == ("pending", 1)
    assert "Interrupted: the worker was stopped" in (interrupted.last_error or "")
    assert (unrun.status, unrun.attempts, unrun.last_error) == ("pending", 0, None)
    assert (await q.status())["claimed"] == 0


@pytest.mark.parametrize("limit", [{"rate": 4.0, "burst": 1}, {"max_claimed": 1}])
async def test_a_burst_worker_on_a_limited_topic_drains_it(
    q: Client, limit: dict[str, Any]
) -> None:
    """A claim held back by the topic's rate or max_claimed is answered as an
    empty topic's is (404): a burst Worker stopped after the first job, the
    others left pending (review finding). Jobs pending tell it apart now: it
    claims again in long polls, which wait for a token or a slot."""
    await q.enqueue_many(list(range(4)))
    await q.settings(**limit)

    async def nothing(job: Job) -> None:
        return None

    worker = Worker(q, nothing, concurrency=2, burst=True, handle_signals=False)
    async with asyncio.timeout(20):
        await worker.run()
    status = await q.status()
    assert (status["pending"], status["completed"]) == (0, 4)


@pytest.mark.parametrize("prefetch", [None, 4])
async def test_a_worker_on_a_topic_with_max_claimed_claims_only_for_free_slots(
    q: Client, prefetch: int | None
) -> None:
    """max_claimed counts the jobs claimed, across every worker: a job held
    ahead in a Worker's buffer takes a place without running. With
    max_claimed=2 and two Workers of concurrency 1, the first claimed both
    jobs in one claim (its buffer is twice its concurrency at least), ran one
    and held the other, and the second Worker sat idle while the first job
    ran, however long (review finding). On a topic with max_claimed (or a
    rate) a Worker claims only for its free slots, whatever its `prefetch`."""
    await q.settings(max_claimed=2)
    await q.enqueue_many(["long", "short"])
    release = asyncio.Event()
    started: list[tuple[str, str]] = []

    def handler_of(name: str) -> Callable[[Job], Awaitable[None]]:
        async def handler(job: Job) -> None:
            started.append((name, job.payload))
            if job.payload == "long":
                await release.wait()

        return handler

    def worker(name: str) -> Worker:
        return Worker(
            q, handler_of(name), concurrency=1, prefetch=prefetch, wait=0.2, handle_signals=False
        )

    first, second = worker("first"), worker("second")
    running = [asyncio.create_task(first.run())]
    try:
        # Its first claim is answered before its job starts: what it held
        # ahead, it holds now.
        await until(lambda: started == [("first", "long")])
        running.append(asyncio.create_task(second.run()))
        await until(lambda: ("second", "short") in started)
        assert first.buffer_size == 0
    finally:
        release.set()
        await asyncio.gather(first.stop(), second.stop())
        await asyncio.gather(*running)
    assert first.processed + second.processed == 2


async def test_a_worker_on_a_topic_with_a_rate_holds_no_job_it_cannot_start(q: Client) -> None:
    """The rate counts claims, and a Worker that claims ahead starts its jobs
    faster than it: rate=2/s, burst=1, a Worker of concurrency 1 whose first
    job ran 2 s claimed two more meanwhile (its buffer) and started them back
    to back as it ended: 3 starts within a quarter of a second, where the
    topic allows 1.5 (review finding). It claims only for its free slots now:
    while its one job runs it holds no other. At rate=20/s the half second
    looked at grants 10 tokens, and a Worker claiming ahead holds 3 jobs
    within its first tenth (that window only gives the fault time to show:
    with the fix no wait, however long, would see a second job claimed)."""
    await q.settings(rate=20.0, burst=1)
    await q.enqueue_many(list(range(5)))
    release = asyncio.Event()
    started: list[int] = []

    async def handler(job: Job) -> None:
        started.append(job.payload)
        if job.payload == 0:
            await release.wait()

    worker = Worker(q, handler, concurrency=1, wait=0.2, burst=True, handle_signals=False)
    running = asyncio.create_task(worker.run())
    try:
        await until(lambda: started == [0])
        await asyncio.sleep(0.5)  # not a synchronisation: time for 10 tokens (above)
        assert (await q.status())["claimed"] == 1
    finally:
        release.set()
        async with asyncio.timeout(30):
            await running
    assert sorted(started) == list(range(5)) and worker.processed == 5


async def test_a_worker_follows_limits_set_and_removed_while_it_runs(
    q: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Worker reads the topic's settings as it starts and again every
    SETTINGS_EVERY seconds (10; a tenth of a second here): limits set while
    it runs stop its claiming ahead within that lag, and once they are
    removed it claims ahead again."""
    monkeypatch.setattr(worker_module, "SETTINGS_EVERY", 0.1)
    worker = Worker(q, lambda job: None, concurrency=2, wait=0.2, handle_signals=False)
    running = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.buffer_size == 4)
        await q.settings(rate=100.0)
        await until(lambda: worker.buffer_size == 0)
        await q.settings(rate=None)
        await until(lambda: worker.buffer_size == 4)
    finally:
        await worker.stop()
        await running


async def test_a_worker_on_a_trickle_reads_the_topics_settings_every_10_s_not_per_job(
    q: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every claim answered short with some jobs made the Worker read the
    topic's settings again (a second after the last read at the soonest):
    a Worker keeping up with a trickle has every long poll answered with 1 of
    the 2 it asks, so it read them once a job, up to once a second, ten times
    the 10 s promised (a job every 1.1 s for 6.6 s: 6 reads). Here the old
    pause is cut to 0.05 s: 16 jobs 0.15 s apart (the trickle's pace), one
    read."""
    monkeypatch.setattr(worker_module, "SETTINGS_AFTER_SHORT", 0.05, raising=False)
    reads = 0
    settings = q.settings

    async def counted(**limits: Any) -> dict[str, Any]:
        nonlocal reads
        reads += not limits
        return await settings(**limits)

    monkeypatch.setattr(q, "settings", counted)
    done: list[int] = []
    worker = Worker(
        q, lambda job: done.append(job.payload), concurrency=1, wait=5.0, handle_signals=False
    )
    running = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.limited is False)
        for i in range(16):
            await q.enqueue(i)
            await until(lambda i=i: len(done) == i + 1)
            await asyncio.sleep(0.15)  # the trickle's pace, not a wait for anything
    finally:
        await worker.stop()
        await running
    assert reads <= 2, f"{reads} settings reads for 16 jobs in 2.4 s"


async def test_a_worker_whose_settings_reads_keep_failing_backs_off_and_warns_once(
    q: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker answering /settings with errors for an hour (a proxy's 500)
    while claims work cost a request and a warning every second per Worker:
    3,600 warnings an hour. The pause doubles up to SETTINGS_EVERY, and the
    first failure of a run is the only warning."""
    monkeypatch.setattr(worker_module, "SETTINGS_RETRY", 0.01)
    monkeypatch.setattr(worker_module, "SETTINGS_EVERY", 0.08)
    reads: list[float] = []

    async def failing(**limits: Any) -> dict[str, Any]:
        reads.append(asyncio.get_running_loop().time())
        raise BrokerUnavailable("a proxy's 500")

    monkeypatch.setattr(q, "settings", failing)
    worker = Worker(q, lambda job: None, concurrency=1, wait=0.2, handle_signals=False)
    with caplog.at_level(logging.DEBUG, logger="simplequeue.worker"):
        running = asyncio.create_task(worker.run())
        try:
            await until(lambda: len(reads) >= 7)
        finally:
            await worker.stop()
            await running
    # The pauses: 0.01, 0.02, 0.04, then 0.08 each; at least their sum.
    assert reads[6] - reads[0] >= 0.01 + 0.02 + 0.04 + 0.08 * 3 - 0.005, reads
    said = [r for r in caplog.records if "settings could not be read" in r.getMessage()]
    assert [r.levelno for r in said][:1] == [logging.WARNING], said
    assert all(r.levelno == logging.DEBUG for r in said[1:]), said
    assert worker.limited is None  # nothing read: no buffer


async def test_a_burst_worker_on_a_paused_topic_stops(q: Client) -> None:
    """Paused (max_claimed 0), a topic's jobs are pending and none may be
    claimed: a burst Worker stops rather than wait for ever."""
    await q.enqueue_many(list(range(2)))
    await q.settings(max_claimed=0)
    worker = Worker(q, lambda job: None, burst=True, wait=0.2, handle_signals=False)
    async with asyncio.timeout(10):
        await worker.run()
    assert worker.processed == 0 and (await q.status())["pending"] == 2


async def test_a_burst_worker_with_wait_0_does_not_spin_on_a_rate_limited_topic(
    q: Client,
) -> None:
    """A burst Worker held back by the topic's rate claimed again in long polls
    of its `wait`: with wait=0 it asked status, settings and a claim again
    without a pause until the next token, hundreds of times a second (review
    finding). Its long polls there last a second at least."""
    await q.enqueue_many([1, 2])
    await q.settings(rate=0.5, burst=1)  # the second job 2 s after the first
    asked = 0
    status = q.status

    async def counted() -> dict[str, int]:
        nonlocal asked
        asked += 1
        return await status()

    q.status = counted  # type: ignore[method-assign]
    worker = Worker(q, lambda job: None, burst=True, wait=0, handle_signals=False)
    async with asyncio.timeout(20):
        await worker.run()
    assert worker.processed == 2
    assert asked < 20, f"{asked} status requests while waiting ~2 s for one token"


async def test_a_burst_worker_under_a_rate_claims_in_long_polls_not_status_reads(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst Worker's claims do not long-poll: under a rate, each claim after
    the one that took the token found nothing and went to _held_back(), which
    read the status and the settings, then long-polled for the next token,
    answered with one job; the next claim found nothing again. Draining 60
    jobs at 30 a second took 63 status and 61 settings reads (each then a
    GET of the head) and 3.1 s (review of limits). Once a held-back claim
    got jobs, the claims long-poll for the next token themselves, and the
    status is read again only when one finds nothing: here 30 jobs, 7 reads
    of the status and settings, not 64."""
    calls = {"status": 0, "settings": 0}
    for name in calls:
        real = getattr(Client, name)

        def counted(self: Client, _real: Any = real, _name: str = name, **limits: Any) -> Any:
            calls[_name] += 1
            return _real(self, **limits)

        monkeypatch.setattr(Client, name, counted)
    store = HeadReads()
    broker = await start_broker(store)
    async with Client(broker.url, topic="t") as q:
        await q.enqueue_many(list(range(30)))
        await q.settings(rate=30.0, burst=1)
        done: list[int] = []
        before, started = store.reads, asyncio.get_running_loop().time()
        calls.update(status=0, settings=0)
        worker = Worker(
            q, lambda job: done.append(job.payload), concurrency=4, burst=True, handle_signals=False
        )
        async with asyncio.timeout(20):
            await worker.run()
        reads, took = store.reads - before, asyncio.get_running_loop().time() - started
    assert sorted(done) == list(range(30))
    said = f"{calls} and {reads} reads of the head for 30 jobs in {took:.1f} s"
    assert calls["status"] + calls["settings"] <= 10, said
    assert reads <= took + 5, said


SECOND_SIGNAL_THREAD = (
    HOLDING_TWO
    + """
release = threading.Event()

def handler(job):  # a plain def: it runs in a thread
    started.set()
    release.wait(30)
    return "done"

async def main(url, running_id):
    async with Client(url, topic="w") as q:
        worker, run = await holding_two(q, handler)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        while (await q.status())["claimed"] > 1:  # the one ahead is given back
            await asyncio.sleep(0.02)
        print((await q.job(running_id)).status)  # not given back: it still runs
        release.set()
        await asyncio.wait_for(run, 10)
    print("ok")

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
)


async def test_a_second_signal_waits_for_handlers_in_threads(q: Client, broker: Any) -> None:
    """A plain function's handler runs in a thread, which cancelling cannot
    stop: the second signal gave its job back (pending again, another worker
    free to run it) while it still ran here (review finding). It waits for such
    handlers, their jobs settled as they end; the jobs claimed ahead go back."""
    running, ahead = await q.enqueue_many(["runs", "waits"])
    code, out, err = await run_script(SECOND_SIGNAL_THREAD, broker.url, running)
    assert (code, out.split()) == (0, ["claimed", "ok"]), err[-2000:]
    assert "cannot be interrupted: waiting for them" in err
    assert (await q.job(running)).status == "completed"
    unrun = await q.job(ahead)
    assert (unrun.status, unrun.attempts) == ("pending", 0)


FIRST_SIGNAL = (
    HOLDING_TWO
    + """
async def main(url, ahead_id, cancel_ahead):
    release = asyncio.Event()

    async def handler(job):
        started.set()
        await release.wait()
        return "done"

    async with Client(url, topic="w") as q:
        worker, run = await holding_two(q, handler)
        if cancel_ahead:
            await q.cancel([ahead_id])  # no longer ours to give back
        os.kill(os.getpid(), signal.SIGTERM)
        while (await q.job(ahead_id)).status not in ("pending", "cancelled"):  # not run here
            await asyncio.sleep(0.02)
        release.set()  # the running one finishes
        await asyncio.wait_for(run, 10)  # after the release was answered
        print(worker.processed, worker.given_back)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:] == ["cancel-ahead"]))
"""
)


async def test_a_signal_gives_back_the_jobs_claimed_ahead_and_finishes_the_running(
    q: Client, broker: Any
) -> None:
    """On SIGTERM a Worker ran every job it had claimed ahead (up to 64 times
    its concurrency) before it returned: with long jobs, some 3 jobs' length,
    past a shutdown's grace period (review finding). They are given back now,
    pending at once for another worker, the attempt uncounted, as Celery's
    warm shutdown gives its prefetched messages back; the running ones finish."""
    running, ahead = await q.enqueue_many(["runs", "waits"])
    code, out, err = await run_script(FIRST_SIGNAL, broker.url, ahead)
    assert (code, out.split()) == (0, ["1", "1"]), err[-2000:]
    assert (await q.job(running)).status == "completed"
    unrun = await q.job(ahead)
    assert (unrun.status, unrun.attempts) == ("pending", 0)


HANDLER_EXITS = """
import asyncio, sys, time
from simplequeue.client import Client, SyncClient, Worker

url, kind = sys.argv[1:]
look = SyncClient(url, topic="w")

def full():  # the worker holds its buffer: j0 running, 4 claimed ahead
    while look.status()["claimed"] < 5:
        time.sleep(0.01)

def exits(job):  # what a script's function may do
    if job.id == "j0":
        full()
        sys.exit(3)
    return job.payload

async def interrupted(job):
    if job.id == "j0":
        await asyncio.to_thread(full)
        raise KeyboardInterrupt
    return job.payload

async def main():
    async with Client(url, topic="w") as q:
        handler = exits if kind == "exit" else interrupted
        await Worker(q, handler, concurrency=1, prefetch=4, wait=0.2).run()

asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("kind", "raised", "status"),
    [("exit", "SystemExit", 3), ("interrupt", "KeyboardInterrupt", -signal.SIGINT)],
)
async def test_a_handler_that_raises_system_exit_fails_its_job_and_leaves_none_claimed(
    q: Client, broker: Any, kind: str, raised: str, status: int
) -> None:
    """README: "a handler that raises nacks its job". A plain def calling
    sys.exit() (or a coroutine raising KeyboardInterrupt) escaped the Worker
    and its event loop: the process ended with its job neither nacked nor
    acked and the 4 jobs claimed ahead held too, all left to their leases,
    the attempts spent (review of the SDK, round 28: of 24 jobs run, 19
    acked). Its job fails with what it raised, the Worker stops as on a
    signal (the jobs ahead given back) and run() raises it: sys.exit(3)
    still exits 3, Ctrl-C as Ctrl-C does."""
    await q.enqueue_many([{"payload": n, "id": f"j{n}"} for n in range(10)])
    code, _, err = await run_script(HANDLER_EXITS, broker.url, kind)
    assert code == status, err[-2000:]
    first = await q.job("j0")
    assert first.status in ("pending", "delayed"), (first.status, err[-2000:])
    assert raised in (first.last_error or "")
    counts = await q.status()
    assert (counts["claimed"], counts["pending"] + counts["delayed"]) == (0, 10), counts


@pytest.mark.parametrize("plain", [False, True])
async def test_a_handler_that_raises_generator_exit_fails_its_job_and_the_worker_goes_on(
    q: Client, caplog: pytest.LogCaptureFixture, plain: bool
) -> None:
    """A handler's GeneratorExit (a generator's, leaked) was raised on by the
    Worker, neither nacked nor logged: its job waited out its lease, the
    attempt spent (review of the Worker, round 34). It is no request of the
    process's, as SystemExit is: the job fails as a RuntimeError raised from
    it, logged, and the Worker runs the next job."""
    bad, good = await q.enqueue_many(
        [{"payload": "bad", "max_attempts": 1}, {"payload": "good", "priority": -1}]
    )

    async def coroutine(job: Job) -> str:
        if job.payload == "bad":
            raise GeneratorExit
        return "ok"

    def function(job: Job) -> str:
        if job.payload == "bad":
            raise GeneratorExit
        return "ok"

    handler = function if plain else coroutine
    worker = Worker(q, handler, concurrency=1, wait=0.2, backoff=FAST, handle_signals=False)

    async def settled() -> bool:
        counts = await q.status()
        return counts["dead"] + counts["completed"] >= 2

    with caplog.at_level(logging.WARNING, logger="simplequeue.worker"):
        await run_bounded(worker, settled, within=5.0)
    failed = await q.job(bad)
    assert failed.status == "dead"
    assert failed.last_error == "RuntimeError: the handler raised GeneratorExit", failed.last_error
    assert failures_logged(caplog, bad)
    assert (await q.job(good)).status == "completed"
    assert (worker.failed, worker.processed) == (1, 1)


async def test_given_back_counts_only_the_jobs_the_broker_released(q: Client, broker: Any) -> None:
    """Worker.given_back (and `work`'s summary) counted every job it asked to
    release, though the broker leaves one no longer held (cancelled, its
    lease expired and taken by another worker) as it is. Client.release
    answers how many were released, and given_back adds that."""
    _, ahead = await q.enqueue_many(["runs", "waits"])
    code, out, err = await run_script(FIRST_SIGNAL, broker.url, ahead, "cancel-ahead")
    assert (code, out.split()) == (0, ["1", "0"]), err[-2000:]
    assert (await q.job(ahead)).status == "cancelled"


async def test_release_answers_how_many_it_released(q: Client) -> None:
    await q.enqueue_many(["a", "b"])
    held = await q.claim_many("w1", 2)
    await q.cancel([held[0].id])
    assert await q.release(held) == 1
    assert (await q.job(held[1].id)).status == "pending"


async def test_a_burst_worker_leaves_delayed_jobs_for_a_later_run(q: Client) -> None:
    """A burst Worker that waited for delayed jobs (a try of this round, after
    a newcomer's review) kept a cron or CI drain up for as long as one was
    delayed: an hour for a job enqueued with delay=3600, for ever for a job
    that always fails with unlimited attempts (review of that try). It leaves
    them for a later run, as RQ's burst mode leaves scheduled jobs."""
    await q.enqueue("later", id="later", delay=3600)
    await q.enqueue("poison", id="poison", max_attempts=0)  # unlimited attempts
    await q.enqueue("now", id="now")
    ran: list[str] = []

    async def handler(job: Job) -> str:
        ran.append(job.id)
        if job.id == "poison":
            raise RuntimeError("it always fails")
        return "ok"

    backoff = Backoff(base=1.0, cap=1.0)  # its retry half a second away at least
    worker = Worker(q, handler, burst=True, wait=0.2, backoff=backoff, handle_signals=False)
    async with asyncio.timeout(10):
        await worker.run()
    assert sorted(ran) == ["now", "poison"]
    counts = await q.status()
    assert (counts["delayed"], counts["completed"]) == (2, 1), counts


async def test_jobs_claimed_ahead_and_answered_after_the_first_signal_go_back(
    q: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first signal gave back the jobs in the buffer, but a claim answered
    out of order (its earlier sibling slow) waited behind that sibling's
    answer; cancelled by the signal, the sibling let them into the buffer
    after it was emptied, and the draining worker ran them (review finding).
    Jobs a claim brings after a signal go back too. (They wait ORDER_GRACE
    at most since round 25: made long here, for the signal to come meanwhile.)"""
    monkeypatch.setattr(worker_module, "ORDER_GRACE", 60.0)
    await q.enqueue_many([{"payload": i, "id": f"j{i}"} for i in range(4)])
    real = q.claim_many
    calls = 0

    async def claim_many(
        worker_id: str, count: int, lease: Any = None, wait: float = 0, **named: Any
    ) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # the first claim is slow: its answer has not come yet
            await asyncio.Event().wait()
        return await real(worker_id, count, lease=lease, wait=wait)

    q.claim_many = claim_many  # type: ignore[method-assign]
    ran: list[str] = []

    async def handler(job: Job) -> str:
        ran.append(job.id)
        return "ok"

    worker = Worker(q, handler, concurrency=1, prefetch=4, wait=0.2, handle_signals=False)
    task = asyncio.create_task(worker.run())
    await until(lambda: any(jobs for _, jobs, _ in worker._answers.values()))  # parked behind
    worker._on_signal()  # as SIGTERM does
    await asyncio.wait_for(task, 10)
    q.claim_many = real  # type: ignore[method-assign]
    assert ran == []
    for i in range(4):
        job = await q.job(f"j{i}")
        assert (job.status, job.attempts) == ("pending", 0), job


# --- review of the SDK, round 22 ---------------------------------------------------------


async def test_a_second_signal_waits_for_a_plain_def_task_in_its_thread(
    q: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain-def task runs in a thread too, but the Worker saw an async
    handler (Tasks.__call__): a second signal cancelled the await and gave
    the job back while its thread ran on, to run twice at once (review)."""
    tasks = Tasks()
    started, release = threading.Event(), threading.Event()

    @tasks.task
    def slow(n: int) -> str:
        started.set()
        release.wait(20)
        return "done"

    job_id = await slow.enqueue(q, 1)
    worker = Worker(q, tasks, concurrency=1, prefetch=0, handle_signals=False)
    run = asyncio.create_task(worker.run())
    try:
        assert await asyncio.to_thread(started.wait, 10)
        with caplog.at_level(logging.WARNING, logger="simplequeue.worker"):
            worker._on_signal()  # as SIGTERM does
            worker._on_signal()  # and a second
            await until(lambda: "cannot be interrupted" in caplog.text)
        assert (await q.job(job_id)).status == "claimed"
    finally:
        release.set()
        await asyncio.wait_for(run, 15)
    assert (await q.job(job_id)).status == "completed"
    assert (worker.processed, worker.given_back) == (1, 0)


async def test_stop_gives_back_a_claim_whose_answer_was_on_its_way(broker: Any) -> None:
    """stop() cancels the claims in flight; the broker gives back one it had
    not answered, but one it had (the answer on the wire) stayed claimed by
    nobody until its lease ran out, the attempt spent: with max_attempts=1,
    dead without running (review). Asked again under its attempt id, the
    broker answers its jobs, and they go back."""
    proxy = FaultProxy(broker.url)
    proxy.fail("/claim", "landed-held")
    async with proxy.running(), Client(proxy.url, topic="w") as through:

        async def handler(job: Job) -> None:
            raise AssertionError("no job reaches the handler")

        worker = Worker(through, handler, concurrency=1, prefetch=0, handle_signals=False)
        run = asyncio.create_task(worker.run())
        await until(lambda: broker.committer.waiting("w") == 1)  # it long-polls the topic
        async with Client(broker.url, topic="w") as direct:
            job_id = await direct.enqueue("x", max_attempts=1)
            await asyncio.wait_for(proxy.held.wait(), 10)  # the broker answered it the job
            await worker.stop()
            await asyncio.wait_for(run, 10)
            job = await direct.job(job_id)
    assert (job.status, job.attempts) == ("pending", 0), job
    assert worker.given_back == 1


async def test_processed_counts_the_jobs_whose_ack_landed(start_broker: StartBroker) -> None:
    """A job whose ack failed (the broker gone) was counted processed, as
    README's tour prints it: "jobs done" (review). It is counted unacked."""
    broker = await start_broker(MemStore())
    gate = asyncio.Event()
    async with Client(broker.url, topic="p", retries=1, timeout=2) as q:
        await q.enqueue("x")

        async def handler(job: Job) -> str:
            await gate.wait()
            return "ok"

        worker = Worker(q, handler, max_jobs=1, concurrency=1, prefetch=0, handle_signals=False)
        run = asyncio.create_task(worker.run())
        await until(lambda: bool(worker._running))
        await broker.stop()
        gate.set()
        await asyncio.wait_for(run, 30)
    assert (worker.processed, worker.unacked, worker.failed) == (0, 1, 0)


async def test_a_worker_runs_again_after_it_returned(q: Client) -> None:
    """run() left the worker stopped: a second run() (a burst worker run now
    and then) returned at once, doing nothing (review)."""
    done: list[Any] = []

    async def handler(job: Job) -> None:
        done.append(job.payload)

    worker = Worker(q, handler, burst=True, max_jobs=1, handle_signals=False)
    await q.enqueue_many([1, 2])
    await asyncio.wait_for(worker.run(), 10)
    await asyncio.wait_for(worker.run(), 10)  # max_jobs counts per run
    assert (done, worker.processed) == ([1, 2], 2)


async def test_a_handler_raising_a_cancelled_error_of_its_own_fails_its_job(
    q: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """A CancelledError of the handler's own (of a task it awaited) left the
    job claimed until its lease ran out, nothing nacked nor logged (review)."""
    job_id = await q.enqueue(1)

    async def handler(job: Job) -> None:
        inner = asyncio.ensure_future(asyncio.sleep(10))
        inner.cancel()
        await inner  # its CancelledError, not the worker's

    worker = Worker(q, handler, max_jobs=1, backoff=FAST, handle_signals=False)
    with caplog.at_level(logging.ERROR, logger="simplequeue.worker"):
        await asyncio.wait_for(worker.run(), 10)
    job = await q.job(job_id)
    assert worker.failed == 1 and job.status in ("pending", "delayed"), job
    assert "HandlerCancelled" in (job.last_error or "")
    assert "failed on attempt 1" in caplog.text


async def test_stop_returns_promptly_when_the_broker_does_not_answer() -> None:
    """An idle worker whose broker hangs (it accepts and never answers: a
    stuck proxy, a partition): asking again under its attempt id for what
    the claim the stop cut short was answered took the client's whole retry
    budget, and stop() waited for it (review of this round's diff)."""
    conns: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)
        await reader.read(1 << 20)  # reads the request, never answers

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with Client(f"http://127.0.0.1:{port}", topic="w") as q:

            async def handler(job: Job) -> None:
                raise AssertionError("no job reaches the handler")

            worker = Worker(q, handler, handle_signals=False)
            run = asyncio.create_task(worker.run())
            await until(lambda: bool(conns))  # its claim waits for an answer
            try:
                await asyncio.wait_for(worker.stop(), TAKE_BACK_WITHIN + 3)
            finally:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
    finally:
        for writer in conns:
            writer.close()
        server.close()


async def _end(worker: Worker, task: asyncio.Task[None], cancelled: asyncio.Event) -> None:
    """Stop the worker; one whose handler was never cancelled would wait for
    it for ever: its run() is cancelled twice (the claim loop, then the drain)."""
    if cancelled.is_set():
        await worker.stop()
    else:
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.1)
    await asyncio.gather(task, return_exceptions=True)


async def test_a_plain_function_handing_back_a_coroutine_is_cancelled_at_its_timeout(
    broker: Any,
) -> None:
    """A plain function may hand back an awaitable (a lambda around an async
    def), which runs here: past its timeout it is cancelled, as a coroutine
    handler is. It was taken for a handler in a thread and waited for, its
    slot and its job's lease held for ever (round 23's review of its own
    Worker changes)."""
    async with Client(broker.url, topic="w") as q:
        job_id = await q.enqueue("stuck", max_attempts=1)
        cancelled = asyncio.Event()

        async def stuck(job: Job) -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        worker = Worker(
            q, lambda job: stuck(job), timeout=0.2, backoff=FAST, wait=0.2, handle_signals=False
        )
        task = asyncio.create_task(worker.run())
        try:
            await asyncio.wait_for(cancelled.wait(), 3)
            async with asyncio.timeout(3):
                while not await _dead(q, 1):
                    await broker.committer.wait_changed("w", 1.0)
        finally:
            await _end(worker, task, cancelled)
        [job] = await q.dead()
        assert job.id == job_id and "timed out" in (job.last_error or "")


async def test_a_plain_def_task_handing_back_a_coroutine_is_cancelled_at_its_timeout(
    broker: Any,
) -> None:
    """The same through Tasks: a task registered as a plain function that
    returns a coroutine is cancelled past its timeout, as a coroutine task is."""
    tasks = Tasks()
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    @tasks.task
    def stuck() -> Any:
        return forever()

    async with Client(broker.url, topic="w") as q:
        await stuck.enqueue(q)
        worker = Worker(q, tasks, timeout=0.2, wait=0.2, handle_signals=False)
        task = asyncio.create_task(worker.run())
        try:
            await asyncio.wait_for(cancelled.wait(), 3)
        finally:
            await _end(worker, task, cancelled)


async def test_a_second_signal_cancels_coroutine_handlers_while_a_thread_runs(q: Client) -> None:
    """A second signal cancels the coroutine handlers at once, and waits for
    those in threads: it waited for every thread before it cancelled anything,
    a coroutine handler beside a long thread running on, its job held (round
    23's review of its own Worker changes)."""
    tasks = Tasks()
    started, release = threading.Event(), threading.Event()
    waiting, cancelled = asyncio.Event(), asyncio.Event()

    @tasks.task
    def slow() -> str:
        started.set()
        release.wait(20)
        return "done"

    @tasks.task
    async def forever() -> None:
        waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    await slow.enqueue(q)
    forever_id = await forever.enqueue(q)
    worker = Worker(q, tasks, concurrency=2, prefetch=0, handle_signals=False)
    run = asyncio.create_task(worker.run())
    try:
        assert await asyncio.to_thread(started.wait, 10)
        await asyncio.wait_for(waiting.wait(), 10)
        worker._on_signal()  # as SIGTERM does
        worker._on_signal()  # and a second: stop now
        try:
            await asyncio.wait_for(cancelled.wait(), 2)
        except TimeoutError:
            pytest.fail("the coroutine handler was not cancelled by the second signal")
        job = await q.job(forever_id)
        assert job.status == "pending", job
    finally:
        release.set()
        await asyncio.wait_for(run, 15)


async def test_jobs_started_by_a_handlers_stop_do_not_inherit_its_calls_within_bound(
    start_broker: StartBroker,
) -> None:
    """A handler awaiting worker.stop() lends its slot: the jobs claimed ahead
    started in its own context, and each one's end started the next in it
    too. A handler that bounds its calls (calls_within, as README says) and
    stops within the block passed its deadline on to those jobs: once it was
    out, their acks failed at once ("no time left for the request"), and a
    job that ran to its end was not acked, to run again when its lease ran
    out (review finding). Jobs start from run()'s context."""
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="t") as direct, Client(broker.url, topic="t") as q:
        await direct.settings(lease=0.6)
        first = await direct.enqueue("stops")
        second = await direct.enqueue("runs after")
        ran: list[str] = []

        async def handler(job: Job) -> None:
            if job.id == first:
                await until(lambda: len(worker._ready) == 1)  # the next job is claimed
                with contextlib.suppress(TimeoutError):  # it gave up waiting: its job is done
                    async with calls_within(0.3):  # its own calls bounded
                        await worker.stop()
                return
            await asyncio.sleep(1.5)  # heartbeats are due every 0.2 s
            ran.append(job.id)

        worker = Worker(q, handler, concurrency=1, prefetch=1, wait=0, handle_signals=False)
        await asyncio.wait_for(worker.run(), 15)
        assert ran == [second], "a healthy job was cancelled as lost"
        assert (await direct.job(second)).status == "completed"


# --- review of round 25's latest changes --------------------------------------------


def _stop_before_first_claim_starts(worker: Worker) -> Callable[[], None]:
    """A stop (a signal's handler, another task's request_stop()) that lands
    in the loop's ready queue after the claim loop created a claim's task and
    before that task's first step: the task is cancelled before it started,
    so its body (and its `finally`, which records the claim's answer and
    gives back its count) never runs. Returns the undo."""
    loop = asyncio.get_running_loop()
    before = loop.get_task_factory()
    fired: list[bool] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        if not fired and getattr(coro, "__qualname__", "") == "Worker._claim":
            fired.append(True)
            loop.call_soon(worker.request_stop)  # ahead of the new task's first step
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(factory)
    return lambda: loop.set_task_factory(before)


async def test_a_claim_stopped_before_it_started_does_not_stall_the_next_run(q: Client) -> None:
    """Worker._claim records its answer (and _asked's count back) in a
    `finally`; a claim task cancelled by request_stop() before its first step
    never enters its body: _answers never gets its sequence number, so
    _delivered stays behind it for good and _asked keeps its count. The next
    run() (a Worker may be run again) then asks for nothing (room 0 with
    prefetch=0): a burst run never returns, though jobs are pending (review of
    round 25's latest changes: before ORDER_GRACE every later answer waited
    behind it for ever; with it, each came ORDER_GRACE late). A claim's end
    is now recorded when its task ends, started or not."""
    worker = Worker(
        q, lambda job: None, concurrency=2, prefetch=0, burst=True, handle_signals=False
    )
    undo = _stop_before_first_claim_starts(worker)
    try:
        await asyncio.wait_for(worker.run(), 10)  # stopped before its claim started
    finally:
        undo()
    await q.enqueue_many(["a", "b", "c"])
    try:
        await asyncio.wait_for(worker.run(), 10)
    except TimeoutError:
        pytest.fail(
            f"a burst run() with 3 jobs pending never returned: _asked={worker._asked}, "
            f"_delivered={worker._delivered}, _sent={worker._sent}"
        )
    assert worker.processed == 3


async def test_a_claim_stopped_before_it_started_does_not_idle_the_next_run_for_good(
    q: Client,
) -> None:
    """The same stop, then a second run (not burst, with a buffer): the two
    claims the first run's loop had created in one step were both cut before
    they started, _asked kept their counts (the whole capacity), and the
    second run never claims: jobs enqueued stay pending for ever while the
    worker sits idle. Were only one cut, its seq would hold _delivered back
    for good: every later answer delivered only by ORDER_GRACE's timer, its
    number kept in _ahead for good (the assertion at the end). Review of
    round 25's latest changes."""
    done = asyncio.Event()
    seen: list[Any] = []

    async def handler(job: Job) -> None:
        seen.append(job.payload)
        if len(seen) == 20:
            done.set()

    worker = Worker(q, handler, concurrency=1, prefetch=1, wait=0.05, handle_signals=False)
    undo = _stop_before_first_claim_starts(worker)
    try:
        await asyncio.wait_for(worker.run(), 10)
    finally:
        undo()
    task = asyncio.create_task(worker.run())
    try:
        for i in range(20):
            await q.enqueue(i)
        try:
            async with asyncio.timeout(20):
                await done.wait()
        except TimeoutError:
            pytest.fail(
                f"{len(seen)} of 20 jobs ran in 20 s: _asked={worker._asked}, "
                f"_delivered={worker._delivered}, _sent={worker._sent}, "
                f"_ahead={sorted(worker._ahead)}, "
                f"_answers={list(worker._answers)}, ready={len(worker._ready)}"
            )
    finally:
        await worker.stop()
        await asyncio.wait_for(task, 10)
    assert (worker._ahead, worker._asked) == (set(), 0)


async def test_a_worker_runs_again_in_a_second_asyncio_run(start_broker: StartBroker) -> None:
    """A Worker "may be run again once it returned" (Worker.run), and its
    Client may be used in a later event loop (README): a burst
    Worker run from two asyncio.run() calls (a script's two steps, a cron-like
    loop) fails in the second with asyncio's "<asyncio.locks.Event ...> is
    bound to a different event loop", from the Events its __init__ made
    (review of this round's change). They are made again for a new loop."""
    broker = await start_broker(MemStore())
    q = Client(broker.url, topic="loops")
    done: list[str] = []

    def handle(job: Job) -> None:
        done.append(job.id)

    worker = Worker(q, handle, burst=True)

    async def step(n: int) -> None:
        await q.enqueue({"n": n})
        await worker.run()

    def script() -> BaseException | None:
        asyncio.run(step(1))
        try:
            asyncio.run(step(2))
        except RuntimeError as exc:
            return exc
        finally:
            asyncio.run(q.close())
        return None

    failed = await asyncio.to_thread(script)
    assert failed is None, f"the second run failed: {failed}"
    assert len(done) == 2
