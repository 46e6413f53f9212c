"""The cancel-safe wrapper for server streams, on a real grpc.aio server and channel.

The wrapped stream stands in for Ray Serve's proxy: it only cancels the work behind it when
the cancellation arrives inside its await for the next item, and swallows it anywhere else.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ccoe_common.ports import free_port
from ccoe_common.serving.grpc_servicers import _cancel_safe, _guard_streams

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


def test_guard_wraps_only_server_streams_of_a_proxy_server_once():
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
    assert stream.__qualname__.startswith("_cancel_safe") and ".factory.<locals>" in unary.__qualname__
    assert made == [("/a/B", "unary_stream"), ("/a/B", "unary_unary")]
    plain = object()
    _guard_streams(plain)  # a plain grpc server has no factory: left alone
