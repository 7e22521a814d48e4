"""An HTTP proxy in front of a broker that fails the requests a test tells it to:
a status with an HTML page (as load balancers answer), a 200 that is not JSON,
or a body cut short, before or after the request reached the broker."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

HTML = "<html><body><h1>Bad Gateway</h1></body></html>"

# Faults: "404", "409", "500", "502", "503", "504" (that status with an HTML
# page, answered by the proxy: the broker never sees the request); "landed-502"
# (forwarded, then 502); "html" (200, HTML); "cut" (forwarded, then half the
# body and the connection closed); "silent" (never answered, never forwarded:
# held until the proxy stops); "landed-held" (forwarded, then its answer held
# until the proxy stops: on its way when the client gives up; sets `held`);
# "replay" (never forwarded: answered what the last request of its path
# passed on was answered, as a cache or a broker at fault may answer again);
# "pass" (forwarded as it is: a place in the plan, for a fault after it).
PAGES = {"404", "409", "500", "502", "503", "504"}
FAULTS = {*PAGES, "landed-502", "html", "cut", "silent", "landed-held", "replay", "pass"}


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.url = ""
        self._plan: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)
        self.always: dict[str, str] = {}  # route suffix -> fault for every request
        self.requests: collections.Counter[str] = collections.Counter()
        self.arrived = asyncio.Event()  # set by every request
        self.held = asyncio.Event()  # set when a "landed-held" request got its answer
        self._session: aiohttp.ClientSession | None = None
        self._stopping = asyncio.Event()  # releases the requests held "silent"
        self.delay = 0.0  # seconds every request waits before it is passed on
        # The last answer of each path's requests passed on (for "replay").
        self._answered: dict[str, tuple[int, bytes, str]] = {}

    def fail(self, suffix: str, *faults: str) -> None:
        """The next requests whose path ends with `suffix` meet `faults`, in order."""
        assert set(faults) <= FAULTS, faults
        self._plan[suffix].extend(faults)

    def _fault(self, path: str) -> str | None:
        for suffix, queue in self._plan.items():
            if path.endswith(suffix) and queue:
                return queue.popleft()
        return next((f for s, f in self.always.items() if path.endswith(s)), None)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests[request.path] += 1
        self.arrived.set()
        fault = self._fault(request.path)
        if fault in PAGES:
            return web.Response(status=int(fault), text=HTML, content_type="text/html")
        if fault == "html":
            return web.Response(status=200, text=HTML, content_type="text/html")
        if fault == "silent":
            await self._stopping.wait()
            return web.Response(status=504, text=HTML, content_type="text/html")
        if fault == "replay":
            status, body, content_type = self._answered[request.path]
            return web.Response(status=status, body=body, content_type=content_type)
        assert self._session is not None
        if self.delay:
            await asyncio.sleep(self.delay)  # a slow network, not synchronisation
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            data=await request.read(),
            headers=headers,
        ) as upstream:
            data = await upstream.read()
            status, content_type = upstream.status, upstream.content_type
        self._answered[request.path] = (status, data, content_type)
        if fault == "landed-502":
            return web.Response(status=502, text=HTML, content_type="text/html")
        if fault == "landed-held":
            self.held.set()
            await self._stopping.wait()
        if fault == "cut":
            response = web.StreamResponse(status=status)
            response.content_type = content_type
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        return web.Response(status=status, body=data, content_type=content_type)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FaultProxy]:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            self._stopping.set()
            await runner.cleanup()
            await self._session.close()
