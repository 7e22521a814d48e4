"""The load generator: a process of its own, driven by bench/run.py over a pipe.

It reads one JSON command per line on stdin and answers one JSON line on stdout:
HTTP rounds (enqueue; claim + ack cycles; checked probes of ids) with a bare aiohttp
client, fills that are not measured (pending, claimed, completed jobs), RESP rounds
with redis-py pipelines, and end-to-end runs through simplequeue's SDK Worker, Huey
and arq. Every answer carries this process's own CPU time over what it measured, so
that the report can tell when the client, not the server, was the limit.

    python -m bench.loadgen    # then: {"cmd": "http", ...} per line; {"cmd": "quit"}
"""

from __future__ import annotations

import asyncio
import itertools
import math
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import psutil

from simplequeue.client import Client, Worker
from simplequeue.client.job import Job

JSON = {"Content-Type": "application/json"}
PAD = "x" * 64  # a small, realistic payload: ~100 bytes of JSON


def payload(n: int, size: int = 0) -> dict[str, Any]:
    """Job n's payload: ~100 bytes of JSON, or `size` bytes when that is more."""
    body = {"kind": "bench", "n": n, "pad": PAD}
    if size:
        short = size - len(orjson.dumps({**body, "pad": ""}))
        body["pad"] = "x" * max(0, short)
    return body


@dataclass
class Window:
    """What one measured window saw: operations, errors, per-request latencies."""

    ops: int = 0
    errors: int = 0
    empty: int = 0  # claims or pops that found nothing
    latencies: dict[str, list[float]] = field(default_factory=dict)
    started: float = 0.0
    ended: float = 0.0
    cpu: float = 0.0
    server_cpu: float | None = None  # the server's CPU seconds over the window, if asked

    def record(self, name: str, seconds: float) -> None:
        self.latencies.setdefault(name, []).append(seconds)

    def answer(self, **extra: Any) -> dict[str, Any]:
        return {
            "ops": self.ops,
            "errors": self.errors,
            "empty": self.empty,
            "elapsed": max(self.ended - self.started, 1e-9),
            "cpu": self.cpu,
            "server_cpu": self.server_cpu,
            "lat": {k: [round(v * 1000, 3) for v in vs] for k, vs in self.latencies.items()},
            **extra,
        }


class Budget:
    """At most `ops` operations begun, none after `seconds`."""

    def __init__(self, ops: int, seconds: float) -> None:
        self.left = ops
        self.deadline = time.perf_counter() + seconds

    def take(self, n: int = 1) -> int:
        """How many of `n` operations may begin now (0: stop)."""
        if self.left <= 0 or time.perf_counter() >= self.deadline:
            return 0
        n = min(n, self.left)
        self.left -= n
        return n


def process_cpu(pid: int | list[int] | None) -> float:
    """User + system CPU seconds of process `pid` (all its threads), or of every
    process of a list of pids together; 0 without one."""
    if isinstance(pid, list):
        return sum(process_cpu(p) for p in pid)
    if not pid:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


async def measure(
    window: Window, loops: Iterable[Awaitable[None]], server_pid: int | list[int] | None = None
) -> Window:
    """Run the loops together; the window spans their start to the last one's end.
    With `server_pid` (one pid or a list: several brokers), the server's CPU over
    the same window is taken too."""
    server0 = process_cpu(server_pid)
    cpu0 = time.process_time()
    window.started = time.perf_counter()
    await asyncio.gather(*loops)
    window.ended = time.perf_counter()
    window.cpu = time.process_time() - cpu0
    if server_pid:
        window.server_cpu = process_cpu(server_pid) - server0
    return window


# --- HTTP rounds ---------------------------------------------------------------------------


async def warm_up(session: aiohttp.ClientSession, base: str, n: int) -> None:
    """Open `n` keep-alive connections (a GET of a route that does not exist
    answers 404 at once on every server and touches no store)."""

    async def one() -> None:
        async with session.get(base + "/warm-up") as r:
            await r.read()

    await asyncio.gather(*(one() for _ in range(n)))


async def http_round(cfg: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` loops of single enqueues, or of claim + ack cycles. With
    `urls` (several brokers) and `topics`, loop i sends to urls[i % len(urls)]
    and topic topics[i % len(topics)]; else to `url` and `topic`. Answers other
    than the expected ones are counted by status in `statuses`."""
    urls: list[str] = cfg.get("urls") or [cfg["url"]]
    topics: list[str] = cfg.get("topics") or [cfg["topic"]]
    c = int(cfg["concurrency"])
    budget_ops, seconds = int(cfg["max_ops"]), float(cfg["seconds"])
    size = int(cfg.get("payload_bytes", 0))
    w = Window()
    statuses: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(connector=connector) as session:
        for base in urls:
            await warm_up(session, base, -(-c // len(urls)))
        budget = Budget(budget_ops, seconds)
        counter = itertools.count()

        def route(i: int, verb: str) -> str:
            return f"{urls[i % len(urls)]}/topics/{topics[i % len(topics)]}/{verb}"

        async def enqueue_loop(i: int) -> None:
            enqueue_url = route(i, "enqueue")
            while budget.take():
                job = {"id": uuid.uuid4().hex, "payload": payload(next(counter), size)}
                body = orjson.dumps(job)
                t0 = time.perf_counter()
                async with session.post(enqueue_url, data=body, headers=JSON) as r:
                    await r.read()
                    ok = r.status in (200, 201)
                w.record("enqueue", time.perf_counter() - t0)
                w.ops += ok
                w.errors += not ok
                if not ok:
                    statuses[f"enqueue {r.status}"] += 1

        async def cycle_loop(i: int) -> None:
            claim_url, ack_url = route(i, "claim"), route(i, "ack")
            claim_body = orjson.dumps({"worker_id": f"bench-{i}", "lease": 60})
            while budget.take():
                t0 = time.perf_counter()
                async with session.post(claim_url, data=claim_body, headers=JSON) as r:
                    raw = await r.read()
                    status = r.status
                t1 = time.perf_counter()
                w.record("claim", t1 - t0)
                if status == 404:
                    w.empty += 1
                    return
                if status != 200:
                    w.errors += 1
                    statuses[f"claim {status}"] += 1
                    continue
                job = orjson.loads(raw)["job"]
                ack = orjson.dumps({"job_id": job["id"], "lease_token": job["lease_token"]})
                async with session.post(ack_url, data=ack, headers=JSON) as r:
                    await r.read()
                    ok = r.status == 200
                t2 = time.perf_counter()
                w.record("ack", t2 - t1)
                w.record("cycle", t2 - t0)
                w.ops += ok
                w.errors += not ok
                if not ok:
                    statuses[f"ack {r.status}"] += 1

        loop = enqueue_loop if cfg["op"] == "enqueue" else cycle_loop
        await measure(w, (loop(i) for i in range(c)), cfg.get("server_pid"))
    return w.answer(statuses=dict(statuses))


async def seed_topics(cfg: dict[str, Any]) -> dict[str, Any]:
    """One enqueue into each of `topics`, through `urls` in turn, `concurrency` at
    a time: topics that exist in the store (not measured)."""
    urls, topics = cfg["urls"], cfg["topics"]
    todo = iter(enumerate(topics))
    w = Window()
    async with aiohttp.ClientSession() as session:

        async def loop() -> None:
            for i, topic in todo:
                url = f"{urls[i % len(urls)]}/topics/{topic}/enqueue"
                body = orjson.dumps({"payload": payload(i)})
                async with session.post(url, data=body, headers=JSON) as r:
                    await r.read()
                    if r.status != 201:
                        raise RuntimeError(f"seed_topics: {topic}: HTTP {r.status}")
                w.ops += 1

        await measure(w, (loop() for _ in range(int(cfg.get("concurrency", 16)))))
    return w.answer()


async def prefill(cfg: dict[str, Any]) -> dict[str, Any]:
    """Enqueue `n` jobs in batches of `batch`, a few requests at a time (payloads
    of `payload_bytes` when given: a batch must stay under the broker's --max-body)."""
    base, topic, n, batch = cfg["url"], cfg["topic"], int(cfg["n"]), int(cfg.get("batch", 1000))
    size = int(cfg.get("payload_bytes", 0))
    url = f"{base}/topics/{topic}/enqueue"
    starts = iter(range(0, n, batch))
    w = Window()

    async with aiohttp.ClientSession() as session:

        async def loop() -> None:
            for start in starts:
                jobs = [
                    {"id": uuid.uuid4().hex, "payload": payload(i, size)}
                    for i in range(start, min(n, start + batch))
                ]
                t0 = time.perf_counter()
                async with session.post(url, data=orjson.dumps({"jobs": jobs}), headers=JSON) as r:
                    await r.read()
                    if r.status != 201:
                        raise RuntimeError(f"prefill: HTTP {r.status}")
                w.record("batch", time.perf_counter() - t0)
                w.ops += len(jobs)

        await measure(w, (loop() for _ in range(int(cfg.get("concurrency", 2)))))
    return w.answer()


async def claim_batch(
    session: aiohttp.ClientSession, base: str, topic: str, worker: str, count: int, lease: float
) -> list[dict[str, Any]]:
    """One batch claim of up to `count` jobs; [] when nothing is claimable."""
    body = orjson.dumps({"worker_id": worker, "count": count, "lease": lease})
    async with session.post(f"{base}/topics/{topic}/claim", data=body, headers=JSON) as r:
        raw = await r.read()
        if r.status == 404:
            return []
        if r.status != 200:
            raise RuntimeError(f"claim answered HTTP {r.status}: {raw[:200]!r}")
    jobs: list[dict[str, Any]] = orjson.loads(raw)["jobs"]
    return jobs


async def ack_batch(
    session: aiohttp.ClientSession, base: str, topic: str, jobs: list[dict[str, Any]]
) -> int:
    """One batch ack ({"acks": [...]}) of claimed `jobs`; how many completed."""
    acks = [{"job_id": j["id"], "lease_token": j["lease_token"]} for j in jobs]
    url = f"{base}/topics/{topic}/ack"
    async with session.post(url, data=orjson.dumps({"acks": acks}), headers=JSON) as r:
        raw = await r.read()
        if r.status != 200:
            raise RuntimeError(f"ack answered HTTP {r.status}: {raw[:200]!r}")
    return sum(a["status"] == "completed" for a in orjson.loads(raw)["results"])


async def prefill_claimed(cfg: dict[str, Any]) -> dict[str, Any]:
    """Claim `n` of the jobs pending in the topic, by batch claims of `batch`
    with a long `lease`, and leave them claimed: an in-flight set that outlasts
    the run (not measured)."""
    base, topic, n = cfg["url"], cfg["topic"], int(cfg["n"])
    batch, lease = int(cfg.get("batch", 1000)), float(cfg.get("lease", 3600))
    budget = Budget(n, math.inf)
    w = Window()
    async with aiohttp.ClientSession() as session:

        async def loop(i: int) -> None:
            while k := budget.take(batch):
                t0 = time.perf_counter()
                jobs = await claim_batch(session, base, topic, f"bench-inflight-{i}", k, lease)
                w.record("batch", time.perf_counter() - t0)
                if len(jobs) < k:
                    raise RuntimeError(f"prefill_claimed: {topic} ran out of pending jobs")
                w.ops += len(jobs)

        await measure(w, (loop(i) for i in range(int(cfg.get("concurrency", 2)))))
    return w.answer()


async def fill_completed(cfg: dict[str, Any]) -> dict[str, Any]:
    """Push `n` jobs through to completion, ids `prefix` + number from `start`:
    per `batch`, one batch enqueue (with the ids), one batch claim and one batch
    ack, `concurrency` batches at a time. Their records are kept as long as the
    broker's --retention; `ops` counts jobs completed."""
    base, topic, prefix = cfg["url"], cfg["topic"], cfg["prefix"]
    first, n, batch = int(cfg.get("start", 0)), int(cfg["n"]), int(cfg.get("batch", 1000))
    url = f"{base}/topics/{topic}/enqueue"
    starts = iter(range(first, first + n, batch))
    w = Window()
    async with aiohttp.ClientSession() as session:

        async def loop(i: int) -> None:
            for start in starts:
                jobs = [
                    {"id": f"{prefix}{k}", "payload": payload(k)}
                    for k in range(start, min(first + n, start + batch))
                ]
                t0 = time.perf_counter()
                async with session.post(url, data=orjson.dumps({"jobs": jobs}), headers=JSON) as r:
                    raw = await r.read()
                    if r.status != 201 or orjson.loads(raw)["duplicates"]:
                        raise RuntimeError(f"fill_completed: enqueue answered HTTP {r.status}")
                # Each loop claims as many as it enqueued, after enqueueing them,
                # so the claims always find enough (in whichever loop's batch).
                left = len(jobs)
                while left:
                    claimed = await claim_batch(session, base, topic, f"bench-fill-{i}", left, 600)
                    if not claimed:
                        raise RuntimeError(f"fill_completed: {topic} had nothing to claim")
                    done = await ack_batch(session, base, topic, claimed)
                    w.ops += done
                    w.errors += len(claimed) - done
                    left -= len(claimed)
                w.record("batch", time.perf_counter() - t0)

        await measure(w, (loop(i) for i in range(int(cfg.get("concurrency", 2)))))
    return w.answer()


async def probe_round(cfg: dict[str, Any]) -> dict[str, Any]:
    """One request per id of `ids`, `concurrency` at a time, each checked: `op`
    "duplicate" enqueues the id again (the topic has its record: the answer must
    be 200 with duplicate), "get" reads GET /topics/<t>/jobs/<id> (must be 200,
    completed), "new" enqueues a fresh id (must be 201). `ops` counts answers as
    they must be, `errors` the others (the first few are in `wrong`)."""
    base, topic, op = cfg["url"], cfg["topic"], cfg["op"]
    ids = iter(cfg["ids"])
    w = Window()
    wrong: list[str] = []
    connector = aiohttp.TCPConnector(limit=int(cfg["concurrency"]))
    async with aiohttp.ClientSession(connector=connector) as session:
        await warm_up(session, base, int(cfg["concurrency"]))

        async def one(job_id: str) -> tuple[int, Any]:
            if op == "get":
                request = session.get(f"{base}/topics/{topic}/jobs/{job_id}")
            else:
                body = orjson.dumps({"id": job_id, "payload": payload(0)})
                request = session.post(f"{base}/topics/{topic}/enqueue", data=body, headers=JSON)
            async with request as r:
                return r.status, orjson.loads(await r.read())

        async def loop() -> None:
            for given in ids:
                job_id = uuid.uuid4().hex if op == "new" else given
                t0 = time.perf_counter()
                status, body = await one(job_id)
                w.record(op, time.perf_counter() - t0)
                if op == "duplicate":
                    ok = status == 200 and body.get("duplicate") is True
                elif op == "get":
                    ok = status == 200 and body["id"] == job_id and body["status"] == "completed"
                else:
                    ok = status == 201
                w.ops += ok
                w.errors += not ok
                if not ok and len(wrong) < 5:
                    wrong.append(f"{job_id}: HTTP {status} {str(body)[:120]}")

        await measure(w, (loop() for _ in range(int(cfg["concurrency"]))), cfg.get("server_pid"))
    return w.answer(wrong=wrong)


async def drain(cfg: dict[str, Any]) -> dict[str, Any]:
    """Claim and ack what is left in the topic (or in each of `topics`, all at
    once), 1000 at a time (not measured)."""
    base = cfg["url"]
    w = Window()
    async with aiohttp.ClientSession() as session:

        async def loop(topic: str) -> None:
            while jobs := await claim_batch(session, base, topic, "bench-drain", 1000, 60):
                w.ops += await ack_batch(session, base, topic, jobs)

        await measure(w, [loop(t) for t in cfg.get("topics") or [cfg["topic"]]])
    return w.answer()


# --- RESP rounds ---------------------------------------------------------------------------


async def resp_round(cfg: dict[str, Any]) -> dict[str, Any]:
    """`connections` redis-py clients, each executing pipelines of `pipeline`
    commands: LPUSH, RPOP, XADD, or XREADGROUP COUNT 1 then XACK of what it read."""
    import redis.asyncio as aioredis

    key, op = cfg["key"], cfg["op"]
    conns, depth = int(cfg["connections"]), int(cfg["pipeline"])
    budget = Budget(int(cfg["max_ops"]), float(cfg["seconds"]))
    clients = [aioredis.Redis(host="127.0.0.1", port=int(cfg["port"])) for _ in range(conns)]
    value = orjson.dumps(payload(0)).decode()
    w = Window()
    try:
        await asyncio.gather(*(c.ping() for c in clients))  # connect before measuring
        if op == "xcycle":
            await clients[0].xgroup_create(key, "bench", id="0", mkstream=True)

        async def loop(i: int) -> None:
            client = clients[i]
            while n := budget.take(depth):
                t0 = time.perf_counter()
                pipe = client.pipeline(transaction=False)
                if op == "lpush":
                    for _ in range(n):
                        pipe.lpush(key, value)
                elif op == "xadd":
                    for k in range(n):
                        pipe.xadd(key, {"kind": "bench", "n": str(k), "pad": PAD})
                elif op == "rpop":
                    for _ in range(n):
                        pipe.rpop(key)
                else:
                    for _ in range(n):
                        pipe.xreadgroup("bench", f"bench-{i}", {key: ">"}, count=1)
                replies = await pipe.execute(raise_on_error=False)
                t1 = time.perf_counter()
                w.record(op, t1 - t0)
                bad = [r for r in replies if isinstance(r, Exception)]
                w.errors += len(bad)
                if op in ("lpush", "xadd"):
                    w.ops += n - len(bad)
                    continue
                if op == "rpop":
                    got = sum(r is not None and not isinstance(r, Exception) for r in replies)
                    w.ops += got
                    w.empty += n - got - len(bad)
                    if got < n:
                        return
                    continue
                ids = [
                    entry[0]
                    for r in replies
                    if r and not isinstance(r, Exception)
                    for _stream, entries in r
                    for entry in entries
                ]
                w.empty += n - len(ids) - len(bad)
                if ids:
                    pipe = client.pipeline(transaction=False)
                    for job_id in ids:
                        pipe.xack(key, "bench", job_id)
                    acked = await pipe.execute(raise_on_error=False)
                    w.ops += sum(a == 1 for a in acked)
                    w.errors += sum(a != 1 for a in acked)
                    w.record("xack", time.perf_counter() - t1)
                if len(ids) < n:
                    return

        await measure(w, (loop(i) for i in range(conns)), cfg.get("server_pid"))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
    return w.answer()


# --- end to end: simplequeue's SDK ----------------------------------------------------------


async def run_tasks(n: int, concurrency: int, one: Callable[[int], Awaitable[Any]]) -> None:
    """one(0) .. one(n - 1), `concurrency` at a time."""
    counter = iter(range(n))

    async def loop() -> None:
        for i in counter:
            await one(i)

    await asyncio.gather(*(loop() for _ in range(concurrency)))


async def sq_e2e(cfg: dict[str, Any]) -> dict[str, Any]:
    """Enqueue `n` jobs through the SDK (one per call, or `enqueue_batch` per
    enqueue_many), then process them with the SDK Worker and a no-op handler.
    `prefetch` is the Worker's (absent or None: its default, sized by ClaimAhead)."""
    n, c, wc = int(cfg["n"]), int(cfg["concurrency"]), int(cfg["worker_concurrency"])
    batch = int(cfg.get("enqueue_batch", 1))
    prefetch = cfg.get("prefetch")
    async with Client(cfg["url"], topic=cfg["topic"]) as q:
        await q.status()  # connect, and load the topic, before measuring
        cpu0, t0 = time.process_time(), time.perf_counter()
        if batch == 1:
            await run_tasks(n, c, lambda i: q.enqueue(payload(i)))
        else:
            chunks = [list(range(s, min(n, s + batch))) for s in range(0, n, batch)]
            await run_tasks(
                len(chunks), c, lambda k: q.enqueue_many([payload(i) for i in chunks[k]])
            )
        cpu1, t1 = time.process_time(), time.perf_counter()
        # Jobs by id, so that a job run twice (a lease lost, a claim answered
        # twice) counts once, and the part can tell that every one of the n ran.
        done: set[str] = set()
        runs = 0
        all_done = asyncio.Event()

        async def handler(job: Job) -> None:
            nonlocal runs
            runs += 1
            done.add(job.id)
            if len(done) >= n:
                all_done.set()

        worker = Worker(
            q, handler, concurrency=wc, prefetch=prefetch, wait=1.0, handle_signals=False
        )
        running = asyncio.create_task(worker.run())
        finished = asyncio.ensure_future(all_done.wait())
        await asyncio.wait([finished, running], timeout=600, return_when=asyncio.FIRST_COMPLETED)
        finished.cancel()
        await worker.stop()  # drains: the last acks land before this returns
        await running
        cpu2, t2 = time.process_time(), time.perf_counter()
    return {
        "enqueue_s": t1 - t0,
        "process_s": t2 - t1,
        "enqueue_cpu": cpu1 - cpu0,
        "process_cpu": cpu2 - cpu1,
        "processed": len(done),
        "runs": runs,
    }


# --- end to end: Huey on SQLite and arq on Redis ----------------------------------------------


def huey_e2e(cfg: dict[str, Any]) -> dict[str, Any]:
    """Enqueue `n` no-op tasks into SqliteHuey from `concurrency` threads, then run a
    thread consumer with `worker_concurrency` workers until all ran."""
    from huey import SqliteHuey

    n, c, wc = int(cfg["n"]), int(cfg["concurrency"]), int(cfg["worker_concurrency"])
    # fsync=True: synchronous=FULL, an fsync per commit, which without it depends
    # on the SQLite the interpreter was built with (WAL's compiled default may be
    # NORMAL: commits not flushed). Checked, as pgqueuer's logged tables are.
    huey = SqliteHuey("bench", filename=cfg["db"], fsync=True)
    with huey.storage.db() as cursor:
        journal = cursor.execute("PRAGMA journal_mode").fetchone()[0]
        synchronous = cursor.execute("PRAGMA synchronous").fetchone()[0]
    if journal != "wal" or synchronous != 2:
        raise RuntimeError(f"Huey's SQLite: journal_mode={journal}, synchronous={synchronous}")
    lock = threading.Lock()
    all_done = threading.Event()
    done: set[int] = set()  # by argument: each job is enqueued with its own
    runs = 0

    def noop(i: int) -> None:
        nonlocal runs
        with lock:
            runs += 1
            done.add(i)
            if len(done) >= n:
                all_done.set()

    task = huey.task(name="noop")(noop)
    cpu0, t0 = time.process_time(), time.perf_counter()
    if c == 1:
        for i in range(n):
            task(i)
    else:
        with ThreadPoolExecutor(c) as pool:
            list(pool.map(task, range(n)))
    cpu1, t1 = time.process_time(), time.perf_counter()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    consumer = huey.create_consumer(
        workers=wc,
        worker_type="thread",
        periodic=False,
        initial_delay=0.01,
        max_delay=0.1,
        check_worker_health=False,
    )
    consumer.start()
    all_done.wait(600)  # the count below says whether it came
    cpu2, t2 = time.process_time(), time.perf_counter()
    consumer.stop(graceful=True)
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    left = huey.pending_count()
    huey.storage.close()
    return {
        "enqueue_s": t1 - t0,
        "process_s": t2 - t1,
        "enqueue_cpu": cpu1 - cpu0,
        "process_cpu": cpu2 - cpu1,
        "processed": len(done),
        "runs": runs,
        "left": left,
    }


async def arq_noop(ctx: dict[str, Any], i: int) -> None:
    return None


async def arq_e2e(cfg: dict[str, Any]) -> dict[str, Any]:
    """Enqueue `n` no-op jobs with arq from `concurrency` tasks, then run an arq
    Worker (max_jobs = `worker_concurrency`, burst) until the queue is empty."""
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.constants import default_queue_name
    from arq.worker import Worker as ArqWorker
    from arq.worker import func

    n, c, wc = int(cfg["n"]), int(cfg["concurrency"]), int(cfg["worker_concurrency"])
    settings = RedisSettings(host="127.0.0.1", port=int(cfg["port"]))
    pool = await create_pool(settings)
    try:
        await pool.flushall()
        cpu0, t0 = time.process_time(), time.perf_counter()
        await run_tasks(n, c, lambda i: pool.enqueue_job("noop", i))
        cpu1, t1 = time.process_time(), time.perf_counter()
        worker = ArqWorker(
            functions=[func(arq_noop, name="noop")],
            redis_settings=settings,
            burst=True,
            max_jobs=wc,
            poll_delay=0.005,  # the default 0.5 s would idle between polls
            handle_signals=False,
        )
        await worker.main()
        cpu2, t2 = time.process_time(), time.perf_counter()
        # arq's own counts: a job that raised is failed (or retried), not complete.
        processed, errors = worker.jobs_complete, worker.jobs_failed + worker.jobs_retried
        await worker.close()
        left = await pool.zcard(default_queue_name)
    finally:
        await pool.aclose()
    return {
        "enqueue_s": t1 - t0,
        "process_s": t2 - t1,
        "enqueue_cpu": cpu1 - cpu0,
        "process_cpu": cpu2 - cpu1,
        "processed": processed,
        "errors": errors,  # not "failed", which LoadGen.call reads as the command failing
        "left": left,
    }


async def pgqueuer_e2e(cfg: dict[str, Any]) -> dict[str, Any]:
    """In a fresh database of the PostgreSQL at `dsn`, with pgqueuer's schema:
    enqueue `n` no-op jobs one per call (`Queries.enqueue`) from `concurrency` tasks
    over an asyncpg pool of as many connections, then run a QueueManager in drain
    mode with at most `worker_concurrency` jobs picked at once, until the queue is
    empty and every completion is logged."""
    import asyncpg
    from pgqueuer.db import AsyncpgDriver, AsyncpgPoolDriver
    from pgqueuer.models import Job as PgJob
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    n, c, wc = int(cfg["n"]), int(cfg["concurrency"]), int(cfg["worker_concurrency"])
    admin_dsn, database = cfg["dsn"], cfg["database"]
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    dsn = admin_dsn.rsplit("/", 1)[0] + "/" + database
    setup = await asyncpg.connect(dsn)
    try:
        await Queries(AsyncpgDriver(setup)).install()
        # pgqueuer's default durability ("durable"): every table logged (WAL). A
        # PGQUEUER_DURABILITY in the environment could make some UNLOGGED: refuse.
        unlogged = await setup.fetch(
            "SELECT relname FROM pg_class WHERE relname LIKE 'pgqueuer%' "
            "AND relkind = 'r' AND relpersistence <> 'p'"
        )
        if unlogged:
            raise RuntimeError(f"unlogged pgqueuer tables: {[r['relname'] for r in unlogged]}")
    finally:
        await setup.close()
    async with asyncpg.create_pool(dsn, min_size=c, max_size=c) as pool:
        queries = Queries(AsyncpgPoolDriver(pool))
        bodies = [orjson.dumps(payload(i)) for i in range(n)]
        cpu0, t0 = time.process_time(), time.perf_counter()
        await run_tasks(n, c, lambda i: queries.enqueue("noop", bodies[i]))
        cpu1, t1 = time.process_time(), time.perf_counter()
        done: set[int] = set()  # by job id, as simplequeue's
        runs = 0
        conn = await asyncpg.connect(dsn)
        try:
            qm = QueueManager(Queries(AsyncpgDriver(conn)))

            @qm.entrypoint("noop")
            async def noop(job: PgJob) -> None:
                nonlocal runs
                runs += 1
                done.add(job.id)

            await asyncio.wait_for(
                qm.run(
                    batch_size=wc // 2,  # the largest its max_concurrent_tasks allows
                    max_concurrent_tasks=wc,
                    mode=QueueExecutionMode.drain,
                ),
                timeout=600,
            )
        finally:
            await conn.close()
        cpu2, t2 = time.process_time(), time.perf_counter()
        left = await pool.fetchval("SELECT count(*) FROM pgqueuer")
        logged = await pool.fetchval(
            "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"
        )
    return {
        "enqueue_s": t1 - t0,
        "process_s": t2 - t1,
        "enqueue_cpu": cpu1 - cpu0,
        "process_cpu": cpu2 - cpu1,
        "processed": len(done),
        "runs": runs,
        "left": left,
        "logged": logged,
    }


# --- the command loop -----------------------------------------------------------------------

ASYNC_COMMANDS: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "http": http_round,
    "prefill": prefill,
    "prefill_claimed": prefill_claimed,
    "fill_completed": fill_completed,
    "probe": probe_round,
    "drain": drain,
    "seed_topics": seed_topics,
    "resp": resp_round,
    "sq_e2e": sq_e2e,
    "arq_e2e": arq_e2e,
    "pgqueuer_e2e": pgqueuer_e2e,
}
SYNC_COMMANDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"huey_e2e": huey_e2e}


async def serve() -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.strip():
            return
        cfg = orjson.loads(line)
        if cfg["cmd"] == "quit":
            return
        try:
            if cfg["cmd"] in SYNC_COMMANDS:
                answer = SYNC_COMMANDS[cfg["cmd"]](cfg)
            else:
                answer = await ASYNC_COMMANDS[cfg["cmd"]](cfg)
        except Exception as exc:
            answer = {"failed": f"{type(exc).__name__}: {exc}"}
        sys.stdout.buffer.write(orjson.dumps(answer) + b"\n")
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    asyncio.run(serve())
