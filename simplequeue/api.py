"""The HTTP API's types: every request body and every answer, as msgspec Structs.

The broker decodes and validates request bodies into these at the edge (and the
RESP face builds the same types), /openapi.json is generated from them, and the
SDK encodes its requests and decodes the broker's answers with them. Nothing
here does I/O or knows the broker or the client: both import it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec
import orjson
from msgspec import UNSET, Meta, Struct, UnsetType
from yarl import URL

from simplequeue.errors import WITH_REASON, InvalidRequest

T = TypeVar("T")

#: On a topic's answer: the URL of the broker that served it (its owner), where
#: a client may send the topic's next requests itself (SPEC 4.3).
OWNER_HEADER = "Simplequeue-Owner"
#: On an answer: the request went to a broker that did not answer, then to the
#: one that answered; the first may have carried it out too.
REPLAYED_HEADER = "Simplequeue-Replayed"
#: On a request a broker passes on to another: who passed it (it is served there).
FORWARDED_HEADER = "Simplequeue-Forwarded"
#: On the answer to a claim or a heartbeat: the latest the store's clock may read
#: as the broker answers (its estimate plus its error), Unix seconds: a lease has
#: lease_expires_at less it left at least, whatever the write that started it
#: took. A header, not a field of the body: brokers before it decode a claim's
#: answer they pass on (RESP, a late claim's take-back) field by field.
NOW_HEADER = "Simplequeue-Now"
# A request one broker passes on to another may be this many times its
# --max-body, and MAX_BATCH ids more: the forwarder gives new jobs ids, and the
# RESP face's values grow as JSON strings (a control byte takes six). What a
# broker takes from a client, its peer takes from it.
FORWARDED_ROOM = 8

#: Seconds a broker keeps an idle keep-alive connection (its default
#: --keepalive-timeout).
BROKER_KEEPALIVE = 15.0


def client_keepalive(brokers_keepalive: float = BROKER_KEEPALIVE) -> float:
    """The keep-alive to give an aiohttp client's connector so that it drops an
    idle connection before a broker that keeps them `brokers_keepalive`
    seconds closes it: else a request sent just as the broker closes one meets
    "server disconnected". aiohttp looks for idle connections once per its
    keep-alive, so one lives up to twice that (a connection used again just
    after the look was scheduled), and a keep-alive of 5 s or more is rounded
    up to a whole second: a quarter of the broker's stays well inside it."""
    return brokers_keepalive / 4


MAX_BATCH = 1000  # jobs, claims or acks in one request
MAX_WAIT = 60.0  # seconds a long poll may wait
MAX_LEASE = 12 * 3600.0  # seconds
CLAIM_ATTEMPTS_KEPT_S = 300.0  # how long a claim's answer is kept for its retries
MAX_DELAY = 366 * 86400.0  # seconds
MAX_ERROR = 4096  # characters of an error message kept with a job
# JSON values (payloads, results, errors) are stored inside the topic's objects,
# whose encoder stops at 254 levels: a value may nest at most this deep.
MAX_DEPTH = 200

# Ids and names: printable, no control characters (they end up in logs and tables).
# Patterns end in \Z, not $: "$" also matches before a final newline.
_PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]+\Z"
JobId = Annotated[str, Meta(min_length=1, max_length=256, pattern=_PRINTABLE)]
WorkerId = Annotated[str, Meta(min_length=1, max_length=256, pattern=_PRINTABLE)]
LeaseToken = Annotated[str, Meta(min_length=1, max_length=256)]
AttemptId = Annotated[str, Meta(min_length=1, max_length=64, pattern=_PRINTABLE)]
Priority = Annotated[int, Meta(ge=-(2**31), le=2**31 - 1)]
Delay = Annotated[float, Meta(ge=0, le=MAX_DELAY)]
# A job's time as Unix seconds, judged on its broker's estimate of the store's
# clock; at most MAX_DELAY ahead of it (checked where the time is known).
# How the refusal of a run_at further ahead than MAX_DELAY begins (a delivery
# of follow-ups falls back on delays when a target's owner says it).
RUN_AT_TOO_LATE = "a job's run_at"
RunAt = Annotated[
    float,
    Meta(
        ge=0,
        description="Not claimable before this time: Unix seconds, on the broker's estimate of "
        "the store's clock; a time past is now, one more than 366 days ahead is refused; "
        "not with a delay",
    ),
]
MAX_ATTEMPTS = 1_000_000  # a job's attempts at most (0 = unlimited)
Attempts = Annotated[int, Meta(ge=0, le=MAX_ATTEMPTS)]
Lease = Annotated[float, Meta(gt=0, le=MAX_LEASE)]
Wait = Annotated[float, Meta(ge=0, le=MAX_WAIT)]
Count = Annotated[
    int,
    Meta(
        ge=1,
        le=MAX_BATCH,
        description="Jobs to take at most: fewer when fewer are due or the topic's limits "
        "allow fewer, and no more once their payloads reach 16 MiB (less on a broker "
        "whose --cache-mb is under 128: an eighth of it), shared by the claims committed "
        "together; each claim takes its first job whatever its size",
    ),
]
# Named jobs in one request, as many as a batch: a request is served in one
# commit, on the event loop, each id looked up there (SDK calls split more).
JobIds = Annotated[list[JobId], Meta(max_length=MAX_BATCH)]
# Schedules (SPEC 11): a name becomes part of each job id it fires (name@slot).
SCHEDULE_NAME = r"^[A-Za-z0-9_.-]{1,128}\Z"
# A new one is not dots only: "." and ".." are steps in a URL's path to a
# browser, %2E%2E too, so the status page could not delete one (the SDK and
# the CLI can: one made before is deleted, never refused, under SCHEDULE_NAME).
NEW_SCHEDULE_NAME = r"^(?!\.+\Z)[A-Za-z0-9_.-]{1,128}\Z"
Every = Annotated[int, Meta(ge=1, le=366 * 86400)]  # seconds between slots
# Its fields are checked where it is read (state.slots), with words for them.
Cron = Annotated[str, Meta(max_length=256, pattern=_PRINTABLE)]
TimeZone = Annotated[str, Meta(min_length=1, max_length=64, pattern=_PRINTABLE)]
# Topic settings (SPEC 12).
Rate = Annotated[float, Meta(gt=0, le=1_000_000)]  # claims per second
Burst = Annotated[int, Meta(ge=1, le=1_000_000)]  # claims the bucket holds
MaxClaimed = Annotated[int, Meta(ge=0, le=100_000_000)]  # 0: nothing is claimed (paused)

_TOPIC_NAME = r"^[A-Za-z0-9_-]{1,128}\Z"
TopicName = Annotated[str, Meta(pattern=_TOPIC_NAME)]

Status = Literal["pending", "delayed", "claimed", "completed", "dead", "cancelled"]


class _Request(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Request bodies: unknown fields are an error, not ignored."""


# --- requests --------------------------------------------------------------------


class JobSpec(_Request):
    """One job to enqueue. Without an id, the broker makes one. Not claimable
    before `delay` seconds from its enqueue, or before `run_at` (a time: one
    past is now); not both."""

    payload: Any
    id: JobId | None = None
    priority: Priority = 0
    delay: Delay = 0.0
    max_attempts: Attempts | None = None  # None: the broker's --max-attempts
    run_at: RunAt | None = None

    def __post_init__(self) -> None:
        if self.run_at is not None and self.delay:
            raise ValueError("give a job `delay` or `run_at`, not both")


class EnqueueBatch(_Request):
    jobs: Annotated[list[JobSpec], Meta(min_length=1, max_length=MAX_BATCH)]


class ClaimRequest(_Request):
    worker_id: WorkerId
    lease: Lease | None = None  # None: the topic's `lease` setting, else the broker's --lease
    wait: Wait = 0.0  # long-poll up to this many seconds for a job
    count: Count | None = None  # given: answer {"jobs": [...]}; else {"job": ...}
    # The caller's name for this claim, the same on each of its retries: a
    # retry of a claim whose answer was lost after it landed gets the jobs it
    # claimed again (those it still holds, leases unexpired) rather than more
    # (the owner keeps answers CLAIM_ATTEMPTS_KEPT_S in memory, bounded: best
    # effort, as SQS's ReceiveRequestAttemptId). The SDK sends one with every
    # claim (and none to a broker older than it, which refuses the field).
    # A pop's, likewise (its retry gets the first try's jobs), names it for
    # POST /unpop too (UnpopRequest).
    attempt_id: AttemptId | None = None


class FollowUpSpec(JobSpec):
    """A job an ack enqueues when, and only when, it commits (SPEC 9): a job
    spec, for this topic or `topic`. Without an id it gets one derived from the
    acked job's (`<job id>:<index>`), so that delivering it twice is a duplicate."""

    topic: TopicName | None = None  # None: the acked job's topic


class AckRequest(_Request):
    job_id: JobId
    lease_token: LeaseToken | None = None
    result: Any = None
    # Follow-up jobs, enqueued with the ack's commit (same topic) or delivered
    # from it (other topics, through the acked topic's outbox).
    enqueue: Annotated[list[FollowUpSpec], Meta(max_length=MAX_BATCH)] | None = None


class AckBatch(_Request):
    acks: Annotated[list[AckRequest], Meta(min_length=1, max_length=MAX_BATCH)]


class NackRequest(_Request):
    job_id: JobId
    lease_token: LeaseToken | None = None
    delay: Delay = 0.0
    error: Any = None  # text; anything else is kept as its JSON


class HeartbeatRequest(_Request):
    job_id: JobId
    lease_token: LeaseToken | None = None
    lease: Lease | None = None  # None: the claim's own lease


class Held(_Request):
    """A claim, by its job and lease token."""

    job_id: JobId
    lease_token: LeaseToken


class ReleaseRequest(_Request):
    """Claims to give back: pending again at once, the attempt uncounted (a
    broker that claimed for a client that went away before the answer)."""

    claims: Annotated[list[Held], Meta(min_length=1, max_length=MAX_BATCH)]


class CompleteRequest(_Request):
    """Claims to complete as a pop does (a BLPOP on several keys, XREADGROUP
    NOACK): no result, and undone, pending again, when the caller goes away
    before the answer (it was never handed the jobs)."""

    claims: Annotated[list[Held], Meta(min_length=1, max_length=MAX_BATCH)]
    # As a pop's: a retry gets the first try's answer; POST /unpop names it.
    attempt_id: AttemptId | None = None


class UnpopRequest(_Request):
    """Give back what the pop (by `worker_id`) or complete (no worker id)
    named `attempt_id` did, whose answer its caller never got (lost on its
    way: the caller, or a broker that passed the request on, went away):
    pending again at once, not completed, the attempt uncounted. Best effort:
    the topic's owner keeps what such requests did in memory for
    CLAIM_ATTEMPTS_KEPT_S, bounded. One that arrives before its pop or
    complete is done undoes it as it lands: an attempt id undone is spent (a
    pop under it later gives its jobs back)."""

    attempt_id: AttemptId
    worker_id: WorkerId | None = None  # the pop's; none for a complete


class WorkerName(_Request):
    """A worker id alone (an XREADGROUP consumer's, checked as a claim's)."""

    worker_id: WorkerId


class WaitQuery(_Request):
    """GET /topics/{t}/jobs/{id}?wait=S: seconds to wait for the job to finish."""

    wait: Wait = 0.0


class DeadQuery(_Request):
    """GET /topics/{t}/dead?offset=K&limit=N: a page of the dead jobs, in the
    order they died (without limit: every one from the offset-th on)."""

    offset: Annotated[int, Meta(ge=0)] = 0
    limit: Annotated[int, Meta(ge=1)] | None = None


class JobIdsRequest(_Request):
    """Dead jobs to requeue or purge: those named (at most 1,000), or all."""

    job_ids: JobIds | None = None  # None: every dead job


class CancelRequest(_Request):
    """Jobs to cancel: pending and delayed ones at once, claimed ones too (their
    holders' next heartbeat or ack answers 409, reason "cancelled")."""

    job_ids: Annotated[JobIds, Meta(min_length=1)]


class ScheduleRequest(_Request):
    """A schedule (its name is in the path): every `every` seconds (slots are
    the multiples of it since the Unix epoch) or at each slot of a five-field
    `cron` expression in time zone `tz` (default UTC), and the job each slot
    enqueues, with id "<name>@<slot, Unix seconds>"."""

    payload: Any
    every: Every | None = None
    cron: Cron | None = None
    tz: TimeZone | None = None
    priority: Priority = 0
    max_attempts: Attempts | None = None  # None: the topic's default, else the broker's


class SettingsRequest(_Request):
    """Topic settings to change: a field left out stays as it is, a field set to
    null is removed (the broker's default applies again)."""

    rate: Rate | UnsetType | None = UNSET  # claims per second, across every worker
    burst: Burst | UnsetType | None = UNSET  # default: max(1, ceil(rate))
    max_claimed: MaxClaimed | UnsetType | None = UNSET  # jobs claimed at once
    lease: Lease | UnsetType | None = UNSET  # default lease of a claim that names none
    max_attempts: Attempts | UnsetType | None = UNSET  # default of an enqueue that names none


# --- answers ---------------------------------------------------------------------


class _Answer(Struct, omit_defaults=True):
    """Answers: fields this SDK does not know are ignored, so brokers may add some."""


class Job(_Answer):
    """A job, or the record kept of it once it finished (SPEC section 3). A
    record has no payload, priority, run_at, max_attempts or claim fields:
    those are None."""

    id: str
    status: Status = "pending"
    payload: Any = None
    priority: int | None = None
    run_at: float | None = None
    attempts: int | None = None
    max_attempts: int | None = None
    created_at: float | None = None
    claimed_by: str | None = None
    claimed_at: float | None = None
    heartbeat_at: float | None = None
    lease_expires_at: float | None = None
    lease_token: str | None = None
    last_error: str | None = None
    result: Any = None
    finished_at: float | None = None


class Counts(_Answer):
    """A topic's jobs by status. The counts never overlap: pending (claimable
    now), delayed (not yet due), claimed and dead are now; completed and
    cancelled are ever; total is their sum; enqueued counts every job ever
    enqueued, duplicates excluded."""

    pending: int
    delayed: int
    claimed: int
    completed: int
    dead: int
    enqueued: int
    total: int
    cancelled: int = 0  # a broker before cancellation does not send it


class Enqueued(_Answer):
    id: str
    duplicate: bool = False


class EnqueuedBatch(_Answer):
    ids: list[str]
    duplicates: list[str]


class Pushed(_Answer):
    """A push's answer: the topic's pending and delayed jobs just after it (LPUSH's reply)."""

    length: int


class Released(_Answer):
    released: int


class Completed(_Answer):
    completed: list[str]  # the ids completed; the others were not held


class Unpopped(_Answer):
    given_back: int  # jobs pending again (0: none kept, or expired and reused)


class Claimed(_Answer):
    job: Job


class ClaimedBatch(_Answer):
    jobs: list[Job]


class Settled(_Answer):
    """The answer to an ack or a nack: the job's status after it, the ids of
    the follow-up jobs an ack enqueued (or will deliver to other topics), and
    of those for its own topic it did not enqueue again: a job of that id is
    in the topic, live or retained (the acked job's own id, say)."""

    id: str
    status: str
    enqueued: list[str] | None = None
    duplicates: list[str] | None = None


class AckResult(_Answer):
    """One ack of a batch: status "completed", with the follow-ups it enqueued
    and those it did not enqueue again, as a single ack's answer (Settled);
    or "not_found", "conflict", "cancelled" or "invalid" with the error (the
    failing error class's `ack_status`); or "error" for one that failed alone
    for a reason not its own (its lease in a corrupt segment) while others of
    the batch landed: the job is still claimed, its lease runs out as usual."""

    id: str | None
    status: str
    error: str | None = None
    enqueued: list[str] | None = None
    duplicates: list[str] | None = None


class AckedBatch(_Answer):
    results: list[AckResult]


class Renewed(_Answer):
    id: str
    lease_expires_at: float


class DeadJobs(_Answer):
    jobs: list[Job]
    dead: int | None = None  # how many there are (None: a broker that does not say)


class Requeued(_Answer):
    requeued: list[str]


class Purged(_Answer):
    purged: list[str]


class Cancelled(_Answer):
    """What a cancel did: the jobs it cancelled, and those it could not (finished
    already, or unknown)."""

    cancelled: list[str]
    not_found: list[str]


class Schedule(_Answer):
    """A schedule, with its next slot (`next_at`) and the last it fired."""

    name: str
    payload: Any
    next_at: float
    every: int | None = None
    cron: str | None = None
    tz: str | None = None
    priority: int = 0
    max_attempts: int | None = None
    created_at: float | None = None
    last_fired_at: float | None = None  # when it last enqueued a job (None: never)
    last_job_id: str | None = None  # the id of that job: "<name>@<slot>"
    last_error: str | None = None  # why its last slot enqueued nothing, if it did not


class Schedules(_Answer):
    schedules: list[Schedule]


class Unscheduled(_Answer):
    deleted: str


class Settings(_Answer):
    """A topic's settings; null: not set (the broker's default applies, and no
    limit). `burst` is the bucket's size in effect while `rate` is set. Every
    field is sent, null or not: an answer with none ({}, an error's body) is
    not one."""

    rate: float | None
    burst: int | None
    max_claimed: int | None
    lease: float | None
    max_attempts: int | None


class Topics(_Answer):
    """Every topic's counts; a topic that cannot be read (a corrupt head) is
    under `errors` with why, instead."""

    topics: dict[str, Counts]
    errors: dict[str, str] = {}


class Health(_Answer):
    ok: bool
    broker_id: str
    active: bool


class Ok(_Answer):
    ok: bool


_REASONS = "Set where the status alone does not say which error it is: " + ", ".join(
    f'"{cls.reason}" ({cls.http_status}: {cls.__name__})' for cls in WITH_REASON
)


class Error(_Answer):
    error: str
    reason: Annotated[str | None, Meta(description=_REASONS)] = None


# --- decoding at the edge ----------------------------------------------------------


TOO_DEEP = "JSON nested too deeply (a payload or result may nest 200 levels)"
# What a pattern asks for, in words: msgspec says "Expected `str` matching
# regex '^[A-Za-z0-9_-]{1,128}\\Z' - at `$.enqueue[0].topic`".
_PATTERNS_SAID = {
    _TOPIC_NAME: "of 1-128 characters of [A-Za-z0-9_-] (a topic name)",
    _PRINTABLE: "of printable characters (no control characters)",
}


def _said(exc: msgspec.ValidationError) -> str:
    """A validation error's message, its patterns said in words."""
    text = str(exc)
    for pattern, words in _PATTERNS_SAID.items():
        text = text.replace(f"matching regex {pattern!r}", words)
    return text


def decode(raw: bytes, kind: type[T]) -> T:
    """`raw` (a JSON body) as `kind`, or InvalidRequest saying what is wrong."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:  # first: it is a DecodeError too
        raise InvalidRequest(_said(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    except RecursionError:  # ~1,000 levels: a 2 KB body
        raise InvalidRequest(TOO_DEEP) from None


def convert(value: Any, kind: type[T]) -> T:
    """A Python value (what the RESP face parsed, say) as `kind`, validated as a
    JSON body would be."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(_said(exc)) from None
    except RecursionError:
        raise InvalidRequest(TOO_DEEP) from None


def from_query(query: Mapping[str, str], kind: type[T]) -> T:
    """A request's query parameters as `kind`: numbers from their text,
    validated as a JSON body would be; an unknown parameter, or one given
    twice (?wait=0&wait=60: which one?), is an error."""
    names = [name for name, _ in query.items()]  # a multidict's: each time it is given
    if len(names) != len(set(names)):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InvalidRequest(f"query: {', '.join(twice)} given more than once")
    try:
        return msgspec.convert(dict(query), kind, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"query: {_said(exc)}") from None


_Shape = dict[str, msgspec.Raw]


def decode_either(raw: bytes, single: type[T], batch: type[Any], key: str) -> T | Any:
    """A body that is `single`, or `batch` when it has the field `key` (as
    {"jobs": [...]} or {"acks": [...]}). The fields are looked at without
    decoding their values, then the body is decoded as the type it is."""
    shape = decode(raw, _Shape)
    if key in shape:
        if len(shape) != 1:
            raise InvalidRequest(f'a batch is {{"{key}": [...]}} and nothing else')
        return decode(raw, batch)
    return decode(raw, single)


_SCHEDULE_NAME_RE = re.compile(SCHEDULE_NAME)
_NEW_SCHEDULE_NAME_RE = re.compile(NEW_SCHEDULE_NAME)


def check_schedule_name(name: str) -> str:
    """`name` if it can name a schedule (and the ids of its jobs), else InvalidRequest."""
    if not _SCHEDULE_NAME_RE.match(name):
        raise InvalidRequest("schedule names are 1-128 characters of [A-Za-z0-9_.-]")
    return name


def check_new_schedule_name(name: str) -> str:
    """`name` if a schedule can be made or replaced under it, else InvalidRequest."""
    check_schedule_name(name)
    if not _NEW_SCHEDULE_NAME_RE.match(name):
        raise InvalidRequest(
            "a schedule name cannot be dots only: a browser takes it for a step in the path"
        )
    return name


# A bearer token travels in an HTTP header (and in RESP's AUTH): no control
# characters (a newline would split the headers), and no space at either end
# (a header's value is read without them).
_TOKEN_RE = re.compile(r"[^\x00-\x20\x7f](?:[^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?\Z")


def check_token(token: str) -> str:
    """`token` if a client can send it in a header, else ValueError."""
    if not token:
        raise ValueError("a token cannot be empty (an empty one would turn auth off)")
    if not _TOKEN_RE.match(token):
        raise ValueError("a token has no control characters, and no space at either end")
    try:
        token.encode()
    except UnicodeEncodeError:  # bytes that were not UTF-8, kept as surrogates
        raise ValueError("a token is UTF-8 text") from None
    return token


def check_broker_url(url: str) -> str:
    """`url` without its trailing slash if it can name a broker (http or https,
    with a host, and no query, fragment or user), else ValueError."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a URL: {url!r} ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"not a broker URL: {url!r} (wanted http://HOST:PORT)")
    # Routes are appended to the URL: a query or a fragment would swallow
    # them; a user and password would go with every request, and into
    # broker.json. (yarl drops an empty "?" or "#": the text is looked at.)
    if "?" in url or "#" in url or "@" in urlsplit(url).netloc:
        raise ValueError(
            f"not a broker URL: {url!r} (no query, fragment or user: wanted http://HOST:PORT)"
        )
    return url.rstrip("/")


def check_seconds(
    what: str, value: float, *, above_zero: bool = False, at_most: float | None = None
) -> float:
    """`value` if it is a number of seconds for `what` (finite; >= 0, or > 0
    with `above_zero`; up to `at_most`), else ValueError. Seconds of nan pass
    every comparison, and JSON has neither nan nor inf (they are sent, and
    written in heads and broker.json, as null)."""
    low = "> 0" if above_zero else ">= 0"
    ok = math.isfinite(value) and (value > 0 if above_zero else value >= 0)
    if not ok or (at_most is not None and value > at_most):
        high = "" if at_most is None else f" and <= {at_most:g}"
        raise ValueError(f"{what} must be a finite number of seconds {low}{high}, not {value!r}")
    return value


def new_id() -> str:
    """A fresh job id or lease token: 128 random bits from the OS, as 32 hex
    digits (uuid4().hex's form; a fifth of its cost, which a claim of many
    jobs or a batch of enqueues pays once per job)."""
    return os.urandom(16).hex()


def with_ids(specs: list[JobSpec]) -> list[JobSpec]:
    """`specs`, each with an id (a fresh one where it had none): a request sent
    again, to the same broker or the next, is then a duplicate, never a second job."""
    return [s if s.id is not None else msgspec.structs.replace(s, id=new_id()) for s in specs]


def check_storable(value: Any, what: str) -> None:
    """Raise InvalidRequest unless `value` can be stored: the topic's encoder
    takes integers of at most 64 bits and nesting up to MAX_DEPTH (with room
    for the objects it is stored in)."""
    try:
        encoded = orjson.dumps(value)
    except TypeError as exc:
        raise InvalidRequest(f"{what} cannot be stored: {exc}") from None
    # Nesting deeper than MAX_DEPTH takes more than 2 x MAX_DEPTH bytes.
    if len(encoded) > 2 * MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise InvalidRequest(f"{what} is nested deeper than {MAX_DEPTH} levels")


def _depth(value: Any) -> int:
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in item)
    return deepest
