"""Write docs/RELIABILITY.md from test-artifacts/reliability.jsonl (the figures
each campaign recorded). Run: python -m tests.reliability.report"""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = [
    "operations",
    "enqueued",
    "claims",
    "acked",
    "nacked",
    "abandoned_claims",
    "stale_acks_tried",
    "indeterminate",
    "faults",
    "kills",
    "expired",
    "bad_inputs",
    "lost",
    "double_committed",
]

# Figures of campaigns that check more than the columns say (the control
# campaign: cancellation, limits, schedules), listed under the table.
DETAILS = [
    "cancels_sent",
    "cancelled",
    "cancelled_while_held",
    "cancel_not_found_judged",
    "cancels_replayed",
    "max_claimed",
    "max_claimed_seen",
    "held_at_once_certain",
    "rate",
    "rate_worst_share",
    "slots_fired",
    "slots_missed",
    "longest_gap",
]

INTRO = (Path(__file__).parent / "intro.md").read_text()  # what is checked, and how


def main() -> None:
    source = ROOT / "test-artifacts" / "reliability.jsonl"
    rows: dict[str, dict[str, Any]] = {}
    for line in source.read_bytes().splitlines():
        figures = orjson.loads(line)
        rows[figures["test"]] = figures  # the latest run of each campaign
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    longest = any(r.get("long") for r in rows.values())
    out = [
        INTRO,
        f"## Last run ({'long' if longest else 'short'} form)\n",
        f"Commit {commit}, {time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{len(rows)} campaigns.\n",
        "| scenario | backend | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    totals = dict.fromkeys(COLUMNS, 0)
    for r in rows.values():
        cells = []
        for c in COLUMNS:
            value = r.get(c)
            cells.append("" if value is None else f"{value:,}")
            totals[c] += value or 0
        out.append(
            f"| {r.get('scenario', r['test'])} | {r.get('backend', '')} | "
            + " | ".join(cells)
            + " |"
        )
    out.append("| **all** | | " + " | ".join(f"**{totals[c]:,}**" for c in COLUMNS) + " |")
    out.append("")
    out.append(
        "Columns: operations = HTTP requests the load sent; indeterminate = answers "
        "lost or 503 (retried, and checked at the end); faults = store faults "
        "injected; kills = SIGKILLs; expired = records gone when read back at the "
        "end, rightly: their first ack was sent longer than the retention before; "
        "bad inputs = requests or frames that had to be refused.\n"
    )
    for r in rows.values():
        shown = [f"{c.replace('_', ' ')} {r[c]:,}" for c in DETAILS if c in r]
        if shown:
            out.append(
                f"- {r.get('scenario', r['test'])} ({r.get('backend', '')}): {', '.join(shown)}"
            )
    out.append("")
    (ROOT / "docs" / "RELIABILITY.md").write_text("\n".join(out))


if __name__ == "__main__":
    main()
