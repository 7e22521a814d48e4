"""The campaigns' own judgement: a history check that cries wolf hides real
faults behind flakes, so its rules are tested on histories built by hand."""

from __future__ import annotations

from typing import Any

import pytest

from tests.reliability.history import CLOCK_TOLERANCE, History, check, claimed_early
from tests.reliability.load import superseded


def test_a_claim_committed_later_supersedes_whatever_its_clock_says() -> None:
    # Broker A (its clock 0.5 s ahead) claims the job, the worker nacks it, and
    # broker B claims it again: B's claimed_at is earlier than A's, but B's
    # claim is the later one and its token the live one.
    first = {"id": "j", "attempts": 1, "claimed_at": 100.8, "lease_token": "a"}
    second = {"id": "j", "attempts": 2, "claimed_at": 100.3, "lease_token": "b"}
    claims = [(1, 100.8, "a"), (2, 100.3, "b")]
    assert not superseded(second, claims)
    assert superseded(first, claims)


def test_a_claim_alone_is_not_superseded() -> None:
    job = {"id": "j", "attempts": 3, "claimed_at": 5.0, "lease_token": "c"}
    assert not superseded(job, [(3, 5.0, "c")])


def test_a_claim_before_a_held_lease_ran_out_is_caught() -> None:
    history = History()
    history.held_leases["j"] += [(1, 106.0), (1, 110.0)]  # claimed, then renewed
    history.claims["j"] += [(1, 100.0, "a"), (2, 104.0, "b")]
    assert claimed_early(history) == [("j", 2, 104.0, 106.0), ("j", 2, 104.0, 110.0)]


def test_a_claim_after_the_lease_ran_out_by_the_clocks_tolerance_is_not() -> None:
    history = History()
    history.held_leases["j"] += [(1, 110.0)]
    history.claims["j"] += [(1, 100.0, "a"), (2, 110.0 - CLOCK_TOLERANCE + 0.01, "b")]
    assert claimed_early(history) == []


def _acked(ids: list[str]) -> History:
    """Each job claimed once and acked once, with its own token."""
    h = History()
    h.enqueued = set(ids)
    for i in ids:
        h.claims[i].append((1, 100.0, f"tok-{i}"))
        h.acked[i] += 1
        h.ack_tokens[i].add(f"tok-{i}")
    return h


def _completed(ids: list[str]) -> dict[str, Any]:
    return {i: {"id": i, "status": "completed", "result": {"by": f"tok-{i}"[:8]}} for i in ids}


def _counts(n: int) -> dict[str, int]:
    return {"enqueued": n, "completed": n, "pending": 0, "claimed": 0, "dead": 0, "total": n}


def test_a_clean_history_passes() -> None:
    check(_acked(["a", "b"]), _completed(["a", "b"]), _counts(2))


def test_a_stale_ack_whose_answer_was_lost_but_which_committed_is_caught() -> None:
    """A stale ack answered 0 or 503 was counted as refused, and nothing asked
    the job who completed it: the record (no result: stale acks send none)
    passed (review finding)."""
    h = History()
    h.enqueued = {"a"}
    h.claims["a"] += [(1, 100.0, "old-token"), (2, 103.0, "new-token")]
    h.stale_acks = h.stale_refused = 1  # answered 0: counted refused
    final = {"a": {"id": "a", "status": "completed", "result": None}}
    with pytest.raises(AssertionError, match="completed by no ack"):
        check(h, final, _counts(1))


def test_a_record_completed_by_a_token_no_ack_of_the_job_sent_is_caught() -> None:
    h = _acked(["a"])
    final = {"a": {"id": "a", "status": "completed", "result": {"by": "zzzzzzzz"}}}
    with pytest.raises(AssertionError, match="completed by no ack"):
        check(h, final, _counts(1))


def test_a_job_handed_to_two_holders_under_one_attempt_is_caught() -> None:
    """Two claims answered with one attempt number and two tokens: a double
    delivery (a claim given back with its attempt counted down although its
    answer reached the worker), which nothing checked, and claimed_early
    looks only at claims with more attempts (review finding)."""
    h = _acked(["j"])
    h.claims["j"].append((1, 100.5, "other"))
    with pytest.raises(AssertionError, match="two holders under one attempt"):
        check(h, _completed(["j"]), _counts(1))
    h = _acked(["j"])
    h.claims["j"].append((1, 100.5, "tok-j"))  # a claim answered again: its replay
    check(h, _completed(["j"]), _counts(1))


def _gone(h: History, ids: list[str], *, acked_at: float, read_at: float) -> None:
    """The final read found the records of `ids` gone, `read_at - acked_at`
    seconds after their first ack was sent."""
    for i in ids:
        h.first_ack_sent[i] = acked_at
        h.looked_up[i] = read_at
        h.gone.add(i)


def test_a_record_gone_past_its_retention_counts_expired_not_lost() -> None:
    """The long form of the clocks campaign outlasts its 55 s retention: its
    first records rightly expired and were counted lost (2,000 jobs, 450
    "lost" on localfs)."""
    h = _acked(["a", "b"])
    _gone(h, ["a"], acked_at=100.0, read_at=100.0 + 55 - CLOCK_TOLERANCE)
    verdict = check(h, _completed(["b"]), _counts(2), retention=55)
    assert verdict["expired"] == 1 and verdict["lost"] == 0


def test_a_record_gone_sooner_than_its_retention_is_lost() -> None:
    """A broker whose clock is a minute ahead expiring records by it."""
    h = _acked(["a", "b"])
    _gone(h, ["a"], acked_at=100.0, read_at=100.0 + 55 - CLOCK_TOLERANCE - 0.01)
    with pytest.raises(AssertionError, match="1 acknowledged enqueues never completed"):
        check(h, _completed(["b"]), _counts(2), retention=55)
    with pytest.raises(AssertionError, match="never completed"):  # without a retention
        _gone(h, ["a"], acked_at=0.0, read_at=1000.0)
        check(h, _completed(["b"]), _counts(2))


def test_a_record_gone_whose_job_no_ack_may_have_completed_is_lost() -> None:
    h = _acked(["b"])
    h.enqueued.add("a")
    h.looked_up["a"] = 1000.0
    h.gone.add("a")
    with pytest.raises(AssertionError, match="never completed"):
        check(h, _completed(["b"]), _counts(2), retention=55)
