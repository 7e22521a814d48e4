"""The API's types at the edge: what they accept, what cannot be stored, and the
OpenAPI description generated from them (read by a generated client)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest

from simplequeue import api, errors
from simplequeue.broker import page
from simplequeue.broker.openapi import spec
from simplequeue.errors import InvalidRequest, SimpleQueueError, Unauthorized
from simplequeue.objstore.memfs import MemStore


def nested(depth: int) -> Any:
    value: Any = "core"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


# --- what cannot be stored is refused at the edge --------------------------------------


def test_depth_up_to_the_limit_is_storable_and_one_more_is_not() -> None:
    api.check_storable(nested(api.MAX_DEPTH), "payload")
    with pytest.raises(InvalidRequest, match=f"deeper than {api.MAX_DEPTH}"):
        api.check_storable(nested(api.MAX_DEPTH + 1), "payload")


@pytest.mark.parametrize(
    ("raw", "kind", "said"),
    [
        (
            b'{"job_id": "j", "enqueue": [{"topic": "a b", "payload": 1}]}',
            api.AckRequest,
            "topic name",
        ),
        (b'{"id": "a\\u0001", "payload": 1}', api.JobSpec, "no control characters"),
    ],
)
def test_a_field_that_breaks_its_pattern_is_said_in_words_not_as_a_regex(
    raw: bytes, kind: type[Any], said: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        api.decode(raw, kind)
    assert said in str(refused.value) and "regex" not in str(refused.value)
    with pytest.raises(InvalidRequest) as refused:
        api.convert(orjson.loads(raw), kind)
    assert said in str(refused.value)


def test_integers_beyond_64_bits_are_not_storable() -> None:
    api.check_storable(2**63 - 1, "payload")
    with pytest.raises(InvalidRequest, match="cannot be stored"):
        api.check_storable({"n": 2**70}, "payload")


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, data=orjson.dumps(body)) as r:
        return r.status, await r.json()


@pytest.mark.parametrize("bad", [nested(300), {"n": 2**70}], ids=["300 deep", "2**70"])
async def test_a_payload_the_store_cannot_encode_is_rejected_alone(
    start_broker: Callable[..., Awaitable[Any]], bad: Any
) -> None:
    """It used to pass parsing, then fail its whole group-commit batch with 503."""
    broker = await start_broker(MemStore())
    url = broker.url + "/topics/t/enqueue"
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(
            session.post(url, data=b'{"id": "bad", "payload": ' + _json(bad) + b"}"),
            *(post(session, url, {"payload": i}) for i in range(20)),
        )
        refused = answers[0]
        assert refused.status == 400
        assert "payload" in (await refused.json())["error"]
        refused.release()
        assert [status for status, _ in answers[1:]] == [201] * 20
        async with session.get(broker.url + "/topics/t/status") as r:
            assert (await r.json())["pending"] == 20


def _json(value: Any) -> bytes:
    """JSON of values orjson will not write (too deep, too large), by hand."""
    if isinstance(value, dict):
        return b"{" + b",".join(orjson.dumps(k) + b":" + _json(v) for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(_json(v) for v in value) + b"]"
    return str(value).encode() if isinstance(value, int) else orjson.dumps(value)


async def test_a_result_the_store_cannot_encode_is_refused_and_the_job_stays_claimed(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    broker = await start_broker(MemStore())
    base = broker.url + "/topics/t"
    async with aiohttp.ClientSession() as session:
        await post(session, base + "/enqueue", {"id": "a", "payload": 1})
        _, claimed = await post(session, base + "/claim", {"worker_id": "w"})
        token = claimed["job"]["lease_token"]
        body = b'{"job_id":"a","lease_token":"' + token.encode() + b'","result":'
        async with session.post(base + "/ack", data=body + _json(nested(300)) + b"}") as r:
            assert r.status == 400
        async with session.get(base + "/jobs/a") as r:
            assert (await r.json())["status"] == "claimed"


@pytest.mark.parametrize("bad", [nested(300), {"n": 2**70}], ids=["300 deep", "2**70"])
async def test_a_nack_error_the_store_cannot_encode_is_refused_and_the_job_stays_claimed(
    start_broker: Callable[..., Awaitable[Any]], bad: Any
) -> None:
    """It used to raise TypeError while cutting the error to text: a 500."""
    broker = await start_broker(MemStore())
    base = broker.url + "/topics/t"
    async with aiohttp.ClientSession() as session:
        await post(session, base + "/enqueue", {"id": "a", "payload": 1})
        _, claimed = await post(session, base + "/claim", {"worker_id": "w"})
        token = claimed["job"]["lease_token"]
        body = b'{"job_id":"a","lease_token":"' + token.encode() + b'","error":'
        async with session.post(base + "/nack", data=body + _json(bad) + b"}") as r:
            assert r.status == 400
            assert (await r.json())["error"].startswith("the error")
        async with session.get(base + "/jobs/a") as r:
            job = await r.json()
        assert (job["status"], job["attempts"], job["last_error"]) == ("claimed", 1, None)


def test_a_deep_payload_within_the_limit_survives_a_round_trip() -> None:
    spec_ = api.decode(orjson.dumps({"payload": nested(api.MAX_DEPTH)}), api.JobSpec)
    assert spec_.payload == nested(api.MAX_DEPTH)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"payload": 1, "id": "a\\nb"}',  # a control character in an id
        b'{"payload": 1, "id": ""}',
        b'{"payload": 1, "priority": true}',
        b'{"payload": 1, "max_attempts": 1.5}',
    ],
)
def test_job_specs_are_strict(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        api.decode(raw, api.JobSpec)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"payload": 1, "topic": "out\\n"}',  # a follow-up no topic can take
        b'{"payload": 1, "id": "x\\n"}',
    ],
)
def test_a_name_or_id_ending_in_a_newline_is_refused(raw: bytes) -> None:
    """The patterns ended in "$", which also matches before a final newline:
    a follow-up for "out\\n" passed the ack, then clogged the outbox for ever
    (delivery refuses the name)."""
    with pytest.raises(InvalidRequest):
        api.decode(raw, api.FollowUpSpec)


def test_a_schedule_name_ending_in_a_newline_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        api.check_schedule_name("nightly\n")
    with pytest.raises(InvalidRequest):
        api.decode(b'{"worker_id": "w\\n"}', api.ClaimRequest)


def test_a_well_formed_body_that_breaks_a_rule_is_not_called_malformed_json() -> None:
    with pytest.raises(InvalidRequest) as refused:
        api.decode(b'{"worker_id": "w", "wait": 1000}', api.ClaimRequest)
    assert "malformed" not in str(refused.value) and "wait" in str(refused.value)
    with pytest.raises(InvalidRequest, match="malformed JSON"):
        api.decode(b'{"worker_id": ', api.ClaimRequest)


def test_a_batch_is_its_field_and_nothing_else() -> None:
    body = api.decode_either(b'{"jobs": [{"payload": 1}]}', api.JobSpec, api.EnqueueBatch, "jobs")
    assert isinstance(body, api.EnqueueBatch)
    with pytest.raises(InvalidRequest, match="nothing else"):
        api.decode_either(
            b'{"jobs": [{"payload": 1}], "id": "x"}', api.JobSpec, api.EnqueueBatch, "jobs"
        )


# --- the OpenAPI description ------------------------------------------------------------


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, methods in spec()["paths"].items()
        for method, op in methods.items()
    ]


def test_every_route_has_one_operation_id_of_its_own() -> None:
    ids = [op.get("operationId") for _, _, op in operations()]
    assert all(ids) and len(set(ids)) == len(ids)


async def test_the_routes_that_take_a_body_are_those_the_openapi_description_gives_one(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """A broker that passes a request on reads its body only if its route
    takes one (Route.takes_body): a route marked wrong would have a body it
    needs dropped, or one its owner ignores held to --max-body."""
    from simplequeue.broker.http import _routes

    broker = await start_broker(MemStore())
    published = {(path, method.upper()): "requestBody" in op for path, method, op in operations()}
    marked = {(r.path, r.method): r.takes_body for r in _routes(broker.http_api.page)}
    assert {k: v for k, v in marked.items() if k in published} == published


def test_every_reference_resolves() -> None:
    schemas = spec()["components"]["schemas"]
    refs = {
        ref.rsplit("/", 1)[1] for ref in _refs(spec()) if ref.startswith("#/components/schemas/")
    }
    assert refs and refs <= set(schemas)


async def test_the_overviews_400_is_in_the_openapi_description(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """GET /ui/overview?fresh=<not a topic> answers 400 (keys.check_topic), but
    /openapi.json listed only 200, 401, 403 and 503 for it (review of the HTTP edge)."""
    broker = await start_broker(MemStore())
    async with aiohttp.ClientSession() as s, s.get(f"{broker.url}/ui/overview?fresh=no!") as r:
        status = r.status
        assert "error" in await r.json()
    documented = spec()["paths"]["/ui/overview"]["get"]["responses"]
    assert str(status) in documented, (status, sorted(documented))


async def test_every_field_of_a_batch_acks_answer_is_in_the_openapi_description(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """A batch ack's result for a completed job carries the follow-ups it
    enqueued, as a single ack's answer (Settled) does, but AckResult had only
    id, status and error: the field was undescribed, and the SDK's ack_many,
    which decodes into it, dropped it (review of the HTTP edge, round 26)."""
    broker = await start_broker(MemStore())
    base = broker.url + "/topics/t"
    async with aiohttp.ClientSession() as session:
        await post(session, base + "/enqueue", {"id": "a", "payload": 1})
        _, claimed = await post(session, base + "/claim", {"worker_id": "w"})
        ack = {"job_id": "a", "lease_token": claimed["job"]["lease_token"]}
        follow_ups = [{"id": "b", "payload": 2}, {"id": "a", "payload": 3}]  # a: itself
        status, answer = await post(
            session, base + "/ack", {"acks": [ack | {"enqueue": follow_ups}]}
        )
    assert status == 200
    [result] = answer["results"]
    assert (result["enqueued"], result["duplicates"]) == (["b"], ["a"])
    described = spec()["components"]["schemas"]["AckResult"]["properties"]
    assert set(result) <= set(described), sorted(set(result) - set(described))


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _patterns(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [
            p
            for k, v in node.items()
            for p in ([v] if k == "pattern" and isinstance(v, str) else _patterns(v))
        ]
    if isinstance(node, list):
        return [p for v in node for p in _patterns(v)]
    return []


# Names each published pattern is tried on, none ending in a newline (where
# Python's $ and ECMA-262's part).
NAMES = ["nightly", "Z", "endsZ", "a.b", ".", "..", "", "x" * 129, "job 1", "tab\there", "ü"]


def test_published_patterns_have_no_python_anchors_and_take_the_names_the_broker_does() -> None:
    """OpenAPI 3.1 patterns are ECMA-262 regular expressions, which have no
    \\Z or \\A. The published ones ended in \\Z (api.py's, for Python): with
    the u flag (ajv, most JS validators) they did not compile; without it \\Z
    is a literal Z, so a generated client or a validating proxy refused the
    schedule "nightly" (review of schedules, round 26)."""
    published = _patterns(spec())
    assert published
    assert [p for p in published if "\\Z" in p or "\\A" in p] == []
    ops = spec()["paths"]["/topics/{topic}/schedules/{name}"]
    for method, check in (
        ("put", api.check_new_schedule_name),
        ("delete", api.check_schedule_name),
    ):
        [name] = [p for p in ops[method]["parameters"] if p["name"] == "name"]
        for candidate in NAMES:
            try:
                check(candidate)
                allowed = True
            except InvalidRequest:
                allowed = False
            assert bool(re.search(name["schema"]["pattern"], candidate)) == allowed, (
                method,
                candidate,
            )


def test_published_patterns_read_in_ecma262_as_in_python() -> None:
    """Each published pattern compiles in JavaScript, with the u flag and
    without, and matches the same names there as in Python."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node evaluates ECMA-262 patterns (the test above needs none)")
    script = (
        "const [patterns, names] = JSON.parse(process.argv[1]);"
        "console.log(JSON.stringify(patterns.map(p => ['', 'u'].map(f => {"
        "  try { const r = new RegExp(p, f); return names.map(n => r.test(n)); }"
        "  catch (e) { return 'error: ' + e.message; } }))));"
    )
    published = sorted(set(_patterns(spec())))
    ran = subprocess.run(
        [node, "-e", script, orjson.dumps([published, NAMES]).decode()],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    in_python = [[bool(re.search(p, n)) for n in NAMES] for p in published]
    assert orjson.loads(ran.stdout) == [[m, m] for m in in_python]


def _valid_by_the_description(schema: str, instance: Any) -> bool:
    import jsonschema_rs  # installed with schemathesis, a dev dependency

    document = {"$ref": f"#/components/schemas/{schema}", "components": spec()["components"]}
    return bool(jsonschema_rs.validator_for(document).is_valid(instance))


@pytest.mark.parametrize(
    ("path", "schema", "body"),
    [
        ("/enqueue", "JobSpec", {"payload": 1, "delay": 5, "run_at": 10}),
        ("/enqueue", "JobSpec", {"payload": 1, "delay": 0, "run_at": 10}),
        ("/enqueue", "JobSpec", {"payload": 1, "delay": 5, "run_at": None}),
        ("/schedules/s", "ScheduleRequest", {"payload": 1}),
        ("/schedules/s", "ScheduleRequest", {"payload": 1, "every": None, "cron": None}),
        ("/schedules/s", "ScheduleRequest", {"payload": 1, "every": 60}),
        ("/schedules/s", "ScheduleRequest", {"payload": 1, "every": 60, "cron": "0 0 * * *"}),
        ("/schedules/s", "ScheduleRequest", {"payload": 1, "every": 60, "tz": "UTC"}),
        ("/schedules/s", "ScheduleRequest", {"payload": 1, "cron": "0 0 * * *", "tz": "UTC"}),
        ("/settings", "SettingsRequest", {"burst": 3}),
        ("/settings", "SettingsRequest", {"burst": 3, "rate": None}),
        ("/settings", "SettingsRequest", {"burst": 3, "rate": 1}),
        ("/settings", "SettingsRequest", {"burst": None}),
    ],
    ids=[
        "delay-and-run_at",
        "delay-0-and-run_at",
        "delay-and-run_at-null",
        "no-every-or-cron",
        "every-and-cron-null",
        "every",
        "every-and-cron",
        "every-and-tz",
        "cron-and-tz",
        "burst-without-rate",
        "burst-and-rate-null",
        "burst-and-rate",
        "burst-null",
    ],
)
async def test_the_openapi_description_calls_valid_the_requests_the_broker_takes(
    start_broker: Callable[..., Awaitable[Any]], path: str, schema: str, body: dict[str, Any]
) -> None:
    """SPEC 5: /openapi.json describes every request, generated from the
    types that validate requests. Rules between fields that the types' checks
    make, not their fields' types, were not in it: a client generated from
    it (or schemathesis, which found these) sent what it calls valid, and was
    answered 400 (review of the request edge). A topic's settings here have
    no rate (a burst alone is taken on a topic that has one; the description
    asks for it with its rate)."""
    broker = await start_broker(MemStore())
    method = "PUT" if path != "/enqueue" else "POST"
    async with aiohttp.ClientSession() as session:
        url = broker.url + "/topics/t" + path
        async with session.request(method, url, data=orjson.dumps(body)) as r:
            status, answer = r.status, await r.json()
    assert status in (200, 201, 400), answer
    assert _valid_by_the_description(schema, body) == (status != 400), answer


def test_a_follow_up_with_a_delay_and_a_run_at_is_invalid_by_the_description() -> None:
    """A follow-up job is a job spec: refused with both, as an enqueue is."""
    both = {"payload": 1, "delay": 5, "run_at": 10}
    with pytest.raises(InvalidRequest):
        api.decode(orjson.dumps({"job_id": "j", "enqueue": [both]}), api.AckRequest)
    assert not _valid_by_the_description("FollowUpSpec", both)


def _integer_fields(node: Any) -> list[dict[str, Any]]:
    """The schemas of type integer in `node` (an object's fields, and theirs)."""
    if isinstance(node, dict):
        found = [node] if node.get("type") == "integer" else []
        return found + [f for v in node.values() for f in _integer_fields(v)]
    if isinstance(node, list):
        return [f for v in node for f in _integer_fields(v)]
    return []


async def test_every_integer_field_says_it_refuses_an_integral_number_with_a_fraction(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    """JSON Schema's integer is any number with no fractional part: 2.0 is
    one, and the description called valid what the broker refuses (400), as
    msgspec decodes an integer only from one written without a fraction or
    exponent (review of the request edge). JSON Schema cannot say that with
    "integer": every integer field of a request body says it in words."""
    broker = await start_broker(MemStore())
    async with aiohttp.ClientSession() as session:
        for path, body in (
            ("/claim", {"worker_id": "w", "count": 2.0}),
            ("/enqueue", {"payload": 1, "max_attempts": 3.0}),
            ("/enqueue", {"payload": 1, "priority": 1.0}),
            ("/enqueue", {"payload": 1, "priority": 1e0}),
        ):
            schema = "ClaimRequest" if path == "/claim" else "JobSpec"
            assert _valid_by_the_description(schema, body)
            async with session.post(f"{broker.url}/topics/t{path}", data=orjson.dumps(body)) as r:
                assert r.status == 400, (body, await r.json())
    schemas = spec()["components"]["schemas"]
    requests = {
        ref.rsplit("/", 1)[1]
        for op in (op for _, _, op in operations())
        for ref in _refs(op.get("requestBody", {}))
    }
    while more := {r.rsplit("/", 1)[1] for n in requests for r in _refs(schemas[n])} - requests:
        requests |= more
    fields = [f for n in sorted(requests) for f in _integer_fields(schemas[n]["properties"])]
    assert len(fields) >= 9  # priority, max_attempts, count, every, burst, max_claimed...
    assert [f for f in fields if "2.0" not in f.get("description", "")] == []


def test_error_answers_are_those_of_the_error_classes() -> None:
    """Every route may meet a wrong token (but /healthz), every topic route a
    corrupt object (500), bad input (400) and the store (503), every write a full
    disk (507); each status documented is an error class's, described by it."""
    statuses = {
        c.http_status
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, SimpleQueueError)
    }
    for path, method, op in operations():
        answered = {int(code) for code in op["responses"] if int(code) >= 400}
        assert answered <= statuses, (path, method)
        assert (401 in answered) == (path != "/healthz"), (path, method)
        assert 403 in answered, (path, method)  # cross-site, DNS rebinding
        assert (408 in answered) == ("requestBody" in op), (path, method)  # --body-timeout
        assert 503 in answered or path in ("/metrics", "/openapi.json"), (path, method)
        if path.startswith("/topics/{topic}"):
            assert {400, 500, 503} <= answered, (path, method)
        if method in ("post", "delete") and not path.endswith("/refresh"):  # it only reads
            assert 507 in answered, (path, method)
        for code in answered:
            assert op["responses"][str(code)]["content"] == {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
            }
    unauthorized = spec()["paths"]["/topics"]["get"]["responses"]["401"]["description"]
    assert unauthorized.startswith(str(Unauthorized.__doc__).strip())


def test_the_job_schema_has_every_field_of_spec_section_3() -> None:
    job = spec()["components"]["schemas"]["Job"]["properties"]
    wanted = "id payload status priority run_at attempts max_attempts created_at claimed_by "
    wanted += "claimed_at heartbeat_at lease_expires_at lease_token last_error result finished_at"
    assert set(wanted.split()) <= set(job)


def test_request_schemas_are_those_of_the_types_that_validate_requests() -> None:
    claim = spec()["paths"]["/topics/{topic}/claim"]["post"]["requestBody"]
    assert claim["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ClaimRequest"
    }
    schema = spec()["components"]["schemas"]["ClaimRequest"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["wait"]["maximum"] == api.MAX_WAIT


async def test_the_served_description_is_the_generated_one(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    broker = await start_broker(MemStore())
    async with aiohttp.ClientSession() as session, session.get(broker.url + "/openapi.json") as r:
        assert await r.json() == orjson.loads(orjson.dumps(spec()))


async def test_the_status_pages_overview_is_described_by_the_type_it_is_encoded_from(
    start_broker: Callable[..., Awaitable[Any]],
) -> None:
    ok = spec()["paths"]["/ui/overview"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Overview"}
    broker = await start_broker(MemStore())
    async with aiohttp.ClientSession() as session:
        base = broker.url + "/topics/t"
        await post(session, base + "/enqueue", {"jobs": [{"payload": i} for i in range(3)]})
        _, claimed = await post(session, base + "/claim", {"worker_id": "w"})
        async with session.get(broker.url + "/ui/overview") as r:
            raw = await r.read()
    overview = msgspec.json.decode(raw, type=page.Overview, strict=True)
    [topic] = overview.topics
    assert isinstance(topic, page.TopicView)
    assert (topic.name, topic.counts.pending, topic.counts.claimed) == ("t", 2, 1)
    assert [c.id for c in topic.claimed] == [claimed["job"]["id"]]
    assert overview.broker.id == broker.settings.broker_id


def test_a_generated_client_reads_a_jobs_result_as_a_field(tmp_path: Path) -> None:
    """openapi-python-client, run on /openapi.json: its Job model has `result`."""
    tool = Path(sys.executable).parent / "openapi-python-client"
    if not tool.exists():
        pytest.fail("openapi-python-client is not installed (bin/test installs it)")
    (tmp_path / "openapi.json").write_bytes(orjson.dumps(spec()))
    env = {**os.environ, "PATH": f"{tool.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    generate = ["generate", "--path", "openapi.json", "--output-path", "sqclient", "--meta", "none"]
    subprocess.run(
        [str(tool), *generate],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    code = (
        "from sqclient.models.job import Job\n"
        "job = Job.from_dict({'id': 'a', 'status': 'completed', 'result': {'ok': True}})\n"
        "assert job.result == {'ok': True}, job.result\n"
        "from sqclient.api.default import claim, enqueue, ack, get_job\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=60)
    shutil.rmtree(tmp_path / "sqclient")


def test_a_403_and_a_408_are_raised_by_the_sdk_as_their_classes() -> None:
    """The broker answers 403 (cross-site, DNS rebinding) and 408 (a body slower
    than --body-timeout); the SDK raised BrokerError for both, and a Worker
    refused for good kept claiming."""
    assert errors.for_status(403) is errors.Forbidden
    assert errors.for_status(408) is errors.RequestTimedOut
