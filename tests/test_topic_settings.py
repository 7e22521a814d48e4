"""Topic settings (SPEC 12): a token bucket (rate, burst) and max_claimed that
every claim obeys at the commit point, and defaults for lease and attempts. In
the state machine, through the API, and checked by history with many callers
on two brokers."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from simplequeue.api import JobSpec, SettingsRequest
from simplequeue.broker import engine as engine_module
from simplequeue.client import Client, Worker
from simplequeue.client import worker as worker_module
from simplequeue.errors import InvalidRequest
from simplequeue.objstore.memfs import MemStore
from tests.helpers.head_reads import HeadReads
from tests.helpers.states import fresh, reread
from tests.helpers.until import until
from tests.test_ownership import cluster, owner_and_other

T0 = 1_000_000.0
StartBroker = Callable[..., Awaitable[Any]]


def jobs(n: int) -> list[JobSpec]:
    return [JobSpec(i, id=f"j{i}") for i in range(n)]


# --- the state machine ------------------------------------------------------------------


def test_max_claimed_caps_the_jobs_claimed_at_once() -> None:
    s = fresh()
    s.enqueue(jobs(10), T0)
    s.put_settings(SettingsRequest(max_claimed=3), T0)
    held = s.claim("w", 30, 5, T0)
    assert len(held) == 3
    s.dirty = False
    assert s.claim("w", 30, 5, T0) == [] and s.dirty is False
    s.ack(held[0]["id"], held[0]["lease_token"], None, T0)
    assert len(s.claim("w", 30, 5, T0)) == 1
    s.put_settings(SettingsRequest(max_claimed=0), T0)  # 0: paused
    s.ack(held[1]["id"], held[1]["lease_token"], None, T0)
    assert s.claim("w", 30, 5, T0) == []
    s.put_settings(SettingsRequest(max_claimed=None), T0)  # removed: no limit
    assert len(s.claim("w", 30, 10, T0)) == 6


def test_the_rate_is_a_token_bucket_that_starts_full() -> None:
    s = fresh()
    s.enqueue(jobs(50), T0)
    s.put_settings(SettingsRequest(rate=2.0, burst=3), T0)
    assert len(s.claim("w", 30, 10, T0)) == 3
    assert s.claim("w", 30, 10, T0 + 0.4) == []
    assert s.token_wait(T0 + 0.4) == pytest.approx(0.1)
    s = reread(s, T0 + 0.4)  # the bucket lives in the head
    assert len(s.claim("w", 30, 10, T0 + 0.5)) == 1
    assert s.token_wait(T0 + 0.5) == pytest.approx(0.5)
    assert len(s.claim("w", 30, 10, T0 + 100)) == 3  # never more than the burst
    assert s.token_wait(T0 + 100) is not None and s.claimable(T0 + 101) == 2


def test_a_claim_handed_to_nobody_gives_its_token_back() -> None:
    """A claim whose caller went away (a long poll's client hung up, a pop's
    BLPOP client gone) is given back, the attempt uncounted; its token stayed
    spent, so a rate of 1 a minute lost a minute to a hang-up."""
    s = fresh()
    s.enqueue(jobs(5), T0)
    # A second before the claims: one of the write that made the bucket gives
    # no token back (it may have come before the rate).
    s.put_settings(SettingsRequest(rate=1 / 60, burst=2), T0 - 1)
    claimed = s.claim("w", 30, 2, T0)
    assert s.claimable(T0) == 0
    assert s.unclaim(claimed[0]["id"], claimed[0]["lease_token"], T0)
    assert s.claimable(T0) == 1
    [popped] = s.pop("w", 1, T0)
    assert s.claimable(T0) == 0
    assert s.unpop(popped, T0)
    assert s.unclaim(claimed[1]["id"], claimed[1]["lease_token"], T0)
    assert s.claimable(T0) == 2  # never past the burst
    assert s.unclaim(claimed[1]["id"], claimed[1]["lease_token"], T0) is False
    assert s.claimable(T0) == 2


def test_giving_back_claims_that_took_no_token_grants_no_claims_past_the_rate() -> None:
    """unclaim() and unpop() gave a token back whether or not the claim took
    one: worker a held 5 jobs claimed before a rate of one an hour (burst 1)
    was set; b took the burst; then a gave its 5 back one by one, and b
    claimed 5 more in the same instant, 6 claims where the bucket allows 1
    (review of limits; here a popped one more, given back too: 7). The
    bucket says when it was made (`since`), and only a claim made after that
    gives a token back; a bucket of an older head, without it, gives them
    back as before."""
    s = fresh()
    s.enqueue(jobs(20), T0)
    *held_by_a, kept_by_a = s.claim("a", 30, 6, T0)  # no rate yet: no token taken
    [popped] = s.pop("a", 1, T0)
    s.put_settings(SettingsRequest(rate=1 / 3600, burst=1), T0)
    t = T0 + 0.5
    claimed_by_b = s.claim("b", 30, 5, t)
    assert len(claimed_by_b) == 1  # the burst
    for job in held_by_a:  # a's jobs go back, each in a request of its own
        assert s.unclaim(job["id"], job["lease_token"], t)
        claimed_by_b += s.claim("b", 30, 5, t)
    assert s.unpop(popped, t)
    claimed_by_b += s.claim("b", 30, 5, t)
    assert len(claimed_by_b) == 1, f"b claimed {len(claimed_by_b)} jobs where the bucket allows 1"
    # A claim made under the bucket gives its token back; the bucket keeps
    # when it was made through claims and a change of rate.
    s.put_settings(SettingsRequest(rate=1 / 1800), T0 + 1)
    assert s.unclaim(claimed_by_b[0]["id"], claimed_by_b[0]["lease_token"], T0 + 1)
    assert s.head["bucket"]["since"] == T0
    [under_old] = s.claim("b", 30, 5, T0 + 1)
    # A rate removed and set again makes a new bucket, full: a claim made
    # under the old one gives nothing back to it.
    s.put_settings(SettingsRequest(rate=None), T0 + 2)
    s.put_settings(SettingsRequest(rate=1 / 3600, burst=1), T0 + 3)
    [under_new] = s.claim("b", 30, 5, T0 + 4)
    assert s.unclaim(under_old["id"], under_old["lease_token"], T0 + 4)
    assert s.claimable(T0 + 4) == 0
    assert s.unclaim(under_new["id"], under_new["lease_token"], T0 + 4)
    assert s.claimable(T0 + 4) == 1
    # An older head's bucket (no `since`) gives every claim's token back, as before.
    s.claim("b", 30, 5, T0 + 4)
    del s.head["bucket"]["since"]
    assert s.unclaim(kept_by_a["id"], kept_by_a["lease_token"], T0 + 4)
    assert s.claimable(T0 + 4) == 1


def test_the_burst_defaults_to_a_seconds_worth_of_claims() -> None:
    s = fresh()
    s.enqueue(jobs(20), T0)
    s.put_settings(SettingsRequest(rate=4.5), T0)
    assert s.burst() == 5
    assert len(s.claim("w", 30, 20, T0)) == 5
    s.put_settings(SettingsRequest(rate=None), T0)
    assert "bucket" not in s.head and s.token_wait(T0) is None
    assert len(s.claim("w", 30, 20, T0)) == 15


def test_a_burst_goes_with_its_rate_and_is_refused_without_one() -> None:
    """A rate cleared kept its burst, shown as not set: the next rate then
    used it, not the default. A burst set with no rate was kept likewise."""
    s = fresh()
    s.put_settings(SettingsRequest(rate=10.0, burst=2), T0)
    s.put_settings(SettingsRequest(rate=None), T0)
    assert "settings" not in s.head
    s.put_settings(SettingsRequest(rate=100.0), T0)
    assert s.burst() == 100
    s.put_settings(SettingsRequest(rate=None), T0)
    before = orjson.dumps(s.head)
    with pytest.raises(InvalidRequest, match="burst"):
        s.put_settings(SettingsRequest(burst=5, max_claimed=3), T0)
    assert orjson.dumps(s.head) == before
    s.put_settings(SettingsRequest(burst=None, max_claimed=3), T0)  # clearing it is fine
    assert s.settings() == {"max_claimed": 3}


def test_a_writer_whose_clock_is_behind_gets_no_tokens_it_has_not_earned() -> None:
    s = fresh()
    s.enqueue(jobs(20), T0)
    s.put_settings(SettingsRequest(rate=1.0, burst=1), T0)
    assert len(s.claim("w", 30, 5, T0 + 10)) == 1  # a writer 10 s ahead
    assert s.claim("w", 30, 5, T0 + 1) == []  # one behind it: no refill before T0 + 11
    assert len(s.claim("w", 30, 5, T0 + 11)) == 1


def test_defaults_for_lease_and_attempts_apply_where_a_request_names_none() -> None:
    s = fresh(default_lease=30, max_attempts=5)
    s.put_settings(SettingsRequest(lease=7.0, max_attempts=2), T0)
    s.enqueue([JobSpec(1, id="a"), JobSpec(2, id="b", max_attempts=9)], T0)
    a, b = s.claim("w", None, 2, T0)
    assert (a["lease_expires_at"], a["max_attempts"], b["max_attempts"]) == (T0 + 7, 2, 9)
    [c] = s.enqueue([JobSpec(3, id="c")], T0) and s.claim("w", 60, 1, T0)
    assert c["lease_expires_at"] == T0 + 60  # a claim that names its lease keeps it
    s.put_settings(SettingsRequest(lease=None, max_attempts=None), T0)
    assert "settings" not in s.head
    s.enqueue([JobSpec(4, id="d")], T0)
    [d] = s.claim("w", None, 1, T0)
    assert (d["lease_expires_at"], d["max_attempts"]) == (T0 + 30, 5)


def test_fields_left_out_stay_as_they_are() -> None:
    s = fresh()
    s.put_settings(SettingsRequest(rate=5.0, max_claimed=2), T0)
    s.put_settings(SettingsRequest(burst=1), T0)
    assert reread(s, T0).settings() == {"rate": 5.0, "max_claimed": 2, "burst": 1}


async def test_settings_that_change_nothing_write_nothing(start_broker: StartBroker) -> None:
    """`PUT /topics/t/settings {}` (or the settings as they are) wrote a head:
    a topic nobody had enqueued to sprang into existence, listed with no jobs."""
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="t") as q:
        assert not any((await q.settings(rate=None)).values())
        assert "t" not in await q.topics()
        await q.settings(rate=5.0)
        writes = broker.committer.stats.writes
        assert (await q.settings(rate=5.0))["rate"] == 5.0
        assert broker.committer.stats.writes == writes


# --- through a broker -----------------------------------------------------------------------


async def test_settings_over_http_and_the_sdk(start_broker: StartBroker) -> None:
    broker = await start_broker(MemStore())
    t = broker.url + "/topics/t/settings"
    async with aiohttp.ClientSession() as s:
        async with s.get(t) as r:
            assert (r.status, await r.json()) == (
                200,
                {
                    "rate": None,
                    "burst": None,
                    "max_claimed": None,
                    "lease": None,
                    "max_attempts": None,
                },
            )
        async with s.put(t, json={"rate": 10, "max_claimed": 4}) as r:
            assert (await r.json())["burst"] == 10
        for bad in ({"rate": 0}, {"max_claimed": -1}, {"lease": "long"}, {"speed": 1}):
            async with s.put(t, json=bad) as r:
                assert r.status == 400, bad
    async with Client(broker.url, topic="t") as q:
        assert (await q.settings())["max_claimed"] == 4
        changed = await q.settings(rate=None, lease=12.5)
        assert changed == {
            "rate": None,
            "burst": None,
            "max_claimed": 4,
            "lease": 12.5,
            "max_attempts": None,
        }
        await q.enqueue("x")
        job = await q.claim("w")
        assert job is not None and job.lease_expires_at == pytest.approx(job.claimed_at + 12.5)


async def test_a_fleet_of_idle_workers_shares_a_read_of_the_head_a_poll_interval(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every SDK Worker reads its topic's settings every SETTINGS_EVERY (10 s),
    and a GET of them read the head from the store each time, even on the
    topic's owner, where the fleet's claims share one read a POLL_INTERVAL:
    1,000 idle Workers cost 100 GETs of the head a second
    (review of limits: 40 Workers, intervals of 0.2 s, read it 205 times in
    1 s). On a topic its broker owns, settings are answered now from a state
    read since the topic's last look at the store, as such claims are."""
    interval = 0.2
    monkeypatch.setattr(engine_module, "OWNER_LOOK_INTERVAL", interval)
    monkeypatch.setattr(worker_module, "SETTINGS_EVERY", interval)
    store = HeadReads()
    # A short lease: the broker trusts its memory once the others could all
    # have seen it come (Membership.settled_owner).
    broker = await start_broker(store, broker_lease=1.0)
    await until(lambda: broker.membership.settled_owner("t"))
    async with Client(broker.url, topic="t") as q:
        await q.enqueue("x")
        job = await q.claim("w")
        assert job is not None
        await q.ack(job)  # the topic exists, and is idle

        async def nothing(job: Any) -> None:
            raise AssertionError("no job")

        workers = [Worker(q, nothing, concurrency=2, handle_signals=False) for _ in range(40)]
        runs = [asyncio.create_task(w.run()) for w in workers]
        try:
            await asyncio.sleep(3 * interval)  # each has read the settings once
            before, started = store.reads, time.monotonic()
            await asyncio.sleep(5 * interval)
            reads, took = store.reads - before, time.monotonic() - started
        finally:
            for w in workers:
                await w.stop()
            await asyncio.gather(*runs)
    assert reads <= took / interval + 2, f"40 idle Workers read the head {reads} times"


async def test_status_and_settings_see_writes_through_either_broker_at_once(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner answers settings from its memory, read again a POLL_INTERVAL
    (made 30 s here) apart: what either broker was asked to write the owner
    committed, and so each sees it at once; and the status, from the store."""
    monkeypatch.setattr(engine_module, "POLL_INTERVAL", 30.0)
    owner, other = owner_and_other(await cluster(start_broker, MemStore(), 2), "t")
    async with aiohttp.ClientSession() as s:

        async def get(broker: Any, what: str) -> Any:
            async with s.get(f"{broker.url}/topics/t/{what}") as r:
                assert r.status == 200
                return await r.json()

        for broker in (owner, other):
            assert (await get(broker, "status"))["pending"] == 0  # the owner holds it now
            assert (await get(broker, "settings"))["rate"] is None
        for n, via in enumerate((other, owner), 1):
            async with s.post(f"{via.url}/topics/t/enqueue", json={"payload": n}) as r:
                assert r.status == 201
            async with s.put(f"{via.url}/topics/t/settings", json={"max_claimed": n}) as r:
                assert r.status == 200
            for broker in (owner, other):
                assert (await get(broker, "status"))["pending"] == n
                assert (await get(broker, "settings"))["max_claimed"] == n


async def claimers(
    urls: list[str], callers: int, seconds: float, hold: Callable[[], float]
) -> tuple[list[dict[str, Any]], int]:
    """`callers` callers, each claiming through one of `urls` in turn (count
    1-3, some long-polling) and acking each job after holding it `hold()`
    seconds, for `seconds`. Every job claimed, and how many claims got none."""
    got: list[dict[str, Any]] = []
    refused = 0
    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    async with aiohttp.ClientSession() as s:

        async def caller(n: int) -> None:
            nonlocal refused
            for url in itertools.cycle(urls[n % len(urls) :] + urls[: n % len(urls)]):
                if loop.time() >= until:
                    return
                body = {
                    "worker_id": f"w{n}",
                    "count": rng.randint(1, 3),
                    "wait": rng.choice([0, 0.3]),
                }
                async with s.post(f"{url}/topics/t/claim", json=body) as r:
                    if r.status == 404:
                        refused += 1
                        continue
                    assert r.status == 200
                    claimed = (await r.json())["jobs"]
                got.extend(claimed)
                for job in claimed:
                    await asyncio.sleep(hold())
                    ack = {"job_id": job["id"], "lease_token": job["lease_token"]}
                    async with s.post(f"{url}/topics/t/ack", json=ack) as r:
                        assert r.status == 200

        await asyncio.gather(*(caller(n) for n in range(callers)))
    return got, refused


async def test_many_callers_on_two_brokers_never_beat_the_rate(start_broker: StartBroker) -> None:
    """History: every claim's commit time (claimed_at, on the store's clock the
    bucket runs on). Over any stretch [t_i, t_j] between two claims, no more
    than burst + rate x (t_j - t_i) jobs were claimed."""
    rate, burst = 8.0, 3
    brokers = await cluster(start_broker, MemStore(), 2)
    async with Client(brokers[0].url, topic="t") as q:
        await q.enqueue_many([{"id": f"j{i}", "payload": i} for i in range(200)])
        await q.settings(rate=rate, burst=burst)
    got, refused = await claimers([b.url for b in brokers], 12, 3.0, lambda: 0.0)
    times = sorted(j["claimed_at"] for j in got)
    assert len({j["id"] for j in got}) == len(got)
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rate * (times[j] - start) + 1e-6, (i, j, times)
    assert refused > 0  # the limit held callers back


async def test_many_callers_on_two_brokers_never_hold_more_than_max_claimed(
    start_broker: StartBroker,
) -> None:
    """History: each job's claim and ack times (claimed_at, and its record's
    finished_at: the commits' own times). At no instant are more than
    max_claimed jobs held."""
    limit = 3
    brokers = await cluster(start_broker, MemStore(), 2)
    async with Client(brokers[1].url, topic="t") as q:
        await q.enqueue_many([{"id": f"j{i}", "payload": i} for i in range(300)])
        await q.settings(max_claimed=limit)
        rng = random.Random(3)
        got, refused = await claimers(
            [b.url for b in brokers], 10, 2.5, lambda: rng.uniform(0, 0.05)
        )
        spans = [(j["claimed_at"], (await q.job(j["id"])).finished_at) for j in got]
    assert refused > 0 and len(got) > limit
    starts = sorted(s for s, _ in spans)
    ends = sorted(e for _, e in spans)
    for t in starts:  # the number held just after each claim
        held = bisect.bisect_right(starts, t) - bisect.bisect_right(ends, t)
        assert held <= limit, t


async def test_a_long_poll_under_a_rate_waits_for_the_next_token(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It wakes when the token is due, not when a commit or the store poll
    (made 30 s here) would wake it."""
    monkeypatch.setattr(engine_module, "POLL_INTERVAL", 30.0)
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="t") as q:
        await q.enqueue_many(["a", "b"])
        await q.settings(rate=1.0, burst=1)
        assert await q.claim("w") is not None
        assert await q.claim("w") is None  # no token: a claim without wait gets nothing
        loop = asyncio.get_running_loop()
        asked = loop.time()
        job = await q.claim("w", wait=8)
        waited = loop.time() - asked
    assert job is not None
    assert waited < 4  # the token was due within a second; 8 without the wake


async def test_a_long_poll_wakes_when_a_delayed_job_comes_due(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No commit tells a long poll that a delayed job came due: it found it at
    its next look at the store, within POLL_INTERVAL (1 s; 30 s here), a
    retry's backoff late. It wakes when the job is due now, as for a token."""
    monkeypatch.setattr(engine_module, "POLL_INTERVAL", 30.0)
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="t") as q:
        await q.enqueue("later", delay=0.5)
        loop = asyncio.get_running_loop()
        asked = loop.time()
        job = await q.claim("w", wait=8)
        waited = loop.time() - asked
    assert job is not None and job.payload == "later"
    assert waited < 4  # due in half a second; 8 without the wake


def test_a_claim_says_when_the_earliest_job_it_found_not_due_comes_due() -> None:
    s = fresh()
    s.enqueue([JobSpec("a", id="a", delay=30), JobSpec("b", id="b", priority=5, delay=20)], T0)
    assert s.claim("w", 30, 1, T0) == []
    assert s.ready_wait(T0) == 20
    assert [j["id"] for j in s.claim("w", 30, 1, T0 + 20)] == ["b"]
    assert s.ready_wait(T0 + 20) is None  # it found one
    assert s.claim("w", 30, 1, T0 + 25) == []
    assert s.ready_wait(T0 + 25) == 5


def test_lowering_the_rate_keeps_the_tokens_the_bucket_already_held() -> None:
    """The bucket "keeps its tokens (up to a new burst)", but a change recomputed
    them: the time since the last claim was refilled at the NEW rate. A full
    bucket of 10 (rate 10/s, idle 5 s) lowered to rate 0.01/s, burst 5, was
    left with 0.05 tokens: the next claim waited 95 s though the bucket held
    10 (review finding). The tokens are settled at the old settings first."""
    s = fresh()
    s.enqueue(jobs(50), T0)
    s.put_settings(SettingsRequest(rate=10.0, burst=10), T0)
    assert len(s.claim("w", 30, 10, T0)) == 10  # drained at T0
    assert s.claimable(T0 + 5) == 10  # refilled at 10/s: full again
    s.put_settings(SettingsRequest(rate=0.01, burst=5), T0 + 5)
    assert s.claimable(T0 + 5) == 5  # the 10 it held, up to the new burst


def test_raising_the_burst_grants_no_tokens_the_old_bucket_could_not_hold() -> None:
    """Rate 1/s, burst 1: the bucket never holds more than 1. Raising the burst
    to 200 after 100 idle seconds handed out 100 claims at once, earned while
    the bucket could hold only one (review finding); it grows from 1 now."""
    s = fresh()
    s.enqueue(jobs(500), T0)
    s.put_settings(SettingsRequest(rate=1.0, burst=1), T0)
    assert len(s.claim("w", 30, 10, T0)) == 1
    assert s.claimable(T0 + 100) == 1
    s.put_settings(SettingsRequest(burst=200), T0 + 100)
    assert s.claimable(T0 + 100) == 1
    assert s.claimable(T0 + 110) == 11
