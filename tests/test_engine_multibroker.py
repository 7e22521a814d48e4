"""Several committers (as several brokers would be) hammering one store:
every job completed exactly once, none lost, never two valid holders at once."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pytest

from simplequeue.api import JobSpec, ScheduleRequest, SettingsRequest
from simplequeue.broker.engine import Engine
from simplequeue.errors import InvalidRequest, LeaseLost
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore.memfs import MemStore
from simplequeue.state import Bounds, TopicState
from tests.conftest import OpenStore

N_JOBS = 240
BROKERS = 3
WORKERS = 6


async def test_three_committers_complete_every_job_exactly_once(open_store: OpenStore) -> None:
    await three_committers(open_store, CommitSettings(budget=30), delay=lambda rng: 0.0)


async def test_three_committers_merging_runs_complete_every_job_exactly_once(
    open_store: OpenStore,
) -> None:
    """Jobs due in random order, on bounds so small that every few batches
    spill a run and merges go on across the brokers' writes (each writer
    takes a merge further from the marks the head carries)."""
    bounds = Bounds(
        inline_pending_bytes=600,
        inline_leases_bytes=800,
        inline_records_bytes=800,
        inline_dead_bytes=800,
        loose_max=2,
        manifests_max=2,
        runs_max=2,
        merge_bytes=500,
    )
    await three_committers(
        open_store,
        CommitSettings(budget=30, bounds=bounds),
        delay=lambda rng: rng.choice([0.0, rng.uniform(0, 0.3)]),
        merges=True,
    )


async def three_committers(
    open_store: OpenStore,
    settings: CommitSettings,
    delay: Callable[[random.Random], float],
    merges: bool = False,
) -> None:
    engines = [
        Engine(GroupCommitter(await open_store(), broker_id=f"b{i}", epoch=1, settings=settings))
        for i in range(BROKERS)
    ]
    rng = random.Random(7)
    merged = 0
    completed: Counter[str] = Counter()
    claims: dict[str, list[dict[str, Any]]] = defaultdict(list)
    stale_refused = 0

    async def produce(start: int) -> None:
        for first in range(start, N_JOBS, 30):
            batch = [
                JobSpec({"n": i}, id=f"job-{i}", max_attempts=0, delay=delay(rng))
                for i in range(first, min(first + 10, N_JOBS))
            ]
            answers = await rng.choice(engines).enqueue("t", batch)
            assert not any(a["duplicate"] for a in answers)

    async def work(w: int) -> None:
        nonlocal stale_refused, merged
        idle = 0
        while sum(completed.values()) < N_JOBS and idle < 400:
            q = rng.choice(engines)
            merged += await q.committer.read("t", lambda s, now: _merging(s))
            jobs = await q.claim("t", f"w{w}", lease=30, count=rng.randint(1, 3))
            if not jobs:
                idle += 1
                await q.committer.wait_changed("t", 0.02)
                continue
            idle = 0
            for job in jobs:
                claims[job["id"]].append(job)
                q = rng.choice(engines)
                if rng.random() < 0.15:
                    await q.nack("t", job["id"], job["lease_token"], error="retry me")
                    job["released"] = True
                    try:  # the old token must never commit now
                        await rng.choice(engines).ack("t", job["id"], job["lease_token"])
                    except LeaseLost:
                        stale_refused += 1
                    else:
                        completed[job["id"]] += 1
                else:
                    await q.ack("t", job["id"], job["lease_token"], result={"w": w})
                    completed[job["id"]] += 1

    await asyncio.gather(
        *(produce(s) for s in range(0, 30, 10)), *(work(w) for w in range(WORKERS))
    )

    assert sorted(completed) == sorted(f"job-{i}" for i in range(N_JOBS)), "a job was lost"
    assert set(completed.values()) == {1}, "a job was completed twice"
    assert stale_refused > 0
    assert merged > 0 or not merges, "no merge was under way"
    for job_id, held in claims.items():
        tokens = [c["lease_token"] for c in held]
        assert len(set(tokens)) == len(tokens), f"{job_id}: a lease token was handed out twice"
        for earlier in held[:-1]:  # every claim but the last was given back by a nack
            assert earlier.get("released"), f"{job_id}: two valid holders at once"
    fresh = Engine(GroupCommitter(await open_store(), broker_id="check"))
    counts = await fresh.status("t")
    assert counts["completed"] == counts["enqueued"] == counts["total"] == N_JOBS
    assert counts["pending"] == counts["claimed"] == 0
    for e in engines:
        await e.committer.close()


def _merging(s: TopicState) -> bool:
    return any("merge" in run for lane in s.head["lanes"].values() for run in lane["runs"])


def two_engines(bounds: Bounds) -> tuple[Engine, Engine]:
    store = MemStore()
    a, b = (
        Engine(
            GroupCommitter(store, broker_id=name, epoch=1, settings=CommitSettings(bounds=bounds))
        )
        for name in ("a", "b")
    )
    return a, b


async def test_a_refusal_for_what_the_topic_holds_is_checked_on_a_fresh_read() -> None:
    """Refusals that depend on what the head holds were answered from a broker's
    cached head, which may predate another broker's writes (the owner did not
    answer in time, a hand-over): a topic at its most schedules refused a new
    one after the other broker deleted one, a 3rd priority was refused after
    the other broker drained a lane, and a burst was refused as having no rate
    after the other broker set one. Each is checked on a fresh read now, as
    JobNotFound is, and refused only if the store's head says so too."""
    a, b = two_engines(Bounds(schedules_max=2, lanes_max=2))
    await a.put_schedule("s", "one", ScheduleRequest("x", every=60))
    await a.put_schedule("s", "two", ScheduleRequest("x", every=60))
    await b.delete_schedule("s", "two")
    assert (await a.put_schedule("s", "three", ScheduleRequest("x", every=60)))["next_at"]
    assert sorted(s["name"] for s in await b.schedules("s")) == ["one", "three"]

    await a.enqueue("p", [JobSpec(1, priority=1), JobSpec(2, priority=2)])
    [job] = await b.claim("p", "w", lease=30)
    assert job["priority"] == 2
    await b.ack("p", job["id"], job["lease_token"])
    [answer] = await a.enqueue("p", [JobSpec(3, priority=3)])
    assert not answer.get("duplicate")

    await a.enqueue("r", [JobSpec(1)])  # a caches r's head
    await b.put_settings("r", SettingsRequest(rate=5.0))
    assert (await a.put_settings("r", SettingsRequest(burst=10)))["burst"] == 10


async def test_a_refusal_for_what_the_topic_holds_stands_on_a_current_head() -> None:
    """The other side: a refusal the store's head agrees with stays a refusal."""
    a, b = two_engines(Bounds(schedules_max=1))
    await a.enqueue("s", [JobSpec(1)])  # a caches s's head
    await b.put_schedule("s", "one", ScheduleRequest("x", every=60))
    with pytest.raises(InvalidRequest, match="1 schedules, the most"):
        await a.put_schedule("s", "two", ScheduleRequest("x", every=60))
    assert [s["name"] for s in await b.schedules("s")] == ["one"]
