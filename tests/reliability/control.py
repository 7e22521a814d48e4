"""The control campaign's loads and checks: cancellation (SPEC 10), topic
limits (SPEC 12) and schedules (SPEC 11). A ControlLoad keeps every request it
sent, when (monotonic, the client's) and what it was answered; the checks here
judge that log and the jobs' final records. Times in answers (claimed_at,
lease_expires_at, finished_at, created_at) are the store's clock as the broker
that wrote them estimated it: two of them are compared only with
CLOCK_TOLERANCE allowed, and only what is certain counts as a fault."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from tests.reliability.history import CLOCK_TOLERANCE
from tests.reliability.load import Load, cancelled


@dataclass(frozen=True)
class Op:
    """One request and its outcome: status 0 (and answer None) when the answer
    was lost, the request timed out, or a replay left its outcome unknown;
    `replayed` for an answer of a repeat (Load.post)."""

    path: str
    body: dict[str, Any]
    sent: float
    answered: float
    status: int
    answer: Any
    replayed: bool = False


class ControlLoad(Load):
    """A Load that logs every request, and can set its topic's settings, cancel
    its jobs as they come and go, read its claimed count all along, and keep a
    schedule firing into it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ops: list[Op] = []
        self.claimed_seen: list[int] = []  # the topic's `claimed` at each status read

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any, bool]:
        sent = time.monotonic()
        try:
            status, answer, replayed = await super().post(path, body)
        except asyncio.CancelledError:
            # Stopped with the request out (the chaos's cancels end with the
            # production): it may have landed, its outcome unknown. Left out,
            # a cancel that landed so made its job's later refusals and end
            # ("cancelled") look like no cancel's doing.
            self.ops.append(Op(path, body, sent, time.monotonic(), 0, None, False))
            raise
        self.ops.append(Op(path, body, sent, time.monotonic(), status, answer, replayed))
        return status, answer, replayed

    async def put(self, path: str, body: dict[str, Any] | None = None, method: str = "PUT") -> Any:
        """PUT (or DELETE) on the topic until a broker answers 2xx or 404; the
        answer. For what the campaign sets up and takes down, before and after
        the chaos, and during it (a schedule is deleted while brokers die)."""
        deadline = time.monotonic() + 60
        timeout = aiohttp.ClientTimeout(total=self.shape.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                assert time.monotonic() < deadline, f"{method} {path} never answered"
                url = f"{self.rng.choice(self.urls())}/topics/{self.topic}{path}"
                try:
                    async with session.request(method, url, json=body) as r:
                        answer = await r.json(content_type=None)
                        if r.status < 300 or r.status == 404:
                            return answer
                        assert r.status == 503, f"{method} {path} answered {r.status}: {answer}"
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    pass  # a broker killed or paused: another, or this one again
                await asyncio.sleep(0.2)

    async def cancel_some(self, seed: int) -> None:
        """Cancel jobs until stopped, a few at a time: mostly the latest enqueued
        (pending, or claimed and held), some at random (finished, often), and
        now and then one not enqueued yet (its enqueue may be on its way)."""
        rng = random.Random(seed)
        ids = [f"job-{i:06d}" for i in range(self.shape.jobs)]
        while True:
            await asyncio.sleep(rng.uniform(0.05, 0.25))
            known = sorted(self.h.enqueued)
            if not known:
                continue
            picks = set(rng.sample(known[-12:], min(2, len(known[-12:]))))
            if rng.random() < 0.3:
                picks.add(rng.choice(known))
            if rng.random() < 0.15:
                picks.add(rng.choice(ids))
            await self.call("/cancel", {"job_ids": sorted(picks)})

    async def watch_claimed(self) -> None:
        """Read the topic's claimed count until stopped: each is a committed
        head's, which a limit of max_claimed bounds whoever wrote it."""
        timeout = aiohttp.ClientTimeout(total=self.shape.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self.stop.is_set():
                url = f"{self.rng.choice(self.urls())}/topics/{self.topic}/status"
                try:
                    async with session.get(url) as r:
                        if r.status == 200:
                            self.claimed_seen.append((await r.json())["claimed"])
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)

    async def consume_schedule(self, name: str, every: int, until: asyncio.Event) -> None:
        """Make a schedule firing every `every` s into the topic, work its jobs
        until `until` is set, then delete it and work what is left. Its jobs
        are this load's enqueued ones: those it claimed."""
        async with aiohttp.ClientSession() as self.session:
            # Unlimited attempts, as the loads' enqueues: a job whose claims
            # all sat behind an ack sent to a paused broker (up to its 10 s
            # timeout, the lease 3 s) went dead after 5 (a suite beside the
            # long campaigns), and the topic never drained.
            schedule = {"every": every, "payload": {"from": name}, "max_attempts": 0}
            await self.put(f"/schedules/{name}", schedule)
            self.workers = [asyncio.create_task(self.work(f"s{i}")) for i in range(3)]
            try:
                await until.wait()
                await self.put(f"/schedules/{name}", method="DELETE")
                deadline = time.monotonic() + 60 + 10 * self.shape.lease
                while time.monotonic() < deadline:
                    counts = await self.status()
                    idle = counts and counts["claimed"] + counts["pending"] == 0
                    if idle and counts["completed"] == counts["enqueued"]:
                        break
                    await asyncio.sleep(0.2)
                else:
                    raise AssertionError(f"{self.topic} never drained: {await self.status()}")
                await asyncio.gather(*self.sleepers)
            finally:
                self.stop.set()
                await asyncio.gather(*self.workers, *self.sleepers, return_exceptions=True)
            self.h.enqueued = set(self.h.claims)


# --- what was held: claims and their ends, by the store's clock -------------------------


@dataclass(frozen=True)
class Held:
    """A claim answered: from claimed_at to when it certainly still held its job
    (its ack's commit, or the last lease expiry it was answered), by the
    stamps of the brokers that wrote them."""

    job_id: str
    token: str
    start: float
    end: float


def claims_answered(ops: Iterable[Op]) -> dict[str, dict[str, Any]]:
    """Each claim answered, by lease token: the job as claimed, with `expires`
    the latest lease expiry a claim or heartbeat of it was answered."""
    out: dict[str, dict[str, Any]] = {}
    for op in ops:
        if op.status != 200:
            continue
        if op.path == "/claim":
            for job in op.answer["jobs"]:
                out[job["lease_token"]] = {**job, "expires": job["lease_expires_at"]}
    for op in ops:
        if op.path == "/heartbeat" and op.status == 200:
            held = out[op.body["lease_token"]]
            held["expires"] = max(held["expires"], op.answer["lease_expires_at"])
    return out


def held_intervals(ops: list[Op], final: dict[str, Any]) -> list[Held]:
    """How long each claim answered certainly held its job. The claim that
    completed the job (its record names the token's ack) held it until the
    record's finished_at; one settled by a nack sent, to no known time (it
    counts for nothing); any other (abandoned, or its ack refused or lost
    unlanded) until its lease ran out, which no broker ends early (history's
    claimed_early and live_taken hold them to that) and the limits count
    until the lease is reaped."""
    nacked = {op.body["lease_token"] for op in ops if op.path == "/nack"}
    out = []
    for token, job in claims_answered(ops).items():
        record = final.get(job["id"]) or {}
        by = (record.get("result") or {}).get("by")
        if record.get("status") == "completed" and by == token[:8]:
            end = record["finished_at"]
        elif token in nacked:
            end = job["claimed_at"]
        else:
            end = job["expires"]
        out.append(Held(job["id"], token, job["claimed_at"], end))
    return out


def most_held_at_once(held: list[Held], shrink: float) -> tuple[int, float]:
    """The most claims that held their jobs at one moment, each interval cut
    short by `shrink` seconds (half from each end), and the moment. Stamps
    written by different brokers are at most CLOCK_TOLERANCE apart in their
    error, so with `shrink` = CLOCK_TOLERANCE two intervals that still overlap
    overlapped in truth. Touching ends do not overlap."""
    events = []
    for h in held:
        start, end = h.start + shrink / 2, h.end - shrink / 2
        if end > start:
            events += [(start, 1), (end, -1)]
    events.sort()  # at one time, ends (-1) before starts (+1)
    most, at, now = 0, 0.0, 0
    for when, step in events:
        now += step
        if now > most:
            most, at = now, when
    return most, at


def check_max_claimed(
    ops: list[Op], final: dict[str, Any], limit: int, claimed_seen: list[int]
) -> dict[str, Any]:
    """max_claimed held: no two-broker-certain moment had more than `limit`
    claims holding their jobs, and no status read showed more claimed."""
    held = held_intervals(ops, final)
    most, at = most_held_at_once(held, CLOCK_TOLERANCE)
    over = [h for h in held if h.start + CLOCK_TOLERANCE / 2 <= at < h.end - CLOCK_TOLERANCE / 2]
    assert most <= limit, (
        f"{most} claims held their jobs at once at {at:.3f} (store clock), max_claimed "
        f"{limit}: {over}"
    )
    seen = max(claimed_seen, default=0)
    assert seen <= limit, f"a status read showed {seen} claimed, max_claimed {limit}"
    return {
        "max_claimed": limit,
        "max_claimed_seen": seen,
        "held_at_once_certain": most,
        "held_at_once_stamped": most_held_at_once(held, 0.0)[0],
    }


def check_rate(ops: list[Op], rate: float, burst: int) -> dict[str, Any]:
    """The rate held: between any two claims answered, by their claimed_at
    stamps t1 <= t2, no more than burst + rate * (t2 - t1 + CLOCK_TOLERANCE)
    jobs were claimed (each claim of a write shares its stamp). Claims the log
    does not hold (their answer lost) only make the count smaller."""
    stamps = sorted(job["claimed_at"] for job in claims_answered(ops).values())
    worst: tuple[float, int, float, float] = (0.0, 0, 0.0, 0.0)
    for i, first in enumerate(stamps):
        for j in range(i, len(stamps)):
            n = j - i + 1
            allowed = burst + rate * (stamps[j] - first + CLOCK_TOLERANCE)
            if n / allowed > worst[0]:
                worst = (n / allowed, n, first, stamps[j])
    ratio, n, start, end = worst
    assert ratio <= 1, (
        f"{n} jobs claimed from {start:.3f} to {end:.3f} (store clock): more than "
        f"{burst} + {rate}/s x (that + {CLOCK_TOLERANCE} s)"
    )
    return {"rate": rate, "rate_claims": len(stamps), "rate_worst_share": round(ratio, 3)}


# --- cancellation ------------------------------------------------------------------------


def check_cancels(ops: list[Op], enqueued: set[str], final: dict[str, Any]) -> dict[str, Any]:
    """SPEC 10 over the log. `not_found` in a replayed answer is an unknown
    outcome. A job a cancel answered `cancelled`: final status
    cancelled; no ack of it ever answered 200 (one that landed first finished
    it, and the cancel would have found it finished; one after is refused);
    no claim sent after that answer came hands it out, no heartbeat sent after
    renews it; no other cancel answers `cancelled` for it again. A job a
    cancel answered `not_found`, whose enqueue was answered before that cancel
    was sent, was finished by then: an ack that may have completed it (its
    record names its token), or a cancel of it that may have landed, was sent
    before the answer came. A refusal saying a job was cancelled came after
    some cancel of it was sent. Every job whose cancels all answered
    `not_found`, or that had none, completed; those whose only cancels have
    an unknown outcome completed or were cancelled."""
    enqueue_answered: dict[str, float] = {}
    cancels: dict[str, list[tuple[Op, str]]] = defaultdict(list)  # id -> (op, outcome)
    for op in ops:
        if op.path == "/enqueue" and op.status in (200, 201):
            enqueue_answered.setdefault(op.body["id"], op.answered)
        if op.path == "/cancel":
            for job_id in op.body["job_ids"]:
                if op.status != 200:
                    outcome = "unknown"
                elif job_id in op.answer["cancelled"]:
                    outcome = "cancelled"
                else:
                    assert job_id in op.answer["not_found"], (job_id, op.answer)
                    # A repeat finds cancelled what its first try may have
                    # cancelled (the SDK looks the job up then).
                    outcome = "unknown" if op.replayed else "not_found"
                cancels[job_id].append((op, outcome))
    faults: list[tuple[str, str, Any]] = []
    judged = 0  # not_found answers judged: their job's enqueue answered before
    first_cancelled: dict[str, float] = {}
    for job_id, outcomes in cancels.items():
        yes = [op.answered for op, outcome in outcomes if outcome == "cancelled"]
        if len(yes) > 1:
            faults.append(("cancelled twice", job_id, yes))
        if yes:
            first_cancelled[job_id] = min(yes)
    for op in ops:
        claimed = op.answer["jobs"] if op.path == "/claim" and op.status == 200 else []
        for job_id in (job["id"] for job in claimed):
            if job_id in first_cancelled and op.sent > first_cancelled[job_id]:
                faults.append(("claimed after cancelled", job_id, op))
        job_id = op.body.get("job_id", "")
        if op.path in ("/ack", "/heartbeat") and op.status == 200:
            if op.path == "/ack" and job_id in first_cancelled:
                faults.append(("acked and cancelled", job_id, op))
            if op.path == "/heartbeat" and op.sent > first_cancelled.get(job_id, float("inf")):
                faults.append(("renewed after cancelled", job_id, op))
        if op.status in (404, 409) and cancelled(op.answer):
            asked = [c.sent for c, _ in cancels.get(job_id, []) if c.sent < op.answered]
            if not asked:
                faults.append(("refused as cancelled, never asked", job_id, op))
    for job_id, outcomes in cancels.items():
        status = (final.get(job_id) or {}).get("status")
        if job_id in first_cancelled and status != "cancelled":
            faults.append(("cancelled, ended otherwise", job_id, final.get(job_id)))
        for op, outcome in outcomes:
            if outcome != "not_found" or enqueue_answered.get(job_id, op.sent) >= op.sent:
                continue
            judged += 1
            if not finished_before(job_id, op.answered, ops, cancels, final):
                faults.append(("not_found while live", job_id, op))
    for job_id in enqueued:
        outcomes = {outcome for _, outcome in cancels.get(job_id, [])}
        status = (final.get(job_id) or {}).get("status")
        if "cancelled" in outcomes:
            continue  # judged above
        may_end = {"completed", "cancelled"} if "unknown" in outcomes else {"completed"}
        if status not in may_end:
            faults.append(("lost", job_id, final.get(job_id)))
    assert not faults, f"{len(faults)} cancellation faults: {faults[:5]}"
    ended = [(final.get(i) or {}).get("status") for i in enqueued]
    return {
        "cancels_sent": sum(op.path == "/cancel" for op in ops),
        "cancelled": ended.count("cancelled"),
        "cancelled_answered": len(first_cancelled),
        "cancel_not_found_judged": judged,
        "cancels_replayed": sum(op.path == "/cancel" and op.replayed for op in ops),
        "cancelled_while_held": sum(op.path == "/heartbeat" and cancelled(op.answer) for op in ops),
        "cancel_faults": 0,
    }


def finished_before(
    job_id: str,
    answered: float,
    ops: list[Op],
    cancels: dict[str, list[tuple[Op, str]]],
    final: dict[str, Any],
) -> bool:
    """Whether something that may have finished `job_id` was sent before
    `answered`: the ack its completed record names, or a cancel that may have
    landed (its job ended cancelled)."""
    record = final.get(job_id) or {}
    if record.get("status") == "completed":
        by = (record.get("result") or {}).get("by")
        return any(
            op.path == "/ack"
            and op.body["job_id"] == job_id
            and op.body["lease_token"][:8] == by
            and op.sent < answered
            for op in ops
        )
    if record.get("status") == "cancelled":
        return any(
            op.sent < answered and outcome in ("cancelled", "unknown")
            for op, outcome in cancels[job_id]
        )
    return False


# --- schedules ---------------------------------------------------------------------------


def check_schedule(ops: list[Op], name: str, every: int, gap_bound: float) -> dict[str, Any]:
    """SPEC 11 over the jobs a schedule fired (those claimed; the history's
    check() says every job the topic counts was claimed and completed once).
    Each id is `name@slot`, a multiple of `every`; no job is claimed before its
    slot came by the store's clock (claimed_at < slot - CLOCK_TOLERANCE); each
    was created less than `every` (+ tolerance) after its slot (after downtime,
    the latest missed slot alone); and no two slots fired one after the other
    lie more than `gap_bound` apart (firing never stopped longer)."""
    slots: dict[int, dict[str, Any]] = {}
    faults: list[tuple[str, Any]] = []
    for job in claims_answered(ops).values():
        prefix, _, slot_text = job["id"].rpartition("@")
        slot = int(slot_text)
        if prefix != name or slot % every:
            faults.append(("not a slot", job["id"]))
        if job["claimed_at"] < slot - CLOCK_TOLERANCE:
            faults.append(("claimed before its slot", job))
        if job["created_at"] - slot >= every + CLOCK_TOLERANCE:
            faults.append(("fired late: a slot missed, not the latest", job))
        slots.setdefault(slot, job)
    fired = sorted(slots)
    gaps = [b - a for a, b in itertools.pairwise(fired)]
    longest = max(gaps, default=0)
    if longest > gap_bound:
        i = gaps.index(longest)
        faults.append(("stopped firing", (fired[i], fired[i + 1], longest)))
    assert len(fired) >= 2, f"the schedule fired {len(fired)} slots"
    assert not faults, f"{len(faults)} schedule faults: {faults[:5]}"
    missed = sum(gaps) // every - len(gaps)
    return {"slots_fired": len(fired), "longest_gap": longest, "slots_missed": missed}
