"""When a schedule's slots come (SPEC 11): every N seconds, or at the times of a
five-field cron expression in a time zone. Pure functions of a schedule's
definition and a time; no I/O, no clock of their own.

Slots are whole Unix seconds, so that a slot names the same job
("<name>@<slot>") whichever broker computes it. `every: N` slots are the
multiples of N since the Unix epoch (every: 3600 fires on the hour, UTC), so
they do not depend on when the schedule was made either. Cron is evaluated by
cronsim (Debian cron's rules, daylight saving handled: a time that a spring
shift skips fires once at the first time after it, a repeated one once, in
its first pass; slots cronsim answers before the time asked are skipped, as
it reads a time in a fall-back's second pass as the first). Two hosts' tzdata
may put a cron's local time at two instants (a zone's offset changed between
releases): a schedule keeps the local time it fired last, and a slot at or
before it is one fired already (one a broker that kept none fired is read
off its last slot).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from simplequeue.errors import InvalidRequest

_NEVER = "a cron expression whose days never come"


def check_definition(every: int | None, cron: str | None, tz: str | None) -> None:
    """InvalidRequest unless exactly one of `every` and `cron` is given, `cron`
    has five fields that cronsim reads and that come round, and `tz` (cron only)
    names a time zone."""
    if every is None and cron is None:
        raise InvalidRequest('a schedule has "every" (seconds) or "cron": give one')
    if every is not None and cron is not None:
        raise InvalidRequest('a schedule has either "every" (seconds) or "cron", not both')
    if cron is None:
        if tz is not None:
            raise InvalidRequest('"tz" goes with "cron"; "every" slots are Unix seconds')
        return
    if len(cron.split()) != 5:
        raise InvalidRequest("a cron expression has five fields: minute hour day month weekday")
    if tz in _HOSTS_OWN:
        raise InvalidRequest(
            f"time zone {tz!r} is not a zone but a host's setting (brokers may differ): "
            "name one, such as 'Europe/Paris'"
        )
    if tz is not None and tz.startswith("right/"):
        # tzdata's right/ zones count leap seconds, which Unix time does not:
        # right/UTC's 09:00 fired 27 s early (at 08:59:33 UTC).
        raise InvalidRequest(
            f"time zone {tz!r} counts leap seconds, which the store's clock does not: "
            f"name the zone without 'right/' ({tz.removeprefix('right/')!r})"
        )
    zone = _zone(tz)
    try:
        CronSim(cron, datetime(2000, 1, 1, tzinfo=zone))
    except CronSimError as exc:
        raise InvalidRequest(f"bad cron expression {cron!r}: {exc}") from None
    if next_after(_definition(every, cron, tz), 0.0) is None:
        raise InvalidRequest(f"{_NEVER}: {cron!r}")


# Names tzdata may hold that are not a place's zone: "localtime" is the host's
# (brokers on two hosts would fire a schedule at two times), "Factory" none.
_HOSTS_OWN = frozenset({"localtime", "Factory", "posixrules"})


def _definition(every: int | None, cron: str | None, tz: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if every is not None:
        out["every"] = every
    if cron is not None:
        out["cron"] = cron
    if tz is not None:
        out["tz"] = tz
    return out


def _zone(tz: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(tz or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidRequest(f"unknown time zone {tz!r}") from None


# How many slots a search steps through, at most, to leave a daylight-saving
# fall-back's repeated hour (a slot a minute: 60) before it gives up.
_STEPS = 1_000


def next_after(schedule: dict[str, Any], t: float) -> int | None:
    """The first slot strictly after `t` (None: a cron that never comes again)."""
    every: int | None = schedule.get("every")
    if every is not None:
        return (math.floor(t) // every + 1) * every
    start = datetime.fromtimestamp(math.floor(t), _zone(schedule.get("tz")))
    try:
        # In the second pass of a fall-back's repeated hour, cronsim reads the
        # start as the first pass and answers slots that are already past:
        # skipped, so that no slot comes twice.
        for _, slot in zip(range(_STEPS), CronSim(schedule["cron"], start), strict=False):
            if slot.timestamp() > t:
                return int(slot.timestamp())
    except CronSimError:
        pass
    return None


def latest_at(schedule: dict[str, Any], t: float) -> int | None:
    """The last slot at or before `t` (None: none since the epoch)."""
    every: int | None = schedule.get("every")
    if every is not None:
        return math.floor(t) // every * every
    # Reverse iteration starts strictly before a time without microseconds.
    start = datetime.fromtimestamp(math.floor(t) + 1, _zone(schedule.get("tz")))
    latest = None
    try:
        for _, slot in zip(
            range(_STEPS), CronSim(schedule["cron"], start, reverse=True), strict=False
        ):
            if slot.timestamp() <= t:
                latest = int(slot.timestamp())
                break
    except CronSimError:
        pass
    if latest is None:
        return None
    # Around a fall-back, the reverse walk can land a pass early: step forward
    # to the last slot that is not after `t`.
    for _ in range(_STEPS):
        following = next_after(schedule, latest)
        if following is None or following > t:
            break
        latest = following
    return latest


def local_time(schedule: dict[str, Any], slot: int) -> str:
    """The wall-clock time a cron schedule's slot shows in its zone, by this
    host's tzdata, as a naive ISO time ("2024-03-02T09:00"): what it keeps of
    the last slot it fired (`last_local`)."""
    shown = datetime.fromtimestamp(slot, _zone(schedule.get("tz")))
    return shown.replace(tzinfo=None).isoformat(timespec="minutes")


# Two tzdata releases put a zone's local time at instants less than this
# apart (seconds): a day.
_TZDATA_SHIFT = 86_400


def fired_locally(schedule: dict[str, Any], slot: int) -> bool:
    """Whether `slot` shows, by this host's tzdata, a local time at or before
    the last one the schedule fired (`last_local`): fired already, perhaps by
    a broker whose tzdata put that time at another instant. A `last_local`
    this host puts more than _TZDATA_SHIFT after `slot` was not fired before
    it (a head edited by hand, or a foreign writer's): it says nothing, as if
    absent, and next_unfired steps through at most that span of slots."""
    last = schedule.get("last_local")
    if last is None:
        return False
    zone = _zone(schedule.get("tz"))
    local = datetime.fromisoformat(last)
    # Up to the first instant this clock shows it: a fall-back's second pass
    # comes after, and fires as cronsim says. For a time this tzdata skips
    # (fold=0: after the gap), the slots before the gap show earlier times.
    until = local.replace(tzinfo=zone).timestamp()
    if not slot <= until <= slot + _TZDATA_SHIFT:
        return False
    return datetime.fromtimestamp(slot, zone).replace(tzinfo=None) <= local


def last_local_known(schedule: dict[str, Any]) -> str | None:
    """The local time a cron schedule fired last, as this host can tell: its
    `last_local`, or the time its `last_slot` shows when that is later or
    there is none (a broker from before `last_local` was kept fired since:
    it moved `last_slot` on and left `last_local` as it was). A slot shows
    the cron's occurrence nearest to it by this host's tzdata: the firing
    broker's put that time a tzdata shift away, far less than half the gap
    between a daily or hourly cron's times. One more than _TZDATA_SHIFT away,
    or at or after `next_at` (the firing broker's next slot, not fired yet),
    is none. InvalidRequest: a time zone this host does not know."""
    kept: str | None = schedule.get("last_local")
    last_slot: int | None = schedule.get("last_slot")
    if last_slot is None or "cron" not in schedule:
        return kept
    if kept is not None and kept == local_time(schedule, last_slot):
        return kept  # written by a broker whose tzdata agrees: no walk (the common case)
    near = [
        occurrence
        for occurrence in (latest_at(schedule, last_slot), next_after(schedule, last_slot))
        if occurrence is not None
        and abs(occurrence - last_slot) < _TZDATA_SHIFT
        and occurrence < schedule["next_at"]
    ]

    def distance(occurrence: int) -> tuple[int, bool]:
        # Halfway between two, the later when nothing else tells (a slot is
        # fired at most once); the earlier beside a `last_local`, which stands
        # unless the slot shows a later time plainly.
        return abs(occurrence - last_slot), (occurrence > last_slot) == (kept is not None)

    if not near:
        return kept
    shown = local_time(schedule, min(near, key=distance))
    if kept is not None and datetime.fromisoformat(shown) <= datetime.fromisoformat(kept):
        return kept
    return shown


def next_unfired(schedule: dict[str, Any], t: float) -> int | None:
    """The first slot strictly after `t` that is not `fired_locally` (None: a
    cron that never comes again)."""
    slot = next_after(schedule, t)
    # Those skipped lie before the instant this host puts `last_local` at,
    # within _TZDATA_SHIFT (fired_locally): a minute's cron, 1,440 at most.
    while slot is not None and fired_locally(schedule, slot):
        slot = next_after(schedule, slot)
    return slot
