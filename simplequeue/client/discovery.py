"""Finding the active broker through broker.json, as a client."""

from __future__ import annotations

import contextlib

from simplequeue import api
from simplequeue.errors import BrokerUnavailable, CorruptData, StoreRefused
from simplequeue.objstore import ObjectStore
from simplequeue.records import BrokerRecord, read_record


async def find_broker(store: ObjectStore, max_age: float) -> str:
    """The URL of the broker that broker.json names; BrokerUnavailable when there
    is none, or its heartbeat is older than `max_age` seconds by the store's
    clock, so a client whose own clock is off still finds a healthy broker and
    is not sent to a dead one. S3's answer to the read stamps that clock; on
    localfs, whose reads carry no stamp, the handle samples it (a write
    to its clock file, once); a handle that may not write there (a read-only
    mount) judges by its own wall clock. A heartbeat more than `max_age`
    seconds in the future is refused too: a clock that far off cannot tell
    a live broker from one dead for as long. max_age is the limit (SPEC 8),
    whatever lease the record states: a broker renews broker.json every
    third of its lease (its --broker-lease), so a max_age below that
    refuses a healthy broker between renewals, and the error says so (for
    a heartbeat within that lease)."""
    api.check_seconds("max_age", max_age)
    try:
        current = await read_record(store)
    except CorruptData as exc:
        raise BrokerUnavailable(f"no broker to find: {exc}") from None
    if current is None:
        raise BrokerUnavailable("no broker.json in the store: no broker has run here")
    record, _ = current
    if record.resigned:
        raise BrokerUnavailable(
            f"broker.json names {record.url}, which stopped: no broker is active "
            "(a standby takes it over within a third of its --broker-lease)"
        )
    # After the read: a handle on a store that is not there creates nothing.
    with contextlib.suppress(StoreRefused):
        await store.sample_clock()
    age = record.age(store.now())  # the heartbeat is on the store's clock too
    if age > max_age:
        raise BrokerUnavailable(
            f"broker.json names {record.url} but its heartbeat is {age:.0f} s old "
            f"(max_age {max_age:.0f} s){renewal_hint(record, max_age, age)}"
        )
    if age < -max_age:
        raise BrokerUnavailable(
            f"broker.json names {record.url} but its heartbeat is {-age:.0f} s in the "
            f"future (max_age {max_age:.0f} s): that broker's clock and the store's "
            "(or this client's) are that far apart"
        )
    try:
        return api.check_broker_url(record.url)
    except ValueError as exc:
        raise BrokerUnavailable(f"broker.json names no broker: {exc}") from None


def renewal_hint(record: BrokerRecord, max_age: float, age: float) -> str:
    """Why a heartbeat `age` seconds old, past `max_age`, may still be a live
    broker's: it renews broker.json only every third of its lease. Not for
    one older than the lease itself: that broker stopped renewing it, and a
    max_age above its renewals would refuse it still."""
    every = record.lease / 3
    if every < max_age or age > record.lease:
        return ""
    return (
        f"; that broker renews it every {every:.0f} s, a third of its --broker-lease"
        f" {record.lease:.0f} s: a max_age (--max-age) above {every:.0f} s finds it"
        " between renewals"
    )
