"""Heads of earlier formats, upgraded in memory to the current one (format 2).

The upgraded head is written in format 2 by the next batch; segments written
by format 1 are read as they are (their items have the same shape), so an
upgrade rewrites nothing but the head. docs/STORAGE.md describes both formats.
"""

from __future__ import annotations

from typing import Any

SEG_PREFIX = "seg-"


def _seg_id(key: str) -> str:
    """A format-1 ref names a segment by key; format 2 by id (keys.segment)."""
    name = key.rsplit("/", 1)[-1]
    assert name.startswith(SEG_PREFIX) and name.endswith(".json"), key
    return name[len(SEG_PREFIX) : -len(".json")]


def upgrade(head: dict[str, Any]) -> dict[str, Any]:
    """A format-1 head as a format-2 one (a new dict; the old one is untouched)."""
    if head.get("format") != 1:
        return head
    lanes = {}
    for priority, lane in head["lanes"].items():
        runs = []
        for run in lane["runs"]:
            live = run["n"] - run["pos"]
            # Bounds are unknown without reading the segment: none are claimed,
            # so counting reads it, and nothing is appended after it.
            ref = {"k": _seg_id(run["key"]), "n": run["n"], "live": live}
            runs.append(_chain([ref], live, pos=run["pos"]) | {"last": [1e300, 0]})
        lanes[priority] = {"in": lane["inline"], "runs": runs}
    claimed = list(head["claimed"].values())
    retained = head["retained"]
    retained_refs = [
        {"k": _seg_id(s["key"]), "n": s["n"], "live": s["n"], "hi": s["newest"]}
        for s in retained["segs"]
    ]
    dead = head["dead"]
    dead_refs = [
        {"k": _seg_id(s["key"]), "n": s["n"], "live": s["n"] - s["pos"]} for s in dead["segs"]
    ]
    dead_pos = dead["segs"][0]["pos"] if dead["segs"] else 0
    counters = dict(head["counters"])
    counters.setdefault("nacked", 0)
    return {
        "format": 2,
        "topic": head["topic"],
        "writer": head.get("writer"),
        "write_id": head.get("write_id"),
        "writers": {},
        "seq": head["seq"],
        "next": 0,
        "counters": counters,
        "lanes": lanes,
        "leases": _chain([], 0, inline=claimed),
        "retained": _chain(
            retained_refs,
            sum(r["live"] for r in retained_refs),
            inline=retained["inline"],
        ),
        "dead": _chain(
            dead_refs, sum(r["live"] for r in dead_refs), inline=dead["inline"], pos=dead_pos
        ),
    }


def _chain(
    refs: list[dict[str, Any]], live: int, inline: list[Any] | None = None, pos: int = 0
) -> dict[str, Any]:
    inline = inline or []
    return {
        "n": live + len(inline),
        "in": inline,
        "segs": refs,
        "mans": [],
        "mpos": 0,
        "pos": pos,
        "holes": {},
    }
