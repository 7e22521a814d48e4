"""Every storage key simplequeue reads or writes, in one place.

Keys are relative to the store's root (an S3 prefix or a directory). Topic names
are validated here before they can become part of a key.
"""

from __future__ import annotations

import functools
import re

from simplequeue.errors import InvalidRequest

BROKER = "broker.json"
BROKERS_PREFIX = "brokers/"
TOPICS_PREFIX = "topics/"
HEAD_SUFFIX = ".json"

TOPIC_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
BROKER_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_topic(topic: str) -> str:
    """Return `topic` if it is a valid name, else raise InvalidRequest."""
    if not isinstance(topic, str) or not TOPIC_RE.fullmatch(topic):
        raise InvalidRequest("topic names are 1-128 characters of [A-Za-z0-9_-]")
    return topic


def head(topic: str) -> str:
    """The head object of a topic: counters, cursors, claimed set, inline tail."""
    return f"{TOPICS_PREFIX}{check_topic(topic)}{HEAD_SUFFIX}"


def segment(topic: str, segment_id: str) -> str:
    """An immutable segment object that a topic's head references."""
    return f"{segments_prefix(topic)}seg-{segment_id}.json"


@functools.lru_cache(maxsize=4096)
def segments_prefix(topic: str) -> str:
    """The prefix under which every segment of a topic lives. Cached: segment
    keys are made on every lookup, and the name need be checked once."""
    return f"{TOPICS_PREFIX}{check_topic(topic)}/"


def topic_of_head(key: str) -> str | None:
    """The topic whose head is `key`, or None when `key` is not a head key."""
    if not key.startswith(TOPICS_PREFIX) or not key.endswith(HEAD_SUFFIX):
        return None
    name = key[len(TOPICS_PREFIX) : -len(HEAD_SUFFIX)]
    return name if TOPIC_RE.fullmatch(name) else None


def topic_of_folder(prefix: str) -> str | None:
    """The topic whose segments live under `prefix`, or None when it is no
    topic's folder."""
    if not prefix.startswith(TOPICS_PREFIX) or not prefix.endswith("/"):
        return None
    name = prefix[len(TOPICS_PREFIX) : -1]
    return name if TOPIC_RE.fullmatch(name) else None


def check_broker_id(broker_id: str) -> str:
    """Return `broker_id` if it can name a registration, else raise InvalidRequest."""
    if not BROKER_ID_RE.fullmatch(broker_id):
        raise InvalidRequest(
            "broker ids are 1-128 characters of [A-Za-z0-9_.-], not starting with . or -"
        )
    return broker_id


def registration(broker_id: str) -> str:
    """A broker's record in the registry (SPEC 4.3)."""
    return f"{BROKERS_PREFIX}{check_broker_id(broker_id)}.json"


def broker_of(key: str) -> str | None:
    """The broker whose registration is `key`, or None."""
    if not key.startswith(BROKERS_PREFIX) or not key.endswith(HEAD_SUFFIX):
        return None
    name = key[len(BROKERS_PREFIX) : -len(HEAD_SUFFIX)]
    return name if BROKER_ID_RE.fullmatch(name) else None
