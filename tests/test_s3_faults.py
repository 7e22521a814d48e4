"""The s3 backend when S3 misbehaves: outages, hangs, throttling, lost races.

Outages and hangs use real sockets on 127.0.0.1. The error codes LocalStack never
sends (409 ConditionalRequestConflict, SlowDown) are covered at unit level by a
client stand-in that raises what botocore would raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from botocore.exceptions import (
    ClientError,
    CredentialRetrievalError,
    NoCredentialsError,
    SSOTokenLoadError,
    TokenRetrievalError,
    UnauthorizedSSOTokenError,
)

from simplequeue.errors import AmbiguousWrite, PreconditionFailed, StoreRefused, StoreUnavailable
from simplequeue.objstore.s3 import S3Settings, S3Store
from tests.helpers.fake_s3 import FakeS3
from tests.helpers.refused_start import refused_at_start
from tests.helpers.until import until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quick(endpoint: str) -> S3Settings:
    return S3Settings(
        bucket="b",
        endpoint_url=endpoint,
        region="us-east-1",
        connect_timeout=0.5,
        read_timeout=0.5,
        max_attempts=4,
        retry_budget=5.0,
    )


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")


async def test_nobody_listening_gives_store_unavailable_after_bounded_retries() -> None:
    store = S3Store(quick(f"http://127.0.0.1:{free_port()}"))
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.put_if("k", b"v", if_none_match=True), 30)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.get("k"), 30)
    finally:
        await store.close()


@pytest.mark.parametrize("endpoint", ["localhost:9000", ""], ids=["no-scheme", "empty"])
async def test_a_malformed_endpoint_url_is_a_store_error(endpoint: str) -> None:
    """An endpoint botocore does not take (no scheme, or empty): its
    ValueError("Invalid endpoint") came out of every store call as it was,
    against the store's contract (store errors only; review of s3, round 23)."""
    store = S3Store(S3Settings(bucket="b", endpoint_url=endpoint, region="us-east-1"))
    try:
        with pytest.raises(StoreRefused, match="endpoint"):
            await store.get("k")
    finally:
        await store.close()


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """A server that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    for w in held:
        w.close()
    server.close()
    await server.wait_closed()


async def test_server_that_never_answers_gives_store_unavailable_not_a_hang(
    silent_server: str,
) -> None:
    store = S3Store(quick(silent_server))
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.get("k"), 30)
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("answer_after", "budget"),
    [(0.7, 1.0), (5.0, 1.5)],
    ids=["a-retry-started-inside-it", "one-slow-try"],
)
async def test_retries_stop_within_the_retry_budget(answer_after: float, budget: float) -> None:
    """README: transient failures are retried "up to 6 attempts within 20 s".
    The stop (tenacity's stop_after_delay) was checked only after a try
    ended, and a try ran to its own deadline (connect + read timeout + 2 s):
    503s that took 0.7 s each against a 1 s budget failed after 1.5 s (a
    second try began at 0.7 s), an answer that took 5 s after 5 s; with the
    defaults, S3 answering 503 after 9 s failed after 27 s, not 20 (review
    of s3, round 23)."""
    release = asyncio.Event()

    async def slow_down(request: web.Request) -> web.Response:
        await request.read()
        with contextlib.suppress(TimeoutError):  # a slow answer, as S3 under load gives
            await asyncio.wait_for(release.wait(), answer_after)
        body = "<Error><Code>SlowDown</Code><Message>slow</Message></Error>"
        return web.Response(status=503, text=body, content_type="application/xml")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", slow_down)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    store = S3Store(
        S3Settings(
            bucket="b",
            endpoint_url=f"http://127.0.0.1:{port}",
            region="us-east-1",
            retry_budget=budget,
        )
    )
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get("k")
        took = time.monotonic() - started
        assert took < budget + 0.2, f"gave up after {took:.2f} s, past its {budget} s budget"
    finally:
        release.set()  # the answer a try gave up on goes, and the server can stop
        await store.close()
        await runner.cleanup()


async def test_a_put_carries_no_checksum_an_s3_compatible_store_may_refuse() -> None:
    """botocore 1.36 and later add a CRC32 to every PutObject (a header, or
    over https an aws-chunked trailer), which S3-compatible stores that
    predate it refuse, XAmzContentSHA256Mismatch and the like (review of s3,
    round 23): a PUT sends a checksum only where its operation requires one."""
    from botocore.config import Config

    if "request_checksum_calculation" not in Config.OPTION_DEFAULTS:
        pytest.skip("botocore before 1.36 adds no checksum")
    headers: list[dict[str, str]] = []

    async def put(request: web.Request) -> web.Response:
        await request.read()
        headers.append(dict(request.headers))
        return web.Response(headers={"ETag": '"e"'})

    app = web.Application()
    app.router.add_route("PUT", "/{path:.*}", put)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    store = S3Store(quick(f"http://127.0.0.1:{runner.addresses[0][1]}"))
    store._conditions_checked = True  # this stand-in lands every PUT: no probe
    try:
        assert await store.put_if("k", b"v", if_none_match=True) == '"e"'
        sent = {name.lower() for name in headers[0]}
        assert not {name for name in sent if name.startswith("x-amz-checksum")}, sent
        assert "x-amz-trailer" not in sent
    finally:
        await store.close()
        await runner.cleanup()


# --- a burst queued for the pool's connections ---------------------------------------------


def pooled(endpoint: str, **overrides: Any) -> S3Settings:
    """One connection, and tries of 2.4 s (connect + read timeout + 2 s)."""
    settings = {"connect_timeout": 0.1, "read_timeout": 0.3, "max_connections": 1, **overrides}
    return dataclasses.replace(quick(endpoint), **settings)


async def test_requests_queued_for_a_pooled_connection_do_not_fail_a_healthy_store() -> None:
    """Each try's deadline (connect + read timeout + 2 s) started before
    aiohttp handed it one of the pool's `max_connections`: a burst over a
    healthy store spent its tries queued and failed StoreUnavailable, never
    sent (review of s3, round 29: 2 connections, answers in 0.1 s, 120 GETs
    at once: 64 failed, the store saw 64 requests). A try's deadline starts
    once it holds a connection; the queue counts against the call's budget
    only. Here 40 GETs, one try each, 0.1 s apiece through one connection:
    4 s of queue, past a try's 3.1 s, within the 12 s budget. A read timeout
    of 1 s, not 0.3: the fake store answers from this process, and a pause of
    it (0.2 s on a loaded machine) read as a timeout of the 0.1 s answer."""
    async with FakeS3(delay=0.1).running() as fake:
        fake.objects["b/k"] = b"v"
        settings = pooled(fake.url, read_timeout=1.0, max_attempts=1, retry_budget=12.0)
        store = S3Store(settings)
        try:
            outcomes = await asyncio.gather(
                *(store.get("k") for _ in range(40)), return_exceptions=True
            )
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            assert not failed, f"{len(failed)} of 40 GETs failed: {failed[0]!r}"
        finally:
            await store.close()


async def test_a_conditional_put_queued_past_its_budget_is_unsent_not_ambiguous() -> None:
    """A conditional PUT whose try ran out queued for a pooled connection was
    never sent, yet raised AmbiguousWrite: the committer read the head back
    (one more request into the same queue) for a write that cannot have
    landed (review of s3, round 29). It raises StoreUnavailable, unsent. Here
    it waits behind 30 GETs of 0.1 s through one connection, with a 2 s
    budget: it may leave the queue until 1 s is left, and does not."""
    async with FakeS3(delay=0.1).running() as fake:
        fake.objects["b/k"] = b"v"
        store = S3Store(pooled(fake.url, retry_budget=2.0))
        store._conditions_checked = True  # the probe's writes would queue first
        reads = [asyncio.create_task(store.get("k")) for _ in range(30)]
        await asyncio.sleep(0)  # the GETs take their places in the queue first
        try:
            with pytest.raises(StoreUnavailable, match="not sent") as caught:
                await store.put_if("new", b"v", if_none_match=True)
            assert not isinstance(caught.value, AmbiguousWrite)
            assert fake.puts == 0
        finally:
            await asyncio.gather(*reads, return_exceptions=True)
            await store.close()


def client_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


class ScriptedClient:
    """Stands in for the aiobotocore client: raises the scripted errors in turn,
    then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def put_object(self, **kwargs: Any) -> dict[str, str]:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return {"ETag": '"new"'}

    async def get_object(self, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return {"Body": _Body(), "ETag": '"new"'}


class _Body:
    async def __aenter__(self) -> _Body:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    async def read(self) -> bytes:
        return b"data"


def scripted(client: Any) -> S3Store:
    """A store whose client is `client`, its conditional writes taken as
    honoured (the probe's requests are not what these tests count)."""
    store = S3Store(quick("http://127.0.0.1:1"))
    store._client = client
    store._conditions_checked = True
    return store


async def test_a_lost_race_raises_precondition_failed_without_retry() -> None:
    client = ScriptedClient(client_error(412, "PreconditionFailed"))
    with pytest.raises(PreconditionFailed):
        await scripted(client).put_if("k", b"v", if_match='"old"')
    assert client.calls == 1


@pytest.mark.parametrize("condition", [{"if_none_match": True}, {"if_match": '"old"'}])
async def test_a_409_conditional_request_conflict_is_retried_not_a_lost_race(
    condition: dict[str, Any],
) -> None:
    """S3 answers 409 ConditionalRequestConflict when a conflicting operation
    ran at the same time: nothing was written, retry. It was taken for 412,
    "the condition did not hold", after one call (review of s3, round 27)."""
    client = ScriptedClient(client_error(409, "ConditionalRequestConflict"))
    assert await scripted(client).put_if("k", b"v", **condition) == '"new"'
    assert client.calls == 2


class _SegmentConflicts:
    """Stands in for the aiobotocore client: PUTs land in `objects`, except
    those of keys in `conflict`, answered 409 ConditionalRequestConflict
    without writing anything, `times` times each."""

    def __init__(self, conflict: set[str], times: int) -> None:
        self.left = dict.fromkeys(conflict, times)
        self.objects: dict[str, bytes] = {}

    async def put_object(self, *, Key: str, Body: bytes, **_: Any) -> dict[str, str]:
        if self.left.get(Key, 0) > 0:
            self.left[Key] -= 1
            raise client_error(409, "ConditionalRequestConflict")
        self.objects[Key] = Body
        return {"ETag": f'"{len(self.objects)}"'}


@pytest.mark.parametrize("times", [1, 10], ids=["once", "every-try"])
async def test_a_409_on_a_new_segment_never_lets_its_head_be_written_without_it(
    times: int,
) -> None:
    """put_if_after writes a batch's new segments with If-None-Match and takes
    PreconditionFailed for "an earlier try wrote it". A 409 on a segment was
    made PreconditionFailed, and the head naming the segment was written with
    the segment never written: 1 of 2 objects, a head whose segment is missing
    (CorruptData, the topic's jobs unreadable). The segment is now retried
    (both land), or, answered 409 on every try, the batch fails with
    StoreUnavailable and the head is not written."""
    segment, head = "topics/t/seg-p1-abc.json", "topics/t.json"
    client = _SegmentConflicts({segment}, times)
    store = scripted(client)
    if times == 1:
        await store.put_if_after({segment: b"segment"}, head, b"head", if_none_match=True)
        assert client.objects == {segment: b"segment", head: b"head"}
    else:
        with pytest.raises(StoreUnavailable) as caught:
            await store.put_if_after({segment: b"segment"}, head, b"head", if_none_match=True)
        assert not isinstance(caught.value, PreconditionFailed | StoreRefused)
        assert client.objects == {}


async def test_if_match_on_vanished_object_is_a_lost_race() -> None:
    client = ScriptedClient(client_error(404, "NoSuchKey"))
    with pytest.raises(PreconditionFailed):
        await scripted(client).put_if("k", b"v", if_match='"old"')


@pytest.mark.parametrize(
    ("status", "code"),
    [(503, "SlowDown"), (500, "InternalError"), (429, "TooManyRequests")],
)
async def test_transient_errors_are_retried_then_succeed(status: int, code: str) -> None:
    client = ScriptedClient(client_error(status, code), client_error(status, code))
    assert await scripted(client).put_if("k", b"v", if_none_match=True) == '"new"'
    assert client.calls == 3


async def test_transient_errors_past_the_bound_give_store_unavailable() -> None:
    client = ScriptedClient(*[client_error(503, "SlowDown") for _ in range(10)])
    with pytest.raises(StoreUnavailable):
        await scripted(client).put("k", b"v")
    assert client.calls == 4


@pytest.mark.parametrize(("status", "code"), [(500, "InternalError"), (504, "GatewayTimeout")])
async def test_a_conditional_put_answered_5xx_past_the_bound_is_ambiguous(
    status: int, code: str
) -> None:
    """A 500, or a gateway's 504 in front of an S3-compatible store, may have
    been applied, or be applied later: when every try failed so, the write
    was plain StoreUnavailable, which the committer takes for "did not land"
    once its read-back found the head unchanged (review of the stores, round
    32). A 503 SlowDown is S3 refusing: not ambiguous (the test below)."""
    client = ScriptedClient(*[client_error(status, code) for _ in range(10)])
    with pytest.raises(AmbiguousWrite, match="may have been applied"):
        await scripted(client).put_if("k", b"v", if_match='"old"')
    assert client.calls == 4


@pytest.mark.parametrize(
    ("refusal", "code"),
    [(403, "AccessDenied"), (403, "RequestTimeTooSkewed"), (400, "InvalidArgument")],
)
async def test_a_conditional_put_answered_500_then_refused_is_ambiguous(
    refusal: int, code: str
) -> None:
    """The test above, but a later try is refused (not retried: a 403 as
    credentials or the clock go wrong): plain StoreRefused, which the
    committer takes for "did not land" while the 500'd try may still land
    (review of this round's changes)."""
    client = ScriptedClient(client_error(500, "InternalError"), client_error(refusal, code))
    with pytest.raises(AmbiguousWrite, match="next try was refused"):
        await scripted(client).put_if("k", b"v", if_match='"old"')
    assert client.calls == 2


@pytest.mark.parametrize(
    "then",
    [NoCredentialsError(), CredentialRetrievalError(provider="process", error_msg="exited 1")],
    ids=lambda e: type(e).__name__,
)
async def test_a_conditional_put_answered_500_then_without_credentials_is_ambiguous(
    then: Exception,
) -> None:
    """As above, the next try refused by botocore before sending (temporary
    credentials expired and their refresh failed): it came out of _call's
    other branch as plain StoreRefused, "did not land", while the 500'd
    try may land yet (review of the store adapters, round 35)."""
    client = ScriptedClient(client_error(500, "InternalError"), then)
    with pytest.raises(AmbiguousWrite, match="may have been applied"):
        await scripted(client).put_if("k", b"v", if_match='"old"')
    assert client.calls == 2


async def test_a_conditional_put_answered_500_then_queued_past_its_budget_is_ambiguous() -> None:
    """As above, the next try never leaving the connection queue (every
    pooled connection busy, an incident that answers 500s slowly):
    _connection's StoreUnavailable "not sent" went up as it was, forgetting
    that the first try may have been applied (review of the store adapters,
    round 35)."""
    hogs: list[asyncio.Task[None]] = []

    class FirstAnswered500(ScriptedClient):
        async def put_object(self, **kwargs: Any) -> dict[str, str]:
            self.calls += 1
            if self.calls == 1:

                async def hog() -> None:  # another call takes the one connection
                    await store._connections.acquire()
                    await asyncio.sleep(30)

                hogs.append(asyncio.get_running_loop().create_task(hog()))
                raise client_error(500, "InternalError")
            return {"ETag": '"new"'}

    client = FirstAnswered500()
    settings = quick("http://127.0.0.1:1")
    store = S3Store(dataclasses.replace(settings, max_connections=1, retry_budget=3.0))
    store._client = client
    store._conditions_checked = True
    try:
        with pytest.raises(AmbiguousWrite, match="not sent"):
            await store.put_if("k", b"v", if_match='"old"')
        assert client.calls == 1
    finally:
        for hog in hogs:
            hog.cancel()


async def test_a_conditional_put_refused_503_past_the_bound_is_unavailable_not_ambiguous() -> None:
    client = ScriptedClient(*[client_error(503, "SlowDown") for _ in range(10)])
    with pytest.raises(StoreUnavailable) as caught:
        await scripted(client).put_if("k", b"v", if_match='"old"')
    assert not isinstance(caught.value, AmbiguousWrite)


async def test_permanent_errors_are_not_retried() -> None:
    client = ScriptedClient(client_error(403, "AccessDenied"))
    with pytest.raises(StoreUnavailable, match="AccessDenied"):
        await scripted(client).put("k", b"v")
    assert client.calls == 1


# --- conditional writes whose answer never came ------------------------------------------


async def test_a_conditional_put_without_an_answer_is_ambiguous_at_once_not_retried(
    silent_server: str,
) -> None:
    """It used to be retried for up to the whole retry budget (20 s by default)
    while other brokers wrote; the committer now reads back at once."""
    store = S3Store(quick(silent_server))
    store._conditions_checked = True  # the probe's write would be the one unanswered
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(AmbiguousWrite):
            await asyncio.wait_for(store.put_if("k", b"v", if_match='"old"'), 30)
        # One try's deadline (connect + read + 2 s = 3 s), not four tries.
        assert asyncio.get_running_loop().time() - started < 4.5
    finally:
        await store.close()


@pytest.mark.parametrize(
    "failure",
    [
        CredentialRetrievalError(provider="process", error_msg="exited 1"),
        TokenRetrievalError(provider="sso", error_msg="refresh failed"),
        SSOTokenLoadError(error_msg="no token"),
        UnauthorizedSSOTokenError(),
    ],
    ids=lambda failure: type(failure).__name__,
)
async def test_a_conditional_put_whose_credentials_could_not_be_had_is_refused(
    failure: Exception,
) -> None:
    """Credentials that cannot be had fail a request before it is sent. Only
    connection errors counted as unsent: a conditional PUT said AmbiguousWrite,
    and the committer read back for a write that never left (review of s3,
    round 23). They are refusals, as no credentials at all are."""
    client = ScriptedClient(failure)
    with pytest.raises(StoreRefused) as caught:
        await scripted(client).put_if("k", b"v", if_match='"old"')
    assert not isinstance(caught.value, AmbiguousWrite)
    assert client.calls == 1


async def test_a_read_timeout_on_a_conditional_put_is_not_retried() -> None:
    from botocore.exceptions import ReadTimeoutError

    client = ScriptedClient(ReadTimeoutError(endpoint_url="http://s3"))
    with pytest.raises(AmbiguousWrite):
        await scripted(client).put_if("k", b"v", if_match='"old"')
    assert client.calls == 1


async def test_a_conditional_put_that_could_not_connect_is_retried() -> None:
    from botocore.exceptions import EndpointConnectionError

    refused = ConnectionRefusedError(111, "Connect call failed")
    key = SimpleNamespace(host="s3", port=80, ssl=False)
    cause = aiohttp.ClientConnectorError(key, refused)  # type: ignore[arg-type]
    client = ScriptedClient(EndpointConnectionError(endpoint_url="http://s3", error=cause))
    assert await scripted(client).put_if("k", b"v", if_match='"old"') == '"new"'
    assert client.calls == 2


async def test_a_get_whose_body_failed_its_checksum_in_transit_is_retried() -> None:
    """A body damaged on the way (botocore's FlexibleChecksumError) was made a
    refusal, StoreRefused at once, when only connection errors were taken
    for transient (review of 0f3f2fe). Only configuration errors are not."""
    from botocore.exceptions import FlexibleChecksumError

    client = ScriptedClient(FlexibleChecksumError(error_msg="checksum mismatch"))
    assert await scripted(client).get("k") == (b"data", '"new"')
    assert client.calls == 2


@pytest.mark.parametrize(
    "code", ["IncompleteBody", "BadDigest", "XAmzContentSHA256Mismatch", "ExpiredToken"]
)
async def test_a_400_about_one_requests_bytes_or_an_expired_token_is_retried(code: str) -> None:
    """Answers about one request's bytes, or temporary credentials that the
    provider refreshes, were StoreRefused: the committer gave up on the batch
    at once (review of 0f3f2fe). S3 answered, so even a conditional PUT is
    safely sent again."""
    client = ScriptedClient(client_error(400, code))
    assert await scripted(client).put_if("k", b"v", if_match='"old"') == '"new"'
    assert client.calls == 2


@pytest.mark.parametrize(
    ("status", "code", "refused"),
    [
        (403, "AccessDenied", True),
        (404, "NoSuchBucket", True),
        (400, "AuthorizationHeaderMalformed", True),  # a wrong region
        (301, "PermanentRedirect", True),
        (400, "InvalidToken", True),
        (403, "ExpiredToken", False),  # retried (the provider refreshes), whatever its status
    ],
)
async def test_only_answers_that_would_repeat_are_refusals(
    status: int, code: str, refused: bool
) -> None:
    """Answers that are not retried are refusals (a wrong region too, which
    80db9e0 made an outage, retried by the committer for its whole budget:
    review); the ones a retry may fix are retried first."""
    client = ScriptedClient(*[client_error(status, code) for _ in range(10)])
    with pytest.raises(StoreUnavailable) as caught:
        await scripted(client).put("k", b"v")
    assert isinstance(caught.value, StoreRefused) is refused
    assert (client.calls == 1) is refused


async def test_a_conditional_put_whose_connection_was_reset_is_ambiguous_not_retried() -> None:
    """aiobotocore reports a connection reset after the request went out as
    EndpointConnectionError too, which was taken for "could not connect": the
    PUT was sent again, and a first try that had landed made it answer 412,
    "someone else won" (review finding). Only a failure to connect is unsent."""
    from botocore.exceptions import EndpointConnectionError

    reset = aiohttp.ClientOSError(104, "Connection reset by peer")
    client = ScriptedClient(EndpointConnectionError(endpoint_url="http://s3", error=reset))
    with pytest.raises(AmbiguousWrite):
        await scripted(client).put_if("k", b"v", if_match='"old"')
    assert client.calls == 1


async def test_a_skewed_clock_fails_at_once_with_a_message_that_says_so() -> None:
    client = ScriptedClient(*[client_error(403, "RequestTimeTooSkewed") for _ in range(5)])
    with pytest.raises(StoreUnavailable, match="clock"):
        await scripted(client).put("k", b"v")
    assert client.calls == 1


@pytest.mark.parametrize("status", [200, 404, 429, 503])
def test_only_answers_s3_itself_gave_set_the_store_clock(status: int) -> None:
    """A 5xx answer's Date is not sampled: a proxy or load balancer in front of
    S3 answers those with its own clock, and a burst of them (a request's
    retries, an outage) agrees with itself. Answers a day ahead, spread over
    more than CONFIRM_SPAN and CONFIRM_JUMP of them, move the clock only when
    S3 itself gave them (below 500). Nor is a 429's: a rate limiter in front
    of S3 answers it (S3 throttles with 503 SlowDown)."""
    from email.utils import formatdate

    from simplequeue.objstore.clock import CONFIRM_JUMP, CONFIRM_SPAN, StoreClock

    mono = [100.0]
    store = S3Store(quick("http://127.0.0.1:9"))
    # The hooks time each call on the clock's own local time.
    store.clock = StoreClock(monotonic=lambda: mono[0], wall=lambda: 0.0)
    offset = 1_700_000_000.0

    def answer(status: int, ahead: float) -> None:
        context: dict[str, Any] = {}
        store._call_sent(context)
        mono[0] += 0.01
        date = formatdate(mono[0] - 0.005 + offset + ahead, usegmt=True)
        headers = {"HTTPStatusCode": status, "HTTPHeaders": {"date": date}}
        store._call_answered(parsed={"ResponseMetadata": headers}, context=context)

    for _ in range(10):
        mono[0] += 1.0
        answer(200, 0.0)
    for _ in range(2 * CONFIRM_JUMP):
        mono[0] += CONFIRM_SPAN / CONFIRM_JUMP
        answer(status, 86_400.0)
    moved = store.now() - (mono[0] + offset) > 86_000.0
    assert moved is (status < 500 and status != 429)


@pytest.mark.parametrize("conditional", [False, True], ids=["get", "conditional-put"])
async def test_a_date_header_past_year_9999_fails_no_call(conditional: bool) -> None:
    """parsedate_to_datetime raises OverflowError for a year past what a C
    long holds, which date_of() did not catch; the hook that samples the
    clock runs inside the operation, so a GET that succeeded, and a
    conditional PUT that landed, both raised OverflowError (HTTP 500 at the
    edge; the committer never read the head back). The Date is not a sample:
    the call succeeds, the clock untouched (0 samples)."""
    async with FakeS3(date="Mon, 01 Jan 99999999999 00:00:00 GMT").running() as fake:
        fake.objects["b/k"] = b"v"
        store = S3Store(quick(fake.url))
        try:
            if conditional:
                assert await store.put_if("n", b"v", if_none_match=True) == fake.etag(b"v")
            else:
                assert (await store.get("k"))[0] == b"v"
            assert store.clock.samples == 0
        finally:
            await store.close()


async def test_a_store_whose_answers_carry_no_date_is_refused_not_guessed(
    start_broker: Any,
) -> None:
    """S3's sample_clock() did nothing, taking every answer to carry a Date:
    behind something that drops it, every call succeeded, no sample was ever
    taken (0 after 2 answers), and now() was this machine's wall clock with a
    clock_error of 0.0, on which the committer and the announcer wrote leases
    and heartbeats (the guess the docs say is never written). sample_clock()
    now asks once (a HEAD of the bucket) and, still without a sample, raises
    StoreRefused saying why; a broker refuses such a store at start."""
    async with FakeS3(date="").running() as fake:  # "": aiohttp's own Date left out too
        fake.objects["b/k"] = b"v"
        store = S3Store(quick(fake.url))
        try:
            assert (await store.get("k"))[0] == b"v"  # an answer stands, its time unknown
            with pytest.raises(StoreRefused, match="no Date header"):
                await store.sample_clock()
            assert store.clock.samples == 0
            with pytest.raises(StoreRefused, match="no Date header"):
                await start_broker(store)
        finally:
            await store.close()
    async with FakeS3().running() as fake:
        store = S3Store(quick(fake.url))
        try:
            await store.sample_clock()  # a handle that sent nothing yet asks
            assert store.clock.samples == 1
        finally:
            await store.close()


def test_a_clock_sample_that_fails_never_fails_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever taking a sample raises, the answer it came with stands: the
    sample is skipped."""
    store = S3Store(quick("http://127.0.0.1:9"))

    def broken(*_: object) -> None:
        raise RuntimeError("a clock that cannot take this sample")

    monkeypatch.setattr(store.clock, "observe", broken)
    context: dict[str, Any] = {}
    store._call_sent(context)
    headers = {"HTTPStatusCode": 200, "HTTPHeaders": {"date": "Wed, 02 Dec 2026 11:58:24 GMT"}}
    store._call_answered(parsed={"ResponseMetadata": headers}, context=context)
    store._call_answered(parsed={"ResponseMetadata": headers}, context=context)
    assert store.clock.samples == 0


async def test_close_while_the_client_opens_leaves_no_client_and_sends_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """close() sets _closed and closes what the store opened, but an
    operation opening the client at that moment (its first request, waiting
    for credentials: a credential_process, as an SSO or metadata-service
    fetch may) entered the client after close() and sent its request: 1 PUT
    landed after close() (a broker's shutdown counts on nothing being written
    after it), and the client's aiohttp session was never closed. Now the
    client is closed as soon as it opens, and 0 requests are sent."""
    gate = tmp_path / "gate"
    script = tmp_path / "creds.sh"
    script.write_text(  # credentials come once the test opens the gate
        f"#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.01; done\n"
        'echo \'{"Version": 1, "AccessKeyId": "test", "SecretAccessKey": "test"}\'\n'
    )
    script.chmod(0o755)
    config = tmp_path / "config"
    config.write_text(f"[default]\ncredential_process = {script}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    async with FakeS3().running() as fake:
        store = S3Store(quick(fake.url))
        write = asyncio.create_task(store.put("k", b"late"))
        other = asyncio.create_task(store.get("k"))  # waits for the same opening
        try:
            await until(lambda: store._opening.locked() or write.done())
            assert store._opening.locked(), "the write never waited while opening its client"
            await store.close()
        finally:
            gate.touch()  # the credential_process ends, whatever happened
        for call in (write, other):
            with pytest.raises(StoreUnavailable, match="closed"):
                await call
        assert store._client is None, "a client was opened after close() and is never closed"
        assert fake.objects == {}, "a write was sent after close()"


async def test_credentials_that_turn_up_after_a_refusal_are_used_by_the_next_request(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """README: credentials that cannot be had raise StoreRefused at once, "the
    next request tries again". A handle whose first requests found none (a
    credentials file a sidecar writes, not there yet; the metadata service
    down at boot) kept the client it opened then, made without credentials,
    and refused every later request "Unable to locate credentials" for good
    (review of s3, round 29). A refusal for want of credentials drops that
    client: the next request, with the file written, lands."""
    credentials = tmp_path / "credentials"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no traffic off 127.0.0.1
    async with FakeS3().running() as fake:
        store = S3Store(quick(fake.url))
        try:
            # Two at once, on the one client: each refused, neither cut by the other's drop.
            refused = await asyncio.gather(
                store.put("k", b"v"), store.get("k"), return_exceptions=True
            )
            for failure in refused:
                assert isinstance(failure, StoreRefused), failure
                assert "credentials" in str(failure)
            credentials.write_text(
                "[default]\naws_access_key_id = test\naws_secret_access_key = test\n"
            )
            await store.put("k", b"v")
            assert fake.objects == {"b/k": b"v"}
        finally:
            await store.close()


# --- a store that takes conditional writes for plain ones ----------------------------------


async def test_a_store_that_ignores_conditional_headers_is_refused_before_writing() -> None:
    """S3-compatible stores that predate conditional writes take a PUT with
    If-None-Match or If-Match for a plain PUT (MinIO before mid-2024,
    minio/minio#19681). The s3 backend never checked: a create-only write
    over an object that exists, and an If-Match write with a stale ETag,
    both landed and answered success (broker B's head replaced broker A's:
    every write wins, jobs lost without an error). A probe of the handle's
    own, before its first conditional write, now finds it out: StoreRefused,
    saying why, nothing written and the probe's object deleted; asked once."""
    async with FakeS3(honour_conditions=False).running() as fake:
        store = S3Store(quick(fake.url))
        try:
            with pytest.raises(StoreRefused, match="does not honour conditional writes"):
                await store.put_if("topics/t.json", b"broker A", if_none_match=True)
            assert fake.objects == {}, "a write went out, or the probe was left behind"
            probed = fake.puts
            with pytest.raises(StoreRefused, match="If-None-Match/If-Match"):
                await store.put_if("topics/t.json", b"broker B", if_match='"stale"')
            assert fake.puts == probed, "the store was probed again"
            # Plain writes and reads are not refused: nothing of them relies on it.
            await store.put("k", b"v")
            assert await store.get("k") == (b"v", fake.etag(b"v"))
        finally:
            await store.close()


async def test_a_store_that_honours_conditional_headers_is_probed_once_and_left_clean() -> None:
    """The probe costs one handle 3 PUTs and a DELETE, once, and leaves
    nothing; a handle that only reads or writes plainly (a client's
    discovery) sends none."""
    async with FakeS3().running() as fake:
        reader = S3Store(quick(fake.url))
        store = S3Store(quick(fake.url))
        try:
            await reader.put("k", b"v")
            await reader.get("k")
            assert fake.puts == 1
            await store.put_if("topics/t.json", b"A", if_none_match=True)
            assert fake.puts == 3  # the probe's one that lands, and the write
            with pytest.raises(PreconditionFailed):
                await store.put_if("topics/t.json", b"B", if_none_match=True)
            assert fake.puts == 3
            assert sorted(fake.objects) == ["b/k", "b/topics/t.json"]
            assert not any(".simplequeue/" in k for k in fake.objects)
        finally:
            await reader.close()
            await store.close()


async def test_simplequeued_exits_on_a_store_that_ignores_conditional_headers() -> None:
    """A broker refuses such a store at start, before listening: exit 1 and
    the reason, not a broker that serves and loses jobs."""
    async with FakeS3(honour_conditions=False).running() as fake:
        _, err = await refused_at_start("b", fake.url)
        assert b"does not honour conditional writes (If-None-Match/If-Match)" in err, err
        assert fake.objects == {}


async def test_simplequeued_on_a_bucket_name_botocore_refuses_exits_at_start() -> None:
    """`--bucket bad/name`, a name botocore never sends (ParamValidationError,
    before any request): every call was StoreRefused, "may clear up", and
    simplequeued listened and answered 503 to everything for ever, writing a
    traceback a second (36 KB in 25 s), where a bucket that does not exist
    exits 1 at start (review of the store adapters, round 35)."""
    async with FakeS3().running() as fake:
        _, err = await refused_at_start("bad/name", fake.url)
    assert b"Invalid bucket name" in err, err
    assert fake.objects == {}


@pytest.mark.parametrize("token", ["t1", None], ids=["token-ignored", "no-token"])
async def test_a_listing_that_cannot_move_on_is_a_store_error(token: str | None) -> None:
    """A store that ignores ContinuationToken answers the first page again,
    its token too: list() asked for ever, the same keys appended at each
    page (3 keys at 1 a page: 1,224 requests in 10 s, memory growing). A
    page that says IsTruncated without a NextContinuationToken (an
    S3-compatible store answering V2 as V1) raised KeyError, no store error,
    out of the sweep and the listing of topics (review of s3, round 29).
    Both are StoreUnavailable, saying why, after 2 requests and 1."""
    requests = 0

    async def first_page(request: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        more = f"<NextContinuationToken>{token}</NextContinuationToken>" if token else ""
        body = (
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            "<Name>b</Name><Prefix>topics/</Prefix><KeyCount>1</KeyCount><MaxKeys>1</MaxKeys>"
            f"<IsTruncated>true</IsTruncated>{more}"
            "<Contents><Key>topics/a.json</Key><Size>2</Size></Contents></ListBucketResult>"
        )
        return web.Response(text=body, content_type="application/xml")

    app = web.Application()
    app.router.add_get("/b", first_page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    store = S3Store(quick(f"http://127.0.0.1:{runner.addresses[0][1]}"))
    try:
        words = "does not move on" if token else "no NextContinuationToken"
        with pytest.raises(StoreUnavailable, match=words):
            await asyncio.wait_for(store.list("topics/"), 5)
        assert requests == (2 if token else 1)
    finally:
        await store.close()
        await runner.cleanup()


@pytest.mark.parametrize("moto", [False, True], ids=["localstack", "moto"])
async def test_a_listing_of_many_pages_each_answered_in_time_completes(moto: bool) -> None:
    """A listing ran every page in one request's try, under one deadline
    (connect + read timeout + 2 s): 200 pages at 75 ms (100,000 topics on AWS)
    failed however fast each page came, and so did every take-over. Each page
    is a request of its own now: 12 pages at 0.3 s, past one try's 3 s."""
    from tests.conftest import MOTO_BUCKET, RUN_BUCKET, moto_endpoint, open_s3, s3_endpoint
    from tests.helpers.fault_proxy import FaultProxy

    writer = await open_s3(moto=moto)
    assert isinstance(writer, S3Store)
    try:
        names = [f"topics/t{i:02d}.json" for i in range(48)]
        for name in [*names, "topics/t00/seg-p1-x.json"]:
            await writer.put(name, b"{}")
        upstream = moto_endpoint() if moto else s3_endpoint()
        async with FaultProxy(upstream).running() as proxy:
            proxy.delay = 0.3
            reader = S3Store(
                S3Settings(
                    bucket=MOTO_BUCKET if moto else RUN_BUCKET,
                    prefix=writer.settings.prefix,
                    endpoint_url=proxy.url,
                    region="us-east-1",
                    connect_timeout=0.5,
                    read_timeout=0.5,
                    max_attempts=2,
                    list_page_keys=4,
                )
            )
            try:
                assert await reader.list_top("topics/") == names
            finally:
                await reader.close()
        assert sum(n for path, n in proxy.requests.items()) >= 12
    finally:
        await writer.close()
