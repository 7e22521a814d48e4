"""A history of every operation a campaign sent and what it was answered, and
the checks run over it at the end.

Outcomes are definite (the broker answered) or indeterminate (a timeout, a
dropped connection, a 503: the operation may or may not have landed).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

Claim = tuple[int, float, str]

# How far apart two brokers' estimates of the store's clock may be (seconds):
# on S3 each rests on Date headers of 1 s resolution (objstore/clock.py) and is
# the middle of the interval its samples leave, which is over a second wide for
# a broker just restarted (one sample, and its round trip). One broker stamps a
# lease's expiry and another may reap it.
CLOCK_TOLERANCE = 1.5


@dataclass
class History:
    """What happened, as the clients saw it."""

    enqueued: set[str] = field(default_factory=set)  # ids whose enqueue was answered 2xx
    enqueue_attempts: int = 0
    # job id -> (attempts, claimed_at by the broker's clock, lease token) of
    # each claim answered
    claims: dict[str, list[Claim]] = field(default_factory=lambda: defaultdict(list))
    acked: Counter[str] = field(default_factory=Counter)  # id -> acks answered 200
    ack_unknown: set[str] = field(default_factory=set)  # acks whose outcome is unknown
    # Per job, the tokens of its acks that succeeded or may have: its final
    # record's result (each ack sends {"by": token[:8]}) must name one of them.
    ack_tokens: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # Per job, when (monotonic) the first of its acks that succeeded or may have
    # was sent: its completion cannot have been committed, nor its record have
    # expired by the retention, sooner.
    first_ack_sent: dict[str, float] = field(default_factory=dict)
    # The final read of each job's record: when it was sent (monotonic), and the
    # ids whose record was gone (404).
    looked_up: dict[str, float] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    stale_acks: int = 0  # acks sent with a token known to be stale
    stale_refused: int = 0  # ... and refused, as they must be
    stale_committed: list[tuple[str, str]] = field(default_factory=list)
    nacked: int = 0
    abandoned: int = 0  # claims a "dying" worker never settled
    held: int = 0  # claims kept a while with heartbeats before their ack
    heartbeats: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # indeterminate outcomes by kind
    operations: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    pauses: int = 0
    # Held claims refused (409/404) while their last renewal was still well
    # inside its lease, by the client's monotonic clock: (job id, seconds since).
    live_taken: list[tuple[str, float]] = field(default_factory=list)
    # Held claims: per job, (attempts, lease_expires_at) of the claim and of
    # each renewal answered 200, by the store's clock as the broker that made
    # it estimated it. No later claim may come before one of them runs out.
    held_leases: dict[str, list[tuple[int, float]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    # Acks with a follow-up: per job, the tokens of those refused at once (they
    # record nothing; those that succeeded or may have are ack_tokens).
    refused_tokens: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    refusals: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def summary(self) -> dict[str, Any]:
        return {
            "operations": self.operations,
            "enqueued": len(self.enqueued),
            "claims": sum(len(t) for t in self.claims.values()),
            "acked": sum(self.acked.values()),
            "nacked": self.nacked,
            "abandoned_claims": self.abandoned,
            "held_claims": self.held,
            "heartbeats": self.heartbeats,
            "stale_acks_tried": self.stale_acks,
            "indeterminate": sum(self.errors.values()),
            "faults": sum(self.faults.values()),
            "kills": self.kills,
            "pauses": self.pauses,
        }


def check(
    history: History,
    final: dict[str, Any],
    counts: dict[str, int],
    *,
    retention: float | None = None,
) -> dict[str, int]:
    """Assert the campaign's invariants; return lost and double-committed counts
    (both must be 0). `final` maps each enqueued id to its record (GET /jobs).
    With `retention` (the brokers' --retention), a record gone when read back
    counts as expired, not lost, if an ack of its job that succeeded or may
    have was sent at least that long (less the clocks' tolerance) before."""
    expired = expired_records(history, retention)
    lost = [
        i
        for i in history.enqueued
        if i not in expired and final.get(i, {}).get("status") != "completed"
    ]
    assert not lost, f"{len(lost)} acknowledged enqueues never completed: {lost[:5]}"
    verdict = check_settlements(history, final)
    assert counts["enqueued"] == len(history.enqueued), (counts, len(history.enqueued))
    assert counts["completed"] == len(history.enqueued), counts
    assert counts["pending"] == counts["claimed"] == counts["dead"] == 0, counts
    assert counts["total"] == counts["completed"]
    return {"lost": len(lost), **verdict, "expired": len(expired)}


def check_settlements(history: History, final: dict[str, Any]) -> dict[str, int]:
    """The invariants of claims and acks whatever became of each job: none
    committed twice, no stale token committed, no live lease taken, no job
    handed to two holders at once, each completed by an ack of its own."""
    double = [i for i, n in history.acked.items() if n > 1]
    assert not double, f"{len(double)} jobs committed twice: {double[:5]}"
    assert not history.stale_committed, f"stale tokens committed: {history.stale_committed[:5]}"
    assert not history.live_taken, f"live leases taken: {history.live_taken[:5]}"
    early = claimed_early(history)
    assert not early, f"held leases claimed before they ran out: {early[:5]}"
    twice = delivered_twice(history)
    assert not twice, f"jobs handed to two holders under one attempt: {twice[:5]}"
    whom = completed_by_no_ack(history, final)
    assert not whom, f"completed by no ack that succeeded or may have: {whom[:5]}"
    assert history.stale_refused == history.stale_acks
    assert set(history.acked) <= history.enqueued
    return {"double_committed": len(double), "live_leases_taken": len(history.live_taken)}


def expired_records(history: History, retention: float | None) -> set[str]:
    """Jobs whose record was gone when read back, and may rightly have expired:
    the first of their acks that may have committed was sent at least
    `retention` (less CLOCK_TOLERANCE: records expire by the store's clock as
    the broker estimates it) before the record was read. A broker expiring
    records early (by a clock a minute ahead, say) drops those acked in the
    last `retention` seconds too, and they stay lost."""
    if retention is None:
        return set()
    return {
        i
        for i in history.gone
        if i in history.first_ack_sent
        and history.looked_up[i] - history.first_ack_sent[i] >= retention - CLOCK_TOLERANCE
    }


def delivered_twice(history: History) -> list[tuple[str, int]]:
    """Claims answered with two tokens under one attempt: (job id, attempts).
    Each claim that commits counts the job's attempts up (a claim given back
    because its answer never left counts it down again), so two holders with
    one attempt number had the job at once. A claim answered again (its
    attempt id's replay) answers the same token."""
    twice = []
    for job_id, claims in history.claims.items():
        tokens: dict[int, set[str]] = defaultdict(set)
        for attempts, _, token in claims:
            tokens[attempts].add(token)
        twice += [(job_id, a) for a, held in sorted(tokens.items()) if len(held) > 1]
    return twice


def completed_by_no_ack(history: History, final: dict[str, Any]) -> list[tuple[str, Any]]:
    """Completed jobs whose record's result names no ack of theirs that
    succeeded or may have: (job id, what it names). A stale ack whose answer
    was lost but which committed is one (it sends no result), as is a record
    completed by a token no ack of the job sent."""
    wrong = []
    for job_id in sorted(history.enqueued):
        record = final.get(job_id, {})
        if record.get("status") != "completed":
            continue
        by = (record.get("result") or {}).get("by")
        if by not in {token[:8] for token in history.ack_tokens[job_id]}:
            wrong.append((job_id, by))
    return wrong


def claimed_early(history: History) -> list[tuple[str, int, float, float]]:
    """Claims that came while a held lease was live, by the store's clock: (job
    id, the claim's attempts, its claimed_at, the lease's expiry), where the
    claim came more than CLOCK_TOLERANCE before that expiry. What the holder
    saw does not matter here: a lease taken while its holder was away (its
    heartbeat waited in a paused broker) is caught too."""
    early = []
    for job_id, leases in history.held_leases.items():
        for attempts, expires in leases:
            early += [
                (job_id, later, round(at, 3), round(expires, 3))
                for later, at, _ in history.claims[job_id]
                if later > attempts and at < expires - CLOCK_TOLERANCE
            ]
    return early


def check_follow_ups(history: History, follow: dict[str, Any]) -> dict[str, int]:
    """Every completed source job has exactly one follow-up, made by an ack that
    succeeded (or may have), never by one that was refused; none is missing or
    doubled. `follow` maps each source id to its follow-up job (None: none)."""
    counts = follow.pop("__counts__")
    missing = [i for i in history.enqueued if follow.get(i) is None]
    assert not missing, f"{len(missing)} completed jobs without their follow-up: {missing[:5]}"
    assert counts["enqueued"] == len(history.enqueued), (counts, len(history.enqueued))
    wrong = [
        (i, job["payload"]["token"])
        for i, job in follow.items()
        if job["payload"]["token"] not in history.ack_tokens[i]
        or job["payload"]["token"] in history.refused_tokens[i]
    ]
    if wrong:
        job_id, token = wrong[0]
        raise AssertionError(
            f"follow-ups made by acks that did not succeed: {wrong[:5]}; the first's claims "
            f"{history.claims[job_id]}, acks that may have landed "
            f"{history.ack_tokens[job_id]}, refused {history.refused_tokens[job_id]}, "
            f"its token is {token}; refusals {history.refusals[job_id]}"
        )
    return {"follow_ups": len(follow), "follow_ups_missing": 0, "follow_ups_doubled": 0}
