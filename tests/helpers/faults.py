"""An ObjectStore wrapper that counts requests and injects faults on demand."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable

from simplequeue.errors import (
    AmbiguousWrite,
    NotDurable,
    PreconditionFailed,
    StorageFull,
    StoreUnavailable,
)
from simplequeue.objstore import ObjectStore
from simplequeue.objstore.memfs import MemStore

# A fault runs around one put_if of a head: it gets the key and a callable that
# performs the real write, and decides what the caller sees.
Fault = Callable[[str, Callable[[], "asyncio.Future[str]"]], "asyncio.Future[str]"]


class FaultyStore(ObjectStore):
    """Delegates to `inner`; `faults` is a queue of behaviours for the next
    conditional writes of keys that match `target` (default: topic heads);
    "ok" is none."""

    def __init__(self, inner: ObjectStore, target: str = "topics/") -> None:
        self.inner = inner
        self.url = inner.url
        self.held_descriptors = inner.held_descriptors
        self.clock = inner.clock  # the wrapped store's time, fed by its requests
        self.target = target
        self.calls: Counter[str] = Counter()
        self.put_sizes: list[int] = []
        self.faults: list[str] = []
        self.gate: asyncio.Event | None = None  # when set, head PUTs wait for it
        # The fault "held": that PUT says so in `holding`, and waits for `held`.
        self.holding = asyncio.Event()
        self.held = asyncio.Event()
        self.put_started = asyncio.Event()
        self.get_down = False
        # When set, every request waits for ever: a store that stopped answering.
        self.silent = False
        # Awaited after a "lose-answer" write landed, before its caller hears:
        # what other brokers do while an ambiguous write waits for its answer.
        self.meanwhile: Callable[[], Awaitable[None]] | None = None
        # The fault "late": the PUT is answered AmbiguousWrite (sent, no answer)
        # and kept here, to land when land_late() says (S3 applies a timed-out
        # PUT later, on the condition it was sent with).
        self.late: list[tuple[str, bytes, str | None, bool]] = []

    async def _answer(self) -> None:
        if self.silent:
            await asyncio.Event().wait()

    async def get(self, key: str) -> tuple[bytes, str]:
        self.calls["get"] += 1
        await self._answer()
        if self.get_down:
            raise StoreUnavailable("injected: store down")
        return await self.inner.get(key)

    async def put(self, key: str, data: bytes) -> str:
        self.calls["put"] += 1
        self.put_sizes.append(len(data))
        await self._answer()
        return await self.inner.put(key, data)

    async def put_if(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        self.calls["put"] += 1
        self.put_sizes.append(len(data))
        is_head = key.startswith(self.target) and key.count("/") == 1
        if is_head:
            self.put_started.set()
        await self._answer()
        if is_head and self.gate is not None:
            await self.gate.wait()
        fault = self.faults.pop(0) if is_head and self.faults else None
        if fault == "held":
            self.holding.set()
            await self.held.wait()
        if fault == "late":
            self.late.append((key, data, if_match, if_none_match))
            raise AmbiguousWrite("injected: PUT sent, no answer")
        if fault == "fail":  # the write never happens
            raise StoreUnavailable("injected: PUT failed")
        if fault == "conflict":  # someone else won the race
            raise PreconditionFailed("injected: lost race")
        if fault == "full":  # no room: nothing written
            raise StorageFull("injected: no space left on the device")
        etag = await self.inner.put_if(key, data, if_match=if_match, if_none_match=if_none_match)
        if fault == "lose-answer":  # landed, but the answer never arrived
            if self.meanwhile is not None:
                await self.meanwhile()
            raise StoreUnavailable("injected: answer lost")
        if fault == "not-durable":  # in place, but the store could not make it durable
            raise NotDurable("injected: the directory fsync failed after the rename")
        if fault == "landed-412":  # landed; a retry of the same PUT then saw 412
            raise PreconditionFailed("injected: retry after a landed PUT")
        return etag

    async def land_late(self) -> int:
        """Land the "late" writes kept, oldest first, each on its condition
        (one that no longer holds does not land): how many landed."""
        landed = 0
        for key, data, if_match, if_none_match in self.late:
            with contextlib.suppress(PreconditionFailed):
                await self.inner.put_if(key, data, if_match=if_match, if_none_match=if_none_match)
                landed += 1
        self.late.clear()
        return landed

    async def delete(self, key: str) -> None:
        self.calls["delete"] += 1
        await self._answer()
        await self.inner.delete(key)

    async def list(self, prefix: str = "") -> list[str]:
        self.calls["list"] += 1
        await self._answer()
        return await self.inner.list(prefix)

    async def sample_clock(self) -> None:
        await self.inner.sample_clock()

    async def close(self) -> None:
        await self.inner.close()


class Outage(MemStore):
    """A memfs store that answers nothing (StoreUnavailable) while `down`: an
    outage of the whole store, reads, writes and listings alike."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("injected: store down")

    async def get(self, key: str) -> tuple[bytes, str]:
        self._check()
        return await super().get(key)

    async def put(self, key: str, data: bytes) -> str:
        self._check()
        return await super().put(key, data)

    async def put_if(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        self._check()
        return await super().put_if(key, data, if_match=if_match, if_none_match=if_none_match)

    async def list(self, prefix: str = "") -> list[str]:
        self._check()
        return await super().list(prefix)

    async def list_top(self, prefix: str) -> list[str]:
        self._check()
        return await super().list_top(prefix)

    async def delete(self, key: str) -> None:
        self._check()
        await super().delete(key)
