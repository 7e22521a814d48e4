"""The campaigns' own judgement: a history check that cries wolf hides real
faults behind flakes, so its rules are tested on histories built by hand."""

from __future__ import annotations

from dataclasses import astuple
from typing import Any

import pytest

from tests.reliability.control import (
    Op,
    check_cancels,
    check_max_claimed,
    check_rate,
    check_schedule,
    held_intervals,
    most_held_at_once,
)
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


# --- the control campaign's checks (control.py) ------------------------------------------


def _op(path: str, body: dict[str, Any], at: float, status: int = 200, answer: Any = None) -> Op:
    """A request sent at `at` and answered 0.1 s later."""
    return Op(path, body, at, at + 0.1, status, answer)


def _claim(job_id: str, token: str, at: float, expires: float, sent: float = 0.0) -> Op:
    job = {"id": job_id, "lease_token": token, "claimed_at": at, "lease_expires_at": expires}
    return _op("/claim", {"worker_id": "w"}, sent, answer={"jobs": [job]})


def _abandoned(n: int, start: float, length: float) -> list[Op]:
    """`n` claims from `start`, each held for its lease of `length` s, never settled."""
    return [_claim(f"j{i}", f"tok-{i}", start, start + length) for i in range(n)]


def test_claims_held_past_the_limit_are_caught() -> None:
    with pytest.raises(AssertionError, match="6 claims held their jobs at once"):
        check_max_claimed(_abandoned(6, 100.0, 6.0), {}, 5, [])
    assert check_max_claimed(_abandoned(5, 100.0, 6.0), {}, 5, [5])["held_at_once_certain"] == 5


def test_claims_that_overlap_within_the_clocks_tolerance_do_not_count() -> None:
    # Two claims of one slot, the second stamped just before the first's ack
    # was: another broker's estimate of the store's clock may put it after.
    ops = [_claim("a", "tok-a", 100.0, 106.0), _claim("b", "tok-b", 103.0 - 0.5, 109.0)]
    final = {"a": {"status": "completed", "result": {"by": "tok-a"}, "finished_at": 103.0}}
    held = held_intervals(ops, final)
    assert most_held_at_once(held, CLOCK_TOLERANCE)[0] == 1
    assert most_held_at_once(held, 0.0)[0] == 2


def test_a_nacked_claim_holds_nothing_certain() -> None:
    ops = [*_abandoned(2, 100.0, 6.0), _op("/nack", {"job_id": "j1", "lease_token": "tok-1"}, 1)]
    assert check_max_claimed(ops, {}, 1, [])["held_at_once_certain"] == 1


def test_a_heartbeat_extends_what_a_claim_certainly_held() -> None:
    ops = [*_abandoned(2, 100.0, 1.4)]  # leases shorter than the clocks' tolerance
    assert check_max_claimed(ops, {}, 1, [])["held_at_once_certain"] == 0
    renewed = {"lease_expires_at": 110.0}
    ops += [
        _op("/heartbeat", {"job_id": f"j{i}", "lease_token": f"tok-{i}"}, 1, 200, renewed)
        for i in (0, 1)
    ]
    with pytest.raises(AssertionError, match="2 claims held"):
        check_max_claimed(ops, {}, 1, [])


def test_a_status_read_past_the_limit_is_caught() -> None:
    with pytest.raises(AssertionError, match="a status read showed 6 claimed"):
        check_max_claimed([], {}, 5, [3, 6, 5])


def test_claims_past_the_rate_are_caught() -> None:
    # rate 2/s, burst 2: in a second stamped, at most 2 + 2 x (1 + 1.5) = 7.
    ops = [_claim(f"j{i}", f"tok-{i}", 100.0 + i / 7, 200.0) for i in range(8)]
    with pytest.raises(AssertionError, match="8 jobs claimed"):
        check_rate(ops, 2.0, 2)
    ops = [_claim(f"j{i}", f"tok-{i}", 100.0 + i / 6, 200.0) for i in range(7)]
    assert check_rate(ops, 2.0, 2)["rate_worst_share"] == 1


def _cancel(ids: list[str], at: float, cancelled: list[str], status: int = 200) -> Op:
    answer = {"cancelled": cancelled, "not_found": [i for i in ids if i not in cancelled]}
    return _op("/cancel", {"job_ids": ids}, at, status, answer if status == 200 else None)


def _enqueue(job_id: str, at: float) -> Op:
    return _op("/enqueue", {"id": job_id}, at, 201, {"id": job_id})


def _ack(job_id: str, token: str, at: float, status: int = 200) -> Op:
    return _op("/ack", {"job_id": job_id, "lease_token": token}, at, status, {})


CANCELLED = {"status": "cancelled"}


def test_a_cancelled_job_acked_is_caught_whenever_the_ack_was_sent() -> None:
    for sent in (5.0, 15.0):  # before the cancel (it would have found it finished), after
        ops = [_enqueue("a", 1), _claim("a", "tok-a", 0, 0, sent=2), _cancel(["a"], 10, ["a"])]
        ops.append(_ack("a", "tok-a", sent))
        with pytest.raises(AssertionError, match="acked and cancelled"):
            check_cancels(ops, {"a"}, {"a": CANCELLED})


def test_a_cancelled_job_claimed_afterwards_is_caught() -> None:
    ops = [_enqueue("a", 1), _cancel(["a"], 10, ["a"]), _claim("a", "tok-a", 0, 0, sent=10.2)]
    with pytest.raises(AssertionError, match="claimed after cancelled"):
        check_cancels(ops, {"a"}, {"a": CANCELLED})
    # A claim sent before the cancel's answer came may have landed first.
    ops[-1] = _claim("a", "tok-a", 0, 0, sent=10.05)
    assert check_cancels(ops, {"a"}, {"a": CANCELLED})["cancelled"] == 1


def test_a_cancelled_job_that_ended_otherwise_is_caught() -> None:
    ops = [_enqueue("a", 1), _cancel(["a"], 10, ["a"])]
    with pytest.raises(AssertionError, match="cancelled, ended otherwise"):
        check_cancels(ops, {"a"}, {"a": {"status": "pending"}})


def test_not_found_for_a_job_still_live_is_caught() -> None:
    completed = {"a": {"status": "completed", "result": {"by": "tok-a"}}}
    ops = [_enqueue("a", 1), _cancel(["a"], 10, []), _ack("a", "tok-a", 12)]
    with pytest.raises(AssertionError, match="not_found while live"):
        check_cancels(ops, {"a"}, completed)
    ops[-1] = _ack("a", "tok-a", 9.5)  # the ack was sent first: it may have landed first
    assert check_cancels(ops, {"a"}, completed)["cancel_not_found_judged"] == 1


def test_a_job_never_cancelled_must_complete() -> None:
    ops = [_enqueue("a", 1), _enqueue("b", 1), _cancel(["b"], 10, [], status=0)]
    with pytest.raises(AssertionError, match="lost"):
        check_cancels(ops, {"a", "b"}, {"a": CANCELLED, "b": CANCELLED})
    assert check_cancels(ops, {"a", "b"}, {"a": {"status": "completed"}, "b": CANCELLED})


def _fired(slot: int, created: float, claimed: float) -> Op:
    job = {"id": f"tick@{slot}", "lease_token": f"tok-{slot}", "created_at": created}
    job.update(claimed_at=claimed, lease_expires_at=claimed + 3)
    return _op("/claim", {"worker_id": "w"}, 0, answer={"jobs": [job]})


def test_a_schedule_fired_before_its_slot_is_caught() -> None:
    ops = [_fired(100, 100.0, 100.1), _fired(101, 99.0, 99.0)]
    with pytest.raises(AssertionError, match="claimed before its slot"):
        check_schedule(ops, "tick", 1, 5.0)


def test_a_schedule_firing_missed_slots_or_stopping_is_caught() -> None:
    storm = [_fired(100, 100.0, 100.1), _fired(101, 105.0, 105.1), _fired(105, 105.0, 105.1)]
    with pytest.raises(AssertionError, match="a slot missed, not the latest"):
        check_schedule(storm, "tick", 1, 5.0)
    with pytest.raises(AssertionError, match="stopped firing"):
        check_schedule([_fired(100, 100.0, 100.1), _fired(110, 110.0, 110.1)], "tick", 1, 5.0)
    assert check_schedule(storm[::2], "tick", 1, 5.0)["slots_missed"] == 4


def test_not_found_in_a_replayed_answer_may_have_cancelled_the_job() -> None:
    # A broker standing in for the owner served the cancel again after a try
    # the owner did without answering in time: the repeat finds it cancelled.
    replayed = _cancel(["a"], 10, [])
    ops = [_enqueue("a", 1), Op(*astuple(replayed)[:-1], replayed=True)]
    assert check_cancels(ops, {"a"}, {"a": CANCELLED})["cancel_not_found_judged"] == 0
    with pytest.raises(AssertionError, match="lost"):
        check_cancels([_enqueue("a", 1), replayed], {"a"}, {"a": CANCELLED})
