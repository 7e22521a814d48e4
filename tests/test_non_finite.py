"""nan and infinity, refused wherever a number comes in: JSON has neither
(orjson and msgspec write both as null), and nan passes every comparison. A
head holding one cannot be read back; a request holding one means something
else (no lease, no payload)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from simplequeue import api, keys
from simplequeue.broker.cli import main as broker_main
from simplequeue.broker.server import Broker
from simplequeue.broker.settings import BrokerSettings
from simplequeue.client import Client, Worker
from simplequeue.client.discovery import find_broker
from simplequeue.client.sync import SyncClient
from simplequeue.errors import BrokerUnavailable
from simplequeue.objstore.memfs import MemStore
from simplequeue.records import BrokerRecord
from simplequeue.state import Policy
from simplequeue.storeflags import UsageFailed

StartBroker = Callable[..., Awaitable[Broker]]
NON_FINITE = [math.nan, math.inf]


SECONDS_FLAGS = ["--lease", "--retention", "--broker-lease", "--batch-wait", "--header-timeout"]


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("flag", [*SECONDS_FLAGS, "--keepalive-timeout"])
def test_simplequeued_refuses_seconds_that_are_not_finite(flag: str, value: str) -> None:
    """click.FloatRange lets nan through every bound (and inf past a range
    with no max): `--lease nan` wrote every claim's lease_expires_at as null,
    and each topic that got a claim answered 500 from its next read on."""
    # A usage error, told on one line (UsageFailed, exit status 2).
    with pytest.raises(UsageFailed, match=r"not a finite number|not in the range"):
        broker_main.make_context("simplequeued", [flag, value])


def test_simplequeued_refuses_a_lease_longer_than_the_api_allows() -> None:
    with pytest.raises(UsageFailed, match="--lease"):
        broker_main.make_context("simplequeued", ["--lease", "86400"])


@pytest.mark.parametrize("value", NON_FINITE)
def test_a_policy_or_settings_built_in_code_refuse_them_too(value: float) -> None:
    with pytest.raises(ValueError, match="default_lease"):
        Policy(default_lease=value)
    with pytest.raises(ValueError, match="retention"):
        Policy(retention=value)
    with pytest.raises(ValueError, match="broker_lease"):
        BrokerSettings(store_url="mem://", broker_lease=value)


async def test_the_sdk_refuses_them_rather_than_send_null(start_broker: StartBroker) -> None:
    """{"x": nan} was stored as {"x": null}; a result of inf as null; a claim's
    lease of nan went as the broker's default, a heartbeat's as the claim's."""
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="sdk") as q:
        with pytest.raises(ValueError, match="nan and infinity"):
            await q.enqueue({"x": math.nan})
        for when in NON_FINITE:  # a run_at of null is none: due at once
            with pytest.raises(ValueError, match="nan and infinity"):
                await q.enqueue(2, run_at=when)
        await q.enqueue(1)
        for lease in NON_FINITE:
            with pytest.raises(ValueError, match="nan and infinity"):
                await q.claim("w", lease=lease)
        job = await q.claim("w", lease=5)
        assert job is not None
        for lease in NON_FINITE:
            with pytest.raises(ValueError, match="nan and infinity"):
                await q.heartbeat(job, lease=lease)
        with pytest.raises(ValueError, match="nan and infinity"):
            await q.ack(job, result={"score": math.inf})
        assert (await q.job(job.id)).status == "claimed"  # nothing went
        await q.ack(job, result={"score": None})  # a null of the caller's own goes
        assert (await q.job(job.id)).result == {"score": None}
        assert (await q.status())["enqueued"] == 1


@pytest.mark.parametrize("value", NON_FINITE)
async def test_a_worker_refuses_heartbeat_every_that_is_not_finite(
    start_broker: StartBroker, value: float
) -> None:
    """heartbeat_every=nan passed `value <= 0`, and no heartbeat ever landed:
    a job longer than its lease ran again and again, and ended dead."""
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="wk") as q:
        for name in ("heartbeat_every", "lease", "timeout"):
            with pytest.raises(ValueError, match=name):
                Worker(q, lambda job: None, handle_signals=False, **{name: value})


@pytest.mark.parametrize("value", [*NON_FINITE, -1.0, api.MAX_WAIT + 1])
async def test_a_worker_refuses_a_wait_the_broker_would_refuse(value: float) -> None:
    """wait=nan or 61 was taken, and every claim of run() failed on it."""
    async with Client("http://127.0.0.1:9", topic="wk") as q:
        with pytest.raises(ValueError, match="wait"):
            Worker(q, lambda job: None, handle_signals=False, wait=value)


@pytest.mark.parametrize("value", [*NON_FINITE, -1.0])
def test_a_client_refuses_seconds_that_are_not_finite(value: float) -> None:
    """Client(timeout=nan) gave aiohttp a timeout of nan; retry_budget=inf
    retried a broker that was down for ever."""
    for name in ("timeout", "retry_budget", "max_age"):
        with pytest.raises(ValueError, match=name):
            Client("http://127.0.0.1:9", **{name: value})
    with pytest.raises(ValueError, match="timeout"):
        Client("http://127.0.0.1:9", timeout=0.0)


def test_a_client_budget_from_a_finite_timeout_is_finite() -> None:
    with pytest.raises(ValueError, match="retry_budget"):
        Client("http://127.0.0.1:9", timeout=1e308)  # twice that is inf


def test_a_sync_client_refused_leaves_no_thread_running() -> None:
    """SyncClient started its loop's thread, then built its Client: refused
    arguments left the thread and its loop running."""

    def threads() -> int:
        return sum(t.name == "simplequeue-sync-client" for t in threading.enumerate())

    before = threads()
    with pytest.raises(ValueError, match="timeout"):
        SyncClient("http://127.0.0.1:9", timeout=0)
    with pytest.raises(ValueError, match="max_age"):
        SyncClient.discover(MemStore(), max_age=math.nan)
    assert threads() == before


def returns_nan(job: Any) -> float:
    return math.nan


async def test_a_handler_that_returns_nan_fails_its_job(start_broker: StartBroker) -> None:
    broker = await start_broker(MemStore())
    async with Client(broker.url, topic="wk") as q:
        job_id = await q.enqueue(1, max_attempts=1)
        await Worker(q, returns_nan, burst=True, handle_signals=False).run()
        job = await q.job(job_id)
        assert job.status == "dead" and "nan and infinity" in (job.last_error or "")


async def test_discovery_refuses_a_max_age_that_is_not_finite() -> None:
    """max_age=nan took a broker.json of any age (`age > nan` is false)."""
    store = MemStore()
    stale = BrokerRecord(
        broker_id="b1",
        url="http://127.0.0.1:9",
        epoch=1,
        heartbeat_at=time.time() - 86400,
        lease_s=15.0,
    )
    await store.put(keys.BROKER, stale.encode())
    with pytest.raises(BrokerUnavailable):
        await find_broker(store, 30.0)
    with pytest.raises(ValueError, match="max_age"):
        await find_broker(store, math.nan)


def test_a_records_lease_is_trusted_up_to_an_hour() -> None:
    """A broker run with --broker-lease 1e300 (refused now, but written by a
    broker before that or by another program) wrote a record whose broker,
    dead, stayed active in broker.json and live to the others for ever: they
    judge staleness by the record's own lease (review of round 22)."""
    from simplequeue.records import MAX_LEASE_S

    record = BrokerRecord(
        broker_id="b1", url="http://127.0.0.1:9", epoch=1, heartbeat_at=1.0, lease_s=1e300
    )
    assert record.lease == MAX_LEASE_S == 3600.0
