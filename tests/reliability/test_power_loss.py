"""Power-loss campaign for localfs: random histories of writes by two handles
on one directory, cut by machine crashes that keep only what was made
durable, the way POSIX promises it and no more.

A shadow of the disk is kept from the store's own fsync and fdatasync calls:
a file's bytes are durable as of its last fsync or fdatasync (never synced:
empty). A directory's entries are, at the crash, either as of its last fsync
(a rename, a new file or an unlink since is undone) or as they are now (the
kernel committed them on its own, bytes or no bytes): each directory draws
one. A crash builds that image in a new directory and opens it as the same
machine after a reboot (another boot id). Half the cuts come between operations, half inside one,
just before one of its syncs (which then never happens): that operation was
never answered, so its key may hold the old version or the new one.

Every acknowledged write must read back: each key holds the last version
written to it, or stays deleted, and every object a head's batch wrote with
it is there. This is what the journal of busy heads (one fdatasync in place
of the two fsyncs of a rename) has to get right."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from simplequeue.errors import ObjectNotFound, PreconditionFailed
from simplequeue.objstore import content_etag, localfs
from simplequeue.objstore.localfs import JOURNAL_SIZE, LocalStore

pytestmark = [pytest.mark.campaign, pytest.mark.timeout(600)]

HEADS = ["topics/a.json", "topics/b.json", "broker.json"]
SIZES = [40, 3_000, 30_000, 90_000, JOURNAL_SIZE + 10]  # the last never fits a journal


class PowerCut(BaseException):
    """The machine stops here: nothing after runs."""


class ShadowDisk:
    """What would survive a power cut: fed by every fsync and fdatasync."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data: dict[int, bytes] = {}  # inode -> bytes as of its last sync
        self.entries: dict[Path, dict[str, int]] = {}  # directory -> name -> inode

    def synced(self, fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            directory = Path(os.readlink(f"/proc/self/fd/{fd}"))
            self.entries[directory] = _listing(directory)
        else:
            with open(f"/proc/self/fd/{fd}", "rb") as again:
                self.data[st.st_ino] = again.read()

    def seed(self) -> None:
        """Everything on the disk now is durable (the campaign's start)."""
        for dirpath, _, filenames in os.walk(self.root):
            directory = Path(dirpath)
            self.entries[directory] = _listing(directory)
            for name in filenames:
                self.data[self.entries[directory][name]] = (directory / name).read_bytes()

    def image(self, into: Path, rng: random.Random) -> None:
        """The disk after the power cut, written out under `into`."""
        self._copy(self.root, into, rng)

    def _copy(self, directory: Path, into: Path, rng: random.Random) -> None:
        into.mkdir(parents=True, exist_ok=True)
        entries = self.entries.get(directory, {})
        if rng.random() < 0.5 and directory.is_dir():  # committed by the kernel
            entries = _listing(directory)
        for name, inode in entries.items():
            source = directory / name
            if source in self.entries or source.is_dir():
                self._copy(source, into / name, rng)
            else:
                (into / name).write_bytes(self.data.get(inode, b""))


def _listing(directory: Path) -> dict[str, int]:
    """Each name in `directory`, with the inode it links to now."""
    return {name: (directory / name).lstat().st_ino for name in os.listdir(directory)}


class Campaign:
    def __init__(self, root: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rng = random.Random(seed)
        self.monkeypatch = monkeypatch
        self.boot = 0
        self.root = root
        self.acked: dict[str, bytes | None] = {}  # key -> last acknowledged bytes (None: deleted)
        # The operation a cut stopped: its key, and what it would have written.
        self.unanswered: tuple[str, bytes | None] | None = None
        self.cut_in: int | None = None  # syncs left before the cut
        self.n = 0
        self.writes = 0  # operations answered
        self.cuts = 0  # power cuts in the middle of one
        self._open(root)

    def _open(self, root: Path) -> None:
        self.boot += 1
        self.root = root
        self.disk = ShadowDisk(root)
        self.disk.seed()
        boot_id = self.boot.to_bytes(16, "big")
        self.handles = [LocalStore(root, boot_id=boot_id) for _ in range(2)]
        self.monkeypatch.setattr(localfs.os, "fsync", self._fsync(os.fsync))
        self.monkeypatch.setattr(localfs.os, "fdatasync", self._fsync(os.fdatasync))

    def _fsync(self, real):  # type: ignore[no-untyped-def]
        def synced(fd: int) -> None:
            if self.cut_in is not None:
                self.cut_in -= 1
                if self.cut_in == 0:
                    raise PowerCut
            real(fd)
            self.disk.synced(fd)

        return synced

    def _bytes(self, key: str) -> bytes:
        self.n += 1
        size = self.rng.choice(SIZES)
        stamp = f'{{"key": "{key}", "n": {self.n}}}'.encode()
        return stamp + b" " * max(0, size - len(stamp))

    def handle(self) -> LocalStore:
        return self.rng.choice(self.handles)

    def etag(self, key: str) -> str | None:
        data = self.acked.get(key)
        return None if data is None else content_etag(data)

    def step(self) -> bool:
        """One operation; False if a power cut stopped it."""
        key = self.rng.choice(HEADS)
        try:
            self._step(key)
        except PowerCut:
            self.cuts += 1
            return False
        self.writes += 1
        return True

    def _step(self, key: str) -> None:
        store = self.handle()
        roll = self.rng.random()
        etag = self.etag(key)
        if etag is None:
            data = self._bytes(key)
            self.unanswered = (key, data)
            if roll < 0.8:
                store._put_sync(key, data, None, True, True)
            else:
                store._put_sync(key, data, None, False, False)
            self.acked[key] = data
        elif roll < 0.6:
            data = self._bytes(key)
            self.unanswered = (key, data)
            store._put_sync(key, data, etag, False, True)
            self.acked[key] = data
        elif roll < 0.75:
            objects = [(f"{key[:-5]}/seg-{self.n}-{i}.json", self._bytes(key)) for i in range(2)]
            data = self._bytes(key)
            self.unanswered = (key, data)
            store._put_if_after_sync(objects, key, data, etag, False)
            self.acked[key] = data
            self.acked.update(objects)
        elif roll < 0.85:
            self.unanswered = None
            with pytest.raises(PreconditionFailed):
                store._put_sync(key, self._bytes(key), content_etag(b"stale"), False, True)
        elif roll < 0.92:
            data = self._bytes(key)
            self.unanswered = (key, data)
            store._put_sync(key, data, None, False, False)  # unconditional
            self.acked[key] = data
        else:
            self.unanswered = (key, None)
            store._delete_sync(key)
            self.acked[key] = None

    def cut_soon(self) -> None:
        """Cut the power just before one of the next few syncs."""
        self.cut_in = self.rng.randrange(1, 6)

    def crash(self, into: Path) -> None:
        self.cut_in = None
        self.disk.image(into, self.rng)
        self.monkeypatch.undo()
        for store in self.handles:
            store._written.close()
        shutil.rmtree(self.root)  # the disk before the cut: only the image lives on
        self._open(into)

    def check(self, *, cut: bool) -> None:
        """Read back the keys (after a reboot): every one the cut may have
        left either way, half of the others (the rest are first touched by a
        write, or a delete, which must recover them as a read does)."""
        doubtful = self.unanswered[0] if cut and self.unanswered else None
        for key, data in sorted(self.acked.items()):
            if key != doubtful and self.rng.random() < 0.5:
                continue
            store = self.handle()
            allowed = {data}
            if key == doubtful:
                assert self.unanswered is not None
                allowed.add(self.unanswered[1])
            try:
                got: bytes | None
                got, etag = store._read(key)
                assert etag == content_etag(got)
            except ObjectNotFound:
                got = None
            assert got in allowed, (
                f"{key}: {got and got[:60]!r}, acknowledged {data and data[:60]!r}"
            )
            self.acked[key] = got
        if doubtful is not None and doubtful not in self.acked:  # the key's first write
            with contextlib.suppress(ObjectNotFound):
                self.acked[doubtful] = self.handle()._read(doubtful)[0]


@pytest.mark.parametrize("seed", range(12))
def test_every_acknowledged_write_survives_power_cuts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
    scale: int,
    record_figures: Callable[[dict[str, Any]], None],
) -> None:
    (tmp_path / "disk-0").mkdir()
    campaign = Campaign(tmp_path / "disk-0", seed, monkeypatch)
    crashes = 20 * scale
    for crash in range(1, crashes + 1):
        for _ in range(campaign.rng.randrange(5, 40)):
            campaign.step()
        cut = campaign.rng.random() < 0.5
        if cut:
            campaign.cut_soon()
            while campaign.step():  # until the power goes, mid-operation
                pass
        campaign.crash(tmp_path / f"disk-{crash}")
        campaign.check(cut=cut)
    monkeypatch.undo()
    if seed == 0:
        record_figures(
            {
                "scenario": "power cuts (localfs journal), seed 0 of 12",
                "backend": "localfs",
                "operations": campaign.writes,
                "indeterminate": campaign.cuts,
                "faults": crashes,
                "lost": 0,
            }
        )
