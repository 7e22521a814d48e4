"""The broker's cache of immutable objects (segments and manifests), shared by
every topic, fetched on demand and kept within a byte budget (least recently
used first out). Objects never change once written, so what it holds is
never stale; what it drops is fetched again when wanted. Memory held outside
it that can be rebuilt from its objects (a topic's id filter) is charged to
the same budget, in the same order, and let go of when it must make room.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from simplequeue.errors import CorruptData, ObjectNotFound
from simplequeue.objstore import ObjectStore
from simplequeue.state import Manifest, Segment, SegmentMissing, decode_object

log = logging.getLogger(__name__)

# Decoded objects take more memory than their bytes: Python dicts and strings.
# The budget counts stored bytes times this, a rough but steady measure.
DECODED_PER_BYTE = 4
MAX_PARALLEL_FETCHES = 16


@dataclass(slots=True)
class _Charge:
    """Bytes held outside the cache (ObjectCache.charge), and how to let go of them."""

    nbytes: int
    drop: Callable[[], None]


def _cost(entry: Segment | Manifest | _Charge) -> int:
    return entry.nbytes if isinstance(entry, _Charge) else entry.size * DECODED_PER_BYTE


class ObjectCache:
    """Segments and manifests by key: the state machine's SegmentView."""

    def __init__(self, store: ObjectStore, budget_bytes: int = 256 * 1024 * 1024) -> None:
        self.store = store
        self.budget = budget_bytes
        self.used = 0
        self.fetched = 0  # objects read from the store
        # Objects by key, and charges by theirs, the least recently used first.
        self._objects: OrderedDict[str, Segment | Manifest | _Charge] = OrderedDict()
        self._limit = asyncio.Semaphore(MAX_PARALLEL_FETCHES)

    def __contains__(self, key: str) -> bool:
        return key in self._objects

    def __len__(self) -> int:
        return len(self._objects)

    def _get(self, key: str) -> Segment | Manifest:
        obj = self._objects.get(key)
        if obj is None or isinstance(obj, _Charge):
            raise SegmentMissing(key)
        self._objects.move_to_end(key)
        return obj

    def held(self, key: str) -> Segment | Manifest:
        """The object, whichever kind it is (SegmentMissing if not held)."""
        return self._get(key)

    def segment(self, key: str) -> Segment:
        obj = self._get(key)
        if not isinstance(obj, Segment):
            raise CorruptData(key, "a manifest where a segment was expected")
        return obj

    def manifest(self, key: str) -> Manifest:
        obj = self._get(key)
        if not isinstance(obj, Manifest):
            raise CorruptData(key, "a segment where a manifest was expected")
        return obj

    def how_many(self, size: int, fraction: float) -> int:
        """How many objects of `size` bytes (as stored) take at most `fraction`
        of the budget."""
        return int(self.budget * fraction) // max(1, size * DECODED_PER_BYTE)

    def add(self, key: str, data: bytes) -> None:
        """Decode and keep an object (one read from the store, say)."""
        self.keep(decode_object(key, data))

    def keep(self, obj: Segment | Manifest) -> None:
        """Keep an object already decoded (one this broker just wrote)."""
        key = obj.key
        if key in self._objects:
            return
        self._objects[key] = obj
        self.used += obj.size * DECODED_PER_BYTE
        self._shrink()

    def charge(self, key: str, nbytes: int, drop: Callable[[], None]) -> None:
        """Count `nbytes` held outside the cache under `key` (no object's key)
        in the budget, as its most recently used entry, instead of what was
        charged under `key` before: when the cache must make room and it is
        the least recently used, it is uncharged and `drop()` lets go of them."""
        self.uncharge(key)
        self._objects[key] = _Charge(nbytes, drop)
        self.used += nbytes
        self._shrink()

    def uncharge(self, key: str) -> None:
        """What was charged under `key` is no longer held (not dropped: gone)."""
        entry = self._objects.get(key)
        if isinstance(entry, _Charge):
            del self._objects[key]
            self.used -= entry.nbytes

    def _shrink(self) -> None:
        # The newest entry stays even alone over budget: it is wanted now.
        while self.used > self.budget and len(self._objects) > 1:
            _, old = self._objects.popitem(last=False)
            self.used -= _cost(old)
            if isinstance(old, _Charge):
                old.drop()

    async def fetch(self, keys: list[str], lenient: bool = False) -> dict[str, Segment | Manifest]:
        """The objects, those not held yet read in parallel: what the caller
        holds on to, as other fetches meanwhile may have pushed them out of
        the cache. ObjectNotFound for one that is missing (the caller decides
        what that means); CorruptData for one that cannot be read; with
        `lenient`, those are left out of the answer instead."""
        found: dict[str, Segment | Manifest] = {}
        wanted: list[str] = []
        for key in dict.fromkeys(keys):
            obj = self._objects.get(key)
            if obj is None or isinstance(obj, _Charge):
                wanted.append(key)
            else:
                found[key] = obj
        if wanted:
            objs = await asyncio.gather(*(self._fetch(k) for k in wanted), return_exceptions=True)
            for key, got in zip(wanted, objs, strict=True):
                if isinstance(got, ObjectNotFound | CorruptData) and lenient:
                    continue
                if isinstance(got, BaseException):
                    raise got
                found[key] = got
        return found

    async def _fetch(self, key: str) -> Segment | Manifest:
        async with self._limit:
            try:
                data, _ = await self.store.get(key)
            except ObjectNotFound:
                raise ObjectNotFound(key) from None
            self.fetched += 1
            obj = decode_object(key, data)
            self.keep(obj)
            return obj

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            obj = self._objects.get(key)
            if obj is not None and not isinstance(obj, _Charge):
                del self._objects[key]
                self.used -= obj.size * DECODED_PER_BYTE
