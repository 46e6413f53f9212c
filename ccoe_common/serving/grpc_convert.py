"""ccoe.v1 messages <-> engine requests and results. Validation names the proto field and, for a
limit, the setting (RouterConfig), and quotes at most a short prefix of a bad value."""

from __future__ import annotations

import uuid

from ccoe_common.engine.params import GenerationRequest, SamplingParams, Usage
from ccoe_common.engine.templates import Template
from ccoe_common.errors import InvalidRequest, quote
from ccoe_common.experts.reference import NAME_RE
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.pb.lenient import Undecodable
from ccoe_common.routing.resolve import Mode, Route, RouteQuery
from ccoe_common.serving.config import RouterConfig

_TEMPLATES: dict[int, Template] = {pb.RAW: "raw", pb.ALPACA: "alpaca", pb.CHAT: "chat"}
_MODES: dict[int, Mode] = {pb.ROUTING_MODE_UNSPECIFIED: "AUTO", pb.AUTO: "AUTO", pb.RULES: "RULES", pb.EXPERT: "EXPERT",
          pb.PLAN: "PLAN", pb.BACKBONE: "BACKBONE"}
DEFAULT_MAX_TOKENS = 64


def _check_limits(req: pb.GenerateRequest, limits: RouterConfig) -> None:
    """The size limits, before anything else reads the fields they bound."""
    metadata = req.metadata
    if len(metadata) > limits.max_metadata_keys:
        raise InvalidRequest("metadata", f"{len(metadata)} keys, over router.max_metadata_keys "
                                         f"({limits.max_metadata_keys})")
    total = 0
    for key, value in metadata.items():
        if len(key) > limits.max_metadata_key_chars:
            raise InvalidRequest("metadata", f"key {quote(key)} is longer than router.max_metadata_key_chars "
                                             f"({limits.max_metadata_key_chars})")
        if len(value) > limits.max_metadata_value_chars:
            raise InvalidRequest(f"metadata[{quote(key, 32)}]", f"value {quote(value)} is longer than "
                                 f"router.max_metadata_value_chars ({limits.max_metadata_value_chars})")
        total += len(key.encode()) + len(value.encode())
    if total > limits.max_metadata_bytes:
        raise InvalidRequest("metadata", f"{total} bytes of keys and values, over router.max_metadata_bytes "
                                         f"({limits.max_metadata_bytes})")
    if len(req.domain) > limits.max_domain_chars:
        raise InvalidRequest("domain", f"{quote(req.domain)} is longer than router.max_domain_chars "
                                       f"({limits.max_domain_chars})")
    if len(req.stop) > limits.max_stop_strings:
        raise InvalidRequest("stop", f"{len(req.stop)} strings, over router.max_stop_strings "
                                     f"({limits.max_stop_strings})")
    for i, stop in enumerate(req.stop):
        if not stop or len(stop) > limits.max_stop_chars:
            raise InvalidRequest(f"stop[{i}]", f"{quote(stop)} must be 1 to {limits.max_stop_chars} characters "
                                               "(router.max_stop_chars)")
    if len(req.request_id) > limits.max_request_id_chars:
        raise InvalidRequest("request_id", f"{quote(req.request_id)} is longer than router.max_request_id_chars "
                                           f"({limits.max_request_id_chars})")
    if req.expert.name and not NAME_RE.fullmatch(req.expert.name):
        raise InvalidRequest("expert.name", f"{quote(req.expert.name)} is not an expert name (lowercase letters, "
                                            "digits, '_', '.', '-'; at most 63 characters)")
    if req.WhichOneof("input") == "messages" and len(req.messages.messages) > limits.max_messages:
        raise InvalidRequest("messages", f"{len(req.messages.messages)} messages, over router.max_messages "
                                         f"({limits.max_messages})")


def parse_request(req: pb.GenerateRequest, limits: RouterConfig) -> tuple[RouteQuery, GenerationRequest]:
    """The routing query and a base engine request (expert filled in per route later)."""
    if isinstance(req, Undecodable):  # answered at the gRPC edge already; kept for any other way in
        raise InvalidRequest("request", req.reason)
    _check_limits(req, limits)
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
    # Roles count too: the chat template renders them, and they have no limit of their own.
    chars = len(text) + (sum(len(m["role"]) for m in messages) if messages is not None else 0)
    if chars > limits.max_prompt_chars:
        field = "prompt" if messages is None else "messages"
        raise InvalidRequest(field, f"has {chars} characters; the limit is {limits.max_prompt_chars} "
                                    "(router.max_prompt_chars)")
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
