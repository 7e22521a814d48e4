"""The shape of what a topic stores (format 2): heads, chains, refs and the
items of each kind, as TypedDicts. An object is checked against them once,
when it is read from the store (decode_head, decode_segment), so that a head
or segment that is JSON but not ours is CorruptData naming its key, never a
KeyError deep in the state machine. Checking keeps the object as it is: fields
these types do not name are allowed (and kept).
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any, Literal, NotRequired, TypedDict

import msgspec

from simplequeue.errors import CorruptData


class Writer(TypedDict):
    broker_id: str
    epoch: int


class PendingJob(TypedDict):
    id: str
    seq: int
    payload: Any
    priority: int
    run_at: float
    created_at: float
    attempts: int
    max_attempts: int
    last_error: NotRequired[str | None]  # null: format 1, nacked without one


class DeadJob(PendingJob):
    died_at: float


class Lease(TypedDict):
    """A claimed job's record: its payload inline, or where it is (`src`)."""

    id: str
    seq: int
    priority: int
    run_at: float
    created_at: float
    attempts: int
    max_attempts: int
    claimed_by: str
    heartbeat_at: float
    lease_expires_at: float
    lease_token: str
    claimed_at: NotRequired[float]
    payload: NotRequired[Any]
    src: NotRequired[tuple[str, int]]
    last_error: NotRequired[str | None]  # null: format 1, nacked without one


class Record(TypedDict):
    """What is retained of a finished job."""

    id: str
    status: str
    attempts: int
    created_at: float
    finished_at: float
    result: NotRequired[Any]
    last_error: NotRequired[str | None]  # null: format 1, nacked without one


class FollowUp(TypedDict):
    """A job an ack recorded for another topic, until its owner enqueues it
    there (the outbox). Its id is given, or derived from the source job's."""

    id: str
    topic: str
    payload: Any
    at: float  # when the ack that recorded it landed
    priority: NotRequired[int]
    delay: NotRequired[float]
    max_attempts: NotRequired[int | None]


class Payload(TypedDict):
    """An item of an `x` segment: the payload of a spilled lease."""

    id: str
    payload: Any


class SegmentRef(TypedDict):
    k: str
    n: int
    live: int
    holes: NotRequired[list[int]]
    lo: NotRequired[float]
    hi: NotRequired[float]


class ManifestRef(TypedDict):
    k: str
    segs: int
    live: int
    total: NotRequired[int]
    lo: NotRequired[float]
    hi: NotRequired[float]


class IndexedRef(TypedDict):
    """A segment's ref in a manifest, with the id index of its items (its live
    count is kept by the manifest's ref in the head)."""

    k: str
    n: int
    ix: str
    holes: NotRequired[list[int]]
    lo: NotRequired[float]
    hi: NotRequired[float]


# Where a chain's front is: a segment of its first manifest, an item of its
# first segment (a negative one would read from the end).
Cursor = Annotated[int, msgspec.Meta(ge=0)]

# Chains hold their inline items under "in", a Python keyword: these are
# declared in TypedDict's functional form.
Run = TypedDict(
    "Run",
    {
        "n": int,
        "segs": list[SegmentRef],
        "mans": list[ManifestRef],
        "mpos": Cursor,
        "pos": Cursor,
        "holes": dict[str, list[int]],
        "in": list[PendingJob],
        "lo": NotRequired[float],
        "top": NotRequired[float],
        "last": NotRequired[tuple[float, int]],
        "merge": NotRequired[Literal["from", "into"]],  # a merge under way (layout)
        "group": NotRequired[int],  # which one, of the lane's merges under way
        # Its front job, too large to merge; [0.0, -1] (no job): its front unreadable.
        "stay": NotRequired[tuple[float, int]],
    },
)
Lane = TypedDict("Lane", {"in": list[PendingJob], "runs": list[Run]})
Leases = TypedDict(
    "Leases",
    {
        "n": int,
        "segs": list[SegmentRef],
        "mans": list[ManifestRef],
        "mpos": Cursor,
        "pos": Cursor,
        "holes": dict[str, list[int]],
        "in": list[Lease],
    },
)
Records = TypedDict(
    "Records",
    {
        "n": int,
        "segs": list[SegmentRef],
        "mans": list[ManifestRef],
        "mpos": Cursor,
        "pos": Cursor,
        "holes": dict[str, list[int]],
        "in": list[Record],
    },
)
Outbox = TypedDict(
    "Outbox",
    {
        "n": int,
        "segs": list[SegmentRef],
        "mans": list[ManifestRef],
        "mpos": Cursor,
        "pos": Cursor,
        "holes": dict[str, list[int]],
        "in": list[FollowUp],
    },
)
DeadJobs = TypedDict(
    "DeadJobs",
    {
        "n": int,
        "segs": list[SegmentRef],
        "mans": list[ManifestRef],
        "mpos": Cursor,
        "pos": Cursor,
        "holes": dict[str, list[int]],
        "in": list[DeadJob],
    },
)


# A wall-clock time, naive ("2024-03-02T09:00"): a cron schedule's local time.
LocalTime = Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d$")]


class Schedule(TypedDict):
    """A schedule (SPEC 11): its definition, and the next slot it fires."""

    payload: Any
    next_at: int
    created_at: float
    every: NotRequired[int]
    cron: NotRequired[str]
    tz: NotRequired[str]
    priority: NotRequired[int]
    max_attempts: NotRequired[int]
    last_slot: NotRequired[int]
    last_fired_at: NotRequired[float]
    # The last slot's local time by the tzdata of the broker that fired it (a
    # cron's; added after format 2 was first written).
    last_local: NotRequired[LocalTime]
    last_error: NotRequired[str]
    retry_at: NotRequired[float]  # its slots not computable by the broker that tried


class Settings(TypedDict, total=False):
    """A topic's settings (SPEC 12): limits every claim obeys, and defaults."""

    rate: float
    burst: int
    max_claimed: int
    lease: float
    max_attempts: int


class Bucket(TypedDict):
    """The token bucket of a topic with a rate: tokens left at `at` (store time)."""

    tokens: float
    at: float
    # When the bucket was made (store time): a claim made before it took no
    # token from it, and gives none back. A bucket made before it was written
    # (or rewritten by a broker that does not know it) has none, and every
    # claim given back gives its token back, as before.
    since: NotRequired[float]


class Head(TypedDict):
    format: int
    topic: str
    writer: Writer | None
    write_id: str | None
    writers: dict[str, str]
    seq: int
    next: int
    counters: dict[str, int]
    lanes: dict[str, Lane]
    leases: Leases
    retained: Records
    dead: DeadJobs
    outbox: Outbox
    # Added after format 2 was first written; a head without them has none.
    schedules: NotRequired[dict[str, Schedule]]
    settings: NotRequired[Settings]
    bucket: NotRequired[Bucket]
    prios: NotRequired[dict[str, int]]  # jobs held by priority (lanes_max)
    prios_at: NotRequired[str]  # the write that counted them last
    merged: NotRequired[int]  # seals that merged runs: whose turn it is (layout)


_ITEMS: dict[str, Any] = {
    "p": list[PendingJob],
    "l": list[Lease],
    "x": list[Payload],
    "r": list[Record],
    "d": list[DeadJob],
    "o": list[FollowUp],
}


def check_head(key: str, head: dict[str, Any]) -> None:
    """CorruptData naming `key` unless `head` has the shape of a format-2 head,
    and its chains' live counts add up (_miscounted)."""
    try:
        msgspec.convert(head, Head)
        for name in [*head["lanes"], *head.get("prios", ())]:
            int(name)
        for schedule in head.get("schedules", {}).values():
            if "last_local" in schedule:  # its pattern lets "2024-13-45T99:99" by
                datetime.fromisoformat(schedule["last_local"])
    except (msgspec.ValidationError, ValueError) as exc:
        raise CorruptData(key, f"not a well-formed head ({exc})") from None
    chains = [("leases", head["leases"]), ("retained", head["retained"])]
    chains += [("dead", head["dead"]), ("outbox", head["outbox"])]
    for name, lane in head["lanes"].items():
        chains += [(f"lanes.{name}.runs[{r}]", run) for r, run in enumerate(lane["runs"])]
    for where, chain in chains:
        problem = _miscounted(chain)
        if problem:
            raise CorruptData(key, f"its chain {where} does not add up: {problem}")


def _miscounted(chain: dict[str, Any]) -> str | None:
    """What is wrong with a chain's live counts, read from the head alone
    (O(refs), no object read), or None: each ref counts at least one live item
    and no more than it holds (a ref counting none is forgotten), and the
    chain's `n` is theirs and its inline items'. A count past the truth would
    make the state machine look for items that are not there (the dead limit
    spinning for ever), one short would forget a segment still holding some."""
    live = len(chain["in"])
    for ref in chain["segs"]:
        if not 0 < ref["live"] <= ref["n"]:
            return f"segment {ref['k']!r} counts {ref['live']} live of {ref['n']}"
        live += ref["live"]
    for mref in chain["mans"]:
        total = mref.get("total", mref["live"])  # heads written before totals had none
        if not 0 < mref["live"] <= total:
            return f"manifest {mref['k']!r} counts {mref['live']} live of {total}"
        live += mref["live"]
    if chain["n"] != live:
        return f"n is {chain['n']}, its refs and inline items hold {live}"
    return None


def check_items(key: str, kind: str, items: list[Any]) -> None:
    """CorruptData naming `key` unless `items` are items of a `kind` segment
    (p pending jobs, l leases, x payloads, r records, d dead jobs, o follow-ups)."""
    shape = _ITEMS.get(kind)
    if shape is None:
        raise CorruptData(key, f"a segment of unknown kind {kind!r}")
    try:
        msgspec.convert(items, shape)
    except msgspec.ValidationError as exc:
        raise CorruptData(key, f"not a well-formed {kind} segment ({exc})") from None


def check_manifest(key: str, refs: list[Any]) -> None:
    """CorruptData naming `key` unless `refs` are a manifest's segment refs,
    each with the id index of its `n` items: base64 of 4 bytes an item (one
    cut short would rule out ids the segment holds, and let duplicates in)."""
    try:
        msgspec.convert(refs, list[IndexedRef])
    except msgspec.ValidationError as exc:
        raise CorruptData(key, f"not a well-formed manifest ({exc})") from None
    for ref in refs:
        try:
            size = len(base64.b64decode(ref["ix"], validate=True))
        except binascii.Error:
            size = -1
        if size != 4 * ref["n"]:
            raise CorruptData(key, f"segment {ref['k']!r}'s id index is not one of {ref['n']} ids")
