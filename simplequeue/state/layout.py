"""A topic's storage layout (format 2; docs/STORAGE.md draws it): its head, the
chains in it, and what a seal does to keep the head bounded (spill, fold,
merge, compact). Pure, no I/O: objects are read through a SegmentView.

simplequeue.state.topic builds the queue's rules on top (TopicState extends
Layout); nothing here knows what a claim or an ack means beyond where the
records of claimed jobs are kept.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import orjson

from simplequeue import keys
from simplequeue.batching import runs_within
from simplequeue.errors import CorruptData
from simplequeue.state.chain import Chain, NewObject, Place, new_chain
from simplequeue.state.limits import Bounds
from simplequeue.state.schema import check_head
from simplequeue.state.segments import (
    FORMAT,
    Manifest,
    Segment,
    SegmentMissing,
    SegmentView,
    decode_object,
    encode_manifest,
    encode_segment,
)
from simplequeue.state.upgrade import upgrade

Job = dict[str, Any]
Record = dict[str, Any]

CLAIM_FIELDS = ("claimed_by", "claimed_at", "heartbeat_at", "lease_expires_at", "lease_token")
# Segments of a manifest fetched with one that is missing: those after it.
PREFETCH_FOLLOWING = 16
# A read past a run's front into a small segment (of at most AHEAD_ITEMS jobs)
# fetches what holds the next AHEAD_ITEMS jobs of every run in small segments,
# AHEAD_KEYS objects at most, as many as the cache spares (prefetch): a claim
# of many jobs, or a count or a listing, over many runs of small segments then
# costs a few rounds, not one per run.
AHEAD_ITEMS = 8
AHEAD_LANE_ITEMS = 64  # the same, in the lane read past its fronts
AHEAD_KEYS = 512
AHEAD_WALK = 1024  # segments of a run looked at, at hand or not, at most
# What one reap takes at most of the leases that ran out (take_due_leases),
# whatever the backlog (a fleet of workers died with 100,000 jobs claimed):
# reaped jobs are rewritten into pending segments as a merge part rewrites
# jobs, so as much as a merge part (merge_bytes of jobs; one at least);
# their payloads are read from REAP_SOURCES segments at most (each about
# segment_bytes at most: what a batch holds in memory stays bounded too);
# and REAP_LEASES leases at most (jobs with small payloads). The rest stay
# due, and the owner tends the topic again at once.
REAP_LEASES = 500
REAP_SOURCES = 8
# Holes kept in the head: past holes_max in a chain, or past HEAD_HOLES_MAX in
# all of the head's chains (a head has one per run of each lane, and more),
# the chains with most go out to manifests (their loose refs folded, their
# manifests rewritten): past the first object of a seal, only those that fit
# in HOLES_BYTES in all (their sizes estimated) are written.
HEAD_HOLES_MAX = 4096
HOLES_BYTES = 64 * 1024
HOLE_BYTES = 6  # a hole's index in JSON, about
# Runs merged into one at most (the fewer, the more often a job is rewritten).
MERGE_FAN_IN = 8
# A seal may write merging runs up to merge_bytes, and as much again at most
# for this many times the pending jobs it spilled: so merges keep up with the
# spills of small batches, and a batch writes a bounded amount.
MERGE_PER_SPILLED = 4
# A job larger than merge_bytes is merged by moving its segment whole into the
# run merged into (the object as it is, its ref in that run), when the
# segment's live jobs come before the other runs' fronts and at most this many
# of its positions are consumed (holes in the ref moved). A move counts as
# MOVE_COST bytes of the seal's merge budget (it adds a ref to the head).
MOVE_HOLES_MAX = 32
MOVE_COST = 2048
# Segment and manifest refs the runs of all lanes keep in the head together
# (about 100 bytes each): past it, the runs with most fold theirs or merge
# their manifests. Each run's loose_max and manifests_max alone would let 64
# lanes keep 64 x 32.
RUN_REFS_MAX = 512
# What a seal writes at most folding the runs' refs and merging their
# manifests (past its first object): this, and a part of what it spilled into
# lanes (so that upkeep keeps up with large batches). The seal's whole upkeep
# has as much more than Bounds.upkeep_bytes (less the head) for the jobs it
# spilled into lanes.
RUN_UPKEEP_BYTES = 64 * 1024
# Once a lane keeps more than runs_max runs, merges go first and may write
# merge_bytes a seal whatever is left of the seal's upkeep budget (upkeep_bytes
# less the head), and the runs' folds after them this much: runs that piled up
# made the head larger, which left merges nothing, and runs piled up faster.
RUN_TIDY_FLOOR = 48 * 1024
UPKEEP_PER_SPILLED = 4


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
        "prios": {},
        "leases": new_chain(),
        "retained": new_chain(),
        "dead": new_chain(),
        "outbox": new_chain(),
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
        try:
            head = upgrade(head)
        except (KeyError, TypeError, ValueError, AttributeError, AssertionError) as exc:
            raise CorruptData(key, f"not a well-formed format-1 head ({exc!r})") from None
    if head.get("format") != FORMAT:
        raise CorruptData(key, f"format {head.get('format')!r}, which this broker cannot read")
    if head.get("topic") != topic:
        raise CorruptData(key, f"the head of topic {head.get('topic')!r}, not of {topic!r}")
    head.setdefault("outbox", new_chain())  # heads written before follow-ups had none
    check_head(key, head)
    upgraded: dict[str, Any] = head
    return upgraded


@dataclass
class Sealed:
    """A sealed batch: the head to write, and the objects to create before it."""

    head: bytes = b""
    new_objects: dict[str, bytes] = field(default_factory=dict)
    # The same objects decoded (as this seal read them): a cache takes these,
    # rather than decoding the bytes again.
    decoded: dict[str, Segment | Manifest] = field(default_factory=dict)


def holes_kept(chain: dict[str, Any]) -> int:
    """How many holes of manifested segments a chain keeps in the head."""
    return sum(len(kept) for kept in chain["holes"].values())


def loose_holes(chain: dict[str, Any]) -> int:
    """How many holes a chain's loose segment refs keep in the head."""
    return sum(len(ref.get("holes", ())) for ref in chain["segs"])


def _fold_size(refs: list[dict[str, Any]]) -> int:
    """About the size of a manifest of these loose refs: each ref (its holes
    included) and its id index (a 32-bit hash an item, in base64)."""
    return sum(len(orjson.dumps(ref)) + 6 * ref["n"] for ref in refs)


def job_key(job: Job) -> tuple[float, int]:
    return (job["run_at"], job["seq"])


def _merging(lane: dict[str, Any]) -> bool:
    return any("merge" in run for run in lane["runs"])


def _groups(lane: dict[str, Any], kind: str | None = None) -> set[int]:
    """The lane's merges under way (of runs marked `kind`, else any)."""
    return {
        r.get("group", 0)
        for r in lane["runs"]
        if "merge" in r and (kind is None or r["merge"] == kind)
    }


def _probe(chain: Chain, missing: list[str]) -> None:
    """Read the chain's front, or say what it takes."""
    try:
        chain.first()
    except SegmentMissing as miss:
        missing.append(miss.key)


def _ahead(chain: Chain, items: int) -> list[str]:
    """What the chain's next `items` jobs not at hand take, while they are in
    small segments (of at most AHEAD_ITEMS jobs each): segments, and a
    manifest not at hand that names the next ones."""
    missing: list[str] = []
    try:
        for walked, (ref, _man, start) in enumerate(chain.units()):
            if items <= 0 or walked >= AHEAD_WALK:
                break
            try:
                chain.segment(ref["k"])
            except SegmentMissing as miss:
                if ref["n"] > AHEAD_ITEMS:
                    break
                missing.append(miss.key)
                items -= ref["n"] - start
    except SegmentMissing as miss:  # a manifest
        missing.append(miss.key)
    return missing


def _unmark(run: dict[str, Any]) -> None:
    run.pop("merge", None)
    run.pop("group", None)


def _alike(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs to merge: the smallest (by live jobs) of two to MERGE_FAN_IN
    runs next to one another by size, none more than twice the rest of them
    together (so a job is rewritten only into a run at least half as large
    again: a few times in all, however many jobs come); none if no runs are
    that alike (then sizes grow at least threefold run to run, and runs are
    few: a dozen for a million spills)."""
    ordered = sorted(runs, key=lambda r: r["n"])
    for i in range(len(ordered) - 1):
        total, best = ordered[i]["n"], 0
        for j in range(i + 1, min(i + MERGE_FAN_IN, len(ordered))):
            if ordered[j]["n"] <= 2 * total:
                best = j
            total += ordered[j]["n"]
        if best:
            return ordered[i : best + 1]
    return []


class Layout:
    """One topic's head, and its objects through `view`: the chains, where the
    claimed jobs' records are, batches (begin, rollback) and sealing."""

    def __init__(
        self,
        head: dict[str, Any],
        view: SegmentView,
        bounds: Bounds,
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
        self.dirty = False  # set by every mutation that changed something
        # The claimed jobs whose records are inline, by id (the head's own
        # dicts). Records in segments are found through the chain (manifests'
        # id indexes, loose segments read): no index of them is kept, so
        # memory does not grow with the number of jobs claimed.
        self._inline: dict[str, Job] | None = None
        self._inline_ids: set[str] | None = None  # ids in the inline lists (duplicates)
        # Whether the id filter has covered every segment the head names. Only
        # a seal makes objects (so new refs), and a rollback changes the head:
        # both clear it, and one cover serves every duplicate check between.
        self._ids_covered = False

    @property
    def topic(self) -> str:
        topic: str = self.head["topic"]
        return topic

    def _chain(self, d: dict[str, Any]) -> Chain:
        return Chain(d, self.topic, self._view)

    def _among(self, obj_id: str, objects: AbstractSet[str]) -> bool:
        """Whether the object `obj_id` (an id, as refs name it) is one of
        `objects` (keys: those known unreadable), its key made only if any."""
        return bool(objects) and keys.segment(self.topic, obj_id) in objects

    @property
    def leases(self) -> Chain:
        return self._chain(self.head["leases"])

    @property
    def retained(self) -> Chain:
        return self._chain(self.head["retained"])

    @property
    def dead(self) -> Chain:
        return self._chain(self.head["dead"])

    @property
    def outbox(self) -> Chain:
        """Follow-up jobs for other topics, recorded by acks, waiting for their
        owner to enqueue them there (SPEC 9)."""
        return self._chain(self.head["outbox"])

    def _chains(self) -> list[Chain]:
        """Every chain but the lanes' runs."""
        return [self.leases, self.retained, self.dead, self.outbox]

    def _runs(self, lane: dict[str, Any]) -> list[Chain]:
        return [self._chain(run) for run in lane["runs"]]

    def _payload(self, record: Job) -> Any:
        """A claimed or pending job's payload, wherever it is kept."""
        if "src" not in record:
            return record.get("payload")
        seg_id, index = record["src"]
        items = self._chain(new_chain()).segment(seg_id).items
        if index >= len(items):
            key = keys.segment(self.topic, seg_id)
            raise CorruptData(key, f"it holds {len(items)} items, a lease names item {index}")
        return items[index]["payload"]

    def _source(self, record: Job) -> Segment:
        """The segment a claimed job's payload is in (SegmentMissing if not at hand)."""
        return self._chain(new_chain()).segment(record["src"][0])

    def _sources_missing(self, records: list[Job], most: int | None = None) -> tuple[str, ...]:
        """The keys of the payload segments of `records` not at hand (`most` at most)."""
        missing: list[str] = []
        for seg_id in dict.fromkeys(r["src"][0] for r in records if "src" in r):
            if most is not None and len(missing) >= most:
                break
            try:
                self._chain(new_chain()).segment(seg_id)
            except SegmentMissing as miss:
                missing.append(miss.key)
        return tuple(missing)

    def _payload_sources(self, records: list[Job]) -> None:
        """Raise SegmentMissing naming at once every segment not at hand that
        holds a payload of `records` (claimed jobs' records): no chain names a
        payload segment (the pending segment its job was claimed from, or a
        lease spill's `x` segment), so the committer prefetches nothing with
        one, and reading them one by one would cost a fetch round each."""
        missing = self._sources_missing(records)
        if missing:
            raise SegmentMissing(missing[0], tuple(missing[1:]))

    # --- the claimed set -------------------------------------------------------------

    def _inline_index(self) -> dict[str, Job]:
        if self._inline is None:
            self._inline = {r["id"]: r for r in self.head["leases"]["in"]}
        return self._inline

    def _lease_of(self, job_id: str) -> Place | None:
        """Where the claimed job `job_id`'s record is, if it is claimed."""
        record = self._inline_index().get(job_id)
        if record is not None:
            return Place(None, 0, record)
        spilled = self.leases.locate(job_id, inline=False)
        return spilled[-1] if spilled else None

    def _leased(self) -> Iterator[Place]:
        """Every claimed job's record (reads every lease segment)."""
        return self.leases.places()

    def _add_lease(self, record: Job) -> None:
        self.leases.append(record)
        self._inline_index()[record["id"]] = record

    def _drop_lease(self, place: Place) -> None:
        inline = self._inline_index()  # built before the record leaves the head
        self.leases.remove(place)
        if place.seg is None:
            del inline[place.item["id"]]

    def next_expiry(self) -> float | None:
        """No lease runs out before this (None: nothing is claimed), from the
        head alone: inline records, and the bound each lease segment's ref (or
        manifest's) keeps of its records' expiries. A bound may be early (its
        record was acked or heartbeated since): due_leases() tightens it."""
        d = self.head["leases"]
        times = [r["lease_expires_at"] for r in d["in"]]
        times += [u.get("lo", -1e300) for u in d["segs"] + d["mans"]]
        return min(times, default=None)

    def due_leases(self, now: float) -> list[Place]:
        """The claimed jobs whose leases ran out by `now`. Reads only the lease
        segments whose bound says they may hold one."""
        return self._find_due(now)[0]

    def _find_due(
        self, now: float, most: int | None = None
    ) -> tuple[list[Place], dict[str, tuple[str, float]]]:
        """due_leases(): every one, or with `most`, those found until there are
        that many (inline records first, then a lease segment at a time, each
        read whole). With, for each lease segment read, by id, the unit that
        counts it (itself, or its manifest) and the earliest expiry of its
        leases not due; and, when the scan went through, every manifest whose
        bound said it may hold one, read or not (its bound is stale: a
        segment that set it was used up, and the manifest's others have
        bounds of their own)."""
        leases = self.leases
        due = [Place(None, 0, r) for r in leases.d["in"] if r["lease_expires_at"] <= now]

        def maybe(ref: dict[str, Any]) -> bool:
            lo: float = ref.get("lo", -1e300)
            return lo <= now

        scanned: dict[str, tuple[str, float]] = {}
        for ref, man, start, mref in leases.bounded_units(maybe):
            if most is not None and len(due) >= most:
                break
            holes = leases.holes_of(ref)
            items = leases.items(ref)
            left = 1e300
            for i in range(start, ref["n"]):
                if i in holes:
                    continue
                expires = items[i]["lease_expires_at"]
                if expires <= now:
                    due.append(Place(ref["k"], i, items[i], man))
                else:
                    left = min(left, expires)
            scanned[ref["k"]] = (ref["k"] if mref is None else mref["k"], left)
        else:
            for mref in leases.d["mans"]:
                if maybe(mref):
                    scanned.setdefault(mref["k"], (mref["k"], 1e300))
        return due, scanned

    def take_due_leases(self, now: float) -> list[Place]:
        """A part of the claimed jobs whose leases ran out by `now`, which the
        caller takes out (every one): the first found, REAP_LEASES at most,
        their payloads in REAP_SOURCES segments at most, and about
        merge_bytes of jobs (one at least). However many ran out, a reap
        then reads and rewrites a bounded amount; the rest stay due at once
        (next_expiry() says so) for the next. The bounds of the lease
        segments it read are tightened to the leases they keep (metadata
        only: a bound is never later than a lease it covers, so the next
        write may carry it)."""
        due, scanned = self._find_due(now, REAP_LEASES)
        sources: set[str] = set()
        part = due
        for n, place in enumerate(due):
            if "src" in place.item:
                sources.add(place.item["src"][0])
                if len(sources) > REAP_SOURCES:
                    part = due[:n]
                    break
        self._payload_sources([p.item for p in part])  # every one missing, in one round
        size = 0
        for n, place in enumerate(part):
            size += len(orjson.dumps(place.item)) + len(orjson.dumps(self._payload(place.item)))
            if n and size > self.bounds.merge_bytes:
                part = part[:n]
                break
        self._lower_lease_bounds(scanned, due[len(part) :])
        return part

    def _lower_lease_bounds(self, scanned: dict[str, tuple[str, float]], kept: list[Place]) -> None:
        """The bounds of the units (loose lease segments, manifests) whose
        segments _find_due() read (`scanned`) tightened to the leases they keep
        once the due ones are taken out, but those `kept` (left for later)."""
        leases = self.leases
        lows: dict[str, float] = {}  # unit key -> new bound
        for unit, left in scanned.values():
            lows[unit] = min(lows.get(unit, 1e300), left)
        for place in kept:
            if place.seg is not None:
                unit = scanned[place.seg][0]
                lows[unit] = min(lows[unit], place.item["lease_expires_at"])
        for ref in leases.d["segs"]:
            if ref["k"] in lows:
                ref["lo"] = lows[ref["k"]]
        for m, mref in enumerate(leases.d["mans"]):
            if mref["k"] in lows:
                # Its segments not read keep their own bounds (those before the
                # cursor are used up).
                refs = leases.manifest(mref["k"]).refs[leases.d["mpos"] if m == 0 else 0 :]
                unread = [r.get("lo", -1e300) for r in refs if r["k"] not in scanned]
                mref["lo"] = min([lows[mref["k"]], *unread])

    def soonest_leases(self, n: int) -> list[Job]:
        """The `n` claim records whose leases run out first. Lease segments are
        read in the order of their bounds, and only while one may hold a record
        that runs out sooner than the n-th found so far."""
        if n <= 0:
            return []
        leases = self.leases
        found = sorted(leases.d["in"], key=lambda r: r["lease_expires_at"])[:n]
        # (bound, tie-breaker, segment ref or manifest ref, its manifest or None)
        todo: list[tuple[float, int, dict[str, Any], str | None, bool]] = []
        for mref in leases.d["mans"]:
            todo.append((mref.get("lo", -1e300), len(todo), mref, None, True))
        for ref in leases.d["segs"]:
            todo.append((ref.get("lo", -1e300), len(todo), ref, None, False))
        heapq.heapify(todo)
        tie = len(todo)
        while todo:
            lo, _, unit, man, is_manifest = heapq.heappop(todo)
            if len(found) >= n and lo >= found[-1]["lease_expires_at"]:
                break
            if is_manifest:
                refs = leases.manifest(unit["k"]).refs
                if unit is leases.d["mans"][0]:
                    refs = refs[leases.d["mpos"] :]  # those before are used up
                for ref in refs:
                    tie += 1
                    heapq.heappush(todo, (ref.get("lo", -1e300), tie, ref, unit["k"], False))
                continue
            found += [p.item for p in leases.live_in(unit, man)]
            found = sorted(found, key=lambda r: r["lease_expires_at"])[:n]
        return found

    # --- batches: begin, and roll back ----------------------------------------------------

    def begin(self) -> None:
        """A batch starts (nothing to note: every index is derived from the head)."""

    def rollback(self, head: dict[str, Any]) -> None:
        """Undo the batch since begin(): `head` is the head it started from,
        freshly decoded; what is derived from the head is derived again when
        wanted. The batch waited for an object, most likely: applying it again
        finds it."""
        self.head = head
        self._inline = None
        self._inline_ids = None
        self._ids_covered = False
        self._view.fresh.clear()
        self.dirty = False

    # --- the objects it needs ---------------------------------------------------------------------

    def landed(self) -> None:
        """The last seal's objects are written, and the committer's cache holds
        them (or lets them go, within its budget): this state does not hold
        on to them too (a topic's last write would stay in memory until its
        next). One wanted again is read through the view."""
        self._view.fresh.clear()

    def referenced(self) -> list[str]:
        """Keys of every object this state needs, payloads of claimed jobs
        included (opens manifests, reads lease segments)."""
        ids: list[str] = []
        for lane in self.head["lanes"].values():
            for run in self._runs(lane):
                ids += run.object_ids()
        for chain in self._chains():
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
        for chain in self._chains():
            ids += chain.direct_ids()
        return [keys.segment(self.topic, i) for i in ids]

    def hold(self, key: str, obj: Segment | Manifest) -> None:
        """Keep `obj` for this state's reads, whatever its cache does."""
        self._view.seen[key] = obj

    def release(self) -> None:
        """Let go of what this state held on to (its reads are done for now)."""
        self._view.seen.clear()

    def prefetch(self, missing: str, *more: str) -> tuple[list[str], list[str]]:
        """What to fetch when `missing` is wanted, and what to read ahead.

        To fetch: it, the segments after it in its manifest when the one
        before it is at hand (PREFETCH_FOLLOWING of them: a chain read
        through, as the dead-letter queue's listing or purge does, then costs
        a round trip per so many segments, not one each), and every object
        the head names itself (manifests, loose segments), and when `missing`
        is at the front of a run, the front segment of every run (a claim, a
        count, a listing reads them all). Fetched together, one miss costs
        one round trip instead of one per object. With `more` missing too:
        them as well (not what follows them: finding it reads every manifest
        once a key).

        To read ahead, when `missing` is the first object not at hand past a
        run's front, in small segments (a read goes on through the runs: a
        claim of many, a count, a listing): what holds the next jobs of every
        run, the earliest first (_missing_ahead); the caller takes as many as
        its cache can spare. Else nothing.

        Asked while they are missing: a run's front, or its next segments,
        are known by being missing too."""
        every = [missing, *more]
        fronts = self._missing_fronts()
        wanted = [*every, *self._following(missing), *self.direct_keys()]
        if set(every) & set(fronts):
            return wanted + fronts, []
        return wanted, self._missing_ahead(missing)

    def _missing_fronts(self) -> list[str]:
        """The objects the runs' fronts take that are not at hand (a front under
        a manifest not at hand: that manifest)."""
        missing: list[str] = []
        for lane in self.head["lanes"].values():
            for run in self._runs(lane):
                _probe(run, missing)
        return missing

    def _missing_ahead(self, missing: str) -> list[str]:
        """When `missing` is the first of what a run's next jobs not at hand
        take (in small segments): what the next AHEAD_ITEMS take, of every run,
        each run's first before any run's second, and deeper (AHEAD_LANE_ITEMS)
        in the lane of `missing`, first (a claim reads a lane through); at most
        AHEAD_KEYS in all. Else nothing."""
        runs = [[*self._runs(lane)] for lane in self.head["lanes"].values()]
        lanes = [[_ahead(run, AHEAD_ITEMS) for run in lane] for lane in runs]
        at = next(
            (i for i, lane in enumerate(lanes) if any(r[:1] == [missing] for r in lane)), None
        )
        if at is None:
            return []
        first = [_ahead(run, AHEAD_LANE_ITEMS) for run in runs[at]]
        wanted: list[str] = []
        for per_run in (first, [r for i, lane in enumerate(lanes) if i != at for r in lane]):
            for depth in range(max(map(len, per_run), default=0)):
                wanted += [found[depth] for found in per_run if depth < len(found)]
                if len(wanted) >= AHEAD_KEYS:
                    return wanted[:AHEAD_KEYS]
        return wanted

    def _following(self, missing: str) -> list[str]:
        """The keys of the segments after `missing` in the manifest that names
        it, when the chain is being read through: that manifest is at hand,
        and so is the segment before `missing` (none otherwise: a look-up of
        one job wants one segment)."""
        chains = [*self._chains()]
        for lane in self.head["lanes"].values():
            chains += self._runs(lane)
        for chain in chains:
            for mref in chain.d["mans"]:
                try:
                    refs = chain.manifest(mref["k"]).refs
                except SegmentMissing:
                    continue
                names = [keys.segment(self.topic, ref["k"]) for ref in refs]
                if missing not in names:
                    continue
                at = names.index(missing)
                if at == 0:
                    return []
                try:
                    chain.segment(refs[at - 1]["k"])
                except SegmentMissing:
                    return []
                return names[at + 1 : at + 1 + PREFETCH_FOLLOWING]
        return []

    def expire(self, now: float, unreadable: AbstractSet[str] = frozenset()) -> None:
        """What the rules drop before a seal (retention): nothing, here. What
        reads an object of `unreadable` stays (see seal())."""

    # --- sealing a batch ---------------------------------------------------------------------

    def seal(
        self,
        writer: dict[str, Any],
        write_id: str,
        now: float,
        unreadable: AbstractSet[str] = frozenset(),
        tidy: bool = True,
    ) -> Sealed:
        """Finish a batch: expire records, stamp the write, spill what outgrew
        the head into new objects, tidy (upkeep), and serialise the head
        (Sealed.head). The upkeep leaves alone the objects of `unreadable`
        (keys of objects known corrupt or gone: their refs stay as they are)
        and what it could reach only through them; without `tidy`, it does
        nothing (only the batch's own spills are written)."""
        self.expire(now, unreadable)
        h, bounds = self.head, self.bounds
        h["writer"] = writer
        h["write_id"] = write_id
        writers: dict[str, str] = h["writers"]
        writers.pop(writer["broker_id"], None)
        writers[writer["broker_id"]] = write_id  # the newest last
        while len(writers) > bounds.writers_max:
            del writers[next(iter(writers))]
        if "prios" in h:  # counted up to this write (TopicState._prios)
            h["prios_at"] = write_id
        sealed = Sealed()
        self._view.fresh.clear()  # the last seal's objects are in the view by now
        data = orjson.dumps(h)
        smallest = min(
            bounds.inline_pending_bytes,
            bounds.inline_leases_bytes,
            bounds.inline_records_bytes,
            bounds.inline_dead_bytes,
            bounds.inline_outbox_bytes,
        )
        # A part can outgrow its bound only if the whole head did: measure the
        # parts only then, so a small head costs one serialisation.
        if len(data) > smallest or (tidy and self._needs_upkeep(unreadable)):
            _Sealer(self, sealed, write_id, unreadable, now).run(tidy)
            data = orjson.dumps(h)
            self._inline_ids = None  # spilled ids are found through the segments now
            self._ids_covered = False  # and the filter has not seen their segments
        # A copy of its length: orjson's bytes keep the buffer they were written
        # in (4 KB at least, up to some 18 times a long head's length), and the
        # committer holds the head of each of up to topics_max topics.
        sealed.head = bytes(memoryview(data))
        return sealed

    def _needs_upkeep(self, unreadable: AbstractSet[str]) -> bool:
        """Whether a chain has too many loose segments or kept holes, the runs
        of all lanes too many refs, or a lane too many runs or a merge under
        way (which a seal tidies, or takes a part further, whatever the
        head's size); a sparse lease segment, but one of `unreadable`, which
        no seal compacts (so it does not call for the sealer at every write)."""
        h, b = self.head, self.bounds
        chains = [h["leases"], h["retained"], h["dead"], h["outbox"]]
        chains += [run for lane in h["lanes"].values() for run in lane["runs"]]
        sparse = any(
            r["live"] * 2 <= r["n"] and not self._among(r["k"], unreadable)
            for r in h["leases"]["segs"]
        )
        crowded = any(
            len(c["segs"]) > b.loose_max
            or holes_kept(c) > b.holes_max
            or loose_holes(c) > b.holes_max
            or len(c["mans"]) > b.manifests_max
            for c in chains
        )
        crowded = crowded or sum(holes_kept(c) + loose_holes(c) for c in chains) > HEAD_HOLES_MAX
        runs = chains[4:]
        crowded = crowded or (
            sum(len(r["segs"]) + len(r["mans"]) for r in runs) > RUN_REFS_MAX
            and any(len(r["segs"]) + len(r["mans"]) > 1 for r in runs)
        )
        lanes = h["lanes"].values()
        return (
            sparse or crowded or any(len(ln["runs"]) > b.runs_max or _merging(ln) for ln in lanes)
        )


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

    def keep(self, key: str, data: bytes, items: list[Any] | None = None) -> Segment | Manifest:
        """A new object of the seal, `data` as written: the segment of `items`
        when given (items nothing else holds: segments are never changed, and
        the head has let go of them), else decoded from `data` (unchecked:
        the seal made it)."""
        if items is not None:
            obj: Segment | Manifest = Segment(key, items, len(data))
        else:
            obj = decode_object(key, data, check=False)
        self.fresh[key] = obj
        return obj

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

    def __init__(
        self,
        state: Layout,
        sealed: Sealed,
        write_id: str,
        unreadable: AbstractSet[str],
        now: float,
    ) -> None:
        self.s = state
        self.now = now  # the seal's time: jobs due by then are "due" (_spill_lane)
        self.sealed = sealed
        # Objects known corrupt or gone (the committer's): upkeep leaves them
        # and their refs alone, and what it could only reach through them.
        self.unreadable = unreadable
        self.attempt = write_id[:12]
        self.bounds = state.bounds
        # The seal's upkeep (all it writes but the batch's own spills) shares
        # one budget: upkeep_bytes less the head (run() sets it), past its
        # first object. `made`: bytes of the objects the seal made so far;
        # `upkept`: of those (and records compacted), what upkeep wrote.
        self.budget = 0
        self.made = 0
        self.upkeep_from = 0
        self.compacted = 0

    def _new_id(self, kind: str) -> str:
        n = self.s.head["next"]
        self.s.head["next"] = n + 1
        return f"{kind}{n}-{self.attempt}"

    def _add(self, obj: NewObject, items: list[Any] | None = None) -> int:
        """`obj` is written with the head; the rest of the seal reads it. With
        `items`, it is the segment of those items, which the head has let go
        of (spilled): they become its items as they are, not decoded again.
        Its size."""
        key = keys.segment(self.s.topic, obj.id)
        self.sealed.new_objects[key] = obj.data
        self.sealed.decoded[key] = self.s._view.keep(key, obj.data, items)
        self.made += len(obj.data)
        return len(obj.data)

    @property
    def upkept(self) -> int:
        """What the seal's upkeep wrote so far (records compacted counted as
        the bytes they are, inline or spilled again)."""
        return self.made - self.upkeep_from + self.compacted

    def _room(self, share: int | None = None, since: int = 0) -> int | None:
        """What upkeep may still write in this seal: None while it wrote
        nothing (its first object may be as large as it is, so that upkeep
        always goes on), else what is left of the seal's budget, and of
        `share` (a step's own part of it) when given, counted from
        `since` (the step's start, as `upkept` was)."""
        if not self.upkept:
            return None
        left = self.budget - self.upkept
        if share is not None:
            left = min(left, share - (self.upkept - since))
        return left

    def _bad(self, obj_id: str) -> bool:
        """Whether the object `obj_id` (an id, as refs name it) is unreadable."""
        return self.s._among(obj_id, self.unreadable)

    def _readable(self, refs: list[dict[str, Any]]) -> int:
        """How many of `refs` come before the first unreadable one (a fold
        takes segments in their order: it stops there)."""
        return next((i for i, ref in enumerate(refs) if self._bad(ref["k"])), len(refs))

    def _met_bad(self, error: SegmentMissing | CorruptData) -> bool:
        """Whether a read failed on an unreadable object (the caller leaves
        what it was reading alone); other misses are the committer's."""
        return bool(self.unreadable) and error.key in self.unreadable

    def run(self, tidy: bool = True) -> None:
        h, b = self.s.head, self.bounds
        lanes = h["lanes"]
        # The batch's own: what outgrew the head spills.
        spilled = self._spill_lanes()
        if len(orjson.dumps(h["leases"]["in"])) > b.inline_leases_bytes:
            self._spill_leases()
        for name, bound, kind in (
            ("retained", b.inline_records_bytes, "r"),
            ("dead", b.inline_dead_bytes, "d"),
            ("outbox", b.inline_outbox_bytes, "o"),
        ):
            chain = self.s._chain(h[name])
            if chain.d["in"] and len(orjson.dumps(chain.d["in"])) > bound:
                self._spill(chain, kind, self._bounds_of(name))
        if not tidy:
            return
        # Upkeep, within one budget: upkeep_bytes less the head, and a part
        # of the pending jobs the batch spilled (their manifests keep up with
        # large batches), past the first object. What keeps the head bounded
        # goes first: a manifest rewrite its holes call for (it may be the
        # seal's one large object), the leases' compaction (merge_bytes at
        # most, which takes the holes of sparse loose segments out with
        # them), the other holes, the chains' manifests and loose refs, the
        # runs' refs, and the runs. What does not fit waits for the next
        # seals (docs/STORAGE.md, Upkeep).
        self.budget = b.upkeep_bytes - len(orjson.dumps(h)) + spilled // UPKEEP_PER_SPILLED
        self.upkeep_from = self.made
        chains = self.s._chains()
        runs = [self.s._chain(run) for lane in lanes.values() for run in lane["runs"]]
        if self._rewrites_due(chains + runs):
            self._take_holes(chains + runs)
        # Compacted records come inline, and go out again when they are too
        # many for the head.
        self._compact_leases()
        if len(orjson.dumps(h["leases"]["in"])) > b.inline_leases_bytes:
            self._spill_leases()
        self._take_holes(chains + runs)
        for chain in chains:
            while len(chain.d["mans"]) > b.manifests_max:
                room = self._room()
                if (room is not None and room <= 0) or self._merge_manifests(chain, room) is None:
                    break
        for chain in chains:
            # A batch may spill several segments into one chain: fold until the
            # head holds no more loose refs than its bound.
            while len(chain.d["segs"]) > b.loose_max:
                room = self._room()
                half = b.loose_max // 2
                count = self._readable(chain.d["segs"][:half])  # cut short by one unreadable
                if count < min(2, half) or (
                    room is not None and _fold_size(chain.d["segs"][:count]) > room
                ):
                    break
                self._add(chain.fold(self._new_id("m"), count, encode_manifest))
        # Merges make runs fewer (and their refs with them): once a lane keeps
        # more than runs_max, they go before the refs' folds, with a floor of
        # budget the head does not shrink (else runs piled up as the head
        # grew, and the head grew with them).
        merge_budget = b.merge_bytes + min(MERGE_PER_SPILLED * spilled, b.merge_bytes)
        crowded = any(len(lane["runs"]) > b.runs_max for lane in lanes.values())
        if crowded:
            self._merge_runs(merge_budget, floor=b.merge_bytes)
        self._tidy_runs(
            runs,
            RUN_UPKEEP_BYTES + spilled // UPKEEP_PER_SPILLED,
            floor=RUN_TIDY_FLOOR if crowded else 0,
        )
        if not crowded:
            self._merge_runs(merge_budget)

    def _rewrites_due(self, chains: list[Chain]) -> bool:
        """Whether the holes kept for manifested segments call for a manifest
        rewrite (_take_holes): a chain keeps more than holes_max, or the head
        more than HEAD_HOLES_MAX in all."""
        kept = [holes_kept(c.d) for c in chains]
        total = sum(kept) + sum(loose_holes(c.d) for c in chains)
        return total > HEAD_HOLES_MAX or any(k > self.bounds.holes_max for k in kept)

    def _take_holes(self, chains: list[Chain]) -> None:
        """Holes the head keeps go out to manifests, the chains with most
        first: a chain's loose refs are folded (their holes go with them), its
        manifests rewritten (with the holes kept for their segments). Those of
        chains past holes_max, and while the head keeps more than
        HEAD_HOLES_MAX in all, the others'; past the seal's first object of
        upkeep, only those that fit in HOLES_BYTES and in the seal's budget,
        the rest left to the next seals."""
        b = self.bounds

        def held(chain: Chain) -> int:
            return loose_holes(chain.d) + holes_kept(chain.d)

        total = sum(held(c) for c in chains)
        start = self.upkept
        for chain in sorted(chains, key=held, reverse=True):
            over = total > HEAD_HOLES_MAX
            room = self._room(HOLES_BYTES, start)
            if room is not None and room <= 0:
                return
            if not held(chain) or not (over or held(chain) > b.holes_max):
                return
            before = held(chain)
            loose = loose_holes(chain.d)
            if loose and (over or loose > b.holes_max):
                # Past the first object of the seal, only one that fits.
                count = self._readable(chain.d["segs"])
                if room is not None and _fold_size(chain.d["segs"][:count]) > room:
                    return
                if count:
                    self._add(chain.fold(self._new_id("m"), count, encode_manifest))
            while holes_kept(chain.d) and (
                total - before + held(chain) > HEAD_HOLES_MAX or holes_kept(chain.d) > b.holes_max
            ):
                room = self._room(HOLES_BYTES, start)
                if self._rewrite_holey_manifest(chain, room) is None:
                    break
            total -= before - held(chain)

    @staticmethod
    def _bounds_of(name: str) -> Callable[[list[Any]], dict[str, Any]]:
        """What a spilled segment's ref keeps of its items, by chain."""
        if name == "retained":
            return lambda records: {"hi": max(r["finished_at"] for r in records)}
        return lambda items: {}

    def _chunks(self, items: list[Any], alone: int | None = None) -> Iterator[list[Any]]:
        """`items` cut into runs that each encode to at most segment_bytes (one
        item at least): objects stay small enough to cache and fetch whole,
        however large the batch that spills them. With `alone`, an item
        larger than that is a run of its own."""
        sizes = [len(orjson.dumps(item)) + 1 for item in items]
        cuts = [] if alone is None else [i for i, size in enumerate(sizes) if size > alone]
        start = 0
        for cut in [*cuts, len(items)]:
            for run in runs_within(range(start, cut), sizes.__getitem__, self.bounds.segment_bytes):
                yield items[run[0] : run[-1] + 1]
            if cut < len(items):
                yield [items[cut]]
            start = cut + 1

    def _spill(
        self,
        chain: Chain,
        kind: str,
        meta: Callable[[list[Any]], dict[str, Any]],
        alone: int | None = None,
    ) -> None:
        """The chain's inline items become new loose segments, in order, each
        under segment_bytes (and each item larger than `alone` in a segment
        of its own); `meta(items)` says what each one's ref keeps."""
        for chunk in list(self._chunks(chain.d["in"], alone)):
            seg_id = self._new_id(kind)
            data = encode_segment(kind, chunk)
            self._add(chain.spill(seg_id, len(chunk), data, meta(chunk)), chunk)

    def _spill_lanes(self) -> int:
        """Past inline_pending_bytes in all lanes together, the lanes with most
        inline bytes spill, the largest first, until what is left is under
        it: a lane gains segments in proportion to its jobs' bytes (with 64
        priorities, a lane is no longer cut into a segment of a few jobs at
        every spill of the others). The bytes spilled."""
        lanes = self.s.head["lanes"]
        inline = {name: len(orjson.dumps(ln["in"])) for name, ln in lanes.items() if ln["in"]}
        total = sum(inline.values())
        spilled = 0
        for name in sorted(inline, key=inline.__getitem__, reverse=True):
            if total <= self.bounds.inline_pending_bytes:
                break
            self._spill_lane(lanes[name])
            spilled += inline[name]
            total -= inline[name]
        return spilled

    def _tidy_runs(self, runs: list[Chain], budget: int, floor: int = 0) -> None:
        """The refs of the lanes' runs, within `budget` bytes written: a run
        folds its loose refs past loose_max and merges its manifests past
        manifests_max, as every chain does; and while the runs of all lanes
        keep more than RUN_REFS_MAX refs together (64 lanes of a run each
        would keep 64 x 32), the runs with most fold theirs (the oldest
        loose_max / 2, two at least) or merge two manifests, down to one ref
        a run at best. The run with most refs goes first; past the seal's
        first object of upkeep, only what fits in `budget` and in the seal's
        is written, and the rest waits for the next seals (so that 64 lanes
        crossing loose_max together fold over several). `floor` of it is
        written whatever is left of the seal's (after merges that went
        first: the refs of runs they left keep up)."""
        b = self.bounds
        total = sum(len(c.d["segs"]) + len(c.d["mans"]) for c in runs)
        start = self.upkept

        def room_left() -> int | None:
            room = self._room(budget, start)
            if room is None or not floor:
                return room
            return max(room, min(budget, floor) - (self.upkept - start))

        skip: set[int] = set()  # runs whose next object does not fit, this seal
        while (room := room_left()) is None or room > 0:
            # (run, whether it folds): fold first, then merge manifests
            over = total > RUN_REFS_MAX
            todo = [
                (c, len(c.d["segs"]) > (1 if over else b.loose_max))
                for c in runs
                if id(c) not in skip
                and (
                    len(c.d["segs"]) > (1 if over else b.loose_max)
                    or len(c.d["mans"]) > (1 if over else b.manifests_max)
                )
            ]
            if not todo:
                return
            chain, folds = max(todo, key=lambda t: len(t[0].d["segs"]) + len(t[0].d["mans"]))
            before = len(chain.d["segs"]) + len(chain.d["mans"])
            if folds:
                half = b.loose_max // 2
                count = half if len(chain.d["segs"]) > b.loose_max else max(2, half)
                readable = self._readable(chain.d["segs"][:count])  # cut short by one unreadable
                if readable < min(2, count) or (
                    room is not None and _fold_size(chain.d["segs"][:readable]) > room
                ):
                    skip.add(id(chain))
                    continue
                count = readable
                self._add(chain.fold(self._new_id("m"), count, encode_manifest))
            elif self._merge_manifests(chain, room) is None:
                skip.add(id(chain))
                continue
            total -= before - len(chain.d["segs"]) - len(chain.d["mans"])

    def _spill_lane(self, lane: dict[str, Any]) -> None:
        """The lane's inline jobs (sorted) go to the ends of its runs: each to
        the run whose last job is the latest at or before it, and those that
        fit no run to a run of their own. Jobs due at the seal's time and
        jobs not due yet are kept apart: a run whose last job is due takes
        only due jobs, so that it stays the lane's queue of work due (a due
        job sorts before the last of every run of delayed ones), and a spill
        starts a run for due jobs only when no such run takes them, and one
        for delayed jobs only when they fit no run of delayed ones. (A spill
        of due and delayed jobs together started a run nearly every time, in
        each lane: runs piled up faster than merges took them.)"""
        jobs: list[Job] = lane["in"]
        lane["in"] = []
        # Not runs being merged: one merged into must hold jobs no later than
        # what is left of those merged into it.
        fits = sorted(
            (tuple(r["last"]), i)
            for i, r in enumerate(lane["runs"])
            if "merge" not in r and "last" in r
        )
        lasts = [last for last, _ in fits]
        due_before = bisect.bisect_right(lasts, (self.now, float("inf")))  # fits[:it] are due
        pieces: dict[int, list[Job]] = {}  # run index (-1, -2: a new run) -> its jobs
        for job in jobs:
            at = bisect.bisect_right(lasts, job_key(job)) - 1
            if job["run_at"] > self.now and at < due_before:
                at = -2  # not due: not into a run of due jobs
            elif at < 0:
                at = -1
            else:
                at = fits[at][1]
            pieces.setdefault(at, []).append(job)
        for i, piece in sorted(pieces.items()):
            if i < 0:
                run = new_chain()
                lane["runs"].append(run)
            else:
                run = lane["runs"][i]
            self._append_to_run(run, piece)

    @staticmethod
    def _extend_run(run: dict[str, Any], jobs: list[Job]) -> tuple[float, float]:
        """`run`'s bounds and count take in `jobs` (sorted, none before its
        last), appended to it; their earliest and latest run_at."""
        lo, hi = jobs[0]["run_at"], max(j["run_at"] for j in jobs)
        run["lo"] = min(run.get("lo", lo), lo)
        run["top"] = max(run.get("top", hi), hi)
        run["last"] = list(job_key(jobs[-1]))
        run["n"] += len(jobs)
        return lo, hi

    def _append_to_run(self, run: dict[str, Any], jobs: list[Job]) -> None:
        """`jobs` (sorted, none before the run's last) become segments at the
        end of `run`."""
        self._extend_run(run, jobs)
        # The jobs move into the run's chain, and on into segments.
        run["in"] = jobs
        # A job too large for a merge to rewrite is a segment of its own: a
        # merge moves it by reference, its segment whole (_movable).
        self._spill(
            self.s._chain(run),
            "p",
            lambda chunk: {"lo": chunk[0]["run_at"], "hi": max(j["run_at"] for j in chunk)},
            alone=self.bounds.merge_bytes,
        )

    def _spill_leases(self) -> None:
        """Spilled leases keep no payload: those that carry one (jobs claimed
        from the head) leave it in a payload segment and point there. Each
        lease segment's ref bounds its records' expiries (`lo`)."""
        leases = self.s.leases
        records: list[Job] = leases.d["in"]
        carried = [r for r in records if "payload" in r]
        if carried:
            payloads = [{"id": r["id"], "payload": r["payload"]} for r in carried]
            at = 0
            for chunk in self._chunks(payloads):
                x_id = self._new_id("x")
                self._add(NewObject(x_id, encode_segment("x", chunk)), chunk)
                for i, record in enumerate(carried[at : at + len(chunk)]):
                    del record["payload"]
                    record["src"] = [x_id, i]
                at += len(chunk)
        self._spill(leases, "l", lambda rs: {"lo": min(r["lease_expires_at"] for r in rs)})
        self.s._inline = None

    def _compact_leases(self) -> None:
        """Leases are resolved anywhere (acks, heartbeats of spilled ones): a
        lease segment with half its records resolved or more has its live
        records taken inline again (they are small: payloads stay where they
        are), so resolved ones stop taking space. The segments of a manifest
        are looked at once half of the manifest's records are resolved. The
        sparsest first, and about merge_bytes of records a seal (one segment
        at least): a manifest may hold the leases of thousands of jobs, and
        taking them all at once made a batch grow with the jobs claimed
        (and no more than is left of the seal's budget, past its first
        object). The holes a manifested segment is left with go when its
        manifest is rewritten (_take_holes), the segment with them once
        nothing is live.

        An unreadable lease segment is left as it is (its resolved records
        keep their space); an unreadable lease manifest stops it all (taking
        records out may move the chain's front onto it, which is read)."""
        room = self._room()
        most = self.bounds.merge_bytes if room is None else min(room, self.bounds.merge_bytes)
        leases = self.s.leases
        if most <= 0 or any(self._bad(m["k"]) for m in leases.d["mans"]):
            return
        sparse: list[tuple[float, dict[str, Any], str | None]] = []
        units = [u for u in leases.d["segs"] if u["live"] * 2 <= u["n"]]
        units += [m for m in leases.d["mans"] if m["live"] * 2 <= m.get("total", 0)]
        for unit in units:
            for ref, man, start in leases.segments_of(unit["k"]):
                live = leases.live_count(ref, start)
                if live and live * 2 <= ref["n"] and not self._bad(ref["k"]):
                    sparse.append((live / ref["n"], ref, man))
        sparse.sort(key=lambda c: c[0])
        chosen: list[list[Place]] = []
        missing: list[str] = []
        size = 0
        for _, ref, man in sparse:
            try:
                places = leases.live_in(ref, man)
            except CorruptData as exc:  # it reads, but is not the one written
                if self._met_bad(exc):
                    continue
                raise
            except SegmentMissing as miss:  # fetched together, in one round
                missing.append(miss.key)
                if len(missing) < PREFETCH_FOLLOWING:
                    continue
                break
            cost = sum(len(orjson.dumps(place.item)) + 1 for place in places)
            if size + cost > most and (size or missing or room is not None):
                break
            chosen.append(places)
            size += cost
        if missing:
            raise SegmentMissing(missing[0], tuple(missing[1:]))
        self.compacted += size
        for places in chosen:
            for place in places:
                self.s._drop_lease(place)
                self.s._add_lease(dict(place.item))

    def _merge_runs(self, budget: int, floor: int = 0) -> None:
        """A lane keeps few runs (runs_max) however its jobs come: past it, runs
        of like sizes are merged into one, a part each seal. A part is their
        earliest jobs, appended to the run they merge into: it holds no job
        later than what is left of them, so every run stays sorted, those
        merged consumed from their fronts as claims consume them. A merge goes
        on over seals until they are empty (the head marks them "merge":
        "from", and that run "into", with the merge's "group"). The lanes
        merging share `budget` bytes a seal (no more than is left of the
        seal's, or `floor` at least, however large the head), their turns
        rotating; within a lane, the oldest merge goes first (finished, it
        makes runs fewer)."""
        lanes = self.s.head["lanes"]
        missing: list[str] = []
        start = self.upkept
        for lane in lanes.values():
            self._start_merge(lane, missing)
        room = self._room()
        if room is None and floor:  # gone first: within the seal's budget all the same
            room = self.budget - self.upkept
        if room is not None:
            budget = min(budget, max(room, floor - (self.upkept - start)))
            if budget <= 0:  # marked, to go on at the next seals
                if missing:
                    raise SegmentMissing(missing[0], tuple(missing[1:]))
                return
        merging = [lane for lane in lanes.values() if _groups(lane)]
        # Every part's fronts, before any part moves a job: the objects
        # missing, whatever the lanes and merges, are fetched in one round.
        # A run whose front is unreadable, or that names an unreadable
        # manifest (taking jobs may move its front onto it), leaves the merge.
        for lane in merging:
            for run in lane["runs"]:
                if run.get("merge") == "from" and self._unmergeable(run, missing):
                    self._leave_merge(lane, run)
        merging = [lane for lane in merging if _groups(lane)]
        if missing:
            raise SegmentMissing(missing[0], tuple(missing[1:]))
        if not merging:
            return
        turn = self.s.head["merged"] = self.s.head.get("merged", 0) + 1
        turn %= len(merging)
        share = max(1, budget // len(merging))
        for lane in merging[turn:] + merging[:turn]:
            left = min(share, budget)
            for group in sorted(_groups(lane)):
                if left <= 0:
                    break
                spent = self._merge_part(lane, group, left, budget)
                left -= spent
                budget -= spent

    def _unmergeable(self, run: dict[str, Any], missing: list[str]) -> bool:
        """Whether `run` is not to be merged from: it names an unreadable
        manifest (taking jobs may move its front onto it, which is read), or
        its front is unreadable. Else its front is read, or what that takes
        goes to `missing`."""
        if any(self._bad(m["k"]) for m in run["mans"]):
            return True
        try:
            self.s._chain(run).first()
        except SegmentMissing as miss:
            if self._met_bad(miss):
                return True
            missing.append(miss.key)
        except CorruptData as exc:
            if self._met_bad(exc):
                return True
            raise
        return False

    @staticmethod
    def _leave_merge(lane: dict[str, Any], run: dict[str, Any]) -> None:
        """`run` (_unmergeable) leaves its merge, and is not marked
        for another until its front reads as a job (a "stay" no job has); a
        merge left with one source and nothing merged into ends too (the
        rest would be a rewrite of that run)."""
        group = run.get("group", 0)
        _unmark(run)
        run["stay"] = [0.0, -1]
        mates = [r for r in lane["runs"] if "merge" in r and r.get("group", 0) == group]
        if len(mates) == 1 and mates[0]["merge"] == "from":
            _unmark(mates[0])

    def _start_merge(self, lane: dict[str, Any], missing: list[str]) -> None:
        """Past runs_max runs (past twice that in no merge, while merges are
        under way: runs that piled up during a long one), mark runs of like
        sizes (_alike) in no merge to merge: one more merge of the lane. The
        objects it would read and cannot go to `missing`."""
        runs: list[dict[str, Any]] = lane["runs"]
        free = [r for r in runs if "merge" not in r]
        if len(free) < len(runs):  # merges under way
            if len(free) <= 2 * self.bounds.runs_max:
                return
        elif len(runs) <= self.bounds.runs_max:
            return
        for run in runs:
            if "stay" in run:  # its front too large to merge (or unreadable): until claimed
                if any(self._bad(m["k"]) for m in run["mans"]):
                    continue
                try:
                    front = self.s._chain(run).first()
                except (SegmentMissing, CorruptData) as miss:
                    if self._met_bad(miss):
                        continue
                    if isinstance(miss, CorruptData):
                        raise
                    missing.append(miss.key)
                    continue
                if front is None or job_key(front.item) != tuple(run["stay"]):
                    del run["stay"]
        sources = _alike([r for r in free if "stay" not in r])
        if sources:
            group = max((r.get("group", 0) for r in runs if "merge" in r), default=0) + 1
            for run in sources:
                run["merge"], run["group"] = "from", group

    def _merge_part(self, lane: dict[str, Any], group: int, share: int, allow: int) -> int:
        """Take the merge `group` of `lane` a part further: its sources'
        earliest jobs, `share` bytes of them (more, up to `allow`, for a first
        job that is larger), to the end of the run it merges into. A job
        larger than merge_bytes is not rewritten: its segment moves whole
        (_movable), or else its run leaves the merge ("stay"). The bytes
        written (MOVE_COST for a segment moved)."""
        runs: list[dict[str, Any]] = lane["runs"]
        sources = [r for r in runs if r.get("merge") == "from" and r.get("group", 0) == group]
        into = next(
            (r for r in runs if r.get("merge") == "into" and r.get("group", 0) == group), None
        )
        chains = [self.s._chain(run) for run in sources]
        fronts: list[tuple[tuple[float, int], int, Place]] = []
        for i, chain in enumerate(chains):  # read already (_merge_runs' probe)
            if (place := chain.first()) is not None:
                fronts.append((job_key(place.item), i, place))
        heapq.heapify(fronts)

        def next_front(i: int) -> bool:
            """Source `i`'s next job joins the fronts; False when it is not
            known here (not at hand: the next part goes on)."""
            try:
                front = chains[i].first()
            except SegmentMissing:
                return False
            except CorruptData as exc:  # the next part's probe takes the run out
                if self._met_bad(exc):
                    return False
                raise
            if front is not None:
                heapq.heappush(fronts, (job_key(front.item), i, front))
            return True

        moved: list[Job] = []
        size = 0
        while fronts:
            key, i, place = fronts[0]
            cost = len(orjson.dumps(place.item)) + 1
            if cost > self.bounds.merge_bytes:
                rest = min((f[0] for f in fronts[1:]), default=None)
                whole = self._movable(chains[i], rest)
                if whole is not None:
                    if size and size + MOVE_COST > share:
                        break
                    heapq.heappop(fronts)
                    into = self._into(lane, group, into, moved or whole)
                    if moved:
                        self._append_to_run(into, moved)
                        moved = []
                    self._append_segment(into, chains[i].take_front_segment(), whole)
                    size += MOVE_COST
                    if not next_front(i):
                        break
                    continue
                heapq.heappop(fronts)  # it cannot move: its run leaves the merge
                _unmark(sources[i])
                sources[i]["stay"] = list(key)
                if into is None and not moved and len(fronts) < 2:
                    for _, j, _ in fronts:  # one run left: merging it is a rewrite
                        _unmark(sources[j])
                    return 0
                continue
            if size + cost > share and (size or cost > allow):
                break
            heapq.heappop(fronts)
            chains[i].pop_front(place)
            moved.append(dict(place.item))
            size += cost
            if not next_front(i):
                break
        for run, chain in zip(sources, chains, strict=True):
            if chain.count == 0:
                runs.remove(run)
        if moved:
            into = self._into(lane, group, into, moved)
            self._append_to_run(into, moved)
        if into is not None and group not in _groups(lane, "from"):
            _unmark(into)
        return size

    @staticmethod
    def _into(
        lane: dict[str, Any], group: int, into: dict[str, Any] | None, jobs: list[Job]
    ) -> dict[str, Any]:
        """The run merge `group` appends `jobs` (sorted) to: `into`, unless
        it has none or its last job is past their first."""
        if into is None or tuple(into.get("last", (-1e300, 0))) > job_key(jobs[0]):
            if into is not None:  # written past by a broker that knew no merges
                _unmark(into)
            into = new_chain()
            into["merge"], into["group"] = "into", group
            lane["runs"].append(into)
        return into

    def _movable(self, chain: Chain, rest: tuple[float, int] | None) -> list[Job] | None:
        """The live jobs of the chain's front segment, when the segment may
        move whole into the run merged into (by reference: no byte of it
        rewritten): none of them after `rest` (the other fronts' earliest),
        and few positions of it consumed (they are holes in the ref moved)."""
        front = chain.front_segment()
        if front is None:
            return None
        ref, live = front
        if ref["n"] - len(live) > MOVE_HOLES_MAX:
            return None
        jobs = [place.item for place in live]
        if rest is not None and job_key(jobs[-1]) > rest:
            return None
        return jobs

    def _append_segment(self, run: dict[str, Any], ref: dict[str, Any], jobs: list[Job]) -> None:
        """The segment `ref` (moved whole from another run) goes at the end of
        `run`; `jobs` are its live jobs, sorted, none before the run's last."""
        lo, hi = self._extend_run(run, jobs)
        run["segs"].append({**ref, "lo": lo, "hi": hi})

    def _merge_manifests(self, chain: Chain, room: int | None = None) -> int | None:
        """Too many manifests: the two neighbours with the fewest segments become
        one, if it stays under manifest_bytes (a manifest is rewritten whole, and
        a batch writes a bounded amount) and `room` when given; so a chain of a
        million items keeps a few dozen manifest refs in the head, and a lookup
        opens that many. The bytes written (0: nothing of them was live), or
        None when no two fit."""
        mans = chain.d["mans"]
        most = self.bounds.manifest_bytes if room is None else min(room, self.bounds.manifest_bytes)
        pairs = sorted(range(len(mans) - 1), key=lambda i: mans[i]["segs"] + mans[i + 1]["segs"])
        for i in pairs:
            if self._bad(mans[i]["k"]) or self._bad(mans[i + 1]["k"]):
                continue
            sizes = sum(chain.manifest(m["k"]).size for m in mans[i : i + 2])
            if sizes <= most:
                obj = chain.merge_manifests(i, 2, self._new_id("m"), encode_manifest)
                return 0 if obj is None else self._add(obj)
        return None

    def _rewrite_holey_manifest(self, chain: Chain, room: int | None = None) -> int | None:
        """The manifest whose segments have the most holes kept in the head takes
        them (rewritten); the bytes written (0: it had nothing live left, and
        went), or None when there was none, or it would not fit in `room`
        bytes (as large as it was, and its holes)."""
        holes: dict[str, list[int]] = chain.d["holes"]
        by_manifest: dict[int, int] = {}
        for m, mref in enumerate(chain.d["mans"]):
            if self._bad(mref["k"]):
                continue
            for ref in chain.manifest(mref["k"]).refs:
                if ref["k"] in holes:
                    by_manifest[m] = by_manifest.get(m, 0) + len(holes[ref["k"]])
        if not by_manifest:
            return None
        worst = max(by_manifest, key=lambda m: by_manifest[m])
        if room is not None:
            size = chain.manifest(chain.d["mans"][worst]["k"]).size
            if size + HOLE_BYTES * by_manifest[worst] > room:
                return None
        obj = chain.rewrite_manifest(worst, self._new_id("m"), encode_manifest)
        return 0 if obj is None else self._add(obj)
