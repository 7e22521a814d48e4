"""The live status page: `GET /` (a static shell, its script and styles, served
without auth because they hold no data) and `GET /ui/overview`, the JSON the
page polls (behind the token like every other route). Everything here reads:
it never mutates a topic (the page's actions, requeue, purge, cancel, settings
and schedules, call the public API) and never touches storage or topic state
except through the Engine's reads.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gzip
import hashlib
import heapq
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass
from importlib import resources
from typing import Any

import msgspec
import orjson
from aiohttp import web
from msgspec import Struct

from simplequeue import api
from simplequeue.broker.engine import Engine
from simplequeue.broker.parallel import each

log = logging.getLogger(__name__)

OVERVIEW_PATH = "/ui/overview"
STATIC_PREFIX = "/static/"

MAX_TOPICS = 200  # topics in one overview (alphabetical); the rest are counted
MAX_LISTED = 100  # claimed and dead jobs listed per topic; the rest are counted
# Of all the topics of an overview together, jobs listed (claimed and dead)
# and characters of their payloads and errors listed, at most; the rest are
# counted. Per topic alone, 200 troubled topics made one overview 40,000 rows,
# 35 MB of JSON (sent to every open tab every 2 s, built on the event loop),
# which a browser took 30-45 s to draw. Topics take them in order.
MAX_ROWS = 2_000
MAX_TEXT = 1_000_000
# The segments an overview's listings read (dead jobs', claimed jobs'
# payloads) come to what a batch's claims may read at most (Engine.claim_bytes:
# 16 MiB, or an eighth of --cache-mb), a topic taking 1/INSPECT_PARALLEL of
# it at most while another is read or left to read, what is left when none
# is (a lone topic: the whole). Bounded by count only, 10 idle topics of 100 dead 50 KB jobs
# under --cache-mb 16 cost 5,778 GETs (184 MB) an overview, one a second
# while a tab was open: they did not fit the cache together.
# Topics an overview inspects at once (parallel.each, as the take-over reads
# heads): the segments their listings read are held together, and 200 at once
# pushed each other's out of the object cache until every topic was "too small
# for this read".
INSPECT_PARALLEL = 4
OLDEST_SCAN = 256  # due jobs looked at per run when finding the oldest one
PREVIEW_CHARS = 240  # characters of a payload shown
ERROR_CHARS = 1000  # characters of an error shown
# Seconds an overview reuses the store's topic listing: a listing costs a
# request per 500-1,000 topics on S3, and a topic written through this broker
# shows at once without it (known_topics); only one created through another
# broker waits for the next listing.
LIST_EVERY = 60.0
# Seconds before a listing that failed (the store down) is tried again. The
# overview meanwhile shows the last listing and the topics this broker holds,
# and says the listing failed: failing whole, it answered 503 at every poll
# until the store listed again, when the operator looks.
LIST_RETRY = 5.0
# Seconds the head of a topic another broker owns is taken as read, at most:
# each refresh (every 2 s) read every topic shown (200 at most) again, 100 GETs
# a second for one tab. One this broker owns is current in its memory (its
# own writes; a broker that wrote it while this one did not answer hands it
# back, /refresh): it is read only when it is not held (or was handed back).
READ_EVERY = 10.0
# Open tabs poll every 2 s; overviews asked within this many seconds of each
# other share one computation, so ten tabs cost the store what one does.
REUSE_FOR = 1.0
# Seconds the topics an overview of one prefix showed count as shown (their
# rate history kept, the sampler sampling them, actions on them read fresh)
# after it: two tabs filtering on different prefixes poll their own overviews,
# and each one's showing forgot the other's history (no rate ever drawn).
SHOWN_FOR = 30.0
# An overview is sent gzipped to a browser that takes it (all do), once it is
# this large: 200 topics with their 10 minutes of rates were 1.5 MB of JSON
# every 2 s for each open tab, 220 KB gzipped (at level 1: 10 ms, once per
# computation and in a thread, whatever the tabs).
GZIP_FROM = 16 * 1024
GZIP_LEVEL = 1

# Rates: counters are sampled at most every SAMPLE_EVERY seconds, by the
# overview itself and by a background sampler that the first overview starts
# (it reads the committer's cache, never the store), each sample stamped with
# when its counters were current; WINDOW seconds are kept.
SAMPLE_EVERY = 5.0
WINDOW = 600.0

# The page and its assets: name -> content type. Nothing else is served.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

# The page runs only its own script: even if some text slipped through as
# markup, an injected <script> or inline handler would not run.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


# --- what the page is sent: /ui/overview, described in /openapi.json -------------------


class BrokerView(Struct):
    """This broker."""

    id: str
    url: str
    epoch: int
    active: bool


class RecordView(Struct):
    """The broker.json record this broker last saw."""

    broker_id: str
    url: str
    epoch: int
    heartbeat_age: float  # seconds
    lease_s: float
    stale: bool  # older than its lease: no broker is active


class Presence(Struct):
    broker: BrokerView
    record: RecordView | None  # None: no record yet


class ClaimedView(Struct):
    id: str
    worker: str | None
    attempts: int | None
    lease_left: float  # seconds
    claimed_for: float  # seconds
    payload: str  # its JSON, cut to PREVIEW_CHARS


class DeadView(Struct):
    id: str
    last_error: str | None  # cut to ERROR_CHARS
    attempts: int | None
    died_ago: float | None  # seconds
    payload: str


class ScheduleView(Struct):
    name: str
    when: str  # "every 60 s", or the cron expression and its time zone
    every: int | None
    cron: str | None
    tz: str | None
    next_in: float  # seconds until its next slot
    last_fired_ago: float | None  # seconds; None: never fired
    last_job_id: str | None
    last_error: str | None
    payload: str  # its JSON, cut to PREVIEW_CHARS


class RatePoint(Struct):
    """Per-second rates over the `span` seconds that end `ago` seconds ago."""

    ago: float
    span: float
    enqueued: float
    completed: float


class TopicView(Struct, tag_field="kind", tag="topic"):
    name: str
    counts: api.Counts
    oldest_pending_age: float | None  # seconds since the job due longest came due; None: none
    claimed: list[ClaimedView]  # the MAX_LISTED whose leases run out first
    claimed_more: int
    dead: list[DeadView]  # the MAX_LISTED newest
    dead_more: int
    rates: list[RatePoint]  # oldest first
    schedules: list[ScheduleView] = []  # by name
    settings: api.Settings | None = None
    # True: fewer jobs are listed than MAX_LISTED allows, as the overview's
    # bounds were spent: those of all its topics together (MAX_ROWS,
    # MAX_TEXT, the bytes its listings read), taken by the topics before this
    # one, or the bytes this one's listing could read (its share of them
    # while others were read beside it, all that was left when it was read
    # alone). Not always the other topics' doing: the page does not say so.
    listing_cut: bool = False


class TopicUnreadable(Struct, tag_field="kind", tag="unreadable"):
    """A topic that could not be read (a corrupt head): why, instead."""

    name: str
    error: str


class OverviewQuery(Struct, forbid_unknown_fields=True):
    """GET /ui/overview?fresh=T&prefix=P: a topic the page just acted on (read
    again); only the topics whose names start with P (all of them: "")."""

    fresh: str | None = None
    prefix: str = ""


class Overview(Struct):
    """Everything the page shows: broker.json, this broker, and every topic
    (whose name starts with `prefix`)."""

    broker: BrokerView
    record: RecordView | None
    topics: list[TopicView | TopicUnreadable]  # the first MAX_TOPICS, by name
    topics_total: int  # those whose names start with the prefix
    prefix: str
    # Why the last listing of the store's topics failed, if it did: the topics
    # shown are then the listing before it and those this broker holds.
    listing_failed: str | None
    sample_every: float  # seconds between rate samples
    window: float  # seconds of rates kept


# --- rates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic() when these counters were current
    enqueued: int
    completed: int


class RateBook:
    """Per topic, a ring of counter samples, from which enqueue and completion
    rates are derived. Lives in the broker process only: a restarted broker
    starts a new history."""

    def __init__(self, every: float = SAMPLE_EVERY, window: float = WINDOW) -> None:
        self.every = every
        self.window = window
        self._rings: dict[str, deque[Sample]] = {}

    def record(self, topic: str, at: float, enqueued: int, completed: int) -> None:
        ring = self._rings.get(topic)
        if ring is None:
            ring = self._rings[topic] = deque(maxlen=int(self.window / self.every) + 2)
        if ring and at - ring[-1].at < self.every:  # too soon, or counters sampled already
            return
        ring.append(Sample(at, enqueued, completed))

    def rates(self, topic: str, now: float) -> list[RatePoint]:
        """The topic's rates up to `now`, oldest first."""
        ring = self._rings.get(topic)
        if not ring:
            return []
        points: list[RatePoint] = []
        samples = [s for s in ring if now - s.at <= self.window + self.every]
        for before, after in itertools.pairwise(samples):
            span = after.at - before.at
            if span <= 0:
                continue
            points.append(
                RatePoint(
                    ago=round(now - after.at, 3),
                    span=round(span, 3),
                    # A counter that went down (the topic was recreated) is no rate.
                    enqueued=_figure(max(0, after.enqueued - before.enqueued) / span),
                    completed=_figure(max(0, after.completed - before.completed) / span),
                )
            )
        return points

    def forget_except(self, topics: Set[str]) -> None:
        for name in [t for t in self._rings if t not in topics]:
            del self._rings[name]


def _figure(rate: float) -> float:
    """A rate to 3 significant digits, as a chart draws it: 83.2, not
    83.19999999999999 (a tenth of an overview's JSON with 200 topics)."""
    return float(f"{rate:.3g}")


# --- what one topic shows ---------------------------------------------------------------


def starting_with(names: list[str], prefix: str) -> list[str]:
    """The names of sorted `names` that start with `prefix`: a slice found by
    bisection, not a scan of 100,000 names at each refresh."""
    if not prefix:
        return names
    start = bisect.bisect_left(names, prefix)
    # The first name past them all: the prefix with its last character the next.
    end = bisect.bisect_left(names, prefix[:-1] + chr(ord(prefix[-1]) + 1), start)
    return names[start:end]


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """A job payload as JSON text, cut to `limit` characters."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cut(value: Any, limit: int = ERROR_CHARS) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Listing:
    """What an overview may still list, of all its topics together."""

    rows: int = MAX_ROWS
    text: int = MAX_TEXT  # characters of payloads and errors
    read: int = 0  # bytes of segments read

    def take(self, rows: int, read: int) -> tuple[int, int]:
        """Up to `rows` rows and `read` bytes, taken out of what is left."""
        rows, read = max(0, min(rows, self.rows)), max(0, min(read, self.read))
        self.rows -= rows
        self.read -= read
        return rows, read

    def fits(self, text: int) -> bool:
        """Whether a row of `text` characters is listed (and if so, takes it)."""
        if self.rows <= 0 or text > self.text:
            self.rows = self.text = 0  # the rows after it are not listed either
            return False
        self.rows -= 1
        self.text -= text
        return True


def topic_view(
    name: str, seen: dict[str, Any], rates: list[RatePoint], listing: Listing | None = None
) -> TopicView:
    """Everything the page shows of one topic, from Engine.inspect's answer,
    listing as many of its jobs as `listing` has left (what an overview
    lists in all, by default)."""
    now = seen["now"]
    oldest = seen["oldest_due_since"]
    listing = listing or Listing()
    claimed: list[ClaimedView] = []
    for j in seen["claimed"]:
        shown = preview(j.get("payload"))
        if not listing.fits(len(shown)):
            break
        claimed.append(
            ClaimedView(
                id=j["id"],
                worker=j.get("claimed_by"),
                attempts=j.get("attempts"),
                lease_left=j["lease_expires_at"] - now,
                claimed_for=now - j.get("claimed_at", now),
                payload=shown,
            )
        )
    dead: list[DeadView] = []
    for j in seen["dead"]:
        shown, error = preview(j.get("payload")), _cut(j.get("last_error"))
        if not listing.fits(len(shown) + len(error or "")):
            break
        dead.append(
            DeadView(
                id=j["id"],
                last_error=error,
                attempts=j.get("attempts"),
                died_ago=now - j["died_at"] if "died_at" in j else None,
                payload=shown,
            )
        )
    claimed_more = seen["claimed_more"] + len(seen["claimed"]) - len(claimed)
    dead_more = seen["dead_more"] + len(seen["dead"]) - len(dead)
    counts = seen["counts"]
    return TopicView(
        name=name,
        counts=api.Counts(**counts),
        oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
        claimed=claimed,
        claimed_more=claimed_more,
        dead=dead,
        dead_more=dead_more,
        listing_cut=(
            len(claimed) < min(MAX_LISTED, counts["claimed"])
            or len(dead) < min(MAX_LISTED, counts["dead"])
        ),
        rates=rates,
        schedules=[schedule_view(n, s, now) for n, s in sorted(seen.get("schedules", {}).items())],
        settings=api.Settings(**seen["settings"]) if "settings" in seen else None,
    )


def schedule_view(name: str, kept: dict[str, Any], now: float) -> ScheduleView:
    every, cron, tz = kept.get("every"), kept.get("cron"), kept.get("tz")
    when = f"every {every} s" if every is not None else f"{cron} ({tz or 'UTC'})"
    fired = kept.get("last_fired_at")
    last = kept.get("last_slot")
    return ScheduleView(
        name=name,
        when=when,
        every=every,
        cron=cron,
        tz=tz,
        next_in=max(0.0, kept["next_at"] - now),
        last_fired_ago=None if fired is None else max(0.0, now - fired),
        last_job_id=None if last is None else f"{name}@{last}",
        last_error=_cut(kept.get("last_error")),
        payload=preview(kept.get("payload")),
    )


# --- the handlers ----------------------------------------------------------------------


class StatusPage:
    """The page's routes and its in-memory rate history, for one broker."""

    def __init__(
        self,
        engine: Engine,
        presence: Callable[[], Presence],
        owns: Callable[[str], bool] = lambda topic: True,
    ) -> None:
        self.engine = engine
        self.presence = presence  # this broker and broker.json, as the page shows them
        self.owns = owns  # whether this broker owns a topic (its memory is current)
        self.rates = RateBook(SAMPLE_EVERY, WINDOW)
        self._assets: dict[str, tuple[bytes, str, str]] = {}
        folder = resources.files("simplequeue.broker") / "static"
        for name, content_type in ASSETS.items():
            body = (folder / name).read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            self._assets[name] = (body, content_type, etag)
        self._listed: list[str] = []  # the store's topics, sorted, as last listed
        self._listed_set: frozenset[str] = frozenset()
        self._listed_at = -1e18
        self._listing_failed: str | None = None  # why the last listing failed
        self._sampler: asyncio.Task[None] | None = None
        # The topics the last overview of each prefix showed, and when; those
        # of the last SHOWN_FOR seconds (the last one's always) are shown.
        self._shown_by: dict[str, tuple[float, frozenset[str]]] = {}
        self._shown: set[str] = set()
        self._computing = asyncio.Lock()
        # The last overview of each prefix, when it was made, and gzipped (if
        # large enough: GZIP_FROM); those of the last REUSE_FOR seconds.
        self._last: dict[str, tuple[float, bytes, bytes | None]] = {}
        # Topics the last overview showed that a request through this broker
        # changed since an overview read them fresh, each with the number of
        # its last change: an overview asked `fresh` for one reads it again (no
        # other). A number, not a flag: a change that lands while that overview
        # reads must outlive it, or its own refresh is not honoured. At most
        # MAX_TOPICS.
        self._touched: dict[str, int] = {}
        self._changes = itertools.count(1)

    def touched(self, topic: str) -> None:
        """A request through this broker changed `topic` (an action of the page's,
        on a topic it shows). Kept only if the last overview showed it: requests
        for any other (a requeue of a topic that does not exist answers 200)
        would grow the map for ever, and the page acts on none of them."""
        if topic in self._shown:
            self._touched[topic] = next(self._changes)

    # --- static --------------------------------------------------------------------

    def _serve(self, request: web.BaseRequest, name: str) -> web.Response:
        body, content_type, etag = self._assets[name]
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "ETag": etag}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        headers["Content-Type"] = content_type
        return web.Response(body=body, headers=headers)

    def index(self, request: web.BaseRequest) -> web.Response:
        return self._serve(request, "index.html")

    def asset(self, request: web.BaseRequest, name: str) -> web.Response:
        if name not in self._assets or name == "index.html":
            raise web.HTTPNotFound(reason="no such asset")
        return self._serve(request, name)

    # --- data ------------------------------------------------------------------------

    async def overview(
        self, fresh: str | None = None, prefix: str = "", gzipped: bool = False
    ) -> web.Response:
        """The overview of the topics whose names start with `prefix` (every
        one: ""); with `fresh`, a topic just acted on, one computed now
        with that topic read again: the refresh an action makes shows it,
        not what was read up to REUSE_FOR (or, from another broker's topic,
        READ_EVERY) seconds before it. Only if a request through this broker
        changed that topic since the last overview: asked `fresh` for nothing
        new, an overview costs no more than another (a store read each).
        `gzipped`: the client takes gzip (a large one is sent so)."""
        async with self._computing:
            if fresh is not None and fresh not in self._touched:
                fresh = None
            at = time.monotonic()
            self._last = {p: last for p, last in self._last.items() if at - last[0] < REUSE_FOR}
            if fresh is not None or prefix not in self._last:
                body = msgspec.json.encode(await self.compute(fresh, prefix))
                packed = None
                if len(body) >= GZIP_FROM:
                    packed = await asyncio.to_thread(gzip.compress, body, GZIP_LEVEL)
                self._last[prefix] = (time.monotonic(), body, packed)
            _, body, packed = self._last[prefix]
        headers = {"Cache-Control": "no-store", "Vary": "Accept-Encoding"}
        if gzipped and packed is not None:
            body = packed
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def compute(self, fresh: str | None = None, prefix: str = "") -> Overview:
        """The whole overview: broker.json, this broker, and every topic whose
        name starts with `prefix` (the topic `fresh` read again, however
        recently it was)."""
        self._start_sampler()
        change = self._touched.get(fresh or "")  # the last change before `fresh` is read
        if time.monotonic() - self._listed_at >= LIST_EVERY:
            await self._list_topics()
        # Topics this broker wrote since the last listing show at once. Merged
        # into the listing (sorted once, when listed), only as far as shown:
        # not every name sorted again at each refresh.
        newer = sorted(
            t
            for t in self.engine.known_topics()
            if t.startswith(prefix) and t not in self._listed_set
        )
        listed = starting_with(self._listed, prefix)
        shown = list(itertools.islice(heapq.merge(listed, newer), MAX_TOPICS))
        total = len(listed) + len(newer)
        seen: dict[str, dict[str, Any] | Exception] = {}
        # What the topics read, handed out as each starts (a few at once, in
        # order), what one did not use given back.
        budget = self.engine.claim_bytes
        reading = Listing(read=budget)
        unread = len(shown)  # topics not read yet, those being read included

        async def inspect(topic: str) -> None:
            nonlocal unread
            # A topic read alone (none beside it, none after it) takes all
            # that is left: a lone topic, the whole budget, not its share.
            share = budget if unread == 1 else budget // INSPECT_PARALLEL
            rows, room = reading.take(2 * MAX_LISTED, share)
            try:
                got = seen[topic] = await self.engine.inspect(
                    topic,
                    listed=MAX_LISTED,
                    rows=rows,
                    room=room,
                    scan=OLDEST_SCAN,
                    max_age=self._max_age(topic, fresh),
                )
            except Exception as exc:  # one bad topic does not blank the page
                seen[topic] = exc
                reading.rows += rows
                reading.read += room
            else:
                reading.rows += rows - len(got["claimed"]) - len(got["dead"])
                reading.read += room - got["read"]
            finally:
                unread -= 1

        await each(shown, INSPECT_PARALLEL, inspect)
        listing = Listing()  # what the views list, in the topics' order
        views: list[TopicView | TopicUnreadable] = []
        at = time.monotonic()
        self._record(shown, at)
        for name in shown:
            got = seen[name]
            if isinstance(got, Exception):
                log.warning("status page: topic %s: %s", name, got)
                views.append(TopicUnreadable(name=name, error=str(got)))
                continue
            views.append(topic_view(name, got, self.rates.rates(name, at), listing))
        self._showing(prefix, shown)
        # Those shown no more, the page cannot act on; `fresh` was read now, so
        # a change is read once, unless another came while it was being read.
        self._touched = {
            t: n
            for t, n in self._touched.items()
            if t in self._shown and not (t == fresh and n == change)
        }
        self.rates.forget_except(self._shown)  # the history of a topic shown no more
        presence = self.presence()
        return Overview(
            broker=presence.broker,
            record=presence.record,
            topics=views,
            topics_total=total,
            prefix=prefix,
            listing_failed=self._listing_failed,
            sample_every=self.rates.every,
            window=self.rates.window,
        )

    async def _list_topics(self) -> None:
        """List the store's topics; failing, keep the last listing (merged with
        those this broker holds, as always) and try again in LIST_RETRY."""
        try:
            listed = await self.engine.topic_names()
        except Exception as exc:  # the topics known still show
            self._listing_failed = f"{type(exc).__name__}: {exc}"
            self._listed_at = time.monotonic() - LIST_EVERY + LIST_RETRY
            log.warning(
                "status page: listing the topics failed (%s); showing the last listing"
                " and the topics this broker holds, again in %.0f s",
                self._listing_failed,
                LIST_RETRY,
            )
            return
        self._listed = listed
        self._listed_set = frozenset(listed)
        self._listed_at = time.monotonic()
        self._listing_failed = None

    def _showing(self, prefix: str, shown: list[str]) -> None:
        """An overview of `prefix` shows `shown` now: the topics shown are
        those, and those of the other prefixes' overviews of the last
        SHOWN_FOR seconds."""
        at = time.monotonic()
        self._shown_by[prefix] = (at, frozenset(shown))
        self._shown_by = {
            p: (when, topics)
            for p, (when, topics) in self._shown_by.items()
            if at - when < SHOWN_FOR or p == prefix
        }
        self._shown = set().union(*(topics for _, topics in self._shown_by.values()))

    def _max_age(self, topic: str, fresh: str | None) -> float:
        """How old a state of `topic` an overview takes, in seconds."""
        if topic == fresh:
            return 0.0
        return math.inf if self.owns(topic) else READ_EVERY

    # --- the background sampler ---------------------------------------------------------

    def _start_sampler(self) -> None:
        if self._sampler is None or self._sampler.done():
            self._sampler = asyncio.create_task(self._sample_forever(), name="status-page-rates")

    async def _sample_forever(self) -> None:
        """Keeps the rate history of the topics last shown going while no
        page is open, from the committer's cache (which the reaper keeps
        fresh): no store I/O."""
        while True:
            await asyncio.sleep(self.rates.every)
            try:
                self.sample()
            except Exception as exc:  # keep sampling
                log.warning("status page sampler: %s", exc)

    def sample(self) -> None:
        """One round of the sampler: the counters of the topics the last
        overview showed (a page shows no other: MAX_TOPICS at most), those
        this broker holds."""
        self._record(self._shown, time.monotonic())

    def _record(self, topics: Iterable[str], now: float) -> None:
        """A sample of the counters of each of `topics` this broker holds,
        stamped with when they were current: `now` for a topic this broker
        owns (what it holds is), else when its head was read. Counters read
        up to READ_EVERY before, stamped now, made a rate of 0, then twice the
        rate at the next read. A topic not read since its last sample adds
        none (RateBook.record)."""
        for topic, (read_at, c) in self.engine.cached_counts(topics).items():
            at = now if self.owns(topic) else read_at
            self.rates.record(topic, at, c["enqueued"], c["completed"])

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
