"""Which ids a topic's segments surely do not hold: duplicate detection's fast "no".

An enqueue with an id (the SDK gives every job one, so that a retried request
does not enqueue twice) asks whether the topic holds that id anywhere. A fresh
id is the usual answer, and without help finding that out means reading every
loose segment and asking every manifest of every chain for it (up to 16 of
each a chain): a fifth of the broker's time on enqueues at 64 callers.

An IdFilter holds the 32-bit id hashes (segments.id_hash) of every segment it
has covered: a loose one's ids hashed when it is first seen, a manifested
one's taken from its manifest's id index (a manifest made of segments already
covered, by a fold, a merge or a rewrite, adds nothing). They sit in a few
sorted arrays (4 bytes an id), merged as they come like the levels of an LSM
tree: an addition costs O(log n) amortised, a query one bisection per level,
and merging levels of a million ids takes about 0.1 s, once per doubling.

It is a superset: ids that left the topic stay in it until it holds
STALE_FACTOR times what the chains hold (then it is rebuilt), and cost only a
rare false "maybe" (the caller then searches the segments as before). A false
"no" cannot happen as long as every segment of the chains asked about is
covered, which `cover` makes sure of on each query (a set lookup per object
the head names). Segments are immutable, so a filter is right for any state
of its topic (rolled back, reloaded, written by another broker), and the
committer keeps one per topic across its states.
"""

from __future__ import annotations

import array
import bisect
import heapq
from collections.abc import Iterable
from typing import Any

from simplequeue import keys
from simplequeue.state.segments import SegmentView, as_ref_says, decode_index, id_hash

# Rebuilt from scratch when it holds this many times the ids its topic's chains
# hold in segments now (plus a floor): ids consumed or expired since are dead weight.
STALE_FACTOR = 4
STALE_FLOOR = 65536
# What a covered object's key costs in memory, about (a str in a set).
KEY_BYTES = 128


class _Levels:
    """Sorted arrays of 32-bit hashes, each at most half the size of the one before."""

    def __init__(self) -> None:
        self.levels: list[array.array[int]] = []
        self.size = 0

    def add(self, hashes: Iterable[int]) -> None:
        level = array.array("I", sorted(hashes))
        if not level:
            return
        self.size += len(level)
        levels = self.levels
        levels.append(level)
        while len(levels) >= 2 and len(levels[-2]) <= 2 * len(levels[-1]):
            newer = levels.pop()
            older = levels.pop()
            # Both are sorted: a merge, without the list of Python ints that
            # sorted() would build (36 MB for a million ids).
            levels.append(array.array("I", heapq.merge(older, newer)))

    def __contains__(self, hashed: int) -> bool:
        for level in self.levels:
            i = bisect.bisect_left(level, hashed)
            if i < len(level) and level[i] == hashed:
                return True
        return False


class IdFilter:
    """A superset of the id hashes of the segments it covered (see the module)."""

    def __init__(self, stale_floor: int = STALE_FLOOR) -> None:
        self.stale_floor = stale_floor
        self._reset()

    def _reset(self) -> None:
        self._hashes = _Levels()
        self._manifests: set[str] = set()  # manifest keys covered
        self._segments: set[str] = set()  # segment ids whose hashes are in

    @property
    def size(self) -> int:
        """Hashes held (4 bytes each)."""
        return self._hashes.size

    @property
    def nbytes(self) -> int:
        """Memory it holds, about: 4 bytes a hash, and the keys of what it covered."""
        return 4 * self._hashes.size + KEY_BYTES * (len(self._segments) + len(self._manifests))

    def cover(self, chains: list[dict[str, Any]], topic: str, view: SegmentView) -> None:
        """Take in every segment of `chains` (chain dicts, see state.chain),
        loose or under a manifest, not covered yet. Raises SegmentMissing for
        an object not loaded."""
        covered, done = self._segments, self._manifests
        manifests = [m for d in chains for m in d["mans"] if m["k"] not in done]
        loose = [r["k"] for d in chains for r in d["segs"] if r["k"] not in covered]
        if not (manifests or loose):
            return  # the usual answer: nothing new since the last query
        held = sum(m.get("total", 0) for d in chains for m in d["mans"])
        held += sum(r["n"] for d in chains for r in d["segs"])
        if self._hashes.size > STALE_FACTOR * held + self.stale_floor:
            self._reset()
            self.cover(chains, topic, view)
            return
        for seg_id in loose:
            items = view.segment(keys.segment(topic, seg_id)).items
            self._hashes.add(id_hash(item["id"]) for item in items)
            covered.add(seg_id)
        for mref in manifests:
            man_id = mref["k"]
            refs = as_ref_says(view.manifest(keys.segment(topic, man_id)), mref["segs"]).refs
            # A manifest made of loose segments, or written by merging or
            # rewriting others, holds segments already covered: nothing to add.
            new = [ref for ref in refs if ref["k"] not in covered]
            if new:
                self._hashes.add(h for ref in new for h in decode_index(ref["ix"]))
                covered.update(ref["k"] for ref in new)
            self._manifests.add(man_id)

    def may_hold(self, hashed: int) -> bool:
        """False: no covered segment holds an id whose id_hash is `hashed`."""
        return hashed in self._hashes
