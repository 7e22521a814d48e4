"""The broker's settings: one value, built by the command line or by tests."""

from __future__ import annotations

import ipaddress
import logging
import socket
import uuid
from dataclasses import dataclass, field

from simplequeue import api
from simplequeue.state import Policy

log = logging.getLogger(__name__)


def parse_addr(addr: str) -> tuple[str, int]:
    """'host:port' (or ':port', or '[v6]:port') -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    """Whether listening on `host` (an address, or a name) reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_advertise_url(host: str, port: int) -> str:
    """A URL clients can use: a wildcard bind is advertised by this host's
    name, or by its outbound interface's address when the name reaches this
    machine only (SPEC 4.3: brokers advertise a URL the others reach)."""
    if host in ("0.0.0.0", "::", ""):
        # A socket bound to :: takes IPv6 only (asyncio sets IPV6_V6ONLY).
        host = _this_host(port, socket.AF_INET6 if host == "::" else socket.AF_INET)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _this_host(port: int, family: socket.AddressFamily) -> str:
    """This host's name, unless it resolves to a loopback address: then the
    address of its outbound interface, said as a warning. Where /etc/hosts
    maps the host's name to 127.0.0.1, getfqdn() answers "localhost": brokers
    on several such hosts all advertised http://localhost:PORT, which no
    other host reaches, and each took the others for itself. The address is
    of the bind's `family`: a broker bound to [::] advertised an IPv4
    address, which it refused."""
    name = socket.getfqdn() or "127.0.0.1"
    if not _names_loopback(name):
        return name
    address = outbound_address(family)
    if address is None or is_loopback(address):
        log.warning(
            "this host's name %s resolves to a loopback address, and no other address was "
            "found: advertised as http://%s:%d, which no other host reaches; set "
            "--advertise-url",
            name,
            name,
            port,
        )
        return name
    log.warning(
        "this host's name %s resolves to a loopback address: advertised as http://%s:%d, "
        "its outbound interface's address; set --advertise-url to choose",
        name,
        address,
        port,
    )
    return address


def _names_loopback(name: str) -> bool:
    """Whether `name` resolves here to loopback addresses only. One that does
    not resolve here is left to the others to resolve."""
    if is_loopback(name):
        return True
    try:
        found = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(found) and all(is_loopback(str(info[4][0])) for info in found)


# Addresses no packet is sent to (a UDP socket's connect picks a route only):
# private IPv4, and IPv6's documentation prefix.
_PROBED = {socket.AF_INET: "10.255.255.255", socket.AF_INET6: "2001:db8::1"}


def outbound_address(family: socket.AddressFamily = socket.AF_INET) -> str | None:
    """The address (of `family`) of the interface this host's traffic to
    others leaves by, or None when it has no route out: a UDP socket
    connected to a non-routed address picks a route and sends nothing."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((_PROBED[family], 1))
            address: str = probe.getsockname()[0]
    except OSError:
        return None
    return address


@dataclass(frozen=True)
class BrokerSettings:
    """Everything a broker needs to know to run."""

    store_url: str
    addr: str = "127.0.0.1:8080"
    redis_addr: str | None = None
    broker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    advertise_url: str | None = None
    token: str | None = None
    policy: Policy = field(default_factory=Policy)
    max_body: int = 1024 * 1024
    commit_budget: float = 10.0
    # Longest pause (seconds) after a write for the callers it answered to come
    # back and share the next one; None: 5 ms, or 25 ms on S3 where a write
    # takes ~10 ms or more and each one is billed.
    batch_wait: float | None = None
    cache_bytes: int = 256 * 1024 * 1024  # the object cache's budget (--cache-mb)
    sweep_interval: float = 600.0  # seconds between sweeps of orphan segments
    # broker.json and brokers/<id>.json: a broker whose record did not change
    # for this long is taken for dead (an active one is replaced).
    broker_lease: float = 15.0
    forward_timeout: float = 1.0  # seconds a topic's owner has to answer a forwarded request
    # HTTP connections (simplequeue.broker.listener): seconds a client may take
    # to send a request's headers, seconds a keep-alive connection may idle, and
    # how many may be open (None: from the descriptor limit, RLIMIT_NOFILE).
    header_timeout: float = 10.0
    # Seconds a client may take to send a request's body, once its headers came.
    body_timeout: float = 30.0
    keepalive_timeout: float = api.BROKER_KEEPALIVE
    max_connections: int | None = None

    def __post_init__(self) -> None:
        # Seconds that are nan or inf would pass every comparison, or be
        # written into broker.json as null; the command line refuses them too.
        for name in (
            "commit_budget",
            "batch_wait",
            "sweep_interval",
            "broker_lease",
            "forward_timeout",
            "header_timeout",
            "body_timeout",
            "keepalive_timeout",
        ):
            value = getattr(self, name)
            if value is not None:
                api.check_seconds(f"BrokerSettings.{name}", value)
