"""The RESP listener of SPEC section 6 (`--redis-addr`) and its client connections.

It owns sockets and their lifecycle: the read loop, dispatch in order, pipelined
writes run together, blocking commands and pops given up on a hangup, and shutdown. It
never decides what a command does (commands.py does), and one client's bad bytes
never reach another connection: they end that connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from simplequeue import api
from simplequeue.broker.background import in_background
from simplequeue.broker.engine import TopicOps
from simplequeue.broker.metrics import Metrics
from simplequeue.broker.resp.commands import (
    COMMANDS,
    Handler,
    Session,
    admitted,
    jobs_asked,
    names_its_pops,
    pipelined,
)
from simplequeue.broker.resp.reads import ReadBudget
from simplequeue.broker.resp.wire import (
    NULL_ARRAY,
    Reply,
    Requests,
    RespError,
    encode,
    error_of,
    upper,
)
from simplequeue.broker.settings import parse_addr
from simplequeue.errors import Contended, SimpleQueueError, StoreUnavailable

log = logging.getLogger(__name__)

CAP_WARN_EVERY = 60.0  # seconds between warnings that clients are refused

READ_CHUNK = 64 * 1024
QUEUED_FRAMES = 128  # parsed requests waiting per connection (and one read's worth more)
# ... and the memory they may hold (the requests' own bytes and about as much
# again for small ones' objects): 128 requests of --max-body could hold far
# more. Behind a blocking command or a pop, which must see its client leave,
# reading goes on up to this whatever their number. Past it, a pop's client
# waits (it ends soon) and a blocking command's is closed, as Redis closes
# one past its client-query-buffer-limit.
QUEUED_BYTES = 64 * 1024 * 1024
# Replies buffered for a client that does not read: past it, the connection
# runs nothing more until they are written. A client that has not given the
# token yet has only refusals to read, and is held far sooner (as Redis holds
# one since 7.4.3, CVE-2025-21605).
OUTPUT_HIGH_WATER = 64 * 1024 * 1024
UNAUTHENTICATED_OUTPUT = 64 * 1024
# Bytes a request may take before the token is given (as Redis refuses, since
# CVE-2021-32675, a bulk string over 16 KB from such a client): AUTH or HELLO
# fit, and --max-body would let a client that has no token hold 1 MiB a
# request. Nor is anything read behind a request before it has run: its
# requests queued (QUEUED_BYTES) held 64 MiB.
UNAUTHENTICATED_REQUEST = 16 * 1024
SHUTDOWN_GRACE = 5.0  # seconds a stopping server lets commands in flight finish
# Seconds a connection closed by a stopping server waits for its last replies
# to be written: a client that does not read would hold the stop for ever.
CLOSE_GRACE = 1.0
# Seconds a closing connection's last replies may wait while its client reads
# none of them (a slow link, a pause, is given them): then it is cut, its slot
# and buffer freed. A stopping server waits CLOSE_GRACE in all.
STALLED_CLOSE = 30.0
MAX_GROUP = 256  # pipelined writes run together at most
# Seconds before a pop's give-back that failed (the store down past a commit's
# budget) is tried again, at random up to twice as long at each try, and at most.
UNPOP_RETRY_FIRST = 1.0
UNPOP_RETRY_MAX = 30.0

Frame = list[bytes] | RespError | None  # a request, an unparseable one, or the end


class Hangup(Exception):
    """A blocking command gave up (the client left, or the server is stopping),
    or a pop did (the client left). `answered`: the replies that still go out
    before the connection closes (a pipeline's, up to its first pop)."""

    def __init__(self, answered: list[Reply] | None = None) -> None:
        super().__init__()
        self.answered = answered or []


class Frames:
    """The requests one connection's read loop parsed and its run loop has not
    taken yet, with the memory they hold."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[Frame, int]] = asyncio.Queue()
        self.bytes = 0

    def put(self, frame: Frame) -> None:
        size = _size(frame)
        self.bytes += size
        self._queue.put_nowait((frame, size))

    async def get(self) -> Frame:
        frame, size = await self._queue.get()
        self.bytes -= size
        return frame

    def put_all(self, frames: list[list[bytes]]) -> None:
        for frame in frames:
            self.put(frame)

    def get_nowait(self) -> Frame:
        frame, size = self._queue.get_nowait()
        self.bytes -= size
        return frame

    def empty(self) -> bool:
        return self._queue.empty()

    def __len__(self) -> int:
        return self._queue.qsize()


def _size(frame: Frame) -> int:
    """About the memory a parsed request holds: its arguments, and their objects."""
    return 0 if not isinstance(frame, list) else 56 + sum(len(arg) + 41 for arg in frame)


# --- connections ---------------------------------------------------------------------------


@dataclass
class Connection:
    """One client connection: its socket, its read loop, and its Session."""

    server: RespServer
    session: Session
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    busy: bool = False  # a command is being executed
    watched: int = 0  # commands in flight watching for a hangup: keep reading
    blocking: int = 0  # ... of them blocking ones, which may wait for ever
    # Set when the client leaves or the server stops: blocking commands give up.
    hangup: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the client leaves: pops give up (a stop lets them finish).
    left: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the read loop may queue more: frames were taken, or a command
    # watching for a hangup started.
    room: asyncio.Event = field(default_factory=asyncio.Event)
    out: bytearray = field(default_factory=bytearray)  # replies not handed to the transport
    flushing: asyncio.Task[None] | None = None  # hands `out` over once the transport drains

    @property
    def id(self) -> int:
        return self.session.id

    @property
    def stopping(self) -> bool:
        """The server is stopping: no command after this one."""
        return self.server.stopping

    async def run(self) -> None:
        """Execute requests in order until the client leaves or sends garbage, or a
        command closes the connection (QUIT, the last failed AUTH allowed)."""
        # Paused while it holds anything: drain() waits until it is empty.
        self.writer.transport.set_write_buffer_limits(high=0)
        frames = Frames()  # bounded by _read_requests
        reading = asyncio.create_task(self._read(frames), name=f"resp-read-{self.id}")
        try:
            ahead: list[Frame] = []  # taken from frames, not run
            while (frame := ahead.pop(0) if ahead else await frames.get()) is not None:
                self.room.set()
                if isinstance(frame, RespError):  # unparseable: answer, then hang up
                    self._send([frame])
                    break
                group = _pipelined_group(frame, frames, ahead, self._room_for_jobs())
                self.busy = True
                try:
                    replies = await self._execute(group)
                except Hangup as gone:
                    self._send(gone.answered)
                    break
                finally:
                    self.busy = False
                    self.room.set()  # a client without the token has the next one read
                self._send(replies)
                # The next request may be long in coming: an idle connection
                # would hold this one (1 MB, say) and its reply until then.
                del frame, group, replies
                if self.session.closing or self.stopping:
                    break
                # Past the output limit (a client that sends and never reads)
                # nothing more is run until the replies are written.
                if self.unsent > self._output_limit():
                    await self._drained()
        finally:
            self._hand_over()
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    @property
    def unsent(self) -> int:
        """Bytes of replies not written to the socket yet: ours and the transport's."""
        return len(self.out) + self.writer.transport.get_write_buffer_size()

    def _output_limit(self) -> int:
        return OUTPUT_HIGH_WATER if self.session.authed else UNAUTHENTICATED_OUTPUT

    def _send(self, replies: list[Reply]) -> None:
        """Encode `replies`, and write them at once if the transport has sent
        all it was given; else they gather in `out`, handed over in one write
        once it has. A transport keeps each write() until it is sent (uvloop
        as an object of its own, some 400 bytes for a 34-byte reply): a client
        that reads no reply would cost ten times their size."""
        for reply in replies:
            encode(reply, self.session.protocol, self.out)
        if self.flushing is None and self.out:
            if not self.writer.transport.get_write_buffer_size():
                self._write_out()
            else:
                self.flushing = asyncio.create_task(self._flush(), name=f"resp-flush-{self.id}")

    def _write_out(self) -> None:
        # A new buffer: the transport may keep a view of the one written (uvloop does).
        out, self.out = self.out, bytearray()
        if not self.writer.transport.is_closing():  # else the client left: nobody reads
            self.writer.write(out)

    async def _flush(self) -> None:
        """Hand `out` over once the transport drained, in one write."""
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            return  # the client went away: nothing more is written
        finally:
            self.flushing = None
        self._write_out()

    async def _drained(self) -> None:
        """Until every reply is written to the socket."""
        while self.flushing is not None or self.writer.transport.get_write_buffer_size():
            if self.flushing is not None:
                await asyncio.shield(self.flushing)
            else:
                await self.writer.drain()

    def _hand_over(self) -> None:
        """The connection ends: every reply gathered goes to the transport,
        which the closing connection waits on (RespServer._closed)."""
        if self.flushing is not None:
            self.flushing.cancel()
            self.flushing = None
        if self.out:
            self._write_out()

    def _room_for_jobs(self) -> int:
        """Jobs of --max-body each whose values the output buffer takes before
        it passes OUTPUT_HIGH_WATER: the pops one pipelined group may run (it
        runs one at least), whose replies go out together once it ends.
        What they did is held for their undo until then (engine.pop's
        `held`): as much again, bounded by the same."""
        room = OUTPUT_HIGH_WATER - self.unsent
        return max(0, room) // self.server.settings.max_body

    async def _execute(self, group: list[list[bytes]]) -> list[Reply]:
        if not any(map(names_its_pops, group)):
            if len(group) == 1:
                return [await self._dispatch(group[0])]
            return await self._execute_group(group)
        # A pop's reply may reach nobody: its client may leave as the pop
        # lands, or, in a group, before the group's replies go out together.
        # So pops are named (Session.owing), and given back if the client is
        # gone once they end, or the group was cut short (a stop past its
        # grace). A group runs to its end (its pushes land, as Redis's
        # would), and a pop does (it does not wait): reading goes on
        # meanwhile, to see the client leave. A BLPOP gives up on a hangup.
        if self.left.is_set():
            # Gone, or only done sending (a half-close) and reading on: a pop's
            # reply might reach nobody, but a push's must reach a client that
            # would send it again. What comes before the first pop runs, as
            # it would alone, and is answered; the rest does not.
            first_pop = next(i for i, frame in enumerate(group) if names_its_pops(frame))
            raise Hangup(await self._execute_group(group[:first_pop]) if first_pop else [])
        owing: list[tuple[str, str, str]] = []
        self.session.owing = owing
        self.watched += 1
        self.room.set()
        try:
            replies = await self._execute_group(group)
        except BaseException:
            self._give_back(owing)
            raise
        finally:
            self.watched -= 1
            self.session.owing = None
        if owing and (self.left.is_set() or self.writer.transport.is_closing()):
            # (The transport closes as the client resets, before the read loop
            # sees it leave.) Its pops' jobs go back, and each is answered as a
            # pop that found none; every other reply still goes out, in order
            # (a push after a pop landed: a client only done sending must not
            # send it again), then the connection closes.
            self._give_back(owing)
            answered = zip(group, replies, strict=True)
            raise Hangup([_none_taken(f) if _took_a_job(f, r) else r for f, r in answered])
        for topic, attempt_id, worker_id in owing:  # answered now: no undo will come
            self.session.engine.forget_pop(topic, attempt_id, worker_id)
        return replies

    def _give_back(self, owing: list[tuple[str, str, str]]) -> None:
        for topic, attempt_id, worker_id in owing:
            in_background(self._unpop(topic, attempt_id, worker_id))

    async def _unpop(self, topic: str, attempt_id: str, worker_id: str) -> None:
        """Give back what a pop of a client gone did; through a store that
        fails for longer than a commit's budget, again and again while its
        record is kept (api.CLAIM_ATTEMPTS_KEPT_S): tried once, its jobs
        stayed done for nobody."""

        def failed(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "RESP client %d left: a pop of %s could not be given back yet (%s): trying again",
                self.id,
                topic,
                exc,
            )

        try:
            async for attempt in AsyncRetrying(
                # Not once the server is stopping (its committer refuses all),
                # whether this connection was still open then or not.
                retry=retry_if_exception(
                    lambda exc: isinstance(exc, StoreUnavailable | Contended) and not self.stopping
                ),
                stop=stop_after_delay(api.CLAIM_ATTEMPTS_KEPT_S),
                wait=wait_random_exponential(multiplier=UNPOP_RETRY_FIRST, max=UNPOP_RETRY_MAX),
                before_sleep=failed,
                reraise=True,
            ):
                with attempt:
                    await self.session.engine.unpop(topic, attempt_id, worker_id or None)
        except SimpleQueueError as exc:
            log.warning("RESP client %d left: a pop of %s stays done (%s)", self.id, topic, exc)

    async def _execute_group(self, group: list[list[bytes]]) -> list[Reply]:
        if all(self._served_here(frame) for frame in group):
            # Together: they reach this broker's committer in order, and share commits.
            return list(await asyncio.gather(*map(self._dispatch, group)))
        # Passed on to another broker, each is a request of its own, which would
        # reach it in any order (an LPOP before the RPUSH sent ahead of it).
        return [await self._dispatch(frame) for frame in group]

    def _served_here(self, frame: list[bytes]) -> bool:
        try:
            topic = frame[1].decode()
        except (IndexError, UnicodeDecodeError):
            return True  # refused before it reaches a topic
        return self.session.engine.served_here(topic)

    async def _read(self, frames: Frames) -> None:
        try:
            await self._read_requests(frames)
        except (ConnectionError, OSError):
            pass  # the client went away
        except RespError as exc:
            # The client is still there: pops before the error are answered,
            # then the error; blocking ones give up (nothing reads on).
            frames.put(exc)
            self.hangup.set()
            frames.put(None)
            # Read on, discarding, to see the client leave (pops under way are
            # given back then): the run loop cancels this once it closes.
            with contextlib.suppress(ConnectionError, OSError):
                while await self.reader.read(READ_CHUNK):
                    pass
            self.left.set()
            return
        except Exception:  # not expected: the connection ends, it does not hang
            log.exception("RESP connection %s: reading its requests failed", self.id)
        self.left.set()
        self.hangup.set()
        frames.put(None)

    async def _read_requests(self, frames: Frames) -> None:
        requests = Requests(self.server.settings.max_body)
        data = b""
        while True:
            # Before AUTH, a request of UNAUTHENTICATED_REQUEST at most, one
            # at a time (_full): the rest of what was read waits, unparsed,
            # until it has run, when it may have authenticated the client.
            authed = self.session.authed
            if not authed:
                requests.limit, requests.limit_note = UNAUTHENTICATED_REQUEST, " before AUTH"
            elif requests.limit_note:
                requests.limit, requests.limit_note = self.server.settings.max_body, ""
            parsed = requests.feed(data, None if authed else 1)
            more = bool(parsed) and not authed  # it may have left whole requests unparsed
            frames.put_all(parsed)
            # Not held while the next read is awaited, for ever when idle.
            data, parsed = b"", []
            if requests.failed is not None:  # after the requests before it
                raise requests.failed
            # Up to QUEUED_FRAMES or QUEUED_BYTES, then wait for the run loop
            # to take some: unless it is in a blocking command or a pop, which
            # needs this loop to see the client leave (a job it took then
            # would be lost), when only the bytes count.
            while self._full(frames):
                self.room.clear()
                await self.room.wait()
            if self.blocking and frames.bytes > QUEUED_BYTES:
                raise RespError("ERR", "too many requests queued behind a blocking one")
            if not more and not (data := await self.reader.read(READ_CHUNK)):
                return  # the client is done sending

    def _full(self, frames: Frames) -> bool:
        if not self.session.authed:
            return self.busy or not frames.empty()  # until the one read has run
        if self.blocking:
            return False  # closed past QUEUED_BYTES
        if frames.bytes > QUEUED_BYTES:
            return True
        return not self.watched and len(frames) >= QUEUED_FRAMES

    async def _dispatch(self, frame: list[bytes]) -> Reply:
        name = upper(frame[0])
        reply = await self._run(name, frame[1:])
        known = name if name in COMMANDS else "unknown"
        outcome = "error" if isinstance(reply, RespError) else "ok"
        self.server.metrics.resp_commands.labels(known, outcome).inc()
        return reply

    async def _run(self, name: str, args: list[bytes]) -> Reply:
        try:
            spec = admitted(self.session, name, args)
            if spec.blocking:
                return await self._until(spec.handler, args)
            # A pop runs to its end, given back then if its client left (_execute).
            return await spec.handler(self.session, args)
        except Hangup:
            raise
        except RespError as exc:
            return exc
        except SimpleQueueError as exc:
            return error_of(exc)
        except Exception:
            log.exception("RESP %s from client %d failed", name, self.id)
            return RespError("ERR", "internal error")

    async def _until(self, handler: Handler, args: list[bytes]) -> Reply:
        """Run a blocking command, cancelling it when the client leaves or the
        server stops: the engine gives back a cancelled claim, and a pop
        nobody was answered. One that ended is answered (its named pops are
        given back by _execute if the client is gone by then)."""
        if self.hangup.is_set():  # nobody to answer: nothing is taken
            raise Hangup
        task = asyncio.ensure_future(handler(self.session, args))
        hangup = asyncio.create_task(self.hangup.wait())
        self.watched += 1
        self.blocking += 1
        self.room.set()
        try:
            await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise Hangup
        finally:
            self.watched -= 1
            self.blocking -= 1
            for t in (task, hangup):
                t.cancel()
            await asyncio.gather(task, hangup, return_exceptions=True)


def _none_taken(pop: list[bytes]) -> Reply:
    """The reply of the pop `pop` had it found no job: nil, or with a count
    (or a BLPOP's timeout) the nil array."""
    return NULL_ARRAY if len(pop) > 2 else None


def _took_a_job(frame: list[bytes], reply: Reply) -> bool:
    """Whether `reply` answers a pop with a job: a value, or a non-empty array."""
    if not names_its_pops(frame) or isinstance(reply, RespError):
        return False
    return reply is not None and reply is not NULL_ARRAY and reply != []


def _pipelined_group(
    first: list[bytes], frames: Frames, ahead: list[Frame], room: int
) -> list[list[bytes]]:
    """`first`, and the pipelined writes that follow it and have arrived already.
    They run together, so they share commits: they reach the committer in order,
    and their replies go out in order. Its pops ask for `room` jobs at most
    (`first` alone may ask for more): the replies of a client that does not
    read stay near OUTPUT_HIGH_WATER. A frame that does not belong is put back
    at the front of `ahead`."""
    group = [first]
    asked = jobs_asked(first) if pipelined(first) else 0
    while pipelined(group[-1]) and len(group) < MAX_GROUP:
        if not ahead and frames.empty():
            break
        nxt = ahead.pop(0) if ahead else frames.get_nowait()
        if nxt is None or isinstance(nxt, RespError) or not pipelined(nxt):
            ahead.insert(0, nxt)
            break
        asked += (more := jobs_asked(nxt))
        if more and asked > room:
            ahead.insert(0, nxt)
            break
        group.append(nxt)
    return group


# --- the listener -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RespSettings:
    token: str | None = None  # with one, AUTH first
    max_body: int = 1024 * 1024  # bytes a request may take
    max_batch: int = api.MAX_BATCH  # jobs per engine call
    # Payload bytes one command's claims answer, past the first stream's
    # (the engine's Bounds.claim_bytes: what one claim answers at most).
    claim_bytes: int = 16 * 1024 * 1024
    # Clients connected at once, at most (Redis' maxclients): past it a new one
    # is told so and closed, so that RESP sockets never take the descriptors
    # the HTTP listener and the store need.
    max_clients: int = 10_000


class RespServer:
    """The RESP TCP listener of one broker, beside its HTTP listener. It is the
    Listener its connections' commands see."""

    def __init__(self, engine: TopicOps, metrics: Metrics, settings: RespSettings) -> None:
        self.engine = engine
        self.metrics = metrics
        self.settings = settings
        self.token: bytes | None = settings.token.encode() if settings.token else None
        self.port = 0
        self.addr = ""
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], Connection] = {}
        # The server stops (stop()): no command after the one each connection
        # runs, and give-backs, of connections gone before it too
        # (Connection._unpop), are tried no more.
        self.stopping = False
        self._ids = itertools.count(1)
        self._started = time.monotonic()
        self._warned_at = -CAP_WARN_EVERY
        self.read_budget = ReadBudget()

    @property
    def max_batch(self) -> int:
        return self.settings.max_batch

    @property
    def claim_bytes(self) -> int:
        return self.settings.claim_bytes

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._started

    @property
    def client_count(self) -> int:
        return len(self._connections)

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
        self.stopping = True
        if self._server is not None:
            self._server.close()
        handlers = dict(self._connections)
        for task, conn in handlers.items():
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
        if len(self._connections) >= self.settings.max_clients:
            now = time.monotonic()
            if now - self._warned_at >= CAP_WARN_EVERY:
                self._warned_at = now
                log.warning("RESP: %d clients connected: refusing more", len(self._connections))
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(b"-ERR max number of clients reached\r\n")
                writer.close()
                await writer.wait_closed()
            return
        session = Session(next(self._ids), self, authed=self.token is None)
        conn = Connection(self, session, reader, writer)
        # A task of our own, so that stop() can cancel it without asyncio's stream
        # callback reporting the cancellation as an error.
        task = asyncio.create_task(self._handle(conn), name=f"resp-client-{conn.id}")
        self._connections[task] = conn
        try:
            await asyncio.wait({task})
        finally:
            del self._connections[task]
            session.reads.close()

    async def _handle(self, conn: Connection) -> None:
        try:
            await conn.run()
        except (ConnectionError, OSError):
            pass  # the client went away while we answered
        except Exception:
            log.exception("RESP client %d failed", conn.id)
        finally:
            conn.writer.close()
            try:
                await self._closed(conn)
            except asyncio.CancelledError:  # stop() past its grace
                conn.writer.transport.abort()
                raise

    @staticmethod
    async def _closed(conn: Connection) -> None:
        """Wait until a closing connection's last replies are written, however
        slowly its client reads (an LPOP's job is in one: dropped, it would be
        lost). It is cut when its client reads none of them for STALLED_CLOSE
        seconds, or, the server stopping, after CLOSE_GRACE."""
        transport = conn.writer.transport
        left = transport.get_write_buffer_size()
        closed = asyncio.ensure_future(conn.writer.wait_closed())
        while True:
            try:
                async with asyncio.timeout(CLOSE_GRACE if conn.stopping else STALLED_CLOSE):
                    await asyncio.shield(closed)  # waited for again after a timeout
                return
            except TimeoutError:  # before OSError, of which it is one
                now = transport.get_write_buffer_size()
                if conn.stopping or now >= left:  # nothing read meanwhile
                    transport.abort()
                    await asyncio.gather(closed, return_exceptions=True)
                    return
                left = now
            except (ConnectionError, OSError):
                return
