"""The registry reaches a Redis that wants a password, with the password only in
CCOE_REDIS_PASSWORD (how the Helm chart passes it from a Secret): real redis-server."""

from __future__ import annotations

import pytest
import redis

from ccoe_common.registry.redis_server import RedisServer
from ccoe_common.registry.store import RegistryStore, redis_client

PASSWORD = "s3cret-for-test"


@pytest.fixture(scope="module")
def server():
    with RedisServer() as r:
        redis.Redis(port=r.port).config_set("requirepass", PASSWORD)
        yield r


def test_the_password_comes_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("CCOE_REDIS_PASSWORD", PASSWORD)
    assert redis_client(server.url).ping()
    store = RegistryStore.from_url(server.url)
    assert store.revision() == 0


def test_without_it_redis_refuses(server, monkeypatch):
    monkeypatch.delenv("CCOE_REDIS_PASSWORD", raising=False)
    with pytest.raises(redis.AuthenticationError):
        redis_client(server.url).ping()


def test_a_password_in_the_url_wins(server, monkeypatch):
    monkeypatch.setenv("CCOE_REDIS_PASSWORD", "wrong")
    url = server.url.replace("redis://", f"redis://:{PASSWORD}@")
    assert redis_client(url, socket_timeout=2.0).ping()
