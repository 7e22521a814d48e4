"""The records brokers and clients both read: broker.json, which names the broker
clients should use. Its format is defined here once; the broker writes it
(simplequeue.broker.discovery), clients read it (simplequeue.client.discovery).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import orjson

from simplequeue import keys
from simplequeue.errors import ObjectNotFound
from simplequeue.objstore import ObjectStore


@dataclass(frozen=True)
class BrokerRecord:
    """The content of broker.json."""

    broker_id: str
    url: str
    epoch: int
    heartbeat_at: float
    lease_s: float

    def age(self, now: float) -> float:
        return now - self.heartbeat_at

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> BrokerRecord:
        raw = orjson.loads(data)
        return cls(
            broker_id=str(raw["broker_id"]),
            url=str(raw["url"]),
            epoch=int(raw["epoch"]),
            heartbeat_at=float(raw["heartbeat_at"]),
            lease_s=float(raw["lease_s"]),
        )


async def read_record(store: ObjectStore) -> tuple[BrokerRecord, str] | None:
    """The current broker.json and its ETag, or None when no broker ever ran."""
    try:
        data, etag = await store.get(keys.BROKER)
    except ObjectNotFound:
        return None
    return BrokerRecord.decode(data), etag
