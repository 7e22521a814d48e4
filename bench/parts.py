"""The parts of bin/bench, each a function (Plan, Context) -> Section: issue 8's
five (HTTP, end to end, depth, cost, RESP), then SPEC 4.1's bounded-state figures
(6 in-flight depth, 7 retention), then S3's latency (8, in bench/s3latency.py).

Every comparison is a ratio of figures measured in the same run, with the things
compared interleaved round by round (A B A B), because the machines are shared and
noisy. Each figure comes with the load generator's own CPU share (and the server's),
so a reader can tell a client-bound figure from a server-bound one.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.measure import (
    Cell,
    LoadGen,
    Log,
    delta,
    per_write,
    run_round,
    store_requests,
    timed_call,
)
from bench.report import Section, Target, ms, num, pct, ratio, table
from bench.s3latency import part_s3_latency
from bench.servers import (
    Server,
    postgres_bindir,
    redis_server_path,
    resp_available,
    start_ceiling,
    start_localstack,
    start_postgres,
    start_redis,
    start_simplequeued,
)
from simplequeue import keys


@dataclass(frozen=True)
class Plan:
    """How long and how hard each part runs."""

    quick: bool
    http_seconds: float  # per round, at most
    http_rounds: int
    http_round_ops: int  # per round, at most
    e2e_jobs: int
    e2e_rounds: int
    depth_rounds: int
    depth_round_ops: int
    cost_jobs: int
    cost_idle: float  # seconds the S3 broker is watched idle
    resp_seconds: float
    resp_rounds: int
    inflight_pending: int  # jobs pending on the deep topic of part 6 ...
    inflight_claimed: int  # ... and claimed on it, with a lease that outlasts the run
    inflight_rounds: int  # per concurrency
    inflight_round_ops: int
    retention_records: int  # completed records part 7 pushes one topic to
    retention_rounds: int
    retention_probes: int  # requests per operation, topic and round
    s3lat_seconds: float  # part 8: per round, at most
    s3lat_rounds: int  # per load
    s3lat_idle: float  # seconds the idle set-up is watched ...
    s3lat_idle_settle: float  # ... after this long
    concurrencies: tuple[int, ...] = (1, 16, 64)
    e2e_producers: int = 16  # enqueues in flight, for every system
    e2e_workers: int = 16  # jobs in flight in the worker, for every system
    depths: tuple[int, ...] = (1_000, 10_000, 100_000)
    depth_concurrency: int = 64
    cost_concurrency: int = 64
    cost_enqueue_batch: int = 10  # as SQS's SendMessageBatch
    cost_workers: int = 64
    resp_connections: int = 8
    resp_pipeline: int = 8  # 8 x 8 = 64 commands in flight, as HTTP at concurrency 64
    http_concurrency: int = 64  # part 5's HTTP reference
    inflight_concurrencies: tuple[int, ...] = (16, 64)
    inflight_payload: int = 1024  # bytes of JSON per job, pre-filled and measured
    inflight_lease: float = 3600.0
    retention_baseline: int = 1_000  # records of the baseline topic
    retention_seconds: float = 86_400.0
    retention_cache_mb: int = 64
    retention_concurrency: int = 16
    s3lat_concurrencies: tuple[int, ...] = (64, 256)
    s3lat_brokers: int = 3
    s3lat_topics: int = 16
    s3lat_idle_brokers: int = 2
    s3lat_idle_topics: int = 300


FULL = Plan(
    quick=False,
    http_seconds=2.0,
    http_rounds=4,
    http_round_ops=100_000,
    e2e_jobs=5_000,
    e2e_rounds=3,
    depth_rounds=6,
    depth_round_ops=1_000,
    cost_jobs=5_000,
    cost_idle=5.0,
    resp_seconds=2.0,
    resp_rounds=4,
    inflight_pending=100_000,
    inflight_claimed=100_000,
    inflight_rounds=5,
    inflight_round_ops=2_000,
    retention_records=1_000_000,
    retention_rounds=3,
    retention_probes=2_000,
    s3lat_seconds=5.0,
    s3lat_rounds=3,
    s3lat_idle=30.0,
    s3lat_idle_settle=12.0,
)
QUICK = Plan(
    quick=True,
    http_seconds=0.4,
    http_rounds=2,
    http_round_ops=100_000,
    e2e_jobs=1_000,
    e2e_rounds=2,
    depth_rounds=2,
    depth_round_ops=500,
    cost_jobs=1_000,
    cost_idle=1.0,
    resp_seconds=0.4,
    resp_rounds=2,
    inflight_pending=10_000,
    inflight_claimed=10_000,
    inflight_rounds=2,
    inflight_round_ops=1_000,
    retention_records=100_000,
    retention_rounds=2,
    retention_probes=500,
    s3lat_seconds=1.0,
    s3lat_rounds=2,
    s3lat_idle=4.0,
    s3lat_idle_settle=0.0,
)


@dataclass
class Context:
    """What every part shares: the load generator, scratch space, logging."""

    gen: LoadGen
    tmp: Path
    log: Log
    # Brokers run under pyinstrument (figures are then distorted, and /metrics is
    # not scraped between rounds, so that its rendering stays out of the profiles).
    profile: bool = False

    @property
    def logs(self) -> Path:
        return self.tmp / "logs"

    def profile_path(self, name: str) -> Path | None:
        return self.tmp / "profiles" / f"{name}.pstats" if self.profile else None


Part = Callable[[Plan, Context], Section]

PRICE_PUT = 5.0 / 1e6  # S3 PUT, COPY, POST, LIST: $0.005 per 1,000
PRICE_GET = 0.4 / 1e6  # S3 GET and the rest: $0.0004 per 1,000
SQS_BATCHED = 0.12  # $ per million jobs: send, receive, delete in batches of 10 at $0.40/M


def lat(cell: Cell, name: str) -> str:
    return f"{ms(cell.p(name, 50))} / {ms(cell.p(name, 99))}"


def cycle_lat(cell: Cell) -> str:
    return f"claim {lat(cell, 'claim')}; ack {lat(cell, 'ack')}"


def writes(cell: Cell) -> str:
    """Mutations per head write and mean conditional-PUT time, from /metrics deltas."""
    if not cell.counters:
        return "-"
    mutations, put_s = per_write(cell.counters)
    return f"{mutations:.1f}, {ms(put_s * 1000)}"


def spread(values: list[float]) -> str:
    if not values:
        return ""
    return f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""


# --- 1. HTTP against the ceiling -----------------------------------------------------------


def part_http(plan: Plan, ctx: Context) -> Section:
    """Single enqueues and claim + ack cycles over HTTP at each concurrency, against
    simplequeued (localfs), the same on memfs (no store writes: what the HTTP path
    and the engine cost alone) and the bare aiohttp ceiling, rounds interleaved."""
    cells: dict[tuple[str, int, str], Cell] = defaultdict(Cell)
    pair: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    with (
        start_simplequeued(
            "part1", ctx.logs, data_dir=ctx.tmp / "part1", profile=ctx.profile_path("part1")
        ) as sq,
        start_simplequeued("part1-memfs", ctx.logs) as mem,
        start_ceiling(ctx.logs) as ceiling,
    ):
        brokers = (sq, mem)
        for c in plan.concurrencies:
            topic = f"http-c{c}"
            for r in range(plan.http_rounds):
                made: dict[str, int] = {}  # jobs each broker's enqueue round left
                for op in ("enqueue", "cycle"):
                    rates: dict[str, float] = {}
                    for server in (*brokers, ceiling):
                        is_broker = server in brokers
                        cap = made[server.name] if op == "cycle" and is_broker else None
                        cell = cells[(op, c, server.name)]
                        ops = run_round(
                            cell,
                            ctx.gen,
                            server,
                            "http",
                            broker=is_broker and not ctx.profile,
                            url=server.url,
                            topic=topic,
                            op=op,
                            concurrency=c,
                            seconds=plan.http_seconds,
                            max_ops=plan.http_round_ops if cap is None else cap,
                        )
                        rates[server.name] = cell.rates[-1]
                        if op == "enqueue" and is_broker:
                            made[server.name] = ops
                    for broker in brokers:
                        pair[(op, c, broker.name)].append(rates[broker.name] / rates[ceiling.name])
                    ctx.log(
                        f"part 1: c={c} round {r + 1}/{plan.http_rounds} {op}: "
                        f"simplequeue {num(rates[sq.name])}/s (memfs "
                        f"{num(rates[mem.name])}/s), ceiling {num(rates[ceiling.name])}/s"
                    )
                for broker in brokers:  # every round starts empty
                    ctx.gen.call("drain", url=broker.url, topic=topic)

    section = Section("1. HTTP on localfs against a bare aiohttp ceiling")
    rows = []
    aims = {"enqueue": 0.7, "cycle": 0.6}
    for op in ("enqueue", "cycle"):
        for c in plan.concurrencies:
            s, ce = cells[(op, c, "part1")], cells[(op, c, "ceiling")]
            m = cells[(op, c, "part1-memfs")]
            x = s.rate / ce.rate
            latency = lat if op == "enqueue" else (lambda cell, _: cycle_lat(cell))
            rows.append(
                [
                    op,
                    str(c),
                    num(s.rate),
                    num(ce.rate),
                    ratio(x) + spread(pair[(op, c, "part1")]),
                    f">= {aims[op]}x",
                    f"{num(m.rate)}, {ratio(m.rate / ce.rate)}"
                    + spread(pair[(op, c, "part1-memfs")])
                    + f", {num(m.srv_us)} µs",
                    latency(s, "enqueue"),
                    latency(ce, "enqueue"),
                    f"{pct(s.gen_share)} / {pct(ce.gen_share)}",
                    f"{pct(s.srv_share)}, {num(s.srv_us)} / {pct(ce.srv_share)}, {num(ce.srv_us)}",
                    writes(s),
                ]
            )
            section.targets.append(
                Target(
                    f"1. HTTP {op} at concurrency {c}",
                    f">= {aims[op]}x ceiling",
                    ratio(x),
                    x >= aims[op],
                )
            )
            if s.errors or s.empty:
                section.lines.append(f"- {op} c={c}: {s.errors} errors, {s.empty} empty claims")
    section.lines[:0] = [
        *table(
            [
                "operation",
                "concurrency",
                "simplequeue jobs/s",
                "ceiling jobs/s",
                "ratio (per round)",
                "target",
                "on memfs: jobs/s, ratio, server µs per job",
                "simplequeue p50 / p99 ms",
                "ceiling p50 / p99 ms",
                "generator CPU (sq / ceiling)",
                "server CPU, µs per job (sq / ceiling)",
                "sq mutations per write, write ms",
            ],
            rows,
        ),
        "",
        f"{plan.http_rounds} rounds of at most {plan.http_seconds} s per cell, simplequeue "
        "and the ceiling alternating. A cycle is one claim plus one ack (two requests); each "
        "round starts from an empty topic. CPU is a share of one core over the measured "
        "window (a generator near 100% means the client, not the server, was the limit) "
        "and, for the server, also CPU microseconds per job, which moves less with the "
        "machine's load than throughput does. Mutations per write and the mean conditional "
        "PUT time come from the broker's /metrics. The memfs column is a second broker "
        "keeping topics in memory (no store writes, no durability): what the HTTP path and "
        "the engine cost alone, so that the rest of the gap is the store's writes.",
    ]
    return section


# --- 2. End to end against Huey, arq and pgqueuer ----------------------------------------------

E2E_SYSTEMS = {
    "simplequeue": "simplequeued, localfs (fsync per batch)",
    "simplequeue (prefetch=0)": "simplequeued, localfs (fsync per batch)",
    "huey": "SQLite (WAL, synchronous=FULL)",
    "arq": "redis-server (AOF, fsync every second)",
    "pgqueuer": "PostgreSQL {version} (fsync, synchronous_commit=on: WAL flushed per commit)",
}
E2E_RIVALS = ("huey", "arq", "pgqueuer")
# The Worker's prefetch in each simplequeue row: its default (None: ClaimAhead sizes
# the buffer as jobs end, up to 64 x concurrency or 1,000 jobs), and none, so that
# it holds at most `concurrency` claimed jobs, as the rivals' workers do.
E2E_PREFETCH: dict[str, int | None] = {"simplequeue": None, "simplequeue (prefetch=0)": 0}


def e2e_order(r: int) -> list[str]:
    """The systems in the order round `r` runs them: E2E_SYSTEMS rotated by two
    places a round, every other round backwards, so that each round starts with
    another system and who runs right after whom changes too (a system run after
    PostgreSQL runs during its checkpoints and vacuums). Over three rounds the two
    simplequeue rows follow PostgreSQL once each at most."""
    systems = list(E2E_SYSTEMS)
    k = 2 * r % len(systems)
    order = systems[k:] + systems[:k]
    return order[::-1] if r % 2 else order


def e2e_shortfall(answer: dict[str, Any], n: int) -> str:
    """What a round of part 2 left undone, by the system's own counts ("" if
    nothing): a rate over a round in which not every job ran, or ran and was not
    recorded done, would credit the system with work it did not do."""
    problems = []
    if answer["processed"] != n:
        problems.append(f"{answer['processed']:,} of {n:,} jobs done")
    if answer.get("errors"):
        problems.append(f"{answer['errors']:,} failed")
    if answer.get("left"):
        problems.append(f"{answer['left']:,} left in the queue")
    if "logged" in answer and answer["logged"] != n:
        problems.append(f"{answer['logged']:,} of {n:,} completions logged")
    return ", ".join(problems)


def part_e2e(plan: Plan, ctx: Context) -> Section:
    """`e2e_jobs` no-op jobs enqueued one per call, then processed by each system's
    worker, rounds interleaved: simplequeue's Worker as it is (batch claims with a
    prefetch buffer sized as jobs end, batched acks) and with no prefetch buffer,
    Huey on SQLite, arq on Redis, pgqueuer on PostgreSQL."""
    n = plan.e2e_jobs
    results: dict[str, list[tuple[dict[str, Any], float, float]]] = defaultdict(list)
    incomplete: list[str] = []
    common = {
        "n": n,
        "concurrency": plan.e2e_producers,
        "worker_concurrency": plan.e2e_workers,
    }
    with contextlib.ExitStack() as stack:
        sq = stack.enter_context(start_simplequeued("part2", ctx.logs, data_dir=ctx.tmp / "part2"))
        redis: Server | None = None
        if redis_server_path():
            redis = stack.enter_context(start_redis(ctx.tmp / "redis"))
        pg: Server | None = None
        if postgres_bindir():
            pg = stack.enter_context(start_postgres(ctx.tmp / "postgres", ctx.logs))
            ctx.log(
                f"part 2: PostgreSQL {pg.extra['version']} on {pg.url}"
                + (f", run as {pg.extra['user']}" if pg.extra["user"] else "")
            )
        for r in range(plan.e2e_rounds):
            for system in e2e_order(r):
                if system in E2E_PREFETCH:
                    prefetch = E2E_PREFETCH[system]
                    got = timed_call(
                        ctx.gen,
                        sq,
                        "sq_e2e",
                        url=sq.url,
                        topic=f"e2e-{r}-prefetch-{'default' if prefetch is None else prefetch}",
                        prefetch=prefetch,
                        **common,
                    )
                elif system == "huey":
                    db = ctx.tmp / f"huey-{r}.db"
                    got = timed_call(ctx.gen, None, "huey_e2e", db=str(db), **common)
                elif system == "arq" and redis is not None:
                    got = timed_call(ctx.gen, redis, "arq_e2e", port=redis.extra["port"], **common)
                elif system == "pgqueuer" and pg is not None:
                    got = timed_call(
                        ctx.gen,
                        pg,
                        "pgqueuer_e2e",
                        dsn=pg.extra["dsn"],
                        database=f"e2e_{r}",
                        **common,
                    )
                else:
                    continue
                results[system].append(got)
                answer = got[0]
                runs = answer.get("runs", answer["processed"])
                ctx.log(
                    f"part 2: round {r + 1}/{plan.e2e_rounds} {system}: enqueue "
                    f"{answer['enqueue_s']:.2f} s, process {answer['process_s']:.2f} s, "
                    f"{answer['processed']} processed"
                    + (f" ({runs} handler runs)" if runs != answer["processed"] else "")
                    + (f", {answer['left']} left in the queue" if "left" in answer else "")
                    + (f", {answer['logged']} logged" if "logged" in answer else "")
                )
                if shortfall := e2e_shortfall(answer, n):
                    incomplete.append(f"round {r + 1} {system}: {shortfall}")
                    ctx.log(f"part 2: INCOMPLETE: round {r + 1} {system}: {shortfall}")

    def total(system: str, key: str) -> float:
        return float(sum(a[key] for a, _, _ in results[system]))

    def rate(system: str, key: str) -> float:
        t = total(system, key)
        return n * len(results[system]) / t if t else math.nan

    for system in results:
        for a, _, _ in results[system]:
            a["total_s"] = a["enqueue_s"] + a["process_s"]
    rivals = [s for s in E2E_RIVALS if results[s]]
    stores = {**E2E_SYSTEMS}
    if pg is not None:
        stores["pgqueuer"] = stores["pgqueuer"].format(version=pg.extra["version"])
    best = max(rivals, key=lambda s: rate(s, "total_s")) if rivals else None
    rows = []
    for system in (s for s in E2E_SYSTEMS if results[s]):
        runs = results[system]
        srv_cpu = sum(c for _, c, _ in runs) / sum(w for _, _, w in runs)
        vs = rate(system, "total_s") / rate(best, "total_s") if best else math.nan
        gen_enq = total(system, "enqueue_cpu") / total(system, "enqueue_s")
        gen_proc = total(system, "process_cpu") / total(system, "process_s")
        rows.append(
            [
                system,
                stores[system],
                num(rate(system, "enqueue_s")),
                num(rate(system, "process_s")),
                num(rate(system, "total_s")),
                f"{total(system, 'total_s') / len(runs):.2f}",
                ratio(vs),
                f"{pct(gen_enq)} / {pct(gen_proc)}",
                pct(srv_cpu) if system not in ("huey",) else "(in process)",
            ]
        )
    section = Section("2. End to end through the SDK Worker, against Huey, arq and pgqueuer")
    section.lines += table(
        [
            "system",
            "store",
            "enqueue jobs/s",
            "process jobs/s",
            "end to end jobs/s",
            "s per run",
            f"vs best rival ({best})",
            "generator CPU (enqueue / process)",
            "server CPU",
        ],
        rows,
    )
    section.lines += [
        "",
        f"{plan.e2e_rounds} rounds of {n:,} no-op jobs per system, systems alternating, "
        "each round starting with another system (round 1: "
        + " -> ".join(e2e_order(0))
        + "; then rotated by two places a round, every other round backwards). "
        f"Enqueue: one job per call, {plan.e2e_producers} in flight (asyncio tasks; threads "
        f"for Huey; for pgqueuer, `Queries.enqueue` over an asyncpg pool of "
        f"{plan.e2e_producers} connections). Process: each system's own worker with "
        f"{plan.e2e_workers} jobs in flight "
        "(simplequeue `Worker(concurrency=16)` with its defaults: batch claims, two in "
        "flight, and a prefetch buffer that ClaimAhead sizes to the claim round trip and "
        "the rate jobs end, from 32 up to 64 x concurrency or 1,000 jobs, so that with "
        "no-op jobs it claims hundreds at a time (the rivals hold 16 claimed at most); "
        "acks batched. The `simplequeue (prefetch=0)` row is the same Worker with "
        "`prefetch=0`: at most 16 jobs claimed, as the rivals hold. Enqueue is one job per "
        "call from the caller's side; the SDK `Client` sends the calls in flight together "
        "in one request (16 callers: requests of about 16 jobs). Huey's thread consumer "
        "with 16 "
        "workers; arq `Worker(max_jobs=16, burst=True, poll_delay=0.005)`; pgqueuer "
        "`QueueManager.run(max_concurrent_tasks=16, batch_size=8, mode=drain)` on one "
        "asyncpg connection, the largest batch its cap allows, completions logged in "
        "batches), until every job is done as that system defines it (acked; Huey: "
        "returned; pgqueuer: its row deleted and a `successful` log row written); a round "
        "counts only if every system did all n jobs by its own counts (distinct jobs run, "
        "none failed or left in the queue; pgqueuer: n completions logged), else the part "
        "says so and its targets are not measured. Huey "
        "runs in the generator process (SQLite is a library), so its CPU is all in the "
        "generator column. PostgreSQL's server CPU is the postmaster's and all its "
        "processes' (a backend per connection, the WAL writer, the checkpointer); each "
        "pgqueuer round runs in a fresh database with pgqueuer's schema installed, as "
        "Huey's gets a fresh SQLite file and arq a flushed Redis.",
    ]
    if redis is None and not results["arq"]:
        section.lines.append("- arq: not run, no redis-server here: targets not measured")
    if pg is None and not results["pgqueuer"]:
        section.lines.append("- pgqueuer: not run, no PostgreSQL here: targets not measured")
    if incomplete:
        section.lines[:0] = [
            "**Not measured: rounds that did not process every job, so the rates below "
            "credit work not done:** " + "; ".join(incomplete) + ".",
            "",
        ]
    # The target is against the best of all three: measured against fewer, "met"
    # could mean only that the strongest one was not there.
    missing = [s for s in E2E_RIVALS if not results[s]]
    for system in E2E_PREFETCH:
        if incomplete or missing:
            why = f"incomplete rounds: {'; '.join(incomplete)}" if incomplete else ""
            why = why or f"not run: {', '.join(missing)}"
            section.targets.append(
                Target(f"2. end to end, {system}", ">= 3x the best rival", why, None)
            )
        elif best and results[system]:
            x = rate(system, "total_s") / rate(best, "total_s")
            section.targets.append(
                Target(f"2. end to end, {system}", f">= 3x {best}", ratio(x), x >= 3)
            )
    return section


# --- 3. Depth ----------------------------------------------------------------------------------


def part_depth(plan: Plan, ctx: Context) -> Section:
    """Enqueue and cycle rounds at concurrency 64 on topics pre-filled with 1k, 10k
    and 100k jobs, one broker per depth, depths interleaved."""
    cells: dict[tuple[str, int], Cell] = defaultdict(Cell)
    highest: dict[int, int] = {}
    with contextlib.ExitStack() as stack:
        brokers = {
            d: stack.enter_context(
                start_simplequeued(
                    f"part3-{d}",
                    ctx.logs,
                    data_dir=ctx.tmp / f"part3-{d}",
                    profile=ctx.profile_path(f"part3-{d}"),
                )
            )
            for d in plan.depths
        }
        for d, broker in brokers.items():
            t0 = time.perf_counter()
            ctx.gen.call("prefill", url=broker.url, topic="depth", n=d)
            ctx.log(f"part 3: pre-filled {d:,} jobs in {time.perf_counter() - t0:.1f} s")
        for r in range(plan.depth_rounds):
            made: dict[int, int] = {}
            for op in ("enqueue", "cycle"):
                for d, broker in brokers.items():
                    cell = cells[(op, d)]
                    made[d] = run_round(
                        cell,
                        ctx.gen,
                        broker,
                        "http",
                        broker=not ctx.profile,
                        url=broker.url,
                        topic="depth",
                        op=op,
                        concurrency=plan.depth_concurrency,
                        seconds=30.0,
                        max_ops=plan.depth_round_ops if op == "enqueue" else made[d],
                    )
                    if op == "enqueue":
                        highest[d] = max(highest.get(d, d), d + made[d])
                    ctx.log(
                        f"part 3: round {r + 1}/{plan.depth_rounds} depth {d:,} {op}: "
                        f"{num(cell.rates[-1])}/s"
                    )

    base = plan.depths[0]
    rows = []
    section = Section("3. Depth: throughput and latency with jobs already pending")
    for d in plan.depths:
        e, c = cells[("enqueue", d)], cells[("cycle", d)]
        rows.append(
            [
                f"{d:,}",
                f"{d:,}-{highest.get(d, d):,}",
                num(e.rate),
                ratio(e.rate / cells[("enqueue", base)].rate),
                lat(e, "enqueue"),
                num(c.rate),
                ratio(c.rate / cells[("cycle", base)].rate),
                cycle_lat(c),
                f"{pct(e.gen_share)} / {pct(c.gen_share)}",
                f"{pct(e.srv_share)}, {num(e.srv_us)} / {pct(c.srv_share)}, {num(c.srv_us)}",
                f"{writes(e)} / {writes(c)}",
            ]
        )
    section.lines += table(
        [
            "pre-filled",
            "pending during rounds",
            "enqueue jobs/s",
            f"vs {base:,}",
            "enqueue p50 / p99 ms",
            "cycle jobs/s",
            f"vs {base:,}",
            "cycle p50 / p99 ms",
            "generator CPU (enq / cycle)",
            "server CPU, µs per job (enq / cycle)",
            "mutations per write, write ms (enq / cycle)",
        ],
        rows,
    )
    section.lines += [
        "",
        f"Concurrency {plan.depth_concurrency}; {plan.depth_rounds} rounds per depth, each "
        f"{plan.depth_round_ops:,} single enqueues then as many claim + ack cycles (which "
        "take the oldest, pre-filled jobs), depths alternating. One broker (localfs) per depth, "
        "pre-filled with batch enqueues of 1,000 before anything is measured.",
    ]
    deepest = plan.depths[-1]
    if deepest >= 100_000:
        for op in ("enqueue", "cycle"):
            x = cells[(op, deepest)].rate / cells[(op, base)].rate
            section.targets.append(
                Target(
                    f"3. {op} throughput at {deepest:,} pending",
                    f">= 0.5x the figure at {base:,}",
                    ratio(x),
                    x >= 0.5,
                )
            )
        worst = max(
            cells[("enqueue", deepest)].p("enqueue", 99),
            cells[("cycle", deepest)].p("claim", 99),
            cells[("cycle", deepest)].p("ack", 99),
        )
        section.targets.append(
            Target(
                f"3. p99 at {deepest:,} pending (enqueue, claim, ack)",
                "<= 250 ms",
                f"{ms(worst)} ms (worst of the three)",
                worst <= 250,
            )
        )
    return section


# --- 4. Cost on LocalStack S3 -----------------------------------------------------------------


def dollars_per_million(requests: dict[str, float], jobs: int) -> float:
    put_like = requests["PUT"] + requests["LIST"]
    return (put_like * PRICE_PUT + requests["GET"] * PRICE_GET) / jobs * 1e6


def part_cost(plan: Plan, ctx: Context) -> Section:
    """Store requests per operation and per job on LocalStack S3, from the broker's
    own /metrics: single-operation HTTP at concurrency 64, and the SDK Worker."""
    n = plan.cost_jobs
    bucket = f"sq-bench-{uuid.uuid4().hex[:10]}"
    rows: list[list[str]] = []
    section = Section("4. Cost: store requests per job on LocalStack S3")
    with (
        start_localstack(ctx.tmp / "localstack") as endpoint,
        start_simplequeued(
            "part4", ctx.logs, s3={"bucket": bucket, "endpoint_url": endpoint}
        ) as sq,
    ):
        before = store_requests(sq.url)
        time.sleep(plan.cost_idle)
        idle = {k: v / plan.cost_idle for k, v in delta(store_requests(sq.url), before).items()}

        def row(label: str, ops: int, unit: str, jobs: int, req: dict[str, float]) -> None:
            per_op = req["PUT"] / ops if ops else math.nan
            mutations, put_s = per_write(req)
            rows.append(
                [
                    label,
                    f"{ops:,} {unit}",
                    f"{mutations:.1f}",
                    ms(put_s * 1000),
                    f"{num(req['PUT'])} ({num(req['writes'])} / {num(req['segments'])})",
                    num(req["GET"]),
                    num(req["LIST"]),
                    f"{per_op:.4f}",
                    f"{req['PUT'] / jobs:.4f}" if jobs else "-",
                    f"{req['GET'] / jobs:.4f}" if jobs else "-",
                    f"${dollars_per_million(req, jobs):.3f}" if jobs else "-",
                ]
            )

        single = {"url": sq.url, "topic": "cost-single", "concurrency": plan.cost_concurrency}
        m0 = store_requests(sq.url)
        enq = ctx.gen.call("http", op="enqueue", seconds=600.0, max_ops=n, **single)
        m1 = store_requests(sq.url)
        cyc = ctx.gen.call("http", op="cycle", seconds=600.0, max_ops=enq["ops"], **single)
        m2 = store_requests(sq.url)
        ctx.log(f"part 4: single operations: {enq['ops']} enqueues, {cyc['ops']} cycles")
        d_enq, d_cyc, d_all = delta(m1, m0), delta(m2, m1), delta(m2, m0)
        requests = enq["ops"] + 2 * cyc["ops"]
        row("single enqueue, c=64", enq["ops"], "requests", 0, d_enq)
        row("single claim + ack, c=64", 2 * cyc["ops"], "requests", 0, d_cyc)
        row("single operations, per job", requests, "requests", cyc["ops"], d_all)
        per_op = d_all["PUT"] / requests
        section.targets.append(
            Target(
                "4. PUT per single operation at c=64",
                "<= 0.025 (floor 1/64 = 0.0156)",
                f"{per_op:.4f}",
                per_op <= 0.025,
            )
        )
        label = "SDK Worker"
        m3 = store_requests(sq.url)
        got = ctx.gen.call(
            "sq_e2e",
            url=sq.url,
            topic="cost-sdk",
            n=n,
            concurrency=16,
            enqueue_batch=plan.cost_enqueue_batch,
            worker_concurrency=plan.cost_workers,
        )
        d = delta(store_requests(sq.url), m3)
        ctx.log(f"part 4: {label}: {got['processed']} processed")
        row(label, got["processed"], "jobs", got["processed"], d)
        cost = dollars_per_million(d, got["processed"])
        section.targets.append(
            Target(
                f"4. $ per million jobs, {label}",
                f"< ${SQS_BATCHED} (SQS, batches of 10)",
                f"${cost:.3f}",
                cost < SQS_BATCHED,
            )
        )
    section.lines += table(
        [
            "load",
            "operations",
            "mutations per write",
            "mean PUT ms",
            "PUT (heads / segments)",
            "GET",
            "LIST",
            "PUT per operation",
            "PUT per job",
            "GET per job",
            "$ per million jobs",
        ],
        rows,
    )
    section.lines += [
        "",
        f"{n:,} jobs per load, counted from `simplequeue_store_requests_total` on the broker's "
        "/metrics (every outcome: S3 bills failed conditional writes too). Prices: PUT and "
        "LIST $5 per million, GET $0.40 per million, DELETE free. Single operations: "
        f"{plan.cost_concurrency} requests in flight, one job each. SDK: enqueue_many of "
        f"{plan.cost_enqueue_batch} from 16 tasks, then `Worker(concurrency="
        f"{plan.cost_workers})`. SQS with 10-message batches costs ${SQS_BATCHED} per million "
        "jobs (send, receive and delete, each $0.40 per million requests).",
        f"- background while idle (reaper, broker.json): {idle['GET']:.2f} GET/s, "
        f"{idle['PUT']:.2f} PUT/s, {idle['LIST']:.2f} LIST/s; it is included above",
    ]
    return section


# --- 5. RESP ---------------------------------------------------------------------------------


RESP_ENQUEUE = {"HTTP enqueue": "http", "RESP LPUSH": "lpush", "RESP XADD": "xadd"}
RESP_CYCLE = {
    "HTTP claim + ack": ("http", "HTTP enqueue"),
    "RESP RPOP": ("rpop", "RESP LPUSH"),
    "RESP XREADGROUP + XACK": ("xcycle", "RESP XADD"),
}


def part_resp(plan: Plan, ctx: Context) -> Section:
    """The RESP listener with redis-py pipelines against HTTP, on one broker, rounds
    interleaved: LPUSH and XADD against HTTP enqueue; RPOP and XREADGROUP + XACK
    against HTTP claim + ack."""
    section = Section("5. RESP (redis-py pipelines) against HTTP")
    if not resp_available():
        section.lines.append("not available: this simplequeued has no `--redis-addr`")
        return section
    cells: dict[str, Cell] = defaultdict(Cell)
    topics = {"HTTP enqueue": "resp-http", "RESP LPUSH": "resp-list", "RESP XADD": "resp-stream"}
    with start_simplequeued(
        "part5", ctx.logs, data_dir=ctx.tmp / "part5", resp=True, profile=ctx.profile_path("part5")
    ) as sq:
        port = sq.extra["resp_port"]

        def run(label: str, op: str, topic: str, cap: int) -> int:
            common: dict[str, Any] = {"seconds": plan.resp_seconds, "max_ops": cap}
            if op in ("http", "cycle"):
                return run_round(
                    cells[label],
                    ctx.gen,
                    sq,
                    "http",
                    broker=not ctx.profile,
                    url=sq.url,
                    topic=topic,
                    op="enqueue" if op == "http" else "cycle",
                    concurrency=plan.http_concurrency,
                    **common,
                )
            return run_round(
                cells[label],
                ctx.gen,
                sq,
                "resp",
                broker=not ctx.profile,
                port=port,
                key=topic,
                op=op,
                connections=plan.resp_connections,
                pipeline=plan.resp_pipeline,
                **common,
            )

        for r in range(plan.resp_rounds):
            made: dict[str, int] = {}
            for label, op in RESP_ENQUEUE.items():
                made[label] = run(label, op, topics[label], plan.http_round_ops)
            for label, (op, source) in RESP_CYCLE.items():
                run(label, "cycle" if op == "http" else op, topics[source], made[source])
            for topic in topics.values():
                ctx.gen.call("drain", url=sq.url, topic=topic)
            ctx.log(
                f"part 5: round {r + 1}/{plan.resp_rounds}: "
                + ", ".join(f"{k} {num(c.rates[-1])}/s" for k, c in cells.items())
            )
    rows = []
    for label, cell in cells.items():
        reference = cells["HTTP enqueue" if label in RESP_ENQUEUE else "HTTP claim + ack"]
        if label.startswith("HTTP"):
            latency = lat(cell, "enqueue") if label in RESP_ENQUEUE else cycle_lat(cell)
        else:
            op = RESP_ENQUEUE.get(label) or RESP_CYCLE[label][0]
            latency = f"pipeline {lat(cell, op)}"
            if op == "xcycle":
                latency += f"; XACK pipeline {lat(cell, 'xack')}"
        rows.append(
            [
                label,
                num(cell.rate),
                ratio(cell.rate / reference.rate) + spread(_pair(cell, reference)),
                latency,
                pct(cell.gen_share),
                f"{pct(cell.srv_share)}, {num(cell.srv_us)}",
                writes(cell),
                f"{cell.counters.get('GET', 0.0) / cell.ops:.2f}" if cell.ops else "-",
                str(cell.errors + cell.empty) if cell.errors or cell.empty else "0",
            ]
        )
    section.lines += table(
        [
            "path",
            "jobs/s",
            "vs HTTP (per round)",
            "p50 / p99 ms",
            "generator CPU",
            "server CPU, µs per job",
            "mutations per write, write ms",
            "store GET per job",
            "errors + empty",
        ],
        rows,
    )
    section.lines += [
        "",
        f"{plan.resp_rounds} rounds of at most {plan.resp_seconds} s per path, paths "
        f"alternating, one broker (localfs) with both listeners. HTTP: "
        f"{plan.http_concurrency} requests in flight. RESP: {plan.resp_connections} redis-py "
        f"asyncio connections, each executing pipelines of {plan.resp_pipeline} commands "
        f"({plan.resp_connections * plan.resp_pipeline} in flight); latencies are per "
        "pipeline. RPOP is claim and complete in one command; XREADGROUP COUNT 1 claims, then "
        "one pipeline of XACKs completes what it read. Mutations per write and store GETs "
        "come from the broker's /metrics.",
    ]
    return section


def _pair(cell: Cell, reference: Cell) -> list[float]:
    return [a / b for a, b in zip(cell.rates, reference.rates, strict=False) if b]


def kb(x: float) -> str:
    return "-" if math.isnan(x) else f"{x / 1024:,.1f}"


def mb(x: float) -> str:
    return "-" if math.isnan(x) else f"{x / 2**20:,.0f}"


def head_size(data_dir: Path, topic: str) -> int:
    """Bytes of the topic's head object in a localfs store (0 before it exists)."""
    try:
        return (data_dir / keys.head(topic)).stat().st_size
    except FileNotFoundError:
        return 0


def per_batch(cell: Cell, key: str) -> float:
    """A /metrics counter's delta over the cell's rounds, per head write."""
    writes_ = cell.counters.get("writes", 0.0)
    return cell.counters.get(key, math.nan) / writes_ if writes_ else math.nan


# --- 6. In-flight depth ------------------------------------------------------------------------

# What SPEC 4.1 lets a batch write beyond twice its own payloads, on average.
ALLOWANCE = 64 * 1024


def part_inflight(plan: Plan, ctx: Context) -> Section:
    """SPEC 4.1's first figure (issue 14): enqueue and cycle rounds against a topic
    holding `inflight_pending` pending and `inflight_claimed` claimed jobs of 1 KB,
    and against an empty topic, one broker each, rounds interleaved; what each
    batch writes (from /metrics) and the head's size (from the data directory)."""
    size, topic = plan.inflight_payload, "inflight"
    pending, claimed = plan.inflight_pending, plan.inflight_claimed
    dirs = {"empty": ctx.tmp / "part6-empty", "deep": ctx.tmp / "part6-deep"}
    cells: dict[tuple[str, int, str], Cell] = defaultdict(Cell)
    heads: dict[tuple[str, int, str], list[int]] = defaultdict(list)
    enqueued: dict[int, int] = defaultdict(int)  # jobs the deep topic's enqueue rounds made
    with contextlib.ExitStack() as stack:
        brokers = {
            name: stack.enter_context(
                start_simplequeued(
                    f"part6-{name}",
                    ctx.logs,
                    data_dir=d,
                    profile=ctx.profile_path(f"part6-{name}"),
                )
            )
            for name, d in dirs.items()
        }
        deep = brokers["deep"]
        t0 = time.perf_counter()
        # Batches of 500: 1,000 jobs of 1 KB would pass the broker's --max-body (1 MB).
        common = {"url": deep.url, "topic": topic, "payload_bytes": size}
        ctx.gen.call("prefill", n=pending + claimed, batch=500, **common)
        t1 = time.perf_counter()
        ctx.gen.call(
            "prefill_claimed", url=deep.url, topic=topic, n=claimed, lease=plan.inflight_lease
        )
        prefilled_head = head_size(dirs["deep"], topic)
        ctx.log(
            f"part 6: pre-filled {pending + claimed:,} jobs in {t1 - t0:.1f} s, claimed "
            f"{claimed:,} in {time.perf_counter() - t1:.1f} s; head {kb(prefilled_head)} KB"
        )
        for c in plan.inflight_concurrencies:
            for r in range(plan.inflight_rounds):
                made: dict[str, int] = {}
                for op in ("enqueue", "cycle"):
                    for name, broker in brokers.items():
                        cell = cells[(op, c, name)]
                        made[name] = run_round(
                            cell,
                            ctx.gen,
                            broker,
                            "http",
                            broker=not ctx.profile,
                            url=broker.url,
                            topic=topic,
                            op=op,
                            concurrency=c,
                            seconds=60.0,
                            max_ops=plan.inflight_round_ops if op == "enqueue" else made[name],
                            payload_bytes=size,
                        )
                        heads[(op, c, name)].append(head_size(dirs[name], topic))
                        if op == "enqueue" and name == "deep":
                            enqueued[c] += made[name]
                    ctx.log(
                        f"part 6: c={c} round {r + 1}/{plan.inflight_rounds} {op}: empty "
                        f"{num(cells[(op, c, 'empty')].rates[-1])}/s, in flight "
                        f"{num(cells[(op, c, 'deep')].rates[-1])}/s, head "
                        f"{kb(heads[(op, c, 'deep')][-1])} KB"
                    )

    section = Section(f"6. In-flight depth: {pending:,} pending and {claimed:,} claimed jobs")
    speed, written = [], []
    for op in ("enqueue", "cycle"):
        for c in plan.inflight_concurrencies:
            e, d = cells[(op, c, "empty")], cells[(op, c, "deep")]
            x = d.rate / e.rate
            latency = lat if op == "enqueue" else (lambda cell, _: cycle_lat(cell))
            speed.append(
                [
                    op,
                    str(c),
                    num(e.rate),
                    num(d.rate),
                    ratio(x) + spread(_pair(d, e)),
                    latency(e, "enqueue"),
                    latency(d, "enqueue"),
                    f"{pct(e.srv_share)}, {num(e.srv_us)} / {pct(d.srv_share)}, {num(d.srv_us)}",
                    f"{pct(e.gen_share)} / {pct(d.gen_share)}",
                ]
            )
            section.targets.append(
                Target(
                    f"6. {op} throughput at c={c}, {pending:,} + {claimed:,} in flight",
                    ">= 0.5x the empty topic",
                    ratio(x),
                    x >= 0.5,
                )
            )
            # The payload bytes the deep topic's enqueue batches brought, per batch.
            batches = d.counters.get("writes", math.nan)
            own = size * enqueued[c] / batches if op == "enqueue" else 0.0
            written.append(
                [
                    op,
                    str(c),
                    f"{num(e.counters.get('writes', math.nan))} / "
                    f"{num(d.counters.get('writes', math.nan))}",
                    f"{per_batch(e, 'mutations'):.1f} / {per_batch(d, 'mutations'):.1f}",
                    f"{kb(per_batch(e, 'bytes_written'))} / {kb(per_batch(d, 'bytes_written'))}",
                    f"{kb(per_batch(e, 'head_bytes'))} / {kb(per_batch(d, 'head_bytes'))}",
                    f"{per_batch(d, 'segments'):.2f}",
                    kb(own),
                    kb(2 * own + ALLOWANCE),
                    f"{kb(max(heads[(op, c, 'empty')]))} / {kb(max(heads[(op, c, 'deep')]))}",
                ]
            )
    biggest = max([prefilled_head, *(v for k, vs in heads.items() if k[2] == "deep" for v in vs)])
    section.targets.insert(
        0,
        Target(
            f"6. head size, {pending:,} pending + {claimed:,} claimed",
            "< 256 KB",
            f"{kb(biggest)} KB (largest seen)",
            biggest < 256 * 1024,
        ),
    )
    if not ctx.profile:
        for op in ("enqueue", "cycle"):
            rounds = [cells[(op, c, "deep")] for c in plan.inflight_concurrencies]
            batches = sum(cell.counters["writes"] for cell in rounds)
            total = sum(cell.counters["bytes_written"] for cell in rounds)
            own_total = size * sum(enqueued.values()) if op == "enqueue" else 0
            got, limit = total / batches, (2 * own_total + batches * ALLOWANCE) / batches
            section.targets.insert(
                1 if op == "enqueue" else 2,
                Target(
                    f"6. bytes per {op} batch in flight ({num(batches)} batches)",
                    "<= 2 x own payloads + 64 KB, on average",
                    f"{kb(got)} KB (limit {kb(limit)} KB)",
                    got <= limit,
                ),
            )
    section.lines += table(
        [
            "operation",
            "concurrency",
            "empty jobs/s",
            "in-flight jobs/s",
            "vs empty (per round)",
            "empty p50 / p99 ms",
            "in-flight p50 / p99 ms",
            "server CPU, µs per job (empty / in flight)",
            "generator CPU (empty / in flight)",
        ],
        speed,
    )
    section.lines += [
        "",
        *table(
            [
                "operation",
                "concurrency",
                "batches (empty / in flight)",
                "mutations per batch",
                "KB written per batch",
                "head KB per batch",
                "segments per batch (in flight)",
                "own payload KB per batch (in flight)",
                "limit KB (2 x own + 64)",
                "head KB, largest (empty / in flight)",
            ],
            written,
        ),
        "",
        f"Two brokers (localfs): one on an empty topic, one on a topic pre-filled with "
        f"{pending + claimed:,} jobs of {size:,} B of JSON (batch enqueues of 500) of which "
        f"{claimed:,} were then claimed by batch claims of 1,000 with a "
        f"{plan.inflight_lease:,.0f} s lease and never acked, so they stay in flight. Per "
        f"concurrency, {plan.inflight_rounds} rounds of {plan.inflight_round_ops:,} single "
        f"enqueues ({size:,} B payloads) then as many claim + ack cycles, the two brokers "
        f"alternating; the deep topic keeps {pending:,}-{pending + plan.inflight_round_ops:,} "
        f"pending and {claimed:,} claimed (cycles take the oldest pending jobs, which are in "
        "segments). A batch is one head write that landed (`simplequeue_commit_writes_total`); "
        "KB written counts heads and segments (`simplequeue_commit_bytes_written_total`), head "
        "KB only the heads (`simplequeue_commit_head_bytes_written_total`), both as deltas over "
        "the rounds. Own payload bytes: jobs enqueued in the rounds x payload size / batches (0 "
        f"for cycles). The head's size is `topics/{topic}.json` in each broker's data directory "
        f"after every round (after the pre-fill: {kb(prefilled_head)} KB).",
    ]
    return section


# --- 7. Retention ------------------------------------------------------------------------------

PROBES = {
    "duplicate": "enqueue an old id again (must answer duplicate)",
    "new": "enqueue a new id",
    "get": "GET /topics/t/jobs/<old id> (must answer completed)",
}


def part_retention(plan: Plan, ctx: Context) -> Section:
    """SPEC 4.1's second figure: one broker (--retention, --cache-mb) pushes a
    topic to `retention_records` completed records, its RSS sampled on the way;
    then duplicate detection, new enqueues and lookups of random old ids, against
    the same operations on a topic of `retention_baseline` records, interleaved."""
    n, base_n = plan.retention_records, plan.retention_baseline
    marks = (n // 10, 3 * n // 10, n)
    topics = {"big": ("retained", "r-", n), "baseline": ("baseline", "b-", base_n)}
    data_dir = ctx.tmp / "part7"
    rng = random.Random(7)
    cells: dict[tuple[str, str], Cell] = defaultdict(Cell)
    memory: list[list[str]] = []
    rss: dict[int, int] = {}
    args = (
        "--retention",
        f"{plan.retention_seconds:.0f}",
        "--cache-mb",
        str(plan.retention_cache_mb),
    )

    with start_simplequeued(
        "part7", ctx.logs, data_dir=data_dir, extra_args=args, profile=ctx.profile_path("part7")
    ) as sq:

        def sample(label: str, records: int, rate: float) -> dict[str, int]:
            time.sleep(1.0)  # let the last answers' garbage go before reading the RSS
            got = sq.memory()
            cache = store_requests(sq.url)["cache_used"]
            memory.append(
                [
                    label,
                    f"{records:,}",
                    kb(head_size(data_dir, topics["big"][0])),
                    num(rate),
                    mb(got.get("VmRSS", math.nan)),
                    mb(got.get("VmHWM", math.nan)),
                    mb(cache),
                ]
            )
            return got

        def fill(which: str, start: int, stop: int) -> float:
            topic, prefix, _ = topics[which]
            answer = ctx.gen.call(
                "fill_completed",
                url=sq.url,
                topic=topic,
                prefix=prefix,
                start=start,
                n=stop - start,
            )
            if answer["errors"] or answer["ops"] != stop - start:
                raise RuntimeError(f"{topic}: {answer['ops']} of {stop - start} completed")
            rate = float(answer["ops"]) / float(answer["elapsed"])
            ctx.log(f"part 7: {topic}: {stop:,} records ({num(rate)} jobs/s)")
            return rate

        sample("started", 0, math.nan)
        sample("baseline topic filled", 0, fill("baseline", 0, base_n))
        done = 0
        for mark in marks:
            rate = fill("big", done, mark)
            done = mark
            rss[mark] = sample(f"{mark:,} records", mark, rate).get("VmRSS", 0)
        for r in range(plan.retention_rounds):
            for op in PROBES:
                for which, (topic, prefix, count) in topics.items():
                    ids = [f"{prefix}{rng.randrange(count)}" for _ in range(plan.retention_probes)]
                    cell = cells[(op, which)]
                    run_round(
                        cell,
                        ctx.gen,
                        sq,
                        "probe",
                        broker=not ctx.profile,
                        url=sq.url,
                        topic=topic,
                        op=op,
                        ids=ids,
                        concurrency=plan.retention_concurrency,
                    )
                ctx.log(
                    f"part 7: round {r + 1}/{plan.retention_rounds} {op}: "
                    f"{num(cells[(op, 'big')].rates[-1])}/s at {n:,} records, "
                    f"{num(cells[(op, 'baseline')].rates[-1])}/s at {base_n:,}"
                )
        # The peak covers the lookups, whichever operation came last.
        peak = sample("after the probes", n, math.nan).get("VmHWM", 0)

    section = Section(f"7. Retention: {n:,} completed records in one topic")
    rows = []
    for op, what in PROBES.items():
        for which in topics:
            cell, ref = cells[(op, which)], cells[(op, "baseline")]
            asked = cell.ops + cell.errors
            gets = cell.counters.get("GET", math.nan) / asked if asked else math.nan
            rows.append(
                [
                    what if which == "big" else "",
                    f"{topics[which][2]:,} records",
                    f"{asked:,}",
                    f"{cell.ops:,} ({100 * cell.ops / asked:.1f}%)" if asked else "-",
                    num(cell.rate),
                    lat(cell, op),
                    f"{ratio(cell.p(op, 50) / ref.p(op, 50))} / "
                    f"{ratio(cell.p(op, 99) / ref.p(op, 99))}",
                    f"{pct(cell.srv_share)}, {num(cell.srv_us)}",
                    f"{gets:.2f}",
                ]
            )
    section.lines += table(
        [
            "operation",
            "topic",
            "requests",
            "answered as they must",
            "requests/s",
            "p50 / p99 ms",
            "vs baseline (p50 / p99)",
            "server CPU, µs per request",
            "store GETs per request",
        ],
        rows,
    )
    section.lines += [
        "",
        *table(
            [
                "when",
                f"records in {topics['big'][0]}",
                "its head KB",
                "fill jobs/s",
                "RSS MB",
                "peak RSS MB",
                "cache held MB",
            ],
            memory,
        ),
        "",
        f"One broker (localfs, `--retention {plan.retention_seconds:.0f} --cache-mb "
        f"{plan.retention_cache_mb}`). Filling: batch enqueues of 1,000 jobs with ids "
        '(~100 B payloads), batch claims of 1,000 and batch acks (`{"acks": [...]}`), two '
        f"batches in flight; first the baseline topic ({base_n:,} records), then the big one "
        f"to {', '.join(f'{m:,}' for m in marks)} records. RSS is the broker's VmRSS (peak: "
        "VmHWM) from /proc/<pid>/status, read 1 s after each stage; cache held is "
        '`simplequeue_cache_bytes{kind="used"}`, the cache\'s own estimate of what it '
        f"holds. Then {plan.retention_rounds} rounds of {plan.retention_probes:,} requests per "
        f"operation and topic, {plan.retention_concurrency} in flight, the two topics "
        f"alternating; old ids are drawn at random (seeded) from each topic's whole history. "
        'Store GETs per request are `simplequeue_store_requests_total{kind="get"}` deltas: '
        "segments and manifests the cache did not hold.",
    ]
    dup, got = cells[("duplicate", "big")], cells[("get", "big")]
    for label, cell, aim in (
        ("duplicate detection", dup, "100% exact"),
        ("lookups of old ids", got, "every one answers, completed"),
    ):
        asked = cell.ops + cell.errors
        share = cell.ops / asked if asked else math.nan
        section.targets.append(
            Target(
                f"7. {label} at {n:,} records",
                aim,
                f"{100 * share:.2f}% ({cell.ops:,} of {asked:,})",
                asked > 0 and cell.ops == asked,
            )
        )
    first, last = marks[0], marks[-1]
    x = rss[last] / rss[first] if rss.get(first) else math.nan
    section.targets.append(
        Target(
            f"7. broker RSS at {last:,} records vs {first:,}",
            "<= 1.5x (flat)",
            f"{ratio(x)} ({mb(rss.get(last, math.nan))} vs {mb(rss.get(first, math.nan))} MB)",
            x <= 1.5,
        )
    )
    y = peak / rss[first] if rss.get(first) else math.nan
    section.targets.append(
        Target(
            f"7. broker peak RSS through the probes at {last:,} records vs RSS at {first:,}",
            "<= 1.5x (flat while lookups answer)",
            f"{ratio(y)} ({mb(peak)} vs {mb(rss.get(first, math.nan))} MB)",
            y <= 1.5,
        )
    )
    return section


PARTS: dict[int, Part] = {
    1: part_http,
    2: part_e2e,
    3: part_depth,
    4: part_cost,
    5: part_resp,
    6: part_inflight,
    7: part_retention,
    8: part_s3_latency,
}
