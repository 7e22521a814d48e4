"""Every exception simplequeue raises on purpose, in one small tree.

    SimpleQueueError
    ├── StoreError              the object store failed in a way callers can act on
    │   ├── PreconditionFailed  a conditional write lost its race (stale ETag, key exists)
    │   ├── ObjectNotFound      the key does not exist
    │   └── StoreUnavailable    the store did not answer; bounded retries are spent
    ├── InvalidRequest          bad input; nothing was changed                 -> 400
    ├── JobNotFound             no such job in the topic                       -> 404
    ├── LeaseLost               stale lease token, or the job is not claimed   -> 409
    ├── Contended               a commit kept losing races until its budget ran out -> 503
    ├── Unauthorized            missing or wrong bearer token                  -> 401
    └── BrokerUnavailable       (client side) no broker answered after retries and re-discovery

The HTTP and RESP layers map each class to one status or RESP error in one table.
"""

from __future__ import annotations


class SimpleQueueError(Exception):
    """Base class of every error simplequeue raises on purpose."""


class StoreError(SimpleQueueError):
    """The object store could not do what was asked."""


class PreconditionFailed(StoreError):
    """A conditional write lost: the ETag moved, or a create-only key exists."""


class ObjectNotFound(StoreError):
    """The key does not exist in the store."""


class StoreUnavailable(StoreError):
    """The store did not answer (outage, timeouts, throttling) after bounded retries."""


class InvalidRequest(SimpleQueueError):
    """The request is malformed or out of range; nothing was changed."""


class JobNotFound(SimpleQueueError):
    """The topic has no job (live or retained) with that id."""


class LeaseLost(SimpleQueueError):
    """The caller does not hold the claim: stale lease token, or the job is not claimed."""


class Contended(SimpleQueueError):
    """A commit kept losing compare-and-set races until its time budget was spent."""


class Unauthorized(SimpleQueueError):
    """The broker wants a bearer token and did not get the right one."""


class BrokerUnavailable(SimpleQueueError):
    """No broker answered (client side), after retries and re-discovery."""
