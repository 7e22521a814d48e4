"""A mixed load over HTTP that records every operation in a History.

Producers enqueue with their own ids and retry until answered, so every job
they count was acknowledged. Workers claim in batches and mostly ack; some
nack, some "die" holding their claim (the lease must bring the job back), and
some go silent past their lease and then ack with their stale token, which
must be refused once someone else holds the job. Errors (503, dropped
connections, a broker being killed) are expected and recorded, never fatal.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from simplequeue.api import REPLAYED_HEADER
from tests.reliability.history import CLOCK_TOLERANCE, Claim, History

Urls = Callable[[], list[str]]


@dataclass
class LoadShape:
    jobs: int = 300
    producers: int = 3
    workers: int = 6
    lease: float = 2.0
    p_nack: float = 0.06
    p_die: float = 0.03
    p_stale: float = 0.03
    # Held: heartbeat the claim `hold_beats` times, a third of the lease apart,
    # then ack. With many held at once, the claimed set spills out of the head.
    p_hold: float = 0.0
    hold_beats: int = 3
    # A held claim whose refusal came back sooner than lease - lease_margin
    # after its last renewal was sent counts as a live lease taken
    # (History.live_taken). The margin is for the store's clock as two brokers
    # estimate it, one stamping the lease and one reaping it (CLOCK_TOLERANCE).
    lease_margin: float = CLOCK_TOLERANCE
    # Acks carry a follow-up into this topic (SPEC 9), {"from": id, "token": t},
    # and are sent again with the same token while their outcome is unknown.
    follow_to: str | None = None
    timeout: float = 5.0
    seconds: float = 6.0  # production (and chaos) is spread over this long
    # The first `at_once` jobs are enqueued as fast as they are answered, the
    # rest spread over `seconds`: demand well above what a limit lets through.
    at_once: int = 0
    # The chaos ends after this long even if production goes on (None: with
    # production). Chaos that keeps brokers stopped and restarting slows
    # production, which then keeps the chaos going: 200 jobs took 30 s of it.
    chaos_seconds: float | None = None


def cancelled(answer: Any) -> bool:
    """Whether a refusal says its job was cancelled (SPEC 10)."""
    return isinstance(answer, dict) and answer.get("reason") == "cancelled"


def superseded(job: dict[str, Any], claims: list[Claim]) -> bool:
    """Whether a later claim of `job` was answered, which makes its token stale.
    Later by attempt, which each claim's commit counts up on the head: answers
    arrive out of order, and claimed_at is by the clock of whichever broker
    committed the claim (on S3, its estimate of the store's clock, which
    another broker's may put up to a second apart)."""
    return any(attempts > job["attempts"] for attempts, _, _ in claims)


class Load:
    """Runs producers and workers against whichever broker URLs `urls()` gives."""

    def __init__(
        self,
        urls: Urls,
        topic: str,
        history: History,
        shape: LoadShape,
        seed: int = 1,
        describe: Callable[[], str] = lambda: "",
    ) -> None:
        self.urls = urls
        self.describe = describe  # the brokers, for a failure to say what became of them
        self.topic = topic
        self.h = history
        self.shape = shape
        self.rng = random.Random(seed)
        self.stop = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.chaos_error: BaseException | None = None
        self.workers: list[asyncio.Task[None]] = []
        self.sleepers: set[asyncio.Task[None]] = set()  # workers gone silent, see stale_ack

    async def call(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """POST to a random broker: (status, JSON) or (0, None) on a lost answer."""
        status, answer, _ = await self.post(path, body)
        return status, answer

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any, bool]:
        """As call(), and whether the answer is of a repeat (Simplequeue-Replayed):
        a broker that stood in for the owner served it again after a try the
        owner may have done, so what it found nothing to do may be done."""
        assert self.session is not None
        self.h.operations += 1
        url = f"{self.rng.choice(self.urls())}/topics/{self.topic}{path}"
        try:
            async with self.session.post(
                url,
                json=body,
                timeout=aiohttp.ClientTimeout(total=self.shape.timeout + body.get("wait", 0)),
            ) as r:
                answer = await r.json(content_type=None)
                if r.status >= 500:
                    self.h.error(f"http-{r.status}")
                replayed = r.headers.get(REPLAYED_HEADER) == "1"
                if r.status in (404, 409) and replayed:
                    # A broker that did not answer got it first, and may have
                    # done it: the refusal is of a repeat, the outcome unknown.
                    self.h.error("replayed")
                    return 0, None, True
                return r.status, answer, replayed
        except (aiohttp.ClientError, TimeoutError, ValueError):
            self.h.error("connection")
            return 0, None, False

    async def produce(self, ids: list[str], seconds: float) -> None:
        pause = seconds / max(1, len(ids))
        for job_id in ids:
            await asyncio.sleep(pause * self.rng.uniform(0.5, 1.5))
            deadline = time.monotonic() + 120  # for this job: answered, or broken
            while True:  # the same id until answered: a duplicate is a success
                if self.chaos_error is not None:
                    raise AssertionError(f"the chaos itself failed: {self.chaos_error!r}")
                assert time.monotonic() < deadline, f"enqueue of {job_id} never answered"
                status, _ = await self.call(
                    "/enqueue", {"id": job_id, "payload": {"id": job_id}, "max_attempts": 0}
                )
                self.h.enqueue_attempts += 1
                if status in (200, 201):
                    self.h.enqueued.add(job_id)
                    break
                assert status in (0, 503), f"enqueue answered {status}"
                await asyncio.sleep(0.05)

    async def work(self, name: str) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            status, answer = await self.call(
                "/claim",
                {
                    "worker_id": name,
                    "count": self.rng.randint(1, 4),
                    "lease": self.shape.lease,
                    "wait": 0.5,
                },
            )
            if status != 200:
                assert status in (0, 404, 503), f"claim answered {status}: {answer}"
                if status != 404:
                    await asyncio.sleep(0.05)
                continue
            for job in answer["jobs"]:
                self.h.claims[job["id"]].append(
                    (job["attempts"], job["claimed_at"], job["lease_token"])
                )
                await self.settle(name, job, sent)

    async def settle(self, name: str, job: dict[str, Any], claimed: float) -> None:
        """Settle a claim sent at `claimed` (monotonic): its lease began later."""
        roll = self.rng.random()
        s = self.shape
        if self.rng.random() < s.p_hold:
            task = asyncio.create_task(self.hold(job, claimed))
            self.sleepers.add(task)
            task.add_done_callback(self.sleepers.discard)
            return
        if roll < s.p_die:
            self.h.abandoned += 1  # this worker "died": the lease must bring the job back
            return
        if roll < s.p_die + s.p_stale:
            # In a task of its own: a silent worker must not stop the others
            # (nor this one) from claiming, or nobody would ever take its job.
            task = asyncio.create_task(self.stale_ack(name, job))
            self.sleepers.add(task)
            task.add_done_callback(self.sleepers.discard)
            return
        if roll < s.p_die + s.p_stale + s.p_nack:
            status, _ = await self.call(
                "/nack",
                {
                    "job_id": job["id"],
                    "lease_token": job["lease_token"],
                    "error": f"{name} gave up",
                },
            )
            self.h.nacked += status == 200
            return
        await self.ack(job["id"], job["lease_token"])

    async def ack(self, job_id: str, token: str) -> tuple[int, Any]:
        """Ack a claim: its last answer (status, JSON)."""
        body: dict[str, Any] = {"job_id": job_id, "lease_token": token, "result": {"by": token[:8]}}
        follow_to = self.shape.follow_to
        if follow_to:
            body["enqueue"] = [{"topic": follow_to, "payload": {"from": job_id, "token": token}}]
        for tries in range(1, 20 if follow_to else 2):
            sent = time.monotonic()
            status, answer = await self.call("/ack", body)
            if status in (0, 200, 503):  # it succeeded, or may have (and its follow-up)
                self.h.ack_tokens[job_id].add(token)
                self.h.first_ack_sent.setdefault(job_id, sent)
            if status == 200:
                self.h.acked[job_id] += 1
            elif status in (0, 503):
                self.h.ack_unknown.add(job_id)
                if follow_to:
                    await asyncio.sleep(0.1 * tries)
                    continue
            else:
                assert status in (404, 409), f"ack answered {status}: {answer}"
                if follow_to and tries == 1:  # refused at once: it must record nothing
                    self.h.refused_tokens[job_id].add(token)
                    self.h.refusals[job_id].append((token, status, str(answer)[:120]))
            return status, answer
        return status, answer

    async def hold(self, job: dict[str, Any], claimed: float) -> None:
        """Keep the claim for a while with heartbeats, then ack. A heartbeat that
        finds the lease gone (a broker was down past it) ends the hold: the ack
        that follows must then be refused, which the history checks."""
        self.h.held += 1
        leases = self.h.held_leases[job["id"]]
        leases.append((job["attempts"], job["lease_expires_at"]))
        renewed = claimed  # when the claim was sent: its lease began later
        for _ in range(self.shape.hold_beats):
            await asyncio.sleep(self.shape.lease / 3)
            sent = time.monotonic()
            status, answer = await self.call(
                "/heartbeat", {"job_id": job["id"], "lease_token": job["lease_token"]}
            )
            self.h.heartbeats += 1
            if status == 200:
                renewed = sent
                leases.append((job["attempts"], answer["lease_expires_at"]))
            if status in (404, 409):
                self._lease_refused(job["id"], time.monotonic() - renewed, answer)
                break
        status, answer = await self.ack(job["id"], job["lease_token"])
        if status in (404, 409):
            self._lease_refused(job["id"], time.monotonic() - renewed, answer)

    def _lease_refused(self, job_id: str, since_renewed: float, answer: Any) -> None:
        """A held claim's refusal came back `since_renewed` seconds after its
        last renewal was sent. The refusal was made before it came back, and
        the lease began after the renewal was sent: sooner than the lease (less
        the margin for two brokers' estimates of the store's clock), a live
        lease was taken. Timed by when the refusal came back, not when it was
        sent: a request that waited in a SIGSTOPped broker may rightly arrive
        after the lease it would have renewed ran out. A job cancelled under
        its holder ends its lease at once (SPEC 10): such a refusal is judged
        by the cancellation checks (control.check_cancels), not here."""
        if cancelled(answer):
            return
        if since_renewed < self.shape.lease - self.shape.lease_margin:
            self.h.live_taken.append((job_id, round(since_renewed, 2)))

    async def stale_ack(self, name: str, job: dict[str, Any]) -> None:
        """Go silent past the lease until a later claim of the job shows up, then
        ack with the old token: it must be refused."""
        deadline = time.monotonic() + 4 * self.shape.lease + 10
        while time.monotonic() < deadline and not self.stop.is_set():
            if superseded(job, self.h.claims[job["id"]]):
                break
            await asyncio.sleep(0.1)
        else:
            await self.ack(job["id"], job["lease_token"])  # nobody took it: still ours
            return
        self.h.stale_acks += 1
        stale: dict[str, Any] = {"job_id": job["id"], "lease_token": job["lease_token"]}
        if self.shape.follow_to:
            payload = {"from": job["id"], "token": job["lease_token"]}
            stale["enqueue"] = [{"topic": self.shape.follow_to, "payload": payload}]
        status, _ = await self.call("/ack", stale)
        if status in (404, 409):
            self.h.stale_refused += 1
            if self.shape.follow_to:
                self.h.refused_tokens[job["id"]].add(job["lease_token"])
        elif status == 200:
            self.h.stale_committed.append((job["id"], job["lease_token"]))
        else:  # unknown outcome: the job's record says who completed it (check())
            self.h.stale_refused += 1

    async def run(self, chaos: Callable[[], Any] | None = None) -> None:
        """Produce every job while workers run (and `chaos` does its worst), then
        stop chaos and let the workers drain the topic."""
        s = self.shape
        ids = [f"job-{i:06d}" for i in range(s.jobs)]
        async with aiohttp.ClientSession() as self.session:
            workers = [asyncio.create_task(self.work(f"w{i}")) for i in range(s.workers)]
            self.workers = workers
            chaos_task = asyncio.create_task(self._guard(chaos)) if chaos else None
            try:
                at_once, spread = ids[: s.at_once], ids[s.at_once :]
                producers = range(s.producers)
                await asyncio.gather(
                    *(self.produce(at_once[i :: s.producers], 0) for i in producers),
                    *(self.produce(spread[i :: s.producers], s.seconds) for i in producers),
                )
                if chaos_task:
                    chaos_task.cancel()
                    await asyncio.gather(chaos_task, return_exceptions=True)
                await self.drain()
                await asyncio.gather(*self.sleepers)  # their verdicts are part of the history
            finally:
                self.stop.set()
                await asyncio.gather(*workers, *self.sleepers, return_exceptions=True)

    async def _guard(self, chaos: Callable[[], Any]) -> None:
        """Run the chaos; if it breaks (a broker that will not restart), say so
        instead of leaving the load to wait for a broker that never comes."""
        try:
            async with asyncio.timeout(self.shape.chaos_seconds):
                await chaos()
        except TimeoutError:
            return  # its time is up: production goes on without it
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.chaos_error = exc
            raise

    async def drain(self) -> None:
        """Wait until every enqueued job is completed or cancelled (abandoned
        claims come back after their lease)."""
        deadline = time.monotonic() + 60 + 10 * self.shape.lease + self.shape.jobs / 10
        while time.monotonic() < deadline:
            for worker in self.workers:  # a worker that broke says why
                if worker.done() and worker.exception() is not None:
                    raise worker.exception()  # type: ignore[misc]
            counts = await self.status()
            finished = counts and counts["completed"] + counts.get("cancelled", 0)
            if finished and finished >= len(self.h.enqueued) and counts["claimed"] == 0:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(
            f"the topic never drained: {await self.status()}; "
            f"errors {dict(self.h.errors)}; urls {self.urls()}; brokers: {self.describe()}"
        )

    async def status(self) -> dict[str, int] | None:
        assert self.session is not None
        try:
            url = f"{self.urls()[0]}/topics/{self.topic}/status"
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                return await r.json() if r.status == 200 else None  # type: ignore[no-any-return]
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def follow_ups(self) -> dict[str, Any]:
        """Once delivered, each enqueued job's follow-up (its record or job) in
        `follow_to`, by source id (None for one that never came), and that
        topic's counts under "__counts__"."""
        assert self.shape.follow_to
        base = f"{self.urls()[0]}/topics/{self.shape.follow_to}"
        out: dict[str, Any] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            deadline = time.monotonic() + 30  # delivery goes on after the sources drained
            while time.monotonic() < deadline:
                async with session.get(f"{base}/status") as r:
                    counts = await r.json() if r.status == 200 else {}
                if counts.get("enqueued", 0) >= len(self.h.enqueued):
                    break
                await asyncio.sleep(0.2)
            for job_id in sorted(self.h.enqueued):
                async with session.get(f"{base}/jobs/{job_id}:0") as r:
                    out[job_id] = await r.json() if r.status == 200 else None
            async with session.get(f"{base}/status") as r:
                out["__counts__"] = await r.json()
        return out

    async def final_records(self) -> dict[str, Any]:
        """Each enqueued job's record, read after the run."""
        out: dict[str, Any] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            for job_id in sorted(self.h.enqueued):
                url = f"{self.urls()[0]}/topics/{self.topic}/jobs/{job_id}"
                self.h.looked_up[job_id] = time.monotonic()
                async with session.get(url) as r:
                    out[job_id] = await r.json()
                    if r.status == 404:
                        self.h.gone.add(job_id)
            async with session.get(f"{self.urls()[0]}/topics/{self.topic}/status") as r:
                out["__counts__"] = await r.json()
        return out
