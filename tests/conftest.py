"""Shared fixtures: object stores of every backend, LocalStack S3 included.

bin/test starts LocalStack and exports SIMPLEQUEUE_TEST_S3_ENDPOINT. Without it
the s3 cases skip, unless SIMPLEQUEUE_REQUIRE_S3=1 (set by bin/test and CI),
in which case they fail: CI must never pass by skipping S3.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from simplequeue.objstore import ObjectStore
from simplequeue.objstore.localfs import LocalStore
from simplequeue.objstore.memfs import MemStore

S3_ENDPOINT = os.environ.get("SIMPLEQUEUE_TEST_S3_ENDPOINT", "")
RUN_BUCKET = f"sq-test-{uuid.uuid4().hex[:12]}"
BACKENDS = ["memfs", "localfs", "s3"]


def s3_endpoint() -> str:
    """The LocalStack endpoint, or skip (fail under SIMPLEQUEUE_REQUIRE_S3=1)."""
    if not S3_ENDPOINT:
        if os.environ.get("SIMPLEQUEUE_REQUIRE_S3") == "1":
            pytest.fail("SIMPLEQUEUE_TEST_S3_ENDPOINT is not set but S3 tests are required")
        pytest.skip("no LocalStack: set SIMPLEQUEUE_TEST_S3_ENDPOINT (bin/test does)")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return S3_ENDPOINT


def s3_url(prefix: str | None = None) -> str:
    """A store URL on this run's bucket under a fresh prefix."""
    prefix = prefix or uuid.uuid4().hex[:12]
    return f"s3://{RUN_BUCKET}/{prefix}?endpoint_url={s3_endpoint()}&region=us-east-1"


async def open_s3(prefix: str | None = None, **overrides: object) -> ObjectStore:
    from simplequeue.objstore.s3 import S3Settings, S3Store

    settings = S3Settings(
        bucket=RUN_BUCKET,
        prefix=prefix or uuid.uuid4().hex[:12],
        endpoint_url=s3_endpoint(),
        region="us-east-1",
        **overrides,  # type: ignore[arg-type]
    )
    store = S3Store(settings)
    await store.create_bucket()
    return store


OpenStore = Callable[[], Awaitable[ObjectStore]]


@pytest.fixture(params=BACKENDS)
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """A factory for handles on one empty store of each backend. Each call opens
    a new handle on the same data, as a second broker process would."""
    backend: str = request.param
    name, prefix = f"t{uuid.uuid4().hex}", uuid.uuid4().hex[:12]
    opened: list[ObjectStore] = []

    async def make() -> ObjectStore:
        if backend == "memfs":
            handle: ObjectStore = MemStore(name)
        elif backend == "localfs":
            handle = LocalStore(tmp_path / "store")
        else:
            handle = await open_s3(prefix)
        opened.append(handle)
        return handle

    yield make
    for handle in opened:
        await handle.close()


@pytest.fixture
async def store(open_store: OpenStore) -> ObjectStore:
    """One empty store of each backend."""
    return await open_store()
