"""Router: the public ccoe.v1.Inference service behind Ray Serve's gRPC proxy, plus the
standard grpc.health.v1 Health service. Glue only: routing lives in
ccoe_common.serving.router_core."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle

from ccoe_common.engine.params import GenerationRequest
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.events import Event
from ccoe_common.serving.grpc_status import apply_error, metadata_of
from ccoe_common.serving.router_core import RouterCore


class HandleReplicaClient:
    """Streams from ModelReplica through a DeploymentHandle; closing the stream cancels it."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def stream(self, request: GenerationRequest, carrier: dict[str, str]) -> AsyncIterator[Event]:
        response = self.handle.options(stream=True).generate.remote(request, carrier)
        try:
            async for event in response:
                yield event
        finally:
            response.cancel()


@serve.deployment(graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=0.2)
class Router:
    def __init__(self, replica: DeploymentHandle, config: dict[str, Any]):
        self.replica = replica
        self.core = RouterCore(AppConfig.load(config), HandleReplicaClient(replica))

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> pb.GenerateResponse:
        try:
            return await self.core.generate(request, metadata_of(grpc_context))
        except Exception as e:  # noqa: BLE001 - the gRPC edge: every failure becomes a status
            apply_error(grpc_context, e)
            return pb.GenerateResponse()

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context=None) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            async for message in self.core.generate_stream(request, metadata_of(grpc_context)):
                yield message
        except Exception as e:  # noqa: BLE001 - the gRPC edge
            # Ray applies a stream's status only with a message or an exception: re-raising
            # after setting the code makes the proxy answer with that code, not INTERNAL.
            apply_error(grpc_context, e)
            raise

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=await self._status(request.service))

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    grpc_context=None) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = await self._status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(1.0)

    async def _status(self, service: str) -> int:
        if service not in ("", "ccoe.v1.Inference"):
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        try:
            await asyncio.wait_for(self.replica.expert_names.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - any failure to reach a replica means not serving
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING
