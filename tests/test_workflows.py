"""Follow-up jobs committed with the ack (SPEC 9) and waiting for a job to
finish (GET /jobs/{id}?wait=S), through brokers on one store."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from simplequeue import keys
from simplequeue.api import AckRequest, FollowUpSpec, JobSpec
from simplequeue.broker.duties import DutySettings
from simplequeue.broker.engine import Engine
from simplequeue.broker.membership import rendezvous
from simplequeue.errors import InvalidRequest, LeaseLost, StoreUnavailable
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore.memfs import MemStore
from simplequeue.state import Bounds
from simplequeue.state.topic import follow_up_id
from tests.helpers.until import until
from tests.test_ownership import cluster, owner_of

StartBroker = Callable[..., Awaitable[Any]]


async def head(store: MemStore, topic: str) -> dict[str, Any]:
    data, _ = await store.get(keys.head(topic))
    got: dict[str, Any] = orjson.loads(data)
    return got


async def claimed(q: Engine, topic: str, job_id: str) -> dict[str, Any]:
    await q.enqueue(topic, [JobSpec({"step": 1}, id=job_id)])
    [job] = await q.claim(topic, "w")
    return job


# --- the state machine and the engine ---------------------------------------------------


async def test_follow_ups_for_the_same_topic_are_in_the_acks_own_write() -> None:
    store = MemStore()
    q = Engine(GroupCommitter(store, broker_id="b"))
    job = await claimed(q, "t", "src")
    answer = await q.ack(
        "t", "src", job["lease_token"], "ok", [FollowUpSpec("next"), FollowUpSpec("x", id="mine")]
    )
    assert answer["enqueued"] == ["src:0", "mine"]
    written = await head(store, "t")  # one write: the ack and its follow-ups
    assert written["counters"]["completed"] == 1 and written["counters"]["enqueued"] == 3
    assert written["outbox"]["n"] == 0
    assert (await q.job("t", "src:0"))["payload"] == "next"


async def test_an_ack_answers_which_follow_ups_were_duplicates_and_not_enqueued() -> None:
    """A follow-up for the acked topic whose id the topic has (here the acked
    job's own: a job that enqueues itself again under its id) is not enqueued
    again. The answer listed it under "enqueued" all the same, and nothing
    said it was dropped."""
    q = Engine(GroupCommitter(MemStore(), broker_id="b"))
    job = await claimed(q, "t", "poll")
    answer = await q.ack(
        "t", "poll", job["lease_token"], "r", [FollowUpSpec("again", id="poll"), FollowUpSpec(2)]
    )
    assert (answer["enqueued"], answer["duplicates"]) == (["poll:1"], ["poll"])
    status = await q.status("t")
    assert status["pending"] == 1 and status["completed"] == 1


async def test_an_ack_whose_follow_ups_repeat_an_id_lists_the_one_enqueued() -> None:
    """Two follow-ups of one id: the first is enqueued, the second is the
    duplicate. The answer told them apart by id, not by position, and said
    nothing was enqueued under it (a follow-up for another topic of that id
    was left out too, though it went to the outbox)."""
    q = Engine(GroupCommitter(MemStore(), broker_id="b"))
    job = await claimed(q, "t", "src")
    follow = [
        FollowUpSpec("a", id="x"),
        FollowUpSpec("b", id="x"),
        FollowUpSpec("c", id="x", topic="u"),
    ]
    answer = await q.ack("t", "src", job["lease_token"], "r", follow)
    assert (await q.job("t", "x"))["payload"] == "a"
    assert (answer["enqueued"], answer["duplicates"]) == (["x", "x"], ["x"])


async def test_follow_ups_for_other_topics_wait_in_the_outbox_of_the_same_write() -> None:
    store = MemStore()
    q = Engine(GroupCommitter(store, broker_id="b"))
    job = await claimed(q, "t", "src")
    await q.ack("t", "src", job["lease_token"], None, [FollowUpSpec("o", topic="other")])
    written = await head(store, "t")
    [item] = written["outbox"]["in"]
    assert item["id"] == "src:0" and item["topic"] == "other" and item["payload"] == "o"
    assert await q.outbox("t", 10) == [item]
    assert await q.delivered("t", [("other", "src:0")]) == (1, None)  # nothing else due
    assert await q.delivered("t", [("other", "src:0")]) == (0, None)  # twice: nothing taken
    assert (await head(store, "t"))["outbox"]["n"] == 0
    assert (await head(store, "t"))["counters"]["delivered"] == 1


async def test_an_ack_that_fails_enqueues_nothing() -> None:
    store = MemStore()
    q = Engine(GroupCommitter(store, broker_id="b"))
    job = await claimed(q, "t", "src")
    before = await head(store, "t")
    follow = [FollowUpSpec("here"), FollowUpSpec("there", topic="other")]
    with pytest.raises(LeaseLost):
        await q.ack("t", "src", "not-the-token", None, follow)
    with pytest.raises(InvalidRequest):  # a follow-up that cannot be stored
        await q.ack("t", "src", job["lease_token"], None, [FollowUpSpec({"n": 2**70})])
    assert await head(store, "t") == before
    assert (await q.status("t"))["claimed"] == 1


def test_derived_ids_are_valid_ids_whatever_the_source_id() -> None:
    assert follow_up_id("a", 3) == "a:3"
    long = follow_up_id("x" * 256, 999)
    assert len(long) <= 256 and long.endswith(":999")
    assert long == follow_up_id("x" * 256, 999)


@pytest.mark.parametrize("enqueue", ["abc", b"abc", {"payload": 1, "topic": "t"}])
def test_follow_ups_that_are_one_string_or_dict_are_refused_not_iterated(enqueue: Any) -> None:
    """Done(enqueue="abc") enqueued a job per character, and Done(enqueue={
    "payload": ...}) one per key (review finding): a clear error now, which
    fails the job (a handler's) or the call (ack)."""
    from simplequeue.client.followups import follow_up_specs

    with pytest.raises(InvalidRequest, match="a list of jobs"):
        follow_up_specs(enqueue)
    assert follow_up_specs(["abc"]) == [FollowUpSpec("abc")]


async def test_ack_many_answers_each_ack_in_order_and_commits_them_in_one_write() -> None:
    """Each ack is its own entry of one batch: a bad result, an unknown job and a
    stale token fail alone, in their places; the good ones land in one write."""
    store = MemStore()
    committer = GroupCommitter(store, broker_id="b")
    q = Engine(committer)
    await q.enqueue("t", [JobSpec(i, id=f"j{i}") for i in range(4)])
    jobs = await q.claim("t", "w", count=4)
    writes = committer.stats.writes
    answers = await q.ack_many(
        "t",
        [
            AckRequest("j0", jobs[0]["lease_token"], result="done"),
            AckRequest("j1", jobs[1]["lease_token"], result={"n": 2**70}),  # not storable
            AckRequest("ghost"),
            AckRequest("j2", "not-its-token"),
            AckRequest("j3", jobs[3]["lease_token"], enqueue=[FollowUpSpec("next")]),
        ],
    )
    assert [(a["id"], a["status"]) for a in answers] == [
        ("j0", "completed"),
        ("j1", "invalid"),
        ("ghost", "not_found"),
        ("j2", "conflict"),
        ("j3", "completed"),
    ]
    assert "cannot be stored" in answers[1]["error"] and answers[4]["enqueued"] == ["j3:0"]
    assert committer.stats.writes == writes + 1
    written = await head(store, "t")
    assert written["counters"]["completed"] == 2 and written["counters"]["enqueued"] == 5
    assert (await q.job("t", "j1"))["status"] == "claimed"


async def test_the_outbox_spills_like_everything_else() -> None:
    store = MemStore()
    bounds = Bounds(inline_outbox_bytes=2000, loose_max=4)
    q = Engine(GroupCommitter(store, broker_id="b", settings=CommitSettings(bounds=bounds)))
    await q.enqueue("t", [JobSpec(i, id=f"s{i}") for i in range(300)])
    jobs = await q.claim("t", "w", count=300)
    acks = [
        AckRequest(j["id"], j["lease_token"], enqueue=[FollowUpSpec({"pad": "x" * 100}, topic="o")])
        for j in jobs
    ]
    await q.ack_many("t", acks)
    written = await head(store, "t")
    assert len(orjson.dumps(written)) < 16 * 1024
    assert written["outbox"]["n"] == 300 and (
        written["outbox"]["mans"] or written["outbox"]["segs"]
    )
    front = await q.outbox("t", 1000)
    assert [f["id"] for f in front] == [f"s{i}:0" for i in range(300)]  # in the order acked
    await q.delivered("t", [(f["topic"], f["id"]) for f in front[:150]])
    assert [f["id"] for f in await q.outbox("t", 1000)] == [f"s{i}:0" for i in range(150, 300)]


def test_delivering_behind_a_held_back_outbox_front_does_not_walk_the_front(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """50,000 follow-ups wait at the outbox's front for a topic that does not
    take them (down, or its head corrupt). Each round's outbox_delivered()
    found the few it delivered by walking the outbox from its front: every
    held-back follow-up, every round, in a mutation of the committer (450,009
    walked for 10 deliveries, 40-66 ms of the event loop each; review
    finding). Each is found by its id now."""
    from simplequeue.state.chain import Chain
    from tests.helpers.states import fresh, reread

    s, now = fresh("src"), 1000.0
    for b in range(50):
        s.enqueue([JobSpec(b, id=f"j{b}")], now)
        [job] = s.claim("w", 30.0, 1, now)
        held = [FollowUpSpec(k, topic="down") for k in range(1000)]
        s.ack(job["id"], job["lease_token"], None, now, held)
        s = reread(s, now, b)
    walked = 0
    places = Chain.places

    def counting(self: Chain) -> Iterator[Any]:
        nonlocal walked
        for place in places(self):
            walked += 1
            yield place

    monkeypatch.setattr(Chain, "places", counting)
    for r in range(10):
        s.enqueue([JobSpec(r, id=f"g{r}")], now)
        [job] = s.claim("w", 30.0, 1, now)
        s.ack(job["id"], job["lease_token"], None, now, [FollowUpSpec(r, topic="up")])
        s = reread(s, now, 100 + r)
        assert s.outbox_delivered([("up", f"g{r}:0"), ("up", "never")]) == 1
        s = reread(s, now, 200 + r)
    assert walked == 0
    assert s.outbox_size() == 50_000 and s.totals()["delivered"] == 10


# --- through brokers ----------------------------------------------------------------------


async def post(s: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with s.post(url, json=body) as r:
        return r.status, await r.json()


async def test_a_follow_up_reaches_a_topic_another_broker_owns_within_a_second(
    start_broker: StartBroker,
) -> None:
    store = MemStore()
    brokers = await cluster(start_broker, store, 3)
    url = brokers[0].url
    async with aiohttp.ClientSession() as s:
        for i in range(10):
            await post(s, f"{url}/topics/src/enqueue", {"id": f"j{i}", "payload": i})
        status, body = await post(s, f"{url}/topics/src/claim", {"worker_id": "w", "count": 10})
        acks = [
            {
                "job_id": j["id"],
                "lease_token": j["lease_token"],
                "enqueue": [{"topic": f"dst{n}", "payload": j["payload"]} for n in range(3)],
            }
            for j in body["jobs"]
        ]
        started = time.monotonic()
        status, body = await post(s, f"{url}/topics/src/ack", {"acks": acks})
        assert status == 200 and all(r["status"] == "completed" for r in body["results"])
        for n in range(3):
            owner = owner_of(brokers, f"dst{n}")
            while (await owner.engine.status(f"dst{n}"))["pending"] < 10:
                assert time.monotonic() - started < 1.5, f"dst{n} still waits"
                await owner.committer.wait_changed(f"dst{n}", 0.1)
    source = owner_of(brokers, "src")
    while source.duties.delivered < 30:  # taken out of the outbox after delivery
        assert time.monotonic() - started < 3, source.duties.delivered
        await source.committer.wait_changed("src", 0.1)
    assert sum(b.duties.delivered for b in brokers) == 30


async def test_waiting_for_a_job_answers_when_it_finishes(start_broker: StartBroker) -> None:
    broker = await start_broker(MemStore())
    async with aiohttp.ClientSession() as s:
        await post(s, f"{broker.url}/topics/t/enqueue", {"id": "j", "payload": 1})
        _, claim = await post(s, f"{broker.url}/topics/t/claim", {"worker_id": "w"})
        waiting = asyncio.ensure_future(s.get(f"{broker.url}/topics/t/jobs/j?wait=30"))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # it waits: the job is claimed
        started = time.monotonic()
        ack = {"job_id": "j", "lease_token": claim["job"]["lease_token"], "result": [42]}
        await post(s, f"{broker.url}/topics/t/ack", ack)
        async with await waiting as r:
            job = await r.json()
        assert time.monotonic() - started < 1.0  # woken by the commit, not a poll
        assert job["status"] == "completed" and job["result"] == [42]
        async with s.get(f"{broker.url}/topics/t/jobs/nope?wait=0.3") as r:
            assert r.status == 404
        for bad in ("-1", "61", "soon"):
            async with s.get(f"{broker.url}/topics/t/jobs/j?wait={bad}") as r:
                assert r.status == 400, bad


# --- delivery that does not go through at once ---------------------------------------------


async def until_true(
    broker: Any, topic: str, check: Callable[[], Awaitable[object]], within: float = 5.0
) -> None:
    """Until `check()` holds, looking again whenever `topic` changes on `broker`."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "not delivered in time"
        await broker.committer.wait_changed(topic, 0.1)


async def pending(engine: Engine, topic: str) -> int:
    return int((await engine.status(topic))["pending"])


async def delayed(engine: Engine, topic: str) -> int:
    return int((await engine.status(topic))["delayed"])


async def acked_with(
    s: aiohttp.ClientSession, url: str, follow_ups: list[list[dict[str, Any]]]
) -> None:
    """One job of topic src per entry of `follow_ups`, claimed and acked with them."""
    n = len(follow_ups)
    jobs = [{"id": f"j{i}", "payload": i} for i in range(n)]
    assert (await post(s, f"{url}/topics/src/enqueue", {"jobs": jobs}))[0] == 201
    _, claim = await post(s, f"{url}/topics/src/claim", {"worker_id": "w", "count": n})
    for job, enqueue in zip(claim["jobs"], follow_ups, strict=True):
        ack = {"job_id": job["id"], "lease_token": job["lease_token"], "enqueue": enqueue}
        status, body = await post(s, f"{url}/topics/src/ack", ack)
        assert status == 200, body


async def test_one_id_sent_to_two_topics_is_delivered_to_each(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ids are a topic's: one ack may send "order-42" to topic a and to b.
    Delivered items left the outbox by id alone: when b took its job and a
    did not (yet), a's item was taken out, and a never got its job."""
    broker = await start_broker(MemStore())
    monkeypatch.setattr(broker.duties, "settings", DutySettings(retry_failed=0.1))
    url, engine = broker.url, broker.engine
    async with aiohttp.ClientSession() as s:
        # a holds jobs of 64 priorities: one of a 65th waits until one drains.
        full = [{"id": f"p{p}", "payload": p, "priority": p} for p in range(64)]
        assert (await post(s, f"{url}/topics/a/enqueue", {"jobs": full}))[0] == 201
        follow_ups = [
            {"topic": "a", "id": "order-42", "payload": "for a", "priority": 100},
            {"topic": "b", "id": "order-42", "payload": "for b"},
        ]
        await acked_with(s, url, [follow_ups])
        await until_true(broker, "b", lambda: pending(engine, "b"), within=3)
        status, claimed = await post(s, f"{url}/topics/a/claim", {"worker_id": "w", "count": 64})
        assert status == 200
        acks = [{"job_id": j["id"], "lease_token": j["lease_token"]} for j in claimed["jobs"]]
        assert (await post(s, f"{url}/topics/a/ack", {"acks": acks}))[0] == 200
        await until_true(broker, "a", lambda: pending(engine, "a"), within=3)
    assert (await engine.job("a", "order-42"))["payload"] == "for a"
    assert (await engine.status("b"))["enqueued"] == 1


async def test_follow_ups_two_topics_send_one_with_one_derived_id_are_not_lost_unseen(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Job ids are a topic's: topics a and b may both hold "order-1", and each
    acked with a follow-up for "notify" derives "order-1:0" (SPEC 9: from the
    source job's id and its index). notify takes the second for a repeat of
    the first. Nothing said so; the delivering owner now logs it, with what
    to do (the README says it too)."""
    broker = await start_broker(MemStore())
    for source in ("a", "b"):
        job = await claimed(broker.engine, source, "order-1")
        follow_up = FollowUpSpec(f"from {source}", topic="notify")
        await broker.engine.ack(source, "order-1", job["lease_token"], None, [follow_up])
    await until(lambda: broker.duties.delivered == 2, within=5)
    assert (await broker.engine.status("notify"))["enqueued"] == 1
    [said] = [r.getMessage() for r in caplog.records if "in notify already" in r.getMessage()]
    assert said.endswith("need ids of their own") and ": order-1:0." in said


async def test_a_corrupt_target_holds_back_no_other_topics_follow_ups(
    start_broker: StartBroker,
) -> None:
    """A delivery round read the outbox's first 500 follow-ups: 500 for a
    topic whose head is corrupt held back those for every other topic."""
    store = MemStore()
    await store.put(keys.head("bad"), b"this is not a head")
    broker = await start_broker(store)
    async with aiohttp.ClientSession() as s:
        to_bad = [{"topic": "bad", "payload": i} for i in range(500)]
        await acked_with(s, broker.url, [to_bad, [{"topic": "good", "payload": "x"}]])
        await until_true(broker, "good", lambda: pending(broker.engine, "good"), within=3)
    assert len(await broker.engine.outbox("src", 1000)) == 500  # those wait for "bad"


class Unreachable:
    """Where follow-ups go while their topic's owner cannot be reached."""

    async def enqueue(self, topic: str, specs: list[JobSpec]) -> list[dict[str, Any]]:
        raise StoreUnavailable(f"{topic}'s owner does not answer")


async def test_follow_ups_bigger_together_than_max_body_reach_a_topic_another_broker_owns(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The follow-ups for a topic another broker owns went in one request per
    round: six acks' 300 KB each (a backlog, built while that owner could not
    be reached) were refused there as larger than --max-body, every round."""
    brokers = await cluster(start_broker, MemStore(), 2)
    source = owner_of(brokers, "src")
    dst = next(f"dst{i}" for i in range(100) if owner_of(brokers, f"dst{i}") is not source)
    target = owner_of(brokers, dst)
    monkeypatch.setattr(source.duties, "settings", DutySettings(retry_failed=0.2))
    reachable, source.duties.deliver_to = source.duties.deliver_to, Unreachable()
    async with aiohttp.ClientSession() as s:
        await acked_with(s, source.url, [[{"topic": dst, "payload": "x" * 300_000}]] * 6)
    assert len(await source.engine.outbox("src", 10)) == 6
    source.duties.deliver_to = reachable

    async def all_six() -> bool:
        return await pending(target.engine, dst) == 6

    async def taken_out() -> bool:
        return await source.engine.outbox("src", 10) == []

    await until_true(target, dst, all_six, within=3)
    await until_true(source, "src", taken_out, within=3)


async def test_follow_ups_of_more_priorities_than_a_topic_holds_at_once_are_delivered(
    start_broker: StartBroker,
) -> None:
    """65 follow-ups of 65 priorities for another topic: the ack was answered
    200, and then every delivery round was refused as a whole (a topic holds
    jobs of at most 64 priorities at once): none was ever delivered. Now
    those that fit go, and the last when a priority drains."""
    broker = await start_broker(MemStore())
    async with aiohttp.ClientSession() as s:
        await acked_with(
            s, broker.url, [[{"topic": "dst", "payload": p, "priority": p} for p in range(65)]]
        )

        async def all_but_one() -> bool:
            return await pending(broker.engine, "dst") == 64

        await until_true(broker, "dst", all_but_one, within=3)


class OlderOwner:
    """A topic's owner older than `run_at`: it refuses the field, as msgspec
    words it. What it was sent is kept."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.sent = inner, list[list[JobSpec]]()

    async def enqueue(self, topic: str, specs: list[JobSpec]) -> list[dict[str, Any]]:
        self.sent.append(specs)
        if any(s.run_at is not None for s in specs):
            raise InvalidRequest("Object contains unknown field `run_at` - at `$.jobs[0]`")
        got: list[dict[str, Any]] = await self.inner.enqueue(topic, specs)
        return got


async def test_a_follow_up_for_another_topic_is_due_at_its_acks_time_plus_its_delay(
    start_broker: StartBroker,
) -> None:
    """Its delay was counted again from the delivery, on the deliverer's clock
    (a time made a delay, then a time again by the target's owner): each
    broker's clock error added, and a delivery late by a minute (its target
    down) made the job a minute late. Its time goes as a time now; to an
    owner older than `run_at`, as a delay from the delivery."""
    broker = await start_broker(MemStore())
    older = broker.duties.deliver_to = OlderOwner(broker.duties.deliver_to)
    async with aiohttp.ClientSession() as s:
        url = broker.url
        assert (await post(s, f"{url}/topics/src/enqueue", {"id": "a", "payload": 0}))[0] == 201
        _, got = await post(s, f"{url}/topics/src/claim", {"worker_id": "w"})
        job = got["job"]
        follow_ups = [{"topic": "dst", "id": "later", "payload": 1, "delay": 300}]
        body = {"job_id": "a", "lease_token": job["lease_token"], "enqueue": follow_ups}
        assert (await post(s, f"{url}/topics/src/ack", body))[0] == 200
    acked_at = (await broker.engine.job("src", "a"))["finished_at"]
    await until_true(broker, "dst", lambda: delayed(broker.engine, "dst"), within=5)
    [timed, relative] = older.sent
    assert timed[0].run_at == pytest.approx(acked_at + 300, abs=1e-6) and timed[0].delay == 0
    assert relative[0].run_at is None and 299 < relative[0].delay <= 300
    assert (await broker.engine.job("dst", "later"))["run_at"] == pytest.approx(
        acked_at + 300, abs=1
    )


class Recording:
    """Where follow-ups go (`inner`), keeping what each request carried."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.sent = inner, list[list[JobSpec]]()

    async def enqueue(self, topic: str, specs: list[JobSpec]) -> list[dict[str, Any]]:
        self.sent.append(specs)
        got: list[dict[str, Any]] = await self.inner.enqueue(topic, specs)
        return got


async def test_a_refusal_naming_a_topic_called_run_at_is_not_taken_for_an_older_owner(
    start_broker: StartBroker,
) -> None:
    """Delivery fell back to delays from its own clock on any refusal whose
    text held "run_at": a target topic named so, refused for its 64
    priorities, got a second request at each try, with delays counted on the
    deliverer's clock (if a lane freed between the two, with its error)."""
    broker = await start_broker(MemStore())
    await broker.engine.enqueue("run_at", [JobSpec(p, priority=p) for p in range(64)])
    recording = broker.duties.deliver_to = Recording(broker.duties.deliver_to)
    async with aiohttp.ClientSession() as s:
        follow_up = {"topic": "run_at", "payload": 1, "priority": 99, "delay": 300}
        await acked_with(s, broker.url, [[follow_up]])

    async def held_back() -> bool:
        back = broker.duties._held_back.get("src")
        return back is not None and bool(back.items)

    await until_true(broker, "src", held_back, within=5)
    relative = [s for specs in recording.sent for s in specs if s.run_at is None]
    assert relative == [], f"{len(recording.sent)} requests, {len(relative)} with delays"


class Counting:
    """Where follow-ups go (`inner`, or nowhere: a store that does not answer),
    counting the requests."""

    def __init__(self, inner: Any = None) -> None:
        self.inner, self.calls = inner, 0

    async def enqueue(self, topic: str, specs: list[JobSpec]) -> list[dict[str, Any]]:
        self.calls += 1
        if self.inner is None:
            raise StoreUnavailable(f"{topic}: the store does not answer")
        got: list[dict[str, Any]] = await self.inner.enqueue(topic, specs)
        return got


async def test_delivery_waits_between_tries_when_many_topics_fail(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With eight topics failing, each delivery round found one more and the
    rounds ran out: "more to deliver" sent the topic round again at once, for
    ever (hundreds of requests a second, no pause)."""
    broker = await start_broker(MemStore())
    failing = Counting()
    monkeypatch.setattr(broker.duties, "deliver_to", failing)
    async with aiohttp.ClientSession() as s:
        fan_out = [[{"topic": f"t{k}", "payload": i} for i in range(500)] for k in range(8)]
        await acked_with(s, broker.url, fan_out)
    await until(lambda: failing.calls >= 8)
    tried = failing.calls
    await asyncio.sleep(0.5)  # time passes: within retry_failed (5 s), no more tries
    assert failing.calls == tried


async def test_follow_ups_refused_wait_for_their_retry_however_often_the_source_is_written(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 follow-ups a topic refused (it holds 64 priorities; theirs is a
    65th) were split down to single ones on every try, ~1,000 requests, and
    every write of the source topic started another try."""
    broker = await start_broker(MemStore())
    counting = Counting(broker.duties.deliver_to)
    monkeypatch.setattr(broker.duties, "deliver_to", counting)
    url = broker.url
    async with aiohttp.ClientSession() as s:
        full = [{"id": f"p{p}", "payload": p, "priority": p} for p in range(64)]
        assert (await post(s, f"{url}/topics/a/enqueue", {"jobs": full}))[0] == 201
        await acked_with(
            s, url, [[{"topic": "a", "payload": i, "priority": 100} for i in range(500)]]
        )
        await until(lambda: counting.calls >= 1)
        for i in range(10):  # writes of the source: each wakes its duties
            assert (await post(s, f"{url}/topics/src/enqueue", {"payload": i}))[0] == 201
    assert counting.calls == 1
    assert len(await broker.engine.outbox("src", 1000)) == 500


async def test_follow_ups_a_topic_takes_are_not_held_back_by_those_it_refuses(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 refused follow-ups of a topic filled every round's front: one for
    the same topic that it would take, behind them, was never sent."""
    broker = await start_broker(MemStore())
    url, engine = broker.url, broker.engine
    async with aiohttp.ClientSession() as s:
        full = [{"id": f"p{p}", "payload": p, "priority": p} for p in range(64)]
        assert (await post(s, f"{url}/topics/a/enqueue", {"jobs": full}))[0] == 201
        refused = [{"topic": "a", "payload": i, "priority": 100} for i in range(500)]
        fits = [{"topic": "a", "id": "fits", "payload": "x", "priority": 0}]
        await acked_with(s, url, [refused, fits])

        async def delivered() -> bool:
            return await pending(engine, "a") == 65

        await until_true(broker, "a", delivered, within=3)


class SlowFailing:
    """Where follow-ups go when their topic's store fails only after `delay` s;
    when each try started."""

    def __init__(self, delay: float) -> None:
        self.delay, self.starts = delay, list[float]()

    async def enqueue(self, topic: str, specs: list[JobSpec]) -> list[dict[str, Any]]:
        self.starts.append(time.monotonic())
        await asyncio.sleep(self.delay)
        raise StoreUnavailable(f"{topic}: no answer within {self.delay} s")


async def test_a_topic_that_fails_slowly_is_still_given_its_pause_between_tries(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pause counted from the round's start: a try that took longer than
    retry_failed had used it up, and the next came at once, rounds on end,
    holding up every other topic's duties meanwhile."""
    broker = await start_broker(MemStore())
    monkeypatch.setattr(broker.duties, "settings", DutySettings(retry_failed=0.3))
    slow = SlowFailing(0.4)
    monkeypatch.setattr(broker.duties, "deliver_to", slow)
    async with aiohttp.ClientSession() as s:
        await acked_with(s, broker.url, [[{"topic": "dst", "payload": 1}]])
    await until(lambda: len(slow.starts) >= 3, within=5)
    pauses = [b - (a + slow.delay) for a, b in zip(slow.starts, slow.starts[1:], strict=False)]
    assert min(pauses) >= 0.25, pauses


async def test_follow_ups_reach_a_broker_whose_max_body_is_smaller(
    start_broker: StartBroker,
) -> None:
    """Parts are cut at half of this broker's --max-body: for an owner with a
    smaller one, a part refused as too large (413) was held back whole, and
    refused again at every try."""
    store = MemStore()
    big = await start_broker(store, broker_id="A", max_body=4 * 1024 * 1024)
    small = await start_broker(store, broker_id="B")
    for b in (big, small):
        await b.membership.step()
    src = next(f"src{i}" for i in range(100) if big.membership.owns(f"src{i}"))
    dst = next(f"dst{i}" for i in range(100) if small.membership.owns(f"dst{i}"))
    # This broker's parts are cut at 2 MB, over the other's --max-body.
    big.duties.settings = DutySettings(retry_failed=0.1, deliver_bytes=2 * 1024 * 1024)
    reachable, big.duties.deliver_to = big.duties.deliver_to, Unreachable()  # a backlog
    n = 6
    async with aiohttp.ClientSession() as s:
        jobs = [{"id": f"j{i}", "payload": i} for i in range(n)]
        assert (await post(s, f"{big.url}/topics/{src}/enqueue", {"jobs": jobs}))[0] == 201
        _, claim = await post(s, f"{big.url}/topics/{src}/claim", {"worker_id": "w", "count": n})
        for job in claim["jobs"]:
            ack = {
                "job_id": job["id"],
                "lease_token": job["lease_token"],
                "enqueue": [{"topic": dst, "payload": "x" * 300_000}],
            }
            assert (await post(s, f"{big.url}/topics/{src}/ack", ack))[0] == 200
    big.duties.deliver_to = reachable

    async def all_six() -> bool:
        return await pending(small.engine, dst) == n

    await until_true(small, dst, all_six, within=4)


async def test_rounds_that_end_on_held_back_follow_ups_do_not_put_off_the_rest(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the last round's progress counted: when it met refused
    follow-ups only, those that would go behind them waited retry_failed."""
    from simplequeue.broker import duties

    monkeypatch.setattr(duties, "DELIVER_BATCH", 2)
    monkeypatch.setattr(duties, "DELIVER_ROUNDS", 2)
    broker = await start_broker(MemStore())
    monkeypatch.setattr(broker.duties, "settings", DutySettings(retry_failed=0.5))
    url, engine = broker.url, broker.engine
    reachable, broker.duties.deliver_to = broker.duties.deliver_to, Unreachable()
    async with aiohttp.ClientSession() as s:
        full = [{"id": f"p{p}", "payload": p, "priority": p} for p in range(64)]
        assert (await post(s, f"{url}/topics/a/enqueue", {"jobs": full}))[0] == 201
        await acked_with(
            s,
            url,
            [
                [{"topic": "ok", "payload": i} for i in range(2)],
                [{"topic": "a", "payload": i, "priority": 100} for i in range(2)],
                [{"topic": "late", "payload": "x"}],
            ],
        )
    broker.duties.deliver_to = reachable
    await asyncio.sleep(0.5)  # the pause of the topics that failed passes
    broker.duties.note("src", 0.0)

    async def late_delivered() -> bool:
        return await pending(engine, "late") == 1

    # Well within the pause that "a"'s refused follow-ups get from now on.
    await until_true(broker, "late", late_delivered, within=0.4)


async def test_a_lease_is_reaped_on_time_while_follow_ups_are_held_back(
    start_broker: StartBroker,
) -> None:
    """While follow-ups were held back, the topic's next wake-up was their
    retry, 5 s away: a lease running out sooner was reaped that late."""
    broker = await start_broker(MemStore())
    engine = broker.engine
    await engine.enqueue("a", [JobSpec(p, id=f"p{p}", priority=p) for p in range(64)])
    await engine.enqueue("src", [JobSpec("j", id="j"), JobSpec("k", id="k")])
    [job] = await engine.claim("src", "w")
    await engine.ack(
        "src", "j", job["lease_token"], None, [FollowUpSpec(1, topic="a", priority=100)]
    )
    await until(lambda: "src" in broker.duties._held_back)
    await engine.claim("src", "w2", lease=0.3)
    started = time.monotonic()
    await until(lambda: broker.duties.reaped == 1, within=4)
    assert time.monotonic() - started < 2.0


async def test_a_write_landing_on_a_topic_whose_outbox_front_left_the_cache_notes_its_due(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """A landing tells the duties when its topic is next due, from the head
    and the outbox's front segment. Once that segment had left the cache
    (shared by every topic, --cache-mb), SegmentMissing was raised in the
    listener: an ERROR with a traceback at every write of the topic, and the
    write's due (a new lease's expiry, the follow-ups) was lost: the lease
    waited for the 30 s recheck, or for a later due the topic had."""
    broker = await start_broker(MemStore(), cache_bytes=256 * 1024)
    broker.duties.deliver_to = Unreachable()
    engine = broker.engine
    await engine.enqueue("src", [JobSpec(i, id=f"j{i}") for i in range(12)])
    big = "x" * 40_000  # the outbox spills; 12 of them overflow a 256 KiB cache
    for job in await engine.claim("src", "w", count=12):
        await engine.ack(
            "src", job["id"], job["lease_token"], None, [FollowUpSpec(big, topic="dst")]
        )
    broker.duties.note("src", None)  # what the duties knew of it goes
    with caplog.at_level(logging.ERROR):
        await engine.enqueue("src", [JobSpec("more", id="more")])
        await engine.claim("src", "w", lease=1.0)
    assert not [r for r in caplog.records if "listener failed" in r.getMessage()]
    assert broker.duties._due.get("src") is not None


async def test_what_was_held_back_for_topics_owned_elsewhere_now_is_let_go(
    start_broker: StartBroker,
) -> None:
    """What a topic's delivery held back stayed in memory for good once
    another broker owned the topic (ownership moves at every restart)."""
    store = MemStore()
    a = await start_broker(store, broker_id="A")
    sources = [t for t in (f"s{i}" for i in range(200)) if rendezvous(t, "B") > rendezvous(t, "A")]
    sources = sources[:5]
    await a.engine.enqueue("a", [JobSpec(p, id=f"p{p}", priority=p) for p in range(64)])
    for src in sources:
        await a.engine.enqueue(src, [JobSpec("j", id="j")])
        [job] = await a.engine.claim(src, "w")
        await a.engine.ack(
            src, "j", job["lease_token"], None, [FollowUpSpec(1, topic="a", priority=100)]
        )
    await until(lambda: all(s in a.duties._held_back for s in sources))
    await start_broker(store, broker_id="B")
    await a.membership.step()
    assert not any(s in a.duties._held_back for s in sources)


class Gated:
    """Where follow-ups go once `gate` opens; `waiting` says one is held there."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.gate, self.waiting = inner, asyncio.Event(), asyncio.Event()

    async def enqueue(self, topic: str, specs: list[JobSpec]) -> list[dict[str, Any]]:
        self.waiting.set()
        await self.gate.wait()
        got: list[dict[str, Any]] = await self.inner.enqueue(topic, specs)
        return got


async def test_a_change_of_owner_during_a_delivery_fails_nothing(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """The topic went to another broker while its delivery was under way: what
    it held back was let go of meanwhile, and the delivery's end failed on it
    (KeyError: "tending failed", a traceback, the wake-up put off)."""
    store = MemStore()
    a = await start_broker(store, broker_id="A")
    src = next(t for t in (f"s{i}" for i in range(200)) if rendezvous(t, "B") > rendezvous(t, "A"))
    gated = Gated(a.duties.deliver_to)
    a.duties.deliver_to = gated
    await a.engine.enqueue(src, [JobSpec("j", id="j")])
    [job] = await a.engine.claim(src, "w")
    await a.engine.ack(src, "j", job["lease_token"], None, [FollowUpSpec(1, topic="dst")])
    await asyncio.wait_for(gated.waiting.wait(), 5)  # the delivery is under way
    await start_broker(store, broker_id="B")
    await a.membership.step()  # B owns the source now: A lets go of it
    caplog.clear()
    gated.gate.set()
    await until(lambda: a.duties.delivered == 1)
    await a.committer.wait_changed(src, 0.2)  # up to 0.2 s: the tending ends meanwhile
    assert not [r for r in caplog.records if "tending" in r.getMessage()]


@pytest.mark.parametrize("enqueue", ["abc", {"payload": 1, "topic": "t"}])
async def test_a_sync_clients_ack_refuses_follow_ups_given_as_one_string_or_dict(
    start_broker: Any, enqueue: Any
) -> None:
    """SyncClient.ack made its follow-ups a list before the check
    (`list(enqueue)`): sc.ack(job, enqueue="abc") enqueued "a", "b" and "c"
    (a dict: one job per key) after b997d8b (review finding)."""
    from simplequeue.client import SyncClient
    from simplequeue.errors import InvalidRequest
    from simplequeue.objstore.memfs import MemStore

    broker = await start_broker(MemStore())
    sc = SyncClient(broker.url, topic="t")
    try:
        await asyncio.to_thread(sc.enqueue, "parent")
        job = await asyncio.to_thread(sc.claim, "w")
        assert job is not None
        with pytest.raises(InvalidRequest, match="a list of jobs"):
            await asyncio.wait_for(asyncio.to_thread(sc.ack, job, None, enqueue), 10)
        pending = (await asyncio.to_thread(sc.status))["pending"]
        assert pending == 0, f"{pending} follow-ups enqueued from {enqueue!r}"
    finally:
        await asyncio.to_thread(sc.close)


async def test_the_ack_answers_its_follow_ups_ids_in_the_order_they_were_given() -> None:
    """The answer's "enqueued" listed the ids of the follow-ups for the same
    topic first, then those for others, whatever order they were given in: a
    caller matching ids to its follow-ups by position got the wrong id for
    each (review finding)."""
    q = Engine(GroupCommitter(MemStore(), broker_id="b"))
    job = await claimed(q, "t", "src")
    follow = [FollowUpSpec("elsewhere", topic="other"), FollowUpSpec("here")]
    answer = await q.ack("t", "src", job["lease_token"], None, follow)
    assert answer["enqueued"] == ["src:0", "src:1"]


async def test_follow_ups_behind_50000_held_back_ones_are_still_delivered(
    start_broker: StartBroker,
) -> None:
    """A topic that does not take its follow-ups (a corrupt head here; one
    down, or refusing them, alike) "holds back no other topic's". But a round
    looked at the outbox's first OUTBOX_SCAN (50,000) follow-ups only, those
    held back counted: behind 50,000 for the failing topic, a follow-up for a
    healthy one was never delivered (review finding). The next round goes on
    from where the held-back front ends."""
    store = MemStore()
    await store.put(keys.head("bad"), b"this is not a head")
    broker = await start_broker(store)
    engine = broker.engine
    n = 50
    await engine.enqueue("src", [JobSpec(i, id=f"j{i}") for i in range(n + 1)])
    jobs = await engine.claim("src", "w", count=n + 1)
    jobs.sort(key=lambda j: int(j["id"][1:]))
    acks = [
        AckRequest(
            j["id"], j["lease_token"], enqueue=[FollowUpSpec(k, topic="bad") for k in range(1000)]
        )
        for j in jobs[:n]
    ]
    last = jobs[n]
    acks.append(
        AckRequest(last["id"], last["lease_token"], enqueue=[FollowUpSpec("x", topic="good")])
    )
    answers = await engine.ack_many("src", acks)
    assert all(a["status"] == "completed" for a in answers)
    await until_true(broker, "good", lambda: pending(engine, "good"), within=8)
    assert len(await engine.outbox("src", 10**6)) == n * 1000  # those wait for "bad"


async def _acked_with_large_follow_ups(engine: Engine, n: int, topic: str) -> None:
    """`n` jobs of topic src acked, each with a follow-up of 100 KB for `topic`."""
    await engine.enqueue("src", [JobSpec(i, id=f"j{i}") for i in range(n)])
    jobs = await engine.claim("src", "w", count=n)
    acks = [
        AckRequest(
            j["id"], j["lease_token"], enqueue=[FollowUpSpec(j["id"] + "x" * 100_000, topic=topic)]
        )
        for j in jobs
    ]
    assert all(a["status"] == "completed" for a in await engine.ack_many("src", acks))


async def test_a_backlog_of_follow_ups_larger_than_the_cache_is_still_delivered(
    start_broker: StartBroker,
) -> None:
    """Follow-ups for a topic that was down pile up in the source's outbox
    (50 MB here: 500 of 100 KB). Once it was back, each delivery round read
    the outbox's front through windows of 1,000 follow-ups and kept up to
    500, bounded in number, not in bytes: more than the object cache holds
    (8 MiB here; the default 256 MiB was passed by 1,000 of 300 KB), so the
    read failed "the object cache is too small" every round, for ever, and
    not one was delivered (review finding). A round now reads the outbox a
    few segments at a time, no more once those come to what its requests
    carry (bounded by the cache, as claims are)."""
    store = MemStore()
    await store.put(keys.head("dst"), b"this is not a head")  # the target, down
    broker = await start_broker(store, cache_bytes=8 << 20)
    engine = broker.engine
    n = 500
    await _acked_with_large_follow_ups(engine, n, "dst")
    await store.delete(keys.head("dst"))  # the target is back
    engine.forget(["dst"])
    await until_true(broker, "dst", lambda: _pending_at_least(engine, "dst", n), within=30)


async def _pending_at_least(engine: Engine, topic: str, k: int) -> bool:
    return await pending(engine, topic) >= k


class Tried(Unreachable):
    """Unreachable, counting the tries."""

    def __init__(self) -> None:
        self.tries = 0

    async def enqueue(self, topic: str, specs: list[JobSpec]) -> list[dict[str, Any]]:
        self.tries += 1
        return await super().enqueue(topic, specs)


async def test_a_backlog_for_a_topic_that_stays_down_is_not_read_again_at_each_try(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 follow-ups of 100 KB wait for a topic that is down, through an 8
    MiB cache. Each try of that topic read the outbox's front for it, then,
    the topic failing again, read the whole backlog behind it again from the
    front, to find where the follow-ups held back end: 20 MB a try (4,830
    GETs in 20 s, review finding). Where the front held back ended before
    the try is known again once the topic fails again."""
    from tests.test_bounds import CountingStore

    store = CountingStore()
    broker = await start_broker(store, cache_bytes=8 << 20)
    monkeypatch.setattr(broker.duties, "settings", DutySettings(retry_failed=0.2))
    tried = broker.duties.deliver_to = Tried()
    await _acked_with_large_follow_ups(broker.engine, 200, "dst")
    await until(lambda: tried.tries >= 3, within=10)  # past the first read through
    read, tries = store.read, tried.tries
    await until(lambda: tried.tries >= tries + 5, within=10)
    per_try = (store.read - read) / (tried.tries - tries)
    assert per_try < 10_000_000, f"{per_try / 1e6:.1f} MB read a try, for a 20 MB backlog"


class DownFor:
    """Where follow-ups go (`inner`), except into topic `down`, whose owner
    cannot be reached; counting its tries."""

    def __init__(self, inner: Any, down: str) -> None:
        self.inner, self.down, self.tries = inner, down, 0

    async def enqueue(self, topic: str, specs: list[JobSpec]) -> list[dict[str, Any]]:
        if topic == self.down:
            self.tries += 1
            raise StoreUnavailable(f"{topic}'s owner does not answer")
        got: list[dict[str, Any]] = await self.inner.enqueue(topic, specs)
        return got


async def _acked_for(engine: Engine, n: int, topic: str, prefix: str) -> list[str]:
    """`n` jobs of topic src acked, each with a follow-up for `topic`; their ids."""
    await engine.enqueue("src", [JobSpec(i, id=f"{prefix}{i}") for i in range(n)])
    jobs = await engine.claim("src", "w", count=n)
    acks = [
        AckRequest(j["id"], j["lease_token"], enqueue=[FollowUpSpec(1, topic=topic)]) for j in jobs
    ]
    assert all(a["status"] == "completed" for a in await engine.ack_many("src", acks))
    return [f"{j['id']}:0" for j in jobs]


async def test_follow_ups_another_broker_took_out_in_front_do_not_hide_those_behind(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """600 follow-ups wait for topic `down`, which this broker cannot reach:
    it remembers that the outbox's first 600 are held back. Another broker
    (a stand-in, say) delivers the first 100 and takes them out; 3 follow-ups
    for a healthy topic, acked then, stand at 500-502. Every round started at
    the remembered 600, past them, for as long as `down` stayed down (none
    delivered in 5 s and 24 tries; review finding). Positions from the front
    hold while no one else takes follow-ups out (counters.delivered)."""
    store = MemStore()
    broker = await start_broker(store)
    monkeypatch.setattr(broker.duties, "settings", DutySettings(retry_failed=0.2))
    deliver = broker.duties.deliver_to = DownFor(broker.duties.deliver_to, "down")
    engine = broker.engine
    down = await _acked_for(engine, 600, "down", "d")
    await until(lambda: deliver.tries >= 3, within=10)  # its front remembered
    other = Engine(GroupCommitter(store, broker_id="other"))
    try:
        await other.enqueue("down", [JobSpec(1, id=i) for i in down[:100]])
        await other.delivered("src", [("down", i) for i in down[:100]])
        assert len(await other.outbox("src", 10**4)) == 500
    finally:
        await other.committer.close()
    await _acked_for(engine, 3, "up", "u")
    await until_true(broker, "up", lambda: _pending_at_least(engine, "up", 3), within=5)

    async def taken_out() -> bool:
        return len(await engine.outbox("src", 10**4)) == 500  # those wait for `down`

    await until_true(broker, "src", taken_out)


class Held:
    """Where follow-ups go when each enqueue waits until `go` is set (a slow
    store, a slow owner); `waiting` counts those in flight."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.go = asyncio.Event()
        self.waiting = 0

    async def enqueue(self, topic: str, specs: list[JobSpec]) -> list[dict[str, Any]]:
        self.waiting += 1
        await self.go.wait()
        self.waiting -= 1
        got: list[dict[str, Any]] = await self.inner.enqueue(topic, specs)
        return got


async def test_a_slow_fan_out_holds_back_no_other_topics_leases(
    start_broker: StartBroker,
) -> None:
    """One ack fans out to 8 topics, whose enqueues are slow. The delivery went
    one topic after the other, and the owner's duties waited for the whole of
    it before they looked at anything due meanwhile: a lease of another topic
    that ran out was reaped only after it (review finding). Now each topic is
    tended in a task of its own, and a fan-out's topics are delivered into
    side by side."""
    broker = await start_broker(MemStore())
    held = broker.duties.deliver_to = Held(broker.duties.deliver_to)
    engine = broker.engine
    await engine.enqueue("src", [JobSpec("j", id="j")])
    await engine.enqueue("y", [JobSpec("y", id="y")])
    [job] = await engine.claim("src", "w")
    fan_out = [FollowUpSpec(i, topic=f"t{i}") for i in range(8)]
    await engine.ack("src", "j", job["lease_token"], None, fan_out)
    await until(lambda: held.waiting == 8, within=5)  # all 8 at once
    await engine.claim("y", "w", lease=0.3)
    await until(lambda: broker.duties.reaped == 1, within=5)  # the delivery still held
    assert held.waiting == 8
    held.go.set()
    await until_true(broker, "t7", lambda: pending(engine, "t7"))
