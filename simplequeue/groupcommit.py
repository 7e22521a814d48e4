"""The group committer: the only code that writes topic objects.

Per topic, at most one write is in flight; mutations that arrive meanwhile form
the next batch, which is applied to the cached state and written with one
conditional PUT of the head (after create-only PUTs of any objects it spilled).
No mutation is answered before the write that holds it landed. A lost race or
an ambiguous write is resolved by reading the head back: each write carries a
unique id and the head keeps each broker's latest, so a batch is never applied
twice nor reported failed once it landed.

Objects a state needs are fetched on demand into the shared ObjectCache: the
state machine raises SegmentMissing, the batch is applied again once they are
in. Objects are deleted only by the sweep, once unreferenced for two sweeps, so
a broker that read an older head never finds its objects gone under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from simplequeue import keys
from simplequeue.batching import Batcher, Linger, Pending
from simplequeue.cache import DECODED_PER_BYTE, ObjectCache
from simplequeue.errors import (
    AmbiguousWrite,
    CacheTooSmall,
    Contended,
    CorruptData,
    JobNotFound,
    LeaseLost,
    NotDurable,
    ObjectNotFound,
    PreconditionFailed,
    RefusedByTopic,
    ScheduleNotFound,
    SimpleQueueError,
    StorageFull,
    StoreError,
    StoreRefused,
    StoreUnavailable,
)
from simplequeue.objstore import InvalidKey, ObjectStore
from simplequeue.retrying import first_then_retrying
from simplequeue.state import (
    Bounds,
    IdFilter,
    Manifest,
    Policy,
    Sealed,
    Segment,
    SegmentMissing,
    TopicState,
    decode_head,
    new_head,
)
from simplequeue.waiting import WaitingLine

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A mutation: applied to the state at commit time, and again to a fresh state
#: after a lost race, so it must decide everything from the state it is given.
Mutation = Callable[[TopicState, float], T]

# Answers that depend on what the state holds; they are final only when the
# state they were computed on is known to be current.
_STATE_DEPENDENT = (JobNotFound, LeaseLost, ScheduleNotFound, RefusedByTopic)

# Objects one batch may find missing, one fetch round each, before the cache
# is deemed too small for what the batch needs.
_MAX_FETCH_ROUNDS = 64
# The checked_at of a state never read, or invalidated: read whatever the age asked.
_UNCHECKED = -1e18
# What reading ahead past runs' fronts may fill of the object cache, at most.
READ_AHEAD_SHARE = 1 / 16
# What the segments a batch's claims (and pops) read their payloads from may
# fill of the object cache, at most (Bounds.claim_bytes): they are held at
# once while the batch applies, and fetched a few rounds at a time
# (READ_AHEAD_SHARE), so claims that fill it take some 8 rounds, not past
# _MAX_FETCH_ROUNDS (a 503, every time).
CLAIM_SHARE = 1 / 2
# Orphan objects the sweeps saw first and keep for their second sighting, in
# all topics, at most (130 to 240 bytes each, as long as topic names go).
SIGHTINGS_KEPT = 250_000
# Topics cached_in_turns() answers for between turns of the event loop: a
# topic written since its last answer has its head decoded again (some 60 µs),
# so 100 hold the loop some 6 ms, where 10,000 at once held it 0.3-0.4 s.
CACHED_SLICE = 100


@dataclass(frozen=True)
class CommitSettings:
    """How a broker's committer behaves."""

    bounds: Bounds = field(default_factory=Bounds)
    policy: Policy = field(default_factory=Policy)
    budget: float = 10.0  # seconds to keep retrying lost races before Contended
    # How old (seconds) a cached state may be when it answers a read (status, a
    # lookup). 0: a read sees every write that landed before it was asked,
    # whichever broker wrote it, at the cost of one GET of the head.
    max_age: float = 0.0
    # After a batch lands, wait up to linger x its write time (at most
    # linger_max seconds) for as many mutations as it held: see batching.Linger.
    linger: float = 0.5
    linger_max: float = 0.005
    backoff_min: float = 0.002
    backoff_max: float = 0.25
    cache_bytes: int = 256 * 1024 * 1024  # the object cache's budget (--cache-mb)
    # Topics idle this long (seconds) leave the broker's memory once it holds
    # more than topics_kept of them.
    idle_after: float = 60.0
    topics_kept: int = 1000
    idle_max: float = 600.0  # seconds after which an idle topic leaves memory whatever the count
    # Past this many topics held, those not in use leave memory however
    # lately used, the least recently first (each costs some 8 KB, and a
    # client may name a new one in every request).
    topics_max: int = 10_000


@dataclass
class CommitStats:
    """Counters the broker exports as metrics."""

    batches: int = 0
    mutations: int = 0
    writes: int = 0
    bytes_written: int = 0
    head_bytes_written: int = 0
    conflicts: int = 0
    ambiguous: int = 0
    reloads: int = 0
    segments_written: int = 0
    segments_deleted: int = 0
    fetch_rounds: int = 0


def _fence(state: TopicState, now: float) -> list[str]:
    """A write of the head as it is (its new write id moves the ETag on), and
    what it references."""
    state.dirty = True
    return state.referenced()


class _MetCorrupt(Exception):
    """A mutation met a corrupt object part-way, maybe after it changed the
    state: the batch is undone and applied again without `entry`, which
    fails alone with `error`."""

    def __init__(self, entry: _Entry, error: CorruptData) -> None:
        super().__init__(str(error))
        self.entry, self.error = entry, error


class _MissingFor(Exception):
    """`entry`'s mutation needs an object not in memory (`miss`): fetched, and
    the batch applied again; if it cannot be read, `entry` fails alone."""

    def __init__(self, entry: _Entry, miss: SegmentMissing) -> None:
        super().__init__(str(miss))
        self.entry, self.miss = entry, miss


class _SealMet(Exception):
    """The seal (its upkeep) met `error`, an object that cannot be read, or
    (`known`) one already known so, where upkeep does not look for them: the
    batch is undone and applied again, its upkeep leaving the object alone,
    or without upkeep."""

    def __init__(self, error: CorruptData, known: bool) -> None:
        super().__init__(str(error))
        self.error, self.known = error, known


class _LostRace(Exception):
    """The write did not land (the head moved under it, or the store failed
    it): re-read and re-apply. `cause`: what the store said."""

    def __init__(self, cause: StoreError) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True)
class _Op(Generic[T]):
    """A mutation, and what undoes it if its caller goes away after it applied."""

    mutation: Mutation[T]
    undo: Callable[[T], Mutation[Any] | None] | None = None
    # Whether an answer that depends on the state (nothing changed, not found)
    # must be computed on a state read after the mutation was submitted, or,
    # with `fresh_since`, read since then at least (monotonic).
    verify: bool = True
    fresh_since: float | None = None


_Entry = Pending[_Op[Any], Any]


@dataclass
class _Outcome:
    """What one attempt of a batch computed, kept until we know if it landed."""

    write_id: str
    results: list[tuple[bool, Any]]  # (ok, result or exception) per live entry
    entries: list[_Entry]
    new_objects: dict[str, Segment | Manifest]  # decoded, for the cache once it landed
    # The head's ETag the write was conditioned on (None: on its absence).
    condition: str | None = None
    # Whether its answer said it may yet land (AmbiguousWrite: a PUT sent and
    # unanswered lands late on S3 if the head still has `condition` then).
    may_land_late: bool = False


def _may_land_late(t: _Topic, outcomes: list[_Outcome]) -> bool:
    """Whether one of a batch's tries, none of which the read-back found, may
    land yet: unanswered (not refused, not unsent) and conditioned on the head
    the store had when last read. One conditioned on an older head never can
    (each head holds a new write id: its ETag is never seen again)."""
    return any(o.may_land_late and o.condition == t.etag for o in outcomes)


class _Topic:
    """A topic's cached state and its queue of mutations waiting to commit."""

    batcher: Batcher[_Op[Any], Any]

    def __init__(self, name: str) -> None:
        self.name = name
        self.head_key = keys.head(name)
        self.state: TopicState | None = None  # the writers' state: what the next batch changes
        self.etag: str | None = None  # None with a state: the head does not exist yet
        # When the cached state was last known current: the monotonic time the
        # GET that read it, or the PUT that wrote it, was sent.
        self.checked_at = _UNCHECKED
        self.committed: bytes | None = None  # the head as it landed, for readers
        # The head in place holds a write the store could not make durable
        # (NotDurable): the next batch writes, even one that changes nothing.
        self.unsynced = False
        self.reader: TopicState | None = None
        self.waiting = WaitingLine()  # long polls waiting for a change, oldest first
        self.lock = asyncio.Lock()  # held while a batch commits or a reader reloads
        self.used_at = time.monotonic()
        # Objects the batch being committed has read: its states hold on to
        # them, so a cache too small for one batch costs fetches, not a loop.
        self.seen: dict[str, Any] = {}
        # Which ids the topic's segments surely lack, kept across its states:
        # a reloaded state would otherwise rebuild it (see state.idfilter).
        # Charged to the object cache's budget (_charge_ids), which drops it
        # when it must make room: an empty one rules nothing out, and the next
        # duplicate check covers the head again (through the cache).
        self.ids = IdFilter()
        self.ids_key = f"ids:{name}"  # its charge's key in the cache (no object's)
        # Keys of its objects known corrupt or gone in this process: the
        # seals' upkeep leaves them alone (one a mutation reads well again,
        # mended, leaves the set).
        self.bad: set[str] = set()


def _with(
    entries: list[_Entry],
    results: list[tuple[bool, Any]],
    failed: list[tuple[_Entry, tuple[bool, Any]]],
) -> tuple[list[_Entry], list[tuple[bool, Any]]]:
    """`entries` and their `results`, and those that `failed` alone besides."""
    return [*entries, *(e for e, _ in failed)], [*results, *(r for _, r in failed)]


def _claims_fitting(bounds: Bounds, cache_bytes: int) -> Bounds:
    """`bounds`, with the payloads a batch's claims take no more than
    CLAIM_SHARE of a cache of `cache_bytes` holds (it counts stored bytes
    DECODED_PER_BYTE times)."""
    fitting = int(cache_bytes * CLAIM_SHARE) // DECODED_PER_BYTE
    return replace(bounds, claim_bytes=max(1, min(bounds.claim_bytes, fitting)))


class GroupCommitter:
    """Batches mutations per topic into conditional writes of the topic's head."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        broker_id: str,
        epoch: int = 0,
        settings: CommitSettings | None = None,
        clock: Callable[[], float] = time.time,
        clock_ahead: Callable[[float], float] = lambda now: 0.0,
        clock_behind: Callable[[float], float] = lambda now: 0.0,
        cache: ObjectCache | None = None,
    ) -> None:
        self.store = store
        self.broker_id = broker_id
        self.epoch = epoch
        self.settings = settings or CommitSettings()
        # How far the store's time may be ahead of a time `clock` gave, and
        # behind it (seconds): leases count from now + clock_ahead(now), the
        # latest the store's time may be, and are reaped by now -
        # clock_behind(now), the earliest, so that no error ends one early.
        # Two, not one error either way: after the store's clock was set
        # back, now() stands still above the store's time, and a lease
        # counted from now + that distance ran twice the step too long.
        self.clock_ahead = clock_ahead
        self.clock_behind = clock_behind
        self.clock = clock
        self._clock_sampled = False  # store.sample_clock() done once, before the first apply
        self.cache = cache or ObjectCache(store, self.settings.cache_bytes)
        self.bounds = _claims_fitting(self.settings.bounds, self.cache.budget)
        self.stats = CommitStats()
        self.fenced_by: dict[str, Any] | None = None  # a newer writer seen in a head
        self.on_batch: Callable[[int], None] | None = None  # told each batch's size
        self.on_fenced: Callable[[dict[str, Any]], None] | None = None
        # Told of every write of this broker that landed, with the state it left;
        # of every head read from the store, with its state; and of every batch
        # whose outcome is unknown here (the store failed while it was written).
        self.on_landed: Callable[[str, TopicState], None] | None = None
        self.on_loaded: Callable[[str, TopicState], None] | None = None
        self.on_failed: Callable[[str], None] | None = None
        # Told of every topic forget_idle() drops from memory, with its state
        # as last committed and the time.
        self.on_forgotten: Callable[[str, TopicState, float], None] | None = None
        self._topics: dict[str, _Topic] = {}
        # The orphans each topic's last sweep saw (oldest sweep first), for its
        # next: apart from the topics' states, which leave memory while idle
        # (a topic quiet between two sweeps would have every orphan sighted
        # for the first time, and none deleted). At most SIGHTINGS_KEPT keys.
        self._sighted: dict[str, frozenset[str]] = {}
        self._sighted_keys = 0
        self._rescan_at = 0  # topics held before forget_idle() is tried again on a new one
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._aborted = False  # abort(): nothing of this committer runs after it
        self.long_polls_ended = False  # end_long_polls(): the broker is stopping
        self._corrupt_logged: set[str] = set()

    # --- public interface -------------------------------------------------------

    async def submit(
        self,
        topic: str,
        mutation: Mutation[T],
        undo: Callable[[T], Mutation[Any] | None] | None = None,
        verify: bool = True,
        fresh_since: float | None = None,
    ) -> T:
        """Apply `mutation` in the topic's next batch; return its result once the
        write holding it landed. If the caller goes away after the mutation was
        applied, `undo(result)` (when given) is committed in a later batch.
        Without `verify`, a mutation that changes nothing is answered from the
        cached state, however old (the owner's upkeep: a state another broker
        changed meanwhile is handed to it or read at its next write). With
        `fresh_since` (monotonic), from a state read since then, though before
        the mutation was submitted (a claim that finds nothing: a long poll's
        last look at the store will do, Engine._poll)."""
        if self._closing:
            raise StoreUnavailable("broker is shutting down")
        answer = self._topic(topic).batcher.post(_Op(mutation, undo, verify, fresh_since))
        try:
            result: T = await answer
        except asyncio.CancelledError:
            # Cancelled once its answer was set, before it ran again: its batch
            # did not see it go (_outcomes), yet it never had the result.
            if undo is not None and answer.done() and not answer.cancelled():
                reverse = undo(answer.result()) if answer.exception() is None else None
                if reverse is not None:
                    self._spawn(self._undo(topic, reverse))
            raise
        return result

    async def submit_each(
        self, topic: str, mutations: Sequence[Mutation[T]]
    ) -> list[T | BaseException]:
        """Apply each mutation in the topic's next batch, as many submit() calls
        would (each is its own entry: it fails alone, one that meets a corrupt
        object too, the batch applied again without it; and one that changes
        nothing is verified alone), without a task per mutation; each outcome
        is its result or the exception it failed with."""
        if self._closing:
            raise StoreUnavailable("broker is shutting down")
        batcher = self._topic(topic).batcher
        posted = [batcher.post(_Op(mutation, None, True)) for mutation in mutations]
        # Futures, not coroutines: gather wraps none of them in a task.
        outcomes: list[T | BaseException] = await asyncio.gather(*posted, return_exceptions=True)
        return outcomes

    async def read(
        self, topic: str, query: Callable[[TopicState, float], T], max_age: float | None = None
    ) -> T:
        """Answer `query` from the last committed state, refreshed when older
        than `max_age` (default: the settings'; math.inf: this broker's state
        is current, it owns the topic). A topic never read, or invalidated, is
        read whatever `max_age` says. Readers never see a batch that has not
        landed."""
        t = self._topic(topic)
        asked = time.monotonic() - (self.settings.max_age if max_age is None else max_age)
        if t.checked_at < asked or t.checked_at == _UNCHECKED:
            async with t.lock:  # waits for a batch in flight, whose landing may do
                if t.checked_at < asked or t.checked_at == _UNCHECKED:
                    await self._load(t)
        reader = self._reader(t)
        try:
            for _ in range(_MAX_FETCH_ROUNDS):
                reader = self._reader(t)
                try:
                    return query(reader, self.clock())
                except SegmentMissing as miss:
                    async with t.lock:
                        await self._fetch(t, reader, miss.key, False, miss.also, miss.exact)
        finally:
            # What this read held on to goes back to the cache's budget: a
            # reader lives until the next write, which may be long in coming.
            reader.release()
        raise CacheTooSmall(f"topic {topic!r}: the object cache is too small for this read")

    def _reader(self, t: _Topic) -> TopicState:
        if t.reader is None:
            t.reader = self._from_bytes(t.name, t.committed)
        return t.reader

    def end_long_polls(self) -> None:
        """The broker is stopping: every wait_changed() returns now, and from
        now on at once, so that long polls answer (nothing) rather than hold
        the stop for as long as they were to wait."""
        self.long_polls_ended = True
        for t in self._topics.values():
            t.waiting.wake_all()

    async def wait_changed(self, topic: str, seconds: float, since: float | None = None) -> bool:
        """Return True when a batch lands on `topic` in this broker, False after
        `seconds` without one (at once after end_long_polls()). `since`
        (monotonic): when the caller's long poll began, its place among those
        waiting on the topic: they are woken oldest first (waiting.WaitingLine)."""
        if self.long_polls_ended:
            return False
        return await self._topic(topic).waiting.wait(seconds, since)

    def waiting(self, topic: str) -> int:
        """How many long polls wait for a change of `topic` now."""
        t = self._topics.get(topic)
        return 0 if t is None else len(t.waiting)

    def checked_at(self, topic: str) -> float | None:
        """When what this broker holds of `topic` was last known current (the
        monotonic time the GET that read it, or the PUT that wrote it, was
        sent); None if it holds nothing, or was told it changed since."""
        t = self._topics.get(topic)
        if t is None or t.committed is None or t.checked_at == _UNCHECKED:
            return None
        return t.checked_at

    def known_topics(self) -> list[str]:
        """The topics this broker holds in memory (read or written lately)."""
        return [name for name, t in self._topics.items() if t.committed is not None]

    async def topics(self) -> list[str]:
        """Every topic in the store."""
        found = (keys.topic_of_head(k) for k in await self.store.list_top(keys.TOPICS_PREFIX))
        return sorted(t for t in found if t is not None)

    async def topics_with_objects(self) -> set[str]:
        """The topics that may have objects beside their head (a folder of
        segments), in one listing: a topic of one object has no orphans."""
        found = await self.store.list_folders(keys.TOPICS_PREFIX)
        return {t for t in map(keys.topic_of_folder, found) if t is not None}

    async def peek(
        self,
        topic: str,
        query: Callable[[TopicState, float], T],
        unkept: Callable[[TopicState, float], None] | None = None,
    ) -> T:
        """Answer `query` from the topic's head as the store has it now, without
        keeping anything in memory when the topic is not in use here (an owner
        looking at each of thousands of topics it took over, a listing of every
        topic). The objects a query needs beyond the head are fetched as a
        read's are (with what tends to be wanted with them), held by the state
        until it answers, and the topic is not kept: `unkept` is shown the state
        that answered before it goes (what /metrics keeps of it; it does no I/O)."""
        if topic in self._topics:
            return await self.read(topic, query)
        key = keys.head(topic)
        data = await self._get_or_none(key)
        state = self._from_bytes(topic, data, {})
        moves = 0
        try:
            while True:
                try:
                    now = self.clock()
                    answer = query(state, now)
                except SegmentMissing as miss:
                    try:
                        fetched = await self._fetch_round(state, miss.key, miss.also, miss.exact)
                    except ObjectNotFound:
                        # The head moved on (a sweep deleted what it no longer
                        # names), or the object is lost.
                        again = await self._get_or_none(key)
                        moves += 1
                        if again == data or moves > _MAX_FETCH_ROUNDS:
                            error = CorruptData(miss.key, f"referenced by {key}, not in the store")
                            self._log_corrupt(topic, error)
                            raise error from None
                        state.release()
                        data, state = again, self._from_bytes(topic, again, {})
                        continue
                    # Held by the state (each object once: every round makes
                    # progress, and a head names finitely many).
                    for held_key, obj in fetched.items():
                        state.hold(held_key, obj)
                else:
                    if unkept is not None:
                        unkept(state, now)
                    return answer
        finally:
            state.release()

    async def _get_or_none(self, key: str) -> bytes | None:
        try:
            return (await self.store.get(key))[0]
        except ObjectNotFound:
            return None

    def forget(self, topics: list[str]) -> None:
        """Drop the cached state of `topics` (those not in use right now): this
        broker stopped owning them, and another writes them now."""
        for name in topics:
            t = self._topics.get(name)
            if t is not None and self._is_idle(t):
                self._forgotten(t)

    async def invalidate(self, topic: str) -> None:
        """The topic's head changed in the store (another broker wrote it): its
        next batch, read and state-dependent answer start from a fresh GET,
        and the long polls waiting on it try again now (what they wait for
        may be there)."""
        t = self._topics.get(topic)
        if t is None:
            return
        async with t.lock:
            t.state, t.checked_at = None, _UNCHECKED
        t.waiting.wake_all()

    def wake_waiting(self) -> None:
        """Every long poll tries again now (which topics this broker owns
        changed: how often each must look at the store did)."""
        for t in self._topics.values():
            t.waiting.wake_all()

    async def check_store(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        with contextlib.suppress(ObjectNotFound):
            await self.store.get(keys.BROKER)

    async def close(self) -> None:
        """Stop taking mutations and wait for batches in flight to land, and
        for the undos of those whose callers went away (a stop cancels its
        blocked callers: their claims and pops go back)."""
        self._closing = True
        while True:
            await asyncio.gather(
                *(t.batcher.close() for t in self._topics.values()), return_exceptions=True
            )
            if not self._background:
                return
            await asyncio.gather(*self._background, return_exceptions=True)

    async def abort(self) -> None:
        """Stop taking mutations and cancel the batches in flight and queued,
        for a stop that cannot wait for the store any longer. Their callers
        get StoreUnavailable. A write already sent may still land: it lands
        whole or not at all, and nothing of this committer's runs after."""
        self._closing = self._aborted = True
        for task in self._background:
            task.cancel()
        error = StoreUnavailable(
            "the broker stopped before the store answered: the write may or may not have landed"
        )
        await asyncio.gather(
            *(t.batcher.abort(error) for t in self._topics.values()),
            *self._background,
            return_exceptions=True,
        )

    async def sweep(self, topic: str) -> list[str]:
        """Delete the topic's orphan objects: those no head references (nor any
        claimed job's payload), seen unreferenced by the previous sweep too.
        Orphans are what consumed and compacted segments leave behind, attempts
        that failed after writing their objects, and a broker that died between
        its object and head writes. Call it far less often than any write takes
        and any broker keeps a head (minutes): an object is only deleted once
        it was an orphan that long, so no broker still reading it loses it.

        Before deleting, the head is written again (a fence): a writer that
        read an older head and wrote its objects, then stalled (paused, or its
        PUT held up) past two sweeps before its head's PUT, loses its race
        instead of landing a head that names objects gone. Whatever landed
        before the fence keeps what it names.

        What was deleted. An object the store will not delete (InvalidKey: a
        stray name in a topic's folder; StoreRefused) is logged and left, the
        others deleted all the same."""
        listed = set(await self.store.list(keys.segments_prefix(topic)))
        # Peeked: a topic not in use here is not kept in memory for its sweep
        # (a broker sweeps each topic it took over, thousands maybe).
        referenced = set(await self.peek(topic, lambda s, now: s.referenced()))
        orphans = listed - referenced
        sighted = self._sighted.get(topic, frozenset())
        if orphans & sighted:
            fenced = set(await self.submit(topic, _fence))
            orphans -= fenced
        doomed = sorted(orphans & sighted)
        self._sight(topic, orphans - set(doomed))
        deleted: list[str] = []
        refused: list[tuple[str, StoreError]] = []
        try:
            for key in doomed:
                try:
                    await self.store.delete(key)
                except (InvalidKey, StoreRefused) as exc:
                    # That object's own (a stray name no key has, a file we
                    # may not remove): the others are deleted all the same. An
                    # outage (StoreUnavailable) ends the sweep.
                    refused.append((key, exc))
                    continue
                deleted.append(key)
                self.stats.segments_deleted += 1
        finally:
            self.cache.forget(doomed)
            if refused:
                log.warning(
                    "sweep of %s: %d orphans could not be deleted, %s first: %s",
                    topic,
                    len(refused),
                    refused[0][0],
                    refused[0][1],
                )
        return deleted

    def _sight(self, topic: str, orphans: set[str]) -> None:
        """Keep `orphans` as what `topic`'s last sweep saw. Past SIGHTINGS_KEPT
        keys, the topics swept longest ago lose theirs (seen again, they are
        deleted a sweep later), and a topic alone past it keeps that many."""
        self._sighted_keys -= len(self._sighted.pop(topic, ()))
        if not orphans:
            return
        kept = frozenset(sorted(orphans)[:SIGHTINGS_KEPT])
        self._sighted[topic] = kept
        self._sighted_keys += len(kept)
        while self._sighted_keys > SIGHTINGS_KEPT:  # the newest is within it alone
            self._sighted_keys -= len(self._sighted.pop(next(iter(self._sighted))))

    def sighted(self) -> list[str]:
        """The topics whose last sweep saw orphans, which their next deletes."""
        return list(self._sighted)

    async def sweep_leftovers(self, older_than: float) -> int:
        """Remove the store's leftovers of writes cut short, untouched for
        `older_than` seconds (ObjectStore.sweep_leftovers); how many."""
        return await self.store.sweep_leftovers(older_than)

    def cached(
        self, query: Callable[[TopicState, float], T], topics: Iterable[str] | None = None
    ) -> dict[str, T]:
        """`query` answered for every topic this broker holds (of `topics`, if
        given), from its cache as last committed (no I/O). A topic whose answer
        would need an object not in the cache, or that cannot be read, is left
        out."""
        out: dict[str, T] = {}
        now = self.clock()
        held = self._topics
        names = list(held) if topics is None else [n for n in topics if n in held]
        for name in names:
            t = held[name]
            if t.committed is None:
                continue
            reader = self._as_committed(t)
            try:
                with contextlib.suppress(SegmentMissing, SimpleQueueError):
                    out[name] = query(reader, now)
            finally:
                reader.release()  # a state lives until the next write
        return out

    def _as_committed(self, t: _Topic) -> TopicState:
        """A state of the committed head to answer one query from, keeping no
        second decoded head for it: the reader a read() left, else the
        writers' state while no batch is under way (it is what landed, or
        what was read), else one decoded for this answer alone."""
        if t.reader is not None:
            return t.reader
        if t.state is not None and not t.lock.locked():
            return t.state
        return self._from_bytes(t.name, t.committed)

    async def cached_in_turns(
        self, query: Callable[[TopicState, float], T]
    ) -> AsyncIterator[dict[str, T]]:
        """cached() for every topic this broker holds, however many: their
        answers CACHED_SLICE topics at a time, the event loop taking its turns
        between (another task may change a topic meanwhile: what a slice's
        answers are compared with is read as they come)."""
        names = list(self._topics)
        for start in range(0, len(names), CACHED_SLICE):
            if start:
                await asyncio.sleep(0)
            yield self.cached(query, names[start : start + CACHED_SLICE])

    @property
    def writer(self) -> dict[str, Any]:
        return {"broker_id": self.broker_id, "epoch": self.epoch}

    # --- batching ---------------------------------------------------------------

    def _topic(self, name: str) -> _Topic:
        t = self._topics.get(name)
        if t is None:
            if len(self._topics) >= max(self.settings.topics_kept, self._rescan_at):
                self.forget_idle()
            t = self._topics[name] = _Topic(name)
            t.batcher = Batcher(
                functools.partial(self._commit, t),
                max_batch=1_000_000,  # a batch is whatever queued during the last write
                linger=Linger(self.settings.linger, self.settings.linger_max),
                name=f"commit:{name}",
            )
        t.used_at = time.monotonic()
        return t

    def forget_idle(self) -> int:
        """Topics not in use leave memory (they are read again if asked): those
        with nothing in the store (a request named one that does not exist),
        whenever this is called; past topics_kept topics, those idle for
        idle_after, the least recently used first; whatever the count, those
        idle for idle_max; and past topics_max, the least recently used however
        lately. How many left."""
        s = self.settings
        now = time.monotonic()
        free = sorted(
            (t for t in self._topics.values() if self._is_idle(t)), key=lambda t: t.used_at
        )
        doomed = [t for t in free if t.committed is None]
        held = len(self._topics) - len(doomed)
        for t in free:
            if t.committed is not None and (
                t.used_at < now - s.idle_max
                or (held >= s.topics_kept and t.used_at < now - s.idle_after)
                or held >= s.topics_max
            ):
                doomed.append(t)
                held -= 1
        for t in doomed:
            if self.on_forgotten is not None and t.committed is not None:
                reader = self._as_committed(t)
                try:
                    with contextlib.suppress(SegmentMissing, SimpleQueueError):
                        self.on_forgotten(t.name, reader, self.clock())
                finally:
                    reader.release()
            self._forgotten(t)
        # Still past topics_kept, too few idle (many new topics at once: a BLPOP
        # on 20,000 keys): a new topic does not scan every one again (that was
        # quadratic), until an eighth more have come or this is called again.
        n = len(self._topics)
        self._rescan_at = n + max(1, n // 8) if n >= s.topics_kept else 0
        return len(doomed)

    def _charge_ids(self, t: _Topic) -> None:
        """The topic's id filter, as its last batch left it, counts in the
        cache's budget as its most recently used entry."""
        if t.state is not None:
            # A state restored after a fetch (_undo_batch) holds the filter it
            # had, whether or not the cache dropped it meanwhile.
            t.ids = t.state.ids
        if t.ids.nbytes:
            self.cache.charge(t.ids_key, t.ids.nbytes, functools.partial(self._drop_ids, t))
        else:
            self.cache.uncharge(t.ids_key)

    @staticmethod
    def _drop_ids(t: _Topic) -> None:
        """The cache made room: the topic's id filter goes. Its states get an
        empty one (TopicState.ids: which no head is covered by yet)."""
        t.ids = IdFilter()
        if t.state is not None:
            t.state.ids = t.ids

    def _forgotten(self, t: _Topic) -> None:
        """The topic left memory: so does its filter, from the cache's count."""
        del self._topics[t.name]
        self.cache.uncharge(t.ids_key)

    @staticmethod
    def _is_idle(t: _Topic) -> bool:
        # Not one whose head in place is not durable: its next batch must write.
        return not t.batcher.busy and not t.lock.locked() and not t.waiting and not t.unsynced

    def _head_of(self, t: _Topic) -> dict[str, Any]:
        """The committed head, freshly decoded."""
        data = t.committed
        return decode_head(t.name, t.head_key, data) if data else new_head(t.name)

    def _from_bytes(
        self,
        topic: str,
        data: bytes | None,
        seen: dict[str, Any] | None = None,
        ids: IdFilter | None = None,
    ) -> TopicState:
        head = decode_head(topic, keys.head(topic), data) if data else new_head(topic)
        return TopicState(head, self.cache, self.bounds, self.settings.policy, seen, ids)

    async def _commit(self, t: _Topic, batch: list[_Entry]) -> list[Any]:
        """Commit a batch; every entry's outcome (a result or its exception)."""
        try:
            async with t.lock:
                try:
                    return await self._commit_batch(t, batch)
                finally:
                    t.seen.clear()
                    self._charge_ids(t)
        except asyncio.CancelledError:
            t.state = None
            self._tell(self.on_failed, t.name)
            raise
        except CorruptData as exc:
            t.state = None
            self._log_corrupt(t.name, exc)
            raise
        except SimpleQueueError:
            t.state = None
            self._tell(self.on_failed, t.name)  # it may have landed unseen
            raise
        except Exception as exc:
            t.state = None
            self._tell(self.on_failed, t.name)
            log.exception("commit of %d mutations to %s failed", len(batch), t.name)
            raise StoreUnavailable(f"commit failed: {exc!r}") from exc

    def _log_corrupt(self, topic: str, exc: CorruptData, upkeep: bool = False) -> None:
        if exc.key not in self._corrupt_logged:  # once per object, not per request
            self._corrupt_logged.add(exc.key)
            if upkeep:
                log.error(
                    "topic %s: its upkeep leaves alone an object it cannot read "
                    "(requests that need it fail): %s",
                    topic,
                    exc,
                )
            else:
                log.error("topic %s cannot be served: %s", topic, exc)

    async def _commit_batch(self, t: _Topic, batch: list[_Entry]) -> list[Any]:
        self.stats.batches += 1
        self.stats.mutations += len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch))
        outcomes: list[_Outcome] = []  # every attempt; at most one of them lands
        s = self.settings

        def retrying(elapsed: float) -> AsyncRetrying:
            return AsyncRetrying(
                retry=retry_if_exception_type(_LostRace),
                stop=stop_after_delay(max(0.0, s.budget - elapsed)),
                wait=wait_random_exponential(multiplier=s.backoff_min, max=s.backoff_max),
                reraise=False,
            )

        deadline = time.monotonic() + s.budget
        try:
            answered = await first_then_retrying(
                lambda: self._attempt(t, batch, outcomes, deadline), retrying
            )
        except (StoreUnavailable, StorageFull) as exc:
            # Refused, a cache too small, full, ...: said at once. If an earlier try
            # may land yet, callers must not take it for "did not land".
            if isinstance(exc, (AmbiguousWrite, NotDurable)) or not _may_land_late(t, outcomes):
                raise
            raise AmbiguousWrite(
                f"topic {t.name!r}: {exc}; an earlier try, unanswered on the head the "
                f"store still has, may or may not land"
            ) from exc
        except RetryError as exc:
            # Objects of failed attempts are left for the orphan sweep: a PUT
            # that timed out here might still land at S3, and must find them.
            lost = exc.last_attempt.exception()
            if _may_land_late(t, outcomes):
                # A try the read-back did not find may land yet: a caller that
                # took plain StoreUnavailable for "did not land" (a pop's
                # give-back kept for another undo) would do it twice.
                raise AmbiguousWrite(
                    f"topic {t.name!r}: {len(outcomes)} writes failed in "
                    f"{self.settings.budget:.0f} s, one of them unanswered on the head "
                    f"the store still has: it may or may not land"
                ) from None
            if isinstance(lost, _LostRace) and isinstance(lost.cause, StoreUnavailable):
                # Not contention: the store failed the writes (its last words said).
                raise StoreUnavailable(
                    f"topic {t.name!r}: the store failed requests for "
                    f"{self.settings.budget:.0f} s ({len(outcomes)} writes tried), "
                    f"the last: {lost.cause}"
                ) from None
            raise Contended(
                f"topic {t.name!r}: lost {len(outcomes)} races in {self.settings.budget:.0f} s"
            ) from None
        return self._outcomes(t, batch, *answered)

    async def _attempt(
        self, t: _Topic, batch: list[_Entry], outcomes: list[_Outcome], deadline: float
    ) -> tuple[list[_Entry], list[tuple[bool, Any]]]:
        """One try at writing the batch: the entries it applied and their
        (ok, result or error), once they are final. Raises _LostRace, also
        when a read on the way in failed (the head, a segment, the clock's
        sample; nothing of this try was written): tried again within the
        budget, as a lost race is, not answered 503 at once (a 0.3-1 s
        outage answered 50-180 requests so in the store-fault campaign)."""
        try:
            return await self._try(t, batch, outcomes, deadline)
        except (StoreRefused, AmbiguousWrite, NotDurable, CacheTooSmall):
            raise  # said no, may have landed, landed: not a read that failed
        except StoreUnavailable as exc:
            t.state = None  # read afresh by the next try
            raise _LostRace(exc) from None

    async def _try(
        self, t: _Topic, batch: list[_Entry], outcomes: list[_Outcome], deadline: float
    ) -> tuple[list[_Entry], list[tuple[bool, Any]]]:
        """_attempt's work: a failed write raises _LostRace (its read-back
        found it did not land), a failed read StoreUnavailable."""
        entries = [e for e in batch if not e.abandoned]  # skip callers gone before apply
        if not entries:
            return [], []
        if not self._clock_sampled:
            # Times go into the store on its clock, never on a guess: a broker
            # that serves before its first write (a localfs read carries no
            # stamp) would write its wall clock's leases and expiries.
            await self.store.sample_clock()
            self._clock_sampled = True
        # Those that met a corrupt object, each failing alone: a round apiece.
        failed: list[tuple[_Entry, tuple[bool, Any]]] = []
        tidy = True  # False: this batch's seal does no upkeep (_SealMet.known)
        for _ in range(_MAX_FETCH_ROUNDS + len(entries)):
            if t.state is None:
                await self._load(t)
            state = t.state
            assert state is not None
            if outcomes:
                # Read afresh after an earlier try's write went unanswered (a
                # read on the way in failed, a segment fetched): that try may
                # have landed since, late. Only the read-back after a write
                # asked; applied again, a claim took its jobs twice (one held
                # by a token nobody had, for its lease).
                landed = self._ours(state, outcomes)
                if landed is not None:
                    self._keep(landed.new_objects)
                    return self._landed(t, landed, data=None)
            now = self.clock()
            state.begin()
            try:
                results, changed, verify_since = self._apply(state, entries, now)
                if verify_since > t.checked_at:
                    # "Not found", "not claimed", "nothing to claim" or "duplicate",
                    # computed on a state read before the request came, may miss
                    # what another broker wrote meanwhile: read again (once).
                    # Undone, the state is the committed head's again: if the
                    # store still has that head, it is current, and is kept.
                    state.rollback(self._head_of(t))
                    await self._load(t)
                    continue
                if not changed and not t.unsynced:
                    return _with(entries, results, failed)
                write_id = uuid.uuid4().hex
                sealed = self._seal(t, state, write_id, now, tidy)
            except _SealMet as met:
                # An object only the seal's upkeep wanted: it is left alone
                # (known bad from now on), and the batch goes on without it.
                state.rollback(self._head_of(t))
                if met.known:
                    tidy = False
                else:
                    self._learn_bad(t, met.error)
                continue
            except (SegmentMissing, _MissingFor, _MetCorrupt) as exc:
                # The batch half-applied: undone (what it missed fetched) and
                # applied again. A mutation that met a corrupt object, or wanted
                # one that cannot be read (not JSON, gone), fails alone: a claim
                # that meets a corrupt segment of a low priority fails, not the
                # enqueues committed with it.
                bad = await self._undo_batch(t, state, exc)
                if bad is not None:
                    entry, error = bad
                    self._log_corrupt(t.name, error)
                    failed.append((entry, (False, error)))
                    entries = [e for e in entries if e is not entry]
                    if not entries:
                        return _with(entries, [], failed)
                continue
            break
        else:
            raise CacheTooSmall(f"topic {t.name!r}: the object cache is too small")
        data = sealed.head
        sent_at = time.monotonic()
        entries, results = _with(entries, results, failed)
        outcome = _Outcome(write_id, results, entries, sealed.decoded, condition=t.etag)
        outcomes.append(outcome)
        try:
            # The new objects first (side by side), the head that names them
            # once all landed: on S3 a batch that spills two segments waits one
            # PUT for them, not two; on localfs all is one trip to a thread.
            etag = await self.store.put_if_after(
                sealed.new_objects,
                t.head_key,
                data,
                if_match=t.etag,
                if_none_match=t.etag is None,
            )
        except StorageFull:
            raise  # nothing landed: the store said so before writing anything
        except (PreconditionFailed, StoreUnavailable) as exc:
            self.stats.ambiguous += isinstance(exc, StoreUnavailable)
            outcome.may_land_late = isinstance(exc, AmbiguousWrite)
            t.state = None
            # In place but not durable: until a write lands durable, none of
            # the topic's answers may say done (a retry finding its job).
            t.unsynced = t.unsynced or isinstance(exc, NotDurable)
            # Whatever the error said, the head tells whether one of our tries
            # landed: it keeps our latest write id.
            await self._read_back(t, deadline)
            assert t.state is not None
            landed = self._ours(t.state, outcomes)
            if landed is None and isinstance(exc, StoreRefused):
                # Not a race: the store said no (access denied, no such bucket).
                # Tried again, it said the same until the budget ran out, which
                # then read as contention ("lost N races").
                raise exc
            if landed is None:
                self.stats.conflicts += 1
                raise _LostRace(exc) from None
            self._keep(landed.new_objects)
            if isinstance(exc, NotDurable):  # in place, but a crash may lose it
                await self._rewrite(t, exc)
            return self._landed(t, landed, data=None)
        self._wrote(t, sealed, etag)
        t.checked_at = sent_at
        return self._landed(t, outcome, data=data)

    def _ours(self, state: TopicState, outcomes: list[_Outcome]) -> _Outcome | None:
        """The try of `outcomes` whose write `state`'s head holds (it keeps our
        latest write id), if any: write ids decide, never content."""
        ours = state.head["writers"].get(self.broker_id)
        return next((o for o in outcomes if o.write_id == ours), None)

    async def _undo_batch(
        self, t: _Topic, state: TopicState, why: SegmentMissing | _MissingFor | _MetCorrupt
    ) -> tuple[_Entry, CorruptData] | None:
        """Undo a batch `why` stopped half-applied, fetching the object it
        missed: the mutation that is to fail alone, and why (a corrupt object
        it met, or one it wanted that cannot be read), if any. A seal's missing
        object that cannot be read is known bad from now on, and its upkeep
        leaves it alone (a head that cannot be read fails the batch)."""
        if isinstance(why, _MetCorrupt):
            state.rollback(self._head_of(t))
            return why.entry, why.error
        miss, wanting = (why.miss, why.entry) if isinstance(why, _MissingFor) else (why, None)
        bad: tuple[_Entry, CorruptData] | None = None
        t.state = None
        try:
            await self._fetch(t, state, miss.key, also=miss.also, exact=miss.exact)
        except CorruptData as error:
            if wanting is not None:
                bad = wanting, error
            elif error.key == t.head_key:
                raise
            else:
                self._learn_bad(t, error)
        if t.state is None:  # the head has not moved: the state can go on
            state.rollback(self._head_of(t))
            t.state = state
        return bad

    def _seal(self, t: _Topic, state: TopicState, write_id: str, now: float, tidy: bool) -> Sealed:
        """`state` sealed, its upkeep leaving the objects known bad alone (none
        without `tidy`). _SealMet if it meets an object that cannot be read
        (one of those known, where upkeep does not look for them, too)."""
        try:
            return state.seal(self.writer, write_id, now, t.bad, tidy)
        except SegmentMissing as miss:
            if miss.key not in t.bad:
                raise  # fetched, and the batch applied again
            raise _SealMet(CorruptData(miss.key, "known bad"), known=True) from None
        except CorruptData as exc:
            if exc.key == t.head_key:
                raise
            raise _SealMet(exc, known=exc.key in t.bad) from None

    def _learn_bad(self, t: _Topic, error: CorruptData) -> None:
        """`error`'s object is known bad: the topic's upkeep leaves it alone."""
        t.bad.add(error.key)
        self._log_corrupt(t.name, error, upkeep=True)

    def _wrote(self, t: _Topic, sealed: Sealed, etag: str) -> None:
        """A seal's head and objects landed, durable: counted, the ETag kept,
        the objects cached (and held by the cache alone)."""
        self.stats.writes += 1
        self.stats.segments_written += len(sealed.new_objects)
        self.stats.head_bytes_written += len(sealed.head)
        self.stats.bytes_written += len(sealed.head) + sum(
            len(b) for b in sealed.new_objects.values()
        )
        t.etag, t.unsynced = etag, False  # it holds whatever was not durable before
        self._keep(sealed.decoded)
        if t.state is not None:  # the state that sealed: the cache holds its objects now
            t.state.landed()

    async def _rewrite(self, t: _Topic, why: NotDurable) -> None:
        """The head read back holds this batch's write, which the store could
        not make durable (SPEC 3: durable before answered). Write the same
        state again, a new file renamed and synced: only once that lands is the
        batch answered as done. Else it fails (503: it may have landed), and
        its callers' retries find what landed.

        The rewrite does no upkeep (a merge under way would read what the
        cache may no longer hold), and whatever stops its seal (retention
        expiry may still read a manifest) fails it NotDurable as a failed
        write does: never plain StoreUnavailable, which callers take for
        "did not land" (a pop's give-back kept for another undo)."""
        state = t.state
        assert state is not None
        try:
            sealed = state.seal(self.writer, uuid.uuid4().hex, self.clock(), t.bad, tidy=False)
        except Exception as exc:  # no await here: nothing to cancel
            t.state = None
            raise NotDurable(
                f"topic {t.name!r}: a write landed but could not be made durable ({why}), "
                f"nor could it be sealed again ({exc!r}): it may not survive a crash"
            ) from exc
        try:
            etag = await self.store.put_if_after(
                sealed.new_objects, t.head_key, sealed.head, if_match=t.etag
            )
        except SimpleQueueError as exc:
            t.state = None
            raise NotDurable(
                f"topic {t.name!r}: a write landed but could not be made durable ({why}), "
                f"nor could it be written again ({exc}): it may not survive a crash"
            ) from exc
        self._wrote(t, sealed, etag)
        t.committed, t.reader = sealed.head, None

    async def _read_back(self, t: _Topic, deadline: float) -> None:
        """Read the head after a write whose answer is unknown, retrying a store
        that does not answer until the batch's budget is spent: a blip there
        must not fail a batch that landed (its callers would take a done pop,
        say, for undone). If the store stays down, the batch fails
        AmbiguousWrite, saying that it may have landed (a caller that takes a
        plain StoreUnavailable for "did not land", an undo kept for another
        try, would do it again)."""
        s = self.settings
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(StoreUnavailable),
            stop=stop_after_delay(max(0.0, deadline - time.monotonic())),
            wait=wait_random_exponential(multiplier=s.backoff_min, max=s.backoff_max),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._load(t, keep_if_same=False)
        except StoreUnavailable as exc:
            raise AmbiguousWrite(
                f"topic {t.name!r}: a write's answer was lost and the head could not be "
                f"read back ({exc}): it may or may not have landed"
            ) from exc

    def _keep(self, objects: dict[str, Segment | Manifest]) -> None:
        """Objects this broker wrote go into the cache (as its seal decoded
        them): no one reads them back. Not the payloads of spilled leases (x):
        they are wanted only if their job fails or is looked up, and would push
        out what every enqueue reads."""
        for key, obj in objects.items():
            if not key.rsplit("/", 1)[-1].startswith("seg-x"):
                self.cache.keep(obj)

    @staticmethod
    def _apply(
        state: TopicState, entries: list[_Entry], now: float
    ) -> tuple[list[tuple[bool, Any]], bool, float]:
        """Apply each entry; return (ok, result or error) per entry, whether the
        state changed, and the latest submit time of an answer that must be
        computed on a state read after it was asked for."""
        results: list[tuple[bool, Any]] = []
        changed = False
        verify_since = -1e18
        for entry in entries:
            state.dirty = False
            try:
                results.append((True, entry.item.mutation(state, now)))
                depends_on_state = not state.dirty  # a no-op: nothing to claim, duplicate
            except SegmentMissing as miss:
                # Half-way through, maybe: the batch is undone, fetched, applied again.
                raise _MissingFor(entry, miss) from miss
            except CorruptData as exc:
                raise _MetCorrupt(entry, exc) from exc
            except SimpleQueueError as exc:
                results.append((False, exc))
                depends_on_state = isinstance(exc, _STATE_DEPENDENT)
            op = entry.item
            if depends_on_state and op.verify:
                since = entry.submitted if op.fresh_since is None else op.fresh_since
                verify_since = max(verify_since, min(since, entry.submitted))
            changed = changed or state.dirty
        state.dirty = changed
        return results, changed, verify_since

    def _landed(
        self, t: _Topic, outcome: _Outcome, data: bytes | None
    ) -> tuple[list[_Entry], list[tuple[bool, Any]]]:
        if data is not None:
            t.committed, t.reader = data, None
        t.waiting.wake_all()
        if t.state is not None:
            self._tell(self.on_landed, t.name, t.state)
        return outcome.entries, outcome.results

    @staticmethod
    def _tell(listener: Callable[..., None] | None, *args: Any) -> None:
        """A listener's fault never fails the commit or read that told it."""
        if listener is not None:
            try:
                listener(*args)
            except Exception:
                log.exception("a committer listener failed for %s", args[0])

    def _outcomes(
        self,
        t: _Topic,
        batch: list[_Entry],
        entries: list[_Entry],
        results: list[tuple[bool, Any]],
    ) -> list[Any]:
        """Each entry's result or error, in batch order. A mutation whose caller
        went away after it applied is undone in a later batch (its undo says how)."""
        answered = {id(e): r for e, r in zip(entries, results, strict=True)}
        out: list[Any] = []
        for entry in batch:
            ok, result = answered.get(id(entry), (False, None))
            if entry.abandoned and ok and entry.item.undo is not None:
                undo = entry.item.undo(result)
                if undo is not None:
                    self._spawn(self._undo(t.name, undo))
            out.append(result)
        return out

    async def _undo(self, topic: str, mutation: Mutation[Any]) -> None:
        """Commit an undo, closing or not: close() waits for it (abort() not)."""
        if self._aborted:
            log.warning("not undoing an abandoned mutation on %s: the broker stopped", topic)
            return
        try:
            await self._topic(topic).batcher.submit(_Op(mutation, None, True))
        except SimpleQueueError as exc:
            log.warning("could not undo an abandoned mutation on %s: %s", topic, exc)

    # --- loading -------------------------------------------------------------------

    async def _load(self, t: _Topic, keep_if_same: bool = True) -> None:
        """Read the head. When it is the one cached (same ETag), the states built
        on it are kept (with `keep_if_same`), so a reader's GET does not make
        the next batch build its indexes again."""
        self.stats.reloads += 1
        sent_at = time.monotonic()
        try:
            data: bytes | None
            data, etag = await self.store.get(t.head_key)
        except ObjectNotFound:
            data, etag = None, None
        if keep_if_same and t.state is not None and etag == t.etag and data == t.committed:
            t.checked_at = sent_at
            return
        try:
            state = self._from_bytes(t.name, data, t.seen, t.ids)
        except CorruptData as exc:
            self._log_corrupt(t.name, exc)
            raise
        writer = state.head.get("writer") or {}
        if writer.get("broker_id") != self.broker_id and writer.get("epoch", 0) > self.epoch:
            self.fenced_by = writer
            if self.on_fenced is not None:
                self.on_fenced(writer)
        t.state, t.etag, t.checked_at = state, etag, sent_at
        t.committed, t.reader = data, None
        self._tell(self.on_loaded, t.name, state)

    async def _fetch(
        self,
        t: _Topic,
        state: TopicState,
        key: str,
        for_batch: bool = True,
        also: tuple[str, ...] = (),
        exact: bool = False,
    ) -> None:
        """Fetch `key` (and `also`, and unless `exact`, what tends to be wanted
        with them) into the cache; the caller holds the topic's lock. An
        object the head names that is gone means the head moved on (a sweep
        deleted what it no longer referenced): read the head again. If it has
        not moved, the object is lost, and the topic cannot be served."""
        # What tends to be wanted with them as the committed head names them
        # (`state` may be half a batch in: it names objects not written yet).
        committed = self._from_bytes(t.name, t.committed)
        try:
            fetched = await self._fetch_round(committed, key, also, exact, t.bad)
        except ObjectNotFound:
            pass
        else:
            if t.bad:  # asked for, and read well: mended
                t.bad.difference_update(fetched)
            # Prefetching may push them out of the cache: the states hold on to them.
            for got in (key, *also):
                if (obj := fetched.get(got)) is not None:
                    if for_batch:
                        t.seen[got] = obj
                    state.hold(got, obj)
            return
        missing = key
        before = t.etag
        await self._load(t, keep_if_same=False)
        if t.etag == before:
            error = CorruptData(missing, f"referenced by {t.head_key}, but not in the store")
            self._log_corrupt(t.name, error)
            raise error

    async def _fetch_round(
        self,
        names: TopicState,
        key: str,
        also: tuple[str, ...],
        exact: bool = False,
        bad: AbstractSet[str] = frozenset(),
    ) -> dict[str, Segment | Manifest]:
        """One fetch round: `key`, then, together, `also` and what `names` (a
        state whose head names them, asked while they are missing) says tends
        to be wanted with them, reading ahead as many as READ_AHEAD_SHARE of
        the cache holds, each taken to be the size of `key`'s (more would push
        out what they are fetched for, and other topics' objects, before it is
        read). One of those gone (the head moved on) or unreadable spoils none
        of the others, and none of `bad` (known corrupt or gone) is read
        with it. Every object fetched; ObjectNotFound if `key` is gone.
        With `exact`, `key` and `also` only."""
        self.stats.fetch_rounds += 1
        try:
            wanted, ahead = ([*also], []) if exact else names.prefetch(key, *also)
        except CorruptData:  # what it would read ahead through is bad: not read ahead
            wanted, ahead = [*also], []
        if bad:
            wanted = [k for k in wanted if k not in bad]
            ahead = [k for k in ahead if k not in bad]
        fetched = await self.cache.fetch([key])
        wanted += ahead[: self.cache.how_many(fetched[key].size, READ_AHEAD_SHARE)]
        fetched.update(await self.cache.fetch(wanted, lenient=True))
        return fetched

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
