"""What a RESP connection remembers of its stream reads (XREADGROUP), so that its
XACKs commit with their claims' lease tokens, and the bound on what all the
listener's connections remember together. It never acks anything: it says which
token an XACK carries, or that the XACK must count 0.

Why a read is remembered at all: an XACK names only a job id. Acked without its
token, the XACK of a claim whose lease ran out and went to another reader would
complete that reader's claim. So a connection acks what it read with the token
it read it under, and a read whose token it no longer holds (dropped, below) must
count 0, not be acked by whoever holds the job now: its hash is kept instead of
its token, and once a connection cannot keep those either, it acks no id it
holds no token for (forgot_too_many).

Why hashes are not dropped by time: after its lease runs out, a job may wait in
the queue for any time before another reader claims it, and once its record
expires a new job may take its id; a hash dropped after any fixed time would let
the old reader's XACK complete that claim. Tokens are dropped by time: once a
claim's lease ran out LEASE_MARGIN ago it has been reaped (its token can ack
nothing), and its hash says all that is left to say of it at a quarter of the
cost. Otherwise only counts drop them: TOKENS_KEPT and FORGOTTEN_KEPT per
connection, READS_BYTES for the listener.
"""

from __future__ import annotations

import sys
import time
from typing import Any

TOKENS_KEPT = 10_000  # stream-read lease tokens remembered per connection
# Reads whose tokens a connection dropped and that it still tells from ids it
# never read (an XACK of one counts 0, never acks without its token), kept as
# 64-bit hashes. Past this many, an XACK on that connection of any id it holds
# no token for counts 0.
FORGOTTEN_KEPT = 50_000  # about 3.7 MiB
# What all of a listener's connections may hold of their reads together, as
# estimated by READ_BYTES and HASH_BYTES: max_clients (10,000) connections of
# TOKENS_KEPT tokens and FORGOTTEN_KEPT hashes each would hold 75 GB. Past it,
# the connections holding the most let go (of the room their tables keep for
# what was taken out, then) of their hashes (they then ack no id they hold no
# token for), then of their oldest tokens (their XACKs count 0, and the jobs run
# again once their leases run out), until all hold 7/8 of it.
READS_BYTES = 64 * 1024 * 1024  # 200,000 tokens of the SDK's 32-character ids
# Seconds past a claim's lease after which its token acks nothing: the topic's
# owner reaps an expired lease at once (clock error aside), so the token is void
# unless the owner was away that long (then its late XACK counts 0, and the job
# runs again: at-least-once, as for any lease that runs out). The lease is
# timed on this broker's monotonic clock from the read, its length the claim's
# own (lease_expires_at less heartbeat_at, both the store clock's): a wall
# clock that is off, here or at the owner, voids no token early.
LEASE_MARGIN = 60.0
# What a token's objects take (the key's tuple, the (token, expiry) pair, the
# float, the id's and the token's headers: sys.getsizeof) over the lengths of
# its job id and token; and a hash's int. A topic's name is one str however
# many reads hold it, counted once while any does. The tables are measured as
# they are: none gives back room for what was taken out of it.
READ_BYTES = 240
HASH_BYTES = 40

Read = tuple[str, str]  # (topic, job id)


class ReadBudget:
    """READS_BYTES for the reads of all of one listener's connections: what they
    hold, and taken back from those holding the most when they hold more."""

    def __init__(self) -> None:
        self.held = 0  # bytes, as estimated
        self.holders: set[Reads] = set()

    def enforce(self) -> None:
        """Past READS_BYTES, cut those holding the most down to one level, the
        highest at which all hold 7/8 of it (so that sorting up to max_clients
        connections is not done again at every read that follows)."""
        if self.held <= READS_BYTES:
            return
        excess = self.held - (READS_BYTES - READS_BYTES // 8)
        most = sorted(self.holders, key=lambda reads: reads.held, reverse=True)
        top = 0  # what the first k of them hold
        for k, reads in enumerate(most, 1):
            top += reads.held
            below = most[k].held if k < len(most) else 0
            if top - k * below >= excess:  # cut down to `below`, they would free enough
                level = (top - excess) // k
                for cut in most[:k]:
                    cut.shed(cut.held - level)
                return


class Reads:
    """One connection's stream reads not acked yet: their lease tokens, oldest
    read first, and the hashes of the reads whose tokens it dropped."""

    def __init__(self, budget: ReadBudget) -> None:
        self.budget = budget
        self.held = 0  # bytes, as estimated: its share of budget.held
        # (topic, job id) -> the claim's lease token, and when (monotonic) it
        # is void (LEASE_MARGIN past the lease's end).
        self.tokens: dict[Read, tuple[str, float]] = {}
        # hash((topic, job id)) of reads whose tokens were dropped, up to
        # FORGOTTEN_KEPT; past that, forgot_too_many and the set is emptied.
        self.forgotten: set[int] = set()
        self.forgot_too_many = False
        self.topics: dict[str, int] = {}  # the tokens held of each topic
        self._tables = 0  # what held counts of the dicts' and the set's tables

    def remember(self, topic: str, jobs: list[dict[str, Any]]) -> None:
        """Keep the tokens of the claims `jobs` of `topic`, just read."""
        self.budget.holders.add(self)
        # One str for a topic's name, shared by its reads: each XREADGROUP
        # decodes its keys anew, and 1,000 reads of a 128-character topic held
        # a copy each, 177 bytes, uncounted (1.5 times what was counted).
        topic = sys.intern(topic)
        now = time.monotonic()
        for job in jobs:
            read = (topic, job["id"])
            # A job read again (its lease ran out, and it came back here) is
            # the newest read: kept in place, it would be dropped as the oldest.
            self._drop(read)
            token = job["lease_token"]
            self.tokens[read] = (token, now + _lease_of(job) + LEASE_MARGIN)
            self._add(_read_bytes(read, token))
            self._count_topic(topic, 1)
        # Past TOKENS_KEPT or void, oldest read first (so a read under a longer
        # lease holds back the void ones read after it): their XACKs count 0.
        while self.tokens:
            read, (_, void_at) = next(iter(self.tokens.items()))
            if len(self.tokens) <= TOKENS_KEPT and void_at > now:
                break
            self._forget(read)
        self._measure()
        self.budget.enforce()

    def token(self, read: Read) -> str | None:
        """The lease token `read` was claimed under, if still held."""
        kept = self.tokens.get(read)
        return kept[0] if kept is not None else None

    def forgot(self, read: Read) -> bool:
        """Whether `read` (topic, job id) may be one whose token was dropped."""
        return self.forgot_too_many or hash(read) in self.forgotten

    def acked(self, read: Read) -> None:
        """`read`'s claim was completed: nothing is left to remember of it."""
        self._drop(read)
        if not self.tokens:  # tables sized for the most it held, let go of
            self.tokens, self.topics = {}, {}
        self._measure()

    def close(self) -> None:
        """The connection ended: give back all it held."""
        self._add(-self.held)
        self.tokens, self.forgotten, self.topics, self._tables = {}, set(), {}, 0
        self.budget.holders.discard(self)

    def shed(self, wanted: int) -> None:
        """Let go of `wanted` bytes (or all it holds) for the budget: the room
        its tables kept for tokens taken out, then the hashes, then the oldest
        tokens, telling none apart from then on."""
        goal = self.held - wanted
        self._compact()
        if self.held <= goal:
            return
        self._forget_all()
        while self.tokens and self.held > goal:
            self._forget(next(iter(self.tokens)))
        self._compact()

    def _compact(self) -> None:
        self.tokens, self.topics = dict(self.tokens), dict(self.topics)
        self._measure()

    def _drop(self, read: Read) -> None:
        kept = self.tokens.pop(read, None)
        if kept is not None:
            self._add(-_read_bytes(read, kept[0]))
            self._count_topic(read[0], -1)

    def _count_topic(self, topic: str, n: int) -> None:
        """`n` more tokens of `topic` held: its name is counted while any is."""
        before = self.topics.get(topic, 0)
        after = before + n
        if after:
            self.topics[topic] = after
        else:
            del self.topics[topic]
        if not before or not after:
            self._add((1 if after else -1) * sys.getsizeof(topic))

    def _forget(self, read: Read) -> None:
        """Drop the token of `read`, remembering the read."""
        self._drop(read)
        if self.forgot_too_many:
            return
        self.forgotten.add(hash(read))
        self._add(HASH_BYTES)
        if len(self.forgotten) > FORGOTTEN_KEPT:
            self._forget_all()

    def _forget_all(self) -> None:
        self._add(-HASH_BYTES * len(self.forgotten))
        self.forgotten = set()
        self.forgot_too_many = True
        self._measure()

    def _measure(self) -> None:
        tables = sum(map(sys.getsizeof, (self.tokens, self.forgotten, self.topics)))
        self._add(tables - self._tables)
        self._tables = tables

    def _add(self, n: int) -> None:
        self.held += n
        self.budget.held += n


def _lease_of(job: dict[str, Any]) -> float:
    """The length of the lease `job` was claimed under, in the store's clock."""
    start = job.get("heartbeat_at") or job["claimed_at"]
    return max(0.0, float(job["lease_expires_at"]) - float(start))


def _read_bytes(read: Read, token: str) -> int:
    return READ_BYTES + len(read[1]) + len(token)
