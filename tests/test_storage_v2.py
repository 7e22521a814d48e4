"""Storage engine v2 under the committer: the faults of the format-1 core, each
closed, and the bounds that must hold (SPEC 4.1, 4.2)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import random
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from simplequeue import keys
from simplequeue.api import AckRequest, JobSpec
from simplequeue.broker.engine import Engine
from simplequeue.cache import ObjectCache
from simplequeue.errors import CorruptData, InvalidRequest
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore.memfs import MemStore
from simplequeue.state import Bounds, Policy, TopicState, decode_head
from simplequeue.state.segments import Segment
from tests.helpers import states
from tests.helpers.faults import FaultyStore
from tests.helpers.states import assert_held_as_written
from tests.helpers.until import until

SMALL = Bounds(
    inline_pending_bytes=2000,
    inline_leases_bytes=2000,
    inline_records_bytes=1000,
    inline_dead_bytes=1000,
    loose_max=4,
)


def engine_on(
    store: Any, broker_id: str = "b1", clock: list[float] | None = None, **settings: Any
) -> Engine:
    """An engine on `store` (at SMALL bounds unless told), on the time in
    `clock`[0] if given (the wall clock else)."""
    settings.setdefault("bounds", SMALL)
    committer = GroupCommitter(store, broker_id=broker_id, settings=CommitSettings(**settings))
    if clock is not None:
        committer.clock = lambda: clock[0]
    return Engine(committer)


async def head_of(store: Any, topic: str = "t") -> dict[str, Any]:
    data, _ = await store.get(keys.head(topic))
    head: dict[str, Any] = orjson.loads(data)
    return head


def jobs(n: int, prefix: str = "j", size: int = 100) -> list[JobSpec]:
    return [JobSpec({"n": i, "pad": "x" * size}, id=f"{prefix}{i:05d}") for i in range(n)]


# --- ambiguous writes -----------------------------------------------------------------


async def test_an_ambiguous_write_is_resolved_however_many_writes_others_made() -> None:
    """The head kept the last 64 write ids of all brokers: while one broker's
    answer was lost, others wrote 64 times, the landed batch was judged not
    landed and applied again (here: a second job claimed)."""
    shared = MemStore()
    store = FaultyStore(shared)
    a, b = engine_on(store, "a"), engine_on(shared, "b")
    await a.enqueue("t", jobs(10))

    async def others_write_a_hundred_times() -> None:
        for i in range(100):
            await b.enqueue("t", [JobSpec(i)])

    store.meanwhile = others_write_a_hundred_times
    store.faults = ["lose-answer"]
    [claimed] = await a.claim("t", "w")
    counts = await b.status("t")
    assert counts["claimed"] == 1, "the claim was applied twice"
    assert (await b.job("t", claimed["id"]))["lease_token"] == claimed["lease_token"]
    assert (await head_of(shared))["writers"]["a"]  # each broker's latest write id


# --- deletion is deferred to the sweep ---------------------------------------------------


async def test_a_broker_holding_an_older_head_still_finds_its_segments() -> None:
    """Segments used to be deleted right after the commit that unreferenced them,
    while another broker that had just read the older head still wanted them."""
    store = MemStore()
    writer, consumer = engine_on(store, "w"), engine_on(store, "c")
    for i in range(4):
        await writer.enqueue("t", jobs(20, prefix=f"b{i}-"))
    stale = engine_on(store, "s", max_age=3600)
    assert (await stale.status("t"))["pending"] == 80  # it read the head, not the segments
    assert (await head_of(store))["lanes"]["0"]["runs"]
    while await consumer.claim("t", "w", count=50):  # consumes every segment
        pass
    # The stale broker's head still names the consumed segments: they are there.
    found = await stale.committer.read("t", lambda s, now: s.find("b0-00003"), max_age=3600)
    assert found is not None
    # And a claim through it finds the head moved and claims nothing twice.
    assert await stale.claim("t", "w") == []


async def test_a_segment_gone_after_the_sweep_means_the_head_moved_not_an_error() -> None:
    store = MemStore()
    writer = engine_on(store, "w")
    for i in range(4):
        await writer.enqueue("t", jobs(20, prefix=f"b{i}-"))
    old_reader = engine_on(store, "r", max_age=3600)
    assert (await old_reader.status("t"))["pending"] == 80
    while claimed := await writer.claim("t", "w", count=50):  # done: nothing pins them
        await writer.ack_many("t", [AckRequest(j["id"], j["lease_token"]) for j in claimed])
    assert await writer.committer.sweep("t") == []  # first sighting: kept
    assert await writer.committer.sweep("t")  # second: the consumed segments go
    # The old reader's head names deleted segments: it reads the head again.
    assert await old_reader.claim("t", "w") == []
    assert (await old_reader.status("t"))["completed"] == 80


async def test_orphans_of_a_topic_idle_between_two_sweeps_are_deleted(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """A sweep's first sightings were kept in the topic's state, which leaves
    memory once idle (600 s, 60 s past 1,000 topics held), while sweeps come
    every 600 s: a topic that went quiet was forgotten between two sweeps,
    each sweep a first sighting, nothing deleted. And once its last write was
    two sweeps old, the topic was not swept again: the orphans of its last
    minutes of activity stayed for ever. Here the topic leaves memory after
    each sweep (idle_after = idle_max = 0 stand for ten idle minutes), and its
    last write is past two sweeps when the second comes."""
    store = MemStore()
    broker = await start_broker(store)  # sweep_interval 600 s: its loop sweeps nothing here
    engine, committer = broker.engine, broker.committer
    for i in range(6):  # spills pending segments
        await engine.enqueue("t", jobs(40, prefix=f"b{i}-", size=1000))
    while claimed := await engine.claim("t", "w", count=100):
        await engine.ack_many("t", [AckRequest(j["id"], j["lease_token"]) for j in claimed])
    referenced = await committer.read("t", lambda s, now: s.referenced())
    orphans = set(await store.list(keys.segments_prefix("t"))) - set(referenced)
    assert orphans
    committer.settings = dataclasses.replace(committer.settings, idle_after=0.0, idle_max=0.0)
    await broker.duties._sweep()  # the first sighting
    assert committer.forget_idle() == 1
    broker.duties._written.clear()  # its last write two sweeps old
    await broker.duties._sweep()
    assert not orphans & set(await store.list(keys.segments_prefix("t")))
    assert (await engine.status("t"))["completed"] == 240


# --- one bad object -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01 not json",
        b'{"format": 2, "topic": "t", "lan',  # truncated
        b'{"hello": "world"}',  # foreign
        b'{"format": 99, "topic": "t", "counters": {}}',  # from the future
        b'{"format": 2, "topic": "other", "counters": {}}',  # another topic's head
        b'{"format": 2, "topic": "t", "counters": {}}',  # JSON, a head's header, no body
        b'{"format": 1, "topic": "t", "counters": {}, "lanes": {"0": 7}}',  # a bad format 1
        b'{"format": 2, "topic": "t", "writer": null, "write_id": null, "writers": {},'
        b' "seq": 0, "next": 0, "counters": {}, "lanes": {"0": []},'
        b' "leases": {}, "retained": {}, "dead": {}}',  # a lane that is no lane
    ],
    ids=[
        "binary",
        "truncated",
        "foreign",
        "future",
        "other-topic",
        "no-body",
        "bad-format-1",
        "bad-lane",
    ],
)
async def test_a_corrupt_head_is_a_clear_error_naming_it_logged_once(
    garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemStore()
    q = engine_on(store)
    await q.enqueue("t", [JobSpec(1)])
    await q.enqueue("fine", [JobSpec(1)])
    await store.put("topics/t.json", garbage)
    fresh = engine_on(store, "b2")
    with caplog.at_level(logging.ERROR, logger="simplequeue.groupcommit"):
        for _ in range(3):
            with pytest.raises(CorruptData, match=r"topics/t\.json"):
                await fresh.status("t")
            with pytest.raises(CorruptData, match=r"topics/t\.json"):
                await fresh.enqueue("t", [JobSpec(2)])
    logged = [r for r in caplog.records if "topics/t.json" in r.getMessage()]
    assert len(logged) == 1
    assert (await fresh.status("fine"))["pending"] == 1  # every other topic works
    assert await store.get("topics/t.json") == (garbage, (await store.get("topics/t.json"))[1])


async def test_a_corrupt_segment_is_a_clear_error_naming_it() -> None:
    store = MemStore()
    q = engine_on(store)
    await q.enqueue("t", jobs(40))
    [segment] = [k for k in await store.list("topics/t/") if "seg-p" in k][:1]
    await store.put(segment, b"garbage")
    fresh = engine_on(store, "b2")
    with pytest.raises(CorruptData, match=segment):
        await fresh.claim("t", "w", count=40)


async def test_a_segment_whose_items_are_not_jobs_is_a_clear_error_naming_it() -> None:
    """JSON of the right outer shape, items without the fields a job has: a
    KeyError deep in the state machine before (answered 503 by the committer)."""
    store = MemStore()
    q = engine_on(store)
    await q.enqueue("t", jobs(40))
    [segment] = [k for k in await store.list("topics/t/") if "seg-p" in k][:1]
    await store.put(segment, b'{"format": 2, "kind": "p", "items": [{"id": "j00000"}]}')
    fresh = engine_on(store, "b2")
    with pytest.raises(CorruptData, match=segment):
        await fresh.claim("t", "w", count=40)
    with pytest.raises(CorruptData, match=segment):
        await fresh.enqueue("t", [JobSpec("x", id="new")])


async def test_a_referenced_segment_that_is_gone_is_a_clear_error_when_the_head_has_not_moved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemStore()
    q = engine_on(store)
    await q.enqueue("t", jobs(40))
    segment = next(k for k in await store.list("topics/t/") if "seg-p" in k)
    await store.delete(segment)
    fresh = engine_on(store, "b2")
    with pytest.raises(CorruptData, match="not in the store"):
        await fresh.claim("t", "w", count=40)


async def _a_manifest(store: MemStore) -> str:
    """Fills topic t until its run has a manifest (SMALL: loose_max 4); the key
    of the run's first manifest."""
    writer = engine_on(store)
    for i in range(12):
        await writer.enqueue("t", jobs(20, prefix=f"b{i}-"))
    run = (await head_of(store))["lanes"]["0"]["runs"][0]
    assert run["mans"]
    return keys.segment("t", run["mans"][0]["k"])


async def _rewrite(store: MemStore, key: str, change: Callable[[dict[str, Any]], None]) -> None:
    obj = orjson.loads((await store.get(key))[0])
    change(obj)
    await store.put(key, orjson.dumps(obj))


async def test_a_manifest_holding_fewer_segments_than_its_ref_says_is_corrupt() -> None:
    """A manifest that reads well but lists fewer segments than the head's ref
    says (restored from another backup, cut short by a tool) failed every
    claim with a bare IndexError: a 503 ("commit failed") that clients retry
    for ever, naming no object. It is corrupt data, named, as such a segment is."""
    store = MemStore()
    key = await _a_manifest(store)

    def keep_one(manifest: dict[str, Any]) -> None:
        manifest["segs"] = manifest["segs"][:1]

    await _rewrite(store, key, keep_one)
    fresh = engine_on(store, "fresh")
    with pytest.raises(CorruptData, match=key):
        await fresh.claim("t", "w", count=240)
    with pytest.raises(CorruptData, match=key):
        await fresh.enqueue("t", [JobSpec("x", id="new")])


@pytest.mark.parametrize(("cursor", "at"), [("mpos", 10**6), ("mpos", -1), ("pos", -1)])
async def test_a_head_whose_manifest_cursor_is_past_its_manifest_is_corrupt(
    cursor: str, at: int
) -> None:
    """A head of the right shape whose run's manifest cursor (`mpos`) is past
    the manifest's segments (a head edited or restored by hand): a claim
    failed with a bare IndexError, a 503 ("commit failed") that clients retry
    for ever, naming no object, and a lookup answered "not found". It is
    corrupt data naming the head, as is a cursor before the start, which read
    from the end (review of the storage engine v2, round 25)."""
    store = MemStore()
    await _a_manifest(store)

    def move_cursor(head: dict[str, Any]) -> None:
        head["lanes"]["0"]["runs"][0][cursor] = at

    await _rewrite(store, keys.head("t"), move_cursor)
    fresh = engine_on(store, "fresh")
    with pytest.raises(CorruptData, match=keys.head("t")):
        await fresh.claim("t", "w", count=300)
    with pytest.raises(CorruptData, match=keys.head("t")):
        await engine_on(store, "other").job("t", "b0-00001")


@pytest.mark.parametrize("index", ["", "AAAA", "AAAAAA==", "not base64!"])
async def test_a_manifest_whose_id_index_is_cut_short_lets_no_duplicate_in(index: str) -> None:
    """A manifest's id index (4 bytes an item, in base64) was only checked to
    be a string: one cut short or emptied was taken at its word, the id filter
    and Chain.locate ruled its segment out, and an id the topic holds was
    enqueued a second time, silently (one whose length is not a multiple of 4
    was a bare ValueError). It is corrupt data, named."""
    store = MemStore()
    key = await _a_manifest(store)

    def cut(manifest: dict[str, Any]) -> None:
        for ref in manifest["segs"]:
            ref["ix"] = index

    await _rewrite(store, key, cut)
    fresh = engine_on(store, "fresh")
    with pytest.raises(CorruptData, match=key):
        await fresh.enqueue("t", [JobSpec("again", id="b0-00001")])
    assert (await engine_on(store, "other").status("t"))["pending"] == 240


def _run(head: dict[str, Any]) -> dict[str, Any]:
    run: dict[str, Any] = head["lanes"]["0"]["runs"][0]
    return run


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h["dead"].update(n=10),  # holds none
        lambda h: _run(h).update(n=_run(h)["n"] - 1),
        lambda h: _run(h)["segs"][0].update(live=_run(h)["segs"][0]["n"] + 1),
        lambda h: _run(h)["segs"][0].update(live=0),
        lambda h: _run(h)["mans"][0].update(live=_run(h)["mans"][0]["total"] + 1),
        lambda h: _run(h)["mans"][0].update(live=-1),
    ],
    ids=[
        "dead-n-past-its-jobs",
        "run-n-short",
        "segment-live-past-its-items",
        "segment-live-none",
        "manifest-live-past-its-total",
        "manifest-live-negative",
    ],
)
async def test_a_head_whose_live_counts_do_not_add_up_is_corrupt(
    edit: Callable[[dict[str, Any]], Any],
) -> None:
    """A head of the right shape whose counts do not add up (edited by hand, a
    flipped digit) was served: a dead chain saying it held 10 jobs, holding
    none, made the first job to die spin the dead limit for ever on the event
    loop (pop_front() found nothing, the count never fell), every topic with
    it; a ref's live count short of the truth forgot its segment while it
    held jobs. A chain's n must be its refs' live counts and its inline
    items', each ref counting one live item or more, and no more than it
    holds: else it is corrupt data naming the head."""
    store = MemStore()
    await _a_manifest(store)
    await engine_on(store).enqueue("fine", [JobSpec(1)])
    await _rewrite(store, keys.head("t"), edit)
    fresh = engine_on(store, "fresh")
    with pytest.raises(CorruptData, match=keys.head("t")):
        await fresh.status("t")
    with pytest.raises(CorruptData, match=keys.head("t")):
        await fresh.enqueue("t", [JobSpec("x", id="new")])
    assert (await fresh.status("fine"))["pending"] == 1


def _dead_abc(**limits: Any) -> TopicState:
    """A topic whose dead jobs a, b, c are in one segment, written and read back."""
    s = states.fresh(max_attempts=1, inline_dead_bytes=1, **limits)
    s.enqueue([JobSpec(i, id=job_id) for i, job_id in enumerate("abc")], 1000.0)
    s = states.reread(s, 1000.0)
    for job in s.claim("w", 30, 3, 1001.0):
        s.nack(job["id"], job["lease_token"], 0, "boom", 1001.0)
    s = states.reread(s, 1001.0)
    assert [ref["live"] for ref in s.head["dead"]["segs"]] == [3]
    return s


@pytest.mark.timeout(10)
def test_a_dead_count_past_the_dead_jobs_held_is_corrupt_not_a_hang() -> None:
    """Past the head's check (a count gone wrong in memory): the dead limit
    looked for a job to drop for as long as the count said there were more,
    and pop_front() found none, for ever. It is corrupt data now."""
    s = _dead_abc(dead_limit=4)
    s.dead.d["n"] = 10  # holds 3
    s.enqueue([JobSpec(9, id="d")], 1002.0)
    [job] = s.claim("w", 30, 1, 1002.0)
    with pytest.raises(CorruptData, match=keys.head("t")):
        s.nack(job["id"], job["lease_token"], 0, "boom", 1002.0)


def test_a_segment_forgotten_while_it_holds_live_jobs_is_corrupt() -> None:
    """A ref whose live count is one short of its segment's (and the chain's n
    with it: the sums agree) is forgotten with a job still in it; taking that
    job out raised a bare StopIteration, which the committer answered 503
    ("commit failed") and clients retried for ever. It is corrupt data."""
    s = _dead_abc()
    head = orjson.loads(orjson.dumps(s.head))
    head["dead"]["segs"][0]["live"] -= 1
    head["dead"]["n"] -= 1
    state = TopicState(
        decode_head("t", keys.head("t"), orjson.dumps(head)), s.view, s.bounds, s.policy
    )
    with pytest.raises(CorruptData, match=keys.head("t")):
        state.purge(None, 1002.0)


# --- cancellation ----------------------------------------------------------------------


async def test_cancelling_the_committer_task_cancels_it_instead_of_being_swallowed() -> None:
    store = FaultyStore(MemStore())
    committer = GroupCommitter(store, broker_id="b")
    q = Engine(committer)
    await q.enqueue("t", [JobSpec("seed")])
    store.gate = asyncio.Event()
    store.put_started.clear()
    waiting = asyncio.create_task(q.enqueue("t", [JobSpec("stuck")]))
    await store.put_started.wait()
    task = committer._topics["t"].batcher._task
    assert task is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert task.cancelled()


# --- memory ------------------------------------------------------------------------------------


def _traced_now() -> int:
    """What Python holds now, as tracemalloc counts it (after a collection)."""
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def _held_by(make: Callable[[MemStore], Awaitable[Engine]], store: MemStore) -> int:
    """Bytes the engine `make` builds on `store` holds once it is done (what
    dropping it frees: the store stays)."""
    tracemalloc.start()
    try:
        q = await make(store)
        with_engine = _traced_now()
        del q
        return with_engine - _traced_now()
    finally:
        tracemalloc.stop()


async def test_each_topics_last_write_leaves_its_objects_to_the_cache() -> None:
    """Each topic's writer state kept the objects its last seal wrote until the
    topic's next write, after the cache had let them go: 40 topics given one
    enqueue of 1,000 jobs of 1 KB held 63.7 MB against --cache-mb 1 (1.6 MB
    a topic, for as long as the topic is held)."""
    cache, topics = 1024 * 1024, 40

    async def enqueue_into_each(store: MemStore) -> Engine:
        q = Engine(GroupCommitter(store, broker_id="b", settings=CommitSettings(cache_bytes=cache)))
        for k in range(topics):
            # Payloads of their own, as decoded from requests (not one shared str).
            specs = [JobSpec({"pad": f"{k}-{i}-" + "x" * 990}, id=f"j{i}") for i in range(1000)]
            await q.enqueue(f"t{k}", specs)
        await q.committer.close()
        assert q.committer.cache.used <= cache
        return q

    held = await _held_by(enqueue_into_each, MemStore())
    assert held <= cache + topics * 16 * 1024, f"{held / 1e6:.1f} MB for {topics} topics"


async def test_a_topic_written_again_after_its_objects_left_the_cache_reads_them() -> None:
    """A writer state lets go of its seal's objects once they landed: what the
    cache has dropped meanwhile is fetched again when the next batch wants it."""
    store = MemStore()
    q = engine_on(store, cache_bytes=4 * 1024)
    await q.enqueue("t", jobs(200, size=100))
    await q.enqueue("u", jobs(200, size=100))  # pushes t's segments out of the cache
    fetched = q.committer.cache.fetched
    claimed = await q.claim("t", "w", count=200)
    assert q.committer.cache.fetched > fetched  # not held by t's state
    while batch := await q.claim("t", "w", count=200):
        claimed += batch
    assert [j["id"] for j in claimed] == [f"j{i:05d}" for i in range(200)]
    assert [a["duplicate"] for a in await q.enqueue("t", jobs(3))] == [True] * 3


def _retained(topic: str, *sizes: int) -> list[MemStore]:
    """A store for each of `sizes`: `topic` holding that many records within
    retention (each job enqueued, claimed and acked), as brokers write it."""
    s = states.fresh(topic)
    now, objects, stores = 1000.0, {}, []
    for b in range(0, max(sizes), 1000):
        s.enqueue([JobSpec(None, id=f"{i:07d}") for i in range(b, b + 1000)], now)
        for job in s.claim("w", 300, 1000, now):
            s.ack(job["id"], job["lease_token"], None, now)
        sealed = s.seal(states.WRITER, f"{b:012d}", now)
        for key, data in sealed.new_objects.items():
            s.view.put(key, data)  # type: ignore[attr-defined]
        objects.update(sealed.new_objects)
        if b + 1000 in sizes:
            store = MemStore()
            for key in s.referenced():
                store._objects[key] = (objects[key], key)  # as MemStore.put keeps them
            store._objects[keys.head(topic)] = (sealed.head, "head")
            stores.append(store)
    return stores


async def test_a_topics_id_filter_counts_in_the_cache_budget() -> None:
    """SPEC 4.1: with 1,000,000 records within retention "the broker's memory
    stays flat". A topic's id filter holds 4 bytes for every id its chains
    hold, and --cache-mb did not count it: a broker that enqueued one job into
    a topic of 100,000 retained records held 0.38 MB more than for one of
    10,000 (4 MB a topic at a million records, up to 16 MB stale). It is
    charged to the cache's budget now, which lets objects go to hold it."""
    cache = 1024 * 1024

    async def enqueue_one(store: MemStore) -> Engine:
        settings = CommitSettings(cache_bytes=cache)
        q = Engine(GroupCommitter(store, broker_id="b2", epoch=2, settings=settings))
        [answer] = await q.enqueue("t", [JobSpec(None, id="fresh-id")])
        assert answer["duplicate"] is False
        await q.committer.close()
        assert q.committer._topics["t"].ids.size > 0
        assert q.committer.cache.used <= cache
        return q

    small, big = [await _held_by(enqueue_one, store) for store in _retained("t", 10_000, 100_000)]
    assert big <= small + 128 * 1024, f"{small / 1e6:.2f} MB, then {big / 1e6:.2f} MB"


def test_a_charge_leaves_the_cache_in_turn_with_its_objects() -> None:
    """Memory charged to the object cache goes as its objects do, the least
    recently used first (dropped: told so), and the newest entry stays even
    alone over budget."""
    cache = ObjectCache(MemStore(), budget_bytes=1000)
    dropped: list[str] = []

    def segment(name: str) -> Segment:  # counted as 4 x 50 bytes
        return Segment(f"topics/t/seg-{name}.json", [], size=50)

    cache.keep(segment("a"))
    cache.charge("ids:t", 400, lambda: dropped.append("t"))
    cache.keep(segment("b"))
    assert cache.used == 800 and dropped == []
    cache.charge("ids:t", 700, lambda: dropped.append("t"))  # grown: the newest now
    assert "topics/t/seg-a.json" not in cache and cache.used == 900 and dropped == []
    cache.keep(segment("c"))
    assert "topics/t/seg-b.json" not in cache and cache.used == 900 and dropped == []
    cache.keep(segment("d"))
    assert dropped == ["t"] and cache.used == 400
    cache.charge("ids:u", 2000, lambda: dropped.append("u"))
    assert dropped == ["t"] and cache.used == 2000 and len(cache) == 1
    cache.uncharge("ids:u")  # gone with its topic: not dropped
    assert dropped == ["t"] and cache.used == 0


async def test_a_duplicate_is_found_after_the_cache_dropped_its_topics_id_filter() -> None:
    """The cache drops a topic's id filter when it needs the room. An empty
    filter rules nothing out (the head is covered again): an id held in a
    segment is still a duplicate, and a fresh one is not."""
    store = MemStore()
    q = engine_on(store, cache_bytes=16 * 1024)
    for i in range(5):
        await q.enqueue("t", jobs(100, prefix=f"b{i}-", size=10))
    t = q.committer._topics["t"]
    # A duplicate: the head covered, and nothing written (the covered head stays).
    assert (await q.enqueue("t", [JobSpec(0, id="b4-00000")]))[0]["duplicate"] is True
    assert t.ids.size >= 400
    for i in range(10):
        await q.enqueue(f"u{i}", jobs(100, size=10))  # their objects push it out
    assert t.ids.size == 0 and t.state is not None and t.state.ids is t.ids
    assert t.ids_key not in q.committer.cache._objects
    answers = await q.enqueue("t", [JobSpec(1, id="b0-00007"), JobSpec(2, id="new")])
    assert [a["duplicate"] for a in answers] == [True, False]
    assert t.ids.size >= 500  # covered again, and charged again
    assert t.ids_key in q.committer.cache._objects


async def test_idle_topics_leave_the_brokers_memory() -> None:
    store = MemStore()
    q = engine_on(store, topics_kept=5, idle_after=0.0)
    for i in range(50):
        await q.enqueue(f"t{i}", [JobSpec(i)])
    assert len(q.committer._topics) <= 6
    assert (await q.status("t3"))["pending"] == 1  # read again when asked


class SlowGets(MemStore):
    """A MemStore whose reads take a moment, counting how many are in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = self.most_in_flight = 0

    async def get(self, key: str) -> tuple[bytes, str]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            return await super().get(key)
        finally:
            self.in_flight -= 1


async def test_listing_every_topic_keeps_none_of_them_and_reads_a_few_at_a_time() -> None:
    """GET /topics read every head at once and kept each topic in memory: with
    2,000 topics, 2,000 reads in flight and 2,000 topics held past
    topics_kept (SPEC 4.1: memory follows the topics in use, not the store's)."""
    store = SlowGets()
    writer = engine_on(store, broker_id="w")
    for i in range(2000):
        await writer.enqueue(f"t{i:04d}", [JobSpec(i)])
    await writer.ack("t0007", (await writer.claim("t0007", "w"))[0]["id"], None, None)
    await store.put(keys.head("t0009"), b"not a head")
    q = engine_on(store, topics_kept=50, idle_after=0.0)
    counts, errors = await q.topics()
    assert list(counts) == [f"t{i:04d}" for i in range(2000) if i != 9]
    assert counts["t0001"]["pending"] == 1 and counts["t0007"]["completed"] == 1
    assert list(errors) == ["t0009"]
    assert len(q.committer._topics) <= 50
    assert store.most_in_flight <= 64


async def test_many_new_topics_at_once_do_not_each_rescan_every_topic_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past topics_kept, each new topic scanned every topic held for idle ones:
    with none idle yet (a BLPOP on 20,000 keys) that was quadratic, 12.6 s for
    one command. Still past it after a scan, the next comes an eighth more
    topics later; once topics go idle, they leave as before."""
    q = engine_on(MemStore(), topics_kept=100, idle_after=3600.0)
    scans = 0
    forget_idle = q.committer.forget_idle

    def counted() -> int:
        nonlocal scans
        scans += 1
        return forget_idle()

    monkeypatch.setattr(q.committer, "forget_idle", counted)
    for n in range(2000):
        await q.enqueue(f"t{n}", [JobSpec(n)])
    assert len(q.committer.known_topics()) == 2000  # none idle: all held
    assert scans <= 30  # 1,901 before
    q.committer.settings = dataclasses.replace(q.committer.settings, idle_after=0.0)
    q.forget_idle()  # as the owner's duties do every idle_check
    for n in range(50):
        await q.enqueue(f"more{n}", [JobSpec(n)])
    assert len(q.committer.known_topics()) <= 100


async def test_listing_topics_lists_their_heads_not_their_segments() -> None:
    """A listing of topics (GET /topics, the status page every 2 s, a take-over)
    listed every object under topics/: every segment of every topic, a LIST
    request per 1,000 of them on S3, growing with the queues' depth."""

    class Listed(MemStore):
        keys = 0

        async def list(self, prefix: str = "") -> list[str]:
            found = await super().list(prefix)
            self.keys += len(found)
            return found

        async def list_top(self, prefix: str) -> list[str]:
            found = await super().list_top(prefix)
            self.keys += len(found)
            return found

    store = Listed()
    q = engine_on(store)
    for i in range(10):
        await q.enqueue("deep", jobs(50, prefix=f"b{i}-"))
    await q.enqueue("small", jobs(1))
    assert len(await store.list(keys.segments_prefix("deep"))) > 5
    store.keys = 0
    assert await q.topic_names() == ["deep", "small"]
    assert store.keys == 2


async def test_a_tiny_object_cache_still_serves_a_deep_queue_in_order() -> None:
    store = MemStore()
    q = engine_on(store, cache_bytes=64 * 1024)
    for i in range(20):
        await q.enqueue("t", jobs(100, prefix=f"b{i:02d}-"))
    got: list[str] = []
    while batch := await q.claim("t", "w", count=150):
        got += [j["id"] for j in batch]
        await q.ack_many("t", [AckRequest(j["id"], j["lease_token"]) for j in batch])
    assert got == [f"b{i:02d}-{n:05d}" for i in range(20) for n in range(100)]
    assert q.committer.cache.used <= 64 * 1024 * 1.5


# --- leases ----------------------------------------------------------------------------


async def test_thousands_of_claims_keep_the_head_small_and_stay_exact() -> None:
    store = FaultyStore(MemStore())
    q = engine_on(store, bounds=Bounds())  # the real bounds
    for i in range(5):
        await q.enqueue("t", jobs(1000, prefix=f"b{i}-", size=1000))
    held = []
    while len(held) < 4000:
        held += await q.claim("t", "holder", count=500, lease=3600)
    head = await head_of(store)
    assert len(orjson.dumps(head)) < 64 * 1024
    assert all("payload" not in r for r in head["leases"]["in"] if "src" in r)
    # Every lease still answers for itself: heartbeat, ack; a stale token does not.
    token = held[123]["lease_token"]
    assert (await q.heartbeat("t", held[123]["id"], token, 600))["lease_expires_at"]
    assert (await q.ack("t", held[7]["id"], held[7]["lease_token"], "ok"))["status"] == "completed"
    fresh = engine_on(store, "b2", bounds=Bounds())  # reads it all from the store
    assert (await fresh.status("t"))["claimed"] == 3999
    job = await fresh.job("t", held[2000]["id"])
    assert job["status"] == "claimed" and job["payload"]["n"] == held[2000]["payload"]["n"]
    nacked = await fresh.nack("t", held[3000]["id"], held[3000]["lease_token"])
    assert nacked["status"] == "pending"
    rest = await fresh.claim("t", "w2", count=1000) + await fresh.claim("t", "w2", count=1000)
    assert len(rest) == 1001  # the 1,000 never claimed, then the one given back
    again = rest[-1]
    assert again["id"] == held[3000]["id"] and again["payload"] == held[3000]["payload"]


async def test_reads_between_writes_hold_nothing_past_the_cache_budget() -> None:
    """Reads fetched objects into the reader's and the batch's working sets, which
    only a write cleared: looking up old ids on a topic nobody wrote to grew the
    broker's memory past its cache (590 MB with a 64 MB cache, bin/bench part 7)."""
    store = MemStore()
    q = engine_on(store, cache_bytes=32 * 1024)
    for i in range(20):
        await q.enqueue("t", jobs(100, prefix=f"b{i:02d}-", size=10))
        batch = await q.claim("t", "w", count=100)
        await q.ack_many("t", [AckRequest(j["id"], j["lease_token"]) for j in batch])
    reader = engine_on(store, "r", cache_bytes=32 * 1024)
    for i in range(20):
        assert (await reader.job("t", f"b{i:02d}-00042"))["status"] == "completed"
    t = reader.committer._topics["t"]
    assert t.seen == {}
    assert t.reader is not None and t.reader._view.seen == {}
    assert reader.committer.cache.used <= 32 * 1024 * 2


async def test_an_operation_reads_only_the_lease_segments_it_needs() -> None:
    """Spilled leases were indexed by reading every lease segment, and the index
    kept every record in memory outside the cache's budget: with 100,000 jobs
    claimed and a 64 MB cache, 20 single enqueues took 110 s of refetching.
    Leases in segments are found through the chain now: an enqueue, an ack or a
    heartbeat reads the objects the head names and the one segment it wants."""
    store = FaultyStore(MemStore())
    q = engine_on(store, bounds=Bounds())
    await q.enqueue("t", jobs(1000, size=200))
    held = []
    while len(held) < 1000:
        held += await q.claim("t", "holder", count=50, lease=3600)
    head = await head_of(store)
    lease_refs = len(head["leases"]["segs"]) + len(head["leases"]["mans"])
    assert lease_refs >= 4  # the claims spilled, some under manifests

    fresh = engine_on(store, "b2", bounds=Bounds())  # an empty cache
    await fresh.enqueue("t", [JobSpec("new", id="new")])
    direct = len(fresh.committer._topics["t"].state.direct_keys())  # type: ignore[union-attr]
    assert fresh.committer.cache.fetched <= direct
    before = fresh.committer.cache.fetched
    one = held[500]
    await fresh.heartbeat("t", one["id"], one["lease_token"], 60)
    await fresh.ack("t", one["id"], one["lease_token"], "ok")
    assert fresh.committer.cache.fetched - before <= 2  # its segment (a false hit at most)


async def test_a_batch_that_spills_many_segments_keeps_the_head_bounded() -> None:
    """A spill cuts a large batch into segments of at most segment_bytes; the
    seal then folds loose refs until the bound holds, however many it spilled
    (folding once per seal let 9 segments in and 8 out: the head grew by one
    ref a batch, and the objects it names overflowed the cache)."""
    store = MemStore()
    q = engine_on(store, bounds=Bounds())
    for i in range(30):
        await q.enqueue("t", jobs(1000, prefix=f"b{i:02d}-", size=1000))
    head = await head_of(store)
    [run] = head["lanes"]["0"]["runs"]
    assert len(run["segs"]) <= Bounds().loose_max
    assert len(run["mans"]) <= Bounds().manifests_max
    segments = [k for k in await store.list("topics/t/") if "/seg-p" in k]
    assert len(segments) >= 30 * 8
    for key in segments:
        data, _ = await store.get(key)
        assert len(data) <= Bounds().segment_bytes + 2048, key


async def test_topics_idle_for_long_leave_memory_however_few() -> None:
    """The old reaper read every topic each second, so none was ever idle, and
    eviction ran only when a new topic came past 1,000: memory held every topic
    ever touched. Now the owner's duties call forget_idle on a timer."""
    q = engine_on(MemStore(), idle_after=0.0, idle_max=0.0)
    for i in range(5):
        await q.enqueue(f"t{i}", [JobSpec(i)])
    assert len(q.committer.known_topics()) == 5
    assert q.forget_idle() == 5
    assert q.committer.known_topics() == []
    assert (await q.status("t3"))["pending"] == 1  # read again when asked


async def test_topics_that_do_not_exist_leave_memory_at_once() -> None:
    """Any request naming a topic made a _Topic (some 8 KB: a state, a batcher,
    an id filter), and one that does not exist stayed as long as any other,
    60 s past topics_kept: a client claiming random names at 2,000 a second
    held a GB (SPEC 4.1: memory follows the topics being served). A topic
    with nothing in the store leaves at the next check, or as a new topic
    comes past topics_kept; one a long poll waits on stays, and its poll
    wakes on an enqueue."""
    q = engine_on(MemStore(), topics_kept=100)
    waiting = asyncio.create_task(q.claim("nosuch-polled", "w", wait=30.0))
    await until(lambda: q.committer.waiting("nosuch-polled") == 1)
    for i in range(1000):
        await q.claim(f"nosuch{i}", "w")
        await q.status(f"nosuch-status{i}")
    assert len(q.committer._topics) <= 101
    q.forget_idle()
    assert list(q.committer._topics) == ["nosuch-polled"]
    await q.enqueue("nosuch-polled", [JobSpec(1, id="j")])
    assert [j["id"] for j in await asyncio.wait_for(waiting, 10)] == ["j"]


async def test_past_topics_max_the_least_recently_used_leave_however_lately() -> None:
    q = engine_on(MemStore(), topics_kept=2, topics_max=5)
    for i in range(20):
        await q.enqueue(f"t{i:02d}", [JobSpec(i)])
    assert len(q.committer._topics) <= 5
    assert "t19" in q.committer._topics and "t00" not in q.committer._topics
    assert (await q.status("t00"))["pending"] == 1  # read again when asked


async def test_a_listing_keeps_no_topic_whose_counts_read_a_segment() -> None:
    """GET /topics peeks at heads without keeping them. A topic whose delayed
    jobs spilled into segments that straddle now has its counts read from
    those segments: the peek fell back to a read, which kept the topic in the
    listing broker's memory (one per such topic, however many it lists)."""
    store = MemStore()
    q = engine_on(store, bounds=Bounds())
    for b in range(12):  # every segment holds jobs due now and in an hour
        specs = [
            JobSpec({"n": i, "pad": "x" * 1000}, id=f"b{b}-{i}", delay=3600.0 * (i % 2))
            for i in range(1000)
        ]
        await q.enqueue("t", specs)
    head = await head_of(store)
    assert any(lane["runs"] for lane in head["lanes"].values())  # it spilled

    lister = engine_on(store, "b2", bounds=Bounds())  # an empty cache
    counts, errors = await lister.topics()
    assert errors == {}
    assert counts["t"]["pending"] == 6000
    assert counts["t"]["delayed"] == 6000
    assert lister.committer.known_topics() == []
    assert "t" not in lister.committer._topics


async def spill_straddling(q: Engine, topic: str, priorities: int) -> None:
    """Jobs of each priority spilled into segments that straddle now."""
    for p in range(priorities):
        specs = [
            JobSpec({"n": i, "pad": "x" * 200}, id=f"p{p}-{i}", priority=p, delay=3600.0 * (i % 2))
            for i in range(40)
        ]
        await q.enqueue(topic, specs)


async def test_a_listing_counts_a_topic_whose_counts_read_many_segments() -> None:
    """The peek fetched one object a round, up to 64 rounds: a topic with 64
    lanes, each with a segment straddling now, was listed as an error (the
    cache 'too small'). It fetches what a read fetches with each miss now."""
    store = MemStore()
    await spill_straddling(engine_on(store), "t", 64)
    expected = await engine_on(store, "b3").status("t")
    lister = engine_on(store, "b2")
    counts, errors = await lister.topics()
    assert errors == {}
    assert counts["t"] == expected
    assert lister.committer.stats.fetch_rounds <= 2


async def test_a_listing_on_a_small_cache_counts_every_topic() -> None:
    """32 readers peek at once: an object fetched for one could be pushed out
    of the cache by another's fetch before it was held, and its topic was
    listed as an internal error. What a fetch answers is held, not looked up."""
    store = MemStore()
    writer = engine_on(store)
    for n in range(4):
        await spill_straddling(writer, f"t{n}", 1)
    counts, errors = await engine_on(store, "b2", cache_bytes=1).topics()
    assert errors == {}
    assert sorted(counts) == ["t0", "t1", "t2", "t3"]
    assert all(c["pending"] == 20 and c["delayed"] == 20 for c in counts.values())


def test_a_manifests_id_index_names_every_segment_that_may_hold_an_id() -> None:
    """Manifest.candidates: each id's segment is among its candidates, a hash
    between, before or past every indexed one has none, and neighbours in the
    sorted index (hash ± 1) never leak into each other's answer."""
    import random

    from simplequeue.state.segments import Manifest, encode_index, id_hash

    rng = random.Random(7)
    ids = [[f"job-{n}-{i}-{rng.random()}" for i in range(50)] for n in range(20)]
    refs = [{"k": f"s{n}", "ix": encode_index(chunk)} for n, chunk in enumerate(ids)]
    manifest = Manifest("m", refs, 0)
    hashes = {id_hash(i): n for n, chunk in enumerate(ids) for i in chunk}
    for job_id, n in ((i, n) for n, chunk in enumerate(ids) for i in chunk):
        assert n in manifest.candidates(id_hash(job_id))
    for h in (0, min(hashes) - 1, max(hashes) + 1, 2**32 - 1):
        if h not in hashes and h >= 0:
            assert manifest.candidates(h) == []
    for h in hashes:
        for near in (h - 1, h + 1):
            if near not in hashes and near >= 0:
                assert manifest.candidates(near) == []


# --- the objects a seal keeps ----------------------------------------------------------


async def test_every_segment_the_committer_holds_is_what_the_store_holds() -> None:
    """A spill hands its items to the segment it makes as they are (they are
    not decoded from the bytes again): whatever comes after (claims, acks,
    nacks, heartbeats, retries, deaths, retention) must change none of them,
    and they must be what the bytes say, down to their types."""
    store = MemStore()
    e = engine_on(store, policy=Policy(max_attempts=2, default_lease=60.0))
    committer = e.committer
    for round_ in range(6):
        specs = jobs(30, prefix=f"r{round_}-", size=60)
        specs += [
            JobSpec({"late": i, "list": [1, 2.5, None, True]}, delay=0.0, priority=i % 3)
            for i in range(10)
        ]
        await e.enqueue("t", specs)
        claimed = await e.claim("t", "w", count=25)
        for job in claimed[:5]:
            await e.heartbeat("t", job["id"], job["lease_token"])
        for job in claimed[5:10]:
            await e.nack("t", job["id"], job["lease_token"], error={"why": ["x", 1]})
        await e.ack_many(
            "t",
            [AckRequest(j["id"], j["lease_token"], result={"ok": [round_]}) for j in claimed[10:]],
        )
    await e.cancel("t", [f"r5-{i:05d}" for i in range(3)])
    checked = 0
    for key in await store.list(keys.segments_prefix("t")):
        if key in committer.cache:
            assert_held_as_written(committer.cache.held(key), key, (await store.get(key))[0])
            checked += 1
    assert checked >= 10  # spilled segments of every kind were looked at
    await committer.close()


async def fill_dead(q: Engine, topic: str, n: int, size: int = 1024) -> None:
    """`n` dead jobs of `size`-byte payloads (max_attempts 1: one nack each)."""
    for start in range(0, n, 1000):
        ids = range(start, min(n, start + 1000))
        await q.enqueue(topic, [JobSpec("x" * size, id=f"j{i}") for i in ids])
        got = await q.claim(topic, "w", count=len(ids))
        await asyncio.gather(*(q.nack(topic, j["id"], j["lease_token"]) for j in got))


@pytest.mark.parametrize("whole", ["requeue", "purge"])
async def test_the_whole_dead_letter_queue_is_listed_requeued_and_purged_from_a_cold_cache(
    whole: str,
) -> None:
    """10,000 dead jobs of 1 KB (the default --dead-limit) spill into ~90
    segments. A broker that did not write them (restarted, or a new owner)
    fetched them one round trip each, and gave up after 64: listing, requeueing
    or purging them all answered 503 "the object cache is too small" with
    256 MB of cache and 10 MB of jobs. The segments after a missing one in its
    manifest now come with it."""
    store = MemStore()
    policy = CommitSettings(policy=Policy(max_attempts=1))
    writer = Engine(GroupCommitter(store, broker_id="w", settings=policy))
    await fill_dead(writer, "t", 10_000)
    assert (await writer.status("t"))["dead"] == 10_000
    cold = Engine(GroupCommitter(store, broker_id="cold"))
    assert len((await cold.dead("t"))[0]) == 10_000
    # One round per manifest and per 16 segments, not one per segment.
    assert cold.committer.stats.fetch_rounds < 32
    again = Engine(GroupCommitter(store, broker_id="again"))
    taken = await (again.requeue("t") if whole == "requeue" else again.purge("t"))
    assert len(taken) == 10_000
    counts = await again.status("t")
    assert (counts["dead"], counts["pending"]) == (0, 10_000 if whole == "requeue" else 0)


@pytest.mark.parametrize("whole", ["requeue", "purge"])
async def test_a_dead_letter_queue_larger_than_the_cache_is_requeued_purged_and_paged(
    whole: str,
) -> None:
    """2,000 dead jobs of 1 KB in ~250 segments, a 256 KB cache: requeueing or
    purging them all, one batch needing every segment, answered 503 "the object
    cache is too small" for ever. They now go in parts (500 jobs from 16
    segments at most, a commit each). A whole listing is a clear 400 that
    says to read pages, which work."""
    store = MemStore()
    settings: dict[str, Any] = {"bounds": Bounds(), "policy": Policy(max_attempts=1)}
    writer = engine_on(store, broker_id="w", **settings)
    await writer.enqueue("t", [JobSpec("x" * 1024, id=f"j{i}") for i in range(1000)])
    await writer.enqueue("t", [JobSpec("x" * 1024, id=f"j{i}") for i in range(1000, 2000)])
    for job in await writer.claim("t", "w", count=2000):
        await writer.nack("t", job["id"], job["lease_token"])  # a commit each: small segments
    ids = [j["id"] for j in (await writer.dead("t"))[0]]
    dead = (await head_of(store))["dead"]
    assert len(ids) == 2000 and sum(m["segs"] for m in dead["mans"]) + len(dead["segs"]) > 64
    small = engine_on(store, broker_id="small", cache_bytes=256 * 1024, **settings)
    with pytest.raises(InvalidRequest, match="pages"):
        await small.dead("t")
    assert [j["id"] for j in (await small.dead("t", 1500, 100))[0]] == ids[1500:1600]
    taken = await (small.requeue("t") if whole == "requeue" else small.purge("t"))
    assert taken == ids
    counts = await small.status("t")
    assert (counts["dead"], counts["pending"]) == (0, 2000 if whole == "requeue" else 0)


@pytest.mark.parametrize("op", ["requeue", "purge"])
async def test_dead_jobs_named_in_any_order_are_requeued_or_purged_from_a_cold_cache(
    op: str,
) -> None:
    """500 of 10,000 dead jobs (~90 segments), named in no particular order,
    requeued or purged by a broker that did not write them. Each id's
    segment was found missing one at a time, a fetch round each (the
    segments after a missing one come with it only when the one before is
    at hand): a requeue answered 503 after 64 rounds, a purge took 64. What
    they all lack is asked for at once now."""
    store = MemStore()
    policy = CommitSettings(policy=Policy(max_attempts=1))
    writer = Engine(GroupCommitter(store, broker_id="w", settings=policy))
    await fill_dead(writer, "t", 10_000)
    ids = [f"j{i}" for i in range(0, 10_000, 20)]
    random.Random(1).shuffle(ids)
    cold = Engine(GroupCommitter(store, broker_id="cold"))
    assert await (cold.requeue("t", ids) if op == "requeue" else cold.purge("t", ids)) == ids
    assert cold.committer.stats.fetch_rounds <= 4
    counts = await cold.status("t")
    assert (counts["dead"], counts["pending"]) == (9_500, 500 if op == "requeue" else 0)
    if op == "purge":  # sent again: answered the same, from the records
        again = Engine(GroupCommitter(store, broker_id="again"))
        assert await again.purge("t", ids) == ids
        assert again.committer.stats.fetch_rounds <= 4


class CountingStore(MemStore):
    def __init__(self) -> None:
        super().__init__()
        self.gets: list[str] = []

    async def get(self, key: str) -> tuple[bytes, str]:
        self.gets.append(key)
        return await super().get(key)


async def test_one_job_looked_up_from_a_cold_cache_costs_one_segment_beyond_the_heads() -> None:
    """Prefetching the segments after a missing one is for chains read through:
    on every miss, one look-up fetched 16 segments it did not want."""
    store = CountingStore()
    writer = Engine(GroupCommitter(store, broker_id="w"))
    for start in range(0, 30_000, 1000):
        await writer.enqueue(
            "t", [JobSpec("x" * 1024, id=f"j{i}") for i in range(start, start + 1000)]
        )
    cold = Engine(GroupCommitter(store, broker_id="cold"))
    await cold.status("t")
    state = cold.committer._topics["t"].state
    assert state is not None
    direct = set(state.direct_keys())
    store.gets.clear()
    assert (await cold.job("t", "j20000"))["id"] == "j20000"
    beyond = [k for k in store.gets if "/seg-" in k and k not in direct]
    assert len(beyond) <= 1, beyond


# --- reaping many expired leases ---------------------------------------------------------

T0 = 1_900_000_000.0


async def tend_while_due(engine: Engine, clock: list[float], topic: str = "t") -> Counter[str]:
    """Tend `topic` as its owner's duties do: again at once while it says
    something is due by now. What the tends did, by kind."""
    done: Counter[str] = Counter()
    for _ in range(1000):
        reaped, due = await engine.tend(topic)
        done.update(reaped)
        if due is None or due > clock[0]:
            return done
    raise AssertionError("still due after 1,000 tends")


async def _claimed_from_spilled_runs(store: MemStore, clock: list[float]) -> None:
    """10,000 jobs of 1 KB, enqueued in ten batches (spilled into runs), then
    claimed a thousand at a time: their payloads stay in about 80 pending
    segments, which no chain names any more."""
    q = engine_on(store, "b1", clock, bounds=Bounds())
    for batch in range(10):
        await q.enqueue(
            "t", [JobSpec({"pad": "x" * 1000}, id=f"j{batch}-{k}") for k in range(1000)]
        )
    claimed = 0
    for _ in range(10):
        claimed += len(await q.claim("t", "w", lease=5, count=1000))
    assert claimed == 10_000
    await q.committer.close()


async def test_a_cold_owner_reaps_many_expired_leases_claimed_from_spilled_runs() -> None:
    """10,000 claimed 1 KB jobs (SPEC 4.1 wants 100,000 to work), claimed from
    spilled runs, their leases run out and a broker that holds nothing of the
    topic yet reaps them. reap() read each expired lease's payload segment
    one at a time: each one missing was a fetch round of its own (no chain
    names it, so nothing was prefetched with it), and past 64 rounds every
    tend failed CacheTooSmall, with a 256 MB cache holding 1.3 MB: the jobs
    stayed claimed for good (review of the storage engine v2, round 25)."""
    store = MemStore()
    clock = [T0]
    await _claimed_from_spilled_runs(store, clock)
    clock[0] += 100  # every lease ran out
    owner = engine_on(store, "b2", clock, bounds=Bounds())
    assert (await tend_while_due(owner, clock))["pending"] == 10_000
    counts = await owner.status("t")
    assert (counts["pending"], counts["claimed"]) == (10_000, 0)
    await owner.committer.close()


async def test_the_broker_that_wrote_them_reaps_many_expired_leases_claimed_from_the_head() -> None:
    """The same with the warm broker that wrote everything: 2,000 jobs
    enqueued and claimed ten at a time, so each claim took its jobs from the
    head and the lease spill put their payloads into an `x` segment (200 of
    them), which the committer does not cache as it writes them. Reaping
    them fetched one a round: CacheTooSmall after 64, at every tend (review
    of the storage engine v2, round 25)."""
    store = MemStore()
    clock = [T0]
    q = engine_on(store, "b1", clock, bounds=Bounds())
    claimed = 0
    for batch in range(200):
        await q.enqueue("t", [JobSpec({"pad": "x" * 1000}, id=f"j{batch}-{k}") for k in range(10)])
        claimed += len(await q.claim("t", "w", lease=5, count=10))
    assert claimed == 2000
    clock[0] += 100
    assert (await tend_while_due(q, clock))["pending"] == 2000
    assert (await q.status("t"))["pending"] == 2000
    await q.committer.close()


async def test_expired_leases_whose_payloads_outgrow_the_cache_are_reaped() -> None:
    """The same with payloads larger than the cache (SPEC 4.1's own figure:
    100,000 claimed 1 KB jobs are 400 MB to a 256 MB cache; here 10,000 to a
    16 MB one). Each tend evicted what the last had fetched and failed after
    64 rounds: the jobs were never reaped (review of the storage engine v2,
    round 25)."""
    store = MemStore()
    clock = [T0]
    await _claimed_from_spilled_runs(store, clock)
    clock[0] += 100
    owner = engine_on(store, "b2", clock, bounds=Bounds(), cache_bytes=16 * 1024 * 1024)
    assert (await tend_while_due(owner, clock))["pending"] == 10_000
    assert (await owner.status("t"))["pending"] == 10_000
    await owner.committer.close()
