"""The ceiling: a bare aiohttp server answering simplequeue's job routes at once.

It reads each request's body and answers canned JSON of the broker's shape, with no
parsing, no state and no storage: what this machine and this client can do at best.
Prints "ceiling listening on http://127.0.0.1:PORT (pid N)" once it listens.

    python -m bench.ceiling [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
import uuid

import orjson
from aiohttp import web

from simplequeue.broker.cli import event_loop_runner

NOW = time.time()
JOB_ID = uuid.uuid4().hex
# A claimed job as the broker answers it (simplequeue.broker.engine.public).
CLAIMED = {
    "id": JOB_ID,
    "payload": {"kind": "bench", "n": 0, "pad": "x" * 64},
    "priority": 0,
    "run_at": NOW,
    "created_at": NOW,
    "attempts": 1,
    "max_attempts": 5,
    "last_error": None,
    "status": "claimed",
    "claimed_by": "bench-0",
    "claimed_at": NOW,
    "heartbeat_at": NOW,
    "lease_expires_at": NOW + 30,
    "lease_token": uuid.uuid4().hex,
    "result": None,
}
ENQUEUED = orjson.dumps({"id": JOB_ID})
CLAIM = orjson.dumps({"job": CLAIMED})
ACKED = orjson.dumps({"id": JOB_ID, "status": "completed"})
OK = orjson.dumps({"ok": True})


def canned(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


async def enqueue(request: web.Request) -> web.Response:
    await request.read()
    return canned(ENQUEUED, 201)


async def claim(request: web.Request) -> web.Response:
    await request.read()
    return canned(CLAIM)


async def ack(request: web.Request) -> web.Response:
    await request.read()
    return canned(ACKED)


async def healthz(request: web.Request) -> web.Response:
    return canned(OK)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text="", content_type="text/plain")


async def serve(port: int) -> None:
    app = web.Application()
    t = "/topics/{topic}"
    app.router.add_routes(
        [
            web.post(f"{t}/enqueue", enqueue),
            web.post(f"{t}/claim", claim),
            web.post(f"{t}/ack", ack),
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
        ]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"ceiling listening on http://127.0.0.1:{bound} (pid {os.getpid()})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    port = parser.parse_args().port
    # The same event loop as simplequeued's (uvloop where installed), so that the
    # ceiling is the fastest this machine and this client can go.
    with event_loop_runner() as runner:
        runner.run(serve(port))


if __name__ == "__main__":
    main()
