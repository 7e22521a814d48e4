"""The benchmark of issue 8: simplequeue against a bare aiohttp ceiling, Huey, arq,
pgqueuer and SQS's price, on this machine, every comparison a ratio measured in the
same run.

Parts: 1 HTTP (localfs) against the ceiling; 2 end to end through the SDK Worker
against Huey (SQLite), arq (Redis) and pgqueuer (PostgreSQL); 3 depth (1k, 10k,
100k pending); 4 store requests and dollars per job on LocalStack S3; 5 the RESP
listener against HTTP; 6 a topic with 100k jobs pending and 100k in flight against
an empty one; 7 a topic with 1M retained records against one with 1k (SPEC section
4.1's first two figures); 8 LocalStack behind a proxy adding S3's latency, one
broker against three. Prints markdown; a full run of every part also writes bench/RESULTS.md. Run it
through bin/bench, which installs what it needs:

    bin/bench [--quick] [--parts 1,3] [--out PATH] [--keep] [--profile]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

from bench import servers
from bench.measure import loadgen
from bench.parts import FULL, PARTS, QUICK, Context, Plan
from bench.report import Section, machine, targets_table
from bench.servers import REPO

BENCH_DIR = REPO / "bench"
PART_NAMES = {
    1: "HTTP against the ceiling",
    2: "end to end against Huey, arq and pgqueuer",
    3: "depth",
    4: "cost on LocalStack S3",
    5: "RESP against HTTP",
    6: "in-flight depth",
    7: "retention",
    8: "S3 latency, 1 broker against 3",
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def parse_parts(text: str) -> list[int]:
    try:
        parts = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--parts takes numbers like 1,3 (got {text!r})") from None
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"parts are 1 to {max(PARTS)} (got {text!r})")
    return parts


def run_parts(plan: Plan, parts: list[int], tmp: Path, profile: bool) -> list[Section]:
    sections = []
    with loadgen(tmp / "logs" / "loadgen.log") as gen:
        ctx = Context(gen=gen, tmp=tmp, log=log, profile=profile)
        for number in parts:
            started = time.perf_counter()
            log(f"part {number}: {PART_NAMES[number]}")
            try:
                section = PARTS[number](plan, ctx)
            except Exception as exc:
                traceback.print_exc()
                section = Section(
                    f"{number}. {PART_NAMES[number]}",
                    [f"failed: {type(exc).__name__}: {exc} (logs: {tmp / 'logs'})"],
                )
            log(f"part {number}: done in {time.perf_counter() - started:.0f} s")
            sections.append(section)
    return sections


def render(sections: list[Section], command: str, quick: bool, wall: float) -> str:
    targets = [t for s in sections for t in s.targets]
    head = [
        "# simplequeue benchmark (issue 8)",
        "",
        f"`{command}`, {wall:.0f} s" + (" (quick: small counts, indicative only)" if quick else ""),
        "",
        *machine(),
        "",
        "Every ratio compares figures measured in the same run, the things compared "
        "alternating round by round (A B A B): the machine is shared and noisy, so absolute "
        "figures move between runs and ratios much less. See bench/README.md.",
        "",
    ]
    if targets:
        head += ["## Targets", "", *targets_table(targets), ""]
    return "\n".join(head + [s.text() for s in sections])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, about 4 minutes")
    parser.add_argument(
        "--parts",
        type=parse_parts,
        default=sorted(PARTS),
        help="comma-separated parts to run (default: all, 1 to 8)",
    )
    parser.add_argument(
        "--out",
        help="markdown file to write (default: bench/RESULTS.md for a full run of every "
        "part; nothing for --quick, --parts or --profile)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="servers on CPU 0, the load generator on CPU 1: neither takes the other's core "
        "(needs 2 CPUs)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the brokers of parts 1, 3, 5, 6 and 7 under pyinstrument and print where "
        "they spend their time (figures are distorted by it)",
    )
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every server started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    plan = QUICK if args.quick else FULL
    if args.pin:
        if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
            parser.error("--pin needs CPUs 0 and 1")
        servers.PINNED.update(server={0}, generator={1})
    complete = args.parts == sorted(PARTS) and not args.quick and not args.profile
    out = args.out or (str(BENCH_DIR / "RESULTS.md") if complete else None)
    tmp = BENCH_DIR / ".tmp" / time.strftime("run-%Y%m%d-%H%M%S")
    tmp.mkdir(parents=True, exist_ok=True)
    command = "bin/bench" + (" --quick" if args.quick else "") + (" --pin" if args.pin else "")
    if args.parts != sorted(PARTS):
        command += " --parts " + ",".join(map(str, args.parts))
    started = time.perf_counter()
    try:
        sections = run_parts(plan, args.parts, tmp, args.profile)
        if args.profile:
            from bench.profiles import summaries

            sections.append(summaries(tmp / "profiles"))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    text = render(sections, command, args.quick, time.perf_counter() - started)
    print(text)
    if out:
        Path(out).write_text(text)
        log(f"wrote {out}")
    if args.keep:
        log(f"scratch directory kept: {tmp}")


if __name__ == "__main__":
    main()
