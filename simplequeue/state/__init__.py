"""The topic state machine: pure functions over a topic's state, no I/O, ever.

The group committer (simplequeue.groupcommit) is its only caller: it loads a
topic's state, applies each mutation of a batch, seals and writes it.
"""

from simplequeue.state.limits import Bounds, Policy
from simplequeue.state.topic import (
    Job,
    Record,
    Sealed,
    SegmentMissing,
    Segments,
    TopicState,
    decode_segment,
    new_head,
)

__all__ = [
    "Bounds",
    "Job",
    "Policy",
    "Record",
    "Sealed",
    "SegmentMissing",
    "Segments",
    "TopicState",
    "decode_segment",
    "new_head",
]
