"""The Python SDK against a real broker over a real socket: every method,
errors, the sync client, discovery and re-discovery."""

from __future__ import annotations

import asyncio
import gc
import inspect
import math
import os
import re
import select
import signal
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from simplequeue.api import JobSpec
from simplequeue.client import Client, Job, SyncClient
from simplequeue.client import client as client_module
from simplequeue.client import sync as sync_module
from simplequeue.errors import (
    BrokerUnavailable,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobNotFound,
    LeaseLost,
    Unauthorized,
)
from simplequeue.objstore.localfs import LocalStore
from simplequeue.objstore.memfs import MemStore
from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.until import until, until_async

StartBroker = Callable[..., Awaitable[Any]]


@pytest.fixture
async def q(start_broker: StartBroker) -> Any:
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="orders") as client:
        yield client


async def test_enqueue_claim_ack_round_trip(q: Client) -> None:
    job_id = await q.enqueue({"item": "book"}, priority=2, max_attempts=4)
    job = await q.claim("worker-1", lease=20)
    assert isinstance(job, Job)
    assert (job.id, job.payload, job.priority, job.max_attempts) == (job_id, {"item": "book"}, 2, 4)
    assert job.lease_token and job.lease_expires_at and job.attempts == 1
    await q.ack(job, result={"ok": True})
    done = await q.job(job_id)
    assert (done.status, done.result) == ("completed", {"ok": True})


async def test_a_job_enqueued_for_a_time_is_delayed_until_then(q: Client) -> None:
    soon = time.time() + 3600
    stamp = datetime.fromtimestamp(soon, UTC)
    ids = [
        await q.enqueue(1, run_at=soon),
        await q.enqueue(2, run_at=stamp),
        await q.enqueue(3, run_at=stamp.astimezone().replace(tzinfo=None)),  # naive: local
        *await q.enqueue_many([{"payload": 4, "run_at": soon}]),
        await q.enqueue(5, run_at=0),  # a time past: due now
    ]
    got = [await q.job(i) for i in ids]
    assert [j.status for j in got] == ["delayed"] * 4 + ["pending"]
    assert [j.run_at for j in got[:4]] == [pytest.approx(soon, abs=1e-3)] * 4
    with pytest.raises(InvalidRequest, match="not both"):
        await q.enqueue(6, delay=5, run_at=soon)
    with pytest.raises(InvalidRequest, match="not both"):
        await q.enqueue_many([{"payload": 7, "delay": 5, "run_at": soon}])
    assert (await q.status())["total"] == 5


async def test_claim_on_an_empty_topic_is_none(q: Client) -> None:
    assert await q.claim("w") is None
    assert await q.claim_many("w", 5) == []


async def test_enqueue_with_an_existing_id_returns_it_without_a_second_job(q: Client) -> None:
    assert await q.enqueue(1, id="same") == "same"
    assert await q.enqueue(2, id="same") == "same"
    assert (await q.status())["enqueued"] == 1


@pytest.mark.parametrize("job_id", ["order#2", "a?b=1", "a/b", "..", ".", "x%41"])
async def test_a_job_is_looked_up_by_its_own_id_whatever_its_characters(
    q: Client, job_id: str
) -> None:
    """Ids went into the URL as they were: "order#2" asked for job "order"
    (and answered its result), "a?b=1", "a/b" and ".." for none."""
    await q.enqueue({"who": "order"}, id="order")
    await q.enqueue({"who": job_id}, id=job_id)
    pending = await q.job(job_id)
    assert (pending.id, pending.payload) == (job_id, {"who": job_id})
    job = await q.claim("w1")
    while job is not None and job.id != job_id:
        await q.ack(job, result="not this one")
        job = await q.claim("w1")
    assert job is not None
    await q.ack(job, result={"for": job_id})
    assert await q.result(job_id) == {"for": job_id}


@pytest.mark.parametrize("topic", ["b/enqueue?", "a/b", "", "a/../b", "t\n"])
async def test_a_topic_that_no_topic_can_be_called_is_refused_before_any_request(
    q: Client, topic: str
) -> None:
    """The topic went into the path unchecked: "b/enqueue?" enqueued into
    topic "b", the others met a route's 404 ("no job")."""
    with pytest.raises(InvalidRequest, match="topic names"):
        Client(q.url, topic=topic)
    with pytest.raises(InvalidRequest, match="topic names"):
        q.for_topic(topic)
    assert await q.topics() == {}


async def test_settings_of_nan_or_inf_are_refused_not_sent_as_null(q: Client) -> None:
    await q.settings(rate=5.0)
    for bad in ({"rate": math.nan}, {"lease": math.inf}):
        with pytest.raises(InvalidRequest):
            await q.settings(**bad)
    assert (await q.settings())["rate"] == 5.0  # "rate": null would have removed it


async def test_an_empty_id_is_refused_not_replaced_by_a_random_one(q: Client) -> None:
    with pytest.raises(InvalidRequest):
        await q.enqueue("x", id="")
    with pytest.raises(InvalidRequest):
        await q.enqueue_many([{"payload": "y", "id": ""}])
    assert (await q.status())["pending"] == 0


@pytest.mark.parametrize(
    ("field", "bad", "said"),
    [
        ("priority", 10**12, r"Expected `int` <= 2147483647 - at `\$.priority`"),
        ("id", "x" * 257, r"Expected `str` of length <= 256 - at `\$.id`"),
        ("delay", -1, r"Expected `float` >= 0.0 - at `\$.delay`"),
    ],
)
async def test_enqueues_the_client_can_refuse_itself_send_no_request(
    start_broker: StartBroker, field: str, bad: Any, said: str
) -> None:
    """enqueue() built its JobSpec unchecked (msgspec checks a Struct's
    constraints only as it decodes one), where enqueue_many() checks each
    dict item: a priority past 2**31, an id past 256 characters, a negative
    delay went to the broker to be refused. Coalesced, each such job was found
    by halving: 1,000 concurrent ones cost 1,999 requests one after another
    (5.2 s on loopback, every other enqueue of the client waiting behind
    them) (review of the SDK). Refused here, with the broker's words, they
    cost none."""
    broker = await start_broker(MemStore())
    async with FaultProxy(broker.url).running() as proxy, Client(proxy.url, topic="t") as q:
        with pytest.raises(InvalidRequest, match=said):
            await q.enqueue_many([{"payload": 0, field: bad}])
        with pytest.raises(InvalidRequest, match=said):
            await q.enqueue(0, **{field: bad})
        got = await asyncio.gather(
            *[q.enqueue(i, **{field: bad}) for i in range(100)], return_exceptions=True
        )
        assert all(isinstance(g, InvalidRequest) for g in got), got
        assert proxy.requests["/topics/t/enqueue"] == 0
        assert await q.enqueue(1, **{field: {"priority": 7, "id": "x" * 256, "delay": 0}[field]})
        assert proxy.requests["/topics/t/enqueue"] == 1


async def test_schedules_named_dot_or_dot_dot_are_refused(q: Client) -> None:
    """A browser takes "." and ".." for steps in a path: the status page could
    not delete such a schedule (test_schedules: one made before is deleted)."""
    for name in (".", ".."):
        with pytest.raises(InvalidRequest, match="dots only"):
            await q.schedule(name, name, every=3600)
    assert await q.schedules() == []


async def test_enqueue_many_and_claim_many(q: Client) -> None:
    ids = await q.enqueue_many([{"payload": "a", "id": "x1"}, "b", {"payload": {"c": 3}}])
    assert ids[0] == "x1" and len(ids) == 3
    jobs = await q.claim_many("w", 10)
    assert [j.payload for j in jobs] == ["a", "b", {"c": 3}]
    results = await q.ack_many([(j, j.payload) for j in jobs])
    assert [r["status"] for r in results] == ["completed"] * 3


async def test_enqueue_many_refuses_a_job_with_a_key_it_does_not_know(q: Client) -> None:
    """A dict with "payload" lost its other keys (a typo such as "priorty"
    too) and was enqueued without them."""
    with pytest.raises(InvalidRequest, match=r"job 1: .*unknown field `priorty`"):
        await q.enqueue_many(["a", {"payload": "b", "priorty": 5}])
    assert (await q.status())["pending"] == 0
    assert await q.enqueue_many([]) == []  # was a malformed request


@pytest.mark.parametrize("token", ["correct horse battery staple", "p\u00e4ssw\u00f6rd"])
async def test_a_token_with_inner_spaces_or_beyond_ascii_is_sent(
    start_broker: StartBroker, token: str
) -> None:
    broker = await start_broker(MemStore(), token=token)
    async with Client(broker.url, topic="t", token=token) as q:
        assert (await q.status())["pending"] == 0


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"url": "http://[::1"}, "not a URL"),
        ({"url": "127.0.0.1:8080"}, "not a broker URL"),
        ({"url": "ftp://host"}, "not a broker URL"),
        ({"url": "http://127.0.0.1:8080", "token": "two\nlines"}, "no control characters"),
        ({"url": "http://127.0.0.1:8080", "token": "spaced "}, "no space at either end"),
        # an argument or variable whose bytes were not UTF-8 (surrogates)
        ({"url": "http://127.0.0.1:8080", "token": "tok\udcff"}, "UTF-8 text"),
    ],
)
def test_a_client_refuses_a_url_or_token_it_could_not_send(
    options: dict[str, str], says: str
) -> None:
    """Told at once, not as a ValueError from aiohttp's header writer or
    yarl on the first call."""
    with pytest.raises(ValueError, match=says):
        Client(**options)


async def test_delay_is_respected(q: Client) -> None:
    await q.enqueue("later", delay=60)
    assert await q.claim("w") is None
    assert (await q.status())["delayed"] == 1


async def test_nack_then_dead_then_requeue_and_purge(q: Client) -> None:
    job_id = await q.enqueue("x", max_attempts=1)
    job = await q.claim("w")
    assert job is not None
    assert await q.nack(job, error="broken") == "dead"
    [dead] = await q.dead()
    assert (dead.id, dead.last_error) == (job_id, "broken")
    assert await q.requeue() == [job_id]
    again = await q.claim("w")
    assert again is not None and again.attempts == 1
    await q.nack(again)
    assert await q.purge([job_id]) == [job_id]
    assert await q.dead() == []


async def test_a_requeue_or_purge_of_2500_named_jobs_goes_in_requests_of_1000(
    start_broker: StartBroker,
) -> None:
    """A broker takes at most 1,000 named ids in one requeue or purge (it took
    100,000 and held its event loop looking them up: review of limits, control
    and named tasks, round 25): the client sends more in parts, as cancel does,
    and every one is done."""
    broker = await start_broker(MemStore())
    engine = broker.engine

    async def all_dead() -> None:  # every pending job claimed and nacked, once
        while held := await engine.claim("t", "w", count=1000):
            await asyncio.gather(*(engine.nack("t", j["id"], j["lease_token"]) for j in held))

    ids = [f"j{i}" for i in range(2500)]
    for start in range(0, len(ids), 1000):
        await engine.enqueue(
            "t", [JobSpec(i, id=i, max_attempts=1) for i in ids[start : start + 1000]]
        )
    await all_dead()
    async with Client(broker.url, topic="t") as q:
        assert (await q.status())["dead"] == 2500
        assert sorted(await q.requeue(ids + ids[:10])) == sorted(ids)
        assert (await q.status())["pending"] == 2500
        await all_dead()
        assert sorted(await q.purge(ids)) == sorted(ids)
        assert (await q.status())["dead"] == 0


async def test_enqueue_many_or_ack_many_of_more_than_1000_is_refused_naming_the_limit(
    q: Client,
) -> None:
    """One request of enqueue_many is one write, all its jobs or none, and a
    broker takes 1,000 jobs (or acks) in one: 1,001 were sent, and refused
    in msgspec's words ("Expected `array` of length <= 1000 - at `$.jobs`"),
    where requeue, purge, cancel and release send more in parts. Refused
    before any request, the error names the limit."""
    assert len(await q.enqueue_many(range(1000))) == 1000
    with pytest.raises(InvalidRequest, match=r"1,001 jobs .* 1,000 at most"):
        await q.enqueue_many(range(1001))
    with pytest.raises(InvalidRequest, match=r"1,001 acks .* 1,000 at most"):
        await q.ack_many((f"j{i}", None) for i in range(1001))
    assert (await q.status())["pending"] == 1000


@pytest.mark.parametrize("method", ["requeue", "purge"])
async def test_a_requeue_or_purge_of_one_id_given_as_a_string_touches_no_other_job(
    q: Client, method: str
) -> None:
    """requeue("17") and purge("17") took the str a character an id, as
    cancel did (review of follow-ups and cancellation, round 26): the dead
    jobs "1" and "7" requeued, or purged for good, and "17" left. Refused."""
    for job_id in ("1", "7", "17"):
        await q.enqueue(job_id, id=job_id, max_attempts=1)
    for job in await q.claim_many("w", 3):
        await q.nack(job)
    with pytest.raises(InvalidRequest, match="a list of ids, not a str"):
        await getattr(q, method)("17")
    assert sorted(job.id for job in await q.dead()) == ["1", "17", "7"]


@pytest.mark.parametrize("jobs", ["abc", b"abc", {"payload": 1}])
async def test_enqueue_many_of_one_string_or_dict_is_refused_not_iterated(
    start_broker: StartBroker, jobs: Any
) -> None:
    """enqueue_many("abc") enqueued a job a character, and enqueue_many(
    {"payload": 1}) one a key (job "payload"), SyncClient's too (review of
    follow-ups and cancellation, round 26): refused, as follow-ups are."""
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="t") as q:
        with pytest.raises(InvalidRequest, match="a list of jobs"):
            await q.enqueue_many(jobs)
        sync = SyncClient(broker.url, topic="t")
        try:
            with pytest.raises(InvalidRequest, match="a list of jobs"):
                await asyncio.to_thread(sync.enqueue_many, jobs)
        finally:
            await asyncio.to_thread(sync.close)
        assert (await q.status())["enqueued"] == 0


async def test_dead_jobs_in_pages(q: Client) -> None:
    ids = [await q.enqueue(i, max_attempts=1) for i in range(4)]
    for _ in ids:
        job = await q.claim("w")
        assert job is not None
        await q.nack(job)
    assert [j.id for j in await q.dead(offset=1, limit=2)] == ids[1:3]
    assert [j.id for j in await q.dead(offset=3)] == ids[3:]
    with pytest.raises(InvalidRequest):
        await q.dead(limit=0)


async def test_heartbeat_extends_the_lease(q: Client) -> None:
    await q.enqueue("x")
    job = await q.claim("w", lease=5)
    assert job is not None and job.lease_expires_at is not None
    assert await q.heartbeat(job, lease=100) > job.lease_expires_at + 50


async def test_the_empty_job_id_is_no_job_not_a_wrong_path(q: Client) -> None:
    """job("") asked for /topics/t/jobs/, which no route has: since f9b2b28
    its 404 raised RouteNotFound, which says the broker URL's path is wrong
    (a Worker stops on it), not JobNotFound (review of round 28). No job has
    the empty id: the client says so without asking. The calls that send the
    id in their body are refused as bad input."""
    async with Client("http://127.0.0.1:9", topic="t") as nowhere:  # no request goes out
        with pytest.raises(JobNotFound):
            await nowhere.job("")
        with pytest.raises(JobNotFound):
            await nowhere.job_dict("", wait=5)
    with pytest.raises(JobNotFound):
        await q.job("")
    for call in (q.ack(""), q.nack(""), q.heartbeat(""), q.cancel([""]), q.requeue([""])):
        with pytest.raises(InvalidRequest):
            await call


async def test_errors_are_typed(q: Client) -> None:
    with pytest.raises(JobNotFound):
        await q.job("ghost")
    with pytest.raises(JobNotFound):
        await q.ack("ghost")
    await q.enqueue("x")
    job = await q.claim("w")
    assert job is not None
    with pytest.raises(LeaseLost):
        await q.ack(Job(job.id, lease_token="stale"))
    with pytest.raises(InvalidRequest):
        await q.enqueue("x", delay=-1)
    with pytest.raises(InvalidRequest):
        await q.for_topic("bad.topic").status()


async def test_wrong_token_is_unauthorized(start_broker: StartBroker) -> None:
    broker = await start_broker(MemStore(), token="right")
    async with Client(broker.url, token="wrong") as bad:
        with pytest.raises(Unauthorized):
            await bad.status()
    async with Client(broker.url, token="right") as good:
        assert (await good.status())["total"] == 0


async def test_status_and_topics(q: Client) -> None:
    await q.enqueue(1)
    await q.for_topic("other").enqueue(2)
    assert (await q.status())["pending"] == 1
    assert set(await q.topics()) == {"orders", "other"}


async def test_unreachable_broker_is_broker_unavailable_after_retries() -> None:
    async with Client("http://127.0.0.1:9", retries=2, retry_budget=2) as q:
        with pytest.raises(BrokerUnavailable):
            await q.status()


async def test_sync_client_works_from_a_plain_thread(start_broker: StartBroker) -> None:
    broker = await start_broker(MemStore())
    out: dict[str, Any] = {}

    def script() -> None:
        with SyncClient(broker.url, topic="sync") as q:
            job_id = q.enqueue({"n": 1})
            job = q.claim("w")
            assert job is not None
            q.ack(job, result="done")
            out["job"] = q.job(job_id)
            out["status"] = q.status()

    await asyncio.to_thread(script)
    assert out["job"].status == "completed" and out["job"].result == "done"
    assert out["status"]["completed"] == 1


async def test_a_client_is_used_again_in_a_second_asyncio_run(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """A Client made once and used from two asyncio.run() calls (a module's
    client, a script's two steps) failed in the second with "Event loop is
    closed": its connections and its enqueue batcher belonged to the first
    loop. Used again, whether closed in the first loop or not, it works, and
    aiohttp finds no session or connector left unclosed."""
    import gc

    broker = await start_broker(MemStore())
    kept = Client(broker.url, topic="loops")
    closed = Client(broker.url, topic="loops")

    async def enqueue() -> str:
        return await kept.enqueue({"n": 1})

    async def enqueue_and_close() -> str:
        async with closed:
            return await closed.enqueue({"n": 2})

    async def claim_all() -> list[str]:
        got = [await kept.claim("w"), await closed.claim("w")]
        for job in got:
            assert job is not None
            await kept.ack(job)
        await kept.close()
        await closed.close()
        return [job.id for job in got if job is not None]

    def script() -> list[Any]:
        return [asyncio.run(step()) for step in (enqueue, enqueue_and_close, claim_all)]

    first, second, claimed = await asyncio.to_thread(script)
    assert sorted(claimed) == sorted([first, second])
    assert (await kept.status())["completed"] == 2
    await kept.close()
    gc.collect()
    assert "Unclosed" not in caplog.text


async def test_a_client_whose_first_calls_in_a_second_loop_are_concurrent_closes_all_it_opened(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client._bind awaited the old session's close() before it recorded the
    new loop (review of this round's change): calls that start meanwhile in the new loop each make
    an enqueue batcher of their own (and empty _releases), the last made
    replacing the others: here two enqueue requests in flight at once, where
    one batcher sends one at a time. close() then waits for the last batcher
    only: it returns with enqueues of another still under way, whose requests
    go on, or are sent again, on a session opened after it and never closed
    (aiohttp: "Unclosed client session")."""
    broker = await start_broker(MemStore())
    real_enqueue = broker.engine.enqueue

    arrived = threading.Event()  # an enqueue of the second loop reached the broker
    in_flight = [0, 0]  # now, most

    async def slow_enqueue(topic: str, specs: list[Any]) -> Any:
        if specs[0].payload == {"n": 0}:
            return await real_enqueue(topic, specs)
        arrived.set()
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        try:
            # The later ones slower: close() returns before them, if it does
            await asyncio.sleep(0.2 if specs[0].payload == {"n": 1} else 0.6)
            return await real_enqueue(topic, specs)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(broker.engine, "enqueue", slow_enqueue)
    q = Client(broker.url, topic="loops")
    seen: dict[str, Any] = {}

    async def first() -> None:
        await q.enqueue({"n": 0})  # its session stays open when the loop ends

    async def second() -> None:
        tasks = [asyncio.create_task(q.enqueue({"n": i})) for i in range(1, 4)]
        await asyncio.to_thread(arrived.wait, 5)  # each bound the client, and sent
        await q.close()
        seen["done at close"] = [t.done() for t in tasks]
        await asyncio.gather(*tasks, return_exceptions=True)
        seen["open after close"] = q._session is not None and not q._session.closed
        if q._session is not None:
            await q._session.close()  # not to leave it to the test's end

    def script() -> None:
        asyncio.run(first())
        asyncio.run(second())

    await asyncio.to_thread(script)
    # One batcher sends one batch at a time: {n: 1}, then {n: 2} and {n: 3}.
    seen["most enqueue requests at once"] = in_flight[1]
    assert seen == {
        "done at close": [True, True, True],
        "open after close": False,
        "most enqueue requests at once": 1,
    }, seen


async def test_a_call_in_flight_as_the_client_closes_opens_no_session_after_it(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """close() closed the session under a call another task had in flight (a
    long-polled claim): the call took the closed connection for a transient
    failure and tried again on a session _http() opened anew after close():
    the claim ran on for its whole wait (3.1 s after close()), and that
    session was never closed (aiohttp: "Unclosed connector") (review of the
    SDK). The call ends with the client, and nothing is left open; a call
    made after close() opens nothing either."""
    broker = await start_broker(MemStore())
    q = Client(broker.url, topic="t")
    await q.status()
    claim = asyncio.create_task(q.claim("w", wait=3))
    await asyncio.sleep(0.3)  # the long poll is at the broker
    await q.close()
    closed_at = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="closed"):
        await asyncio.wait_for(claim, 30)
    ended_after = time.monotonic() - closed_at
    with pytest.raises(BrokerUnavailable, match="closed"):
        await q.status()
    left_open = q._session is not None and not q._session.closed
    if left_open:
        assert q._session is not None
        await q._session.close()  # not to leave it to the test's end
    assert (left_open, ended_after < 1.5) == (False, True), ended_after
    gc.collect()
    assert "Unclosed" not in caplog.text


async def test_a_client_in_use_in_a_loop_of_another_thread_is_refused_in_words(
    start_broker: StartBroker,
) -> None:
    """Not shared between two running loops: a clear error, not a hang or a
    "Future attached to a different loop" from deep in aiohttp."""
    broker = await start_broker(MemStore())
    q = Client(broker.url, topic="loops")
    await q.status()

    def script() -> None:
        with pytest.raises(RuntimeError, match="make one Client per event loop"):
            asyncio.run(q.status())

    await asyncio.to_thread(script)
    await q.close()


async def test_sync_client_raises_the_same_errors(start_broker: StartBroker) -> None:
    broker = await start_broker(MemStore())

    def script() -> None:
        with SyncClient(broker.url) as q, pytest.raises(JobNotFound):
            q.job("ghost")

    await asyncio.to_thread(script)


def test_a_sync_client_without_a_broker_is_refused_as_a_client_is() -> None:
    """Client() with neither a URL nor a store is a ValueError at once;
    SyncClient() was made (its thread started) and failed at its first call
    with an AssertionError (under `python -O`, an AttributeError on None)."""
    with pytest.raises(ValueError, match="URL"):
        Client()
    with pytest.raises(ValueError, match="URL"):
        SyncClient()


async def test_a_closed_sync_client_says_so(start_broker: StartBroker) -> None:
    """A call after close() raised "Event loop is closed" and warned of a
    coroutine never awaited."""
    broker = await start_broker(MemStore())

    def script() -> None:
        q = SyncClient(broker.url, topic="t")
        q.close()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "never awaited"
            with pytest.raises(RuntimeError, match="this SyncClient is closed"):
                q.status()  # the coroutine it made is freed here (refcounting)

    await asyncio.to_thread(script)


def test_a_sync_client_dropped_without_close_leaves_no_thread_behind() -> None:
    """A SyncClient dropped without close() (`SyncClient(url).enqueue(x)` in a
    loop, a helper that forgets `with`) kept its thread, loop and their
    descriptors for the life of the process, one set per client (review of
    the broker's life cycle, round 25). Once it is garbage, its client is
    closed and its thread ends."""
    import gc

    before = set(threading.enumerate())
    for _ in range(5):
        SyncClient("http://127.0.0.1:9")  # never used, never closed
    gc.collect()
    left = [t for t in threading.enumerate() if t not in before]
    deadline = time.monotonic() + 5
    for thread in left:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not [t.name for t in left if t.is_alive()]


def test_a_dropped_sync_client_closes_its_connections() -> None:
    """Its client is closed with its loop: no "Unclosed client session"."""
    import gc

    q = SyncClient("http://127.0.0.1:9", timeout=0.2, retries=1)
    with pytest.raises(BrokerUnavailable):
        q.status()  # the session is made, and holds a connector
    session = q.client._session
    thread = q._thread
    del q
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()
    assert session is not None and session.closed


async def test_sync_client_for_topic_and_job_dict(start_broker: StartBroker) -> None:
    broker = await start_broker(MemStore())

    def script() -> dict[str, Any]:
        with SyncClient(broker.url, topic="a") as q, q.for_topic("b") as other:
            job_id = other.enqueue("x")
            assert q.status()["pending"] == 0
            return other.job_dict(job_id)

    job = await asyncio.to_thread(script)
    assert (job["payload"], job["status"]) == ("x", "pending")


def test_an_interrupted_sync_call_stops_in_its_loop_too(broker_process: Any) -> None:
    """Ctrl-C in a script interrupted SyncClient's wait, not its call: the
    claim long-polled on in the client's loop thread, took the next job
    enqueued and dropped it (claimed by nobody until its lease ran out)."""
    broker = broker_process("--backend", "memfs")
    with SyncClient(broker.url, topic="t") as q, SyncClient(broker.url, topic="t") as other:
        main = threading.main_thread().ident
        assert main is not None
        ctrl_c = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT))
        ctrl_c.start()
        with pytest.raises(KeyboardInterrupt):
            q.claim("w", lease=60, wait=30)
        ctrl_c.join()
        other.enqueue("x", id="x")
        job = other.claim("w2", wait=10)
        assert job is not None and job.id == "x"


def test_an_interrupted_sync_call_has_given_up_its_request_when_the_interruption_goes_on() -> None:
    """The interruption went on at once while the call's cancellation waited
    for the client's loop: the broker still held the long poll, and the
    script's next enqueue (another client's, on another connection) could be
    claimed by it for nobody (the test above, about 1 run in 20 under load).
    Here the loop is kept busy 0.5 s as Ctrl-C comes: the connection must be
    closed before KeyboardInterrupt reaches the script."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        accepted: list[socket.socket] = []
        main = threading.main_thread().ident
        assert main is not None
        with SyncClient(f"http://127.0.0.1:{port}", topic="t", retries=0) as q:

            def interrupt_while_the_loop_is_busy() -> None:
                conn, _ = server.accept()
                accepted.append(conn)
                conn.recv(65536)  # the claim's request: held unanswered
                q._loop.call_soon_threadsafe(time.sleep, 0.5)
                signal.pthread_kill(main, signal.SIGINT)

            ctrl_c = threading.Thread(target=interrupt_while_the_loop_is_busy)
            ctrl_c.start()
            with pytest.raises(KeyboardInterrupt):
                q.claim("w", lease=60, wait=30)
            ctrl_c.join()
            [conn] = accepted
            assert_closed(conn)


def assert_closed(conn: socket.socket) -> None:
    """The client's side of `conn` (the server's end) has been closed: its
    FIN is there (after whatever it had sent), and `conn` is closed too."""
    with conn:
        closed = False
        while select.select([conn], [], [], 0.2)[0]:
            if not conn.recv(65536):
                closed = True
                break
        assert closed, "the interrupted claim's connection is still open"


def test_an_interruption_as_a_sync_call_is_handed_to_its_loop_gives_up_its_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C may land after a call was handed to the client's loop and
    before the caller waits for its answer (the calling thread descheduled
    there while the loop sends the request): the interruption went on and
    the call did not stop, its long poll held by the broker (the test above
    failed so, about 1 run in 20 under load). Here the interruption lands in
    that window, once the request has reached the broker."""
    real = asyncio.run_coroutine_threadsafe
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        accepted: list[socket.socket] = []

        def handed_over_then_interrupted(coro: Any, loop: Any) -> Any:
            future = real(coro, loop)
            if not accepted:  # the claim's: interrupted once its request came
                conn, _ = server.accept()
                accepted.append(conn)
                conn.recv(65536)
                raise KeyboardInterrupt
            return future

        with SyncClient(f"http://127.0.0.1:{port}", topic="t", retries=0) as q:
            monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", handed_over_then_interrupted)
            with pytest.raises(KeyboardInterrupt):
                q.claim("w", lease=60, wait=30)
            monkeypatch.undo()
            [conn] = accepted
            assert_closed(conn)


def test_an_interruption_as_another_thread_closes_the_sync_client_neither_waits_nor_warns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C reaches a SyncClient call as another thread closes the client:
    close() cancelled the call's future (cancel() still answers True), so
    the interrupted call scheduled its wait on the loop, which close() had
    stopped, its thread about to close it (held there, as a descheduled
    thread would be): the caller waited INTERRUPTED_WAIT_S (2 s) for
    nothing, and loop.close() dropped the wait, "never awaited" (review of
    round 34's change). close() waits for the calls it cancels: an
    interrupted call waits for nothing more then."""
    loop_stopped, let_it_close = threading.Event(), threading.Event()

    def run_forever(loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.run_forever()
        finally:
            loop_stopped.set()
            let_it_close.wait(10)  # the loop's thread descheduled, for a while
            loop.close()

    monkeypatch.setattr(sync_module, "_run_forever", run_forever)
    real_stopped = SyncClient._stopped
    took: list[float] = []

    def stopped_as_closed(self: SyncClient, call: Any) -> None:
        closer = threading.Thread(target=self.close)
        closer.start()  # the other thread's close(), done as Ctrl-C came
        assert loop_stopped.wait(10)
        started = time.monotonic()
        try:
            real_stopped(self, call)
        finally:
            took.append(time.monotonic() - started)
            let_it_close.set()
            closer.join()

    monkeypatch.setattr(SyncClient, "_stopped", stopped_as_closed)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        main = threading.main_thread().ident
        assert main is not None
        q = SyncClient(f"http://127.0.0.1:{port}", topic="t", retries=0)

        def interrupt() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)  # the claim's request: held unanswered
                signal.pthread_kill(main, signal.SIGINT)
                time.sleep(0.5)

        ctrl_c = threading.Thread(target=interrupt)
        ctrl_c.start()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(KeyboardInterrupt):
                q.claim("w", lease=60, wait=30)
            ctrl_c.join()
            gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    assert took[0] < 1.0, f"the interrupted call waited {took[0]:.1f} s on a stopped loop"


def enqueue_in_a_forked_child(q: SyncClient) -> int:
    """Fork; the child enqueues job "child" through `q` and exits 0 (1 if that
    raised). The child's pid."""
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            q.enqueue("from the child", id="child")
            code = 0
        finally:
            os._exit(code)
    return pid


async def test_a_sync_client_used_in_a_forked_child_does_not_hang(
    start_broker: StartBroker,
) -> None:
    """gunicorn --preload, multiprocessing's fork, prefork workers: a SyncClient
    made in the parent has its loop in a thread the child does not have, and
    the child's calls waited on it with no timeout: for ever (review of the
    SDK, round 28). In a child it starts a loop, a thread and connections of
    its own, as redis-py's pool does; the parent's go on serving the parent."""
    broker = await start_broker(MemStore())
    q = SyncClient(broker.url, topic="fork", timeout=2)
    ended: list[tuple[int, int]] = []

    def reaped() -> bool:
        ended.append(os.waitpid(child, os.WNOHANG))
        return ended[-1][0] != 0

    try:
        await asyncio.to_thread(q.status)  # used in the parent first (made at import)
        child = await asyncio.to_thread(enqueue_in_a_forked_child, q)
        try:
            await until(reaped, within=5)
        finally:
            if not ended or ended[-1][0] == 0:  # hung: not left behind
                os.kill(child, signal.SIGKILL)
                await asyncio.to_thread(os.waitpid, child, 0)
        assert os.waitstatus_to_exitcode(ended[-1][1]) == 0
        job = await asyncio.to_thread(q.job, "child")
        assert job.payload == "from the child"
    finally:
        await asyncio.to_thread(q.close)


# --- discovery ------------------------------------------------------------------------


async def test_discover_finds_the_active_broker(start_broker: StartBroker, tmp_path: Path) -> None:
    broker = await start_broker(LocalStore(tmp_path))
    async with await Client.discover(LocalStore(tmp_path), max_age=30, topic="t") as q:
        assert q.url == broker.url
        await q.enqueue("found")
        assert (await q.status())["pending"] == 1


async def test_discover_refuses_a_resigned_record(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    broker = await start_broker(LocalStore(tmp_path))
    await broker.stop()  # resigns: heartbeat_at = 0
    with pytest.raises(BrokerUnavailable, match=f"names {broker.url}, which stopped"):
        await Client.discover(LocalStore(tmp_path), max_age=30)  # not "1796403682 s old"


async def test_discover_says_why_a_max_age_below_the_brokers_renewals_refuses_it(
    tmp_path: Path,
) -> None:
    """SPEC 8: discover "refuses a record whose heartbeat is older" than
    max_age, whatever lease the record states. A broker run with
    --broker-lease 150 renews broker.json every 50 s: max_age 30 (--max-age's
    default) refused it for 20 s of every 50, saying only "its heartbeat is
    35 s old" (review of the CLI, round 26). The error says why now, and a
    max_age above the renewal finds it."""
    from simplequeue import keys
    from simplequeue.client.discovery import find_broker
    from simplequeue.records import BrokerRecord

    store = LocalStore(tmp_path)
    try:
        await store.sample_clock()
        record = BrokerRecord("b1", "http://127.0.0.1:9", 1, store.now() - 35, 150.0)
        await store.put(keys.BROKER, record.encode())
        said = "35 s old (max_age 30 s); that broker renews it every 50 s, a third of its"
        with pytest.raises(BrokerUnavailable, match=re.escape(said)):
            await find_broker(store, 30)
        assert await find_broker(store, 60) == "http://127.0.0.1:9"
    finally:
        await store.close()


async def test_discover_does_not_blame_max_age_for_a_broker_silent_past_its_lease(
    tmp_path: Path,
) -> None:
    """The hint above was given whenever max_age was below the record's
    renewals, whatever the heartbeat's age: a broker silent for an hour,
    long past its lease of 150 s, was said to be found by a max_age above
    50 s, and max_age 60 still refused it (review of the client, round 26)."""
    from simplequeue import keys
    from simplequeue.client.discovery import find_broker
    from simplequeue.records import BrokerRecord

    store = LocalStore(tmp_path)
    try:
        await store.sample_clock()
        record = BrokerRecord("b1", "http://127.0.0.1:9", 1, store.now() - 3600, 150.0)
        await store.put(keys.BROKER, record.encode())
        with pytest.raises(BrokerUnavailable) as refused:
            await find_broker(store, 30)
        assert "renews it" not in str(refused.value), str(refused.value)
        with pytest.raises(BrokerUnavailable):
            await find_broker(store, 60)  # what the hint said finds it
    finally:
        await store.close()


async def test_discover_with_no_broker_ever(tmp_path: Path) -> None:
    with pytest.raises(BrokerUnavailable, match="no broker"):
        await Client.discover(LocalStore(tmp_path))


class _Counted(MemStore):
    """A store that counts its reads and whether it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = self.closed = 0

    async def get(self, key: str) -> tuple[bytes, str]:
        self.reads += 1
        return await super().get(key)

    async def close(self) -> None:
        self.closed += 1
        await super().close()


async def test_discover_checks_its_options_first_and_closes_what_it_owns() -> None:
    """discover() read broker.json before its options were checked (a bad
    topic cost a request), and a store it was to close (opened from a URL)
    was left open when it failed."""
    store = _Counted()
    with pytest.raises(InvalidRequest):
        await Client.discover(store, topic="a/b", close_store=True)
    assert (store.reads, store.closed) == (0, 1)
    store = _Counted()
    with pytest.raises(BrokerUnavailable):
        await Client.discover(store, close_store=True)
    assert store.closed == 1
    store = _Counted()
    with pytest.raises(BrokerUnavailable):
        await Client.discover(store)  # not its own: left open
    assert store.closed == 0


async def test_a_client_with_default_retries_rides_out_its_brokers_crash(
    broker_process: Any, tmp_path: Path
) -> None:
    """broker.json names a killed broker until the standby has seen it
    unchanged for its --broker-lease (3 s here): each refused connection to
    it was one of the 5 `retries`, spent in under 2 s (BrokerUnavailable;
    this test passed only with retries=30). A broker broker.json still
    names that refuses the connection is no live broker, as a stale record
    is: those tries count against the retry budget only."""
    first = broker_process("--dir", str(tmp_path), "--broker-lease", "3")
    async with await Client.discover(f"file://{tmp_path}", topic="t") as q:
        assert q.url == first.url
        await q.enqueue("before", id="a")
        standby = broker_process("--dir", str(tmp_path), "--broker-lease", "3")
        first.kill()
        await q.enqueue("after", id="b")  # retried until broker.json names the standby
        assert q.url == standby.url
        assert (await q.status())["pending"] == 2


async def test_a_client_with_default_retries_rides_out_a_clean_hand_over(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    """A broker that stops cleanly resigns broker.json, and the standby takes it
    over at its next round (a third of its --broker-lease). A discovered
    client spent its 5 tries in about 1.5 s meanwhile and raised
    BrokerUnavailable ("heartbeat is 1796403682 s old"): a try that finds no
    live broker in broker.json now counts against the retry budget only."""
    from tests.test_ownership import owner_of

    brokers = [await start_broker(LocalStore(tmp_path)) for _ in range(2)]
    async with await Client.discover(LocalStore(tmp_path)) as found:
        [active] = [b for b in brokers if b.url == found.url]
        [standby] = [b for b in brokers if b is not active]
        # A topic the active broker owns: its requests need that broker.
        topic = next(t for t in (f"t{n}" for n in range(100)) if owner_of(brokers, t) is active)
        async with found.for_topic(topic) as q:
            await q.enqueue("before")
            await active.stop()
            await q.enqueue("after")
            assert q.url == standby.url
            assert (await q.status())["pending"] == 2


async def test_a_discovered_client_goes_to_the_broker_it_rediscovers_not_the_old_owner(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    """A broker names itself in Simplequeue-Owner on every answer it serves,
    so a discovered client follows its broker as the topic's owner too. When
    that broker was gone, broker.json was read again and named the standby,
    but the client still followed the old broker as the owner and sent its
    next try there (refused, a try counted): with retries=2 it raised
    BrokerUnavailable while broker.json named a live broker it never tried."""
    from simplequeue.client.discovery import find_broker
    from tests.test_ownership import owner_of

    async def names(store: LocalStore, url: str) -> bool:
        try:
            return await find_broker(store, 30) == url
        except BrokerUnavailable:
            return False

    brokers = [await start_broker(LocalStore(tmp_path), broker_lease=1.5) for _ in range(2)]
    async with await Client.discover(LocalStore(tmp_path), retries=2) as found:
        [active] = [b for b in brokers if b.url == found.url]
        [standby] = [b for b in brokers if b is not active]
        # A topic the active broker owns: it names itself as the owner.
        topic = next(t for t in (f"t{n}" for n in range(100)) if owner_of(brokers, t) is active)
        async with found.for_topic(topic) as q:
            await q.enqueue("before")
            await active.stop()
            store = LocalStore(tmp_path)
            try:
                await until_async(lambda: names(store, standby.url))  # taken over
            finally:
                await store.close()
            assert (await q.status())["pending"] == 1
            assert q.url == standby.url


async def test_sync_discover(start_broker: StartBroker, tmp_path: Path) -> None:
    broker = await start_broker(LocalStore(tmp_path))

    def script() -> str:
        with SyncClient.discover(f"file://{tmp_path}", topic="t") as q:
            return q.url

    assert await asyncio.to_thread(script) == broker.url


@pytest.mark.s3
async def test_a_sync_clients_client_of_another_topic_rediscovers_on_its_own_loop(
    start_broker: StartBroker,
) -> None:
    """SyncClient.for_topic() on a discovered client gave the new client, on a
    loop and thread of its own, the first one's S3 store, whose connections
    and lock belong to the first one's loop: its rediscovery failed, and
    closing the first closed the second's store (review, round 22)."""
    from tests.conftest import open_s3, s3_url

    prefix = uuid.uuid4().hex[:12]
    brokers = [await start_broker(await open_s3(prefix)) for _ in range(2)]  # each closes its own

    def discover() -> tuple[SyncClient, SyncClient]:
        first = SyncClient.discover(s3_url(prefix), topic="t", max_age=30)
        other = first.for_topic("u")
        other.enqueue("before")
        return first, other

    first, other = await asyncio.to_thread(discover)
    try:
        [active] = [b for b in brokers if b.url == other.url]
        [standby] = [b for b in brokers if b is not active]
        await active.stop()  # it resigns broker.json; the standby takes it over
        await asyncio.to_thread(first.close)  # and the first client goes away
        await asyncio.to_thread(other.enqueue, "after")  # rediscovered from the store
        assert other.url == standby.url
        assert (await asyncio.to_thread(other.status))["pending"] == 2
    finally:
        await asyncio.to_thread(other.close)
        await asyncio.to_thread(first.close)


@pytest.mark.s3
async def test_a_discovered_client_used_again_in_a_later_loop_rediscovers_there(
    start_broker: StartBroker,
) -> None:
    """A Client discovered in one asyncio.run() and used in the next started
    its HTTP connections afresh there, but kept the S3 store handle of the
    first loop, whose connections belonged to it: once its broker went, each
    rediscovery failed "Event loop is closed", and the call BrokerUnavailable
    with a live broker named in broker.json (review of this round's change).
    The handle is one for the new loop too."""
    from tests.conftest import open_s3, s3_url

    prefix = uuid.uuid4().hex[:12]
    brokers = [await start_broker(await open_s3(prefix)) for _ in range(2)]  # each closes its own

    def first_loop() -> Client:
        return asyncio.run(Client.discover(s3_url(prefix), topic="t", max_age=30))

    client = await asyncio.to_thread(first_loop)
    [active] = [b for b in brokers if b.url == client.url]
    [standby] = [b for b in brokers if b is not active]
    await active.stop()  # it resigns broker.json; the standby takes it over

    async def enqueue_and_close() -> str:
        async with client:
            return await client.enqueue("after")

    assert await asyncio.to_thread(asyncio.run, enqueue_and_close())
    assert client.url == standby.url
    assert (await standby.engine.status("t"))["pending"] == 1


async def test_a_client_of_another_topic_on_the_same_loop_shares_its_store() -> None:
    """Client.for_topic() shares its lender's connections and store: a handle
    of its own (for another loop: SyncClient.for_topic) was not closed with
    the lender (review of this round's diff)."""
    from simplequeue.objstore.s3 import S3Settings, S3Store

    store = S3Store(S3Settings(bucket="b", endpoint_url="http://127.0.0.1:9", region="us-east-1"))
    async with Client("http://127.0.0.1:9", topic="t", store=store) as q:
        assert q.for_topic("u").store is store
    await store.close()


async def test_concurrent_enqueues_share_requests(start_broker: StartBroker) -> None:
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="burst") as q:
        ids = await asyncio.gather(*(q.enqueue({"n": i}) for i in range(200)))
        assert len(set(ids)) == 200
        assert (await q.status())["pending"] == 200
    # one mutation per HTTP request: far fewer than one per job
    assert broker.committer.stats.mutations < 100


async def test_a_bad_job_in_a_burst_fails_only_its_own_call(q: Client) -> None:
    results = await asyncio.gather(
        *(q.enqueue(i, delay=-1 if i == 3 else 0) for i in range(10)), return_exceptions=True
    )
    assert isinstance(results[3], InvalidRequest)
    assert all(isinstance(r, str) for i, r in enumerate(results) if i != 3)
    assert (await q.status())["pending"] == 9


@pytest.mark.parametrize("burst", ["over-max-body", "one-bad-job"])
async def test_a_burst_of_coalesced_enqueues_is_not_sent_one_job_a_request(
    start_broker: StartBroker, burst: str
) -> None:
    """Concurrent enqueue() calls share one request of up to 1,000 jobs. A
    request the broker refused (a 413: 1,000 jobs of 600 bytes pass its
    --max-body, here 512 KiB, though each fits; or a 400: one job of the
    burst is bad) was sent again one job a request, each waiting for the one
    before: 1,001 requests (3,000 enqueues of 1.1 KB with the default
    --max-body: 3,003 requests and 4.96 s, against 3 and 0.09 s at 500
    bytes). Halved instead, it finds the jobs that fit, or the bad one, in
    some 2 x log2(1,000) requests."""
    broker = await start_broker(MemStore(), max_body=512 * 1024)
    async with FaultProxy(broker.url).running() as proxy, Client(proxy.url, topic="t") as q:
        if burst == "over-max-body":
            payloads: list[Any] = ["x" * 600 for _ in range(1000)]
        else:
            payloads = [{"n": i} for i in range(1000)]
            payloads[500] = {"n": 2**70}  # past 64 bits: the broker refuses it
        results = await asyncio.gather(*(q.enqueue(p) for p in payloads), return_exceptions=True)
    failed = [i for i, r in enumerate(results) if not isinstance(r, str)]
    assert failed == ([] if burst == "over-max-body" else [500])
    if failed:
        assert isinstance(results[500], InvalidRequest)
    requests = proxy.requests["/topics/t/enqueue"]
    assert requests <= 40, f"{requests} requests for one burst of 1,000 enqueues"


def _parameters(method: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]


def test_sync_client_has_every_method_of_client_with_the_same_parameters() -> None:
    public = [
        name
        for name, member in inspect.getmembers(Client, callable)
        if not name.startswith("_") or name == "__init__"
    ]
    assert "job_dict" in public and "claim" in public
    for name in public:
        twin = getattr(SyncClient, name, None)
        assert twin is not None, f"SyncClient has no {name}()"
        assert _parameters(twin) == _parameters(getattr(Client, name)), name


# --- follow-ups (SPEC 9) and waiting for results ----------------------------------------


async def until_pending(broker: Any, q: Client, n: int) -> None:
    """Return once `q`'s topic has `n` pending jobs, checked at each of its commits."""
    async with asyncio.timeout(10):
        while (await q.status())["pending"] < n:
            await broker.committer.wait_changed(q.topic, 1.0)


async def test_ack_enqueues_its_follow_ups_here_and_in_other_topics(
    start_broker: StartBroker,
) -> None:
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="src") as q, q.for_topic("dst") as dst:
        await q.enqueue("step 1", id="a")
        job = await q.claim("w")
        assert job is not None
        await q.ack(
            job,
            result="ok",
            enqueue=[
                "step 2",  # a payload: this topic, an id derived from the job's
                {"payload": {"n": 3}, "id": "mine", "priority": 7},
                {"payload": "elsewhere", "topic": "dst", "delay": 0},
            ],
        )
        assert (await q.job("a")).result == "ok"
        assert (await q.job("a:0")).payload == "step 2"
        mine = await q.job("mine")
        assert (mine.payload, mine.priority) == ({"n": 3}, 7)
        await until_pending(broker, dst, 1)  # delivered by the owner of dst
        assert (await dst.job("a:2")).payload == "elsewhere"
        assert (await dst.status())["enqueued"] == 1


async def test_an_ack_that_fails_enqueues_none_of_its_follow_ups(q: Client) -> None:
    await q.enqueue("x", id="a")
    job = await q.claim("w")
    assert job is not None
    with pytest.raises(LeaseLost):
        await q.ack(Job("a", lease_token="stale"), enqueue=["never"])
    with pytest.raises(InvalidRequest, match="follow-up 1"):  # checked before it is sent
        await q.ack(job, enqueue=["fine", {"payload": 1, "topic": "bad.name"}])
    assert (await q.status())["enqueued"] == 1
    assert (await q.job("a")).status == "claimed"


async def test_ack_many_carries_follow_ups_per_ack(q: Client) -> None:
    await q.enqueue_many([{"payload": n, "id": f"j{n}"} for n in range(3)])
    jobs = await q.claim_many("w", 3)
    results = await q.ack_many(
        [(jobs[0], "r0", ["after 0"]), (jobs[1], "r1"), (jobs[2], "r2", None)]
    )
    assert [r["status"] for r in results] == ["completed"] * 3
    assert [r["enqueued"] for r in results] == [["j0:0"], None, None]  # the SDK dropped them
    assert (await q.job("j0:0")).payload == "after 0"
    assert (await q.status())["enqueued"] == 4


@pytest.fixture
async def watched(start_broker: StartBroker) -> Any:
    """(broker, a proxy that counts the requests it passes on, a client through it,
    a client straight to the broker)."""
    broker = await start_broker(MemStore())
    async with (
        FaultProxy(broker.url).running() as proxy,
        Client(proxy.url, topic="t") as through,
        Client(broker.url, topic="t") as direct,
    ):
        yield broker, proxy, through, direct


async def test_result_waits_for_the_job_to_complete_in_one_long_poll(watched: Any) -> None:
    _, proxy, q, direct = watched
    await direct.enqueue("x", id="a")
    job = await direct.claim("w")
    assert job is not None
    proxy.arrived.clear()
    waiting = asyncio.ensure_future(q.result("a", timeout=30))
    await proxy.arrived.wait()  # the long poll is at the broker
    assert not waiting.done()
    await direct.ack(job, result={"total": 3})
    assert await asyncio.wait_for(waiting, 10) == {"total": 3}
    assert proxy.requests["/topics/t/jobs/a"] == 1


async def test_result_waits_for_a_job_that_does_not_exist_yet(watched: Any) -> None:
    _, proxy, q, direct = watched
    proxy.arrived.clear()
    waiting = asyncio.ensure_future(q.result("later", timeout=30))
    await proxy.arrived.wait()
    await direct.enqueue("x", id="later")
    job = await direct.claim("w")
    assert job is not None
    await direct.ack(job, result=1)
    assert await asyncio.wait_for(waiting, 10) == 1


async def test_result_of_a_dead_job_raises_job_failed_with_its_last_error(q: Client) -> None:
    await q.enqueue("x", id="a", max_attempts=1)
    job = await q.claim("w")
    assert job is not None
    await q.nack(job, error="out of paper")
    with pytest.raises(JobFailed, match="out of paper") as caught:
        await q.result("a", timeout=5)
    assert (caught.value.job_id, caught.value.last_error) == ("a", "out of paper")


async def test_result_of_a_cancelled_job_raises_job_cancelled(q: Client) -> None:
    await q.enqueue("x", id="a")
    waiting = asyncio.ensure_future(q.result("a", timeout=10))
    await q.cancel(["a"])  # while the result is waited for (SPEC 10)
    with pytest.raises(JobCancelled, match="'a'"):
        await waiting


async def test_result_raises_timeout_error_when_the_job_is_still_unfinished(q: Client) -> None:
    await q.enqueue("x", id="a")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="still pending"):
        await q.result("a", timeout=0.3)
    assert time.monotonic() - started >= 0.3
    with pytest.raises(JobNotFound):  # nothing of that id, even after the wait
        await q.result("ghost", timeout=0.2)


async def test_result_long_polls_again_until_its_timeout(
    watched: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, proxy, q, direct = watched
    monkeypatch.setattr(client_module, "WAIT_PER_REQUEST", 0.25)
    await direct.enqueue("x", id="a")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await q.result("a", timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 5
    assert proxy.requests["/topics/t/jobs/a"] == 4  # 0.25 s each


async def test_a_long_poll_is_not_cut_by_the_clients_http_timeout(
    start_broker: StartBroker,
) -> None:
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="t", timeout=0.2, retries=1) as q:
        await q.enqueue("x", id="a")
        with pytest.raises(TimeoutError):  # not BrokerUnavailable after 0.2 s
            await q.result("a", timeout=1.0)
        assert (await q.job("a", wait=0.5)).status == "pending"


async def test_sync_client_waits_for_results_too(start_broker: StartBroker) -> None:
    broker = await start_broker(MemStore())

    def script() -> Any:
        with SyncClient(broker.url, topic="sync") as q:
            q.enqueue("x", id="a")
            job = q.claim("w")
            assert job is not None
            q.ack(job, result="done", enqueue=["next"])
            assert q.job("a:0").payload == "next"
            return q.result("a", timeout=5)

    assert await asyncio.to_thread(script) == "done"


async def test_nack_with_a_delay_answers_delayed(q: Client) -> None:
    """`nack(job, delay=30) -> status` answered "pending" while the job was
    delayed, as its lookup and the topic's counts said (review finding)."""
    await q.enqueue_many([{"payload": 1, "id": "a"}, {"payload": 2, "id": "b"}])
    job = await q.claim("w")
    assert job is not None and job.id == "a"
    assert await q.nack(job, delay=30) == "delayed"
    assert (await q.job("a")).status == "delayed"
    assert (await q.status())["delayed"] == 1
    other = await q.claim("w")
    assert other is not None and other.id == "b"
    assert await q.nack(other) == "pending"  # no delay: pending at once


async def test_a_client_for_another_topic_uses_this_ones_connections(q: Client) -> None:
    """`q.for_topic("x")` made a client with an HTTP session of its own, which
    nobody closed unless the caller knew to: "Unclosed client session" at
    exit (review finding). It uses its lender's connections now."""
    import gc

    other = q.for_topic("other")
    await other.enqueue(1)
    assert (await other.status())["pending"] == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del other
        gc.collect()
    assert not [w for w in caught if "Unclosed" in str(w.message)], caught


async def test_a_client_for_another_topic_fails_once_its_lender_is_closed(q: Client) -> None:
    """A for_topic() client used after its lender was closed opened a new session
    on the closed lender, which nobody closed (review of 612db2d). It raises."""
    lender = Client(q.url, topic="a")
    other = lender.for_topic("b")
    await other.enqueue(1)
    await lender.close()
    with pytest.raises(RuntimeError, match="is closed"):
        await other.status()
    assert lender._session is None or lender._session.closed
