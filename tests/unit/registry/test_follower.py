"""A replica's follower on a real engine and real artifacts: what it reports while it loads.

The registry counts a replica ready for a version as soon as a report lists it, so a version
must not be listed before its smoke test passed, nor serve anyone but its smoke test. The
heartbeat and client requests run beside the load, so here a report is sent and a client request
tried from inside the smoke test, where they could land.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ccoe_common.engine.engine import Engine, EngineConfig
from ccoe_common.engine.params import GenerationRequest, SamplingParams
from ccoe_common.errors import ExpertNotReady
from ccoe_common.experts.reference import ExpertKey
from ccoe_common.model import CCoEModel, Placement
from ccoe_common.pb import registry_pb2 as pb
from ccoe_common.registry.config import RegistryConfig
from ccoe_common.registry.follower import ReplicaFollower
from tests.helpers import nudge


@pytest.fixture()
def model(qwen2_dir) -> CCoEModel:
    return CCoEModel.from_pretrained(qwen2_dir)


def artifact(model: CCoEModel, root: Path, version: int, *, nan: bool = False) -> str:
    expert = nudge(model.carve("math", placement=Placement(num_layers=1), version=version), version)
    if nan:
        next(iter(expert.parameters())).data.fill_(float("nan"))
    uri = str(root / f"math-v{version}")
    expert.to_artifact(uri, model.info)
    return uri


def listed(state: pb.ReplicaState) -> set[ExpertKey]:
    return {ExpertKey(v.name, v.version) for v in state.loaded}


async def follow(engine: Engine, load: dict[ExpertKey, str]) -> tuple[ReplicaFollower, list[pb.ReplicaState],
                                                                        list[pb.ReplicaState], list[str]]:
    """Apply one desired state; returns the follower, the reports sent mid-smoke-test, all
    reports, and what a client pinning the version was told mid-test."""
    reports: list[pb.ReplicaState] = []
    mid_test: list[pb.ReplicaState] = []
    refusals: list[str] = []

    async def report(state: pb.ReplicaState) -> None:
        reports.append(state)

    async def watch(replica_id: str):  # never consulted by apply()
        raise AssertionError("apply() must not watch")
        yield

    follower = ReplicaFollower(engine, "r1", watch, report, RegistryConfig(smoke_tokens=2))
    real_smoke_test = follower.smoke_test

    async def smoke_test_with_heartbeat(key: ExpertKey) -> None:
        await follower.report()  # what a heartbeat landing now would send
        mid_test.append(reports[-1])
        try:
            await engine.complete(GenerationRequest(prompt="1+1=", expert=key, sampling=SamplingParams.create(
                max_new_tokens=1)))
        except ExpertNotReady as e:
            refusals.append(str(e))
        await real_smoke_test(key)

    follower.smoke_test = smoke_test_with_heartbeat
    msg = pb.DesiredState(revision=7, load=[pb.DesiredVersion(name=k.name, version=k.version, uri=u)
                                            for k, u in load.items()])
    await follower.apply(msg)
    return follower, mid_test, reports, refusals


def test_a_version_is_reported_only_after_its_smoke_test_passed(model, tmp_path):
    good = ExpertKey("math", 2)
    with Engine(model, EngineConfig(max_seq_len=64, max_running=2)) as engine:
        follower, mid_test, reports, refusals = asyncio.run(follow(engine, {good: artifact(model, tmp_path, 2)}))
        assert len(mid_test) == 1 and good not in listed(mid_test[0])
        assert len(refusals) == 1 and "math@2 is still being smoke-tested here" in refusals[0]
        assert good in listed(reports[-1]) and reports[-1].seen_revision == 7
        assert follower.failures == {} and engine.stats().staged == []
        served = engine.complete_sync(GenerationRequest(prompt="1+1=", expert="math",
                                                        sampling=SamplingParams.create(max_new_tokens=1)), timeout=30)
        assert served.expert == good  # admitted once its smoke test passed


def test_a_version_failing_its_smoke_test_is_never_reported_and_is_freed(model, tmp_path):
    bad = ExpertKey("math", 3)
    with Engine(model, EngineConfig(max_seq_len=64, max_running=2)) as engine:
        follower, mid_test, reports, refusals = asyncio.run(
            follow(engine, {bad: artifact(model, tmp_path, 3, nan=True)}))
        assert len(mid_test) == 1 and len(refusals) == 1
        assert all(bad not in listed(r) for r in reports)
        assert "logits are not finite" in follower.failures[bad]
        assert [(f.name, f.version) for f in reports[-1].failures] == [("math", 3)]
        deadline = time.monotonic() + 10  # the failed version drains, then is freed
        while bad in engine.model.resident() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bad not in engine.model.resident(), f"{bad} still resident after its smoke test failed"


def test_a_replica_holding_fail_static_frees_nothing_and_still_loads(model, tmp_path):
    v2, v3 = ExpertKey("math", 2), ExpertKey("math", 3)
    uris = {v2: artifact(model, tmp_path, 2), v3: artifact(model, tmp_path, 3)}
    reports: list[pb.ReplicaState] = []

    async def report(state: pb.ReplicaState) -> None:
        reports.append(state)

    async def watch(replica_id: str):  # never consulted by apply()
        raise AssertionError("apply() must not watch")
        yield

    def state(epoch: str, revision: int, serving: dict[str, int], *load: ExpertKey) -> pb.DesiredState:
        return pb.DesiredState(epoch=epoch, revision=revision, serving=serving, load=[
            pb.DesiredVersion(name=k.name, version=k.version, uri=uris[k]) for k in load])

    async def run(follower: ReplicaFollower) -> None:
        await follower.apply(state("e1", 7, {"math": 2}, v2))
        assert follower.held() == {v2} and not follower.fail_static.holding
        # Redis restarted empty: nothing wanted any more; with no grace, math@2 would go now.
        await follower.apply(state("", 0, {}))
        assert follower.fail_static.holding and "store is empty" in follower.fail_static.reason
        follower._retire_unwanted()  # what the heartbeat does between messages
        assert follower.held() == {v2}
        # Re-initialised, re-registering math@3: it is loaded beside math@2, which stays.
        await follower.apply(state("e2", 2, {}, v3))
        assert follower.held() == {v2, v3} and follower.fail_static.holding
        assert reports[-1].seen_revision == 7  # still reports the view it follows
        # Consistent again: math@3 serves, math@2 is no longer wanted and drains away.
        await follower.apply(state("e2", 3, {"math": 3}, v3))
        assert not follower.fail_static.holding and reports[-1].seen_revision == 3

    with Engine(model, EngineConfig(max_seq_len=64, max_running=2)) as engine:
        follower = ReplicaFollower(engine, "r1", watch, report, RegistryConfig(smoke_tokens=1, retire_grace_s=0))
        asyncio.run(run(follower))
        deadline = time.monotonic() + 10
        while v2 in engine.model.resident() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(engine.model.resident()) == {v3}
