"""The HTTP listener's limits, over real sockets (issue #13): a client gets so long
to send a request's headers, an idle keep-alive connection so long to send the
next one, and at the cap on open connections the one idle longest makes room,
so that idle or slow clients never lock busy ones out nor exhaust descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as redis
import yarl
from redis.exceptions import ResponseError

from simplequeue.broker.membership import rendezvous
from simplequeue.objstore.memfs import MemStore
from tests.helpers.until import until

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Connect = Callable[[str, int], Awaitable[list[Stream]]]

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Opens raw TCP connections to a broker's URL, one after the other; closes
    every one of them after the test."""
    opened: list[asyncio.StreamWriter] = []

    async def open_many(url: str, n: int) -> list[Stream]:
        address = yarl.URL(url)
        assert address.host is not None and address.port is not None
        streams = []
        for _ in range(n):
            reader, writer = await asyncio.open_connection(address.host, address.port)
            opened.append(writer)
            streams.append((reader, writer))
        return streams

    yield open_many
    for writer in opened:
        writer.close()
    for writer in opened:
        with contextlib.suppress(OSError):  # closed by the broker first
            await writer.wait_closed()


async def read_to_eof(reader: asyncio.StreamReader, within: float = 4.0) -> bytes:
    """Everything the broker sends until it closes the connection (a reset, when
    the client was still sending, is a close too)."""
    received = b""

    async def drain() -> None:
        nonlocal received
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                received += chunk

    await asyncio.wait_for(drain(), within)
    return received


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: its status and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 4)
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:")
    )
    return int(lines[0].split()[1]), await reader.readexactly(length)


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    start_broker: Any, connect: Connect
) -> None:
    broker = await start_broker(header_timeout=0.5)
    [(reader, _)] = await connect(broker.url, 1)
    opened = asyncio.get_running_loop().time()
    assert await read_to_eof(reader) == b""
    assert asyncio.get_running_loop().time() - opened >= 0.45


async def test_headers_trickled_slower_than_the_header_timeout_are_cut_off(
    start_broker: Any, connect: Connect
) -> None:
    broker = await start_broker(header_timeout=0.5)
    [(reader, writer)] = await connect(broker.url, 1)
    # A whole request, one byte every 20 ms: complete after 2 s, were it let in.
    request = HEALTHZ[:-2] + b"X-Slow: " + b"z" * 50 + b"\r\n\r\n"

    async def trickle() -> None:
        for byte in request:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.02)  # the pace under test

    sender = asyncio.create_task(trickle())
    try:
        assert await read_to_eof(reader) == b""  # closed, never answered
        assert not sender.done() or sender.exception() is not None
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(
    start_broker: Any, connect: Connect
) -> None:
    broker = await start_broker(keepalive_timeout=0.5)
    [(reader, writer)] = await connect(broker.url, 1)
    writer.write(HEALTHZ)
    assert (await read_response(reader))[0] == 200
    answered = asyncio.get_running_loop().time()
    assert await read_to_eof(reader) == b""
    assert asyncio.get_running_loop().time() - answered >= 0.45


async def test_a_keep_alive_connection_may_idle_longer_than_the_header_timeout(
    start_broker: Any, connect: Connect
) -> None:
    # The header clock of a later request starts at its first byte; the wait for
    # that byte is the keep-alive timeout's.
    broker = await start_broker(header_timeout=0.3, keepalive_timeout=5)
    [(reader, writer)] = await connect(broker.url, 1)
    writer.write(HEALTHZ)
    assert (await read_response(reader))[0] == 200
    await asyncio.sleep(0.8)  # the idle time under test
    writer.write(HEALTHZ)
    assert (await read_response(reader))[0] == 200


async def test_a_request_in_progress_outlives_the_header_timeout(start_broker: Any) -> None:
    broker = await start_broker(MemStore(), header_timeout=0.3)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{broker.url}/topics/t/claim", json={"worker_id": "w", "wait": 1.0}) as r,
    ):
        assert r.status == 404  # nothing to claim after the long poll, not a dropped connection


async def test_at_the_cap_the_connections_idle_longest_make_room_for_a_client(
    start_broker: Any, connect: Connect
) -> None:
    broker = await start_broker(max_connections=20)
    idle = await connect(broker.url, 70)
    async with aiohttp.ClientSession() as session, session.get(f"{broker.url}/healthz") as r:
        assert r.status == 200
    for reader, _ in idle[:50]:
        assert await read_to_eof(reader, within=1) == b""
    assert broker.http.open_connections <= 20


async def test_at_the_cap_with_every_connection_in_a_request_a_new_one_is_closed_at_once(
    start_broker: Any, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = await start_broker(max_connections=3)
    claiming, all_claiming, release = 0, asyncio.Event(), asyncio.Event()

    async def held_claim(*args: Any, **kwargs: Any) -> list[Any]:
        nonlocal claiming
        claiming += 1
        if claiming == 3:
            all_claiming.set()
        await release.wait()
        return []

    monkeypatch.setattr(broker.engine, "claim", held_claim)
    async with aiohttp.ClientSession() as session:

        async def claim() -> int:
            url = f"{broker.url}/topics/t/claim"
            async with session.post(url, json={"worker_id": "w"}) as r:
                return r.status

        claims = [asyncio.create_task(claim()) for _ in range(3)]
        try:
            await asyncio.wait_for(all_claiming.wait(), 4)
            [(reader, _)] = await connect(broker.url, 1)
            assert await read_to_eof(reader, within=0.5) == b""
            release.set()
            assert await asyncio.gather(*claims) == [404, 404, 404]  # answered, not dropped
        finally:
            release.set()
            await asyncio.gather(*claims, return_exceptions=True)


async def test_a_broker_with_few_descriptors_serves_past_hundreds_of_idle_sockets(
    broker_process: Any, connect: Connect, tmp_path: Path
) -> None:
    """The measured fault: idle sockets took every descriptor, so clients were
    refused and the store failed with "Too many open files"."""
    broker = broker_process("--dir", str(tmp_path), nofile=256)
    url = broker.url
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(4):
            await connect(url, 100)
            # A fresh connection, accepted after the idle ones before it: so the
            # listen queue never overflows (a client would wait a second for it).
            async with s.get(f"{url}/healthz") as r:
                assert r.status == 200
        async with s.post(f"{url}/topics/t/enqueue", json={"payload": {"n": 1}}) as r:
            assert r.status == 201
            job_id = (await r.json())["id"]
        async with s.post(f"{url}/topics/t/claim", json={"worker_id": "w"}) as r:
            assert r.status == 200
            job = (await r.json())["job"]
        assert job["id"] == job_id
        ack = {"job_id": job_id, "lease_token": job["lease_token"]}
        async with s.post(f"{url}/topics/t/ack", json=ack) as r:
            assert r.status == 200
        async with s.get(f"{url}/topics/t/status") as r:
            assert (await r.json())["completed"] == 1
    assert broker.stop() == 0
    assert "Too many open files" not in broker.stderr_tail


async def test_the_connection_cap_leaves_room_for_the_files_localfs_holds_open(
    broker_process: Any, connect: Connect, tmp_path: Path
) -> None:
    """localfs keeps files open between writes (each busy topic's head and
    journal: a quarter of the limit, 512 at most). The cap on connections
    counted none of them: at 800 descriptors it let 544 connections in, and
    with a few hundred busy topics the store's writes then failed with "Too
    many open files"."""
    broker = broker_process("--dir", str(tmp_path), nofile=800)
    url = broker.url
    async with aiohttp.ClientSession() as s:

        async def busy(n: int) -> None:
            for i in range(3):  # the third write within a second makes a journal
                async with s.post(f"{url}/topics/t{n}/enqueue", json={"payload": i}) as r:
                    assert r.status == 201, await r.text()

        for start in range(0, 300, 20):
            await asyncio.gather(*(busy(n) for n in range(start, start + 20)))
        await connect(url, 600)  # idle: at the cap, the ones idle longest are closed
        for n in (0, 299, 300):
            async with s.post(f"{url}/topics/t{n}/enqueue", json={"payload": "last"}) as r:
                assert r.status == 201, await r.text()
    assert broker.stop() == 0
    assert "Too many open files" not in broker.stderr_tail


async def test_long_polls_through_a_broker_that_does_not_own_the_topic_stay_within_its_descriptors(
    broker_process: Any, tmp_path: Path
) -> None:
    """The connection cap counted a broker's incoming connections against its
    descriptors (soft limit less 256, less the store's); a request passed on
    to the owner takes one more, to the owner, which nothing counted. At
    nofile 2,000 (cap 1,244 connections), 1,400 long-poll claims through the
    broker that does not own the topic: 626 answered by the owner, 114 by
    the broker itself (the healthy owner taken for unreachable: "Cannot
    connect ... Too many open files", suspect), 504 answered 503 (its own
    store: "Too many open files"), 155 connections reset. Under the cap, every
    long poll is passed on and answered by the owner: those past the pool's
    share for long polls wait their turn there."""
    owner = broker_process("--dir", str(tmp_path), "--broker-id", "a", "--broker-lease", "3")
    other = broker_process(
        "--dir", str(tmp_path), "--broker-id", "b", "--broker-lease", "3", nofile=2000
    )
    topic = next(
        t for t in (f"t{i}" for i in range(100)) if rendezvous(t, "a") > rendezvous(t, "b")
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def passed_on() -> bool:
            async with s.get(f"{other.url}/topics/{topic}/status") as r:
                return r.headers.get("Simplequeue-Owner") == owner.url

        deadline = asyncio.get_running_loop().time() + 20
        while not await passed_on():  # the brokers see each other within a round
            assert asyncio.get_running_loop().time() < deadline, "the brokers never met"
            await asyncio.sleep(0.2)
        cap = re.search(r"at most (\d+) HTTP connections", other.log())
        assert cap is not None, other.log()

        async def claim(i: int) -> tuple[Any, str | None]:
            try:
                body = {"worker_id": f"w{i}", "wait": 5}
                async with s.post(f"{other.url}/topics/{topic}/claim", json=body) as r:
                    await r.read()
                    served = r.headers.get("Simplequeue-Owner")
                    return r.status, "owner" if served == owner.url else served
            except aiohttp.ClientError as exc:
                return type(exc).__name__, None

        claims = int(cap[1]) - 4  # room for the connection that asked for the status
        answers = Counter(await asyncio.gather(*(claim(i) for i in range(claims))))
    assert other.stop() == 0
    # Every one answered, none 503 nor reset, and never for want of a
    # descriptor. (On a loaded machine an owner slow past its wait is stood
    # in for, as for any owner that does not answer: the stand-in's 404.)
    assert set(answers) <= {(404, "owner"), (404, other.url)}, answers
    assert answers[404, "owner"] >= claims / 2, answers
    assert "Too many open files" not in other.log()


def _established_to(port: int) -> int:
    """TCP connections on 127.0.0.1 established to `port` (this host's view)."""
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.split(":")[1], 16) == port:
                count += 1
    return count


async def test_a_blpop_through_a_broker_whose_long_poll_share_is_taken_times_out_nil(
    broker_process: Any, tmp_path: Path
) -> None:
    """A long poll passed on waited for one of the long polls' share of the
    pool for `wait` + the forward timeout, then was answered Overloaded (503,
    -TRYAGAIN). At nofile 600 on localfs the pool is 48, its long polls'
    share 36 (and the RESP client cap 36: 18 RESP clients in a BLPOP of two
    keys take it as well). With the share held by 30 s claims, a RESP
    client's `BLPOP k 1` through that broker was answered -TRYAGAIN after
    2 s, where Redis (and this broker before the pool) answers nil after 1 s:
    redis-py raises ResponseError out of a consumer's loop for a timeout it
    asked for. Its wait spent in line, the owner is asked with none left."""
    owner = broker_process("--dir", str(tmp_path), "--broker-id", "a", "--broker-lease", "3")
    other = broker_process(
        "--dir",
        str(tmp_path),
        "--broker-id",
        "b",
        "--broker-lease",
        "3",
        "--redis-addr",
        "127.0.0.1:0",
        nofile=600,
    )
    resp = other.proc.stdout.readline().rsplit(" ", 1)[1].strip()
    host, port = resp.rsplit(":", 1)
    topic = next(
        t for t in (f"t{i}" for i in range(100)) if rendezvous(t, "a") > rendezvous(t, "b")
    )
    owner_port = int(owner.url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def passed_on() -> bool:
            async with s.get(f"{other.url}/topics/{topic}/status") as r:
                return r.headers.get("Simplequeue-Owner") == owner.url

        deadline = time.monotonic() + 20
        while not await passed_on():  # the brokers see each other within a round
            assert time.monotonic() < deadline, "the brokers never met"
            await asyncio.sleep(0.2)
        pool = re.search(r"(\d+) for connections to the other brokers", other.log())
        assert pool is not None, other.log()
        share = int(pool[1]) - int(pool[1]) // 4

        async def hold(i: int) -> int:
            body = {"worker_id": f"w{i}", "wait": 30}
            async with s.post(f"{other.url}/topics/{topic}/claim", json=body) as r:
                await r.read()
                return r.status

        holders = [asyncio.create_task(hold(i)) for i in range(share)]
        client = redis.Redis(host=host, port=int(port))
        try:
            # Each holder's long poll is at the owner: the share is taken.
            await until(lambda: _established_to(owner_port) >= share, within=20)
            started = time.monotonic()
            try:
                got: Any = await client.blpop([topic], timeout=1)
            except ResponseError as exc:
                got = exc
            took = time.monotonic() - started
        finally:
            for h in holders:
                h.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            await client.aclose()
    assert other.stop() == 0 and owner.stop() == 0
    assert got is None and took < 1.8, (repr(got), took)


async def test_the_forwarders_pool_bounds_its_descriptors_with_two_other_brokers(
    broker_process: Any, tmp_path: Path
) -> None:
    """The pool of connections to the other brokers is left out of the
    connection cap (README: "the broker keeps a pool of them, a quarter of the
    descriptors the store leaves"), but aiohttp's limit counts connections in
    use, not idle ones, which it keeps per broker for the keep-alive. At
    nofile 600 (pool 48) with two other brokers: 36 long polls passed on to
    one, then at once 36 to the other, and the broker held 72 sockets to them,
    1.5 times the pool (with N other brokers, up to N times it; at nofile
    2,000 and three others: 933 for a pool of 311, which with the 933 clients
    and the store's 500 is past the limit: EMFILE)."""
    args = ("--dir", str(tmp_path), "--broker-lease", "3")
    a = broker_process(*args, "--broker-id", "a")
    b = broker_process(*args, "--broker-id", "b")
    c = broker_process(*args, "--broker-id", "c", nofile=600)

    def owned_by(me: str) -> str:
        return next(
            t
            for t in (f"t{i}" for i in range(200))
            if max("abc", key=lambda x: rendezvous(t, x)) == me
        )

    ta, tb = owned_by("a"), owned_by("b")
    ports = [int(x.url.rsplit(":", 1)[1]) for x in (a, b)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def owner_of(topic: str) -> str | None:
            async with s.get(f"{c.url}/topics/{topic}/status") as r:
                return r.headers.get("Simplequeue-Owner")

        deadline = time.monotonic() + 20
        while (await owner_of(ta), await owner_of(tb)) != (a.url, b.url):
            assert time.monotonic() < deadline, "the brokers never met"
            await asyncio.sleep(0.2)
        pool = re.search(r"(\d+) for connections to the other brokers", c.log())
        assert pool is not None, c.log()
        size = int(pool[1])
        share = size - size // 4

        async def claim(topic: str, i: int, wait: float) -> int:
            body = {"worker_id": f"w{i}", "wait": wait}
            async with s.post(f"{c.url}/topics/{topic}/claim", json=body) as r:
                await r.read()
                return r.status

        first = await asyncio.gather(*(claim(ta, i, 1) for i in range(share)))
        assert first == [404] * share
        second = [asyncio.create_task(claim(tb, i, 5)) for i in range(share)]
        try:
            await until(lambda: _established_to(ports[1]) >= share, within=20)
            held = sum(map(_established_to, ports))
        finally:
            for task in second:
                task.cancel()
            await asyncio.gather(*second, return_exceptions=True)
    for x in (c, b, a):
        assert x.stop() == 0
    assert held <= size, f"{held} sockets to the other brokers for a pool of {size}"


def test_a_broker_raises_its_soft_descriptor_limit_to_the_hard_one(
    broker_process: Any, tmp_path: Path
) -> None:
    """Run with the common soft limit of 1024 it would take a few hundred
    connections on localfs; it raises the limit to the hard one it may reach
    (4096): 4096 - 256 - 512 for the store, less a quarter of the rest (832)
    for its connections to the other brokers."""
    broker = broker_process("--dir", str(tmp_path), nofile=(1024, 4096))
    assert broker.stop() == 0
    assert (
        "at most 2496 HTTP connections at once (512 descriptors held for the store, "
        "832 for connections to the other brokers)"
    ) in broker.stderr_tail


async def test_idle_resp_sockets_leave_the_http_listener_its_descriptors(
    broker_process: Any, connect: Connect, tmp_path: Path
) -> None:
    """The RESP listener took every connection, token or not: 400 idle sockets
    under a limit of 256 descriptors and /healthz was reset. RESP clients get
    a quarter of what is left for connections (512 - 256, less a quarter of it
    for the connections to the other brokers: 48); past it, a new one is told
    so and closed, as Redis does at maxclients."""
    broker = broker_process(
        "--backend", "memfs", "--redis-addr", "127.0.0.1:0", "--token", "t0ken", nofile=512
    )
    resp = broker.proc.stdout.readline().rsplit(" ", 1)[1].strip()
    streams = await connect(f"http://{resp}", 300)
    answers = await asyncio.gather(*(read_to_eof(reader, within=5) for reader, _ in streams[-5:]))
    assert answers == [b"-ERR max number of clients reached\r\n"] * 5
    async with aiohttp.ClientSession() as s, s.get(f"{broker.url}/healthz") as r:
        assert r.status == 200
    assert broker.stop() == 0
    assert "RESP: 48 clients connected: refusing more" in broker.stderr_tail
    assert "Too many open files" not in broker.stderr_tail


@pytest.mark.parametrize(
    ("request_bytes", "said"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", "8190 bytes"),
        (b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", "many headers"),
        (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", "version"),
    ],
    ids=["header-over-8-KB", "too-many-headers", "bad-version"],
)
async def test_a_request_the_parser_refuses_is_answered_in_json_and_logged_as_the_clients(
    start_broker: Any,
    connect: Connect,
    caplog: pytest.LogCaptureFixture,
    request_bytes: bytes,
    said: str,
) -> None:
    """SPEC 5: every error is {"error": "..."}. aiohttp answered the requests
    its parser refuses itself, in text/plain, and logged each at ERROR with a
    traceback: a client's malformed request as the server's fault."""
    caplog.set_level(logging.INFO)
    broker = await start_broker(MemStore())
    [(reader, writer)] = await connect(broker.url, 1)
    writer.write(request_bytes)
    received = await read_to_eof(reader)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400", received[:200]
    assert b"content-type: application/json" in head.lower(), head
    answer = orjson.loads(body)
    assert list(answer) == ["error"] and said in answer["error"].lower(), answer
    refused = [r for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    assert [r.levelno for r in refused] == [logging.INFO], caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # The broker serves the next connection as ever.
    [(reader, writer)] = await connect(broker.url, 1)
    writer.write(HEALTHZ)
    assert (await read_response(reader))[0] == 200
