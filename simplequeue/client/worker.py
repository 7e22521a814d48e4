"""Worker: claims jobs and runs a handler on each, concurrently.

Batch claims fill free slots and, ahead of need, a prefetch buffer of up to
`prefetch` more jobs (by default sized to the rate jobs end at: ClaimAhead),
so that the next jobs are at hand when a slot frees rather than one claim
round trip away. A buffer over its size (jobs slowed down, or the topic
has limits now) gives back the jobs past it, the last to run, when a
heartbeat of one waiting there comes due, rather than renew them while
other workers may idle (_trim_buffer). Not on a topic with a `rate` or
`max_claimed` setting: those count claimed jobs, and a job held ahead would
take a place (or a token) without running, while another worker idles;
there the Worker claims only for its free slots, whatever its `prefetch`, and so it does
until it has read them (before its first claim, SETTINGS_FIRST_WAIT at
most; then every SETTINGS_EVERY seconds in the background:
_follow_settings). With a buffer, each claim asks for half the capacity and
two can be in flight; their jobs are buffered in the order the claims were
sent, unless an earlier claim is still out ORDER_GRACE after a later one's
answer came (a long poll on a quiet topic). Each claimed job's lease (the
topic's `lease` setting, else the broker's --lease, unless `lease` says) is
renewed by heartbeats every third of it (`heartbeat_every`, half of it at
most; HEARTBEAT_MIN at least), timed from when the lease began, on this
clock: when the claim's answer came, less how long before answering the
broker began it (its write included: the answer's Simplequeue-Now header says), waiting in
the buffer included, until its ack is answered; each heartbeat has until
the lease's end, up to HEARTBEATS_IN_FLIGHT out at once, so one answered
late still renews the lease and one left unanswered never holds back the
next. A lease that ran out with no heartbeat landing
(on this clock, from that time, or from when the last renewal that landed
began) is taken for lost, as one the broker says is, its job neither acked
nor nacked, its handler's end included: the broker may have given the job
to another worker. From a broker that says no `now`, a lease counts from
when the claim was sent (first sent, if it was sent more than once: a retry
may be answered the jobs of a try whose answer was lost), or for a long
poll from when its answer came; a renewal from when it was sent.

The handler is a coroutine function, a plain function (run in a thread,
asyncio.to_thread) or a callable that returns an awaitable. Its return value
acks the job (acks go out in batches, through batching.Batcher, and the slot
is free at once); a `Done(result, enqueue=[...])` acks it with follow-up jobs
(SPEC 9). An exception, from the call on, a result or follow-up that cannot be
sent, overrunning `timeout`, or an ack the broker refuses (a follow-up it
cannot store, a body over its --max-body) nacks the job with the error text
(its first api.MAX_ERROR characters, all the broker keeps) and a jittered
exponential backoff (the broker sends it dead when its attempts are spent),
and is logged with its traceback on the `simplequeue.worker` logger. So
does SystemExit or KeyboardInterrupt from the handler (a script's function
calling sys.exit()), which then stops the Worker as a signal does and is
raised by run() once it drained: it must not end the event loop with the
job, the jobs claimed ahead and the acks not sent all left to their leases.
A handler's StopIteration (from its thread) or GeneratorExit, which asks
nothing of the process, fails its job as a RuntimeError raised from it, and
the Worker goes on.
stop() stops claiming and drains: every job already claimed, the buffered ones
included, is run to its end. SIGTERM or SIGINT stop claiming too: the running
jobs are run to their end, and the buffered ones given back unrun (released:
pending at once, the attempt uncounted), for another worker to run now. A
signal stops every Worker of the event loop; one the application handles
itself is left to it (its handler calls stop()). A second signal while
draining stops now: the running handlers are cancelled, their jobs nacked at
once (handlers in threads cannot be stopped: they are waited for), and the
give-backs under way cancelled; the nacks (of those jobs and of failed ones),
give-backs started after it and acks still unanswered have TAKE_BACK_WITHIN
each (from the signal, or from their start if later): what the broker has
not answered by then is left to the jobs' leases.
Cancellation is never swallowed: only a handler cancelled because its
heartbeat found the lease lost (or the job cancelled, POST /cancel), or by a
second signal, is handled here; the first kind of job is neither acked nor
nacked: it is no longer this worker's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import inspect
import logging
import math
import os
import random
import signal
import socket
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from simplequeue import api
from simplequeue.batching import Batcher, Pending, in_halves, runs_within
from simplequeue.client.client import (
    UNSENDABLE,
    Client,
    LastCall,
    calls_within,
    encode,
    last_call,
    refused_whole,
)
from simplequeue.client.followups import Done, follow_up_specs
from simplequeue.client.job import Job
from simplequeue.client.threads import in_thread, run_jobs_on
from simplequeue.errors import (
    BrokerUnavailable,
    Forbidden,
    InvalidRequest,
    JobCancelled,
    JobNotFound,
    LeaseLost,
    RouteNotFound,
    SimpleQueueError,
    Unauthorized,
)

# One name for the Worker's log, wherever the module lives: applications and the
# CLI configure "simplequeue.worker".
log = logging.getLogger("simplequeue.worker")

#: A coroutine function, a plain function (run in a thread), or any other
#: callable that returns an awaitable; what it returns acks the job (a Done:
#: with follow-up jobs).
Handler = Callable[[Job], Any]


class _Ack(NamedTuple):
    """An ack waiting for its batch."""

    job: Job
    result: Any
    follow_ups: list[api.FollowUpSpec] | None
    size: int  # bytes it adds to an ack request, about (_ack_of)


@dataclass(frozen=True)
class Backoff:
    """Retry delays: `base` * 2^(attempt-1), capped at `cap`, scaled by a random
    factor in [1 - jitter, 1] so that retries of a burst spread out."""

    base: float = 1.0
    cap: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        for name, value in (("base", self.base), ("cap", self.cap)):
            if not 0 <= value <= api.MAX_DELAY:
                raise ValueError(f"Backoff {name} must be 0 to {api.MAX_DELAY:g} s, not {value!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"Backoff jitter must be 0 to 1, not {self.jitter!r}")

    def delay(self, attempts: int) -> float:
        # The exponent capped first: 2.0 ** 1025 overflows, and a job may fail
        # far more often than that (unlimited attempts).
        doublings = min(max(0, attempts - 1), 64)
        raw: float = min(self.cap, self.base * 2.0**doublings)
        return raw * (1 - self.jitter * random.random())


CLAIMS_IN_FLIGHT = 2
# Seconds a claim's jobs wait, at most, for the answer of a claim sent before
# it, to keep the order they were claimed in. An earlier claim that took
# older jobs was committed first, its answer on its way: a few milliseconds.
# One still out longer is a long poll that found nothing when the later one
# took its jobs (a broker does not wake its long polls in the order they
# came): it answers when the next job comes, or when its wait (5 s) is out.
ORDER_GRACE = 0.01
# Without a fixed prefetch, the buffer holds what the slots use up in this many
# claim round trips at the rate jobs end here, between twice and this many
# times the concurrency.
AHEAD_TRIPS = 4
AHEAD_MAX = 64
AHEAD_JOBS_MAX = api.MAX_BATCH  # and never more jobs than this (unless 2 x concurrency is)
# The lease assumed for a job whose claim times the broker did not send: its
# default --lease.
FALLBACK_LEASE = 30.0
# Heartbeats of one job out at once, at most: each has until the lease's end,
# and a `heartbeat_every` far shorter than the lease must not pile them up.
HEARTBEATS_IN_FLIGHT = 3
# Seconds between heartbeats, and each one's time to be answered, at least:
# a lease of a millisecond (a topic's `lease` setting may say so) must not
# make heartbeats time out before they are sent, thousands a second.
HEARTBEAT_MIN = 0.05
# Seconds run(), cancelled while draining, waits for the handlers it cancels.
CANCEL_GRACE = 5.0
# Seconds a burst Worker's claim held back by the topic's limits long-polls, at least.
HELD_BACK_WAIT = 1.0
# Seconds between a Worker's reads of its topic's settings (one request, in
# the background, never one per claim): a `rate` or `max_claimed` set while it
# runs stops its claiming ahead within this lag, about, and one removed lets
# it claim ahead again. A read that failed is tried again SETTINGS_RETRY
# later. (Not sooner when a claim comes back short: a Worker keeping up with
# a trickle has every claim answered short, and read them once a job.) The
# first claim waits for the first read SETTINGS_FIRST_WAIT at most (a broker
# that does not answer it must not hold up the claims: they ask only for
# free slots until it lands).
SETTINGS_EVERY = 10.0
SETTINGS_RETRY = 1.0
SETTINGS_FIRST_WAIT = 1.0
# Seconds a failed claim keeps its place before another is sent; so does one
# answered empty before its long poll was out, for the rest of the poll at most.
FAILED_CLAIM_HOLD = 1.0
# Seconds from its sending a claim answered empty keeps its place, at least,
# whatever its wait (0, or a small one: 0.01): each claim in flight (up to
# CLAIMS_IN_FLIGHT) polls an empty topic ten times a second, not in a loop.
EMPTY_POLL_HOLD = 0.1
# Seconds a stop waits, at most, to ask again what a claim it cut short was
# answered (Worker._take_back); and, after a second signal, for the broker to
# answer what is left (give-backs, nacks, acks).
TAKE_BACK_WITHIN = 2.0
# Bytes of acks (results and follow-ups, encoded) in one ack request at most,
# an ack larger going alone, as the CLI's enqueue sends jobs: well within the
# broker's default --max-body (1 MiB); a request it refuses still goes again
# in halves. An ack batch is also api.MAX_BATCH acks at most.
ACK_BATCH_BYTES = 512 * 1024
# Bytes an ack adds to its request besides its result, follow-ups, id and
# lease token: the field names and punctuation.
ACK_FIELDS_BYTES = 64


class ClaimAhead:
    """The prefetch buffer's size when none was fixed: enough jobs to keep every
    slot busy for AHEAD_TRIPS claim round trips at the rate jobs end here,
    never under twice `concurrency` nor over AHEAD_MAX times it (nor over
    AHEAD_JOBS_MAX, past twice `concurrency`). Short jobs
    then claim in large batches (the broker writes once per batch, so a batch
    twice the size costs about the same), and long ones keep the small buffer
    that leaves jobs to the other workers. Round trips are measured only on
    claims answered in full that did not long-poll (sent with no wait: see
    `had_jobs`): a long poll is answered in full too when jobs come while it
    waits (an idle worker, then a burst), and its wait, taken for a round
    trip, would size the buffer to claim the burst. A rate sample spans at
    least WINDOW and one job, so when jobs slow down (or stop) the rate falls
    with them and the buffer shrinks back: the jobs held past its size are
    given back as their heartbeats come due (Worker._trim_buffer)."""

    WINDOW = 0.02  # seconds of completions per rate sample, at least
    WEIGHT = 0.3  # of a new sample in the moving averages

    def __init__(self, concurrency: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.floor = 2 * concurrency
        self.cap = max(self.floor, min(AHEAD_MAX * concurrency, AHEAD_JOBS_MAX))
        self.size = self.floor
        self.clock = clock
        self._trip: float | None = None  # seconds, a claim's round trip
        self._rate: float | None = None  # jobs ended per second
        self._since = clock()
        self._ended = 0
        # The last claim answered got all it asked for: the topic most likely
        # has more, and the next claim is sent with no wait (Worker._claim,
        # unless `prefetch` fixes the buffer), which makes its time a round trip.
        self.had_jobs = False

    def claimed(self, seconds: float, asked: int, got: int, wait: float) -> None:
        """A claim that could long-poll `wait` seconds took `seconds` and got
        `got` of the `asked` jobs."""
        self.had_jobs = got >= asked
        if self.had_jobs and wait == 0:
            self._trip = self._average(self._trip, seconds)
            self._resize()

    def ended(self) -> None:
        self._ended += 1
        now = self.clock()
        took = now - self._since
        if took >= self.WINDOW:
            self._rate = self._average(self._rate, self._ended / took)
            self._resize()
            self._since, self._ended = now, 0

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.WEIGHT * (new - old)

    def _resize(self) -> None:
        if self._trip is not None and self._rate is not None:
            wanted = math.ceil(self._rate * self._trip * AHEAD_TRIPS)
            self.size = max(self.floor, min(self.cap, wanted))


class Interrupted(Exception):
    """The worker stopped the job's handler before it finished (a second signal
    while draining): its job is nacked at once, its attempt spent (dead, if
    that was its last), rather than left claimed until its lease ends."""


class HandlerCancelled(Exception):
    """The handler raised a CancelledError of its own (of a task or future it
    awaited, not the worker's): its job fails, as for any other error."""


class HandlerExited(Exception):
    """The handler raised SystemExit, KeyboardInterrupt or another exception
    that is no Exception nor a cancellation (`raised`): its job fails, the
    worker stops as on a signal, and run() raises `raised` once it drained.
    Not GeneratorExit, which asks nothing of the process (a generator's,
    leaked): its job fails as a RuntimeError raised from it (Worker._handle)."""

    def __init__(self, raised: BaseException) -> None:
        super().__init__(f"the handler raised {raised!r}")
        self.raised = raised


class _Answered(NamedTuple):
    """When a claim was sent and its answer came, and what it said of the
    broker's clock."""

    sent: float  # time.monotonic() the claim was (first) sent
    since: float  # when its jobs' leases count from if the broker says no `now`
    came: float  # time.monotonic() the answer came (its headers)
    now: float | None  # the latest the store's time was then (the answer's api.NOW_HEADER)

    def lease_start(self, job: Job) -> float:
        """When `job`'s lease began, on this clock: as long before the answer
        came as the broker began it before answering (`now` less its
        heartbeat_at, both on the broker's clock: the write that committed
        the claim, a slow PUT retried, is in it), but not before the claim
        was sent: a `now` far ahead (garbage, a proxy's, a broken broker's)
        put it years back, and each job was dropped as "lost its lease before
        it started", left claimed for its lease. The answer's way back, a
        few ms, is not in it: the lease may run that much past the broker's,
        which reaps only past its own clock's error. From `since` for a
        broker that says no `now`."""
        if self.now is None or job.heartbeat_at is None:
            return self.since
        return max(self.sent, self.came - max(0.0, self.now - job.heartbeat_at))


class _Claimed:
    """A job this worker holds: waiting in the buffer, then running."""

    def __init__(self, job: Job, lease: float, lease_ends: float) -> None:
        self.job = job
        self.lease = lease  # seconds each renewal gives it (SPEC: the claim's own, or `lease`)
        self.lease_ends = lease_ends  # time.monotonic() its lease runs out by, unless renewed
        self.work: asyncio.Future[Any] | None = None  # the handler, once started
        self.lost = False  # a heartbeat found the lease gone
        self.cancelled = False  # ... because the job was cancelled
        self.interrupted = False  # a second signal: stopped, to be given back
        self.in_thread = False  # its handler runs in a thread now: it cannot be interrupted
        self.out_of_thread = asyncio.Event()  # ... set while it does not
        self.out_of_thread.set()
        # The first heartbeat's timer; the task that sends them once it fired.
        # Most jobs end before their first heartbeat is due: they never cost
        # a task (one per job, and cancelling it, was a fifth of a Worker's
        # CPU on short jobs).
        self.first_beat: asyncio.TimerHandle | None = None
        self.beats: asyncio.Task[None] | None = None

    def thread_started(self) -> None:
        self.in_thread = True
        self.out_of_thread.clear()

    def thread_ended(self) -> None:
        self.in_thread = False
        self.out_of_thread.set()

    async def thread_returned(self) -> None:
        """Return once its handler runs in no thread, or its handler ended."""
        # A loop: what the thread handed back may enter another (a plain-def
        # task) in the very step the first ended, before this wakes.
        while self.in_thread and self.work is not None and not self.work.done():
            back = asyncio.ensure_future(self.out_of_thread.wait())
            try:
                await asyncio.wait([back, self.work], return_when=asyncio.FIRST_COMPLETED)
            finally:
                back.cancel()


class _HeldNow:
    """What a Worker holds (Worker._held_pairs), as a claim's `held`
    (Client.claim_many): read when first asked, as the claim's answer came,
    not when it was sent: the jobs of another claim answered meanwhile are
    held too, and an answer replaying them must not release them."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._pairs: set[tuple[str, str | None]] | None = None

    def __contains__(self, pair: object) -> bool:
        if self._pairs is None:
            self._pairs = self._worker._held_pairs()
        return pair in self._pairs


class Worker:
    """Runs `handler` on the client's topic's jobs, `concurrency` at a time,
    holding up to `prefetch` more claimed (default: sized as jobs go, see
    ClaimAhead: twice `concurrency` for jobs that take a while, up to 64 times
    it for short ones, so that those are claimed in large batches, few
    requests and writes per job; 0 for long jobs, so that none waits here
    while another worker is idle). On a topic with a `rate` or `max_claimed`
    setting it holds none ahead, whatever `prefetch` says (`limited`): those
    limits count claimed jobs, and one held here would take a place or a
    token without running. Unless `prefetch` is 0, it reads the settings
    before its first claim (a second at most: until they are read, it
    claims only for its free slots) and every SETTINGS_EVERY seconds (10)
    while it runs, so a limit set or removed meanwhile applies within about
    that long.
    A handler still running `timeout` seconds after it started is cancelled and
    its job failed (a plain function's thread cannot be stopped: it runs on,
    keeping its slot and its job's lease, and the job fails when it returns).

    run() returns after stop() or a signal; with `burst`, also once the topic is
    empty (a claim found nothing while nothing ran or waited here, and no job
    is pending: one the topic's limits held back is waited for in long polls,
    unless the topic is paused; delayed jobs, retries included, are left for
    a later run; other burst claims do not long-poll); with
    `max_jobs`, once that many jobs were claimed, whatever their outcome.
    Either way it drains first. A `handler` that is not callable is a
    TypeError as the Worker is made."""

    def __init__(
        self,
        client: Client,
        handler: Handler,
        *,
        concurrency: int = 16,
        prefetch: int | None = None,
        worker_id: str | None = None,
        lease: float | None = None,
        heartbeat_every: float | None = None,
        wait: float = 5.0,
        backoff: Backoff | None = None,
        timeout: float | None = None,
        burst: bool = False,
        max_jobs: int | None = None,
        handle_signals: bool = True,
    ) -> None:
        if not isinstance(client, Client):
            # A SyncClient's methods would block the loop and answer no
            # awaitable: every claim claimed its jobs, then failed, for ever.
            # (Nor its .client: its connections belong to the SyncClient's
            # loop, in another thread; run() raises RuntimeError for it.)
            raise TypeError(
                f"Worker needs a Client, not a {type(client).__name__}: make one in the"
                " event loop that runs the Worker (async with Client(url, topic=...) as q)"
            )
        if not callable(handler):
            # Accepted, it failed every job it claimed, until each was dead.
            raise TypeError(
                f"a Worker's handler must be callable, not {type(handler).__name__}"
                f" {handler!r:.80}: an async def, a plain def, or a callable that"
                " returns an awaitable (a Tasks registry is one)"
            )
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if prefetch is not None and prefetch < 0:
            raise ValueError("prefetch must be 0 or more")
        if max_jobs is not None and max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        for name, value in (
            ("lease", lease),
            ("heartbeat_every", heartbeat_every),
            ("timeout", timeout),
        ):
            if value is not None:
                api.check_seconds(name, value, above_zero=True)
        if lease is not None:  # the broker refuses longer ones, every claim
            api.check_seconds("lease", lease, above_zero=True, at_most=api.MAX_LEASE)
        api.check_seconds("wait", wait, at_most=api.MAX_WAIT)  # a claim's long poll
        self.client = client
        self.handler = handler
        self._in_thread = _is_plain_function(handler)
        self.concurrency = concurrency
        self.prefetch = prefetch  # None: ClaimAhead sizes the buffer
        self.ahead = ClaimAhead(concurrency)
        # The topic has a rate or max_claimed, as last read (None: not read
        # yet): no buffer unless False.
        self.limited: bool | None = None
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.lease = lease  # None: the topic's lease setting, else the broker's --lease
        self.heartbeat_every = heartbeat_every  # None: a third of each job's lease
        self.wait = wait
        self.backoff = backoff or Backoff()
        self.timeout = timeout
        self.burst = burst
        self.max_jobs = max_jobs
        self.handle_signals = handle_signals
        self.processed = 0  # jobs whose handler returned and whose ack landed
        self.failed = 0  # jobs whose handler failed (nacked, or dead)
        # Jobs whose handler returned but whose ack did not land (the lease was
        # lost meanwhile, or the broker could not be reached): they run again.
        self.unacked = 0
        # Released unrun: claimed ahead (at a signal, or past the buffer's size
        # as jobs slowed down: _trim_buffer), or interrupted by a second signal.
        self.given_back = 0
        self._running: set[asyncio.Task[None]] = set()
        self._holding: dict[asyncio.Task[None], _Claimed] = {}  # what each running task runs
        self._signalled = 0  # signals received while running: a second stops now
        self._giving_back: list[asyncio.Future[None]] = []  # releases since the first signal
        self._ready: collections.deque[_Claimed] = collections.deque()  # claimed, not started
        # Jobs that called stop(): no stop() waits for them; and those whose
        # handler waits in it, whose slot the jobs claimed ahead may take.
        self._parked: set[asyncio.Task[Any] | None] = set()
        self._lent: set[asyncio.Task[Any] | None] = set()
        self._claims: set[asyncio.Task[None]] = set()  # claims in flight
        self._asked = 0  # jobs asked for by claims whose answers are not in the buffer yet
        self._taken = 0  # jobs claimed so far (max_jobs counts them)
        self._dry = False  # burst: a claim found nothing; claim again once a job ends
        # Burst: the topic's limits held a claim back and then let jobs through
        # (_held_back): claims long-poll for the next token or slot at once.
        self._rationed = False
        self._failed: SimpleQueueError | None = None  # what no claim will get past: run() raises it
        self._exited: BaseException | None = None  # a handler's SystemExit: run() raises it
        # Answers go into the buffer in the order their claims were sent, or
        # ORDER_GRACE after they came (_deliver): those delivered ahead of an
        # earlier one are in _ahead, until the sequence catches up with them.
        self._sent = 0
        self._delivered = 0
        # (jobs asked for, jobs answered, when the answer came: _claim)
        self._answers: dict[int, tuple[int, list[Job] | None, _Answered | None]] = {}
        self._ahead: set[int] = set()
        self._waiting_order: asyncio.TimerHandle | None = None
        # run()'s context, which each job's task starts from (a copy): a job
        # started by another job's end or stop() must not inherit its context
        # (a calls_within() bound, the handler's own context variables).
        self._context = contextvars.copy_context()
        # Handlers in threads (plain functions, plain-def tasks) run here, as
        # many at once as the slots (made at the first job of a run).
        self._pool: ThreadPoolExecutor | None = None
        self._acking: set[_Claimed] = set()  # jobs whose ack is not answered yet
        # Acks in batches: one request carries every ack that came in while the
        # previous one was in flight (group commit, client side).
        # Acks with follow-ups not yet answered: a burst worker that found the
        # topic empty claims again once they land (they may have added jobs).
        self._follow_ups_unsettled = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # of the last run()
        self._bind()
        self._done.set()  # not running: stop() returns at once

    def _bind(self) -> None:
        """What belongs to an event loop, made afresh: a Worker may be run
        again in another (a second asyncio.run()), as its Client may."""
        self._settings_tried = asyncio.Event()  # read, or failed to, once this run
        self._now = asyncio.Event()  # ... set by the second signal
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()  # a job started or finished: maybe time to claim
        self._idle = asyncio.Event()  # nothing running and nothing buffered
        self._one_finished = asyncio.Event()  # a job's task ended (stop() from a job)
        self._done = asyncio.Event()
        self._acks: Batcher[_Ack, str] = Batcher(
            self._send_acks,
            max_batch=api.MAX_BATCH,
            before=_let_a_burst_gather,
            name="worker-acks",
        )

    async def run(self) -> None:
        """Claim and process until stop() or a signal; then drain and return.
        It may be run again once it returned (`max_jobs` counts per run; the
        counters add up)."""
        if self._failed is not None:  # it gave up for good: a new Worker may do better
            raise self._failed
        # RuntimeError now for a client in use in a loop running in another
        # thread (a SyncClient's .client): every claim would raise it, logged
        # and tried again twice a second, for ever, run() never returning.
        await self.client._bind_here()
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:  # run before, in a loop now gone
                self._bind()
            self._loop = loop
        self._done.clear()
        self._context = contextvars.copy_context()
        self._signalled, self._giving_back = 0, []
        self._now.clear()
        if self.handle_signals:
            _signals.join(loop, self)
        try:
            await self._claim_loop()
        finally:
            try:
                await self._drain()
            finally:
                try:
                    await self._flush_acks()
                    for held in list(self._acking):  # their callbacks may not have run yet
                        self._acking.discard(held)
                        await self._stop_beats(held)
                finally:
                    _signals.leave(loop, self)
                    if self._pool is not None:  # its threads all returned: the drain waited
                        self._pool.shutdown(wait=False)
                        self._pool = None
                    # Ready for another run(): a burst worker run now and then.
                    if self._waiting_order is not None:  # every claim answered
                        self._waiting_order.cancel()
                        self._waiting_order = None
                    self._stopping.clear()
                    self._dry, self._taken, self._rationed = False, 0, False
                    self._done.set()
        if self._exited is not None:
            exited, self._exited = self._exited, None
            raise exited
        if self._failed is not None:
            raise self._failed

    async def _drain(self) -> None:
        """Wait for the jobs running and buffered to finish (finishing jobs start
        buffered ones). Cancelled meanwhile (run() cancelled again, or while a
        stop() waits for it: a TaskGroup's sibling failed), it stops at once:
        the jobs buffered are dropped and those running cancelled, their
        heartbeats stopped, all left to their leases. After a second signal it
        stops now too, giving the jobs back (_stop_now)."""
        try:
            while (self._running or self._ready) and self._signalled < 2:
                self._idle.clear()
                await self._idle.wait()
            if self._running:  # a second signal (the first emptied the buffer)
                await self._stop_now()
            # Those a second signal cancelled end so: no error of the drain's.
            await asyncio.gather(*self._giving_back, return_exceptions=True)
        except asyncio.CancelledError:
            while self._ready:
                _cancel_beats(self._ready.popleft())
            running = list(self._running)
            for task in running:
                task.cancel()
            if running:  # each stops its heartbeats as it ends
                _, left = await asyncio.wait(running, timeout=CANCEL_GRACE)
                if left:
                    log.warning("%d jobs' handlers did not end when cancelled", len(left))
            raise

    def _on_signal(self, why: str = "signal received") -> None:
        self._signalled += 1
        if self._signalled == 1:
            log.info(
                "%s: draining %d running jobs, giving back %d claimed ahead"
                " (a second signal stops them now)",
                why,
                len(self._running),
                len(self._ready),
            )
            self.request_stop()
            # Not started: another worker may run them now, rather than after
            # the running ones (long jobs, a shutdown's grace period).
            ready = list(self._ready)
            self._ready.clear()
            for held in ready:
                _cancel_beats(held)
            self._give_back_later([held.job for held in ready])
            if not self._running:
                self._idle.set()
        elif self._signalled == 2:
            # Jobs still being given back are left to their leases, as acks
            # not answered soon are (_flush_acks): a broker that does not
            # answer must not hold up a stop asked for now.
            giving_back = [f for f in self._giving_back if not f.done()]
            log.warning(
                "second signal: stopping now; %d running jobs are interrupted%s",
                len(self._running),
                f", {len(giving_back)} give-backs left to their leases" if giving_back else "",
            )
            for future in giving_back:
                future.cancel()
            self._now.set()
            self._idle.set()  # the drain's wait: it stops now

    async def _stop_now(self) -> None:
        """A second signal during the drain (a user's second Ctrl-C): the running
        handlers are cancelled, their jobs nacked without delay (the attempt
        spent, as by a crash). What does not end within CANCEL_GRACE is left
        to its lease. Handlers in threads (plain functions, plain-def tasks)
        cannot be stopped: they are waited for, their jobs acked or nacked as
        they end. (The buffered jobs went back at the first signal.)"""
        # A thread cannot be stopped: given back, its job could run twice at
        # once (another worker's run and this one's, going on). Those in one
        # are waited for, then stopped as the others (what they handed back).
        stopping = list(self._running)

        async def interrupt(held: _Claimed) -> None:
            await held.thread_returned()
            held.interrupted = True
            if held.work is not None:
                held.work.cancel()

        threads = [self._holding[task] for task in stopping if self._holding[task].in_thread]
        if threads:
            log.warning(
                "%d handlers run in threads, which cannot be interrupted: waiting for them",
                len(threads),
            )
        await asyncio.gather(*(interrupt(self._holding[task]) for task in stopping))
        if stopping:
            _, left = await asyncio.wait(stopping, timeout=CANCEL_GRACE)
            for task in left:
                task.cancel()
            if left:
                log.warning(
                    "%d jobs did not stop in %g s: left to their leases", len(left), CANCEL_GRACE
                )
                await asyncio.wait(left)

    def _give_back_later(self, jobs: list[Job]) -> None:
        """_give_back() in a task of its own, which the drain waits for."""
        if jobs:
            # Those done dropped: a Worker that runs for weeks gives back now and then.
            self._giving_back = [f for f in self._giving_back if not f.done()]
            self._giving_back.append(asyncio.ensure_future(self._give_back(jobs)))

    async def _give_back(self, jobs: list[Job]) -> None:
        """Give back claimed jobs that did not run (pending at once, the attempt
        uncounted); those it cannot are left to their leases, their attempt
        spent. Within the client's retry budget: a broker slow to answer (a
        slow store) still takes them back, and a second signal cancels those
        under way (the drain waits for them); after it, TAKE_BACK_WITHIN
        seconds at most."""
        if not jobs:
            return
        within = TAKE_BACK_WITHIN if self._signalled >= 2 else None
        try:
            async with calls_within(within):
                self.given_back += await self.client.release(jobs)
        except Exception as exc:  # TimeoutError too
            log.warning(
                "%d claimed jobs could not be given back (%s): left to their leases",
                len(jobs),
                _why(exc, within),
            )

    def request_stop(self) -> None:
        """Stop claiming (safe from signal handlers and callbacks); run() then drains."""
        self._stopping.set()
        self._room.set()  # wake the claim loop, so that it returns
        for claim in self._claims:
            claim.cancel()  # the broker gives back a claim it had not answered

    async def stop(self) -> None:
        """Stop claiming, wait for claimed jobs to finish, return. From one of
        this worker's jobs (its handler, or a task it started or awaits
        through), it waits for the other jobs and their acks, not for that
        one nor for other jobs that called it too. Awaited by the handler
        itself, the job lends its slot to the jobs claimed ahead and waits
        for them too; from another task (shield, wait_for, a task it started)
        with every slot taken, those run after it returns. A handler that
        stops waiting here (a timeout around it) takes its slot back at once:
        the job it lent it to may run beside it, but no other job starts
        until the jobs running are within the concurrency again. (Waiting for
        a slot could wait for ever: that job may need what the handler
        holds.) The time a job waits here counts against its `timeout`."""
        self.request_stop()
        handling = _handling.get()
        if handling is None or handling[0] is not self:
            await self._done.wait()
            return
        _, own, held = handling
        # Waiting for that job too would never end, nor for another job that
        # waits here too: a job that called stop() is waited for by none.
        self._parked.add(own)
        self._one_finished.set()  # another job waiting in stop() looks again
        # Its slot goes to the jobs claimed ahead only while its handler is
        # blocked here: one that goes on working keeps it.
        lend = asyncio.current_task() in (own, held.work)
        if lend:
            self._lent.add(own)
            self._start_ready()
        try:
            while (lend and self._ready) or any(t not in self._parked for t in self._running):
                self._one_finished.clear()
                await self._one_finished.wait()
        finally:
            if lend:  # cut short too (a timeout around it): it counts again (_start_ready)
                self._lent.discard(own)
        await self._acks.flush()

    @property
    def buffer_size(self) -> int:
        """Claimed jobs held ahead of the slots, at most: `prefetch`, or as sized
        now; 0 on a topic with a rate or max_claimed, or before its settings
        were read (`limited`)."""
        if self.limited is not False:
            return 0
        return self.ahead.size if self.prefetch is None else self.prefetch

    def _learn(self, settings: dict[str, Any]) -> None:
        """The topic's settings, as read: whether it may hold jobs ahead."""
        limited = settings.get("rate") is not None or settings.get("max_claimed") is not None
        if limited != self.limited:
            if limited or self.limited:  # not news to log: no limits, as it starts
                log.info(
                    "the topic %s: %s",
                    "has a rate or max_claimed" if limited else "has no rate nor max_claimed now",
                    "claiming only for free slots" if limited else "claiming ahead again",
                )
            self.limited = limited
            self._room.set()  # what to claim changed

    async def _follow_settings(self) -> None:
        """Read the topic's settings now, then every SETTINGS_EVERY seconds
        (SETTINGS_RETRY after a read that failed, twice that after two, up to
        SETTINGS_EVERY): one request at a time, none per claim. The first of
        a run of failed reads is logged as a warning, the others at debug (a
        broker answering them with errors for an hour: not 3,600 warnings);
        what was read last holds until the next (nothing read: no buffer)."""
        failed = 0
        while True:
            read = time.monotonic()
            every = SETTINGS_EVERY
            try:
                self._learn(await self.client.settings())
                failed = 0
            except Exception as exc:
                every = min(SETTINGS_EVERY, SETTINGS_RETRY * 2**failed)
                failed += 1
                log.log(
                    logging.WARNING if failed == 1 else logging.DEBUG,
                    "the topic's settings could not be read (%s): %s",
                    exc,
                    "claiming ahead" if self.limited is False else "claiming for free slots only",
                    exc_info=not isinstance(exc, SimpleQueueError),
                )
            self._settings_tried.set()
            await asyncio.sleep(every - (time.monotonic() - read))

    async def _first_settings(self) -> None:
        """Return once the settings were read (or failed to be), the worker
        stops, or SETTINGS_FIRST_WAIT passed."""
        tried = asyncio.ensure_future(self._settings_tried.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait(
                [tried, stopping], timeout=SETTINGS_FIRST_WAIT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            tried.cancel()
            stopping.cancel()

    def _wanted(self) -> int:
        """How many jobs to claim now: nothing until half a buffer's worth of
        room is free (or a slot would idle), so that claims come in batches
        rather than one per finished job; then all the room, or with a buffer
        half the capacity at most; never more than max_jobs leaves."""
        if self._dry:
            return 0
        prefetch = self.buffer_size
        held = len(self._running) + len(self._ready) + self._asked
        room = self.concurrency + prefetch - held
        starving = not self._ready and not self._asked and len(self._running) < self.concurrency
        if not starving and room * 2 < prefetch:
            return 0
        # With a buffer, half the capacity at most, so that a second claim can
        # be on its way while the first one's jobs run.
        count = min(room, (self.concurrency + prefetch + 1) // 2) if prefetch else room
        count = min(count, api.MAX_BATCH)  # what one claim may ask for
        if self.max_jobs is not None:
            count = min(count, self.max_jobs - self._taken - self._asked)
        return count

    async def _claim_loop(self) -> None:
        """Send claims, up to CLAIMS_IN_FLIGHT at once: with short jobs, the next
        claim is on its way while the last one's jobs run, and the broker commits
        the two in successive writes instead of one after the other's answer.
        The topic's settings are read first and followed meanwhile
        (_follow_settings), unless `prefetch` is 0 (they change nothing then)."""
        following: list[asyncio.Task[None]] = []
        try:
            if self.prefetch != 0:
                self._settings_tried.clear()
                following.append(asyncio.create_task(self._follow_settings()))
                await self._first_settings()
            while not self._stopping.is_set():
                count = self._wanted()
                if count <= 0 or len(self._claims) >= CLAIMS_IN_FLIGHT:
                    self._room.clear()
                    await self._room.wait()
                    continue
                self._asked += count
                claim = asyncio.create_task(self._claim(self._sent, count))
                self._claims.add(claim)
                claim.add_done_callback(functools.partial(self._claim_done, self._sent, count))
                self._sent += 1
        finally:
            for task in (*self._claims, *following):
                task.cancel()
            await asyncio.gather(*self._claims, *following, return_exceptions=True)

    async def _claim(self, seq: int, count: int) -> None:
        jobs: list[Job] | None = None  # None: the claim failed, or was cancelled
        attempt = [api.new_id()]  # the claim in flight's name (_held_back's claims)
        hold = FAILED_CLAIM_HOLD  # seconds this claim keeps its place once answered
        sent = time.monotonic()
        answering = LastCall()  # of the claim that answered the jobs
        # Right after a claim answered in full, no long poll: the topic most
        # likely has jobs, and its time is a round trip (ClaimAhead). Not
        # with a fixed buffer, which sizes nothing from it, nor with none (a
        # topic's limits): with none and one slot, every claim that gets a
        # job is answered in full, and each job of a trickle would cost a
        # claim answered empty besides.
        timed = self.prefetch is None and self.limited is False and self.ahead.had_jobs
        wait = 0.0 if self.burst or timed else self.wait
        # A burst claim does not long-poll (an empty answer is how it learns
        # the topic is empty), but on a topic whose limits ration the jobs it
        # would find nothing after each token, and read the status and the
        # settings a job in _held_back: it long-polls for the next token at
        # once, and looks at the status only when that finds nothing (so a
        # burst under a rate stops HELD_BACK_WAIT after its last job, at most).
        if self.burst and self._rationed and self.limited:
            wait = HELD_BACK_WAIT
        polled = wait > 0  # the jobs answered may have been claimed after it was sent
        try:
            with last_call(answering):
                jobs = await self._claim_many(count, attempt[0], wait)
                took = time.monotonic() - sent
                self.ahead.claimed(took, count, len(jobs), wait)
                # ... answered short so, it is followed by a long poll at once.
                unwaited_short = wait < self.wait and len(jobs) < count
                # Only jobs held here already (a broker's fault) is an empty
                # answer: held for nothing, the claim would be sent again at
                # once, and answered so again, in a tight loop.
                jobs = self._not_held(jobs)
                if self.burst and not jobs:
                    polled = True
                    jobs = await self._held_back(count, attempt)
            # Answered empty before its long poll was out (a stopping broker
            # ends its long polls, a proxy may drop `wait`): claimed again at
            # once, it would spin, thousands of claims a second, while that
            # lasts. Held for the rest of its wait, it would leave the jobs of
            # a broker back from a restart waiting as long (a minute, wait=60).
            # EMPTY_POLL_HOLD at least from its sending: a wait of 0 or 0.01
            # would hold it for nothing.
            empty_hold = max(EMPTY_POLL_HOLD - took, min(self.wait - took, FAILED_CLAIM_HOLD))
            hold = 0.0 if jobs or self.burst or unwaited_short else empty_hold
        except asyncio.CancelledError:
            if self._stopping.is_set():  # request_stop(), not run() cancelled
                self._giving_back.append(asyncio.ensure_future(self._take_back(count, attempt[0])))
            raise
        except Exception as exc:  # logged, and the claim's place held a while: see below
            if isinstance(exc, InvalidRequest | Unauthorized | Forbidden | RouteNotFound):
                self._give_up(exc)  # every claim would be refused so
            elif self.burst and isinstance(exc, BrokerUnavailable):
                self._give_up(exc)  # whether the topic is empty cannot be known
            else:
                log.warning("claim failed: %s", exc, exc_info=not isinstance(exc, SimpleQueueError))
        finally:  # answered, failed or cancelled: later claims must not wait for it
            # The jobs' leases count on this clock (no clock skew enters it),
            # from when the answer came less how long before it the broker
            # began them (_Answered.lease_start). A broker that does not say
            # began them as it applied the claim, before its write (which a
            # slow or retried PUT may make last most of a lease): a claim that
            # did not long-poll counts from when it was sent; a long poll, of
            # which only the answer tells when it claimed, from when that
            # came. So does a claim sent more than once from when it was
            # first sent: it may be answered the jobs an earlier try claimed
            # (its answer lost), committed up to the client's timeout before.
            since = answering.first_sent if answering.repeated or not polled else time.monotonic()
            came = answering.answered or time.monotonic()  # 0.0: no call answered
            first = answering.first_sent or sent
            self._answers[seq] = (count, jobs, _Answered(first, since, came, answering.now))
            self._deliver()
        if hold > 0:
            with contextlib.suppress(TimeoutError):  # hold this claim's place a while
                async with asyncio.timeout(hold):
                    await self._stopping.wait()

    async def _take_back(self, count: int, attempt_id: str) -> None:
        """Give back what the claim `attempt_id`, cancelled by a stop, was
        answered: the broker may have claimed the jobs, its answer on its way.
        Asked again under its name (without waiting), the broker answers the
        jobs it holds for it; had it not landed, this claims anew what it can,
        which goes back just the same. Asked for TAKE_BACK_WITHIN seconds at
        most: the stop waits for it, and most claims a stop cuts short had
        claimed nothing (an idle worker's long poll), so a broker that does not
        answer must not hold the stop for the client's whole retry budget; a
        claim cut short in turn is given back by the broker, as the first was.
        The jobs it gets are given back as any others (_give_back)."""
        try:
            async with calls_within(TAKE_BACK_WITHIN):
                jobs = await self._claim_many(count, attempt_id)
        except Exception as exc:  # TimeoutError too
            log.warning(
                "a claim cut short by the stop: its jobs are left to their leases (%s)",
                _why(exc, TAKE_BACK_WITHIN),
            )
            return
        await self._give_back(self._not_held(jobs))

    async def _held_back(self, count: int, attempt: list[str]) -> list[Job]:
        """Burst: a claim that found nothing while jobs are pending was held back
        by the topic's limits (its rate, max_claimed), the topic not empty: it
        is claimed again in long polls, which wait for a token or a slot. []
        once no job is pending, or the topic is paused (max_claimed 0).
        Delayed jobs, this worker's failed jobs' retries among them, are left
        for a later run, as RQ's burst mode leaves scheduled jobs: one delayed
        an hour, or a job failing for ever, would keep it up. Each claim's
        name goes in `attempt` (for _take_back). Once jobs came, the claims
        after it long-poll (_rationed), until one finds nothing."""
        self._rationed = False
        while (await self.client.status())["pending"] > 0:
            settings = await self.client.settings()
            self._learn(settings)
            if settings.get("max_claimed") == 0:
                log.info("the topic is paused (max_claimed 0): stopping (burst)")
                return []
            # A second (the long poll answers as soon as a token or a slot is
            # there; another claim of this worker may take the jobs meanwhile).
            attempt[0] = api.new_id()
            jobs = await self._claim_many(count, attempt[0], HELD_BACK_WAIT)
            if jobs:
                self._rationed = True
                return jobs
        return []

    def _give_up(self, exc: SimpleQueueError) -> None:
        """Stop claiming for good: run() drains the jobs in hand, then raises `exc`."""
        log.error("claim failed: %s; stopping", exc)
        if self._failed is None:
            self._failed = exc
        self._stopping.set()
        self._room.set()

    def _claim_done(self, seq: int, count: int, claim: asyncio.Task[None]) -> None:
        self._claims.discard(claim)
        self._room.set()  # its place is free: the loop may send another
        if seq >= self._delivered and seq not in self._answers and seq not in self._ahead:
            # Cancelled before its first step (a stop in the same turn of the
            # loop that sent it), its body never ran, nor the `finally` that
            # hands its answer over: the claims after it would wait behind it
            # for good, and its count stay asked.
            self._answers[seq] = (count, None, None)
            self._deliver()

    def _deliver(self, late: bool = False) -> None:
        """Buffer the jobs of every answered claim sent before any unanswered
        one, or when `late` (ORDER_GRACE after an answer came behind one)
        every answered one; then stop if the topic is empty (burst) or
        max_jobs were claimed."""
        found_nothing = False
        while True:
            if self._delivered in self._ahead:
                self._ahead.discard(self._delivered)
                self._delivered += 1
                continue
            if self._delivered in self._answers:
                seq = self._delivered
                self._delivered += 1
            elif late and self._answers:
                seq = min(self._answers)
                self._ahead.add(seq)
            else:
                break
            count, jobs, answered = self._answers.pop(seq)
            self._asked -= count
            if jobs is None:  # a failed claim says nothing of the topic
                self._dry = False
                continue
            jobs = self._not_held(jobs)
            if self._signalled:  # claimed ahead, answered after a signal: they go back
                self._taken += len(jobs)
                self._give_back_later(jobs)
                continue
            found_nothing = found_nothing or not jobs
            self._taken += len(jobs)
            assert answered is not None  # jobs come with an answer
            loop = asyncio.get_running_loop()
            for job in jobs:
                # Heartbeats go HEARTBEAT_MIN apart at least: a shorter lease
                # (a topic's setting may say 0.001) is kept here as long as
                # they land, or every job would be taken for lost as it ends.
                lease = max(self._lease_of(job), 2 * HEARTBEAT_MIN)
                start = answered.lease_start(job)
                held = _Claimed(job, lease, start + lease)
                # At once if a third of the lease passed before the answer came.
                due = start + self._heartbeat_interval(job) - time.monotonic()
                held.first_beat = loop.call_later(max(0.0, due), self._start_beats, held)
                self._ready.append(held)
        if self._answers and self._waiting_order is None:
            loop = asyncio.get_running_loop()
            self._waiting_order = loop.call_later(ORDER_GRACE, self._deliver_late)
        self._start_ready()
        self._room.set()
        if self.burst and found_nothing:
            # A job still running may give its job back (a nack): claim again
            # when one ends, and stop only once nothing runs or waits here.
            self._dry = True
            if not (self._running or self._ready or self._asked or self._follow_ups_unsettled):
                log.info("the topic is empty: stopping (burst)")
                self.request_stop()
        if self.max_jobs is not None and self._taken >= self.max_jobs:
            self.request_stop()

    def _deliver_late(self) -> None:
        """An answer waited ORDER_GRACE behind an earlier claim's: buffered now."""
        self._waiting_order = None
        self._deliver(late=True)

    def _not_held(self, jobs: list[Job]) -> list[Job]:
        """`jobs` less those this worker holds already under the same lease
        (buffered, running or acking), each once: a claim answered with a job
        twice, or with one it holds (a broker's or a proxy's fault), must not
        run it twice at once, nor give back the lease of the one running. A
        job held under another lease token was claimed anew (given back
        meanwhile): the lease held is lost, as its next heartbeat finds."""
        holding = (*self._ready, *self._holding.values(), *self._acking)
        held = {(h.job.id, h.job.lease_token) for h in holding}
        kept: list[Job] = []
        for job in jobs:
            if (job.id, job.lease_token) in held:
                log.warning("job %s: claimed again while this worker holds it: skipped", job.id)
                continue
            held.add((job.id, job.lease_token))
            kept.append(job)
        return kept

    async def _claim_many(self, count: int, attempt_id: str, wait: float = 0.0) -> list[Job]:
        """This worker's claim of up to `count` jobs, named `attempt_id`: under
        its id and lease, and never answered (nor releasing) the jobs it holds
        as the answer comes (_HeldNow)."""
        return await self.client.claim_many(
            self.worker_id,
            count,
            lease=self.lease,
            wait=wait,
            attempt_id=attempt_id,
            held=_HeldNow(self),
        )

    def _held_pairs(self) -> set[tuple[str, str | None]]:
        """The (id, lease_token) pairs of the jobs this worker holds: buffered,
        running or acking, and those of claims answered that wait for an
        earlier claim's answer (_deliver)."""
        holding = (*self._ready, *self._holding.values(), *self._acking)
        pairs = {(h.job.id, h.job.lease_token) for h in holding}
        for _, jobs, _ in self._answers.values():
            pairs.update((job.id, job.lease_token) for job in jobs or ())
        return pairs

    def _start_ready(self) -> None:
        # A handler that took back the slot it lent (stop() cut short) counts
        # again: with the job it lent it to, they may be over the concurrency,
        # and none starts until they are within it.
        while self._ready and len(self._running - self._lent) < self.concurrency:
            held = self._ready.popleft()
            task = asyncio.create_task(
                self._process(held), name=f"job:{held.job.id}", context=self._context.copy()
            )
            self._running.add(task)
            self._holding[task] = held
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._holding.pop(task, None)
        self._parked.discard(task)
        self._lent.discard(task)
        self._one_finished.set()
        self.ahead.ended()
        self._dry = False
        self._start_ready()
        self._room.set()
        if not self._running and not self._ready:
            self._idle.set()

    async def _process(self, held: _Claimed) -> None:
        job = held.job
        if not held.lost and time.monotonic() >= held.lease_ends:
            # Its lease ran out in the buffer unrenewed (the loop held up past
            # it: CPU work in an async handler, a GC pause), before any
            # heartbeat noticed: taken for lost, as they would take it,
            # neither acked nor nacked. The broker may have given it to
            # another worker, who may be running it now.
            held.lost = True
            await self._stop_beats(held)
        if held.lost:
            log.warning("job %s: %s before it started", job.id, _why_gone(held))
            return
        if held.interrupted:  # stopped now, before its handler started
            await self._stop_beats(held)
            await self._give_back([job])
            return
        _handling.set((self, asyncio.current_task(), held))  # the handler's task copies it
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="simplequeue-job")
        run_jobs_on(self._pool, held)  # held.in_thread while a thread runs it
        work = held.work = asyncio.ensure_future(self._handle(job))
        failure: Exception | None = None
        acking = False
        try:
            ack = _ack_of(job, await self._within_timeout(work, held))
            acking = not held.lost
        except asyncio.CancelledError as exc:
            # This task cancelled (run() cancelled): on up, the job left to its
            # lease. The handler cancelled by a heartbeat that found the lease
            # lost, or by a second signal: handled below. Else the handler
            # raised a CancelledError of its own (of a task or future it
            # awaited): it failed.
            if _cancelled_from_outside():
                raise
            if held.lost:
                log.warning("job %s: %s; its handler was cancelled", job.id, _why_gone(held))
                return
            if held.interrupted:
                failure = Interrupted("the worker was stopped before the job finished")
            else:
                failure = HandlerCancelled("the handler raised CancelledError")
                failure.__cause__ = exc
        except Exception as exc:
            failure = exc
        finally:
            # Its lease ran out unrenewed and no heartbeat noticed yet (one
            # still out, or none due yet): taken for lost, as a heartbeat would
            # take it, neither acked nor nacked. The broker may have given the
            # job to another worker.
            if time.monotonic() >= held.lease_ends:
                held.lost, acking = True, False
            # Before a nack: a heartbeat still out when the job is given back
            # would be answered LeaseLost. Not before an ack: the lease is
            # renewed until the ack is answered (below).
            if not acking:
                await self._stop_beats(held)
        if isinstance(failure, HandlerExited):
            # Asked of the process, not of this job: stop as on a signal
            # (before the nack, so that no job ahead starts meanwhile).
            if self._exited is None:
                self._exited = failure.raised
            if not self._signalled:
                self._on_signal(f"job {job.id}: {failure}")
        if failure is not None:
            if held.lost:  # the handler ended as it was being cancelled: not ours to fail
                log.warning("job %s: %s; its handler raised %r", job.id, _why_gone(held), failure)
                return
            if held.interrupted:  # whatever it raised as it was cancelled: pending again now
                log.warning("job %s: interrupted on attempt %s", job.id, job.attempts)
                error = "".join(traceback.format_exception_only(Interrupted(str(failure))))
                self.given_back += 1
                # Bounded: a stop asked for now must not wait out the client's
                # retry budget (twice its timeout) on a broker that does not answer.
                nack = self.client.nack(job, 0, error.strip())
                await self._settle(job, nack, within=TAKE_BACK_WITHIN)
                return
            await self._fail(job, failure)
            return
        if held.lost:  # the handler swallowed its cancellation: its result is not wanted
            log.warning("job %s: %s; its result is dropped", job.id, _why_gone(held))
            return
        if ack.follow_ups:
            self._follow_ups_unsettled += 1
        # The slot is free now; the ack rides the next batch. Until it is
        # answered the heartbeats go on: an ack queued or slow past the lease
        # would let the job be claimed and run again. (One out when the ack
        # lands is answered LeaseLost, which is then nobody's concern.)
        self._acking.add(held)
        acked = self._acks.post(ack)
        acked.add_done_callback(lambda _: self._acked(held, bool(ack.follow_ups)))

    def _acked(self, held: _Claimed, follow_ups: bool) -> None:
        """`held`'s ack was answered, or failed, or was aborted (a second
        signal): its lease is no longer ours to keep, and its follow-ups are
        settled. Counted here, not where a batch is sent: an ack aborted
        while queued never is, and counted unsettled for good it would keep a
        burst Worker run again from ever finding the topic empty."""
        if follow_ups:
            self._follow_ups_unsettled -= 1
            self._dry = False  # a burst worker that found the topic empty looks again
            self._room.set()
        if held in self._acking:
            self._acking.discard(held)
            _cancel_beats(held)

    async def _within_timeout(self, work: asyncio.Future[Any], held: _Claimed) -> Any:
        """`work`'s result; TimeoutError saying so once it has run `timeout` s
        (it is cancelled then). A TimeoutError of the handler's own passes as is.
        A handler running in a thread then cannot be stopped: it is waited for,
        the job's lease kept (given back, it could run twice at once), what it
        handed back to run here cancelled, and the job fails whatever it returned."""
        if self.timeout is None:
            return await work
        try:
            done, _ = await asyncio.wait([work], timeout=self.timeout)
        except asyncio.CancelledError:
            work.cancel()  # run() cancelled: as `await work` would
            raise
        if done:
            return work.result()
        if held.in_thread:
            log.warning(
                "job %s: its handler ran past its timeout of %g s in a thread, which cannot"
                " be stopped: the job fails when it returns",
                held.job.id,
                self.timeout,
            )
            await held.thread_returned()
        work.cancel()
        await asyncio.wait([work])
        raise TimeoutError(f"the handler timed out after {self.timeout:g} s")

    async def _handle(self, job: Job) -> Any:
        """The handler's result for `job`. Whatever it raises, from the call on,
        fails the job: SystemExit and KeyboardInterrupt as HandlerExited
        (raised as they are, they would end the event loop from this task);
        GeneratorExit as a RuntimeError from it (raised on, the job was
        neither nacked nor logged, left to its lease). That is no request of
        the process's: a generator's, leaked; the Worker goes on. But one
        thrown in by close() (this coroutine dropped unfinished, not run by
        its task) is raised on, as a closed coroutine must."""
        task = asyncio.current_task()
        try:
            return await self._call_handler(job)
        except (Exception, asyncio.CancelledError):
            raise
        except GeneratorExit as exc:
            if _current_task() is not task:
                raise
            raise RuntimeError("the handler raised GeneratorExit") from exc
        except BaseException as exc:
            raise HandlerExited(exc) from exc

    async def _call_handler(self, job: Job) -> Any:
        if self._in_thread:
            result = await in_thread(self.handler, job)
            # A plain function may hand back a coroutine (a lambda around an
            # async def): acking with the coroutine object would send nothing.
            return await result if inspect.isawaitable(result) else result
        started = self.handler(job)
        if not inspect.isawaitable(started):
            raise TypeError(
                f"the handler returned {type(started).__name__}, not an awaitable: a handler"
                " is an async def, a plain def (run in a thread), or returns an awaitable"
            )
        return await started

    async def _fail(self, job: Job, exc: Exception) -> None:
        """Log the handler's failure with its traceback and nack the job with the
        error (what the broker keeps of it: api.MAX_ERROR characters), to run
        again after the backoff (or go dead when its attempts are spent)."""
        self.failed += 1
        error = "".join(traceback.format_exception_only(exc)).strip()
        log.error("job %s failed on attempt %s: %s", job.id, job.attempts, error, exc_info=exc)
        try:
            delay = float(self.retry_delay(job, exc))  # None, or no number: TypeError
        except Exception:
            log.exception("job %s: retry_delay failed: the backoff's delay instead", job.id)
            delay = self.backoff.delay(job.attempts or 1)
        # What the broker takes (a delay of 0 to a year): a nack it refused
        # would leave the job to its lease, with no backoff and no error kept.
        delay = min(max(delay, 0.0), api.MAX_DELAY) if math.isfinite(delay) else api.MAX_DELAY
        within = TAKE_BACK_WITHIN if self._signalled >= 2 else None
        # What the broker keeps of the error (the log has it whole): sent whole,
        # one quoting a large payload could be over its --max-body, the nack
        # refused and the job left to its lease, its error not kept.
        nack = self.client.nack(job, delay, error[: api.MAX_ERROR])
        await self._settle(job, nack, within)

    def retry_delay(self, job: Job, error: Exception) -> float:
        """Seconds before a failed job may run again: the backoff's for its
        attempt. A subclass may choose by the error (the CLI gives back at once
        a job whose command could not start: the fault is the worker's)."""
        return self.backoff.delay(job.attempts or 1)

    @staticmethod
    async def _stop_beats(held: _Claimed) -> None:
        beats = _cancel_beats(held)
        if beats is not None:
            # wait(), not await: the heartbeats' CancelledError is theirs, and a
            # cancellation of this task meanwhile must not be swallowed with it.
            await asyncio.wait([beats])

    async def _settle(self, job: Job, call: Awaitable[Any], within: float | None = None) -> None:
        """Await the ack or nack `call` (`within` seconds at most), logging
        what it failed with; after a second signal (it may come meanwhile),
        TAKE_BACK_WITHIN seconds at most: a broker that does not answer must
        not hold up a stop asked for now. Then the job is left to its lease."""
        if not await self._unless_stopped_now(self._settled(job, call, within)):
            log.warning(
                "job %s: unanswered %g s after the second signal: left to its lease",
                job.id,
                TAKE_BACK_WITHIN,
            )

    async def _unless_stopped_now(self, waited: Awaitable[Any]) -> bool:
        """Await `waited`; after a second signal (it may come meanwhile),
        TAKE_BACK_WITHIN seconds more at most, then it is cancelled: whether
        it ended (False: cut short, what it waited for left to the leases)."""
        future = asyncio.ensure_future(waited)
        now = asyncio.ensure_future(self._now.wait())
        try:
            await asyncio.wait([future, now], return_when=asyncio.FIRST_COMPLETED)
            if not future.done():
                await asyncio.wait([future], timeout=TAKE_BACK_WITHIN)
        finally:
            now.cancel()
            ended = future.done()
            future.cancel()
        return ended

    async def _settled(self, job: Job, call: Awaitable[Any], within: float | None) -> None:
        """_settle()'s `call`, awaited within `within` seconds."""
        try:
            async with calls_within(within):
                await call
        except (LeaseLost, JobNotFound) as exc:
            log.warning("job %s: could not settle: %s", job.id, exc)
        except Exception as exc:
            log.error(
                "job %s: could not settle (it will be redelivered): %s",
                job.id,
                _why(exc, within),
                exc_info=not isinstance(exc, SimpleQueueError | TimeoutError),
            )

    async def _flush_acks(self) -> None:
        """Wait until the acks posted are answered; after a second signal (it
        may come meanwhile), TAKE_BACK_WITHIN seconds at most: the jobs of
        those still unanswered are left to their leases."""
        await self._unless_stopped_now(self._acks.flush())  # it shields the batch in flight
        if self._acks.busy:  # stopped now, acks unanswered
            log.warning(
                "%d acks unanswered %g s after the second signal: their jobs are left"
                " to their leases",
                len(self._acking),
                TAKE_BACK_WITHIN,
            )
            self.unacked += len(self._acking)
            await self._acks.abort(
                BrokerUnavailable("the worker stopped before its ack was answered")
            )

    async def _send_acks(self, batch: list[Pending[_Ack, str]]) -> list[str | BaseException]:
        """The batch's acks, in requests of ACK_BATCH_BYTES at most (sent as one
        whatever their results weigh, a burst of large ones would be over the
        broker's --max-body, refused and halved down to requests that fit,
        every burst). Each ack's outcome is the status the broker answered it
        with. Nobody waits on them: failures are logged here, a request that
        fails fails the rest of the batch with it, unsent (the broker could
        not be reached, its retries spent), and an ack the broker refused as
        invalid fails its job. Each request's acks are settled as it is
        answered (_ack_part), not with the batch: their jobs are no longer
        held (_acked), so a second signal while a later request is unanswered
        aborts only the acks that did not land, and a request that fails
        fails only those (the half of a request refused whole that landed
        before it counts as landed)."""
        outcomes: list[str | BaseException] = []
        for run in runs_within(batch, _size_of, ACK_BATCH_BYTES):
            try:
                outcomes += await in_halves(self._ack_part, run, refused_whole)
            except Exception as exc:
                failed = sum(not pending.future.done() for pending in batch)  # unanswered
                log.error(
                    "%d acks failed (their jobs will be redelivered): %s",
                    failed,
                    exc,
                    exc_info=not isinstance(exc, SimpleQueueError),
                )
                self.unacked += failed
                # Those answered already keep their outcome (Pending.settle).
                return [*outcomes, *[exc] * (len(batch) - len(outcomes))]
        return outcomes

    async def _ack_part(self, part: list[Pending[_Ack, str]]) -> list[str]:
        """Send `part`'s acks in one request and settle each with its outcome
        once it is answered: a later request that fails does not fail them. A
        request of several refused as a whole (refused_whole: a 400, or a 413
        of the broker's or of a proxy's, over a --max-body lower than its
        default, or follow-ups too large for it, say) raises, to go again in
        halves (in_halves), so that only the ack at fault fails, refused
        alone: sent again it would be refused again."""
        acks = [pending.item for pending in part]
        answers: list[dict[str, Any] | Exception]
        try:
            answers = list(
                await self.client.ack_many((a.job, a.result, a.follow_ups) for a in acks)
            )
        except Exception as exc:
            if len(part) > 1 or not refused_whole(exc):
                raise
            answers = [exc]
        outcomes = await self._answered(acks, answers)
        for pending, outcome in zip(part, outcomes, strict=True):
            pending.settle(outcome)
        return outcomes

    async def _answered(
        self, acks: list[_Ack], answers: list[dict[str, Any] | Exception]
    ) -> list[str]:
        """Each of `acks`' outcome, as the broker answered it (`answers`)."""
        outcomes: list[str] = []
        for job, answer in zip((ack.job for ack in acks), answers, strict=True):
            if isinstance(answer, Exception) or answer.get("status") == "invalid":
                # Refused, it changed nothing: the job is still held, and
                # failing it now says why, where waiting out its lease would not.
                why = str(answer) if isinstance(answer, Exception) else answer.get("error")
                await self._fail(job, InvalidRequest(f"the broker refused the ack: {why}"))
                outcomes.append("invalid")
                continue
            status = answer.get("status")
            if status == "completed":
                self.processed += 1
            elif status == "cancelled":  # as it ended: nothing more is owed
                log.info("job %s: cancelled before its ack", answer.get("id"))
            else:
                self.unacked += 1
                log.warning("job %s: could not ack: %s", answer.get("id"), answer.get("error"))
            outcomes.append(str(status))
        return outcomes

    def _heartbeat_interval(self, job: Job) -> float:
        """`heartbeat_every`, or a third of the lease the broker gave `job`;
        half that lease at most (a topic's lease may be lowered under a
        Worker's `heartbeat_every`: the first heartbeat would be due after the
        lease ran out); HEARTBEAT_MIN at least."""
        lease = self._lease_of(job)
        every = lease / 3 if self.heartbeat_every is None else min(self.heartbeat_every, lease / 2)
        return max(HEARTBEAT_MIN, every)

    def _lease_of(self, job: Job) -> float:
        """The lease the broker gave `job`, and gives each heartbeat of it, in
        the broker's own clock (so that no clock skew enters it): from when the
        lease counts (heartbeat_at, which a broker sets a little after
        claimed_at, by its clock's error) to when it ends; without those
        times, `lease` or the broker's default. api.MAX_LEASE at most, the
        longest a broker gives: a garbage span (1e300) would mean no
        heartbeat, and no lease ever taken for lost, while the job runs."""
        lease = self.lease or FALLBACK_LEASE
        expires = job.lease_expires_at
        start = job.heartbeat_at if job.heartbeat_at is not None else job.claimed_at
        if expires is not None and start is not None and expires > start:
            lease = min(expires - start, api.MAX_LEASE)
        return lease

    def _start_beats(self, held: _Claimed) -> None:
        """The first heartbeat is due (its timer, set at the claim, fired)."""
        held.first_beat = None
        held.beats = asyncio.create_task(self._heartbeats(held))

    def _trim_buffer(self, due: _Claimed) -> bool:
        """A heartbeat of `due` is due: if it waits in the buffer and the buffer
        holds more than its size now (ClaimAhead shrank it as jobs slowed
        down, or the topic has a rate or max_claimed now), the jobs past the
        size, the last to run, are given back (one request for them all:
        pending at once, the attempt uncounted) rather than renewed while
        they wait their turn, every third of their lease, with idle workers
        elsewhere. Not while stopping: stop() runs the jobs claimed. Whether
        `due` was among them (its heartbeats end: its caller's task)."""
        excess = len(self._ready) - self.buffer_size
        if excess <= 0 or due.work is not None or self._stopping.is_set():
            return False
        if due not in self._ready:  # started: its task is about to run it
            return False
        extra = [self._ready.pop() for _ in range(excess)]
        extra.reverse()
        for held in extra:
            if held is not due:  # `due`'s heartbeats are its caller's, which ends them
                _cancel_beats(held)
        self._taken -= len(extra)  # not run: max_jobs does not count them
        log.info(
            "giving back %d jobs claimed ahead: the buffer holds %d at most now",
            len(extra),
            self.buffer_size,
        )
        self._give_back_later([held.job for held in extra])
        self._room.set()
        if not self._running and not self._ready:
            self._idle.set()
        return any(held is due for held in extra)

    async def _heartbeats(self, held: _Claimed) -> None:
        """Renew the lease now (the first heartbeat is due), then every interval,
        waiting in the buffer included; if the lease is lost, drop the job or
        cancel its handler. Any other failure is logged and the next heartbeat
        goes out on time: the lease is still this worker's until it runs out,
        and a loop that ended here would let it run out while the handler runs
        on (the job then ran twice). Once it has run out unrenewed (on this
        clock: from when it began, _Answered.lease_start, or from when the
        last renewal that landed began, _renewed_until), it is taken for lost
        too: the broker may have given the job to another worker."""
        out: set[asyncio.Task[bool]] = set()
        try:
            lost = await self._beat_until_lost(held, out)
        finally:
            for beat in out:
                beat.cancel()
            if out:
                await asyncio.wait(out)
        if lost:
            await self._lose(held)

    async def _beat_until_lost(self, held: _Claimed, out: set[asyncio.Task[bool]]) -> bool:
        """Send `held`'s heartbeats, each in a task of its own in `out`, until
        one says the lease is lost or it ran out with none landing (True), or
        the job, waiting in the buffer, was given back (_trim_buffer: False).
        They overlap, HEARTBEATS_IN_FLIGHT at most: each has until the lease's
        end (_heartbeat), and the next goes out when it is due all the same."""
        every = self._heartbeat_interval(held.job)
        while True:
            if self._trim_buffer(held):
                return False
            due = time.monotonic() + every
            if len(out) < HEARTBEATS_IN_FLIGHT:
                out.add(asyncio.create_task(self._heartbeat(held)))
            # Until the next is due, or the lease's end (which those that land move).
            while (left := min(due, held.lease_ends) - time.monotonic()) > 0:
                if not out:
                    await asyncio.sleep(left)
                    continue
                done, _ = await asyncio.wait(out, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                out.difference_update(done)
                if not all(beat.result() for beat in done):
                    return True
            if time.monotonic() >= held.lease_ends:
                log.warning("job %s: its lease ran out unrenewed: taken for lost", held.job.id)
                return True

    async def _heartbeat(self, held: _Claimed) -> bool:
        """One heartbeat of `held`'s job: False if the broker says its lease is
        lost (or the job cancelled). It has a lease's length from when it is
        sent, what a renewal it carries lasts at most: one answered after the
        next was due (a slow write, a slow way back) still renews the lease,
        and moves its end (_renewed_until), while one left unanswered (a lost
        packet, a stuck proxy) is given up by then, not after the client's own
        timeout (30 s, a whole default lease); and once the lease has run out
        unrenewed, _heartbeats cancels those still out. Not the lease's end as
        it is when sent: those sent before an earlier one landed would give up
        at the end it moved, each answered late, and the lease would run out
        renewed (from a broker that says no Simplequeue-Now, where a renewal
        counts from its send). Not an asyncio.timeout alone: one as long as
        the client's timeout would be lost (calls_within). Any other failure
        is logged."""
        sent = time.monotonic()
        within = max(HEARTBEAT_MIN, self._lease_of(held.job))
        try:
            async with calls_within(within):
                await self.client.heartbeat(held.job, self.lease)
        except (LeaseLost, JobNotFound) as exc:
            held.cancelled = isinstance(exc, JobCancelled)
            return False
        except Exception as exc:
            unanswered = isinstance(exc, TimeoutError) and time.monotonic() >= sent + within
            log.warning(
                "job %s: heartbeat failed (%.3g s of its lease left): %s",
                held.job.id,
                max(0.0, held.lease_ends - time.monotonic()),
                f"no answer in {within:.3g} s" if unanswered else exc,
                exc_info=not isinstance(exc, SimpleQueueError | TimeoutError),
            )
            return True
        # The latest renewal wins, whichever order their answers came in.
        held.lease_ends = max(held.lease_ends, _renewed_until(held, sent))
        return True

    async def _lose(self, held: _Claimed) -> None:
        """`held`'s lease is gone (lost, or run out unrenewed), or its job was
        cancelled: drop the job if it did not start, else cancel its handler."""
        held.lost = True
        if held.work is not None:
            if held.in_thread:
                # A thread cannot be stopped: its slot stays taken until it
                # returns (else the next job would run beside it, past the
                # concurrency), and its result is dropped.
                log.warning(
                    "job %s: %s; its handler runs in a thread, which cannot be"
                    " stopped: its result will be dropped",
                    held.job.id,
                    _why_gone(held),
                )
                await held.thread_returned()
            held.work.cancel()  # what runs here (what the thread handed back)
        elif held in self._ready:
            log.warning("job %s: %s before it started", held.job.id, _why_gone(held))
            self._ready.remove(held)
            self._room.set()
            if not self._running and not self._ready:
                self._idle.set()
        # else: its task is about to start; _process sees `lost` and skips it


class _Signals:
    """SIGTERM and SIGINT stop every Worker running on an event loop: one
    handler per signal and loop, installed when the first Worker starts and
    removed when the last returns, the handler found before it set back. A
    signal the application handles already (its own handler, or SIG_IGN) is
    left to it: it calls stop() itself."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._workers: dict[asyncio.AbstractEventLoop, set[Worker]] = {}
        # The signals handled for a loop's Workers, with the handler each had.
        self._installed: dict[asyncio.AbstractEventLoop, list[tuple[signal.Signals, Any]]] = {}

    def join(self, loop: asyncio.AbstractEventLoop, worker: Worker) -> None:
        if loop not in self._workers:
            installed = []
            for sig in self.SIGNALS:
                if _handled_already(sig):
                    log.info("%s has a handler already: it is left to it", sig.name)
                    continue
                found = signal.getsignal(sig)
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, self._stop_all, loop)
                    installed.append((sig, found))
            self._workers[loop], self._installed[loop] = set(), installed
        self._workers[loop].add(worker)

    def leave(self, loop: asyncio.AbstractEventLoop, worker: Worker) -> None:
        workers = self._workers.get(loop)
        if workers is None:
            return
        workers.discard(worker)
        if not workers:
            del self._workers[loop]
            for sig, found in self._installed.pop(loop):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
                    # It leaves SIGINT to default_int_handler: asyncio.run()'s
                    # (cancel the main task, then raise KeyboardInterrupt) would
                    # be gone for the rest of the program. None: a handler not
                    # set from Python, which cannot be set back.
                    if found is not None:
                        signal.signal(sig, found)

    def _stop_all(self, loop: asyncio.AbstractEventLoop) -> None:
        for worker in list(self._workers.get(loop, ())):
            worker._on_signal()


def _handled_already(sig: signal.Signals) -> bool:
    """Whether the application has its own handler for `sig` (or ignores it).
    Python's default SIGINT handler, and asyncio.run()'s, are no one's."""
    current = signal.getsignal(sig)
    if current in (signal.SIG_DFL, signal.default_int_handler, None):
        return False
    while isinstance(current, functools.partial):  # asyncio.run()'s is one
        current = current.func
    return not isinstance(getattr(current, "__self__", None), asyncio.Runner)


_signals = _Signals()


def _cancel_beats(held: _Claimed) -> asyncio.Task[None] | None:
    """Cancel `held`'s first-heartbeat timer and its heartbeats; the task of
    those, if it was running (it ends at its next step)."""
    if held.first_beat is not None:
        held.first_beat.cancel()
        held.first_beat = None
    if held.beats is None or held.beats.done():
        return None
    held.beats.cancel()
    return held.beats


def _renewed_until(held: _Claimed, sent: float) -> float:
    """When `held`'s lease, renewed by a heartbeat sent at `sent`, runs out on
    this clock at the earliest: a lease from `sent` (the broker renewed it
    after that, and reaps only past its end on the earliest its clock may
    say). Not from when the answer was read, less what the broker said was
    left: read long after it came (the loop held up by blocking work in a
    handler), that put the end seconds past the broker's, and a buffered
    job whose lease had run out meanwhile could be started. Nor from `sent`
    less what the broker said was left: its `now` comes after its write of
    the renewal, which the lease counts from, so each slow write (0.36 of
    the lease) cut the lease short until a live one was taken for lost
    (review of round 34's change)."""
    return sent + held.lease


def _why(exc: Exception, within: float | None) -> str:
    """What `exc` says, or that no answer came `within` seconds (a TimeoutError)."""
    if isinstance(exc, TimeoutError) and within is not None:
        return f"no answer in {within:g} s"
    return str(exc) or type(exc).__name__


def _why_gone(held: _Claimed) -> str:
    return "was cancelled" if held.cancelled else "lost its lease"


def _current_task() -> asyncio.Task[Any] | None:
    """The task running now; None outside one, or with no loop running (a
    coroutine closed as it is collected)."""
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def _is_plain_function(handler: Handler) -> bool:
    """Whether `handler` is a function or method written with a plain `def` (or a
    functools.partial of one): it runs in a thread. Coroutine functions, and
    objects whose __call__ is one, run on the event loop; so does any other
    callable, which must then return an awaitable."""
    target: Any = handler
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(type(target).__call__):
        return False
    return inspect.isfunction(target) or inspect.ismethod(target)


def _ack_of(job: Job, returned: Any) -> _Ack:
    """What a handler's return value acks `job` with: its result and
    follow-ups, and about how many bytes they add to an ack request. Raises
    (failing the job) for what could not be sent: a result or a follow-up
    that is not JSON, or a follow-up spec that is not valid."""
    size = ACK_FIELDS_BYTES + len(job.id) + len(job.lease_token or "")
    follow_ups = None
    if isinstance(returned, Done):
        result, follow_ups = returned.result, follow_up_specs(returned.enqueue)
        size += _sendable_size(follow_ups, "a follow-up job")
    else:
        result = returned
    size += _sendable_size(result)
    return _Ack(job, result, follow_ups, size)


def _sendable_size(result: Any, what: str = "the handler's result") -> int:
    """`result`'s size encoded into the ack request; raises unless it can be:
    a result that cannot would fail every ack of the batch it rides in, not
    just its own."""
    try:
        return len(encode(result))
    except UNSENDABLE as exc:
        raise TypeError(f"{what} cannot be sent as JSON: {exc}") from None


def _size_of(pending: Pending[_Ack, str]) -> int:
    return pending.item.size


#: In a job's task, and the tasks of its handler: the worker, that task, the job.
_handling: contextvars.ContextVar[tuple[Worker, asyncio.Task[Any] | None, _Claimed] | None] = (
    contextvars.ContextVar("simplequeue_handling", default=None)
)


def _cancelled_from_outside() -> bool:
    """Whether the running task was asked to cancel (its own cancellation, not
    that of a task or future it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


ACK_GATHER_TURNS = 3


async def _let_a_burst_gather() -> None:
    """Short jobs end in bursts, over a few turns of the event loop (each one
    that ends starts the next from the buffer): let the burst's acks gather
    before a batch is taken, so that it takes one request and one write, not two."""
    for _ in range(ACK_GATHER_TURNS):
        await asyncio.sleep(0)
