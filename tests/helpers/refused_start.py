"""simplequeued on an S3 store it must refuse at start: run to its end."""

from __future__ import annotations

import asyncio
import sys


async def refused_at_start(bucket: str, endpoint_url: str) -> tuple[bytes, bytes]:
    """(stdout, stderr) of `simplequeued --backend s3` on `bucket` at
    `endpoint_url`, which must exit 1 without listening, its store closed
    (no "Unclosed" session)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simplequeue.broker",
        "--addr",
        "127.0.0.1:0",
        "--backend",
        "s3",
        "--bucket",
        bucket,
        "--endpoint-url",
        endpoint_url,
        "--region",
        "us-east-1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        # Generous: a cold interpreter importing aiobotocore, on a busy machine.
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1, err
    assert b"listening" not in out, f"it serves a store it must refuse: {out!r}"
    assert b"Unclosed" not in err, err  # its store closed before it exits
    return out, err
