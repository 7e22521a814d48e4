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


async def test_another_sites_page_cannot_ask_for_a_fresh_overview(
    start_broker: StartBroker,
) -> None:
    """GET /ui/overview?fresh=T was exempt from the cross-site check (a GET):
    on a broker without a token whose workers ack through it (each ack marks
    T changed), another site's page could force a computation and a store
    read of T at every change, and take the fresh read the page's own
    refresh asked for (review of the status page, round 25). `fresh` asks
    what an action does: from another site's page it is refused (403); the
    overview itself, which such a page cannot read, is not."""
    broker = await start_broker(MemStore())
    await broker.engine.enqueue("t", [JobSpec(1)])
    base = f"http://127.0.0.1:{broker.http.port}"  # type: ignore[union-attr]
    url = base + "/ui/overview"
    foreign = [{"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"}]
    own = [{}, {"Sec-Fetch-Site": "same-origin"}, {"Origin": base}]
    async with aiohttp.ClientSession() as s:
        for headers in foreign + own:
            async with s.get(url, headers=headers) as r:
                assert r.status == 200, (headers, r.status)
        for headers in foreign:
            async with s.get(url + "?fresh=t", headers=headers) as r:
                assert r.status == 403, (headers, r.status, (await r.text())[:120])
        for headers in own:
            async with s.get(url + "?fresh=t", headers=headers) as r:
                assert r.status == 200, (headers, r.status, (await r.text())[:120])


async def test_touched_grows_without_bound_from_requests_that_change_nothing(
    start_broker: StartBroker,
) -> None:
    """Every non-GET request marked its topic touched whatever its answer (a
    400 for an invalid name, a 404): once a page had loaded the overview, the
    set grew without bound, and each mark bought a fresh store read without a
    change (review of f041221). Only requests that succeeded mark now."""
    broker = await start_broker(MemStore())
    base = f"http://127.0.0.1:{broker.http.port}"  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/ui/overview") as r:
            assert r.status == 200
        statuses = set()
        for i in range(300):
            # an invalid topic name (400) and a valid never-written one with a bad body
            async with s.post(f"{base}/topics/no.such.{i}.{'x' * 200}/ack", data=b"{") as r:
                statuses.add(r.status)
            async with s.post(f"{base}/topics/never{i}/ack", data=b"not json") as r:
                statuses.add(r.status)
    assert broker.http_api is not None
    touched = broker.http_api.page._touched
    assert all(s >= 400 for s in statuses), statuses
    assert len(touched) < 10, (
        f"{len(touched)} names marked touched by 600 refused requests (answers "
        f"{sorted(statuses)}): the set grows without bound, e.g. {sorted(touched)[:2]}"
    )


async def test_touched_keeps_only_topics_the_overview_shows(start_broker: StartBroker) -> None:
    """A requeue, cancel, purge or refresh of a topic that does not exist
    answers 200 (nothing done): each marked its name touched, and only an
    overview asked fresh for that very name took it out, so the set grew with
    every name ever named so (review of the memory, round 23). Only a topic
    the last overview showed is marked: the page acts on no other."""
    broker = await start_broker(MemStore())
    await broker.engine.enqueue("t", [JobSpec(1)])
    base = f"http://127.0.0.1:{broker.http.port}"  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/ui/overview") as r:
            assert r.status == 200
        statuses = set()
        for i in range(600):
            async with s.post(f"{base}/topics/nosuch{i}/requeue", data=b"{}") as r:
                statuses.add(r.status)
        async with s.post(f"{base}/topics/t/requeue", data=b"{}") as r:
            statuses.add(r.status)
    assert broker.http_api is not None
    assert statuses == {200}
    touched = broker.http_api.page._touched
    assert set(touched) == {"t"}, (
        f"{len(touched)} topics marked touched, e.g. {sorted(touched)[:2]}"
    )


@pytest.mark.parametrize(
    ("advertised", "origin"),
    [
        ("http://queue.lan:80", "http://queue.lan"),
        ("https://queue.lan:443/", "https://queue.lan"),
    ],
)
async def test_the_pages_own_origin_is_its_advertised_urls_however_spelt(
    start_broker: StartBroker, advertised: str, origin: str
) -> None:
    """Origin was compared with the advertised URL's netloc as a string: one
    with its scheme's default port (which browsers never write in Origin)
    refused the page's own POSTs behind a proxy (review of f041221). Origins
    are compared as (scheme, host, port), default ports spelt out."""
    broker = await start_broker(MemStore(), advertise_url=advertised)
    port = broker.http.port  # type: ignore[union-attr]
    headers = {"Host": f"127.0.0.1:{port}", "Origin": origin, "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{port}/topics/t/requeue", data=b"{}", headers=headers) as r,
    ):
        body = await r.text()
    assert r.status != 403, (r.status, body[:160])


async def test_an_advertised_https_origin_accepts_the_same_host_over_plain_http(
    start_broker: StartBroker,
) -> None:
    """The scheme was not compared: with --advertise-url https://queue.lan, a
    POST whose Origin is http://queue.lan (a page anyone on the path can
    serve over plain http) was taken for the broker's own (review)."""
    broker = await start_broker(MemStore(), advertise_url="https://queue.lan")
    port = broker.http.port  # type: ignore[union-attr]
    headers = {
        "Host": f"127.0.0.1:{port}",
        "Origin": "http://queue.lan",
        "Content-Type": "application/json",
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{port}/topics/t/requeue", data=b"{}", headers=headers) as r,
    ):
        status = r.status
    assert status == 403, f"a POST from Origin http://queue.lan was answered {status}, not refused"
