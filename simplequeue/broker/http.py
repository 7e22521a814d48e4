"""The HTTP API of SPEC section 5: parse, call the engine, answer.

Handlers never touch storage. Every error is answered as {"error": "..."} with
the status ERRORS gives its class; anything unexpected is logged with its
context and answered 500 with a one-line message, never a traceback.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from simplequeue import keys
from simplequeue.broker import page
from simplequeue.broker.metrics import CONTENT_TYPE
from simplequeue.errors import (
    Contended,
    InvalidRequest,
    JobNotFound,
    LeaseLost,
    SimpleQueueError,
    StoreError,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from simplequeue.broker.server import Broker

log = logging.getLogger(__name__)

#: One status per error class; the first match along the class's MRO wins.
ERRORS: dict[type[Exception], int] = {
    InvalidRequest: 400,
    JobNotFound: 404,
    LeaseLost: 409,
    Contended: 503,
    StoreUnavailable: 503,
    StoreError: 503,
}

BROKER: web.AppKey[Broker] = web.AppKey("broker")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def status_of(exc: SimpleQueueError) -> int:
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            return ERRORS[cls]
    return 500


def reply(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error(message: str, status: int, **headers: str) -> web.Response:
    response = reply({"error": message}, status)
    response.headers.update(headers)
    return response


# --- the middleware ------------------------------------------------------------------


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Auth, errors as {"error"}, and metrics, in one pass: every request runs
    through it, so it is kept to one frame and cached metric children."""
    started = time.perf_counter()
    broker = request.app[BROKER]
    response = await _answer(request, handler, broker)
    info = request.match_info
    route = info.route.resource.canonical if info.route.resource else "unmatched"
    counter, timer = broker.metrics.http_children(route, request.method, response.status)
    counter.inc()
    timer.observe(time.perf_counter() - started)
    return response


async def _answer(request: web.Request, handler: Handler, broker: Broker) -> web.StreamResponse:
    token = broker.settings.token
    if token and request.path != "/healthz" and not page.is_public(request.path):
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return error("missing or wrong bearer token", 401, **{"WWW-Authenticate": "Bearer"})
    try:
        return await handler(request)
    except SimpleQueueError as exc:
        return error(str(exc) or type(exc).__name__, status_of(exc))
    except web.HTTPException as exc:
        if exc.status == 413:
            return error(f"request body is larger than {broker.settings.max_body} bytes", 413)
        if exc.status < 400:
            raise
        return error(
            exc.reason,
            exc.status,
            **{k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")},
        )
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error("internal error", 500)


# --- parsing -----------------------------------------------------------------------


async def body_of(request: web.Request, allowed: set[str], required: bool = True) -> dict[str, Any]:
    """The JSON object in the body, with only `allowed` keys."""
    raw = await request.read()
    if not raw.strip():
        if required:
            raise InvalidRequest("the body must be a JSON object")
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    return body


def topic_of(request: web.Request) -> str:
    return keys.check_topic(request.match_info["topic"])


def broker_of(request: web.Request) -> Broker:
    return request.app[BROKER]


JOB_FIELDS = {"id", "payload", "priority", "delay", "max_attempts"}


# --- handlers -------------------------------------------------------------------------


async def enqueue(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, JOB_FIELDS | {"jobs"})
    engine = broker_of(request).engine
    if "jobs" in body:
        if set(body) != {"jobs"}:
            raise InvalidRequest('a batch is {"jobs": [...]} and nothing else')
        if not isinstance(body["jobs"], list):
            raise InvalidRequest("jobs must be a list of job objects")
        answers = await engine.enqueue(topic, body["jobs"])
        ids = [a["id"] for a in answers]
        duplicates = [a["id"] for a in answers if a["duplicate"]]
        fresh = len(duplicates) < len(answers)
        return reply({"ids": ids, "duplicates": duplicates}, 201 if fresh else 200)
    [answer] = await engine.enqueue(topic, [body])
    if answer["duplicate"]:
        return reply({"id": answer["id"], "duplicate": True}, 200)
    return reply({"id": answer["id"]}, 201)


async def claim(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, {"worker_id", "lease", "wait", "count"})
    if "worker_id" not in body:
        raise InvalidRequest("worker_id is required")
    jobs = await broker_of(request).engine.claim(
        topic,
        body["worker_id"],
        lease=body.get("lease"),
        count=body.get("count", 1),
        wait=body.get("wait", 0) or 0,
    )
    if not jobs:
        return error("no job is claimable", 404)
    return reply({"jobs": jobs} if "count" in body else {"job": jobs[0]})


async def ack(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, {"job_id", "lease_token", "result", "acks"})
    engine = broker_of(request).engine
    if "acks" in body:
        if set(body) != {"acks"}:
            raise InvalidRequest('a batch is {"acks": [...]} and nothing else')
        return reply({"results": await engine.ack_many(topic, body["acks"])})
    return reply(
        await engine.ack(topic, body.get("job_id"), body.get("lease_token"), body.get("result"))
    )


async def nack(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, {"job_id", "lease_token", "delay", "error"})
    return reply(
        await broker_of(request).engine.nack(
            topic, body.get("job_id"), body.get("lease_token"), body.get("delay"), body.get("error")
        )
    )


async def heartbeat(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, {"job_id", "lease_token", "lease"})
    return reply(
        await broker_of(request).engine.heartbeat(
            topic, body.get("job_id"), body.get("lease_token"), body.get("lease")
        )
    )


async def status(request: web.Request) -> web.Response:
    return reply(await broker_of(request).engine.status(topic_of(request)))


async def job(request: web.Request) -> web.Response:
    topic = topic_of(request)
    return reply(await broker_of(request).engine.job(topic, request.match_info["job_id"]))


async def dead(request: web.Request) -> web.Response:
    return reply({"jobs": await broker_of(request).engine.dead(topic_of(request))})


async def requeue(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, {"job_ids"}, required=False)
    ids = await broker_of(request).engine.requeue(topic, body.get("job_ids"))
    return reply({"requeued": ids})


async def purge(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, {"job_ids"}, required=False)
    ids = await broker_of(request).engine.purge(topic, body.get("job_ids"))
    return reply({"purged": ids})


async def topics(request: web.Request) -> web.Response:
    return reply({"topics": await broker_of(request).engine.topics()})


async def healthz(request: web.Request) -> web.Response:
    broker = broker_of(request)
    await broker.check_store()
    return reply(
        {"ok": True, "broker_id": broker.settings.broker_id, "active": broker.announcer.active}
    )


async def metrics(request: web.Request) -> web.Response:
    body = broker_of(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    from simplequeue.broker.openapi import spec

    return reply(spec())


def build_app(broker: Broker) -> web.Application:
    """The aiohttp application of one broker."""
    app = web.Application(
        middlewares=[middleware],
        client_max_size=broker.settings.max_body,
    )
    app[BROKER] = broker
    t = "/topics/{topic}"
    app.router.add_routes(
        [
            web.post(f"{t}/enqueue", enqueue),
            web.post(f"{t}/claim", claim),
            web.post(f"{t}/ack", ack),
            web.post(f"{t}/nack", nack),
            web.post(f"{t}/heartbeat", heartbeat),
            web.get(f"{t}/status", status),
            web.get(t + "/jobs/{job_id}", job),
            web.get(f"{t}/dead", dead),
            web.post(f"{t}/requeue", requeue),
            web.delete(f"{t}/dead", purge),
            web.get("/topics", topics),
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
            web.get("/openapi.json", openapi),
        ]
    )
    page.setup(app, broker)
    return app
