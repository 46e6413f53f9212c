"""Streams through Ray Serve DeploymentHandles."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from ray.serve.handle import DeploymentHandle

from ccoe_common.pb import registry_pb2 as rpb


async def cancelling(response: Any) -> AsyncGenerator[Any, None]:
    """The items of a streaming handle call; leaving early (or being cancelled) cancels the call
    on the deployment, so nothing keeps running for a caller that went away."""
    try:
        async for item in response:
            yield item
    finally:
        response.cancel()


def watch_desired_state(registry: DeploymentHandle, replica_id: str = "") -> AsyncGenerator[rpb.DesiredState, None]:
    """The Registry's desired-state stream for one replica (or, with no id, for a router)."""
    return cancelling(registry.options(stream=True).WatchDesiredState.remote(
        rpb.WatchDesiredStateRequest(replica_id=replica_id)))
