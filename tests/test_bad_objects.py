"""One bad object stops nothing (SPEC 4.1): a corrupt head answers a clear
error for its own topic, while every other topic, the listing, the status page,
the reaper and the broker's start-up carry on; a bad broker.json is replaced."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from unittest import mock

import aiohttp
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from simplequeue import keys
from simplequeue.api import AckRequest, JobSpec
from simplequeue.broker.engine import Engine
from simplequeue.client import Client
from simplequeue.errors import CorruptData, JobNotFound
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore.memfs import MemStore
from simplequeue.records import read_record
from simplequeue.state import Bounds, Policy, TopicState
from tests.helpers.states import WRITER, fresh

StartBroker = Callable[..., Awaitable[Any]]
GARBAGE = b"\x00 this is not a head"


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as r:
        return r.status, await r.json()


async def test_a_corrupt_topic_answers_its_own_error_and_nothing_else_breaks(
    start_broker: StartBroker,
) -> None:
    store = MemStore()
    broker = await start_broker(store)
    async with Client(broker.url, topic="good") as good, Client(broker.url, topic="bad") as bad:
        await good.enqueue(1)
        await bad.enqueue(1)
    await store.put(keys.head("bad"), GARBAGE)
    fresh = await start_broker(store)  # one that has cached nothing
    async with aiohttp.ClientSession() as session:
        status, body = await get(session, fresh.url + "/topics/bad/status")
        assert status == 500 and "topics/bad.json" in body["error"]
        status, body = await get(session, fresh.url + "/topics")
        assert status == 200
        assert body["topics"]["good"]["pending"] == 1
        assert "topics/bad.json" in body["errors"]["bad"]
        status, overview = await get(session, fresh.url + "/ui/overview")
        assert status == 200
        views = {v["name"]: v for v in overview["topics"]}
        assert "topics/bad.json" in views["bad"]["error"]
        assert views["good"]["counts"]["pending"] == 1


async def test_the_reaper_goes_on_past_a_corrupt_topic(start_broker: StartBroker) -> None:
    """One bad head used to end lease expiry for every topic, even after a restart."""
    store = MemStore()
    seed = await start_broker(store)
    async with Client(seed.url, topic="aaa-bad") as bad, Client(seed.url, topic="zzz") as q:
        await bad.enqueue(1)
        await q.enqueue("x", id="j")
        assert await q.claim("w", lease=0.3)
    await store.put(keys.head("aaa-bad"), GARBAGE)  # listed first by the reaper
    broker = await start_broker(store)
    async with Client(broker.url, topic="zzz") as q:
        for _ in range(200):
            if (await q.status())["pending"] == 1:
                break
            await broker.committer.wait_changed("zzz", 0.05)
        assert (await q.status())["pending"] == 1, "the expired lease was not reaped"


async def test_the_sweeper_says_in_a_line_that_a_corrupt_topic_is_not_swept(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """A topic whose orphans were sighted is swept at every sweep: a corrupt
    one logged its whole stack trace each time (every 10 minutes, for good)."""
    store = MemStore()
    broker = await start_broker(store)
    async with Client(broker.url, topic="bad") as bad:
        await bad.enqueue(1)
    await store.put(keys.head("bad"), GARBAGE)
    fresh = await start_broker(store)
    with caplog.at_level(logging.WARNING, logger="simplequeue.broker.engine"):
        assert await fresh.engine.sweep_all(["bad"]) == []
    [said] = [r for r in caplog.records if "sweeper" in r.getMessage()]
    assert "topics/bad.json" in said.getMessage() and said.exc_info is None


async def test_a_bad_broker_json_is_replaced_and_discovery_works(start_broker: StartBroker) -> None:
    store = MemStore()
    await store.put(keys.BROKER, b'{"broker_id": 7}')
    broker = await start_broker(store)  # starts, and replaces it
    record = await read_record(store)
    assert record is not None and record[0].broker_id == broker.settings.broker_id
    async with await Client.discover(store, topic="t") as q:
        assert q.url == broker.url
        assert await q.enqueue(1)


async def test_discovery_through_a_bad_broker_json_is_a_clear_error() -> None:
    import pytest

    from simplequeue.errors import BrokerUnavailable

    store = MemStore()
    await store.put(keys.BROKER, b"garbage")
    with pytest.raises(BrokerUnavailable, match=r"broker\.json"):
        await asyncio.wait_for(Client.discover(store, topic="t"), 10)


async def test_a_segment_holding_fewer_jobs_than_its_ref_says_is_corrupt(
    start_broker: StartBroker,
) -> None:
    """A segment that reads well but holds fewer jobs than the head's ref to it
    says (one restored from another backup) failed every claim with a bare
    IndexError: a 503 ("commit failed") that clients retry for ever, saying
    nothing of the object (review note). It is corrupt data, named by its
    key, as a segment that does not decode is."""
    from simplequeue.api import JobSpec

    store = MemStore()
    seed = await start_broker(store)
    await seed.engine.enqueue("t", [JobSpec({"pad": "x" * 1000}) for _ in range(100)])
    [key] = [k for k in await store.list("topics/t/") if "/seg-p" in k]
    data, _ = await store.get(key)
    segment = orjson.loads(data)
    segment["items"] = segment["items"][:10]
    await store.put(key, orjson.dumps(segment))
    await seed.stop()  # it holds the segment as it wrote it
    fresh = await start_broker(store)
    async with (
        aiohttp.ClientSession() as session,
        session.post(fresh.url + "/topics/t/claim", json={"worker_id": "w", "count": 100}) as r,
    ):
        status, body = r.status, await r.json()
    assert status == 500 and key in body["error"], body


async def _corrupt_low_lane(store: MemStore, start_broker: StartBroker) -> str:
    """Topic t: 100 jobs at priority 0, spilled to one segment that now holds
    10 (restored from another backup, say), and 3 due at priority 5 (u0..u2),
    written by a broker since stopped; the key of the segment."""
    from simplequeue.api import JobSpec

    seed = await start_broker(store)
    await seed.engine.enqueue("t", [JobSpec({"pad": "x" * 1000}) for _ in range(100)])
    await seed.engine.enqueue("t", [JobSpec("urgent", id=f"u{i}", priority=5) for i in range(3)])
    [key] = [k for k in await store.list("topics/t/") if "/seg-p" in k]
    segment = orjson.loads((await store.get(key))[0])
    segment["items"] = segment["items"][:10]
    await store.put(key, orjson.dumps(segment))
    await seed.stop()  # it holds the segment as it wrote it
    return key


async def test_a_claim_that_meets_a_corrupt_segment_part_way_takes_no_job(
    start_broker: StartBroker,
) -> None:
    """A claim of 10 that took the 3 due jobs of priority 5, then met the
    corrupt segment of priority 0, was answered 500 naming the segment, yet
    its batch was written half-applied: the head held u0..u2 claimed by "w",
    who was never given them, and after 5 such claims they were dead ("lease
    expired", 5 attempts), never delivered. A mutation that meets a corrupt
    object now fails its whole batch, and nothing of it is written."""
    store = MemStore()
    key = await _corrupt_low_lane(store, start_broker)
    before = (await store.get(keys.head("t")))[0]
    fresh = await start_broker(store)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # the first fetches the segment, the second finds it cached
            async with session.post(
                fresh.url + "/topics/t/claim", json={"worker_id": "w", "count": 10}
            ) as r:
                status, body = r.status, await r.json()
            assert status == 500 and key in body["error"], body
    head = orjson.loads((await store.get(keys.head("t")))[0])
    assert [r["id"] for r in head["leases"]["in"]] == [], "claimed by an answer that said 500"
    assert (await store.get(keys.head("t")))[0] == before  # nothing written
    status_of = await fresh.engine.job("t", "u0")
    assert status_of["status"] == "pending" and status_of["attempts"] == 0, status_of


async def test_a_mutation_meeting_a_corrupt_object_fails_alone_and_its_batch_lands_without_it(
    start_broker: StartBroker,
) -> None:
    """The batch is undone and applied again without each mutation that met
    the object, which fails alone (not retried: the object stays corrupt):
    the enqueues committed beside two such claims land, in one write, and
    none of the claims took a job. Failing the whole batch, as first fixed,
    would fail every enqueue that shared a write with a worker's claim."""
    from simplequeue.api import JobSpec
    from simplequeue.broker.engine import Engine
    from simplequeue.errors import CorruptData
    from simplequeue.groupcommit import CommitSettings, GroupCommitter
    from tests.helpers.faults import FaultyStore

    store = MemStore()
    key = await _corrupt_low_lane(store, start_broker)
    faulty = FaultyStore(store)
    q = Engine(GroupCommitter(faulty, broker_id="b2", epoch=2, settings=CommitSettings()))
    try:
        await q.enqueue("t", [JobSpec("first", id="first")])
        faulty.gate = asyncio.Event()
        faulty.put_started.clear()
        slow = asyncio.create_task(q.enqueue("t", [JobSpec("slow", id="slow")]))
        await faulty.put_started.wait()
        puts = faulty.calls["put"]
        claims = [asyncio.create_task(q.claim("t", f"w{i}", count=10)) for i in range(2)]
        mates = [
            asyncio.create_task(q.enqueue("t", [JobSpec("mate", id=f"mate{i}")])) for i in range(2)
        ]
        other = asyncio.create_task(q.enqueue("other", [JobSpec("o", id="o")]))
        await asyncio.sleep(0)  # let them queue behind the write in flight
        faulty.gate.set()
        await slow
        for claim in claims:
            with pytest.raises(CorruptData, match=key):
                await claim
        assert [(await m)[0]["id"] for m in mates] == ["mate0", "mate1"]
        assert (await other)[0]["id"] == "o"
        assert faulty.calls["put"] == puts + 2  # t's batch, in one write, and other's
        head = orjson.loads((await store.get(keys.head("t")))[0])
        assert head["leases"]["in"] == []
        assert (await q.status("t"))["pending"] == 100 + 3 + 4
    finally:
        await q.committer.close()


async def _low_lane_spoiled(store: MemStore, start_broker: StartBroker, how: str) -> str:
    """Topic t: 100 jobs at priority 0 spilled to one segment, spoiled (`how`:
    its bytes garbage, or the object gone), and 3 due at priority 5 (u0..u2),
    written by a broker since stopped; the segment's key."""
    from simplequeue.api import JobSpec

    seed = await start_broker(store)
    await seed.engine.enqueue("t", [JobSpec({"pad": "x" * 1000}) for _ in range(100)])
    await seed.engine.enqueue("t", [JobSpec("urgent", id=f"u{i}", priority=5) for i in range(3)])
    [key] = [k for k in await store.list("topics/t/") if "/seg-p" in k]
    if how == "garbage":
        await store.put(key, b"\x00 not a segment")
    else:
        await store.delete(key)
    await seed.stop()
    return key


@pytest.mark.parametrize("how", ["garbage", "missing"])
async def test_a_claim_meeting_an_unreadable_segment_fails_alone_and_its_batchs_acks_land(
    start_broker: StartBroker, how: str
) -> None:
    """A segment that does not decode, or is gone, is met when the batch
    fetches it (SegmentMissing, then the fetch): that CorruptData failed the
    whole batch, the acks (heartbeats, nacks) committed beside a worker's
    claim that reached the spoiled low-priority lane too. It fails the claim
    alone now, as a segment that decodes but is not the one written does."""
    from simplequeue.broker.engine import Engine
    from simplequeue.errors import CorruptData
    from simplequeue.groupcommit import CommitSettings, GroupCommitter
    from tests.helpers.faults import FaultyStore

    store = MemStore()
    key = await _low_lane_spoiled(store, start_broker, how)
    faulty = FaultyStore(store)
    q = Engine(GroupCommitter(faulty, broker_id="b2", epoch=2, settings=CommitSettings()))
    try:
        held = await q.claim("t", "w", count=3)  # the urgent three: the low lane untouched
        assert sorted(j["id"] for j in held) == ["u0", "u1", "u2"]
        faulty.gate = asyncio.Event()
        faulty.put_started.clear()
        beat = asyncio.create_task(q.heartbeat("t", "u2", held[2]["lease_token"]))
        await faulty.put_started.wait()
        claim = asyncio.create_task(q.claim("t", "w2", count=10))
        acks = [asyncio.create_task(q.ack("t", j["id"], j["lease_token"])) for j in held[:2]]
        await asyncio.sleep(0)  # queued behind the write in flight: one batch
        faulty.gate.set()
        await beat
        with pytest.raises(CorruptData, match=key):
            await claim
        outcomes = await asyncio.gather(*acks, return_exceptions=True)
        assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
        assert (await q.status("t"))["completed"] == 2
    finally:
        await q.committer.close()


class _CountingStore(MemStore):
    """A MemStore that counts the GETs of each key."""

    def __init__(self) -> None:
        super().__init__()
        self.gets: dict[str, int] = {}

    async def get(self, key: str) -> tuple[bytes, str]:
        self.gets[key] = self.gets.get(key, 0) + 1
        return await super().get(key)


# Small bounds: every claim of 40 spills its leases, four loose lease segments
# at most (the oldest two go under a manifest), and a seal compacts one lease
# segment at most (merge_bytes: its first object alone).
LIMITS: dict[str, Any] = {"inline_leases_bytes": 2048, "loose_max": 4, "merge_bytes": 1}


def _half_resolved(
    **limits: Any,
) -> tuple[TopicState, dict[str, bytes], dict[str, tuple[int, str]], bytes]:
    """Topic t, written by the state machine as a broker would: 500 jobs
    (j000..j499), 400 claimed 40 a batch by "w" (their leases in a segment a
    batch, the first two under one manifest), then 35 of the first batch's
    and 30 of the second's acked in one batch: its seal compacted the sparser
    first segment; the second, 10 of its 40 leases live, waits for the next
    seal's lease compaction. The state, the objects written, each claimed
    job's (batch, lease token), and the last head."""
    s = fresh(**limits)
    now = time.time()
    objects: dict[str, bytes] = {}
    writes = 0

    def seal() -> bytes:
        nonlocal writes
        writes += 1
        sealed = s.seal(WRITER, f"{writes:012d}", now)
        for k, data in sealed.new_objects.items():
            s.view.put(k, data)  # type: ignore[attr-defined]
            objects[k] = data
        return sealed.head

    s.enqueue([JobSpec(i, id=f"j{i:03d}") for i in range(500)], now)
    seal()
    claimed: dict[str, tuple[int, str]] = {}
    for b in range(10):
        claimed.update((j["id"], (b, j["lease_token"])) for j in s.claim("w", 3600, 40, now))
        seal()
    for b, n in ((0, 35), (1, 30)):
        for job_id in sorted(k for k, (at, _) in claimed.items() if at == b)[:n]:
            s.ack(job_id, claimed[job_id][1], None, now)
    return s, objects, claimed, seal()


async def _sparse_lease_segment_spoiled(
    store: MemStore, how: str
) -> tuple[str, dict[str, tuple[int, str]]]:
    """_half_resolved's topic t in `store`, its second batch's lease segment
    (10 of 40 live, waiting for the next seal's lease compaction) spoiled
    (`how`: its bytes garbage, the object gone, or holding 10 records, not
    40). Its key, and each claimed job's (batch, lease token)."""
    s, objects, claimed, head = _half_resolved(**LIMITS)
    first = s.leases.d["mans"][0]
    spoiled = s.leases.manifest(first["k"]).refs[1]["k"]  # the second batch's leases
    assert s.leases.d["mans"][0]["live"] == 10  # the first segment compacted, not the second
    for k, data in objects.items():
        await store.put(k, data)
    await store.put(keys.head("t"), head)
    key = keys.segment("t", spoiled)
    if how == "garbage":
        await store.put(key, b"\x00 not a segment")
    elif how == "missing":
        await store.delete(key)
    else:
        segment = orjson.loads(objects[key])
        segment["items"] = segment["items"][:10]
        await store.put(key, orjson.dumps(segment))
    return key, claimed


@pytest.mark.parametrize("how", ["garbage", "missing", "short"])
async def test_a_corrupt_object_only_upkeep_wants_is_skipped_and_the_topic_takes_writes(
    caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """A lease segment half resolved, which the next seal's lease compaction
    reads, is corrupt: every batch of the topic met it at its seal and failed
    whole (nothing to blame but the tidying), every enqueue, claim and ack
    answered 500 until an operator mended it. The seal's upkeep now leaves
    the object alone (its refs as they are), once known bad not fetched
    again for it, and the batch lands: every job not in it is delivered
    once, and only an ack of a lease it holds fails (alone). A segment that
    reads but holds fewer records than its ref says is met inside the seal
    (CorruptData, not a fetch): the same."""
    from simplequeue.api import JobSpec
    from simplequeue.broker.engine import Engine
    from simplequeue.errors import CorruptData, SimpleQueueError
    from simplequeue.groupcommit import CommitSettings, GroupCommitter
    from simplequeue.state import Bounds

    store = _CountingStore()
    key, claimed = await _sparse_lease_segment_spoiled(store, how)
    settings = CommitSettings(bounds=Bounds(**LIMITS))
    q = Engine(GroupCommitter(store, broker_id="b2", epoch=2, settings=settings))
    delivered: list[str] = []
    try:
        with caplog.at_level(logging.ERROR, logger="simplequeue.groupcommit"):
            for n in range(30):  # each its own batch, and seal
                await q.enqueue("t", [JobSpec(n, id=f"new{n:02d}")])
                jobs = await q.claim("t", "w2", count=5, lease=3600)
                delivered += [j["id"] for j in jobs]
                for j in jobs:
                    await q.ack("t", j["id"], j["lease_token"])
        assert store.gets.get(key) == 1, "fetched again for the seals' upkeep"
        assert [r.getMessage() for r in caplog.records if key in r.getMessage()] != []
        assert len([r for r in caplog.records if key in r.getMessage()]) == 1  # logged once
        # The leases held by "w": those in the corrupt segment cannot be
        # found (each ack fails alone: CorruptData, or for the short one
        # not found), every other one is acked.
        spoiled = orjson.loads((await store.get(keys.head("t")))[0])
        assert any(m["live"] == 10 for m in spoiled["leases"]["mans"])  # its refs as they were
        lost = []
        for job_id, (b, token) in sorted(claimed.items()):
            if (b == 0 and job_id < "j035") or (b == 1 and job_id < "j070"):
                continue  # acked before
            try:
                await q.ack("t", job_id, token)
            except SimpleQueueError as exc:
                assert how == "short" or (isinstance(exc, CorruptData) and key in str(exc))
                lost.append(job_id)
        assert lost == [f"j{i:03d}" for i in range(70, 80)]
        while jobs := await q.claim("t", "w3", count=50, lease=3600):
            delivered += [j["id"] for j in jobs]
            for j in jobs:
                await q.ack("t", j["id"], j["lease_token"])
        expected = [f"j{i:03d}" for i in range(400, 500)] + [f"new{n:02d}" for n in range(30)]
        assert sorted(delivered) == sorted(expected)  # each once
        status = await q.status("t")
        assert status["completed"] == 500 + 30 - 10 and status["claimed"] == 10, status
    finally:
        await q.committer.close()


def test_a_run_merge_leaves_a_run_whose_front_is_unreadable_and_merges_the_others() -> None:
    """The state machine: a lane of 8 runs (4 jobs each, one segment a run)
    takes a ninth, and its merge marks the first eight; the first's segment
    is known unreadable. The merge reads every source's front before it
    moves a job: the seal raised SegmentMissing for it at every write. That
    run now leaves the merge as it is (a "stay" no job has, so it is not
    marked again), the others merge, and once the segment reads again every
    job is there, once."""
    from simplequeue.api import JobSpec
    from tests.helpers.states import WRITER, fresh

    s = fresh(inline_pending_bytes=1, merge_bytes=300)
    now, writes = 1000.0, 0

    def seal(unreadable: frozenset[str] = frozenset()) -> None:
        nonlocal writes
        writes += 1
        sealed = s.seal(WRITER, f"{writes:012d}", now, unreadable)
        for k, data in sealed.new_objects.items():
            s.view.put(k, data)  # type: ignore[attr-defined]

    def spill(i: int) -> None:  # a run of its own: its jobs come before every other run's
        s.enqueue([JobSpec(i, id=f"r{i}-{k}", delay=1000 - i * 10 + k) for k in range(4)], now)

    for i in range(8):
        spill(i)
        seal()
    lane = s.head["lanes"]["0"]
    first = lane["runs"][0]
    ref = dict(first["segs"][0])
    key = keys.segment("t", ref["k"])
    held = s.view.objects.pop(key)  # type: ignore[attr-defined]
    for i in range(8, 40):
        spill(i)
        seal(frozenset({key}))  # raised SegmentMissing(key) before
        assert first in lane["runs"] and first["segs"] == [ref], "its ref changed"
        assert "merge" not in first
        assert s.counts(now)["pending"] + s.counts(now)["delayed"] == 4 * (i + 1)
    assert len(lane["runs"]) <= 2 * s.bounds.runs_max + 2  # the others merged
    s.view.objects[key] = held  # type: ignore[attr-defined]  # mended
    seal()
    now += 10_000
    claimed = [j["id"] for j in s.claim("w", 60, 1000, now)]
    assert sorted(claimed) == sorted(f"r{i}-{k}" for i in range(40) for k in range(4))


FRONT: dict[str, str] = {}


def _short(data: bytes) -> bytes:
    """A segment that reads, holding one item fewer than written (one
    restored from another backup)."""
    segment = orjson.loads(data)
    segment["items"] = segment["items"][:-1]
    return orjson.dumps(segment)


async def _written(store: MemStore, **limits: Any) -> dict[str, tuple[int, str]]:
    """_half_resolved's topic t, in `store`. Each claimed job's (batch, lease token)."""
    s, objects, claimed, head = _half_resolved(**{**LIMITS, **limits})
    [run] = s.head["lanes"]["0"]["runs"]
    place = s._chain(run).first()
    assert place is not None and place.seg is not None and place.item["id"] == "j400"
    FRONT["t"] = keys.segment("t", place.seg)
    for k, data in objects.items():
        await store.put(k, data)
    await store.put(keys.head("t"), head)
    return claimed


def _engine(store: MemStore, **limits: Any) -> Engine:
    settings = CommitSettings(bounds=Bounds(**{**LIMITS, **limits}))
    return Engine(GroupCommitter(store, broker_id="b2", epoch=2, settings=settings))


async def test_a_short_run_front_does_not_stop_the_topics_writes() -> None:
    """The pending run's front segment reads, but holds one job fewer than
    its ref says (the last, j499). Only a claim reaches it. Enqueues and the
    acks of leases elsewhere should be served, as the commit promises for an
    object only upkeep wants: but every fetch round reads ahead through
    prefetch(), whose probe of the runs' fronts reads the cached short
    segment and raises CorruptData (layout._probe catches SegmentMissing
    only). A seal whose upkeep misses any object (here the lease segment its
    compaction wants) then loops 64 rounds and fails CacheTooSmall, each
    time; an ack whose lease segment is not cached fails CorruptData naming
    the run's segment."""
    store = MemStore()
    claimed = await _written(store)
    front = FRONT["t"]
    await store.put(front, _short((await store.get(front))[0]))
    q = _engine(store)
    failed: list[str] = []
    try:
        with pytest.raises(CorruptData, match=front):  # a claim reaches it: fails alone
            await q.claim("t", "w2", count=1, lease=3600)
        for n in range(10):
            try:
                await q.enqueue("t", [JobSpec(n, id=f"new{n:02d}")])
            except Exception as exc:
                failed.append(f"enqueue: {type(exc).__name__}: {exc}")
        for job_id, (b, token) in sorted(claimed.items()):
            if b < 2:
                continue  # acked before, or in the lease segment compaction wants
            try:
                await q.ack("t", job_id, token)
            except Exception as exc:
                failed.append(f"ack {job_id}: {type(exc).__name__}: {exc}")
        kinds = Counter(f.split(" ", 1)[0] + " " + f.split(": ")[1] for f in failed)
        assert failed == [], f"{dict(kinds)}; the first: {failed[:1]}"
    finally:
        await q.committer.close()


async def test_ack_many_says_which_acks_landed_when_one_meets_a_corrupt_segment() -> None:
    """ack_many commits each ack as its own entry: one whose lease sits in a
    corrupt segment fails alone (CorruptData), the batch landing without it.
    The engine raised that CorruptData for the whole request (HTTP 500): the
    caller was told none of its acks was done though the others landed, and
    its retry met "conflict" for each of them, as for a lease lost. The acks
    that landed are answered completed, the other "error"."""
    store = MemStore()
    claimed = await _written(store)
    head = orjson.loads((await store.get(keys.head("t")))[0])
    bad = keys.segment("t", head["leases"]["segs"][-1]["k"])
    in_bad = {r["id"] for r in orjson.loads((await store.get(bad))[0])["items"]}
    await store.put(bad, b"\x00 not a segment")
    spoiled = sorted(in_bad)[0]
    good = sorted(j for j, (b, _) in claimed.items() if b == 8)[0]  # a good loose segment
    q = _engine(store)
    try:
        acks = [AckRequest(good, claimed[good][1]), AckRequest(spoiled, claimed[spoiled][1])]
        answers = await q.ack_many("t", acks)
        assert (await q.status("t"))["completed"] == 65 + 1  # _half_resolved's, and the good one
        assert [a["status"] for a in answers] == ["completed", "error"], answers
        assert bad in answers[1]["error"]
        with pytest.raises(CorruptData, match=bad):  # alone, nothing landed: the request fails
            await q.ack_many("t", [AckRequest(spoiled, claimed[spoiled][1])])
    finally:
        await q.committer.close()


async def test_a_fold_writes_no_manifest_that_cannot_be_read_of_a_short_segment() -> None:
    """A run's second loose segment reads but holds 4 jobs where its ref says
    5 (restored from another backup). No request reads it before the seal's
    fold takes it under a manifest: Chain.fold reads the segment's items
    unchecked (segment(), not items(ref)) and writes the id index of 4 ids
    for a ref of 5. That manifest fails its own check whenever it is read
    again: once the segment is mended, and on every other broker, it is the
    run's front, and not one of the run's 30 jobs can be claimed (the
    upkeep made an object bad that holds a good segment's jobs too, and the
    corruption outlives the mend). The fold should read items(ref) (CorruptData in the seal: the
    object is known bad, and _readable stops the fold there)."""
    limits = {"inline_pending_bytes": 1, "loose_max": 4, "merge_bytes": 65536}
    store = MemStore()
    q = _engine(store, **limits)
    ids = [f"a{b}{i}" for b in range(6) for i in range(5)]
    try:
        for b in range(2):  # two loose segments of one run
            await q.enqueue("t", [JobSpec(i, id=f"a{b}{i}") for i in range(5)])
    finally:
        await q.committer.close()
    head = orjson.loads((await store.get(keys.head("t")))[0])
    [run] = head["lanes"]["0"]["runs"]
    assert [r["n"] for r in run["segs"]] == [5, 5] and not run["mans"]
    second = keys.segment("t", run["segs"][1]["k"])
    written = (await store.get(second))[0]
    await store.put(second, _short(written))
    q = _engine(store, **limits)  # a broker that has read nothing of t
    try:
        for b in range(2, 6):  # past loose_max: the oldest two are folded
            await q.enqueue("t", [JobSpec(i, id=f"a{b}{i}") for i in range(5)])
    finally:
        await q.committer.close()
    await store.put(second, written)  # mended
    q = _engine(store, **limits)
    claimed: list[str] = []
    try:
        while jobs := await q.claim("t", "w", count=50, lease=3600):
            claimed += [j["id"] for j in jobs]
    except CorruptData as exc:
        pytest.fail(f"{len(claimed)} of {len(ids)} claimed after the mend, then: {exc}")
    finally:
        await q.committer.close()
    assert sorted(claimed) == sorted(ids)


# --- a property: a random object spoiled mid-run, every job outside it once ------------------


def _prop_limits(rnd: random.Random) -> dict[str, Any]:
    """Small bounds, so that a few dozen writes spill, fold, merge and compact."""
    return {
        "inline_pending_bytes": rnd.choice([1, 300, 2000]),
        "inline_leases_bytes": rnd.choice([1, 300]),
        "inline_records_bytes": rnd.choice([1, 300]),
        "inline_dead_bytes": 300,
        "loose_max": rnd.choice([2, 4]),
        "manifests_max": rnd.choice([1, 2]),
        "holes_max": rnd.choice([1, 4]),
        "runs_max": rnd.choice([1, 2, 3]),
        "merge_bytes": rnd.choice([1, 200, 400, 5000]),
        "manifest_bytes": rnd.choice([500, 2000]),
        "segment_bytes": rnd.choice([200, 600]),
        "upkeep_bytes": rnd.choice([2000, 20000]),
    }


async def _spoil(store: MemStore, key: str, how: str) -> bytes:
    """Spoil `key` (garbage, gone, or one item short); its bytes as written."""
    data, _ = await store.get(key)
    if how == "missing":
        await store.delete(key)
    elif how == "short" and len(orjson.loads(data).get("items", ())) > 1:
        await store.put(key, _short(data))
    else:
        await store.put(key, b"\x00 garbage")
    return data


async def _spoiled_run(seed: int) -> list[str]:
    """Two brokers (own caches, own known-bad sets) serve one topic, taking
    turns at random: enqueues (3 priorities, some delayed), claims, acks,
    nacks, heartbeats, the clock moving on (retention 50 s). One or two
    objects of the topic (any segment or manifest, not the head) are spoiled
    at random points, and the broker after each restarted (it reads them
    cold); maybe they are mended part-way. Requests may fail CorruptData
    naming a spoiled object (they reached it), nothing else. At the end,
    every object mended and a fresh broker draining the topic: every job
    enqueued was delivered exactly once (plus once a nack), none lost."""
    rnd = random.Random(seed)
    limits = _prop_limits(rnd)
    store = MemStore()
    now = [1_000_000.0]
    caches = [rnd.choice([1 << 30, 1 << 30, 400_000]) for _ in range(2)]

    def broker(name: str, cache: int) -> Engine:
        settings = CommitSettings(
            bounds=Bounds(**limits),
            policy=Policy(retention=50.0, max_attempts=0),
            cache_bytes=cache,
            linger=0,
            linger_max=0,
        )
        committer = GroupCommitter(store, broker_id=name, settings=settings, clock=lambda: now[0])
        return Engine(committer)

    qs = [broker("a0", caches[0]), broker("b0", caches[1])]
    enqueued: set[str] = set()
    refused: set[str] = set()
    delivered: Counter[str] = Counter()
    nacked: Counter[str] = Counter()
    held: dict[str, str] = {}
    problems: list[str] = []
    steps = rnd.randint(30, 150)
    spoil_at = sorted(rnd.sample(range(3, steps - 3), rnd.choice([1, 2])))
    mend_at = rnd.choice([None, rnd.randint(spoil_at[-1], steps)])
    spoiled: dict[str, bytes] = {}
    hows: dict[str, str] = {}
    for step in range(steps):
        if step in spoil_at:
            objects = [k for k in await store.list("topics/t/") if k not in spoiled]
            if objects:
                key = rnd.choice(objects)
                hows[key] = rnd.choice(["garbage", "missing", "short"])
                spoiled[key] = await _spoil(store, key, hows[key])
            who = rnd.randrange(2)
            await qs[who].committer.close()
            qs[who] = broker(f"{'ab'[who]}{step}", caches[who])
        if step == mend_at:
            for key, data in spoiled.items():
                await store.put(key, data)
        q = qs[rnd.randrange(2)]
        op = rnd.random()
        try:
            if op < 0.35:
                specs = [
                    JobSpec(
                        {"x": "y" * rnd.randint(1, 80)},
                        id=f"j{step:03d}-{i}",
                        priority=rnd.choice([0, 0, 1, 2]),
                        delay=rnd.choice([0, 0, 0, 5, 30]),
                    )
                    for i in range(rnd.randint(1, 6))
                ]
                try:
                    await q.enqueue("t", specs)
                    enqueued.update(s.id for s in specs if s.id)
                except CorruptData:
                    refused.update(s.id for s in specs if s.id)
            elif op < 0.6:
                for job in await q.claim("t", "w", count=rnd.randint(1, 8), lease=3600):
                    delivered[job["id"]] += 1
                    held[job["id"]] = job["lease_token"]
            elif held:
                job_id = rnd.choice(sorted(held))
                try:
                    if op < 0.8:
                        await q.ack("t", job_id, held.pop(job_id))
                    elif op < 0.86:
                        await q.nack("t", job_id, held.pop(job_id), delay=rnd.choice([0, 10]))
                        nacked[job_id] += 1
                    elif op < 0.92:
                        await q.heartbeat("t", job_id, held[job_id], 3600)
                    else:
                        now[0] += rnd.choice([1, 10, 40])
                except (CorruptData, JobNotFound):
                    pass  # its lease in a spoiled object: left claimed
        except CorruptData as exc:
            if not any(key in str(exc) for key in spoiled):
                problems.append(f"step {step}: not a spoiled object's: {exc}")
        except Exception as exc:
            problems.append(f"step {step}: {type(exc).__name__}: {exc}")
    for key, data in spoiled.items():
        await store.put(key, data)
    for q in qs:
        await q.committer.close()
    now[0] += 100
    q = broker("z", 1 << 30)
    try:
        while jobs := await q.claim("t", "w2", count=50, lease=3600):
            for job in jobs:
                delivered[job["id"]] += 1
                await q.ack("t", job["id"], job["lease_token"])
    except Exception as exc:
        problems.append(f"drain: {type(exc).__name__}: {exc}")
    finally:
        await q.committer.close()
    twice = sorted(k for k, n in delivered.items() if n > 1 + nacked[k])
    lost = sorted(enqueued - set(delivered))
    if twice:
        problems.append(f"{len(twice)} delivered twice: {twice[:5]}")
    if lost:
        problems.append(f"{len(lost)} lost: {lost[:5]}")
    if set(delivered) & refused:
        problems.append(f"refused, and delivered: {sorted(set(delivered) & refused)[:5]}")
    if problems:
        problems.insert(0, f"spoiled {hows} at steps {spoil_at}, mended at {mend_at}")
    return problems


class _SeededIds:
    """uuid.uuid4 from a seeded generator: write ids (and so the objects'
    names, and which one a seed spoils) the same at every run."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)

    def uuid4(self) -> uuid.UUID:
        return uuid.UUID(int=self.rnd.getrandbits(128), version=4)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 10**6))
@example(seed=156)  # a short run front: writes fail CacheTooSmall (a fetch round's probe)
@example(seed=363)  # a short segment folded: its manifest unreadable, 66 jobs lost
def test_a_spoiled_object_loses_or_doubles_no_job_outside_it(seed: int) -> None:
    with mock.patch("uuid.uuid4", _SeededIds(seed).uuid4):
        problems = asyncio.run(_spoiled_run(seed))
    assert problems == []


def test_retention_drops_an_unreadable_loose_segment_past_it_and_the_head_stays_bounded() -> None:
    """A retained records' loose segment is known unreadable (a broker
    fetched it for a fold: garbage). Retention now stops at it, and folds
    take none from it on: every retained spill after it adds a loose ref to
    the head, for ever (it is never read again, so never mended). With the
    default bounds that is ~0.6 B a job acked: 200,000 acks on, 2,001 loose
    refs and a 122 KB head, past 256 KB at ~430,000, each write rewriting
    it; here (small bounds) 600+ refs after 1,200 acks. Its records are past
    retention, as its ref's `hi` says: dropping a loose segment reads
    nothing (Chain.drop_front_while), so retention can drop it (only a
    manifest is read as it goes), and the chain's refs stay bounded."""
    s = fresh(inline_records_bytes=600, loose_max=4, retention=10.0)
    now, writes, n = 1_000_000.0, 0, 0
    unreadable: frozenset[str] = frozenset()

    def cycle() -> None:
        nonlocal writes, n
        s.enqueue([JobSpec(i, id=f"j{n + i}") for i in range(5)], now)
        n += 5
        for job in s.claim("w", 60, 5, now):
            s.ack(job["id"], job["lease_token"], None, now)
        writes += 1
        sealed = s.seal(WRITER, f"{writes:012d}", now, unreadable)
        for k, data in sealed.new_objects.items():
            s.view.put(k, data)  # type: ignore[attr-defined]

    for _ in range(5):
        cycle()
    retained = s.head["retained"]
    first = retained["segs"][0]["k"]
    unreadable = frozenset({keys.segment("t", first)})
    for _ in range(240):  # 1,200 acks over 240 s: 24 times the retention
        now += 1
        cycle()
    assert [r["k"] for r in retained["segs"]].count(first) == 0, "kept past retention"
    assert len(retained["segs"]) <= 2 * s.bounds.loose_max, f"{len(retained['segs'])} loose refs"


async def test_a_bad_loose_lease_segment_fails_only_the_acks_of_its_own_leases() -> None:
    """As the commit's own test, with the corrupt lease segment loose (the
    the newest: garbage) instead of under a manifest. The
    commit keeps the topic claiming (before, its upkeep stopped every write
    once it wanted the segment), and says only the acks of the corrupt
    segment's leases fail. But an ack finds a spilled lease by reading every
    loose lease segment (Chain.locate): the acks of the 40 leases of batch
    8, none in it, fail too (CorruptData naming it), as does
    every ack of a lease spilled later, at every broker that reads it: the
    jobs run again once their leases run out (doubled work), for as long as
    the topic keeps claiming. A lease found in another segment is the job's
    one live place: the bad segment need not be read for it."""
    store = MemStore()
    claimed = await _written(store)
    head = orjson.loads((await store.get(keys.head("t")))[0])
    loose = [keys.segment("t", r["k"]) for r in head["leases"]["segs"]]
    assert len(loose) >= 2
    bad = loose[-1]
    held = {r["id"] for r in orjson.loads((await store.get(bad))[0])["items"]}
    batch8 = {job_id for job_id, (b, _) in claimed.items() if b == 8}
    assert held and not held & batch8  # batch 8's leases are elsewhere
    await store.put(bad, b"\x00 not a segment")
    q = _engine(store)
    failed: Counter[str] = Counter()
    try:
        for job_id, (b, token) in sorted(claimed.items()):
            if b != 8:
                continue  # the batch before: its leases in a good loose segment
            try:
                await q.ack("t", job_id, token)
            except CorruptData as exc:
                assert bad in str(exc)
                failed[f"batch {b}"] += 1
        assert not failed, f"acks failed, naming {bad}: {dict(failed)}"
    finally:
        await q.committer.close()
