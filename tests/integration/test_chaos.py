"""Chaos: faults injected while a new expert version rolls out under streaming load (issue #15).

Two model replicas, the registry, a Redis of the test's own (with an append-only file, so a
fault may restart it in place) and real gRPC clients that stream requests for `math` by name
the whole time, retrying what they are told they may retry, as a well-behaved app does. While
the rollout runs, each fault of FAULTS is injected in turn. Counted over every request:

- accepted requests that failed with a status a caller may not retry: target 0
  (UNAVAILABLE and RESOURCE_EXHAUSTED, each with retry-after-ms, are the retryable ones);
- responses that mixed two versions of the expert: target 0;

and the registry afterwards holds what it held before plus the version pushed (nothing lost).

A fault is a function of the running `Chaos` that injects it and says what it did; add one to
FAULTS to run it in the same rollout.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ccoe_common.model import CCoEModel
from ccoe_common.model.demo_assets import demo_backbone, demo_experts, nudge
from ccoe_common.model.placement import Placement
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.pb import inference_pb2_grpc
from ccoe_common.ports import free_port
from ccoe_common.registry.client import RegistryClient, policy
from ccoe_common.registry.redis_server import RedisServer
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.local_stack import LocalStack

pytestmark = pytest.mark.slow
RETRYABLE = {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}


@dataclass
class Chaos:
    stack: LocalStack
    registry: RegistryClient
    redis: RedisServer
    work: Path


Fault = Callable[[Chaos], str]


def kill_a_replica(chaos: Chaos) -> str:
    """ray.kill on one ModelReplica actor, as a crashed process or a lost node would end it."""
    import ray

    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "ModelReplica" in a["name"])
    assert len(names) == 2, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return f"killed {names[0]}"


def kill_and_restart_redis(chaos: Chaos) -> str:
    """SIGKILL to redis-server (no shutdown, no final fsync), down for a second, then started
    again on the same port from the same append-only file, as a crashed and rescheduled pod is."""
    proc = chaos.redis.proc
    assert proc is not None and proc.poll() is None, "redis-server is not running"
    proc.kill()
    proc.wait()
    time.sleep(1.0)  # the registry, routers and replicas see it gone while the rollout runs
    chaos.redis.start()
    return f"redis-server (pid {proc.pid}) killed, restarted after 1 s"


FAULTS: list[tuple[str, Fault]] = [
    ("redis killed and restarted", kill_and_restart_redis),
    ("replica killed", kill_a_replica),
]


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    work = tmp_path_factory.mktemp("chaos")
    uris = demo_experts(work)
    redis = RedisServer(data_dir=work / "redis", persist=True).start()
    config = AppConfig.load({
        "backbone": str(demo_backbone(work)),
        "experts": [uris["math"]],
        "redis_url": redis.url,
        "replica": {"num_replicas": 2, "engine": {"max_seq_len": 256, "max_running": 4, "max_waiting": 16}},
        "auth": {"mode": "token"},
        "registry": {"artifact_store": str(work / "store"), "heartbeat_ttl_s": 2.0, "allowed_sources": [str(work)]},
    })
    try:
        with (LocalStack(config, grpc_port=free_port(), http_port=free_port()) as stack,
              stack.registry_client(timeout_s=120) as registry):
            yield Chaos(stack, registry, redis, work)
    finally:
        redis.stop()


class Load:
    """Clients streaming `math` requests until stopped; each call's outcome is recorded."""

    def __init__(self, stack: LocalStack, threads: int = 3):
        self.stack = stack
        self.versions: list[tuple[int, ...]] = []  # per completed response: the version of each message
        self.retryable: list[tuple[str, bool, dict]] = []  # code, whether it had streamed, its trailer
        self.non_retryable: list[str] = []  # accepted and failed for good: the bug this test hunts
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        channel = self.stack.inference_channel()
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(prompt="Compute 3 + 4", expert=pb.ExpertRef(name="math"), max_tokens=24,
                                     sampling=pb.SamplingParams(ignore_eos=True))
        while not self._stop.is_set():
            seen: list[int] = []
            try:
                for m in stub.GenerateStream(request, timeout=120):
                    seen.append(m.expert.version)
                self.versions.append(tuple(seen))
            except grpc.RpcError as e:
                if e.code().name in RETRYABLE:
                    self.retryable.append((e.code().name, bool(seen), dict(e.trailing_metadata() or ())))
                    time.sleep(0.05)
                else:
                    self.non_retryable.append(f"{e.code().name} after {len(seen)} messages: {e.details()}")
        channel.close()

    def wait_for_more(self, n: int, timeout_s: float = 120) -> None:
        target = len(self.versions) + n
        deadline = time.monotonic() + timeout_s
        while len(self.versions) < target:
            assert time.monotonic() < deadline, f"the load did not complete {n} more responses"
            time.sleep(0.05)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        self.wait_for_more(3)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)


def new_math_version(chaos: Chaos, version: int) -> str:
    uri = str(chaos.work / "math-versions" / f"v{version}")
    model = CCoEModel.from_pretrained(demo_backbone(chaos.work))
    nudge(model.carve("math", placement=Placement(strategy="GL"), version=version), seed=200 + version) \
        .to_artifact(uri, model.info)
    return uri


def test_faults_during_a_rollout_under_load_fail_no_accepted_request_and_never_mix_versions(chaos):
    registry = chaos.registry
    before = registry.get("math")
    experts_before = sorted(e.name for e in registry.list().experts)
    rules_before = registry.get_rules().revision
    version = before.latest + 1
    uri = new_math_version(chaos, version)
    started = time.monotonic()
    injected = []
    with Load(chaos.stack) as load:
        # A canary with a hold, so every fault lands while the rollout is still going.
        pushed = registry.push(uri, who="chaos", rollout=policy("canary", canary_replicas=1, max_unavailable=1,
                                                                canary_wait_s=10.0))
        for label, fault in FAULTS:
            deadline = time.monotonic() + 60
            while registry.rollout("math").state not in ("canary", "rolling"):
                assert time.monotonic() < deadline, "the rollout never started"
                time.sleep(0.05)
            injected.append(f"{label}: {fault(chaos)} (rollout {registry.rollout('math').state})")
            load.wait_for_more(3)
        done = registry.wait_rollout("math", pushed.rollout.id, timeout_s=180)
        load.wait_for_more(3)
    elapsed = time.monotonic() - started

    mixed = [v for v in load.versions if len(set(v)) != 1]
    codes = Counter(code for code, _, _ in load.retryable)
    print(f"\nchaos: {'; '.join(injected)}; rollout math@{before.serving} -> @{version} {done.state} in "
          f"{elapsed:.1f} s under load: {len(load.versions)} responses completed "
          f"(versions {sorted(Counter(v[0] for v in load.versions).items())}), "
          f"{len(load.non_retryable)} accepted requests failed with a non-retryable status, {len(mixed)} mixed "
          f"versions, {len(load.retryable)} retryable refusals {dict(codes)} "
          f"({sum(s for _, s, _ in load.retryable)} of them after streaming)")
    assert load.non_retryable == [], load.non_retryable[:5]
    assert mixed == [], mixed[:3]
    assert all(float(trailer.get("retry-after-ms", "nan")) > 0 for _, _, trailer in load.retryable), load.retryable
    assert done.state == "done" and registry.get("math").serving == version
    # Nothing lost: the registry holds what it held before, plus the version pushed.
    after = registry.get("math")
    assert [v.version for v in after.versions] == [v.version for v in before.versions] + [version]
    assert sorted(e.name for e in registry.list().experts) == experts_before
    assert registry.get_rules().revision == rules_before
    assert {v[0] for v in load.versions} >= {version}
