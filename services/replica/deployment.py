"""ModelReplica: one engine (backbone + co-resident experts) per replica. Glue only: the work
is in ccoe_common.serving.replica.ReplicaRuntime and ccoe_common.registry.follower.

A replica holds what the registry's desired state names. It applies the full state before
its constructor returns, so Ray never routes a request to a replica that lacks the serving
versions, then follows changes and reports for its whole life.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from ccoe_common.engine.params import GenerationRequest
from ccoe_common.registry.follower import ReplicaFollower
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.events import Event
from ccoe_common.serving.replica import ReplicaRuntime, tune_process
from services.handles import watch_desired_state

FIRST_SYNC_TIMEOUT_S = 300.0


@serve.deployment(graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=0.2, health_check_period_s=5)
class ModelReplica:
    async def __init__(self, config: dict[str, Any]):  # type: ignore[misc]  # Ray Serve awaits an async constructor
        cfg = AppConfig.load(config)
        tune_process(cfg.replica)
        self.runtime = await asyncio.to_thread(ReplicaRuntime, cfg, load_config_experts=False)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.registry = serve.get_deployment_handle("Registry", app_name=context.app_name)
        self.follower = ReplicaFollower(self.runtime.engine, self.replica_id,
                                        lambda rid: watch_desired_state(self.registry, rid),
                                        self.registry.ReportReplicaState.remote, cfg.registry, self.runtime.metrics,
                                        loader=self.runtime.load)
        await self.follower.sync_once(FIRST_SYNC_TIMEOUT_S)
        self._tasks = [asyncio.create_task(self.follower.run()), asyncio.create_task(self.follower.heartbeat())]

    async def generate(self, request: GenerationRequest, carrier: dict[str, str]) -> AsyncIterator[Event]:
        async for event in self.runtime.stream(request, carrier):
            yield event

    def expert_names(self) -> list[str]:
        return self.runtime.expert_names()

    async def validate(self, uri: str) -> str | None:
        return await asyncio.to_thread(self.runtime.validate, uri)

    def stats(self) -> dict[str, Any]:
        return {**self.runtime.stats(), "replica_id": self.replica_id, "registry": self.follower.fail_static.status()}

    def check_health(self) -> None:
        if not self.runtime.healthy():
            raise RuntimeError("the engine's step loop is not running")

    def __del__(self) -> None:
        for task in getattr(self, "_tasks", []):
            task.cancel()
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.stop()
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.close()
