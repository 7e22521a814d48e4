"""A reverse proxy in front of a broker that bounds request bodies on its own,
as nginx's client_max_body_size does: a body over its bound is answered with
the proxy's own 413 page (a BrokerError to the SDK, not the API's
PayloadTooLarge), never passed on."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web


class BoundingProxy:
    """A reverse proxy that bounds request bodies on its own, as nginx's
    client_max_body_size does: a body over `max_body` is answered with the
    proxy's own 413 page (aiohttp's: text/plain), never passed on."""

    def __init__(self, upstream: str, max_body: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.max_body = max_body
        self.url = ""
        self.refused: collections.Counter[str] = collections.Counter()
        self._session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.refused[request.path] += 1
            raise
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=data, headers=headers
        ) as upstream:
            body = await upstream.read()
            return web.Response(
                status=upstream.status,
                body=body,
                content_type=upstream.content_type,
                # Not Simplequeue-Owner: the broker's own address is not
                # reachable from the client's side of the proxy.
                headers={
                    k: v
                    for k, v in upstream.headers.items()
                    if k.lower().startswith("simplequeue") and k.lower() != "simplequeue-owner"
                },
            )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[BoundingProxy]:
        self._session = aiohttp.ClientSession()
        app = web.Application(client_max_size=self.max_body)
        app.router.add_route("*", "/{path:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield self
        finally:
            await runner.cleanup()
            await self._session.close()
