"""Router: the app's ingress. Serves ccoe.v1.Inference and grpc.health.v1 Health over gRPC,
forwards ccoe.v1.Registry calls to the Registry deployment (Ray Serve's proxy sends every call
of an app to its one ingress), and serves the OpenAI-compatible HTTP API on Ray Serve's HTTP
proxy (`__call__`). Glue only: routing lives in ccoe_common.serving.router_core, the HTTP API
in ccoe_common.serving.openai_api, the control plane in ccoe_common.registry.service.

The router follows the registry's desired state (serving versions, rule table) and applies
the full state before its constructor returns, so it never routes on a guess."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from ccoe_common.auth.guard import INFERENCE, REGISTRY, Guard
from ccoe_common.engine.params import GenerationRequest
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.pb import registry_pb2 as rpb
from ccoe_common.registry.artifact_store import ArtifactStore
from ccoe_common.registry.service import receive_upload
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.events import Event
from ccoe_common.serving.grpc_status import apply_error, metadata_of
from ccoe_common.serving.openai_api.frontend import OpenAIFrontend
from ccoe_common.serving.router_core import RouterCore
from services.handles import replica_stream, watch_desired_state

log = logging.getLogger(__name__)
FIRST_SYNC_TIMEOUT_S = 300.0
CONTROL_PLANE_KEY = "ccoe-control-plane"  # health trailer: "following" or "holding: <why>"


class HandleReplicaClient:
    """Streams from ModelReplica through a DeploymentHandle; closing the stream cancels it, and a
    replica that dies under it raises ReplicaLost (services/handles.py)."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    def stream(self, request: GenerationRequest, carrier: dict[str, str]) -> AsyncGenerator[Event, None]:
        return replica_stream(self.handle.options(stream=True).generate.remote(request, carrier), request.request_id)


@serve.deployment(graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=0.2)
class Router:
    async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async constructor
            self, replica: DeploymentHandle, registry: DeploymentHandle, config: dict[str, Any]):
        self.replica = replica
        self.registry = registry
        cfg = AppConfig.load(config)
        self.guard = Guard.from_config(cfg.auth)  # a missing or broken auth section stops the app here
        self.core = RouterCore(cfg, HandleReplicaClient(replica))
        self.artifacts = ArtifactStore(cfg.registry.artifact_store)
        self.core.refresh_view = self._refresh
        self.openai = OpenAIFrontend(self.core, self.guard)  # same core: same routing, admission, retries
        stream = watch_desired_state(registry)
        self._apply(await asyncio.wait_for(anext(stream), FIRST_SYNC_TIMEOUT_S))
        self._follow_task = asyncio.create_task(self._follow(stream))

    def _apply(self, msg: rpb.DesiredState) -> None:
        self.core.apply_desired(dict(msg.serving), msg.rules_revision,
                                json.loads(msg.rules_json) if msg.rules_json else None,
                                epoch=msg.epoch, revision=msg.revision)

    async def _refresh(self) -> None:
        self._apply(await self.registry.current_state.remote(""))

    async def _follow(self, stream: AsyncIterator[rpb.DesiredState]) -> None:
        while True:
            try:
                async for msg in stream:
                    self._apply(msg)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the registry restarts: keep the last view, reconnect
                log.warning("desired-state stream broke (%s); reconnecting", e)
            await asyncio.sleep(0.5)
            stream = watch_desired_state(self.registry)

    def _admit(self, method: str, request: pb.GenerateRequest, metadata: dict[str, str]) -> None:
        principal = self.guard.check(f"{INFERENCE}/{method}", metadata)
        self.guard.bind_tenant(principal, request.metadata)

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> pb.GenerateResponse:
        try:
            metadata = metadata_of(grpc_context)
            self._admit("Generate", request, metadata)
            return await self.core.generate(request, metadata)
        except Exception as e:  # noqa: BLE001 - the gRPC edge: every failure becomes a status
            apply_error(grpc_context, e)
            return pb.GenerateResponse()

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context=None) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            metadata = metadata_of(grpc_context)
            self._admit("GenerateStream", request, metadata)
            async for message in self.core.generate_stream(request, metadata):
                yield message
        except Exception as e:  # noqa: BLE001 - the gRPC edge: every failure becomes a status
            # Ray's proxy applies a stream's code, details and trailer (retry-after-ms) only
            # with a message: an empty one, which the proxy side drops (serving/trailers.py).
            # Raising would carry the code but lose the trailer, and log a traceback per refusal.
            apply_error(grpc_context, e)
            yield pb.GenerateStreamResponse()

    # ---- the OpenAI-compatible HTTP API ------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        return await self.openai.handle(request)

    # ---- ccoe.v1.Registry, forwarded -------------------------------------------------------

    async def _control(self, method: str, request, grpc_context, empty):
        try:
            principal = self.guard.check(f"{REGISTRY}/{method}", metadata_of(grpc_context))
            self.guard.stamp_who(principal, request)
            return await getattr(self.registry, method).remote(request)
        except Exception as e:  # noqa: BLE001 - the gRPC edge
            apply_error(grpc_context, e)
            return empty

    async def PushExpert(self, request: rpb.PushExpertRequest, grpc_context=None) -> rpb.PushExpertResponse:
        return await self._control("PushExpert", request, grpc_context, rpb.PushExpertResponse())

    async def UploadArtifact(self, chunks: AsyncIterator[rpb.ArtifactChunk],
                             grpc_context=None) -> rpb.UploadArtifactResponse:
        # Bytes go straight into the shared artifact store: a stream cannot cross a handle.
        try:
            self.guard.check(f"{REGISTRY}/UploadArtifact", metadata_of(grpc_context))
            return await receive_upload(self.artifacts, chunks)
        except Exception as e:  # noqa: BLE001 - the gRPC edge
            apply_error(grpc_context, e)
            return rpb.UploadArtifactResponse()

    async def PopExpert(self, request: rpb.PopExpertRequest, grpc_context=None) -> rpb.PopExpertResponse:
        return await self._control("PopExpert", request, grpc_context, rpb.PopExpertResponse())

    async def ListExperts(self, request: rpb.ListExpertsRequest, grpc_context=None) -> rpb.ListExpertsResponse:
        return await self._control("ListExperts", request, grpc_context, rpb.ListExpertsResponse())

    async def GetExpert(self, request: rpb.GetExpertRequest, grpc_context=None) -> rpb.ExpertInfo:
        return await self._control("GetExpert", request, grpc_context, rpb.ExpertInfo())

    async def GetRules(self, request: rpb.GetRulesRequest, grpc_context=None) -> rpb.RulesResponse:
        return await self._control("GetRules", request, grpc_context, rpb.RulesResponse())

    async def SetRules(self, request: rpb.SetRulesRequest, grpc_context=None) -> rpb.RulesResponse:
        return await self._control("SetRules", request, grpc_context, rpb.RulesResponse())

    async def StartRollout(self, request: rpb.StartRolloutRequest, grpc_context=None) -> rpb.Rollout:
        return await self._control("StartRollout", request, grpc_context, rpb.Rollout())

    async def GetRollout(self, request: rpb.GetRolloutRequest, grpc_context=None) -> rpb.Rollout:
        return await self._control("GetRollout", request, grpc_context, rpb.Rollout())

    async def Rollback(self, request: rpb.RollbackRequest, grpc_context=None) -> rpb.Rollout:
        return await self._control("Rollback", request, grpc_context, rpb.Rollout())

    async def ReportReplicaState(self, request: rpb.ReplicaState, grpc_context=None) -> rpb.ReportReplicaStateResponse:
        return await self._control("ReportReplicaState", request, grpc_context, rpb.ReportReplicaStateResponse())

    async def ListAudit(self, request: rpb.ListAuditRequest, grpc_context=None) -> rpb.ListAuditResponse:
        return await self._control("ListAudit", request, grpc_context, rpb.ListAuditResponse())

    async def WatchDesiredState(self, request: rpb.WatchDesiredStateRequest,
                                grpc_context=None) -> AsyncIterator[rpb.DesiredState]:
        try:
            self.guard.check(f"{REGISTRY}/WatchDesiredState", metadata_of(grpc_context))
            async for message in watch_desired_state(self.registry, request.replica_id):
                yield message
        except Exception as e:  # noqa: BLE001 - the gRPC edge: every failure becomes a status
            apply_error(grpc_context, e)
            yield rpb.DesiredState()  # carries the status, as in GenerateStream

    # ---- grpc.health.v1 ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """This router's admission and failover counters (RouterCore.stats)."""
        return self.core.stats()

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None) -> health_pb2.HealthCheckResponse:
        if grpc_context is not None:  # fail static: still SERVING, and this says why it stopped following
            grpc_context.set_trailing_metadata([(CONTROL_PLANE_KEY, self.core.fail_static.summary()[:1024])])
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
        if service not in ("", "ccoe.v1.Inference", "ccoe.v1.Registry"):
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        try:
            await asyncio.wait_for(self.replica.expert_names.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - any failure to reach a replica means not serving
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING
