"""What the SDK takes as a list (job ids, jobs, follow-ups), made one here. A
str, bytes or dict is an Iterable to mypy too, and iterated it is a job an
item of each character or key: q.cancel("17") cancelled jobs "1" and "7". One
of them is refused (InvalidRequest), never iterated.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from simplequeue.errors import InvalidRequest

T = TypeVar("T")


def as_list(items: Iterable[T], what: str, one: str) -> list[T]:
    """`items` as a list; InvalidRequest for a str, bytes or dict, saying
    `what` is wanted and how to give `one` item."""
    if isinstance(items, str | bytes | dict):
        raise InvalidRequest(f"{what}, not a {type(items).__name__}: {one} for one")
    return list(items)


def id_list(job_ids: Iterable[str]) -> list[str]:
    """Job ids, as cancel(), requeue() and purge() take them."""
    return as_list(job_ids, "job ids are a list of ids", '["17"]')


def job_list(jobs: Iterable[T]) -> list[T]:
    """Jobs to enqueue, as enqueue_many() takes them."""
    return as_list(jobs, "jobs are a list of jobs", '[payload] or [{"payload": ...}]')
