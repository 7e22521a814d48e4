"""The engine: the queue operations that the HTTP and RESP layers call.

Each operation validates the topic name, turns the request into a mutation of
the topic state machine and hands it to the group committer (or, for reads, a
query of the last committed state). It never touches storage itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import orjson

from simplequeue import api, keys
from simplequeue.api import AckRequest, FollowUpSpec, JobSpec, ScheduleRequest, SettingsRequest
from simplequeue.broker.parallel import each
from simplequeue.broker.popped import Attempt, Kept, Popped
from simplequeue.errors import (
    AmbiguousWrite,
    CacheTooSmall,
    Contended,
    InvalidRequest,
    JobNotFound,
    NotDurable,
    SimpleQueueError,
    StoreUnavailable,
)
from simplequeue.groupcommit import GroupCommitter, Mutation
from simplequeue.state import TOTALS, Job, SegmentMissing, TopicState

log = logging.getLogger(__name__)

MAX_WAIT = api.MAX_WAIT  # seconds a claim may long-poll
# Seconds the answer of a store check (/healthz's, the one route served
# without the token) is reused: a GET of broker.json each, any client that
# could reach the broker made every request a billed store request, and on
# S3 past 5,500 a second SlowDowns that every topic's reads then met.
CHECK_REUSE = 1.0
# A long poll re-reads the store this often, to see jobs that other brokers
# enqueued; jobs enqueued through this broker wake it at once. The long polls
# of a topic look together (next_look), so that they share one read.
POLL_INTERVAL = 1.0
# On a topic this broker owns, what it holds is current: its own commits wake
# its long polls, and a broker that writes the topic standing in for it tells
# it (POST /topics/{t}/refresh). They look at the store only this often, in
# case such a word was lost: at POLL_INTERVAL, 5,000 topics with a worker
# waiting on each cost 5,000 GETs a second.
OWNER_LOOK_INTERVAL = 30.0
# Dead jobs requeued or purged per commit when all of them are, and the
# segments they come from at most: a part reads only its own segments.
DEAD_PART = (500, 2)
# Heads read at once when listing every topic (GET /topics).
LISTING_READERS = 32
OLDEST_SCAN = 256  # due jobs looked at per run when finding the oldest one
# How old a cached state may be to answer right after this broker's own commit
# woke the reader (it is the newest this broker knows; the store is re-read
# every POLL_INTERVAL for other brokers' writes).
READ_AFTER_COMMIT = 3600.0
FINISHED = frozenset({"completed", "dead", "cancelled"})

_CLAIM_FIELDS = ("claimed_by", "claimed_at", "heartbeat_at", "lease_expires_at", "lease_token")


def public(job: Job, status: str) -> dict[str, Any]:
    """A job as the API shows it (api.Job): the fields of SPEC section 3 that it
    has, no internals. A live job shows every field, null where unset; a
    finished job's record shows what was kept of it."""
    out = {k: v for k, v in job.items() if k not in ("seq", "died_at")}
    out["status"] = status
    if status in ("completed", "cancelled") or "finished_at" in job:
        out.setdefault("result", None)
    else:
        for name in _CLAIM_FIELDS:
            out.setdefault(name, None)
    out.setdefault("last_error", None)
    return out


@dataclass(frozen=True)
class _Polled:
    """What one try of a long poll got: jobs, or (none) how many seconds until
    one may come without a commit to say so: the topic's rate lets one
    through, or a delayed job comes due."""

    jobs: list[Job]
    token_in: float | None = None


def next_look(topic: str, interval: float | None = None) -> float:
    """The monotonic time at which the long polls waiting on `topic` next look
    at the store: the topic's next tick, one every `interval` (POLL_INTERVAL
    if None; OWNER_LOOK_INTERVAL on a topic this broker owns). Waiters that
    came at different times look at the same moment, and so share one batch
    and one read of the head: an idle topic costs a read an interval,
    however many wait on it. Each topic ticks at a phase of its own, which
    spreads the reads of many topics over the interval."""
    interval = POLL_INTERVAL if interval is None else interval
    phase = zlib.crc32(topic.encode()) / 2**32 * interval
    now = time.monotonic()
    return now + interval - (now - phase) % interval


def _polled(
    take: Callable[[TopicState, float], list[Job]],
) -> Callable[[TopicState, float], _Polled]:
    """A claim mutation that also says, when it got nothing, when a token of
    the topic's rate comes or a delayed job comes due (a long poll wakes then,
    not only on commits)."""

    def polled(s: TopicState, now: float) -> _Polled:
        jobs = take(s, now)
        if jobs:
            return _Polled(jobs)
        waits = [w for w in (s.token_wait(now), s.ready_wait(now)) if w is not None]
        return _Polled(jobs, max(waits) if waits else None)

    return polled


def _unclaim_all(jobs: list[Job]) -> Callable[[TopicState, float], int]:
    """A mutation giving back claims (pending again, the attempt uncounted);
    it answers how many were still held, and so given back."""

    def give_back(s: TopicState, now: float) -> int:
        return sum(s.unclaim(job["id"], job["lease_token"], now) for job in jobs)

    return give_back


def _unpop_all(jobs: list[Job]) -> Callable[[TopicState, float], int]:
    """A mutation giving back popped jobs (pending again, not completed, the
    attempt uncounted); it answers how many were given back."""

    def give_back(s: TopicState, now: float) -> int:
        return sum(s.unpop(job, now) for job in jobs)

    return give_back


def _error_text(error: Any) -> str | None:
    """A nack's error as kept with the job: text, anything else as its JSON, cut
    to api.MAX_ERROR characters. InvalidRequest for a value the store could not
    encode either, as for payloads and results: one rule for every JSON value."""
    if error is None:
        return None
    api.check_storable(error, "the error")
    text = error if isinstance(error, str) else orjson.dumps(error).decode()
    return text[: api.MAX_ERROR]


class TopicOps(Protocol):
    """The operations a wire makes on a topic, whoever serves them: the Engine
    here, or the topic's owner (simplequeue.broker.forwarding.Router)."""

    async def enqueue(self, topic: str, specs: list[JobSpec]) -> list[dict[str, Any]]: ...

    async def push(self, topic: str, specs: list[JobSpec]) -> int: ...

    async def claim(
        self,
        topic: str,
        worker_id: str,
        *,
        lease: float | None = None,
        count: int = 1,
        wait: float = 0.0,
        since: float | None = None,
    ) -> list[dict[str, Any]]:
        """`since` (monotonic): when the caller began waiting, if before this
        call (a long poll served in rounds of MAX_WAIT): its place in the
        topic's line of long polls, where it is served here."""
        ...

    async def pop(
        self,
        topic: str,
        worker_id: str,
        *,
        count: int = 1,
        wait: float = 0.0,
        attempt_id: str | None = None,
        since: float | None = None,
        held: bool = False,
    ) -> list[dict[str, Any]]:
        """`held`: the caller holds what the pop named `attempt_id` did until
        it answers it (forget_pop) or gives it back (unpop), and calls one of
        them: kept for that undo whatever else is kept meanwhile."""
        ...

    async def unpop(self, topic: str, attempt_id: str, worker_id: str | None = None) -> int: ...

    def forget_pop(self, topic: str, attempt_id: str, worker_id: str) -> None:
        """The named pop was answered: what it did need not be kept for its undo."""
        ...

    async def release(self, topic: str, jobs: list[dict[str, Any]]) -> int: ...

    async def complete(
        self,
        topic: str,
        jobs: list[dict[str, Any]],
        attempt_id: str | None = None,
        held: bool = False,
    ) -> list[str]:
        """`held`: as pop's."""
        ...

    async def ack_many(self, topic: str, acks: list[AckRequest]) -> list[dict[str, Any]]: ...

    async def status(self, topic: str) -> dict[str, int]: ...

    async def cancel(self, topic: str, job_ids: list[str]) -> dict[str, list[str]]: ...

    def served_here(self, topic: str) -> bool:
        """Whether `topic`'s operations are this broker's own commits (in the
        order they are made), not requests to another broker."""
        ...


# Claimed jobs kept for their claims' retries (api.ClaimRequest.attempt_id), at
# most: the oldest claims' answers go first. About 480 bytes each with the
# SDK's ids and a job a claim (130 with 100 a claim), so 24 MB; with the
# longest ids the API takes, 1,045 bytes each: 52 MB at most.
CLAIM_ATTEMPTS_KEPT = 50_000


T = TypeVar("T")

# Every topic's counts by name, and the error of each that cannot be read.
_Listing = tuple[dict[str, dict[str, int]], dict[str, str]]


def _shared(work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """`work` in a task its callers share (each awaits it shielded), its
    failure retrieved once it ends: no "never retrieved" when they all went
    away."""
    task = asyncio.create_task(work)
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    return task


# Topics whose /metrics figures are kept once they leave memory, at most
# (some 340 B each).
GAUGES_KEPT = 20_000
# The job states /metrics counts per topic (simplequeue_jobs).
SHOWN_STATES = ("pending", "delayed", "claimed", "dead")


@dataclass(frozen=True, slots=True)
class _Left:
    """A topic's figures for /metrics, as of when they were taken: its ages
    are reported from the times, as they grow. An age whose job is in a
    segment the cache no longer holds is not known (its counts, in the
    head, are): _UNKNOWN. Its counts are one tuple, not two dicts (560 B):
    every backlog a broker took over is kept."""

    counts: tuple[int, ...]  # its jobs by SHOWN_STATES, then what it ever did by TOTALS
    oldest_due: float | None  # when the job due longest came due
    outbox: int
    outbox_oldest: float | None

    @classmethod
    def of(cls, s: TopicState, now: float) -> _Left:
        jobs, totals = s.counts(now), s.totals()
        return cls(
            (*(jobs[state] for state in SHOWN_STATES), *(totals[name] for name in TOTALS)),
            _known(lambda: s.oldest_due_since(now, OLDEST_SCAN)),
            s.outbox_size(),
            _known(s.outbox_oldest),
        )

    def holds_jobs(self) -> bool:
        return any(self.counts[: len(SHOWN_STATES)]) or bool(self.outbox)

    def gauges(self, now: float) -> dict[str, Any]:
        """Ages in seconds, 0.0 when none waits, None when not known."""
        shown = len(SHOWN_STATES)
        return {
            "counts": dict(zip(SHOWN_STATES, self.counts[:shown], strict=True)),
            "totals": dict(zip(TOTALS, self.counts[shown:], strict=True)),
            "oldest_pending_age": _age(self.oldest_due, now),
            "outbox": self.outbox,
            "outbox_lag": _age(self.outbox_oldest, now),
        }


# A time /metrics cannot know from the cache (its job is in a segment the
# cache dropped): its age is left out of the scrape, not said to be 0.
_UNKNOWN = math.nan


def _known(since: Callable[[], float | None]) -> float | None:
    """`since()`, or _UNKNOWN if it wants a segment the cache does not hold."""
    try:
        return since()
    except SegmentMissing:
        return _UNKNOWN


def _age(since: float | None, now: float) -> float | None:
    if since is None:
        return 0.0
    if math.isnan(since):
        return None
    return max(0.0, now - since)


@dataclass(frozen=True, slots=True)
class _Answered:
    """A claim's answer, kept for its retries until `until` (monotonic)."""

    until: float
    jobs: tuple[str, ...]  # "<job id>\0<lease token>" (ids hold no NUL: printable)


class Engine:
    """Queue operations over a GroupCommitter. Arguments arrive validated (as the
    types of simplequeue.api); the engine checks that values can be stored and
    that topic names are names, and never touches storage itself."""

    def __init__(self, committer: GroupCommitter) -> None:
        self.committer = committer
        # Whether this broker owns a topic (the server's membership says): its
        # memory of one it owns is current, but for what a broker standing in
        # for it wrote lately (_poll). `settled`: since when (monotonic) it is
        # the topic's home, none stood in for, and every broker could see it
        # so, None if not: what another writes it tells it (OWNER_LOOK_INTERVAL).
        self.owns: Callable[[str], bool] = lambda topic: False
        self.settled: Callable[[str], float | None] = lambda topic: None
        # Claims answered lately, by topic, worker and the caller's attempt id
        # (api.ClaimRequest.attempt_id). Oldest first.
        self._answered: OrderedDict[tuple[str, str, str], _Answered] = OrderedDict()
        self._answered_jobs = 0  # in all of them
        # Pops and completes named by an attempt id, for their retries and
        # undos (api.UnpopRequest); the undos under way.
        self.popped = Popped()
        self._undoing: dict[Attempt, asyncio.Future[int]] = {}
        # What /metrics says of topics with jobs that left memory (oldest first).
        self._left: dict[str, _Left] = {}
        committer.on_forgotten = self._left_memory
        # The last store check: when it ended, and the error it met (None: the
        # store answered). Checks wait in line, so that those that came during
        # one take its answer.
        self._checked: tuple[float, SimpleQueueError | None] | None = None
        self._checking = asyncio.Lock()
        # The listing of every topic under way, and the one that starts after
        # it for those asked meanwhile (topics()).
        self._listing: asyncio.Task[_Listing] | None = None
        self._next_listing: asyncio.Task[_Listing] | None = None

    async def enqueue(self, topic: str, specs: list[JobSpec]) -> list[dict[str, Any]]:
        """Enqueue jobs; each answer is {"id", "duplicate"}. All or nothing: one
        payload that cannot be stored rejects the request, and nothing else."""
        keys.check_topic(topic)
        _check_specs(specs)
        return await self.committer.submit(topic, lambda s, now: s.enqueue(specs, now))

    async def push(self, topic: str, specs: list[JobSpec]) -> int:
        """Enqueue jobs and answer the topic's pending and delayed count just
        after them, as the batch that held them left it (no read of the store)."""
        keys.check_topic(topic)
        _check_specs(specs)

        def push(s: TopicState, now: float) -> int:
            s.enqueue(specs, now)
            counts = s.counts(now)
            return counts["pending"] + counts["delayed"]

        return await self.committer.submit(topic, push)

    async def claim(
        self,
        topic: str,
        worker_id: str,
        *,
        lease: float | None = None,
        count: int = 1,
        wait: float = 0.0,
        attempt_id: str | None = None,
        since: float | None = None,
    ) -> list[dict[str, Any]]:
        """Claim up to `count` jobs, long-polling up to `wait` seconds for one
        (its place among the topic's long polls: `since`, else now). With
        `attempt_id`, a claim this broker answered lately under the same
        id (by the same worker) is answered again with the jobs it still
        holds, if any, instead of claiming more (a retry whose first try's
        answer was lost)."""
        keys.check_topic(topic)
        ahead = self.committer.clock_ahead

        async def claimed(answered: Callable[[], bool] | None = None) -> list[Job]:
            return await self._poll(
                topic,
                min(wait, MAX_WAIT),
                _polled(lambda s, now: s.claim(worker_id, lease, count, now, ahead(now))),
                # The caller went away: give the claims back rather than let
                # them sit until their leases run out.
                undo=lambda got: _unclaim_all(got.jobs) if got.jobs else None,
                answered=answered,
                since=since,
            )

        if attempt_id is None:
            return [public(j, "claimed") for j in await claimed()]
        attempt = (topic, worker_id, attempt_id)
        if again := await self._again(attempt):
            return again
        before = self._answered.get(attempt)

        def answered_meanwhile() -> bool:
            # By another try of this claim, still polling (its caller gone unseen).
            now = self._answered.get(attempt)
            return now is not None and now is not before

        jobs = await claimed(answered_meanwhile)
        if answered_meanwhile():
            if jobs:  # one try's jobs are the claim's: this one's go back
                await self.committer.submit(topic, _unclaim_all(jobs))
            return await self._again(attempt)
        if jobs:
            self._remember(attempt, jobs)
        return [public(j, "claimed") for j in jobs]

    def _remember(self, attempt: tuple[str, str, str], jobs: list[Job]) -> None:
        """Keep what the claim `attempt` (topic, worker, attempt id) was answered."""
        now = time.monotonic()
        answered = self._answered
        if (before := answered.pop(attempt, None)) is not None:
            self._answered_jobs -= len(before.jobs)
        held = tuple(f"{j['id']}\0{j['lease_token']}" for j in jobs)
        answered[attempt] = _Answered(now + api.CLAIM_ATTEMPTS_KEPT_S, held)
        self._answered_jobs += len(held)
        self._forget_answered(now)

    def _forget_answered(self, now: float) -> None:
        """Forget the oldest claims' answers while more than CLAIM_ATTEMPTS_KEPT
        jobs are kept, and those past their time among the oldest."""
        answered = self._answered
        while answered and (
            self._answered_jobs > CLAIM_ATTEMPTS_KEPT or next(iter(answered.values())).until < now
        ):
            self._answered_jobs -= len(answered.popitem(last=False)[1].jobs)

    async def _again(self, attempt: tuple[str, str, str]) -> list[dict[str, Any]]:
        """The jobs the claim `attempt` was answered with here lately that its
        caller still holds, under the tokens it was given (a read of the head:
        another broker may have reaped them)."""
        answered = self._answered.get(attempt)
        if answered is None or answered.until < time.monotonic():
            return []
        held = [tuple(h.split("\0", 1)) for h in answered.jobs]
        behind = self.committer.clock_behind

        def still_held(s: TopicState, now: float) -> list[Job | None]:
            # A lease runs out by the earliest the store's time may be, as
            # reap() judges it: after a step back of the store's clock now()
            # stands still above it, and a live lease's end read as past.
            earliest = now - behind(now)
            return [s.held(job_id, token, earliest) for job_id, token in held]

        found = await self.committer.read(attempt[0], still_held)
        return [public(j, "claimed") for j in found if j is not None]

    async def pop(
        self,
        topic: str,
        worker_id: str,
        *,
        count: int = 1,
        wait: float = 0.0,
        attempt_id: str | None = None,
        since: float | None = None,
        held: bool = False,
    ) -> list[dict[str, Any]]:
        """Claim and complete up to `count` jobs in one commit (Redis pop
        semantics), long-polling up to `wait` seconds for one (in the line
        from `since`, as claim()). With
        `attempt_id`, what it did is kept a while for unpop(), and for its
        retries: one whose first try landed is answered that try's jobs.
        `held`: kept until forget_pop() or unpop(), which the caller calls
        (Popped's bound forgets the oldest of the others)."""
        keys.check_topic(topic)
        attempt = None if attempt_id is None else (topic, worker_id, attempt_id)
        before = None if attempt is None else self.popped.get(attempt)
        if before is not None:
            return [public(j, "completed") for j in before.decoded()]
        jobs = await self._poll(
            topic,
            min(wait, MAX_WAIT),
            _polled(lambda s, now: s.pop(worker_id, count, now)),
            # The caller went away (a BLPOP's client hung up): it was never
            # answered, so nobody has the jobs. They go back, not done.
            undo=lambda got: _unpop_all(got.jobs) if got.jobs else None,
            since=since,
        )
        if attempt is not None and jobs:
            jobs = await self._popped_now(attempt, jobs, held)
        return [public(j, "completed") for j in jobs]

    async def release(self, topic: str, jobs: list[dict[str, Any]]) -> int:
        """Give back claims not worked (handed out but not delivered, or given
        back by their worker): pending again at once, the attempt uncounted.
        How many were given back: the others were not held under their tokens."""
        keys.check_topic(topic)
        return await self.committer.submit(topic, _unclaim_all(jobs))

    async def complete(
        self,
        topic: str,
        jobs: list[dict[str, Any]],
        attempt_id: str | None = None,
        held: bool = False,
    ) -> list[str]:
        """Complete claims as a pop does, for a caller that has no ack to send
        (a BLPOP on several keys, XREADGROUP NOACK); the ids completed, the
        others not held any more. Undone, as a pop is, when the caller goes
        away before the answer: it was never handed the jobs. With
        `attempt_id`, what it did is kept a while for unpop(), and for its
        retries: one whose first try landed is answered that try's ids;
        `held`, as pop()'s."""
        keys.check_topic(topic)
        attempt = None if attempt_id is None else (topic, "", attempt_id)
        before = None if attempt is None else self.popped.get(attempt)
        if before is not None:
            return [job["id"] for job in before.decoded()]

        def complete(s: TopicState, now: float) -> list[Job]:
            done = (s.complete_claim(j["id"], j["lease_token"], now) for j in jobs)
            return [job for job in done if job is not None]

        done = await self.committer.submit(
            topic, complete, undo=lambda done: _unpop_all(done) if done else None
        )
        if attempt is not None and done:
            done = await self._popped_now(attempt, done, held)
        return [job["id"] for job in done]

    async def unpop(self, topic: str, attempt_id: str, worker_id: str | None = None) -> int:
        """Give back what the pop (by `worker_id`) or complete (by none) named
        `attempt_id` did here lately, its answer lost on its way
        (api.UnpopRequest): how many jobs are pending again. One not done
        yet is undone as it lands; one being undone already is waited for."""
        keys.check_topic(topic)
        attempt = (topic, worker_id or "", attempt_id)
        self.popped.withdraw(attempt)
        undoing = self._undoing.get(attempt)
        if undoing is None:
            kept = self.popped.take(attempt)
            if kept is None:
                return 0
            undoing = asyncio.ensure_future(self._give_back(attempt, kept))
            self._undoing[attempt] = undoing
            undoing.add_done_callback(functools.partial(self._undone, attempt))
        # Shielded: a caller gone now is no reason to leave the jobs done.
        return await asyncio.shield(undoing)

    def forget_pop(self, topic: str, attempt_id: str, worker_id: str) -> None:
        """The pop named `attempt_id` was answered (a RESP pipeline's): its
        record, held until now, goes."""
        self.popped.take((topic, worker_id, attempt_id))

    def _undone(self, attempt: Attempt, undoing: asyncio.Future[int]) -> None:
        del self._undoing[attempt]
        if not undoing.cancelled():
            undoing.exception()  # seen: every caller that waited for it may have gone

    async def _give_back(self, attempt: Attempt, kept: Kept) -> int:
        """Give back the jobs `attempt` popped (`kept`); kept again should that
        not land."""
        try:
            given_back: int = await self.committer.submit(attempt[0], _unpop_all(kept.decoded()))
        except (StoreUnavailable, Contended) as exc:
            # AmbiguousWrite: it may have landed; NotDurable: it did (in place,
            # not durable). Kept for another undo, either could be done twice.
            if not isinstance(exc, (AmbiguousWrite, NotDurable)):  # it did not land
                self.popped.restore(attempt, kept)
            raise
        log.info("%s: gave back %d jobs of a pop whose answer was lost", attempt[0], given_back)
        return given_back

    async def _popped_now(self, attempt: Attempt, jobs: list[Job], held: bool) -> list[Job]:
        """`jobs`, just popped or completed by `attempt`, kept for its retries
        and undo (`held`: until its caller ends it); what its caller is
        answered. When its undo came first they go back, and it is answered
        none; when another try of it landed meanwhile (still polling, its
        caller gone unseen), they go back and it is answered that try's."""
        undone = self.popped.withdrawn(attempt)
        other = self.popped.get(attempt)
        if not undone and other is None:
            self.popped.keep(attempt, jobs, held=held)
            return jobs
        # Shielded: the caller (a connection the forwarding broker dropped) may
        # be cancelled now, and then the committer would skip the give-back.
        await asyncio.shield(self.committer.submit(attempt[0], _unpop_all(jobs)))
        return [] if other is None else other.decoded()

    async def _poll(
        self,
        topic: str,
        wait: float,
        mutation: Callable[[TopicState, float], _Polled],
        undo: Any = None,
        answered: Callable[[], bool] | None = None,
        since: float | None = None,
    ) -> list[Job]:
        """Submit `mutation` until it returns jobs, `wait` seconds pass or
        `answered()` says so. Between tries, wait for a commit, the topic's
        next look at the store, or for its rate to allow a claim. On a topic
        this broker owns, finding nothing is answered from a state read since
        the topic's last look (or written since), not necessarily since the
        claim came: the claims of an idle topic, however many workers send
        them, cost one read of its head an OWNER_LOOK_INTERVAL, and miss
        what a broker standing in for its owner wrote only until it tells the
        owner (refresh(), which wakes them), within that interval at worst.
        On another's, the state is read again when older than the claim (its
        owner writes it), and looked at every POLL_INTERVAL.
        `since` (monotonic, now if None) is its place among the topic's long
        polls: a caller waiting in rounds (a BLPOP for ever) keeps the place
        of its first round."""
        started = time.monotonic()
        since = started if since is None else min(since, started)
        deadline = started + wait
        while True:
            interval, looked = self._looks(topic)
            got: _Polled = await self.committer.submit(topic, mutation, undo, fresh_since=looked)
            left = deadline - time.monotonic()
            if got.jobs or left <= 0 or (answered is not None and answered()):
                return got.jobs
            if self.committer.long_polls_ended:  # the broker is stopping
                return got.jobs
            pause = min(left, next_look(topic, interval) - time.monotonic())
            if got.token_in is not None:
                pause = min(pause, got.token_in)
            await self.committer.wait_changed(topic, pause, since)

    def _looks(self, topic: str) -> tuple[float, float | None]:
        """How often what waits on `topic` looks at the store (a settled owner
        seldom, OWNER_LOOK_INTERVAL: it is told of others' writes; any other
        broker every POLL_INTERVAL), and on a topic this broker owns the
        monotonic time of its last look, which its memory is as fresh as
        (None elsewhere: read what is older than the request). A settled
        owner's last look is no earlier than when it settled: what others
        wrote before they saw it (they told nobody) is in a state read after
        that only, and a state read as it took the topic over, before, was
        trusted for up to OWNER_LOOK_INTERVAL, a job pending answered as
        nothing to claim."""
        if not self.owns(topic):
            return POLL_INTERVAL, None
        since = self.settled(topic)
        interval = POLL_INTERVAL if since is None else OWNER_LOOK_INTERVAL
        looked = next_look(topic, interval) - interval
        return interval, looked if since is None else max(looked, since)

    async def ack(
        self,
        topic: str,
        job_id: str,
        lease_token: str | None = None,
        result: Any = None,
        enqueue: list[FollowUpSpec] | None = None,
    ) -> dict[str, Any]:
        """Complete a claimed job; with `enqueue`, its follow-up jobs commit with
        it (SPEC 9), or none of them when the ack fails."""
        keys.check_topic(topic)
        _check_ack(result, enqueue)
        return await self.committer.submit(
            topic, lambda s, now: s.ack(job_id, lease_token, result, now, enqueue)
        )

    async def ack_many(self, topic: str, acks: list[AckRequest]) -> list[dict[str, Any]]:
        """Acknowledge several jobs in one batch; each answer says ok or why not."""
        keys.check_topic(topic)
        answers: list[dict[str, Any] | None] = []
        mutations: list[Mutation[dict[str, Any]]] = []
        for a in acks:
            try:
                _check_ack(a.result, a.enqueue)
            except InvalidRequest as exc:
                answers.append(_ack_failed(a, exc))
                continue
            answers.append(None)
            mutations.append(functools.partial(_ack, a))
        if not mutations:
            return cast(list[dict[str, Any]], answers)
        outcomes = await self.committer.submit_each(topic, mutations)
        # An error that is not the ack's own refusal (the store down, a corrupt
        # head) fails the request, unless some ack landed: one that failed alone
        # (its lease in a corrupt segment) is answered "error" beside them, as
        # a landed ack must never be reported failed.
        landed = any(not isinstance(o, BaseException) for o in outcomes)
        each = iter(outcomes)
        for i, answer in enumerate(answers):
            if answer is not None:
                continue
            outcome = next(each)
            if isinstance(outcome, SimpleQueueError) and outcome.ack_status is not None:
                answers[i] = _ack_failed(acks[i], outcome)
            elif isinstance(outcome, BaseException):
                if not landed:
                    raise outcome
                answers[i] = {"id": acks[i].job_id, "status": "error", "error": str(outcome)}
            else:
                answers[i] = outcome
        return cast(list[dict[str, Any]], answers)

    async def nack(
        self,
        topic: str,
        job_id: str,
        lease_token: str | None = None,
        delay: float = 0.0,
        error: Any = None,
    ) -> dict[str, Any]:
        keys.check_topic(topic)
        text = _error_text(error)
        return await self.committer.submit(
            topic, lambda s, now: s.nack(job_id, lease_token, delay, text, now)
        )

    async def heartbeat(
        self, topic: str, job_id: str, lease_token: str | None = None, lease: float | None = None
    ) -> dict[str, Any]:
        keys.check_topic(topic)
        ahead = self.committer.clock_ahead
        return await self.committer.submit(
            topic, lambda s, now: s.heartbeat(job_id, lease_token, lease, now, ahead(now))
        )

    def latest_now(self) -> float:
        """The latest the store's clock may read now, by this broker's estimate
        and its error: what an answer that starts or renews leases says
        (api.Claimed's `now`), so that its caller counts what a lease has left
        (lease_expires_at less it) on its own clock, from when the answer
        came, whatever the write before it took."""
        now = self.committer.clock()
        return now + self.committer.clock_ahead(now)

    def earliest_now(self) -> float:
        """The earliest the store's clock may read now, by this broker's
        estimate and its error: the clock leases are reaped by (TopicState.reap)
        and dues are on (next_due, tend), which the owner's duties wake by.
        Unlike now(), which stands still after a step back of the store's
        clock, it runs on with the local clock."""
        now = self.committer.clock()
        return now - self.committer.clock_behind(now)

    async def status(self, topic: str) -> dict[str, int]:
        keys.check_topic(topic)
        return await self.committer.read(topic, lambda s, now: s.counts(now))

    async def job(self, topic: str, job_id: str, wait: float = 0.0) -> dict[str, Any]:
        """The job, or its record; with `wait`, once it is finished (completed,
        dead, cancelled) or `wait` seconds passed, whichever comes first: a long
        poll woken by this broker's commits to the topic (its owner makes them
        all, in the steady state), re-reading the store for what other brokers
        wrote as often as a claim's long poll does (_looks(): a settled owner
        every OWNER_LOOK_INTERVAL, told at once of a stand-in's writes). A job
        that does not exist yet is waited for too (a follow-up on its way);
        JobNotFound if it still does not."""
        keys.check_topic(topic)
        deadline = time.monotonic() + min(wait, MAX_WAIT)
        max_age: float | None = None  # the first look reads the store: lookups are current
        while True:
            found, now = await self.committer.read(
                topic, lambda s, now: (s.find(job_id), now), max_age
            )
            left = deadline - time.monotonic()
            if self.committer.long_polls_ended:  # the broker is stopping: as if waited out
                left = 0
            if found is not None and (found[0] in FINISHED or left <= 0):
                break
            if left <= 0:
                raise JobNotFound(f"no job {job_id!r} in topic {topic!r}")
            interval, _ = self._looks(topic)
            look = min(deadline, next_look(topic, interval))
            changed = await self.committer.wait_changed(topic, look - time.monotonic())
            # Woken by a commit here, the cached state is current; else it must
            # have been read since the look was due: the first waiter to look
            # reads it, the others on the topic share that read.
            max_age = READ_AFTER_COMMIT if changed else max(0.0, time.monotonic() - look)
        status, job = found
        if status == "pending" and job["run_at"] > now:
            status = "delayed"
        return public(job, status)

    async def dead(
        self, topic: str, offset: int = 0, limit: int | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """Dead jobs in the order they died: every one, or up to `limit` from
        the `offset`-th on (reading only their segments); and how many there are."""
        keys.check_topic(topic)
        try:
            jobs, count = await self.committer.read(
                topic, lambda s, now: (s.dead_jobs(offset, limit), s.dead_count())
            )
        except CacheTooSmall:
            raise InvalidRequest(
                f"topic {topic!r} holds more dead jobs than one answer can read with this "
                "broker's --cache-mb: read them in pages (?offset=K&limit=N)"
            ) from None
        return [public(j, "dead") for j in jobs], count

    async def requeue(self, topic: str, job_ids: list[str] | None = None) -> list[str]:
        """Dead jobs (those named, or all) back to pending; the ids requeued."""
        keys.check_topic(topic)
        if job_ids is None:
            return await self._every_dead(topic, lambda s, now: s.requeue(None, now, DEAD_PART))
        return await self.committer.submit(topic, lambda s, now: s.requeue(job_ids, now))

    async def purge(self, topic: str, job_ids: list[str] | None = None) -> list[str]:
        """Forget dead jobs (those named, or all); the ids purged."""
        keys.check_topic(topic)
        if job_ids is None:
            return await self._every_dead(topic, lambda s, now: s.purge(None, now, DEAD_PART))
        return await self.committer.submit(topic, lambda s, now: s.purge(job_ids, now))

    async def _every_dead(self, topic: str, take: Mutation[list[str]]) -> list[str]:
        """Every dead job through `take` (which takes the DEAD_PART oldest), a
        commit per part: a dead-letter queue larger than the object cache goes
        too, each part reading only its own segments. Jobs that die meanwhile
        are left for the next call."""
        done: list[str] = []
        left: int | None = None
        while True:
            part, after = await self.committer.submit(
                topic, lambda s, now: (take(s, now), s.dead_count())
            )
            done += part
            left = (len(part) + after if left is None else left) - len(part)
            if not part or left <= 0:
                return done

    # --- control: cancellation, schedules, settings (SPEC 10-12) -----------------------

    def served_here(self, topic: str) -> bool:
        return True

    async def cancel(self, topic: str, job_ids: list[str]) -> dict[str, list[str]]:
        """Cancel jobs; {"cancelled": [...], "not_found": [...]}."""
        keys.check_topic(topic)
        api.convert({"job_ids": job_ids}, api.CancelRequest)  # as HTTP checks them (RESP)
        return await self.committer.submit(topic, lambda s, now: s.cancel(job_ids, now))

    async def put_schedule(self, topic: str, name: str, spec: ScheduleRequest) -> dict[str, Any]:
        """Create or replace a schedule; the schedule as api.Schedule shows it."""
        keys.check_topic(topic)
        api.check_new_schedule_name(name)
        api.check_storable(spec.payload, "the payload")
        return await self.committer.submit(
            topic, lambda s, now: shown_schedule(name, s.put_schedule(name, spec, now))
        )

    async def schedules(self, topic: str) -> list[dict[str, Any]]:
        keys.check_topic(topic)
        found = await self.committer.read(topic, lambda s, now: s.schedules())
        return [shown_schedule(name, found[name]) for name in sorted(found)]

    async def delete_schedule(self, topic: str, name: str) -> None:
        keys.check_topic(topic)
        api.check_schedule_name(name)
        await self.committer.submit(topic, lambda s, now: s.delete_schedule(name))

    async def settings(self, topic: str) -> dict[str, Any]:
        """The topic's settings. On a topic this broker owns, from a state read
        since the topic's last look at the store (or written since: a change
        sent through any broker is the owner's write, but for one a broker
        standing in for it made), as a claim that finds nothing is (_poll):
        every SDK Worker reads them every 10 s, and a fleet of idle Workers
        read the head once a Worker, where their claims share one read an
        OWNER_LOOK_INTERVAL. Elsewhere from the store. (The status is always read
        from the store: it is current, whichever broker wrote, README.)"""
        keys.check_topic(topic)
        _, looked = self._looks(topic)
        max_age = None if looked is None else max(0.0, time.monotonic() - looked)
        return await self.committer.read(topic, lambda s, now: shown_settings(s), max_age)

    async def put_settings(self, topic: str, changes: SettingsRequest) -> dict[str, Any]:
        keys.check_topic(topic)

        def put(s: TopicState, now: float) -> dict[str, Any]:
            s.put_settings(changes, now)
            return shown_settings(s)

        return await self.committer.submit(topic, put)

    async def topics(self) -> _Listing:
        """Every topic in the store with its counts, and the error of each topic
        that cannot be read (a corrupt head): one bad topic spoils no listing.
        Each reads every head, and listings asked at once shared nothing: at
        20,000 topics, 8 asked at once were 159,692 GETs and 43 s of the
        broker's CPU (a cached status read's p99 at 650 ms meanwhile), on a
        route that needs no token by default. One asked while another runs
        takes the next one's answer, which starts once that one ended (it
        shows what landed before it was asked, where the one under way may
        have read a head before that): those asked during a listing share
        one. It runs on when its callers go (a client that left)."""
        running = self._listing
        if running is None or running.done():
            listing = self._listing = _shared(self._list_topics())
        else:
            if self._next_listing is None:
                self._next_listing = _shared(self._list_after(running))
            listing = self._next_listing
        counts, errors = await asyncio.shield(listing)
        return dict(counts), dict(errors)

    async def _list_after(self, running: asyncio.Task[_Listing]) -> _Listing:
        """_list_topics() once `running` ended, as the listing under way."""
        await asyncio.wait([running])
        self._listing, self._next_listing = asyncio.current_task(), None
        return await self._list_topics()

    async def _list_topics(self) -> _Listing:
        """topics(), one listing of the store and a read of each head."""
        names = await self.committer.topics()
        counts: dict[str, dict[str, int]] = {}
        errors: dict[str, str] = {}

        async def read(name: str) -> None:
            # Heads peeked at, not kept: a listing of 100,000 topics leaves
            # the broker's memory with the topics it serves.
            try:
                counts[name] = await self.committer.peek(name, lambda s, now: s.counts(now))
            except SimpleQueueError as exc:
                errors[name] = str(exc)
            except Exception as exc:  # a fault of ours: that topic's alone
                log.error("topic %s cannot be listed", name, exc_info=exc)
                errors[name] = f"internal error: {exc!r}"

        await each(names, LISTING_READERS, read)
        order = {name: i for i, name in enumerate(names)}
        return (
            dict(sorted(counts.items(), key=lambda kv: order[kv[0]])),
            dict(sorted(errors.items(), key=lambda kv: order[kv[0]])),
        )

    # --- what operators see (status page, metrics): reads only ---------------------

    async def topic_names(self) -> list[str]:
        """Every topic in the store (one listing)."""
        return await self.committer.topics()

    def known_topics(self) -> list[str]:
        """The topics this broker has read or written since it started."""
        return self.committer.known_topics()

    def cached_counts(self, topics: Iterable[str]) -> dict[str, tuple[float, dict[str, int]]]:
        """Counts of those of `topics` this broker holds, from its cache (no
        I/O), each with when they were last known current: the monotonic time
        the head they come from was read or written. A topic that changed
        behind this broker's back (refresh()) is left out until read again."""
        counts = self.committer.cached(lambda s, now: s.counts(now), topics)
        out: dict[str, tuple[float, dict[str, int]]] = {}
        for name, c in counts.items():
            at = self.committer.checked_at(name)
            if at is not None:
                out[name] = (at, c)
        return out

    async def cached_dues(self) -> AsyncIterator[dict[str, float | None]]:
        """When each topic this broker holds next wants its owner (as next_due()
        says), from its cache as last committed: no I/O. In slices, the loop
        taking its turns between (GroupCommitter.cached_in_turns)."""
        async for dues in self.committer.cached_in_turns(self.cached_due):
            yield dues

    async def cached_gauges(self) -> dict[str, dict[str, Any]]:
        """For /metrics, from the cache (no I/O): per topic its jobs in
        SHOWN_STATES, what it ever did (totals) and the age of its oldest due job (None if none).
        A topic with jobs that left memory (idle: nobody asked about it for a
        while), or that this broker took over and read without keeping it, is
        reported as it was then, its ages growing (_left_memory).
        Read in slices, the loop taking its turns between: a topic that left
        memory meanwhile is reported as it left."""
        live: dict[str, dict[str, Any]] = {}
        async for gauges in self.committer.cached_in_turns(
            lambda s, now: _Left.of(s, now).gauges(now)
        ):
            live.update(gauges)
        held = set(self.committer.known_topics())
        for name in live:
            if name in held:
                self._left.pop(name, None)  # in memory again: its own figures
        now = self.committer.clock()
        live.update((name, left.gauges(now)) for name, left in self._left.items())
        return live

    def _left_memory(self, topic: str, state: TopicState, now: float) -> None:
        """GroupCommitter.on_forgotten, and next_due() of a topic not in memory:
        keep what /metrics says of a topic with jobs (a backlog nobody consumes
        is what its alerts are for), at most GAUGES_KEPT topics, the oldest
        forgotten first."""
        self._left.pop(topic, None)  # an earlier one is older than this state
        left = _Left.of(state, now)
        if not left.holds_jobs():
            return
        self._left[topic] = left
        while len(self._left) > GAUGES_KEPT:
            del self._left[next(iter(self._left))]

    async def inspect(
        self,
        topic: str,
        *,
        listed: int,
        scan: int,
        max_age: float | None = None,
        rows: int | None = None,
        room: float = math.inf,
    ) -> dict[str, Any]:
        """What an operator sees of a topic, in bounded work whatever its size:
        counts, when the job due longest came due (looking at `scan` jobs
        per run), the `listed` claims that run out first and the `listed`
        newest dead jobs, `rows` of both at most (claims first), with how
        many more of each there are, and the bytes of the segments read for
        them ("read": no more jobs once those come to `room`). From a state
        at most `max_age` seconds old (default: the committer's, 0)."""
        keys.check_topic(topic)
        most = 2 * listed if rows is None else rows

        def view(s: TopicState, now: float) -> dict[str, Any]:
            claimed, spent = s.claimed_listing(min(listed, most), room)
            dead, spent_dead = s.dead_listing(min(listed, most - len(claimed)), room - spent)
            return {
                "read": spent + spent_dead,
                "now": now,
                "counts": s.counts(now),
                "oldest_due_since": s.oldest_due_since(now, scan),
                "claimed": claimed,
                "claimed_more": max(0, s.claimed_count() - len(claimed)),
                "dead": dead,
                "dead_more": max(0, s.dead_count() - len(dead)),
                "schedules": s.schedules(),  # at most Bounds.schedules_max
                "settings": shown_settings(s),
            }

        return await self.committer.read(topic, view, max_age)

    @property
    def claim_bytes(self) -> int:
        """The payload bytes a batch's claims read at most (Bounds.claim_bytes,
        16 MiB or an eighth of the object cache)."""
        return self.committer.bounds.claim_bytes

    async def check_store(self) -> None:
        """Raise StoreUnavailable unless the store answers: as it did at the
        last check, if that ended within CHECK_REUSE seconds (one check for
        every caller that comes during it, or within a second of it)."""
        async with self._checking:
            checked = self._checked
            if checked is None or time.monotonic() - checked[0] >= CHECK_REUSE:
                try:
                    await self.committer.check_store()
                except SimpleQueueError as exc:
                    checked = (time.monotonic(), exc)
                else:
                    checked = (time.monotonic(), None)
                self._checked = checked
        if checked[1] is not None:
            raise checked[1].with_traceback(None)  # raised afresh, not on top of the last

    # --- upkeep: the reaper's and the sweeper's door --------------------------------

    async def tend(self, topic: str) -> tuple[dict[str, int], float | None]:
        """What `topic`'s owner does when it is due (TopicState.tend: expired
        leases back to pending or dead), in a batch; with when it is next due
        (on earliest_now()'s clock; None: not until something changes)."""
        keys.check_topic(topic)

        def tend(s: TopicState, now: float) -> tuple[dict[str, int], float | None]:
            return s.tend(now, self.committer.clock_behind(now)), self._next_due(s, now)

        return await self.committer.submit(topic, tend, verify=False)

    async def next_due(self, topic: str, outbox: bool = True) -> float | None:
        """When `topic` next wants its owner (a lease may run out; on
        earliest_now()'s clock, as TopicState.next_due says), from its head
        as the store has it, keeping nothing in memory for an idle topic but its
        figures for /metrics, as if it had just left memory: a backlog an owner
        took over shows before anything touches it; with `outbox` False,
        leaving out follow-ups waiting for delivery."""
        keys.check_topic(topic)

        def unkept(s: TopicState, now: float) -> None:
            # Not one this broker stopped owning during the read: let_go()
            # dropped its figures, which the new owner's writes leave stale.
            if self.owns(topic):
                with contextlib.suppress(SegmentMissing):  # not read without I/O
                    self._left_memory(topic, s, now)

        return await self.committer.peek(
            topic, lambda s, now: self._next_due(s, now, outbox), unkept
        )

    async def outbox(
        self,
        topic: str,
        n: int,
        skip_topics: frozenset[str] = frozenset(),
        skip: frozenset[tuple[str, str]] = frozenset(),
    ) -> list[dict[str, Any]]:
        """The first `n` follow-ups `topic` holds for other topics but those for
        `skip_topics` and those in `skip` (as (topic, id)), as this broker last
        wrote or read it (a stale answer only delivers one twice, which its id
        makes a duplicate)."""
        return (await self.outbox_after(topic, 0, n, skip_topics, skip))[0]

    async def outbox_after(
        self,
        topic: str,
        start: int,
        n: int,
        skip_topics: frozenset[str] = frozenset(),
        skip: frozenset[tuple[str, str]] = frozenset(),
        room: float = math.inf,
        removed: int | None = None,
    ) -> tuple[list[dict[str, Any]], int, int]:
        """outbox() from the `start`-th follow-up on, how many from the front
        are held back (TopicState.outbox_after), from segments of `room`
        bytes or so, and no more than a batch's claims may read (claim_bytes:
        what fits the object cache); and how many follow-ups ever left the
        outbox (counters.delivered). `start` counts from the front as it was
        when `removed` had left it: if more have since (another broker
        delivered some), the positions moved, and the read starts at 0."""
        keys.check_topic(topic)
        room = min(room, self.claim_bytes)

        def read(s: TopicState, now: float) -> tuple[list[dict[str, Any]], int, int]:
            gone = s.totals()["delivered"]
            begin = start if gone == removed else 0
            return (*s.outbox_after(begin, n, skip_topics, skip, room=room), gone)

        return await self.committer.read(topic, read, READ_AFTER_COMMIT)

    async def delivered(
        self, topic: str, delivered: list[tuple[str, str]]
    ) -> tuple[int, float | None]:
        """Follow-ups enqueued in their topics, as (topic, id), leave `topic`'s
        outbox: how many left (one already gone is not counted), and when the
        topic is next due (on earliest_now()'s clock)."""
        keys.check_topic(topic)

        def deliver(s: TopicState, now: float) -> tuple[int, float | None]:
            return s.outbox_delivered(delivered), self._next_due(s, now)

        return await self.committer.submit(topic, deliver)

    def _next_due(self, s: TopicState, now: float, outbox: bool = True) -> float | None:
        """TopicState.next_due with this broker's clock error at `now` (a time
        its clock returned): on earliest_now()'s clock."""
        c = self.committer
        return s.next_due(now, c.clock_ahead(now), c.clock_behind(now), outbox)

    def cached_due(self, s: TopicState, now: float) -> float | None:
        """_next_due() with no I/O (a landing's listener, cached_dues): if the
        outbox's front segment is not in the cache, its follow-ups are taken
        to wait since `now` or before (when is not known): due at once."""
        try:
            return self._next_due(s, now)
        except SegmentMissing:
            at_once = now - self.committer.clock_behind(now)
            held = self._next_due(s, now, outbox=False)
            return at_once if held is None else min(held, at_once)

    def forget(self, topics: list[str]) -> None:
        """Drop what this broker holds of `topics` (another owns them now)."""
        self.committer.forget(topics)
        for topic in topics:
            self._left.pop(topic, None)

    def let_go(self, owned: Callable[[str], bool]) -> None:
        """Drop what this broker holds of the topics not `owned` (the brokers
        changed): their states, and their figures kept for /metrics (the new
        owner's writes would leave them stale should they come back here)."""
        self.forget([t for t in [*self.known_topics(), *self._left] if not owned(t)])

    def forget_idle(self) -> int:
        """Topics idle for a while leave this broker's memory; how many left.
        So do the claims' answers and pops' records kept past their time:
        forgotten only as new ones came, an idle broker kept them for good."""
        self._forget_answered(time.monotonic())
        self.popped.forget_expired()
        return self.committer.forget_idle()

    async def refresh(self, topic: str) -> None:
        """`topic` changed in the store behind this broker's back: read it
        again, and its long polls look at once."""
        keys.check_topic(topic)
        self._left.pop(topic, None)
        await self.committer.invalidate(topic)

    async def sweep_all(self, topics: list[str]) -> list[str]:
        """Delete orphan segments of `topics`; what was deleted. Failures are
        logged per topic, as for reap_all."""
        deleted: list[str] = []
        for topic in topics:
            try:
                deleted += await self.committer.sweep(topic)
            except SimpleQueueError as exc:  # a corrupt head, the store down: again next time
                log.warning("sweeper: topic %s not swept: %s", topic, exc)
            except Exception:
                log.exception("sweeper: topic %s failed", topic)
        return deleted

    async def topics_with_objects(self) -> set[str]:
        """The topics with objects beside their head (which may have orphans)."""
        return await self.committer.topics_with_objects()

    def sighted(self) -> list[str]:
        """The topics whose last sweep found orphans, which their next deletes."""
        return self.committer.sighted()

    async def sweep_leftovers(self, older_than: float) -> int:
        """Remove what writes cut short left in the store (a broker killed
        mid-write on localfs), untouched for `older_than` seconds; how many."""
        return await self.committer.sweep_leftovers(older_than)


SETTINGS = ("rate", "burst", "max_claimed", "lease", "max_attempts")


def shown_settings(s: TopicState) -> dict[str, Any]:
    """A topic's settings as the API shows them (api.Settings): every field,
    null where unset, and the burst in effect while a rate is set."""
    kept = s.settings()
    out = {name: kept.get(name) for name in SETTINGS}
    out["burst"] = s.burst()
    return out


def shown_schedule(name: str, kept: dict[str, Any]) -> dict[str, Any]:
    """A schedule as the API shows it (api.Schedule)."""
    last = kept.get("last_slot")
    out = {
        "name": name,
        "payload": kept["payload"],
        "next_at": kept["next_at"],
        "every": kept.get("every"),
        "cron": kept.get("cron"),
        "tz": kept.get("tz", "UTC" if "cron" in kept else None),
        "priority": kept.get("priority", 0),
        "max_attempts": kept.get("max_attempts"),
        "created_at": kept.get("created_at"),
        "last_fired_at": kept.get("last_fired_at"),
        "last_job_id": None if last is None else f"{name}@{last}",
        "last_error": kept.get("last_error"),
    }
    return out


def _check_ack(result: Any, enqueue: list[FollowUpSpec] | None) -> None:
    """InvalidRequest unless the ack's result and follow-ups can be stored."""
    api.check_storable(result, "the result")
    if enqueue:
        _check_specs(enqueue)


def _ack(a: AckRequest, s: TopicState, now: float) -> dict[str, Any]:
    return s.ack(a.job_id, a.lease_token, a.result, now, a.enqueue)


def _ack_failed(a: AckRequest, exc: SimpleQueueError) -> dict[str, Any]:
    """The answer to an ack that failed alone (ack_many's other acks go on)."""
    return {"id": a.job_id, "status": exc.ack_status, "error": str(exc)}


def _check_specs(specs: Sequence[JobSpec]) -> None:
    if not specs:
        raise InvalidRequest("no jobs to enqueue")
    if len(specs) > api.MAX_BATCH:
        raise InvalidRequest(f"at most {api.MAX_BATCH} jobs per request")
    for spec in specs:
        api.check_storable(spec.payload, "the payload")
