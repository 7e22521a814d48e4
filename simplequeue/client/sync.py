"""SyncClient: the async Client's methods for scripts, on a private event loop.

The loop runs in a daemon thread of its own, so a SyncClient works from any
thread, including one that already runs an event loop of its own. A
SyncClient dropped without close() has its client closed and its thread
ended when it is garbage.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

from simplequeue import api
from simplequeue.client.client import AckItem, Client
from simplequeue.client.followups import follow_up_specs
from simplequeue.client.job import Job
from simplequeue.client.lists import id_list, job_list
from simplequeue.errors import SimpleQueueError
from simplequeue.objstore import ObjectStore

T = TypeVar("T")
A = TypeVar("A")


class SyncClient:
    """Blocking twin of Client: same methods, same arguments and defaults, same
    errors (tests/test_client.py checks that the signatures match)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        topic: str = "default",
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        retry_budget: float | None = None,
        store: ObjectStore | None = None,
        max_age: float = 30.0,
    ) -> None:
        # The client first: arguments it refuses leave no thread running.
        self._client: Client | None = None
        if url is not None or store is not None:
            self._client = Client(
                url,
                topic=topic,
                token=token,
                timeout=timeout,
                retries=retries,
                retry_budget=retry_budget,
                store=store,
                max_age=max_age,
            )
        self._loop = asyncio.new_event_loop()
        # Calls in flight, as the loop's tasks (touched in the loop's thread
        # only); once `_closing` is set (under `_lock`), no call starts.
        self._calls: set[asyncio.Task[Any]] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(
            target=_run_forever, args=(self._loop,), name="simplequeue-sync-client", daemon=True
        )
        self._thread.start()
        self._finalizer = _finalizer(self, self._loop, self._client)

    def _use(self, client: Client) -> None:
        """Serve through `client` (made on this loop), closed with the loop if
        this SyncClient is dropped without close()."""
        self._client = client
        self._finalizer.detach()
        self._finalizer = _finalizer(self, self._loop, client)

    @classmethod
    def _wrapping(cls, make: Callable[[], Coroutine[Any, Any, Client]]) -> SyncClient:
        """A SyncClient, on a loop of its own, of the Client `make` builds there
        (its loop stopped if `make` fails)."""
        client = cls()
        try:
            client._use(client._run(make()))
        except BaseException:
            client.close()
            raise
        return client

    @classmethod
    def discover(
        cls,
        store: ObjectStore | str,
        *,
        max_age: float = 30.0,
        topic: str = "default",
        close_store: bool | None = None,
        **options: Any,
    ) -> SyncClient:
        return cls._wrapping(
            lambda: Client.discover(
                store, max_age=max_age, topic=topic, close_store=close_store, **options
            )
        )

    def for_topic(self, topic: str) -> SyncClient:
        """A client of another topic on the same broker (its own session and loop)."""

        async def make() -> Client:  # on the new client's loop: connections of its own
            store = self.client.store
            return self.client._like(topic, None if store is None else store.for_another_loop())

        return SyncClient._wrapping(make)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._closing:
                coro.close()  # never to run: no "never awaited" warning
                raise RuntimeError("this SyncClient is closed")
            future = asyncio.run_coroutine_threadsafe(self._call(coro), self._loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._closing:
                raise RuntimeError("this SyncClient was closed during the call") from None
            raise
        except BaseException:
            # Interrupted (Ctrl-C): the call stops in the loop too, as an
            # async caller's cancelled call does, and does not go on unseen.
            future.cancel()
            raise

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """`coro`, counted among the calls in flight (close() cancels them)."""
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        try:
            return await coro
        finally:
            self._calls.discard(task)

    async def _shut(self) -> None:
        """Cancel the calls in flight (other threads', whose callers then get
        RuntimeError), wait for them to end, close the client."""
        calls = list(self._calls)
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.wait(calls)
        if self._client is not None:
            await self._client.close()

    @property
    def client(self) -> Client:
        assert self._client is not None, "SyncClient needs a URL, or SyncClient.discover()"
        return self._client

    @property
    def url(self) -> str:
        return self.client.url

    def request(
        self, method: str, path: str, answer: type[A], body: Any = None, *, wait: float = 0.0
    ) -> A:
        return self._run(self.client.request(method, path, answer, body, wait=wait))

    def call(
        self,
        method: str,
        path: str,
        answer: type[A],
        body: Any = None,
        *,
        wait: float = 0.0,
        expected: frozenset[int] = frozenset(),
        done_if_repeated: type[SimpleQueueError] | None = None,
    ) -> tuple[int, A | None, bool]:
        return self._run(
            self.client.call(
                method,
                path,
                answer,
                body,
                wait=wait,
                expected=expected,
                done_if_repeated=done_if_repeated,
            )
        )

    def enqueue(
        self,
        payload: Any,
        id: str | None = None,
        priority: int = 0,
        delay: float = 0,
        max_attempts: int | None = None,
        run_at: float | datetime | None = None,
    ) -> str:
        return self._run(self.client.enqueue(payload, id, priority, delay, max_attempts, run_at))

    def enqueue_many(self, jobs: Iterable[Any]) -> list[str]:
        return self._run(self.client.enqueue_many(job_list(jobs)))

    def claim(self, worker_id: str, lease: float | None = None, wait: float = 0) -> Job | None:
        return self._run(self.client.claim(worker_id, lease, wait))

    def claim_many(
        self,
        worker_id: str,
        count: int,
        lease: float | None = None,
        wait: float = 0,
        *,
        attempt_id: str | None = None,
    ) -> list[Job]:
        return self._run(
            self.client.claim_many(worker_id, count, lease, wait, attempt_id=attempt_id)
        )

    def ack(self, job: Job | str, result: Any = None, enqueue: Iterable[Any] | None = None) -> None:
        # Checked and made a list here (a generator is iterated in the caller's
        # thread): a str or dict is refused, not taken a character or key a job.
        self._run(self.client.ack(job, result, follow_up_specs(enqueue)))

    def ack_many(self, acks: Iterable[AckItem]) -> list[dict[str, Any]]:
        return self._run(self.client.ack_many(list(acks)))

    def nack(self, job: Job | str, delay: float = 0, error: str | None = None) -> str:
        return self._run(self.client.nack(job, delay, error))

    def release(self, jobs: Iterable[Job]) -> int:
        return self._run(self.client.release(jobs))

    def heartbeat(self, job: Job | str, lease: float | None = None) -> float:
        return self._run(self.client.heartbeat(job, lease))

    def status(self) -> dict[str, int]:
        return self._run(self.client.status())

    def job(self, job_id: str, wait: float = 0) -> Job:
        return self._run(self.client.job(job_id, wait))

    def job_dict(self, job_id: str, wait: float = 0) -> dict[str, Any]:
        return self._run(self.client.job_dict(job_id, wait))

    def result(self, job_id: str, timeout: float = 30) -> Any:
        return self._run(self.client.result(job_id, timeout))

    def dead(self, offset: int = 0, limit: int | None = None) -> list[Job]:
        return self._run(self.client.dead(offset, limit))

    def requeue(self, job_ids: list[str] | None = None) -> list[str]:
        return self._run(self.client.requeue(job_ids))

    def purge(self, job_ids: list[str] | None = None) -> list[str]:
        return self._run(self.client.purge(job_ids))

    def topics(self) -> dict[str, dict[str, int]]:
        return self._run(self.client.topics())

    def cancel(self, job_ids: Iterable[str]) -> dict[str, list[str]]:
        return self._run(self.client.cancel(id_list(job_ids)))

    def schedule(
        self,
        name: str,
        payload: Any,
        every: int | None = None,
        cron: str | None = None,
        tz: str | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
    ) -> api.Schedule:
        return self._run(
            self.client.schedule(name, payload, every, cron, tz, priority, max_attempts)
        )

    def schedules(self) -> list[api.Schedule]:
        return self._run(self.client.schedules())

    def unschedule(self, name: str) -> None:
        self._run(self.client.unschedule(name))

    def settings(self, **limits: Any) -> dict[str, Any]:
        return self._run(self.client.settings(**limits))

    def close(self) -> None:
        """Close the client and stop its loop thread. Calls other threads have
        in flight end with RuntimeError (whether they took effect unknown, as
        for a call whose answer was lost); calls after it raise RuntimeError."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._finalizer.detach()
        try:
            asyncio.run_coroutine_threadsafe(self._shut(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()  # the thread closed the loop

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _run_forever(loop: asyncio.AbstractEventLoop) -> None:
    """A SyncClient's thread: its loop until stopped, then closed (its selector
    and self-pipe with it)."""
    try:
        loop.run_forever()
    finally:
        loop.close()


def _finalizer(
    owner: SyncClient, loop: asyncio.AbstractEventLoop, client: Client | None
) -> weakref.finalize[..., SyncClient]:
    """Stop `loop`, `client` closed first, once `owner` is garbage: a SyncClient
    dropped without close() would keep its thread, loop and connections for
    the life of the process, one set per client. Not at exit, when the
    process's end frees them (and a thread asked to work then may not get to)."""
    finalizer = weakref.finalize(owner, _abandon, loop, client)
    finalizer.atexit = False
    return finalizer


def _abandon(loop: asyncio.AbstractEventLoop, client: Client | None) -> None:
    """Close `client` on `loop`, then stop it, whose thread then closes it and
    ends. Not waited for: the garbage collector calls this in whatever thread
    dropped the SyncClient, its loop's own thread included. Nobody calls
    through the client any more: a call in flight holds its SyncClient."""

    async def shut() -> None:
        try:
            if client is not None:
                await client.close()
        finally:
            loop.stop()

    asyncio.run_coroutine_threadsafe(shut(), loop)
