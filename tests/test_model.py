"""A model-based (differential) test of the Engine against an in-memory
reference model of SPEC sections 3, 10 and 12 (written by round 22's review of
the state machine and the committer): random operations on both, with tiny
bounds (spills, manifests, holes, compaction, many segments), reloads from the
store, and injected store faults; every answer, count, dead list and job
lookup compared after each step."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from simplequeue.api import AckRequest, FollowUpSpec, JobSpec, SettingsRequest
from simplequeue.broker.engine import Engine
from simplequeue.errors import (
    JobCancelled,
    JobNotFound,
    LeaseLost,
    RefusedByTopic,
    SimpleQueueError,
)
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore.memfs import MemStore
from simplequeue.state import Bounds, Policy
from tests.helpers.faults import FaultyStore

LONG = os.environ.get("SIMPLEQUEUE_LONG") == "1"  # bin/test --long: ten times the seeds
T0 = 1_000_000.0
TOPIC = "t"

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


def committer(
    store: Any, clock: Clock, policy: Policy, bounds: Bounds = SMALL, broker_id: str = "b"
) -> Engine:
    settings = CommitSettings(
        bounds=bounds, policy=policy, linger=0.0, linger_max=0.0, backoff_min=0.0, backoff_max=0.0
    )
    return Engine(GroupCommitter(store, broker_id=broker_id, settings=settings, clock=clock))


# --- the reference model ------------------------------------------------------------------


class Model:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.live: dict[str, dict[str, Any]] = {}  # pending/delayed/claimed
        self.dead: list[dict[str, Any]] = []
        self.records: dict[str, dict[str, Any]] = {}  # finished: status, result, attempts
        self.seq = 0
        self.counters = {"enqueued": 0, "completed": 0, "cancelled": 0, "dead_dropped": 0}
        self.settings: dict[str, Any] = {}

    now = T0

    def expired(self, job_id: str) -> bool:
        """A record past retention: the engine may or may not still hold it."""
        r = self.records.get(job_id)
        return r is not None and r["finished_at"] < self.now - self.policy.retention

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
                "run_at": now + spec.delay,
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

    def claim(self, count: int, lease: float, now: float) -> list[dict[str, Any]]:
        count = min(count, self.claimable())
        due = [j for j in self.live.values() if j["status"] == "pending" and j["run_at"] <= now]
        due.sort(key=lambda j: (-j["priority"], j["run_at"], j["seq"]))
        got = due[:count]
        for j in got:
            j["status"] = "claimed"
            j["attempts"] += 1
            j["lease_expires_at"] = now + lease
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
    ) -> None:
        j = self.holder(job_id, token)
        if follow:
            del self.live[job_id]
            try:
                self.enqueue(
                    [
                        JobSpec(
                            f.payload,
                            f.id if f.id is not None else f"{job_id}:{i}",
                            f.priority,
                            f.delay,
                            f.max_attempts,
                        )
                        for i, f in enumerate(follow)
                    ],
                    now,
                    told,
                    dry=True,
                )
            finally:
                self.live[job_id] = j
        self.finish(j, "completed", result)
        self.counters["completed"] += 1
        if follow:
            specs = [
                JobSpec(
                    f.payload,
                    f.id if f.id is not None else f"{job_id}:{i}",
                    f.priority,
                    f.delay,
                    f.max_attempts,
                )
                for i, f in enumerate(follow)
            ]
            self.enqueue(specs, now, told)

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

    def heartbeat(self, job_id: str, token: str | None, lease: float, now: float) -> float:
        j = self.holder(job_id, token)
        j["lease_expires_at"] = now + lease
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

    def reap(self, now: float) -> list[dict[str, Any]]:
        """Expired leases; the caller releases them (order decided by the engine)."""
        return [
            j
            for j in self.live.values()
            if j["status"] == "claimed" and j["lease_expires_at"] <= now
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


# --- the differential driver ------------------------------------------------------------------


async def run_model(
    seed: int,
    steps: int,
    check_every: int = 1,
    retention: float = 10**9,
    sweep: bool = False,
    brokers: int = 1,
    faults: float = 0.0,
) -> None:
    rng = random.Random(seed)
    policy = Policy(default_lease=30.0, max_attempts=3, retention=retention, dead_limit=6)
    inner = MemStore()
    clock = Clock()
    stores = [FaultyStore(inner) for _ in range(brokers)]
    engines = [committer(st, clock, policy, broker_id=f"b{k}") for k, st in enumerate(stores)]
    eng = engines[0]
    model = Model(policy)
    held: dict[str, str] = {}  # job id -> lease token (engine's) for claimed jobs
    next_id = 0
    log: list[str] = []

    def some_ids(n: int) -> list[str]:
        pool = list(model.live) + [d["id"] for d in model.dead] + list(model.records)[-20:]
        pool += [f"j{rng.randrange(next_id + 3)}"]
        return [rng.choice(pool) for _ in range(n)] if pool else []

    async def compare(where: str) -> None:
        now = clock.now
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

    async def do_tend() -> None:
        expiring = {j["id"] for j in model.reap(clock.now)}
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
        dying = [
            model.live[i]
            for i in expiring
            if model.live[i]["max_attempts"]
            and model.live[i]["attempts"] >= model.live[i]["max_attempts"]
        ]
        assert out["pending"] + out["dead"] == len(expiring), (out, expiring, log[-8:])
        assert out["dead"] == len(dying), (out, log[-8:])
        if not dying:
            for i in expiring:
                model.release(model.live[i], clock.now, "lease expired", clock.now)
            return
        engine_dead = [d["id"] for d in (await eng.dead(TOPIC))[0]]
        # the order of jobs dying in one reap is the engine's to choose
        order = {i: n for n, i in enumerate(engine_dead)}
        for i in sorted(expiring, key=lambda i: order.get(i, -1)):
            model.release(model.live[i], clock.now, "lease expired", clock.now)
        assert [d["id"] for d in model.dead] == engine_dead, (dead_before, engine_dead, log[-8:])

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
            ],
            [14, 10, 6, 6, 2, 2, 2, 1, 1, 2, 1, 4, 3, 1, 1, 2],
        )[0]
        now = model.now = clock.now
        log.append(f"{step}:{op}")
        which = rng.randrange(brokers)
        eng = engines[which]
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
        elif op in ("claim", "pop"):
            count = rng.choice([1, 1, 3, 10])
            lease = rng.choice([5.0, 10.0, 60.0])
            if op == "claim":
                got = await eng.claim(TOPIC, "w", lease=lease, count=count)
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
                else:
                    model.ack(g["id"], g["lease_token"], None, now)
        elif op in ("ack", "nack", "hb", "release", "complete") and held:
            job_id = rng.choice(sorted(held))
            token = held[job_id]
            if rng.random() < 0.1:
                token = "stale"
            if rng.random() < 0.1:
                token = None
            log[-1] += f" {job_id} {token}"
            try:
                if op == "ack":
                    result = {"r": job_id} if rng.random() < 0.7 else None
                    follow = None
                    if rng.random() < 0.3:
                        follow = [
                            FollowUpSpec(
                                {"f": k},
                                priority=rng.choice([0, 1, 9]),
                                delay=rng.choice([0.0, 2.0]),
                            )
                            for k in range(rng.choice([1, 2]))
                        ]
                    try:
                        await eng.ack(TOPIC, job_id, token, result, follow)
                        got_err = None
                    except SimpleQueueError as e:
                        got_err = type(e)
                    told = []
                    for k in range(len(follow or [])):
                        fid = f"{job_id}:{k}"
                        dup = True
                        if got_err is None and model.exists(fid) is None:
                            dup = (await eng.job(TOPIC, fid))["status"] not in (
                                "pending",
                                "delayed",
                            )
                        told.append({"duplicate": dup})
                    try:
                        model.ack(job_id, token, result, now, follow, told)
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
                elif op == "hb":
                    lease = rng.choice([5.0, 60.0])
                    try:
                        want = model.heartbeat(job_id, token, lease, now)
                    except SimpleQueueError as e:
                        want = type(e)
                    try:
                        got = (await eng.heartbeat(TOPIC, job_id, token, lease))["lease_expires_at"]
                    except SimpleQueueError as e:
                        got = type(e)
                    assert got == want or model.expired(job_id), (got, want, log[-8:])
                elif op == "release":
                    real = held[job_id]
                    n = await eng.release(TOPIC, [{"id": job_id, "lease_token": real}])
                    assert n == int(model.unclaim(job_id, real, now)), log[-8:]
                    held.pop(job_id)
                elif op == "complete":
                    real = held[job_id]
                    done = await eng.complete(TOPIC, [{"id": job_id, "lease_token": real}])
                    assert done == [job_id], log[-8:]
                    model.ack(job_id, real, None, now)
                    held.pop(job_id)
            finally:
                pass
        elif op == "ackmany" and held:
            picks = rng.sample(sorted(held), min(len(held), rng.choice([2, 4])))
            acks = [AckRequest(job_id=i, lease_token=held[i], result=i) for i in picks]
            answers = await eng.ack_many(TOPIC, acks)
            for i, a in zip(picks, answers, strict=True):
                assert a.get("status") == "completed", (a, log[-8:])
                model.ack(i, held.pop(i), i, now)
        elif op == "cancel":
            ids = some_ids(rng.choice([1, 3]))
            if ids:
                got = await eng.cancel(TOPIC, ids)
                want = model.cancel(ids)
                assert got == want, (got, want, log[-8:])
                for i in want["cancelled"]:
                    held.pop(i, None)
        elif op == "requeue" and model.counters["enqueued"]:
            ids = None if rng.random() < 0.4 else some_ids(2)
            got = await eng.requeue(TOPIC, ids)
            want = model.requeue(ids, now)
            assert got == want, (got, want, log[-8:])
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
            await do_tend()
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
            eng = engines[which] = committer(stores[which], clock, policy, broker_id=f"b{which}")
        if step % check_every == 0:
            await compare(f"step {step}")
    await compare("end")


@pytest.mark.parametrize("seed", range(40 if LONG else 4))
async def test_model_based_engine_matches_reference(seed: int) -> None:
    await run_model(seed, 1000)


@pytest.mark.parametrize("seed", range(20 if LONG else 2))
async def test_model_based_with_retention_and_sweeps(seed: int) -> None:
    await run_model(100 + seed, 1000, retention=20.0, sweep=True)


@pytest.mark.parametrize("seed", range(20 if LONG else 2))
async def test_model_based_two_brokers_and_faults(seed: int) -> None:
    await run_model(200 + seed, 1000, retention=20.0, sweep=True, brokers=2, faults=0.2)
