"""Crash, failover, store-fault and worker campaigns: a mixed load runs while
things go wrong, every operation and answer is recorded, and at the end the
history is checked: every acknowledged enqueue completed, nothing committed
twice, no stale lease token committed, counters match."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from simplequeue.objstore.localfs import LocalStore
from tests.conftest import BrokerProcess, faketime_env, open_s3, s3_broker_args, s3_endpoint
from tests.reliability.chaos_store import ChaosStore
from tests.reliability.control import (
    ControlLoad,
    check_cancels,
    check_max_claimed,
    check_rate,
    check_schedule,
)
from tests.reliability.history import History, check, check_follow_ups, check_settlements
from tests.reliability.load import Load, LoadShape
from tests.reliability.proxy import FaultProxy, Odds

pytestmark = [pytest.mark.campaign, pytest.mark.timeout(600)]

Record = Callable[[dict[str, Any]], None]


@pytest.fixture
async def store_flags(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[str]]:
    """simplequeued's store flags for the test's `backend` parameter.

    On S3 the brokers go through a pass-through proxy. S3 PUTs are atomic: a
    request cut short by a dying client never lands. LocalStack's are not: a
    PutObject whose client is SIGKILLed mid-body can leave an object whose
    stated length has no bytes behind it, so the topic can never be read again
    (seen here). The proxy forwards only whole requests, as S3 behaves, so these
    campaigns test simplequeue and not that LocalStack defect.
    """
    if request.node.callspec.params["backend"] == "localfs":
        yield ["--dir", str(tmp_path / "store")]
        return
    proxy = FaultProxy(s3_endpoint(), Odds())
    await proxy.start()
    args = s3_broker_args(uuid.uuid4().hex[:12])
    args[args.index("--endpoint-url") + 1] = proxy.url
    try:
        yield args
    finally:
        await proxy.stop()


async def finish(
    load: Load, history: History, record: Record, *, retention: float | None = None, **extra: Any
) -> None:
    final = await load.final_records()
    counts = final.pop("__counts__")
    verdict = check(history, final, counts, retention=retention)
    record({**history.summary(), **verdict, **extra})


async def commits_read_back(urls: list[str]) -> float:
    """How many head writes the brokers at `urls` had to read back, their answer
    lost or refused (simplequeue_commit_ambiguous in /metrics)."""
    total = 0.0
    async with aiohttp.ClientSession() as s:
        for url in urls:
            async with s.get(f"{url}/metrics") as r:
                assert r.status == 200, url
                text = await r.text()
            for family in text_string_to_metric_families(text):
                if family.name == "simplequeue_commit_ambiguous":
                    total += sum(sample.value for sample in family.samples)
    return total


class Fleet:
    """Broker processes on one store, restartable on their own ports; with
    `clocks`, broker i runs with its wall clock moved by clocks[i] ("+60s")."""

    def __init__(
        self,
        start: Callable[..., BrokerProcess],
        args: list[str],
        n: int,
        clocks: list[str | None] | None = None,
    ) -> None:
        self.start, self.args = start, args
        self.clocks = clocks or [None] * n
        self.brokers = [self._start(i) for i in range(n)]

    def _start(self, i: int, *more: str) -> BrokerProcess:
        offset = self.clocks[i]
        if offset is None:
            return self.start(*self.args, *more)
        return self.start(*self.args, *more, env=faketime_env(offset))

    def urls(self) -> list[str]:
        return [b.url for b in self.brokers]

    async def kill_and_restart(self, i: int) -> None:
        victim = self.brokers[i]
        victim.kill()
        port = victim.url.rsplit(":", 1)[1]

        def restart() -> None:  # in a thread; it records the new broker even if the
            # chaos that asked for it is cancelled meanwhile
            self.brokers[i] = self._start(i, "--addr", f"127.0.0.1:{port}")

        await asyncio.to_thread(restart)

    def describe(self) -> str:
        """Each broker: its URL, PID, exit code (None: running), last log lines."""
        return "; ".join(
            f"{b.url} pid {b.pid} exit {b.proc.poll()} {b.stderr_tail[-1500:]!r}"
            for b in self.brokers
        )


async def kill_campaign(
    start: Callable[..., BrokerProcess],
    flags: list[str],
    brokers: int,
    shape: LoadShape,
    pause: tuple[float, float],
    seed: int,
) -> tuple[Load, History]:
    """Run the load on `brokers` broker processes while a random one of them is
    SIGKILLed and restarted on its port every `pause` seconds."""
    history = History()
    fleet = await asyncio.to_thread(Fleet, start, flags, brokers)  # a proxy may serve meanwhile
    load = Load(fleet.urls, f"kill{brokers}", history, shape, describe=fleet.describe)
    rng = random.Random(seed)

    async def chaos() -> None:
        while True:
            await asyncio.sleep(rng.uniform(*pause))
            await fleet.kill_and_restart(rng.randrange(brokers))
            history.kills += 1

    await load.run(chaos)
    assert history.kills >= 1
    return load, history


@pytest.mark.parametrize("backend", ["localfs", pytest.param("s3", marks=pytest.mark.s3)])
async def test_kill_9_under_load_then_restart(
    store_flags: list[str], broker_process: Any, backend: str, scale: int, record_figures: Record
) -> None:
    shape = LoadShape(jobs=150 * scale, seconds=4)
    load, history = await kill_campaign(broker_process, store_flags, 1, shape, (0.4, 1.2), 11)
    await finish(load, history, record_figures, backend=backend, scenario="kill -9 + restart")


@pytest.mark.parametrize("backend", ["localfs", pytest.param("s3", marks=pytest.mark.s3)])
async def test_three_brokers_one_killed_and_restarted_repeatedly(
    store_flags: list[str], broker_process: Any, backend: str, scale: int, record_figures: Record
) -> None:
    shape = LoadShape(jobs=200 * scale, workers=9, seconds=4)
    load, history = await kill_campaign(broker_process, store_flags, 3, shape, (0.3, 1.0), 12)
    await finish(load, history, record_figures, backend=backend, scenario="3 brokers, kills")


async def test_kill_9_with_hundreds_of_jobs_held_claimed(
    tmp_path: Path, broker_process: Any, scale: int, record_figures: Record
) -> None:
    """In-flight heavy: most claims are held for three heartbeats before their
    ack, so hundreds are claimed at once and the claimed set spills out of the
    head into lease segments, while the broker is SIGKILLed and restarted."""
    flags = ["--dir", str(tmp_path / "store")]
    shape = LoadShape(jobs=600 * scale, workers=12, lease=3.0, p_hold=0.7, seconds=4)
    load, history = await kill_campaign(broker_process, flags, 1, shape, (0.8, 1.6), 13)
    spilled = list((tmp_path / "store" / "topics" / "kill1").glob("seg-l*.json"))
    assert spilled, "the claimed set never spilled: the campaign did not test what it says"
    await finish(
        load,
        history,
        record_figures,
        backend="localfs",
        scenario="kill -9, hundreds held claimed",
        lease_segments=len(spilled),
    )


PAUSE_S = (1.5, 3.0)


async def kill_one_pause_another(fleet: Fleet, history: History, rng: random.Random) -> None:
    """Until cancelled, every 0.8-1.5 s: SIGSTOP one broker, SIGKILL and restart
    another, and let the first go 1.5-3 s later (PAUSE_S: longer than a
    forwarded request waits for its owner)."""
    while True:
        await asyncio.sleep(rng.uniform(0.8, 1.5))
        victim, paused = rng.sample(range(len(fleet.brokers)), 2)
        stopped = fleet.brokers[paused]
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            await fleet.kill_and_restart(victim)
            history.kills += 1
            await asyncio.sleep(rng.uniform(*PAUSE_S))
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        history.pauses += 1


@pytest.mark.parametrize("backend", ["localfs", pytest.param("s3", marks=pytest.mark.s3)])
async def test_three_brokers_clocks_apart_one_killed_one_paused(
    store_flags: list[str], broker_process: Any, backend: str, scale: int, record_figures: Record
) -> None:
    """SPEC 4.3's campaign: three brokers whose wall clocks are a minute ahead,
    a minute behind and right; one is SIGKILLed and restarted, another
    SIGSTOPped for longer than a forwarded request may wait, then let go, again
    and again. Claims are held with heartbeats (none may be taken while live),
    records are kept only 55 s (a broker ahead must not expire them early: the
    final lookups would miss them), and nothing is lost or committed twice.
    55 s: less than the minute a broker's clock is ahead, so one that expired
    records by its own clock would drop every one of them at once. A record
    gone at the end counts as expired, not lost, only if its job's first ack
    was sent 55 s (less the clocks' tolerance) before it was read: the long
    form lasts about two minutes, and its first records rightly expire (so did
    the first 57 of 200 in the short form with 30 s on a slow machine)."""
    retention = 55
    flags = [*store_flags, "--retention", str(retention), "--broker-lease", "3"]
    fleet = await asyncio.to_thread(Fleet, broker_process, flags, 3, ["+60s", "-60s", None])
    history = History()
    shape = LoadShape(
        jobs=200 * scale,
        workers=9,
        lease=6.0,
        p_hold=0.3,
        seconds=6,
        timeout=10,
        chaos_seconds=16 if scale == 1 else None,  # the short form: 3-4 kills and pauses
    )
    load = Load(fleet.urls, "clocks", history, shape, describe=fleet.describe)
    await load.run(lambda: kill_one_pause_another(fleet, history, random.Random(15)))
    assert history.kills >= 1 and history.pauses >= 1
    assert history.held > 0 and history.heartbeats > 0
    await finish(
        load,
        history,
        record_figures,
        retention=retention,
        backend=backend,
        scenario="3 brokers, clocks +-60 s, kill -9 and SIGSTOP",
    )


@pytest.mark.parametrize("backend", ["localfs", pytest.param("s3", marks=pytest.mark.s3)])
async def test_control_cancels_limits_schedules_clocks_apart_kills_pauses(
    store_flags: list[str], broker_process: Any, backend: str, scale: int, record_figures: Record
) -> None:
    """SPEC 10-12 under the clocks campaign's chaos (three brokers a minute
    ahead, a minute behind and right; one SIGKILLed and restarted while
    another is SIGSTOPped), four topics at once: jobs cancelled as they are
    pending, held and finished; a topic with max_claimed, its claims held with
    heartbeats or abandoned by twelve workers; a topic with a rate; and a
    schedule firing every second. The history checks of control.py judge
    each, and the usual ones (nothing lost, nothing committed twice) every
    topic."""
    broker_lease, max_claimed, rate, burst, every = 3, 5, 4.0, 4, 1
    # The long form four times the short, not ten: five slots under the chaos
    # take about a job a second, and ten times ran past the 600 s timeout.
    scale = min(scale, 4)
    flags = [*store_flags, "--broker-lease", str(broker_lease)]
    fleet = await asyncio.to_thread(Fleet, broker_process, flags, 3, ["+60s", "-60s", None])

    def load(topic: str, seed: int, **shape: Any) -> ControlLoad:
        shape = {"seconds": 10 * scale, "timeout": 10, **shape}
        return ControlLoad(
            fleet.urls, topic, History(), LoadShape(**shape), seed, describe=fleet.describe
        )

    # Claims held (a third of the lease apart) and abandoned last their lease,
    # 6 s: longer than the clocks' tolerance, so they still overlap once it is
    # allowed for. Stale acks would wait for a cancelled job's next claim,
    # which never comes (40 s).
    cancels = load("cancel", 1, jobs=150 * scale, lease=3.0, p_hold=0.4, p_stale=0.0)
    # Twenty jobs at once, most of them held (heartbeats) or abandoned for
    # their 6 s lease by twelve workers claiming up to four each: well past
    # five claims at once but for the limit (spread out alone, about 3.6 were
    # held at a time, and the check passed with the limit off in 1 run of 4).
    # The rest come about as fast as five slots take them under the chaos
    # (1/s): the long form's 240 enqueued in 100 s left more than its drain
    # allows.
    limited = load(
        "limited",
        2,
        jobs=24 * scale,
        at_once=20,
        seconds=24 * scale,
        workers=12,
        lease=6.0,
        p_hold=0.7,
        p_die=0.1,
    )
    # Enqueued in 2 s, as fast as twelve times the rate: claims that took them
    # as they came would pass it whatever the clocks' tolerance.
    rated = load("rated", 3, jobs=50 * scale, seconds=2 * scale)
    fired = load("fired", 4, jobs=0, lease=3.0, p_stale=0.0)
    await limited.put("/settings", {"max_claimed": max_claimed})
    await rated.put("/settings", {"rate": rate, "burst": burst})
    history = cancels.h  # the chaos's figures
    rng = random.Random(17)

    async def kills() -> None:
        # 16 s in the short form (3-4 kills and pauses), as the clocks campaign:
        # the chaos slows production, which would keep it going.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(16 if scale == 1 else None):
                await kill_one_pause_another(fleet, history, rng)

    async def chaos() -> None:  # cancels go on as long as production, three at a time
        await asyncio.gather(kills(), *(cancels.cancel_some(seed) for seed in (18, 19, 20)))

    done = asyncio.Event()
    firing = asyncio.create_task(fired.consume_schedule("tick", every, done))
    watching = asyncio.create_task(limited.watch_claimed())
    try:
        await asyncio.gather(cancels.run(chaos), limited.run(), rated.run())
    finally:
        done.set()
        await asyncio.gather(firing, watching)
    assert history.kills >= 1 and history.pauses >= 1

    final = await cancels.final_records()
    counts = final.pop("__counts__")
    verdict = {**check_settlements(cancels.h, final)}
    verdict.update(check_cancels(cancels.ops, cancels.h.enqueued, final))
    assert counts["enqueued"] == len(cancels.h.enqueued), counts
    assert counts["completed"] + counts["cancelled"] == counts["enqueued"], counts
    assert counts["cancelled"] == verdict["cancelled"] > 0, counts
    assert counts["pending"] == counts["claimed"] == counts["dead"] == 0, counts
    lost = 0
    for each in (limited, rated, fired):
        final = await each.final_records()
        counts = final.pop("__counts__")
        figures = check(each.h, final, counts)
        lost += figures["lost"]
        verdict["double_committed"] += figures["double_committed"]
        if each is limited:
            limits = check_max_claimed(each.ops, final, max_claimed, each.claimed_seen)
            # Reached, or the check says nothing of it: it would pass with it off.
            reached = max(limits["max_claimed_seen"], limits["held_at_once_certain"])
            assert reached == max_claimed, f"max_claimed {max_claimed} never reached: {limits}"
            verdict.update(limits)
    verdict.update(check_rate(rated.ops, rate, burst))
    # Firing stops while no broker fires the topic's schedules: its owner
    # paused (PAUSE_S at most; it fires the latest slot when let go), or
    # killed, until the others see its record stale (the broker lease, seen
    # on their own clocks in rounds a third of it apart) or it restarts.
    gap_bound = broker_lease + broker_lease / 3 + PAUSE_S[1] + 2 * every
    verdict.update(check_schedule(fired.ops, "tick", every, gap_bound))
    summaries = [h.summary() for h in (cancels.h, limited.h, rated.h, fired.h)]
    record_figures(
        {
            **{k: sum(s[k] for s in summaries) for k in summaries[0]},
            **verdict,
            "lost": lost,
            "backend": backend,
            "scenario": "control: cancel, limits, schedules; 3 brokers, clocks +-60 s, "
            "kill -9 and SIGSTOP",
        }
    )


@pytest.mark.parametrize("backend", ["localfs", pytest.param("s3", marks=pytest.mark.s3)])
async def test_follow_ups_exactly_once_across_kills(
    store_flags: list[str], broker_process: Any, backend: str, scale: int, record_figures: Record
) -> None:
    """SPEC 9: every ack carries a follow-up into another topic; two brokers,
    one SIGKILLed and restarted again and again; acks whose answer was lost
    are sent again with the same token. At the end every completed job has
    exactly one follow-up, made by an ack that succeeded, none doubled, none
    missing, none from an ack that was refused."""
    shape = LoadShape(jobs=150 * scale, workers=6, seconds=4, follow_to="next")
    load, history = await kill_campaign(broker_process, store_flags, 2, shape, (0.4, 1.2), 16)
    follow = await load.follow_ups()
    final = await load.final_records()
    counts = final.pop("__counts__")
    verdict = check(history, final, counts)
    verdict.update(check_follow_ups(history, follow))
    record_figures(
        {**history.summary(), **verdict, "backend": backend, "scenario": "follow-ups, kills"}
    )


@pytest.mark.s3
async def test_s3_faults_and_outages_lose_nothing(
    broker_process: Any, scale: int, record_figures: Record
) -> None:
    bucket_store = await open_s3()  # creates this run's bucket
    await bucket_store.close()
    proxy = FaultProxy(
        s3_endpoint(), Odds(slowdown=0.04, drop=0.03, lose_answer=0.03, delay=0.05, delay_s=0.3)
    )
    await proxy.start()
    history = History()
    try:
        args = s3_broker_args(uuid.uuid4().hex[:12])
        args[args.index("--endpoint-url") + 1] = proxy.url
        # In a thread: the proxy serves on this loop while the brokers start.
        fleet = await asyncio.to_thread(Fleet, broker_process, args, 2)
        # Outages slow production, which kept them coming: 22 s of them in the
        # short form. 10 s there (the proxy's faults go on to the end).
        chaos_seconds = 10 if scale == 1 else None
        shape = LoadShape(jobs=150 * scale, timeout=30, seconds=4, chaos_seconds=chaos_seconds)
        load = Load(fleet.urls, "faults", history, shape, describe=fleet.describe)
        rng = random.Random(13)

        async def chaos() -> None:
            while True:
                await asyncio.sleep(rng.uniform(1.0, 2.0))
                await proxy.outage(rng.uniform(0.5, 1.5))  # the store is gone, then back

        await load.run(chaos)
        proxy.odds = Odds()  # read the verdict through a clean path
        history.faults.update(proxy.injected)
        read_back = await commits_read_back(fleet.urls())
        await finish(
            load,
            history,
            record_figures,
            backend="s3",
            scenario="S3 faults via proxy + outages",
            proxy_forwarded=proxy.forwarded,
            commits_read_back=read_back,
        )
    finally:
        await proxy.stop()
    assert sum(history.faults.values()) > 0
    # The brokers hide most faults from their clients: a write whose answer was
    # lost is read back, one refused by an outage is tried again for the whole
    # commit budget. Whether a client still sees one (a 503, a replay) depends
    # on timing (none did in one CI run). That the faults reached the commits
    # does not:
    assert read_back > 0, "no fault reached a commit: the test proves nothing"


async def test_localfs_faults_and_outages_lose_nothing(
    start_broker: Callable[..., Awaitable[Any]], tmp_path: Path, scale: int, record_figures: Record
) -> None:
    """Two brokers on one directory through ChaosStore: requests fail, slow
    down, and go down together; writes land and are answered 5xx (at once, or
    0-30 ms before they land, if their ETag still holds then) or 412 (a retry
    refused by its own first landing). Every one of those on a topic head is
    read back by the group committer, which must answer by what landed."""
    stores = [
        ChaosStore(
            LocalStore(tmp_path), fail=0.03, lose=0.03, slow=0.05, late=0.03, refuse=0.03, seed=s
        )
        for s in (1, 2)
    ]
    brokers = [await start_broker(s, commit_budget=20.0) for s in stores]
    history = History()
    load = Load(
        lambda: [b.url for b in brokers],
        "faults",
        history,
        # Outages 8 s in the short form (13 s of them, as production slowed);
        # the wrapper's faults go on to the end.
        LoadShape(jobs=150 * scale, timeout=30, seconds=4, chaos_seconds=8 if scale == 1 else None),
    )
    rng = random.Random(14)

    async def chaos() -> None:
        while True:
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            for s in stores:
                s.down = True
            try:  # its time may end here: the store comes back whatever ends it
                await asyncio.sleep(rng.uniform(0.3, 1.0))
            finally:
                for s in stores:
                    s.down = False

    await load.run(chaos)
    late_ends: Counter[str] = Counter()
    on_heads: Counter[str] = Counter()
    for s in stores:
        await s.calm()
        history.faults.update(s.injected)
        late_ends.update(s.late_ends)
        on_heads.update(s.on_heads)
    await finish(
        load,
        history,
        record_figures,
        backend="localfs",
        scenario="store faults (wrapper) + outages",
        faults_by_kind=dict(history.faults),
        late_ends=dict(late_ends),
        faults_on_heads=dict(on_heads),
        commits_read_back=await commits_read_back([b.url for b in brokers]),
    )
    assert history.faults["lose_answer"] > 0 and history.faults["outage"] > 0
    # Head writes answered 5xx while in flight, and landed ones answered 412:
    # each took the committer's read-back, which the faults are there for.
    # Whether a late one lands is timing (its condition, judged as it lands,
    # held for about one in three; in one short run none did): not asserted.
    assert on_heads["late"] > 0 and on_heads["refuse_landed"] > 0, on_heads
