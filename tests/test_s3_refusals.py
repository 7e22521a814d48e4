"""The s3 backend's answers that are not races: a refusal, a reset after the
request went out, a wrong first Date, close() mid-retry, an answer without an
ETag (review findings, round 21). Against real LocalStack and moto, through a
proxy on 127.0.0.1 that passes S3's answers on, headers and all, or answers
what S3 (or something in front of it) would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from simplequeue.api import JobSpec
from simplequeue.broker.engine import Engine
from simplequeue.errors import (
    AmbiguousWrite,
    Contended,
    StoreRefused,
    StoreUnavailable,
)
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore.s3 import S3Settings, S3Store
from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.refused_start import refused_at_start


def s3_error(status: int, code: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{code}</Message>"
        "<RequestId>review</RequestId></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


class S3FaultProxy(FaultProxy):
    """FaultProxy, plus faults keyed on the method as well as the path:
    `refuse[(method, suffix)] = (status, code)` answers every such request with
    S3's XML error, never forwarding it."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.refuse: dict[tuple[str, str], tuple[int, str]] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        for (method, suffix), (status, code) in self.refuse.items():
            if request.method == method and request.path.endswith(suffix):
                self.requests[request.path] += 1
                return s3_error(status, code)
        fault = self._fault(request.path)
        self.requests[request.path] += 1
        self.arrived.set()
        if fault is not None:
            assert fault.isdigit(), fault  # only the status pages are used here
            return s3_error(int(fault), "ServiceUnavailable")
        return await self._forward(request)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        """Pass the request on and S3's answer back, headers (ETag, Date) and all:
        FaultProxy keeps only the status and the body."""
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            data=await request.read(),
            headers=headers,
            auto_decompress=False,
        ) as upstream:
            data = await upstream.read()
            status = upstream.status
            kept = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
        return web.Response(status=status, body=data, headers=kept)


def endpoint(moto: bool) -> tuple[str, str]:
    from tests.conftest import MOTO_BUCKET, RUN_BUCKET, moto_endpoint, s3_endpoint

    return (moto_endpoint(), MOTO_BUCKET) if moto else (s3_endpoint(), RUN_BUCKET)


@asynccontextmanager
async def through_proxy(
    moto: bool, **overrides: Any
) -> AsyncIterator[tuple[S3FaultProxy, S3Store, S3Store]]:
    """(proxy, a store through it, a direct store on the same bucket and prefix)."""
    from tests.conftest import open_s3

    direct = await open_s3(moto=moto)
    assert isinstance(direct, S3Store)
    upstream, bucket = endpoint(moto)
    async with S3FaultProxy(upstream).running() as proxy:
        settings = {
            "bucket": bucket,
            "prefix": direct.settings.prefix,
            "endpoint_url": proxy.url,
            "region": "us-east-1",
            "connect_timeout": 1.0,
            "read_timeout": 2.0,
            "max_attempts": 3,
            "retry_budget": 5.0,
            **overrides,
        }
        store = S3Store(S3Settings(**settings))
        try:
            yield proxy, store, direct
        finally:
            await store.close()
            await direct.close()


BACKENDS = pytest.mark.parametrize("moto", [False, True], ids=["localstack", "moto"])


# --- If-Match PUT into a bucket that does not exist -------------------------------------


@BACKENDS
async def test_an_if_match_put_into_a_missing_bucket_is_not_a_lost_race(moto: bool) -> None:
    """Any 404 on an If-Match PUT was "the object we matched is gone",
    NoSuchBucket included: a wrong or deleted bucket read as a lost race."""
    upstream, _ = endpoint(moto)
    store = S3Store(
        S3Settings(
            bucket=f"sq-missing-{uuid.uuid4().hex[:12]}",
            endpoint_url=upstream,
            region="us-east-1",
            max_attempts=2,
        )
    )
    try:
        with pytest.raises(StoreUnavailable, match="NoSuchBucket"):
            await store.get("k")  # what a read says: clear
        with pytest.raises(StoreUnavailable, match="NoSuchBucket"):
            await store.put_if("k", b"v", if_match='"0123456789abcdef0123456789abcdef"')
    finally:
        await store.close()


async def test_simplequeued_on_a_bucket_that_does_not_exist_exits_at_start() -> None:
    """The broker's start-up check took StoreRefused (a StoreUnavailable) for
    "the store does not answer now": on a bucket that does not exist (a
    typo, no --create-bucket) it logged
    a warning, listened, and answered 503 to every request for ever. It
    exits 1 with the store's reason before listening now, as it does for a
    store that ignores conditional writes (StoreUnusable)."""
    from tests.conftest import s3_endpoint

    _, err = await refused_at_start(f"sq-missing-{uuid.uuid4().hex[:12]}", s3_endpoint())
    assert b"NoSuchBucket" in err, err


async def test_a_broker_started_while_s3_refuses_its_clock_serves_once_it_is_set(
    start_broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal that may clear up by itself does not stop the broker at
    start: S3 refuses requests signed by a clock more than 15 minutes off
    (403 RequestTimeTooSkewed), as on a host whose clock NTP sets a few
    seconds after boot, and the store says "the broker recovers by itself".
    The start-up check took every refusal for a store an operator must fix
    (review of this round's change): the broker did not start, though the
    store took its requests a moment later (here: after three refusals).
    It starts, and serves once they are taken; so too for AccessDenied while
    a policy propagates, or no credentials yet."""
    from tests.helpers.fake_s3 import FakeS3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")

    class SkewedAtFirst(FakeS3):
        def __init__(self, refusals: int) -> None:
            super().__init__()
            self.refusals = refusals

        async def handle(self, request: web.Request) -> web.StreamResponse:
            if self.refusals > 0:
                self.refusals -= 1
                return self.error(403, "RequestTimeTooSkewed")
            return await super().handle(request)

    async with SkewedAtFirst(refusals=3).running() as fake:
        settings = S3Settings(
            bucket="b", endpoint_url=fake.url, region="us-east-1", retry_budget=5.0
        )
        store = S3Store(settings)
        try:
            broker = await start_broker(store)
            url = f"{broker.url}/topics/t/enqueue"
            async with aiohttp.ClientSession() as http, http.post(url, json={"payload": 1}) as r:
                assert r.status == 201, await r.text()
        finally:
            await store.close()


# --- no credentials: a conditional write called "ambiguous" --------------------------


def _store_without_credentials(
    monkeypatch: pytest.MonkeyPatch, config: Any, tmp_path: Any
) -> S3Store:
    """A store on a port nobody listens on, whose credentials come from AWS
    config file `config` only (none in the environment or elsewhere)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no traffic off 127.0.0.1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return S3Store(
        S3Settings(bucket="b", endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1")
    )


async def test_a_conditional_put_without_credentials_is_not_called_ambiguous(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """With no credentials botocore refuses before sending anything
    (NoCredentialsError). Every BotoCoreError counted as transient: a
    conditional PUT raised AmbiguousWrite "no answer to a conditional write",
    and the committer read back for its whole budget, never saying that the
    credentials were missing."""
    store = _store_without_credentials(monkeypatch, tmp_path / "none", tmp_path)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.put_if("k", b"v", if_match='"x"')
        assert isinstance(caught.value, StoreRefused), caught.value
        assert "credentials" in str(caught.value).lower()
    finally:
        await store.close()


async def test_a_conditional_put_whose_credential_process_fails_is_refused_not_ambiguous(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """A credential provider that fails (credential_process exits 1, an SSO
    session that expired) fails the call before any byte is sent: botocore's
    CredentialRetrievalError. Only connection errors counted as unsent, so a
    conditional PUT said AmbiguousWrite, and the committer read back, failed
    the same way and answered "it may or may not have landed" for a write
    that never left (review of s3, round 23)."""
    config = tmp_path / "config"
    config.write_text("[default]\ncredential_process = /bin/false\n")
    store = _store_without_credentials(monkeypatch, config, tmp_path)
    try:
        with pytest.raises(StoreRefused, match="retrieving credentials") as caught:
            await store.put_if("k", b"v", if_match='"x"')
        assert not isinstance(caught.value, AmbiguousWrite), caught.value
    finally:
        await store.close()


# --- a permanent refusal of the head's PUT reported as contention ---------------------


@BACKENDS
@pytest.mark.parametrize(
    ("status", "code"), [(403, "AccessDenied"), (501, "NotImplemented")], ids=["403", "501"]
)
async def test_a_refused_head_write_says_why_and_does_not_spin_for_the_budget(
    moto: bool, status: int, code: str
) -> None:
    """Credentials that may read but not write (403 AccessDenied), or an
    S3-compatible store without conditional writes (501 NotImplemented): the
    committer read the head back, found its write absent, took it for a lost
    race and tried again for its whole budget, then answered Contended "lost
    N races". The store's refusal (StoreRefused) is answered at once now."""
    async with through_proxy(moto) as (proxy, store, _):
        proxy.refuse[("PUT", "/topics/t.json")] = (status, code)
        engine = Engine(
            GroupCommitter(store, broker_id="b1", epoch=1, settings=CommitSettings(budget=3.0))
        )
        started = time.monotonic()
        with pytest.raises((Contended, StoreRefused)) as caught:
            await engine.enqueue("t", [JobSpec(1)])
        took = time.monotonic() - started
        put_tries = proxy.requests[
            f"/{store.settings.bucket}/{store.settings.prefix}/topics/t.json"
        ]
        assert not isinstance(caught.value, Contended), (
            f"{caught.value!r} after {took:.1f} s and {put_tries} PUTs"
        )
        assert code in str(caught.value)


# --- close() while an operation runs -------------------------------------------------


@BACKENDS
async def test_close_while_a_read_is_retrying_leaves_no_client_open(moto: bool) -> None:
    """An operation retrying after close() opened a new client on the closed
    store, which nothing closed (a connection pool leaked at a shutdown that
    met a retry). It fails StoreUnavailable now."""
    async with through_proxy(moto, max_attempts=6, retry_budget=10.0) as (proxy, store, direct):
        await direct.put("k", b"v")
        await store.get("k")  # the client is open
        proxy.fail("/k", "503", "503", "503")
        proxy.arrived.clear()
        read = asyncio.create_task(store.get("k"))
        await proxy.arrived.wait()  # its first try was answered 503: it retries
        await store.close()
        with contextlib.suppress(StoreUnavailable):  # failing is fine; reopening is not
            await read
        assert store._client is None, "a client was opened after close() and is never closed"


# --- an answer without an ETag: a foreign exception out of the store ------------------


@BACKENDS
async def test_an_answer_without_an_etag_raises_a_store_error(moto: bool) -> None:
    """An answer without an ETag header (a proxy that drops headers, as the
    suite's FaultProxy does) raised KeyError('ETag'), no store error: callers
    that catch store errors alone (the broker.json announcer) died of it."""
    from tests.conftest import open_s3

    direct = await open_s3(moto=moto)
    assert isinstance(direct, S3Store)
    upstream, bucket = endpoint(moto)
    async with FaultProxy(upstream).running() as proxy:  # forwards status and body only
        store = S3Store(
            S3Settings(
                bucket=bucket,
                prefix=direct.settings.prefix,
                endpoint_url=proxy.url,
                region="us-east-1",
                max_attempts=2,
            )
        )
        try:
            await direct.put("broker.json", b"{}")
            with pytest.raises(StoreUnavailable):
                await store.get("broker.json")
        finally:
            await store.close()
            await direct.close()


# --- --create-bucket outside us-east-1 ------------------------------------------------


@BACKENDS
async def test_create_bucket_works_outside_us_east_1_and_when_another_broker_won(
    moto: bool,
) -> None:
    """`simplequeued --region eu-west-1 --create-bucket`: CreateBucket went
    without a LocationConstraint, which every region but us-east-1 refuses
    (IllegalLocationConstraintException), so the flag worked in us-east-1
    alone (review of s3, round 23). A bucket that another broker starting at
    the same time created after this one looked (BucketAlreadyOwnedByYou) is
    there as well."""
    upstream, _ = endpoint(moto)
    settings = S3Settings(
        bucket=f"sq-eu-{uuid.uuid4().hex[:12]}",
        endpoint_url=upstream,
        region="eu-west-1",
        max_attempts=2,
    )
    store = S3Store(settings)
    try:
        await store.create_bucket()
        etag = await store.put_if("k", b"v", if_none_match=True)
    finally:
        await store.close()
    async with S3FaultProxy(upstream).running() as proxy:
        proxy.refuse[("HEAD", f"/{settings.bucket}")] = (404, "NotFound")  # not yet, it saw
        late = S3Store(dataclasses.replace(settings, endpoint_url=proxy.url))
        try:
            await late.create_bucket()
            assert await late.get("k") == (b"v", etag)
        finally:
            await late.close()
