"""A store written by the format-1 engine (tests/data/format1-store) is served
as it is by today's broker, and its heads are written in format 2 by their
next batch: nothing is lost, nothing is doubled."""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from simplequeue.api import JobSpec
from simplequeue.broker.engine import Engine
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore.localfs import LocalStore
from simplequeue.state import Policy

DATA = Path(__file__).parent / "data" / "format1-store"
T1 = 1_900_000_100.0  # after the fixture's times; before its five-year leases end


def engine_on(root: Path) -> Engine:
    settings = CommitSettings(policy=Policy(retention=10 * 365 * 86400, max_attempts=1))
    return Engine(
        GroupCommitter(LocalStore(root), broker_id="b2", settings=settings, clock=lambda: T1)
    )


def copy_of_the_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(DATA, root)
    return root


def head_of(root: Path, topic: str) -> dict[str, Any]:
    head: dict[str, Any] = orjson.loads((root / "topics" / f"{topic}.json").read_bytes())
    return head


async def test_a_format_1_store_is_read_as_it_is(tmp_path: Path) -> None:
    root = copy_of_the_fixture(tmp_path)
    q = engine_on(root)
    counts = await q.status("orders")
    assert counts == {
        "pending": 14,  # the jobs of lane 0 left in two spilled runs
        "delayed": 1,  # "later", due in five years
        "claimed": 2,
        "completed": 26,
        "dead": 18,
        "cancelled": 0,
        "enqueued": 61,
        "total": 61,
    }
    assert (await q.job("orders", "o049"))["status"] == "claimed"
    assert (await q.job("orders", "o049"))["payload"]["n"] == 49
    assert (await q.job("orders", "o008"))["status"] == "completed"  # a record inline
    assert (await q.job("orders", "o000"))["status"] == "completed"  # a record spilled
    dead, _ = await q.dead("orders")
    assert len(dead) == 18 and all(j["last_error"].startswith("boom") for j in dead)
    # Reading wrote nothing: the store is still format 1.
    assert head_of(root, "orders")["format"] == 1
    await q.committer.close()


async def test_the_next_write_upgrades_a_head_and_keeps_everything(tmp_path: Path) -> None:
    root = copy_of_the_fixture(tmp_path)
    q = engine_on(root)
    before = await q.status("orders")
    [answer] = await q.enqueue("orders", [JobSpec("new", id="fresh")])
    assert not answer["duplicate"]
    assert head_of(root, "orders")["format"] == 2
    # Duplicates are still known, live or retained, inline or spilled.
    for old in ("o040", "o049", "o000", "o030", "o041", "later"):
        [again] = await q.enqueue("orders", [JobSpec("again", id=old)])
        assert again["duplicate"], old
    after = await q.status("orders")
    assert after["pending"] == before["pending"] + 1
    assert {k: after[k] for k in ("claimed", "dead", "completed")} == {
        k: before[k] for k in ("claimed", "dead", "completed")
    }
    # The held leases still hold, by their tokens; every pending job comes out once.
    old = orjson.loads((DATA / "topics" / "orders.json").read_bytes())
    token = old["claimed"]["o049"]["lease_token"]
    assert (await q.ack("orders", "o049", token, "late but fine"))["status"] == "completed"
    claimed = await q.claim("orders", "w", count=100)
    ids = [j["id"] for j in claimed]
    assert len(ids) == len(set(ids)) == before["pending"] + 1
    assert "fresh" in ids and "later" not in ids
    await q.committer.close()
    # A second broker reads the upgraded store from scratch and agrees.
    again = engine_on(root)
    counts = await again.status("orders")
    assert (counts["claimed"], counts["pending"], counts["completed"]) == (
        len(ids) + 1,
        0,
        27,
    )
    await again.committer.close()


async def test_a_broker_serves_a_format_1_store(
    tmp_path: Path, start_broker: Callable[..., Awaitable[Any]]
) -> None:
    import aiohttp

    root = copy_of_the_fixture(tmp_path)
    broker = await start_broker(LocalStore(root))
    async with aiohttp.ClientSession() as session:
        async with session.get(broker.url + "/topics") as r:
            topics = (await r.json())["topics"]
        assert set(topics) == {"orders", "emails"}
        # Its times are in 2030: by this machine's clock the job is not due yet.
        assert topics["emails"]["pending"] + topics["emails"]["delayed"] == 1
        async with session.get(broker.url + "/topics/emails/jobs/e1") as r:
            assert (await r.json())["payload"] == "hello"
        async with session.post(
            broker.url + "/topics/emails/enqueue", json={"payload": "hi", "id": "e2"}
        ) as r:
            assert r.status == 201
    assert head_of(root, "emails")["format"] == 2


async def test_a_format_1_job_nacked_without_an_error_is_read_and_upgraded(tmp_path: Path) -> None:
    """Format 1 kept `"last_error": null` for a job nacked without an error
    (the fixture's nacks all say "boom"). Format 2's schema wants a string or
    nothing: such a head was corrupt to it, and the topic answered 500 for
    good instead of being upgraded at its next write (review finding). These
    are the bytes format 1 sealed after enqueue, claim and nack(error=None)."""
    data = (
        b'{"format":1,"topic":"emails","writer":{"broker_id":"v1","epoch":1},'
        b'"write_id":"abc","recent_writes":["abc"],"seq":1,"counters":{"enqueued":1,'
        b'"completed":0,"nacked":1,"dead":0,"dead_dropped":0},"lanes":{"0":{"inline":'
        b'[{"id":"e1","seq":0,"payload":"hello","priority":0,"run_at":1900000051.0,'
        b'"created_at":1900000050.0,"attempts":1,"max_attempts":5,"last_error":null}],'
        b'"runs":[]}},"claimed":{},"retained":{"inline":[],"segs":[]},'
        b'"dead":{"inline":[],"segs":[]}}'
    )
    (tmp_path / "topics").mkdir()
    (tmp_path / "topics" / "emails.json").write_bytes(data)
    q = engine_on(tmp_path)
    assert (await q.job("emails", "e1"))["last_error"] is None
    [job] = await q.claim("emails", "w")
    assert (job["id"], job["attempts"], job["payload"]) == ("e1", 2, "hello")
    assert head_of(tmp_path, "emails")["format"] == 2
    await q.ack("emails", job["id"], job["lease_token"])
    assert (await q.job("emails", "e1"))["status"] == "completed"
    await q.committer.close()
