"""SPEC 3-12 promises that no other test checked (a review of the SPEC's
conformance found them kept, untested). Each goes through a real in-process
broker on a free port, over real sockets (HTTP with aiohttp, RESP with
redis-py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as redis

from simplequeue import keys
from simplequeue.broker.server import Broker
from simplequeue.objstore.memfs import MemStore
from tests.helpers.until import until_async

StartBroker = Callable[..., Awaitable[Broker]]


@pytest.fixture
async def broker(start_broker: StartBroker) -> Broker:
    return await start_broker(MemStore(), redis_addr="127.0.0.1:0")


@pytest.fixture
async def r(broker: Broker) -> AsyncIterator[redis.Redis]:
    assert broker.redis is not None
    client = redis.Redis(host="127.0.0.1", port=broker.redis.port)
    yield client
    await client.aclose()


@pytest.fixture
async def http(broker: Broker) -> AsyncIterator[Callable[..., Awaitable[tuple[int, Any]]]]:
    async with aiohttp.ClientSession() as session:

        async def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
            data = orjson.dumps(body) if body is not None else None
            async with session.request(method, broker.url + path, data=data) as answer:
                return answer.status, orjson.loads(await answer.read())

        yield call


async def test_resp_pops_and_stream_claims_obey_the_topics_rate_and_max_claimed(
    broker: Broker, r: redis.Redis, http: Callable[..., Awaitable[tuple[int, Any]]]
) -> None:
    """SPEC 12: every claim of the topic goes through the commit point, so the
    limits hold for RESP's LPOP/XREADGROUP as for HTTP claims (SPEC 6)."""
    assert await r.rpush("q", *[f"v{i}" for i in range(6)]) == 6
    assert (await http("PUT", "/topics/q/settings", {"rate": 0.001, "burst": 2}))[0] == 200
    # The bucket starts full with 2 tokens: a pop of 5 gets 2, the next none.
    assert await r.lpop("q", 5) == [b"v0", b"v1"]
    assert await r.lpop("q", 5) is None
    assert await r.rpop("q") is None
    # max_claimed 0 pauses the topic for every kind of claim, a blocking one too.
    code, _ = await http("PUT", "/topics/q/settings", {"rate": None, "max_claimed": 0})
    assert code == 200
    assert await r.lpop("q") is None
    assert await r.blpop(["q"], timeout=0.3) is None
    read = await r.xreadgroup("g", "c", {"q": ">"}, count=5)
    assert not read
    # max_claimed 1: a stream read claims one (its job stays claimed, with a
    # lease), and then the topic's one place is taken: a pop gets nothing.
    assert (await http("PUT", "/topics/q/settings", {"max_claimed": 1}))[0] == 200
    read = await r.xreadgroup("g", "c", {"q": ">"}, count=5)
    [[_, entries]] = read
    assert len(entries) == 1
    assert await r.lpop("q", 5) is None
    counts = (await http("GET", "/topics/q/status"))[1]
    assert (counts["claimed"], counts["pending"], counts["completed"]) == (1, 3, 2)
    assert await r.llen("q") == 3


async def test_a_topics_default_attempts_and_lease_reach_jobs_made_by_follow_ups_schedules_and_resp(
    broker: Broker, r: redis.Redis, http: Callable[..., Awaitable[tuple[int, Any]]]
) -> None:
    """SPEC 12's defaults for max_attempts and lease apply to jobs that no
    enqueue request made: a follow-up delivered from another topic's outbox
    (SPEC 9) takes its target's default, a schedule's job (SPEC 11) its
    topic's, and a stream claim (SPEC 6) its topic's lease; an explicit
    max_attempts of 0 (SPEC 3: unlimited) is kept, not taken for "none"."""
    code, _ = await http("PUT", "/topics/dst/settings", {"max_attempts": 7, "lease": 4})
    assert code == 200
    assert (await http("PUT", "/topics/src/settings", {"max_attempts": 2}))[0] == 200
    await http("POST", "/topics/src/enqueue", {"id": "s", "payload": 1})
    _, claimed = await http("POST", "/topics/src/claim", {"worker_id": "w"})
    ack = {
        "job_id": "s",
        "lease_token": claimed["job"]["lease_token"],
        "enqueue": [
            {"payload": "other", "topic": "dst"},  # dst's default: 7
            {"payload": "here"},  # src's default: 2
            {"payload": "forever", "topic": "dst", "max_attempts": 0},
        ],
    }
    code, answer = await http("POST", "/topics/src/ack", ack)
    assert code == 200 and answer["enqueued"] == ["s:0", "s:1", "s:2"]

    async def delivered() -> bool:
        return (await http("GET", "/topics/dst/status"))[1]["enqueued"] == 2

    await until_async(delivered, within=5)
    assert (await http("GET", "/topics/dst/jobs/s:0"))[1]["max_attempts"] == 7
    assert (await http("GET", "/topics/src/jobs/s:1"))[1]["max_attempts"] == 2
    assert (await http("GET", "/topics/dst/jobs/s:2"))[1]["max_attempts"] == 0

    code, _ = await http("PUT", "/topics/dst/schedules/tick", {"every": 1, "payload": "t"})
    assert code == 200

    async def fired() -> bool:
        return (await http("GET", "/topics/dst/status"))[1]["enqueued"] == 3

    await until_async(fired, within=5)
    assert (await http("DELETE", "/topics/dst/schedules/tick"))[0] == 200
    # Every job of dst claimed over RESP: each has dst's lease of 4 s.
    read = await r.xreadgroup("g", "c", {"dst": ">"}, count=10)
    [[_, entries]] = read
    ids = sorted(e[0].decode() for e in entries)
    assert len(ids) == 3 and ids[:2] == ["s:0", "s:2"] and ids[2].startswith("tick@")
    fired_job = (await http("GET", f"/topics/dst/jobs/{ids[2]}"))[1]
    assert fired_job["max_attempts"] == 7
    for job_id in ids:
        job = (await http("GET", f"/topics/dst/jobs/{job_id}"))[1]
        assert job["lease_expires_at"] - job["claimed_at"] == pytest.approx(4.0, abs=1e-6)


async def test_llen_counts_delayed_jobs_and_a_due_job_counts_pending_without_a_write(
    broker: Broker, r: redis.Redis, http: Callable[..., Awaitable[tuple[int, Any]]]
) -> None:
    """SPEC 3: LLEN counts pending + delayed; `pending` is "claimable now" and
    `delayed` "not yet due": a job whose delay ran out counts pending at once,
    with nothing written to the topic since."""
    await http("POST", "/topics/d/enqueue", {"id": "soon", "payload": 1, "delay": 0.5})
    await http("POST", "/topics/d/enqueue", {"id": "later", "payload": 2, "delay": 3600})
    await r.rpush("d", "now")
    assert await r.llen("d") == 3
    assert await r.xlen("d") == 3
    counts = (await http("GET", "/topics/d/status"))[1]
    assert (counts["pending"], counts["delayed"]) == (1, 2)
    _, etag = await broker.store.get(keys.head("d"))
    started = time.monotonic()

    async def due() -> bool:
        return (await http("GET", "/topics/d/status"))[1]["pending"] == 2

    await until_async(due, within=5)
    assert time.monotonic() - started < 2
    counts = (await http("GET", "/topics/d/status"))[1]
    assert (counts["pending"], counts["delayed"], counts["total"]) == (2, 1, 3)
    assert await r.llen("d") == 3
    assert (await broker.store.get(keys.head("d")))[1] == etag  # nothing written since
    # The two due are popped, the one still delayed is not. "Oldest" is by due
    # time (docs/STORAGE.md: lanes sorted by (run_at, seq)): "now" was due first.
    assert await r.lpop("d", 5) == [b"now", b"1"]
    assert await r.llen("d") == 1
