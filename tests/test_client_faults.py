"""The SDK never hangs and never fakes success, whatever a proxy in front of the
broker answers: 5xx pages, HTML where JSON belongs, bodies cut short. Each
case here hung, returned a wrong answer or raised KeyError before."""

from __future__ import annotations

import asyncio
import errno
import logging
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from aiohttp import web

from simplequeue import api, keys
from simplequeue.client import Client, Done, Job, SyncClient, Worker, calls_within
from simplequeue.client import client as client_module
from simplequeue.client import worker as worker_module
from simplequeue.client.worker import TAKE_BACK_WITHIN
from simplequeue.errors import (
    BrokerError,
    BrokerUnavailable,
    IncompleteAnswer,
    InvalidRequest,
    LeaseLost,
    RequestTimedOut,
    ScheduleNotFound,
    SimpleQueueError,
    StoreUnavailable,
)
from simplequeue.objstore.memfs import MemStore
from simplequeue.records import BrokerRecord
from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.until import until

# Every call in this file must end well within this: none may hang.
PROMPT = 15.0


@pytest.fixture
async def proxied(
    start_broker: Callable[..., Awaitable[Any]],
) -> AsyncIterator[tuple[FaultProxy, Client, Client]]:
    """(proxy, a client through it, a client straight to the broker)."""
    broker = await start_broker(MemStore())
    async with FaultProxy(broker.url).running() as proxy:
        through = Client(proxy.url, topic="t", retries=4, retry_budget=5)
        direct = Client(broker.url, topic="t")
        try:
            yield proxy, through, direct
        finally:
            await through.close()
            await direct.close()


async def prompt(call: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(call, PROMPT)


async def test_a_request_left_unanswered_is_tried_again_with_the_default_budget(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """The retry budget was 30 s, as was the timeout: a first try that timed
    out had spent the budget, and no retry followed, whatever the docs say."""
    async with Client("http://127.0.0.1:9", timeout=45) as slow:
        assert slow.retry_budget > slow.timeout  # it was 30 s, whatever the timeout
    broker = await start_broker(MemStore())
    async with FaultProxy(broker.url).running() as proxy:
        proxy.fail("/status", "silent")
        async with Client(proxy.url, topic="t", timeout=0.5) as q:
            counts = await prompt(q.status())
    assert counts["pending"] == 0
    assert proxy.requests["/topics/t/status"] == 2


# --- enqueue ----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["502", "503", "504", "landed-502", "cut"])
async def test_a_transient_failure_on_enqueue_is_retried_and_enqueues_once(
    proxied: tuple[FaultProxy, Client, Client], fault: str
) -> None:
    proxy, q, direct = proxied
    proxy.fail("/enqueue", fault)
    job_id = await prompt(q.enqueue({"n": 1}))
    assert (await direct.job(job_id)).payload == {"n": 1}
    assert (await direct.status())["enqueued"] == 1  # the retry was a duplicate


@pytest.mark.parametrize("fault", ["500", "html"])
async def test_an_answer_that_is_not_the_apis_fails_the_enqueue_with_its_status(
    proxied: tuple[FaultProxy, Client, Client], fault: str
) -> None:
    proxy, q, _ = proxied
    proxy.fail("/enqueue", fault)
    with pytest.raises(BrokerError) as caught:
        await prompt(q.enqueue({"n": 1}))
    assert caught.value.status == (500 if fault == "500" else 200)
    assert await prompt(q.enqueue({"n": 2}))  # the client goes on working


async def test_every_coalesced_enqueue_is_settled_when_their_request_fails(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    proxy, q, _ = proxied
    proxy.fail("/enqueue", "500", "500")
    outcomes = await prompt(
        asyncio.gather(*(q.enqueue(i) for i in range(10)), return_exceptions=True)
    )
    assert all(isinstance(o, BrokerError | str) for o in outcomes), outcomes
    assert any(isinstance(o, BrokerError) for o in outcomes)


async def test_enqueue_many_raises_a_typed_error_on_a_bad_gateway_page(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    proxy, q, direct = proxied
    proxy.fail("/enqueue", "500")
    with pytest.raises(BrokerError):
        await prompt(q.enqueue_many([1, 2, 3]))
    assert (await direct.status())["enqueued"] == 0


# --- claim, ack, heartbeat, status -------------------------------------------------------


@pytest.mark.parametrize("fault", ["500", "html"])
async def test_claim_raises_a_typed_error_not_key_error(
    proxied: tuple[FaultProxy, Client, Client], fault: str
) -> None:
    proxy, q, direct = proxied
    await direct.enqueue(1)
    proxy.fail("/claim", fault)
    with pytest.raises(BrokerError):
        await prompt(q.claim("w"))
    proxy.fail("/claim", fault)
    with pytest.raises(BrokerError):
        await prompt(q.claim_many("w", 5))


async def test_a_proxys_404_page_on_claim_is_an_error_not_an_empty_topic(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    """A 404 used to be taken for "nothing to claim" whatever its body."""
    proxy, q, direct = proxied
    await direct.enqueue(1)
    proxy.fail("/claim", "404")
    with pytest.raises(BrokerError) as caught:
        await prompt(q.claim("w"))
    assert caught.value.status == 404
    proxy.fail("/claim", "404")
    with pytest.raises(BrokerError):
        await prompt(q.claim_many("w", 5))
    assert await prompt(q.claim("w")) is not None  # the job was there all along


async def test_a_claim_through_a_url_that_routes_nowhere_is_an_error_not_an_empty_topic(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """A broker URL whose path is wrong (URLs may carry one, for a proxy's
    prefix) gets the broker's 404 for every route: claim() took it for
    "nothing to claim" and answered None (review finding)."""
    broker = await start_broker(MemStore())
    async with Client(broker.url + "/queue", topic="t") as q:
        with pytest.raises(SimpleQueueError, match="no route"):
            await prompt(q.claim("w"))


async def test_a_502_on_claim_is_retried_and_the_claim_succeeds(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    proxy, q, direct = proxied
    await direct.enqueue(1, id="a")
    proxy.fail("/claim", "502")
    job = await prompt(q.claim("w"))
    assert job is not None and job.id == "a"
    assert proxy.requests["/topics/t/claim"] == 2


async def test_a_retried_claim_whose_first_try_landed_gets_that_tries_job(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    """A claim's answer lost after it landed (a 502 after the broker) was
    retried like any call, and the retry claimed another job: the first lay
    claimed by nobody until its lease ran out, an attempt spent (with
    max_attempts=1, dead without ever being run). The retry names the same
    attempt, and gets the job the first try claimed."""
    proxy, through, direct = proxied
    await direct.enqueue_many([{"payload": n, "id": f"j{n}", "max_attempts": 1} for n in range(3)])
    proxy.fail("/claim", "landed-502")
    job = await prompt(through.claim("w", lease=60))
    assert proxy.requests["/topics/t/claim"] == 2  # retried
    assert job is not None and job.id == "j0"
    assert (await direct.status())["claimed"] == 1
    proxy.fail("/claim", "landed-502")
    jobs = await prompt(through.claim_many("w", 2, lease=60))
    assert [j.id for j in jobs] == ["j1", "j2"]
    assert (await direct.status())["claimed"] == 3
    await through.ack(job)  # with the token the retry answered


async def test_a_claim_whose_answer_was_cut_short_is_retried(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    proxy, q, direct = proxied
    for i in range(2):
        await direct.enqueue(i)
    proxy.fail("/claim", "cut")
    job = await prompt(q.claim("w"))
    assert job is not None and job.lease_token  # the first claim's job waits out its lease


async def test_a_bad_attempt_id_is_refused_and_later_claims_keep_naming_their_attempts(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    """claim_many(attempt_id=...) with an id the API refuses (65 characters)
    was answered 400 "... at `$.attempt_id`", which the client took for a
    broker older than attempt ids: it claimed again without the id (the
    caller's bad input taken, its name dropped) and sent no attempt id on any
    later claim. A later claim whose answer was lost was then retried as a
    new claim: two jobs claimed, one handed out, the other held by nobody
    until its lease ran out, an attempt spent."""
    proxy, q, direct = proxied
    for i in range(3):
        await direct.enqueue(i, id=f"j{i}")
    refused = False
    try:
        await prompt(q.claim_many("w", 1, attempt_id="a" * 65))
    except InvalidRequest:
        refused = True
    claimed_before = (await direct.status())["claimed"]
    proxy.fail("/claim", "cut")  # the claim lands; its answer is lost on the way
    job = await prompt(q.claim("w"))
    assert job is not None
    claimed_by_it = (await direct.status())["claimed"] - claimed_before
    assert (refused, claimed_by_it) == (True, 1)


@pytest.mark.parametrize("fault", ["502", "landed-502"])
async def test_enqueue_many_after_a_502_is_retried_and_enqueues_once(
    proxied: tuple[FaultProxy, Client, Client], fault: str
) -> None:
    proxy, q, direct = proxied
    proxy.fail("/enqueue", fault)
    ids = await prompt(q.enqueue_many([1, 2, 3]))
    assert [(await direct.job(i)).payload for i in ids] == [1, 2, 3]
    assert (await direct.status())["enqueued"] == 3  # the retry's were duplicates


@pytest.mark.parametrize("fault", ["502", "landed-502", "cut"])
async def test_ack_after_a_transient_failure_completes_the_job(
    proxied: tuple[FaultProxy, Client, Client], fault: str
) -> None:
    """A 502 on /ack used to return as if it worked, the job still claimed."""
    proxy, q, direct = proxied
    await direct.enqueue(1, id="a")
    job = await direct.claim("w")
    assert job is not None
    proxy.fail("/ack", fault)
    await prompt(q.ack(job, result="done"))
    done = await direct.job("a")
    assert (done.status, done.result) == ("completed", "done")


@pytest.mark.parametrize("fault", ["landed-502", "cut"])
async def test_a_retried_ack_whose_first_try_landed_enqueues_its_follow_ups_once(
    start_broker: Callable[..., Awaitable[Any]], fault: str
) -> None:
    broker = await start_broker(MemStore())
    async with (
        FaultProxy(broker.url).running() as proxy,
        Client(proxy.url, topic="t", retries=4, retry_budget=5) as q,
        Client(broker.url, topic="t") as direct,
        direct.for_topic("next") as after,
    ):
        await direct.enqueue(1, id="a")
        job = await direct.claim("w")
        assert job is not None
        proxy.fail("/ack", fault)  # the ack lands; its answer is lost
        await prompt(q.ack(job, result="done", enqueue=["here", {"payload": 2, "topic": "next"}]))
        assert proxy.requests["/topics/t/ack"] == 2  # retried: answered 409, the job completed
        assert (await direct.job("a")).status == "completed"
        assert (await direct.job("a:0")).payload == "here"
        assert (await direct.status())["enqueued"] == 2  # a, a:0: nothing twice
        async with asyncio.timeout(PROMPT):
            while (await after.status())["pending"] < 1:
                await broker.committer.wait_changed("next", 1.0)
        assert (await after.job("a:1")).payload == 2
        assert (await after.status())["enqueued"] == 1


async def test_retried_acks_cancels_requeues_and_unschedules_whose_first_try_landed_say_done(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    """The first try of each landed and its answer was lost (a 502 after the
    broker): the retry found the work done and said it was not (acks
    "conflict", cancel "not_found", requeue nothing, unschedule
    ScheduleNotFound)."""
    proxy, through, direct = proxied
    ids = await direct.enqueue_many(["a", "b", "c"])
    claimed = await direct.claim_many("w", 2)
    proxy.fail("/ack", "landed-502")
    acked = await prompt(through.ack_many([(job, "done") for job in claimed]))
    assert [(r["id"], r["status"]) for r in acked] == [(j.id, "completed") for j in claimed]
    proxy.fail("/cancel", "landed-502")
    assert await prompt(through.cancel([ids[2]])) == {"cancelled": [ids[2]], "not_found": []}
    [dead] = await direct.enqueue_many([{"payload": "d", "max_attempts": 1}])
    job = await direct.claim("w")
    assert job is not None and job.id == dead
    assert await direct.nack(job) == "dead"
    proxy.fail("/requeue", "landed-502")
    assert await prompt(through.requeue([dead])) == [dead]
    assert proxy.requests["/topics/t/ack"] == proxy.requests["/topics/t/requeue"] == 2
    await direct.schedule("nightly", "x", every=86_400)
    proxy.fail("/schedules/nightly", "landed-502")
    await prompt(through.unschedule("nightly"))  # raised ScheduleNotFound
    assert await direct.schedules() == []
    with pytest.raises(ScheduleNotFound):  # a first try's 404 is still one
        await prompt(through.unschedule("nightly"))


async def test_a_retried_release_whose_first_try_landed_counts_the_jobs_it_released(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    """release() answers how many jobs it gave back (a Worker adds it to
    `given_back`). Retried after a first try that landed and whose answer
    was lost, the retry found none of them held under their tokens and
    answered 0: three jobs released, release() said none."""
    proxy, through, direct = proxied
    await direct.enqueue_many([1, 2, 3])
    jobs = await direct.claim_many("w", 3)
    proxy.fail("/release", "landed-502")
    released = await prompt(through.release(jobs))
    assert proxy.requests["/topics/t/release"] == 2  # retried
    assert (await direct.status())["pending"] == 3
    assert released == 3


class LookupsInFlight(FaultProxy):
    """Counts the job look-ups (GET /topics/t/jobs/...) in flight at once."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.looking = self.most_looking = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if "/jobs/" not in request.path:
            return await super().handle(request)
        self.looking += 1
        self.most_looking = max(self.most_looking, self.looking)
        try:
            return await super().handle(request)
        finally:
            self.looking -= 1


@pytest.mark.parametrize("call", ["ack_many", "release", "cancel", "requeue"])
async def test_a_retried_batch_whose_first_try_landed_looks_its_jobs_up_several_at_once(
    start_broker: Callable[..., Awaitable[Any]], call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of acks (or a release) retried after a first try that landed
    is answered "conflict" for each ack (released none): the client looks
    each job up to learn what the first try did. One GET after another,
    1,000 acks took 12.6 s at 10 ms a request, 33 s at 30 ms, longer than
    the default lease, inside the Worker's ack batcher: no other ack went out
    meanwhile (review finding). They go LOOKUPS_IN_FLIGHT at once. cancel()
    and requeue() still looked up each id answered not done one after
    another: 1,000 ids, 13.2 s and 12.9 s at 10 ms a request (review of the
    SDK, round 35)."""
    n = 100
    monkeypatch.setattr(client_module, "LOOKUPS_IN_FLIGHT", 8, raising=False)
    broker = await start_broker(MemStore())
    async with (
        LookupsInFlight(broker.url).running() as proxy,
        Client(proxy.url, topic="t") as through,
        Client(broker.url, topic="t") as direct,
    ):
        if call == "requeue":
            ids = await direct.enqueue_many([{"payload": i, "max_attempts": 1} for i in range(n)])
        else:
            ids = await direct.enqueue_many(list(range(n)))
        jobs = await direct.claim_many("w", n)
        if call == "requeue":
            for job in jobs:
                assert await direct.nack(job) == "dead"
        proxy.delay = 0.01  # so that look-ups sent together overlap
        if call == "ack_many":
            proxy.fail("/ack", "landed-502")
            acked = await prompt(through.ack_many((job, None) for job in jobs))
            assert [a["status"] for a in acked] == ["completed"] * n
        elif call == "release":
            proxy.fail("/release", "landed-502")
            assert await prompt(through.release(jobs)) == n
        elif call == "cancel":
            proxy.fail("/cancel", "landed-502")
            assert await prompt(through.cancel(ids)) == {"cancelled": ids, "not_found": []}
        else:
            proxy.fail("/requeue", "landed-502")
            assert await prompt(through.requeue(ids)) == ids
        assert sum(v for k, v in proxy.requests.items() if "/jobs/" in k) == n
    assert 1 < proxy.most_looking <= 8


class SlowLookups(FaultProxy):
    """Job look-ups (GET /topics/t/jobs/...) wait `lookup_delay` first."""

    lookup_delay = 0.5

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if "/jobs/" in request.path:
            await asyncio.sleep(self.lookup_delay)  # a slow network, not synchronisation
        return await super().handle(request)


@pytest.mark.parametrize("then", ["claimed", "completed", "failed"])
async def test_a_retried_requeue_counts_a_job_a_worker_took_at_once_as_requeued(
    start_broker: Callable[..., Awaitable[Any]], then: str
) -> None:
    """requeue() retried after a first try that landed looked up each id the
    retry did not requeue and counted it requeued only if it was "pending"
    then. A Worker long-polling the topic (the usual case: dead jobs are
    requeued for the workers waiting) claims it the moment it is back, and
    may have run it by the look-up: found "claimed" (or completed, or failed
    again), requeue() answered [] for a job it requeued (the CLI: "0
    requeued"; review of the SDK, round 35). Requeue resets a job's
    attempts: one found with one at most, neither dead nor cancelled, was
    requeued."""
    broker = await start_broker(MemStore())
    async with (
        SlowLookups(broker.url).running() as proxy,
        Client(proxy.url, topic="t", retries=4, retry_budget=5) as through,
        Client(broker.url, topic="t") as direct,
    ):
        [dead] = await direct.enqueue_many([{"payload": "d", "max_attempts": 2}])
        for status in ("pending", "dead"):
            job = await direct.claim("w")
            assert job is not None and await direct.nack(job) == status

        async def worker() -> Job | None:
            job = await direct.claim("worker", wait=10)
            if job is not None and then == "completed":
                await direct.ack(job, "done")
            elif job is not None and then == "failed":
                assert await direct.nack(job, delay=60) == "delayed"
            return job

        waiting = asyncio.create_task(worker())
        await asyncio.sleep(0.2)  # the worker's long poll is at the broker (or soon is)
        proxy.fail("/requeue", "landed-502")
        requeued = await prompt(through.requeue([dead]))
        taken = await prompt(waiting)
        assert taken is not None and taken.id == dead  # it was requeued
        assert proxy.requests["/topics/t/requeue"] == 2  # retried
        found = await direct.job(dead)
        assert (found.status, found.attempts) == ({"failed": "delayed"}.get(then, then), 1)
        assert requeued == [dead]


async def test_a_retried_requeue_does_not_count_a_job_that_was_not_dead_as_requeued(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    """A job named in a requeue retried after a first try that landed, which
    neither try requeued, was counted requeued if it was "pending": one
    that never died, failed twice and waiting for its third attempt, too
    (review of the SDK, round 35). Requeue resets a job's attempts: one
    with two or more was not requeued by that call."""
    proxy, through, direct = proxied
    [live] = await direct.enqueue_many([{"payload": "l", "max_attempts": 5}])
    for _ in range(2):
        job = await direct.claim("w")
        assert job is not None and await direct.nack(job) == "pending"
    proxy.fail("/requeue", "landed-502")
    assert await prompt(through.requeue([live])) == []
    assert proxy.requests["/topics/t/requeue"] == 2  # retried


@pytest.mark.parametrize(("suffix", "verb"), [("/dead", "purge"), ("/requeue", "requeue")])
async def test_a_retried_purge_or_requeue_of_every_dead_job_does_not_answer_nothing_was_done(
    proxied: tuple[FaultProxy, Client, Client], suffix: str, verb: str
) -> None:
    """Every dead job purged (or requeued) by a first try whose answer was
    lost: the retry found none left and answered [], and the caller (and the
    CLI) said nothing was done (review of limits, control and named tasks,
    round 25). Such an answer cannot say what the first try did: the call
    raises IncompleteAnswer with what the retry did, the work being done."""
    proxy, through, direct = proxied
    ids = await direct.enqueue_many([{"payload": i, "max_attempts": 1} for i in range(2)])
    for job in await direct.claim_many("w", 2):
        assert await direct.nack(job) == "dead"
    proxy.fail(suffix, "landed-502")
    with pytest.raises(IncompleteAnswer, match="may have") as caught:
        await prompt(getattr(through, verb)())
    assert caught.value.ids == []
    assert proxy.requests["/topics/t" + suffix] == 2
    counts = await direct.status()
    assert (counts["dead"], counts["pending"]) == (0, 0 if verb == "purge" else len(ids))
    assert await prompt(getattr(through, verb)()) == []  # answered at once: nothing left


async def test_a_purge_of_every_dead_job_retried_after_a_refused_connection_answers_its_ids(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """A try whose connection was refused sent nothing: its retry repeats
    nothing, and a purge of every dead job answers the ids it purged. Every
    retry counted as a repeat, and such a purge raised IncompleteAnswer for a
    first try that never reached a broker (round 25). Here the broker names as
    its own URL (Simplequeue-Owner) a port that refuses connections, so a
    topic's request goes there first, then to the broker given."""
    with socket.socket() as closed:  # bound, not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        refusing = f"http://127.0.0.1:{closed.getsockname()[1]}"
        broker = await start_broker(MemStore(), advertise_url=refusing)
        async with Client(f"http://127.0.0.1:{broker.http.port}", topic="t") as q:
            [job_id] = await q.enqueue_many([{"payload": 1, "max_attempts": 1}])
            job = await q.claim("w")  # its answer names the refusing owner
            assert job is not None
            assert await q.nack(job) == "dead"  # refused there, then served here
            assert await prompt(q.purge()) == [job_id]


async def test_ack_that_keeps_failing_raises_instead_of_returning(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    proxy, q, direct = proxied
    await direct.enqueue(1, id="a")
    job = await direct.claim("w")
    assert job is not None
    proxy.always["/ack"] = "502"
    with pytest.raises(BrokerUnavailable):
        await prompt(q.ack(job))
    assert (await direct.job("a")).status == "claimed"


async def test_a_proxys_409_page_on_ack_is_an_error_not_a_lost_lease(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    """A 409 used to be taken for LeaseLost whatever its body."""
    proxy, q, direct = proxied
    await direct.enqueue(1, id="a")
    job = await direct.claim("w")
    assert job is not None
    proxy.fail("/ack", "409")
    with pytest.raises(BrokerError) as caught:
        await prompt(q.ack(job))
    assert caught.value.status == 409 and not isinstance(caught.value, LeaseLost)
    assert (await direct.job("a")).status == "claimed"
    await prompt(q.ack(job))  # the lease was held all along
    assert (await direct.job("a")).status == "completed"


async def test_a_500_on_ack_raises_with_the_status(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    proxy, q, direct = proxied
    await direct.enqueue(1, id="a")
    job = await direct.claim("w")
    assert job is not None
    proxy.fail("/ack", "500")
    with pytest.raises(BrokerError) as caught:
        await prompt(q.ack(job))
    assert caught.value.status == 500
    proxy.fail("/ack", "500")
    with pytest.raises(BrokerError):
        await prompt(q.ack_many([(job, None)]))


async def test_heartbeat_rides_out_a_502_and_raises_typed_errors_otherwise(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    proxy, q, direct = proxied
    await direct.enqueue(1, id="a")
    job = await direct.claim("w", lease=30)
    assert job is not None
    proxy.fail("/heartbeat", "502")
    assert await prompt(q.heartbeat(job)) > 0
    proxy.fail("/heartbeat", "html")
    with pytest.raises(BrokerError):
        await prompt(q.heartbeat(job))


async def test_a_retried_heartbeat_of_a_lost_lease_raises_lease_lost(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    """The 409 of a retry used to escape as the SDK's private _Replayed."""
    proxy, q, direct = proxied
    await direct.enqueue(1, id="a")
    job = await direct.claim("w")
    assert job is not None
    await direct.ack(job)
    proxy.fail("/heartbeat", "502")
    with pytest.raises(LeaseLost):
        await prompt(q.heartbeat(job))


@pytest.mark.parametrize("fault", ["500", "html"])
async def test_status_never_takes_an_error_page_for_counts(
    proxied: tuple[FaultProxy, Client, Client], fault: str
) -> None:
    proxy, q, _ = proxied
    proxy.fail("/status", fault)
    with pytest.raises(BrokerError):
        await prompt(q.status())


async def test_a_cut_body_is_retried_not_raised_as_an_aiohttp_error(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    proxy, q, _ = proxied
    proxy.fail("/status", "cut")
    assert (await prompt(q.status()))["total"] == 0


@pytest.mark.parametrize("call", ["status", "claim"])
async def test_a_body_cut_short_on_every_try_raises_broker_unavailable(
    proxied: tuple[FaultProxy, Client, Client], call: str
) -> None:
    proxy, q, _ = proxied
    proxy.always["/" + call] = "cut"
    with pytest.raises(BrokerUnavailable):
        await prompt(q.status() if call == "status" else q.claim("w"))
    assert proxy.requests[f"/topics/t/{call}"] == q.retries


# --- cancellation ------------------------------------------------------------------------


async def test_cancelling_a_call_cancels_it_and_nothing_else(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    proxy, q, _ = proxied
    waiting = asyncio.ensure_future(q.claim("w", wait=30))
    await prompt(proxy.arrived.wait())  # the long poll is at the broker
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await prompt(q.enqueue(1))


async def test_an_enqueue_whose_caller_gave_up_is_not_tried_again_for_nobody(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    """A caller's own timeout around enqueue() (asyncio.timeout, wait_for: a
    web handler's) ended its wait, not its batch: the batcher went on trying
    for nobody, for the whole retry budget, and the job landed after its
    caller was told TimeoutError. Measured: one try answered 503 (a proxy's
    page) before the caller's timeout (0.05 s), four after it, the last of
    which enqueued the job; a caller that enqueues again after its timeout
    (with a new id: none was given) gets two jobs (review of the SDK). No
    try starts once every caller of the batch went away."""
    proxy, _, direct = proxied
    async with Client(proxy.url, topic="t", retries=5) as q:
        proxy.fail("/enqueue", "503", "503", "503", "503")  # the fifth try would land
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await q.enqueue("x")
        tries_then = proxy.requests["/topics/t/enqueue"]
        await asyncio.sleep(2)  # past the retries' backoff: 0.1, 0.2, 0.4, 0.8 s at most
        tries_after = proxy.requests["/topics/t/enqueue"] - tries_then
        assert (tries_after, (await direct.status())["enqueued"]) == (0, 0)
        assert await prompt(q.enqueue("y"))  # the client goes on working


async def test_an_enqueue_batch_is_tried_again_for_the_callers_still_waiting(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    """A batch some of whose callers went away is tried on for the others:
    their jobs land, and the job of the one gone with them, once."""
    proxy, q, direct = proxied
    proxy.fail("/enqueue", "503", "503")
    leaving = asyncio.create_task(q.enqueue("leaving", id="gone"))
    staying = asyncio.create_task(q.enqueue("staying", id="kept"))
    await until(lambda: proxy.requests["/topics/t/enqueue"] >= 1)  # their batch failed once
    leaving.cancel()
    assert await prompt(staying) == "kept"
    assert (await direct.status())["enqueued"] == 2
    assert proxy.requests["/topics/t/enqueue"] == 3


async def test_a_refused_batch_sends_no_half_whose_callers_went_away_and_the_others_go_on(
    proxied: tuple[FaultProxy, Client, Client],
) -> None:
    """A batch refused whole goes again in halves: a half whose callers all
    went away meanwhile is sent no more, and the rest of the batch is sent
    for the callers still waiting, not failed with it."""
    proxy, q, direct = proxied
    proxy.delay = 0.2  # the batch's first request is in flight as two callers leave
    leaving = [asyncio.create_task(q.enqueue(i, id=f"gone{i}")) for i in range(2)]
    bad = asyncio.create_task(q.enqueue(10**30, id="bad"))  # no store holds it: refused
    staying = asyncio.create_task(q.enqueue("kept", id="kept"))
    await prompt(proxy.arrived.wait())
    for caller in leaving:
        caller.cancel()
    assert await prompt(staying) == "kept"
    with pytest.raises(InvalidRequest):
        await prompt(bad)
    # All four, then [bad, kept], then each alone: [gone0, gone1] no more.
    assert proxy.requests["/topics/t/enqueue"] == 4
    assert (await direct.status())["enqueued"] == 1


async def test_the_sdk_lets_an_idle_connection_go_before_the_broker_would(
    start_broker: Callable[..., Awaitable[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK kept an idle connection as long as the broker did (aiohttp's
    15 s, the brokers' default --keepalive-timeout), so a request could be
    sent just as the broker closed it: "server disconnected", retried, or
    with retries=1 failed. Here, scaled down, the broker sees the SDK close
    its connection first, also when it was used twice in a row (aiohttp
    then keeps it up to twice its keep-alive: half the broker's was not
    enough)."""
    scale = 1.0 / api.BROKER_KEEPALIVE  # the brokers' default as 1 s
    monkeypatch.setattr(client_module, "KEEPALIVE", client_module.KEEPALIVE * scale)
    broker = await start_broker(MemStore(), keepalive_timeout=api.BROKER_KEEPALIVE * scale)
    assert broker.http is not None
    async with Client(broker.url, topic="t", retries=1) as q:
        await q.enqueue("x", id="j")
        assert (await prompt(q.status()))["pending"] == 1
        assert broker.http.open_connections == 1
        await until(lambda: broker.http.open_connections == 0, within=0.9)
        assert (await prompt(q.status()))["pending"] == 1


async def test_a_long_poll_whose_answer_is_cut_short_is_retried(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """The retry budget (twice the timeout) counted from the call's start, its
    wait included: a look-up that waited longer than that was not retried
    when its answer was cut short, and result() raised BrokerUnavailable for
    a job that had completed (with the defaults, every full 60 s poll)."""
    broker = await start_broker(MemStore())
    async with (
        FaultProxy(broker.url).running() as proxy,
        Client(broker.url, topic="t") as direct,
        Client(proxy.url, topic="t", timeout=0.2) as q,
    ):
        await direct.enqueue("x", id="j")
        job = await direct.claim("w")
        assert job is not None
        proxy.fail("/jobs/j", "cut")  # the first answer, when the job completes
        looking = asyncio.create_task(q.result("j", timeout=10))
        await until(lambda: proxy.requests["/topics/t/jobs/j"] == 1)
        await asyncio.sleep(2 * q.retry_budget)  # the look-up waits past its budget
        await direct.ack(job, result="done")
        assert await prompt(looking) == "done"
    assert proxy.requests["/topics/t/jobs/j"] == 2


async def test_a_payload_json_cannot_hold_fails_its_own_enqueue_not_its_batchs(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """Enqueues made while one is in flight go out as one request. One
    payload that cannot be encoded (an object of the caller's class) failed
    every enqueue of its batch with its TypeError: the others' jobs were
    never enqueued."""
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="t") as q:
        results = await asyncio.gather(
            *(q.enqueue(object() if i == 3 else i, id=f"j{i}") for i in range(10)),
            return_exceptions=True,
        )
        assert isinstance(results.pop(3), TypeError)
        assert results == [f"j{i}" for i in range(10) if i != 3]
        assert (await q.status())["pending"] == 9
        itself: list[Any] = []
        itself.append(itself)  # msgspec: RecursionError
        results = await asyncio.gather(
            *(q.enqueue(itself if i == 3 else i, id=f"k{i}") for i in range(10)),
            return_exceptions=True,
        )
        assert isinstance(results.pop(3), RecursionError)
        assert results == [f"k{i}" for i in range(10) if i != 3]


async def test_coalesced_enqueues_a_proxy_finds_too_large_together_are_each_enqueued(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """A proxy that bounds request bodies (nginx's client_max_body_size is
    1 MiB by default; this one is aiohttp's, also 1 MiB) answers a request
    of 1,000 coalesced jobs of 1.1 KB with its own 413 page, not the API's
    error: a BrokerError, which failed every one of the 1,000 enqueue()
    calls ("HTTP 413: Maximum request body size 1048576 exceeded."), though
    each job alone fits. A 413 is a request too large, whoever says it: the
    request goes again in halves."""
    broker = await start_broker(MemStore())
    async with FaultProxy(broker.url).running() as proxy, Client(proxy.url, topic="t") as q:
        payloads = ["x" * 1100 for _ in range(1000)]
        results = await asyncio.gather(*(q.enqueue(p) for p in payloads), return_exceptions=True)
    failed = {repr(r)[:120] for r in results if not isinstance(r, str)}
    assert not failed, f"{sum(not isinstance(r, str) for r in results)} failed: {failed}"


@pytest.mark.parametrize("owner", ["http://127.0.0.1:99999", "http://[::1"])
async def test_an_owner_no_url_can_name_is_not_followed(owner: str) -> None:
    """A broker (or a proxy rewriting headers) named a topic's owner with a
    port past 65535 or a bracket left open: the client kept it, and every
    later request of the topic raised a bare ValueError (building its URL)
    for the life of the client. Such an owner is not followed."""
    from aiohttp import web

    counts = dict.fromkeys(api.Counts.__struct_fields__, 0)
    seen: list[str] = []

    async def status(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response(counts, headers={api.OWNER_HEADER: owner})

    app = web.Application()
    app.add_routes([web.get("/topics/{t}/status", status)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with Client(url, topic="t") as q:
            for _ in range(3):
                assert (await prompt(q.status()))["pending"] == 0
        assert seen == ["/topics/t/status"] * 3
    finally:
        await runner.cleanup()


async def test_an_owner_behind_a_proxy_answering_502_is_left_for_the_broker_given(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """Brokers advertised behind a proxy (a load balancer, an ingress): once the
    topic's owner is gone, its proxy answers 502 pages instead of refusing the
    connection. The client forgot the owner (back to the broker it was given,
    which routes to the new owner) only on a connection error or a timeout: a
    502 was retried to the same address, and every later call of the topic
    failed for the life of the client (review finding)."""
    from tests.test_ownership import owner_of

    store = MemStore()
    async with FaultProxy("http://127.0.0.1:9").running() as proxy:
        b0 = await start_broker(store, broker_id="b0", broker_lease=3.0)
        b1 = await start_broker(store, broker_id="b1", broker_lease=3.0, advertise_url=proxy.url)
        proxy.upstream = f"http://127.0.0.1:{b1.http.port}"  # b1.url is the proxy's
        for b in (b0, b1):
            await b.membership.step()
        topic = next(t for t in (f"t{n}" for n in range(100)) if owner_of([b0, b1], t) is b1)
        async with Client(b0.url, topic=topic, retries=3, retry_budget=3) as q:
            await prompt(q.enqueue("a"))  # through b0, which names the owner: the proxy
            assert q._owner == proxy.url
            await b1.stop()  # the owner goes; b0 serves the topic now
            await b0.membership.step()
            for suffix in ("/status", "/enqueue"):
                proxy.always[suffix] = "502"  # what the proxy answers with no backend
            assert (await prompt(q.status()))["pending"] == 1
            await prompt(q.enqueue("b"))
            assert (await prompt(q.status()))["pending"] == 2
            assert q._owner == b0.url


@asynccontextmanager
async def serving(handler: Any, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    runner = web.ServerRunner(web.Server(handler), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def naming(owner: str) -> Any:
    """A broker's handler: zero counts, naming `owner` the topic's owner."""
    counts = dict.fromkeys(api.Counts.__struct_fields__, 0)

    async def given(request: web.BaseRequest) -> web.StreamResponse:
        return web.json_response(counts, headers={api.OWNER_HEADER: owner})

    return given


@asynccontextmanager
async def owner_behind_a_broker(answers: Any) -> AsyncIterator[tuple[str, str]]:
    """(the broker's URL, the owner's): an owner serving `answers`, and a
    broker that names it in every answer."""
    async with serving(answers) as owner, serving(naming(owner)) as url:
        yield url, owner


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) of a self-signed certificate for 127.0.0.1."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_a_client_given_https_does_not_follow_an_owner_over_plain_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Brokers advertising http behind a TLS proxy (as the README's
    --advertise-url example does): a client given the https URL followed
    Simplequeue-Owner to the owner's http URL and sent its bearer token there
    in clear text (review finding). The broker given passes such requests on."""
    import aiohttp.connector

    cert, key = _self_signed(tmp_path)
    trusting = ssl.create_default_context(cafile=cert)
    monkeypatch.setattr(aiohttp.connector, "_SSL_CONTEXT_VERIFIED", trusting)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    in_clear: list[str | None] = []

    async def owner(request: web.BaseRequest) -> web.StreamResponse:
        in_clear.append(request.headers.get("Authorization"))
        return web.json_response({"id": "owner"}, status=201)

    async def front(request: web.BaseRequest) -> web.StreamResponse:
        named = {api.OWNER_HEADER: plain}
        return web.json_response({"id": (await request.json())["id"]}, status=201, headers=named)

    async with (
        serving(owner) as plain,
        serving(front, tls) as url,
        Client(url, topic="t", token="s3cret", retries=1) as q,
    ):
        ids = [await prompt(q.enqueue(n, id=f"j{n}")) for n in range(2)]
        assert in_clear == []
        assert ids == ["j0", "j1"]


async def test_an_owner_that_did_not_answer_is_not_followed_again_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Brokers advertising an address the client cannot reach (an internal
    --advertise-url, a NAT): back to the broker given once the owner did not
    answer, the client followed that broker's next answer, which named the
    owner again, and every call waited out a whole `timeout` there first (a
    Worker's claims, their leases counted from that first try, came past
    them: with timeout=3, lease=4, 3 jobs ran 7 times; review finding)."""
    hole = socket.socket()  # accepts (the kernel's backlog), never answers
    hole.bind(("127.0.0.1", 0))
    hole.listen()
    owner = f"http://127.0.0.1:{hole.getsockname()[1]}"
    loop = asyncio.get_running_loop()
    with hole:
        async with serving(naming(owner)) as url, Client(url, topic="t", timeout=0.5) as q:
            await prompt(q.status())  # names the owner
            await prompt(q.status())  # no answer there in 0.5 s: the broker given's
            started = loop.time()
            for _ in range(2):
                await prompt(q.status())
            assert loop.time() - started < 0.4, "each call waited out the owner again"
            monkeypatch.setattr(client_module, "OWNER_LEFT_FOR", 0.0, raising=False)
            await prompt(q.status())
            assert q._owner == owner  # followed again once that while is over


def _unreachable() -> tuple[list[socket.socket], str]:
    """A listening socket whose accept queue is full, and its URL: the kernel
    drops the SYNs of further connections (as a firewall does), and a
    connect to it hangs until its timeout. The sockets are the caller's."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    address = hole.getsockname()
    held = [hole]
    while True:  # fill the queue: until a connect no longer completes
        filler = socket.socket()
        filler.setblocking(False)
        held.append(filler)
        if filler.connect_ex(address) not in (0, errno.EINPROGRESS):
            break
        _, ready, _ = select.select([], [filler], [], 0.2)
        if not ready:
            break
    return held, f"http://127.0.0.1:{address[1]}"


async def test_an_owner_whose_address_drops_connections_costs_a_connect_timeout_not_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An owner advertised at an address whose packets are dropped (a
    firewall, a private --advertise-url across networks): the client had no
    connect timeout, and the call that followed the owner waited out its
    whole `timeout` (30 s by default) connecting, once every OWNER_LEFT_FOR
    (review of ownership, round 35). A connect that takes CONNECT_TIMEOUT
    sends the call back to the broker given, as one refused does."""
    monkeypatch.setattr(client_module, "CONNECT_TIMEOUT", 0.5)
    held, owner = _unreachable()
    try:
        async with serving(naming(owner)) as url, Client(url, topic="t", timeout=30) as q:
            await prompt(q.status())  # names the owner
            assert q._owner == owner
            async with asyncio.timeout(10):  # not the 30 s timeout
                await q.status()
            assert q._owner is None and owner in q._owners_left
    finally:
        for sock in held:
            sock.close()


async def test_a_connect_timeout_inside_a_calls_within_bound_leaves_the_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, inside a calls_within() bound shorter than the call's timeout
    (a Worker's heartbeats with a lease under the client's timeout): the
    connect timeout, a TimeoutError, was taken for the caller's own bound, the
    owner not left, and every retry went to it again until the bound ran out
    (12 s of a 12 s bound, then TimeoutError), though the broker given would
    have answered at once (review of this round's changes)."""
    monkeypatch.setattr(client_module, "CONNECT_TIMEOUT", 0.5)
    held, owner = _unreachable()
    try:
        async with serving(naming(owner)) as url, Client(url, topic="t", timeout=30) as q:
            await prompt(q.status())  # names the owner
            async with asyncio.timeout(5), calls_within(10):  # under the timeout: cut
                await q.status()
            assert q._owner is None and owner in q._owners_left
    finally:
        for sock in held:
            sock.close()


async def test_a_call_out_of_its_own_time_does_not_leave_a_healthy_owner() -> None:
    """8b37daf: an owner left (refused, timed out, cut short) is not followed
    again for OWNER_LEFT_FOR (60 s). A try cut short by the caller's own
    calls_within() bound (a Worker's heartbeats and acks run under one, as
    short as a second) counted as the owner not answering: one slow answer
    from a healthy owner sent every request of the topic through the broker
    given (two hops, its load) for a minute (review of round 28)."""
    counts = dict.fromkeys(api.Counts.__struct_fields__, 0)
    slow = asyncio.Event()
    at_owner: list[str] = []

    async def owner_answers(request: web.BaseRequest) -> web.StreamResponse:
        at_owner.append(request.path)
        if slow.is_set():
            slow.clear()
            await asyncio.sleep(0.3)  # one slow answer (a store's hiccup)
        return web.json_response(counts)

    async with (
        owner_behind_a_broker(owner_answers) as (url, owner),
        Client(url, topic="t", timeout=5) as q,
    ):
        await prompt(q.status())  # names the owner
        await prompt(q.status())
        assert len(at_owner) == 1
        slow.set()
        with pytest.raises(TimeoutError):
            async with calls_within(0.1):  # the caller's bound, not the owner's fault
                await q.status()
        assert q._owner == owner and owner not in q._owners_left
        await prompt(q.status())
        assert len(at_owner) == 3, "a healthy owner left for a minute"


async def test_a_connection_the_owner_closed_does_not_leave_it_for_a_minute() -> None:
    """A request sent on a kept-alive connection just as the owner closes it
    ("server disconnected") is retried; 8b37daf also left the owner for a
    minute, every request of the topic through the broker given (review of
    round 28). A closed connection fails fast: its retry goes through the
    broker given, and the owner is followed again at once."""
    counts = dict.fromkeys(api.Counts.__struct_fields__, 0)
    hang_up = 0
    at_owner: list[str] = []

    async def owner_answers(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal hang_up
        at_owner.append(request.path)
        if hang_up:
            hang_up -= 1
            assert request.transport is not None
            request.transport.close()  # no answer: the connection closed
        return web.json_response(counts)

    async with (
        owner_behind_a_broker(owner_answers) as (url, owner),
        Client(url, topic="t", retries=3) as q,
    ):
        await prompt(q.status())  # names the owner
        await prompt(q.status())  # its connection kept alive
        hang_up = 1
        # A POST: aiohttp retries a GET on a new connection itself.
        await prompt(q.request("POST", q._t("/status"), api.Counts, {}))
        assert len(at_owner) == 2  # the retry went through the broker given
        assert q._owner == owner and owner not in q._owners_left
        await prompt(q.status())
        assert len(at_owner) == 3, "the owner was left"


async def test_an_answer_is_not_read_past_the_clients_max_answer() -> None:
    """A proxy or a wrong port that streams: the client read whatever came for
    its whole `timeout` into memory (RSS +550 MB a try in 1 s on loopback,
    2.6 GB over five calls; review finding). Past its max_answer (made 1 MiB
    here), the call fails, not retried, the rest of the answer left unread."""
    sent = 0

    async def flood(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            for _ in range(64):
                await response.write(b"x" * (1 << 20))
                sent += 1 << 20
        except ConnectionError:  # the client hung up
            pass
        return response

    async with serving(flood) as url, Client(url, topic="t", retries=3, max_answer=1 << 20) as q:
        with pytest.raises(BrokerError):
            await prompt(q.status())
    assert sent < 16 << 20, f"the client read {sent >> 20} MiB of one answer"


async def test_a_client_reads_an_answer_up_to_its_max_answer() -> None:
    """MAX_ANSWER (128 MiB) was the one cap of every client, though a claim of
    a job a broker with a large --max-body took is larger (22 MiB of control
    characters over RESP is 132 MiB as JSON): the broker claimed the job, the
    SDK refused its answer, and the job was never run (review of round 28).
    The cap is each client's max_answer (MAX_ANSWER, 1 GiB, by default), a
    SyncClient's too. Here a job of 3 MiB as JSON, read under a 4 MiB cap,
    refused under a 2 MiB one."""
    job = api.Job("big", "pending", payload="\x01" * (512 << 10))

    async def answer(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=msgspec.json.encode(job), content_type="application/json")

    async with serving(answer) as url:
        async with Client(url, topic="t", max_answer=4 << 20) as q:
            assert (await prompt(q.job("big"))).payload == job.payload
            assert q.for_topic("u").max_answer == 4 << 20
        async with Client(url, topic="t", max_answer=2 << 20) as q:
            with pytest.raises(BrokerError, match="max_answer"):
                await prompt(q.job("big"))
    assert Client("http://127.0.0.1:9").max_answer == client_module.MAX_ANSWER
    with SyncClient("http://127.0.0.1:9", max_answer=5) as sync:
        assert sync.client.max_answer == 5
    with pytest.raises(ValueError, match="max_answer"):
        Client("http://127.0.0.1:9", max_answer=0)


def test_the_default_max_answer_holds_a_claim_from_a_broker_with_a_max_body_of_160_mib() -> None:
    """The README: a claim's answer is 16 MiB of payloads as JSON (Bounds
    .claim_bytes), past the job that crosses the mark, which comes whole (six
    times --max-body as JSON at most: a RESP value of control characters),
    and 27 KiB more a job at most, api.MAX_BATCH jobs: the default
    max_answer holds it up to a --max-body of 160 MiB. It was 128 MiB, less
    than one job a broker with a --max-body of 24 MiB takes over RESP
    (review of round 28)."""
    from simplequeue.state.limits import Bounds

    MiB = 1 << 20
    assert len(msgspec.json.encode("\x01" * 1000)) == 6 * 1000 + 2  # the worst escape
    # A job's id and its worker's, 256 printable characters of 4 bytes each;
    # the lease token is the broker's.
    widest = "\U0001f600" * 256
    at_most = api.Job(
        widest, "claimed", payload=None, priority=-(2**31), run_at=-1.2345678901234567e300,
        attempts=2**62, max_attempts=2**62, created_at=-1.2345678901234567e300,
        claimed_by=widest, claimed_at=-1.2345678901234567e300,
        heartbeat_at=-1.2345678901234567e300, lease_expires_at=-1.2345678901234567e300,
        lease_token=api.new_id(), last_error="\x01" * api.MAX_ERROR,
    )  # fmt: skip
    per_job = len(msgspec.json.encode(at_most)) + 1  # and a comma
    assert per_job <= 27 << 10
    claim = Bounds().claim_bytes + 6 * 160 * MiB + api.MAX_BATCH * per_job + 64
    assert Bounds().claim_bytes + api.MAX_BATCH * (27 << 10) <= 43 * MiB
    assert claim <= client_module.MAX_ANSWER


@pytest.mark.parametrize("answered", [["b", "a"], ["a", "a"], ["a", None]])
async def test_ack_many_answered_for_other_jobs_than_it_acked_raises(answered: list[Any]) -> None:
    """ack_many matched each answer to its ack by position only: a broker (or
    a proxy) answering out of order had the Worker take one job's "conflict"
    for another's, and count a job completed that was not, or nack one that
    was (review of the Worker, round 34). The answers must name the acks'
    jobs in their order, as there must be as many: else BrokerError."""

    async def answer(request: web.BaseRequest) -> web.StreamResponse:
        results = [{"id": job_id, "status": "completed"} for job_id in answered]
        return web.json_response({"results": results})

    async with serving(answer) as url, Client(url, topic="t", retries=1) as q:
        with pytest.raises(BrokerError, match=r"answer \d is for job .*, its ack for '[ab]'"):
            await prompt(q.ack_many([("a", 1), ("b", 2)]))


@pytest.mark.parametrize(
    "call", ["enqueue", "enqueue_many", "ack", "nack", "heartbeat", "cancel", "requeue", "purge"]
)
async def test_an_answer_naming_other_jobs_than_the_request_is_not_taken_for_success(
    proxied: tuple[FaultProxy, Client, Client], call: str
) -> None:
    """Every job the client enqueues carries its id (client-made when not
    given), and the broker answers exactly those ids (a duplicate too); an
    ack's, a nack's and a heartbeat's answer names its job. The client read
    none of them: an answer replayed (FaultProxy "replay", as a cache or a
    broker at fault answers again; claims and ack_many were hardened against
    it before) was taken for success. The second enqueue was answered the
    first one's id and never enqueued (a lost job, its caller told it is
    in); the second ack, nack or heartbeat was answered for the first job,
    its own left claimed (run again once its lease runs out), or its lease
    not renewed; a cancel, requeue or purge answered ids it did not name
    (review of the SDK, round 35). Such an answer is a BrokerError."""
    proxy, through, direct = proxied
    suffix = {"purge": "/dead", "enqueue_many": "/enqueue"}.get(call, "/" + call)
    if call in ("enqueue", "enqueue_many"):
        many = call == "enqueue_many"
        await (through.enqueue_many(["a", "b"]) if many else through.enqueue("a"))
        proxy.fail(suffix, "replay")
        with pytest.raises(BrokerError, match="answered for"):
            await prompt(through.enqueue_many(["c", "d"]) if many else through.enqueue("c"))
        assert (await direct.status())["enqueued"] == (2 if many else 1)  # not enqueued
        return
    if call in ("ack", "nack", "heartbeat", "cancel"):
        await direct.enqueue_many(["a", "b"])
        a, b = await direct.claim_many("w", 2)
    else:
        await direct.enqueue_many([{"payload": p, "max_attempts": 1} for p in "ab"])
        a, b = await direct.claim_many("w", 2)
        for job in (a, b):
            assert await direct.nack(job) == "dead"
    settle: dict[str, Callable[[Job], Awaitable[Any]]] = {
        "ack": lambda job: through.ack(job, "done"),
        "nack": lambda job: through.nack(job),
        "heartbeat": lambda job: through.heartbeat(job),
        "cancel": lambda job: through.cancel([job.id]),
        "requeue": lambda job: through.requeue([job.id]),
        "purge": lambda job: through.purge([job.id]),
    }
    await prompt(settle[call](a))
    before = await direct.job(b.id)
    proxy.fail(suffix, "replay")
    with pytest.raises(BrokerError, match="answered for"):
        await prompt(settle[call](b))
    assert proxy.requests["/topics/t" + suffix] == 2  # not tried again
    assert await direct.job(b.id) == before  # left as it was


async def test_a_redirect_is_not_followed() -> None:
    """aiohttp followed redirects: a proxy's 302 made an enqueue's POST a GET of
    another page, whose JSON ({"id": ...}) the SDK took for the job's id, and
    nothing was enqueued (review finding)."""

    async def moved(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/elsewhere":
            return web.json_response({"id": "fake-id"})
        raise web.HTTPFound("/elsewhere")

    async with serving(moved) as url, Client(url, topic="t", retries=1) as q:
        with pytest.raises(BrokerError, match="HTTP 302"):
            await prompt(q.enqueue("x"))


@asynccontextmanager
async def _sync_call_hung(
    call: Callable[[Any], Any], **options: Any
) -> AsyncIterator[tuple[Any, threading.Thread, list[Any]]]:
    """A SyncClient (`options`) of a broker that never answers, and a thread
    whose `call(client)` is in flight there: (the client, the thread, the
    call's outcome once it ended, its answer or what it raised)."""
    from simplequeue.client import SyncClient

    arrived, release = asyncio.Event(), asyncio.Event()

    async def silent(request: web.BaseRequest) -> web.StreamResponse:
        arrived.set()
        await release.wait()
        return web.Response(status=504)

    async with serving(silent) as url:
        try:
            sc = SyncClient(url, topic="t", **options)
            outcome: list[BaseException | Any] = []

            def caller() -> None:
                try:
                    outcome.append(call(sc))
                except BaseException as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=caller, daemon=True)
            thread.start()
            await asyncio.wait_for(arrived.wait(), PROMPT)  # the call is in flight
            yield sc, thread, outcome
        finally:
            release.set()  # before the server's cleanup, which waits for the handler


async def test_a_sync_client_closed_by_one_thread_ends_another_threads_call() -> None:
    """A SyncClient shared by threads: one thread's call in flight when another
    closed the client. close() closed the session under it (its retry opened a
    new one) and stopped the loop with the call pending: the first thread
    waited for ever (review finding). It is told the client was closed now."""
    hung = _sync_call_hung(lambda sc: sc.status(), timeout=30, retries=2)
    async with hung as (sc, thread, outcome):
        await asyncio.wait_for(asyncio.to_thread(sc.close), PROMPT)
        await asyncio.to_thread(thread.join, PROMPT)
        assert not thread.is_alive(), "the other thread's call never ended"
        [ended] = outcome
        assert isinstance(ended, RuntimeError) and "closed during the call" in str(ended)
        with pytest.raises(RuntimeError, match="closed"):
            sc.status()


async def test_closing_a_sync_client_ends_a_hung_enqueue_without_waiting_out_its_retries() -> None:
    """close() from another thread is how a script aborts a call hung on a
    broker that accepted the request and never answers. The enqueue's caller
    was let go at once, but close() then waited in Client.close() for the
    enqueue batch's request, which nobody awaited any more, to run out its
    retries (retry_budget: twice `timeout`) (review of the broker's life
    cycle, round 25). A batch whose callers all went away is cut short."""
    hung = _sync_call_hung(lambda sc: sc.enqueue({"x": 1}), timeout=3, retries=5)
    async with hung as (sc, thread, outcome):
        started = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(sc.close), PROMPT)
        took = time.monotonic() - started
        await asyncio.to_thread(thread.join, PROMPT)
        [ended] = outcome
        assert isinstance(ended, RuntimeError)
        assert took < 1.5, f"close() took {took:.1f} s (the abandoned enqueue's retries)"


async def test_closing_a_client_still_answers_the_enqueues_their_callers_wait_for() -> None:
    """Only a batch nobody waits for is cut short by close(): one whose caller
    still waits is sent through, and its caller answered."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.BaseRequest) -> web.StreamResponse:
        arrived.set()
        await release.wait()
        return web.json_response({"id": (await request.json())["id"]})

    async with serving(slow) as url:
        q = Client(url, topic="t", retries=1)
        enqueue = asyncio.create_task(q.enqueue("x", id="kept"))
        await asyncio.wait_for(arrived.wait(), PROMPT)
        closing = asyncio.create_task(q.close())
        release.set()
        assert await asyncio.wait_for(enqueue, PROMPT) == "kept"
        await asyncio.wait_for(closing, PROMPT)


STORE_DOWN = orjson.dumps({"error": "the object store is unavailable"})


@asynccontextmanager
async def two_brokers(owner_answers: Any) -> AsyncIterator[tuple[str, list[str]]]:
    """(url of the broker given, log of who was asked what). The broker given
    names the other as the topic's owner and, as a forwarding broker does,
    passes on whatever the owner answers (with Simplequeue-Owner)."""
    seen: list[str] = []
    owner_url: list[str] = []
    counts = orjson.dumps(dict.fromkeys(api.Counts.__struct_fields__, 0))

    async def owner(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(f"owner {request.path}")
        status, body = owner_answers(request)
        return web.Response(
            body=body,
            status=status,
            content_type="application/json",
            headers={api.OWNER_HEADER: owner_url[0]},
        )

    async def given(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(f"given {request.path}")
        if request.path.endswith("/status") and not any(s.startswith("owner") for s in seen):
            status, body = 200, counts  # the first call: names the owner
        else:
            status, body = owner_answers(request)  # forwarded to the owner
        return web.Response(
            body=body,
            status=status,
            content_type="application/json",
            headers={api.OWNER_HEADER: owner_url[0]},
        )

    async with serving(owner) as o, serving(given) as g:
        owner_url.append(o)
        yield g, seen


async def test_an_owners_own_503_keeps_its_error_class() -> None:
    """The owner answers 503 in the API's own words ({"error": ...}: its store
    is down): StoreUnavailable, as the broker given answers it. The first fix
    for an owner behind a proxy (6663727) took any 503 from the owner's address
    for a proxy's page: the owner forgotten, the try failed as BrokerUnavailable,
    the class a call raised hanging on where its last try went (review finding)."""
    async with (
        two_brokers(lambda _: (503, STORE_DOWN)) as (given, seen),
        Client(given, topic="t", retries=3, retry_budget=30) as q,
    ):
        await asyncio.wait_for(q.status(), 10)  # learns the owner
        assert q._owner is not None and q._owner != given
        with pytest.raises(StoreUnavailable) as caught:
            await asyncio.wait_for(q.status(), 10)
    assert not isinstance(caught.value, BrokerUnavailable), (repr(caught.value), seen)


# --- the Worker against a broker that answers what it never should ------------------------


NOTHING = orjson.dumps({"error": "nothing to claim"})


def claimed_job(n: int, lease: float = 30.0) -> dict[str, Any]:
    """A claim's answer for job `n`, its lease `lease` seconds from now."""
    now = time.time()
    return {
        "id": f"j{n}",
        "status": "claimed",
        "payload": n,
        "attempts": 1,
        "lease_token": f"tok{n}",
        "claimed_at": now,
        "heartbeat_at": now,
        "lease_expires_at": now + lease,
    }


def acked(body: bytes) -> web.Response:
    acks = orjson.loads(body)["acks"]
    return web.json_response(
        {"results": [{"id": a["job_id"], "status": "completed"} for a in acks]}
    )


class OneJobBroker:
    """A fake broker's handler: job j1 (its lease `lease`) to the first claim,
    its answer with `headers`, nothing to the others after 2 s (a long poll);
    heartbeats answered by `heartbeat(request)` (none expected without);
    acks answered done and kept (`acks`)."""

    def __init__(
        self,
        lease: float,
        heartbeat: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.lease = lease
        self.heartbeat = heartbeat
        self.headers = headers
        self.answered = False
        self.acks: list[Any] = []

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        if request.path.endswith("/claim"):
            if self.answered:
                await asyncio.sleep(2)
                return web.Response(status=404, body=NOTHING, content_type="application/json")
            self.answered = True
            return web.json_response(
                {"jobs": [claimed_job(1, lease=self.lease)]}, headers=self.headers
            )
        if request.path.endswith("/heartbeat") and self.heartbeat is not None:
            return await self.heartbeat(request)
        if request.path.endswith("/ack"):
            self.acks.append(orjson.loads(body))
            return acked(body)
        return web.json_response({"error": "unexpected"}, status=400)


@pytest.mark.parametrize("wait", [5.0, 0.0, 0.01])
async def test_a_worker_does_not_spin_on_claims_answered_empty_at_once(wait: float) -> None:
    """A broker that answers a claim's long poll at once with nothing (a
    stopping broker does: it ends its long polls first; so does one behind a
    proxy that drops `wait`) made the Worker claim again at once, in a tight
    loop: ~7,000 claims a second and a whole core, for as long as it lasted
    (review finding). Each claim keeps its place for the rest of its wait,
    FAILED_CLAIM_HOLD at most, and a Worker that does not long-poll (wait=0)
    polls an empty topic every EMPTY_POLL_HOLD (it spun just the same). So
    does one whose wait is shorter than that (0.01): its hold, the rest of
    its wait, was nothing, and it spun as before (review finding)."""
    claims = 0

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal claims
        await request.read()
        claims += 1
        return web.Response(status=404, body=NOTHING, content_type="application/json")

    async with serving(broker) as url, Client(url, topic="t") as q:
        worker = Worker(q, lambda job: None, wait=wait, handle_signals=False)
        run = asyncio.create_task(worker.run())
        await asyncio.sleep(1.0)
        await prompt(worker.stop())
        await run
    # Two claims in flight, each held a second: two each, not thousands;
    # without a long poll, or a short one, ten a second each at most.
    assert 1 <= claims <= (4 if wait >= 1 else 24), claims


async def test_a_worker_picks_up_a_job_soon_after_its_broker_restarts() -> None:
    """A claim answered empty before its long poll was out kept its place for
    the rest of its wait: a broker that restarts (it ends its long polls at
    once, then is back 0.3 s later: a rolling restart behind a Service) left
    a Worker(wait=5) idle for ~5 s (wait=60: a minute), both claims in flight
    held, while a job enqueued on the new broker waited (review finding).
    Such a claim keeps its place FAILED_CLAIM_HOLD (1 s) at most, which is
    enough not to spin (the test above)."""
    started = time.monotonic()
    job_ready = asyncio.Event()
    acked_at: list[float] = []

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        if request.path.endswith("/claim"):
            if time.monotonic() - started < 0.3:  # stopping: long polls end at once
                return web.Response(status=404, body=NOTHING, content_type="application/json")
            wait = orjson.loads(body).get("wait", 0)
            try:
                await asyncio.wait_for(job_ready.wait(), wait)
            except TimeoutError:
                return web.Response(status=404, body=NOTHING, content_type="application/json")
            if acked_at:
                await asyncio.sleep(wait)
                return web.Response(status=404, body=NOTHING, content_type="application/json")
            return web.json_response({"jobs": [claimed_job(1)]})
        if request.path.endswith("/ack"):
            acked_at.append(time.monotonic())
            acks = orjson.loads(body)["acks"]
            return web.json_response(
                {"results": [{"id": a["job_id"], "status": "completed"} for a in acks]}
            )
        return web.json_response({"error": "unexpected"}, status=400)

    async with serving(broker) as url, Client(url, topic="t") as q:
        worker = Worker(q, lambda job: None, wait=5.0, max_jobs=1, handle_signals=False)
        run = asyncio.create_task(worker.run())
        await asyncio.sleep(0.5)  # the broker is back
        enqueued = time.monotonic()
        job_ready.set()
        await prompt(run)
    assert acked_at
    latency = acked_at[0] - enqueued
    assert latency < 2.0, f"picked up {latency:.1f} s after it was enqueued"


async def test_result_answered_early_by_a_stopping_broker_asks_again_soon(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """A stopping broker answers its job waits at once, the job as it is
    (pending), so that its callers ask again elsewhere. result() took any
    early answer for an older broker that does not long-poll, and slept out
    the rest of its step (up to api.MAX_WAIT, 60 s) before asking again: the
    result of a job completed a moment after a broker's restart (or a
    hand-over behind a load balancer) came nearly a minute late. It asks
    again a second later at most, as the Worker's claims do."""
    store = MemStore()
    first = await start_broker(store)
    async with FaultProxy(first.url).running() as proxy, Client(proxy.url, topic="t") as q:
        job_id = await q.enqueue("work")
        waiting = asyncio.create_task(q.result(job_id, timeout=120))
        await until(lambda: first.committer.waiting("t") == 1)  # in its long poll
        await first.stop()  # answers that long poll now: the job, pending
        second = await start_broker(store)
        proxy.upstream = second.url  # the load balancer's new backend
        async with Client(second.url, topic="t") as direct:
            job = await direct.claim("w")
            assert job is not None and job.id == job_id
            await direct.ack(job, result="done")
        try:
            assert await asyncio.wait_for(waiting, 10) == "done"
        finally:
            waiting.cancel()


async def test_a_worker_does_not_spin_on_claims_answered_only_jobs_it_holds() -> None:
    """A claim answered only jobs the Worker holds already (a broker's or a
    proxy's fault), all skipped, kept no place: it was sent again at once,
    answered so again, in a tight loop for as long as the job ran (review
    finding). Such an answer is an empty one: the claim keeps its place."""
    claims = 0
    done = False

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal claims, done
        body = await request.read()
        if request.path.endswith("/claim"):
            claims += 1
            if done:
                return web.Response(status=404, body=NOTHING, content_type="application/json")
            return web.json_response({"jobs": [claimed_job(1)]})  # the same, every time
        if request.path.endswith("/ack"):
            done = True
            return acked(body)
        return web.json_response({"error": "unexpected"}, status=400)

    ran: list[str] = []

    async def handler(job: Job) -> None:
        await asyncio.sleep(1.0)
        ran.append(job.id)

    async with serving(broker) as url, Client(url, topic="t") as q:
        worker = Worker(q, handler, concurrency=1, handle_signals=False)
        run = asyncio.create_task(worker.run())
        await until(lambda: worker.processed == 1)
        await prompt(worker.stop())
        await run
    assert ran == ["j1"]
    assert claims <= 6, claims  # two in flight, each held a second


class RepeatingClaims(Client):
    """Its first claims answer the jobs `answers` lists, some twice or again,
    as a broker at fault might, whatever the client checks; later ones find
    nothing."""

    answers: list[list[int]]

    async def claim_many(
        self,
        worker_id: str,
        count: int,
        lease: float | None = None,
        wait: float = 0,
        *,
        attempt_id: str | None = None,
        held: Container[tuple[str, str | None]] | None = None,
    ) -> list[Job]:
        if self.answers:
            return [Job(**claimed_job(n)) for n in self.answers.pop(0)]
        await asyncio.sleep(wait)
        return []


async def test_a_job_a_claim_answers_twice_or_the_worker_holds_runs_once_at_a_time() -> None:
    """A claim answer listing a job twice (or a job the Worker already held,
    answered again by a later claim) made two handlers run it at once, with
    two acks of the same lease token (review finding). The Worker skips a job
    it holds, buffered, running or acking."""

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        if request.path.endswith("/ack"):
            return acked(body)
        return web.json_response({"error": "unexpected"}, status=400)

    running: dict[str, int] = {}
    runs: dict[str, int] = {}
    most = 0

    async def handler(job: Job) -> None:
        nonlocal most
        running[job.id] = running.get(job.id, 0) + 1
        runs[job.id] = runs.get(job.id, 0) + 1
        most = max(most, running[job.id])
        await asyncio.sleep(0.3)
        running[job.id] -= 1

    async with serving(broker) as url, RepeatingClaims(url, topic="t") as q:
        q.answers = [[1, 1, 2], [2, 3]]  # the two claims first in flight: j2 in both
        worker = Worker(q, handler, concurrency=4, prefetch=4, handle_signals=False)
        run = asyncio.create_task(worker.run())
        await until(lambda: "j3" in runs and not any(running.values()))
        await prompt(worker.stop())
        await run
    assert most == 1, f"a job ran twice at once: {runs}"
    assert runs == {"j1": 1, "j2": 1, "j3": 1}
    assert worker.processed == 3


async def returned_after(run: asyncio.Task[None]) -> float:
    """Seconds `run` (a Worker's run(), just sent its second signal) took to
    return; it fails if it had not within PROMPT."""
    started = time.monotonic()
    done, _ = await asyncio.wait([run], timeout=PROMPT)
    took = time.monotonic() - started
    if not done:
        run.cancel()
        await asyncio.wait([run])
    assert done, f"run() had not returned {took:.0f} s after the second signal"
    return took


async def test_a_second_signal_stops_the_worker_promptly_when_the_broker_stalls() -> None:
    """README: "A second signal while it drains stops it now". With a broker
    that stopped answering (it accepts, never replies: a hung proxy, a
    partition), the first signal's release of the job claimed ahead and the
    interrupted job's nack each waited out the client's whole retry budget
    (twice `timeout`: 60 s by default), and the drain waited for them: run()
    returned 61 s after the second signal, past any orchestrator's grace
    period, when a SIGKILL leaves the same jobs to their leases anyway
    (review finding). Each is bounded, and a second signal cuts them short."""
    forever = asyncio.Event()
    answered_claim = False

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal answered_claim
        body = await request.read()
        if request.path.endswith("/claim") and not answered_claim:
            answered_claim = True
            # As many as asked: claim_many holds an answer to that.
            count = orjson.loads(body).get("count", 1)
            return web.json_response({"jobs": [claimed_job(1), claimed_job(2)][:count]})
        await forever.wait()  # stalled from now on
        return web.Response(status=404, body=NOTHING, content_type="application/json")

    started = asyncio.Event()

    async def handler(job: Job) -> None:
        started.set()
        await asyncio.Event().wait()  # a job that does not end by itself

    async with serving(broker) as url:
        try:
            async with Client(url, topic="t") as q:  # the default timeout, 30 s
                worker = Worker(q, handler, concurrency=1, prefetch=1, handle_signals=False)
                run = asyncio.create_task(worker.run())
                await prompt(started.wait())
                worker._on_signal()  # as SIGTERM does
                await asyncio.sleep(0.2)
                worker._on_signal()  # the second: stops now
                assert await returned_after(run) < 2 * TAKE_BACK_WITHIN + 1
        finally:
            forever.set()


async def test_a_second_signal_cuts_short_the_nack_of_a_job_that_failed_before_it() -> None:
    """A job that failed just before the second signal is nacked with the
    client's whole retry budget: the interrupted jobs' nacks, the give-backs
    and the acks were bounded by the second signal, that nack was not, and
    the stop waited for it until CANCEL_GRACE (5 s) cancelled it (review
    finding). It too is left to its lease TAKE_BACK_WITHIN after the signal."""
    forever = asyncio.Event()
    answered_claim = nacking = False

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal answered_claim, nacking
        body = await request.read()
        if request.path.endswith("/claim") and not answered_claim:
            answered_claim = True
            count = orjson.loads(body).get("count", 1)
            return web.json_response({"jobs": [claimed_job(1), claimed_job(2)][:count]})
        nacking = nacking or request.path.endswith("/nack")
        await forever.wait()  # stalled from now on
        return web.Response(status=404, body=NOTHING, content_type="application/json")

    async def handler(job: Job) -> None:
        if job.id == "j1":
            raise ValueError("it fails: its nack stalls")
        await asyncio.Event().wait()  # a job that does not end by itself

    async with serving(broker) as url:
        try:
            async with Client(url, topic="t") as q:  # the default timeout, 30 s
                worker = Worker(q, handler, concurrency=2, prefetch=0, handle_signals=False)
                run = asyncio.create_task(worker.run())
                await until(lambda: nacking and len(worker._running) == 2)
                worker._on_signal()  # as SIGTERM does: j2 runs on, j1's nack waits
                await asyncio.sleep(0.2)
                worker._on_signal()  # the second: stops now
                assert await returned_after(run) < TAKE_BACK_WITHIN + 1
        finally:
            forever.set()


async def test_a_graceful_stop_gives_back_jobs_a_slow_broker_releases_in_three_seconds(
    start_broker: Callable[..., Awaitable[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Since 6efc54e every give-back was cut at TAKE_BACK_WITHIN (2 s), not
    only those after a second signal (which cancels them anyway). On a
    graceful stop (one SIGTERM), a broker answering the release in 2.5 s (a
    slow store commit: healthy) had the job claimed ahead, never run, left to
    its lease: its attempt spent, and under max_attempts=1 it went dead
    without ever having run (review finding). Until a second signal, a
    give-back has the client's retry budget."""
    from simplequeue.broker.engine import Engine

    real_release = Engine.release

    async def slow_release(self: Engine, topic: str, jobs: list[dict[str, Any]]) -> int:
        await asyncio.sleep(TAKE_BACK_WITHIN + 0.5)
        return await real_release(self, topic, jobs)

    monkeypatch.setattr(Engine, "release", slow_release)
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="t") as direct, Client(broker.url, topic="t") as q:
        await direct.settings(lease=5.0, max_attempts=1)
        _, second = await direct.enqueue_many(["runs", "claimed ahead"])
        started = asyncio.Event()
        finish = asyncio.Event()

        async def handler(job: Job) -> None:
            started.set()
            await finish.wait()

        worker = Worker(q, handler, concurrency=1, prefetch=1, wait=0, handle_signals=False)
        run = asyncio.create_task(worker.run())
        await prompt(started.wait())
        await until(lambda: (len(worker._ready), worker._asked) == (1, 0))
        worker._on_signal()  # one SIGTERM: drain, give back what was claimed ahead
        await asyncio.sleep(0.5)
        finish.set()
        await prompt(run)
        got = await direct.job(second)
        # Pending at once, its attempt uncounted (left to its lease, it was
        # claimed, then dead once the lease ran out).
        assert (worker.given_back, got.status, got.attempts) == (1, "pending", 0), got


async def test_a_second_signal_leaves_acks_a_stalled_broker_does_not_answer() -> None:
    """The acks of jobs that ended are waited for as run() returns; after a
    second signal (even one that comes while it waits), TAKE_BACK_WITHIN
    seconds at most: their jobs are left to their leases."""
    forever = asyncio.Event()
    answered_claim = acking = False

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal answered_claim, acking
        await request.read()
        if request.path.endswith("/claim") and not answered_claim:
            answered_claim = True
            return web.json_response({"jobs": [claimed_job(1)]})
        acking = acking or request.path.endswith("/ack")
        await forever.wait()  # stalled from now on
        return web.Response(status=404, body=NOTHING, content_type="application/json")

    async with serving(broker) as url:
        try:
            async with Client(url, topic="t") as q:
                worker = Worker(q, lambda job: "done", handle_signals=False)
                run = asyncio.create_task(worker.run())
                await until(lambda: acking)
                worker._on_signal()  # the drain ends at once: the ack is waited for
                await asyncio.sleep(0.2)
                assert not run.done()
                worker._on_signal()
                assert await returned_after(run) < TAKE_BACK_WITHIN + 1
                assert (worker.processed, worker.unacked) == (0, 1)
        finally:
            forever.set()


class SecondAckSilent(FaultProxy):
    """Passes every request on but the second ack request, held unanswered
    (never forwarded) until the proxy stops: a broker that stopped answering
    between two ack requests of one batch."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.acks = 0
        self.second_ack = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/ack"):
            self.acks += 1
            if self.acks == 2:
                self.second_ack.set()
                self.fail("/ack", "silent")
        return await super().handle(request)


async def test_a_second_signal_does_not_count_acks_that_landed_as_not_acked(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """A batch's acks go in requests of ACK_BATCH_BYTES, one after another.
    Those of a request answered were counted processed, but their jobs stayed
    held until the whole batch was: a second signal while a later request was
    unanswered counted them unacked too (review finding: one job completed on
    the broker, processed 1, unacked 2; `work` exits 1 saying jobs ran whose
    acks did not land). Each request's acks are settled as it is answered."""
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="t") as direct:
        first, second = await direct.enqueue_many(["a", "b"])
        both = asyncio.Barrier(2)

        async def handler(job: Job) -> str:
            await both.wait()  # they end together: one batch
            return "x" * (300 * 1024)  # two of them: two ack requests

        proxy = SecondAckSilent(broker.url)
        async with proxy.running(), Client(proxy.url, topic="t") as q:
            worker = Worker(q, handler, concurrency=2, prefetch=0, wait=0.2, handle_signals=False)
            run = asyncio.create_task(worker.run())
            await prompt(proxy.second_ack.wait())
            worker._on_signal()  # as SIGTERM does
            worker._on_signal()  # a second one: stop now
            await prompt(run)
        statuses = sorted([(await direct.job(first)).status, (await direct.job(second)).status])
    assert statuses == ["claimed", "completed"]
    assert (worker.processed, worker.unacked) == (1, 1)


async def test_a_burst_worker_run_again_after_a_second_signal_stops_once_empty() -> None:
    """A second signal aborts the acks left unanswered. The queued ones never
    reached the batch's send, the only place acks with follow-ups were counted
    settled: each stayed counted unsettled for good, and a burst Worker run
    again (README: "a burst worker run now and then") never found the topic
    empty: it waited for ever for follow-ups that would never land, on a
    topic with nothing in it (review finding). Each ack is counted settled
    as its outcome is known, aborted ones included."""
    stalled = True
    forever = asyncio.Event()
    claims = 0

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal claims
        body = await request.read()
        if request.path.endswith("/claim"):
            claims += 1
            if claims == 1:
                return web.json_response({"jobs": [claimed_job(1), claimed_job(2)]})
            return web.Response(status=404, body=NOTHING, content_type="application/json")
        if request.path.endswith("/status"):
            return web.json_response(dict.fromkeys(api.Counts.__struct_fields__, 0))
        if request.path.endswith("/ack"):
            if stalled:
                await forever.wait()
            return acked(body)
        return web.json_response({"error": "unexpected"}, status=400)

    async def handler(job: Job) -> Any:
        await asyncio.sleep(0.1 if job.id == "j1" else 0.5)  # j2's ack queues behind j1's
        return Done(None, enqueue=[{"payload": "next"}])

    async with serving(broker) as url:
        try:
            async with Client(url, topic="t") as q:
                worker = Worker(
                    q, handler, concurrency=2, prefetch=0, burst=True, handle_signals=False
                )
                run = asyncio.create_task(worker.run())
                await until(lambda: not worker._running and len(worker._acks) == 1)
                worker._on_signal()
                await asyncio.sleep(0.1)
                worker._on_signal()  # the acks are left to their leases 2 s on
                await prompt(run)
                stalled = False
                forever.set()
                unsettled = worker._follow_ups_unsettled
                # The topic is empty now: a burst run returns at once.
                try:
                    await asyncio.wait_for(worker.run(), 5.0)
                except TimeoutError:
                    raise AssertionError(f"hung; follow-ups unsettled: {unsettled}") from None
                assert worker._follow_ups_unsettled == 0
        finally:
            forever.set()


async def test_a_tiny_lease_does_not_make_heartbeats_spin(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat interval is a third of the lease the claim's answer
    implies, with no floor: a lease of 0.3 ms (a broken broker; or a topic's
    `lease` setting of 0.001, which the API accepts) made each heartbeat
    time out before it was sent, a whole core for the job's run and
    thousands of "heartbeat failed" warnings a second (review finding).
    The floor is raised here from 0.05 s to 0.3 s: the job is kept for two
    floors from each heartbeat that lands, and at 0.05 s a loop held 0.1 s
    (a loaded machine) let it run out, the handler cancelled."""
    floor = 0.3
    monkeypatch.setattr(worker_module, "HEARTBEAT_MIN", floor)
    heartbeats = 0

    async def renewed(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal heartbeats
        heartbeats += 1
        return web.json_response({"id": "j1", "lease_expires_at": time.time() + 30})

    broker = OneJobBroker(0.0003, renewed)
    ran = 0.0

    async def handler(job: Job) -> None:
        nonlocal ran
        started = time.monotonic()
        await asyncio.sleep(1.0)
        ran = time.monotonic() - started

    caplog.set_level(logging.WARNING, logger="simplequeue.worker")
    async with serving(broker) as url, Client(url, topic="t") as q:
        worker = Worker(q, handler, max_jobs=1, handle_signals=False)
        await prompt(worker.run())
    failed = sum("heartbeat failed" in r.getMessage() for r in caplog.records)
    assert worker.processed == 1
    assert failed < 5, failed
    assert 1 <= heartbeats <= 1 + ran / floor, (heartbeats, ran)  # a floor apart at least


@pytest.mark.parametrize("in_thread", [False, True])
async def test_a_job_whose_lease_ran_out_unrenewed_is_not_run_on(in_thread: bool) -> None:
    """Heartbeats that failed otherwise than LeaseLost (503s, timeouts: a
    broker or store outage, a partition) were logged and the handler ran on,
    past the lease it could no longer have: the broker handed the job to
    another worker, and it ran twice at once (review finding). Once the lease
    has run out unrenewed, the job is taken for lost, as on a LeaseLost: a
    coroutine handler is cancelled; a thread's keeps its slot, its result
    dropped (neither is acked)."""

    async def outage(request: web.BaseRequest) -> web.StreamResponse:  # the lease runs out
        return web.Response(status=503, body=STORE_DOWN, content_type="application/json")

    broker = OneJobBroker(1.0, outage)
    finished, took = await three_leases_on(broker, in_thread)
    assert not broker.acks
    if in_thread:  # waited for, its result dropped
        assert took >= 3.0
    else:
        assert not finished, "the handler ran on after its lease ran out"
        assert took < 2.0, took


async def three_leases_on(broker: OneJobBroker, in_thread: bool = False) -> tuple[bool, float]:
    """A Worker runs `broker`'s one job (lease 1 s) with a handler that takes
    3 s, three leases (in a thread: waiting up to 3 s): whether the handler
    finished, and how long run() took."""
    finished = threading.Event()

    async def handler(job: Job) -> None:
        await asyncio.sleep(3.0)
        finished.set()

    def in_a_thread(job: Job) -> None:
        finished.wait(3.0)

    async with serving(broker) as url, Client(url, topic="t", timeout=0.3, retries=1) as q:
        worker = Worker(q, in_a_thread if in_thread else handler, max_jobs=1, handle_signals=False)
        started = time.monotonic()
        await prompt(worker.run())
        return finished.is_set(), time.monotonic() - started


async def test_a_heartbeat_answer_saying_a_far_off_now_does_not_stretch_the_lease() -> None:
    """A heartbeat's renewal counted on the Worker's clock as `expires` less
    the answer's Simplequeue-Now, from when the answer came, with no bound: a
    header far behind (garbage, a proxy's, a broken broker's; "0" here) made
    the lease end 1.8e9 s away. The later heartbeats failing (an outage), the
    lease ran out at the broker, which may give the job to another worker,
    while this one ran on for its three leases and acked it (review finding).
    A renewal gives one lease at most."""
    beats = 0

    async def heartbeat(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal beats
        await request.read()
        beats += 1
        if beats == 1:  # renewed for 1 s, but the header says the store's time is 0
            return web.json_response(
                {"id": "j1", "lease_expires_at": time.time() + 1.0}, headers={api.NOW_HEADER: "0"}
            )
        return web.Response(status=503, body=STORE_DOWN, content_type="application/json")

    broker = OneJobBroker(1.0, heartbeat)
    finished, _ = await three_leases_on(broker)
    assert beats >= 2  # renewed once, then failing
    assert not finished, "the handler ran on long after its lease ran out"
    assert not broker.acks, "a job whose lease ran out unrenewed was acked"


@pytest.mark.parametrize("every", [0.7, 20.0])
async def test_a_lease_runs_out_unnoticed_while_a_heartbeat_every_half_of_it_hangs(
    every: float,
) -> None:
    """README: "once the lease has run out with none landing ... the job is
    taken for lost ... its handler is cancelled ... neither acked nor nacked".
    The local deadline was looked at only once a heartbeat had failed, and
    each heartbeat had `every` seconds to fail: with heartbeat_every=0.7 and
    a lease of 1 s, the first heartbeat hung from 0.7 s to 1.4 s, and the
    handler, ending at 1.2 s, past its lease, was acked: the broker may have
    given the job to another worker at 1.0 s. With heartbeat_every past the
    lease (an operator lowered the topic's), nothing was noticed until the
    first heartbeat (review finding). A heartbeat has until the lease's end
    at most, and heartbeats go half a lease apart at most."""
    forever = asyncio.Event()

    async def partition(request: web.BaseRequest) -> web.StreamResponse:  # no answer
        await forever.wait()
        return web.json_response({"error": "unexpected"}, status=400)

    broker = OneJobBroker(1.0, partition)

    ended: list[float] = []

    async def handler(job: Job) -> None:
        await asyncio.sleep(1.2)
        ended.append(time.monotonic())

    async with serving(broker) as url:
        try:
            async with Client(url, topic="t", timeout=5) as q:
                worker = Worker(q, handler, heartbeat_every=every, max_jobs=1, handle_signals=False)
                started = time.monotonic()
                await prompt(worker.run())
        finally:
            forever.set()
    assert not ended, f"the handler ran on {ended[0] - started - 1.0:.2f} s past its lease"
    assert not broker.acks, "a job whose lease ran out unrenewed was acked"


class FirstHeartbeatFails(Client):
    """A client whose first heartbeat fails as a brief outage would (a 503
    whose tries are spent): the broker is healthy again at once."""

    failed = 0

    async def heartbeat(self, job: Job | str, lease: float | None = None) -> float:
        if not self.failed:
            self.failed += 1
            raise BrokerUnavailable("the object store is unavailable (a blip)")
        return await super().heartbeat(job, lease)


async def test_one_failed_heartbeat_loses_a_job_a_long_poll_got_late(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """The Worker's lease deadline counted from when the claim was sent: a
    long poll (wait=5) answered 2.5 s in, with a topic lease of 1.5 s,
    delivered a job whose deadline had passed already, though the broker's
    lease (from the claim's commit) had 1.5 s left. The first heartbeat
    failing once then cancelled a healthy handler as "its lease ran out
    unrenewed", without another try: the job was not acked, and waited out
    its lease to run again (review finding). The deadline counts from when
    the claim's answer came: the blip is ridden out, as on a job claimed at
    once (the next heartbeat renews it)."""
    broker = await start_broker(MemStore())
    async with (
        Client(broker.url, topic="t") as direct,
        FirstHeartbeatFails(broker.url, topic="t") as q,
    ):
        await direct.settings(lease=1.5)
        ran: list[str] = []

        async def handler(job: Job) -> None:
            await asyncio.sleep(1.2)  # well within its lease, heartbeats landing
            ran.append(job.id)

        worker = Worker(q, handler, wait=5.0, max_jobs=1, handle_signals=False)
        run = asyncio.create_task(worker.run())
        await asyncio.sleep(2.5)  # the claim long-polls: the job arrives late
        job_id = await direct.enqueue("late")
        await prompt(run)
        assert q.failed == 1
        assert ran == [job_id], "a healthy handler was cancelled after one failed heartbeat"
        assert (await direct.job(job_id)).status == "completed"


async def test_one_failed_heartbeat_is_ridden_out_by_a_job_claimed_at_once(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """The control for the test above (passes): the same blip on a job claimed
    without waiting leaves it two more heartbeats to renew its lease."""
    broker = await start_broker(MemStore())
    async with (
        Client(broker.url, topic="t") as direct,
        FirstHeartbeatFails(broker.url, topic="t") as q,
    ):
        await direct.settings(lease=1.5)
        job_id = await direct.enqueue("at once")
        ran: list[str] = []

        async def handler(job: Job) -> None:
            await asyncio.sleep(1.2)
            ran.append(job.id)

        worker = Worker(q, handler, wait=5.0, max_jobs=1, handle_signals=False)
        await prompt(worker.run())
        assert q.failed == 1
        assert ran == [job_id]
        assert (await direct.job(job_id)).status == "completed"


async def test_a_retried_claims_jobs_have_their_leases_counted_from_its_first_try() -> None:
    """The Worker counts a job's lease from when the claim's answer came. A
    claim whose first answer was lost (the connection reset) and tried again
    may be answered the first try's jobs (the broker keeps claims' answers for
    their retries), whose leases began as that try committed, up to the
    client's timeout earlier: the Worker's deadline was as much late, and its
    lease-loss safety net could fire after the broker had given the job to
    another worker (review finding). A claim sent more than once has its jobs'
    leases counted from when it was first sent."""
    first_try: list[float] = []
    claims = 0
    held_until: list[float] = []

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal claims
        body = await request.read()
        if request.path.endswith("/claim"):
            claims += 1
            if claims == 1:  # claimed, but the answer is lost on its way
                first_try.append(time.monotonic())
                await asyncio.sleep(0.5)
                assert request.transport is not None
                request.transport.close()  # a reset, as a proxy restarting does
                return web.Response(status=503)
            if claims == 2:  # the retry: answered the first try's job
                return web.json_response({"jobs": [claimed_job(1, lease=30.0)]})
            await asyncio.sleep(orjson.loads(body).get("wait", 0))
            return web.Response(status=404, body=NOTHING, content_type="application/json")
        if request.path.endswith("/ack"):
            return acked(body)
        return web.json_response({"error": "unexpected"}, status=400)

    async def handler(job: Job) -> None:
        held_until.extend(h.lease_ends for h in worker._holding.values())

    async with serving(broker) as url, Client(url, topic="t") as q:
        worker = Worker(q, handler, max_jobs=1, prefetch=0, handle_signals=False)
        await prompt(worker.run())
    assert len(held_until) == 1
    # Sent before the broker read it: from the answer, it was 0.5 s later.
    assert held_until[0] <= first_try[0] + 30.0, held_until[0] - first_try[0]


async def test_a_claim_answer_saying_a_far_off_now_does_not_drop_the_job() -> None:
    """A claim's jobs' leases count from when its answer came less `now` (the
    answer's Simplequeue-Now) less their heartbeat_at. A header far ahead
    (garbage, a proxy's, a broken broker's) put the lease's start years
    before the claim was even sent: every job it answered was dropped as
    "lost its lease before it started", neither run nor given back, left
    claimed for its whole lease (30 s here) though the broker had just given
    it (review finding). A lease begins no sooner than its claim was sent."""
    broker = OneJobBroker(30.0, headers={api.NOW_HEADER: repr(time.time() + 1e9)})
    ran: list[str] = []

    async def handler(job: Job) -> None:
        ran.append(job.id)

    async with serving(broker) as url, Client(url, topic="t") as q:
        worker = Worker(q, handler, max_jobs=1, prefetch=0, handle_signals=False)
        await prompt(worker.run())
    assert ran == ["j1"], "a job claimed a moment ago was dropped as lost"
    assert [a["job_id"] for a in broker.acks[0]["acks"]] == ["j1"]


async def test_a_burst_worker_survives_its_owners_brief_store_outage() -> None:
    """A burst worker takes BrokerUnavailable for "whether the topic is empty
    cannot be known" and gives up (run() raises); StoreUnavailable it logs and
    claims again (a claim whose tries are spent). With the owner's own 503
    turned into BrokerUnavailable (6663727), a store blip on a cluster of two
    brokers made a burst worker fail, where it carries on and stops once the
    topic is found empty (review finding)."""
    claims = 0

    def answers(request: web.BaseRequest) -> tuple[int, bytes]:
        nonlocal claims
        claims += 1
        if claims <= 2:  # the first claims (two in flight): the store is down
            return 503, STORE_DOWN
        return 404, orjson.dumps({"error": "nothing to claim"})

    async with two_brokers(answers) as (given, seen), Client(given, topic="t", retries=1) as q:
        await asyncio.wait_for(q.status(), 10)  # learns the owner
        worker = Worker(q, lambda job: None, burst=True, handle_signals=False)
        await asyncio.wait_for(worker.run(), 10)  # raised BrokerUnavailable
    assert claims > 2, seen


# --- answers no broker gives --------------------------------------------------------------


def claims_answered(
    numbers: tuple[int, ...], released: list[Any]
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """A broker that answers every claim jobs j<n> for `numbers` (claimed_job),
    and keeps the claims released to it in `released`."""

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        if request.path.endswith("/claim"):
            return web.json_response({"jobs": [claimed_job(n) for n in numbers]})
        if request.path.endswith("/release"):
            claims = orjson.loads(body)["claims"]
            released.extend(claims)
            return web.json_response({"released": len(claims)})
        return web.json_response({"error": "unexpected"}, status=400)

    return broker


@pytest.mark.parametrize("count", [1, 3])
async def test_a_claim_answer_is_held_to_what_was_asked(count: int) -> None:
    """claim_many(count=1) answered five jobs, one of them twice: the client
    returned them all, and the Worker ran j1 twice at the same time (two
    handlers, two acks with the same lease token) and five jobs under
    max_jobs=1 (review finding). Each job is returned once, at most `count`
    of them, and those past `count` are released (in the background, which
    close() waits for), not left to their leases."""
    released: list[Any] = []
    broker = claims_answered((1, 1, 2, 3, 4), released)
    async with serving(broker) as url, Client(url, topic="t") as q:
        jobs = await prompt(q.claim_many("w", count))
    assert [j.id for j in jobs] == [f"j{n}" for n in range(1, count + 1)]
    assert released == [{"job_id": f"j{n}", "lease_token": f"tok{n}"} for n in range(count + 1, 5)]


async def test_a_claim_answer_naming_jobs_the_caller_holds_neither_returns_nor_releases_them() -> (
    None
):
    """An answer past `count` that names jobs its caller holds (an earlier
    answer replayed) had those past `count` released: the caller's running
    jobs, pending again for any worker (review finding). Those `held` names
    under their lease are left out, neither returned nor released; the rest
    is held to `count` as before. One held under another lease is not the
    caller's job any more: it counts as any other."""
    released: list[Any] = []
    held = {("j1", "tok1"), ("j2", "tok2"), ("j4", "an older lease")}
    broker = claims_answered((1, 2, 3, 4, 5), released)
    async with serving(broker) as url, Client(url, topic="t") as q:
        jobs = await prompt(q.claim_many("w", 2, held=held))
    assert [j.id for j in jobs] == ["j3", "j4"]
    assert released == [{"job_id": "j5", "lease_token": "tok5"}]


async def test_claim_many_does_not_sit_on_the_jobs_it_keeps_while_a_release_stalls() -> None:
    """claim_many released the jobs an answer held past `count` before it
    returned, waiting up to the client's whole `timeout` (30 s by default)
    for the release; meanwhile the job it kept was nobody's to renew: no
    heartbeat goes out until the Worker has it. With a release that stalled,
    the kept job's lease (2 s here) had run out at the broker before
    claim_many returned it (review finding). The release goes on in the
    background; close() waits for it (within one `timeout`)."""
    forever = asyncio.Event()

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        if request.path.endswith("/claim"):
            return web.json_response(
                {"jobs": [claimed_job(1, lease=2.0), claimed_job(2, lease=2.0)]}
            )
        await forever.wait()  # the release stalls
        return web.json_response({"released": 1})

    async with serving(broker) as url, Client(url, topic="t", timeout=3.0) as q:
        try:
            started = time.monotonic()
            jobs = await prompt(q.claim_many("w", 1, wait=0))
            took = time.monotonic() - started
        finally:
            forever.set()
    assert [j.id for j in jobs] == ["j1"]
    assert took < 2.0 / 3, f"the kept job was handed over {took:.1f} s after its claim (lease 2 s)"


async def test_claim_many_releases_its_extras_within_one_timeout_as_documented() -> None:
    """claim_many's release of the jobs past `count` takes one `timeout` at
    most, as its docstring says. It ran in an asyncio.timeout(timeout), which
    expired in the same loop turn as the release request's own aiohttp
    timeout (total=timeout): aiohttp took the cancellation for its own
    TimeoutError, which the client retried, so the bound was lost and the
    release ran on for the whole retry budget (twice `timeout`), as long as
    close() waited for it: 6 s here, not 3 (review finding). The bound is
    each try's own HTTP timeout (calls_within), which holds."""
    forever = asyncio.Event()

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        if request.path.endswith("/claim"):
            return web.json_response({"jobs": [claimed_job(1), claimed_job(2)]})
        await forever.wait()  # the release stalls
        return web.json_response({"released": 1})

    async with serving(broker) as url:
        q = Client(url, topic="t", timeout=3.0)
        try:
            started = time.monotonic()
            try:
                await prompt(q.claim_many("w", 1, wait=0))
            finally:
                await prompt(q.close())  # waits for the release
            took = time.monotonic() - started
        finally:
            forever.set()
    assert took < q.timeout + 0.5, f"the release took {took:.1f} s (timeout {q.timeout:g} s)"


async def test_calls_within_bounds_a_call_whose_tries_time_out_as_long() -> None:
    """The Worker bounds each heartbeat by its interval (and give-backs by
    TAKE_BACK_WITHIN) so that one left unanswered does not hold back the
    next. An asyncio.timeout of the client's own `timeout` was lost in the
    try's (above): a heartbeat every 2 s with a client timeout of 2 s ran on
    for its whole retry budget, 4 s. calls_within holds its bound, and a call
    left unanswered then raises TimeoutError."""
    forever = asyncio.Event()

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        await forever.wait()  # it never answers
        return web.json_response({"error": "unexpected"}, status=400)

    async with serving(broker) as url, Client(url, topic="t", timeout=2.0) as q:
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with calls_within(2.0):
                    await prompt(q.heartbeat(Job(**claimed_job(1))))
            took = time.monotonic() - started
        finally:
            forever.set()
    assert took < 2.5, took


async def test_a_discovered_client_rereads_broker_json_when_its_broker_answers_502_pages() -> None:
    """A client made by discover() re-read broker.json only when a request
    failed to connect or timed out. When its broker's address answered a
    proxy's 502 page (a load balancer or Service in front of a broker that is
    gone), it retried the same address until its budget was spent, every
    call, for ever: BrokerUnavailable ("HTTP 502") although broker.json named
    a live broker (review finding)."""
    counts = dict.fromkeys(api.Counts.__struct_fields__, 7)

    async def gone(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(
            status=502, text="<html>502 Bad Gateway</html>", content_type="text/html"
        )

    async def live(request: web.BaseRequest) -> web.StreamResponse:
        return web.json_response(counts)

    store = MemStore()
    async with serving(gone) as old, serving(live) as new:
        await store.put(keys.BROKER, BrokerRecord("b0", old, 1, time.time(), 15).encode())
        async with await Client.discover(store, topic="t", timeout=1, retry_budget=4) as q:
            # The hand-over: broker.json names the new broker.
            await store.put(keys.BROKER, BrokerRecord("b1", new, 2, time.time(), 15).encode())
            assert (await prompt(q.status()))["pending"] == 7
            assert q.url == new


@pytest.mark.parametrize("fault", ["cut", "landed-502"])
async def test_an_ack_that_landed_is_not_reported_lost_when_broker_json_is_being_handed_over(
    start_broker: Callable[..., Awaitable[Any]], fault: str
) -> None:
    """An ack landed and its answer was lost (cut short, or a proxy's 502 page
    after it), and broker.json named no live broker when the client read it
    again (its broker resigned it as it stopped; no standby had taken it over
    yet). The failed reading made the try that went out count as never sent,
    so the retry's 409 was not taken for a repeat: ack() raised LeaseLost for
    an ack that was committed (review of forwarding, ownership and
    discovery, round 26). A try that went out stays sent."""
    broker = await start_broker(MemStore())
    discovery = MemStore()  # broker.json, as the test says it
    async with FaultProxy(broker.url).running() as proxy:
        named = BrokerRecord("b0", proxy.url, 1, time.time(), 15)
        await discovery.put(keys.BROKER, named.encode())
        async with await Client.discover(discovery, topic="t", retries=4, retry_budget=5) as q:
            await q.enqueue(1, id="a")
            job = await q.claim("w")
            assert job is not None
            resigned = BrokerRecord("b0", proxy.url, 1, 0.0, 15)
            await discovery.put(keys.BROKER, resigned.encode())
            proxy.fail("/ack", fault)  # the ack lands; its answer is lost
            await prompt(q.ack(job, result="done"))  # raised LeaseLost
            assert proxy.requests["/topics/t/ack"] == 2  # retried: answered 409
            assert (await q.job("a")).status == "completed"


@pytest.mark.parametrize("body", [{"error": "upstream timed out"}, {}])
async def test_settings_never_takes_a_200_error_body_for_success(body: dict[str, Any]) -> None:
    """An answer that is not what the route answers is a BrokerError. Every
    field of api.Settings had a default, so a 200 whose body was {"error": ...}
    or {} decoded as "no settings": a settings(rate=5) that a proxy answered so
    returned {"rate": None, ...} as if it had landed and removed every limit,
    and job_dict took an error's body for the job (review finding)."""

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        return web.json_response(body, status=200)

    async with serving(broker) as url, Client(url, topic="t", retries=1) as q:
        with pytest.raises(BrokerError):
            await prompt(q.settings(rate=5))
        with pytest.raises(BrokerError):
            await prompt(q.settings())
        if body:
            with pytest.raises(BrokerError, match="upstream timed out"):
                await prompt(q.job_dict("j1"))


async def test_a_request_answered_408_is_tried_again_within_its_budget() -> None:
    """The broker answers 408 when a request's body did not arrive within its
    --body-timeout: nothing was done, so another try is safe. The SDK raised
    RequestTimedOut at once; it tries again, as for a 503, and raises it only
    once its tries are spent."""
    tries: list[str] = []
    late = orjson.dumps({"error": "the request's body did not come within 30 s"})

    async def broker(request: web.BaseRequest) -> web.StreamResponse:
        spec = orjson.loads(await request.read())
        tries.append(spec["id"])
        if len(tries) == 1 or spec["payload"] == "never":
            return web.Response(body=late, status=408, content_type="application/json")
        return web.json_response({"id": spec["id"]})

    async with serving(broker) as url, Client(url, topic="t", retries=3) as q:
        assert await prompt(q.enqueue("x", id="a")) == "a"
        assert tries == ["a", "a"]
        with pytest.raises(RequestTimedOut):
            await prompt(q.enqueue("never", id="b"))
        assert tries[2:] == ["b"] * 3
