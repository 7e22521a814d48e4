"""A broker: the store, the committer, the HTTP (and RESP) listeners, its place
among the brokers (registration, forwarding to topics' owners), the owner
duties and the broker.json announcer, started and stopped together: the
composition root, which nothing imports.

Stopping is graceful: listeners close first, then in-flight batches land, then
the broker leaves the registry and resigns broker.json so that the others take
over its topics and a standby the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from simplequeue import api
from simplequeue.broker.discovery import Announcer
from simplequeue.broker.duties import Duties, DutySettings
from simplequeue.broker.engine import Engine
from simplequeue.broker.forwarding import Forwarder, Router, pool_size
from simplequeue.broker.http import HttpApi, HttpServices, content_codings
from simplequeue.broker.listener import (
    MIN_CONNECTIONS,
    HttpListener,
    Limits,
    default_max_connections,
)
from simplequeue.broker.membership import Membership, Peer
from simplequeue.broker.metrics import (
    CallbackCollector,
    InstrumentedStore,
    Metrics,
    cache_families,
    clock_families,
    cluster_families,
    commit_families,
    http_families,
)
from simplequeue.broker.page import BrokerView, Presence, RecordView
from simplequeue.broker.parallel import each
from simplequeue.broker.resp import RespServer, RespSettings
from simplequeue.broker.settings import (
    BrokerSettings,
    default_advertise_url,
    is_loopback,
    parse_addr,
)
from simplequeue.errors import StoreUnavailable, StoreUnusable
from simplequeue.groupcommit import CommitSettings, CommitStats, GroupCommitter
from simplequeue.objstore import ObjectStore, store_from_url
from simplequeue.state import Bounds, TopicState

log = logging.getLogger(__name__)

# The most a stopping broker waits to say goodbye (remove its membership record,
# resign broker.json). A courtesy: the other brokers take both over once they
# stop being renewed, within broker_lease. Unbounded, a store that stopped
# answering kept a stopping broker up for ever (for its client's timeouts on
# S3: 15 s a request, and resigning takes two), past the grace a supervisor
# gives it (Kubernetes: 30 s) before SIGKILL.
FAREWELL_TIMEOUT = 5.0
# Before that, the most it spends telling the next owners of the topics it has
# something due on to read them (Broker._hand_over_due), so many at once.
HAND_OVER_TIMEOUT = 2.0
HAND_OVER_PARALLEL = 16
# A topic another broker owns that this one wrote (standing in for it) is
# told to its owner, whose long polls trust its memory (engine
# OWNER_LOOK_INTERVAL): at once, then at most once in this many seconds.
TELL_OWNER_EVERY = 1.0
# The most a stopping broker waits to close the forwarder's and the store's
# connections.
CLOSE_TIMEOUT = 1.0


def commit_settings(settings: BrokerSettings, store_url: str) -> CommitSettings:
    """The committer's settings. On S3, where writes are slow and billed, the
    pause after a write for its callers' next requests (group commit's linger)
    is longer: twice a write's time, at most 25 ms; elsewhere half of it, at most 5 ms."""
    on_s3 = store_url.startswith("s3://")
    linger, linger_max = (2.0, 0.025) if on_s3 else (0.5, 0.005)
    if settings.batch_wait is not None:
        linger_max = settings.batch_wait
    # S3 bills requests, not bytes: heads twice as large spill half as many
    # segments, each one PUT.
    bounds = Bounds().scaled(2) if on_s3 else Bounds()
    return CommitSettings(
        bounds=bounds,
        policy=settings.policy,
        budget=settings.commit_budget,
        linger=linger,
        linger_max=linger_max,
        cache_bytes=settings.cache_bytes,
    )


class Broker:
    """One simplequeue broker process's worth of services."""

    def __init__(self, settings: BrokerSettings, store: ObjectStore | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.store: ObjectStore = InstrumentedStore(
            store or store_from_url(settings.store_url), self.metrics
        )
        # Every time this broker writes into the store (lease expiries, records,
        # heartbeats) is on the store's clock: brokers whose own clocks disagree
        # agree on it (SPEC 4.3; docs/RELIABILITY.md, "Clocks").
        self.committer = GroupCommitter(
            self.store,
            broker_id=settings.broker_id,
            settings=commit_settings(settings, self.store.url),
            clock=self.store.now,
            clock_ahead=self.store.clock_ahead,
            clock_behind=self.store.clock_behind,
        )
        self.committer.on_batch = self.metrics.batch_sizes.observe
        self.engine = Engine(self.committer)
        self.metrics.add_collector(
            CallbackCollector(
                self._commit_figures,
                commit_families,
            )
        )
        store = self.store
        self.metrics.add_collector(
            CallbackCollector(lambda: (store.clock_error(store.now()),), clock_families)
        )
        self.metrics.add_collector(
            CallbackCollector(
                lambda: (
                    (0, 0)
                    if self.http is None
                    else (self.http.requests_in_progress, self.http.open_connections)
                ),
                http_families,
            )
        )
        cache = self.committer.cache
        self.metrics.add_collector(
            CallbackCollector(lambda: (cache.used, cache.budget, cache.fetched), cache_families)
        )
        self.url = ""
        self.announcer: Announcer = Announcer(
            self.store,
            broker_id=settings.broker_id,
            url="",
            lease_s=settings.broker_lease,
            clock=self.store.now,
        )
        self.membership = Membership(
            self.store,
            broker_id=settings.broker_id,
            url="",
            lease_s=settings.broker_lease,
            clock=self.committer.clock,
        )
        # Its connections to the other brokers draw on the descriptors left
        # for connections, as clients' do (start() leaves them out of the cap).
        self.forwarder = Forwarder(
            self.membership,
            token=settings.token,
            answer_within=settings.forward_timeout,
            peers_keepalive=settings.keepalive_timeout,
            connections=pool_size(default_max_connections(reserved=self.store.held_descriptors)),
        )
        self.duties = Duties(
            self.engine,
            self.membership,
            DutySettings(
                sweep_interval=settings.sweep_interval, deliver_bytes=settings.max_body // 2
            ),
            # Dues are on the clock leases are reaped by, which runs on while
            # now() stands still after a step back of the store's clock.
            clock=self.engine.earliest_now,
            now=self.committer.clock,
            hand_over=self._hand_over_at_due,
            deliver_to=Router(self.engine, self.forwarder),
        )
        self.membership.on_change = self._view_changed
        self.engine.owns = self.membership.owns
        self.engine.settled = self.membership.settled_since
        self.metrics.add_collector(
            CallbackCollector(
                lambda: (
                    len(self.membership.live),
                    self.forwarder.forwarded,
                    self.forwarder.fallbacks,
                    self.forwarder.undone,
                    self.duties.reaped,
                    self.duties.delivered,
                    self.duties.acquired,
                    self.duties.fired,
                ),
                cluster_families,
            )
        )
        self.committer.on_landed = self._landed
        self.committer.on_loaded = lambda t, state: self.duties.loaded(t, self._next_due(state))
        self.committer.on_failed = self.duties.failed
        self.http: HttpListener | None = None  # the HTTP listener, once started
        self.http_api: HttpApi | None = None  # what it answers with
        self.redis: RespServer | None = None  # the RESP listener, with --redis-addr
        self._tasks: list[asyncio.Task[Any]] = []
        # Topics whose owner is being told this broker wrote them (_tell_owner),
        # and whether they were written again since it was last told.
        self._telling: dict[str, bool] = {}
        self._tells: set[asyncio.Task[None]] = set()

    def about(self) -> dict[str, Any]:
        """Who this broker is, for /healthz."""
        return {"broker_id": self.settings.broker_id, "active": self.announcer.active}

    def presence(self) -> Presence:
        """This broker and the broker.json record it last saw, for the status page."""
        announcer = self.announcer
        record = announcer.seen
        now = self.committer.clock()
        return Presence(
            broker=BrokerView(
                id=self.settings.broker_id,
                url=self.url,
                epoch=announcer.epoch,
                active=announcer.active,
            ),
            record=None
            if record is None
            else RecordView(
                broker_id=record.broker_id,
                url=record.url,
                epoch=record.epoch,
                heartbeat_age=max(0.0, record.age(now)),
                lease_s=record.lease,
                stale=record.age(now) > record.lease,
            ),
        )

    async def start(self) -> None:
        """Check the store, listen, announce, register, and take over the
        topics this broker owns."""
        await self._check_store()
        host, port = parse_addr(self.settings.addr)
        services = HttpServices(
            engine=self.engine,
            metrics=self.metrics,
            token=self.settings.token,
            max_body=self.settings.max_body,
            body_timeout=self.settings.body_timeout,
            about=self.about,
            presence=self.presence,
            url=lambda: self.url,
            forwarder=self.forwarder,
            refresh=self._refresh,
            loopback=is_loopback(host),
            body_limit=self._body_limit,
        )
        # The descriptors left for connections, less the forwarder's pool: a
        # request passed on holds one of each. A quarter for RESP clients, if
        # it listens, and the rest (or --max-connections) for HTTP.
        sockets = default_max_connections(
            reserved=self.store.held_descriptors + self.forwarder.connections
        )
        resp_clients = max(MIN_CONNECTIONS, sockets // 4) if self.settings.redis_addr else 0
        limits = Limits(
            header_timeout=self.settings.header_timeout,
            keepalive_timeout=self.settings.keepalive_timeout,
            max_connections=(
                max(MIN_CONNECTIONS, sockets - resp_clients)
                if self.settings.max_connections is None
                else self.settings.max_connections
            ),
        )
        self.http_api = HttpApi(services)
        self.http = HttpListener(
            self.http_api,
            limits,
            max_body=self.settings.max_body,
            body_limit=self._body_limit,
            shutdown_timeout=5,
            handler_cancellation=True,
            auto_decompress=False,  # bodies are decoded by Call.read(), which answers errors
            access_log=None,
        )
        await self.http.start(host, port)
        # A wildcard bind's name is looked up (getfqdn, getaddrinfo: DNS may
        # take seconds): in a thread, as the listener already takes requests.
        advertised = self.settings.advertise_url
        if not advertised:
            advertised = await asyncio.to_thread(default_advertise_url, host, self.http.port)
        self.url = advertised
        self.announcer.url = self.url
        self.membership.set_url(self.url)
        self.announcer.on_epoch = self._set_epoch
        self.committer.on_fenced = lambda writer: self.announcer.poke()
        if self.settings.redis_addr:
            self.redis = RespServer(
                Router(self.engine, self.forwarder),
                self.metrics,
                RespSettings(
                    token=self.settings.token,
                    max_body=self.settings.max_body,
                    max_clients=resp_clients,
                    claim_bytes=self.engine.claim_bytes,
                ),
            )
            try:
                await self.redis.start(self.settings.redis_addr)
            except OSError:
                await self.http.stop()  # leave nothing listening behind
                await self.http_api.close()
                raise
        await self._announce_once()
        await self._join()
        self.duties.start_owning()
        self._tasks = [
            asyncio.create_task(self.announcer.run(), name="announcer"),
            asyncio.create_task(self.membership.run(), name="membership"),
            asyncio.create_task(self.duties.run(), name="duties"),
        ]

    async def _commit_figures(self) -> tuple[CommitStats, dict[str, dict[str, Any]]]:
        """For /metrics: the committer's counters, and per-topic figures of the
        topics this broker owns. Others it holds (its status page read them,
        or it wrote them while their owner did not answer) are as they were
        then: their owner reports them."""
        stats = dataclasses.replace(self.committer.stats)
        gauges = await self.engine.cached_gauges()
        return stats, {t: g for t, g in gauges.items() if self.membership.owns(t)}

    def _next_due(self, state: TopicState) -> float | None:
        """When the topic `state` holds next wants its owner (leases reaped as
        Engine.tend reaps them, after the clock's error; on the duties' clock,
        Engine.earliest_now). A landing's listener: no I/O, so an outbox front
        that left the cache counts as due now (it raised SegmentMissing there,
        and the landing's due was lost)."""
        return self.engine.cached_due(state, self.committer.clock())

    def _landed(self, topic: str, state: TopicState) -> None:
        """A write of this broker's landed on `topic`. A topic another broker
        owns (this one stood in for it) is told to its owner, in the background."""
        self.duties.wrote(topic, self._next_due(state))
        if self.membership.home(topic) == self.membership.me:
            return
        if topic in self._telling:
            self._telling[topic] = True
            return
        self._telling[topic] = False
        task = asyncio.create_task(self._tell_owner(topic), name=f"tell {topic}")
        self._tells.add(task)
        task.add_done_callback(self._tells.discard)

    async def _tell_owner(self, topic: str) -> None:
        """Tell `topic`'s owner to read it again, and again a while later if
        it was written again meanwhile: its long polls see the jobs this
        broker wrote at once, not at their next look at the store. Not while
        it is suspect (this broker stood in for it because it did not
        answer: a request to it every second for each topic written would
        wait for nothing), but once it is not, and again at each end of its
        suspicion while a tell gets no answer (one tell goes then: it makes
        the owner suspect again, and the others are not sent). Best effort:
        an owner that does not answer still looks in time."""
        untold = True
        try:
            while True:
                home = self.membership.home(topic)
                if home == self.membership.me:
                    return
                if untold and self.membership.owner(topic) == home:  # not suspect
                    told = False
                    with contextlib.suppress(Exception):
                        told = await self._hand_over(topic, home)
                    # Not answered, it is suspect again (this tell made it, or
                    # one before it in line, Forwarder.tell): told once it is
                    # not, while it is this topic's home.
                    untold = not told and self.membership.suspected(home.broker_id)
                await asyncio.sleep(TELL_OWNER_EVERY)
                if self._telling.get(topic):  # written again meanwhile
                    untold, self._telling[topic] = True, False
                elif not untold:
                    return
        finally:
            self._telling.pop(topic, None)

    def _view_changed(self, old: tuple[Peer, ...], new: tuple[Peer, ...]) -> None:
        """The live brokers changed: the duties take over what this broker now
        owns, and every long poll looks at the store again, as often as a
        topic it does not own until the others have all seen the change
        (Membership.settled_owner)."""
        self.duties.view_changed(old, new)
        self.committer.wake_waiting()

    async def _hand_over(self, topic: str, owner: Peer) -> bool:
        """Tell `topic`'s owner to read it again (this broker wrote it while the
        owner did not answer); whether it answered."""
        return await self.forwarder.tell(owner, f"/topics/{topic}/refresh")

    async def _hand_over_at_due(self, topic: str, owner: Peer) -> bool:
        """_hand_over, for the duties at a topic's due: not told unless a
        place among the tells comes within answer_within (the duties then
        tend it here). Waiting in line behind a stand-in's tells, one for
        each topic it wrote (one at a time at the smallest pool), held up
        this broker's reaping for as long as they took."""
        path = f"/topics/{topic}/refresh"
        return await self.forwarder.tell(owner, path, place_within=self.forwarder.answer_within)

    async def _hand_over_due(self) -> None:
        """Before leaving: tell the broker that owns each topic after this one,
        and that this broker has something due on (a lease, a slot), to read it.
        One that has not seen this broker yet sees no departure, and would
        leave the topic alone until something wrote it."""
        me = self.membership.me

        async def one(topic: str) -> None:
            heir = next((p for p in self.membership.order(topic) if p != me), None)
            if heir is not None:
                with contextlib.suppress(Exception):  # it learns of it later, or not
                    await self._hand_over(topic, heir)

        due = [t for t in self.duties.due_topics() if self.membership.owns(t)]
        await each(due, HAND_OVER_PARALLEL, one)

    async def _refresh(self, topic: str) -> None:
        await self.engine.refresh(topic)
        self.duties.refresh(topic)

    def _set_epoch(self, epoch: int) -> None:
        self.committer.epoch = epoch

    async def _join(self) -> None:
        """Register, and learn which brokers are live, before serving topics as
        their owner."""
        try:
            await self.membership.register()
            await self.membership.step()
        except StoreUnavailable as exc:  # serve anyway; the registry keeps trying
            log.warning("could not register at start: %s", exc)

    async def _check_store(self) -> None:
        """Refuse, before listening, a store that takes conditional writes for
        plain ones: every broker's write would win over the others', jobs lost
        without an error (StoreUnusable: simplequeued exits with its reason);
        so too one that is not there (no such bucket) or whose answers carry
        no time (S3's without a Date: sample_clock), on which no lease could be
        timed. A store that does not answer now, or refuses for a reason that
        may clear up (access denied while a policy propagates, no credentials
        yet, a clock NTP has not set), is served all the same and checked
        again before its first write."""
        try:
            fault = await self.store.conditional_writes_fault()
            if fault is None:
                await self.store.sample_clock()
        except StoreUnusable:
            raise
        except StoreUnavailable as exc:  # serve anyway; the first write checks again
            log.warning("could not check the store at start: %s", exc)
            return
        if fault is not None:
            raise StoreUnusable(f"{self.store.url}: {fault}")

    async def _announce_once(self) -> None:
        try:
            await self.announcer.step()
        except StoreUnavailable as exc:  # serve anyway; the announcer keeps trying
            log.warning("could not read broker.json at start: %s", exc)

    def _body_limit(self, headers: Mapping[str, str]) -> int:
        """A request's largest body: --max-body, or api.FORWARDED_ROOM times it
        (and MAX_BATCH ids more) for one a peer passed on (it adds ids, and
        RESP values grow as JSON), the peer known by its incarnation."""
        forwarded = headers.get(api.FORWARDED_HEADER)
        if forwarded is not None and self.membership.vouches(forwarded):
            return self.settings.max_body * api.FORWARDED_ROOM + api.MAX_BATCH * 64
        if any(coding != "identity" for coding in content_codings(headers)):
            # Bounded decoded by Call.read: encoded, a body that does not
            # compress (stored gzip blocks, already compressed payloads) is a
            # little larger than what it holds. Not so without a coding
            # (identity): its body is read as it came.
            return self.settings.max_body + self.settings.max_body // 64 + 1024
        return self.settings.max_body

    async def stop(self) -> None:
        """Stop listening, let in-flight batches land (for at most the commit
        budget, then cancel them), leave the membership and resign broker.json
        (for at most FAREWELL_TIMEOUT) and close the connections (CLOSE_TIMEOUT
        each): bounded whatever the store does."""
        # Long polls answer now (nothing), rather than hold the stop for as
        # long as they were to wait; their callers claim again elsewhere.
        self.committer.end_long_polls()
        self.forwarder.end_long_polls()
        # Stop accepting and let handlers finish: both listeners at once (each
        # may wait 5 s for a request in progress, aiohttp's twice).
        await asyncio.gather(*(s.stop() for s in (self.redis, self.http) if s is not None))
        if self.http_api is not None:
            await self.http_api.close()
        tasks = [*self._tasks, *self._tells]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            # As long as a mutation is retried: a write that has not landed by
            # then is one whose answer the store keeps back. It lands whole or
            # not at all, and its callers, cut off by the listener's stop, retry.
            async with asyncio.timeout(self.settings.commit_budget):
                await self.committer.close()
        except TimeoutError:
            log.warning(
                "writes still in flight after %g s: stopping without their answers",
                self.settings.commit_budget,
            )
            await self.committer.abort()  # nothing of it writes after the store is closed
        with contextlib.suppress(TimeoutError):  # a courtesy too
            async with asyncio.timeout(HAND_OVER_TIMEOUT):
                await self._hand_over_due()
        try:
            async with asyncio.timeout(FAREWELL_TIMEOUT):
                farewell = await asyncio.gather(
                    self.membership.leave(), self.announcer.resign(), return_exceptions=True
                )
            for failed in (f for f in farewell if isinstance(f, BaseException)):
                log.warning("stopping without a goodbye: %s", failed)
        except TimeoutError:
            log.warning(
                "the store did not answer within %g s: stopping without resigning; "
                "the other brokers take over within %g s",
                FAREWELL_TIMEOUT,
                self.settings.broker_lease,
            )
        self.metrics.close()
        for closing in (self.forwarder.close, self.store.close):
            try:
                # A connection whose peer stopped reading closes only once TCP gives up.
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await closing()
            except TimeoutError:
                log.warning("%s did not finish within %g s", closing.__qualname__, CLOSE_TIMEOUT)
