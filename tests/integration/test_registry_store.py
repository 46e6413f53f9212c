"""Registry state in a real redis-server: atomic compare-and-set changes, audit, heartbeats."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from ccoe_common.errors import ExpertNotFound
from ccoe_common.registry.redis_server import RedisServer
from ccoe_common.registry.store import RegistryStore, RevisionConflict, StaleVersion


@pytest.fixture(scope="module")
def server():
    with RedisServer() as s:
        yield s


@pytest.fixture()
def store(server):
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.flushdb()
    return RegistryStore(client)


def manifest(name: str, version: int) -> dict:
    return {"name": name, "version": version, "weights_sha256": f"{version:064x}"}


def test_push_read_and_desired_state(store):
    assert store.revision() == 0
    assert store.push_version("math", 1, manifest("math", 1), "file:///a/math/1", expected_rev=0, who="ops") == 1
    assert store.push_version("math", 2, manifest("math", 2), "file:///a/math/2", expected_rev=1, who="ops") == 2
    rec = store.expert("math")
    assert (rec.rev, rec.latest, rec.desired) == (2, 2, 2)
    assert [(v.version, v.state, v.uri) for v in rec.versions] == [(1, "active", "file:///a/math/1"),
                                                                   (2, "active", "file:///a/math/2")]
    assert rec.versions[1].manifest == manifest("math", 2)
    state = store.desired_state()
    assert state.experts == {"math": 2} and state.rev == 2
    assert store.revision() == state.rev  # what the registry's follower polls
    assert store.names() == ["math"]


def test_conflicting_writes_write_nothing(store):
    store.push_version("law", 1, manifest("law", 1), "u1", expected_rev=0, who="a")
    before = (store.expert("law"), store.desired_state(), len(store.audit()))
    with pytest.raises(RevisionConflict) as err:
        store.push_version("law", 2, manifest("law", 2), "u2", expected_rev=0, who="b")
    assert err.value.current == 1 and err.value.code == "ABORTED" and "current is 1" in str(err.value)
    with pytest.raises(StaleVersion, match="version 1 is not newer than the registered 1; push version 2"):
        store.push_version("law", 1, manifest("law", 1), "u1", expected_rev=1, who="b")
    assert (store.expert("law"), store.desired_state(), len(store.audit())) == before


def test_concurrent_pushes_exactly_one_wins(store, server):
    store.push_version("sql", 1, manifest("sql", 1), "u1", expected_rev=0, who="ops")
    results: list = []
    barrier = threading.Barrier(8)

    def push(i: int) -> None:
        own = RegistryStore(redis.Redis.from_url(server.url, decode_responses=True))
        barrier.wait()
        try:
            results.append(("ok", own.push_version("sql", 2, manifest("sql", 2), f"u2-{i}", expected_rev=1,
                                                   who=f"writer-{i}")))
        except RevisionConflict as e:
            results.append(("conflict", e.current))

    threads = [threading.Thread(target=push, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[0] for r in results) == ["conflict"] * 7 + ["ok"]
    assert all(r[1] == 2 for r in results)  # the winner's new revision; losers are told it
    winner = store.audit(limit=1)[0]
    assert store.expert("sql").versions[1].uri == f"u2-{winner.who.split('-')[1]}"


def test_retire_drops_desired_atomically(store):
    store.push_version("med", 1, manifest("med", 1), "u1", expected_rev=0, who="ops")
    store.push_version("med", 2, manifest("med", 2), "u2", expected_rev=1, who="ops")
    assert store.retire("med", [2], expected_rev=2, who="ops") == 3
    rec = store.expert("med")
    assert [v.state for v in rec.versions] == ["active", "retired"] and rec.desired is None
    assert "med" not in store.desired_state().experts
    with pytest.raises(ExpertNotFound, match="no version 7"):
        store.retire("med", [7], expected_rev=3, who="ops")
    with pytest.raises(ExpertNotFound):
        store.expert("ghost")


def test_rules_are_versioned_with_cas(store):
    assert store.rules() == (0, None)
    assert store.set_rules({"rules": []}, expected_rev=0, who="ops") == 1
    with pytest.raises(RevisionConflict):
        store.set_rules({"rules": [{"id": "x"}]}, expected_rev=0, who="other")
    assert store.rules() == (1, {"rules": []}) and store.desired_state().rules_rev == 1


def test_audit_is_append_only_who_what_when(store):
    t0 = int(time.time() * 1000)
    store.push_version("a", 1, manifest("a", 1), "u", expected_rev=0, who="alice")
    store.set_rules({"rules": []}, expected_rev=0, who="bob")
    store.retire("a", [1], expected_rev=1, who="carol")
    entries = store.audit()
    assert [(e.who, e.what) for e in entries] == [("carol", "retire"), ("bob", "set_rules"), ("alice", "push")]
    assert [e.rev for e in entries] == [3, 2, 1]
    assert entries[2].detail == {"expert": "a", "version": 1, "uri": "u"}
    assert all(e.at_ms >= t0 - 1000 for e in entries)


def test_changes_are_published_with_the_new_revision(store, server):
    sub = redis.Redis.from_url(server.url, decode_responses=True).pubsub()
    sub.subscribe("ccoe:changes")
    sub.get_message(timeout=1)  # the subscribe confirmation
    store.push_version("b", 1, manifest("b", 1), "u", expected_rev=0, who="ops")
    msg = sub.get_message(timeout=2)
    assert msg and msg["type"] == "message" and int(msg["data"]) == store.desired_state().rev
    sub.close()


def test_heartbeats_expire(store):
    store.heartbeat("replica-a", {"loaded": ["math@1"]}, ttl_s=0.3)
    store.heartbeat("replica-b", {"loaded": []}, ttl_s=30)
    assert store.replicas() == {"replica-a": {"loaded": ["math@1"]}, "replica-b": {"loaded": []}}
    time.sleep(0.45)
    assert store.replicas() == {"replica-b": {"loaded": []}}


def test_state_survives_a_redis_restart(tmp_path):
    with RedisServer(data_dir=tmp_path, persist=True) as first:
        s = RegistryStore.from_url(first.url)
        s.push_version("math", 1, manifest("math", 1), "u", expected_rev=0, who="ops")
        port = first.port
    with RedisServer(port=port, data_dir=tmp_path, persist=True) as second:
        s = RegistryStore.from_url(second.url)
        assert s.expert("math").latest == 1 and s.desired_state().experts == {"math": 1}
        assert s.push_version("math", 2, manifest("math", 2), "u2", expected_rev=1, who="ops") == 2
