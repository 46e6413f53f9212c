"""The local end of the CLI's port-forward: real gRPC calls through TcpForwarder to a real gRPC
server, a stream that cannot be opened, and closing."""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ccoe_common.kube.portforward import TcpForwarder


@pytest.fixture(scope="module")
def grpc_port():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


def _check(address: str, timeout: float = 5.0) -> int:
    # A channel of its own subchannels: grpc otherwise shares one connection per address across
    # channels, and these tests count and break connections on purpose.
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def test_grpc_calls_go_through_on_their_own_streams(grpc_port):
    opened = []

    def connect():
        opened.append(1)
        return socket.create_connection(("127.0.0.1", grpc_port))

    with TcpForwarder(connect) as forwarder:
        assert forwarder.address.startswith("127.0.0.1:")
        for _ in range(3):  # one channel each: one stream each
            assert _check(forwarder.address) == health_pb2.HealthCheckResponse.SERVING
    assert len(opened) == 3 and forwarder.errors == []


def test_a_stream_that_cannot_be_opened_is_unavailable_and_reported(grpc_port):
    attempts = []

    def connect():
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("pod demo-worker-0 is gone")
        return socket.create_connection(("127.0.0.1", grpc_port))

    with TcpForwarder(connect) as forwarder:
        with pytest.raises(grpc.RpcError) as refused:
            _check(forwarder.address, timeout=2.0)
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert forwarder.errors[0] == "pod demo-worker-0 is gone"
        assert _check(forwarder.address) == health_pb2.HealthCheckResponse.SERVING  # and it goes on


def test_after_close_nothing_listens(grpc_port):
    forwarder = TcpForwarder(lambda: socket.create_connection(("127.0.0.1", grpc_port))).start()
    address = forwarder.address
    forwarder.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", forwarder.port), timeout=1).close()
    assert address.endswith(str(forwarder.port))
