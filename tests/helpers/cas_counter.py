"""Increment a counter in a localfs store N times by compare-and-set (a test helper
run as its own OS process). Usage: cas_counter.py DIR N"""

from __future__ import annotations

import asyncio
import sys

from simplequeue.objstore import ObjectNotFound, PreconditionFailed
from simplequeue.objstore.localfs import LocalStore


async def main(root: str, n: int) -> None:
    store = LocalStore(root)
    done = 0
    while done < n:
        try:
            data, etag = await store.get("counter")
        except ObjectNotFound:
            try:
                await store.put_if("counter", b"1", if_none_match=True)
                done += 1
            except PreconditionFailed:
                pass
            continue
        try:
            await store.put_if("counter", str(int(data) + 1).encode(), if_match=etag)
            done += 1
        except PreconditionFailed:
            pass


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
