"""The gRPC edge: turn any failure into a status code and a message the caller can act on."""

from __future__ import annotations

import logging

import grpc

from ccoe_common.serving.router_core import status_of
from ccoe_common.serving.trailers import DEFAULT_RETRY_AFTER_S, RETRY_AFTER_KEY

log = logging.getLogger(__name__)
# gRPC sends the message in a trailer, percent-encoded (up to 3 bytes per UTF-8 byte), and a
# client refuses trailers over 8 KiB (grpc.max_metadata_size): a longer message reaches the
# client as `RESOURCE_EXHAUSTED: Stream removed` instead of the error. Messages quote short
# prefixes of bad values (ccoe_common.errors.quote); this cap catches the rest.
MAX_DETAILS_BYTES = 1024


def clip_details(text: str, max_bytes: int = MAX_DETAILS_BYTES) -> str:
    """`text` cut to at most `max_bytes` of UTF-8 (on a character boundary), saying it was cut."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= max_bytes:
        return text
    marker = f"… ({len(raw)} bytes, cut)"
    return raw[:max_bytes - len(marker.encode())].decode("utf-8", "ignore") + marker


def apply_error(grpc_context, error: BaseException) -> None:
    """Set code, details and (for retryable errors) `retry-after-ms` trailing metadata. Behind
    Ray Serve's proxy a server stream then yields one empty message, which carries them to the
    call (serving/trailers.py)."""
    status = status_of(error)
    if status.code == "INTERNAL":
        log.error("request failed", exc_info=error)  # the one place a traceback is logged
    grpc_context.set_code(getattr(grpc.StatusCode, status.code, grpc.StatusCode.INTERNAL))
    grpc_context.set_details(clip_details(str(status)))
    if status.retryable:
        retry_ms = int((status.retry_after_s or DEFAULT_RETRY_AFTER_S) * 1000)
        grpc_context.set_trailing_metadata([(RETRY_AFTER_KEY, str(retry_ms))])


def metadata_of(grpc_context) -> dict[str, str]:
    return dict(grpc_context.invocation_metadata() if grpc_context else [])
