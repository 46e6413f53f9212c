"""Retry advice in gRPC trailing metadata, and how a server stream gets it through Ray Serve.

Every answer a caller may retry as it is (RESOURCE_EXHAUSTED, UNAVAILABLE) carries
`retry-after-ms`, on unary calls and on streams. Ray Serve's proxy copies a deployment's
code, details and trailing metadata onto the call only together with a message; an
exception from a stream carries the code and details, never the trailer (and Ray logs a
traceback for each). So a failing server stream sets its status, yields one empty message
(`TRAILER_CARRIER`) and ends; the proxy keeps a code set that way. The proxy-side handlers
(grpc_servicers.py) drop an empty message on a call whose code is an error, and give a
retryable answer that has no advice (Ray's own backpressure) the default.

Kept free of heavy imports: the proxy process loads it.
"""

from __future__ import annotations

import grpc

RETRY_AFTER_KEY = "retry-after-ms"
DEFAULT_RETRY_AFTER_S = 1.0
RETRYABLE_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
TRAILER_CARRIER = b""  # an empty message serializes to no bytes


def failed(context) -> bool:
    """Whether the call's code is set to an error (grpc.aio contexts start with 0 or None)."""
    code = context.code()
    return code not in (None, 0, grpc.StatusCode.OK)


def advise_retry(context) -> None:
    """Give a retryable answer without retry advice the default one (a proxy-side backstop)."""
    if context.code() not in RETRYABLE_CODES:
        return
    trailer = list(context.trailing_metadata() or ())
    if any(key == RETRY_AFTER_KEY for key, _ in trailer):
        return
    context.set_trailing_metadata((*trailer, (RETRY_AFTER_KEY, str(int(DEFAULT_RETRY_AFTER_S * 1000)))))
