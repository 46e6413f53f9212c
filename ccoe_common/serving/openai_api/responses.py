"""Router results as OpenAI JSON: `chat.completion` / `text_completion` objects, and the chunks
of a stream.

Extensions (fields OpenAI clients keep as extras): every reply's top-level `ccoe` object carries
the route trace and the request id (on a stream: in the first chunk), and each choice carries
`token_ids`, the tokens it holds (vLLM's name), so a caller can compare answers token for token.
`model` names the expert and version that answered, e.g. "math@2"; "backbone" for the bare
backbone; experts consulted together (a fan-out rule) answer as one choice each, and `model`
joins them with "+".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.serving.openai_api.protocol import BACKBONE, Parsed

# Token ids -> the text of each token alone (for logprobs entries).
TokenTexts = Callable[[Sequence[int]], list[str]]


def model_name(route: pb.RouteTrace) -> str:
    return "+".join(f"{e.name}@{e.version}" if e.version else e.name for e in route.experts) or BACKBONE


def route_json(route: pb.RouteTrace) -> dict[str, Any]:
    return {"policy": route.policy, "rule_id": route.rule_id, "reason": route.reason,
            "experts": [{"name": e.name, "version": e.version} for e in route.experts]}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_logprobs(ids: Sequence[int], lps: Sequence[float], texts: TokenTexts) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, lp in zip(texts(ids), lps, strict=True)]}


def _completion_logprobs(ids: Sequence[int], lps: Sequence[float], texts: TokenTexts, offset: int) -> dict[str, Any]:
    tokens = texts(ids)
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": None, "text_offset": offsets}


def _ids(kind: str, request_id: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"


def unary(kind: str, parsed: Parsed, r: pb.GenerateResponse, created: int, texts: TokenTexts) -> dict[str, Any]:
    """The reply to a non-streamed request; `kind` is "chat" or "completion"."""
    answers: list[tuple[str, list[int], str, list[float] | None]]
    if r.fanout:
        answers = [(f.text, list(f.token_ids), f.finish_reason, None) for f in r.fanout]
        answers[0] = (*answers[0][:3], list(r.logprobs) if parsed.logprobs else None)
        prompt = r.fanout[0].usage.prompt_tokens
        completion = sum(f.usage.completion_tokens for f in r.fanout)
    else:
        answers = [(r.text, list(r.token_ids), r.finish_reason, list(r.logprobs) if parsed.logprobs else None)]
        prompt, completion = r.usage.prompt_tokens, r.usage.completion_tokens
    choices = []
    for i, (text, ids, finish, lps) in enumerate(answers):
        choice: dict[str, Any] = {"index": i, "finish_reason": finish, "token_ids": ids}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = None if lps is None else _chat_logprobs(ids, lps, texts)
        else:
            choice["text"] = text
            choice["logprobs"] = None if lps is None else _completion_logprobs(ids, lps, texts, 0)
        choices.append(choice)
    return {"id": _ids(kind, parsed.request.request_id), "object": "chat.completion" if kind == "chat"
            else "text_completion", "created": created, "model": model_name(r.route), "choices": choices,
            "usage": _usage(prompt, completion), "system_fingerprint": None,
            "ccoe": {"route": route_json(r.route), "request_id": r.request_id or parsed.request.request_id}}


class StreamChunks:
    """Turns the router's stream messages into OpenAI chunks, one request at a time.

    chat: a role chunk opens each choice, content chunks follow, a chunk with an empty delta
    and `finish_reason` closes it. completion: text chunks, the last with `finish_reason`.
    With stream_options.include_usage every chunk has `usage: null` and a last chunk with no
    choices carries the totals, as OpenAI's API does.
    """

    def __init__(self, kind: str, parsed: Parsed, created: int, texts: TokenTexts):
        self.kind, self.parsed, self.texts = kind, parsed, texts
        self.id = _ids(kind, parsed.request.request_id)
        self.created = created
        self.model = parsed.model
        self.names: list[str] = []
        self.opened: set[int] = set()
        self.offsets: dict[int, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        chunk: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat"
                                 else "text_completion", "created": self.created, "model": self.model,
                                 "choices": choices, "system_fingerprint": None, **extra}
        if self.parsed.include_usage:
            chunk.setdefault("usage", None)
        return chunk

    def chunks(self, msg: pb.GenerateStreamResponse) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        first_extra: dict[str, Any] = {}
        if msg.HasField("route"):
            self.names = [e.name for e in msg.route.experts]
            self.model = model_name(msg.route)
            first_extra = {"ccoe": {"route": route_json(msg.route), "request_id": self.parsed.request.request_id}}
        index = self.names.index(msg.expert.name) if msg.expert.name in self.names else 0
        if msg.HasField("usage"):
            self.prompt_tokens = max(self.prompt_tokens, msg.usage.prompt_tokens)
            self.completion_tokens += msg.usage.completion_tokens
        ids, lps = list(msg.token_ids), list(msg.logprobs)
        if self.kind == "chat":
            if index not in self.opened:
                self.opened.add(index)
                out.append(self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}], **first_extra))
                first_extra = {}
            if ids or msg.text:
                logprobs = _chat_logprobs(ids, lps, self.texts) if self.parsed.logprobs and lps else None
                out.append(self._chunk([{"index": index, "delta": {"content": msg.text}, "logprobs": logprobs,
                                         "finish_reason": None, "token_ids": ids}]))
            if msg.finish_reason:
                out.append(self._chunk([{"index": index, "delta": {}, "logprobs": None,
                                         "finish_reason": msg.finish_reason}]))
        elif ids or msg.text or msg.finish_reason:
            offset = self.offsets.get(index, 0)
            logprobs = (_completion_logprobs(ids, lps, self.texts, offset)
                        if self.parsed.logprobs and lps else None)
            self.offsets[index] = offset + len(msg.text)
            out.append(self._chunk([{"index": index, "text": msg.text, "logprobs": logprobs,
                                     "finish_reason": msg.finish_reason or None, "token_ids": ids}], **first_extra))
        return out

    def closing(self) -> list[dict[str, Any]]:
        """What follows the last message: the usage chunk, when asked for."""
        if not self.parsed.include_usage:
            return []
        return [self._chunk([], usage=_usage(self.prompt_tokens, self.completion_tokens))]


def model_entry(model_id: str, kind: str, serving_version: int | None = None) -> dict[str, Any]:
    """One `GET /v1/models` entry; `ccoe.kind` is "route", "backbone" or "expert"."""
    ext: dict[str, Any] = {"kind": kind}
    if kind == "expert":
        ext["serving_version"] = serving_version
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "ccoe", "ccoe": ext}


def model_list(experts: Sequence[tuple[str, int | None]]) -> dict[str, Any]:
    """`auto`, `backbone`, then every served expert with its serving version (None before the
    router has the registry's view)."""
    data = [model_entry("auto", "route"), model_entry(BACKBONE, "backbone")]
    data += [model_entry(name, "expert", version) for name, version in experts]
    return {"object": "list", "data": data}
