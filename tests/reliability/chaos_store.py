"""An ObjectStore wrapper that fails at random: before a write (it never lands),
after a write (it landed, the answer is lost, or a retry of it is refused 412),
late (a conditional write answered as failed lands afterwards, if its condition
still holds then), slowly, or all at once (outage)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from simplequeue import keys
from simplequeue.errors import AmbiguousWrite, PreconditionFailed, StoreError, StoreUnavailable
from simplequeue.objstore import ObjectStore

# How long after its caller was answered 5xx a late write lands (seconds): an S3
# PUT still in flight when the client's timeout gave up on it. On localfs the
# group committer has read the head back and tried again within a few ms, and
# the later ones are refused by its try (in two runs, 10 of 15 late head writes
# drawn under 6 ms landed, 4 of 35 drawn over).
LATE_S = (0.0, 0.03)


class ChaosStore(ObjectStore):
    """Each request fails before it is sent (`fail`) or is slowed 50-300 ms
    (`slow`); then each write may land and be answered StoreUnavailable
    (`lose`). Conditional writes (put_if, and so the head and new objects of a
    put_if_after) may also be answered StoreUnavailable at once and land 0-30 ms
    later, their condition judged when they land (`late`), or land and be
    answered PreconditionFailed (`refuse`: a client's own retry of the PUT,
    refused by its first landing). `injected` counts the faults, `late_ends`
    how the late writes ended (landed, refused, failed), and `on_heads` both
    for the writes to topic heads alone: those the group committer reads back."""

    def __init__(
        self,
        inner: ObjectStore,
        *,
        fail: float = 0.0,
        lose: float = 0.0,
        slow: float = 0.0,
        late: float = 0.0,
        refuse: float = 0.0,
        seed: int = 9,
    ) -> None:
        self.inner = inner
        self.url = inner.url
        self.held_descriptors = inner.held_descriptors
        self.clock = inner.clock  # the wrapped store's time, fed by its requests
        self.fail, self.lose, self.slow = fail, lose, slow
        self.late, self.refuse = late, refuse
        self.rng = random.Random(seed)
        self.down = False
        self.injected: Counter[str] = Counter()
        self.late_ends: Counter[str] = Counter()
        self.on_heads: Counter[str] = Counter()
        self._in_flight: set[asyncio.Task[None]] = set()

    async def calm(self) -> None:
        """No faults from now on; returns once the late writes in flight have
        landed or not."""
        self.fail = self.lose = self.slow = self.late = self.refuse = 0.0
        await self._landed()

    async def _landed(self) -> None:
        await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _before(self) -> float:
        """Raise or pause before a request; a roll in [0, 1) for what becomes of
        a write (the faults after it is sent)."""
        if self.down:
            self.injected["outage"] += 1
            raise StoreUnavailable("injected: store down")
        roll = self.rng.random()
        if roll < self.fail:
            self.injected["fail"] += 1
            raise StoreUnavailable("injected: request failed")
        if roll < self.fail + self.slow:
            self.injected["slow"] += 1
            await asyncio.sleep(self.rng.uniform(0.05, 0.3))
        return self.rng.random()

    def _count(self, key: str, what: str, counter: Counter[str] | None = None) -> None:
        (self.injected if counter is None else counter)[what] += 1
        if keys.topic_of_head(key) is not None:
            self.on_heads[what] += 1

    def _lost(self, key: str) -> AmbiguousWrite:
        self._count(key, "lose_answer")
        return AmbiguousWrite("injected: answer lost after the write landed")

    async def get(self, key: str) -> tuple[bytes, str]:
        await self._before()
        return await self.inner.get(key)

    async def put(self, key: str, data: bytes) -> str:
        roll = await self._before()
        etag = await self.inner.put(key, data)
        if roll < self.lose:
            raise self._lost(key)
        return etag

    async def put_if(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        roll = await self._before()
        if self.lose <= roll < self.lose + self.late:
            self._land_late(key, data, if_match, if_none_match)
            # As S3Store says of a PUT sent and not answered.
            raise AmbiguousWrite("injected: timed out, the write still in flight")
        etag = await self.inner.put_if(key, data, if_match=if_match, if_none_match=if_none_match)
        if roll < self.lose:
            raise self._lost(key)
        if roll < self.lose + self.late + self.refuse:
            self._count(key, "refuse_landed")
            raise PreconditionFailed("injected: landed, and a retry of the write refused")
        return etag

    def _land_late(self, key: str, data: bytes, if_match: str | None, if_none_match: bool) -> None:
        """Send the write to land 0-30 ms from now, on the condition it was
        sent with: it lands only if that still holds then."""
        self._count(key, "late")
        delay = self.rng.uniform(*LATE_S)

        async def land() -> None:
            await asyncio.sleep(delay)
            try:
                await self.inner.put_if(key, data, if_match=if_match, if_none_match=if_none_match)
            except PreconditionFailed:
                self._count(key, "late_refused", self.late_ends)  # another write came first
            except StoreError:
                self._count(key, "late_failed", self.late_ends)
            else:
                self._count(key, "late_landed", self.late_ends)

        task = asyncio.get_running_loop().create_task(land())
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def delete(self, key: str) -> None:
        await self._before()
        await self.inner.delete(key)

    async def list(self, prefix: str = "") -> list[str]:
        await self._before()
        return await self.inner.list(prefix)

    async def sample_clock(self) -> None:
        await self.inner.sample_clock()

    async def close(self) -> None:
        await self._landed()  # whatever their callers did, as on S3
        await self.inner.close()
