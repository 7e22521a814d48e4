"""localfs beyond the contract: several OS processes on one directory, and crashes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from threading import Event
from typing import Any

import pytest

from simplequeue.errors import ObjectNotFound, PreconditionFailed
from simplequeue.objstore import clock as clock_module
from simplequeue.objstore import content_etag, localfs, store_from_url
from simplequeue.objstore.localfs import LocalStore, journal_path
from simplequeue.objstore.memfs import MemStore
from tests.helpers.crash_writer import check
from tests.helpers.fs_events import record_disk_events, record_folder_reads
from tests.helpers.until import until
from tests.reliability.test_power_loss import ShadowDisk

HELPERS = Path(__file__).parent / "helpers"
ROOT = Path(__file__).parent.parent


def spawn(script: str, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HELPERS / script), *args],
        cwd=ROOT,
        stdin=stdin,
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_processes_doing_cas_increments_lose_no_update(tmp_path: Path) -> None:
    procs, per_process = 4, 60
    children = [spawn("cas_counter.py", str(tmp_path), str(per_process)) for _ in range(procs)]
    try:
        codes = [await asyncio.to_thread(p.wait, 60) for p in children]
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0] * procs
    data, _ = await LocalStore(tmp_path).get("counter")
    assert int(data) == procs * per_process


async def test_sigkill_mid_write_leaves_a_whole_object_whose_etag_matches(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    last_seen = -1
    for _round in range(6):
        writer = spawn("crash_writer.py", str(tmp_path))
        try:
            assert writer.stdout is not None
            # Let a few writes land (each prints its number), then kill during the next.
            for _ in range(2 + _round):
                line = await asyncio.to_thread(writer.stdout.readline)
                assert line, "writer died before writing"
                landed = int(line)
            os.kill(writer.pid, signal.SIGKILL)
        finally:
            if writer.poll() is None:
                writer.kill()
            writer.wait()
            if writer.stdout:
                writer.stdout.close()
        data, etag = await store.get("obj")
        assert etag == content_etag(data)
        n = check(data)
        # What was acknowledged (printed) must be there; at most one more may have landed.
        assert n in (landed, landed + 1)
        assert n > last_seen
        last_seen = n
    assert await store.list() == ["obj"], "temp files must not show up as keys"


async def test_directory_with_foreign_files_lists_only_keys(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.put("topics/a.json", b"{}")
    (tmp_path / "topics" / ".a.json.123.tmp").write_bytes(b"partial")
    assert await store.list() == ["topics/a.json"]


async def test_a_stray_file_whose_name_is_no_key_is_not_listed(tmp_path: Path) -> None:
    """A file in a topic's folder whose name is no key ("seg 1.json", an
    editor's "seg-1.json~") was listed; the orphan sweep then called delete()
    on it, which raised InvalidKey, and as it sorts first, no orphan of that
    topic was deleted again (review finding)."""
    store = LocalStore(tmp_path)
    await store.put("topics/t/seg-1.json", b"x")
    await store.put("topics/t.json", b"{}")
    for stray in ("topics/t/seg 1.json", "topics/t/seg-1.json~", "topics/t b.json"):
        (tmp_path / stray).write_bytes(b"stray")
    (tmp_path / "topics" / "odd dir").mkdir()
    (tmp_path / "topics" / "odd dir" / "seg-1.json").write_bytes(b"stray")
    assert await store.list("topics/") == ["topics/t.json", "topics/t/seg-1.json"]
    assert await store.list_top("topics/") == ["topics/t.json"]
    assert await store.list_top("topics/t/") == ["topics/t/seg-1.json"]
    await store.close()


async def test_a_listing_whose_folder_cannot_be_read_fails_rather_than_lists_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """list() answered [] for a folder it could not read (EMFILE near the
    descriptor limit, EIO, EACCES), as if it were empty, where list_top()
    raised: a broker listing brokers/ then dropped every other broker from
    its view (review finding)."""
    import errno

    from simplequeue.errors import StoreRefused, StoreUnavailable

    store = LocalStore(tmp_path)
    await store.put("brokers/b1.json", b"{}")
    real = os.scandir
    failure = errno.EMFILE

    def scandir(path: Any = ".") -> Any:
        if str(path).endswith("brokers"):
            raise OSError(failure, os.strerror(failure), str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(StoreUnavailable, match="Too many open files"):
        await store.list("brokers/")
    with pytest.raises(StoreUnavailable, match="Too many open files"):
        await store.list_top("brokers/")
    failure = errno.EACCES  # until an operator acts
    with pytest.raises(StoreRefused):
        await store.list("")
    monkeypatch.undo()
    assert await store.list("nothing/") == []
    assert await store.list("brokers/b1.json/") == []  # a file, not a folder
    await store.close()


async def test_listing_one_topics_segments_reads_no_other_topics_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.walk read every folder before list() pruned it: listing one topic's
    segments read every other topic's segment folder too, so the orphan sweep
    (one listing per topic) cost topics x all segments (review finding)."""
    store = LocalStore(tmp_path)
    for t in range(3):
        await store.put(f"topics/t{t}/seg-1.json", b"x")
        await store.put(f"topics/t{t}.json", b"{}")
    await store.put("broker.json", b"{}")
    read = record_folder_reads(monkeypatch, tmp_path)
    assert await store.list("topics/t0/") == ["topics/t0/seg-1.json"]
    assert read == ["topics/t0"]
    read.clear()
    assert await store.list("topics/t1") == ["topics/t1.json", "topics/t1/seg-1.json"]
    assert read == ["topics", "topics/t1"]
    read.clear()
    assert await store.list("topics/t9/") == []
    assert await store.list("/") == await store.list("../") == []
    assert read == ["topics/t9"]
    monkeypatch.undo()
    assert await store.list() == [
        "broker.json",
        *(f"topics/t{t}{tail}" for t in range(3) for tail in (".json", "/seg-1.json")),
    ]
    await store.close()


async def test_a_key_that_would_be_a_file_and_a_folder_at_once_is_refused(
    tmp_path: Path,
) -> None:
    """localfs cannot hold "a" beside "a/b" (memfs and S3 can): such a write
    was StoreUnavailable (EISDIR, ENOTDIR), an outage the committer retries
    until its budget is spent. It is StoreRefused, saying why: it fails
    again until the other key is deleted (review finding)."""
    from simplequeue.errors import StoreRefused

    store = LocalStore(tmp_path)
    await store.put("a/b", b"x")
    await store.put("c", b"y")
    attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: store.put("a", b"v"),
        lambda: store.put_if("a", b"v", if_none_match=True),
        lambda: store.put("c/d", b"v"),
        lambda: store.put_if("c/d/e", b"v", if_none_match=True),
        lambda: store.put_if_after({"a": b"v"}, "h", b"v", if_none_match=True),
    ]
    for attempt in attempts:
        with pytest.raises(StoreRefused, match="both an object and a folder"):
            await attempt()
    assert await store.list() == ["a/b", "c"]
    assert temp_files(tmp_path) == []
    await store.close()


def cut_short(store: LocalStore, key: str) -> Path:
    """What a process killed between writing its temp file and renaming it
    leaves beside `key`: the temp file (the kernel closes its descriptor)."""
    tmp, fd, _ = store._write_temp(store.root / key, b'{"half": ')
    os.close(fd)
    return tmp


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def test_the_sweep_removes_what_writes_cut_short_left_once_it_is_old(
    tmp_path: Path,
) -> None:
    """Temp files of writes whose process died stayed for ever (they are never
    keys, so no sweep saw them). sweep_leftovers removes those untouched for
    `older_than`; a write in progress, the objects and foreign files stay."""
    store = LocalStore(tmp_path)
    await store.put_if("topics/t.json", b"{}", if_none_match=True)
    old, fresh = cut_short(store, "topics/t.json"), cut_short(store, "topics/t.json")
    journal = journal_path(tmp_path / "topics" / "t.json")
    new_journal = journal.with_name(f"{journal.name}.{uuid.uuid4().hex}.tmp")  # as _new_journal
    new_journal.write_bytes(bytes(4096))
    foreign = tmp_path / "topics" / ".t.json.123.tmp"  # not a name this store gives
    foreign.write_bytes(b"someone else's")
    for path in (old, new_journal, foreign):
        age(path, 2 * 3600)

    assert await store.sweep_leftovers(3600) == 2
    assert not old.exists() and not new_journal.exists()
    assert fresh.exists() and foreign.exists()
    assert await store.get("topics/t.json") == (b"{}", content_etag(b"{}"))
    assert await store.list() == ["topics/t.json"]


async def test_the_sweep_looks_into_the_folders_below_the_roots_in_turn_and_reaches_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every sweep read every folder of the store, every topic's, on every
    broker (test_ownership: 300 idle topics, 600 folder reads in two sweeps).
    The root's own folders (the heads, their journals and temp files) are
    looked into at every sweep; those below them (a topic's segments, and
    all below each) LEFTOVER_FOLDERS_PER_SWEEP at a time (4 here), after the
    last the previous sweep looked into, wrapping around: each leftover is
    removed within a round."""
    monkeypatch.setattr(localfs, "LEFTOVER_FOLDERS_PER_SWEEP", 4)
    store = LocalStore(tmp_path)
    objects = [f"topics/t{n}/seg-1.json" for n in range(10)] + ["a/b/c/d", "topics/t.json"]
    left = []
    for key in objects:
        await store.put(key, b"{}")
        left.append(cut_short(store, key))
    for path in left:
        age(path, 2 * 3600)
    # 11 folders below the root's: 4, 4 and the last 3 (and one again); the
    # head's leftover, in topics/, at the first.
    assert [await store.sweep_leftovers(3600) for _ in range(3)] == [5, 4, 3]
    assert not [path for path in left if path.exists()]


async def test_a_leftover_the_sweep_cannot_remove_stops_it_for_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One leftover whose removal failed (EPERM: another user's, an immutable
    file) failed the whole sweep, every time: the others were never removed."""
    store = LocalStore(tmp_path)
    await store.put("a/x", b"{}")
    await store.put("b/y", b"{}")
    stuck, other = cut_short(store, "a/x"), cut_short(store, "b/y")
    for path in (stuck, other):
        age(path, 2 * 3600)
    unlink = os.unlink

    def refusing(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path) == str(stuck):
            raise PermissionError(1, "Operation not permitted", str(path))
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refusing)
    assert await store.sweep_leftovers(3600) == 1
    assert stuck.exists() and not other.exists()


async def test_a_broker_sweeps_the_leftovers_of_writes_cut_short(
    start_broker: Callable[..., Awaitable[Any]], tmp_path: Path
) -> None:
    """Whichever process left them (a broker killed mid-write that never came
    back), a broker's periodic sweep removes them once an hour old."""
    store = LocalStore(tmp_path)
    await store.put("scratch/obj", b"{}")
    old, fresh = cut_short(store, "scratch/obj"), cut_short(store, "scratch/obj")
    age(old, 2 * 3600)
    age(fresh, 30 * 60)
    await start_broker(LocalStore(tmp_path), sweep_interval=0.05)
    await until(lambda: not old.exists())
    assert fresh.exists()


# --- what an operator does to the files, and a full disk -------------------------------


async def test_a_head_restored_in_place_is_seen_not_overwritten(tmp_path: Path) -> None:
    """`cp backup topics/t.json` keeps the inode: the ETag this store remembered
    for it must not be taken as current (it used to, until restart)."""
    import shutil

    import pytest

    from simplequeue.errors import PreconditionFailed

    store = LocalStore(tmp_path)
    first = await store.put_if("topics/t.json", b'{"v": 1}', if_none_match=True)
    (tmp_path / "backup.json").write_bytes(b'{"v": 1}')
    second = await store.put_if("topics/t.json", b'{"v": 2, "more": true}', if_match=first)
    shutil.copyfile(tmp_path / "backup.json", tmp_path / "topics" / "t.json")  # same inode
    with pytest.raises(PreconditionFailed):
        await store.put_if("topics/t.json", b'{"v": 3}', if_match=second)
    assert (await store.get("topics/t.json")) == (b'{"v": 1}', first)
    await store.put_if("topics/t.json", b'{"v": 3}', if_match=first)
    await store.close()


async def test_a_broker_serves_a_restored_head_after_one_lost_race(tmp_path: Path) -> None:
    import shutil

    from simplequeue.api import JobSpec
    from simplequeue.broker.engine import Engine
    from simplequeue.groupcommit import GroupCommitter

    q = Engine(GroupCommitter(LocalStore(tmp_path), broker_id="b"))
    await q.enqueue("t", [JobSpec(1, id="a")])
    shutil.copyfile(tmp_path / "topics" / "t.json", tmp_path / "saved.json")
    await q.enqueue("t", [JobSpec(2, id="b")])
    shutil.copyfile(tmp_path / "saved.json", tmp_path / "topics" / "t.json")
    await q.enqueue("t", [JobSpec(3, id="c")])
    assert q.committer.stats.conflicts == 1
    counts = await q.status("t")
    assert counts["pending"] == 2  # "b" went with the restore; "a" and "c" are there
    assert (await q.job("t", "c"))["payload"] == 3


async def test_a_directory_that_refuses_writes_is_answered_at_once_with_why(
    tmp_path: Path,
) -> None:
    """A head write the disk refused (EPERM, EACCES, a read-only file system)
    read as a lost race: the committer tried again for its whole budget, then
    answered Contended "lost N races". It is StoreRefused at once now, saying
    why. (chattr +i: a directory even root cannot add files to.)"""
    from simplequeue.api import JobSpec
    from simplequeue.broker.engine import Engine
    from simplequeue.errors import StoreRefused
    from simplequeue.groupcommit import CommitSettings, GroupCommitter

    q = Engine(
        GroupCommitter(LocalStore(tmp_path), broker_id="b", settings=CommitSettings(budget=5.0))
    )
    await q.enqueue("t", [JobSpec(1)])
    topics = tmp_path / "topics"
    chattr = await asyncio.to_thread(
        subprocess.run, ["chattr", "+i", str(topics)], capture_output=True
    )
    if chattr.returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and ext4 or the like)")
    try:
        with pytest.raises(StoreRefused, match="not permitted"):
            await q.enqueue("t", [JobSpec(2)])
    finally:
        await asyncio.to_thread(subprocess.run, ["chattr", "-i", str(topics)], check=True)
    assert (await q.status("t"))["pending"] == 1


async def test_a_full_disk_is_storage_full_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import pytest

    from simplequeue.errors import StorageFull
    from simplequeue.objstore import localfs

    store = LocalStore(tmp_path)
    await store.put("seed", b"x")

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(localfs.os, "write", full)
    with pytest.raises(StorageFull, match="no space left"):
        await store.put_if("topics/t.json", b"{}", if_none_match=True)
    monkeypatch.undo()
    assert await store.list("") == ["seed"]  # no temp file left behind, nothing half written
    await store.close()


# --- descriptors: what the store keeps open, under the process' limit ------------------


async def test_a_localfs_broker_under_a_small_descriptor_limit_keeps_serving_busy_topics(
    broker_process: Callable[..., Any], tmp_path: Path
) -> None:
    """localfs kept up to 512 descriptors open between writes (the 256 files it
    wrote last, 256 busy keys' journals) whatever the process' limit. Under
    `ulimit -n 256`, once some 100 topics had been busy every descriptor was
    held, every write failed EMFILE (t116..t119 answered 503), broker.json was
    no longer renewed, and nothing let one go until a restart. The store now
    keeps a quarter of the limit (64 here) at most."""
    import aiohttp

    broker = broker_process("--dir", str(tmp_path), nofile=256)
    connector = aiohttp.TCPConnector(limit=4)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:

        async def busy(n: int) -> int:
            status = 0
            for i in range(3):  # the third write within a second makes a journal
                url = f"{broker.url}/topics/t{n}/enqueue"
                async with s.post(url, json={"payload": i}) as r:
                    status = max(status, r.status)
            return status

        for start in range(0, 160, 4):
            statuses = await asyncio.gather(*(busy(n) for n in range(start, start + 4)))
            assert statuses == [201] * 4, f"topics t{start}..t{start + 3}: {statuses}"
        async with s.post(f"{broker.url}/topics/fresh/enqueue", json={"payload": "last"}) as r:
            assert r.status == 201, await r.text()
    broker.stop()
    assert "Too many open files" not in broker.log()


async def test_what_localfs_keeps_open_is_sized_to_the_descriptor_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An eighth of the soft limit for each of the files written last and the
    busy keys' journals, 256 each at most: the broker's connection cap
    (default_max_connections) leaves room for `held_descriptors`."""
    import resource

    from simplequeue.broker.listener import (
        HEADROOM,
        MAX_CONNECTIONS,
        MIN_CONNECTIONS,
        default_max_connections,
    )

    for soft, held in ((256, 64), (1024, 256), (65536, 512), (16, 8)):
        monkeypatch.setattr(resource, "getrlimit", lambda _, soft=soft: (soft, soft))
        store = LocalStore(tmp_path)
        assert store.held_descriptors == held, soft
        cap = default_max_connections(store.held_descriptors)
        assert cap == max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, soft - HEADROOM - held))


async def test_a_store_out_of_descriptors_lets_go_of_half_it_keeps_and_writes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors (connections took the rest), a write failed
    StoreUnavailable and the store let none of the files it keeps go: every
    write failed so until a restart. Now the older half of them goes and the
    write is made once more."""
    import errno

    monkeypatch.setattr(localfs._WrittenFiles, "LIMIT", 8)
    monkeypatch.setattr(localfs._Places, "LIMIT", 8)
    store = LocalStore(tmp_path)
    etags = {}
    for n in range(10):  # busy keys: their heads and their journals kept open
        key = f"topics/t{n}.json"
        etags[key] = await store.put(key, b"v0")
        for v in (b"v1", b"v2"):
            etags[key] = await store.put_if(key, v, if_match=etags[key])
    ceiling = len(os.listdir("/proc/self/fd"))  # every descriptor in use: the next fails
    real_open = os.open

    def short_of_descriptors(path: Any, *args: Any, **kwargs: Any) -> int:
        if len(os.listdir("/proc/self/fd")) >= ceiling:
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(localfs.os, "open", short_of_descriptors)
    for key in etags:
        await store.put_if(key, b"v3", if_match=etags[key])
    etags["topics/new.json"] = await store.put("topics/new.json", b"v3")
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) < ceiling
    assert [(await store.get(key))[0] for key in etags] == [b"v3"] * len(etags)
    await store.close()


async def test_a_new_directory_is_made_durable_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(LocalStore, "_fsync_dir", staticmethod(synced.append))
    store = LocalStore(tmp_path)
    await store.put_if("topics/t/seg-p0-x.json", b"{}", if_none_match=True)
    # The root's entry is fsynced in its parent (once per store, whoever made
    # it); topics/ and topics/t/ were created: each entry is fsynced in its
    # parent, then the file's own entry in topics/t/.
    assert synced == [tmp_path.parent, tmp_path, tmp_path / "topics", tmp_path / "topics" / "t"]
    await store.close()


async def test_a_folder_found_made_is_made_durable_once_per_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process made topics/t/ (and may not have fsynced its entry
    yet): a store's first write into it fsyncs each folder's entry once,
    and its writes after that cost what they did (the file's entry only)."""
    await LocalStore(tmp_path).put("topics/t/seg-0.json", b"{}")
    synced: list[Path] = []
    monkeypatch.setattr(LocalStore, "_fsync_dir", staticmethod(synced.append))
    store = LocalStore(tmp_path)
    await store.put_if("topics/t/seg-1.json", b"{}", if_none_match=True)
    topics = tmp_path / "topics"
    assert synced == [tmp_path.parent, tmp_path, topics, topics / "t"]
    synced.clear()
    await store.put_if("topics/t/seg-2.json", b"{}", if_none_match=True)
    await store.put_if("topics/u/seg-1.json", b"{}", if_none_match=True)
    assert synced == [topics / "t", topics, topics / "u"]  # topics/u/ made: its entry
    await store.close()


class _NothingCommittedByTheKernel(random.Random):
    """ShadowDisk's draw for each directory: always "as of its last fsync"."""

    def random(self) -> float:
        return 0.99


def shadow_disk(disk: Path, monkeypatch: pytest.MonkeyPatch) -> ShadowDisk:
    """A ShadowDisk of `disk` (everything on it now durable), fed from now on
    by every fsync and fdatasync a LocalStore makes."""
    shadow = ShadowDisk(disk)
    shadow.seed()
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        shadow.synced(fd)

    def fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        shadow.synced(fd)

    monkeypatch.setattr(localfs.os, "fsync", fsync)
    monkeypatch.setattr(localfs.os, "fdatasync", fdatasync)
    return shadow


def after_power_cut(shadow: ShadowDisk, into: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The disk at `into` as a power cut now leaves it: each file as of its
    last sync, each directory as of its last fsync (the worst case)."""
    shadow.image(into, _NothingCommittedByTheKernel())
    monkeypatch.undo()
    return into


@pytest.mark.parametrize("first", ["sample_clock", "cli_make_dir"])
async def test_an_acknowledged_write_survives_a_power_cut_after_the_store_made_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """The store's own directory (and a folder above it, missing too) was
    made without its entry in its parent ever being fsynced: by the store's
    first call that needs its lock folder (sample_clock() here, as in a
    broker's start), or by simplequeued's make_dir. Every object under it,
    acknowledged as durable, hung on entries that a power cut may lose: an
    answered create was gone after one, and the directory with it (review,
    round 27). Each folder made is now fsynced in its parent, and the root's
    parent once more by the store, whoever made the root."""
    disk = tmp_path / "disk"
    disk.mkdir()
    shadow = shadow_disk(disk, monkeypatch)
    root = disk / "var" / "data"
    store = LocalStore(root)
    if first == "sample_clock":
        await store.sample_clock()
    else:
        from simplequeue.broker.cli import make_dir

        make_dir(root)
    await store.put_if("topics/t.json", b'{"jobs": 1}', if_none_match=True)  # answered: durable
    await store.close()

    rebooted = after_power_cut(shadow, tmp_path / "rebooted", monkeypatch)
    after = LocalStore(rebooted / "var" / "data", boot_id=b"\x01" * 16)
    assert (await after.get("topics/t.json"))[0] == b'{"jobs": 1}'
    await after.close()


def paused_at_fsync_of(store: LocalStore, directory: Path) -> tuple[Event, Event]:
    """Make `store` stop before it fsyncs `directory`: (set when it got
    there, set it to go on)."""
    at_fsync, go_on = Event(), Event()
    real_fsync_dir = LocalStore._fsync_dir

    def paused_fsync_dir(folder: Path) -> None:
        if folder == directory:
            at_fsync.set()
            go_on.wait(10)
        real_fsync_dir(folder)

    store._fsync_dir = paused_fsync_dir  # type: ignore[method-assign]
    return at_fsync, go_on


async def test_a_write_into_a_folder_another_writer_just_made_survives_a_power_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writer B makes topics/ for its first topic and is about to fsync the
    root (the folder's entry); writer A, finding topics/ there, wrote its own
    topic's head into it, fsynced topics/ and was answered. A power cut then
    lost topics/ and A's acknowledged head with it (review, round 27): a
    writer made a folder durable only when it made it, and cannot tell that
    its maker has not yet. Two topics created at once on a fresh directory
    (two brokers, or two commit threads of one), or two brokers registering
    at once under brokers/, are such writers. Each store now fsyncs a
    folder's entry before its own first write into it."""
    root = tmp_path / "disk"
    root.mkdir()
    shadow = shadow_disk(root, monkeypatch)
    a, b = LocalStore(root), LocalStore(root)
    at_fsync, go_on = paused_at_fsync_of(b, root)  # B made topics/: its entry comes next
    b_write = asyncio.ensure_future(b.put_if("topics/a.json", b"a", if_none_match=True))
    await until(at_fsync.is_set)
    await a.put_if("topics/b.json", b"b", if_none_match=True)  # answered: durable
    rebooted = after_power_cut(shadow, tmp_path / "rebooted", monkeypatch)
    go_on.set()
    await b_write  # B was never answered before the cut: it may be lost
    after = LocalStore(rebooted, boot_id=b"\x01" * 16)
    assert (await after.get("topics/b.json"))[0] == b"b"
    for store in (a, b, after):
        await store.close()


async def test_a_delete_of_a_key_another_writer_just_deleted_survives_a_power_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writer B deletes topics/t.json and is about to fsync topics/; writer A
    deletes it too, finds it gone and answered "deleted" without an fsync
    (review, round 27, untested then): a power cut brought the key back.
    A delete that finds the key gone fsyncs its folder all the same."""
    root = tmp_path / "disk"
    a, b = LocalStore(root), LocalStore(root)
    await a.put("topics/t.json", b"t")
    shadow = shadow_disk(root, monkeypatch)
    at_fsync, go_on = paused_at_fsync_of(b, root / "topics")  # B unlinked: its fsync comes next
    b_delete = asyncio.ensure_future(b.delete("topics/t.json"))
    await until(at_fsync.is_set)
    await a.delete("topics/t.json")  # answered: durable
    rebooted = after_power_cut(shadow, tmp_path / "rebooted", monkeypatch)
    go_on.set()
    await b_delete
    after = LocalStore(rebooted, boot_id=b"\x01" * 16)
    with pytest.raises(ObjectNotFound):
        await after.get("topics/t.json")
    for store in (a, b, after):
        await store.close()


# --- a broker paused while it holds a lock (SPEC 4.3) -----------------------------------


def temp_files(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


@contextlib.asynccontextmanager
async def paused_holder(root: Path, key: str) -> AsyncIterator[None]:
    """Another process holding the lock stripe of `key` in the store at `root`,
    paused (SIGSTOP) while it does; killed (its lock let go) on leaving."""
    holder = spawn("hold_lock.py", str(root), key)
    try:
        assert holder.stdout is not None
        assert await asyncio.wait_for(asyncio.to_thread(holder.stdout.readline), 30) == "locked\n"
        _, status = await asyncio.to_thread(os.waitpid, holder.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        yield
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        if holder.stdout:
            holder.stdout.close()


async def test_a_lock_held_by_a_stopped_process_is_store_unavailable_within_the_timeout(
    tmp_path: Path,
) -> None:
    from simplequeue.errors import StoreUnavailable

    key = "topics/t.json"
    store = LocalStore(tmp_path, lock_timeout=0.5)
    await store.put("topics/seed.json", b"{}")
    async with paused_holder(tmp_path, key):
        loop = asyncio.get_running_loop()
        for attempt in (
            lambda: store.put_if(key, b"{}", if_none_match=True),
            lambda: store.put(key, b"{}"),
            lambda: store.delete(key),
        ):
            started = loop.time()
            with pytest.raises(StoreUnavailable, match=r"topics/t\.json.*held.*0\.5 s"):
                await asyncio.wait_for(attempt(), 5)
            assert loop.time() - started < 2
        assert temp_files(tmp_path / "topics") == []
    # The lock died with its holder: writes go through again.
    await store.put_if(key, b"{}", if_none_match=True)
    await store.close()


async def test_keys_that_differ_only_in_case_share_a_lock(tmp_path: Path) -> None:
    """On a filesystem that ignores case (macOS's default APFS, ext4 with
    casefold), topics/Jobs.json and topics/jobs.json are one file: writers
    of the two names compared and renamed it under two different locks, so
    both could win a conditional write (round 25). They take one lock now,
    whatever the filesystem: the two topics are one queue there, its writes
    atomic."""
    from simplequeue.errors import StoreUnavailable

    store = LocalStore(tmp_path, lock_timeout=0.3)
    await store.put("topics/seed.json", b"{}")
    async with paused_holder(tmp_path, "topics/Jobs.json"):
        with pytest.raises(StoreUnavailable, match="held"):
            await asyncio.wait_for(store.put_if("topics/jobs.json", b"{}", if_none_match=True), 5)
    await store.close()


async def test_writes_waiting_for_a_paused_holders_lock_take_no_thread_from_other_calls(
    tmp_path: Path,
) -> None:
    """A writer waiting for a lock polled for it in a worker thread of the event
    loop's default executor (min(32, cores + 4) threads), which every store
    call of the process shares: with that many writes of the paused holder's
    stripe waiting, a read of another key (any other topic's write, the
    broker's registration) waited for the lock timeout too (review finding).
    A wait gives its thread back after LOCK_WAIT_IN_THREAD."""
    import hashlib

    from simplequeue.objstore.localfs import LOCK_STRIPES

    def stripe(key: str) -> int:
        digest = hashlib.blake2b(key.encode(), digest_size=4).digest()
        return int.from_bytes(digest, "big") % LOCK_STRIPES

    held = "topics/held.json"
    same = [k for k in (f"topics/s{i}.json" for i in range(100_000)) if stripe(k) == stripe(held)]
    store = LocalStore(tmp_path, lock_timeout=30)
    await store.put("topics/other.json", b"{}")
    async with paused_holder(tmp_path, held):
        writes = [
            asyncio.create_task(store.put_if(k, b"{}", if_none_match=True)) for k in same[:40]
        ]
        await asyncio.sleep(0)  # each has asked for its thread, before the read below
        assert (await asyncio.wait_for(store.get("topics/other.json"), 10))[0] == b"{}"
        assert not any(w.done() for w in writes)  # they wait for the holder still
    await asyncio.gather(*writes)  # the lock died with its holder: they land
    assert temp_files(tmp_path / "topics") == []
    await store.close()


async def test_the_temp_file_is_written_and_fsynced_before_the_lock_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The classic way (no journal): only the compare and the rename are done
    under the lock; the directory fsync comes after it is released, before
    the answer."""
    store = LocalStore(tmp_path, journal=False)
    await store.put("topics/seed.json", b"{}")
    etag = await store.put("topics/t.json", b"v1")
    events = record_disk_events(monkeypatch)
    await store.put_if("topics/t.json", b"v2", if_match=etag)
    assert events == ["fsync file", "lock", "rename t.json", "unlock", "fsync dir"]
    events.clear()
    with pytest.raises(PreconditionFailed):
        await store.put_if("topics/t.json", b"v3", if_match=etag)
    assert events == ["fsync file", "lock", "unlock"]
    assert temp_files(tmp_path / "topics") == []
    monkeypatch.undo()
    assert (await store.get("topics/t.json"))[0] == b"v2"
    await store.close()


async def test_put_if_after_makes_the_objects_durable_before_the_head_is_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each object is written and fsynced, then renamed; their directory is
    fsynced once; only then is the head written, renamed and its directory
    fsynced. A crash anywhere leaves the old head, or the new one with every
    object it names."""
    store = LocalStore(tmp_path)
    await store.put("topics/t/seed.json", b"{}")  # the directories exist
    await store.put("topics/seed.json", b"{}")
    events = record_disk_events(monkeypatch)
    objects = {"topics/t/seg-a.json": b"a", "topics/t/seg-b.json": b"b"}
    await store.put_if_after(objects, "topics/t.json", b"head", if_none_match=True)
    assert [e for e in events if e not in ("lock", "unlock")] == [
        "fsync file",
        "rename seg-a.json",
        "fsync file",
        "rename seg-b.json",
        "fsync dir",  # topics/t/, once for both
        "fsync file",
        "rename t.json",
        "fsync dir",  # topics/
    ]
    monkeypatch.undo()
    await store.close()


async def test_put_if_after_waiting_for_the_heads_lock_writes_its_objects_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each time the head's lock stayed busy LOCK_WAIT_IN_THREAD (20 ms: one
    fdatasync of another writer), the call gave its thread back and was made
    again from the start: every object written and fsynced again, then found
    in place and thrown away, up to ~30 times within the 5 s lock budget
    (review finding). The objects are a batch's segments: the big writes.
    The head's temp file is kept across the tries too (see
    test_a_write_waiting_for_a_busy_lock_writes_and_fsyncs_its_bytes_once)."""
    store = LocalStore(tmp_path)
    head = "topics/t.json"
    etag = await store.put(head, b"{}")
    await store.put("topics/t/seed.json", b"{}")  # the directories exist
    holder = LocalStore(tmp_path)
    held = holder._lock(head)  # another open file description: another holder
    written: list[str] = []
    real_write_temp = LocalStore._write_temp

    def write_temp(self: LocalStore, path: Path, data: bytes, *, sync: bool = True) -> Any:
        written.append(path.name)
        return real_write_temp(self, path, data, sync=sync)

    monkeypatch.setattr(LocalStore, "_write_temp", write_temp)
    events = record_disk_events(monkeypatch)
    tries = count_lock_tries(monkeypatch)
    objects = {"topics/t/seg-a.json": b"a" * 100_000, "topics/t/seg-b.json": b"b"}
    write = asyncio.ensure_future(store.put_if_after(objects, head, b"{1}", if_match=etag))
    await until(lambda: tries.count(head) >= 3)
    holder._unlock(held)  # the head's lock comes free after (at least) two busy tries
    await write
    assert written == ["seg-a.json", "seg-b.json", "t.json"]  # the head's too, once
    assert events.count("fsync dir") == 2  # topics/t/ once, topics/ once
    monkeypatch.undo()
    assert (await store.get("topics/t/seg-a.json"))[0] == b"a" * 100_000
    assert (await store.get(head))[0] == b"{1}"
    await store.close()
    await holder.close()


def count_lock_tries(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key of each try to take a lock from now on (each call of
    _wait_for_lock: one per try of a write that meets a busy lock)."""
    tries: list[str] = []
    real = LocalStore._wait_for_lock

    def wait_for_lock(self: LocalStore, fd: int, key: str) -> None:
        tries.append(key)
        real(self, fd, key)

    monkeypatch.setattr(LocalStore, "_wait_for_lock", wait_for_lock)
    return tries


@pytest.mark.parametrize("way", ["classic", "journaled"])
async def test_a_write_waiting_for_a_busy_lock_writes_and_fsyncs_its_bytes_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """A write that met a busy lock gave its thread back (_LockBusy) and was
    made again from the start: its temp file written and fsynced anew (or,
    journaled, the new 256 KiB journal it foresaw), every 20-200 ms for as
    long as the holder stayed (up to the 5 s lock timeout). A 1 MB put_if
    waiting 2 s on a paused holder was written and fsynced 12 times (review,
    round 27), when the disk is likely what is wrong already. Its temp file
    and journal are now kept across the tries."""
    import stat

    from simplequeue.objstore.localfs import JOURNAL_SIZE

    key = "topics/t.json"
    store = LocalStore(tmp_path, lock_timeout=30, journal=way == "journaled")
    etag = await store.put(key, b"v0")
    if way == "journaled":  # rewritten: the next rewrite, within 1 s, makes it busy
        etag = await store.put_if(key, b"v1", if_match=etag)
    data = b"x" * (1_000_000 if way == "classic" else 100_000)
    holder = LocalStore(tmp_path)
    held = holder._lock(key)  # another open file description: another holder
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(localfs.os, "fsync", fsync)
    tries = count_lock_tries(monkeypatch)
    write = asyncio.ensure_future(store.put_if(key, data, if_match=etag))
    await until(lambda: len(tries) >= 4)
    holder._unlock(held)
    await write
    monkeypatch.undo()
    if way == "classic":
        assert synced == [len(data)]
    else:  # the journal foreseen, fsynced once; the data too if the key went the classic way
        assert synced.count(JOURNAL_SIZE) == 1
        assert synced.count(len(data)) <= 1
    assert (await store.get(key))[0] == data
    assert temp_files(tmp_path / "topics") == []
    await store.close()
    await holder.close()


@pytest.mark.parametrize("end", ["cancelled", "timed out"])
async def test_a_write_given_up_while_it_waits_for_a_lock_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    """The temp file (and journal) a write keeps across its tries are
    removed, and their descriptors closed, when the write is cancelled
    between tries or its lock's deadline passes."""
    from simplequeue.errors import StoreUnavailable

    key = "topics/t.json"
    store = LocalStore(tmp_path, lock_timeout=30 if end == "cancelled" else 0.3)
    etag = await store.put(key, b"v0")
    etag = await store.put_if(key, b"v1", if_match=etag)  # busy: a journal is foreseen
    holder = LocalStore(tmp_path)
    held = holder._lock(key)
    descriptors = len(os.listdir("/proc/self/fd"))
    tries = count_lock_tries(monkeypatch)
    write = asyncio.ensure_future(store.put_if(key, b"v2", if_match=etag))
    if end == "cancelled":
        await until(lambda: len(tries) >= 2)
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
    else:
        with pytest.raises(StoreUnavailable):
            await write
    assert len(tries) >= 2  # it waited across tries
    # Cancelled, a try may still be running in its thread: it cleans up as it ends.
    await until(lambda: temp_files(tmp_path / "topics") == [])
    await until(lambda: len(os.listdir("/proc/self/fd")) == descriptors)
    holder._unlock(held)
    await store.close()
    await holder.close()


async def test_put_if_after_writes_no_head_when_an_object_fails(tmp_path: Path) -> None:
    from simplequeue.errors import StoreUnavailable

    store = LocalStore(tmp_path)
    (tmp_path / "topics" / "t" / "seg-b.json").mkdir(parents=True)  # cannot be renamed over
    with pytest.raises(StoreUnavailable):
        await store.put_if_after(
            {"topics/t/seg-a.json": b"a", "topics/t/seg-b.json": b"b"},
            "topics/t.json",
            b"head",
            if_none_match=True,
        )
    assert await store.list("topics/") == ["topics/t/seg-a.json"]  # an orphan, for the sweep
    assert temp_files(tmp_path / "topics" / "t") == []
    await store.close()


async def test_a_full_disk_after_the_rename_is_not_storage_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """StorageFull promises that nothing was written. A directory fsync that
    fails after the rename (the new object is in place, its durability
    unknown) is StoreUnavailable: the committer then reads the head back to
    learn whether its write landed, instead of failing a batch that did."""
    import errno

    from simplequeue.errors import StoreUnavailable

    store = LocalStore(tmp_path, journal=False)  # the journal's own: test_localfs_journal
    etag = await store.put("topics/t.json", b"v1")
    await store.put("topics/t/seed.json", b"{}")
    real = LocalStore._fsync_dir

    def full_after_rename(directory: Path) -> None:
        if directory == tmp_path / "topics":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(directory)

    monkeypatch.setattr(LocalStore, "_fsync_dir", staticmethod(full_after_rename))
    with pytest.raises(StoreUnavailable, match="renamed"):
        await store.put_if("topics/t.json", b"v2", if_match=etag)
    with pytest.raises(StoreUnavailable, match="renamed"):
        await store.put_if_after(
            {"topics/t/seg-a.json": b"a"}, "topics/t.json", b"v3", if_match=content_etag(b"v2")
        )
    monkeypatch.undo()
    assert (await store.get("topics/t.json"))[0] == b"v3"
    assert temp_files(tmp_path / "topics") == []
    await store.close()


@pytest.mark.parametrize("error", ["ENOSPC", "EIO"])
async def test_a_batch_whose_head_landed_but_not_durably_is_answered_once_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    """The head's directory fsync fails after its rename: the write is in place
    but a crash may lose it. It used to fail with StorageFull (for a job that
    was enqueued), then it was read back and answered as done (not durable:
    SPEC 3). The committer now writes the head again, and answers once that
    write is durable; when it cannot be, the batch fails, saying so."""
    import errno

    from simplequeue.api import JobSpec
    from simplequeue.broker.engine import Engine
    from simplequeue.errors import NotDurable
    from simplequeue.groupcommit import GroupCommitter

    store = LocalStore(tmp_path, journal=False)
    engine = Engine(GroupCommitter(store, broker_id="b"))
    await engine.enqueue("t", [JobSpec("first", id="a")])
    real, calls, failing = LocalStore._fsync_dir, [], [1]

    def failing_after_rename(directory: Path) -> None:
        if directory == tmp_path / "topics":
            calls.append(directory)
            if failing[0]:
                failing[0] -= 1
                raise OSError(getattr(errno, error), error)
        real(directory)

    monkeypatch.setattr(LocalStore, "_fsync_dir", staticmethod(failing_after_rename))
    writes = engine.committer.stats.writes
    [answer] = await engine.enqueue("t", [JobSpec("second", id="b")])
    assert answer == {"id": "b", "duplicate": False}
    assert len(calls) == 2 and engine.committer.stats.writes == writes + 1  # synced anew
    failing[0] = 2  # the write, and its rewrite
    with pytest.raises(NotDurable, match="nor could it be written again"):
        await engine.enqueue("t", [JobSpec("third", id="c")])
    monkeypatch.undo()
    committer = engine.committer
    committer.settings = dataclasses.replace(committer.settings, idle_after=0.0, topics_kept=1)
    assert engine.forget_idle() == 0  # not while its head is not durable
    writes = engine.committer.stats.writes
    [again] = await engine.enqueue("t", [JobSpec("third", id="c")])  # the SDK's retry
    assert again == {"id": "c", "duplicate": True}
    assert engine.committer.stats.writes == writes + 1  # a duplicate, but written: synced
    assert (await engine.status("t"))["pending"] == 3
    await engine.committer.close()
    await store.close()


async def test_list_top_of_a_prefix_no_key_starts_with_lists_nothing(tmp_path: Path) -> None:
    """A prefix no key starts with lists nothing, with list_top() as with list()
    and on memfs: localfs's list_top("/") listed the root's keys (round 23's
    review of its own store changes)."""
    local, mem = LocalStore(tmp_path), MemStore()
    for store in (local, mem):
        await store.put("broker.json", b"{}")
        await store.put("xyz", b"1")
    assert await mem.list_top("/") == []
    assert await local.list("/") == []
    assert await local.list_top("/") == []  # fails: ['broker.json', 'xyz']
    assert await local.list_top("/x") == []  # fails too: ['xyz']


@pytest.mark.parametrize("name", ["queue#1", "queue?a=b", "queue%41"])
async def test_a_localfs_url_opens_the_same_directory_again(tmp_path: Path, name: str) -> None:
    """A localfs store's url is quoted, as store_from_url unquotes it: a
    directory whose name held '#', '?' or '%' reopened another, empty one
    (the url the broker logs, given to Client.discover)."""
    root = tmp_path / name
    store = LocalStore(root)
    await store.put("broker.json", b"{}")
    again = store_from_url(store.url)
    assert isinstance(again, LocalStore)
    assert again.root == root
    assert await again.get("broker.json") == await store.get("broker.json")


async def test_a_clock_sample_is_not_the_mtime_another_process_stamped_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _touch_clock writes a byte into `.simplequeue/clock`, a file every store
    # on the directory shares, takes its `received` time and then fstats the
    # file: a touch by another broker (or by another thread of this one: a
    # sweep beside sample_clock) in between gives it the other's later mtime,
    # taken for a stamp made before `received`. Two threads of one process
    # touching in a loop for 5 s: 3 samples 16-54 ms past their `received`
    # (the resolution allowed is 10 ms). Here the other touch comes 50 ms
    # later, deterministically; the store's first sample sets its now().
    a, b = LocalStore(tmp_path), LocalStore(tmp_path)
    real_fstat = localfs.os.fstat
    interleaved = []

    def fstat(fd: int) -> os.stat_result:
        if not interleaved and os.readlink(f"/proc/self/fd/{fd}").endswith("/clock"):
            interleaved.append(fd)
            time.sleep(0.05)  # the thread loses the GIL, or the process its CPU
            b._touch_clock()  # meanwhile, another broker samples its clock
        return real_fstat(fd)

    monkeypatch.setattr(localfs.os, "fstat", fstat)
    await a.sample_clock()
    monkeypatch.undo()
    now = a.now()
    off = now - time.time()  # one machine: the kernel's clock is time.time()
    assert interleaved
    assert off <= a.clock_ahead(now) + 0.005, (
        f"now() is {off * 1000:.0f} ms ahead of the kernel's clock, "
        f"its error {a.clock_error(now) * 1000:.0f} ms"
    )


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /mnt/share rw,relatime shared:9 - nfs4 server:/export rw,vers=4.2
31 30 8:2 / /mnt/share/scratch rw,relatime shared:10 - xfs /dev/sdb1 rw
32 22 0:41 / /mnt/my\\040disk rw,relatime - btrfs /dev/sdc1 rw
33 22 0:42 / /mnt/fuse rw,relatime - fuse.sshfs host:/ rw
"""


@pytest.mark.parametrize(
    ("path", "here"),
    [
        ("/var/lib/simplequeue", True),
        ("/mnt/share/simplequeue", False),
        ("/mnt/share", False),
        ("/mnt/share/scratch/q", True),
        ("/mnt/sharewolf/q", True),  # not under /mnt/share: under /
        ("/mnt/my disk/q", True),
        ("/mnt/fuse/q", False),
    ],
)
def test_files_are_stamped_here_on_a_local_filesystem_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, here: bool
) -> None:
    """The longest mount point above a path says its filesystem; only a local
    one stamps files with this host's clock (NFS: the server's; FUSE: not
    known)."""
    mounts = tmp_path / "mountinfo"
    mounts.write_text(MOUNTINFO)
    monkeypatch.setattr(localfs, "_MOUNTS", mounts)
    monkeypatch.setattr(localfs.os.path, "realpath", lambda p: str(p))
    assert localfs.stamped_here(Path(path)) is here


async def test_a_store_on_a_local_disk_does_not_widen_its_clocks_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local disk's mtimes are this host's CLOCK_REALTIME, which chrony
    slews with CLOCK_BOOTTIME (the clock samples are timed with): the offset
    between them moves only when the clock is stepped. Widened at SLEW all
    the same (10 % a second since each write), a broker writing every 5 s
    had an error of 0.23 s at the median instant between writes, not ~1 ms:
    leases that much longer, reaps that much later (review of round 33's
    clock). On a filesystem stamped elsewhere (NFS), they widen at SLEW."""
    store = LocalStore(tmp_path / "here")
    assert store.clock.slew == clock_module.SLEW  # not known before the first write
    await store.put("a", b"1")
    assert localfs.stamped_here(tmp_path) and store.clock.slew == 0.0
    mounts = tmp_path / "mountinfo"
    mounts.write_text(MOUNTINFO)
    monkeypatch.setattr(localfs, "_MOUNTS", mounts)
    monkeypatch.setattr(localfs.os.path, "realpath", lambda p: "/mnt/share/q")
    elsewhere = LocalStore(tmp_path / "elsewhere")
    await elsewhere.put("a", b"1")
    assert elsewhere.clock.slew == clock_module.SLEW
