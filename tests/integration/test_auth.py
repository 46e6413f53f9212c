"""Authentication and roles through real gRPC, real Ray Serve and a real redis-server.

Every method of ccoe.v1.Inference and ccoe.v1.Registry is called without a token, with a
token that matches nobody, and with a token of the wrong role: each gets its status, and the
registry's state and audit log are unchanged afterwards. Tenant binding, the audit identity,
the rate limit and the open health check are checked on the same stack.
"""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ccoe_common.auth.client import authorized_channel
from ccoe_common.auth.tokens import TokenEntry, token_hash
from ccoe_common.model.demo_assets import demo_backbone, demo_experts
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.pb import registry_pb2 as rpb
from ccoe_common.ports import free_port
from ccoe_common.registry.client import RegistryClient
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.local_stack import LocalStack

TOKENS = {  # name -> (token, roles, tenants)
    "ops": ("tok-ops", ["admin"], []),
    "app": ("tok-app", ["inference"], ["acme"]),
    "any-tenant-app": ("tok-any", ["inference"], []),
    "rep": ("tok-rep", ["replica"], []),
    "greedy": ("tok-greedy", ["inference"], []),
}
BURST = 40  # the rate limit's burst: far more than any other principal here uses

# Every method, how to call it, a request that would be valid, and the role it needs.
METHODS = [
    ("ccoe.v1.Inference/Generate", "unary", pb.GenerateRequest(prompt="1+1", max_tokens=1), "inference"),
    ("ccoe.v1.Inference/GenerateStream", "stream_out", pb.GenerateRequest(prompt="1+1", max_tokens=1), "inference"),
    ("ccoe.v1.Registry/PushExpert", "unary", rpb.PushExpertRequest(uri="/tmp/x"), "admin"),
    ("ccoe.v1.Registry/UploadArtifact", "stream_in", rpb.ArtifactChunk(expert="x", version=1, file="manifest.json",
                                                                        data=b"{}"), "admin"),
    ("ccoe.v1.Registry/PopExpert", "unary", rpb.PopExpertRequest(name="math"), "admin"),
    ("ccoe.v1.Registry/ListExperts", "unary", rpb.ListExpertsRequest(), "admin"),
    ("ccoe.v1.Registry/GetExpert", "unary", rpb.GetExpertRequest(name="math"), "admin"),
    ("ccoe.v1.Registry/GetRules", "unary", rpb.GetRulesRequest(), "admin"),
    ("ccoe.v1.Registry/SetRules", "unary", rpb.SetRulesRequest(table='{"version": 9, "rules": []}'), "admin"),
    ("ccoe.v1.Registry/StartRollout", "unary", rpb.StartRolloutRequest(expert="math", version=1), "admin"),
    ("ccoe.v1.Registry/GetRollout", "unary", rpb.GetRolloutRequest(expert="math"), "admin"),
    ("ccoe.v1.Registry/Rollback", "unary", rpb.RollbackRequest(expert="math"), "admin"),
    ("ccoe.v1.Registry/ListAudit", "unary", rpb.ListAuditRequest(limit=5), "admin"),
    ("ccoe.v1.Registry/WatchDesiredState", "stream_out", rpb.WatchDesiredStateRequest(), "replica"),
    ("ccoe.v1.Registry/ReportReplicaState", "unary", rpb.ReplicaState(replica_id="fake-replica-1"), "replica"),
]
WRONG_ROLE = {"inference": "tok-ops", "admin": "tok-app", "replica": "tok-ops"}
RIGHT_ROLE = {"inference": "tok-any", "admin": "tok-ops", "replica": "tok-rep"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("auth")
    tokens = work / "tokens.yaml"
    tokens.write_text("".join(TokenEntry(name=n, sha256=token_hash(t), roles=r, tenants=ten).line() + "\n"
                              for n, (t, r, ten) in TOKENS.items()))
    uris = demo_experts(work)
    config = AppConfig.load({
        "backbone": str(demo_backbone(work)),
        "experts": [uris["math"], uris["sql"]],
        "rules_inline": {"version": 1,
                         "rules": [{"id": "acme-sql", "match": {"tenant": ["acme"]}, "experts": ["sql"]}]},
        "replica": {"engine": {"max_seq_len": 256, "max_running": 4}},
        "auth": {"mode": "token", "tokens_file": str(tokens),
                 "rate_limit": {"requests_per_s": 0.5, "burst": BURST}},
    })
    with LocalStack(config, grpc_port=free_port(), http_port=free_port()) as st:
        yield st


def call(stack, method: str, shape: str, request, token: str | None, timeout: float = 30):
    """One call of `method` as a raw gRPC client would make it; returns the response(s)."""
    channel = authorized_channel(stack.address, token)
    try:
        if shape == "unary":
            return channel.unary_unary(f"/{method}", request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=lambda b: b)(request, timeout=timeout)
        if shape == "stream_in":
            return channel.stream_unary(f"/{method}", request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=lambda b: b)(iter([request]), timeout=timeout)
        stream = channel.unary_stream(f"/{method}", request_serializer=lambda m: m.SerializeToString(),
                                      response_deserializer=lambda b: b)(request, timeout=timeout)
        return next(stream)  # the first message is enough; leaving cancels the stream
    finally:
        channel.close()


def snapshot(stack) -> tuple:
    with RegistryClient(stack.address, token="tok-ops") as reg:
        experts = reg.list()
        return (experts.revision, [(e.name, e.serving, e.latest) for e in experts.experts],
                reg.get_rules().revision, [(e.id, e.who, e.what) for e in reg.audit(1000).entries])


def test_every_method_refuses_missing_wrong_and_wrong_role_tokens_and_changes_nothing(stack):
    before = snapshot(stack)
    seen = []
    for method, shape, request, role in METHODS:
        for token, status in [(None, grpc.StatusCode.UNAUTHENTICATED),
                              ("ccoe_wrong-token", grpc.StatusCode.UNAUTHENTICATED),
                              (WRONG_ROLE[role], grpc.StatusCode.PERMISSION_DENIED)]:
            with pytest.raises(grpc.RpcError) as err:
                call(stack, method, shape, request, token)
            assert err.value.code() == status, (method, token, err.value.details())
            if status == grpc.StatusCode.PERMISSION_DENIED:
                assert f"needs role '{role}'" in err.value.details()
            seen.append(method)
    assert len(set(seen)) == 15
    assert snapshot(stack) == before  # nothing registered, popped, rolled or audited


def test_each_role_reaches_its_methods(stack):
    assert call(stack, "ccoe.v1.Registry/ListExperts", "unary", rpb.ListExpertsRequest(), RIGHT_ROLE["admin"])
    first = rpb.DesiredState.FromString(call(stack, "ccoe.v1.Registry/WatchDesiredState", "stream_out",
                                             rpb.WatchDesiredStateRequest(), RIGHT_ROLE["replica"]))
    assert set(first.serving) == {"math", "sql"}
    out = pb.GenerateResponse.FromString(call(stack, "ccoe.v1.Inference/Generate", "unary",
                                              pb.GenerateRequest(prompt="1+1", max_tokens=2), RIGHT_ROLE["inference"]))
    assert out.usage.completion_tokens == 2


def test_the_audit_log_names_the_token_not_the_claim(stack):
    with RegistryClient(stack.address, token="tok-ops") as reg:
        reg.set_rules('{"version": 2, "rules": []}', who="somebody-else")
        entry = reg.audit(1).entries[0]  # the newest
        reg.set_rules('{"version": 3, "rules": [{"id": "acme-sql", "match": {"tenant": ["acme"]}, '
                      '"experts": ["sql"]}]}', who="x")
    assert (entry.what, entry.who) == ("set_rules", "ops")


def _route(stack, token: str, tenant: str | None) -> str:
    request = pb.GenerateRequest(prompt="1+1", max_tokens=1)
    if tenant is not None:
        request.metadata["tenant"] = tenant
    deadline = time.monotonic() + 30
    while True:  # the rule table set above reaches the router within a moment
        out = pb.GenerateResponse.FromString(call(stack, "ccoe.v1.Inference/Generate", "unary", request, token))
        if out.route.rule_id == "acme-sql" or tenant not in (None, "acme") or time.monotonic() > deadline:
            return out.route.rule_id
        time.sleep(0.2)


def test_a_tenant_bound_token_routes_only_as_its_tenant(stack):
    assert _route(stack, "tok-app", None) == "acme-sql"  # the token's tenant, though the request names none
    assert _route(stack, "tok-app", "acme") == "acme-sql"
    with pytest.raises(grpc.RpcError) as err:
        _route(stack, "tok-app", "globex")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may act as tenant(s) ['acme']" in err.value.details()
    assert _route(stack, "tok-any", "globex") != "acme-sql"  # an unbound token names its tenant freely
    assert _route(stack, "tok-any", "acme") == "acme-sql"


def test_the_rate_limit_answers_resource_exhausted_with_retry_advice(stack):
    request = pb.GenerateRequest(prompt="1+1", max_tokens=1)
    channel = authorized_channel(stack.address, "tok-greedy")
    generate = channel.unary_unary("/ccoe.v1.Inference/Generate", request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=pb.GenerateResponse.FromString)
    try:
        for _ in range(BURST + 5):
            try:
                generate.with_call(request, timeout=30)
            except grpc.RpcError as e:
                error = e
                break
        else:
            pytest.fail(f"{BURST + 5} calls at once were all admitted; the burst is {BURST}")
    finally:
        channel.close()
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "over its rate limit" in error.details()
    advice = dict(error.trailing_metadata() or ())
    assert int(advice["retry-after-ms"]) > 0
    # Another principal's budget is its own.
    assert call(stack, "ccoe.v1.Inference/Generate", "unary", request, "tok-any")


def test_health_stays_open(stack):
    channel = grpc.insecure_channel(stack.address)
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30).status
    finally:
        channel.close()
    assert status == health_pb2.HealthCheckResponse.SERVING
