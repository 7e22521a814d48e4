"""Requests another site's page makes through the operator's browser: refused
when they would change something (CSRF), and a rebound host name refused on a
loopback broker (review findings, round 21). Real brokers over real sockets,
headless Chromium through the fixtures of tests/test_status_page.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web

from simplequeue.api import JobSpec
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


@pytest.mark.parametrize("host", ["localhost.", "app.localhost.", "LOCALHOST."])
async def test_a_fully_qualified_localhost_is_this_machine(
    start_broker: StartBroker, host: str
) -> None:
    """'localhost.' (the FQDN form, RFC 6761: always loopback, never
    rebindable) was refused, its trailing dot kept (review of 06d5248)."""
    broker = await start_broker(MemStore())
    port = broker.url.rsplit(":", 1)[1]
    headers = {"Host": f"{host}:{port}"}
    async with aiohttp.ClientSession() as s, s.get(broker.url + "/healthz", headers=headers) as r:
        assert r.status == 200, (host, r.status, (await r.text())[:100])


async def test_a_malformed_host_or_origin_is_answered_not_an_unhandled_exception(
    start_broker: StartBroker,
) -> None:
    """urlsplit() raises ValueError on 'Origin: http://[x', which escaped
    HttpApi: 500 "internal error" and a logged traceback per request, which
    any client could fill the log with (review of 06d5248). Refused, 403."""
    broker = await start_broker(MemStore())
    reader, writer = await asyncio.open_connection("127.0.0.1", int(broker.url.rsplit(":", 1)[1]))
    try:
        writer.write(
            b"POST /topics/t/requeue HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Origin: http://[x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status = answer.split(b"\r\n", 1)[0]
    assert b" 403 " in status, answer[:300]


async def test_the_status_page_s_own_post_through_a_plain_http_proxy_that_sets_host_passes(
    start_broker: StartBroker,
) -> None:
    """Browsers send Sec-Fetch-Site only to potentially trustworthy origins
    (https, localhost): through a plain-http proxy (http://queue.lan, nginx's
    default Host of 127.0.0.1:PORT) the page's own Requeue carried only
    Origin: http://queue.lan, which was compared with Host and refused
    (review of 06d5248). The broker's --advertise-url is its own origin too."""
    broker = await start_broker(MemStore(), advertise_url="http://queue.lan")
    await broker.engine.enqueue("t", [JobSpec(1)])
    assert broker.http is not None
    listening = f"http://127.0.0.1:{broker.http.port}"  # the proxy's way in
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            listening + "/topics/t/requeue",
            data=b"{}",
            headers={
                "Content-Type": "application/json",
                "Origin": "http://queue.lan",
                "X-Forwarded-Host": "queue.lan",
                "X-Forwarded-Proto": "http",
            },
        ) as r,
    ):
        assert r.status == 200, (r.status, (await r.text())[:120])
