"""Driving the load generator and adding up what it measured.

`LoadGen` is the orchestrator's handle on a bench/loadgen.py process (one JSON
command per line, one JSON answer per line). `Cell` adds up the rounds of one
measurement (operations, time, latencies, the generator's and the server's CPU).
`store_requests` reads a broker's store-request counters from its /metrics;
`proxy_counts` what bench/s3proxy.py counted.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.servers import REPO, Server, child_env, pin, stop_process


class LoadGenFailed(RuntimeError):
    """The load generator answered a command with an error."""


class LoadGen:
    """A bench/loadgen.py child process."""

    def __init__(self, log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=REPO,
                env=child_env(),
                start_new_session=True,
            )
        pin(self.proc, "generator")

    def call(self, cmd: str, **cfg: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **cfg}).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise LoadGenFailed(f"load generator exited (code {self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if "failed" in answer:
            raise LoadGenFailed(f"{cmd}: {answer['failed']}")
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(b'{"cmd": "quit"}\n')
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)


@contextlib.contextmanager
def loadgen(log: Path) -> Iterator[LoadGen]:
    gen = LoadGen(log)
    try:
        yield gen
    finally:
        gen.close()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class Cell:
    """The rounds of one measurement, added up."""

    ops: int = 0
    elapsed: float = 0.0
    gen_cpu: float = 0.0
    srv_cpu: float = 0.0
    srv_wall: float = 0.0
    errors: int = 0
    empty: int = 0
    latencies: dict[str, list[float]] = field(default_factory=dict)
    rates: list[float] = field(default_factory=list)  # per round
    counters: dict[str, float] = field(default_factory=dict)  # broker /metrics deltas

    def add_counters(self, d: dict[str, float]) -> None:
        for k, v in d.items():
            self.counters[k] = self.counters.get(k, 0.0) + v

    def add(self, answer: dict[str, Any], srv_cpu: float = 0.0, srv_wall: float = 0.0) -> None:
        self.ops += answer["ops"]
        self.elapsed += answer["elapsed"]
        self.gen_cpu += answer["cpu"]
        self.srv_cpu += srv_cpu
        self.srv_wall += srv_wall
        self.errors += answer["errors"]
        self.empty += answer["empty"]
        self.rates.append(answer["ops"] / answer["elapsed"])
        for name, values in answer["lat"].items():
            self.latencies.setdefault(name, []).extend(values)

    @property
    def rate(self) -> float:
        return self.ops / self.elapsed if self.elapsed else math.nan

    @property
    def gen_share(self) -> float:
        """The load generator's CPU over the measured time (1.0 = one core)."""
        return self.gen_cpu / self.elapsed if self.elapsed else math.nan

    @property
    def srv_share(self) -> float:
        return self.srv_cpu / self.srv_wall if self.srv_wall else math.nan

    @property
    def srv_us(self) -> float:
        """The server's CPU microseconds per operation."""
        return 1e6 * self.srv_cpu / self.ops if self.ops else math.nan

    @property
    def gen_us(self) -> float:
        return 1e6 * self.gen_cpu / self.ops if self.ops else math.nan

    def p(self, name: str, q: float) -> float:
        return percentile(self.latencies.get(name, []), q)


def timed_call(
    gen: LoadGen, server: Server | None, cmd: str, **cfg: Any
) -> tuple[dict[str, Any], float, float]:
    """gen.call(...), and the server's CPU seconds and the wall seconds it took."""
    cpu0 = server.cpu_seconds() if server else 0.0
    t0 = time.perf_counter()
    answer = gen.call(cmd, **cfg)
    wall = time.perf_counter() - t0
    cpu = (server.cpu_seconds() - cpu0) if server else 0.0
    return answer, cpu, wall


def run_round(
    cell: Cell, gen: LoadGen, server: Server, cmd: str, *, broker: bool = False, **cfg: Any
) -> int:
    """One measured round added to `cell`, the server's CPU taken by the generator
    over the measured window (and, for a `broker`, its /metrics counters before and
    after); returns the round's operations."""
    before = store_requests(server.url) if broker else None
    answer = gen.call(cmd, server_pid=server.pid, **cfg)
    if before is not None:
        cell.add_counters(delta(store_requests(server.url), before))
    cell.add(answer, answer["server_cpu"] or 0.0, answer["elapsed"])
    ops: int = answer["ops"]
    return ops


# --- the broker's own counters -----------------------------------------------------------

_STORE_LINE = re.compile(
    r'^simplequeue_store_requests_total\{kind="(?P<kind>[a-z_]+)",outcome="[a-z_]+"\} '
    r"(?P<value>[0-9.e+]+)$",
    re.M,
)
#: What S3 bills each store request kind as.
BILLED_AS = {"put_if": "PUT", "put": "PUT", "get": "GET", "list": "LIST", "delete": "DELETE"}


_COUNTERS = {
    "mutations": "simplequeue_commit_mutations_total",
    "writes": "simplequeue_commit_writes_total",
    "segments": "simplequeue_commit_segments_written_total",
    "bytes_written": "simplequeue_commit_bytes_written_total",  # heads and segments
    "head_bytes": "simplequeue_commit_head_bytes_written_total",
    "conflicts": "simplequeue_commit_conflicts_total",  # compare-and-set races lost
    "cache_used": 'simplequeue_cache_bytes{kind="used"}',  # a gauge: its delta means little
    "put_if_seconds": 'simplequeue_store_request_seconds_sum{kind="put_if"}',
    "put_if_count": 'simplequeue_store_request_seconds_count{kind="put_if"}',
}


def store_requests(url: str) -> dict[str, float]:
    """A broker's counters from its /metrics: store requests so far by billed kind
    (PUT, GET, LIST, DELETE; every outcome, as S3 bills failed conditional writes
    too), committed mutations, head writes and the bytes they wrote, conditional-PUT
    latency, and the object cache's bytes held."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = dict.fromkeys(("PUT", "GET", "LIST", "DELETE", *_COUNTERS), 0.0)
    for m in _STORE_LINE.finditer(text):
        out[BILLED_AS.get(m["kind"], m["kind"])] += float(m["value"])
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        for key, metric in _COUNTERS.items():
            if name == metric:
                out[key] = float(value)
    return out


def proxy_counts(url: str) -> dict[str, dict[str, float]]:
    """The answers bench/s3proxy.py passed on so far: {bucket: {"PUT 412": n, ...}}."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "/_bench/counts", timeout=30) as r:
        got: dict[str, dict[str, float]] = json.loads(r.read())
    return got


def proxy_latencies(url: str) -> dict[str, dict[str, dict[str, float]]]:
    """The latencies bench/s3proxy.py served so far, and LocalStack's own part of
    them, by operation: {"served": {"PUT": {"n", "p50", "p99"}}, "upstream": {...}}."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "/_bench/profiles", timeout=30) as r:
        got: dict[str, dict[str, dict[str, float]]] = json.loads(r.read())
    return {"served": got["served"], "upstream": got["upstream"]}


def per_write(d: dict[str, float]) -> tuple[float, float]:
    """(mutations per head write, mean conditional-PUT seconds) of a counter delta."""
    mutations = d["mutations"] / d["writes"] if d["writes"] else math.nan
    put_s = d["put_if_seconds"] / d["put_if_count"] if d["put_if_count"] else math.nan
    return mutations, put_s


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


Log = Callable[[str], None]
