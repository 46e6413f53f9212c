"""The app through real gRPC channels, real Ray Serve, a real redis-server (the local stack).

One stack serves the whole module (it takes ~20 s to start). Its engine is deliberately
small (2 running sequences, 1 waiting) so overload is reachable with a handful of requests.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from ccoe_common.auth.client import authorized_channel
from ccoe_common.experts.artifact import read_artifact
from ccoe_common.model.demo_assets import demo_backbone, demo_experts
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.pb import inference_pb2_grpc, registry_pb2_grpc
from ccoe_common.pb import registry_pb2 as rpb
from ccoe_common.ports import free_port
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.local_stack import LocalStack

RULES_V1 = """
version: 1
rules:
  - id: math-domain
    match: {domain: [math]}
    experts: [math]
  - id: both
    match: {keywords: [audit]}
    experts: [math, sql]
"""
RULES_V2 = RULES_V1.replace("version: 1", "version: 2") + """
  - id: sql-words
    match: {keywords: [select]}
    experts: [sql]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("stack")
    trace_dir = work / "traces"
    os.environ["CCOE_TRACE_DIR"] = str(trace_dir)  # inherited by the Ray workers started below
    uris = demo_experts(work)
    rules = work / "rules.yaml"
    rules.write_text(RULES_V1)
    config = AppConfig.load({
        "backbone": str(demo_backbone(work)),
        "experts": [uris["math"], uris["sql"]],
        "rules": str(rules),
        "router": {"rules_check_interval_s": 0.2},
        "auth": {"mode": "token"},
        "registry": {"allowed_sources": [str(work)], "allowed_export_prefixes": [str(work)]},
        "replica": {"engine": {"max_seq_len": 1024, "max_running": 2, "max_waiting": 1, "max_batched_tokens": 64,
                               "retry_after_s": 0.5}},
    })
    with LocalStack(config, grpc_port=free_port(), http_port=free_port()) as st:
        st.rules_path = rules
        st.trace_dir = trace_dir
        st.law_uri = uris["law"]
        yield st
    del os.environ["CCOE_TRACE_DIR"]


@pytest.fixture(scope="module")
def channel(stack):
    ch = stack.inference_channel()
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def admin_channel(stack):
    ch = authorized_channel(stack.address, stack.admin_token)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return inference_pb2_grpc.InferenceStub(channel)


def replica_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("ModelReplica", app_name="ccoe").stats.remote().result()


def wait_idle(timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = replica_stats()
        if (stats["running"] == 0 and stats["waiting"] == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def still_serves(stub) -> None:
    r = stub.Generate(pb.GenerateRequest(prompt="Compute 1 + 1", max_tokens=3), timeout=60)
    assert r.usage.completion_tokens == 3


def greedy(prompt: str, n: int, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, max_tokens=n, sampling=pb.SamplingParams(ignore_eos=True), **kw)


def test_unary_with_route_trace(stub):
    r = stub.Generate(greedy("Compute 12 + 7 and", 6, domain="math", request_id="req-1"), timeout=60)
    assert r.request_id == "req-1" and len(r.token_ids) == 6 and r.finish_reason == "length"
    assert (r.route.policy, r.route.rule_id) == ("rules", "math-domain")
    assert [(e.name, e.version) for e in r.route.experts] == [("math", 1)]
    assert r.route.reason == "domain 'math' in ['math']"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0
    assert 0 < r.timings.ttft_ms <= r.timings.total_ms


def test_stream_equals_unary(stub):
    request = greedy("SELECT name FROM users", 8, expert=pb.ExpertRef(name="sql"))
    unary = stub.Generate(request, timeout=60)
    messages = list(stub.GenerateStream(request, timeout=60))
    assert len(messages) == 8 and messages[0].route.policy == "explicit"
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    assert "".join(m.text for m in messages) == unary.text
    assert messages[-1].finish_reason == "length" and messages[-1].usage.completion_tokens == 8
    assert all(m.expert.name == "sql" and m.expert.version == 1 for m in messages)


def test_fanout_returns_every_experts_answer(stub):
    r = stub.Generate(greedy("please audit this", 5), timeout=60)
    assert r.route.rule_id == "both" and [e.name for e in r.route.experts] == ["math", "sql"]
    assert [f.expert.name for f in r.fanout] == ["math", "sql"]
    for f in r.fanout:
        alone = stub.Generate(greedy("please audit this", 5, expert=pb.ExpertRef(name=f.expert.name)), timeout=60)
        assert list(f.token_ids) == list(alone.token_ids)
    assert list(r.token_ids) == list(r.fanout[0].token_ids)
    streamed = list(stub.GenerateStream(greedy("please audit this", 5), timeout=60))
    by_expert = {n: [t for m in streamed if m.expert.name == n for t in m.token_ids] for n in ("math", "sql")}
    assert by_expert == {f.expert.name: list(f.token_ids) for f in r.fanout}


def test_default_route_is_the_backbone(stub):
    r = stub.Generate(greedy("The patient presents with fever", 3), timeout=60)
    assert r.route.policy == "default" and not r.route.experts


@pytest.mark.parametrize(("request_kwargs", "fragment"), [
    ({"prompt": "x", "sampling": pb.SamplingParams(top_p=1.5)}, "top_p: must be in (0, 1]"),
    ({"prompt": "x", "sampling": pb.SamplingParams(temperature=11)}, "temperature: must be in [0, 10]"),
    ({}, "prompt: give prompt or messages"),
    ({"prompt": "x", "routing": pb.EXPERT}, "routing mode EXPERT needs expert.name"),
    ({"prompt": "x" * 300_000}, "prompt: has 300000 characters; the limit is 200000"),
    ({"prompt": "word " * 2000}, "tokens; this engine's max_seq_len is 1024"),
    ({"messages": pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]), "template": pb.ALPACA},
     "template: messages need template='chat'"),
])
def test_invalid_argument_names_the_field(stub, request_kwargs, fragment):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(**request_kwargs), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()
    still_serves(stub)


def test_non_utf8_text_is_invalid_argument(channel, stub):
    raw = channel.unary_unary("/ccoe.v1.Inference/Generate", request_serializer=lambda b: b,
                              response_deserializer=pb.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\x12\x03\xff\xfeA", timeout=60)  # field 2 (prompt) holding bytes that are not UTF-8
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad UTF-8" in err.value.details()
    still_serves(stub)


def test_unknown_expert_is_not_found(stub):
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(pb.GenerateRequest(prompt="x", expert=pb.ExpertRef(name="medical")), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        details = err.value.details()
        assert "expert 'medical' is not served" in details and "serving: ['math', 'sql']" in details
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="x", expert=pb.ExpertRef(name="math", version=7)), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    still_serves(stub)


def test_plan_mode_is_unimplemented(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="x", routing=pb.PLAN), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_overload_is_resource_exhausted_with_retry_advice(stub):
    # Two long requests hold both slots, a short one waits in the one-place queue ...
    running = [stub.GenerateStream(greedy("Compute", 1000), timeout=120) for _ in range(2)]
    assert all(next(s).token_ids for s in running)
    queued = stub.GenerateStream(greedy("Compute", 5), timeout=120)
    deadline = time.monotonic() + 30
    while replica_stats()["waiting"] < 1:
        assert time.monotonic() < deadline, "the third request never queued"
        time.sleep(0.05)
    # ... so the next one is refused, with retry advice, in both call styles.
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(greedy("Compute", 2), timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "waiting queue is full (1 requests); retry in 0.5s" in err.value.details()
    assert dict(err.value.trailing_metadata()).get("retry-after-ms") == "500"
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(greedy("Compute", 2), timeout=60))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.value.trailing_metadata()).get("retry-after-ms") == "500"  # on streams too
    for s in running:
        s.cancel()
    # Nothing accepted is lost: the queued request completes in full once slots free up.
    assert sum(len(m.token_ids) for m in queued) == 5
    assert wait_idle()["running"] == 0
    still_serves(stub)


def test_server_deadline_is_deadline_exceeded_and_frees_the_slot(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="Compute", max_tokens=1000, timeout_ms=150,
                                         sampling=pb.SamplingParams(ignore_eos=True)), timeout=60)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "0.15s deadline" in err.value.details()
    assert wait_idle()["running"] == 0
    still_serves(stub)


def test_client_deadline_cancels_on_the_server(stub):
    before = replica_stats()["generated_tokens"]
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(greedy("Compute", 1000), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = wait_idle()
    assert stats["running"] == 0 and stats["generated_tokens"] - before < 1000  # stopped early
    still_serves(stub)


def test_client_cancel_frees_the_slot(stub):
    # Several times: Ray's proxy alone lost a cancel that landed while it wrote a message
    # (about half of them), so one lucky cancel proves little.
    for _ in range(5):
        before = replica_stats()["generated_tokens"]
        stream = stub.GenerateStream(greedy("Compute", 1000), timeout=120)
        got = [next(stream) for _ in range(3)]
        stream.cancel()
        stats = wait_idle()
        assert len(got) == 3 and stats["running"] == 0 and stats["free_slots"] == 2
        assert stats["generated_tokens"] - before < 1000  # it really stopped early
    still_serves(stub)


def test_rules_reload_without_restart_and_bad_edits_are_refused(stack, stub):
    request = greedy("select everything", 2)
    assert stub.Generate(request, timeout=60).route.policy == "default"
    stack.rules_path.write_text(RULES_V2)
    deadline = time.monotonic() + 20
    while stub.Generate(request, timeout=60).route.rule_id != "sql-words":
        assert time.monotonic() < deadline, "the edited rules file was not picked up"
        time.sleep(0.2)
    stack.rules_path.write_text(RULES_V2 + "  - id: bad\n    match: {regex: ['(']}\n    experts: [sql]\n")
    time.sleep(1.0)
    assert stub.Generate(request, timeout=60).route.rule_id == "sql-words"  # old table kept
    stack.rules_path.write_text(RULES_V1)


def test_replica_runs_torch_on_every_cpu_despite_ray(stack):
    """Ray gives an actor with num_cpus=0 OMP_NUM_THREADS=1; the replica sets its own threads."""
    assert replica_stats()["torch_threads"] == (os.cpu_count() or 1)


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="ccoe.v1.Inference"),
                        timeout=30).status == health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="nope"),
                        timeout=30).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"ccoe.v1.Inference", "ccoe.v1.Registry", "grpc.health.v1.Health"} <= set(services)


def test_live_push_and_pop_through_the_registry(stack, stub, admin_channel):
    registry = registry_pb2_grpc.RegistryStub(admin_channel)
    pushed = registry.PushExpert(rpb.PushExpertRequest(uri=stack.law_uri, who="test"), timeout=60)
    assert (pushed.expert.name, pushed.expert.version, pushed.rollout.to_version) == ("law", 1, 1)
    deadline = time.monotonic() + 30
    while registry.GetRollout(rpb.GetRolloutRequest(expert="law"), timeout=10).state != "done":
        assert time.monotonic() < deadline, "the rollout of law@1 did not finish in 30 s"
        time.sleep(0.1)
    r = stub.Generate(greedy("The court held", 3, expert=pb.ExpertRef(name="law")), timeout=60)
    assert [(e.name, e.version) for e in r.route.experts] == [("law", 1)]
    # One trace per rollout: each replica's load of law@1 is a child of the registry's push.
    spans = wait_for_spans(stack.trace_dir, {"registry.push", "replica.load_expert"},
                           lambda s: s["attributes"].get("expert") == "law@1")
    assert spans["replica.load_expert"]["trace_id"] == spans["registry.push"]["trace_id"]
    assert spans["replica.load_expert"]["parent_id"] == spans["registry.push"]["span_id"]
    export = str(stack.rules_path.parent / "exported-law")
    popped = registry.PopExpert(rpb.PopExpertRequest(name="law", who="test", wait_ms=30_000, export_to=export),
                                timeout=60)
    assert [(e.name, e.version) for e in popped.retired] == [("law", 1)] and popped.drained
    copy = read_artifact(popped.exported_to)  # a deep copy that can be trained further and pushed back
    assert copy.manifest.key == read_artifact(stack.law_uri).manifest.key
    assert copy.manifest.weights_sha256 == read_artifact(stack.law_uri).manifest.weights_sha256
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(greedy("The court held", 3, expert=pb.ExpertRef(name="law")), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def wait_for_spans(trace_dir: Path, names: set[str], keep, timeout_s: float = 10) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    found: dict[str, dict] = {}
    while time.monotonic() < deadline and set(found) != names:
        found = {s["name"]: s for f in Path(trace_dir).glob("*.jsonl") for line in f.read_text().splitlines()
                 if (s := json.loads(line))["name"] in names and keep(s)}
        time.sleep(0.2)
    return found


def test_trace_context_flows_router_to_replica(stack, stub):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    metadata = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
    stub.Generate(greedy("Compute 2 + 2", 3, domain="math"), timeout=60, metadata=metadata)
    deadline = time.monotonic() + 10
    spans: list[dict] = []
    while time.monotonic() < deadline:
        spans = [json.loads(line) for f in Path(stack.trace_dir).glob("*.jsonl") for line in f.read_text().splitlines()]
        spans = [s for s in spans if s["trace_id"] == trace_id]
        if {"router.Generate", "router.route", "replica.generate", "engine.decode"} <= {s["name"] for s in spans}:
            break
        time.sleep(0.2)
    by_name = {s["name"]: s for s in spans}
    assert {"router.Generate", "router.route", "replica.generate", "engine.queue", "engine.prefill",
            "engine.decode"} <= set(by_name)
    assert by_name["router.Generate"]["parent_id"] == "00f067aa0ba902b7"  # the caller's span
    assert by_name["replica.generate"]["parent_id"] == by_name["router.Generate"]["span_id"]
    assert by_name["engine.decode"]["parent_id"] == by_name["replica.generate"]["span_id"]
    assert by_name["engine.decode"]["attributes"]["completion_tokens"] == 3


def test_prometheus_metrics_from_the_ray_node(stack, stub):
    import urllib.request

    stub.Generate(greedy("Compute 5 + 5", 4, domain="math"), timeout=60)
    deadline = time.monotonic() + 30
    while True:  # Ray's processes report every 2 s; the node exporter serves what it has
        body = urllib.request.urlopen(stack.metrics_url, timeout=5).read().decode()
        ours = [line for line in body.splitlines() if line.startswith("ray_ccoe_")]
        names = {line.split("{")[0].split(" ")[0] for line in ours}
        if {"ray_ccoe_requests_total", "ray_ccoe_generated_tokens_total", "ray_ccoe_ttft_seconds_bucket",
                "ray_ccoe_router_requests_total", "ray_ccoe_resident_experts", "ray_ccoe_rollouts_total",
                "ray_ccoe_expert_loads_total"} <= names:
            break
        assert time.monotonic() < deadline, f"metrics not exported; have {sorted(names)}"
        time.sleep(1)
    assert any('expert="math@1"' in line and 'code="OK"' in line
               for line in ours if line.startswith("ray_ccoe_requests_total"))
    # the live push of law@1 earlier in this module: loaded on the replica, rollout done
    assert any('expert="law@1"' in line and 'outcome="ok"' in line
               for line in ours if line.startswith("ray_ccoe_expert_loads_total"))
    assert any('expert="law"' in line and 'outcome="done"' in line
               for line in ours if line.startswith("ray_ccoe_rollouts_total"))


# ---- limits and least privilege (#15, #16); these change the registry's rule table, so they run last ----

TRUNCATED = b"\x0a\x05ab"  # field 1, length 5, two bytes: no request message decodes it


def test_bytes_that_do_not_decode_are_invalid_argument_on_every_method(channel, admin_channel, stub):
    from ccoe_common.serving.grpc_servicers import REGISTRY_SERVICE, SERVICE

    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    descriptors = {SERVICE: pb.DESCRIPTOR.services_by_name["Inference"],
                   REGISTRY_SERVICE: rpb.DESCRIPTOR.services_by_name["Registry"]}
    answered = {}
    for service, descriptor in descriptors.items():
        # Bytes that do not decode are answered at the edge before any routing: the token only
        # has to be a valid one (the replica-role methods get the admin's here).
        ch = channel if service == SERVICE else admin_channel
        for method in descriptor.methods:
            path = f"/{service}/{method.name}"
            with pytest.raises(grpc.RpcError) as err:
                if method.client_streaming:
                    ch.stream_unary(path, **identity)(iter([TRUNCATED]), timeout=60)
                elif method.server_streaming:
                    list(ch.unary_stream(path, **identity)(TRUNCATED, timeout=60))
                else:
                    ch.unary_unary(path, **identity)(TRUNCATED, timeout=60)
            answered[method.name] = (err.value.code(), err.value.details())
    assert len(answered) == 15
    for name, (code, details) in answered.items():
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert "is not a valid ccoe.v1." in details, (name, details)
    still_serves(stub)


def test_push_never_fetches_a_url_nor_reads_outside_the_allowed_places(stack, admin_channel):
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    registry = registry_pb2_grpc.RegistryStub(admin_channel)
    audit_before = len(registry.ListAudit(rpb.ListAuditRequest(limit=1000), timeout=60).entries)
    try:
        for uri, fragment in [(f"http://127.0.0.1:{web.server_port}/artifact", "scheme 'http' is not allowed"),
                              ("/etc", "is not inside an allowed location"),
                              ("/nonexistent/law", "is not inside an allowed location"),
                              (f"{stack.law_uri}/../../../..", "is not inside an allowed location")]:
            with pytest.raises(grpc.RpcError) as err:
                registry.PushExpert(rpb.PushExpertRequest(uri=uri, who="test"), timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()
    finally:
        web.shutdown()
    assert hits == []  # the server never fetched it
    assert len(registry.ListAudit(rpb.ListAuditRequest(limit=1000), timeout=60).entries) == audit_before


def test_exports_go_only_where_allowed_and_refusals_retire_nothing(stack, admin_channel, stub):
    registry = registry_pb2_grpc.RegistryStub(admin_channel)
    occupied = stack.rules_path.parent / "occupied"
    occupied.mkdir(exist_ok=True)
    (occupied / "notes.txt").write_text("mine")
    for export_to, code, fragment in [
        ("nosuchproto://x/y", grpc.StatusCode.INVALID_ARGUMENT, "scheme 'nosuchproto' is not allowed"),
        ("/proc/self/fd", grpc.StatusCode.INVALID_ARGUMENT, "is not inside an allowed location"),
        (str(occupied), grpc.StatusCode.ALREADY_EXISTS, "already holds other files"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            registry.PopExpert(rpb.PopExpertRequest(name="math", export_to=export_to, who="test"), timeout=60)
        assert err.value.code() == code and err.value.details().startswith("export_to: ")
        assert fragment in err.value.details()
    assert stub.Generate(greedy("Compute 1 + 1", 2, expert=pb.ExpertRef(name="math")), timeout=60).text is not None
    # A bare name goes under the store's _exports/ folder (law@1 was popped earlier; its copy stays).
    popped = registry.PopExpert(rpb.PopExpertRequest(name="law", version=1, export_to="law-copy", who="test"),
                                timeout=60)
    assert popped.exported_to.endswith("/_exports/law-copy")
    assert read_artifact(popped.exported_to).manifest.name == "law"


def test_generate_limits_are_precise_and_the_old_reserved_key_is_plain_metadata(stub):
    for request, fragment in [
        (pb.GenerateRequest(prompt="x", metadata={f"k{i}": "" for i in range(200_000)}),
         "metadata: 200000 keys, over router.max_metadata_keys (64)"),
        (pb.GenerateRequest(prompt="x", stop=["s" * 170_000]), "(170000 characters) must be 1 to 256 characters"),
        (pb.GenerateRequest(prompt="x", domain="d" * (8 << 20)), "is longer than router.max_domain_chars (128)"),
        (pb.GenerateRequest(prompt="x", metadata={"k": "v" * (32 << 20)}), "router.max_metadata_value_chars"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(request, timeout=120)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert fragment in err.value.details() and len(err.value.details()) < 400
    reply = stub.Generate(greedy("Compute 1 + 1", 2, metadata={"__ccoe_decode_error__": "forged"}), timeout=60)
    assert reply.usage.completion_tokens == 2


def test_an_upload_the_client_abandons_is_removed(stack, admin_channel):
    registry = registry_pb2_grpc.RegistryStub(admin_channel)
    law = next(e for e in registry.ListExperts(rpb.ListExpertsRequest(), timeout=60).experts if e.name == "law")
    uploads = Path(law.versions[0].uri).parent.parent / ".uploads"  # the store: <store>/law/v1
    release = threading.Event()

    def chunks():
        for _i in range(3):
            yield rpb.ArtifactChunk(expert="law", version=7, file="weights.safetensors", data=b"x" * 1024)
        release.wait(60)  # the client goes quiet, then away

    future = registry.UploadArtifact.future(chunks(), timeout=120)
    deadline = time.monotonic() + 30
    while not (uploads.exists() and any(uploads.iterdir())):
        assert time.monotonic() < deadline, "the upload never started"
        time.sleep(0.1)
    future.cancel()
    release.set()
    deadline = time.monotonic() + 120  # at the latest registry.upload_idle_timeout_s (60 s) after its last chunk
    while any(uploads.iterdir()):
        assert time.monotonic() < deadline, f"the abandoned upload was left in the store: {list(uploads.iterdir())}"
        time.sleep(0.5)


def test_rule_tables_cannot_hang_the_router(channel, admin_channel, stub):
    registry = registry_pb2_grpc.RegistryStub(admin_channel)
    for table, fragment in [
        ("rules: [{id: r, match: {regex: ['(a)\\1']}, experts: [math]}]", "no backreferences"),
        ("[" * 100_000 + "]" * 100_000, "not valid YAML/JSON"),
        ('{"rules": ' + "[" * 30 + "]" * 30 + "}", "nests deeper than 8 levels"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            registry.SetRules(rpb.SetRulesRequest(table=table, who="test"), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()
    raw = admin_channel.unary_unary("/ccoe.v1.Registry/SetRules", request_serializer=lambda b: b,
                              response_deserializer=rpb.RulesResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\x0a\x03\xff\xfeA", timeout=60)  # the table as bytes that are not UTF-8
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad UTF-8" in err.value.details()
    registry.SetRules(rpb.SetRulesRequest(table="rules: [{id: redos, match: {regex: ['^(a+)+$']}, experts: [math]}]",
                                          who="test"), timeout=60)
    deadline = time.monotonic() + 30
    while stub.Generate(greedy("a" * 28, 2), timeout=60).route.rule_id != "redos":
        assert time.monotonic() < deadline, "the router did not take the registry's table"
        time.sleep(0.2)
    # 27 'a's and a 'b' froze a router for 6.8 s on Python's re; on RE2 it is an ordinary request.
    assert stub.Generate(greedy("a" * 27 + "b", 2), timeout=60).route.policy == "default"
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
