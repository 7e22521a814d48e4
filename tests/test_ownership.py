"""Topic ownership across brokers (SPEC 4.3): one owner per topic writes it,
any broker answers for it, clients follow the owner, only the owner reaps, and
an idle broker reads no heads. Brokers here run in this process, on one store;
tests/test_brokers.py and the campaigns kill and pause real ones."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import itertools
import logging
import os
import signal
import socket
import subprocess
import time
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohappyeyeballs
import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from simplequeue import keys
from simplequeue.api import FORWARDED_HEADER, REPLAYED_HEADER, Job, JobSpec, ScheduleRequest
from simplequeue.broker import engine as engine_module
from simplequeue.broker import forwarding, page
from simplequeue.broker import membership as membership_module
from simplequeue.broker.duties import HEAP_SLACK, TEND_PARALLEL, DutySettings
from simplequeue.broker.engine import Engine
from simplequeue.broker.forwarding import Answer, Forwarder, Here, _Unreachable
from simplequeue.broker.membership import Membership, Peer, rendezvous
from simplequeue.client import Client
from simplequeue.errors import StoreRefused, StoreUnavailable
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore import ObjectStore
from simplequeue.objstore.localfs import LocalStore
from simplequeue.objstore.memfs import MemStore
from simplequeue.records import BrokerRecord
from simplequeue.state import Policy
from tests.helpers.faults import Outage
from tests.helpers.fs_events import record_folder_reads
from tests.helpers.loop_turns import TopicsBetweenTurns
from tests.helpers.monotonic import moved_clock
from tests.helpers.until import until, until_async
from tests.test_localfs import spawn

StartBroker = Callable[..., Awaitable[Any]]


async def cluster(
    start_broker: StartBroker, store: ObjectStore, n: int, **settings: Any
) -> list[Any]:
    """`n` brokers on `store` that know each other."""
    brokers = [await start_broker(store, broker_id=f"b{i}", **settings) for i in range(n)]
    for b in brokers:  # one round each: every broker sees every other
        await b.membership.step()
    return brokers


async def rounds_in_hand(start_broker: StartBroker, store: ObjectStore) -> tuple[Any, Any]:
    """Brokers "A" and "B" on `store` that know each other, their registry
    rounds stopped: the test takes them, one at a time."""
    a = await start_broker(store, broker_id="A")
    b = await start_broker(store, broker_id="B")
    for broker in (a, b):
        await broker.membership.step()
    for broker in (a, b):
        broker._tasks[1].cancel()
    await asyncio.gather(a._tasks[1], b._tasks[1], return_exceptions=True)
    return a, b


def owner_of(brokers: list[Any], topic: str) -> Any:
    return max(brokers, key=lambda b: rendezvous(topic, b.settings.broker_id))


def owner_and_other(brokers: list[Any], topic: str) -> tuple[Any, Any]:
    """`topic`'s owner among two brokers, and the one that passes its requests on."""
    owner = owner_of(brokers, topic)
    return owner, next(b for b in brokers if b is not owner)


def topic_won_by(winner: str, *losers: str) -> str:
    """A topic whose rendezvous hash ranks broker id `winner` above each of `losers`."""
    return next(
        t
        for t in (f"t{i}" for i in range(1000))
        if all(rendezvous(t, winner) > rendezvous(t, loser) for loser in losers)
    )


async def head(store: ObjectStore, topic: str) -> dict[str, Any]:
    data, _ = await store.get(keys.head(topic))
    got: dict[str, Any] = orjson.loads(data)
    return got


async def post(s: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any, Any]:
    async with s.post(url, json=body) as r:
        return r.status, await r.json(), r.headers


def owns_again(broker: Any, owner: Any, topic: str = "t") -> bool:
    """Whether `broker` routes `topic` to `owner` first again (no longer suspect)."""
    return bool(broker.membership.owner(topic).broker_id == owner.settings.broker_id)


async def enqueue_once_tried(s: aiohttp.ClientSession, broker: Any, *job_ids: str) -> None:
    """Jobs `job_ids` in topic t, through `broker`, each with one attempt."""
    for job_id in job_ids:
        job = {"id": job_id, "payload": 1, "max_attempts": 1}
        await post(s, f"{broker.url}/topics/t/enqueue", job)


def answer_too_late(monkeypatch: pytest.MonkeyPatch, engine: Any, *names: str) -> None:
    """Make `engine`'s operations `names` do their work, then answer a second
    late: past a forwarding broker's timeout (forward_timeout=0.3 here)."""

    def stalling(done: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def then_stall(*args: Any, **kwargs: Any) -> Any:
            answer = await done(*args, **kwargs)
            await asyncio.sleep(1.0)  # landed; the answer comes too late
            return answer

        return then_stall

    for name in names:
        monkeypatch.setattr(engine, name, stalling(getattr(engine, name)))


# --- routing ----------------------------------------------------------------------------


async def test_any_broker_answers_for_a_topic_and_only_its_owner_writes_it(
    start_broker: StartBroker,
) -> None:
    store = MemStore()
    brokers = await cluster(start_broker, store, 3)
    owner = owner_of(brokers, "hot")
    async with aiohttp.ClientSession() as s:
        for i in range(30):
            b = brokers[i % 3]
            status, _, headers = await post(s, f"{b.url}/topics/hot/enqueue", {"payload": i})
            assert status == 201
            assert headers["Simplequeue-Owner"] == owner.url
        for i in range(30):
            b = brokers[i % 3]
            status, body, _ = await post(s, f"{b.url}/topics/hot/claim", {"worker_id": "w"})
            assert status == 200
            job = body["job"]
            ack = {"job_id": job["id"], "lease_token": job["lease_token"]}
            status, _, _ = await post(s, f"{brokers[(i + 1) % 3].url}/topics/hot/ack", ack)
            assert status == 200
    written = await head(store, "hot")
    assert list(written["writers"]) == [owner.settings.broker_id]
    assert written["counters"]["completed"] == 30
    assert sum(b.committer.stats.conflicts for b in brokers) == 0


async def test_an_enqueue_without_ids_is_passed_on_with_ids(start_broker: StartBroker) -> None:
    """A forwarded enqueue may be sent on to the next broker when the first does
    not answer: it must then be a duplicate there, so the forwarder gives every
    job an id before it sends it."""
    store = MemStore()
    brokers = await cluster(start_broker, store, 2)
    owner, other = owner_and_other(brokers, "t")
    async with aiohttp.ClientSession() as s:
        status, body, _ = await post(
            s, f"{other.url}/topics/t/enqueue", {"jobs": [{"payload": 1}, {"payload": 2}]}
        )
        assert status == 201 and len(set(body["ids"])) == 2
        again = {"jobs": [{"id": i, "payload": 0} for i in body["ids"]]}
        status, body, _ = await post(s, f"{owner.url}/topics/t/enqueue", again)
        assert status == 200 and len(body["duplicates"]) == 2


async def test_a_release_through_another_broker_answers_what_the_owner_released(
    start_broker: StartBroker,
) -> None:
    store = MemStore()
    brokers = await cluster(start_broker, store, 2)
    _, other = owner_and_other(brokers, "t")
    t = f"{other.url}/topics/t"
    async with aiohttp.ClientSession() as s:
        await post(s, f"{t}/enqueue", {"jobs": [{"payload": 1}, {"payload": 2}]})
        _, body, _ = await post(s, f"{t}/claim", {"worker_id": "w", "count": 2})
        held = [{"job_id": j["id"], "lease_token": j["lease_token"]} for j in body["jobs"]]
        await post(s, f"{t}/ack", held[0])
        status, body, _ = await post(s, f"{t}/release", {"claims": held})
        assert (status, body["released"]) == (200, 1)
        async with s.get(f"{t}/status") as r:
            counts = await r.json()
    assert (counts["completed"], counts["pending"], counts["claimed"]) == (1, 1, 0)


async def test_a_head_through_another_broker_has_the_gets_headers(
    start_broker: StartBroker,
) -> None:
    """HEAD answers GET's headers without its body: passed on to the owner as a
    HEAD, its empty answer made a Content-Length of 0 (round 20's note)."""
    brokers = await cluster(start_broker, MemStore(), 2)
    _, other = owner_and_other(brokers, "t")
    url = f"{other.url}/topics/t/status"
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            got = (r.status, r.headers["Content-Length"], r.headers["Content-Type"])
        async with s.head(url) as r:
            assert (r.status, r.headers["Content-Length"], r.headers["Content-Type"]) == got
            assert await r.read() == b""


async def get(s: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    """GET `url` as written, %-encoded: "%2E%2E" is not taken for "..", a step."""
    async with s.get(URL(url, encoded=True)) as r:
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("job_id", "quoted"),
    [
        (".", "%2E"),
        ("..", "%2E%2E"),
        ("a/b", "a%2Fb"),
        ("a?b", "a%3Fb"),
        ("50%", "50%25"),
        ("a b", "a%20b"),
        ("日本", "%E6%97%A5%E6%9C%AC"),
        ("\ufffd", "%EF%BF%BD"),  # what an escape that is not UTF-8 (%FF, a 400) was taken for
    ],
)
async def test_a_job_whatever_its_id_is_found_through_a_broker_that_does_not_own_its_topic(
    start_broker: StartBroker, job_id: str, quoted: str
) -> None:
    """Job ids are any printable text, sent %-encoded ("." and ".." too, as
    the SDK does). Passed on as a str, the path was decoded and its dot
    segments dropped: GET /topics/t/jobs/%2E%2E reached the owner as GET
    /topics/t/ (404)."""
    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    async with aiohttp.ClientSession() as s:
        status, _, _ = await post(s, f"{owner.url}/topics/t/enqueue", {"id": job_id, "payload": 1})
        assert status == 201
        for b in (owner, other):
            status, body = await get(s, f"{b.url}/topics/t/jobs/{quoted}?wait=0")
            assert (status, body["id"]) == (200, job_id), body


async def test_a_schedule_named_dot_dot_is_deleted_through_a_broker_that_does_not_own_its_topic(
    start_broker: StartBroker,
) -> None:
    """A schedule could be named ".." until round 25 (one made then is still deleted).
    Passed on, DELETE /topics/t/schedules/%2E%2E reached the owner as
    DELETE /topics/t/ (404)."""
    from tests.test_schedules import made_by_an_older_broker

    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    await made_by_an_older_broker(owner, "t", "..")
    async with (
        aiohttp.ClientSession() as s,
        s.delete(URL(f"{other.url}/topics/t/schedules/%2E%2E", encoded=True)) as r,
    ):
        assert r.status == 200, await r.text()
        assert r.headers["Simplequeue-Owner"] == owner.url
    assert await owner.engine.schedules("t") == []


async def test_an_error_names_the_broker_that_served_it(start_broker: StartBroker) -> None:
    """An answer names who served it (Simplequeue-Owner), so that the SDK sends
    the topic's next requests there: an error did not, served by the owner
    asked directly or by a broker standing in for it (an empty claim's 404,
    a long poll passed on out of its wait), and a test of the Forwarder's
    descriptors could not tell an owner's 404 from a stand-in's."""
    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    async with aiohttp.ClientSession() as s:
        for via in (owner, other):
            status, _, headers = await post(s, f"{via.url}/topics/t/claim", {"worker_id": "w"})
            assert (status, headers.get("Simplequeue-Owner")) == (404, owner.url), via.url
        other.membership.suspect(owner.membership.me.broker_id, 60)  # stands in for it
        status, _, headers = await post(s, f"{other.url}/topics/t/claim", {"worker_id": "w"})
        assert (status, headers.get("Simplequeue-Owner")) == (404, other.url)


async def test_the_sdk_sends_a_topics_requests_straight_to_its_owner(
    start_broker: StartBroker,
) -> None:
    store = MemStore()
    brokers = await cluster(start_broker, store, 3)
    _, other = owner_and_other(brokers, "orders")
    async with Client(other.url, topic="orders") as q:
        await q.enqueue("first")  # through `other`, which names the owner
        passed_on = other.forwarder.forwarded
        for n in range(20):
            await q.enqueue(n)
        while job := await q.claim("w"):
            await q.ack(job)
        assert other.forwarder.forwarded == passed_on, "later requests went through `other`"
        assert (await q.status())["completed"] == 21


async def test_the_sdk_goes_back_to_its_broker_when_the_owner_stops(
    start_broker: StartBroker,
) -> None:
    store = MemStore()
    brokers = await cluster(start_broker, store, 2, broker_lease=3.0)
    owner, other = owner_and_other(brokers, "t")
    async with Client(other.url, topic="t") as q:
        await q.enqueue("a")
        await owner.stop()  # its record goes; `other` serves the topic now
        await other.membership.step()
        await q.enqueue("b")
        assert (await q.status())["pending"] == 2


async def test_redis_clients_get_the_same_answers_through_any_broker(
    start_broker: StartBroker,
) -> None:
    import redis.asyncio as redis

    store = MemStore()
    brokers = await cluster(start_broker, store, 2, redis_addr="127.0.0.1:0")
    owner, other = owner_and_other(brokers, "emails")
    r = redis.Redis(host="127.0.0.1", port=other.redis.port)
    try:
        assert await r.rpush("emails", "a", "b", "c") == 3
        assert await r.llen("emails") == 3
        assert await r.lpop("emails") == b"a"
        job_id = await r.xadd("emails", {"to": "x"})
        got = await r.xreadgroup("g", "c1", {"emails": ">"}, count=5)
        ids = [entry[0] for entry in got[0][1]]
        assert job_id in ids and len(ids) == 3
        assert await r.xack("emails", "g", *ids) == 3
        assert await r.blpop(["emails"], timeout=0.2) is None
        # completed by the owner as pops (/complete): on several keys, NOACK
        await r.rpush("emails", "d", "e")
        assert list(await r.blpop(["none", "emails"], timeout=5)) == [b"emails", b"d"]
        got = await r.xreadgroup("g", "c1", {"emails": ">"}, noack=True)
        assert [fields for _, fields in got[0][1]] == [{b"payload": b"e"}]
        assert await r.llen("emails") == 0 and await r.xlen("emails") == 0
    finally:
        await r.aclose()
    assert list((await head(store, "emails"))["writers"]) == [owner.settings.broker_id]


async def test_a_pop_passed_on_after_an_idle_spell_as_long_as_the_keepalive_is_answered(
    start_broker: StartBroker,
) -> None:
    """The owner's server closes a connection idle for --keepalive-timeout. A
    pop passed on over it just as that happens met "server disconnected": an
    AmbiguousWrite (TRYAGAIN to a Redis client), and a healthy owner suspected.
    Here the request is written before the owner's close is due to run (the
    loop is held past it), which is the race made certain."""
    keepalive = 0.2
    brokers = await cluster(start_broker, MemStore(), 2, keepalive_timeout=keepalive)
    _, other = owner_and_other(brokers, "t")
    pop = ("t", "POST", "/topics/t/pop", b'{"worker_id": "w"}')
    assert (await other.forwarder.route(*pop, repeatable=False)).status == 404
    await asyncio.sleep(keepalive * 0.9)
    # Hold the loop: the owner's close is due, and has not run yet.
    time.sleep(keepalive * 0.2)  # noqa: ASYNC251
    answer = await other.forwarder.route(*pop, repeatable=False)
    assert answer.status == 404  # nothing to pop, answered
    assert other.forwarder.fallbacks == 0


async def test_a_broker_lets_its_idle_connection_to_the_owner_go_before_the_owner_would(
    start_broker: StartBroker,
) -> None:
    """83d13d1 gave the forwarder half the brokers' keep-alive, but aiohttp
    keeps an idle connection up to twice its own (its cleanup runs once per
    keep-alive): a connection used twice in a row lived as long as the
    owner's, and the race was back. The owner now sees it closed first."""
    keepalive = 1.0
    brokers = await cluster(start_broker, MemStore(), 2, keepalive_timeout=keepalive)
    owner, other = owner_and_other(brokers, "t")
    pop = ("t", "POST", "/topics/t/pop", b'{"worker_id": "w"}')
    for _ in range(2):
        assert (await other.forwarder.route(*pop, repeatable=False)).status == 404
    assert owner.http.open_connections == 1
    await until(lambda: owner.http.open_connections == 0, within=0.9 * keepalive)
    assert (await other.forwarder.route(*pop, repeatable=False)).status == 404
    assert other.forwarder.fallbacks == 0


# --- reaping ----------------------------------------------------------------------------


async def test_the_claims_of_a_broker_that_stopped_before_the_others_saw_it_are_reaped(
    start_broker: StartBroker,
) -> None:
    """A broker that started, took a topic, handed out a claim and stopped
    cleanly, all before another broker's next look at the registry: that one
    saw no departure, never read the topic again, and the claim stayed
    claimed past its lease while the topic was idle. The stopping broker now
    tells the next owner of each topic it has something due on."""
    store = MemStore()
    a = await start_broker(store, broker_id="A", broker_lease=60.0)  # looks every 20 s
    topic = next(
        t for t in (f"t{i}" for i in range(100)) if rendezvous(t, "B") > rendezvous(t, "A")
    )
    await a.engine.enqueue(topic, [JobSpec("p", id="j")])
    b = await start_broker(store, broker_id="B", broker_lease=60.0)
    assert b.membership.owns(topic) and not a.membership.peer("B")
    await b.engine.claim(topic, "w", lease=0.3)
    await b.stop()
    await until(lambda: a.duties.reaped == 1, within=5)
    assert (await a.engine.job(topic, "j"))["status"] == "pending"


async def test_only_the_owner_reaps_and_it_reaps_what_it_was_told_of(
    start_broker: StartBroker,
) -> None:
    store = MemStore()
    brokers = await cluster(start_broker, store, 2, policy=Policy(default_lease=0.3))
    owner, other = owner_and_other(brokers, "t")
    async with Client(other.url, topic="t") as q:
        await q.enqueue("x", id="j")
        assert await q.claim("w")
        for _ in range(100):  # the lease runs out; the owner's duties wake for it
            if (await q.job("j")).status == "pending":
                break
            await owner.committer.wait_changed("t", 0.1)
        assert (await q.job("j")).status == "pending"
    assert owner.duties.reaped == 1 and other.duties.reaped == 0


async def test_the_owner_reaps_more_expired_leases_than_one_reap_takes_without_waiting(
    start_broker: StartBroker,
) -> None:
    """A reap takes a bounded part of the leases that ran out (review of the
    storage engine v2, round 25: one took them all, and failed on many): its
    tend says the topic is due again now, and the owner's duties tend it
    again at once, until none is left."""
    broker = await start_broker(MemStore())
    engine = broker.engine
    await engine.enqueue("t", [JobSpec({"pad": "x" * 1000}, id=f"j{i}") for i in range(1000)])
    assert len(await engine.claim("t", "w", lease=0.3, count=1000)) == 1000  # the worker dies
    await until(lambda: broker.duties.reaped == 1000, within=5)
    counts = await engine.status("t")
    assert (counts["claimed"], counts["pending"]) == (0, 1000)


async def test_a_topic_whose_tending_failed_unexpectedly_is_tended_again(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error not of simplequeue's (a bug) in a topic's tending failed the
    whole round, and the topic left the duties: its leases were reaped by no
    one."""
    broker = await start_broker(MemStore(), policy=Policy(default_lease=0.3))
    monkeypatch.setattr(broker.duties, "settings", DutySettings(retry_failed=0.1))
    tend, failed = broker.duties.engine.tend, []

    async def tend_broken_once(topic: str) -> Any:
        if not failed:
            failed.append(topic)
            raise RuntimeError("injected: a bug")
        return await tend(topic)

    monkeypatch.setattr(broker.duties.engine, "tend", tend_broken_once)
    async with Client(broker.url, topic="t") as q:
        await q.enqueue("x", id="j")
        assert await q.claim("w")
        for _ in range(100):  # the lease runs out; tending fails once, then reaps
            if broker.duties.reaped:
                break
            await broker.committer.wait_changed("t", 0.1)
    assert (failed, broker.duties.reaped) == (["t"], 1)


async def test_topics_due_at_one_instant_are_tended_by_a_bounded_number_of_tasks(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 4.1: memory follows the topics served, not the topics due. A
    schedule's slots are the multiples of `every` since the epoch: every topic
    with a per-minute schedule comes due in the same second. The duties made a
    task per topic due, each then waiting for one of TEND_PARALLEL places:
    100,000 topics due together held some 178 MB of waiting tasks (1.8 KB
    each) and held the loop ~0.8 s making them, at every slot; 2,000 due
    together were 2,000 tasks (review of the duties)."""
    broker = await start_broker(MemStore())
    await broker.duties.taken_over.wait()
    n = 2000
    names = [f"s{i:05d}" for i in range(n)]
    spec = ScheduleRequest({"tick": 1}, every=5)
    for i in range(0, n, 200):
        await asyncio.gather(
            *(broker.engine.put_schedule(t, "tick", spec) for t in names[i : i + 200])
        )
    duties = broker.duties
    peak = 0
    reap_due = duties._reap_due

    async def counted() -> None:
        nonlocal peak
        await reap_due()
        peak = max(peak, len(duties._tending))

    monkeypatch.setattr(duties, "_reap_due", counted)
    fired = duties.fired
    await until(lambda: duties.fired >= fired + n, within=30)
    assert peak <= TEND_PARALLEL, f"{peak} tend tasks at once for {n} topics due together"


async def test_a_slow_tend_holds_back_the_others_by_its_one_place_and_a_stop_starts_none(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Topics due wait for TEND_PARALLEL places (here 2) in a queue: one whose
    tend is slow (a large fan-out, a slow store) holds one place, the others
    are tended in the other, and, due again meanwhile, it is tended again once
    its tend ends. When the duties stop, the tends in progress are cancelled,
    none queued starts, and those queued are still due (handed over)."""
    monkeypatch.setattr("simplequeue.broker.duties.TEND_PARALLEL", 2)
    broker = await start_broker(MemStore())
    await broker.duties.taken_over.wait()
    duties = broker.duties
    gates = {"slow": asyncio.Event()}
    tended: Counter[str] = Counter()
    tend = duties.engine.tend

    async def gated(topic: str) -> Any:
        tended[topic] += 1
        if topic in gates:
            await gates[topic].wait()
        return await tend(topic)

    monkeypatch.setattr(duties.engine, "tend", gated)
    spec = ScheduleRequest({"tick": 1}, every=1)
    for topic in ["slow", "a", "b", "c"]:
        await broker.engine.put_schedule(topic, "tick", spec)
    await until(lambda: tended["slow"] == 1 and min(tended[t] for t in "abc") >= 2, within=10)
    assert tended["slow"] == 1 and len(duties._tending) <= 2
    gates["slow"].set()
    await until(lambda: tended["slow"] >= 2)  # due again while it was tended
    # Both places held: the others queue up.
    gates["slow"], gates["a"] = asyncio.Event(), asyncio.Event()
    await until(lambda: {"slow", "a"} <= duties._tending.keys() and bool(duties._queue))
    queued = set(duties._queue)
    (run,) = [t for t in broker._tasks if t.get_name() == "duties"]
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    assert not duties._tending and not duties._queue
    assert queued <= set(duties.due_topics())


class GatedHeads(MemStore):
    """Writes of topic t's head wait while `gate` is clear."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = 0  # head writes waiting at the gate

    async def put_if(self, key: str, data: bytes, **kwargs: Any) -> str:
        if key == keys.head("t"):
            self.held += 1
            await self.gate.wait()
            self.held -= 1
        return await super().put_if(key, data, **kwargs)


async def test_a_claim_batched_after_the_owners_reap_keeps_its_lease_reaped(
    start_broker: StartBroker,
) -> None:
    """The owner's reap said when the topic was next due as the state stood
    when it was applied: with a claim after it in the same batch, that was
    before the claim's lease, and it overwrote the due the batch's landing had
    noted. The owner forgot the topic, and the claim's lease was never reaped
    (seen in CI: a kill -9 campaign left one job claimed for good)."""
    store = GatedHeads()
    broker = await start_broker(store)
    engine = broker.engine
    await engine.enqueue("t", [JobSpec(1, id="a"), JobSpec(2, id="b")])
    await engine.claim("t", "w1", lease=0.3)  # its worker dies: the owner reaps it
    store.gate.clear()
    blocked = asyncio.create_task(engine.enqueue("t", [JobSpec(3, id="c")]))
    await until(lambda: store.held == 1, within=5)  # a write in flight meanwhile
    batcher = broker.committer._topics["t"].batcher
    await until(lambda: len(batcher) == 1, within=5)  # the reap, queued behind it
    claim = asyncio.create_task(engine.claim("t", "w2", lease=0.3))
    await until(lambda: len(batcher) == 2, within=5)  # a claim after it: one batch
    store.gate.set()
    await blocked
    assert len(await claim) == 1  # and its worker dies too
    for _ in range(100):  # its lease runs out; the owner's duties wake for it
        if (await engine.status("t"))["claimed"] == 0:
            break
        await broker.committer.wait_changed("t", 0.1)
    assert (await engine.status("t"))["claimed"] == 0
    await until(lambda: broker.duties.reaped == 2, within=5)  # counted once it returns


async def test_a_due_the_owner_lost_is_found_at_its_next_idle_check(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Reaping is driven by what landings and reads note. A note lost (as the
    one above was, by a fault) left its lease unreaped for good; the owner now
    looks at the topics it holds every idle_check, from its cache, and tends
    one that is due unnoticed (and says so)."""
    broker = await start_broker(MemStore())
    broker.duties.settings = DutySettings(idle_check=0.2)
    await broker.engine.enqueue("t", [JobSpec(1, id="a")])
    await broker.engine.claim("t", "w", lease=0.3)
    assert broker.duties.due_topics() == ["t"]
    broker.duties.note("t", None)  # the fault: the owner forgets the lease
    for _ in range(100):  # the lease runs out; the next idle check finds it
        if broker.duties.reaped:
            break
        await broker.committer.wait_changed("t", 0.1)
    assert broker.duties.reaped == 1
    assert (await broker.engine.status("t"))["claimed"] == 0
    assert "t was due unnoticed" in caplog.text


async def test_the_idle_check_of_many_topics_lets_the_loop_take_turns(
    start_broker: StartBroker,
) -> None:
    """The idle check (every idle_check, 30 s) read every topic's due from
    the cache in one go on the event loop, decoding again the head of each
    written since the last check (60 µs or so): 10,000 topics held the loop
    some 0.3-0.4 s, as a scrape of /metrics did (review at scale). They are
    read 100 topics at a time, the loop taking its turns between (counted in
    topics read: no head is decoded again now)."""
    broker = await start_broker(MemStore())
    await broker.duties.taken_over.wait()
    n = 1_000
    limit = asyncio.Semaphore(100)

    async def one(i: int) -> None:
        async with limit:
            await broker.engine.enqueue(f"t{i:04d}", [JobSpec(i)])

    await asyncio.gather(*(one(i) for i in range(n)))
    settings, recheck = broker.duties.settings, broker.duties._recheck

    async def once() -> None:  # one idle check (two back to back may share a turn)
        broker.duties.settings = settings
        await recheck()

    broker.duties._recheck = once  # type: ignore[method-assign]
    async with TopicsBetweenTurns(broker.committer) as watch:
        broker.duties.settings = DutySettings(idle_check=0.01)
        broker.duties._wake.set()
        await until(lambda: watch.read >= n)  # each topic read
    assert watch.stretch <= 100, f"{watch.stretch} topics read in one turn of the loop"


async def test_the_duties_heap_holds_about_one_wake_up_per_topic(
    start_broker: StartBroker,
) -> None:
    """A claim with a shorter lease than the topic's earliest moves its due
    earlier: the heap took a wake-up for it and kept the one it replaced
    until its time (up to 12 h), one a batch for workers of mixed leases
    (review of the memory, round 23). Past twice the topics it is rebuilt,
    and the topic is still woken for at its earliest due."""
    broker = await start_broker(MemStore())
    duties = broker.duties
    await broker.engine.enqueue("t", [JobSpec(i) for i in range(300)])
    for i in range(300):
        await broker.engine.claim("t", "w", lease=3000.0 - i)
    assert list(duties._scheduled) == ["t"]
    assert len(duties._heap) <= 2 * len(duties._scheduled) + HEAP_SLACK, (
        f"{len(duties._heap)} wake-ups in the heap for one topic"
    )
    assert duties._heap[0] == (duties._scheduled["t"], "t") == (duties._due["t"], "t")


async def test_acked_claims_leave_no_wake_ups_behind(start_broker: StartBroker) -> None:
    """A claim notes its topic's lease expiry as a wake-up in the duties'
    heap; the ack that left nothing due dropped the due but not the
    wake-up, which stayed until the lease's time (up to 12 h): memory for
    every topic claimed in the last 12 h, idle or not (review of SPEC 4.1's
    many-topics figures, round 25: 3,000 topics claimed with 3,600 s leases
    then acked left 3,000)."""
    broker = await start_broker(MemStore())
    duties = broker.duties

    async def one(i: int) -> None:
        topic = f"t{i:05d}"
        await broker.engine.enqueue(topic, [JobSpec(i, f"j{i}")])
        (job,) = await broker.engine.claim(topic, "w", lease=3600.0)
        await broker.engine.ack(topic, job["id"], job["lease_token"])

    await asyncio.gather(*(one(i) for i in range(300)))
    assert duties.due_topics() == []
    assert len(duties._scheduled) == 0
    assert len(duties._heap) <= HEAP_SLACK  # stale ones, however many topics
    # A topic due again is woken for.
    await broker.engine.enqueue("t00000", [JobSpec("p", "again")])
    await broker.engine.claim("t00000", "w", lease=0.2)
    await until(lambda: broker.duties.reaped == 1, within=5)


async def test_a_topic_handed_back_to_its_owner_leaves_this_brokers_cache(
    start_broker: StartBroker,
) -> None:
    """A broker that wrote a topic while its owner did not answer hands it back
    when something on it falls due. What it held of the topic goes then: kept,
    that copy went stale as the owner wrote on, and the next time the owner
    did not answer, the copy's long-past lease passed for a due this broker
    had lost (a false "due unnoticed" warning, and a needless tend)."""
    store = MemStore()
    brokers = await cluster(start_broker, store, 2)
    owner, other = owner_and_other(brokers, "t")
    other.membership.suspect(owner.settings.broker_id, 0.2)  # this broker writes it a while
    await other.engine.enqueue("t", [JobSpec(1, id="a")])
    await other.engine.claim("t", "w", lease=0.5)
    assert other.membership.owns("t") and "t" in other.duties.due_topics()
    await until(lambda: owner.duties.reaped == 1, within=10)  # handed back, reaped there
    await until(lambda: "t" not in other.engine.known_topics(), within=5)


async def test_brokers_that_take_each_other_for_the_owner_do_not_hand_a_topic_back_and_forth(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker whose own record was not renewed for its lease counts itself
    out while the others, who saw its last renewal up to a third of a lease
    later, still count it in: for up to lease_s/3 each of two brokers takes
    the other for the owner of the topics whose home is the first. A due
    topic was handed over, the other's tend (its refresh) handed it back, and
    so on as fast as requests go (some 1,650 hand-overs in 1.2 s for one
    topic), and its 0.2 s lease was not reaped meanwhile. A tend that a tell
    caused tends the topic where it was told."""
    clock = moved_clock(monkeypatch, membership_module)
    a, b = await rounds_in_hand(start_broker, MemStore())
    topic = topic_won_by("B", "A")
    told: list[str] = []
    for broker in (a, b):
        tell = broker.forwarder.tell

        async def counted(peer: Any, path: str, tell: Any = tell, me: str = broker.url) -> bool:
            told.append(me)
            return bool(await tell(peer, path))

        monkeypatch.setattr(broker.forwarder, "tell", counted)
    # B's last renewal lands, and A sees it 4 s later. B is paused: 15.5 s
    # after that renewal it counts itself out (A renewed meanwhile: B sees it
    # live), while A, which has not looked since, counts B in for 3.5 s more.
    await b.membership._renew()
    clock.t += 4.0
    await a.membership.look()
    clock.t += 11.5
    await a.membership._renew()
    await b.membership.look()
    assert [p.broker_id for p in b.membership.live] == ["A"]
    assert [p.broker_id for p in a.membership.live] == ["A", "B"]
    await b.engine.enqueue(topic, [JobSpec("p", id="j")])
    assert await b.engine.claim(topic, "w", lease=0.2)  # (its worker dies)
    await until(lambda: a.duties.reaped + b.duties.reaped == 1, within=3)
    assert len(told) < 10, f"{len(told)} hand-overs"
    assert (await b.engine.job(topic, "j"))["status"] == "pending"


async def test_a_status_page_on_another_broker_costs_the_owner_no_read_at_each_slot(
    start_broker: StartBroker,
) -> None:
    """The status page of a broker that does not own topic t reads t's head,
    and that read noted t's next slot as due there. When it came, that broker
    took t for one it had written while the owner did not answer and handed
    it over: the owner, alive and holding t's head, read it again at every
    slot while the page was open (review of schedules, round 26: SPEC 4.2,
    "in the steady state a write is one PUT, not GET+PUT"). A head a broker
    only read is not its to hand over."""
    name = "status-page-costs-the-owner-no-read"
    stores = [Counting(name) for _ in range(2)]
    brokers = [await start_broker(s, broker_id=f"b{i}") for i, s in enumerate(stores)]
    for b in brokers:
        await b.membership.step()
    owner, other = owner_and_other(brokers, "t")
    owner_gets = stores[brokers.index(owner)].calls
    async with aiohttp.ClientSession() as s:
        tick = {"every": 2, "payload": 1}
        async with s.put(f"{owner.url}/topics/t/schedules/tick", json=tick) as r:
            assert r.status == 200
        await until(lambda: owner.duties.fired >= 1, within=5)  # the owner's cache is warm
        before, fired = owner_gets["get", keys.head("t")], owner.duties.fired
        async with s.get(other.url + page.OVERVIEW_PATH) as r:
            assert r.status == 200
        await until(lambda: owner.duties.fired >= fired + 2, within=6)
    assert owner_gets["get", keys.head("t")] == before, "the owner read its own head again"
    assert "t" not in other.duties.due_topics()


async def test_a_topic_whose_leases_are_corrupt_is_not_tended_in_a_loop(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tend that found a corrupt object dropped the topic's state; the next
    read of its head noted its due again, long past, and the owner tended it
    again at once, a head and an object read each time: thousands a second
    (found by review). It is tended again when something reads it."""
    store = MemStore()
    broker = await start_broker(store)
    for b in range(0, 3000, 1000):
        await broker.engine.enqueue("t", [JobSpec(i, id=f"j{i:05d}") for i in range(b, b + 1000)])
    while await broker.engine.claim("t", "w", count=100, lease=0.3):
        pass  # the leases go into lease segments
    leases = orjson.loads((await store.get(keys.head("t")))[0])["leases"]
    units = [keys.segment("t", u["k"]) for u in leases["segs"] + leases["mans"]]
    assert units
    for key in units:
        await store.put(key, b"garbage")
    broker.committer.cache.forget(units)
    broker.engine.forget(["t"])  # read from the store from now on
    tends = 0
    tend = broker.engine.tend

    async def counted(topic: str) -> Any:
        nonlocal tends
        tends += 1
        return await tend(topic)

    monkeypatch.setattr(broker.engine, "tend", counted)
    await until(lambda: tends >= 1, within=5)  # the leases ran out
    await asyncio.sleep(1.0)  # a window in which no tend may come
    assert tends == 1


async def test_a_broker_that_takes_topics_over_reaps_their_leases(
    start_broker: StartBroker,
) -> None:
    """Leases written before a broker started (or before it owned the topic)
    are found by reading each head it now owns, once."""
    store = MemStore()
    first = await start_broker(store, broker_id="first", policy=Policy(default_lease=0.5))
    async with Client(first.url, topic="t") as q:
        await q.enqueue("x", id="j")
        assert await q.claim("w")
    await first.stop()
    later = await start_broker(store, broker_id="later")
    async with Client(later.url, topic="t") as q:
        for _ in range(100):
            if (await q.job("j")).status == "pending":
                break
            await later.committer.wait_changed("t", 0.1)
        assert (await q.job("j")).status == "pending"
    assert later.duties.acquired >= 1


async def test_taking_many_topics_over_holds_memory_bounded_per_topic(
    start_broker: StartBroker,
) -> None:
    """SPEC 4.1: a broker's memory depends on the topics it serves now. A
    take-over (at start, and at every change of the live brokers: when one
    leaves, every broker reads every head it owns again) made a task for
    every topic it now owned at once, 16 of them reading at a time: 10,000
    to 20,000 topics taken over peaked at 1,068-1,232 B a topic over what
    the broker held before (100,000: some 125 MB, half the default
    --cache-mb). A pool of 16 readers drawing from the names costs about
    the names alone (some 160 B a topic), and what /metrics keeps of each
    topic with jobs (some 340 B, for at most GAUGES_KEPT topics). Measured
    in bytes allocated (tracemalloc), not time."""
    store = MemStore()
    writer = Engine(GroupCommitter(store, broker_id="gone"))
    await writer.enqueue("t000000", [JobSpec({"i": 1}, "j")])
    data, _ = await store.get(keys.head("t000000"))
    n = 10_000
    for i in range(1, n):  # the same head under n names: one object each
        name = f"t{i:06d}"
        await store.put(keys.head(name), data.replace(b'"t000000"', f'"{name}"'.encode()))
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        broker = await start_broker(store, broker_id="b0")
        await broker.duties.taken_over.wait()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert broker.duties.acquired == n
    per_topic = (peak - base) / n
    assert per_topic < 600, f"taking {n:,} topics over peaked at {per_topic:.0f} B a topic"


async def test_leases_a_leaving_broker_wrote_before_it_saw_the_owner_are_reaped(
    start_broker: StartBroker,
) -> None:
    """A rolling restart: B starts and owns t, but A, which has not seen B
    yet, serves a claim on t, then leaves. B owned t all along, so it never
    read t again: the lease only A knew of was reaped by no broker (until
    something touched t)."""
    store = MemStore()
    a = await start_broker(store, broker_id="A")
    topic = next(
        t for t in (f"t{i}" for i in range(100)) if rendezvous(t, "B") > rendezvous(t, "A")
    )
    await a.engine.enqueue(topic, [JobSpec("p", id="j")])
    b = await start_broker(store, broker_id="B")
    await b.membership.step()
    async with asyncio.timeout(10):  # B has read t, as it took its topics over
        await b.duties.taken_over.wait()
    assert b.duties.acquired >= 1
    assert b.membership.owns(topic) and a.membership.owns(topic)  # A has not seen B
    [claimed] = await a.engine.claim(topic, "w", lease=0.3)
    await a.stop()
    await b.membership.step()  # A is gone
    for _ in range(100):  # the lease runs out; the owner's duties wake for it
        if b.duties.reaped:
            break
        await b.committer.wait_changed(topic, 0.1)
    status = await b.engine.status(topic)
    assert (status["claimed"], status["pending"], b.duties.reaped) == (0, 1, 1)
    assert claimed["id"] == "j"


class Counting(MemStore):
    """A memfs store that counts requests by kind and key: with `name`, one
    handle on a named store, counting its own broker's requests only."""

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.calls: Counter[tuple[str, str]] = Counter()

    async def get(self, key: str) -> tuple[bytes, str]:
        self.calls["get", key] += 1
        return await super().get(key)

    async def put(self, key: str, data: bytes) -> str:
        self.calls["put", key] += 1
        return await super().put(key, data)

    async def put_if(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        self.calls["put", key] += 1
        return await super().put_if(key, data, if_match=if_match, if_none_match=if_none_match)

    async def list(self, prefix: str = "") -> list[str]:
        self.calls["list", prefix] += 1
        return await super().list(prefix)

    async def list_top(self, prefix: str) -> list[str]:
        self.calls["list", prefix] += 1
        return await super().list_top(prefix)

    async def list_folders(self, prefix: str) -> list[str]:
        self.calls["list", prefix] += 1
        return await super().list_folders(prefix)


async def test_an_idle_broker_reads_no_heads_however_many_topics(
    start_broker: StartBroker,
) -> None:
    counting = Counting()
    brokers = await cluster(start_broker, counting, 2)
    async with aiohttp.ClientSession() as s:
        for i in range(300):
            b = brokers[i % 2]
            status, body, headers = await post(s, f"{b.url}/topics/t{i}/enqueue", {"payload": i})
            # Enqueued; on a loaded machine the owner may answer a forward late
            # and the next broker replay it: a duplicate then, and said so.
            assert status == 201 or (status == 200 and headers.get(REPLAYED_HEADER) == "1"), body
    before = Counter(counting.calls)
    # Longer than a registry round and the old reaper's 5 s re-read of every head.
    await asyncio.sleep(6)
    made = Counter(counting.calls) - before
    heads = sum(n for (op, key), n in made.items() if key.startswith(keys.TOPICS_PREFIX))
    assert heads == 0, made
    assert sum(made.values()) <= 3 * 6, made  # the registry and broker.json only


async def test_workers_waiting_on_idle_topics_read_their_heads_seldom(
    start_broker: StartBroker,
) -> None:
    """SPEC 4.1: an idle broker makes O(1) store requests per second whatever
    the number of topics. A long poll on a topic its broker owns looked at the
    store every POLL_INTERVAL (1 s), for what a broker standing in for the
    owner may have written: 200 empty topics with a worker waiting on each
    cost 600 GETs of heads in 3 s (5,000 topics: 5,000 GETs a second, some
    $5,000 a month on S3; on localfs, 3,000 took a whole core and enqueues
    waited up to 2.5 s). The owner now looks every OWNER_LOOK_INTERVAL (30 s),
    told at once of a stand-in's writes: 200 x 3 / 30 reads."""
    store = Counting()
    # A short lease: the broker trusts its memory once the others could all
    # have seen it come (Membership.settled_owner).
    broker = await start_broker(store, broker_id="b0", broker_lease=1.0)
    topics = [f"t{i:04d}" for i in range(200)]
    for topic in topics:  # each topic exists, written by its owner, and is empty
        await broker.engine.enqueue(topic, [JobSpec("p", id="j")])
        (job,) = await broker.engine.claim(topic, "w")
        await broker.engine.ack(topic, "j", job["lease_token"])
    await until(lambda: broker.membership.settled_owner(topics[0]))
    body = {"worker_id": "w", "wait": 30}
    heads = await heads_read_in_3_s(broker, store, topics, "POST", "/claim", json=body)
    assert heads <= 200 * 3 / 30 + 20, f"200 idle topics: {heads} GETs of heads in 3 s"


async def heads_read_in_3_s(
    broker: Any, store: Counting, topics: list[str], method: str, path: str, **asked: Any
) -> int:
    """The GETs of heads `broker` sends in 3 s while a request (`method` on
    /topics/{t}`path`, with `asked`) waits on each of `topics`, for nothing,
    the broker the topics' settled owner throughout. A window in which it was
    not (its 1 s lease renewed late on a loaded machine: the others might
    not have seen it, and its waits look every POLL_INTERVAL meanwhile) is
    measured again, three times at most."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def waiting(topic: str) -> None:
            async with s.request(method, f"{broker.url}/topics/{topic}{path}", **asked) as r:
                await r.read()

        waits = [asyncio.create_task(waiting(t)) for t in topics]
        try:
            await until(lambda: all(broker.committer.waiting(t) == 1 for t in topics))
            for _ in range(3):
                await until(lambda: broker.membership.settled_owner(topics[0]))
                before = Counter(store.calls)
                settled = True
                for _ in range(30):  # 3 s, nothing to wait for
                    await asyncio.sleep(0.1)
                    settled = settled and broker.membership.settled_owner(topics[0])
                made = Counter(store.calls) - before
                if settled:
                    break
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
    return sum(n for (op, key), n in made.items() if key.startswith(keys.TOPICS_PREFIX))


async def test_a_job_a_stand_in_wrote_wakes_the_owners_long_poll(
    start_broker: StartBroker,
) -> None:
    """The owner of a topic trusts its memory for OWNER_LOOK_INTERVAL (30 s)
    between looks at the store: a broker that writes the topic standing in
    for it tells it (POST /topics/{t}/refresh), and its long polls take the
    job at once rather than at their next look."""
    store = MemStore()
    brokers = await cluster(start_broker, store, 2, broker_lease=1.0)
    topic = "t"
    owner, stand_in = owner_and_other(brokers, topic)
    await owner.engine.enqueue(topic, [JobSpec("p", id="j")])
    (job,) = await owner.engine.claim(topic, "w")
    await owner.engine.ack(topic, "j", job["lease_token"])
    await until(lambda: owner.membership.settled_owner(topic))
    poll = asyncio.create_task(owner.engine.claim(topic, "w", wait=30))
    await until(lambda: owner.committer.waiting(topic) == 1)
    await stand_in.engine.enqueue(topic, [JobSpec("late", id="k")])
    (got,) = await asyncio.wait_for(poll, 2)
    assert got["id"] == "k"


async def test_job_waits_on_a_settled_owner_read_their_heads_seldom(
    start_broker: StartBroker,
) -> None:
    """SPEC 4.1, as for claims' long polls above: a job wait (`GET
    .../jobs/{id}?wait=`) looked at the store every POLL_INTERVAL (1 s)
    whoever owned the topic: 200 topics with a caller waiting for a job on
    each cost 600 GETs of heads in 3 s (5,000 topics: 5,000 GETs a second).
    On a settled owner it looks every OWNER_LOOK_INTERVAL (30 s), told at once
    of a stand-in's writes (next test)."""
    store = Counting()
    broker = await start_broker(store, broker_id="b0", broker_lease=1.0)
    topics = [f"t{i:04d}" for i in range(200)]
    for topic in topics:  # each with a job nobody claims
        await broker.engine.enqueue(topic, [JobSpec("p", id="j")])
    await until(lambda: broker.membership.settled_owner(topics[0]))
    heads = await heads_read_in_3_s(broker, store, topics, "GET", "/jobs/j", params={"wait": "30"})
    assert heads <= 200 * 3 / 30 + 20, f"200 job waits: {heads} GETs of heads in 3 s"


async def test_a_job_a_stand_in_finished_ends_the_owners_job_wait(
    start_broker: StartBroker,
) -> None:
    """A job wait on a settled owner looks at the store every 30 s: a job a
    broker standing in for the owner finished ends it at once (the stand-in
    tells the owner, which reads the topic again)."""
    brokers = await cluster(start_broker, MemStore(), 2, broker_lease=1.0)
    owner, stand_in = owner_and_other(brokers, "t")
    await owner.engine.enqueue("t", [JobSpec("p", id="j")])
    await until(lambda: owner.membership.settled_owner("t"))
    waited = asyncio.create_task(owner.engine.job("t", "j", wait=30))
    await until(lambda: owner.committer.waiting("t") == 1)
    (job,) = await stand_in.engine.claim("t", "w")
    await stand_in.engine.ack("t", "j", job["lease_token"], result="done")
    got = await asyncio.wait_for(waited, 2)
    assert got["status"] == "completed" and got["result"] == "done"


async def test_a_stand_in_tells_the_owner_once_it_is_no_longer_suspect(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in writes a topic because its owner did not answer: telling it
    at once, and again each second the topic is written, would send a
    request that waits for nothing for every topic written meanwhile. It
    tells it once its suspicion is over, and the owner's long poll takes
    the job then."""
    # The owner's own look at the store comes at a phase of the topic's in
    # every OWNER_LOOK_INTERVAL (30 s): within the 10 s waited below about
    # one run in three, which took the job with no tell at all. An hour here.
    monkeypatch.setattr(engine_module, "OWNER_LOOK_INTERVAL", 3600.0)
    brokers = await cluster(start_broker, MemStore(), 2, broker_lease=1.0)
    owner, stand_in = owner_and_other(brokers, "t")
    await owner.engine.enqueue("t", [JobSpec("p", id="j")])
    (job,) = await owner.engine.claim("t", "w")
    await owner.engine.ack("t", "j", job["lease_token"])
    await until(lambda: owner.membership.settled_owner("t"))
    told: list[float] = []
    tell = stand_in.forwarder.tell

    async def counted(peer: Any, path: str) -> bool:
        told.append(time.monotonic())
        return await tell(peer, path)

    monkeypatch.setattr(stand_in.forwarder, "tell", counted)
    poll = asyncio.create_task(owner.engine.claim("t", "w", wait=30))
    await until(lambda: owner.committer.waiting("t") == 1)
    suspect_until = time.monotonic() + 1.0  # before suspect(): its own end is no earlier
    stand_in.membership.suspect(owner.membership.me.broker_id, 1.0)
    for n in range(3):  # written while the owner is suspect
        await stand_in.engine.enqueue("t", [JobSpec(n, id=f"k{n}")])
    # Told within a second or two of the suspicion's end (its long poll looks
    # at the store only every 30 s): 10 s, for a loaded machine.
    (got,) = await asyncio.wait_for(poll, 10)
    assert got["id"] == "k0"
    # Once for the three writes (twice only if a loaded machine spread them
    # over more than a second), never while the owner was suspect. (Its
    # count once it came: the poll may be answered a moment before.)
    await until(lambda: told)
    assert len(told) <= 2 and told[0] >= suspect_until, (told, suspect_until)


async def test_an_owner_back_from_a_pause_longer_than_its_lease_sees_the_jobs_written_meanwhile(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner paused past its lease is dropped by the others, who take its
    topics over and write them. When it resumes, its renewal may land before
    its next look (both timers are due at once): it never counted itself
    out, its view never changed, so it read none of its topics again and,
    their settled owner, answered claims from memory (a look at the store
    every OWNER_LOOK_INTERVAL, 30 s; an hour here). Nobody tells it: the
    broker that wrote them did so as their owner. A renewal that lands more
    than a lease after the last is a change of the live set: without this
    broker, then with it."""
    monkeypatch.setattr(engine_module, "OWNER_LOOK_INTERVAL", 3600.0)
    clock = moved_clock(monkeypatch, membership_module)
    a, b = await rounds_in_hand(start_broker, MemStore())
    topic = topic_won_by("B", "A")
    await b.engine.enqueue(topic, [JobSpec("p", id="first")])
    (job,) = await b.engine.claim(topic, "w")
    await b.engine.ack(topic, job["id"], job["lease_token"])
    await a.membership.look()  # B's last renewal, seen
    clock.t += 16.0  # B settled, then paused past its lease
    assert b.membership.settled_owner(topic)
    await a.membership.step()  # A drops B and takes its topics over
    assert a.membership.owns(topic)
    await a.engine.enqueue(topic, [JobSpec("p", id="meanwhile")])
    await b.membership.step()  # B resumes: its renewal lands, then it looks
    await a.membership.step()  # A sees it back
    assert b.membership.owns(topic) and not a.membership.owns(topic)
    await asyncio.wait_for(b.duties.taken_over.wait(), 5)
    got = await b.engine.claim(topic, "w")
    assert [j["id"] for j in got] == ["meanwhile"]


async def test_a_settled_owner_sees_jobs_a_broker_with_a_longer_lease_wrote_before_seeing_it(
    start_broker: StartBroker,
) -> None:
    """A broker took itself for settled once its own lease had passed since
    its live set changed: "the others could all have seen it". They look
    every third of *their* lease: A, with a --broker-lease of 30 s, looks
    every 10 s, and until then takes itself for the owner of B's topics,
    writes them and tells nobody. B (1.5 s) settled 1.5 s after it came and
    answered claims from memory: "nothing" while a job was pending, until
    the topic's next look at the store (up to OWNER_LOOK_INTERVAL, 30 s;
    review finding, 24.7 s). It settles now once the longest lease among the
    live brokers has passed, A's: until then its long polls look every
    POLL_INTERVAL."""
    store = MemStore()
    a = await start_broker(store, broker_id="A", broker_lease=30.0)  # looks every 10 s
    b = await start_broker(store, broker_id="B", broker_lease=1.5)
    topic = topic_won_by("B", "A")
    assert b.membership.home(topic) == b.membership.me
    assert [p.broker_id for p in a.membership.live] == ["A"]  # A has not looked since B came
    assert await b.engine.claim(topic, "w") == []  # B reads the topic (empty)
    await asyncio.sleep(2.0)  # B's own lease passed: it took itself for settled then
    assert not b.membership.settled_owner(topic)  # A may not have seen it: its lease is 30 s
    assert await b.engine.claim(topic, "w") == []  # a read since B's own lease passed
    assert [p.broker_id for p in a.membership.live] == ["A"], "A looked meanwhile: no window"
    await a.engine.enqueue(topic, [JobSpec("p", id="j")])  # A writes it as its owner
    got = await b.engine.claim(topic, "w", wait=5)
    assert [j["id"] for j in got] == ["j"], "a pending job answered as nothing to claim"


async def test_a_new_owner_once_settled_sees_what_a_broker_wrote_before_it_saw_the_newcomer(
    start_broker: StartBroker,
) -> None:
    """Equal leases. A new broker N reads the topics it owns as it joins; A,
    until its next look (up to a third of a lease later), still takes itself
    for their owner and writes them, telling nobody. A lease on, N was
    settled and trusted a state read since the topic's last 30 s tick
    (Engine._looks): its take-over read was such a state, from before A's
    write, so claims answered "nothing" while a job was pending until the
    topic's next tick (up to OWNER_LOOK_INTERVAL, 30 s; review finding). A
    settled owner now trusts only a state read since it settled. A's round
    is held here to make the window (a third of a lease at most, A's look)
    certain."""
    store = MemStore()
    a = await start_broker(store, broker_id="A", broker_lease=1.5)
    a._tasks[1].cancel()  # A's registry rounds: taken by the test, its renewals kept
    await asyncio.gather(a._tasks[1], return_exceptions=True)
    renewing = asyncio.create_task(a.membership._renewing())
    try:
        # A topic N owns whose 30 s tick has just passed (not looked at again soon).
        now = time.monotonic()
        topic = next(
            t
            for t in (f"t{i}" for i in range(5000))
            if rendezvous(t, "N") > rendezvous(t, "A")
            and 28.0 < engine_module.next_look(t, engine_module.OWNER_LOOK_INTERVAL) - now < 29.5
        )
        await a.engine.enqueue(topic, [JobSpec("old", id="old")])  # the topic exists...
        (old,) = await a.engine.claim(topic, "w")
        await a.engine.ack(topic, "old", old["lease_token"])  # ...and is empty
        n = await start_broker(store, broker_id="N", broker_lease=1.5)
        await asyncio.wait_for(n.duties.taken_over.wait(), 5)
        assert await n.engine.claim(topic, "w") == []  # a worker at N: N reads it, empty
        await a.engine.enqueue(topic, [JobSpec("p", id="j")])  # A, not knowing N yet
        await a.membership.look()  # A's round: it sees N now
        assert a.membership.owner(topic).broker_id == "N"
        await until(lambda: n.membership.settled_owner(topic), within=5)
        assert [p.broker_id for p in n.membership.live] == ["A", "N"]
        got = await n.engine.claim(topic, "w")
    finally:
        renewing.cancel()
        await asyncio.gather(renewing, return_exceptions=True)
    assert [j["id"] for j in got] == ["j"], "a pending job answered as nothing to claim"


# --- sweeping ---------------------------------------------------------------------------


async def taken_over_with_an_orphan(store: MemStore, start_broker: StartBroker) -> tuple[Any, str]:
    """A broker ("new") that took topic t over from its last writer, gone,
    which left an orphan segment there; and that orphan's key."""
    writer = Engine(GroupCommitter(store, broker_id="gone", settings=CommitSettings()))
    await writer.enqueue("t", [JobSpec("p", id="j")])
    orphan = "topics/t/seg-p0-orphan.json"
    await store.put(orphan, b'{"format": 1, "items": []}')
    broker = await start_broker(store, broker_id="new")
    await broker.duties.taken_over.wait()
    return broker, orphan


async def test_a_topic_taken_over_and_never_written_is_swept_by_its_new_owner(
    start_broker: StartBroker,
) -> None:
    """SPEC 4.1: orphan objects are deleted. A broker sweeps the topics it
    wrote within two sweeps, so a topic whose last writer left orphans (a
    write that failed after its segments, a broker killed between its
    segments and its head) and then stopped owning it was swept by nobody
    while its new owner did not write it: the orphans stayed for good."""
    store = MemStore()
    broker, orphan = await taken_over_with_an_orphan(store, start_broker)
    await broker.duties._sweep()  # first sighting
    await broker.duties._sweep()
    assert orphan not in await store.list("topics/t/")
    assert (await broker.engine.job("t", "j"))["status"] == "pending"


async def test_orphans_a_stand_in_left_are_swept_by_someone(
    start_broker: StartBroker,
) -> None:
    """SPEC 4.1: orphan objects are deleted. A broker sweeps the topics it
    owns and wrote or took over within two sweeps. A stand-in (it served a
    topic while its owner did not answer) leaves orphans there, the pending
    segments its claims and acks used up, and never sweeps them, not owning
    the topic; the owner, told to read the topic again, neither wrote it nor
    took it over: 6 of 6 orphans stayed for good (review of the duties)."""
    store = MemStore()
    brokers = await cluster(start_broker, store, 2, broker_lease=1.0)
    owner, stand_in = owner_and_other(brokers, "t")
    await owner.engine.enqueue("t", [JobSpec("first", id="first")])
    await until(lambda: owner.membership.settled_owner("t"))
    # Its own write and its take-over at start are more than two sweeps old.
    owner.duties._written.clear()
    owner.duties._taken.clear()
    # The owner does not answer for a while: the other broker serves t.
    stand_in.membership.suspect(owner.membership.me.broker_id, 0.5)
    pad = "x" * 1000
    await stand_in.engine.enqueue("t", [JobSpec(pad, id=f"j{i}") for i in range(200)])
    for _ in range(201):
        jobs = await stand_in.engine.claim("t", "w", count=50)
        if not jobs:
            break
        for job in jobs:
            await stand_in.engine.ack("t", job["id"], job["lease_token"])
    assert (await owner.engine.status("t"))["pending"] == 0
    head_refs = set(await owner.committer.peek("t", lambda s, now: s.referenced()))
    orphans = set(await store.list("topics/t/")) - head_refs
    assert orphans, "the stand-in's claims and acks used up pending segments"
    # The suspicion ends; the stand-in tells the owner, which reads t again.
    await until(lambda: stand_in.membership.owner("t") == owner.membership.me)
    await until(lambda: "t" not in stand_in._telling)  # told, and done telling
    for _ in range(3):  # sweeps of both brokers, many minutes apart
        await owner.duties._sweep()
        await stand_in.duties._sweep()
    left = orphans & set(await store.list("topics/t/"))
    assert not left, f"{len(left)} of {len(orphans)} orphans swept by no broker"


async def idle_topics(store: ObjectStore, n: int) -> None:
    """`n` topics in `store`, written by a broker gone since: each had a job
    enqueued, claimed and acked (one object each, nothing left in it)."""
    gone = Engine(GroupCommitter(store, broker_id="gone"))

    async def one(i: int) -> None:
        topic = f"t{i:05d}"
        await gone.enqueue(topic, [JobSpec({"i": i}, f"j{i}")])
        (job,) = await gone.claim(topic, "w", attempt_id=f"a{i}")
        await gone.ack(topic, job["id"], job["lease_token"])

    await asyncio.gather(*(one(i) for i in range(n)))
    await gone.committer.close()


async def test_sweeping_the_topics_taken_over_keeps_them_out_of_memory(
    start_broker: StartBroker,
) -> None:
    """SPEC 4.1: a broker's memory depends on the topics it serves now. The
    sweeps that follow a take-over read each topic taken over into the
    broker's memory, and kept it there (review of SPEC 4.1's many-topics
    figures, round 25): 300 idle topics held by a broker that served none
    (5,000: ~2,400 held after a sweep; with 100,000, the topics it did serve
    were pushed out). A sweep reads a head it does not hold as a peek does."""
    store = MemStore()
    await idle_topics(store, 300)
    orphan = "topics/t00007/seg-p0-orphan.json"  # one topic with something to sweep
    await store.put(orphan, b'{"format": 1, "items": []}')
    broker = await start_broker(store, broker_id="b0")
    await broker.duties.taken_over.wait()
    assert broker.duties.acquired == 300
    assert broker.committer.known_topics() == []  # the take-over peeked
    await broker.duties._sweep()  # the first sighting
    assert broker.committer.known_topics() == []
    await broker.duties._sweep()  # deleted: the fence writes the head (in use, then)
    assert orphan not in await store.list("topics/t00007/")
    assert len(broker.committer.known_topics()) <= 1


class FoldersFailOnce(MemStore):
    """A memfs store whose first listing of folders fails (S3 down a moment)."""

    failed = False

    async def list_folders(self, prefix: str) -> list[str]:
        if not self.failed:
            self.failed = True
            raise StoreUnavailable("injected: the listing failed")
        return await super().list_folders(prefix)


async def test_a_failed_listing_of_folders_fails_no_sweep_and_loses_no_topic_taken_over(
    start_broker: StartBroker,
) -> None:
    """The listing that finds the topics taken over with objects beside their
    head failed the whole sweep: the topics this broker wrote and the store's
    leftovers waited for the next, and had it failed at both sweeps after a
    take-over, the topics taken over were dropped unswept, their orphans
    kept for good (review of round 25's latest changes). The rest is swept
    all the same now, and the topics taken over wait for a listing that
    works, past their two sweeps if need be."""
    store = FoldersFailOnce()
    broker, orphan = await taken_over_with_an_orphan(store, start_broker)
    before = time.monotonic()
    await broker.duties._sweep()  # the listing fails: the rest is swept all the same
    assert store.failed
    assert broker.duties._taken["t"] >= before  # its two sweeps are counted again
    await broker.duties._sweep()  # first sighting
    await broker.duties._sweep()
    assert orphan not in await store.list("topics/t/")


async def test_an_idle_broker_sweeps_in_requests_independent_of_topic_count(
    start_broker: StartBroker,
) -> None:
    """SPEC 4.1: an idle broker makes O(1) store requests per second whatever
    the number of topics. A broker that started on N idle topics (or took
    them over when a broker joined or left) listed and read each at its next
    two sweeps, one after another (review of SPEC 4.1's many-topics figures,
    round 25): 4N requests in its first 20 minutes of idleness, 400,000 for
    100,000 topics, a sweep longer than the sweep interval on S3. A topic of
    one object has no orphans: one listing per sweep finds those that have
    objects beside their head, and only those are swept."""
    store = Counting()
    await idle_topics(store, 300)
    broker = await start_broker(store, broker_id="b0")
    await broker.duties.taken_over.wait()
    store.calls.clear()
    await broker.duties._sweep()
    await broker.duties._sweep()
    made = sum(n for (kind, _), n in store.calls.items() if kind in ("get", "list"))
    assert made <= 4, store.calls


async def test_the_sweeps_after_a_broker_wrote_many_topics_cost_requests_independent_of_them(
    start_broker: StartBroker,
) -> None:
    """SPEC 4.1: an idle broker makes O(1) store requests per second whatever
    the number of topics. Its next two sweeps looked at every topic it wrote
    within them, each with a listing of its folder and a GET of its head, a
    topic of one object too (no segments: no orphans can be there): a broker
    that enqueued one job into each of 300 topics, idle since, made 1,200
    requests in its next two sweeps (100,000 topics: some 400,000 in the 20
    minutes after, half of them LISTs). Round 25 kept to those with objects
    beside their head the topics taken over, not the topics written; one
    listing per sweep serves both now."""
    store = Counting()
    broker = await start_broker(store, broker_id="b0")
    await broker.duties.taken_over.wait()
    limit = asyncio.Semaphore(50)

    async def one(i: int) -> None:
        async with limit:
            await broker.engine.enqueue(f"t{i:04d}", [JobSpec({"i": i}, f"j{i}")])

    await asyncio.gather(*(one(i) for i in range(300)))
    assert len(broker.duties._written) == 300
    assert not [k for k in await store.list(keys.TOPICS_PREFIX) if "/seg-" in k]  # heads only
    store.calls.clear()
    await broker.duties._sweep()
    await broker.duties._sweep()
    made = sum(n for (kind, _), n in store.calls.items() if kind in ("get", "list"))
    assert made <= 4, store.calls


async def test_an_idle_localfs_brokers_sweep_reads_a_bounded_number_of_topic_folders(
    start_broker: StartBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 4.1: an idle broker makes O(1) store requests per second whatever
    the number of topics. Every sweep (each 10 minutes) ended with
    sweep_leftovers, on localfs an os.walk of the whole store: every topic's
    folder read, whoever owns it, on every broker. 300 idle topics with
    segments: 600 folder reads in two sweeps (20,000 topics of 3 segments:
    0.87 s of a thread a sweep, against 0.34 s for the sweep's own listing;
    100,000 topics some 100,000 folder reads every 10 minutes per broker). A
    sweep now looks into LEFTOVER_FOLDERS_PER_SWEEP topic folders (256; 5
    here), in turn."""
    from simplequeue.objstore import localfs

    monkeypatch.setattr(localfs, "LEFTOVER_FOLDERS_PER_SWEEP", 5)
    store = LocalStore(tmp_path)
    for t in range(300):
        await store.put(f"topics/t{t}/seg-p0-x.json", b'{"format": 1, "items": []}')
        await store.put(f"topics/t{t}.json", b"{}")  # not a head it can read: never written
    await store.close()
    broker = await start_broker(LocalStore(tmp_path), broker_id="b0")
    await broker.duties.taken_over.wait()
    broker.duties._taken.clear()  # two sweeps passed: the topics taken over are not recent
    broker.duties._written.clear()
    read = record_folder_reads(monkeypatch, tmp_path)
    await broker.duties._sweep()
    await broker.duties._sweep()
    topic_folders = [p for p in read if p.startswith("topics/")]
    assert len(topic_folders) <= 10, f"{len(topic_folders)} topic folders read in two sweeps"


async def test_a_broker_that_wrote_a_few_of_many_topics_sweeps_them_without_listing_all(
    start_broker: StartBroker,
) -> None:
    """A listing of every topic costs a request per 500-1,000 topics: for a
    broker that wrote 3 of 100,000 (as its take-over listed them), looking at
    those 3 on their own (a listing of each one's folder and a GET) costs
    less, and orphans there are deleted all the same."""
    store = Counting()
    broker = await start_broker(store, broker_id="b0")
    await broker.duties.taken_over.wait()
    broker.duties._topics_listed = 100_000
    for t in ("a", "b", "c"):
        await broker.engine.enqueue(t, [JobSpec("p", id="j")])
    orphan = "topics/a/seg-p0-orphan.json"
    await store.put(orphan, b'{"format": 1, "items": []}')
    store.calls.clear()
    await broker.duties._sweep()
    await broker.duties._sweep()
    assert store.calls["list", keys.TOPICS_PREFIX] == 0, store.calls  # no listing of all
    assert orphan not in await store.list("topics/a/")


async def test_an_orphan_that_lands_after_a_sweeps_listing_is_deleted_by_the_sweeps_after(
    start_broker: StartBroker,
) -> None:
    """Orphans are deleted: a topic written lately is swept only if the sweep's
    listing of the topics finds objects beside its head. One that lands after
    a listing (a write cut short, another broker's, right after it) is found
    by the next sweep's, within the topic's two, and its sighting carries it
    to the sweep that deletes it."""
    store = MemStore()
    broker = await start_broker(store, broker_id="b0")
    await broker.duties.taken_over.wait()
    await broker.engine.enqueue("t", [JobSpec("p", id="j")])  # inline: the head alone
    await broker.duties._sweep()  # nothing beside the head: not swept
    orphan = "topics/t/seg-p0-orphan.json"
    await store.put(orphan, b'{"format": 1, "items": []}')
    await broker.duties._sweep()  # the first sighting
    assert orphan in await store.list("topics/t/")
    broker.duties._written.clear()  # its last write two sweeps old
    await broker.duties._sweep()
    assert orphan not in await store.list("topics/t/")
    assert (await broker.engine.job("t", "j"))["status"] == "pending"


async def test_a_failed_listing_of_folders_loses_no_topic_written(
    start_broker: StartBroker,
) -> None:
    """A topic written lately waits, as one taken over does, for a listing of
    the topics that works, past its two sweeps if need be."""
    store = FoldersFailOnce()
    broker = await start_broker(store, broker_id="b0")
    await broker.duties.taken_over.wait()
    await broker.engine.enqueue("t", [JobSpec("p", id="j")])
    orphan = "topics/t/seg-p0-orphan.json"
    await store.put(orphan, b'{"format": 1, "items": []}')
    before = time.monotonic()
    await broker.duties._sweep()  # the listing fails
    assert store.failed
    assert broker.duties._written["t"] >= before  # its two sweeps are counted again
    await broker.duties._sweep()  # first sighting
    await broker.duties._sweep()
    assert orphan not in await store.list("topics/t/")


async def test_a_sweep_that_takes_long_holds_back_no_reaping(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep lists every topic it looks at, one after another: a broker that
    took 10,000 topics over spends minutes on S3 in one. It ran inside the
    duties' loop, so no lease was reaped and no schedule fired meanwhile. It
    runs in a task of its own."""
    broker = await start_broker(MemStore(), sweep_interval=0.05)
    stuck = asyncio.Event()

    async def sweep_for_ever(topics: list[str]) -> list[str]:
        stuck.set()
        await asyncio.Event().wait()
        return []

    monkeypatch.setattr(broker.engine, "sweep_all", sweep_for_ever)
    await asyncio.wait_for(stuck.wait(), 5)
    await broker.engine.enqueue("t", [JobSpec("p", id="j")])
    await broker.engine.claim("t", "w", lease=0.2)
    await until(lambda: broker.duties.reaped == 1, within=5)
    assert (await broker.engine.job("t", "j"))["status"] == "pending"


async def test_a_take_over_of_many_topics_holds_back_no_reaping(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a broker leaves, the others read every head they own, 16 at a
    time. That ran inside the duties' loop: no lease of any topic was reaped,
    no schedule fired, no follow-up delivered, until the last head was read.
    With GETs of 30 ms (S3), 4,000 topics: a lease of 0.5 s on a topic the
    broker had always owned was reaped 7.8 s after its claim (some 94 s for
    50,000 topics), and every leave started it again. The take-over runs in a
    task of its own; here its reads hang, and the lease is reaped meanwhile."""
    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    for i in range(3):  # topics the take-over reads
        await other.engine.enqueue(f"c{i}", [JobSpec("p", id="j")])
    await owner.engine.enqueue("t", [JobSpec("p", id="j")])
    await owner.engine.claim("t", "w", lease=0.2)
    reading = asyncio.Event()
    next_due = owner.engine.next_due

    async def read_for_ever(topic: str, outbox: bool = True) -> Any:
        if topic != "t":
            reading.set()
            await asyncio.Event().wait()
        return await next_due(topic, outbox)

    monkeypatch.setattr(owner.engine, "next_due", read_for_ever)
    await other.stop()
    await owner.membership.step()  # the other left: the owner reads every head it owns
    await asyncio.wait_for(reading.wait(), 5)
    await until(lambda: owner.duties.reaped == 1, within=5)
    assert (await owner.engine.job("t", "j"))["status"] == "pending"
    assert not owner.duties.taken_over.is_set()


async def test_a_broker_that_leaves_during_a_take_over_has_its_topics_read_after_it(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The take-over of one leave is under way when another broker leaves: the
    topics that one hands over are read once the first ends, at once, not
    lost nor left for a retry."""
    a, b, c = await cluster(start_broker, MemStore(), 3)
    topics = [f"t{i}" for i in range(30)]
    for topic in topics:
        await a.engine.enqueue(topic, [JobSpec("p", id="j")])
    # Owned by c while a and c are live: read when c leaves, not when b does.
    theirs = [t for t in topics if rendezvous(t, "b2") > rendezvous(t, "b0")]
    assert theirs
    read: list[str] = []
    reading, go_on = asyncio.Event(), asyncio.Event()
    next_due = a.engine.next_due

    async def held_read(topic: str, outbox: bool = True) -> Any:
        reading.set()
        await go_on.wait()
        read.append(topic)
        return await next_due(topic, outbox)

    monkeypatch.setattr(a.engine, "next_due", held_read)
    await b.stop()
    await a.membership.step()
    await asyncio.wait_for(reading.wait(), 5)  # b's take-over has listed the topics
    await c.stop()
    await a.membership.step()
    go_on.set()
    await asyncio.wait_for(a.duties.taken_over.wait(), 2)
    assert set(theirs) <= set(read)


async def test_a_broker_that_came_and_went_during_a_take_over_has_its_leases_reaped(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes of the live brokers during a take-over are taken over as one,
    from the view before the first to the last. A broker that joined and died
    meanwhile is in neither: its departure was not seen, and its topics went
    back to their old owner, which owned them in the first view too and did
    not read them. A lease it handed out was reaped by no one, ever (0 of 1,
    3 s after a 0.3 s lease ran out): a rolling restart makes take-overs that
    last minutes on S3, and a broker may crash soon after it starts."""
    clock = moved_clock(monkeypatch, membership_module)  # registrations age when moved
    store = MemStore()
    a = await start_broker(store, broker_id="A")
    b = await start_broker(store, broker_id="B")
    for broker in (a, b):
        await broker.membership.step()
    await a.duties.taken_over.wait()
    slow = topic_won_by("A", "C")  # A's in every view here
    topic = topic_won_by("C", "A")  # C's while C lives, A's otherwise
    await a.engine.enqueue(slow, [JobSpec("p", id="s")])
    reading, go_on = asyncio.Event(), asyncio.Event()
    next_due = a.engine.next_due

    async def held_read(name: str, outbox: bool = True) -> Any:
        if name == slow:
            reading.set()
            await go_on.wait()
        return await next_due(name, outbox)

    monkeypatch.setattr(a.engine, "next_due", held_read)
    await b.stop()
    await a.membership.step()  # B left: A reads every head it owns, one slowly
    await asyncio.wait_for(reading.wait(), 5)
    c = await start_broker(store, broker_id="C")  # meanwhile C comes...
    await a.membership.step()
    assert a.membership.peer("C") is not None and c.membership.owns(topic)
    await c.engine.enqueue(topic, [JobSpec("p", id="j")])
    assert await c.engine.claim(topic, "w", lease=0.3)  # (its worker dies)
    for task in c._tasks:  # ... and dies without a goodbye
        task.cancel()
    await asyncio.gather(*c._tasks, return_exceptions=True)
    await a.membership.step()  # its last record, seen
    clock.t += 20.0
    await a.membership.step()  # and dropped, a lease later
    assert a.membership.peer("C") is None and a.membership.owns(topic)
    go_on.set()
    await asyncio.wait_for(a.duties.taken_over.wait(), 5)
    await until(lambda: a.duties.reaped == 1, within=5)  # A, its owner again, reaps it
    assert (await a.engine.job(topic, "j"))["status"] == "pending"


# --- the registry -----------------------------------------------------------------------


async def test_a_broker_is_live_while_its_record_changes_whatever_its_clock_says() -> None:
    store = MemStore()
    skewed = Membership(
        store, broker_id="skewed", url="http://s", lease_s=0.6, clock=lambda: 1000.0
    )
    me = Membership(store, broker_id="me", url="http://m", lease_s=0.6)
    await skewed.register()
    await me.register()
    await me.step()
    assert [p.broker_id for p in me.live] == ["me", "skewed"]
    for _ in range(4):  # renewed, with a heartbeat from 1970: live all the same
        await asyncio.sleep(0.2)
        await skewed.step()
        await me.step()
        assert [p.broker_id for p in me.live] == ["me", "skewed"]
    await asyncio.sleep(0.7)  # no renewal for longer than its lease
    await me.step()
    assert [p.broker_id for p in me.live] == ["me"]


async def test_a_broker_that_leaves_is_dropped_at_the_next_round() -> None:
    store = MemStore()
    a = Membership(store, broker_id="a", url="http://a", lease_s=60)
    b = Membership(store, broker_id="b", url="http://b", lease_s=60)
    for m in (a, b):
        await m.register()
    await a.step()
    assert len(a.live) == 2
    await b.leave()
    await a.step()
    assert [p.broker_id for p in a.live] == ["a"]


async def test_a_store_outage_longer_than_the_lease_drops_no_live_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the store is down no broker renews its record and none reads the
    others'. A broker whose first round after the outage came before the
    others' renewals found each record as it was before, and took it for
    unchanged for the whole outage: it dropped every other broker and owned
    every topic (reading every head), then took them back a round later
    (review of membership). Stale is seen unchanged for a lease (SPEC 4.3):
    not while unseen. A broker truly dead is dropped a lease after it."""
    clock = moved_clock(monkeypatch, membership_module)
    store = Outage()
    a = Membership(store, broker_id="a", url="http://a", lease_s=15)
    b = Membership(store, broker_id="b", url="http://b", lease_s=15)
    for m in (a, b):
        await m.register()
    for m in (a, b):
        await m.step()
    await a.step()  # b's last renewal before the outage seen
    assert [p.broker_id for p in a.live] == ["a", "b"]
    store.down = True
    for _ in range(4):  # 20 s down: a round every 5 s, each one failing
        clock.t += 5
        for m in (a, b):
            with pytest.raises(StoreUnavailable):
                await m.step()
    store.down = False
    clock.t += 0.5
    await a.step()  # a's round comes first; b's is due a little later
    assert [p.broker_id for p in a.live] == ["a", "b"]
    for _ in range(3):  # b died in the outage: never renewed again
        clock.t += 5
        await a.step()
    assert [p.broker_id for p in a.live] == ["a"]


async def test_a_dead_broker_is_dropped_though_one_listing_in_four_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a failed listing, every record found unchanged was watched from
    then (its age back to 0): a store failing one round in four (a round every
    5 s at lease 15) kept a dead broker live for good, its leases reaped by
    nobody, requests for its topics sent to it first (review of round 33's
    changes: still live after 120 s). The blind gap alone is not counted."""
    clock = moved_clock(monkeypatch, membership_module)
    store = Outage()
    a = Membership(store, broker_id="a", url="http://a", lease_s=15)
    b = Membership(store, broker_id="b", url="http://b", lease_s=15)
    for m in (a, b):
        await m.register()
    await a.step()
    assert [p.broker_id for p in a.live] == ["a", "b"]
    live_for = 0  # b dies now: never renewed again
    for round_ in range(1, 25):
        clock.t += 5
        store.down = round_ % 4 == 0
        with contextlib.suppress(StoreUnavailable):
            await a.step()
        if "b" in [p.broker_id for p in a.live]:
            live_for = 5 * round_
    # Its lease, and the rounds the failures hid (10 s of each 20).
    assert live_for <= 35, f"b, dead, live for {live_for} s (lease 15 s)"


class Refusing(MemStore):
    """A memfs store that refuses to write the keys in `refused` (a broker
    whose registration writes fail: a store answering 503 to them, a bucket
    policy refusing brokers/); it reads everything."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: set[str] = set()

    async def put(self, key: str, data: bytes) -> str:
        if key in self.refused:
            raise StoreUnavailable(f"injected: {key} cannot be written")
        return await super().put(key, data)

    async def put_if(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        if key in self.refused:
            raise StoreUnavailable(f"injected: {key} cannot be written")
        return await super().put_if(key, data, if_match=if_match, if_none_match=if_none_match)


async def test_a_broker_whose_record_cannot_be_written_still_sees_the_others_leave() -> None:
    """A round gave up when the renewal failed, the others' records unread: a
    broker that left stayed live in the view for as long as the writes failed
    (its topics' leases, schedules and follow-ups taken over by no one)."""
    store = Refusing()
    a = Membership(store, broker_id="a", url="http://a", lease_s=60)
    b = Membership(store, broker_id="b", url="http://b", lease_s=60)
    for m in (a, b):
        await m.register()
    await a.step()
    assert [p.broker_id for p in a.live] == ["a", "b"]
    store.refused.add(a.key)  # a's renewals fail from now on
    await b.leave()
    await a.step()
    assert [p.broker_id for p in a.live] == ["a"]  # alone, it serves every topic


async def test_a_broker_whose_record_went_stale_leaves_its_topics_to_the_others() -> None:
    """The others drop a broker whose record was not renewed for its lease:
    it owns none of the topics they take over, until its record is renewed."""
    store = Refusing()
    a = Membership(store, broker_id="a", url="http://a", lease_s=0.3)
    b = Membership(store, broker_id="b", url="http://b", lease_s=0.3)
    for m in (a, b):
        await m.register()
    for m in (a, b):
        await m.step()
    store.refused.add(a.key)
    await asyncio.sleep(0.35)  # a's lease runs out; b renews
    await b.step()
    await a.step()
    assert [p.broker_id for p in b.live] == [p.broker_id for p in a.live] == ["b"]
    assert not any(a.owns(f"t{i}") for i in range(20))
    store.refused.clear()
    await a.step()
    assert [p.broker_id for p in a.live] == ["a", "b"]


async def test_a_broker_whose_record_cannot_be_written_reaps_what_a_crashed_owner_left(
    start_broker: StartBroker,
) -> None:
    """The frozen view's consequence: the owner of a topic died, and the only
    other broker, whose registration writes failed, never saw it go: the
    claim it had made there stayed claimed past its lease."""
    store = Refusing()
    a, topic = await _claimed_by_a_dead_owner(
        store, start_broker, lambda a: store.refused.add(a.membership.key)
    )  # A's renewals fail from when B is killed
    await until(lambda: a.duties.reaped == 1, within=5)
    assert (await a.engine.job(topic, "j"))["status"] == "pending"


async def _claimed_by_a_dead_owner(
    store: MemStore, start_broker: StartBroker, fault: Callable[[Any], None]
) -> tuple[Any, str]:
    """Broker A, started, and a topic whose owner B (a registration renewed,
    and its engine's writes) claimed job "j" there for 0.3 s, then was killed
    (its record left as it was) just after `fault(A)` was done."""
    b = Membership(store, broker_id="B", url="http://127.0.0.1:9", lease_s=0.3)
    await b.register()
    renewing = asyncio.create_task(b.run())
    a = await start_broker(store, broker_id="A", broker_lease=0.3)  # a round every 0.1 s
    topic = next(
        t for t in (f"t{i}" for i in range(100)) if rendezvous(t, "B") > rendezvous(t, "A")
    )
    assert a.membership.peer("B") and not a.membership.owns(topic)
    owner = Engine(GroupCommitter(store, broker_id="B", clock=store.now))  # B's writes
    await owner.enqueue(topic, [JobSpec("p", id="j")])
    await owner.claim(topic, "w", lease=0.3)
    await owner.committer.close()
    fault(a)
    renewing.cancel()  # B is killed: its record stays as it was
    await asyncio.gather(renewing, return_exceptions=True)
    return a, topic


class OneUnreadable(MemStore):
    """A memfs store on which one object, once `refusing` is set, cannot be
    read: the store refuses it (S3's AccessDenied on an object written with a
    KMS key the brokers may not use, a file of another user's on localfs).
    Every other object reads."""

    def __init__(self, unreadable: str) -> None:
        super().__init__()
        self.unreadable = unreadable
        self.refusing = False

    async def get(self, key: str) -> tuple[bytes, str]:
        if self.refusing and key == self.unreadable:
            raise StoreRefused(f"injected: access denied to {key}")
        return await super().get(key)


async def test_one_unreadable_registration_does_not_freeze_who_is_live(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One registration the store refused to read made every round of look()
    fail before the live set was worked out: the view froze, and a broker
    that died afterwards stayed live for good (its topics' leases, schedules
    and follow-ups taken over by no one). Found by the review of ownership,
    membership and the store clock, round 25. Now the unreadable record's
    broker ages out as one not renewed does, the others are seen as before,
    and the failed read is said once, not every round."""
    store = OneUnreadable(keys.registration("zz-foreign"))
    a = Membership(store, broker_id="a", url="http://a", lease_s=0.3)
    b = Membership(store, broker_id="b", url="http://b", lease_s=0.3)
    other = Membership(store, broker_id="zz-foreign", url="http://z", lease_s=0.3)
    for m in (a, b, other):
        await m.register()
    await a.step()
    assert [p.broker_id for p in a.live] == ["a", "b", "zz-foreign"]
    store.refusing = True  # zz-foreign's record can no longer be read
    # b and zz-foreign are killed: their records are never renewed again. a
    # renews and looks, a round every third of the lease, well past theirs.
    with caplog.at_level(logging.WARNING, logger="simplequeue.broker.membership"):
        for _ in range(5):
            await asyncio.sleep(0.1)  # the leases' passing, not synchronisation
            await a.step()
    assert [p.broker_id for p in a.live] == ["a"]
    said = [r for r in caplog.records if "cannot read zz-foreign's record" in r.getMessage()]
    assert len(said) == 1


async def test_a_crashed_owners_claim_is_reaped_while_one_registration_is_unreadable(
    start_broker: StartBroker,
) -> None:
    """The same, end to end: broker A, and B which owns a topic and handed out
    a claim there, then was killed. One registration of a third broker could
    not be read: A never saw B go, and the claim stayed claimed past its lease
    (for good: nothing else reads the topic). Review of ownership, membership
    and the store clock, round 25."""
    store = OneUnreadable(keys.registration("zz-foreign"))
    foreign = Membership(store, broker_id="zz-foreign", url="http://127.0.0.1:7", lease_s=0.3)
    await foreign.register()

    def unreadable(_: Any) -> None:
        store.refusing = True  # zz-foreign's record: access denied from now on

    a, topic = await _claimed_by_a_dead_owner(store, start_broker, unreadable)
    await until(lambda: a.duties.reaped == 1, within=5)
    assert (await a.engine.job(topic, "j"))["status"] == "pending"


class SlowReading(MemStore):
    """A memfs store whose reads of `slow` take `delay` seconds (an S3 GET
    retried after its read timeout: 10 s and more, of a 15 s lease), and
    that sets `renewed` once `counted` has been written `enough` times."""

    def __init__(self, slow: str, delay: float, counted: str, enough: int) -> None:
        super().__init__()
        self.slow, self.delay = slow, delay
        self.counted, self.left = counted, enough
        self.renewed = asyncio.Event()

    async def get(self, key: str) -> tuple[bytes, str]:
        if key == self.slow:
            await asyncio.sleep(self.delay)  # the store's latency, not synchronisation
        return await super().get(key)

    async def put_if(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        etag = await super().put_if(key, data, if_match=if_match, if_none_match=if_none_match)
        if key == self.counted:
            self.left -= 1
            if self.left <= 0:
                self.renewed.set()
        return etag


async def test_a_slow_read_of_another_record_does_not_delay_this_brokers_renewals() -> None:
    """A renewal waited for the reads of the others' records (one round did
    both, then waited a third of the lease): a broker whose read of one
    record was slow renewed late, and the others took it, alive, for dead
    (its topics changed owner, and back at its next renewal)."""
    store = SlowReading(keys.registration("b"), 0.45, keys.registration("a"), enough=8)
    a = Membership(store, broker_id="a", url="http://a", lease_s=0.6)
    b = Membership(store, broker_id="b", url="http://b", lease_s=0.6)
    for m in (a, b):
        await m.register()
    await b.step()
    assert [p.broker_id for p in b.live] == ["a", "b"]
    dropped = asyncio.Event()
    b.on_change = lambda old, new: dropped.set()
    tasks = [asyncio.create_task(m.run()) for m in (a, b)]
    waits = [asyncio.ensure_future(e.wait()) for e in (dropped, store.renewed)]
    try:
        await asyncio.wait(waits, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert not dropped.is_set(), "b took a, alive, for dead"
        assert store.renewed.is_set()  # 8 renewals: about 1.6 s
    finally:
        for task in [*tasks, *waits]:
            task.cancel()
        await asyncio.gather(*tasks, *waits, return_exceptions=True)


@pytest.mark.parametrize("bad", ["../x", "", ".hidden", "a" * 200, "a/b"])
def test_broker_ids_must_be_able_to_name_a_record(bad: str) -> None:
    from simplequeue.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        keys.registration(bad)


async def test_metrics_say_what_routing_and_owner_duties_did(start_broker: StartBroker) -> None:
    store = MemStore()
    brokers = await cluster(start_broker, store, 2)
    _, other = owner_and_other(brokers, "t")
    async with aiohttp.ClientSession() as s:
        status, _, _ = await post(s, f"{other.url}/topics/t/enqueue", {"payload": 1})
        assert status == 201
        async with s.get(f"{other.url}/metrics") as r:
            text = await r.text()
    assert "simplequeue_live_brokers 2.0" in text
    assert "simplequeue_forwarded_total 1.0" in text
    assert "simplequeue_forward_fallbacks_total 0.0" in text


async def test_a_request_the_owner_did_it_but_answered_too_late_says_it_may_be_a_repeat(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner commits an ack, then is too slow to answer: the broker that
    passed it on serves it itself, and its refusal (the job is no longer
    claimed) must say Simplequeue-Replayed, or a client takes a landed ack for
    a refused one. The SDK then finds the ack landed."""
    store = MemStore()
    brokers = await cluster(start_broker, store, 2, forward_timeout=0.3)
    owner, other = owner_and_other(brokers, "t")
    answer_too_late(monkeypatch, owner.engine, "ack")
    async with aiohttp.ClientSession() as s:
        await post(s, f"{owner.url}/topics/t/enqueue", {"id": "j", "payload": 1})
        _, claim, _ = await post(s, f"{owner.url}/topics/t/claim", {"worker_id": "w"})
        token = claim["job"]["lease_token"]
        status, body, headers = await post(
            s, f"{other.url}/topics/t/ack", {"job_id": "j", "lease_token": token}
        )
        assert status == 409, body
        assert headers.get("Simplequeue-Replayed") == "1"
        await post(s, f"{owner.url}/topics/t/enqueue", {"id": "k", "payload": 2})
        _, claim, _ = await post(s, f"{owner.url}/topics/t/claim", {"worker_id": "w"})
    async with Client(other.url, topic="t") as q:
        await q.ack(Job("k", lease_token=claim["job"]["lease_token"]))  # no LeaseLost
    assert (await owner.engine.status("t"))["completed"] == 2


async def test_an_enqueue_the_owner_landed_but_answered_too_late_is_not_done_twice(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An enqueue without ids is passed on with ids; when the owner lands it but
    answers too late, the broker that passed it on serves it itself, with the
    same ids: one job, not two."""
    store = MemStore()
    brokers = await cluster(start_broker, store, 2, forward_timeout=0.3)
    owner, other = owner_and_other(brokers, "t")
    answer_too_late(monkeypatch, owner.engine, "enqueue", "push")
    monkeypatch.setattr(other.forwarder, "suspect_for", 0.0)  # the owner is asked each time
    async with aiohttp.ClientSession() as s:
        status, body, headers = await post(s, f"{other.url}/topics/t/enqueue", {"payload": 1})
        assert headers.get("Simplequeue-Replayed") == "1"
        assert status == 200 and body["duplicate"], body
        status, body, headers = await post(
            s, f"{other.url}/topics/t/enqueue", {"jobs": [{"payload": 2}, {"payload": 3}]}
        )
        assert headers.get("Simplequeue-Replayed") == "1"
        assert status == 200 and len(body["duplicates"]) == 2, body
        status, body, headers = await post(
            s, f"{other.url}/topics/t/push", {"jobs": [{"payload": 4}]}
        )
        assert headers.get("Simplequeue-Replayed") == "1"
    assert (await owner.engine.status("t"))["total"] == 4


async def test_a_redis_enqueue_the_owner_landed_but_answered_too_late_is_not_done_twice(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same over RESP: XADD * and RPUSH are passed on with ids, and served
    here with those ids when the owner answers too late."""
    import redis.asyncio as redis

    store = MemStore()
    brokers = await cluster(start_broker, store, 2, forward_timeout=0.3, redis_addr="127.0.0.1:0")
    owner, other = owner_and_other(brokers, "t")
    answer_too_late(monkeypatch, owner.engine, "enqueue", "push")
    monkeypatch.setattr(other.forwarder, "suspect_for", 0.0)  # the owner is asked each time
    r = redis.Redis(host="127.0.0.1", port=other.redis.port)
    try:
        await r.xadd("t", {"to": "x"})
        await r.rpush("t", "a", "b")
    finally:
        await r.aclose()
    assert (await owner.engine.status("t"))["total"] == 3


async def test_a_pop_the_owner_did_but_answered_too_late_is_not_done_again(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pop has no id to tell a repeat (and its undo covers only a caller
    gone before it landed): served again by the broker that passed it on, it
    handed out a second job while the first, completed by the owner, went to
    nobody (lost). It is answered 503 "may have done" instead, and only the
    owner's pop is done."""
    store = MemStore()
    brokers = await cluster(start_broker, store, 2, forward_timeout=0.3)
    owner, other = owner_and_other(brokers, "t")
    answer_too_late(monkeypatch, owner.engine, "pop")
    async with aiohttp.ClientSession() as s:
        for job_id in ("j1", "j2", "j3"):
            await post(s, f"{owner.url}/topics/t/enqueue", {"id": job_id, "payload": job_id})
        status, body, _ = await post(s, f"{other.url}/topics/t/pop", {"worker_id": "w"})
    assert status == 503 and "may have done" in body["error"], body
    assert (await owner.engine.status("t"))["completed"] == 1


async def test_a_complete_the_owner_did_but_answered_too_late_is_not_done_again(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Served again by the broker it was sent to, a complete of claims the
    owner completed answered "none completed": its caller (a BLPOP on several
    keys) handed the job to nobody."""
    brokers = await cluster(start_broker, MemStore(), 2, forward_timeout=0.3)
    owner, other = owner_and_other(brokers, "t")
    answer_too_late(monkeypatch, owner.engine, "complete")
    async with Client(owner.url, topic="t") as q:
        await q.enqueue("x", id="j1")
        claimed = await q.claim("w")
    assert claimed is not None
    held = {"claims": [{"job_id": "j1", "lease_token": claimed.lease_token}]}
    async with aiohttp.ClientSession() as s:
        status, body, _ = await post(s, f"{other.url}/topics/t/complete", held)
    assert status == 503 and "may have done" in body["error"], body
    assert (await owner.engine.job("t", "j1"))["status"] == "completed"


@contextlib.contextmanager
def unanswered_address() -> Iterator[str]:
    """A URL whose TCP connections never open: a listening socket whose accept
    queue is full drops new SYNs, as a host that went down or a partition
    does. Nothing can be sent to it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for s in (*fillers, server):
            s.close()


async def test_a_pop_whose_owner_cannot_be_connected_to_goes_to_the_next_broker() -> None:
    """A pop is passed on to the next broker only when nothing was sent to the
    owner. A connection that never opens sends nothing, but its timeout was
    the total one (both were a second), which cannot tell: the pop was
    answered 503 "may have done" and an undo sent, while the next broker
    (here, this one) should serve it."""
    membership = Membership(MemStore(), broker_id="me", url="http://127.0.0.1:1", lease_s=15)
    with unanswered_address() as url:
        gone = Peer("gone", url)
        topic = next(
            t for t in (f"t{i}" for i in range(100)) if rendezvous(t, "gone") > rendezvous(t, "me")
        )
        membership.live = (gone, membership.me)
        await pop_served_here(membership, topic)


@pytest.mark.parametrize("url", [":8080", "http://x:99999", "http://[::1"])
async def test_a_pop_whose_owners_url_cannot_be_sent_to_goes_to_the_next_broker(url: str) -> None:
    """A peer whose URL yarl refuses ("http://x:99999") raised ValueError out
    of the Forwarder (500 "internal error"); one it takes but aiohttp refuses
    (":8080", relative: InvalidURL, a ClientError) counted as sent, so a pop
    was answered 503 "it may have done the request" and an undo went to a
    broker nothing was ever sent to. Neither sends anything: the next broker
    (here, this one) serves it (review of membership)."""
    await pop_served_here(*owned_by(Peer("bad", url)))


async def pop_served_here(membership: Membership, topic: str) -> None:
    """A pop of `topic`, whose owner nothing can be sent to, is served by the
    next broker: `membership`'s own (one fallback, nothing sent)."""
    forwarder = Forwarder(membership, token=None, answer_within=0.3)
    try:
        got = await forwarder.route(
            topic, "POST", f"/topics/{topic}/pop", b'{"worker_id": "w"}', repeatable=False
        )
    finally:
        await forwarder.close()
    assert got == Here(replayed=False)
    assert forwarder.fallbacks == 1


async def serve_owner(app: web.Application) -> tuple[Peer, web.AppRunner]:
    """`app` served on a free port as broker "owner" (its runner: cleaned up
    by the caller)."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Peer("owner", f"http://127.0.0.1:{port}"), runner


def owned_by(owner: Peer) -> tuple[Membership, str]:
    """The membership of broker "me" which sees `owner` live beside it, and a
    topic `owner` owns."""
    membership = Membership(MemStore(), broker_id="me", url="http://127.0.0.1:1", lease_s=15)
    membership.live = (owner, membership.me)
    topic = next(
        t
        for t in (f"t{i}" for i in range(100))
        if rendezvous(t, owner.broker_id) > rendezvous(t, "me")
    )
    return membership, topic


async def test_a_healthy_owner_is_not_taken_for_unreachable_by_a_half_second_stall() -> None:
    """A connection not made within half the forward timeout counts as nothing
    sent (b49d0c4). Its timer runs on this broker's own loop: a stall of that
    loop of 0.6 s (a large JSON answer, a GC pause), within the forward
    timeout, while a connection to a healthy owner opens fired it, and the
    owner was taken for unreachable, suspect for 3 s (review finding)."""

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/x", ok)
    peer, runner = await serve_owner(app)
    membership = Membership(MemStore(), broker_id="me", url="http://127.0.0.1:1", lease_s=15)
    forwarder = Forwarder(membership, token=None)
    try:
        sending = asyncio.ensure_future(
            forwarder._send(peer, "GET", "/x", None, 0.0, "application/json")
        )
        await asyncio.sleep(0)  # the connection is being made
        time.sleep(0.6)  # noqa: ASYNC251 -- the loop stalls, within the 1 s forward timeout
        try:
            answer = await sending
        except _Unreachable as exc:
            pytest.fail(f"a healthy owner taken for unreachable: {exc} (sent={exc.sent})")
        assert answer.status == 200
    finally:
        await forwarder.close()
        await runner.cleanup()


async def test_long_polls_passed_on_wait_their_turn_and_leave_short_requests_room() -> None:
    """The pool of connections to the other brokers was unbounded: each long
    poll passed on held one more descriptor, which the connection cap did not
    count (test_http_limits). Bounded, a long poll past the long polls' share
    of it (all but a quarter) waits its turn out of its wait, and is not
    taken for an owner that cannot be reached (aiohttp's own queue is timed
    as a connect); a short request is passed on meanwhile."""
    waits: list[float] = []
    polling = most = 0
    pool_taken = asyncio.Event()
    release = asyncio.Event()

    async def claim(request: web.Request) -> web.Response:
        nonlocal polling, most
        waits.append((await request.json())["wait"])
        polling += 1
        most = max(most, polling)
        if polling == 3:
            pool_taken.set()
        try:
            await release.wait()
        finally:
            polling -= 1
        return web.json_response({"error": "nothing to claim"}, status=404)

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"pending": 0})

    app = web.Application()
    app.router.add_post("/topics/{topic}/claim", claim)
    app.router.add_get("/topics/{topic}/status", status)
    owner, runner = await serve_owner(app)
    membership, topic = owned_by(owner)
    # Four connections: three for long polls, one kept for short requests.
    forwarder = Forwarder(membership, token=None, answer_within=0.2, connections=4)
    body = b'{"worker_id": "w", "wait": 5}'
    claims = [
        asyncio.create_task(
            forwarder.route(topic, "POST", f"/topics/{topic}/claim", body, wait=5.0)
        )
        for _ in range(6)
    ]
    try:
        await asyncio.wait_for(pool_taken.wait(), 5)
        got = await asyncio.wait_for(
            forwarder.route(topic, "GET", f"/topics/{topic}/status", None), 2
        )
        assert isinstance(got, Answer) and got.status == 200
        await asyncio.sleep(0.3)  # the three queued wait past a connect's timeout (0.1 s)
        release.set()
        answers = await asyncio.gather(*claims)
    finally:
        release.set()
        await asyncio.gather(*claims, return_exceptions=True)
        await forwarder.close()
        await runner.cleanup()
    assert [(a.status, a.served_by) for a in answers if isinstance(a, Answer)] == [(404, owner)] * 6
    assert (most, forwarder.fallbacks, membership.owner(topic)) == (3, 0, owner)
    # Those that waited their turn were passed on with what was left of their wait.
    assert sorted(waits)[3:] == [5.0] * 3 and max(sorted(waits)[:3]) < 4.8, waits


async def test_a_hand_over_at_a_due_waits_for_its_place_among_the_tells_no_longer_than_a_forward(
    start_broker: StartBroker,
) -> None:
    """Tells wait their turn in their share of the pool (one place at the
    smallest pool). The duties' hand-over at a topic's due waited in that
    line too, behind a stand-in's tells, one per topic it wrote: a storm of
    1,000 held this broker's reaping up for some 15 minutes (review of this
    round's changes). It waits answer_within at most, and is then not told:
    the duties tend the topic here."""
    brokers = await cluster(start_broker, MemStore(), 2, forward_timeout=0.3)
    owner, other = owner_and_other(brokers, "t")
    places = other.forwarder._slots.tells
    held = 0
    while not places.locked():  # every place taken, as by tells in flight
        await places.acquire()
        held += 1
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        told = await other._hand_over_at_due("t", owner.membership.me)
        waited = loop.time() - started
        assert not told and waited < 1.0, (told, waited)
        background = asyncio.create_task(other._hand_over("t", owner.membership.me))
        await asyncio.sleep(0.5)
        assert not background.done()  # a stand-in's tell waits its turn
    finally:
        for _ in range(held):
            places.release()
    assert await background


async def test_tells_to_a_paused_owner_leave_the_pool_room_for_requests_to_the_others(
    start_broker: StartBroker,
) -> None:
    """A stand-in tells the owner of each topic it wrote once the owner is no
    longer suspect (Broker._tell_owner): a task a topic, all at the same
    tick. An owner still paused (SIGSTOP past the suspicion) answers none,
    and a tell that got no answer made nobody suspect: every topic's tell
    went, each holding a connection of the pool for forward_timeout, at each
    end of the suspicion while the owner stayed paused. The whole pool was
    theirs: requests passed on to the healthy brokers waited for a connection,
    some answered 503. Pool of 8, 40 topics, forward_timeout 0.5 s: all 8
    connections held by tells, and of 30 enqueues for a healthy broker's
    topic 0-1 answered 503. Tells now take a small share of the pool, and
    one that gets no answer makes its broker suspect."""
    a, b, c = await cluster(start_broker, MemStore(), 3, forward_timeout=0.5)
    theirs = [t for t in (f"t{i}" for i in range(2000)) if owner_of([a, b, c], t) is c][:40]
    healthy = next(t for t in (f"u{i}" for i in range(1000)) if owner_of([a, b, c], t) is b)
    a.forwarder.connections = 8
    a.forwarder._slots = forwarding._Slots(8)
    # C is paused: its port takes connections (the kernel's backlog) and
    # answers nothing.
    port = c.http.port
    await c.http.stop()
    paused = socket.socket()
    paused.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    paused.bind(("127.0.0.1", port))
    paused.listen(1024)
    try:
        a.membership.suspect(c.settings.broker_id, 0.3)  # a request of C's timed out
        await asyncio.gather(  # A stands in for C
            *(a.engine.enqueue(topic, [JobSpec("p", id="j")]) for topic in theirs)
        )
        slots, most, answers = a.forwarder._slots, 0, Counter[int]()
        sent = a.forwarder.forwarded

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, slots.taken)
                await asyncio.sleep(0.005)

        watching = asyncio.create_task(watch())
        async with aiohttp.ClientSession() as s:
            url = f"{a.url}/topics/{healthy}/enqueue"
            for _ in range(30):  # 3 s: the suspicion ends, and the tells go
                async with s.post(url, json={"payload": 1}) as r:
                    answers[r.status] += 1
                await asyncio.sleep(0.1)
        watching.cancel()
        # The tells' share (an eighth of 8), and the enqueue in flight.
        assert (most <= 2, answers[503]) == (True, 0), (most, answers)
        # The first tell that got no answer made C suspect: the others in
        # line were not sent (a tell at each end of the suspicion, at most).
        told = a.forwarder.forwarded - sent - sum(answers.values())
        assert told <= 3, told
    finally:
        paused.close()


async def test_a_long_poll_whose_wait_runs_out_in_line_asks_the_owner_with_none_left() -> None:
    """A long poll that could not get one of the long polls' share waited for
    it `wait` + ANSWER_WITHIN, then was answered Overloaded (503, -TRYAGAIN):
    an HTTP claim with wait=1 got 503 after 2 s, where its caller asked for a
    job within 1 s or 404 (review finding). Its wait spent in line, it takes
    a short request's slot and asks the owner with no wait left."""
    waits: list[float] = []
    share_taken = asyncio.Event()
    release = asyncio.Event()

    async def claim(request: web.Request) -> web.Response:
        wait = (await request.json())["wait"]
        waits.append(wait)
        if wait:
            if len(waits) == 3:
                share_taken.set()
            await release.wait()
        return web.json_response({"error": "nothing to claim"}, status=404)

    app = web.Application()
    app.router.add_post("/topics/{topic}/claim", claim)
    owner, runner = await serve_owner(app)
    membership, topic = owned_by(owner)
    # Four connections: three for long polls, one kept for short requests.
    forwarder = Forwarder(membership, token=None, answer_within=0.5, connections=4)
    path = f"/topics/{topic}/claim"
    held = [
        asyncio.create_task(
            forwarder.route(topic, "POST", path, b'{"worker_id": "w", "wait": 30}', wait=30.0)
        )
        for _ in range(3)
    ]
    try:
        await asyncio.wait_for(share_taken.wait(), 5)
        got = await forwarder.route(
            topic, "POST", path, b'{"worker_id": "w", "wait": 0.2}', wait=0.2
        )
    finally:
        release.set()
        await asyncio.gather(*held, return_exceptions=True)
        await forwarder.close()
        await runner.cleanup()
    assert isinstance(got, Answer) and (got.status, got.served_by) == (404, owner)
    assert waits == [30, 30, 30, 0], waits


async def test_a_broker_out_of_descriptors_answers_503_and_keeps_routing_to_the_owner(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection to a topic's owner that could not be made for want of
    descriptors ("Too many open files") was taken for an owner that cannot be
    reached: the healthy owner was routed around for 3 s, its topics served by
    the broker short of descriptors (114 of 1,400 long polls at nofile 2,000,
    review finding). The shortage is this broker's: answered 503 with
    Retry-After, the owner still the owner."""
    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    owner_port = URL(owner.url).port
    connect = aiohappyeyeballs.start_connection

    async def out_of_descriptors_for_the_owner(*args: Any, **kwargs: Any) -> Any:
        if any(info[4][1] == owner_port for info in kwargs["addr_infos"]):
            raise OSError(errno.EMFILE, "Too many open files")
        return await connect(*args, **kwargs)

    monkeypatch.setattr(aiohappyeyeballs, "start_connection", out_of_descriptors_for_the_owner)
    async with aiohttp.ClientSession() as s:
        status, body, headers = await post(s, f"{other.url}/topics/t/enqueue", {"payload": 1})
    assert (status, headers.get("Retry-After")) == (503, "1"), body
    assert "Too many open files" in body["error"]
    assert owns_again(other, owner) and other.forwarder.fallbacks == 0
    assert (await owner.engine.status("t"))["pending"] == 0  # nothing was done


async def test_a_claim_the_owner_did_but_answered_too_late_strands_no_job(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim is served by the next broker when its owner answers too late,
    under the same attempt id. The owner's job was held under a token nobody
    got until its lease ran out, its attempt spent (max_attempts 1: dead,
    never worked; review finding). The owner is asked again under the attempt
    id, and what it answers goes back."""
    brokers = await cluster(start_broker, MemStore(), 2, forward_timeout=0.3)
    owner, other = owner_and_other(brokers, "t")
    answer_too_late(monkeypatch, owner.engine, "claim")
    async with aiohttp.ClientSession() as s:
        await enqueue_once_tried(s, owner, "j1", "j2", "j3")
        claiming = {"worker_id": "w", "attempt_id": "a1"}
        status, body, _ = await post(s, f"{other.url}/topics/t/claim", claiming)
        assert status == 200, body
        # The client's retry under its attempt id gets the job it holds.
        status, again, _ = await post(s, f"{other.url}/topics/t/claim", claiming)
        assert status == 200 and again["job"]["id"] == body["job"]["id"], again

    # What went back is counted once the owner's answer to the release is in,
    # a moment after the release set the counts: awaited first, not the counts.
    await until(lambda: other.forwarder.undone > 0, within=5)
    assert other.forwarder.undone == 1
    counts = await owner.engine.status("t")
    assert (counts["claimed"], counts["pending"]) == (1, 2)


async def test_a_claims_retry_after_the_owner_recovered_gets_the_job_it_was_answered(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner answered a claim too late; the broker that passed it on
    served it itself under the client's attempt id (job A) and had the owner
    give its job back. A retry of that claim under the same attempt id (its
    answer lost on the way to the client) once the owner was no longer
    suspect went to the owner, which claimed another job (B): job A stayed
    held under a token nobody had until its lease ran out, its attempt spent
    (max_attempts 1: dead, never worked; review finding)."""
    monkeypatch.setattr(forwarding, "SUSPECT_FOR", 0.5)
    brokers = await cluster(start_broker, MemStore(), 2, forward_timeout=0.3)
    owner, other = owner_and_other(brokers, "t")
    other.forwarder.suspect_for = 0.5
    real_claim = owner.engine.claim
    answer_too_late(monkeypatch, owner.engine, "claim")
    async with aiohttp.ClientSession() as s:
        await enqueue_once_tried(s, owner, "j1", "j2", "j3")
        claiming = {"worker_id": "w", "attempt_id": "a1"}
        status, first, _ = await post(s, f"{other.url}/topics/t/claim", claiming)
        assert status == 200, first
        # The owner's take-back done, and the owner no longer suspect.
        await until(lambda: other.forwarder.undone == 1 and owns_again(other, owner), within=5)
        monkeypatch.setattr(owner.engine, "claim", real_claim)  # it answers in time again
        status, again, _ = await post(s, f"{other.url}/topics/t/claim", claiming)
        assert status == 200, again
    assert again["job"]["id"] == first["job"]["id"], (first, again)
    assert (await owner.engine.status("t"))["claimed"] == 1


async def served_while_the_owner_is_suspect(
    s: aiohttp.ClientSession, owner: Any, other: Any, route: str, body: dict[str, Any]
) -> dict[str, Any]:
    """`body` posted to topic t's `route` at `other` while it takes t's owner
    for suspect, served there (not the owner's answer); once the owner is
    no longer suspect: that answer."""
    other.membership.suspect(owner.settings.broker_id, 0.3)
    status, first, headers = await post(s, f"{other.url}/topics/t/{route}", body)
    assert status == 200 and headers["Simplequeue-Owner"] == other.url, first
    await until(lambda: owns_again(other, owner))  # the owner is no longer suspect
    answer: dict[str, Any] = first
    return answer


async def test_a_claim_served_while_its_owner_was_suspect_is_retried_where_it_was_served(
    start_broker: StartBroker,
) -> None:
    """While a topic's owner is suspect (it lately did not answer), the next
    broker serves its claims itself. A retry of one under its attempt id once
    the owner was no longer suspect went to the owner, which claimed another
    job: the first stayed held by nobody until its lease ran out."""
    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    async with aiohttp.ClientSession() as s:
        for job_id in ("j1", "j2"):
            await post(s, f"{owner.url}/topics/t/enqueue", {"id": job_id, "payload": 1})
        claiming = {"worker_id": "w", "attempt_id": "a1"}
        first = await served_while_the_owner_is_suspect(s, owner, other, "claim", claiming)
        status, again, _ = await post(s, f"{other.url}/topics/t/claim", claiming)
    assert status == 200 and again["job"]["id"] == first["job"]["id"], (first, again)
    assert (await owner.engine.status("t"))["claimed"] == 1


async def test_a_named_pop_the_owner_did_but_answered_too_late_is_retried_where_it_was_done(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: an HTTP client may name its pops; "a retry whose first try
    landed gets that try's jobs". Through a broker that does not own the
    topic, an owner that popped but answered too late makes the answer 503
    "may have done" (no undo: the pop is the client's). The client's retry
    under its id at once found the owner suspect, and the broker passing it
    on popped here: another job, the owner's done for nobody (review
    finding). It goes to the owner, suspect or not: answered 503 again while
    the owner does not answer, then the first try's job."""
    brokers = await cluster(start_broker, MemStore(), 2, forward_timeout=0.3)
    owner, other = owner_and_other(brokers, "t")
    real_pop = owner.engine.pop
    answer_too_late(monkeypatch, owner.engine, "pop")
    async with aiohttp.ClientSession() as s:
        for job_id in ("j1", "j2", "j3"):
            await post(s, f"{owner.url}/topics/t/enqueue", {"id": job_id, "payload": job_id})
        popping = {"worker_id": "w", "attempt_id": "a1"}
        status, body, _ = await post(s, f"{other.url}/topics/t/pop", popping)
        assert status == 503 and "may have done" in body["error"], body
        status, body, _ = await post(s, f"{other.url}/topics/t/pop", popping)
        assert status == 503 and "may have done" in body["error"], body
        monkeypatch.setattr(owner.engine, "pop", real_pop)  # it answers in time again
        status, again, headers = await post(s, f"{other.url}/topics/t/pop", popping)
    assert status == 200 and headers["Simplequeue-Owner"] == owner.url, again
    assert [j["id"] for j in again["jobs"]] == ["j1"], again
    counts = await owner.engine.status("t")
    assert (counts["completed"], counts["pending"]) == (1, 2), "two jobs popped for one pop"


async def test_a_named_pop_served_while_its_owner_was_suspect_is_retried_where_it_was_served(
    start_broker: StartBroker,
) -> None:
    """As a claim's (above): a named pop served by the next broker while the
    owner was suspect, retried under its id once the owner was not, went to
    the owner, which popped another job; the first, its answer lost, was done
    for nobody. An /unpop of the id went to the owner too, and gave nothing
    back (review finding). Both go where the pop was served."""
    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    async with aiohttp.ClientSession() as s:
        for job_id in ("j1", "j2"):
            await post(s, f"{owner.url}/topics/t/enqueue", {"id": job_id, "payload": 1})
        popping = {"worker_id": "w", "attempt_id": "a1"}
        first = await served_while_the_owner_is_suspect(s, owner, other, "pop", popping)
        status, again, _ = await post(s, f"{other.url}/topics/t/pop", popping)
        assert status == 200, again
        status, undone, _ = await post(s, f"{other.url}/topics/t/unpop", popping)
        assert status == 200, undone
    assert again["jobs"] == first["jobs"], (first, again)
    assert undone["given_back"] == 1, undone
    counts = await owner.engine.status("t")
    assert (counts["completed"], counts["pending"]) == (0, 2)


async def test_a_named_complete_served_while_its_owner_was_suspect_is_retried_where_it_was_served(
    start_broker: StartBroker,
) -> None:
    """The same for a complete its client named: retried through the owner,
    back, it answered "none completed" for the job its first try completed."""
    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    async with Client(owner.url, topic="t") as q:
        await q.enqueue("x", id="j1")
        claimed = await q.claim("w")
    assert claimed is not None
    held = [{"job_id": "j1", "lease_token": claimed.lease_token}]
    completing = {"claims": held, "attempt_id": "c1"}
    async with aiohttp.ClientSession() as s:
        first = await served_while_the_owner_is_suspect(s, owner, other, "complete", completing)
        status, again, _ = await post(s, f"{other.url}/topics/t/complete", completing)
    assert status == 200 and again["completed"] == first["completed"] == ["j1"], again


async def test_a_redis_claim_the_owner_did_but_answered_too_late_strands_no_job(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same over RESP (Router.claim): XREADGROUP through a broker whose
    owner answers too late claims there, and the owner's claim goes back."""
    import redis.asyncio as redis

    store = MemStore()
    brokers = await cluster(start_broker, store, 2, forward_timeout=0.3, redis_addr="127.0.0.1:0")
    owner, other = owner_and_other(brokers, "t")
    answer_too_late(monkeypatch, owner.engine, "claim")
    async with Client(owner.url, topic="t") as q:
        await q.enqueue_many(["a", "b", "c"])
    r = redis.Redis(host="127.0.0.1", port=other.redis.port)
    try:
        got = await r.xreadgroup("g", "w", {"t": ">"}, count=1)
        assert len(got[0][1]) == 1, got
    finally:
        await r.aclose()

    async def only_that_one_claimed() -> bool:
        counts = await owner.engine.status("t")
        return (counts["claimed"], counts["pending"]) == (1, 2)

    await until_async(only_that_one_claimed, within=5)


async def test_claims_are_completed_through_an_owner_older_than_complete(
    start_broker: StartBroker,
) -> None:
    """During a rolling upgrade the owner may not know POST /complete yet (a
    404): the claims are acked instead, as before it."""
    import redis.asyncio as redis

    from simplequeue.broker.http import Routes, _routes

    brokers = await cluster(start_broker, MemStore(), 2, redis_addr="127.0.0.1:0")
    owner, other = owner_and_other(brokers, "t")
    api = owner.http_api
    api.routes = Routes([r for r in _routes(api.page) if not r.path.endswith("/complete")])
    r = redis.Redis(host="127.0.0.1", port=other.redis.port)
    try:
        await r.rpush("t", "a")
        assert list(await r.blpop(["none", "t"], timeout=5)) == [b"t", b"a"]
    finally:
        await r.aclose()
    counts = await owner.engine.status("t")
    assert (counts["completed"], counts["claimed"]) == (1, 0)


async def test_redis_pops_and_acks_the_owner_did_but_answered_too_late_are_not_done_again(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LPOP through a broker whose owner answers too late popped twice (one
    job lost); XACK answered 0 for an ack that landed. The pop is not done
    again, and the owner's is undone (test_unpop.py): its job is pending."""
    import redis.asyncio as redis
    from redis.exceptions import ResponseError

    store = MemStore()
    brokers = await cluster(start_broker, store, 2, forward_timeout=0.3, redis_addr="127.0.0.1:0")
    owner, other = owner_and_other(brokers, "t")
    answer_too_late(monkeypatch, owner.engine, "pop", "ack_many")
    monkeypatch.setattr(other.forwarder, "suspect_for", 0.0)  # the owner is asked each time
    async with Client(owner.url, topic="t") as q:
        await q.enqueue_many(["a", "b", "c"])
        claimed = await q.claim("w")
    assert claimed is not None
    r = redis.Redis(host="127.0.0.1", port=other.redis.port)
    try:
        with pytest.raises(ResponseError, match="may have done"):
            await r.lpop("t")
        with pytest.raises(ResponseError, match="may have done"):
            await r.xack("t", "g", claimed.id)
    finally:
        await r.aclose()
    await until(lambda: other.forwarder.undone == 1)  # the pop, given back
    counts = await owner.engine.status("t")
    assert (counts["completed"], counts["pending"]) == (1, 2)  # the ack; the pop's job back


@pytest.mark.parametrize("asked", ["claim", "job"])
async def test_a_long_poll_passed_on_past_an_owner_that_does_not_answer_waits_once(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch, asked: str
) -> None:
    """A long poll (a claim with wait=W, a job's GET ?wait=W) passed on to an
    owner that does not answer (paused) is given up after forward_timeout + W,
    then sent on to the next broker. It was sent with its wait unchanged: the
    caller waited 2W + forward_timeout (121 s for W=60, past the SDK's own
    timeout of 30 s + W). The next broker waits what is left."""
    brokers = await cluster(start_broker, MemStore(), 3, forward_timeout=0.3)
    topic = "t"
    by_id = {b.settings.broker_id: b for b in brokers}
    order = sorted(by_id, key=lambda i: rendezvous(topic, i), reverse=True)
    owner, _, last = (by_id[i] for i in order)  # the owner, the next, the one asked

    resumed = asyncio.Event()

    async def paused(*args: Any, **kwargs: Any) -> Any:
        await resumed.wait()  # as the test ends: the stop waits for no handler
        raise StoreUnavailable("was paused")

    wait = 1.5
    try:
        async with aiohttp.ClientSession() as s:
            monkeypatch.setattr(owner.engine, asked, paused)
            started = time.monotonic()
            if asked == "claim":
                status, body, _ = await post(
                    s, f"{last.url}/topics/{topic}/claim", {"worker_id": "w", "wait": wait}
                )
                assert status == 404, body  # nothing to claim
            else:
                status, body = await get(s, f"{last.url}/topics/{topic}/jobs/j?wait={wait}")
                assert status == 404, body  # no such job
        took = time.monotonic() - started
    finally:
        resumed.set()
    assert wait + 0.3 <= took < wait + 0.3 + 0.5, took


async def test_a_redis_pipeline_through_a_broker_that_does_not_own_the_topic_keeps_its_order(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipeline's writes ran together; passed on to the owner, each is a
    request of its own, and they reached it in any order: RPUSHes out of
    order, an LPOP before the RPUSH sent ahead of it."""
    import redis.asyncio as redis

    store = MemStore()
    brokers = await cluster(start_broker, store, 2, redis_addr="127.0.0.1:0")
    _, other = owner_and_other(brokers, "t")
    send, sent = other.forwarder._send, itertools.count()

    async def with_jitter(*args: Any, **kwargs: Any) -> Any:  # every other request takes longer
        if next(sent) % 2 == 0:
            await asyncio.sleep(0.02)
        return await send(*args, **kwargs)

    monkeypatch.setattr(other.forwarder, "_send", with_jitter)
    r = redis.Redis(host="127.0.0.1", port=other.redis.port)
    try:
        pipe = r.pipeline(transaction=False)
        for n in range(30):
            pipe.rpush("t", str(n))
        for _ in range(30):
            pipe.lpop("t")
        replies = await pipe.execute()
    finally:
        await r.aclose()
    assert replies[:30] == list(range(1, 31))  # each RPUSH saw those before it
    assert replies[30:] == [str(n).encode() for n in range(30)]


async def test_two_live_brokers_at_one_address_are_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two brokers given one --advertise-url (a load balancer's) took each
    other for a dead predecessor and deleted each other's record every round,
    silently: both owned every topic and contended on every write. The one
    that sees the other come back says so, once, as an error."""
    store = MemStore()
    a = Membership(store, broker_id="a", url="http://127.0.0.1:9", lease_s=60)
    b = Membership(store, broker_id="b", url="http://127.0.0.1:9", lease_s=60)
    await a.register()
    await b.register()
    with caplog.at_level(logging.INFO, logger="simplequeue.broker.membership"):
        for _ in range(4):
            await a.step()
            await b.step()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors  # one from each, once
    assert "advertises this broker's URL http://127.0.0.1:9 too" in errors[0]


async def test_an_earlier_broker_at_this_address_is_not_taken_for_alive() -> None:
    """A broker SIGKILLed and started again on its port has a new id; its old
    record looked alive for a whole lease, so topics it owned were routed to
    this address, and this broker handed them over to itself, reaping nothing
    (a campaign's topic took a minute to drain)."""
    store = MemStore()
    ghost = Membership(store, broker_id="old", url="http://127.0.0.1:9", lease_s=60)
    await ghost.register()
    me = Membership(store, broker_id="new", url="http://127.0.0.1:9", lease_s=60)
    await me.register()
    await me.step()
    assert [p.broker_id for p in me.live] == ["new"]
    assert await store.list(keys.BROKERS_PREFIX) == [keys.registration("new")]


@pytest.mark.parametrize("url", ["http://x:99999", "http://[::1", ":8080"])
async def test_a_registration_naming_no_broker_url_names_no_live_broker(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture, url: str
) -> None:
    """A registration was read without its url checked: one yarl cannot parse
    ("http://x:99999", "http://[::1") entered the live set, and every request
    for a topic it owned (1/N of them) was answered 500 "internal error"
    (URL(peer.url) raised ValueError in Forwarder._send), never routed around,
    for as long as the record was live (review of membership). It is corrupt
    data: said once, and no broker of the live set."""
    store = MemStore()
    broker = await start_broker(store, broker_id="a")
    bad = BrokerRecord("zz", url, 1, time.time(), 60, "inc")
    await store.put(keys.registration("zz"), bad.encode())
    with caplog.at_level(logging.ERROR, logger="simplequeue.broker.membership"):
        for _ in range(3):
            await broker.membership.step()
    assert [p.broker_id for p in broker.membership.live] == ["a"]
    said = [r for r in caplog.records if keys.registration("zz") in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    topic = next(
        t for t in (f"t{i}" for i in range(100)) if rendezvous(t, "zz") > rendezvous(t, "a")
    )
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            status, body, _ = await post(s, f"{broker.url}/topics/{topic}/enqueue", {"payload": 1})
            assert status == 201, body


async def test_a_broker_paused_between_its_segments_and_its_head_lands_no_head_naming_swept_ones(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    """SPEC 4.1: segments are deleted only when no head references them and no
    broker can still be reading them. A broker that served the topic (its
    owner did not answer, or it took itself for the owner) wrote a batch's
    segments, then was paused (SIGSTOP) before its head PUT. The owner, which
    wrote the topic within two sweeps and has not written it since, sweeps it
    twice: the paused broker's segments go at their second sighting. Continued,
    the paused broker's head PUT (If-Match: the head it read, still in place)
    lands, naming segments that are gone: the owner's 20 acknowledged jobs,
    spilled into them, were lost and the topic could not be served. The sweep
    writes the head before it deletes: the paused write loses its race, and
    its retry lands whole."""
    store = LocalStore(tmp_path)
    owner = await start_broker(store, broker_id="owner")
    early = [JobSpec({"pad": "x" * 1000}, id=f"early{i:03d}") for i in range(20)]
    await owner.engine.enqueue("t", early)  # inline: 20 KB, under the 24 KB bound
    paused = spawn("pause_before_head.py", str(tmp_path), "t", "10", stdin=subprocess.PIPE)
    try:
        assert paused.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(paused.stdout.readline), 30)
        assert line == "segments written\n"
        _, status = await asyncio.to_thread(os.waitpid, paused.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        # The owner's periodic sweeps, two of them, while the other is stopped.
        await owner.duties._sweep()
        await owner.duties._sweep()
        assert owner.committer.stats.segments_deleted == 1  # the paused one's segment
        os.kill(paused.pid, signal.SIGCONT)
        assert paused.stdin is not None
        paused.stdin.write("go\n")
        paused.stdin.flush()
        told = orjson.loads(await asyncio.wait_for(asyncio.to_thread(paused.stdout.readline), 30))
    finally:
        if paused.poll() is None:
            os.kill(paused.pid, signal.SIGCONT)
        for pipe in (paused.stdin, paused.stdout):  # stdin's end lets it go on
            if pipe:
                pipe.close()
        await asyncio.to_thread(paused.wait, 30)
    fresh_store = LocalStore(tmp_path)
    fresh = Engine(GroupCommitter(fresh_store, broker_id="reader", settings=CommitSettings()))
    try:
        # Either the paused write lost its race (20 jobs) or it landed whole (30).
        expected = 30 if "landed" in told else 20
        claimed = await fresh.claim("t", "w", count=100)
        assert len(claimed) == expected, told
    finally:
        await fresh_store.close()


@pytest.mark.parametrize("same_id", [True, False], ids=["same-id", "new-id"])
async def test_a_lease_written_by_a_broker_that_restarted_under_its_id_is_reaped(
    start_broker: StartBroker, same_id: bool
) -> None:
    """SPEC 3 and 4.3: an expired claim goes back to pending; only the owner
    reaps, driven by the leases it knows. A broker served a claim on a topic
    it does not own (the owner did not answer a forwarded request within the
    second), then restarted under the same --broker-id (a supervisor's
    restart; Membership.register: "a restarted broker of the same id takes
    over its own record"). Its stop hands over only the topics it owns, the
    new process reads only the topics it owns, and the owner sees the record
    renewed, not gone: no departure, so it never read the topic again. Its
    cached state had no such lease: the job stayed claimed for good on a
    quiet topic. A record whose epoch did not count up is a restart now, and
    the owner reads every topic it owns, as when a broker leaves."""
    store = MemStore()
    brokers = [await start_broker(store, broker_id=f"b{i}") for i in range(2)]
    for b in brokers:
        await b.membership.step()
    owner = max(brokers, key=lambda b: rendezvous("t", b.settings.broker_id))
    other = next(b for b in brokers if b is not owner)
    await owner.engine.enqueue("t", [JobSpec(1, id="a")])  # the owner holds t
    other.membership.suspect(owner.settings.broker_id, 60)  # a forward timed out
    await other.engine.claim("t", "w", lease=1.0)
    other.membership._suspect.clear()  # SUSPECT_FOR (3 s) passed; the lease is longer
    assert not other.membership.owns("t") and "t" in other.duties.due_topics()
    await other.stop()
    # Restarted (same id), or replaced by a new one (the control: a departure).
    again = await start_broker(store, broker_id=other.settings.broker_id if same_id else "b9")
    await owner.membership.step()  # same id: its record was renewed, no departure
    await until(lambda: owner.duties.reaped + again.duties.reaped == 1, within=10)
    assert (await owner.engine.job("t", "a"))["status"] == "pending"


async def test_two_processes_under_one_broker_id_do_not_make_owners_reread_every_round(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """SPEC 4.1: an idle broker makes O(1) store requests per second whatever
    the number of topics. Two processes given one --broker-id (a copied
    config, or an old process still renewing beside its replacement) each
    write the record in turn, each with its own epoch count: when a record
    whose epoch did not count up was a restart, every other broker read
    every topic it owns again each third of a lease, for as long as both
    ran (review finding: 138 reads of 23 topics in 3 rounds). A restart is
    a process never seen under that id (its record's incarnation): the
    second twin counts once, as a restart would, and is reported."""
    store = MemStore()
    owner = await start_broker(store, broker_id="b0", broker_lease=60)
    for i in range(40):
        await owner.engine.enqueue(f"t{i}", [JobSpec(1, id="a")])
    twins = [await start_broker(store, broker_id="bx", broker_lease=60) for _ in range(2)]
    await owner.membership.step()
    await owner.duties.taken_over.wait()
    owned = [f"t{i}" for i in range(40) if owner.membership.owns(f"t{i}")]
    assert owned
    before = owner.duties.acquired
    with caplog.at_level(logging.ERROR, logger="simplequeue.broker.membership"):
        for _ in range(3):
            for twin in twins:  # each renews its record; the owner looks after each
                await twin.membership.step()
                await owner.membership.step()
                await owner.duties.taken_over.wait()
    assert owner.duties.acquired - before <= len(owned)  # once, not every round
    said = [
        r.getMessage() for r in caplog.records if "run under the broker id bx" in r.getMessage()
    ]
    assert len(said) == 1


async def test_a_broker_upgraded_from_a_record_without_incarnation_is_a_restart() -> None:
    """Rolling upgrade: b ran a build that wrote no incarnation (epoch 40), and
    is restarted on this one (a new process, an incarnation). The process
    that wrote leases is gone: the owners must read their topics. The first
    incarnation seen after records without one was taken for b's first: no
    restart (review of 14b4ced)."""
    store = MemStore()
    me = Membership(store, broker_id="a", url="http://a", lease_s=60)
    await me.register()
    old = orjson.dumps(
        {"broker_id": "b", "url": "http://b", "epoch": 40, "heartbeat_at": 1.0, "lease_s": 60}
    )
    await store.put(keys.registration("b"), old)
    await me.step()
    assert [(p.broker_id, p.restarts) for p in me.live] == [("a", 0), ("b", 0)]
    new = Membership(store, broker_id="b", url="http://b", lease_s=60)
    await new.register()
    await me.step()
    assert [(p.broker_id, p.restarts) for p in me.live] == [("a", 0), ("b", 1)]


async def test_twins_at_two_urls_do_not_make_owners_list_every_topic_each_round(
    start_broker: StartBroker,
) -> None:
    """SPEC 4.1: an idle broker makes O(1) store requests per second whatever
    the number of topics. Twins under one id at two URLs flip the peer's URL
    each round: the live set changed, and _take_over listed every topic in
    the store (topic_names) each round, for as long as both ran (review of
    14b4ced). A change of URLs only changes no owner: nothing is taken over."""

    class ListCounting(MemStore):
        tops = 0

        async def list_top(self, prefix: str) -> list[str]:
            if prefix == keys.TOPICS_PREFIX:
                self.tops += 1
            return await super().list_top(prefix)

    store = ListCounting()
    owner = await start_broker(store, broker_id="b0", broker_lease=60)
    twins = [await start_broker(store, broker_id="bx", broker_lease=60) for _ in range(2)]
    assert twins[0].url != twins[1].url
    await owner.membership.step()
    await owner.duties.taken_over.wait()
    before = store.tops
    for _ in range(3):
        for twin in twins:
            await twin.membership.step()
            await owner.membership.step()
            await owner.duties.taken_over.wait()
    assert store.tops - before <= 1


async def test_two_brokers_at_one_url_do_not_make_a_third_read_every_head_each_round(
    start_broker: StartBroker,
) -> None:
    """SPEC 4.1: an idle broker makes O(1) store requests per second whatever
    the number of topics. Two brokers given one --advertise-url deleted each
    other's record every round (a record at this broker's URL was taken for
    a dead predecessor's, even once seen alive), and each registered again
    at its next renewal: a third broker saw one of them leave every round,
    and read every head it owns. 200 topics: 1,005 heads read in 5 rounds
    (100,000 topics on S3: some 50,000 GETs every third of --broker-lease,
    for as long as both ran). Each deletes the other's record once, before
    it sees it alive: the third reads its topics when the twins appear, not
    after."""
    store = MemStore()
    third = await start_broker(store, broker_id="c", broker_lease=60)
    for i in range(200):
        await third.engine.enqueue(f"t{i}", [JobSpec(1, id="j")])
    twins = [
        await start_broker(store, broker_id=b, broker_lease=60, advertise_url="http://127.0.0.1:9")
        for b in ("a", "b")
    ]
    await third.membership.step()
    await third.duties.taken_over.wait()
    read = []  # heads the third read, round by round
    for _ in range(5):
        before = third.duties.acquired
        for twin in twins:  # each renews its record, and looks; the third looks after each
            await twin.membership.step()
            await third.membership.step()
            await third.duties.taken_over.wait()
        read.append(third.duties.acquired - before)
    assert sum(read) <= 200 and read[2:] == [0, 0, 0], read


async def test_broker_json_keeps_its_five_fields_and_registrations_name_their_process() -> None:
    """SPEC 4.3 gives broker.json's shape: five fields. A registration adds its
    process's incarnation, new with each process under an id."""
    from simplequeue.broker.discovery import Announcer

    store = MemStore()
    announcer = Announcer(store, broker_id="b", url="http://b", lease_s=15)
    await announcer.step()
    record = orjson.loads((await store.get(keys.BROKER))[0])
    assert set(record) == {"broker_id", "url", "epoch", "heartbeat_at", "lease_s"}
    first, second = (Membership(store, broker_id="b", url="http://b", lease_s=15) for _ in "ab")
    await first.register()
    one = orjson.loads((await store.get(keys.registration("b")))[0])["incarnation"]
    await second.register()
    two = orjson.loads((await store.get(keys.registration("b")))[0])["incarnation"]
    assert one and two and one != two


async def test_a_blpop_on_two_keys_owned_elsewhere_strands_no_claim(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BLPOP a b through a broker that owns neither: both long polls are passed
    on as claims (Router.claim). Both win at the owner; a's answer arrives
    first, and _race cancels b's forwarded claim while b's answer is on its
    way (the owner answered: no undo there). b's job stayed claimed by nobody
    until its lease ran out, an attempt spent (review finding). The claim is
    asked again under its attempt id, and what it was answered goes back."""
    import redis.asyncio as redis

    brokers = await cluster(start_broker, MemStore(), 2, redis_addr="127.0.0.1:0")
    owner, other = brokers[0], brokers[1]
    a, b = [t for t in (f"k{i}" for i in range(10_000)) if owner_of(brokers, t) is owner][:2]
    claim = owner.engine.claim

    async def claim_then_answer_over_a_slow_link(*args: Any, **kwargs: Any) -> Any:
        jobs = await claim(*args, **kwargs)
        if jobs:  # landed; its answer is in transit between the brokers a while
            await asyncio.sleep(0.05 if args[0] == a else 0.2)
        return jobs

    monkeypatch.setattr(owner.engine, "claim", claim_then_answer_over_a_slow_link)
    r = redis.Redis(host="127.0.0.1", port=other.redis.port)
    try:
        for round_ in range(10):
            popping = asyncio.ensure_future(r.blpop([a, b], timeout=5))
            await until(lambda: bool(owner.committer.waiting(a) and owner.committer.waiting(b)))
            await asyncio.gather(
                owner.engine.push(a, [JobSpec(f"a{round_}")]),
                owner.engine.push(b, [JobSpec(f"b{round_}")]),
            )
            got = await popping
            assert got is not None
            async with asyncio.timeout(5):  # the other's job goes back
                while [(await owner.engine.status(t))["claimed"] for t in (a, b)] != [0, 0]:
                    await owner.committer.wait_changed(b, 0.5)
            # drain what is left
            for t in (a, b):
                while await r.lpop(t) is not None:
                    pass
    finally:
        await r.aclose()


async def test_an_enqueue_under_max_body_is_taken_through_a_broker_that_does_not_own_the_topic(
    start_broker: StartBroker,
) -> None:
    """A batch enqueue just under --max-body, without ids: its owner took it,
    but sent through another broker it was answered 413, because the
    forwarder gives every job an id before passing it on (http._with_ids)
    and the grown body was over the owner's limit (review finding). A broker
    takes a request passed on by a peer up to api.FORWARDED_ROOM times it."""
    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    limit = owner.settings.max_body
    payload = "x" * (limit // 1000 - 40)  # 1,000 jobs of about limit/1000 bytes
    body = orjson.dumps({"jobs": [{"payload": payload} for _ in range(1000)]})
    assert len(body) < limit
    async with aiohttp.ClientSession() as s:
        for broker in (owner, other):
            async with s.post(
                f"{broker.url}/topics/t/enqueue",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as r:
                said = await r.text()
                assert r.status == 201, (broker is owner, r.status, said[:200])
        # What a client may not send is refused as before, passed on or not,
        # and whoever it says it is: a peer is known by its incarnation, which
        # only the registry tells (review of 93cda8b: the header alone let
        # any client send 8 times --max-body).
        too_large = orjson.dumps({"jobs": [{"payload": "x" * (limit // 10)}] * 11})
        posing = {"": {}, "header": {FORWARDED_HEADER: other.settings.broker_id}}
        posing["guess"] = {FORWARDED_HEADER: f"{other.settings.broker_id} 0123456789abcdef"}
        for broker in (owner, other):
            for headers in posing.values():
                async with s.post(
                    f"{broker.url}/topics/t/enqueue", data=too_large, headers=headers
                ) as r:
                    assert r.status == 413, headers


async def test_a_request_of_a_route_without_a_body_is_answered_alike_through_any_broker(
    start_broker: StartBroker,
) -> None:
    """A route that takes no body (GET status, DELETE a schedule, POST
    refresh) ignores one on the topic's owner, but a broker that passes the
    request on read it first, against --max-body and --body-timeout: the same
    request was answered 200 (404 for the schedule) by the owner and 413
    through the other broker, a status /openapi.json does not list for those
    routes; one whose body never came, 408 after --body-timeout."""
    brokers = await cluster(start_broker, MemStore(), 2, max_body=10_000, body_timeout=600)
    owner, other = owner_and_other(brokers, "t")
    body = b"x" * 20_000
    answers = {}
    async with aiohttp.ClientSession() as s:
        for method, path in (
            ("GET", "/topics/t/status"),
            ("DELETE", "/topics/t/schedules/nightly"),
            ("POST", "/topics/t/refresh"),
        ):
            for broker in (owner, other):
                async with s.request(method, broker.url + path, data=body) as r:
                    answers[(method, broker is owner)] = r.status
    assert answers == {
        ("GET", True): 200,
        ("GET", False): 200,
        ("DELETE", True): 404,
        ("DELETE", False): 404,
        ("POST", True): 200,
        ("POST", False): 200,
    }
    for broker in (owner, other):  # a body announced, never sent
        host, port = "127.0.0.1", broker.http.port
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"GET /topics/t/status HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Content-Length: 10\r\n\r\n".encode()
            )
            line = await asyncio.wait_for(reader.readline(), 15)
        finally:
            writer.close()
        assert line.startswith(b"HTTP/1.1 200 "), (broker is owner, line)


@pytest.mark.parametrize("value", [b'{"k": "v"}' * 80, b"\x01" * 800], ids=["json", "control"])
async def test_an_rpush_is_taken_through_a_broker_that_does_not_own_the_key(
    start_broker: StartBroker, value: bytes
) -> None:
    """RPUSH of 1,000 values of 800 bytes (under --max-body): the owner took it,
    but another broker passes it on as JSON, every value a JSON string (a
    quote escaped takes two bytes, a control byte six) with an id, and the
    owner refused that as over its --max-body (review finding)."""
    import redis.asyncio as redis

    brokers = await cluster(start_broker, MemStore(), 2, redis_addr="127.0.0.1:0")
    owner, other = owner_and_other(brokers, "t")
    for broker in (owner, other):
        r = redis.Redis(host="127.0.0.1", port=broker.redis.port)
        try:
            before = (await owner.engine.status("t"))["pending"]
            assert await r.rpush("t", *[value] * 1000) == before + 1000
        finally:
            await r.aclose()


async def started_after(start_broker: StartBroker, **settings: Any) -> tuple[Any, Any, str]:
    """Two brokers on one store, the second started after the first's last
    registry round: it sees the first, the first has not seen it yet. And a
    topic the second passes on to the first."""
    store = MemStore()
    first = await start_broker(store, broker_id="b0", **settings)
    second = await start_broker(store, broker_id="b1", **settings)
    topics = (f"t{i}" for i in range(100))
    topic = next(t for t in topics if second.membership.owner(t) == first.membership.me)
    assert first.membership.owns(topic) and second.membership.peer("b0") is not None
    assert first.membership.peer("b1") is None
    return first, second, topic


async def test_an_enqueue_under_max_body_is_taken_through_a_broker_the_owner_has_not_seen_yet(
    start_broker: StartBroker,
) -> None:
    """A broker that just started (or restarted: a new incarnation) passes
    requests on at once, but the owner took a forwarded body of up to
    FORWARDED_ROOM times --max-body only once its registry round had read that
    broker's record, up to lease_s/3 later: meanwhile a batch under --max-body,
    grown by the ids the forwarder adds, was refused 413 (review finding). The
    owner reads an unknown forwarder's record when it is asked."""
    first, second, topic = await started_after(start_broker)
    limit = first.settings.max_body
    payload = "x" * (limit // 1000 - 40)
    body = orjson.dumps({"jobs": [{"payload": payload} for _ in range(1000)]})
    assert len(body) < limit
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{second.url}/topics/{topic}/enqueue",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as r,
    ):
        said = await r.text()
        assert r.status == 201, (r.status, said[:200])
        assert r.headers["Simplequeue-Owner"] == first.url


async def test_an_rpush_is_taken_through_a_broker_the_owner_has_not_seen_yet(
    start_broker: StartBroker,
) -> None:
    """The same for RPUSH, whose values grow as JSON when passed on."""
    import redis.asyncio as redis

    first, second, topic = await started_after(start_broker, redis_addr="127.0.0.1:0")
    r = redis.Redis(host="127.0.0.1", port=second.redis.port)
    try:
        assert await r.rpush(topic, *[b'{"k": "v"}' * 80] * 1000) == 1000
    finally:
        await r.aclose()
    assert (await first.engine.status(topic))["pending"] == 1000
