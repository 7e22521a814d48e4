"""A tiny S3 stand-in on 127.0.0.1 (aiohttp) for what LocalStack and moto never
do: a store that ignores the conditional headers (MinIO before mid-2024), a
Date header no datetime holds. botocore and aiobotocore run for real against
it. Path-style keys ("bucket/key"), as botocore sends them to an IP address.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web


class FakeS3:
    """PUT, GET, DELETE of objects, and HEAD of any bucket; conditional PUTs
    honoured or (`honour_conditions=False`) taken as plain PUTs; every answer
    with the Date header `date` when given, `delay` s after the request came
    (a store's own time to answer). `objects` is keyed "bucket/key"; `puts`
    counts the PUTs that landed."""

    def __init__(
        self, *, honour_conditions: bool = True, date: str | None = None, delay: float = 0.0
    ) -> None:
        self.honour_conditions = honour_conditions
        self.date = date
        self.delay = delay
        self.objects: dict[str, bytes] = {}
        self.puts = 0
        self.url = ""

    def _headers(self, **more: str) -> dict[str, str]:
        headers = dict(more)
        if self.date is not None:
            headers["Date"] = self.date
        return headers

    def error(self, status: int, code: str) -> web.Response:
        body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>"
        return web.Response(
            status=status, text=body, content_type="application/xml", headers=self._headers()
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.delay:
            await asyncio.sleep(self.delay)
        key = request.path[1:]
        if "/" not in key.strip("/"):  # the bucket itself (HeadBucket)
            return web.Response(headers=self._headers())
        if request.method == "PUT":
            body = await request.read()
            if self.honour_conditions:
                if request.headers.get("If-None-Match") == "*" and key in self.objects:
                    return self.error(412, "PreconditionFailed")
                match = request.headers.get("If-Match")
                if match is not None:
                    if key not in self.objects:
                        return self.error(404, "NoSuchKey")
                    if match != self.etag(self.objects[key]):
                        return self.error(412, "PreconditionFailed")
            self.objects[key] = body
            self.puts += 1
            return web.Response(headers=self._headers(ETag=self.etag(body)))
        if request.method == "GET":
            if key not in self.objects:
                return self.error(404, "NoSuchKey")
            data = self.objects[key]
            return web.Response(body=data, headers=self._headers(ETag=self.etag(data)))
        if request.method == "DELETE":
            self.objects.pop(key, None)
            return web.Response(status=204, headers=self._headers())
        return self.error(501, "NotImplemented")

    @staticmethod
    def etag(data: bytes) -> str:
        return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FakeS3]:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield self
        finally:
            await runner.cleanup()
