"""The Python SDK against a real broker over a real socket: every method,
errors, the sync client, discovery and re-discovery."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from simplequeue.client import Client, Job, SyncClient
from simplequeue.errors import (
    BrokerUnavailable,
    InvalidRequest,
    JobNotFound,
    LeaseLost,
    Unauthorized,
)
from simplequeue.objstore.localfs import LocalStore
from simplequeue.objstore.memfs import MemStore

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


async def test_claim_on_an_empty_topic_is_none(q: Client) -> None:
    assert await q.claim("w") is None
    assert await q.claim_many("w", 5) == []


async def test_enqueue_with_an_existing_id_returns_it_without_a_second_job(q: Client) -> None:
    assert await q.enqueue(1, id="same") == "same"
    assert await q.enqueue(2, id="same") == "same"
    assert (await q.status())["enqueued"] == 1


async def test_enqueue_many_and_claim_many(q: Client) -> None:
    ids = await q.enqueue_many([{"payload": "a", "id": "x1"}, "b", {"payload": {"c": 3}}])
    assert ids[0] == "x1" and len(ids) == 3
    jobs = await q.claim_many("w", 10)
    assert [j.payload for j in jobs] == ["a", "b", {"c": 3}]
    results = await q.ack_many([(j, j.payload) for j in jobs])
    assert [r["status"] for r in results] == ["completed"] * 3


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


async def test_heartbeat_extends_the_lease(q: Client) -> None:
    await q.enqueue("x")
    job = await q.claim("w", lease=5)
    assert job is not None and job.lease_expires_at is not None
    assert await q.heartbeat(job, lease=100) > job.lease_expires_at + 50


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


async def test_sync_client_raises_the_same_errors(start_broker: StartBroker) -> None:
    broker = await start_broker(MemStore())

    def script() -> None:
        with SyncClient(broker.url) as q, pytest.raises(JobNotFound):
            q.job("ghost")

    await asyncio.to_thread(script)


async def test_sync_client_for_topic_and_job_dict(start_broker: StartBroker) -> None:
    broker = await start_broker(MemStore())

    def script() -> dict[str, Any]:
        with SyncClient(broker.url, topic="a") as q, q.for_topic("b") as other:
            job_id = other.enqueue("x")
            assert q.status()["pending"] == 0
            return other.job_dict(job_id)

    job = await asyncio.to_thread(script)
    assert (job["payload"], job["status"]) == ("x", "pending")


# --- discovery ------------------------------------------------------------------------


async def test_discover_finds_the_active_broker(start_broker: StartBroker, tmp_path: Path) -> None:
    broker = await start_broker(LocalStore(tmp_path))
    async with await Client.discover(LocalStore(tmp_path), max_age=30, topic="t") as q:
        assert q.url == broker.url
        await q.enqueue("found")
        assert (await q.status())["pending"] == 1


async def test_discover_refuses_a_stale_record(start_broker: StartBroker, tmp_path: Path) -> None:
    broker = await start_broker(LocalStore(tmp_path))
    await broker.stop()  # resigns: heartbeat_at = 0
    with pytest.raises(BrokerUnavailable, match="old"):
        await Client.discover(LocalStore(tmp_path), max_age=30)


async def test_discover_with_no_broker_ever(tmp_path: Path) -> None:
    with pytest.raises(BrokerUnavailable, match="no broker"):
        await Client.discover(LocalStore(tmp_path))


async def test_client_rediscovers_when_its_broker_dies(broker_process: Any, tmp_path: Path) -> None:
    first = broker_process("--dir", str(tmp_path), "--broker-lease", "1")
    async with await Client.discover(
        f"file://{tmp_path}", max_age=30, topic="t", retries=30, retry_budget=30
    ) as q:
        assert q.url == first.url
        await q.enqueue("before", id="a")
        standby = broker_process("--dir", str(tmp_path), "--broker-lease", "1")
        first.kill()
        await q.enqueue("after", id="b")  # retried until broker.json names the standby
        assert q.url == standby.url
        assert (await q.status())["pending"] == 2


async def test_sync_discover(start_broker: StartBroker, tmp_path: Path) -> None:
    broker = await start_broker(LocalStore(tmp_path))

    def script() -> str:
        with SyncClient.discover(f"file://{tmp_path}", topic="t") as q:
            return q.url

    assert await asyncio.to_thread(script) == broker.url


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
