"""broker.json: which broker is active, and how clients find it.

The active broker renews its record by conditional write; a standby takes over
when the record's heartbeat is older than its lease, bumping the epoch. Every
broker serves correctly whether or not it is active; the record only tells
clients where to go, and the epoch fences a replaced broker's topic writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from simplequeue import keys
from simplequeue.errors import ObjectNotFound, PreconditionFailed, StoreUnavailable
from simplequeue.objstore import ObjectStore
from simplequeue.records import BrokerRecord, CorruptRecord, read_record

log = logging.getLogger(__name__)


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
        self._corrupt_logged = False
        self._wake = asyncio.Event()

    def _record(self, epoch: int, heartbeat_at: float) -> BrokerRecord:
        return BrokerRecord(self.broker_id, self.url, epoch, heartbeat_at, self.lease_s)

    async def step(self) -> None:
        """One round: register if there is no record, renew ours, take over a
        stale one, or stand by."""
        now = self.clock()
        try:
            current = await read_record(self.store)
        except CorruptRecord as exc:
            # A record that cannot be read names no live broker: replace it.
            if not self._corrupt_logged:
                log.error("%s; this broker replaces it", exc)
                self._corrupt_logged = True
            with contextlib.suppress(PreconditionFailed):
                mine = self._record(self.epoch + 1, now)
                await self.store.put_if(keys.BROKER, mine.encode(), if_match=exc.etag)
                self._became(mine, "replaced an unreadable broker.json")
            return
        try:
            if current is None:
                mine = self._record(1, now)
                await self.store.put_if(keys.BROKER, mine.encode(), if_none_match=True)
                self._became(mine, "registered")
                return
            record, etag = current
            self.seen = record
            if record.broker_id == self.broker_id and record.epoch == self.epoch:
                mine = self._record(self.epoch, now)
                await self.store.put_if(keys.BROKER, mine.encode(), if_match=etag)
                self.seen, self.active = mine, True
            elif record.age(now) > record.lease_s:
                mine = self._record(record.epoch + 1, now)
                await self.store.put_if(keys.BROKER, mine.encode(), if_match=etag)
                self._became(mine, f"took over from {record.broker_id} (epoch {record.epoch})")
            else:
                if self.active:
                    log.warning("replaced by %s (epoch %d)", record.broker_id, record.epoch)
                self.active = False
        except PreconditionFailed:
            self.active = False  # someone else wrote it first; look again next round
            self.poke()

    def _became(self, record: BrokerRecord, how: str) -> None:
        log.info(
            "active broker %s at %s, epoch %d: %s", self.broker_id, self.url, record.epoch, how
        )
        self.seen, self.active, self.epoch = record, True, record.epoch
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
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.lease_s / 3):
                    await self._wake.wait()

    async def resign(self) -> None:
        """On a clean shutdown: age our record so that a standby takes over at once."""
        if not self.active:
            return
        with contextlib.suppress(
            PreconditionFailed, StoreUnavailable, ObjectNotFound, CorruptRecord
        ):
            current = await read_record(self.store)
            if current and current[0].broker_id == self.broker_id:
                gone = self._record(self.epoch, 0.0)
                await self.store.put_if(keys.BROKER, gone.encode(), if_match=current[1])
        self.active = False
