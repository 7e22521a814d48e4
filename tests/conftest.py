"""Shared fixtures: object stores of every backend, LocalStack S3 and moto included.

bin/test starts LocalStack and moto's S3 server and exports
SIMPLEQUEUE_TEST_S3_ENDPOINT and SIMPLEQUEUE_TEST_MOTO_ENDPOINT. Without one,
its cases skip, unless SIMPLEQUEUE_REQUIRE_S3=1 / SIMPLEQUEUE_REQUIRE_MOTO=1
(set by bin/test and CI), in which case they fail: CI must never pass by
skipping S3. moto is a second S3 implementation of conditional writes, so that
the s3 backend is not only ever checked against one emulator.
"""

from __future__ import annotations

import contextlib
import glob
import os
import select
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from simplequeue.objstore import ObjectStore
from simplequeue.objstore.localfs import LocalStore
from simplequeue.objstore.memfs import MemStore

# A suite started in the background of a shell without job control (`bin/test &`
# in a script) inherits SIGINT ignored (POSIX), and so would every command it
# starts: tests send SIGINT, as a terminal's Ctrl-C does, to processes that must
# not ignore it (simplequeue work leaves an ignored SIGINT ignored, as it should).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

S3_ENDPOINT = os.environ.get("SIMPLEQUEUE_TEST_S3_ENDPOINT", "")
MOTO_ENDPOINT = os.environ.get("SIMPLEQUEUE_TEST_MOTO_ENDPOINT", "")
RUN_BUCKET = f"sq-test-{uuid.uuid4().hex[:12]}"
MOTO_BUCKET = f"sq-moto-{uuid.uuid4().hex[:12]}"
BACKENDS = ["memfs", "localfs", "s3", "moto"]


def _endpoint(url: str, variable: str, required: str, what: str) -> str:
    if not url:
        if os.environ.get(required) == "1":
            pytest.fail(f"{variable} is not set but {what} tests are required")
        pytest.skip(f"no {what}: set {variable} (bin/test does)")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return url


def s3_endpoint() -> str:
    """The LocalStack endpoint, or skip (fail under SIMPLEQUEUE_REQUIRE_S3=1)."""
    return _endpoint(
        S3_ENDPOINT, "SIMPLEQUEUE_TEST_S3_ENDPOINT", "SIMPLEQUEUE_REQUIRE_S3", "LocalStack"
    )


def moto_endpoint() -> str:
    """moto's S3 server endpoint, or skip (fail under SIMPLEQUEUE_REQUIRE_MOTO=1)."""
    return _endpoint(
        MOTO_ENDPOINT, "SIMPLEQUEUE_TEST_MOTO_ENDPOINT", "SIMPLEQUEUE_REQUIRE_MOTO", "moto"
    )


def s3_url(prefix: str | None = None) -> str:
    """A store URL on this run's bucket under a fresh prefix."""
    prefix = prefix or uuid.uuid4().hex[:12]
    return f"s3://{RUN_BUCKET}/{prefix}?endpoint_url={s3_endpoint()}&region=us-east-1"


async def open_s3(
    prefix: str | None = None, *, moto: bool = False, **overrides: object
) -> ObjectStore:
    """A store on this run's LocalStack bucket (or, with `moto`, its moto bucket)."""
    from simplequeue.objstore.s3 import S3Settings, S3Store

    settings = S3Settings(
        bucket=MOTO_BUCKET if moto else RUN_BUCKET,
        prefix=prefix or uuid.uuid4().hex[:12],
        endpoint_url=moto_endpoint() if moto else s3_endpoint(),
        region="us-east-1",
        **overrides,  # type: ignore[arg-type]
    )
    store = S3Store(settings)
    await store.create_bucket()
    return store


OpenStore = Callable[[], Awaitable[ObjectStore]]


@pytest.fixture(params=BACKENDS)
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """A factory for handles on one empty store of each backend. Each call opens
    a new handle on the same data, as a second broker process would."""
    backend: str = request.param
    name, prefix = f"t{uuid.uuid4().hex}", uuid.uuid4().hex[:12]
    opened: list[ObjectStore] = []

    async def make() -> ObjectStore:
        if backend == "memfs":
            handle: ObjectStore = MemStore(name)
        elif backend == "localfs":
            handle = LocalStore(tmp_path / "store")
        else:
            handle = await open_s3(prefix, moto=backend == "moto")
        opened.append(handle)
        return handle

    yield make
    for handle in opened:
        await handle.close()


@pytest.fixture
async def store(open_store: OpenStore) -> ObjectStore:
    """One empty store of each backend."""
    return await open_store()


# --- brokers ------------------------------------------------------------------


@pytest.fixture
async def start_broker() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Starts in-process brokers on free 127.0.0.1 ports; stops them all after."""
    from simplequeue.broker.server import Broker
    from simplequeue.broker.settings import BrokerSettings

    started: list[Broker] = []

    async def start(store: ObjectStore | None = None, **settings: Any) -> Broker:
        store = store or MemStore()
        broker = Broker(BrokerSettings(store_url=store.url, addr="127.0.0.1:0", **settings), store)
        await broker.start()
        started.append(broker)
        return broker

    yield start
    for broker in reversed(started):
        await broker.stop()


# simplequeued with its descriptor limit (ulimit -n) lowered by the child itself,
# before the broker starts: preexec_fn is unsafe in a parent that has threads.
UNDER_NOFILE = (
    "import resource, sys; soft, hard = map(int, sys.argv.pop(1).split(',')); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)); "
    "from simplequeue.broker.cli import main; main()"
)


class BrokerProcess:
    """A `simplequeued` subprocess; its URL is read from its first line. With
    `nofile`, it runs with that soft and hard limit on open descriptors (or
    that (soft, hard) pair)."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        nofile: int | tuple[int, int] | None = None,
    ) -> None:
        self.args = args
        self._faked_clock = "FAKETIME" in (env or {})
        # A file, not a pipe: readable while the broker runs (a campaign that
        # fails says what its brokers logged), and never full (a broker that
        # logs past a pipe's 64 KB, unread, would block on its next line).
        # Appended to (O_APPEND): the reader's seeks never move the broker's writes.
        # Closed by stop().
        self._stderr = tempfile.TemporaryFile("a+", encoding="utf-8", errors="replace")  # noqa: SIM115
        self._logged = ""  # what it logged, once stopped
        if nofile is None:
            launch = ["-m", "simplequeue.broker"]
        else:
            soft, hard = (nofile, nofile) if isinstance(nofile, int) else nofile
            launch = ["-c", UNDER_NOFILE, f"{soft},{hard}"]
        self.proc = subprocess.Popen(
            [sys.executable, *launch, "--addr", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            # PYTHONFAULTHANDLER: a crash in C code (a segfault) says where.
            env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})},
        )
        assert self.proc.stdout is not None
        # Never wait for ever on a broker that neither starts nor exits.
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if "listening on" not in line:
            self.stop(timeout=5)
            raise RuntimeError(f"broker did not start: {line!r}; stderr: {self.stderr_tail}")
        self.url = line.split("listening on ")[1].split()[0]
        self.broker_id = line.split()[1]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no goodbye."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self._faked_clock:
            remove_faketime_leftovers(self.pid)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then SIGKILL if it does not leave in time; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait()
        if self._faked_clock:
            remove_faketime_leftovers(self.pid)
        if self.proc.stdout:
            self.proc.stdout.close()
        if not self._stderr.closed:
            self._logged = self.log()
            self._stderr.close()
        return code

    @property
    def stderr_tail(self) -> str:
        """The last 2,000 characters the broker logged so far."""
        return self.log()[-2000:]

    def log(self) -> str:
        """Everything the broker logged so far (stderr)."""
        if self._stderr.closed:
            return self._logged
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()


@pytest.fixture
def broker_process() -> Iterator[Callable[..., BrokerProcess]]:
    """Starts `simplequeued` subprocesses; stops every one of them (by PID) after."""
    started: list[BrokerProcess] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        nofile: int | tuple[int, int] | None = None,
    ) -> BrokerProcess:
        started.append(BrokerProcess(*args, env=env, nofile=nofile))
        return started[-1]

    yield start
    for b in started:
        b.stop()


def faketime_env(offset: str) -> dict[str, str]:
    """The environment that runs a process with its wall clock moved by
    `offset` ("+60s", "-60s") and its monotonic clock untouched (asyncio runs on
    it): Debian's libfaketime, preloaded into the process itself (the faketime
    command would stand between it and its parent, which then could not
    signal it). Skips without libfaketime, unless SIMPLEQUEUE_REQUIRE_FAKETIME=1
    (bin/test), when it fails."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    if not found:
        if os.environ.get("SIMPLEQUEUE_REQUIRE_FAKETIME") == "1":
            pytest.fail("libfaketime is missing but required: run bin/install-faketime")
        pytest.skip("libfaketime is missing: bin/install-faketime installs it")
    return {
        "LD_PRELOAD": found[0],
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "NO_FAKE_STAT": "1",
    }


def remove_faketime_leftovers(pid: int) -> None:
    """Removes what libfaketime left of the exited process `pid`. Preloaded, it
    makes a named semaphore and a shared memory object per process
    (/dev/shm/sem.faketime_sem_<pid>, /dev/shm/faketime_shm_<pid>) and leaves
    both behind, however the process ends. Left, they pile up, and the faketime
    command, given a PID that had one, refuses to start ("sem_open: File exists")."""
    for name in (f"sem.faketime_sem_{pid}", f"faketime_shm_{pid}"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{name}")


def s3_broker_args(prefix: str) -> list[str]:
    """simplequeued flags for this run's LocalStack bucket under `prefix`."""
    return [
        "--backend",
        "s3",
        "--bucket",
        RUN_BUCKET,
        "--prefix",
        prefix,
        "--endpoint-url",
        s3_endpoint(),
        "--region",
        "us-east-1",
        "--create-bucket",
    ]
