"""The RESP commands of SPEC section 6: the command table and every handler.

A handler reads its arguments, makes the same Engine calls the HTTP API makes and
answers a Reply; what it knows of its connection is a Session, and of the server
a Listener, both defined here. It never touches sockets, storage or topic state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import math
import os
import platform
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from simplequeue import __version__, api, keys
from simplequeue.broker.background import in_background
from simplequeue.broker.engine import MAX_WAIT, TopicOps
from simplequeue.broker.resp.reads import ReadBudget, Reads
from simplequeue.broker.resp.wire import NULL_ARRAY, OK, Reply, RespError, Simple, upper
from simplequeue.errors import InvalidRequest, SimpleQueueError

log = logging.getLogger(__name__)

REDIS_VERSION = "7.2.0"  # INFO's redis_version: the Redis whose commands we answer
# Keys one BLPOP/BRPOP, or streams one XREADGROUP, may name: each is a long
# poll of its own (store reads, memory), and one request could name 85,000.
MAX_KEYS = 100
XADD_OPTIONS = {"NOMKSTREAM", "MAXLEN", "MINID", "LIMIT"}
INTEGER = re.compile(rb"-?[0-9]{1,18}")
AUTH_ATTEMPTS = 3  # failed AUTHs a connection may make; the last one closes it
AUTH_DELAY = 0.1  # seconds a failed AUTH waits per failure so far, before answering


# --- what a command sees of its connection and its server -----------------------------


class Listener(Protocol):
    """The server that accepted the connection, as far as the commands use it."""

    @property
    def engine(self) -> TopicOps: ...

    @property
    def token(self) -> bytes | None:
        """The password AUTH wants (--token); None: none is needed."""

    @property
    def max_batch(self) -> int:
        """Jobs one engine call may take."""

    @property
    def claim_bytes(self) -> int:
        """Payload bytes one command claims for its answer (an XREADGROUP of
        many streams): past them, it claims no further stream."""

    @property
    def port(self) -> int:
        """The TCP port it listens on."""

    @property
    def uptime(self) -> float:
        """Seconds since it was made (with the broker)."""

    @property
    def client_count(self) -> int:
        """Client connections open now."""

    @property
    def read_budget(self) -> ReadBudget:
        """What its connections may remember of their stream reads together."""


@dataclass
class Session:
    """One client connection as its commands see it: what the client has said so far
    (protocol, auth, name, MULTI) and the lease tokens of its stream reads. The
    connection holds one and sends its replies; the commands read and change it."""

    id: int
    listener: Listener
    authed: bool = False
    protocol: int = 2
    name: str | None = None
    closing: bool = False  # close once this reply is sent: QUIT, or AUTH failed too often
    failed_auths: int = 0  # wrong passwords so far (AUTH, HELLO AUTH)
    in_multi: bool = False  # between MULTI and EXEC/DISCARD: commands are refused
    # The lease tokens of the claims XREADGROUP answered on this connection, so
    # that XACK commits with the token (at most once).
    reads: Reads = field(init=False)
    # While pops run (a pipelined group with some, or one alone; the connection
    # sets it): those that took jobs, by topic, attempt id and worker id ("":
    # a completion of claims, engine.complete). Should the client be gone when
    # they end, their replies reaching nobody, or the group be cut short, they
    # are given back (unpop); else forgotten (forget_pop). Their records are
    # held for that until then (the engine's pop and complete, `held`).
    owing: list[tuple[str, str, str]] | None = None

    def __post_init__(self) -> None:
        self.reads = Reads(self.listener.read_budget)

    @property
    def engine(self) -> TopicOps:
        return self.listener.engine

    @property
    def worker_id(self) -> str:
        return self.name or f"resp-{self.id}"


# --- the command table ------------------------------------------------------------------

Handler = Callable[[Session, list[bytes]], Awaitable[Reply]]


@dataclass(frozen=True)
class Command:
    """A command's handler and what the dispatcher checks before calling it."""

    handler: Handler
    min_args: int  # arguments after the command's name
    max_args: int | None  # None: no limit
    flags: tuple[str, ...] = ()  # "blocking", "no_auth", "write" as COMMAND reports them
    first_key: int = 0  # position of the first key (COMMAND INFO), 0 for none

    @property
    def blocking(self) -> bool:
        """It may wait for a job: the connection gives up on it when the client leaves."""
        return "blocking" in self.flags


COMMANDS: dict[str, Command] = {}

# Commands that may run together when pipelined: writes that go straight to the
# committer (which keeps their order) and never block.
PIPELINED = frozenset({"LPUSH", "RPUSH", "LPOP", "RPOP", "XADD", "XACK"})

# Commands that hand out jobs completed in the commit that takes them, and do
# not block: the connection names their pops (Session.owing) and gives them
# back if their client is gone once they end, as it does a BLPOP of one key's.
POPS = frozenset({"LPOP", "RPOP"})


def names_its_pops(frame: list[bytes]) -> bool:
    """Whether the request `frame` hands out jobs it completes by commits it
    names in Session.owing, to be given back should its reply not go out:
    LPOP and RPOP, BLPOP and BRPOP (of one key a pop; of several a claim,
    then its completion), and XREADGROUP NOACK (a claim, then its
    completion)."""
    name = upper(frame[0])
    if name in POPS or name in ("BLPOP", "BRPOP"):
        return True
    if name != "XREADGROUP":
        return False
    # Its options, after GROUP group consumer (either may be named STREAMS or
    # NOACK) and up to STREAMS (a stream may be named NOACK), as
    # StreamRead.parse reads them.
    for arg in frame[4:]:
        option = upper(arg)
        if option == "STREAMS":
            return False
        if option == "NOACK":
            return True
    return False


def pipelined(frame: list[bytes]) -> bool:
    """Whether the request `frame` may run together with the pipelined writes
    around it (PIPELINED). `LPOP key 0` may not: it pops nothing, and is
    answered from a read of the topic that would not wait for a push sent
    before it in the same group."""
    name = upper(frame[0])
    if name not in PIPELINED:
        return False
    return name not in POPS or _pop_count(frame) != 0


def jobs_asked(frame: list[bytes]) -> int:
    """Jobs at most whose values the reply to the pipelined write `frame` holds:
    a pop's count (1 without one), none for any other."""
    if upper(frame[0]) not in POPS:
        return 0
    return max(1, _pop_count(frame) or 0)


def _pop_count(frame: list[bytes]) -> int | None:
    """The count a pop `frame` gives, if it gives one that is an integer (else
    its command refuses it, or pops one)."""
    if len(frame) == 3 and INTEGER.fullmatch(frame[2]):
        return int(frame[2])
    return None


def command(
    names: str | tuple[str, ...],
    min_args: int,
    max_args: int | None = -1,
    *,
    flags: tuple[str, ...] = (),
    first_key: int = 0,
) -> Callable[[Handler], Handler]:
    """Register a function as the handler of `names`; max_args -1 = min_args."""

    def register(handler: Handler) -> Handler:
        top = min_args if max_args == -1 else max_args
        for name in (names,) if isinstance(names, str) else names:
            COMMANDS[name] = Command(handler, min_args, top, flags, first_key)
        return handler

    return register


def admitted(session: Session, name: str, args: list[bytes]) -> Command:
    """The command `name`, if the session may run it now with `args`; else RespError."""
    spec = COMMANDS.get(name)
    if spec is None:
        raise RespError("ERR", f"unknown command '{shown(name)}'")
    if not session.authed and "no_auth" not in spec.flags:
        raise RespError("NOAUTH", "Authentication required.")
    if session.in_multi and name not in ("EXEC", "DISCARD", "MULTI", "QUIT"):
        raise RespError(
            "ERR", "transactions are not supported: not queued (use a pipeline without one)"
        )
    if len(args) < spec.min_args or (spec.max_args is not None and len(args) > spec.max_args):
        raise RespError("ERR", f"wrong number of arguments for '{name.lower()}' command")
    return spec


def command_info(name: str, spec: Command) -> list[Reply]:
    """An entry of COMMAND / COMMAND INFO, in Redis 7's shape."""
    exact = spec.max_args == spec.min_args
    arity = spec.min_args + 1 if exact else -(spec.min_args + 1)
    flags: list[Reply] = [Simple(f) for f in spec.flags]
    key, step = spec.first_key, 1 if spec.first_key else 0
    return [name.lower(), arity, flags, key, key, step, [], [], [], []]


# --- arguments -----------------------------------------------------------------------------


# Characters of an argument an error message repeats, at most: a client's
# request may take --max-body, its refusal need not (nor its buffered replies).
SHOWN = 64


def shown(arg: bytes | str) -> str:
    """An argument as an error message repeats it: cut to SHOWN characters."""
    said = arg if isinstance(arg, str) else arg.decode("utf-8", "replace")
    return said if len(said) <= SHOWN else said[:SHOWN] + "..."


def text(arg: bytes, what: str = "arguments") -> str:
    try:
        return arg.decode()
    except UnicodeDecodeError:
        raise RespError("ERR", f"{what} must be UTF-8 text") from None


def topic_of(arg: bytes) -> str:
    """A key names a topic (SPEC section 3): anything else never reaches the engine."""
    return keys.check_topic(text(arg, "keys"))


def at_most_keys(count: int, what: str) -> None:
    """A blocking read waits on each key at once: MAX_KEYS of them at most."""
    if count > MAX_KEYS:
        raise RespError("ERR", f"at most {MAX_KEYS} {what} a blocking read (each one is waited on)")


def integer(arg: bytes) -> int:
    if not INTEGER.fullmatch(arg):
        raise RespError("ERR", "value is not an integer or out of range")
    return int(arg)


# A number as Redis reads a timeout (strtold, the whole argument, no NaN): no
# space around it, no "_" between digits, which Python's float() would take.
_TIMEOUT = re.compile(rb"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?)", re.I)
_TIMEOUT_MS_MAX = 2**63 - 1  # Redis keeps a timeout as a long long of milliseconds


def timeout_of(arg: bytes) -> float:
    """BLPOP's timeout in seconds; 0, which in Redis means forever, is math.inf.
    What Redis refuses is refused with its words, never waited on."""
    if not _TIMEOUT.fullmatch(arg):  # "nan", "x", " 1", "1_0"
        raise RespError("ERR", "timeout is not a float or out of range")
    seconds = float(arg)
    if seconds == 0 and arg.lower().partition(b"e")[0].strip(b"+-.0"):
        # Below a double's range ("1e-400"), yet not 0: Redis reads a long
        # double and rounds its milliseconds up, so it waits 1 ms, not for ever.
        seconds = math.copysign(0.001, seconds)
    if seconds < 0:
        raise RespError("ERR", "timeout is negative")
    if seconds * 1000 > _TIMEOUT_MS_MAX:  # "inf", "1e30"
        raise RespError("ERR", "timeout is out of range")
    return seconds or math.inf


def client_name(arg: bytes) -> str:
    name = text(arg, "client names")
    if len(name) > 256 or any(not c.isprintable() or c.isspace() for c in name):
        raise RespError(
            "ERR", "Client names cannot contain spaces, newlines or special characters."
        )
    return name


def value_of(payload: Any) -> bytes | str:
    """A payload as one Redis value: a string as it is, anything else as JSON."""
    return payload if isinstance(payload, str) else orjson.dumps(payload)


def fields_of(payload: Any) -> list[Reply]:
    """A payload as a stream entry's flat field list."""
    if not isinstance(payload, dict):
        return ["payload", value_of(payload)]
    return [item for k, v in payload.items() for item in (k, value_of(v))]


def _pairs(items: list[bytes]) -> Iterable[tuple[bytes, bytes]]:
    return zip(items[::2], items[1::2], strict=True)


def _left(deadline: float) -> float:
    """Seconds a long poll may wait now: at most the engine's limit, so that a
    deadline of math.inf (block forever) is served in rounds of that limit,
    each keeping the command's place in line (`since`: when it came)."""
    return min(MAX_WAIT, deadline - time.monotonic())


# --- connection commands -----------------------------------------------------------


@command("PING", 0, 1)  # with --token, a probe authenticates too (or uses /healthz)
async def ping(session: Session, args: list[bytes]) -> Reply:
    return args[0] if args else Simple("PONG")


@command("ECHO", 1)
async def echo(session: Session, args: list[bytes]) -> Reply:
    return args[0]


@command("QUIT", 0, None, flags=("no_auth",))
async def quit_(session: Session, args: list[bytes]) -> Reply:
    session.closing = True
    return OK


@command("SELECT", 1)
async def select(session: Session, args: list[bytes]) -> Reply:
    if integer(args[0]) != 0:
        raise RespError("ERR", "DB index is out of range (simplequeue has only db 0)")
    return OK


@command("AUTH", 1, 2, flags=("no_auth",))
async def auth(session: Session, args: list[bytes]) -> Reply:
    if session.listener.token is None and len(args) == 1:
        raise RespError(
            "ERR",
            "AUTH <password> called without any password configured for the default "
            "user. Are you sure your configuration is correct?",
        )
    await _authenticate(session, args[-1])
    return OK


async def _authenticate(session: Session, password: bytes) -> None:
    """The username is ignored: the broker's --token is the only credential. Each
    failure waits longer before it is answered, and the last one allowed closes
    the connection, so that guessing the token is slow; other connections go on."""
    token = session.listener.token
    if token is None or hmac.compare_digest(password, token):
        session.authed = True
        return
    session.failed_auths += 1
    await asyncio.sleep(AUTH_DELAY * session.failed_auths)
    if session.failed_auths >= AUTH_ATTEMPTS:
        log.warning("RESP client %d: %d failed AUTH, closing", session.id, AUTH_ATTEMPTS)
        session.closing = True
    raise RespError("WRONGPASS", "invalid username-password pair or user is disabled.")


@command("HELLO", 0, None, flags=("no_auth",))
async def hello(session: Session, args: list[bytes]) -> Reply:
    proto = integer(args[0]) if args else session.protocol
    if proto not in (2, 3):
        raise RespError("NOPROTO", "unsupported protocol version")
    password, name = _hello_options(args[1:])
    if password is not None:
        await _authenticate(session, password)
    elif not session.authed:
        raise RespError(
            "NOAUTH",
            "HELLO must be called with the client already authenticated, otherwise the "
            "HELLO <proto> AUTH <user> <pass> option can be used to authenticate the "
            "client and select the RESP protocol version at the same time",
        )
    if name is not None:
        session.name = name or None
    session.protocol = proto
    return {
        "server": "simplequeue",
        "version": __version__,
        "proto": proto,
        "id": session.id,
        "mode": "standalone",
        "role": "master",
        "modules": [],
    }


def _ack_of(session: Session, topic: str, job_id: str) -> api.AckRequest | None:
    """The ack of an XACK id: with the token this connection read it under,
    without one for an id it never read. None for one whose token it forgot
    (its claim may be someone else's by now) or an id no job can have: it
    acks nothing."""
    token = session.reads.token((topic, job_id))
    if token is None and session.reads.forgot((topic, job_id)):
        return None
    try:
        return api.convert({"job_id": job_id, "lease_token": token}, api.AckRequest)
    except SimpleQueueError:
        return None


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
            raise RespError("ERR", f"Syntax error in HELLO option '{shown(args[i])}'")
    return password, name


@command("CLIENT", 1, None)
async def client(session: Session, args: list[bytes]) -> Reply:
    sub = upper(args[0])
    if sub == "SETINFO" and len(args) == 3:
        if upper(args[1]) not in ("LIB-NAME", "LIB-VER"):
            raise RespError("ERR", f"Unrecognized option '{shown(args[1])}'")
        return OK
    if sub == "SETNAME" and len(args) == 2:
        session.name = client_name(args[1]) or None
        return OK
    if sub == "GETNAME" and len(args) == 1:
        return session.name
    if sub == "ID" and len(args) == 1:
        return session.id
    raise RespError("ERR", f"unknown subcommand or wrong number of arguments for '{shown(sub)}'")


@command("COMMAND", 0, None)
async def command_(session: Session, args: list[bytes]) -> Reply:
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
    raise RespError("ERR", f"unknown subcommand '{shown(sub)}'. Try COMMAND HELP.")


@command("INFO", 0, None)
async def info(session: Session, args: list[bytes]) -> Reply:
    """INFO [section ...]: Redis' INFO text, with the sections clients and monitoring
    tools read (ioredis waits for `loading:0`). A section we do not have is empty."""
    asked = {upper(a) for a in args} or {"DEFAULT"}
    everything = not asked.isdisjoint({"DEFAULT", "ALL", "EVERYTHING"})
    sections = _info_sections(session.listener)
    return "\r\n".join(
        f"# {title}\r\n" + "".join(f"{key}:{value}\r\n" for key, value in fields.items())
        for title, fields in sections.items()
        if everything or title.upper() in asked
    )


def _info_sections(listener: Listener) -> dict[str, dict[str, str | int]]:
    """INFO's sections, in Redis' order, each a title and its fields."""
    uptime = int(listener.uptime)
    system = platform.uname()
    return {
        "Server": {
            "redis_version": REDIS_VERSION,
            "redis_mode": "standalone",
            "os": f"{system.system} {system.release} {system.machine}",
            "arch_bits": 64 if sys.maxsize > 2**32 else 32,
            "process_id": os.getpid(),
            "tcp_port": listener.port,
            "uptime_in_seconds": uptime,
            "uptime_in_days": uptime // 86400,
            "simplequeue_version": __version__,
        },
        "Clients": {"connected_clients": listener.client_count},
        "Persistence": {"loading": 0, "async_loading": 0},  # never loading: no dataset
        "Replication": {"role": "master", "connected_slaves": 0},
        "Keyspace": {},  # topics are no Redis databases
    }


# simplequeue has no transactions. MULTI is accepted so that what a client
# queues after it is refused, not run: EXEC then aborts, as Redis aborts a
# transaction in which a command failed to queue.


@command("MULTI", 0)
async def multi(session: Session, args: list[bytes]) -> Reply:
    if session.in_multi:
        raise RespError("ERR", "MULTI calls can not be nested")
    session.in_multi = True
    return OK


@command("EXEC", 0)
async def exec_(session: Session, args: list[bytes]) -> Reply:
    if not session.in_multi:
        raise RespError("ERR", "EXEC without MULTI")
    session.in_multi = False
    raise RespError("EXECABORT", "Transaction discarded: simplequeue has no transactions.")


@command("DISCARD", 0)
async def discard(session: Session, args: list[bytes]) -> Reply:
    if not session.in_multi:
        raise RespError("ERR", "DISCARD without MULTI")
    session.in_multi = False
    return OK


# --- lists: a key is a topic, a value a job's payload ----------------------------------


@command(("LPUSH", "RPUSH"), 2, None, flags=("write",), first_key=1)
async def lpush(session: Session, args: list[bytes]) -> Reply:
    """LPUSH and RPUSH both enqueue, in argument order; the reply is LLEN after."""
    topic = topic_of(args[0])
    return await session.engine.push(topic, [api.JobSpec(text(v, "values")) for v in args[1:]])


@command(("LPOP", "RPOP"), 1, 2, flags=("write",), first_key=1)
async def lpop(session: Session, args: list[bytes]) -> Reply:
    """LPOP and RPOP both take the next claimable job (priority, then FIFO)."""
    topic = topic_of(args[0])
    if len(args) == 1:
        values = await _pop(session, topic, 1)
        return values[0] if values else None
    count = integer(args[1])
    if count < 0:
        raise RespError("ERR", "value is out of range, must be positive")
    if count == 0:  # as Redis: an empty array for a list that exists (has values)
        counts: dict[str, int] = await session.engine.status(topic)
        return [] if counts["pending"] + counts["delayed"] else NULL_ARRAY
    if count > (limit := session.listener.max_batch):
        # Fewer than asked for would pass for a list that ran short.
        raise RespError("ERR", f"at most {limit} values a pop (the batch limit): pop in parts")
    return list(await _pop(session, topic, count)) or NULL_ARRAY


async def _pop(
    session: Session, topic: str, count: int, wait: float = 0.0, since: float | None = None
) -> list[bytes | str]:
    """Claim and complete in one commit: a popped job is done (named, to be
    undone should its reply not go out, when the connection asks: Session.owing).
    A long poll waits in line from `since` (when its command came)."""
    owing = session.owing
    attempt_id = None if owing is None else api.new_id()
    jobs = await session.engine.pop(
        topic,
        session.worker_id,
        count=count,
        wait=wait,
        attempt_id=attempt_id,
        since=since,
        held=attempt_id is not None,
    )
    if owing is not None and attempt_id is not None and jobs:
        owing.append((topic, attempt_id, session.worker_id))
    return [value_of(j["payload"]) for j in jobs]


async def _complete(
    session: Session, topic: str, jobs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Pop semantics: claimed jobs are completed as they are handed out (and
    given back if the client leaves first: named, as a pop is, in
    Session.owing). Those still held, which are handed out."""
    if not jobs:
        return []
    owing = session.owing
    attempt_id = None if owing is None else api.new_id()
    held = attempt_id is not None
    done = set(await session.engine.complete(topic, jobs, attempt_id=attempt_id, held=held))
    if owing is not None and attempt_id is not None and done:
        owing.append((topic, attempt_id, ""))
    return [j for j in jobs if j["id"] in done]


@command(("BLPOP", "BRPOP"), 2, None, flags=("write", "blocking"), first_key=1)
async def blpop(session: Session, args: list[bytes]) -> Reply:
    """BLPOP key [key ...] timeout: the first key in order with a job wins."""
    at_most_keys(len(args) - 1, "keys")
    topics = list(dict.fromkeys(topic_of(a) for a in args[:-1]))
    since = time.monotonic()
    deadline = since + timeout_of(args[-1])
    if len(topics) == 1:  # the usual case: one pop, long-polled, one commit
        while True:
            values = await _pop(session, topics[0], 1, max(0.0, _left(deadline)), since)
            if values:
                return [topics[0], values[0]]
            if _left(deadline) <= 0:
                return NULL_ARRAY
    while True:
        found = await _claim_one(session, topics, since, deadline)
        if found is None:
            return NULL_ARRAY
        topic, job = found
        with _or_given_back(session, {topic: [job]}):
            done = await _complete(session, topic, [job])
        if done:
            return [topic, value_of(done[0]["payload"])]


async def _claim_one(
    session: Session, topics: list[str], since: float, deadline: float
) -> tuple[str, dict[str, Any]] | None:
    for topic in topics:  # what is there now, in key order
        jobs = await session.engine.claim(topic, session.worker_id)
        if jobs:
            return topic, jobs[0]
    while (wait := _left(deadline)) > 0:
        got = await _race(session, topics, 1, wait, since)
        if got:
            with _or_given_back(session, got):
                first = await _keep_first(session, topics, got)
            return first, got[first][0]
    return None


async def _race(
    session: Session, topics: list[str], count: int, wait: float, since: float
) -> dict[str, list[Any]]:
    """Long-poll every topic at once, each in its line from `since`; the claims
    that won by the time the first did. The others are cancelled, and the
    engine gives back a cancelled claim."""
    engine, worker = session.engine, session.worker_id

    def claim(topic: str) -> Awaitable[list[dict[str, Any]]]:
        return engine.claim(topic, worker, count=count, wait=wait, since=since)

    if len(topics) == 1:
        jobs = await claim(topics[0])
        return {topics[0]: jobs} if jobs else {}
    tasks = {t: asyncio.ensure_future(claim(t)) for t in topics}

    async def settle() -> tuple[dict[str, list[Any]], list[BaseException]]:
        for task in tasks.values():
            task.cancel()
        outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
        got = {t: r for t, r in zip(tasks, outcomes, strict=True) if isinstance(r, list) and r}
        return got, [r for r in outcomes if isinstance(r, Exception)]

    try:
        pending: set[asyncio.Future[Any]] = set(tasks.values())
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(d.exception() is not None or d.result() for d in done):
                break
        got, failed = await settle()
    except BaseException:  # cancelled (the client left), also while settling: claims go back
        for topic, task in tasks.items():
            task.cancel()
            task.add_done_callback(functools.partial(_give_back_claimed, session, topic))
        await asyncio.wait(tasks.values())
        raise
    if not got and failed:
        raise failed[0]
    return got


async def _keep_first(session: Session, topics: list[str], got: dict[str, list[Any]]) -> str:
    """Several topics won at once: the first of `topics` in `got` is kept (one
    answer); the others' claims are taken out of `got` and go back uncounted."""
    first, *others = (t for t in topics if t in got)
    for topic in others:
        await _give_back(session, topic, got.pop(topic))
    return first


async def _give_back(session: Session, topic: str, jobs: list[dict[str, Any]]) -> None:
    with contextlib.suppress(SimpleQueueError):
        await session.engine.release(topic, jobs)


def _give_back_claimed(session: Session, topic: str, task: asyncio.Future[Any]) -> None:
    """A long poll of a command that is ending: what it claimed, if anything, goes back."""
    if not task.cancelled() and task.exception() is None and task.result():
        _give_back_later(session, {topic: task.result()})


def _give_back_later(session: Session, got: dict[str, list[dict[str, Any]]]) -> None:
    """Give claims back in the background: the command that took them is
    ending (its client left), and its connection need not wait for a write."""
    for topic, jobs in got.items():
        in_background(_give_back(session, topic, jobs))


@contextlib.contextmanager
def _or_given_back(session: Session, got: dict[str, list[dict[str, Any]]]) -> Iterator[None]:
    """Claims a command hands out in the block: if it fails or is cancelled
    (the client left), they go back to pending, uncounted. A claim completed
    meanwhile is not held any more and is left alone (the engine undoes a
    completion nobody was answered)."""
    held = dict(got)  # as they are now: the block may take some out
    try:
        yield
    except BaseException:
        _give_back_later(session, held)
        raise


@command("LLEN", 1, first_key=1)
async def llen(session: Session, args: list[bytes]) -> Reply:
    """The topic's pending jobs (delayed ones included), as SPEC section 6 says."""
    counts: dict[str, int] = await session.engine.status(topic_of(args[0]))
    return counts["pending"] + counts["delayed"]


# --- streams: entries are jobs, consumer groups share one queue ---------------------


@command("XADD", 4, None, flags=("write",), first_key=1)
async def xadd(session: Session, args: list[bytes]) -> Reply:
    """XADD key * field value ...: the payload is the object of the fields. An id
    other than * becomes the job's id, so a repeated XADD enqueues once."""
    topic, job_id = topic_of(args[0]), text(args[1], "ids")
    if job_id.upper() in XADD_OPTIONS:
        raise RespError("ERR", f"XADD {job_id.upper()} is not supported: a topic is a queue")
    if len(args) % 2:
        raise RespError("ERR", "wrong number of arguments for 'xadd' command")
    pairs = [(text(f, "fields"), text(v, "values")) for f, v in _pairs(args[2:])]
    payload = dict(pairs)
    if len(payload) < len(pairs):  # Redis keeps both; an object cannot: say so
        raise RespError("ERR", "XADD with a field given twice: a job's payload is an object")
    spec: dict[str, Any] = {"payload": payload}
    if job_id != "*":
        spec["id"] = job_id
    answers = await session.engine.enqueue(topic, [api.convert(spec, api.JobSpec)])
    return str(answers[0]["id"])


@command("XREADGROUP", 6, None, flags=("write", "blocking"))
async def xreadgroup(session: Session, args: list[bytes]) -> Reply:
    """XREADGROUP GROUP g c [COUNT n] [BLOCK ms] [NOACK] STREAMS key [key ...] > [> ...]:
    claims with the topic's lease setting, else the broker's --lease; the
    consumer name is the worker id."""
    read = StreamRead.parse(args, session.listener.max_batch)
    since = time.monotonic()
    deadline = since + read.block
    # One answer holds a claim's bytes or so (Listener.claim_bytes), whatever
    # the number of streams: each claim answers that much at most, and 100
    # streams answered together held 100 times it (1.6 GiB), far past the
    # connection's output limit. Streams past it are not claimed: they wait
    # for the next read.
    budget = session.listener.claim_bytes
    got: dict[str, list[Any]] = {}
    try:
        held = 0  # payload bytes claimed so far
        for topic in read.topics:  # what is there now
            jobs = await session.engine.claim(topic, read.consumer, count=read.count)
            if jobs:
                got[topic] = jobs
                if read.noack:  # one stream per NOACK reply: see below
                    break
                held += _payload_bytes(jobs)
                if held >= budget:
                    break
    except BaseException:  # a later stream failed, or the client left: none is answered
        _give_back_later(session, got)
        raise
    while not got and (wait := _left(deadline)) > 0:
        got = await _race(session, read.topics, read.count, wait, since)
    if not got:
        return NULL_ARRAY
    with _or_given_back(session, got):
        if read.noack:
            # Its entries are completed as they are handed out, in one commit
            # that is undone if the client leaves first. Streams completed one
            # after another could not all be undone: one stream is answered.
            await _keep_first(session, read.topics, got)
        else:
            await _keep_within(session, read.topics, got, budget)
        return await _entries(session, got, read.noack)


def _payload_bytes(jobs: list[dict[str, Any]]) -> int:
    """What the payloads of `jobs` take as JSON, as a claim measures them."""
    return sum(len(orjson.dumps(job["payload"])) for job in jobs)


async def _keep_within(
    session: Session, topics: list[str], got: dict[str, list[Any]], budget: int
) -> None:
    """Several streams won at once: those first in `topics` in `got` are
    kept while the payloads kept are under `budget` bytes (the first, however
    large); the others' claims are taken out of `got` and go back uncounted."""
    held = 0
    for topic in [t for t in topics if t in got]:
        if held >= budget:
            await _give_back(session, topic, got.pop(topic))
        else:
            held += _payload_bytes(got[topic])


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
        try:  # the worker id of its claims: as HTTP checks one
            api.convert({"worker_id": consumer}, api.WorkerName)
        except InvalidRequest:
            raise RespError(
                "ERR", "consumer names are 1 to 256 characters, none of them control ones"
            ) from None
        count, block, noack, i = max_count, 0.0, False, 3
        while i < len(args) and upper(args[i]) != "STREAMS":
            option = upper(args[i])
            if option == "COUNT" and i + 1 < len(args):
                asked = integer(args[i + 1])  # 0 or less: no limit, as Redis reads it
                count, i = (min(asked, max_count) if asked > 0 else max_count), i + 2
            elif option == "BLOCK" and i + 1 < len(args):
                block, i = _block(args[i + 1]), i + 2
            elif option == "NOACK":
                noack, i = True, i + 1
            else:
                raise RespError("ERR", f"syntax error near '{shown(args[i])}'")
        streams = args[i + 1 :]
        if i >= len(args) or not streams or len(streams) % 2:
            raise RespError(
                "ERR",
                "Unbalanced 'xreadgroup' list of streams: for each stream key an ID "
                "or '>' must be specified.",
            )
        half = len(streams) // 2
        at_most_keys(half, "streams")
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


async def _entries(session: Session, got: dict[str, list[Any]], noack: bool) -> Reply:
    streams: dict[str, Reply] = {}
    for topic, jobs in got.items():
        if noack:  # NOACK: nothing to acknowledge later, so complete now
            jobs = await _complete(session, topic, jobs)
        else:
            session.reads.remember(topic, jobs)
        streams[topic] = [[j["id"], fields_of(j["payload"])] for j in jobs]
    if session.protocol == 3:
        return streams
    return [[topic, entries] for topic, entries in streams.items()]


@command("XACK", 3, None, flags=("write",), first_key=1)
async def xack(session: Session, args: list[bytes]) -> Reply:
    """XACK key group id [id ...]: the number of claims completed. A claim this
    connection read is acked with its lease token, so a claim whose lease ran
    out and went to someone else is not completed twice (one whose token it
    dropped counts 0: see reads.py); any other id is acked as Redis does, by
    whoever holds it. A token is kept until its ack succeeds, so that the XACK
    again of a claim that moved on counts 0 again."""
    topic = topic_of(args[0])
    ids = [text(a, "ids") for a in args[2:]]
    limit = session.listener.max_batch
    acked = 0
    for start in range(0, len(ids), limit):
        chunk = ids[start : start + limit]
        acks = [a for i in chunk if (a := _ack_of(session, topic, i))]
        if not acks:
            continue
        answers = await session.engine.ack_many(topic, acks)
        for ack, answer in zip(acks, answers, strict=True):
            if "error" not in answer:
                acked += 1
                session.reads.acked((topic, ack.job_id))
    return acked


@command("XDEL", 2, None, flags=("write",), first_key=1)
async def xdel(session: Session, args: list[bytes]) -> Reply:
    """XDEL key id [id ...]: cancels those jobs (SPEC 10), pending, delayed or
    claimed (a claim's holder is told at its next heartbeat or ack); the number
    cancelled, as Redis answers the number of entries deleted. A job that
    finished already counts 0."""
    topic = topic_of(args[0])
    ids = [text(a, "ids") for a in args[1:]]
    limit = session.listener.max_batch
    chunks = [ids[start : start + limit] for start in range(0, len(ids), limit)]
    for chunk in chunks:  # every id checked before any is cancelled: refused, none is
        api.convert({"job_ids": chunk}, api.CancelRequest)
    cancelled = 0
    for chunk in chunks:
        cancelled += len((await session.engine.cancel(topic, chunk))["cancelled"])
    return cancelled


@command("XLEN", 1, first_key=1)
async def xlen(session: Session, args: list[bytes]) -> Reply:
    """Entries not yet acknowledged: pending and claimed jobs."""
    counts = await session.engine.status(topic_of(args[0]))
    return int(counts["pending"] + counts["delayed"] + counts["claimed"])


@command("XINFO", 1, None)
async def xinfo(session: Session, args: list[bytes]) -> Reply:
    sub = upper(args[0])
    if sub != "STREAM":
        raise RespError("ERR", f"XINFO {shown(sub)} is not supported (XINFO STREAM key is)")
    if len(args) != 2:
        raise RespError("ERR", "XINFO STREAM takes one key (FULL is not supported)")
    counts: dict[str, int] = await session.engine.status(topic_of(args[1]))
    return {
        "length": counts["pending"] + counts["delayed"] + counts["claimed"],
        "groups": 1,  # every group reads the one queue
        "entries-added": counts["enqueued"],
        # Peeking at jobs is no engine operation: the ends are not shown.
        "first-entry": None,
        "last-entry": None,
        "queue": dict(counts),
    }


@command("XGROUP", 1, None)
async def xgroup(session: Session, args: list[bytes]) -> Reply:
    """XGROUP CREATE succeeds so that programs written for Redis run: groups
    need no creating here, every group reads the one queue."""
    if upper(args[0]) != "CREATE" or len(args) < 4:
        raise RespError("ERR", f"XGROUP {shown(upper(args[0]))} is not supported (CREATE is)")
    topic_of(args[1])
    return OK
