"""The HTTP listener: the TCP server in front of aiohttp's low-level server and
the one request handler it calls, and the connection limits aiohttp lacks. It
owns each connection's life outside its requests: how long a client may take to
send a request's headers, how long it may idle between requests, and how many
connections may be open at once. It never reads, answers or times out a request
in progress; aiohttp parses, the handler answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

import orjson
from aiohttp import web

log = logging.getLogger(__name__)

# The default cap on open HTTP connections: the process' soft RLIMIT_NOFILE less
# HEADROOM descriptors and those reserved: what the store may hold
# (ObjectStore.held_descriptors: s3's connection pool, the files localfs keeps
# open) and the pool of connections to the other brokers (forwarding.pool_size:
# a share of what the store leaves), within [MIN_CONNECTIONS,
# MAX_CONNECTIONS]. The headroom is BACKLOG for a burst of connections the event
# loop accepts in one go, before it can close any to make room, and 128 for the
# rest of the process: files a store opens for one request, the RESP listener
# and the interpreter's own.
BACKLOG = 128  # the listen queue; aiohttp's TCPSite uses the same
HEADROOM = BACKLOG + 128
MIN_CONNECTIONS = 16
MAX_CONNECTIONS = 10_000
MESSAGE_MAX = 200  # characters of the parser's message in the answer to a malformed request
WARN_EVERY = 60.0  # seconds between warnings that the cap is closing connections


def default_max_connections(reserved: int = 0) -> int:
    """The cap on open HTTP connections for this process' descriptor limit,
    `reserved` descriptors being held by others (the store, the forwarder)."""
    try:
        import resource
    except ImportError:  # not on Unix: no descriptor limit to derive it from
        return MAX_CONNECTIONS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, soft - HEADROOM - reserved))


@dataclass(frozen=True)
class Limits:
    """The listener's limits, in seconds and connections."""

    # From a connection's opening, or from the first byte of a later request,
    # until the request's header block is complete.
    header_timeout: float = 10.0
    # From the end of a response until the next request's headers are complete:
    # aiohttp's keepalive_timeout. aiohttp also starts it when a connection
    # opens, so a new connection gets the shorter of the two timeouts.
    keepalive_timeout: float = 15.0
    # None: default_max_connections(), with nothing reserved for a store.
    max_connections: int | None = None


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class HttpListener:
    """Serves one request handler on one TCP address within `Limits`.

    Connections are aiohttp's own protocol (RequestHandler) behind a thin
    `_Connection` that forwards every event to it; the handler is wrapped to
    tell the connection when a request starts and ends. Idle keep-alive
    connections are closed by aiohttp itself (keepalive_timeout)."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits,
        *,
        max_body: int,
        body_limit: Callable[[Mapping[str, str]], int] | None = None,
        shutdown_timeout: float = 5.0,
        **server_options: Any,
    ) -> None:
        self.limits = limits
        self.max_connections = (
            default_max_connections() if limits.max_connections is None else limits.max_connections
        )
        self._handler = handler
        self._max_body = max_body
        self._body_limit = body_limit
        self._server_options = server_options
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.ServerRunner | None = None
        self._tcp: asyncio.Server | None = None
        self._open: set[_Connection] = set()
        # Open connections not in a request, the one idle longest first: those
        # waiting for their first request, and keep-alive ones between requests.
        self._idle: OrderedDict[_Connection, None] = OrderedDict()
        self._warned_at = -float("inf")
        self.port = 0

    def _request(
        self,
        message: Any,
        payload: Any,
        protocol: Any,
        writer: Any,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        """A request whose body may be up to `max_body` bytes (aiohttp's default
        1 MiB), or as `body_limit` says for its headers."""
        loop = asyncio.get_running_loop()
        limit = self._max_body if self._body_limit is None else self._body_limit(message.headers)
        return web.BaseRequest(
            message, payload, protocol, writer, task, loop, client_max_size=limit
        )

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def requests_in_progress(self) -> int:
        """Requests whose handler started and has not ended."""
        return len(self._open) - len(self._idle)

    async def start(self, host: str, port: int) -> None:
        """Set the server up and listen; `port` 0 picks a free one."""
        server = _Server(
            track_requests(self._handler),
            request_factory=self._request,
            keepalive_timeout=self.limits.keepalive_timeout,
            **self._server_options,
        )
        self._runner = web.ServerRunner(server, shutdown_timeout=self._shutdown_timeout)
        await self._runner.setup()
        try:
            self._tcp = await asyncio.get_running_loop().create_server(
                lambda: _Connection(self, server),
                host,
                port,
                reuse_address=True,
                backlog=BACKLOG,
            )
        except BaseException:
            await self._runner.cleanup()
            raise
        self.port = int(self._tcp.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, close idle connections, let requests in flight finish
        (aiohttp's shutdown_timeout), then clean the application up."""
        if self._tcp is not None:
            self._tcp.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._tcp is not None:
            await self._tcp.wait_closed()
            self._tcp = None

    # --- the connections' bookkeeping ---------------------------------------------

    def _admit(self, connection: _Connection) -> bool:
        """Make room for a new connection at the cap by closing the one idle
        longest; False if every open connection is in a request."""
        if len(self._open) >= self.max_connections:
            victim = next((c for c in self._idle if not c.sending), None)
            if victim is None:
                self._warn("all in requests: refusing new ones")
                return False
            self._warn("closing the connections idle longest to make room")
            victim.close("idle longest at the connection cap")
        self._open.add(connection)
        self._idle[connection] = None
        return True

    def _busy(self, connection: _Connection) -> None:
        self._idle.pop(connection, None)

    def _done(self, connection: _Connection) -> None:
        if connection in self._open:
            self._idle[connection] = None  # at the end: idle for the shortest time

    def _forget(self, connection: _Connection) -> None:
        self._open.discard(connection)
        self._idle.pop(connection, None)

    def _warn(self, what: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning("HTTP connections at the cap (%d), %s", self.max_connections, what)


class _Server(web.Server):
    """aiohttp's low-level server, its connections' protocol `_RequestHandler`."""

    def __call__(self) -> web.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class _RequestHandler(web.RequestHandler):
    """aiohttp's protocol for one connection, answering what it answers itself
    as the API answers every error (SPEC 5: `{"error": "..."}`, JSON): a
    request its parser refuses (a header line over 8 KB, a bad method or
    request line), and a 500 or 504 from outside the handler. aiohttp answers
    those in text/plain and logs each at ERROR, a client's malformed request
    included; that is the client's fault, logged at INFO."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            text = "internal error" if status == 500 else HTTPStatus(status).phrase.lower()
        else:
            log.info("refused a malformed HTTP request from %s: %s", request.remote, exc)
            # aiohttp's own words, on one line (they may quote the line refused).
            said = " ".join((message or HTTPStatus(status).phrase).split())
            text = f"malformed HTTP request: {said[:MESSAGE_MAX]}"
        if request.writer.output_size > 0:  # the answer had begun: the connection is broken
            raise ConnectionError("an answer was being sent, there is no sending an error now")
        response = web.Response(
            body=orjson.dumps({"error": text}), status=status, content_type="application/json"
        )
        response.force_close()
        return response


class _Connection(asyncio.Protocol):
    """One HTTP connection: aiohttp's RequestHandler, which it forwards every
    transport event to, and the clock on the headers of the request to come."""

    __slots__ = ("_handler", "_listener", "_server", "_timer", "busy", "transport")

    def __init__(self, listener: HttpListener, server: web.Server) -> None:
        self._listener = listener
        self._server = server
        self._handler: web.RequestHandler | None = None
        self._timer: asyncio.TimerHandle | None = None  # set while headers are awaited
        self.busy = False  # in a request: from its handler's start to its end
        self.transport: asyncio.Transport | None = None

    @property
    def sending(self) -> bool:
        """A response is still on its way out (a slow reader): not idle."""
        return self.transport is not None and self.transport.get_write_buffer_size() > 0

    # --- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self.transport = transport
        if not self._listener._admit(self):
            transport.close()
            return
        self._handler = self._server()
        self._handler.connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if self._handler is None:
            return
        if not self.busy and self._timer is None:
            self._await_headers()  # the first bytes of the next request
        self._handler.data_received(data)

    def eof_received(self) -> None:
        if self._handler is not None:
            self._handler.eof_received()  # returns None: the transport closes itself

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener._forget(self)
        self._stop_clock()
        self.transport = None
        if self._handler is not None:
            self._handler.connection_lost(exc)

    # --- requests --------------------------------------------------------------------

    def request_started(self) -> None:
        self.busy = True
        self._stop_clock()
        self._listener._busy(self)

    def request_ended(self) -> None:
        self.busy = False
        self._listener._done(self)

    def close(self, why: str) -> None:
        """Close as aiohttp closes an idle connection; it no longer counts."""
        log.debug("closing HTTP connection %s: %s", self._peer(), why)
        self._listener._forget(self)
        self._stop_clock()
        if self._handler is not None:
            self._handler.force_close()

    def _await_headers(self) -> None:
        timeout = self._listener.limits.header_timeout
        self._timer = asyncio.get_running_loop().call_later(timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._timer = None
        if not self.busy:
            self.close("request headers not received in time")

    def _stop_clock(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _peer(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("peername")


def track_requests(handler: Handler) -> Handler:
    """`handler`, telling each request's connection when the request starts and
    ends, so that its header clock stops and it is never taken for idle while in
    a request."""

    async def tracked(request: web.BaseRequest) -> web.StreamResponse:
        transport = request.transport
        connection = None if transport is None else transport.get_protocol()
        if not isinstance(connection, _Connection):
            return await handler(request)
        connection.request_started()
        try:
            return await handler(request)
        finally:
            connection.request_ended()

    return tracked
