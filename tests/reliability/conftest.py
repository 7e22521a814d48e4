"""Campaign settings: a short run under bin/test, a long one under
`bin/test --long` (SIMPLEQUEUE_LONG=1). Each campaign appends its figures to
test-artifacts/reliability.jsonl, from which docs/RELIABILITY.md is written."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import BrokerProcess

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


@pytest.fixture
async def broker_process(
    broker_process: Callable[..., BrokerProcess],
) -> AsyncIterator[Callable[..., BrokerProcess]]:
    """The suite's broker_process, whose brokers are stopped here, together
    and while the event loop runs. On S3 a campaign's brokers reach the store
    through a proxy served on this loop, and a broker told to stop lands its
    in-flight writes and resigns through it. Stopped from the synchronous
    teardown, with the loop idle, each waited out its 15 s and was killed:
    one campaign's teardown took 105 s of a 15-minute suite."""
    started: list[BrokerProcess] = []

    def start(*args: str, **kwargs: Any) -> BrokerProcess:
        started.append(broker_process(*args, **kwargs))
        return started[-1]

    yield start
    await asyncio.gather(*(asyncio.to_thread(b.stop) for b in started))
