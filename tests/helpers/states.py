"""Topic states for tests of the state machine: settings from one set of
keyword arguments, an in-memory object view, and a seal-then-reread step that
does what a write and a re-read by another broker would."""

from __future__ import annotations

import dataclasses
from typing import Any

from simplequeue import keys
from simplequeue.state import (
    Bounds,
    Loaded,
    Manifest,
    Policy,
    Segment,
    TopicState,
    decode_head,
    decode_manifest,
    decode_object,
    decode_segment,
    new_head,
)

WRITER = {"broker_id": "b", "epoch": 1}


def assert_held_as_written(held: Segment | Manifest, key: str, data: bytes) -> None:
    """`held`, an object kept in memory, is what its bytes `data` decode to,
    types included (repr: 1 is not 1.0, a tuple is not a list)."""
    stored = decode_object(key, data)
    if isinstance(held, Segment):
        assert isinstance(stored, Segment) and repr(held.items) == repr(stored.items), key
    else:
        assert isinstance(stored, Manifest) and repr(held.refs) == repr(stored.refs), key


def configured(**limits: Any) -> tuple[Bounds, Policy]:
    """Bounds and Policy from keyword arguments naming fields of either."""
    bound_fields = {f.name for f in dataclasses.fields(Bounds)}
    bounds = Bounds(**{k: v for k, v in limits.items() if k in bound_fields})
    policy = Policy(**{k: v for k, v in limits.items() if k not in bound_fields})
    return bounds, policy


class View(Loaded):
    """Every object written so far, decoded, as a store holds them."""

    def put(self, key: str, data: bytes) -> None:
        is_manifest = key.rsplit("/", 1)[-1].startswith("seg-m")
        self.add(decode_manifest(key, data) if is_manifest else decode_segment(key, data))


def fresh(topic: str = "t", view: View | None = None, **limits: Any) -> TopicState:
    return TopicState(new_head(topic), view or View(), *configured(**limits))


def reread(state: TopicState, now: float, write: int = 0) -> TopicState:
    """Seal `state`, keep its new objects, and read it back from the head's bytes
    into a new state over the same objects."""
    sealed = state.seal(WRITER, f"{write:012d}-w{now}", now)
    view = state.view
    assert isinstance(view, View)
    for key, data in sealed.new_objects.items():
        assert key.startswith(keys.segments_prefix(state.topic))
        view.put(key, data)
    head = decode_head(state.topic, keys.head(state.topic), sealed.head)
    return TopicState(head, view, state.bounds, state.policy)


def seal(state: TopicState, write_id: str, now: float) -> None:
    """Seal `state` and keep its new objects, going on with the same state (as
    the committer does after a write lands)."""
    sealed = state.seal(WRITER, write_id, now)
    view = state.view
    assert isinstance(view, View)
    for key, data in sealed.new_objects.items():
        view.put(key, data)
