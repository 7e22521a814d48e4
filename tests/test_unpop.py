"""A pop or complete whose answer is lost on its way is undone (POST /unpop):
the topic's owner keeps what a pop named by an attempt id did, and a broker
that passed the pop on asks it to give the jobs back when its caller went
away or the owner answered too late. Before, those jobs were completed and
handed to nobody: lost."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import hiredis
import msgspec
import pytest

from simplequeue import api
from simplequeue.api import JobSpec
from simplequeue.broker import background, forwarding, popped
from simplequeue.broker import engine as engine_module
from simplequeue.broker.background import in_background
from simplequeue.broker.engine import Engine
from simplequeue.broker.forwarding import Router
from simplequeue.client import Client
from simplequeue.errors import NotDurable, SimpleQueueError, StoreUnavailable
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore.localfs import LocalStore
from simplequeue.objstore.memfs import MemStore
from simplequeue.state import Bounds
from tests.helpers.until import until
from tests.test_ownership import answer_too_late, cluster, owner_and_other, post

StartBroker = Callable[..., Awaitable[Any]]
LONG = os.environ.get("SIMPLEQUEUE_LONG") == "1"  # bin/test --long: more seeds


async def engine_with(n: int) -> Engine:
    q = Engine(GroupCommitter(MemStore(), broker_id="b", settings=CommitSettings()))
    if n:
        await q.enqueue("t", [JobSpec({"n": i}, id=f"j{i}") for i in range(n)])
    return q


async def statuses(q: Engine, *job_ids: str) -> list[str]:
    return [(await q.job("t", i))["status"] for i in job_ids]


async def test_a_pop_named_by_an_attempt_is_given_back_whole_once() -> None:
    q = await engine_with(3)
    popped = await q.pop("t", "w", count=2, attempt_id="a1")
    assert [j["id"] for j in popped] == ["j0", "j1"]
    assert await q.unpop("t", "a1", "w") == 2
    assert await statuses(q, "j0", "j1") == ["pending", "pending"]
    assert await q.unpop("t", "a1", "w") == 0  # asked again: nothing more
    again = await q.pop("t", "w", count=3)
    assert sorted(j["id"] for j in again) == ["j0", "j1", "j2"]
    assert again[0]["payload"] == {"n": 0} and again[0]["attempts"] == 1


async def test_a_pop_cut_short_by_its_payloads_bytes_is_given_back_whole() -> None:
    """A pop that took fewer jobs than its count (Bounds.claim_bytes) gives
    back each job it took, and only those."""
    settings = CommitSettings(bounds=Bounds(claim_bytes=20))
    q = Engine(GroupCommitter(MemStore(), broker_id="b", settings=settings))
    await q.enqueue("t", [JobSpec({"n": i}, id=f"j{i}") for i in range(5)])  # 7 bytes each
    popped = await q.pop("t", "w", count=5, attempt_id="a1")
    assert [j["id"] for j in popped] == ["j0", "j1", "j2"]
    assert await q.unpop("t", "a1", "w") == 3
    assert await statuses(q, *(f"j{i}" for i in range(5))) == ["pending"] * 5


async def test_a_pops_retry_gets_its_first_tries_jobs_and_pops_no_more() -> None:
    """As a claim's: the first try landed and its answer was lost."""
    q = await engine_with(3)
    first = await q.pop("t", "w", count=2, attempt_id="a1")
    assert await q.pop("t", "w", count=2, attempt_id="a1") == first
    assert (await q.status("t"))["pending"] == 1
    claimed = await q.claim("t", "w")
    assert await q.complete("t", claimed, attempt_id="c1") == ["j2"]
    assert await q.complete("t", claimed, attempt_id="c1") == ["j2"]  # not "none held"
    assert await q.unpop("t", "a1", "w") == 2
    assert await q.pop("t", "w", attempt_id="a1") == []  # undone: the id is spent
    assert await statuses(q, "j0", "j1") == ["pending", "pending"]


async def test_only_the_named_attempt_and_topic_are_undone() -> None:
    q = await engine_with(2)
    await q.pop("t", "w", attempt_id="a1")
    await q.pop("t", "w")  # no attempt id: nothing kept
    assert await q.unpop("t", "other", "w") == 0
    assert await q.unpop("u", "a1", "w") == 0
    assert await statuses(q, "j0", "j1") == ["completed", "completed"]


async def test_an_undo_that_comes_before_its_pop_lands_undoes_it_as_it_lands() -> None:
    """The owner's pop still waits (a long poll whose caller left unseen)
    when the undo arrives: it finds nothing kept, and the pop, once it
    lands, gives its job straight back."""
    q = await engine_with(0)
    popping = asyncio.create_task(q.pop("t", "w", wait=10, attempt_id="a1"))
    await until(lambda: q.committer.waiting("t") == 1)
    assert await q.unpop("t", "a1", "w") == 0
    await q.enqueue("t", [JobSpec("late", id="late")])
    assert await popping == []
    assert await statuses(q, "late") == ["pending"]


async def test_a_complete_named_by_an_attempt_is_given_back() -> None:
    q = await engine_with(2)
    claimed = await q.claim("t", "w", count=2)
    assert await q.complete("t", claimed, attempt_id="c1") == ["j0", "j1"]
    assert await q.unpop("t", "c1") == 2
    assert await statuses(q, "j0", "j1") == ["pending", "pending"]


async def test_what_is_kept_for_undos_is_bounded_by_its_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q = await engine_with(3)
    await q.pop("t", "w", attempt_id="a0")
    room = q.popped.kept_bytes * 5 // 2  # two pops of one job each (their sizes differ a little)
    monkeypatch.setattr(popped, "POPS_KEPT_BYTES", room)
    await q.pop("t", "w", attempt_id="a1")
    await q.pop("t", "w", attempt_id="a2")  # a0's goes
    assert q.popped.kept_bytes <= room
    assert [await q.unpop("t", a, "w") for a in ("a0", "a1", "a2")] == [0, 1, 1]


async def test_what_is_kept_for_undos_past_its_time_leaves_an_idle_brokers_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Records of pops and undos were forgotten past their time only as new
    ones came: an idle broker kept up to POPS_KEPT_BYTES (32 MB) of them for
    good (review of SPEC 4.1's many-topics figures, round 25). The duties'
    idle round forgets them (Engine.forget_idle)."""
    monkeypatch.setattr(api, "CLAIM_ATTEMPTS_KEPT_S", 0.05)
    q = await engine_with(5)
    await asyncio.gather(*(q.pop("t", "w", attempt_id=f"a{i}") for i in range(5)))
    assert await q.unpop("t", "never-popped", "w") == 0  # an undo kept for its pop
    await asyncio.sleep(0.1)  # time passes: every record kept is past its 0.05 s
    q.forget_idle()
    assert (len(q.popped._kept), q.popped.kept_bytes, len(q.popped._withdrawn)) == (0, 0, 0)


def test_what_is_kept_for_undos_takes_the_memory_it_is_bounded_by(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bound counted the jobs' JSON only: a small job's record took some
    700 bytes more (its names, the Kept, the dict's node), so the kept pops
    of small jobs took 2 to 4 times POPS_KEPT_BYTES (round 23's review)."""
    import tracemalloc

    room = 1024 * 1024
    monkeypatch.setattr(popped, "POPS_KEPT_BYTES", room)
    kept = popped.Popped()
    job = {"id": "j", "payload": 1, "status": "completed"}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(20_000):
            kept.keep(("topic-of-a-name", f"worker-{n % 50}", f"{n:032x}"), [job])
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept.kept_bytes <= room
    assert taken <= room * 1.25, f"{taken:,} bytes for a bound of {room:,}"


def test_a_record_its_caller_holds_is_never_forgotten_to_make_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A RESP connection holds its pops' records until it answers them or
    gives their jobs back: other records, however many and large, leave
    them alone, and are bounded without them."""
    room = 64 * 1024
    monkeypatch.setattr(popped, "POPS_KEPT_BYTES", room)
    kept = popped.Popped()
    job = {"id": "j", "payload": "x" * 10_000, "status": "completed"}
    kept.keep(("t", "w", "held"), [job], held=True)
    kept.keep(("t", "w", "larger-than-the-room"), [job] * 10, held=True)
    for n in range(100):
        kept.keep(("t", "http", f"a{n}"), [job])
    kept.forget_expired()
    assert kept.kept_bytes <= room and kept.get(("t", "http", "a0")) is None
    assert kept.get(("t", "w", "held")) is not None
    assert kept.take(("t", "w", "larger-than-the-room")) is not None
    assert kept.take(("t", "w", "held")) is not None
    assert kept.held_bytes == 0


async def test_a_pipeline_of_large_pops_whose_client_leaves_gives_every_job_back(
    start_broker: StartBroker,
) -> None:
    """A pipeline of 48 LPOPs of ~1 MB jobs (the output limit lets 64 run
    together) whose client leaves while their commit is written: every pop
    goes back. Each pop's record for its undo was kept with the others, 32
    MB at most, the oldest dropped first: the group's first records were
    gone by the time it ended, their unpops found nothing, and 15 of the 48
    jobs stayed completed for nobody (review of the RESP face)."""
    from simplequeue.broker import background
    from tests.helpers.faults import FaultyStore
    from tests.test_resp import Http, Raw, port_of

    store = FaultyStore(MemStore())
    broker = await start_broker(store, redis_addr="127.0.0.1:0")
    n, value = 48, "v" * 1_000_000
    async with aiohttp.ClientSession() as session:
        http = Http(session, broker.url)
        pusher = await Raw.open(port_of(broker))
        for _ in range(n):
            assert isinstance(await pusher.call("RPUSH", "q", value), int)
        await pusher.close()
        store.gate = asyncio.Event()
        store.put_started.clear()
        leaver = await Raw.open(port_of(broker))
        await leaver.write(b"".join(hiredis.pack_command(("LPOP", "q")) for _ in range(n)))
        await store.put_started.wait()  # the pops' commit is being written
        server = broker.redis
        [conn] = server.connections
        await leaver.close()
        await conn.left.wait()
        store.gate.set()
        await until(lambda: not server.connections and not background._running, 20)
        status = await http.status("q")
    assert (status["pending"], status["completed"]) == (n, 0), status
    assert (broker.engine.popped.held_bytes, broker.engine.popped.kept_bytes) == (0, 0)


async def test_an_http_pop_answered_too_late_is_given_back_by_the_broker_that_passed_it_on(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Passed on, the owner popped and answered after the forwarding broker
    gave up: the caller is told "may have done", and the job, popped by
    nobody it reached, comes back. The client named no pop: the broker that
    passed it on names it (as it gives an enqueue's jobs ids); before the
    review of round 22, only a pop the client named was undone."""
    brokers = await cluster(start_broker, MemStore(), 2, forward_timeout=0.3)
    owner, other = owner_and_other(brokers, "t")
    answer_too_late(monkeypatch, owner.engine, "pop")
    await owner.engine.enqueue("t", [JobSpec("x", id="j1")])
    async with aiohttp.ClientSession() as s:
        status, body, _ = await post(s, f"{other.url}/topics/t/pop", {"worker_id": "w"})
    assert status == 503 and "may have done" in body["error"], body
    await until_status(owner.engine, "j1", "pending")
    await until(lambda: other.forwarder.undone == 1)  # counted once its answer is read


@pytest.mark.parametrize("command", ["lpop", "blpop-keys", "xreadgroup-noack"])
async def test_a_redis_pop_whose_client_leaves_while_the_answer_is_on_its_way_is_given_back(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """Through a broker that does not own the key, LPOP (a pop), and BLPOP on
    several keys and XREADGROUP NOACK (a claim, then a complete): the owner
    did it, and its answer was in transit when the client hung up. What the
    forwarding broker did for nobody is undone at the owner."""
    import redis.asyncio as redis

    brokers = await cluster(start_broker, MemStore(), 2, redis_addr="127.0.0.1:0")
    owner, other = owner_and_other(brokers, "t")
    landed = asyncio.Event()
    name = "pop" if command == "lpop" else "complete"
    done = getattr(owner.engine, name)

    async def then_answer_over_a_slow_link(*args: Any, **kwargs: Any) -> Any:
        answer = await done(*args, **kwargs)
        landed.set()
        await asyncio.sleep(1.0)
        return answer

    monkeypatch.setattr(owner.engine, name, then_answer_over_a_slow_link)
    await owner.engine.enqueue("t", [JobSpec("x", id="j1")])
    r = redis.Redis(host="127.0.0.1", port=other.redis.port)
    if command == "lpop":
        reading = r.lpop("t")
    elif command == "blpop-keys":
        reading = r.blpop(["none", "t"], timeout=5)
    else:
        reading = r.xreadgroup("g", "c", {"t": ">"}, count=1, noack=True)
    popping = asyncio.ensure_future(reading)
    await landed.wait()
    await r.aclose(close_connection_pool=True)  # the client hangs up
    popping.cancel()
    await asyncio.gather(popping, return_exceptions=True)
    await until_status(owner.engine, "j1", "pending")


async def test_an_undo_the_owner_cannot_serve_yet_is_asked_again(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner answered 503 to the first undo (its store failed, and the
    undo did not land): it keeps what the pop did, the forwarding broker
    asks again, and the jobs come back."""
    monkeypatch.setattr(forwarding, "UNDO_PAUSE", 0.05)
    brokers = await cluster(start_broker, MemStore(), 2, forward_timeout=0.3)
    owner, other = owner_and_other(brokers, "t")
    answer_too_late(monkeypatch, owner.engine, "pop")
    unpop_all, refused = engine_module._unpop_all, []

    def failing_once(jobs: list[Any]) -> Any:
        if refused:
            return unpop_all(jobs)

        def fail(s: Any, now: float) -> int:
            refused.append(1)
            raise StoreUnavailable("the store did not answer")

        return fail

    monkeypatch.setattr(engine_module, "_unpop_all", failing_once)
    async with Client(owner.url, topic="t") as q:
        await q.enqueue("x", id="j1")
    async with aiohttp.ClientSession() as s:
        status, _, _ = await post(s, f"{other.url}/topics/t/pop", {"worker_id": "w"})
    assert status == 503
    await until_status(owner.engine, "j1", "pending")
    assert refused == [1]


def _is_unpop(mutation: Any) -> bool:
    return "_unpop_all" in getattr(mutation, "__qualname__", "")


async def test_a_pop_the_client_named_is_left_to_it_and_its_retry_gets_the_jobs(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HTTP client named its pop, through a broker that does not own the
    topic; the owner answered too late (503 "may have done"), and the
    client asked again under the same id, getting the first try's job. The
    forwarding broker's undo of that try, asked again after the owner's
    store refused it once, then put the job the client held back to
    pending (review, round 22). A pop its client named is now the client's
    to retry or undo: the broker that passed it on undoes only those it
    named itself."""
    brokers = await cluster(start_broker, MemStore(), 2, forward_timeout=0.3)
    owner, other = owner_and_other(brokers, "t")
    pop, slowed = owner.engine.pop, []

    async def first_answer_too_late(*args: Any, **kwargs: Any) -> Any:
        jobs = await pop(*args, **kwargs)
        if not slowed:
            slowed.append(1)
            await asyncio.sleep(1.0)
        return jobs

    monkeypatch.setattr(owner.engine, "pop", first_answer_too_late)
    await owner.engine.enqueue("t", [JobSpec("x", id="j1")])
    async with aiohttp.ClientSession() as s:
        body = {"worker_id": "w", "attempt_id": "p1"}
        status, first, _ = await post(s, f"{other.url}/topics/t/pop", body)
        assert status == 503, first
        assert not forwarding_undos_running()  # not undone behind the client's back
        # Retried at the owner (its Simplequeue-Owner header names it; the
        # forwarding broker routes around it for SUSPECT_FOR seconds now).
        status, retried, _ = await post(s, f"{owner.url}/topics/t/pop", body)
    assert status == 200 and [j["id"] for j in retried["jobs"]] == ["j1"], retried
    await until(lambda: not forwarding_undos_running())
    # The client holds j1 (popped: done). It must not be pending again.
    assert await statuses(owner.engine, "j1") == ["completed"]


def forwarding_undos_running() -> bool:
    from simplequeue.broker import background

    return bool(background._running)


async def test_two_tries_of_a_named_pop_still_polling_pop_once() -> None:
    """Both tries popped, and the second's record replaced the first's: the
    first try's job, its answer lost, was done for nobody and could not be
    undone (review, round 22). As with a claim, the try that lands second
    gives its jobs back and answers the first's."""
    q = await engine_with(0)
    first = asyncio.create_task(q.pop("t", "w", wait=5, attempt_id="a1"))
    await until(lambda: q.committer.waiting("t") == 1)
    retry = asyncio.create_task(q.pop("t", "w", wait=5, attempt_id="a1"))
    await until(lambda: q.committer.waiting("t") == 2)
    await q.enqueue("t", [JobSpec(i, id=f"j{i}") for i in range(2)])
    a, b = await asyncio.gather(first, retry)
    # One pop: whichever try answered, it answered the same job.
    assert [j["id"] for j in a] == [j["id"] for j in b], (a, b)


async def test_an_undo_is_asked_again_while_the_owner_stalls_longer_than_three_tries(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner stalled (a GC pause, a loaded host) for longer than three tries
    of an undo, each timing out and cancelled there before it did anything:
    the forwarding broker gave up after 3 tries a second apart (~5 s; 0.75 s
    with this test's 0.2 s timeouts), and the popped job stayed done for a
    client that never had it. Tries go on now until UNDO_WITHIN after the
    first (30 s; 3 s here), their pauses doubling (flake hunt, round 33)."""
    monkeypatch.setattr(forwarding, "UNDO_PAUSE", 0.05)
    monkeypatch.setattr(forwarding, "UNDO_WITHIN", 3.0)
    brokers = await cluster(start_broker, MemStore(), 2, forward_timeout=0.2)
    owner, other = owner_and_other(brokers, "t")
    answer_too_late(monkeypatch, owner.engine, "pop")
    unpop, loop, tries = owner.engine.unpop, asyncio.get_running_loop(), []
    stalled_until = loop.time() + 1.2  # the owner's undos stall this long

    async def stalling(*args: Any, **kwargs: Any) -> Any:
        tries.append(loop.time())
        if loop.time() < stalled_until:
            await asyncio.sleep(stalled_until - loop.time())  # cancelled at 0.2 s
        return await unpop(*args, **kwargs)

    monkeypatch.setattr(owner.engine, "unpop", stalling)
    await owner.engine.enqueue("t", [JobSpec("x", id="j1")])
    async with aiohttp.ClientSession() as s:
        status, _, _ = await post(s, f"{other.url}/topics/t/pop", {"worker_id": "w"})
    assert status == 503
    await until_status(owner.engine, "j1", "pending")
    assert len(tries) > 3, tries


async def test_an_undo_asked_again_while_its_first_try_is_in_flight_waits_for_it(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner's first undo took longer than the forwarding broker waits,
    then failed without landing. The second try found nothing kept (the
    first had taken it) and answered 0, and the first, its caller gone,
    never put the record back: the job stayed done (review, round 22). A
    second try now waits for the first, and a failed one is kept again."""
    monkeypatch.setattr(forwarding, "UNDO_PAUSE", 0.05)
    brokers = await cluster(start_broker, MemStore(), 2, forward_timeout=0.3)
    owner, other = owner_and_other(brokers, "t")
    answer_too_late(monkeypatch, owner.engine, "pop")
    committer = owner.engine.committer
    submit, slowed = committer.submit, []

    async def slow_then_failing(topic: str, mutation: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_unpop(mutation) and not slowed:
            slowed.append(1)
            await asyncio.sleep(0.6)  # past the forwarding broker's 0.3 s
            raise StoreUnavailable("the store did not answer")  # did not land
        return await submit(topic, mutation, *args, **kwargs)

    monkeypatch.setattr(committer, "submit", slow_then_failing)
    await owner.engine.enqueue("t", [JobSpec("x", id="j1")])
    async with aiohttp.ClientSession() as s:
        status, _, _ = await post(s, f"{other.url}/topics/t/pop", {"worker_id": "w"})
    assert status == 503
    await asyncio.sleep(1.0)
    assert slowed == [1]
    await until_status(owner.engine, "j1", "pending")


async def test_an_undo_whose_first_try_was_slow_is_counted_once(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same, the slow undo landing: the second try answered 0, and
    forward_undone said no job came back. The first lands once the second
    has come (not after a set time: landing 0.05 s before the second's
    0.3 s ran out, a loop held that long made it time out, and the third
    try found nothing left to wait for)."""
    monkeypatch.setattr(forwarding, "UNDO_PAUSE", 0.05)
    brokers = await cluster(start_broker, MemStore(), 2, forward_timeout=0.3)
    owner, other = owner_and_other(brokers, "t")
    answer_too_late(monkeypatch, owner.engine, "pop")
    committer = owner.engine.committer
    submit, unpop = committer.submit, owner.engine.unpop
    tries = 0
    asked_again = asyncio.Event()

    async def counted(topic: str, attempt_id: str, *args: Any) -> int:
        nonlocal tries
        tries += 1
        if tries == 2:
            asked_again.set()
        return await unpop(topic, attempt_id, *args)

    async def slow(topic: str, mutation: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_unpop(mutation):
            await asyncio.wait_for(asked_again.wait(), 5)  # past the first try's 0.3 s
        return await submit(topic, mutation, *args, **kwargs)

    monkeypatch.setattr(committer, "submit", slow)
    monkeypatch.setattr(owner.engine, "unpop", counted)
    await owner.engine.enqueue("t", [JobSpec("x", id="j1")])
    async with aiohttp.ClientSession() as s:
        await post(s, f"{other.url}/topics/t/pop", {"worker_id": "w"})
    await until_status(owner.engine, "j1", "pending")
    await until(lambda: not forwarding_undos_running())
    assert other.forwarder.undone == 1


async def test_a_pops_attempt_id_is_its_workers_own() -> None:
    """As a claim's: two workers whose ids collide ("1", a counter) got the
    same job (review, round 22)."""
    q = await engine_with(2)
    mine = await q.pop("t", "w1", attempt_id="1")
    theirs = await q.pop("t", "w2", attempt_id="1")
    assert [j["id"] for j in mine] == ["j0"]
    assert [j["id"] for j in theirs] == ["j1"], theirs


async def test_a_pop_landing_after_its_undo_gives_its_jobs_back_even_if_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The undo came first; the pop lands and gives its job back, when its
    caller (the owner's HTTP handler, whose connection the forwarding broker
    dropped) is cancelled: the committer skipped the abandoned give-back, and
    the job stayed done for nobody (review, round 22)."""
    q = await engine_with(0)
    popping = asyncio.create_task(q.pop("t", "w", wait=10, attempt_id="a1"))
    await until(lambda: q.committer.waiting("t") == 1)
    assert await q.unpop("t", "a1", "w") == 0
    submit = q.committer.submit

    async def cancelled_meanwhile(topic: str, mutation: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_unpop(mutation):
            asyncio.get_running_loop().call_soon(popping.cancel)  # the connection drops
        return await submit(topic, mutation, *args, **kwargs)

    monkeypatch.setattr(q.committer, "submit", cancelled_meanwhile)
    await q.enqueue("t", [JobSpec("late", id="late")])
    await asyncio.gather(popping, return_exceptions=True)
    await asyncio.sleep(0.2)
    assert await statuses(q, "late") == ["pending"]


async def test_one_pop_larger_than_the_room_for_undos_evicts_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pop larger than the whole room was kept first and then evicted with
    every other record, whose undos were forgotten (review, round 22)."""
    q = await engine_with(0)
    await q.enqueue("t", [JobSpec("small", id="s")])
    await q.enqueue("t", [JobSpec("x" * 4000, id=f"big{i}") for i in range(3)])
    await q.pop("t", "w", attempt_id="small")
    monkeypatch.setattr(popped, "POPS_KEPT_BYTES", q.popped.kept_bytes + 5000)
    await q.pop("t", "w", count=3, attempt_id="big")  # ~12 KB: more than the budget
    assert await q.unpop("t", "small", "w") == 1
    assert await q.unpop("t", "big", "w") == 0  # not kept


async def until_status(q: Engine, job_id: str, status: str) -> None:
    async with asyncio.timeout(5):
        while (await q.job("t", job_id))["status"] != status:
            await q.committer.wait_changed("t", 0.2)


@pytest.mark.parametrize("seed", range(1, 11 if LONG else 2))
async def test_pops_passed_on_and_cut_off_at_random_lose_nothing_and_double_nothing(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """A history-checked campaign of what the RESP face does through a broker
    that does not own the key: pops (LPOP) and claims then completes (BLPOP
    on several keys, XREADGROUP NOACK), each cut off at a random moment (its
    client hung up) while the owner answers after a random delay, at times
    past the forwarding broker's timeout. Every job is handed out exactly
    once: to a call that returned it, or in the final drain. Before POST
    /unpop, the jobs of calls cut off after the owner did them were lost."""
    rng = random.Random(seed)
    brokers = await cluster(start_broker, MemStore(), 2, forward_timeout=0.2)
    owner, other = owner_and_other(brokers, "t")
    # An undo's tries are answered within the 0.2 s timeout too: three tries
    # 0.05 s apart, and an owner slow for 0.75 s (a loaded machine) left a cut
    # off pop done, as an undo that is not answered does (at most once).
    monkeypatch.setattr(forwarding, "UNDO_PAUSE", 0.05)
    monkeypatch.setattr(forwarding, "UNDO_TRIES", 20)
    monkeypatch.setattr(other.forwarder, "suspect_for", 0.0)  # the owner is asked each time
    for name in ("pop", "complete"):
        done = getattr(owner.engine, name)

        async def answer_after_a_while(*args: Any, _done: Any = done, **kwargs: Any) -> Any:
            answer = await _done(*args, **kwargs)
            await asyncio.sleep(rng.choice([0.0, 0.0, 0.05, 0.15, 0.3]))  # landed, on its way
            return answer

        monkeypatch.setattr(owner.engine, name, answer_after_a_while)
    n = 200
    await owner.engine.enqueue("t", [JobSpec(i, id=f"j{i}") for i in range(n)])
    router = Router(other.engine, other.forwarder)
    handed_out: list[str] = []

    async def cut_off(call: Awaitable[list[Any]]) -> list[Any] | None:
        """What `call` answered, or None when it was cut off or failed (its
        caller handed nothing out)."""
        task = asyncio.ensure_future(call)
        await asyncio.wait([task], timeout=rng.choice([None, 0.01, 0.1, 0.25]))
        task.cancel()
        try:
            return await task
        except (asyncio.CancelledError, SimpleQueueError):
            return None

    async def one(i: int) -> None:
        count = rng.randint(1, 3)
        if i % 2:
            popped = await cut_off(router.pop("t", f"w{i}", count=count))
            handed_out.extend(j["id"] for j in popped or [])
            return
        claimed = await router.claim("t", f"w{i}", count=count)
        if not claimed:
            return
        completed = await cut_off(router.complete("t", claimed))
        if completed is None:  # as the RESP face does: the claims go back
            in_background(router.release("t", claimed))
        handed_out.extend(completed or [])

    for start in range(0, 96, 8):
        await asyncio.gather(*(one(i) for i in range(start, start + 8)))
    await until(lambda: not background._running)  # undos and releases, done
    assert (await owner.engine.status("t"))["claimed"] == 0
    while drained := await owner.engine.pop("t", "drain", count=100):
        handed_out.extend(j["id"] for j in drained)
    ids = [f"j{i}" for i in range(n)]
    lost = [i for i in ids if i not in handed_out]
    doubled = sorted({i for i in handed_out if handed_out.count(i) > 1})
    assert (lost, doubled, len(handed_out)) == ([], [], n), f"lost {lost}, doubled {doubled}"
    assert other.forwarder.undone > 0  # the campaign did cut calls off after the owner did them


class _OldCompleteRequest(msgspec.Struct, forbid_unknown_fields=True):
    claims: list[api.Held]


async def test_claims_are_completed_through_an_owner_older_than_unpop(
    start_broker: StartBroker,
) -> None:
    """During a rolling upgrade the owner may refuse a complete's attempt id
    (400, doing nothing): BLPOP on several keys asks it again without one."""
    import redis.asyncio as redis

    from simplequeue.broker import http
    from simplequeue.broker.http import Route, Routes, _routes

    brokers = await cluster(start_broker, MemStore(), 2, redis_addr="127.0.0.1:0")
    owner, other = owner_and_other(brokers, "t")
    refused: list[bytes] = []

    async def complete(call: Any) -> Any:  # as the broker before POST /unpop
        raw = await call.read()
        try:
            body = api.decode(raw, _OldCompleteRequest)
        except SimpleQueueError:
            refused.append(raw)
            raise
        jobs = [{"id": h.job_id, "lease_token": h.lease_token} for h in body.claims]
        return http.reply({"completed": await call.engine.complete("t", jobs)})

    routes = [r for r in _routes(owner.http_api.page) if not r.path.endswith("/complete")]
    owner.http_api.routes = Routes([*routes, Route("POST", "/topics/{topic}/complete", complete)])
    r = redis.Redis(host="127.0.0.1", port=other.redis.port)
    try:
        await r.rpush("t", "a")
        assert list(await r.blpop(["none", "t"], timeout=5)) == [b"t", b"a"]
    finally:
        await r.aclose()
    assert len(refused) == 1 and b"attempt_id" in refused[0]
    async with Client(owner.url, topic="t") as q:  # and over HTTP, named there
        await q.enqueue("b", id="jb")
        claimed = await q.claim("w")
    assert claimed is not None
    held = {"claims": [{"job_id": "jb", "lease_token": claimed.lease_token}]}
    async with aiohttp.ClientSession() as s:
        status, body, _ = await post(s, f"{other.url}/topics/t/complete", held)
    assert (status, body) == (200, {"completed": ["jb"]})
    assert len(refused) == 2 and b"attempt_id" in refused[1]
    counts = await owner.engine.status("t")
    assert (counts["completed"], counts["claimed"]) == (2, 0)


async def test_an_undo_after_its_broker_closed_opens_no_connection(
    start_broker: StartBroker,
) -> None:
    """A background undo whose next try came after the forwarder closed made
    a new HTTP session that nothing closed (review, round 22)."""
    brokers = await cluster(start_broker, MemStore(), 2)
    _, other = owner_and_other(brokers, "t")
    await other.forwarder.close()
    peer = next(p for p in other.membership.order("t") if p != other.forwarder.me)
    await other.forwarder.undo(peer, "t", api.UnpopRequest("a1", "w"))
    assert other.forwarder._session is None or other.forwarder._session.closed


async def test_a_give_back_that_landed_but_not_durably_is_not_done_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A give-back that landed (in place, readers see it) but could not be made
    durable fails NotDurable, which _give_back took for "did not land": it was
    kept for another undo, and the client's retry of /unpop gave the job back a
    second time after another consumer popped it: one job delivered twice
    (round 23's review of the round's core changes)."""
    store = LocalStore(tmp_path, journal=False)
    engine = Engine(GroupCommitter(store, broker_id="b"))
    await engine.enqueue("t", [JobSpec("x", id="j")])
    [popped] = await engine.pop("t", "w1", attempt_id="first")
    assert popped["id"] == "j"

    real, failing = LocalStore._fsync_dir, [2]  # the give-back's write, and its rewrite

    def failing_after_rename(directory: Path) -> None:
        if directory == tmp_path / "topics" and failing[0]:
            failing[0] -= 1
            raise OSError(errno.EIO, "EIO")
        real(directory)

    monkeypatch.setattr(LocalStore, "_fsync_dir", staticmethod(failing_after_rename))
    with pytest.raises(NotDurable):
        await engine.unpop("t", "first", worker_id="w1")  # its answer: 503, ask again
    monkeypatch.undo()
    assert (await engine.job("t", "j"))["status"] == "pending"  # it landed
    [again] = await engine.pop("t", "w2", attempt_id="second")  # another consumer has it
    assert again["id"] == "j"
    await engine.unpop("t", "first", worker_id="w1")  # the first client's retry
    status = (await engine.job("t", "j"))["status"]
    await engine.committer.close()
    await store.close()
    assert status == "completed", "the job w2 popped was given back by w1's retried unpop"


async def _popped_through_another(start_broker: StartBroker) -> tuple[Any, Any, Router]:
    """Two brokers; job "j" of topic "t" popped through the one that does not
    own it, the pop named "named" by worker "w": the owner, the other, and the
    other's Router."""
    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    await owner.engine.enqueue("t", [JobSpec("x", id="j")])
    router = Router(other.engine, other.forwarder)
    [job] = await router.pop("t", "w", attempt_id="named")
    assert job["id"] == "j"
    return owner, other, router


async def test_a_pop_named_through_a_broker_that_passes_it_on_is_undone_by_its_name(
    start_broker: StartBroker,
) -> None:
    """Router.pop keeps the attempt id its caller names (a RESP pop in a
    pipelined group, whose reply may never go out) and Router.unpop gives its
    jobs back at the owner that did it; served here when the owner is this
    broker (once its pop fell back here), by this broker's engine."""
    owner, _, router = await _popped_through_another(start_broker)
    assert (await owner.engine.job("t", "j"))["status"] == "completed"
    assert await router.unpop("t", "named", "w") == 1
    assert (await owner.engine.job("t", "j"))["status"] == "pending"
    assert await router.unpop("t", "named", "w") == 0  # once
    mine = Router(owner.engine, owner.forwarder)  # the owner's own face: no hop
    [again] = await mine.pop("t", "w", attempt_id="second")
    assert await mine.unpop("t", "second", "w") == 1
    assert (await owner.engine.job("t", again["id"]))["status"] == "pending"


async def test_pops_held_through_a_broker_that_passes_them_on_are_undone_past_its_bound(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Router remembered the broker that served each named pop,
    NAMED_POPS_KEPT (10,000) at most, the oldest dropped: past it, the
    unpop of a pop a RESP connection still held (its pipelined group not
    answered yet) asked this broker's engine, which found nothing, and the
    job stayed done for nobody. Those their caller holds are never dropped."""
    monkeypatch.setattr(forwarding, "NAMED_POPS_KEPT", 1)
    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    await owner.engine.enqueue("t", [JobSpec(i, id=f"j{i}") for i in range(3)])
    router = Router(other.engine, other.forwarder)
    for i in range(3):
        assert len(await router.pop("t", "w", attempt_id=f"a{i}", held=True)) == 1
    assert [await router.unpop("t", f"a{i}", "w") for i in range(3)] == [1, 1, 1]
    assert await statuses(owner.engine, "j0", "j1", "j2") == ["pending"] * 3


async def test_a_named_pop_is_undone_by_the_broker_that_served_it_after_ownership_moved(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Router.unpop asks the broker that served the pop, which keeps what it
    did: asked of the topic's owner at unpop time, it found nothing once the
    owner had changed in between, and the jobs stayed done."""
    owner, other, router = await _popped_through_another(start_broker)
    # The topic is this broker's now.
    monkeypatch.setattr(other.forwarder.membership, "owns", lambda topic: True)
    assert await router.unpop("t", "named", "w") == 1
    assert (await owner.engine.job("t", "j"))["status"] == "pending"


async def test_a_completion_named_through_a_broker_that_passes_it_on_is_undone_by_its_name(
    start_broker: StartBroker,
) -> None:
    """Router.complete keeps the attempt id its caller names (a RESP BLPOP of
    several keys, XREADGROUP NOACK: a claim, then its completion, whose
    reply may never go out), as Router.pop does: Router.unpop gives the job
    back at the owner that completed it. It named none of its own before,
    so the connection could not undo it."""
    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    await owner.engine.enqueue("t", [JobSpec("x", id="j")])
    router = Router(other.engine, other.forwarder)
    [job] = await router.claim("t", "w")
    assert await router.complete("t", [job], attempt_id="named") == ["j"]
    assert (await owner.engine.job("t", "j"))["status"] == "completed"
    assert await router.unpop("t", "named") == 1
    assert (await owner.engine.job("t", "j"))["status"] == "pending"
    assert await router.unpop("t", "named") == 0  # once
