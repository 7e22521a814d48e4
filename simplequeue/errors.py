"""Every exception simplequeue raises on purpose, in one small tree, each class
with the HTTP status and the RESP error code it is answered with.

    SimpleQueueError                                              HTTP  RESP      batch ack
    ├── StoreError          the object store failed               503   TRYAGAIN
    │   ├── PreconditionFailed  a conditional write lost its race
    │   ├── ObjectNotFound      the key does not exist
    │   ├── StoreUnavailable    the store did not answer; bounded retries are spent
    │   │   ├── StoreRefused    the store said no, and would again (access denied)
    │   │   │   └── StoreUnusable   not a store to serve from as it is (no such bucket)
    │   │   ├── AmbiguousWrite  a conditional write got no answer: it may have landed
    │   │   ├── CacheTooSmall   a read or batch needs more objects than the cache holds
    │   │   └── NotDurable      a write is in place but could not be made durable
    │   └── StorageFull         no room left (a full disk)                 507   ERR
    ├── InvalidRequest      bad input; nothing was changed        400   ERR       invalid
    │   ├── RefusedByTopic      refused for what the topic holds now 400 ERR     invalid
    │   └── PayloadTooLarge     a request over --max-body         413   ERR       invalid
    ├── JobNotFound         no such job in the topic              404   ERR       not_found
    ├── ScheduleNotFound    no such schedule in the topic         404   ERR
    ├── NothingToClaim      no job is claimable (after the wait)  404   (nil)
    ├── RouteNotFound       no route of the API at that path      404   ERR
    ├── LeaseLost           stale token, or the job is not claimed 409  ERR       conflict
    │   └── JobCancelled    the job was cancelled (also Client.result()) 409 ERR cancelled
    ├── Contended           kept losing races for the whole budget 503  TRYAGAIN
    ├── Overloaded          out of its own descriptors for now    503   TRYAGAIN
    ├── Unauthorized        missing or wrong bearer token         401   NOAUTH
    ├── CorruptData         an object in the store cannot be read 500   ERR
    └── client side only:
        ├── BrokerUnavailable   no broker answered, after retries and re-discovery
        ├── BrokerError         an answer the SDK did not expect (carries its status)
        ├── JobFailed           Client.result(): the job is dead (carries last_error)
        ├── IncompleteAnswer    done, but a lost answer's part is unknown (carries ids)
        └── UnknownTask         a Worker's Tasks: the job names no task it has

The HTTP layer, the RESP layer, the batch ack and the SDK derive their mappings
from the class attributes here (`http_status`, `resp_code`, `ack_status`,
`reason`, `retry_after`, `for_status`): there is no other table. An error whose
status others share (404, 409) and that a client must tell apart has a
`reason`, sent beside the message as {"error": ..., "reason": ...}.
"""

from __future__ import annotations

from typing import ClassVar


class SimpleQueueError(Exception):
    """Base class of every error simplequeue raises on purpose."""

    #: The HTTP status this error is answered with.
    http_status: ClassVar[int] = 500
    #: The RESP error code (the first word of a `-CODE message` reply).
    resp_code: ClassVar[str] = "ERR"
    #: The status one ack of a batch is answered with when it fails so (api.AckResult);
    #: None: the error fails the whole batch.
    ack_status: ClassVar[str | None] = None
    #: A word that tells this error apart from the others of its status, sent
    #: in the answer beside the message ({"error", "reason"}); None: not needed.
    reason: ClassVar[str | None] = None
    #: Seconds a client is told to wait before asking again (Retry-After), for
    #: an error that passes by itself; None: not said.
    retry_after: ClassVar[int | None] = None

    def __str__(self) -> str:
        return super().__str__() or type(self).__name__


class StoreError(SimpleQueueError):
    """The object store could not do what was asked."""

    http_status = 503
    resp_code = "TRYAGAIN"


class PreconditionFailed(StoreError):
    """A conditional write lost: the ETag moved, or a create-only key exists."""


class ObjectNotFound(StoreError):
    """The key does not exist in the store."""


class StoreUnavailable(StoreError):
    """The store did not answer (outage, timeouts, throttling) after bounded retries."""


class StoreRefused(StoreUnavailable):
    """The store answered no, and would again: access denied, no such bucket,
    no credentials, a read-only disk, an operation it does not implement.
    Nothing was written; an operator must act (still a 503: the broker cannot
    serve until then). The committer does not try such a write again."""


class StoreUnusable(StoreRefused):
    """The store is not one a broker can serve from as it is, and nothing but
    an operator changes that: no such bucket, answers without a Date header,
    conditional writes taken for plain ones. A broker does not start on it
    (simplequeued exits 1), where other refusals (access denied while a policy
    propagates, no credentials yet, a clock NTP has not set) may clear up."""


class AmbiguousWrite(StoreUnavailable):
    """A conditional write was sent and no answer came back (a timeout, a lost
    connection): it may or may not have landed. The committer reads back."""


class NotDurable(StoreUnavailable):
    """A write is in place (readers see it), but the store could not make it
    durable (an fsync after the rename failed): a crash may lose it. The
    committer writes the head again, and answers the batch as done only once
    that lands durable."""


class CacheTooSmall(StoreUnavailable):
    """A read or a batch needs more objects at once than the broker's object
    cache (--cache-mb) holds."""


class StorageFull(StoreError):
    """The store has no room for the write (a full disk): nothing was written."""

    http_status = 507
    resp_code = "ERR"


class InvalidRequest(SimpleQueueError):
    """The request is malformed or out of range; nothing was changed."""

    http_status = 400
    ack_status = "invalid"


class RefusedByTopic(InvalidRequest):
    """Refused for what the topic holds now (its schedules, the priorities of its
    jobs, its settings), not for the request alone: the same request may pass
    once the topic changes. Nothing was changed."""


class PayloadTooLarge(InvalidRequest):
    """The request is larger than the broker accepts (--max-body)."""

    http_status = 413


class JobNotFound(SimpleQueueError):
    """The topic has no job (live or retained) with that id."""

    http_status = 404
    ack_status = "not_found"


class ScheduleNotFound(SimpleQueueError):
    """The topic has no schedule of that name."""

    http_status = 404
    reason = "no_schedule"


class NothingToClaim(SimpleQueueError):
    """No job was claimable, after waiting as long as the claim asked."""

    http_status = 404


class RouteNotFound(SimpleQueueError):
    """No route of the API is at the request's path: a broker URL whose path
    is wrong (a proxy's prefix that is not there, a typo). No request sent
    there can succeed."""

    http_status = 404
    reason = "no_route"


class LeaseLost(SimpleQueueError):
    """The caller does not hold the claim: stale lease token, or the job is not claimed."""

    http_status = 409
    ack_status = "conflict"


class JobCancelled(LeaseLost):
    """The job was cancelled (POST /topics/{t}/cancel): its claim, if it had one,
    ended, and it will not run again. Its holder's heartbeat, ack or nack meets
    this, and so does the SDK's `result()` of it."""

    ack_status = "cancelled"
    reason = "cancelled"


class Contended(SimpleQueueError):
    """A commit kept losing compare-and-set races until its time budget was spent."""

    http_status = 503
    resp_code = "TRYAGAIN"


class Overloaded(SimpleQueueError):
    """This broker ran short of something of its own for a moment: descriptors,
    or free connections to the broker it passes a request on to. Nothing was
    sent on; asking again shortly may succeed (Retry-After)."""

    http_status = 503
    resp_code = "TRYAGAIN"
    retry_after = 1


class Unauthorized(SimpleQueueError):
    """The broker wants a bearer token and did not get the right one."""

    http_status = 401
    resp_code = "NOAUTH"


class Forbidden(SimpleQueueError):
    """The broker refused a request another site's page made through a browser,
    or one whose Host does not name it while it listens on loopback only (a
    DNS-rebinding page): no token makes it pass."""

    http_status = 403


class RequestTimedOut(SimpleQueueError):
    """The request's body did not arrive within the broker's --body-timeout; the
    connection was closed."""

    http_status = 408


class CorruptData(SimpleQueueError):
    """An object in the store is not one simplequeue can read (truncated, not
    JSON, foreign, of a future format): the topic it belongs to cannot be served
    until an operator restores or removes it. Carries the object's key."""

    http_status = 500

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key} cannot be read: {why}")
        self.key, self.why = key, why


class BrokerUnavailable(SimpleQueueError):
    """No broker answered (client side), after retries and re-discovery."""

    http_status = 503
    resp_code = "TRYAGAIN"


class BrokerError(SimpleQueueError):
    """The broker (or something between it and the client) answered what the SDK
    did not expect: an unknown status, or a body that is not the API's."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class JobFailed(SimpleQueueError):
    """The job whose result was asked for is dead: it failed and its attempts
    are spent (client side: a broker never answers it). Carries the job's id and
    its last error, as the broker recorded it."""

    def __init__(self, job_id: str, last_error: str | None = None) -> None:
        super().__init__(f"job {job_id!r} is dead: {last_error or 'no error was recorded'}")
        self.job_id, self.last_error = job_id, last_error


class IncompleteAnswer(SimpleQueueError):
    """A request was done, but its answer cannot say all it did (client side):
    it was tried again after a try that may have landed and whose answer was
    lost, and nothing names what that try did (a requeue or purge of every
    dead job). Carries the ids the answer named, those done at least."""

    def __init__(self, message: str, ids: list[str]) -> None:
        super().__init__(message)
        self.ids = ids


class UnknownTask(SimpleQueueError):
    """A job run by a Tasks registry (client side, in a Worker: it fails the
    job) names a task the registry does not have, or its payload is not a
    task's at all."""


#: The classes a broker's error answers are turned back into, by their status
#: (404 is JobNotFound: a claim's "nothing to claim" is told apart by the SDK).
#: 500 is not one: CorruptData and any unexpected error share it, so the SDK
#: cannot tell which it was and answers BrokerError with the broker's message.
_ANSWERED = (
    InvalidRequest,
    PayloadTooLarge,
    Unauthorized,
    Forbidden,
    RequestTimedOut,
    JobNotFound,
    LeaseLost,
    StorageFull,
    StoreUnavailable,
)
_BY_STATUS = {cls.http_status: cls for cls in _ANSWERED}
#: Errors that share a status with another, told apart by the answer's reason.
WITH_REASON: tuple[type[SimpleQueueError], ...] = (JobCancelled, ScheduleNotFound, RouteNotFound)
_BY_REASON = {(cls.http_status, cls.reason): cls for cls in WITH_REASON}


def for_status(status: int, reason: str | None = None) -> type[SimpleQueueError] | None:
    """The error class behind a broker's answer of `status` (and `reason`, when
    the answer has one), or None for a status that no error of the API has (the
    SDK raises BrokerError for those)."""
    return _BY_REASON.get((status, reason)) or _BY_STATUS.get(status)
