"""The async client: every operation of the HTTP API, typed, over one aiohttp session.

It never waits for ever and never takes a failure for success, whatever the
broker or anything between them answers:
- connection failures, timeouts, bodies cut short and 408/502/503/504
  answers are retried with tenacity (bounded, jittered: `retries` tries, each
  started within `retry_budget`, by default twice `timeout`, of the call's
  start and the wait it asked for, if any); a client made by `discover` re-reads
  broker.json when its broker stops answering (or a proxy answers 502-504 in
  its place), and while it names no live broker (a hand-over under way, or
  the broker it names refuses the connection: killed, not yet taken over)
  those tries count against the budget, not against `retries`;
- every other failure raises an error of simplequeue.errors: the class the
  broker's status stands for (errors.for_status), or BrokerError with the
  status for anything the API does not answer (a proxy's 500, an HTML page);
- answers are decoded into the API's types (simplequeue.api): one that is not
  what the route answers is a BrokerError, never a KeyError, and so is one
  naming other jobs than the request did (an earlier answer, replayed), and
  one larger than the client's `max_answer` (MAX_ANSWER, 1 GiB, by default),
  left unread;
- cancellation is never caught;
- the calls made in a `calls_within(seconds)` block end within it, their
  tries included: the bound is each try's own HTTP timeout, so it holds
  where an asyncio.timeout of the same length is lost in aiohttp's.
A look-up that waits (`job(id, wait=S)`, `result`) is a series of long polls
of at most api.MAX_WAIT seconds each, every one with an HTTP timeout that
allows for its wait.
Enqueue sends a client-made id when none is given, so a retried enqueue whose
first try landed is answered as a duplicate, never enqueued twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)
from yarl import URL

from simplequeue import api, errors, keys
from simplequeue.api import Job
from simplequeue.batching import Batcher, Pending, in_halves
from simplequeue.client.discovery import find_broker
from simplequeue.client.followups import follow_up_specs, job_spec, unix_time
from simplequeue.client.lists import id_list, job_list
from simplequeue.errors import (
    BrokerError,
    BrokerUnavailable,
    IncompleteAnswer,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobNotFound,
    LeaseLost,
    ScheduleNotFound,
    SimpleQueueError,
)
from simplequeue.objstore import ObjectStore, store_from_url
from simplequeue.retrying import first_then_retrying

A = TypeVar("A")
T = TypeVar("T")
#: The answers that name the job they settle (ack, nack; heartbeat).
S = TypeVar("S", api.Settled, api.Renewed)

log = logging.getLogger("simplequeue.client")

#: Statuses of a broker, or a proxy before it, that could not answer now (the
#: store was down, the broker restarting, gone from behind a load balancer).
UNANSWERED_STATUSES = frozenset({502, 503, 504})
#: Statuses worth another try: those, and 408, a request whose body did not
#: arrive within the broker's --body-timeout (nothing was done).
RETRIED_STATUSES = UNANSWERED_STATUSES | {408}
#: Seconds an idle connection to a broker is kept for the next request, for
#: brokers with the default --keepalive-timeout (api.client_keepalive). Kept as
#: long as the broker keeps it, a request sent just as the broker closes it is
#: lost ("server disconnected"): retried, or failed with retries=1.
KEEPALIVE = api.client_keepalive()
#: Seconds an owner left because it did not answer (refused, not connected
#: to or silent for a whole `timeout`, or a proxy's page in its place) is not
#: followed again, though the broker given names it: one the client cannot
#: reach (an internal --advertise-url, a NAT) would cost every call a whole
#: `timeout` first. Not left so: a try cut short by the caller's own
#: calls_within() bound (the owner stays followed), and one that failed fast
#: (a connection closed, most often a kept-alive one the owner closed idle,
#: or an answer cut short: its retry goes through the broker given, and the
#: owner is followed again at once).
OWNER_LEFT_FOR = 60.0
#: Seconds a request waits for its TCP connection at most (three SYNs: sent at
#: 0, 1 and 3 s), within its timeout: an address whose packets are dropped (a
#: firewall, an owner's --advertise-url not reachable from here) cost the
#: whole timeout (30 s) of the call that followed the owner there, once every
#: OWNER_LEFT_FOR. Past it the try was not sent: the call goes on elsewhere.
CONNECT_TIMEOUT = 5.0
#: The most bytes of an answer a client reads by default (its `max_answer`):
#: past it the call fails (BrokerError, not retried) rather than hold whatever
#: a proxy or a wrong port streams. The largest answer the API bounds, a
#: claim's, depends on the broker's --max-body, which has no upper limit: its
#: payloads stop at 16 MiB as JSON, past the job that crosses the mark, which
#: comes whole (up to six times --max-body as JSON: a RESP value of control
#: characters, each sent as \u0001), and each of its api.MAX_BATCH jobs
#: carries some 27 KiB more at most (a last error of api.MAX_ERROR characters,
#: escaped): 6 x --max-body + 43 MiB, 49 MiB with the default --max-body of
#: 1 MiB. This cap holds it up to a --max-body of 160 MiB; a broker allowing
#: more needs a client with a larger `max_answer`. Only the list of every dead
#: job is bounded by the broker's object cache alone (--cache-mb): one past
#: the cap is read in pages.
MAX_ANSWER = 1024 * 1024 * 1024
#: What encoding a value that JSON cannot hold raises (an object of a class
#: of the caller's, say; a list that holds itself).
UNSENDABLE = (TypeError, ValueError, RecursionError, msgspec.EncodeError)


def encode(body: Any) -> bytes:
    """`body` as JSON. ValueError for nan or infinity: JSON has neither, and
    msgspec writes them as null, which means something else (no lease, no
    payload)."""
    data = msgspec.json.encode(body)
    if b"null" in data and _non_finite(msgspec.to_builtins(body)):
        raise ValueError("nan and infinity cannot be sent as JSON")
    return data


def _non_finite(value: Any) -> bool:
    """Whether `value` (built-in types) holds a float that is nan or infinite."""
    left = [value]
    while left:
        item = left.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            left.extend(item.values())
        elif isinstance(item, list | tuple):
            left.extend(item)
    return False


#: The statuses of a job that will not change again: a look-up that waits ends there.
FINISHED = frozenset({"completed", "dead", "cancelled"})
#: The longest a single look-up request asks the broker to wait (the API's cap);
#: longer waits take several requests.
WAIT_PER_REQUEST = api.MAX_WAIT
#: Seconds a look-up answered unfinished before its wait was out waits, at
#: most, before it asks again (a second a request from an older broker that
#: does not long-poll; soon after a stopping broker's early answer).
EARLY_ANSWER_HOLD = 1.0

#: Look-ups one call has in flight at once, at most, to learn what a batch
#: request retried after its first try may have landed did (ack_many's
#: "conflict" answers, release's, cancel's "not_found", requeue's missing
#: ids): one after another, 1,000 of them took 12.6 s at 10 ms a request and
#: 33 s at 30 ms (a Worker's ack batcher waits for them), and all at once
#: they would be 1,000 connections.
LOOKUPS_IN_FLIGHT = 16

#: One ack of Client.ack_many: (job, result) or (job, result, follow-ups).
AckItem = tuple[Job | str, Any] | tuple[Job | str, Any, Iterable[Any] | None]

#: When (the event loop's time) the calls of a calls_within() block must end.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "simplequeue_deadline", default=None
)


#: Whether anybody still waits for the calls made here (an enqueue batch's
#: part: its callers may all have gone away): no try starts once nobody does.
_wanted: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "simplequeue_wanted", default=None
)


@contextlib.asynccontextmanager
async def calls_within(seconds: float | None) -> AsyncIterator[None]:
    """The block ends within `seconds`, TimeoutError if it has not. An
    asyncio.timeout alone is no such bound around a client's calls: expiring
    in the same turn of the loop as a try's own timeout (the client's
    `timeout`), its cancellation is taken by aiohttp for that timeout, which
    the client retries, for its whole retry budget. So the calls of clients
    made in the block (or in a task started in it; not enqueue(), whose
    requests carry other callers' jobs too) end by it themselves, tries
    included: each try's HTTP timeout is cut to the time left, and no try
    starts after it (one out of time raises its last try's error, or
    TimeoutError if that try got no answer). An asyncio.timeout bounds what
    else the block awaits. None: no bound. Nested, the sooner end holds."""
    if seconds is None:
        yield
        return
    end = asyncio.get_running_loop().time() + seconds
    outer = _deadline.get()
    token = _deadline.set(end if outer is None else min(outer, end))
    try:
        async with asyncio.timeout(seconds):
            yield
    finally:
        _deadline.reset(token)


@dataclass
class LastCall:
    """What a last_call() block records of the last call made in it: when it
    was first sent (time.monotonic()), and whether it may have been carried
    out more than once (tried again, or passed on by a broker after another
    did not answer); when its answer came (time.monotonic(), as its headers
    did: the body's transfer comes after), and the store's time the broker
    said then (api.NOW_HEADER; None from a broker before it, or for a
    call whose answer says none)."""

    first_sent: float = 0.0
    repeated: bool = False
    answered: float = 0.0
    now: float | None = None


#: The record of the last_call() block calls are made in.
_last_call: contextvars.ContextVar[LastCall | None] = contextvars.ContextVar(
    "simplequeue_last_call", default=None
)


@contextlib.contextmanager
def last_call(record: LastCall) -> Iterator[None]:
    """Record in `record` each call made in the block that was answered (the
    Worker's claims: a retried claim may be answered the jobs its first try
    claimed, their leases begun then)."""
    token = _last_call.set(record)
    try:
        yield
    finally:
        _last_call.reset(token)


def _now_of(header: str | None) -> float | None:
    """The store's time an answer said (api.NOW_HEADER), if it said one that reads."""
    if header is None:
        return None
    try:
        now = float(header)
    except ValueError:
        return None
    return now if math.isfinite(now) else None


class _Retry(Exception):
    """A transient failure: the broker was unreachable or could not answer now.
    `tried`: False when there is no broker to try (broker.json names none
    alive, or still names one no connection could be made to: a hand-over
    under way), which counts against the retry budget but
    not as one of the `retries` tries. `sent`: False when the request surely
    did not go out (no broker to try, a connection never made), so that a
    retry of it repeats nothing. Both can be said of one try: one that went
    out, whose answer was lost, and after which broker.json named no broker
    is sent, and a retry of it may repeat it."""

    def __init__(self, error: SimpleQueueError, *, tried: bool = True, sent: bool = True) -> None:
        super().__init__(str(error))
        self.error = error
        self.tried = tried
        self.sent = sent


class _Replayed(Exception):
    """A retried settle answered 409: its first try may have landed."""


def _batches(items: list[T]) -> Iterator[list[T]]:
    """`items` in runs of at most api.MAX_BATCH, the most one request of
    named jobs or claims may carry (a broker refuses more)."""
    for start in range(0, len(items), api.MAX_BATCH):
        yield items[start : start + api.MAX_BATCH]


async def _each(items: list[T], look: Callable[[T], Awaitable[A]]) -> list[A]:
    """`look(item)` for each of `items`, in their order, LOOKUPS_IN_FLIGHT at
    once at most. The first that fails is raised, the others cancelled."""
    found: dict[int, A] = {}
    left = iter(enumerate(items))

    async def looker() -> None:
        for n, item in left:  # one iterator: each item is taken once
            found[n] = await look(item)

    lookers = [asyncio.ensure_future(looker()) for _ in range(min(LOOKUPS_IN_FLIGHT, len(items)))]
    try:
        await asyncio.gather(*lookers)
    finally:
        for task in lookers:  # those left, when one failed or this was cancelled
            task.cancel()
        if lookers:
            await asyncio.wait(lookers)
    return [found[n] for n in range(len(items))]


def _one_request(items: list[T], what: str) -> list[T]:
    """`items`, when one request may carry them all (api.MAX_BATCH); else
    InvalidRequest, before anything is sent: a call whose one request is one
    write, all or nothing (enqueue_many, ack_many), is not cut in parts."""
    if len(items) > api.MAX_BATCH:
        raise InvalidRequest(
            f"{len(items):,} {what} in one request: {api.MAX_BATCH:,} at most (send more in parts)"
        )
    return items


def _every_dead_unknown(done: str, ids: list[str]) -> IncompleteAnswer:
    """A requeue or purge of every dead job, answered after a try that may
    have landed: that try's answer, lost, was the only word on which jobs it
    took, and the retry's names only those left for it."""
    return IncompleteAnswer(
        f"every dead job was {done}, but a first try, whose answer was lost, may have"
        f" {done} some too: which is not known ({len(ids)} {done} by the retry)",
        ids,
    )


def refused_whole(exc: Exception) -> bool:
    """Whether a request of several jobs (or acks) may have been refused for
    some of them, or for their size together: the API's InvalidRequest (a
    400: one bad; a 413: over the broker's --max-body), the 413 page of a
    proxy that bounds bodies on its own, or a payload JSON cannot hold. Sent
    again in halves (batching.in_halves), only the items at fault fail. The
    one test for the Client's coalesced enqueues, the Worker's acks and the
    CLI's enqueue --file: a refusal one of them did not halve failed the
    whole request, though each item fit."""
    if isinstance(exc, BrokerError):
        return exc.status == 413
    return isinstance(exc, (InvalidRequest, *UNSENDABLE))


def _among(answered: list[str], asked: list[str] | None, what: str) -> list[str]:
    """`answered` (a copy), when every id in it is one of those `asked` about
    (None: every dead job), else BrokerError: an answer naming jobs the
    request did not (another request's, replayed by a proxy or a cache)."""
    named = set(answered) if asked is None else set(asked)
    others = [i for i in answered if i not in named]
    if others:
        raise BrokerError(f"a {what} of {_ids(asked or [])} answered for {_ids(others)} too")
    return list(answered)


def _ids(ids: list[Any]) -> str:
    """A few ids, for a message: "job 'a'", "3 jobs ('a', 'b', ...)"."""
    if len(ids) == 1:
        return f"job {ids[0]!r}"
    shown = ", ".join(repr(i) for i in ids[:3]) + (", ..." if len(ids) > 3 else "")
    return f"{len(ids)} jobs ({shown})"


def _job_or_id(job: Job | str) -> tuple[str, str | None]:
    if isinstance(job, Job):
        return job.id, job.lease_token
    return job, None


class Client:
    """A client of one topic on one broker (or of whichever broker broker.json
    names, with `discover`)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        topic: str = "default",
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        retry_budget: float | None = None,
        store: ObjectStore | None = None,
        max_age: float = 30.0,
        max_answer: int = MAX_ANSWER,
    ) -> None:
        if url is None and store is None:
            raise ValueError("Client needs a broker URL, or a store to discover one in")
        self.url = api.check_broker_url(url) if url else ""
        # It goes into every path, where "b/enqueue?" reached another route.
        self.topic = keys.check_topic(topic)
        self.token = api.check_token(token) if token else None
        self.timeout = api.check_seconds("timeout", timeout, above_zero=True)
        self.retries = retries
        # Retries start within this many seconds of a call's start and its
        # long poll's wait. Twice the timeout by default, so that a try that
        # timed out is tried again.
        budget = 2 * timeout if retry_budget is None else retry_budget
        self.retry_budget = api.check_seconds("retry_budget", budget)
        self.store = store
        self.max_age = api.check_seconds("max_age", max_age)
        if isinstance(max_answer, bool) or not isinstance(max_answer, int) or max_answer < 1:
            raise ValueError(
                f"max_answer must be a whole number of bytes above 0, not {max_answer!r}"
            )
        self.max_answer = max_answer  # bytes of an answer read at most (see MAX_ANSWER)
        self._session: aiohttp.ClientSession | None = None
        # The event loop the session and the enqueue batcher belong to (_bind).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lender: Client | None = None  # for_topic(): whose session this one uses
        self._closed = False  # close() was called (a for_topic client may not lend on)
        # close() closed the session: none is opened again in its loop (a call
        # still in flight would leave it open); in the next loop, one is (_bind).
        self._shut = False
        self._owner: str | None = None  # the topic's owner, as a broker named it
        self._owners_left: dict[str, float] = {}  # owner URL: when it did not answer
        self._attempt_ids = True  # False: a broker refused them (older than they are)
        self._owns_store = False
        # claim_many's releases of jobs it was answered past `count`, under way
        # (close() waits for them).
        self._releases: set[asyncio.Task[None]] = set()
        # Concurrent enqueue() calls share requests: see enqueue().
        self._enqueues: Batcher[api.JobSpec, str] = Batcher(
            self._send_enqueues, max_batch=api.MAX_BATCH, name="client-enqueue"
        )

    @classmethod
    async def discover(
        cls,
        store: ObjectStore | str,
        *,
        max_age: float = 30.0,
        topic: str = "default",
        close_store: bool | None = None,
        **options: Any,
    ) -> Client:
        """A client of the broker that broker.json names, refusing a record whose
        heartbeat is older than `max_age` seconds (its broker renews it every
        third of its --broker-lease: keep `max_age` above that). close() closes
        the store too when `close_store` says so (by default: when it was given
        as a URL)."""
        owns = isinstance(store, str) if close_store is None else close_store
        handle = store_from_url(store) if isinstance(store, str) else store
        try:
            # The options checked before any I/O: a bad one costs no request.
            client = cls(None, topic=topic, store=handle, max_age=max_age, **options)
            await client._bind()  # the store's connections belong to this loop
            client.url = api.check_broker_url(await find_broker(handle, max_age))
        except BaseException:
            if owns:  # nobody else will close it
                await handle.close()
            raise
        client._owns_store = owns
        return client

    def for_topic(self, topic: str) -> Client:
        """A client of another topic on the same broker, sharing this client's
        HTTP connections (closing it leaves them to this one, which must
        outlive it)."""
        other = self._like(topic, self.store)
        other._lender = self
        return other

    def _like(self, topic: str, store: ObjectStore | None) -> Client:
        """A client of another topic on the same broker, with this one's
        settings, and HTTP connections of its own (for another event loop: a
        SyncClient's for_topic(), which gives it `store`, a handle for that
        loop; its own to close when it is not this one's)."""
        other = Client(
            self.url or None,
            topic=topic,
            token=self.token,
            timeout=self.timeout,
            retries=self.retries,
            retry_budget=self.retry_budget,
            store=store,
            max_age=self.max_age,
            max_answer=self.max_answer,
        )
        other._owns_store = store is not self.store
        return other

    # --- transport ---------------------------------------------------------------

    async def _bind(self) -> None:
        """The HTTP connections and the enqueue batcher belong to the event
        loop of this client's first call. In another loop (a second
        `asyncio.run()`), they start afresh, unless that first loop still runs
        (in another thread): a client is not shared between running loops."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None and self._loop.is_running():
            raise RuntimeError(
                "this Client is in use in an event loop running in another thread: "
                "make one Client per event loop (or SyncClient, for threads)"
            )
        # This loop's, before anything is awaited: calls that start meanwhile
        # find the client bound (one batcher, one session), not bind it again.
        was, self._loop = self._loop, loop
        old, self._session = self._session, None
        self._shut = False
        old_store = self.store
        self._enqueues = Batcher(
            self._send_enqueues, max_batch=api.MAX_BATCH, name="client-enqueue"
        )
        self._releases = set()
        if was is not None and old_store is not None:
            # A store handle's connections belong to a loop too (S3's): one for
            # this loop, to find the broker again (memfs and localfs: the same).
            self.store = old_store.for_another_loop()
            if self.store is not old_store:
                owned, self._owns_store = self._owns_store, True
                if owned and was.is_closed():
                    await old_store.close()  # as the session: marked closed
        if old is not None and not old.closed:
            if was is None or was.is_closed():
                # Nothing of the closed loop is touched: aiohttp only marks
                # them closed (the sockets go with their transports).
                await old.close()
            else:  # a loop not running, but open: its own to close them in
                old.detach()

    async def _bind_here(self) -> None:
        """Bind this client to the running loop (_bind), and the client whose
        connections it uses (for_topic): RuntimeError if either is in use in
        a loop running in another thread (a SyncClient's .client)."""
        await self._bind()
        if self._lender is not None:
            await self._lender._bind()

    def _http(self) -> aiohttp.ClientSession:
        if self._lender is not None:
            if self._lender._closed:
                raise RuntimeError(
                    f"the client of topic {self._lender.topic!r} this one came from "
                    "(for_topic) is closed: its connections with it"
                )
            return self._lender._http()
        if self._session is None or self._session.closed:
            if self._shut:
                raise BrokerUnavailable("the client was closed")
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(
                headers=headers,
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=KEEPALIVE),
            )
        return self._session

    async def request(
        self, method: str, path: str, answer: type[A], body: Any = None, *, wait: float = 0.0
    ) -> A:
        """The broker's answer to a request, decoded as `answer`; every failure raises."""
        _, got, _ = await self.call(method, path, answer, body, wait=wait)
        assert got is not None  # no status was expected
        return got

    async def call(
        self,
        method: str,
        path: str,
        answer: type[A],
        body: Any = None,
        *,
        wait: float = 0.0,
        expected: frozenset[int] = frozenset(),
        done_if_repeated: type[SimpleQueueError] | None = None,
    ) -> tuple[int, A | None, bool]:
        """(status, answer decoded as `answer`, whether the request may have been
        carried out more than once: it was retried, or a broker passed it on to
        the next when the first did not answer). A status in
        `expected` (404 or 409, whose meaning depends on the call) with the
        API's {"error"} body is returned with no answer instead of raised;
        every other failure raises. `done_if_repeated`: that error, answered to
        a try that may repeat one that landed (a DELETE's 404), is success.
        Within a calls_within() block, it ends by the block's bound; within a
        last_call() one, it is recorded once answered."""
        await self._bind_here()
        first_sent = time.monotonic()
        attempts = untried = unsent = 0
        loop = asyncio.get_running_loop()
        deadline = _deadline.get()

        def time_left() -> float | None:
            return None if deadline is None else deadline - loop.time()

        def out_of_time() -> bool:
            left = time_left()
            return left is not None and left <= 0

        async def once() -> tuple[int, A | None, bool]:
            nonlocal attempts, untried, unsent
            left = time_left()
            if left is not None and left <= 0:  # not a _Retry: the call ends
                raise TimeoutError(f"{self.url}: no time left for the request")
            if (wanted := _wanted.get()) is not None and not wanted():
                raise BrokerUnavailable(f"{self.url}: nobody waits for the request any more")
            attempts += 1
            try:
                status, raw, replayed, (answered, now) = await self._send(
                    method, path, body, wait, left
                )
            except _Retry as retry:
                untried += not retry.tried
                unsent += not retry.sent
                raise
            # Tries whose connection was never made did nothing to repeat.
            repeated = attempts - unsent > 1 or replayed
            if (record := _last_call.get()) is not None:
                record.first_sent, record.repeated = first_sent, repeated
                record.answered, record.now = answered, now
            try:
                got = self._answer(status, raw, answer, expected)
            except SimpleQueueError as exc:
                if repeated and done_if_repeated is not None and type(exc) is done_if_repeated:
                    return status, None, True
                raise
            return status, got, repeated

        backoff = wait_random_exponential(multiplier=0.1, max=2.0)

        def pause(state: RetryCallState) -> float:  # never past the deadline
            left = time_left()
            return backoff(state) if left is None else max(0.0, min(backoff(state), left))

        def retrying(elapsed: float) -> AsyncRetrying:
            # A long poll's answer comes after its wait: the budget then.
            spent = stop_after_delay(max(0.0, self.retry_budget + wait - elapsed))
            return AsyncRetrying(
                retry=retry_if_exception_type(_Retry),
                stop=lambda state: (
                    spent(state) or attempts - untried >= self.retries or out_of_time()
                ),
                wait=pause,
                reraise=False,
            )

        try:
            return await first_then_retrying(once, retrying)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            assert isinstance(last, _Retry)
            if out_of_time() and isinstance(last.__cause__, TimeoutError):
                raise TimeoutError(f"{last.error} (out of time)") from None
            raise last.error from None

    def _answer(
        self, status: int, raw: bytes, answer: type[A], expected: frozenset[int]
    ) -> A | None:
        """The answer of a 2xx, None for an expected status that carries the
        API's error body; else raise."""
        if 200 <= status < 300:
            try:
                got = msgspec.json.decode(raw, type=answer)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise BrokerError(
                    f"{self.url}: an answer that is not the API's ({exc}): {_snippet(raw)}",
                    status,
                ) from None
            if _lenient(answer) and (said := _error_of(raw)) is not None:
                # An error's body with a success's status (a proxy's, a broken
                # broker's): an answer of all defaults would pass for success.
                raise BrokerError(f"{self.url}: HTTP {status} with an error: {said.error}", status)
            return got
        said = _error_of(raw)
        message = None if said is None else said.error
        if status in RETRIED_STATUSES:
            error = errors.for_status(status) if message is not None else None
            cause = (error or BrokerUnavailable)(message or f"{self.url}: HTTP {status}")
            raise _Retry(cause)
        reason = None if said is None else said.reason
        error_class = errors.for_status(status, reason)
        if message is None or error_class is None:
            # An expected status too: a proxy's 404 page is no empty topic.
            raise BrokerError(f"{self.url}: HTTP {status}: {message or _snippet(raw)}", status)
        if status in expected and error_class is errors.for_status(status):
            return None  # the caller says what it means (a 409 with a reason says it here)
        raise error_class(message)

    async def _send(
        self, method: str, path: str, body: Any, wait: float, within: float | None = None
    ) -> tuple[int, bytes, bool, tuple[float, float | None]]:
        """(status, body, whether a broker passed the request on after another
        did not answer, (when the answer's headers came: time.monotonic(), the
        store's time they said: api.NOW_HEADER, None if none)),
        within `timeout` (and the wait asked for) or `within`
        seconds, whichever is sooner. A topic's request goes to its owner once
        a broker named it (the Simplequeue-Owner header; never from https to
        plain http); if the owner stops answering, back to the broker this
        client was given, which routes it, and is not followed there again for
        OWNER_LEFT_FOR seconds (unless the fault was not the owner's:
        _owner_failed)."""
        if not self.url:
            await self._rediscover(sent=False)
        data = encode(body) if body is not None else None
        total = self.timeout + wait
        limit = total if within is None else min(total, within)
        cut = limit < total  # to the time the caller's bound leaves (calls_within)
        timeout = aiohttp.ClientTimeout(total=limit, sock_connect=min(CONNECT_TIMEOUT, limit))
        headers = {"Content-Type": "application/json"} if data is not None else None
        base = self._owner if self._owner and path.startswith("/topics/") else self.url
        try:
            # `path` is %-encoded already (_segment): sent as it is, not
            # normalised (an id ".." is no step up).
            url = URL(base + path, encoded=True)
            # No redirects: a 302 would make a POST a GET of another page,
            # whose JSON could pass for an answer. A broker never sends one.
            async with self._http().request(
                method,
                url,
                data=data,
                timeout=timeout,
                headers=headers,
                allow_redirects=False,
            ) as response:
                answered = time.monotonic(), _now_of(response.headers.get(api.NOW_HEADER))
                raw = await _body(response, base, self.max_answer)
                status = response.status
                owner = response.headers.get(api.OWNER_HEADER)
                if base == self._owner and self._owner != self.url and _not_served(status, raw):
                    # Not the owner's answer: a proxy in front of it (a load
                    # balancer with no backend answers 502 pages). The broker
                    # given routes again.
                    self._leave_owner(base)
                    why = f"HTTP {status}: {_snippet(raw)}"
                    raise _Retry(BrokerUnavailable(f"{base}: {why}"))
                if owner and path.startswith("/topics/"):
                    self._owner = self._owner_named(owner)
                replayed = response.headers.get(api.REPLAYED_HEADER) == "1"
        except (aiohttp.ClientError, TimeoutError) as exc:  # refused, reset, cut short
            # Refused, or never connected within the connect timeout: not sent.
            unsent = isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
            tried = True
            # A connect that took CONNECT_TIMEOUT, shorter than the try's limit,
            # is the owner's fault, not the caller's bound (a Worker's
            # heartbeats run under one: each went to the owner again, until
            # the bound ran out, though the broker given would have answered).
            unreachable = isinstance(exc, aiohttp.ConnectionTimeoutError) and (
                timeout.sock_connect is not None and timeout.sock_connect < limit
            )
            if base == self._owner and self._owner != self.url:
                if unreachable or not (
                    isinstance(exc, TimeoutError) and cut
                ):  # not the caller's bound
                    # The broker given routes again; for a while if the owner
                    # would cost every call as much again.
                    self._leave_owner(base, for_a_while=_owner_failed(exc))
            else:
                await self._rediscover(sent=not unsent)
                # broker.json still names the broker that could not be
                # connected to: killed, its record not yet stale to a standby
                # (that takes its --broker-lease). No live broker, as with a
                # stale record: the budget bounds these tries, not `retries`.
                tried = not (unsent and self.store is not None and self.url == base)
            reason = str(exc) or type(exc).__name__
            error = BrokerUnavailable(f"{base or 'broker'}: {reason}")
            raise _Retry(error, tried=tried, sent=not unsent) from exc
        gone = status in UNANSWERED_STATUSES and _not_served(status, raw)
        if gone and self.store is not None and base == self.url:
            # A proxy's page where the broker was (a load balancer whose
            # broker is gone): broker.json may name another by now.
            await self._rediscover(sent=True)
            raise _Retry(BrokerUnavailable(f"{base}: HTTP {status}: {_snippet(raw)}"))
        return status, raw, replayed, answered

    def _owner_named(self, owner: str) -> str | None:
        """`owner` if the topic's requests may go there (_owner_to_follow), and
        it was not left within OWNER_LEFT_FOR seconds, else None."""
        url = _owner_to_follow(owner, self.url)
        if url is None or url not in self._owners_left:
            return url
        if time.monotonic() - self._owners_left[url] < OWNER_LEFT_FOR:
            return None
        del self._owners_left[url]
        return url

    def _leave_owner(self, owner: str, for_a_while: bool = True) -> None:
        """Send the topic's requests back to the broker given, which routes
        them, and (`for_a_while`) follow no broker's word back to `owner` for
        OWNER_LEFT_FOR seconds."""
        self._owner = None
        if for_a_while:
            self._owners_left[owner] = time.monotonic()

    async def _rediscover(self, *, sent: bool) -> None:
        """Follow broker.json to the active broker, if this client can. When it
        names none, the try that led here is retried as one not tried, and
        `sent` says whether it went out: a try whose answer was lost may have
        landed, whatever broker.json says after it."""
        if self.store is None:
            return
        try:
            url = await find_broker(self.store, self.max_age)
        except SimpleQueueError as exc:
            error = BrokerUnavailable(f"no broker: {exc}")
            raise _Retry(error, tried=False, sent=sent) from exc
        if url != self.url:
            # The owner was named by the broker left (itself, most often):
            # the next try goes to the one found, which names it anew.
            self.url, self._owner = url, None

    async def close(self) -> None:
        """Close the connections, once the enqueues under way are answered and
        claim_many's releases done. Enqueues whose callers all went away
        (cancelled: a SyncClient closed under them) are not waited for, their
        request cut short: nobody is owed their answer, and a broker that does
        not answer would hold the close for the whole retry budget. A call
        still in flight then, or made after, in this event loop, fails
        (BrokerUnavailable) rather than open connections again that nobody
        would close; in another loop (a second asyncio.run()) the client
        opens them afresh."""
        await self._bind()
        self._closed = True
        if self._enqueues.busy and self._enqueues.unawaited:
            await self._enqueues.abort(BrokerUnavailable("the client was closed"))
        else:
            await self._enqueues.close()
        if self._releases:  # each bounded: within one `timeout` of its start
            await asyncio.wait(self._releases)
        self._shut = True  # a call still in flight ends with its try
        if self._session is not None:
            await self._session.close()
        if self._owns_store and self.store is not None:
            await self.store.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- operations ----------------------------------------------------------------

    def _t(self, path: str) -> str:
        """The path of this topic's `path` (whose parts of the user's own, job
        ids and schedule names, went through _segment)."""
        return f"/topics/{self.topic}{path}"

    async def enqueue(
        self,
        payload: Any,
        id: str | None = None,
        priority: int = 0,
        delay: float = 0,
        max_attempts: int | None = None,
        run_at: float | datetime | None = None,
    ) -> str:
        """Enqueue one job; return its id (the existing one for a duplicate).
        It is not claimable before `delay` seconds from now, or before
        `run_at`: a time (Unix seconds, or a datetime; a naive one is local
        time), judged on the broker's clock; one past is now. Not both. A
        job the broker would refuse for its fields is InvalidRequest at once.

        Calls made while another enqueue of this client is in flight go out
        together as one batch request, like the broker's own group commit. A
        request refused whole (one job bad, or the jobs too large together: a
        413, the broker's or a proxy's) goes again in halves, down to the job
        at fault, which alone fails. A caller that stops waiting (its own
        timeout) has its job sent no more: a request of nobody's jobs is not
        tried again (one sent may have landed: the job may be in)."""
        spec = new_job_spec(payload, id, priority, delay, max_attempts, run_at)
        await self._bind()
        return await self._enqueues.submit(spec)

    async def _send_enqueues(self, batch: list[Pending[api.JobSpec, str]]) -> list[Any]:
        # The batcher's task: the jobs of every caller, not bound by the
        # calls_within() of the one whose enqueue started it.
        _deadline.set(None)
        # One bad job, or jobs too large together, must not fail the others.
        return await in_halves(self._enqueue_part, batch, refused_whole)

    async def _enqueue_part(
        self, part: list[Pending[api.JobSpec, str]]
    ) -> list[str] | list[Exception]:
        """Enqueue a part of a batch, its callers answered now: a later part
        that fails does not fail those whose jobs this one enqueued. No try
        of it starts once its callers all went away (their own timeouts):
        tried on for nobody, the jobs would land after their callers were
        told they failed, and twice if they enqueued them again."""

        def wanted() -> bool:
            return not all(pending.abandoned for pending in part)

        token = _wanted.set(wanted)
        try:
            ids = await self._enqueue_batch([pending.item for pending in part])
        except Exception as exc:
            if wanted():
                raise
            return [exc] * len(part)  # nobody's: the batch's other parts go on
        finally:
            _wanted.reset(token)
        for pending, job_id in zip(part, ids, strict=True):
            pending.settle(job_id)
        return ids

    async def _enqueue_batch(self, specs: list[api.JobSpec]) -> list[str]:
        """The ids of `specs`, each of which carries its id, once the broker
        answered them: a duplicate's answer names that id too, so an answer
        naming others (another request's, replayed) is a BrokerError."""
        if len(specs) == 1:
            one = await self.request("POST", self._t("/enqueue"), api.Enqueued, specs[0])
            ids = [one.id]
        else:
            many = await self.request(
                "POST", self._t("/enqueue"), api.EnqueuedBatch, api.EnqueueBatch(specs)
            )
            ids = many.ids
        asked = [spec.id for spec in specs]
        if ids != asked:
            raise BrokerError(f"an enqueue of {_ids(asked)} answered for {_ids(ids)}")
        return ids

    async def enqueue_many(self, jobs: Iterable[Any]) -> list[str]:
        """Enqueue a batch in one request, one write: all of it or none (none:
        no request, []; more than api.MAX_BATCH, 1,000: InvalidRequest). Items are
        payloads, or dicts with a "payload" key and optional id, priority,
        delay (or run_at, Unix seconds) and max_attempts: any other key is
        InvalidRequest (a payload that is itself such a dict goes as
        {"payload": {...}}). One str,
        bytes or dict in the list's place is refused (InvalidRequest)."""
        specs = _one_request([_spec_of(n, j) for n, j in enumerate(job_list(jobs))], "jobs")
        if not specs:
            return []
        return await self._enqueue_batch(specs)

    async def claim(
        self, worker_id: str, lease: float | None = None, wait: float = 0
    ) -> Job | None:
        """Claim the next job, long-polling up to `wait` seconds; None when empty.
        `lease=None`: the topic's `lease` setting, else the broker's --lease."""
        body = api.ClaimRequest(worker_id, lease=lease, wait=wait)
        answer = await self._claim(body, api.Claimed)
        return None if answer is None else answer.job

    async def claim_many(
        self,
        worker_id: str,
        count: int,
        lease: float | None = None,
        wait: float = 0,
        *,
        attempt_id: str | None = None,
        held: Container[tuple[str, str | None]] | None = None,
    ) -> list[Job]:
        """Claim up to `count` jobs in one request: fewer when fewer are due
        or the topic's limits allow fewer, and no more once their payloads
        reach the broker's bound (16 MiB, or an eighth of its --cache-mb if
        less, shared by the claims it commits together; see the README).
        `attempt_id` names the claim (by default a new name; 1-64 printable
        characters, else InvalidRequest): a claim asked again under the name
        of one whose answer was lost gets that one's jobs, those its worker
        still holds (best effort: see the README).

        An answer is held to what was asked, whatever answered it: a job it
        holds twice is returned once, and jobs past `count` are released in
        the background, the jobs kept returned at once (best effort: one not
        released comes back when its lease runs out; close() waits for the
        releases under way). `held` has the (id, lease_token) pairs of the
        jobs the caller holds already (looked up once the answer came): an
        answer naming one of them under its lease (an earlier answer
        replayed, by a proxy or a broker at fault) is not this claim's, and
        the job is neither returned nor released: released, it would be
        claimed by another worker while the caller runs it."""
        body = api.ClaimRequest(worker_id, lease=lease, wait=wait, count=count)
        if attempt_id is not None:
            # Checked here: the broker's refusal of a bad one would read as
            # that of a broker older than attempt ids (see _claim).
            try:
                attempt_id = api.convert(attempt_id, api.AttemptId)
            except InvalidRequest as exc:
                raise InvalidRequest(f"attempt_id: {exc}") from None
            body = msgspec.structs.replace(body, attempt_id=attempt_id)
        answer = await self._claim(body, api.ClaimedBatch)
        if answer is None:
            return []
        firsts: dict[str, Job] = {}
        for job in answer.jobs:
            firsts.setdefault(job.id, job)
        distinct = list(firsts.values())
        twice = len(distinct) < len(answer.jobs)
        if held is not None:
            ours = [job for job in distinct if (job.id, job.lease_token) not in held]
            if len(ours) < len(distinct):
                log.warning(
                    "%s: a claim answered %d jobs its caller holds already: left to it",
                    self.url,
                    len(distinct) - len(ours),
                )
                distinct = ours
        if twice or len(distinct) > count:
            # Not a broker's answer (a broker claims each job once, at most
            # `count`): run twice at once, or past a Worker's max_jobs.
            log.warning(
                "%s: a claim of at most %d jobs answered %d (%d distinct): "
                "the first %d kept, the others past them released",
                self.url,
                count,
                len(answer.jobs),
                len(distinct),
                count,
            )
        if len(distinct) > count:
            # Not awaited: the jobs kept are the caller's to renew from now
            # on, and a release that stalls would hold them past their leases.
            release = asyncio.create_task(self._release_unasked(distinct[count:]))
            self._releases.add(release)
            release.add_done_callback(self._releases.discard)
        return distinct[:count]

    async def _release_unasked(self, jobs: list[Job]) -> None:
        """Give back jobs a claim answered past what it asked for, within one
        `timeout` (close() waits for it). A repeat of a job kept is never
        among them: releasing it would release the job kept. A task of its
        own: whatever it fails with is logged here."""
        held = [job for job in jobs if job.lease_token is not None]
        # Its own bound, not that of the claim's caller, who waits no more;
        # nor is it the last call of the caller's last_call() block.
        _deadline.set(None)
        _last_call.set(None)
        try:
            async with calls_within(self.timeout):
                await self.release(held)
        except Exception as exc:  # TimeoutError too; a lender closed (for_topic)
            log.warning(
                "%s: %d jobs a claim did not ask for not released (%s): "
                "pending again when their leases run out",
                self.url,
                len(held),
                str(exc) or type(exc).__name__,
                exc_info=not isinstance(exc, SimpleQueueError | TimeoutError),
            )

    async def _claim(self, body: api.ClaimRequest, answer: type[A]) -> A | None:
        """The claim's answer, None when nothing was claimable. Its retries name
        its attempt: one whose first try landed gets that try's jobs. A broker
        older than attempt ids refuses the field as unknown: asked again
        without. Any other refusal is the caller's to see."""
        if not self._attempt_ids:
            body = msgspec.structs.replace(body, attempt_id=None)
        elif body.attempt_id is None:
            body = msgspec.structs.replace(body, attempt_id=api.new_id())
        try:
            _, got, _ = await self.call(
                "POST", self._t("/claim"), answer, body, wait=body.wait, expected=_EMPTY
            )
        except InvalidRequest as exc:
            if body.attempt_id is None or "unknown field `attempt_id`" not in str(exc):
                raise
            self._attempt_ids = False
            return await self._claim(msgspec.structs.replace(body, attempt_id=None), answer)
        return got

    async def ack(
        self, job: Job | str, result: Any = None, enqueue: Iterable[Any] | None = None
    ) -> None:
        """Complete a claimed job with `result` (carrying its lease token). The
        jobs in `enqueue` (payloads for this topic, or dicts with "payload" and
        optional "topic", "id", "priority", "delay" or "run_at", "max_attempts")
        are enqueued when, and only when, the ack commits (SPEC 9)."""
        job_id, token = _job_or_id(job)
        body = api.AckRequest(job_id, token, result, enqueue=follow_up_specs(enqueue))
        try:
            # A retry whose first try landed enqueues nothing twice: the
            # follow-ups' ids are given or derived from the job's by the broker.
            await self._settle("/ack", body, api.Settled)
        except _Replayed:
            # A retried ack whose first try may have landed: done, unless it is not.
            if (await self.job(job_id)).status != "completed":
                raise LeaseLost(f"job {job_id!r} is no longer held by this client") from None

    async def ack_many(self, acks: Iterable[AckItem]) -> list[dict[str, Any]]:
        """Complete several jobs (1,000 at most, api.MAX_BATCH: more is
        InvalidRequest) in one request; each answer says whether it did
        ({"id", "status", "error", "enqueued", "duplicates"}: None where an ack
        has none; the ids of its follow-ups as `ack` answers them), in the
        acks' order: an answer that is not one for each ack, naming its job,
        is a BrokerError. An ack is (job, result), or (job, result,
        follow-ups) with follow-ups as `ack` takes them. Retried after a try
        that may have landed, each ack answered "conflict" has its job looked
        up (LOOKUPS_IN_FLIGHT at once): "completed" if it is."""
        body = _one_request([_ack_request(ack) for ack in acks], "acks")
        _, answer, repeated = await self.call(
            "POST", self._t("/ack"), api.AckedBatch, api.AckBatch(body)
        )
        assert answer is not None  # nothing is `expected`: a 2xx, or raised
        if len(answer.results) != len(body):
            raise BrokerError(f"{len(answer.results)} answers for {len(body)} acks")
        for i, (ack, said) in enumerate(zip(body, answer.results, strict=True)):
            if said.id != ack.job_id:  # matched by position: one job's answer taken for another's
                raise BrokerError(f"answer {i} is for job {said.id!r}, its ack for {ack.job_id!r}")
        results = [msgspec.structs.asdict(r) for r in answer.results]
        if repeated:  # a retry whose first try may have landed: as ack() does
            conflicts = [result for result in results if result["status"] == "conflict"]
            completed = await _each(conflicts, lambda result: self._is(result["id"], "completed"))
            for result, done in zip(conflicts, completed, strict=True):
                if done:
                    result["status"] = "completed"
                    result.pop("error", None)
        return results

    async def _is(self, job_id: str | None, status: str) -> bool:
        """Whether job `job_id` is `status` now (after a repeated request)."""
        if job_id is None:
            return False
        try:
            return (await self.job(job_id)).status == status
        except JobNotFound:
            return False

    async def nack(self, job: Job | str, delay: float = 0, error: str | None = None) -> str:
        """Give a job back: pending again after `delay` s, or dead when spent.
        Returns the job's new status."""
        job_id, token = _job_or_id(job)
        body = api.NackRequest(job_id, token, delay=delay, error=error)
        try:
            answer: api.Settled = await self._settle("/nack", body, api.Settled)
        except _Replayed:
            now = await self.job(job_id)  # a retried nack whose first try may have landed
            if now.status == "claimed" and (token is None or now.lease_token == token):
                raise LeaseLost(f"job {job_id!r}: nack did not take") from None
            return now.status
        return answer.status

    async def release(self, jobs: Iterable[Job]) -> int:
        """Give back claimed jobs that were not worked: pending again at once,
        their attempts uncounted (and their rate tokens given back). A job
        whose lease this client no longer holds is left as it is. Answers how
        many were released (after a retry whose first try may have landed,
        as their jobs say: looked up, LOOKUPS_IN_FLIGHT at once)."""
        held: list[api.Held] = []
        for job in jobs:
            if job.lease_token is None:
                raise ValueError(f"job {job.id!r} has no lease token: it was not claimed")
            held.append(api.Held(job.id, job.lease_token))
        released = 0
        for part in _batches(held):
            body = api.ReleaseRequest(part)
            _, answer, repeated = await self.call("POST", self._t("/release"), api.Released, body)
            assert answer is not None
            if repeated and answer.released < len(part):
                # A retry whose first try may have landed: the jobs that try
                # released were held no more, and the answer left them out.
                released += await self._given_back(part)
            else:
                released += answer.released
        return released

    async def _given_back(self, claims: list[api.Held]) -> int:
        """How many of `claims` were given back by a release, as far as their
        jobs say now: pending, or claimed again under another lease."""

        async def given_back(claim: api.Held) -> bool:
            try:
                job = await self.job(claim.job_id)
            except JobNotFound:
                return False
            return job.status == "pending" or (
                job.status == "claimed" and job.lease_token != claim.lease_token
            )

        return sum(await _each(claims, given_back))

    async def heartbeat(self, job: Job | str, lease: float | None = None) -> float:
        """Extend the claim; return the new lease expiry (Unix seconds)."""
        job_id, token = _job_or_id(job)
        body = api.HeartbeatRequest(job_id, token, lease=lease)
        try:
            answer: api.Renewed = await self._settle("/heartbeat", body, api.Renewed)
        except _Replayed:
            # A retry with the same token renews a lease still held: a 409 on
            # it means the lease is gone, whether or not the first try landed.
            raise LeaseLost(f"job {job_id!r} is no longer held by this client") from None
        return answer.lease_expires_at

    async def _settle(self, path: str, body: Any, answer: type[S]) -> S:
        """The answer, which names the job settled: one naming another (an
        earlier answer replayed) is a BrokerError, the job left as it was."""
        status, got, repeated = await self.call(
            "POST", self._t(path), answer, body, expected=_SETTLE_FAILURES
        )
        if got is not None:
            if got.id != body.job_id:
                raise BrokerError(
                    f"{path[1:]} of job {body.job_id!r} answered for job {got.id!r}", status
                )
            return got
        if status == 409 and repeated:
            raise _Replayed()
        if status == 409:
            raise LeaseLost(f"job {body.job_id!r} is not claimed under this lease")
        raise JobNotFound(f"no job {body.job_id!r} in topic {self.topic!r}")

    async def status(self) -> dict[str, int]:
        counts = await self.request("GET", self._t("/status"), api.Counts)
        return msgspec.structs.asdict(counts)

    async def job(self, job_id: str, wait: float = 0) -> Job:
        """The job, or its record. With `wait`, once it is finished (completed,
        dead or cancelled) or `wait` seconds passed; a job that does not exist
        yet (a follow-up on its way) is waited for too."""
        return await self._look_up(job_id, Job, wait, lambda job: job.status)

    async def job_dict(self, job_id: str, wait: float = 0) -> dict[str, Any]:
        """The job, or its record, as the broker sent it: every field it sent
        and no other (a Job has every field, None where the answer had none).
        `wait` as for job()."""
        return await self._look_up(job_id, dict[str, Any], wait, lambda job: job.get("status"))

    async def _look_up(
        self, job_id: str, answer: type[A], wait: float, status: Callable[[A], Any]
    ) -> A:
        """GET the job, long-polling (?wait=, at most WAIT_PER_REQUEST s a
        request) until it is finished or `wait` seconds passed; JobNotFound
        if it does not exist then."""
        if not job_id:
            # No job has it (ids are 1-256 characters), and its path,
            # /topics/t/jobs/, no route has: a RouteNotFound, not this.
            raise JobNotFound(f"no job {job_id!r} in topic {self.topic!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait)
        while True:
            started = loop.time()
            step = min(max(0.0, deadline - started), WAIT_PER_REQUEST)
            path = self._t(f"/jobs/{_segment(job_id)}") + (f"?wait={step:.3f}" if step > 0 else "")
            _, got, _ = await self.call("GET", path, answer, wait=step, expected=_MISSING)
            now = loop.time()
            if (got is not None and status(got) in FINISHED) or now >= deadline:
                break
            # An unfinished job answered early: a stopping broker ends its
            # waits so (the next request finds the broker that took over), and
            # an older one does not long-poll. Never spin, and do not sleep out
            # the step (a minute) either.
            await asyncio.sleep(min(EARLY_ANSWER_HOLD, min(deadline, started + step) - now))
        if got is None:
            raise JobNotFound(f"no job {job_id!r} in topic {self.topic!r}")
        return got

    # `timeout` (SPEC 8's name) is how long the broker is asked to wait, in
    # long polls; it is not a deadline on the calls, which retry as every call does.
    async def result(self, job_id: str, timeout: float = 30) -> Any:  # noqa: ASYNC109
        """The result of the job once it completed, waiting up to `timeout`
        seconds for it. Raises JobFailed (it is dead; its last_error is on the
        exception), JobCancelled, TimeoutError when it is still unfinished at
        `timeout`, or JobNotFound when it does not exist by then (nor does its
        record: the broker keeps it for --retention)."""
        job = await self.job(job_id, wait=timeout)
        if job.status == "completed":
            return job.result
        if job.status == "dead":
            raise JobFailed(job_id, job.last_error)
        if job.status == "cancelled":
            raise JobCancelled(f"job {job_id!r} was cancelled")
        raise TimeoutError(f"job {job_id!r} is still {job.status} after {timeout:g} s")

    async def dead(self, offset: int = 0, limit: int | None = None) -> list[Job]:
        """Dead jobs in the order they died: every one, or a page of at most
        `limit` from the `offset`-th on (a queue of dead jobs too large for
        one answer is read in pages)."""
        query = f"?offset={offset}" + ("" if limit is None else f"&limit={limit}")
        return (await self.request("GET", self._t("/dead") + query, api.DeadJobs)).jobs

    async def requeue(self, job_ids: list[str] | None = None) -> list[str]:
        """Dead jobs (those named, in requests of at most 1,000 ids, or all)
        back to pending; the ids requeued. Named ones, tried again after a try
        that may have landed, have those the retry did not requeue looked up
        (LOOKUPS_IN_FLIGHT at once): each counts as requeued if its job has an
        attempt at most (requeue reset them) and is neither dead nor cancelled
        (_requeued_before). All of them, tried again so, raises
        IncompleteAnswer: that try's ids cannot be known."""
        if job_ids is None:
            return await self._requeue(None)
        ids = list(dict.fromkeys(id_list(job_ids)))  # an id named twice: one job, one request
        return [i for part in _batches(ids) for i in await self._requeue(part)]

    async def _requeue(self, job_ids: list[str] | None) -> list[str]:
        body = api.JobIdsRequest(job_ids)
        _, answer, repeated = await self.call("POST", self._t("/requeue"), api.Requeued, body)
        assert answer is not None
        requeued = _among(answer.requeued, job_ids, "requeue")
        if repeated:  # a retry whose first try may have landed
            if job_ids is None:
                raise _every_dead_unknown("requeued", requeued)
            done = set(requeued)
            missing = [i for i in job_ids if i not in done]
            found = await _each(missing, self._requeued_before)
            requeued += [i for i, now in zip(missing, found, strict=True) if now]
        return requeued

    async def _requeued_before(self, job_id: str) -> bool:
        """Whether job `job_id`, named in a requeue whose retry did not requeue
        it, was requeued by a first try that may have landed, as far as the
        job says now. A requeue resets its attempts to 0, and a Worker
        waiting on the topic claims it at once (1), and may have run it by
        now, failed or done: one found with an attempt at most that is
        neither dead nor cancelled (a purged job's record says dead) is
        taken for requeued, whatever its status. The broker keeps no mark of
        a requeue, as a purged job's record is of a purge: a job named that
        never died, with an attempt at most, is taken for requeued too, and
        one requeued that ran twice (or died again) since is not."""
        try:
            job = await self.job(job_id)
        except JobNotFound:
            return False
        return job.status not in ("dead", "cancelled") and (job.attempts or 0) <= 1

    async def purge(self, job_ids: list[str] | None = None) -> list[str]:
        """Forget dead jobs (those named, in requests of at most 1,000 ids, or
        all); the ids purged. All of them, tried again after a try that may
        have landed, raises IncompleteAnswer: that try's ids cannot be known."""
        if job_ids is None:
            return await self._purge(None)
        ids = list(dict.fromkeys(id_list(job_ids)))  # an id named twice: one job, one request
        return [i for part in _batches(ids) for i in await self._purge(part)]

    async def _purge(self, job_ids: list[str] | None) -> list[str]:
        # Named jobs purged before are answered as purged (the broker looks
        # at their records): a retry of a purge that landed answers them too.
        body = api.JobIdsRequest(job_ids)
        _, answer, repeated = await self.call("DELETE", self._t("/dead"), api.Purged, body)
        assert answer is not None
        if repeated and job_ids is None:
            raise _every_dead_unknown("purged", answer.purged)
        return _among(answer.purged, job_ids, "purge")

    async def topics(self) -> dict[str, dict[str, int]]:
        """Every readable topic's counts. The broker names those it cannot read
        (a corrupt head) apart: request("GET", "/topics", api.Topics).errors."""
        answer = await self.request("GET", "/topics", api.Topics)
        return {name: msgspec.structs.asdict(c) for name, c in answer.topics.items()}

    # --- control: cancellation, schedules, settings ----------------------------------

    async def cancel(self, job_ids: Iterable[str]) -> dict[str, list[str]]:
        """Cancel jobs: pending and delayed ones at once, claimed ones too (their
        holders' next heartbeat or ack raises JobCancelled). Answers
        {"cancelled": [...], "not_found": [...]} (finished or unknown), an id
        named twice once, in requests of at most 1,000 ids. The ids are a
        list, ["17"] for one: a str is refused (InvalidRequest), as by
        requeue() and purge(). Tried again after a try that may have landed,
        the jobs answered "not_found" are looked up (LOOKUPS_IN_FLIGHT at
        once): those cancelled, by that try, say so."""
        ids = list(dict.fromkeys(id_list(job_ids)))  # an id named twice: one job, one request
        cancelled: list[str] = []
        not_found: list[str] = []
        for part in _batches(ids):
            body = api.CancelRequest(part)
            _, answer, repeated = await self.call("POST", self._t("/cancel"), api.Cancelled, body)
            assert answer is not None
            _among(answer.cancelled + answer.not_found, part, "cancel")
            cancelled += answer.cancelled
            landed: set[str] = set()
            if repeated:  # a retry whose first try landed finds its jobs cancelled already
                found = await _each(answer.not_found, lambda i: self._is(i, "cancelled"))
                landed = {i for i, now in zip(answer.not_found, found, strict=True) if now}
            cancelled += [i for i in answer.not_found if i in landed]
            not_found += [i for i in answer.not_found if i not in landed]
        return {"cancelled": cancelled, "not_found": not_found}

    async def schedule(
        self,
        name: str,
        payload: Any,
        every: int | None = None,
        cron: str | None = None,
        tz: str | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
    ) -> api.Schedule:
        """Create or replace the schedule `name`: a job with `payload` every
        `every` seconds, or at each time of the five-field `cron` expression in
        time zone `tz` (default UTC). Each slot's job has id "<name>@<slot>"."""
        body = api.ScheduleRequest(
            payload, every=every, cron=cron, tz=tz, priority=priority, max_attempts=max_attempts
        )
        path = self._t(f"/schedules/{_segment(api.check_new_schedule_name(name))}")
        return await self.request("PUT", path, api.Schedule, body)

    async def schedules(self) -> list[api.Schedule]:
        return (await self.request("GET", self._t("/schedules"), api.Schedules)).schedules

    async def unschedule(self, name: str) -> None:
        """Delete the schedule `name`; ScheduleNotFound if there is none (not
        when a retried try finds it gone: its first try deleted it)."""
        path = self._t(f"/schedules/{_segment(api.check_schedule_name(name))}")
        await self.call("DELETE", path, api.Unscheduled, done_if_repeated=ScheduleNotFound)

    async def settings(self, **limits: Any) -> dict[str, Any]:
        """The topic's settings (rate, burst, max_claimed, lease, max_attempts);
        with keyword arguments, change those first (None removes one)."""
        if not limits:
            answer = await self.request("GET", self._t("/settings"), api.Settings)
        else:
            # Checked here: nan or inf would go as JSON null, "remove it".
            body = api.convert(limits, api.SettingsRequest)
            answer = await self.request("PUT", self._t("/settings"), api.Settings, body)
        return msgspec.structs.asdict(answer)


_EMPTY = frozenset({404})  # a claim that found nothing
_MISSING = frozenset({404})
_SETTLE_FAILURES = frozenset({404, 409})


def _ack_request(ack: AckItem) -> api.AckRequest:
    job, result, *follow = ack
    return api.AckRequest(
        *_job_or_id(job), result, enqueue=follow_up_specs(follow[0] if follow else None)
    )


def _spec_of(index: int, item: Any) -> api.JobSpec:
    """Item `index` of enqueue_many, with an id of the client's if it has none."""
    spec = job_spec(item, api.JobSpec, f"job {index}")
    return spec if spec.id is not None else msgspec.structs.replace(spec, id=api.new_id())


def new_job_spec(
    payload: Any,
    job_id: str | None,
    priority: int,
    delay: float,
    max_attempts: int | None,
    run_at: float | datetime | None = None,
) -> api.JobSpec:
    """One job to enqueue, its id made here when none is given: a retry of its
    request is then a duplicate at the broker, not a second job. Checked as
    the broker checks it (InvalidRequest, in its words): a job it would
    refuse costs no request (coalesced with others, found by halving: two
    requests or so each)."""
    at = unix_time(run_at)
    if _non_finite([delay, at]):  # as encode() says, not as a bound crossed
        raise ValueError("nan and infinity cannot be sent as JSON")
    fields = {
        "payload": payload,  # taken as it is (Any), not copied
        "id": api.new_id() if job_id is None else job_id,
        "priority": priority,
        "delay": delay,
        "max_attempts": max_attempts,
        "run_at": at,
    }
    return api.convert(fields, api.JobSpec)


async def _body(response: aiohttp.ClientResponse, where: str, cap: int) -> bytes:
    """The answer's body; BrokerError once it passes `cap` bytes (the client's
    max_answer), or its Content-Length says it will (the rest left unread: the
    connection is closed)."""
    said = response.content_length or 0
    if 0 < said <= cap:  # a broker's answers say their length: read as ever
        return await response.read()
    parts: list[bytes] = []
    size = 0
    while max(said, size) <= cap and (part := await response.content.readany()):
        parts.append(part)
        size += len(part)
    if max(said, size) > cap:
        raise BrokerError(
            f"{where}: HTTP {response.status}: an answer over this client's max_answer"
            f" ({cap:,} bytes): a broker whose --max-body is that large needs a larger one"
            " (a list of dead jobs that large is read in pages)",
            response.status,
        )
    return b"".join(parts)


def _owner_failed(exc: BaseException) -> bool:
    """Whether a try at an owner failed in a way that would cost every call
    as much again (OWNER_LEFT_FOR): refused, not connected to, or silent for
    a whole `timeout`. A connection closed or reset, or an answer cut short,
    fails fast (a kept-alive connection the owner closed idle, most often):
    its retry goes to the broker given, and the owner is followed again at
    the next answer that names it."""
    return isinstance(
        exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError | TimeoutError
    )


def _not_served(status: int, raw: bytes) -> bool:
    """Whether an answer says no broker served the request: an error that is
    not the API's (a proxy's 502 page, say). A 503 in the API's own words (a
    store fault at the owner) is the owner's answer, its class kept."""
    return status >= 300 and _error_of(raw) is None


def _lenient(answer: type[Any]) -> bool:
    """Whether an error's body ({"error": ...}) decodes as `answer`: a dict, or
    a Struct whose every field has a default and none is named "error". Only
    such answers are checked for one (the others' decoding refuses it), so
    that a claim's answer is not decoded twice."""
    fields: tuple[str, ...] | None = getattr(answer, "__struct_fields__", None)
    if fields is None:
        return True
    defaults: tuple[Any, ...] = answer.__struct_defaults__
    return len(defaults) == len(fields) and "error" not in fields


def _error_of(raw: bytes) -> api.Error | None:
    """The API's {"error": "...", "reason"?}, or None when the body is not one."""
    try:
        return msgspec.json.decode(raw, type=api.Error)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _owner_to_follow(owner: str, given: str) -> str | None:
    """`owner` if the topic's requests may go there, else None: every request
    of the topic goes on through the broker `given`, which passes it on. Not
    followed: an owner no URL can name (a port past 65535), and a plain http
    owner of a client given https (brokers advertising http behind a TLS
    proxy), which would get the bearer token and the payloads in clear text."""
    try:
        url = api.check_broker_url(owner)
    except ValueError:
        return None
    if URL(url).scheme == "http" and URL(given).scheme == "https":
        return None
    return url


def _snippet(raw: bytes) -> str:
    """The start of a body that is not the API's, on one line: an error is
    one line (a web server's page would be several lines of HTML)."""
    text = " ".join(raw[:200].decode(errors="replace").split())
    return text or "(empty body)"


def _segment(text: str) -> str:
    """`text` (a job id, a schedule name: any printable text) as one segment of
    a URL's path: "#", "?", "/" and the rest %-encoded, and "." or ".." too,
    which a URL would otherwise take for steps in the path."""
    quoted = quote(text, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted
