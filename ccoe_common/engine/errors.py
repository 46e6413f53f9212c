"""Errors the engine reports for a request it accepted or refused. Each carries the status a
gRPC edge maps it to (`code`) and whether retrying the same request later can succeed
(`retryable`); see ccoe_common/errors.py for the family and for the errors the engine shares
with other layers (InvalidRequest, ExpertNotFound, ExpertNotReady)."""

from __future__ import annotations

from ccoe_common.errors import CCoEError


class EngineError(CCoEError):
    """A step failed: its requests fail with this, and the loop keeps serving the others."""

    code = "INTERNAL"


class Overloaded(EngineError):
    """The waiting queue is full. Retry after `retry_after_s` seconds, or on another replica."""

    code = "RESOURCE_EXHAUSTED"
    retryable = True

    def __init__(self, message: str, retry_after_s: float = 1.0):
        self.retry_after_s = retry_after_s
        super().__init__(f"{message}; retry in {retry_after_s:.1f}s or on another replica")


class DeadlineExceeded(EngineError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(EngineError):
    code = "CANCELLED"


class EngineStopped(EngineError):
    """The engine is shutting down; the request was not (or no longer) served."""

    code = "UNAVAILABLE"
    retryable = True
