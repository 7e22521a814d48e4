"""The store's clock, estimated from the times the store stamps on our requests.

Brokers' wall clocks may disagree by any amount; the store's clock is the one
they share. StoreClock keeps an interval holding (store time - local monotonic
time) from samples (an S3 Date header, a file's mtime) and answers now() from
it. Pure arithmetic: it never does I/O and never reads the store itself.
"""

from __future__ import annotations

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
    (at most `window` of them, none older than `horizon` seconds before it);
    a sample that contradicts older ones (our monotonic clock drifted) wins
    and the older ones are dropped. One that contradicts even the newest
    kept sample (the store's clock was set, or one answer is wrong) waits
    until CONFIRM_JUMP such samples in a row, over CONFIRM_SPAN seconds or
    more, agree: then they win.

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
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._window = window
        self._horizon = horizon
        self._spacing = spacing
        self._monotonic = monotonic
        self._wall = wall
        self._samples: deque[_Sample] = deque()
        self._low = self._high = 0.0
        # Newer samples that all disagree with the estimate and agree with
        # each other, and their intersection: a jump not yet taken.
        self._rivals: list[_Sample] = []
        self._rivals_low = self._rivals_high = 0.0
        self._last = -float("inf")
        # Whether two samples ever agreed: until then a jump may take now() back.
        self._corroborated = False
        self._lock = threading.Lock()

    def observe(self, sent: float, received: float, stamp: float, resolution: float) -> None:
        """Add a sample: the store's time was in [stamp, stamp + resolution) at
        an instant between the local monotonic times `sent` and `received`."""
        if received < sent or resolution < 0:
            raise ValueError(
                f"a sample needs sent <= received and resolution >= 0, "
                f"got sent={sent}, received={received}, resolution={resolution}"
            )
        new = _Sample(received, stamp - received, stamp + resolution - sent)
        with self._lock:
            if (
                self._samples
                and received - self._samples[-1].received < self._spacing
                and new.low <= self._low
                and new.high >= self._high  # it holds the interval: no news
            ):
                self._rivals.clear()
                return
            if not self._samples:
                self._last = -float("inf")  # the wall-clock guess gives way
            newest = self._samples[-1] if self._samples else None
            if newest is not None and not _overlap(new.low, new.high, newest.low, newest.high):
                # It disagrees with the newest sample kept (however old: now()
                # still rests on it): the store's clock was set, or this one
                # answer is wrong (a proxy's error page with its own Date, one
                # node of a store set apart). Only CONFIRM_JUMP such answers in
                # a row, agreeing with each other, move the estimate: one would
                # move now() for good (it never goes back), and retention
                # would drop records early with it.
                if not self._rivals or not _overlap(
                    new.low, new.high, self._rivals_low, self._rivals_high
                ):
                    self._rivals.clear()
                    self._rivals_low, self._rivals_high = new.low, new.high
                self._rivals.append(new)
                self._rivals_low = max(self._rivals_low, new.low)
                self._rivals_high = min(self._rivals_high, new.high)
                span = new.received - self._rivals[0].received
                if len(self._rivals) < CONFIRM_JUMP or span < CONFIRM_SPAN:
                    return
                if not self._corroborated:  # the lone sample was the wrong one
                    self._last = -float("inf")
                kept, low, high = self._rivals, self._rivals_low, self._rivals_high
            else:
                kept, low, high = [new], new.low, new.high
                for old in reversed(self._samples):
                    if len(kept) >= self._window or new.received - old.received > self._horizon:
                        break
                    if not _overlap(low, high, old.low, old.high):
                        break  # this one and all before it disagree with the newer ones
                    low, high = max(low, old.low), min(high, old.high)
                    kept.append(old)
                kept.reverse()
            self._rivals = []
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
        store's time at this moment, either way: its distance to the far end
        of the interval the samples leave. Not `uncertainty`: now() does not
        go backwards, so after a sample narrows the interval from above it
        stays ahead of the interval's middle (by up to half the old width)
        until time catches up. 0.0 before the first sample (now() is then a
        guess, which is not written into the store)."""
        with self._lock:
            if not self._samples:
                return 0.0
            mono = self._monotonic()
            return max(at - (mono + self._low), mono + self._high - at, 0.0)

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
