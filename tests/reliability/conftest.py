"""Campaign settings: a short run under bin/test, a long one under
`bin/test --long` (SIMPLEQUEUE_LONG=1). Each campaign appends its figures to
test-artifacts/reliability.jsonl, from which docs/RELIABILITY.md is written."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

LONG = os.environ.get("SIMPLEQUEUE_LONG") == "1"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture
def scale() -> int:
    """How much bigger the long campaign is."""
    return 10 if LONG else 1


@pytest.fixture
def record_figures(request: pytest.FixtureRequest) -> Callable[[dict[str, Any]], None]:
    def record(figures: dict[str, Any]) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        line = {"test": request.node.nodeid, "long": LONG, "at": time.time(), **figures}
        with (ARTIFACTS / "reliability.jsonl").open("ab") as f:
            f.write(orjson.dumps(line) + b"\n")

    return record
