"""Requests for a topic this broker does not own go to its owner (SPEC 4.3).

The Forwarder sends a topic's request to the brokers in the topic's order
(simplequeue.broker.membership), over one keep-alive pool, until one answers:
its owner, or when the owner does not answer within a second, the next; when
this broker's turn comes it serves the request itself. A broker that did not
answer is routed around for a few seconds. The pool is bounded (its share of
the descriptors, pool_size): a request waits for a free connection, which is
this broker's own shortage, never the owner's; tells (read this topic again)
take a small share of it. A forwarded request carries `Simplequeue-Forwarded`
and is always served where it lands, so requests never loop. The Router gives
the RESP face the same routing through the engine's own calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import aiohttp
import msgspec
from yarl import URL

from simplequeue import api, errors
from simplequeue.api import AckRequest, JobSpec
from simplequeue.broker.background import in_background
from simplequeue.broker.engine import Engine
from simplequeue.broker.membership import Membership, Peer
from simplequeue.errors import (
    AmbiguousWrite,
    BrokerError,
    NothingToClaim,
    Overloaded,
    SimpleQueueError,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

FORWARDED = api.FORWARDED_HEADER
OWNER = api.OWNER_HEADER
REPLAYED = api.REPLAYED_HEADER

ANSWER_WITHIN = 1.0  # seconds a broker has to answer a forwarded request
SUSPECT_FOR = 3.0  # seconds a broker that did not answer is routed around
# An undo (route's `undo`) or take-back is tried while its broker does not
# answer: UNDO_TRIES times at least, and on until UNDO_WITHIN seconds after the
# first, the pauses between them doubling from UNDO_PAUSE up to UNDO_PAUSE_MAX.
# Three tries a second apart gave up on an owner stalled ~5 s (0.75 s in a
# test's 0.2 s timeouts): the popped job stayed done for nobody. Tries are
# safe to repeat: an attempt id is undone once, and then spent.
UNDO_TRIES = 3
UNDO_PAUSE = 1.0
UNDO_PAUSE_MAX = 5.0
UNDO_WITHIN = 30.0
# ... and a pop's undo whose answer was lost (route's `undo`), as long as its
# broker keeps the pop's record for it: an owner whose store was down past
# UNDO_WITHIN, and would have undone it once back, was asked no more, and
# the job stayed done for nobody.
UNDO_PATIENCE = api.CLAIM_ATTEMPTS_KEPT_S
# Seconds more than ANSWER_WITHIN a take-back (route's `take_back`) waits for
# each answer: its broker answered the claim too late already, and no caller waits.
TAKE_BACK_PATIENCE = 10.0
# Claims served by a broker other than their topic's owner (route's
# `take_back`), and pops and completes a client named sent to another broker
# (route's `named`), remembered for their retries, at most; each for as long
# as an engine keeps a claim's or pop's answer for its retries
# (api.CLAIM_ATTEMPTS_KEPT_S).
ATTEMPTS_SERVED_KEPT = 10_000
# The pool's share of the descriptors left for connections
# (listener.default_max_connections), taken from the clients' (server.py): a
# request passed on holds a client's connection and one to the owner. Most
# clients send to a topic's owner once an answer names it (the SDK does), so
# a quarter, as RESP clients get, within [POOL_MIN, POOL_MAX]: a few peers
# need no more, and past it the descriptors serve clients better.
POOL_SHARE = 4
POOL_MIN = 8
POOL_MAX = 1024
# Long polls (a claim's or pop's wait, a job's ?wait=) hold their connection
# for as long as they wait (up to a minute): at most all but a quarter of the
# pool, so that short requests (acks, enqueues) never queue behind them. A long
# poll past its share waits its turn out of what it was to wait at the owner;
# its wait spent in line, it asks the owner with none left, as a short request.
SHORT_SHARE = 4
# Tells (a stand-in telling a topic's owner to read it again, the duties'
# hand-overs) at most 1/TELL_SHARE of the pool, at least one, waiting their
# turn: best effort, and a stand-in tells one for every topic it wrote at the
# same tick, as its owner's suspicion ends. An owner still paused answers
# none: every tell held a connection for answer_within, the whole pool, and
# requests for healthy brokers were answered 503.
TELL_SHARE = 8
WARN_EVERY = 60.0  # seconds between warnings that the pool, or descriptors, ran short
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)  # the process', the system's


# The headers of an owner's answer a broker passing it on passes on too.
_PASSED_ON = frozenset({"Allow", "Retry-After", api.NOW_HEADER})

# A request remembered for its retries (Forwarder._served): "claim" or "pop"
# (a pop's, a complete's, their unpop's), its topic, worker id, attempt id.
Attempt = tuple[str, str, str, str]


def pool_size(descriptors: int) -> int:
    """The most connections a Forwarder holds open to other brokers at once,
    of `descriptors` left for connections."""
    return max(POOL_MIN, min(POOL_MAX, descriptors // POOL_SHARE))


@dataclass
class Answer:
    """What the broker that served a forwarded request answered."""

    status: int
    body: bytes
    content_type: str
    served_by: Peer
    replayed: bool = False
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Here:
    """This broker's turn came: it serves the request itself. `replayed`: a
    broker before it got the request and did not answer, and may have done
    it (the answer should say so: a refusal may be of a repeat)."""

    replayed: bool = False


class _Unreachable(Exception):
    def __init__(self, why: str, sent: bool) -> None:
        super().__init__(why)
        self.sent = sent  # the request went out: the broker may have done it


class _Slots:
    """The pool's connections, counted: at most `size` requests in flight (one
    connection each), long polls at most all but 1/SHORT_SHARE of them. Each
    waits its turn, first come, first served."""

    def __init__(self, size: int) -> None:
        self._any = asyncio.Semaphore(size)
        self._long_polls = asyncio.Semaphore(max(1, size - size // SHORT_SHARE))
        self.tells = asyncio.Semaphore(max(1, size // TELL_SHARE))  # Forwarder.tell's share
        # The share of undos' and take-backs' tries after their first (_tries):
        # those of a burst of lost answers come again in lockstep, for 30 s.
        self.again = asyncio.Semaphore(max(1, size // TELL_SHARE))
        self.taken = 0  # requests in flight

    async def take(self, long_poll: bool) -> bool:
        """One slot (and one of the long polls', for one); whether it had to wait."""
        waited = self._any.locked() or (long_poll and self._long_polls.locked())
        if long_poll:
            await self._long_polls.acquire()
        try:
            await self._any.acquire()
        except BaseException:
            if long_poll:
                self._long_polls.release()
            raise
        self.taken += 1
        return waited

    def give_back(self, long_poll: bool) -> None:
        self.taken -= 1
        self._any.release()
        if long_poll:
            self._long_polls.release()


async def _tries(within: float | None = None) -> AsyncIterator[int]:
    """The tries of an undo or a take-back: UNDO_TRIES at least, then on until
    `within` (UNDO_WITHIN) seconds after the first, paused between them
    (UNDO_PAUSE, doubling up to UNDO_PAUSE_MAX)."""
    started, pause, tried = time.monotonic(), UNDO_PAUSE, 0
    within = UNDO_WITHIN if within is None else within
    while True:
        yield tried
        tried += 1
        if tried >= UNDO_TRIES and time.monotonic() - started >= within:
            return
        await asyncio.sleep(pause)
        pause = min(2 * pause, UNDO_PAUSE_MAX)


class Forwarder:
    """Sends topic requests to the brokers that own them."""

    def __init__(
        self,
        membership: Membership,
        *,
        token: str | None,
        answer_within: float = ANSWER_WITHIN,
        suspect_for: float = SUSPECT_FOR,
        peers_keepalive: float = api.BROKER_KEEPALIVE,
        connections: int = POOL_MIN,
    ) -> None:
        self.membership = membership
        # An idle connection is dropped well before its peer's server closes it
        # (`peers_keepalive`, the brokers' --keepalive-timeout): a request sent
        # as the peer closes meets "server disconnected", which for a pop is
        # AmbiguousWrite, and marks a healthy peer suspect.
        self.keepalive = api.client_keepalive(peers_keepalive)
        self.token = token
        self.answer_within = answer_within
        self.suspect_for = suspect_for
        self.connections = connections  # the pool's size (pool_size)
        self._slots = _Slots(connections)
        self._warned_at = -float("inf")
        self.forwarded = 0  # requests sent to another broker
        self.fallbacks = 0  # times a broker did not answer and the next one was tried
        self.undone = 0  # jobs given back by owners whose answer was lost (route's undo, take_back)
        self._session: aiohttp.ClientSession | None = None
        self._stopping = asyncio.Event()  # end_long_polls(): this broker is stopping
        self._closed = False
        # The broker that served each claim its topic's owner did not, and
        # each pop or complete its client named (_attempt): a retry under its
        # attempt id goes there first, whose engine answers it the jobs it
        # holds, or popped. The owner, back, would claim others, and those the
        # first try was answered would be held by nobody until their leases
        # ran out; it would pop others, and those would be done for nobody.
        # At most ATTEMPTS_SERVED_KEPT, each until when it is kept.
        self._served: OrderedDict[Attempt, tuple[float, Peer]] = OrderedDict()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Requests wait for a connection in _Slots, never in aiohttp's
            # queue, whose wait is timed as a connect (ConnectionTimeoutError):
            # a full pool would be taken for an owner that cannot be reached.
            # The limit stands behind the slots. It counts no idle connection:
            # _send closes those past the slots' room (_close_idle).
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.connections, keepalive_timeout=self.keepalive
                ),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        self._closed = True  # a background undo's next try would open a session again
        if self._session is not None:
            await self._session.close()

    def end_long_polls(self) -> None:
        """This broker is stopping: long polls it passed on are given up now
        (their callers told to ask again, AmbiguousWrite), not waited for."""
        self._stopping.set()

    @property
    def me(self) -> Peer:
        return self.membership.me

    async def route(
        self,
        topic: str,
        method: str,
        path_qs: str,
        body: bytes | None,
        *,
        wait: float = 0.0,
        content_type: str = "application/json",
        repeatable: bool = True,
        undo: api.UnpopRequest | None = None,
        take_back: api.ClaimRequest | None = None,
        named: api.UnpopRequest | None = None,
    ) -> Answer | Here:
        """The answer of the first broker in `topic`'s order that answers, or
        Here when this broker's turn comes first (it serves the request).
        `path_qs` is sent as it is, %-encoded as the request came (decoded, a
        job id of ".." or "a/b" would name another path). A request that is
        not `repeatable` (a pop: no id tells a repeat, and done twice it hands
        out one job and loses another) is not passed on once a broker got it
        without answering: AmbiguousWrite. Then, or when the caller goes away
        first, that broker is asked in the background to `undo` the pop or
        complete (POST /unpop): it may have done it, its answer lost. A claim
        (`take_back`, named by its attempt id) is served by the next broker
        under the same id: the one that got it without answering is asked
        again under it in the background, and what it answers goes back
        (take_back); its retries go first to the broker that served it. A
        pop or complete its client `named` (or its unpop, by the same name)
        goes to the broker its first try was sent to, suspect or not, while
        that one is live: it keeps what the try did. If that one does not
        answer, AmbiguousWrite again: done anywhere else, a retry would pop
        other jobs, an unpop give back none."""
        replayed = False
        started = time.monotonic()
        order = self.membership.order(topic)
        attempt = _attempt(topic, take_back, named)
        served = None if attempt is None else self._served_by(attempt, order)
        if served is not None:
            order = [served, *(p for p in order if p != served)]
        for tried, peer in enumerate(order):
            if attempt is not None:
                self._remember(attempt, peer)
            if peer == self.me:
                return Here(replayed)
            left = wait
            if tried and wait:  # a long poll: the next broker waits what is left of it
                left = max(0.0, wait - (time.monotonic() - started))
                path_qs, body = _waiting(path_qs, body, left)
            try:
                sending = self._send(
                    peer, method, path_qs, body, left, content_type, long_poll=left > 0
                )
                answer = await (self._unless_stopping(topic, peer, sending) if left else sending)
            except (asyncio.CancelledError, AmbiguousWrite):  # AmbiguousWrite: stopping
                if undo is not None:
                    in_background(self.undo(peer, topic, undo, within=UNDO_PATIENCE))
                raise
            except _Unreachable as exc:
                self.fallbacks += 1
                self.membership.suspect(peer.broker_id, self.suspect_for)
                if exc.sent and take_back is not None:
                    in_background(self.take_back(peer, topic, take_back))
                if named is not None and peer == served:
                    log.warning("%s did not answer for %s (%s)", peer.url, topic, exc)
                    raise AmbiguousWrite(
                        f"topic {topic!r}: {peer.url}, where attempt {named.attempt_id!r} "
                        f"was sent before, did not answer ({exc}); it may have done the "
                        "request, which is not done anywhere else: ask again"
                    ) from None
                if exc.sent and not repeatable:
                    log.warning("%s did not answer for %s (%s)", peer.url, topic, exc)
                    if undo is not None:
                        in_background(self.undo(peer, topic, undo, within=UNDO_PATIENCE))
                    raise AmbiguousWrite(
                        f"topic {topic!r}: its owner {peer.url} did not answer ({exc}); "
                        "it may have done the request, which is not done again here"
                    ) from None
                log.warning("%s did not answer for %s (%s): trying the next", peer.url, topic, exc)
                replayed = replayed or exc.sent
                continue
            answer.replayed = replayed
            return answer
        return Here(replayed)

    def _served_by(self, attempt: Attempt, order: list[Peer]) -> Peer | None:
        """The live broker (in `order`, suspect or not) `attempt` was served
        by or sent to lately, if one is remembered."""
        kept = self._served.get(attempt)
        if kept is None or kept[0] < time.monotonic() or kept[1] not in order:
            return None
        return kept[1]

    def _remember(self, attempt: Attempt, peer: Peer) -> None:
        """`attempt` is served by `peer`, or sent to it: remembered. A claim's
        is not when `peer` is the topic's owner (suspect or not: its retries
        go there anyway, and one the owner does not answer is served by the
        next broker, the owner's claim taken back), and is forgotten; a named
        pop's is, as only the broker that did it can answer its retry."""
        kept = self._served
        if attempt[0] == "claim" and peer == self.membership.home(attempt[1]):
            kept.pop(attempt, None)
            return
        now = time.monotonic()
        if attempt not in kept or kept[attempt][1] != peer:  # a retry served there keeps its time
            kept.pop(attempt, None)
            kept[attempt] = (now + api.CLAIM_ATTEMPTS_KEPT_S, peer)
        while kept and (len(kept) > ATTEMPTS_SERVED_KEPT or next(iter(kept.values()))[0] < now):
            kept.popitem(last=False)

    async def _unless_stopping(
        self, topic: str, peer: Peer, long_poll: Coroutine[Any, Any, Answer]
    ) -> Answer:
        """The answer of `long_poll` (a request passed on), given up if this
        broker starts stopping meanwhile: it would hold the stop for as long as
        it was to wait. The owner gives back what it had not answered; what it
        had, a claim's retry under its attempt id gets."""
        sending = asyncio.ensure_future(long_poll)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([sending, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not sending.done():
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
        if sending.cancelled():
            raise AmbiguousWrite(
                f"topic {topic!r}: this broker is stopping; its owner {peer.url} had not "
                "answered, and may have done the request: ask again"
            )
        return sending.result()

    async def undo(
        self,
        peer: Peer,
        topic: str,
        undo: api.UnpopRequest,
        raising: bool = False,
        within: float | None = None,
    ) -> int:
        """Ask `peer` to `undo` a pop or complete of `topic` whose answer was
        lost (route's `undo`), or that its caller gives back (Router.unpop):
        tried again while it does not answer, `within` seconds (UNDO_WITHIN;
        _tries), unless this broker is closed. How many jobs it gave back.
        `raising`: StoreUnavailable if `peer` did not answer all that while
        (it may yet, and its caller asks again), rather than 0 and a warning
        that its jobs stay done."""
        path = f"/topics/{topic}/unpop"
        body = msgspec.json.encode(undo)
        failed = "this broker stopped"
        unanswered = False
        async for tried in _tries(within):
            if self._closed:
                break
            try:
                async with self._slots.again if tried else contextlib.nullcontext():
                    answer = await self._send(peer, "POST", path, body, 0.0, "application/json")
            except (_Unreachable, Overloaded) as exc:
                failed, unanswered = str(exc), True
            else:
                if 200 <= answer.status < 300:
                    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                        given_back = msgspec.json.decode(answer.body, type=api.Unpopped)
                        self.undone += given_back.given_back
                        return given_back.given_back
                    return 0
                if answer.status < 500:  # refused: asking again gets the same
                    failed, unanswered = f"HTTP {answer.status}: {answer.body[:200]!r}", False
                    break
                failed, unanswered = f"HTTP {answer.status}", True
        if raising and unanswered and not self._closed:
            raise StoreUnavailable(f"{peer.url} did not undo a pop of {topic} ({failed})")
        log.warning("%s did not undo a pop of %s (%s): its jobs stay done", peer.url, topic, failed)
        return 0

    async def take_back(self, peer: Peer, topic: str, claim: api.ClaimRequest) -> int:
        """Give back what `peer` claimed for `claim` when its answer was lost
        (route's `take_back`): asked again under its attempt id, it answers
        the jobs it holds for it (had it claimed none, it claims what it can
        now, which goes back just the same), released there. Tried as an
        undo is (_tries), each answer waited for TAKE_BACK_PATIENCE more. How
        many jobs went back."""
        path = f"/topics/{topic}"
        again = msgspec.structs.replace(claim, wait=0.0, count=claim.count or 1)
        failed = "this broker stopped"
        async for tried in _tries():
            if self._closed:
                break
            try:
                async with self._slots.again if tried else contextlib.nullcontext():
                    given_back = await self._take_back(peer, path, again)
            except _Unreachable as exc:
                failed = str(exc)
            except SimpleQueueError as exc:
                failed = str(exc)
                if exc.http_status < 500:  # refused: asking again gets the same
                    break
            else:
                self.undone += given_back
                return given_back
        log.warning(
            "%s did not give back a claim of %s whose answer was lost (%s): "
            "its jobs are left to their leases",
            peer.url,
            topic,
            failed,
        )
        return 0

    async def _take_back(self, peer: Peer, path: str, claim: api.ClaimRequest) -> int:
        """One try of take_back: `claim` asked again, what it answers released."""
        asked = msgspec.json.encode(claim)
        answer = await self._send(
            peer, "POST", f"{path}/claim", asked, TAKE_BACK_PATIENCE, "application/json"
        )
        jobs = _jobs_of(answer)
        if not jobs:
            return 0
        release = msgspec.json.encode(api.ReleaseRequest(_held(jobs)))
        answer = await self._send(
            peer, "POST", f"{path}/release", release, TAKE_BACK_PATIENCE, "application/json"
        )
        return _decode(answer, api.Released).released

    async def tell(self, peer: Peer, path: str, *, place_within: float | None = None) -> bool:
        """POST `path` to `peer` (broker to broker); whether it answered 2xx.
        At most TELL_SHARE's part of the pool at once, waiting its turn (not
        told, False, if that takes over `place_within` seconds). A tell that
        gets no answer makes `peer` suspect, as a request passed on does,
        and those waiting their turn are not sent while it is (False):
        before, a tell marked nobody, and each of a paused owner's topics'
        held a connection for answer_within."""
        try:
            async with asyncio.timeout(place_within):
                await self._slots.tells.acquire()
        except TimeoutError:
            return False
        try:
            if self.membership.suspected(peer.broker_id):
                return False
            try:
                answer = await self._send(peer, "POST", path, b"{}", 0.0, "application/json")
            except _Unreachable as exc:
                log.warning("%s did not answer a tell (%s)", peer.url, exc)
                self.membership.suspect(peer.broker_id, self.suspect_for)
                return False
            except Overloaded:  # this broker's shortage, not the peer's
                return False
        finally:
            self._slots.tells.release()
        return 200 <= answer.status < 300

    async def _send(
        self,
        peer: Peer,
        method: str,
        path_qs: str,
        body: bytes | None,
        wait: float,
        content_type: str,
        *,
        long_poll: bool = False,
    ) -> Answer:
        """`peer`'s answer, given `wait` seconds more than ANSWER_WITHIN, over
        a connection of the pool once one is free (for a `long_poll`, its wait
        being `wait`, one of their share, or when none came within `wait`, a
        short request's with no wait). Overloaded when none was free in time,
        or this broker is out of descriptors: its own shortage, which says
        nothing of `peer`."""
        started = time.monotonic()
        if long_poll:
            try:
                async with asyncio.timeout(wait):
                    queued = await self._slots.take(long_poll=True)
            except TimeoutError:
                # Its wait ran out in line: what its caller asked for now is
                # what the owner holds at once (a job, or nothing: 404, nil),
                # asked as a short request, whose quarter long polls never hold.
                long_poll, wait = False, 0.0
                path_qs, body = _waiting(path_qs, body, 0.0)
            else:
                if queued:  # it waited its turn out of its wait: the owner waits the rest
                    wait = max(0.0, wait - (time.monotonic() - started))
                    path_qs, body = _waiting(path_qs, body, wait)
        if not long_poll:
            try:
                # Waited for as long as the answer would be: a pool held that
                # long by answers slower than that (long polls have their
                # share) is one this broker cannot serve from now.
                async with asyncio.timeout(self.answer_within + wait):
                    await self._slots.take(long_poll=False)
            except TimeoutError:
                self._warn(f"all {self.connections} in use for {self.answer_within + wait:g} s")
                raise Overloaded(
                    f"all {self.connections} of this broker's connections to the others are in "
                    f"use (passing a request on to {peer.url}): ask again"
                ) from None
        try:
            return await self._exchange(peer, method, path_qs, body, wait, content_type)
        finally:
            self._slots.give_back(long_poll)

    def _warn(self, what: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning("connections to the other brokers: %s: answering 503", what)

    async def _exchange(
        self,
        peer: Peer,
        method: str,
        path_qs: str,
        body: bytes | None,
        wait: float,
        content_type: str,
    ) -> Answer:
        # Its incarnation proves it a peer (Membership.vouches): a request passed
        # on may be larger than a client's (api.FORWARDED_ROOM).
        forwarded = f"{self.me.broker_id} {self.membership.incarnation}"
        headers = {FORWARDED: forwarded, "Content-Type": content_type}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        # A connection not made within half the time is given up before the
        # total timeout could fire: the latter cannot tell whether anything
        # was sent, a connect timeout (ConnectionTimeoutError) says nothing was.
        timeout = aiohttp.ClientTimeout(
            total=self.answer_within + wait, connect=self.answer_within / 2
        )
        self.forwarded += 1
        try:
            # Parsed whole here: an encoded URL's port is parsed when asked
            # for, by aiohttp, whose ValueError could not tell what was sent.
            base = URL(peer.url)
            # As a str, aiohttp would decode it and drop its dot segments:
            # GET /topics/t/jobs/%2E%2E asked as GET /topics/t/.
            url = URL(peer.url + path_qs, encoded=True)
        except ValueError as exc:  # a URL yarl cannot parse ("http://x:99999"): nothing sent
            raise _Unreachable(f"cannot send to {peer.url!r}: {exc}", sent=False) from exc
        # Sockets open to the others: one for each request in flight (this
        # one's included) and those kept idle, within the pool's size.
        connector = self._http().connector
        if connector is not None:  # it has one: _http() made it
            _close_idle(connector, self.connections - self._slots.taken, base)
        try:
            try:
                return await self._request(peer, method, url, body, headers, limits=timeout)
            except aiohttp.ConnectionTimeoutError:
                # Tried once more at once, as nothing was sent: the timer runs
                # on this broker's loop, which a stall of its own (a GC pause,
                # a large answer) lets fire after a healthy peer's connection
                # was made. An unreachable peer costs twice half the time.
                return await self._request(peer, method, url, body, headers, limits=timeout)
        except aiohttp.InvalidURL as exc:
            # One yarl takes and aiohttp refuses (":8080", relative): nothing
            # was sent. (The registry drops records naming no broker URL.)
            raise _Unreachable(f"cannot send to {peer.url!r}: {exc}", sent=False) from exc
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError) and exc.errno in OUT_OF_DESCRIPTORS:
                # No socket could be made: this broker's shortage. Taken for
                # the owner's, a healthy owner was routed around and its
                # topics served here, with descriptors this broker lacks.
                self._warn(str(exc))
                raise Overloaded(f"cannot connect to {peer.url}: {exc.strerror}") from exc
            # Never connected: nothing was sent.
            raise _Unreachable(str(exc) or type(exc).__name__, sent=False) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Unreachable(str(exc) or type(exc).__name__, sent=True) from exc

    async def _request(
        self,
        peer: Peer,
        method: str,
        url: URL,
        body: bytes | None,
        headers: dict[str, str],
        *,
        limits: aiohttp.ClientTimeout,
    ) -> Answer:
        async with self._http().request(
            method, url, data=body, headers=headers, timeout=limits
        ) as response:
            data = await response.read()
            kept = {k: v for k, v in response.headers.items() if k in _PASSED_ON}
            return Answer(
                response.status,
                data,
                response.headers.get("Content-Type", "application/json"),
                peer,
                headers=kept,
            )


def _close_idle(connector: aiohttp.BaseConnector, most: int, peer: URL) -> None:
    """Close connections `connector` keeps idle past `most`, the longest idle
    first and those to `peer` last: room for a request to it. aiohttp's limit
    counts connections in use only, and it keeps idle ones for each broker
    (for the keep-alive): 36 long polls to one, then 36 to another, held 72
    sockets for a pool of 48. aiohttp has no public way to close an idle
    connection: this trims its pool (`_conns`, for each host a queue of
    (protocol, when released)) as its own keep-alive cleanup does."""
    pool = connector._conns
    if sum(map(len, pool.values())) <= most:  # most requests: no list to build
        return
    idle = [
        (key.host == peer.host and key.port == peer.port, released, key, proto)
        for key, conns in pool.items()
        for proto, released in conns
        if proto.is_connected()
    ]
    idle.sort(key=lambda i: i[:2])  # another broker's first, the longest idle first
    for _, released, key, proto in idle[: max(0, len(idle) - most)]:
        pool[key].remove((proto, released))
        if not pool[key]:
            del pool[key]
        proto.close()


def _attempt(
    topic: str, claim: api.ClaimRequest | None, named: api.UnpopRequest | None
) -> Attempt | None:
    """A request's key among those remembered for their retries (route's
    `take_back`, `named`): a claim's, or a named pop's, complete's or unpop's
    (the worker id "" for a complete's, as the engine keys them), with its
    topic, its worker and its attempt id."""
    if named is not None:
        return "pop", topic, named.worker_id or "", named.attempt_id
    if claim is None or claim.attempt_id is None:
        return None
    return "claim", topic, claim.worker_id, claim.attempt_id


def _waiting(path_qs: str, body: bytes | None, left: float) -> tuple[str, bytes | None]:
    """A long poll's request (a claim's or pop's JSON body, a job's GET
    ?wait=) with its `wait` made `left` seconds: what a broker that did not
    answer left of it."""
    path, _, query = path_qs.partition("?")
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, f"{left:.3f}" if k == "wait" else v) for k, v in pairs])
        path_qs = f"{path}?{query}"
    if body:
        with contextlib.suppress(msgspec.DecodeError):
            fields = msgspec.json.decode(body)
            if isinstance(fields, dict) and "wait" in fields:
                body = msgspec.json.encode({**fields, "wait": left})
    return path_qs, body


# Pops named by their caller and served by another broker, remembered for
# their unpop until answered (Router._served_by), at most: those their caller
# holds (Router._held_by) are not counted, never dropped.
NAMED_POPS_KEPT = 10_000


class Router:
    """The topic operations the RESP face calls, each served by the topic's
    owner: this broker's engine, or another broker over HTTP."""

    def __init__(self, engine: Engine, forwarder: Forwarder) -> None:
        self.engine = engine
        self.forwarder = forwarder
        # The broker that served each pop its caller named, of those not
        # answered yet: unpop() asks that one, whoever owns the topic by then.
        # At most NAMED_POPS_KEPT, the oldest dropped; those the caller holds
        # (a RESP pipeline's, until it answers them or gives them back) are
        # never dropped: its connection bounds them.
        self._served_by: OrderedDict[tuple[str, str, str], Peer] = OrderedDict()
        self._held_by: dict[tuple[str, str, str], Peer] = {}

    def served_here(self, topic: str) -> bool:
        return self.forwarder.membership.owns(topic)

    async def _route(
        self,
        topic: str,
        method: str,
        path: str,
        body: Any,
        wait: float = 0.0,
        repeatable: bool = True,
        undo: api.UnpopRequest | None = None,
        take_back: api.ClaimRequest | None = None,
    ) -> Answer | None:
        """The answer of `topic`'s owner, None when this broker serves it. With
        `undo` (a pop's or complete's), the owner is asked to undo it should
        its answer be lost (Forwarder.route's undo); with `take_back` (a
        claim's), to give back what it claimed (Forwarder.route's take_back)."""
        if self.forwarder.membership.owns(topic):
            return None
        data = None if body is None else msgspec.json.encode(body)
        path = f"/topics/{topic}{path}"
        got = await self.forwarder.route(
            topic,
            method,
            path,
            data,
            wait=wait,
            repeatable=repeatable,
            undo=undo,
            take_back=take_back,
        )
        # Served here: a replay cannot be told over RESP, whose answers are counts.
        return None if isinstance(got, Here) else got

    async def _route_jobs(
        self, topic: str, path: str, specs: list[JobSpec]
    ) -> tuple[Answer | None, list[JobSpec]]:
        """New jobs routed: passed on with ids, which they keep when they are
        served here after a broker that did not answer (and may have made
        them): duplicates there, not new jobs. The specs to serve here."""
        if self.forwarder.membership.owns(topic):
            return None, specs
        specs = api.with_ids(specs)
        return await self._route(topic, "POST", path, api.EnqueueBatch(specs)), specs

    async def enqueue(self, topic: str, specs: list[JobSpec]) -> list[dict[str, Any]]:
        got, specs = await self._route_jobs(topic, "/enqueue", specs)
        if got is None:
            return await self.engine.enqueue(topic, specs)
        answer = _decode(got, api.EnqueuedBatch)
        duplicates = set(answer.duplicates)
        return [{"id": i, "duplicate": i in duplicates} for i in answer.ids]

    async def push(self, topic: str, specs: list[JobSpec]) -> int:
        got, specs = await self._route_jobs(topic, "/push", specs)
        if got is None:
            return await self.engine.push(topic, specs)
        return _decode(got, api.Pushed).length

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
        # `since` keeps a long poll's place in the line where it is served
        # here; passed on, the owner's line places it when it gets there.
        # An attempt id: cancelled (a BLPOP on several keys that another key
        # won), or served by the next broker when the owner answered too late,
        # an answer the owner had sent would be lost on its way, and the jobs
        # in it held by nobody until their leases ran out. Asked again under
        # it, the owner answers them, and they go back (_take_back, and
        # Forwarder.route's take_back).
        attempt_id = api.new_id()
        body = api.ClaimRequest(
            worker_id, lease=lease, wait=wait, count=count, attempt_id=attempt_id
        )
        started = time.monotonic()
        try:
            got = await self._route(topic, "POST", "/claim", body, wait, take_back=body)
        except (asyncio.CancelledError, AmbiguousWrite):  # AmbiguousWrite: this broker stops
            if not self.forwarder.membership.owns(topic):
                in_background(self._take_back(topic, worker_id, count, attempt_id))
            raise
        if got is None:
            wait = max(0.0, wait - (time.monotonic() - started))  # waited at an owner already
            since = started if since is None else since
            return await self.engine.claim(
                topic, worker_id, lease=lease, count=count, wait=wait, since=since
            )
        return _jobs_of(got)

    async def _take_back(self, topic: str, worker_id: str, count: int, attempt_id: str) -> None:
        """Give back what the cancelled claim `attempt_id` was answered, if its
        answer was on its way (asked again, the owner answers what it holds
        for it; had it not answered, this claims anew what it can, which goes
        back just the same)."""
        body = api.ClaimRequest(worker_id, count=count, attempt_id=attempt_id)
        try:
            got = await self._route(topic, "POST", "/claim", body)
            if got is None:
                jobs = await self.engine.claim(topic, worker_id, count=count, attempt_id=attempt_id)
            else:
                jobs = _jobs_of(got)
            if jobs:
                await self.release(topic, jobs)
        except SimpleQueueError as exc:
            log.warning(
                "a cancelled claim of %s: its jobs are left to their leases (%s)", topic, exc
            )

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
        # `since`: as claim's. An attempt id: should the owner's answer be
        # lost (this broker's caller went away, or the owner answered too
        # late), the owner is asked to undo the pop, as a pop served here is
        # undone for a caller gone. One the caller names is kept for its
        # unpop(), wherever it is served.
        named = attempt_id
        attempt_id = attempt_id or api.new_id()
        body = api.ClaimRequest(worker_id, wait=wait, count=count, attempt_id=attempt_id)
        started = time.monotonic()
        undo = api.UnpopRequest(attempt_id, worker_id)
        got = await self._route(topic, "POST", "/pop", body, wait, repeatable=False, undo=undo)
        if got is None:
            wait = max(0.0, wait - (time.monotonic() - started))  # waited at an owner already
            since = started if since is None else since
            return await self.engine.pop(
                topic,
                worker_id,
                count=count,
                wait=wait,
                attempt_id=named,
                since=since,
                held=held,
            )
        jobs = _jobs_of(got)
        if named is not None and jobs:
            self._served((topic, worker_id, named), got.served_by, held)
        return jobs

    def _served(self, attempt: tuple[str, str, str], peer: Peer, held: bool) -> None:
        """The named pop or completion `attempt` (topic, worker id, attempt id)
        was served by `peer`: its unpop() is asked of it. The owner keeps
        what it did for its undo as it keeps an HTTP client's named pops,
        within its bound (POPS_KEPT_BYTES): `held` is only kept to here."""
        if held:
            self._held_by[attempt] = peer
            return
        self._served_by[attempt] = peer
        while len(self._served_by) > NAMED_POPS_KEPT:
            self._served_by.popitem(last=False)

    def _served_at(self, attempt: tuple[str, str, str]) -> Peer | None:
        """The broker that served `attempt`, forgotten now; None: this one."""
        peer = self._held_by.pop(attempt, None)
        return self._served_by.pop(attempt, None) if peer is None else peer

    def forget_pop(self, topic: str, attempt_id: str, worker_id: str) -> None:
        # Kept here if it was served here; an owner's record runs out by itself.
        self._served_at((topic, worker_id, attempt_id))
        self.engine.forget_pop(topic, attempt_id, worker_id)

    async def unpop(self, topic: str, attempt_id: str, worker_id: str | None = None) -> int:
        # Asked of the broker that served the pop (it keeps what the pop did),
        # whoever owns the topic now; served here, this broker's engine. One
        # that did not answer (its store down past UNDO_WITHIN) is asked again
        # when its caller asks again (a RESP connection's give-back, tried on
        # while the pop's record is kept there): StoreUnavailable, the broker
        # kept. It was forgotten, and the job stayed done for nobody.
        attempt = (topic, worker_id or "", attempt_id)
        peer = self._served_at(attempt)
        if peer is None:
            return await self.engine.unpop(topic, attempt_id, worker_id)
        undo = api.UnpopRequest(attempt_id, worker_id)
        try:
            return await self.forwarder.undo(peer, topic, undo, raising=True)
        except StoreUnavailable:
            self._served(attempt, peer, held=False)
            raise

    async def release(self, topic: str, jobs: list[dict[str, Any]]) -> int:
        body = api.ReleaseRequest(_held(jobs))
        got = await self._route(topic, "POST", "/release", body)
        if got is None:
            return await self.engine.release(topic, jobs)
        return _decode(got, api.Released).released

    async def complete(
        self,
        topic: str,
        jobs: list[dict[str, Any]],
        attempt_id: str | None = None,
        held: bool = False,
    ) -> list[str]:
        # Not repeated: done here after an owner that did it, it completes nothing.
        # Undone at the owner should its answer be lost, as a pop's is. One
        # the caller names is kept for its unpop(), wherever it is served.
        named = attempt_id
        attempt_id = attempt_id or api.new_id()
        body = api.CompleteRequest(_held(jobs), attempt_id=attempt_id)
        undo = api.UnpopRequest(attempt_id)
        got = await self._route(topic, "POST", "/complete", body, repeatable=False, undo=undo)
        if got is not None and refused_attempt_id(got):
            # An owner older than POST /unpop (during an upgrade) refused the
            # field, and did nothing: asked without it.
            body = api.CompleteRequest(_held(jobs))
            got = await self._route(topic, "POST", "/complete", body, repeatable=False)
        if got is None:
            return await self.engine.complete(topic, jobs, attempt_id=named, held=held)
        if got.status == 404:  # an owner older than /complete (during an upgrade): ack
            acks = [AckRequest(j["id"], j["lease_token"]) for j in jobs]
            return [a["id"] for a in await self.ack_many(topic, acks) if "error" not in a]
        done = _decode(got, api.Completed).completed
        if named is not None and done and body.attempt_id is not None:
            self._served((topic, "", named), got.served_by, held)
        return done

    async def ack_many(self, topic: str, acks: list[AckRequest]) -> list[dict[str, Any]]:
        # Not repeated: done here after an owner that did it, an ack answers
        # conflict, and a pop (BLPOP on several keys) would not hand its job out.
        got = await self._route(topic, "POST", "/ack", api.AckBatch(acks), repeatable=False)
        if got is None:
            return await self.engine.ack_many(topic, acks)
        return _decode(got, dict[str, list[dict[str, Any]]])["results"]

    async def status(self, topic: str) -> dict[str, int]:
        got = await self._route(topic, "GET", "/status", None)
        if got is None:
            return await self.engine.status(topic)
        return _decode(got, dict[str, int])

    async def cancel(self, topic: str, job_ids: list[str]) -> dict[str, list[str]]:
        got = await self._route(topic, "POST", "/cancel", api.CancelRequest(job_ids))
        if got is None:
            return await self.engine.cancel(topic, job_ids)
        return _decode(got, dict[str, list[str]])


class _Jobs(msgspec.Struct):
    """A claim's or a pop's answer, as much of it as a broker passing it on
    reads: what else it says (a claim's `now`) is for the caller."""

    jobs: list[dict[str, Any]]


def refused_attempt_id(got: Answer) -> bool:
    """Whether `got` is an owner older than POST /unpop refusing a complete's
    (or, older than round 15, a pop's) attempt id: it did nothing."""
    return got.status == 400 and b"attempt_id" in got.body


def _jobs_of(got: Answer) -> list[dict[str, Any]]:
    """The jobs a claim or pop another broker served was answered: none for
    its 404 (nothing to claim)."""
    if got.status == NothingToClaim.http_status:
        return []
    return _decode(got, _Jobs).jobs


def _held(jobs: list[dict[str, Any]]) -> list[api.Held]:
    """Claims as a request names them (http.py's _claims reads them back)."""
    return [api.Held(j["id"], j["lease_token"]) for j in jobs]


def _decode(got: Answer, kind: type[T]) -> T:
    """A broker's 2xx answer as `kind`; the error it stands for otherwise."""
    if 200 <= got.status < 300:
        try:
            return msgspec.json.decode(got.body, type=kind)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BrokerError(f"{got.served_by.url}: {exc}", got.status) from None
    try:
        said: api.Error | None = msgspec.json.decode(got.body, type=api.Error)
    except (msgspec.DecodeError, msgspec.ValidationError):
        said = None
    message = None if said is None else said.error
    cls = errors.for_status(got.status, None if said is None else said.reason)
    if message is None or cls is None:
        raise BrokerError(f"{got.served_by.url}: HTTP {got.status}: {message}", got.status)
    raise cls(message)
