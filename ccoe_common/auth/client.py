"""Client side of the credential: every call on a channel carries `authorization: Bearer <token>`.

    channel = authorized_channel("127.0.0.1:9000", token)      # token from CCOE_TOKEN or a file
    InferenceStub(channel).Generate(request)

Ray Serve's gRPC proxy has no TLS of its own: across hosts, terminate TLS in front of it (see
docs/security.md), because a bearer token on a plain-text link can be read by anyone on the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import grpc


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Per-call metadata for stubs called on a plain channel (e.g. grpc.aio)."""
    return (("authorization", f"Bearer {token}"),)


def read_token_file(path: str | Path) -> str:
    """The token in `path` (surrounding whitespace ignored); a clear error if it is missing or empty."""
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ValueError(f"--token-file {path}: {e.strerror}") from e
    if not token:
        raise ValueError(f"--token-file {path} is empty; put the token `ccoe auth token` printed in it")
    return token


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self.pair = bearer_metadata(token)

    def _with_token(self, d: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [m for m in (d.metadata or ()) if m[0] != "authorization"] + list(self.pair)
        return _CallDetails(d.method, d.timeout, metadata, d.credentials, getattr(d, "wait_for_ready", None),
                            getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)


def authorized_channel(address: str, token: str | None, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A plain-text channel to `address` whose every call sends the token (none: no credential)."""
    channel = grpc.insecure_channel(address, options=options)
    return channel if token is None else grpc.intercept_channel(channel, _Bearer(token))
