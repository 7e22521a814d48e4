"""The topic state machine: pure functions over a topic's state, no I/O, ever.

The group committer (simplequeue.groupcommit) is its only caller: it loads a
topic's state, applies each mutation of a batch, seals and writes it.
"""

from simplequeue.state.idfilter import IdFilter
from simplequeue.state.limits import Bounds, Policy
from simplequeue.state.segments import (
    Loaded,
    Manifest,
    Segment,
    SegmentMissing,
    SegmentView,
    decode_manifest,
    decode_object,
    decode_segment,
)
from simplequeue.state.topic import TOTALS, Job, Record, Sealed, TopicState, decode_head, new_head

__all__ = [
    "TOTALS",
    "Bounds",
    "IdFilter",
    "Job",
    "Loaded",
    "Manifest",
    "Policy",
    "Record",
    "Sealed",
    "Segment",
    "SegmentMissing",
    "SegmentView",
    "TopicState",
    "decode_head",
    "decode_manifest",
    "decode_object",
    "decode_segment",
    "new_head",
]
