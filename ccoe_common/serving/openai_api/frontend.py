"""The OpenAI-compatible HTTP API's handler: what the Router deployment's HTTP ingress calls.

    POST /v1/chat/completions   POST /v1/completions   (unary, or SSE with "stream": true)
    GET  /v1/models             GET  /v1/models/{id}

Every call is authorized as the gRPC method it stands for (`ccoe.v1.Inference/Generate` or
`GenerateStream`; listing models as `Generate`), with the same bearer tokens, before its body
is looked at. A streamed request holds its HTTP status back until the router yields its first
message, so a refusal (429 from admission, 404 for an unknown expert) is a status, not an
event in a 200 stream. A client that disconnects cancels the request (Ray Serve cancels the
handler; leaving the stream closes the router's stream, which cancels the engine request).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ccoe_common.auth.guard import INFERENCE, Guard
from ccoe_common.engine.params import SamplingParams
from ccoe_common.errors import CCoEError, ExpertNotFound
from ccoe_common.model.checkpoint import load_tokenizer
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.serving.events import ServingError
from ccoe_common.serving.openai_api import responses, sse
from ccoe_common.serving.openai_api.errors import HTTPError, error_reply
from ccoe_common.serving.openai_api.protocol import (
    PARAM_NAMES,
    REQUEST_ID_HEADER,
    ChatCompletionRequest,
    CompletionRequest,
    load,
    to_generate_request,
)
from ccoe_common.serving.router_core import RouterCore, status_of

log = logging.getLogger(__name__)
CHAT, COMPLETIONS, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/models"
# JSON may spell a character as a 6-byte \uXXXX escape; the rest is room for the other fields.
BODY_BYTES_PER_PROMPT_CHAR = 6
BODY_OVERHEAD_BYTES = 1 << 20
MAX_NEW_TOKENS: int = next(m.le for m in SamplingParams.model_fields["max_new_tokens"].metadata if hasattr(m, "le"))


class OpenAIFrontend:
    def __init__(self, core: RouterCore, guard: Guard):
        self.core = core
        self.guard = guard
        limits = core.config.router
        self.max_body_bytes = BODY_BYTES_PER_PROMPT_CHAR * limits.max_prompt_chars + BODY_OVERHEAD_BYTES
        # OpenAI's default for an absent max_tokens is the rest of the context; the engine caps
        # a request at its max_seq_len, so asking for that much means exactly that.
        self.default_max_tokens = min(core.config.replica.engine.max_seq_len, MAX_NEW_TOKENS)
        self._tokenizer: Any = None

    async def handle(self, request: Request) -> Response:
        """Any HTTP request to the app -> its response; never raises (the HTTP edge)."""
        try:
            return await self._dispatch(request)
        except Exception as e:  # noqa: BLE001 - the HTTP edge: every failure becomes a status
            return self.error_response(e)

    def error_response(self, error: BaseException) -> JSONResponse:
        status = status_of(error)
        if status.code == "INTERNAL" and not isinstance(status, HTTPError):
            log.error("HTTP request failed", exc_info=error)  # the one place its traceback is logged
        reply = error_reply(status, PARAM_NAMES)
        return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)

    async def _dispatch(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        headers = {k.lower(): v for k, v in request.headers.items()}
        if path == MODELS or path.startswith(MODELS + "/"):
            self._only(request, "GET")
            self.guard.check(f"{INFERENCE}/Generate", headers)
            return JSONResponse(self._models(path[len(MODELS) + 1:] or None))
        if path in (CHAT, COMPLETIONS):
            self._only(request, "POST")
            return await self._generate("chat" if path == CHAT else "completion", request, headers)
        raise HTTPError(404, f"no route {request.method} {path or '/'}; this API serves POST {CHAT}, "
                             f"POST {COMPLETIONS} and GET {MODELS}", code="NOT_FOUND", kind="not_found_error")

    @staticmethod
    def _only(request: Request, method: str) -> None:
        if request.method != method:
            raise HTTPError(405, f"{request.url.path} takes {method}, not {request.method}",
                            code="UNIMPLEMENTED", kind="invalid_request_error")

    def _models(self, model_id: str | None) -> dict[str, Any]:
        serving = self.core.serving
        experts: list[tuple[str, int | None]] = (
            sorted(serving.items()) if serving is not None else [(n, None) for n in sorted(self.core.known_experts)])
        listing = responses.model_list(experts)
        if model_id is None:
            return listing
        for entry in listing["data"]:
            if entry["id"] == model_id:
                return entry
        raise ExpertNotFound(f"model {model_id!r} is not served; models: {[e['id'] for e in listing['data']]}")

    async def _body(self, request: Request) -> tuple[Any, CCoEError | None]:
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            return None, HTTPError(413, f"request body: {len(raw)} bytes, over the limit of {self.max_body_bytes} "
                                        f"({BODY_BYTES_PER_PROMPT_CHAR} x router.max_prompt_chars + 1 MiB)")
        try:
            return json.loads(raw), None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return None, HTTPError(400, f"request body: not valid JSON: {e}")

    async def _generate(self, kind: str, request: Request, headers: dict[str, str]) -> Response:
        body, refusal = await self._body(request)
        stream = isinstance(body, dict) and body.get("stream") is True
        # Who is calling comes before anything about the body: no token, no validation help.
        principal = self.guard.check(f"{INFERENCE}/{'GenerateStream' if stream else 'Generate'}", headers)
        if refusal is not None:
            raise refusal
        typed = load(ChatCompletionRequest if kind == "chat" else CompletionRequest, body)
        request_id = headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        parsed = to_generate_request(typed, headers, request_id, self.default_max_tokens)
        self.guard.bind_tenant(principal, parsed.request.metadata)
        created = int(time.time())
        reply_headers = {REQUEST_ID_HEADER: request_id}
        if not parsed.stream:
            result = await self.core.generate(parsed.request, headers)
            return JSONResponse(responses.unary(kind, parsed, result, created, self._texts), headers=reply_headers)
        messages = self.core.generate_stream(parsed.request, headers)
        try:
            first = await anext(messages)
        except BaseException:
            await _close(messages)
            raise
        chunks = responses.StreamChunks(kind, parsed, created, self._texts)
        return StreamingResponse(self._events(chunks, first, messages), media_type=sse.MEDIA_TYPE,
                                 headers={**reply_headers, "cache-control": "no-cache"})

    async def _events(self, chunks: responses.StreamChunks, first: pb.GenerateStreamResponse,
                      messages: AsyncIterator[pb.GenerateStreamResponse]) -> AsyncIterator[bytes]:
        try:
            for chunk in chunks.chunks(first):
                yield sse.event(chunk)
            async for message in messages:
                for chunk in chunks.chunks(message):
                    yield sse.event(chunk)
            for chunk in chunks.closing():
                yield sse.event(chunk)
        except Exception as e:  # the status is sent already: the error goes in the stream
            status = status_of(e)
            if status.code == "INTERNAL":
                log.error("HTTP stream failed", exc_info=e)
            yield sse.event(error_reply(status, PARAM_NAMES).body)
        finally:
            # Also on a client disconnect (CancelledError here): closing the router's stream
            # cancels the engine request, so its slot is free at the next step.
            await _close(messages)
        yield sse.DONE

    def _texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text, for logprobs entries (the backbone's tokenizer, loaded on first use)."""
        if self._tokenizer is None:
            try:
                self._tokenizer = load_tokenizer(self.core.config.backbone)
            except OSError as e:
                raise ServingError("FAILED_PRECONDITION", "logprobs need the backbone's tokenizer, which this router "
                                   f"cannot read at {self.core.config.backbone}: {e}") from e
            if self._tokenizer is None:
                raise ServingError("FAILED_PRECONDITION", f"logprobs need the backbone's tokenizer; "
                                                          f"{self.core.config.backbone} has none")
        return [self._tokenizer.decode([i]) for i in ids]


async def _close(stream: AsyncIterator[object]) -> None:
    """Close the router's stream now (an async generator; typed as an iterator upstream)."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
