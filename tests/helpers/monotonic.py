"""A module's monotonic clock moved by the test: liveness judged over leases
(membership, broker.json) is tested without waiting for one to run out."""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

import pytest


class MovedClock:
    """Stands in for the `time` module: monotonic() is `t`, which the test
    moves; the rest is the real module's."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def moved_clock(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> MovedClock:
    """`module`'s time.monotonic() made a MovedClock (asyncio's own clock, and
    every other module's, left alone)."""
    clock = MovedClock()
    monkeypatch.setattr(module, "time", clock)
    return clock
