"""Markdown for bench/run.py: tables, numbers, targets and the machine a run ran on."""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.servers import REPO


@dataclass
class Target:
    """One aim of issue 8 and how this run did against it."""

    name: str
    wanted: str
    got: str
    met: bool | None  # None: not measured in this run

    def line(self) -> str:
        verdict = {True: "**met**", False: "**missed**", None: "not measured"}[self.met]
        return f"| {self.name} | {self.wanted} | {self.got} | {verdict} |"


@dataclass
class Section:
    """One part's markdown: a title, tables and notes, and its targets."""

    title: str
    lines: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join([f"## {self.title}", "", *self.lines, ""])


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def num(x: float, digits: int = 0) -> str:
    """A throughput or count: thousands separated."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def ms(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def ratio(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}x"


def pct(share: float) -> str:
    """A CPU share (1.0 = one core) as a percentage of one core."""
    return "-" if math.isnan(share) else f"{100 * share:.0f}%"


def targets_table(targets: list[Target]) -> list[str]:
    return [
        "| target | wanted | this run | |",
        "|---|---|---|---|",
        *(t.line() for t in targets),
    ]


def machine() -> list[str]:
    """What the run ran on, as markdown list items."""
    model = "unknown"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    for line in cpuinfo:
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no")
    dirty = " (plus uncommitted changes)" if changed else ""
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = psutil.virtual_memory().total / 2**30
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- date: {now}",
        f"- nproc: {nproc}; CPU: {model}; RAM: {ram:.1f} GiB",
        f"- python: {platform.python_implementation()} {platform.python_version()}; "
        f"{platform.system()} {platform.release()}",
        f"- commit: {commit}{dirty}",
        f"- load average when the report was written: {load}",
    ]
