"""What crosses the router → replica boundary: plain dicts, so Ray pickles nothing of ours
that could drift between processes, and errors arrive as data instead of wrapped exceptions.

    {"kind": "delta", "token_ids": [17], "text": "4", "expert": ["math", 2], "finish_reason": None, ...}
    {"kind": "error", "code": "NOT_FOUND", "message": "expert law is not served here ...", "retryable": False}
"""

from __future__ import annotations

from typing import Any

from ccoe_common.engine.params import TokenDelta
from ccoe_common.errors import CCoEError

Event = dict[str, Any]


def delta_event(d: TokenDelta) -> Event:
    return {
        "kind": "delta",
        "token_ids": d.token_ids,
        "text": d.text,
        "logprobs": d.logprobs,
        "finish_reason": d.finish_reason,
        "expert": None if d.expert is None else [d.expert.name, d.expert.version],
        "usage": None if d.usage is None else [d.usage.prompt_tokens, d.usage.completion_tokens],
        "timings": None if d.timings is None else [d.timings.queue_s, d.timings.ttft_s, d.timings.total_s],
    }


def error_event(e: CCoEError) -> Event:
    return {
        "kind": "error",
        "code": e.code,
        "message": str(e),
        "retryable": e.retryable,
        "retry_after_s": e.retry_after_s,
    }


class ServingError(CCoEError):
    """An error whose status is known only at run time (one a replica reported, an unexpected
    exception at the edge): `code` is a grpc.StatusCode name, e.g.
    ServingError("FAILED_PRECONDITION", "rule 'legal' consults 5 experts; the limit is 4")."""

    def __init__(self, code: str, message: str, retryable: bool = False, retry_after_s: float | None = None):
        self.code = code
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        super().__init__(message)

    @classmethod
    def from_event(cls, event: Event) -> ServingError:
        return cls(event["code"], event["message"], event.get("retryable", False), event.get("retry_after_s"))
