"""Fleet rollouts for real: two model replicas, the registry, Redis and gRPC (the local stack).

The registry's invariants under failure: a rollout under streaming load fails no request and
never mixes versions inside one response; bad artifacts never reach a replica's live set; a
replica killed mid-rollout and a Redis restarted mid-rollout leave the fleet converged.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest
import redis

from ccoe_common.model import CCoEModel
from ccoe_common.model.demo_assets import demo_backbone, demo_experts, nudge
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.pb import inference_pb2_grpc
from ccoe_common.ports import free_port
from ccoe_common.registry.client import RegistryClient, RolloutFailed, policy
from ccoe_common.registry.redis_server import RedisServer
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.local_stack import LocalStack

TTL_S = 2.0


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rollouts")


@pytest.fixture(scope="module")
def redis_server(work):
    # Our own Redis, with an append-only file, so a test can restart it in place.
    server = RedisServer(data_dir=work / "redis", persist=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(work, redis_server):
    uris = demo_experts(work)
    config = AppConfig.load({
        "backbone": str(demo_backbone(work)),
        "experts": [uris["math"]],
        "redis_url": redis_server.url,
        "replica": {"num_replicas": 2, "engine": {"max_seq_len": 256, "max_running": 4, "max_waiting": 32}},
        "auth": {"mode": "token"},
        "registry": {"artifact_store": str(work / "store"), "heartbeat_ttl_s": TTL_S,
                     "allowed_sources": [str(work)]},
    })
    with LocalStack(config, grpc_port=free_port(), http_port=free_port()) as st:
        yield st


@pytest.fixture(scope="module")
def model(work) -> CCoEModel:
    return CCoEModel.from_pretrained(demo_backbone(work))


@pytest.fixture(scope="module")
def registry(stack):
    with stack.registry_client(timeout_s=120) as client:
        yield client


@pytest.fixture(scope="module")
def stub(stack):
    channel = stack.inference_channel()
    yield inference_pb2_grpc.InferenceStub(channel)
    channel.close()


def math_version(model: CCoEModel, work: Path, version: int, *, nan: bool = False) -> str:
    uri = str(work / "math-versions" / f"v{version}")
    if not Path(uri, "manifest.json").exists():
        from ccoe_common.model.placement import Placement

        expert = nudge(model.carve("math", placement=Placement(strategy="GL"), version=version), seed=100 + version)
        if nan:  # loads and validates fine; only running it shows the weights are broken
            next(iter(expert.parameters())).data.fill_(float("nan"))
        expert.to_artifact(uri, model.info)
    return uri


def loaded_on(registry: RegistryClient, name: str, version: int) -> list[str]:
    return next(list(v.loaded_on) for v in registry.get(name).versions if v.version == version)


def serving(registry: RegistryClient, name: str) -> int:
    return next((e.serving for e in registry.list().experts if e.name == name), 0)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout_s}s")


class Load:
    """Clients streaming requests for `math` (by name) until stopped; records each response."""

    def __init__(self, stack: LocalStack, threads: int = 3):
        self.stack = stack
        self.responses: list[tuple[int, ...]] = []  # the expert version of every message
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        channel = self.stack.inference_channel()
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(prompt="Compute 3 + 4", expert=pb.ExpertRef(name="math"), max_tokens=6,
                                     sampling=pb.SamplingParams(ignore_eos=True))
        while not self._stop.is_set():
            try:
                versions = tuple(m.expert.version for m in stub.GenerateStream(request, timeout=120))
                self.responses.append(versions)
            except grpc.RpcError as e:
                self.failures.append(f"{e.code().name}: {e.details()}")
        channel.close()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        wait_for(lambda: len(self.responses) >= 3, 120, "the load's first responses")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)

    def check(self) -> set[int]:
        """Zero failures, one version per response; returns the versions seen."""
        assert self.failures == [], self.failures[:5]
        mixed = [r for r in self.responses if len(set(r)) != 1]
        assert mixed == [], f"{len(mixed)} responses mixed versions, e.g. {mixed[:3]}"
        return {r[0] for r in self.responses}


def test_config_experts_are_registered_and_served(registry, stub):
    info = registry.get("math")
    assert info.serving == 1 and [v.state for v in info.versions] == ["active"]
    wait_for(lambda: len(registry.get("math").versions[0].loaded_on) == 2, 60, "both replicas report math@1")
    r = stub.Generate(pb.GenerateRequest(prompt="1+1", expert=pb.ExpertRef(name="math"), max_tokens=2), timeout=60)
    assert [(e.name, e.version) for e in r.route.experts] == [("math", 1)]


def test_bad_artifacts_are_refused_before_any_replica(registry, stub, model, work, qwen2_dir):
    good = math_version(model, work, 2)
    cases = {}
    corrupt = work / "bad" / "corrupt"
    shutil.copytree(good, corrupt)
    weights = corrupt / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    cases["corrupt"] = (str(corrupt), "weights_sha256")
    missing = work / "bad" / "missing"
    shutil.copytree(good, missing)
    (missing / "weights.safetensors").unlink()
    cases["missing file"] = (str(missing), "weights.safetensors")
    other = CCoEModel.from_pretrained(qwen2_dir)
    foreign = str(work / "bad" / "foreign")
    other.carve("math", version=2).to_artifact(foreign, other.info)
    cases["wrong backbone"] = (foreign, "fingerprint")
    big = CCoEModel.from_pretrained(demo_backbone(work), budget_fraction=1.0)
    over = str(work / "bad" / "over-budget")
    big.carve("math", version=2).to_artifact(over, big.info)
    cases["over budget"] = (over, "15%")

    audit_before = len(registry.audit(limit=1000).entries)
    for label, (uri, named) in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            registry.push(uri, who="test")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (label, err.value.details())
        assert named in err.value.details(), (label, err.value.details())
    info = registry.get("math")
    assert (info.latest, info.serving) == (1, 1)  # nothing registered, the fleet serves v1
    assert len(registry.audit(limit=1000).entries) == audit_before
    r = stub.Generate(pb.GenerateRequest(prompt="1+1", expert=pb.ExpertRef(name="math"), max_tokens=2), timeout=60)
    assert r.route.experts[0].version == 1


def test_concurrent_pushes_one_wins_the_other_is_told_why(registry, stack, model, work):
    uris = [math_version(model, work, 2), math_version(model, work, 3)]
    rev = registry.get("math").revision
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def push(i: int) -> None:
        with stack.registry_client() as client:
            barrier.wait()
            try:
                results[i] = client.push(uris[i], who=f"ops{i}", expected_revision=rev, register_only=True)
            except grpc.RpcError as e:
                results[i] = e

    threads = [threading.Thread(target=push, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    wins = [r for r in results if not isinstance(r, grpc.RpcError)]
    assert len(wins) == 1 and len(errors) == 1
    assert errors[0].code() == grpc.StatusCode.ABORTED
    assert f"you sent revision {rev}, current is {rev + 1}" in errors[0].details()
    assert registry.get("math").latest == wins[0].expert.version


def test_rollout_under_streaming_load_fails_nothing_and_never_mixes(registry, stack, model, work):
    latest = registry.get("math").latest
    with Load(stack) as load:
        for version in (latest + 1, latest + 2):
            pushed = registry.push(math_version(model, work, version), who="test")
            done = registry.wait_rollout("math", pushed.rollout.id, timeout_s=180)
            assert done.state == "done" and {s.state for s in done.replicas} == {"ready"}
            before = len(load.responses)
            wait_for(lambda before=before: len(load.responses) > before + 3, 120, "responses after the rollout")
    seen = load.check()
    assert {1, latest + 1, latest + 2} <= seen | {1}
    assert latest + 2 in seen and latest + 1 in seen
    assert serving(registry, "math") == latest + 2
    # old versions leave every replica (drained, then freed)
    wait_for(lambda: all(v.loaded_on == [] for v in registry.get("math").versions if v.version <= latest + 1),
             30, "old versions freed on every replica")


def test_a_version_failing_its_smoke_test_rolls_back_by_itself(registry, stub, model, work):
    before = serving(registry, "math")
    version = registry.get("math").latest + 1
    pushed = registry.push(math_version(model, work, version, nan=True), who="test")
    with pytest.raises(RolloutFailed) as err:
        registry.wait_rollout("math", pushed.rollout.id, timeout_s=120)
    assert "logits are not finite" in err.value.rollout.reason and "replica" in err.value.rollout.reason
    info = registry.get("math")
    assert info.serving == before and info.versions[-1].state == "failed"
    r = stub.Generate(pb.GenerateRequest(prompt="1+1", expert=pb.ExpertRef(name="math"), max_tokens=2), timeout=60)
    assert r.route.experts[0].version == before
    whats = [e.what for e in registry.audit(limit=5).entries]
    assert "rollout_rolled_back" in whats


def test_manual_rollback_returns_the_fleet_to_the_previous_version(registry, stub):
    current = serving(registry, "math")
    last = registry.rollout("math")
    if last.state != "done":  # the smoke-test rollback left the last rollout rolled back
        previous = [v.version for v in registry.get("math").versions if v.state == "active" and v.version != current]
        started = registry.start_rollout("math", previous[-1], who="test")
        registry.wait_rollout("math", started.id, timeout_s=120)
        current, last = serving(registry, "math"), registry.rollout("math")
    back = registry.rollback("math", who="test", reason="bad answers reported")
    assert (back.from_version, back.to_version) == (current, last.from_version)
    registry.wait_rollout("math", back.id, timeout_s=120)
    assert serving(registry, "math") == last.from_version
    versions = {v.version: v.state for v in registry.get("math").versions}
    assert versions[current] == "rolled_back"
    # Routers follow the flip within moments (they hold both versions meanwhile).
    wait_for(lambda: stub.Generate(pb.GenerateRequest(prompt="1+1", expert=pb.ExpertRef(name="math"), max_tokens=2),
                                   timeout=60).route.experts[0].version == last.from_version,
             10, "requests resolve to the version rolled back to")


def _replica_actors() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if "ModelReplica" in a["name"])


def test_a_replica_killed_mid_rollout_the_rest_completes_and_a_replacement_converges(registry, stack, model, work):
    import ray

    victims = _replica_actors()
    assert len(victims) == 2
    version = registry.get("math").latest + 1
    # Canary with a hold: the rollout is still going when the replica dies.
    pushed = registry.push(math_version(model, work, version), who="test",
                           rollout=policy("canary", canary_replicas=1, max_unavailable=1, canary_wait_s=4.0))
    wait_for(lambda: any(s.state == "ready" for s in registry.rollout("math").replicas), 120, "the canary loads")
    ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
    done = registry.wait_rollout("math", pushed.rollout.id, timeout_s=180)
    assert done.state == "done" and serving(registry, "math") == version
    # Ray Serve starts a replacement; it converges from the full desired state.
    wait_for(lambda: len(loaded_on(registry, "math", version)) == 2, 180,
             "a replacement replica loads the serving version")
    assert victims[0] not in _replica_actors()


def test_redis_restarted_mid_rollout_resumes_without_half_written_state(registry, redis_server, stack, model, work):
    version = registry.get("math").latest + 1
    with Load(stack, threads=2) as load:
        pushed = registry.push(math_version(model, work, version), who="test",
                               rollout=policy("canary", canary_replicas=1, canary_wait_s=3.0))
        wait_for(lambda: registry.rollout("math").state in ("canary", "rolling"), 30, "the rollout starts")
        redis_server.stop()
        time.sleep(1.5)  # replicas keep serving what they hold; the registry answers UNAVAILABLE
        with pytest.raises(grpc.RpcError) as err:
            registry.list()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "Redis" in err.value.details()
        redis_server.start()
        done = wait_for(lambda: _rollout_finished(registry), 180, "the rollout finishes after Redis is back")
    assert done.id == pushed.rollout.id and done.state == "done"
    assert load.check()
    info = registry.get("math")
    assert (info.latest, info.serving) == (version, version)
    assert all(v.state in ("active", "retired", "failed", "rolled_back") for v in info.versions)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert int(client.hget("ccoe:expert:math", "latest")) == version


def _rollout_finished(registry: RegistryClient):
    try:
        r = registry.rollout("math")
    except grpc.RpcError:
        return None
    return r if r.state in ("done", "rolled_back") else None


def test_rules_set_in_the_registry_reach_every_router(registry, stub):
    table = "version: 7\nrules:\n  - id: sums\n    match: {keywords: [sum]}\n    experts: [math]\n"
    with pytest.raises(grpc.RpcError) as err:
        registry.set_rules(table.replace("[math]", "[medicine]"), who="test")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "medicine" in err.value.details()
    rev = registry.set_rules(table, who="test").revision
    assert registry.get_rules().revision == rev

    def routed() -> bool:
        r = stub.Generate(pb.GenerateRequest(prompt="the sum of 2 and 3", max_tokens=2), timeout=60)
        return r.route.rule_id == "sums" and r.route.experts[0].name == "math"

    wait_for(routed, 10, "the router applies the registry's rule table")


def test_a_restarted_registry_picks_up_where_it_left_off(registry, model, work):
    import ray

    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Registry#" in a["name"]]
    before = registry.get("math")
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    # Ray Serve starts a new Registry; its state is all in Redis, so nothing is lost.
    info = wait_for(lambda: _answer(lambda: registry.get("math")), 120, "the registry answers again")
    assert (info.latest, info.serving, info.revision) == (before.latest, before.serving, before.revision)
    version = info.latest + 1
    pushed = registry.push(math_version(model, work, version), who="test")
    registry.wait_rollout("math", pushed.rollout.id, timeout_s=180)
    # both replicas reconnected their desired-state streams to the new registry
    assert len(loaded_on(registry, "math", version)) == 2


def _answer(call):
    try:
        return call()
    except grpc.RpcError:
        return None
