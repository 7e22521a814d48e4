"""Prometheus metrics of one broker: HTTP requests, store requests, commits, jobs.

Each broker has its own registry (several may share a process in tests). The
store is wrapped so that every request to it is counted and timed; job counts
are read at scrape time from the committer's cached states, never from storage.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from simplequeue.errors import ObjectNotFound, PreconditionFailed
from simplequeue.objstore import ObjectStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The *_created series (when each counter was made) double the scrape for no
# use here: counters start with the broker, and rates come from the values.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """The broker's metrics and its registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._http_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._callbacks: list[CallbackCollector] = []
        self._scraper = ThreadPoolExecutor(1, thread_name_prefix="simplequeue-metrics")
        self.http_requests = Counter(
            "simplequeue_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "simplequeue_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
        )
        self.store_requests = Counter(
            "simplequeue_store_requests",
            "Object store requests by kind (get, put, put_if, delete, list) and outcome",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "simplequeue_store_request_seconds",
            "Object store request latency by kind",
            ["kind"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.resp_commands = Counter(
            "simplequeue_resp_commands",
            "Redis-protocol commands by name and outcome (ok, error)",
            ["command", "outcome"],
            registry=self.registry,
        )
        self.batch_sizes = Histogram(
            "simplequeue_batch_mutations",
            "Mutations per committed batch",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
        )

    def http_children(self, route: str, method: str, status: int) -> tuple[Any, Any]:
        """The request counter and latency histogram for these labels, cached:
        resolving labels is a measurable share of a request's cost."""
        key = (route, method, status)
        children = self._http_children.get(key)
        if children is None:
            children = (
                self.http_requests.labels(route, method, str(status)),
                self.http_seconds.labels(route),
            )
            self._http_children[key] = children
        return children

    def add_collector(self, collector: CallbackCollector) -> None:
        self._callbacks.append(collector)

    async def scrape(self) -> bytes:
        """The exposition, made in a thread: only what the callbacks read of
        live state is read here, on the loop. Their families (28,000 samples
        for 2,000 topics held) and the text (1.8 MB) are made aside, the loop
        taking its turns meanwhile. Made on the loop, they held it 0.17-0.33 s
        a scrape. The per-topic figures are read a slice of topics at a time,
        the loop taking its turns between (Engine.cached_gauges): read at once,
        10,000 topics written since the last scrape held it 0.3-0.4 s. The
        thread is the scrapes' own: scrapes at once wait for each other, not
        the store's I/O (localfs runs in the loop's default executor)."""
        taken = await self._taken()
        return await asyncio.get_running_loop().run_in_executor(
            self._scraper, generate_latest, taken
        )

    async def _taken(self) -> _Scrape:
        """The metrics as they are now, the callbacks' live state read (here)."""
        return _Scrape(self.registry, [await c.take() for c in self._callbacks])

    def close(self) -> None:
        """Let the scrapes' thread go (a scrape in progress finishes)."""
        self._scraper.shutdown(wait=False)


class CallbackCollector:
    """Metrics computed at scrape time: `read` takes what they show from live
    state (on the event loop; a coroutine function if it takes turns), as the
    arguments of `families`, which makes metric families of them (on any
    thread)."""

    def __init__(
        self,
        read: Callable[[], tuple[Any, ...] | Awaitable[tuple[Any, ...]]],
        families: Callable[..., Iterator[Any]],
    ) -> None:
        self._read = read
        self._families = families

    async def take(self) -> Callable[[], Iterator[Any]]:
        """What the metrics are now, to be made into families later."""
        read = self._read()
        values = await read if inspect.isawaitable(read) else read
        return functools.partial(self._families, *values)


class _Scrape(Collector):
    """The registry's metrics and the callbacks' families, of what they took."""

    def __init__(self, registry: CollectorRegistry, taken: list[Callable[[], Iterator[Any]]]):
        self._registry = registry
        self._taken = taken

    def collect(self) -> Iterator[Any]:
        yield from self._registry.collect()
        for families in self._taken:
            yield from families()


def cache_families(used: int, budget: int, fetched: int) -> Iterator[Any]:
    """The object cache: bytes held (objects as decoded, roughly, and the id
    filters charged to it) and its budget, and objects fetched from the store."""
    held = GaugeMetricFamily(
        "simplequeue_cache_bytes", "Object cache: bytes held and budget", labels=["kind"]
    )
    held.add_metric(["used"], used)
    held.add_metric(["budget"], budget)
    yield held
    yield CounterMetricFamily(
        "simplequeue_cache_fetches", "Objects fetched into the cache from the store", value=fetched
    )


def http_families(in_progress: int, connections: int) -> Iterator[Any]:
    """The HTTP listener now: requests in progress (long polls among them) and
    open connections."""
    yield GaugeMetricFamily(
        "simplequeue_http_requests_in_progress",
        "HTTP requests in progress (long polls among them)",
        value=in_progress,
    )
    yield GaugeMetricFamily(
        "simplequeue_http_connections", "Open HTTP connections", value=connections
    )


def clock_families(error: float) -> Iterator[Any]:
    """The store's clock as this broker estimates it: how far off it may be
    (leases count from the latest it may be, and are reaped after the earliest:
    by this much each)."""
    yield GaugeMetricFamily(
        "simplequeue_store_clock_error_seconds",
        "How far this broker's estimate of the store's clock may be off, either way",
        value=error,
    )


def cluster_families(
    live: int,
    forwarded: int,
    fallbacks: int,
    undone: int,
    reaped: int,
    delivered: int,
    acquired: int,
    fired: int,
) -> Iterator[Any]:
    """This broker among the others: live brokers it sees, requests it passed to
    a topic's owner (and times the owner did not answer), and what its owner
    duties did."""
    yield GaugeMetricFamily("simplequeue_live_brokers", "Live brokers, as this one sees them", live)
    for name, help_text, value in (
        ("forwarded", "Requests passed to the topic's owner", forwarded),
        (
            "forward_fallbacks",
            "Times a topic's owner did not answer and the next was tried",
            fallbacks,
        ),
        (
            "forward_undone",
            "Jobs of pops and claims passed on whose answer was lost, given back by their owner",
            undone,
        ),
        ("reaped", "Expired leases returned to pending or dead by this broker", reaped),
        (
            "followups_delivered",
            "Follow-up jobs this broker delivered into their topics",
            delivered,
        ),
        ("topics_taken_over", "Topic heads read when this broker came to own them", acquired),
        ("schedule_jobs_fired", "Jobs this broker enqueued for schedules whose slot came", fired),
    ):
        yield CounterMetricFamily(f"simplequeue_{name}", help_text, value=value)


def commit_families(stats: Any, topics: dict[str, dict[str, Any]]) -> Iterator[Any]:
    """Committer counters, and per topic its jobs by state, what it ever did and
    the age of its oldest due job, as metric families (Engine.cached_gauges)."""
    for name, help_text in (
        ("batches", "Batches committed or answered"),
        ("mutations", "Mutations submitted"),
        ("writes", "Head writes that landed"),
        ("bytes_written", "Bytes written (heads and segments)"),
        ("conflicts", "Compare-and-set races lost"),
        ("ambiguous", "Writes whose outcome had to be read back"),
        ("reloads", "Head reads"),
        ("head_bytes_written", "Bytes of heads written"),
        ("fetch_rounds", "Times a batch or a read waited for objects to be fetched"),
        ("segments_written", "Segments written"),
        ("segments_deleted", "Segments deleted"),
    ):
        value = getattr(stats, name)
        yield CounterMetricFamily(f"simplequeue_commit_{name}", help_text, value=value)
    jobs = GaugeMetricFamily(
        "simplequeue_jobs", "Jobs by topic and state, now", labels=["topic", "state"]
    )
    ever = CounterMetricFamily(
        "simplequeue_job_outcomes",
        "Jobs ever enqueued, completed, nacked, gone dead, dropped over the dead limit, "
        "cancelled, delivered as follow-ups into other topics, or given back after a "
        "pop whose caller left (completed, then not)",
        labels=["topic", "outcome"],
    )
    oldest = GaugeMetricFamily(
        "simplequeue_oldest_pending_age_seconds",
        "Seconds the job of a topic due longest has waited since it came due (its run_at, "
        "or its enqueue if later: a delay is no wait; 0 when none waits; no sample when the job "
        "is in a segment the broker's cache does not hold)",
        labels=["topic"],
    )
    outbox = GaugeMetricFamily(
        "simplequeue_outbox_jobs",
        "Follow-up jobs a topic's acks recorded for other topics, not delivered yet",
        labels=["topic"],
    )
    lag = GaugeMetricFamily(
        "simplequeue_outbox_lag_seconds",
        "Seconds the oldest undelivered follow-up of a topic has waited (0 when none; no "
        "sample when it is in a segment the broker's cache does not hold)",
        labels=["topic"],
    )
    for topic, g in sorted(topics.items()):
        for state in ("pending", "delayed", "claimed", "dead"):
            jobs.add_metric([topic, state], g["counts"][state])
        for outcome, value in g["totals"].items():
            ever.add_metric([topic, outcome], value)
        # An age not known from the cache (None) is left out, not said to be 0.
        if g["oldest_pending_age"] is not None:
            oldest.add_metric([topic], g["oldest_pending_age"])
        outbox.add_metric([topic], g["outbox"])
        if g["outbox_lag"] is not None:
            lag.add_metric([topic], g["outbox_lag"])
    yield jobs
    yield ever
    yield oldest
    yield outbox
    yield lag


class InstrumentedStore(ObjectStore):
    """An ObjectStore that counts and times every request to the one it wraps."""

    def __init__(self, inner: ObjectStore, metrics: Metrics) -> None:
        self.inner = inner
        self.url = inner.url
        self.held_descriptors = inner.held_descriptors
        self.clock = inner.clock  # the wrapped store's time, fed by its requests
        self._metrics = metrics

    def _observe(self, kind: str, started: float, outcome: str) -> None:
        self._metrics.store_requests.labels(kind, outcome).inc()
        self._metrics.store_seconds.labels(kind).observe(time.perf_counter() - started)

    async def _timed(self, kind: str, call: Any) -> Any:
        started = time.perf_counter()
        try:
            result = await call
        except PreconditionFailed:
            self._observe(kind, started, "precondition_failed")
            raise
        except ObjectNotFound:
            self._observe(kind, started, "not_found")
            raise
        except Exception:
            self._observe(kind, started, "error")
            raise
        self._observe(kind, started, "ok")
        return result

    async def get(self, key: str) -> tuple[bytes, str]:
        result: tuple[bytes, str] = await self._timed("get", self.inner.get(key))
        return result

    async def put(self, key: str, data: bytes) -> str:
        etag: str = await self._timed("put", self.inner.put(key, data))
        return etag

    async def put_if(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        call = self.inner.put_if(key, data, if_match=if_match, if_none_match=if_none_match)
        etag: str = await self._timed("put_if", call)
        return etag

    async def put_if_after(
        self,
        objects: Mapping[str, bytes],
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        if type(self.inner).put_if_after is ObjectStore.put_if_after:
            # Request by request (S3's): each is counted and timed as a put_if.
            return await super().put_if_after(
                objects, key, data, if_match=if_match, if_none_match=if_none_match
            )
        # Done in one go (localfs): timed as one request, counted as the
        # put_ifs it makes.
        call = self.inner.put_if_after(
            objects, key, data, if_match=if_match, if_none_match=if_none_match
        )
        landed = "error"  # the objects' outcome: unknown when the call failed
        try:
            etag: str = await self._timed("put_if", call)
            landed = "ok"
        except PreconditionFailed:
            landed = "ok"  # the condition is the head's: the objects were written
            raise
        finally:
            if objects:
                self._metrics.store_requests.labels("put_if", landed).inc(len(objects))
        return etag

    async def delete(self, key: str) -> None:
        await self._timed("delete", self.inner.delete(key))

    async def list(self, prefix: str = "") -> list[str]:
        keys: list[str] = await self._timed("list", self.inner.list(prefix))
        return keys

    async def list_top(self, prefix: str) -> builtins.list[str]:
        keys: builtins.list[str] = await self._timed("list", self.inner.list_top(prefix))
        return keys

    async def list_folders(self, prefix: str) -> builtins.list[str]:
        folders: builtins.list[str] = await self._timed("list", self.inner.list_folders(prefix))
        return folders

    async def sweep_leftovers(self, older_than: float) -> int:
        return await self.inner.sweep_leftovers(older_than)

    async def sample_clock(self) -> None:
        await self.inner.sample_clock()

    async def conditional_writes_fault(self) -> str | None:
        return await self.inner.conditional_writes_fault()

    def clock_error(self, now: float) -> float:
        return self.inner.clock_error(now)

    def clock_ahead(self, now: float) -> float:
        return self.inner.clock_ahead(now)

    def clock_behind(self, now: float) -> float:
        return self.inner.clock_behind(now)

    async def close(self) -> None:
        await self.inner.close()
