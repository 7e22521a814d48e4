"""What a topic's owner does in the background (SPEC 4.3): expired leases back
to pending when they run out, schedules fired when their slots come, orphan
objects swept, and the broker's memory kept to the topics in use. Everything
goes through the Engine.

Reaping is driven by the lease expiries this broker knows, never by re-reading
every head: every write of this broker that lands says when the topic's next
lease may run out or schedule slot comes (TopicState.next_due), and a broker
that takes topics over (it started, or the live brokers changed) reads each
head it newly owns once, and every head it owns when a broker left (one that
had not seen it yet may have written leases there that only it knew of). An
idle broker makes no store request here, however many topics the store
holds. Dues are on the clock leases are reaped by, the earliest the store's
time may be (Engine.earliest_now): it runs on with the local clock where the
store's now() stands still, after a step back of the store's clock. Every
idle_check, the topics held in memory are looked at from the cache (no
I/O), and one due that the duties do not know of is tended (and
logged: its note was lost). A topic that is due but owned by another broker
(this one served it while the owner did not answer) is handed to its owner,
who reads it again; if the owner does not answer, this broker tends it
itself: the head's conditional write keeps that correct (a schedule's slot
included: the write that fires it moves its next slot on). A broker told of
a topic tends it itself, whoever it takes for its owner: two brokers whose
views of the live set disagree would hand it back and forth.

A supervisor loop: a topic that fails is logged and looked at again in a
while (retry_failed), and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from simplequeue.api import MAX_DELAY, RUN_AT_TOO_LATE, JobSpec
from simplequeue.batching import runs_within
from simplequeue.broker.engine import Engine, TopicOps
from simplequeue.broker.membership import Membership, Peer, rendezvous
from simplequeue.broker.parallel import each
from simplequeue.errors import CorruptData, InvalidRequest, PayloadTooLarge, SimpleQueueError

log = logging.getLogger(__name__)

ACQUIRE_PARALLEL = 16  # heads read at once when topics are taken over
DELIVER_BATCH = 500  # follow-ups delivered per round
DELIVER_ROUNDS = 8  # rounds per wake-up, before other topics get their turn
DELIVER_PARALLEL = 8  # topics a round delivers into at once
FRONTS_KEPT = 4  # reads of a topic's held-back outbox front remembered (_HeldBack)
TEND_PARALLEL = 32  # topics tended at once
HEAP_SLACK = 64  # wake-ups in the heap beyond two per topic, before it is rebuilt
FOLLOW_UP_FIELDS = 512  # bytes of a follow-up's JSON besides its payload, at most (id, ...)


@dataclass(frozen=True)
class DutySettings:
    sweep_interval: float = 600.0  # seconds between sweeps of orphan objects
    # Age at which a sweep removes a write's leftover temp file: no write takes
    # that long, and one whose process was stopped that long fails unanswered.
    leftover_age: float = 3600.0
    idle_check: float = 30.0  # seconds between evictions of idle topics from memory
    retry_failed: float = 5.0  # seconds before a topic whose reap failed is looked at again
    # Bytes of follow-ups passed on in one request: well inside the brokers'
    # --max-body (the server sets half of it).
    deliver_bytes: int = 512 * 1024


class Duties:
    """Reaps the topics this broker owns when their leases run out; sweeps them;
    forgets idle ones."""

    def __init__(
        self,
        engine: Engine,
        membership: Membership,
        settings: DutySettings,
        clock: Callable[[], float],
        hand_over: Callable[[str, Peer], Awaitable[bool]] | None = None,
        deliver_to: TopicOps | None = None,
        now: Callable[[], float] | None = None,
    ) -> None:
        self.engine = engine
        self.membership = membership
        self.settings = settings
        # What dues are on (TopicState.next_due): the earliest the store's time
        # may be (Engine.earliest_now), which leases are reaped by. It runs on
        # with the local clock: after a step back of the store's clock the
        # store's now() stands still, and dues compared with it came the step
        # late (a dead worker's 10 s lease reaped 510 s after its claim).
        self.clock = clock
        # The store's time (its now()), what follow-ups' times are in.
        self.now = now or clock
        self.hand_over = hand_over  # tells a topic's owner to read it again
        self.deliver_to = deliver_to  # enqueues follow-ups into their topics, wherever owned
        self._due: dict[str, float] = {}  # topic -> when it next wants its owner
        self._scheduled: dict[str, float] = {}  # topic -> its wake-up in the heap
        self._heap: list[tuple[float, str]] = []
        # topic -> monotonic time this broker last wrote it, and time it took
        # it over (or was told another broker wrote it): the topics its next
        # two sweeps look at (those of them that have objects beside their head).
        self._written: dict[str, float] = {}
        self._taken: dict[str, float] = {}
        self._topics_listed = 0  # the topics the last take-over listed: a listing's cost
        self._held_back: dict[str, _HeldBack] = {}  # topic -> what its delivery holds back
        self._corrupt: set[str] = set()  # topics whose tending found an object corrupt
        # Topics being tended, each in a task of its own: a slow one (a large
        # fan-out, a slow store) holds back no other's; one due again meanwhile
        # is tended again once it ends (_again). At most TEND_PARALLEL: the
        # others due wait in a queue, as names, each once, and keep their due
        # until their tend starts. A schedule's slots are the multiples of its
        # `every` since the epoch, so every topic with a per-minute one comes
        # due in the same second: a task each, waiting its turn, held 1.8 KB a
        # topic (178 MB for 100,000) and the loop for 0.8 s to make them.
        self._tending: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        # Topics another broker told this one to read again (refresh), until
        # the tend that causes starts: that tend hands nothing over.
        self._told: set[str] = set()
        self._wake = asyncio.Event()
        # The sweep runs in a task of its own: one of many topics (a broker
        # that wrote 10,000 with segments lately lists each) holds back no
        # reaping.
        self._sweeping: asyncio.Task[None] | None = None
        # So does a take-over: reading every head of 50,000 topics takes
        # minutes on S3, and no lease was reaped meanwhile, whatever its topic.
        # One at a time: a change of brokers meanwhile is taken over after it.
        self._taking_over: asyncio.Task[None] | None = None
        self._acquire: tuple[tuple[Peer, ...], tuple[Peer, ...]] | None = None
        # The brokers that left in every change of the live set since the last
        # take-over whose reads were done. Changes during a take-over are taken
        # over as one, from its first view to the last: a broker that came and
        # went meanwhile is in neither, and its leases were reaped by no one.
        self._departed: set[tuple[str, int]] = set()
        # Set while no take-over is pending: the heads of the live brokers'
        # latest view that this broker had to read were read.
        self.taken_over = asyncio.Event()
        self.reaped = 0
        self.delivered = 0  # follow-ups enqueued into their topics
        self.fired = 0  # jobs enqueued by schedules
        self.acquired = 0  # heads read to take topics over

    # --- what the rest of the broker tells it ---------------------------------------

    def note(self, topic: str, due: float | None) -> None:
        """`topic` next wants its owner at `due` (on `clock`, as
        TopicState.next_due gives it; None: not until it changes). The heap
        holds one wake-up per topic, its earliest: a later due is found when
        that one comes, and put back. One an earlier due took the place of,
        or of a topic no longer due (its jobs acked), stays until its time (up
        to a lease, 12 h) and is skipped then: past twice as many as the
        topics waited for, the heap is rebuilt."""
        if due is None:
            self._due.pop(topic, None)
            # Its wake-up goes too: kept until the lease's time, it held every
            # topic claimed in the last 12 h in memory, idle or not.
            if self._scheduled.pop(topic, None) is not None:
                self._trim_heap()
            return
        self._due[topic] = due
        if due < self._scheduled.get(topic, 1e300):
            self._scheduled[topic] = due
            heapq.heappush(self._heap, (due, topic))
            self._trim_heap()
            self._wake.set()

    def _trim_heap(self) -> None:
        """Rebuild the heap from _scheduled once it holds more than twice as
        many wake-ups (the others are stale: skipped when they come)."""
        if len(self._heap) > 2 * len(self._scheduled) + HEAP_SLACK:
            self._heap = [(at, t) for t, at in self._scheduled.items()]
            heapq.heapify(self._heap)

    def wrote(self, topic: str, due: float | None) -> None:
        """A write of this broker landed on `topic` (the committer's on_landed)."""
        self._written[topic] = time.monotonic()
        self._corrupt.discard(topic)
        self.note(topic, due)

    def loaded(self, topic: str, due: float | None) -> None:
        """A head of `topic` was read from the store: what it says is current.
        A topic another broker owns is noted only if this one has something
        due on it already (it wrote it while the owner did not answer): one
        it only read (the status page reads every topic's head) is not its to
        hand over, and a hand-over made the owner read its head again."""
        self._corrupt.discard(topic)
        if topic in self._due or self.membership.owns(topic):
            self.note(topic, due)

    def failed(self, topic: str) -> None:
        """A batch of `topic` failed unseen (it may have landed, claims and
        all), or its tending failed: look at the topic again in a while (or
        when it is due, if sooner)."""
        self.note(topic, _earliest(self.clock() + self.settings.retry_failed, self._due.get(topic)))

    def due_topics(self) -> list[str]:
        """The topics this broker has something due on: a lease, a schedule's
        slot, follow-ups to deliver."""
        return list(self._due)

    def refresh(self, topic: str) -> None:
        """Another broker wrote `topic` (it served it while this broker, its
        owner, did not answer): read it again and look at its leases now. Its
        next two sweeps look at it too, as at a topic taken over: the other
        broker's claims and acks left orphans that it, not owning the topic,
        never sweeps. A tell is a sign of writes and counts as one: a storm of
        them, for however many topics, costs a sweep what writes to as many
        would (at most one listing of every topic's folders, then the topics
        with objects beside their head), and a topic told again and again is
        one entry. The tend this causes tends the topic here, whoever this
        broker takes for its owner (_tend)."""
        self._taken[topic] = time.monotonic()
        self._told.add(topic)
        self.note(topic, -1e300)

    def _let_go(self, topic: str) -> None:
        """`topic` is not this broker's to deliver for any more: what its
        delivery held back goes."""
        self._held_back.pop(topic, None)

    def view_changed(self, old: tuple[Peer, ...], new: tuple[Peer, ...]) -> None:
        """The live brokers changed: the topics this broker now owns and did not
        before are read once, for their leases; when a broker left (one that
        came and went during a take-over too), every topic this broker owns is."""
        if _who(old) == _who(new):
            return  # only URLs changed (two processes under one id flip it): no owner did
        first = old if self._acquire is None else self._acquire[0]
        self._acquire = (first, new)
        self._departed |= _who(old) - _who(new)
        self.taken_over.clear()
        me = self.membership.me
        # What this broker held of topics it no longer owns goes: the new owner
        # writes them, and a state kept here would only lose races later.
        self.engine.let_go(lambda t: _owner(t, new) == me)
        for topic in [t for t in self._held_back if _owner(t, new) != me]:
            self._let_go(topic)
        self._wake.set()

    def start_owning(self) -> None:
        """At start-up: every topic this broker owns is taken over."""
        self._acquire = ((), self.membership.live)
        self.taken_over.clear()
        self._wake.set()

    # --- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            # No tend starts from the queue as those cancelled end; the topics
            # queued keep their due, for the hand-over at stop.
            self._queue.clear()
            self._queued.clear()
            tending = list(self._tending.values())
            tending += [t for t in (self._sweeping, self._taking_over) if t is not None]
            for task in tending:
                task.cancel()
            await asyncio.gather(*tending, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        swept_at = idle_at = loop.time()
        while True:
            try:
                if self._acquire is not None and (
                    self._taking_over is None or self._taking_over.done()
                ):
                    self._taking_over = asyncio.create_task(
                        self._take_over_logged(), name="take-over"
                    )
                await self._reap_due()
                if loop.time() - idle_at >= self.settings.idle_check:
                    idle_at = loop.time()
                    await self._recheck()
                    self.engine.forget_idle()
                if loop.time() - swept_at >= self.settings.sweep_interval:
                    swept_at = loop.time()
                    if self._sweeping is None or self._sweeping.done():  # else: it goes on
                        self._sweeping = asyncio.create_task(self._sweep_logged(), name="sweep")
            except Exception:
                log.exception("owner duties: round failed")
            s = self.settings
            await self._sleep(
                min(swept_at + s.sweep_interval, idle_at + s.idle_check) - loop.time()
            )

    async def _recheck(self) -> None:
        """Note the topics this broker owns and holds whose committed state
        says something is due (a lease, a slot, follow-ups) that the duties
        do not know of: from the cache, no I/O. Every landing and read notes
        its topic's due, so this finds only a note that was lost (a fault,
        logged: one lost this way left a lease unreaped for good), within
        idle_check rather than never. In slices of topics, each compared with
        the notes as they are when it is read, the loop taking its turns
        between."""
        async for dues in self.engine.cached_dues():
            for topic, due in dues.items():
                if due is None or topic in self._due or topic in self._corrupt:
                    continue
                if not self.membership.owns(topic):
                    continue
                log.warning(
                    "owner duties: %s was due unnoticed (since %.3f); tending it", topic, due
                )
                self.note(topic, due)

    async def _sleep(self, most: float) -> None:
        if self._heap:
            most = min(most, self._heap[0][0] - self.clock())
        if self._acquire is not None:  # a take-over that failed: again soon
            most = min(most, self.settings.retry_failed)
        self._wake.clear()
        if most <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(most):
                await self._wake.wait()

    async def _reap_due(self) -> None:
        """Queue every topic that is due for tending, TEND_PARALLEL at a time,
        in the order they came due (a write takes a while on S3; one topic
        does not wait for another's, nor the topics due later for those being
        tended now)."""
        now = self.clock()
        while self._heap and self._heap[0][0] <= now:
            at, topic = heapq.heappop(self._heap)
            if self._scheduled.get(topic) != at:
                continue  # an earlier wake-up of this topic took its place
            del self._scheduled[topic]
            wanted = self._due.get(topic)
            if wanted is None:
                continue
            if wanted > now:  # noted later than this wake-up: wake up then
                self._scheduled[topic] = wanted
                heapq.heappush(self._heap, (wanted, topic))
                continue
            if topic in self._tending:  # looked at again once that tend ends
                self._again.add(topic)
                continue
            if topic not in self._queued:  # else its tend, yet to start, sees this too
                self._queued.add(topic)
                self._queue.append(topic)
        self._start_tends()

    def _start_tends(self) -> None:
        """Start tending the topics queued, first come first, while fewer than
        TEND_PARALLEL are being tended."""
        while self._queue and len(self._tending) < TEND_PARALLEL:
            topic = self._queue.popleft()
            self._queued.discard(topic)
            self._due.pop(topic, None)  # the tend notes what it finds, with what lands meanwhile
            task = asyncio.create_task(self._tend(topic), name=f"tend {topic}")
            self._tending[topic] = task
            task.add_done_callback(functools.partial(self._tended, topic))

    def _tended(self, topic: str, _: asyncio.Task[None]) -> None:
        """A tend of `topic` ended: if the topic came due meanwhile, and still is
        after the tend's own note (a corrupt topic is not), it is woken for;
        the next topic queued starts in its place."""
        self._tending.pop(topic, None)
        if topic in self._again:
            self._again.discard(topic)
            self.note(topic, self._due.get(topic))
        self._start_tends()

    async def _tend(self, topic: str) -> None:
        """Reap `topic`'s expired leases, fire its schedules' slots, deliver
        its follow-ups; or hand it to its owner, if another broker owns it.

        Not when another broker told this one of it (refresh): it is tended
        here, whoever owns it. Two brokers whose views of the live set
        disagree (one counts itself out a lease after its last renewal, the
        other counts it in until its next look, up to a third of a lease
        later) each take the other for a topic's owner: each handed it back
        as it was handed over, some 1,650 times in 1.2 s for one topic, and
        nobody reaped it. The head's conditional write keeps a tend by a
        broker that does not own the topic correct. While the views agree,
        only the owner is told of a topic (a stand-in's tell, a hand-over
        at its due), or the heir of a broker that is stopping: the owner
        still tends alone."""
        told = topic in self._told
        self._told.discard(topic)
        owner = self.membership.owner(topic)
        if not told and owner != self.membership.me and self.hand_over is not None:
            with contextlib.suppress(Exception):
                if await self.hand_over(topic, owner):
                    # Its owner reads it again and takes it from here. What this
                    # broker held of it goes: it would go stale as the owner
                    # writes on, and its past dues pass for lost ones here.
                    self._let_go(topic)
                    self.engine.forget([topic])
                    return
        try:
            reaped, due = await self.engine.tend(topic)
            self.reaped += reaped.get("pending", 0) + reaped.get("dead", 0)
            self.fired += reaped.get("fired", 0)
            if self.deliver_to is not None:
                due = await self._deliver(topic, due)
        except CorruptData:
            # Logged once by the committer; nothing to do until it is mended.
            # The tend read the head again, which noted its due (past): not
            # tended again until something else reads or writes it.
            self._let_go(topic)
            self._corrupt.add(topic)
            self.note(topic, None)
            return
        except SimpleQueueError as exc:
            log.warning("owner duties: tending %s failed (%s); again in a while", topic, exc)
            self.failed(topic)
            return
        except Exception:
            # Not ours to expect, but the topic is not dropped from the duties
            # for it: its leases would be reaped by no one.
            log.exception("owner duties: tending %s failed; again in a while", topic)
            self.failed(topic)
            return
        # The due the tend computed is the state's as its mutation was applied:
        # later ones in its batch (a claim, say) may have added leases since.
        # What the landings noted meanwhile (its batch's among them: _start_tends
        # took the topic's due out before tending it) is newer; an early
        # wake-up costs one tend that finds nothing.
        self.note(topic, _earliest(due, self._due.get(topic)))

    async def _deliver(self, topic: str, due: float | None) -> float | None:
        """Enqueue the follow-ups `topic`'s outbox holds into their topics (each
        has its id: one delivered twice, after a crash, is a duplicate there),
        then take them out; when the topic is next due. A topic that fails
        (its head corrupt, its owner gone), and follow-ups a topic refuses (of
        a 65th priority, say), are held back for `retry_failed`, however often
        the source is written meanwhile, and hold back no others."""
        back = self._held_back.setdefault(topic, _HeldBack())
        progressed = False
        for _ in range(DELIVER_ROUNDS):
            now = self.clock()
            targets, items = back.now(now)
            # The follow-ups in front known to be held back are not read again
            # while they are held back (a topic down behind 50,000 of its own)
            # and no one else took any out (the read starts at 0 if they did).
            start = back.front(targets, items)
            # A round's follow-ups, read at once, come to what its requests
            # carry side by side, about: bounded in bytes, as in number.
            front, held, removed = await self.engine.outbox_after(
                topic,
                start,
                DELIVER_BATCH,
                targets,
                items,
                DELIVER_PARALLEL * self.settings.deliver_bytes,
                back.removed,
            )
            if removed != back.removed:
                start = 0
            back.read(held, targets, items, removed)
            if not front:
                if held > start:  # what it read is held back: on past it
                    progressed = True
                    continue
                break
            by_topic: dict[str, list[dict[str, Any]]] = {}
            for item in front:
                by_topic.setdefault(item["topic"], []).append(item)
            done: list[tuple[str, str]] = []
            limit = asyncio.Semaphore(DELIVER_PARALLEL)
            at = self.now()  # follow-ups' times are the store's
            async with asyncio.TaskGroup() as group:  # a fan-out's topics side by side
                tries = {
                    t: group.create_task(self._deliver_into(topic, t, w, at, limit))
                    for t, w in by_topic.items()
                }
            for target, tried in tries.items():
                taken, refused, failed = tried.result()
                done += [(target, i["id"]) for i in taken]
                # From when the try ended: one that took long must not have
                # used up its pause already.
                until = self.clock() + self.settings.retry_failed
                back.items.update({(target, i["id"]): until for i in refused})
                if failed:
                    back.targets[target] = until
            if done:
                gone, due = await self.engine.delivered(topic, done)
                back.delivered(targets, items, gone)
                self.delivered += len(done)
            progressed = progressed or bool(done)
        else:
            if progressed:
                return due  # more to deliver: again at once, after the other topics' turn
        retry = back.next(self.clock())
        if retry is None:
            self._held_back.pop(topic, None)  # let go of meanwhile, maybe
            return due
        if due is not None and due <= self.clock():
            # The oldest follow-up's time, past: what waits is held back until
            # `retry`. A lease or a slot may come sooner.
            due = await self.engine.next_due(topic, outbox=False)
        return retry if due is None else min(due, retry)

    async def _deliver_into(
        self,
        source: str,
        target: str,
        items: list[dict[str, Any]],
        now: float,
        limit: asyncio.Semaphore,
    ) -> _Delivery:
        """(those of `items`, follow-ups of `source`, that `target` took, those it
        refused, whether it failed). They go in requests of at most
        `deliver_bytes` (many acks' follow-ups together may pass --max-body,
        each alone not)."""
        taken: list[dict[str, Any]] = []
        refused: list[dict[str, Any]] = []
        for part in _parts(items, self.settings.deliver_bytes):
            try:
                async with limit:  # DELIVER_PARALLEL requests at once
                    took, not_taken = await self._taking(source, target, part, now)
            except SimpleQueueError as exc:
                log.warning("follow-ups of %s for %s: %s; again in a while", source, target, exc)
                return taken, refused, True
            taken += took
            refused += not_taken
        return taken, refused, False

    async def _taking(
        self, source: str, target: str, items: list[dict[str, Any]], now: float
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(those of `items` that `target` took, those it refused). A request
        refused as too large (the target's --max-body is smaller than this
        broker's) goes again in halves; one refused otherwise, once per
        priority it holds (a topic holds jobs of at most 64 at once). Errors
        other than a refusal are raised."""
        assert self.deliver_to is not None
        try:
            answers = await self._enqueue(target, items, now)
            if already := [a["id"] for a in answers if a["duplicate"]]:
                log.warning(
                    "follow-ups of %s were in %s already, not enqueued again: %s. Each is "
                    "a delivery repeated after a fault, or another job's follow-up of the "
                    "same id: an id derived from the acked job's (<job id>:<index>) is "
                    "unique in its own topic only, so follow-ups that several topics send "
                    "to one need ids of their own",
                    source,
                    target,
                    ", ".join(already[:10]),
                )
            return items, []
        except PayloadTooLarge as exc:
            if len(items) == 1:
                log.warning("a follow-up for %s: %s; again in a while", target, exc)
                return [], items
            parts = [items[: len(items) // 2], items[len(items) // 2 :]]
        except InvalidRequest as exc:
            parts = _by_priority(items)
            if len(parts) == 1:
                log.warning("%d follow-ups for %s: %s; again in a while", len(items), target, exc)
                return [], items
        taken: list[dict[str, Any]] = []
        refused: list[dict[str, Any]] = []
        for part in parts:
            took, not_taken = await self._taking(source, target, part, now)
            taken += took
            refused += not_taken
        return taken, refused

    async def _enqueue(
        self, target: str, items: list[dict[str, Any]], now: float
    ) -> list[dict[str, Any]]:
        """Enqueue follow-ups into `target`: each due at its ack's time plus its
        delay, a time judged by the target's owner on its own clock (the ack's
        was the source owner's; both estimate the store's). An owner older
        than `run_at` (during an upgrade), or one whose clock is behind by
        enough to take a delay of a year for more, refuses it: sent again as
        delays from `now`, which this broker's clock's error then adds to."""
        assert self.deliver_to is not None
        specs = [
            JobSpec(
                i["payload"],
                i["id"],
                i.get("priority", 0),
                max_attempts=i.get("max_attempts"),
                run_at=i["at"] + i.get("delay", 0.0),  # it began at the ack
            )
            for i in items
        ]
        try:
            return await self.deliver_to.enqueue(target, specs)
        except InvalidRequest as exc:
            said = str(exc)  # not a topic's name that holds "run_at": these two refusals
            if "unknown field `run_at`" not in said and RUN_AT_TOO_LATE not in said:
                raise
        relative = [
            msgspec.structs.replace(
                s, run_at=None, delay=min(MAX_DELAY, max(0.0, (s.run_at or now) - now))
            )
            for s in specs
        ]
        return await self.deliver_to.enqueue(target, relative)

    async def _take_over_logged(self) -> None:
        try:
            await self._take_over()
        except Exception:
            log.exception("owner duties: take-over failed; again in a while")
            return
        if self._acquire is not None:  # the brokers changed meanwhile: taken over at once
            self._wake.set()

    async def _take_over(self) -> None:
        assert self._acquire is not None
        old, new = self._acquire
        me = self.membership.me
        # Cleared once this take-over's reads are done; those that leave
        # meanwhile are the next one's.
        departures = set(self._departed)
        names = await self.engine.topic_names()  # if it fails, the next round tries again
        self._topics_listed = len(names)
        if self._acquire == (old, new):
            self._acquire = None
        else:  # the view changed again meanwhile: take over from `old` to the newest
            self._acquire = (old, self._acquire[1])
        # A broker gone, or restarted (a new process under its id); not one
        # whose URL changed, as two processes under one id make it flip. One
        # that came and went since `old` is in neither view: its departure
        # was seen by view_changed.
        departed = (_who(old) - _who(new)) | departures
        # Newly owned topics are read once. So, when a broker left (or came
        # back restarted), are all the others this broker owns: one that had
        # not yet seen this broker took itself for their owner, or served a
        # topic whose owner did not answer, and may have written leases and
        # schedules there that only it knew of (a rolling restart).
        mine = [t for t in names if _owner(t, new) == me and (departed or _owner(t, old) != me)]

        async def look(topic: str) -> None:
            try:
                due = await self.engine.next_due(topic)
            except CorruptData:
                return
            except SimpleQueueError as exc:
                log.warning("owner duties: cannot read %s (%s); again in a while", topic, exc)
                due = self.clock() + self.settings.retry_failed
            except Exception:
                # Not ours to expect, but it stops no other topic's look.
                log.exception("owner duties: reading %s failed; again in a while", topic)
                due = self.clock() + self.settings.retry_failed
            self.acquired += 1
            if _owner(topic, old) != me:
                # Its last owner swept it: what that one's last sweeps
                # sighted (or never saw) is this broker's to delete now.
                self._taken[topic] = time.monotonic()
            if due is not None:
                # Whoever wrote a lease stamped it with the store's clock, as
                # this broker does: its expiry needs no restarting here.
                self.note(topic, _earliest(due, self._due.get(topic)))

        # A pool of readers over the names, not a task per topic (100,000
        # of them held some 1.2 KB each, 125 MB, at each change of brokers).
        await each(mine, ACQUIRE_PARALLEL, look)
        self._departed -= departures
        if mine:
            log.info("took over %d topics", len(mine))
        if self._acquire is None:
            self.taken_over.set()

    async def _sweep_logged(self) -> None:
        try:
            await self._sweep()
        except Exception:
            log.exception("owner duties: sweep failed")

    async def _sweep(self) -> None:
        """Sweep the topics this broker owns and wrote or took over (or was
        told another wrote) within two sweeps (an orphan is deleted at its
        second sighting; a topic nobody writes makes none, but its last writer
        may have left some and stopped owning it), and those whose last sweep
        saw orphans (however long ago their last write was), then the store's
        leftovers of writes cut short (whichever broker's: one killed may never
        come back).

        Of the topics written or taken over, only those with objects beside
        their head are swept, found in one listing of every topic: most of
        thousands written or taken over are one object each (no orphans), and
        a listing and a read of each made an idle broker's sweeps cost as many
        requests as the topics it wrote or owns. An orphan is an object that
        was in the store before the write that left it landed (objects go
        before their head), so a listing made after that landing finds its
        folder; one that lands after this sweep's listing is found by the
        next sweep's, within the topic's two. When they are fewer than such a
        listing's pages (a broker that wrote 3 of 100,000 topics), each is
        looked at on its own: a listing of its folder and a read."""
        horizon = time.monotonic() - 2 * self.settings.sweep_interval
        self._written = {t: at for t, at in self._written.items() if at >= horizon}
        self._taken = {t: at for t, at in self._taken.items() if at >= horizon}
        swept = set(self.engine.sighted())
        recent = self._written.keys() | self._taken.keys()
        pending = {t for t in recent - swept if self.membership.owns(t)}
        if pending and 2 * len(pending) <= _listing_cost(self._topics_listed):
            # Fewer than a listing of every topic would cost (a broker that
            # wrote a few of 100,000): each looked at on its own, as before.
            swept |= pending
        elif pending:
            try:
                swept |= pending & await self.engine.topics_with_objects()
            except SimpleQueueError as exc:
                # The rest is swept all the same; the topics written or taken
                # over get their two sweeps counted again, from a listing that
                # works.
                log.warning("owner duties: topics written or taken over are swept later (%s)", exc)
                again = time.monotonic()
                for recent_ones in (self._written, self._taken):
                    recent_ones.update((t, again) for t in pending if t in recent_ones)
        owned = [t for t in sorted(swept) if self.membership.owns(t)]
        await self.engine.sweep_all(owned)
        await self.engine.sweep_leftovers(self.settings.leftover_age)


# Of follow-ups for a topic: those it took, those it refused, whether it failed.
_Delivery = tuple[list[dict[str, Any]], list[dict[str, Any]], bool]


@dataclass
class _HeldBack:
    """What a topic's delivery holds back, and until when (on Duties.clock): the
    topics that failed, and the follow-ups, as (topic, id), refused."""

    targets: dict[str, float] = field(default_factory=dict)
    items: dict[tuple[str, str], float] = field(default_factory=dict)
    # How many follow-ups from the outbox's front were held back as read, and
    # the topics and follow-ups held back then: a few such reads, the latest
    # last. One of a topic retried stays: the topic failing again, the
    # backlog behind it is not read through again for every try.
    fronts: list[tuple[int, frozenset[str], frozenset[tuple[str, str]]]] = field(
        default_factory=list
    )
    # How many follow-ups had ever left the outbox (counters.delivered) when
    # `fronts` were read, with this delivery's own since: positions from the
    # front hold while no one else takes any out (acks only append).
    removed: int | None = None

    def now(self, now: float) -> tuple[frozenset[str], frozenset[tuple[str, str]]]:
        """What is held back at `now` (what is no longer is forgotten)."""
        self.targets = {k: t for k, t in self.targets.items() if t > now}
        self.items = {k: t for k, t in self.items.items() if t > now}
        return frozenset(self.targets), frozenset(self.items)

    def front(self, targets: frozenset[str], items: frozenset[tuple[str, str]]) -> int:
        """How many follow-ups from the outbox's front are known to be held back
        while `targets` and `items` are: the most a read found held back under
        no more than those."""
        return max((n for n, t, i in self.fronts if t <= targets and i <= items), default=0)

    def read(
        self,
        held: int,
        targets: frozenset[str],
        items: frozenset[tuple[str, str]],
        removed: int,
    ) -> None:
        """A read found the first `held` follow-ups held back under `targets`
        and `items`, when `removed` had ever left the outbox. If that is not
        what this delivery counts, others took some out (another broker
        delivered them, as a stand-in or a former owner): the fronts read
        before may count follow-ups gone, and overshoot those behind them."""
        if removed != self.removed:
            self.fronts, self.removed = [], removed
        kept = [f for f in self.fronts if not (f[0] <= held and targets <= f[1] and items <= f[2])]
        self.fronts = [*kept, (held, targets, items)][-FRONTS_KEPT:]

    def delivered(
        self, targets: frozenset[str], items: frozenset[tuple[str, str]], taken: int
    ) -> None:
        """Follow-ups not held back under `targets` and `items` left the outbox,
        `taken` of them: a read under more than those may have counted them
        among its held back ones, and no longer says where the front ends."""
        self.fronts = [f for f in self.fronts if f[1] <= targets and f[2] <= items]
        if self.removed is not None:
            self.removed += taken

    def next(self, now: float) -> float | None:
        """When the first thing held back at `now` may go again (None: nothing)."""
        self.now(now)
        return min([*self.targets.values(), *self.items.values()], default=None)


def _listing_cost(topics: int) -> int:
    """The requests a listing of `topics` topics' folders costs, about: a page
    of 1,000 entries a request, each topic a head and maybe a folder."""
    return 1 + 2 * topics // 1000


def _earliest(*times: float | None) -> float | None:
    """The earliest of `times` that is not None (None: all are)."""
    return min((t for t in times if t is not None), default=None)


def _by_priority(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """`items` (follow-ups) grouped by priority, in the order of each's first."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(item.get("priority", 0), []).append(item)
    return list(groups.values())


def _parts(items: list[dict[str, Any]], limit: int) -> Iterator[list[dict[str, Any]]]:
    """`items` (follow-ups) in order, in parts whose payloads and fields come to
    at most `limit` bytes of JSON (one bigger than that alone)."""

    def size(item: dict[str, Any]) -> int:
        return len(msgspec.json.encode(item["payload"])) + FOLLOW_UP_FIELDS

    return runs_within(items, size, limit)


def _who(peers: tuple[Peer, ...]) -> set[tuple[str, int]]:
    """The brokers `peers` are, told apart by restarts, whatever their URLs."""
    return {(p.broker_id, p.restarts) for p in peers}


def _owner(topic: str, live: tuple[Peer, ...]) -> Peer | None:
    if not live:
        return None
    return max(live, key=lambda p: rendezvous(topic, p.broker_id))
