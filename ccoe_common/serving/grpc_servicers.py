"""Registering our services with a gRPC server (Ray Serve's proxy calls these).

Two things differ from the generated add_*Servicer_to_server functions:

- A request that does not parse (a string field with bad UTF-8, truncated bytes) would make
  grpcio answer UNKNOWN before any of our code runs. Here it parses into an empty request that
  carries the reason under a reserved metadata key, and the router answers INVALID_ARGUMENT.
- A server-streaming call that the client cancels must cancel the request behind it. Ray
  Serve's proxy only does that when the cancellation lands while it awaits the next item from
  the deployment; when it lands while grpcio is writing a message (most of the time for a fast
  token stream) the proxy swallows it and the request runs to max_tokens, holding its batch
  slot (ray-project/ray#42665 tried to fix it and was closed). `_cancel_safe` runs the proxy's
  stream in its own task whose only await is that next item, and cancels the task when the
  call ends, so the cancellation always reaches the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.pb import registry_pb2_grpc

SERVICE = "ccoe.v1.Inference"
# What Ray Serve's gRPC proxy registers (gRPCOptions.grpc_servicer_functions, or a RayService's
# serveConfigV2 grpcOptions): import paths, resolved in the proxy's process.
GRPC_SERVICERS = (
    "ccoe_common.serving.grpc_servicers.add_inference_servicer",
    "ccoe_common.serving.grpc_servicers.add_registry_servicer",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)
DECODE_ERROR_KEY = "__ccoe_decode_error__"
_END = object()


def _lenient_request(data: bytes) -> pb.GenerateRequest:
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as e:
        return pb.GenerateRequest(metadata={DECODE_ERROR_KEY: str(e)})


class _CallContext:
    """The call's context for the proxy's stream, which may still run for a moment after the
    call ended: peer() is read while the call is alive (grpcio crashes reading it later), and
    once the call has ended every method is a no-op instead of touching a freed call."""

    def __init__(self, context: Any) -> None:
        self._context = context
        self._peer = context.peer()
        self._ended = False
        context.add_done_callback(self._end)

    def _end(self, _: Any) -> None:
        self._ended = True

    def peer(self) -> str:
        return self._peer

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._context, name)
        if self._ended and callable(attr):
            return lambda *args, **kwargs: None
        return attr


def _cancel_safe(stream_handler: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def handler(request: Any, context: Any) -> AsyncIterator[Any]:
        items: asyncio.Queue = asyncio.Queue()  # unbounded: a blocking put would be a second await

        async def pump() -> None:
            try:
                async for item in stream_handler(request, call):
                    items.put_nowait(item)
            except BaseException as e:  # noqa: BLE001 - handed to the call's task, which re-raises it
                items.put_nowait(e)
            else:
                items.put_nowait(_END)

        call = _CallContext(context)
        task = asyncio.ensure_future(pump())
        context.add_done_callback(lambda _: task.cancel())  # the call ended, however it ended
        try:
            while (item := await items.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancel()

    return handler


def _guard_streams(server: Any) -> None:
    """Wrap the streaming handlers Ray's proxy server makes for every method it routes."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None or getattr(factory, "_ccoe_cancel_safe", False):
        return  # a plain grpc server (or already wrapped): nothing to fix

    def cancel_safe_factory(service_method: str, streaming_type: Any) -> Any:
        made = factory(service_method=service_method, streaming_type=streaming_type)
        return _cancel_safe(made) if str(getattr(streaming_type, "value", streaming_type)) == "unary_stream" else made

    cancel_safe_factory._ccoe_cancel_safe = True  # type: ignore[attr-defined]
    server.service_handler_factory = cancel_safe_factory


def add_inference_servicer(servicer: Any, server: Any) -> None:
    _guard_streams(server)
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient_request,
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=_lenient_request,
            response_serializer=pb.GenerateStreamResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def add_registry_servicer(servicer: Any, server: Any) -> None:
    _guard_streams(server)
    registry_pb2_grpc.add_RegistryServicer_to_server(servicer, server)
