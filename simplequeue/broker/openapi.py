"""The OpenAPI 3.1 description of the HTTP API, served at /openapi.json.

Every schema is generated from the types in simplequeue.api, the same ones the
handlers decode request bodies into, and every error answer from the classes of
simplequeue.errors (status and description): the description cannot drift from
what the broker accepts and answers. Only the routes, which errors each may
meet, and the rules between a request's fields that the types' checks make
(not their fields' types) are written here.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import msgspec

from simplequeue import __version__, api
from simplequeue.broker.page import Overview
from simplequeue.errors import (
    Contended,
    CorruptData,
    Forbidden,
    InvalidRequest,
    JobCancelled,
    JobNotFound,
    LeaseLost,
    NothingToClaim,
    Overloaded,
    PayloadTooLarge,
    RequestTimedOut,
    RouteNotFound,
    ScheduleNotFound,
    SimpleQueueError,
    StorageFull,
    StoreError,
    Unauthorized,
)

_REF = "#/components/schemas/{name}"

#: Every type whose schema the description holds.
_TYPES: tuple[type[Any], ...] = (
    api.JobSpec,
    api.EnqueueBatch,
    api.ClaimRequest,
    api.ReleaseRequest,
    api.CompleteRequest,
    api.UnpopRequest,
    api.AckRequest,
    api.AckBatch,
    api.NackRequest,
    api.HeartbeatRequest,
    api.JobIdsRequest,
    api.CancelRequest,
    api.ScheduleRequest,
    api.SettingsRequest,
    api.Job,
    api.Counts,
    api.Enqueued,
    api.EnqueuedBatch,
    api.Pushed,
    api.Released,
    api.Completed,
    api.Unpopped,
    api.Claimed,
    api.ClaimedBatch,
    api.Settled,
    api.AckedBatch,
    api.Renewed,
    api.DeadJobs,
    api.Requeued,
    api.Purged,
    api.Cancelled,
    api.Schedule,
    api.Schedules,
    api.Unscheduled,
    api.Settings,
    api.Topics,
    api.Health,
    api.Ok,
    api.Error,
    Overview,
)

Errors = tuple[type[SimpleQueueError], ...]

# What a route may meet, by what it does. Unauthorized only with --token, but a
# client cannot tell: every route but /healthz lists it. A topic's routes may be
# passed on to its owner: Overloaded.
_LISTING: Errors = (Unauthorized, StoreError)
_READ: Errors = (Unauthorized, InvalidRequest, CorruptData, StoreError, Overloaded)
_WRITE: Errors = (*_READ, PayloadTooLarge, Contended, StorageFull)
_SETTLE: Errors = (*_WRITE, JobNotFound, LeaseLost, JobCancelled)


def _given(field: str, kind: str) -> dict[str, Any]:
    """The schema of an object whose `field` is there, of JSON type `kind` (not null)."""
    return {"required": [field], "properties": {field: {"type": kind}}}


_NO_DELAY_WITH_A_RUN_AT = {  # api.JobSpec.__post_init__
    "description": "a delay over 0 or a run_at, not both",
    "not": {
        "required": ["delay", "run_at"],
        "properties": {"delay": {"exclusiveMinimum": 0}, "run_at": {"type": "number"}},
    },
}

# The rules between a request's fields, each as the check that makes it (a
# request that breaks one is answered 400), by the type whose schema has them.
_BETWEEN_FIELDS: dict[type[Any], list[dict[str, Any]]] = {
    api.JobSpec: [_NO_DELAY_WITH_A_RUN_AT],
    api.FollowUpSpec: [_NO_DELAY_WITH_A_RUN_AT],
    api.ScheduleRequest: [  # state.slots.check_definition
        {
            "description": "every (seconds) or cron, exactly one",
            "oneOf": [_given("every", "integer"), _given("cron", "string")],
        },
        {
            "description": "tz goes with cron",
            "if": _given("tz", "string"),
            "then": _given("cron", "string"),
        },
    ],
    api.SettingsRequest: [  # TopicState.put_settings
        {
            "description": "a burst is the size of a rate's bucket: give it with its rate"
            " (one given alone is taken only on a topic that has a rate already)",
            "if": _given("burst", "integer"),
            "then": _given("rate", "number"),
        }
    ],
}

# JSON Schema's integer is any number without a fractional part (2.0 is one);
# the types decode an integer only from one written as such.
_WHOLE = (
    "An integer written without a fraction or exponent: 2, not 2.0 or 2e0 (refused,"
    " 400, though JSON Schema's integer takes them)."
)


def _requests(paths: dict[str, Any], schemas: dict[str, Any]) -> set[str]:
    """The names of the schemas of request bodies and of their parts."""
    found: set[str] = set()
    bodies = [op.get("requestBody") for ops in paths.values() for op in ops.values()]
    todo = _refs(bodies)
    while todo:
        name = todo.pop().rsplit("/", 1)[1]
        if name not in found:
            found.add(name)
            todo.extend(_refs(schemas[name]))
    return found


def _refs(node: Any) -> list[str]:
    """Every $ref in `node`."""
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + _refs(list(node.values()))
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _whole_numbers_said(node: Any) -> None:
    """Every integer field in `node`, a request's schema, says it takes no 2.0."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["description"] = " ".join(filter(None, (node.get("description"), _WHOLE)))
        for value in node.values():
            _whole_numbers_said(value)
    elif isinstance(node, list):
        for value in node:
            _whole_numbers_said(value)


def _ref(kind: type[Any]) -> dict[str, Any]:
    return {"$ref": _REF.format(name=kind.__name__)}


def _one_of(*kinds: type[Any]) -> dict[str, Any]:
    return {"oneOf": [_ref(k) for k in kinds]}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _described(cls: type[SimpleQueueError]) -> str:
    """The first paragraph of the class's docstring, on one line."""
    return " ".join(str(cls.__doc__).strip().split("\n\n")[0].split())


def _error_responses(errors: Errors) -> dict[str, Any]:
    """The answers of `errors`, one per status: the classes that share a status
    (503: the store, contention) are described together."""
    by_status: dict[int, list[type[SimpleQueueError]]] = {}
    for cls in errors:
        by_status.setdefault(cls.http_status, []).append(cls)
    return {
        str(status): {
            "description": " Or: ".join(_described(c) for c in classes),
            **_json(_ref(api.Error)),
        }
        for status, classes in sorted(by_status.items())
    }


def _op(
    operation_id: str,
    summary: str,
    ok: dict[str, Any],
    errors: Errors,
    body: dict[str, Any] | None = None,
    body_required: bool = True,
    ok_codes: tuple[str, ...] = ("200",),
    topic: bool = True,
    job_id: bool = False,
    name: str | None = None,  # the pattern of the path's schedule name
) -> dict[str, Any]:
    responses: dict[str, Any] = {c: {"description": "success", **_json(ok)} for c in ok_codes}
    responses.update(_error_responses(errors))
    op: dict[str, Any] = {"operationId": operation_id, "summary": summary, "responses": responses}
    params = []
    if topic:
        params.append(
            {
                "name": "topic",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"},
            }
        )
    if job_id:
        params.append(
            {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
        )
    if name is not None:
        params.append(
            {
                "name": "name",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": name},
            }
        )
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": body_required, **_json(body)}
    return op


def _waiting(op: dict[str, Any]) -> dict[str, Any]:
    """`op` with the `wait` query parameter of a long poll."""
    wait = msgspec.json.schema(api.WaitQuery)
    schema = wait.get("$defs", {}).get("WaitQuery", wait)["properties"]["wait"]
    op["parameters"].append(
        {
            "name": "wait",
            "in": "query",
            "required": False,
            "description": "seconds to wait for the job to finish (completed, dead, cancelled)",
            "schema": schema,
        }
    )
    return op


def _paged(op: dict[str, Any]) -> dict[str, Any]:
    """`op` with the `offset` and `limit` query parameters of a page."""
    query = msgspec.json.schema(api.DeadQuery)
    fields = query.get("$defs", {}).get("DeadQuery", query)["properties"]
    for name, what in (
        ("offset", "the first to answer, counting from the oldest (0)"),
        ("limit", "how many to answer at most (without it: every one from the offset on)"),
    ):
        op["parameters"].append(
            {"name": name, "in": "query", "required": False, "description": what}
            | {"schema": fields[name]}
        )
    return op


# Python's anchors, which ECMA-262 (the regular expressions of OpenAPI 3.1's
# patterns) lacks: with the u flag a pattern holding one does not compile;
# without it, \Z is a literal Z. api.py's patterns end in \Z, as Python's $
# also matches before a final newline; ECMA-262's $ (without the m flag) and ^
# match only at the very end and start, as \Z and \A do.
_PYTHON_ANCHORS = {"Z": "$", "A": "^"}


def _ecma262(pattern: str) -> str:
    """`pattern`, a Python regular expression of api.py, as ECMA-262 has it."""
    # Escapes are read pairwise, left to right: an escaped backslash before a
    # Z is no anchor.
    return re.sub(r"\\(.)", lambda m: _PYTHON_ANCHORS.get(m[1], m[0]), pattern, flags=re.DOTALL)


def _patterns_in_ecma262(node: Any) -> Any:
    """`node`, a part of the description, with every pattern in it as ECMA-262 has it."""
    if isinstance(node, dict):
        return {
            k: _ecma262(v) if k == "pattern" and isinstance(v, str) else _patterns_in_ecma262(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_patterns_in_ecma262(v) for v in node]
    return node


@cache
def spec() -> dict[str, Any]:
    """The API description (built once)."""
    _, schemas = msgspec.json.schema_components(_TYPES, ref_template=_REF)
    t = "/topics/{topic}"
    paths: dict[str, Any] = {
        f"{t}/enqueue": {
            "post": _op(
                "enqueue",
                "Enqueue one job, or a batch as {jobs: [...]}",
                _one_of(api.Enqueued, api.EnqueuedBatch),
                _WRITE,
                body=_one_of(api.JobSpec, api.EnqueueBatch),
                ok_codes=("201", "200"),
            )
        },
        f"{t}/claim": {
            "post": _op(
                "claim",
                "Claim the next job (or up to count jobs), long-polling up to wait seconds",
                _one_of(api.Claimed, api.ClaimedBatch),
                (*_WRITE, NothingToClaim),
                body=_ref(api.ClaimRequest),
            )
        },
        f"{t}/pop": {
            "post": _op(
                "pop",
                "Claim and complete up to count jobs in one commit (Redis LPOP semantics)",
                _ref(api.ClaimedBatch),
                (*_WRITE, NothingToClaim),
                body=_ref(api.ClaimRequest),
            )
        },
        f"{t}/push": {
            "post": _op(
                "push",
                "Enqueue a batch; answer the pending and delayed count after it (LPUSH)",
                _ref(api.Pushed),
                _WRITE,
                body=_ref(api.EnqueueBatch),
            )
        },
        f"{t}/release": {
            "post": _op(
                "release",
                "Give claims back: pending again at once, the attempt uncounted; answers"
                " how many were still held under their tokens, and so given back",
                _ref(api.Released),
                _WRITE,
                body=_ref(api.ReleaseRequest),
            )
        },
        f"{t}/complete": {
            "post": _op(
                "complete",
                "Complete claims as a pop does: undone when the caller goes away",
                _ref(api.Completed),
                _WRITE,
                body=_ref(api.CompleteRequest),
            )
        },
        f"{t}/unpop": {
            "post": _op(
                "unpop",
                "Give back what the pop or complete named attempt_id did, its answer lost:"
                " pending again, not completed (best effort: kept a while in memory)",
                _ref(api.Unpopped),
                _WRITE,
                body=_ref(api.UnpopRequest),
            )
        },
        f"{t}/refresh": {
            "post": _op(
                "refresh",
                "Broker to broker: the topic changed elsewhere; its owner reads it again",
                _ref(api.Ok),
                _READ,
            )
        },
        f"{t}/ack": {
            "post": _op(
                "ack",
                "Complete a claimed job (or several, as {acks: [...]})",
                _one_of(api.Settled, api.AckedBatch),
                _SETTLE,
                body=_one_of(api.AckRequest, api.AckBatch),
            )
        },
        f"{t}/nack": {
            "post": _op(
                "nack",
                "Return a claimed job to pending after delay seconds (delayed until"
                " then), or dead when spent",
                _ref(api.Settled),
                _SETTLE,
                body=_ref(api.NackRequest),
            )
        },
        f"{t}/heartbeat": {
            "post": _op(
                "heartbeat",
                "Extend a claim's lease",
                _ref(api.Renewed),
                _SETTLE,
                body=_ref(api.HeartbeatRequest),
            )
        },
        f"{t}/status": {
            "get": _op("getStatus", "Counts of the topic's jobs", _ref(api.Counts), _READ),
        },
        t + "/jobs/{job_id}": {
            "get": _waiting(
                _op(
                    "getJob",
                    "A job, or its retained record; with wait, once it is finished",
                    _ref(api.Job),
                    (*_READ, JobNotFound),
                    job_id=True,
                )
            ),
        },
        f"{t}/dead": {
            "get": _paged(_op("listDead", "Dead jobs, oldest first", _ref(api.DeadJobs), _READ)),
            "delete": _op(
                "purgeDead",
                "Purge dead jobs (all, or up to 1,000 job_ids)",
                _ref(api.Purged),
                _WRITE,
                body=_ref(api.JobIdsRequest),
                body_required=False,
            ),
        },
        f"{t}/requeue": {
            "post": _op(
                "requeueDead",
                "Dead jobs (all, or up to 1,000 job_ids) back to pending",
                _ref(api.Requeued),
                _WRITE,
                body=_ref(api.JobIdsRequest),
                body_required=False,
            )
        },
        f"{t}/cancel": {
            "post": _op(
                "cancelJobs",
                "Cancel jobs: pending and delayed at once, claimed ones' leases end",
                _ref(api.Cancelled),
                _WRITE,
                body=_ref(api.CancelRequest),
            )
        },
        f"{t}/schedules": {
            "get": _op(
                "listSchedules",
                "The topic's schedules, with their next and last slots",
                _ref(api.Schedules),
                _READ,
            )
        },
        t + "/schedules/{name}": {
            "put": _op(
                "putSchedule",
                "Create or replace a schedule (every N seconds, or cron in a time zone); "
                "a name of dots only is refused (400): a browser takes it for a path step",
                _ref(api.Schedule),
                _WRITE,
                body=_ref(api.ScheduleRequest),
                name=api.NEW_SCHEDULE_NAME,
            ),
            "delete": _op(
                "deleteSchedule",
                "Delete a schedule: it fires no more",
                _ref(api.Unscheduled),
                (*_WRITE, ScheduleNotFound),
                name=api.SCHEDULE_NAME,
            ),
        },
        f"{t}/settings": {
            "get": _op("getSettings", "The topic's limits and defaults", _ref(api.Settings), _READ),
            "put": _op(
                "putSettings",
                "Change the topic's limits and defaults (null removes one)",
                _ref(api.Settings),
                _WRITE,
                body=_ref(api.SettingsRequest),
            ),
        },
        "/topics": {
            "get": _op(
                "listTopics",
                "Every topic in the store with its counts (listings asked while "
                "one runs share the next, which starts once it ended)",
                _ref(api.Topics),
                _LISTING,
                topic=False,
            )
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "200 when the store answers (an answer reused for 1 s)",
                "security": [],
                "responses": {
                    "200": {"description": "ok", **_json(_ref(api.Health))},
                    **_error_responses((StoreError,)),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_error_responses((Unauthorized,)),
                },
            }
        },
        "/ui/overview": {
            "get": {
                **_op(
                    "uiOverview",
                    "Everything the status page at / shows",
                    _ref(Overview),
                    (*_LISTING, InvalidRequest),  # ?fresh= that is not a topic's name
                    topic=False,
                ),
                "parameters": [
                    {
                        "name": "fresh",
                        "in": "query",
                        "required": False,
                        "description": "a topic just acted on: read again, and the "
                        "overview computed now rather than shared with one made up "
                        "to a second before; refused (403) from another site's page",
                        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"},
                    },
                    {
                        "name": "prefix",
                        "in": "query",
                        "required": False,
                        "description": "only the topics whose names start with it "
                        "(topics_total counts them): the page's filter",
                        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{0,128}$"},
                    },
                ],
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {"description": "OpenAPI 3.1", **_json({"type": "object"})},
                    **_error_responses((Unauthorized,)),
                },
            }
        },
    }
    # Every route refuses cross-site and DNS-rebinding requests (403), and a
    # query parameter it does not list or an Expect but 100-continue (400);
    # every route with a body, one that does not arrive within --body-timeout
    # (408).
    for operations in paths.values():
        for op in operations.values():
            op["responses"].update(_error_responses((Forbidden, InvalidRequest)))
            if "requestBody" in op:
                op["responses"].update(_error_responses((RequestTimedOut,)))
            op["responses"] = dict(sorted(op["responses"].items()))
    for kind, rules in _BETWEEN_FIELDS.items():
        schemas[kind.__name__]["allOf"] = rules
    for name in _requests(paths, schemas):
        _whole_numbers_said(schemas[name]["properties"])
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "simplequeue",
            "version": __version__,
            "description": "A durable job queue whose only infrastructure is object storage. "
            "A path none of these routes has is answered 404 with "
            f'{{"error", "reason": "{RouteNotFound.reason}"}}.',
        },
        "paths": _patterns_in_ecma262(paths),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _patterns_in_ecma262(schemas),
        },
        "security": [{"bearer": []}],
    }
