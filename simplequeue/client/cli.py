"""simplequeue: the command line client (SPEC section 7).

Data is printed as JSON (one document per command); `status`, `topics` and
`schedules` print a table for people when asked (--table). Any failure exits 1
with one line on stderr, a usage error 2 with one line ("Error: ..."); `claim`
exits 1 with "no job is claimable" when the topic is empty. Ctrl-C exits 130,
and `enqueue --file` stopped by SIGINT or SIGTERM says how far it got, exit
status 130 or 143.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import math
import os
import select
import shutil
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import UTC, datetime
from typing import IO, Any, BinaryIO, Generic, NoReturn, TypeVar

import click
import msgspec
import orjson

from simplequeue import __version__, api
from simplequeue.batching import runs_within
from simplequeue.client.client import Client, new_job_spec, refused_whole
from simplequeue.client.followups import Done
from simplequeue.client.job import Job
from simplequeue.client.worker import Worker
from simplequeue.errors import (
    Forbidden,
    InvalidRequest,
    RouteNotFound,
    SimpleQueueError,
    Unauthorized,
)
from simplequeue.storeflags import (
    FiniteRange,
    OneLineGroup,
    StoreFlags,
    checked,
    env_variable,
    not_empty_in_env,
    store_options,
)

T = TypeVar("T")

# enqueue --file: jobs per request, and their lines' bytes at most (half the
# broker's default --max-body: a request also carries each job's id and options).
BATCH = 500
BATCH_BYTES = 512 * 1024
# enqueue --file from a pipe: a batch not yet full is sent once no line has
# come for this long (its producer may keep the pipe open between bursts), and
# the lines read ahead of what was sent are this many batches at most.
LINGER = 0.2
READ_AHEAD = 2
# enqueue --file of a regular file: its check, on the event loop's thread,
# lets a Ctrl-C in after this many lines or bytes (about 10 ms). In one go,
# the first Ctrl-C waited for the whole check: 10 s for 12 million lines.
CHECK_LINES = 10_000
CHECK_BYTES = 1024 * 1024
# What one job of `work` may pass on: the follow-ups of one ack with -Q (the
# API's cap), and stdout read (--max-output), so that a runaway command cannot
# exhaust the worker. Of stderr, the error of a failed job, the end is kept.
MAX_FOLLOW_UPS = api.MAX_BATCH
# Bytes of stdout, and of the result (or follow-ups) as the ack carries it,
# JSON: under the broker's default --max-body (1 MiB), with room for the ack's
# other fields (the job's id and lease token, 256 characters each at most).
MAX_OUTPUT = 1_000_000
STDERR_KEPT = 64 * 1024  # bytes


class Settings:
    """What the group's options say about reaching a broker."""

    def __init__(self, **options: Any) -> None:
        self.options = options

    async def client(self) -> Client:
        o = self.options
        common = {"topic": o["topic"], "token": o["token"]}
        if o["discover"]:
            store = o["store"].open()
            return await Client.discover(store, max_age=o["max_age"], close_store=True, **common)
        return Client(o["broker"], **common)


def run(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async command with a client; failures become one line and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        settings = click.get_current_context().find_object(Settings)
        assert settings is not None

        async def main() -> None:
            async with await settings.client() as client:
                await fn(client, *args, **kwargs)

        try:
            asyncio.run(main())
        except SimpleQueueError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None

    return wrapper


def emit(data: Any) -> None:
    output(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


class OutputFailed(click.ClickException):
    """What a command printed could not be written (a full disk, a closed pipe,
    no stdout at all)."""


def output(text: str) -> None:
    """Print `text` on stdout, or raise OutputFailed: one line on stderr and
    exit 1, not an OSError's traceback (nor exit 0 with stdout closed, where
    click.echo prints nothing and says nothing)."""
    try:
        stream = sys.stdout
        if stream is None:
            raise OSError(errno.EBADF, "stdout is closed")
        flush_all(stream)
        write_all(stream.buffer, f"{text}\n".encode(stream.encoding, stream.errors or "strict"))
    except OSError as exc:
        # What is still buffered would fail again as Python exits, with a
        # second message and exit status 120: it goes nowhere instead.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise OutputFailed(f"cannot write the output: {exc.strerror or exc}") from None


def write_all(out: BinaryIO, data: bytes) -> None:
    """Write all of `data`, or raise OSError. Unbuffered (PYTHONUNBUFFERED=1,
    `python -u`), stdout's binary layer is the file itself, whose write may
    take only part (64 KiB into a pipe whose reader left): the text layer
    drops the rest without an error. The write after a short one says why.
    A non-blocking stdout (O_NONBLOCK set by a parent sharing it), full for
    now, is waited for: the file's write returns None, a BufferedWriter's
    (the default) raises BlockingIOError, having taken characters_written."""
    view = memoryview(data)
    while view:
        try:
            written = out.write(view)
        except BlockingIOError as exc:
            view = view[exc.characters_written :]
            writable(out)
            continue
        if written is None:
            writable(out)
            continue
        view = view[written:]
    flush_all(out)


def flush_all(out: IO[Any]) -> None:
    """Flush `out`, waiting for a non-blocking stdout that is full for now
    (a BufferedWriter keeps what it could not write, and raises)."""
    while True:
        try:
            out.flush()
            return
        except BlockingIOError:
            writable(out)


def writable(out: IO[Any]) -> None:
    select.select([], [out.fileno()], [])


def job_json(job: Job) -> dict[str, Any]:
    """A job as JSON: the fields it has (a finished job's record has fewer)."""
    data: dict[str, Any] = msgspec.to_builtins(job)
    return data


# JSON as the user wrote it: msgspec keeps integers of any size (orjson would
# make a float of one past 64 bits: another value, silently); the broker then
# refuses what it cannot store, with a reason.
loads = msgspec.json.decode
NOT_JSON = (msgspec.DecodeError, msgspec.ValidationError)


def parse_payload(text: str) -> Any:
    """JSON if it parses as JSON, else the text itself as a string."""
    data = utf8(text, "PAYLOAD")
    try:
        return loads(data)
    except NOT_JSON:
        return text


def parse_json_option(text: str | None, name: str) -> Any:
    if text is None:
        return None
    try:
        return loads(utf8(text, name))
    except NOT_JSON as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=name) from None


def utf8(text: str, name: str) -> bytes:
    """An argument as UTF-8; a usage error for one that is not (Python keeps
    the bytes it could not decode as surrogates, which nothing can send)."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise click.BadParameter("not UTF-8 text", param_hint=name) from None


class InputFile(click.File):
    """click.File, with "-" a usage error when stdin is closed (`<&-`, some
    services: sys.stdin is None), where click raises a RuntimeError."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "-" and sys.stdin is None:
            self.fail("stdin is closed: there are no lines to read", param, ctx)
        return super().convert(value, param, ctx)


@click.group(cls=OneLineGroup, context_settings={"auto_envvar_prefix": "SIMPLEQUEUE"})
@click.version_option(__version__, prog_name="simplequeue", message="%(prog)s %(version)s")
@click.option(
    "--broker",
    default="http://127.0.0.1:8080",
    show_default=True,
    callback=checked(api.check_broker_url),
    help="Broker URL (env SIMPLEQUEUE_BROKER); not with --discover.",
)
@click.option(
    "--discover",
    is_flag=True,
    help="Find the broker through broker.json in the store the flags below name,"
    " instead of at --broker (those flags and --max-age are a usage error without it).",
)
@store_options(backends=("localfs", "s3"))
@click.option(
    "--max-age",
    type=FiniteRange(min=0),
    default=30.0,
    show_default=True,
    help="With --discover: refuse a broker.json heartbeat older than this, or this far"
    " in the future (s). A broker renews it every third of its --broker-lease (5 s by"
    " default): keep this above that.",
)
@click.option(
    "--topic",
    default="default",
    show_default=True,
    callback=lambda ctx, param, value: check_topic(not_empty_in_env(ctx, param, value), param),
    help="env SIMPLEQUEUE_TOPIC",
)
@click.option(
    "--token",
    default=None,
    callback=checked(api.check_token, empty_is_none=True),  # as Client(token="") does
    help="Bearer token (env SIMPLEQUEUE_TOKEN).",
)
@click.pass_context
def main(ctx: click.Context, /, **options: Any) -> None:
    """Talk to a simplequeue broker."""
    store = StoreFlags.take(options)
    options["discover"] = discovering(ctx, options["discover"])
    ctx.obj = Settings(store=store, **options)


# The flags that only say something with --discover: where the store is, and
# how old its broker.json may be.
DISCOVER_FLAGS = ("backend", "dir", "bucket", "prefix", "endpoint_url", "region", "max_age")

# How strongly a flag was given: on the command line over the environment
# (which may be set for the whole shell, or for simplequeued: it reads the
# same SIMPLEQUEUE_DIR, SIMPLEQUEUE_BACKEND...) over its default.
WEIGHT = {click.core.ParameterSource.COMMANDLINE: 2, click.core.ParameterSource.ENVIRONMENT: 1}


def discovering(ctx: click.Context, discover: bool) -> bool:
    """Whether the broker is found through broker.json (--discover) rather
    than at --broker: SPEC 7's alternatives. Both given as strongly, on the
    command line or both in the environment, is a usage error, where one of
    them was dropped unsaid; otherwise the one given more strongly wins (a
    --broker on the command line over SIMPLEQUEUE_DISCOVER). A store flag on
    the command line without --discover is a usage error too, where it was
    ignored and the command went to --broker's default; in the environment
    it is left alone, as SIMPLEQUEUE_TOKEN is."""

    def weight(name: str) -> int:
        source = ctx.get_parameter_source(name)
        return 0 if source is None else WEIGHT.get(source, 0)

    def said(name: str) -> str:
        if ctx.get_parameter_source(name) is click.core.ParameterSource.ENVIRONMENT:
            return env_variable(ctx, name)
        return "--" + name.replace("_", "-")

    broker, wanted = weight("broker"), weight("discover") if discover else 0
    if broker and broker == wanted:
        raise click.UsageError(f"{said('broker')} and {said('discover')}: give one or the other")
    if wanted > broker:
        return True
    given = [said(name) for name in DISCOVER_FLAGS if weight(name) == 2]
    if given:
        raise click.UsageError(f"{', '.join(given)}: with --discover only")
    return False


class When(click.ParamType[float]):
    """A time: Unix seconds, or ISO 8601 (without an offset: local time)."""

    name = "time"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            # ISO first: 20261224 is a date (its basic form), not 20,261,224 s.
            # RFC 3339 allows a lowercase "z" for UTC, which fromisoformat refuses.
            when = datetime.fromisoformat(value[:-1] + "Z" if value.endswith("z") else value)
        except ValueError:
            try:
                seconds = float(value)
            except ValueError:
                self.fail(
                    f"{value!r} is neither Unix seconds nor an ISO 8601 time "
                    "(2026-12-24T08:00:00Z)",
                    param,
                    ctx,
                )
        else:
            try:
                seconds = when.timestamp()
            except (ValueError, OverflowError, OSError):  # year 1 or 9999 in some zones
                self.fail(f"{value!r} is not a time after 1970", param, ctx)
        if not (math.isfinite(seconds) and seconds >= 0):
            self.fail(f"{value!r} is not a time after 1970", param, ctx)
        return seconds


@main.command()
@click.argument("payload", required=False)
@click.option("--id", "job_id", default=None, help="Job id (duplicates are not enqueued).")
@click.option("--priority", type=int, default=0)
@click.option("--delay", type=FiniteRange(min=0), default=0.0, help="Seconds from now.")
@click.option(
    "--at",
    "run_at",
    type=When(),
    default=None,
    help="Not claimable before this time (on the broker's clock): Unix seconds, or ISO 8601"
    " (2026-12-24T08:00:00Z; without an offset, local time). Not with --delay.",
)
@click.option("--max-attempts", type=click.IntRange(min=0), default=None)
@click.option(
    "--file",
    "jobs_file",
    type=InputFile("rb"),  # bytes: a line that is not UTF-8 is refused as not JSON
    default=None,
    help="JSON lines, one payload per line ('-' for stdin), sent in batches of up to 500"
    " (or 512 KB). A file, stdin redirected from one too, is checked whole before any is"
    " sent. Input that cannot be read twice (a pipe, <(cmd), a FIFO) is sent as its lines"
    " arrive: a batch once full, or once no line has come for 0.2 s; a bad line stops the"
    " command there, the batches before it enqueued. SIGINT or SIGTERM (the way to end"
    " `tail -f log | simplequeue enqueue --file -`) stops the reading: the lines read are"
    " sent, the command says how many jobs were enqueued, through which line, and exits"
    " 130 or 143; a second signal stops it at once.",
)
@run
async def enqueue(
    client: Client,
    payload: str | None,
    job_id: str | None,
    priority: int,
    delay: float,
    run_at: float | None,
    max_attempts: int | None,
    jobs_file: BinaryIO | None,
) -> None:
    """Enqueue PAYLOAD (JSON, or else a string), or every line of --file."""
    if run_at is not None and delay:
        raise click.UsageError("--delay and --at: give one or the other")
    if (payload is None) == (jobs_file is None):
        raise click.UsageError(
            "give a PAYLOAD or --file" if payload is None else "give a PAYLOAD or --file, not both"
        )
    if jobs_file is not None and job_id is not None:
        raise click.UsageError("--id names one job: it cannot go with --file")
    if jobs_file is None:
        assert payload is not None
        spec = new_job_spec(parse_payload(payload), job_id, priority, delay, max_attempts, run_at)
        path = f"/topics/{client.topic}/enqueue"
        _, answer, repeated = await client.call("POST", path, api.Enqueued, spec)
        assert answer is not None  # no status was expected: a 2xx, or raised
        # "duplicate": true when the id was taken already and nothing was
        # enqueued; not after a retry, whose first try may have made the job.
        dropped = answer.duplicate and not repeated
        emit(msgspec.structs.asdict(answer) if dropped else {"id": answer.id})
        return
    emit({"enqueued": await enqueue_file(client, jobs_file, priority, delay, max_attempts, run_at)})


# A line of --file: its number, its bytes, its payload.
Line = tuple[int, int, Any]


class BadLine(Exception):
    """A line of --file that is not JSON the store can hold."""


def lines_of(lines: BinaryIO) -> Iterator[Line]:
    """Each non-empty line; BadLine at one that is not JSON (or not UTF-8), or
    JSON the store cannot hold (an integer past 64 bits, nesting past 200)."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            yield job_of(number, line)


def job_of(number: int, line: bytes) -> Line:
    """Non-empty line `number`'s job; BadLine as for lines_of."""
    try:
        payload = loads(line)
        api.check_storable(payload, f"line {number}")
    except NOT_JSON as exc:
        raise BadLine(f"line {number}: not valid JSON: {exc}") from None
    except InvalidRequest as exc:
        raise BadLine(str(exc)) from None
    return number, len(line), payload


async def checked_count(lines: BinaryIO) -> int:
    """How many jobs `lines` holds, each line checked (BadLine). Every
    CHECK_LINES lines, blank ones too, or CHECK_BYTES bytes of jobs it awaits,
    where the cancel of asyncio.run()'s Ctrl-C lands (a thread's check would
    be waited for as asyncio.run() ends)."""
    count, read, due = 0, 0, CHECK_LINES
    for number, line in enumerate(lines, 1):
        if line.strip():
            job_of(number, line)
            count += 1
            read += len(line)
            if read >= CHECK_BYTES:
                due = number
        # Blank lines count (a file of them alone ran 1.7 s with no await), at
        # one comparison each.
        if number >= due:
            due, read = number + CHECK_LINES, 0
            await asyncio.sleep(0)
    return count


async def enqueue_file(
    client: Client,
    lines: BinaryIO,
    priority: int,
    delay: float,
    max_attempts: int | None,
    run_at: float | None = None,
) -> int:
    """Enqueue each line's payload, in batches; how many were. A regular file
    is read twice: every line is checked before the first batch is sent (a bad
    line enqueues nothing), and none is held in memory. A pipe (any input
    that cannot be read twice) is read once, on a thread (piped_runs), each
    batch sent once it is full or no line has come for LINGER: its producer
    may keep it open, and a bad line stops the command there, the batches
    before it enqueued. SIGINT or SIGTERM stops it too (Stop), saying as a
    bad line does how far it got; during a regular file's check, before
    anything was sent, they end it as they do any command."""
    total = None
    if lines.seekable():
        start = lines.tell()
        try:
            total = await checked_count(lines)
        except BadLine as exc:
            raise click.ClickException(str(exc)) from None
        lines.seek(start)
    extra: dict[str, Any] = {"priority": priority, "delay": delay}
    if run_at is not None:
        extra["run_at"] = run_at
    if max_attempts is not None:
        extra["max_attempts"] = max_attempts
    enqueued, through = 0, 0
    cut_short: list[Line] = []  # the lines of the request a second signal stopped
    stop = Stop()
    runs: AsyncIterator[list[Line]]
    if total is None:
        # Moved on as runs are read (an input read on a thread of its own).
        nothing: Iterator[Line] = iter(())
        read = click.progressbar(nothing, label="enqueue", file=sys.stderr, show_pos=True)
        runs = piped_runs(lines, read.update, stop)
    else:
        read = click.progressbar(
            lines_of(lines), length=total, label="enqueue", file=sys.stderr, update_min_steps=BATCH
        )
        runs = _as_async(runs_within(read, _bytes_of, BATCH_BYTES, BATCH), stop)

    def said(why: str) -> str:
        of = "" if total is None else f" of {total}"
        done = f"through line {through}" if enqueued else "none"
        return f"{why} ({enqueued}{of} jobs were enqueued: {done})"

    try:
        with read, stopped_by_signals(stop):
            async for batch in runs:
                ids: list[str] = []
                try:
                    await enqueue_in_halves(
                        client, [{"payload": p, **extra} for *_, p in batch], ids
                    )
                finally:  # the jobs of a batch cut short by an error count too
                    if ids:
                        enqueued += len(ids)
                        through = batch[len(ids) - 1][0]
                    cut_short = batch[len(ids) :]
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not stop.now or task is None or task.uncancel():
            raise
        assert stop.by is not None
        why = f"stopped by a second {stop.by.name}"
        if cut_short:
            first, last = cut_short[0][0], cut_short[-1][0]
            why += f" as lines {first}-{last} were being sent: they may have been enqueued too"
        stopped(said(why), stop.by)
    except (BadLine, SimpleQueueError) as exc:
        why = str(exc) if isinstance(exc, BadLine) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, SimpleQueueError) and cut_short and not refused(exc):
            # Its outcome is unknown: a 502 after the broker took it, a
            # timeout. Said "none", the lines were sent again, and doubled.
            first, last = cut_short[0][0], cut_short[-1][0]
            why += f"; lines {first}-{last} were being sent: they may have been enqueued too"
        raise click.ClickException(said(why)) from None
    if stop.by is not None:
        stopped(said(f"stopped by {stop.by.name}"), stop.by)
    return enqueued


class Stop:
    """What SIGINT or SIGTERM asked of `enqueue --file` (`tail -f log |
    simplequeue enqueue --file -` ends only so): the first, to read no more
    and send what was read (`wake` tells the reader); a second, to stop now,
    the request being sent cut short (its task cancelled). Once `over`, a
    signal does nothing."""

    def __init__(self) -> None:
        self.by: signal.Signals | None = None
        self.now = False
        self.over = False
        self.wake: Callable[[], None] = lambda: None
        self._task = asyncio.current_task()

    def __call__(self, sig: signal.Signals) -> None:
        if self.over:
            return
        if self.by is None:
            self.by = sig
            self.wake()
            click.echo(
                f"{sig.name}: reading no more, sending the lines read (a second stops now)",
                err=True,
            )
        elif not self.now and self._task is not None:
            self.now = True
            self._task.cancel()


def stopped(message: str, sig: signal.Signals) -> NoReturn:
    """End a command a signal stopped, with one line saying how far it got and
    exit status 128 plus the signal's number (130 for SIGINT, 143 for
    SIGTERM), as a shell reports a command the signal killed."""
    click.echo(f"Error: {message}", err=True)
    raise click.exceptions.Exit(128 + sig)


@contextlib.contextmanager
def stopped_by_signals(stop: Stop) -> Iterator[None]:
    """SIGINT and SIGTERM call `stop` while this runs, rather than end the
    command at once, saying nothing of what was done; a signal ignored already
    (SIGINT of a command a script started with `&`) stays ignored. The
    handlers found are put back after (asyncio.run()'s own for SIGINT).

    loop.add_signal_handler hears of a signal through a byte written into the
    loop's self-pipe, lost if that pipe is full. A Python handler calling
    call_soon_threadsafe would not lose it, but runs on the main thread only:
    delivered to the reader's, the signal would wait, unheard, for the loop
    to wake for something else. The pipe is kept from filling instead: the
    reader hands its lines over in bursts, one byte a burst (Handover)."""
    loop = asyncio.get_running_loop()
    found = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    taken = [sig for sig, handler in found.items() if handler is not signal.SIG_IGN]
    for sig in taken:
        loop.add_signal_handler(sig, stop, sig)
    try:
        yield
    finally:
        # A signal's handler the loop queued before it was removed may run
        # after: the task is past the awaits a cancel was for, and would be
        # cancelled in what follows (client.close()), not stopped.
        stop.over = True
        for sig in taken:
            loop.remove_signal_handler(sig)
            if found[sig] is not None:  # None: not set from Python, nothing to put back
                signal.signal(sig, found[sig])


def _bytes_of(line: Line) -> int:
    return line[1]


async def _as_async(items: Iterator[T], stop: Stop) -> AsyncIterator[T]:
    for item in items:
        if stop.by is not None:
            return
        yield item


class Handover(Generic[T]):
    """Items a thread hands to the event loop, the loop woken once for every
    item handed while it took none. Waking it (call_soon_threadsafe) writes a
    byte into its self-pipe, where the C handler of loop.add_signal_handler
    writes the byte that tells it of a signal: a byte a line, while the loop
    was busy sending a batch, filled that pipe (an AF_UNIX socket pair takes
    some 278 one-byte writes), the signal's byte was dropped ("Exception
    ignored when trying to write to the signal wakeup fd") and `yes |
    simplequeue enqueue --file -` ran on through SIGTERM. One byte waiting
    at most, the pipe cannot fill."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[T] = []
        self._ready = asyncio.Event()  # set once items wait

    def hand(self, item: T) -> None:
        """On the thread: RuntimeError once the loop is closed."""
        with self._lock:
            self._items.append(item)
            first = len(self._items) == 1
        if first:  # else the loop was woken already, and takes this one too
            self._loop.call_soon_threadsafe(self._ready.set)

    def put(self, item: T) -> None:
        """hand(), on the loop's own thread."""
        with self._lock:
            self._items.append(item)
        self._ready.set()

    async def take(self) -> list[T]:
        """Every item handed, in order, once there is one."""
        while True:
            await self._ready.wait()
            with self._lock:
                items, self._items = self._items, []
                self._ready.clear()
            if items:  # none: a wake for the items put() took with it
                return items


async def piped_runs(
    lines: BinaryIO, read: Callable[[int], None], stop: Stop
) -> AsyncIterator[list[Line]]:
    """The lines of `lines` (input that cannot be read twice) in runs of
    BATCH lines and BATCH_BYTES at most, a run cut short once no line has come
    for LINGER; `read` is told how many lines each run holds. The input is
    read, and its lines checked, on a thread of its own (a daemon: the command
    may end while it waits for a line), READ_AHEAD runs ahead at most, handed
    over in bursts (Handover). Once `stop` is called, the lines read until
    then are the last."""
    handed: Handover[Line | BaseException | None] = Handover(asyncio.get_running_loop())
    room = threading.Semaphore(READ_AHEAD * BATCH)
    # After the lines the thread handed over: they end there, as at the input's end.
    stop.wake = functools.partial(handed.put, None)

    def reading() -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the command ended
            try:
                # A file object of its own, on a duplicate of the input's
                # descriptor: blocked in a read as the command ends, this
                # thread holds the lock of the object it reads, and the
                # interpreter's shutdown, which closes sys.stdin, aborted
                # (SIGABRT) when that was sys.stdin's own buffer.
                with open(os.dup(lines.fileno()), "rb") as own:
                    for line in lines_of(own):
                        room.acquire()
                        handed.hand(line)
            except Exception as exc:  # BadLine, or the input failed (OSError)
                handed.hand(exc)
            else:
                handed.hand(None)

    threading.Thread(target=reading, name="enqueue --file", daemon=True).start()
    arrived: collections.deque[Line | BaseException | None] = collections.deque()
    ended = False
    while not ended:
        got: list[Line] = []
        while len(got) < BATCH:
            if not arrived:
                try:
                    async with asyncio.timeout(LINGER if got else None):
                        arrived.extend(await handed.take())
                except TimeoutError:  # a quiet pipe: what came is sent
                    break
            line = arrived.popleft()
            if isinstance(line, BaseException):
                raise line
            if line is None:
                ended = True
                break
            room.release()
            got.append(line)
        for run in runs_within(got, _bytes_of, BATCH_BYTES, BATCH):
            read(len(run))
            yield run


def refused(exc: Exception) -> bool:
    """Whether a failed enqueue request was refused, nothing of it done, by
    an answer every try of it got (a job bad or too large, a token or a URL
    wrong); else it may have landed (a 502 or a timeout after the broker took
    it, on the last try or an earlier one)."""
    return refused_whole(exc) or isinstance(exc, Unauthorized | Forbidden | RouteNotFound)


async def enqueue_in_halves(client: Client, jobs: list[dict[str, Any]], ids: list[str]) -> None:
    """Enqueue `jobs` in one request, or in halves while it is refused whole
    (refused_whole: too large for the broker's --max-body, or a proxy's,
    either may be smaller than a batch; or one job bad), down to the job at
    fault, whose refusal is raised; their ids go into `ids`, in order, as
    they are enqueued."""
    try:
        ids += await client.enqueue_many(jobs)
        return
    except Exception as exc:
        if len(jobs) == 1 or not refused_whole(exc):
            raise
    half = len(jobs) // 2
    await enqueue_in_halves(client, jobs[:half], ids)
    await enqueue_in_halves(client, jobs[half:], ids)


@main.command()
@click.argument("worker_id")
@click.option("--wait", type=FiniteRange(0, 60), default=0.0, help="Long-poll seconds.")
@click.option(
    "--lease",
    type=FiniteRange(min=0.001),
    default=None,
    help="Lease seconds [default: the topic's lease setting, else the broker's --lease].",
)
@run
async def claim(client: Client, worker_id: str, wait: float, lease: float | None) -> None:
    """Claim the next job and print it (with its lease_token); none claimable
    (within --wait) exits 1 with "no job is claimable", so that a script's
    `while simplequeue claim w > job.json` ends when the topic is empty."""
    job = await client.claim(worker_id, lease=lease, wait=wait)
    if job is None:
        raise click.ClickException("no job is claimable")
    try:
        emit(job_json(job))
    except OutputFailed as exc:
        # Nobody saw its lease token: it could not be settled, only wait out
        # its lease. Given back now, its attempt uncounted.
        try:
            await client.release([job])
        except SimpleQueueError as why:
            raise OutputFailed(
                f"{exc.message}; job {job.id} not given back ({type(why).__name__}: {why}):"
                " claimable again when its lease runs out"
            ) from None
        raise


@main.command()
@click.argument("job_id")
@click.option("--lease-token", default=None)
@click.option("--result", default=None, help="JSON result to keep with the job.")
@run
async def ack(client: Client, job_id: str, lease_token: str | None, result: str | None) -> None:
    """Complete JOB_ID ("-": the job `claim` printed, read from stdin)."""
    value = parse_json_option(result, "--result")
    job = held_job(job_id, lease_token)
    await client.ack(job, value)
    emit({"id": job.id, "status": "completed"})


@main.command()
@click.argument("job_id")
@click.option("--lease-token", default=None)
@click.option("--delay", type=FiniteRange(min=0), default=0.0)
@click.option("--error", default=None)
@run
async def nack(
    client: Client, job_id: str, lease_token: str | None, delay: float, error: str | None
) -> None:
    """Give JOB_ID back (pending after --delay, delayed until then, or dead when
    its attempts are spent). "-": the job `claim` printed, read from stdin."""
    job = held_job(job_id, lease_token)
    status = await client.nack(job, delay, error)
    emit({"id": job.id, "status": status})


@main.command()
@click.argument("job_id")
@click.option("--lease-token", default=None)
@click.option("--lease", type=FiniteRange(min=0.001), default=None)
@run
async def heartbeat(
    client: Client, job_id: str, lease_token: str | None, lease: float | None
) -> None:
    """Extend JOB_ID's lease ("-": the job `claim` printed, read from stdin)."""
    job = held_job(job_id, lease_token)
    expires = await client.heartbeat(job, lease)
    emit({"id": job.id, "lease_expires_at": expires})


def held_job(job_id: str, lease_token: str | None) -> Job:
    """The job a settle command names: JOB_ID with --lease-token, or with "-" the
    JSON `simplequeue claim` printed, on stdin (its id and lease_token)."""
    if job_id != "-":
        return Job(job_id, lease_token=lease_token)
    if sys.stdin is None:  # closed (`<&-`, some services)
        raise click.BadParameter("stdin is closed: there is no job to read", param_hint="JOB_ID")
    try:
        claimed = msgspec.json.decode(sys.stdin.buffer.read(), type=Job)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise click.BadParameter(
            f"stdin is not a job as `simplequeue claim` prints it: {exc}", param_hint="JOB_ID"
        ) from None
    return Job(claimed.id, lease_token=lease_token or claimed.lease_token)


COUNT_COLUMNS = [
    "pending",
    "delayed",
    "claimed",
    "completed",
    "dead",
    "cancelled",
    "enqueued",
    "total",
]


# status, topics and schedules: JSON unless a table is asked for (SPEC 7), so
# that a script piping them gets data. --json stays, as the default, for the
# scripts written when a table was.
json_or_table = click.option(
    "--json/--table",
    "as_json",
    default=True,
    help="Print JSON (the default) or a table for people.",
)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )


@main.command()
@json_or_table
@run
async def status(client: Client, as_json: bool) -> None:
    """Counts of the topic's jobs."""
    counts = await client.status()
    if as_json:
        emit(counts)
    else:
        output(
            table(
                [
                    ["topic", *COUNT_COLUMNS],
                    [client.topic, *(str(counts[c]) for c in COUNT_COLUMNS)],
                ]
            )
        )


@main.command()
@json_or_table
@run
async def topics(client: Client, as_json: bool) -> None:
    """Every topic in the store with its counts. A topic that cannot be read
    is said on stderr (the exit status is then 1), not left out."""
    answer = await client.request("GET", "/topics", api.Topics)
    found = {name: msgspec.structs.asdict(c) for name, c in answer.topics.items()}
    if as_json:
        emit(found)
    else:
        rows = [["topic", *COUNT_COLUMNS]]
        rows += [[name, *(str(c[k]) for k in COUNT_COLUMNS)] for name, c in sorted(found.items())]
        output(table(rows))
    for name, why in sorted(answer.errors.items()):
        click.echo(f"Error: topic {name} cannot be read: {why}", err=True)
    if answer.errors:
        raise click.exceptions.Exit(1)


@main.command()
@click.argument("job_id")
@click.option(
    "--wait",
    type=FiniteRange(min=0),
    default=0.0,
    metavar="S",
    help="Wait up to S seconds for the job to finish (completed, dead or cancelled).",
)
@run
async def job(client: Client, job_id: str, wait: float) -> None:
    """A job, or its retained record, as the broker sent it. With --wait, once
    it is finished, or as it is after S seconds (a job that does not exist yet
    is waited for too)."""
    emit(await client.job_dict(job_id, wait))


@main.command()
@click.option(
    "--offset", type=click.IntRange(min=0), default=0, metavar="K", help="Skip the K oldest."
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, metavar="N", help="At most N jobs."
)
@run
async def dead(client: Client, offset: int, limit: int | None) -> None:
    """The topic's dead jobs, oldest first: every one, or a page of them."""
    emit([job_json(j) for j in await client.dead(offset, limit)])


@main.command()
@click.argument("job_ids", nargs=-1)
@run
async def requeue(client: Client, job_ids: tuple[str, ...]) -> None:
    """Dead jobs (all, or JOB_IDS) back to pending."""
    emit({"requeued": await client.requeue(list(job_ids) or None)})


@main.command()
@click.argument("job_ids", nargs=-1)
@run
async def purge(client: Client, job_ids: tuple[str, ...]) -> None:
    """Forget dead jobs (all, or JOB_IDS)."""
    emit({"purged": await client.purge(list(job_ids) or None)})


@main.command()
@click.argument("job_ids", nargs=-1, required=True)
@run
async def cancel(client: Client, job_ids: tuple[str, ...]) -> None:
    """Cancel JOB_IDS: pending and delayed jobs at once, claimed ones too (their
    workers are told at their next heartbeat). Prints what was cancelled and
    what was not found (finished, or unknown)."""
    emit(await client.cancel(list(job_ids)))


@main.command()
@click.argument("name")
@click.argument("payload")
@click.option("--every", type=click.IntRange(min=1), default=None, help="Seconds between slots.")
@click.option("--cron", default=None, help='Five-field cron expression, e.g. "*/5 * * * *".')
@click.option("--tz", default=None, help="Time zone of --cron [default: UTC].")
@click.option("--priority", type=int, default=0)
@click.option("--max-attempts", type=click.IntRange(min=0), default=None)
@run
async def schedule(
    client: Client,
    name: str,
    payload: str,
    every: int | None,
    cron: str | None,
    tz: str | None,
    priority: int,
    max_attempts: int | None,
) -> None:
    """Create or replace schedule NAME: enqueue PAYLOAD (JSON, or else a string)
    --every S seconds or at each --cron time; each slot's job is NAME@SLOT."""
    if (every is None) == (cron is None):
        raise click.UsageError(
            "give --every or --cron" if every is None else "give --every or --cron, not both"
        )
    made = await client.schedule(
        name, parse_payload(payload), every, cron, tz, priority, max_attempts
    )
    emit(msgspec.to_builtins(made))


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@main.command()
@json_or_table
@run
async def schedules(client: Client, as_json: bool) -> None:
    """The topic's schedules, with their next slot and the last job each fired."""
    found = await client.schedules()
    if as_json:
        emit([msgspec.to_builtins(s) for s in found])
        return
    rows = [["name", "when", "next", "last fired", "last job"]]
    for s in found:
        when = f"every {s.every} s" if s.every is not None else f"{s.cron} ({s.tz or 'UTC'})"
        rows.append([s.name, when, _when(s.next_at), _when(s.last_fired_at), s.last_job_id or "-"])
    output(table(rows))


@main.command()
@click.argument("name")
@run
async def unschedule(client: Client, name: str) -> None:
    """Delete schedule NAME: it fires no more."""
    await client.unschedule(name)
    emit({"deleted": name})


class OrNone(click.ParamType[Any]):
    """A number, or "none" to remove the setting."""

    name = "number|none"

    def __init__(self, kind: type[int] | type[float]) -> None:
        self.kind = kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or value == "none":
            return value
        try:
            number = self.kind(value)
        except ValueError:
            what = "a whole number" if self.kind is int else "a number"
            self.fail(f"{value!r} is not {what} or 'none'", param, ctx)
        if not math.isfinite(number):  # sent, it is JSON null: "remove the setting"
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


@main.command()
@click.option("--rate", type=OrNone(float), help="Claims per second, across every worker.")
@click.option("--burst", type=OrNone(int), help="Claims the rate's bucket holds.")
@click.option("--max-claimed", type=OrNone(int), help="Jobs claimed at once (0: paused).")
@click.option("--lease", type=OrNone(float), help="Default lease of a claim, seconds.")
@click.option("--max-attempts", type=OrNone(int), help="Default attempts of a job.")
@run
async def settings(client: Client, **limits: Any) -> None:
    """Show the topic's settings, or change those given ("none" removes one:
    the broker's default applies again, or no limit)."""
    changes = {k: None if v == "none" else v for k, v in limits.items() if v is not None}
    emit(await client.settings(**changes))


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--worker-id", default=None)
@click.option(
    "--lease",
    type=FiniteRange(min=1, max=api.MAX_LEASE),
    default=None,
    help="Lease seconds for each job [default: the topic's lease setting, else the"
    " broker's --lease].",
)
@click.option(
    "--max-jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many jobs, whatever their outcome (for scripts and tests).",
)
@click.option(
    "-Q",
    "--output-topic",
    default=None,
    metavar="OUT",
    callback=lambda ctx, param, value: check_topic(value, param),
    help="Each non-empty stdout line is a JSON payload enqueued into topic OUT with the ack.",
)
@click.option(
    "--timeout",
    "command_timeout",
    type=FiniteRange(min=0, min_open=True),
    default=None,
    help="Seconds a command may run; past them it is killed and its job failed [default: none].",
)
@click.option(
    "--max-output",
    type=click.IntRange(min=1),
    default=MAX_OUTPUT,
    show_default=True,
    help="Bytes of stdout a command may write (past them it is killed), and of its result as"
    " the ack carries it, JSON (with -Q, of the jobs to enqueue): over either, its job fails,"
    " to be retried as any failed job. The default leaves the ack's other fields room under"
    " the broker's default --max-body (1 MiB).",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@run
async def work(
    client: Client,
    concurrency: int,
    worker_id: str | None,
    lease: float | None,
    max_jobs: int | None,
    output_topic: str | None,
    command_timeout: float | None,
    max_output: int,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND once per job: the payload as JSON on stdin, the job's id and
    attempt in SIMPLEQUEUE_JOB_ID and SIMPLEQUEUE_ATTEMPT; exit 0 acks with
    stdout as the result (JSON if it parses, else text); non-zero nacks with
    the end of stderr as the error. A command past --timeout, or writing more
    than --max-output bytes to stdout, fails its job; so does a result over
    --max-output bytes as the ack carries it (JSON). Ctrl-C, SIGTERM or
    SIGHUP (the terminal closed) drains running commands (each runs in a
    session of its own: a terminal's signals reach this worker, not them); a
    second Ctrl-C or SIGTERM (a SIGHUP is never the second: a closing
    terminal sends two) stops them now, their jobs given back at once. A job given up
    (cancelled, its lease lost, its time or output over the bound, stopped
    now) has its command's whole process group killed, and is let go then
    (nacked or given back; one cancelled or whose lease was lost is left as
    it is): the pipes of a process that left the group (setsid) are closed,
    not waited for. Otherwise a job is answered once its command exited and
    its stdout and stderr closed: a process it leaves holding them holds the
    job, and past --timeout fails it. A COMMAND that cannot be started
    stops the worker with exit status 1.

    With -Q OUT, each non-empty line of stdout is a JSON payload for topic OUT,
    enqueued with the ack, in the same commit (the result is null); a line
    that is not JSON, more than 1,000 lines, or jobs over --max-output bytes
    as the ack carries them fail the job instead."""
    check_runnable(command[0])
    cannot_start: list[CommandUnstartable] = []

    async def handler(job: Job) -> Any:
        budget = asyncio.timeout(command_timeout)
        try:
            async with budget:
                out = await run_command(command, job, max_output)
        except CommandUnstartable as exc:
            cannot_start.append(exc)
            worker.request_stop()  # every job would fail the same way
            raise
        except TimeoutError:
            if budget.expired():
                raise CommandFailed(
                    f"the command ran past --timeout {command_timeout:g} s, or a process it"
                    " left held its stdout or stderr that long (killed with its group)"
                ) from None
            raise
        if output_topic is not None:
            follow_ups = [{"topic": output_topic, "payload": p} for p in payloads_of(out)]
            acked_within(follow_ups, max_output, "the jobs to enqueue (-Q)")
            return Done(None, enqueue=follow_ups)
        return acked_within(result_of(out), max_output, "its result")

    worker = CommandWorker(
        client,
        handler,
        concurrency=concurrency,
        prefetch=0,  # a command runs for a while: claim only what can start now
        worker_id=worker_id,
        lease=lease,
        wait=5.0,
        max_jobs=max_jobs,
    )
    log_worker_to_stderr()
    into = f" into {output_topic}" if output_topic is not None else ""
    click.echo(f"working on {client.topic}{into} with {' '.join(command)}", err=True)
    with hangup_drains(worker):
        await worker.run()
    given_back = f", {worker.given_back} given back" if worker.given_back else ""
    unacked = f", {worker.unacked} not acked" if worker.unacked else ""
    click.echo(
        f"done: {worker.processed} acked, {worker.failed} nacked{given_back}{unacked}", err=True
    )
    if cannot_start:
        raise click.ClickException(str(cannot_start[0]))
    if worker.unacked:
        raise click.ClickException(
            f"{worker.unacked} jobs ran but their acks did not land: they will run again"
        )


@contextlib.contextmanager
def hangup_drains(worker: CommandWorker) -> Iterator[None]:
    """SIGHUP (the terminal closed, an ssh session dropped) drains `work` as
    a first SIGTERM does (CommandWorker.hung_up). Commands run in sessions of
    their own, so a hangup reaches `work` alone: it killed `work` at once,
    its commands running on, orphaned, their jobs claimed until their leases
    ran out and then run again beside them. A SIGHUP ignored already (nohup)
    stays ignored. On the loop, around worker.run(), which installs its own
    handlers before its first await and removes them after its last."""
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL:
        yield
        return
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, worker.hung_up)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


def check_topic(name: str | None, param: click.Parameter) -> str | None:
    """`name` if it is a valid topic name (or None), else a usage error now:
    rather than a refused ack after the first job ran (-Q), or a failure, exit
    1, when the client or the broker refused it (--topic)."""
    if name is not None:
        try:
            api.convert({"payload": None, "topic": name}, api.FollowUpSpec)
        except InvalidRequest:
            raise click.BadParameter(
                f"{name!r} is not a topic name (letters, digits, '_' and '-', up to 128)",
                param=param,
            ) from None
    return name


def check_runnable(program: str) -> None:
    """Fail before claiming anything when `program` is not there to run."""
    if shutil.which(program) is not None:
        return
    there = os.sep in program and os.path.exists(program)
    raise click.ClickException(
        f"cannot run {program!r}: {'not executable' if there else 'not found'}"
    )


class CommandUnstartable(Exception):
    """The job's command could not be started (it vanished, or the system cannot
    execute it): no fault of the job's."""


class CommandWorker(Worker):
    """A job whose command could not start is given back at once (nacked with the
    error and no delay) rather than left to its lease: another worker, whose
    command can start, may take it now, and its last_error says why it came back.
    The attempt is spent either way, as a lease running out would spend it."""

    def retry_delay(self, job: Job, error: Exception) -> float:
        if isinstance(error, CommandUnstartable):
            return 0.0
        return super().retry_delay(job, error)

    def hung_up(self) -> None:
        """SIGHUP: drain as on a first signal, and never count as a second one.
        A closing terminal sends two (the kernel, and the shell to its jobs),
        often read from the loop's self-pipe together: each was raised as a
        SIGTERM, the second stopping the commands now, their jobs nacked
        (the attempt spent); so was the first after a Ctrl-C."""
        if not self._signalled:
            self._on_signal("SIGHUP (the terminal closed)")


class OneLine(logging.Formatter):
    """A record without its traceback: a failed command's error is its stderr,
    already in the message, and the Worker's traceback of it would only say
    where run_command raised."""

    def formatException(self, ei: Any) -> str:
        return ""


def log_worker_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLine("%(levelname)s %(message)s"))
    logger = logging.getLogger("simplequeue.worker")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class CommandFailed(Exception):
    """The job's command exited non-zero; the message is its stderr."""


class OutputRejected(Exception):
    """With -Q: the command's stdout is not what may be enqueued (a line that
    is not JSON, too many lines, too many bytes)."""


def command_env(job: Job) -> dict[str, str]:
    """This process's environment, and the job's id and attempt."""
    env = {**os.environ, "SIMPLEQUEUE_JOB_ID": job.id}
    if job.attempts is not None:
        env["SIMPLEQUEUE_ATTEMPT"] = str(job.attempts)
    return env


async def run_command(command: tuple[str, ...], job: Job, max_output: int) -> bytes:
    """Run the command for `job`: its stdout, once it exited 0."""
    out, err, code = await communicate_bounded(
        command, orjson.dumps(job.payload), max_output, command_env(job)
    )
    if out is None:
        raise OutputRejected(
            f"the command wrote more than {max_output} bytes to stdout (it was stopped):"
            " see work --max-output"
        )
    if code != 0:
        text = err.decode(errors="replace").strip()[-4000:]
        raise CommandFailed(text or exit_status(code))
    return out


def exit_status(code: int | None) -> str:
    """How a command ended, in words: its exit status, or the signal that
    killed it (asyncio's returncode is minus the signal's number)."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


async def communicate_bounded(
    command: tuple[str, ...], data: bytes, limit: int, env: dict[str, str]
) -> tuple[bytes | None, bytes, int | None]:
    """Run `command` fed `data` on stdin: (its stdout, the end of its stderr,
    its exit status) once it exited and its pipes closed. stdout is None when
    it passed `limit` bytes: the command is killed then (kill_command) rather
    than read on without bound, and so it is when this ends early (cancelled:
    its job's lease lost, --timeout, "stop now")."""
    output = CommandOutput(limit)
    try:
        transport, _ = await asyncio.get_running_loop().subprocess_exec(
            lambda: output,
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            # A session (and process group) of its own: a terminal's Ctrl-C,
            # sent to the whole foreground group, reaches `work` alone, which
            # drains; and the command's own children can be stopped with it
            # (kill_command).
            start_new_session=True,
        )
    except OSError as exc:
        raise CommandUnstartable(f"cannot run {command[0]!r}: {exc.strerror or exc}") from exc
    try:
        try:
            stdin = transport.get_pipe_transport(0)
            assert isinstance(stdin, asyncio.WriteTransport)
            stdin.write(data)  # buffered by the transport: a payload is bounded
            stdin.close()  # once written
            await output.ended.wait()
        except BaseException:
            await kill_command(transport, output)
            raise
        if output.overflowed:
            await kill_command(transport, output)
            return None, b"", transport.get_returncode()
        return bytes(output.out), bytes(output.err), transport.get_returncode()
    finally:
        drop_unread_input(transport)
        transport.close()  # the pipes, which a process that left its group may hold


class CommandOutput(asyncio.SubprocessProtocol):
    """What a command writes, as it comes: stdout until it passes `limit` bytes
    (`overflowed`, the rest dropped), the last STDERR_KEPT bytes of stderr (it
    is read to its end: a command blocked writing it never ends). `exited`
    once the command exited; `ended` once, besides, both pipes closed (by it
    and by whoever else holds them: its children), or stdout overflowed.
    A protocol, not asyncio's Process: on Python 3.11 Process.wait() waits for
    the pipes to close, which a process that left the command's group holds
    open for as long as it runs; kill_command waits for the exit alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.out = bytearray()
        self.err = bytearray()
        self.overflowed = False
        self.open = {1, 2}  # stdout and stderr
        self.exited = asyncio.Event()
        self.ended = asyncio.Event()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self.err += data
            del self.err[:-STDERR_KEPT]
        elif not self.overflowed:
            self.out += data
            if len(self.out) > self.limit:
                self.overflowed = True
                self.out.clear()
                self.ended.set()

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.open.discard(fd)
        self._maybe_ended()

    def process_exited(self) -> None:
        self.exited.set()
        self._maybe_ended()

    def _maybe_ended(self) -> None:
        if self.exited.is_set() and not self.open:
            self.ended.set()


async def kill_command(transport: asyncio.SubprocessTransport, output: CommandOutput) -> None:
    """SIGKILL the command and every process of its group: a shell script's
    children too, which would otherwise run on for a job given up. Then wait
    for the command's exit, and not for its pipes to close: a process that
    left the group (`setsid cmd &`, a daemon, a double fork) survives the kill
    holding them, and the job was held (its lease heartbeated) until that
    process ended. communicate_bounded closes them: what it writes on is
    refused (EPIPE, or SIGPIPE)."""
    try:
        os.killpg(transport.get_pid(), signal.SIGKILL)  # a group of its own: the command too
    except (ProcessLookupError, PermissionError):
        # kill() reaps the command first if it can (Popen.poll): asyncio's
        # child watcher then finds it gone, and reports its exit as 255.
        with contextlib.suppress(ProcessLookupError):
            transport.kill()
    drop_unread_input(transport)
    await output.exited.wait()


def drop_unread_input(transport: asyncio.SubprocessTransport) -> None:
    """Close stdin now if the command left some of its payload unread: closing
    it as usual waits for a reader to take the rest, and a process still
    holding it (one that left the group, a child of a command that exited
    without reading) keeps the pipe, and the payload, in `work` for as long
    as it lives."""
    stdin = transport.get_pipe_transport(0)
    if isinstance(stdin, asyncio.WriteTransport) and stdin.get_write_buffer_size():
        stdin.abort()


def result_of(out: bytes) -> Any:
    """A command's stdout as its job's result: JSON if it parses, else text."""
    text = out.decode(errors="replace").strip()
    result = parse_payload(text)
    try:
        api.check_storable(result, "the command's stdout")
    except InvalidRequest:  # JSON the store cannot hold (an integer past 64 bits)
        return text  # the command succeeded: its output is kept, as text
    return result


def acked_within(value: Any, max_output: int, what: str) -> Any:
    """`value` if the ack carries it (as JSON) in `max_output` bytes; else
    OutputRejected. Its stdout was within them, but JSON text can be larger:
    a '"' takes 2 bytes, a control character up to 6, a byte that is not UTF-8 3
    (U+FFFD), and with -Q each line takes its topic's name along. The broker
    refused such an ack as over its --max-body, and the job failed for a
    reason its error did not name."""
    size = len(msgspec.json.encode(value))
    if size > max_output:
        raise OutputRejected(
            f"the command succeeded, but its output is too large to ack: as JSON, {what}"
            f" would be {size} bytes, over work --max-output ({max_output})"
        )
    return value


def payloads_of(out: bytes) -> list[Any]:
    """The JSON payload of each non-empty line of `out`."""
    payloads: list[Any] = []
    for number, line in enumerate(out.splitlines(), 1):
        if not line.strip():
            continue
        if len(payloads) == MAX_FOLLOW_UPS:
            raise OutputRejected(
                f"the command printed more than {MAX_FOLLOW_UPS} lines:"
                f" with -Q a job may enqueue at most {MAX_FOLLOW_UPS} jobs"
            )
        try:
            payload = loads(line)
            api.check_storable(payload, f"stdout line {number}")  # an integer past 64 bits
        except NOT_JSON as exc:
            shown = line[:80].decode(errors="replace")
            raise OutputRejected(f"stdout line {number} is not JSON ({exc}): {shown!r}") from None
        except InvalidRequest as exc:
            raise OutputRejected(str(exc)) from None
        payloads.append(payload)
    return payloads
