"""Part 8 of bin/bench: what a user on real S3 should expect (issues 15 and 18).

LocalStack's S3 behind bench/s3proxy.py, which stretches every request to a latency
drawn from S3's published figures (PUT p50 ~100 ms, p99 ~200 ms; GET, LIST, HEAD,
DELETE p50 ~60 ms, p99 ~120 ms) and counts every answer, among them the 412 and 409
answers to conditional PUTs: compare-and-set races lost. Brokers reach S3 only
through it (`--endpoint-url`).

Two set-ups run side by side, each on a bucket of its own: one broker, and three
brokers sharing a bucket. Callers reach the brokers over plain HTTP, spread round
robin (caller i talks to broker i mod 3); a broker passes a request for a topic it
does not own on to the topic's owner (SPEC 4.3), so two requests in three take an
extra hop. Loads: single enqueues, then claim + ack cycles, at 64 and 256
callers on one topic and at 256 callers over 16 topics; the two set-ups alternate
round by round (A B A B). Then an idle set-up: two brokers and 300 topics that
exist but get no traffic, and the store requests per second they make anyway.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.measure import Cell, delta, proxy_counts, proxy_latencies, store_requests
from bench.report import Section, Target, ms, num, pct, ratio, table
from bench.s3proxy import GET, PUT
from bench.servers import Server, start_localstack, start_s3proxy, start_simplequeued

if TYPE_CHECKING:
    from bench.parts import Context, Plan

OPS = ("enqueue", "cycle")
LOST = ("PUT 412", "PUT 409")  # S3's two ways of saying a conditional PUT lost its race
# S3 Standard request prices, $ per request: PUT, COPY, POST, LIST (and CreateBucket)
# $0.005 per 1,000; GET, HEAD and the rest $0.0004 per 1,000; DELETE free.
PRICE = {"PUT": 5e-6, "POST": 5e-6, "LIST": 5e-6, "CREATE": 5e-6, "GET": 4e-7, "HEAD": 4e-7}
MONTH = 30 * 86_400.0


@dataclass(frozen=True)
class Load:
    """Callers and the topics they are spread over (caller i: topic i mod n)."""

    label: str
    concurrency: int
    topics: tuple[str, ...]


@dataclass
class Setup:
    """Brokers sharing one bucket, all reaching S3 through the proxy."""

    name: str
    bucket: str
    brokers: list[Server]

    @property
    def urls(self) -> list[str]:
        return [b.url for b in self.brokers]

    def snapshot(self, proxy: Server) -> dict[str, float]:
        """The proxy's counts for this bucket ("s3 PUT 412", ...) and the brokers'
        /metrics counters added up ("broker conflicts", ...)."""
        out = {f"s3 {k}": float(v) for k, v in proxy_counts(proxy.url).get(self.bucket, {}).items()}
        for broker in self.brokers:
            for k, v in store_requests(broker.url).items():
                out[f"broker {k}"] = out.get(f"broker {k}", 0.0) + v
        return out


def s3(counters: dict[str, float], op: str) -> float:
    """Answers the proxy passed on for operation `op` (PUT, GET, LIST, ...), any status."""
    return sum(v for k, v in counters.items() if k.startswith(f"s3 {op} "))


def lost(counters: dict[str, float]) -> float:
    return sum(counters.get(f"s3 {k}", 0.0) for k in LOST)


def requests(cell: Cell) -> int:
    """HTTP requests the callers sent to brokers: enqueues, or claims plus acks."""
    return sum(len(cell.latencies.get(k, [])) for k in ("enqueue", "claim", "ack"))


def per_request(cell: Cell, x: float) -> float:
    n = requests(cell)
    return x / n if n else math.nan


def pair(cell: Cell, reference: Cell) -> list[float]:
    return [a / b for a, b in zip(cell.rates, reference.rates, strict=False) if b]


def spread(values: list[float]) -> str:
    return f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""


def measure_round(
    cell: Cell, ctx: Context, setup: Setup, proxy: Server, load: Load, op: str, **cfg: Any
) -> int:
    """One measured round of `load` through `setup`, added to `cell` with the
    proxy's and the brokers' counters over it; returns the jobs it did."""
    before = setup.snapshot(proxy)
    answer = ctx.gen.call(
        "http",
        urls=setup.urls,
        topics=list(load.topics),
        op=op,
        concurrency=load.concurrency,
        server_pid=[b.pid for b in setup.brokers],
        **cfg,
    )
    cell.add_counters(delta(setup.snapshot(proxy), before))
    cell.add_counters({f"status {k}": v for k, v in answer.get("statuses", {}).items()})
    cell.add(answer, answer["server_cpu"] or 0.0, answer["elapsed"])
    ops: int = answer["ops"]
    return ops


def latency(cell: Cell, op: str) -> str:
    def one(name: str) -> str:
        return f"{ms(cell.p(name, 50))} / {ms(cell.p(name, 99))}"

    return one("enqueue") if op == "enqueue" else f"claim {one('claim')}; ack {one('ack')}"


def failures(cell: Cell) -> str:
    """Requests answered otherwise than as they should, by status."""
    bad = {
        k.removeprefix("status "): v for k, v in cell.counters.items() if k.startswith("status ")
    }
    if not bad:
        return "0"
    return ", ".join(f"{num(v)} x {k}" for k, v in sorted(bad.items()))


def writes(cell: Cell) -> str:
    """Mutations per head write that landed, and the brokers' mean conditional-PUT
    time (the latency the proxy added, plus LocalStack's own when it took longer)."""
    c = cell.counters
    landed = c.get("broker writes", 0.0)
    mutations = c.get("broker mutations", 0.0) / landed if landed else math.nan
    count = c.get("broker put_if_count", 0.0)
    put_ms = 1000 * c.get("broker put_if_seconds", 0.0) / count if count else math.nan
    return f"{mutations:.1f}, {ms(put_ms)}"


# --- the idle set-up ----------------------------------------------------------------------


def idle_rates(plan: Plan, ctx: Context, proxy: Server) -> tuple[dict[str, float], float]:
    """Two brokers on a bucket of their own with `s3lat_idle_topics` topics that
    exist (one job enqueued in each) and get no traffic: store requests per second
    by operation, from the proxy's counts over `s3lat_idle` seconds, after
    `s3lat_idle_settle` seconds (a listing of the store's topics by every broker)."""
    bucket = f"sq-idle-{uuid.uuid4().hex[:10]}"
    topics = [f"idle-{i:03d}" for i in range(plan.s3lat_idle_topics)]
    with contextlib.ExitStack() as stack:
        brokers = [
            stack.enter_context(
                start_simplequeued(
                    f"part8-idle-{i}", ctx.logs, s3={"bucket": bucket, "endpoint_url": proxy.url}
                )
            )
            for i in range(plan.s3lat_idle_brokers)
        ]
        t0 = time.perf_counter()
        ctx.gen.call("seed_topics", urls=[b.url for b in brokers], topics=topics, concurrency=32)
        ctx.log(
            f"part 8: idle: {len(topics)} topics made in {time.perf_counter() - t0:.1f} s; "
            f"settling {plan.s3lat_idle_settle:.0f} s, then watching {plan.s3lat_idle:.0f} s"
        )
        time.sleep(plan.s3lat_idle_settle)
        before = proxy_counts(proxy.url).get(bucket, {})
        t1 = time.perf_counter()
        time.sleep(plan.s3lat_idle)
        after = proxy_counts(proxy.url).get(bucket, {})
        seconds = time.perf_counter() - t1
    rates: dict[str, float] = defaultdict(float)
    for key, value in after.items():
        rates[key.split(" ")[0]] += (value - before.get(key, 0)) / seconds
    return dict(rates), seconds


# --- the part -------------------------------------------------------------------------------


def part_s3_latency(plan: Plan, ctx: Context) -> Section:
    """Throughput, latency, PUTs and lost races at S3's latency, one broker
    against three on one bucket, rounds interleaved; then the idle cost."""
    one = ("hot",)
    many = tuple(f"t{i:02d}" for i in range(plan.s3lat_topics))
    loads = [Load("one topic", c, one) for c in plan.s3lat_concurrencies]
    loads.append(Load(f"{len(many)} topics", max(plan.s3lat_concurrencies), many))
    sizes = {"1 broker": 1, f"{plan.s3lat_brokers} brokers": plan.s3lat_brokers}
    cells: dict[tuple[str, int, str, str], Cell] = defaultdict(Cell)
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        endpoint = stack.enter_context(start_localstack(ctx.tmp / "localstack-part8"))
        proxy = stack.enter_context(start_s3proxy(ctx.logs, endpoint))
        ctx.log(f"part 8: LocalStack and the latency proxy up in {time.perf_counter() - t0:.0f} s")
        idle, idle_seconds = idle_rates(plan, ctx, proxy)
        ctx.log(f"part 8: idle: {sum(idle.values()):.1f} store requests/s")
        setups: list[Setup] = []
        for name, n in sizes.items():
            bucket = f"sq-lat{n}-{uuid.uuid4().hex[:10]}"
            s3 = {"bucket": bucket, "endpoint_url": proxy.url}
            brokers = [
                stack.enter_context(start_simplequeued(f"part8-{n}b-{i}", ctx.logs, s3=s3))
                for i in range(n)
            ]
            setups.append(Setup(name, bucket, brokers))
            # Every topic's head exists before anything is measured.
            ctx.gen.call("seed_topics", urls=[brokers[0].url], topics=[*one, *many])
        for load in loads:
            for r in range(plan.s3lat_rounds):
                made: dict[str, int] = {}
                for op in OPS:
                    for setup in setups:
                        cell = cells[(load.label, load.concurrency, op, setup.name)]
                        made[setup.name] = measure_round(
                            cell,
                            ctx,
                            setup,
                            proxy,
                            load,
                            op,
                            seconds=plan.s3lat_seconds,
                            max_ops=10**9 if op == "enqueue" else made[setup.name],
                        )
                for setup in setups:  # every round starts from empty topics
                    ctx.gen.call("drain", url=setup.urls[0], topics=list(load.topics))
                key = (load.label, load.concurrency)
                rates = [
                    f"{op} {s.name} {num(cells[(*key, op, s.name)].rates[-1])}/s"
                    for op in OPS
                    for s in setups
                ]
                ctx.log(
                    f"part 8: {load.label}, c={load.concurrency}, round {r + 1}/"
                    f"{plan.s3lat_rounds}: " + ", ".join(rates)
                )
        served = proxy_latencies(proxy.url)
    section = report(plan, loads, [s.name for s in setups], cells, idle, idle_seconds)

    def summary(by_op: dict[str, dict[str, float]]) -> str:
        return "; ".join(
            f"{op} {ms(1000 * v['p50'])} / {ms(1000 * v['p99'])} ({num(v['n'])})"
            for op, v in sorted(by_op.items())
        )

    section.lines += [
        "- latencies the proxy served over the part, p50 / p99 ms (requests): "
        + summary(served["served"]),
        "- of which LocalStack's own time: " + summary(served["upstream"]),
    ]
    return section


def report(
    plan: Plan,
    loads: list[Load],
    names: list[str],
    cells: dict[tuple[str, int, str, str], Cell],
    idle: dict[str, float],
    idle_seconds: float,
) -> Section:
    base, multi = names
    section = Section("8. S3 latency: LocalStack behind a proxy adding S3's published latencies")
    rows = []
    for load in loads:
        for op in OPS:
            ref = cells[(load.label, load.concurrency, op, base)]
            for name in names:
                cell = cells[(load.label, load.concurrency, op, name)]
                c = cell.counters
                x = cell.rate / ref.rate if ref.rate else math.nan
                rows.append(
                    [
                        load.label,
                        str(load.concurrency),
                        name,
                        op,
                        num(cell.rate),
                        ratio(x) + (spread(pair(cell, ref)) if name != base else ""),
                        latency(cell, op),
                        f"{per_request(cell, s3(c, 'PUT')):.3f}",
                        f"{1000 * per_request(cell, lost(c)):.1f} / "
                        f"{1000 * per_request(cell, c.get('broker conflicts', 0.0)):.1f}",
                        f"{per_request(cell, s3(c, 'GET')):.3f}",
                        writes(cell),
                        failures(cell),
                        f"{pct(cell.srv_share)}, {num(cell.srv_us)}",
                    ]
                )
    section.lines += table(
        [
            "load",
            "callers",
            "brokers",
            "operation",
            "jobs/s",
            "vs 1 broker (per round)",
            "p50 / p99 ms",
            "PUT per operation",
            "lost races per 1,000 operations (proxy / brokers' metrics)",
            "GET per operation",
            "mutations per head write, mean PUT ms",
            "failed requests",
            "brokers' CPU (all), µs per job",
        ],
        rows,
    )
    total = sum(idle.values())
    dollars = sum(v * PRICE.get(op, 0.0) for op, v in idle.items()) * MONTH
    section.lines += [
        "",
        *table(
            [
                "idle set-up",
                "seconds watched",
                "store requests/s",
                "by operation, per second",
                "$ per month at S3 prices",
            ],
            [
                [
                    f"{plan.s3lat_idle_brokers} brokers, {plan.s3lat_idle_topics} topics "
                    "(one job pending in each, no traffic)",
                    f"{idle_seconds:.0f}",
                    f"{total:.1f}",
                    ", ".join(f"{op} {v:.2f}" for op, v in sorted(idle.items()) if v) or "-",
                    f"${dollars:,.2f}",
                ]
            ],
        ),
        "",
        f"LocalStack's S3 behind bench/s3proxy.py, which holds each request until a "
        f"latency drawn from a lognormal fitted to p50 and p99 (PUT {PUT.p50 * 1000:.0f} / "
        f"{PUT.p99 * 1000:.0f} ms; GET, LIST, HEAD, DELETE {GET.p50 * 1000:.0f} / "
        f"{GET.p99 * 1000:.0f} ms; sigma {PUT.sigma:.3f}) has passed, half of it before "
        "forwarding and the rest after LocalStack's answer, less LocalStack's own time. "
        f"Two set-ups, each on a bucket of its own: one broker, and {multi} sharing "
        "one bucket; callers spread round robin over the set-up's brokers (plain HTTP: "
        "a broker passes a request for a topic it does not own on to its owner) and "
        f"over the load's topics. {plan.s3lat_rounds} rounds per load of "
        f"{plan.s3lat_seconds:g} s of single enqueues, then as many claim + ack cycles "
        "as the enqueues made (at most "
        f"{plan.s3lat_seconds:g} s), the set-ups alternating; what a round leaves is "
        "drained before the next. An operation is one HTTP request to a broker (an "
        "enqueue, a claim or an ack; a cycle is two); p50 / p99 are per request as the "
        "caller saw it. PUT and GET per operation and lost races (412 and 409 answers "
        "to PUTs) are the proxy's counts for the set-up's bucket over the rounds, of "
        "every status (S3 bills failed PUTs too), background requests included; the "
        "brokers' own count of lost races (`simplequeue_commit_conflicts_total`) stands "
        "beside it. Mutations per head write and the mean conditional-PUT time come from "
        f"the brokers' /metrics. The idle set-up ran first: {plan.s3lat_idle_brokers} "
        f"brokers on a third bucket, {plan.s3lat_idle_topics} topics made with one "
        f"enqueue each, then {plan.s3lat_idle_settle:.0f} s to settle and "
        f"{idle_seconds:.0f} s watched through the proxy's counts; dollars are those "
        "rates for 30 days.",
    ]
    section.targets += targets(plan, loads, names, cells, total)
    return section


def targets(
    plan: Plan,
    loads: list[Load],
    names: list[str],
    cells: dict[tuple[str, int, str, str], Cell],
    idle_total: float,
) -> list[Target]:
    base, multi = names
    out = []
    hot = [
        cells[(load.label, load.concurrency, op, multi)]
        for load in loads
        if len(load.topics) == 1
        for op in OPS
    ]
    asked = sum(requests(c) for c in hot)
    races = sum(lost(c.counters) for c in hot)
    per_k = 1000 * races / asked if asked else math.nan
    out.append(
        Target(
            f"8. lost CAS races, {multi} on one hot topic (proxy's 412 + 409 to PUTs)",
            "< 5 per 1,000 operations",
            f"{per_k:.1f} ({num(races)} in {num(asked)} operations)",
            per_k < 5,
        )
    )
    for load in loads:
        for op in OPS:
            a = cells[(load.label, load.concurrency, op, base)]
            b = cells[(load.label, load.concurrency, op, multi)]
            x = b.rate / a.rate if a.rate else math.nan
            if len(load.topics) == 1:
                wanted, met = f">= 0.8x {base}", x >= 0.8
            else:
                wanted, met = f"> 1x {base}", x > 1.0
            out.append(
                Target(
                    f"8. {op} throughput, {load.label}, {load.concurrency} callers, {multi}",
                    wanted,
                    ratio(x),
                    met,
                )
            )
    out.append(
        Target(
            f"8. idle store requests, {plan.s3lat_idle_brokers} brokers and "
            f"{plan.s3lat_idle_topics} topics",
            "<= 3 per second",
            f"{idle_total:.1f} per second",
            idle_total <= 3,
        )
    )
    return out
