"""The campaigns' own judgement: a history check that cries wolf hides real
faults behind flakes, so its rules are tested on histories built by hand."""

from __future__ import annotations

from tests.reliability.history import CLOCK_TOLERANCE, History, claimed_early
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
