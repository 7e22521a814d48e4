"""Rewrite one localfs object forever with large, self-checking versions, printing
a line after each write lands, until killed. Usage: crash_writer.py DIR"""

from __future__ import annotations

import asyncio
import hashlib
import sys

from simplequeue.objstore import ObjectNotFound
from simplequeue.objstore.localfs import LocalStore


def version(n: int) -> bytes:
    """Version n: a header naming its length and digest, then 1-3 MiB of body."""
    body = hashlib.sha256(str(n).encode()).digest() * (32768 * (1 + n % 3))
    return f"{n} {len(body)} {hashlib.sha256(body).hexdigest()}\n".encode() + body


def check(data: bytes) -> int:
    """Return the version number of `data`, or raise if it is torn or corrupt."""
    header, _, body = data.partition(b"\n")
    n, length, digest = header.decode().split()
    assert len(body) == int(length), "torn write: length mismatch"
    assert hashlib.sha256(body).hexdigest() == digest, "torn write: digest mismatch"
    return int(n)


async def main(root: str) -> None:
    store = LocalStore(root)
    try:
        data, etag = await store.get("obj")
        n = check(data)
    except ObjectNotFound:
        n, etag = 0, await store.put("obj", version(0))
    while True:
        n += 1
        etag = await store.put_if("obj", version(n), if_match=etag)
        print(n, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
