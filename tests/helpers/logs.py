"""Waiting for a log record: an event set once one says some words."""

from __future__ import annotations

import asyncio
import logging


class Said(logging.Handler):
    """Sets `said` once a record with `words` in its message is logged."""

    def __init__(self, words: str) -> None:
        super().__init__()
        self.words = words
        self.said = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.said.set()
