"""localfs: objects as files in a directory, durable and safe across processes.

Every write goes to a temp file that is renamed over the key, so a crash
leaves either the old or the new object. A new object is made durable the
classic way: the temp file is fsynced before the rename, the directory after.
An object rewritten with If-Match (a topic's head, hundreds of times a second)
is made durable by one fdatasync instead: its bytes are appended to a journal
beside it (see _Journal), and the rename is left to the page cache.
Compare-and-rename (and a journal's writes) hold an OS file lock, so several
processes (brokers) on one machine may share one directory. The lock has no
lease: a process paused while holding it keeps it (each waiter gives up after
`lock_timeout`, StoreUnavailable), so it is held for as little as can be:
every fsync that need not be under it comes before it.
The ETag is derived from the bytes, so it cannot disagree with them. All file
I/O runs in worker threads, never on the event loop. The store's clock is the
kernel's, read from the mtime it gives each file we write (a process's own
time.time() may be faked or skewed; the kernel's is what every process on the
host, and an NFS server, stamps with).
"""

from __future__ import annotations

import asyncio
import bisect
import builtins
import contextlib
import contextvars
import errno
import fcntl
import hashlib
import logging
import os
import random
import re
import struct
import threading
import time
import urllib.parse
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

from simplequeue.errors import (
    AmbiguousWrite,
    NotDurable,
    ObjectNotFound,
    PreconditionFailed,
    StorageFull,
    StoreRefused,
    StoreUnavailable,
)
from simplequeue.objstore.base import ObjectStore, check_key, content_etag, is_key
from simplequeue.objstore.clock import SLEW

# Lock files are striped by key hash: bounded in number however many keys come
# and go, and two keys rarely share a stripe.
LOCK_STRIPES = 256
_META_DIR = ".simplequeue"
# How long a writer waits for a lock stripe before it answers StoreUnavailable:
# well inside the committer's 10 s write budget. Held only around a compare and
# a rename, a lock is busy that long only when its holder is stopped or stuck.
LOCK_TIMEOUT = 5.0
# How long a worker thread waits for a busy lock before it gives its thread
# back and the call is made again a while later (the wait goes on from the
# event loop): writes stalled behind a paused holder must not take every
# thread of the pool, which every other store call of the process shares.
LOCK_WAIT_IN_THREAD = 0.02
# Filesystems stamp files from the kernel's coarse clock, which lags the true
# time by up to one timer tick (10 ms at the slowest common HZ of 100). Some
# keep whole seconds only (see _mtime_resolution).
MTIME_RESOLUTION = 0.01

# The journal beside an object rewritten with If-Match: preallocated (zeros,
# written and fsynced once), so that appending a record and fdatasyncing it
# changes no metadata. That costs a fifth of the two fsyncs of a rename (0.1
# against 0.5 ms on the disks measured). A write whose record does not fit any
# more replaces the journal with a new one holding it; an object too big for
# the largest journal (JOURNAL_SIZE) is written the classic way.
JOURNAL_SIZE = 256 * 1024
# A key's first journal is small (JOURNAL_FIRST_SIZE, or 8 times its first
# record), and each that replaces a full one twice the size of the last, up to
# JOURNAL_SIZE (see _journal_size). Most keys that turn busy are topics that
# ran a job or two (an enqueue, a claim and an ack within a second) and go
# idle: a first journal of JOURNAL_SIZE kept 52.4 MB beside the 151 KB heads
# of 200 such topics (26 GB at 100,000 topics touched within the hour, until
# the sweep drops them), and wrote and fsynced 256 KiB for each. A hot key
# reaches JOURNAL_SIZE within some 300 rewrites of a head of 800 bytes (four
# more journals made than with one of JOURNAL_SIZE at once).
JOURNAL_FIRST_SIZE = 16 * 1024
_PAGE = 4096
_JOURNAL_MAGIC = b"SQJRNL01"
_HEADER = struct.Struct(">8sQ16sI")  # magic, generation, boot id, CRC-32 of the three
_RECORD = struct.Struct(">QII")  # generation, length, CRC-32 of these two and the bytes
# The header owns the first sector; records start after it.
_RECORDS_START = 512
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_MOUNTS = Path("/proc/self/mountinfo")
# Filesystems whose files' times come from this host's own CLOCK_REALTIME.
_LOCAL_FILESYSTEMS = frozenset(
    {
        "bcachefs",
        "btrfs",
        "exfat",
        "ext2",
        "ext3",
        "ext4",
        "f2fs",
        "hfsplus",
        "jfs",
        "nilfs2",
        "ntfs3",
        "overlay",
        "ramfs",
        "reiserfs",
        "tmpfs",
        "vfat",
        "xfs",
        "zfs",
    }
)
# How many keys a store remembers having checked for a journal left by an
# earlier boot; forgetting only means checking again.
_CHECKED_LIMIT = 100_000
# A key gets a journal when it is rewritten with If-Match twice within this
# many seconds (a busy topic's head): one rewritten less often (an idle
# topic's, a membership record) is not worth a journal's disk.
JOURNAL_AFTER = 1.0

# The share of the process' soft descriptor limit (RLIMIT_NOFILE) that each of
# _WrittenFiles and _Places may keep open: an eighth each, a quarter together,
# at most their LIMIT and at least KEPT_AT_LEAST. Under `ulimit -n 256` the 512
# they kept left no descriptor for a write's own files once some 100 topics had
# been busy, and every write failed until a restart.
KEPT_SHARE = 8
KEPT_AT_LEAST = 4

# How many of the folders below the root's own (a topic's segments) one sweep
# of leftovers looks into, in turn (LocalStore._in_turn): 256 every 10 minutes
# reaches each of 100,000 topics' folders within 3 days, the root's own
# folders (the heads and their journals) being looked into at every sweep.
LEFTOVER_FOLDERS_PER_SWEEP = 256

# A write's temp file beside its key or journal (_write_temp, _prepare_journal):
# what a process killed mid-write leaves. Never a key (a dot file).
_LEFTOVER = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")
# A key's journal (journal_path): the key's name is the group.
_JOURNAL_NAME = re.compile(r"\.(.+)\.journal")

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

    LIMIT = 256  # the most, under a high descriptor limit (see KEPT_SHARE)

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._files: OrderedDict[Path, tuple[int, str, tuple[int, ...]]] = OrderedDict()
        self._lock = threading.Lock()
        # After close(), a write still finishing in its thread keeps nothing open.
        self._closed = False

    def remember(self, path: Path, fd: int, etag: str) -> None:
        stamp = _stamp(os.fstat(fd))
        with self._lock:
            if self._closed:
                os.close(fd)
                return
            old = self._files.pop(path, None)
            self._files[path] = (fd, etag, stamp)
            evicted = [old] if old else []
            while len(self._files) > self.limit:
                evicted.append(self._files.popitem(last=False)[1])
        for stale_fd, _, _ in evicted:
            os.close(stale_fd)

    def let_go_of_older_half(self) -> None:
        """Close the older half of the files kept (the process ran out of
        descriptors): they are only a shortcut."""
        with self._lock:
            evicted = [self._files.popitem(last=False)[1] for _ in range(len(self._files) // 2)]
        for stale_fd, _, _ in evicted:
            os.close(stale_fd)

    def etag_if_same(self, path: Path, linked: os.stat_result | None) -> str | None:
        """Our ETag for `path` if what it links to (`linked`, None: nothing)
        is still the file we wrote there, else None."""
        if linked is None:
            return None
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
            self._closed = True
        for fd, _, _ in entries:
            os.close(fd)


def _kept_limit(most: int) -> int:
    """How many files one of the store's caches may keep open: `most`, or
    less under a low descriptor limit (KEPT_SHARE)."""
    try:
        import resource
    except ImportError:  # not on Unix: no descriptor limit to size to
        return most
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return most
    return min(most, max(KEPT_AT_LEAST, soft // KEPT_SHARE))


def _files_and_folders(path: Path) -> tuple[list[str], list[str]]:
    """The names of the files and of the folders in `path` (a link to a
    folder is neither); none if it cannot be read, as os.walk has it."""
    try:
        with os.scandir(path) as found:
            entries = list(found)
    except OSError:
        return [], []
    files = [e.name for e in entries if not e.is_dir()]
    return files, [e.name for e in entries if e.is_dir() and not e.is_symlink()]


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def machine_boot_id() -> bytes | None:
    """This boot of the machine (Linux), or None where the kernel does not say."""
    try:
        return uuid.UUID(_BOOT_ID.read_text().strip()).bytes
    except (OSError, ValueError):
        return None


def stamped_here(path: Path) -> bool:
    """Whether files under `path` get their times from this host's clock: its
    filesystem (the longest mount point above it in /proc/self/mountinfo) is
    a local one. False where that is not known: another OS, a network
    filesystem (NFS, SMB: the server stamps), FUSE."""
    try:
        mounts = _MOUNTS.read_text()
    except OSError:
        return False
    real = os.path.realpath(path)
    best, fstype = "", ""
    for line in mounts.splitlines():
        mine, _, theirs = line.partition(" - ")
        fields = mine.split()
        if len(fields) < 5 or not theirs:
            continue
        # Octal escapes for blanks and backslashes: "/mnt/my\040disk".
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, theirs.split()[0]
    return fstype in _LOCAL_FILESYSTEMS


def journal_path(path: Path) -> Path:
    """Where the journal of the object at `path` lives: a dot file beside it,
    which is never a key (no key part starts with a dot)."""
    return path.with_name(f".{path.name}.journal")


@dataclass
class _Journal:
    """The journal of one object rewritten with If-Match, open for one write.

    What makes such a write durable is its record. Under the key's lock the
    record is appended here and fdatasynced, then the temp file (not fsynced)
    is renamed over the key, and only then is the write answered. So a
    version is in place, and seen by readers, only once a record holds it,
    and the last record is the newest version renamed into place or, when
    its writer died between the two, a version that never was, unanswered
    (as a write whose answer was lost, it may land: the committer reads back).
    A crash of the machine may lose what the page cache held: the rename, or
    the object's bytes. The first process to touch the key after the
    restart (the header names the boot it was written in) writes the last
    record back the classic way if the object is not that record, and drops
    the journal. A record torn by the crash fails its CRC; its rename was
    never made: the one before it is then the last.

    A key gets a journal with the record of the write that makes it busy
    (and a full journal is replaced by one holding the write's record): the
    new journal is written and fsynced before the lock is taken when the
    write foresees it, and renamed into place, durably, before the object.
    The first is small, each successor twice the size of the journal it
    replaces, up to JOURNAL_SIZE (_journal_size): the size a journal was
    made with is all it ever holds, so no append changes its metadata.

    Records lie end to end from _RECORDS_START, each stamped with the
    journal's generation: a random number drawn when the journal is made, so
    that no other journal's records, nor stale bytes, pass for its own. A
    journal is never started over in place: when it is full, a new one
    holding the write's record replaces it (renamed over it, made durable
    first), and a key written the classic way, or deleted, loses its journal
    first. A store trusts where it left the tail only while the object is the
    file it wrote last, the journal's name still links to the file it holds
    open and its header is still the one it read or wrote (see _Place).
    """

    fd: int
    generation: int
    tail: int  # where the next record goes
    inode: tuple[int, int]
    header: bytes  # its first _HEADER.size bytes
    size: int  # how many bytes it was made with (zeros past the tail)


@dataclass
class _Place:
    """A journal this store left open, and where it left its tail: right
    while the object is still the file that store wrote last (nobody else can
    have appended since), the journal's name still links to `fd`'s inode
    (held open, so its number cannot be reused) and its header is unchanged
    (no simplequeue process starts a journal over in place, but a failing
    disk or an operator's `cp` may write over it: a restart would then find
    no record). Held, a journal that another process unlinked or replaced
    keeps its disk (up to JOURNAL_SIZE) until this store writes that key
    again or evicts it."""

    fd: int
    inode: tuple[int, int]
    generation: int
    tail: int
    header: bytes
    size: int


@dataclass
class _Scanned:
    """What a journal holds."""

    generation: int
    boot: bytes
    tail: int
    last: bytes | None


def _scan_journal(blob: bytes) -> _Scanned | None:
    """None for a header that is torn or not a journal's."""
    if len(blob) < _HEADER.size:
        return None
    magic, generation, boot, crc = _HEADER.unpack_from(blob)
    if magic != _JOURNAL_MAGIC or zlib.crc32(blob[: _HEADER.size - 4]) != crc:
        return None
    offset, last = _RECORDS_START, None
    while offset + _RECORD.size <= len(blob):
        record_generation, length, crc = _RECORD.unpack_from(blob, offset)
        start = offset + _RECORD.size
        end = start + length
        if record_generation != generation or end > len(blob):
            break
        body = blob[start:end]
        if zlib.crc32(body, zlib.crc32(blob[offset : offset + 12])) != crc:
            break
        offset, last = end, body
    return _Scanned(generation, boot, offset, last)


def _journal_size(length: int, previous: int = 0) -> int:
    """The size of a new journal whose first record holds `length` bytes and
    that replaces a full one of `previous` bytes (0: the key has none): room
    for 8 such records, twice the full one, JOURNAL_FIRST_SIZE at least, in
    whole pages, at most JOURNAL_SIZE (a write journaled fits that)."""
    wanted = max(JOURNAL_FIRST_SIZE, 2 * previous, _RECORDS_START + 8 * (_RECORD.size + length))
    return min(JOURNAL_SIZE, -(-wanted // _PAGE) * _PAGE)


def _journal_header(generation: int, boot: bytes) -> bytes:
    head = _HEADER.pack(_JOURNAL_MAGIC, generation, boot, 0)[: _HEADER.size - 4]
    return head + struct.pack(">I", zlib.crc32(head))


def _journal_record(generation: int, data: bytes) -> bytes:
    """A record's header; the record is this and `data`."""
    head = _RECORD.pack(generation, len(data), 0)[:12]
    return head + struct.pack(">I", zlib.crc32(data, zlib.crc32(head)))


class _Places:
    """The journals this store appended to last, held open with where it left
    them, so that the next write of a busy key appends without opening its
    journal again (open, fstat, pread and close became a stat and a pread of
    the header: 25.4 system calls per head write became 22.4, futex aside).
    Bounded, like _WrittenFiles; each holds a descriptor. A write takes its
    key's place out for as long as it holds the key's lock and gives it back
    after, so that evicting another key's place never closes a descriptor in
    use."""

    # A place is trusted only while the object is a file _WrittenFiles still
    # holds: keeping more would keep places no write can use.
    LIMIT = _WrittenFiles.LIMIT

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._places: OrderedDict[Path, _Place] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False  # as _WrittenFiles._closed

    def take(self, path: Path) -> _Place | None:
        """The key's place, now the caller's (it closes or keeps the descriptor)."""
        with self._lock:
            return self._places.pop(path, None)

    def tail_and_size(self, path: Path) -> tuple[int, int] | None:
        """Where this store left the key's journal, and the journal's size, if
        it holds it (a guess: the place is checked again under the lock)."""
        with self._lock:
            place = self._places.get(path)
            return None if place is None else (place.tail, place.size)

    def keep(self, path: Path, journal: _Journal) -> None:
        """Keep `journal` open for the key's next write: its descriptor is now ours."""
        kept = _Place(
            journal.fd,
            journal.inode,
            journal.generation,
            journal.tail,
            journal.header,
            journal.size,
        )
        evicted = []
        with self._lock:
            if self._closed:
                evicted.append(kept)
            else:
                old = self._places.pop(path, None)
                if old is not None and old.fd != journal.fd:
                    evicted.append(old)
                self._places[path] = kept
                while len(self._places) > self.limit:
                    evicted.append(self._places.popitem(last=False)[1])
        for place in evicted:
            os.close(place.fd)

    def let_go_of_older_half(self) -> None:
        """As _WrittenFiles': a place is only a shortcut. Those taken out
        by a write in progress are not here, so none in use is closed."""
        with self._lock:
            evicted = [self._places.popitem(last=False)[1] for _ in range(len(self._places) // 2)]
        for place in evicted:
            os.close(place.fd)

    def forget(self, path: Path) -> None:
        with self._lock:
            place = self._places.pop(path, None)
        if place is not None:
            os.close(place.fd)

    def close(self) -> None:
        with self._lock:
            places, self._places = list(self._places.values()), OrderedDict()
            self._closed = True
        for place in places:
            os.close(place.fd)


class LocalStore(ObjectStore):
    """Objects under `root`; the key "a/b.json" is the file root/a/b.json.
    A write or delete that cannot get its key's lock within `lock_timeout`
    seconds raises StoreUnavailable. `journal=False` makes every write the
    classic way; `boot_id` is this boot of the machine (tests pass another to
    play a restart); without one (not Linux) there is no journal."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        lock_timeout: float = LOCK_TIMEOUT,
        journal: bool = True,
        boot_id: bytes | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root).absolute()
        self.lock_timeout = lock_timeout
        self.url = "file://" + urllib.parse.quote(str(self.root))  # as store_from_url reads it
        self._locks = self.root / _META_DIR / "locks"
        self._ready = False
        self._written = _WrittenFiles(_kept_limit(_WrittenFiles.LIMIT))
        self._boot = (boot_id or machine_boot_id()) if journal else None
        self._places = _Places(_kept_limit(_Places.LIMIT))
        # The files last written, and the busy keys' journals.
        self.held_descriptors = self._written.limit + self._places.limit
        # Keys whose journal is known not to be from an earlier boot.
        self._checked: set[Path] = set()
        # The folders under the root known durable in their parents (_make_dirs).
        self._durable: set[str] = set()
        # When each key without a journal was last rewritten with If-Match.
        self._rewritten: dict[Path, float] = {}
        # The folder the last sweep of leftovers visited last (_in_turn).
        self._swept_up_to: str | None = None

    def _prepare(self) -> None:
        """Once per store, before its first write or lock: the root made if
        missing and made durable in its parent (with each folder above it it
        made), and the lock folder made. Every object hangs on the root's
        entry in its parent: one that a power cut may lose loses them all.
        A root found there may have been made a moment ago by a process that
        has not fsynced its parent yet (another broker, or one made without
        care), so its parent is fsynced all the same."""
        if self._ready:
            return
        if not make_dirs(self.root, self._fsync_dir):
            try:
                self._fsync_dir(self.root.parent)
            except PermissionError:  # a parent we may not read: the root is not ours
                log.debug("localfs %s: cannot fsync its parent (not readable)", self.root)
        self._locks.mkdir(parents=True, exist_ok=True)
        # The mtimes sampled are this host's CLOCK_REALTIME on a local disk,
        # which chrony slews with our CLOCK_BOOTTIME (one oscillator): the
        # offset between them moves only when the clock is stepped, and
        # samples need not widen (at SLEW: 0.2-0.5 s of error between writes
        # 5 s apart, not 1 ms).
        self.clock.set_slew(0.0 if stamped_here(self.root) else SLEW)
        self._ready = True

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn` in a worker thread. One that meets a busy lock gives its thread
        back (_LockBusy: nothing of it is left) and is made again after a
        pause, until the lock's deadline (then StoreUnavailable). One that
        finds the process out of descriptors is made once more, after the
        store has let go of half of the files it keeps open."""
        token = _lock_deadline.set(time.monotonic() + self.lock_timeout)  # copied to the thread
        pause = LOCK_WAIT_IN_THREAD
        let_go = False
        try:
            while True:
                try:
                    return await asyncio.to_thread(fn, *args, **kwargs)
                except _LockBusy:
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, 0.2)
                except OSError as exc:
                    # Out of descriptors (connections took them, or the limit
                    # was lowered since): what is kept open is only a
                    # shortcut, so half of it goes and the call is made once
                    # more, rather than fail every write until a restart.
                    # Made again, a call redoes only what failed: a write
                    # failing before its rename removes its temp file, one
                    # failing after it is NotDurable (no OSError), and
                    # put_if_after's objects already in place are in _Tries.
                    if let_go or exc.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
                    let_go = True
                    log.warning("localfs %s: out of descriptors: %s", self.root, exc)
                    self._written.let_go_of_older_half()
                    self._places.let_go_of_older_half()
        except (ObjectNotFound, PreconditionFailed):
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("localfs %s: no space left: %s", self.root, exc)
                raise StorageFull(f"localfs {self.root}: no space left on the device") from exc
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # until an operator acts
                raise StoreRefused(f"localfs {self.root}: {exc}") from exc
            if exc.errno in (errno.EISDIR, errno.ENOTDIR):
                # A write of "a" with "a/b" stored (a folder holds its name),
                # or of "a/b" with "a" stored: a file cannot be a folder too,
                # as memfs' and S3's keys can. Not InvalidKey (the key is
                # valid; another store takes it) nor an outage: refused until
                # the other key is deleted, so the committer does not retry.
                raise StoreRefused(
                    f"localfs {self.root}: a key cannot be both an object and a folder "
                    f"of others here: {exc}"
                ) from exc
            raise StoreUnavailable(f"localfs {self.root}: {exc}") from exc
        finally:
            _lock_deadline.reset(token)

    # --- the blocking half, run in threads -------------------------------------

    def _lock(self, key: str) -> int:
        fd = self._open_lock(key)
        try:
            self._wait_for_lock(fd, key)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _try_lock(self, key: str) -> int | None:
        """The key's lock if it is free now, else None: no wait."""
        fd = self._open_lock(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_lock(self, key: str) -> int:
        """The lock file of `key`'s stripe, open."""
        self._prepare()
        stripe = hashlib.blake2b(_stripe_name(key).encode(), digest_size=4).digest()
        n = int.from_bytes(stripe, "big") % LOCK_STRIPES
        return os.open(self._locks / f"{n:03d}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def _wait_for_lock(self, fd: int, key: str) -> None:
        # A blocking flock would wait for ever on a holder that is SIGSTOPped:
        # poll instead, so that the wait is bounded and the thread comes back.
        # Called through _run, it waits here LOCK_WAIT_IN_THREAD at most, then
        # gives its thread back (_LockBusy) until the call's deadline.
        through_run = _lock_deadline.get()
        deadline = through_run or time.monotonic() + self.lock_timeout
        given_back = time.monotonic() + LOCK_WAIT_IN_THREAD if through_run else 1e300
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    break
                if now >= given_back:
                    raise _LockBusy(key) from None
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
        path = self._path(key)
        if self._boot is not None and path not in self._checked:
            self._check_journal(key, path)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            # A folder of its name ("a" with "a/b" stored) is no object either.
            raise ObjectNotFound(key) from None
        return data, content_etag(data)

    def _current_etag(self, path: Path, linked: os.stat_result | None) -> str | None:
        """The ETag of what `path` holds now (None: nothing), `linked` being
        its stat. When it is still the very file this store last wrote there,
        the ETag is known without reading it back."""
        if linked is None:
            return None
        known = self._written.etag_if_same(path, linked)
        if known is not None:
            return known
        try:
            return content_etag(path.read_bytes())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def _write_temp(self, path: Path, data: bytes, *, sync: bool = True) -> tuple[Path, int, str]:
        """Write `data` to a new temp file beside `path` and (with `sync`) fsync
        it: (its path, its open descriptor, the ETag). Needs no lock: nobody
        else knows it."""
        folder = path.parent
        tmp = folder / f".{path.name}.{uuid.uuid4().hex}.tmp"
        if str(folder) not in self._durable:  # the first write into it here
            self._make_dirs(folder)
        sent = self.clock.local()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:  # its folder was removed since (by hand): made again
            for gone in (folder, *folder.parents):
                self._durable.discard(str(gone))
            self._make_dirs(folder)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self._observe_mtime(fd, sent)
            if sync:
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
        sent = self.clock.local()
        fd = os.open(self.root / _META_DIR / "clock", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"\n", 0)
            self._observe_mtime(fd, sent)
        finally:
            os.close(fd)

    def _observe_mtime(self, fd: int, sent: float) -> None:
        """A write to `fd` since the local time `sent` (StoreClock.local())
        stamped its mtime: a sample of the kernel's clock. `received` is read
        after fstat: another writer of the file (the shared clock file) may
        have stamped it later than our write, though never after the fstat."""
        stamp = os.fstat(fd).st_mtime_ns
        received = self.clock.local()
        self.clock.observe(sent, received, stamp / 1e9, _mtime_resolution(stamp))

    def _make_dirs(self, directory: Path) -> None:
        """Before the first write into `directory` (under the root): it and
        the folders between it and the root made if missing, and each made
        durable in its parent, unless this store knows it is. One found
        there is too: the process that made it a moment ago may not have
        fsynced its parent yet, and cannot be told from one that did (a
        write into it, answered, would hang on an entry a power cut may
        lose). So each folder costs one directory fsync per store, at its
        first write (per process: after a restart, each topic's folder)."""
        self._prepare()  # the root first, durable in its parent
        chain = []
        while directory != self.root and str(directory) not in self._durable:
            chain.append(directory)
            directory = directory.parent
        for folder in reversed(chain):
            with contextlib.suppress(FileExistsError):
                folder.mkdir()
            self._fsync_dir(folder.parent)
            if len(self._durable) >= _CHECKED_LIMIT:  # forgotten: fsynced again
                self._durable.clear()
            self._durable.add(str(folder))

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        _fsync(directory, os.O_DIRECTORY)

    def _put_sync(
        self,
        key: str,
        data: bytes,
        if_match: str | None,
        if_none_match: bool,
        conditional: bool,
        tries: _Tries | None = None,
    ) -> str:
        """One try of a write. Made again after a busy lock (_LockBusy), it
        takes up the temp file (and new journal) its earlier try kept in
        `tries`: the bytes are written and fsynced once however long the
        lock stays busy."""
        path = self._path(key)
        journaled = (
            self._boot is not None
            and if_match is not None
            and _RECORDS_START + _RECORD.size + len(data) <= JOURNAL_SIZE
        )
        temp = tries.take(key) if tries is not None else None
        if temp is None:
            try:
                temp = self._stage(path, data, journaled)
            except NotADirectoryError:
                if if_match is not None:  # a file where the key's folder would be: no such key
                    raise PreconditionFailed(f"{key} changed") from None
                raise
        busy = False
        try:
            durable = self._rename(
                key,
                path,
                temp.tmp,
                temp.fd,
                data if journaled else None,
                temp.synced,
                temp.journal,
                if_match,
                if_none_match,
                conditional,
            )
        except _LockBusy:
            busy = True
            _keep(tries, key, temp)
            raise
        finally:
            if not busy and temp.journal is not None and not temp.journal.used:
                temp.journal.discard()
        fd, etag = temp.fd, temp.etag
        if not durable:
            # The rename is durable only once the directory is fsynced, and that
            # is done after the lock is released. Safe: nobody has been answered
            # yet (we answer after this fsync), and whoever sees the renamed
            # file before then and builds on it (a writer whose If-Match is our
            # ETag) makes its own write durable, which makes ours durable too:
            # it fsyncs this same directory, or it journals its bytes, and
            # those supersede ours. Readers never took the lock, so they could
            # always see a rename before it was durable.
            try:
                self._fsync_dir(path.parent)
            except BaseException as exc:
                os.close(fd)
                if isinstance(exc, OSError):
                    raise _renamed_but(key, self.root, exc) from exc
                raise
        self._written.remember(path, fd, etag)  # keeps fd open, or closes it
        return etag

    def _stage(self, path: Path, data: bytes, journaled: bool) -> _Temp:
        """The slow, pause-prone part of a write, done before the lock: the
        data written to a temp file, fsynced unless the write foresees a
        journal (see _foresee), and the new journal it foresees, made."""
        expects_journal, prepared = self._foresee(path, data) if journaled else (False, None)
        try:
            tmp, fd, etag = self._write_temp(path, data, sync=not expects_journal)
        except BaseException:
            if prepared is not None:
                prepared.discard()
            raise
        return _Temp(tmp, fd, etag, not expects_journal, prepared)

    def _foresee(self, path: Path, data: bytes) -> tuple[bool, _NewJournal | None]:
        """Whether a rewrite of `path` with `data` will most likely be
        journaled, judged before the lock from what this store knows (it is
        decided again under the lock), and the new journal holding its record
        that it will then need (the key's is full, or the key is becoming
        busy), made now. Not journaled, the temp file is fsynced now."""
        jpath = journal_path(path)
        held = self._places.tail_and_size(path)
        previous = 0  # the size of the full journal the new one replaces
        if held is not None:
            tail, previous = held
            fits = tail + _RECORD.size + len(data) <= previous
        elif jpath.exists():
            fits = True  # most likely; found out under the lock
        else:
            last = self._rewritten.get(path)
            if last is None or time.monotonic() - last >= JOURNAL_AFTER:
                return False, None
            fits = False
        if fits:
            return True, None
        try:
            return True, self._prepare_journal(jpath, data, previous)
        except OSError:  # made again under the lock, or the write goes the classic way
            return True, None

    def _rename(
        self,
        key: str,
        path: Path,
        tmp: Path,
        fd: int,
        journal_data: bytes | None,
        synced: bool,
        prepared: _NewJournal | None,
        if_match: str | None,
        if_none_match: bool,
        conditional: bool,
    ) -> bool:
        """Rename the temp file `tmp` (open as `fd`, fsynced if `synced`) over
        `key` if the condition holds, under the key's lock; else close and
        remove it, and raise.

        With `journal_data` the write's record is made durable first: in the
        key's journal, or in a new one (`prepared` before the lock, if it was
        foreseen) when the key has none and is busy, or its journal is full.
        Otherwise (a key not busy, a journal that failed) the temp file is
        fsynced, if it is not yet. Without `journal_data`, a journal the key
        has is dropped before the rename: its records must not outlive a
        write they do not hold. Return whether the write is durable already;
        if not, the caller fsyncs the directory. A busy lock (_LockBusy)
        leaves `tmp` and `fd` to the caller, for the call's next try."""
        try:
            lock = self._lock(key)
            try:
                linked = _stat_or_none(path)
                ours = self._written.etag_if_same(path, linked) is not None
                # The journal first: after a restart, its recovery may rewrite
                # the object (and then forgets it wrote it, so `linked` is
                # not trusted below and the object is read back).
                journal = self._journal(key, path, ours)
                try:
                    current = self._current_etag(path, linked)
                    if conditional:
                        if if_none_match and current is not None:
                            raise PreconditionFailed(f"{key} exists")
                        if if_match is not None and current != if_match:
                            raise PreconditionFailed(f"{key} changed")
                    if journal_data is not None and (
                        journal is not None or (path.is_file() and self._busy(path))
                    ):
                        handed, journal = journal, None
                        if self._record(key, path, handed, journal_data, prepared):
                            self._rename_recorded(key, path, tmp)
                            return True
                    elif journal is not None:
                        self._drop_journal(path)
                    if not synced:
                        os.fsync(fd)  # written for a journal it will not have
                    os.replace(tmp, path)
                    return False
                finally:
                    if journal is not None:
                        os.close(journal.fd)
            finally:
                self._unlock(lock)
        except _LockBusy:
            raise
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise

    def _rename_recorded(self, key: str, path: Path, tmp: Path) -> None:
        """The rename of a write whose record is durable. If it fails, the
        journal goes (the object as it is made durable first), so that no
        restart brings back a version that never was; if that fails too, a
        restart may, and the write is AmbiguousWrite."""
        try:
            os.replace(tmp, path)
        except OSError as exc:
            try:
                self._drop_journal(path)
            except OSError as again:
                raise AmbiguousWrite(
                    f"localfs {self.root}: {key} was not renamed into place ({exc}), "
                    f"but its journal, which a restart may bring back, could not be "
                    f"dropped: {again}"
                ) from again
            raise

    # --- the journal, under the key's lock --------------------------------------

    def _record(
        self,
        key: str,
        path: Path,
        journal: _Journal | None,
        data: bytes,
        prepared: _NewJournal | None,
    ) -> bool:
        """Make `data`'s record durable, before its rename: appended to
        `journal`, or in a new journal when the key has none or it is full
        (`prepared`, if given, holds it). Takes `journal` over: kept open for
        the key's next write, or closed. False if the journal failed: whether
        the record reached the disk is unknown, so the journal is dropped
        (the object as it is made durable first) and the write goes the
        classic way; if the drop fails too, the write is AmbiguousWrite."""
        try:
            try:
                if journal is None or not self._append(journal, data):
                    jpath = journal_path(path)
                    previous = 0 if journal is None else journal.size
                    new = (prepared or self._prepare_journal(jpath, data, previous)).place(
                        jpath, self._fsync_dir
                    )
                    if journal is not None:
                        os.close(journal.fd)
                    journal = new
            except BaseException:
                if journal is not None:
                    os.close(journal.fd)
                raise
            self._places.keep(path, journal)
            return True
        except OSError as exc:
            self._places.forget(path)
            log.warning(
                "localfs %s: the journal of %s failed (%s): written the classic way",
                self.root,
                key,
                exc,
            )
            try:
                self._drop_journal(path)
            except OSError as again:
                raise AmbiguousWrite(
                    f"localfs {self.root}: the journal of {key} failed ({exc}) and could "
                    f"not be dropped ({again}): a restart may bring the write back"
                ) from again
            return False

    def _journal(self, key: str, path: Path, ours: bool) -> _Journal | None:
        """The journal of `key` (at `path`), open (the caller closes it), or None
        if it has none. Recovered (and dropped) first when an earlier boot of
        the machine wrote it. `ours`: the object is still the file this store
        wrote last, so where it left the journal is still right if the
        journal is the same file."""
        jpath = journal_path(path)
        place = self._places.take(path)
        if place is not None:
            try:
                linked = _stat_or_none(jpath) if ours else None
                if (
                    linked is not None
                    and (linked.st_ino, linked.st_dev) == place.inode
                    # Still its header: a failing disk or an operator's cp may
                    # have written over it in place, and a restart would then
                    # find no record.
                    and os.pread(place.fd, _HEADER.size, 0) == place.header
                ):
                    return _Journal(
                        place.fd,
                        place.generation,
                        place.tail,
                        place.inode,
                        place.header,
                        place.size,
                    )
            except BaseException:
                os.close(place.fd)
                raise
            os.close(place.fd)
        try:
            fd = os.open(jpath, os.O_RDWR)
        except (FileNotFoundError, NotADirectoryError):
            self._remember_checked(path)
            return None
        try:
            st = os.fstat(fd)
            inode = (st.st_ino, st.st_dev)
            blob = os.pread(fd, JOURNAL_SIZE, 0)
            scanned = _scan_journal(blob)
        except BaseException:
            os.close(fd)
            raise
        if scanned is None or scanned.boot != self._boot:
            os.close(fd)
            self._recover(key, path, jpath, scanned)
            return None
        self._remember_checked(path)
        # Its size is what was read of it: no journal is made bigger than
        # JOURNAL_SIZE, and records go no further than what was scanned.
        return _Journal(
            fd, scanned.generation, scanned.tail, inode, blob[: _HEADER.size], len(blob)
        )

    def _recover(self, key: str, path: Path, jpath: Path, scanned: _Scanned | None) -> None:
        """The machine restarted since this journal was written, or its header
        is torn (only an operator or a failing disk can do that). Write its
        last record back the classic way if the object is not that record (the
        page cache lost the rename or the bytes), else make the object durable
        as it is (with no record, it is: a journal's first record is durable
        before the rename it holds); then drop the journal (the key's next
        busy stretch makes a new one)."""
        self._places.forget(path)
        self._written.forget(path)
        if path.exists():
            try:
                on_disk: str | None = content_etag(path.read_bytes())
            except OSError:
                on_disk = None
            last = scanned.last if scanned is not None else None
            if last is not None and on_disk != content_etag(last):
                log.warning("localfs %s: %s restored from its journal", self.root, key)
                tmp, fd, _ = self._write_temp(path, last)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                finally:
                    os.close(fd)
            else:
                _fsync(path)
            self._fsync_dir(path.parent)
        self._remember_checked(path)
        jpath.unlink(missing_ok=True)
        self._fsync_dir(path.parent)

    def _prepare_journal(self, jpath: Path, first: bytes, previous: int = 0) -> _NewJournal:
        """A new journal for `jpath` holding `first`'s record, written whole
        (zeros included) to a temp file and fsynced; not in place yet. It
        replaces a full one of `previous` bytes (0: the key has none), and is
        sized from both (_journal_size). Needs no lock: nobody else knows it."""
        assert self._boot is not None
        tmp = jpath.with_name(f"{jpath.name}.{uuid.uuid4().hex}.tmp")
        blob = bytearray(_journal_size(len(first), previous))
        generation = int.from_bytes(os.urandom(8), "big")
        header = _journal_header(generation, self._boot)
        blob[: len(header)] = header
        record = _journal_record(generation, first) + first
        blob[_RECORDS_START : _RECORDS_START + len(record)] = record
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, blob, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return _NewJournal(tmp, fd, generation, _RECORDS_START + len(record), header, len(blob))

    @staticmethod
    def _append(journal: _Journal, data: bytes) -> bool:
        """Append `data`'s record and fdatasync it; False if it does not fit."""
        head = _journal_record(journal.generation, data)
        if journal.tail + len(head) + len(data) > journal.size:
            return False
        if os.pwritev(journal.fd, [head, data], journal.tail) != len(head) + len(data):
            _write_all(journal.fd, head + data, journal.tail)
        os.fdatasync(journal.fd)
        journal.tail += len(head) + len(data)
        return True

    def _drop_journal(self, path: Path) -> None:
        """Before the object at `path` is written the classic way or deleted:
        its journal goes, durably, or a restart could bring back its last
        record. That record may be the object's only durable copy, so the
        object is made durable first."""
        self._places.forget(path)
        jpath = journal_path(path)
        if not jpath.exists():
            return
        if path.exists():
            _fsync(path)
        self._fsync_dir(path.parent)
        jpath.unlink(missing_ok=True)
        self._fsync_dir(path.parent)

    def _check_journal(self, key: str, path: Path) -> None:
        """Before a read: recover `key` if its journal is from an earlier boot."""
        try:
            fd = os.open(journal_path(path), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            self._remember_checked(path)
            return
        try:
            scanned = _scan_journal(os.pread(fd, _HEADER.size, 0))
        finally:
            os.close(fd)
        if scanned is not None and scanned.boot == self._boot:
            self._remember_checked(path)
            return
        lock = self._lock(key)
        try:
            self._recover_if_rebooted(key, path)
        finally:
            self._unlock(lock)

    def _recover_if_rebooted(self, key: str, path: Path) -> None:
        """Under the key's lock: recover `key` if an earlier boot wrote its journal."""
        journal = self._journal(key, path, False)
        if journal is not None:
            os.close(journal.fd)

    def _busy(self, path: Path) -> bool:
        """Whether `path` was rewritten with If-Match within JOURNAL_AFTER (now
        is one such rewrite)."""
        now = time.monotonic()
        last = self._rewritten.pop(path, None)
        if last is not None and now - last < JOURNAL_AFTER:
            return True
        if len(self._rewritten) >= _CHECKED_LIMIT:
            self._rewritten.clear()
        self._rewritten[path] = now
        return False

    def _remember_checked(self, path: Path) -> None:
        if len(self._checked) >= _CHECKED_LIMIT:
            self._checked.clear()
        self._checked.add(path)

    def _put_if_after_sync(
        self,
        objects: list[tuple[str, bytes]],
        key: str,
        data: bytes,
        if_match: str | None,
        if_none_match: bool,
        tries: _Tries | None = None,
    ) -> str:
        """put_if_after in one thread trip: each object written, fsynced and
        renamed into place (one an earlier try wrote is left), their
        directories fsynced once each, then the conditional write of `key`.
        Made again after a busy lock (_LockBusy, most often the head's), it
        skips what `tries` says its earlier tries did: rewriting and
        fsyncing a batch's segments at every 20 ms of a busy head's lock
        would write them up to 30 times."""
        tries = tries if tries is not None else _Tries()
        for obj_key, body in objects:
            if obj_key in tries.objects:
                continue
            path = self._path(obj_key)
            temp = tries.take(obj_key)
            if temp is None:
                tmp, fd, etag = self._write_temp(path, body)
                temp = _Temp(tmp, fd, etag, True, None)
            try:
                self._rename(obj_key, path, temp.tmp, temp.fd, None, True, None, None, True, True)
            except PreconditionFailed:
                # Ours, from an earlier call (a lost answer): immutable, so the
                # same bytes; its directory's fsync may not have been made.
                pass
            except _LockBusy:
                _keep(tries, obj_key, temp)
                raise
            else:
                # Not remembered: nobody compares against a new object's ETag,
                # and it would push a head out of the descriptors kept.
                os.close(temp.fd)
            tries.objects.add(obj_key)
            tries.unsynced[path.parent] = None
        # The objects are durable before the head is renamed.
        for directory in list(tries.unsynced):
            self._fsync_dir(directory)
            del tries.unsynced[directory]
        return self._put_sync(key, data, if_match, if_none_match, True, tries)

    def _delete_sync(self, key: str) -> None:
        path = self._path(key)
        lock = self._lock(key)
        try:
            self._written.forget(path)
            if self._boot is not None:  # recovered first, as a write would be
                self._recover_if_rebooted(key, path)
            self._drop_journal(path)
            try:
                path.unlink()
            except FileNotFoundError:
                # Gone already, perhaps by another process that has not
                # fsynced its folder yet: answered "deleted" only once that
                # unlink is durable too, by the fsync below.
                if not path.parent.is_dir():
                    return
            except (NotADirectoryError, IsADirectoryError):
                return
        finally:
            self._unlock(lock)
        self._fsync_dir(path.parent)  # after the release, as for a write

    def _list_sync(self, prefix: str) -> list[str]:
        """The keys that start with `prefix`, reading only the folders that
        may hold one: the prefix's own folder (there only the names that
        start with the rest of it) and those below. A sweep lists one topic's
        segments: it must not read every other topic's folder too.

        Only names that are keys are listed: not our dot files (temp files,
        journals, locks), nor a stray file ("seg 1.json", an editor's
        "seg-1.json~"), which get() and delete() would refuse. A folder that
        cannot be read (EMFILE, EIO, EACCES) fails the listing, as it does
        list_top(), rather than read as empty (a broker listing brokers/
        would drop every other broker from its view)."""
        at = _folder_of(prefix)
        if at is None:
            return []
        keys: list[str] = []
        todo = [at]
        while todo:
            for key, entry in self._entries(*todo.pop()):
                if not entry.is_dir():
                    keys.append(key)
                elif not entry.is_symlink():  # as os.walk: a link to a folder is neither
                    todo.append((key, ""))
        return sorted(keys)

    def _list_top_sync(self, prefix: str) -> builtins.list[str]:
        """One directory read: the files in the prefix's folder (none below it)."""
        at = _folder_of(prefix)
        return [] if at is None else sorted(k for k, e in self._entries(*at) if e.is_file())

    def _list_folders_sync(self, prefix: str) -> builtins.list[str]:
        """One directory read: the folders in the prefix's folder (a folder
        whose files were all deleted stays, and is listed)."""
        at = _folder_of(prefix)
        if at is None:
            return []
        found = self._entries(*at)
        return sorted(f"{k}/" for k, e in found if e.is_dir() and not e.is_symlink())

    def _entries(self, folder: str, start: str) -> list[tuple[str, os.DirEntry[str]]]:
        """The entries of `folder` (from the root; "" for it) whose names start
        with `start` and make keys, each with its key; none when the folder is
        gone, or a file. One that cannot be read raises (_run maps it)."""
        base = f"{folder}/" if folder else ""
        try:
            with os.scandir(self.root / folder if folder else self.root) as found:
                entries = list(found)
        except (FileNotFoundError, NotADirectoryError):
            return []
        named = ((base + e.name, e) for e in entries if e.name.startswith(start))
        return [(key, e) for key, e in named if is_key(key)]

    def _sweep_leftovers_sync(self, older_than: float) -> int:
        """Remove the leftovers of writes cut short, and drop the idle
        journals, older than `older_than`: those of the root and of the
        folders right under it (brokers/, topics/: the heads and their
        journals) at every sweep, those of the folders below (a topic's
        segments) LEFTOVER_FOLDERS_PER_SWEEP of them at a time, in turn."""
        if not self.root.is_dir():
            return 0
        self._touch_clock()  # the cutoff by the kernel's clock, which stamps mtimes
        cutoff = self.clock.now() - older_than
        files, folders = _files_and_folders(self.root)
        visits = [("", files)]
        below: list[str] = []
        for folder in folders:
            if folder != _META_DIR:
                files, inner = _files_and_folders(self.root / folder)
                visits.append((folder, files))
                below += (f"{folder}/{name}" for name in inner)
        for folder in self._in_turn(sorted(below)):
            for dirpath, _, filenames in os.walk(self.root / folder):
                visits.append((os.path.relpath(dirpath, self.root), filenames))
        removed = journals = 0
        for folder, names in visits:
            were_left, idle = self._sweep_files(folder, names, cutoff)
            removed, journals = removed + were_left, journals + idle
        if removed:
            log.info("localfs %s: removed %d files of writes cut short", self.root, removed)
        if journals:
            log.info("localfs %s: dropped the journals of %d idle keys", self.root, journals)
        return removed + journals

    def _in_turn(self, folders: builtins.list[str]) -> builtins.list[str]:
        """Of `folders` (sorted), the LEFTOVER_FOLDERS_PER_SWEEP after the one
        this handle's last sweep visited last, wrapping around; all of them
        when they are no more. An idle broker must not read every topic's
        folder at every sweep (SPEC 4.1: 100,000 topics were 100,000 folder
        reads every 10 minutes, on every broker); each is still reached,
        within a few days at 100,000. A handle's first sweep starts anywhere,
        so that brokers restarted more often than that, or several on one
        store, still reach them all."""
        if len(folders) <= LEFTOVER_FOLDERS_PER_SWEEP:
            return folders
        if self._swept_up_to is None:
            start = random.randrange(len(folders))
        else:
            start = bisect.bisect_right(folders, self._swept_up_to)
        turn = [folders[(start + n) % len(folders)] for n in range(LEFTOVER_FOLDERS_PER_SWEEP)]
        self._swept_up_to = turn[-1]
        return turn

    def _sweep_files(
        self, folder: str, names: builtins.list[str], cutoff: float
    ) -> tuple[int, int]:
        """Of the files `names` in `folder` (from the root; "" for it), remove
        the leftovers and drop the journals untouched since `cutoff`: (how
        many leftovers, how many journals)."""
        removed = journals = 0
        for name in names:
            journal = _JOURNAL_NAME.fullmatch(name)
            if not journal and not _LEFTOVER.fullmatch(name):
                continue
            path = self.root / folder / name
            try:
                if os.lstat(path).st_mtime >= cutoff:
                    continue
                if journal:
                    key = f"{folder}/{journal[1]}" if folder else journal[1]
                    if is_key(key) and self._drop_idle_journal(key, path, cutoff):
                        journals += 1
                else:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:  # its write just ended
                pass
            except OSError as exc:  # another user's, a read-only directory: the rest go on
                log.warning("localfs %s: cannot remove %s: %s", self.root, path, exc)
        return removed, journals

    def _drop_idle_journal(self, key: str, jpath: Path, cutoff: float) -> bool:
        """Drop the journal at `jpath` if nothing was appended to it since
        `cutoff`: a key busy once (an enqueue, then a claim) keeps its
        journal (16 KiB at least) beside a head of a few hundred bytes until
        it is written the classic way, which an idle key may never be again.
        Recovered first if an earlier boot wrote it; else its object is made
        durable before it goes (_drop_journal). A key whose lock is taken is
        being written: it is left for the next sweep."""
        lock = self._try_lock(key)
        if lock is None:
            return False
        try:
            if os.lstat(jpath).st_mtime >= cutoff:  # appended to since it was listed
                return False
            path = self._path(key)
            self._recover_if_rebooted(key, path)
            self._drop_journal(path)
            return True
        finally:
            self._unlock(lock)

    # --- the async interface ----------------------------------------------------

    async def get(self, key: str) -> tuple[bytes, str]:
        return await self._run(self._read, check_key(key))

    async def put(self, key: str, data: bytes) -> str:
        key, data = check_key(key), bytes(data)
        with _Tries() as tries:
            return await self._run(self._put_sync, key, data, None, False, False, tries)

    async def put_if(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        self._check_condition(if_match, if_none_match)
        key, data = check_key(key), bytes(data)
        with _Tries() as tries:
            return await self._run(self._put_sync, key, data, if_match, if_none_match, True, tries)

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
        key, data = check_key(key), bytes(data)
        with _Tries() as tries:
            return await self._run(
                self._put_if_after_sync, checked, key, data, if_match, if_none_match, tries
            )

    async def delete(self, key: str) -> None:
        await self._run(self._delete_sync, check_key(key))

    async def list(self, prefix: str = "") -> list[str]:
        return await self._run(self._list_sync, prefix)

    async def list_top(self, prefix: str) -> builtins.list[str]:
        return await self._run(self._list_top_sync, prefix)

    async def list_folders(self, prefix: str) -> builtins.list[str]:
        return await self._run(self._list_folders_sync, prefix)

    async def sweep_leftovers(self, older_than: float) -> int:
        return await self._run(self._sweep_leftovers_sync, older_than)

    async def sample_clock(self) -> None:
        if not self.clock.samples:
            await self._run(self._touch_clock)

    async def close(self) -> None:
        self._written.close()
        self._places.close()


@dataclass
class _Temp:
    """A write's temp file, written (and fsynced, if `synced`) before its
    lock, open as `fd`, and the new journal it foresaw (`journal`)."""

    tmp: Path
    fd: int
    etag: str
    synced: bool
    journal: _NewJournal | None

    def discard(self) -> None:
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)
        if self.journal is not None and not self.journal.used:
            self.journal.discard()


@dataclass
class _Tries:
    """What the tries of one write did so far (LocalStore._run makes a call
    again after a busy lock): put_if_after's objects in place, the folders
    holding some of them that are not fsynced since, and the temp files
    (with any new journal) written for keys whose lock was busy, kept for
    the next try. A context manager: leaving it (the call answered, failed
    or cancelled: no try comes after) discards what is still kept, and
    what a try still running in its thread would keep."""

    objects: set[str] = field(default_factory=set)
    unsynced: dict[Path, None] = field(default_factory=dict)
    _kept: dict[str, _Temp] = field(default_factory=dict)
    _over: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, key: str) -> _Temp | None:
        """The temp file an earlier try kept for `key`, now the caller's."""
        with self._lock:
            return self._kept.pop(key, None)

    def keep(self, key: str, temp: _Temp) -> None:
        with self._lock:
            if not self._over:
                self._kept[key] = temp
                return
        temp.discard()

    def __enter__(self) -> _Tries:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._over = True
            kept, self._kept = list(self._kept.values()), {}
        for temp in kept:
            temp.discard()


def _keep(tries: _Tries | None, key: str, temp: _Temp) -> None:
    """After a busy lock: `temp` kept for the call's next try (none without
    `tries`: a call not made through LocalStore._run, which never meets one)."""
    if tries is not None:
        tries.keep(key, temp)
    else:
        temp.discard()


@dataclass
class _NewJournal:
    """A journal written and fsynced under a temp name (_prepare_journal),
    before the lock; renamed into place under it, or discarded."""

    tmp: Path
    fd: int
    generation: int
    tail: int
    header: bytes
    size: int
    used: bool = False

    def place(self, jpath: Path, fsync_dir: Callable[[Path], None]) -> _Journal:
        """Rename it over any journal at `jpath`, durably (the directory
        fsynced): it holds a record, which must be durable before the object
        it holds is renamed. Open (the caller closes it)."""
        self.used = True
        try:
            os.replace(self.tmp, jpath)
            fsync_dir(jpath.parent)
            st = os.fstat(self.fd)
        except BaseException:
            os.close(self.fd)
            self.tmp.unlink(missing_ok=True)
            raise
        return _Journal(
            self.fd, self.generation, self.tail, (st.st_ino, st.st_dev), self.header, self.size
        )

    def discard(self) -> None:
        """Unused: the write lost its compare, or went another way."""
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)


class _LockBusy(Exception):
    """A lock stayed busy LOCK_WAIT_IN_THREAD: the call gives its thread back,
    having changed nothing that anyone else sees but the new objects of a
    put_if_after it placed, and is made again (LocalStore._run). What it did
    before the lock (those objects in place, the temp files it wrote for
    the others and its key, any new journal) its next try takes up (_Tries)."""


# When the lock of the store call running in this thread must be had by
# (monotonic), set by _run (asyncio.to_thread copies it into the thread).
_lock_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "_lock_deadline", default=None
)


def _fsync(path: Path, flags: int = 0) -> None:
    """fsync the file (or, with O_DIRECTORY, the directory) at `path`."""
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: Path, fsync_dir: Callable[[Path], None] | None = None) -> bool:
    """Create `directory` and the folders above it that it lacks, each made
    durable: a new folder's entry lives in its parent, which is fsynced
    after it is made. Whether any was missing."""
    fsync_dir = fsync_dir or (lambda folder: _fsync(folder, os.O_DIRECTORY))
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):
            new.mkdir()
        fsync_dir(new.parent)
    return bool(missing)


def _folder_of(prefix: str) -> tuple[str, str] | None:
    """The folder that holds the keys starting with `prefix`, and how their
    names start there; None when no key can ("/", "../", "a//")."""
    folder, slash, start = prefix.rpartition("/")
    if slash and not is_key(folder):
        return None
    return folder, start


def _mtime_resolution(stamp: int) -> float:
    """How coarse the mtime `stamp` (ns) may be. Some filesystems keep whole
    seconds (ext3's small inodes, some NFS, SMB and FUSE mounts; FAT even
    ones), their every stamp ending in nine zeros, which one kept to the
    nanosecond does about once in a billion: such a stamp is taken for as
    coarse as it may be (a sample of a fine one so taken only tells less)."""
    if stamp % 2_000_000_000 == 0:
        return 2.0 + MTIME_RESOLUTION
    if stamp % 1_000_000_000 == 0:
        return 1.0 + MTIME_RESOLUTION
    return MTIME_RESOLUTION


def _write_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _renamed_but(key: str, root: Path, exc: OSError) -> NotDurable:
    """An error after the rename: not StorageFull (ENOSPC) nor any other
    "nothing was written": the new object is in place, its durability unknown."""
    return NotDurable(
        f"localfs {root}: {key} was renamed into place, but could not be made durable: {exc}"
    )


def _stripe_name(key: str) -> str:
    """What `key`'s lock stripe is chosen by: the key whatever its case. On a
    filesystem that ignores case (macOS's default APFS, ext4 with casefold,
    SMB shares), topics/Jobs.json and topics/jobs.json are one file, which
    two writers must not compare and rename under two locks: the two topics
    are then one queue, its writes still atomic."""
    return key.casefold()
