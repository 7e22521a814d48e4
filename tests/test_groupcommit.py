"""The group committer: batching, durability before answers, lost races,
ambiguous writes, failing and slow stores, callers that go away, fencing."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from simplequeue import groupcommit, keys
from simplequeue.api import FollowUpSpec, JobSpec
from simplequeue.batching import Batcher
from simplequeue.broker import engine as engine_module
from simplequeue.broker.engine import Engine
from simplequeue.errors import (
    AmbiguousWrite,
    Contended,
    NotDurable,
    StoreRefused,
    StoreUnavailable,
)
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore.localfs import LocalStore
from simplequeue.objstore.memfs import MemStore
from simplequeue.state import Bounds
from tests.helpers.faults import FaultyStore
from tests.helpers.head_reads import HeadReads
from tests.helpers.until import until


def engine_on(store: Any, broker_id: str = "b1", epoch: int = 1, **settings: Any) -> Engine:
    return Engine(
        GroupCommitter(store, broker_id=broker_id, epoch=epoch, settings=CommitSettings(**settings))
    )


async def head_of(store: Any, topic: str = "t") -> dict[str, Any]:
    data, _ = await store.get(f"topics/{topic}.json")
    head: dict[str, Any] = orjson.loads(data)
    return head


async def test_concurrent_mutations_share_writes() -> None:
    store = FaultyStore(MemStore())
    q = engine_on(store)
    answers = await asyncio.gather(*(q.enqueue("t", [JobSpec(i)]) for i in range(200)))
    assert len({a[0]["id"] for a in answers}) == 200
    assert store.calls["put"] < 50, store.calls
    assert (await q.status("t"))["pending"] == 200


async def test_steady_state_writes_are_one_put_and_no_get() -> None:
    store = FaultyStore(MemStore())
    q = engine_on(store)
    await q.enqueue("t", [JobSpec(0)])
    gets, puts = store.calls["get"], store.calls["put"]
    for i in range(10):
        await q.enqueue("t", [JobSpec(i)])
    assert store.calls["get"] == gets
    assert store.calls["put"] == puts + 10


async def test_no_answer_before_the_write_landed() -> None:
    store = FaultyStore(MemStore())
    q = engine_on(store)
    store.gate = asyncio.Event()
    task = asyncio.create_task(q.enqueue("t", [JobSpec(1, id="a")]))
    await store.put_started.wait()
    assert not task.done()
    with pytest.raises(Exception):  # noqa: B017 - nothing landed yet
        await store.inner.get("topics/t.json")
    store.gate.set()
    assert (await task)[0]["id"] == "a"
    assert (await head_of(store))["counters"]["enqueued"] == 1


async def test_mutations_arriving_during_a_slow_write_form_one_next_batch() -> None:
    store = FaultyStore(MemStore())
    q = engine_on(store)
    await q.enqueue("t", [JobSpec("first")])
    store.gate = asyncio.Event()
    store.put_started.clear()
    first = asyncio.create_task(q.enqueue("t", [JobSpec("slow")]))
    await store.put_started.wait()
    puts = store.calls["put"]
    rest = [asyncio.create_task(q.enqueue("t", [JobSpec(i)])) for i in range(50)]
    await asyncio.sleep(0)  # let them queue behind the write in flight
    store.gate.set()
    await asyncio.gather(first, *rest)
    assert store.calls["put"] == puts + 1  # the 50 went out as one write
    assert (await q.status("t"))["pending"] == 52


async def test_callers_answered_by_a_write_join_the_batch_queued_during_it() -> None:
    # Closed-loop callers (each sends its next request as soon as it has its
    # answer) must not split into two halves riding alternate writes: after a
    # write lands, the committer waits for the callers it answered to join
    # what queued meanwhile. A generous linger keeps the test off the clock;
    # the wait ends as soon as they are all back.
    store = FaultyStore(MemStore())
    q = engine_on(store, linger=100.0, linger_max=5.0)
    await q.enqueue("t", [JobSpec("first")])
    sizes: list[int] = []
    q.committer.on_batch = sizes.append
    store.gate = asyncio.Event()
    store.put_started.clear()

    async def twice(i: int) -> None:
        for round_ in range(2):
            await q.enqueue("t", [JobSpec([i, round_])])

    first_half = [asyncio.create_task(twice(i)) for i in range(32)]
    await store.put_started.wait()  # the first half is in the write, held
    second_half = [asyncio.create_task(q.enqueue("t", [JobSpec(i)])) for i in range(32)]
    await asyncio.sleep(0)  # let them queue behind it
    store.gate.set()
    await asyncio.gather(*first_half, *second_half)
    assert sizes == [32, 64]
    assert (await q.status("t"))["pending"] == 1 + 32 * 3


async def test_lost_race_reapplies_claims_and_never_returns_the_failed_pick() -> None:
    shared = MemStore()
    a, b = engine_on(shared, "a"), engine_on(shared, "b")
    await a.enqueue("t", [JobSpec(1, id="only")])
    await a.status("t")  # a's cache now holds the job as pending
    [won] = await b.claim("t", "worker-b")
    assert won["id"] == "only"
    # a's cached state is stale: its claim loses the race, re-reads, finds nothing.
    assert await a.claim("t", "worker-a") == []
    job = await a.job("t", "only")
    assert job["claimed_by"] == "worker-b"
    assert job["lease_token"] == won["lease_token"]


async def test_lost_race_keeps_every_mutation_of_the_batch() -> None:
    shared = MemStore()
    a, b = engine_on(shared, "a"), engine_on(shared, "b")
    await a.enqueue("t", [JobSpec("seed")])
    await b.enqueue("t", [JobSpec("from-b")])  # a's ETag is now stale
    await asyncio.gather(*(a.enqueue("t", [JobSpec(i)]) for i in range(20)))
    counts = await engine_on(shared, "c").status("t")
    assert counts["pending"] == counts["enqueued"] == 22


@pytest.mark.parametrize("fault", ["lose-answer", "landed-412"])
async def test_write_that_landed_unseen_is_answered_once_and_not_applied_twice(
    fault: str,
) -> None:
    store = FaultyStore(MemStore())
    q = engine_on(store)
    await q.enqueue("t", [JobSpec("seed")])
    store.faults = [fault]
    [answer] = await q.enqueue("t", [JobSpec("once")])
    assert answer["duplicate"] is False
    head = await head_of(store)
    assert head["counters"]["enqueued"] == 2
    assert q.committer.stats.writes == 1  # the landed write was not redone
    assert (await q.job("t", answer["id"]))["payload"] == "once"


async def test_failed_write_is_retried_when_the_read_back_shows_it_did_not_land() -> None:
    store = FaultyStore(MemStore())
    q = engine_on(store)
    await q.enqueue("t", [JobSpec("seed")])
    store.faults = ["fail"]
    [answer] = await q.enqueue("t", [JobSpec("retried")])
    assert (await head_of(store))["counters"]["enqueued"] == 2
    assert (await q.job("t", answer["id"]))["status"] == "pending"


async def test_writes_the_store_fails_for_the_whole_budget_say_so_not_contention() -> None:
    """A store that failed every head write (not a refusal: tried again) for
    the whole budget was answered Contended "lost N races": the operator read
    about other brokers, not the store (review). The store's last words now."""
    store = FaultyStore(MemStore())
    q = engine_on(store, budget=0.5)
    await q.enqueue("t", [JobSpec("seed")])
    store.faults = ["fail"] * 1000
    with pytest.raises(
        StoreUnavailable, match=r"the store failed requests for .* the last: injected: PUT failed"
    ):
        await q.enqueue("t", [JobSpec(2)])


async def test_a_write_that_may_yet_land_fails_ambiguous_when_the_budget_runs_out() -> None:
    """S3 applies a conditional PUT that was sent and never answered later, on
    the condition it was sent with. When a batch's budget ran out on such
    tries, the head read back unchanged each time, the committer said plain
    StoreUnavailable, which callers take for "did not land" (Engine._give_back
    kept a pop for another undo, which could give back a job completed
    meanwhile: run twice); then the write landed."""
    store = FaultyStore(MemStore())
    q = engine_on(store, budget=0.3)
    await q.enqueue("t", [JobSpec("seed")])
    store.faults = ["late"] * 1000
    with pytest.raises(AmbiguousWrite, match="may or may not land"):
        await q.enqueue("t", [JobSpec(2, id="x")])
    assert await store.land_late() == 1
    assert (await head_of(store))["counters"]["enqueued"] == 2


class ObjectsTimeOut(MemStore):
    """A store on the base class's put_if_after (as S3Store is) whose create-only
    PUTs of a batch's objects are sent and never answered (S3Store raises
    AmbiguousWrite for a read timeout). Counts the head PUTs sent."""

    def __init__(self) -> None:
        super().__init__()
        self.head_puts = 0

    async def put_if(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        if key.count("/") > 1:  # a topic's segment, not its head
            raise AmbiguousWrite("injected: the segment's PUT was sent, no answer came")
        self.head_puts += 1
        return await super().put_if(key, data, if_match=if_match, if_none_match=if_none_match)


async def test_put_if_after_whose_object_got_no_answer_says_its_key_was_not_sent() -> None:
    # put_if_after writes `key` only once every object landed: when an object's
    # PUT got no answer, `key` was never sent, and cannot land later. Raising
    # the object's AmbiguousWrite says "the key's write may land".
    store = ObjectsTimeOut()
    await store.put("topics/t.json", b"v0")
    with pytest.raises(StoreUnavailable) as raised:
        await store.put_if_after(
            {"topics/t/seg-1": b"s"},
            "topics/t.json",
            b"v1",
            if_match=(await store.get("topics/t.json"))[1],
        )
    assert store.head_puts == 0
    assert not isinstance(raised.value, AmbiguousWrite), (
        "the head was never sent, yet put_if_after says it may land"
    )


async def test_a_batch_whose_head_was_never_sent_is_not_answered_as_one_that_may_land() -> None:
    # The committer takes AmbiguousWrite from put_if_after for its head's: the
    # batch's tries are marked may_land_late, and once the budget is spent it
    # answers AmbiguousWrite ("one of them unanswered on the head the store
    # still has"), with no head PUT sent at all. Engine._give_back then keeps
    # no undo of a lost pop for another try (it takes AmbiguousWrite for "may
    # have landed"): the jobs stay claimed until their lease runs out.
    store = ObjectsTimeOut()
    q = engine_on(store, budget=0.3)
    await q.enqueue("t", [JobSpec(0)])
    before = store.head_puts
    big: Any = {"pad": "x" * 300_000}  # spilled into a segment of its own
    with pytest.raises(StoreUnavailable) as raised:
        await q.enqueue("t", [JobSpec(big)])
    assert store.head_puts == before, "no head PUT was sent"
    assert not isinstance(raised.value, AmbiguousWrite), str(raised.value)


async def test_an_unanswered_try_cannot_land_after_a_later_one_did() -> None:
    """The other side: a try that may land late, then a try that landed. The
    late one was conditioned on the head before: it never lands, and the
    batch is answered once."""
    store = FaultyStore(MemStore())
    q = engine_on(store)
    await q.enqueue("t", [JobSpec("seed")])
    store.faults = ["late"]
    await q.enqueue("t", [JobSpec(2, id="x")])
    assert await store.land_late() == 0
    assert (await head_of(store))["counters"]["enqueued"] == 2


async def test_a_head_read_failing_on_the_way_into_a_commit_is_retried_within_the_budget() -> None:
    """A batch whose topic was not in memory read its head first, and a failed
    read was answered StoreUnavailable at once (only lost races were tried
    again): in the store-fault campaign a 0.3-1 s outage answered 50-180
    requests 503 that a retry within the budget carries. Nothing was written
    by such a try: it is tried again, as a lost race is."""
    store = FaultyStore(MemStore())
    await engine_on(store).enqueue("t", [JobSpec("seed")])
    q = engine_on(store, broker_id="b2")  # a broker that has not read the topic yet
    failed = asyncio.Event()
    get = store.get

    async def get_once_down(key: str) -> tuple[bytes, str]:
        try:
            return await get(key)
        except StoreUnavailable:
            failed.set()
            raise

    store.get = get_once_down  # type: ignore[method-assign]
    store.get_down = True
    enqueued = asyncio.create_task(q.enqueue("t", [JobSpec(2, id="after")]))
    await failed.wait()
    store.get_down = False
    [answer] = await enqueued
    assert answer == {"id": "after", "duplicate": False}
    assert (await head_of(store))["counters"]["enqueued"] == 2


def engine_clocked(store: Any, broker_id: str, clock: list[float], **settings: Any) -> Engine:
    """An engine on `store` whose clock reads clock[0]."""
    return Engine(
        GroupCommitter(
            store,
            broker_id=broker_id,
            epoch=1,
            clock=lambda: clock[0],
            settings=CommitSettings(**settings),
        )
    )


async def test_a_read_retried_after_an_unanswered_write_does_not_apply_the_batch_twice() -> None:
    """A batch is tried again when a read on its way in fails, reading
    the head afresh; that fresh read never asks whether an earlier try of the
    same batch landed meanwhile (only the read-back after a failed write
    does). Try 1 of a claim of 3 takes a1 (b1, b2 are due in 10 s); its PUT
    goes unanswered (S3 lands it later, on its condition); the read-back
    finds the head unchanged. Try 2 comes as b1 and b2 come due: it reads b2's
    segment, not read before, and that GET fails (the store is in trouble).
    Try 1 lands meanwhile. Try 3 reads the head with try 1 in it and claims
    again: the caller gets b1 and b2, and a1 stays claimed by nobody for its
    60 s lease (and is counted an attempt)."""
    clock = [1_000_000.0]
    store = FaultyStore(MemStore())
    tiny = Bounds(inline_pending_bytes=10, segment_bytes=100)  # a segment a job
    a = engine_clocked(store, "b1", clock, bounds=tiny)
    later = [JobSpec(i * 20, id=i, delay=10) for i in ("b1", "b2", "b3", "b4", "b5")]
    await a.enqueue("t", later)
    await a.enqueue("t", [JobSpec("a1" * 20, id="a1")])
    # Another broker serves the claim (its cache holds only what it read; no
    # read-ahead in a cache this small).
    b = engine_clocked(store, "b2", clock, bounds=tiny, budget=5.0, cache_bytes=2048)
    get = store.get
    phase = ["start"]

    async def get_(key: str) -> tuple[bytes, str]:
        if key == "topics/t.json" and phase[0] == "start" and store.late:
            phase[0] = "read back"  # after try 1's unanswered PUT
            clock[0] += 11  # the next try comes as b1 and b2 come due
        elif key != "topics/t.json" and phase[0] == "read back":
            phase[0] = "failed"
            assert await store.land_late() == 1  # try 1 lands as the read fails
            raise StoreUnavailable("injected: a segment's GET failed")
        return await get(key)

    store.get = get_  # type: ignore[method-assign]
    store.faults = ["late"]
    jobs = await b.claim("t", "w", lease=60, count=6)
    assert phase[0] == "failed", "the scenario did not happen"
    counts = await b.status("t")
    claimed = sorted(j["id"] for j in jobs)
    assert counts["claimed"] == len(jobs), (claimed, counts)


async def test_a_batch_refused_after_an_unanswered_try_says_it_may_land() -> None:
    """The committer answered AmbiguousWrite when the budget runs out on a try that
    may yet land, but only there: a later try that the store refuses (S3's
    403 as credentials expire, say) ends the batch at once with
    StoreRefused, which callers take for "did not land" (Engine._give_back
    keeps its pop for another undo), while the first try, unanswered and
    conditioned on the head the store still has, lands later."""
    store = FaultyStore(MemStore())
    q = engine_clocked(store, "b1", [1_000_000.0], budget=5.0)
    await q.enqueue("t", [JobSpec("seed", id="seed")])
    put_if = store.put_if
    tries = [0]

    async def put_if_(key: str, data: bytes, **kw: Any) -> str:
        if key == "topics/t.json":
            tries[0] += 1
            if tries[0] == 2:
                raise StoreRefused("injected: 403 ExpiredToken")
        return await put_if(key, data, **kw)

    store.put_if = put_if_  # type: ignore[method-assign]
    store.faults = ["late"]
    with pytest.raises(StoreUnavailable) as raised:
        await q.enqueue("t", [JobSpec(2, id="x")])
    landed = await store.land_late()
    assert landed == 1  # the first try landed after the batch was answered
    assert isinstance(raised.value, AmbiguousWrite), repr(raised.value)


async def test_a_batch_ended_by_a_full_store_after_an_unanswered_try_says_it_may_land() -> None:
    """As above for StorageFull (a StoreError, not StoreUnavailable: "nothing
    landed", 507), which passed by: the first try landed after the answer."""
    store = FaultyStore(MemStore())
    q = engine_clocked(store, "b1", [1_000_000.0], budget=5.0)
    await q.enqueue("t", [JobSpec("seed", id="seed")])
    store.faults = ["late", "full"]
    with pytest.raises(AmbiguousWrite):
        await q.enqueue("t", [JobSpec(2, id="x")])
    assert await store.land_late() == 1


async def test_store_outage_answers_unavailable_and_loses_nothing_acknowledged() -> None:
    store = FaultyStore(MemStore())
    q = engine_on(store, budget=0.3)
    [kept] = await q.enqueue("t", [JobSpec("acknowledged")])
    store.faults = ["fail"]
    store.get_down = True
    # AmbiguousWrite: a plain StoreUnavailable is taken for "did not land" (a
    # pop's give-back was kept for another undo, which could do it twice)
    with pytest.raises(AmbiguousWrite, match="may or may not have landed"):
        await q.enqueue("t", [JobSpec(2, id="unacknowledged")])
    store.get_down = False
    head = await head_of(store)
    assert head["counters"]["enqueued"] == 1
    assert (await q.job("t", kept["id"]))["payload"] == "acknowledged"
    # and the broker recovers by itself
    await q.enqueue("t", [JobSpec(3, id="after")])
    assert (await q.status("t"))["pending"] == 2


async def test_a_landed_write_whose_read_back_meets_a_blip_is_answered_as_landed() -> None:
    """The write landed, its answer was lost, and the GET that tells whether
    it landed met the store down for 50 ms: the batch failed StoreUnavailable,
    and a pop's caller took a job done (completed) for undone."""
    store = FaultyStore(MemStore())
    q = engine_on(store)
    await q.enqueue("t", [JobSpec("x", id="j1")])

    async def blip() -> None:
        store.get_down = True
        asyncio.get_running_loop().call_later(0.05, setattr, store, "get_down", False)

    store.meanwhile = blip
    store.faults = ["lose-answer"]
    [popped] = await q.pop("t", "w")
    assert popped["id"] == "j1"
    assert (await head_of(store))["counters"]["completed"] == 1


async def test_a_landed_batch_whose_durable_rewrite_meets_upkeep_is_not_answered_failed() -> None:
    """SPEC 4.2: a batch that landed is never reported as failed. Its head was
    in place but not durable (NotDurable), and the head written again sealed
    with upkeep: a merge of runs under way read the next front of its runs,
    which a small cache no longer held, and SegmentMissing escaped the
    rewrite: the landed batch was answered plain StoreUnavailable ("commit
    failed: ..."), which Engine._give_back takes for "did not land" (a pop's
    give-back kept for another undo: the job run twice)."""
    store = FaultyStore(MemStore())
    bounds = Bounds(
        inline_pending_bytes=100, segment_bytes=150, runs_max=1, merge_bytes=200, upkeep_bytes=400
    )
    q = engine_on(store, bounds=bounds, cache_bytes=1)
    for i in range(12):  # each due before the last: a run apiece, merged a part a seal
        await q.enqueue("t", [JobSpec(i, id=f"j{i}", delay=1000 - 10 * i)])
    store.faults = ["not-durable"]
    with contextlib.suppress(NotDurable):  # "it landed, not durably" would be fair
        [answer] = await q.enqueue("t", [JobSpec(0, id="x")])
        assert answer == {"id": "x", "duplicate": False}
    assert (await head_of(store))["counters"]["enqueued"] == 13  # it landed


async def test_endless_lost_races_end_in_contended_within_the_budget() -> None:
    store = FaultyStore(MemStore())
    q = engine_on(store, budget=0.3)
    await q.enqueue("t", [JobSpec("seed")])
    store.faults = ["conflict"] * 10_000
    with pytest.raises(Contended):
        await q.enqueue("t", [JobSpec("never")])
    assert (await head_of(store))["counters"]["enqueued"] == 1


async def counts_once(q: Engine, ready: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """Topic t's counts once `ready` says so (an undo lands in a later
    commit, woken by it), or as they are after 5 s."""
    for _ in range(100):
        counts = await q.status("t")
        if ready(counts):
            return counts
        await q.committer.wait_changed("t", 0.05)
    return await q.status("t")


async def test_caller_that_goes_away_does_not_fail_its_batch_and_its_claim_is_returned() -> None:
    store = FaultyStore(MemStore())
    q = engine_on(store)
    await q.enqueue("t", [JobSpec(1, id="j1"), JobSpec(2, id="j2")])
    store.gate = asyncio.Event()
    store.put_started.clear()
    leaving = asyncio.create_task(q.claim("t", "leaver"))
    staying = asyncio.create_task(q.enqueue("t", [JobSpec(3, id="j3")]))
    await store.put_started.wait()
    leaving.cancel()
    store.gate.set()
    assert (await staying)[0]["id"] == "j3"
    with pytest.raises(asyncio.CancelledError):
        await leaving
    # the abandoned claim is given back, with its attempt uncounted
    counts = await counts_once(q, lambda c: c["claimed"] == 0)
    assert (counts["claimed"], counts["pending"]) == (0, 3)
    assert (await q.job("t", "j1"))["attempts"] == 0


async def pop_left_mid_write(q: Engine, store: FaultyStore) -> asyncio.Task[Any]:
    """A pop of job j1 ("x"), cancelled while its write is held at the store
    (store.gate: set it to let the write land); the cancelled task."""
    await q.enqueue("t", [JobSpec("x", id="j1")])
    store.gate = asyncio.Event()
    store.put_started.clear()
    leaving = asyncio.create_task(q.pop("t", "leaver"))
    await store.put_started.wait()
    leaving.cancel()
    return leaving


async def test_a_pop_whose_caller_went_away_mid_commit_is_given_back_not_done() -> None:
    """A pop completes its job in the commit that takes it; a caller that
    left before the answer (a BLPOP's client hanging up) never got the job,
    so the commit is undone: pending again, not completed, attempt uncounted."""
    store = FaultyStore(MemStore())
    q = engine_on(store)
    leaving = await pop_left_mid_write(q, store)
    store.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    counts = await counts_once(q, lambda c: c["pending"] == 1)
    assert (counts["pending"], counts["completed"], counts["total"]) == (1, 0, 1)
    job = await q.job("t", "j1")
    assert (job["status"], job["attempts"], job["payload"]) == ("pending", 0, "x")
    [popped] = await q.pop("t", "stayer")
    assert (popped["id"], popped["attempts"]) == ("j1", 1)
    assert (await q.status("t"))["completed"] == 1


async def test_a_pop_cancelled_once_its_answer_was_set_is_given_back_not_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The caller is cancelled after its batch set its answer, before it ran
    again (a BLPOP's client seen leaving as its pop lands): the batch saw
    nobody go, and the caller never had the job. It is undone all the same."""
    q = engine_on(MemStore())
    await q.enqueue("t", [JobSpec("x", id="j1")])
    answers: list[asyncio.Future[Any]] = []
    post = Batcher.post

    def post_then_leave(self: Batcher[Any, Any], item: Any) -> asyncio.Future[Any]:
        answer = post(self, item)
        if not answers:  # the pop's: the caller is cancelled as it is answered
            answers.append(answer)
            answer.add_done_callback(lambda _: leaving.cancel())
        return answer

    monkeypatch.setattr(Batcher, "post", post_then_leave)
    leaving = asyncio.create_task(q.pop("t", "leaver"))
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert answers[0].result().jobs  # answered, not abandoned
    counts = await counts_once(q, lambda c: c["pending"] == 1)
    assert (counts["pending"], counts["completed"]) == (1, 0)
    assert (await q.job("t", "j1"))["attempts"] == 0


async def test_a_pop_abandoned_as_the_broker_stops_is_given_back_before_it_stops() -> None:
    """A stop cancels blocked callers (a BLPOP whose pop is being written),
    then closes the committer: the pop's undo is committed before close()
    returns, not refused as "shutting down" (the job done for nobody)."""
    store = FaultyStore(MemStore())
    q = engine_on(store)
    leaving = await pop_left_mid_write(q, store)
    closing = asyncio.create_task(q.committer.close())
    await asyncio.sleep(0)  # close() began
    store.gate.set()
    await closing
    with pytest.raises(asyncio.CancelledError):
        await leaving
    after = engine_on(store.inner, "next", epoch=2)  # the broker after this one
    assert (await after.job("t", "j1"))["status"] == "pending"
    assert (await after.status("t"))["completed"] == 0


async def test_an_undo_due_as_the_committer_aborts_writes_nothing_after() -> None:
    """close() ran out of time with a pop's write in flight; abort() began as
    that write was answered: the pop's undo was still posted, and written
    after abort() returned (after the broker closed its store)."""
    store = FaultyStore(MemStore())
    q = engine_on(store)
    leaving = await pop_left_mid_write(q, store)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # Broker.stop's commit budget
            await q.committer.close()
    store.gate.set()  # the pop's write is answered as abort() begins
    store.gate = later = asyncio.Event()  # a head write after it would wait here
    store.put_started.clear()
    await q.committer.abort()
    await asyncio.sleep(0.1)  # what a stray undo needs to reach the store
    later.set()
    assert not store.put_started.is_set(), "an undo was written after abort()"
    with pytest.raises(asyncio.CancelledError):
        await leaving


async def test_replaced_broker_learns_it_from_the_next_conflicting_write() -> None:
    shared = MemStore()
    old, new = engine_on(shared, "old", epoch=1), engine_on(shared, "new", epoch=2)
    await old.enqueue("t", [JobSpec(1)])
    await new.enqueue("t", [JobSpec(2)])
    assert (await head_of(shared))["writer"] == {"broker_id": "new", "epoch": 2}
    assert old.committer.fenced_by is None
    await old.enqueue("t", [JobSpec(3)])
    assert old.committer.fenced_by == {"broker_id": "new", "epoch": 2}


async def test_not_found_on_a_stale_cache_rereads_before_answering() -> None:
    shared = MemStore()
    a, b = engine_on(shared, "a"), engine_on(shared, "b")
    await a.enqueue("t", [JobSpec("seed")])
    [job] = await b.enqueue("t", [JobSpec("via-b")])
    [claimed] = await b.claim("t", "w", count=1)
    # a has never seen the second job nor the claim; its ack must still work.
    if claimed["id"] != job["id"]:
        [claimed] = await b.claim("t", "w")
    assert (await a.ack("t", claimed["id"], claimed["lease_token"]))["status"] == "completed"


@pytest.mark.parametrize("poll", ["claim", "job"])
async def test_idle_long_polls_on_a_topic_share_their_reads_of_its_head(
    poll: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each long poll re-read the store every POLL_INTERVAL on a timer of its
    own: waiters that came at different times looked at different times, and
    each look read the head (a no-op claim is verified on a read made after
    it was asked), so N idle waiters cost N reads a POLL_INTERVAL on one
    topic, all billed on S3 (review of the broker's life cycle, round 25).
    They look together now, at the topic's tick, and share one read."""
    monkeypatch.setattr(engine_module, "POLL_INTERVAL", 0.2)
    store = HeadReads()
    q = engine_on(store)
    await q.enqueue("t", [JobSpec(1)])
    assert await q.claim("t", "w")  # the topic exists, and is empty now
    n, interval = 40, 0.2

    def wait() -> Any:
        if poll == "claim":
            return q.claim("t", "w", wait=10)
        return q.job("t", "not-yet", wait=10)

    polls = []
    for _ in range(n):  # the waiters come over an interval, as workers do
        polls.append(asyncio.create_task(wait()))
        await asyncio.sleep(interval / n)
    before, started = store.reads, time.monotonic()
    await asyncio.sleep(5 * interval)
    reads, took = store.reads - before, time.monotonic() - started
    for p in polls:
        p.cancel()
    await asyncio.gather(*polls, return_exceptions=True)
    await q.committer.close()
    assert reads <= took / interval + 2, f"{n} idle long polls read the head {reads} times"


async def test_claims_of_an_idle_topic_share_a_read_of_its_head_a_poll_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every claim that found nothing read the head first, however lately it
    was read (an answer that depends on the state was computed on a state read
    after it was asked): a fleet of idle workers, each sending a claim every
    few seconds, cost a GET a claim, forty a second for a hundred workers long
    polling 5 s (round 25). Such a claim now takes a state read since the
    topic's last look at the store, a POLL_INTERVAL at most ago, on a topic
    its broker owns (its memory is current but for what a broker standing in
    for it wrote); another broker's job is still found within that."""
    monkeypatch.setattr(engine_module, "POLL_INTERVAL", 0.2)
    store = HeadReads()
    q, other = engine_on(store, "a"), engine_on(store, "b")
    q.owns = lambda topic: True  # a's memory of t is current but for b's writes
    await q.enqueue("t", [JobSpec(1)])
    assert await q.claim("t", "w")  # the topic exists, and is empty now
    interval = 0.2
    before, started = store.reads, time.monotonic()
    claims = 0
    while time.monotonic() - started < 5 * interval:
        assert await q.claim("t", "w") == []
        claims += 1
        await asyncio.sleep(interval / 20)  # workers' claims, one after another
    reads, took = store.reads - before, time.monotonic() - started
    assert claims > 20
    assert reads <= took / interval + 2, f"{claims} claims read the head {reads} times"
    await other.enqueue("t", [JobSpec(2)])  # another broker's job
    [job] = await asyncio.wait_for(q.claim("t", "w", wait=10), 4 * interval)
    assert job["payload"] == 2
    await q.committer.close()
    await other.committer.close()


@pytest.mark.parametrize(
    ("owned", "enqueued_by"), [(True, "this broker"), (False, "another broker")]
)
async def test_long_polls_take_jobs_in_the_order_they_came(
    owned: bool, enqueued_by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each long poll waited on a timer of its own: those of one tick (the
    topic's next look at the store) fired in no set order, tried again in
    that order, and the first to try took the job, so among six workers
    waiting on a topic the one that had waited longest got it one time in
    six. They wait in one line now, woken oldest first, whether by a commit
    or by the tick: the jobs go out in the order the polls came."""
    monkeypatch.setattr(engine_module, "POLL_INTERVAL", 0.1)
    store = MemStore()
    q, other = engine_on(store, "a"), engine_on(store, "b")
    q.owns = lambda topic: owned
    producer = q if enqueued_by == "this broker" else other
    await q.enqueue("t", [JobSpec(0)])
    assert await q.claim("t", "w0")  # the topic exists, and is empty now
    took: list[str] = []
    a_job_taken = asyncio.Event()

    async def poll(worker: str) -> None:
        assert await q.claim("t", worker, wait=30)
        took.append(worker)
        a_job_taken.set()

    workers = [f"w{i}" for i in range(1, 7)]
    polls = []
    for worker in workers:
        polls.append(asyncio.create_task(poll(worker)))
        await until(lambda: q.committer.waiting("t") == len(polls))  # the next comes after it
    for n in range(1, len(workers) + 1):
        a_job_taken.clear()
        await asyncio.sleep(0.25)  # the polls wait through ticks between jobs, as workers do
        await producer.enqueue("t", [JobSpec(n)])
        await asyncio.wait_for(a_job_taken.wait(), 5)
    await asyncio.gather(*polls)
    assert took == workers
    await q.committer.close()
    await other.committer.close()


async def test_bounded_writes_with_a_deep_queue() -> None:
    store = FaultyStore(MemStore())
    q = engine_on(store)
    payload = {"order": "x" * 40}
    for _ in range(100):  # 100,000 jobs pending
        await q.enqueue("t", [JobSpec(payload) for _ in range(1000)])
    assert (await q.status("t"))["pending"] == 100_000
    store.put_sizes.clear()
    await asyncio.gather(*(q.enqueue("t", [JobSpec(payload)]) for _ in range(10)))
    await asyncio.gather(*(q.claim("t", "w") for _ in range(10)))
    assert max(store.put_sizes) < 256 * 1024
    assert len(orjson.dumps(await head_of(store))) < 256 * 1024


async def test_sweep_deletes_orphan_segments_only_after_two_sweeps() -> None:
    store = MemStore()
    q = engine_on(store, bounds=Bounds(inline_pending_bytes=500))
    await q.enqueue("t", [JobSpec("x" * 100) for _ in range(20)])  # spills a segment
    referenced = await store.list("topics/t/")
    assert referenced
    await store.put("topics/t/seg-p0-orphan.json", b'{"format": 1, "items": []}')
    assert await q.committer.sweep("t") == []  # first sighting: kept
    assert await q.committer.sweep("t") == ["topics/t/seg-p0-orphan.json"]
    assert await store.list("topics/t/") == referenced
    assert (await q.status("t"))["pending"] == 20


async def test_an_orphan_the_store_will_not_delete_stops_no_other() -> None:
    """A stray object whose name is no key (on S3, put there by another tool)
    sorts first; its delete() raises InvalidKey, which ended the sweep: no
    orphan of that topic was ever deleted again (review finding)."""
    store = MemStore()
    q = engine_on(store)
    await q.enqueue("t", [JobSpec(1)])
    store._objects["topics/t/seg 1.json"] = (b"stray", "e")  # as S3 may hold it
    await store.put("topics/t/seg-p0-orphan.json", b"{}")
    assert await q.committer.sweep("t") == []
    assert await q.committer.sweep("t") == ["topics/t/seg-p0-orphan.json"]
    assert await store.list("topics/t/") == ["topics/t/seg 1.json"]


async def test_the_sweeps_first_sightings_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the sweeps saw first is kept apart from the topics' states (which
    leave memory while idle), SIGHTINGS_KEPT keys in all: past it, the topics
    swept longest ago lose theirs, and a topic alone keeps that many (the
    rest are deleted at later sweeps)."""
    monkeypatch.setattr(groupcommit, "SIGHTINGS_KEPT", 5)
    store = MemStore()
    q = engine_on(store)
    for topic in ("a", "b"):
        await q.enqueue(topic, [JobSpec(1)])
        for i in range(3):
            await store.put(f"topics/{topic}/seg-p0-orphan{i}.json", b"{}")
        assert await q.committer.sweep(topic) == []
    assert q.committer.sighted() == ["b"]  # a's three and b's three are past five
    for i in range(3, 8):
        await store.put(f"topics/b/seg-p0-orphan{i}.json", b"{}")
    assert len(await q.committer.sweep("b")) == 3  # b's first three, seen twice
    assert q.committer._sighted_keys == 5
    assert len(await q.committer.sweep("b")) == 5
    assert await store.list("topics/b/") == []
    assert q.committer.sighted() == []
    assert await q.committer.sweep("a") == []  # seen again: a first sighting
    assert len(await q.committer.sweep("a")) == 3


def test_brokers_on_s3_batch_longer_and_spill_less() -> None:
    from simplequeue.broker.server import commit_settings
    from simplequeue.broker.settings import BrokerSettings

    local = commit_settings(BrokerSettings(store_url="file:///q"), "file:///q")
    s3 = commit_settings(BrokerSettings(store_url="s3://b/p"), "s3://b/p")
    told = commit_settings(BrokerSettings(store_url="s3://b/p", batch_wait=0.1), "s3://b/p")
    assert (local.linger, local.linger_max) == (0.5, 0.005)
    assert (s3.linger, s3.linger_max) == (2.0, 0.025)  # writes are slow, and each is billed
    assert told.linger_max == 0.1
    small = commit_settings(BrokerSettings(store_url="file:///q", cache_bytes=2**20), "file:///q")
    assert small.cache_bytes == 2**20
    # S3 bills requests, not bytes: larger heads, half as many segment PUTs.
    assert local.bounds == Bounds()
    assert s3.bounds.inline_pending_bytes == 2 * Bounds().inline_pending_bytes
    assert s3.bounds.inline_records_bytes == 2 * Bounds().inline_records_bytes


class SideBySide(MemStore):
    """Counts segment PUTs in flight at once; each waits (up to 1 s) for a second
    one to start, as a slow S3 PUT would."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = self.most = 0
        self.two = asyncio.Event()
        self.head_saw_in_flight: list[int] = []

    async def put_if(self, key: str, data: bytes, **condition: Any) -> str:
        if "/seg-" not in key:
            self.head_saw_in_flight.append(self.in_flight)
            return await super().put_if(key, data, **condition)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        if self.in_flight == 2:
            self.two.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.two.wait(), 1.0)
            return await super().put_if(key, data, **condition)
        finally:
            self.in_flight -= 1


async def test_a_batchs_new_segments_are_written_side_by_side_and_before_its_head() -> None:
    store = SideBySide()
    q = engine_on(store, bounds=Bounds(inline_pending_bytes=1024))
    await q.enqueue("t", [JobSpec("x" * 2000, priority=p) for p in (1, 2)])
    assert store.most == 2
    assert store.head_saw_in_flight == [0]  # the head waited for both
    assert len([k for k in await store.list("topics/t/") if "/seg-" in k]) == 2
    assert (await q.status("t"))["pending"] == 2


async def test_a_duplicate_another_broker_spilled_into_a_segment_is_caught() -> None:
    """Each broker keeps one id filter per topic across its states: after a lost
    race it must cover the segments the other broker wrote meanwhile."""
    store = MemStore()
    bounds = Bounds(inline_pending_bytes=400, loose_max=2, manifests_max=2)
    a = engine_on(store, "a", bounds=bounds)
    b = engine_on(store, "b", bounds=bounds)
    await b.enqueue("t", [JobSpec(i, id=f"b{i}") for i in range(40)])  # b's filter covers these
    assert [x["duplicate"] for x in await b.enqueue("t", [JobSpec(0, id="b1")])] == [True]
    for i in range(40):  # "a7" ends up in a segment under a manifest, written by a
        await a.enqueue("t", [JobSpec(i, id=f"a{i}")])
    run = (await head_of(store))["lanes"]["0"]["runs"][0]
    assert run["mans"] and run["segs"]
    answers = await b.enqueue("t", [JobSpec("again", id=f"a{i}") for i in range(40)])
    assert all(x["duplicate"] for x in answers)
    assert (await b.status("t"))["pending"] == 80


async def follow_ups_waiting(store: MemStore) -> Engine:
    """An engine on `store` whose topic "t" holds 40 follow-ups for another
    topic, spilled into its outbox's segments (nobody delivers them)."""
    q = engine_on(store)
    await q.enqueue("t", [JobSpec(i, id=f"j{i}") for i in range(40)])
    for job in await q.claim("t", "w", count=40, lease=600):
        follow = [FollowUpSpec({"pad": "x" * 500}, topic="other")]
        await q.ack("t", job["id"], job["lease_token"], enqueue=follow)
    return q


async def all_dues(q: Engine) -> dict[str, float | None]:
    """Engine.cached_dues(), its slices put together."""
    dues: dict[str, float | None] = {}
    async for some in q.cached_dues():
        dues.update(some)
    return dues


async def test_cached_dues_name_a_topic_whose_outbox_front_is_not_at_hand() -> None:
    """The owner's idle check (Duties._recheck) finds lost notes from
    cached_dues(), which reads no object: a topic whose due needed its
    outbox's front segment, not in the cache, was left out, so a lost note of
    it (follow-ups waiting, a lease running out) was never found. It is due
    now instead (its tend reads what it needs)."""
    store = MemStore()
    q = await follow_ups_waiting(store)
    outbox = (await head_of(store))["outbox"]
    assert outbox["segs"], "the follow-ups spilled into an outbox segment"
    q.committer.cache.forget([keys.segment("t", ref["k"]) for ref in outbox["segs"]])
    before = q.committer.clock()
    due = (await all_dues(q))["t"]
    assert due is not None and due <= q.committer.clock()
    assert due >= before - 1


async def test_cached_queries_let_go_of_what_they_read() -> None:
    """The objects a cached() query read were held by the state it answered
    from (whatever the cache's budget) until the topic's next write."""
    q = await follow_ups_waiting(MemStore())
    t = q.committer._topic("t")
    assert (await all_dues(q))["t"] is not None  # read the outbox's front
    assert t.state is not None and t.state._view.seen == {} and t.seen == {}
    reader = q.committer._reader(t)
    assert reader._view.seen == {}


async def test_cached_queries_keep_no_second_decoded_head() -> None:
    """/metrics and the idle check (cached()) built a reader state for every
    topic held, kept until its next write: a second decoded head a topic
    (about 477 KB for a head of 114 KB). They answer from the writers' state
    now, which is what landed, and keep nothing."""
    q = engine_on(MemStore())
    for k in range(5):
        await q.enqueue(f"t{k}", [JobSpec(i, priority=i % 3) for i in range(k + 1)])
    await all_dues(q)
    gauges = await q.cached_gauges()
    assert [gauges[f"t{k}"]["counts"]["pending"] for k in range(5)] == [1, 2, 3, 4, 5]
    assert [t.reader for t in q.committer._topics.values()] == [None] * 5


async def test_cached_queries_answer_what_landed_while_a_batch_is_in_flight() -> None:
    store = FaultyStore(MemStore())
    q = engine_on(store)
    await q.enqueue("t", [JobSpec(1)])
    store.gate = asyncio.Event()
    store.put_started.clear()
    writing = asyncio.create_task(q.enqueue("t", [JobSpec(2)]))
    await store.put_started.wait()  # applied to the writers' state, not landed
    assert q.cached_counts(["t"])["t"][1]["pending"] == 1
    assert q.committer._topics["t"].reader is None
    store.gate.set()
    await writing
    assert q.cached_counts(["t"])["t"][1]["pending"] == 2


class _HeldHead(MemStore):
    """A second broker's handle on the same named store, whose head writes of
    topic t wait for `gate` (its segments land first: a writer stalled between
    its objects and its head)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def put_if(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        if key == "topics/t.json":
            self.waiting.set()
            await self.gate.wait()
        return await super().put_if(key, data, if_match=if_match, if_none_match=if_none_match)


async def test_a_head_landed_between_the_sweeps_read_and_its_fence_keeps_its_segments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sweep(): "Whatever landed before the fence keeps what it names."
    A writer's segments, seen unreferenced by two sweeps, whose head lands
    after the second sweep read the references but before its fence, are not
    deleted: the fence's re-read references take them out of the doomed."""
    name = "review-mutants-fence"
    a_store, b_store = MemStore(name), _HeldHead(name)
    a = engine_on(a_store, "b1")
    b = engine_on(b_store, "b2", bounds=Bounds(inline_pending_bytes=500))
    await a.enqueue("t", [JobSpec(1)])
    tasks: list[asyncio.Task[Any]] = []
    tasks.append(asyncio.create_task(b.enqueue("t", [JobSpec("x" * 100) for _ in range(20)])))
    [landing] = tasks
    await asyncio.wait_for(b_store.waiting.wait(), 5)
    segments = await a_store.list("topics/t/")
    assert segments  # B's spilled segments landed, its head not yet
    assert await a.committer.sweep("t") == []  # first sighting

    real_read = a.committer.read

    async def read_then_land(topic: str, query: Any, *args: Any, **kwargs: Any) -> Any:
        got = await real_read(topic, query, *args, **kwargs)
        b_store.gate.set()  # B's head lands after the sweep read, before its fence
        await asyncio.wait_for(landing, 5)
        return got

    monkeypatch.setattr(a.committer, "read", read_then_land)
    try:
        deleted = await a.committer.sweep("t")
    finally:
        monkeypatch.undo()
        b_store.gate.set()
        await asyncio.wait_for(landing, 5)
    assert deleted == []
    assert set(segments) <= set(await a_store.list("topics/t/"))
    assert (await a.status("t"))["pending"] == 21


async def test_metrics_report_a_topic_whose_front_segment_left_the_cache() -> None:
    """/metrics left out every topic whose oldest-due scan wanted a segment the
    cache no longer held (1,000 topics under the default cache: 715 of them
    gone from the scrape). Its counts and totals are in its head: they are
    reported, and its age is left out (not known; 0 would say none waits)."""
    q = engine_on(MemStore(), cache_bytes=256 * 1024)
    await q.enqueue("t0", [JobSpec("x" * 1000) for _ in range(300)])
    await q.enqueue("t1", [JobSpec("x" * 1000) for _ in range(300)])  # t0's pushed out
    await q.enqueue("t2", [JobSpec("small")])  # in its head
    t0 = q.committer._topics["t0"]
    assert t0.state is not None
    fronts = [
        ref["k"]
        for lane in t0.state.head["lanes"].values()
        for r in lane["runs"]
        for ref in r["segs"][:1]
    ]
    assert fronts and not any(keys.segment("t0", k) in q.committer.cache for k in fronts)
    gauges = await q.cached_gauges()
    assert {name: g["counts"]["pending"] for name, g in gauges.items()} == {
        "t0": 300,
        "t1": 300,
        "t2": 1,
    }
    assert gauges["t2"]["oldest_pending_age"] is not None
    assert gauges["t0"]["oldest_pending_age"] is None


async def test_the_head_a_held_topic_keeps_takes_about_its_length(tmp_path: Path) -> None:
    """The committer keeps each held topic's head as it landed (up to
    topics_max, 10,000 topics). It kept orjson.dumps' output, which holds the
    buffer it was written in: ~7 KB more than each ~800-byte head of one job
    (200 topics: 1.46 MB of slack for 162 KB of heads), some 8-18 times a
    longer head's length (review of memory: 65-180 MB over 10,000 topics,
    outside --cache-mb). What a copy of exactly each head's length gives back
    is what the heads held beyond their length."""
    # On localfs: a MemStore would hold the very bytes written.
    q = Engine(GroupCommitter(LocalStore(tmp_path), broker_id="b", settings=CommitSettings()))
    topics = 200
    tracemalloc.start()  # before the heads are made: it counts only what it saw made
    try:
        for i in range(topics):
            await q.enqueue(f"t{i:04d}", [JobSpec({"i": i}, id=f"job-{i}")])
        held = [t for t in q.committer._topics.values() if t.committed]
        assert len(held) == topics
        length = sum(len(t.committed) for t in held if t.committed)
        gc.collect()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for t in held:  # each head as a copy of exactly its length
                assert t.committed is not None
                t.committed = bytes(memoryview(t.committed))
            gc.collect()
            slack = before - tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    finally:
        await q.committer.close()
    assert slack <= length // 4, (
        f"{topics} held topics' heads: {length} bytes long, {slack} bytes more held"
    )
