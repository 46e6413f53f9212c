"""Registering our services with a gRPC server (Ray Serve's proxy calls these).

Two things differ from the generated add_*Servicer_to_server functions:

- A request that does not parse (a string field with bad UTF-8, truncated bytes) would make
  grpcio answer UNKNOWN before any of our code runs. Here every method of ccoe.v1.Inference
  and ccoe.v1.Registry deserializes leniently: bytes that do not parse become an `Undecodable`
  (its own type, so no field a client can set can fake one; an earlier version carried the
  reason in a reserved metadata key, and a client sending that key made a valid request
  fail). A call whose request is Undecodable is answered INVALID_ARGUMENT at the edge, before
  it is routed: by a wrapper around the handlers Ray's proxy makes, or around the servicer's
  methods on a plain grpc server. A client stream (UploadArtifact) hands each chunk on as it
  comes, so an Undecodable chunk reaches the code that receives the upload, which refuses it.
- A server-streaming call that the client cancels must cancel the request behind it. Ray
  Serve's proxy only does that when the cancellation lands while it awaits the next item from
  the deployment; when it lands while grpcio is writing a message (most of the time for a fast
  token stream) the proxy swallows it and the request runs to max_tokens, holding its batch
  slot (ray-project/ray#42665 tried to fix it and was closed). `_cancel_safe` runs the proxy's
  stream in its own task whose only await is that next item, and cancels the task when the
  call ends, so the cancellation always reaches the request.
- Retry advice on every retryable answer, streams included: the proxy carries a stream's
  trailing metadata only with a message, so a failing stream sends an empty one that is
  dropped here, and Ray's own bare RESOURCE_EXHAUSTED/UNAVAILABLE answers get the default
  `retry-after-ms` (serving/trailers.py).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from ccoe_common.pb import inference_pb2, registry_pb2
from ccoe_common.pb.lenient import Undecodable, lenient
from ccoe_common.serving.trailers import TRAILER_CARRIER, advise_retry, failed

SERVICE = "ccoe.v1.Inference"
REGISTRY_SERVICE = "ccoe.v1.Registry"
# What Ray Serve's gRPC proxy registers (gRPCOptions.grpc_servicer_functions, or a RayService's
# serveConfigV2 grpcOptions): import paths, resolved in the proxy's process.
GRPC_SERVICERS = (
    "ccoe_common.serving.grpc_servicers.add_inference_servicer",
    "ccoe_common.serving.grpc_servicers.add_registry_servicer",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)
_END = object()


def _refusal(request: Undecodable) -> str:
    return f"request: {request.reason}"


def _is_async(handler: Callable[..., Any]) -> bool:
    return any(inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f)
               # an async __call__ is what is looked for, not callability
               for f in (handler, getattr(type(handler), "__call__", None)) if f is not None)  # noqa: B004


def _refuse_undecodable(handler: Callable[..., Any], response_streaming: bool) -> Callable[..., Any]:
    """`handler`, except that an Undecodable request is answered INVALID_ARGUMENT without it.
    Async handlers (grpc.aio, Ray's proxy) get async wrappers; a sync server's, plain ones."""
    if _is_async(handler) and response_streaming:
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(request))
            async for item in handler(request, context):
                yield item
        return stream
    if _is_async(handler):
        async def unary(request: Any, context: Any) -> Any:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(request))
            return await handler(request, context)
        return unary
    if response_streaming:
        def stream_sync(request: Any, context: Any) -> Iterator[Any]:
            if isinstance(request, Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(request))
            yield from handler(request, context)
        return stream_sync

    def unary_sync(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(request))
        return handler(request, context)
    return unary_sync


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
                if item == TRAILER_CARRIER and failed(context):
                    continue  # it brought the deployment's trailer onto the call; it is not a message
                yield item
            advise_retry(context)
        finally:
            task.cancel()

    return handler


def _with_retry_advice(unary_handler: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    async def handler(request: Any, context: Any) -> Any:
        response = await unary_handler(request, context)
        advise_retry(context)
        return response

    return handler


def _is_proxy(server: Any) -> bool:
    return getattr(server, "service_handler_factory", None) is not None


def _guard_streams(server: Any) -> None:
    """Wrap the handlers Ray's proxy server makes for every method it routes: server streams
    cancel-safe, and requests that did not decode refused before they are routed."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None or getattr(factory, "_ccoe_cancel_safe", False):
        return  # a plain grpc server (or already wrapped): nothing to fix

    def cancel_safe_factory(service_method: str, streaming_type: Any) -> Any:
        made = factory(service_method=service_method, streaming_type=streaming_type)
        kind = str(getattr(streaming_type, "value", streaming_type))
        if kind == "unary_stream":
            return _refuse_undecodable(_cancel_safe(made), response_streaming=True)
        if kind == "unary_unary":
            return _refuse_undecodable(_with_retry_advice(made), response_streaming=False)
        return made  # client streams: each chunk is checked by the code that receives them

    cancel_safe_factory._ccoe_cancel_safe = True  # type: ignore[attr-defined]  # a marker on the function object
    server.service_handler_factory = cancel_safe_factory


def _add_service(servicer: Any, server: Any, service: ServiceDescriptor) -> None:
    """Register every method of `service` with lenient request deserializers."""
    _guard_streams(server)
    proxy = _is_proxy(server)  # Ray's proxy replaces each behaviour with its own handler
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        if not proxy and not method.client_streaming:
            behaviour = _refuse_undecodable(behaviour, method.server_streaming)
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(behaviour, request_deserializer=lenient(request_class),
                                     response_serializer=response_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def add_inference_servicer(servicer: Any, server: Any) -> None:
    _add_service(servicer, server, inference_pb2.DESCRIPTOR.services_by_name["Inference"])


def add_registry_servicer(servicer: Any, server: Any) -> None:
    _add_service(servicer, server, registry_pb2.DESCRIPTOR.services_by_name["Registry"])
