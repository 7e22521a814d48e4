"""Bad input campaigns against a live broker process: schemathesis cases drawn
from /openapi.json (valid and invalid), random bytes and malformed frames on
the RESP port, and requests without the token. No 5xx, no crash, and a
rejected request leaves the store as it was."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import hiredis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from simplequeue.broker.resp import COMMANDS
from simplequeue.errors import InvalidRequest
from simplequeue.state.slots import check_definition
from tests.conftest import BrokerProcess

pytestmark = [pytest.mark.campaign, pytest.mark.timeout(600)]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every topic object in a localfs store (broker.json renews itself)."""
    topics = root / "topics"
    if not topics.exists():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in topics.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture
def live(broker_process: Any, tmp_path: Path) -> tuple[BrokerProcess, Path]:
    store = tmp_path / "store"
    broker = broker_process(  # long leases: no reaper writes while state is compared
        "--dir", str(store), "--redis-addr", "127.0.0.1:0", "--max-body", "65536", "--lease", "3600"
    )
    assert broker.proc.stdout is not None
    line = broker.proc.stdout.readline()  # "simplequeued resp listening on HOST:PORT"
    broker.resp_port = int(line.rsplit(":", 1)[1])  # type: ignore[attr-defined]
    requests.post(f"{broker.url}/topics/t/enqueue", json={"id": "seed", "payload": 1}, timeout=10)
    return broker, store


def test_openapi_cases_get_no_5xx_and_rejections_change_nothing(
    live: tuple[BrokerProcess, Path], scale: int, record_figures: Any
) -> None:
    broker, store = live
    spec = requests.get(f"{broker.url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(spec)
    tried: dict[str, int] = {}

    def fuzz(operation: Any, mode: Any) -> None:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=25 * scale,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            body = case.body
            if isinstance(body, dict) and isinstance(body.get("wait"), int | float):
                body["wait"] = min(body["wait"], 0.1)  # long polls: valid, but slow
            query = case.query
            if isinstance(query, dict) and isinstance(query.get("wait"), int | float):
                query["wait"] = min(query["wait"], 0.1)  # GET /jobs/{id}?wait= too
            lease = body.get("lease") if isinstance(body, dict) else None
            if isinstance(lease, int | float) and not isinstance(lease, bool):
                # Leases that run out during the campaign would have the reaper
                # write while a rejected request is being checked for changes.
                body["lease"] = max(lease, 3600) if lease > 0 else lease
            if isinstance(body, dict):
                _never_fire(body)
            before = snapshot(store)
            response = case.call(base_url=broker.url, timeout=30)
            status = response.status_code
            tried[f"{status // 100}xx"] = tried.get(f"{status // 100}xx", 0) + 1
            where = f"{operation.label} -> {status}: {response.text[:200]}"
            assert status < 500, where
            # Every answer, success or error, is what /openapi.json says it is.
            case.validate_response(
                response,
                checks=[
                    response_schema_conformance,
                    content_type_conformance,
                    status_code_conformance,
                ],
            )
            if status >= 400:
                assert isinstance(response.json().get("error"), str), where
                assert snapshot(store) == before, f"a rejected request changed state: {where}"

        try:
            check()
        except Unsatisfiable:
            # Negative mode has nothing to break in an operation without input.
            assert mode == schemathesis.GenerationMode.NEGATIVE

    for result in schema.get_all_operations():
        for mode in schemathesis.GenerationMode:
            fuzz(result.ok(), mode)
    assert broker.proc.poll() is None, "the broker died"
    record_figures(
        {
            "scenario": "schemathesis on /openapi.json",
            "bad_inputs": tried.get("4xx", 0),
            "inputs": sum(tried.values()),
            "status_classes": tried,
            "lost": 0,
            "double_committed": 0,
        }
    )


def _never_fire(body: dict[str, Any]) -> None:
    """A valid schedule made as rarely firing as it can be: one that fired during
    the campaign (every 1 s, or each minute) would write while a rejected request
    is being checked for changes. An invalid one is left invalid."""
    every = body.get("every")
    longest = 366 * 86400  # the longest period: its slot is far off
    if isinstance(every, int) and not isinstance(every, bool) and 1 <= every <= longest:
        body["every"] = longest
    cron = body.get("cron")
    if isinstance(cron, str):
        try:
            check_definition(None, cron, None)
        except InvalidRequest:  # invalid: keep it so
            return
        body["cron"] = "0 0 1 1 *"  # once a year


# --- RESP -----------------------------------------------------------------------------

FRAMES = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.builds(
        lambda n, body: b"*%d\r\n" % n + body, st.integers(-5, 10**9), st.binary(max_size=40)
    ),
    st.builds(
        lambda n, body: b"*1\r\n$%d\r\n" % n + body + b"\r\n",
        st.integers(-3, 10**12),
        st.binary(max_size=40),
    ),
    st.builds(
        lambda words: hiredis.pack_command(tuple(words))[:-1],
        st.lists(st.binary(max_size=12), min_size=1, max_size=4),
    ),  # truncated
    st.sampled_from(
        [
            b"+PING\r\n",
            b"*1\r\n*1\r\n$4\r\nPING\r\n",
            b":1\r\n",
            b"\r\n\r\n\x00",
            b"*2\r\n$5\r\nLPUSH\r\n$1\r\nt\r\n",
            b"*3\r\n$5\r\nRPUSH\r\n$3\r\na/b\r\n$1\r\nx\r\n",
        ]
    ),
)


def resp_call(port: int, *args: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(hiredis.pack_command(args))
        reader = hiredis.Reader()
        while (reply := reader.gets()) is False:
            chunk = s.recv(4096)
            assert chunk, "the broker closed a healthy connection"
            reader.feed(chunk)
        return reply if isinstance(reply, bytes) else repr(reply).encode()


def test_resp_garbage_never_crashes_and_changes_nothing(
    live: tuple[BrokerProcess, Path], scale: int, record_figures: Any
) -> None:
    broker, store = live
    port: int = broker.resp_port  # type: ignore[attr-defined]
    before = snapshot(store)
    healthy = socket.create_connection(("127.0.0.1", port), timeout=10)
    sent = 0

    @given(frame=FRAMES)
    @settings(
        max_examples=150 * scale,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(frame: bytes) -> None:
        nonlocal sent
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(frame)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(2)
            try:
                while s.recv(4096):
                    pass
            except (TimeoutError, ConnectionResetError):
                pass
        sent += 1

    try:
        check()
        healthy.sendall(hiredis.pack_command(("PING",)))
        assert healthy.recv(64) == b"+PONG\r\n", "a connection opened before the garbage broke"
    finally:
        healthy.close()
    assert resp_call(port, "PING") == b"PONG"
    assert broker.proc.poll() is None, "the broker died"
    # The only frames that may change state are well-formed pushes to a valid topic.
    after = snapshot(store)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed <= {"topics/t.json"}, changed
    record_figures(
        {
            "scenario": "RESP garbage and malformed frames",
            "bad_inputs": sent,
            "lost": 0,
            "double_committed": 0,
        }
    )


# --- auth -------------------------------------------------------------------------------

ALLOWED_WITHOUT_AUTH = {"AUTH", "QUIT", "HELLO"}  # HELLO only to carry AUTH


def test_with_a_token_nothing_but_healthz_auth_quit_answers(
    broker_process: Any, tmp_path: Path, record_figures: Any
) -> None:
    broker = broker_process(
        "--dir", str(tmp_path), "--token", "sesame", "--redis-addr", "127.0.0.1:0"
    )
    assert broker.proc.stdout is not None
    port = int(broker.proc.stdout.readline().rsplit(":", 1)[1])
    spec = requests.get(f"{broker.url}/healthz", timeout=10)
    assert spec.status_code == 200
    paths = requests.get(f"{broker.url}/openapi.json", timeout=10)
    assert paths.status_code == 401  # even the description needs the token
    from simplequeue.broker.openapi import spec as api_spec

    refused = 0
    for path, methods in api_spec()["paths"].items():
        url = broker.url + path.replace("{topic}", "t").replace("{job_id}", "j")
        for method in methods:
            answer = requests.request(method.upper(), url, json={}, timeout=10)
            if path == "/healthz":
                assert answer.status_code == 200
                continue
            assert answer.status_code == 401, (method, path, answer.status_code)
            assert answer.headers.get("WWW-Authenticate") == "Bearer"
            refused += 1
    for name in COMMANDS:
        if name in ALLOWED_WITHOUT_AUTH:
            continue
        reply = resp_call(port, name, "t", "x")
        assert reply.startswith(b"NOAUTH") or b"NOAUTH" in reply, (name, reply)
        refused += 1
    assert b"NOAUTH" in resp_call(port, "PING")
    assert b"NOAUTH" in resp_call(port, "HELLO", "3")
    assert not (tmp_path / "topics").exists(), "a refused request wrote something"
    record_figures(
        {
            "scenario": "auth: every route and command without the token",
            "bad_inputs": refused,
            "lost": 0,
            "double_committed": 0,
        }
    )
    time.sleep(0)  # keep the broker up until every request above was answered
