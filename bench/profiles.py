"""Where a broker spent its time: summaries of the pyinstrument profiles that
`bin/bench --profile` takes of the brokers of parts 1, 3 and 5.

pyinstrument samples the event-loop thread's wall clock: time waiting in epoll is
idle, everything else is the loop being busy (or preempted, on a busy machine).
Under uvloop (the broker's loop where it is installed) the loop is C code that
pyinstrument cannot see into: its epoll waits, socket calls and callback
dispatch all show as the self time of asyncio's Runner.run, so idle cannot be
told from that work, and "busy" then includes the idle time.
"""

from __future__ import annotations

import pstats
from collections import Counter
from pathlib import Path

from bench.report import Section, table

#: Which area a function belongs to, by the first matching piece of its file path.
AREAS = (
    ("asyncio/runners.py", "uvloop's loop, in C (socket I/O, callbacks; and idle)"),
    ("prometheus_client/", "prometheus-client (metrics)"),
    ("aiohttp/", "aiohttp"),
    ("asyncio/", "asyncio"),
    ("simplequeue/broker/http.py", "simplequeue HTTP handlers and middlewares"),
    ("simplequeue/broker/metrics.py", "simplequeue metrics"),
    ("simplequeue/state/", "simplequeue topic state machine"),
    ("simplequeue/groupcommit.py", "simplequeue group committer"),
    ("simplequeue/", "simplequeue, other"),
)


def _short(path: str) -> str:
    for marker in ("site-packages/", "python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def summarize(path: Path, top: int = 15) -> list[str]:
    stats = pstats.Stats(str(path))
    rows = []
    for (filename, line, name), (_, _, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tottime, cumtime, f"{_short(filename)}:{line}({name})", filename))
    idle = sum(t for t, _, name, _ in rows if "epoll.poll" in name)
    busy = sum(t for t, _, _, _ in rows) - idle
    areas: Counter[str] = Counter()
    for tottime, _, name, filename in rows:
        if "epoll.poll" in name:
            continue
        area = next((a for marker, a in AREAS if marker in filename), "builtins and other")
        if name.startswith("~") or filename.startswith("<built-in>") or filename == "~":
            area = "C builtins (socket, orjson, ...)"
        areas[area] += tottime
    lines = [
        f"### {path.stem}",
        "",
        f"event loop busy {busy:.2f} s, idle {idle:.2f} s",
        "",
        *table(
            ["area (self time)", "s", "% of busy"],
            [[a, f"{t:.2f}", f"{100 * t / busy:.1f}"] for a, t in areas.most_common()],
        ),
        "",
    ]
    busiest = sorted((r for r in rows if "epoll.poll" not in r[2]), reverse=True)[:top]
    lines += table(
        ["function", "self s", "cumulative s", "% of busy (self)"],
        [[name, f"{t:.3f}", f"{c:.3f}", f"{100 * t / busy:.1f}"] for t, c, name, _ in busiest],
    )
    return [*lines, ""]


def summaries(directory: Path) -> Section:
    section = Section("Profiles (pyinstrument, event-loop thread)")
    files = sorted(directory.glob("*.pstats")) if directory.is_dir() else []
    if not files:
        section.lines.append("no profiles were written")
    for path in files:
        section.lines += summarize(path)
    return section
