"""Registry durability and fail static, for real: the local stack's own redis-server (with its
append-only file and watchdog), two model replicas, the registry and routers over gRPC.

- Redis killed: the stack restarts it on the same port and dir, and its state is what it was.
- Redis restored from an older copy (revision backwards): routers and replicas keep serving,
  say so in the health answer, and follow again once the newer copy is back.
- Redis emptied (FLUSHALL) or restarted without its data: expert-routed requests keep
  succeeding (no NOT_FOUND), and the registry re-registers the config's experts; the fleet
  converges on them.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ccoe_common.model import CCoEModel
from ccoe_common.model.demo_assets import demo_backbone, demo_experts, nudge
from ccoe_common.model.placement import Placement
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.pb import inference_pb2_grpc
from ccoe_common.ports import free_port
from ccoe_common.registry.client import RegistryClient
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.local_stack import LocalStack

RULES = "version: 3\nrules:\n  - id: sums\n    match: {keywords: [sum]}\n    experts: [math]\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("durability")


@pytest.fixture(scope="module")
def stack(work):
    uris = demo_experts(work)
    config = AppConfig.load({
        "backbone": str(demo_backbone(work)),
        "experts": [uris["math"]],
        "replica": {"num_replicas": 2, "engine": {"max_seq_len": 256, "max_running": 4, "max_waiting": 32}},
        "auth": {"mode": "token"},
        "registry": {"heartbeat_ttl_s": 2.0, "allowed_sources": [str(work)]},
    })  # no redis_url: the stack runs its own Redis, as `ccoe serve` does
    with LocalStack(config, grpc_port=free_port(), http_port=free_port()) as st:
        yield st


@pytest.fixture(scope="module")
def registry(stack):
    with stack.registry_client(timeout_s=120) as client:
        yield client


@pytest.fixture(scope="module")
def db(stack):
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True, socket_timeout=5)
    yield client
    client.close()


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (grpc.RpcError, redis.ConnectionError):
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout_s}s")


def registry_state(db: redis.Redis) -> dict[str, object]:
    """Every registry key and its value, replica heartbeats (TTL'd reports) left out."""
    out: dict[str, object] = {}
    for key in sorted(db.scan_iter(match="ccoe:*")):
        if key.startswith("ccoe:replica:"):
            continue
        kind = db.type(key)
        if kind == "string":
            out[key] = db.get(key)
        elif kind == "hash":
            out[key] = db.hgetall(key)
        elif kind == "set":
            out[key] = sorted(db.smembers(key))
        elif kind == "stream":
            out[key] = db.xrange(key)
        else:
            raise AssertionError(f"unexpected {kind} key {key}")
    return out


class Load:
    """Clients streaming requests for `math` by name until stopped; every failure is kept."""

    def __init__(self, stack: LocalStack, threads: int = 2):
        self.stack = stack
        self.versions: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        channel = self.stack.inference_channel()
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(prompt="Compute 3 + 4", expert=pb.ExpertRef(name="math"), max_tokens=4,
                                     sampling=pb.SamplingParams(ignore_eos=True))
        while not self._stop.is_set():
            try:
                self.versions.extend({m.expert.version for m in stub.GenerateStream(request, timeout=120)})
            except grpc.RpcError as e:
                self.failures.append(f"{e.code().name}: {e.details()}")
        channel.close()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        wait_for(lambda: len(self.versions) >= 2, 120, "the load's first responses")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)


def control_plane(stack: LocalStack) -> str:
    """The router's health answer's `ccoe-control-plane` trailer ("following" / "holding: ...")."""
    channel = stack.inference_channel()
    try:
        response, call = health_pb2_grpc.HealthStub(channel).Check.with_call(health_pb2.HealthCheckRequest(),
                                                                               timeout=30)
        assert response.status == health_pb2.HealthCheckResponse.SERVING  # fail static: still serving
        return dict(call.trailing_metadata() or ())["ccoe-control-plane"]
    finally:
        channel.close()


def metric_total(stack: LocalStack, name: str, **labels: str) -> float:
    body = urllib.request.urlopen(stack.metrics_url, timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(f"ray_{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def math_version(work: Path, version: int) -> str:
    uri = str(work / "math-versions" / f"v{version}")
    if not Path(uri, "manifest.json").exists():
        model = CCoEModel.from_pretrained(demo_backbone(work))
        nudge(model.carve("math", placement=Placement(strategy="GL"), version=version),
              seed=200 + version).to_artifact(uri, model.info)
    return uri


def serving(registry: RegistryClient) -> dict[str, int]:
    return {e.name: e.serving for e in registry.list().experts}


def kill_redis(stack: LocalStack) -> None:
    assert stack.redis is not None and stack.redis.proc is not None
    os.kill(stack.redis.proc.pid, signal.SIGKILL)


def wait_restarted(stack: LocalStack, db: redis.Redis, restarts: int) -> None:
    wait_for(lambda: stack.redis_restarts >= restarts and db.ping(), 30, f"redis-server restart {restarts}")


def test_the_stack_runs_redis_with_an_append_only_file(stack, db):
    assert db.config_get("appendonly") == {"appendonly": "yes"}
    assert db.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert db.config_get("dir")["dir"] == str(stack.redis.data_dir)


def test_redis_killed_is_restarted_in_place_and_loses_nothing(stack, registry, db, work):
    pushed = registry.push(math_version(work, 2), who="test")
    registry.wait_rollout("math", pushed.rollout.id, timeout_s=180)
    registry.set_rules(RULES, who="test")
    wait_for(lambda: control_plane(stack) == "following", 10, "the router follows the registry")
    before = registry_state(db)
    assert before["ccoe:desired"] == {"math": "2"} and before["ccoe:epoch"]
    with Load(stack) as load:
        kill_redis(stack)
        wait_restarted(stack, db, 1)
        time.sleep(1.0)  # requests keep flowing across the restart
    after = registry_state(db)
    assert after == before  # experts, versions, desired state, rollouts, rules, audit, epoch, revision
    assert load.failures == []
    assert set(load.versions) == {2}
    assert registry.get_rules().revision == int(before["ccoe:rules"]["rev"])
    assert control_plane(stack) == "following"


def _snapshot_aof(data_dir: Path, into: Path) -> None:
    shutil.rmtree(into, ignore_errors=True)
    shutil.copytree(data_dir, into)


def _restore_aof(snapshot: Path, data_dir: Path) -> None:
    """Put the snapshot's files in place under a running redis-server (it keeps writing to the
    files it has open, which are unlinked): its next start reads the snapshot."""
    for path in list(data_dir.rglob("*")):
        if path.is_file():
            path.unlink()
    for src in snapshot.rglob("*"):
        dest = data_dir / src.relative_to(snapshot)
        if src.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        else:
            shutil.copy2(src, dest)


def test_an_older_copy_of_redis_is_held_back_until_the_newer_one_is_back(stack, registry, db, work):
    data_dir = stack.redis.data_dir
    time.sleep(1.5)  # everysec: the file on disk holds every write
    _snapshot_aof(data_dir, work / "aof-old")
    registry.set_rules(RULES.replace("version: 3", "version: 4"), who="test")
    applied_rev = int(db.get("ccoe:rev"))
    time.sleep(1.5)
    _snapshot_aof(data_dir, work / "aof-new")
    wait_for(lambda: control_plane(stack) == "following", 10, "the router applies the newer revision")
    regressions = metric_total(stack, "ccoe_registry_regressions_total", component="router")
    restarts = stack.redis_restarts
    with Load(stack) as load:
        _restore_aof(work / "aof-old", data_dir)
        kill_redis(stack)
        wait_restarted(stack, db, restarts + 1)
        assert int(db.get("ccoe:rev")) < applied_rev  # the older copy is what Redis serves now
        held = wait_for(lambda: (lambda s: s if s.startswith("holding") else None)(control_plane(stack)), 30,
                        "the router holds back the older revision")
        assert "revision went backwards" in held and f"older than r{applied_rev}" in held
        time.sleep(1.0)  # serving goes on meanwhile
        # Ops put the newer copy back: the registry is consistent again and is followed.
        _restore_aof(work / "aof-new", data_dir)
        kill_redis(stack)
        wait_restarted(stack, db, restarts + 2)
        wait_for(lambda: control_plane(stack) == "following", 30, "the router follows again")
    assert load.failures == []
    assert int(db.get("ccoe:rev")) >= applied_rev
    wait_for(lambda: metric_total(stack, "ccoe_registry_regressions_total", component="router") > regressions,
             30, "the router's regression is counted")
    wait_for(lambda: metric_total(stack, "ccoe_registry_regressions_total", component="replica") >= 1, 30,
             "the replicas' regressions are counted")


@pytest.mark.parametrize("how", ["flushall", "restart-without-data"])
def test_an_emptied_redis_never_stops_serving_and_the_config_is_registered_again(stack, registry, db, work, how):
    wait_for(lambda: control_plane(stack) == "following", 10, "the router follows the registry")
    epoch = db.get("ccoe:epoch")
    reinitialized = metric_total(stack, "ccoe_registry_reinitialized_total")
    restarts = stack.redis_restarts
    with Load(stack, threads=3) as load:
        served_before = len(load.versions)
        if how == "flushall":
            db.flushall()
        else:
            for path in list(stack.redis.data_dir.rglob("*")):
                if path.is_file():
                    path.unlink()
            kill_redis(stack)
            wait_restarted(stack, db, restarts + 1)
        # The registry finds its store empty, gives it a new epoch and rolls the config's math@1
        # out again; serving flips back to it once both replicas hold it.
        wait_for(lambda: serving(registry) == {"math": 1}, 120, "math@1 is served again")
        wait_for(lambda: control_plane(stack) == "following", 30, "the router follows the new epoch")
        wait_for(lambda: load.versions[-6:] == [1] * 6, 60, "requests are answered by math@1")
    assert load.failures == []  # not one NOT_FOUND (nor anything else) while the store was empty
    assert len(load.versions) > served_before
    assert db.get("ccoe:epoch") not in (None, epoch)
    audit = [e.what for e in registry.audit(limit=100).entries]
    assert audit[-2:] == ["push", "store_initialized"] and "rollout_done" in audit
    wait_for(lambda: metric_total(stack, "ccoe_registry_reinitialized_total") == reinitialized + 1, 30,
             "the re-initialisation is counted")
