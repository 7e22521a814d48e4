"""Write one object to a localfs store and one to an S3 store, sample the clock of a
third handle (localfs) that writes nothing, then print one JSON line: this
process's time.time() and time.monotonic(), and each store's now().
Run under libfaketime by tests/test_store_time.py.
Usage: store_now.py DIR ENDPOINT BUCKET PREFIX"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from simplequeue.objstore.localfs import LocalStore
from simplequeue.objstore.s3 import S3Settings, S3Store


async def main(root: str, endpoint: str, bucket: str, prefix: str) -> None:
    local = LocalStore(root)
    sampled = LocalStore(root)
    s3 = S3Store(S3Settings(bucket, prefix, endpoint_url=endpoint, region="us-east-1"))
    try:
        await local.put("k", b"v")
        await s3.put("k", b"v")
        await sampled.sample_clock()
        print(
            json.dumps(
                {
                    "time": time.time(),
                    "monotonic": time.monotonic(),
                    "localfs_now": local.now(),
                    "s3_now": s3.now(),
                    "localfs_sampled_now": sampled.now(),
                }
            ),
            flush=True,
        )
    finally:
        await local.close()
        await sampled.close()
        await s3.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
