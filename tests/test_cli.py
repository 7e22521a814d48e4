"""The `simplequeue` command line, run as a subprocess against a live broker."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import os
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from simplequeue import __version__, keys
from simplequeue.client import Client, Job
from simplequeue.client.cli import (
    CHECK_LINES,
    CommandWorker,
    Stop,
    checked_count,
    hangup_drains,
    output,
    stopped_by_signals,
)
from simplequeue.objstore.localfs import LocalStore
from simplequeue.objstore.memfs import MemStore
from simplequeue.state import Policy
from tests.helpers.bounding_proxy import BoundingProxy
from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.until import until, until_async

StartBroker = Callable[..., Awaitable[Any]]


class Cli:
    def __init__(self, *base: str, env: dict[str, str] | None = None) -> None:
        self.base = base
        self.env = {**os.environ, **(env or {})}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "simplequeue.client", *self.base, *args]

    async def __call__(
        self, *args: str, stdin: str | None = None, within: float = 60
    ) -> subprocess.CompletedProcess[str]:
        # In a thread: the broker under test runs on this event loop.
        return await asyncio.to_thread(
            subprocess.run,
            self.argv(*args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=within,
            env=self.env,
        )

    async def redirected(self, redirect: str, *args: str) -> subprocess.CompletedProcess[str]:
        """The command run by a shell with `redirect` (">&-", "<&-", "> /dev/full")."""
        line = " ".join(map(repr, self.argv(*args)))
        return await asyncio.to_thread(
            subprocess.run,
            ["sh", "-c", f"exec {line} {redirect}"],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
        )

    async def json(self, *args: str) -> Any:
        done = await self(*args)
        assert done.returncode == 0, done.stderr
        return orjson.loads(done.stdout)


async def flooded(cli: Cli, *work: str, within: float = 20) -> Any:
    """Job "flood" (one attempt) as it is after `work --max-jobs 1 WORK...`
    ran it and returned 0: the command writing more than work reads."""
    await cli.json("enqueue", "1", "--id", "flood", "--max-attempts", "1")
    done = await cli("work", "--max-jobs", "1", *work, within=within)
    assert done.returncode == 0, done.stderr
    return await cli.json("job", "flood")


@pytest.fixture
async def broker(start_broker: StartBroker) -> Any:
    return await start_broker(MemStore())


@pytest.fixture
def cli(broker: Any) -> Cli:
    return Cli("--broker", broker.url, "--topic", "jobs")


async def test_topics_says_which_topic_cannot_be_read_and_fails(start_broker: StartBroker) -> None:
    """An unreadable topic (a corrupt head) was left out of the table and the
    JSON, and the command exited 0."""
    store = MemStore()
    broker = await start_broker(store)
    async with Client(broker.url, topic="good") as good, Client(broker.url, topic="bad") as bad:
        await good.enqueue(1)
        await bad.enqueue(1)
    await store.put(keys.head("bad"), b"\x00 not a head")
    fresh = await start_broker(store)  # one that has cached nothing
    cli = Cli("--broker", fresh.url)
    for args in (("topics",), ("topics", "--table")):
        done = await cli(*args)
        assert done.returncode == 1, done
        assert "good" in done.stdout
        assert "topic bad cannot be read" in done.stderr and "topics/bad.json" in done.stderr


def failed_with(done: subprocess.CompletedProcess[str], text: str) -> bool:
    lines = done.stderr.strip().splitlines()
    return done.returncode == 1 and len(lines) == 1 and text in lines[0]


async def test_enqueue_json_and_plain_text_payloads(cli: Cli) -> None:
    first = (await cli.json("enqueue", '{"item": "book"}', "--id", "j1"))["id"]
    second = (await cli.json("enqueue", "hello world", "--priority", "5"))["id"]
    assert first == "j1"
    job = await cli.json("job", second)
    assert (job["payload"], job["priority"]) == ("hello world", 5)
    assert (await cli.json("job", "j1"))["payload"] == {"item": "book"}


async def test_enqueue_at_a_time_given_in_seconds_or_iso_8601(cli: Cli, tmp_path: Path) -> None:
    soon = time.time() + 3600
    when = datetime.fromtimestamp(soon, UTC).isoformat()
    await cli.json("enqueue", "1", "--id", "secs", "--at", f"{soon}")
    await cli.json("enqueue", "2", "--id", "iso", "--at", when)
    # RFC 3339's lowercase "z" (UTC) too
    lower = datetime.fromtimestamp(soon, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fz")
    await cli.json("enqueue", "2", "--id", "rfc", "--at", lower)
    for job_id in ("secs", "iso", "rfc"):
        job = await cli.json("job", job_id)
        assert (job["status"], job["run_at"]) == ("delayed", pytest.approx(soon, abs=1e-3))
    lines = tmp_path / "jobs.jsonl"
    lines.write_text("3\n4\n")
    assert (await cli.json("enqueue", "--file", str(lines), "--at", when)) == {"enqueued": 2}
    status = await cli.json("status")
    assert (status["delayed"], status["pending"]) == (5, 0)
    for args, text in [
        (("enqueue", "1", "--at", "tomorrow"), "neither Unix seconds nor an ISO 8601 time"),
        (("enqueue", "1", "--at", "-1"), "not a time after 1970"),
        (("enqueue", "1", "--at", "nan"), "not a time after 1970"),
        (("enqueue", "1", "--at", f"{soon}", "--delay", "5"), "--delay and --at"),
    ]:
        done = await cli(*args)
        assert done.returncode == 2, (args, done)
        assert text in done.stderr, (args, done.stderr)
    assert (await cli.json("status"))["total"] == 5


async def test_enqueue_at_an_iso_8601_basic_date_is_that_date_not_1970(cli: Cli) -> None:
    """20261224 is ISO 8601 (its basic form): it was tried as Unix seconds
    first, 20,261,224 s (1970-08-24), a time past, and the job was due at once."""
    basic = (datetime.now() + timedelta(days=30)).strftime("%Y%m%d")
    midnight = datetime.fromisoformat(basic).timestamp()  # local time, as documented
    await cli.json("enqueue", "1", "--id", "d", "--at", basic)
    job = await cli.json("job", "d")
    assert (job["status"], job["run_at"]) == ("delayed", pytest.approx(midnight, abs=1e-3))


async def test_enqueue_file_sends_batches_with_a_progress_bar(cli: Cli, tmp_path: Path) -> None:
    lines = tmp_path / "jobs.jsonl"
    lines.write_text("\n".join(orjson.dumps({"n": i}).decode() for i in range(1203)) + "\n")
    done = await cli("enqueue", "--file", str(lines))
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"enqueued": 1203}
    assert "enqueue" in done.stderr  # the progress bar
    assert (await cli.json("status", "--json"))["pending"] == 1203


async def test_enqueue_file_with_a_bad_line_fails_before_sending(cli: Cli, tmp_path: Path) -> None:
    lines = tmp_path / "jobs.jsonl"
    lines.write_text('{"ok": 1}\n{broken\n')
    done = await cli("enqueue", "--file", str(lines))
    assert failed_with(done, "line 2")
    assert (await cli.json("status", "--json"))["pending"] == 0


async def test_enqueue_file_with_a_line_the_store_cannot_hold_fails_before_sending(
    cli: Cli, tmp_path: Path
) -> None:
    """A line that is JSON the store cannot hold (an integer past 64 bits) was
    found only by the broker, batch by batch: the 500 lines before it were
    enqueued, the error did not say which line it was, and a re-run enqueued
    those 500 again (the CLI's ids are random) (review of the CLI)."""
    lines = tmp_path / "jobs.jsonl"
    deep = "[" * 300 + "]" * 300
    for bad in ('{"n": ' + "9" * 30 + "}", deep):
        lines.write_text("".join(f'{{"n": {i}}}\n' for i in range(600)) + bad + "\n")
        done = await cli("enqueue", "--file", str(lines))
        assert failed_with(done, "line 601"), done.stderr
        assert (await cli.json("status", "--json"))["pending"] == 0


async def test_enqueue_file_from_a_pipe_sends_batches_before_the_pipe_ends(
    cli: Cli, broker: Any
) -> None:
    """`producer | simplequeue enqueue --file -` read and parsed its whole
    input before sending the first batch: a producer that keeps its pipe open
    enqueued nothing until it ended, and every payload was held in memory (a
    100 MB file: 470 MB of RSS) (review of the CLI). Then a batch not yet
    full waited for more lines or the pipe's end: its lines are sent once
    none has come for LINGER (round 25). A bad line mid-pipe stops it there,
    saying what was enqueued."""
    proc = await asyncio.create_subprocess_exec(
        *cli.argv("enqueue", "--file", "-"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli.env,
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"".join(orjson.dumps({"n": i}) + b"\n" for i in range(1200)))
        await proc.stdin.drain()
        async with Client(broker.url, topic="jobs") as q:

            async def sent() -> bool:  # 2 full batches, then the 200 lines left
                return (await q.status())["pending"] == 1200

            await until_async(sent, within=30)
        proc.stdin.write(b"{broken\n")
        await proc.stdin.drain()
    finally:
        proc.stdin.close()
        out, err = await proc.communicate()
    last = err.decode().strip().splitlines()[-1]
    assert proc.returncode == 1 and out == b"", err
    assert last.startswith("Error: line 1201: not valid JSON"), last
    assert last.endswith("(1200 jobs were enqueued: through line 1200)"), last
    assert (await cli.json("status", "--json"))["pending"] == 1200


async def test_enqueue_file_from_an_open_pipe_that_fails_exits_1_not_aborted(cli: Cli) -> None:
    """`enqueue --file -` reads a pipe on a daemon thread. When a batch failed
    (here a line over the broker's --max-body; a store outage or a broker gone
    alike) while the producer kept the pipe open, the thread was blocked in a
    read of sys.stdin holding its buffer's lock, and the interpreter's
    shutdown aborted: "Fatal Python error: _enter_buffered_busy: could not
    acquire lock for <_io.BufferedReader name='<stdin>'>", SIGABRT, a C stack
    on stderr; 8 times of 8 (review, round 30). SPEC 7: exit status 1 with a
    one-line message."""
    proc = await asyncio.create_subprocess_exec(
        *cli.argv("enqueue", "--file", "-"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli.env,
    )
    assert proc.stdin is not None and proc.stderr is not None
    try:
        proc.stdin.write(b'"' + b"x" * 2_000_000 + b'"\n')  # over the default 1 MiB
        await proc.stdin.drain()
        async with asyncio.timeout(60):
            err = await proc.stderr.read()  # to its end: the process exited
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        proc.stdin.close()  # only now: the producer keeps its pipe open
    assert b"Fatal Python error" not in err, err[-400:]
    assert code == 1, (code, err[-400:])
    assert err.strip().splitlines()[-1].startswith(b"Error: PayloadTooLarge"), err[-400:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_enqueue_file_from_a_pipe_stopped_by_a_signal_says_what_it_enqueued(
    cli: Cli, broker: Any, sig: signal.Signals
) -> None:
    """`enqueue --file -` from a pipe its producer keeps open (`tail -f log |
    simplequeue enqueue --file -`) ends only by a signal. A bad line or a
    failed request ends it with "(N jobs were enqueued: through line K)", so
    that a re-run can start after line K; Ctrl-C (exit 130) or SIGTERM
    (killed, -15) said nothing but the progress bar's label, and a re-run
    from the start enqueued every job again (no ids: new ones) (review,
    round 30). The lines it read are sent, and it says so, exit status
    128 + the signal's number as a shell reports a command killed by it."""
    proc = await asyncio.create_subprocess_exec(
        *cli.argv("enqueue", "--file", "-"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli.env,
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"".join(b"%d\n" % n for n in range(10)))
        await proc.stdin.drain()
        await until_enqueued(broker, "jobs", 10)
        proc.stdin.write(b"".join(b"%d\n" % n for n in range(10, 15)))
        await proc.stdin.drain()  # read, or not yet, when the signal comes: sent if read
        proc.send_signal(sig)
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 128 + sig and out == b"", (proc.returncode, err)
    pending = (await cli.json("status"))["pending"]
    last = err.decode().strip().splitlines()[-1]
    assert last == (
        f"Error: stopped by {sig.name} ({pending} jobs were enqueued: through line {pending})"
    ), err


def reading_at(pid: int, path: Path) -> int | None:
    """How far process `pid` has read `path`, or None while it has it not open."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == str(path):
                info = (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text()
                return int(info.split("pos:")[1].split()[0])
    return None


async def test_ctrl_c_stops_enqueue_file_while_it_checks_a_large_file(
    cli: Cli, tmp_path: Path
) -> None:
    """A regular file's lines are all checked before the first is sent, on
    the event loop's thread with no await: asyncio.run()'s Ctrl-C, a cancel,
    landed once the whole file was checked (12 million lines: exit 10.3 s
    after Ctrl-C) (review of the edge). The check awaits every 10,000 lines,
    where it lands. 20 million lines take some 12 s to check here."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(b"1\n" * 20_000_000)
    proc = subprocess.Popen(  # noqa: ASYNC220 (started, then waited for on a thread)
        cli.argv("enqueue", "--file", str(jobs)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=cli.env,
        # As a terminal's Ctrl-C finds it (a background job's SIGINT is ignored).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        await until(lambda: (reading_at(proc.pid, jobs) or 0) > 0, within=60)
        proc.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        await asyncio.to_thread(proc.wait, 120)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    assert (proc.returncode, took < 3) == (130, True), (took, err[-400:])
    assert (await cli.json("status"))["pending"] == 0


@pytest.mark.parametrize(
    ("text", "jobs", "awaits"),
    [
        (b"1\n" + b"\n" * (2 * CHECK_LINES + 5) + b"2\n", 2, 2),
        (b" \n" * 3 * CHECK_LINES, 0, 3),
    ],
)
def test_the_check_of_enqueue_file_awaits_within_blank_lines_too(
    text: bytes, jobs: int, awaits: int
) -> None:
    """The check awaited every CHECK_LINES lines or CHECK_BYTES bytes, where a
    Ctrl-C lands, counting only lines that hold a job: 20 million blank lines
    ran 1.7 s with no await (review). Blank lines count too."""
    check = checked_count(io.BytesIO(text))
    for awaited in range(awaits + 1):
        try:
            check.send(None)  # one await (asyncio.sleep(0) yields None)
        except StopIteration as done:
            assert (done.value, awaited) == (jobs, awaits)
            return
    raise AssertionError(f"more than {awaits} awaits")


async def test_enqueue_file_stopped_by_a_second_signal_says_which_lines_may_be_enqueued(
    broker: Any,
) -> None:
    """A first Ctrl-C sends the lines read; a second stops now, the request
    under way cut short (a broker that does not answer), saying which lines
    it carried."""
    async with FaultProxy(broker.url).running() as proxy:
        cli = Cli("--broker", proxy.url, "--topic", "jobs")
        proxy.fail("/enqueue", "silent")
        proc = await asyncio.create_subprocess_exec(
            *cli.argv("enqueue", "--file", "-"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli.env,
        )
        assert proc.stdin is not None and proc.stderr is not None
        try:
            proc.stdin.write(b"1\n2\n3\n")
            await proc.stdin.drain()
            await proxy.arrived.wait()  # the request is held there
            proc.send_signal(signal.SIGINT)
            async with asyncio.timeout(30):
                said = b"enqueue"  # the progress bar's label
                while said and b"a second stops now" not in said:
                    said = await proc.stderr.readline()
                assert said, "the first SIGINT is not told"
                proc.send_signal(signal.SIGINT)
                err = await proc.stderr.read()
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            proc.stdin.close()
    assert code == 130, (code, err)
    assert err.decode().strip().splitlines()[-1] == (
        "Error: stopped by a second SIGINT as lines 1-3 were being sent: they may have been"
        " enqueued too (0 jobs were enqueued: none)"
    ), err


async def test_a_second_signal_heard_as_enqueue_file_ends_cancels_nothing_after_it() -> None:
    """The loop queues a signal's handler as it reads the signal's byte; one
    queued in the turn that answered the last batch ran after the command
    had left stopped_by_signals: a second SIGTERM then cancelled the
    command's task in client.close(), not in a request, and it ended in a
    CancelledError's traceback, not "stopped by SIGTERM" and exit status 143."""
    loop = asyncio.get_running_loop()

    async def command() -> None:
        stop = Stop()
        with stopped_by_signals(stop):
            stop(signal.SIGTERM)  # the first: reading no more
            signal.raise_signal(signal.SIGTERM)  # the second: its byte in the self-pipe
            # The last batch's answer, handled in the turn that reads that
            # byte and before it: this task resumes before the handler runs.
            answered = loop.create_future()
            loop.call_soon(answered.set_result, None)
            await answered
        for _ in range(3):  # the client's close(), the handler queued running meanwhile
            await asyncio.sleep(0)

    task = asyncio.create_task(command())
    await asyncio.wait([task])
    assert not task.cancelled()
    task.result()


async def test_enqueue_file_from_a_busy_pipe_does_not_lose_a_sigterm(
    broker_process: Callable[..., Any],
) -> None:
    """asyncio learns of a signal (loop.add_signal_handler) from the byte its
    C handler writes to the loop's self-pipe. The thread reading the pipe
    handed each line over with a call_soon_threadsafe of its own, a byte into
    that same self-pipe: while the loop was busy with a batch, the thread's
    burst filled it, and a signal's byte was dropped ("Exception ignored when
    trying to write to the signal wakeup fd: BlockingIOError"). `yes |
    simplequeue enqueue --file -` ran on through SIGTERM, enqueuing, until
    killed, in about 1 trial of 7, the lines read and not sent gone with it
    and no word of how far it got."""
    broker = broker_process("--backend", "memfs")  # a process of its own: a busy command
    for trial in range(25):
        topic = f"yes{trial}"
        cli = Cli("--broker", broker.url, "--topic", topic)
        read, write = os.pipe()
        producer = await asyncio.create_subprocess_exec("yes", '{"a": 1}', stdout=write)
        proc = await asyncio.create_subprocess_exec(
            *cli.argv("enqueue", "--file", "-"),
            stdin=read,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=cli.env,
        )
        os.close(read)
        os.close(write)
        assert proc.stderr is not None
        try:
            async with Client(broker.url, topic=topic) as q:

                async def busy() -> bool:  # a producer that never stops: batches flow
                    return (await q.status())["enqueued"] >= 20_000

                await until_async(busy, within=30)
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await proc.wait()
            lost = proc.returncode is None
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            with contextlib.suppress(ProcessLookupError):
                producer.kill()
            await producer.wait()
        said = (await proc.stderr.read()).decode(errors="replace")
        assert not lost, f"trial {trial}: SIGTERM ignored for 10 s; stderr: {said[-600:]}"
        assert proc.returncode == 143, (trial, proc.returncode, said[-600:])
        assert said.strip().splitlines()[-1].startswith("Error: stopped by SIGTERM ("), said


async def test_enqueue_file_sizes_its_batches_by_bytes_not_lines(cli: Cli, tmp_path: Path) -> None:
    """500 lines a request whatever their size: lines of 2.5 KB made a request
    past the broker's 1 MiB --max-body, refused whole (review, round 22)."""
    lines = tmp_path / "jobs.jsonl"
    lines.write_text(
        "".join(orjson.dumps({"n": n, "blob": "z" * 2500}).decode() + "\n" for n in range(600))
    )
    done = await cli("enqueue", "--file", str(lines))
    assert done.returncode == 0, done.stderr
    assert (await cli.json("status", "--json"))["pending"] == 600


async def test_enqueue_file_halves_a_batch_a_smaller_max_body_refuses_and_says_how_far_it_got(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    """A broker whose --max-body is below a batch: the batch goes in halves.
    A line no request can carry stops the command, saying how many jobs were
    enqueued and through which line, so that a rerun can start after it."""
    broker = await start_broker(MemStore(), max_body=64 * 1024)
    cli = Cli("--broker", broker.url, "--topic", "jobs")
    lines = tmp_path / "jobs.jsonl"
    fitting = [orjson.dumps({"n": n, "blob": "z" * 1000}).decode() for n in range(300)]
    too_large = orjson.dumps({"blob": "z" * 100_000}).decode()
    lines.write_text("\n".join([*fitting, too_large, '{"after": 1}']) + "\n")
    done = await cli("enqueue", "--file", str(lines))
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("Error: PayloadTooLarge"), done.stderr
    assert last.endswith("(300 of 302 jobs were enqueued: through line 300)"), last
    assert (await cli.json("status", "--json"))["pending"] == 300


async def test_enqueue_file_says_a_batch_whose_answer_was_lost_may_have_been_enqueued(
    broker: Any, tmp_path: Path
) -> None:
    """A batch whose every try reached the broker, each answer lost (a proxy
    answering 502 after passing it on), failed "BrokerUnavailable: ... (0 of
    10 jobs were enqueued: none)" though all 10 were: a user who sends the
    file again from the line it names doubles them (no ids: new ones)
    (review finding). The batch's outcome is unknown, and the message says
    which lines it carried, as it does for one a second signal cut short."""
    lines = tmp_path / "jobs.jsonl"
    lines.write_text("".join(f"{n}\n" for n in range(10)))
    async with FaultProxy(broker.url).running() as proxy:
        proxy.always["/enqueue"] = "landed-502"
        done = await Cli("--broker", proxy.url, "--topic", "jobs")("enqueue", "--file", str(lines))
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("Error: BrokerUnavailable"), done.stderr
    assert last.endswith(
        "; lines 1-10 were being sent: they may have been enqueued too"
        " (0 of 10 jobs were enqueued: none)"
    ), last
    async with Client(broker.url, topic="jobs") as q:
        assert (await q.status())["pending"] == 10


async def test_cli_enqueue_file_through_a_proxy_bounding_bodies_halves_its_batches(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    """enqueue --file halved a batch the broker refused as too large
    (PayloadTooLarge: its --max-body) but not one a proxy refused with its
    own 413 page (a BrokerError), as the SDK's coalesced enqueues do: through
    a proxy bounding bodies at 256 KiB, 600 lines of 1 KB, each of which
    fits, failed "BrokerError: ... HTTP 413 (0 of 600 jobs were enqueued:
    none)"."""
    broker = await start_broker(MemStore())
    lines = tmp_path / "jobs.jsonl"
    lines.write_text("".join(f'"{n:04d}{"x" * 1000}"\n' for n in range(600)))
    async with BoundingProxy(broker.url, 256 * 1024).running() as proxy:
        done = await Cli("--broker", proxy.url, "--topic", "t")("enqueue", "--file", str(lines))
    assert done.returncode == 0, done.stderr[-400:]
    assert orjson.loads(done.stdout) == {"enqueued": 600}
    async with Client(broker.url, topic="t") as q:
        assert (await q.status())["pending"] == 600


async def test_enqueue_file_refuses_an_id_it_cannot_give(cli: Cli, tmp_path: Path) -> None:
    """--id was dropped silently with --file: each line got an id of its own
    (review, round 22)."""
    lines = tmp_path / "jobs.jsonl"
    lines.write_text('{"n": 1}\n')
    done = await cli("enqueue", "--file", str(lines), "--id", "x")
    assert done.returncode == 2 and "--id" in done.stderr, done.stderr
    assert (await cli.json("status", "--json"))["pending"] == 0


async def test_an_empty_token_is_no_token_for_the_cli_as_for_the_sdk(cli: Cli) -> None:
    """`--token "$TOKEN"` with TOKEN empty, against a broker without auth,
    became a usage error when the broker's empty token was refused (review of
    this round's fixes): a client cannot turn auth off, and Client(token="")
    is no token."""
    done = await cli("--token", "", "status", "--json")
    assert done.returncode == 0, done.stderr


async def test_claim_ack_with_token_and_result(cli: Cli) -> None:
    await cli.json("enqueue", '{"n": 1}', "--id", "a")
    job = await cli.json("claim", "worker-1", "--lease", "60")
    assert (job["id"], job["claimed_by"]) == ("a", "worker-1")
    stale = await cli("ack", "a", "--lease-token", "stale")
    assert failed_with(stale, "LeaseLost")
    ok = await cli.json("ack", "a", "--lease-token", job["lease_token"], "--result", '{"r": 2}')
    assert ok == {"id": "a", "status": "completed"}
    assert (await cli.json("job", "a"))["result"] == {"r": 2}


async def test_claim_on_an_empty_topic_fails_with_one_line(cli: Cli) -> None:
    assert failed_with(await cli("claim", "w"), "no job is claimable")


async def test_nack_heartbeat_dead_requeue_purge(cli: Cli) -> None:
    await cli.json("enqueue", "x", "--id", "a", "--max-attempts", "1")
    job = await cli.json("claim", "w")
    beat = await cli.json("heartbeat", "a", "--lease-token", job["lease_token"], "--lease", "90")
    assert beat["lease_expires_at"] > job["lease_expires_at"]
    nacked = await cli.json("nack", "a", "--lease-token", job["lease_token"], "--error", "bad")
    assert nacked == {"id": "a", "status": "dead"}
    [dead] = await cli.json("dead")
    assert (dead["id"], dead["last_error"]) == ("a", "bad")
    assert await cli.json("dead", "--offset", "1") == []
    assert [j["id"] for j in await cli.json("dead", "--limit", "1")] == ["a"]
    assert await cli.json("requeue", "a") == {"requeued": ["a"]}
    job = await cli.json("claim", "w")
    await cli.json("nack", "a", "--lease-token", job["lease_token"])
    assert await cli.json("purge") == {"purged": ["a"]}


@pytest.mark.parametrize("args", [("status",), ("topics",), ("schedules",)])
async def test_data_is_printed_as_json_unless_a_table_is_asked_for(
    cli: Cli, args: tuple[str, ...]
) -> None:
    """SPEC 7: JSON for data, tables where asked. `status`, `topics` and
    `schedules` printed tables unless --json was given: a script piping
    `simplequeue status` got a table (contract review of SPEC 7, round 25).
    --json, the default now, is still accepted."""
    await cli.json("enqueue", "1")
    await cli.json("schedule", "s", "--every", "60", "1")
    data, given = await cli.json(*args), await cli.json(*args, "--json")
    # (A schedule may fire between the two: its times may differ, not its shape.)
    assert data and len(data) == len(given) and type(data) is type(given), (data, given)


async def test_status_and_topics_print_tables_when_asked(cli: Cli) -> None:
    await cli.json("enqueue", "1")
    table = await cli("status", "--table")
    assert table.returncode == 0
    header, row = table.stdout.strip().splitlines()
    assert header.split()[:3] == ["topic", "pending", "delayed"]
    assert row.split()[:2] == ["jobs", "1"]
    assert (await cli.json("status"))["pending"] == 1
    assert (await cli.json("topics"))["jobs"]["pending"] == 1
    header, row = (await cli("topics", "--table")).stdout.strip().splitlines()
    assert header.split()[0] == "topic" and row.split()[:2] == ["jobs", "1"]


async def test_bad_input_fails_with_one_line_and_no_traceback(
    cli: Cli, broker: Any, tmp_path: Path
) -> None:
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(b'{"ok": 1}\n"caf\xe9"\n')
    for args, text in [
        (("enqueue", "1", "--delay", "-5"), "--delay"),
        (("ack", "a", "--result", "{nope"), "not valid JSON"),
        (("job", "ghost"), "JobNotFound"),
        (("--topic", "bad.name", "status"), "Invalid value for '--topic'"),
        (("enqueue", "--file", str(not_utf8)), "line 2: not valid JSON"),
        (("--broker", "http://[::1", "status"), "Invalid value for '--broker'"),
        (("--broker", "localhost:8080", "status"), "Invalid value for '--broker'"),
        (("--token", "two\nlines", "status"), "Invalid value for '--token'"),
        # Bytes that are not UTF-8, as a shell passes them (os.fsdecode: surrogates)
        (("ack", "a", "--result", os.fsdecode(b"\xe9")), "not UTF-8"),
        (("enqueue", os.fsdecode(b"caf\xe9")), "not UTF-8"),
        # An integer past 64 bits stays one (not a float, another value) and
        # is refused by the broker with its reason.
        (("enqueue", '{"n": ' + "9" * 30 + "}"), "cannot be stored"),
    ]:
        done = await cli(*args)
        assert done.returncode != 0, args
        assert text in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert (await cli.json("status", "--json"))["pending"] == 0


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("simplequeue.client", ("enqueue",)),  # neither PAYLOAD nor --file
        ("simplequeue.client", ("enqueue", "1", "--priority", "x")),  # a value of the wrong type
        ("simplequeue.client", ("schedule", "nightly", "1")),  # neither --every nor --cron
        ("simplequeue.client", ("frob",)),  # no such command
        ("simplequeue.client", ("--bogus", "status")),  # no such option, the group's
        ("simplequeue.broker", ("--lease", "x")),
        ("simplequeue.broker", ("--backend", "memfs", "--create-bucket")),  # raised in main
    ],
)
def test_a_usage_error_is_told_on_one_line(module: str, args: tuple[str, ...]) -> None:
    """SPEC 7: a failing command exits non-zero with a one-line message. A
    usage error printed click's four lines instead ("Usage: ...", "Try ...
    --help", a blank line, then "Error: ..."), for simplequeue and
    simplequeued alike (contract review of SPEC 7, round 25). Nothing is sent:
    the broker named is not there."""
    prefix = ("--broker", "http://127.0.0.1:9") if module == "simplequeue.client" else ()
    done = subprocess.run(
        [sys.executable, "-m", module, *prefix, *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("Error: ") and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == ""
    # --help is unchanged: the usage, then the rest.
    helped = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0 and helped.stdout.startswith("Usage: "), helped


async def test_settling_with_a_closed_stdin_is_one_line_not_a_traceback(cli: Cli) -> None:
    """`ack -` (and nack -, heartbeat -, enqueue --file -) read stdin; run with
    stdin closed (cron, a service, `<&-`), sys.stdin is None and the command
    died with an AttributeError (or click's RuntimeError) traceback (review
    of the CLI)."""
    for args in (("ack", "-"), ("nack", "-"), ("heartbeat", "-"), ("enqueue", "--file", "-")):
        done = await cli.redirected("<&-", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert "stdin is closed" in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr, (args, done.stderr)


async def test_an_answer_that_is_not_the_apis_is_told_on_one_line() -> None:
    """SPEC 7: "exit status non-zero with a one-line message on failure". A
    --broker that answers something else (a web server on the wrong port, a
    proxy's page) had the first 200 characters of its body in the error, new
    lines and all: several lines of HTML on stderr (review of the CLI)."""
    page = "<!doctype html>\n<html>\n<head>\n<title>Welcome</title>\n</head>\n<body>hi</body>\n"

    async def any_page(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        done = await Cli("--broker", f"http://{host}:{port}")("status")
    finally:
        await runner.cleanup()
    assert failed_with(done, "not the API's"), done.stderr
    assert "<!doctype html> <html> <head> <title>Welcome" in done.stderr, done.stderr


async def test_a_broker_url_with_a_query_fragment_or_user_is_a_usage_error(
    cli: Cli, broker: Any
) -> None:
    """--broker (and simplequeued's --advertise-url, written to broker.json)
    took any http URL with a host: the client appends each route to it, so
    with "?x" every request went to "/" (the status page: HTML in the error),
    with "#x" to nothing the API serves (405) (review of the CLI). A user and
    password would be sent on every request, and written to broker.json."""
    urls = [f"{broker.url}/?x", f"{broker.url}?", f"{broker.url}#x", "http://u:p@127.0.0.1:1"]
    for url in urls:
        done = await Cli("--broker", url)("enqueue", "1")
        assert done.returncode == 2, (url, done.stderr)
        assert "Invalid value for '--broker'" in done.stderr, (url, done.stderr)
    assert (await Cli("--broker", broker.url).json("status", "--json"))["pending"] == 0
    advertise = ["--backend", "memfs", "--addr", "127.0.0.1:0", "--advertise-url", "http://x:1/?q"]
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "simplequeue.broker", *advertise],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--advertise-url" in done.stderr, done.stderr


def test_an_empty_dir_is_refused_not_the_current_directory(tmp_path: Path) -> None:
    """`simplequeued --dir "$DATA"` with DATA unset or empty served the
    current directory as its store (Path("").absolute()), writing
    broker.json, brokers/ and topics/ there; `simplequeue --discover --dir ""`
    looked for broker.json there (review of the CLI). The broker refuses an
    empty --token for the same reason (a variable that did not expand)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "simplequeue.broker", "--addr", "127.0.0.1:0", "--dir", ""],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        first = proc.stdout.readline() if ready else ""
    finally:
        proc.terminate()
        proc.wait(30)
    assert "listening on" not in first, first
    assert not (tmp_path / "broker.json").exists()
    assert proc.returncode == 2
    argv = Cli("--discover", "--dir", "").argv("status")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--dir" in done.stderr, done.stderr


@pytest.mark.parametrize("command", ["simplequeue", "simplequeued"])
def test_an_empty_dir_variable_is_refused_as_the_empty_flag_is(
    command: str, tmp_path: Path
) -> None:
    """SIMPLEQUEUE_DIR="$DATA", DATA unset: click takes an empty variable for
    an unset one, and the default ./simplequeue-data was served, or searched
    for broker.json (review of round 26's broker changes)."""
    env = {"SIMPLEQUEUE_DIR": ""}
    if command == "simplequeued":
        done = simplequeued("--backend", "localfs", env=env, within=15, cwd=tmp_path)
    else:
        argv = Cli("--discover").argv("status")
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, env={**os.environ, **env}
        )
    assert done.returncode == 2 and "SIMPLEQUEUE_DIR" in done.stderr, done.stderr
    assert not (tmp_path / "simplequeue-data").exists()


def simplequeued(
    *args: str, within: float = 60, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """simplequeued run with `args` (and `env` beside the environment) on memfs
    (unless `args` say otherwise) and any free port, once it ended
    (TimeoutExpired, the broker killed, when it still runs after `within`)."""
    at = ("--addr", "127.0.0.1:0", "--backend", "memfs")
    return subprocess.run(
        [sys.executable, "-m", "simplequeue.broker", *at, *args],
        capture_output=True,
        text=True,
        timeout=within,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


@pytest.mark.parametrize("broker_id", ["../x", "a b", "-x", "x" * 200])
def test_simplequeued_refuses_a_bad_broker_id_as_a_usage_error(broker_id: str) -> None:
    """README: a flag's bad value is "one line too, `Error: ...`, with exit
    status 2, from `simplequeue` and `simplequeued` alike". A --broker-id that
    cannot name a registration was refused in one line but with exit status
    1, a runtime failure (the Broker's construction raised InvalidRequest),
    where --advertise-url ftp://x gets 2 (review of the CLI, round 26)."""
    done = simplequeued("--broker-id", broker_id)
    assert "broker ids are" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.returncode == 2 and "--broker-id" in done.stderr, done.stderr


def test_simplequeued_refuses_an_empty_broker_id_rather_than_ignore_it() -> None:
    """`--broker-id ""` (a `--broker-id "$ID"` whose variable is unset) was
    taken for no flag: the broker ran under a random id (review of the CLI,
    round 26). `--dir ""` and `--token ""` are refused for the same reason."""
    done = simplequeued("--broker-id", "", within=15)  # a broker serving times out
    assert done.returncode == 2 and "--broker-id" in done.stderr, done.stderr


def test_simplequeued_refuses_an_empty_broker_id_in_its_variable() -> None:
    """SIMPLEQUEUE_BROKER_ID="$ID", ID unset, is the environment's `--broker-id
    ""`: click takes an empty variable for an unset one, and the broker ran
    under a random id (review of the docs, round 26)."""
    done = simplequeued(env={"SIMPLEQUEUE_BROKER_ID": ""}, within=15)
    assert done.returncode == 2 and "SIMPLEQUEUE_BROKER_ID" in done.stderr, done.stderr


async def test_an_empty_topic_variable_is_a_usage_error_not_topic_default(
    broker: Any, cli: Cli
) -> None:
    """SIMPLEQUEUE_TOPIC="$T", T unset: click takes an empty variable for an
    unset one, and the command acted on topic "default" (a purge on its dead
    jobs) (review of the docs, round 26)."""
    done = await Cli("--broker", broker.url, env={"SIMPLEQUEUE_TOPIC": ""})("enqueue", '"x"')
    assert done.returncode == 2 and "SIMPLEQUEUE_TOPIC" in done.stderr, done.stderr
    assert (await Cli("--broker", broker.url).json("status"))["enqueued"] == 0


async def test_claim_whose_output_cannot_be_written_says_so_and_gives_the_job_back(
    cli: Cli,
) -> None:
    """`claim > /dev/full` (a full disk; a closed pipe likewise): the job was
    claimed, the printing failed with an OSError traceback, and the job stayed
    claimed, with a lease nobody could settle (its token was never seen), until
    the lease ran out; with stdout closed, claim exited 0 (review of the CLI).
    The job is released (its attempt uncounted)."""
    await cli.json("enqueue", "1", "--id", "a")
    for redirect in ("> /dev/full", ">&-"):
        done = await cli.redirected(redirect, "claim", "w")
        assert failed_with(done, "cannot write the output"), (redirect, done.stderr)
        assert (await cli.json("status", "--json"))["claimed"] == 0
        assert (await cli.json("job", "a"))["attempts"] == 0
    done = await cli.redirected("> /dev/full", "status", "--json")
    assert failed_with(done, "cannot write the output"), done.stderr


def claim_read_by_a_reader_that_leaves(cli: Cli) -> subprocess.CompletedProcess[bytes]:
    """`simplequeue claim w | head -c 1`, the reader leaving once the pipe is
    full (the command blocked writing the rest)."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        cli.argv("claim", "w"), stdout=write_end, stderr=subprocess.PIPE, env=cli.env
    )
    os.close(write_end)
    try:
        waiting = bytearray(4)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            fcntl.ioctl(read_end, termios.FIONREAD, waiting)
            if int.from_bytes(waiting, sys.byteorder) >= 65536:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the command never filled the pipe")
        os.read(read_end, 1)
    finally:
        os.close(read_end)
    _, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, b"", err)


@pytest.mark.parametrize("unbuffered", [False, True])
async def test_claim_whose_reader_leaves_mid_output_says_so_and_gives_the_job_back(
    broker: Any, unbuffered: bool
) -> None:
    """`claim w | head -c 1`, the job 300 KB of JSON: with PYTHONUNBUFFERED=1
    (container images set it) the write into the pipe was cut short at 64 KiB,
    Python's text stream dropped the rest without an error, and claim exited 0
    with the job kept claimed under a token nobody read (review of the edge).
    Either way it fails and gives the job back, as for a closed pipe."""
    cli = Cli("--broker", broker.url, "--topic", "big")
    cli.env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        cli.env["PYTHONUNBUFFERED"] = "1"
    async with Client(broker.url, topic="big") as client:
        await client.enqueue({"blob": "x" * 300_000}, id="a")
    done = await asyncio.to_thread(claim_read_by_a_reader_that_leaves, cli)
    assert (done.returncode, b"cannot write the output" in done.stderr) == (1, True), done
    assert (await cli.json("job", "a"))["status"] == "pending"


@pytest.mark.parametrize("buffered", [True, False])
def test_output_into_a_non_blocking_pipe_waits_for_its_reader(
    monkeypatch: pytest.MonkeyPatch, buffered: bool
) -> None:
    """stdout a pipe whose write end is non-blocking (O_NONBLOCK set by a
    parent sharing it: node's child_process, some CI runners), its reader a
    little slow. Unbuffered (PYTHONUNBUFFERED=1) a full pipe's write returns
    None and output waited; buffered, the default, BufferedWriter raises
    BlockingIOError instead, and 1 MB of output failed with "cannot write the
    output: write could not complete without blocking", exit 1 (a claim gave
    its job back) (review round 34b). Both wait for the reader now."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
    got = bytearray()

    def reader() -> None:
        while data := os.read(r, 65536):
            got.extend(data)
            time.sleep(0.01)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        binary = open(w, "wb", buffering=-1 if buffered else 0, closefd=False)  # noqa: SIM115
        monkeypatch.setattr("sys.stdout", io.TextIOWrapper(binary, encoding="utf-8"))
        output("x" * 1_000_000)
    finally:
        os.close(w)
        thread.join()
        os.close(r)
    assert bytes(got) == b"x" * 1_000_000 + b"\n"


async def test_unreachable_broker_fails_with_one_line() -> None:
    done = await Cli("--broker", "http://127.0.0.1:9")("status")
    assert failed_with(done, "BrokerUnavailable")


async def test_token_from_the_environment(start_broker: StartBroker) -> None:
    broker = await start_broker(MemStore(), token="t0k")
    assert failed_with(await Cli("--broker", broker.url)("status"), "Unauthorized")
    ok = await Cli("--broker", broker.url, env={"SIMPLEQUEUE_TOKEN": "t0k"})("status", "--json")
    assert ok.returncode == 0, ok.stderr


async def test_work_with_a_wrong_token_fails_and_says_why(start_broker: StartBroker) -> None:
    """It logged "claim failed" every second and never exited. (Its banner and
    the worker's log come before the error's line.)"""
    broker = await start_broker(MemStore(), token="t0k")
    done = await Cli("--broker", broker.url, "--token", "wrong")("work", "--", "cat", within=30)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == "Error: Unauthorized: missing or wrong bearer token"


async def test_discover_through_broker_json(start_broker: StartBroker, tmp_path: Path) -> None:
    await start_broker(LocalStore(tmp_path))
    cli = Cli("--discover", "--dir", str(tmp_path), "--topic", "found")
    await cli.json("enqueue", "via discovery")
    assert (await cli.json("status", "--json"))["pending"] == 1


async def test_broker_and_discover_together_are_refused_not_one_silently_dropped(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    """SPEC 7 gives --broker URL and --discover as alternatives. Given both,
    the CLI dropped --broker unsaid and talked to whatever broker.json names:
    a user who meant one broker acted on another's queue (contract review of
    SPEC 7, round 25). Both in the environment are refused too."""
    broker = await start_broker(LocalStore(tmp_path))
    found = ("--discover", "--dir", str(tmp_path), "--topic", "t")
    done = await Cli("--broker", "http://127.0.0.1:1", *found)("enqueue", "1")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "--broker and --discover" in done.stderr
    both = {"SIMPLEQUEUE_BROKER": broker.url, "SIMPLEQUEUE_DISCOVER": "1"}
    done = await Cli("--dir", str(tmp_path), "--topic", "t", env=both)("enqueue", "1")
    assert done.returncode == 2 and "SIMPLEQUEUE_BROKER and SIMPLEQUEUE_DISCOVER" in done.stderr
    async with Client(broker.url, topic="t") as q:
        assert (await q.status())["enqueued"] == 0  # nothing was enqueued anywhere


async def test_store_flags_without_discover_are_refused_not_ignored(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    """The store flags (and --max-age) only mean something with --discover.
    Without it they were ignored and the command went to --broker, by default
    127.0.0.1:8080, whichever broker that is (contract review of SPEC 7,
    round 25)."""
    broker = await start_broker(MemStore())
    for flags in (("--dir", str(tmp_path)), ("--backend", "s3"), ("--max-age", "5")):
        done = await Cli("--broker", broker.url, *flags, "--topic", "t")("enqueue", "1")
        assert done.returncode == 2, (flags, done.stdout, done.stderr)
        assert f"{flags[0]}: with --discover only" in done.stderr
    async with Client(broker.url, topic="t") as q:
        assert (await q.status())["enqueued"] == 0


async def test_the_command_line_wins_over_the_environment_in_reaching_a_broker(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    """A shell that runs simplequeued too has its SIMPLEQUEUE_DIR set (both
    commands read it): the store flags of the environment are no usage error
    without --discover. --discover on the command line wins over
    SIMPLEQUEUE_BROKER, --broker over SIMPLEQUEUE_DISCOVER."""
    found = await start_broker(LocalStore(tmp_path))
    other = await start_broker(MemStore())
    store_env = {"SIMPLEQUEUE_DIR": str(tmp_path), "SIMPLEQUEUE_BACKEND": "localfs"}
    await Cli("--broker", other.url, "--topic", "t", env=store_env).json("enqueue", "to other")
    discover_env = {**store_env, "SIMPLEQUEUE_DISCOVER": "1"}
    await Cli("--broker", other.url, "--topic", "t", env=discover_env).json("enqueue", "again")
    broker_env = {"SIMPLEQUEUE_BROKER": other.url}
    await Cli("--discover", "--dir", str(tmp_path), "--topic", "t", env=broker_env).json(
        "enqueue", "to found"
    )
    async with Client(other.url, topic="t") as q:
        assert (await q.status())["enqueued"] == 2
    async with Client(found.url, topic="t") as q:
        assert (await q.status())["enqueued"] == 1


# --- work ----------------------------------------------------------------------------


async def test_work_acks_with_stdout_and_nacks_with_stderr(cli: Cli, broker: Any) -> None:
    await cli.json("enqueue", '{"n": 1}', "--id", "ok")
    await cli.json("enqueue", '{"n": 2}', "--id", "fails", "--max-attempts", "1")
    await cli.json("enqueue", '{"n": 3}', "--id", "text")
    script = (
        "import json, sys\n"
        "job = json.load(sys.stdin)\n"
        "if job['n'] == 2: sys.exit('it broke')\n"
        "print('not json {' if job['n'] == 3 else json.dumps({'double': job['n'] * 2}))\n"
    )
    done = await cli(
        "work", "--concurrency", "2", "--max-jobs", "3", "--", sys.executable, "-c", script
    )
    assert done.returncode == 0, done.stderr
    assert (await cli.json("job", "ok"))["result"] == {"double": 2}
    assert (await cli.json("job", "text"))["result"] == "not json {"
    dead = await cli.json("job", "fails")
    assert dead["status"] == "dead"
    assert "it broke" in dead["last_error"]


async def test_work_keeps_stdout_the_store_cannot_hold_as_json_as_text(
    cli: Cli, broker: Any
) -> None:
    """A command that succeeded printing an integer past 64 bits: its ack was
    refused (the store holds integers of 64 bits), the job nacked until dead
    (review finding). The output is kept as text; and a command killed by a
    signal is said to be, not "exit status -9"."""
    await cli.json("enqueue", "1", "--id", "big", "--max-attempts", "1")
    await cli.json("enqueue", "2", "--id", "killed", "--max-attempts", "1")
    script = (
        "import json, os, signal, sys\n"
        "if json.load(sys.stdin) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "print(2 ** 70)\n"
    )
    done = await cli("work", "--max-jobs", "2", "--", sys.executable, "-c", script)
    assert done.returncode == 0, done.stderr
    big = await cli.json("job", "big")
    assert (big["status"], big["result"]) == ("completed", str(2**70))
    killed = await cli.json("job", "killed")
    assert killed["status"] == "dead"
    assert killed["last_error"].endswith("CommandFailed: killed by SIGKILL"), killed


async def test_work_drains_on_ctrl_c(cli: Cli, broker: Any) -> None:
    await cli.json("enqueue", '"slow"', "--id", "s")
    flag = Path(os.environ.get("TMPDIR", "/tmp")) / f"sq-drain-{os.getpid()}"
    flag.unlink(missing_ok=True)
    # The command waits for a file the test creates after sending SIGINT.
    script = (
        f"import os, sys, time\nsys.stdin.read()\n"
        f"while not os.path.exists({str(flag)!r}): time.sleep(0.02)\nprint('drained')\n"
    )
    proc = await asyncio.create_subprocess_exec(
        *cli.argv("work", "--", sys.executable, "-c", script),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(30), Client(broker.url, topic="jobs") as q:
            while (await q.status())["claimed"] == 0:
                await broker.committer.wait_changed("jobs", 1.0)
            proc.send_signal(signal.SIGINT)
            flag.touch()
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        flag.unlink(missing_ok=True)
    assert code == 0
    job = await cli.json("job", "s")
    assert (job["status"], job["result"]) == ("completed", "drained")


async def test_work_whose_ack_did_not_land_says_so_and_exits_1(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    """The broker went away before the ack: "acks failed" was logged, yet the
    summary said "1 acked" and the exit status was 0 (review, round 22)."""
    broker = await start_broker(MemStore())
    cli = Cli("--broker", broker.url, "--topic", "jobs")
    await cli.json("enqueue", '"x"')
    gate = tmp_path / "gate"
    command = f"while [ ! -e {gate} ]; do sleep 0.02; done; echo ok"
    proc = await asyncio.create_subprocess_exec(
        *cli.argv("work", "--max-jobs", "1", "--", "sh", "-c", command),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30), Client(broker.url, topic="jobs") as q:
            while (await q.status())["claimed"] == 0:
                await broker.committer.wait_changed("jobs", 1.0)
        await broker.stop()  # gone before the command ends: its ack cannot land
        gate.touch()
        _, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1, lines
    assert "done: 0 acked, 0 nacked, 1 not acked" in lines
    assert lines[-1] == "Error: 1 jobs ran but their acks did not land: they will run again"


async def test_work_logs_each_failed_command_on_one_line(cli: Cli) -> None:
    await cli.json("enqueue", '"bad"', "--id", "bad", "--max-attempts", "1")
    await cli.json("enqueue", '"good"', "--id", "good")
    script = "import json, sys\nif json.load(sys.stdin) == 'bad': sys.exit('it broke')\n"
    done = await cli(
        "work", "--concurrency", "1", "--max-jobs", "2", "--", sys.executable, "-c", script
    )
    assert done.returncode == 0, done.stderr
    [line] = [line for line in done.stderr.splitlines() if "job bad" in line]
    assert "failed on attempt 1" in line and line.endswith("it broke")
    assert "Traceback" not in done.stderr


async def test_work_max_jobs_stops_after_that_many_jobs_even_when_they_fail(cli: Cli) -> None:
    ids = [(await cli.json("enqueue", str(n)))["id"] for n in range(3)]
    done = await cli(
        "work",
        "--concurrency",
        "2",
        "--max-jobs",
        "2",
        "--",
        sys.executable,
        "-c",
        "import sys; sys.exit('no')",
        within=30,
    )
    assert done.returncode == 0, done.stderr
    assert "0 acked, 2 nacked" in done.stderr
    attempts = [(await cli.json("job", i))["attempts"] for i in ids]
    assert sorted(attempts) == [0, 1, 1]  # exactly two ran


@pytest.mark.parametrize("kind", ["missing", "not executable"])
async def test_work_with_a_command_that_cannot_run_fails_at_once_and_claims_nothing(
    cli: Cli, broker: Any, tmp_path: Path, kind: str
) -> None:
    job_id = (await cli.json("enqueue", "1"))["id"]
    program = tmp_path / "tool"
    if kind == "not executable":
        program.write_text("#!/bin/sh\necho hi\n")
        program.chmod(0o644)
    done = await cli("work", "--", str(program), within=30)
    reason = "not found" if kind == "missing" else kind
    assert failed_with(done, f"cannot run {str(program)!r}: {reason}")
    async with Client(broker.url, topic="jobs") as q:
        job = await q.job(job_id)
    assert (job.status, job.attempts) == ("pending", 0)  # never claimed


async def test_work_whose_command_fails_to_start_gives_the_job_back_at_once_and_exits(
    cli: Cli, broker: Any, tmp_path: Path
) -> None:
    job_id = (await cli.json("enqueue", "1"))["id"]
    program = tmp_path / "garbage"  # executable, but no program the system can start
    program.write_bytes(b"\x00\x01\x02 not a program\n")
    program.chmod(0o755)
    done = await cli("work", "--", str(program), within=30)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"Error: cannot run {str(program)!r}: Exec format error"
    async with Client(broker.url, topic="jobs") as q:
        job = await q.job(job_id)
    # Given back with the error and no delay: another worker may run it now.
    assert (job.status, job.attempts) == ("pending", 1)
    assert job.last_error is not None and "Exec format error" in job.last_error


async def test_work_passes_the_jobs_id_and_attempt_in_the_environment(broker: Any) -> None:
    cli = Cli("--broker", broker.url, "--topic", "jobs", env={"SQ_TEST_INHERITED": "kept"})
    job_id = (await cli.json("enqueue", '"x"', "--id", "env-job"))["id"]
    script = (
        "import json, os\n"
        "print(json.dumps([os.environ.get(k) for k in"
        " ('SIMPLEQUEUE_JOB_ID', 'SIMPLEQUEUE_ATTEMPT', 'SQ_TEST_INHERITED')]))\n"
    )
    done = await cli("work", "--max-jobs", "1", "--", sys.executable, "-c", script, within=30)
    assert done.returncode == 0, done.stderr
    async with Client(broker.url, topic="jobs") as q:
        assert (await q.job(job_id)).result == ["env-job", "1", "kept"]


async def test_job_prints_the_brokers_json_as_it_came(cli: Cli, broker: Any) -> None:
    await cli.json("enqueue", '"first"', "--id", "done")
    await cli.json("enqueue", '"second"', "--id", "waiting")
    async with Client(broker.url, topic="jobs") as q:
        job = await q.claim("w")
        assert job is not None and job.id == "done"
        await q.ack(job)  # no result: the record says null
    async with aiohttp.ClientSession() as http:
        for job_id in ("done", "waiting"):
            async with http.get(f"{broker.url}/topics/jobs/jobs/{job_id}") as answer:
                assert await cli.json("job", job_id) == await answer.json()
    record = await cli.json("job", "done")
    assert set(record) == {
        "id",
        "status",
        "attempts",
        "created_at",
        "finished_at",
        "result",
        "last_error",
    }
    assert (record["status"], record["result"], record["last_error"]) == ("completed", None, None)
    assert (await cli.json("job", "waiting"))["status"] == "pending"


@pytest.mark.parametrize("module", ["simplequeue.client", "simplequeue.broker"])
def test_version_on_both_commands(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (0, f"simplequeue {__version__}\n"), done.stderr


async def test_claim_without_lease_takes_the_brokers(start_broker: StartBroker) -> None:
    broker = await start_broker(MemStore(), policy=Policy(default_lease=123.0))
    cli = Cli("--broker", broker.url, "--topic", "jobs")
    await cli.json("enqueue", "1")
    job = await cli.json("claim", "w")
    assert job["lease_expires_at"] - job["claimed_at"] == pytest.approx(123.0)


async def test_work_without_lease_takes_the_brokers(start_broker: StartBroker) -> None:
    broker = await start_broker(MemStore(), policy=Policy(default_lease=7.0))
    cli = Cli("--broker", broker.url, "--topic", "jobs")
    job_id = (await cli.json("enqueue", "1"))["id"]
    # The command looks its own job up while it holds it.
    script = (
        "import os\n"
        "from simplequeue.client import SyncClient\n"
        f"with SyncClient({broker.url!r}, topic='jobs') as q:\n"
        "    job = q.job(os.environ['SIMPLEQUEUE_JOB_ID'])\n"
        "print(job.lease_expires_at - job.claimed_at)\n"
    )
    done = await cli("work", "--max-jobs", "1", "--", sys.executable, "-c", script, within=30)
    assert done.returncode == 0, done.stderr
    async with Client(broker.url, topic="jobs") as q:
        assert (await q.job(job_id)).result == pytest.approx(7.0)


# --- workflows: job --wait, work -Q ------------------------------------------------------


async def test_job_wait_prints_the_job_once_it_is_finished(broker: Any) -> None:
    async with (
        FaultProxy(broker.url).running() as proxy,
        Client(broker.url, topic="jobs") as q,
    ):
        cli = Cli("--broker", proxy.url, "--topic", "jobs")
        await q.enqueue("x", id="a")
        job = await q.claim("w")
        assert job is not None
        proxy.arrived.clear()
        waiting = asyncio.ensure_future(cli.json("job", "a", "--wait", "30"))
        await proxy.arrived.wait()  # the long poll is at the broker
        await q.ack(job, result={"n": 1})
        printed = await waiting
    assert (printed["status"], printed["result"]) == ("completed", {"n": 1})
    assert proxy.requests["/topics/jobs/jobs/a"] == 1


async def test_job_wait_prints_the_job_as_it_is_when_the_wait_is_over(cli: Cli) -> None:
    await cli.json("enqueue", '"x"', "--id", "a")
    started = time.monotonic()
    assert (await cli.json("job", "a", "--wait", "0.5"))["status"] == "pending"
    assert time.monotonic() - started >= 0.5
    assert failed_with(await cli("job", "ghost", "--wait", "0.2"), "JobNotFound")


async def until_enqueued(broker: Any, topic: str, n: int) -> dict[str, int]:
    async with asyncio.timeout(10), Client(broker.url, topic=topic) as q:
        while (counts := await q.status())["enqueued"] < n:
            await broker.committer.wait_changed(topic, 1.0)
    return counts


async def test_work_q_enqueues_each_stdout_line_into_the_output_topic_with_the_ack(
    cli: Cli, broker: Any
) -> None:
    await cli.json("enqueue", '{"words": "to be"}', "--id", "s1")
    await cli.json("enqueue", '{"words": "or not"}', "--id", "s2")
    script = (
        "import json, sys\n"
        "for word in json.load(sys.stdin)['words'].split():\n"
        "    print(json.dumps({'word': word}))\n"
        "    print()\n"  # blank lines are skipped
    )
    done = await cli(
        "work", "-Q", "words", "--max-jobs", "2", "--", sys.executable, "-c", script, within=30
    )
    assert done.returncode == 0, done.stderr
    assert "into words" in done.stderr and "2 acked, 0 nacked" in done.stderr
    assert (await until_enqueued(broker, "words", 4))["pending"] == 4
    words = Cli("--broker", broker.url, "--topic", "words")
    # The ack's follow-ups: ids derived from the source job's, one per line.
    assert (await words.json("job", "s1:0"))["payload"] == {"word": "to"}
    assert (await words.json("job", "s2:1"))["payload"] == {"word": "not"}
    source = await cli.json("job", "s1")
    assert (source["status"], source["result"]) == ("completed", None)


@pytest.mark.parametrize(
    ("output", "error"),
    [
        ("print('{\"ok\": 1}'); print('{oops')", "stdout line 2 is not JSON"),
        ("print('1\\n' * 1001, end='')", "more than 1000 lines"),
        ("sys.stdout.write('[' + ' ' * (2 << 20) + ']')", "more than 1000000 bytes"),
        ("print('{\"n\": ' + '9' * 30 + '}')", "stdout line 1 cannot be stored"),
    ],
    ids=["not-json", "too-many-lines", "too-many-bytes", "integer-past-64-bits"],
)
async def test_work_q_fails_a_job_whose_output_cannot_be_enqueued(
    cli: Cli, broker: Any, output: str, error: str
) -> None:
    await cli.json("enqueue", "1", "--id", "bad", "--max-attempts", "1")
    script = f"import sys\nsys.stdin.read()\n{output}\n"
    done = await cli(
        "work", "-Q", "out", "--max-jobs", "1", "--", sys.executable, "-c", script, within=30
    )
    assert done.returncode == 0, done.stderr
    assert "0 acked, 1 nacked" in done.stderr
    dead = await cli.json("job", "bad")
    assert dead["status"] == "dead" and error in dead["last_error"]
    async with Client(broker.url, topic="out") as out:
        assert (await out.status())["enqueued"] == 0  # the ack never happened: no outbox


async def test_work_q_with_a_bad_topic_name_is_a_usage_error(cli: Cli) -> None:
    done = await cli("work", "-Q", "no.dots", "--", "cat")
    assert done.returncode == 2 and "is not a topic name" in done.stderr


async def test_a_bad_topic_name_is_a_usage_error_as_for_work_q(broker: Any) -> None:
    """README: a flag's bad value is a usage error, exit status 2. `-Q a/b`
    was (checked before anything is sent), but `--topic a/b` failed with exit
    status 1, "InvalidRequest: ..." (review of the CLI, round 26)."""
    for topic in ("a/b", "no.dots", ""):
        done = await Cli("--broker", broker.url, "--topic", topic)("status")
        assert done.returncode == 2, (topic, done.returncode, done.stderr)
        assert "--topic" in done.stderr and "is not a topic name" in done.stderr, done.stderr


# --- work: commands that are shell scripts, and a terminal's Ctrl-C (review) ---


def file_text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


async def wait_for_file(path: Path, within: float = 10.0) -> str:
    """What a command wrote to `path`, once it did (another process's doing)."""
    await until(lambda: bool(file_text(path)), within)
    return file_text(path)


def pid_then_sleep(pid_file: Path, seconds: float, then: str = "") -> str:
    """A command, as Python: it reads its job, writes its pid to `pid_file`,
    sleeps `seconds`, then runs `then`."""
    return (
        "import os, sys, time\nsys.stdin.read()\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep({seconds})\n{then}"
    )


async def work_in_a_session(
    cli: Cli, *args: str, stderr: int = asyncio.subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    """`simplequeue work ARGS` in a session of its own, as a terminal's job."""
    return await asyncio.create_subprocess_exec(
        *cli.argv("work", *args),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
    )


@contextlib.asynccontextmanager
async def reaped(proc: asyncio.subprocess.Process) -> AsyncIterator[list[int]]:
    """`proc`, killed on leaving if it still runs, and the processes whose pids
    go into the list it gives (a command's children), killed too."""
    children: list[int] = []
    try:
        yield children
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in children:
            kill_pid(pid)


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


async def test_work_q_fails_the_job_when_a_shell_scripts_child_writes_too_much(
    cli: Cli, broker: Any
) -> None:
    """README: with -Q "more than 1 MiB of stdout fails the job". When the
    command was a shell script whose child wrote the output, only the shell
    was killed: the child kept the pipes open and blocked on stdout, and
    `work` hung with the job claimed (review finding). The command's whole
    process group is killed now."""
    job = await flooded(cli, "-Q", "out", "--", "sh", "-c", "cat >/dev/null; yes '[1]'", within=10)
    assert job["status"] == "dead" and "more than 1000000 bytes" in job["last_error"]


async def test_ctrl_c_in_a_terminal_drains_the_running_command(
    cli: Cli, broker: Any, tmp_path: Path
) -> None:
    """README: "Ctrl-C or SIGTERM drains running commands". A terminal's Ctrl-C
    goes to the whole foreground process group, and commands ran in the CLI's:
    they were interrupted too, and the "drained" job nacked, an attempt spent
    (review finding). Commands run in a session of their own now."""
    await cli.json("enqueue", '"slow"', "--id", "s", "--max-attempts", "1")
    started, release = tmp_path / "started", tmp_path / "release"
    script = (
        "import os, sys, time\nsys.stdin.read()\n"
        f"open({str(started)!r}, 'w').write('1')\n"
        f"while not os.path.exists({str(release)!r}): time.sleep(0.02)\n"
        "print('drained')\n"
    )
    proc = await asyncio.create_subprocess_exec(
        *cli.argv("work", "--", sys.executable, "-c", script),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own group, as a shell's foreground job
    )
    assert proc.stderr is not None
    try:
        await wait_for_file(started)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        async with asyncio.timeout(10):  # the signal landed: the worker drains
            while b"draining" not in await proc.stderr.readline():
                pass
        release.touch()
        async with asyncio.timeout(10):
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0
    job = await cli.json("job", "s")
    assert (job["status"], job.get("result"), job.get("last_error")) == (
        "completed",
        "drained",
        None,
    )


async def test_work_hung_up_drains_rather_than_leave_its_command_running_with_its_job_claimed(
    cli: Cli, broker: Any, tmp_path: Path
) -> None:
    """Commands run in a session of their own, so a terminal's signals reach
    `work` alone. SIGTERM and SIGINT drained; SIGHUP (the terminal closed, an
    ssh session dropped) killed `work` at once (status 129), its command
    running on, orphaned, and its job claimed: once the lease ran out it was
    run again while the orphan still ran it (review of the CLI, round 26).
    SIGHUP drains now, as SIGTERM does. A terminal that closes sends it twice
    (the kernel, and the shell to its jobs): the second was raised as a
    second SIGTERM and stopped the command now, its job given back (left
    alone in round 34). A second SIGHUP is no second signal."""
    await cli.json("enqueue", '"job"', "--id", "h")
    pid_file = tmp_path / "pid"
    script = pid_then_sleep(pid_file, 3, "print('ok')\n")
    proc = await work_in_a_session(cli, "--max-jobs", "1", "--", sys.executable, "-c", script)
    async with reaped(proc) as children:
        pid = int(await wait_for_file(pid_file))
        children.append(pid)
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.2)  # delivered apart (two pending at once are one)
        proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(20):
            code = await proc.wait()
        assert code == 0
        assert not alive(pid), "`work` is gone, its command runs on, orphaned"
    job = await cli.json("job", "h")
    assert (job["status"], job.get("result")) == ("completed", "ok"), job


@pytest.mark.parametrize("first", ["two SIGHUPs read at once", "Ctrl-C, then SIGHUP"])
async def test_a_hangup_is_never_a_second_signal(first: str) -> None:
    """A closing terminal's two SIGHUPs, often read from the loop's self-pipe
    together (a busy loop: 25 of 30 runs with them 0.3 ms apart), reached
    the handler registered when they were read, each raised as SIGTERM: the
    second stopped the commands now, their jobs nacked, the attempt spent;
    so did a SIGHUP after a Ctrl-C (review of this round's changes). A
    hangup drains as a first signal does, and is never a second one."""
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        async with Client("http://127.0.0.1:9", topic="t") as q:

            async def nothing(job: Job) -> None: ...

            worker = CommandWorker(q, nothing, handle_signals=False)
            with hangup_drains(worker):
                if first == "Ctrl-C, then SIGHUP":
                    worker._on_signal("SIGINT")
                else:
                    signal.raise_signal(signal.SIGHUP)
                signal.raise_signal(signal.SIGHUP)  # both bytes in the self-pipe
                for _ in range(10):
                    await asyncio.sleep(0.01)
            assert worker._signalled == 1 and worker._stopping.is_set()
    finally:
        signal.signal(signal.SIGHUP, before)


async def test_a_cancelled_jobs_command_is_stopped_with_its_children(
    cli: Cli, broker: Any, tmp_path: Path
) -> None:
    """A job cancelled (or whose lease is lost) while its command runs: only the
    command's pid was killed. A shell script's child ran on (the work of a
    cancelled job, or a second copy once the job is claimed again), and
    `await proc.wait()` (on Python 3.11, until the pipes close) held the slot
    and `work` itself until that child ended (review finding)."""
    job_id = (await cli.json("enqueue", "1", "--id", "c"))["id"]
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    command = ["sh", "-c", f'cat >/dev/null; "{sys.executable}" -c "{child}"; echo done']
    proc = await asyncio.create_subprocess_exec(
        *cli.argv("work", "--lease", "3", "--max-jobs", "1", "--", *command),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with reaped(proc) as children:
        pid = int(await wait_for_file(pid_file))
        children.append(pid)
        async with Client(broker.url, topic="jobs") as q:
            await q.cancel([job_id])
        # A heartbeat (every second with --lease 3) finds the job cancelled.
        async with asyncio.timeout(8):
            code = await proc.wait()
        assert code == 0
        await until(lambda: not alive(pid), 2)


async def test_work_with_a_lease_past_the_maximum_is_a_usage_error_not_a_traceback(
    cli: Cli,
) -> None:
    """`work --lease 50000` (over api.MAX_LEASE, 43,200 s) reached
    Worker.__init__, whose ValueError came out as a traceback (review
    finding): a usage error naming the option now, as `--lease 0.5` gets."""
    done = await cli("work", "--lease", "50000", "--", "cat", within=10)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2 and "--lease" in done.stderr, done.stderr


async def test_a_second_ctrl_c_stops_work_now_and_gives_the_job_back(
    cli: Cli, broker: Any, tmp_path: Path
) -> None:
    """A second Ctrl-C while `work` drained did nothing: a command that would not
    end kept it up, and a kill -9 of `work` left the command running (it has
    a session of its own) and the job to its lease (CLI review note). The
    second one stops it now: the command's group is killed and its job given
    back at once, pending, its last_error saying why."""
    await cli.json("enqueue", '"stuck"', "--id", "s")
    pid_file = tmp_path / "pid"
    script = pid_then_sleep(pid_file, 120)
    proc = await work_in_a_session(
        cli, "--", sys.executable, "-c", script, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    async with reaped(proc) as children:
        pid = int(await wait_for_file(pid_file))
        children.append(pid)
        os.killpg(proc.pid, signal.SIGINT)
        async with asyncio.timeout(10):
            while b"draining" not in await proc.stderr.readline():
                pass
        os.killpg(proc.pid, signal.SIGINT)
        async with asyncio.timeout(10):
            code = await proc.wait()
        assert code == 0
        await until(lambda: not alive(pid), 2)
        said = (await proc.stderr.read()).decode()
        assert "done: 0 acked, 0 nacked, 1 given back" in said, said
    job = await cli.json("job", "s")
    assert (job["status"], job["attempts"]) == ("pending", 1)
    assert "Interrupted: the worker was stopped" in job["last_error"]


async def test_work_timeout_kills_a_command_that_runs_too_long(cli: Cli, tmp_path: Path) -> None:
    """`work` had no bound on a command's time (CLI review note): one that hung
    held its slot, heartbeating its job, for ever. --timeout kills it (its
    whole group) and fails the job, saying so."""
    await cli.json("enqueue", "1", "--id", "slow", "--max-attempts", "1")
    pid_file = tmp_path / "pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    done = await cli(
        "work",
        "--max-jobs",
        "1",
        "--timeout",
        "0.5",
        "--",
        "sh",
        "-c",
        f'cat >/dev/null; "{sys.executable}" -c "{child}"',
        within=20,
    )
    assert done.returncode == 0, done.stderr
    job = await cli.json("job", "slow")
    assert job["status"] == "dead"
    assert "the command ran past --timeout 0.5 s" in job["last_error"], job
    pid = int(file_text(pid_file))
    try:
        await until(lambda: not alive(pid), 2)
    finally:
        kill_pid(pid)


# A process that leaves the command's process group and session (as a daemon,
# `setsid cmd &` or a double fork does) but keeps the pipes it inherited, stdout
# and stderr: it writes its pid to argv[1] and sleeps argv[2] seconds.
ESCAPES = (
    "import os, sys, time; os.setsid(); "
    "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(float(sys.argv[2]))"
)


@pytest.fixture
def escaped(tmp_path: Path) -> Iterator[Path]:
    """The pid file of an ESCAPES process, killed after the test."""
    pid_file = tmp_path / "escaped.pid"
    yield pid_file
    if file_text(pid_file):
        kill_pid(int(file_text(pid_file)))


async def test_work_timeout_fails_the_job_on_time_when_a_child_left_the_group(
    cli: Cli, escaped: Path
) -> None:
    """`work --timeout 1` kills the command's process group and fails the job.
    A child that left the group (setsid) still held the command's stdout and
    stderr, and `await proc.wait()` (on Python 3.11, until every pipe closes)
    waited for it: the job failed when that child ended (an hour for `setsid
    sleep 3600 &`), its lease heartbeated all along (review of the CLI, round
    26). The second Ctrl-C's "stop now", a cancelled job and --max-output
    waited the same way. The command's exit is waited for now, not its pipes."""
    await cli.json("enqueue", "1", "--id", "esc", "--max-attempts", "1")
    script = (
        f'cat >/dev/null; "{sys.executable}" -c "{ESCAPES}" {escaped} 40 &'
        f" until [ -s {escaped} ]; do sleep 0.05; done; sleep 60"
    )
    started = time.monotonic()
    done = await cli(
        "work", "--max-jobs", "1", "--timeout", "1", "--", "sh", "-c", script, within=90
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    job = await cli.json("job", "esc")
    assert job["status"] == "dead" and "past --timeout 1 s" in job["last_error"], job
    assert took < 20, f"the job failed {took:.0f} s after it started, not ~1 s (--timeout 1)"


async def test_a_command_past_max_output_is_stopped_at_once_when_a_child_left_the_group(
    escaped: Path,
) -> None:
    """Past --max-output the command's group was killed and its stdout read
    to its end, which a child that left the group (setsid) held open: the job
    failed when that child ended (review of the CLI, round 26)."""
    from simplequeue.client.cli import communicate_bounded

    script = (
        f'"{sys.executable}" -c "{ESCAPES}" {escaped} 40 &'
        f" until [ -s {escaped} ]; do sleep 0.05; done; yes"
    )
    async with asyncio.timeout(10):
        out, _, code = await communicate_bounded(("sh", "-c", script), b"", 1000, {**os.environ})
    assert out is None and code == -9
    assert alive(int(file_text(escaped)))  # out of reach of the kill, as it meant to be


# Exits at once, its payload unread, a child of its holding stdin; prints the child's pid.
HOLDS_STDIN = (
    "import subprocess, sys\n"
    "p = subprocess.Popen(['sleep', '60'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "print(p.pid)\n"
)


async def test_work_does_not_keep_the_pipe_and_payload_of_a_job_whose_stdin_is_held() -> None:
    """A command that exits 0 without reading its payload while a child of
    its still holds stdin: transport.close() closes stdin only once the
    payload is written, which nobody reads, so its pipe and payload stayed
    in `work` as long as the child lived, one per job (review: 10 jobs of
    1 MB, 10 descriptors and 10 MB)."""
    from simplequeue.client.cli import communicate_bounded

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    payload = b'"' + b"x" * (1024 * 1024) + b'"'
    children: list[int] = []
    before = descriptors()
    try:
        for _ in range(10):
            async with asyncio.timeout(20):
                out, _, code = await communicate_bounded(
                    (sys.executable, "-c", HOLDS_STDIN), payload, 1000, {**os.environ}
                )
            assert code == 0 and out is not None
            children.append(int(out))
        await asyncio.sleep(0.2)
        assert descriptors() <= before + 1, (before, descriptors())
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.2)  # the pipes' ends close: their transports finish


# A command's stdout within the default --max-output, and its ack over the
# broker's default --max-body (1 MiB) all the same: '"' and control characters
# grow as JSON text (2 and 6 bytes), the ack has fields of its own, and with -Q
# each line becomes a follow-up job (its topic named in each).
WITHIN_MAX_OUTPUT = {
    "quotes": ((), "sys.stdout.write('\"' * 600_000)"),
    "control characters": ((), "sys.stdout.write('\\x01' * 200_000)"),
    "1 MiB": ((), "sys.stdout.write('x' * (1 << 20))"),
    "-Q": (("-Q", "o" * 120), "print(*['\"' + 'x' * 988 + '\"'] * 1000, sep='\\n')"),
}


@pytest.mark.parametrize("options, writes", WITHIN_MAX_OUTPUT.values(), ids=WITHIN_MAX_OUTPUT)
async def test_work_stdout_within_max_output_is_acked_or_refused_by_that_bound(
    cli: Cli, options: tuple[str, ...], writes: str
) -> None:
    """`work --max-output` (default 1 MiB, "the broker's default --max-body,
    which an ack must fit") bounded stdout's raw bytes, but the ack carries it
    as JSON text: 600,000 bytes of '"' encode to 1.2 MB, over --max-body. The
    command succeeded within the bound, yet its job failed "the broker refused
    the ack: request body is larger than 1048576 bytes", and ran again on each
    attempt until dead (review, round 30). Either the ack fits, or the job
    fails saying which bound of `work` it is over."""
    script = f"import sys; sys.stdin.read(); {writes}"
    job = await flooded(cli, *options, "--", sys.executable, "-c", script)
    assert job["status"] == "completed" or "--max-output" in job["last_error"], job["last_error"]


async def test_work_bounds_the_stdout_it_reads_without_q(cli: Cli) -> None:
    """Without -Q, stdout was read whole whatever its size (CLI review note): a
    command writing without end filled the worker's memory. It is bounded by
    --max-output now, as with -Q, the command killed past it."""
    job = await flooded(cli, "--max-output", "100000", "--", "sh", "-c", "cat >/dev/null; yes 'x'")
    assert job["status"] == "dead"
    assert "more than 100000 bytes to stdout" in job["last_error"], job


# Grows its stdout pipe to 1 MiB (F_SETPIPE_SZ), fills 300 KB of it, then runs on:
# the worker's first read of it passes asyncio's reader its limit twice over.
FLOOD = (
    "import fcntl, sys, time\n"
    "fcntl.fcntl(1, 1031, 1 << 20)\n"
    "sys.stdout.buffer.write(b'x' * 300_000); sys.stdout.flush()\n"
    "time.sleep(60)\n"
)


async def test_a_command_past_max_output_is_stopped_whatever_its_reader_holds() -> None:
    """Past its bound, stdout was read no more. A reader holding more than
    twice its limit (128 KiB) had paused the pipe, whose end was then never
    read, and proc.wait() waited for it for ever: `work` hung with the job
    held (now and then under load, when the command wrote faster than the
    worker read: the timeouts of the two tests above)."""
    from simplequeue.client.cli import communicate_bounded

    async with asyncio.timeout(10):  # it is killed at once
        out, _, code = await communicate_bounded(
            (sys.executable, "-c", FLOOD), b"", 1000, {**os.environ}
        )
    assert out is None and code == -9


async def test_work_fails_a_job_whose_command_floods_stdout_rather_than_hang(cli: Cli) -> None:
    job = await flooded(cli, "--max-output", "1000", "--", sys.executable, "-c", FLOOD)
    assert job["status"] == "dead" and "more than 1000 bytes" in job["last_error"], job


async def test_work_keeps_the_end_of_stderr_only() -> None:
    """stderr was read whole whatever its size (CLI review note), though a
    failed job keeps only its end as the error."""
    from simplequeue.client.cli import STDERR_KEPT, communicate_bounded

    writes = "import sys; sys.stderr.write('x' * 5_000_000 + 'the end')"
    out, err, code = await communicate_bounded(
        (sys.executable, "-c", writes), b"", 1000, {**os.environ}
    )
    assert out == b"" and code == 0
    assert len(err) == STDERR_KEPT and err.endswith(b"xthe end")


async def test_enqueue_says_when_the_id_was_taken(cli: Cli) -> None:
    """The broker answers "duplicate": true for an id already taken, and the CLI
    printed only {"id": ...}, exit 0: the second payload was dropped unseen
    (review finding)."""
    assert await cli.json("enqueue", "1", "--id", "same") == {"id": "same"}
    assert await cli.json("enqueue", "2", "--id", "same") == {"id": "same", "duplicate": True}


async def test_a_command_given_neither_of_two_options_is_not_told_not_both(cli: Cli) -> None:
    """`schedule s 1` with neither --every nor --cron, and `enqueue` with neither
    PAYLOAD nor --file, were told "..., not both" (review finding)."""
    for args, said in ((("schedule", "s", "1"), "--every or --cron"), (("enqueue",), "--file")):
        done = await cli(*args)
        assert done.returncode == 2 and said in done.stderr, done.stderr
        assert "not both" not in done.stderr, done.stderr


async def test_enqueue_retried_after_it_landed_does_not_say_duplicate(broker: Any) -> None:
    """An enqueue whose first try landed but whose answer was lost (a proxy's
    502) is tried again under the same id; the broker answers it as a
    duplicate, and the CLI said "duplicate": true (the payload dropped) of the
    job this very command made (review of a6af88a)."""
    async with FaultProxy(broker.url).running() as proxy:
        proxy.fail("/enqueue", "landed-502")
        out = await Cli("--broker", proxy.url, "--topic", "w").json("enqueue", "1")
    assert "duplicate" not in out, out
    async with Client(broker.url, topic="w") as q:
        assert (await q.status())["pending"] == 1
        assert (await q.job(out["id"])).payload == 1


def test_the_lease_help_names_the_topics_lease_setting_first() -> None:
    """A claim naming no lease gets the topic's `lease` setting, and only
    without one the broker's --lease: `claim --help` and `work --help` said
    "[default: the broker's --lease]", wrong on a topic with `lease` set."""
    for command in ("claim", "work"):
        done = subprocess.run(
            [sys.executable, "-m", "simplequeue.client", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        lease_help = " ".join(done.stdout.split("--lease", 1)[1].split("\n  -", 1)[0].split())
        assert "the topic's lease setting, else the broker's --lease" in lease_help, lease_help
