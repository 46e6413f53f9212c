"""The OpenAI API's pure parts: request bodies -> GenerateRequest, results -> OpenAI JSON,
errors -> HTTP statuses. The whole path through Ray is in tests/integration/test_openai_api.py."""

from __future__ import annotations

import json

import pytest

from ccoe_common.auth.errors import RateLimited, Unauthenticated
from ccoe_common.engine.errors import Overloaded
from ccoe_common.errors import ExpertNotFound, InvalidRequest
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.serving.events import ServingError
from ccoe_common.serving.openai_api import sse
from ccoe_common.serving.openai_api.errors import HTTP_STATUS, error_reply
from ccoe_common.serving.openai_api.protocol import (
    PARAM_NAMES,
    ChatCompletionRequest,
    CompletionRequest,
    load,
    route_of,
    to_generate_request,
)
from ccoe_common.serving.openai_api.responses import StreamChunks, model_list, unary

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


def chat(headers: dict[str, str] | None = None, **fields):
    return to_generate_request(load(ChatCompletionRequest, {**CHAT, **fields}), headers or {}, "rid", 2048)


def completion(**fields):
    return to_generate_request(load(CompletionRequest, {"model": "backbone", "prompt": "x", **fields}), {}, "rid", 2048)


@pytest.mark.parametrize(("model", "routing", "expert"), [
    ("auto", pb.AUTO, None), ("backbone", pb.BACKBONE, None), ("plan", pb.PLAN, None),
    ("math", pb.EXPERT, ("math", 0)), ("sql-v2@12", pb.EXPERT, ("sql-v2", 12)),
])
def test_the_model_names_the_route(model, routing, expert):
    mode, ref = route_of(model)
    assert mode == routing and (None if ref is None else (ref.name, ref.version)) == expert


@pytest.mark.parametrize(("model", "message"), [
    ("Math", "'Math' is not a model"), ("math@", "'math@' is not a model"), ("math@0", "must be 1 to"),
    ("math@99999999999", "'math@99999999999' is not a model"), ("", "'' is not a model"),
])
def test_a_bad_model_is_refused_naming_it(model, message):
    with pytest.raises(InvalidRequest, match=message) as err:
        route_of(model)
    assert err.value.param == "model"


def test_chat_becomes_the_grpc_request_an_app_would_send():
    p = chat(model="math@2", messages=[{"role": "developer", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]}],
             max_completion_tokens=7, temperature=0, top_p=0.5, seed=3, stop="\n", user="u1",
             metadata={"domain": "math", "app": "desk"}, stream=True, stream_options={"include_usage": True})
    r = p.request
    assert (r.routing, r.expert.name, r.expert.version) == (pb.EXPERT, "math", 2)
    assert [(m.role, m.content) for m in r.messages.messages] == [("system", "be brief"), ("user", "ab")]
    assert r.max_tokens == 7 and r.sampling.temperature == 0 and r.sampling.seed == 3
    assert r.sampling.top_p == pytest.approx(0.5) and list(r.stop) == ["\n"] and r.request_id == "rid"
    assert r.domain == "math" and dict(r.metadata) == {"app": "desk", "user": "u1"}
    assert p.stream and p.include_usage and not p.logprobs


def test_openais_defaults_sample_at_temperature_1_up_to_the_context():
    r = chat().request
    assert r.sampling.temperature == 1.0 and r.max_tokens == 2048 and not r.HasField("expert")


def test_headers_carry_routing_inputs_and_the_body_wins():
    r = chat({"x-ccoe-domain": "sql", "x-ccoe-tenant": "acme", "x-ccoe-timeout-ms": "1500"},
             metadata={"tenant": "beta"}).request
    assert r.domain == "sql" and dict(r.metadata) == {"tenant": "beta"} and r.timeout_ms == 1500
    with pytest.raises(InvalidRequest, match="x-ccoe-timeout-ms: must be whole milliseconds"):
        chat({"x-ccoe-timeout-ms": "1.5"})


def test_completion_prompt_template_and_logprobs():
    p = completion(prompt=["Add 2 and 3."], template="alpaca", logprobs=0)
    assert p.request.prompt == "Add 2 and 3." and p.request.template == pb.ALPACA and p.logprobs
    assert p.request.sampling.logprobs
    assert completion().request.template == pb.RAW and not completion().logprobs


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"max_tokens": 0}, "max_tokens", "max_tokens: must be in [1, 1000000], got 0"),
    ({"top_p": 0}, "top_p", "top_p: must be in (0, 1] (1 = off), got 0.0"),
    ({"seed": -1}, "seed", "seed: must be in [0, 2^63), got -1"),
    ({"temperature": 1e40}, "temperature", "temperature: must be in [0, 10] (0 = greedy), got 1e+40"),
    ({"n": 3}, "n", "n: only 1 choice per request is served, got 3"),
    ({"frequency_penalty": 1}, "frequency_penalty", "frequency_penalty: is not served"),
    ({"logprobs": 2}, "logprobs", "logprobs: only the chosen token's log-probability is served (0), got 2"),
    ({"prompt": ["a", "b"]}, "prompt", "prompt: must be one string"),
    ({"prompt": [1, 2]}, "prompt", "prompt: must be one string"),
    ({"echo": True}, "echo", "echo: is not served"),
    ({"frobnicate": 1}, "frobnicate", "frobnicate: is not a parameter this API takes"),
    ({"max_tokens": "many"}, "max_tokens", "max_tokens: Input should be a valid integer"),
])
def test_bad_completion_fields_are_refused_naming_them(fields, param, message):
    with pytest.raises(InvalidRequest) as err:
        completion(**fields)
    assert err.value.param == param and str(err.value).startswith(message)


@pytest.mark.parametrize(("fields", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"top_logprobs": 2, "logprobs": True}, "top_logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
])
def test_bad_chat_fields_are_refused_naming_them(fields, param):
    with pytest.raises(InvalidRequest) as err:
        chat(**fields)
    assert err.value.param == param


def test_ignored_fields_pass():
    assert chat(store=False, parallel_tool_calls=True).request.max_tokens == 2048


@pytest.mark.parametrize(("error", "status", "kind"), [
    (InvalidRequest("top_k", "must be in [0, 100000] (0 = off), got -1"), 400, "invalid_request_error"),
    (Unauthenticated("no credential"), 401, "authentication_error"),
    (ServingError("PERMISSION_DENIED", "no"), 403, "permission_error"),
    (ExpertNotFound("expert 'law' is not served"), 404, "not_found_error"),
    (Overloaded("the waiting queue is full (1 requests)", retry_after_s=0.5), 429, "rate_limit_error"),
    (ServingError("UNAVAILABLE", "replica died", retryable=True, retry_after_s=2.5), 503, "service_unavailable_error"),
    (ServingError("DEADLINE_EXCEEDED", "0.15s deadline"), 504, "timeout_error"),
    (ServingError("INTERNAL", "internal error: KeyError"), 500, "server_error"),
])
def test_errors_get_the_status_of_their_grpc_code_and_openais_shape(error, status, kind):
    reply = error_reply(error, PARAM_NAMES)
    assert reply.status == status
    assert reply.body == {"error": {"message": str(error), "type": kind, "param": getattr(error, "param", None),
                                    "code": error.code}}
    if error.retryable:
        assert reply.headers["retry-after-ms"] == str(int(error.retry_after_s * 1000))
        assert int(reply.headers["retry-after"]) >= error.retry_after_s
    else:
        assert "retry-after" not in reply.headers
    assert ("www-authenticate" in reply.headers) == (status == 401)


def test_rate_limit_is_429_and_every_code_has_a_status():
    assert error_reply(RateLimited("over", retry_after_s=0.2), {}).headers == {"retry-after": "1",
                                                                                "retry-after-ms": "200"}
    assert {s for s, _ in HTTP_STATUS.values()} >= {400, 401, 403, 404, 429, 503, 504}


def test_a_core_param_name_is_renamed_to_the_openai_field():
    body = error_reply(InvalidRequest("max_new_tokens", "must be in [1, 1000000], got 0"), PARAM_NAMES).body
    assert body["error"]["param"] == "max_tokens"
    assert body["error"]["message"] == "max_tokens: must be in [1, 1000000], got 0"


def test_sse_events_are_openais_framing():
    assert sse.event({"a": [1, "é"]}) == b'data: {"a":[1,"\\u00e9"]}\n\n'
    assert sse.DONE == b"data: [DONE]\n\n"


def route(*experts: tuple[str, int]) -> pb.RouteTrace:
    return pb.RouteTrace(policy="rules", rule_id="both", reason="r",
                         experts=[pb.ExpertRef(name=n, version=v) for n, v in experts])


def test_a_fanout_stream_is_one_choice_per_expert_and_usage_last():
    p = chat(stream=True, stream_options={"include_usage": True})
    out = StreamChunks("chat", p, 5, lambda ids: [str(i) for i in ids])
    msgs = [
        pb.GenerateStreamResponse(text="a", token_ids=[1], expert=pb.ExpertRef(name="math", version=1),
                                  route=route(("math", 1), ("sql", 0))),
        pb.GenerateStreamResponse(text="b", token_ids=[2], expert=pb.ExpertRef(name="sql", version=3),
                                  finish_reason="length", usage=pb.Usage(prompt_tokens=4, completion_tokens=1)),
        pb.GenerateStreamResponse(text="", token_ids=[], expert=pb.ExpertRef(name="math", version=1),
                                  finish_reason="stop", usage=pb.Usage(prompt_tokens=4, completion_tokens=1)),
    ]
    chunks = [c for m in msgs for c in out.chunks(m)] + out.closing()
    assert chunks[0]["ccoe"]["route"]["rule_id"] == "both" and chunks[0]["model"] == "math@1+sql"
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in chunks[:-1]] == [
        (0, {"role": "assistant", "content": ""}), (0, {"content": "a"}),
        (1, {"role": "assistant", "content": ""}), (1, {"content": "b"}), (1, {}), (0, {})]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-2:] == ["length", "stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2,
                                                                    "total_tokens": 6}
    assert all(c["usage"] is None for c in chunks[:-1]) and len({c["id"] for c in chunks}) == 1
    json.dumps(chunks)  # every chunk is plain JSON


def test_a_unary_completion_with_logprobs():
    p = completion(logprobs=0)
    r = pb.GenerateResponse(request_id="rid", text="ab", token_ids=[7, 8], finish_reason="length",
                            logprobs=[-0.5, -1.0], usage=pb.Usage(prompt_tokens=3, completion_tokens=2), route=route())
    body = unary("completion", p, r, 9, lambda ids: ["a", "b"])
    assert body["id"] == "cmpl-rid" and body["model"] == "backbone" and body["created"] == 9
    assert body["choices"] == [{"index": 0, "finish_reason": "length", "token_ids": [7, 8], "text": "ab", "logprobs": {
        "tokens": ["a", "b"], "token_logprobs": [-0.5, -1.0], "top_logprobs": None, "text_offset": [0, 1]}}]
    assert body["usage"]["total_tokens"] == 5


def test_the_model_list_has_the_routes_then_the_served_experts():
    ids = [(m["id"], m["ccoe"]) for m in model_list([("math", 2), ("sql", 1)])["data"]]
    assert ids == [("auto", {"kind": "route"}), ("backbone", {"kind": "backbone"}),
                   ("math", {"kind": "expert", "serving_version": 2}),
                   ("sql", {"kind": "expert", "serving_version": 1})]
