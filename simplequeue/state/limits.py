"""The two value classes the state machine is configured with: the bounds that
keep every write of a topic small (its storage layout), and the queue policy
that a broker's flags set (lease, attempts, retention, request sizes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bounds:
    """How much of a topic's state its head holds inline before spilling.

    Every batch rewrites the head, so its inline parts are kept small; what
    outgrows them spills into segments, written once."""

    inline_pending_bytes: int = 32 * 1024  # spill lanes' inline runs past this
    inline_records_bytes: int = 16 * 1024  # spill retained records past this
    inline_dead_bytes: int = 16 * 1024  # spill dead jobs past this
    recent_writes: int = 64  # write ids kept to resolve ambiguous writes

    def scaled(self, factor: int) -> Bounds:
        """The same bounds with `factor` times as much inline."""
        return Bounds(
            inline_pending_bytes=factor * self.inline_pending_bytes,
            inline_records_bytes=factor * self.inline_records_bytes,
            inline_dead_bytes=factor * self.inline_dead_bytes,
            recent_writes=self.recent_writes,
        )


@dataclass(frozen=True)
class Policy:
    """The queue's defaults and request limits, as the broker's flags set them."""

    default_lease: float = 30.0  # seconds, for claims that do not say
    max_lease: float = 12 * 3600.0
    max_attempts: int = 5  # default for jobs that do not say (0 = unlimited)
    retention: float = 3600.0  # seconds a completed/dead record is kept
    dead_limit: int = 10_000  # dead jobs kept; beyond it the oldest are dropped
    max_batch: int = 1000  # jobs in one enqueue / claim / ack request
