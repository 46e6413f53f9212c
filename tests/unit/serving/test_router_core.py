"""Router core + replica runtime in one process: traces in memory, metrics in a registry.

(The same code behind real Ray and gRPC is tested in tests/integration/test_services.py.)
"""

from __future__ import annotations

import asyncio
import sys

import pytest
import torch

from ccoe_common.cli.demo_assets import demo_backbone, demo_experts
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.events import ServingError
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
