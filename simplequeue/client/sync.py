"""SyncClient: the async Client's methods for scripts, on a private event loop.

The loop runs in a daemon thread of its own, so a SyncClient works from any
thread, including one that already runs an event loop of its own. A
SyncClient dropped without close() has its client closed and its thread
ended when it is garbage. In a process forked from the one that made it
(gunicorn --preload, multiprocessing), which has no such thread, its first
call starts a loop, a thread and connections of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from collections.abc import Callable, Container, Coroutine, Iterable
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, TypeVar

from simplequeue import api
from simplequeue.client.client import MAX_ANSWER, AckItem, Client
from simplequeue.client.followups import follow_up_specs
from simplequeue.client.job import Job
from simplequeue.client.lists import id_list, job_list
from simplequeue.errors import SimpleQueueError
from simplequeue.objstore import ObjectStore

T = TypeVar("T")
A = TypeVar("A")

# How long an interrupted call (Ctrl-C) waits for its request to be given up
# in the loop before the interruption goes on.
INTERRUPTED_WAIT_S = 2.0


class _Call(Generic[T]):
    """One call of a SyncClient: its coroutine, the coroutine that runs it in
    the loop (SyncClient._call), and that one's task once it runs."""

    __slots__ = ("coro", "task", "wrapper")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self.coro = coro
        self.wrapper: Coroutine[Any, Any, T] | None = None
        self.task: asyncio.Task[Any] | None = None


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
        max_answer: int = MAX_ANSWER,
    ) -> None:
        # The client first: arguments it refuses (no URL nor store among
        # them) leave no thread running.
        client = Client(
            url,
            topic=topic,
            token=token,
            timeout=timeout,
            retries=retries,
            retry_budget=retry_budget,
            store=store,
            max_age=max_age,
            max_answer=max_answer,
        )
        self._serve(client)

    def _serve(self, client: Client | None) -> None:
        """Serve `client` on a loop and thread of its own (None: a client
        made on that loop comes next, through _use)."""
        self._client = client
        self._lock = threading.Lock()
        self._closing = False  # once set (under `_lock`), no call starts
        self._start()
        _every.add(self)

    def _start(self) -> None:
        """A loop of this process's own, run by a thread of its own."""
        self._pid = os.getpid()  # the process whose loop and thread they are
        self._loop = asyncio.new_event_loop()
        # Calls in flight, as the loop's tasks (touched in the loop's thread only).
        self._calls: set[asyncio.Task[Any]] = set()
        self._thread = threading.Thread(
            target=_run_forever, args=(self._loop,), name="simplequeue-sync-client", daemon=True
        )
        self._thread.start()
        self._finalizer = _finalizer(self, self._loop, self._client)

    def _forked(self) -> None:
        """In a child just forked (one thread, no other runs yet): its loop's
        thread is not there. The loop and the client's connections are the
        parent's: never used nor closed here, never collected either (their
        finalizers would wait on a loop nobody runs). A lock another thread
        held at the fork would stay held for ever: a new one."""
        self._lock = threading.Lock()
        self._finalizer.detach()
        _inherited.append((self._loop, self._client))

    def _own(self) -> None:
        """In a forked child, before its first call (before the coroutine of
        the call is made: the inherited client's would use the parent's
        connections): a loop and thread of this process's own, and a client
        like the parent's (a handle of its own on a store, connections of its
        own)."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid() and not self._closing:
                self._renew()

    def _renew(self) -> None:
        inherited = self._client
        self._client = None
        self._start()
        if inherited is not None:
            like = asyncio.run_coroutine_threadsafe(_like(inherited), self._loop)
            self._use(like.result())

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
        client = cls.__new__(cls)
        client._serve(None)
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

        return SyncClient._wrapping(lambda: _like(self.client, topic))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        self._own()
        call = _Call(coro)
        future: concurrent.futures.Future[T] | None = None
        try:
            with self._lock:
                if self._closing:
                    coro.close()  # never to run: no "never awaited" warning
                    raise RuntimeError("this SyncClient is closed")
                call.wrapper = self._call(call)
                future = asyncio.run_coroutine_threadsafe(call.wrapper, self._loop)
            return future.result()
        except concurrent.futures.CancelledError:
            if self._closing:
                raise RuntimeError("this SyncClient was closed during the call") from None
            raise
        except BaseException:
            # Interrupted (Ctrl-C): the call stops in the loop too, as an
            # async caller's cancelled call does, and does not go on unseen;
            # also when the interruption came as the call was handed to the
            # loop, before `future` was there to cancel.
            if call.wrapper is None:  # nothing handed over
                coro.close()
            elif future is None or future.cancel():
                self._stopped(call)
            raise

    def _stopped(self, call: _Call[Any]) -> None:
        """Wait (up to INTERRUPTED_WAIT_S) for an interrupted call to end in the
        loop and its connection to close, so that the broker has given up its
        request before the caller goes on: a long-polled claim still open
        there took the next job enqueued, for a caller that was gone."""

        async def ended() -> None:
            # The loop runs callbacks in their order: the call's task, if it
            # was handed over, started before this (and ran up to its first
            # wait); if it has not, it never will.
            if call.task is None:
                for never in (call.wrapper, call.coro):  # no "never awaited" warnings
                    if never is not None:
                        never.close()
                return
            call.task.cancel()
            await asyncio.wait([call.task])
            await asyncio.sleep(0)  # the transport's close, scheduled as the task ended

        with self._lock:
            if self._closing:
                # close() in another thread cancels the calls in flight and
                # waits for them (_shut), and stops the loop, which might
                # never run this wait: nothing to wait for here.
                return
            waited = asyncio.run_coroutine_threadsafe(ended(), self._loop)
        try:
            waited.result(INTERRUPTED_WAIT_S)
        except concurrent.futures.TimeoutError:
            waited.cancel()

    async def _call(self, call: _Call[T]) -> T:
        """The call's coroutine, counted among the calls in flight (close()
        cancels them); its task kept in `call` as it runs."""
        task = asyncio.current_task()
        assert task is not None
        call.task = task
        self._calls.add(task)
        try:
            return await call.coro
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
        self._own()
        assert self._client is not None  # made with it, or by _wrapping before its use
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
        held: Container[tuple[str, str | None]] | None = None,
    ) -> list[Job]:
        return self._run(
            self.client.claim_many(worker_id, count, lease, wait, attempt_id=attempt_id, held=held)
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
        if self._pid != os.getpid():  # a forked child that never called: nothing of its own
            return
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


async def _like(client: Client, topic: str | None = None) -> Client:
    """A client like `client` (of `topic`, if given), made on the running loop,
    with connections of its own (and its own handle on a store)."""
    store = client.store
    return client._like(
        client.topic if topic is None else topic,
        None if store is None else store.for_another_loop(),
    )


# Every SyncClient alive, told when the process forks (_forked); what the
# children they were forked into inherited, kept as it is.
_every: weakref.WeakSet[SyncClient] = weakref.WeakSet()
_inherited: list[tuple[asyncio.AbstractEventLoop, Client | None]] = []


def _after_fork_in_child() -> None:
    for client in list(_every):
        client._forked()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
