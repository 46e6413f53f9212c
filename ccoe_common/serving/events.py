"""What crosses the router → replica boundary: typed events that Ray pickles as they are.

A replica's stream for one request is zero or more DeltaEvents, ending with one whose
`finish_reason` is set, or with one ErrorEvent. An error travels as data, not as a pickled
exception, and becomes an exception only where the router raises it (`ErrorEvent.to_error`):

    DeltaEvent(token_ids=[17], text="4", expert=ExpertKey("math", 2))
    DeltaEvent(token_ids=[2], text="", finish_reason="stop", expert=ExpertKey("math", 2),
               usage=Usage(prompt_tokens=9, completion_tokens=2), timings=Timings(0.001, 0.02, 0.05))
    ErrorEvent(code="NOT_FOUND", message="expert law is not served here; resident experts: ['math@2']")
"""

from __future__ import annotations

from dataclasses import dataclass

from ccoe_common.engine.params import Timings, TokenDelta, Usage
from ccoe_common.errors import CCoEError
from ccoe_common.experts.reference import ExpertKey


class ServingError(CCoEError):
    """An error whose status is known only at run time (one a replica reported, an unexpected
    exception at the edge): `code` is a grpc.StatusCode name, e.g.
    ServingError("FAILED_PRECONDITION", "rule 'legal' consults 5 experts; the limit is 4")."""

    def __init__(self, code: str, message: str, retryable: bool = False, retry_after_s: float | None = None):
        self.code = code
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        super().__init__(message)


@dataclass(frozen=True)
class DeltaEvent:
    """One engine step's output for one request (TokenDelta without the request id, which
    the router already knows)."""

    token_ids: list[int]  # the token ids this step produced
    text: str  # the text they complete; "" while a multi-byte character or a stop string is pending
    logprobs: list[float] | None = None  # one per token id, when the request asked for them
    finish_reason: str | None = None  # "stop" | "length" on the request's last event, else None
    expert: ExpertKey | None = None  # the version the replica pinned; None for the bare backbone
    usage: Usage | None = None  # token counts, on the last event only
    timings: Timings | None = None  # seconds from the replica's submission, on the last event only

    @classmethod
    def from_delta(cls, delta: TokenDelta) -> DeltaEvent:
        return cls(token_ids=delta.token_ids, text=delta.text, logprobs=delta.logprobs,
                   finish_reason=delta.finish_reason, expert=delta.expert, usage=delta.usage, timings=delta.timings)


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed on the replica; the last event of its stream."""

    code: str  # the grpc.StatusCode name the caller gets, e.g. "NOT_FOUND"
    message: str  # what went wrong and what to do, as the replica's error said it
    retryable: bool = False  # whether the same request may succeed later
    retry_after_s: float | None = None  # when to retry, if the replica knows (Overloaded does)

    @classmethod
    def from_error(cls, error: CCoEError) -> ErrorEvent:
        return cls(code=error.code, message=str(error), retryable=error.retryable, retry_after_s=error.retry_after_s)

    def to_error(self) -> ServingError:
        """The exception the router raises for this event, with the same status and message."""
        return ServingError(self.code, self.message, self.retryable, self.retry_after_s)


Event = DeltaEvent | ErrorEvent
