"""memfs: an in-process object store. Nothing survives the process.

For tests and throwaway brokers. It honours the same contract as the durable
backends, so code above the seam cannot tell it apart. Its clock is the
process's own wall clock: every handle on it lives in one process.
"""

from __future__ import annotations

import builtins

from simplequeue.errors import ObjectNotFound, PreconditionFailed
from simplequeue.objstore.base import ObjectStore, check_key, content_etag

# Named stores (mem://name) share their objects within the process, so that
# several brokers or committers in one test can meet on one store.
_NAMED: dict[str, dict[str, tuple[bytes, str]]] = {}


class MemStore(ObjectStore):
    """Objects in a dict. Every method completes without awaiting, so each call
    is atomic with respect to other coroutines."""

    def __init__(self, name: str = "") -> None:
        super().__init__()  # a clock never fed a sample: now() is time.time()
        self.url = f"mem://{name}"
        self._objects: dict[str, tuple[bytes, str]] = _NAMED.setdefault(name, {}) if name else {}

    async def get(self, key: str) -> tuple[bytes, str]:
        try:
            return self._objects[check_key(key)]
        except KeyError:
            raise ObjectNotFound(key) from None

    async def put(self, key: str, data: bytes) -> str:
        etag = content_etag(data)
        self._objects[check_key(key)] = (bytes(data), etag)
        return etag

    async def put_if(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        self._check_condition(if_match, if_none_match)
        current = self._objects.get(check_key(key))
        if if_none_match and current is not None:
            raise PreconditionFailed(f"{key} exists")
        if if_match is not None and (current is None or current[1] != if_match):
            raise PreconditionFailed(f"{key} changed")
        return await self.put(key, data)

    async def delete(self, key: str) -> None:
        self._objects.pop(check_key(key), None)

    async def list(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self._objects if k.startswith(prefix))

    async def list_top(self, prefix: str) -> builtins.list[str]:
        return sorted(
            k for k in self._objects if k.startswith(prefix) and "/" not in k[len(prefix) :]
        )
