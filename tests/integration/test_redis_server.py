"""The embedded redis-server: restarted in place it keeps its AOF state; it never outlives the
process that started it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import redis

from ccoe_common.registry.redis_server import RedisServer


def test_a_persistent_server_killed_and_restarted_on_its_dir_keeps_every_acknowledged_write(tmp_path):
    server = RedisServer(data_dir=tmp_path, persist=True).start()
    try:
        client = redis.Redis(port=server.port, decode_responses=True)
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        for i in range(200):
            client.set(f"k{i}", i)
        assert server.proc is not None
        server.proc.kill()  # SIGKILL: no shutdown, no final fsync
        server.proc.wait()
        assert not server.running
        server.restart()
        assert server.running and client.mget([f"k{i}" for i in range(200)]) == [str(i) for i in range(200)]
    finally:
        server.stop()


def test_a_server_dies_with_the_process_that_started_it():
    code = ("from ccoe_common.registry.redis_server import RedisServer; s = RedisServer().start(); "
            "print(s.proc.pid, flush=True); import time; time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    parent.kill()  # no cleanup runs in the parent
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    raise AssertionError(f"redis-server {pid} outlived the process that started it")
