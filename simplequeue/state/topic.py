"""The topic state machine: the rules of a queue (SPEC section 3) as pure
functions over a topic's state. No I/O, ever.

A topic's state is its head object plus the immutable objects it refers to,
read through a SegmentView. The group committer loads the head, calls these
methods for each mutation of a batch, then `seal()`, which spills what outgrew
the head into new objects, and writes. Methods change the state in place: a
batch whose write fails, or that needs an object not loaded yet
(SegmentMissing), is thrown away with the state it touched and applied again
to a fresh one.

What a head holds (format 2; docs/STORAGE.md draws it):
- lanes, one per priority: an inline list of pending jobs sorted by
  (run_at, seq), and runs, chains of segments each sorted the same way. A
  claim takes the earliest due front among them: priority, then the job that
  became claimable first.
- leases: a chain of claimed jobs' records. A record carries its payload while
  it is inline, and where the payload is once it spilled (`src`), so payloads
  are never copied into the claimed set.
- retained: a chain of finished jobs' records, in the order they finished.
- dead: a chain of dead jobs, in the order they died.
- writers: each broker's latest write id, which resolves an ambiguous write.
Everything that grows is a chain (simplequeue.state.chain), so the head stays
bounded whatever the load.
"""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from simplequeue import keys
from simplequeue.api import JobSpec
from simplequeue.errors import CorruptData, JobNotFound, LeaseLost
from simplequeue.state.chain import Chain, NewObject, Place, new_chain
from simplequeue.state.limits import Bounds, Policy
from simplequeue.state.segments import (
    FORMAT,
    Manifest,
    Segment,
    SegmentMissing,
    SegmentView,
    decode_manifest,
    decode_segment,
    encode_manifest,
    encode_segment,
)
from simplequeue.state.upgrade import upgrade

Job = dict[str, Any]
Record = dict[str, Any]

CLAIM_FIELDS = ("claimed_by", "claimed_at", "heartbeat_at", "lease_expires_at", "lease_token")
_CLAIM_FIELDS = frozenset(CLAIM_FIELDS)


def new_head(topic: str) -> dict[str, Any]:
    """The state of a topic that has never been written."""
    return {
        "format": FORMAT,
        "topic": topic,
        "writer": None,
        "write_id": None,
        "writers": {},
        "seq": 0,
        "next": 0,
        "counters": {"enqueued": 0, "completed": 0, "nacked": 0, "dead": 0, "dead_dropped": 0},
        "lanes": {},
        "leases": new_chain(),
        "retained": new_chain(),
        "dead": new_chain(),
    }


def decode_head(topic: str, key: str, data: bytes) -> dict[str, Any]:
    """A head's bytes as its dict in the current format (an earlier format is
    upgraded in memory, and written in the current one by the next batch).
    CorruptObject for bytes that are not a head of this topic."""
    try:
        head = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptData(key, f"not JSON ({exc})") from None
    if not isinstance(head, dict) or not isinstance(head.get("counters"), dict):
        raise CorruptData(key, "not a topic head")
    if head.get("format") == 1:
        head = upgrade(head)
    if head.get("format") != FORMAT:
        raise CorruptData(key, f"format {head.get('format')!r}, which this broker cannot read")
    if head.get("topic") != topic:
        raise CorruptData(key, f"the head of topic {head.get('topic')!r}, not of {topic!r}")
    upgraded: dict[str, Any] = head
    return upgraded


@dataclass
class Sealed:
    """A sealed batch: the head to write, and the objects to create before it."""

    head: bytes = b""
    new_objects: dict[str, bytes] = field(default_factory=dict)


def _key(job: Job) -> tuple[float, int]:
    return (job["run_at"], job["seq"])


class TopicState:
    """One topic's head, and its objects through `view`.

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
        if head.get("format") != FORMAT:
            raise ValueError(f"unsupported topic format {head.get('format')!r}")
        self.head = head
        self.view = view
        # What chains read through: the view, this seal's own objects, and what
        # was read already (see _Overlay).
        self._view = _Overlay(view, {} if seen is None else seen)
        self.bounds = bounds
        self.policy = policy
        self.dirty = False  # set by every mutation that changed something
        # Where each claimed job's record is: those in segments (items never
        # change, so these Places outlive a rollback, see begin()), and those
        # inline (the head's own dicts, found again after a rollback).
        self._spilled: dict[str, Place] | None = None
        self._inline: dict[str, Job] | None = None
        self._journal: list[tuple[str, Place | None]] | None = None
        self._lease_mans: tuple[tuple[str, ...], dict[str, str]] = ((), {})
        self._inline_ids: set[str] | None = None  # ids in the inline lists: see exists()

    @property
    def topic(self) -> str:
        topic: str = self.head["topic"]
        return topic

    def _chain(self, d: dict[str, Any]) -> Chain:
        return Chain(d, self.topic, self._view)

    @property
    def leases(self) -> Chain:
        return self._chain(self.head["leases"])

    @property
    def retained(self) -> Chain:
        return self._chain(self.head["retained"])

    @property
    def dead(self) -> Chain:
        return self._chain(self.head["dead"])

    def _runs(self, lane: dict[str, Any]) -> list[Chain]:
        return [self._chain(run) for run in lane["runs"]]

    def _payload(self, record: Job) -> Any:
        """A claimed or pending job's payload, wherever it is kept."""
        if "src" not in record:
            return record.get("payload")
        seg_id, index = record["src"]
        return self._chain(new_chain()).segment(seg_id).items[index]["payload"]

    # --- the claimed set -------------------------------------------------------------

    def _spilled_index(self) -> dict[str, Place]:
        """Claimed jobs whose records are in segments (reads every lease segment)."""
        if self._spilled is None:
            leases = self.leases
            spilled = {}
            for ref, man, start in leases.units():
                holes = leases.holes_of(ref)
                items = leases.segment(ref["k"]).items
                for i in range(start, ref["n"]):
                    if i not in holes:
                        spilled[items[i]["id"]] = Place(ref["k"], i, items[i], man)
            self._spilled = spilled
        return self._spilled

    def _inline_index(self) -> dict[str, Job]:
        if self._inline is None:
            self._inline = {r["id"]: r for r in self.head["leases"]["in"]}
        return self._inline

    def _set_spilled(self, job_id: str, place: Place | None) -> None:
        """Change the spilled index, noting the old entry while a batch runs."""
        index = self._spilled_index()
        if self._journal is not None:
            self._journal.append((job_id, index.get(job_id)))
        if place is None:
            index.pop(job_id, None)
        else:
            index[job_id] = place

    def _lease_of(self, job_id: str) -> Place | None:
        record = self._inline_index().get(job_id)
        if record is not None:
            return Place(None, 0, record)
        return self._spilled_index().get(job_id)

    def _leased(self) -> Iterator[Place]:
        """Every claimed job's record."""
        for record in self.head["leases"]["in"]:
            yield Place(None, 0, record)
        yield from self._spilled_index().values()

    def _add_lease(self, record: Job) -> None:
        self._spilled_index()  # built before the claimed set changes
        self.leases.append(record)
        self._inline_index()[record["id"]] = record

    def _drop_lease(self, place: Place) -> None:
        inline = self._inline_index()  # built before the record leaves the head
        self.leases.remove(self._placed(place))
        if place.seg is None:
            del inline[place.item["id"]]
        else:
            self._set_spilled(place.item["id"], None)

    # --- batches: begin, and roll back ----------------------------------------------------

    def begin(self) -> None:
        """A batch starts: note what changes, so that rollback() can undo it."""
        self._journal = []

    def rollback(self, head: dict[str, Any]) -> None:
        """Undo the batch since begin(): `head` is the head it started from, freshly
        decoded. The spilled index is put back as it was (rebuilding it would read
        every lease segment); the rest is derived again when wanted. The batch
        waited for an object, most likely: applying it again finds it."""
        if self._journal is not None and self._spilled is not None:
            for job_id, old in reversed(self._journal):
                if old is None:
                    self._spilled.pop(job_id, None)
                else:
                    self._spilled[job_id] = old
        self.head = head
        self._journal = [] if self._journal is not None else None
        self._inline = None
        self._inline_ids = None
        self._lease_mans = ((), {})
        self._view.fresh.clear()
        self.dirty = False

    def _placed(self, place: Place) -> Place:
        """`place` with the manifest its segment is under now: the lease index is
        kept across seals, which fold segments under manifests."""
        if place.seg is None:
            return place
        mans = tuple(m["k"] for m in self.head["leases"]["mans"])
        if mans != self._lease_mans[0]:
            self._lease_mans = (mans, self.leases.manifest_of())
        return Place(place.seg, place.index, place.item, self._lease_mans[1].get(place.seg))

    # --- reading ---------------------------------------------------------------------

    def referenced(self) -> list[str]:
        """Keys of every object this state needs, payloads of claimed jobs
        included (opens manifests, reads lease segments)."""
        ids: list[str] = []
        for lane in self.head["lanes"].values():
            for run in self._runs(lane):
                ids += run.object_ids()
        for chain in (self.leases, self.retained, self.dead):
            ids += chain.object_ids()
        ids += [p.item["src"][0] for p in self._leased() if "src" in p.item]
        return sorted({keys.segment(self.topic, i) for i in ids})

    def direct_keys(self) -> list[str]:
        """Keys of the objects the head names itself: what reading it whole
        starts with (manifests and loose segments)."""
        ids: list[str] = []
        for lane in self.head["lanes"].values():
            for run in self._runs(lane):
                ids += run.direct_ids()
        for chain in (self.leases, self.retained, self.dead):
            ids += chain.direct_ids()
        return [keys.segment(self.topic, i) for i in ids]

    def hold(self, key: str, obj: Segment | Manifest) -> None:
        """Keep `obj` for this state's reads, whatever its cache does."""
        self._view.seen[key] = obj

    def prefetch(self, missing: str) -> list[str]:
        """What to fetch when `missing` is wanted: it, every object the head names
        itself, and the segments of loaded lease manifests (a claimed job's record
        may be in any of them). Fetched together, one miss costs one round trip
        instead of one per object."""
        wanted = [missing, *self.direct_keys()]
        leases = self.leases
        for mref in leases.d["mans"]:
            try:
                refs = leases.manifest(mref["k"]).refs
            except SegmentMissing:
                continue
            wanted += [keys.segment(self.topic, r["k"]) for r in refs]
        return wanted

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
        records = sorted(
            (p.item for p in self._leased()),
            key=lambda r: r["lease_expires_at"],
        )
        return [self._with_payload(r) for r in records[:n]]

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
        and dead jobs dropped over the dead limit."""
        c = self.head["counters"]
        names = ("enqueued", "completed", "nacked", "dead", "dead_dropped")
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
        retained in the topic, or twice in this call) are not added again."""
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
        if not inline or _key(inline[-1]) <= _key(job):
            inline.append(job)
        else:
            bisect.insort(inline, job, key=_key)

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
            key = _key(place.item)
            if key[0] <= now and (best is None or key < best):
                best, best_run = key, run
        inline: list[Job] = lane["in"]
        if inline and inline[0]["run_at"] <= now and (best is None or _key(inline[0]) < best):
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

    def ack(self, job_id: str, token: str | None, result: Any, now: float) -> dict[str, Any]:
        place = self._holder(job_id, token)
        self.dirty = True
        self._drop_lease(place)
        self.head["counters"]["completed"] += 1
        self._retain(place.item, "completed", now, result=result)
        return {"id": job_id, "status": "completed"}

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
        return any(p.item["lease_expires_at"] <= now for p in self._leased())

    def earliest_expiry(self) -> float | None:
        """When the first lease of the claimed set runs out, if any is claimed."""
        return min((p.item["lease_expires_at"] for p in self._leased()), default=None)

    def reap(self, now: float) -> dict[str, int]:
        """Expired leases back to pending, or dead when attempts are spent."""
        out = {"pending": 0, "dead": 0}
        expired = [p for p in self._leased() if p.item["lease_expires_at"] <= now]
        jobs = [self._with_payload(p.item) for p in expired]  # reads before it changes
        for place, job in zip(expired, jobs, strict=True):
            self._drop_lease(place)
            out[self._release(job, now, job.get("last_error") or "lease expired", now)] += 1
        return out

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

    # --- sealing a batch ---------------------------------------------------------------------

    def seal(self, writer: dict[str, Any], write_id: str, now: float) -> Sealed:
        """Finish a batch: expire records, stamp the write, spill what outgrew
        the head into new objects, and serialise the head (Sealed.head)."""
        self._expire_retained(now)
        h, bounds = self.head, self.bounds
        h["writer"] = writer
        h["write_id"] = write_id
        writers: dict[str, str] = h["writers"]
        writers.pop(writer["broker_id"], None)
        writers[writer["broker_id"]] = write_id  # the newest last
        while len(writers) > bounds.writers_max:
            del writers[next(iter(writers))]
        sealed = Sealed()
        self._view.fresh.clear()  # the last seal's objects are in the view by now
        data = orjson.dumps(h)
        smallest = min(
            bounds.inline_pending_bytes,
            bounds.inline_leases_bytes,
            bounds.inline_records_bytes,
            bounds.inline_dead_bytes,
        )
        # A part can outgrow its bound only if the whole head did: measure the
        # parts only then, so a small head costs one serialisation.
        if len(data) > smallest or self._needs_upkeep():
            _Sealer(self, sealed, write_id).run()
            data = orjson.dumps(h)
            self._inline_ids = None  # spilled ids are found through the segments now
        sealed.head = data
        return sealed

    def _needs_upkeep(self) -> bool:
        """Whether a chain has too many loose segments or kept holes, or a lane
        too many runs (which a seal tidies whatever the head's size)."""
        h, b = self.head, self.bounds
        chains = [h["leases"], h["retained"], h["dead"]]
        chains += [run for lane in h["lanes"].values() for run in lane["runs"]]
        sparse = any(r["live"] * 2 <= r["n"] for r in h["leases"]["segs"])
        crowded = any(
            len(c["segs"]) > b.loose_max
            or len(c["holes"]) > b.holes_max
            or len(c["mans"]) > b.manifests_max
            for c in chains
        )
        return sparse or crowded or any(len(ln["runs"]) > b.runs_max for ln in h["lanes"].values())


class _Overlay:
    """A SegmentView that also holds the objects the current seal made (the
    committer adds them to its cache only once they are written), and every
    object read through it (`seen`, which the caller may share between the
    states it builds for one batch and clear after: so that a cache smaller
    than what one batch needs only costs fetches, never a loop of them)."""

    def __init__(self, view: SegmentView, seen: dict[str, Segment | Manifest]) -> None:
        self.view = view
        self.fresh: dict[str, Segment | Manifest] = {}
        self.seen = seen

    def keep(self, key: str, data: bytes) -> None:
        is_manifest = key.rsplit("/", 1)[-1].startswith("seg-m")
        self.fresh[key] = decode_manifest(key, data) if is_manifest else decode_segment(key, data)

    def segment(self, key: str) -> Segment:
        obj = self.fresh.get(key) or self.seen.get(key)
        if isinstance(obj, Segment):
            return obj
        found = self.seen[key] = self.view.segment(key)
        return found

    def manifest(self, key: str) -> Manifest:
        obj = self.fresh.get(key) or self.seen.get(key)
        if isinstance(obj, Manifest):
            return obj
        found = self.seen[key] = self.view.manifest(key)
        return found


class _Sealer:
    """The spilling, folding and merging of one seal."""

    def __init__(self, state: TopicState, sealed: Sealed, write_id: str) -> None:
        self.s = state
        self.sealed = sealed
        self.attempt = write_id[:12]
        self.bounds = state.bounds

    def _new_id(self, kind: str) -> str:
        n = self.s.head["next"]
        self.s.head["next"] = n + 1
        return f"{kind}{n}-{self.attempt}"

    def _add(self, obj: NewObject) -> None:
        key = keys.segment(self.s.topic, obj.id)
        self.sealed.new_objects[key] = obj.data
        self.s._view.keep(key, obj.data)  # the rest of this seal may read it

    def run(self) -> None:
        h, b = self.s.head, self.bounds
        lanes = h["lanes"]
        if sum(len(orjson.dumps(lane["in"])) for lane in lanes.values()) > b.inline_pending_bytes:
            for lane in lanes.values():
                if lane["in"]:
                    self._spill_lane(lane)
        if len(orjson.dumps(h["leases"]["in"])) > b.inline_leases_bytes:
            self._spill_leases()
        for name, bound, kind in (
            ("retained", b.inline_records_bytes, "r"),
            ("dead", b.inline_dead_bytes, "d"),
        ):
            chain = self.s._chain(h[name])
            if chain.d["in"] and len(orjson.dumps(chain.d["in"])) > bound:
                self._spill(chain, kind, self._bounds_of(name, chain.d["in"]))
        self._compact_leases()
        for lane in lanes.values():
            if len(lane["runs"]) > b.runs_max:
                self._merge_runs(lane)
        chains = [self.s.leases, self.s.retained, self.s.dead]
        chains += [self.s._chain(run) for lane in lanes.values() for run in lane["runs"]]
        for chain in chains:
            if len(chain.d["segs"]) > b.loose_max:
                self._add(chain.fold(self._new_id("m"), b.loose_max // 2, encode_manifest))
            if len(chain.d["holes"]) > b.holes_max:
                self._rewrite_holey_manifest(chain)
            if len(chain.d["mans"]) > b.manifests_max:
                self._merge_manifests(chain)

    @staticmethod
    def _bounds_of(name: str, items: list[Any]) -> dict[str, Any]:
        if name == "retained":
            return {"hi": max(r["finished_at"] for r in items)}
        return {}

    def _spill(self, chain: Chain, kind: str, meta: dict[str, Any]) -> None:
        seg_id = self._new_id(kind)
        self._add(chain.spill(seg_id, encode_segment(kind, chain.d["in"]), meta))

    def _spill_lane(self, lane: dict[str, Any]) -> None:
        """The lane's inline jobs become a segment at the end of the run whose last
        job comes before the first of them, or a run of their own."""
        jobs: list[Job] = lane["in"]
        first = _key(jobs[0])
        fits = [r for r in lane["runs"] if tuple(r.get("last", (1e300, 0))) <= first]
        if fits:
            run = max(fits, key=lambda r: tuple(r["last"]))
        else:
            run = new_chain()
            lane["runs"].append(run)
        meta = {"lo": jobs[0]["run_at"], "hi": max(j["run_at"] for j in jobs)}
        run["lo"] = min(run.get("lo", meta["lo"]), meta["lo"])
        run["top"] = max(run.get("top", meta["hi"]), meta["hi"])
        run["last"] = list(_key(jobs[-1]))
        # The jobs move from the lane into the run's chain, and on into a segment.
        run["n"] += len(jobs)
        run["in"], lane["in"] = jobs, []
        self._spill(self.s._chain(run), "p", meta)

    def _spill_leases(self) -> None:
        """Spilled leases keep no payload: those that carry one (jobs claimed
        from the head) leave it in a payload segment and point there."""
        leases = self.s.leases
        records: list[Job] = leases.d["in"]
        carried = [r for r in records if "payload" in r]
        if carried:
            x_id = self._new_id("x")
            payloads = [{"id": r["id"], "payload": r["payload"]} for r in carried]
            self._add(NewObject(x_id, encode_segment("x", payloads)))
            for i, record in enumerate(carried):
                del record["payload"]
                record["src"] = [x_id, i]
        self.s._spilled_index()  # built before the records move
        seg_id = self._new_id("l")
        self._add(leases.spill(seg_id, encode_segment("l", records), {}))
        self.s._inline = None
        for i, record in enumerate(records):  # the records moved: say where they are now
            self.s._set_spilled(record["id"], Place(seg_id, i, record))

    def _compact_leases(self) -> None:
        """Leases are resolved anywhere (acks, heartbeats of spilled ones): a
        loose segment or a manifest with half its records resolved or more has
        its live records taken inline again (they are small: payloads stay
        where they are), so resolved ones stop taking space. A few a seal."""
        leases = self.s.leases
        sparse = [r for r in leases.d["segs"] if r["live"] * 2 <= r["n"]]
        sparse += [m for m in leases.d["mans"] if m["live"] * 2 <= m.get("total", 0)]
        for unit in sparse[:2]:
            for place in leases.places_in(unit["k"]):
                self.s._drop_lease(place)
                self.s._add_lease(dict(place.item))

    def _merge_runs(self, lane: dict[str, Any]) -> None:
        """More runs than runs_max: the smallest two are merged into one, if
        their live jobs fit in merge_bytes (written once); else they stay."""
        runs = sorted(lane["runs"], key=lambda r: r["n"])
        a, b = runs[0], runs[1]
        jobs = [p.item for run in (a, b) for p in self.s._chain(run).places()]
        data = encode_segment("p", sorted(jobs, key=_key))
        if len(data) > self.bounds.merge_bytes:
            return
        jobs.sort(key=_key)
        lane["runs"].remove(a)
        lane["runs"].remove(b)
        run = new_chain()
        run.update(
            lo=jobs[0]["run_at"], top=max(j["run_at"] for j in jobs), last=list(_key(jobs[-1]))
        )
        lane["runs"].append(run)
        run["in"], run["n"] = jobs, len(jobs)
        meta = {"lo": jobs[0]["run_at"], "hi": run["top"]}
        self._add(self.s._chain(run).spill(self._new_id("p"), data, meta))

    def _merge_manifests(self, chain: Chain) -> None:
        """Too many manifests: the two neighbours with the fewest segments become
        one, if it stays under manifest_bytes (a manifest is rewritten whole, and
        a batch writes a bounded amount); so a chain of a million items keeps a
        few dozen manifest refs in the head, and a lookup opens that many."""
        mans = chain.d["mans"]
        pairs = sorted(range(len(mans) - 1), key=lambda i: mans[i]["segs"] + mans[i + 1]["segs"])
        for i in pairs:
            sizes = sum(chain.manifest(m["k"]).size for m in mans[i : i + 2])
            if sizes <= self.bounds.manifest_bytes:
                obj = chain.merge_manifests(i, 2, self._new_id("m"), encode_manifest)
                if obj is not None:
                    self._add(obj)
                return

    def _rewrite_holey_manifest(self, chain: Chain) -> None:
        holes: dict[str, list[int]] = chain.d["holes"]
        by_manifest: dict[int, int] = {}
        for m, mref in enumerate(chain.d["mans"]):
            for ref in chain.manifest(mref["k"]).refs:
                if ref["k"] in holes:
                    by_manifest[m] = by_manifest.get(m, 0) + len(holes[ref["k"]])
        if not by_manifest:
            return
        worst = max(by_manifest, key=lambda m: by_manifest[m])
        obj = chain.rewrite_manifest(worst, self._new_id("m"), encode_manifest)
        if obj is not None:
            self._add(obj)
