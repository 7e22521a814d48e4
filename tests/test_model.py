"""A model-based (differential) test of the Engine against an in-memory
reference model of SPEC sections 3, 9, 10 and 12 (written by round 22's review
of the state machine and the committer): random operations on both, with tiny
bounds (spills, manifests, holes, compaction, many segments), reloads from the
store, and injected store faults; every answer, count, dead list, outbox and
job lookup compared after each step. Follow-ups for a second topic wait in the
first's outbox and are delivered by the owner's duties (Duties._deliver, over a
link to the target that may fail or lose its answers); brokers' clocks may be
skewed within the error each is told. Beside the model, what must hold
whatever the clocks say is checked on a true clock (Truth): no lease ends
early, no job runs before its time less the clocks' errors, none completes
twice, and after a final drain every job and follow-up was done once."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from simplequeue.api import AckRequest, FollowUpSpec, JobSpec, SettingsRequest
from simplequeue.broker.duties import Duties, DutySettings
from simplequeue.broker.engine import Engine
from simplequeue.broker.membership import Membership
from simplequeue.errors import (
    JobCancelled,
    JobNotFound,
    LeaseLost,
    RefusedByTopic,
    SimpleQueueError,
    StoreUnavailable,
)
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore.memfs import MemStore
from simplequeue.state import Bounds, Policy
from tests.helpers.faults import FaultyStore

LONG = os.environ.get("SIMPLEQUEUE_LONG") == "1"  # bin/test --long: ten times the seeds
T0 = 1_000_000.0
TOPIC = "t"
OTHER = "u"  # the topic follow-ups go to through the outbox of TOPIC

SMALL = Bounds(
    inline_pending_bytes=600,
    inline_leases_bytes=400,
    inline_records_bytes=400,
    inline_dead_bytes=300,
    inline_outbox_bytes=300,
    segment_bytes=700,
    loose_max=4,
    manifests_max=3,
    manifest_bytes=4096,
    holes_max=8,
    runs_max=3,
    merge_bytes=2048,
    lanes_max=4,
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Skewed:
    """A broker's estimate of the store's time (the true one, `truth`): off by
    a fixed `skew`, within the `error` the broker is told (StoreClock.error)."""

    def __init__(self, truth: Clock, skew: float = 0.0, error: float = 0.0) -> None:
        assert abs(skew) <= error
        self.truth, self.skew, self.error = truth, skew, error

    def __call__(self) -> float:
        return self.truth.now + self.skew


def committer(
    store: Any,
    clock: Clock | Skewed,
    policy: Policy,
    bounds: Bounds = SMALL,
    broker_id: str = "b",
) -> Engine:
    settings = CommitSettings(
        bounds=bounds, policy=policy, linger=0.0, linger_max=0.0, backoff_min=0.0, backoff_max=0.0
    )
    error = clock.error if isinstance(clock, Skewed) else 0.0
    return Engine(
        GroupCommitter(
            store,
            broker_id=broker_id,
            settings=settings,
            clock=clock,
            clock_ahead=lambda now: error,
            clock_behind=lambda now: error,
        )
    )


class Link:
    """Where an owner's duties send follow-ups (in a broker, forwarding.Router:
    the target topic's owner), here that broker's engine, over a link that may
    fail once: "down" (the request never lands) or "lost" (it lands and its
    answer is lost). What was sent is kept: (specs, answers or None)."""

    def __init__(self, engine: Engine, fault: str | None = None) -> None:
        self.engine, self.fault = engine, fault
        self.sent: list[tuple[list[JobSpec], list[dict[str, Any]] | None]] = []

    async def enqueue(self, topic: str, specs: list[JobSpec]) -> list[dict[str, Any]]:
        assert topic == OTHER
        fault, self.fault = self.fault, None
        if fault == "down":
            self.sent.append((specs, None))
            raise StoreUnavailable("injected: the target's owner did not answer")
        answers = await self.engine.enqueue(topic, specs)
        self.sent.append((specs, answers))
        if fault == "lost":
            raise StoreUnavailable("injected: the target's answer was lost")
        return answers


class Truth:
    """What must hold on the true clock whatever the brokers' clocks say, each
    off by at most its error (SPEC 4.3): a job is handed to a second worker only
    once the first's lease ran out (as long as the first was told, from when
    it was answered), never before its time less the errors of the clocks
    its time went through (`slack`, by topic), and completed at most once (a
    job of that id enqueued again is another). Keyed by (topic, job id)."""

    def __init__(self, clock: Clock, slack: dict[str, float]) -> None:
        self.clock, self.slack = clock, slack
        self.valid_until: dict[tuple[str, str], float] = {}
        self.due: dict[tuple[str, str], float] = {}
        self.done: dict[tuple[str, str], int] = {}

    def enqueued(self, topic: str, job_id: str, delay: float, at: float | None = None) -> None:
        key = (topic, job_id)
        self.due[key] = (self.clock.now if at is None else at) + delay
        self.done.pop(key, None)
        self.valid_until.pop(key, None)

    def claimed(self, topic: str, job_id: str, lease: float, log: list[str]) -> None:
        key, now = (topic, job_id), self.clock.now
        assert self.valid_until.get(key, -1e300) <= now, (
            f"{key} handed out again {self.valid_until[key] - now:.3f} s before the lease "
            "its holder was given ran out",
            log[-8:],
        )
        slack = self.slack[topic]
        assert now >= self.due[key] - slack, (
            f"{key} claimed {self.due[key] - now:.3f} s before its time (slack {slack})",
            log[-8:],
        )
        self.valid_until[key] = now + lease

    def renewed(self, topic: str, job_id: str, lease: float) -> None:
        self.valid_until[(topic, job_id)] = self.clock.now + lease

    def reaped(self, topic: str, job_id: str, log: list[str]) -> None:
        key, now = (topic, job_id), self.clock.now
        assert self.valid_until.get(key, -1e300) <= now, (
            f"{key}: a lease reaped {self.valid_until[key] - now:.3f} s before it ran out",
            log[-8:],
        )
        self.due[key] = now

    def let_go(self, topic: str, job_id: str, due: float | None = None) -> None:
        """Its holder gave it up (nack, release, cancel): due again at `due`
        (true time; None: as it was)."""
        key = (topic, job_id)
        self.valid_until.pop(key, None)
        if due is not None:
            self.due[key] = due

    def completed(self, topic: str, job_id: str, log: list[str]) -> None:
        key = (topic, job_id)
        self.valid_until.pop(key, None)
        self.done[key] = self.done.get(key, 0) + 1
        assert self.done[key] == 1, (f"{key} completed twice", log[-8:])


# --- the reference model ------------------------------------------------------------------


class Model:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.live: dict[str, dict[str, Any]] = {}  # pending/delayed/claimed
        self.dead: list[dict[str, Any]] = []
        self.records: dict[str, dict[str, Any]] = {}  # finished: status, result, attempts
        self.seq = 0
        self.counters = {
            "enqueued": 0,
            "completed": 0,
            "cancelled": 0,
            "dead_dropped": 0,
            "purged": 0,
        }
        self.settings: dict[str, Any] = {}
        # Follow-ups for other topics that the acks recorded and that are not
        # delivered yet, oldest first: as the outbox holds them, and (the
        # driver adds it) the true time of their ack, "truth_at". The driver
        # numbers them in their payloads ("f").
        self.outbox: list[dict[str, Any]] = []

    now = T0  # the clock of the broker acting
    latest = T0  # the furthest ahead of the brokers' clocks

    def expired(self, job_id: str) -> bool:
        """A record past retention on some broker's clock: the engine may or may
        not still hold it."""
        r = self.records.get(job_id)
        return r is not None and r["finished_at"] < self.latest - self.policy.retention

    def exists(self, job_id: str) -> bool | None:
        if job_id in self.live or any(j["id"] == job_id for j in self.dead):
            return True
        if job_id in self.records:
            return None if self.expired(job_id) else True
        return False

    def enqueue(
        self,
        specs: list[JobSpec],
        now: float,
        told: list[dict[str, Any]] | None = None,
        dry: bool = False,
    ) -> list[dict[str, Any]]:
        out = []
        dups = []
        named: set[str] = set()
        for k, spec in enumerate(specs):
            assert spec.id is not None
            dup = spec.id in named or self.exists(spec.id)
            named.add(spec.id)
            if dup is None:  # expired record: the engine's answer decides
                dup = True if told is None else told[k]["duplicate"]
            dups.append(dup)
        held = {j["priority"] for j in self.live.values()} | {j["priority"] for j in self.dead}
        fresh = {s.priority for s, d in zip(specs, dups, strict=True) if not d} - held
        if fresh and len(held) + len(fresh) > SMALL.lanes_max:
            raise RefusedByTopic("lanes")
        if dry:
            return []
        for k, spec in enumerate(specs):
            if not dups[k] and spec.id in self.records:
                del self.records[spec.id]
            if dups[k]:
                out.append({"id": spec.id, "duplicate": True})
                continue
            ma = spec.max_attempts
            if ma is None:
                ma = self.settings.get("max_attempts", self.policy.max_attempts)
            self.live[spec.id] = {
                "id": spec.id,
                "seq": self.seq,
                "payload": spec.payload,
                "priority": spec.priority,
                "run_at": now + spec.delay if spec.run_at is None else max(now, spec.run_at),
                "attempts": 0,
                "max_attempts": ma,
                "last_error": None,
                "status": "pending",
            }
            self.seq += 1
            self.counters["enqueued"] += 1
            out.append({"id": spec.id, "duplicate": False})
        return out

    def claimable(self) -> int:
        room = 1 << 62
        if "max_claimed" in self.settings:
            room = self.settings["max_claimed"] - sum(
                1 for j in self.live.values() if j["status"] == "claimed"
            )
        return max(0, room)

    def claim(
        self, count: int, lease: float, now: float, error: float = 0.0
    ) -> list[dict[str, Any]]:
        """A lease counts from `now` + the claiming broker's clock `error`."""
        count = min(count, self.claimable())
        due = [j for j in self.live.values() if j["status"] == "pending" and j["run_at"] <= now]
        due.sort(key=lambda j: (-j["priority"], j["run_at"], j["seq"]))
        got = due[:count]
        for j in got:
            j["status"] = "claimed"
            j["attempts"] += 1
            j["lease_expires_at"] = now + error + lease
        return got

    def holder(self, job_id: str, token: str | None) -> dict[str, Any]:
        j = self.live.get(job_id)
        if j is None or j["status"] != "claimed":
            if j is None and not any(d["id"] == job_id for d in self.dead):
                rec = self.records.get(job_id)
                if rec is None:
                    raise JobNotFound(job_id)
                if rec["status"] == "cancelled":
                    raise JobCancelled(job_id)
            raise LeaseLost(job_id)
        if token is not None and token != j["token"]:
            raise LeaseLost(job_id)
        return j

    def finish(self, j: dict[str, Any], status: str, result: Any = None) -> None:
        del self.live[j["id"]]
        self.records[j["id"]] = {
            "status": status,
            "result": result,
            "attempts": j["attempts"],
            "finished_at": self.now,
        }

    def ack(
        self,
        job_id: str,
        token: str | None,
        result: Any,
        now: float,
        follow: list[FollowUpSpec] | None = None,
        told: list[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Follow-ups for this topic are enqueued (`told`: the engine's answers
        for them, where an expired record leaves it open); those for others go
        to the outbox, and are returned."""
        j = self.holder(job_id, token)
        here = [
            JobSpec(f.payload, follow_up(job_id, i, f), f.priority, f.delay, f.max_attempts)
            for i, f in enumerate(follow or ())
            if f.topic is None
        ]
        there = [
            {
                "id": follow_up(job_id, i, f),
                "topic": f.topic,
                "payload": f.payload,
                "priority": f.priority,
                "delay": f.delay,
                "max_attempts": f.max_attempts,
                "at": now,
            }
            for i, f in enumerate(follow or ())
            if f.topic is not None
        ]
        if here:
            del self.live[job_id]
            try:
                self.enqueue(here, now, told, dry=True)
            finally:
                self.live[job_id] = j
        self.finish(j, "completed", result)
        self.counters["completed"] += 1
        if here:
            self.enqueue(here, now, told)
        self.outbox += there
        return there

    def release(self, j: dict[str, Any], run_at: float, error: str | None, now: float) -> str:
        j["status"] = "pending"
        j.pop("token", None)
        if error is not None:
            j["last_error"] = error
        if j["max_attempts"] and j["attempts"] >= j["max_attempts"]:
            del self.live[j["id"]]
            j["status"] = "dead"
            self.dead.append(j)
            self.enforce_dead_limit()
            return "dead"
        j["run_at"] = run_at
        return "pending"

    def enforce_dead_limit(self) -> None:
        while len(self.dead) > self.policy.dead_limit:
            d = self.dead.pop(0)
            self.records[d["id"]] = {
                "status": "dead",
                "result": None,
                "attempts": d["attempts"],
                "finished_at": self.now,
            }
            self.counters["dead_dropped"] += 1

    def nack(
        self, job_id: str, token: str | None, delay: float, error: str | None, now: float
    ) -> str:
        j = self.holder(job_id, token)
        st = self.release(j, now + delay, error, now)
        return "delayed" if st == "pending" and delay > 0 else st

    def heartbeat(
        self, job_id: str, token: str | None, lease: float, now: float, error: float = 0.0
    ) -> float:
        j = self.holder(job_id, token)
        j["lease_expires_at"] = now + error + lease
        return j["lease_expires_at"]

    def unclaim(self, job_id: str, token: str, now: float) -> bool:
        j = self.live.get(job_id)
        if j is None or j["status"] != "claimed" or j["token"] != token:
            return False
        j["status"] = "pending"
        j.pop("token")
        j["attempts"] -= 1
        j["run_at"] = min(j["run_at"], now)
        return True

    def cancel(self, ids: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"cancelled": [], "not_found": []}
        for i in dict.fromkeys(ids):
            j = self.live.get(i)
            if j is None:
                out["not_found"].append(i)
                continue
            self.finish(j, "cancelled")
            self.counters["cancelled"] += 1
            out["cancelled"].append(i)
        return out

    def reap(self, now: float, error: float = 0.0) -> list[dict[str, Any]]:
        """Leases expired by `now` less the reaping broker's clock `error`; the
        caller releases them (order decided by the engine)."""
        return [
            j
            for j in self.live.values()
            if j["status"] == "claimed" and j["lease_expires_at"] <= now - error
        ]

    def requeue(self, ids: list[str] | None, now: float) -> list[str]:
        take = (
            list(self.dead)
            if ids is None
            else [d for i in dict.fromkeys(ids) for d in self.dead if d["id"] == i]
        )
        for d in take:
            self.dead.remove(d)
            d.update(status="pending", attempts=0, run_at=now)
            self.live[d["id"]] = d
        return [d["id"] for d in take]

    def purge(self, ids: list[str] | None) -> list[str]:
        take = (
            list(self.dead)
            if ids is None
            else [d for i in dict.fromkeys(ids) for d in self.dead if d["id"] == i]
        )
        for d in take:
            self.dead.remove(d)
            self.records[d["id"]] = {
                "status": "dead",
                "result": None,
                "attempts": d["attempts"],
                "finished_at": self.now,
            }
            self.counters["purged"] += 1
        if ids is None:
            return [d["id"] for d in take]
        gone = {d["id"] for d in take}
        return [
            i
            for i in dict.fromkeys(ids)
            if i in gone or (self.records.get(i, {}).get("status") == "dead")
        ]

    def counts(self, now: float) -> dict[str, int]:
        pending = sum(
            1 for j in self.live.values() if j["status"] == "pending" and j["run_at"] <= now
        )
        delayed = sum(
            1 for j in self.live.values() if j["status"] == "pending" and j["run_at"] > now
        )
        claimed = sum(1 for j in self.live.values() if j["status"] == "claimed")
        c = self.counters
        total = pending + delayed + claimed + len(self.dead) + c["completed"] + c["cancelled"]
        return {
            "pending": pending,
            "delayed": delayed,
            "claimed": claimed,
            "completed": c["completed"],
            "dead": len(self.dead),
            "cancelled": c["cancelled"],
            "enqueued": c["enqueued"],
            "total": total,
        }

    def lookup(self, job_id: str, now: float) -> tuple[str, int, Any] | None:
        j = self.live.get(job_id)
        if j is not None:
            st = j["status"]
            if st == "pending" and j["run_at"] > now:
                st = "delayed"
            return st, j["attempts"], None
        for d in self.dead:
            if d["id"] == job_id:
                return "dead", d["attempts"], None
        r = self.records.get(job_id)
        if r is not None:
            return r["status"], r["attempts"], r["result"]
        return None


def follow_up(job_id: str, index: int, spec: FollowUpSpec) -> str:
    """A follow-up's id: its own, or derived from the acked job's (SPEC 9)."""
    return spec.id if spec.id is not None else f"{job_id}:{index}"


# --- the differential driver ------------------------------------------------------------------


def owner_duties(engine: Engine, clock: Skewed) -> Duties:
    """A broker's owner duties, for their delivery of follow-ups
    (Duties._deliver): nothing here runs their loop."""
    me = engine.committer.broker_id
    membership = Membership(
        engine.committer.store, broker_id=me, url=f"http://{me}", lease_s=10.0, clock=clock
    )
    return Duties(engine, membership, DutySettings(), clock=engine.earliest_now, now=clock)


def outbox_now(s: Any, now: float) -> list[dict[str, Any]]:
    """Every follow-up a topic's outbox holds, oldest first."""
    front: list[dict[str, Any]] = s.outbox_after(0, 10**6, scan=10**6)[0]
    return front


async def run_model(
    seed: int,
    steps: int,
    check_every: int = 1,
    retention: float = 10**9,
    sweep: bool = False,
    brokers: int = 1,
    faults: float = 0.0,
    skews: tuple[tuple[float, float], ...] = (),
) -> None:
    """`skews`: each broker's clock, (skew, error): by default the true one."""
    rng = random.Random(seed)
    policy = Policy(default_lease=30.0, max_attempts=3, retention=retention, dead_limit=6)
    inner = MemStore()
    clock = Clock()
    clocks = [Skewed(clock, *(skews[k] if skews else (0.0, 0.0))) for k in range(brokers)]
    stores = [FaultyStore(inner) for _ in range(brokers)]
    engines = [committer(st, clocks[k], policy, broker_id=f"b{k}") for k, st in enumerate(stores)]
    duties = [owner_duties(engines[k], clocks[k]) for k in range(brokers)]
    eng = engines[0]
    model = Model(policy)
    mu = Model(policy)  # OTHER: only deliveries enqueue into it, until the drain
    # A job's time is set on one broker's clock and claimed by another's; a
    # follow-up's likewise: its ack's time, judged by the target's owner (the
    # deliverer passes it on as a time, not as a delay from its own clock).
    errors = sum(c.error for c in clocks)
    truth = Truth(clock, {TOPIC: errors, OTHER: errors})
    held: dict[str, str] = {}  # job id -> lease token (engine's) for claimed jobs
    next_id = 0
    items: dict[int, dict[str, Any]] = {}  # every follow-up for OTHER an ack recorded, by "f"
    first_of: dict[str, int] = {}  # follow-up id -> the first such follow-up's "f"
    landed: list[int] = []  # the follow-ups enqueued into OTHER (not duplicates), in order
    log: list[str] = []

    def some_ids(n: int) -> list[str]:
        pool = list(model.live) + [d["id"] for d in model.dead] + list(model.records)[-20:]
        pool += [f"j{rng.randrange(next_id + 3)}"]
        return [rng.choice(pool) for _ in range(n)] if pool else []

    async def compare(where: str, k: int) -> None:
        eng, now = engines[k], clocks[k]()
        model.latest = mu.latest = max(c() for c in clocks)
        waiting = await eng.committer.read(TOPIC, lambda s, now: s.outbox_size())
        assert waiting == len(model.outbox), (where, waiting, len(model.outbox), log[-8:])
        if mu.counters["enqueued"]:
            got = await eng.status(OTHER)
            want = mu.counts(now)
            assert {k: got[k] for k in want} == want, (where, OTHER, got, want, log[-8:])
            for job_id in rng.sample(sorted(mu.live), min(3, len(mu.live))):
                found = await eng.job(OTHER, job_id)
                j = mu.live[job_id]
                assert (found["status"], found["attempts"]) == mu.lookup(job_id, now)[:2], (
                    where,
                    job_id,
                    found,
                    log[-8:],
                )
                assert found["payload"] == j["payload"], (where, found, j, log[-8:])
                assert (found["priority"], found["max_attempts"]) == (
                    j["priority"],
                    j["max_attempts"],
                ), (where, found, j, log[-8:])
        got = await eng.status(TOPIC) if model.counters["enqueued"] else None
        if got is None:
            return
        want = model.counts(now)
        got = {k: got[k] for k in want}
        assert got == want, (where, got, want, log[-8:])
        prios = await eng.committer.read(TOPIC, lambda s, now: dict(s._prios()))
        want_p: dict[str, int] = {}
        for j in [*model.live.values(), *model.dead]:
            want_p[str(j["priority"])] = want_p.get(str(j["priority"]), 0) + 1
        assert prios == want_p, (where, prios, want_p, log[-8:])
        dead, n = await eng.dead(TOPIC)
        assert n == len(model.dead), (where, log[-8:])
        assert [d["id"] for d in dead] == [d["id"] for d in model.dead], (
            where,
            [d["id"] for d in dead],
            [d["id"] for d in model.dead],
            log[-8:],
        )
        for job_id in rng.sample(
            sorted(set(list(model.live) + list(model.records))),
            min(4, len(model.live) + len(model.records)),
        ):
            want_l = model.lookup(job_id, now)
            try:
                found = await eng.job(TOPIC, job_id)
                got_l = (found["status"], found["attempts"], found.get("result"))
            except JobNotFound:
                got_l = None
            if model.expired(job_id) and got_l is None:
                continue
            assert got_l == want_l, (where, job_id, got_l, want_l, log[-8:])

    async def do_tend(k: int) -> None:
        eng, now, error = engines[k], clocks[k](), clocks[k].error
        expiring = {j["id"] for j in model.reap(now, error)}
        dead_before = [d["id"] for d in model.dead]
        # A tend reaps a bounded part: tended again, as the owner's duties do,
        # until a tend reaps nothing.
        out = {"pending": 0, "dead": 0}
        while True:
            part, _ = await eng.tend(TOPIC)
            if not part["pending"] + part["dead"]:
                break
            out = {k: out[k] + part[k] for k in out}
        for job_id in expiring:
            held.pop(job_id, None)
            truth.reaped(TOPIC, job_id, log)
        dying = [
            model.live[i]
            for i in expiring
            if model.live[i]["max_attempts"]
            and model.live[i]["attempts"] >= model.live[i]["max_attempts"]
        ]
        assert out["pending"] + out["dead"] == len(expiring), (out, expiring, log[-8:])
        assert out["dead"] == len(dying), (out, log[-8:])
        # A reaped job is due again from the earliest the store's time may be.
        if not dying:
            for i in expiring:
                model.release(model.live[i], now - error, "lease expired", now)
            return
        engine_dead = [d["id"] for d in (await eng.dead(TOPIC))[0]]
        # the order of jobs dying in one reap is the engine's to choose
        order = {i: n for n, i in enumerate(engine_dead)}
        for i in sorted(expiring, key=lambda i: order.get(i, -1)):
            model.release(model.live[i], now - error, "lease expired", now)
        assert [d["id"] for d in model.dead] == engine_dead, (dead_before, engine_dead, log[-8:])

    async def deliver(k: int, fault: str | None) -> None:
        """Broker `k`'s duties deliver TOPIC's outbox into OTHER, through broker
        `target` (its owner, as far as `k` knows), over a link that may fail."""
        target = rng.randrange(brokers)
        link = Link(engines[target], fault)
        duties[k].deliver_to = link
        stale = brokers > 1 and rng.random() < 0.5
        if not stale:
            # As an owner is told when another broker wrote its topic (POST
            # /refresh); else it delivers from what it last saw, as a broker
            # that stood in for the owner does: what it sends again is a
            # duplicate there.
            await engines[k].committer.invalidate(TOPIC)
        log[-1] += f" b{k}->b{target}{' stale' if stale else ''} {fault or ''}"
        try:
            await duties[k]._deliver(TOPIC, None)
        except SimpleQueueError as e:  # as Duties._tend: the topic is tended again later
            log[-1] += f" {type(e).__name__}"
        waiting = {i["payload"]["f"] for i in model.outbox}
        sent = [s.payload["f"] for specs, _ in link.sent for s in specs]
        log[-1] += f" sent {sent}"
        assert sent == sorted(set(sent)), ("not in the outbox's order", sent, log[-8:])
        for specs, answers in link.sent:
            for n, spec in enumerate(specs):
                item = items[spec.payload["f"]]
                assert (spec.id, spec.payload, spec.priority, spec.max_attempts) == (
                    item["id"],
                    item["payload"],
                    item["priority"],
                    item["max_attempts"],
                ), (spec, item, log[-8:])
                # Its time: the ack's, plus its delay.
                assert spec.delay == 0.0, (spec, log[-8:])
                assert spec.run_at == pytest.approx(item["at"] + item["delay"], abs=1e-6), (
                    spec,
                    item,
                    log[-8:],
                )
                if item["payload"]["f"] not in waiting:  # delivered before, as stale as that
                    assert mu.exists(spec.id), (spec, log[-8:])
                if answers is None:
                    continue
                mu.now = clocks[target]()
                want = mu.enqueue([spec], mu.now, [answers[n]])
                assert [answers[n]] == want, (spec, answers[n], want, log[-8:])
                if not want[0]["duplicate"]:
                    assert first_of[spec.id] == item["payload"]["f"], (spec, log[-8:])
                    assert not landed or landed[-1] < item["payload"]["f"], (landed, log[-8:])
                    landed.append(item["payload"]["f"])
                    truth.enqueued(OTHER, spec.id, item["delay"], item["truth_at"])
        left = [i["payload"]["f"] for i in await engines[k].committer.read(TOPIC, outbox_now)]
        order = iter(i["payload"]["f"] for i in model.outbox)
        assert all(n in order for n in left), ("outbox", left, model.outbox, log[-8:])
        for item in model.outbox:
            if item["payload"]["f"] not in left:
                assert mu.exists(item["id"]), ("out of the outbox, not in its topic", item)
        model.outbox = [i for i in model.outbox if i["payload"]["f"] in left]

    async def drain() -> None:
        """Every follow-up delivered; then every job of both topics claimed and
        acked by workers of either broker, a little time at a time."""
        for st in stores:
            st.faults.clear()
        for _ in range(10):
            if not model.outbox:
                break
            clock.now += DutySettings().retry_failed + 1  # past what delivery holds back
            log.append("drain: deliver")
            await deliver(rng.randrange(brokers), None)
        assert not model.outbox, (model.outbox, log[-8:])
        for job_id, token in sorted(held.items()):
            k = rng.randrange(brokers)
            model.now = clocks[k]()
            log.append(f"drain: ack {job_id} b{k}")
            await engines[k].ack(TOPIC, job_id, token)
            model.ack(job_id, token, None, model.now)
            truth.completed(TOPIC, job_id, log)
        held.clear()
        for step in range(1000):
            if not model.live and not mu.live:
                break
            clock.now += 0.5
            for topic, m in ((TOPIC, model), (OTHER, mu)):
                k = rng.randrange(brokers)
                now = m.now = clocks[k]()
                got = await engines[k].claim(topic, "w", lease=60.0, count=5)
                want = m.claim(5, 60.0, now, clocks[k].error)
                log.append(f"drain {step}: {topic} b{k} {[j['id'] for j in got]}")
                assert [j["id"] for j in got] == [j["id"] for j in want], (
                    [(j["id"], j["priority"], j["run_at"]) for j in got],
                    [(j["id"], j["priority"], j["run_at"], j["seq"]) for j in want],
                    log[-8:],
                )
                for g, w in zip(got, want, strict=True):
                    truth.claimed(topic, g["id"], 60.0, log)
                    assert g["payload"] == w["payload"], (g, w)
                    w["token"] = g["lease_token"]
                    k = rng.randrange(brokers)
                    await engines[k].ack(topic, g["id"], g["lease_token"])
                    m.now = clocks[k]()
                    m.ack(g["id"], g["lease_token"], None, m.now)
                    truth.completed(topic, g["id"], log)
            await compare(f"drain {step}", rng.randrange(brokers))
        assert not model.live and not mu.live, log[-8:]
        # Every job enqueued ended once: completed, cancelled or dead.
        for m in (model, mu):
            c = m.counters
            assert c["enqueued"] == (
                c["completed"] + c["cancelled"] + len(m.dead) + c["dead_dropped"] + c["purged"]
            ), c
        # Every follow-up for OTHER is there once: the first of each id.
        assert mu.counters["enqueued"] == len(first_of) == len(landed), log[-8:]
        assert sorted(first_of.values()) == landed

    for step in range(steps):
        op = rng.choices(
            [
                "enq",
                "claim",
                "ack",
                "nack",
                "hb",
                "release",
                "cancel",
                "requeue",
                "purge",
                "pop",
                "complete",
                "time",
                "tend",
                "settings",
                "reload",
                "ackmany",
                "deliver",
            ],
            [14, 10, 8, 6, 2, 2, 2, 1, 1, 2, 1, 4, 3, 1, 1, 2, 2],
        )[0]
        which = rng.randrange(brokers)
        eng = engines[which]
        now = model.now = clocks[which]()
        error = clocks[which].error
        model.latest = mu.latest = max(c() for c in clocks)
        log.append(f"{step}:{op}")
        if faults and rng.random() < faults:
            stores[which].faults.append(
                rng.choice(["conflict", "lose-answer", "landed-412", "fail"])
            )
        if op == "enq":
            specs = []
            for _ in range(rng.choice([1, 1, 2, 5, 12])):
                if rng.random() < 0.15 and next_id:
                    job_id = f"j{rng.randrange(next_id)}"
                else:
                    job_id = f"j{next_id}"
                    next_id += 1
                specs.append(
                    JobSpec(
                        {"n": job_id, "pad": "x" * rng.choice([0, 10, 100])},
                        id=job_id,
                        priority=rng.choice([0, 0, 0, 1, 5, -2, 3, 7]),
                        delay=rng.choice([0.0, 0.0, 0.0, 1.0, 5.0, 30.0]),
                        max_attempts=rng.choice([None, None, 1, 2, 0]),
                    )
                )
            log[-1] += f" {[(s.id, s.priority, s.delay) for s in specs]}"
            try:
                got = await eng.enqueue(TOPIC, specs)
            except RefusedByTopic as e:
                got = type(e)
            try:
                if got is RefusedByTopic:  # expired records count as gone: may be refused
                    model.enqueue(specs, now, [{"duplicate": False}] * len(specs), dry=True)
                want = model.enqueue(specs, now, None if got is RefusedByTopic else got)
            except RefusedByTopic as e:
                want = type(e)
            assert got == want, (got, want, log[-8:])
            if isinstance(want, list):
                for spec, w in zip(specs, want, strict=True):
                    if not w["duplicate"]:
                        assert spec.id is not None
                        truth.enqueued(TOPIC, spec.id, spec.delay)
        elif op in ("claim", "pop"):
            count = rng.choice([1, 1, 3, 10])
            lease = rng.choice([5.0, 10.0, 60.0])
            if op == "claim":
                got = await eng.claim(TOPIC, "w", lease=lease, count=count)
                want = model.claim(count, lease, now, error)
            else:
                got = await eng.pop(TOPIC, "w", count=count)
                lease = model.settings.get("lease", policy.default_lease)
                want = model.claim(count, lease, now)
            log[-1] += f" {[j['id'] for j in got]}"
            assert [j["id"] for j in got] == [j["id"] for j in want], (
                [j["id"] for j in got],
                [(j["id"], j["priority"], j["run_at"], j["seq"]) for j in want],
                log[-8:],
            )
            for g, w in zip(got, want, strict=True):
                assert g["attempts"] == w["attempts"], (g, w)
                assert g["payload"] == w["payload"]
                w["token"] = g["lease_token"]
                if op == "claim":
                    held[g["id"]] = g["lease_token"]
                    truth.claimed(TOPIC, g["id"], lease, log)
                else:
                    model.ack(g["id"], g["lease_token"], None, now)
                    truth.claimed(TOPIC, g["id"], 0.0, log)
                    truth.completed(TOPIC, g["id"], log)
        elif op in ("ack", "nack", "hb", "release", "complete") and held:
            job_id = rng.choice(sorted(held))
            token = held[job_id]
            if rng.random() < 0.1:
                token = "stale"
            if rng.random() < 0.1:
                token = None
            log[-1] += f" {job_id} {token}"
            if op == "ack":
                result = {"r": job_id} if rng.random() < 0.7 else None
                follow = None
                if rng.random() < 0.5:
                    follow = []
                    for k in range(rng.choice([1, 2, 3])):
                        if rng.random() < 0.3:
                            follow.append(
                                FollowUpSpec(
                                    {"f": k},
                                    priority=rng.choice([0, 1, 9]),
                                    delay=rng.choice([0.0, 2.0]),
                                )
                            )
                            continue
                        follow.append(
                            FollowUpSpec(
                                {"f": len(items), "pad": "y" * rng.choice([0, 60])},
                                # A given id, that another ack may give too.
                                id=rng.choice([None, None, None, f"f{rng.randrange(8)}"]),
                                # Four priorities at most: OTHER holds them all.
                                priority=rng.choice([0, 1, 9, -1]),
                                delay=rng.choice([0.0, 0.0, 3.0, 40.0]),
                                max_attempts=rng.choice([None, 1, 4]),
                                topic=OTHER,
                            )
                        )
                        items[len(items)] = {}  # its number is taken, if the ack fails too
                try:
                    await eng.ack(TOPIC, job_id, token, result, follow)
                    got_err = None
                except SimpleQueueError as e:
                    got_err = type(e)
                told = []
                for k, f in enumerate(follow or []):
                    fid = follow_up(job_id, k, f)
                    dup = True
                    if f.topic is None and got_err is None and model.exists(fid) is None:
                        dup = (await eng.job(TOPIC, fid))["status"] not in (
                            "pending",
                            "delayed",
                        )
                    if f.topic is None:
                        told.append({"duplicate": dup})
                live_before = set(model.live)
                try:
                    recorded = model.ack(job_id, token, result, now, follow, told)
                    want_err = None
                except SimpleQueueError as e:
                    want_err = type(e)
                assert got_err == want_err or model.expired(job_id), (
                    got_err,
                    want_err,
                    log[-8:],
                )
                if want_err is None:
                    held.pop(job_id)
                    truth.completed(TOPIC, job_id, log)
                    for k, f in enumerate(follow or []):
                        fid = follow_up(job_id, k, f)
                        if f.topic is None and fid in model.live and fid not in live_before:
                            truth.enqueued(TOPIC, fid, f.delay)
                    for item in recorded:
                        item["truth_at"] = clock.now
                        items[item["payload"]["f"]] = item
                        first_of.setdefault(item["id"], item["payload"]["f"])
                    log[-1] += f" -> {[i['payload']['f'] for i in recorded]}"
            elif op == "nack":
                delay = rng.choice([0.0, 0.0, 3.0])
                try:
                    want = model.nack(job_id, token, delay, "boom", now)
                except SimpleQueueError as e:
                    want = type(e)
                try:
                    got = (await eng.nack(TOPIC, job_id, token, delay, "boom"))["status"]
                except SimpleQueueError as e:
                    got = type(e)
                assert got == want or model.expired(job_id), (got, want, log[-8:])
                if isinstance(want, str):
                    held.pop(job_id)
                    truth.let_go(TOPIC, job_id, clock.now + delay)
            elif op == "hb":
                lease = rng.choice([5.0, 60.0])
                try:
                    want = model.heartbeat(job_id, token, lease, now, error)
                except SimpleQueueError as e:
                    want = type(e)
                try:
                    got = (await eng.heartbeat(TOPIC, job_id, token, lease))["lease_expires_at"]
                except SimpleQueueError as e:
                    got = type(e)
                assert got == want or model.expired(job_id), (got, want, log[-8:])
                if isinstance(want, float):
                    truth.renewed(TOPIC, job_id, lease)
            elif op == "release":
                real = held[job_id]
                n = await eng.release(TOPIC, [{"id": job_id, "lease_token": real}])
                assert n == int(model.unclaim(job_id, real, now)), log[-8:]
                held.pop(job_id)
                truth.let_go(TOPIC, job_id, min(truth.due[(TOPIC, job_id)], clock.now))
            elif op == "complete":
                real = held[job_id]
                done = await eng.complete(TOPIC, [{"id": job_id, "lease_token": real}])
                assert done == [job_id], log[-8:]
                model.ack(job_id, real, None, now)
                held.pop(job_id)
                truth.completed(TOPIC, job_id, log)
        elif op == "ackmany" and held:
            picks = rng.sample(sorted(held), min(len(held), rng.choice([2, 4])))
            acks = [AckRequest(job_id=i, lease_token=held[i], result=i) for i in picks]
            answers = await eng.ack_many(TOPIC, acks)
            for i, a in zip(picks, answers, strict=True):
                assert a.get("status") == "completed", (a, log[-8:])
                model.ack(i, held.pop(i), i, now)
                truth.completed(TOPIC, i, log)
        elif op == "cancel":
            ids = some_ids(rng.choice([1, 3]))
            if ids:
                got = await eng.cancel(TOPIC, ids)
                want = model.cancel(ids)
                assert got == want, (got, want, log[-8:])
                for i in want["cancelled"]:
                    held.pop(i, None)
                    truth.let_go(TOPIC, i)
        elif op == "requeue" and model.counters["enqueued"]:
            ids = None if rng.random() < 0.4 else some_ids(2)
            got = await eng.requeue(TOPIC, ids)
            want = model.requeue(ids, now)
            assert got == want, (got, want, log[-8:])
            for i in want:
                truth.let_go(TOPIC, i, clock.now)
        elif op == "purge" and model.counters["enqueued"]:
            ids = None if rng.random() < 0.3 else some_ids(2)
            fuzzy = {i for i in ids or [] if model.expired(i)}
            got = await eng.purge(TOPIC, ids)
            want = model.purge(ids)
            assert [i for i in got if i not in fuzzy] == [i for i in want if i not in fuzzy], (
                got,
                want,
                log[-8:],
            )
        elif op == "time":
            clock.now += rng.choice([0.5, 1.0, 3.0, 11.0, 31.0])
        elif op == "tend" and model.counters["enqueued"]:
            if brokers > 1:
                # As the topic's owner is told when another broker wrote it
                # (POST /refresh): a tend answers from the cached state when it
                # changes nothing, and a stale one knows no newer lease.
                await eng.committer.invalidate(TOPIC)
            await do_tend(which)
        elif op == "deliver":
            fault = rng.choice(["down", "lost"]) if faults and rng.random() < faults else None
            await deliver(which, fault)
        elif op == "settings":
            change = rng.choice(
                [
                    SettingsRequest(max_claimed=rng.choice([2, 5, 50])),
                    SettingsRequest(max_claimed=None),
                    SettingsRequest(max_attempts=rng.choice([1, 2, 4])),
                    SettingsRequest(max_attempts=None),
                ]
            )
            await eng.put_settings(TOPIC, change)
            for f in ("max_claimed", "max_attempts"):
                v = getattr(change, f)
                if v is None:
                    model.settings.pop(f, None)
                elif isinstance(v, int):
                    model.settings[f] = v
        elif op == "reload":
            if sweep:
                await eng.committer.sweep(TOPIC)
                await eng.committer.sweep(TOPIC)
            eng = engines[which] = committer(
                stores[which], clocks[which], policy, broker_id=f"b{which}"
            )
            duties[which] = owner_duties(eng, clocks[which])
        if step % check_every == 0:
            await compare(f"step {step}", which)
    await compare("end", 0)
    await drain()
    await compare("drained", 0)


@pytest.mark.parametrize("seed", range(40 if LONG else 4))
async def test_model_based_engine_matches_reference(seed: int) -> None:
    await run_model(seed, 1000)


@pytest.mark.parametrize("seed", range(20 if LONG else 2))
async def test_model_based_with_retention_and_sweeps(seed: int) -> None:
    await run_model(100 + seed, 1000, retention=20.0, sweep=True)


@pytest.mark.parametrize("seed", range(20 if LONG else 2))
async def test_model_based_two_brokers_and_faults(seed: int) -> None:
    await run_model(200 + seed, 1000, retention=20.0, sweep=True, brokers=2, faults=0.2)


@pytest.mark.parametrize("seed", range(20 if LONG else 2))
async def test_model_based_two_brokers_with_skewed_clocks(seed: int) -> None:
    """One broker's clock 1.5 s behind the store's, the other's 2 s ahead,
    each told it may be off by 2 and 2.5 s (StoreClock.error)."""
    await run_model(
        300 + seed,
        1000,
        retention=20.0,
        sweep=True,
        brokers=2,
        faults=0.2,
        skews=((-1.5, 2.0), (2.0, 2.5)),
    )
