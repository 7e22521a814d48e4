"""The Redis protocol listener over real sockets, driven by the real clients:
redis-py (redis.asyncio) with its defaults (RESP3 since 8.0) and with protocol=2,
redis-cli as a subprocess, and a raw socket where the wire itself is the point.

redis-cli comes from Debian's redis-tools (bin/install-redis-tools). Without it
these tests skip, unless SIMPLEQUEUE_REQUIRE_REDIS_CLI=1 (bin/test sets it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import hiredis
import orjson
import pytest
import redis.asyncio as redis
from prometheus_client import generate_latest
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError

from simplequeue import __version__, api, keys
from simplequeue.broker import background, forwarding
from simplequeue.broker.cli import event_loop_runner
from simplequeue.broker.resp import COMMANDS, RespServer, RespSettings, commands, connection, reads
from simplequeue.broker.resp.connection import QUEUED_FRAMES
from simplequeue.broker.resp.wire import Requests, RespError
from simplequeue.broker.server import Broker
from simplequeue.broker.settings import BrokerSettings
from simplequeue.errors import StoreUnavailable
from simplequeue.objstore.memfs import MemStore
from simplequeue.state import Policy
from tests.helpers.faults import FaultyStore
from tests.helpers.until import until, until_async
from tests.test_ownership import cluster, owner_and_other

StartBroker = Callable[..., Awaitable[Broker]]
TOKEN = "s3cret-token"

# redis-py with its defaults (it sends HELLO 3 when it connects), and with RESP2.
PROTOCOLS = [pytest.param({}, id="redis-py-default"), pytest.param({"protocol": 2}, id="resp2")]


# --- fixtures and helpers --------------------------------------------------------------


@pytest.fixture
async def broker(start_broker: StartBroker) -> Broker:
    return await start_broker(MemStore(), redis_addr="127.0.0.1:0")


def port_of(broker: Broker) -> int:
    assert broker.redis is not None
    return broker.redis.port


def connect(broker: Broker, **kw: Any) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port_of(broker), **kw)


@pytest.fixture(params=PROTOCOLS)
async def r(request: pytest.FixtureRequest, broker: Broker) -> AsyncIterator[redis.Redis]:
    client = connect(broker, **request.param)
    yield client
    await client.aclose()


@pytest.fixture
async def other(broker: Broker) -> AsyncIterator[redis.Redis]:
    """A second client, on its own connections."""
    client = connect(broker)
    yield client
    await client.aclose()


@pytest.fixture
async def http(broker: Broker) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession() as session:
        yield Http(session, broker.url)


class Http:
    """The broker's HTTP API, for checks across the two wires."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = orjson.dumps(body) if body is not None else None
        async with self.session.request(method, self.url + path, data=data) as response:
            return response.status, orjson.loads(await response.read())

    async def status(self, topic: str) -> dict[str, int]:
        code, body = await self.call("GET", f"/topics/{topic}/status")
        assert code == 200
        return dict(body)

    async def job(self, topic: str, job_id: str) -> dict[str, Any]:
        code, body = await self.call("GET", f"/topics/{topic}/jobs/{job_id}")
        assert code == 200, body
        return dict(body)


class Raw:
    """A bare socket speaking RESP, for what the wire itself must look like."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, *args: str | bytes) -> None:
        self.writer.write(hiredis.pack_command(args))
        await self.writer.drain()

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply_bytes(self) -> bytes:
        """The bytes of the next whole reply."""
        parser, data = hiredis.Reader(), b""
        while True:
            chunk = await asyncio.wait_for(self.reader.read(1), 10)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
            parser.feed(chunk)
            if parser.gets() is not False:
                return data

    async def call(self, *args: str | bytes) -> Any:
        await self.send(*args)
        parser = hiredis.Reader()
        parser.feed(await self.reply_bytes())
        return parser.gets()

    async def rest(self) -> bytes:
        """Everything until the server closes the connection."""
        return await asyncio.wait_for(self.reader.read(), 10)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):  # the server closed it first
            await self.writer.wait_closed()


@pytest.fixture
async def raw(broker: Broker) -> AsyncIterator[Raw]:
    conn = await Raw.open(port_of(broker))
    yield conn
    await conn.close()


async def blocked(broker: Broker, n: int = 1) -> None:
    """Until `n` connections are inside a command (a blocking one, in these tests)."""
    assert broker.redis is not None
    server = broker.redis
    await until(lambda: sum(c.busy for c in server.connections) >= n)


async def hang_up(broker: Broker, client: Raw) -> None:
    """Close `client`'s connection, and wait until the broker saw it go."""
    await client.close()
    assert broker.redis is not None
    server = broker.redis
    await until(lambda: not server.connections)


class QueuedPeak:
    """Every RESP connection's queue of requests (Frames) measured: those
    made, and the most bytes one held queued at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: list[connection.Frames] = []
        self.peak = 0
        measure = self

        class Measured(connection.Frames):
            def __init__(self) -> None:
                super().__init__()
                measure.made.append(self)

            def put(self, frame: connection.Frame) -> None:
                super().put(frame)
                measure.peak = max(measure.peak, self.bytes)

        monkeypatch.setattr(connection, "Frames", Measured)


async def pending_again(http: Http, topic: str, count: int = 1) -> None:
    """Until `topic` has `count` pending jobs: what a client that left took,
    given back (by a commit of its own, after the one that took it)."""
    deadline = time.monotonic() + 10
    while (await http.status(topic))["pending"] != count:
        assert time.monotonic() < deadline, f"{topic}: the job was not given back"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="session")
def redis_cli() -> str:
    path = shutil.which("redis-cli")
    if path is None:
        if os.environ.get("SIMPLEQUEUE_REQUIRE_REDIS_CLI") == "1":
            pytest.fail("redis-cli is missing but required: run bin/install-redis-tools")
        pytest.skip("redis-cli is missing: bin/install-redis-tools installs it")
    return path


Cli = Callable[..., Awaitable[tuple[int, str]]]


@pytest.fixture
def cli(redis_cli: str, broker: Broker) -> Cli:
    """Runs redis-cli against the broker: (exit code, stdout)."""

    async def run(*args: str, stdin: bytes | None = None, flags: tuple[str, ...] = ()) -> Any:
        proc = await asyncio.create_subprocess_exec(
            redis_cli,
            "-h",
            "127.0.0.1",
            "-p",
            str(port_of(broker)),
            *flags,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(stdin), 30)
        return proc.returncode, out.decode()

    return run


# --- connection commands ---------------------------------------------------------------


async def test_ping_echo_and_select_0(r: redis.Redis) -> None:
    assert await r.ping() is True
    assert await r.echo("hello") == b"hello"
    assert await r.execute_command("SELECT", 0) in (True, b"OK")


async def test_select_of_another_db_is_an_error(r: redis.Redis) -> None:
    with pytest.raises(ResponseError, match="DB index is out of range"):
        await r.execute_command("SELECT", 1)


async def test_connections_start_in_resp2(raw: Raw) -> None:
    assert await raw.call("PING", "msg") == b"msg"
    hello = await raw.call("HELLO")
    assert hello[:6] == [b"server", b"simplequeue", b"version", __version__.encode(), b"proto", 2]
    await raw.send("BLPOP", "nothing", "0.01")
    assert await raw.reply_bytes() == b"*-1\r\n"
    await raw.send("LPOP", "nothing")
    assert await raw.reply_bytes() == b"$-1\r\n"


async def test_hello_3_switches_the_connection_to_resp3_and_answers_a_map(raw: Raw) -> None:
    await raw.send("HELLO", "3")
    reply = await raw.reply_bytes()
    assert reply.startswith(b"%7\r\n")
    parser = hiredis.Reader()
    parser.feed(reply)
    hello = parser.gets()
    assert hello[b"proto"] == 3 and hello[b"server"] == b"simplequeue"
    assert hello[b"mode"] == b"standalone" and hello[b"role"] == b"master"
    await raw.send("LPOP", "nothing")
    assert await raw.reply_bytes() == b"_\r\n"
    await raw.call("XADD", "s", "*", "f", "v")
    await raw.send("XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">")
    assert (await raw.reply_bytes()).startswith(b"%1\r\n$1\r\ns\r\n*1\r\n")
    await raw.send("HELLO", "2")
    assert (await raw.reply_bytes()).startswith(b"*14\r\n")


async def test_hello_with_an_unsupported_version_is_noproto(raw: Raw) -> None:
    reply = await raw.call("HELLO", "4")
    assert isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOPROTO")


async def test_hello_setname_and_client_commands(r: redis.Redis, raw: Raw) -> None:
    await raw.call("HELLO", "2", "SETNAME", "worker-7")
    assert await raw.call("CLIENT", "GETNAME") == b"worker-7"
    assert await raw.call("CLIENT", "SETNAME", "w8") == b"OK"
    assert await raw.call("CLIENT", "GETNAME") == b"w8"
    assert isinstance(await raw.call("CLIENT", "SETNAME", "has space"), hiredis.ReplyError)
    assert await raw.call("CLIENT", "SETINFO", "LIB-NAME", "x") == b"OK"
    assert isinstance(await raw.call("CLIENT", "ID"), int)
    assert await r.client_setname("named") is True
    assert await r.client_getname() in ("named", b"named")


async def test_command_describes_the_commands(r: redis.Redis, raw: Raw) -> None:
    assert await r.command_count() == len(COMMANDS)
    commands = await r.command()
    assert commands["lpush"]["arity"] == -3 and commands["llen"]["arity"] == 2
    assert "blocking" in commands["blpop"]["flags"]
    info = await raw.call("COMMAND", "INFO", "LLEN", "NOPE")
    assert info[0][:2] == [b"llen", 2] and info[1] is None
    assert await raw.call("COMMAND", "DOCS") == []  # redis-cli then uses its own help


async def test_info_answers_redis_fields_that_clients_parse(r: redis.Redis, broker: Broker) -> None:
    info = await r.info()
    assert info["redis_version"] == "7.2.0"  # clients that compare versions see Redis 7
    assert info["redis_mode"] == "standalone"
    assert info["simplequeue_version"] == __version__
    assert info["tcp_port"] == port_of(broker)
    assert info["process_id"] == os.getpid()  # the broker runs in this process
    assert info["arch_bits"] in (32, 64) and isinstance(info["os"], str)
    assert info["uptime_in_seconds"] >= 0
    assert info["connected_clients"] >= 1
    assert (info["loading"], info["async_loading"]) == (0, 0)  # ioredis' ready check


async def test_info_is_redis_text_in_sections(raw: Raw) -> None:
    everything = (await raw.call("INFO")).decode()
    assert everything.startswith("# Server\r\nredis_version:7.2.0\r\n")
    assert "\r\n\r\n# Clients\r\nconnected_clients:" in everything
    assert "\r\n\r\n# Persistence\r\nloading:0\r\nasync_loading:0\r\n" in everything
    assert everything.endswith("\r\n\r\n# Keyspace\r\n")  # no keys to show
    for line in everything.split("\r\n"):  # a title, a field, or the blank between
        assert line.startswith("# ") or ":" in line or line == "", line


@pytest.mark.parametrize(
    ("args", "titles"),
    [
        ((), ["Server", "Clients", "Persistence", "Replication", "Keyspace"]),
        (("everything",), ["Server", "Clients", "Persistence", "Replication", "Keyspace"]),
        (("ALL",), ["Server", "Clients", "Persistence", "Replication", "Keyspace"]),
        (("server",), ["Server"]),
        (("persistence", "Server"), ["Server", "Persistence"]),  # in Redis' order
        (("keyspace",), ["Keyspace"]),
        (("nosuchsection",), []),
    ],
)
async def test_info_answers_the_sections_asked_for(
    raw: Raw, args: tuple[str, ...], titles: list[str]
) -> None:
    answer = (await raw.call("INFO", *args)).decode()
    shown = [line[2:] for line in answer.split("\r\n") if line.startswith("# ")]
    assert shown == titles
    if not titles:
        assert answer == ""  # an unknown section is empty, as in Redis


async def test_unknown_command_is_an_error_and_the_connection_goes_on(r: redis.Redis) -> None:
    with pytest.raises(ResponseError, match="unknown command 'FLUSHALL'"):
        await r.execute_command("FLUSHALL")
    assert await r.ping() is True


async def test_wrong_number_of_arguments_is_an_error(r: redis.Redis) -> None:
    with pytest.raises(ResponseError, match="wrong number of arguments for 'llen'"):
        await r.execute_command("LLEN")
    with pytest.raises(ResponseError, match="wrong number of arguments for 'xadd'"):
        await r.execute_command("XADD", "s", "*", "lonely-field")


async def test_a_bad_topic_name_is_an_error_and_reaches_no_storage(
    r: redis.Redis, broker: Broker
) -> None:
    with pytest.raises(ResponseError, match="topic names"):
        await r.lpush("../escape", "x")
    with pytest.raises(ResponseError, match="topic names"):
        await r.xadd("a/b", {"f": "v"})
    assert not any("escape" in k or "a/b" in k for k in await broker.store.list(""))


async def test_quit_answers_ok_and_closes(raw: Raw) -> None:
    await raw.send("QUIT")
    assert await raw.rest() == b"+OK\r\n"


async def test_multi_refuses_what_is_queued_and_exec_aborts(r: redis.Redis) -> None:
    async with r.pipeline(transaction=True) as tx:
        tx.rpush("q", "never")
        with pytest.raises(ResponseError):
            await tx.execute()
    assert await r.llen("q") == 0


# --- lists -----------------------------------------------------------------------------


async def test_lpush_enqueues_every_value_in_order_and_answers_the_pending_count(
    r: redis.Redis,
) -> None:
    assert await r.lpush("q", "a", "b") == 2
    assert await r.rpush("q", "c") == 3
    assert await r.llen("q") == 3
    assert [await r.lpop("q"), await r.rpop("q"), await r.lpop("q")] == [b"a", b"b", b"c"]


async def test_pop_completes_the_job(r: redis.Redis, http: Http) -> None:
    await r.rpush("q", "work")
    assert await r.lpop("q") == b"work"
    counts = await http.status("q")
    assert (counts["pending"], counts["claimed"], counts["completed"]) == (0, 0, 1)


async def test_pop_with_count_answers_a_list(r: redis.Redis) -> None:
    await r.rpush("q", *[str(i) for i in range(5)])
    assert await r.lpop("q", 3) == [b"0", b"1", b"2"]
    assert await r.rpop("q", 10) == [b"3", b"4"]
    assert await r.lpop("q", 2) is None
    assert await r.lpop("q") is None


async def test_lpop_with_count_0_of_a_missing_key_is_a_nil_array_as_in_redis(raw: Raw) -> None:
    """Redis 7 answers LPOP key 0 with the nil array when the key does not
    exist, the empty array only for a list that has values (LLEN above 0).
    It was always the empty array (review of the RESP face, round 25)."""
    await raw.send("LPOP", "never-pushed", "0")
    assert await raw.reply_bytes() == b"*-1\r\n"
    assert await raw.call("RPUSH", "q", "v") == 1
    await raw.send("RPOP", "q", "0")
    assert await raw.reply_bytes() == b"*0\r\n"
    assert await raw.call("LLEN", "q") == 1  # nothing popped


async def test_lpop_count_0_pipelined_after_a_push_sees_the_push(r: redis.Redis) -> None:
    """Redis answers the pipeline RPUSH k a; LPOP k 0 with [1, []]: the list
    exists when the pop runs. Pipelined writes ran together, and LPOP's count
    0 was answered from a status read that did not wait for the push queued
    before it: [1, None], the nil array, as if the key were missing (review
    of the RESP face, round 26). Sent one at a time they answered [1, []]."""
    async with r.pipeline(transaction=False) as pipe:
        pipe.rpush("k", "a")
        pipe.lpop("k", 0)
        pipe.rpop("k", 0)
        assert await pipe.execute() == [1, [], []]
    assert await r.llen("k") == 1  # nothing popped


async def test_a_pop_takes_at_most_the_apis_batch_and_no_policy_sets_another(
    r: redis.Redis, http: Http
) -> None:
    """The batch limit is api.MAX_BATCH, for HTTP and RESP alike; Policy used to
    carry a second one that only RESP read. A pop of more is refused, and pops
    nothing: it answered MAX_BATCH values, which passed for a list that ran
    short (a redis-py loop that stops on a short answer left the rest)."""
    assert "max_batch" not in {f.name for f in dataclasses.fields(Policy)}
    jobs = [{"payload": i} for i in range(api.MAX_BATCH)]
    await http.call("POST", "/topics/q/enqueue", {"jobs": jobs})
    await http.call("POST", "/topics/q/enqueue", {"payload": "one more"})
    with pytest.raises(redis.ResponseError, match=f"at most {api.MAX_BATCH} values a pop") as e:
        await r.lpop("q", api.MAX_BATCH + 1)
    assert "--" not in str(e.value)  # it named --max-batch, a flag no command has
    assert await r.llen("q") == api.MAX_BATCH + 1
    assert len(await r.lpop("q", api.MAX_BATCH)) == api.MAX_BATCH
    assert await r.lpop("q", api.MAX_BATCH) == [b"one more"]


async def test_pop_answers_json_for_payloads_that_are_not_strings(
    r: redis.Redis, http: Http
) -> None:
    await http.call("POST", "/topics/q/enqueue", {"payload": {"item": "book", "n": 2}})
    assert orjson.loads(await r.lpop("q")) == {"item": "book", "n": 2}


async def test_pop_takes_the_highest_priority_first(r: redis.Redis, http: Http) -> None:
    await r.rpush("q", "low")
    await http.call("POST", "/topics/q/enqueue", {"payload": "high", "priority": 5})
    assert await r.lpop("q") == b"high"


async def test_llen_counts_pending_jobs_not_claimed_ones(r: redis.Redis, http: Http) -> None:
    await r.rpush("q", "a", "b")
    await http.call("POST", "/topics/q/claim", {"worker_id": "w"})
    assert await r.llen("q") == 1


@pytest.mark.parametrize(
    ("seconds", "error"),
    [
        ("nan", "not a float"),
        ("x", "not a float"),
        ("-1", "negative"),
        ("-inf", "negative"),
        # Taken by Python's float(), and waited on (for ever, 10 s, 1 s), until
        # a review found them: Redis refuses each.
        ("inf", "out of range"),
        ("1e30", "out of range"),
        ("1e400", "out of range"),
        ("1_0", "not a float"),
        (" 1", "not a float"),
    ],
)
async def test_blpop_with_a_bad_timeout_is_refused_as_redis_refuses_it(
    r: redis.Redis, seconds: str, error: str
) -> None:
    with pytest.raises(ResponseError, match=error):
        await asyncio.wait_for(r.execute_command("BLPOP", "q", seconds), 5)


@pytest.mark.parametrize("seconds", ["0.05", ".05", "5e-2", "+0.05"])
async def test_blpop_timeouts_redis_takes_are_taken(r: redis.Redis, seconds: str) -> None:
    assert await asyncio.wait_for(r.execute_command("BLPOP", "q", seconds), 5) is None


async def test_a_blpop_timeout_below_a_doubles_range_times_out_as_redis_does(raw: Raw) -> None:
    """Redis reads BLPOP's timeout as a long double and rounds its milliseconds
    up: "1e-400" waits 1 ms and answers nil. Python's float("1e-400") is 0.0,
    which was taken for 0, "wait for ever": the BLPOP never answered
    (redis-cli BLPOP k 1e-400 hung)."""
    await raw.send("BLPOP", "q", "1e-400")
    assert await asyncio.wait_for(raw.reply_bytes(), 5) == b"*-1\r\n"


async def test_blpop_times_out_with_nil(r: redis.Redis) -> None:
    started = time.monotonic()
    assert await r.blpop(["q"], timeout=0.3) is None
    assert time.monotonic() - started >= 0.29


async def test_blpop_is_woken_by_an_lpush_from_another_connection(
    r: redis.Redis, other: redis.Redis, broker: Broker
) -> None:
    waiting = asyncio.create_task(r.blpop(["q"], timeout=20))
    await blocked(broker)
    assert not waiting.done()
    started = time.monotonic()
    await other.lpush("q", "wake")
    assert await asyncio.wait_for(waiting, 5) in ([b"q", b"wake"], (b"q", b"wake"))
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("BLPOP", "q", "0"), id="blpop"),
        pytest.param(("BLPOP", "q", "other", "0"), id="blpop-two-keys"),
        pytest.param(
            ("XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "STREAMS", "q", ">"), id="xreadgroup"
        ),
    ],
)
async def test_a_long_poll_waiting_forever_keeps_its_place_in_line_past_max_wait(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    """README (Order): long polls (claims with wait, BLPOP) are served in the
    order they came: the one that has waited longest takes the next job, as
    Redis serves its blocked clients. A BLPOP or XREADGROUP blocking for ever
    (or past MAX_WAIT, 60 s) waits in rounds of MAX_WAIT, and each round was
    a new engine pop or claim placed in the topic's line when the round
    began: after its first minute it went behind every long poll that came
    meanwhile, and an HTTP claim sent after it took the job (review of the
    RESP face, round 26). Each round keeps the command's place now.
    (commands.MAX_WAIT is cut to 1 s here so that this takes one second; the
    engine's own limit, which caps the HTTP claim, is left alone.)"""
    monkeypatch.setattr(commands, "MAX_WAIT", 1.0)
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    assert broker.redis is not None
    engine = broker.redis.engine
    rounds = 0  # long polls of "q" the command has begun

    def counted(take: Any) -> Any:
        async def counting(topic: str, worker_id: str, **kwargs: Any) -> Any:
            nonlocal rounds
            if topic == "q" and worker_id != "late" and kwargs.get("wait", 0) > 0:
                rounds += 1
            return await take(topic, worker_id, **kwargs)

        return counting

    monkeypatch.setattr(engine, "pop", counted(engine.pop))
    monkeypatch.setattr(engine, "claim", counted(engine.claim))
    first = connect(broker, protocol=2)
    async with aiohttp.ClientSession() as session:
        http = Http(session, broker.url)
        try:
            # The first to wait: a worker blocking for ever on q.
            blocking = asyncio.create_task(first.execute_command(*command))
            await until(lambda: broker.committer.waiting("q") == 1)
            # Then an HTTP long poll of 20 s (one round: it keeps its place).
            body = {"worker_id": "late", "wait": 20}
            claim = asyncio.create_task(http.call("POST", "/topics/q/claim", body))
            await until(lambda: broker.committer.waiting("q") == 2)
            # The command's first round ends; it waits again, still the oldest.
            await until(lambda: rounds == 2 and broker.committer.waiting("q") == 2)
            code, _ = await http.call("POST", "/topics/q/enqueue", {"payload": "job"})
            assert code == 201
            done, _ = await asyncio.wait(
                {blocking, claim}, timeout=10, return_when="FIRST_COMPLETED"
            )
            code, _ = await http.call("POST", "/topics/q/enqueue", {"payload": "second"})
            assert code == 201
            await asyncio.wait_for(asyncio.gather(blocking, claim), 5)
            assert blocking in done, "the HTTP claim that came later took the job"
            assert claim.result()[1]["job"]["payload"] == "second"
        finally:
            await first.aclose()


async def test_brpop_takes_the_first_key_in_order_that_has_a_job(r: redis.Redis) -> None:
    await r.rpush("b", "from-b")
    await r.rpush("c", "from-c")
    assert tuple(await r.brpop(["a", "b", "c"], timeout=1)) == (b"b", b"from-b")


async def test_blpop_on_several_keys_is_woken_by_any_and_leaves_the_others_alone(
    r: redis.Redis, other: redis.Redis, broker: Broker
) -> None:
    waiting = asyncio.create_task(r.blpop(["a", "b"], timeout=20))
    await blocked(broker)
    await other.rpush("b", "x")
    assert tuple(await asyncio.wait_for(waiting, 5)) == (b"b", b"x")
    await other.rpush("a", "y")
    assert await other.llen("a") == 1  # the cancelled wait on "a" claimed nothing
    assert await other.lpop("a") == b"y"


@pytest.mark.parametrize("name", ["BLPOP", "BRPOP"])
async def test_a_blpop_over_more_than_max_keys_is_refused_and_one_at_the_cap_works(
    start_broker: StartBroker, name: str
) -> None:
    """Each key of a BLPOP is a long poll of its own, reading a topic not yet
    created from the store once a second: one 1 MB request could name 85,000
    keys, 3,000 of them cost 12,000 store GETs over 2 s (review of the RESP
    face, round 25). Past MAX_KEYS it is refused, nothing done."""
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    r = connect(broker, protocol=2)
    keys = [f"k{i}" for i in range(commands.MAX_KEYS + 1)]
    try:
        await r.rpush(keys[0], "first")
        with pytest.raises(ResponseError, match=f"at most {commands.MAX_KEYS} keys"):
            await r.execute_command(name, *keys, "0.1")
        assert await r.llen(keys[0]) == 1  # nothing done
        assert await r.lpop(keys[0]) == b"first"
        await r.rpush(keys[-2], "last")
        got = await r.execute_command(name, *keys[:-1], "1")
        assert tuple(got) == (keys[-2].encode(), b"last")
        assert await r.execute_command(name, *keys[:-1], "0.1") is None
    finally:
        await r.aclose()


@pytest.mark.parametrize("behind", [0, QUEUED_FRAMES * 2], ids=["alone", "requests-behind"])
async def test_a_client_that_leaves_during_blpop_takes_no_job(
    broker: Broker, raw: Raw, other: redis.Redis, behind: int
) -> None:
    """With more requests behind the BLPOP than the connection queues too:
    reading goes on behind a blocking command, so the broker still sees the
    client leave (it stopped reading, and the BLPOP took a job for nobody)."""
    pings = b"".join(hiredis.pack_command(("PING",)) for _ in range(behind))
    await raw.write(hiredis.pack_command(("BLPOP", "q", "20")) + pings)
    await blocked(broker)
    await hang_up(broker, raw)
    await other.rpush("q", "kept")
    assert await other.lpop("q") == b"kept"


async def leave_while_completed(broker: Broker, store: FaultyStore, command: Any) -> None:
    """A client sends `command`, whose claim lands (the next write of the
    store's target), and leaves while the write completing it is held; then
    that write lands."""
    store.faults = ["ok", "held"]
    leaver = await Raw.open(port_of(broker))
    await leaver.send(*command)
    await store.holding.wait()
    await hang_up(broker, leaver)
    store.held.set()


BLPOP = hiredis.pack_command(("BLPOP", "q", "20"))


async def pop_being_written(
    start_broker: StartBroker, request: bytes = BLPOP, **settings: Any
) -> tuple[Broker, FaultyStore, Raw]:
    """A broker (with `settings`) whose topic q holds job j1 ("x"), and a
    client whose `request` (a BLPOP of q) is being written (held until
    store.gate is set)."""
    store = FaultyStore(MemStore())
    broker = await start_broker(store, redis_addr="127.0.0.1:0", **settings)
    async with aiohttp.ClientSession() as session:
        code, _ = await Http(session, broker.url).call(
            "POST", "/topics/q/enqueue", {"payload": "x", "id": "j1"}
        )
        assert code == 201
    store.gate = asyncio.Event()
    store.put_started.clear()
    client = await Raw.open(port_of(broker))
    await client.write(request)
    await store.put_started.wait()
    return broker, store, client


@pytest.mark.parametrize(
    "sent",
    [
        BLPOP,
        hiredis.pack_command(("LPOP", "q")),
        hiredis.pack_command(("RPUSH", "p", "y")) + hiredis.pack_command(("RPOP", "q")),
    ],
    ids=["blpop", "lpop", "rpush-rpop-pipelined"],
)
async def test_a_client_that_leaves_while_its_pop_commits_loses_no_job(
    start_broker: StartBroker, sent: bytes
) -> None:
    """The pop that takes the job is being written when the client hangs up:
    the job was never answered to anyone, so it is pending again, not done.
    An LPOP, which does not wait, is watched for its client leaving as a
    BLPOP is (it completed the job for nobody); a push beside it in a
    pipeline is not given up."""
    broker, store, leaver = await pop_being_written(start_broker, sent)
    [conn] = broker.redis.connections if broker.redis else []
    await leaver.close()
    await conn.hangup.wait()  # the broker saw the client go, the pop in flight
    store.gate.set()
    async with aiohttp.ClientSession() as session:
        http = Http(session, broker.url)
        await pending_again(http, "q")
        job = await http.job("q", "j1")
        assert (job["status"], job["attempts"]) == ("pending", 0)
        assert (await http.status("q"))["completed"] == 0
        if b"RPUSH" in sent:
            await pending_again(http, "p")
    staying = connect(broker)
    try:
        assert await staying.blpop(["q"], timeout=5) == (b"q", b"x")
    finally:
        await staying.aclose()


async def give_back_failing(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture, logged: str
) -> tuple[Broker, FaultyStore]:
    """A broker whose client left as its LPOP of job j1 (topic q) landed, its
    store failing every write since, past a commit's budget (0.5 s): the
    give-back has failed (it logged `logged`). Clearing store.faults brings
    the store back."""
    broker, store, client = await pop_being_written(
        start_broker, hiredis.pack_command(("LPOP", "q")), commit_budget=0.5
    )
    [conn] = broker.redis.connections if broker.redis else []
    await client.close()
    await conn.hangup.wait()  # the broker saw the client go, the pop in flight
    store.faults = ["ok"] + ["fail"] * 100_000  # the pop lands, then every write fails
    with caplog.at_level(logging.WARNING, "simplequeue.broker.resp.connection"):
        store.gate.set()
        await until(lambda: logged in caplog.text)
    return broker, store


async def test_a_pop_whose_give_back_fails_past_a_commits_budget_is_given_back_later(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The client leaves as its pop lands, and the store fails every write for
    longer than a commit's budget: the give-back was tried once, and the job
    stayed done for nobody (review of the RESP face, round 35). It is tried
    again while the pop's record is kept, and lands once the store is back."""
    monkeypatch.setattr(connection, "UNPOP_RETRY_FIRST", 0.05)
    broker, store = await give_back_failing(start_broker, caplog, "a pop of q")
    store.faults = []  # the store is back
    async with aiohttp.ClientSession() as session:
        http = Http(session, broker.url)
        await pending_again(http, "q")
        assert (await http.job("q", "j1"))["status"] == "pending"


def unpops_failing(monkeypatch: pytest.MonkeyPatch, owner: Broker) -> list[float]:
    """`owner`'s unpops fail (its store down) until the monotonic time its
    one item says (none to begin with): set it to start the outage."""
    down_until = [0.0]
    real_unpop = owner.engine.unpop

    async def unpop(*args: Any, **kwargs: Any) -> int:
        if time.monotonic() < down_until[0]:
            raise StoreUnavailable("injected: the store is down")
        given_back: int = await real_unpop(*args, **kwargs)
        return given_back

    monkeypatch.setattr(owner.engine, "unpop", unpop)
    return down_until


async def test_a_pop_passed_on_whose_give_back_fails_at_the_owner_is_given_back_later(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, the pop passed on to the topic's owner, whose store fails
    the give-back past UNDO_WITHIN (30 s; 0.5 s here, the outage 2 s): the
    Forwarder gave up, said "its jobs stay done", answered 0, and the
    connection's retry took that for done, the owner never asked again,
    though it kept the pop's record for 5 minutes (review of this round's
    changes). The owner is asked again while the connection tries."""
    monkeypatch.setattr(connection, "UNPOP_RETRY_FIRST", 0.05)
    monkeypatch.setattr(forwarding, "UNDO_WITHIN", 0.5)
    monkeypatch.setattr(forwarding, "UNDO_TRIES", 2)
    monkeypatch.setattr(forwarding, "UNDO_PAUSE", 0.05)
    brokers = await cluster(start_broker, MemStore(), 2, redis_addr="127.0.0.1:0")
    owner, other = owner_and_other(brokers, "t")
    down_until = unpops_failing(monkeypatch, owner)
    assert other.redis is not None
    real_pop = other.redis.engine.pop

    async def pop(*args: Any, **kwargs: Any) -> Any:
        popped = await real_pop(*args, **kwargs)
        down_until[0] = time.monotonic() + 2.0  # down for 2 s from the pop on
        return popped

    monkeypatch.setattr(other.redis.engine, "pop", pop)
    async with aiohttp.ClientSession() as session:
        http = Http(session, owner.url)
        code, _ = await http.call("POST", "/topics/t/enqueue", {"payload": "x", "id": "j1"})
        assert code == 201
        await reset_as_it_lands(other, http, monkeypatch, ("LPOP", "t"), "pop", "t")
        assert (await http.job("t", "j1"))["status"] == "pending"


def _give_backs() -> list[asyncio.Task[Any]]:
    """The RESP connections' give-backs running in the background."""
    return [
        task
        for task in background._running
        if not task.done() and getattr(task.get_coro(), "__qualname__", "") == "Connection._unpop"
    ]


async def test_a_give_back_of_a_connection_gone_before_the_stop_ends_with_the_stop(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A give-back tried again while the store fails went on after the broker
    stopped, against its closed committer ("broker is shutting down"), for up
    to 5 minutes, when its client had left before the stop: only connections
    still open were told the server stops (review of this round's changes).
    The server's own flag ends them all."""
    monkeypatch.setattr(connection, "UNPOP_RETRY_FIRST", 0.05)
    monkeypatch.setattr(connection, "UNPOP_RETRY_MAX", 0.2)
    broker, _ = await give_back_failing(start_broker, caplog, "could not be given back yet")
    await until(lambda: broker.redis is not None and not broker.redis.connections)
    [giving_back] = _give_backs()  # its connection ended; its give-back goes on
    await broker.stop()
    try:
        await asyncio.wait_for(asyncio.shield(giving_back), 5)
    finally:
        giving_back.cancel()


async def test_a_pop_whose_answer_the_owner_lost_is_undone_once_its_store_is_back(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pop passed on whose answer the owner gave too late (AmbiguousWrite to
    the client) is undone by the broker that passed it on: it gave up after
    UNDO_WITHIN (30 s; 0.5 s here, the owner's store down 2 s from the pop),
    "its jobs stay done", though the owner keeps the pop's record for 5
    minutes (review of this round's changes). It asks for as long."""
    monkeypatch.setattr(forwarding, "UNDO_WITHIN", 0.5)
    monkeypatch.setattr(forwarding, "UNDO_TRIES", 2)
    monkeypatch.setattr(forwarding, "UNDO_PAUSE", 0.05)
    monkeypatch.setattr(forwarding, "UNDO_PAUSE_MAX", 0.2)
    brokers = await cluster(
        start_broker, MemStore(), 2, redis_addr="127.0.0.1:0", forward_timeout=0.5
    )
    owner, other = owner_and_other(brokers, "t")
    down_until = unpops_failing(monkeypatch, owner)
    real_pop = owner.engine.pop

    async def pop(*args: Any, **kwargs: Any) -> Any:
        popped = await real_pop(*args, **kwargs)
        down_until[0] = time.monotonic() + 2.0  # down for 2 s from the pop on
        await asyncio.sleep(1.0)  # answered past forward_timeout: the answer is lost
        return popped

    monkeypatch.setattr(owner.engine, "pop", pop)
    async with aiohttp.ClientSession() as session:
        http = Http(session, owner.url)
        code, _ = await http.call("POST", "/topics/t/enqueue", {"payload": "x", "id": "j1"})
        assert code == 201
        client = await Raw.open(port_of(other))
        await client.send("LPOP", "t")
        reply = await client.reply_bytes()
        assert reply.startswith(b"-"), reply  # AmbiguousWrite: ask again
        await client.close()
        await pending_again(http, "t")  # once the owner's store is back
        assert (await http.job("t", "j1"))["status"] == "pending"


@pytest.mark.parametrize(
    ("sent", "landing"),
    [
        (("LPOP", "q"), "pop"),
        (("BLPOP", "q", "5"), "pop"),
        (("BLPOP", "other", "q", "5"), "complete"),
        (("XREADGROUP", "GROUP", "g", "c", "NOACK", "STREAMS", "q", ">"), "complete"),
        (("XREADGROUP", "GROUP", "streams", "c", "NOACK", "STREAMS", "q", ">"), "complete"),
        (("XREADGROUP", "GROUP", "g", "Streams", "NOACK", "STREAMS", "q", ">"), "complete"),
    ],
    ids=[
        "lpop-alone",
        "blpop-alone",
        "blpop-keys",
        "xreadgroup-noack",
        "group-named-streams",
        "consumer-named-streams",
    ],
)
async def test_a_pop_whose_client_resets_as_its_commit_lands_is_given_back(
    broker: Broker,
    http: Http,
    monkeypatch: pytest.MonkeyPatch,
    sent: tuple[str, ...],
    landing: str,
) -> None:
    """The client resets its connection (RST) just as its pop's commit lands:
    the broker saw it leave before the reply was handed to the transport,
    which dropped it (nobody reads), and the job stayed completed for nobody.
    A pop alone was given back only if its client left before the pop's
    task ended; the same pop pipelined beside a push was given back (review
    of the request edge). A lone pop is named and looked after as a group's.
    So is the completion of a BLPOP of several keys and of XREADGROUP NOACK
    (a claim, then a commit that completes it): it was not named, and stayed
    done for nobody (round 32's review, left alone until round 34); nor was
    NOACK seen after a group or consumer named "streams" (review of round
    34's change: options are read after GROUP g c)."""
    code, _ = await http.call("POST", "/topics/q/enqueue", {"payload": "x", "id": "j1"})
    assert code == 201
    await reset_as_it_lands(broker, http, monkeypatch, sent, landing, "q")


async def reset_as_it_lands(
    broker: Broker,
    http: Http,
    monkeypatch: pytest.MonkeyPatch,
    sent: tuple[str, ...],
    landing: str,
    topic: str,
) -> None:
    """A client sends `sent` to `broker` and resets its connection (RST) once
    the engine's `landing` ("pop" or "complete") landed with a job: job
    "j1" of `topic` (answered by `http`) is pending again, uncounted."""
    assert broker.redis is not None
    server = broker.redis
    real = getattr(server.engine, landing)
    client: socket.socket | None = None
    landed = asyncio.Event()

    async def land_then_reset(*args: Any, **kwargs: Any) -> list[Any]:
        jobs: list[Any] = await real(*args, **kwargs)
        try:
            if jobs and client is not None:  # the commit landed: the RST comes now
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                [conn] = server.connections
                await conn.left.wait()  # the broker's read loop saw it
        finally:
            landed.set()
        return jobs

    monkeypatch.setattr(server.engine, landing, land_then_reset)
    client = socket.create_connection(("127.0.0.1", port_of(broker)))
    client.sendall(hiredis.pack_command(sent))
    await asyncio.wait_for(landed.wait(), 10)
    await until(lambda: not server.connections)
    await pending_again(http, topic)
    job = await http.job(topic, "j1")
    assert (job["status"], job["attempts"]) == ("pending", 0)


@pytest.mark.parametrize(
    "sent",
    [("BLPOP", "other", "t", "5"), ("XREADGROUP", "GROUP", "g", "c", "NOACK", "STREAMS", "t", ">")],
    ids=["blpop-keys", "xreadgroup-noack"],
)
async def test_a_completion_passed_on_to_the_owner_is_given_back_on_a_reset(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch, sent: tuple[str, ...]
) -> None:
    """Two brokers: the client talks to the one that does not own the topic,
    which passes the claim and its completion on (Router.complete, under
    the attempt id the connection named). The client resets as the
    completion lands: the job is given back at the owner."""
    brokers = await cluster(start_broker, MemStore(), 2, redis_addr="127.0.0.1:0")
    owner, other = owner_and_other(brokers, "t")
    async with aiohttp.ClientSession() as session:
        http = Http(session, owner.url)
        code, _ = await http.call("POST", "/topics/t/enqueue", {"payload": "x", "id": "j1"})
        assert code == 201
        await reset_as_it_lands(other, http, monkeypatch, sent, "complete", "t")


async def test_a_broker_stopping_while_a_blpop_commits_gives_the_job_back(
    start_broker: StartBroker,
) -> None:
    """A stop cancels the BLPOP whose pop is being written, and the write
    lands as the committer closes: the pop's undo lands too, before the stop
    ends (it was refused as "shutting down": the job done for nobody)."""
    broker, store, client = await pop_being_written(start_broker)
    stopping = asyncio.create_task(broker.stop())
    assert broker.redis is not None
    server = broker.redis
    await until(lambda: not server.connections)  # the BLPOP was cancelled
    store.gate.set()
    await stopping
    assert await client.rest() == b""  # never handed the job
    await client.close()
    after = await start_broker(store.inner)
    async with aiohttp.ClientSession() as session:
        job = await Http(session, after.url).job("q", "j1")
    assert (job["status"], job["attempts"]) == ("pending", 0)


async def test_a_broker_stopping_while_an_lpop_commits_answers_it(
    start_broker: StartBroker,
) -> None:
    """A stop gives up blocking commands, not a pop in flight, which does not
    wait: it lands and is answered before the connection closes."""
    broker, store, client = await pop_being_written(
        start_broker, hiredis.pack_command(("LPOP", "q"))
    )
    stopping = asyncio.create_task(broker.stop())
    assert broker.redis is not None
    server = broker.redis
    await until(lambda: all(c.stopping for c in server.connections))
    store.gate.set()
    await stopping
    assert await client.rest() == b"$1\r\nx\r\n"
    await client.close()
    after = await start_broker(store.inner)
    async with aiohttp.ClientSession() as session:
        job = await Http(session, after.url).job("q", "j1")
    assert job["status"] == "completed"


@pytest.mark.parametrize(
    "command",
    [
        ("BLPOP", "a", "b", "20"),
        ("XREADGROUP", "GROUP", "g", "c", "NOACK", "BLOCK", "20000", "STREAMS", "a", "b", ">", ">"),
    ],
    ids=["blpop-keys", "xreadgroup-noack"],
)
async def test_a_client_that_leaves_while_its_claim_is_completed_loses_no_job(
    start_broker: StartBroker, command: tuple[str, ...]
) -> None:
    """On several keys, and for NOACK, a job is claimed, then completed in a
    second commit. The client hangs up during that one: never answered, the
    job is pending again, not done."""
    store = FaultyStore(MemStore(), target=keys.head("b"))
    broker = await start_broker(store, redis_addr="127.0.0.1:0")
    async with aiohttp.ClientSession() as session:
        http = Http(session, broker.url)
        code, _ = await http.call("POST", "/topics/b/enqueue", {"payload": {"n": 1}, "id": "j1"})
        assert code == 201
        await leave_while_completed(broker, store, command)
        await pending_again(http, "b")
        job = await http.job("b", "j1")
        assert (job["status"], job["attempts"]) == ("pending", 0)
        assert (await http.status("b"))["completed"] == 0


@pytest.mark.parametrize(
    "command",
    [("BLPOP", "a", "b", "20"), ("XREADGROUP", "GROUP", "g", "c", "NOACK", "STREAMS", "b", ">")],
    ids=["blpop-keys", "xreadgroup-noack"],
)
async def test_a_claim_whose_client_leaves_before_its_completion_commits_goes_back(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, http: Http, command: tuple[str, ...]
) -> None:
    """Claimed, then the client leaves while the completing commit waits its
    turn (not applied, so there is nothing to undo): the claim went to nobody
    and held the job for its whole lease, an attempt spent."""
    assert broker.redis is not None
    server = broker.redis
    waiting = asyncio.Event()

    async def queued(topic: str, jobs: list[dict[str, Any]], **named: Any) -> list[str]:
        waiting.set()
        await asyncio.Event().wait()  # behind a batch that never ends
        raise AssertionError("unreachable")

    code, _ = await http.call("POST", "/topics/b/enqueue", {"payload": {"n": 1}, "id": "j1"})
    assert code == 201
    monkeypatch.setattr(server.engine, "complete", queued)
    leaver = await Raw.open(port_of(broker))
    await leaver.send(*command)
    await waiting.wait()
    await hang_up(broker, leaver)
    await pending_again(http, "b")
    assert (await http.job("b", "j1"))["attempts"] == 0


async def test_xreadgroup_noack_on_several_streams_answers_one_so_a_hangup_loses_none(
    start_broker: StartBroker,
) -> None:
    """Streams completed one after another could not all be given back: the
    first completed and answered, a hangup during the next one's completion
    left it done for nobody. A NOACK reply holds the first stream in order
    with entries; the other streams' jobs stay pending."""
    store = FaultyStore(MemStore(), target=keys.head("a"))
    broker = await start_broker(store, redis_addr="127.0.0.1:0")
    read = ("XREADGROUP", "GROUP", "g", "c", "NOACK", "STREAMS", "a", "b", ">", ">")
    async with aiohttp.ClientSession() as session:
        http = Http(session, broker.url)
        for topic in ("a", "b", "a", "b"):
            code, _ = await http.call("POST", f"/topics/{topic}/enqueue", {"payload": {"t": topic}})
            assert code == 201
        r = connect(broker, protocol=2)
        try:
            [[stream, entries]] = await r.execute_command(*read)
        finally:
            await r.aclose()
        assert (stream, len(entries)) == (b"a", 2)
        b = await http.status("b")
        assert (b["pending"], b["claimed"]) == (2, 0)
        # The client leaves while a's completion is being written.
        for topic in ("a", "b"):
            await http.call("POST", f"/topics/{topic}/enqueue", {"payload": {"t": topic}})
        await leave_while_completed(broker, store, read)  # a's claim, then its completion
        await pending_again(http, "a")
        b = await http.status("b")
        assert (b["pending"], b["claimed"], b["completed"]) == (3, 0, 0)


async def _reply_size(client: Raw) -> int:
    """The bytes of the next whole reply, read in large chunks."""
    parser, size = hiredis.Reader(), 0
    while True:
        chunk = await asyncio.wait_for(client.reader.read(2**20), 30)
        assert chunk
        size += len(chunk)
        parser.feed(chunk)
        if parser.gets() is not False:
            return size


async def test_an_xreadgroup_of_many_streams_holds_no_more_than_a_claims_bytes(
    start_broker: StartBroker,
) -> None:
    """A claim's answer is bounded in bytes (Bounds.claim_bytes: "so that
    neither the answers nor the segments read for them outgrow the broker's
    memory, whatever count says"), but XREADGROUP claimed each of its streams
    in turn (up to MAX_KEYS, 100) and answered them all at once: one request
    held streams x claim_bytes, 100 x 16 MiB = 1.6 GiB with the defaults,
    far past OUTPUT_HIGH_WATER (64 MiB); here, with claim_bytes of 1 MiB (an
    8 MiB cache), 10 streams of 100 KB jobs answered 10.5 MiB at once (review
    of the RESP face). It claims no further stream once it holds
    claim_bytes: they stay pending for the next read."""
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0", cache_bytes=8 * 2**20)
    claim_bytes = broker.engine.claim_bytes
    streams = [f"s{i}" for i in range(10)]
    value = "v" * 100_000
    client = await Raw.open(port_of(broker))
    try:
        for stream in streams:
            for _ in range(12):
                assert isinstance(await client.call("XADD", stream, "*", "f", value), bytes)
        await client.send(
            "XREADGROUP", "GROUP", "g", "c", "COUNT", "1000", "STREAMS", *streams, *[">"] * 10
        )
        size = await _reply_size(client)
    finally:
        await client.close()
    assert size <= claim_bytes + 2 * len(value), (
        f"one XREADGROUP answered {size / 2**20:.1f} MiB at once "
        f"(a claim may answer {claim_bytes / 2**20:.1f} MiB)"
    )
    counts = [await broker.engine.status(s) for s in streams]
    assert 0 < counts[0]["claimed"] < 12
    assert [(c["pending"], c["claimed"]) for c in counts[1:]] == [(12, 0)] * 9


async def test_streams_that_win_a_blocked_xreadgroup_together_answer_a_claims_bytes(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blocked XREADGROUP's long polls that win together were all
    answered, each up to claim_bytes: 10 streams of 100 KB jobs, 10.5 MiB
    with claim_bytes of 1 MiB. Those first in key order are kept up to
    claim_bytes; the other streams' claims go back, uncounted."""
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0", cache_bytes=8 * 2**20)
    assert broker.redis is not None
    server = broker.redis
    claim_bytes = broker.engine.claim_bytes
    streams = [f"s{i}" for i in range(10)]
    value = "v" * 100_000
    claim, won, all_won = server.engine.claim, {}, asyncio.Event()

    async def all_win_at_once(topic: str, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("wait"):  # the look before blocking: nothing yet
            return await claim(topic, *args, **kwargs)
        await all_won.wait()
        return won[topic]

    monkeypatch.setattr(server.engine, "claim", all_win_at_once)
    client, pusher = await Raw.open(port_of(broker)), await Raw.open(port_of(broker))
    try:
        await client.send(
            "XREADGROUP", "GROUP", "g", "c", "BLOCK", "20000", "STREAMS", *streams, *[">"] * 10
        )
        await blocked(broker)
        for stream in streams:
            for _ in range(12):
                assert isinstance(await pusher.call("XADD", stream, "*", "f", value), bytes)
            won[stream] = await claim(stream, "c", count=1000)  # each a whole claim's bytes
        all_won.set()
        size = await _reply_size(client)
    finally:
        await client.close()
        await pusher.close()
    assert size <= claim_bytes + 2 * len(value), f"{size / 2**20:.1f} MiB answered at once"
    counts = [await broker.engine.status(s) for s in streams]
    assert 0 < counts[0]["claimed"] < 12
    assert [(c["pending"], c["claimed"]) for c in counts[1:]] == [(12, 0)] * 9


async def test_a_client_queuing_too_much_behind_a_blocking_command_is_closed(
    broker: Broker, raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "QUEUED_BYTES", 256 * 1024)
    await raw.send("BLPOP", "q", "20")
    await blocked(broker)
    echo = hiredis.pack_command(("ECHO", "x" * 1024))
    with contextlib.suppress(ConnectionError):
        for _ in range(400):  # 400 KiB
            await raw.write(echo)
    try:
        rest = await raw.rest()
    except ConnectionResetError:  # closed with our ECHOs unread: the kernel resets
        rest = b""
    assert rest == b""  # closed, the BLPOP unanswered
    await raw.close()


async def test_the_queue_behind_blocking_commands_is_capped_across_them(
    raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short BLPOPs one after another, each with less than the cap sent
    during it: what waits behind them all still counts."""
    monkeypatch.setattr(connection, "QUEUED_BYTES", 128 * 1024)
    waits = 12
    await raw.write(b"".join(hiredis.pack_command(("BLPOP", "q", "0.05")) for _ in range(waits)))
    echoes = hiredis.pack_command(("ECHO", "x" * 1024)) * 48  # ~58 KiB queued each time
    answered = 0
    with contextlib.suppress(ConnectionError, AssertionError):
        for _ in range(waits):
            await raw.write(echoes)
            await raw.reply_bytes()  # that BLPOP timed out (or the connection closed)
            answered += 1
    assert answered < waits
    await raw.close()


async def test_requests_queued_behind_a_command_are_bounded_by_their_bytes(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a command that neither pops nor blocks, reading stopped at
    QUEUED_FRAMES requests whatever their size: 128 of --max-body 1 MB each,
    besides the group running and its replies, held hundreds of MB for one
    connection (review of the RESP face, round 25). QUEUED_BYTES bounds
    them too, as it does behind a pop; all are answered once the command
    ends."""
    budget = 128 * 1024
    monkeypatch.setattr(connection, "QUEUED_BYTES", budget)
    queued = QueuedPeak(monkeypatch)
    store = FaultyStore(MemStore(), target="topics/p")
    broker = await start_broker(store, redis_addr="127.0.0.1:0")
    store.gate = asyncio.Event()
    client = await Raw.open(port_of(broker))
    await client.send("RPUSH", "p", "x")
    assert broker.redis is not None
    [conn] = broker.redis.connections
    await until(lambda: conn.busy)  # held by the store: the requests below queue
    value, n = "x" * 16 * 1024, 60  # some 1 MiB in all, fewer than QUEUED_FRAMES
    client.writer.write(hiredis.pack_command(("ECHO", value)) * n)  # no drain: it may stall
    [frames] = queued.made
    await until(lambda: not conn.room.is_set() or len(frames) == n)  # reading stopped, or all read
    assert queued.peak <= budget + 2 * connection.READ_CHUNK, f"{queued.peak} bytes queued"
    store.gate.set()
    echo = f"${len(value)}\r\n{value}\r\n".encode()
    got = await asyncio.wait_for(client.reader.readexactly(4 + len(echo) * n), 10)
    assert got == b":1\r\n" + echo * n
    await client.close()


async def test_a_long_pipeline_of_pops_is_read_at_its_pace_not_closed(
    raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading goes on during a pop, to see its client leave; but a pop ends
    soon: past the cap a blocking command's client is closed at, reading
    waits for the pops to be taken, as behind any other command."""
    monkeypatch.setattr(connection, "QUEUED_BYTES", 16 * 1024)
    n = 2000  # some 280 KiB of requests queued
    await raw.write(hiredis.pack_command(("LPOP", "q")) * n)
    assert await asyncio.wait_for(raw.reader.readexactly(5 * n), 10) == b"$-1\r\n" * n
    assert await raw.call("PING") == b"PONG"


# --- streams ---------------------------------------------------------------------------


async def test_xadd_enqueues_the_object_of_the_fields(r: redis.Redis, http: Http) -> None:
    job_id = (await r.xadd("s", {"item": "book", "qty": "2"})).decode()
    job = await http.job("s", job_id)
    assert (job["status"], job["payload"]) == ("pending", {"item": "book", "qty": "2"})


async def test_xadd_with_an_explicit_id_enqueues_once(r: redis.Redis) -> None:
    assert await r.xadd("s", {"f": "1"}, id="order-17") == b"order-17"
    assert await r.xadd("s", {"f": "2"}, id="order-17") == b"order-17"
    assert await r.xlen("s") == 1


async def test_xadd_trimming_options_are_refused(r: redis.Redis) -> None:
    with pytest.raises(ResponseError, match="MAXLEN is not supported"):
        await r.xadd("s", {"f": "v"}, maxlen=10)


async def test_xreadgroup_claims_with_the_broker_lease_and_answers_the_fields(
    r: redis.Redis, http: Http
) -> None:
    job_id = await r.xadd("s", {"item": "book"})
    await r.xgroup_create("s", "g", id="0", mkstream=True)
    before = time.time()
    got = await r.xreadgroup("g", "consumer-1", {"s": ">"}, count=10)
    assert got == [[b"s", [(job_id, {b"item": b"book"})]]]
    job = await http.job("s", job_id.decode())
    assert (job["status"], job["claimed_by"]) == ("claimed", "consumer-1")
    assert before + 29 < job["lease_expires_at"] < time.time() + 31


async def test_xreadgroup_with_nothing_to_read_answers_empty(r: redis.Redis) -> None:
    assert await r.xreadgroup("g", "c", {"s": ">"}) == []
    assert await r.xreadgroup("g", "c", {"s": ">"}, block=50) == []


@pytest.mark.parametrize("consumer", ["bad\nname\x00", "", "c" * 300, "c" * 500_000])
async def test_xreadgroup_refuses_a_consumer_name_http_refuses_as_a_worker_id(
    r: redis.Redis, http: Http, broker: Broker, consumer: str
) -> None:
    """The consumer name became every claim's worker id unchecked: control
    characters in claimed_by, and a 500 KB name copied into each of 100
    lease records made one batch write 50 MB (SPEC 4.1: 256 KB plus its own
    payloads)."""
    await http.call("POST", "/topics/s/enqueue", {"jobs": [{"payload": i} for i in range(100)]})
    assert (await http.call("POST", "/topics/s/claim", {"worker_id": consumer}))[0] == 400
    with pytest.raises(ResponseError, match="consumer names"):
        await r.execute_command(
            "XREADGROUP", "GROUP", "g", consumer, "COUNT", "100", "STREAMS", "s", ">"
        )
    assert (await http.status("s"))["claimed"] == 0


async def test_an_xreadgroup_over_more_than_max_keys_streams_is_refused_and_one_at_the_cap_works(
    start_broker: StartBroker,
) -> None:
    """The long poll per key of BLPOP, through XREADGROUP ... STREAMS k0 ... kN
    (review of the RESP face, round 25): past MAX_KEYS streams it is
    refused, nothing done."""
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    r = connect(broker, protocol=2)
    streams = {f"s{i}": ">" for i in range(commands.MAX_KEYS + 1)}
    try:
        await r.xadd("s0", {"n": "0"})
        with pytest.raises(ResponseError, match=f"at most {commands.MAX_KEYS} streams"):
            await r.xreadgroup("g", "c", streams, block=100)
        assert await r.llen("s0") == 1  # nothing done
        await r.lpop("s0")
        del streams[f"s{commands.MAX_KEYS}"]
        job_id = await r.xadd(f"s{commands.MAX_KEYS - 1}", {"n": "1"})
        got = await r.xreadgroup("g", "c", streams, block=1000)
        assert got == [[f"s{commands.MAX_KEYS - 1}".encode(), [(job_id, {b"n": b"1"})]]]
        assert await r.xreadgroup("g", "c", streams, block=100) == []
    finally:
        await r.aclose()


async def test_xreadgroup_count_caps_the_claims(r: redis.Redis) -> None:
    for i in range(5):
        await r.xadd("s", {"n": str(i)})
    got = await r.xreadgroup("g", "c", {"s": ">"}, count=2)
    assert [fields[b"n"] for _, fields in got[0][1]] == [b"0", b"1"]
    assert await r.llen("s") == 3


async def test_xreadgroup_block_is_woken_by_an_xadd(
    r: redis.Redis, other: redis.Redis, broker: Broker
) -> None:
    waiting = asyncio.create_task(r.xreadgroup("g", "c", {"s": ">"}, count=1, block=20_000))
    await blocked(broker)
    assert not waiting.done()
    started = time.monotonic()
    job_id = await other.xadd("s", {"wake": "up"})
    assert await asyncio.wait_for(waiting, 5) == [[b"s", [(job_id, {b"wake": b"up"})]]]
    assert time.monotonic() - started < 2


async def test_xreadgroup_reads_a_payload_that_is_no_object_as_field_payload(
    r: redis.Redis, http: Http
) -> None:
    await r.rpush("s", "plain")
    await http.call("POST", "/topics/s/enqueue", {"payload": [1, 2]})
    got = await r.xreadgroup("g", "c", {"s": ">"})
    assert [fields for _, fields in got[0][1]] == [{b"payload": b"plain"}, {b"payload": b"[1,2]"}]


async def test_xreadgroup_only_reads_new_entries(r: redis.Redis) -> None:
    with pytest.raises(ResponseError, match="only the '>' id is supported"):
        await r.xreadgroup("g", "c", {"s": "0"})


async def test_xack_completes_the_claim_once(r: redis.Redis, http: Http) -> None:
    job_id = await r.xadd("s", {"f": "v"})
    await r.xreadgroup("g", "c", {"s": ">"})
    assert await r.xack("s", "g", job_id) == 1
    assert await r.xack("s", "g", job_id) == 0
    assert await r.xack("s", "g", "no-such-id") == 0
    assert (await http.job("s", job_id.decode()))["status"] == "completed"


async def test_xack_carries_the_lease_token_so_a_claim_that_moved_on_is_not_acked(
    start_broker: StartBroker,
) -> None:
    broker = await start_broker(
        MemStore(),
        redis_addr="127.0.0.1:0",
        policy=Policy(default_lease=0.3),
    )
    first, second = connect(broker, single_connection_client=True), connect(broker)
    try:
        job_id = await first.xadd("s", {"f": "v"})
        assert await first.xreadgroup("g", "slow", {"s": ">"})
        # The lease runs out; the job goes to another consumer.
        got = await second.xreadgroup("g", "fast", {"s": ">"}, block=5000)
        assert got[0][1][0][0] == job_id
        assert await first.xack("s", "g", job_id) == 0  # its token is stale
        assert await second.xack("s", "g", job_id) == 1
    finally:
        await first.aclose()
        await second.aclose()


async def test_an_xack_sent_again_for_a_claim_that_moved_on_counts_0_again(
    start_broker: StartBroker,
) -> None:
    """The token of a read was dropped after its first XACK whatever came of
    it: an XACK refused (the claim had gone to another consumer) and sent
    again went without a token, and completed the other consumer's claim
    (answering 1; that consumer's own XACK then counted 0). A token is
    kept until its ack succeeds."""
    broker = await start_broker(
        MemStore(), redis_addr="127.0.0.1:0", policy=Policy(default_lease=0.3)
    )
    first, second = connect(broker, single_connection_client=True), connect(broker)
    try:
        job_id = await first.xadd("s", {"f": "v"})
        assert await first.xreadgroup("g", "slow", {"s": ">"})
        # The lease runs out; the job goes to another consumer.
        got = await second.xreadgroup("g", "fast", {"s": ">"}, block=5000)
        assert got[0][1][0][0] == job_id
        assert await first.xack("s", "g", job_id) == 0  # its token is stale
        assert await first.xack("s", "g", job_id) == 0, "completed the fast consumer's claim"
        assert await second.xack("s", "g", job_id) == 1
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_claim_read_again_on_the_same_connection_keeps_its_token_as_the_newest(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens are dropped oldest read first past TOKENS_KEPT. A job read again
    on the same connection (its lease ran out and it came back to this
    consumer) had its token replaced in place, keeping its first read's
    place: it was dropped as the oldest one read after, and its XACK counted
    0 though this connection held its claim, read one read before; the job
    ran again once its lease ran out. (TOKENS_KEPT is cut to 3 here.)"""
    monkeypatch.setattr(reads, "TOKENS_KEPT", 3)
    broker = await start_broker(
        MemStore(), redis_addr="127.0.0.1:0", policy=Policy(default_lease=0.3)
    )
    r = connect(broker, protocol=2, single_connection_client=True)
    try:
        job_id = (await r.xadd("s", {"n": "job"})).decode()
        assert (await r.xreadgroup("g", "c", {"s": ">"}, count=1))[0][1][0][0].decode() == job_id
        for topic in ("o1", "o2"):  # two more reads, on topics of their own
            await r.xadd(topic, {"n": topic})
            assert await r.xreadgroup("g", "c", {topic: ">"}, count=1)
        # Its lease runs out; the same consumer reads it again (a new claim).
        again = await r.xreadgroup("g", "c", {"s": ">"}, count=1, block=10_000)
        assert again[0][1][0][0].decode() == job_id
        await r.xadd("o3", {"n": "o3"})
        assert await r.xreadgroup("g", "c", {"o3": ">"}, count=1)  # one read after it
        assert await r.xack("s", "g", job_id) == 1, "the claim read one read ago was not acked"
    finally:
        await r.aclose()


async def test_xack_of_a_claim_whose_token_the_connection_forgot_counts_0(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection keeps the tokens of its last TOKENS_KEPT (10,000) reads
    and dropped the oldest silently: a consumer that read one entry, then
    10,000 more, acked the first without its token, and its late XACK
    completed the claim another consumer held by then (answering 1; that
    consumer's own XACK then counted 0; review of the RESP face, round 26).
    A read whose token was dropped now counts 0. (TOKENS_KEPT is cut to 10
    here: the same with 10 reads, not 10,000.)"""
    monkeypatch.setattr(reads, "TOKENS_KEPT", 10)
    broker = await start_broker(
        MemStore(), redis_addr="127.0.0.1:0", policy=Policy(default_lease=1.0)
    )
    first = connect(broker, protocol=2, single_connection_client=True)
    second = connect(broker, protocol=2)
    try:
        job_id = (await first.xadd("s", {"n": "first"})).decode()
        read = await first.xreadgroup("g", "slow", {"s": ">"}, count=1)
        assert read[0][1][0][0].decode() == job_id
        await first.rpush("s", *(str(i) for i in range(10)))
        got = await first.xreadgroup("g", "slow", {"s": ">"}, count=10)
        later = [entry[0] for entry in got[0][1]]
        assert len(later) == 10
        assert await first.xack("s", "g", *later) == 10  # every later one is done
        # The first one's lease runs out; it goes to another consumer.
        got = await second.xreadgroup("g", "fast", {"s": ">"}, block=10_000)
        assert got[0][1][0][0].decode() == job_id
        assert await first.xack("s", "g", job_id) == 0, "completed the fast consumer's claim"
        assert await second.xack("s", "g", job_id) == 1
    finally:
        await first.aclose()
        await second.aclose()


async def test_past_forgotten_kept_an_xack_without_a_token_counts_0_on_that_connection(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reads whose tokens a connection dropped are told apart up to
    FORGOTTEN_KEPT of them; past that, that connection cannot tell one from
    an id it never read, and an XACK of any id it holds no token for counts
    0. Until then, an id read on another connection is acked as Redis does,
    whoever holds it."""
    monkeypatch.setattr(reads, "TOKENS_KEPT", 2)
    monkeypatch.setattr(reads, "FORGOTTEN_KEPT", 3)
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    reader = connect(broker, protocol=2, single_connection_client=True)
    other = connect(broker, protocol=2, single_connection_client=True)
    try:

        async def read_elsewhere() -> bytes:
            await other.xadd("elsewhere", {"n": "x"})
            got = await other.xreadgroup("g", "c", {"elsewhere": ">"}, count=1)
            return bytes(got[0][1][0][0])

        await reader.rpush("s", *(str(i) for i in range(5)))
        assert len((await reader.xreadgroup("g", "c", {"s": ">"}, count=5))[0][1]) == 5
        # 3 tokens dropped, as many as are told apart: another's id is acked.
        assert await reader.xack("elsewhere", "g", await read_elsewhere()) == 1
        await reader.rpush("s", "5")
        assert await reader.xreadgroup("g", "c", {"s": ">"}, count=1)
        # 4 dropped: past the bound, no id without a token is acked here ...
        unacked = await read_elsewhere()
        assert await reader.xack("elsewhere", "g", unacked) == 0
        assert await other.xack("elsewhere", "g", unacked) == 1  # ... its reader acks it
    finally:
        await reader.aclose()
        await other.aclose()


def session_of(broker: Broker, client_id: int) -> commands.Session:
    """The Session of the connection CLIENT ID calls `client_id`."""
    assert broker.redis is not None
    (conn,) = [c for c in broker.redis.connections if c.id == client_id]
    return conn.session


async def test_stream_read_tokens_are_bounded_across_connections_not_only_per_connection(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each connection kept the tokens of up to TOKENS_KEPT (10,000) reads not
    acked, and the hashes of up to FORGOTTEN_KEPT (50,000) more, for reads whose
    leases ran out long ago: 7.5 MB a connection full with the SDK's ids, and
    nothing bounded them across connections (max_clients 10,000: up to 75 GB;
    1,000 consumers whose failed jobs are never acked, 4.6-7.5 GB; review of
    memory). All of a listener's connections now hold READS_BYTES at most, cut
    to 200 KB here: 4 connections of 1,000 reads each (at least 90 B a token,
    measured) would hold over 360 KB."""
    monkeypatch.setattr(reads, "READS_BYTES", 200_000)
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    clients = [connect(broker, protocol=2, single_connection_client=True) for _ in range(4)]
    try:
        for start in range(0, 4000, 1000):
            await clients[0].rpush("s", *(str(i) for i in range(start, start + 1000)))
        sessions = [session_of(broker, await c.client_id()) for c in clients]
        tracemalloc.start()
        try:
            for client in clients:
                got = await client.xreadgroup("g", "c", {"s": ">"}, count=1000)
                assert len(got[0][1]) == 1000
            del got
            gc.collect()
            # What they hold: what letting go of them gives back.
            before = tracemalloc.get_traced_memory()[0]
            for session in sessions:
                session.reads.close()
            gc.collect()
            held = before - tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    finally:
        for client in clients:
            await client.aclose()
    assert 0 < held <= reads.READS_BYTES, f"4 connections' reads held {held} B"


def _deep_size_of_reads(held: reads.Reads) -> int:
    """What one connection's Reads holds of its reads, object by object (each
    object once): its tables, the tokens' keys (tuple, topic, job id) and
    values (tuple, token, float)."""
    seen: set[int] = set()

    def size(obj: object) -> int:
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return sys.getsizeof(obj)

    total = sum(size(table) for table in vars(held).values() if isinstance(table, dict | set))
    for key, value in held.tokens.items():
        total += sum(map(size, (key, *key, value, *value)))
    return total


@pytest.mark.parametrize("topics", [1, 300], ids=["one-topic", "a-topic-each"])
async def test_the_reads_budget_counts_what_a_read_holds_with_a_long_topic_name(
    start_broker: StartBroker, topics: int
) -> None:
    """READ_BYTES counted a token's objects but not its topic's name: each
    XREADGROUP decodes its keys anew, so every read of one job (COUNT 1, as
    workers read) kept a str of its own for the topic, 177 bytes for a
    128-character name: 1,000 reads held 512,168 bytes, 341,168 counted
    (1.5x; 300 reads of a topic each, 1.51x), and READS_BYTES held that much
    more. Reads of a topic now share one str for its name, counted once while
    any of them is held."""
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    names = [f"{i:04d}".rjust(128, "t") for i in range(topics)]  # as long as names go
    jobs = 1_000 if topics == 1 else topics
    r = connect(broker, protocol=2, single_connection_client=True)
    try:
        pipe = r.pipeline(transaction=False)
        for i in range(jobs):
            pipe.xadd(names[i % topics], {"n": str(i)})
        await pipe.execute()
        pipe = r.pipeline(transaction=False)
        for i in range(jobs):
            pipe.xreadgroup("g", "c", {names[i % topics]: ">"}, count=1)
        assert all(await pipe.execute())
        held = session_of(broker, await r.client_id()).reads
        assert len(held.tokens) == jobs
        size = _deep_size_of_reads(held)
    finally:
        await r.aclose()
    assert size <= held.held <= 1.1 * size, (
        f"{jobs} reads of one job each on {topics} 128-character topics hold {size} "
        f"bytes, the budget counts {held.held} ({size / held.held:.2f}x)"
    )


async def test_the_token_of_a_read_whose_lease_ran_out_long_ago_is_dropped_for_its_hash(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token was kept until its XACK succeeded or TOKENS_KEPT later reads,
    however long ago its lease ran out (a consumer whose failed jobs are never
    acked kept them all). Once it ran out LEASE_MARGIN ago (cut to 0 here) the
    claim was reaped and the token can ack nothing: only the read's hash is
    kept, and its XACK still counts 0 while another reader holds the job."""
    monkeypatch.setattr(reads, "LEASE_MARGIN", 0.0)
    broker = await start_broker(
        MemStore(), redis_addr="127.0.0.1:0", policy=Policy(default_lease=0.3)
    )
    first, second = connect(broker, single_connection_client=True), connect(broker)
    try:
        job_id = (await first.xadd("s", {"f": "v"})).decode()
        assert await first.xreadgroup("g", "slow", {"s": ">"})
        session = session_of(broker, await first.client_id())
        assert session.reads.token(("s", job_id)) is not None
        # The lease runs out; the job goes to another consumer.
        got = await second.xreadgroup("g", "fast", {"s": ">"}, block=5000)
        assert got[0][1][0][0].decode() == job_id
        # The token is void a lease after its read was answered, the reap comes
        # a lease after the claim was stamped, a little before: on a loaded
        # machine the next read could come between (a suite beside a campaign).
        [(_, void_at)] = session.reads.tokens.values()
        await asyncio.sleep(max(0.0, void_at - time.monotonic()) + 0.01)
        await first.xadd("other", {"f": "v"})
        assert await first.xreadgroup("g", "slow", {"other": ">"})  # the next read
        assert session.reads.token(("s", job_id)) is None, "the void token is still kept"
        assert session.reads.forgot(("s", job_id))
        assert await first.xack("s", "g", job_id) == 0, "completed the fast consumer's claim"
        assert await second.xack("s", "g", job_id) == 1
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_broker_whose_wall_clock_is_ahead_keeps_its_reads_tokens(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token is void LEASE_MARGIN past its lease's end, timed on this broker's
    monotonic clock from the read: timed by its wall clock against the owner's
    lease_expires_at, a broker an hour ahead voided every token at the next
    read, and each XACK counted 0 (every job ran again)."""
    broker = await start_broker(
        MemStore(), redis_addr="127.0.0.1:0", policy=Policy(default_lease=30)
    )
    real = time.time
    ahead = types.SimpleNamespace(time=lambda: real() + 3600, monotonic=time.monotonic)
    monkeypatch.setattr(reads, "time", ahead)  # the reads' clocks only
    client = connect(broker, single_connection_client=True)
    try:
        job_id = (await client.xadd("s", {"f": "v"})).decode()
        assert await client.xreadgroup("g", "c", {"s": ">"})
        await client.xadd("other", {"f": "v"})
        assert await client.xreadgroup("g", "c", {"other": ">"})  # the next read
        assert await client.xack("s", "g", job_id) == 1
    finally:
        await client.aclose()


async def test_xack_of_a_read_whose_token_the_listener_bound_dropped_counts_0(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past READS_BYTES (cut here to about 20 tokens), the connection holding
    the most drops its oldest tokens, and from then on acks no id it holds no
    token for: its late XACK of such a read counts 0, and does not complete
    the claim another consumer holds by then. The others keep theirs."""
    monkeypatch.setattr(reads, "READS_BYTES", 8_000)
    broker = await start_broker(
        MemStore(), redis_addr="127.0.0.1:0", policy=Policy(default_lease=1.0)
    )
    first = connect(broker, protocol=2, single_connection_client=True)
    second = connect(broker, protocol=2)
    modest = connect(broker, protocol=2, single_connection_client=True)
    try:
        job_id = (await first.xadd("s", {"n": "first"})).decode()
        assert (await first.xreadgroup("g", "slow", {"s": ">"}))[0][1][0][0].decode() == job_id
        kept = (await modest.xadd("t", {"n": "kept"})).decode()
        assert await modest.xreadgroup("g", "modest", {"t": ">"})
        await first.rpush("more", *(str(i) for i in range(30)))
        assert len((await first.xreadgroup("g", "slow", {"more": ">"}))[0][1]) == 30
        session = session_of(broker, await first.client_id())
        assert session.reads.token(("s", job_id)) is None, "no bound took the oldest token"
        assert await modest.xack("t", "g", kept) == 1  # it took from the one holding the most
        # The first one's lease runs out; it goes to another consumer.
        got = await second.xreadgroup("g", "fast", {"s": ">"}, block=10_000)
        assert got[0][1][0][0].decode() == job_id
        assert await first.xack("s", "g", job_id) == 0, "completed the fast consumer's claim"
        assert await second.xack("s", "g", job_id) == 1
    finally:
        await first.aclose()
        await second.aclose()
        await modest.aclose()


async def test_xreadgroup_noack_completes_at_once(r: redis.Redis, http: Http) -> None:
    job_id = await r.xadd("s", {"f": "v"})
    got = await r.xreadgroup("g", "c", {"s": ">"}, noack=True)
    assert got[0][1][0][0] == job_id
    assert (await http.job("s", job_id.decode()))["status"] == "completed"


async def test_xlen_and_xinfo_count_entries_not_yet_acknowledged(r: redis.Redis) -> None:
    for i in range(3):
        await r.xadd("s", {"n": str(i)})
    read = await r.xreadgroup("g", "c", {"s": ">"}, count=2)
    await r.xack("s", "g", read[0][1][0][0])
    assert await r.xlen("s") == 2
    info = await r.xinfo_stream("s")
    assert (info["length"], info["groups"], info["entries-added"]) == (2, 1, 3)
    assert info["first-entry"] is None and info["last-entry"] is None


# --- both wires ------------------------------------------------------------------------


async def test_jobs_pushed_over_resp_are_claimed_and_acked_over_http(
    r: redis.Redis, http: Http
) -> None:
    await r.rpush("q", "from-redis")
    job_id = (await r.xadd("q", {"k": "v"})).decode()
    code, body = await http.call("POST", "/topics/q/claim", {"worker_id": "w", "count": 2})
    assert code == 200
    assert [j["payload"] for j in body["jobs"]] == ["from-redis", {"k": "v"}]
    assert body["jobs"][1]["id"] == job_id
    for job in body["jobs"]:
        ack = {"job_id": job["id"], "lease_token": job["lease_token"]}
        assert (await http.call("POST", "/topics/q/ack", ack))[0] == 200


async def test_jobs_enqueued_over_http_are_read_and_acked_over_resp(
    r: redis.Redis, http: Http
) -> None:
    code, body = await http.call("POST", "/topics/q/enqueue", {"payload": {"item": "book"}})
    assert code == 201
    got = await r.xreadgroup("g", "c", {"q": ">"})
    assert got == [[b"q", [(body["id"].encode(), {b"item": b"book"})]]]
    assert await r.xack("q", "g", body["id"]) == 1
    assert (await http.job("q", body["id"]))["status"] == "completed"


# --- pipelining and concurrency --------------------------------------------------------


async def test_a_pipeline_is_answered_in_order(r: redis.Redis) -> None:
    async with r.pipeline(transaction=False) as pipe:
        for i in range(100):
            pipe.rpush("q", str(i))
        pipe.llen("q")
        pipe.lpop("q", 3)
        pipe.ping()
        answers = await pipe.execute()
    assert answers[:100] == list(range(1, 101))
    assert answers[100:] == [100, [b"0", b"1", b"2"], True]


async def test_requests_split_anyhow_across_writes_are_all_answered(raw: Raw) -> None:
    stream = b"".join(hiredis.pack_command(("RPUSH", "q", f"v{i}")) for i in range(20))
    stream += b"\r\n" + hiredis.pack_command(("ECHO", "end"))  # as redis-cli --pipe ends
    for i in range(0, len(stream), 7):
        await raw.write(stream[i : i + 7])
    expected = b"".join(b":%d\r\n" % n for n in range(1, 21)) + b"$3\r\nend\r\n"
    got = b""
    while len(got) < len(expected):
        got += await asyncio.wait_for(raw.reader.read(4096), 10)
    assert got == expected


async def test_many_concurrent_connections(broker: Broker) -> None:
    clients = [connect(broker, single_connection_client=True) for _ in range(40)]
    try:
        await asyncio.gather(*(c.rpush("q", f"{i}-a", f"{i}-b") for i, c in enumerate(clients)))
        assert await clients[0].llen("q") == 80
        popped = await asyncio.gather(*(c.lpop("q", 2) for c in clients))
        values = [v for pair in popped for v in pair]
        assert sorted(values) == sorted(f"{i}-{s}".encode() for i in range(40) for s in "ab")
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


# --- bad bytes -------------------------------------------------------------------------


async def test_garbage_closes_that_connection_while_another_keeps_working(
    broker: Broker, r: redis.Redis, other: redis.Redis
) -> None:
    waiting = asyncio.create_task(r.blpop(["q"], timeout=20))
    await blocked(broker)
    garbage = await Raw.open(port_of(broker))
    await garbage.write(b"\x00\xff\xfe GET / HTTP/1.1\r\n\r\n")
    reply = await garbage.rest()
    assert reply.startswith(b"-ERR Protocol error") and reply.endswith(b"\r\n")
    await garbage.close()
    await other.rpush("q", "still-served")
    assert tuple(await asyncio.wait_for(waiting, 5)) == (b"q", b"still-served")
    assert await other.ping() is True


@pytest.mark.parametrize(
    "frame",
    [
        b"*1\r\n:5\r\n",  # an integer where a bulk string belongs
        b"*1\r\n*1\r\n$4\r\nPING\r\n",  # nested arrays
        b"*1\r\n$4\r\nPINGxx\r\n",  # a bulk string longer than it said
        b"*-5\r\n",
        b"+PING\r\n",
    ],
    ids=["integer", "nested", "bad-length", "negative-count", "simple-string"],
)
async def test_malformed_frames_are_answered_with_an_error_and_closed(
    raw: Raw, r: redis.Redis, frame: bytes
) -> None:
    await raw.write(frame)
    assert (await raw.rest()).startswith(b"-ERR Protocol error")
    assert await r.ping() is True


async def test_an_oversized_request_is_refused_and_nothing_is_enqueued(
    start_broker: StartBroker,
) -> None:
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0", max_body=4096)
    conn = await Raw.open(port_of(broker))
    await conn.write(hiredis.pack_command(("RPUSH", "q", "x" * 10_000)))
    assert (await conn.rest()).startswith(b"-ERR Protocol error: request larger than 4096")
    await conn.close()
    announced = await Raw.open(port_of(broker))  # a length far past the limit: refused at once
    await announced.write(b"*3\r\n$5\r\nRPUSH\r\n$1\r\nq\r\n$999999999\r\n")
    assert (await announced.rest()).startswith(b"-ERR Protocol error: request larger than")
    await announced.close()
    client = connect(broker)
    assert await client.llen("q") == 0
    await client.aclose()


async def test_requests_before_a_malformed_one_in_the_same_read_are_run_and_answered(
    raw: Raw, r: redis.Redis
) -> None:
    """They were dropped with the error: whether an RPUSH ran depended on how
    TCP cut the bytes. Redis runs them, then answers the error."""
    await raw.write(hiredis.pack_command(("RPUSH", "q", "x")) + b"PING\r\nGARBAGE\r\n")
    rest = await raw.rest()
    assert rest.startswith(b":1\r\n") and b"-ERR Protocol error" in rest, rest
    assert await r.llen("q") == 1


async def test_a_header_announcing_billions_of_elements_is_refused_and_the_connection_closed(
    raw: Raw, broker: Broker
) -> None:
    """Before any AUTH: hiredis tried to make a list of 4e9 elements and raised
    MemoryError, which killed the connection's reader unseen: no answer, and
    the connection held open for ever, even after the client left."""
    await raw.write(b"*4000000000\r\n")
    assert (await raw.rest()).startswith(b"-ERR Protocol error: request larger than")
    client = connect(broker)
    assert await client.ping()
    await client.aclose()


@pytest.mark.parametrize("cut", [False, True], ids=["one-read", "header-cut-short"])
async def test_a_header_announcing_millions_of_elements_after_a_request_is_refused(
    raw: Raw, cut: bool
) -> None:
    """Only a header the parser had not been given yet was checked: one that
    came in the same read as a request before it, or whose digits came in two
    reads, reached hiredis, which made room for 400 million elements (3.2 GB
    of address space) and waited for them, the connection held open."""
    header = b"*400000000\r\n"
    await raw.write(hiredis.pack_command(("PING",)) + (header[:5] if cut else header))
    assert await raw.reply_bytes() == b"+PONG\r\n"
    if cut:
        await raw.write(header[5:])
    assert (await raw.rest()).startswith(b"-ERR Protocol error: request larger than")


@pytest.mark.parametrize("kind", [b"*", b"%", b"~", b">"], ids=["array", "map", "set", "push"])
def test_a_nested_header_announcing_millions_of_elements_allocates_nothing(kind: bytes) -> None:
    """`*1\\r\\n*200000000\\r\\n`: only a request's own header was checked;
    hiredis made a list for the nested one's 200 million elements (1.6 GB of
    address space per connection, held while it waited for them). A request
    holds bulk strings only: any other element is refused at its first byte."""
    requests = Requests(1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(RespError, match="expected an array of bulk strings"):
            requests.feed(b"*1\r\n" + kind + b"200000000\r\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"{peak / 1e9:.1f} GB allocated for a 17-byte request"


class _MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2: ten size_t counts."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _malloced() -> int:
    """Bytes malloc has handed out and not had back (glibc's mallinfo2): what
    hiredis holds, which tracemalloc does not see."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        pytest.skip("no mallinfo2 (glibc 2.33 or later) to count what hiredis holds")
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


async def test_a_connection_idle_after_a_large_request_holds_nothing_of_it(
    start_broker: StartBroker,
) -> None:
    """A client that sent one 1 MB request (an LPUSH of a large payload, or
    an unauthenticated client's refused one) and then sat idle in a pool held
    ~2 MiB of the broker's memory for as long as it stayed connected (40
    connections: 81 MB; here 1,970 KiB each): hiredis keeps its buffer as
    large as a request grew it until its next feed, and the read and run
    loops kept the request and its reply while they awaited the next one.
    Whether the large request came alone or before others, none of it stays."""
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    large = hiredis.pack_command(("ECHO", b"x" * 1_000_000))
    ping = hiredis.pack_command(("PING",))
    answer = len(b"$1000000\r\n\r\n") + 1_000_000
    clients = [await Raw.open(port_of(broker)) for _ in range(20)]
    try:
        for client in clients:  # what a connection holds anyway is not the point
            assert await client.call("PING") == b"PONG"
        before = _malloced()
        for i, client in enumerate(clients):
            sent, answered = (large, answer) if i % 2 else (large + ping, answer + 7)
            await client.write(sent)
            await client.reader.readexactly(answered)
        assert broker.redis is not None
        server = broker.redis
        await until(lambda: not any(c.busy for c in server.connections))
        each = (_malloced() - before) / len(clients)
    finally:
        for client in clients:
            await client.close()
    assert each < 128 * 1024, f"{each / 1024:.0f} KiB held by each idle connection"


# --- auth ------------------------------------------------------------------------------


@pytest.fixture
async def secured(start_broker: StartBroker) -> Broker:
    return await start_broker(MemStore(), redis_addr="127.0.0.1:0", token=TOKEN)


async def test_auth_is_enforced_when_a_token_is_set(secured: Broker) -> None:
    conn = await Raw.open(port_of(secured))
    try:
        assert str(await conn.call("LPUSH", "q", "x")).startswith("NOAUTH")
        assert str(await conn.call("AUTH", "wrong")).startswith("WRONGPASS")
        assert await conn.call("AUTH", TOKEN) == b"OK"
        assert await conn.call("PING") == b"PONG"
        assert await conn.call("AUTH", "default", TOKEN) == b"OK"
    finally:
        await conn.close()


async def test_with_a_token_even_ping_is_refused_until_auth(secured: Broker) -> None:
    conn = await Raw.open(port_of(secured))
    try:
        assert str(await conn.call("PING")) == "NOAUTH Authentication required."
        assert str(await conn.call("PING", "hello")) == "NOAUTH Authentication required."
        assert await conn.call("AUTH", TOKEN) == b"OK"
        assert await conn.call("PING") == b"PONG"
    finally:
        await conn.close()


async def test_hello_authenticates_with_auth_inside(secured: Broker) -> None:
    conn = await Raw.open(port_of(secured))
    try:
        assert str(await conn.call("HELLO", "3")).startswith("NOAUTH")
        assert str(await conn.call("HELLO", "3", "AUTH", "default", "no")).startswith("WRONGPASS")
        hello = await conn.call("HELLO", "3", "AUTH", "default", TOKEN)
        assert hello[b"proto"] == 3
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "attempt",
    [
        pytest.param(("AUTH", "wrong"), id="auth"),
        pytest.param(("AUTH", "default", "wrong"), id="auth-user"),
        pytest.param(("HELLO", "3", "AUTH", "default", "wrong"), id="hello-auth"),
    ],
)
async def test_three_failed_auths_close_the_connection_and_others_can_still_auth(
    secured: Broker, attempt: tuple[str, ...]
) -> None:
    guesser = await Raw.open(port_of(secured))
    try:
        for _ in range(3):
            assert str(await guesser.call(*attempt)).startswith("WRONGPASS")
        assert await asyncio.wait_for(guesser.reader.read(1), 5) == b""  # closed
    finally:
        await guesser.close()
    client = await Raw.open(port_of(secured))
    try:
        assert await client.call("AUTH", TOKEN) == b"OK"
        assert await client.call("PING") == b"PONG"
    finally:
        await client.close()


async def test_a_failed_auth_waits_longer_each_time_without_holding_up_others(
    secured: Broker,
) -> None:
    guesser, other = await Raw.open(port_of(secured)), await Raw.open(port_of(secured))
    try:
        started = time.monotonic()
        assert str(await guesser.call("AUTH", "wrong")).startswith("WRONGPASS")
        assert time.monotonic() - started >= 0.1
        second = asyncio.create_task(guesser.call("AUTH", "wrong"))  # waits 0.2 s
        assert await other.call("AUTH", TOKEN) == b"OK"  # answered meanwhile
        assert not second.done()
        assert str(await second).startswith("WRONGPASS")
        assert time.monotonic() - started >= 0.1 + 0.2
    finally:
        await guesser.close()
        await other.close()


@pytest.mark.parametrize("kw", PROTOCOLS)
async def test_redis_py_authenticates_with_the_token(secured: Broker, kw: dict[str, Any]) -> None:
    client = connect(secured, password=TOKEN, **kw)
    try:
        assert await client.rpush("q", "x") == 1
        assert await client.lpop("q") == b"x"
    finally:
        await client.aclose()
    anonymous = connect(secured, retry=Retry(NoBackoff(), 0), **kw)  # fail fast
    try:
        with pytest.raises(AuthenticationError):
            await anonymous.rpush("q", "x")
    finally:
        await anonymous.aclose()


async def test_auth_without_a_token_configured_is_an_error_as_in_redis(raw: Raw) -> None:
    assert "without any password configured" in str(await raw.call("AUTH", "x"))
    assert await raw.call("AUTH", "default", "anything") == b"OK"  # a nopass default user


# --- the listener ----------------------------------------------------------------------


async def test_stop_closes_idle_and_blocked_connections(broker: Broker) -> None:
    server = RespServer(broker.engine, broker.metrics, RespSettings())
    await server.start("127.0.0.1:0")
    idle, waiting = await Raw.open(server.port), await Raw.open(server.port)
    assert await idle.call("PING") == b"PONG"
    await waiting.send("BLPOP", "q", "30")
    await until(lambda: any(c.busy for c in server.connections))
    started = time.monotonic()
    await server.stop()
    assert time.monotonic() - started < 3
    assert await idle.rest() == b"" and await waiting.rest() == b""
    await idle.close()
    await waiting.close()


async def test_simplequeued_prints_the_resp_address_and_serves_it(
    broker_process: Callable[..., Any], redis_cli: str
) -> None:
    proc = broker_process("--backend", "memfs", "--redis-addr", "127.0.0.1:0")
    line = await asyncio.to_thread(proc.proc.stdout.readline)
    assert line.startswith("simplequeued resp listening on 127.0.0.1:")
    port = line.rsplit(":", 1)[1].strip()
    run = await asyncio.create_subprocess_exec(
        redis_cli, "-p", port, "RPUSH", "q", "hi", stdout=asyncio.subprocess.PIPE
    )
    assert (await run.communicate())[0] == b"1\n"


def test_simplequeued_refuses_a_bad_redis_addr() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "simplequeue.broker", "--redis-addr", "no-port"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--redis-addr" in proc.stderr and "HOST:PORT" in proc.stderr


# --- redis-cli -------------------------------------------------------------------------


CLI_SESSION = [
    (("PING",), "PONG"),
    (("ECHO", "hello"), "hello"),
    (("SELECT", "0"), "OK"),
    (("RPUSH", "q", "a", "b", "c"), "3"),
    (("LPUSH", "q", "d"), "4"),
    (("LLEN", "q"), "4"),
    (("LPOP", "q"), "a"),
    (("RPOP", "q", "2"), "b\nc"),
    (("BLPOP", "q", "1"), "q\nd"),
    (("BRPOP", "q", "0.1"), ""),
    (("LPOP", "q"), ""),
    (("XADD", "s", "order-1", "item", "book"), "order-1"),
    (("XLEN", "s"), "1"),
    (
        ("XREADGROUP", "GROUP", "g", "c", "COUNT", "5", "STREAMS", "s", ">"),
        "s\norder-1\nitem\nbook",
    ),
    (("XACK", "s", "g", "order-1"), "1"),
    (("XINFO", "STREAM", "s"), None),
    (("COMMAND", "COUNT"), str(len(COMMANDS))),
    (("CLIENT", "SETNAME", "cli"), "OK"),
    (("NOSUCHCOMMAND",), "ERR unknown command 'NOSUCHCOMMAND'"),
]


async def test_redis_cli_runs_every_command(cli: Cli) -> None:
    for args, expected in CLI_SESSION:
        code, out = await cli(*args)
        assert code == 0, (args, out)
        if expected is not None:
            assert out.strip() == expected, args
    code, out = await cli("XINFO", "STREAM", "s")
    assert "length\n0\n" in out and "entries-added\n1\n" in out


async def test_redis_cli_info(cli: Cli) -> None:
    code, out = await cli("INFO")
    assert code == 0
    assert "# Server" in out and "redis_version:7.2.0" in out
    assert "# Persistence" in out and "loading:0" in out
    code, out = await cli("INFO", "clients")
    assert (code, out.split()[:2]) == (0, ["#", "Clients"])


async def test_redis_cli_in_resp3_mode(cli: Cli) -> None:
    await cli("XADD", "s", "e-1", "f", "v")
    code, out = await cli("XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">", flags=("-3",))
    assert (code, out.split()) == (0, ["s", "e-1", "f", "v"])
    code, out = await cli("HELLO", flags=("-3",))
    assert "proto 3" in out


async def test_redis_cli_blpop_is_woken_by_an_lpush(
    cli: Cli, other: redis.Redis, broker: Broker
) -> None:
    waiting = asyncio.create_task(cli("BLPOP", "q", "20"))
    await blocked(broker)
    await other.lpush("q", "wake")
    code, out = await asyncio.wait_for(waiting, 10)
    assert (code, out.split()) == (0, ["q", "wake"])


async def test_redis_cli_pipe_mode(cli: Cli, other: redis.Redis) -> None:
    data = b"".join(hiredis.pack_command(("RPUSH", "bulk", str(i))) for i in range(500))
    code, out = await cli("--pipe", stdin=data)
    assert code == 0, out
    assert "errors: 0, replies: 500" in out
    assert await other.llen("bulk") == 500


async def test_redis_cli_with_and_without_the_token(redis_cli: str, secured: Broker) -> None:
    async def run(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            redis_cli,
            "-p",
            str(port_of(secured)),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return (await proc.communicate())[0].decode().strip()

    assert (await run("RPUSH", "q", "x")).startswith("NOAUTH")
    assert (await run("PING")).startswith("NOAUTH")
    assert await run("--no-auth-warning", "-a", TOKEN, "RPUSH", "q", "x") == "1"
    assert (await run("--no-auth-warning", "-a", "wrong", "PING")).startswith("AUTH failed")


async def test_resp_commands_are_counted_in_metrics(r: redis.Redis, broker: Broker) -> None:
    await r.rpush("metered", "a")
    with pytest.raises(redis.ResponseError):
        await r.execute_command("NOSUCHCOMMAND")
    text = (await broker.metrics.scrape()).decode()
    assert 'simplequeue_resp_commands_total{command="RPUSH",outcome="ok"}' in text
    assert 'simplequeue_resp_commands_total{command="unknown",outcome="error"}' in text


async def test_a_pop_is_one_commit(r: redis.Redis, broker: Broker) -> None:
    await r.rpush("onecommit", "x")
    writes = broker.committer.stats.writes
    assert await r.lpop("onecommit") == b"x"
    assert broker.committer.stats.writes == writes + 1


async def test_a_pipeline_of_writes_shares_commits_and_keeps_its_order(
    r: redis.Redis, broker: Broker
) -> None:
    writes = broker.committer.stats.writes
    async with r.pipeline(transaction=False) as pipe:
        for i in range(50):
            pipe.rpush("piped", f"v{i}")
        for _ in range(50):
            pipe.lpop("piped")
        replies = await pipe.execute()
    assert replies[:50] == list(range(1, 51))  # each push saw the ones before it
    assert replies[50:] == [f"v{i}".encode() for i in range(50)]  # FIFO, after the pushes
    assert broker.committer.stats.writes - writes < 20  # not one commit per command


# --- review of round 21: claims not given back, replies not bounded ----------------------


async def given_back(http: Http, topic: str, job_id: str, within: float = 10.0) -> None:
    """Until `job_id` is pending again (what a client that left took, given
    back by a commit of its own); failing, say what became of it."""
    deadline = asyncio.get_running_loop().time() + within
    while (job := await http.job(topic, job_id))["status"] != "pending":
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"{topic}/{job_id} not given back: {job['status']}, "
                f"claimed_by={job.get('claimed_by')}"
            )
        await asyncio.sleep(0.02)


async def test_xreadgroup_whose_second_stream_fails_leaves_the_first_streams_claims_held(
    start_broker: StartBroker,
) -> None:
    """XREADGROUP ... STREAMS a b > >: a's job was claimed, then b's claim failed
    (b's head corrupt). The client was answered an error, never a's entry,
    and a's job stayed claimed by consumer c, for nobody, until its lease ran
    out (an attempt spent). It goes back at once now, as _race's claims do."""
    store = MemStore()
    broker = await start_broker(store, redis_addr="127.0.0.1:0")
    async with aiohttp.ClientSession() as session:
        http = Http(session, broker.url)
        code, _ = await http.call("POST", "/topics/a/enqueue", {"payload": {"t": "a"}})
        assert code == 201
        await store.put(keys.head("b"), b"not a head")  # b cannot be read: corrupt
        r = redis.Redis(host="127.0.0.1", port=port_of(broker), protocol=2)
        try:
            with pytest.raises(redis.ResponseError):
                await r.execute_command(
                    "XREADGROUP", "GROUP", "g", "c", "STREAMS", "a", "b", ">", ">"
                )
        finally:
            await r.aclose()
        a = await http.status("a")
        # The client got no entry, so nobody holds a's job: it should be pending.
        assert (a["pending"], a["claimed"]) == (1, 0), a


async def test_xreadgroup_whose_client_leaves_during_the_second_streams_claim_strands_the_first(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with a hangup: a claimed, b's claim slow (its owner or store
    slow to answer), the client leaves. The command was cancelled with a's
    claim in no _or_given_back yet: a's job was held until its lease ran out."""
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    assert broker.redis is not None
    server = broker.redis
    async with aiohttp.ClientSession() as session:
        http = Http(session, broker.url)
        code, _ = await http.call("POST", "/topics/a/enqueue", {"payload": {"n": 1}, "id": "j1"})
        assert code == 201
        claim = server.engine.claim
        b_asked = asyncio.Event()

        async def b_is_slow(topic: str, *args: Any, **kwargs: Any) -> Any:
            if topic == "b":
                b_asked.set()
                await asyncio.Event().wait()  # an owner that takes its time
            return await claim(topic, *args, **kwargs)

        monkeypatch.setattr(server.engine, "claim", b_is_slow)
        leaver = await Raw.open(port_of(broker))
        await leaver.send("XREADGROUP", "GROUP", "g", "c", "STREAMS", "a", "b", ">", ">")
        await b_asked.wait()
        await hang_up(broker, leaver)
        await given_back(http, "a", "j1")


@pytest.mark.parametrize(
    "command",
    [
        ("BLPOP", "a", "b", "20"),
        ("XREADGROUP", "GROUP", "g", "c", "BLOCK", "20000", "STREAMS", "a", "b", ">", ">"),
    ],
    ids=["blpop-keys", "xreadgroup-block"],
)
async def test_a_wait_on_several_keys_whose_client_leaves_as_one_wins_gives_the_claim_back(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    """A wait on several keys: a's long poll wins, and _race cancels b's and
    awaits it. A client that left then cancelled the command there, outside
    the block that gives claims back: a's claim was dropped, held by a
    connection that was gone until its lease ran out, an attempt spent
    (BLPOP a b 0, LPUSH a, the client leaving a few loop turns later: 14 of
    60 tries; with max_attempts 1 the job went dead, never delivered). Here
    b's long poll takes its time to end, and the client leaves meanwhile."""
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    assert broker.redis is not None
    server = broker.redis
    claim = server.engine.claim
    b_ending = asyncio.Event()

    async def b_slow_to_end(topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic != "b" or not kwargs.get("wait"):
            return await claim(topic, *args, **kwargs)
        try:
            await asyncio.Event().wait()  # b's long poll: nothing comes
        except asyncio.CancelledError:
            b_ending.set()
            await asyncio.Event().wait()  # ending takes its time (a write, say)
        raise AssertionError("unreachable")

    monkeypatch.setattr(server.engine, "claim", b_slow_to_end)
    async with aiohttp.ClientSession() as session:
        http = Http(session, broker.url)
        leaver = await Raw.open(port_of(broker))
        await leaver.send(*command)
        await blocked(broker)
        code, _ = await http.call("POST", "/topics/a/enqueue", {"payload": {"n": 1}, "id": "j1"})
        assert code == 201
        await b_ending.wait()  # a won: b's long poll is being ended
        await hang_up(broker, leaver)
        await given_back(http, "a", "j1")
        assert (await http.job("a", "j1"))["attempts"] == 0


def _counted(broker: Any, command: str, outcome: str = "ok") -> int:
    text = generate_latest(broker.metrics.registry).decode()
    labels = f'command="{command}",outcome="{outcome}"'
    m = re.search(rf"simplequeue_resp_commands_total\{{{labels}\}} ([0-9.e+]+)", text)
    return int(float(m.group(1))) if m else 0


async def _unread(broker: Broker) -> tuple[socket.socket, connection.Connection]:
    """A client socket that will read nothing, and its connection in the
    broker: the kernel's buffers between them made small, so that the
    replies wait in the broker."""
    assert broker.redis is not None
    server = broker.redis
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port_of(broker)))
    await until(lambda: bool(server.connections))
    [conn] = server.connections
    sock = conn.writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return client, conn


async def test_replies_to_a_client_that_never_reads_are_buffered_past_the_output_limit(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OUTPUT_HIGH_WATER bounds 'replies buffered for a client that does not
    read', but Connection.run awaited drain() only when no request was queued.
    A client that kept pipelining (RPUSH, whose commit lets the read loop
    queue more, then a large ECHO) and read nothing had every reply buffered
    in the broker: 16 MiB against a limit of 512 KiB in this test (with the
    default 64 MiB, it grew until the broker ran out of memory)."""
    high_water = 512 * 1024
    monkeypatch.setattr(connection, "OUTPUT_HIGH_WATER", high_water)
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    value = b"x" * (60 * 1024)
    unit = hiredis.pack_command(("RPUSH", "q", "x")) + hiredis.pack_command(("ECHO", value))
    n = 280  # ~16 MiB of replies
    _, writer = await asyncio.open_connection("127.0.0.1", port_of(broker))
    writer.transport.set_write_buffer_limits(high=2**31)
    writer.write(unit * n)  # all of it, never reading a reply
    assert broker.redis is not None
    server = broker.redis

    def buffered() -> int:
        conns = server.connections
        return conns[0].unsent if conns else 0

    most = 0

    async def observe() -> None:
        nonlocal most
        while _counted(broker, "ECHO") < n:
            most = max(most, buffered())
            await asyncio.sleep(0.005)
        most = max(most, buffered())

    # Bounded, the broker stops taking requests once its output is full: then
    # not all n ECHOs are ever run, and the observation ends with the window.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(observe(), 5)
    writer.close()
    assert most <= high_water + 2 * len(value) + 64 * 1024, (
        f"{most / 2**20:.1f} MiB of replies buffered ({_counted(broker, 'ECHO')} ECHOs run)"
    )


async def test_a_pipeline_of_pops_is_held_to_the_output_limit_of_a_client_that_never_reads(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for pops: a pipelined group ran whole (up to MAX_GROUP, 256
    requests) before the output limit was looked at, and its replies went
    out together, each pop taking its first job however large: 256 LPOPs of
    1 MiB jobs buffered 256 MiB for a client that reads nothing, four times
    the 64 MiB limit (measured: a simplequeued's RSS went from 215 to 606 MB
    for one such connection of 250 LPOPs, every job popped and lost when it
    closed). A group takes no more pops than the room left under the limit
    holds at --max-body each (one at least). Here: a limit of 512 KiB, 200
    LPOPs of 100 KB jobs: 15.3 MiB were buffered before (every LPOP in one
    group), 0.54 MiB now (47 LPOPs run, most of them in the socket's own
    buffers)."""
    high_water = 512 * 1024
    monkeypatch.setattr(connection, "OUTPUT_HIGH_WATER", high_water)
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    value = "x" * (100 * 1000)
    n = 200
    r = connect(broker, protocol=2)
    try:
        for _ in range(n // 10):
            await r.rpush("q", *([value] * 10))
    finally:
        await r.aclose()
    assert broker.redis is not None
    server = broker.redis
    await until(lambda: not server.connections)
    _, writer = await asyncio.open_connection("127.0.0.1", port_of(broker))
    writer.write(hiredis.pack_command(("LPOP", "q")) * n)  # never reading a reply
    await until(lambda: bool(server.connections))
    [conn] = server.connections

    def buffered() -> int:
        return conn.unsent

    def settled() -> bool:
        """Between groups (a group's replies are sent as it ends), every pop
        run, or past the limit, when the connection runs nothing more until
        its client reads (never): what is buffered then stays."""
        if conn.busy:
            return False
        return _counted(broker, "LPOP") == n or buffered() > high_water

    most = 0

    async def observe() -> None:
        nonlocal most
        while not settled():
            most = max(most, buffered())
            await asyncio.sleep(0.005)
        most = max(most, buffered())

    await asyncio.wait_for(observe(), 10)
    ran = _counted(broker, "LPOP")
    writer.close()
    assert most <= high_water + 2 * len(value) + 64 * 1024, (
        f"{most / 2**20:.1f} MiB of replies buffered ({ran} LPOPs run)"
    )


def test_replies_a_client_never_reads_cost_the_broker_about_their_own_size() -> None:
    """Under uvloop, the broker's event loop, each reply was a write() of its
    own, which the transport keeps as an object of its own until it is sent:
    some 400 bytes a reply (a 7-byte +PONG, a 34-byte -NOAUTH), where
    OUTPUT_HIGH_WATER counts the replies' bytes alone. Three connections
    that sent 33 MB of PINGs each and read nothing took a simplequeued from 49
    MB to 3.2 GB. Here 20,000 unread PONGs (137 KiB) held 9.5 MiB; replies
    that wait now gather in one buffer of the connection's: 0.3 MiB."""
    pings = 20_000
    pong = len(b"+PONG\r\n")

    async def held_for_unread_replies() -> int:
        store = MemStore()
        settings = BrokerSettings(store.url, addr="127.0.0.1:0", redis_addr="127.0.0.1:0")
        broker = Broker(settings, store)
        await broker.start()
        client, _ = await _unread(broker)
        pinging = hiredis.pack_command(("PING",)) * pings
        try:
            tracemalloc.start()
            await asyncio.get_running_loop().sock_sendall(client, pinging)
            # Under tracemalloc, on a loaded machine, 20,000 PINGs took over
            # 10 s once: the wait guards against a hang only.
            await until(lambda: _counted(broker, "PING") >= pings, within=60)
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            client.close()
            await broker.stop()
        return held

    with event_loop_runner() as runner:  # simplequeued's: uvloop
        held = runner.run(held_for_unread_replies())
    replies = pings * pong
    assert held < 2 * replies + 512 * 1024, (
        f"{pings} unread replies ({replies / 2**10:.0f} KiB) held {held / 2**20:.1f} MiB"
    )


async def test_a_client_not_yet_authenticated_is_held_to_a_small_output_limit(
    secured: Broker,
) -> None:
    """A client that never gave the token has only -NOAUTH refusals to read,
    yet was given OUTPUT_HIGH_WATER, 64 MiB of them, some 2 million (as
    Redis was, until 7.4.3 limited them: CVE-2025-21605). Of 20,000 PINGs
    whose replies were never read, all were answered, 594 KiB of replies
    buffered; it is held at UNAUTHENTICATED_OUTPUT (64 KiB) now."""
    pings = 20_000
    client, conn = await _unread(secured)
    _, writer = await asyncio.open_connection(sock=client)
    try:
        writer.write(hiredis.pack_command(("PING",)) * pings)

        def settled() -> bool:
            """Every PING answered, or past the limit, when the connection runs
            nothing more until its client reads (never)."""
            if conn.busy:
                return False
            return (
                _counted(secured, "PING", "error") == pings
                or conn.unsent > connection.UNAUTHENTICATED_OUTPUT
            )

        await until(settled)
        answered = _counted(secured, "PING", "error")
        assert answered < pings, (
            f"all {pings} PINGs answered, {conn.unsent / 2**10:.0f} KiB buffered"
        )
        assert conn.unsent < connection.UNAUTHENTICATED_OUTPUT + 64
    finally:
        writer.transport.abort()  # its requests are not all sent: not waited for


async def test_a_client_that_never_gave_the_token_is_held_to_little_memory(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --token, a client that never authenticates can hold no more than a
    request or so: it may run nothing but AUTH, HELLO and QUIT. It could
    queue QUEUED_BYTES (64 MiB) of --max-body requests behind replies it did
    not read: a HELLO with a 1 MB option was answered with that option in
    its error (1 MB a reply), which passed UNAUTHENTICATED_OUTPUT at once.
    With simplequeued, 10 such connections took its RSS from 98 to 785 MB
    (review of the RESP face). Redis refuses an unauthenticated client's
    bulk string over 16 KB (CVE-2021-32675): so does the broker, and it reads
    nothing behind a request before it has run."""
    queued = QueuedPeak(monkeypatch)
    secured = await start_broker(MemStore(), redis_addr="127.0.0.1:0", token=TOKEN)
    client, conn = await _unread(secured)
    _, writer = await asyncio.open_connection(sock=client)
    try:
        big = "x" * 1_000_000
        writer.write(hiredis.pack_command(("HELLO", "2", big)) * 20)
        writer.write(hiredis.pack_command(("PING", big)) * 100)
        server = secured.redis

        def settled() -> bool:  # refused and closed, or reading stopped
            return not server.connections or (not conn.busy and not conn.room.is_set())

        with contextlib.suppress(AssertionError):
            await until(settled, 20)
        await asyncio.sleep(0.5)
        assert queued.peak + conn.unsent <= 64 * 1024, (
            f"{queued.peak / 2**20:.1f} MiB of requests queued, {conn.unsent / 2**20:.1f} MiB of "
            "replies, by a client that never authenticated"
        )
    finally:
        writer.transport.abort()


async def test_a_client_without_the_token_has_one_request_read_at_a_time(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests under the 16 KiB limit, pipelined by a client that never
    authenticates and reads nothing: one is read, run, then the next, so the
    broker holds one request, and UNAUTHENTICATED_OUTPUT of replies once its
    refusals pass it. It queued requests behind them: 462 KiB here in 0.2 s,
    up to QUEUED_FRAMES (128) of them."""
    queued = QueuedPeak(monkeypatch)
    secured = await start_broker(MemStore(), redis_addr="127.0.0.1:0", token=TOKEN)
    client, conn = await _unread(secured)
    _, writer = await asyncio.open_connection(sock=client)
    try:
        writer.write(hiredis.pack_command(("PING",)) * 20_000)  # 680 KB of refusals
        writer.write(hiredis.pack_command(("PING", "x" * 15_000)) * 200)
        await until(lambda: conn.unsent > connection.UNAUTHENTICATED_OUTPUT and not conn.busy)
        await asyncio.sleep(0.2)  # what else it would read, it reads meanwhile
        assert queued.peak <= 2 * 16 * 1024, f"{queued.peak / 2**10:.0f} KiB of requests queued"
    finally:
        writer.transport.abort()


async def test_requests_sent_with_auth_are_read_to_the_full_limit_once_it_has_run(
    secured: Broker,
) -> None:
    """AUTH and what follows it in one write (a client that pipelines its
    commands after AUTH): the rest is read once AUTH has run, with
    --max-body's limit, not the 16 KiB of a client without the token."""
    value = "v" * 500_000
    conn = await Raw.open(port_of(secured))
    try:
        await conn.write(
            hiredis.pack_command(("AUTH", TOKEN))
            + hiredis.pack_command(("RPUSH", "q", value))
            + hiredis.pack_command(("LPOP", "q"))
        )
        parser, replies = hiredis.Reader(), []
        while len(replies) < 3:
            chunk = await asyncio.wait_for(conn.reader.read(2**20), 10)
            assert chunk, f"closed after {replies}"
            parser.feed(chunk)
            while (reply := parser.gets()) is not False:
                replies.append(reply)
        assert replies == [b"OK", 1, value.encode()]
    finally:
        await conn.close()
    before = await Raw.open(port_of(secured))
    try:
        await before.send("RPUSH", "q", "v" * 20_000)  # read whole: no reset
        said = await before.rest()
        assert said.startswith(b"-ERR Protocol error: request larger than 16384 bytes before AUTH")
    finally:
        await before.close()


async def test_an_error_repeats_64_characters_of_an_argument_at_most(secured: Broker) -> None:
    """HELLO's refusal of an option it does not know repeated it whole: a
    client without the token had a 1 MB reply for a 1 MB request."""
    conn = await Raw.open(port_of(secured))
    try:
        said = str(await conn.call("HELLO", "2", "y" * 10_000))
        assert said == f"ERR Syntax error in HELLO option '{'y' * 64}...'"
    finally:
        await conn.close()


async def test_xreadgroup_count_0_reads_without_limit_as_in_redis(
    start_broker: StartBroker,
) -> None:
    """Redis reads COUNT 0 (and a negative COUNT) as no limit; it was raised
    to 1, so a consumer draining with COUNT 0 got one entry a call."""
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    r = redis.Redis(host="127.0.0.1", port=port_of(broker), protocol=2)
    try:
        await r.rpush("q", "a", "b", "c")
        got = await r.execute_command(
            "XREADGROUP", "GROUP", "g", "c", "COUNT", "0", "STREAMS", "q", ">"
        )
        assert len(got[0][1]) == 3, got
    finally:
        await r.aclose()


async def test_a_stopped_broker_leaves_no_resp_socket_open_to_a_client_that_stopped_reading(
    start_broker: StartBroker,
) -> None:
    """A client sends requests whose replies fill the socket, and reads none.
    stop() cancelled its handler, which close()d the writer: asyncio closes a
    transport with buffered data only once the buffer is written, which this
    client never let happen, and nothing abort()ed it: the socket and its
    replies outlived the stop (review finding). On Python 3.12+, where
    asyncio.Server.wait_closed() waits for every connection it accepted, the
    broker's stop would hang. After CLOSE_GRACE the transport is aborted."""
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    assert broker.redis is not None
    server = broker.redis
    _, writer = await asyncio.open_connection("127.0.0.1", port_of(broker))
    echo = hiredis.pack_command(("ECHO", b"x" * 512 * 1024))
    writer.write(echo * 32)  # 16 MiB of replies: more than the sockets hold

    def stuck() -> bool:  # the broker waits for the client to read its replies
        conns = server.connections
        return bool(conns) and conns[0].writer.transport.get_write_buffer_size() > 0

    await until(stuck)
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(broker.stop(), 30)
    took = asyncio.get_running_loop().time() - started
    assert server._server is not None
    attached = server._server._active_count  # what Python 3.12's wait_closed() waits for
    writer.close()
    assert attached == 0, f"{attached} RESP connection(s) still open after stop() ({took:.1f} s)"


async def test_xadd_with_a_field_given_twice_is_refused_and_enqueues_nothing(
    start_broker: StartBroker,
) -> None:
    """XADD s * a 1 a 2: Redis keeps both pairs; the payload, an object of the
    fields, kept a=2 and dropped a=1 without a word (review finding). It is
    refused now, and nothing is enqueued."""
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    r = redis.Redis(host="127.0.0.1", port=port_of(broker), protocol=2)
    try:
        with pytest.raises(ResponseError, match="field given twice"):
            await r.execute_command("XADD", "s", "*", "a", "1", "a", "2")
        assert await r.llen("s") == 0
    finally:
        await r.aclose()


async def test_a_slow_reader_that_quits_gets_every_reply_and_no_popped_job_is_lost(
    start_broker: StartBroker,
) -> None:
    """After QUIT the handler closed and, after CLOSE_GRACE (1 s), abort()ed
    the transport, dropping replies still buffered (review of 7ec5017): a
    client on a slow link, or one pausing 1.5 s, lost them, here an LPOP's,
    whose job the pop had completed: gone for good. Only a stopping server's
    connections are cut after CLOSE_GRACE."""
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    assert broker.redis is not None
    port = broker.redis.port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow, narrow link
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(hiredis.pack_command(("RPUSH", "q", "precious")))
        await writer.drain()
        first = hiredis.Reader()
        while (got := first.gets()) is False:
            first.feed(await asyncio.wait_for(reader.read(100), 10))
        assert got == 1
        echo = hiredis.pack_command(("ECHO", b"x" * 256 * 1024))
        writer.write(
            echo * 24 + hiredis.pack_command(("LPOP", "q")) + hiredis.pack_command(("QUIT",))
        )
        await writer.drain()
        await asyncio.sleep(1.6)  # the client is busy a moment, then reads everything
        parser, replies = hiredis.Reader(), []
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
                if not chunk:
                    break
                parser.feed(chunk)
                while (reply := parser.gets()) is not False:
                    replies.append(reply)
        except ConnectionResetError:
            pass
    finally:
        writer.close()
    popped = [r for r in replies if r == b"precious"]
    async with aiohttp.ClientSession() as s, s.get(broker.url + "/topics/q/status") as r:
        counts = await r.json()
    assert popped or counts["pending"] == 1, (
        f"got {len(replies)} of 26 replies; the LPOP's job was popped "
        f"(pending={counts['pending']}) and its reply dropped: the job is lost"
    )
    assert len(replies) == 26, f"got {len(replies)} of 26 replies"


async def test_a_client_that_quits_and_never_reads_is_cut_once_its_replies_stall(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A closing connection's last replies are written however slowly its
    client reads; one that read none of them was then held for ever, its
    task, socket, client slot and up to 64 MB of replies (review of 8c53a42).
    It is cut once nothing was read for STALLED_CLOSE (30 s; 0.3 here)."""
    monkeypatch.setattr(connection, "STALLED_CLOSE", 0.3, raising=False)
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    assert broker.redis is not None
    server = broker.redis
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    _, writer = await asyncio.open_connection(sock=sock)
    try:
        echo = hiredis.pack_command(("ECHO", b"x" * 256 * 1024))
        writer.write(echo * 24 + hiredis.pack_command(("QUIT",)))  # ~6 MB of replies
        await writer.drain()
        await until(lambda: not server.connections)
    finally:
        writer.transport.abort()


async def test_a_pop_before_a_malformed_request_is_answered_then_the_error(
    start_broker: StartBroker,
) -> None:
    """A protocol error is no client gone: the requests before it are answered,
    then the error, as Redis does. The read loop's refusal was taken for a
    hangup: the LPOP was given up, the RPUSH beside it landed unanswered, and
    the error was never sent (round 23's review of its own RESP changes)."""
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    raw = await Raw.open(port_of(broker))
    await raw.write(
        hiredis.pack_command(("RPUSH", "q", "x"))
        + hiredis.pack_command(("LPOP", "q"))
        + b"GARBAGE\r\n"
    )
    rest = await raw.rest()
    await raw.close()
    assert rest.startswith(b":1\r\n$1\r\nx\r\n") and b"-ERR Protocol error" in rest, rest


async def test_a_pop_in_flight_when_an_oversized_request_arrives_is_answered(
    start_broker: StartBroker,
) -> None:
    """A client whose LPOP is being written sends a request past --max-body:
    the client is still there, but the read loop's refusal sets `left`, so
    the pop is given up, and the client gets neither its job nor the error
    that says why the connection closed."""
    broker, store, client = await pop_being_written(
        start_broker, hiredis.pack_command(("LPOP", "q"))
    )
    [conn] = broker.redis.connections if broker.redis else []
    await client.write(b"*2\r\n$5\r\nRPUSH\r\n$999999999\r\n")
    await conn.hangup.wait()  # the read loop refused it and ended
    store.gate.set()
    rest = await client.rest()
    await client.close()
    assert rest.startswith(b"$1\r\nx\r\n") and b"-ERR Protocol error" in rest, rest


async def test_a_pipelined_pop_answered_before_its_groupmate_ends_is_not_lost(
    start_broker: StartBroker,
) -> None:
    """LPOP a; LPOP b pipelined run as one group, whose replies go out when
    the whole group ends. LPOP a's commit lands (its job completed) while
    LPOP b's is still being written, and the client leaves: LPOP b was given
    back, and LPOP a's job stayed completed for nobody (round 23's review of
    its own RESP changes). A group's pops are named, and undone then."""
    store = FaultyStore(MemStore(), target="topics/b")
    broker = await start_broker(store, redis_addr="127.0.0.1:0")
    async with aiohttp.ClientSession() as session:
        http = Http(session, broker.url)
        for topic, job in (("a", "ja"), ("b", "jb")):
            enqueued = {"payload": "x", "id": job}
            code, _ = await http.call("POST", f"/topics/{topic}/enqueue", enqueued)
            assert code == 201
        store.gate = asyncio.Event()
        store.put_started.clear()
        client = await Raw.open(port_of(broker))
        pops = hiredis.pack_command(("LPOP", "a")) + hiredis.pack_command(("LPOP", "b"))
        await client.write(pops)
        await store.put_started.wait()  # LPOP b held

        async def a_popped() -> bool:
            return (await http.status("a"))["completed"] == 1

        await until_async(a_popped)  # LPOP a landed; its reply waits for LPOP b
        [conn] = broker.redis.connections if broker.redis else []
        await client.close()
        await conn.left.wait()
        store.gate.set()
        await pending_again(http, "b")  # the pop in flight was given back
        await pending_again(http, "a")  # and the one whose reply never went out
        assert (await http.job("a", "ja"))["attempts"] == 0


async def _two_topics(http: Http) -> None:
    for topic, job in (("a", "ja"), ("b", "jb")):
        code, _ = await http.call("POST", f"/topics/{topic}/enqueue", {"payload": "x", "id": job})
        assert code == 201


async def test_a_stop_past_its_grace_gives_back_a_pipelines_pops_whose_replies_never_went_out(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LPOP a; LPOP b pipelined: LPOP a lands, LPOP b's write is slow (S3).
    The broker stops; past SHUTDOWN_GRACE the connection's task is cancelled:
    both pops go back, LPOP a's (named) as LPOP b's (cancelled). LPOP a's
    stayed done, its reply never sent (round 23's review of its own RESP
    changes)."""
    monkeypatch.setattr(connection, "SHUTDOWN_GRACE", 0.3)
    store = FaultyStore(MemStore(), target="topics/b")
    broker = await start_broker(store, redis_addr="127.0.0.1:0")
    async with aiohttp.ClientSession() as session:
        http = Http(session, broker.url)
        await _two_topics(http)
        store.gate = asyncio.Event()
        store.put_started.clear()
        client = await Raw.open(port_of(broker))
        await client.write(
            hiredis.pack_command(("LPOP", "a")) + hiredis.pack_command(("LPOP", "b"))
        )
        await store.put_started.wait()  # LPOP b held

        async def a_popped() -> bool:
            return (await http.status("a"))["completed"] == 1

        await until_async(a_popped)  # LPOP a landed; its reply waits for LPOP b
    stopping = asyncio.create_task(broker.stop())
    assert broker.redis is not None
    server = broker.redis
    await until(lambda: not server.connections)  # cancelled past the grace
    store.gate.set()
    await stopping
    got = await client.rest()
    await client.close()
    assert got == b""  # neither reply went out
    after = await start_broker(store.inner)
    async with aiohttp.ClientSession() as session:
        http = Http(session, after.url)
        assert (await http.job("b", "jb"))["status"] == "pending"
        assert (await http.job("a", "ja"))["status"] == "pending", "LPOP a's job done for nobody"


async def test_a_pipeline_of_pushes_is_done_and_answered_for_a_client_that_half_closes(
    start_broker: StartBroker,
) -> None:
    """A producer pipelines RPUSH p a; RPUSH p b, half-closes its socket (as
    `nc -N` does, or shutdown(SHUT_WR)) and reads the replies: they land and
    are answered. A pipelined group watched as a whole for its client's
    leaving was given up, its pushes abandoned before they applied (round
    23's review of its own RESP changes)."""
    store = FaultyStore(MemStore(), target="topics/p")
    broker = await start_broker(store, redis_addr="127.0.0.1:0")
    async with aiohttp.ClientSession() as session:
        http = Http(session, broker.url)
        store.gate = asyncio.Event()
        store.put_started.clear()
        first = asyncio.create_task(
            http.call("POST", "/topics/p/enqueue", {"payload": "first", "id": "j0"})
        )
        await store.put_started.wait()  # a batch of p in flight
        client = await Raw.open(port_of(broker))
        await client.write(
            hiredis.pack_command(("RPUSH", "p", "a")) + hiredis.pack_command(("RPUSH", "p", "b"))
        )
        assert broker.redis is not None
        [conn] = broker.redis.connections
        await until(lambda: conn.busy)
        client.writer.write_eof()  # done sending; still reading
        await conn.left.wait()
        await until(lambda: conn.watched == 0)  # a group watched was given up by now
        store.gate.set()
        assert (await first)[0] == 201
        got = await client.rest()
        await client.close()
        pending = (await http.status("p"))["pending"]
        assert (pending, got) == (3, b":2\r\n:3\r\n")


async def _half_close_during(
    broker: Broker, store: FaultyStore, pipeline: list[tuple[str, ...]]
) -> bytes:
    """Send `pipeline`, half-close while its group waits on a held head PUT
    (store.gate), release it, and read what the broker sends before closing."""
    store.gate = asyncio.Event()
    client = await Raw.open(port_of(broker))
    await client.write(b"".join(hiredis.pack_command(frame) for frame in pipeline))
    assert broker.redis is not None
    [conn] = broker.redis.connections
    await until(lambda: conn.watched > 0)  # the group runs, watched for a hangup
    client.writer.write_eof()  # done sending; still reading
    await conn.left.wait()
    store.gate.set()
    got = await client.rest()
    await client.close()
    return got


async def test_a_pipelined_push_beside_a_pop_is_answered_for_a_client_that_half_closes(
    start_broker: StartBroker,
) -> None:
    """RPUSH p a; LPOP q pipelined, then a half-close, the producer reading on:
    the RPUSH landed, but the client's leaving was taken to drop every reply
    of the group, the push's too; a producer that retries a push left
    unanswered enqueued it twice (review of the RESP face, round 25). The pop
    took nothing: both are answered, as a group of pushes alone is."""
    store = FaultyStore(MemStore(), target="topics/p")
    broker = await start_broker(store, redis_addr="127.0.0.1:0")
    got = await _half_close_during(broker, store, [("RPUSH", "p", "a"), ("LPOP", "q")])
    assert got == b":1\r\n$-1\r\n"
    assert (await broker.engine.status("p"))["pending"] == 1


async def test_a_pipeline_that_half_closes_is_answered_whole_its_pops_given_back(
    start_broker: StartBroker,
) -> None:
    """RPUSH p a; LPOP q; RPUSH p b with a job in q, then a half-close: the
    pop's job goes back (its reply might reach nobody) and the pop is
    answered as one that found none; the pushes' replies go out, in order,
    then the connection closes. Before, none went out though both pushes
    landed (review of the RESP face, round 25); then only those before the
    pop, and a client only done sending would send RPUSH p b again (review of
    round 25's changes)."""
    store = FaultyStore(MemStore(), target="topics/p")
    broker = await start_broker(store, redis_addr="127.0.0.1:0")
    await broker.engine.push("q", [api.JobSpec("job")])
    got = await _half_close_during(
        broker, store, [("RPUSH", "p", "a"), ("LPOP", "q"), ("RPUSH", "p", "b")]
    )
    assert got == b":1\r\n$-1\r\n:2\r\n"
    assert (await broker.engine.status("p"))["pending"] == 2
    async with aiohttp.ClientSession() as session:
        await pending_again(Http(session, broker.url), "q")


async def test_a_pipeline_with_a_pop_after_a_half_close_runs_up_to_the_pop(
    start_broker: StartBroker,
) -> None:
    """A group that starts once its client has half-closed: the pushes before
    its first pop run and are answered (as a push alone is), the pop and what
    follows it do not run (its reply might reach nobody), and the connection
    closes. Before, none of the group ran (review of the RESP face, round 25)."""
    store = FaultyStore(MemStore(), target="topics/p")
    broker = await start_broker(store, redis_addr="127.0.0.1:0")
    await broker.engine.push("q", [api.JobSpec("job")])
    store.gate = asyncio.Event()
    client = await Raw.open(port_of(broker))
    await client.send("RPUSH", "p", "x")
    assert broker.redis is not None
    [conn] = broker.redis.connections
    await until(lambda: conn.busy)  # held: the group below starts after the EOF
    group = [("RPUSH", "p", "a"), ("LPOP", "q"), ("RPUSH", "p", "b")]
    await client.write(b"".join(hiredis.pack_command(frame) for frame in group))
    client.writer.write_eof()
    await conn.left.wait()
    store.gate.set()
    got = await client.rest()
    await client.close()
    assert got == b":1\r\n:2\r\n"
    assert (await broker.engine.status("p"))["pending"] == 2
    assert (await broker.engine.status("q"))["pending"] == 1


async def test_a_client_that_leaves_after_a_malformed_request_gets_its_pop_undone(
    start_broker: StartBroker,
) -> None:
    """After a request refused for its framing the broker reads on, discarding,
    to see its client leave: one that sent LPOP, then garbage, and left while
    the pop was being written had it land for nobody (round 23's review of
    its own RESP changes)."""
    broker, store, client = await pop_being_written(
        start_broker, hiredis.pack_command(("LPOP", "q"))
    )
    [conn] = broker.redis.connections if broker.redis else []
    await client.write(b"GARBAGE\r\n")
    await conn.hangup.wait()  # the read loop refused it and ended
    await client.close()
    try:
        await asyncio.wait_for(conn.left.wait(), 1)
    except TimeoutError:
        store.gate.set()  # the pop lands, answered to a closed socket
        pytest.fail("the broker never saw its client leave: its pop completes for nobody")
    async with aiohttp.ClientSession() as session:
        http = Http(session, broker.url)
        store.gate.set()
        server = broker.redis
        assert server is not None
        await until(lambda: not server.connections)  # the pop ended, the connection closed
        deadline = time.monotonic() + 2  # a give-back is a commit of its own, soon after
        while (await http.job("q", "j1"))["status"] != "pending":
            assert time.monotonic() < deadline, "the job was done for a client that left"
            await broker.committer.wait_changed("q", 0.2)


async def test_pops_keep_no_record_once_answered(start_broker: StartBroker) -> None:
    """Pops are named for their undo, a pipeline's and one alone, and so are
    the completions of a BLPOP of several keys and of XREADGROUP NOACK;
    answered, their records go (the owner's room for them is bounded, and
    shared with pops passed on)."""
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    r = redis.Redis(port=port_of(broker))
    try:
        await r.rpush("q", *[str(i) for i in range(10)])
        async with r.pipeline(transaction=False) as pipe:
            for _ in range(5):
                pipe.lpop("q")
            assert await pipe.execute() == [b"0", b"1", b"2", b"3", b"4"]
        assert await r.lpop("q") == b"5"
        assert await r.blpop(["q"], timeout=1) == (b"q", b"6")
        assert await r.blpop(["empty", "q"], timeout=1) == (b"q", b"7")  # claimed, completed
        await r.xadd("s", {"f": "v"})
        [[_, [[_, fields]]]] = await r.xreadgroup("g", "c", {"s": ">"}, noack=True)
        assert fields == {b"f": b"v"}
    finally:
        await r.aclose()
    assert (broker.engine.popped.kept_bytes, broker.engine.popped.held_bytes) == (0, 0)
