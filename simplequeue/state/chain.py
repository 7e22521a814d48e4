"""A chain: items in order, the newest inline in the head, older ones in
immutable segments, the oldest segments grouped under manifests. Every list
that grows in a topic (each run of pending jobs, the leases, the retained
records, the dead jobs) is a chain, so the head stays bounded however long the
list gets:

    head ── chain ─┬─ mans: [m-4, m-9]        manifest refs, oldest first
                   │     m-4 ──> [s-1 s-2 ... s-8]    segment refs + id index
                   ├─ segs: [s-31, s-32]      loose segment refs
                   └─ in:   [item, item]      inline items, newest last

A chain is consumed from its front: `mpos` segments of the first manifest and
`pos` items of the first remaining segment are gone. It may also lose items
anywhere (holes): a loose segment's ref keeps its own, and holes in manifested
segments are kept by segment id under `holes` until their manifest is
rewritten. Live counts are kept per ref and for the whole chain (`n`), so
counting never reads a segment.

Pure: no I/O. Objects are read through a SegmentView, which raises
SegmentMissing for one that is not loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from simplequeue import keys
from simplequeue.errors import CorruptData
from simplequeue.state.segments import (
    Manifest,
    Segment,
    SegmentMissing,
    SegmentView,
    as_ref_says,
    encode_index,
    id_hash,
)

Item = dict[str, Any]
_NO_HOLES: frozenset[int] = frozenset()


def new_chain() -> dict[str, Any]:
    return {"n": 0, "in": [], "segs": [], "mans": [], "mpos": 0, "pos": 0, "holes": {}}


@dataclass(frozen=True)
class Place:
    """Where a live item stands: inline (`seg` None; `item` is the very dict) or
    at `index` of segment `seg` (a segment id), under manifest `man` (an id) or
    loose (`man` None)."""

    seg: str | None
    index: int
    item: Item
    man: str | None = None


@dataclass
class NewObject:
    """An object a seal creates: its id (what refs name) and its bytes."""

    id: str
    data: bytes


class Chain:
    """Operations over one chain's dict in the head (changed in place)."""

    def __init__(self, d: dict[str, Any], topic: str, view: SegmentView) -> None:
        self.d = d
        self.topic = topic
        self.view = view

    # --- reading -------------------------------------------------------------------

    def segment(self, seg_id: str) -> Segment:
        return self.view.segment(keys.segment(self.topic, seg_id))

    def manifest(self, man_id: str) -> Manifest:
        """The manifest `man_id` names, holding as many segments as the head's
        ref to it says (segments.as_ref_says); the chain's first, with its
        cursor (`mpos`) on one of them, or the head is corrupt (edited or
        restored by hand: every read of the front would fail IndexError)."""
        manifest = self.view.manifest(keys.segment(self.topic, man_id))
        for m, mref in enumerate(self.d["mans"]):  # the first, mostly: the front's
            if mref["k"] == man_id:
                manifest = as_ref_says(manifest, mref["segs"])
                if m == 0 and not 0 <= self.d["mpos"] < mref["segs"]:
                    raise CorruptData(
                        keys.head(self.topic),
                        f"a chain's cursor is at segment {self.d['mpos']} of manifest "
                        f"{man_id!r}, which holds {mref['segs']}",
                    )
                return manifest
        return manifest  # one just dropped from the chain

    def items(self, ref: dict[str, Any]) -> list[Item]:
        """The items of the segment `ref` names: as many as it says, or the
        segment is not the one the head wrote (restored from another backup)."""
        items: list[Item] = self.segment(ref["k"]).items
        if len(items) < ref["n"]:
            key = keys.segment(self.topic, ref["k"])
            raise CorruptData(key, f"it holds {len(items)} items, the head says {ref['n']}")
        return items

    def holes_of(self, ref: dict[str, Any]) -> AbstractSet[int]:
        """The consumed positions of the segment `ref` names (read only)."""
        own, kept = ref.get("holes"), self.d["holes"].get(ref["k"])
        if not own and not kept:
            return _NO_HOLES  # the usual answer, asked on every claim: no set made
        holes = set(own or ())
        holes.update(kept or ())
        return holes

    @property
    def count(self) -> int:
        """Live items, from the head alone."""
        n: int = self.d["n"]
        return n

    def units(self) -> Iterator[tuple[dict[str, Any], str | None, int]]:
        """(segment ref, manifest id or None, first index not consumed) of every
        segment, in order. Opens manifests (SegmentMissing if one is not loaded)."""
        first = True
        for m, mref in enumerate(self.d["mans"]):
            refs = self.manifest(mref["k"]).refs
            for ref in refs[self.d["mpos"] if m == 0 else 0 :]:
                yield ref, mref["k"], self.d["pos"] if first else 0
                first = False
        for ref in self.d["segs"]:
            yield ref, None, self.d["pos"] if first else 0
            first = False

    def bounded_units(
        self, wanted: Callable[[dict[str, Any]], bool]
    ) -> Iterator[tuple[dict[str, Any], str | None, int, dict[str, Any] | None]]:
        """Like units(), with the manifest's ref last, for the segments whose ref
        is `wanted` (by its bounds, say) under manifests whose ref is wanted too:
        a manifest that is not wanted is not opened."""
        first = True
        for m, mref in enumerate(self.d["mans"]):
            if not wanted(mref):
                first = False
                continue
            refs = self.manifest(mref["k"]).refs
            for ref in refs[self.d["mpos"] if m == 0 else 0 :]:
                start = self.d["pos"] if first else 0
                first = False
                if wanted(ref):
                    yield ref, mref["k"], start, mref
        for ref in self.d["segs"]:
            start = self.d["pos"] if first else 0
            first = False
            if wanted(ref):
                yield ref, None, start, None

    def live_in(self, ref: dict[str, Any], man: str | None) -> list[Place]:
        """The live items of one segment, by its ref (under manifest `man`)."""
        return self._live(ref, man, self._start_of(ref, man))

    def places(self) -> Iterator[Place]:
        """Every live item, in order (reads every segment)."""
        for ref, man, start in self.units():
            holes = self.holes_of(ref)
            items = self.items(ref)
            for i in range(start, ref["n"]):
                if i not in holes:
                    yield Place(ref["k"], i, items[i], man)
        for item in self.d["in"]:
            yield Place(None, 0, item)

    def window(self, offset: int, limit: int, segments: int | None = None) -> list[Place]:
        """Up to `limit` live items from the `offset`-th on, in order, from at
        most `segments` segments. What comes before is skipped by the refs'
        live counts: only the manifests and segments the window falls in are
        read."""
        out: list[Place] = []
        first = True
        read = 0

        def take(ref: dict[str, Any], man: str | None, live: int) -> bool:
            """Skip or take the segment `ref`; whether the window is full."""
            nonlocal offset, first, read
            start = self.d["pos"] if first else 0
            first = False
            if offset >= live:
                offset -= live
                return False
            out.extend(self._live(ref, man, start)[offset : offset + limit - len(out)])
            offset = 0
            read += 1
            return len(out) >= limit or read == segments

        if limit <= 0:
            return out
        for m, mref in enumerate(self.d["mans"]):
            if offset >= mref["live"]:
                offset -= mref["live"]
                first = False
                continue
            for ref in self.manifest(mref["k"]).refs[self.d["mpos"] if m == 0 else 0 :]:
                start = self.d["pos"] if first else 0
                holes = self.holes_of(ref)
                live = ref["n"] - start - sum(1 for h in holes if start <= h < ref["n"])
                if take(ref, mref["k"], live):
                    return out
        for ref in self.d["segs"]:
            if take(ref, None, ref["live"]):
                return out
        inline = self.d["in"][offset : offset + limit - len(out)]
        out.extend(Place(None, 0, item) for item in inline)
        return out

    def newest(self, limit: int, room: float = math.inf, ahead: int = 1) -> tuple[list[Place], int]:
        """Up to `limit` live items, the newest first, and the bytes (as
        stored) of the segments read for them: the inline items, then the
        segments from the last back, each read only while those read before
        it come to less than `room`. A segment not at hand is asked for with
        the older ones that the items still wanted are in, `ahead` in all:
        one fetch round for them, not one each, and nothing else (a listing
        of some of a chain does not read ahead)."""
        if limit <= 0:
            return [], 0
        out = [Place(None, 0, item) for item in reversed(self.d["in"][-limit:])]
        spent = 0
        units = self._units_back()
        for ref, man, start in units:
            if len(out) >= limit or spent >= room:
                break
            live = self.live_count(ref, start)
            if not live:
                continue
            try:
                spent += self.segment(ref["k"]).size
            except SegmentMissing as miss:
                wanted = limit - len(out) - live
                also = self._missing_back(units, wanted, ahead - 1)
                raise SegmentMissing(miss.key, also, exact=True) from None
            items = self.items(ref)
            holes = self.holes_of(ref)
            for i in range(ref["n"] - 1, start - 1, -1):
                if len(out) >= limit:
                    break
                if i not in holes:
                    out.append(Place(ref["k"], i, items[i], man))
        return out, spent

    def _units_back(self) -> Iterator[tuple[dict[str, Any], str | None, int]]:
        """units(), the last segment first, opening only the manifests it
        comes to (the chain's cursor is in its first segment)."""
        d = self.d
        for n in range(len(d["segs"]) - 1, -1, -1):
            yield d["segs"][n], None, d["pos"] if n == 0 and not d["mans"] else 0
        for m in range(len(d["mans"]) - 1, -1, -1):
            man = d["mans"][m]["k"]
            try:
                refs = self.manifest(man).refs[d["mpos"] if m == 0 else 0 :]
            except SegmentMissing as miss:
                raise SegmentMissing(miss.key, exact=True) from None
            for n in range(len(refs) - 1, -1, -1):
                yield refs[n], man, d["pos"] if n == 0 and m == 0 else 0

    def _missing_back(
        self, units: Iterator[tuple[dict[str, Any], str | None, int]], wanted: int, most: int
    ) -> tuple[str, ...]:
        """The keys of the objects not at hand, `most` at most, that the next of
        `units` (going back) hold `wanted` more items in."""
        found: list[str] = []
        while wanted > 0 and len(found) < most:
            try:
                ref, _, start = next(units)
            except StopIteration:
                break
            except SegmentMissing as miss:  # a manifest: what it names waits for it
                found.append(miss.key)
                break
            live = self.live_count(ref, start)
            if not live:
                continue
            wanted -= live
            try:
                self.segment(ref["k"])
            except SegmentMissing as miss:
                found.append(miss.key)
        return tuple(found)

    def segments_of(self, key: str) -> list[tuple[dict[str, Any], str | None, int]]:
        """(segment ref, manifest id or None, first index not consumed) of one
        loose segment, or of every segment of one manifest (`key` names
        either): of the first manifest, only those from its cursor on (`mpos`:
        the segments before it are consumed). Opens that manifest only."""
        front = self._front()
        at = front[0]["k"] if front is not None else None

        def start(ref: dict[str, Any]) -> int:
            return self.d["pos"] if ref["k"] == at else 0

        for ref in self.d["segs"]:
            if ref["k"] == key:
                return [(ref, None, start(ref))]
        for m, mref in enumerate(self.d["mans"]):
            if mref["k"] == key:
                refs = self.manifest(key).refs[self.d["mpos"] if m == 0 else 0 :]
                return [(ref, key, start(ref)) for ref in refs]
        return []

    def live_count(self, ref: dict[str, Any], start: int) -> int:
        """Live items of the segment `ref` names, from `start` on, from its ref
        and the holes the head keeps for it (reads no segment)."""
        holes = self.holes_of(ref)
        if start:
            holes = {h for h in holes if h >= start}
        n: int = ref["n"]
        return n - start - len(holes)

    def _start_of(self, ref: dict[str, Any], man: str | None) -> int:
        front = self._front()
        return self.d["pos"] if front is not None and front[0]["k"] == ref["k"] else 0

    def _live(self, ref: dict[str, Any], man: str | None, start: int) -> list[Place]:
        holes = self.holes_of(ref)
        items = self.items(ref)
        return [Place(ref["k"], i, items[i], man) for i in range(start, ref["n"]) if i not in holes]

    def manifest_of(self) -> dict[str, str]:
        """Which manifest each manifested segment is under (opens manifests)."""
        return {r["k"]: m["k"] for m in self.d["mans"] for r in self.manifest(m["k"]).refs}

    def first(self) -> Place | None:
        """The first live item (reads the segments up to it): places()' first,
        without copying the first manifest's refs from the cursor on."""
        d = self.d
        start = d["pos"]
        for m, mref in enumerate(d["mans"]):
            refs = self.manifest(mref["k"]).refs
            for n in range(d["mpos"] if m == 0 else 0, len(refs)):
                place = self._first_live(refs[n], mref["k"], start)
                if place is not None:
                    return place
                start = 0
        for ref in d["segs"]:
            place = self._first_live(ref, None, start)
            if place is not None:
                return place
            start = 0
        return Place(None, 0, d["in"][0]) if d["in"] else None

    def _first_live(self, ref: dict[str, Any], man: str | None, start: int) -> Place | None:
        holes = self.holes_of(ref)
        if not holes and start < ref["n"]:
            return Place(ref["k"], start, self.items(ref)[start], man)
        for i in range(start, ref["n"]):
            if i not in holes:
                return Place(ref["k"], i, self.items(ref)[i], man)
        return None

    def locate(self, job_id: str, inline: bool = True) -> list[Place]:
        """Every live item with id `job_id`, in order (only those in segments
        without `inline`: a caller that indexes the inline items itself).
        Manifested segments are searched through their id index, loose ones
        read. Objects not at hand are asked for together: one SegmentMissing
        names every manifest and segment the look-up takes that is missing."""
        found: list[Place] = []
        missing: list[str] = []
        hashed = id_hash(job_id) if self.d["mans"] else 0  # once, not per manifest
        for m, mref in enumerate(self.d["mans"]):
            try:
                manifest = self.manifest(mref["k"])
            except SegmentMissing as miss:
                missing.append(miss.key)
                continue
            skip = self.d["mpos"] if m == 0 else 0
            for n in manifest.candidates(hashed):
                if n >= skip:
                    start = self.d["pos"] if (m == 0 and n == skip) else 0
                    try:
                        found += self._find(manifest.refs[n], job_id, start, mref["k"])
                    except SegmentMissing as miss:
                        missing.append(miss.key)
        unread: list[SegmentMissing | CorruptData] = []
        for s, ref in enumerate(self.d["segs"]):
            # Most loose segments do not hold it (an ack's lease is in one of
            # up to 16): ask the segment's index before working out places.
            try:
                if not self.segment(ref["k"]).positions(job_id):
                    continue
            except (SegmentMissing, CorruptData) as exc:
                unread.append(exc)  # needed only if it is nowhere else
                continue
            start = self.d["pos"] if (not self.d["mans"] and s == 0) else 0
            found += self._find(ref, job_id, start, None)
        if missing or (
            unread and not found and not (inline and any(i["id"] == job_id for i in self.d["in"]))
        ):
            if not missing and isinstance(unread[0], CorruptData):
                raise unread[0]
            missing += [exc.key for exc in unread if isinstance(exc, SegmentMissing)]
            raise SegmentMissing(missing[0], tuple(missing[1:]))
        if inline:
            found += [Place(None, 0, i) for i in self.d["in"] if i["id"] == job_id]
        return found

    def _find(self, ref: dict[str, Any], job_id: str, start: int, man: str | None) -> list[Place]:
        seg = self.segment(ref["k"])
        positions = seg.positions(job_id)
        if not positions:  # the usual answer: no holes to work out
            return []
        holes = self.holes_of(ref)
        return [
            Place(ref["k"], i, seg.items[i], man)
            for i in positions
            if i >= start and i not in holes
        ]

    def direct_ids(self) -> list[str]:
        """Ids of the objects the head names itself (manifests, loose segments)."""
        return [r["k"] for r in self.d["mans"]] + [r["k"] for r in self.d["segs"]]

    def object_ids(self) -> list[str]:
        """Ids of every object the chain references, manifested segments
        included (opens manifests)."""
        out: list[str] = []
        for mref in self.d["mans"]:
            out.append(mref["k"])
            out += [r["k"] for r in self.manifest(mref["k"]).refs]
        return out + [r["k"] for r in self.d["segs"]]

    # --- changing --------------------------------------------------------------------

    def append(self, item: Item) -> None:
        self.d["in"].append(item)
        self.d["n"] += 1

    def remove(self, place: Place) -> None:
        """Take one live item out, wherever it stands."""
        self.d["n"] -= 1
        if place.seg is None:
            inline: list[Item] = self.d["in"]
            for i, item in enumerate(inline):
                if item is place.item:
                    del inline[i]
                    return
            raise ValueError("that item is not inline in this chain")
        unit = self._unit(place)
        unit["live"] -= 1
        if place.man is None:
            unit.setdefault("holes", []).append(place.index)
        else:
            self.d["holes"].setdefault(place.seg, []).append(place.index)
        self._settle_front()
        if unit["live"] == 0:  # nothing left in it, wherever it stands: forget it
            self._forget(unit, place.man is not None)

    def _forget(self, unit: dict[str, Any], is_manifest: bool) -> None:
        units = self.d["mans"] if is_manifest else self.d["segs"]
        if not any(u is unit for u in units):
            return  # already gone with the front
        first = units[0] is unit and (is_manifest or not self.d["mans"])
        units[:] = [u for u in units if u is not unit]
        if is_manifest:
            for ref in self.manifest(unit["k"]).refs:
                self.d["holes"].pop(ref["k"], None)
        if first:
            self.d["pos"] = 0
            if is_manifest:
                self.d["mpos"] = 0
            self._settle_front()

    def pop_front(self, place: Place | None = None) -> Item | None:
        """Take the first live item out (`place`: where first() found it, if
        the caller asked already and changed nothing since)."""
        if place is None:
            place = self.first()
        if place is None:
            return None
        self.d["n"] -= 1
        if place.seg is None:
            item: Item = self.d["in"].pop(0)
            return item
        self._unit(place)["live"] -= 1
        self.d["pos"] = place.index + 1
        self._settle_front()
        return place.item

    def front_segment(self) -> tuple[dict[str, Any], list[Place]] | None:
        """The front segment's ref and its live items, in order (None when
        the chain's front is inline, or it is empty)."""
        front = self._front()
        if front is None:
            return None
        ref, man = front
        return ref, self._live(ref, man, self.d["pos"])

    def take_front_segment(self) -> dict[str, Any]:
        """The front segment leaves the chain with its live items, the object
        as it is: the loose ref another chain keeps it by (its consumed
        positions are holes there)."""
        front = self.front_segment()
        if front is None:
            raise ValueError("the chain's front is not a segment")
        ref, live = front
        for place in live:
            self.pop_front(place)
        kept = {place.index for place in live}
        moved: dict[str, Any] = {"k": ref["k"], "n": ref["n"], "live": len(live)}
        holes = [i for i in range(ref["n"]) if i not in kept]
        if holes:
            moved["holes"] = holes
        return moved

    def _unit(self, place: Place) -> dict[str, Any]:
        """The head's ref that counts `place`: its manifest's, or its own."""
        refs: list[dict[str, Any]] = self.d["segs"] if place.man is None else self.d["mans"]
        key = place.seg if place.man is None else place.man
        if refs and refs[0]["k"] == key:  # the front's: every claim's
            return refs[0]
        for ref in refs:
            if ref["k"] == key:
                return ref
        # Forgotten while it held live items: the head's live count for it was
        # short of what the segment holds (a hand-edited head).
        raise CorruptData(
            keys.head(self.topic), f"an item of {key!r} is live, but the head counts none there"
        )

    def _settle_front(self) -> None:
        """Keep the cursor tidy: holes it passed are forgotten, and front segments
        with nothing live left are dropped (manifests with them)."""
        while (front := self._front()) is not None:
            ref, man = front
            holes = self.holes_of(ref)
            pos = self.d["pos"]
            while pos < ref["n"] and pos in holes:
                pos += 1
            self.d["pos"] = pos
            if pos < ref["n"]:
                self._forget_holes_before(ref, man, pos)
                return
            self._drop_front(ref, man)

    def _front(self) -> tuple[dict[str, Any], str | None] | None:
        if self.d["mans"]:
            mref = self.d["mans"][0]
            return self.manifest(mref["k"]).refs[self.d["mpos"]], mref["k"]
        if self.d["segs"]:
            return self.d["segs"][0], None
        return None

    def _forget_holes_before(self, ref: dict[str, Any], man: str | None, pos: int) -> None:
        if man is None:
            if "holes" in ref:
                ref["holes"] = [h for h in ref["holes"] if h >= pos]
        elif ref["k"] in self.d["holes"]:
            kept = [h for h in self.d["holes"][ref["k"]] if h >= pos]
            if kept:
                self.d["holes"][ref["k"]] = kept
            else:
                del self.d["holes"][ref["k"]]

    def _drop_front(self, ref: dict[str, Any], man: str | None) -> None:
        """The front segment is used up (its live count is 0 by now)."""
        self.d["pos"] = 0
        self.d["holes"].pop(ref["k"], None)
        if man is None:
            self.d["segs"].pop(0)
            return
        self.d["mpos"] += 1
        if self.d["mpos"] >= self.d["mans"][0]["segs"]:
            self.d["mans"].pop(0)
            self.d["mpos"] = 0

    def drop_front_while(self, old: Callable[[dict[str, Any]], bool]) -> None:
        """Drop whole front manifests, then front loose segments, whose ref says
        they are old (`old(ref)`), with their items (retention)."""
        while self.d["mans"] and old(self.d["mans"][0]):
            mref = self.d["mans"].pop(0)
            self.d["n"] -= mref["live"]
            for ref in self.manifest(mref["k"]).refs:
                self.d["holes"].pop(ref["k"], None)
            self.d["pos"] = self.d["mpos"] = 0
        if self.d["mans"]:
            return
        while self.d["segs"] and old(self.d["segs"][0]):
            self.d["n"] -= self.d["segs"].pop(0)["live"]
            self.d["pos"] = 0

    def take_inline_while(self, old: Callable[[Item], bool]) -> int:
        """Drop inline items from the front while `old(item)`; how many."""
        inline: list[Item] = self.d["in"]
        cut = 0
        while cut < len(inline) and old(inline[cut]):
            cut += 1
        if cut:
            del inline[:cut]
            self.d["n"] -= cut
        return cut

    # --- sealing ----------------------------------------------------------------------

    def spill(self, seg_id: str, count: int, data: bytes, meta: dict[str, Any]) -> NewObject:
        """The first `count` inline items (whose encoding is `data`) become a new
        loose segment; `meta` goes into its ref (what it holds: bounds, say)."""
        del self.d["in"][:count]
        self.d["segs"].append({"k": seg_id, "n": count, "live": count, **meta})
        return NewObject(seg_id, data)

    def fold(
        self, man_id: str, count: int, encode: Callable[[list[dict[str, Any]]], bytes]
    ) -> NewObject:
        """The oldest `count` loose segments go under a new manifest, each with the
        id index of its items (reads them). The cursor, if it is in the first of
        them and no manifest came before, stays where it is."""
        taken = self.d["segs"][:count]
        refs = []
        for ref in taken:
            entry = {k: v for k, v in ref.items() if k != "live"}
            entry["ix"] = encode_index(i["id"] for i in self.items(ref))
            refs.append(entry)
        del self.d["segs"][:count]
        mref: dict[str, Any] = {
            "k": man_id,
            "segs": len(taken),
            "live": sum(r["live"] for r in taken),
            "total": sum(r["n"] for r in taken),
        }
        for bound, pick in (("lo", min), ("hi", max)):
            values = [r[bound] for r in taken if bound in r]
            if values:
                mref[bound] = pick(values)
        self.d["mans"].append(mref)
        return NewObject(man_id, encode(refs))

    def rewrite_manifest(
        self, index: int, man_id: str, encode: Callable[[list[dict[str, Any]]], bytes]
    ) -> NewObject | None:
        """Write manifest `index` again with the holes kept for its segments in
        the head, leaving out segments (and the consumed ones of the first) that
        hold nothing live any more. None when nothing of it is live: it is gone."""
        return self.merge_manifests(index, 1, man_id, encode)

    def merge_manifests(
        self,
        index: int,
        count: int,
        man_id: str,
        encode: Callable[[list[dict[str, Any]]], bytes],
    ) -> NewObject | None:
        """Write manifests `index` .. `index + count - 1` again as one, with the
        holes kept for their segments in the head, leaving out segments that hold
        nothing live (and the consumed ones of the first manifest). None when
        nothing of them is live: they are gone."""
        mrefs = self.d["mans"][index : index + count]
        refs = []
        for m, mref in enumerate(mrefs):
            first_manifest = index == 0 and m == 0
            start = self.d["mpos"] if first_manifest else 0
            for n, ref in enumerate(self.manifest(mref["k"]).refs[start:]):
                holes = sorted(self.holes_of(ref))
                self.d["holes"].pop(ref["k"], None)
                first = first_manifest and n == 0
                consumed = self.d["pos"] if first else 0
                live = ref["n"] - consumed - len([h for h in holes if h >= consumed])
                if live <= 0 and not first:
                    continue
                entry = {k: v for k, v in ref.items() if k != "holes"}
                if holes:
                    entry["holes"] = holes
                refs.append(entry)
        if index == 0:
            self.d["mpos"] = 0
        merged: dict[str, Any] = {
            "k": man_id,
            "segs": len(refs),
            "live": sum(m["live"] for m in mrefs),
            "total": sum(m.get("total", 0) for m in mrefs),
        }
        for bound, pick in (("lo", min), ("hi", max)):
            values = [m[bound] for m in mrefs if bound in m]
            if values:
                merged[bound] = pick(values)
        self.d["mans"][index : index + count] = [merged] if refs else []
        return NewObject(man_id, encode(refs)) if refs else None


def locate_first(
    chains: Sequence[Chain],
    job_ids: Iterable[str],
    inline: bool = True,
    ends: Mapping[str, int] | None = None,
) -> dict[str, list[Place]]:
    """Each of `job_ids` looked for (Chain.locate) in `chains` in turn, as far
    as the first that holds it: its live items there by id ([]: none holds
    it). An id in `ends` is looked for in the chains before chains[ends[id]]
    only (the caller finds it there, out of any chain: a lane's inline jobs).

    The objects those look-ups lack, in every chain up to where each id is
    found, are asked for at once, one SegmentMissing naming them all (exact:
    those, nothing read ahead), so that many ids cost a fetch round or two,
    not one each (1,000 ids spread over a deep topic took past the
    committer's 64). A chain past where an id is found is not looked in:
    a bad object there fails no look-up that does not reach it (SPEC 4.1; a
    corrupt segment of a pending run failed the cancel of a claimed job)."""
    found: dict[str, list[Place]] = {}
    missing: dict[str, None] = {}
    for job_id in job_ids:
        if job_id in found:
            continue
        found[job_id] = []
        lacking = False  # an earlier chain may hold it: known once its objects are read
        for chain in chains[: len(chains) if ends is None else ends.get(job_id, len(chains))]:
            try:
                places = chain.locate(job_id, inline)
            except SegmentMissing as miss:
                missing.update(dict.fromkeys((miss.key, *miss.also)))
                lacking = True
                continue
            except CorruptData:
                if lacking:
                    break
                raise
            if places:
                found[job_id] = places
                break
    if missing:
        first, *rest = missing
        raise SegmentMissing(first, tuple(rest), exact=True)
    return found
