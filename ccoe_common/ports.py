"""Free TCP ports for the servers a local stack starts (Redis, Ray Serve's gRPC and HTTP
proxies, the metrics exporter).

A port is chosen, then bound later by another process. If it came from the kernel's
ephemeral range (what binding port 0 hands out), any outgoing connection opened meanwhile
can take it; starting Ray opens many. That happened in CI: Ray's gRPC proxy failed with
"Failed to bind to address [::]:45915". So ports come from below the ephemeral range, and
above Ray's default worker ports (10002-19999), where nothing is handed out implicitly.
"""

from __future__ import annotations

import errno
import random
import socket
from pathlib import Path

LOWEST = 20000  # above Ray's default worker port range
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for implicitly bound ports (Linux); the IANA range elsewhere."""
    try:
        low, high = (int(v) for v in _RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 49152, 65535


def free_port(attempts: int = 200) -> int:
    """A TCP port nothing listens on, below the ephemeral range when there is room there."""
    low, _ = ephemeral_range()
    if low - LOWEST >= 1000:
        rng = random.SystemRandom()
        for _ in range(attempts):
            port = rng.randrange(LOWEST, low)
            if bindable(port):
                return port
    with socket.socket() as s:  # no room below the range (or all taken): let the kernel pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bindable(port: int) -> bool:
    """Whether a server could listen on `port` on every address, as Ray's proxies do ([::])."""
    families = [(socket.AF_INET6, "::")] if socket.has_ipv6 else []
    for family, host in [*families, (socket.AF_INET, "0.0.0.0")]:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, port))
            return True
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            continue  # no IPv6 here: try IPv4
    return False
