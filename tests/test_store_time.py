"""ObjectStore.now(): every backend tells the store's time, taken from the stamps
the store puts on our requests (S3's Date header, a written file's mtime), so
that a process whose own clock is wrong still agrees with the others.

The proof runs a process under libfaketime with its wall clock moved back 60 s.
Without libfaketime that case skips, unless SIMPLEQUEUE_REQUIRE_FAKETIME=1
(bin/test sets it after bin/install-faketime).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from simplequeue.objstore import ObjectNotFound
from simplequeue.objstore.clock import StoreClock
from simplequeue.objstore.localfs import LocalStore
from simplequeue.objstore.s3 import S3Store, date_of
from tests.conftest import BrokerProcess, faketime_env, open_s3, remove_faketime_leftovers

HELPERS = Path(__file__).parent / "helpers"
ROOT = Path(__file__).parent.parent


# --- localfs: the kernel's stamp on the file just written ----------------------------


async def test_localfs_takes_each_written_files_mtime_as_a_sample(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    # Keeping every sample: the store's own clock drops one taken within 20 ms
    # of the last that tells it nothing new (the second write, when it was slower).
    store.clock = StoreClock()
    await store.put("a", b"x")
    await store.put_if("topics/t.json", b"{}", if_none_match=True)
    assert store.clock.samples == 2
    # A 10 ms stamp bounded by how long the write took: tight, even on a busy machine.
    assert store.clock.uncertainty is not None and store.clock.uncertainty < 0.25
    assert abs(store.now() - time.time()) < 0.5
    await store.close()


async def test_localfs_takes_a_stamp_of_whole_seconds_for_as_coarse_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sample claimed the stamp was within 10 ms of the kernel's clock, but
    some filesystems stamp whole seconds (ext3's small inodes, some NFS
    mounts): the store's clock then claimed +-10 ms while up to 1 s off
    (review finding)."""
    import types

    store = LocalStore(tmp_path)
    store.clock = StoreClock()
    stamp = int(time.time()) * 1_000_000_000  # the filesystem keeps whole seconds
    monkeypatch.setattr(os, "fstat", lambda fd: types.SimpleNamespace(st_mtime_ns=stamp))
    await store.sample_clock()
    monkeypatch.undo()
    assert store.clock.samples == 1
    assert store.clock.uncertainty is not None and store.clock.uncertainty > 0.5
    await store.close()


async def test_a_localfs_store_that_never_wrote_tells_the_wall_clock(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(ObjectNotFound):
        await store.get("a")
    assert store.clock.samples == 0
    assert abs(store.now() - time.time()) < 0.1


async def test_the_brokers_instrumented_store_tells_the_wrapped_stores_time(
    tmp_path: Path,
) -> None:
    from simplequeue.broker.metrics import InstrumentedStore, Metrics

    inner = LocalStore(tmp_path)
    store = InstrumentedStore(inner, Metrics())
    await store.put("a", b"x")
    assert store.clock is inner.clock
    assert inner.clock.samples == 1
    await store.close()


# --- s3: the Date header of every answer, errors too --------------------------------------


@pytest.mark.parametrize("moto", [False, True], ids=["localstack", "moto"])
async def test_s3_takes_the_date_of_answers_and_of_errors_as_samples(moto: bool) -> None:
    seeded = await open_s3(moto=moto)  # makes the bucket
    await seeded.close()
    assert isinstance(seeded, S3Store)
    store = S3Store(seeded.settings)
    try:
        with pytest.raises(ObjectNotFound):
            await store.get("missing")  # a 404: botocore raises, the Date still counts
        assert store.clock.samples == 1
        await store.put("k", b"v")
        assert store.clock.samples == 2
        # One-second stamps, each bounded by its round trip.
        assert store.clock.uncertainty is not None and store.clock.uncertainty < 1
        assert abs(store.now() - time.time()) < 2
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (
            {"ResponseMetadata": {"HTTPHeaders": {"date": "Wed, 02 Dec 2026 11:58:24 GMT"}}},
            1796212704.0,
        ),
        (
            {"ResponseMetadata": {"HTTPHeaders": {"date": "Wed, 02 Dec 2026 11:58:24 -0000"}}},
            1796212704.0,
        ),
        ({"ResponseMetadata": {"HTTPHeaders": {"date": "yesterday"}}}, None),
        # parsedate_to_datetime raises OverflowError for this year
        (
            {"ResponseMetadata": {"HTTPHeaders": {"date": "Mon, 01 Jan 99999999999 00:00:00 GMT"}}},
            None,
        ),
        ({"ResponseMetadata": {"HTTPHeaders": {"date": ""}}}, None),
        ({"ResponseMetadata": {"HTTPHeaders": {}}}, None),
        ({"ResponseMetadata": {}}, None),
        ({}, None),
    ],
)
def test_a_missing_or_unreadable_date_is_ignored(
    response: dict[str, Any], expected: float | None
) -> None:
    assert date_of(response) == expected


# --- the proof: a process with its clock moved ---------------------------------------------


async def test_a_process_whose_clock_is_60_s_behind_still_tells_the_stores_time(
    tmp_path: Path,
) -> None:
    # libfaketime preloaded into the child itself, not the faketime command: that
    # wrapper makes a named semaphore per its PID and leaves it when killed, and
    # a later wrapper given the same PID refused to start ("sem_open: File exists").
    env = {**os.environ, **faketime_env("-60s")}
    seeded = await open_s3()
    await seeded.close()
    assert isinstance(seeded, S3Store)
    s = seeded.settings
    assert s.endpoint_url is not None
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HELPERS / "store_now.py"),
        str(tmp_path),
        s.endpoint_url,
        s.bucket,
        s.prefix,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stderr is not None
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        ours, our_monotonic = time.time(), time.monotonic()
        if not line:
            raise AssertionError(f"the child printed nothing: {await child.stderr.read()!r}")
        theirs = json.loads(line)
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
        remove_faketime_leftovers(child.pid)
    assert abs(theirs["time"] - (ours - 60)) < 2, "the child's wall clock was not moved"
    assert abs(theirs["monotonic"] - our_monotonic) < 2, "the child's monotonic clock moved"
    assert abs(theirs["localfs_now"] - ours) < 2
    assert abs(theirs["s3_now"] - ours) < 2
    # A broker samples the clock before its first write (a file it touches):
    # that stamp too must be the kernel's, not the process's wall clock.
    assert abs(theirs["localfs_sampled_now"] - ours) < 2


def test_a_process_run_with_its_clock_moved_leaves_nothing_in_dev_shm(
    broker_process: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    shm = Path("/dev/shm")
    ours = [broker_process("--dir", str(tmp_path / "a"), env=faketime_env("+60s"))]
    ours.append(broker_process("--dir", str(tmp_path / "b"), env=faketime_env("-60s")))
    ours[0].stop()
    ours[1].kill()
    left = [p.name for b in ours for p in shm.glob(f"*faketime*_{b.pid}")]
    assert left == []


# --- a handle that has not heard from the store yet -----------------------------------


async def test_a_committer_that_never_wrote_to_localfs_does_not_judge_leases_by_its_wall_clock(
    tmp_path: Path,
) -> None:
    """The campaign's fault: a broker restarted a minute ahead listens before its
    registration lands; a claim served in between was judged on its wall clock
    (localfs reads carry no stamp): a heartbeat a minute late by that clock is
    refused as expired, and a reap takes the job from its holder."""
    from simplequeue.api import JobSpec
    from simplequeue.broker.engine import Engine
    from simplequeue.groupcommit import GroupCommitter
    from simplequeue.objstore.clock import StoreClock

    right = LocalStore(tmp_path)
    holder = Engine(GroupCommitter(right, broker_id="a", clock=right.now))
    await holder.enqueue("t", [JobSpec(payload=1)])
    [held] = await holder.claim("t", "w1", lease=30)
    ahead = LocalStore(tmp_path)
    ahead.clock = StoreClock(wall=lambda: time.time() + 60)
    restarted = Engine(GroupCommitter(ahead, broker_id="b", clock=ahead.now))
    renewed = await restarted.heartbeat("t", held["id"], held["lease_token"], 30)
    assert renewed["lease_expires_at"] == pytest.approx(time.time() + 30, abs=1)
    assert ahead.clock.samples >= 1 and abs(ahead.now() - time.time()) < 0.5
    await right.close()
    await ahead.close()


async def test_a_brokers_first_heartbeat_in_broker_json_is_on_the_stores_clock(
    tmp_path: Path,
) -> None:
    """A broker's first round on broker.json came before anything sampled the
    store's clock (localfs reads carry no stamp): a broker two minutes behind
    announced itself two minutes stale, and clients refused it until its
    next renewal."""
    from simplequeue.broker.discovery import Announcer
    from simplequeue.records import read_record

    behind = LocalStore(tmp_path)
    behind.clock = StoreClock(wall=lambda: time.time() - 120)
    announcer = Announcer(
        behind, broker_id="b0", url="http://127.0.0.1:1", lease_s=15, clock=behind.now
    )
    await announcer.step()
    current = await read_record(behind)
    assert announcer.active and current is not None
    assert current[0].heartbeat_at == pytest.approx(time.time(), abs=1)
    await behind.close()


def handle(path: Path, wall_off_by: float) -> LocalStore:
    """A handle on the localfs store at `path` of a process whose wall clock
    is `wall_off_by` seconds off (libfaketime moves time.time(), not the
    kernel's mtimes)."""
    store = LocalStore(path)
    store.clock = StoreClock(wall=lambda: time.time() + wall_off_by)
    return store


async def announce(path: Path, heartbeat_age: float) -> None:
    """broker.json at `path`, renewed `heartbeat_age` seconds ago by the store's clock."""
    from simplequeue import keys
    from simplequeue.records import BrokerRecord

    broker = handle(path, 0.0)
    await broker.sample_clock()
    record = BrokerRecord("b0", "http://127.0.0.1:1", 1, broker.now() - heartbeat_age, 15.0)
    await broker.put(keys.BROKER, record.encode())
    await broker.close()


async def test_a_client_ahead_finds_a_healthy_broker_and_one_behind_no_dead_one(
    tmp_path: Path,
) -> None:
    """find_broker() judged broker.json's age by store.now(), which on a localfs
    handle that wrote nothing is its wall clock: a client two minutes ahead
    refused a broker that renewed just now, one two minutes behind was sent
    to a broker dead for two minutes."""
    from simplequeue.client.discovery import find_broker
    from simplequeue.errors import BrokerUnavailable

    await announce(tmp_path, heartbeat_age=0.0)
    ahead = handle(tmp_path, +120.0)
    assert await find_broker(ahead, max_age=30) == "http://127.0.0.1:1"
    await announce(tmp_path, heartbeat_age=120.0)
    behind = handle(tmp_path, -120.0)
    with pytest.raises(BrokerUnavailable, match="heartbeat is 120 s old"):
        await find_broker(behind, max_age=30)
    await ahead.close()
    await behind.close()


async def test_a_heartbeat_far_in_the_future_is_stale_not_fresh(tmp_path: Path) -> None:
    """broker.json's heartbeat 120 s in the future (a broker whose clock was
    that far ahead stamped it) gave a negative age, taken for fresh: a broker
    dead for two minutes looked alive. Beyond max_age ahead it is refused; a
    little ahead (clocks a few seconds apart) is still found."""
    from simplequeue.client.discovery import find_broker
    from simplequeue.errors import BrokerUnavailable

    client = handle(tmp_path, 0.0)
    await announce(tmp_path, heartbeat_age=-120.0)
    with pytest.raises(BrokerUnavailable, match="heartbeat is 120 s in the future"):
        await find_broker(client, max_age=30)
    await announce(tmp_path, heartbeat_age=-5.0)
    assert await find_broker(client, max_age=30) == "http://127.0.0.1:1"
    await client.close()


async def test_a_client_that_may_not_write_the_store_judges_broker_json_by_its_wall_clock(
    tmp_path: Path,
) -> None:
    from simplequeue.client.discovery import find_broker
    from simplequeue.errors import StoreRefused

    class ReadOnly(LocalStore):
        async def sample_clock(self) -> None:
            raise StoreRefused(f"localfs {self.root}: read-only file system")

    await announce(tmp_path, heartbeat_age=0.0)
    client = ReadOnly(tmp_path)
    assert await find_broker(client, max_age=30) == "http://127.0.0.1:1"
    await client.close()


# --- estimates that disagree ------------------------------------------------------------


async def test_a_lease_is_not_ended_early_by_two_brokers_estimates_of_the_stores_clock() -> None:
    """On S3 each broker's estimate of the store's clock rests on Date headers
    of 1 s resolution: two may each be right to within half a second and still
    disagree by most of a second. The S3 clock campaign saw a held job claimed
    again at least 0.24 s (by the client's clock) before the lease its last
    heartbeat renewed could have run out. Here
    one broker's estimate is 0.4 s behind the store's time and the other's
    0.4 s ahead, each within its error of 0.5 s: a lease stamped by the first
    and reaped by the second still lasts its whole length, and is reaped once
    it ran out."""
    from simplequeue.api import JobSpec
    from simplequeue.broker.engine import Engine
    from simplequeue.groupcommit import GroupCommitter
    from simplequeue.objstore.memfs import MemStore

    true = [1000.0]  # the store's time
    store = MemStore()
    behind = Engine(
        GroupCommitter(
            store,
            broker_id="a",
            clock=lambda: true[0] - 0.4,
            clock_ahead=lambda now: 0.5,
            clock_behind=lambda now: 0.5,
        )
    )
    ahead = Engine(
        GroupCommitter(
            store,
            broker_id="b",
            clock=lambda: true[0] + 0.4,
            clock_ahead=lambda now: 0.5,
            clock_behind=lambda now: 0.5,
        )
    )
    await behind.enqueue("t", [JobSpec(payload=1, id="acked"), JobSpec(payload=2, id="left")])
    claimed = {j["id"]: j for j in await behind.claim("t", "w1", lease=2, count=2)}
    true[0] = 1001.95  # 50 ms of the lease left
    reaped, due = await ahead.tend("t")
    assert reaped["pending"] == 0, "a live lease was reaped"
    # Due on the owner's clock (the earliest the store's time may be: its
    # estimate less its error) once the lease may have run out by it, at 1002.2.
    assert due is not None and due - ahead.earliest_now() == pytest.approx(0.25)
    await behind.ack("t", "acked", claimed["acked"]["lease_token"])
    true[0] = 1002.25  # the reaper's estimate less its error is past the expiry
    reaped, _ = await ahead.tend("t")
    assert reaped["pending"] == 1
    assert (await ahead.job("t", "left"))["status"] == "pending"
    # A heartbeat counts the same way.
    true[0] += 1.0  # the reaper set run_at by its estimate, ahead of the other's
    [again] = await behind.claim("t", "w1", lease=2)
    true[0] += 1.0
    await behind.heartbeat("t", "left", again["lease_token"])  # the lease counts anew
    await ahead.refresh("t")  # as Duties.refresh() has it read when another broker wrote
    true[0] += 1.95
    reaped, _ = await ahead.tend("t")
    assert reaped["pending"] == 0, "a renewed lease was reaped"
    true[0] += 0.35
    reaped, _ = await ahead.tend("t")
    assert reaped["pending"] == 1
