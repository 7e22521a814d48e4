"""localfs beyond the contract: several OS processes on one directory, and crashes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from simplequeue.objstore import content_etag
from simplequeue.objstore.localfs import LocalStore
from tests.helpers.crash_writer import check

HELPERS = Path(__file__).parent / "helpers"
ROOT = Path(__file__).parent.parent


def spawn(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HELPERS / script), *args],
        cwd=ROOT,
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
