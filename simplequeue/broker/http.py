"""The HTTP API of SPEC section 5: route, parse, call the engine, answer.

Handlers never touch storage. Every error is answered as {"error": "..."} with
its class's `http_status` (simplequeue.errors); anything unexpected is logged with its
context and answered 500 with a one-line message, never a traceback.

Requests come straight from aiohttp's low-level server (`web.Server`) to one
callable, `HttpApi`, which finds the route by method and path segments (no
regexes, no middleware chain: aiohttp's router and middlewares were a fifth of
the broker's time per request at 64 callers) and runs auth, routing to the
topic's owner, errors and metrics in one frame.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import msgspec
import orjson
from aiohttp import HttpVersion11, web

from simplequeue import api, keys
from simplequeue.broker import page
from simplequeue.broker.engine import Engine
from simplequeue.broker.forwarding import (
    FORWARDED,
    OWNER,
    REPLAYED,
    Answer,
    Forwarder,
    Here,
    refused_attempt_id,
)
from simplequeue.broker.metrics import CONTENT_TYPE, Metrics
from simplequeue.errors import (
    Forbidden,
    InvalidRequest,
    NothingToClaim,
    PayloadTooLarge,
    RequestTimedOut,
    RouteNotFound,
    SimpleQueueError,
    Unauthorized,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


async def _nothing(topic: str) -> None:
    return None


@dataclass(frozen=True)
class HttpServices:
    """What the HTTP face of a broker uses, and nothing more."""

    engine: Engine
    metrics: Metrics
    token: str | None  # with one, every route but /healthz and the page's shell needs it
    max_body: int  # bytes
    about: Callable[[], dict[str, Any]]  # this broker, for /healthz
    presence: Callable[[], page.Presence]  # this broker and broker.json, for the page
    url: Callable[[], str] = lambda: ""  # this broker's advertised URL
    forwarder: Forwarder | None = None  # sends a topic's requests to its owner
    refresh: Callable[[str], Awaitable[None]] = _nothing  # a topic changed behind our back
    # Listening on a loopback address only: a browser's request must name this
    # machine (an IP, localhost, or the advertised host), not a rebound name.
    loopback: bool = False
    body_timeout: float = 30.0  # seconds to send a request's body, once its headers came
    # A request's largest body, by its headers (the listener's): None, --max-body.
    body_limit: Callable[[Mapping[str, str]], int] | None = None


class Call:
    """One request, with what its route took from its path and the services
    its handler may use."""

    __slots__ = ("body", "decoders", "params", "request", "route", "services", "spent")

    def __init__(
        self,
        request: web.BaseRequest,
        route: Route,
        params: dict[str, str],
        services: HttpServices,
        decoders: Executor,
    ) -> None:
        self.request = request
        self.route = route
        self.params = params  # the path's {parameters}, decoded
        self.services = services
        self.decoders = decoders  # where bodies larger than DECODE_ON_LOOP allows are decoded
        self.body: bytes | None = None  # as rewritten before it was passed on
        # Seconds its long poll waited already, on brokers that did not answer.
        self.spent = 0.0

    def left(self, wait: float) -> float:
        """What is left of a long poll of `wait` seconds."""
        return max(0.0, wait - self.spent)

    @property
    def engine(self) -> Engine:
        return self.services.engine

    @property
    def topic(self) -> str:
        return keys.check_topic(self.params["topic"])

    async def read(self) -> bytes:
        """The request's body, as `_routed` rewrote it if it did, decoded from
        its Content-Encoding (gzip or deflate): one that is not in it, or in
        another, is InvalidRequest, and larger than --max-body decoded
        PayloadTooLarge. One not sent within the body timeout is _BodyTimedOut
        (aiohttp leaves a request whose chunked body is malformed waiting for
        ever: its parser's error reaches no reader)."""
        if self.body is None:
            await self._room_for_a_peer()
            coding = _coding_of(self.request)
            try:
                async with asyncio.timeout(self.services.body_timeout):
                    raw = await self.request.read()
            except web.RequestPayloadError as exc:
                raise _Unreadable(f"the request's body cannot be read: {exc}") from None
            except TimeoutError:
                raise _BodyTimedOut(self.services.body_timeout) from None
            # Decoded here, not by aiohttp (auto_decompress=False): its
            # decoding error left the connection to be reset, unanswered.
            if coding is None:
                self.body = raw
            elif self.services.max_body <= DECODE_ON_LOOP:  # a few ms at most, as aiohttp's
                self.body = _decoded(raw, coding, self.services.max_body)
            else:
                self.body = await asyncio.get_running_loop().run_in_executor(
                    self.decoders, _decoded, raw, coding, self.services.max_body
                )
        return self.body

    async def _room_for_a_peer(self) -> None:
        """A body larger than its limit, passed on by a broker whose record
        this one has not read yet (it started since this broker's last
        registry round): read now (Membership.learn), and if it is a peer's,
        the body may be as large as a peer's (api.FORWARDED_ROOM)."""
        request = self.request
        forwarded = request.headers.get(FORWARDED)
        forwarder = self.services.forwarder
        body_limit = self.services.body_limit
        if forwarded is None or forwarder is None or body_limit is None:
            return
        size = request.content_length
        if size is not None and size <= request.client_max_size:
            return
        if await forwarder.membership.learn(forwarded):
            limit = body_limit(request.headers)
            if limit > request.client_max_size:
                self.request = request.clone(client_max_size=limit)


# The largest --max-body whose bodies are decoded on the event loop (1 MiB
# decoded takes about 5 ms); a larger one is decoded in a thread, of DECODERS
# of the broker's own: not the loop's default executor, which localfs reads
# and writes on (bodies decoding there held a one-job enqueue for 42 s).
DECODE_ON_LOOP = 1024 * 1024
DECODERS = 2
# The status a request whose client went away before its answer is counted
# under in the metrics (nginx's; none is sent).
CLIENT_GONE = 499

# The gzip members a body may be in (RFC 1952 lets a body be several, but a
# client gzips its body in one): each costs a decoder, and 1 MiB of empty
# 20-byte members held the event loop for about 0.1 s.
GZIP_MEMBERS = 64


def _coding_of(request: web.BaseRequest) -> str | None:
    """The request's Content-Encoding, gzip or deflate (None: no coding);
    InvalidRequest for another, or more than one."""
    codings = content_codings(request.headers)
    applied = [coding for coding in codings if coding != "identity"]
    if len(applied) > 1 or any(coding not in _ENCODINGS for coding in applied):
        raise InvalidRequest(
            f"Content-Encoding {', '.join(codings)!r}: gzip (x-gzip) or deflate, or none"
        )
    return applied[0] if applied else None


def takes_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header takes gzip: `gzip` (or `x-gzip`),
    else `*`, among its codings, not with q=0 (RFC 9110 12.5.3: a coding
    named is taken at its own q, whatever `*` says)."""
    named: float | None = None
    anything: float | None = None
    for part in accept_encoding.split(","):
        coding, _, params = part.partition(";")
        coding = coding.strip().lower()
        if coding not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        param = params.strip().lower()
        if param.startswith("q="):
            try:
                q = float(param[2:])
            except ValueError:
                q = 0.0
        if coding == "*":
            anything = q
        else:
            named = q
    taken = named if named is not None else anything
    return taken is not None and taken > 0


def content_codings(headers: Mapping[str, str]) -> list[str]:
    """The codings a request's Content-Encoding names, lowercase: every
    header, and every coding in each; empty ones ("gzip,") are none (RFC 9110
    5.6.1.2: a recipient ignores empty list elements). Headers are a plain
    dict in the message aiohttp makes up for a request its parser refused."""
    getall = getattr(headers, "getall", None)  # a multidict's (aiohttp's own import)
    fields: list[str] = (
        getall("Content-Encoding", []) if getall else [headers.get("Content-Encoding", "")]
    )
    return [
        coding.strip().lower()
        for header in fields
        for coding in header.split(",")
        if coding.strip()
    ]


# The Content-Encodings a request body may be in, and their zlib wbits: a gzip
# header, and zlib's (deflate as HTTP means it; raw deflate too, as aiohttp reads).
_ENCODINGS = {
    "gzip": (16 + zlib.MAX_WBITS,),
    "x-gzip": (16 + zlib.MAX_WBITS,),  # RFC 9110 8.4.1.3: taken for gzip
    "deflate": (zlib.MAX_WBITS, -zlib.MAX_WBITS),
}


def _decoded(raw: bytes, coding: str, limit: int) -> bytes:
    """`raw` decoded from `coding` (gzip: one member or several, concatenated,
    as RFC 1952 allows, GZIP_MEMBERS at most); PayloadTooLarge past `limit`
    bytes (a small body may decode to gigabytes: decoding stops there),
    InvalidRequest if it is not in it whole. No bytes are no bytes, whatever
    the coding."""
    if not raw:
        return raw
    view = memoryview(raw)
    for wbits in _ENCODINGS[coding]:
        body = bytearray()
        at = 0
        try:
            for _ in range(GZIP_MEMBERS):
                decoder = zlib.decompressobj(wbits)
                at = _fed(decoder, view, at, body, limit)
                if not decoder.eof or (at < len(raw) and coding == "deflate"):
                    break  # cut short, or followed by bytes that are not another member
                if at == len(raw):
                    return bytes(body)
            else:
                raise InvalidRequest(f"the request's body is more than {GZIP_MEMBERS} gzip members")
        except zlib.error:
            continue
    raise InvalidRequest(f"the request's body is not in its Content-Encoding ({coding})")


def _fed(decoder: Any, view: memoryview, at: int, body: bytearray, limit: int) -> int:
    """Where in `view` the stream `decoder` decodes, from `at`, ends (or the
    bytes do), what it decodes added to `body`; PayloadTooLarge past `limit`.
    Fed in pieces that double: zlib copies what follows the end of a stream
    into unused_data, and fed the rest of the body at each member, 2 MiB of
    empty ones took 100,000 copies of up to 2 MiB (seconds of CPU)."""
    piece = 512
    while not decoder.eof and at < len(view):
        fed = view[at : at + piece]
        body += decoder.decompress(fed, limit + 1 - len(body))
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        at += len(fed) - len(decoder.unused_data)
        piece *= 2
    return at


class _Unreadable(Exception):
    """A request body that could not be read: answered 400, the connection closed."""


class _BodyTimedOut(_Unreadable):
    """Answered 408, the connection closed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request's body did not come within {seconds:g} s")


Handler = Callable[[Call], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # its template, as /openapi.json and the metrics name it: /topics/{topic}/ack
    handler: Handler
    public: bool = False  # served without the token: /healthz and the page's shell
    # Takes a query: its handler reads it, and refuses a parameter it does not
    # know (api.from_query), or it is one of the page's files, the same whatever
    # the query (a link's, a cache buster's). Every other route refuses one
    # (_no_query): ignored, DELETE /dead?job_ids=a purged every dead job.
    query: bool = False
    # Takes a body: its handler reads one (and so does a broker that passes
    # its request on, _routed). Any other route ignores one.
    takes_body: bool = False

    @property
    def name(self) -> str:
        return self.handler.__name__


@dataclass
class _Node:
    """One path segment of the route table: literal children, at most one
    {parameter} child, and the routes that end here by method."""

    children: dict[str, _Node] = field(default_factory=dict)
    param: tuple[str, _Node] | None = None
    methods: dict[str, Route] = field(default_factory=dict)


class Routes:
    """Routes found by method and path segments, in one walk down a tree."""

    def __init__(self, routes: list[Route]) -> None:
        self._root = _Node()
        # The methods some route takes (HEAD: a GET's), the metrics' labels:
        # any other is "other", since a client may send any token as one.
        self.methods = frozenset({"HEAD", *(route.method for route in routes)})
        for route in routes:
            node = self._root
            for segment in route.path.strip("/").split("/") if route.path != "/" else []:
                if segment.startswith("{"):
                    if node.param is None:
                        node.param = (segment[1:-1], _Node())
                    node = node.param[1]
                else:
                    node = node.children.setdefault(segment, _Node())
            if route.method in node.methods:
                raise ValueError(f"two routes for {route.method} {route.path}")
            node.methods[route.method] = route

    def find(self, raw_path: str) -> tuple[dict[str, Route], dict[str, str]] | None:
        """The routes of a path (still %-encoded) by method, and its parameters;
        None if no route has this path. InvalidRequest for a parameter whose
        escapes are not UTF-8: decoded with replacement, /jobs/%FF and every
        other invalid byte named the job whose id is U+FFFD."""
        node = self._root
        params: dict[str, str] = {}
        if raw_path != "/":
            for segment in raw_path[1:].split("/"):
                child = node.children.get(segment)
                if child is None:
                    if node.param is None or not segment:
                        return None
                    name, child = node.param
                    params[name] = _unquoted(segment) if "%" in segment else segment
                node = child
        return (node.methods, params) if node.methods else None


def _unquoted(segment: str) -> str:
    """A path segment %-decoded; InvalidRequest if its escapes are not UTF-8."""
    try:
        return unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest(f"the path segment {segment!r} is not UTF-8 once decoded") from None


def reply(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error(message: str, status: int, **headers: str) -> web.Response:
    response = reply({"error": message}, status)
    response.headers.update(headers)
    return response


def error_of(exc: SimpleQueueError) -> web.Response:
    """Our error's answer: its message, its reason where its status alone
    does not tell it apart (a cancelled job's 409), and when to ask again
    where it passes by itself (Retry-After)."""
    if exc.reason is None:
        response = error(str(exc), exc.http_status)
    else:
        response = reply({"error": str(exc), "reason": exc.reason}, exc.http_status)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


# --- the one request handler -------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _encodings(token: str) -> tuple[bytes, ...]:
    """The bytes a client may send `token` as: UTF-8, and ISO-8859-1 if it can."""
    try:
        return (token.encode(), token.encode("latin-1"))
    except UnicodeEncodeError:
        return (token.encode(),)


class HttpApi:
    """The broker's HTTP face: every request aiohttp parsed comes here.

    Auth, errors as {"error"}, and metrics, in one pass: every request runs
    through it, so it is kept to one frame and cached metric children."""

    def __init__(self, services: HttpServices) -> None:
        self.services = services
        forwarder = services.forwarder
        self.page = page.StatusPage(
            services.engine,
            services.presence,
            owns=lambda topic: forwarder is None or forwarder.membership.owns(topic),
        )
        self.routes = Routes(_routes(self.page))
        self.decoders = ThreadPoolExecutor(DECODERS, thread_name_prefix="simplequeue-decode")

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        services = self.services
        unreadable = None  # a path whose parameters cannot be decoded: told once authorised
        try:
            found = self.routes.find(request.rel_url.raw_path)
        except InvalidRequest as exc:
            found, unreadable = None, exc
        method = request.method
        route = None
        if found is not None:
            methods, params = found
            route = methods.get(method)
            if route is None and method == "HEAD":
                route = methods.get("GET")
        response: web.StreamResponse | None = self._refused(request, route)
        if response is None:
            if unreadable is not None:
                response = error_of(unreadable)
            elif route is None:
                response = _unrouted(found, request.rel_url.raw_path)
            else:
                try:
                    call = Call(request, route, params, services, self.decoders)
                    response = await self._answer(call)
                except asyncio.CancelledError:
                    # The client went away first (a long poll given up, Ctrl-C,
                    # a proxy's timeout): aiohttp cancels the handler. Counted
                    # as nginx does (499): it was not counted at all, an enqueue
                    # that landed after its client left included.
                    self._count(route, method, CLIENT_GONE, started)
                    raise
                if method not in _SAFE_METHODS and response.status < 300 and "topic" in params:
                    self.page.touched(params["topic"])  # done (or nothing to do)
        self._count(route, method, response.status, started)
        return response

    def _count(self, route: Route | None, method: str, status: int, started: float) -> None:
        """A request in the HTTP metrics: its route, method and status, and its time."""
        label = "unmatched" if route is None else route.path
        known = method if method in self.routes.methods else "other"
        counter, timer = self.services.metrics.http_children(label, known, status)
        counter.inc()
        timer.observe(time.perf_counter() - started)

    async def close(self) -> None:
        await self.page.close()
        self.decoders.shutdown(wait=False, cancel_futures=True)  # a decoding finishes

    def _refused(self, request: web.BaseRequest, route: Route | None) -> web.Response | None:
        """403 for a request another site's page made (_foreign), 401 without
        the bearer token, where one is set and the route is not public."""
        foreign = _foreign(request, self.services)
        if foreign is not None:
            return error(foreign, Forbidden.http_status)
        token = self.services.token
        if not token or (route is not None and route.public):
            return None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # Bytes as they came (a header that is not UTF-8 arrives surrogate-escaped);
        # the scheme's name in any case (RFC 9110), the token exactly: as UTF-8,
        # or as ISO-8859-1, which is how a browser sends a header (the page).
        sent = given.encode(errors="surrogateescape")
        if scheme.lower() == "bearer" and any(
            hmac.compare_digest(sent, encoded) for encoded in _encodings(token)
        ):
            return None
        refused = Unauthorized("missing or wrong bearer token")
        return error(str(refused), refused.http_status, **{"WWW-Authenticate": "Bearer"})

    async def _answer(self, call: Call) -> web.StreamResponse:
        request = call.request
        try:
            if not call.route.query:
                _no_query(call)
            if request.headers.get("Expect"):
                await _expect(request)
            if "topic" in call.params:
                return await _routed(call, self.services)
            return await call.route.handler(call)
        except _Unreadable as exc:  # what is left of the connection cannot be trusted
            timed_out = isinstance(exc, _BodyTimedOut)
            status = RequestTimedOut.http_status if timed_out else InvalidRequest.http_status
            response = error(str(exc), status)
            response.force_close()
            # Closed once answered: the body may never end (a malformed chunk),
            # and aiohttp would read on for 10 s, then log its parser's error.
            await response.prepare(request)
            await response.write_eof()
            if request.transport is not None:
                request.transport.close()
            return response
        except SimpleQueueError as exc:
            return error_of(exc)
        except web.HTTPRequestEntityTooLarge:  # aiohttp's, past client_max_size
            limit = self.services.max_body
            too_large = PayloadTooLarge(f"request body is larger than {limit} bytes")
            return error(str(too_large), too_large.http_status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error(exc.reason, exc.status)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return error("internal error", SimpleQueueError.http_status)


# What a browser sends to another site without asking it first (no CORS
# preflight) is a GET, HEAD or a "simple" POST: every other method is refused
# cross-site by the browser itself, POST is refused here.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _foreign(request: web.BaseRequest, services: HttpServices) -> str | None:
    """Why a request is refused as coming from another site's page, or None.

    - A browser tells where a request came from: Sec-Fetch-Site (every
      current browser), else Origin. One that would change something (not
      GET, HEAD, OPTIONS) from another site's page is refused, as Go's
      CrossOriginProtection does: without a --token, a page the operator
      visits could requeue or enqueue through the operator's browser. So is
      an overview asked `fresh` (_asks_fresh). Clients that are not browsers
      (the SDK, curl, peers) send neither, and pass.
    - Listening on loopback only, a request must name this machine in Host:
      a DNS-rebinding page (a name of its own re-pointed at 127.0.0.1) is
      same-origin with the broker, and could read and call everything."""
    advertised = services.url()
    if services.loopback and not _names_this_machine(request.host, advertised):
        return f"Host {request.host!r} does not name this broker (it listens on loopback)"
    if request.method in _SAFE_METHODS and not _asks_fresh(request):
        return None
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        if site in ("same-origin", "none"):  # its own page; typed in the address bar
            return None
        return f"refused a {site} request from a page of another site"
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    try:
        sender = _origin_of(origin)
        ours = (_origin_of(f"{request.scheme}://{request.host}"), _origin_of(advertised))
    except ValueError:
        return f"refused a request with a malformed Origin {origin!r}"
    # The page's own, over plain http (no Sec-Fetch-Site): its Origin is the
    # broker's Host, or, behind a proxy that sets Host, its advertised URL's.
    if sender in ours:
        return None
    return f"refused a request from a page of {origin}"


def _asks_fresh(request: web.BaseRequest) -> bool:
    """An overview asked `fresh`: computed anew, its topic read from the
    store, for each change made through this broker (a worker's every ack
    is one). Only the page's own refreshes ask it; another site's page,
    which cannot read the answer, could still make a broker without a token
    compute and read at every change, and take the page's own fresh read."""
    return request.rel_url.raw_path == page.OVERVIEW_PATH and "fresh" in request.rel_url.query


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_of(url: str) -> tuple[str, str, int | None]:
    """A URL's origin (scheme, host, port), the default port spelt out: a
    browser never writes it in Origin, a user may in --advertise-url."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return (
        scheme,
        (parts.hostname or "").removesuffix("."),
        parts.port or _DEFAULT_PORTS.get(scheme),
    )


@functools.lru_cache(maxsize=64)  # a few hosts, asked at every request: 0.4 µs, not 1.8
def _names_this_machine(host: str, advertised: str) -> bool:
    """Whether a Host header names a loopback broker: an IP address, localhost
    (or a name under it, "localhost." too), or the host of its advertised URL."""
    try:
        name = (urlsplit(f"//{host}").hostname or "").removesuffix(".")
    except ValueError:  # "[::1" and the like: names nothing
        return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    if name == (urlsplit(advertised).hostname or ""):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _unrouted(found: tuple[dict[str, Route], dict[str, str]] | None, path: str) -> web.Response:
    if found is None:  # told apart from a 404 of the API's (a claim's: nothing to claim)
        return error_of(RouteNotFound(f"no route of the API is at {path}"))
    allowed = set(found[0])
    if "GET" in allowed:
        allowed.add("HEAD")
    return error("Method Not Allowed", 405, Allow=",".join(sorted(allowed)))


def _no_query(call: Call) -> None:
    """InvalidRequest for a query sent to a route that takes none (an empty
    one, a bare "?", is none): answered as if it were not there, a purge or
    requeue meant for the jobs it named acted on every dead job, a claim
    asked ?wait=30 answered at once."""
    if call.request.rel_url.raw_query_string:
        route = call.route
        raise InvalidRequest(f"query: {route.method} {route.path} takes no query parameters")


async def _expect(request: web.BaseRequest) -> None:
    """Answer `Expect: 100-continue` (curl sends it with bodies over 1 KiB and
    waits a second for it) before the body is read, as aiohttp's router does;
    one for a body whose Content-Length is over its limit PayloadTooLarge
    instead, before the client sends it (RFC 9110 10.1.1 lets a server answer
    a final status at once). In an HTTP/1.0 request it is ignored (RFC 9110
    10.1.1: a MUST), the body read as it comes. Another expectation is
    InvalidRequest (RFC 9110 lets a server answer it 417, a status no route
    of the API lists)."""
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        raise InvalidRequest(f"Expect: {expect!r}: only 100-continue is known")
    if request.version < HttpVersion11:
        return
    size, limit = request.content_length, request.client_max_size
    # A peer's limit may grow once its record is read (Call._room_for_a_peer).
    if size is not None and size > limit and FORWARDED not in request.headers:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0


async def _routed(call: Call, services: HttpServices) -> web.StreamResponse:
    """A topic's request, served by its owner (SPEC 4.3): here, or forwarded
    to it. Either way the answer names who served it (Simplequeue-Owner), so
    that a client sends the topic's next requests there itself."""
    forwarder = services.forwarder
    request = call.request
    handler = call.route.handler
    topic = call.topic
    if forwarder is None or FORWARDED in request.headers or _owned_here(call, forwarder):
        try:
            response = await handler(call)  # the common case: the body is read once, there
        except SimpleQueueError as exc:  # an error names who served it too
            response = error_of(exc)
        response.headers[OWNER] = services.url()
        return response
    # Another route's body is not read (nor passed on): its owner would ignore
    # it, but reading it here held it to --max-body and --body-timeout.
    body = asked = await call.read() if call.route.takes_body else b""
    wait = 0.0
    undo = None  # a pop's or complete's, should its answer be lost
    take_back = None  # a claim's, should the owner answer it too late
    named = None  # a pop or complete its client named, or its unpop
    name = call.route.name
    if name == "claim":
        take_back, body = _attempted(call, api.decode(body, api.ClaimRequest))
        wait = take_back.wait
    elif name == "pop":
        popping = api.decode(body, api.ClaimRequest)
        wait = popping.wait
        undo, named, body = _named(call, popping, popping.worker_id)
    elif name == "complete":
        undo, named, body = _named(call, api.decode(body, api.CompleteRequest), None)
    elif name == "unpop":
        named = api.decode(body, api.UnpopRequest)
    elif name == "job":
        wait = wait_of(call)
    elif name in ("enqueue", "push"):
        # Ids go with it, so that a broker that serves it after one that did not
        # answer (and may have done it) serves the same jobs: duplicates there.
        call.body = body = _with_ids(body)
    # Done twice, a pop hands out one job and loses another, a complete
    # answers "not held" for the job it completed.
    repeatable = name not in ("pop", "complete")
    started = time.monotonic()
    got = await forwarder.route(
        topic,
        # A HEAD's answer is the GET's headers: asked as a GET, whose body this
        # broker's answer then leaves out (a HEAD's empty one set Content-Length 0).
        "GET" if request.method == "HEAD" else request.method,
        request.rel_url.raw_path_qs,
        body or None,
        wait=wait,
        repeatable=repeatable,
        undo=undo,
        take_back=take_back,
        named=named,
    )
    named_here = undo is not None or (take_back is not None and body is not asked)
    if named_here and isinstance(got, Answer) and refused_attempt_id(got):
        # An owner older than POST /unpop (or, for a claim, than attempt ids)
        # refused the id added here: it did nothing.
        call.body = body = asked
        got = await forwarder.route(
            topic,
            request.method,
            request.rel_url.raw_path_qs,
            asked,
            wait=wait,
            repeatable=repeatable,
        )
    if isinstance(got, Here):  # its owner, or the next when those before did not answer
        call.spent = time.monotonic() - started  # a long poll asked for is not waited twice
        if undo is not None:  # the id named it for an owner elsewhere: the engine here
            call.body = asked  # needs none, nor to keep what it did under one
        try:
            response = await handler(call)
        except SimpleQueueError as exc:  # answered here, to name who served it
            response = error_of(exc)  # (and, replayed, to say it may be a repeat)
        response.headers[OWNER] = services.url()
        if got.replayed:
            response.headers[REPLAYED] = "1"
        return response
    answered = web.Response(body=got.body, status=got.status, headers=got.headers)
    answered.headers["Content-Type"] = got.content_type
    answered.headers[OWNER] = got.served_by.url
    if got.replayed:
        answered.headers[REPLAYED] = "1"
    return answered


# Requests a broker serving in place of an owner that did not answer lately
# routes all the same (to here first), so that their retries under their
# attempt id come back here (Forwarder.route's take_back, named): the owner,
# back, would claim or pop other jobs. An unpop, so that it comes where its
# pop was done.
_ROUTED_IN_PLACE = frozenset({"claim", "pop", "complete", "unpop"})


def _owned_here(call: Call, forwarder: Forwarder) -> bool:
    """Whether this broker serves `call` as its topic's owner, unrouted."""
    membership = forwarder.membership
    if call.route.name in _ROUTED_IN_PLACE:
        return membership.home(call.topic) == membership.me
    return membership.owns(call.topic)


def _named(
    call: Call, request: api.ClaimRequest | api.CompleteRequest, worker_id: str | None
) -> tuple[api.UnpopRequest | None, api.UnpopRequest | None, bytes]:
    """A pop's or complete's undo, should its answer be lost, the name its
    client gave it (its attempt id, as its unpop names it), and its body as
    passed on. One the client named is its own to retry or undo: passed on
    as it came, with no undo, and its retries and unpop go where its first
    try went (Forwarder.route's `named`); one it did not is named here, by
    the attempt id the undo names."""
    assert call.body is not None  # read by _routed
    if request.attempt_id is not None:
        return None, api.UnpopRequest(request.attempt_id, worker_id), call.body
    undo = api.UnpopRequest(api.new_id(), worker_id)
    call.body = msgspec.json.encode(msgspec.structs.replace(request, attempt_id=undo.attempt_id))
    return undo, None, call.body


def _attempted(call: Call, request: api.ClaimRequest) -> tuple[api.ClaimRequest, bytes]:
    """A claim named by an attempt id, as its owner is asked it again should
    it answer too late (Forwarder.route's take_back), and its body as passed
    on: the client's id, or one added here."""
    assert call.body is not None  # read by _routed
    if request.attempt_id is not None:
        return request, call.body
    request = msgspec.structs.replace(request, attempt_id=api.new_id())
    call.body = msgspec.json.encode(request)
    return request, call.body


def _with_ids(body: bytes) -> bytes:
    """An enqueue's body with an id for every job (api.with_ids), so that it can
    be sent on to the next broker when the first did not answer."""
    spec = api.decode_either(body, api.JobSpec, api.EnqueueBatch, "jobs")
    if isinstance(spec, api.JobSpec):
        return body if spec.id is not None else msgspec.json.encode(api.with_ids([spec])[0])
    if all(j.id is not None for j in spec.jobs):
        return body
    return msgspec.json.encode(api.EnqueueBatch(api.with_ids(spec.jobs)))


# --- parsing -----------------------------------------------------------------------


async def body_of(call: Call, kind: type[T], required: bool = True) -> T:
    """The body, decoded and validated as `kind` (a type of simplequeue.api). An
    empty body is `kind()` when the request may have none."""
    raw = await call.read()
    if not required and not raw.strip():
        return kind()
    return api.decode(raw, kind)


# --- handlers -------------------------------------------------------------------------


async def enqueue(call: Call) -> web.Response:
    topic = call.topic
    body = api.decode_either(await call.read(), api.JobSpec, api.EnqueueBatch, "jobs")
    engine = call.engine
    if isinstance(body, api.EnqueueBatch):
        answers = await engine.enqueue(topic, body.jobs)
        ids = [a["id"] for a in answers]
        duplicates = [a["id"] for a in answers if a["duplicate"]]
        fresh = len(duplicates) < len(answers)
        return reply({"ids": ids, "duplicates": duplicates}, 201 if fresh else 200)
    [answer] = await engine.enqueue(topic, [body])
    if answer["duplicate"]:
        return reply({"id": answer["id"], "duplicate": True}, 200)
    return reply({"id": answer["id"]}, 201)


async def claim(call: Call) -> web.Response:
    topic = call.topic
    body = await body_of(call, api.ClaimRequest)
    jobs = await call.engine.claim(
        topic,
        body.worker_id,
        lease=body.lease,
        count=body.count or 1,
        wait=call.left(body.wait),
        attempt_id=body.attempt_id,
    )
    if not jobs:
        raise NothingToClaim("no job is claimable")
    answer = reply({"jobs": jobs} if body.count is not None else {"job": jobs[0]})
    return _with_now(answer, call)


async def pop(call: Call) -> web.Response:
    topic = call.topic
    body = await body_of(call, api.ClaimRequest)
    jobs = await call.engine.pop(
        topic,
        body.worker_id,
        count=body.count or 1,
        wait=call.left(body.wait),
        attempt_id=body.attempt_id,
    )
    if not jobs:
        raise NothingToClaim("no job is claimable")
    return reply({"jobs": jobs})


async def push(call: Call) -> web.Response:
    topic = call.topic
    body = await body_of(call, api.EnqueueBatch)
    return reply({"length": await call.engine.push(topic, body.jobs)})


async def release(call: Call) -> web.Response:
    topic = call.topic
    body = await body_of(call, api.ReleaseRequest)
    return reply({"released": await call.engine.release(topic, _claims(body.claims))})


async def complete(call: Call) -> web.Response:
    topic = call.topic
    body = await body_of(call, api.CompleteRequest)
    done = await call.engine.complete(topic, _claims(body.claims), body.attempt_id)
    return reply({"completed": done})


async def unpop(call: Call) -> web.Response:
    topic = call.topic
    body = await body_of(call, api.UnpopRequest)
    given_back = await call.engine.unpop(topic, body.attempt_id, body.worker_id)
    return reply({"given_back": given_back})


def _claims(held: list[api.Held]) -> list[dict[str, Any]]:
    """A request's claims as the engine takes them (claimed jobs' id and token)."""
    return [{"id": c.job_id, "lease_token": c.lease_token} for c in held]


async def refresh(call: Call) -> web.Response:
    topic = call.topic
    await call.services.refresh(topic)
    return reply({"ok": True})


async def ack(call: Call) -> web.Response:
    topic = call.topic
    body = api.decode_either(await call.read(), api.AckRequest, api.AckBatch, "acks")
    engine = call.engine
    if isinstance(body, api.AckBatch):
        return reply({"results": await engine.ack_many(topic, body.acks)})
    return reply(await engine.ack(topic, body.job_id, body.lease_token, body.result, body.enqueue))


async def nack(call: Call) -> web.Response:
    topic = call.topic
    body = await body_of(call, api.NackRequest)
    return reply(
        await call.engine.nack(topic, body.job_id, body.lease_token, body.delay, body.error)
    )


async def heartbeat(call: Call) -> web.Response:
    topic = call.topic
    body = await body_of(call, api.HeartbeatRequest)
    renewed = await call.engine.heartbeat(topic, body.job_id, body.lease_token, body.lease)
    return _with_now(reply(renewed), call)


def _with_now(answer: web.Response, call: Call) -> web.Response:
    """`answer` (to a claim or a heartbeat) saying the store's time as it
    leaves, after the write (api.NOW_HEADER): its caller counts what its
    leases have left from when it came."""
    answer.headers[api.NOW_HEADER] = repr(call.engine.latest_now())
    return answer


async def status(call: Call) -> web.Response:
    return reply(await call.engine.status(call.topic))


async def job(call: Call) -> web.Response:
    topic = call.topic
    wait = wait_of(call)
    return reply(await call.engine.job(topic, call.params["job_id"], wait))


def wait_of(call: Call) -> float:
    """The `wait` query parameter (seconds a long poll may wait), validated as
    every query is (api.from_query: `?wat=30`, a typo, is refused)."""
    return call.left(api.from_query(call.request.query, api.WaitQuery).wait)


async def dead(call: Call) -> web.Response:
    query = api.from_query(call.request.query, api.DeadQuery)
    jobs, count = await call.engine.dead(call.topic, query.offset, query.limit)
    return reply({"jobs": jobs, "dead": count})


async def requeue(call: Call) -> web.Response:
    topic = call.topic
    body = await body_of(call, api.JobIdsRequest, required=False)
    ids = await call.engine.requeue(topic, body.job_ids)
    return reply({"requeued": ids})


async def purge(call: Call) -> web.Response:
    topic = call.topic
    body = await body_of(call, api.JobIdsRequest, required=False)
    ids = await call.engine.purge(topic, body.job_ids)
    return reply({"purged": ids})


async def cancel(call: Call) -> web.Response:
    topic = call.topic
    body = await body_of(call, api.CancelRequest)
    return reply(await call.engine.cancel(topic, body.job_ids))


async def put_schedule(call: Call) -> web.Response:
    topic = call.topic
    body = await body_of(call, api.ScheduleRequest)
    name = call.params["name"]
    return reply(await call.engine.put_schedule(topic, name, body))


async def schedules(call: Call) -> web.Response:
    return reply({"schedules": await call.engine.schedules(call.topic)})


async def delete_schedule(call: Call) -> web.Response:
    topic = call.topic
    name = call.params["name"]
    await call.engine.delete_schedule(topic, name)
    return reply({"deleted": name})


async def settings(call: Call) -> web.Response:
    return reply(await call.engine.settings(call.topic))


async def put_settings(call: Call) -> web.Response:
    topic = call.topic
    body = await body_of(call, api.SettingsRequest)
    return reply(await call.engine.put_settings(topic, body))


async def topics(call: Call) -> web.Response:
    counts, errors = await call.engine.topics()
    return reply({"topics": counts, "errors": errors})


async def healthz(call: Call) -> web.Response:
    services = call.services
    await services.engine.check_store()
    return reply({"ok": True, **services.about()})


async def metrics(call: Call) -> web.Response:
    body = await call.services.metrics.scrape()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi(call: Call) -> web.Response:
    from simplequeue.broker.openapi import spec

    return reply(spec())


def _routes(status_page: page.StatusPage) -> list[Route]:
    """Every route of the broker: SPEC section 5's API, and the status page."""
    t = "/topics/{topic}"

    async def index(call: Call) -> web.Response:
        return status_page.index(call.request)

    async def asset(call: Call) -> web.Response:
        return status_page.asset(call.request, call.params["name"])

    async def overview(call: Call) -> web.Response:
        query = api.from_query(call.request.query, page.OverviewQuery)
        if query.fresh is not None:
            keys.check_topic(query.fresh)
        if query.prefix:
            try:
                keys.check_topic(query.prefix)
            except InvalidRequest:
                raise InvalidRequest(
                    "a topic prefix is up to 128 characters of [A-Za-z0-9_-]"
                ) from None
        gzipped = takes_gzip(call.request.headers.get("Accept-Encoding", ""))
        return await status_page.overview(query.fresh, query.prefix, gzipped)

    return [
        Route("POST", f"{t}/enqueue", enqueue, takes_body=True),
        Route("POST", f"{t}/claim", claim, takes_body=True),
        Route("POST", f"{t}/pop", pop, takes_body=True),
        Route("POST", f"{t}/push", push, takes_body=True),
        Route("POST", f"{t}/release", release, takes_body=True),
        Route("POST", f"{t}/complete", complete, takes_body=True),
        Route("POST", f"{t}/unpop", unpop, takes_body=True),
        Route("POST", f"{t}/refresh", refresh),
        Route("POST", f"{t}/ack", ack, takes_body=True),
        Route("POST", f"{t}/nack", nack, takes_body=True),
        Route("POST", f"{t}/heartbeat", heartbeat, takes_body=True),
        Route("GET", f"{t}/status", status),
        Route("GET", t + "/jobs/{job_id}", job, query=True),
        Route("GET", f"{t}/dead", dead, query=True),
        Route("POST", f"{t}/requeue", requeue, takes_body=True),
        Route("DELETE", f"{t}/dead", purge, takes_body=True),
        Route("POST", f"{t}/cancel", cancel, takes_body=True),
        Route("GET", f"{t}/schedules", schedules),
        Route("PUT", t + "/schedules/{name}", put_schedule, takes_body=True),
        Route("DELETE", t + "/schedules/{name}", delete_schedule),
        Route("GET", f"{t}/settings", settings),
        Route("PUT", f"{t}/settings", put_settings, takes_body=True),
        Route("GET", "/topics", topics),
        Route("GET", "/healthz", healthz, public=True),
        Route("GET", "/metrics", metrics),
        Route("GET", "/openapi.json", openapi),
        Route("GET", "/", index, public=True, query=True),
        Route("GET", page.STATIC_PREFIX + "{name}", asset, public=True, query=True),
        Route("GET", page.OVERVIEW_PATH, overview, query=True),
    ]
