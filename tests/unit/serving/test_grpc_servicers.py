"""The cancel-safe wrapper for server streams, on a real grpc.aio server and channel.

The wrapped stream stands in for Ray Serve's proxy: it only cancels the work behind it when
the cancellation arrives inside its await for the next item, and swallows it anywhere else.
"""

from __future__ import annotations

import asyncio
from unittest.mock import Mock

import grpc
import pytest
from google.protobuf import message_factory

from ccoe_common.pb import inference_pb2, registry_pb2
from ccoe_common.ports import free_port
from ccoe_common.serving.grpc_servicers import (
    _cancel_safe,
    _guard_streams,
    add_inference_servicer,
    add_registry_servicer,
)

METHOD = "/test.Stream/Count"


class ProxyLikeStream:
    """Yields fast; records whether each call's cancellation reached its await."""

    def __init__(self) -> None:
        self.cancelled_in_await = 0
        self.finished = asyncio.Event()

    async def __call__(self, request: bytes, context) -> object:
        try:
            for i in range(100_000):
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:
                    self.cancelled_in_await += 1
                    return
                yield str(i).encode()
        except BaseException:  # noqa: BLE001 - like the proxy: swallowed wherever else it lands
            pass
        finally:
            context.peer()  # the proxy's access log reads it at the end
            self.finished.set()


async def _serve(handler) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    rpc = grpc.unary_stream_rpc_method_handler(handler)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Stream", {"Count": rpc}),))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _cancel_after_three(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_stream(METHOD)(b"")
        for _ in range(3):
            await call.read()
        call.cancel()


def test_every_client_cancel_reaches_the_streams_await():
    async def main() -> int:
        stream = ProxyLikeStream()
        server, address = await _serve(_cancel_safe(stream))
        try:
            for _ in range(20):
                stream.finished.clear()
                await _cancel_after_three(address)
                await asyncio.wait_for(stream.finished.wait(), 10)
        finally:
            await server.stop(None)
        return stream.cancelled_in_await

    assert asyncio.run(main()) == 20


def test_a_stream_that_ends_keeps_its_items_and_errors_propagate():
    async def items(request: bytes, context) -> object:
        for i in range(5):
            yield str(i).encode()

    async def broken(request: bytes, context) -> object:
        yield b"first"
        raise RuntimeError("boom")

    async def main() -> tuple[list[bytes], grpc.StatusCode, list[bytes]]:
        server, address = await _serve(_cancel_safe(items))
        broken_server, broken_address = await _serve(_cancel_safe(broken))
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                got = [m async for m in channel.unary_stream(METHOD)(b"")]
            before_error: list[bytes] = []
            async with grpc.aio.insecure_channel(broken_address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for m in channel.unary_stream(METHOD)(b""):
                        before_error.append(m)
            return got, err.value.code(), before_error
        finally:
            await server.stop(None)
            await broken_server.stop(None)

    got, code, before_error = asyncio.run(main())
    assert got == [b"0", b"1", b"2", b"3", b"4"]
    assert code == grpc.StatusCode.UNKNOWN and before_error == [b"first"]


def _proxy_like_failure(code: grpc.StatusCode, trailer: tuple = (), carrier: bool = True):
    """A stream that fails as Ray's proxy ends one: the deployment's code, details and trailer land
    on the call together with a message (the empty carrier), then the stream ends without raising."""
    async def stream(request: bytes, context) -> object:
        yield b"token"
        context.set_code(code)
        context.set_details("refused")
        if trailer:
            context.set_trailing_metadata(trailer)
        if carrier:
            yield b""
    return stream


def test_a_failing_stream_brings_its_retry_advice_and_no_extra_message():
    async def outcome(handler) -> tuple[list[bytes], grpc.StatusCode, dict]:
        server, address = await _serve(_cancel_safe(handler))
        got: list[bytes] = []
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                call = channel.unary_stream(METHOD)(b"")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for m in call:
                        got.append(m)
                return got, err.value.code(), dict(err.value.trailing_metadata() or ())
        finally:
            await server.stop(None)

    ours = asyncio.run(outcome(_proxy_like_failure(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "250"),))))
    assert ours == ([b"token"], grpc.StatusCode.RESOURCE_EXHAUSTED, {"retry-after-ms": "250"})
    # Ray's own backpressure answers bare: the proxy side adds the default advice.
    bare = asyncio.run(outcome(_proxy_like_failure(grpc.StatusCode.UNAVAILABLE, carrier=False)))
    assert bare == ([b"token"], grpc.StatusCode.UNAVAILABLE, {"retry-after-ms": "1000"})
    # A status nobody may retry as it is gets no advice.
    final = asyncio.run(outcome(_proxy_like_failure(grpc.StatusCode.INVALID_ARGUMENT)))
    assert final == ([b"token"], grpc.StatusCode.INVALID_ARGUMENT, {})


def test_guard_wraps_each_proxy_handler_once():
    made = []

    def factory(service_method: str, streaming_type: str):
        async def handler(request, context):
            yield b""
        made.append((service_method, streaming_type))
        return handler

    class ProxyServer:
        service_handler_factory = staticmethod(factory)

    server = ProxyServer()
    _guard_streams(server)
    wrapped = server.service_handler_factory
    _guard_streams(server)
    assert server.service_handler_factory is wrapped  # idempotent
    stream = wrapped(service_method="/a/B", streaming_type="unary_stream")
    unary = wrapped(service_method="/a/B", streaming_type="unary_unary")
    client_stream = wrapped(service_method="/a/C", streaming_type="stream_unary")
    assert stream.__qualname__ == "_refuse_undecodable.<locals>.stream"  # around _cancel_safe's handler
    assert unary.__qualname__ == "_refuse_undecodable.<locals>.unary"
    assert ".factory.<locals>" in client_stream.__qualname__  # chunks are checked where they are received
    assert made == [("/a/B", "unary_stream"), ("/a/B", "unary_unary"), ("/a/C", "stream_unary")]
    plain = object()
    _guard_streams(plain)  # a plain grpc server has no factory: left alone


# ---- lenient parsing: bytes that do not decode are INVALID_ARGUMENT, on every method ------------

TRUNCATED = b"\x0a\x05ab"  # field 1, length 5, two bytes: no message of any type decodes it
SERVICES = [inference_pb2.DESCRIPTOR.services_by_name["Inference"],
            registry_pb2.DESCRIPTOR.services_by_name["Registry"]]
METHODS = [(service.full_name, m) for service in SERVICES for m in service.methods]


def _call(channel: grpc.aio.Channel, service: str, method, body: bytes, metadata=()):
    path = f"/{service}/{method.name}"
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    if method.client_streaming:
        async def chunks():
            yield body
        return channel.stream_unary(path, **identity)(chunks(), timeout=10, metadata=metadata)
    if method.server_streaming:
        return channel.unary_stream(path, **identity)(body, timeout=10, metadata=metadata)
    return channel.unary_unary(path, **identity)(body, timeout=10, metadata=metadata)


async def _outcome(call, streaming: bool) -> tuple[grpc.StatusCode, str]:
    try:
        if streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


class Recorder:
    """What reached the handlers behind the edge: (method, type of the request or chunk)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []


def _ray_like_server(recorder: Recorder) -> grpc.aio.Server:
    """Ray Serve's own proxy server class, with a factory standing in for its routing to replicas."""
    from ray.serve._private.grpc_util import gRPCGenericServer

    def factory(service_method: str, streaming_type):
        kind = str(getattr(streaming_type, "value", streaming_type))

        async def unary(request, context):
            recorder.seen.append((service_method, type(request).__name__))
            return b""

        async def stream(request, context):
            recorder.seen.append((service_method, type(request).__name__))
            yield b""

        async def client_stream(requests, context):
            async for chunk in requests:
                recorder.seen.append((service_method, type(chunk).__name__))
            return b""

        return {"unary_unary": unary, "unary_stream": stream, "stream_unary": client_stream}.get(kind, unary)

    return gRPCGenericServer(factory)


def _plain_server(recorder: Recorder) -> grpc.aio.Server:
    class Servicer:
        def __getattr__(self, name: str):
            service = next(s for s in SERVICES if name in s.methods_by_name)
            method = service.methods_by_name[name]
            empty = message_factory.GetMessageClass(method.output_type)()
            path = f"/{service.full_name}/{name}"

            if method.client_streaming:
                async def client_stream(requests, context):
                    async for chunk in requests:
                        recorder.seen.append((path, type(chunk).__name__))
                    return empty
                return client_stream
            if method.server_streaming:
                async def stream(request, context):
                    recorder.seen.append((path, type(request).__name__))
                    yield empty
                return stream

            async def unary(request, context):
                recorder.seen.append((path, type(request).__name__))
                return empty
            return unary

    return grpc.aio.server(), Servicer()


@pytest.mark.parametrize("kind", ["ray-proxy", "plain"])
def test_undecodable_bytes_are_invalid_argument_on_every_method(kind):
    async def main() -> tuple[dict, Recorder]:
        recorder = Recorder()
        if kind == "ray-proxy":
            server, servicer = _ray_like_server(recorder), Mock()  # what Ray passes
        else:
            server, servicer = _plain_server(recorder)
        add_inference_servicer(servicer, server)
        add_registry_servicer(servicer, server)
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        outcomes = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for service, method in METHODS:
                    call = _call(channel, service, method, TRUNCATED)
                    outcomes[method.name] = await _outcome(call, method.server_streaming)
        finally:
            await server.stop(None)
        return outcomes, recorder

    outcomes, recorder = asyncio.run(main())
    assert len(outcomes) == 15
    for name, (code, details) in outcomes.items():
        if name == "UploadArtifact":
            continue  # a client stream's chunks go on to the code receiving the upload (next test)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert details.startswith("request: is not a valid ccoe.v1.") and "Error parsing message" in details
    # Nothing undecodable was routed; the upload's one chunk arrived as an Undecodable, not as bytes.
    assert [t for _, t in recorder.seen] == ["Undecodable"]


def test_valid_requests_reach_the_handlers_of_both_servers():
    async def main(kind: str) -> list[tuple[str, str]]:
        recorder = Recorder()
        if kind == "ray-proxy":
            server, servicer = _ray_like_server(recorder), Mock()  # what Ray passes
        else:
            server, servicer = _plain_server(recorder)
        add_inference_servicer(servicer, server)
        add_registry_servicer(servicer, server)
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for service, method in METHODS:
                    body = message_factory.GetMessageClass(method.input_type)().SerializeToString()
                    code, details = await _outcome(_call(channel, service, method, body), method.server_streaming)
                    assert code == grpc.StatusCode.OK, (method.name, code, details)
        finally:
            await server.stop(None)
        return recorder.seen

    for kind in ("ray-proxy", "plain"):
        seen = asyncio.run(main(kind))
        assert len(seen) == 15 and "Undecodable" not in {t for _, t in seen}
