"""Requests another site's page makes through the operator's browser: refused
when they would change something (CSRF), and a rebound host name refused on a
loopback broker (review findings, round 21). Real brokers over real sockets,
headless Chromium through the fixtures of tests/test_status_page.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web

from simplequeue.objstore.memfs import MemStore
from tests import test_status_page as status_page
from tests.test_status_page import Api, PageErrors, StartBroker

# That module's fixtures, used here too.
browser, session, tab = status_page.browser, status_page.session, status_page.tab

if TYPE_CHECKING:
    from playwright.async_api import Page


@pytest.fixture
async def attacker() -> AsyncIterator[tuple[list[str], Any]]:
    """A web site on another origin (another port of 127.0.0.1): serves
    whatever HTML the test sets."""
    html: list[str] = ["<p>nothing</p>"]

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=html[0], content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield html, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


# --- security ----------------------------------------------------------------------------


async def test_a_cross_site_page_cannot_requeue_dead_jobs_or_enqueue_on_a_broker_without_token(
    start_broker: StartBroker,
    session: aiohttp.ClientSession,
    tab: tuple[Page, PageErrors],
    attacker: tuple[list[str], str],
) -> None:
    """Without --token (the default, bound to 127.0.0.1), any web site the
    operator visited could POST to the broker: the API decodes a text/plain
    body as JSON (a "simple" request, no CORS preflight) and an empty requeue
    body means "every dead job". The operator's browser was the bridge. A
    request that says it came from another site's page is refused (403)."""
    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    await api.kill("billing", "card declined", id="invoice-1")
    html, origin = attacker
    html[0] = f"""<!doctype html><title>cat pictures</title><script>
      Promise.all([
        fetch("{broker.url}/topics/billing/requeue", {{method: "POST", mode: "no-cors"}}),
        fetch("{broker.url}/topics/billing/enqueue", {{method: "POST", mode: "no-cors",
              body: JSON.stringify({{id: "planted", payload: {{"rm": "-rf /"}}}})}}),
      ]).finally(() => {{ document.title = "sent"; }});
    </script>"""
    page, _ = tab
    await page.goto(origin + "/")
    from playwright.async_api import expect

    await expect(page).to_have_title("sent")
    counts = await api.status("billing")
    assert (counts["dead"], counts["pending"]) == (1, 0), (
        f"a page on {origin} changed the queue: {counts}"
    )


async def test_the_broker_refuses_a_request_addressed_to_another_host_name(
    start_broker: StartBroker, session: aiohttp.ClientSession
) -> None:
    """Nothing checked the Host header, so a DNS-rebinding page (evil.example
    re-pointed at 127.0.0.1) was same-origin with the broker and could read
    /ui/overview (every payload and error) and call every route. A broker
    listening on loopback answers only requests that name this machine."""
    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    await api.enqueue("secrets", payload={"api_key": "AKIA-EXAMPLE"})
    port = broker.url.rsplit(":", 1)[1]
    async with session.get(
        broker.url + "/ui/overview", headers={"Host": f"evil.example:{port}"}
    ) as r:
        body = await r.read()
        assert r.status in (400, 403, 421), (r.status, body[:120])
    for name in ("localhost", "127.0.0.1", "[::1]", "app.localhost"):
        async with session.get(broker.url + "/healthz", headers={"Host": f"{name}:{port}"}) as r:
            assert r.status == 200, name
