"""Our statuses as HTTP: one table from the gRPC status name to the HTTP status and OpenAI's
error `type`, and the error object OpenAI clients parse:

    {"error": {"message": "temperature: must be in [0, 10] (0 = greedy), got 11.0",
               "type": "invalid_request_error", "param": "temperature", "code": "INVALID_ARGUMENT"}}

`message` is the gRPC API's message for the same request; `code` is its gRPC status name.
The HTTP statuses follow grpc-gateway's mapping (google.rpc.Code), which is also what
OpenAI's own API answers for the cases it shares (400, 401, 403, 404, 429, 503).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ccoe_common.errors import CCoEError, InvalidRequest
from ccoe_common.serving.grpc_status import clip_details

# gRPC status name -> (HTTP status, OpenAI error type)
HTTP_STATUS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "ABORTED": (409, "conflict_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled_error"),
    "UNIMPLEMENTED": (501, "not_implemented_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
}
SERVER_ERROR = (500, "server_error")


class HTTPError(CCoEError):
    """A refusal that exists only over HTTP (a path, a method, a body that is not JSON), with
    the status to answer, e.g. HTTPError(405, "/v1/models takes GET, not POST", "UNIMPLEMENTED")."""

    def __init__(self, status: int, message: str, code: str = "INVALID_ARGUMENT",
                 kind: str = "invalid_request_error"):
        self.status = status
        self.code = code
        self.kind = kind
        super().__init__(message)


@dataclass(frozen=True)
class ErrorReply:
    """What the edge sends for a failure: status, headers and OpenAI's error object."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def error_reply(error: CCoEError, param_names: dict[str, str] | None = None) -> ErrorReply:
    """The reply for `error` (already passed through `status_of`). `param_names` renames a
    field the core names differently from the OpenAI request, e.g. {"max_new_tokens": "max_tokens"}."""
    if isinstance(error, HTTPError):
        status, kind = error.status, error.kind
    else:
        status, kind = HTTP_STATUS.get(error.code, SERVER_ERROR)
    message = clip_details(str(error))
    param = getattr(error, "param", None) if isinstance(error, InvalidRequest) else None
    if param is not None and param_names and param in param_names:
        renamed = param_names[param]
        message = renamed + message[len(param):] if message.startswith(param) else message
        param = renamed
    headers: dict[str, str] = {}
    if error.retryable:
        after = error.retry_after_s or 1.0
        # Retry-After is whole seconds (RFC 9110); the openai SDKs read retry-after-ms first.
        headers["retry-after"] = str(max(1, math.ceil(after)))
        headers["retry-after-ms"] = str(int(after * 1000))
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    body = {"error": {"message": message, "type": kind, "param": param, "code": error.code}}
    return ErrorReply(status, body, headers)
