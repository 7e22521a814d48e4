"""What pops and completes named by an attempt id did on this broker (the
topic's owner), kept a while in memory for their retries and their undo
(api.UnpopRequest): the jobs as the state machine answered them, and the
undos that came before their pop landed.

An attempt is (topic, worker id, attempt id), the worker id "" for a complete
(it names none; no worker id is empty): as a claim's, one worker's ids are its
own. Best effort, bounded: POPS_KEPT_BYTES of memory (the jobs as JSON,
and each record's keys and bookkeeping), each kept api.CLAIM_ATTEMPTS_KEPT_S,
the oldest forgotten first. A record its caller holds (a RESP connection's
pop, until its reply goes out or its jobs go back) is never forgotten, nor
counted in that bound: its caller bounds it, and ends it (take()).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import msgspec
import orjson

from simplequeue import api
from simplequeue.state import Job

Attempt = tuple[str, str, str]  # topic, worker id ("" for a complete), attempt id

# The memory records kept for undos take, at most: their jobs as JSON (payloads
# included), their attempts' names, and ENTRY_BYTES each for the rest.
POPS_KEPT_BYTES = 32 * 1024 * 1024
# What one record holds beside its jobs and names (measured with tracemalloc:
# the Kept, its bytes object's header, the attempt's tuple and strings' headers,
# the OrderedDict's node and slot, about 450 bytes; rounded up).
ENTRY_BYTES = 512
POPS_WITHDRAWN = 10_000  # undos kept for pops not done yet, at most


@dataclass(frozen=True, slots=True)
class Kept:
    """What one pop or complete did, kept until `until` (monotonic)."""

    until: float
    jobs: bytes  # JSON
    size: int  # what it takes in memory, its attempt's names included (ENTRY_BYTES)

    def decoded(self) -> list[Job]:
        jobs: list[Job] = orjson.loads(self.jobs)
        return jobs


class Popped:
    """The kept pops and completes, and the undos that came first (withdrawn)."""

    def __init__(self) -> None:
        self._kept: OrderedDict[Attempt, Kept] = OrderedDict()  # oldest first
        self.kept_bytes = 0  # the size of all of them
        # Those their callers hold, until they take them: never forgotten.
        # A RESP connection holds its pipelined group's pops until the group
        # ends (64 of 1 MB fit in its output limit): kept with the others,
        # the group's first records were forgotten by the time it ended, and
        # the undo of a client gone found nothing.
        self._held: dict[Attempt, Kept] = {}
        self.held_bytes = 0
        self._withdrawn: OrderedDict[Attempt, float] = OrderedDict()  # until when

    def get(self, attempt: Attempt) -> Kept | None:
        """What `attempt` did, unless it was undone or forgotten."""
        if self.withdrawn(attempt):
            return None
        kept = self._held.get(attempt)
        if kept is not None:
            return kept
        kept = self._kept.get(attempt)
        return None if kept is None or kept.until < time.monotonic() else kept

    def keep(self, attempt: Attempt, jobs: list[Job], *, held: bool = False) -> None:
        """Keep what `attempt` did (it just landed), making room for it first:
        a record larger than all the room is not kept. `held`: its caller
        holds it until it takes it (forget or undo), whatever its size."""
        # msgspec's bytes are about their length: orjson's keep the buffer
        # they were written in (4 KB at least, some 10 times a long one's length).
        data = msgspec.json.encode(jobs)
        size = len(data) + sum(map(len, attempt)) + ENTRY_BYTES
        kept = Kept(time.monotonic() + api.CLAIM_ATTEMPTS_KEPT_S, data, size)
        self.take(attempt)
        if held:
            self._held[attempt] = kept
            self.held_bytes += kept.size
            return
        if kept.size > POPS_KEPT_BYTES:
            return
        self._make_room(POPS_KEPT_BYTES - kept.size)
        self._kept[attempt] = kept
        self.kept_bytes += kept.size

    def restore(self, attempt: Attempt, kept: Kept) -> None:
        """Keep again what take() handed out (its undo did not land), held
        or not, as records nobody holds are: for another undo, if one comes."""
        self.take(attempt)
        self._kept[attempt] = kept
        self.kept_bytes += kept.size

    def take(self, attempt: Attempt) -> Kept | None:
        """What `attempt` did, no longer kept nor held (None: nothing, or
        forgotten)."""
        kept = self._held.pop(attempt, None)
        if kept is not None:
            self.held_bytes -= kept.size
            return kept
        kept = self._kept.pop(attempt, None)
        if kept is None:
            return None
        self.kept_bytes -= kept.size
        return kept if kept.until >= time.monotonic() else None

    def withdraw(self, attempt: Attempt) -> None:
        """Note that `attempt` is undone: should its pop land later, its jobs
        go back as it lands."""
        now = time.monotonic()
        withdrawn = self._withdrawn
        withdrawn.pop(attempt, None)
        withdrawn[attempt] = now + api.CLAIM_ATTEMPTS_KEPT_S
        self._forget_withdrawn(now)

    def forget_expired(self) -> None:
        """Forget the records and undos past their time among the oldest (keep()
        and withdraw() do as they add one; an idle broker adds none)."""
        self._make_room(POPS_KEPT_BYTES)
        self._forget_withdrawn(time.monotonic())

    def _forget_withdrawn(self, now: float) -> None:
        withdrawn = self._withdrawn
        while withdrawn and (
            len(withdrawn) > POPS_WITHDRAWN or next(iter(withdrawn.values())) < now
        ):
            withdrawn.popitem(last=False)

    def withdrawn(self, attempt: Attempt) -> bool:
        until = self._withdrawn.get(attempt)
        return until is not None and until >= time.monotonic()

    def _make_room(self, room: int) -> None:
        """Forget the oldest records until the rest take `room` bytes at most,
        and every record that expired among the oldest."""
        kept, now = self._kept, time.monotonic()
        while kept and (self.kept_bytes > room or next(iter(kept.values())).until < now):
            self.kept_bytes -= kept.popitem(last=False)[1].size
