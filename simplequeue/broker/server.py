"""A broker: the store, the committer, the HTTP (and RESP) listeners, the reaper
and the broker.json announcer, started and stopped together.

Stopping is graceful: listeners close first, then in-flight batches land, then
the broker resigns broker.json so that a standby takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

from aiohttp import web

from simplequeue import keys
from simplequeue.broker.discovery import Announcer
from simplequeue.broker.engine import Engine
from simplequeue.broker.http import build_app
from simplequeue.broker.metrics import (
    CallbackCollector,
    InstrumentedStore,
    Metrics,
    commit_families,
)
from simplequeue.broker.resp import RespServer
from simplequeue.broker.settings import BrokerSettings, default_advertise_url, parse_addr
from simplequeue.errors import ObjectNotFound, SimpleQueueError, StoreUnavailable
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore import ObjectStore, store_from_url

log = logging.getLogger(__name__)


def commit_settings(settings: BrokerSettings, store_url: str) -> CommitSettings:
    """The committer's settings. On S3, where writes are slow and billed, the
    pause after a write for its callers' next requests (group commit's linger)
    is longer: twice a write's time, at most 25 ms; elsewhere half of it, at most 5 ms."""
    on_s3 = store_url.startswith("s3://")
    linger, linger_max = (2.0, 0.025) if on_s3 else (0.5, 0.005)
    if settings.batch_wait is not None:
        linger_max = settings.batch_wait
    limits = settings.limits
    if on_s3:
        # S3 bills requests, not bytes: heads twice as large spill half as
        # many segments, each one PUT.
        limits = dataclasses.replace(
            limits,
            inline_pending_bytes=2 * limits.inline_pending_bytes,
            inline_records_bytes=2 * limits.inline_records_bytes,
            inline_dead_bytes=2 * limits.inline_dead_bytes,
        )
    return CommitSettings(
        limits=limits,
        budget=settings.commit_budget,
        linger=linger,
        linger_max=linger_max,
    )


class Broker:
    """One simplequeue broker process's worth of services."""

    def __init__(self, settings: BrokerSettings, store: ObjectStore | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.store: ObjectStore = InstrumentedStore(
            store or store_from_url(settings.store_url), self.metrics
        )
        self.committer = GroupCommitter(
            self.store,
            broker_id=settings.broker_id,
            settings=commit_settings(settings, self.store.url),
        )
        self.committer.on_batch = self.metrics.batch_sizes.observe
        self.engine = Engine(self.committer)
        self.metrics.add_collector(
            CallbackCollector(
                lambda: commit_families(self.committer.stats, self.committer.cached_counts())
            )
        )
        self.url = ""
        self.announcer: Announcer = Announcer(
            self.store, broker_id=settings.broker_id, url="", lease_s=settings.broker_lease
        )
        self._runner: web.AppRunner | None = None
        self.redis: RespServer | None = None  # the RESP listener, with --redis-addr
        self._tasks: list[asyncio.Task[Any]] = []
        self._known_topics: list[str] = []

    async def start(self) -> None:
        """Listen, announce, and start the reaper."""
        host, port = parse_addr(self.settings.addr)
        self._runner = web.AppRunner(
            build_app(self), handler_cancellation=True, access_log=None, shutdown_timeout=5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        bound_port = int(self._runner.addresses[0][1])
        self.url = self.settings.advertise_url or default_advertise_url(host, bound_port)
        self.announcer.url = self.url
        self.announcer.on_epoch = self._set_epoch
        self.committer.on_fenced = lambda writer: self.announcer.poke()
        if self.settings.redis_addr:
            self.redis = RespServer(self)
            try:
                await self.redis.start(self.settings.redis_addr)
            except OSError:
                await self._runner.cleanup()  # leave nothing listening behind
                raise
        await self._announce_once()
        self._tasks = [
            asyncio.create_task(self.announcer.run(), name="announcer"),
            asyncio.create_task(self._reap_forever(), name="reaper"),
        ]

    def _set_epoch(self, epoch: int) -> None:
        self.committer.epoch = epoch

    async def _announce_once(self) -> None:
        try:
            await self.announcer.step()
        except StoreUnavailable as exc:  # serve anyway; the announcer keeps trying
            log.warning("could not read broker.json at start: %s", exc)

    async def _reap_forever(self) -> None:
        """Reap every topic: those in the store (listed now and then) and those
        this broker has touched since. Sweep orphan segments now and then."""
        loop = asyncio.get_running_loop()
        listed_at, swept_at = -1e18, loop.time()
        while True:
            try:
                if loop.time() - listed_at >= self.settings.topic_scan_interval:
                    self._known_topics = await self.committer.topics()
                    listed_at = loop.time()
                topics = sorted({*self._known_topics, *self.committer.known_topics()})
                for topic in topics:
                    await self.committer.reap(topic)
                if loop.time() - swept_at >= self.settings.sweep_interval:
                    swept_at = loop.time()
                    for topic in topics:
                        await self.committer.sweep(topic)
            except SimpleQueueError as exc:
                log.warning("reaper: %s", exc)
            await asyncio.sleep(self.settings.reap_interval)

    async def check_store(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        with contextlib.suppress(ObjectNotFound):
            await self.store.get(keys.BROKER)

    async def stop(self) -> None:
        """Stop listening, let in-flight batches land, resign broker.json."""
        if self.redis is not None:
            await self.redis.stop()
        if self._runner is not None:
            await self._runner.cleanup()  # stop accepting; let handlers finish
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.committer.close()
        await self.announcer.resign()
        await self.store.close()
