"""Property-based tests of the topic state machine: any sequence of operations
keeps the invariants (one state per job, stale tokens never commit, counters
add up, retention and the head stay bounded), across spills and re-reads; and
so do the operator's controls: cancellation, limits (a claim never takes the
claimed set past max_claimed, nor more than the rate's tokens) and schedules
(each slot fired at most once, never before it came)."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from simplequeue import keys
from simplequeue.api import FollowUpSpec, JobSpec, ScheduleRequest, SettingsRequest
from simplequeue.errors import InvalidRequest, JobNotFound, LeaseLost
from simplequeue.state import (
    IdFilter,
    Manifest,
    Segment,
    SegmentMissing,
    TopicState,
    decode_head,
)
from simplequeue.state.layout import job_key
from simplequeue.state.slots import latest_at
from tests.helpers.states import WRITER, View, assert_held_as_written, fresh

FORMAT_1 = Path(__file__).parent / "data" / "format1-store"

T = TypeVar("T")


def applied_forgetting(
    state: TopicState, view: Forgetful, seen: dict[str, Any], mutation: Callable[[TopicState], T]
) -> T:
    """Apply a mutation as the committer does: the view forgets objects now and
    then (as a cache under its budget), and a mutation that finds one missing
    (or several) is rolled back to the head it began from and applied again."""
    began = orjson.dumps(state.head)
    seen.clear()  # a new batch: what the last one read may be gone
    view.forgetting = True
    try:
        for _ in range(10_000):
            state.begin()
            try:
                return mutation(state)
            except SegmentMissing as miss:
                view.granted.update((miss.key, *miss.also))
                state.rollback(orjson.loads(began))
    finally:
        view.forgetting = False
    raise AssertionError("no progress")


class Forgetful:
    """A view that, while `forgetting`, answers SegmentMissing for every third
    object it is asked for and has not granted since the last seal: a cache under
    its byte budget. (The test's own checks read without it.)"""

    def __init__(self, inner: View) -> None:
        self.inner = inner
        self.granted: set[str] = set()
        self.asked = 0
        self.forgetting = False

    def _check(self, key: str) -> None:
        if self.forgetting and key not in self.granted:
            self.asked += 1
            if self.asked % 3 == 0:
                raise SegmentMissing(key)
            self.granted.add(key)

    def segment(self, key: str) -> Segment:
        self._check(key)
        return self.inner.segment(key)

    def manifest(self, key: str) -> Manifest:
        self._check(key)
        return self.inner.manifest(key)

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)


IDS = st.sampled_from([f"j{i}" for i in range(12)])


BIG_PAD = "x" * 3200  # a payload larger than the machine's merge_bytes


class TopicMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Tiny bounds, so that a few steps spill every chain, give them
        # manifests, rewrite those for their holes, compact leases, merge runs.
        self.state: TopicState = fresh(
            inline_pending_bytes=600,
            inline_leases_bytes=500,
            inline_records_bytes=400,
            inline_dead_bytes=400,
            inline_outbox_bytes=300,
            loose_max=2,
            manifests_max=2,
            manifest_bytes=4000,
            holes_max=3,
            runs_max=2,
            merge_bytes=3000,
            retention=50,
            dead_limit=4,
            max_attempts=3,
        )
        self.policy = self.state.policy
        self.view = Forgetful(self.state.view)
        self.seen: dict[str, Any] = {}  # what a batch read, kept as the committer does
        # One filter across the states, as the committer keeps one per topic;
        # a small floor, so that it is also rebuilt now and then.
        self.ids = IdFilter(stale_floor=16)
        self.state = TopicState(
            self.state.head, self.view, self.state.bounds, self.policy, self.seen, self.ids
        )
        self.now = 1000.0
        self.sealed_at = self.now
        self.writes = 0
        self.enqueued = 0
        self.completed = 0
        self.tokens: dict[str, str] = {}  # job id -> token of its current claim
        self.recorded: list[str] = []  # follow-ups in the outbox, in order
        self.stale: list[tuple[str, str]] = []  # (job id, token) no longer valid
        self.cancelled = 0
        self.fired: set[str] = set()  # ids of the jobs schedules enqueued
        self.written: dict[str, bytes] = {}  # every object a seal wrote, as bytes

    @initialize(from_format_1=st.booleans())
    def start(self, from_format_1: bool) -> None:
        """Half the runs start from a store written by the format-1 engine
        (tests/data/format1-store): its head is upgraded when read, and every
        rule and invariant then holds on it, across spills and re-reads."""
        if not from_format_1:
            return
        for path in sorted((FORMAT_1 / "topics" / "orders").iterdir()):
            self.view.put(f"topics/orders/{path.name}", path.read_bytes())
        head = decode_head(
            "orders", keys.head("orders"), (FORMAT_1 / "topics/orders.json").read_bytes()
        )
        # Its 18 dead jobs are within a dead limit that fits them.
        self.policy = dataclasses.replace(self.policy, dead_limit=30)
        self.state = TopicState(
            head, self.view, self.state.bounds, self.policy, self.seen, self.ids
        )
        self.now = self.sealed_at = 1_900_000_050.0
        self.enqueued, self.completed = 61, 26
        self.tokens = {r["id"]: r["lease_token"] for r in head["leases"]["in"]}

    # --- operations ----------------------------------------------------------

    @rule(
        job_id=st.one_of(st.none(), IDS),
        priority=st.integers(-2, 2),
        delay=st.sampled_from([0, 0, 5, 30, 17, 2]),  # runs that interleave, merged
        # Larger than merge_bytes: a merge moves its segment whole, if it can.
        big=st.sampled_from([False, False, False, True]),
    )
    def enqueue(self, job_id: str | None, priority: int, delay: int, big: bool) -> None:
        payload: dict[str, Any] = {"p": priority}
        if big:
            payload["big"] = BIG_PAD
        spec = JobSpec(payload, id=job_id, priority=priority, delay=delay)
        [answer] = self.apply(lambda s: s.enqueue([spec], self.now))
        if not answer["duplicate"]:
            self.enqueued += 1

    @rule(count=st.integers(1, 4))
    def claim(self, count: int) -> None:
        before = self.state.counts(self.now)
        allowed = self.state.claimable(self.now)
        jobs = self.apply(lambda s: s.claim("w", 10, count, self.now))
        assert len(jobs) == min(count, before["pending"], allowed)
        limit = self.state.settings().get("max_claimed")
        if jobs and limit is not None:
            assert self.state.counts(self.now)["claimed"] <= limit
        priorities = [j["priority"] for j in jobs]
        assert priorities == sorted(priorities, reverse=True)
        for job in jobs:
            assert job["run_at"] <= self.now
            if isinstance(job["payload"], dict):  # not a follow-up's
                assert job["payload"].get("big", BIG_PAD) == BIG_PAD
            assert job["id"] not in self.tokens
            self.tokens[job["id"]] = job["lease_token"]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), how=st.sampled_from(["ack", "ack+follow", "nack", "heartbeat"]))
    def settle(self, data: st.DataObject, how: str) -> None:
        job_id = data.draw(st.sampled_from(list(self.tokens)))  # insertion order: reproducible
        token = self.tokens[job_id]
        if how == "ack":
            self.apply(lambda s: s.ack(job_id, token, {"ok": job_id}, self.now))
            self.completed += 1
        elif how == "ack+follow":
            # One follow-up for another topic (into the outbox), one for this
            # one (enqueued with the ack, unless its derived id is taken).
            follow = [FollowUpSpec({"after": job_id}, topic="elsewhere"), FollowUpSpec(1)]
            taken = self.state.exists(f"{job_id}:1")  # then it is a duplicate
            answer = self.apply(lambda s: s.ack(job_id, token, None, self.now, follow))
            assert answer["enqueued"] == [f"{job_id}:0", f"{job_id}:1"]  # as given
            self.completed += 1
            self.enqueued += not taken
            self.recorded.append(f"{job_id}:0")
        elif how == "nack":
            delay = data.draw(st.sampled_from([0, 3]))
            self.apply(lambda s: s.nack(job_id, token, delay, "err", self.now))
        else:
            self.apply(lambda s: s.heartbeat(job_id, token, 10, self.now))
            return
        del self.tokens[job_id]
        self.stale.append((job_id, token))

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def stale_token_never_commits(self, data: st.DataObject) -> None:
        job_id, token = data.draw(st.sampled_from(self.stale))
        before = orjson.dumps(self.state.head)
        with pytest.raises((LeaseLost, JobNotFound)):
            self.state.ack(job_id, token, "late", self.now)
        assert orjson.dumps(self.state.head) == before

    @rule(seconds=st.sampled_from([0.25, 1, 4, 11, 60]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        # Looking changes nothing a reap then misses (the bounds it reads by).
        expired = self.apply(lambda s: s.expired(self.now))
        last = {n: s.get("last_slot") for n, s in self.state.schedules().items()}
        tended = self.apply(lambda s: s.tend(self.now))  # reaps, and fires schedules
        while self.state.expired(self.now):
            # A reap takes a bounded part: the rest is due now, and reaped next.
            due = self.state.next_due()
            assert due is not None and due <= self.now
            part = self.apply(lambda s: s.reap(self.now))
            assert part["pending"] + part["dead"] > 0
            tended = {k: v + part.get(k, 0) for k, v in tended.items()}
        claimed = self.claimed()
        for job_id in [j for j in self.tokens if j not in claimed]:
            self.stale.append((job_id, self.tokens.pop(job_id)))
        assert (tended["pending"] + tended["dead"] > 0) == expired
        assert not self.state.expired(self.now)
        self.enqueued += tended["fired"]
        fired = 0
        for name, schedule in self.state.schedules().items():
            assert schedule["next_at"] > self.now  # nothing due is left unfired
            slot = schedule.get("last_slot")
            if slot != last.get(name):  # it fired: a slot that came, never fired before
                # ... the latest that came: one catch-up job, however many were missed
                assert slot is not None and slot == latest_at(schedule, self.now)
                assert f"{name}@{slot}" not in self.fired
                self.fired.add(f"{name}@{slot}")
                fired += 1
        assert tended["fired"] == fired

    @rule(job_ids=st.lists(IDS, min_size=1, max_size=3))
    def cancel(self, job_ids: list[str]) -> None:
        live = {j["id"] for j in self.state.pending_jobs()} | self.claimed()
        answer = self.apply(lambda s: s.cancel(job_ids, self.now))
        assert answer["cancelled"] == [j for j in dict.fromkeys(job_ids) if j in live]
        for job_id in answer["cancelled"]:
            assert self.state.find(job_id)[0] == "cancelled"  # type: ignore[index]
            if job_id in self.tokens:
                self.stale.append((job_id, self.tokens.pop(job_id)))
        self.cancelled += len(answer["cancelled"])

    @rule(
        max_claimed=st.sampled_from([None, None, 0, 1, 3]),
        rate=st.sampled_from([None, None, 0.5, 2.0]),
        burst=st.sampled_from([None, 1, 3]),
    )
    def settings(self, max_claimed: int | None, rate: float | None, burst: int | None) -> None:
        changes = SettingsRequest(max_claimed=max_claimed, rate=rate, burst=burst)
        if burst is not None and rate is None:  # a burst is a rate's: refused alone
            before = orjson.dumps(self.state.head)
            with pytest.raises(InvalidRequest, match="burst"):
                self.state.put_settings(changes, self.now)
            assert orjson.dumps(self.state.head) == before
            return
        self.apply(lambda s: s.put_settings(changes, self.now))

    @rule(
        name=st.sampled_from(["s1", "s2"]),
        every=st.sampled_from([1, 7, 30]),
        priority=st.integers(-2, 2),
        delete=st.booleans(),
    )
    def schedule(self, name: str, every: int, priority: int, delete: bool) -> None:
        if delete and name in self.state.schedules():
            self.apply(lambda s: s.delete_schedule(name))
            return
        spec = ScheduleRequest({"s": name}, every=every, priority=priority)
        made = self.apply(lambda s: s.put_schedule(name, spec, self.now))
        assert made["next_at"] > self.now and made["next_at"] % every == 0

    @precondition(lambda self: self.state.outbox_size())
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        """The owner delivered some of the outbox's front (or all of it)."""
        front = [(f["topic"], f["id"]) for f in self.apply(lambda s: s.outbox_front(5))]
        n = data.draw(st.integers(1, len(front)))
        taken = self.apply(lambda s: s.outbox_delivered(front[:n]))
        assert taken == n
        assert [i for _, i in front[:n]] == self.recorded[:n]  # in the order recorded
        del self.recorded[:n]

    @rule(all_=st.booleans(), data=st.data())
    def requeue_or_purge(self, all_: bool, data: st.DataObject) -> None:
        dead = [j["id"] for j in self.state.dead_jobs()]
        ids = (
            None if all_ else data.draw(st.lists(st.sampled_from(dead), max_size=2)) if dead else []
        )
        if data.draw(st.booleans()):
            self.apply(lambda s: s.requeue(ids, self.now))
        else:
            self.apply(lambda s: s.purge(ids, self.now))

    def _seal(self) -> bytes:
        self.writes += 1
        self.sealed_at = self.now
        write_id = f"{self.writes:012d}"
        sealed = self.apply(lambda s: s.seal(WRITER, write_id, self.now))
        # With these bounds a head as written holds a few KB, whatever the history.
        assert len(sealed.head) < 12_000
        for key, data in sealed.new_objects.items():
            # The objects as the seal made them, as the committer keeps them
            # (a spill's segment holds the very items the head let go of).
            self.view.inner.add(sealed.decoded[key])
            self.written[key] = data
        self.view.granted.clear()  # a cache drops things in time
        return sealed.head

    @rule()
    def a_new_filter(self) -> None:
        """Go on with an empty id filter, as a broker that just took the topic
        over does: it covers the manifests and segments already there."""
        self.ids = IdFilter(stale_floor=16)
        self.state.ids = self.ids

    @rule()
    def write_and_reread(self) -> None:
        """Seal as a commit would, then continue from the parsed bytes."""
        topic = self.state.topic
        head = decode_head(topic, keys.head(topic), self._seal())
        self.state = TopicState(
            head, self.view, self.state.bounds, self.policy, self.seen, self.ids
        )

    @rule()
    def write_and_keep_going(self) -> None:
        """Seal and go on with the same object, as the committer does after a
        write lands (its caches must stay right across spills)."""
        self._seal()

    def apply(self, mutation: Callable[[TopicState], T]) -> T:
        return applied_forgetting(self.state, self.view, self.seen, mutation)

    def claimed(self) -> set[str]:
        return {j["id"] for j in self.state.claimed_soonest(10**6)}

    # --- invariants ----------------------------------------------------------

    @invariant()
    def every_object_held_is_what_was_written(self) -> None:
        # Nothing that came after a seal changed what it made (repr: types too).
        for key, data in self.written.items():
            assert_held_as_written(self.view.inner.objects[key], key, data)

    @invariant()
    def each_job_is_in_exactly_one_state(self) -> None:
        pending = [j["id"] for j in self.state.pending_jobs()]
        claimed = list(self.claimed())
        dead = [j["id"] for j in self.state.dead_jobs()]
        everything = pending + claimed + dead
        assert len(everything) == len(set(everything)), "a job is in two places"
        assert set(claimed) == set(self.tokens)

    @invariant()
    def the_outbox_holds_what_acks_recorded_in_order(self) -> None:
        held = [f["id"] for f in self.state.outbox_front(10**6)]
        assert held == self.recorded
        assert self.state.outbox_size() == len(held)

    @invariant()
    def first_is_the_first_of_places(self) -> None:
        # first() finds the front itself (no copy of a manifest's refs): it must
        # be what a walk over every place finds first.
        s = self.state
        chains = [s._chain(run) for lane in s.head["lanes"].values() for run in lane["runs"]]
        for chain in [*chains, s.leases, s.retained, s.dead, s.outbox]:
            assert chain.first() == next(chain.places(), None)

    @invariant()
    def runs_stay_sorted_through_merges(self) -> None:
        # A merge moves a part of its runs' fronts each seal: every run stays
        # sorted, within its `last`, and the run a merge goes into holds no
        # job later than the front of any run merging into it.
        for lane in self.state.head["lanes"].values():
            fronts: dict[int, list[tuple[float, int]]] = {}
            into_last: dict[int, tuple[float, int]] = {}
            for run in lane["runs"]:
                found = [job_key(p.item) for p in self.state._chain(run).places()]
                assert found == sorted(found)
                if found and "last" in run:
                    assert found[-1] <= tuple(run["last"])
                group = run.get("group", 0)
                if found and run.get("merge") == "from":
                    fronts.setdefault(group, []).append(found[0])
                if found and run.get("merge") == "into":
                    assert group not in into_last, "two runs merged into"
                    into_last[group] = found[-1]
            for group, last in into_last.items():
                assert last <= min(fronts.get(group, [last]))

    @invariant()
    def a_segment_is_named_by_one_run(self) -> None:
        # Merges move a large job's segment whole, by reference: it leaves its
        # run as it joins the other (refs are found by segment id in a chain,
        # and a sweep keeps what any chain names).
        named: list[str] = []
        for lane in self.state.head["lanes"].values():
            for run in lane["runs"]:
                named += [ref["k"] for ref, _, _ in self.state._chain(run).units()]
        assert len(named) == len(set(named))

    @invariant()
    def a_window_is_a_slice_of_places(self) -> None:
        # window() skips by live counts what places() walks: they must agree.
        s = self.state
        for chain in [s.retained, s.dead]:
            every = list(chain.places())
            n = len(every)
            for offset in {0, 1, 2, n // 3, n // 2, n - 2, n - 1, n, n + 1}:
                for limit in (1, 3, n + 1):
                    assert chain.window(offset, limit) == every[offset : offset + limit]
            front = chain.window(0, n + 1, segments=1)  # one segment's, or the inline ones
            assert front == every[: len(front)] and bool(front) == bool(every)

    @invariant()
    def exists_agrees_with_find(self) -> None:
        # exists() is the indexed duplicate check; find() scans: they must agree.
        for i in range(12):
            job_id = f"j{i}"
            assert self.state.exists(job_id) == (self.state.find(job_id) is not None), job_id

    @invariant()
    def priorities_held_are_counted(self) -> None:
        # What lanes_max bounds: every job held (pending, delayed, claimed,
        # dead), by priority; a head from before they were kept has none yet.
        prios = self.state.head.get("prios")
        if prios is None:
            return
        s = self.state
        held = [*s.pending_jobs(), *s.claimed_soonest(10**6), *s.dead_jobs()]
        assert prios == dict(Counter(str(j["priority"]) for j in held))
        assert set(s.head["lanes"]) <= set(prios)

    @invariant()
    def counters_add_up(self) -> None:
        c = self.state.counts(self.now)
        live = c["pending"] + c["delayed"] + c["claimed"]
        # No status counted twice.
        assert c["total"] == live + c["completed"] + c["dead"] + c["cancelled"]
        assert c["enqueued"] == self.enqueued
        assert c["completed"] == self.completed
        assert c["cancelled"] == self.cancelled
        assert c["delayed"] >= 0
        assert c["dead"] <= self.policy.dead_limit
        dropped = self.state.head["counters"]["dead_dropped"]
        purged_or_requeued_or_dead = c["enqueued"] - live - c["completed"] - c["cancelled"]
        assert c["dead"] <= purged_or_requeued_or_dead + dropped

    @invariant()
    def next_due_covers_every_slot_and_lease(self) -> None:
        due = self.state.next_due()
        for schedule in self.state.schedules().values():
            assert due is not None and due <= schedule["next_at"]
        expiry = self.state.next_expiry()
        assert expiry is None or (due is not None and due <= expiry)

    @invariant()
    def retained_records_are_within_retention(self) -> None:
        # Records expire when a batch is sealed: whole segments once their newest
        # record is older than retention, inline ones once no segment is left.
        horizon = self.sealed_at - self.policy.retention
        retained = self.state.head["retained"]
        for ref in retained["segs"] + retained["mans"]:
            assert ref["hi"] >= horizon
        if not retained["segs"] and not retained["mans"]:
            assert all(r["finished_at"] >= horizon for r in retained["in"])

    @invariant()
    def every_chain_counts_what_it_holds(self) -> None:
        """The live counts kept in the head (which status answers from) are what
        reading every object finds."""
        s = self.state
        chains = [s.leases, s.retained, s.dead]
        for lane in s.head["lanes"].values():
            chains += [s._chain(run) for run in lane["runs"]]
        for chain in chains:
            assert chain.count == len(list(chain.places())), chain.d
            for ref in chain.d["segs"]:
                live = ref["n"] - len(set(ref.get("holes", ())))
                live -= chain.d["pos"] if ref is chain.d["segs"][0] and not chain.d["mans"] else 0
                assert ref["live"] == live or ref is chain.d["segs"][0], (ref, chain.d)


# bin/test --long: four times the examples. The suite's 250 take some 8 s.
LONG = os.environ.get("SIMPLEQUEUE_LONG") == "1"
TopicMachine.TestCase.settings = settings(
    max_examples=1000 if LONG else 250, stateful_step_count=50, deadline=None
)
test_topic_state_machine = TopicMachine.TestCase
