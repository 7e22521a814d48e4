"""The servers a benchmark runs against, each a child process started and stopped by PID.

simplequeued (localfs or s3, optionally with its RESP listener), the bare aiohttp
ceiling (bench/ceiling.py), Debian's redis-server and PostgreSQL, LocalStack's S3
and the latency-injecting proxy in front of it (bench/s3proxy.py). Every
`start_*` is a context manager whose exit stops what it started, whatever happened;
nothing here ever signals a process it did not start.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
AWS_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


#: With `bin/bench --pin`: the CPUs each role's processes run on ("server":
#: brokers, the ceiling, Redis, PostgreSQL, the S3 proxy; "generator": the load
#: generator, with the SDK's and the rivals' workers). Empty: the kernel's choice.
PINNED: dict[str, set[int]] = {}


def pin(proc: subprocess.Popen[bytes], role: str) -> None:
    """Bind a process just started (before it starts threads or forks, which
    inherit it) to its role's CPUs, when the run pins."""
    if role in PINNED:
        os.sched_setaffinity(proc.pid, PINNED[role])


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: ours, unbuffered, plus `extra`."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Server:
    """A running child process and where it listens."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process (all its threads) so far."""
        try:
            t = psutil.Process(self.proc.pid).cpu_times()
        except psutil.Error:
            return 0.0
        return float(t.user + t.system)

    def memory(self) -> dict[str, int]:
        """The process's resident set now and its peak (VmRSS, VmHWM), in bytes,
        from /proc/<pid>/status; {} when it cannot be read."""
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return {}
        found = re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB$", text, re.M)
        return {name: int(kb) * 1024 for name, kb in found}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: this one PID only."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


def _read_lines(proc: subprocess.Popen[bytes], want: int, timeout: float, what: str) -> list[str]:
    """The first `want` lines of the child's stdout, within `timeout` seconds."""
    assert proc.stdout is not None
    lines: list[str] = []
    buf = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while len(lines) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{what} did not start within {timeout:.0f} s")
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"{what} exited during startup (code {proc.wait()})")
            buf += chunk
            while b"\n" in buf and len(lines) < want:
                line, buf = buf.split(b"\n", 1)
                lines.append(line.decode(errors="replace"))
    finally:
        sel.close()
    return lines


def _profiler(profile: Path | None) -> list[str]:
    """Interpreter arguments that run a module under pyinstrument, when profiling."""
    if profile is None:
        return []
    profile.parent.mkdir(parents=True, exist_ok=True)
    return ["-m", "pyinstrument", "-i", "0.0005", "--show-all", "-r", "pstats", "-o", str(profile)]


@contextlib.contextmanager
def start_simplequeued(
    name: str,
    log_dir: Path,
    *,
    data_dir: Path | None = None,
    s3: dict[str, str] | None = None,
    resp: bool = False,
    extra_args: tuple[str, ...] = (),
    profile: Path | None = None,
) -> Iterator[Server]:
    """A broker on a free port: localfs in `data_dir`, or s3 with `s3` = {bucket,
    endpoint_url}, or memfs with neither. With `resp`, also the RESP listener
    (extra["resp_port"]). With `profile`, it runs under pyinstrument, which writes
    pstats there when it stops."""
    args = [sys.executable, *_profiler(profile), "-m", "simplequeue.broker"]
    args += ["--addr", "127.0.0.1:0"]
    args += ["--log-level", "warning", *extra_args]
    if s3 is not None:
        args += ["--backend", "s3", "--bucket", s3["bucket"], "--create-bucket"]
        args += ["--endpoint-url", s3["endpoint_url"], "--region", "us-east-1"]
    elif data_dir is None:  # in memory: the broker without a store's writes
        args += ["--backend", "memfs"]
    else:
        args += ["--backend", "localfs", "--dir", str(data_dir)]
    if resp:
        args += ["--redis-addr", "127.0.0.1:0"]
    env = child_env()
    if s3 is not None:  # LocalStack takes any credentials; keep the caller's if set
        for key, value in AWS_TEST_CREDENTIALS.items():
            env.setdefault(key, value)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, cwd=REPO, env=env, start_new_session=True
        )
        pin(proc, "server")
    try:
        lines = _read_lines(proc, 2 if resp else 1, 60, f"simplequeued ({name})")
        found = re.search(r"listening on (http://\S+)", lines[0])
        if not found:
            raise RuntimeError(f"simplequeued said: {lines[0]!r}")
        server = Server(name, proc, found.group(1))
        if resp:
            port = re.search(r"resp listening on \S*:(\d+)", lines[1])
            if not port:
                raise RuntimeError(f"simplequeued said: {lines[1]!r}")
            server.extra["resp_port"] = port.group(1)
        yield server
    finally:
        stop_process(proc)


def resp_available() -> bool:
    """Whether this simplequeued has a RESP listener (`--redis-addr`)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "simplequeue.broker", "--help"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--redis-addr" in out


@contextlib.contextmanager
def start_ceiling(log_dir: Path, profile: Path | None = None) -> Iterator[Server]:
    """The bare aiohttp server of bench/ceiling.py on a free port (under
    pyinstrument, writing pstats to `profile`, when given)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "ceiling.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, *_profiler(profile), "-m", "bench.ceiling"],
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=REPO,
            env=child_env(),
            start_new_session=True,
        )
        pin(proc, "server")
    try:
        [line] = _read_lines(proc, 1, 60, "ceiling")
        found = re.search(r"listening on (http://\S+)", line)
        if not found:
            raise RuntimeError(f"ceiling said: {line!r}")
        yield Server("ceiling", proc, found.group(1))
    finally:
        stop_process(proc)


@contextlib.contextmanager
def start_s3proxy(log_dir: Path, upstream: str, seed: int = 8) -> Iterator[Server]:
    """bench/s3proxy.py on a free port in front of `upstream` (LocalStack): S3
    latencies added, answers counted (`proxy_counts`)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "s3proxy.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.s3proxy", "--upstream", upstream, "--seed", str(seed)],
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=REPO,
            env=child_env(),
            start_new_session=True,
        )
        pin(proc, "server")
    try:
        [line] = _read_lines(proc, 1, 60, "s3proxy")
        found = re.search(r"listening on (http://\S+)", line)
        if not found:
            raise RuntimeError(f"s3proxy said: {line!r}")
        yield Server("s3proxy", proc, found.group(1))
    finally:
        stop_process(proc)


def redis_server_path() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


@contextlib.contextmanager
def start_redis(data_dir: Path) -> Iterator[Server]:
    """Debian's redis-server on a free port, AOF with fsync every second (Redis's
    recommended durable setting), no RDB snapshots, data in `data_dir`."""
    binary = redis_server_path()
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir)]
    args += ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
    args += ["--daemonize", "no", "--logfile", str(data_dir / "redis.log")]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    pin(proc, "server")
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        yield Server("redis", proc, f"redis://127.0.0.1:{port}", {"port": str(port)})
    finally:
        stop_process(proc)


def postgres_bindir() -> Path | None:
    """Where postgres, initdb and pg_isready are: Debian's newest
    /usr/lib/postgresql/VERSION/bin (off the PATH), else postgres's directory on
    the PATH; None when PostgreSQL is not installed."""
    found = []
    for binary in Path("/usr/lib/postgresql").glob("*/bin/postgres"):
        with contextlib.suppress(ValueError):
            found.append((tuple(int(p) for p in binary.parent.parent.name.split(".")), binary))
    if found:
        return max(found)[1].parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path else None


def _postgres_user() -> tuple[str, int, int] | None:
    """Whom initdb and postgres run as: ourselves (None), unless we are root, which
    both refuse; then Debian's `postgres` system user, or nobody where there is none."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return name, entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root, and no postgres or nobody user to run PostgreSQL as")


@dataclass
class PostgresServer(Server):
    """A postmaster: it forks a backend per connection and helpers (checkpointer,
    WAL writer...), so its CPU is theirs too."""

    def cpu_seconds(self) -> float:
        """The postmaster's CPU, the children it has reaped (backends of closed
        connections), and its live children's, so far."""
        try:
            parent = psutil.Process(self.proc.pid)
            t = parent.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in parent.children():
                with contextlib.suppress(psutil.Error):
                    c = child.cpu_times()
                    total += c.user + c.system
        except psutil.Error:
            return 0.0
        return float(total)


# What part 2 runs PostgreSQL with, besides the defaults. fsync and synchronous_commit
# are on by default; they are spelled out because they are the durability compared:
# every commit waits for its WAL to be flushed (fdatasync), concurrent commits share
# a flush. full_page_writes (on) keeps a torn page from corrupting the data.
POSTGRES_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "100",
}


def stop_postgres(proc: subprocess.Popen[bytes]) -> None:
    """PostgreSQL's fast shutdown (SIGINT: clients are disconnected, a checkpoint is
    written), then its immediate one (SIGQUIT), then SIGKILL: this one PID only, the
    postmaster, which stops its own children."""
    for sig, grace in ((signal.SIGINT, 30.0), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)


@contextlib.contextmanager
def start_postgres(scratch: Path, log_dir: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of its own: initdb into `scratch` (made here, removed
    on exit), then `postgres` on a free port of 127.0.0.1 with POSTGRES_SETTINGS and
    no Unix socket. `scratch` belongs under the run's scratch directory, on the disk
    the other systems write to: the system's temporary directory may be a tmpfs,
    where WAL flushes cost nothing. Trust authentication for the superuser `bench`;
    extra["dsn"] is the `postgres` database's URL. initdb and postgres refuse to
    run as root, so when we are root both run as `_postgres_user()` (subprocess
    switches user, group and clears the supplementary groups before exec), the
    directory chowned to it."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed")
    user = _postgres_user()
    as_user: dict[str, Any] = {}
    if user is not None:
        as_user = {"user": user[1], "group": user[2], "extra_groups": []}
    log_dir.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True)
    try:
        if user is not None:
            os.chown(scratch, user[1], user[2])
        data = scratch / "data"
        env = {**child_env(), "LC_ALL": "C", "TZ": "UTC"}
        with open(log_dir / "postgres.log", "ab") as log:
            args = [str(bindir / "initdb"), "-D", str(data), "-U", "bench", "--auth=trust"]
            args += ["--encoding=UTF8", "--locale=C"]
            initdb = subprocess.run(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=scratch,
                env=env,
                timeout=300,
                check=False,
                **as_user,
            )
            if initdb.returncode != 0:
                # As root, the usual cause: a directory above `scratch` the
                # postgres user may not pass (a home directory of mode 700).
                why = f"code {initdb.returncode}" + (f", run as {user[0]}" if user else "")
                raise RuntimeError(f"initdb failed ({why}; log: {log.name})")
            port = free_port()
            # No Unix socket (-k ''): everything connects over TCP, and a socket path
            # under a deep checkout could pass the 107 bytes a socket address holds.
            args = [str(bindir / "postgres"), "-D", str(data), "-k", "", "-p", str(port)]
            for key, value in POSTGRES_SETTINGS.items():
                args += ["-c", f"{key}={value}"]
            proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=scratch,
                env=env,
                start_new_session=True,
                **as_user,
            )
            pin(proc, "server")
        try:
            ready = [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
            ready += ["-U", "bench", "-d", "postgres", "-t", "2"]
            deadline = time.monotonic() + 60
            while subprocess.run(ready, cwd=scratch, check=False, timeout=30).returncode != 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start (log: {log_dir / 'postgres.log'})")
                time.sleep(0.1)
            dsn = f"postgresql://bench@127.0.0.1:{port}/postgres"
            version = subprocess.run(
                [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False
            ).stdout.split()
            extra = {"port": str(port), "dsn": dsn, "user": user[0] if user else ""}
            extra["version"] = version[2] if len(version) > 2 else "?"
            yield PostgresServer("postgres", proc, dsn, extra)
        finally:
            stop_postgres(proc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def start_localstack(state_dir: Path) -> Iterator[str]:
    """LocalStack's S3 through localstack/start.sh; yields its endpoint URL and
    stops it with localstack/stop.sh PID."""
    env = child_env(SIMPLEQUEUE_LOCALSTACK_STATE=str(state_dir))
    out = subprocess.run(
        [str(REPO / "localstack" / "start.sh")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    found = dict(re.findall(r"^(LOCALSTACK_PID|LOCALSTACK_ENDPOINT)=(\S+)$", out.stdout, re.M))
    if out.returncode != 0 or len(found) != 2:
        raise RuntimeError(f"localstack/start.sh failed: {out.stderr.strip()[-2000:]}")
    try:
        yield found["LOCALSTACK_ENDPOINT"]
    finally:
        subprocess.run(
            [str(REPO / "localstack" / "stop.sh"), found["LOCALSTACK_PID"]],
            capture_output=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )
