"""A memory store that counts the GETs of one topic's head: what an idle topic's
readers (long polls, claims, status and settings reads) cost on S3."""

from __future__ import annotations

from simplequeue import keys
from simplequeue.objstore.memfs import MemStore


class HeadReads(MemStore):
    """Counts the GETs of topic `topic`'s head (t by default) in `reads`."""

    def __init__(self, topic: str = "t") -> None:
        super().__init__()
        self.head = keys.head(topic)
        self.reads = 0

    async def get(self, key: str) -> tuple[bytes, str]:
        self.reads += key == self.head
        return await super().get(key)
