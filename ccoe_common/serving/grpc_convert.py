"""ccoe.v1 messages <-> engine requests and results. Validation names the proto field."""

from __future__ import annotations

import uuid

from ccoe_common.engine.params import GenerationRequest, SamplingParams, Usage
from ccoe_common.engine.templates import Template
from ccoe_common.errors import InvalidRequest
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.routing.resolve import Mode, Route, RouteQuery
from ccoe_common.serving.config import RouterConfig
from ccoe_common.serving.grpc_servicers import DECODE_ERROR_KEY

_TEMPLATES: dict[int, Template] = {pb.RAW: "raw", pb.ALPACA: "alpaca", pb.CHAT: "chat"}
_MODES: dict[int, Mode] = {pb.ROUTING_MODE_UNSPECIFIED: "AUTO", pb.AUTO: "AUTO", pb.RULES: "RULES",
                           pb.EXPERT: "EXPERT", pb.PLAN: "PLAN"}
DEFAULT_MAX_TOKENS = 64


def parse_request(req: pb.GenerateRequest, limits: RouterConfig) -> tuple[RouteQuery, GenerationRequest]:
    """The routing query and a base engine request (expert filled in per route later)."""
    if DECODE_ERROR_KEY in req.metadata:
        raise InvalidRequest("request", f"is not a valid ccoe.v1.GenerateRequest: {req.metadata[DECODE_ERROR_KEY]}")
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequest("prompt", "give prompt or messages")
    messages = None
    if which == "prompt":
        text = req.prompt
        if not text:
            raise InvalidRequest("prompt", "must not be empty")
    else:
        messages = [{"role": m.role, "content": m.content} for m in req.messages.messages]
        if not messages:
            raise InvalidRequest("messages", "must hold at least one message")
        text = "\n".join(m["content"] for m in messages)
    if len(text) > limits.max_prompt_chars:
        raise InvalidRequest("prompt", f"has {len(text)} characters; the limit is {limits.max_prompt_chars}")
    if req.template not in (pb.TEMPLATE_UNSPECIFIED, *_TEMPLATES):
        raise InvalidRequest("template", f"unknown value {req.template}")
    template = _TEMPLATES.get(req.template) or ("chat" if messages is not None else "raw")
    if req.routing not in _MODES:
        raise InvalidRequest("routing", f"unknown value {req.routing}")
    s = req.sampling
    sampling = SamplingParams.create(
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p or 1.0,
        repetition_penalty=s.repetition_penalty or 1.0,
        seed=s.seed if s.HasField("seed") else None,
        logprobs=s.logprobs,
        ignore_eos=s.ignore_eos,
        max_new_tokens=req.max_tokens or DEFAULT_MAX_TOKENS,
        stop=tuple(req.stop),
    )
    request_id = req.request_id or uuid.uuid4().hex
    if len(request_id) > 128:
        raise InvalidRequest("request_id", f"has {len(request_id)} characters; at most 128")
    metadata = dict(req.metadata)
    query = RouteQuery(
        text=text,
        mode=_MODES[req.routing],
        expert=req.expert.name or None,
        version=req.expert.version or None,
        domain=req.domain,
        metadata=metadata,
    )
    base = GenerationRequest(
        prompt=req.prompt if messages is None else None,
        messages=messages,
        template=template,
        sampling=sampling,
        request_id=request_id,
        timeout_s=req.timeout_ms / 1000 if req.timeout_ms else None,
    )
    return query, base


def route_trace(route: Route, versions: dict[str, int]) -> pb.RouteTrace:
    """The route as a message; versions pinned by replicas are filled in where known."""
    return pb.RouteTrace(
        policy=route.policy,
        rule_id=route.rule_id,
        reason=route.reason,
        experts=[pb.ExpertRef(name=n, version=versions.get(n, v or 0)) for n, v in route.experts],
    )


def usage(u: Usage | None) -> pb.Usage | None:
    return None if u is None else pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens)
