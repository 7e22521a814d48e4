"""broker.json: which broker is active, and how clients find it.

The active broker renews its record by conditional write (no read: its last
ETag is the condition); a standby reads it every third of the lease and takes
it over, bumping the epoch, once it has seen it unchanged for the record's
lease on its own monotonic clock: the heartbeat written in the record is never
compared with this broker's wall clock, so skewed clocks neither steal the
record from a healthy broker nor keep a dead one's. Every broker serves
correctly whether or not it is active; the record only tells clients where to
go. Heads name the epoch they were written under: a replaced broker that reads
a newer one looks at broker.json at once. The epoch fences no write: each
head's conditional write keeps brokers that disagree correct.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from simplequeue import keys
from simplequeue.broker.membership import Unwatched
from simplequeue.errors import ObjectNotFound, PreconditionFailed, StoreUnavailable
from simplequeue.objstore import ObjectStore
from simplequeue.records import BrokerRecord, CorruptRecord, read_record

log = logging.getLogger(__name__)

_RESIGN_TRIES = 5  # reads of a record still ours that another write just replaced
_UNSEEN_KEPT = 4  # writes of broker.json sent and not seen to land, kept to be told apart


class Announcer:
    """Keeps this broker's claim on broker.json: registers, renews, takes over."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        broker_id: str,
        url: str,
        lease_s: float,
        on_epoch: Callable[[int], None] = lambda epoch: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.broker_id = broker_id
        self.url = url
        self.lease_s = lease_s
        self.on_epoch = on_epoch
        self.clock = clock
        self.active = False
        self.epoch = 0
        self.seen: BrokerRecord | None = None  # the record as last read or written
        self._etag: str | None = None  # of our own record, while active
        # The registrations and take-overs sent since one was last seen to
        # land, the latest _UNSEEN_KEPT: an answer can say otherwise (a 5xx
        # after it landed, its retry's 412; a write left ambiguous), and then
        # a read finds it. Not only the latest: an ambiguous one can land
        # after the next is sent, on the same condition, which refuses the
        # next. Compared whole (its heartbeat a stamp of its own), not by
        # broker id: one an earlier process under the same --broker-id wrote
        # is not ours.
        self._unseen: list[BrokerRecord] = []
        self._sighting: tuple[str, float] | None = None  # (ETag, monotonic time first seen)
        self._unwatched = Unwatched()  # reads of broker.json that failed
        self._corrupt_logged = False
        self._last_beat = 0.0  # the latest heartbeat this broker wrote
        self._wake = asyncio.Event()

    def _record(self, epoch: int, heartbeat_at: float) -> BrokerRecord:
        """The record to write, its heartbeat later than this broker's last
        (a resignation's, 0, left alone). After a step back of the store's
        clock, now() answers one value until it catches up: each renewal
        wrote the same bytes, the same ETag, and a standby that saw it
        unchanged for a lease took over from a healthy broker."""
        if heartbeat_at > 0:
            heartbeat_at = self._last_beat = max(heartbeat_at, self._last_beat + 0.001)
        return BrokerRecord(self.broker_id, self.url, epoch, heartbeat_at, self.lease_s)

    async def step(self) -> None:
        """One round: register if there is no record, renew ours, take over a
        stale one, or stand by."""
        # The heartbeat is on the store's clock, never on a guess: a localfs
        # handle that wrote nothing yet (its reads carry no stamp) would stamp
        # it with the wall clock, and a broker minutes behind announce itself
        # minutes stale (at its first round, before the committer samples).
        await self.store.sample_clock()
        now = self.clock()
        if self.active and self._etag is not None:
            mine = self._record(self.epoch, now)
            try:
                self._etag = await self.store.put_if(
                    keys.BROKER, mine.encode(), if_match=self._etag
                )
                self.seen = mine
                return
            except PreconditionFailed:
                self._etag = None  # someone else wrote it: read it, below
        try:
            current = await self._read()
        except CorruptRecord as exc:
            # A record that cannot be read names no live broker: replace it.
            if not self._corrupt_logged:
                log.error("%s; this broker replaces it", exc)
                self._corrupt_logged = True
            with contextlib.suppress(PreconditionFailed):
                mine = self._sent(self._record(self.epoch + 1, now))
                etag = await self.store.put_if(keys.BROKER, mine.encode(), if_match=exc.etag)
                self._became(mine, etag, "replaced an unreadable broker.json")
            return
        try:
            if current is None:
                mine = self._sent(self._record(1, now))
                etag = await self.store.put_if(keys.BROKER, mine.encode(), if_none_match=True)
                self._became(mine, etag, "registered")
                return
            record, etag = current
            self.seen = record
            if record in self._unseen:
                self._became(record, etag, "its write landed, though not answered so")
            if record.broker_id == self.broker_id and record.epoch == self.epoch:
                mine = self._record(self.epoch, now)
                self._etag = await self.store.put_if(keys.BROKER, mine.encode(), if_match=etag)
                self.seen, self.active = mine, True
            elif record.resigned or self._unchanged_for(etag) > record.lease:
                mine = self._sent(self._record(record.epoch + 1, now))
                new_etag = await self.store.put_if(keys.BROKER, mine.encode(), if_match=etag)
                how = f"took over from {record.broker_id} (epoch {record.epoch})"
                self._became(mine, new_etag, how)
            else:
                if self.active:
                    log.warning("replaced by %s (epoch %d)", record.broker_id, record.epoch)
                self.active = False
        except PreconditionFailed:
            self.active = False  # someone else wrote it first; look again next round
            self.poke()

    async def _read(self) -> tuple[BrokerRecord, str] | None:
        """broker.json, as read_record. A read that fails leaves this broker
        blind: at its next, the record's sighting has not aged since the
        last read that worked (SPEC 4.3: stale once seen unchanged for a
        lease). Aged through an outage of the store longer than the lease,
        during which the active broker could not renew, a healthy active
        broker was taken over at the first read after it that came before
        its renewal. Watched from then instead, a dead active broker was
        never replaced while one read in four failed."""
        try:
            current = await read_record(self.store)
        except CorruptRecord:
            self._unwatched.read(time.monotonic())  # read: there is nothing to watch
            raise
        except BaseException:
            self._unwatched.failed()
            raise
        mono = time.monotonic()
        unwatched = self._unwatched.read(mono)
        if unwatched and self._sighting is not None:
            etag, since = self._sighting
            self._sighting = (etag, min(mono, since + unwatched))
        return current

    def _sent(self, record: BrokerRecord) -> BrokerRecord:
        """`record`, about to be written: this broker's own if a read finds it."""
        self._unseen = [*self._unseen, record][-_UNSEEN_KEPT:]
        return record

    def _unchanged_for(self, etag: str) -> float:
        """Seconds this broker has seen broker.json as `etag`, on its own
        monotonic clock (0 the first time it sees it)."""
        mono = time.monotonic()
        if self._sighting is None or self._sighting[0] != etag:
            self._sighting = (etag, mono)
        return mono - self._sighting[1]

    def _became(self, record: BrokerRecord, etag: str, how: str) -> None:
        log.info(
            "active broker %s at %s, epoch %d: %s", self.broker_id, self.url, record.epoch, how
        )
        self.seen, self.active, self.epoch = record, True, record.epoch
        self._etag, self._unseen = etag, []
        self.on_epoch(record.epoch)

    def poke(self) -> None:
        """Run the next round now (for instance after being fenced)."""
        self._wake.set()

    async def run(self) -> None:
        """Rounds every third of the lease until cancelled."""
        while True:
            try:
                await self.step()
            except StoreUnavailable as exc:
                log.warning("broker.json: store unavailable: %s", exc)
            except Exception:  # a full disk (StorageFull), a bug: the next round tries again
                log.exception("broker.json: round failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.lease_s / 3):
                    await self._wake.wait()

    async def resign(self) -> None:
        """On a clean shutdown: mark our record resigned (a heartbeat of 0), so
        that a standby takes over at its next round. A renewal cancelled by the
        shutdown may still land after our read (a localfs write finishes in its
        thread, an S3 PUT already sent is served): then the condition fails and
        we read again, for as long as the record is still ours."""
        if not self.active:
            return
        with contextlib.suppress(StoreUnavailable, ObjectNotFound, CorruptRecord):
            for _ in range(_RESIGN_TRIES):
                current = await read_record(self.store)
                if current is None or current[0].broker_id != self.broker_id:
                    break
                gone = self._record(self.epoch, 0.0)
                try:
                    await self.store.put_if(keys.BROKER, gone.encode(), if_match=current[1])
                    break
                except PreconditionFailed:
                    continue
        self.active = False
