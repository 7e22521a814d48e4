"""The records brokers and clients both read: broker.json, which names the broker
clients should use, and each broker's registration (brokers/<id>.json), of the
same shape. The format is defined here once; brokers write them
(simplequeue.broker.discovery, simplequeue.broker.membership), clients read
broker.json (simplequeue.client.discovery).
"""

from __future__ import annotations

import msgspec

from simplequeue import keys
from simplequeue.errors import CorruptData, ObjectNotFound
from simplequeue.objstore import ObjectStore

# The longest --broker-lease: a record's lease is trusted up to this long (one
# that said 1e300 would name its broker live, and active, for ever after it died).
MAX_LEASE_S = 3600.0


class BrokerRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """The content of broker.json."""

    broker_id: str
    url: str
    epoch: int
    heartbeat_at: float
    lease_s: float
    # A registration's: random, new with each process (a restart under the
    # same broker id is a new one); "" in broker.json and from older brokers.
    incarnation: str = ""

    def age(self, now: float) -> float:
        return now - self.heartbeat_at

    @property
    def lease(self) -> float:
        """Seconds without a renewal after which its broker is taken for dead:
        its lease_s, at most MAX_LEASE_S."""
        return min(self.lease_s, MAX_LEASE_S)

    @property
    def resigned(self) -> bool:
        """Its broker stopped cleanly and handed the record over."""
        return self.heartbeat_at <= 0

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, data: bytes, key: str = keys.BROKER) -> BrokerRecord:
        try:
            return msgspec.json.decode(data, type=cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise CorruptData(key, f"not a broker record ({exc})") from None


class CorruptRecord(CorruptData):
    """broker.json is there but cannot be read; `etag` is the object's, so that a
    broker can replace it by a conditional write."""

    def __init__(self, key: str, why: str, etag: str) -> None:
        super().__init__(key, why)
        self.etag = etag


async def read_record(store: ObjectStore) -> tuple[BrokerRecord, str] | None:
    """The current broker.json and its ETag, or None when no broker ever ran.
    CorruptRecord when it cannot be read."""
    try:
        data, etag = await store.get(keys.BROKER)
    except ObjectNotFound:
        return None
    try:
        return BrokerRecord.decode(data), etag
    except CorruptData as exc:
        raise CorruptRecord(exc.key, exc.why, etag) from None
