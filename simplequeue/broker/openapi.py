"""The OpenAPI 3 description of the HTTP API, served at /openapi.json."""

from __future__ import annotations

from functools import cache
from typing import Any

from simplequeue import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _answers(ok: dict[str, Any], *codes: int, ok_code: str = "200") -> dict[str, Any]:
    out: dict[str, Any] = {ok_code: {"description": "success", **_json(ok)}}
    reasons = {
        400: "bad input; nothing changed",
        401: "missing or wrong bearer token",
        404: "not found",
        409: "the caller does not hold the claim",
        413: "body too large",
        503: "the store is unavailable or contended; nothing was lost",
    }
    for code in (400, 401, *codes, 503):
        out[str(code)] = {"description": reasons[code], **_json(_ERROR)}
    return out


def _op(
    summary: str, answers: dict[str, Any], body: dict[str, Any] | None = None, job_id: bool = False
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": answers}
    params = [
        {
            "name": "topic",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"},
        }
    ]
    if job_id:
        params.append(
            {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
        )
    op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    return op


@cache
def spec() -> dict[str, Any]:
    """The API description (built once)."""
    number = {"type": "number", "minimum": 0}
    positive = {"type": "number", "minimum": 0, "exclusiveMinimum": True}  # OpenAPI 3.0 form
    job_spec = {
        "type": "object",
        "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": 256},
            "payload": {},
            "priority": {"type": "integer"},
            "delay": number,
            "max_attempts": {"type": "integer", "minimum": 0},
        },
        "required": ["payload"],
        "additionalProperties": False,
    }
    settle = {
        "job_id": {"type": "string"},
        "lease_token": {"type": "string"},
    }
    ids = {"type": "array", "items": {"type": "string"}}
    ref = {"$ref": "#/components/schemas/Job"}
    t = "/topics/{topic}"
    paths: dict[str, Any] = {
        f"{t}/enqueue": {
            "post": _op(
                "Enqueue one job, or a batch as {jobs: [...]}",
                _answers({"type": "object"}, 413, ok_code="201"),
                {
                    "oneOf": [
                        job_spec,
                        {
                            "type": "object",
                            "properties": {"jobs": {"type": "array", "items": job_spec}},
                            "required": ["jobs"],
                            "additionalProperties": False,
                        },
                    ]
                },
            )
        },
        f"{t}/claim": {
            "post": _op(
                "Claim the next job (or count jobs), long-polling up to wait seconds",
                _answers(
                    {
                        "type": "object",
                        "properties": {"job": ref, "jobs": {"type": "array", "items": ref}},
                    },
                    404,
                ),
                {
                    "type": "object",
                    "properties": {
                        "worker_id": {"type": "string", "minLength": 1},
                        "lease": positive,
                        "wait": {"type": "number", "minimum": 0, "maximum": 60},
                        "count": {"type": "integer", "minimum": 1},
                    },
                    "required": ["worker_id"],
                    "additionalProperties": False,
                },
            )
        },
        f"{t}/ack": {
            "post": _op(
                "Complete a claimed job (or several, as {acks: [...]})",
                _answers({"type": "object"}, 404, 409),
                {
                    "type": "object",
                    "properties": {
                        **settle,
                        "result": {},
                        "acks": {"type": "array", "items": {"type": "object"}},
                    },
                    "additionalProperties": False,
                },
            )
        },
        f"{t}/nack": {
            "post": _op(
                "Return a claimed job to pending after delay seconds, or dead when spent",
                _answers({"type": "object"}, 404, 409),
                {
                    "type": "object",
                    "properties": {**settle, "delay": number, "error": {}},
                    "required": ["job_id"],
                    "additionalProperties": False,
                },
            )
        },
        f"{t}/heartbeat": {
            "post": _op(
                "Extend a claim's lease",
                _answers(
                    {"type": "object", "properties": {"lease_expires_at": {"type": "number"}}},
                    404,
                    409,
                ),
                {
                    "type": "object",
                    "properties": {**settle, "lease": positive},
                    "required": ["job_id"],
                    "additionalProperties": False,
                },
            )
        },
        f"{t}/status": {
            "get": _op(
                "Counts of the topic's jobs", _answers({"$ref": "#/components/schemas/Counts"})
            )
        },
        t + "/jobs/{job_id}": {
            "get": _op("A job, or its retained record", _answers(ref, 404), job_id=True)
        },
        f"{t}/dead": {
            "get": _op(
                "Dead jobs",
                _answers(
                    {"type": "object", "properties": {"jobs": {"type": "array", "items": ref}}}
                ),
            ),
            "delete": _op(
                "Purge dead jobs (all, or job_ids)",
                _answers({"type": "object"}),
                {"type": "object", "properties": {"job_ids": ids}, "additionalProperties": False},
            ),
        },
        f"{t}/requeue": {
            "post": _op(
                "Dead jobs (all, or job_ids) back to pending",
                _answers({"type": "object"}),
                {"type": "object", "properties": {"job_ids": ids}, "additionalProperties": False},
            )
        },
        "/topics": {
            "get": {
                "summary": "Every topic in the store with its counts",
                "responses": _answers({"type": "object"}),
            }
        },
        "/healthz": {
            "get": {
                "summary": "200 when the store answers",
                "security": [],
                "responses": {
                    "200": {"description": "ok"},
                    "503": {"description": "store unavailable"},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {"description": "Prometheus text format", "content": {"text/plain": {}}}
                },
            }
        },
        "/ui/overview": {
            "get": {
                "summary": "Everything the status page at / shows",
                "responses": _answers({"type": "object"}),
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3"}}}
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "simplequeue",
            "version": __version__,
            "description": "A durable job queue whose only infrastructure is object storage.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}},
                    "required": ["error"],
                },
                "Counts": {
                    "type": "object",
                    "properties": {
                        k: {"type": "integer"}
                        for k in (
                            "pending",
                            "delayed",
                            "claimed",
                            "completed",
                            "dead",
                            "enqueued",
                            "total",
                        )
                    },
                },
                "Job": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "payload": {},
                        "status": {
                            "type": "string",
                            "enum": ["pending", "claimed", "completed", "dead"],
                        },
                        "priority": {"type": "integer"},
                        "run_at": {"type": "number"},
                        "attempts": {"type": "integer"},
                        "max_attempts": {"type": "integer"},
                        "created_at": {"type": "number"},
                        "lease_token": {"type": "string", "nullable": True},
                    },
                },
            },
        },
        "security": [{"bearer": []}],
    }
