"""The HTTP API of SPEC section 5: parse, call the engine, answer.

Handlers never touch storage. Every error is answered as {"error": "..."} with
its class's `http_status` (simplequeue.errors); anything unexpected is logged with its
context and answered 500 with a one-line message, never a traceback.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import orjson
from aiohttp import web

from simplequeue import api, keys
from simplequeue.broker import page
from simplequeue.broker.engine import Engine
from simplequeue.broker.forwarding import FORWARDED, OWNER, REPLAYED, Forwarder, Here
from simplequeue.broker.metrics import CONTENT_TYPE, Metrics
from simplequeue.errors import (
    InvalidRequest,
    NothingToClaim,
    PayloadTooLarge,
    SimpleQueueError,
    Unauthorized,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


async def _nothing(topic: str) -> None:
    return None


@dataclass(frozen=True)
class HttpServices:
    """What the HTTP face of a broker uses, and nothing more."""

    engine: Engine
    metrics: Metrics
    token: str | None  # with one, every route but /healthz and the page's shell needs it
    max_body: int  # bytes
    about: Callable[[], dict[str, Any]]  # this broker, for /healthz
    presence: Callable[[], page.Presence]  # this broker and broker.json, for the page
    url: Callable[[], str] = lambda: ""  # this broker's advertised URL
    forwarder: Forwarder | None = None  # sends a topic's requests to its owner
    refresh: Callable[[str], Awaitable[None]] = _nothing  # a topic changed behind our back


SERVICES: web.AppKey[HttpServices] = web.AppKey("services")
# A request's body as rewritten before it was passed on.
_BODY: web.RequestKey[bytes] = web.RequestKey("body", bytes)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def reply(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error(message: str, status: int, **headers: str) -> web.Response:
    response = reply({"error": message}, status)
    response.headers.update(headers)
    return response


def error_of(exc: SimpleQueueError) -> web.Response:
    """Our error's answer: its message, and its reason where its status alone
    does not tell it apart (a cancelled job's 409)."""
    if exc.reason is None:
        return error(str(exc), exc.http_status)
    return reply({"error": str(exc), "reason": exc.reason}, exc.http_status)


# --- the middleware ------------------------------------------------------------------


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Auth, errors as {"error"}, and metrics, in one pass: every request runs
    through it, so it is kept to one frame and cached metric children."""
    started = time.perf_counter()
    services = request.app[SERVICES]
    response = await _answer(request, handler, services)
    info = request.match_info
    route = info.route.resource.canonical if info.route.resource else "unmatched"
    counter, timer = services.metrics.http_children(route, request.method, response.status)
    counter.inc()
    timer.observe(time.perf_counter() - started)
    return response


async def _answer(
    request: web.Request, handler: Handler, services: HttpServices
) -> web.StreamResponse:
    token = services.token
    if token and request.path != "/healthz" and not page.is_public(request.path):
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            refused = Unauthorized("missing or wrong bearer token")
            return error(str(refused), refused.http_status, **{"WWW-Authenticate": "Bearer"})
    try:
        if "topic" in request.match_info:
            return await _routed(request, handler, services)
        return await handler(request)
    except SimpleQueueError as exc:
        return error_of(exc)
    except web.HTTPRequestEntityTooLarge:  # aiohttp's, past client_max_size
        too_large = PayloadTooLarge(f"request body is larger than {services.max_body} bytes")
        return error(str(too_large), too_large.http_status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(
            exc.reason,
            exc.status,
            **{k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")},
        )
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error("internal error", SimpleQueueError.http_status)


async def _routed(
    request: web.Request, handler: Handler, services: HttpServices
) -> web.StreamResponse:
    """A topic's request, served by its owner (SPEC 4.3): here, or forwarded
    to it. Either way the answer names who served it (Simplequeue-Owner), so
    that a client sends the topic's next requests there itself."""
    forwarder = services.forwarder
    topic = topic_of(request)
    if forwarder is None or FORWARDED in request.headers or forwarder.membership.owns(topic):
        response = await handler(request)  # the common case: the body is read once, there
        response.headers[OWNER] = services.url()
        return response
    body = await request.read()
    wait = 0.0
    name = request.match_info.route.name
    if name in ("claim", "pop"):
        wait = api.decode(body, api.ClaimRequest).wait
    elif name == "job":
        wait = wait_of(request)
    elif name in ("enqueue", "push"):
        # Ids go with it, so that a broker that serves it after one that did not
        # answer (and may have done it) serves the same jobs: duplicates there.
        request[_BODY] = body = _with_ids(body)
    got = await forwarder.route(topic, request.method, request.path_qs, body or None, wait=wait)
    if isinstance(got, Here):  # its owner, or the next when those before did not answer
        try:
            response = await handler(request)
        except SimpleQueueError as exc:
            if not got.replayed:
                raise
            response = error_of(exc)  # answered here, to say it may be a repeat
        response.headers[OWNER] = services.url()
        if got.replayed:
            response.headers[REPLAYED] = "1"
        return response
    answered = web.Response(body=got.body, status=got.status, headers=got.headers)
    answered.headers["Content-Type"] = got.content_type
    answered.headers[OWNER] = got.served_by.url
    if got.replayed:
        answered.headers[REPLAYED] = "1"
    return answered


def _with_ids(body: bytes) -> bytes:
    """An enqueue's body with an id for every job (api.with_ids), so that it can
    be sent on to the next broker when the first did not answer."""
    spec = api.decode_either(body, api.JobSpec, api.EnqueueBatch, "jobs")
    if isinstance(spec, api.JobSpec):
        return body if spec.id is not None else msgspec.json.encode(api.with_ids([spec])[0])
    if all(j.id is not None for j in spec.jobs):
        return body
    return msgspec.json.encode(api.EnqueueBatch(api.with_ids(spec.jobs)))


# --- parsing -----------------------------------------------------------------------


async def raw_body(request: web.Request) -> bytes:
    """The request's body, as _routed rewrote it if it did."""
    rewritten = request.get(_BODY)
    return rewritten if rewritten is not None else await request.read()


async def body_of(request: web.Request, kind: type[T], required: bool = True) -> T:
    """The body, decoded and validated as `kind` (a type of simplequeue.api). An
    empty body is `kind()` when the request may have none."""
    raw = await raw_body(request)
    if not required and not raw.strip():
        return kind()
    return api.decode(raw, kind)


def topic_of(request: web.Request) -> str:
    return keys.check_topic(request.match_info["topic"])


def engine_of(request: web.Request) -> Engine:
    return request.app[SERVICES].engine


# --- handlers -------------------------------------------------------------------------


async def enqueue(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = api.decode_either(await raw_body(request), api.JobSpec, api.EnqueueBatch, "jobs")
    engine = engine_of(request)
    if isinstance(body, api.EnqueueBatch):
        answers = await engine.enqueue(topic, body.jobs)
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
    body = await body_of(request, api.ClaimRequest)
    jobs = await engine_of(request).claim(
        topic, body.worker_id, lease=body.lease, count=body.count or 1, wait=body.wait
    )
    if not jobs:
        raise NothingToClaim("no job is claimable")
    return reply({"jobs": jobs} if body.count is not None else {"job": jobs[0]})


async def pop(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, api.ClaimRequest)
    jobs = await engine_of(request).pop(
        topic, body.worker_id, count=body.count or 1, wait=body.wait
    )
    if not jobs:
        raise NothingToClaim("no job is claimable")
    return reply({"jobs": jobs})


async def push(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, api.EnqueueBatch)
    return reply({"length": await engine_of(request).push(topic, body.jobs)})


async def release(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, api.ReleaseRequest)
    held = [{"id": c.job_id, "lease_token": c.lease_token} for c in body.claims]
    await engine_of(request).release(topic, held)
    return reply({"released": len(held)})


async def refresh(request: web.Request) -> web.Response:
    topic = topic_of(request)
    await request.app[SERVICES].refresh(topic)
    return reply({"ok": True})


async def ack(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = api.decode_either(await raw_body(request), api.AckRequest, api.AckBatch, "acks")
    engine = engine_of(request)
    if isinstance(body, api.AckBatch):
        return reply({"results": await engine.ack_many(topic, body.acks)})
    return reply(await engine.ack(topic, body.job_id, body.lease_token, body.result, body.enqueue))


async def nack(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, api.NackRequest)
    return reply(
        await engine_of(request).nack(topic, body.job_id, body.lease_token, body.delay, body.error)
    )


async def heartbeat(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, api.HeartbeatRequest)
    return reply(
        await engine_of(request).heartbeat(topic, body.job_id, body.lease_token, body.lease)
    )


async def status(request: web.Request) -> web.Response:
    return reply(await engine_of(request).status(topic_of(request)))


async def job(request: web.Request) -> web.Response:
    topic = topic_of(request)
    wait = wait_of(request)
    return reply(await engine_of(request).job(topic, request.match_info["job_id"], wait))


def wait_of(request: web.Request) -> float:
    """The `wait` query parameter (seconds a long poll may wait), validated."""
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    return api.convert(_number(raw), api.WaitQuery).wait


def _number(raw: str) -> dict[str, Any]:
    try:
        return {"wait": float(raw)}
    except ValueError:
        raise InvalidRequest(f"wait must be a number of seconds, not {raw!r}") from None


async def dead(request: web.Request) -> web.Response:
    return reply({"jobs": await engine_of(request).dead(topic_of(request))})


async def requeue(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, api.JobIdsRequest, required=False)
    ids = await engine_of(request).requeue(topic, body.job_ids)
    return reply({"requeued": ids})


async def purge(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, api.JobIdsRequest, required=False)
    ids = await engine_of(request).purge(topic, body.job_ids)
    return reply({"purged": ids})


async def cancel(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, api.CancelRequest)
    return reply(await engine_of(request).cancel(topic, body.job_ids))


async def put_schedule(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, api.ScheduleRequest)
    name = request.match_info["name"]
    return reply(await engine_of(request).put_schedule(topic, name, body))


async def schedules(request: web.Request) -> web.Response:
    return reply({"schedules": await engine_of(request).schedules(topic_of(request))})


async def delete_schedule(request: web.Request) -> web.Response:
    topic = topic_of(request)
    name = request.match_info["name"]
    await engine_of(request).delete_schedule(topic, name)
    return reply({"deleted": name})


async def settings(request: web.Request) -> web.Response:
    return reply(await engine_of(request).settings(topic_of(request)))


async def put_settings(request: web.Request) -> web.Response:
    topic = topic_of(request)
    body = await body_of(request, api.SettingsRequest)
    return reply(await engine_of(request).put_settings(topic, body))


async def topics(request: web.Request) -> web.Response:
    counts, errors = await engine_of(request).topics()
    return reply({"topics": counts, "errors": errors})


async def healthz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    await services.engine.check_store()
    return reply({"ok": True, **services.about()})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVICES].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    from simplequeue.broker.openapi import spec

    return reply(spec())


def build_app(services: HttpServices) -> web.Application:
    """The aiohttp application of one broker."""
    app = web.Application(middlewares=[middleware], client_max_size=services.max_body)
    app[SERVICES] = services
    t = "/topics/{topic}"
    app.router.add_routes(
        [
            web.post(f"{t}/enqueue", enqueue, name="enqueue"),
            web.post(f"{t}/claim", claim, name="claim"),
            web.post(f"{t}/pop", pop, name="pop"),
            web.post(f"{t}/push", push, name="push"),
            web.post(f"{t}/release", release),
            web.post(f"{t}/refresh", refresh),
            web.post(f"{t}/ack", ack),
            web.post(f"{t}/nack", nack),
            web.post(f"{t}/heartbeat", heartbeat),
            web.get(f"{t}/status", status),
            web.get(t + "/jobs/{job_id}", job, name="job"),
            web.get(f"{t}/dead", dead),
            web.post(f"{t}/requeue", requeue),
            web.delete(f"{t}/dead", purge),
            web.post(f"{t}/cancel", cancel),
            web.get(f"{t}/schedules", schedules),
            web.put(t + "/schedules/{name}", put_schedule),
            web.delete(t + "/schedules/{name}", delete_schedule),
            web.get(f"{t}/settings", settings),
            web.put(f"{t}/settings", put_settings),
            web.get("/topics", topics),
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
            web.get("/openapi.json", openapi),
        ]
    )
    page.setup(app, services.engine, services.presence)
    return app
