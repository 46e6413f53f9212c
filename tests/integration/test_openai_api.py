"""The OpenAI-compatible HTTP API, called with the real `openai` client against the local stack
(real Ray Serve HTTP and gRPC proxies, a real redis-server), and compared with gRPC.

Like test_services, the engine is deliberately small (2 running sequences, 1 waiting) so
overload is reachable with a handful of requests.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from ccoe_common.model.demo_assets import demo_backbone, demo_experts
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.pb import inference_pb2_grpc
from ccoe_common.ports import free_port
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.local_stack import LocalStack

RULES = """
version: 1
rules:
  - id: math-domain
    match: {domain: [math]}
    experts: [math]
"""
MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Compute 12 + 7"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("openai")
    uris = demo_experts(work)
    rules = work / "rules.yaml"
    rules.write_text(RULES)
    config = AppConfig.load({
        "backbone": str(demo_backbone(work)),
        "experts": [uris["math"], uris["sql"]],
        "rules": str(rules),
        "auth": {"mode": "token"},
        "registry": {"allowed_sources": [str(work)]},
        "replica": {"engine": {"max_seq_len": 1024, "max_running": 2, "max_waiting": 1, "max_batched_tokens": 64,
                               "retry_after_s": 0.5}},
    })
    with LocalStack(config, grpc_port=free_port(), http_port=free_port()) as st:
        st.law_uri = uris["law"]
        yield st


@pytest.fixture(scope="module")
def client(stack):
    # No retries: a 429 or 503 must reach the test, not be retried away by the SDK.
    return openai.OpenAI(base_url=stack.http_base_url, api_key=stack.inference_token, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stub(stack):
    channel = stack.inference_channel()
    yield inference_pb2_grpc.InferenceStub(channel)
    channel.close()


def replica_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("ModelReplica", app_name="ccoe").stats.remote().result()


def wait_idle(timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = replica_stats()
        if (stats["running"] == 0 and stats["waiting"] == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def raw_post(stack, path: str, body: dict, headers: dict[str, str]) -> tuple[int, dict[str, str], dict]:
    """A plain HTTP call (what curl does), for what the SDK will not send, e.g. no token at all."""
    req = urllib.request.Request(stack.http_base_url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def grpc_details(stub, request: pb.GenerateRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request, timeout=60)
    return err.value.code(), err.value.details()


def test_models_list_auto_backbone_and_every_served_expert_with_its_version(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"auto", "backbone", "math", "sql"}
    assert models["math"].model_extra["ccoe"] == {"kind": "expert", "serving_version": 1}
    assert models["auto"].model_extra["ccoe"]["kind"] == "route"
    assert client.models.retrieve("sql").model_extra["ccoe"]["serving_version"] == 1
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("law")


def test_the_model_list_follows_the_registry(stack, client):
    with stack.registry_client() as registry:
        pushed = registry.push(stack.law_uri, who="test")
        registry.wait_rollout("law", pushed.rollout.id, timeout_s=120)
        deadline = time.monotonic() + 30
        while "law" not in {m.id for m in client.models.list().data}:  # the router's view follows the registry
            assert time.monotonic() < deadline, "law@1 went live but /v1/models never listed it"
            time.sleep(0.1)
        assert client.models.retrieve("law").model_extra["ccoe"]["serving_version"] == 1
        r = client.completions.create(model="law", prompt="The court held", max_tokens=2, temperature=0)
        assert r.model == "law@1"
        registry.pop("law", who="test", wait_s=30)
        while "law" in {m.id for m in client.models.list().data}:
            assert time.monotonic() < deadline + 30, "law was popped but /v1/models still lists it"
            time.sleep(0.1)


def test_ray_serves_health_endpoint_stays_open(stack):
    with urllib.request.urlopen(stack.http_base_url.removesuffix("/v1") + "/-/healthz", timeout=30) as r:
        assert r.status == 200


def test_chat_with_an_explicit_expert_names_its_version(client):
    r = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.model == "math@1"
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert len(choice.model_extra["token_ids"]) == 6 and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6 and r.usage.prompt_tokens > 0
    assert r.model_extra["ccoe"]["route"] == {"policy": "explicit", "rule_id": "",
                                              "reason": "request named expert 'math'",
                                              "experts": [{"name": "math", "version": 1}]}
    assert client.chat.completions.create(model="math@1", messages=MESSAGES, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].model_extra["token_ids"] == \
        choice.model_extra["token_ids"]


def test_greedy_chat_over_http_equals_grpc_token_for_token(client, stub):
    grpc_reply = stub.Generate(pb.GenerateRequest(
        messages=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in MESSAGES]), expert=pb.ExpertRef(name="sql"),
        max_tokens=12, sampling=pb.SamplingParams(ignore_eos=True)), timeout=60)
    http = client.chat.completions.create(model="sql", messages=MESSAGES, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert http.choices[0].model_extra["token_ids"] == list(grpc_reply.token_ids)
    assert http.choices[0].message.content == grpc_reply.text
    streamed = client.chat.completions.create(model="sql", messages=MESSAGES, max_tokens=12, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert [t for c in chunks for ch in c.choices for t in (ch.model_extra or {}).get("token_ids", [])] == \
        list(grpc_reply.token_ids)
    assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == grpc_reply.text
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
    assert {c.model for c in chunks} == {"sql@1"}


def test_seeded_sampling_over_http_equals_grpc(client, stub):
    grpc_reply = stub.Generate(pb.GenerateRequest(prompt="Compute 12 + 7", max_tokens=10, expert=pb.ExpertRef(
        name="math"), sampling=pb.SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=5, ignore_eos=True)),
        timeout=60)
    http = client.completions.create(model="math", prompt="Compute 12 + 7", max_tokens=10, temperature=0.8,
                                     top_p=0.9, seed=5, extra_body={"top_k": 50, "ignore_eos": True})
    assert http.choices[0].model_extra["token_ids"] == list(grpc_reply.token_ids)


def test_completion_unary_and_streamed_agree_with_grpc(client, stub):
    grpc_reply = stub.Generate(pb.GenerateRequest(prompt="SELECT name FROM", max_tokens=8,
                                                  sampling=pb.SamplingParams(ignore_eos=True),
                                                  routing=pb.BACKBONE), timeout=60)
    unary = client.completions.create(model="backbone", prompt="SELECT name FROM", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert unary.object == "text_completion" and unary.model == "backbone"
    assert unary.choices[0].text == grpc_reply.text
    assert unary.choices[0].model_extra["token_ids"] == list(grpc_reply.token_ids)
    assert unary.model_extra["ccoe"]["route"]["experts"] == []
    chunks = list(client.completions.create(model="backbone", prompt="SELECT name FROM", max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == grpc_reply.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_logprobs_are_the_chosen_tokens(client, stub):
    grpc_reply = stub.Generate(pb.GenerateRequest(prompt="Compute 3 + 4", max_tokens=4, expert=pb.ExpertRef(
        name="math"), sampling=pb.SamplingParams(ignore_eos=True, logprobs=True)), timeout=60)
    r = client.completions.create(model="math", prompt="Compute 3 + 4", max_tokens=4, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(list(grpc_reply.logprobs), abs=0)  # same engine, same bits
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    chat = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=3, temperature=0,
                                          logprobs=True, extra_body={"ignore_eos": True})
    assert len(chat.choices[0].logprobs.content) == 3
    assert all(e.logprob <= 0 for e in chat.choices[0].logprobs.content)


def test_auto_is_routed_by_the_rules_from_metadata_or_a_header(client):
    r = client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=2, temperature=0,
                                       metadata={"domain": "math"})
    assert r.model == "math@1"
    assert r.model_extra["ccoe"]["route"]["policy"] == "rules"
    assert r.model_extra["ccoe"]["route"]["rule_id"] == "math-domain"
    r = client.completions.create(model="auto", prompt="Compute 1 + 1", max_tokens=2, temperature=0,
                                  extra_headers={"X-CCoE-Domain": "math"})
    assert r.model_extra["ccoe"]["route"]["rule_id"] == "math-domain"
    r = client.completions.create(model="auto", prompt="Compute 1 + 1", max_tokens=2, temperature=0)
    assert r.model == "backbone" and r.model_extra["ccoe"]["route"]["policy"] == "default"


def test_an_unknown_model_is_404_in_openais_shape_with_the_grpc_message(client, stub):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nosuch", messages=MESSAGES, max_tokens=2)
    code, details = grpc_details(stub, pb.GenerateRequest(prompt="x", expert=pb.ExpertRef(name="nosuch"),
                                                          routing=pb.EXPERT, max_tokens=2))
    assert code == grpc.StatusCode.NOT_FOUND
    assert err.value.status_code == 404
    assert err.value.body == {"message": details, "type": "not_found_error", "param": None, "code": "NOT_FOUND"}
    with pytest.raises(openai.BadRequestError, match="'Math!' is not a model"):
        client.chat.completions.create(model="Math!", messages=MESSAGES, max_tokens=2)


@pytest.mark.parametrize(("kwargs", "param", "grpc_request"), [
    ({"temperature": 11}, "temperature", pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(temperature=11))),
    ({"top_p": 1.5}, "top_p", pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=1.5))),
    ({"stop": ["x"] * 17}, "stop", pb.GenerateRequest(prompt="x", stop=["x"] * 17)),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"n": 2}, "n", None),
    ({"presence_penalty": 0.5}, "presence_penalty", None),
])
def test_an_out_of_range_parameter_is_400_naming_it(client, stub, kwargs, param, grpc_request):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="backbone", prompt="x", **{"max_tokens": 2, **kwargs})
    body = err.value.body
    assert err.value.status_code == 400 and body["param"] == param and body["code"] == "INVALID_ARGUMENT"
    assert body["message"].startswith(f"{param}: ")
    if grpc_request is not None:  # the same message as the gRPC API's
        assert grpc_details(stub, grpc_request) == (grpc.StatusCode.INVALID_ARGUMENT, body["message"])


def test_no_token_is_401_and_a_wrong_role_403(stack, client):
    status, headers, body = raw_post(stack, "/chat/completions", {"model": "auto", "messages": MESSAGES}, {})
    assert status == 401 and headers.get("www-authenticate") == "Bearer"
    assert body["error"]["code"] == "UNAUTHENTICATED" and "no credential" in body["error"]["message"]
    bad = openai.OpenAI(base_url=stack.http_base_url, api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="matches no principal"):
        bad.models.list()
    admin = openai.OpenAI(base_url=stack.http_base_url, api_key=stack.admin_token, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="needs role 'inference'"):
        admin.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=2)
    status, _, body = raw_post(stack, "/chat/completions", {"model": "auto", "messages": MESSAGES, "tools": 1},
                               {"authorization": f"Bearer {stack.inference_token}"})
    assert status == 400 and body["error"]["param"] == "tools"
    status, _, body = raw_post(stack, "/embeddings", {}, {"authorization": f"Bearer {stack.inference_token}"})
    assert status == 404 and body["error"]["type"] == "not_found_error"


def _long_stream(client, n: int = 1000):
    return client.completions.create(model="backbone", prompt="Compute", max_tokens=n, temperature=0, stream=True,
                                     extra_body={"ignore_eos": True})


def test_overload_is_429_with_retry_after(client):
    wait_idle()
    running = [_long_stream(client) for _ in range(2)]
    assert all(next(iter(s)).choices for s in running)
    # The third request waits for a slot (its status is held back until its first token) ...
    third: dict = {}
    waiter = threading.Thread(target=lambda: third.setdefault("r", client.completions.create(
        model="backbone", prompt="Compute", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})))
    waiter.start()
    deadline = time.monotonic() + 30
    while replica_stats()["waiting"] < 1:
        assert time.monotonic() < deadline, "the third request never queued"
        time.sleep(0.05)
    # ... so the next one is refused, with retry advice, unary and streamed.
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model="backbone", prompt="Compute", max_tokens=2, stream=stream)
        assert err.value.status_code == 429 and err.value.body["code"] == "RESOURCE_EXHAUSTED"
        assert "retry in 0.5s" in err.value.body["message"]
        assert err.value.response.headers["retry-after"] == "1"
        assert err.value.response.headers["retry-after-ms"] == "500"
    for s in running:
        s.close()
    waiter.join(timeout=120)
    assert third["r"].usage.completion_tokens == 3  # nothing accepted is lost
    assert wait_idle()["running"] == 0


def test_closing_a_stream_cancels_the_engine_request(client):
    # Several times, as on gRPC: one lucky cancel proves little.
    for _ in range(3):
        wait_idle()
        before = replica_stats()["generated_tokens"]
        stream = _long_stream(client)
        got = [c for _, c in zip(range(3), stream, strict=False)]
        stream.close()
        stats = wait_idle()
        assert len(got) == 3 and stats["running"] == 0 and stats["free_slots"] == 2
        assert stats["generated_tokens"] - before < 1000  # it really stopped early
    r = client.completions.create(model="backbone", prompt="Compute", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
