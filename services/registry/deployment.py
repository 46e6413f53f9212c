"""Registry: the control plane (ccoe.v1.Registry). Glue only: the logic is in
ccoe_common.registry.service.RegistryService; Redis holds all state.

The Router is the app's gRPC ingress and forwards Registry RPCs here (Ray Serve's proxy sends
every call of an app to its one ingress). Replicas and routers call WatchDesiredState and
ReportReplicaState through DeploymentHandles.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from ccoe_common.pb import registry_pb2 as pb
from ccoe_common.registry.artifact_store import ArtifactStore
from ccoe_common.registry.errors import ArtifactRefused, NoReplicaToValidate
from ccoe_common.registry.service import RegistryService
from ccoe_common.registry.store import RegistryStore, redis_client
from ccoe_common.serving.config import AppConfig
from ccoe_common.telemetry import tracing
from ccoe_common.telemetry.metrics import Metrics

log = logging.getLogger(__name__)
VALIDATE_TIMEOUT_S = 120.0
REDIS_WAIT_S = 300.0  # how long a starting registry waits for its Redis before Ray restarts it


@serve.deployment(graceful_shutdown_timeout_s=2, graceful_shutdown_wait_loop_s=0.1)
class Registry:
    async def __init__(self, config: dict[str, Any]):  # type: ignore[misc]  # Ray Serve awaits an async constructor
        self.config = AppConfig.load(config)
        if self.config.redis_url is None:
            raise ValueError("config field redis_url: the registry needs a Redis URL (the local stack starts one)")
        client = redis_client(self.config.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0,
                              retry_on_timeout=True)
        self.app_name = serve.get_replica_context().app_name
        tracing.setup_tracing(self.config.telemetry)
        self.service = RegistryService(RegistryStore(client), ArtifactStore.from_config(self.config.registry),
                                       self._validate, self.config.registry, Metrics())
        seeded = await self.service.seed_when_reachable(self.config.experts, REDIS_WAIT_S)
        if seeded:
            log.info("registered config experts: %s", ", ".join(seeded))
        self._tasks = [asyncio.create_task(self.service.follow()), asyncio.create_task(self._control_loop())]

    async def _validate(self, uri: str) -> None:
        replicas = serve.get_deployment_handle("ModelReplica", app_name=self.app_name)
        try:
            reason = await asyncio.wait_for(replicas.validate.remote(uri), VALIDATE_TIMEOUT_S)
        except asyncio.TimeoutError as e:
            raise NoReplicaToValidate(f"no model replica answered within {VALIDATE_TIMEOUT_S:.0f}s to validate "
                                      f"{uri}; retry when the fleet is up") from e
        if reason is not None:
            raise ArtifactRefused(f"{uri} does not fit this fleet's backbone: {reason}")

    async def _control_loop(self) -> None:
        while True:
            try:
                await self.service.tick()
            except Exception as e:  # noqa: BLE001 - Redis may be restarting; the next tick retries
                log.warning("rollout controller tick failed: %s", e)
            await self.service.wait_for_work(self.config.registry.controller_interval_s)

    async def PushExpert(self, request: pb.PushExpertRequest) -> pb.PushExpertResponse:
        return await self.service.push(request)

    async def PopExpert(self, request: pb.PopExpertRequest) -> pb.PopExpertResponse:
        return await self.service.pop(request)

    async def ListExperts(self, request: pb.ListExpertsRequest) -> pb.ListExpertsResponse:
        return await self.service.list()

    async def GetExpert(self, request: pb.GetExpertRequest) -> pb.ExpertInfo:
        return await self.service.get(request.name)

    async def GetRules(self, request: pb.GetRulesRequest) -> pb.RulesResponse:
        return await self.service.get_rules()

    async def SetRules(self, request: pb.SetRulesRequest) -> pb.RulesResponse:
        return await self.service.set_rules(request)

    async def StartRollout(self, request: pb.StartRolloutRequest) -> pb.Rollout:
        return await self.service.start_rollout(request)

    async def GetRollout(self, request: pb.GetRolloutRequest) -> pb.Rollout:
        return await self.service.get_rollout(request.expert)

    async def Rollback(self, request: pb.RollbackRequest) -> pb.Rollout:
        return await self.service.rollback(request)

    async def ReportReplicaState(self, request: pb.ReplicaState) -> pb.ReportReplicaStateResponse:
        return await self.service.report(request)

    async def ListAudit(self, request: pb.ListAuditRequest) -> pb.ListAuditResponse:
        return await self.service.audit(request.limit)

    async def current_state(self, replica_id: str) -> pb.DesiredState:
        """The desired state read from Redis now (not the followed snapshot), for a router
        asked about a name it does not know yet."""
        return await self.service.current(replica_id)

    async def WatchDesiredState(self, request: pb.WatchDesiredStateRequest) -> AsyncIterator[pb.DesiredState]:
        async for message in self.service.watch(request.replica_id):
            yield message

    def __del__(self) -> None:
        for task in getattr(self, "_tasks", []):
            task.cancel()
