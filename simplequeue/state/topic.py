"""The topic state machine: the rules of a queue (SPEC section 3) as pure
functions over a topic's state. No I/O, ever.

TopicState extends Layout (simplequeue.state.layout), which keeps where
everything is: lanes of pending jobs (inline, then runs of segments, each
sorted by (run_at, seq)), the leases of claimed jobs, retained records and dead
jobs, all chains that spill out of the head. This module says what enqueue,
claim, ack, nack, heartbeat, reap, requeue and purge do to them, and answers
counts and lookups; and what an operator controls (SPEC 10-12): cancelling
jobs, the schedules its owner fires, and the limits every claim obeys. The
group committer applies a batch's mutations, then
`seal()`; a batch that finds an object missing (SegmentMissing) or loses its
write is rolled back or thrown away, and applied again.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import Counter
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from typing import Any

import orjson
from msgspec import UnsetType

from simplequeue import keys
from simplequeue.api import (
    MAX_DELAY,
    RUN_AT_TOO_LATE,
    FollowUpSpec,
    JobSpec,
    ScheduleRequest,
    SettingsRequest,
    new_id,
)
from simplequeue.errors import (
    CorruptData,
    InvalidRequest,
    JobCancelled,
    JobNotFound,
    LeaseLost,
    RefusedByTopic,
    ScheduleNotFound,
)
from simplequeue.state.chain import Chain, Place, locate_first
from simplequeue.state.idfilter import IdFilter
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
from simplequeue.state.segments import Manifest, Segment, SegmentMissing, SegmentView, id_hash
from simplequeue.state.slots import (
    check_definition,
    fired_locally,
    last_local_known,
    latest_at,
    local_time,
    next_unfired,
)

__all__ = ["TOTALS", "Job", "Record", "Sealed", "TopicState", "decode_head", "new_head"]

_CLAIM_FIELDS = frozenset(CLAIM_FIELDS)
# Follow-ups outbox_front() looks through for those of topics it is not told
# to skip: bounds what one delivery round reads behind a topic that does not
# take its follow-ups (a corrupt head).
OUTBOX_SCAN = 50_000
# Outbox segments outbox_after() reads at a time before it weighs what it read
# against its `room`.
OUTBOX_WINDOW_SEGMENTS = 4
# Seconds before a schedule whose slots this broker could not compute (its
# time zone not in this host's tzdata) is tried again.
SCHEDULE_RETRY = 60.0
# What a topic ever did (TopicState.totals), in this order.
TOTALS = (
    "enqueued",
    "completed",
    "nacked",
    "dead",
    "dead_dropped",
    "cancelled",
    "delivered",
    "given_back",
)


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
        ids: IdFilter | None = None,
    ) -> None:
        super().__init__(head, view, bounds, seen)
        self.policy = policy
        _drop_stale_prios(head)
        # Which ids the topic's segments surely lack (exists()' fast "no"); its
        # owner may keep it across the topic's states.
        self.ids = ids if ids is not None else IdFilter()
        # The run_at of the earliest job the last claim() found not due yet.
        self.next_ready: float | None = None
        self._claim_room = bounds.claim_bytes  # see begin()

    @property
    def ids(self) -> IdFilter:
        return self._ids

    @ids.setter
    def ids(self, ids: IdFilter) -> None:
        self._ids = ids
        self._ids_covered = False  # a new filter has covered nothing of this head

    # --- reading ---------------------------------------------------------------------

    def pending_jobs(self) -> Iterator[Job]:
        for lane in self.head["lanes"].values():
            yield from lane["in"]
            for run in self._runs(lane):
                for place in run.places():
                    yield place.item

    def oldest_due_since(self, now: float, scan: int) -> float | None:
        """When the pending job that has waited longest came due: its run_at,
        or its enqueue if later (a job delayed an hour has not waited an hour
        the moment it comes due), looking at no more than `scan` due jobs at
        the front of each run (runs are sorted by run_at, so due jobs are a
        prefix)."""
        oldest: float | None = None

        def look(jobs: Iterator[Job] | list[Job]) -> None:
            nonlocal oldest
            for n, job in enumerate(jobs):
                if n >= scan or job["run_at"] > now:
                    break
                since = max(job["created_at"], job["run_at"])
                if oldest is None or since < oldest:
                    oldest = since

        for lane in self.head["lanes"].values():
            look(lane["in"])
            for run in self._runs(lane):
                look(p.item for p in run.places())
        return oldest

    def claimed_soonest(self, n: int) -> list[Job]:
        """The `n` claimed jobs whose leases run out first, with their payloads."""
        return self.claimed_listing(n)[0]

    def claimed_listing(self, n: int, room: float = math.inf) -> tuple[list[Job], int]:
        """claimed_soonest(n), and the bytes (as stored) of the segments their
        payloads were read from: no more jobs once those come to `room` (the
        leases' own segments are read as ever). The payloads' segments are
        asked for together (one fetch round), as many as `room` holds, and
        nothing else."""
        records = self.soonest_leases(n)
        ahead = self._ahead(len(records), room)
        read: set[str] = set()
        spent = 0
        jobs: list[Job] = []
        for i, record in enumerate(records):
            if "src" in record and record["src"][0] not in read:
                if spent >= room:
                    break
                try:
                    spent += self._source(record).size
                except SegmentMissing as miss:
                    also = self._sources_missing(records[i + 1 :], ahead - 1)
                    raise SegmentMissing(miss.key, also, exact=True) from None
                read.add(record["src"][0])
            jobs.append(self._with_payload(record))
        return jobs, spent

    def _ahead(self, n: int, room: float) -> int:
        """Segments a listing of `n` jobs within `room` bytes asks for in one
        fetch round: as many as `room` holds of the largest a spill writes,
        one at least (all `n` jobs' without a bound)."""
        if math.isinf(room):
            return max(1, n)
        return max(1, min(n, int(room // self.bounds.segment_bytes)))

    def _with_payload(self, record: Job) -> Job:
        job = {k: v for k, v in record.items() if k != "src"}
        job["payload"] = self._payload(record)
        return job

    def claimed_count(self) -> int:
        return self.leases.count

    def dead_newest(self, n: int) -> list[Job]:
        """The `n` jobs that died last, newest first (reading only their segments)."""
        return self.dead_listing(n)[0]

    def dead_listing(self, n: int, room: float = math.inf) -> tuple[list[Job], int]:
        """dead_newest(n), and the bytes (as stored) of the segments read for
        them: no more jobs once those come to `room` (Chain.newest)."""
        places, spent = self.dead.newest(n, room, self._ahead(n, room))
        return [p.item for p in places], spent

    def dead_jobs(self, offset: int = 0, limit: int | None = None) -> list[Job]:
        """Dead jobs in the order they died: all, or up to `limit` from the
        `offset`-th on (reading only the segments those are in)."""
        if limit is None and offset == 0:
            return [p.item for p in self.dead.places()]
        limit = self.dead.count if limit is None else limit
        return [p.item for p in self.dead.window(offset, limit)]

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
        cancelled = c.get("cancelled", 0)
        completed = c["completed"] - c.get("given_back", 0)
        return {
            "pending": pending,
            "delayed": delayed,
            "claimed": claimed,
            "completed": completed,
            "dead": dead,
            "cancelled": cancelled,
            "enqueued": c["enqueued"],
            "total": pending + delayed + claimed + completed + dead + cancelled,
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
            items = run.items(ref)
            due += sum(
                1 for i in range(start, ref["n"]) if i not in holes and items[i]["run_at"] <= now
            )
        return due

    def totals(self) -> dict[str, int]:
        """What the topic ever did: jobs enqueued, completed, nacked, gone dead,
        dead jobs dropped over the dead limit, jobs cancelled, follow-ups
        delivered into other topics, and pops given back (completed, then not:
        their callers left before the answer). Each only ever grows."""
        c = self.head["counters"]
        return {name: c.get(name, 0) for name in TOTALS}

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
        if job_id in self._inline_ids or job_id in self._inline_index():
            return True
        # Runs keep none of theirs in the sets above: their inline items are
        # searched. Segments only if the filter cannot rule them out (a fresh
        # id: it nearly always can); then find() without the inline lists the
        # sets cover.
        h = self.head
        runs = [run for lane in h["lanes"].values() for run in lane["runs"]]
        if any(item["id"] == job_id for run in runs for item in run["in"]):
            return True
        chains = [*runs, h["leases"], h["dead"], h["retained"]]
        if not self._ids_covered:
            self.ids.cover(chains, self.topic, self._view)
            self._ids_covered = True
        if not self.ids.may_hold(id_hash(job_id)):
            return False
        return any(self._chain(d).locate(job_id, inline=False) for d in chains)

    def _noted(self, job_id: str) -> None:
        """An id went into one of the head's inline lists."""
        if self._inline_ids is not None:
            self._inline_ids.add(job_id)

    # --- enqueue -----------------------------------------------------------------------

    def enqueue(self, specs: list[JobSpec], now: float) -> list[dict[str, Any]]:
        """Add jobs; answer {"id", "duplicate"} for each. Duplicates (an id live or
        retained in the topic, or twice in this call) are not added again. A
        topic holds jobs of at most `lanes_max` distinct priorities at once
        (pending, delayed, claimed or dead: each may need a lane in the head
        again): past it the call is refused whole."""
        added: list[bool] = []  # duplicates add nothing, and count for no priority
        named: set[str] = set()
        times = [_comes_due(spec, now) for spec in specs]  # raises before it changes anything
        for spec in specs:
            added.append(spec.id is None or (spec.id not in named and not self.exists(spec.id)))
            if spec.id is not None:
                named.add(spec.id)
        prios = self._prios()
        fresh = {str(s.priority) for s, new in zip(specs, added, strict=True) if new} - prios.keys()
        if fresh and len(prios) + len(fresh) > self.bounds.lanes_max:
            raise RefusedByTopic(
                f"topic {self.topic!r} would hold jobs of more than {self.bounds.lanes_max} "
                "distinct priorities at once"
            )
        answers: list[dict[str, Any]] = []
        for spec, new, at in zip(specs, added, times, strict=True):
            job_id = spec.id
            if not new:
                answers.append({"id": job_id, "duplicate": True})
                continue
            seq = self.head["seq"]
            self.head["seq"] = seq + 1
            if job_id is None:
                job_id = new_id()
            max_attempts = spec.max_attempts
            job: Job = {
                "id": job_id,
                "seq": seq,
                "payload": spec.payload,
                "priority": spec.priority,
                "run_at": at,
                "created_at": now,
                "attempts": 0,
                "max_attempts": self.default_attempts() if max_attempts is None else max_attempts,
                # no "last_error" until there is one: 19 bytes a job, head and segments
            }
            self._push_pending(job)
            self._hold(job)
            self.head["counters"]["enqueued"] += 1
            answers.append({"id": job_id, "duplicate": False})
        return answers

    def begin(self) -> None:
        super().begin()
        # Payload bytes the batch's claims may still take past the first job
        # each takes: shared, so that many claims committed together hold no
        # more than one would (their segments are all read in the batch).
        self._claim_room = self.bounds.claim_bytes

    def rollback(self, head: dict[str, Any]) -> None:
        super().rollback(head)
        _drop_stale_prios(head)  # a head read again, as __init__ reads one
        self._claim_room = self.bounds.claim_bytes  # the batch is applied again

    def _prios(self) -> dict[str, int]:
        """How many jobs of each priority the topic holds (pending, delayed,
        claimed, dead), by priority: what `lanes_max` bounds, so that no job
        coming back (a nack, a reap, a requeue) opens a lane past it. A head
        written before they were kept has them counted here, once (its leases
        and dead jobs read through)."""
        prios: dict[str, int] | None = self.head.get("prios")
        if prios is None:
            counted: Counter[str] = Counter()
            for name, lane in self.head["lanes"].items():
                counted[name] += len(lane["in"]) + sum(run.count for run in self._runs(lane))
            for chain in (self.leases, self.dead):
                counted.update(str(place.item["priority"]) for place in chain.places())
            prios = self.head["prios"] = {name: n for name, n in counted.items() if n > 0}
        return prios

    def _hold(self, job: Job) -> None:
        """A job came into the topic (kept until _let_go())."""
        prios: dict[str, int] | None = self.head.get("prios")
        if prios is not None:  # else counted when next needed
            name = str(job["priority"])
            prios[name] = prios.get(name, 0) + 1

    def _let_go(self, job: Job) -> None:
        """A job the topic held left it (completed, cancelled, purged, dropped)."""
        prios: dict[str, int] | None = self.head.get("prios")
        if prios is not None:
            name = str(job["priority"])
            left = prios.get(name, 0) - 1
            if left > 0:
                prios[name] = left
            else:
                prios.pop(name, None)

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

    def claim(
        self, worker_id: str, lease: float | None, count: int, now: float, ahead: float = 0.0
    ) -> list[Job]:
        """Claim up to `count` due jobs, highest priority then earliest run_at, for
        `lease` seconds (None: the topic's default, else the policy's), within
        the topic's limits (fewer jobs, or none). The answers carry payloads:
        once those of the batch's claims reach `bounds.claim_bytes`, a claim
        takes no more jobs than its first, so that neither the answers nor
        the segments read for them outgrow the broker's memory, whatever
        `count` says.

        The lease counts from `now + ahead` (its heartbeat_at): `now` is an
        estimate of the store's clock that may be `ahead` behind it (below 0:
        `now` is past the latest the store's time may be), and a lease must
        not end early whoever reaps it (see reap()), nor run long."""
        lease = self.default_lease() if lease is None else lease
        start = now + ahead
        count = min(count, self.claimable(now))
        claimed: list[Job] = []
        self.next_ready = None
        if count <= 0:
            return claimed
        lanes = sorted(self.head["lanes"].items(), key=lambda kv: -int(kv[0]))
        for name, lane in lanes:
            while len(claimed) < count and (not claimed or self._claim_room > 0):
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
                    heartbeat_at=start,
                    lease_expires_at=start + lease,
                    lease_token=new_id(),
                )
                self._add_lease(record)
                claimed.append({**record, "payload": job["payload"]} if src else dict(record))
                self.dirty = True
                if len(claimed) < count:  # measured only when another may follow
                    self._claim_room -= len(orjson.dumps(job["payload"]))
            if not lane["in"] and not lane["runs"]:
                del self.head["lanes"][name]
        for job in claimed:
            job.pop("src", None)
        self._spend(len(claimed), now)
        return claimed

    def _take_front(self, lane: dict[str, Any], now: float) -> tuple[Job, list[Any] | None] | None:
        """The lane's earliest due job, taken out: (job, where its payload stays:
        [segment id, index], or None when the job came from the head)."""
        best: tuple[float, int] | None = None
        best_run: Chain | None = None
        best_place: Place | None = None
        for run in self._runs(lane):
            place = run.first()
            if place is None:
                continue
            key = job_key(place.item)
            if key[0] > now:
                self._not_ready(key[0])
            elif best is None or key < best:
                best, best_run, best_place = key, run, place
        inline: list[Job] = lane["in"]
        if inline and inline[0]["run_at"] > now:
            self._not_ready(inline[0]["run_at"])
        elif inline and (best is None or job_key(inline[0]) < best):
            return inline.pop(0), None
        if best_run is None:
            return None
        place = best_place
        assert place is not None and place.seg is not None
        best_run.pop_front(place)
        if best_run.count == 0:
            lane["runs"].remove(best_run.d)
        return place.item, [place.seg, place.index]

    def _not_ready(self, run_at: float) -> None:
        """A lane's front that claim() found not due yet, at `run_at`."""
        if self.next_ready is None or run_at < self.next_ready:
            self.next_ready = run_at

    def pop(self, worker_id: str, count: int, now: float) -> list[Job]:
        """Claim and complete up to `count` jobs at once (Redis LPOP semantics),
        as many as claim() takes (bounded in payload bytes too): whoever pops
        a job has done it, and nobody else will see it again."""
        jobs = self.claim(worker_id, None, count, now)
        for job in jobs:
            self.ack(job["id"], job["lease_token"], None, now)
        return jobs

    def complete_claim(self, job_id: str, token: str, now: float) -> Job | None:
        """Complete a claim as pop() does, answering the job as pop() would
        (for unpop()); None, changing nothing, when `token` does not hold it."""
        place = self._held(job_id, token)
        if place is None:
            return None
        job = self._with_payload(place.item)
        self.ack(job_id, token, None, now)
        return job

    # --- settle: ack, nack, heartbeat ------------------------------------------------------

    def _holder(self, job_id: str, token: str | None) -> Place:
        """The claimed job `job_id`'s record, if the caller (with `token`, if
        given) holds it."""
        place = self._lease_of(job_id)
        if place is None:
            found = self.find(job_id)
            if found is None:
                raise JobNotFound(f"no job {job_id!r} in topic {self.topic!r}")
            if found[0] == "cancelled":
                raise JobCancelled(f"job {job_id!r} was cancelled")
            raise LeaseLost(f"job {job_id!r} is not claimed")
        if token is not None and token != place.item["lease_token"]:
            raise LeaseLost(f"job {job_id!r} is claimed under another lease")
        return place

    def held(self, job_id: str, token: str, now: float) -> Job | None:
        """Job `job_id` as its claim answered it, if it is claimed under `token`
        and its lease has not run out by `now` (a read)."""
        place = self._lease_of(job_id)
        if place is None or place.item["lease_token"] != token:
            return None
        return self._with_payload(place.item) if place.item["lease_expires_at"] > now else None

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
        ids: list[tuple[str, bool]] = []  # in the order given, and whether for this topic
        added: Iterator[dict[str, Any]] = iter(())  # what enqueue() answered those
        for i, spec in enumerate(enqueue or ()):
            follow_id = spec.id if spec.id is not None else follow_up_id(job_id, i)
            local = spec.topic is None or spec.topic == self.topic
            ids.append((follow_id, local))
            if local:
                here.append(
                    JobSpec(
                        spec.payload,
                        follow_id,
                        spec.priority,
                        spec.delay,
                        spec.max_attempts,
                        spec.run_at,
                    )
                )
            else:
                elsewhere.append(_follow_up(spec, follow_id, now))
        if here:
            # The acked job's priority is free for them: the last of it acked
            # with a follow-up of a new one keeps a topic at lanes_max.
            self._prios()  # counted with the acked job, if the head has no counts
            self._let_go(place.item)
            try:
                added = iter(self.enqueue(here, now))  # raises before it changes anything
            except Exception:
                self._hold(place.item)  # nor does the ack
                raise
        else:
            self._let_go(place.item)
        self.dirty = True
        self._drop_lease(place)
        self.head["counters"]["completed"] += 1
        self._retain(place.item, "completed", now, result=result)
        for item in elsewhere:
            self.outbox.append(item)
        answer: dict[str, Any] = {"id": job_id, "status": "completed"}
        if enqueue:
            # A follow-up whose id the topic has (live or retained; the acked
            # job's own, or an earlier one's of this ack) is not enqueued
            # again: the answer says which, by position.
            enqueued: list[str] = []
            duplicates: list[str] = []
            for follow_id, local in ids:
                repeat = local and next(added).get("duplicate", False)
                (duplicates if repeat else enqueued).append(follow_id)
            answer["enqueued"] = enqueued
            if duplicates:
                answer["duplicates"] = duplicates
        return answer

    def nack(
        self, job_id: str, token: str | None, delay: float, error: str | None, now: float
    ) -> dict[str, Any]:
        """Back to pending after `delay` seconds, or dead when its attempts are
        spent; the job's new status (delayed while its delay runs, as a lookup
        and the counts say)."""
        place = self._holder(job_id, token)
        job = self._with_payload(place.item)  # before anything changes: may need a segment
        self._drop_lease(place)
        counters = self.head["counters"]
        counters["nacked"] = counters.get("nacked", 0) + 1
        run_at = now + delay  # a delay below a float's resolution at `now` is none
        status = self._release(job, run_at, error, now)
        if status == "pending" and run_at > now:
            status = "delayed"
        return {"id": job_id, "status": status}

    def heartbeat(
        self,
        job_id: str,
        token: str | None,
        lease: float | None,
        now: float,
        ahead: float = 0.0,
    ) -> dict[str, Any]:
        """Extend the lease by `lease` seconds, or by the claim's own lease,
        counted from `now + ahead` (as claim() does)."""
        place = self._holder(job_id, token)
        record = place.item
        own = record["lease_expires_at"] - record["heartbeat_at"]
        lease_s = own if lease is None else lease
        self.dirty = True
        if place.seg is not None:  # spilled: a fresh inline record takes its place
            self._drop_lease(place)
            record = dict(record)
            self._add_lease(record)
        start = now + ahead
        record["heartbeat_at"] = start
        record["lease_expires_at"] = start + lease_s
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
            self._enforce_dead_limit(now)
            return "dead"
        job["run_at"] = run_at
        self._push_pending(job)
        return "pending"

    def unclaim(self, job_id: str, token: str, now: float) -> bool:
        """Give back a claim whose caller went away before it was answered: the
        job is pending again at once and the attempt does not count."""
        place = self._held(job_id, token)
        if place is None:
            return False
        job = self._with_payload(place.item)
        self._drop_lease(place)
        self._undelivered(job, now)
        self._give_token_back(job["claimed_at"], now)  # nobody had the job
        return True

    def _held(self, job_id: str, token: str) -> Place | None:
        """The lease of `job_id` if `token` holds it, else None (unlike
        _holder(), no error: the caller gives up quietly)."""
        place = self._lease_of(job_id)
        return place if place is not None and place.item["lease_token"] == token else None

    def _undelivered(self, job: Job, now: float) -> None:
        """A job handed to nobody after all, pending again at once: its claim's
        fields gone, the attempt uncounted."""
        job = {k: v for k, v in job.items() if k not in _CLAIM_FIELDS}
        job["attempts"] -= 1
        job["run_at"] = min(job["run_at"], now)
        self._push_pending(job)

    def unpop(self, job: Job, now: float) -> bool:
        """Give back a popped job (as pop() answered it) whose caller went away
        before it was answered: its completion is forgotten (its record, if not
        expired yet, and its count), and it is pending again at once with the
        attempt uncounted. False, changing nothing, when its id stands for
        another job by now (the record expired, and a new job took the id)."""
        job_id = job["id"]
        records = [
            p
            for p in self.retained.locate(job_id)
            if p.item["status"] == "completed" and p.item["created_at"] == job["created_at"]
        ]
        if records:
            self.retained.remove(records[-1])
        elif self.exists(job_id):
            return False
        # Counted apart: "completed" only ever grows (a Prometheus counter).
        counters = self.head["counters"]
        counters["given_back"] = counters.get("given_back", 0) + 1
        self._hold(job)
        self._undelivered(job, now)
        self._give_token_back(job["claimed_at"], now)
        return True

    # --- reaper -------------------------------------------------------------------------

    def expired(self, now: float) -> bool:
        """Whether a lease ran out by `now` (reads what next_expiry() says may)."""
        return bool(self.due_leases(now))

    def next_due(
        self, now: float = 0.0, ahead: float = 0.0, behind: float = 0.0, outbox: bool = True
    ) -> float | None:
        """When the topic next wants its owner: no lease runs out before this
        (reaped as tend() is, with `behind`), no schedule's slot comes
        before it, and (with `outbox`) follow-ups wait for delivery since then
        (None: nothing to do until something changes). From the head, and the
        outbox's front segment.

        The time is on the clock leases are reaped by, the earliest the
        store's time may be, `now - behind`: `now` is an estimate of the
        store's clock that may be `ahead` behind it and `behind` ahead of it
        (StoreClock.now). After a step back of the store's clock now() stands
        still above the store's time while that clock runs on: a due in
        now()'s terms (a lease's expiry + behind) came the step late (a dead
        worker's 10 s lease reaped 510 s after its claim). A lease is due at
        its expiry, as reap() judges it. A slot fires, and follow-ups go,
        when now() reaches their time: one past is due at once; a later one
        when the middle of [now - behind, now + ahead], which now() runs
        with, reaches it (`at - behind` came early while now() stood still,
        and a tend that fired nothing came again every fraction of a second
        for the step's length)."""

        def comes(at: float) -> float:
            """When now() reaches `at`, on that clock."""
            return at - behind if at <= now else at - (ahead + behind) / 2

        times = [comes(_schedule_due(s)) for s in self.head.get("schedules", {}).values()]
        expiry = self.next_expiry()
        if expiry is not None:
            times.append(expiry)
        oldest = self.outbox_oldest() if outbox else None
        if oldest is not None:
            times.append(comes(oldest))
        return min(times, default=None)

    def tend(self, now: float, behind: float = 0.0) -> dict[str, int]:
        """What the topic's owner does when next_due() comes: expired leases
        back to pending (or dead), and the schedules whose slot came fired.
        What it did, by kind."""
        done = self.reap(now, behind)
        done["fired"] = self.fire(now)
        return done

    def reap(self, now: float, behind: float = 0.0) -> dict[str, int]:
        """Expired leases back to pending, or dead when attempts are spent: a
        part of them, bounded (Layout.take_due_leases), so that one batch
        reads and writes a bounded amount however many ran out; while more
        are due, next_due() says so (now), and the owner tends again at once.

        A lease is expired when it ran out by `now - behind`: `now` is an
        estimate of the store's clock that may be `behind` ahead of it.
        With the lease counted from an estimate no earlier than the store's
        time (claim()), no estimate's error ends a lease early, whichever
        brokers stamped and reap it."""
        out = {"pending": 0, "dead": 0}
        # The earliest the store's time may be. A reaped job is due again from
        # it too: a broker whose estimate is behind this one's does not see it
        # as delayed for long.
        earliest = now - behind
        expired = self.take_due_leases(earliest)  # a bounded part: see REAP_LEASES
        jobs = [self._with_payload(p.item) for p in expired]  # reads before it changes
        for place, job in zip(expired, jobs, strict=True):
            self._drop_lease(place)
            out[self._release(job, earliest, "lease expired", now)] += 1
        return out

    # --- the outbox: follow-ups for other topics -------------------------------------------

    def outbox_front(
        self,
        n: int,
        skip_topics: frozenset[str] = frozenset(),
        skip: frozenset[tuple[str, str]] = frozenset(),
        scan: int = OUTBOX_SCAN,
        room: float = math.inf,
    ) -> list[dict[str, Any]]:
        """The first `n` follow-ups waiting for delivery, oldest first, leaving
        out those for the topics in `skip_topics` and those in `skip`, as
        (topic, id), held back for now (they hold back no others), among the
        first `scan`, from segments of `room` bytes or so (outbox_after)."""
        return self.outbox_after(0, n, skip_topics, skip, scan, room)[0]

    def outbox_after(
        self,
        start: int,
        n: int,
        skip_topics: frozenset[str] = frozenset(),
        skip: frozenset[tuple[str, str]] = frozenset(),
        scan: int = OUTBOX_SCAN,
        room: float = math.inf,
    ) -> tuple[list[dict[str, Any]], int]:
        """outbox_front() from the `start`-th follow-up on (those before it are
        known to be held back: skipped by the segments' counts, unread), and
        how many from the front are held back as far as it looked: where the
        next call may start while the same are held back. Behind a topic that
        does not take its follow-ups (a corrupt head) `scan` bounds what one
        call reads, and the next goes on from there.

        No more segments are read once those read (held back ones too) come
        to `room` bytes as stored, OUTBOX_WINDOW_SEGMENTS at most past it:
        what a call reads is held at once, and must fit the object cache
        however large the follow-ups (a backlog of 300 KB ones, counted in
        items alone, was a read the cache could never hold)."""
        front: list[dict[str, Any]] = []
        held = start  # the follow-ups before it are all held back
        looked = 0
        spent = 0
        weighed: set[str] = set()
        outbox = self.outbox
        while len(front) < n and looked < scan and spent < room:
            places = outbox.window(start + looked, min(1000, scan - looked), OUTBOX_WINDOW_SEGMENTS)
            if not places:
                break
            for place in places:
                if place.seg is not None and place.seg not in weighed:
                    weighed.add(place.seg)
                    spent += outbox.segment(place.seg).size
                looked += 1
                item = place.item
                if item["topic"] in skip_topics or (item["topic"], item["id"]) in skip:
                    if not front:
                        held += 1
                    continue
                front.append(item)
                if len(front) >= n:
                    break
        return front, held

    def outbox_delivered(self, delivered: list[tuple[str, str]]) -> int:
        """Follow-ups enqueued in their topics, as (topic, id), leave the
        outbox, the oldest first: one id may go to several topics, and one
        (topic, id) be there twice (two acks named it: the second delivery
        is a duplicate). How many left (one already gone is not counted).
        Each is found by its id (the manifests' id indexes, the loose
        segments), never by reading the outbox from its front: follow-ups
        held back there (50,000 for a topic down) are not walked through
        at every delivery."""
        wanted = Counter(delivered)
        located = locate_first([self.outbox], (job_id for _, job_id in wanted))
        places = []
        for (topic, job_id), count in wanted.items():
            same = [p for p in located[job_id] if p.item["topic"] == topic]
            places += same[:count]
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

    def requeue(
        self, job_ids: list[str] | None, now: float, part: tuple[int, int] | None = None
    ) -> list[str]:
        """Dead jobs (those named; else all, or a `part`) back to pending with
        fresh attempts."""
        return [job["id"] for job in self._take_dead(job_ids, now, True, part)]

    def purge(
        self, job_ids: list[str] | None, now: float, part: tuple[int, int] | None = None
    ) -> list[str]:
        """Forget dead jobs (those named; else all, or a `part`). Named ones
        purged before (gone from the dead queue, their record saying "dead")
        are answered as purged too: a purge sent again after its answer was
        lost answers what the first did."""
        taken = [job["id"] for job in self._take_dead(job_ids, now, False, part)]
        if job_ids is None:
            return taken
        gone = set(taken)
        # The others left the dead queue without coming back if their record
        # says "dead" (a requeued job keeps none, and its id stays taken).
        records = locate_first([self.retained], (i for i in job_ids if i not in gone))
        return [
            i
            for i in dict.fromkeys(job_ids)
            if i in gone or (records[i] and records[i][-1].item["status"] == "dead")
        ]

    def _take_dead(
        self, job_ids: list[str] | None, now: float, requeue: bool, part: tuple[int, int] | None
    ) -> list[Job]:
        """`part`: (n, k), the n oldest dead jobs at most, from k segments at most."""
        dead = self.dead
        if job_ids is None:
            places = list(dead.places() if part is None else dead.window(0, *part))
        else:
            located = locate_first([dead], job_ids)  # what they lack, in one round
            places = [p for found in located.values() for p in found]
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
                self._let_go(job)
                self._retain(job, "dead", now)
        return taken

    def _enforce_dead_limit(self, now: float) -> None:
        """Past --dead-limit the oldest dead jobs are dropped, and counted; each
        keeps its record, as a purged one does (for lookups and duplicates)."""
        dead = self.dead
        while dead.count > self.policy.dead_limit:
            dropped = dead.pop_front()
            if dropped is None:  # its count is past its jobs: this would spin for ever
                raise CorruptData(
                    keys.head(self.topic), f"its dead jobs number {dead.count}, yet none is left"
                )
            self._let_go(dropped)
            self._retain(dropped, "dead", now)
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

    def _expire_retained(self, now: float, unreadable: AbstractSet[str]) -> None:
        """Retained records past retention go, the oldest first; from an
        unreadable object on (a manifest is read as it goes), they stay."""
        horizon = now - self.policy.retention

        def old(ref: dict[str, Any]) -> bool:
            # A loose segment goes unread; a manifest is read (its holes).
            return ref.get("hi", 1e300) < horizon and (
                "segs" not in ref or not self._among(ref["k"], unreadable)
            )

        retained = self.retained
        retained.drop_front_while(old)
        spilled = retained.d["segs"] or retained.d["mans"]
        if not spilled and retained.take_inline_while(lambda r: r["finished_at"] < horizon):
            self._inline_ids = None

    def expire(self, now: float, unreadable: AbstractSet[str] = frozenset()) -> None:
        self._expire_retained(now, unreadable)

    # --- cancellation (SPEC 10) ------------------------------------------------------------

    def cancel(self, job_ids: list[str], now: float) -> dict[str, list[str]]:
        """Cancel jobs: a pending or delayed one leaves its lane, a claimed one its
        lease (its holder's next heartbeat or ack meets JobCancelled); each is
        retained as a record with status "cancelled" and never claimed again.
        Finished and unknown jobs are `not_found`.

        What the look-ups of all of them lack is asked for at once, first:
        found one at a time, 1,000 ids spread over 100,000 pending jobs cost
        a fetch round each, past the committer's bound (a 503, every time).
        Each is looked for where _take_live() looks, in its order, as far as
        where it is found: a bad object further on (a corrupt segment of
        another run) fails no cancel of a job found before it."""
        out: dict[str, list[str]] = {"cancelled": [], "not_found": []}
        ids = list(dict.fromkeys(job_ids))
        leased = self._inline_index()
        chains = [self.leases]
        ends: dict[str, int] = {}  # a lane's inline job: found before its lane's runs
        for lane in self.head["lanes"].values():
            for job in lane["in"]:
                ends.setdefault(job["id"], len(chains))
            chains += self._runs(lane)
        locate_first(chains, [i for i in ids if i not in leased], inline=False, ends=ends)
        for job_id in ids:
            job = self._take_live(job_id)
            if job is None:
                out["not_found"].append(job_id)
                continue
            self.dirty = True
            self._let_go(job)
            counters = self.head["counters"]
            counters["cancelled"] = counters.get("cancelled", 0) + 1
            self._retain(job, "cancelled", now)
            out["cancelled"].append(job_id)
        return out

    def _take_live(self, job_id: str) -> Job | None:
        """Take the job `job_id` out of the claimed set or its lane (wherever it
        stands: inline, or a hole in a segment); None if it is neither."""
        lease = self._lease_of(job_id)
        if lease is not None:
            self._drop_lease(lease)
            return lease.item
        for name, lane in list(self.head["lanes"].items()):
            inline: list[Job] = lane["in"]
            for i, job in enumerate(inline):
                if job["id"] == job_id:
                    del inline[i]
                    self._drop_lane_if_empty(name, lane)
                    return job
            for run in self._runs(lane):
                places = run.locate(job_id)
                if places:
                    run.remove(places[0])
                    if run.count == 0:
                        lane["runs"].remove(run.d)
                    self._drop_lane_if_empty(name, lane)
                    return places[0].item
        return None

    def _drop_lane_if_empty(self, name: str, lane: dict[str, Any]) -> None:
        if not lane["in"] and not lane["runs"]:
            del self.head["lanes"][name]

    # --- schedules (SPEC 11) -----------------------------------------------------------

    def schedules(self) -> dict[str, dict[str, Any]]:
        """The topic's schedules by name, as kept in its head."""
        found: dict[str, dict[str, Any]] = self.head.get("schedules", {})
        return found

    def put_schedule(self, name: str, spec: ScheduleRequest, now: float) -> dict[str, Any]:
        """Create or replace the schedule `name`; its first slot is the first
        after `now` (and after the last it fired, when it replaces one: a slot
        is never fired twice). A replaced schedule whose slot came and was not
        fired yet (no broker ran, or it was about to) keeps that due: the
        latest slot of the new definition since then fires, as after downtime.
        InvalidRequest past the topic's bounds (number of schedules, their
        bytes: they live in the head)."""
        check_definition(spec.every, spec.cron, spec.tz)
        found = self.schedules()
        old = found.get(name)
        if old is None and len(found) >= self.bounds.schedules_max:
            raise RefusedByTopic(
                f"topic {self.topic!r} has {len(found)} schedules, the most it may hold"
            )
        schedule: dict[str, Any] = {"payload": spec.payload, "created_at": now}
        for field in ("every", "cron", "tz", "max_attempts"):
            if getattr(spec, field) is not None:
                schedule[field] = getattr(spec, field)
        if spec.priority:
            schedule["priority"] = spec.priority
        if old is not None and "last_slot" in old:
            for kept in ("last_slot", "last_fired_at"):
                schedule[kept] = old[kept]
            # A local time is one clock's: in another zone it says nothing.
            if "cron" in schedule and old.get("tz") == spec.tz:
                local = last_local_known(old)
                if local is not None:
                    schedule["last_local"] = local
        after = max(now, schedule.get("last_slot", now))
        next_at = next_unfired(schedule, after)
        if next_at is None:
            raise InvalidRequest("the schedule has no slot left to fire")
        if old is not None and old["next_at"] <= now:
            missed = latest_at(schedule, now)
            fired = schedule.get("last_slot", -1)
            if (
                missed is not None
                and missed >= old["next_at"]
                and missed > fired
                and not fired_locally(schedule, missed)
            ):
                next_at = missed  # due: the next tend fires it
        schedule["next_at"] = next_at
        changed = {**found, name: schedule}
        size = len(orjson.dumps(changed))
        if size > self.bounds.schedules_bytes:
            raise RefusedByTopic(
                f"the schedules of topic {self.topic!r} would take {size} bytes, over "
                f"{self.bounds.schedules_bytes}: payloads of schedules must stay small"
            )
        self.head["schedules"] = changed
        self.dirty = True
        return schedule

    def delete_schedule(self, name: str) -> None:
        """Delete the schedule `name` (it fires no more); ScheduleNotFound if none."""
        found = self.schedules()
        if name not in found:
            raise ScheduleNotFound(f"no schedule {name!r} in topic {self.topic!r}")
        self.head["schedules"] = {k: v for k, v in found.items() if k != name}
        if not self.head["schedules"]:
            del self.head["schedules"]
        self.dirty = True

    def fire(self, now: float) -> int:
        """Enqueue a job for each schedule whose slot came: one job, for the
        latest slot at or before `now`, whatever the number of slots missed
        meanwhile (a broker down, a topic without owner: one catch-up, not a
        storm). Its id is "<name>@<slot>": the same whichever broker fires it,
        and a slot fired is never fired again (the head keeps the next slot,
        and the record of the job makes a second one a duplicate). How many
        jobs were enqueued."""
        fired = 0
        for name, schedule in self.schedules().items():
            if _schedule_due(schedule) > now:
                continue
            try:
                local = last_local_known(schedule)
                if local is not None:
                    # Kept from now on, as if it had been written when fired.
                    schedule["last_local"] = local
                latest = latest_at(schedule, now)
                if latest is not None and fired_locally(schedule, latest):
                    # Its local time was fired by a broker whose tzdata put
                    # it earlier (the next_at it wrote is not a slot here).
                    schedule["next_at"] = next_unfired(schedule, now) or _NEVER
                    schedule.pop("retry_at", None)
                    self.dirty = True
                    continue
                slot = max(latest or 0, schedule["next_at"])
            except InvalidRequest as exc:
                # Its time zone, known to the broker that took the schedule,
                # is not in this one's tzdata (hosts differ): the others fire,
                # and it is tried again in a while, by whichever broker owns
                # the topic then, its latest slot as after downtime.
                schedule["last_error"] = f"not fired: {exc} on this broker"
                schedule["retry_at"] = now + SCHEDULE_RETRY
                self.dirty = True
                continue
            schedule.pop("retry_at", None)
            spec = JobSpec(
                schedule["payload"],
                id=f"{name}@{slot}",
                priority=schedule.get("priority", 0),
                max_attempts=schedule.get("max_attempts"),
            )
            self.dirty = True
            try:
                [answer] = self.enqueue([spec], now)
            except InvalidRequest as exc:  # refused whole, changing nothing (lanes_max)
                # Skipped: its next slot moving on keeps it from firing again,
                # and the last job shown stays one the topic took.
                schedule["last_error"] = f"slot {slot} not enqueued: {exc}"
            else:
                schedule.pop("last_error", None)
                fired += not answer["duplicate"]
                schedule["last_slot"] = slot
                schedule["last_fired_at"] = now
                if "cron" in schedule:
                    # The local time fired is the latest come by this clock
                    # (the slot may be a next_at another tzdata put there).
                    occurrence = slot if latest is None else latest
                    schedule["last_local"] = local_time(schedule, occurrence)
            schedule["next_at"] = next_unfired(schedule, max(now, slot)) or _NEVER
        return fired

    # --- settings and limits (SPEC 12) -----------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The topic's settings as set (absent: not set)."""
        found: dict[str, Any] = self.head.get("settings", {})
        return found

    def put_settings(self, changes: SettingsRequest, now: float) -> dict[str, Any]:
        """Change the topic's settings: fields set to None are removed, fields
        left unset stay. The token bucket keeps its tokens (up to a new burst);
        it starts full when a rate is first set. A burst is its rate's: it goes
        with it, and is refused without one (InvalidRequest, nothing changed)."""
        before = self.settings()
        held = self._tokens(now)  # settled under the settings they were earned at
        settings = dict(before)
        for field in ("rate", "burst", "max_claimed", "lease", "max_attempts"):
            value = getattr(changes, field)
            if value is None:
                settings.pop(field, None)
            elif not isinstance(value, UnsetType):
                settings[field] = value
        if "rate" not in settings:
            if not isinstance(changes.burst, UnsetType) and changes.burst is not None:
                raise RefusedByTopic("burst is the size of a rate's bucket: set a rate with it")
            settings.pop("burst", None)  # dropped with its rate (kept, it came back with the next)
            self.head.pop("bucket", None)
        if settings == before:
            return settings  # nothing to write: no topic springs into existence for it
        if settings:
            self.head["settings"] = settings
        else:
            self.head.pop("settings", None)
        if "rate" in settings:
            burst = self.burst()
            assert burst is not None  # a rate is set
            tokens = min(held, float(burst))
            old = self.head.get("bucket")
            if old is None:  # made now, full
                self.head["bucket"] = {"tokens": tokens, "at": now, "since": now}
            else:
                self.head["bucket"] = {**old, "tokens": tokens, "at": max(now, old["at"])}
        self.dirty = True
        return settings

    def default_lease(self) -> float:
        lease: float = self.settings().get("lease", self.policy.default_lease)
        return lease

    def default_attempts(self) -> int:
        attempts: int = self.settings().get("max_attempts", self.policy.max_attempts)
        return attempts

    def burst(self) -> int | None:
        """The token bucket's size while a rate is set (default: one second's
        worth of claims, at least one)."""
        settings = self.settings()
        if "rate" not in settings:
            return None
        burst: int = settings.get("burst", max(1, math.ceil(settings["rate"])))
        return burst

    def _tokens(self, now: float) -> float:
        """Claims the bucket allows at `now`. A writer whose clock is behind the
        bucket's last update sees no refill until its clock passes it: limits
        hold on the fastest clock that wrote."""
        burst = self.burst()
        if burst is None:
            return math.inf
        bucket = self.head.get("bucket")
        if bucket is None:
            return float(burst)
        elapsed = max(0.0, now - bucket["at"])
        tokens: float = min(float(burst), bucket["tokens"] + elapsed * self.settings()["rate"])
        return tokens

    def claimable(self, now: float) -> int:
        """How many jobs the topic's limits let a claim take at `now`."""
        settings = self.settings()
        room = math.floor(self._tokens(now)) if "rate" in settings else 1 << 62
        if "max_claimed" in settings:
            room = min(room, settings["max_claimed"] - self.leases.count)
        return max(0, room)

    def _spend(self, claimed: int, now: float) -> None:
        """Take `claimed` tokens from the bucket (a negative number gives them
        back, up to the burst: claims handed to nobody)."""
        burst = self.burst()
        if claimed and burst is not None:
            tokens = min(float(burst), self._tokens(now) - claimed)
            old = self.head.get("bucket", {})
            self.head["bucket"] = {**old, "tokens": tokens, "at": max(now, old.get("at", now))}

    def _give_token_back(self, claimed_at: float, now: float) -> None:
        """A claim made at `claimed_at` was handed to nobody: its token goes
        back, if it took one. One made before the bucket (before the rate was
        set, or set again: a new bucket starts full) took none, and giving it
        one let a claim past the rate for each claim given back so. Ties go
        to the limit: a claim of the write that made the bucket gives none."""
        since = self.head.get("bucket", {}).get("since")
        if since is None or claimed_at > since:
            self._spend(-1, now)

    def ready_wait(self, now: float) -> float | None:
        """Seconds until the earliest job the last claim() found not due yet
        comes due (None: it found none), for a long poll to wake then: no
        commit tells of a delayed job coming due."""
        return None if self.next_ready is None else max(0.0, self.next_ready - now)

    def token_wait(self, now: float) -> float | None:
        """Seconds until the rate lets a claim take a job, when that is what
        holds claims back now (None: it is not; a commit, an ack, will say when)."""
        if "rate" not in self.settings():
            return None
        tokens = self._tokens(now)
        if tokens >= 1:
            return None
        rate: float = self.settings()["rate"]
        return (1 - tokens) / rate


_NEVER = 2**62  # the next slot of a cron expression that never comes again


def _drop_stale_prios(head: dict[str, Any]) -> None:
    """Counts by priority from before a write by a broker that keeps none (an
    earlier version, which keeps the fields as they are): counted again when
    next needed (TopicState._prios)."""
    if head.get("prios_at") != head.get("write_id"):
        head.pop("prios", None)
        head.pop("prios_at", None)


def _schedule_due(schedule: dict[str, Any]) -> float:
    """When a schedule next wants firing: its next slot, or later when its
    slots could not be computed here (retry_at)."""
    return max(float(schedule["next_at"]), float(schedule.get("retry_at", 0)))


def follow_up_id(job_id: str, index: int) -> str:
    """The id of an acked job's follow-up number `index` that has none of its
    own: `<job id>:<index>` (a long id by its hash, so that the result stays a
    valid id), the same however often it is delivered."""
    if len(job_id) > 200:
        job_id = hashlib.blake2b(job_id.encode(), digest_size=16).hexdigest()
    return f"{job_id}:{index}"


def _comes_due(spec: JobSpec, now: float) -> float:
    """When a job enqueued at `now` comes due: after its delay, or at its
    `run_at` (now, if that has passed). A time more than MAX_DELAY ahead is
    refused, as such a delay is."""
    if spec.run_at is None:
        return now + spec.delay
    if spec.run_at - now > MAX_DELAY:
        raise InvalidRequest(
            f"{RUN_AT_TOO_LATE} ({spec.run_at}) is more than {MAX_DELAY:.0f} s after now "
            f"({now:.3f})"
        )
    return max(now, spec.run_at)


def _follow_up(spec: FollowUpSpec, follow_id: str, now: float) -> dict[str, Any]:
    """A follow-up for another topic, as the outbox keeps it (schema.FollowUp).
    A `run_at` is kept as the delay from `at` it makes: the outbox's format
    stays the same, and its time the same on this broker's clock."""
    item: dict[str, Any] = {
        "id": follow_id,
        "topic": spec.topic,
        "payload": spec.payload,
        "at": now,
    }
    if spec.priority:
        item["priority"] = spec.priority
    if delay := _comes_due(spec, now) - now:
        item["delay"] = delay
    if spec.max_attempts is not None:
        item["max_attempts"] = spec.max_attempts
    return item
