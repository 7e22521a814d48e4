"""An ObjectStore wrapper that fails at random: before a write (it never lands),
after a write (it landed, the answer is lost), slowly, or all at once (outage)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from simplequeue.errors import StoreUnavailable
from simplequeue.objstore import ObjectStore


class ChaosStore(ObjectStore):
    def __init__(
        self,
        inner: ObjectStore,
        *,
        fail: float = 0.0,
        lose: float = 0.0,
        slow: float = 0.0,
        seed: int = 9,
    ) -> None:
        self.inner = inner
        self.url = inner.url
        self.held_descriptors = inner.held_descriptors
        self.clock = inner.clock  # the wrapped store's time, fed by its requests
        self.fail, self.lose, self.slow = fail, lose, slow
        self.rng = random.Random(seed)
        self.down = False
        self.injected: Counter[str] = Counter()

    async def _before(self) -> bool:
        """Raise or pause before a request; True if its answer is to be lost."""
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
        return self.rng.random() < self.lose

    def _lost(self) -> StoreUnavailable:
        self.injected["lose_answer"] += 1
        return StoreUnavailable("injected: answer lost after the write landed")

    async def get(self, key: str) -> tuple[bytes, str]:
        await self._before()
        return await self.inner.get(key)

    async def put(self, key: str, data: bytes) -> str:
        lose = await self._before()
        etag = await self.inner.put(key, data)
        if lose:
            raise self._lost()
        return etag

    async def put_if(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        lose = await self._before()
        etag = await self.inner.put_if(key, data, if_match=if_match, if_none_match=if_none_match)
        if lose:
            raise self._lost()
        return etag

    async def delete(self, key: str) -> None:
        await self._before()
        await self.inner.delete(key)

    async def list(self, prefix: str = "") -> list[str]:
        await self._before()
        return await self.inner.list(prefix)

    async def sample_clock(self) -> None:
        await self.inner.sample_clock()

    async def close(self) -> None:
        await self.inner.close()
