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

import math
import threading
import time
from collections import deque
from collections.abc import Callable
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


# How fast (s/s) the offset between the store's clock and our local one may
# move, two ways.
# - SLEW: as fast as it may ever move. chrony slews a host's clock by up to
#   83,333 ppm (its default maxslewrate) while it corrects an offset, and
#   that moves CLOCK_MONOTONIC and CLOCK_BOOTTIME with it (only MONOTONIC_RAW
#   is spared): every sample's bounds widen by this much a second since its
#   request was sent, so a sample stays true of the offset however the local
#   clock is slewed. Under 0.083 the estimate fell behind a slewed clock and now()
#   ran off outside its error() (leases reaped seconds early).
# - DRIFT: as fast as it moves when nothing slews (a kernel's own frequency
#   error: well under 0.05 %). One wrong answer (a proxy's own Date, one node
#   of a store with its clock set apart) that the estimate allows in part is
#   taken in; no bound of the estimate rests on one sample alone at DRIFT.
SLEW = 0.1
DRIFT = 0.002


def _overlap(low: float, high: float, other_low: float, other_high: float) -> bool:
    """Whether the intervals [low, high] and [other_low, other_high] meet."""
    return max(low, other_low) <= min(high, other_high)


class _Sample(NamedTuple):
    received: float  # local monotonic time the answer came back
    low: float  # bounds of (store time - local monotonic time) this sample allows
    high: float
    # The bounds as keys: at local time t, the low bound widened at SLEW since
    # the request was sent (the store stamped it since) is `slew_low - SLEW *
    # t`, the high one `slew_high + SLEW * t`, and the same at DRIFT. Which
    # sample is tightest does not change as time passes, so the tightest are
    # kept as samples come.
    slew_low: float
    slew_high: float
    drift_low: float
    drift_high: float


def _sample(sent: float, received: float, low: float, high: float) -> _Sample:
    return _Sample(
        received,
        low,
        high,
        low + SLEW * sent,
        high - SLEW * sent,
        low + DRIFT * sent,
        high - DRIFT * sent,
    )


class _Tightest:
    """The two tightest samples by one of _Sample's keys: those with the
    largest `sign * key` (a low bound's key as it is, a high bound's negated)."""

    __slots__ = ("field", "first", "first_key", "second", "second_key", "sign")

    def __init__(self, field: int, sign: float) -> None:
        self.field, self.sign = field, sign
        self.first: _Sample | None = None
        self.second: _Sample | None = None
        self.first_key = self.second_key = -math.inf

    def clear(self) -> None:
        self.first = self.second = None
        self.first_key = self.second_key = -math.inf

    def add(self, sample: _Sample) -> None:
        key = self.sign * sample[self.field]
        if key > self.first_key:
            self.second, self.second_key = self.first, self.first_key
            self.first, self.first_key = sample, key
        elif key > self.second_key:
            self.second, self.second_key = sample, key

    def holds(self, sample: _Sample) -> bool:
        return sample is self.first or sample is self.second


class StoreClock:
    """An estimate of the store's time in Unix seconds.

    Each sample says: the store stamped `stamp` (truncated to `resolution`) at
    some instant between `sent` and `received` on our monotonic clock, so the
    offset lies in [stamp - received, stamp + resolution - sent] then, and
    within SLEW per second since of it later (the local clock may be slewed).
    The estimate rests on the recent samples (at most `window` of them, none
    older than `horizon` seconds before the newest): each of its bounds is
    the wider of the tightest sample's bound widened at SLEW and the
    second-tightest's widened at DRIFT. So it holds the store's time while
    the local clock is slewed (then every sample widened at SLEW does), and
    while one answer among them is wrong and nothing is slewed (then the
    second-tightest at DRIFT is a right one): a slew and a wrong answer at
    once may take now() outside its error(). The price is width: with S3's
    Dates (whole seconds) the half-width is about 0.07 s at 50 requests a
    second, 0.12 s at ten, 0.33 s at one, 0.5 s at one every 5 s (it was
    0.015-0.025 s at any rate before SLEW); with localfs's 10 ms mtimes,
    5 ms at 50 a second to 16 ms at one every 5 s (0.4 ms before).

    A sample the estimate does not allow at all (the store's clock was set,
    or one answer is wrong) is not taken in: it waits until CONFIRM_JUMP such
    samples, agreeing with each other, over CONFIRM_SPAN seconds or more,
    say so with none between that only the estimate allows; then they
    replace the samples the estimate rests on. So one wrong answer moves
    now() by nothing then; one the estimate allows in part moves it by at
    most about the estimate's width.

    now() is monotonic time plus the middle of that interval, and never goes
    backwards once two samples agree: a store whose clock is set back leaves
    now() standing until the store catches up. Before the first sample, now()
    is the local wall clock (time.time()), a guess that the first sample
    replaces, forwards or backwards; and until a second sample agrees with
    the first, that one is a guess too, which a confirmed jump replaces
    either way (one wrong first answer, a day ahead, held now() a day ahead).

    A sample received less than `spacing` seconds after the newest one kept is
    dropped when it neither narrows the interval nor contradicts it: it would
    change nothing now.

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
        # The tightest of the samples kept, by each bound at SLEW and DRIFT.
        self._slew_low = _Tightest(3, 1.0)
        self._slew_high = _Tightest(4, -1.0)
        self._drift_low = _Tightest(5, 1.0)
        self._drift_high = _Tightest(6, -1.0)
        self._tightest = (self._slew_low, self._slew_high, self._drift_low, self._drift_high)
        # Newer samples that agree with each other (at SLEW), the first and
        # `_rivals_against` of them disagreeing with the estimate (the others
        # allow both), the tightest of their bounds, and when the first came:
        # a jump not yet taken.
        self._rivals: deque[_Sample] = deque(maxlen=window)
        self._rivals_low = _Tightest(3, 1.0)
        self._rivals_high = _Tightest(4, -1.0)
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
        new = _sample(sent, received, stamp - received, stamp + resolution - sent)
        with self._lock:
            if not self._samples:
                self._last = -float("inf")  # the wall-clock guess gives way
                self._take([new])
                return
            # Judged against the estimate, not against the newest sample alone
            # (about 1 s wide on S3): a wrong answer 0.9 s ahead overlapped the
            # newest, won, and moved now() 0.85 s ahead while error() said 0.15 s.
            low, high = self._bounds(received)
            agrees = _overlap(new.low, new.high, low, high)
            # Whether it also agrees with the rivals waiting: then it says
            # nothing either way, and they wait on.
            both = bool(self._rivals) and _overlap(
                new.low,
                new.high,
                self._rivals_low.first_key - SLEW * received,
                -self._rivals_high.first_key + SLEW * received,
            )
            if agrees:
                if (
                    received - self._samples[-1].received < self._spacing
                    and new.low <= low
                    and new.high >= high  # it holds the interval: no news
                ):
                    if not both:
                        self._clear_rivals()
                    return
                self._add(new)
                if both:
                    self._rival(new)
                else:
                    self._clear_rivals()
                return
            # It disagrees with the estimate (however old: now() still rests
            # on it): the store's clock was set, or this one answer is wrong
            # (a proxy's error page with its own Date, one node of a store
            # set apart). Only CONFIRM_JUMP such answers, agreeing with each
            # other, with none between that the estimate alone allows, move
            # the estimate: one would move now() for good (it never goes
            # back), and retention would drop records early with it.
            if not both or new.received - self._rivals_since > self._horizon:
                self._clear_rivals()
                self._rivals_since, self._rivals_against = new.received, 0
            self._rival(new)
            self._rivals_against += 1
            span = new.received - self._rivals_since
            if self._rivals_against < CONFIRM_JUMP or span < CONFIRM_SPAN:
                return
            if not self._corroborated:  # the lone sample was the wrong one
                self._last = -float("inf")
            self._take(list(self._rivals))
            self._clear_rivals()

    def _rival(self, sample: _Sample) -> None:
        self._rivals.append(sample)
        self._rivals_low.add(sample)
        self._rivals_high.add(sample)

    def _clear_rivals(self) -> None:
        self._rivals.clear()
        self._rivals_low.clear()
        self._rivals_high.clear()

    def _add(self, new: _Sample) -> None:
        """Keep `new` (the newest sample), and drop the samples past the
        window, and those past the horizon but the newest of them: an answer
        after a silence does not stand alone (one wrong answer back after an
        hour without any, 5 s off, moved now() 5 s while error() said 0.5 s),
        and the one kept, widened at DRIFT for the silence, bounds it."""
        samples = self._samples
        samples.append(new)
        for tightest in self._tightest:
            tightest.add(new)
        recount = False
        while len(samples) > self._window or (
            new.received - samples[1].received > self._horizon  # the newest of them stays
        ):
            old = samples.popleft()
            recount = recount or any(tightest.holds(old) for tightest in self._tightest)
        if recount:
            self._recount()
        self._corroborated = True

    def _take(self, samples: list[_Sample]) -> None:
        """Rest the estimate on `samples` (oldest first, as rivals are kept:
        within the window and the horizon) alone."""
        kept = samples[-self._window :]
        self._samples = deque(kept)
        self._recount()
        self._corroborated = self._corroborated or len(kept) > 1

    def _recount(self) -> None:
        for tightest in self._tightest:
            tightest.clear()
            for sample in self._samples:
                tightest.add(sample)

    def _bounds(self, at: float) -> tuple[float, float]:
        """The interval (store time - local time) lies in at local time `at`,
        by the samples kept (at least one)."""
        at = max(at, self._samples[-1].received)  # threads may race: no sample ages below 0
        low = self._slew_low.first_key - SLEW * at
        high = -self._slew_high.first_key + SLEW * at
        if self._drift_low.second is not None:  # two samples or more
            low = min(low, self._drift_low.second_key - DRIFT * at)
            high = max(high, -self._drift_high.second_key + DRIFT * at)
        if low > high:
            # Samples kept contradict each other beyond what slewing explains
            # (the store's clock set by less than the estimate's width, or
            # two wrong answers): the gap between the bounds they set, until
            # the widening reconciles them.
            low, high = high, low
        return low, high

    def now(self) -> float:
        """The store's time in Unix seconds (the local wall clock before any sample)."""
        with self._lock:
            if self._samples:
                at = self._monotonic()
                low, high = self._bounds(at)
                estimate = at + (low + high) / 2
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
            local = self._monotonic()
            return local + self._bounds(local)[1] - at

    def behind(self, at: float) -> float:
        """How far the store's time may be behind `at` (a time now() returned a
        moment ago) at this moment: `at` less this is the earliest it may
        read, the bottom of the interval, which leases are reaped by. 0.0
        before the first sample."""
        with self._lock:
            if not self._samples:
                return 0.0
            local = self._monotonic()
            return at - (local + self._bounds(local)[0])

    @property
    def uncertainty(self) -> float | None:
        """Half the width of the interval the offset lies in (seconds); None
        before the first sample."""
        with self._lock:
            if not self._samples:
                return None
            low, high = self._bounds(self._monotonic())
            return (high - low) / 2

    @property
    def samples(self) -> int:
        """How many samples the current estimate rests on."""
        with self._lock:
            return len(self._samples)
