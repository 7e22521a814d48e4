"""Micro-benchmark of the group committer alone (no HTTP), on memfs and localfs.

For each backend x callers (1, 16, 256) x depth (1k, 100k pending) x operation
(enqueue one job; claim one + ack it) it measures throughput, mutations per
write, bytes written per mutation and per-operation latency, plus the same
caller loops against a trivial in-memory asyncio "commit" as a baseline for
this (noisy, shared) machine. See bench/README.md.

    .venv/bin/python bench/committer.py [--quick] [--out PATH] [--only FILTER] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import datetime
import gc
import io
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simplequeue.api import JobSpec
from simplequeue.broker.engine import Engine
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore import ObjectStore
from simplequeue.objstore.localfs import LocalStore
from simplequeue.objstore.memfs import MemStore

TOPIC = "bench"
BACKENDS = ("memfs", "localfs")
CALLERS = (1, 16, 256)
DEPTHS = (1_000, 100_000)
OPS = ("enqueue", "cycle")
PREFILL_BATCH = 1000
PAYLOAD_PAD = "x" * 64  # a small, realistic payload: ~100 bytes of JSON

BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Plan:
    """How long and how hard each cell runs.

    A cell is a series of rounds. Each round starts from a fresh copy of the
    pre-filled store and runs at most `round_ops` operations, so the depth stays
    within [depth, depth + round_ops]; rounds repeat until the cell has measured
    `seconds` or run `max_rounds` rounds."""

    seconds: float  # measured time per cell, at most
    round_ops: int  # operations per round, at most (bounds the drift of the depth)
    max_rounds: int
    baseline_seconds: float
    backends: tuple[str, ...] = BACKENDS
    callers: tuple[int, ...] = CALLERS
    depths: tuple[int, ...] = DEPTHS


FULL = Plan(seconds=2.0, round_ops=1000, max_rounds=8, baseline_seconds=0.4)
QUICK = Plan(
    seconds=0.15, round_ops=200, max_rounds=2, baseline_seconds=0.05, depths=(1_000, 10_000)
)


# --- a store wrapper that counts what is written ---------------------------------


class CountingStore(ObjectStore):
    """Delegates to `inner`; counts requests and the bytes of every put/put_if."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.clock = inner.clock  # the wrapped store's time, fed by its requests
        self.calls: collections.Counter[str] = collections.Counter()
        self.bytes_put = 0

    async def get(self, key: str) -> tuple[bytes, str]:
        self.calls["get"] += 1
        return await self.inner.get(key)

    async def put(self, key: str, data: bytes) -> str:
        self.calls["put"] += 1
        self.bytes_put += len(data)
        return await self.inner.put(key, data)

    async def put_if(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        self.calls["put"] += 1
        self.bytes_put += len(data)
        return await self.inner.put_if(key, data, if_match=if_match, if_none_match=if_none_match)

    async def delete(self, key: str) -> None:
        self.calls["delete"] += 1
        await self.inner.delete(key)

    async def list(self, prefix: str = "") -> list[str]:
        self.calls["list"] += 1
        return await self.inner.list(prefix)

    async def close(self) -> None:
        await self.inner.close()


# --- the baseline: the same loops against a trivial in-memory "commit" -------------


class Baseline:
    """A lock-protected dict update per operation, with one yield to the event
    loop while the lock is held (so callers interleave as they do around a real
    commit), and no serialization. Measures how fast this machine runs asyncio
    right now, so throughputs can be compared across noisy runs."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.pending: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.claimed: dict[str, dict[str, Any]] = {}

    async def enqueue(self, specs: list[JobSpec]) -> list[dict[str, Any]]:
        async with self.lock:
            await asyncio.sleep(0)
            out = []
            for spec in specs:
                job_id = uuid.uuid4().hex
                self.pending[job_id] = {"id": job_id, "payload": spec.payload}
                out.append({"id": job_id, "duplicate": False})
            return out

    async def claim(self, worker_id: str) -> list[dict[str, Any]]:
        async with self.lock:
            await asyncio.sleep(0)
            if not self.pending:
                return []
            _, job = self.pending.popitem(last=False)
            job = {**job, "claimed_by": worker_id, "lease_token": uuid.uuid4().hex}
            self.claimed[job["id"]] = job
            return [job]

    async def ack(self, job_id: str, token: str) -> dict[str, Any]:
        async with self.lock:
            await asyncio.sleep(0)
            job = self.claimed.get(job_id)
            if job is None or job["lease_token"] != token:
                raise LookupError(job_id)
            del self.claimed[job_id]
            return {"id": job_id, "status": "completed"}


# --- measuring ------------------------------------------------------------------------


class Probe:
    """Accounts garbage-collector pauses, and optionally profiles, but only while
    `measuring()`: pre-filling, loading and the baseline stay out of both."""

    def __init__(self, profile: bool) -> None:
        self.profiler = cProfile.Profile() if profile else None
        self.active = False
        self.gc_seconds = 0.0
        self.gc_full = 0  # generation-2 collections
        self._gc_started = 0.0

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if not self.active:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_seconds += time.perf_counter() - self._gc_started
            self.gc_full += info["generation"] == 2

    @contextmanager
    def measuring(self) -> Iterator[None]:
        self.active = True
        if self.profiler:
            self.profiler.enable()
        try:
            yield
        finally:
            if self.profiler:
                self.profiler.disable()
            self.active = False


def job_spec(n: int) -> JobSpec:
    return JobSpec({"kind": "bench", "n": n, "pad": PAYLOAD_PAD})


Op = Callable[[int], Awaitable[None]]


@dataclass
class Loops:
    """Latencies and counts of one run of caller loops."""

    latencies: list[float] = field(default_factory=list)
    ops: int = 0
    empty_claims: int = 0
    elapsed: float = 0.0


async def run_callers(callers: int, seconds: float, max_ops: int, op: Op, out: Loops) -> Loops:
    """`callers` tasks each loop on `op` until `seconds` passed or `max_ops` began;
    latencies, counts and elapsed time are added to `out`."""
    started = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def caller(i: int) -> None:
        nonlocal started
        while started < max_ops and time.perf_counter() < deadline:
            started += 1
            s = time.perf_counter()
            await op(i)
            out.latencies.append(time.perf_counter() - s)
            out.ops += 1

    await asyncio.gather(*(caller(i) for i in range(callers)))
    out.elapsed += time.perf_counter() - t0
    return out


def engine_op(engine: Engine, kind: str, loops: Loops) -> Op:
    seq = iter(range(10**12))

    async def enqueue(i: int) -> None:
        await engine.enqueue(TOPIC, [job_spec(next(seq))])

    async def cycle(i: int) -> None:
        jobs = await engine.claim(TOPIC, f"w{i}", count=1)
        if not jobs:
            loops.empty_claims += 1
            return
        await engine.ack(TOPIC, jobs[0]["id"], jobs[0]["lease_token"])

    return enqueue if kind == "enqueue" else cycle


def baseline_op(base: Baseline, kind: str) -> Op:
    seq = iter(range(10**12))

    async def enqueue(i: int) -> None:
        await base.enqueue([job_spec(next(seq))])

    async def cycle(i: int) -> None:
        jobs = await base.claim(f"w{i}")
        if not jobs:  # keep the baseline busy: an endless supply
            await base.enqueue([job_spec(next(seq))])
            jobs = await base.claim(f"w{i}")
        await base.ack(jobs[0]["id"], jobs[0]["lease_token"])

    return enqueue if kind == "enqueue" else cycle


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


@dataclass
class Row:
    backend: str
    callers: int
    depth: int
    op: str
    ops: int
    rounds: int
    pending_min: int
    pending_max: int
    ops_s: float
    mut_s: float
    baseline_ops_s: float
    mut_per_write: float
    bytes_per_mut: float
    p50_ms: float
    p99_ms: float
    empty_claims: int
    conflicts: int
    gc_pct: float  # share of the measured time spent in the garbage collector
    gc_full: int  # full (generation 2) collections during the measured time

    @property
    def ratio(self) -> float:
        return self.ops_s / self.baseline_ops_s if self.baseline_ops_s else float("nan")


# --- stores and their pre-filled snapshots ---------------------------------------------


class Snapshots:
    """Pre-filled stores, one per (backend, pending count), cloned for each cell so
    that every cell starts from the same state and no cell inherits another's
    history (retained records, spilled segments)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._mem: dict[int, dict[str, bytes]] = {}
        self._dirs: dict[int, Path] = {}
        self._clones = 0

    async def prepare(self, backend: str, counts: list[int]) -> None:
        """Fill one store up to each of `counts` (ascending), snapshotting each."""
        self._mem.clear()
        if backend == "localfs":
            for path in self._dirs.values():
                await asyncio.to_thread(shutil.rmtree, path)
            self._dirs.clear()
            fill_dir = self.tmp / "fill"
            store: ObjectStore = LocalStore(fill_dir)
        else:
            store = MemStore()
        committer = GroupCommitter(store, broker_id="bench-fill", settings=CommitSettings())
        engine = Engine(committer)
        filled = 0
        for count in counts:
            while filled < count:
                n = min(PREFILL_BATCH, count - filled)
                await engine.enqueue(TOPIC, [job_spec(filled + k) for k in range(n)])
                filled += n
            if backend == "localfs":
                snap = self.tmp / f"snap-{count}"
                await asyncio.to_thread(_link_tree, fill_dir, snap)
                self._dirs[count] = snap
            else:
                self._mem[count] = {k: (await store.get(k))[0] for k in await store.list()}
        await committer.close()
        await store.close()
        if backend == "localfs":
            await asyncio.to_thread(shutil.rmtree, fill_dir)

    @asynccontextmanager
    async def clone(self, backend: str, count: int) -> AsyncIterator[ObjectStore]:
        """A fresh store holding the snapshot of `count` pending jobs."""
        if backend == "localfs":
            self._clones += 1
            path = self.tmp / f"cell-{self._clones}"
            await asyncio.to_thread(_link_tree, self._dirs[count], path)
            store: ObjectStore = LocalStore(path)
            try:
                yield store
            finally:
                await store.close()
                await asyncio.to_thread(shutil.rmtree, path)
        else:
            store = MemStore()
            for key, data in self._mem[count].items():
                await store.put(key, data)
            try:
                yield store
            finally:
                await store.close()


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a localfs directory by hard links. Safe: localfs never writes a file in
    place (it writes a temp file and renames it over the key). Lock files are
    left out; the clone makes its own."""
    shutil.copytree(src, dst, copy_function=os.link, ignore=shutil.ignore_patterns(".*"))


# --- one cell -----------------------------------------------------------------------------


async def pending_of(committer: GroupCommitter) -> int:
    counts = await committer.read(TOPIC, lambda s, now: s.counts(now))
    return counts["pending"]


async def run_cell(
    snaps: Snapshots, probe: Probe, plan: Plan, backend: str, callers: int, depth: int, op: str
) -> Row:
    # Enqueue rounds start at `depth` and add up to round_ops jobs; cycle rounds
    # start at depth + round_ops and drain at most down to `depth`.
    start = depth if op == "enqueue" else depth + plan.round_ops

    base = Baseline()
    base_loops = await run_callers(
        callers, plan.baseline_seconds, 10**9, baseline_op(base, op), Loops()
    )
    baseline_ops_s = base_loops.ops / base_loops.elapsed

    total = Loops()
    gc0, full0 = probe.gc_seconds, probe.gc_full
    mutations = writes = bytes_put = conflicts = rounds = 0
    seen: list[int] = []
    while rounds < plan.max_rounds and total.elapsed < plan.seconds:
        rounds += 1
        async with snaps.clone(backend, start) as inner:
            store = CountingStore(inner)
            committer = GroupCommitter(store, broker_id="bench", settings=CommitSettings())
            engine = Engine(committer)
            seen.append(await pending_of(committer))  # loads head and segments: not measured
            # Collect the garbage of setup now, so that a full collection that the
            # load made due is not charged to the measured window.
            gc.collect()
            stats = committer.stats
            m0, w0, b0, c0 = stats.mutations, stats.writes, store.bytes_put, stats.conflicts
            with probe.measuring():
                await run_callers(
                    callers,
                    plan.seconds - total.elapsed,
                    plan.round_ops,
                    engine_op(engine, op, total),
                    total,
                )
            mutations += stats.mutations - m0
            writes += stats.writes - w0
            bytes_put += store.bytes_put - b0
            conflicts += stats.conflicts - c0
            seen.append(await pending_of(committer))
            await committer.close()

    lat = sorted(total.latencies)
    return Row(
        backend=backend,
        callers=callers,
        depth=depth,
        op=op,
        ops=total.ops,
        rounds=rounds,
        pending_min=min(seen),
        pending_max=max(seen),
        ops_s=total.ops / total.elapsed,
        mut_s=mutations / total.elapsed,
        baseline_ops_s=baseline_ops_s,
        mut_per_write=mutations / writes if writes else float("nan"),
        bytes_per_mut=bytes_put / mutations if mutations else float("nan"),
        p50_ms=percentile(lat, 0.50) * 1000,
        p99_ms=percentile(lat, 0.99) * 1000,
        empty_claims=total.empty_claims,
        conflicts=conflicts,
        gc_pct=100 * (probe.gc_seconds - gc0) / total.elapsed,
        gc_full=probe.gc_full - full0,
    )


def cells(plan: Plan, backend: str) -> Iterator[tuple[int, int, str]]:
    for depth in plan.depths:
        for callers in plan.callers:
            for op in OPS:
                yield callers, depth, op


def matches(only: str | None, backend: str, callers: int, depth: int, op: str) -> bool:
    """`only` is a comma-separated list of terms (e.g. "localfs,256,cycle"); a cell
    matches when every term equals its backend, callers, depth or operation."""
    if not only:
        return True
    fields = {backend, str(callers), str(depth), op}
    return all(term.strip() in fields for term in only.split(","))


async def run_all(
    plan: Plan, only: str | None, probe: Probe, log: Callable[[str], None]
) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="sq-bench-", dir="/tmp") as tmp:
        snaps = Snapshots(Path(tmp))
        for backend in plan.backends:
            todo = [c for c in cells(plan, backend) if matches(only, backend, *c)]
            if not todo:
                continue
            counts = sorted({*plan.depths, *(d + plan.round_ops for d in plan.depths)})
            t0 = time.perf_counter()
            await snaps.prepare(backend, counts)
            log(f"{backend}: pre-filled {counts} in {time.perf_counter() - t0:.1f} s")
            for callers, depth, op in todo:
                row = await run_cell(snaps, probe, plan, backend, callers, depth, op)
                log(
                    f"  {backend} callers={callers} depth={depth} {op}: "
                    f"{row.ops_s:.0f} ops/s, {row.mut_per_write:.1f} mut/write, "
                    f"{row.bytes_per_mut:.0f} B/mut, p99 {row.p99_ms:.1f} ms, "
                    f"gc {row.gc_pct:.0f}% ({row.gc_full} full)"
                )
                rows.append(row)
    return rows


# --- reporting ------------------------------------------------------------------------------


def _k(n: int) -> str:
    if n < 1000:
        return str(n)
    return f"{n // 1000}k" if n % 1000 == 0 else f"{n / 1000:.1f}k"


def table(rows: list[Row]) -> str:
    head = (
        "| backend | callers | depth | op | ops | pending | ops/s | mut/s "
        "| vs baseline | mut/write | bytes/mut | p50 ms | p99 ms | gc % |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r.backend} | {r.callers} | {_k(r.depth)} | {r.op} | {r.ops} "
            f"| {_k(r.pending_min)}..{_k(r.pending_max)} | {r.ops_s:,.0f} | {r.mut_s:,.0f} "
            f"| {r.ratio:.4f} | {r.mut_per_write:.1f} | {r.bytes_per_mut:,.0f} "
            f"| {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.gc_pct:.0f} ({r.gc_full}) |"
        )
    return "\n".join(lines)


def aims(rows: list[Row], plan: Plan) -> list[str]:
    out: list[str] = []
    for r in rows:
        if r.backend == "localfs" and r.callers == 256:
            ok = r.mut_per_write >= 50
            out.append(
                f"- localfs, 256 callers, {_k(r.depth)}, {r.op}: {r.mut_per_write:.1f} "
                f"mutations/write (aim >= 50): **{'met' if ok else 'MISSED'}**"
            )
    lo, hi = min(plan.depths), max(plan.depths)
    by_key = {(r.backend, r.callers, r.depth, r.op): r for r in rows}
    for r in rows:
        if r.depth != hi or (r.backend, r.callers, lo, r.op) not in by_key:
            continue
        small = by_key[(r.backend, r.callers, lo, r.op)]
        ratio = r.bytes_per_mut / small.bytes_per_mut
        out.append(
            f"- {r.backend}, {r.callers} callers, {r.op}: bytes/mutation at {_k(hi)} = "
            f"{r.bytes_per_mut:,.0f} vs {small.bytes_per_mut:,.0f} at {_k(lo)} "
            f"(x{ratio:.2f}, aim <= 2): **{'met' if ratio <= 2 else 'MISSED'}**"
        )
    odd = [r for r in rows if r.empty_claims or r.conflicts]
    for r in odd:
        out.append(
            f"- note: {r.backend} {r.callers} {_k(r.depth)} {r.op}: "
            f"{r.empty_claims} empty claims, {r.conflicts} conflicts"
        )
    return out


def machine() -> list[str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- date: {now}",
        f"- nproc: {nproc}; CPU: {model}",
        f"- python: {platform.python_implementation()} {platform.python_version()}",
        f"- commit: {commit} (plus any uncommitted changes)",
    ]


def report(rows: list[Row], plan: Plan, quick: bool, command: str) -> str:
    parts = [
        "# Group committer micro-benchmark",
        "",
        f"`{command}`" + (" (quick: tiny run, numbers are indicative only)" if quick else ""),
        "",
        *machine(),
        f"- per cell: rounds of at most {plan.round_ops} operations, each from a fresh copy "
        f"of the pre-filled store, until {plan.seconds} s measured or {plan.max_rounds} "
        f"rounds; baseline {plan.baseline_seconds} s just before each cell",
        "",
        table(rows),
        "",
        "## Aims",
        "",
        *aims(rows, plan),
        "",
        "Columns are explained in bench/README.md.",
        "",
    ]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description="Micro-benchmark of the group committer.")
    parser.add_argument("--quick", action="store_true", help="a tiny run, under 20 s")
    parser.add_argument(
        "--out",
        help="markdown file to write (default: bench/COMMITTER.md; none with --quick)",
    )
    parser.add_argument("--only", help='run only matching cells, e.g. "localfs,256,cycle"')
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the run")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    out = args.out or (None if args.quick else str(BENCH_DIR / "COMMITTER.md"))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    probe = Probe(args.profile)
    t0 = time.perf_counter()
    gc.callbacks.append(probe.on_gc)
    try:
        rows = asyncio.run(run_all(plan, args.only, probe, log))
    finally:
        gc.callbacks.remove(probe.on_gc)
    if probe.profiler:
        buf = io.StringIO()
        stats = pstats.Stats(probe.profiler, stream=buf)
        stats.sort_stats("tottime").print_stats(20)
        stats.sort_stats("cumulative").print_stats(20)
        log(buf.getvalue())
    log(f"total {time.perf_counter() - t0:.1f} s")
    command = "python bench/committer.py" + " ".join(
        ["", *(["--quick"] if args.quick else []), *([f"--only {args.only}"] if args.only else [])]
    )
    text = report(rows, plan, args.quick, command)
    print(text)
    if out and not args.only and not args.profile:
        Path(out).write_text(text)
        log(f"wrote {out}")


if __name__ == "__main__":
    main()
