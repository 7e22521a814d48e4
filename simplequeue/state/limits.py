"""The two value classes the state machine is configured with: the bounds that
keep every write of a topic small (its storage layout), and the queue policy
that a broker's flags set (lease, attempts, retention). Request sizes are the
API's (simplequeue.api), not policy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from simplequeue.api import check_seconds


@dataclass(frozen=True)
class Bounds:
    """How much of a topic's state its head holds inline before spilling, and
    how many references it keeps before grouping them.

    Every batch rewrites the head, so its inline parts are kept small; what
    outgrows them spills into segments, written once."""

    inline_pending_bytes: int = 24 * 1024  # spill lanes' inline jobs past this
    inline_leases_bytes: int = 12 * 1024  # spill leases (claims) past this
    inline_records_bytes: int = 8 * 1024  # spill retained records past this
    inline_dead_bytes: int = 8 * 1024  # spill dead jobs past this
    inline_outbox_bytes: int = 8 * 1024  # spill follow-ups waiting for delivery past this
    segment_bytes: int = 128 * 1024  # the largest segment a spill writes (one item at least)
    loose_max: int = 16  # segment refs of a chain before the oldest half get a manifest
    manifests_max: int = 16  # manifests of a chain before two are merged into one
    manifest_bytes: int = 192 * 1024  # the largest manifest a merge writes
    holes_max: int = 512  # holes kept for manifested segments before a manifest is rewritten
    lanes_max: int = 64  # distinct priorities of the jobs held at once (each may need a lane)
    runs_max: int = 8  # runs of a lane before small ones are merged
    merge_bytes: int = 64 * 1024  # the most a seal writes merging runs
    # What a seal writes at most in upkeep (folds, compaction, merges, manifests
    # rewritten: all but the batch's own spills) and its head together, past
    # its first object of upkeep (docs/STORAGE.md, Upkeep).
    upkeep_bytes: int = 192 * 1024
    writers_max: int = 64  # brokers whose latest write id the head keeps
    schedules_max: int = 100  # schedules of a topic (they live in its head)
    schedules_bytes: int = 64 * 1024  # all of a topic's schedules, as JSON
    # Payload bytes past which the claims (and pops) of a batch take no more
    # jobs, each one at least: answers are built in memory, and the segments
    # they read are held at once (the committer lowers it to fit its cache).
    claim_bytes: int = 16 * 1024 * 1024

    def scaled(self, factor: int) -> Bounds:
        """The same bounds with `factor` times as much inline."""
        return dataclasses.replace(
            self,
            inline_pending_bytes=factor * self.inline_pending_bytes,
            inline_leases_bytes=factor * self.inline_leases_bytes,
            inline_records_bytes=factor * self.inline_records_bytes,
            inline_dead_bytes=factor * self.inline_dead_bytes,
            inline_outbox_bytes=factor * self.inline_outbox_bytes,
        )


@dataclass(frozen=True)
class Policy:
    """The queue's defaults, as the broker's flags set them."""

    default_lease: float = 30.0  # seconds, for claims that do not say
    max_attempts: int = 5  # default for jobs that do not say (0 = unlimited)
    retention: float = 3600.0  # seconds a completed/dead record is kept
    dead_limit: int = 10_000  # dead jobs kept; beyond it the oldest are dropped

    def __post_init__(self) -> None:
        # A lease or retention of nan or inf would be written into heads as
        # null (JSON has neither), and a head holding one cannot be read back.
        for name in ("default_lease", "retention"):
            check_seconds(f"Policy.{name}", getattr(self, name))
