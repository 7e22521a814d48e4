"""simplequeued: run a broker. Click options build one BrokerSettings."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click

from simplequeue import __version__, api, keys
from simplequeue.broker.settings import BrokerSettings, parse_addr
from simplequeue.errors import InvalidRequest, SimpleQueueError
from simplequeue.objstore import ObjectStore
from simplequeue.objstore.localfs import make_dirs
from simplequeue.records import MAX_LEASE_S
from simplequeue.state import Policy
from simplequeue.storeflags import (
    FiniteRange,
    OneLineCommand,
    StoreFlags,
    checked,
    not_empty_in_env,
    store_options,
)


def _addr(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_addr(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _broker_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A usage error (exit 2) for an id that cannot name a registration, as for
    any flag's bad value, where the broker refused it as it started (exit 1).
    An empty one too (`--broker-id "$ID"`, ID unset): taken for none, it ran
    the broker under a random id, as `--dir ""` and `--token ""` would have
    served the current directory and turned auth off. SIMPLEQUEUE_BROKER_ID
    set but empty as well: click takes an empty variable for an unset one."""
    value = not_empty_in_env(ctx, param, value)
    if value is None:
        return None
    try:
        return keys.check_broker_id(value)
    except InvalidRequest as exc:
        raise click.BadParameter(str(exc)) from None


def _token(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """The token, checked; empty, given or in SIMPLEQUEUE_TOKEN, is a usage
    error: a secret that did not expand would run the broker without auth."""
    value = not_empty_in_env(ctx, param, value, " (unset it to run without auth)")
    return checked(api.check_token)(ctx, param, value)


@click.command(
    cls=OneLineCommand,
    context_settings={"auto_envvar_prefix": "SIMPLEQUEUE", "show_default": True},
)
@click.version_option(__version__, prog_name="simplequeue", message="%(prog)s %(version)s")
@click.option(
    "--addr",
    default="127.0.0.1:8080",
    callback=_addr,
    help="HTTP listen address (HOST:PORT; port 0 picks a free one).",
)
@click.option(
    "--redis-addr",
    default=None,
    callback=_addr,
    help="Also speak the Redis protocol (RESP) on HOST:PORT [default: off].",
)
@click.option(
    "--broker-id",
    default=None,
    callback=_broker_id,
    help="This broker's id: 1-128 of [A-Za-z0-9_.-], not starting with . or -"
    " [default: host-random].",
)
@click.option(
    "--advertise-url",
    default=None,
    callback=checked(api.check_broker_url),
    help="URL clients use to reach this broker [default: from --addr].",
)
@store_options()
@click.option("--create-bucket", is_flag=True, help="Create the s3 bucket if it is missing.")
@click.option(
    "--token",
    default=None,
    show_default=False,
    callback=_token,
    help="Require 'Authorization: Bearer TOKEN' (env SIMPLEQUEUE_TOKEN).",
)
@click.option(
    "--lease",
    type=FiniteRange(min=0.001, max=api.MAX_LEASE),
    default=30.0,
    help="Default claim lease, seconds.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=0, max=api.MAX_ATTEMPTS),
    default=5,
    help="Default attempts before a job goes dead (0 = unlimited).",
)
@click.option(
    "--retention",
    type=FiniteRange(min=0),
    default=3600.0,
    help="Seconds finished (completed, dead, cancelled) records are kept for lookups and dedup.",
)
@click.option(
    "--dead-limit",
    type=click.IntRange(min=1),
    default=10_000,
    help="Dead jobs kept per topic; beyond it the oldest are dropped.",
)
@click.option(
    "--max-body",
    type=click.IntRange(min=1024),
    default=1024 * 1024,
    help="Largest request body, bytes.",
)
@click.option(
    "--broker-lease",
    type=FiniteRange(min=0.5, max=MAX_LEASE_S),
    default=15.0,
    help="Seconds after which a silent active broker is replaced in broker.json.",
)
@click.option(
    "--batch-wait",
    type=FiniteRange(min=0, max=1000),
    default=None,
    help="Longest pause after a write, in ms, for the callers it answered to come back "
    "and share the next write (fewer PUTs, a little latency) [default: 5; 25 on s3].",
)
@click.option(
    "--cache-mb",
    type=click.IntRange(min=1),
    default=256,
    help="Memory for the segments and manifests topics are read from, and for each topic's "
    "id filter (cached, the least recently used dropped first), in MB. The claims of one "
    "write take jobs whose payloads come to an eighth of it at most (16 MiB at most; one job "
    "each at least).",
)
@click.option(
    "--header-timeout",
    type=FiniteRange(min=0, min_open=True),
    default=10.0,
    help="Seconds a client may take to send a request's headers, from connecting (or from "
    "the first byte of a later request); then the connection is closed.",
)
@click.option(
    "--body-timeout",
    type=FiniteRange(min=0, min_open=True),
    default=30.0,
    help="Seconds a client may take to send a request's body, once its headers came; then "
    "it is answered 408 and the connection closed.",
)
@click.option(
    "--keepalive-timeout",
    type=FiniteRange(min=0, min_open=True),
    default=api.BROKER_KEEPALIVE,
    help="Seconds an idle keep-alive HTTP connection is kept open after a response. The "
    "SDK drops its idle connections within 7.5 s, other brokers within half of this: "
    "keep it above 7.5 s, and the same on every broker.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=None,
    help="Most HTTP connections open at once; at the cap a new one closes the one idle "
    "longest [default: the descriptor limit, the soft one raised to the hard one (at most "
    "65536), - 256 - what the store holds open - the pool of connections to the other "
    "brokers (a quarter of what is left, 8..1024), within 16..10000].",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info"
)
def main(
    addr: str,
    redis_addr: str | None,
    broker_id: str | None,
    advertise_url: str | None,
    create_bucket: bool,
    token: str | None,
    lease: float,
    max_attempts: int,
    retention: float,
    dead_limit: int,
    max_body: int,
    broker_lease: float,
    batch_wait: float | None,
    cache_mb: int,
    header_timeout: float,
    body_timeout: float,
    keepalive_timeout: float,
    max_connections: int | None,
    log_level: str,
    **store_flags: Any,
) -> None:
    """Run a simplequeue broker until SIGTERM, Ctrl-C or SIGHUP."""
    hold_standard_descriptors()
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    flags = StoreFlags.take(store_flags)
    if create_bucket and flags.backend != "s3":
        raise click.UsageError("--create-bucket is for --backend s3")
    # Before the store is made: localfs sizes the files it keeps open to the limit.
    raise_descriptor_limit()
    store = flags.open()
    if flags.backend == "localfs":
        make_dir(Path(flags.dir))
    url = store.url
    policy = Policy(
        default_lease=lease, max_attempts=max_attempts, retention=retention, dead_limit=dead_limit
    )
    settings = BrokerSettings(
        store_url=url,
        addr=addr,
        redis_addr=redis_addr,
        advertise_url=advertise_url,
        token=token or None,
        policy=policy,
        max_body=max_body,
        broker_lease=broker_lease,
        batch_wait=None if batch_wait is None else batch_wait / 1000,
        cache_bytes=cache_mb * 1024 * 1024,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        keepalive_timeout=keepalive_timeout,
        max_connections=max_connections,
    )
    if broker_id is not None:
        settings = dataclasses.replace(settings, broker_id=broker_id)
    # Store calls that block (localfs's writes and fsyncs) run in threads, and
    # each of their system calls takes the GIL back when it returns. With the
    # default 5 ms switch interval a busy event loop holds it that long each
    # time, and one write of a few system calls took 4 ms instead of 1.
    sys.setswitchinterval(0.0005)
    try:
        with event_loop_runner() as runner:
            runner.run(_serve(settings, store, create_bucket))
    except (OSError, SimpleQueueError) as exc:
        raise click.ClickException(str(exc)) from None


def hold_standard_descriptors() -> None:
    """Open /dev/null on standard descriptors closed at launch (`simplequeued
    >&-`), before anything else opens one: a socket took fd 1 and uvloop,
    which refuses to close one of 0-2, aborted the process as it stopped
    (`uv__close: Assertion fd > STDERR_FILENO`, exit 134, no goodbyes said);
    on fd 2 what is written to stderr below Python would go to a peer.
    Python still sees such a stream as closed (sys.stdout None): announce()
    then fails as on /dev/full."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def make_dir(path: Path) -> None:
    """Make the localfs directory if it is missing (durably, each folder made
    fsynced in its parent, as the store would), and check that files can be
    written there: one that cannot is refused now (exit 1), where the broker
    would start and answer 503 to every write."""
    try:
        make_dirs(path)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        raise click.ClickException(f"--dir {path}: {exc.strerror or exc}") from None


# The most descriptors raise_descriptor_limit() asks for: MAX_CONNECTIONS and
# room to spare.
DESCRIPTORS_WANTED = 65536


def raise_descriptor_limit() -> None:
    """Raise this process' soft limit on open descriptors to its hard limit
    (at most DESCRIPTORS_WANTED), as Go's runtime and most servers do. HTTP
    connections and the files and connections the store keeps open all draw
    on it, and 1024, a common soft limit, would cap a localfs broker at 256
    connections. Where it cannot be raised, the cap follows what it is."""
    try:
        import resource
    except ImportError:  # not on Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = DESCRIPTORS_WANTED if hard == resource.RLIM_INFINITY else min(hard, DESCRIPTORS_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            logging.getLogger(__name__).warning("could not raise the descriptor limit: %s", exc)


def event_loop_runner() -> asyncio.Runner:
    """uvloop's event loop where it is installed (Linux and macOS): the broker's
    CPU per HTTP request is mostly the event loop's and aiohttp's, and uvloop
    takes a third or more off it; the standard loop elsewhere."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


# The signals that stop the broker, and that, once it is stopping, stop it
# now. SIGHUP stops it too (stop_signals()), but is no second signal: a
# terminal that closes sends it twice (the kernel and the shell).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_signals() -> list[signal.Signals]:
    """The signals that stop the broker: SIGTERM, Ctrl-C's SIGINT, and SIGHUP
    (its terminal closed, an ssh session dropped), which killed it at once,
    writes in flight cut and no goodbyes (broker.json and its registration
    naming it live for another lease). A SIGHUP ignored already (nohup)
    stays ignored."""
    stopping = list(STOP_SIGNALS)
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        stopping.append(signal.SIGHUP)
    return stopping


async def _serve(settings: BrokerSettings, store: ObjectStore, create_bucket: bool) -> None:
    from simplequeue.broker.server import Broker

    if create_bucket:
        from simplequeue.objstore.s3 import S3Store

        if isinstance(store, S3Store):
            await store.create_bucket()
    broker = Broker(settings, store)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in stop_signals():
        loop.add_signal_handler(sig, stop.set)
    log = logging.getLogger(__name__)
    try:
        # start() waits on the store, unbounded: one that does not answer must
        # not keep a signal from stopping the broker (its stop is bounded).
        started = await _unless_signalled(stop, broker.start())
    except BaseException:
        # Refused (a store that does not honour conditional writes, or says
        # no: no such bucket, access denied), or a port taken: the process
        # exits with the reason, its store closed.
        await store.close()
        raise
    try:
        if started:
            lines = [
                f"simplequeued {settings.broker_id} listening on {broker.url} "
                f"(store {settings.store_url}, pid {os.getpid()})"
            ]
            if broker.redis is not None:
                lines.append(f"simplequeued resp listening on {broker.redis.addr}")
            announce(lines)
            if broker.http is not None:
                log.info(
                    "at most %d HTTP connections at once (%d descriptors held for the store, "
                    "%d for connections to the other brokers)",
                    broker.http.max_connections,
                    store.held_descriptors,
                    broker.forwarder.connections,
                )
            if broker.redis is not None:
                log.info("at most %d RESP clients at once", broker.redis.settings.max_clients)
            await stop.wait()
        else:
            log.warning("a signal while starting: starting no further")
    finally:
        # However it ends once started (a signal, or the lines above failing),
        # the broker stops: it leaves the registry and hands broker.json over,
        # where exiting without would leave both naming a dead broker live
        # for a lease.
        log.info("stopping: finishing in-flight writes (a second signal stops now)")
        now = asyncio.Event()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, now.set)
        if not await _unless_signalled(now, broker.stop()):
            # A write cut short lands whole or not at all; its caller, cut off,
            # retries. The other brokers take over within --broker-lease.
            log.warning("second signal: stopping now, without waiting for what is in flight")


def announce(lines: list[str]) -> None:
    """Print where the broker listens on stdout (a supervisor may wait for it),
    or raise ClickException: stdout a full disk, a pipe whose reader died,
    closed. What is still buffered would fail again as Python exits (a second
    message, exit status 120): it goes nowhere instead."""
    try:
        if sys.stdout is None:
            raise OSError(errno.EBADF, "stdout is closed")
        for line in lines:
            click.echo(line)
        sys.stdout.flush()
    except OSError as exc:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise click.ClickException(f"cannot write to stdout: {exc.strerror or exc}") from None


async def _unless_signalled(told: asyncio.Event, work: Coroutine[Any, Any, None]) -> bool:
    """Run `work` until it is done (True), or until `told` is set first: then it
    is cancelled (False). What it raised is raised."""
    task = asyncio.create_task(work)
    waiting = asyncio.create_task(told.wait())
    try:
        await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False
