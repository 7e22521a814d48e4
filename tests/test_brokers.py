"""Broker processes (`simplequeued` subprocesses) sharing one store: load across
three brokers, failover of broker.json, restarts, graceful shutdown, reaping."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from simplequeue import keys
from simplequeue.broker import discovery as discovery_module
from simplequeue.broker import settings as settings_module
from simplequeue.broker.discovery import Announcer
from simplequeue.errors import AmbiguousWrite, PreconditionFailed, StorageFull, StoreUnavailable
from simplequeue.objstore.localfs import LocalStore
from simplequeue.objstore.memfs import MemStore
from simplequeue.records import read_record
from tests.conftest import s3_broker_args
from tests.helpers.faults import Outage
from tests.helpers.monotonic import moved_clock
from tests.helpers.until import until, until_async


async def post(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with s.post(url, json=body) as r:
        return r.status, await r.json()


async def get(s: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with s.get(url) as r:
        return r.status, await r.json()


async def run_load(urls: list[str], n_jobs: int) -> Counter[str]:
    """Enqueue n_jobs through random brokers while workers claim and ack through
    random brokers; return how many times each job was acknowledged."""
    rng = random.Random(3)
    acked: Counter[str] = Counter()
    async with aiohttp.ClientSession() as s:

        async def produce(offset: int) -> None:
            for first in range(offset, n_jobs, 40):
                jobs = [
                    {"id": f"j{i}", "payload": i} for i in range(first, min(first + 20, n_jobs))
                ]
                status, _ = await post(s, f"{rng.choice(urls)}/topics/load/enqueue", {"jobs": jobs})
                assert status == 201

        async def work(w: int) -> None:
            misses = 0
            while len(acked) < n_jobs and misses < 200:
                status, body = await post(
                    s,
                    f"{rng.choice(urls)}/topics/load/claim",
                    {"worker_id": f"w{w}", "count": 5, "wait": 0.2},
                )
                if status == 404:
                    misses += 1
                    continue
                assert status == 200, body
                for job in body["jobs"]:
                    status, _ = await post(
                        s,
                        f"{rng.choice(urls)}/topics/load/ack",
                        {"job_id": job["id"], "lease_token": job["lease_token"]},
                    )
                    assert status == 200
                    acked[job["id"]] += 1

        await asyncio.gather(produce(0), produce(20), *(work(w) for w in range(8)))
    return acked


async def check_exactly_once(url: str, acked: Counter[str], n_jobs: int) -> None:
    assert sorted(acked) == sorted(f"j{i}" for i in range(n_jobs)), "a job was lost"
    assert set(acked.values()) == {1}, "a job was acknowledged twice"
    async with aiohttp.ClientSession() as s:
        status, counts = await get(s, f"{url}/topics/load/status")
    assert status == 200
    assert counts["completed"] == counts["enqueued"] == n_jobs
    assert counts["pending"] == counts["claimed"] == 0


async def test_three_brokers_on_one_directory_complete_each_job_once(
    broker_process: Any, tmp_path: Path
) -> None:
    brokers = [broker_process("--dir", str(tmp_path)) for _ in range(3)]
    acked = await run_load([b.url for b in brokers], 300)
    await check_exactly_once(brokers[0].url, acked, 300)


@pytest.mark.s3
async def test_three_brokers_on_one_bucket_complete_each_job_once(broker_process: Any) -> None:
    args = s3_broker_args(uuid.uuid4().hex[:12])
    brokers = [broker_process(*args) for _ in range(3)]
    acked = await run_load([b.url for b in brokers], 150)
    await check_exactly_once(brokers[0].url, acked, 150)


async def wait_for_record(store: LocalStore, predicate: Any, within: float) -> Any:
    """Poll broker.json until predicate(record) holds (the standby's takeover is
    an event in another process; reading the store is how it shows)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        current = await read_record(store)
        if current and predicate(current[0]):
            return current[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"broker.json never matched; last: {current}")


async def test_standby_takes_over_broker_json_when_the_active_one_is_killed(
    broker_process: Any, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path)
    active = broker_process("--dir", str(tmp_path), "--broker-lease", "1.5")
    first = await wait_for_record(store, lambda r: r.broker_id == active.broker_id, 10)
    standby = broker_process("--dir", str(tmp_path), "--broker-lease", "1.5")
    async with aiohttp.ClientSession() as s:  # the standby serves while standing by
        assert (await post(s, f"{standby.url}/topics/t/enqueue", {"payload": 1}))[0] == 201
        assert (await get(s, f"{standby.url}/healthz"))[1]["active"] is False
    active.kill()
    record = await wait_for_record(store, lambda r: r.broker_id == standby.broker_id, 20)
    assert record.url == standby.url
    assert record.epoch == first.epoch + 1
    async with aiohttp.ClientSession() as s:
        assert (await get(s, f"{standby.url}/healthz"))[1]["active"] is True


async def test_restarted_broker_sees_every_acknowledged_job(
    broker_process: Any, tmp_path: Path
) -> None:
    first = broker_process("--dir", str(tmp_path))
    async with aiohttp.ClientSession() as s:
        ids = []
        for i in range(30):
            status, body = await post(s, f"{first.url}/topics/t/enqueue", {"payload": i})
            assert status == 201
            ids.append(body["id"])
        _, claimed = await post(s, f"{first.url}/topics/t/claim", {"worker_id": "w", "count": 5})
        for job in claimed["jobs"][:3]:
            await post(
                s,
                f"{first.url}/topics/t/ack",
                {"job_id": job["id"], "lease_token": job["lease_token"]},
            )
    first.kill()
    second = broker_process("--dir", str(tmp_path))
    async with aiohttp.ClientSession() as s:
        status, counts = await get(s, f"{second.url}/topics/t/status")
        assert counts == {
            "pending": 25,
            "delayed": 0,
            "claimed": 2,
            "completed": 3,
            "dead": 0,
            "cancelled": 0,
            "enqueued": 30,
            "total": 30,
        }
        for job_id in ids:
            assert (await get(s, f"{second.url}/topics/t/jobs/{job_id}"))[0] == 200


async def test_sigterm_drains_and_hands_broker_json_over(
    broker_process: Any, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path)
    broker = broker_process("--dir", str(tmp_path))
    await wait_for_record(store, lambda r: r.broker_id == broker.broker_id, 10)
    async with aiohttp.ClientSession() as s:
        await post(s, f"{broker.url}/topics/t/enqueue", {"payload": 1})
    assert broker.stop() == 0
    record = await read_record(store)
    assert record is not None and record[0].heartbeat_at == 0.0  # resigned: take over now


async def test_a_broker_reaps_topics_it_never_touched(broker_process: Any, tmp_path: Path) -> None:
    worker_side = broker_process("--dir", str(tmp_path))
    async with aiohttp.ClientSession() as s:
        await post(s, f"{worker_side.url}/topics/orphans/enqueue", {"id": "o", "payload": 1})
        status, _ = await post(
            s, f"{worker_side.url}/topics/orphans/claim", {"worker_id": "doomed", "lease": 1}
        )
        assert status == 200
    worker_side.kill()
    reaper = broker_process("--dir", str(tmp_path))
    async with aiohttp.ClientSession() as s:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _, job = await get(s, f"{reaper.url}/topics/orphans/jobs/o")
            if job["status"] == "pending":
                break
            await asyncio.sleep(0.2)
        assert job["status"] == "pending"
        assert job["last_error"] == "lease expired"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--backend", "s3"], "--bucket"),
        (["--addr", "nonsense"], "HOST:PORT"),
        (["--lease", "-1"], "--lease"),
        (["--batch-wait", "-5"], "--batch-wait"),
        (["--batch-wait", "soon"], "--batch-wait"),
        (["--token", "two\nlines"], "--token"),  # no client could send it
        (["--advertise-url", "127.0.0.1:8080"], "--advertise-url"),  # no scheme
        (["--dir", __file__], "--dir"),  # a file: it started, every write failing
        # Review of round 22: each of these started a broker.
        (["--dir", f"{__file__}/data"], "Not a directory"),  # it answered 503 to everything
        (["--token", ""], "--token"),  # a secret that did not expand: no auth at all
        (["--max-attempts", "99999999999999999999"], "--max-attempts"),  # 503 at each enqueue
        (["--broker-lease", "1e300"], "--broker-lease"),  # dead, it stayed active for ever
        (["--bucket", "queue", "--region", "eu-west-1"], "--bucket, --region"),  # on localfs
        (["--create-bucket"], "--create-bucket"),
        (["--backend", "memfs", "--dir", "data"], "--dir"),
        # Review of s3, round 23: botocore refused these at the first read of
        # broker.json, a ValueError out of the store and a 50-line traceback.
        (
            ["--backend", "s3", "--bucket", "q", "--endpoint-url", "localhost:9000"],
            "--endpoint-url",
        ),
        (["--backend", "s3", "--bucket", "q", "--endpoint-url", ""], "--endpoint-url"),
    ],
)
def test_simplequeued_rejects_bad_flags_with_a_clear_message(args: list[str], says: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "simplequeue.broker", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert says in done.stderr
    assert "Traceback" not in done.stderr


def test_simplequeued_refuses_an_empty_token_from_the_environment() -> None:
    """SIMPLEQUEUE_TOKEN= (a secret that did not expand) ran the broker with no
    auth at all (review of round 22)."""
    done = subprocess.run(
        [sys.executable, "-m", "simplequeue.broker", "--backend", "memfs"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SIMPLEQUEUE_TOKEN": ""},
    )
    assert done.returncode == 2, done.stderr
    assert "SIMPLEQUEUE_TOKEN is set but empty" in done.stderr


async def test_simplequeued_flags_reach_the_running_broker(
    broker_process: Callable[..., Any], tmp_path: Path
) -> None:
    """--cache-mb (MB) is converted and used, as /metrics shows."""
    broker = broker_process("--dir", str(tmp_path), "--cache-mb", "3")
    async with aiohttp.ClientSession() as s, s.get(f"{broker.url}/metrics") as r:
        text = await r.text()
    budget = next(
        line
        for line in text.splitlines()
        if line.startswith('simplequeue_cache_bytes{kind="budget"}')
    )
    assert float(budget.split()[-1]) == 3 * 1024 * 1024


def resolving(monkeypatch: pytest.MonkeyPatch, fqdn: str, addresses: list[str]) -> None:
    """This host's name made `fqdn`, which resolves to `addresses` (any other
    name as the resolver says)."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != fqdn:
            return real(host, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in addresses]

    monkeypatch.setattr(settings_module.socket, "getfqdn", lambda *a: fqdn)
    monkeypatch.setattr(settings_module.socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize(("fqdn", "addresses"), [("localhost", []), ("vm", ["127.0.0.1"])])
def test_a_wildcard_bind_is_not_advertised_by_a_loopback_name(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fqdn: str,
    addresses: list[str],
) -> None:
    """--addr 0.0.0.0:PORT was advertised as http://<socket.getfqdn()>:PORT.
    Where the host's name resolves to 127.0.0.1 (/etc/hosts "127.0.0.1
    localhost" then "127.0.0.1 vm"), getfqdn() answers "localhost":
    broker.json and the registration named http://localhost:8080, which no
    other host reaches, and brokers on several such hosts all advertised one
    URL (each took the others for itself). The outbound interface's address
    is advertised instead, and the operator told to set --advertise-url
    (review of membership)."""
    resolving(monkeypatch, fqdn, addresses)
    monkeypatch.setattr(settings_module, "outbound_address", lambda family: "192.0.2.7")
    with caplog.at_level(logging.WARNING, logger="simplequeue.broker.settings"):
        url = settings_module.default_advertise_url("0.0.0.0", 8080)
    assert url == "http://192.0.2.7:8080"
    assert "--advertise-url" in caplog.text


def test_a_wildcard_bind_is_advertised_by_this_hosts_name_when_others_reach_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A name that resolves to another address is advertised as it was."""
    resolving(monkeypatch, "queue-1.internal", ["10.0.0.5"])
    with caplog.at_level(logging.WARNING, logger="simplequeue.broker.settings"):
        assert settings_module.default_advertise_url("::", 8080) == "http://queue-1.internal:8080"
    assert not caplog.records


def test_a_host_with_no_address_but_loopback_keeps_its_name_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No route out (or one through loopback): the name stays, and the
    operator is told that no other host reaches it."""
    found = settings_module.outbound_address()  # a route looked up: nothing is sent
    assert found is None or ipaddress.ip_address(found).version == 4
    resolving(monkeypatch, "localhost", [])
    monkeypatch.setattr(settings_module, "outbound_address", lambda family: None)
    with caplog.at_level(logging.WARNING, logger="simplequeue.broker.settings"):
        assert settings_module.default_advertise_url("0.0.0.0", 8080) == "http://localhost:8080"
    assert "no other host reaches; set --advertise-url" in caplog.text


async def test_a_dead_active_broker_is_replaced_though_one_read_in_four_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a failed read of broker.json, a standby watched it from then (its
    sighting dropped): a store failing one read in four (a round every 5 s at
    lease 15) kept a dead active broker's record untaken for good, its
    heartbeat ageing past clients' max_age (review of round 33's changes:
    not taken over in 120 s). The blind gap alone is not counted."""
    clock = moved_clock(monkeypatch, discovery_module)
    store, _, standby = await active_and_standby()
    took_over_at = None  # the active broker dies now
    for round_ in range(1, 25):
        clock.t += 5
        store.down = round_ % 4 == 0
        with contextlib.suppress(StoreUnavailable):
            await standby.step()
        if standby.active and took_over_at is None:
            took_over_at = 5 * round_
    assert took_over_at is not None and took_over_at <= 35, took_over_at


async def test_a_v6_wildcard_bind_is_advertised_by_an_address_it_takes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asyncio's create_server sets IPV6_V6ONLY on an AF_INET6 socket: a
    broker bound to [::] takes no IPv4 connection, and was advertised by the
    outbound interface's IPv4 address (its host name resolving to loopback),
    which every other broker's requests found refused. The outbound address
    is now of the bind's family (here, loopback's own, standing in for the
    outbound interface's; review of round 33's changes)."""
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "::", 0)
    port = server.sockets[0].getsockname()[1]
    resolving(monkeypatch, "localhost", [])
    loopback = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}
    monkeypatch.setattr(settings_module, "outbound_address", lambda family: loopback[family])
    monkeypatch.setattr(settings_module, "is_loopback", lambda host: host == "localhost")
    try:
        url = settings_module.default_advertise_url("::", port)
        host = url.split("//", 1)[1].rsplit(":", 1)[0].strip("[]")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except OSError as exc:
            pytest.fail(f"{url}, advertised for a bind on [::]:{port}, is refused: {exc}")
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_metrics_say_how_far_the_store_clock_may_be_off(
    broker_process: Callable[..., Any], tmp_path: Path
) -> None:
    """Leases are lengthened by the estimate's error (docs/RELIABILITY.md,
    "Clocks"): /metrics shows it. On localfs, a written file's mtime: a few ms."""
    broker = broker_process("--dir", str(tmp_path))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{broker.url}/topics/t/enqueue", json={"payload": 1}) as r:
            assert r.status == 201
        async with s.get(f"{broker.url}/metrics") as r:
            text = await r.text()
    [line] = [x for x in text.splitlines() if x.startswith("simplequeue_store_clock_error_seconds")]
    assert 0 < float(line.split()[-1]) < 0.5


class HeldWrite(MemStore):
    """A memfs store whose next broker.json write, once armed, is held and
    lands even if its caller was cancelled meanwhile (as a localfs write in a
    worker thread, or an S3 PUT already sent, does): it lands right after the
    next read of broker.json, so that reader holds a stale ETag."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.held: asyncio.Task[str] | None = None

    async def get(self, key: str) -> tuple[bytes, str]:
        got = await super().get(key)
        if key == keys.BROKER and self.held is not None:
            self.release.set()
            await asyncio.wait([self.held])
        return got

    async def put_if(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        write = super().put_if(key, data, if_match=if_match, if_none_match=if_none_match)
        if not (self.armed and key == keys.BROKER):
            return await write
        self.armed = False

        async def held() -> str:
            await self.release.wait()
            return await write

        self.held = asyncio.create_task(held())
        self.entered.set()
        return await asyncio.shield(self.held)


async def test_resign_outlasts_a_renewal_cancelled_mid_write() -> None:
    store = HeldWrite()
    announcer = Announcer(store, broker_id="b", url="http://127.0.0.1:1", lease_s=30)
    await announcer.step()  # registers
    assert announcer.active
    store.armed = True
    renewal = asyncio.create_task(announcer.step())
    await store.entered.wait()
    renewal.cancel()  # as stop() cancels the announcer mid-renewal
    await asyncio.wait([renewal])
    await announcer.resign()  # its first read lets the renewal land
    assert store.held is not None and store.held.done() and store.held.exception() is None
    record = await read_record(store)
    assert record is not None and record[0].heartbeat_at == 0.0


class FullOnce(MemStore):
    """Refuses one write of broker.json, once `armed`, as a full disk does
    (localfs: ENOSPC is StorageFull); `renewed` is set by a write after it."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.refused = False
        self.renewed = asyncio.Event()

    async def put_if(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        if key == keys.BROKER and self.armed:
            self.armed, self.refused = False, True
            raise StorageFull("localfs: no space left on the device")
        etag = await super().put_if(key, data, if_match=if_match, if_none_match=if_none_match)
        if key == keys.BROKER and self.refused:
            self.renewed.set()
        return etag


async def test_the_announcer_renews_broker_json_again_after_a_full_disk() -> None:
    """StorageFull is no StoreUnavailable: it ended the announcer's task for
    good, and broker.json went stale under a live broker."""
    store = FullOnce()
    announcer = Announcer(store, broker_id="b", url="http://127.0.0.1:1", lease_s=0.3)
    await announcer.step()  # registers
    store.armed = True
    task = asyncio.create_task(announcer.run())  # a round every 0.1 s
    renewed = asyncio.ensure_future(store.renewed.wait())
    try:
        await asyncio.wait([task, renewed], timeout=3, return_when=asyncio.FIRST_COMPLETED)
        assert store.refused and store.renewed.is_set() and announcer.active
    finally:
        for waiting in (task, renewed):
            waiting.cancel()
        await asyncio.gather(task, renewed, return_exceptions=True)


class LandedUnanswered(MemStore):
    """Lands the next `landed` writes of broker.json and answers each
    PreconditionFailed, as S3 does for a conditional PUT answered 500 after it
    landed: its retry finds its own write there (412)."""

    def __init__(self) -> None:
        super().__init__()
        self.landed = 0

    async def put_if(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        etag = await super().put_if(key, data, if_match=if_match, if_none_match=if_none_match)
        if key == keys.BROKER and self.landed:
            self.landed -= 1
            raise PreconditionFailed(f"{key}: the retry of a write that landed")
        return etag


async def test_a_registration_that_landed_unseen_leaves_its_broker_active() -> None:
    """A registration (or take-over) of broker.json that landed but was
    answered PreconditionFailed left its broker a standby: the next round read
    the record, its own, at epoch 1 against the broker's 0, took it for
    another broker's, and left it unrenewed until its lease ran out (up to
    60 s with no active broker renewing, then a take-over from itself). The
    record this broker sent is its own now, adopted and renewed."""
    store = LandedUnanswered()
    announcer = Announcer(store, broker_id="b", url="http://127.0.0.1:1", lease_s=60)
    store.landed = 1
    await announcer.step()  # registers: landed, answered 412
    assert not announcer.active
    landed = await read_record(store)
    assert landed is not None and landed[0].broker_id == "b"
    await announcer.step()  # the next round finds its own record
    assert announcer.active and announcer.epoch == 1
    renewed = await read_record(store)
    assert renewed is not None and renewed[1] != landed[1]  # renewed, not left to age
    # A record an earlier process wrote under the same broker id is no
    # registration of this one's: it waits for its lease as for any other's.
    later = Announcer(store, broker_id="b", url="http://127.0.0.1:2", lease_s=60)
    await later.step()
    assert not later.active and later.epoch == 0


class LateOnce(MemStore):
    """The next broker.json write, once `armed`, is answered AmbiguousWrite and
    kept: it lands (on its condition) just before the broker.json write after
    it, as S3 applies a timed-out PUT later."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.late: tuple[bytes, str | None] | None = None

    async def put_if(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        if key == keys.BROKER and self.armed:
            self.armed = False
            self.late = (data, if_match)
            raise AmbiguousWrite("injected: PUT sent, no answer")
        if key == keys.BROKER and self.late is not None:
            late, self.late = self.late, None
            await super().put_if(key, late[0], if_match=late[1])
        return await super().put_if(key, data, if_match=if_match, if_none_match=if_none_match)


async def test_a_take_over_that_landed_late_is_adopted_and_renewed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A standby's take-over went unanswered (AmbiguousWrite); at its next
    round the record was still the dead broker's, so it sent a second one,
    which replaced the first as the write it looked for. The first landed
    just before it (on the same condition) and the second was refused: the
    record named this broker at epoch 2, yet matched neither that write nor
    its epoch (0). It stood by and left its own record unrenewed for a
    lease, then took it over from itself (epoch 3): broker.json aged ~20 s
    under a live broker, and /healthz said active: false (review of
    membership). Any write sent since one was last seen is its own."""
    clock = moved_clock(monkeypatch, discovery_module)
    store = LateOnce()
    dead = Announcer(store, broker_id="dead", url="http://d:1", lease_s=15)
    await dead.step()  # epoch 1, then never renewed
    standby = Announcer(store, broker_id="s", url="http://s:1", lease_s=15)
    await standby.step()  # first sighting
    for _ in range(3):  # watched every 5 s: unchanged for 15 s
        clock.t += 5
        await standby.step()
    clock.t += 1
    store.armed = True
    with pytest.raises(AmbiguousWrite):
        await standby.step()  # a take-over sent, no answer
    clock.t += 5
    await standby.step()  # still the dead one's: a second take-over; the first lands
    current = await read_record(store)
    assert current is not None and current[0].broker_id == "s" and current[0].epoch == 2
    await standby.step()  # the next round finds its own record
    assert standby.active and standby.epoch == 2
    renewed = await read_record(store)
    assert renewed is not None and renewed[1] != current[1]  # renewed, not left to age


async def active_and_standby() -> tuple[Outage, Announcer, Announcer]:
    """An active broker "a" and a standby "s" on a store that can go down."""
    store = Outage()
    active = Announcer(store, broker_id="a", url="http://a:1", lease_s=15)
    standby = Announcer(store, broker_id="s", url="http://s:1", lease_s=15)
    await active.step()
    await standby.step()
    assert active.active and not standby.active
    return store, active, standby


async def test_a_store_outage_longer_than_the_lease_does_not_move_broker_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A standby whose reads failed for longer than the lease (the active
    broker's renewals failed too) took over from a healthy active broker at
    its first read after the outage, before that broker's next renewal: the
    epoch moved, clients were sent elsewhere, and the active broker was told
    it was replaced (review of membership). Stale is seen unchanged for a
    lease (SPEC 4.3): an active broker dead in the outage is replaced a lease
    after it."""
    clock = moved_clock(monkeypatch, discovery_module)
    store, active, standby = await active_and_standby()
    store.down = True
    for _ in range(4):  # 20 s down: a round every 5 s, each one failing
        clock.t += 5
        for announcer in (active, standby):
            with pytest.raises(StoreUnavailable):
                await announcer.step()
    store.down = False
    clock.t += 0.5
    await standby.step()  # its round comes before the active broker's
    assert not standby.active
    record = await read_record(store)
    assert record is not None and record[0].broker_id == "a"
    for _ in range(3):  # the active broker died in the outage: seen unchanged for 15 s
        clock.t += 5
        await standby.step()
    assert not standby.active
    clock.t += 0.1  # for more than its lease
    await standby.step()
    assert standby.active and standby.epoch == 2


async def test_a_healthy_active_broker_keeps_broker_json_while_the_store_clock_stands_still(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a step back of the store's clock, StoreClock.now() answers one
    value until the clock catches up. Nothing else in broker.json changes
    between renewals: each wrote the same bytes, the same ETag, and a standby
    that saw it unchanged for a lease took over from a healthy broker, which
    did the same back a lease later for as long as the clock stood still (a
    60 s step back at lease 15: epoch 1 -> 2 -> 3; review of membership).
    Each renewal's heartbeat is later than the last."""
    clock = moved_clock(monkeypatch, discovery_module)
    store = MemStore()

    def still() -> float:  # the store's now(), standing still
        return 1_800_000_000.0

    active = Announcer(store, broker_id="a", url="http://a:1", lease_s=15, clock=still)
    standby = Announcer(store, broker_id="s", url="http://s:1", lease_s=15, clock=still)
    await active.step()
    await standby.step()
    for _ in range(6):  # 30 s: the active broker renews every 5 s
        clock.t += 5
        await active.step()
        await standby.step()
        assert active.active and not standby.active and active.epoch == 1
    await active.resign()  # a resignation is still a heartbeat of 0
    record = await read_record(store)
    assert record is not None and record[0].resigned


async def test_a_broker_whose_store_stopped_answering_still_stops(
    start_broker: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Landing the writes in flight and saying goodbye (its membership record,
    broker.json) are bounded: with a store that never answers, stop() waited
    for ever (on S3, for its client's timeouts, 15 s a request), past the
    grace a supervisor gives before SIGKILL."""
    from simplequeue.api import JobSpec
    from simplequeue.broker import server
    from simplequeue.errors import StoreUnavailable
    from tests.helpers.faults import FaultyStore

    monkeypatch.setattr(server, "FAREWELL_TIMEOUT", 0.5)
    store = FaultyStore(MemStore())
    broker = await start_broker(store, commit_budget=1.0)
    assert broker.announcer.active
    await broker.engine.enqueue("t", [JobSpec(0)])  # the topic loaded: next, a head write
    # The start's take-over reads t's head in a task of its own: done before
    # the store falls silent, or the enqueue's write waits behind that read.
    await asyncio.wait_for(broker.duties.taken_over.wait(), 5)
    store.silent = True
    store.put_started.clear()
    # Straight to the engine: a request in progress would hold the listener's
    # stop for 10 s (aiohttp's 5 s for the handler, then 5 s for its cancel).
    enqueue = asyncio.create_task(broker.engine.enqueue("t", [JobSpec(1)]))
    await asyncio.wait_for(store.put_started.wait(), 10)  # the head's write in flight
    await asyncio.wait_for(broker.stop(), 1.0 + 0.5 + 5)
    assert "writes still in flight" in caplog.text
    assert "stopping without resigning" in caplog.text
    # Nothing of the committer runs on to write after the store was closed.
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("commit:")]
    assert left == []
    with pytest.raises(StoreUnavailable, match="may or may not have landed"):
        await enqueue
    store.silent = False  # for the fixture's own stop()


async def test_a_long_poll_passed_to_a_paused_owner_waits_no_more_than_asked(
    broker_process: Any, tmp_path: Path
) -> None:
    """A claim with wait=3 sent to a broker whose topic's owner is paused
    (SIGSTOP): the forwarder waited wait + 1 s for the owner, then served the
    claim itself and waited the whole `wait` again, answering after 2 x wait
    + 1 s (with wait=60, 121 s: past the SDK's own timeout of 30 s + wait).
    What was waited at the owner counts now (review finding)."""
    import os
    import signal

    from simplequeue.broker.membership import rendezvous

    a = broker_process("--dir", str(tmp_path), "--broker-id", "ba")
    b = broker_process("--dir", str(tmp_path), "--broker-id", "bb")
    topic = next(
        t for t in (f"t{i}" for i in range(1000)) if rendezvous(t, "ba") > rendezvous(t, "bb")
    )
    async with aiohttp.ClientSession() as s:
        deadline = time.monotonic() + 15
        while True:  # b sees a as live, and passes topic's requests to it
            async with s.get(f"{b.url}/topics/{topic}/status") as r:
                if r.headers.get("Simplequeue-Owner") == a.url:
                    break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        os.kill(a.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            async with s.post(
                f"{b.url}/topics/{topic}/claim", json={"worker_id": "w", "wait": 3}
            ) as r:
                status = r.status
            took = time.monotonic() - started
        finally:
            os.kill(a.pid, signal.SIGCONT)
    assert status == 404
    assert took < 3 + 1 + 1, f"a wait=3 long poll answered after {took:.1f} s"


async def busy(s: aiohttp.ClientSession, url: str) -> bool:
    """Whether the broker has an HTTP request in progress besides this scrape."""
    async with s.get(f"{url}/metrics") as r:
        text = await r.text()
    name = "simplequeue_http_requests_in_progress "
    [line] = [x for x in text.splitlines() if x.startswith(name)]
    return float(line.split()[1]) > 1


async def test_a_stopping_broker_answers_its_long_polls_at_once(
    broker_process: Any, tmp_path: Path
) -> None:
    """A long poll in progress held a broker's stop for as long as aiohttp waits
    for a handler (about 10 s), and its caller was then cut off unanswered
    (review finding). A stopping broker answers long polls now: nothing to
    claim, and its caller claims again elsewhere."""
    broker = broker_process("--dir", str(tmp_path))
    async with aiohttp.ClientSession() as s:
        poll = asyncio.create_task(
            s.post(f"{broker.url}/topics/t/claim", json={"worker_id": "w", "wait": 30})
        )
        await until_async(lambda: busy(s, broker.url))
        broker.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            answer = await poll
        assert answer.status == 404
        answer.release()
    assert await asyncio.to_thread(broker.proc.wait, 10) == 0


async def test_a_second_signal_stops_a_stopping_broker_now(
    broker_process: Any, tmp_path: Path
) -> None:
    """Ctrl-C (or SIGTERM) stops a broker gracefully, which may take some 30 s
    (README: a request in progress, writes in flight on a slow store). A
    second one did nothing: the stop went on (review finding). It stops now:
    a write cut short lands whole or not at all, and its caller retries."""
    broker = broker_process("--dir", str(tmp_path))
    host, port = broker.url.removeprefix("http://").split(":")
    # A request in progress: its body comes slowly (a client on a slow link).
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /topics/t/enqueue HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    await writer.drain()
    try:
        async with aiohttp.ClientSession() as s:
            await until_async(lambda: busy(s, broker.url))
        broker.proc.send_signal(signal.SIGINT)
        await until(lambda: "a second signal stops now" in broker.log())
        assert broker.proc.poll() is None  # the stop waits for the request
        broker.proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(broker.proc.wait, 4)
    finally:
        writer.close()
    assert code == 0
    assert "second signal: stopping now" in broker.log()


async def goodbyes_said(folder: Path) -> bool:
    """Whether the broker that ran on `folder` left the registry and handed
    broker.json over (its heartbeat 0: stale at once), as a stopped one does."""
    store = LocalStore(folder)
    try:
        registered = await store.list(keys.BROKERS_PREFIX)
        record = orjson.loads((await store.get(keys.BROKER))[0])
    finally:
        await store.close()
    return registered == [] and record["heartbeat_at"] == 0


@pytest.mark.parametrize("stdout", ["/dev/full", "a pipe whose reader left", "closed"])
async def test_a_broker_that_cannot_print_where_it_listens_stops_as_on_a_signal(
    tmp_path: Path, stdout: str
) -> None:
    """`simplequeued > /dev/full` (or into a pipe whose reader died): printing
    "listening on" failed after the broker had started, registered and taken
    broker.json, and the process exited 1 at once, past its stop: broker.json
    named a dead broker active and its registration counted it live for a
    lease (15 s), --discover sent clients to it and a broker started next
    waited as a standby (review of the edge). It stops as on a signal, then
    fails with one line. Started with stdout closed (`simplequeued >&-`), a
    socket took fd 1 and uvloop aborted the process as it stopped (exit 134,
    its goodbyes not said): /dev/null is opened there first now."""
    if stdout == "/dev/full":
        out = os.open("/dev/full", os.O_WRONLY)
    elif stdout == "closed":  # closed in the child, as the shell's >&- does
        out = os.open(os.devnull, os.O_WRONLY)
    else:
        reader, out = os.pipe()
        os.close(reader)
    argv = [sys.executable, "-m", "simplequeue.broker", "--addr", "127.0.0.1:0"]
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            [*argv, "--backend", "localfs", "--dir", str(tmp_path)],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            preexec_fn=(lambda: os.close(1)) if stdout == "closed" else None,
        )
    finally:
        os.close(out)
    last = done.stderr.strip().splitlines()[-1]
    assert (done.returncode, last.startswith("Error: cannot write to stdout")) == (1, True), last
    assert await goodbyes_said(tmp_path), done.stderr


def broker_with_sighup(data: Path, disposition: signal.Handlers) -> subprocess.Popen[str]:
    """`simplequeued` on `data`, started with SIGHUP at `disposition` (SIG_DFL,
    as a terminal's child has it; SIG_IGN, as nohup leaves it), whatever the
    suite's own; its first line on its stdout."""
    argv = [sys.executable, "-m", "simplequeue.broker", "--addr", "127.0.0.1:0"]
    return subprocess.Popen(
        [*argv, "--dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, disposition),
    )


async def test_a_hung_up_broker_stops_as_on_sigterm(tmp_path: Path) -> None:
    """A broker in a terminal or an ssh session that closes gets SIGHUP, which
    it left at its default: killed at once, writes in flight and long polls
    cut, no goodbyes (broker.json naming it active, its registration live,
    for another lease) (review of the edge). It stops as on SIGTERM. (Started
    with SIGHUP at its default, as a terminal's child has it: the suite may
    run under nohup, and a SIGHUP ignored already stays ignored.)"""
    proc = broker_with_sighup(tmp_path, signal.SIG_DFL)
    try:
        assert proc.stdout is not None
        assert "listening on" in await asyncio.to_thread(proc.stdout.readline)
        proc.send_signal(signal.SIGHUP)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait, 30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert await goodbyes_said(tmp_path)


def test_a_broker_started_under_nohup_runs_on_through_sighup(tmp_path: Path) -> None:
    """A SIGHUP ignored already (nohup) stays ignored."""
    import urllib.request

    proc = broker_with_sighup(tmp_path, signal.SIG_IGN)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split("listening on ")[1].split()[0]
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as answer:
            assert answer.status == 200
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)


# A broker whose store never answers (an S3 endpoint black-holed, an NFS mount
# hung): it prints "asked" each time it waits on the store.
_SILENT_BROKER = """
import asyncio
import contextlib
from simplequeue.broker.cli import _serve
from simplequeue.broker.settings import BrokerSettings
from simplequeue.objstore.memfs import MemStore
from tests.helpers.faults import FaultyStore

class Silent(FaultyStore):
    async def _answer(self):
        print("asked", flush=True)
        await asyncio.Event().wait()

store = Silent(MemStore())
store.silent = True
settings = BrokerSettings(store_url=store.url, addr="127.0.0.1:0")
asyncio.run(_serve(settings, store, False))
"""


def test_a_signal_stops_a_broker_still_starting_on_a_store_that_does_not_answer() -> None:
    """simplequeued's signal handlers only set an event awaited once
    Broker.start() returned, and start() waits on the store unbounded
    (broker.json, the registry): a broker started while its store did not
    answer ignored SIGTERM, and a second one too, and only SIGKILL ended it
    (review of the broker's life cycle, round 25). A signal now cancels the
    start and runs the bounded stop, which a second signal cuts short."""
    import queue
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-c", _SILENT_BROKER],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: [lines.put(x.strip()) for x in proc.stdout or ()])
    reader.start()

    def next_asked() -> None:
        while lines.get(timeout=5) != "asked":
            pass

    try:
        next_asked()  # start() waits on the store
        proc.send_signal(signal.SIGTERM)
        try:
            next_asked()  # the stop's goodbye to the registry waits on it
        except queue.Empty:
            raise AssertionError("a starting broker ignored SIGTERM") from None
        proc.send_signal(signal.SIGTERM)  # the second signal: it stops now
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join()


async def test_a_stopping_broker_gives_up_a_long_poll_it_passed_on(
    broker_process: Any, tmp_path: Path
) -> None:
    """A claim long-polling at the topic's owner through another broker held
    that broker's stop until aiohttp gave up on the handler (10 s), its caller
    then cut off (review of 4c12f02: only the long polls a broker serves
    itself ended). It is given up at once now, answered 503 (the owner may
    have claimed: a retry under the same attempt id gets what it did)."""
    from simplequeue.broker.membership import rendezvous

    a = broker_process("--dir", str(tmp_path), "--broker-id", "ba")
    b = broker_process("--dir", str(tmp_path), "--broker-id", "bb")
    topic = next(
        t for t in (f"t{i}" for i in range(1000)) if rendezvous(t, "ba") > rendezvous(t, "bb")
    )
    async with aiohttp.ClientSession() as s:

        async def b_passes_it_on() -> bool:
            async with s.get(f"{b.url}/topics/{topic}/status") as r:
                return r.headers.get("Simplequeue-Owner") == a.url

        await until_async(b_passes_it_on, within=15)
        poll = asyncio.create_task(
            s.post(f"{b.url}/topics/{topic}/claim", json={"worker_id": "w", "wait": 30})
        )
        await until_async(lambda: busy(s, a.url))  # waiting at the owner
        b.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            answer = await poll
        assert answer.status == 503
        assert "stopping" in (await answer.json())["error"]
    assert await asyncio.to_thread(b.proc.wait, 10) == 0
