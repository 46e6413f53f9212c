"""OpenAI request bodies, validated, and turned into the `GenerateRequest` a gRPC client would
send for the same thing, so both front doors share one router path:

    {"model": "math@2", "messages": [{"role": "user", "content": "12 + 7?"}], "max_tokens": 8,
     "temperature": 0, "metadata": {"domain": "math"}}
    -> GenerateRequest(messages=[...], routing=EXPERT, expert=ExpertRef("math", 2), max_tokens=8,
                       domain="math", ...)

`model` addresses the route: "auto" (explicit expert, rules, default), "backbone" (the bare
backbone), "plan" (expert planning), "<expert>" (its serving version) or "<expert>@<version>".
Routing inputs come from the body's `metadata` (`domain`, `tenant`, `app`, any rule key) or the
headers `X-CCoE-Domain`, `X-CCoE-Tenant`, `X-CCoE-App`; the body wins where both are given.

Sampling values are checked by the engine's own `SamplingParams.create` before they are put in
the (32-bit, unsigned) proto fields, so an out-of-range value gets the gRPC API's message,
named as the OpenAI field: `max_tokens: must be in [1, 1000000], got 0`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ccoe_common.engine.params import SamplingParams
from ccoe_common.errors import InvalidRequest, quote
from ccoe_common.experts.reference import NAME_RE
from ccoe_common.pb import inference_pb2 as pb

AUTO, BACKBONE, PLAN = "auto", "backbone", "plan"
ROUTE_MODELS: dict[str, pb.RoutingMode] = {AUTO: pb.AUTO, BACKBONE: pb.BACKBONE, PLAN: pb.PLAN}
_MODEL_RE = re.compile(r"^(?P<name>[^@]+)(?:@(?P<version>[0-9]{1,10}))?$")
MAX_VERSION = 2**32 - 1
# Headers that carry routing inputs: header -> the metadata key rules match on.
ROUTING_HEADERS = {"x-ccoe-domain": "domain", "x-ccoe-tenant": "tenant", "x-ccoe-app": "app"}
TIMEOUT_HEADER = "x-ccoe-timeout-ms"
REQUEST_ID_HEADER = "x-request-id"
# Fields OpenAI clients send that change nothing here; anything else unknown is refused by name.
IGNORED_FIELDS = frozenset({"store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"})
# Names the core uses for a field that the OpenAI request names differently.
PARAM_NAMES = {"max_new_tokens": "max_tokens", "expert.name": "model", "expert": "model",
               "request_id": REQUEST_ID_HEADER}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _Request(BaseModel):
    """Fields both endpoints take. `top_k`, `repetition_penalty` and `ignore_eos` are
    extensions under vLLM's names (send them with the SDK's `extra_body`)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    template: Literal["raw", "alpaca"] | None = None  # extension: "alpaca" wraps the prompt as an instruction


@dataclass(frozen=True)
class Parsed:
    """A validated HTTP request: the GenerateRequest to route, and what its reply needs."""

    request: pb.GenerateRequest
    model: str  # the `model` the caller asked for
    stream: bool
    include_usage: bool  # stream_options.include_usage
    logprobs: bool  # the reply carries the chosen tokens' log-probabilities


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def load(kind: type[_Request], body: Any) -> _Request:
    """`body` (decoded JSON) as `kind`, or InvalidRequest naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", f"must be a JSON object, got {type(body).__name__}")
    try:
        parsed = kind.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        raise InvalidRequest(_field_path(tuple(err["loc"])),
                             f"{err['msg']} (got {quote(err.get('input'))})") from e
    for name in sorted(set(parsed.model_extra or {}) - IGNORED_FIELDS):
        raise InvalidRequest(name, f"is not a parameter this API takes (one of {sorted(kind.model_fields)})")
    return parsed


def route_of(model: str) -> tuple[pb.RoutingMode, pb.ExpertRef | None]:
    """The routing mode and explicit expert `model` names, e.g. "math@2" -> (EXPERT, math@2)."""
    if model in ROUTE_MODELS:
        return ROUTE_MODELS[model], None
    m = _MODEL_RE.fullmatch(model)
    if m is None or not NAME_RE.fullmatch(m["name"]):
        raise InvalidRequest("model", f"{quote(model)} is not a model: use 'auto', 'backbone', 'plan', an expert "
                                      "name (lowercase letters, digits, '_', '.', '-') or 'name@version'")
    version = int(m["version"]) if m["version"] else 0
    if m["version"] and not 1 <= version <= MAX_VERSION:
        raise InvalidRequest("model", f"version in {quote(model)} must be 1 to {MAX_VERSION}")
    return pb.EXPERT, pb.ExpertRef(name=m["name"], version=version)


def _refuse_unserved(body: _Request) -> None:
    """Features a client may ask for that this server does not have: refused by name, never ignored."""
    if body.n not in (None, 1):
        raise InvalidRequest("n", f"only 1 choice per request is served, got {body.n}")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise InvalidRequest(name, f"is not served (only 0), got {getattr(body, name)}; "
                                       "repetition_penalty is (an extension field)")
    if body.logit_bias:
        raise InvalidRequest("logit_bias", "is not served")
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs not in (None, 0):
            raise InvalidRequest("top_logprobs", f"only the chosen token's log-probability is served (0), "
                                                 f"got {body.top_logprobs}")
        if body.tools or body.functions or body.tool_choice not in (None, "none") or body.function_call is not None:
            raise InvalidRequest("tools", "tool and function calling is not served")
        if body.response_format is not None and body.response_format.get("type") != "text":
            raise InvalidRequest("response_format", f"only {{'type': 'text'}} is served, "
                                                    f"got {quote(body.response_format)}")
    else:
        assert isinstance(body, CompletionRequest)
        if body.logprobs not in (None, 0):
            raise InvalidRequest("logprobs", "only the chosen token's log-probability is served (0), "
                                             f"got {body.logprobs}")
        if body.echo:
            raise InvalidRequest("echo", "is not served")
        if body.best_of not in (None, 1):
            raise InvalidRequest("best_of", f"only 1 is served, got {body.best_of}")
        if body.suffix:
            raise InvalidRequest("suffix", "is not served")


def _check_sampling(values: dict[str, Any]) -> None:
    """Range checks with the engine's messages, under the OpenAI field names."""
    given = {k: v for k, v in values.items() if v is not None}
    try:
        SamplingParams.create(**given)
    except InvalidRequest as e:
        raise InvalidRequest(PARAM_NAMES.get(e.param, e.param), str(e)[len(e.param) + 2:]) from e


def _messages(messages: list[ChatMessage]) -> list[pb.ChatMessage]:
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise InvalidRequest(f"messages[{i}].role", f"must be 'system', 'developer', 'user' or 'assistant', "
                                                        f"got {quote(m.role)}")
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"messages[{i}].content[{j}]", f"only text parts are served "
                                         f"({{'type': 'text', 'text': str}}), got type {quote(part.get('type'))}")
                texts.append(part["text"])
            content = "".join(texts)
        out.append(pb.ChatMessage(role=role, content=content or ""))
    return out


def _prompt(body: CompletionRequest) -> str:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise InvalidRequest("prompt", "must be one string (a batch of prompts or token ids is not served); "
                                           "send one request per prompt")
        prompt = prompt[0]
    assert isinstance(prompt, str)
    return prompt


def to_generate_request(body: _Request, headers: Mapping[str, str], request_id: str,
                        default_max_tokens: int) -> Parsed:
    """The GenerateRequest for an OpenAI request. `headers` have lowercase names;
    `default_max_tokens` applies when the body gives none (OpenAI's default: the rest of the context)."""
    _refuse_unserved(body)
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != body.max_completion_tokens:
            raise InvalidRequest("max_completion_tokens", f"{body.max_completion_tokens} disagrees with max_tokens "
                                                          f"{max_tokens}; give one")
        max_tokens = body.max_completion_tokens
    # OpenAI samples at temperature 1 unless told otherwise; the proto's 0 would mean greedy.
    temperature = 1.0 if body.temperature is None else body.temperature
    _check_sampling({"temperature": temperature, "top_p": body.top_p, "top_k": body.top_k,
                     "repetition_penalty": body.repetition_penalty, "seed": body.seed,
                     "max_new_tokens": max_tokens})
    routing, expert = route_of(body.model)
    req = pb.GenerateRequest(request_id=request_id, routing=routing, max_tokens=max_tokens or default_max_tokens)
    if expert is not None:
        req.expert.CopyFrom(expert)
    asked: bool | int | None = body.logprobs if isinstance(body, (ChatCompletionRequest, CompletionRequest)) else None
    logprobs = asked is not None and asked is not False  # a completion's `logprobs: 0` asks for them
    req.sampling.CopyFrom(pb.SamplingParams(
        temperature=temperature, top_k=body.top_k or 0, top_p=body.top_p or 0.0,
        repetition_penalty=body.repetition_penalty or 0.0, logprobs=logprobs, ignore_eos=bool(body.ignore_eos)))
    if body.seed is not None:
        req.sampling.seed = body.seed
    if isinstance(body, ChatCompletionRequest):
        if not body.messages:
            raise InvalidRequest("messages", "must hold at least one message")
        req.messages.messages.extend(_messages(body.messages))
    else:
        assert isinstance(body, CompletionRequest)
        req.prompt = _prompt(body)
        req.template = pb.ALPACA if body.template == "alpaca" else pb.RAW
    if body.stop is not None:
        req.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    metadata = {key: headers[h] for h, key in ROUTING_HEADERS.items() if h in headers}
    if body.user is not None:
        metadata["user"] = body.user
    metadata.update(body.metadata or {})
    domain = metadata.pop("domain", "")
    req.domain = domain
    req.metadata.update(metadata)
    if TIMEOUT_HEADER in headers:
        raw = headers[TIMEOUT_HEADER]
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_VERSION:
            raise InvalidRequest(TIMEOUT_HEADER, f"must be whole milliseconds, 1 to {MAX_VERSION}, got {quote(raw)}")
        req.timeout_ms = int(raw)
    return Parsed(request=req, model=body.model, stream=bool(body.stream),
                  include_usage=bool(body.stream_options and body.stream_options.include_usage), logprobs=logprobs)
