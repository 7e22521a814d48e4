"""The OpenAPI 3.1 description of the HTTP API, served at /openapi.json.

Every schema is generated from the types in simplequeue.api, the same ones the
handlers decode request bodies into: the description cannot drift from what
the broker accepts. Only the routes and their statuses are written here.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec

from simplequeue import __version__, api

_REF = "#/components/schemas/{name}"

#: Every type whose schema the description holds.
_TYPES: tuple[type[Any], ...] = (
    api.JobSpec,
    api.EnqueueBatch,
    api.ClaimRequest,
    api.AckRequest,
    api.AckBatch,
    api.NackRequest,
    api.HeartbeatRequest,
    api.JobIdsRequest,
    api.Job,
    api.Counts,
    api.Enqueued,
    api.EnqueuedBatch,
    api.Claimed,
    api.ClaimedBatch,
    api.Settled,
    api.AckedBatch,
    api.Renewed,
    api.DeadJobs,
    api.Requeued,
    api.Purged,
    api.Topics,
    api.Health,
    api.Error,
)

_REASONS = {
    400: "bad input; nothing changed",
    401: "missing or wrong bearer token",
    404: "not found",
    409: "the caller does not hold the claim",
    413: "body too large",
    503: "the store is unavailable or contended; nothing was lost",
}


def _ref(kind: type[Any]) -> dict[str, Any]:
    return {"$ref": _REF.format(name=kind.__name__)}


def _one_of(*kinds: type[Any]) -> dict[str, Any]:
    return {"oneOf": [_ref(k) for k in kinds]}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _op(
    operation_id: str,
    summary: str,
    ok: dict[str, Any],
    *errors: int,
    body: dict[str, Any] | None = None,
    body_required: bool = True,
    ok_codes: tuple[str, ...] = ("200",),
    topic: bool = True,
    job_id: bool = False,
) -> dict[str, Any]:
    responses: dict[str, Any] = {c: {"description": "success", **_json(ok)} for c in ok_codes}
    for code in sorted({400, 401, *errors, 503}):
        responses[str(code)] = {"description": _REASONS[code], **_json(_ref(api.Error))}
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
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": body_required, **_json(body)}
    return op


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
                413,
                body=_one_of(api.JobSpec, api.EnqueueBatch),
                ok_codes=("201", "200"),
            )
        },
        f"{t}/claim": {
            "post": _op(
                "claim",
                "Claim the next job (or count jobs), long-polling up to wait seconds",
                _one_of(api.Claimed, api.ClaimedBatch),
                404,
                413,
                body=_ref(api.ClaimRequest),
            )
        },
        f"{t}/ack": {
            "post": _op(
                "ack",
                "Complete a claimed job (or several, as {acks: [...]})",
                _one_of(api.Settled, api.AckedBatch),
                404,
                409,
                413,
                body=_one_of(api.AckRequest, api.AckBatch),
            )
        },
        f"{t}/nack": {
            "post": _op(
                "nack",
                "Return a claimed job to pending after delay seconds, or dead when spent",
                _ref(api.Settled),
                404,
                409,
                413,
                body=_ref(api.NackRequest),
            )
        },
        f"{t}/heartbeat": {
            "post": _op(
                "heartbeat",
                "Extend a claim's lease",
                _ref(api.Renewed),
                404,
                409,
                413,
                body=_ref(api.HeartbeatRequest),
            )
        },
        f"{t}/status": {
            "get": _op("getStatus", "Counts of the topic's jobs", _ref(api.Counts)),
        },
        t + "/jobs/{job_id}": {
            "get": _op("getJob", "A job, or its retained record", _ref(api.Job), 404, job_id=True),
        },
        f"{t}/dead": {
            "get": _op("listDead", "Dead jobs", _ref(api.DeadJobs)),
            "delete": _op(
                "purgeDead",
                "Purge dead jobs (all, or job_ids)",
                _ref(api.Purged),
                413,
                body=_ref(api.JobIdsRequest),
                body_required=False,
            ),
        },
        f"{t}/requeue": {
            "post": _op(
                "requeueDead",
                "Dead jobs (all, or job_ids) back to pending",
                _ref(api.Requeued),
                413,
                body=_ref(api.JobIdsRequest),
                body_required=False,
            )
        },
        "/topics": {
            "get": _op(
                "listTopics",
                "Every topic in the store with its counts",
                _ref(api.Topics),
                topic=False,
            )
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "200 when the store answers",
                "security": [],
                "responses": {
                    "200": {"description": "ok", **_json(_ref(api.Health))},
                    "503": {"description": _REASONS[503], **_json(_ref(api.Error))},
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
                    "401": {"description": _REASONS[401], **_json(_ref(api.Error))},
                },
            }
        },
        "/ui/overview": {
            "get": _op(
                "uiOverview",
                "Everything the status page at / shows",
                {"type": "object"},
                topic=False,
            )
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {"description": "OpenAPI 3.1", **_json({"type": "object"})},
                    "401": {"description": _REASONS[401], **_json(_ref(api.Error))},
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "simplequeue",
            "version": __version__,
            "description": "A durable job queue whose only infrastructure is object storage.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
        "security": [{"bearer": []}],
    }
