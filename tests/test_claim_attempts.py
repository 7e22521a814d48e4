"""A claim's retry names its attempt (api.ClaimRequest.attempt_id): the broker
that answered the first try answers the retry with the jobs that try claimed,
while their claimer still holds them, instead of claiming more."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from simplequeue.api import JobSpec
from simplequeue.broker import engine as engine_module
from simplequeue.broker.engine import Engine
from simplequeue.groupcommit import GroupCommitter
from simplequeue.objstore.memfs import MemStore
from tests.test_ownership import cluster, owner_and_other, post

StartBroker = Callable[..., Awaitable[Any]]


async def engine_with(n: int) -> Engine:
    q = Engine(GroupCommitter(MemStore(), broker_id="b"))
    await q.enqueue("t", [JobSpec(i, id=f"j{i}") for i in range(n)])
    return q


def ids(jobs: list[dict[str, Any]]) -> list[str]:
    return [j["id"] for j in jobs]


async def test_a_claims_retry_gets_the_jobs_its_first_try_claimed() -> None:
    q = await engine_with(4)
    first = await q.claim("t", "w", count=2, attempt_id="a1")
    again = await q.claim("t", "w", count=2, attempt_id="a1")
    assert ids(again) == ids(first) == ["j0", "j1"]
    assert [j["lease_token"] for j in again] == [j["lease_token"] for j in first]
    assert (await q.status("t"))["claimed"] == 2
    assert q.claims_answered_again == 1


async def test_only_jobs_still_held_are_answered_again_and_none_claims_anew() -> None:
    """A job the claimer acked (or whose lease ran out) since is not handed
    out again; when none is left, the retry is a claim of its own."""
    q = await engine_with(4)
    [a, b] = await q.claim("t", "w", count=2, attempt_id="a1")
    await q.ack("t", a["id"], a["lease_token"])
    assert ids(await q.claim("t", "w", count=2, attempt_id="a1")) == ["j1"]
    await q.ack("t", b["id"], b["lease_token"])
    assert ids(await q.claim("t", "w", count=2, attempt_id="a1")) == ["j2", "j3"]


async def test_another_workers_claim_of_the_same_attempt_id_is_its_own() -> None:
    q = await engine_with(2)
    assert ids(await q.claim("t", "w1", attempt_id="same")) == ["j0"]
    assert ids(await q.claim("t", "w2", attempt_id="same")) == ["j1"]
    assert ids(await q.claim("t", "w1", attempt_id="same")) == ["j0"]  # still w1's
    assert ids(await q.claim("u", "w1", attempt_id="same")) == []  # another topic's


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
    assert owner.engine.claims_answered_again == 1
