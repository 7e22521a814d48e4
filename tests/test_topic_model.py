"""TopicState against a plain model of SPEC 3 and 10 (round 35's review of the
storage engine): every claim and pop must take exactly the jobs the model says
(highest priority, then earliest run_at, then seq), every duplicate answer
must be exact for ids retained within --retention, and counts, lookups and
the dead queue must agree with the model, through seals (spills, folds,
manifests, run merges, lease compaction), re-reads and a forgetful cache."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from simplequeue import keys
from simplequeue.api import JobSpec
from simplequeue.errors import JobCancelled, JobNotFound, LeaseLost
from simplequeue.state import IdFilter, SegmentMissing, TopicState, decode_head
from tests.helpers.states import WRITER, fresh
from tests.test_topic_properties import Forgetful, applied_forgetting

T = TypeVar("T")
POOL = [f"k{i}" for i in range(40)]
RETENTION = 40.0
DEAD_LIMIT = 4


class EngineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        base = fresh(
            inline_pending_bytes=300,
            inline_leases_bytes=350,
            inline_records_bytes=250,
            inline_dead_bytes=250,
            inline_outbox_bytes=300,
            segment_bytes=400,
            loose_max=2,
            manifests_max=2,
            manifest_bytes=3000,
            holes_max=3,
            runs_max=2,
            merge_bytes=900,
            retention=RETENTION,
            dead_limit=DEAD_LIMIT,
            max_attempts=2,
        )
        self.view = Forgetful(base.view)  # type: ignore[arg-type]
        self.seen: dict[str, Any] = {}
        self.ids = IdFilter(stale_floor=8)
        self.state = TopicState(base.head, self.view, base.bounds, base.policy, self.seen, self.ids)
        self.now = 1000.0
        self.writes = 0
        # The model.
        self.seq = 0
        self.jobs: dict[str, dict[str, Any]] = {}  # live: pending (incl. delayed) / claimed
        self.dead: list[dict[str, Any]] = []  # oldest first
        self.records: dict[str, dict[str, Any]] = {}  # id -> {status, finished_at, created_at}
        self.c = {"enqueued": 0, "completed": 0, "cancelled": 0}
        self.popped: list[dict[str, Any]] = []  # pops answered, for unpop

    # --- helpers -------------------------------------------------------------------------

    def apply(self, mutation: Callable[[TopicState], T]) -> T:
        return applied_forgetting(self.state, self.view, self.seen, mutation)

    def certain_record(self, job_id: str) -> bool:
        r = self.records.get(job_id)
        return r is not None and r["finished_at"] >= self.now - RETENTION

    def retain(self, job: dict[str, Any], status: str) -> None:
        self.records[job["id"]] = {
            "status": status,
            "finished_at": self.now,
            "created_at": job["created_at"],
        }

    def due_order(self) -> list[dict[str, Any]]:
        due = [j for j in self.jobs.values() if j["state"] == "pending" and j["run_at"] <= self.now]
        return sorted(due, key=lambda j: (-j["priority"], j["run_at"], j["seq"]))

    def to_dead(self, job: dict[str, Any]) -> None:
        del self.jobs[job["id"]]
        job["state"] = "dead"
        self.dead.append(job)

    def enforce_dead_limit(self) -> None:
        while len(self.dead) > DEAD_LIMIT:
            dropped = self.dead.pop(0)
            self.retain(dropped, "dead")

    def release(self, job: dict[str, Any], run_at: float) -> str:
        if job["max_attempts"] and job["attempts"] >= job["max_attempts"]:
            self.to_dead(job)
            self.enforce_dead_limit()
            return "dead"
        job.update(state="pending", run_at=run_at, token=None)
        return "pending"

    # --- rules ---------------------------------------------------------------------------

    @rule(
        ids=st.lists(st.sampled_from(POOL), min_size=1, max_size=8),
        priority=st.integers(-2, 3),
        delay=st.sampled_from([0, 0, 0, 2, 9, 25]),
        pad=st.sampled_from([0, 0, 30, 200]),
    )
    def enqueue(self, ids: list[str], priority: int, delay: int, pad: int) -> None:
        specs = [
            JobSpec({"i": i, "p": "x" * pad}, id=i, priority=priority, delay=delay) for i in ids
        ]
        answers = self.apply(lambda s: s.enqueue(specs, self.now))
        named: set[str] = set()
        for spec, answer in zip(specs, answers, strict=True):
            job_id = spec.id
            assert job_id is not None
            if job_id in named:
                assert answer["duplicate"], job_id
                continue
            named.add(job_id)
            live = job_id in self.jobs or any(d["id"] == job_id for d in self.dead)
            if live or self.certain_record(job_id):
                assert answer["duplicate"], (job_id, "live" if live else self.records[job_id])
                continue
            if job_id in self.records and answer["duplicate"]:
                continue  # a record past retention the engine still keeps
            assert not answer["duplicate"], (job_id, self.records.get(job_id))
            self.records.pop(job_id, None)
            self.jobs[job_id] = {
                "id": job_id,
                "seq": self.seq,
                "priority": priority,
                "run_at": self.now + delay,
                "created_at": self.now,
                "attempts": 0,
                "max_attempts": 2,
                "state": "pending",
                "token": None,
            }
            self.seq += 1
            self.c["enqueued"] += 1

    @rule(count=st.integers(1, 5), pop=st.booleans())
    def claim(self, count: int, pop: bool) -> None:
        want = [j["id"] for j in self.due_order()[:count]]
        if pop:
            got = self.apply(lambda s: s.pop("w", count, self.now))
        else:
            got = self.apply(lambda s: s.claim("w", 10, count, self.now))
        assert [j["id"] for j in got] == want
        for answer in got:
            job = self.jobs[answer["id"]]
            assert answer["payload"]["i"] == job["id"]
            job["attempts"] += 1
            if pop:
                del self.jobs[job["id"]]
                self.retain(job, "completed")
                self.c["completed"] += 1
                self.popped.append(answer)
            else:
                job.update(state="claimed", token=answer["lease_token"], expires=self.now + 10)

    @precondition(lambda self: self.popped)
    @rule(data=st.data())
    def unpop(self, data: st.DataObject) -> None:
        answer = data.draw(st.sampled_from(self.popped))
        self.popped.remove(answer)
        job_id = answer["id"]
        live = job_id in self.jobs or any(d["id"] == job_id for d in self.dead)
        rec = self.records.get(job_id)
        ours = rec is not None and rec["created_at"] == answer["created_at"]
        if live or (rec is not None and not ours and self.certain_record(job_id)):
            return  # another job has the id: not tested here
        if rec is not None and not ours:
            return  # ambiguous
        done = self.apply(lambda s: s.unpop(answer, self.now))
        assert done
        self.records.pop(job_id, None)
        self.c["completed"] -= 1
        self.jobs[job_id] = {
            "id": job_id,
            "seq": answer["seq"],
            "priority": answer["priority"],
            "run_at": min(answer["run_at"], self.now),
            "created_at": answer["created_at"],
            "attempts": answer["attempts"] - 1,
            "max_attempts": answer["max_attempts"],
            "state": "pending",
            "token": None,
        }

    def _claimed(self) -> list[str]:
        return sorted(j for j, v in self.jobs.items() if v["state"] == "claimed")

    @precondition(lambda self: any(v["state"] == "claimed" for v in self.jobs.values()))
    @rule(data=st.data(), how=st.sampled_from(["ack", "nack", "nack3", "hb", "unclaim"]))
    def settle(self, data: st.DataObject, how: str) -> None:
        job_id = data.draw(st.sampled_from(self._claimed()))
        job = self.jobs[job_id]
        token = job["token"]
        if how == "ack":
            self.apply(lambda s: s.ack(job_id, token, None, self.now))
            del self.jobs[job_id]
            self.retain(job, "completed")
            self.c["completed"] += 1
        elif how in ("nack", "nack3"):
            delay = 0 if how == "nack" else 3
            answer = self.apply(lambda s: s.nack(job_id, token, delay, "e", self.now))
            status = self.release(job, self.now + delay)
            assert answer["status"] == ("delayed" if status == "pending" and delay else status)
        elif how == "hb":
            self.apply(lambda s: s.heartbeat(job_id, token, 10, self.now))
            job["expires"] = self.now + 10
        else:
            assert self.apply(lambda s: s.unclaim(job_id, token, self.now))
            job["attempts"] -= 1
            job.update(state="pending", token=None, run_at=min(job["run_at"], self.now))

    @rule(ids=st.lists(st.sampled_from(POOL), min_size=1, max_size=3))
    def cancel(self, ids: list[str]) -> None:
        answer = self.apply(lambda s: s.cancel(ids, self.now))
        want = [i for i in dict.fromkeys(ids) if i in self.jobs]
        assert answer["cancelled"] == want
        for job_id in want:
            job = self.jobs.pop(job_id)
            self.retain(job, "cancelled")
            self.c["cancelled"] += 1

    @rule(data=st.data(), requeue=st.booleans(), every=st.booleans())
    def dead_letters(self, data: st.DataObject, requeue: bool, every: bool) -> None:
        ids = None if every else data.draw(st.lists(st.sampled_from(POOL), max_size=3))
        if requeue:
            got = self.apply(lambda s: s.requeue(ids, self.now))
        else:
            got = self.apply(lambda s: s.purge(ids, self.now))
        taken = [d for d in self.dead if ids is None or d["id"] in ids]
        if requeue or ids is None:
            assert sorted(got) == sorted(d["id"] for d in taken)
        for d in taken:
            self.dead.remove(d)
            if requeue:
                d.update(state="pending", attempts=0, run_at=self.now, token=None)
                self.jobs[d["id"]] = d
            else:
                self.retain(d, "dead")

    @rule(seconds=st.sampled_from([0.5, 1, 3, 11, 30]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        while True:
            part = self.apply(lambda s: s.reap(self.now))
            if part["pending"] + part["dead"] == 0:
                break
            after = [d["id"] for d in self.state.dead_jobs()]
            reaped = [
                j
                for j in self.jobs.values()
                if j["state"] == "claimed" and j["expires"] <= self.now
            ]
            # The engine reaps a part: which ones, it says (those no longer claimed).
            still = set(j["id"] for j in self.state.claimed_soonest(10**6))
            reaped = [j for j in reaped if j["id"] not in still]
            assert len(reaped) == part["pending"] + part["dead"]
            # Dead ones in the engine's order (the dead limit drops the oldest).
            order = {i: n for n, i in enumerate(after)}
            reaped.sort(key=lambda j: order.get(j["id"], -1))
            for job in reaped:
                self.release(job, self.now)
        for job in self.jobs.values():
            if job["state"] == "claimed":
                assert job["expires"] > self.now

    @rule(reread=st.booleans())
    def seal(self, reread: bool) -> None:
        self.writes += 1
        sealed = self.apply(lambda s: s.seal(WRITER, f"{self.writes:012d}", self.now))
        for key in sealed.new_objects:
            self.view.inner.add(sealed.decoded[key])
        self.view.granted.clear()
        if reread:
            head = decode_head("t", keys.head("t"), sealed.head)
            self.state = TopicState(
                head, self.view, self.state.bounds, self.state.policy, self.seen, self.ids
            )

    @rule()
    def new_filter(self) -> None:
        self.ids = IdFilter(stale_floor=8)
        self.state.ids = self.ids

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def counts_agree(self) -> None:
        c = self.state.counts(self.now)
        pending = sum(
            1 for j in self.jobs.values() if j["state"] == "pending" and j["run_at"] <= self.now
        )
        delayed = sum(
            1 for j in self.jobs.values() if j["state"] == "pending" and j["run_at"] > self.now
        )
        claimed = sum(1 for j in self.jobs.values() if j["state"] == "claimed")
        got = {k: c[k] for k in ("pending", "delayed", "claimed", "dead", "completed", "cancelled")}
        assert got == {
            "pending": pending,
            "delayed": delayed,
            "claimed": claimed,
            "dead": len(self.dead),
            "completed": self.c["completed"],
            "cancelled": self.c["cancelled"],
        }
        assert c["enqueued"] == self.c["enqueued"]

    @invariant()
    def places_agree(self) -> None:
        s = self.state
        pending = sorted(j["id"] for j in s.pending_jobs())
        claimed = sorted(j["id"] for j in s.claimed_soonest(10**6))
        dead = [j["id"] for j in s.dead_jobs()]
        assert pending == sorted(j for j, v in self.jobs.items() if v["state"] == "pending")
        assert claimed == self._claimed()
        assert dead == [d["id"] for d in self.dead]

    @invariant()
    def lookups_agree(self) -> None:
        for job_id in POOL:
            found = self.state.find(job_id)
            exists = self.state.exists(job_id)
            if job_id in self.jobs:
                want = self.jobs[job_id]["state"]
                assert found is not None and found[0] == want, (job_id, found)
                assert exists
            elif any(d["id"] == job_id for d in self.dead):
                assert found is not None and found[0] == "dead"
                assert exists
            elif self.certain_record(job_id):
                assert found is not None and found[0] == self.records[job_id]["status"], (
                    job_id,
                    found,
                    self.records[job_id],
                )
                assert exists
            elif job_id not in self.records:
                assert found is None and not exists, (job_id, found)

    @invariant()
    def stale_tokens_fail(self) -> None:
        for job_id in POOL:
            if job_id in self.jobs and self.jobs[job_id]["state"] == "claimed":
                continue
            before = orjson.dumps(self.state.head)
            try:
                self.state.heartbeat(job_id, "nope", 5, self.now)
            except (LeaseLost, JobNotFound, JobCancelled, SegmentMissing):
                pass
            else:
                raise AssertionError(f"{job_id} heartbeated while not claimed")
            self.state.rollback(orjson.loads(before))


LONG = os.environ.get("SIMPLEQUEUE_LONG") == "1"
EngineModel.TestCase.settings = settings(
    max_examples=1000 if LONG else 60,
    stateful_step_count=120 if LONG else 60,
    deadline=None,
)
test_topic_state_against_a_model = EngineModel.TestCase
