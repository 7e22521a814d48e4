"""Work a broker starts and does not wait for (giving back claims whose caller
left): a task referenced until it is done, so that it is not collected
half-way."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

_running: set[asyncio.Task[Any]] = set()


def in_background(work: Coroutine[Any, Any, Any]) -> None:
    """Run `work` in a task of its own, kept until it ends."""
    task = asyncio.get_running_loop().create_task(work)
    _running.add(task)
    task.add_done_callback(_running.discard)
