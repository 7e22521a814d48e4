"""localfs: objects as files in a directory, durable and safe across processes.

Every write goes to a temp file that is fsynced, renamed over the key and then
the directory is fsynced, so a crash leaves either the old or the new object.
Compare-and-rename holds an OS file lock, so several processes (brokers) may
share one directory; the lock is held for nothing else, and waited for only
`lock_timeout`, so a process paused while holding it stalls no one for long.
The ETag is derived from the bytes, so it cannot disagree with them. All file
I/O runs in worker threads, never on the event loop. The store's clock is the
kernel's, read from the mtime it gives each file we write (a process's own
time.time() may be faked or skewed; the kernel's is what every process on the
host, and an NFS server, stamps with).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ParamSpec, TypeVar

from simplequeue.errors import ObjectNotFound, PreconditionFailed, StorageFull, StoreUnavailable
from simplequeue.objstore.base import ObjectStore, check_key, content_etag

# Lock files are striped by key hash: bounded in number however many keys come
# and go, and two keys rarely share a stripe.
LOCK_STRIPES = 256
_META_DIR = ".simplequeue"
# How long a writer waits for a lock stripe before it answers StoreUnavailable:
# well inside the committer's 10 s write budget. Held only around a compare and
# a rename, a lock is busy that long only when its holder is stopped or stuck.
LOCK_TIMEOUT = 5.0
# Filesystems stamp files from the kernel's coarse clock, which lags the true
# time by up to one timer tick (10 ms at the slowest common HZ of 100).
MTIME_RESOLUTION = 0.01

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class _WrittenFiles:
    """The files this store wrote last, each held open with its ETag and the
    stamp the file had then (inode, size, modification and change times).

    Holding the descriptor keeps the inode alive, so its number cannot be
    reused. If the key's path still names that inode with the same stamp,
    nobody has replaced it (every write is a rename of a new file) nor written
    into it (`cp backup topics/t.json` keeps the inode but changes the times),
    and the ETag is still ours. That spares a compare-and-write reading back
    and hashing the whole object.
    """

    LIMIT = 256

    def __init__(self) -> None:
        self._files: OrderedDict[Path, tuple[int, str, tuple[int, ...]]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, path: Path, fd: int, etag: str) -> None:
        stamp = _stamp(os.fstat(fd))
        with self._lock:
            old = self._files.pop(path, None)
            self._files[path] = (fd, etag, stamp)
            evicted = [old] if old else []
            while len(self._files) > self.LIMIT:
                evicted.append(self._files.popitem(last=False)[1])
        for stale_fd, _, _ in evicted:
            os.close(stale_fd)

    def etag_if_same(self, path: Path, linked: os.stat_result) -> str | None:
        with self._lock:
            entry = self._files.get(path)
            if entry is None:
                return None
            if _stamp(linked) == entry[2]:
                self._files.move_to_end(path)
                return entry[1]
            return None

    def forget(self, path: Path) -> None:
        with self._lock:
            entry = self._files.pop(path, None)
        if entry:
            os.close(entry[0])

    def close(self) -> None:
        with self._lock:
            entries, self._files = list(self._files.values()), OrderedDict()
        for fd, _, _ in entries:
            os.close(fd)


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class LocalStore(ObjectStore):
    """Objects under `root`; the key "a/b.json" is the file root/a/b.json.
    A write or delete that cannot get its key's lock within `lock_timeout`
    seconds raises StoreUnavailable."""

    def __init__(self, root: str | os.PathLike[str], *, lock_timeout: float = LOCK_TIMEOUT) -> None:
        super().__init__()
        self.root = Path(root).absolute()
        self.lock_timeout = lock_timeout
        self.url = f"file://{self.root}"
        self._locks = self.root / _META_DIR / "locks"
        self._ready = False
        self._written = _WrittenFiles()

    def _prepare(self) -> None:
        if not self._ready:
            self._locks.mkdir(parents=True, exist_ok=True)
            self._ready = True

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (ObjectNotFound, PreconditionFailed):
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("localfs %s: no space left: %s", self.root, exc)
                raise StorageFull(f"localfs {self.root}: no space left on the device") from exc
            raise StoreUnavailable(f"localfs {self.root}: {exc}") from exc

    # --- the blocking half, run in threads -------------------------------------

    def _lock(self, key: str) -> int:
        self._prepare()
        stripe = hashlib.blake2b(key.encode(), digest_size=4).digest()
        n = int.from_bytes(stripe, "big") % LOCK_STRIPES
        fd = os.open(self._locks / f"{n:03d}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._wait_for_lock(fd, key)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _wait_for_lock(self, fd: int, key: str) -> None:
        # A blocking flock would wait for ever on a holder that is SIGSTOPped:
        # poll instead, so that the wait is bounded and the thread comes back.
        deadline = time.monotonic() + self.lock_timeout
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.05)
        log.warning(
            "localfs %s: the lock of %s stayed taken for %g s", self.root, key, self.lock_timeout
        )
        raise StoreUnavailable(
            f"localfs {self.root}: the lock of {key} has been held by another process "
            f"for {self.lock_timeout:g} s (is a broker paused or stuck?)"
        )

    @staticmethod
    def _unlock(fd: int) -> None:
        os.close(fd)  # closing the descriptor releases the flock

    def _read(self, key: str) -> tuple[bytes, str]:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        return data, content_etag(data)

    def _current_etag(self, path: Path) -> str | None:
        """The ETag of what `path` holds now. When it is still the very file this
        store last wrote there, the ETag is known without reading it back."""
        try:
            linked = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        known = self._written.etag_if_same(path, linked)
        if known is not None:
            return known
        try:
            return content_etag(path.read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _write_temp(self, path: Path, data: bytes) -> tuple[Path, int, str]:
        """Write `data` to a new temp file beside `path` and fsync it: (its path,
        its open descriptor, the ETag). Needs no lock: nobody else knows it."""
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        sent = time.monotonic()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:  # the key's first object in a new directory
            self._make_dirs(path.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self._observe_mtime(fd, sent)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return tmp, fd, content_etag(data)

    def _touch_clock(self) -> None:
        """A sample of the kernel's clock without writing an object: the mtime
        it stamps on a file we write a byte to. A write, not utime(): utime()
        with no times is served from the caller's idea of now by clock shims
        such as libfaketime, a write's mtime always by the kernel."""
        self._prepare()
        sent = time.monotonic()
        fd = os.open(self.root / _META_DIR / "clock", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"\n", 0)
            self._observe_mtime(fd, sent)
        finally:
            os.close(fd)

    def _observe_mtime(self, fd: int, sent: float) -> None:
        """A write to `fd` since the monotonic time `sent` stamped its mtime:
        a sample of the kernel's clock (taken now, before fstat, which is not
        a write)."""
        received = time.monotonic()
        self.clock.observe(sent, received, os.fstat(fd).st_mtime_ns / 1e9, MTIME_RESOLUTION)

    def _make_dirs(self, directory: Path) -> None:
        """Create `directory` and the parents it lacks, each made durable: a new
        directory's entry lives in its parent, which is fsynced after it."""
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for new in reversed(missing):
            with contextlib.suppress(FileExistsError):
                new.mkdir()
            self._fsync_dir(new.parent)

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _put_sync(
        self, key: str, data: bytes, if_match: str | None, if_none_match: bool, conditional: bool
    ) -> str:
        path = self._path(key)
        # The slow, pause-prone part (writing and fsyncing the data) is done
        # before the lock: under it are only the compare and the rename.
        tmp, fd, etag = self._write_temp(path, data)
        self._rename(key, path, tmp, fd, if_match, if_none_match, conditional)
        # The rename is durable only once the directory is fsynced, and that is
        # done after the lock is released. Safe: nobody has been answered yet
        # (we answer after this fsync), and whoever sees the renamed file
        # before then and builds on it (a writer whose If-Match is our ETag)
        # fsyncs this same directory before answering, which makes its rename
        # and ours durable. Readers never took the lock, so they could always
        # see a rename before its directory fsync.
        try:
            self._fsync_dir(path.parent)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, OSError):
                # Not StorageFull (ENOSPC) nor any other "nothing was written":
                # the new object is in place, its durability unknown.
                raise StoreUnavailable(
                    f"localfs {self.root}: {key} was renamed into place, but its "
                    f"directory could not be synced: {exc}"
                ) from exc
            raise
        self._written.remember(path, fd, etag)  # keeps fd open, or closes it
        return etag

    def _rename(
        self,
        key: str,
        path: Path,
        tmp: Path,
        fd: int,
        if_match: str | None,
        if_none_match: bool,
        conditional: bool,
    ) -> None:
        """Rename the temp file `tmp` (open as `fd`) over `key` if the condition
        holds, under the key's lock; else close and remove it, and raise."""
        try:
            lock = self._lock(key)
            try:
                if conditional:
                    current = self._current_etag(path)
                    if if_none_match and current is not None:
                        raise PreconditionFailed(f"{key} exists")
                    if if_match is not None and current != if_match:
                        raise PreconditionFailed(f"{key} changed")
                os.replace(tmp, path)
            finally:
                self._unlock(lock)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise

    def _put_if_after_sync(
        self,
        objects: list[tuple[str, bytes]],
        key: str,
        data: bytes,
        if_match: str | None,
        if_none_match: bool,
    ) -> str:
        """put_if_after in one thread trip: each object written, fsynced and
        renamed into place (one an earlier try wrote is left), their
        directories fsynced once each, then the conditional write of `key`."""
        directories: dict[Path, None] = {}
        for obj_key, body in objects:
            path = self._path(obj_key)
            tmp, fd, _ = self._write_temp(path, body)
            try:
                self._rename(obj_key, path, tmp, fd, None, True, True)
            except PreconditionFailed:
                continue  # ours, from an earlier try: immutable, so the same bytes
            # Not remembered: nobody compares against a new object's ETag, and
            # it would push a head out of the descriptors kept.
            os.close(fd)
            directories[path.parent] = None
        for directory in directories:  # the objects are durable before the head is renamed
            self._fsync_dir(directory)
        return self._put_sync(key, data, if_match, if_none_match, True)

    def _delete_sync(self, key: str) -> None:
        path = self._path(key)
        lock = self._lock(key)
        try:
            self._written.forget(path)
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                return
        finally:
            self._unlock(lock)
        self._fsync_dir(path.parent)  # after the release, as for a write

    def _list_sync(self, prefix: str) -> list[str]:
        keys: list[str] = []
        if not self.root.is_dir():
            return keys
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root)
            base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            if not (base.startswith(prefix) or prefix.startswith(base)):
                dirnames[:] = []
                continue
            names = (base + f for f in filenames if not f.startswith("."))
            keys.extend(k for k in names if k.startswith(prefix))
        return sorted(keys)

    # --- the async interface ----------------------------------------------------

    async def get(self, key: str) -> tuple[bytes, str]:
        return await self._run(self._read, check_key(key))

    async def put(self, key: str, data: bytes) -> str:
        return await self._run(self._put_sync, check_key(key), bytes(data), None, False, False)

    async def put_if(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        self._check_condition(if_match, if_none_match)
        return await self._run(
            self._put_sync, check_key(key), bytes(data), if_match, if_none_match, True
        )

    async def put_if_after(
        self,
        objects: Mapping[str, bytes],
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        self._check_condition(if_match, if_none_match)
        # One thread trip, not one per object plus the head's: a trip costs
        # about a fifth of a write.
        checked = [(check_key(k), bytes(body)) for k, body in objects.items()]
        return await self._run(
            self._put_if_after_sync, checked, check_key(key), bytes(data), if_match, if_none_match
        )

    async def delete(self, key: str) -> None:
        await self._run(self._delete_sync, check_key(key))

    async def list(self, prefix: str = "") -> list[str]:
        return await self._run(self._list_sync, prefix)

    async def sample_clock(self) -> None:
        if not self.clock.samples:
            await self._run(self._touch_clock)

    async def close(self) -> None:
        self._written.close()
