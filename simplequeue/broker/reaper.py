"""The reaper: returns expired leases to pending in every topic, and now and then
sweeps orphan segments, through the Engine like every other caller.

It is a supervisor loop: a topic that fails is logged and skipped (the Engine
isolates it), a failed round is logged, and the loop goes on until cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from simplequeue.broker.engine import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReaperSettings:
    reap_interval: float = 1.0  # seconds between reaps of every topic
    topic_scan_interval: float = 10.0  # seconds between listings of the store's topics
    sweep_interval: float = 600.0  # seconds between sweeps of orphan segments


class Reaper:
    """Reaps the topics in the store (listed now and then) and those this broker
    has touched since."""

    def __init__(self, engine: Engine, settings: ReaperSettings) -> None:
        self.engine = engine
        self.settings = settings
        self._listed: list[str] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        listed_at, swept_at = -1e18, loop.time()
        while True:
            try:
                if loop.time() - listed_at >= self.settings.topic_scan_interval:
                    self._listed = await self.engine.topic_names()
                    listed_at = loop.time()
                topics = sorted({*self._listed, *self.engine.known_topics()})
                await self.engine.reap_all(topics)
                if loop.time() - swept_at >= self.settings.sweep_interval:
                    swept_at = loop.time()
                    await self.engine.sweep_all(topics)
            except Exception:
                log.exception(
                    "reaper: round failed; next round in %.1f s", self.settings.reap_interval
                )
            await asyncio.sleep(self.settings.reap_interval)
