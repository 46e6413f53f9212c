"""Property-based fuzzing of every gRPC method over a real grpc.aio server (hypothesis).

The servicers are the app's own code in one process: RouterCore over a ReplicaRuntime (a real
engine on the tiny demo model) for ccoe.v1.Inference, and RegistryService over a real
redis-server and artifact store for ccoe.v1.Registry, registered with the same lenient
`add_*_servicer` functions Ray's proxy uses and glued the way the deployments glue them. For
GenerateRequest and every Registry request message, plus bytes that may not decode: no answer
is INTERNAL or UNKNOWN, none hangs, and the server still serves a plain request afterwards.

The CI budget is small (a few dozen examples); `ccoe bench fuzz --cases N` runs the long
version against the real Ray stack.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccoe_common.bench.fuzz import BAD, HANG, METHODS, Case, Options, call, fuzz, make_case, raw_bytes
from ccoe_common.model.demo_assets import demo_backbone, demo_experts
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.pb import registry_pb2 as rpb
from ccoe_common.ports import free_port
from ccoe_common.registry.artifact_store import ArtifactStore
from ccoe_common.registry.redis_server import RedisServer
from ccoe_common.registry.service import RegistryService, receive_upload
from ccoe_common.registry.store import RegistryStore, redis_client
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.grpc_servicers import add_inference_servicer, add_registry_servicer
from ccoe_common.serving.grpc_status import apply_error, metadata_of
from ccoe_common.serving.replica import ReplicaRuntime
from ccoe_common.serving.router_core import LocalReplicaClient, RouterCore

CALL_TIMEOUT_S = 60.0  # a generous bound: a call still open after it counts as a hang


class InProcessApp:
    """The Router and Registry deployments' glue without Ray: each RPC calls what theirs call
    and maps failures with the same apply_error."""

    def __init__(self, core: RouterCore, registry: RegistryService, artifacts: ArtifactStore):
        self.core, self.registry, self.artifacts = core, registry, artifacts

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        try:
            return await self.core.generate(request, metadata_of(context))
        except Exception as e:  # noqa: BLE001 - the gRPC edge
            apply_error(context, e)
            return pb.GenerateResponse()

    async def GenerateStream(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[Any]:
        try:
            async for message in self.core.generate_stream(request, metadata_of(context)):
                yield message
        except Exception as e:  # noqa: BLE001 - the gRPC edge; a plain server ends with the code set
            apply_error(context, e)

    async def _control(self, call_: Any, empty: Any, context: Any) -> Any:
        try:
            return await call_
        except Exception as e:  # noqa: BLE001 - the gRPC edge
            apply_error(context, e)
            return empty

    async def PushExpert(self, r, c):
        return await self._control(self.registry.push(r), rpb.PushExpertResponse(), c)

    async def UploadArtifact(self, chunks, c):
        return await self._control(receive_upload(self.artifacts, chunks, idle_timeout_s=10),
                                   rpb.UploadArtifactResponse(), c)

    async def PopExpert(self, r, c):
        return await self._control(self.registry.pop(r), rpb.PopExpertResponse(), c)

    async def ListExperts(self, r, c):
        return await self._control(self.registry.list(), rpb.ListExpertsResponse(), c)

    async def GetExpert(self, r, c):
        return await self._control(self.registry.get(r.name), rpb.ExpertInfo(), c)

    async def GetRules(self, r, c):
        return await self._control(self.registry.get_rules(), rpb.RulesResponse(), c)

    async def SetRules(self, r, c):
        return await self._control(self.registry.set_rules(r), rpb.RulesResponse(), c)

    async def StartRollout(self, r, c):
        return await self._control(self.registry.start_rollout(r), rpb.Rollout(), c)

    async def GetRollout(self, r, c):
        return await self._control(self.registry.get_rollout(r.expert), rpb.Rollout(), c)

    async def Rollback(self, r, c):
        return await self._control(self.registry.rollback(r), rpb.Rollout(), c)

    async def ReportReplicaState(self, r, c):
        return await self._control(self.registry.report(r), rpb.ReportReplicaStateResponse(), c)

    async def ListAudit(self, r, c):
        return await self._control(self.registry.audit(r.limit), rpb.ListAuditResponse(), c)

    async def WatchDesiredState(self, r, c):
        try:
            async for message in self.registry.watch(r.replica_id):
                yield message
        except Exception as e:  # noqa: BLE001 - the gRPC edge
            apply_error(c, e)


class Served:
    """The app on a grpc.aio server in a thread of its own (hypothesis drives a sync client)."""

    def __init__(self, config: AppConfig, redis_url: str):
        self.config, self.redis_url = config, redis_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.address = f"127.0.0.1:{free_port()}"
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(300)

    async def _start(self) -> None:
        self.runtime = ReplicaRuntime(self.config)
        core = RouterCore(self.config, LocalReplicaClient(self.runtime))
        artifacts = ArtifactStore.from_config(self.config.registry)

        async def validate(uri: str) -> None:
            reason = await asyncio.to_thread(self.runtime.validate, uri)
            if reason is not None:
                from ccoe_common.registry.errors import ArtifactRefused
                raise ArtifactRefused(f"{uri} does not fit this fleet's backbone: {reason}")

        registry = RegistryService(RegistryStore(redis_client(self.redis_url)), artifacts, validate,
                                   self.config.registry)
        await registry.seed(self.config.experts)
        self.follow = asyncio.ensure_future(registry.follow())
        self.server = grpc.aio.server()
        app = InProcessApp(core, registry, artifacts)
        add_inference_servicer(app, self.server)
        add_registry_servicer(app, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), self.server)
        self.server.add_insecure_port(self.address)
        await self.server.start()

    async def _stop(self) -> None:
        self.follow.cancel()
        await self.server.stop(None)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(60)
        self.runtime.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def served(work):
    uris = demo_experts(work)
    config = AppConfig.load({
        "backbone": str(demo_backbone(work)), "experts": [uris["math"], uris["sql"]],
        "rules_inline": {"rules": [{"id": "m", "match": {"domain": ["math"]}, "experts": ["math"]}]},
        # A short context keeps every generation short, whatever max_tokens a case asks for.
        "replica": {"engine": {"max_seq_len": 32, "max_running": 4, "max_waiting": 8, "max_batched_tokens": 64}},
        "registry": {"artifact_store": str(work / "store"), "allowed_sources": [str(work / "experts")],
                     "max_upload_bytes": 1 << 20},
    })
    with RedisServer() as redis_server:
        app = Served(config, redis_server.url)
        yield app
        app.stop()


@pytest.fixture(scope="module")
def channel(served):
    with grpc.insecure_channel(served.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def options(work) -> Options:
    law = str(work / "experts" / "law")
    return Options(hints={"uri": (law, f"file://{law}")})


class HypothesisDraw:
    """The generator's choices, drawn by hypothesis (so a failure shrinks to a small request)."""

    def __init__(self, data: st.DataObject):
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def choice(self, options):
        return self.data.draw(st.sampled_from(list(options)))

    def text(self, max_len: int) -> str:
        return self.data.draw(st.text(max_size=max_len))

    def blob(self, max_len: int) -> bytes:
        return self.data.draw(st.binary(max_size=max_len))


def check(channel: grpc.Channel, case: Case) -> None:
    outcome = call(channel, case, CALL_TIMEOUT_S)
    assert outcome.code not in (*BAD, HANG), f"{case.method.name} -> {outcome.code}: {outcome.details}"


FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@FUZZ
@given(data=st.data())
def test_no_request_of_any_method_gets_internal_unknown_or_a_hang(channel, options, data):
    method = data.draw(st.sampled_from(METHODS), label="method")
    check(channel, make_case(method, HypothesisDraw(data), options))


@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_bytes_that_may_not_decode_get_a_precise_status(channel, options, data):
    method = data.draw(st.sampled_from([m for m in METHODS if not m.client_streaming]), label="method")
    body = data.draw(st.one_of(st.binary(max_size=64), st.builds(raw_bytes, st.just(method.input_type),
                                                                  st.just(HypothesisDraw(data)), st.just(options))))
    check(channel, Case(method, (body,), raw=True))


def test_the_bench_runner_counts_every_answer_and_keeps_what_went_wrong(served, options):
    report, still_serving = fuzz(served.address, cases=30, seed=7, options=options, timeout_s=CALL_TIMEOUT_S)
    totals = report.totals()
    assert sum(totals.values()) == 30 and still_serving
    assert set(report.histogram) <= {m.name for m in METHODS}
    assert len(report.bad) == sum(totals[c] for c in (*BAD, HANG))  # each bad answer kept, with what was sent
    assert all({"method", "code", "details", "raw", "request"} <= set(b) for b in report.bad)


def test_every_method_is_fuzzed_and_the_server_still_serves_afterwards(channel):
    # Runs after the fuzz tests (file order): a plain request and the registry still answer.
    assert len(METHODS) == 15
    reply = pb.GenerateRequest(prompt="Compute 1 + 1", max_tokens=2)
    from ccoe_common.pb import inference_pb2_grpc, registry_pb2_grpc

    assert inference_pb2_grpc.InferenceStub(channel).Generate(reply, timeout=60).usage.completion_tokens > 0
    registry_pb2_grpc.RegistryStub(channel).ListExperts(rpb.ListExpertsRequest(), timeout=60)
