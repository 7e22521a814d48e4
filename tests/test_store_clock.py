"""StoreClock: the store's time estimated from stamps the store put on our requests.

Every case drives the clock with fake monotonic and wall clocks, so the numbers
are exact and nothing sleeps.
"""

from __future__ import annotations

import math
import random
import statistics
import time

import pytest

from simplequeue.objstore import clock as clock_module
from simplequeue.objstore.clock import CONFIRM_JUMP, CONFIRM_SPAN, StoreClock


class FakeTime:
    """A local monotonic clock that only moves when told, and a wall clock."""

    def __init__(self, mono: float = 100.0, wall: float = 1_700_000_000.0) -> None:
        self.mono, self.wall = mono, wall

    def clock(self, **kwargs: float) -> StoreClock:
        return StoreClock(monotonic=lambda: self.mono, wall=lambda: self.wall, **kwargs)


def request(
    clock: StoreClock, t: FakeTime, store_offset: float, rtt: float, resolution: float, at: float
) -> None:
    """One request sent at local `t.mono`, answered `rtt` later; the store stamped
    it at the fraction `at` of the way, truncated to `resolution` (as a Date
    header truncates to the second)."""
    sent = t.mono
    served = sent + at * rtt + store_offset
    stamp = math.floor(served / resolution) * resolution
    t.mono += rtt
    clock.observe(sent, t.mono, stamp, resolution)


def test_without_samples_now_is_the_local_wall_clock() -> None:
    t = FakeTime()
    clock = t.clock()
    assert clock.now() == t.wall
    assert clock.uncertainty is None
    assert clock.samples == 0


def test_one_sample_bounds_the_offset_by_its_round_trip_and_resolution() -> None:
    t = FakeTime(mono=100.0)
    clock = t.clock()
    clock.observe(sent=100.0, received=100.2, stamp=5000.0, resolution=1.0)
    # offset in [5000 - 100.2, 5001 - 100.0] = [4899.8, 4901.0] when the store
    # stamped it; by its answer, widened at SLEW for the round trip: 0.02 a side
    assert clock.uncertainty == pytest.approx(0.62)
    t.mono = 110.0
    assert clock.now() == pytest.approx(110.0 + 4900.4)
    assert clock.samples == 1


def test_samples_are_intersected_where_two_agree() -> None:
    """No bound of the estimate rests on one sample alone (it may be a wrong
    answer): each is the second-tightest sample's, widened at DRIFT, or the
    tightest's widened at SLEW, whichever is wider."""
    t = FakeTime(mono=100.0)
    clock = t.clock()
    clock.observe(sent=100.0, received=100.2, stamp=5000.0, resolution=1.0)  # [4899.8, 4901.0]
    clock.observe(sent=101.5, received=101.6, stamp=5001.0, resolution=1.0)  # [4899.4, 4900.5]
    # Each bound is one sample's: the other's (widened at DRIFT since it was
    # sent), [4899.3998, 4901.0032], holds.
    assert clock.uncertainty == pytest.approx(0.8017)
    clock.observe(sent=101.5, received=101.7, stamp=5001.5, resolution=0.5)  # [4899.8, 4900.5]
    # Both bounds said twice, the tightest widened at SLEW since it was sent
    # (0.2 s): [4899.78, 4900.52].
    assert clock.uncertainty == pytest.approx(0.37)
    t.mono = 102.0  # widened at SLEW for 0.3 s more: [4899.75, 4900.55]
    assert clock.now() == pytest.approx(102.0 + 4900.15)
    assert clock.uncertainty == pytest.approx(0.4)
    assert clock.samples == 3


@pytest.mark.parametrize(("every", "within"), [(1.0, 0.6), (0.1, 0.2), (0.02, 0.15)])
def test_one_second_stamps_converge_to_under_a_second(every: float, within: float) -> None:
    """Stamps of whole seconds (S3's Dates): the samples that narrow the
    estimate most are those stamped just after a second began (its low
    bound) or just before it ended (its high one), and they lose their edge
    at SLEW a second as they age. Half-widths measured over 5 seeds: median
    0.33 s at a request a second (at most 0.51), 0.12 s at ten (0.19), 0.07
    s at fifty (0.12)."""
    rng = random.Random(7)
    t = FakeTime(mono=100.0)
    clock = t.clock()
    offset = 1_700_000_123.456 - 100.0  # the store is ahead of local monotonic by this
    for _ in range(300):
        t.mono += rng.uniform(0.0, 2 * every)  # requests at every phase of the store's second
        request(clock, t, offset, rtt=rng.uniform(0.002, 0.02), resolution=1.0, at=rng.random())
        now = clock.now()
        assert abs(now - (t.mono + offset)) <= clock.error(now)
    assert clock.uncertainty is not None and clock.uncertainty < within


def test_localfs_like_samples_converge_to_their_resolution() -> None:
    rng = random.Random(8)
    t = FakeTime(mono=100.0)
    clock = t.clock()
    offset = 1_700_000_000.0
    for _ in range(20):
        t.mono += rng.uniform(0.0, 0.5)
        request(clock, t, offset, rtt=rng.uniform(0.0001, 0.002), resolution=0.01, at=rng.random())
    assert clock.uncertainty is not None and clock.uncertainty < 0.01
    assert abs(clock.now() - (t.mono + offset)) < 0.01


def test_a_jump_of_the_store_clock_starts_again_from_the_newest_sample() -> None:
    rng = random.Random(9)
    t = FakeTime(mono=100.0)
    clock = t.clock()
    offset = 5000.0
    for _ in range(30):
        t.mono += 1.0
        request(clock, t, offset, rtt=0.01, resolution=1.0, at=rng.random())
    assert clock.samples == 30
    offset += 30.0  # someone set the store's clock forward
    step = CONFIRM_SPAN / (CONFIRM_JUMP - 1)  # answers that many seconds apart
    for _ in range(CONFIRM_JUMP - 1):  # not taken until CONFIRM_JUMP answers say so
        t.mono += step
        request(clock, t, offset, rtt=0.01, resolution=1.0, at=0.5)
        assert clock.samples == 30 and abs(clock.now() - (t.mono + offset - 30.0)) < 1.0
    t.mono += step
    request(clock, t, offset, rtt=0.01, resolution=1.0, at=0.5)
    assert clock.samples == CONFIRM_JUMP
    assert abs(clock.now() - (t.mono + offset)) <= 0.51
    for _ in range(30):
        t.mono += rng.uniform(0.0, 2.0)
        request(clock, t, offset, rtt=0.01, resolution=1.0, at=rng.random())
    assert clock.samples == 30 + CONFIRM_JUMP
    now = clock.now()
    assert abs(now - (t.mono + offset)) <= clock.error(now) < 0.6


def answers(clock: StoreClock, t: FakeTime, n: int, every: float, off: float = 0.0) -> None:
    """`n` answers `every` seconds apart from a store 5000 s ahead (and `off`
    more), each followed by a read of now(), as a broker reads it every batch."""
    for _ in range(n):
        t.mono += every
        request(clock, t, 5000.0 + off, rtt=0.01, resolution=1.0, at=0.5)
        clock.now()


def test_a_burst_of_answers_off_within_one_requests_retries_does_not_move_the_clock() -> None:
    """A load balancer's error pages (retried a few hundred ms apart) agreed
    with each other on a time a day ahead: three of them moved the clock for
    good. A jump must be said over CONFIRM_SPAN seconds (and S3's 5xx are not
    sampled at all)."""
    t = FakeTime(mono=100.0)
    clock = t.clock()
    answers(clock, t, 10, every=1.0)
    answers(clock, t, 6, every=0.3, off=86_400.0)  # one request's retries
    answers(clock, t, 10, every=1.0)
    assert abs(clock.now() - (t.mono + 5000.0)) < 1.0


def test_one_answer_off_after_a_long_quiet_spell_does_not_move_the_clock() -> None:
    """Past the horizon (300 s without a sample) the old samples were skipped
    before any comparison, and one wrong answer won at once."""
    t = FakeTime(mono=100.0)
    clock = t.clock()
    answers(clock, t, 10, every=1.0)
    answers(clock, t, 1, every=600.0, off=86_400.0)
    answers(clock, t, 5, every=1.0)
    assert abs(clock.now() - (t.mono + 5000.0)) < 1.0


@pytest.mark.parametrize("wrong_by", [86_400.0, -3600.0, 2.5])
def test_one_answer_off_among_good_ones_does_not_move_the_clock(wrong_by: float) -> None:
    """One answer stamped a day ahead (a proxy's error page with its own Date,
    one node of a store set apart) won over the 30 before it, and now() never
    goes back: the broker ran a day ahead, and retention dropped finished
    jobs' records (their ids free to be enqueued again) a day early."""
    rng = random.Random(3)
    t = FakeTime(mono=100.0)
    clock = t.clock()
    for n in range(40):
        t.mono += 1.0
        off = wrong_by if n in (20, 30, 31) else 0.0  # one alone, then two in a row
        request(clock, t, 5000.0 + off, rtt=0.01, resolution=1.0, at=rng.random())
        clock.now()  # a broker reads it at every batch: once read, it never goes back
    assert abs(clock.now() - (t.mono + 5000.0)) < 0.5
    assert clock.samples >= 8


def test_samples_that_drift_apart_are_all_kept_and_all_hold() -> None:
    """Local monotonic drifting against the store (0.6 % here): each sample,
    widened at SLEW for its age, still holds the offset, and none is
    dropped; the estimate leans on the newest."""
    t = FakeTime(mono=100.0)
    clock = t.clock()
    clock.observe(sent=100.0, received=100.0, stamp=5000.0, resolution=0.01)  # [4900, 4900.01]
    clock.observe(sent=101.0, received=101.0, stamp=5001.005, resolution=0.01)  # [4900.005, ...]
    clock.observe(sent=102.0, received=102.0, stamp=5002.012, resolution=0.01)  # [4900.012, ...]
    assert clock.samples == 3
    # Low: the tightest (the newest's 4900.012) at SLEW is 4900.012, the
    # second-tightest (4900.005) at DRIFT 4900.003: 4900.003. High: the
    # tightest (the oldest's 4900.01) at SLEW 4900.21, the newest's 4900.022:
    # 4900.022; the second (4900.015) at DRIFT 4900.017: 4900.022.
    assert clock.uncertainty == pytest.approx((4900.022 - 4900.003) / 2)


def test_now_never_goes_backwards() -> None:
    t = FakeTime(mono=100.0)
    clock = t.clock()
    clock.observe(sent=100.0, received=100.0, stamp=5000.0, resolution=1.0)  # mid 4900.5
    clock.observe(sent=100.0, received=100.0, stamp=5000.0, resolution=1.0)  # agreed: no guess
    before = clock.now()
    # The store's clock was set back 10 s: the estimate moves back (once enough
    # answers say so), now() waits for it.
    for i in range(CONFIRM_JUMP):
        at = 100.0 + i * CONFIRM_SPAN / (CONFIRM_JUMP - 1)
        clock.observe(sent=at, received=at, stamp=4990.0 + (at - 100.0), resolution=1.0)
    assert clock.samples == CONFIRM_JUMP
    assert clock.now() == before
    t.mono += 5.0
    assert clock.now() == before
    t.mono += 10.0
    assert clock.now() == pytest.approx(t.mono + 4890.5)
    assert clock.now() > before


def test_one_wrong_first_sample_does_not_hold_now_ahead_for_good() -> None:
    """The first sample had no check: one wrong answer first (a proxy's page a
    day ahead), and later answers, once they agreed enough to move the
    estimate, could not take now() back (it never goes backwards): it stayed
    a day ahead, and retention dropped records early (review finding). Until a
    second sample agrees with it, the first is a guess, as the wall clock is."""
    t = FakeTime(mono=100.0)
    clock = t.clock()
    clock.observe(sent=100.0, received=100.0, stamp=5000.0 + 86_400, resolution=1.0)
    clock.now()  # told once, as a broker does all the time
    for i in range(CONFIRM_JUMP):
        t.mono = at = 101.0 + i * CONFIRM_SPAN / (CONFIRM_JUMP - 1)
        clock.observe(sent=at, received=at, stamp=5000.0 + (at - 100.0), resolution=1.0)
    assert clock.now() == pytest.approx(t.mono + 4900.5)


def test_a_narrowing_interval_does_not_move_now_backwards() -> None:
    t = FakeTime(mono=100.0)
    clock = t.clock()
    clock.observe(sent=100.0, received=100.0, stamp=5000.0, resolution=1.0)  # [4900, 4901]
    first = clock.now()  # 100 + 4900.5
    clock.observe(sent=100.0, received=100.0, stamp=5000.0, resolution=0.1)  # [4900, 4900.1]
    clock.observe(sent=100.0, received=100.0, stamp=5000.0, resolution=0.1)  # said twice
    assert clock.now() == first
    t.mono += 1.0
    assert clock.now() == pytest.approx(101.0 + 4900.05)


def test_the_first_sample_replaces_the_wall_clock_guess_even_behind_it() -> None:
    t = FakeTime(mono=100.0, wall=6000.0)
    clock = t.clock()
    assert clock.now() == 6000.0
    clock.observe(sent=100.0, received=100.0, stamp=5000.0, resolution=1.0)
    assert clock.now() == pytest.approx(5000.5)


def test_the_wall_clock_fallback_is_monotone_too() -> None:
    t = FakeTime(wall=6000.0)
    clock = t.clock()
    assert clock.now() == 6000.0
    t.wall = 5990.0  # NTP stepped the local clock back
    assert clock.now() == 6000.0


def test_the_window_is_bounded_in_count_and_age() -> None:
    t = FakeTime(mono=100.0)
    clock = t.clock(window=8, horizon=60.0)
    for _ in range(20):
        t.mono += 1.0
        request(clock, t, 5000.0, rtt=0.0, resolution=1.0, at=0.0)
    assert clock.samples == 8
    t.mono += 100.0  # everything before is now older than the horizon
    request(clock, t, 5000.0, rtt=0.0, resolution=1.0, at=0.0)
    assert clock.samples == 2  # but the newest of them: the answer does not stand alone


def test_a_sample_received_before_it_was_sent_is_refused() -> None:
    clock = FakeTime().clock()
    with pytest.raises(ValueError):
        clock.observe(sent=2.0, received=1.0, stamp=5000.0, resolution=1.0)
    with pytest.raises(ValueError):
        clock.observe(sent=1.0, received=2.0, stamp=5000.0, resolution=-1.0)
    assert clock.samples == 0


def test_samples_closer_than_the_spacing_are_kept_only_if_they_say_something_new() -> None:
    t = FakeTime(mono=100.0)
    clock = t.clock(spacing=0.02)
    clock.observe(sent=100.0, received=100.001, stamp=5000.0, resolution=0.01)
    assert clock.uncertainty == pytest.approx(0.0056)  # [4899.999, 4900.01] + 0.1 ms a side
    for i in range(1, 16):  # a write a millisecond, each holding that interval
        received = 100.001 + i / 1000
        clock.observe(sent=received - 0.0005, received=received, stamp=5000.0, resolution=0.05)
    assert clock.samples == 1  # none was worth a pass over the window
    clock.observe(sent=100.010, received=100.011, stamp=5000.010, resolution=0.001)  # narrower
    # Kept, though one sample alone narrows no bound: about [4899.9989, 4900.0101].
    assert clock.samples == 2 and clock.uncertainty == pytest.approx(0.0056, abs=5e-5)
    step = CONFIRM_SPAN / (CONFIRM_JUMP - 1)
    for i in range(CONFIRM_JUMP):  # set forward, as answers over CONFIRM_SPAN say
        at = 100.012 + i * step
        clock.observe(sent=at, received=at + 0.001, stamp=5010.0 + i * step, resolution=0.01)
    assert clock.samples == CONFIRM_JUMP and clock.now() > 100.013 + 4909
    # 37 ms after the newest kept: kept, whatever it says.
    last = 100.013 + (CONFIRM_JUMP - 1) * step
    stamp = 5010.0 + last - 100.013
    clock.observe(sent=last + 0.027, received=last + 0.037, stamp=stamp, resolution=1.0)
    assert clock.samples == CONFIRM_JUMP + 1


def test_the_error_of_a_time_now_gave_covers_now_staying_ahead_of_a_narrowed_interval() -> None:
    """A sample that narrows the interval from above moves its middle down, but
    now() does not go backwards: it stays ahead of the store's time by more
    than half the new width. The error of the time now() gave is measured
    from that time, so now - error never passes the store's time (a reaper
    that took half the width reaped a live lease ~0.4 s early)."""
    t = FakeTime(mono=0.0)
    clock = t.clock()
    offset = 1000.02  # the store's time is mono + offset
    clock.observe(sent=0.0, received=0.0, stamp=1000.0, resolution=1.0)  # [1000, 1001]
    t.mono = 0.89
    clock.now()  # read often, as a busy broker does: 1001.39
    for _ in range(2):  # said twice: no bound rests on one answer
        clock.observe(sent=0.9, received=0.9, stamp=1000.9, resolution=0.1)  # [1000, 1000.1]
    t.mono = 0.9
    now = clock.now()
    true = t.mono + offset
    assert now - true == pytest.approx(0.47)
    assert clock.uncertainty is not None and now - clock.uncertainty > true + 0.4
    assert now - clock.error(now) <= true <= now + clock.error(now)
    t.mono = 5.0  # time caught up: the error is the interval's again,
    now = clock.now()  # widened at SLEW for 4.1 s: [999.59, 1000.51]
    assert clock.error(now) == pytest.approx(0.46)
    assert now - clock.error(now) <= t.mono + offset <= now + clock.error(now)


def test_the_error_is_nothing_before_the_first_sample() -> None:
    clock = FakeTime().clock()
    assert clock.error(clock.now()) == 0.0


def test_one_answer_less_than_a_second_off_does_not_take_now_outside_its_error() -> None:
    """A lease counts from now + error and is reaped once now - error is past
    its expiry, so one wrong answer must not take now() outside its error. A
    new sample was compared with the newest sample only (1 s wide on S3), not
    with the estimate all the samples leave: one answer 0.9 s ahead overlapped
    the newest, was taken, the older samples that contradicted it were
    dropped, and now() moved 0.85 s ahead while error() said 0.15 s (an owner
    reaped a live lease 0.7 s early). Found by the review of ownership,
    membership and the store clock, round 25."""
    t = FakeTime(mono=0.0)
    clock = t.clock()
    true_offset = 4900.0  # store time - our monotonic time

    def answer(at: float, off: float = 0.0) -> None:  # a Date header: whole seconds
        t.mono = at
        clock.observe(at, at, math.floor(at + true_offset + off), 1.0)

    answer(100.99)  # offset in [4899.01, 4900.01]
    answer(102.0)  # offset in [4900.0, 4901.0]: the estimate is [4900.0, 4900.01]
    now = clock.now()
    assert abs(now - (t.mono + true_offset)) <= clock.error(now)
    answer(102.3, off=0.9)  # one answer 0.9 s ahead: offset in [4900.7, 4901.7]
    now = clock.now()
    wrong_by = now - (t.mono + true_offset)
    assert abs(wrong_by) <= clock.error(now), (
        f"now() is {wrong_by:.2f} s off the store's time, its error says {clock.error(now):.2f} s"
    )


@pytest.mark.parametrize("seed", range(8))
def test_isolated_wrong_answers_never_take_now_outside_its_error(seed: int) -> None:
    """A property, over S3-like answers (1 s Dates, round trips of 5-50 ms, an
    answer every 0.05-1 s): each is right within its bounds, except isolated
    wrong ones (a proxy's Date, a node of the store set apart) off by 1.1 to
    5 s either way, or a day; and once the store's clock is set, 1.5 to 30 s
    either way. now() stays within error() of the store's time throughout,
    except within the rival window after the set (CONFIRM_JUMP answers over
    CONFIRM_SPAN), where it is off by the step at most. A wrong answer was
    compared with the newest sample only (1 s wide), and one of those off by
    little more than a second that overlapped it moved now() by as much,
    error() saying tens of milliseconds (review of ownership, membership and
    the store clock, round 25). A wrong answer less than a second off can
    overlap the estimate itself: nothing tells such a one from a right one,
    and it narrows the estimate by about its width at most (not tested)."""
    rng = random.Random(seed)
    t = FakeTime(mono=100.0)
    clock = t.clock()
    offset = 4900.0 + rng.random()  # the store's time - our monotonic time
    step = rng.choice([-1, 1]) * rng.uniform(1.5, 30.0)
    stepped_at = -math.inf
    last_wrong = -10
    for n in range(300):
        t.mono += rng.uniform(0.05, 1.0)
        if n == 150:
            offset += step
            stepped_at = t.mono
        wrong = 0.0
        isolated = n - last_wrong > CONFIRM_JUMP + 1 and t.mono - stepped_at > 10.0
        if n >= 5 and isolated and rng.random() < 0.1:
            last_wrong = n
            wrong = rng.choice([-1, 1]) * rng.choice([rng.uniform(1.1, 5.0), 86_400.0])
        request(
            clock, t, offset + wrong, rtt=rng.uniform(0.005, 0.05), resolution=1.0, at=rng.random()
        )
        now = clock.now()
        off = abs(now - (t.mono + offset))
        if t.mono - stepped_at < CONFIRM_SPAN + 1.0:  # answers every 1 s at most
            assert off <= clock.error(now) + abs(step), n
        else:
            assert off <= clock.error(now) + 1e-9, (
                f"answer {n}: now() is {off:.3f} s off the store's time, "
                f"error() says {clock.error(now):.3f} s"
            )


def test_a_step_of_the_store_clock_under_a_second_is_followed_once_rivals_confirm_it() -> None:
    """Judged against the estimate, answers after the store's clock was set
    half a second forward are of two kinds: those the estimate does not allow
    (rivals), and those that allow both the estimate and the rivals. The
    second kind says nothing either way: it must not start the rivals' count
    again, or a step under a second is never confirmed."""
    t = FakeTime(mono=100.99)
    clock = t.clock()

    def answer(at: float, offset: float) -> None:  # a Date header: whole seconds
        t.mono = at
        clock.observe(at, at, math.floor(at + offset), 1.0)

    answer(100.99, 4900.005)
    answer(102.0, 4900.005)  # the estimate is [4900.0, 4900.01]
    for at in (103.6, 104.2, 105.6, 106.2, 107.6, 108.2, 109.6):  # set 0.5 s forward
        answer(at, 4900.505)  # x.6 only the new clock allows, x.2 both
    now = clock.now()
    assert abs(now - (t.mono + 4900.505)) <= clock.error(now) < 0.25


def test_one_answer_off_after_an_hour_without_samples_does_not_take_now_outside_its_error() -> None:
    """StoreClock._drifted widens every kept sample by DRIFT times its age,
    whatever its age: after an hour without an answer (the store down, its
    connection errors and 5xx not sampled) the samples kept are an hour old,
    widened by 7.2 s each way, and the first answer back, 5 s off (a proxy's
    4xx page with its own Date), is taken at once as drift. now() runs 5 s
    ahead while error() says about 1 s: an owner reaps live leases 4 s early
    (a job run twice), and now() never goes back once rivals correct it.
    Found by the review of round 25's changes (DRIFT came with them). Since
    samples widen at SLEW (round 33), an hour-old sample allows any answer
    within 6 minutes; the newest sample past the horizon is kept, so no
    bound rests on the answer alone, and error() covers it (about 7 s, the
    kept sample widened at DRIFT for the hour), until answers that agree come."""
    mono = [0.0]
    clock = StoreClock(monotonic=lambda: mono[0], wall=lambda: 1.7e9)
    true_offset = 4900.0

    def answer(at: float, off: float = 0.0) -> None:
        mono[0] = at
        clock.observe(at, at + 0.01, math.floor(at + 0.005 + true_offset + off), 1.0)

    for k in range(30):
        answer(100.0 + k * 0.77)
    now = clock.now()
    assert abs(now - (mono[0] + true_offset)) <= clock.error(now)
    answer(100.0 + 3600.0, off=5.0)  # the first answer after an hour: 5 s off
    now = clock.now()
    wrong_by = now - (mono[0] + true_offset)
    assert abs(wrong_by) <= clock.error(now), (
        f"now() is {wrong_by:.2f} s off the store's time, its error says {clock.error(now):.2f} s"
    )


class SuspendableHost:
    """A host's clocks, for the clock module's `time`: CLOCK_MONOTONIC
    (time.monotonic) stops while the host is suspended, CLOCK_BOOTTIME runs on."""

    def __init__(self) -> None:
        self.mono = self.boot = 100.0

    def run(self, seconds: float) -> None:
        self.mono += seconds
        self.boot += seconds

    def suspend(self, seconds: float) -> None:
        self.boot += seconds

    def monotonic(self) -> float:
        return self.mono

    def clock_gettime(self, clock: int) -> float:
        assert clock == time.CLOCK_BOOTTIME, clock
        return self.boot


@pytest.mark.skipif(
    not hasattr(time, "CLOCK_BOOTTIME"), reason="Linux's clock that counts a suspend"
)
def test_a_host_suspended_for_ten_minutes_does_not_write_times_ten_minutes_old(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The clock's local base was time.monotonic, which stops while the host
    is suspended (a laptop, EC2 hibernation) while the store's clock runs on:
    after 600 s suspended every answer said the store had jumped 600 s ahead,
    taken only after CONFIRM_JUMP answers over CONFIRM_SPAN, and for those 4 s
    of answers now() was 600 s behind the store while error() said 0.135 s
    (leases granted then already run out in the store's time). The base is
    CLOCK_BOOTTIME now, which counts the suspend: no jump to confirm."""
    host = SuspendableHost()
    monkeypatch.setattr(clock_module, "time", host)
    clock = StoreClock(wall=lambda: 0.0, spacing=0.02)  # on its own local base
    store_ahead = 5000.0  # store time - the host's time since boot

    def answer() -> None:
        host.run(0.23)  # a broker at work: an answer every 0.25 s
        sent = clock.local()
        host.run(0.02)
        stamp = float(int(host.boot - 0.01 + store_ahead))  # a Date: whole seconds
        clock.observe(sent, clock.local(), stamp, 1.0)

    for _ in range(40):
        answer()
    host.suspend(600.0)
    for _ in range(16):  # 4 s of answers after the resume
        answer()
        now = clock.now()
        off = now - (host.boot + store_ahead)
        assert abs(off) <= clock.error(now), (
            f"now() {off:+.1f} s off the store's time, error() {clock.error(now):.3f} s"
        )


def _drive(
    seed: int,
    resolution: float,
    every: float,
    rate: float,
    wrong_by: tuple[float, float] | None,
    n: int = 400,
) -> tuple[float, int]:
    """A store answering every 0-2x `every` seconds, its stamps truncated to
    `resolution`, round trips of 2-30 ms; the local clock running at 1x for
    30 s, then `rate`x and 2 - `rate`x in turns of 40 s (chrony slewing it);
    one answer in 70 at most off by `wrong_by` seconds (either way), after
    the first 70. The worst (|now() - the store's time| - error()) after
    each answer, and at which answer."""
    rng = random.Random(seed)
    t = FakeTime(mono=100.0)
    clock = t.clock()
    true = 1_700_000_000.0
    worst, at, last_wrong = 0.0, -1, 0

    def run(seconds: float) -> None:
        nonlocal true
        for _ in range(max(1, int(seconds / 0.05))):
            spent = seconds / max(1, int(seconds / 0.05))
            slewed = true - 1_700_000_000.0 >= 30
            speed = (rate if (true // 40) % 2 == 0 else 2 - rate) if slewed else 1.0
            true += spent
            t.mono += spent * speed

    for i in range(n):
        run(rng.uniform(0.0, 2 * every))
        sent, rtt = t.mono, rng.uniform(0.002, 0.03)
        served = true + rng.random() * rtt
        run(rtt)
        off = 0.0
        if wrong_by and i - last_wrong >= 70 and rng.random() < 0.5:
            off, last_wrong = rng.choice([-1, 1]) * rng.uniform(*wrong_by), i
        stamp = math.floor((served + off) / resolution) * resolution
        clock.observe(sent, t.mono, stamp, resolution)
        now = clock.now()
        beyond = abs(now - true) - clock.error(now)
        if beyond > worst:
            worst, at = beyond, i
    return worst, at


@pytest.mark.parametrize(
    ("resolution", "every"),
    [(1.0, 1.0), (1.0, 0.1), (1.0, 5.0), (0.01, 0.05), (0.01, 2.0)],
    ids=["s3-1s", "s3-100ms", "s3-5s", "localfs-50ms", "localfs-2s"],
)
@pytest.mark.parametrize("seed", range(3))
def test_a_slewed_clock_or_one_wrong_answer_keeps_now_within_its_error(
    resolution: float, every: float, seed: int
) -> None:
    """The two faults the estimate is built to hold against, apart: a local
    clock slewed by chrony at its maxslewrate (8.3 %, one way then the
    other), and, on a clock that is not, isolated wrong answers the estimate
    allows in part (S3: 0.1-1 s off; localfs 5-50 ms). Before round 33, the
    slewed clock put now() up to 3.1 s outside its error() and one wrong
    answer up to 0.17 s (13 of these 15 cases failed); without the
    second-tightest rule, one wrong answer did, up to 0.68 s. Both at once
    are not held: a slew and one wrong answer took now() up to 0.9 s outside
    (measured over 10 seeds; not tested)."""
    slewed = _drive(seed, resolution, every, rate=1.083, wrong_by=None)
    wrong = (0.1, 1.0) if resolution == 1.0 else (0.005, 0.05)
    one_wrong = _drive(seed, resolution, every, rate=1.0, wrong_by=wrong)
    assert slewed[0] <= 1e-9 and one_wrong[0] <= 1e-9, (
        f"slewed: now() {slewed[0]:.3f} s beyond its error at answer {slewed[1]}; "
        f"one wrong answer: {one_wrong[0]:.3f} s beyond at answer {one_wrong[1]}"
    )


@pytest.mark.parametrize("rate", [1.0, 1.083, 0.917, 1.01], ids=["steady", "fast", "slow", "1%"])
def test_each_sample_costs_a_bounded_amount_of_work_however_the_clock_is_slewed(
    monkeypatch: pytest.MonkeyPatch, rate: float
) -> None:
    """The two tightest samples of each bound are kept as samples come and
    go. Recounted over the window whenever one of them left it, a slewed
    clock (whose oldest sample is the tightest at DRIFT, the offset moving
    faster than DRIFT) recounted at 80-100 % of samples (28 % at 1 %):
    observe() + now() 24-30 us instead of 5 (review of round 33's clock).
    Here: merges of two samples' bounds, a handful per sample."""
    merges = [0]
    merge = clock_module._merge

    def counting(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
        merges[0] += 1
        return merge(a, b)

    monkeypatch.setattr(clock_module, "_merge", counting)
    rng = random.Random(1)
    t = FakeTime(mono=1e6)
    clock = t.clock(spacing=0.02)
    true, n = 1_700_000_000.0, 3000
    for _ in range(n):  # localfs on NFS: an mtime (10 ms) every 20 ms, round trips ~1 ms
        true += 0.02
        t.mono += 0.02 * rate
        sent, rtt = t.mono, rng.uniform(0.0002, 0.002)
        served = true + rng.random() * rtt
        true += rtt
        t.mono += rtt * rate
        clock.observe(sent, t.mono, math.floor(served / 0.01) * 0.01, 0.01)
        now = clock.now()
        assert abs(now - true) <= clock.error(now) + 1e-9
    assert merges[0] <= 5 * n, f"{merges[0] / n:.1f} merges a sample (local clock at {rate}x)"


@pytest.mark.parametrize(
    ("resolution", "slew", "median", "most"),
    [(1.0, clock_module.SLEW, 0.8, 1.0), (0.01, 0.0, 0.002, 0.002)],
    ids=["s3", "localfs-local-disk"],
)
def test_between_answers_a_quiet_brokers_error_is_as_documented(
    resolution: float, slew: float, median: float, most: float
) -> None:
    """A quiet broker answers every 5 s (its registration's renewals), and a
    claim or a reap comes between two: the error then has grown at the slew
    rate since the last answer. S3 (README, StoreClock's docstring): 0.72 s
    at the median instant, 0.97 s at most. A local disk's mtimes are this
    host's clock, slewed with ours, so its samples need not widen: about a
    millisecond (at SLEW: 0.23 s median, 0.46 s at most; at DRIFT 20 ms;
    0.4 ms before SLEW). Review of round 33's clock."""
    rng = random.Random(3)
    t = FakeTime(mono=100.0)
    clock = t.clock(spacing=0.02, slew=slew)
    offset = 1_700_000_000.0 - 100.0 + rng.random()
    rtt = (0.005, 0.03) if resolution == 1.0 else (0.0002, 0.002)
    errors = []
    for i in range(200):
        sent, took = t.mono, rng.uniform(*rtt)
        served = sent + rng.random() * took + offset
        t.mono += took
        clock.observe(sent, t.mono, math.floor(served / resolution) * resolution, resolution)
        start = t.mono
        for k in range(10):  # instants spread over the 5 s until the next answer
            t.mono = start + k * 0.5
            if i > 20:
                now = clock.now()
                assert abs(now - (t.mono + offset)) <= clock.error(now) + 1e-9
                errors.append(clock.error(now))
        t.mono = start + 5.0
    assert statistics.median(errors) < median and max(errors) < most, (
        f"error() between answers 5 s apart: median {statistics.median(errors):.3f} s, "
        f"at most {max(errors):.3f} s"
    )


def test_a_clock_with_a_window_of_one_sample_takes_a_second() -> None:
    """`window` is a parameter; at 1, the horizon's check read the second
    oldest sample after the window was cut down to one: IndexError on the
    second sample (the product uses 64). Review of round 33's clock."""
    t = FakeTime(mono=100.0)
    clock = t.clock(window=1)
    clock.observe(100.0, 100.01, 1_700_000_000.0, 1.0)
    t.mono = 101.0
    clock.observe(101.0, 101.01, 1_700_000_001.0, 1.0)
    assert clock.samples == 1
