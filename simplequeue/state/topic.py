"""The topic state machine: the rules of a queue (SPEC section 3) as pure
functions over a topic's state. No I/O, ever.

TopicState extends Layout (simplequeue.state.layout), which keeps where
everything is: lanes of pending jobs (inline, then runs of segments, each
sorted by (run_at, seq)), the leases of claimed jobs, retained records and dead
jobs, all chains that spill out of the head. This module says what enqueue,
claim, ack, nack, heartbeat, reap, requeue and purge do to them, and answers
counts and lookups. The group committer applies a batch's mutations, then
`seal()`; a batch that finds an object missing (SegmentMissing) or loses its
write is rolled back or thrown away, and applied again.
"""

from __future__ import annotations

import bisect
import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

from simplequeue.api import FollowUpSpec, JobSpec
from simplequeue.errors import InvalidRequest, JobNotFound, LeaseLost
from simplequeue.state.chain import Chain, Place
from simplequeue.state.layout import (
    CLAIM_FIELDS,
    Job,
    Layout,
    Record,
    Sealed,
    decode_head,
    job_key,
    new_head,
)
from simplequeue.state.limits import Bounds, Policy
from simplequeue.state.segments import Manifest, Segment, SegmentView

__all__ = ["Job", "Record", "Sealed", "TopicState", "decode_head", "new_head"]

_CLAIM_FIELDS = frozenset(CLAIM_FIELDS)


class TopicState(Layout):
    """The queue's rules over a topic's Layout.

    Every public method is one mutation or query. Arguments arrive validated
    (simplequeue.api); a mutation that raises one of our errors has changed
    nothing.
    """

    def __init__(
        self,
        head: dict[str, Any],
        view: SegmentView,
        bounds: Bounds,
        policy: Policy,
        seen: dict[str, Segment | Manifest] | None = None,
    ) -> None:
        super().__init__(head, view, bounds, seen)
        self.policy = policy

    # --- reading ---------------------------------------------------------------------

    def pending_jobs(self) -> Iterator[Job]:
        for lane in self.head["lanes"].values():
            yield from lane["in"]
            for run in self._runs(lane):
                for place in run.places():
                    yield place.item

    def oldest_due_created(self, now: float, scan: int) -> float | None:
        """The enqueue time of the oldest due pending job, looking at no more
        than `scan` due jobs at the front of each run (runs are sorted by
        run_at, so due jobs are a prefix; a re-queued job may be older than
        its place)."""
        oldest: float | None = None

        def look(jobs: Iterator[Job] | list[Job]) -> None:
            nonlocal oldest
            for n, job in enumerate(jobs):
                if n >= scan or job["run_at"] > now:
                    break
                if oldest is None or job["created_at"] < oldest:
                    oldest = job["created_at"]

        for lane in self.head["lanes"].values():
            look(lane["in"])
            for run in self._runs(lane):
                look(p.item for p in run.places())
        return oldest

    def claimed_soonest(self, n: int) -> list[Job]:
        """The `n` claimed jobs whose leases run out first, with their payloads."""
        return [self._with_payload(r) for r in self.soonest_leases(n)]

    def _with_payload(self, record: Job) -> Job:
        job = {k: v for k, v in record.items() if k != "src"}
        job["payload"] = self._payload(record)
        return job

    def claimed_count(self) -> int:
        return self.leases.count

    def dead_newest(self, n: int) -> list[Job]:
        """The `n` jobs that died last, newest first."""
        return self.dead_jobs()[-n:][::-1] if n else []

    def dead_jobs(self) -> list[Job]:
        return [p.item for p in self.dead.places()]

    def counts(self, now: float) -> dict[str, int]:
        """Jobs by status (api.Counts); the counts never overlap."""
        pending = delayed = 0
        for lane in self.head["lanes"].values():
            inline = lane["in"]
            due = bisect.bisect_right(inline, now, key=lambda j: j["run_at"])
            pending += due
            delayed += len(inline) - due
            for run in self._runs(lane):
                due = self._due_in_run(run, now)
                pending += due
                delayed += run.count - due
        c = self.head["counters"]
        claimed, dead = self.leases.count, self.dead.count
        return {
            "pending": pending,
            "delayed": delayed,
            "claimed": claimed,
            "completed": c["completed"],
            "dead": dead,
            "enqueued": c["enqueued"],
            "total": pending + delayed + claimed + c["completed"] + dead,
        }

    def _due_in_run(self, run: Chain, now: float) -> int:
        """Live jobs of a run due by `now`. Refs carry their jobs' run_at bounds,
        so only a segment that straddles `now` is read."""
        if run.d.get("lo", -1e300) > now:
            return 0
        if run.d.get("top", 1e300) <= now:
            return run.count
        due = 0
        for ref, _, start in run.units():
            if ref.get("hi", 1e300) <= now:
                due += ref["n"] - start - len([h for h in run.holes_of(ref) if h >= start])
                continue
            if ref.get("lo", -1e300) > now:
                break
            holes = run.holes_of(ref)
            items = run.segment(ref["k"]).items
            due += sum(
                1 for i in range(start, ref["n"]) if i not in holes and items[i]["run_at"] <= now
            )
        return due

    def totals(self) -> dict[str, int]:
        """What the topic ever did: jobs enqueued, completed, nacked, gone dead,
        dead jobs dropped over the dead limit, and follow-ups delivered into
        other topics."""
        c = self.head["counters"]
        names = ("enqueued", "completed", "nacked", "dead", "dead_dropped", "delivered")
        return {name: c.get(name, 0) for name in names}

    def dead_count(self) -> int:
        return self.dead.count

    def find(self, job_id: str) -> tuple[str, Job | Record] | None:
        """(status, job or retained record) for `job_id`, or None."""
        lease = self._lease_of(job_id)
        if lease is not None:
            return "claimed", self._with_payload(lease.item)
        for lane in self.head["lanes"].values():
            for job in lane["in"]:
                if job["id"] == job_id:
                    return "pending", job
            for run in self._runs(lane):
                places = run.locate(job_id)
                if places:
                    return "pending", places[0].item
        places = self.dead.locate(job_id)
        if places:
            return "dead", places[-1].item
        places = self.retained.locate(job_id)
        if places:
            record = places[-1].item
            return record["status"], record
        return None

    def exists(self, job_id: str) -> bool:
        """Whether the topic holds `job_id`, live or retained (duplicate detection:
        inline lists through a set, the rest through find())."""
        if self._inline_ids is None:
            h = self.head
            ids = {j["id"] for lane in h["lanes"].values() for j in lane["in"]}
            ids.update(j["id"] for j in h["dead"]["in"])
            ids.update(r["id"] for r in h["retained"]["in"])
            self._inline_ids = ids
        return job_id in self._inline_ids or self.find(job_id) is not None

    def _noted(self, job_id: str) -> None:
        """An id went into one of the head's inline lists."""
        if self._inline_ids is not None:
            self._inline_ids.add(job_id)

    # --- enqueue -----------------------------------------------------------------------

    def enqueue(self, specs: list[JobSpec], now: float) -> list[dict[str, Any]]:
        """Add jobs; answer {"id", "duplicate"} for each. Duplicates (an id live or
        retained in the topic, or twice in this call) are not added again. A
        topic holds jobs of at most `lanes_max` distinct priorities at once
        (each is a lane in the head): past it the call is refused whole."""
        lanes = self.head["lanes"]
        fresh = {s.priority for s in specs if str(s.priority) not in lanes}
        if fresh and len(lanes) + len(fresh) > self.bounds.lanes_max:
            raise InvalidRequest(
                f"topic {self.topic!r} would hold jobs of more than {self.bounds.lanes_max} "
                "distinct priorities at once"
            )
        answers: list[dict[str, Any]] = []
        for spec in specs:
            job_id = spec.id
            if job_id is not None and self.exists(job_id):
                answers.append({"id": job_id, "duplicate": True})
                continue
            seq = self.head["seq"]
            self.head["seq"] = seq + 1
            if job_id is None:
                job_id = uuid.uuid4().hex
            max_attempts = spec.max_attempts
            job: Job = {
                "id": job_id,
                "seq": seq,
                "payload": spec.payload,
                "priority": spec.priority,
                "run_at": now + spec.delay,
                "created_at": now,
                "attempts": 0,
                "max_attempts": self.policy.max_attempts if max_attempts is None else max_attempts,
                # no "last_error" until there is one: 19 bytes a job, head and segments
            }
            self._push_pending(job)
            self.head["counters"]["enqueued"] += 1
            answers.append({"id": job_id, "duplicate": False})
        return answers

    def _push_pending(self, job: Job) -> None:
        self.dirty = True
        self._noted(job["id"])
        lanes = self.head["lanes"]
        lane = lanes.get(str(job["priority"]))
        if lane is None:
            lane = lanes[str(job["priority"])] = {"in": [], "runs": []}
        inline: list[Job] = lane["in"]
        if not inline or job_key(inline[-1]) <= job_key(job):
            inline.append(job)
        else:
            bisect.insort(inline, job, key=job_key)

    # --- claim -------------------------------------------------------------------------

    def claim(self, worker_id: str, lease: float | None, count: int, now: float) -> list[Job]:
        """Claim up to `count` due jobs, highest priority then earliest run_at, for
        `lease` seconds (None: the policy's default). The answers carry payloads."""
        lease = self.policy.default_lease if lease is None else lease
        claimed: list[Job] = []
        lanes = sorted(self.head["lanes"].items(), key=lambda kv: -int(kv[0]))
        for name, lane in lanes:
            while len(claimed) < count:
                taken = self._take_front(lane, now)
                if taken is None:
                    break
                job, src = taken
                record = {k: v for k, v in job.items() if k != "payload"}
                if src is None:
                    record["payload"] = job["payload"]  # it moves with the claim
                else:
                    record["src"] = src
                record.update(
                    attempts=job["attempts"] + 1,
                    claimed_by=worker_id,
                    claimed_at=now,
                    heartbeat_at=now,
                    lease_expires_at=now + lease,
                    lease_token=uuid.uuid4().hex,
                )
                self._add_lease(record)
                claimed.append({**record, "payload": job["payload"]} if src else dict(record))
                self.dirty = True
            if not lane["in"] and not lane["runs"]:
                del self.head["lanes"][name]
        for job in claimed:
            job.pop("src", None)
        return claimed

    def _take_front(self, lane: dict[str, Any], now: float) -> tuple[Job, list[Any] | None] | None:
        """The lane's earliest due job, taken out: (job, where its payload stays:
        [segment id, index], or None when the job came from the head)."""
        best: tuple[float, int] | None = None
        best_run: Chain | None = None
        for run in self._runs(lane):
            place = run.first()
            if place is None:
                continue
            key = job_key(place.item)
            if key[0] <= now and (best is None or key < best):
                best, best_run = key, run
        inline: list[Job] = lane["in"]
        if inline and inline[0]["run_at"] <= now and (best is None or job_key(inline[0]) < best):
            return inline.pop(0), None
        if best_run is None:
            return None
        place = best_run.first()
        assert place is not None and place.seg is not None
        best_run.pop_front()
        if best_run.count == 0:
            lane["runs"].remove(best_run.d)
        return place.item, [place.seg, place.index]

    def pop(self, worker_id: str, count: int, now: float) -> list[Job]:
        """Claim and complete up to `count` jobs at once (Redis LPOP semantics):
        whoever pops a job has done it, and nobody else will see it again."""
        jobs = self.claim(worker_id, None, count, now)
        for job in jobs:
            self.ack(job["id"], job["lease_token"], None, now)
        return jobs

    # --- settle: ack, nack, heartbeat ------------------------------------------------------

    def _holder(self, job_id: str, token: str | None) -> Place:
        """The claimed job `job_id`'s record, if the caller (with `token`, if
        given) holds it."""
        place = self._lease_of(job_id)
        if place is None:
            if self.find(job_id) is None:
                raise JobNotFound(f"no job {job_id!r} in topic {self.topic!r}")
            raise LeaseLost(f"job {job_id!r} is not claimed")
        if token is not None and token != place.item["lease_token"]:
            raise LeaseLost(f"job {job_id!r} is claimed under another lease")
        return place

    def ack(
        self,
        job_id: str,
        token: str | None,
        result: Any,
        now: float,
        enqueue: list[FollowUpSpec] | None = None,
    ) -> dict[str, Any]:
        """Complete a claimed job, and with the same commit enqueue its follow-up
        jobs (SPEC 9): those for this topic into it, those for other topics
        into the outbox, from which this topic's owner delivers them. An ack
        that fails (not the holder) records nothing."""
        place = self._holder(job_id, token)
        here: list[JobSpec] = []
        elsewhere: list[dict[str, Any]] = []
        for i, spec in enumerate(enqueue or ()):
            follow_id = spec.id if spec.id is not None else follow_up_id(job_id, i)
            if spec.topic is None or spec.topic == self.topic:
                here.append(
                    JobSpec(spec.payload, follow_id, spec.priority, spec.delay, spec.max_attempts)
                )
            else:
                elsewhere.append(_follow_up(spec, follow_id, now))
        if here:
            self.enqueue(here, now)  # raises before it changes anything
        self.dirty = True
        self._drop_lease(place)
        self.head["counters"]["completed"] += 1
        self._retain(place.item, "completed", now, result=result)
        for item in elsewhere:
            self.outbox.append(item)
        answer: dict[str, Any] = {"id": job_id, "status": "completed"}
        if enqueue:
            answer["enqueued"] = [s.id for s in here] + [f["id"] for f in elsewhere]
        return answer

    def nack(
        self, job_id: str, token: str | None, delay: float, error: str | None, now: float
    ) -> dict[str, Any]:
        """Back to pending after `delay` seconds, or dead when its attempts are spent."""
        place = self._holder(job_id, token)
        job = self._with_payload(place.item)  # before anything changes: may need a segment
        self._drop_lease(place)
        counters = self.head["counters"]
        counters["nacked"] = counters.get("nacked", 0) + 1
        status = self._release(job, now + delay, error, now)
        return {"id": job_id, "status": status}

    def heartbeat(
        self, job_id: str, token: str | None, lease: float | None, now: float
    ) -> dict[str, Any]:
        """Extend the lease by `lease` seconds, or by the claim's own lease."""
        place = self._holder(job_id, token)
        record = place.item
        own = record["lease_expires_at"] - record["heartbeat_at"]
        lease_s = own if lease is None else lease
        self.dirty = True
        if place.seg is not None:  # spilled: a fresh inline record takes its place
            self._drop_lease(place)
            record = dict(record)
            self._add_lease(record)
        record["heartbeat_at"] = now
        record["lease_expires_at"] = now + lease_s
        return {"id": job_id, "lease_expires_at": record["lease_expires_at"]}

    def _release(self, job: Job, run_at: float, error: str | None, now: float) -> str:
        """Back to pending at `run_at`, or dead when its attempts are spent."""
        job = {k: v for k, v in job.items() if k not in _CLAIM_FIELDS}
        if error is not None:
            job["last_error"] = error
        if job["max_attempts"] and job["attempts"] >= job["max_attempts"]:
            self.dirty = True
            job["died_at"] = now
            self.dead.append(job)
            self._noted(job["id"])
            self.head["counters"]["dead"] += 1
            self._enforce_dead_limit()
            return "dead"
        job["run_at"] = run_at
        self._push_pending(job)
        return "pending"

    def unclaim(self, job_id: str, token: str, now: float) -> bool:
        """Give back a claim whose caller went away before it was answered: the
        job is pending again at once and the attempt does not count."""
        place = self._lease_of(job_id)
        if place is None or place.item["lease_token"] != token:
            return False
        job = self._with_payload(place.item)
        self._drop_lease(place)
        job = {k: v for k, v in job.items() if k not in _CLAIM_FIELDS}
        job["attempts"] -= 1
        job["run_at"] = min(job["run_at"], now)
        self._push_pending(job)
        return True

    # --- reaper -------------------------------------------------------------------------

    def expired(self, now: float) -> bool:
        """Whether a lease ran out by `now` (reads what next_expiry() says may)."""
        return bool(self.due_leases(now))

    def next_due(self) -> float | None:
        """When the topic next wants its owner: no lease runs out before this,
        and follow-ups wait for delivery since then (None: nothing to do until
        something changes). From the head, and the outbox's front segment."""
        times = [t for t in (self.next_expiry(), self.outbox_oldest()) if t is not None]
        return min(times, default=None)

    def tend(self, now: float) -> dict[str, int]:
        """What the topic's owner does when next_due() comes: expired leases
        back to pending (or dead). What it did, by kind."""
        return self.reap(now)

    def reap(self, now: float) -> dict[str, int]:
        """Expired leases back to pending, or dead when attempts are spent."""
        out = {"pending": 0, "dead": 0}
        expired = self.due_leases(now, taking=True)
        jobs = [self._with_payload(p.item) for p in expired]  # reads before it changes
        for place, job in zip(expired, jobs, strict=True):
            self._drop_lease(place)
            out[self._release(job, now, job.get("last_error") or "lease expired", now)] += 1
        return out

    # --- the outbox: follow-ups for other topics -------------------------------------------

    def outbox_front(self, n: int) -> list[dict[str, Any]]:
        """The first `n` follow-ups waiting for delivery, oldest first."""
        front: list[dict[str, Any]] = []
        for place in self.outbox.places():
            if len(front) >= n:
                break
            front.append(place.item)
        return front

    def outbox_delivered(self, ids: list[str]) -> int:
        """Follow-ups enqueued in their topics leave the outbox; how many did
        (one delivered twice, or already gone, is not counted again)."""
        wanted = set(ids)
        places = []
        for place in self.outbox.places():
            if not wanted:
                break
            if place.item["id"] in wanted:
                wanted.discard(place.item["id"])
                places.append(place)
        for place in places:
            self.outbox.remove(place)
        counters = self.head["counters"]
        counters["delivered"] = counters.get("delivered", 0) + len(places)
        self.dirty = self.dirty or bool(places)
        return len(places)

    def outbox_size(self) -> int:
        return self.outbox.count

    def outbox_oldest(self) -> float | None:
        """When the oldest follow-up waiting for delivery was recorded."""
        place = self.outbox.first() if self.outbox.count else None
        return None if place is None else float(place.item["at"])

    # --- dead letters ----------------------------------------------------------------------

    def requeue(self, job_ids: list[str] | None, now: float) -> list[str]:
        """Dead jobs (all, or those named) back to pending with fresh attempts."""
        return [job["id"] for job in self._take_dead(job_ids, now, requeue=True)]

    def purge(self, job_ids: list[str] | None, now: float) -> list[str]:
        """Forget dead jobs (all, or those named)."""
        return [job["id"] for job in self._take_dead(job_ids, now, requeue=False)]

    def _take_dead(self, job_ids: list[str] | None, now: float, requeue: bool) -> list[Job]:
        dead = self.dead
        if job_ids is None:
            places = list(dead.places())
        else:
            places = [p for job_id in dict.fromkeys(job_ids) for p in dead.locate(job_id)]
        # The others keep their order (death order): taking leaves holes.
        for place in places:
            dead.remove(place)
        self.dirty = self.dirty or bool(places)
        self._inline_ids = None
        taken = [p.item for p in places]
        for job in taken:
            if requeue:
                fresh = {k: v for k, v in job.items() if k != "died_at"}
                fresh.update(attempts=0, run_at=now)
                self._push_pending(fresh)
            else:  # its record stays for lookups and duplicate detection
                self._retain(job, "dead", now)
        return taken

    def _enforce_dead_limit(self) -> None:
        dead = self.dead
        while dead.count > self.policy.dead_limit:
            dead.pop_front()
            self.head["counters"]["dead_dropped"] += 1
            self._inline_ids = None

    # --- retention --------------------------------------------------------------------------

    def _retain(self, job: Job, status: str, now: float, result: Any = None) -> None:
        """Keep a finished job's record (for lookups and duplicates)."""
        self._noted(job["id"])
        record: Record = {
            "id": job["id"],
            "status": status,
            "attempts": job["attempts"],
            "created_at": job["created_at"],
            "finished_at": now,
        }
        # Most jobs end with neither: a record without them spills less often
        # (the API shows them as null either way).
        if result is not None:
            record["result"] = result
        if job.get("last_error") is not None:
            record["last_error"] = job["last_error"]
        self.retained.append(record)

    def _expire_retained(self, now: float) -> None:
        horizon = now - self.policy.retention
        retained = self.retained
        retained.drop_front_while(lambda ref: ref.get("hi", 1e300) < horizon)
        spilled = retained.d["segs"] or retained.d["mans"]
        if not spilled and retained.take_inline_while(lambda r: r["finished_at"] < horizon):
            self._inline_ids = None

    def expire(self, now: float) -> None:
        self._expire_retained(now)


def follow_up_id(job_id: str, index: int) -> str:
    """The id of an acked job's follow-up number `index` that has none of its
    own: `<job id>:<index>` (a long id by its hash, so that the result stays a
    valid id), the same however often it is delivered."""
    if len(job_id) > 200:
        job_id = hashlib.blake2b(job_id.encode(), digest_size=16).hexdigest()
    return f"{job_id}:{index}"


def _follow_up(spec: FollowUpSpec, follow_id: str, now: float) -> dict[str, Any]:
    """A follow-up for another topic, as the outbox keeps it (schema.FollowUp)."""
    item: dict[str, Any] = {
        "id": follow_id,
        "topic": spec.topic,
        "payload": spec.payload,
        "at": now,
    }
    if spec.priority:
        item["priority"] = spec.priority
    if spec.delay:
        item["delay"] = spec.delay
    if spec.max_attempts is not None:
        item["max_attempts"] = spec.max_attempts
    return item
