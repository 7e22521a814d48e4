"""A latency-injecting HTTP proxy in front of LocalStack's S3: what a broker on real
S3 waits for each request, on this machine.

Each request is forwarded whole (method, path, query, headers, body) to the
upstream LocalStack, and its answer is returned whole, but the round trip is
stretched to a latency drawn for its kind of request from a lognormal fitted to
published S3 figures (`PROFILES`). Every answer is counted by bucket, operation
(PUT, GET, LIST, HEAD, DELETE, POST, CREATE) and status, and with it the lost
compare-and-set races: 412 and 409 answers to PUTs.

    python -m bench.s3proxy --upstream http://127.0.0.1:4566 [--port 0] [--seed 8]

Prints "s3proxy listening on http://127.0.0.1:PORT (pid N)" once it listens.
`GET /_bench/counts` (a path no bucket can have: bucket names never start with
"_") answers the counts so far as JSON: {bucket: {"PUT 200": n, "PUT 412": n, ...}};
`GET /_bench/profiles` answers the latency model and the p50 and p99 of the
latencies it served, by operation (from reading the request to answering it).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from simplequeue.broker.cli import event_loop_runner

# The 99th percentile of the standard normal distribution.
Z99 = 2.3263478740408408


@dataclass(frozen=True)
class Latency:
    """A lognormal fitted to a median and a 99th percentile, in seconds.

    ln(X) ~ Normal(mu, sigma): the median is exp(mu), so mu = ln(p50); the 99th
    percentile is exp(mu + Z99 * sigma), so sigma = ln(p99 / p50) / Z99. With p99 =
    2 x p50, sigma = 0.298: p90 is 1.46x the median, p99.9 2.5x, the mean 1.05x.
    """

    p50: float
    p99: float

    @property
    def mu(self) -> float:
        return math.log(self.p50)

    @property
    def sigma(self) -> float:
        return math.log(self.p99 / self.p50) / Z99

    def draw(self, rng: random.Random) -> float:
        return rng.lognormvariate(self.mu, self.sigma)


# The S3 figures issues 15 and 18 take as published (small objects, a client in the
# bucket's region): PUT about 100 ms at the median and 200 ms at p99; GET about 60 ms
# and 120 ms. LIST, HEAD and DELETE are taken to be like GET; POST (multi-object
# delete) and bucket creation like PUT. Real S3 has a longer tail past p99 (AWS
# advises retrying small requests still unanswered after 2 s); a lognormal has not.
PUT = Latency(0.100, 0.200)
GET = Latency(0.060, 0.120)
PROFILES: dict[str, Latency] = {
    "PUT": PUT,
    "POST": PUT,
    "GET": GET,
    "LIST": GET,
    "HEAD": GET,
    "DELETE": GET,
    "CREATE": PUT,
}
# Hop-by-hop and framing headers the proxy does not pass on (aiohttp frames the
# forwarded request itself; "Expect: 100-continue" would make it wait for an
# interim answer that the body already read here makes pointless).
SKIP_REQUEST = {"host", "content-length", "transfer-encoding", "connection", "expect"}
SKIP_RESPONSE = {"transfer-encoding", "content-length", "connection", "content-encoding"}


def operation(request: web.Request) -> tuple[str, str]:
    """(bucket, operation) of a path-style S3 request: LIST for a GET of the
    bucket itself (ListObjects), else the HTTP method."""
    path = request.path.lstrip("/")
    bucket, _, key = path.partition("/")
    op = request.method
    if not key and bucket and op in ("GET", "PUT"):
        op = "LIST" if op == "GET" else "CREATE"  # ListObjects(V2), CreateBucket
    return bucket or "-", op


class LatencyProxy:
    """The proxy's state: where it forwards, how it delays, what it counted."""

    def __init__(self, upstream: str, seed: int, delay: bool = True) -> None:
        self.upstream = upstream.rstrip("/")
        self.rng = random.Random(seed)
        self.delay = delay
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)
        self.served: dict[str, list[float]] = defaultdict(list)  # seconds, by operation
        self.upstream_s: dict[str, list[float]] = defaultdict(list)  # LocalStack's own part
        self.session: aiohttp.ClientSession | None = None

    async def counts_page(self, request: web.Request) -> web.Response:
        body = orjson.dumps({bucket: dict(c) for bucket, c in self.counts.items()})
        return web.Response(body=body, content_type="application/json")

    async def profiles_page(self, request: web.Request) -> web.Response:
        """The latency model, and the latencies served so far by operation."""

        def summary(seconds: dict[str, list[float]]) -> dict[str, dict[str, float]]:
            out = {}
            for op, values in seconds.items():
                ordered = sorted(values)
                at = {q: ordered[min(len(ordered) - 1, len(ordered) * q // 100)] for q in (50, 99)}
                out[op] = {"n": len(ordered), "p50": at[50], "p99": at[99]}
            return out

        model = {op: {"p50": p.p50, "p99": p.p99, "sigma": p.sigma} for op, p in PROFILES.items()}
        body = orjson.dumps(
            {"model": model, "served": summary(self.served), "upstream": summary(self.upstream_s)}
        )
        return web.Response(body=body, content_type="application/json")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Forward one request. The drawn latency is spent half before forwarding
        and the rest after LocalStack answered, less LocalStack's own time: the
        caller waits the drawn latency (or more, when LocalStack alone took more
        than half of it), and a conditional PUT is decided mid-way, as on S3 where
        the upload comes before the commit and the answer after it."""
        started = time.perf_counter()
        bucket, op = operation(request)
        body = await request.read()
        target = PROFILES.get(op, GET).draw(self.rng) if self.delay else 0.0
        if target:
            await asyncio.sleep(target / 2)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in SKIP_REQUEST}
        assert self.session is not None
        forwarded = time.perf_counter()
        try:
            async with self.session.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
            ) as upstream:
                payload = await upstream.read()
                status = upstream.status
                out = {k: v for k, v in upstream.headers.items() if k.lower() not in SKIP_RESPONSE}
                if "content-encoding" in upstream.headers:
                    out["Content-Encoding"] = upstream.headers["content-encoding"]
        except (aiohttp.ClientError, TimeoutError):
            self.counts[bucket][f"{op} proxy-error"] += 1
            raise
        self.upstream_s[op].append(time.perf_counter() - forwarded)
        left = target - (time.perf_counter() - started)
        if left > 0:
            await asyncio.sleep(left)
        self.counts[bucket][f"{op} {status}"] += 1
        self.served[op].append(time.perf_counter() - started)
        return web.Response(status=status, body=payload, headers=out)


async def serve(upstream: str, port: int, seed: int, delay: bool) -> None:
    proxy = LatencyProxy(upstream, seed, delay)
    # No cap on upstream connections: a request holds one only while LocalStack
    # works on it, never while it is being delayed.
    proxy.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=60),
    )
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/_bench/counts", proxy.counts_page)
    app.router.add_get("/_bench/profiles", proxy.profiles_page)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"s3proxy listening on http://127.0.0.1:{bound} (pid {os.getpid()})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await proxy.session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="LocalStack's endpoint URL")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=8, help="seed of the latency draws")
    parser.add_argument(
        "--no-delay", action="store_true", help="forward and count only (no added latency)"
    )
    args = parser.parse_args()
    with event_loop_runner() as runner:
        runner.run(serve(args.upstream, args.port, args.seed, not args.no_delay))


if __name__ == "__main__":
    main()
