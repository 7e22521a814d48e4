"""The topic state machine, without I/O: the rules of SPEC section 3."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from simplequeue import keys
from simplequeue.api import MAX_DELAY, FollowUpSpec, JobSpec
from simplequeue.errors import InvalidRequest, JobNotFound, LeaseLost
from simplequeue.state import IdFilter, Loaded, Segment, SegmentMissing, TopicState
from simplequeue.state.chain import Chain, new_chain
from tests.helpers.states import fresh, reread, seal

T0 = 1_000_000.0


def reload(state: TopicState, now: float = T0) -> TopicState:
    """Seal, serialise and parse the state, as a write and a re-read would."""
    return reread(state, now)


def ids(jobs: list[dict[str, Any]]) -> list[str]:
    return [j["id"] for j in jobs]


def test_enqueue_then_claim_returns_the_job_with_a_lease() -> None:
    s = fresh()
    [answer] = s.enqueue([JobSpec({"n": 1})], T0)
    assert answer["duplicate"] is False
    [job] = s.claim("w1", 10, 1, T0 + 1)
    assert job["id"] == answer["id"]
    assert job["payload"] == {"n": 1}
    assert job["attempts"] == 1
    assert job["claimed_by"] == "w1"
    assert job["lease_expires_at"] == T0 + 11
    assert job["lease_token"]


def test_claim_on_empty_topic_returns_nothing_and_changes_nothing() -> None:
    s = fresh()
    assert s.claim("w", None, 1, T0) == []
    assert s.dirty is False


def test_claim_order_is_priority_then_oldest() -> None:
    s = fresh()
    s.enqueue([JobSpec(0, id="low-old", priority=-1)], T0)
    s.enqueue([JobSpec(0, id="mid-old")], T0 + 1)
    s.enqueue([JobSpec(0, id="high", priority=5)], T0 + 2)
    s.enqueue([JobSpec(0, id="mid-new")], T0 + 3)
    got = s.claim("w", None, 10, T0 + 4)
    assert ids(got) == ["high", "mid-old", "mid-new", "low-old"]


def test_delayed_job_is_not_claimable_before_run_at() -> None:
    s = fresh()
    s.enqueue([JobSpec(0, id="later", delay=60)], T0)
    s.enqueue([JobSpec(0, id="now")], T0)
    assert ids(s.claim("w", None, 10, T0 + 1)) == ["now"]
    assert s.counts(T0 + 1)["delayed"] == 1
    assert s.claim("w", None, 10, T0 + 59) == []
    assert ids(s.claim("w", None, 10, T0 + 60)) == ["later"]


def test_a_job_with_a_time_comes_due_then_and_one_past_is_due_now() -> None:
    s = fresh()
    [later, past] = s.enqueue(
        [JobSpec(0, id="later", run_at=T0 + 60), JobSpec(0, id="past", run_at=T0 - 60)], T0
    )
    assert not later["duplicate"] and not past["duplicate"]
    assert ids(s.claim("w", None, 10, T0)) == ["past"]
    assert s.claim("w", None, 10, T0 + 59.9) == []
    [job] = s.claim("w", None, 10, T0 + 60)
    assert (job["id"], job["run_at"]) == ("later", T0 + 60)
    found = s.find("past")
    assert found is not None and found[1]["run_at"] == T0  # not before its enqueue


def test_a_time_further_ahead_than_the_longest_delay_is_refused_and_changes_nothing() -> None:
    s = fresh()
    far = T0 + MAX_DELAY + 1
    with pytest.raises(InvalidRequest, match="run_at"):
        s.enqueue([JobSpec(0, id="ok"), JobSpec(0, id="far", run_at=far)], T0)
    assert s.dirty is False and not s.exists("ok")
    s.enqueue([JobSpec(0, id="src")], T0)
    [job] = s.claim("w", None, 1, T0)
    for follow_up in (FollowUpSpec(1, run_at=far), FollowUpSpec(1, topic="other", run_at=far)):
        with pytest.raises(InvalidRequest, match="run_at"):
            s.ack("src", job["lease_token"], None, T0, [follow_up])
        assert s.claimed_count() == 1 and s.outbox_size() == 0
    s.enqueue([JobSpec(0, id="edge", run_at=T0 + MAX_DELAY)], T0)  # the longest delay's


def test_a_follow_up_for_another_topic_keeps_its_time_as_a_delay_from_the_ack() -> None:
    s = fresh()
    s.enqueue([JobSpec(0, id="src")], T0)
    [job] = s.claim("w", None, 1, T0)
    specs = [FollowUpSpec(1, topic="o", run_at=T0 + 90), FollowUpSpec(2, topic="o", run_at=T0 - 5)]
    s.ack("src", job["lease_token"], None, T0 + 10, specs)
    [timed, past] = s.outbox_front(10)
    assert (timed["at"], timed["delay"]) == (T0 + 10, 80)
    assert past["at"] == T0 + 10 and "delay" not in past


def test_duplicate_id_is_not_enqueued_again_live_or_retained() -> None:
    s = fresh()
    s.enqueue([JobSpec(1, id="a")], T0)
    assert s.enqueue([JobSpec(2, id="a")], T0) == [{"id": "a", "duplicate": True}]
    [job] = s.claim("w", None, 1, T0)
    s.ack("a", job["lease_token"], None, T0)
    assert s.enqueue([JobSpec(3, id="a")], T0)[0]["duplicate"] is True
    assert s.counts(T0)["enqueued"] == 1


def test_duplicates_within_one_batch_are_caught() -> None:
    s = fresh()
    answers = s.enqueue([JobSpec(1, id="x"), JobSpec(2, id="x")], T0)
    assert [a["duplicate"] for a in answers] == [False, True]
    assert s.counts(T0)["pending"] == 1


def test_retained_record_expires_and_id_can_be_reused_after_retention() -> None:
    s = fresh(retention=100)
    s.enqueue([JobSpec(1, id="a")], T0)
    [job] = s.claim("w", None, 1, T0)
    s.ack("a", job["lease_token"], {"ok": True}, T0)
    assert s.find("a") is not None
    seal(s, "w1", T0 + 101)
    assert s.find("a") is None
    assert s.enqueue([JobSpec(1, id="a")], T0 + 101)[0]["duplicate"] is False


def test_ack_with_current_token_completes_and_keeps_result() -> None:
    s = fresh()
    s.enqueue([JobSpec(1, id="a")], T0)
    [job] = s.claim("w", None, 1, T0)
    s.ack("a", job["lease_token"], {"r": 42}, T0 + 1)
    status, record = s.find("a") or ("", {})
    assert status == "completed"
    assert record["result"] == {"r": 42}
    c = s.counts(T0 + 1)
    assert (c["completed"], c["claimed"], c["pending"], c["total"]) == (1, 0, 0, 1)


def test_stale_token_is_refused_and_changes_nothing() -> None:
    s = fresh()
    s.enqueue([JobSpec(1, id="a")], T0)
    [first] = s.claim("w1", 5, 1, T0)
    s.reap(T0 + 6)
    [second] = s.claim("w2", 5, 1, T0 + 6)
    assert first["lease_token"] != second["lease_token"]
    before = orjson.dumps(s.head)
    for op in (
        lambda: s.ack("a", first["lease_token"], None, T0 + 7),
        lambda: s.nack("a", first["lease_token"], 0, "x", T0 + 7),
        lambda: s.heartbeat("a", first["lease_token"], None, T0 + 7),
    ):
        with pytest.raises(LeaseLost):
            op()
    assert orjson.dumps(s.head) == before
    s.ack("a", second["lease_token"], None, T0 + 7)


def test_ack_without_token_needs_the_job_claimed() -> None:
    s = fresh()
    s.enqueue([JobSpec(1, id="a")], T0)
    with pytest.raises(LeaseLost):
        s.ack("a", None, None, T0)
    s.claim("w", None, 1, T0)
    s.ack("a", None, None, T0)


def test_unknown_job_is_job_not_found() -> None:
    s = fresh()
    with pytest.raises(JobNotFound):
        s.ack("nope", None, None, T0)
    with pytest.raises(JobNotFound):
        s.heartbeat("nope", None, None, T0)


def test_nack_returns_to_pending_after_delay_with_error() -> None:
    s = fresh()
    s.enqueue([JobSpec(1, id="a")], T0)
    [job] = s.claim("w", None, 1, T0)
    assert s.nack("a", job["lease_token"], 30, "boom", T0)["status"] == "delayed"
    assert s.claim("w", None, 1, T0 + 29) == []
    [again] = s.claim("w", None, 1, T0 + 30)
    assert again["attempts"] == 2
    assert again["last_error"] == "boom"


def test_nack_past_max_attempts_goes_dead_with_whole_record() -> None:
    s = fresh()
    s.enqueue([JobSpec({"big": "data"}, id="a", max_attempts=2)], T0)
    for i in range(2):
        [job] = s.claim("w", None, 1, T0 + i)
        s.nack("a", job["lease_token"], 0, f"fail {i}", T0 + i)
    [dead] = s.dead_jobs()
    assert dead["payload"] == {"big": "data"}
    assert dead["last_error"] == "fail 1"
    assert s.counts(T0 + 2)["dead"] == 1
    assert s.claim("w", None, 1, T0 + 3) == []


def test_zero_max_attempts_means_unlimited() -> None:
    s = fresh()
    s.enqueue([JobSpec(1, id="a", max_attempts=0)], T0)
    for i in range(50):
        [job] = s.claim("w", None, 1, T0 + i)
        assert s.nack("a", job["lease_token"], 0, "again", T0 + i)["status"] == "pending"


def test_heartbeat_extends_the_lease_and_keeps_it_from_reaping() -> None:
    s = fresh()
    s.enqueue([JobSpec(1, id="a")], T0)
    [job] = s.claim("w", 10, 1, T0)
    assert s.heartbeat("a", job["lease_token"], None, T0 + 8)["lease_expires_at"] == T0 + 18
    assert s.reap(T0 + 12) == {"pending": 0, "dead": 0}
    assert s.reap(T0 + 18) == {"pending": 1, "dead": 0}


def test_reap_sends_spent_jobs_dead() -> None:
    s = fresh()
    s.enqueue([JobSpec(1, id="a", max_attempts=1)], T0)
    s.claim("w", 5, 1, T0)
    assert s.reap(T0 + 5) == {"pending": 0, "dead": 1}
    assert s.dead_jobs()[0]["last_error"] == "lease expired"


def test_a_job_reaped_after_a_nack_says_its_lease_expired() -> None:
    """A job's last_error is its last failure: one nacked with "boom", then
    claimed by a worker that died, kept "boom", and went dead naming an
    error its last attempt never had (an OOM or a crash, hidden)."""
    s = fresh()
    s.enqueue([JobSpec("p", id="a", max_attempts=2)], T0)
    [job] = s.claim("w", 30, 1, T0)
    assert s.nack("a", job["lease_token"], 0, "boom", T0)["status"] == "pending"
    s.claim("w", 30, 1, T0 + 1)
    assert s.reap(T0 + 100)["dead"] == 1
    assert s.dead_jobs()[0]["last_error"] == "lease expired"


def test_requeue_and_purge_dead_jobs() -> None:
    s = fresh()
    s.enqueue([JobSpec(1, id=i, max_attempts=1) for i in "abc"], T0)
    for job in s.claim("w", None, 3, T0):
        s.nack(job["id"], job["lease_token"], 0, "x", T0)
    assert s.requeue(["b"], T0 + 1) == ["b"]
    [job] = s.claim("w", None, 5, T0 + 1)
    assert (job["id"], job["attempts"]) == ("b", 1)
    assert sorted(s.purge(None, T0 + 2)) == ["a", "c"]
    assert s.dead_jobs() == []
    assert s.find("a") == ("dead", s.find("a")[1])  # type: ignore[index]


def test_a_purge_of_named_jobs_answers_the_same_when_sent_again() -> None:
    """A purge(ids) retried after its answer was lost (the first try landed)
    answered [], as if nothing had been purged: a purged job keeps a record
    saying "dead", so the SDK could not tell (round 17's open note). Named
    ids gone from the dead queue with a dead record are purged: the answer
    is the same however often it is sent."""
    s = fresh()
    s.enqueue([JobSpec(1, id=i, max_attempts=1) for i in "abc"], T0)
    for job in s.claim("w", None, 3, T0):
        s.nack(job["id"], job["lease_token"], 0, "x", T0)
    s.enqueue([JobSpec(1, id="ok")], T0)
    [job] = s.claim("w", None, 1, T0)
    s.ack(job["id"], job["lease_token"], None, T0)
    assert s.purge(["b", "a"], T0 + 1) == ["b", "a"]
    assert s.purge(["b", "a", "c", "ok", "never"], T0 + 2) == ["b", "a", "c"]
    assert s.purge(["a", "b", "c"], T0 + 3) == ["a", "b", "c"]
    assert s.dead_jobs() == []


def test_dead_limit_drops_the_oldest_and_counts_them() -> None:
    s = fresh(dead_limit=3)
    s.enqueue([JobSpec(i, id=str(i), max_attempts=1) for i in range(5)], T0)
    for job in s.claim("w", None, 5, T0):
        s.nack(job["id"], job["lease_token"], 0, None, T0)
    assert ids(s.dead_jobs()) == ["2", "3", "4"]
    assert s.head["counters"]["dead_dropped"] == 2


def test_a_dead_job_dropped_over_the_limit_keeps_its_record_as_a_purged_one_does() -> None:
    """Dropped, it left no record: within retention its id was unknown to
    lookups and admitted again (SPEC 3)."""
    s = fresh(dead_limit=1, retention=3600)
    s.enqueue([JobSpec(i, id=str(i), max_attempts=1) for i in range(2)], T0)
    for job in s.claim("w", None, 2, T0):
        s.nack(job["id"], job["lease_token"], 0, "boom", T0)
    assert ids(s.dead_jobs()) == ["1"]
    found = s.find("0")
    assert found is not None and found[0] == "dead"
    [again] = s.enqueue([JobSpec("again", id="0")], T0 + 1)
    assert again["duplicate"] is True
    assert s.counts(T0 + 1)["pending"] == 0


def test_pending_spills_into_segments_and_claims_follow_them_in_order() -> None:
    s = fresh(inline_pending_bytes=2000)
    n = 0
    for batch in range(20):
        s.enqueue([JobSpec("x" * 50, id=f"j{n + i:04d}") for i in range(10)], T0 + batch)
        n += 10
        s = reload(s, T0 + batch)
    assert s.head["lanes"]["0"]["runs"], "expected spilled segments"
    assert len(orjson.dumps(s.head)) < 4000
    got: list[str] = []
    for i in range(25):
        got += ids(s.claim("w", None, 8, T0 + 100 + i))
        s = reload(s, T0 + 100 + i)
    assert got == [f"j{i:04d}" for i in range(200)]


def test_a_claim_or_pop_takes_no_more_jobs_once_their_payloads_reach_claim_bytes() -> None:
    """`count` bounded a claim in jobs only: 1,000 jobs of a MiB were one
    answer, and their segments one batch's reads (review of the HTTP edge).
    The first job is taken however large; the claims of one batch share the
    bound (their segments are read together), each taking one job at least."""
    s = fresh(inline_pending_bytes=500, claim_bytes=250)
    s.enqueue([JobSpec("x" * 1000, id="big")], T0)
    s.enqueue([JobSpec("y" * 98, id=f"j{i}") for i in range(12)], T0)  # 100 bytes as JSON
    s = reload(s)
    assert s.head["lanes"]["0"]["runs"], "expected spilled segments"
    s.begin()
    assert ids(s.claim("w", None, 10, T0)) == ["big"]
    s.begin()
    assert ids(s.claim("w", None, 10, T0)) == ["j0", "j1", "j2"]  # 300 bytes: past 250
    s.begin()
    assert ids(s.pop("w", 10, T0)) == ["j3", "j4", "j5"]
    assert ids(s.claim("w2", None, 10, T0)) == ["j6"]  # the same batch: its first job only
    s.begin()
    assert ids(s.claim("w", None, 2, T0)) == ["j7", "j8"]


def test_jobs_in_segments_are_found_and_deduplicated() -> None:
    s = fresh(inline_pending_bytes=500)
    s.enqueue([JobSpec(i, id=f"a{i}") for i in range(30)], T0)
    s = reload(s)
    assert s.head["lanes"]["0"]["runs"]
    assert s.find("a3") == ("pending", s.find("a3")[1])  # type: ignore[index]
    assert s.enqueue([JobSpec(0, id="a3")], T0)[0]["duplicate"] is True


def test_an_id_spilled_then_expired_can_be_enqueued_again_in_the_same_state() -> None:
    # The committer keeps its state object across writes: the duplicate index
    # must follow records into segments and out of the topic.
    s = fresh(inline_records_bytes=300, retention=100)
    s.enqueue([JobSpec(i, id=f"r{i}") for i in range(6)], T0)
    for job in s.claim("w", None, 6, T0):
        s.ack(job["id"], job["lease_token"], None, T0)
    assert s.exists("r0")
    seal(s, "w1", T0)  # spills the retained records into a segment
    assert s.head["retained"]["segs"] and s.exists("r0")
    seal(s, "w2", T0 + 101)  # the segment expires
    assert not s.head["retained"]["segs"]
    assert not s.exists("r0") and s.find("r0") is None
    assert s.enqueue([JobSpec("again", id="r0")], T0 + 101)[0]["duplicate"] is False


def test_unpop_gives_back_a_pop_whose_record_spilled_meanwhile() -> None:
    s = fresh(inline_records_bytes=300, retention=100)
    s.enqueue([JobSpec(i, id=f"r{i}") for i in range(6)], T0)
    popped = s.pop("w", 6, T0)
    seal(s, "w1", T0)  # the pop's records spill into a segment
    assert s.head["retained"]["segs"]
    s = reload(s, T0 + 1)
    assert s.unpop(popped[2], T0 + 1)
    assert s.find("r2") == ("pending", s.find("r2")[1])  # type: ignore[index]
    counts = s.counts(T0 + 1)
    assert (counts["pending"], counts["completed"], counts["total"]) == (1, 5, 6)
    assert s.head["prios"] == {"0": 1}  # held again
    s = reload(s, T0 + 2)
    [again] = s.pop("w", 1, T0 + 2)
    assert (again["id"], again["payload"], again["attempts"]) == ("r2", 2, 1)


@pytest.mark.parametrize("new_one_popped", [False, True])
def test_unpop_of_an_id_a_new_job_took_changes_nothing(new_one_popped: bool) -> None:
    s = fresh(retention=10)
    s.enqueue([JobSpec("old", id="x")], T0)
    [popped] = s.pop("w", 1, T0)
    s.expire(T0 + 11)  # its record expires, and the id is free again
    s.enqueue([JobSpec("new", id="x")], T0 + 11)
    if new_one_popped:  # the new job's record is not the old one's
        assert s.pop("w2", 1, T0 + 11)[0]["payload"] == "new"
    assert s.unpop(popped, T0 + 12) is False
    counts = s.counts(T0 + 12)
    assert (counts["pending"], counts["completed"]) == (0, 2) if new_one_popped else (1, 1)
    assert s.find("x")[0] == ("completed" if new_one_popped else "pending")  # type: ignore[index]


def test_unpop_after_the_record_expired_takes_back_the_completion() -> None:
    """With a short retention (0 expires it at the next write), the record is
    gone before the undo lands: the completion is not counted either."""
    s = fresh(retention=10)
    s.enqueue([JobSpec("p", id="x")], T0)
    [popped] = s.pop("w", 1, T0)
    s.expire(T0 + 11)
    assert s.unpop(popped, T0 + 12) is True
    counts = s.counts(T0 + 12)
    assert (counts["pending"], counts["completed"], counts["total"]) == (1, 0, 1)
    # The completion was counted down, and /metrics exports what the topic ever
    # did as Prometheus counters: one that went down reads as a reset.
    totals = s.totals()
    assert (totals["completed"], totals["given_back"]) == (1, 1)


class CountingView:
    """A view that counts the segments and manifests read through it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads = 0

    def segment(self, key: str) -> Any:
        self.reads += 1
        return self.inner.segment(key)

    def manifest(self, key: str) -> Any:
        self.reads += 1
        return self.inner.manifest(key)


def spread_state() -> TopicState:
    """Jobs with ids in every chain exists() searches (runs, leases, retained,
    dead), each with loose segments and manifests."""
    s = fresh(
        inline_pending_bytes=400,
        inline_leases_bytes=400,
        inline_records_bytes=300,
        inline_dead_bytes=300,
        loose_max=2,
        manifests_max=3,
        max_attempts=1,
        retention=10_000,
        dead_limit=10_000,
    )
    for i in range(240):
        s.enqueue([JobSpec({"n": i}, id=f"j{i}")], T0)
        seal(s, f"w{i}", T0)
    for i in range(0, 180, 3):  # a third completed, a third dead, the rest claimed
        jobs = s.claim("w", 600, 3, T0)
        s.ack(jobs[0]["id"], jobs[0]["lease_token"], None, T0)
        s.nack(jobs[1]["id"], jobs[1]["lease_token"], 0, "boom", T0)
        seal(s, f"c{i}", T0)
    h = s.head
    for chain in (h["leases"], h["retained"], h["dead"], *h["lanes"]["0"]["runs"]):
        assert chain["segs"] and chain["mans"], chain
    return s


@pytest.mark.parametrize("fresh_filter", [False, True], ids=["kept", "new"])
def test_exists_finds_every_id_in_every_chain_and_no_other(fresh_filter: bool) -> None:
    """The id filter covers loose segments as it goes and manifests it has not
    seen (a new filter: a broker that took the topic over)."""
    s = spread_state()
    if fresh_filter:
        s.ids = IdFilter()
    assert all(s.exists(f"j{i}") for i in range(240))
    assert not any(s.exists(f"x{i}") for i in range(240))
    assert [s.find(f"j{i}") is not None for i in range(240)] == [True] * 240


def test_exists_rules_out_a_fresh_id_without_reading_a_segment() -> None:
    s = spread_state()
    s.exists("j0")  # covers what is there
    counting = CountingView(s._view.view)
    s._view = type(s._view)(counting, {})  # nothing read yet in this batch
    assert not any(s.exists(f"fresh{i}") for i in range(100))
    assert counting.reads == 0  # it used to read each segment and manifest, every time
    assert s.exists("j5") and counting.reads > 0


def test_the_id_filter_is_rebuilt_once_it_holds_mostly_ids_that_left() -> None:
    s = fresh(inline_records_bytes=300, retention=100, loose_max=2)
    s.ids = IdFilter(stale_floor=0)
    for round_ in range(6):  # each round's records expire in the next one
        now = T0 + 101 * round_
        s.enqueue([JobSpec(i, id=f"r{round_}-{i}") for i in range(30)], now)
        for job in s.claim("w", None, 30, now):
            s.ack(job["id"], job["lease_token"], None, now)
        seal(s, f"w{round_}", now)
        assert s.exists(f"r{round_}-0")
        assert not s.exists(f"r{round_ - 1}-0") and s.ids.size <= 4 * 30 + 30
    assert not s.enqueue([JobSpec(0, id="r0-0")], T0 + 700)[0]["duplicate"]


def test_first_skips_holes_past_the_cursor_and_reads_no_segment_it_does_not_need() -> None:
    """The head keeps the cursor on a live item, so first() meets no hole in
    practice; it must still skip them as places() does, and not read a
    segment with nothing live past the cursor."""
    view = Loaded()
    key = keys.segment("t", "s2")
    view.add(Segment(key, [{"id": "a"}, {"id": "b"}, {"id": "c"}], 100))
    d = new_chain()
    d["segs"] = [
        {"k": "s1", "n": 2, "live": 0, "holes": [0, 1]},  # not loaded: must not be read
        {"k": "s2", "n": 3, "live": 1, "holes": [0, 1]},
    ]
    d["n"] = 1
    chain = Chain(d, "t", view)
    place = chain.first()
    assert place is not None and (place.seg, place.index, place.item["id"]) == ("s2", 2, "c")
    d["pos"] = 2  # the cursor in the first segment: only s2's items from 0 count
    assert chain.first() == place


def test_compacting_the_first_lease_manifest_takes_back_only_its_live_records() -> None:
    """Acks in claim order consume the leases' first manifest from its front
    (its cursor `mpos` moves on); once half of it is resolved it is compacted.
    It used to take back the records of the segments its cursor had passed
    too: acked jobs held as claimed again, then StopIteration in every later
    seal (a topic no write could change any more)."""
    s = fresh()
    n = 3000
    s.enqueue([JobSpec(i, id=f"j{i}") for i in range(n)], T0)
    seal(s, "w0", T0)
    tokens: dict[str, str] = {}
    for k in range(n // 100):
        tokens.update((j["id"], j["lease_token"]) for j in s.claim("w", 600, 100, T0))
        seal(s, f"c{k}", T0)
    assert s.head["leases"]["mans"]
    compacted = False
    for i in range(n):
        s.ack(f"j{i}", tokens[f"j{i}"], None, T0)
        if i % 5 == 4:
            mpos = s.head["leases"]["mpos"]
            seal(s, f"a{i}", T0)
            compacted = compacted or (mpos > 0 and s.head["leases"]["mpos"] == 0)
        if i % 250 == 249:
            held = [p.item["id"] for p in s.leases.places()]  # compaction reorders them
            assert sorted(held) == sorted(f"j{k}" for k in range(i + 1, n))
            assert s.claimed_count() == n - i - 1
    assert compacted  # the case above happened
    assert s.counts(T0)["completed"] == n and s.claimed_count() == 0


def test_rollback_undoes_a_half_applied_batch_and_keeps_the_lease_index() -> None:
    """The committer rolls a batch back when it finds an object missing, and applies
    it again: the claimed set must be as it was, without reading it all again."""
    s = fresh(inline_leases_bytes=300)
    s.enqueue([JobSpec(i, id=f"j{i}") for i in range(20)], T0)
    held = {j["id"]: j["lease_token"] for j in s.claim("w", None, 20, T0)}
    s = reload(s)  # the leases spilled
    assert s.head["leases"]["segs"]
    s.ack("j3", held["j3"], None, T0)  # the index is built, then j3 leaves it
    began = orjson.dumps(s.head)  # the head the batch starts from
    s.begin()
    s.ack("j5", held["j5"], None, T0)  # a spilled lease leaves a hole
    s.heartbeat("j7", held["j7"], 60, T0)  # and another moves inline
    s.rollback(orjson.loads(began))
    for job_id in ("j5", "j7"):
        assert s.find(job_id) is not None and s.find(job_id)[0] == "claimed"  # type: ignore[index]
    assert s.find("j3") is not None and s.find("j3")[0] == "completed"  # type: ignore[index]
    assert s.ack("j5", held["j5"], None, T0)["status"] == "completed"
    assert s.heartbeat("j7", held["j7"], 60, T0)["lease_expires_at"] == T0 + 60
    assert s.counts(T0)["claimed"] == 18


def test_dead_jobs_keep_their_death_order_across_segments_after_a_partial_purge() -> None:
    """A partial purge or requeue across dead segments used to reverse their order,
    and the dead limit then dropped the newest instead of the oldest."""
    s = fresh(inline_dead_bytes=200, dead_limit=12)
    order = [f"d{i:02d}" for i in range(12)]
    for job_id in order:
        s.enqueue([JobSpec(1, id=job_id, max_attempts=1)], T0)
        [job] = s.claim("w", None, 1, T0)
        s.nack(job_id, job["lease_token"], 0, None, T0)
        s = reload(s)
    assert s.head["dead"]["segs"], "the dead jobs spilled"
    s.purge(["d01", "d05", "d09"], T0)
    s.requeue(["d03"], T0)
    s = reload(s)
    kept = [i for i in order if i not in ("d01", "d03", "d05", "d09")]
    assert [j["id"] for j in s.dead_jobs()] == kept
    for job_id in ("n0", "n1", "n2", "n3", "n4"):  # past the limit: the oldest go
        s.enqueue([JobSpec(1, id=job_id, max_attempts=1)], T0)
        [job] = s.claim("w", None, 1, T0)
        if job["id"] != job_id:  # d03, requeued, comes first
            s.nack(job["id"], job["lease_token"], 0, None, T0)
            [job] = s.claim("w", None, 1, T0)
        s.nack(job_id, job["lease_token"], 0, None, T0)
    # In death order (d03 died again, first), the two oldest over the limit dropped.
    died = [*kept, "d03", "n0", "n1", "n2", "n3", "n4"]
    assert [j["id"] for j in s.dead_jobs()] == died[-12:]
    assert s.head["counters"]["dead_dropped"] == 2


def test_pending_jobs_hold_at_most_lanes_max_distinct_priorities() -> None:
    """Each priority is a lane in the head: 10,000 distinct ones made a 2 MB
    head. Past the bound an enqueue is refused whole, and changes nothing."""
    s = fresh(lanes_max=4)
    s.enqueue([JobSpec(p, priority=p) for p in range(4)], T0)
    before = orjson.dumps(s.head)
    with pytest.raises(InvalidRequest, match="more than 4 distinct priorities"):
        s.enqueue([JobSpec("a", priority=0), JobSpec("b", priority=9)], T0)
    assert orjson.dumps(s.head) == before
    s.enqueue([JobSpec("c", priority=3)], T0)  # a lane there takes more
    claimed = s.claim("w", 30, 5, T0)
    assert len(claimed) == 5
    for job in claimed:
        s.ack(job["id"], job["lease_token"], None, T0)
    s.enqueue([JobSpec(p, priority=100 + p) for p in range(4)], T0)  # all done
    assert len(s.head["lanes"]) == 4


def test_priorities_of_claimed_and_dead_jobs_count_against_lanes_max() -> None:
    """A topic held pending jobs of at most lanes_max priorities, but claimed
    and dead ones were not counted: claim them, enqueue others, and their
    nacks, reaps and requeues opened a lane each (2,000 made a 519 KB head,
    past SPEC 4.1's 256 KB). Every job the topic holds counts now, so no job
    coming back opens a lane past the bound."""
    s = fresh(lanes_max=4, max_attempts=0)
    s.enqueue([JobSpec(p, priority=p) for p in range(2)], T0)
    s.claim("w", 30, 2, T0)  # two priorities claimed
    s.enqueue([JobSpec(10, priority=2, max_attempts=1)], T0)
    [dead] = s.claim("w", 30, 1, T0)
    s.nack(dead["id"], dead["lease_token"], 0, "boom", T0)  # one priority dead
    s.enqueue([JobSpec(3, priority=3)], T0)  # one pending: four in all
    before = orjson.dumps(s.head)
    with pytest.raises(InvalidRequest, match="more than 4 distinct priorities"):
        s.enqueue([JobSpec(9, priority=9)], T0)
    assert orjson.dumps(s.head) == before
    s.enqueue([JobSpec("again", priority=1)], T0)  # a priority held takes more
    s.reap(T0 + 31)  # the two claims come back
    s.requeue(None, T0 + 31)
    assert len(s.head["lanes"]) == 4
    with pytest.raises(InvalidRequest, match="more than 4 distinct priorities"):
        reload(s, T0 + 31).enqueue([JobSpec(9, priority=9)], T0 + 31)


def test_duplicates_count_for_no_priority() -> None:
    """An enqueue counted the priorities of every spec, duplicates too: at the
    bound, the SDK's retry of a batch that had landed (every id a duplicate)
    was refused instead of answered "duplicate", and refused again each time."""
    s = fresh(lanes_max=2)
    s.enqueue([JobSpec("a", id="a", priority=1), JobSpec("b", id="b", priority=2)], T0)
    answers = s.enqueue([JobSpec("a", id="a", priority=9), JobSpec("b", id="b", priority=8)], T0)
    assert answers == [{"id": "a", "duplicate": True}, {"id": "b", "duplicate": True}]
    twice = s.enqueue([JobSpec("c", id="c", priority=1), JobSpec("c", id="c", priority=7)], T0)
    assert twice == [{"id": "c", "duplicate": False}, {"id": "c", "duplicate": True}]
    assert s.head["prios"] == {"1": 2, "2": 1}
    with pytest.raises(InvalidRequest, match="more than 2 distinct priorities"):
        s.enqueue([JobSpec("d", id="d", priority=7), JobSpec("a", id="a", priority=1)], T0)


def test_a_pop_given_back_comes_back_though_its_priority_was_taken() -> None:
    """A pop whose caller went away is given back in a later batch; meanwhile
    another priority may have taken its place. The job is not lost for the
    bound: it comes back (the bound passed by its priority, documented), and
    no new priority is taken until jobs leave."""
    s = fresh(lanes_max=1)
    s.enqueue([JobSpec("a", id="a", priority=1)], T0)
    [popped] = s.pop("w", 1, T0)
    s.enqueue([JobSpec("b", id="b", priority=2)], T0)  # a's place
    assert s.unpop(popped, T0)
    assert s.head["prios"] == {"1": 1, "2": 1}
    with pytest.raises(InvalidRequest, match="more than 1 distinct priorities"):
        s.enqueue([JobSpec("c", id="c", priority=3)], T0)
    assert [j["id"] for j in s.pop("w", 2, T0)] == ["b", "a"]
    s.enqueue([JobSpec("c", id="c", priority=3)], T0)


def test_a_priority_is_free_again_once_no_job_of_it_is_held() -> None:
    """Ack, cancel, purge and the dead limit each let go of the last job of a
    priority: another may take its place."""
    s = fresh(lanes_max=2, max_attempts=1, dead_limit=1)
    s.enqueue([JobSpec("a", id="a", priority=1), JobSpec("b", id="b", priority=2)], T0)

    def full() -> None:
        with pytest.raises(InvalidRequest, match="more than 2 distinct priorities"):
            s.enqueue([JobSpec("x", priority=99)], T0)

    full()
    s.cancel(["a"], T0)
    s.enqueue([JobSpec("c", id="c", priority=3)], T0)  # a's place
    full()
    [b, c] = s.claim("w", 30, 2, T0)
    s.ack(b["id"], b["lease_token"], None, T0)
    s.enqueue([JobSpec("d", id="d", priority=4)], T0)  # b's place
    full()
    s.nack(c["id"], c["lease_token"], 0, "x", T0)  # c dead
    [d] = s.claim("w", 30, 1, T0)
    s.nack(d["id"], d["lease_token"], 0, "x", T0)  # d dead, c dropped (dead limit)
    s.enqueue([JobSpec("e", id="e", priority=5)], T0)  # c's place
    full()
    s.purge(None, T0)
    s.enqueue([JobSpec("f", id="f", priority=6)], T0)  # d's place
    full()
    s = reload(s)
    full()
    assert s.head["prios"] == {"5": 1, "6": 1}


@pytest.mark.parametrize("counted", [True, False], ids=["counted", "head-without-counts"])
def test_an_acks_follow_up_may_take_the_priority_the_acked_job_frees(counted: bool) -> None:
    """The acked job is the last of its priority in a topic at lanes_max, and
    its follow-up (same topic) has a new priority: after the ack the topic
    holds lanes_max priorities again. The follow-up was counted before the
    acked job left, so the ack was refused ("more than 2 distinct
    priorities") and the job could never be acked with it (a Worker nacks it
    and runs it again). A refused ack still changes nothing."""
    s = fresh(lanes_max=2)
    s.enqueue([JobSpec(1, id="a", priority=1), JobSpec(2, id="b", priority=2)], T0)
    [b] = s.claim("w", 30, 1, T0)
    if not counted:  # as an earlier version wrote it: counted when first needed
        del s.head["prios"]
    before = orjson.dumps(s.head)
    with pytest.raises(InvalidRequest, match="more than 2 distinct priorities"):
        s.ack(
            "b",
            b["lease_token"],
            None,
            T0,
            [FollowUpSpec(3, priority=3), FollowUpSpec(4, priority=4)],
        )
    if counted:  # else the counts, counted, may stay
        assert orjson.dumps(s.head) == before
    assert s.head.get("prios", {"1": 1, "2": 1}) == {"1": 1, "2": 1}
    answer = s.ack("b", b["lease_token"], None, T0, [FollowUpSpec("next", priority=3)])
    assert answer == {"id": "b", "status": "completed", "enqueued": ["b:0"]}
    assert s.head["prios"] == {"1": 1, "3": 1}
    assert sorted(j["priority"] for j in s.pending_jobs()) == [1, 3]


def test_a_head_written_before_priorities_were_counted_has_them_counted() -> None:
    """A head without "prios" (written by an earlier version) gets them counted
    from its lanes, leases and dead jobs, segments included, when an enqueue
    first needs them."""
    s = fresh(lanes_max=3, max_attempts=1, inline_leases_bytes=512, inline_dead_bytes=512)
    s.enqueue([JobSpec("x" * 100, priority=p % 2) for p in range(40)], T0)
    claimed = s.claim("w", 30, 40, T0)
    for job in claimed[30:]:
        s.nack(job["id"], job["lease_token"], 0, "x", T0)
    s.enqueue([JobSpec("p", priority=7)], T0)
    s = reload(s)
    assert s.head["leases"]["segs"] and s.head["dead"]["segs"]  # spilled
    expected = s.head.pop("prios")
    assert expected == {"0": 20, "1": 20, "7": 1}
    old = reload(s)
    assert "prios" not in old.head
    with pytest.raises(InvalidRequest, match="more than 3 distinct priorities"):
        old.enqueue([JobSpec("y", priority=8)], T0)
    old.enqueue([JobSpec("z", priority=7)], T0)
    assert old.head["prios"] == {**expected, "7": 2}


def test_counts_a_broker_of_an_earlier_version_wrote_past_are_counted_again() -> None:
    """A broker that keeps no count keeps the field as it is when it writes the
    head (a rolling upgrade): its acks would leave priorities held for good.
    Counts from before its write are dropped, and counted again."""
    s = fresh(lanes_max=2)
    s.enqueue([JobSpec("a", priority=1), JobSpec("b", priority=2)], T0)
    s = reload(s)
    [b] = s.claim("w", 30, 1, T0)
    head = orjson.loads(orjson.dumps(reload(s).head))
    assert head["prios"] == {"1": 1, "2": 1} and head["leases"]["in"] == [b]
    head["leases"].update({"in": [], "n": 0})  # an earlier version's ack of b
    head["write_id"] = "000000000009-by-an-earlier-version"
    s = TopicState(head, s.view, s.bounds, s.policy)
    assert "prios" not in s.head
    s.begin()  # a batch rolled back to the head as read (a missing segment)
    s.rollback(orjson.loads(orjson.dumps(head | {"prios": {"1": 1, "2": 1}})))
    assert "prios" not in s.head
    s.enqueue([JobSpec("c", priority=3)], T0)
    assert s.head["prios"] == {"1": 1, "3": 1}
    assert reload(s).head["prios"] == {"1": 1, "3": 1}


class KeysRead:
    """A view that keeps the keys read through it; `missing` ones are not at hand."""

    def __init__(self, inner: Any, missing: frozenset[str] = frozenset()) -> None:
        self.inner, self.missing = inner, missing
        self.keys: set[str] = set()

    def segment(self, key: str) -> Any:
        if key in self.missing:
            raise SegmentMissing(key)
        self.keys.add(key)
        return self.inner.segment(key)

    def manifest(self, key: str) -> Any:
        self.keys.add(key)
        return self.inner.manifest(key)


def test_listings_within_a_byte_budget_read_no_segment_past_it() -> None:
    """The status page listed each topic's newest dead jobs and soonest
    claims by count only, reading every segment they are in whatever their
    size: under --cache-mb 16, 10 idle topics of 100 dead 50 KB jobs cost
    5,778 GETs an overview (review of the status page, round 27). With a
    `room`, segments are read only while those read come to less than it,
    and those missing are asked for exactly (no read-ahead), a few a round."""
    s = fresh(inline_dead_bytes=300, inline_leases_bytes=300, inline_pending_bytes=300)
    for i in range(12):  # each dead job spills into a segment of its own
        s.enqueue([JobSpec("x" * 1000, id=f"d{i:02d}", max_attempts=1)], T0)
        [job] = s.claim("w", 30, 1, T0)
        s.nack(job["id"], job["lease_token"], 0, None, T0)
        s = reload(s)
    for i in range(12):  # claimed from pending segments of their own
        s.enqueue([JobSpec("y" * 1000, id=f"c{i:02d}")], T0 + i)
        s = reload(s)
    s.claim("w", 30, 12, T0 + 20)
    s = reload(s, T0 + 20)
    seen = KeysRead(s.view)
    s = TopicState(s.head, seen, s.bounds, s.policy)
    dead, spent = s.dead_listing(12, room=2_500)
    assert ids(dead) == ["d11", "d10", "d09"] and 2_500 <= spent < 4_000
    assert sorted(k.split("seg-")[1][:3] for k in seen.keys) == ["d10", "d11", "d9-"]
    seen.keys.clear()
    claimed, spent = s.claimed_listing(12, room=2_500)
    assert ids(claimed) == ["c00", "c01", "c02"] and 2_500 <= spent < 4_000
    assert len([k for k in seen.keys if "/seg-p" in k]) == 3  # and the leases'
    assert s.dead_listing(12, room=0) == ([], 0) and s.claimed_listing(12, room=0) == ([], 0)
    assert ids(s.dead_listing(12)[0]) == [f"d{i:02d}" for i in range(11, -1, -1)]
    dead_keys = frozenset(keys.segment("t", ref["k"]) for ref in s.head["dead"]["segs"])
    s = TopicState(s.head, KeysRead(s.view, dead_keys), s.bounds, s.policy)
    with pytest.raises(SegmentMissing) as asked:  # 3 segments' room: 3 asked for
        s.dead_listing(12, room=3 * s.bounds.segment_bytes)
    assert asked.value.exact and len(asked.value.also) == 2


def test_no_claimed_jobs_are_listed_when_none_are_asked_for() -> None:
    """claimed_soonest(0) of a topic whose leases spilled raised IndexError
    (the n-th found so far, of none): the status page, its listing of every
    topic together spent, showed such a topic as unreadable."""
    s = fresh(inline_leases_bytes=300)
    s.enqueue([JobSpec(i) for i in range(20)], T0)
    s.claim("w", 30, 20, T0)
    s = reload(s)
    assert s.head["leases"]["segs"]
    assert s.claimed_soonest(0) == [] and len(s.claimed_soonest(3)) == 3


def test_a_pending_job_has_waited_since_it_came_due_not_since_its_enqueue() -> None:
    """The oldest pending age counted from created_at: a job delayed an hour
    (or retried after a delay) read an hour old the moment it came due. It
    counts from run_at, or from the enqueue if that is later (a run_at in
    the past)."""
    s = fresh()
    s.enqueue([JobSpec("later", delay=3600)], T0)
    assert s.oldest_due_since(T0 + 3599, 256) is None
    assert s.oldest_due_since(T0 + 3600, 256) == T0 + 3600
    s.enqueue([JobSpec("long due", run_at=T0 - 60)], T0 + 10)
    assert s.oldest_due_since(T0 + 3600, 256) == T0 + 10
    [job] = s.claim("w", 30, 1, T0 + 3600)
    s.nack(job["id"], job["lease_token"], 120, None, T0 + 3600)  # retried in 2 minutes
    assert s.oldest_due_since(T0 + 3600, 256) == T0 + 3600  # "later"
    [job] = s.claim("w", 30, 1, T0 + 3600)
    assert job["payload"] == "later"
    assert s.oldest_due_since(T0 + 3720, 256) == T0 + 3720


def test_the_newest_dead_jobs_and_a_page_of_them_read_only_their_segments() -> None:
    """The status page's newest dead jobs read every dead segment (10,000 dead
    jobs: all of them, each refresh). Pages of dead jobs skip what comes
    before them by the refs' live counts."""
    s = fresh(inline_dead_bytes=300, loose_max=2, manifests_max=3, max_attempts=1)
    for i in range(200):
        s.enqueue([JobSpec(i, id=f"d{i:03d}")], T0)
        [job] = s.claim("w", 30, 1, T0)
        s.nack(job["id"], job["lease_token"], 0, None, T0)
        if i % 10 == 9:
            s = reload(s)
    s.purge(["d005", "d150"], T0)  # holes, loose and manifested
    s = reload(s)
    assert s.head["dead"]["mans"] and len(s.head["dead"]["segs"]) >= 1
    everything = [j["id"] for j in s.dead_jobs()]
    assert len(everything) == 198
    counting = CountingView(s.view)
    s = TopicState(s.head, counting, s.bounds, s.policy)
    assert [j["id"] for j in s.dead_newest(3)] == everything[-3:][::-1]
    assert counting.reads <= 2
    counting.reads = 0
    assert [j["id"] for j in s.dead_jobs(100, 20)] == everything[100:120]
    assert counting.reads <= 4
    assert [j["id"] for j in s.dead_jobs(190, 50)] == everything[190:]
    assert s.dead_jobs(198, 5) == [] and s.dead_newest(0) == []


@pytest.mark.parametrize("big", [False, True], ids=["small", "big"])
@pytest.mark.parametrize("seed", range(12))
def test_merged_runs_keep_the_claim_order_and_every_job(seed: int, big: bool) -> None:
    """Runs of one lane merge a part a seal (tiny bounds: merges start and go
    on over many seals), while jobs come with random delays, some are claimed
    and some cancelled, and the head is read back now and then: each claim
    takes the earliest due job, and every job comes out exactly once, as it
    went in. With `big`, some jobs are larger than merge_bytes: merges move
    their segments whole, or leave their runs."""
    rng = random.Random(seed)
    payloads: dict[str, object] = {}
    s = fresh(inline_pending_bytes=400, loose_max=2, manifests_max=2, runs_max=2, merge_bytes=900)
    now, n = T0, 0
    live: dict[str, tuple[float, int]] = {}  # id -> (run_at, seq) of jobs not yet out
    merged = 0
    for writes in range(1, 301):
        op = rng.random()
        if op < 0.5:
            delays = [rng.choice([0, rng.uniform(0, 50)]) for _ in range(rng.randint(1, 6))]
            specs = [
                JobSpec(
                    {"big": f"{n + i}" * 1000} if big and rng.random() < 0.3 else n + i,
                    id=f"j{n + i}",
                    delay=d,
                )
                for i, d in enumerate(delays)
            ]
            payloads.update((spec.id or "", spec.payload) for spec in specs)
            s.enqueue(specs, now)
            for spec in specs:
                job = s.find(spec.id or "")
                assert job is not None
                live[spec.id or ""] = (job[1]["run_at"], job[1]["seq"])
            n += len(specs)
        elif op < 0.75:
            for job in s.claim("w", 1e6, rng.randint(1, 4), now):
                key = live.pop(job["id"])
                due = [k for k in live.values() if k[0] <= now]
                assert not due or key <= min(due), "a later job was claimed first"
                assert job["payload"] == payloads[job["id"]]
        elif op < 0.8 and live:
            victim = rng.choice(sorted(live))
            if s.cancel([victim], now)["cancelled"]:
                del live[victim]
        else:
            now += rng.uniform(0, 5)
        merged += any("merge" in r for lane in s.head["lanes"].values() for r in lane["runs"])
        if rng.random() < 0.2:
            s = reread(s, now, writes)
        else:
            seal(s, f"{writes:012d}", now)
    assert merged  # merges were under way
    now += 100
    while jobs := s.claim("w", 1e6, 7, now):
        for job in jobs:
            key = live.pop(job["id"])
            assert not live or key <= min(live.values())
            assert job["payload"] == payloads[job["id"]]
    assert live == {}


def test_a_run_written_past_by_a_broker_that_knows_no_merges_is_merged_into_no_more() -> None:
    """A broker of an earlier version keeps a run's "merge" mark as it is and
    may append a spill to the run merged into: later parts of the merge would
    have gone after jobs later than theirs. They go to a new run instead."""
    s = fresh(inline_pending_bytes=300, runs_max=2, merge_bytes=200)
    rng = random.Random(3)
    for i in range(60):
        s.enqueue([JobSpec(i, id=f"j{i}", delay=rng.uniform(0, 100))], T0)
        seal(s, f"{i:012d}", T0)
        runs = s.head["lanes"]["0"]["runs"]
        if any(r.get("merge") == "from" for r in runs) and any(
            r.get("merge") == "into" for r in runs
        ):
            break
    else:
        pytest.fail("no merge under way")
    [into] = [r for r in runs if r.get("merge") == "into"]
    into["last"] = [T0 + 10**6, 0]  # as that broker's spill of a job due later leaves it
    seal(s, "past", T0)
    assert "merge" not in into
    assert [r for r in s.head["lanes"]["0"]["runs"] if r.get("merge") == "into"] != []
    claimed = [j for j in s.claim("w", 30, 100, T0 + 200)]
    assert len(claimed) == i + 1
    assert [(j["run_at"], j["seq"]) for j in claimed] == sorted(
        (j["run_at"], j["seq"]) for j in claimed
    )


def test_a_nack_answers_the_status_its_lookup_and_the_counts_give() -> None:
    """A delay below a float's resolution at `now` (about 2.4e-7 s near today's
    Unix time) is no delay: the job is pending, and the nack said delayed
    (round 23's review)."""
    now = 1_700_000_000.0
    s = fresh()
    s.enqueue([JobSpec(1, id="a")], now)
    [job] = s.claim("w", 30, 1, now)
    answer = s.nack("a", job["lease_token"], 1e-9, None, now)
    counts = s.counts(now)
    assert (counts["pending"], counts["delayed"], answer["status"]) == (1, 0, "pending")


def test_a_reaped_job_is_due_again_from_the_earliest_the_stores_time_may_be() -> None:
    """reap() puts an expired job back due at `now - behind` (the earliest
    the store's time may be), so that a broker whose estimate of the store's
    clock is behind this one's claims it at once rather than seeing it delayed
    for up to twice the clock error."""
    s = fresh()
    s.enqueue([JobSpec(1, id="j")], T0)
    [claimed] = s.claim("w1", 10, 1, T0)
    assert claimed["lease_expires_at"] == T0 + 10
    assert s.reap(T0 + 20, behind=5) == {"pending": 1, "dead": 0}
    # Another broker, its estimate 5 s behind (the store's earliest time): due now.
    [again] = s.claim("w2", 10, 1, T0 + 15)
    assert again["id"] == "j" and again["attempts"] == 2
