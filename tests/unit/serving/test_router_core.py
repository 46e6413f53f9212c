"""Router core + replica runtime in one process: traces in memory, metrics in a registry.

(The same code behind real Ray and gRPC is tested in tests/integration/test_services.py.)
"""

from __future__ import annotations

import asyncio
import sys

import pytest
import torch

from ccoe_common.engine.errors import Overloaded
from ccoe_common.engine.params import GenerationRequest, Timings, Usage
from ccoe_common.experts.reference import ExpertKey
from ccoe_common.model.demo_assets import demo_backbone, demo_experts
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.events import DeltaEvent, ErrorEvent, Event, ServingError
from ccoe_common.serving.replica import ReplicaRuntime
from ccoe_common.serving.router_core import LocalReplicaClient, RouterCore
from ccoe_common.telemetry import tracing


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    work = tmp_path_factory.mktemp("core")
    uris = demo_experts(work)
    config = AppConfig.load({
        "backbone": str(demo_backbone(work)),
        "experts": [uris["math"], uris["sql"]],
        "rules_inline": {"rules": [{"id": "m", "match": {"domain": ["math"]}, "experts": ["math"]}]},
        "telemetry": {"tracing": "memory"},
        # A thread count unlike this process's, so that applying it would show.
        "replica": {"torch_threads": torch.get_num_threads() + 1,
                    "engine": {"max_seq_len": 128, "max_running": 4, "max_batched_tokens": 64}},
    })
    threads, switch = torch.get_num_threads(), sys.getswitchinterval()
    runtime = ReplicaRuntime(config)
    # Process-wide tuning is the replica actor's call (tune_process), not a side effect of
    # building a runtime in someone else's process.
    assert (torch.get_num_threads(), sys.getswitchinterval()) == (threads, switch)
    yield RouterCore(config, LocalReplicaClient(runtime)), runtime
    runtime.close()


def greedy(prompt: str, n: int, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, max_tokens=n, sampling=pb.SamplingParams(ignore_eos=True), **kw)


def test_one_trace_from_caller_through_router_replica_and_engine(core):
    router, _ = core
    tracing.MEMORY_EXPORTER.clear()
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    caller = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
    asyncio.run(router.generate(greedy("Compute 2 + 2", 3, domain="math"), caller))
    spans = {s.name: s for s in tracing.MEMORY_EXPORTER.get_finished_spans()}
    assert {"router.Generate", "router.route", "replica.generate", "engine.queue", "engine.prefill",
            "engine.decode"} <= set(spans)
    assert {format(s.context.trace_id, "032x") for s in spans.values()} == {trace_id}
    assert spans["router.Generate"].parent.span_id == 0xB7AD6B7169203331
    assert spans["replica.generate"].parent.span_id == spans["router.Generate"].context.span_id
    assert spans["engine.decode"].parent.span_id == spans["replica.generate"].context.span_id
    assert spans["replica.generate"].attributes["expert_version"] == "math@1"
    assert spans["router.route"].attributes["route.rule_id"] == "m"


def test_metrics_count_requests_tokens_and_latencies(core):
    router, runtime = core
    before = runtime.metrics.render()
    asyncio.run(router.generate(greedy("Compute 2 + 2", 5, expert=pb.ExpertRef(name="sql")), {}))
    with pytest.raises(ServingError):
        asyncio.run(router.generate(greedy("x", 2, expert=pb.ExpertRef(name="nope")), {}))
    text = runtime.metrics.render()

    def value(line_start: str, body: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(line_start))

    assert value('ccoe_requests_total{code="OK",expert="sql@1"}', text) == \
        value('ccoe_requests_total{code="OK",expert="sql@1"}', before) + 1
    assert value('ccoe_requests_total{code="NOT_FOUND",expert="nope"}', text) >= 1
    assert value('ccoe_generated_tokens_total{expert="sql@1"}', text) - \
        value('ccoe_generated_tokens_total{expert="sql@1"}', before) == 5
    assert value('ccoe_inter_token_latency_seconds_count{expert="sql@1"}', text) - \
        value('ccoe_inter_token_latency_seconds_count{expert="sql@1"}', before) == 4
    assert value('ccoe_ttft_seconds_count{expert="sql@1"}', text) >= 1
    assert value("ccoe_resident_experts ", text) == 2
    assert value('ccoe_resident_expert_bytes{expert="math@1"}', text) > 0
    assert value("ccoe_queue_depth ", text) == 0 and value("ccoe_kv_cache_bytes ", text) > 0
    router_text = router.metrics.render()
    assert value('ccoe_router_requests_total{code="NOT_FOUND",policy="none"}', router_text) >= 1
    assert value('ccoe_router_requests_total{code="OK",policy="explicit"}', router_text) >= 1


class ScriptedReplica:
    """A replica that answers every request with the same events, as ReplicaRuntime.stream would."""

    def __init__(self, events: list[Event]):
        self.events = events

    async def stream(self, request: GenerationRequest, carrier: dict[str, str]):
        for event in self.events:
            yield event


SCRIPT = [
    DeltaEvent(token_ids=[17], text="4", logprobs=[-0.25], expert=ExpertKey("math", 2)),
    DeltaEvent(token_ids=[2], text="2", logprobs=[-1.5], finish_reason="length", expert=ExpertKey("math", 2),
               usage=Usage(prompt_tokens=9, completion_tokens=2), timings=Timings(queue_s=0.001, ttft_s=0.02,
                                                                                 total_s=0.05)),
]


def test_the_router_builds_its_answer_from_the_replicas_typed_events(core):
    router = RouterCore(core[0].config, ScriptedReplica(SCRIPT))
    request = greedy("Compute 2 + 2", 2, expert=pb.ExpertRef(name="math"))
    response = asyncio.run(router.generate(request, {}))
    assert (response.text, list(response.token_ids), response.finish_reason) == ("42", [17, 2], "length")
    assert list(response.logprobs) == pytest.approx([-0.25, -1.5])
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (9, 2)
    assert response.timings.queue_ms == pytest.approx(1.0) and response.timings.total_ms >= 50.0
    assert response.timings.ttft_ms >= 20.0
    assert [(e.name, e.version) for e in response.route.experts] == [("math", 2)]  # the version the replica pinned

    async def stream() -> list[pb.GenerateStreamResponse]:
        return [m async for m in router.generate_stream(request, {})]

    first, last = asyncio.run(stream())
    assert (first.text, list(first.token_ids), first.HasField("usage")) == ("4", [17], False)
    assert (first.expert.name, first.expert.version, first.route.experts[0].version) == ("math", 2, 2)
    assert (last.text, last.finish_reason, last.usage.completion_tokens) == ("2", "length", 2)
    assert last.timings.total_ms >= 50.0


def test_an_error_event_is_raised_with_the_replicas_status_and_retry_hint(core):
    router = RouterCore(core[0].config, ScriptedReplica(
        [SCRIPT[0], ErrorEvent.from_error(Overloaded("the waiting queue is full (4)", retry_after_s=2.5))]))
    request = greedy("Compute 2 + 2", 2, expert=pb.ExpertRef(name="math"))
    refused = r"^the waiting queue is full \(4\); retry in 2.5s or on another replica$"
    with pytest.raises(ServingError, match=refused) as err:
        asyncio.run(router.generate(request, {}))
    assert (err.value.code, err.value.retryable, err.value.retry_after_s) == ("RESOURCE_EXHAUSTED", True, 2.5)

    async def stream() -> list[pb.GenerateStreamResponse]:
        return [m async for m in router.generate_stream(request, {})]

    with pytest.raises(ServingError) as err:
        asyncio.run(stream())
    assert (err.value.code, err.value.retry_after_s) == ("RESOURCE_EXHAUSTED", 2.5)
    counted = router.metrics.render()
    assert 'ccoe_router_requests_total{code="RESOURCE_EXHAUSTED",policy="none"} 1.0' in counted  # unary
    assert 'ccoe_router_requests_total{code="RESOURCE_EXHAUSTED",policy="explicit"} 1.0' in counted  # stream
