"""localfs's journal: an object rewritten with If-Match is made durable by one
fdatasync of a record beside it, and brought back from that record when the
machine restarts having lost what its page cache held.

A restart is played with another boot id, and a lost page cache by writing
back, under the store, what the disk may hold after one: an older version of
the object (the rename of the temp file was not durable yet)."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from simplequeue.errors import AmbiguousWrite, ObjectNotFound, PreconditionFailed, StoreUnavailable
from simplequeue.objstore import content_etag, localfs
from simplequeue.objstore.localfs import (
    JOURNAL_FIRST_SIZE,
    JOURNAL_SIZE,
    LocalStore,
    journal_path,
)
from tests.helpers.fs_events import record_disk_events

# A write that makes a key's new journal (its first, or a full one's
# successor): the journal is written and fsynced before the lock; under it,
# it is renamed into place durably before the object is.
NEW_JOURNAL_WRITE = [
    "fsync file",
    "lock",
    "rename .t.json.journal",
    "fsync dir",
    "rename t.json",
    "unlock",
]
BOOT, NEXT_BOOT = b"\x01" * 16, b"\x02" * 16
KEY = "topics/t.json"


def restarted(root: Path) -> LocalStore:
    return LocalStore(root, boot_id=NEXT_BOOT)


def lose_page_cache(root: Path, on_disk: bytes = b"v1") -> None:
    """What a machine's crash may leave: the object as it was at its last
    classic (fsynced) write."""
    (root / KEY).write_bytes(on_disk)


async def busy_key(store: LocalStore) -> str:
    """KEY written, then rewritten once the classic way: v1, durable on the
    disk. Its next rewrite within JOURNAL_AFTER makes its journal."""
    await store.put(KEY, b"v0")
    return await rewrite(store, b"v1")


async def rewrite(store: LocalStore, *versions: bytes) -> str:
    """Each version written over the last with If-Match; the last ETag."""
    _, etag = await store.get(KEY)
    for data in versions:
        etag = await store.put_if(KEY, data, if_match=etag)
    return etag


async def test_a_rewrite_is_made_durable_by_one_fdatasync_of_its_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No fsync of the temp file nor of the directory: under the lock the
    record is appended and fdatasynced, then the temp file is renamed, so that
    a version is in place (seen by readers) only once a record holds it (the
    record came after the rename until the review of localfs, round 25)."""
    store = LocalStore(tmp_path, boot_id=BOOT)
    await store.put(KEY, b"v0")
    events = record_disk_events(monkeypatch)
    await rewrite(store, b"v1")
    # One rewrite is no busy key: the classic way, the temp file fsynced
    # before the lock.
    assert events == ["fsync file", "lock", "rename t.json", "unlock", "fsync dir"]
    assert not journal_path(tmp_path / KEY).exists()
    events.clear()
    await rewrite(store, b"v1.5")  # makes the journal, holding its record
    assert events == NEW_JOURNAL_WRITE
    assert journal_path(tmp_path / KEY).stat().st_size == JOURNAL_FIRST_SIZE
    events.clear()
    await rewrite(store, b"v2")
    assert events == ["lock", "fdatasync", "rename t.json", "unlock"]
    monkeypatch.undo()
    assert (await store.get(KEY))[0] == b"v2"
    assert await store.list() == [KEY], "the journal is no key"
    await store.close()


async def test_after_a_restart_the_journal_brings_back_what_the_page_cache_lost(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)
    etag = await rewrite(store, b"v2", b"v3")
    await store.close()
    lose_page_cache(tmp_path)

    after = restarted(tmp_path)
    assert await after.get(KEY) == (b"v3", etag)
    # v4 durable the classic way (the restart's first rewrite); v5 journaled again.
    await rewrite(after, b"v4", b"v5")
    await after.close()
    lose_page_cache(tmp_path, b"v4")
    assert (await LocalStore(tmp_path, boot_id=b"\x03" * 16).get(KEY))[0] == b"v5"


async def test_a_writer_after_a_restart_compares_with_what_the_journal_brought_back(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)
    etag = await rewrite(store, b"v2")
    await store.close()
    lose_page_cache(tmp_path)

    after = restarted(tmp_path)
    with pytest.raises(PreconditionFailed):
        await after.put_if(KEY, b"from v1", if_match=content_etag(b"v1"))
    await after.put_if(KEY, b"v3", if_match=etag)
    assert (await after.get(KEY))[0] == b"v3"
    await after.close()


async def test_a_record_torn_by_the_crash_was_never_acknowledged(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)
    await rewrite(store, b"v2", b"v3")
    await store.close()
    journal = journal_path(tmp_path / KEY)
    blob = bytearray(journal.read_bytes())
    last = bytes(blob).rindex(b"v3")
    blob[last] ^= 0xFF  # v3's record, half on the disk
    journal.write_bytes(bytes(blob))
    lose_page_cache(tmp_path)

    assert (await restarted(tmp_path).get(KEY))[0] == b"v2"


async def test_a_classic_write_over_a_journaled_object_drops_its_journal(
    tmp_path: Path,
) -> None:
    """Else a restart would bring back the journal's last record over a newer
    object written without it."""
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)
    await rewrite(store, b"v2")
    await store.put(KEY, b"unconditional")
    assert not journal_path(tmp_path / KEY).exists()
    await store.close()

    assert (await restarted(tmp_path).get(KEY))[0] == b"unconditional"


async def test_a_full_journal_is_replaced_by_one_holding_the_write(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, boot_id=BOOT)
    await store.put(KEY, b"v0")
    # The 1st is written the classic way, the 2nd makes the journal and the
    # 2nd to 7th are its records; the 8th does not fit, and a new journal
    # holding it replaces the full one; the 9th to 13th are its records.
    big = [bytes([n]) * 40_000 for n in range(1, 14)]
    inode = None
    for n, data in enumerate(big):
        await rewrite(store, data)
        if n == 1:
            inode = journal_path(tmp_path / KEY).stat().st_ino
    assert journal_path(tmp_path / KEY).stat().st_ino != inode
    await store.close()
    lose_page_cache(tmp_path, big[0])

    assert (await restarted(tmp_path).get(KEY))[0] == big[-1]


async def test_a_full_journals_successor_is_written_before_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing and fsyncing a new 256 KiB journal under the key's lock kept
    every writer of its lock stripe waiting that long (review of localfs,
    round 25): a write that foresees a full journal makes the next one
    before it takes the lock, and under it only renames it, durably."""
    store = LocalStore(tmp_path, boot_id=BOOT)
    await store.put(KEY, b"v0")
    for n in range(1, 8):  # the 2nd makes the journal, the 3rd to 7th fill it
        await rewrite(store, bytes([n]) * 40_000)
    events = record_disk_events(monkeypatch)
    await rewrite(store, bytes([8]) * 40_000)
    assert events == NEW_JOURNAL_WRITE
    monkeypatch.undo()
    await store.close()
    lose_page_cache(tmp_path)
    assert (await restarted(tmp_path).get(KEY))[0] == bytes([8]) * 40_000


async def test_an_object_too_big_for_the_journal_is_written_the_classic_way(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path, boot_id=BOOT)
    await store.put(KEY, b"v0")
    await rewrite(store, b"v1", b"x" * JOURNAL_SIZE)
    await store.close()

    assert (await restarted(tmp_path).get(KEY))[0] == b"x" * JOURNAL_SIZE


async def test_a_deleted_object_stays_deleted_after_a_restart(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)
    await rewrite(store, b"v2")
    assert journal_path(tmp_path / KEY).exists()
    await store.delete(KEY)
    assert not journal_path(tmp_path / KEY).exists()
    await store.close()

    with pytest.raises(ObjectNotFound):
        await restarted(tmp_path).get(KEY)


async def test_two_handles_taking_turns_append_after_each_other(tmp_path: Path) -> None:
    """A handle trusts where it left the journal only while the object is the
    file it wrote; after another's write it reads the journal again."""
    first, second = LocalStore(tmp_path, boot_id=BOOT), LocalStore(tmp_path, boot_id=BOOT)
    await first.put(KEY, b"v0")
    versions = [f"v{n}".encode() * (9 - n) for n in range(1, 9)]  # of different lengths
    for n, data in enumerate(versions):
        await rewrite(second if n % 2 else first, data)
    await first.close()
    await second.close()
    lose_page_cache(tmp_path, versions[1])  # the journal is made by the 3rd

    assert (await restarted(tmp_path).get(KEY))[0] == versions[-1]


async def test_a_torn_header_is_a_start_over_that_found_the_object_durable(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)
    await rewrite(store, b"v2")
    await store.close()
    journal = journal_path(tmp_path / KEY)
    blob = bytearray(journal.read_bytes())
    blob[9] ^= 0xFF
    journal.write_bytes(bytes(blob))

    after = LocalStore(tmp_path, boot_id=BOOT)
    assert (await after.get(KEY))[0] == b"v2"
    assert not journal.exists(), "a journal whose header is torn is dropped"
    await rewrite(after, b"v3", b"v4")  # v3 the classic way, v4 journaled
    await after.close()
    lose_page_cache(tmp_path, b"v3")
    assert (await restarted(tmp_path).get(KEY))[0] == b"v4"


async def test_a_failed_append_falls_back_to_the_classic_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object is in place, whether its record reached the disk unknown:
    the write is made durable the classic way and the journal dropped, so
    that no record of it, nor an older one, can be brought back over it."""
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)
    etag = await rewrite(store, b"v2")

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    synced: set[int] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.add(os.fstat(fd).st_ino)

    monkeypatch.setattr(localfs.os, "fdatasync", failing)
    monkeypatch.setattr(localfs.os, "fsync", fsync)
    etag = await store.put_if(KEY, b"v3", if_match=etag)
    monkeypatch.undo()
    assert (tmp_path / KEY).stat().st_ino in synced, "v3's bytes, the classic way"
    assert not journal_path(tmp_path / KEY).exists()
    await rewrite(store, b"v4", b"v5")  # v4 the classic way; v5 makes a new journal
    assert journal_path(tmp_path / KEY).exists()
    await store.close()
    lose_page_cache(tmp_path, b"v4")
    assert (await restarted(tmp_path).get(KEY))[0] == b"v5"
    assert [n for n in os.listdir(tmp_path / "topics") if n.endswith(".tmp")] == []


async def test_a_journal_and_disk_failing_is_an_ambiguous_write_not_storage_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """StorageFull promises that nothing was written. The record's fdatasync
    failed, so whether it reached the disk is unknown, and the journal (which
    a restart would read) could not be dropped: the write may land."""
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)
    etag = await rewrite(store, b"v2")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(localfs.os, "fdatasync", full)
    monkeypatch.setattr(localfs.os, "fsync", full)
    with pytest.raises(AmbiguousWrite, match="may bring the write back"):
        await store.put_if(KEY, b"v3", if_match=etag)
    monkeypatch.undo()
    assert (await store.get(KEY))[0] == b"v2", "not renamed: no record is known to hold it"
    await store.close()


async def test_a_write_never_appends_to_a_journal_unlinked_under_it(tmp_path: Path) -> None:
    """A journal removed while this store knows where it ends (an operator,
    another process's recovery) is not written to: that would acknowledge
    records no restart can find."""
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)
    await rewrite(store, b"v2")
    journal_path(tmp_path / KEY).unlink()
    await rewrite(store, b"v3", b"v4")
    await store.close()
    assert journal_path(tmp_path / KEY).exists()
    lose_page_cache(tmp_path, b"v3")
    assert (await restarted(tmp_path).get(KEY))[0] == b"v4"


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_busy_keys_journal_stays_open_and_what_is_held_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy key's next write appends to the journal it holds open, without
    opening it again; however many keys are busy, the store holds at most
    `held_descriptors` (the broker leaves room for them under its descriptor
    limit), and none once closed."""
    monkeypatch.setattr(localfs._WrittenFiles, "LIMIT", 8)
    monkeypatch.setattr(localfs._Places, "LIMIT", 8)
    before = open_descriptors()
    store = LocalStore(tmp_path, boot_id=BOOT)
    assert store.held_descriptors == 16
    for n in range(20):
        key = f"topics/t{n}.json"
        etag = await store.put(key, b"v0")
        for v in (b"v1", b"v2", b"v3"):  # v2 makes the journal, v3 appends
            etag = await store.put_if(key, v, if_match=etag)
        assert journal_path(tmp_path / key).exists()
    assert open_descriptors() - before == 16

    opened: list[str] = []
    real_open = os.open

    def spy(path: str | Path, *args: int) -> int:
        opened.append(Path(path).name)
        return real_open(path, *args)

    monkeypatch.setattr(localfs.os, "open", spy)
    await store.put_if("topics/t19.json", b"v4", if_match=etag)
    assert not [name for name in opened if name.endswith(".journal")], opened
    monkeypatch.setattr(localfs.os, "open", real_open)
    await store.close()
    assert open_descriptors() == before
    restarted_store = restarted(tmp_path)
    for n in (0, 19):
        (tmp_path / f"topics/t{n}.json").write_bytes(b"v1")  # the page cache lost
    assert (await restarted_store.get("topics/t0.json"))[0] == b"v3"
    assert (await restarted_store.get("topics/t19.json"))[0] == b"v4"
    await restarted_store.close()


# --- found by an adversarial review of da81be1 (journals held open) ------------------


async def test_a_held_journal_written_over_in_place_is_not_appended_to(tmp_path: Path) -> None:
    """Same inode, other header (a failing disk, an operator's cp): a restart
    finds no record in it, so a write appended there would be lost."""
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)
    etag = await rewrite(store, b"v2")  # the journal made, and held
    with journal_path(tmp_path / KEY).open("r+b") as f:
        f.seek(9)  # in the generation
        byte = f.read(1)[0]
        f.seek(9)
        f.write(bytes([byte ^ 0xFF]))
    await store.put_if(KEY, b"v3", if_match=etag)  # acknowledged
    await store.close()
    # The journal, found torn, was dropped and v3 written the classic way:
    # durable by its own fsyncs, with no record for a restart to bring back
    # over it.
    assert not journal_path(tmp_path / KEY).exists()
    assert (await restarted(tmp_path).get(KEY))[0] == b"v3"


async def test_a_held_journal_is_closed_whatever_befalls_the_write(tmp_path: Path) -> None:
    """Its name made unstattable (a symlink loop): the write fails, and the
    descriptor it took out goes with it."""
    before = open_descriptors()
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)
    etag = await rewrite(store, b"v2")
    jpath = journal_path(tmp_path / KEY)
    jpath.unlink()
    jpath.symlink_to(jpath.name)
    with pytest.raises(StoreUnavailable):
        await store.put_if(KEY, b"v3", if_match=etag)
    await store.close()
    assert open_descriptors() == before


async def test_a_write_finishing_after_close_keeps_nothing_open(tmp_path: Path) -> None:
    """A broker closes its store while a write's thread may still run (its
    farewell timed out): that write's journal and file are closed, not kept."""
    before = open_descriptors()
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)
    etag = await rewrite(store, b"v2")
    entered, release = threading.Event(), threading.Event()
    real = os.fdatasync

    def held_fdatasync(fd: int) -> None:
        entered.set()
        release.wait(10)
        real(fd)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(localfs.os, "fdatasync", held_fdatasync)
        write = asyncio.create_task(store.put_if(KEY, b"v3", if_match=etag))
        assert await asyncio.to_thread(entered.wait, 10)
        await store.close()
        release.set()
        await write
    assert open_descriptors() == before


# --- found by an adversarial review of 72fe53e: a crash at one instruction ---------


class Killed(BaseException):
    """The process dies here (nothing after runs)."""


def test_a_journals_first_write_cannot_lose_the_object_it_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal's first write renames its temp file, NOT fsynced, over the
    object (the acknowledged v1's only durable copy). Should the machine
    crash then, the disk may hold the rename but not the temp file's bytes
    (XFS: a zero-length file; ext4 with noauto_da_alloc or data=writeback
    the same): a restart must read v1 or v2, never bytes that were never
    written. Its record is durable first, in the new journal that holds it
    (which the rename of the object cannot overtake), so v2 comes back."""
    store = LocalStore(tmp_path, boot_id=BOOT)
    store._put_sync(KEY, b"v0", None, False, False)
    v1 = store._put_sync(KEY, b"v1", content_etag(b"v0"), False, True)  # classic, acked

    synced: set[int] = set()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.add(os.fstat(fd).st_ino)

    def replace(src: str | Path, dst: str | Path) -> None:
        real_replace(src, dst)
        if Path(dst) == tmp_path / KEY:
            raise Killed

    monkeypatch.setattr(localfs.os, "fsync", fsync)
    monkeypatch.setattr(localfs.os, "replace", replace)
    with pytest.raises(Killed):
        store._put_sync(KEY, b"v2", v1, False, True)  # busy: makes the journal
    monkeypatch.undo()
    jpath = journal_path(tmp_path / KEY)
    assert jpath.stat().st_ino in synced, "the record, durable before the rename"
    # The crash: the rename reached the disk, the renamed file's bytes only
    # if they were fsynced.
    if (tmp_path / KEY).stat().st_ino not in synced:
        (tmp_path / KEY).write_bytes(b"")

    after = LocalStore(tmp_path, boot_id=NEXT_BOOT)
    data, _ = after._read(KEY)
    assert data in (b"v1", b"v2"), f"acknowledged v1 lost; read {data!r}, never written"


def test_a_new_journal_reusing_an_inode_number_is_not_taken_for_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store A (one broker) knows where it left the journal. Store B (another
    broker on the host) drops it for a classic write whose rename then fails,
    then makes a new journal holding its own record and dies before its
    rename: the object is still A's file, so A trusts its place if the new
    journal has the old one's inode number (ext4 hands a freed number out
    again at once). A appends its record, stamped with the old journal's
    generation, where no scan of the new one finds it, and acknowledges.
    After a crash the record is not found."""
    a = LocalStore(tmp_path, boot_id=BOOT)
    b = LocalStore(tmp_path, boot_id=BOOT)
    a._put_sync(KEY, b"v0", None, False, False)
    etag = content_etag(b"v0")
    for v in (b"v1", b"v2", b"v3"):  # v1 classic; v2 makes the journal; v3 a record
        etag = a._put_sync(KEY, v, etag, False, True)
    jpath = journal_path(tmp_path / KEY)
    old_inode = jpath.stat().st_ino

    # B: a classic write (unconditional put) whose rename fails after the drop.
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == tmp_path / KEY:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(localfs.os, "replace", replace)
    with pytest.raises(OSError):
        b._put_sync(KEY, b"B's", None, False, False)
    assert not jpath.exists()
    # B again, the key busy in its eyes: its new journal is in place, with
    # B's record, when B dies before its rename.

    def killed(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == tmp_path / KEY:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(localfs.os, "replace", killed)
    b._rewritten[tmp_path / KEY] = time.monotonic()
    with pytest.raises(Killed):
        b._put_sync(KEY, b"B's", etag, False, True)
    monkeypatch.undo()
    assert jpath.exists()
    # A holds the old journal open, so its inode number cannot be handed out
    # again (while journals were closed between writes it could: ext4 does at once).
    assert jpath.stat().st_ino != old_inode

    v4 = a._put_sync(KEY, b"v4", etag, False, True)  # acknowledged
    assert content_etag(b"v4") == v4
    # The crash: the object as its last durable version (v3, fsynced by B's drop).
    (tmp_path / KEY).write_bytes(b"v3")
    data, _ = LocalStore(tmp_path, boot_id=NEXT_BOOT)._read(KEY)
    assert data == b"v4", f"acknowledged v4 rolled back to {data!r}"


def test_a_delete_after_a_restart_recovers_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a crash lost the page cache, a delete is the first to touch the
    key. _delete_sync never recovers: _drop_journal fsyncs the stale object
    as it is and unlinks the journal (its only copy of the acknowledged v3),
    durably. Killed before the object's unlink (or the unlink fails), the
    delete is unanswered, yet the key now holds v1: acknowledged v2 and v3
    are rolled back for good."""
    store = LocalStore(tmp_path, boot_id=BOOT)
    store._put_sync(KEY, b"v0", None, False, False)
    etag = content_etag(b"v0")
    for v in (b"v1", b"v2", b"v3"):
        etag = store._put_sync(KEY, v, etag, False, True)
    (tmp_path / KEY).write_bytes(b"v1")  # the crash lost the renames

    after = LocalStore(tmp_path, boot_id=NEXT_BOOT)
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == tmp_path / KEY:
            raise Killed
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(Killed):
        after._delete_sync(KEY)
    monkeypatch.undo()
    data, _ = LocalStore(tmp_path, boot_id=b"\x03" * 16)._read(KEY)
    assert data in (b"v3",), f"neither deleted nor v3: {data!r}"


async def test_a_busy_key_on_a_disk_too_full_for_a_journal_is_written_the_classic_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)

    def no_room(self: LocalStore, jpath: Path, first: bytes, previous: int = 0) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalStore, "_prepare_journal", no_room)
    await rewrite(store, b"v2")
    monkeypatch.undo()
    assert not journal_path(tmp_path / KEY).exists()
    assert (await store.get(KEY))[0] == b"v2"
    await store.close()


# --- found by the review of localfs, round 25 ----------------------------------------

# A broker process SIGKILLed (the OOM killer, systemd's stop timeout) just
# after the rename of a journaled head write, before it is answered.
_KILLED_AFTER_THE_RENAME = """
import os, signal, sys
from simplequeue.objstore import content_etag
from simplequeue.objstore.localfs import LocalStore
store = LocalStore(sys.argv[1], boot_id=b"\\x01" * 16)
key = "topics/t.json"
store._put_sync(key, b"v0", None, False, False)
etag = content_etag(b"v0")
for v in (b"v1", b"v2", b"v3"):  # v1 classic; v2 makes the journal; v3 a record
    etag = store._put_sync(key, v, etag, False, True)
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if str(dst).endswith(key):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
store._put_sync(key, b"v4", etag, False, True)  # renamed, then killed
"""


def test_a_version_readers_were_served_survives_a_clean_restart(tmp_path: Path) -> None:
    """The temp file was renamed over the key before its record was
    appended: a writer killed between the two left v4 in place with no
    record. Every reader was served v4 and could answer on it (a retried
    enqueue answered "duplicate"), yet the first touch after the next
    restart, even a clean one that lost nothing, took the key back to the
    last record, v3 (review of localfs, round 25). The record is now durable
    before the rename: a version is seen only once a record holds it."""
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_THE_RENAME, str(tmp_path)],
        cwd=Path(__file__).parent.parent,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL
    served, _ = LocalStore(tmp_path, boot_id=BOOT)._read(KEY)
    assert served == b"v4"
    os.sync()  # a clean reboot: every byte reached the disk
    data, _ = restarted(tmp_path)._read(KEY)
    assert data == b"v4", f"a restart rolled {served!r}, served to readers, back to {data!r}"


async def test_the_sweep_drops_the_journal_of_a_key_gone_idle(tmp_path: Path) -> None:
    """A key rewritten twice within JOURNAL_AFTER gets a journal (then of
    256 KiB), and only a classic write or a delete dropped it: an idle key (a
    topic busy for a second once, an enqueue then a claim) kept it for ever
    beside a head of a few hundred bytes, 25 GiB for 100,000 topics (review
    of localfs, round 25). The leftover sweep drops one idle for
    `older_than`, the object made durable first, so a restart has nothing to
    bring back."""
    store = LocalStore(tmp_path, boot_id=BOOT)
    etag = await busy_key(store)
    for v in (b"v2", b"v3"):
        etag = await store.put_if(KEY, v, if_match=etag)
    jpath = journal_path(tmp_path / KEY)
    assert jpath.stat().st_size >= JOURNAL_FIRST_SIZE
    await store.sweep_leftovers(older_than=3600)
    assert jpath.exists(), "a journal written to just now is kept"
    os.utime(jpath, (1, 1))  # idle for decades
    assert await store.sweep_leftovers(older_than=3600) == 1
    assert not jpath.exists(), "an idle key's journal is never reclaimed"
    await rewrite(store, b"v4")  # still written, with If-Match, after it
    await store.close()
    assert (await restarted(tmp_path).get(KEY))[0] == b"v4"


async def test_the_sweep_recovers_an_idle_journal_from_an_earlier_boot_first(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)
    await rewrite(store, b"v2", b"v3")
    await store.close()
    lose_page_cache(tmp_path)
    jpath = journal_path(tmp_path / KEY)
    os.utime(jpath, (1, 1))

    after = restarted(tmp_path)
    assert await after.sweep_leftovers(older_than=3600) == 1
    assert not jpath.exists()
    assert (await after.get(KEY))[0] == b"v3", "the journal's last record, written back"
    await after.close()


async def test_the_sweep_leaves_the_journal_of_a_key_being_written(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, boot_id=BOOT)
    await busy_key(store)
    await rewrite(store, b"v2")
    jpath = journal_path(tmp_path / KEY)
    os.utime(jpath, (1, 1))
    writer = LocalStore(tmp_path, boot_id=BOOT)
    held = writer._lock(KEY)
    assert await store.sweep_leftovers(older_than=3600) == 0
    assert jpath.exists()
    writer._unlock(held)
    await writer.close()
    await store.close()


async def test_topics_that_ran_one_job_each_keep_no_quarter_mb_journal_beside_their_heads(
    tmp_path: Path,
) -> None:
    """A topic's enqueue, claim and ack (If-Match rewrites within a second)
    make its head busy: it got a journal of JOURNAL_SIZE (256 KiB, written
    whole and fsynced), kept until a sweep found it idle for an hour. 200
    such topics held 52.4 MB of journals beside 151 KB of heads (347x);
    100,000 topics (SPEC 4.1's figure) touched within the hour, 26 GB
    (review of the stores). A key's first journal is now small."""
    from simplequeue.api import JobSpec
    from simplequeue.broker.engine import Engine
    from simplequeue.groupcommit import CommitSettings, GroupCommitter

    store = LocalStore(tmp_path)
    q = Engine(GroupCommitter(store, broker_id="b1", epoch=1, settings=CommitSettings()))
    topics = 20
    try:
        for i in range(topics):
            await q.enqueue(f"t{i}", [JobSpec(i)])
            job = (await q.claim(f"t{i}", "w", lease=30))[0]
            await q.ack(f"t{i}", job["id"], job["lease_token"])
    finally:
        await store.close()
    files = list((tmp_path / "topics").iterdir())
    heads = sum(f.stat().st_size for f in files if f.name.endswith(".json") and f.name[0] != ".")
    journals = [f.stat().st_size for f in files if f.name.endswith(".journal")]
    assert len(journals) == topics, "each head was journaled (its ack a busy key's rewrite)"
    assert sum(journals) <= 16 * 1024 * topics, (
        f"{topics} topics of one job each: heads {heads:,} bytes, journals {sum(journals):,} bytes"
    )


async def test_a_hot_keys_journal_doubles_at_each_replacement_up_to_journal_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy key's first journal is small; each successor, foreseen and
    made before the lock, is twice the last, so that a hot head reaches a
    journal of JOURNAL_SIZE within a few hundred rewrites, each rewrite one
    record and one fdatasync but for those that make a journal. After a
    restart that lost the page cache, the last acknowledged write is there."""
    store = LocalStore(tmp_path, boot_id=BOOT)
    etag = await busy_key(store)
    jpath = journal_path(tmp_path / KEY)
    sizes: list[int] = []
    inode = None
    events = record_disk_events(monkeypatch)
    n = 0
    while not sizes or sizes[-1] < JOURNAL_SIZE:
        n += 1
        events.clear()
        etag = await store.put_if(KEY, b"%06d" % n * 316, if_match=etag)  # 1,896 bytes
        st = jpath.stat()
        if st.st_ino != inode:
            inode = st.st_ino
            sizes.append(st.st_size)
            assert events == NEW_JOURNAL_WRITE, f"rewrite {n} made a journal"
        else:
            assert events == ["lock", "fdatasync", "rename t.json", "unlock"], f"rewrite {n}"
    monkeypatch.undo()
    assert sizes == [JOURNAL_FIRST_SIZE << i for i in range(5)] and sizes[-1] == JOURNAL_SIZE
    assert n <= 130, f"{n} rewrites to reach a journal of JOURNAL_SIZE"
    await store.close()
    lose_page_cache(tmp_path)
    assert (await restarted(tmp_path).get(KEY))[0] == b"%06d" % n * 316
