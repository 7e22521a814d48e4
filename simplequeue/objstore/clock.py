"""The store's clock, estimated from the times the store stamps on our requests.

Brokers' wall clocks may disagree by any amount; the store's clock is the one
they share. StoreClock keeps an interval holding (store time - local monotonic
time) from samples (an S3 Date header, a file's mtime) and answers now() from
it. Pure arithmetic: it never does I/O and never reads the store itself.

Its local time is local_time(), which counts the time the host was suspended:
the store's clock runs on meanwhile. Samples are timed with StoreClock.local(),
never with time.monotonic() or the event loop's time.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

# Answers in a row that must agree on a store time the estimate does not allow
# before it moves there (the store's clock was set), over at least this many
# seconds: not one request's retries, a few hundred milliseconds apart.
CONFIRM_JUMP = 3
CONFIRM_SPAN = 5.0
# On Linux, CLOCK_MONOTONIC stops while the host is suspended (a laptop's lid,
# EC2 hibernation) and the store's clock does not: after a resume every answer
# said the store had jumped the suspend's length ahead, and until CONFIRM_JUMP
# of them agreed now() was that far behind, its error() a fraction of a second
# (10 minutes suspended: leases granted 10 minutes short). CLOCK_BOOTTIME is
# the same clock counting the suspend. Elsewhere time.monotonic(), whichever
# way the platform counts a suspend (where it stops, a resume is a jump still).
_LOCAL_CLOCK = getattr(time, "CLOCK_BOOTTIME", None)


def local_time() -> float:
    """Seconds on the local clock samples are timed with: monotonic, and
    running while the host is suspended where the platform offers one that
    does (Linux's CLOCK_BOOTTIME)."""
    if _LOCAL_CLOCK is None:
        return time.monotonic()
    return time.clock_gettime(_LOCAL_CLOCK)


# How fast (s/s) our monotonic clock may be taken to drift against the store's
# before a sample outside the estimate must wait for rivals: well beyond the
# 0.05 % a kernel slews a clock by.
DRIFT = 0.002


def _overlap(low: float, high: float, other_low: float, other_high: float) -> bool:
    """Whether the intervals [low, high] and [other_low, other_high] meet."""
    return max(low, other_low) <= min(high, other_high)


class _Sample(NamedTuple):
    received: float  # local monotonic time the answer came back
    low: float  # bounds of (store time - local monotonic time) this sample allows
    high: float


class StoreClock:
    """An estimate of the store's time in Unix seconds.

    Each sample says: the store stamped `stamp` (truncated to `resolution`) at
    some instant between `sent` and `received` on our monotonic clock, so the
    offset lies in [stamp - received, stamp + resolution - sent]. The estimate
    is the intersection of the recent samples that agree with the newest one
    (at most `window` of them, none older than `horizon` seconds before it).
    A new sample is judged against that estimate, not against the newest
    sample alone: one that the estimate does not allow is taken at once only
    as far as our monotonic clock may have drifted (DRIFT) since the samples
    it contradicts, which are dropped. Any other (the store's clock was set,
    or one answer is wrong) waits until CONFIRM_JUMP such samples, agreeing
    with each other, over CONFIRM_SPAN seconds or more, say so with none
    between that only the estimate allows: then they win. So one wrong
    answer takes now() outside its error() by the drift allowed at most;
    or, one that the estimate allows in part (nothing tells it from a right
    one), by about the estimate's width (tens of milliseconds once a few
    answers came), until answers that contradict it drop it.

    now() is monotonic time plus the middle of that interval, and never goes
    backwards once two samples agree: a store whose clock is set back leaves
    now() standing until the store catches up. Before the first sample, now()
    is the local wall clock (time.time()), a guess that the first sample
    replaces, forwards or backwards; and until a second sample agrees with
    the first, that one is a guess too, which a confirmed jump replaces
    either way (one wrong first answer, a day ahead, held now() a day ahead).

    A sample received less than `spacing` seconds after the newest one kept is
    dropped when it neither narrows the interval nor contradicts it: it would
    change nothing now, and keeping every one costs a pass over the window
    (a write or request each, on a busy broker).

    Thread-safe: localfs observes from worker threads while the loop reads.
    """

    def __init__(
        self,
        *,
        window: int = 64,
        horizon: float = 300.0,
        spacing: float = 0.0,
        monotonic: Callable[[], float] = local_time,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._window = window
        self._horizon = horizon
        self._spacing = spacing
        self._monotonic = monotonic
        self._wall = wall
        self._samples: deque[_Sample] = deque()
        self._low = self._high = 0.0
        # Newer samples that agree with each other, the first and
        # `_rivals_against` of them disagreeing with the estimate (the others
        # allow both), their intersection, and when the first came: a jump
        # not yet taken.
        self._rivals: deque[_Sample] = deque(maxlen=window)
        self._rivals_low = self._rivals_high = 0.0
        self._rivals_against = 0
        self._rivals_since = 0.0
        self._last = -float("inf")
        # Whether two samples ever agreed: until then a jump may take now() back.
        self._corroborated = False
        self._lock = threading.Lock()

    def local(self) -> float:
        """The local time samples are timed with (`sent`, `received`): this
        clock's own, local_time() unless a test gave another."""
        return self._monotonic()

    def observe(self, sent: float, received: float, stamp: float, resolution: float) -> None:
        """Add a sample: the store's time was in [stamp, stamp + resolution) at
        an instant between the local times `sent` and `received` (local())."""
        if received < sent or resolution < 0:
            raise ValueError(
                f"a sample needs sent <= received and resolution >= 0, "
                f"got sent={sent}, received={received}, resolution={resolution}"
            )
        new = _Sample(received, stamp - received, stamp + resolution - sent)
        with self._lock:
            if not self._samples:
                self._last = -float("inf")  # the wall-clock guess gives way
                self._take(*self._agreeing(new, ()))
                return
            # Judged against the estimate, the overlap of every sample kept,
            # not against the newest sample alone (about 1 s wide on S3): a
            # wrong answer 0.9 s ahead overlapped the newest, won, and moved
            # now() 0.85 s ahead while error() said 0.15 s.
            agrees = _overlap(new.low, new.high, self._low, self._high)
            # Whether it also agrees with the rivals waiting: then it says
            # nothing either way, and they wait on.
            both = bool(self._rivals) and _overlap(
                new.low, new.high, self._rivals_low, self._rivals_high
            )
            if (
                agrees
                and received - self._samples[-1].received < self._spacing
                and new.low <= self._low
                and new.high >= self._high  # it holds the interval: no news
            ):
                if not both:
                    self._rivals.clear()
                return
            if agrees or self._drifted(new):
                self._take(*self._agreeing(new, reversed(self._samples)))
                if agrees and both:
                    self._rivals.append(new)
                    self._rivals_low = max(self._rivals_low, new.low)
                    self._rivals_high = min(self._rivals_high, new.high)
                else:
                    self._rivals.clear()
                return
            # It disagrees with the estimate (however old: now() still rests
            # on it): the store's clock was set, or this one answer is wrong
            # (a proxy's error page with its own Date, one node of a store
            # set apart). Only CONFIRM_JUMP such answers, agreeing with each
            # other, with none between that the estimate alone allows, move
            # the estimate: one would move now() for good (it never goes
            # back), and retention would drop records early with it.
            if not both or new.received - self._rivals_since > self._horizon:
                self._rivals.clear()
                self._rivals_low, self._rivals_high = new.low, new.high
                self._rivals_since, self._rivals_against = new.received, 0
            self._rivals.append(new)
            self._rivals_low = max(self._rivals_low, new.low)
            self._rivals_high = min(self._rivals_high, new.high)
            self._rivals_against += 1
            span = new.received - self._rivals_since
            if self._rivals_against < CONFIRM_JUMP or span < CONFIRM_SPAN:
                return
            if not self._corroborated:  # the lone sample was the wrong one
                self._last = -float("inf")
            rivals = list(self._rivals)
            self._take(*self._agreeing(rivals[-1], reversed(rivals[:-1])))
            self._rivals.clear()

    def _drifted(self, new: _Sample) -> bool:
        """Whether `new`, which the estimate does not allow, is taken at once
        all the same, the older samples it contradicts dropped: our monotonic
        clock drifting against the store's carries the offset out of what old
        samples narrowed it to. So it is when `new` meets every kept sample
        widened by what DRIFT could have moved the offset since that one
        came: it contradicts none of the recent ones, and the old ones by
        little. A wrong answer so taken moves now() by as little."""
        for old in self._samples:
            # Its age counts up to the horizon: samples are kept until a new
            # estimate is taken, and after an hour without one (a store down:
            # its failures are not sampled), slack of 7 s a side would let the
            # first answer back take now() 5 s off as drift.
            age = min(max(new.received - old.received, 0.0), self._horizon)  # threads may race
            slack = DRIFT * age
            if not _overlap(new.low, new.high, old.low - slack, old.high + slack):
                return False
        return True

    def _agreeing(
        self, new: _Sample, older: Iterable[_Sample]
    ) -> tuple[list[_Sample], float, float]:
        """`new` and the samples before it (`older`, newest first) that agree
        with it and with each other, within the window and the horizon, oldest
        first; and the interval they leave."""
        kept, low, high = [new], new.low, new.high
        for old in older:
            if len(kept) >= self._window or new.received - old.received > self._horizon:
                break
            if not _overlap(low, high, old.low, old.high):
                break  # this one and all before it disagree with the newer ones
            low, high = max(low, old.low), min(high, old.high)
            kept.append(old)
        kept.reverse()
        return kept, low, high

    def _take(self, kept: list[_Sample], low: float, high: float) -> None:
        """Rest the estimate on `kept`, which leave [low, high]."""
        self._samples = deque(kept)
        self._low, self._high = low, high
        self._corroborated = self._corroborated or len(kept) > 1

    def now(self) -> float:
        """The store's time in Unix seconds (the local wall clock before any sample)."""
        with self._lock:
            if self._samples:
                estimate = self._monotonic() + (self._low + self._high) / 2
            else:
                estimate = self._wall()
            self._last = max(self._last, estimate)
            return self._last

    def error(self, at: float) -> float:
        """How far `at`, a time now() returned a moment ago, may be from the
        store's time at this moment, either way: the larger of ahead() and
        behind() (what /metrics shows). Not `uncertainty`: now() does not go
        backwards, so after a sample narrows the interval from above it stays
        ahead of the interval's middle (by up to half the old width) until
        time catches up; after a step back of the store's clock, by the step.
        0.0 before the first sample (now() is then a guess, which is not
        written into the store)."""
        return max(self.ahead(at), self.behind(at), 0.0)

    def ahead(self, at: float) -> float:
        """How far the store's time may be ahead of `at` (a time now() returned
        a moment ago) at this moment: `at` plus this is the latest it may read,
        the top of the interval, which leases count from. Less than 0 when
        `at` is above the interval: now() stood still after the store's clock
        was set back (a lease counted from `at` plus the far end's distance
        ran twice the step too long: 1,008 s for 10 s after a 600 s step).
        0.0 before the first sample."""
        with self._lock:
            if not self._samples:
                return 0.0
            return self._monotonic() + self._high - at

    def behind(self, at: float) -> float:
        """How far the store's time may be behind `at` (a time now() returned a
        moment ago) at this moment: `at` less this is the earliest it may
        read, the bottom of the interval, which leases are reaped by. 0.0
        before the first sample."""
        with self._lock:
            if not self._samples:
                return 0.0
            return at - (self._monotonic() + self._low)

    @property
    def uncertainty(self) -> float | None:
        """Half the width of the interval the offset lies in (seconds); None
        before the first sample."""
        with self._lock:
            return (self._high - self._low) / 2 if self._samples else None

    @property
    def samples(self) -> int:
        """How many samples the current estimate rests on."""
        with self._lock:
            return len(self._samples)
