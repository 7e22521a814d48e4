"""The Redis protocol listener of SPEC section 6 (`--redis-addr`): RESP2, and RESP3 after HELLO 3.

It owns client connections and their state (protocol, auth, name, the lease tokens
of its stream reads) and turns each command into the same Engine calls the HTTP
API makes. It never touches storage or topic state itself, and one client's bad
bytes never reach another connection: they end that connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import hiredis
import orjson

from simplequeue import __version__, keys
from simplequeue.broker.engine import MAX_WAIT, Engine
from simplequeue.broker.metrics import Metrics
from simplequeue.broker.settings import parse_addr
from simplequeue.errors import SimpleQueueError

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
QUEUED_FRAMES = 128  # parsed requests waiting per connection; beyond it we stop reading
OUTPUT_HIGH_WATER = 64 * 1024 * 1024  # replies buffered for a client that does not read
SHUTDOWN_GRACE = 5.0  # seconds a stopping server lets commands in flight finish
TOKENS_KEPT = 10_000  # stream-read lease tokens remembered per connection
XADD_OPTIONS = {"NOMKSTREAM", "MAXLEN", "MINID", "LIMIT"}
INTEGER = re.compile(rb"-?[0-9]{1,18}")


# --- replies and errors ---------------------------------------------------------------


class Simple(str):
    """A RESP simple string (`+OK`)."""


class _NullArray:
    """A null array: `*-1` in RESP2 (BLPOP timed out, nothing to read), `_` in RESP3."""


NULL_ARRAY = _NullArray()
OK = Simple("OK")


class Hangup(Exception):
    """A blocking command gave up: the client left, or the server is stopping."""


class RespError(Exception):
    """An error reply: `-CODE message`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code, self.message = code, message


Reply: TypeAlias = (
    "int | str | bytes | RespError | _NullArray | list[Reply] | dict[str, Reply] | None"
)


def error_of(exc: SimpleQueueError) -> RespError:
    """The reply for one of our errors: its class's RESP code (simplequeue.errors)."""
    return RespError(exc.resp_code, str(exc))


def _line(text: str) -> bytes:
    """Text for a simple string or an error: one line, whatever it held."""
    return text.replace("\r", " ").replace("\n", " ").encode()


def encode(value: Reply, proto: int, out: bytearray) -> None:
    """Append `value` to `out` as RESP `proto` (2 or 3)."""
    if value is None:
        out += b"_\r\n" if proto == 3 else b"$-1\r\n"
    elif isinstance(value, _NullArray):
        out += b"_\r\n" if proto == 3 else b"*-1\r\n"
    elif isinstance(value, RespError):
        out += b"-" + _line(str(value)) + b"\r\n"
    elif isinstance(value, Simple):
        out += b"+" + _line(value) + b"\r\n"
    elif isinstance(value, int):
        out += b":%d\r\n" % value
    elif isinstance(value, str | bytes):
        data = value.encode() if isinstance(value, str) else value
        out += b"$%d\r\n%b\r\n" % (len(data), data)
    elif isinstance(value, list):
        out += b"*%d\r\n" % len(value)
        for item in value:
            encode(item, proto, out)
    else:
        out += (b"%%%d\r\n" % len(value)) if proto == 3 else (b"*%d\r\n" % (2 * len(value)))
        for key, item in value.items():
            encode(key, proto, out)
            encode(item, proto, out)


# --- arguments -----------------------------------------------------------------------------


def text(arg: bytes, what: str = "arguments") -> str:
    try:
        return arg.decode()
    except UnicodeDecodeError:
        raise RespError("ERR", f"{what} must be UTF-8 text") from None


def topic_of(arg: bytes) -> str:
    """A key names a topic (SPEC section 3): anything else never reaches the engine."""
    return keys.check_topic(text(arg, "keys"))


def integer(arg: bytes) -> int:
    if not INTEGER.fullmatch(arg):
        raise RespError("ERR", "value is not an integer or out of range")
    return int(arg)


def timeout_of(arg: bytes) -> float:
    """BLPOP's timeout in seconds; 0, which in Redis means forever, is math.inf."""
    try:
        seconds = float(arg)
    except ValueError:
        raise RespError("ERR", "timeout is not a float or out of range") from None
    if math.isnan(seconds) or seconds < 0:
        raise RespError("ERR", "timeout is negative")
    return seconds or math.inf


def upper(arg: bytes) -> str:
    return arg.decode("ascii", "replace").upper()


def value_of(payload: Any) -> bytes | str:
    """A payload as one Redis value: a string as it is, anything else as JSON."""
    return payload if isinstance(payload, str) else orjson.dumps(payload)


def fields_of(payload: Any) -> list[Reply]:
    """A payload as a stream entry's flat field list."""
    if not isinstance(payload, dict):
        return ["payload", value_of(payload)]
    return [item for k, v in payload.items() for item in (k, value_of(v))]


# --- the command table ------------------------------------------------------------------

Handler = Callable[["Connection", list[bytes]], Awaitable[Reply]]


@dataclass(frozen=True)
class Command:
    """A command's handler and what the dispatcher checks before calling it."""

    handler: Handler
    min_args: int  # arguments after the command's name
    max_args: int | None  # None: no limit
    flags: tuple[str, ...] = ()  # "blocking", "no_auth", "write" as COMMAND reports them
    first_key: int = 0  # position of the first key (COMMAND INFO), 0 for none


COMMANDS: dict[str, Command] = {}

# Commands that may run together when pipelined: writes that go straight to the
# committer (which keeps their order) and never block.
PIPELINED = frozenset({"LPUSH", "RPUSH", "LPOP", "RPOP", "XADD", "XACK"})
MAX_GROUP = 256


def command(
    names: str | tuple[str, ...],
    min_args: int,
    max_args: int | None = -1,
    *,
    flags: tuple[str, ...] = (),
    first_key: int = 0,
) -> Callable[[Handler], Handler]:
    """Register a Connection method as the handler of `names`; max_args -1 = min_args."""

    def register(handler: Handler) -> Handler:
        top = min_args if max_args == -1 else max_args
        for name in (names,) if isinstance(names, str) else names:
            COMMANDS[name] = Command(handler, min_args, top, flags, first_key)
        return handler

    return register


def command_info(name: str, spec: Command) -> list[Reply]:
    """An entry of COMMAND / COMMAND INFO, in Redis 7's shape."""
    exact = spec.max_args == spec.min_args
    arity = spec.min_args + 1 if exact else -(spec.min_args + 1)
    flags: list[Reply] = [Simple(f) for f in spec.flags]
    key, step = spec.first_key, 1 if spec.first_key else 0
    return [name.lower(), arity, flags, key, key, step, [], [], [], []]


# --- connections ---------------------------------------------------------------------------


@dataclass
class Connection:
    """One client connection: its state, its read loop and its commands."""

    server: RespServer
    id: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: int = 2
    authed: bool = False
    name: str | None = None
    quitting: bool = False
    busy: bool = False  # a command is being executed
    stopping: bool = False  # the server is stopping: no command after this one
    in_multi: bool = False  # between MULTI and EXEC/DISCARD: commands are refused
    # (topic, job id) -> lease token of the claims XREADGROUP answered on this
    # connection, so that XACK commits with the token (at most once).
    tokens: dict[tuple[str, str], str] = field(default_factory=dict)
    # Set when the client leaves or the server stops: blocking commands give up.
    hangup: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def engine(self) -> Engine:
        return self.server.engine

    @property
    def worker_id(self) -> str:
        return self.name or f"resp-{self.id}"

    # --- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Execute requests in order until the client leaves, QUITs or sends garbage."""
        self.writer.transport.set_write_buffer_limits(high=OUTPUT_HIGH_WATER)
        frames: asyncio.Queue[list[bytes] | RespError | None] = asyncio.Queue(QUEUED_FRAMES)
        reading = asyncio.create_task(self._read(frames), name=f"resp-read-{self.id}")
        try:
            ahead: list[list[bytes] | RespError | None] = []  # taken from frames, not run
            while (frame := ahead.pop(0) if ahead else await frames.get()) is not None:
                if isinstance(frame, RespError):  # unparseable: answer, then hang up
                    self._send(frame)
                    break
                group = [frame]
                # Pipelined writes run together, so they share commits: they reach
                # the committer in order, and their replies go out in order.
                while upper(group[-1][0]) in PIPELINED and len(group) < MAX_GROUP:
                    if not ahead and frames.empty():
                        break
                    nxt = ahead.pop(0) if ahead else frames.get_nowait()
                    if nxt is None or isinstance(nxt, RespError) or upper(nxt[0]) not in PIPELINED:
                        ahead.insert(0, nxt)
                        break
                    group.append(nxt)
                self.busy = True
                try:
                    if len(group) == 1:
                        replies = [await self._dispatch(frame)]
                    else:
                        replies = list(await asyncio.gather(*map(self._dispatch, group)))
                except Hangup:
                    break
                finally:
                    self.busy = False
                for reply in replies:
                    self._send(reply)
                if self.quitting or self.stopping:
                    break
                if frames.empty() and not ahead:  # a pipeline's replies go out together
                    await self.writer.drain()
            await self.writer.drain()
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    async def _read(self, frames: asyncio.Queue[list[bytes] | RespError | None]) -> None:
        try:
            await self._read_requests(frames)
        except (ConnectionError, OSError):
            pass  # the client went away
        except RespError as exc:
            await frames.put(exc)
        self.hangup.set()
        await frames.put(None)

    async def _read_requests(self, frames: asyncio.Queue[list[bytes] | RespError | None]) -> None:
        requests = Requests(self.server.settings.max_body)
        while data := await self.reader.read(READ_CHUNK):
            for request in requests.feed(data):
                await frames.put(request)

    def _send(self, reply: Reply) -> None:
        out = bytearray()
        encode(reply, self.protocol, out)
        self.writer.write(out)

    async def _dispatch(self, frame: list[bytes]) -> Reply:
        name = upper(frame[0])
        reply = await self._run(name, frame)
        known = name if name in COMMANDS else "unknown"
        outcome = "error" if isinstance(reply, RespError) else "ok"
        self.server.metrics.resp_commands.labels(known, outcome).inc()
        return reply

    async def _run(self, name: str, frame: list[bytes]) -> Reply:
        spec = COMMANDS.get(name)
        if spec is None:
            shown = name if len(name) <= 64 else name[:64] + "..."
            return RespError("ERR", f"unknown command '{shown}'")
        if not self.authed and "no_auth" not in spec.flags:
            return RespError("NOAUTH", "Authentication required.")
        if self.in_multi and name not in ("EXEC", "DISCARD", "MULTI", "QUIT"):
            return RespError(
                "ERR", "transactions are not supported: not queued (use a pipeline without one)"
            )
        args = frame[1:]
        if len(args) < spec.min_args or (spec.max_args is not None and len(args) > spec.max_args):
            return RespError("ERR", f"wrong number of arguments for '{name.lower()}' command")
        try:
            if "blocking" in spec.flags:
                return await self._until_hangup(spec.handler(self, args))
            return await spec.handler(self, args)
        except Hangup:
            raise
        except RespError as exc:
            return exc
        except SimpleQueueError as exc:
            return error_of(exc)
        except Exception:
            log.exception("RESP %s from client %d failed", name, self.id)
            return RespError("ERR", "internal error")

    async def _until_hangup(self, work: Awaitable[Reply]) -> Reply:
        """Run a blocking command, cancelling it on a hangup: the engine gives back
        a cancelled claim."""
        task = asyncio.ensure_future(work)
        hangup = asyncio.create_task(self.hangup.wait())
        try:
            await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise Hangup
        finally:
            for t in (task, hangup):
                t.cancel()
            await asyncio.gather(task, hangup, return_exceptions=True)

    # --- connection commands -----------------------------------------------------------

    @command("PING", 0, 1, flags=("no_auth",))  # a liveness probe needs no secret
    async def ping(self, args: list[bytes]) -> Reply:
        return args[0] if args else Simple("PONG")

    @command("ECHO", 1)
    async def echo(self, args: list[bytes]) -> Reply:
        return args[0]

    @command("QUIT", 0, None, flags=("no_auth",))
    async def quit(self, args: list[bytes]) -> Reply:
        self.quitting = True
        return OK

    @command("SELECT", 1)
    async def select(self, args: list[bytes]) -> Reply:
        if integer(args[0]) != 0:
            raise RespError("ERR", "DB index is out of range (simplequeue has only db 0)")
        return OK

    @command("AUTH", 1, 2, flags=("no_auth",))
    async def auth(self, args: list[bytes]) -> Reply:
        if self.server.token is None and len(args) == 1:
            raise RespError(
                "ERR",
                "AUTH <password> called without any password configured for the default "
                "user. Are you sure your configuration is correct?",
            )
        self._authenticate(args[-1])
        return OK

    def _authenticate(self, password: bytes) -> None:
        """The username is ignored: the broker's --token is the only credential."""
        token = self.server.token
        if token is not None and not hmac.compare_digest(password, token):
            raise RespError("WRONGPASS", "invalid username-password pair or user is disabled.")
        self.authed = True

    @command("HELLO", 0, None, flags=("no_auth",))
    async def hello(self, args: list[bytes]) -> Reply:
        proto = integer(args[0]) if args else self.protocol
        if proto not in (2, 3):
            raise RespError("NOPROTO", "unsupported protocol version")
        password, name = _hello_options(args[1:])
        if password is not None:
            self._authenticate(password)
        elif not self.authed:
            raise RespError(
                "NOAUTH",
                "HELLO must be called with the client already authenticated, otherwise the "
                "HELLO <proto> AUTH <user> <pass> option can be used to authenticate the "
                "client and select the RESP protocol version at the same time",
            )
        if name is not None:
            self.name = name or None
        self.protocol = proto
        return {
            "server": "simplequeue",
            "version": __version__,
            "proto": proto,
            "id": self.id,
            "mode": "standalone",
            "role": "master",
            "modules": [],
        }

    @command("CLIENT", 1, None)
    async def client(self, args: list[bytes]) -> Reply:
        sub = upper(args[0])
        if sub == "SETINFO" and len(args) == 3:
            if upper(args[1]) not in ("LIB-NAME", "LIB-VER"):
                raise RespError("ERR", f"Unrecognized option '{text(args[1])}'")
            return OK
        if sub == "SETNAME" and len(args) == 2:
            self.name = client_name(args[1]) or None
            return OK
        if sub == "GETNAME" and len(args) == 1:
            return self.name
        if sub == "ID" and len(args) == 1:
            return self.id
        raise RespError("ERR", f"unknown subcommand or wrong number of arguments for '{sub}'")

    @command("COMMAND", 0, None)
    async def command_(self, args: list[bytes]) -> Reply:
        sub = upper(args[0]) if args else ""
        names = [upper(a) for a in args[1:]]
        if not args:
            return [command_info(n, c) for n, c in COMMANDS.items()]
        if sub == "COUNT":
            return len(COMMANDS)
        if sub == "LIST":
            return [n.lower() for n in COMMANDS]
        if sub == "INFO":
            return [command_info(n, COMMANDS[n]) if n in COMMANDS else None for n in names]
        if sub == "DOCS":
            # No docs: redis-cli then builds its hints from its own table.
            return {}
        raise RespError("ERR", f"unknown subcommand '{sub}'. Try COMMAND HELP.")

    # simplequeue has no transactions. MULTI is accepted so that what a client
    # queues after it is refused, not run: EXEC then aborts, as Redis aborts a
    # transaction in which a command failed to queue.

    @command("MULTI", 0)
    async def multi(self, args: list[bytes]) -> Reply:
        if self.in_multi:
            raise RespError("ERR", "MULTI calls can not be nested")
        self.in_multi = True
        return OK

    @command("EXEC", 0)
    async def exec_(self, args: list[bytes]) -> Reply:
        if not self.in_multi:
            raise RespError("ERR", "EXEC without MULTI")
        self.in_multi = False
        raise RespError("EXECABORT", "Transaction discarded: simplequeue has no transactions.")

    @command("DISCARD", 0)
    async def discard(self, args: list[bytes]) -> Reply:
        if not self.in_multi:
            raise RespError("ERR", "DISCARD without MULTI")
        self.in_multi = False
        return OK

    # --- lists: a key is a topic, a value a job's payload ----------------------------------

    @command(("LPUSH", "RPUSH"), 2, None, flags=("write",), first_key=1)
    async def lpush(self, args: list[bytes]) -> Reply:
        """LPUSH and RPUSH both enqueue, in argument order; the reply is LLEN after."""
        topic = topic_of(args[0])
        return await self.engine.push(topic, [{"payload": text(v, "values")} for v in args[1:]])

    @command(("LPOP", "RPOP"), 1, 2, flags=("write",), first_key=1)
    async def lpop(self, args: list[bytes]) -> Reply:
        """LPOP and RPOP both take the next claimable job (priority, then FIFO)."""
        topic = topic_of(args[0])
        if len(args) == 1:
            values = await self._pop(topic, 1)
            return values[0] if values else None
        count = integer(args[1])
        if count < 0:
            raise RespError("ERR", "value is out of range, must be positive")
        if count == 0:
            return []
        return list(await self._pop(topic, count)) or NULL_ARRAY

    async def _pop(self, topic: str, count: int, wait: float = 0.0) -> list[bytes | str]:
        """Claim and complete in one commit: a popped job is done."""
        limit = self.server.settings.max_batch
        jobs = await self.engine.pop(topic, self.worker_id, count=min(count, limit), wait=wait)
        return [value_of(j["payload"]) for j in jobs]

    async def _complete(self, topic: str, jobs: list[dict[str, Any]]) -> list[bytes | str]:
        """Pop semantics: a job is completed once it is handed out. A job whose ack
        fails is not handed out; its lease runs out and it is delivered again."""
        if not jobs:
            return []
        acks = [{"job_id": j["id"], "lease_token": j["lease_token"]} for j in jobs]
        answers = await self.engine.ack_many(topic, acks)
        done = {a["id"] for a in answers if "error" not in a}
        return [value_of(j["payload"]) for j in jobs if j["id"] in done]

    @command(("BLPOP", "BRPOP"), 2, None, flags=("write", "blocking"), first_key=1)
    async def blpop(self, args: list[bytes]) -> Reply:
        """BLPOP key [key ...] timeout: the first key in order with a job wins."""
        topics = list(dict.fromkeys(topic_of(a) for a in args[:-1]))
        deadline = time.monotonic() + timeout_of(args[-1])
        if len(topics) == 1:  # the usual case: one pop, long-polled, one commit
            while True:
                values = await self._pop(topics[0], 1, max(0.0, _left(deadline)))
                if values:
                    return [topics[0], values[0]]
                if _left(deadline) <= 0:
                    return NULL_ARRAY
        while True:
            found = await self._claim_one(topics, deadline)
            if found is None:
                return NULL_ARRAY
            topic, job = found
            values = await self._complete(topic, [job])
            if values:
                return [topic, values[0]]

    async def _claim_one(
        self, topics: list[str], deadline: float
    ) -> tuple[str, dict[str, Any]] | None:
        for topic in topics:  # what is there now, in key order
            jobs = await self.engine.claim(topic, self.worker_id)
            if jobs:
                return topic, jobs[0]
        while (wait := _left(deadline)) > 0:
            got = await self._race(topics, 1, wait)
            if got:
                first, *others = (t for t in topics if t in got)
                # Two keys won at once: one answer; the rest go back uncounted.
                for topic in others:
                    await self._give_back(topic, got[topic])
                return first, got[first][0]
        return None

    async def _race(self, topics: list[str], count: int, wait: float) -> dict[str, list[Any]]:
        """Long-poll every topic at once; the claims that won by the time the first
        did. The others are cancelled, and the engine gives back a cancelled claim."""
        if len(topics) == 1:
            jobs = await self.engine.claim(topics[0], self.worker_id, count=count, wait=wait)
            return {topics[0]: jobs} if jobs else {}
        tasks = {
            t: asyncio.ensure_future(self.engine.claim(t, self.worker_id, count=count, wait=wait))
            for t in topics
        }
        try:
            pending: set[asyncio.Future[Any]] = set(tasks.values())
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(d.exception() is not None or d.result() for d in done):
                    break
        finally:
            for task in tasks.values():
                task.cancel()
            outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
        got = {t: r for t, r in zip(tasks, outcomes, strict=True) if isinstance(r, list) and r}
        failed = [r for r in outcomes if isinstance(r, Exception)]
        if not got and failed:
            raise failed[0]
        return got

    async def _give_back(self, topic: str, jobs: list[dict[str, Any]]) -> None:
        with contextlib.suppress(SimpleQueueError):
            await self.engine.release(topic, jobs)

    @command("LLEN", 1, first_key=1)
    async def llen(self, args: list[bytes]) -> Reply:
        """The topic's pending jobs (delayed ones included), as SPEC section 6 says."""
        counts: dict[str, int] = await self.engine.status(topic_of(args[0]))
        return counts["pending"]

    # --- streams: entries are jobs, consumer groups share one queue ---------------------

    @command("XADD", 4, None, flags=("write",), first_key=1)
    async def xadd(self, args: list[bytes]) -> Reply:
        """XADD key * field value ...: the payload is the object of the fields. An id
        other than * becomes the job's id, so a repeated XADD enqueues once."""
        topic, job_id = topic_of(args[0]), text(args[1], "ids")
        if job_id.upper() in XADD_OPTIONS:
            raise RespError("ERR", f"XADD {job_id.upper()} is not supported: a topic is a queue")
        if len(args) % 2:
            raise RespError("ERR", "wrong number of arguments for 'xadd' command")
        payload = {text(f, "fields"): text(v, "values") for f, v in _pairs(args[2:])}
        spec: dict[str, Any] = {"payload": payload}
        if job_id != "*":
            spec["id"] = job_id
        answers = await self.engine.enqueue(topic, [spec])
        return str(answers[0]["id"])

    @command("XREADGROUP", 6, None, flags=("write", "blocking"))
    async def xreadgroup(self, args: list[bytes]) -> Reply:
        """XREADGROUP GROUP g c [COUNT n] [BLOCK ms] [NOACK] STREAMS key [key ...] > [> ...]:
        claims with the broker's lease; the consumer name is the worker id."""
        read = StreamRead.parse(args, self.server.settings.max_batch)
        deadline = time.monotonic() + read.block
        got: dict[str, list[Any]] = {}
        for topic in read.topics:  # what is there now
            jobs = await self.engine.claim(topic, read.consumer, count=read.count)
            if jobs:
                got[topic] = jobs
        while not got and (wait := _left(deadline)) > 0:
            got = await self._race(read.topics, read.count, wait)
        if not got:
            return NULL_ARRAY
        return await self._entries(got, read.noack)

    async def _entries(self, got: dict[str, list[Any]], noack: bool) -> Reply:
        streams: dict[str, Reply] = {}
        for topic, jobs in got.items():
            if noack:  # NOACK: nothing to acknowledge later, so complete now
                done = set(await self._complete_ids(topic, jobs))
                jobs = [j for j in jobs if j["id"] in done]
            else:
                self._remember(topic, jobs)
            streams[topic] = [[j["id"], fields_of(j["payload"])] for j in jobs]
        if self.protocol == 3:
            return streams
        return [[topic, entries] for topic, entries in streams.items()]

    async def _complete_ids(self, topic: str, jobs: list[dict[str, Any]]) -> list[str]:
        acks = [{"job_id": j["id"], "lease_token": j["lease_token"]} for j in jobs]
        return [a["id"] for a in await self.engine.ack_many(topic, acks) if "error" not in a]

    def _remember(self, topic: str, jobs: list[dict[str, Any]]) -> None:
        for job in jobs:
            self.tokens[(topic, job["id"])] = job["lease_token"]
        while len(self.tokens) > TOKENS_KEPT:  # the oldest claims are acked without token
            del self.tokens[next(iter(self.tokens))]

    @command("XACK", 3, None, flags=("write",), first_key=1)
    async def xack(self, args: list[bytes]) -> Reply:
        """XACK key group id [id ...]: the number of claims completed. A claim this
        connection read is acked with its lease token, so a claim whose lease ran
        out and went to someone else is not completed twice; any other id is acked
        as Redis does, by whoever holds it."""
        topic = topic_of(args[0])
        ids = [text(a, "ids") for a in args[2:]]
        limit = self.server.settings.max_batch
        acked = 0
        for start in range(0, len(ids), limit):
            chunk = ids[start : start + limit]
            acks = [{"job_id": i, "lease_token": self.tokens.get((topic, i))} for i in chunk]
            answers = await self.engine.ack_many(topic, acks)
            acked += sum("error" not in a for a in answers)
            for i in chunk:
                self.tokens.pop((topic, i), None)
        return acked

    @command("XLEN", 1, first_key=1)
    async def xlen(self, args: list[bytes]) -> Reply:
        """Entries not yet acknowledged: pending and claimed jobs."""
        counts = await self.engine.status(topic_of(args[0]))
        return int(counts["pending"] + counts["claimed"])

    @command("XINFO", 1, None)
    async def xinfo(self, args: list[bytes]) -> Reply:
        sub = upper(args[0])
        if sub != "STREAM":
            raise RespError("ERR", f"XINFO {sub} is not supported (XINFO STREAM key is)")
        if len(args) != 2:
            raise RespError("ERR", "XINFO STREAM takes one key (FULL is not supported)")
        counts: dict[str, int] = await self.engine.status(topic_of(args[1]))
        return {
            "length": counts["pending"] + counts["claimed"],
            "groups": 1,  # every group reads the one queue
            "entries-added": counts["enqueued"],
            # Peeking at jobs is no engine operation: the ends are not shown.
            "first-entry": None,
            "last-entry": None,
            "queue": dict(counts),
        }

    @command("XGROUP", 1, None)
    async def xgroup(self, args: list[bytes]) -> Reply:
        """XGROUP CREATE succeeds so that programs written for Redis run: groups
        need no creating here, every group reads the one queue."""
        if upper(args[0]) != "CREATE" or len(args) < 4:
            raise RespError("ERR", f"XGROUP {upper(args[0])} is not supported (CREATE is)")
        topic_of(args[1])
        return OK


def _hello_options(args: list[bytes]) -> tuple[bytes | None, str | None]:
    """HELLO's [AUTH user pass] [SETNAME name]: (password, name)."""
    password: bytes | None = None
    name: str | None = None
    i = 0
    while i < len(args):
        option = upper(args[i])
        if option == "AUTH" and i + 2 < len(args):
            password, i = args[i + 2], i + 3
        elif option == "SETNAME" and i + 1 < len(args):
            name, i = client_name(args[i + 1]), i + 2
        else:
            raise RespError("ERR", f"Syntax error in HELLO option '{text(args[i])}'")
    return password, name


def client_name(arg: bytes) -> str:
    name = text(arg, "client names")
    if len(name) > 256 or any(not c.isprintable() or c.isspace() for c in name):
        raise RespError(
            "ERR", "Client names cannot contain spaces, newlines or special characters."
        )
    return name


class Requests:
    """Splits a client's byte stream into requests. hiredis parses; a request must
    be exactly the canonical encoding of what was parsed, an array of bulk strings
    (what every client sends), which also says where the next request starts.
    Blank lines between requests are skipped, as redis-cli --pipe sends them.
    Anything else raises RespError: the connection is beyond repair."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # bytes a request may take (--max-body)
        self.buffer = bytearray()  # from the start of the next request on
        self.parser = hiredis.Reader()
        self.fed = 0  # bytes of `buffer` the parser has been given

    def feed(self, data: bytes) -> list[list[bytes]]:
        self.buffer += data
        requests: list[list[bytes]] = []
        while (request := self._next()) is not None:
            if request:  # an empty array is ignored, as Redis does
                requests.append(request)
        self._check_size(len(self.buffer))  # what is left is one unfinished request
        return requests

    def _check_size(self, size: int) -> None:
        if size > self.limit:
            raise RespError("ERR", f"Protocol error: request larger than {self.limit} bytes")

    def _next(self) -> list[bytes] | None:
        while True:
            if self.fed == 0:
                self._skip_blank_lines()
                if not self.buffer:
                    return None
                if self.buffer[0] != ord("*"):
                    raise RespError("ERR", "Protocol error: expected '*', an array of bulk strings")
            if self.fed < len(self.buffer):
                self.parser.feed(bytes(self.buffer[self.fed :]))
                self.fed = len(self.buffer)
            try:
                frame = self.parser.gets()
            except hiredis.ProtocolError as exc:
                if self.buffer.startswith((b"\r", b"\n")):  # a blank line after a request
                    self.parser, self.fed = hiredis.Reader(), 0
                    continue
                raise RespError("ERR", f"Protocol error: {exc}") from None
            if frame is False:
                return None
            return self._consume(frame)

    def _skip_blank_lines(self) -> None:
        blank = len(self.buffer) - len(self.buffer.lstrip(b"\r\n"))
        del self.buffer[:blank]

    def _consume(self, frame: Any) -> list[bytes]:
        if not isinstance(frame, list) or not all(isinstance(a, bytes) for a in frame):
            raise RespError("ERR", "Protocol error: expected an array of bulk strings")
        encoded = hiredis.pack_command(tuple(frame))
        self._check_size(len(encoded))
        if not self.buffer.startswith(encoded):
            raise RespError("ERR", "Protocol error: expected an array of bulk strings")
        del self.buffer[: len(encoded)]
        self.fed -= len(encoded)
        return frame


def _pairs(items: list[bytes]) -> Iterable[tuple[bytes, bytes]]:
    return zip(items[::2], items[1::2], strict=True)


def _left(deadline: float) -> float:
    """Seconds a long poll may wait now: at most the engine's limit, so that a
    deadline of math.inf (block forever) is served in rounds of that limit."""
    return min(MAX_WAIT, deadline - time.monotonic())


@dataclass(frozen=True)
class StreamRead:
    """XREADGROUP's arguments."""

    consumer: str
    topics: list[str]
    count: int
    block: float  # seconds to block; 0: do not, math.inf: forever
    noack: bool

    @classmethod
    def parse(cls, args: list[bytes], max_count: int) -> StreamRead:
        if upper(args[0]) != "GROUP":
            raise RespError("ERR", "syntax error: XREADGROUP GROUP group consumer ...")
        text(args[1], "group names")  # every group reads the one queue
        consumer = text(args[2], "consumer names")
        count, block, noack, i = max_count, 0.0, False, 3
        while i < len(args) and upper(args[i]) != "STREAMS":
            option = upper(args[i])
            if option == "COUNT" and i + 1 < len(args):
                count, i = min(max(integer(args[i + 1]), 1), max_count), i + 2
            elif option == "BLOCK" and i + 1 < len(args):
                block, i = _block(args[i + 1]), i + 2
            elif option == "NOACK":
                noack, i = True, i + 1
            else:
                raise RespError("ERR", f"syntax error near '{text(args[i])}'")
        streams = args[i + 1 :]
        if i >= len(args) or not streams or len(streams) % 2:
            raise RespError(
                "ERR",
                "Unbalanced 'xreadgroup' list of streams: for each stream key an ID "
                "or '>' must be specified.",
            )
        half = len(streams) // 2
        if any(s != b">" for s in streams[half:]):
            raise RespError(
                "ERR",
                "only the '>' id is supported: a claim whose lease runs out is "
                "delivered again, there is no per-consumer history to re-read",
            )
        topics = list(dict.fromkeys(topic_of(k) for k in streams[:half]))
        return cls(consumer, topics, count, block, noack)


def _block(arg: bytes) -> float:
    """BLOCK's milliseconds, as seconds; 0 (forever) is math.inf."""
    ms = integer(arg)
    if ms < 0:
        raise RespError("ERR", "timeout is negative")
    return ms / 1000 if ms else math.inf


# --- the listener -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RespSettings:
    token: str | None = None  # with one, AUTH first
    max_body: int = 1024 * 1024  # bytes a request may take
    max_batch: int = 1000  # jobs per engine call


class RespServer:
    """The RESP TCP listener of one broker, beside its HTTP listener."""

    def __init__(self, engine: Engine, metrics: Metrics, settings: RespSettings) -> None:
        self.engine = engine
        self.metrics = metrics
        self.settings = settings
        self.token: bytes | None = settings.token.encode() if settings.token else None
        self.port = 0
        self.addr = ""
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], Connection] = {}
        self._ids = itertools.count(1)

    async def start(self, addr: str) -> None:
        """Listen on HOST:PORT (port 0 picks a free one); `port` and `addr` say where."""
        host, port = parse_addr(addr)
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self.addr = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def connections(self) -> list[Connection]:
        """The client connections open now."""
        return list(self._connections.values())

    async def stop(self) -> None:
        """Stop listening and close every connection: idle and blocked ones at once,
        a command in flight once it is answered (or after SHUTDOWN_GRACE)."""
        if self._server is not None:
            self._server.close()
        handlers = dict(self._connections)
        for task, conn in handlers.items():
            conn.stopping = True
            conn.hangup.set()
            if not conn.busy:
                task.cancel()
        if handlers:
            _, late = await asyncio.wait(handlers, timeout=SHUTDOWN_GRACE)
            for task in late:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, next(self._ids), reader, writer, authed=self.token is None)
        # A task of our own, so that stop() can cancel it without asyncio's stream
        # callback reporting the cancellation as an error.
        task = asyncio.create_task(self._handle(conn), name=f"resp-client-{conn.id}")
        self._connections[task] = conn
        try:
            await asyncio.wait({task})
        finally:
            del self._connections[task]

    async def _handle(self, conn: Connection) -> None:
        try:
            await conn.run()
        except (ConnectionError, OSError):
            pass  # the client went away while we answered
        except Exception:
            log.exception("RESP client %d failed", conn.id)
        finally:
            conn.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await conn.writer.wait_closed()
