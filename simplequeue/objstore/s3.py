"""s3: objects in an S3 bucket (AWS, LocalStack, MinIO) through aiobotocore.

Compare-and-set is PutObject with IfMatch / IfNoneMatch='*'. Every way S3 says
"the condition did not hold" (412, 404 on an If-Match whose object vanished)
becomes PreconditionFailed. 409 ConditionalRequestConflict does not say that:
S3 answers it when a conflicting operation ran at the same time, nothing was
written, and the PUT is to be sent again (whose retry then lands, or gets 412).
Transient failures are retried here with tenacity, bounded and jittered, then
StoreUnavailable.
botocore's own retries are off so that only one retry policy applies.

A conditional PUT whose answer never came (a read timeout, a connection cut
after the request went out) is not retried here: it raises AmbiguousWrite at
once, and the committer resolves it by reading the head back (the write id
in it says whether it landed). Only failures before the request was sent,
and answers S3 gave, are retried. A retried conditional PUT whose first
attempt landed unseen answers 412, which the committer resolves the same way:
aiohttp itself sends a PUT again, once, when its connection is reset (RFC
9112's retry of idempotent methods), so a 412 from put_if may be our own
write's, whatever this module does.

Some S3-compatible stores take a conditional PUT for a plain one: a handle
probes, once, before its first conditional write (conditional_writes_fault),
and refuses to write to one that does.

The store's clock is S3's: the Date header of every answer, errors included,
is a sample for it, bounded by the monotonic times the call was made and
answered (botocore's before-call and after-call events on our client).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import socket
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import aiohttp
import botocore.exceptions
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConfigNotFound,
    ConfigParseError,
    CredentialRetrievalError,
    EndpointConnectionError,
    InvalidConfigError,
    InvalidEndpointConfigurationError,
    InvalidRegionError,
    NoAuthTokenError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
    ProfileNotFound,
    SSOError,
    TokenRetrievalError,
    UnknownCredentialError,
    UnknownEndpointError,
    UnknownServiceError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception,
    wait_random_exponential,
)

from simplequeue.errors import (
    AmbiguousWrite,
    ObjectNotFound,
    PreconditionFailed,
    StoreError,
    StoreRefused,
    StoreUnavailable,
    StoreUnusable,
)
from simplequeue.objstore.base import ObjectStore, check_key, content_etag

T = TypeVar("T")
log = logging.getLogger(__name__)

# The least time a try of a request gets: a retry starts only with this much of
# the retry budget left (S3 answers in about 0.1 s, 0.2 s at its p99).
MIN_TRY = 1.0
# An HTTP Date header counts whole seconds.
DATE_RESOLUTION = 1.0
# Where the before-call hook leaves the local time a call set out (the clock's), in the
# request context botocore hands to both hooks of one call.
_SENT = "simplequeue_sent"

# Where the probe of conditional writes puts its object, under the prefix: no
# key (check_key takes no part starting with a dot), so no listing of
# simplequeue's own finds it; a name of its own for each probe.
PROBE_FOLDER = ".simplequeue/"
CONDITIONS_IGNORED = (
    "the store does not honour conditional writes (If-None-Match/If-Match): "
    "simplequeue needs them, and every broker's write would win over the others'"
)

# One botocore session a loop, shared by its stores, and one loader of
# botocore's data files for all: a session's first client loaded S3's service
# model from disk (0.08-0.12 s, on the loop), and every store opened with a
# session of its own paid that again (twenty stores, 2.4 s). With the loader
# shared, a new session's first client takes 0.02 s; another client of the
# same session, 0.003 s. Sessions are per loop, not per process: a session
# keeps the credentials it resolved, and their providers' locks belong to the
# loop they were taken on. The loader only reads files.
_SESSIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AioSession] = (
    weakref.WeakKeyDictionary()
)
_LOADER: list[Any] = []  # the shared loader, once one session has made it


def _session() -> AioSession:
    loop = asyncio.get_running_loop()
    session = _SESSIONS.get(loop)
    if session is None:
        session = _SESSIONS[loop] = get_session()
        if _LOADER:
            session.register_component("data_loader", _LOADER[0])
        else:
            _LOADER.append(session.get_component("data_loader"))
    return session


_LOST_RACE_CODES = {"PreconditionFailed"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
# Answers a retry may not get: throttling, a conditional write that met a
# conflicting operation (409: nothing was written, "retry the upload"), and a
# request whose bytes were damaged or cut on the way, or signed with temporary
# credentials that expired (the provider refreshes them).
_RETRIED_CODES = {
    "ConditionalRequestConflict",
    "OperationAborted",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "IncompleteBody",
    "BadDigest",
    "XAmzContentSHA256Mismatch",
    "ExpiredToken",
    "TokenRefreshRequired",
}
# botocore's refusals before sending anything: the configuration's. Credentials
# that cannot be had are among them, whatever the reason (none, a
# credential_process that fails, an SSO session that expired, a metadata
# service that did not answer its own retries): nothing was sent, so a
# conditional write is not ambiguous, and the next request tries them again.
_CONFIGURATION_ERRORS: tuple[type[Exception], ...] = (
    NoCredentialsError,
    PartialCredentialsError,
    CredentialRetrievalError,
    TokenRetrievalError,
    NoAuthTokenError,
    SSOError,
    # `aws login` sessions; an older botocore has no such error.
    getattr(botocore.exceptions, "LoginError", NoCredentialsError),
    ProfileNotFound,
    ConfigNotFound,
    ConfigParseError,
    UnknownCredentialError,
    NoRegionError,
    InvalidRegionError,
    InvalidConfigError,
    InvalidEndpointConfigurationError,
    UnknownEndpointError,
    UnknownServiceError,
    ParamValidationError,
)

# botocore 1.36 and later add a CRC32 to every PutObject (over https in an
# aws-chunked body with a trailer), which S3-compatible stores that predate it
# refuse (XAmzContentSHA256Mismatch, "unsupported header"), every write failing.
# Sent only when an operation requires one, as before 1.36: over https TLS
# guards the bytes, over http SigV4 signs their SHA-256. Answers are still
# checked against a checksum the store sends (AWS does, for every object).
_CHECKSUMS_WHEN_REQUIRED: dict[str, str] = (
    {"request_checksum_calculation": "when_required"}
    if "request_checksum_calculation" in AioConfig.OPTION_DEFAULTS
    else {}
)


@dataclass(frozen=True)
class S3Settings:
    """Where the bucket is and how patiently to talk to it."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    connect_timeout: float = 3.0
    read_timeout: float = 10.0
    max_attempts: int = 6
    retry_budget: float = 20.0
    max_connections: int = 64
    list_page_keys: int = 1000  # keys a listing's request asks for (S3 answers 1,000 at most)


def _status(exc: ClientError) -> int:
    status: int = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status


def _code(exc: ClientError) -> str:
    code: str = exc.response.get("Error", {}).get("Code", "")
    return code


def date_of(response: Mapping[str, Any]) -> float | None:
    """The Date header of a botocore response (or of a ClientError's
    `response`) in Unix seconds; None when it is missing or unreadable (a
    year past what a C long holds raises OverflowError)."""
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    try:
        date = parsedate_to_datetime(headers["date"])
    except (KeyError, TypeError, ValueError, IndexError, OverflowError):
        return None
    if date.tzinfo is None:  # "-0000": UTC, says RFC 5322, with no source zone
        date = date.replace(tzinfo=UTC)
    return date.timestamp()


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: 5xx, throttling, timeouts, lost
    connections, a body damaged in transit. Not botocore's refusals before
    sending (no credentials, a parameter it rejects): the configuration's."""
    if isinstance(exc, ClientError):
        status = _status(exc)
        if status == 501:  # NotImplemented: a store without what was asked, for good
            return False
        return status >= 500 or status == 429 or _code(exc) in _RETRIED_CODES
    if isinstance(exc, _CONFIGURATION_ERRORS):
        return False
    return isinstance(exc, BotoCoreError | aiohttp.ClientError | asyncio.TimeoutError | OSError)


def is_unsent(exc: BaseException) -> bool:
    """True for failures that happened before the request reached S3 (it could
    not connect): retrying cannot write anything twice. aiobotocore reports a
    connection reset after the request went out as EndpointConnectionError
    too: only the one whose cause is a failure to connect counts."""
    if isinstance(exc, EndpointConnectionError):
        cause = exc.kwargs.get("error")
        return isinstance(cause, aiohttp.ClientConnectorError | socket.gaierror)
    return isinstance(exc, BotoConnectionError | aiohttp.ClientConnectorError)


def is_answered(exc: BaseException) -> bool:
    """True when S3 itself answered (an error status): the request is settled."""
    return isinstance(exc, ClientError)


def is_lost_race(exc: ClientError, conditional_on_etag: bool) -> bool:
    """True when S3 says a conditional write's condition did not hold. Not a
    409 (ConditionalRequestConflict): that one says a conflicting operation
    ran meanwhile and nothing was written, not that the object exists or
    moved; it is retried, and the retry answers 412 if it does."""
    status, code = _status(exc), _code(exc)
    if code == "NoSuchBucket":  # a 404 too, and no race: the bucket is wrong or gone
        return False
    if status == 412 or code in _LOST_RACE_CODES:
        return True
    # If-Match on a key that no longer exists: the object we matched is gone.
    return conditional_on_etag and (status == 404 or code in _MISSING_CODES)


class S3Store(ObjectStore):
    """Objects under `s3://bucket/prefix/`; the client opens on first use."""

    def __init__(self, settings: S3Settings) -> None:
        super().__init__()
        self.settings = settings
        prefix = settings.prefix.strip("/")
        self._prefix = f"{prefix}/" if prefix else ""
        query = {"endpoint_url": settings.endpoint_url, "region": settings.region}
        given = urlencode({k: v for k, v in query.items() if v}, safe=":/", quote_via=quote)
        # Quoted, as store_from_url() unquotes: a prefix may hold "?", "#" or "%".
        self.url = f"s3://{settings.bucket}/{quote(prefix)}" + (f"?{given}" if given else "")
        self.held_descriptors = settings.max_connections
        self._client: Any = None
        self._opened: AsyncExitStack | None = None  # closes self._client
        # One for each of the client's pooled connections, held by a try while
        # it runs: a try queues here, never in aiohttp's pool (_connection).
        self._connections = asyncio.Semaphore(settings.max_connections)
        self._opening = asyncio.Lock()
        self._closed = False
        self._sample_failed = False  # logged once
        self._probing = asyncio.Lock()
        self._conditions_checked = False
        self._conditions_fault: str | None = None

    def for_another_loop(self) -> S3Store:
        """A handle of its own: this one's client and lock belong to the loop
        that opened them; the verdict on its conditional writes is shared."""
        other = S3Store(self.settings)
        other._conditions_checked = self._conditions_checked
        other._conditions_fault = self._conditions_fault
        return other

    async def _s3(self) -> Any:
        if self._closed:  # an operation's retry after close(): it opened a client nothing closed
            raise StoreUnavailable(f"{self.url}: the store was closed")
        if self._client is None:
            async with self._opening:
                if self._closed:  # it was closed while this call waited for another's opening
                    raise StoreUnavailable(f"{self.url}: the store was closed")
                if self._client is None:
                    s = self.settings
                    config = AioConfig(
                        connect_timeout=s.connect_timeout,
                        read_timeout=s.read_timeout,
                        retries={"total_max_attempts": 1, "mode": "standard"},
                        max_pool_connections=s.max_connections,
                        **_CHECKSUMS_WHEN_REQUIRED,
                    )
                    opened = AsyncExitStack()
                    try:
                        client = await opened.enter_async_context(
                            _session().create_client(
                                "s3",
                                endpoint_url=s.endpoint_url,
                                region_name=s.region,
                                config=config,
                            )
                        )
                    except ValueError as exc:  # botocore's "Invalid endpoint: localhost:9000"
                        raise StoreRefused(f"{self.url}: {exc}") from exc
                    # Opening waits (for credentials: a credential_process, SSO,
                    # the metadata service): close() may have run meanwhile,
                    # and closed nothing of this client. It is closed here, and
                    # nothing is sent with it.
                    if self._closed:
                        await opened.aclose()
                        raise StoreUnavailable(f"{self.url}: the store was closed")
                    self._opened = opened
                    # Every call of every operation, each page of a listing and
                    # each retry, passes these two events, answered or refused;
                    # _call only sees what the operation made of the answer.
                    client.meta.events.register("before-call.s3", self._call_sent)
                    client.meta.events.register("after-call.s3", self._call_answered)
                    self._client = client
        return self._client

    def _call_sent(self, context: dict[str, Any], **_: Any) -> None:
        context[_SENT] = self.clock.local()

    def _call_answered(self, parsed: Mapping[str, Any], context: dict[str, Any], **_: Any) -> None:
        # It runs inside the operation, once its answer is in: whatever it
        # raised would fail a GET that succeeded, or a conditional PUT that
        # landed, with an error no caller expects. A sample it cannot take is
        # skipped.
        try:
            self._sample(parsed, context)
        except Exception:
            if not self._sample_failed:
                self._sample_failed = True
                log.debug("%s: an answer's Date was not a clock sample", self.url, exc_info=True)

    def _sample(self, parsed: Mapping[str, Any], context: dict[str, Any]) -> None:
        received = self.clock.local()
        sent = context.get(_SENT)
        stamp = date_of(parsed)
        status = parsed.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        # Not a 5xx's or a 429's Date: a proxy, load balancer or rate limiter in
        # front of S3 answers those with its own clock (a burst of them, one
        # request's retries, agrees). S3 itself throttles with 503 SlowDown.
        if sent is not None and stamp is not None and status < 500 and status != 429:
            self.clock.observe(sent, received, stamp, DATE_RESOLUTION)

    async def _call(self, op: Callable[[Any], Awaitable[T]], conditional: bool = False) -> T:
        """Run `op(client)` with bounded, jittered retries of transient failures.
        A `conditional` write is retried only when it surely was not applied
        (a connection that never opened) or was answered: a retry of one
        applied meanwhile answers 412, and the committer reads the head back.
        One whose tries all failed, one of them answered 5xx other than 503
        (S3's SlowDown: refused), is AmbiguousWrite when the retries run out:
        a 500, or a gateway's 502 or 504 in front of an S3-compatible store,
        may have been applied, or be applied later."""
        maybe_applied = False

        def retried(exc: BaseException) -> bool:
            nonlocal maybe_applied
            if not is_transient(exc):
                return False
            if conditional and is_answered(exc) and _status(exc) >= 500 and _status(exc) != 503:
                maybe_applied = True
            return not conditional or is_unsent(exc) or is_answered(exc)

        s = self.settings
        # The budget bounds the whole call, not when its last try may start: a
        # retry starts only with MIN_TRY of it left, after a pause that leaves
        # that much, and no try runs past it.
        deadline = time.monotonic() + s.retry_budget
        backoff = wait_random_exponential(multiplier=0.05, max=2.0)

        def left() -> float:
            return deadline - time.monotonic()

        def stop(state: RetryCallState) -> bool:
            return state.attempt_number >= s.max_attempts or left() < MIN_TRY

        def wait(state: RetryCallState) -> float:
            return max(0.0, min(backoff(state), left() - MIN_TRY))

        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(retried), stop=stop, wait=wait, reraise=False
            ):
                with attempt:
                    async with self._connection(left() - MIN_TRY):
                        # botocore's read timeout does not cover every wait (a PUT
                        # waiting for its "100 Continue" hangs for ever): each try
                        # has a deadline of its own, within what is left of the
                        # budget (a first try gets MIN_TRY whatever the budget),
                        # from when it holds a connection: time queued behind
                        # other calls' requests is not the store's.
                        per_try = s.connect_timeout + s.read_timeout + 2
                        async with asyncio.timeout(min(per_try, max(left(), MIN_TRY))):
                            client = await self._s3()
                            try:
                                return await op(client)
                            except NoCredentialsError:
                                # The client was made when no provider had any (a
                                # credentials file not written yet, the metadata
                                # service down at boot) and keeps none for good:
                                # the next request opens one that looks again.
                                await self._drop(client)
                                raise
        except ClientError as exc:
            # Not retried (a refusal); after a try answered 5xx that may have
            # been applied, unless this one says the condition no longer holds
            # (412; 404 for If-Match: the 5xx'd try cannot land on it then).
            if maybe_applied and _status(exc) not in (404, 412):
                raise AmbiguousWrite(
                    f"{self.url}: a conditional write answered 5xx may have been "
                    f"applied; the next try was refused: {exc!r}"
                ) from exc
            raise
        except RetryError as exc:
            last = exc.last_attempt.exception()
            if maybe_applied:
                raise AmbiguousWrite(
                    f"{self.url}: a conditional write answered 5xx may have been "
                    f"applied; the last try: {last!r}"
                ) from last
            raise StoreUnavailable(f"{self.url}: {last!r}") from last
        except (TimeoutError, BotoCoreError, aiohttp.ClientError, OSError, StoreUnavailable) as exc:
            if maybe_applied and not isinstance(exc, AmbiguousWrite):
                # A try answered 5xx may land yet, however the next failed: not
                # sent (credentials that could not be refreshed, StoreRefused
                # "did not land" before) or never given a connection within the
                # budget (StoreUnavailable "not sent").
                raise AmbiguousWrite(
                    f"{self.url}: a conditional write answered 5xx may have been "
                    f"applied; the next try: {exc!r}"
                ) from exc
            if isinstance(exc, StoreUnavailable):  # _connection's: not sent
                raise
            if isinstance(exc, ParamValidationError):
                # A request botocore never sends (`--bucket bad/name`): every one
                # would be refused so, and nothing but an operator changes that:
                # simplequeued exits at start (it served 503 for ever).
                raise StoreUnusable(f"{self.url}: {exc}") from exc
            if not is_transient(exc):  # refused before sending: no credentials, ...
                raise StoreRefused(f"{self.url}: {exc}") from exc
            if conditional:
                raise AmbiguousWrite(
                    f"{self.url}: no answer to a conditional write: {exc!r}"
                ) from exc
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.asynccontextmanager
    async def _connection(self, within: float) -> AsyncIterator[None]:
        """One of the pool's connections for a try, waited for `within` s at
        most: a burst over a healthy store queues, and its tries' deadlines
        start when they are sent. The queue counts against the call's budget
        (a request leaves it only with MIN_TRY left, as a retry starts): one
        still there then was never sent, so StoreUnavailable, never
        AmbiguousWrite."""
        try:
            async with asyncio.timeout(max(within, 0.0)):
                await self._connections.acquire()
        except TimeoutError:
            raise StoreUnavailable(
                f"{self.url}: not sent: all {self.settings.max_connections} connections "
                f"were busy for the retry budget ({self.settings.retry_budget:g} s)"
            ) from None
        try:
            yield
        finally:
            self._connections.release()

    def _key(self, key: str) -> str:
        return self._prefix + check_key(key)

    async def get(self, key: str) -> tuple[bytes, str]:
        async def op(client: Any) -> tuple[bytes, str]:
            resp = await client.get_object(Bucket=self.settings.bucket, Key=self._key(key))
            async with resp["Body"] as stream:
                data: bytes = await stream.read()
            return data, self._etag_of(resp)

        try:
            return await self._call(op)
        except ClientError as exc:
            if _status(exc) == 404 and _code(exc) in _MISSING_CODES:
                raise ObjectNotFound(key) from None
            raise self._unexpected(exc) from exc

    async def put(self, key: str, data: bytes) -> str:
        return await self._put(key, data, {})

    async def put_if(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        self._check_condition(if_match, if_none_match)
        fault = await self.conditional_writes_fault()
        if fault is not None:
            raise StoreUnusable(f"{self.url}: {fault}")
        cond = {"IfMatch": if_match} if if_match is not None else {"IfNoneMatch": "*"}
        return await self._put(key, data, cond)

    async def sample_clock(self) -> None:
        """Every answer of S3's carries its Date, errors too: a handle that has
        had none (it sent nothing yet, or had only 5xx) asks for one, a HEAD of
        the bucket whatever it answers. Something in front of the store that
        drops the Date (or a store that never sends one) leaves none: then
        StoreRefused, saying so, rather than leases and heartbeats written on
        this machine's wall clock with an error of 0."""
        if self.clock.samples:
            return

        async def op(client: Any) -> None:
            await client.head_bucket(Bucket=self.settings.bucket)

        with contextlib.suppress(ClientError):  # a 403 or 404 carries the Date too
            await self._call(op)
        if not self.clock.samples:
            raise StoreUnusable(
                f"{self.url}: its answers carry no Date header (or none that can be "
                "read): simplequeue writes times on the store's clock, and cannot tell it"
            )

    async def conditional_writes_fault(self) -> str | None:
        """Found out once per handle, before its first conditional write (a
        broker asks at start): a store that did not answer is asked again."""
        if not self._conditions_checked:
            async with self._probing:
                if not self._conditions_checked:
                    try:
                        self._conditions_fault = await self._probe_conditions()
                    except AmbiguousWrite as exc:  # the probe's own write: nothing to read back
                        raise StoreUnavailable(
                            f"{self.url}: checking its conditional writes: {exc}"
                        ) from exc
                    self._conditions_checked = True
        return self._conditions_fault

    async def _probe_conditions(self) -> str | None:
        """Write an object of the probe's own, then write it again with
        If-None-Match: * and with If-Match of an ETag it does not have: both
        must be refused (412). A store that takes them for plain PUTs lands
        them. The object is deleted after: four requests in all."""
        probe = f"{self._prefix}{PROBE_FOLDER}probe-{uuid.uuid4().hex}"
        stale = f'"{content_etag(b"an ETag the probe object never has")}"'
        checks = [
            ({"IfNoneMatch": "*"}, "a PUT with If-None-Match: * over an object that exists landed"),
            ({"IfMatch": stale}, "a PUT with If-Match of an ETag the object does not have landed"),
        ]
        written = False  # nothing to delete unless it landed (a store that is down)
        try:
            with contextlib.suppress(PreconditionFailed):  # an unseen first try's: it is there
                await self._put_object(probe, "probe", b"probe", {"IfNoneMatch": "*"})
            written = True
            for cond, landed in checks:
                try:
                    await self._put_object(probe, "probe", b"must not land", cond)
                except PreconditionFailed:
                    continue
                return f"{CONDITIONS_IGNORED} ({landed})"
            return None
        finally:
            if written:
                with contextlib.suppress(StoreError):  # a probe left behind is a few bytes
                    await self._delete_object(probe)

    async def _put(self, key: str, data: bytes, cond: dict[str, str]) -> str:
        return await self._put_object(self._key(key), key, data, cond)

    async def _put_object(self, name: str, key: str, data: bytes, cond: dict[str, str]) -> str:
        """PUT `data` as the object `name` (the prefix and `key`)."""

        async def op(client: Any) -> str:
            resp = await client.put_object(
                Bucket=self.settings.bucket, Key=name, Body=bytes(data), **cond
            )
            return self._etag_of(resp)

        try:
            return await self._call(op, conditional=bool(cond))
        except ClientError as exc:
            if cond and is_lost_race(exc, "IfMatch" in cond):
                raise PreconditionFailed(f"{key}: {_code(exc) or _status(exc)}") from None
            raise self._unexpected(exc) from exc

    async def delete(self, key: str) -> None:
        await self._delete_object(self._key(key))

    async def _delete_object(self, name: str) -> None:
        async def op(client: Any) -> None:
            await client.delete_object(Bucket=self.settings.bucket, Key=name)

        try:
            await self._call(op)
        except ClientError as exc:
            raise self._unexpected(exc) from exc

    async def list(self, prefix: str = "") -> list[str]:
        return await self._list(prefix, {})

    async def list_top(self, prefix: str) -> builtins.list[str]:
        # Keys under a "/" after the prefix come back as CommonPrefixes, one each.
        return await self._list(prefix, {"Delimiter": "/"})

    async def list_folders(self, prefix: str) -> builtins.list[str]:
        return await self._list(prefix, {"Delimiter": "/"}, "CommonPrefixes", "Prefix")

    async def _list(
        self,
        prefix: str,
        options: dict[str, str],
        field: str = "Contents",
        name: str = "Key",
    ) -> builtins.list[str]:
        """A listing, a page (1,000 keys) a request, each request with its own
        deadline and retries: a listing of 200 pages at 75 ms each passed the
        one deadline a single request gets, and failed however fast its pages
        came. What each page lists under `field`, each entry's `name`: its
        objects' keys, or (with a delimiter) its common prefixes."""
        keys: list[str] = []
        tokens: set[str] = set()  # each page's, sent for the next one
        request: dict[str, Any] = {
            "Bucket": self.settings.bucket,
            "Prefix": self._prefix + prefix,
            "MaxKeys": self.settings.list_page_keys,
            **options,
        }
        while True:

            async def op(client: Any, request: dict[str, Any] = request) -> Any:
                return await client.list_objects_v2(**request)

            try:
                page = await self._call(op)
            except ClientError as exc:
                raise self._unexpected(exc) from exc
            keys.extend(o[name][len(self._prefix) :] for o in page.get(field, []))
            if not page.get("IsTruncated"):
                return sorted(keys)
            # A store that ignores the token answers the same page again, its
            # token too: a listing that would never end, a page more held at
            # each request. A token marks a place in the listing, and the
            # listing only moves on, so one sent before means no progress.
            token = page.get("NextContinuationToken")
            if not token:
                raise StoreUnavailable(
                    f"{self.url}: a listing page said there was more and gave no "
                    f"NextContinuationToken to ask for it"
                )
            if token in tokens:
                raise StoreUnavailable(
                    f"{self.url}: a listing does not move on: its page {len(tokens) + 1} "
                    f"gave the continuation token an earlier page gave"
                )
            tokens.add(token)
            request = {**request, "ContinuationToken": token}

    async def create_bucket(self) -> None:
        """Create the bucket if it does not exist (for LocalStack, MinIO and tests),
        in the client's region. One another broker created meanwhile (or this
        call's earlier try, its answer lost) is there: that is success."""

        async def op(client: Any) -> None:
            try:
                await client.head_bucket(Bucket=self.settings.bucket)
            except ClientError as exc:
                if _status(exc) != 404:
                    raise
                # Every region but us-east-1 refuses a bucket without its name
                # (IllegalLocationConstraintException), and us-east-1 one with it.
                region = client.meta.region_name
                where = (
                    {"CreateBucketConfiguration": {"LocationConstraint": region}}
                    if region and region != "us-east-1"
                    else {}
                )
                try:
                    await client.create_bucket(Bucket=self.settings.bucket, **where)
                except ClientError as created:
                    if _code(created) != "BucketAlreadyOwnedByYou":
                        raise

        try:
            await self._call(op)
        except ClientError as exc:
            raise self._unexpected(exc) from exc

    def _etag_of(self, answer: Mapping[str, Any]) -> str:
        """The ETag of a GET's or PUT's answer; one without it (a proxy that
        drops headers, a store that does not send it) is a StoreUnavailable,
        not a KeyError that callers catching store errors do not expect."""
        etag = answer.get("ETag")
        if not isinstance(etag, str) or not etag:
            raise StoreUnavailable(f"{self.url}: an answer without an ETag")
        return etag

    def _unexpected(self, exc: ClientError) -> StoreRefused:
        # An answer that was not retried (not a 5xx but 501, nor throttling, nor
        # a request's bytes damaged on the way, nor an expired token): access
        # denied, no such bucket, a wrong region, and the like. Retrying will
        # not help, and the broker cannot serve until an operator fixes it.
        if _code(exc) == "RequestTimeTooSkewed":
            return StoreRefused(
                f"{self.url}: S3 refuses requests from this machine because its clock "
                f"is more than 15 minutes off S3's (RequestTimeTooSkewed): set the "
                f"clock right (NTP) and the broker recovers by itself"
            )
        if _code(exc) == "NoSuchBucket":  # not one that appears by itself
            return StoreUnusable(f"{self.url}: {_code(exc)} ({_status(exc)}): {exc}")
        return StoreRefused(f"{self.url}: {_code(exc)} ({_status(exc)}): {exc}")

    async def _drop(self, client: Any) -> None:
        """Close `client`, if it is still this handle's, so that the next
        request opens another. Calls still in flight on it lose nothing: it
        has no credentials, and botocore refuses to sign, so none of them was
        sent or ever can be; they fail as this one did."""
        if client is self._client:  # not another call's new one
            await self._let_go()

    async def _let_go(self) -> None:
        """Close the client, if one is open: the next request opens another."""
        opened, self._opened, self._client = self._opened, None, None
        if opened is not None:
            await opened.aclose()

    async def close(self) -> None:
        self._closed = True
        await self._let_go()
