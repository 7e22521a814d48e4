"""What a LocalStore does to the disk, in order: for tests of fsync and lock order."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from simplequeue.objstore import localfs
from simplequeue.objstore.localfs import LocalStore


def record_disk_events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, each "fsync file", "fsync dir", "fdatasync", "rename NAME",
    "lock" and "unlock" a LocalStore does, in order (monkeypatch.undo() stops)."""
    events: list[str] = []
    real_fsync, real_fdatasync, real_replace = os.fsync, os.fdatasync, os.replace
    real_lock, real_unlock = LocalStore._lock, LocalStore._unlock

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")

    def fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        events.append("fdatasync")

    def replace(src: str | Path, dst: str | Path) -> None:
        real_replace(src, dst)
        events.append(f"rename {Path(dst).name}")

    def lock(self: LocalStore, key: str) -> int:
        events.append("lock")
        return real_lock(self, key)

    def unlock(fd: int) -> None:
        events.append("unlock")
        real_unlock(fd)

    monkeypatch.setattr(localfs.os, "fsync", fsync)
    monkeypatch.setattr(localfs.os, "fdatasync", fdatasync)
    monkeypatch.setattr(localfs.os, "replace", replace)
    monkeypatch.setattr(LocalStore, "_lock", lock)
    monkeypatch.setattr(LocalStore, "_unlock", staticmethod(unlock))
    return events


def record_folder_reads(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[str]:
    """From now on, each folder read (os.scandir, which os.walk uses too), as
    a path relative to `root`, in order."""
    read: list[str] = []
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        read.append(os.path.relpath(path, root))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return read
