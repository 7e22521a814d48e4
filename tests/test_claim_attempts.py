"""A claim's retry names its attempt (api.ClaimRequest.attempt_id): the broker
that answered the first try answers the retry with the jobs that try claimed,
while their claimer still holds them, instead of claiming more."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from simplequeue import api
from simplequeue.api import JobSpec
from simplequeue.broker import engine as engine_module
from simplequeue.broker.engine import Engine
from simplequeue.client import Client
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore.memfs import MemStore
from simplequeue.state import Bounds
from tests.helpers.until import until
from tests.test_ownership import cluster, owner_and_other, post

StartBroker = Callable[..., Awaitable[Any]]


async def engine_with(n: int, bounds: Bounds | None = None) -> Engine:
    settings = CommitSettings() if bounds is None else CommitSettings(bounds=bounds)
    q = Engine(GroupCommitter(MemStore(), broker_id="b", settings=settings))
    if n:
        await q.enqueue("t", [JobSpec({"n": i, "pad": "x" * 64}, id=f"j{i}") for i in range(n)])
    return q


def ids(jobs: list[dict[str, Any]]) -> list[str]:
    return [j["id"] for j in jobs]


async def test_a_claims_retry_gets_the_jobs_its_first_try_claimed() -> None:
    q = await engine_with(4)
    first = await q.claim("t", "w", count=2, attempt_id="a1")
    again = await q.claim("t", "w", count=2, attempt_id="a1")
    assert again == first and ids(again) == ["j0", "j1"]  # tokens and payloads too
    assert (await q.status("t"))["claimed"] == 2


async def test_a_job_answered_again_from_a_segment_has_its_payload() -> None:
    """A lease record of a job claimed from a segment points at its payload
    there: the first answer carried the payload, its replay did not (the SDK
    then ran the handler on None) and showed the record's internals."""
    q = await engine_with(40, Bounds(inline_pending_bytes=256, segment_bytes=1024))
    first = await q.claim("t", "w", count=3, attempt_id="a1")
    assert await q.claim("t", "w", count=3, attempt_id="a1") == first
    assert first[0]["payload"] == {"n": 0, "pad": "x" * 64}


async def test_a_claim_cut_short_by_its_payloads_bytes_is_answered_again_whole() -> None:
    """A claim that took fewer jobs than its count (Bounds.claim_bytes) is
    answered those again, and claims no more."""
    q = await engine_with(10, Bounds(claim_bytes=200))
    first = await q.claim("t", "w", count=10, attempt_id="a1")
    assert ids(first) == ["j0", "j1", "j2"]  # 80 bytes of payload each
    assert await q.claim("t", "w", count=10, attempt_id="a1") == first
    assert (await q.status("t"))["claimed"] == 3


async def test_only_jobs_still_held_are_answered_again_and_none_claims_anew() -> None:
    """A job the claimer acked (or whose lease ran out) since is not handed
    out again; when none is left, the retry is a claim of its own."""
    q = await engine_with(5)
    [a, b] = await q.claim("t", "w", count=2, attempt_id="a1")
    await q.ack("t", a["id"], a["lease_token"])
    assert ids(await q.claim("t", "w", count=2, attempt_id="a1")) == ["j1"]
    await q.ack("t", b["id"], b["lease_token"])
    assert ids(await q.claim("t", "w", count=2, attempt_id="a1")) == ["j2", "j3"]
    [short] = await q.claim("t", "w", lease=0.05, attempt_id="a2")
    await until(lambda: time.time() > short["lease_expires_at"])
    assert ids(await q.claim("t", "w", attempt_id="a2")) == []  # ran out, not reaped yet


async def test_another_workers_claim_of_the_same_attempt_id_is_its_own() -> None:
    q = await engine_with(2)
    assert ids(await q.claim("t", "w1", attempt_id="same")) == ["j0"]
    assert ids(await q.claim("t", "w2", attempt_id="same")) == ["j1"]
    assert ids(await q.claim("t", "w1", attempt_id="same")) == ["j0"]  # still w1's
    assert ids(await q.claim("u", "w1", attempt_id="same")) == []  # another topic's


async def test_a_retry_while_its_first_try_still_polls_gets_what_either_claimed() -> None:
    """The first try of a long poll still waits at the broker (its caller gone
    unseen: a half-open connection) when the retry comes. Whichever takes
    the job, both answer it: it is not left claimed by the one whose answer
    goes nowhere."""
    q = await engine_with(0)
    first = asyncio.create_task(q.claim("t", "w", wait=10, attempt_id="a1"))
    await until(lambda: q.committer.waiting("t") == 1)
    retry = asyncio.create_task(q.claim("t", "w", wait=10, attempt_id="a1"))
    await until(lambda: q.committer.waiting("t") == 2)
    await q.enqueue("t", [JobSpec(1, id="late")])
    assert ids(await first) == ids(await retry) == ["late"]
    assert (await q.status("t"))["claimed"] == 1


async def test_the_jobs_kept_for_retries_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """By the jobs they name, not by claims: 10,000 claims of 1,000 jobs each
    would keep ten million."""
    monkeypatch.setattr(engine_module, "CLAIM_ATTEMPTS_KEPT", 3)
    q = await engine_with(6)
    await q.claim("t", "w", attempt_id="a0")
    await q.claim("t", "w", count=2, attempt_id="a1")
    await q.claim("t", "w", attempt_id="a2")  # 4 jobs: a0's answer goes
    assert ids(await q.claim("t", "w", attempt_id="a0")) == ["j4"]  # so, a claim anew
    assert ids(await q.claim("t", "w", attempt_id="a2")) == ["j3"]  # a1's went for j4
    assert ids(await q.claim("t", "w", attempt_id="a1")) == ["j5"]


async def test_claims_answers_past_their_time_leave_an_idle_brokers_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The answers kept for retries were forgotten past their time only as
    another claim named by an attempt was answered: an idle broker kept up to
    CLAIM_ATTEMPTS_KEPT jobs' (50,000, ~23 MB) for good (review of SPEC
    4.1's many-topics figures, round 25). The duties' idle round forgets
    them (Engine.forget_idle)."""
    monkeypatch.setattr(api, "CLAIM_ATTEMPTS_KEPT_S", 0.05)
    q = await engine_with(50)
    await asyncio.gather(*(q.claim("t", "w", attempt_id=f"a{i}") for i in range(50)))
    await asyncio.sleep(0.1)  # time passes: every answer kept is past its 0.05 s
    q.forget_idle()
    assert (len(q._answered), q._answered_jobs) == (0, 0)


async def test_a_retry_through_a_broker_that_passes_claims_on_reaches_the_owners_answer(
    start_broker: StartBroker,
) -> None:
    """The attempt id goes with the claim to the topic's owner, which keeps the answers."""
    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    await owner.engine.enqueue("t", [JobSpec(i, id=f"j{i}") for i in range(2)])
    claim = {"worker_id": "w", "attempt_id": "a1"}
    async with aiohttp.ClientSession() as s:
        first = await post(s, f"{owner.url}/topics/t/claim", claim)
        again = await post(s, f"{other.url}/topics/t/claim", claim)
    assert first[0] == again[0] == 200
    assert first[1]["job"] == again[1]["job"]
    assert (await owner.engine.status("t"))["claimed"] == 1


class _OldClaimRequest(msgspec.Struct, forbid_unknown_fields=True):
    worker_id: str
    lease: float | None = None
    wait: float = 0.0
    count: int | None = None


async def test_the_sdk_still_claims_from_a_broker_older_than_attempt_ids() -> None:
    """An older broker refuses the unknown field (400), and a Worker stops on a
    400: the SDK asks again without it, and does not send it there again."""
    bodies: list[bytes] = []

    async def claim(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        try:
            msgspec.json.decode(bodies[-1], type=_OldClaimRequest)
        except msgspec.ValidationError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        job = {"id": "j", "status": "claimed", "payload": 1, "lease_token": "tok"}
        return web.json_response({"job": job})

    app = web.Application()
    app.add_routes([web.post("/topics/{t}/claim", claim)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with Client(f"http://127.0.0.1:{runner.addresses[0][1]}", topic="t") as q:
            for _ in range(2):
                job = await q.claim("w")
                assert job is not None and job.payload == 1
    finally:
        await runner.cleanup()
    sent = [msgspec.json.decode(b) for b in bodies]
    assert ["attempt_id" in b for b in sent] == [True, False, False]
    assert api.ClaimRequest.__struct_config__.forbid_unknown_fields
