"""The live status page (`GET /`), driven in headless Chromium against a live
in-process broker, plus its JSON endpoint and rate history without a browser.

The browser is Debian's /usr/bin/chromium (bin/install-chromium installs it),
driven by Playwright, which never downloads a browser of its own. Without it
the browser tests skip, unless SIMPLEQUEUE_REQUIRE_BROWSER=1 (bin/test sets
it), in which case they fail. The screenshot lands in test-artifacts/.
"""

from __future__ import annotations

import gzip
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import pytest
from prometheus_client import generate_latest

from simplequeue.api import JobSpec
from simplequeue.broker import http
from simplequeue.broker import page as status_page
from simplequeue.broker.page import RateBook, RatePoint
from simplequeue.objstore.memfs import MemStore

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

CHROMIUM = Path(os.environ.get("SIMPLEQUEUE_CHROMIUM", "/usr/bin/chromium"))
# As the machine's notes prescribe; without the background-networking flags
# Chromium keeps dialling out of a closed network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
WAIT_MS = 10_000  # the page polls every 2 s; a condition gets a few polls

StartBroker = Callable[..., Awaitable[Any]]


# --- helpers ---------------------------------------------------------------------------


class Api:
    """Just enough of the HTTP API to set the scene: raises on an error status."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str | None = None) -> None:
        self.session, self.url = session, url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        data = orjson.dumps(body) if body is not None else None
        async with self.session.request(
            method, self.url + path, data=data, headers=self.headers
        ) as r:
            answer = orjson.loads(await r.read())
            assert r.status < 400, (method, path, r.status, answer)
            return answer

    async def enqueue(self, topic: str, **job: Any) -> str:
        job.setdefault("payload", {"n": 1})
        answer = await self.call("POST", f"/topics/{topic}/enqueue", job)
        job_id: str = answer["id"]
        return job_id

    async def claim(self, topic: str, worker: str, count: int = 1) -> list[dict[str, Any]]:
        body = {"worker_id": worker, "count": count}
        jobs: list[dict[str, Any]] = (await self.call("POST", f"/topics/{topic}/claim", body))[
            "jobs"
        ]
        return jobs

    async def ack(self, topic: str, job: dict[str, Any]) -> None:
        body = {"job_id": job["id"], "lease_token": job["lease_token"]}
        await self.call("POST", f"/topics/{topic}/ack", body)

    async def fail(self, topic: str, job: dict[str, Any], error: str) -> None:
        body = {"job_id": job["id"], "lease_token": job["lease_token"], "error": error}
        await self.call("POST", f"/topics/{topic}/nack", body)

    async def status(self, topic: str) -> dict[str, int]:
        counts: dict[str, int] = await self.call("GET", f"/topics/{topic}/status")
        return counts

    async def kill(self, topic: str, error: str, **job: Any) -> str:
        """Enqueue a job that dies on its first failure, and fail it."""
        job_id = await self.enqueue(topic, max_attempts=1, **job)
        [claimed] = await self.claim(topic, "doomed-worker")
        assert claimed["id"] == job_id
        await self.fail(topic, claimed, error)
        return job_id


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def require_browser() -> None:
    """Skip without Chromium or Playwright; fail instead under
    SIMPLEQUEUE_REQUIRE_BROWSER=1, so that CI never passes by skipping."""
    missing = ""
    if not os.access(CHROMIUM, os.X_OK):
        missing = f"{CHROMIUM} is missing: run bin/install-chromium"
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            missing = "the playwright package is missing: pip install -e '.[test]'"
    if missing:
        if os.environ.get("SIMPLEQUEUE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{missing} (SIMPLEQUEUE_REQUIRE_BROWSER=1)")
        pytest.skip(missing)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    require_browser()
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=WAIT_MS)
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield launched
        finally:
            await launched.close()


PageErrors = list[str]


@pytest.fixture
async def tab(browser: Browser) -> AsyncIterator[tuple[Page, PageErrors]]:
    """A fresh tab (own context: own sessionStorage) and the script errors it raised."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    opened = await context.new_page()
    errors: PageErrors = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened, errors
    await context.close()


def row(page: Page, topic: str) -> Any:
    return page.locator(f'#topics tr[data-topic="{topic}"]')


def count_cell(page: Page, topic: str, name: str) -> Any:
    return row(page, topic).locator(f'[data-count="{name}"]')


def card(page: Page, topic: str) -> Any:
    return page.locator(f'#details section[data-topic="{topic}"]')


async def find(topic_card: Any, job_id: str) -> Any:
    """Look `job_id` up with the card's Find form; the box that shows it."""
    finder = topic_card.locator('form[data-form="find"]')
    await finder.locator('input[name="job_id"]').fill(job_id)
    await finder.get_by_role("button", name="Find").click()
    return topic_card.locator('[data-field="found"]')


def is_overview(response: Any) -> bool:
    return response.url.endswith("/ui/overview") and response.request.method == "GET"


async def next_overview(page: Page) -> dict[str, Any]:
    """The page's next poll of /ui/overview, once it answered."""
    async with page.expect_response(is_overview) as info:
        pass
    response = await info.value
    data: dict[str, Any] = await response.json()
    return data


async def freeze_polling(page: Page) -> None:
    """Stops the page's own 2 s timer (Playwright's clock), so that only the
    refreshes an action itself makes run: what the page shows then is what
    that action's refresh drew."""
    now = await page.evaluate("Date.now()")
    await page.clock.pause_at(now + 50)


def _luminance(rgb: tuple[int, int, int]) -> float:
    def channel(c: int) -> float:
        v = c / 255
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


async def expect_counts(page: Page, topic: str, **counts: int) -> None:
    from playwright.async_api import expect

    for name, value in counts.items():
        await expect(count_cell(page, topic, name)).to_have_text(f"{value:,}")


# --- the page in a browser -------------------------------------------------------------------


async def test_page_shows_every_topic_its_counts_jobs_and_the_broker(
    start_broker: StartBroker,
    session: aiohttp.ClientSession,
    tab: tuple[Page, PageErrors],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from playwright.async_api import expect

    monkeypatch.setattr(status_page, "SAMPLE_EVERY", 0.5)  # a chart within seconds
    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    await api.kill("orders", "ValueError: card declined", id="order-bad", payload={"sku": 9})
    for n in range(1, 5):
        await api.enqueue("orders", id=f"order-{n}", payload={"sku": n, "qty": 2})
    await api.enqueue("orders", id="order-later", delay=300)
    first, held = await api.claim("orders", "worker-7", count=2)
    await api.ack("orders", first)
    await api.enqueue("emails", payload={"to": "ops@example.com"})
    await api.enqueue("emails", payload={"to": "dev@example.com"})

    page, errors = tab
    await page.goto(broker.url + "/")
    await expect(page).to_have_title(re.compile("simplequeue"))
    await expect_counts(page, "orders", pending=2, delayed=1, claimed=1, completed=1, dead=1)
    await expect_counts(page, "emails", pending=2, delayed=0, claimed=0, completed=0, dead=0)
    await expect(row(page, "orders").locator('[data-field="oldest"]')).to_have_text(
        re.compile(r"^\d+s$")
    )

    orders = card(page, "orders")
    claimed = orders.locator(f'table.claimed tr[data-job="{held["id"]}"]')
    await expect(claimed.locator('[data-field="worker"]')).to_have_text("worker-7")
    await expect(claimed.locator('[data-field="lease"]')).to_have_text(re.compile(r"^[23]\ds$"))
    dead = orders.locator('table.dead tr[data-job="order-bad"]')
    await expect(dead.locator('[data-field="error"]')).to_have_text("ValueError: card declined")
    await expect(dead.locator('[data-field="payload"]')).to_have_text('{"sku":9}')

    mine = page.locator('[data-role="this-broker"]')
    await expect(mine.locator('[data-field="broker-id"]')).to_have_text(broker.settings.broker_id)
    await expect(mine.locator('[data-field="broker-epoch"]')).to_have_text("1")
    await expect(mine).to_contain_text("active")
    record = page.locator('[data-role="broker-json"]')
    await expect(record.locator('[data-field="active-id"]')).to_have_text(broker.settings.broker_id)
    await expect(record).to_contain_text(broker.url)

    # Traffic while the page watches, so that the rate charts have something to draw.
    await api.call("POST", "/topics/emails/enqueue", {"jobs": [{"payload": i} for i in range(40)]})
    await expect_counts(page, "emails", pending=42)
    for job in await api.claim("emails", "mailer-1", count=25):
        await api.ack("emails", job)
    await expect_counts(page, "emails", pending=17, completed=25)
    enq_line = card(page, "emails").locator("svg.big path.enqueued")
    await expect(enq_line).to_have_attribute("d", re.compile(r"^M.*L.*L"))
    await expect(card(page, "emails").locator('[data-field="rates-now"]')).to_contain_text("/s")

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert errors == []


async def test_page_updates_by_itself_when_jobs_are_enqueued_claimed_and_acked(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    from playwright.async_api import expect

    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    page, errors = tab
    await page.goto(broker.url + "/")
    await expect(page.locator("#no-topics")).to_be_visible()

    await api.enqueue("live", id="job-1")
    await expect_counts(page, "live", pending=1, claimed=0, completed=0)
    await expect(page.locator("#no-topics")).to_be_hidden()

    [job] = await api.claim("live", "worker-blue")
    await expect_counts(page, "live", pending=0, claimed=1)
    claimed_row = card(page, "live").locator('table.claimed tr[data-job="job-1"]')
    await expect(claimed_row.locator('[data-field="worker"]')).to_have_text("worker-blue")

    await api.ack("live", job)
    await expect_counts(page, "live", pending=0, claimed=0, completed=1)
    await expect(claimed_row).to_have_count(0)
    await expect(card(page, "live").locator('[data-empty="claimed"]')).to_be_visible()
    assert errors == []


async def test_an_operator_filters_the_topics_by_the_start_of_their_names(
    start_broker: StartBroker,
    session: aiohttp.ClientSession,
    tab: tuple[Page, PageErrors],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past MAX_TOPICS the page said "… and N more topics not shown" and
    nothing reached them. Typing the start of a name shows those topics (and
    says how many more start so); the address keeps it for a reload; what no
    name could start with is said, and not sent."""
    from playwright.async_api import expect

    monkeypatch.setattr(status_page, "MAX_TOPICS", 2)
    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    for name in ("billing", "emails", "orders-eu", "orders-us", "orders-za"):
        await api.enqueue(name)
    page, errors = tab
    await page.goto(broker.url + "/")
    topics = page.locator("#topics tbody tr")
    await expect(topics).to_have_count(2)
    await expect(page.locator("#more-topics")).to_have_text(
        "… and 3 more topics not shown: type more of a name above"
    )

    await page.locator("#topic-filter").fill("orders-")
    await expect_counts(page, "orders-eu", pending=1)
    await expect(topics).to_have_count(2)
    await expect(row(page, "billing")).to_have_count(0)
    await expect(page.locator("#more-topics")).to_contain_text(
        "1 more topic starting with “orders-”"
    )
    assert page.url.endswith("/?prefix=orders-")

    await page.reload()  # the filter stays
    await expect(page.locator("#topic-filter")).to_have_value("orders-")
    await expect_counts(page, "orders-us", pending=1)
    await expect(row(page, "billing")).to_have_count(0)

    await page.locator("#topic-filter").fill("orders/")
    # Said as it is typed (a live region), not only when the field is focused again.
    await expect(page.get_by_role("alert")).to_contain_text("no topic starts with that")
    await expect(page.locator("#topic-filter")).to_have_attribute("aria-invalid", "true")
    await page.locator("#topic-filter").fill("x")
    await expect(page.locator("#no-topics")).to_have_text("No topic's name starts with “x”.")
    await expect(page.locator("#filter-error")).to_be_hidden()
    await page.locator("#topic-filter").fill("")
    await expect(row(page, "billing")).to_have_count(1)
    assert errors == []


async def test_requeue_button_moves_a_dead_job_back_to_pending(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    from playwright.async_api import expect

    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    await api.kill("billing", "timeout talking to the bank", id="invoice-42")
    await api.kill("billing", "still broken", id="invoice-43")
    page, errors = tab
    await page.goto(broker.url + "/")
    await expect_counts(page, "billing", pending=0, dead=2)

    dead = card(page, "billing").locator('table.dead tr[data-job="invoice-42"]')
    await dead.get_by_role("button", name="Requeue").click()
    await expect_counts(page, "billing", pending=1, dead=1)
    await expect(dead).to_have_count(0)
    await expect(
        card(page, "billing").locator('table.dead tr[data-job="invoice-43"]')
    ).to_have_count(1)
    counts = await api.status("billing")
    assert (counts["pending"], counts["dead"]) == (1, 1)
    [again] = await api.claim("billing", "w")
    assert (again["id"], again["attempts"]) == ("invoice-42", 1)  # attempts start afresh
    assert errors == []


async def test_payloads_errors_and_ids_with_markup_are_shown_as_text(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    from playwright.async_api import expect

    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    evil_id = '<img src=x onerror="window.__pwned=1">'
    evil_payload = {"html": "<script>window.__pwned=2</script>"}
    evil_error = "</td></tr><script>window.__pwned=3</script><b>bold</b>"
    await api.kill("inbox", evil_error, id=evil_id, payload=evil_payload)
    await api.enqueue("inbox", id="<svg onload=window.__pwned=4>", payload="<script>x()</script>")
    await api.claim("inbox", "<i>worker</i>")

    page, errors = tab
    await page.goto(broker.url + "/")
    inbox = card(page, "inbox")
    dead = inbox.locator("table.dead tbody tr")
    await expect(dead.locator("td.id")).to_have_text(evil_id)
    await expect(dead.locator('[data-field="error"]')).to_have_text(evil_error)
    await expect(dead.locator('[data-field="payload"]')).to_have_text(
        orjson.dumps(evil_payload).decode()
    )
    claimed = inbox.locator("table.claimed tbody tr")
    await expect(claimed.locator("td.id")).to_have_text("<svg onload=window.__pwned=4>")
    await expect(claimed.locator('[data-field="worker"]')).to_have_text("<i>worker</i>")
    await expect(claimed.locator('[data-field="payload"]')).to_have_text('"<script>x()</script>"')

    assert await page.evaluate("window.__pwned") is None
    # Nothing from the jobs became an element: only the page's own script,
    # no <img>, <b>, <i> or <svg onload>.
    assert await page.locator("script").count() == 1
    assert await page.locator("img, b, i, svg[onload]").count() == 0
    assert errors == []


async def test_with_a_token_the_page_asks_once_and_keeps_it_for_the_tab(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    from playwright.async_api import expect

    broker = await start_broker(MemStore(), token="s3cret")
    api = Api(session, broker.url, token="s3cret")
    await api.kill("guarded", "boom", id="guarded-dead")
    await api.enqueue("guarded", payload={"secret": True})
    page, errors = tab
    await page.goto(broker.url + "/")
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#content")).to_be_hidden()

    await page.locator("#token").fill("guess")
    await page.get_by_role("button", name="Show status").click()
    await expect(page.locator("#login-error")).to_contain_text("refused")

    await page.locator("#token").fill("s3cret")
    await page.get_by_role("button", name="Show status").click()
    await expect_counts(page, "guarded", pending=1)
    await expect(page.locator("#login")).to_be_hidden()
    assert await page.evaluate("sessionStorage.getItem('simplequeue.token')") == "s3cret"

    await page.reload()  # the same tab: no second prompt
    await expect_counts(page, "guarded", pending=1, dead=1)
    await expect(page.locator("#login")).to_be_hidden()
    assert "s3cret" not in page.url

    # The requeue button sends the same bearer token.
    await card(page, "guarded").get_by_role("button", name="Requeue", exact=True).click()
    await expect_counts(page, "guarded", pending=2, dead=0)

    other = await page.context.browser.new_page()  # type: ignore[union-attr]
    try:  # another tab (a fresh context) is asked again
        await other.goto(broker.url + "/")
        await expect(other.locator("#login")).to_be_visible()
    finally:
        await other.close()
    assert errors == []


async def test_a_token_a_browser_cannot_send_is_refused_at_once_and_an_accented_one_works(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    """A token pasted with a curly quote made fetch() throw before sending: the
    page said "broker unreachable", kept the token and polled on, for good
    (even a reload kept it). A token with an accented letter, which the API
    takes as UTF-8, was refused to the page: a browser sends headers as
    ISO-8859-1."""
    from playwright.async_api import expect

    broker = await start_broker(MemStore(), token="café")
    await Api(session, broker.url, token="café").enqueue("inbox")
    page, errors = tab
    await page.goto(broker.url + "/")
    await page.locator("#token").fill("café\u2019")
    await page.get_by_role("button", name="Show status").click()
    await expect(page.locator("#login-error")).to_contain_text("cannot send")
    assert await page.evaluate("sessionStorage.getItem('simplequeue.token')") is None
    await page.locator("#token").fill("café")
    await page.get_by_role("button", name="Show status").click()
    await expect_counts(page, "inbox", pending=1)
    assert errors == []


async def test_a_topic_read_again_after_an_error_loses_its_alarm(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    """An unreadable topic's oldest-pending cell turned red and stayed red once
    its head was mended, for as long as the tab stayed open."""
    from playwright.async_api import expect

    store = MemStore()
    broker = await start_broker(store)
    await Api(session, broker.url).enqueue("mended")
    good, _ = await store.get("topics/mended.json")
    page, _ = tab
    await page.goto(broker.url + "/")
    await expect_counts(page, "mended", pending=1)
    cell = row(page, "mended").locator('[data-field="oldest"]')
    await store.put("topics/mended.json", b"{not json")
    await broker.engine.refresh("mended")
    await expect(cell).to_have_class("num alert")
    await store.put("topics/mended.json", good)
    await broker.engine.refresh("mended")
    await expect_counts(page, "mended", pending=1)
    await expect(cell).not_to_have_class("num alert")


# --- the endpoints, without a browser -----------------------------------------------------


async def test_the_page_is_public_but_its_data_needs_the_token(
    start_broker: StartBroker, session: aiohttp.ClientSession
) -> None:
    broker = await start_broker(MemStore(), token="s3cret")
    for path, kind in [
        ("/", "text/html"),
        ("/static/app.js", "text/javascript"),
        ("/static/style.css", "text/css"),
        ("/static/favicon.svg", "image/svg+xml"),
    ]:
        async with session.get(broker.url + path) as r:
            assert r.status == 200, path
            assert r.content_type == kind
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            etag = r.headers["ETag"]
        async with session.get(broker.url + path, headers={"If-None-Match": etag}) as r:
            assert r.status == 304
    async with session.get(broker.url + "/static/nope.js") as r:
        assert r.status == 404
        assert "error" in await r.json()
    async with session.get(broker.url + "/ui/overview") as r:
        assert r.status == 401
    overview = await Api(session, broker.url, token="s3cret").call("GET", "/ui/overview")
    assert overview["topics"] == []
    assert overview["broker"]["id"] == broker.settings.broker_id


async def test_the_page_script_never_writes_markup() -> None:
    script = (Path(status_page.__file__).parent / "static" / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script


async def test_overview_lists_counts_ages_claims_and_dead_jobs_within_bounds(
    start_broker: StartBroker, session: aiohttp.ClientSession
) -> None:
    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    started = time.time()
    extra = 5
    jobs = [{"id": f"j{i:03d}", "payload": i} for i in range(status_page.MAX_LISTED + extra)]
    await api.call("POST", "/topics/big/enqueue", {"jobs": jobs})
    await api.claim("big", "w", count=len(jobs))
    await api.kill("big", "x" * 5000, id="dead-1")
    await api.enqueue("big", id="waiting")
    await api.enqueue("later", delay=600)

    overview = await api.call("GET", "/ui/overview")
    by_name = {t["name"]: t for t in overview["topics"]}
    assert sorted(by_name) == ["big", "later"]
    big = by_name["big"]
    assert big["counts"]["claimed"] == len(jobs)
    assert len(big["claimed"]) == status_page.MAX_LISTED
    assert big["claimed_more"] == extra
    assert {c["worker"] for c in big["claimed"]} == {"w"}
    assert all(0 < c["lease_left"] <= 30 for c in big["claimed"])
    assert 0 <= big["oldest_pending_age"] <= time.time() - started + 1
    [dead] = big["dead"]
    assert dead["id"] == "dead-1"
    assert len(dead["last_error"]) == status_page.ERROR_CHARS
    assert by_name["later"]["oldest_pending_age"] is None  # only delayed jobs
    assert overview["record"]["broker_id"] == broker.settings.broker_id
    assert overview["record"]["stale"] is False
    assert overview["broker"]["active"] is True


def store_requests(broker: Any, kind: str) -> float:
    """The broker's count of store requests of `kind` that succeeded."""
    for line in generate_latest(broker.metrics.registry).decode().splitlines():
        if line.startswith("simplequeue_store_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if labels.get("kind") == kind and labels.get("outcome") == "ok":
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _fifty_topics_shown(start_broker: StartBroker) -> tuple[Any, list[str], float]:
    """A broker with 50 topics of a job each, its page's first overview
    computed: the broker, the topics, and its store GETs so far."""
    broker = await start_broker(MemStore())
    names = [f"t{i:03d}" for i in range(50)]
    for name in names:
        await broker.engine.enqueue(name, [JobSpec(1)])
    await broker.http_api.page.compute()
    return broker, names, store_requests(broker, "get")


async def test_a_page_left_open_does_not_read_every_topics_head_at_each_refresh(
    start_broker: StartBroker,
) -> None:
    """Each refresh (every 2 s) read the head of every topic shown from the
    store, cached or not: 50 GETs a refresh for 50 idle topics, some 100 a
    second for the 200 a page shows (SPEC 4.1). A head read lately is not
    read again for READ_EVERY seconds."""
    broker, names, before = await _fifty_topics_shown(start_broker)
    page = broker.http_api.page
    overview = await page.compute()
    assert store_requests(broker, "get") == before
    assert [t.name for t in overview.topics] == names


async def _dead_jobs(broker: Any, topic: str, n: int, size: int) -> None:
    """`n` dead jobs of `size`-character payloads in `topic`, dying one a write."""
    engine = broker.engine
    blob = "x" * size
    for i in range(n):
        await engine.enqueue(topic, [JobSpec({"blob": blob, "i": i}, max_attempts=1)])
        [job] = await engine.claim(topic, "w", count=1)
        await engine.nack(topic, job["id"], job["lease_token"], 0, "boom")


async def test_topics_whose_dead_jobs_each_fit_the_cache_are_not_shown_as_unreadable(
    start_broker: StartBroker,
) -> None:
    """Each topic's newest dead jobs read fine on their own (GET /dead), but
    the overview read the 200 topics it shows all at once, whose fetches
    evicted each other's segments: every topic was shown as unreadable ("the
    object cache is too small for this read"), counts "—", card hidden (10
    topics of 100 dead 100 KB jobs under --cache-mb 16; from 26 such topics
    under the default 256 MB; review of the status page, round 27). Topics
    are inspected INSPECT_PARALLEL at a time, as the take-over reads heads.
    Here 8 topics of 100 dead 12 KB jobs (1.2 MB each) under 2 MB."""
    broker = await start_broker(MemStore(), cache_bytes=2 * 1024 * 1024)
    names = [f"t{t}" for t in range(8)]
    for name in names:
        await _dead_jobs(broker, name, 100, 12_000)
    for name in names:
        jobs, count = await broker.engine.dead(name, 0, 100)
        assert (len(jobs), count) == (100, 100)
    shown = (await broker.http_api.page.compute()).topics
    unreadable = [t.name for t in shown if not isinstance(t, status_page.TopicView)]
    assert unreadable == [], f"shown as unreadable: {unreadable}"


async def _troubled_topics(broker: Any, topics: int) -> list[str]:
    """`topics` topics of 200 jobs (300-character payloads) claimed by a
    worker, 100 of which died with a 1,200-character traceback: a downstream
    outage. Their names, in order."""
    engine = broker.engine
    names = [f"t{t:03d}" for t in range(topics)]
    for name in names:
        specs = [JobSpec({"order": i, "note": "y" * 300}, max_attempts=1) for i in range(200)]
        await engine.enqueue(name, specs)
        jobs = await engine.claim(name, "worker", count=200)
        for job in jobs[:100]:
            error = "Traceback (most recent call last):\n" + "z" * 1200
            await engine.nack(name, job["id"], job["lease_token"], 0, error)
    return names


async def test_an_overview_of_many_troubled_topics_lists_a_bounded_number_of_jobs(
    start_broker: StartBroker,
) -> None:
    """The overview's bounds were per topic (100 claimed and 100 dead jobs,
    payloads cut to 240 characters, errors to 1,000) times 200 topics: 40,000
    jobs listed, 35.4 MB of JSON sent to every open tab every 2 s, built on
    the event loop (stalls of 85-204 ms), drawn by Chromium in 31-46 s (review
    of the status page, round 27). MAX_ROWS jobs and MAX_TEXT characters of
    payloads and errors are listed in all, to the topics in order; the rest
    are counted, and each topic cut short says so. Here 12 such topics:
    2,400 jobs, 2.2 MB before."""
    broker = await start_broker(MemStore())
    names = await _troubled_topics(broker, 12)
    response = await broker.http_api.page.overview()
    assert isinstance(response.body, bytes)
    assert len(response.body) < 1_500_000, f"one overview is {len(response.body) / 1e6:.1f} MB"
    topics = orjson.loads(response.body)["topics"]
    assert [t["name"] for t in topics] == names
    rows = sum(len(t["claimed"]) + len(t["dead"]) for t in topics)
    text = sum(
        len(j["payload"]) + len(j.get("last_error") or "")
        for t in topics
        for j in [*t["claimed"], *t["dead"]]
    )
    assert rows <= status_page.MAX_ROWS and text <= status_page.MAX_TEXT
    first, last = topics[0], topics[-1]
    assert (len(first["claimed"]), len(first["dead"]), first["listing_cut"]) == (100, 100, False)
    assert (last["claimed"], last["dead"], last["listing_cut"]) == ([], [], True)
    for t in topics:  # what is not listed is counted
        assert len(t["claimed"]) + t["claimed_more"] == t["counts"]["claimed"] == 100
        assert len(t["dead"]) + t["dead_more"] == t["counts"]["dead"] == 100


class LaterClock:
    """Stands in for the `time` module, its monotonic clock `offset` seconds on."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


async def test_an_open_page_does_not_read_again_idle_topics_this_broker_owns(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each overview read again the head of every topic shown that was not
    written for READ_EVERY seconds, owned here or not: a page left open on a
    broker owning 200 idle topics cost 20 GETs a second, for good (review of
    the status page, round 23). What this broker holds of a topic it owns is
    current: it is read when not held, or handed back (/refresh), only."""
    import simplequeue.groupcommit as groupcommit

    broker, names, before = await _fifty_topics_shown(start_broker)
    page = broker.http_api.page
    monkeypatch.setattr(groupcommit, "time", LaterClock(status_page.READ_EVERY + 1))
    overview = await page.compute()
    assert store_requests(broker, "get") == before
    assert [t.name for t in overview.topics] == names
    broker.engine.forget(names[:3])  # idle: they left memory
    await broker.engine.refresh(names[3])  # another broker wrote it, and said so
    await page.compute()
    assert store_requests(broker, "get") == before + 4


async def test_a_page_left_open_on_idle_topics_does_not_read_their_dead_jobs_at_every_refresh(
    start_broker: StartBroker,
) -> None:
    """README: of a topic this broker owns, an open page reads something only
    when it left memory. But an overview listed each topic's 100 newest dead
    jobs bounded by count only, whatever their size (a batch's claims are
    bounded by bytes too: an eighth of --cache-mb): 10 idle topics of 100
    dead 50 KB jobs under --cache-mb 16 made 5,778 GETs (184 MB) an overview,
    one a second while a tab was open, their segments pushing each other out
    of the cache (review of the status page, round 27). The segments an
    overview's listings read come to Engine.claim_bytes at most; the rest
    are counted. Here 8 topics of 100 dead 12 KB jobs under 2 MB."""
    broker = await start_broker(MemStore(), cache_bytes=2 * 1024 * 1024)
    for t in range(8):
        await _dead_jobs(broker, f"t{t}", 100, 12_000)
    page = broker.http_api.page
    await page.compute()
    before = store_requests(broker, "get")
    overview = await page.compute()  # nothing changed since the last one
    spent = store_requests(broker, "get") - before
    assert spent == 0, f"an overview of 8 idle topics made {spent:.0f} GETs"
    topics = [t for t in overview.topics if isinstance(t, status_page.TopicView)]
    assert len(topics) == 8
    assert all(len(t.dead) + t.dead_more == t.counts.dead == 100 for t in topics)
    listed = sum(len(t.dead) for t in topics)
    assert 0 < listed * 12_000 <= 2 * broker.engine.claim_bytes
    assert topics[0].dead and topics[-1].listing_cut


async def test_a_page_left_open_on_idle_topics_does_not_list_the_store_at_every_refresh(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: "a page left open on idle topics costs the store nothing". Each
    overview listed the store again once 2 s had passed: a LIST every 2 s for
    as long as a tab was open, one per 1,000 topics on S3, and every name
    sorted again on the event loop, to show the first 200 (review of the
    status page, round 25). The listing is kept LIST_EVERY (a minute): topics
    written through this broker show at once, others within that minute."""
    broker = await start_broker(MemStore())
    page = broker.http_api.page
    for name in ("a", "b", "c"):
        await broker.engine.enqueue(name, [JobSpec(1)])
    await page.compute()
    before = store_requests(broker, "list")
    for seconds in range(2, 31, 2):  # a tab's polls over 30 s
        monkeypatch.setattr(status_page, "time", LaterClock(seconds))
        await page.compute()
    spent = store_requests(broker, "list") - before
    assert spent == 0, f"15 refreshes of an idle page listed the store {spent:.0f} times"
    await broker.engine.enqueue("d", [JobSpec(1)])  # through this broker: shown at once
    assert [t.name for t in (await page.compute()).topics] == ["a", "b", "c", "d"]
    monkeypatch.setattr(status_page, "time", LaterClock(status_page.LIST_EVERY + 1))
    await page.compute()
    assert store_requests(broker, "list") == before + 1


async def test_an_overview_during_a_store_outage_shows_the_topics_it_knew_and_says_so(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the listing of topics was due again (LIST_EVERY, a minute) during
    a store outage, it failed, and the whole overview with it: 503 "injected:
    store down" at every poll until the store listed again, the page "broker
    unreachable" exactly when the operator looks (review of the edge). The
    last listing is kept, merged with the topics this broker holds as ever,
    its failure said; it is tried again within LIST_RETRY, not a minute."""
    from tests.helpers.faults import Outage

    store = Outage()
    broker = await start_broker(store)
    page = broker.http_api.page
    await broker.engine.enqueue("a", [JobSpec(1)])
    assert [t.name for t in (await page.compute()).topics] == ["a"]
    store.down = True
    due = status_page.LIST_EVERY + 1
    monkeypatch.setattr(status_page, "time", LaterClock(due))
    overview = await page.compute()
    assert [t.name for t in overview.topics] == ["a"]
    assert overview.listing_failed is not None and "injected: store down" in overview.listing_failed
    with monkeypatch.context() as held:  # the listing kept, not only the topics held
        held.setattr(broker.engine, "known_topics", list)
        assert [t.name for t in (await page.compute()).topics] == ["a"]
    store.down = False
    before = store_requests(broker, "list")
    monkeypatch.setattr(status_page, "time", LaterClock(due + status_page.LIST_RETRY + 1))
    await broker.engine.enqueue("b", [JobSpec(1)])
    overview = await page.compute()
    assert (store_requests(broker, "list"), overview.listing_failed) == (before + 1, None)
    assert [t.name for t in overview.topics] == ["a", "b"]


async def test_the_page_says_when_the_store_s_topics_could_not_be_listed(
    start_broker: StartBroker, tab: tuple[Page, PageErrors], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The overview's listing_failed is said under the topics, which still show."""
    from playwright.async_api import expect

    from tests.helpers.faults import Outage

    store = Outage()
    broker = await start_broker(store)
    await broker.engine.enqueue("a", [JobSpec(1)])
    page, errors = tab
    await page.goto(broker.url + "/")
    await expect(row(page, "a")).to_have_count(1)
    failed = page.locator("#listing-failed")
    await expect(failed).to_be_hidden()
    store.down = True
    monkeypatch.setattr(status_page, "time", LaterClock(status_page.LIST_EVERY + 1))
    await expect(failed).to_contain_text("could not be listed (StoreUnavailable: injected")
    await expect(page.locator("#status")).to_have_class("status ok")
    await expect(row(page, "a")).to_have_count(1)
    store.down = False
    monkeypatch.setattr(status_page, "time", LaterClock(2 * status_page.LIST_EVERY))
    await expect(failed).to_be_hidden()
    assert errors == []


async def test_metrics_report_only_the_topics_this_broker_owns(
    start_broker: StartBroker,
) -> None:
    """A's page read topic t, which B owns, into A's cache; B went on writing
    it, and A's /metrics reported t's jobs as they were when the page looked
    (for up to idle_max, ten minutes), while A's status of t said otherwise."""
    from tests.test_ownership import cluster, owner_and_other

    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    await owner.engine.enqueue("t", [JobSpec(1)])
    await other.http_api.page.compute()  # an operator opens the other's page
    await owner.engine.enqueue("t", [JobSpec(n) for n in range(5)])
    assert 'topic="t"' not in (await other.metrics.scrape()).decode()
    assert (
        'simplequeue_jobs{state="pending",topic="t"} 6.0' in (await owner.metrics.scrape()).decode()
    )


async def test_the_sampler_keeps_rate_history_only_for_the_topics_a_page_shows(
    start_broker: StartBroker,
) -> None:
    """Once a page was opened, the sampler kept a ring of samples (about 30 KB
    full) for every topic the broker held (up to topics_max, 10,000: some
    300 MB), while an overview shows the first MAX_TOPICS (200) by name
    (review of the status page, round 23); before that, for good (SPEC 4.1:
    memory follows the topics in use). A topic shown no more takes its
    history along."""
    broker = await start_broker(MemStore())
    page = broker.http_api.page
    shows = status_page.MAX_TOPICS
    names = [f"t{i:04d}" for i in range(shows + 100)]
    for name in names:
        await broker.engine.enqueue(name, [JobSpec(1)])
    await page.compute()
    page.sample()
    assert set(page.rates._rings) == set(names[:shows])
    firsts = [f"a{i:03d}" for i in range(100)]  # shown before them
    for name in firsts:
        await broker.engine.enqueue(name, [JobSpec(1)])
    await page.compute()
    page.sample()
    assert set(page.rates._rings) == set(firsts + names[: shows - 100])


async def test_an_overview_shows_only_the_topics_starting_with_its_prefix(
    start_broker: StartBroker, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With thousands of topics the page showed the first MAX_TOPICS by name
    and counted the rest, and an operator could not reach any other (left
    alone in round 34). ?prefix= shows those whose names start with it (the
    listing's and those this broker wrote since), topics_total counting
    them; a prefix no name could start with is refused and changes nothing."""
    monkeypatch.setattr(status_page, "MAX_TOPICS", 3)
    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    names = ["billing", "orders-eu", "orders-us", "orders_old", "ordersx", "zeta"]
    for name in names:
        await api.enqueue(name)
    await broker.http_api.page.compute()  # listed: the next ones are written since
    for name in ("orders-asia", "orders-za", "order"):
        await api.enqueue(name)

    def shown(overview: Any) -> tuple[list[str], int]:
        return [t["name"] for t in overview["topics"]], overview["topics_total"]

    everything = await api.call("GET", "/ui/overview")
    assert shown(everything) == (["billing", "order", "orders-asia"], 9)
    orders = await api.call("GET", "/ui/overview?prefix=orders-")
    assert shown(orders) == (["orders-asia", "orders-eu", "orders-us"], 4)
    assert orders["prefix"] == "orders-"
    assert shown(await api.call("GET", "/ui/overview?prefix=orders")) == (
        ["orders-asia", "orders-eu", "orders-us"],
        6,
    )
    assert shown(await api.call("GET", "/ui/overview?prefix=orders_")) == (["orders_old"], 1)
    assert shown(await api.call("GET", "/ui/overview?prefix=nothing")) == ([], 0)
    for bad in ("orders%2F", "a%20b", "x" * 129):
        async with session.get(f"{broker.url}/ui/overview?prefix={bad}") as r:
            status, body = r.status, orjson.loads(await r.read())
        assert (status, "prefix" in body["error"]) == (400, True), (bad, body)
    assert shown(await api.call("GET", "/ui/overview")) == shown(everything)


async def test_two_pages_filtering_on_two_prefixes_keep_both_rate_histories(
    start_broker: StartBroker,
) -> None:
    """Each overview replaced the topics shown, whose rate history alone is
    kept: two tabs filtering on "a" and "b" would each forget the other's
    at every poll, and neither ever drew a rate. The topics shown by the
    overviews of the last SHOWN_FOR seconds are kept; a prefix no overview
    asked for since, and its topics' history, go after it."""
    broker = await start_broker(MemStore())
    page = broker.http_api.page
    for name in ("a1", "a2", "b1", "b2"):
        await broker.engine.enqueue(name, [JobSpec(1)])
    await page.compute(prefix="a")
    await page.compute(prefix="b")
    page.sample()
    assert set(page.rates._rings) == {"a1", "a2", "b1", "b2"}
    shown_at, topics = page._shown_by["a"]
    page._shown_by["a"] = (shown_at - status_page.SHOWN_FOR, topics)  # "a" not asked since
    await page.compute(prefix="b")
    page.sample()
    assert set(page.rates._rings) == {"b1", "b2"}


async def test_a_large_overview_is_sent_gzipped_to_a_client_that_takes_it(
    start_broker: StartBroker, session: aiohttp.ClientSession
) -> None:
    """200 topics with their 10 minutes of rates made an overview of 1.5 MB,
    sent to each open tab every 2 s (left alone in round 34). Gzipped once a
    computation (220 KB) and sent so to a client that takes gzip (every
    browser); as it is to one that does not, or refuses it (q=0)."""
    broker = await start_broker(MemStore())
    page = broker.http_api.page
    names = [f"t{i:03d}" for i in range(200)]
    for name in names:
        await broker.engine.enqueue(name, [JobSpec(1)])
    await page.compute()
    page.rates._rings.clear()  # that overview's own samples: these come first
    now = time.monotonic()
    for name in names:  # 10 minutes of samples, as an open page gathers them
        for k in range(121):
            page.rates.record(name, now - 600 + k * 5, 417 * k, 400 * k)
    url = f"{broker.url}/ui/overview"
    sizes: dict[str, tuple[str | None, int, Any]] = {}
    for accept in ("gzip, deflate, br", "identity", "gzip;q=0"):
        async with session.get(
            url, headers={"Accept-Encoding": accept}, auto_decompress=False
        ) as r:
            raw = await r.read()
            coding = r.headers.get("Content-Encoding")
            body = gzip.decompress(raw) if coding == "gzip" else raw
            sizes[accept] = (coding, len(raw), orjson.loads(body))
    coding, packed, overview = sizes["gzip, deflate, br"]
    assert (coding, sizes["identity"][0], sizes["gzip;q=0"][0]) == ("gzip", None, None)
    assert overview == sizes["identity"][2]  # the same overview
    assert len(overview["topics"]) == 200 and len(overview["topics"][0]["rates"]) >= 100
    assert packed * 4 < sizes["identity"][1], (packed, sizes["identity"][1])


@pytest.mark.parametrize(
    ("header", "takes"),
    [
        ("gzip", True),
        ("deflate, gzip;q=1.0, *;q=0.5", True),
        ("x-gzip", True),
        ("*", True),
        ("GZIP;Q=0.001", True),
        ("", False),
        ("identity", False),
        ("br, deflate", False),
        ("gzip;q=0", False),
        ("gzip;q=0.000", False),
        ("gzip;q=x", False),
        ("*;q=0, gzip", True),
        ("gzip;q=0, *", False),
    ],
)
def test_which_accept_encodings_take_gzip(header: str, takes: bool) -> None:
    assert http.takes_gzip(header) is takes


def test_rate_book_turns_counter_samples_into_rates() -> None:
    book = RateBook(every=5, window=60)
    book.record("t", 100.0, enqueued=0, completed=0)
    book.record("t", 102.0, enqueued=99, completed=99)  # too soon: ignored
    book.record("t", 110.0, enqueued=50, completed=20)
    book.record("t", 120.0, enqueued=50, completed=70)
    assert book.rates("t", now=120.0) == [
        RatePoint(ago=10.0, span=10.0, enqueued=5.0, completed=2.0),
        RatePoint(ago=0.0, span=10.0, enqueued=0.0, completed=5.0),
    ]
    book.record("t", 130.0, enqueued=3, completed=3)  # the topic was recreated
    assert book.rates("t", now=130.0)[-1] == RatePoint(
        ago=0.0, span=10.0, enqueued=0.0, completed=0.0
    )
    assert book.rates("t", now=1000.0) == []  # older than the window
    book.forget_except(set())
    assert book.rates("t", now=130.0) == []


class HandClock:
    """Stands in for the `time` module: a monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


async def test_rates_of_a_topic_another_broker_owns_are_no_sawtooth(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A steady 10 jobs/s into t, which B owns; A's page shows t. A reads t's
    head at most every READ_EVERY (10 s), but sampled its counters every
    SAMPLE_EVERY (5 s), by the sampler (from its cache) and by overviews
    answered from a state read up to 10 s before: every other sample repeated
    the counters last read, stamped now, and the chart said 0/s, 20/s, 0/s...
    (review of the status page, round 23). A sample is stamped with when its
    counters were read: now for a topic this broker owns."""
    import simplequeue.groupcommit as groupcommit
    from tests.test_ownership import cluster, owner_and_other

    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    clock = HandClock()
    monkeypatch.setattr(status_page, "time", clock)
    monkeypatch.setattr(groupcommit, "time", clock)
    pages = [owner.http_api.page, other.http_api.page]
    await owner.engine.enqueue("t", [JobSpec(0)])
    for page in pages:
        await page.compute()  # the other reads t
    for step in range(1, 5):
        clock.now += 6.0
        await owner.engine.enqueue("t", [JobSpec(n) for n in range(60)])  # 10/s
        for page in pages:
            if step % 2:
                page.sample()  # the sampler: t as last read
            else:
                await page.compute()  # past READ_EVERY: the other reads t again
    mine = owner.http_api.page.rates.rates("t", clock.now)
    assert [(p.span, p.enqueued) for p in mine] == [(6.0, 10.0)] * 4
    theirs = other.http_api.page.rates.rates("t", clock.now)
    assert [(p.span, p.enqueued) for p in theirs] == [(12.0, 10.0)] * 2


# --- what an operator does from the page (through the public API) ---------------------------


async def login(page: Page, url: str, token: str) -> None:
    await page.goto(url + "/")
    await page.locator("#token").fill(token)
    await page.get_by_role("button", name="Show status").click()


async def test_an_operator_finds_and_cancels_jobs_and_requeues_and_purges_dead_ones(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    from playwright.async_api import expect

    broker = await start_broker(MemStore(), token="s3cret")
    api = Api(session, broker.url, token="s3cret")
    await api.kill("ops", "boom", id="dead-1")
    await api.kill("ops", "boom", id="dead-2")
    await api.enqueue("ops", id="held", payload={"n": 1})
    [held] = await api.claim("ops", "worker-1")
    await api.enqueue("ops", id="waiting", payload={"<b>": "x"})
    page, errors = tab
    await login(page, broker.url, "s3cret")
    await expect_counts(page, "ops", pending=1, claimed=1, dead=2, cancelled=0)
    ops = card(page, "ops")

    found = await find(ops, "waiting")
    await expect(found.locator('[data-found="status"]')).to_have_text("pending")
    await expect(found.locator('[data-found="payload"]')).to_have_text('{"<b>":"x"}')
    await found.get_by_role("button", name="Cancel job").click()
    await expect(found.locator('[data-found="status"]')).to_have_text("pending")  # not yet
    await found.get_by_role("button", name="Click again to cancel").click()
    await expect(found.locator('[data-found="status"]')).to_have_text("cancelled")
    await expect(found.get_by_role("button", name="Cancel job")).to_have_count(0)

    held_row = ops.locator(f'table.claimed tr[data-job="{held["id"]}"]')
    await held_row.get_by_role("button", name="Cancel").click()
    await expect(held_row.get_by_role("button")).to_have_text("Click again to cancel")
    assert (await api.status("ops"))["claimed"] == 1  # one click cancels nothing
    await held_row.get_by_role("button", name="Click again to cancel").click()
    await expect_counts(page, "ops", pending=0, claimed=0, cancelled=2)

    found = await find(ops, "no-such-job")
    await expect(found.locator('[data-found="error"]')).to_contain_text("no job")

    await ops.get_by_role("button", name="Requeue all").click()
    await expect_counts(page, "ops", pending=2, dead=0)
    for job in await api.claim("ops", "w", count=2):
        await api.fail("ops", job, "boom again")  # max_attempts 1: dead again
    await expect_counts(page, "ops", pending=0, dead=2)
    purge = ops.get_by_role("button", name="Purge all")
    await purge.click()  # arms it
    await expect(ops.locator('button[data-action="purge-all"]')).to_have_text(
        "Click again to purge"
    )
    assert (await api.status("ops"))["dead"] == 2
    await ops.locator('button[data-action="purge-all"]').click()
    await expect_counts(page, "ops", dead=0)
    counts = await api.status("ops")
    assert (counts["cancelled"], counts["dead"], counts["pending"]) == (2, 0, 0)
    assert errors == []


async def test_an_operator_edits_settings_and_schedules(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    from playwright.async_api import expect

    broker = await start_broker(MemStore(), token="s3cret")
    api = Api(session, broker.url, token="s3cret")
    await api.enqueue("ops", payload=1)
    page, errors = tab
    await login(page, broker.url, "s3cret")
    ops = card(page, "ops")
    form = ops.locator('form[data-form="settings"]')
    await expect(form.locator('input[name="rate"]')).to_have_value("")
    await form.locator('input[name="rate"]').fill("5")
    await form.locator('input[name="max_claimed"]').fill("2")
    await form.get_by_role("button", name="Save settings").click()
    await expect(ops.locator('[data-field="message"]')).to_have_text("Settings saved.")
    await expect(form.locator('input[name="burst"]')).to_have_value("5")  # the default burst
    settings = await api.call("GET", "/topics/ops/settings")
    assert (settings["rate"], settings["max_claimed"], settings["lease"]) == (5.0, 2, None)
    await form.locator('input[name="rate"]').fill("")  # empty: removed
    await form.get_by_role("button", name="Save settings").click()
    await expect(form.locator('input[name="burst"]')).to_have_value("")
    assert (await api.call("GET", "/topics/ops/settings"))["rate"] is None

    schedule = ops.locator('form[data-form="schedule"]')
    await schedule.locator('input[name="name"]').fill("tick")
    await schedule.locator('input[name="every"]').fill("1")
    await schedule.locator('input[name="payload"]').fill('{"n": 1}')
    await schedule.get_by_role("button", name="Save schedule").click()
    row = ops.locator('table.schedules tr[data-schedule="tick"]')
    await expect(row.locator('[data-field="when"]')).to_have_text("every 1 s")
    await expect(row.locator('[data-field="last-job"]')).to_have_text(re.compile(r"^tick@\d+$"))
    await expect(row.locator('[data-field="last"]')).to_have_text(re.compile(r"ago$"))
    await schedule.locator('input[name="name"]').fill("bad")
    await schedule.locator('input[name="cron"]').fill("not a cron")
    await schedule.get_by_role("button", name="Save schedule").click()
    await expect(ops.locator('[data-field="message"]')).to_contain_text("failed")
    await row.get_by_role("button", name="Delete").click()
    await row.locator('button[data-action="unschedule"]').click()
    await expect(row).to_have_count(0)
    assert (await api.call("GET", "/topics/ops/schedules"))["schedules"] == []
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "status-page-control.png"), full_page=True)
    assert errors == []


async def test_saving_one_setting_does_not_undo_a_setting_changed_elsewhere(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    """The page PUT all five fields as its form showed them: a form that had
    not refreshed (it does not while focused or once typed in) wrote its stale
    values back, and an operator who set the rate reverted the lease a
    colleague had set meanwhile (review finding). Only changed fields go."""
    from playwright.async_api import expect

    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    await api.enqueue("ops")
    page, _ = tab
    await page.goto(broker.url + "/")
    ops = card(page, "ops")
    form = ops.locator('form[data-form="settings"]')
    await expect(form.locator('input[name="lease"]')).to_have_value("")
    await form.locator('input[name="rate"]').click()  # the operator starts editing
    await api.call("PUT", "/topics/ops/settings", {"lease": 60})  # a colleague, by CLI
    while True:  # the page has been told
        seen = await next_overview(page)
        if seen["topics"][0]["settings"]["lease"] == 60:
            break
    await form.locator('input[name="rate"]').fill("5")
    await form.get_by_role("button", name="Save settings").click()
    await expect(ops.locator('[data-field="message"]')).to_have_text("Settings saved.")
    settings = await api.call("GET", "/topics/ops/settings")
    assert settings["rate"] == 5.0
    assert settings["lease"] == 60.0, f"the page's save undid the colleague's lease: {settings}"


async def test_a_settings_form_typed_in_and_left_shows_settings_changed_elsewhere(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    """Any keystroke marked the form dirty until a successful save: typed in
    and undone, it never showed the topic's settings again while the tab was
    open, with nothing to say they were stale (review finding)."""
    from playwright.async_api import expect

    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    await api.enqueue("ops")
    page, _ = tab
    await page.goto(broker.url + "/")
    form = card(page, "ops").locator('form[data-form="settings"]')
    rate = form.locator('input[name="rate"]')
    await expect(rate).to_have_value("")
    await rate.fill("5")
    await rate.fill("")  # changed her mind: the form is as it was
    await rate.blur()  # and left it
    await api.call("PUT", "/topics/ops/settings", {"max_attempts": 9})
    await expect(form.locator('input[name="max_attempts"]')).to_have_value("9")


async def test_an_action_s_own_refresh_shows_its_effect(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    """The refresh an action made got the overview computed up to a second
    before it (REUSE_FOR, shared by every caller): the page redrew the job it
    had just cancelled as claimed, stamped "live · updated <now>" (review
    finding). It asks for the topic fresh (?fresh=)."""
    from playwright.async_api import expect

    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    await api.enqueue("ops", id="held")
    await api.claim("ops", "worker-1")
    page, _ = tab
    await page.clock.install()
    await page.goto(broker.url + "/")
    await expect_counts(page, "ops", claimed=1, cancelled=0)
    await freeze_polling(page)
    ops = card(page, "ops")
    await api.call("GET", "/ui/overview")  # another tab's poll, just now
    held = ops.locator('table.claimed tr[data-job="held"]')
    await held.get_by_role("button", name="Cancel").click()
    await held.get_by_role("button", name="Click again to cancel").click()
    await expect(ops.locator('[data-field="message"]')).to_have_text("Cancelled held.")
    assert (await api.status("ops"))["claimed"] == 0
    shown = await count_cell(page, "ops", "claimed").text_content()
    still = await ops.locator('table.claimed tr[data-job="held"]').count()
    assert (shown, still) == ("0", 0), (
        f"after cancelling, the page shows claimed={shown} and the row {still} time(s), "
        f"under '{await page.locator('#status').text_content()}'"
    )


async def test_an_action_on_a_topic_another_broker_owns_shows_within_a_poll(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    """A broker's page read a topic it does not own from its own cache, up to
    READ_EVERY (10 s) old, while its actions went to the owner: purged dead
    jobs stayed listed, two polls after the purge, labelled live (review
    finding). The action's own refresh reads the topic again."""
    from playwright.async_api import expect

    from tests.test_ownership import cluster, owner_and_other

    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    api = Api(session, owner.url)
    await api.kill("t", "boom", id="d1")
    await api.kill("t", "boom", id="d2")
    page, _ = tab
    await page.goto(other.url + "/")  # the operator opened the other broker
    await expect_counts(page, "t", dead=2)
    t = card(page, "t")
    await t.get_by_role("button", name="Purge all").click()
    async with page.expect_response(lambda r: r.url.endswith("/topics/t/dead")) as purged:
        await t.locator('button[data-action="purge-all"]').click()
    assert (await purged.value).status == 200
    assert (await api.status("t"))["dead"] == 0
    await next_overview(page)
    await next_overview(page)
    await expect(page.locator("#status")).to_contain_text("live")
    shown = await count_cell(page, "t", "dead").text_content()
    listed = await t.locator("table.dead tbody tr").count()
    assert (shown, listed) == ("0", 0), f"purged, yet dead={shown} with {listed} rows listed"


async def test_a_requeue_that_requeued_nothing_is_not_reported_as_done(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    """The row's Requeue answers {"requeued": []} when the job is no longer
    dead (purged or requeued from elsewhere since the last poll); the page
    said "Requeued" regardless (review finding). It says so on the card."""
    from playwright.async_api import expect

    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    await api.kill("billing", "timeout", id="invoice-42")
    await api.kill("billing", "timeout", id="invoice-43")
    page, _ = tab
    await page.clock.install()
    await page.goto(broker.url + "/")
    billing = card(page, "billing")
    dead = billing.locator('table.dead tr[data-job="invoice-42"]')
    await expect(dead).to_have_count(1)
    await freeze_polling(page)
    await api.call("DELETE", "/topics/billing/dead", {"job_ids": ["invoice-42"]})  # elsewhere
    async with page.expect_response(lambda r: r.url.endswith("/requeue")) as answered:
        await dead.get_by_role("button", name="Requeue").click()
    assert await (await answered.value).json() == {"requeued": []}
    await expect(billing.locator('[data-field="message"]')).to_contain_text(
        "invoice-42", timeout=4000
    )


async def test_a_cancel_the_owner_did_but_answered_late_is_not_said_to_have_found_it_finished(
    start_broker: StartBroker,
    session: aiohttp.ClientSession,
    tab: tuple[Page, PageErrors],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page's broker passes the cancel to the topic's owner, which cancels
    the job but answers too late; the page's broker serves it again itself
    (Simplequeue-Replayed: 1), finds the job cancelled, and answers
    {"cancelled": []}. The page ignored Simplequeue-Replayed and told the
    operator the job "had finished already", though their click cancelled it
    (review of the status page, round 25). A replayed empty answer is checked
    against the job's status, as the SDK does."""
    from playwright.async_api import expect

    from tests.test_ownership import answer_too_late, cluster, owner_and_other

    brokers = await cluster(start_broker, MemStore(), 2, forward_timeout=0.3)
    owner, other = owner_and_other(brokers, "t")
    api = Api(session, owner.url)
    await api.enqueue("t", id="waiting")
    answer_too_late(monkeypatch, owner.engine, "cancel")
    page, errors = tab
    await page.goto(other.url + "/")
    await expect_counts(page, "t", pending=1)
    t = card(page, "t")
    found = await find(t, "waiting")
    await expect(found.locator('[data-found="status"]')).to_have_text("pending")
    await found.get_by_role("button", name="Cancel job").click()
    async with page.expect_response(lambda r: r.url.endswith("/topics/t/cancel")) as info:
        await found.get_by_role("button", name="Click again to cancel").click()
    answered = await info.value
    assert answered.headers.get("simplequeue-replayed") == "1"
    assert (await answered.json())["cancelled"] == []
    assert (await api.status("t"))["cancelled"] == 1  # the click cancelled it
    await expect(t.locator('[data-field="message"]')).to_have_text("Cancelled waiting.")
    assert errors == []


async def test_requeue_all_purge_all_and_a_schedules_delete_say_what_they_did(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    """Every other action says its outcome on the card's status line
    (role=status). Requeue all, Purge all and a schedule's Delete said
    nothing, whether they did 2 jobs or none: the button's section merely
    vanished, and a screen reader heard nothing (review of the status page,
    round 25)."""
    from playwright.async_api import expect

    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    await api.kill("ops", "boom", id="d1")
    await api.kill("ops", "boom", id="d2")
    await api.call("PUT", "/topics/ops/schedules/nightly", {"payload": 1, "every": 3600})
    page, errors = tab
    await page.goto(broker.url + "/")
    await expect_counts(page, "ops", dead=2)
    ops = card(page, "ops")
    message = ops.locator('[data-field="message"]')
    await ops.get_by_role("button", name="Requeue all").click()
    await expect(message).to_have_text("Requeued 2 jobs.")
    await expect_counts(page, "ops", dead=0, pending=2)

    for job in await api.claim("ops", "w", count=2):
        await api.fail("ops", job, "boom again")  # max_attempts 1: dead again
    await expect_counts(page, "ops", pending=0, dead=2)
    await ops.get_by_role("button", name="Purge all").click()
    await ops.locator('button[data-action="purge-all"]').click()
    await expect(message).to_have_text("Purged 2 jobs.")

    row = ops.locator('table.schedules tr[data-schedule="nightly"]')
    await row.get_by_role("button", name="Delete").click()
    await row.locator('button[data-action="unschedule"]').click()
    await expect(message).to_have_text("Deleted schedule nightly.")
    await expect(row).to_have_count(0)
    assert errors == []


async def test_a_job_or_schedule_named_dot_dot_is_said_to_be_out_of_the_pages_reach(
    start_broker: StartBroker, tab: tuple[Page, PageErrors]
) -> None:
    """The page asks for topics/t/jobs/.. and topics/t/schedules/.., which
    the browser resolves to topics/t/ (%2E%2E as well): Find said "Not
    Found", as if there were no such job, and Delete said "Delete failed: Not
    Found" (review of the status page, round 25). New schedules cannot be
    named so; for such a job id, or a schedule an older broker made, the page
    says it cannot reach it, and what can."""
    from playwright.async_api import expect

    from tests.test_schedules import made_by_an_older_broker

    broker = await start_broker(MemStore())
    await broker.engine.enqueue("t", [JobSpec(1, id="..")])
    await made_by_an_older_broker(broker, "t", "..")
    page, errors = tab
    await page.goto(broker.url + "/")
    t = card(page, "t")
    await find(t, "..")
    await expect(t.locator('[data-found="error"]')).to_contain_text("use the SDK or the CLI")
    row = t.locator('table.schedules tr[data-schedule=".."]')
    await row.get_by_role("button", name="Delete").click()
    await row.locator('button[data-action="unschedule"]').click()
    await expect(t.locator('[data-field="message"]')).to_contain_text("use the SDK or the CLI")
    assert errors == []


async def test_a_failed_requeue_is_still_said_after_the_next_refresh(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    """The row's Requeue said its failure in the header's status line only,
    which the next poll overwrote with "live · updated" (review finding). It
    says it on the topic's card, where every other action's failure stays."""
    from playwright.async_api import expect

    from tests.helpers.faults import FaultyStore

    store = FaultyStore(MemStore())
    broker = await start_broker(store)
    api = Api(session, broker.url)
    await api.kill("billing", "timeout", id="invoice-42")
    page, _ = tab
    await page.goto(broker.url + "/")
    dead = card(page, "billing").locator('table.dead tr[data-job="invoice-42"]')
    await expect(dead).to_have_count(1)
    store.faults = ["full"]  # the next write of the head fails
    async with page.expect_response(lambda r: r.url.endswith("/requeue")) as answered:
        await dead.get_by_role("button", name="Requeue").click()
    assert (await answered.value).status >= 400
    message = card(page, "billing").locator('[data-field="message"]')
    await expect(message).to_contain_text("Requeue failed")
    await next_overview(page)
    await expect(page.locator("#status")).to_have_class("status ok")
    await expect(message).to_contain_text("Requeue failed")


async def test_zero_counts_are_legible(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    """A zero count was drawn #b6bec9 on white: 1.9:1, where WCAG 1.4.3 asks
    4.5:1 of 14px text (review finding). Zeros are most of the table, and
    they are what an operator checks."""
    broker = await start_broker(MemStore())
    await Api(session, broker.url).enqueue("idle")
    page, _ = tab
    await page.goto(broker.url + "/")
    await expect_counts(page, "idle", dead=0)
    color = await count_cell(page, "idle", "dead").evaluate("e => getComputedStyle(e).color")
    rgb = tuple(int(n) for n in re.findall(r"\d+", color)[:3])
    ratio = (1.0 + 0.05) / (_luminance(rgb) + 0.05)  # on the card's white
    assert ratio >= 4.5, f"zero counts drawn {color}: contrast {ratio:.2f}:1"


async def test_a_topic_whose_jobs_the_overview_does_not_list_says_so(
    start_broker: StartBroker, tab: tuple[Page, PageErrors]
) -> None:
    """200 troubled topics (100 claimed and 100 dead jobs each) took Chromium
    31-46 s to draw, then held its main thread 3-15 s at each poll (review of
    the status page, round 27): an overview lists MAX_ROWS jobs in all. A
    topic past them shows its counts, and says its jobs are not listed and
    why, not that there are none ("No job is claimed.")."""
    from playwright.async_api import expect

    page, errors = tab
    broker = await start_broker(MemStore())
    names = await _troubled_topics(broker, 12)
    await page.goto(broker.url + "/")
    last = card(page, names[-1])
    await expect(last.locator('[data-more="claimed"]')).to_contain_text("100 not listed")
    await expect(last.locator('[data-more="dead"]')).to_contain_text("all topics together")
    await expect(last.locator('[data-empty="claimed"]')).to_be_hidden()
    await expect(last.locator('[data-empty="dead"]')).to_be_hidden()
    first = card(page, names[0])
    await expect(first.locator('[data-list="claimed"] tbody tr')).to_have_count(100)
    await expect(first.locator('[data-more="claimed"]')).to_be_hidden()
    assert errors == []


async def test_a_lone_topic_cut_short_reads_the_whole_budget_and_blames_no_other_topic(
    start_broker: StartBroker, tab: tuple[Page, PageErrors]
) -> None:
    """03253e6 gave each topic a quarter of Engine.claim_bytes to read its
    listings, whatever the other topics left, and the page said of every
    topic cut short "the topics before this one took them": a lone topic,
    no topic before it, nearly all of the budget unspent, was told so
    (review of round 28: 5 of 100 dead 12 KB jobs listed, under --cache-mb
    2, claim_bytes 256 KB). A topic read alone takes all that is left, and
    the note says what is bounded, blaming no other topic."""
    from playwright.async_api import expect

    page, errors = tab
    broker = await start_broker(MemStore(), cache_bytes=2 * 1024 * 1024)
    await _dead_jobs(broker, "only", 100, 12_000)
    [view] = (await broker.http_api.page.compute()).topics
    assert isinstance(view, status_page.TopicView) and view.listing_cut
    budget = broker.engine.claim_bytes
    listed = len(view.dead)
    assert budget // 2 < listed * 12_000 <= 2 * budget, listed
    await page.goto(broker.url + "/")
    more = card(page, "only").locator('[data-more="dead"]')
    await expect(more).to_contain_text(f"{100 - listed} more not listed")
    assert "before this one" not in await more.inner_text()
    assert errors == []


async def test_live_regions_stay_quiet_while_nothing_changes(
    start_broker: StartBroker, session: aiohttp.ClientSession, tab: tuple[Page, PageErrors]
) -> None:
    """The status line (role=status) got new text at every poll ("live ·
    updated 12:00:02") and the broker lines (aria-live) were drawn anew at
    every poll: a screen reader announced both every 2 s, for ever (review
    finding). Only the state is a live region now, and the broker lines are
    drawn again only when something in them other than the heartbeat's age
    changes."""
    from playwright.async_api import expect

    broker = await start_broker(MemStore())
    await Api(session, broker.url).enqueue("idle")
    page, _ = tab
    await page.goto(broker.url + "/")
    await expect_counts(page, "idle", pending=1)
    live = page.locator('[role="status"]:not([data-field]), [aria-live]')
    before = await live.all_text_contents()
    await page.evaluate("window.mine = document.querySelector('[data-role=this-broker]')")
    await next_overview(page)
    await next_overview(page)
    await expect(page.locator("#status")).to_have_class("status ok")
    await expect(page.locator("#status")).to_contain_text("updated")
    assert await live.all_text_contents() == before == ["live"]
    assert await page.evaluate("window.mine === document.querySelector('[data-role=this-broker]')")


def _store_gets(broker: Any) -> float:
    return store_requests(broker, "get")


async def test_fresh_overview_requests_cost_a_store_read_each(start_broker: StartBroker) -> None:
    """GET /ui/overview?fresh=T (a GET any page can make) bypassed the shared
    computation and read T from the store on every request (review of
    cc04e68). It is honoured once for each change made through this broker."""
    from tests.test_ownership import cluster, owner_and_other

    store = MemStore()
    brokers = await cluster(start_broker, store, 2)
    owner, other = owner_and_other(brokers, "t")
    await owner.engine.enqueue("t", [JobSpec(1)])
    async with aiohttp.ClientSession() as s:
        async with s.get(other.url + "/ui/overview") as r:
            assert r.status == 200
        before = _store_gets(other)
        for _ in range(30):
            async with s.get(other.url + "/ui/overview?fresh=t") as r:
                assert r.status == 200
        spent = _store_gets(other) - before
    assert spent <= 5, f"30 overviews within a second cost {spent:.0f} store GETs"


async def test_a_second_action_during_an_actions_refresh_is_shown_at_its_own_refresh(
    start_broker: StartBroker, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator requeues d1, then d2, on a topic another broker owns; d2's
    requeue lands while the overview d1's refresh asked for (?fresh=t) is
    being computed, after it read t. That compute then dropped t from the
    topics changed since read, so d2's own refresh was not honoured: it got
    the overview just computed, or t as read up to READ_EVERY before, d2
    still listed dead under "Requeued d2." (review of the status page,
    round 25). A refresh drops t only if no change came after it noted one."""
    from tests.test_ownership import cluster, owner_and_other

    brokers = await cluster(start_broker, MemStore(), 2)
    owner, other = owner_and_other(brokers, "t")
    api = Api(session, owner.url)
    await api.kill("t", "boom", id="d1")
    await api.kill("t", "boom", id="d2")
    page_api = Api(session, other.url)
    await page_api.call("GET", "/ui/overview")  # the page shows t

    engine = other.http_api.page.engine
    inspect = engine.inspect
    second: list[Any] = []

    async def inspect_then_second_action(topic: str, **kwargs: Any) -> Any:
        seen = await inspect(topic, **kwargs)
        if topic == "t" and not second:  # d2's requeue lands meanwhile
            second.append(await page_api.call("POST", "/topics/t/requeue", {"job_ids": ["d2"]}))
        return seen

    monkeypatch.setattr(engine, "inspect", inspect_then_second_action)
    await page_api.call("POST", "/topics/t/requeue", {"job_ids": ["d1"]})
    await page_api.call("GET", "/ui/overview?fresh=t")  # d1's refresh
    assert second == [{"requeued": ["d2"]}]
    shown = await page_api.call("GET", "/ui/overview?fresh=t")  # d2's refresh
    [t] = [x for x in shown["topics"] if x["name"] == "t"]
    assert [d["id"] for d in t["dead"]] == [], f"d2 was requeued, yet {t['dead']} are listed"


async def test_an_action_s_outcome_is_said_even_while_a_poll_is_stuck(
    start_broker: StartBroker,
    session: aiohttp.ClientSession,
    tab: tuple[Page, PageErrors],
) -> None:
    """Refreshes run one after another and an action waited for its own before
    saying what it did: with a poll that did not come back (fetch had no
    timeout), the requeue succeeded but the card never said so (review of
    cc04e68). Calls time out after 10 s, and an action waits 3 s at most."""
    from playwright.async_api import expect

    broker = await start_broker(MemStore())
    api = Api(session, broker.url)
    await api.kill("ops", "boom", id="d1")
    page, _ = tab
    await page.goto(broker.url + "/")
    await expect_counts(page, "ops", dead=1)
    held: list[Any] = []

    async def hold(route: Any) -> None:  # the next overview polls hang
        held.append(route)

    await page.route("**/ui/overview**", hold)
    async with page.expect_request(lambda r: r.url.endswith("/ui/overview")):  # held
        await page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    ops = card(page, "ops")
    async with page.expect_response(lambda r: r.url.endswith("/topics/ops/requeue")) as done:
        await ops.locator('table.dead tr[data-job="d1"] button[data-action="requeue"]').click()
    assert (await done.value).status == 200
    try:
        await expect(ops.locator('[data-field="message"]')).to_have_text(
            "Requeued d1.", timeout=5000
        )
    finally:
        for route in held:
            await route.abort()
