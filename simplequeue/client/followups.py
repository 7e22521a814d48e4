"""Follow-up jobs as the SDK takes them (SPEC 9): `Done`, what a Worker handler
returns to ack with follow-ups, and the specs an ack carries, checked here so
that a bad one fails its own ack, not a batch of them at the broker's edge.

An enqueue item is a payload (a job for the acked job's topic) or a dict with
"payload" and optional "topic", "id", "priority", "delay" or "run_at" (Unix
seconds, or a datetime), "max_attempts", as `Client.enqueue_many` takes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from simplequeue import api
from simplequeue.client.lists import as_list
from simplequeue.errors import InvalidRequest


@dataclass(frozen=True)
class Done:
    """A Worker handler's return value that acks its job with `result` and
    enqueues `enqueue` (payloads, or dicts with "payload" and optional "topic",
    "id", "priority", "delay" or "run_at", "max_attempts") with the ack, in the
    same commit.
    Any other return value is the result, with nothing enqueued."""

    result: Any = None
    enqueue: Sequence[Any] = ()


def follow_up_specs(items: Iterable[Any] | None) -> list[api.FollowUpSpec] | None:
    """The follow-ups an ack carries, validated as the broker validates them
    (InvalidRequest saying which and why), or None for none. Without an id the
    broker derives one from the acked job's, so a retried ack is a duplicate."""
    if items is None:
        return None
    listed = as_list(items, "follow-ups are a list of jobs", '[payload] or [{"payload": ...}]')
    specs = [_spec(item, n) for n, item in enumerate(listed)]
    if len(specs) > api.MAX_BATCH:
        raise InvalidRequest(
            f"{len(specs)} follow-up jobs: an ack may enqueue at most {api.MAX_BATCH}"
        )
    return specs or None


def _spec(item: Any, index: int) -> api.FollowUpSpec:
    if isinstance(item, api.FollowUpSpec):
        return item
    return job_spec(item, api.FollowUpSpec, f"follow-up {index}")


S = TypeVar("S", bound=api.JobSpec)


def job_spec(item: Any, kind: type[S], what: str) -> S:
    """An enqueue item as `kind`: a payload, or a dict with "payload" and the
    job's other fields, checked strictly (InvalidRequest, naming `what`)."""
    if not (isinstance(item, dict) and "payload" in item):
        return kind(item)
    if isinstance(item.get("run_at"), datetime):
        item = {**item, "run_at": unix_time(item["run_at"])}
    try:
        return api.convert(item, kind)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{what}: {exc}") from None


def unix_time(when: float | datetime | None) -> float | None:
    """A job's `run_at` as the API takes it: Unix seconds (a naive datetime is
    local time, as datetime.timestamp() takes it)."""
    return when.timestamp() if isinstance(when, datetime) else when
