"""The topic state machine: pure functions over a topic's state. No I/O, ever.

A topic's state is its head object (counters, cursors, the claimed set, recent
records, bounded inline lists) plus immutable segment objects the head refers
to. The group committer loads both, calls these functions for each mutation of
a batch, then `seal()` to spill what outgrew the head into new segments, and
writes. The functions mutate the state in place: a batch whose write fails is
thrown away with the state it touched and re-applied to a freshly read one.

Pending jobs live in lanes, one per priority. A lane is a set of runs, each
sorted by (run_at, seq): the inline run in the head, and spilled segment runs
consumed through a cursor. A claim takes the highest-priority lane's earliest
due front, so "priority, then oldest eligible" holds without a per-job index.
"""

from __future__ import annotations

import bisect
import heapq
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from simplequeue.api import JobSpec
from simplequeue.errors import JobNotFound, LeaseLost
from simplequeue.state.limits import Bounds, Policy

FORMAT = 1

Job = dict[str, Any]
Record = dict[str, Any]


# --- segments ----------------------------------------------------------------


class SegmentMissing(Exception):
    """The state machine needs a segment that the caller has not loaded yet."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class Segments:
    """Immutable segment contents, by key, as loaded by the committer.

    Segments never change once written, so entries never go stale; the head
    decides which of them are still referenced and how far each was consumed.
    A job id may stand in several segments (claimed from one run, nacked and
    spilled into another, then retained): every location is kept.
    """

    def __init__(self) -> None:
        self._items: dict[str, list[Any]] = {}
        self._ids: dict[str, list[tuple[str, int]]] = {}  # job id -> [(segment key, index)]

    def add(self, key: str, items: list[Any]) -> None:
        if key in self._items:
            return
        self._items[key] = items
        for i, item in enumerate(items):
            self._ids.setdefault(item["id"], []).append((key, i))

    def get(self, key: str) -> list[Any]:
        try:
            return self._items[key]
        except KeyError:
            raise SegmentMissing(key) from None

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def locate(self, job_id: str) -> list[tuple[str, int]]:
        return self._ids.get(job_id, [])

    def keep_only(self, keys: Iterable[str]) -> None:
        """Forget segments the head no longer references."""
        keep = set(keys)
        for key in [k for k in self._items if k not in keep]:
            for item in self._items.pop(key):
                places = [p for p in self._ids.get(item["id"], []) if p[0] != key]
                if places:
                    self._ids[item["id"]] = places
                else:
                    self._ids.pop(item["id"], None)


def encode_segment(items: list[Any]) -> bytes:
    return orjson.dumps({"format": FORMAT, "items": items})


def decode_segment(data: bytes) -> list[Any]:
    items: list[Any] = orjson.loads(data)["items"]
    return items


# --- the state ---------------------------------------------------------------


def new_head(topic: str) -> dict[str, Any]:
    """The state of a topic that has never been written."""
    return {
        "format": FORMAT,
        "topic": topic,
        "writer": None,
        "write_id": None,
        "recent_writes": [],
        "seq": 0,
        "counters": {"enqueued": 0, "completed": 0, "nacked": 0, "dead": 0, "dead_dropped": 0},
        "lanes": {},
        "claimed": {},
        "retained": {"inline": [], "segs": []},
        "dead": {"inline": [], "segs": []},
    }


@dataclass
class Sealed:
    """A sealed batch: the head to write, the segments to create before it, and
    the segments that may be deleted once it landed."""

    head: bytes = b""
    new_segments: dict[str, bytes] = field(default_factory=dict)
    unreferenced: list[str] = field(default_factory=list)


def _size(value: Any) -> int:
    return len(orjson.dumps(value))


def _key(job: Job) -> tuple[float, int]:
    return (job["run_at"], job["seq"])


class TopicState:
    """One topic's head plus access to its loaded segments.

    Every public method is one mutation or query; mutations validate fully
    before they change anything, so a rejected mutation leaves no trace.
    """

    def __init__(
        self, head: dict[str, Any], segments: Segments, bounds: Bounds, policy: Policy
    ) -> None:
        if head.get("format") != FORMAT:
            raise ValueError(f"unsupported topic format {head.get('format')!r}")
        self.head = head
        self.segments = segments
        self.bounds = bounds
        self.policy = policy
        self._unreferenced: list[str] = []
        self.dirty = False  # set by every mutation that changed something
        self._ids: set[str] | None = None  # ids in the head's inline lists: see exists()
        self._heaps: dict[str, list[tuple[float, int, str]]] = {}  # see _fronts()
        self._run_refs: dict[str, dict[str, dict[str, Any]]] = {}

    @property
    def topic(self) -> str:
        topic: str = self.head["topic"]
        return topic

    # --- reading ------------------------------------------------------------------

    def segment_keys(self) -> list[str]:
        """Every segment the head references."""
        h = self.head
        keys = [r["key"] for lane in h["lanes"].values() for r in lane["runs"]]
        keys += [s["key"] for s in h["retained"]["segs"]]
        keys += [s["key"] for s in h["dead"]["segs"]]
        return keys

    def _runs(self, lane: dict[str, Any]) -> Iterator[tuple[list[Job], int, dict[str, Any] | None]]:
        """(items, position, run ref or None for inline) of each run of a lane."""
        yield lane["inline"], 0, None
        for run in lane["runs"]:
            yield self.segments.get(run["key"]), run["pos"], run

    def pending_jobs(self) -> Iterator[Job]:
        for lane in self.head["lanes"].values():
            for items, pos, _ in self._runs(lane):
                yield from items[pos:]

    def oldest_due_created(self, now: float, scan: int) -> float | None:
        """The enqueue time of the oldest due pending job, looking at no more
        than `scan` due jobs at the front of each run (runs are sorted by
        run_at, so due jobs are a prefix; a re-queued job may be older than
        its place)."""
        oldest: float | None = None
        for lane in self.head["lanes"].values():
            for items, pos, _ in self._runs(lane):
                for job in items[pos : pos + scan]:
                    if job["run_at"] > now:
                        break
                    if oldest is None or job["created_at"] < oldest:
                        oldest = job["created_at"]
        return oldest

    def claimed_soonest(self, n: int) -> list[Job]:
        """The `n` claimed jobs whose leases run out first."""
        claimed = self.head["claimed"].values()
        return heapq.nsmallest(n, claimed, key=lambda j: j["lease_expires_at"])

    def claimed_count(self) -> int:
        return len(self.head["claimed"])

    def dead_newest(self, n: int) -> list[Job]:
        """The `n` jobs that died last, newest first."""
        return self.dead_jobs()[-n:][::-1] if n else []

    def dead_jobs(self) -> list[Job]:
        dead = self.head["dead"]
        jobs: list[Job] = []
        for seg in dead["segs"]:
            jobs.extend(self.segments.get(seg["key"])[seg["pos"] :])
        jobs.extend(dead["inline"])
        return jobs

    def counts(self, now: float) -> dict[str, int]:
        """Jobs by status (api.Counts); the counts never overlap."""
        pending = delayed = 0
        for lane in self.head["lanes"].values():
            for items, pos, _ in self._runs(lane):
                # Runs are sorted by run_at: the not-yet-due ones are a suffix.
                due = bisect.bisect_right(items, now, lo=pos, key=lambda j: j["run_at"]) - pos
                pending += due
                delayed += len(items) - pos - due
        claimed = len(self.head["claimed"])
        dead = self.dead_count()
        c = self.head["counters"]
        return {
            "pending": pending,
            "delayed": delayed,
            "claimed": claimed,
            "completed": c["completed"],
            "dead": dead,
            "enqueued": c["enqueued"],
            "total": pending + delayed + claimed + c["completed"] + dead,
        }

    def totals(self) -> dict[str, int]:
        """What the topic ever did: jobs enqueued, completed, nacked, gone dead,
        and dead jobs dropped over the dead limit."""
        c = self.head["counters"]
        names = ("enqueued", "completed", "nacked", "dead", "dead_dropped")
        return {name: c.get(name, 0) for name in names}

    def dead_count(self) -> int:
        dead = self.head["dead"]
        segs: list[dict[str, int]] = dead["segs"]
        return len(dead["inline"]) + sum(s["n"] - s["pos"] for s in segs)

    def find(self, job_id: str) -> tuple[str, Job | Record] | None:
        """(status, job or retained record) for `job_id`, or None."""
        h = self.head
        if job_id in h["claimed"]:
            return "claimed", h["claimed"][job_id]
        for lane in h["lanes"].values():
            for job in lane["inline"]:
                if job["id"] == job_id:
                    return "pending", job
        for job in h["dead"]["inline"]:
            if job["id"] == job_id:
                return "dead", job
        for record in reversed(h["retained"]["inline"]):
            if record["id"] == job_id:
                return record["status"], record
        return self._find_in_segments(job_id)

    def _find_in_segments(self, job_id: str) -> tuple[str, Job | Record] | None:
        h = self.head
        places = self.segments.locate(job_id)
        if not places:
            return None
        runs = {r["key"]: r["pos"] for lane in h["lanes"].values() for r in lane["runs"]}
        dead = {s["key"]: s["pos"] for s in h["dead"]["segs"]}
        retained = {s["key"] for s in h["retained"]["segs"]}
        for key, index in places:
            if key in runs and index >= runs[key]:
                return "pending", self.segments.get(key)[index]
            if key in dead and index >= dead[key]:
                return "dead", self.segments.get(key)[index]
        for key, index in reversed(places):
            if key in retained:
                record = self.segments.get(key)[index]
                return record["status"], record
        return None

    def exists(self, job_id: str) -> bool:
        """Whether the topic holds `job_id`, live or retained: find() without the
        scans, for duplicate detection on every enqueue."""
        if self._ids is None:
            h = self.head
            ids = {j["id"] for lane in h["lanes"].values() for j in lane["inline"]}
            ids.update(j["id"] for j in h["dead"]["inline"])
            ids.update(r["id"] for r in h["retained"]["inline"])
            self._ids = ids
        return (
            job_id in self.head["claimed"]
            or job_id in self._ids
            or self._find_in_segments(job_id) is not None
        )

    def _noted(self, job_id: str) -> None:
        """An id went into one of the head's inline lists."""
        if self._ids is not None:
            self._ids.add(job_id)

    # --- enqueue --------------------------------------------------------------------

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
            lane = lanes[str(job["priority"])] = {"inline": [], "runs": []}
        inline: list[Job] = lane["inline"]
        if not inline or _key(inline[-1]) <= _key(job):
            inline.append(job)
        else:
            bisect.insort(inline, job, key=_key)

    # --- claim ------------------------------------------------------------------------

    def claim(self, worker_id: str, lease: float | None, count: int, now: float) -> list[Job]:
        """Claim up to `count` due jobs, highest priority then earliest run_at, for
        `lease` seconds (None: the policy's default)."""
        lease = self.policy.default_lease if lease is None else lease
        claimed: list[Job] = []
        lanes = sorted(self.head["lanes"].items(), key=lambda kv: -int(kv[0]))
        for name, lane in lanes:
            while len(claimed) < count:
                job = self._take_front(name, lane, now)
                if job is None:
                    break
                job = dict(job)  # segment items are shared and immutable
                job.update(
                    attempts=job["attempts"] + 1,
                    claimed_by=worker_id,
                    claimed_at=now,
                    heartbeat_at=now,
                    lease_expires_at=now + lease,
                    lease_token=uuid.uuid4().hex,
                )
                self.head["claimed"][job["id"]] = job
                claimed.append(job)
                self.dirty = True
        self._drop_empty_lanes()
        return claimed

    def pop(self, worker_id: str, count: int, now: float) -> list[Job]:
        """Claim and complete up to `count` jobs at once (Redis LPOP semantics):
        whoever pops a job has done it, and nobody else will see it again."""
        jobs = self.claim(worker_id, None, count, now)
        for job in jobs:
            self.ack(job["id"], job["lease_token"], None, now)
        return jobs

    def _fronts(self, name: str, lane: dict[str, Any]) -> list[tuple[float, int, str]]:
        """A heap of (run_at, seq, run key) of the front job of each segment run
        of a lane, so a claim does not scan every run. Entries go stale when a
        run advances; the run's new front is pushed then, so stale ones are
        skipped lazily. Rebuilt when the lane's runs change otherwise."""
        heap = self._heaps.get(name)
        if heap is None:
            heap = []
            for run in lane["runs"]:
                heap.append((*_key(self.segments.get(run["key"])[run["pos"]]), run["key"]))
            heapq.heapify(heap)
            self._heaps[name] = heap
            self._run_refs[name] = {run["key"]: run for run in lane["runs"]}
        return heap

    def _take_front(self, name: str, lane: dict[str, Any], now: float) -> Job | None:
        heap = self._fronts(name, lane)
        refs = self._run_refs[name]
        while heap:
            run_at, seq, key = heap[0]
            run = refs.get(key)
            if run is not None and _key(self.segments.get(key)[run["pos"]]) == (run_at, seq):
                break
            heapq.heappop(heap)  # stale: that run moved on, or is gone
        inline: list[Job] = lane["inline"]
        inline_due = bool(inline) and inline[0]["run_at"] <= now
        run_due = bool(heap) and heap[0][0] <= now
        if inline_due and (not run_due or _key(inline[0]) < heap[0][:2]):
            job: Job = inline.pop(0)
            return job
        if not run_due:
            return None
        _, _, key = heapq.heappop(heap)
        run = refs[key]
        items = self.segments.get(key)
        job = items[run["pos"]]
        run["pos"] += 1
        if run["pos"] < run["n"]:
            heapq.heappush(heap, (*_key(items[run["pos"]]), key))
        else:
            lane["runs"].remove(run)
            del refs[key]
            self._unreferenced.append(key)
        return job

    def _drop_empty_lanes(self) -> None:
        lanes = self.head["lanes"]
        for name in [n for n, lane in lanes.items() if not lane["inline"] and not lane["runs"]]:
            del lanes[name]
            self._heaps.pop(name, None)

    # --- settle: ack, nack, heartbeat -----------------------------------------------

    def _holder(self, job_id: str, token: str | None) -> Job:
        """The claimed job `job_id`, if the caller (with `token`, if given) holds it."""
        job: Job | None = self.head["claimed"].get(job_id)
        if job is None:
            if self.find(job_id) is None:
                raise JobNotFound(f"no job {job_id!r} in topic {self.topic!r}")
            raise LeaseLost(f"job {job_id!r} is not claimed")
        if token is not None and token != job["lease_token"]:
            raise LeaseLost(f"job {job_id!r} is claimed under another lease")
        return job

    def ack(self, job_id: str, token: str | None, result: Any, now: float) -> dict[str, Any]:
        job = self._holder(job_id, token)
        self.dirty = True
        del self.head["claimed"][job_id]
        self.head["counters"]["completed"] += 1
        self._retain(job, "completed", now, result=result)
        return {"id": job_id, "status": "completed"}

    def nack(
        self, job_id: str, token: str | None, delay: float, error: str | None, now: float
    ) -> dict[str, Any]:
        """Back to pending after `delay` seconds, or dead when its attempts are spent."""
        job = self._holder(job_id, token)
        del self.head["claimed"][job_id]
        counters = self.head["counters"]
        counters["nacked"] = counters.get("nacked", 0) + 1
        status = self._release(job, now + delay, error, now)
        return {"id": job_id, "status": status}

    def heartbeat(
        self, job_id: str, token: str | None, lease: float | None, now: float
    ) -> dict[str, Any]:
        """Extend the lease by `lease` seconds, or by the claim's own lease."""
        lease_s = lease
        job = self._holder(job_id, token)
        if lease_s is None:
            lease_s = job["lease_expires_at"] - job["heartbeat_at"]
        self.dirty = True
        job["heartbeat_at"] = now
        job["lease_expires_at"] = now + lease_s
        return {"id": job_id, "lease_expires_at": job["lease_expires_at"]}

    def _release(self, job: Job, run_at: float, error: str | None, now: float) -> str:
        """Back to pending at `run_at`, or dead when its attempts are spent."""
        job = {k: v for k, v in job.items() if k not in _CLAIM_FIELDS}
        job["last_error"] = error if error is not None else job.get("last_error")
        if job["max_attempts"] and job["attempts"] >= job["max_attempts"]:
            self.dirty = True
            job["died_at"] = now
            self.head["dead"]["inline"].append(job)
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
        job = self.head["claimed"].get(job_id)
        if job is None or job["lease_token"] != token:
            return False
        del self.head["claimed"][job_id]
        job = {k: v for k, v in job.items() if k not in _CLAIM_FIELDS}
        job["attempts"] -= 1
        job["run_at"] = min(job["run_at"], now)
        self._push_pending(job)
        return True

    # --- reaper ------------------------------------------------------------------------

    def expired(self, now: float) -> bool:
        return any(j["lease_expires_at"] <= now for j in self.head["claimed"].values())

    def earliest_expiry(self) -> float | None:
        """When the first lease of the claimed set runs out, if any is claimed."""
        claimed = self.head["claimed"].values()
        return min((j["lease_expires_at"] for j in claimed), default=None)

    def reap(self, now: float) -> dict[str, int]:
        """Expired leases back to pending, or dead when attempts are spent."""
        out = {"pending": 0, "dead": 0}
        claimed = self.head["claimed"]
        for job_id in [i for i, j in claimed.items() if j["lease_expires_at"] <= now]:
            job = claimed.pop(job_id)
            out[self._release(job, now, job.get("last_error") or "lease expired", now)] += 1
        return out

    # --- dead letters ------------------------------------------------------------------

    def requeue(self, job_ids: list[str] | None, now: float) -> list[str]:
        """Dead jobs (all, or those named) back to pending with fresh attempts."""
        return [job["id"] for job in self._take_dead(job_ids, now, requeue=True)]

    def purge(self, job_ids: list[str] | None, now: float) -> list[str]:
        """Forget dead jobs (all, or those named)."""
        return [job["id"] for job in self._take_dead(job_ids, now, requeue=False)]

    def _take_dead(self, job_ids: list[str] | None, now: float, requeue: bool) -> list[Job]:
        wanted = None if job_ids is None else set(job_ids)
        dead = self.head["dead"]
        taken: list[Job] = []
        keep_segs = []
        for seg in dead["segs"]:
            items = self.segments.get(seg["key"])[seg["pos"] :]
            hit = [j for j in items if wanted is None or j["id"] in wanted]
            if not hit:
                keep_segs.append(seg)
                continue
            taken.extend(hit)
            rest = [j for j in items if not (wanted is None or j["id"] in wanted)]
            self._unreferenced.append(seg["key"])
            if rest:  # rewritten without the taken jobs at seal()
                dead["inline"][:0] = rest
        dead["segs"] = keep_segs
        hit = [j for j in dead["inline"] if wanted is None or j["id"] in wanted]
        dead["inline"] = [j for j in dead["inline"] if not (wanted is None or j["id"] in wanted)]
        taken.extend(hit)
        self.dirty = self.dirty or bool(taken)
        self._ids = None  # ids left the head's lists: rebuild the index when next needed
        for job in taken:
            if requeue:
                fresh = {k: v for k, v in job.items() if k != "died_at"}
                fresh.update(attempts=0, run_at=now)
                self._push_pending(fresh)
            else:  # its record stays for lookups and duplicate detection
                self._retain(job, "dead", now)
        return taken

    def _enforce_dead_limit(self) -> None:
        dead = self.head["dead"]
        excess = self.dead_count() - self.policy.dead_limit
        while excess > 0:
            if dead["segs"]:
                seg = dead["segs"][0]
                drop = min(excess, seg["n"] - seg["pos"])
                seg["pos"] += drop
                if seg["pos"] >= seg["n"]:
                    dead["segs"].pop(0)
                    self._unreferenced.append(seg["key"])
            else:
                drop = excess
                del dead["inline"][:drop]
                self._ids = None
            self.head["counters"]["dead_dropped"] += drop
            excess -= drop

    # --- retention -----------------------------------------------------------------------

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
        self.head["retained"]["inline"].append(record)

    def _expire_retained(self, now: float) -> None:
        horizon = now - self.policy.retention
        retained = self.head["retained"]
        while retained["segs"] and retained["segs"][0]["newest"] < horizon:
            self._unreferenced.append(retained["segs"].pop(0)["key"])
        inline = retained["inline"]
        cut = 0
        while cut < len(inline) and inline[cut]["finished_at"] < horizon:
            cut += 1
        if cut:
            del inline[:cut]
            self._ids = None

    # --- sealing a batch ----------------------------------------------------------------

    def seal(self, writer: dict[str, Any], write_id: str, now: float) -> Sealed:
        """Finish a batch: expire records, stamp the write, spill what outgrew the
        head into new segments, and serialise the head (Sealed.head)."""
        self._expire_retained(now)
        sealed = Sealed()
        h, bounds = self.head, self.bounds
        h["writer"] = writer
        h["write_id"] = write_id
        h["recent_writes"] = [*h["recent_writes"], write_id][-bounds.recent_writes :]
        data = orjson.dumps(h)
        # A part can outgrow its bound only if the whole head did: measure the
        # parts only then, so a small head costs one serialisation.
        spilled = False
        lanes = h["lanes"]
        if len(data) > bounds.inline_pending_bytes and (
            sum(_size(lane["inline"]) for lane in lanes.values()) > bounds.inline_pending_bytes
        ):
            for priority, lane in lanes.items():
                if lane["inline"]:
                    key = self._new_segment(sealed, write_id, f"p{priority}", lane["inline"])
                    lane["runs"].append({"key": key, "n": len(lane["inline"]), "pos": 0})
                    lane["inline"] = []
                    self._heaps.pop(priority, None)
            spilled = True
        retained = h["retained"]
        if len(data) > bounds.inline_records_bytes and (
            retained["inline"] and _size(retained["inline"]) > bounds.inline_records_bytes
        ):
            key = self._new_segment(sealed, write_id, "r", retained["inline"])
            newest = retained["inline"][-1]["finished_at"]
            retained["segs"].append({"key": key, "n": len(retained["inline"]), "newest": newest})
            retained["inline"] = []
            spilled = True
        dead = h["dead"]
        if len(data) > bounds.inline_dead_bytes and (
            dead["inline"] and _size(dead["inline"]) > bounds.inline_dead_bytes
        ):
            key = self._new_segment(sealed, write_id, "d", dead["inline"])
            dead["segs"].append({"key": key, "n": len(dead["inline"]), "pos": 0})
            dead["inline"] = []
            spilled = True
        if spilled:
            sealed.head = orjson.dumps(h)
            self._ids = None  # spilled ids are found through the segments now
        else:
            sealed.head = data
        referenced = set(self.segment_keys())
        sealed.unreferenced = [k for k in dict.fromkeys(self._unreferenced) if k not in referenced]
        self._unreferenced = []
        return sealed

    def _new_segment(self, sealed: Sealed, write_id: str, kind: str, items: list[Any]) -> str:
        from simplequeue import keys

        key = keys.segment(self.topic, f"{kind}-{write_id}")
        sealed.new_segments[key] = encode_segment(items)
        self.segments.add(key, items)
        return key


_CLAIM_FIELDS = frozenset(
    {"claimed_by", "claimed_at", "heartbeat_at", "lease_expires_at", "lease_token"}
)
