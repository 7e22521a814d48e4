"""SPEC 4.1's bounds on what one head and one batch hold, at the production
Bounds, under workloads an adversarial review of storage engine v2 found
past them. The state machine alone, sealed as the committer seals it."""

from __future__ import annotations

import random

from simplequeue.api import JobSpec
from simplequeue.broker.engine import DEAD_PART
from simplequeue.state import Sealed, TopicState
from simplequeue.state.layout import holes_kept
from tests.helpers.states import WRITER, fresh

HEAD_MAX = 256 * 1024  # SPEC 4.1: the head stays under 256 KB
BATCH_MAX = 256 * 1024  # and a batch writes at most that, plus its own new payloads


class Driver:
    """A TopicState at the production bounds, each batch sealed and its objects
    kept in its view; the largest head and batch written since reset()."""

    def __init__(self, **limits: object) -> None:
        self.s: TopicState = fresh(**limits)
        self.writes = 0
        self.now = 1000.0
        self.reset()

    def reset(self) -> None:
        self.largest_head = self.largest_batch = 0

    def seal(self) -> Sealed:
        self.writes += 1
        sealed = self.s.seal(WRITER, f"{self.writes:012d}", self.now)
        for key, data in sealed.new_objects.items():
            self.s.view.put(key, data)  # type: ignore[attr-defined]
        self.largest_head = max(self.largest_head, len(sealed.head))
        written = len(sealed.head) + sum(len(d) for d in sealed.new_objects.values())
        self.largest_batch = max(self.largest_batch, written)
        return sealed


def test_compacted_leases_go_out_with_the_seal_not_into_the_head() -> None:
    """20,000 claimed jobs acked in random order, 100 a batch. A lease
    manifest half resolved had its live records taken inline after the seal's
    spill step: the head written held them all (461 KB, 1,586 records, after
    9,900 acks)."""
    d = Driver()
    n = 20_000
    for b in range(0, n, 1000):
        d.s.enqueue([JobSpec({"n": i}, id=f"j{i:07d}") for i in range(b, b + 1000)], d.now)
        d.seal()
    claimed: list[tuple[str, str]] = []
    while jobs := d.s.claim("w", 10**6, 100, d.now):
        claimed += [(j["id"], j["lease_token"]) for j in jobs]
        d.seal()
    assert len(claimed) == n
    d.reset()
    random.Random(1).shuffle(claimed)
    for i in range(0, n, 100):
        for job_id, token in claimed[i : i + 100]:
            d.s.ack(job_id, token, None, d.now)
        d.seal()
        assert d.largest_head < 64 * 1024, (i, len(d.s.head["leases"]["in"]))
    assert d.s.counts(d.now)["completed"] == n


def test_holes_kept_in_the_head_are_bounded_by_their_number() -> None:
    """holes_max (512) bounded the segments with holes, not the holes: 30,000
    pending jobs, all but one in 500 cancelled, kept 15,961 holes in the head
    (120 KB; 100,000 jobs: 394 KB). Manifests now take them past 512, a few a
    seal."""
    d = Driver()
    n = 30_000
    for b in range(0, n, 1000):
        d.s.enqueue([JobSpec(i, id=f"j{i:06d}") for i in range(b, b + 1000)], d.now)
        d.seal()
    d.reset()
    victims = [f"j{i:06d}" for i in range(n) if i % 500 != 7]
    for b in range(0, len(victims), 2000):
        some = victims[b : b + 2000]
        assert d.s.cancel(some, d.now)["cancelled"] == some
        d.seal()
        [run] = d.s.head["lanes"]["0"]["runs"]
        assert holes_kept(run) <= d.s.bounds.holes_max
    assert d.largest_head < 64 * 1024
    assert [j["id"] for j in d.s.claim("w", 30, 100, d.now)] == [
        f"j{i:06d}" for i in range(n) if i % 500 == 7
    ]


def test_every_dead_job_requeued_in_parts_of_bounded_batches() -> None:
    """requeue(None) took every dead job in one batch: 3,000 dead jobs of 1 KB
    made one write of 3.4 MB (10,000, the default --dead-limit: 11 MB). The
    engine's parts (DEAD_PART: from two segments at most) each stay in bound."""
    d = Driver(max_attempts=1)
    for b in range(0, 3000, 500):
        d.s.enqueue([JobSpec({"pad": "x" * 1000}, id=f"j{i}") for i in range(b, b + 500)], d.now)
        d.seal()
    while jobs := d.s.claim("w", 30, 100, d.now):
        for job in jobs:
            d.s.nack(job["id"], job["lease_token"], 0, "e", d.now)
        d.seal()
    assert d.s.counts(d.now)["dead"] == 3000
    d.reset()
    requeued: list[str] = []
    while part := d.s.requeue(None, d.now, DEAD_PART):
        requeued += part
        d.seal()
    assert sorted(requeued) == sorted(f"j{i}" for i in range(3000))
    assert d.largest_batch <= BATCH_MAX
    assert d.s.counts(d.now)["pending"] == 3000


def _drained_in_order(d: Driver, n: int) -> None:
    d.now += 10**6
    out: list[tuple[float, int]] = []
    while jobs := d.s.claim("w", 30, 500, d.now):
        out += [(j["run_at"], j["seq"]) for j in jobs]
        d.seal()
    assert len(out) == n
    assert out == sorted(out)  # every run stayed sorted through the merges


def test_runs_stay_few_with_random_delays() -> None:
    """Jobs enqueued one at a time with a random delay (up to an hour): each
    spill (24 KB) starts a run. Runs were merged only while two fitted 64 KB:
    5,000 jobs left 114 runs, and claims read every run's front. Runs of like
    sizes are merged now, a part each seal, so a lane keeps about runs_max;
    a seal writes a bounded amount, and on average (SPEC 4.1) at most twice
    its own bytes plus 64 KB."""
    d = Driver()
    rng = random.Random(0)
    own = written = most = 0
    for i in range(5000):
        d.now += 0.01
        spec = JobSpec({"pad": "x" * 1000}, id=f"j{i}", delay=rng.uniform(0, 3600))
        d.s.enqueue([spec], d.now)
        own += 1100
        written += sum(len(v) for v in d.seal().new_objects.values())
        most = max(most, len(d.s.head["lanes"]["0"]["runs"]))
    assert most <= 2 * d.s.bounds.runs_max, f"{most} runs in one lane"
    assert d.largest_batch <= BATCH_MAX
    assert written / 5000 <= 2 * own / 5000 + 64 * 1024
    _drained_in_order(d, 5000)


def test_runs_stay_few_when_batches_come_due_in_reverse() -> None:
    """60,000 jobs in batches of 40, each batch due before the one before it:
    every spill was a run of its own (1,500 runs, a 280 KB head)."""
    d = Driver()
    for b in range(1500):
        d.now += 0.01
        d.s.enqueue(
            [JobSpec({"n": i}, id=f"b{b}-{i}", delay=3600 - 2 * b + i / 1000) for i in range(40)],
            d.now,
        )
        d.seal()
        assert len(d.s.head["lanes"]["0"]["runs"]) <= 4 * d.s.bounds.runs_max
    assert d.largest_head < 64 * 1024
    assert d.largest_batch <= BATCH_MAX
    _drained_in_order(d, 60_000)
