"""The gRPC edge: turn any failure into a status code and a message the caller can act on."""

from __future__ import annotations

import logging

import grpc

from ccoe_common.serving.router_core import status_of

log = logging.getLogger(__name__)


def apply_error(grpc_context, error: BaseException) -> None:
    """Set code, details and (for retryable errors) `retry-after-ms` trailing metadata."""
    status = status_of(error)
    if status.code == "INTERNAL":
        log.error("request failed", exc_info=error)  # the one place a traceback is logged
    grpc_context.set_code(getattr(grpc.StatusCode, status.code, grpc.StatusCode.INTERNAL))
    grpc_context.set_details(str(status))
    if status.retryable:
        retry_ms = int((status.retry_after_s or 1.0) * 1000)
        grpc_context.set_trailing_metadata([("retry-after-ms", str(retry_ms))])


def metadata_of(grpc_context) -> dict[str, str]:
    return dict(grpc_context.invocation_metadata() if grpc_context else [])
