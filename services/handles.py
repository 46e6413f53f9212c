"""Streams through Ray Serve DeploymentHandles, and what Ray's failures mean to a caller."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from ccoe_common.pb import registry_pb2 as rpb
from ccoe_common.serving.events import ServingError
from ccoe_common.serving.failover import ReplicaLost


async def cancelling(response: Any) -> AsyncGenerator[Any, None]:
    """The items of a streaming handle call; leaving early (or being cancelled) cancels the call
    on the deployment, so nothing keeps running for a caller that went away."""
    try:
        async for item in response:
            yield item
    finally:
        response.cancel()


async def replica_stream(response: Any, request_id: str) -> AsyncGenerator[Any, None]:
    """`cancelling(response)` with Ray's failures as statuses: the replica's process gone
    (ActorDiedError, ActorUnavailableError, or a task error caused by one) is ReplicaLost, which
    the router core retries on another replica; Ray's own backpressure in front of the
    replicas (a backstop above the router's admission bound) is RESOURCE_EXHAUSTED."""
    try:
        async for item in cancelling(response):
            yield item
    except RayActorError as e:  # also a RayTaskError raised as an instance of its cause
        raise ReplicaLost(f"the replica serving request {request_id} went away ({type(e).__name__}: "
                          f"{_first_line(e)})") from e
    except BackPressureError as e:
        raise ServingError("RESOURCE_EXHAUSTED", f"every replica is busy and Ray's queue in front of them is "
                                                 f"full: {_first_line(e)}", retryable=True) from e
    except DeploymentUnavailableError as e:
        raise ServingError("UNAVAILABLE", f"no replica is running: {_first_line(e)}", retryable=True) from e


def _first_line(error: BaseException) -> str:
    # Ray's messages carry tracebacks and ANSI colours; the caller gets the gist.
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)[:300]


def watch_desired_state(registry: DeploymentHandle, replica_id: str = "") -> AsyncGenerator[rpb.DesiredState, None]:
    """The Registry's desired-state stream for one replica (or, with no id, for a router)."""
    return cancelling(registry.options(stream=True).WatchDesiredState.remote(
        rpb.WatchDesiredStateRequest(replica_id=replica_id)))
