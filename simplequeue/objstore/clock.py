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
from collections.abc import Callable, Iterable, Iterator
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
#   clock is slewed. Under 0.083 the estimate fell behind a slewed clock and
#   now() ran off outside its error() (leases reaped seconds early). A store
#   that stamps on this host's own clock (localfs on a local disk: mtimes are
#   CLOCK_REALTIME, slewed with CLOCK_BOOTTIME, one oscillator) sees the
#   offset move only when the clock is stepped: its samples do not widen
#   (StoreClock(slew=0.0)).
# - DRIFT: as fast as it moves when nothing slews (a kernel's own frequency
#   error: well under 0.05 %). One wrong answer (a proxy's own Date, one node
#   of a store with its clock set apart) that the estimate allows in part is
#   taken in; no bound of the estimate rests on one sample alone at DRIFT.
SLEW = 0.1
DRIFT = 0.002

_INF = math.inf
# The two largest of each of a sample's four keys (_Sample.keys), flat: none yet.
_NONE: tuple[float, ...] = (-_INF,) * 8


def _overlap(low: float, high: float, other_low: float, other_high: float) -> bool:
    """Whether the intervals [low, high] and [other_low, other_high] meet."""
    return max(low, other_low) <= min(high, other_high)


class _Sample(NamedTuple):
    sent: float  # local monotonic time the request went out
    received: float  # and its answer came back
    low: float  # bounds of (store time - local monotonic time) this sample allows
    high: float
    # Its bounds as keys, each with -inf beside it (as _Window's tops are):
    # at local time t, the low bound widened at `slew` since the request was
    # sent (the store stamped it since) is `keys[0] - slew * t`, the high one
    # `-keys[2] + slew * t`, and at `drift` keys[4] and keys[6] likewise. So
    # which sample is tightest does not change as time passes.
    keys: tuple[float, ...]


def _sample(
    sent: float, received: float, low: float, high: float, slew: float, drift: float
) -> _Sample:
    keys = (
        low + slew * sent,
        -_INF,
        -(high - slew * sent),
        -_INF,
        low + drift * sent,
        -_INF,
        -(high - drift * sent),
        -_INF,
    )
    return _Sample(sent, received, low, high, keys)


def _merge(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
    """The two largest of each key (flat pairs) among those `a` and `b` hold."""
    a0, a1, a2, a3, a4, a5, a6, a7 = a
    b0, b1, b2, b3, b4, b5, b6, b7 = b
    # Written out: this runs at every sample, and a loop over the pairs cost 2x.
    return (
        *((a0, a1 if a1 >= b0 else b0) if a0 >= b0 else (b0, b1 if b1 >= a0 else a0)),
        *((a2, a3 if a3 >= b2 else b2) if a2 >= b2 else (b2, b3 if b3 >= a2 else a2)),
        *((a4, a5 if a5 >= b4 else b4) if a4 >= b4 else (b4, b5 if b5 >= a4 else a4)),
        *((a6, a7 if a7 >= b6 else b6) if a6 >= b6 else (b6, b7 if b7 >= a6 else a6)),
    )


class _Window:
    """Samples, oldest first, and the two largest of each of their keys, kept
    as samples come and go: a queue of two stacks, each entry of the front
    one holding its own and the newer ones' tops, so that taking the oldest
    out costs nothing more on average. (Recounted when one of the tightest
    left, a slewed clock, whose oldest sample is the tightest at DRIFT,
    recounted the window at 80-100 % of samples: 24-30 us each.)"""

    __slots__ = ("_back", "_back_tops", "_front", "_tops")

    def __init__(self, samples: Iterable[_Sample] = ()) -> None:
        self._front: list[tuple[_Sample, tuple[float, ...]]] = []  # the oldest last
        self._back: list[_Sample] = []  # the newest last
        self._back_tops = _NONE
        self._tops: tuple[float, ...] | None = _NONE
        for sample in samples:
            self.append(sample)

    def __len__(self) -> int:
        return len(self._front) + len(self._back)

    def __iter__(self) -> Iterator[_Sample]:
        yield from (sample for sample, _ in reversed(self._front))
        yield from self._back

    def append(self, sample: _Sample) -> None:
        self._back.append(sample)
        self._back_tops = _merge(self._back_tops, sample.keys)
        self._tops = None

    def popleft(self) -> None:
        if not self._front:
            tops = _NONE
            while self._back:
                sample = self._back.pop()
                tops = _merge(tops, sample.keys)
                self._front.append((sample, tops))
            self._back_tops = _NONE
        self._front.pop()
        self._tops = None

    def at(self, i: int) -> _Sample:
        """The `i`-th oldest (0 or 1), or newest (-1)."""
        if i < 0:
            return self._back[-1] if self._back else self._front[0][0]
        if i < len(self._front):
            return self._front[-1 - i][0]
        return self._back[i - len(self._front)]

    def tops(self) -> tuple[float, ...]:
        """The two largest of each key, flat: keys[0]'s, then keys[2]'s, and so on."""
        if self._tops is None:
            front = self._front[-1][1] if self._front else _NONE
            self._tops = _merge(front, self._back_tops)
        return self._tops


class StoreClock:
    """An estimate of the store's time in Unix seconds.

    Each sample says: the store stamped `stamp` (truncated to `resolution`) at
    some instant between `sent` and `received` on our monotonic clock, so the
    offset lies in [stamp - received, stamp + resolution - sent] then, and
    within `slew` (SLEW) per second since `sent` of it later (the local clock
    may be slewed). The estimate rests on the recent samples (at most
    `window` of them, none older than `horizon` seconds before the newest
    but the newest of those): each of its bounds is the wider of the
    tightest sample's bound widened at `slew` and the second-tightest's
    widened at DRIFT. So it holds the store's time while the local clock is
    slewed (then every sample widened at SLEW does), and while one answer
    among them is wrong and nothing is slewed (then the second-tightest at
    DRIFT is a right one). A slew and a wrong answer at once may take now()
    outside its error(): by up to 0.9 s with answers 0.1-1 s wrong, 2.7 s
    with answers 1-60 s wrong and S3 answering every 5-20 s (simulated).

    The price is width. With S3's Dates (whole seconds), the half-width as
    an answer comes is about 0.07 s at 50 requests a second, 0.12 s at ten,
    0.33 s at one, 0.5 s at one every 5 s (0.015-0.025 s at any rate
    before SLEW); and it grows by SLEW (0.1 s) a second until the next
    answer: at one every 5 s, 0.72 s at the median instant between two,
    0.97 s just before the next. With localfs's 10 ms mtimes stamped by
    another host (NFS), 5-16 ms as an answer comes, growing likewise. On a
    local disk, whose mtimes are this host's clock, slewed with ours, the
    samples do not widen (set_slew(0.0); localfs learns which at its first
    write): about a millisecond, as before SLEW.

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
        slew: float = SLEW,
    ) -> None:
        self._slew, self._drift = slew, min(DRIFT, slew)
        self._window = window
        self._horizon = horizon
        self._spacing = spacing
        self._monotonic = monotonic
        self._wall = wall
        self._samples = _Window()
        # Newer samples that agree with each other (at the slew rate), the
        # first and `_rivals_against` of them disagreeing with the estimate
        # (the others allow both), and when the first came: a jump not yet
        # taken.
        self._rivals = _Window()
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
        new = _sample(
            sent, received, stamp - received, stamp + resolution - sent, self._slew, self._drift
        )
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
            rivals = self._rivals.tops()
            both = bool(self._rivals) and _overlap(
                new.low,
                new.high,
                rivals[0] - self._slew * received,
                -rivals[2] + self._slew * received,
            )
            if agrees:
                if (
                    received - self._samples.at(-1).received < self._spacing
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
        if len(self._rivals) > self._window:
            self._rivals.popleft()

    def _clear_rivals(self) -> None:
        self._rivals = _Window()

    def _add(self, new: _Sample) -> None:
        """Keep `new` (the newest sample), and drop the samples past the
        window, and those past the horizon but the newest of them: an answer
        after a silence does not stand alone (one wrong answer back after an
        hour without any, 5 s off, moved now() 5 s while error() said 0.5 s),
        and the one kept, widened at DRIFT for the silence, bounds it."""
        samples = self._samples
        samples.append(new)
        while len(samples) > self._window or (
            len(samples) > 1
            and new.received - samples.at(1).received > self._horizon  # the newest of them stays
        ):
            samples.popleft()
        self._corroborated = True

    def _take(self, samples: list[_Sample]) -> None:
        """Rest the estimate on `samples` (oldest first, as rivals are kept:
        within the window and the horizon) alone."""
        kept = samples[-self._window :]
        self._samples = _Window(kept)
        self._corroborated = self._corroborated or len(kept) > 1

    def set_slew(self, slew: float) -> None:
        """Widen samples at `slew` (s/s) from now on, the kept ones too (and
        at DRIFT, or `slew` if less, for the second-tightest): SLEW, or 0.0
        for a store that stamps on this host's own clock (a local disk's
        mtimes), which moves with ours however it is slewed (localfs learns
        which at its first write)."""
        with self._lock:
            self._slew, self._drift = slew, min(DRIFT, slew)
            drift = self._drift

            def again(samples: Iterable[_Sample]) -> _Window:
                return _Window(
                    _sample(x.sent, x.received, x.low, x.high, slew, drift) for x in samples
                )

            self._samples, self._rivals = again(self._samples), again(self._rivals)

    def _bounds(self, at: float) -> tuple[float, float]:
        """The interval (store time - local time) lies in at local time `at`,
        by the samples kept (at least one)."""
        at = max(at, self._samples.at(-1).received)  # threads may race: none ages below 0
        tops = self._samples.tops()
        low = tops[0] - self._slew * at
        high = -tops[2] + self._slew * at
        if tops[5] > -_INF:  # two samples or more
            low = min(low, tops[5] - self._drift * at)
            high = max(high, -tops[7] + self._drift * at)
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
    def slew(self) -> float:
        """How fast (s/s) samples widen as they age: SLEW, or 0.0 (set_slew)."""
        return self._slew

    @property
    def samples(self) -> int:
        """How many samples the current estimate rests on."""
        with self._lock:
            return len(self._samples)
