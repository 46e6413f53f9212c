"""ModelReplica: one engine (backbone + co-resident experts) per replica. Glue only: the work
is in ccoe_common.serving.replica.ReplicaRuntime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from ccoe_common.engine.params import GenerationRequest
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.events import Event
from ccoe_common.serving.replica import ReplicaRuntime


@serve.deployment(graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=0.2, health_check_period_s=5)
class ModelReplica:
    def __init__(self, config: dict[str, Any]):
        self.runtime = ReplicaRuntime(AppConfig.load(config))

    async def generate(self, request: GenerationRequest, carrier: dict[str, str]) -> AsyncIterator[Event]:
        async for event in self.runtime.stream(request, carrier):
            yield event

    def expert_names(self) -> list[str]:
        return self.runtime.expert_names()

    def push(self, uri: str) -> str:
        return self.runtime.push(uri)

    def pop(self, name: str, version: int | None = None, wait: float | None = None) -> list[str]:
        return self.runtime.pop(name, version, wait)

    def stats(self) -> dict[str, Any]:
        return self.runtime.stats()

    def check_health(self) -> None:
        if not self.runtime.healthy():
            raise RuntimeError("the engine's step loop is not running")

    def __del__(self) -> None:
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.close()
