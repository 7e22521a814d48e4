"""Brokers and who owns which topic (SPEC 4.3).

Each broker registers in brokers/<id>.json and renews it every third of its
lease; each reads the others' records and counts a broker live while it has
seen its record change within the record's lease, on its own monotonic clock:
the times written in records are never compared with this broker's clock, so
brokers whose wall clocks disagree still agree on who is alive. It counts
itself live while its own record was written within its lease, as the others
see it, or while it sees no other broker live; a renewal that lands more than
a lease after its last is a change of the live set (without it, then with
it), as the others may have dropped it meanwhile. A topic's owner
is the live broker with the highest rendezvous hash of (topic, broker id); the
rest of that order says who serves the topic when those before it do not
answer. Ownership is routing, not a lock: the head's conditional write keeps
brokers that disagree about it correct, only slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from simplequeue import api, keys
from simplequeue.errors import (
    CorruptData,
    ObjectNotFound,
    PreconditionFailed,
    SimpleQueueError,
    StoreUnavailable,
)
from simplequeue.objstore import ObjectStore
from simplequeue.records import MAX_LEASE_S, BrokerRecord

log = logging.getLogger(__name__)

# A record nobody renewed for this many of its leases is deleted by whoever
# sees it: a broker killed without a goodbye leaves one behind.
FORGET_AFTER_LEASES = 10
RANKED_KEPT = 10_000  # topics whose broker order is kept between changes of the live set
INCARNATIONS_KEPT = 8  # per broker id: processes told apart from one restarted
# A record read when asked (Membership.learn): within this many seconds, and
# once in this many for a broker id it did not vouch for; such reads kept, at most.
LEARN_WITHIN = 0.5
LEARN_EVERY = 1.0
LEARNS_KEPT = 1_000


@dataclass(frozen=True)
class Peer:
    """A broker, as routing knows it. `restarts` counts the times this broker
    saw it register again under its id: a restarted broker is another peer,
    as one that left and came back is."""

    broker_id: str
    url: str
    restarts: int = 0


def rendezvous(topic: str, broker_id: str) -> int:
    """The weight of `broker_id` for `topic`: the highest owns it."""
    digest = hashlib.blake2b(f"{topic}\x00{broker_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Unwatched:
    """Reads of records that failed since the last that worked (an outage of
    the store, when no broker can renew its own either): the time a record
    could not be watched, which SPEC 4.3's "seen unchanged for a lease"
    does not count (Membership's registrations, Announcer's broker.json)."""

    def __init__(self) -> None:
        self._failed = False
        self._read_at: float | None = None  # monotonic: the last read that worked

    def failed(self) -> None:
        self._failed = True

    def read(self, mono: float) -> float:
        """A read worked at `mono` (monotonic): the seconds since the last
        that did if one failed between, unwatched; else 0."""
        unwatched = 0.0
        if self._failed and self._read_at is not None:
            unwatched = mono - self._read_at
        self._failed, self._read_at = False, mono
        return unwatched


@dataclass
class _Sighting:
    etag: str
    # Monotonic: since when this broker has watched this version, unchanged
    # (the time it could not watch it left out: Unwatched).
    changed_at: float
    record: BrokerRecord
    restarts: int = 0  # incarnations seen after the first
    incarnations: tuple[str, ...] = ()  # the latest INCARNATIONS_KEPT seen, newest last


def _registration(data: bytes, key: str) -> BrokerRecord:
    """The registration `data`, or CorruptData: not a record, or one whose
    url names no broker (one yarl cannot parse made every request forwarded
    to it fail with a 500, never routed around)."""
    record = BrokerRecord.decode(data, key)
    try:
        api.check_broker_url(record.url)
    except ValueError as exc:
        raise CorruptData(key, str(exc)) from None
    return record


class Membership:
    """This broker's registration, and the live brokers as it sees them."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        broker_id: str,
        url: str,
        lease_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        keys.check_broker_id(broker_id)
        self.store = store
        self.me = Peer(broker_id, url)
        self.incarnation = uuid.uuid4().hex[:16]  # this process's registration
        self.lease_s = lease_s
        self.clock = clock  # the store's, in a broker: what records are stamped with
        self.on_change: Callable[[tuple[Peer, ...], tuple[Peer, ...]], None] | None = None
        self.live: tuple[Peer, ...] = (self.me,)  # sorted by broker id
        # Monotonic: when the live brokers last changed (this one came, to begin with).
        self.changed_at = time.monotonic()
        # The longest lease among the live brokers (this one's, the others'
        # records'): each sees a change within a third of its own lease.
        self.settle_s = lease_s
        self._seen: dict[str, _Sighting] = {}
        self._etag: str | None = None
        self._beats = 0
        # Monotonic: when the last write of this broker's record that landed
        # was sent. The others count it live for its lease from then at most.
        self._written_at: float | None = None
        self._dropped_self = False  # it counts itself out: said once
        # Brokers that did not answer a forwarded request: passed over until then.
        self._suspect: dict[str, float] = {}
        self._ranked: dict[str, list[Peer]] = {}  # topic -> live brokers by its hash
        self._wake = asyncio.Event()
        # Brokers forgotten for having this broker's address, and whether one
        # that came back (alive: two brokers advertise one URL) was reported.
        self._at_my_address: dict[str, bool] = {}
        self._twins: set[str] = set()  # broker ids two processes were seen to share
        # Records read when asked (learn), by broker id: when, and the read.
        self._learning: dict[str, tuple[float, asyncio.Task[None]]] = {}
        self._unreadable: set[str] = set()  # broker ids whose record's last read failed
        self._unwatched = Unwatched()  # listings of brokers/ that failed
        # Broker ids whose record names no broker (not one, or no broker URL):
        # the ETag of the version said so, said once.
        self._corrupt: dict[str, str] = {}

    def set_url(self, url: str) -> None:
        """This broker's URL, once it listens."""
        self.me = Peer(self.me.broker_id, url)
        self.live = tuple(self.me if p.broker_id == self.me.broker_id else p for p in self.live)
        self._ranked = {}

    @property
    def key(self) -> str:
        return keys.registration(self.me.broker_id)

    def _record(self) -> BrokerRecord:
        # `epoch` counts this registration's renewals: every renewal changes it.
        return BrokerRecord(
            self.me.broker_id,
            self.me.url,
            self._beats,
            self.clock(),
            self.lease_s,
            self.incarnation,
        )

    # --- routing ---------------------------------------------------------------------

    def order(self, topic: str) -> list[Peer]:
        """Live brokers in the order they serve `topic`: its owner first. Brokers
        that lately did not answer go last (this one never does)."""
        ranked = self._rank(topic)
        if not self._suspect:
            return ranked
        now = time.monotonic()
        for broker_id, until in list(self._suspect.items()):
            if until <= now:
                del self._suspect[broker_id]
        return sorted(ranked, key=lambda p: p.broker_id in self._suspect)

    def _rank(self, topic: str) -> list[Peer]:
        """Live brokers by `topic`'s hash, suspect or not."""
        ranked = self._ranked.get(topic)
        if ranked is None:  # asked on every request: kept until the live set changes
            if len(self._ranked) >= RANKED_KEPT:
                self._ranked.clear()
            ranked = self._ranked[topic] = sorted(
                self.live, key=lambda p: rendezvous(topic, p.broker_id), reverse=True
            )
        return ranked

    def owner(self, topic: str) -> Peer:
        return self.order(topic)[0]

    def home(self, topic: str) -> Peer:
        """`topic`'s owner were no broker suspect: where its requests go again
        once the one that did not answer is not."""
        return self._rank(topic)[0]

    def vouches(self, forwarded: str) -> bool:
        """Whether `forwarded` (a Simplequeue-Forwarded header: a broker id and
        its process's incarnation, which only the registry tells) names a
        broker this one has seen registered: a peer, not a client posing as
        one."""
        broker_id, _, incarnation = forwarded.partition(" ")
        seen = self._seen.get(broker_id)
        return bool(incarnation) and seen is not None and incarnation in seen.incarnations

    async def learn(self, forwarded: str) -> bool:
        """vouches(), once the record of a broker this one has not seen under
        that incarnation was read: it registered since this broker's last
        round (it just started, or restarted), and a request it passed on came
        first. Read within LEARN_WITHIN seconds, at most once every
        LEARN_EVERY for a broker id (requests that come meanwhile wait for the
        same read): a client posing as a peer makes a read a second at most
        for each broker id it names."""
        if self.vouches(forwarded):
            return True
        broker_id, _, incarnation = forwarded.partition(" ")
        if (
            not incarnation
            or broker_id == self.me.broker_id
            or keys.BROKER_ID_RE.fullmatch(broker_id) is None
        ):
            return False
        now = time.monotonic()
        learning = self._learning.get(broker_id)
        if learning is None or (learning[1].done() and now - learning[0] >= LEARN_EVERY):
            if len(self._learning) >= LEARNS_KEPT:
                self._learning = {b: r for b, r in self._learning.items() if not r[1].done()}
            learning = (now, asyncio.ensure_future(self._read_record(broker_id)))
            self._learning[broker_id] = learning
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(learning[1]), LEARN_WITHIN)
        return self.vouches(forwarded)

    async def _read_record(self, broker_id: str) -> None:
        try:
            await self._look_at(broker_id, time.monotonic())
        except StoreUnavailable as exc:
            log.warning("broker registry: could not read %s's record: %s", broker_id, exc)
        except Exception:
            log.exception("broker registry: could not read %s's record", broker_id)

    def owns(self, topic: str) -> bool:
        return self.owner(topic) == self.me

    def settled_owner(self, topic: str) -> bool:
        """Whether this broker owns `topic`, standing in for no broker that did
        not answer, and has since the others could all have seen it
        (settled_since)."""
        return self.settled_since(topic) is not None

    def settled_since(self, topic: str) -> float | None:
        """The monotonic time since which this broker is `topic`'s settled
        owner, None if it is not: it owns the topic, standing in for no
        broker that did not answer, and the live brokers have not changed
        for the longest lease among them (settle_s). A broker that has not
        seen the change yet may write the topic as its owner, and tells
        nobody; each looks every third of its own lease, so a lease leaves
        two of its looks to a slow one. This broker's own lease was not
        enough: one with a longer --broker-lease looks later (lease 30 s,
        every 10 s, while one of 1.5 s settled after 1.5 s and answered
        claims "nothing to claim" from memory, a job pending, for 24.7 s).
        What was written before then reached this broker's memory only if
        read after it (Engine._looks)."""
        if self.home(topic) != self.me:
            return None
        since = self.changed_at + self.settle_s
        return since if time.monotonic() >= since else None

    def suspect(self, broker_id: str, seconds: float) -> None:
        """`broker_id` did not answer: route around it for `seconds`."""
        if broker_id != self.me.broker_id:
            self._suspect[broker_id] = time.monotonic() + seconds

    def suspected(self, broker_id: str) -> bool:
        """Whether `broker_id` did not answer lately (routed around: suspect())."""
        return self._suspect.get(broker_id, 0.0) > time.monotonic()

    def peer(self, broker_id: str) -> Peer | None:
        return next((p for p in self.live if p.broker_id == broker_id), None)

    # --- the registry ------------------------------------------------------------------

    async def register(self) -> None:
        """Write this broker's record (a restarted broker of the same id takes
        over its own record)."""
        self._beats += 1
        sent = time.monotonic()
        self._etag = await self.store.put(self.key, self._record().encode())
        self._written_at = sent

    async def step(self) -> None:
        """Renew this broker's record, read the others', and see who is live:
        whether or not the renewal landed (the view froze while it failed, a
        dead broker live in it for as long, its topics taken over by no one)."""
        await self._renew_logged()
        await self.look()

    async def look(self) -> None:
        """Read the others' records, and see who is live. Only a failed
        listing ends the round before that: a record that cannot be read is
        that broker's sighting left to age (_look_at_logged).

        A failed listing leaves this broker blind: at its next one, the
        records it finds unchanged have not aged since the last listing that
        worked (SPEC 4.3: stale once seen unchanged for a lease). Aged
        through an outage of the store longer than the lease, during which
        no broker could renew its own, every other broker was dropped at the
        first round after it that came before their renewals, their topics
        all taken and handed back. Watched from then instead, a dead broker
        was never dropped while one listing in four failed."""
        try:
            listed = await self.store.list(keys.BROKERS_PREFIX)
        except BaseException:
            self._unwatched.failed()
            raise
        mono = time.monotonic()
        blind_for = self._unwatched.read(mono)
        ids = {b for b in (keys.broker_of(k) for k in listed) if b and b != self.me.broker_id}
        for gone in set(self._seen) - ids:
            del self._seen[gone]
        self._unreadable &= ids
        self._corrupt = {b: e for b, e in self._corrupt.items() if b in ids}
        for broker_id in sorted(ids):
            await self._look_at_logged(broker_id, mono, blind_for=blind_for)
        live = []
        settle_s = self.lease_s
        for broker_id, seen in list(self._seen.items()):
            age = mono - seen.changed_at
            mine = seen.record.url == self.me.url
            if mine and not self._same_address(broker_id):
                # An earlier broker at this broker's address (it was killed and
                # this one started in its place): it cannot be alive, and
                # requests routed to it would come here, which would hand its
                # topics over to itself.
                await self._forget(broker_id, "it had this broker's address")
            elif age < seen.record.lease:
                # One alive at this address stays out of the live set (its
                # requests would come here), but its record stays: deleted
                # every round, it registered again at every renewal, and each
                # other broker saw a broker leave and read every head it owns.
                if not mine:
                    live.append(Peer(broker_id, seen.record.url, seen.restarts))
                    settle_s = max(settle_s, seen.record.lease)
            elif (
                age > FORGET_AFTER_LEASES * seen.record.lease and broker_id not in self._unreadable
            ):
                # Not one this broker cannot read: it may be renewed all along,
                # and deleting it would make its broker register again.
                await self._forget(broker_id, "its record was not renewed for long")
        if self._counts_itself(bool(live)):
            live.append(self.me)
        self.settle_s = settle_s
        self._set_live(tuple(sorted(live, key=lambda p: p.broker_id)))

    def _counts_itself(self, others: bool) -> bool:
        """Whether this broker is live in its own view: while the others may
        see it so, its record written within its lease. One whose writes fail
        is dropped by the others after its lease; it owns none of the topics
        they take over (it passes their requests on), unless it sees no other
        broker live: then it serves them all."""
        written = self._written_at is not None and (
            time.monotonic() - self._written_at < min(self.lease_s, MAX_LEASE_S)
        )
        if written or not others:
            self._dropped_self = False
            return True
        if not self._dropped_self:
            self._dropped_self = True
            log.warning(
                "this broker's record %s was not renewed for its lease (%g s): the others "
                "take it for gone, and it serves their topics no more until it is",
                self.key,
                self.lease_s,
            )
        return False

    def _same_address(self, broker_id: str) -> bool:
        """Whether `broker_id`, whose record has this broker's address, is
        alive: it was forgotten for that once, and registered again. The two
        advertise one URL (a load balancer's, or a copied --advertise-url).
        Each takes the other for dead and owns every topic: correct
        (conditional writes), but they contend on every write. Said once, as
        an error: the operator must give each its own URL."""
        if broker_id not in self._at_my_address:
            self._at_my_address[broker_id] = False
        elif not self._at_my_address[broker_id]:
            self._at_my_address[broker_id] = True
            log.error(
                "broker %s, alive, advertises this broker's URL %s too: give each "
                "broker its own --advertise-url (until then both serve every topic)",
                broker_id,
                self.me.url,
            )
        return self._at_my_address[broker_id]

    async def _renew_logged(self) -> None:
        try:
            await self._renew()
        except StoreUnavailable as exc:
            log.warning("broker registry: could not renew %s: %s", self.key, exc)
        except Exception:
            log.exception("broker registry: could not renew %s", self.key)

    async def _renew(self) -> None:
        self._beats += 1
        record = self._record().encode()
        sent = time.monotonic()
        try:
            if self._etag is None:
                raise PreconditionFailed("not registered")
            self._etag = await self.store.put_if(self.key, record, if_match=self._etag)
        except (PreconditionFailed, ObjectNotFound):
            # Deleted as stale (this broker was paused for long), or never written.
            log.info("registering %s at %s", self.me.broker_id, self.me.url)
            sent = time.monotonic()
            self._etag = await self.store.put(self.key, record)
        last, self._written_at = self._written_at, sent
        if last is not None and time.monotonic() - last >= min(self.lease_s, MAX_LEASE_S):
            self._back_after_lease()

    def _back_after_lease(self) -> None:
        """This broker's renewal landed more than a lease after its last (it
        was paused, or its writes failed): the others may have dropped it
        meanwhile, and written its topics as their owners, telling it
        nothing. Its view did not change if this renewal came before its
        next look (both timers were due at once), and it answered claims from
        its memory, a settled owner, for up to OWNER_LOOK_INTERVAL (30 s).
        Taken for a change of the live set, a view without this broker and
        then with it: the duties read every topic it owns again, as at start
        (what it held of them goes), and its long polls look at the store as
        an unsettled owner's do. Not when it already counts itself out: its
        next look brings it back, a change."""
        if self.me not in self.live:
            return
        log.info(
            "this broker's record was renewed more than its lease after the last: "
            "its topics are read again"
        )
        self.changed_at = time.monotonic()
        if self.on_change is not None:
            without = tuple(p for p in self.live if p != self.me)
            self.on_change(self.live, without)
            self.on_change(without, self.live)

    async def _look_at_logged(self, broker_id: str, mono: float, *, blind_for: float = 0.0) -> None:
        """_look_at, a failed read being that record's problem only. One
        record the store refused (S3's AccessDenied on one object, a file of
        another user's) failed every round before the live set was worked
        out: the view froze, and a broker dying afterwards stayed live for
        good (its leases never reaped, its schedules never fired).

        Its broker's last sighting ages as an unrenewed one does, so it drops
        out after its lease, alive or not. Kept live instead, a dead broker
        would stay so for as long as its record cannot be read; dropped while
        alive, its topics have two owners, which conditional writes keep
        correct (ownership is routing, not a lock): contention, not a
        stranded topic. Said once while it lasts, not every round."""
        try:
            await self._look_at(broker_id, mono, blind_for=blind_for)
        except Exception as exc:  # CancelledError is no Exception: it goes through
            if broker_id not in self._unreadable:
                self._unreadable.add(broker_id)
                log.log(
                    logging.WARNING if isinstance(exc, SimpleQueueError) else logging.ERROR,
                    "broker registry: cannot read %s's record (%s); it counts as live only "
                    "until its last sighting's lease runs out",
                    broker_id,
                    exc,
                    exc_info=not isinstance(exc, SimpleQueueError),
                )
        else:
            if broker_id in self._unreadable:
                self._unreadable.discard(broker_id)
                log.info("broker registry: %s's record reads again", broker_id)

    async def _look_at(self, broker_id: str, mono: float, *, blind_for: float = 0.0) -> None:
        """Read `broker_id`'s record at `mono`. Found unchanged, it ages, but
        for the `blind_for` seconds since the last listing that worked (a
        listing failed since)."""
        key = keys.registration(broker_id)
        try:
            data, etag = await self.store.get(key)
        except ObjectNotFound:
            self._seen.pop(broker_id, None)
            return
        seen = self._seen.get(broker_id)
        if seen is not None and seen.etag == etag:
            seen.changed_at = min(mono, seen.changed_at + blind_for)
            return  # unchanged: it ages
        try:
            record = _registration(data, key)
        except CorruptData as exc:
            if self._corrupt.get(broker_id) != etag:
                self._corrupt[broker_id] = etag
                log.error("%s; it names no live broker", exc)
            self._seen.pop(broker_id, None)
            return
        self._corrupt.pop(broker_id, None)
        restarts, incarnations = (0, ()) if seen is None else (seen.restarts, seen.incarnations)
        new = record.incarnation
        if new and new not in incarnations:
            if seen is not None:
                # Another process under this id (after one seen, or a build
                # that wrote no incarnation): a restart, or a twin, which
                # counts once. What the one before wrote may be known to it
                # no more (leases on topics it does not own): the owners read
                # their topics, as when a broker leaves.
                restarts += 1
                log.info("broker %s restarted (a new process under its id)", broker_id)
            incarnations = (*incarnations, new)[-INCARNATIONS_KEPT:]
        elif new and seen is not None and new != seen.record.incarnation:
            self._twin(broker_id)
        self._seen[broker_id] = _Sighting(etag, mono, record, restarts, incarnations)

    def _twin(self, broker_id: str) -> None:
        """Two live processes write one broker's record in turn. Each takes
        the other's topics for its own; correct (conditional writes), but the
        others route to whichever wrote last. Said once, as an error."""
        if broker_id not in self._twins:
            self._twins.add(broker_id)
            log.error(
                "two brokers run under the broker id %s (their records alternate): "
                "give each its own --broker-id",
                broker_id,
            )

    async def _forget(self, broker_id: str, why: str) -> None:
        log.info("forgetting %s: %s", broker_id, why)
        self._seen.pop(broker_id, None)
        with contextlib.suppress(SimpleQueueError):
            await self.store.delete(keys.registration(broker_id))

    def _set_live(self, live: tuple[Peer, ...]) -> None:
        old, self.live = self.live, live
        self._ranked = {}
        if old != live:
            self.changed_at = time.monotonic()
            log.info("live brokers: %s", ", ".join(p.broker_id for p in live))
            if self.on_change is not None:
                self.on_change(old, live)

    async def run(self) -> None:
        """Renewals every third of the lease, and rounds reading the others'
        records as often, until cancelled. Each on its own: renewals waited
        for the reads, and one slow read (an S3 GET retried past its timeout,
        10 s of a 15 s lease) made this broker's renewal late enough for the
        others to take it for dead (its topics changed owner and back)."""
        renewing = asyncio.create_task(self._renewing(), name="membership renewals")
        try:
            while True:
                try:
                    await self.look()
                except StoreUnavailable as exc:
                    log.warning("broker registry: store unavailable: %s", exc)
                except Exception:
                    log.exception("broker registry: round failed")
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.lease_s / 3):
                        await self._wake.wait()
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)

    async def _renewing(self) -> None:
        """This broker's record renewed every third of its lease, from the
        start of one renewal to the next (at once after one that took longer)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            await self._renew_logged()
            due = max(due + self.lease_s / 3, loop.time())
            await asyncio.sleep(due - loop.time())

    def poke(self) -> None:
        self._wake.set()

    async def leave(self) -> None:
        """On a clean shutdown: remove this broker's record, so that the others
        stop routing to it at their next round."""
        with contextlib.suppress(SimpleQueueError):
            await self.store.delete(self.key)
