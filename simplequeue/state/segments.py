"""The immutable objects a topic's head refers to: segments (items in order) and
manifests (lists of segment references with a compact id index for each), their
encoding, and the view through which the state machine reads them.

The state machine never fetches anything: when it needs an object that is not
in the view, it raises SegmentMissing(key), and the committer fetches the
object and applies the batch again. Objects never change once written, so a
cached one never goes stale.
"""

from __future__ import annotations

import array
import base64
import bisect
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from simplequeue.errors import CorruptData
from simplequeue.state.schema import check_items, check_manifest

FORMAT = 2
READABLE_FORMATS = (1, 2)  # segments written by format 1 are read as they are


class SegmentMissing(Exception):
    """The state machine needs an object (segment or manifest) that the caller
    has not loaded yet."""

    def __init__(self, key: str, also: tuple[str, ...] = (), exact: bool = False) -> None:
        super().__init__(key)
        self.key = key
        self.also = also  # other objects it will need: fetched in the same round
        # Fetch these only, nothing read ahead: the reader named all it wants
        # (a bounded listing, which must not fill the cache with more).
        self.exact = exact


# --- the id index -------------------------------------------------------------------


def id_hash(job_id: str) -> int:
    """32 bits of a job id's BLAKE2b hash: what id indexes hold."""
    return int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=4).digest(), "big")


def encode_index(ids: Iterable[str]) -> str:
    """The sorted 32-bit hashes of `ids`, as base64: 4 bytes an id (5.3 in text)."""
    hashes = array.array("I", sorted(id_hash(i) for i in ids))
    if hashes.itemsize != 4:  # pragma: no cover - every platform we run on
        raise RuntimeError("array('I') is not 32 bits here")
    return base64.b64encode(hashes.tobytes()).decode()


def decode_index(text: str) -> array.array[int]:
    hashes = array.array("I")
    hashes.frombytes(base64.b64decode(text))
    return hashes


# --- decoded objects ------------------------------------------------------------------


@dataclass
class Segment:
    """A segment's items, and where each id stands in it."""

    key: str
    items: list[Any]
    size: int  # bytes as stored
    _where: dict[str, list[int]] | None = None

    def positions(self, job_id: str) -> list[int]:
        if self._where is None:
            where: dict[str, list[int]] = {}
            for i, item in enumerate(self.items):
                where.setdefault(item["id"], []).append(i)
            self._where = where
        return self._where.get(job_id, [])


@dataclass
class Manifest:
    """A manifest's segment references and, over all of them, the id index as
    one sorted array of (hash << 16 | segment number within the manifest)."""

    key: str
    refs: list[dict[str, Any]]
    size: int
    _index: array.array[int] | None = field(default=None, repr=False)

    def candidates(self, hashed: int) -> list[int]:
        """Which of this manifest's segments may hold the id whose id_hash is
        `hashed` (a false positive is rare: the caller reads the segment to be
        sure)."""
        if self._index is None:
            merged = array.array("Q")
            for n, ref in enumerate(self.refs):
                merged.extend((h << 16) | n for h in decode_index(ref["ix"]))
            self._index = array.array("Q", sorted(merged))
        index, h = self._index, hashed << 16
        lo = bisect.bisect_left(index, h)
        if lo == len(index) or index[lo] >= h + (1 << 16):
            return []  # the usual answer (a new id): one bisection, no slice
        hi = bisect.bisect_left(index, h + (1 << 16), lo)
        return sorted({v & 0xFFFF for v in index[lo:hi]})


def encode_segment(kind: str, items: list[Any]) -> bytes:
    return orjson.dumps({"format": FORMAT, "kind": kind, "items": items})


def encode_manifest(refs: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"format": FORMAT, "kind": "m", "segs": refs})


def _parse(key: str, data: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptData(key, f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CorruptData(key, "not a simplequeue object")
    version = obj.get("format")
    if version not in READABLE_FORMATS:
        raise CorruptData(key, f"format {version!r}, which this broker cannot read")
    return obj


def kind_of(key: str) -> str:
    """A segment's kind, from its key: seg-<kind><n>-... (seg-p0-..., seg-r-... in
    format 1)."""
    name = key.rsplit("/", 1)[-1]
    return name[4:5] if name.startswith("seg-") else ""


def decode_segment(key: str, data: bytes, *, check: bool = True) -> Segment:
    obj = _parse(key, data)
    items = obj.get("items")
    if not isinstance(items, list):
        raise CorruptData(key, "not a segment")
    if check:
        check_items(key, kind_of(key), items)
    return Segment(key, items, len(data))


def decode_object(key: str, data: bytes, *, check: bool = True) -> Segment | Manifest:
    """A segment or a manifest, whichever its key names. Without `check`, its
    items are not validated: for bytes this process has just encoded itself
    (a seal's new objects), whose shape the state machine made."""
    if kind_of(key) == "m":
        return decode_manifest(key, data, check=check)
    return decode_segment(key, data, check=check)


def decode_manifest(key: str, data: bytes, *, check: bool = True) -> Manifest:
    obj = _parse(key, data)
    refs = obj.get("segs")
    if obj.get("kind") != "m" or not isinstance(refs, list):
        raise CorruptData(key, "not a manifest")
    if check:
        check_manifest(key, refs)
    return Manifest(key, refs, len(data))


def as_ref_says(manifest: Manifest, segs: int) -> Manifest:
    """`manifest`, whose ref in the head says it holds `segs` segments:
    CorruptData unless it does (it is not the one the head wrote: restored
    from another backup, cut short by a tool)."""
    if len(manifest.refs) != segs:
        raise CorruptData(
            manifest.key, f"it holds {len(manifest.refs)} segments, the head says {segs}"
        )
    return manifest


class SegmentView(Protocol):
    """What the state machine reads immutable objects through."""

    def segment(self, key: str) -> Segment:
        """The segment, or raise SegmentMissing."""

    def manifest(self, key: str) -> Manifest:
        """The manifest, or raise SegmentMissing."""


class Loaded:
    """A SegmentView over objects held in a dict: for tests, and the committer's
    cache, which adds fetching and a byte budget on top."""

    def __init__(self) -> None:
        self.objects: dict[str, Segment | Manifest] = {}

    def add(self, obj: Segment | Manifest) -> None:
        self.objects[obj.key] = obj

    def segment(self, key: str) -> Segment:
        obj = self.objects.get(key)
        if not isinstance(obj, Segment):
            raise SegmentMissing(key)
        return obj

    def manifest(self, key: str) -> Manifest:
        obj = self.objects.get(key)
        if not isinstance(obj, Manifest):
            raise SegmentMissing(key)
        return obj
