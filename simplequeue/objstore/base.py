"""The ObjectStore interface: the one seam between simplequeue and its storage.

Backends implement get/put/put_if/delete/list/close and raise only the store
errors of simplequeue.errors. Nothing above this seam knows which backend runs.
Every store also tells the time on its own clock (now()), the one clock that
brokers whose wall clocks disagree share: times written to the store use it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from types import TracebackType

from simplequeue.errors import (
    AmbiguousWrite,
    NotDurable,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
)
from simplequeue.objstore.clock import StoreClock

# Keys are relative paths: no empty, "." or ".." components, no leading dot on a
# component (localfs keeps its temp and lock files there), printable ASCII only.
# A component is at most KEY_PART_MAX characters: localfs names a key's temp
# file `.<part>.<32 hex>.tmp` and its journal's `.<part>.journal.<32 hex>.tmp`,
# 47 bytes more, within the 255 bytes a file name may have. simplequeue's own
# take at most 133 (a topic or broker id of 128, and ".json").
KEY_PART_MAX = 200
_KEY_PART = re.compile(rf"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{{0,{KEY_PART_MAX - 1}}}")


class InvalidKey(StoreError, ValueError):
    """A key that no backend may store (traversal, empty parts, odd characters,
    a part over KEY_PART_MAX characters)."""


def is_key(key: str) -> bool:
    """Whether `key` is safe for every backend (check_key takes it)."""
    return bool(key) and len(key) <= 1024 and all(_KEY_PART.fullmatch(p) for p in key.split("/"))


def check_key(key: str) -> str:
    """Return `key` if it is safe for every backend, else raise InvalidKey."""
    if not is_key(key):
        raise InvalidKey(f"invalid object key {key!r}")
    return key


def content_etag(data: bytes) -> str:
    """The ETag memfs and localfs give `data`: its MD5, as S3 does for simple PUTs.

    Deriving the ETag from the bytes means the two can never disagree, even
    after a crash. Like S3's, it repeats when identical bytes are written again;
    simplequeue's own objects carry a unique write id, so they never do.
    """
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class ObjectStore(ABC):
    """Async key/value object storage with compare-and-set on ETags, and a clock.

    now() is the store's time in Unix seconds, estimated by `clock` from the
    stamps the store puts on the requests this handle makes (S3's Date header,
    the mtime the kernel gives a file written to localfs). Every handle on one
    store agrees on it to within a second or so, whatever the local wall
    clocks say. Before its first request a handle can only guess: now() is the
    local wall clock until then. A wrapper around a store shares its clock.
    """

    #: A URL that store_from_url() would open to reach the same data.
    url: str = ""
    #: How many file descriptors the store may keep open between requests (its
    #: connection pool, files it holds for the next write), for a process to
    #: leave room for under its descriptor limit.
    held_descriptors: int = 0
    #: Fed by the backend from every answer that carries the store's time.
    clock: StoreClock

    def __init__(self) -> None:
        # Samples come with every write or request: one in 20 ms is plenty.
        self.clock = StoreClock(spacing=0.02)

    def for_another_loop(self) -> ObjectStore:
        """A handle on the same data for use from another event loop (a
        SyncClient's for_topic(), on a thread of its own), to be closed by
        whoever asked: this one itself when nothing of it is bound to a loop."""
        return self

    def now(self) -> float:
        """The store's time in Unix seconds: cheap (no request), never going
        backwards once the store has answered; the local wall clock before."""
        return self.clock.now()

    def clock_error(self, now: float) -> float:
        """How far `now`, a time now() returned a moment ago, may be from the
        store's time, either way (seconds; StoreClock.error). On S3, whose Date
        headers count whole seconds, half a second and a round trip after one
        answer, tens of milliseconds after a few; on localfs, a few
        milliseconds (about a second on a filesystem keeping whole seconds).
        0.0 before the first stamp, when now() is a guess that nothing is
        written with (sample_clock() comes first)."""
        return self.clock.error(now)

    def clock_ahead(self, now: float) -> float:
        """How far the store's time may be ahead of `now`, a time now() returned
        a moment ago (seconds; StoreClock.ahead: below 0 while now() stands
        still after the store's clock was set back). Leases count from `now`
        plus this, the latest the store's time may be."""
        return self.clock.ahead(now)

    def clock_behind(self, now: float) -> float:
        """How far the store's time may be behind `now`, a time now() returned
        a moment ago (seconds; StoreClock.behind). Leases are reaped by `now`
        less this, the earliest the store's time may be."""
        return self.clock.behind(now)

    @abstractmethod
    async def get(self, key: str) -> tuple[bytes, str]:
        """Return (data, etag). Raise ObjectNotFound when the key is missing."""

    @abstractmethod
    async def put(self, key: str, data: bytes) -> str:
        """Write `data` unconditionally; return the new ETag."""

    @abstractmethod
    async def put_if(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        """Write `data` only if the current ETag is `if_match`, or (with
        `if_none_match`) only if the key does not exist. Return the new ETag;
        raise PreconditionFailed when the condition does not hold."""

    async def put_if_after(
        self,
        objects: Mapping[str, bytes],
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        """Write each of `objects`, then, once every one of them is durable,
        `key` as put_if does; return its ETag. The objects are new and
        immutable: one that exists already (an earlier try wrote it) is left
        as it is. If one of them fails, `key` is not written and the error is
        raised; PreconditionFailed is about `key` alone. The objects are
        written side by side, none waiting for another; a backend that can do
        the whole in fewer round trips (localfs: one) overrides this."""
        self._check_condition(if_match, if_none_match)
        if objects:
            outcomes = await asyncio.gather(
                *(self._put_new(k, body) for k, body in objects.items()), return_exceptions=True
            )
            for outcome in outcomes:  # every PUT has ended: none is left running
                if isinstance(outcome, (AmbiguousWrite, NotDurable)):
                    # About the object, not `key`, which was never sent: a
                    # caller told AmbiguousWrite takes `key`'s write for one
                    # that may land yet. The object, if it lands, is an orphan.
                    raise StoreUnavailable(f"{key} not sent: {outcome}") from outcome
                if isinstance(outcome, BaseException):
                    raise outcome
        return await self.put_if(key, data, if_match=if_match, if_none_match=if_none_match)

    async def _put_new(self, key: str, data: bytes) -> None:
        with contextlib.suppress(PreconditionFailed):
            await self.put_if(key, data, if_none_match=True)

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the key. Removing a missing key is not an error."""

    @abstractmethod
    async def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with `prefix`, sorted."""

    async def list_top(self, prefix: str) -> builtins.list[str]:
        """The keys that start with `prefix` and have no "/" after it, sorted: a
        folder's own objects, not its subfolders' (S3's listing with a
        delimiter). Every topic's head is one, and none of its segments: a
        listing of topics costs a request per 500-1,000 topics, not per
        1,000 objects (on S3 a page's 1,000 entries count its common
        prefixes too: a topic with segments has its folder there beside its
        head). Backends list only those; this default filters list()."""
        return [k for k in await self.list(prefix) if "/" not in k[len(prefix) :]]

    async def list_folders(self, prefix: str) -> builtins.list[str]:
        """The folders right under `prefix`, each as the prefix its keys start
        with ("topics/a/" for "topics/"), sorted: S3's common prefixes of a
        listing with a "/" delimiter, so that finding which topics have
        segments costs a request per 500-1,000 topics (their heads share the
        pages), not a listing per topic.
        Every folder holding a key is listed; localfs also lists one whose
        keys were all deleted (it leaves the directory), so take it as the
        folders that may hold keys. Backends list only those; this default
        derives them from list()."""
        return folders_of(prefix, await self.list(prefix))

    async def sweep_leftovers(self, older_than: float) -> int:
        """Remove what writes cut short left behind (the temp file of a process
        killed mid-write) that has not been touched for `older_than` seconds of
        the store's time; how many. A write that old is no longer in progress:
        if its process is only stopped, it fails when it resumes, unanswered.
        Leftovers are never keys: list() does not show them. A call may look
        into part of the store only, the calls after it into the rest (localfs:
        the topics' folders a few hundred a call, in turn). S3's and memfs'
        writes leave none."""
        return 0

    async def sample_clock(self) -> None:  # noqa: B027 - most answers carry the time
        """Make sure now() rests on at least one of the store's stamps: a handle
        that has not heard from the store yet guesses with the local wall clock,
        which must never be written into the store. The in-memory store (its
        time is the process's) needs nothing; localfs, whose reads carry no
        stamp, touches a file; S3, whose every answer carries its Date, errors
        too, asks once if none came yet. StoreRefused when the store gives no
        stamp it can read (S3 answers without a Date)."""

    async def conditional_writes_fault(self) -> str | None:
        """Why this store's conditional writes cannot be trusted, or None when
        they can. Some S3-compatible stores take a PUT with If-None-Match or
        If-Match for a plain PUT (MinIO before mid-2024): every write lands,
        whatever another broker wrote, and jobs are lost without an error.
        S3 finds out once per handle, with a probe under the prefix, and its
        put_if raises StoreRefused with this reason rather than write; memfs
        and localfs implement the conditions themselves (None, at no cost).
        StoreUnavailable when the store did not answer the probe, its
        StoreRefused when the store said no to it (no such bucket, access
        denied): a broker then does not start."""
        return None

    async def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release connections and files. The store is unusable afterwards."""

    async def __aenter__(self) -> ObjectStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @staticmethod
    def _check_condition(if_match: str | None, if_none_match: bool) -> None:
        if (if_match is None) == (not if_none_match):
            raise ValueError("put_if takes exactly one of if_match or if_none_match=True")


def folders_of(prefix: str, keys: Iterable[str]) -> list[str]:
    """The folders right under `prefix` that hold some of `keys`, sorted."""
    below = (k[len(prefix) :] for k in keys)
    return sorted({f"{prefix}{rest.split('/', 1)[0]}/" for rest in below if "/" in rest})
