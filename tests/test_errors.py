"""One error table: each class of simplequeue.errors carries its HTTP status and
its RESP code, and the SDK turns a status back into a class. The table below is
the spec; the faces are checked against it one request at a time, through a real
broker (HTTP and RESP) and the real SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from simplequeue import errors
from simplequeue.broker.resp.wire import error_of
from simplequeue.client import Client
from simplequeue.errors import (
    AmbiguousWrite,
    BrokerError,
    BrokerUnavailable,
    CacheTooSmall,
    Contended,
    CorruptData,
    Forbidden,
    IncompleteAnswer,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobNotFound,
    LeaseLost,
    NotDurable,
    NothingToClaim,
    ObjectNotFound,
    Overloaded,
    PayloadTooLarge,
    PreconditionFailed,
    RefusedByTopic,
    RequestTimedOut,
    RouteNotFound,
    ScheduleNotFound,
    SimpleQueueError,
    StorageFull,
    StoreError,
    StoreRefused,
    StoreUnavailable,
    StoreUnusable,
    Unauthorized,
    UnknownTask,
)
from simplequeue.objstore.memfs import MemStore

# class: (HTTP status, RESP code, what the SDK raises for that status, the
# status of one failed ack in a batch, None where it fails the whole batch). The
# SDK retries 503s and then raises StoreUnavailable; a 500 is a CorruptData or an
# unexpected error, which it cannot tell apart: BrokerError with the status and
# the broker's message. An error that shares its status with another (409, 404)
# is told apart by the reason its answer carries.
TABLE: dict[type[SimpleQueueError], tuple[int, str, type[SimpleQueueError], str | None]] = {
    SimpleQueueError: (500, "ERR", BrokerError, None),
    StoreError: (503, "TRYAGAIN", StoreUnavailable, None),
    PreconditionFailed: (503, "TRYAGAIN", StoreUnavailable, None),
    ObjectNotFound: (503, "TRYAGAIN", StoreUnavailable, None),
    StoreUnavailable: (503, "TRYAGAIN", StoreUnavailable, None),
    StoreRefused: (503, "TRYAGAIN", StoreUnavailable, None),
    StoreUnusable: (503, "TRYAGAIN", StoreUnavailable, None),
    AmbiguousWrite: (503, "TRYAGAIN", StoreUnavailable, None),
    CacheTooSmall: (503, "TRYAGAIN", StoreUnavailable, None),
    NotDurable: (503, "TRYAGAIN", StoreUnavailable, None),
    StorageFull: (507, "ERR", StorageFull, None),
    InvalidRequest: (400, "ERR", InvalidRequest, "invalid"),
    RefusedByTopic: (400, "ERR", InvalidRequest, "invalid"),
    PayloadTooLarge: (413, "ERR", PayloadTooLarge, "invalid"),
    JobNotFound: (404, "ERR", JobNotFound, "not_found"),
    NothingToClaim: (404, "ERR", JobNotFound, None),
    LeaseLost: (409, "ERR", LeaseLost, "conflict"),
    JobCancelled: (409, "ERR", JobCancelled, "cancelled"),
    ScheduleNotFound: (404, "ERR", ScheduleNotFound, None),
    RouteNotFound: (404, "ERR", RouteNotFound, None),
    Contended: (503, "TRYAGAIN", StoreUnavailable, None),
    Overloaded: (503, "TRYAGAIN", StoreUnavailable, None),
    Unauthorized: (401, "NOAUTH", Unauthorized, None),
    Forbidden: (403, "ERR", Forbidden, None),
    RequestTimedOut: (408, "ERR", RequestTimedOut, None),
    CorruptData: (500, "ERR", BrokerError, None),
    BrokerUnavailable: (503, "TRYAGAIN", StoreUnavailable, None),
    BrokerError: (500, "ERR", BrokerError, None),
    JobFailed: (500, "ERR", BrokerError, None),
    IncompleteAnswer: (500, "ERR", BrokerError, None),
    UnknownTask: (500, "ERR", BrokerError, None),
}


def instance(cls: type[SimpleQueueError]) -> SimpleQueueError:
    if cls is CorruptData:
        return CorruptData("topics/t.json", "not JSON")
    if cls is IncompleteAnswer:
        return IncompleteAnswer("it failed", [])
    return cls("it failed")


def test_the_table_has_every_class_of_the_module() -> None:
    defined = {
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, SimpleQueueError)
    }
    assert defined == set(TABLE)


@pytest.mark.parametrize("cls", list(TABLE), ids=lambda c: c.__name__)
def test_each_class_carries_its_status_code_and_sdk_class(cls: type[SimpleQueueError]) -> None:
    status, code, sdk, acked = TABLE[cls]
    assert cls.http_status == status
    assert error_of(instance(cls)).code == code
    assert (errors.for_status(status, cls.reason) or BrokerError) is sdk
    assert cls.ack_status == acked


@pytest.mark.parametrize("cls", list(TABLE), ids=lambda c: c.__name__)
async def test_every_face_answers_an_error_as_its_class_says(
    start_broker: Callable[..., Awaitable[Any]],
    monkeypatch: pytest.MonkeyPatch,
    cls: type[SimpleQueueError],
) -> None:
    """The same engine failure, met through HTTP, RESP and the SDK."""
    status, code, sdk, _ = TABLE[cls]
    broker = await start_broker(MemStore(), redis_addr="127.0.0.1:0")
    raised = instance(cls)

    async def fail(topic: str) -> dict[str, int]:
        raise raised

    monkeypatch.setattr(broker.engine, "status", fail)
    url = broker.url
    async with aiohttp.ClientSession() as session, session.get(url + "/topics/t/status") as r:
        said = (
            {"error": str(raised)}
            if cls.reason is None
            else {"error": str(raised), "reason": cls.reason}
        )
        assert (r.status, await r.json()) == (status, said)

    reader, writer = await asyncio.open_connection("127.0.0.1", broker.redis.port)
    try:
        writer.write(b"*2\r\n$4\r\nLLEN\r\n$1\r\nt\r\n")
        line = await asyncio.wait_for(reader.readline(), 10)
        assert line == f"-{code} {raised}\r\n".encode()
    finally:
        writer.close()
        await writer.wait_closed()

    async with Client(url, topic="t", retries=1) as client:
        with pytest.raises(SimpleQueueError) as caught:
            await client.status()
    assert type(caught.value) is sdk
    assert str(raised) in str(caught.value)
    if sdk is BrokerError:
        assert isinstance(caught.value, BrokerError) and caught.value.status == status
