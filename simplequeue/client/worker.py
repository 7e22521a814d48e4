"""Worker: claims jobs and runs a handler on each, concurrently.

Batch claims fill free slots; each job's lease is renewed by heartbeats while
its handler runs; a return value acks it (acks go out in batches, and the slot
is free at once), an exception nacks it with the error text and a jittered
exponential backoff (the broker sends it dead when its attempts are spent).
stop(), SIGTERM or SIGINT stop claiming and drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from simplequeue.client.client import Client
from simplequeue.client.job import Job
from simplequeue.errors import JobNotFound, LeaseLost, SimpleQueueError

log = logging.getLogger(__name__)

Handler = Callable[[Job], Awaitable[Any]]


@dataclass(frozen=True)
class Backoff:
    """Retry delays: `base` * 2^(attempt-1), capped at `cap`, scaled by a random
    factor in [1 - jitter, 1] so that retries of a burst spread out."""

    base: float = 1.0
    cap: float = 60.0
    jitter: float = 0.5

    def delay(self, attempts: int) -> float:
        raw: float = min(self.cap, self.base * 2.0 ** max(0, attempts - 1))
        return raw * (1 - self.jitter * random.random())


class Worker:
    """Runs `handler` on the client's topic's jobs, `concurrency` at a time."""

    def __init__(
        self,
        client: Client,
        handler: Handler,
        *,
        concurrency: int = 16,
        worker_id: str | None = None,
        lease: float = 30.0,
        heartbeat_every: float | None = None,
        wait: float = 5.0,
        backoff: Backoff | None = None,
        handle_signals: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.client = client
        self.handler = handler
        self.concurrency = concurrency
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.lease = lease
        self.heartbeat_every = heartbeat_every or lease / 3
        self.wait = wait
        self.backoff = backoff or Backoff()
        self.handle_signals = handle_signals
        self.processed = 0
        self.failed = 0
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._claiming: asyncio.Task[list[Job]] | None = None
        self._done = asyncio.Event()
        self._acks = _AckBatcher(client)

    async def run(self) -> None:
        """Claim and process until stop() or a signal; then drain and return."""
        self._done.clear()
        loop = asyncio.get_running_loop()
        installed = []
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, self._on_signal)
                    installed.append(sig)
        try:
            await self._claim_loop()
        finally:
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)
            await self._acks.flush()
            for sig in installed:
                loop.remove_signal_handler(sig)
            self._done.set()

    def _on_signal(self) -> None:
        log.info("signal received: draining %d running jobs", len(self._running))
        self.request_stop()

    def request_stop(self) -> None:
        """Stop claiming (safe from signal handlers and callbacks); run() then drains."""
        self._stopping.set()
        if self._claiming is not None:
            self._claiming.cancel()  # the broker gives back a claim it had not answered

    async def stop(self) -> None:
        """Stop claiming, wait for running jobs to finish, return."""
        self.request_stop()
        await self._done.wait()

    async def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            free = self.concurrency - len(self._running)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            self._claiming = asyncio.create_task(
                self.client.claim_many(self.worker_id, free, lease=self.lease, wait=self.wait)
            )
            try:
                jobs = await self._claiming
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    return
                raise
            except SimpleQueueError as exc:
                log.warning("claim failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._stopping.wait()
                continue
            finally:
                self._claiming = None
            for job in jobs:
                task = asyncio.create_task(self._process(job), name=f"job:{job.id}")
                self._running.add(task)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slot_free.set()

    async def _process(self, job: Job) -> None:
        work: asyncio.Future[Any] = asyncio.ensure_future(self.handler(job))
        beats = asyncio.create_task(self._heartbeats(job, work))
        try:
            result = await work
        except asyncio.CancelledError:
            log.warning("job %s: lost its lease; its handler was cancelled", job.id)
            return
        except Exception as exc:
            self.failed += 1
            error = "".join(traceback.format_exception_only(exc)).strip()
            await self._settle(job, self.client.nack(job, self.backoff.delay(job.attempts), error))
            return
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
        self.processed += 1
        self._acks.add(job, result)  # the slot is free now; the ack rides the next batch

    async def _settle(self, job: Job, call: Awaitable[Any]) -> None:
        try:
            await call
        except (LeaseLost, JobNotFound) as exc:
            log.warning("job %s: could not settle: %s", job.id, exc)
        except SimpleQueueError as exc:
            log.error("job %s: could not settle (it will be redelivered): %s", job.id, exc)

    async def _heartbeats(self, job: Job, work: asyncio.Future[Any]) -> None:
        """Renew the lease while the handler runs; cancel it if the lease is lost."""
        while True:
            await asyncio.sleep(self.heartbeat_every)
            try:
                await self.client.heartbeat(job, self.lease)
            except (LeaseLost, JobNotFound):
                work.cancel()
                return
            except SimpleQueueError as exc:
                log.warning("job %s: heartbeat failed: %s", job.id, exc)


class _AckBatcher:
    """Acknowledges finished jobs in batches: one request carries every ack that
    came in while the previous one was in flight (group commit, client side)."""

    BATCH = 1000

    def __init__(self, client: Client) -> None:
        self.client = client
        self.pending: list[tuple[Job, Any]] = []
        self.sender: asyncio.Task[None] | None = None

    def add(self, job: Job, result: Any) -> None:
        self.pending.append((job, result))
        if self.sender is None or self.sender.done():
            self.sender = asyncio.create_task(self._send())

    async def _send(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[: self.BATCH], self.pending[self.BATCH :]
            try:
                answers = await self.client.ack_many(batch)
            except SimpleQueueError as exc:
                log.error("%d acks failed (their jobs will be redelivered): %s", len(batch), exc)
                continue
            for answer in answers:
                if answer.get("status") != "completed":
                    log.warning("job %s: could not ack: %s", answer.get("id"), answer.get("error"))

    async def flush(self) -> None:
        """Wait until every ack added so far was sent."""
        while self.sender is not None and not self.sender.done():
            await self.sender
