"""A fault-injecting HTTP proxy to put between a broker and LocalStack's S3.

Each request is passed through, or (by the odds set) answered 503 SlowDown
without being forwarded, dropped without being forwarded, forwarded and then
dropped so its answer is lost although it landed, or delayed. `outage()` makes
the proxy refuse everything for a while, as a stopped store would.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass

import aiohttp
from aiohttp import web

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class Odds:
    slowdown: float = 0.0  # answered 503 SlowDown, not forwarded
    drop: float = 0.0  # connection dropped, not forwarded
    lose_answer: float = 0.0  # forwarded (it lands), then the connection is dropped
    delay: float = 0.0  # forwarded after a pause
    delay_s: float = 0.5


class FaultProxy:
    """A reverse proxy on 127.0.0.1 in front of `upstream`."""

    def __init__(self, upstream: str, odds: Odds, seed: int = 5) -> None:
        self.upstream = upstream.rstrip("/")
        self.odds = odds
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()
        self.forwarded = 0
        self.down = False
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def stop(self) -> None:
        if self._session:
            await self._session.close()
        if self._runner:
            await self._runner.cleanup()

    async def outage(self, seconds: float) -> None:
        """Refuse every request for `seconds`, as a stopped store would."""
        self.down = True
        self.injected["outage"] += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            self.down = False

    def _drop(self, request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("dropped by the fault proxy")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.down:
            self.injected["refused"] += 1
            return self._drop(request)
        roll, o = self.rng.random(), self.odds
        body = await request.read()
        if roll < o.slowdown:
            self.injected["slowdown"] += 1
            return web.Response(status=503, body=SLOWDOWN, content_type="application/xml")
        roll -= o.slowdown
        if roll < o.drop:
            self.injected["drop"] += 1
            return self._drop(request)
        roll -= o.drop
        lose = roll < o.lose_answer
        roll -= o.lose_answer
        if roll < o.delay:
            self.injected["delay"] += 1
            await asyncio.sleep(o.delay_s)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            self.forwarded += 1
            if lose:
                self.injected["lose_answer"] += 1
                return self._drop(request)
            skip = {"transfer-encoding", "content-length", "connection", "content-encoding"}
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in skip}
            if "content-encoding" in upstream.headers:
                out_headers["Content-Encoding"] = upstream.headers["content-encoding"]
            return web.Response(status=upstream.status, body=payload, headers=out_headers)
