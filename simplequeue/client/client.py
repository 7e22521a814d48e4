"""The async client: every operation of the HTTP API, typed, over one aiohttp session.

Connection failures and 503s are retried with tenacity (bounded, jittered);
a client made by `Client.discover` re-reads broker.json when its broker stops
answering. HTTP statuses become simplequeue.errors exceptions in one table.
Enqueue sends a client-made id when none is given, so a retried enqueue whose
first try landed is answered as a duplicate, never enqueued twice.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from simplequeue.client.discovery import find_broker
from simplequeue.client.job import Job
from simplequeue.errors import (
    BrokerUnavailable,
    InvalidRequest,
    JobNotFound,
    LeaseLost,
    SimpleQueueError,
    StoreUnavailable,
    Unauthorized,
)
from simplequeue.objstore import ObjectStore, store_from_url

#: One exception class per HTTP status the broker answers with.
STATUS_ERRORS: dict[int, type[SimpleQueueError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: JobNotFound,
    409: LeaseLost,
    413: InvalidRequest,
    503: StoreUnavailable,
}


class _Retry(Exception):
    """A transient failure: the broker was unreachable or answered 503."""

    def __init__(self, error: SimpleQueueError) -> None:
        super().__init__(str(error))
        self.error = error


def _job_or_id(job: Job | str) -> tuple[str, str | None]:
    if isinstance(job, Job):
        return job.id, job.lease_token
    return job, None


class Client:
    """A client of one topic on one broker (or of whichever broker broker.json
    names, with `discover`)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        topic: str = "default",
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        retry_budget: float = 30.0,
        store: ObjectStore | None = None,
        max_age: float = 30.0,
    ) -> None:
        if url is None and store is None:
            raise ValueError("Client needs a broker URL, or a store to discover one in")
        self.url = url.rstrip("/") if url else ""
        self.topic = topic
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.retry_budget = retry_budget
        self.store = store
        self.max_age = max_age
        self._session: aiohttp.ClientSession | None = None
        self._owns_store = False
        self._enqueues: list[tuple[dict[str, Any], asyncio.Future[str]]] = []
        self._enqueuer: asyncio.Task[None] | None = None

    @classmethod
    async def discover(
        cls,
        store: ObjectStore | str,
        *,
        max_age: float = 30.0,
        topic: str = "default",
        close_store: bool | None = None,
        **options: Any,
    ) -> Client:
        """A client of the broker that broker.json names, refusing a record whose
        heartbeat is older than `max_age` seconds. close() closes the store too
        when `close_store` says so (by default: when it was given as a URL)."""
        owns = isinstance(store, str) if close_store is None else close_store
        handle = store_from_url(store) if isinstance(store, str) else store
        url = await find_broker(handle, max_age)
        client = cls(url, topic=topic, store=handle, max_age=max_age, **options)
        client._owns_store = owns
        return client

    def for_topic(self, topic: str) -> Client:
        """A client of another topic on the same broker (its own session)."""
        return Client(
            self.url or None,
            topic=topic,
            token=self.token,
            timeout=self.timeout,
            retries=self.retries,
            retry_budget=self.retry_budget,
            store=self.store,
            max_age=self.max_age,
        )

    # --- transport ---------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(
                headers=headers, connector=aiohttp.TCPConnector(limit=256)
            )
        return self._session

    async def request(
        self, method: str, path: str, body: Any = None, *, wait: float = 0.0
    ) -> tuple[int, Any, int]:
        """(status, JSON answer, attempts made). Raises for the statuses of
        STATUS_ERRORS but 404 and 409, whose meaning depends on the call."""
        attempts = 0
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(_Retry),
                stop=stop_after_attempt(self.retries) | stop_after_delay(self.retry_budget),
                wait=wait_random_exponential(multiplier=0.1, max=2.0),
                reraise=False,
            ):
                with attempt:
                    attempts += 1
                    status, answer = await self._send(method, path, body, wait)
                    if status == 503:
                        raise _Retry(StoreUnavailable(_message(answer, status)))
                    if status in STATUS_ERRORS and status not in (404, 409):
                        raise STATUS_ERRORS[status](_message(answer, status))
                    return status, answer, attempts
        except RetryError as exc:
            last = exc.last_attempt.exception()
            assert isinstance(last, _Retry)
            raise last.error from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(self, method: str, path: str, body: Any, wait: float) -> tuple[int, Any]:
        if not self.url:
            await self._rediscover()
        data = orjson.dumps(body) if body is not None else None
        timeout = aiohttp.ClientTimeout(total=self.timeout + wait)
        headers = {"Content-Type": "application/json"} if data is not None else None
        try:
            async with self._http().request(
                method, self.url + path, data=data, timeout=timeout, headers=headers
            ) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            await self._rediscover()
            reason = str(exc) or type(exc).__name__
            raise _Retry(BrokerUnavailable(f"{self.url or 'broker'}: {reason}")) from exc
        try:
            return status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return status, {"error": raw[:200].decode(errors="replace")}

    async def _rediscover(self) -> None:
        """Follow broker.json to the active broker, if this client can."""
        if self.store is None:
            return
        try:
            self.url = (await find_broker(self.store, self.max_age)).rstrip("/")
        except SimpleQueueError as exc:
            raise _Retry(BrokerUnavailable(f"no broker: {exc}")) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._owns_store and self.store is not None:
            await self.store.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- operations ----------------------------------------------------------------

    def _t(self, path: str) -> str:
        return f"/topics/{self.topic}{path}"

    async def enqueue(
        self,
        payload: Any,
        id: str | None = None,
        priority: int = 0,
        delay: float = 0,
        max_attempts: int | None = None,
    ) -> str:
        """Enqueue one job; return its id (the existing one for a duplicate).

        Calls made while another enqueue of this client is in flight go out
        together as one batch request, like the broker's own group commit."""
        spec = _spec(payload, id, priority, delay, max_attempts)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._enqueues.append((spec, future))
        if self._enqueuer is None or self._enqueuer.done():
            self._enqueuer = asyncio.create_task(self._send_enqueues())
        return await future

    async def _send_enqueues(self) -> None:
        while self._enqueues:
            batch, self._enqueues = self._enqueues[:BATCH], self._enqueues[BATCH:]
            try:
                ids = await self._enqueue_batch([spec for spec, _ in batch])
            except InvalidRequest as exc:
                if len(batch) == 1:
                    _settle_all(batch, exc=exc)
                    continue
                # One bad job must not fail the others: send each on its own.
                for spec, future in batch:
                    try:
                        _settle_all([(spec, future)], ids=await self._enqueue_batch([spec]))
                    except SimpleQueueError as exc:
                        _settle_all([(spec, future)], exc=exc)
                continue
            except SimpleQueueError as exc:
                _settle_all(batch, exc=exc)
                continue
            _settle_all(batch, ids=ids)

    async def _enqueue_batch(self, specs: list[dict[str, Any]]) -> list[str]:
        if len(specs) == 1:
            _, answer, _ = await self.request("POST", self._t("/enqueue"), specs[0])
            return [answer["id"]]
        _, answer, _ = await self.request("POST", self._t("/enqueue"), {"jobs": specs})
        ids: list[str] = answer["ids"]
        return ids

    async def enqueue_many(self, jobs: Iterable[Any]) -> list[str]:
        """Enqueue a batch in one request. Items are payloads, or dicts with a
        "payload" key and optional id/priority/delay/max_attempts."""
        specs = [
            _spec(
                j["payload"],
                j.get("id"),
                j.get("priority", 0),
                j.get("delay", 0),
                j.get("max_attempts"),
            )
            if isinstance(j, dict) and "payload" in j
            else _spec(j, None, 0, 0, None)
            for j in jobs
        ]
        _, answer, _ = await self.request("POST", self._t("/enqueue"), {"jobs": specs})
        ids: list[str] = answer["ids"]
        return ids

    async def claim(self, worker_id: str, lease: float = 30, wait: float = 0) -> Job | None:
        """Claim the next job, long-polling up to `wait` seconds; None when empty."""
        status, answer, _ = await self.request(
            "POST",
            self._t("/claim"),
            {"worker_id": worker_id, "lease": lease, "wait": wait},
            wait=wait,
        )
        return None if status == 404 else Job.from_api(answer["job"])

    async def claim_many(
        self, worker_id: str, count: int, lease: float = 30, wait: float = 0
    ) -> list[Job]:
        """Claim up to `count` jobs in one request."""
        body = {"worker_id": worker_id, "lease": lease, "wait": wait, "count": count}
        status, answer, _ = await self.request("POST", self._t("/claim"), body, wait=wait)
        return [] if status == 404 else [Job.from_api(j) for j in answer["jobs"]]

    async def ack(self, job: Job | str, result: Any = None) -> None:
        """Complete a claimed job with `result` (carrying its lease token)."""
        job_id, token = _job_or_id(job)
        try:
            await self._settle("/ack", {"job_id": job_id, "lease_token": token, "result": result})
        except _Replayed:
            # A retried ack whose first try may have landed: done, unless it is not.
            if (await self.job(job_id)).status != "completed":
                raise LeaseLost(f"job {job_id!r} is no longer held by this client") from None

    async def ack_many(self, acks: Iterable[tuple[Job | str, Any]]) -> list[dict[str, Any]]:
        """Complete several jobs in one request; each answer says whether it did."""
        body = []
        for job, result in acks:
            job_id, token = _job_or_id(job)
            body.append({"job_id": job_id, "lease_token": token, "result": result})
        _, answer, _ = await self.request("POST", self._t("/ack"), {"acks": body})
        results: list[dict[str, Any]] = answer["results"]
        return results

    async def nack(self, job: Job | str, delay: float = 0, error: str | None = None) -> str:
        """Give a job back: pending again after `delay` s, or dead when spent.
        Returns the job's new status."""
        job_id, token = _job_or_id(job)
        body = {"job_id": job_id, "lease_token": token, "delay": delay, "error": error}
        try:
            answer = await self._settle("/nack", body)
        except _Replayed:
            now = await self.job(job_id)  # a retried nack whose first try may have landed
            if now.status == "claimed" and (token is None or now.lease_token == token):
                raise LeaseLost(f"job {job_id!r}: nack did not take") from None
            return now.status
        status: str = answer["status"]
        return status

    async def heartbeat(self, job: Job | str, lease: float | None = None) -> float:
        """Extend the claim; return the new lease expiry (Unix seconds)."""
        job_id, token = _job_or_id(job)
        answer = await self._settle(
            "/heartbeat", {"job_id": job_id, "lease_token": token, "lease": lease}
        )
        expires: float = answer["lease_expires_at"]
        return expires

    async def _settle(self, path: str, body: dict[str, Any]) -> Any:
        body = {k: v for k, v in body.items() if v is not None or k == "result"}
        status, answer, attempts = await self.request("POST", self._t(path), body)
        if status == 404:
            raise JobNotFound(_message(answer, 404))
        if status == 409:
            if attempts > 1:
                raise _Replayed()
            raise LeaseLost(_message(answer, 409))
        return answer

    async def status(self) -> dict[str, int]:
        _, answer, _ = await self.request("GET", self._t("/status"))
        counts: dict[str, int] = answer
        return counts

    async def job(self, job_id: str) -> Job:
        status, answer, _ = await self.request("GET", self._t(f"/jobs/{job_id}"))
        if status == 404:
            raise JobNotFound(_message(answer, 404))
        return Job.from_api(answer)

    async def dead(self) -> list[Job]:
        _, answer, _ = await self.request("GET", self._t("/dead"))
        return [Job.from_api(j) for j in answer["jobs"]]

    async def requeue(self, job_ids: list[str] | None = None) -> list[str]:
        body = {"job_ids": job_ids} if job_ids is not None else {}
        _, answer, _ = await self.request("POST", self._t("/requeue"), body)
        ids: list[str] = answer["requeued"]
        return ids

    async def purge(self, job_ids: list[str] | None = None) -> list[str]:
        body = {"job_ids": job_ids} if job_ids is not None else {}
        _, answer, _ = await self.request("DELETE", self._t("/dead"), body)
        ids: list[str] = answer["purged"]
        return ids

    async def topics(self) -> dict[str, dict[str, int]]:
        _, answer, _ = await self.request("GET", "/topics")
        topics: dict[str, dict[str, int]] = answer["topics"]
        return topics


BATCH = 1000  # jobs per enqueue request, the broker's limit


def _settle_all(
    batch: list[tuple[dict[str, Any], asyncio.Future[str]]],
    ids: list[str] | None = None,
    exc: BaseException | None = None,
) -> None:
    for i, (_, future) in enumerate(batch):
        if future.done():  # its caller went away
            continue
        if ids is not None:
            future.set_result(ids[i])
        else:
            future.set_exception(exc or RuntimeError("enqueue failed"))


class _Replayed(Exception):
    """A retried settle answered 409: its first try may have landed."""


def _spec(
    payload: Any, job_id: str | None, priority: int, delay: float, max_attempts: int | None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"id": job_id or uuid.uuid4().hex, "payload": payload}
    if priority:
        spec["priority"] = priority
    if delay:
        spec["delay"] = delay
    if max_attempts is not None:
        spec["max_attempts"] = max_attempts
    return spec


def _message(answer: Any, status: int) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return str(answer["error"])
    return f"HTTP {status}"
