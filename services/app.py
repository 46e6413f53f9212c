"""The one app builder: validates the config once and binds the deployments.

Both the local stack (ccoe_common.serving.local_stack) and a KubeRay RayService reach it by
its import path, `services.app:build_app`, with the config as `args` (serveConfigV2); the
gRPC servicers the proxy registers are ccoe_common.serving.grpc_servicers.GRPC_SERVICERS.
"""

from __future__ import annotations

from typing import Any, cast

from ray.serve import Application, Deployment

from ccoe_common.auth.config import NO_AUTH_SECTION
from ccoe_common.serving.config import AppConfig, ConfigError
from services.registry.deployment import Registry
from services.replica.deployment import ModelReplica
from services.router.deployment import Router

CONTROL_HEADROOM = 16

# Every replica and router holds one WatchDesiredState stream open on the registry.
REGISTRY_MAX_ONGOING = 1024


def _deployment(cls: type) -> Deployment:
    """`cls` as what @serve.deployment made it: mypy keeps a decorated class's own type."""
    return cast(Deployment, cls)


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    config = AppConfig.load(args)
    if config.auth is None:
        raise ConfigError(NO_AUTH_SECTION)  # before anything deploys: every call is authenticated or none is
    raw = config.model_dump(mode="json")
    rc = config.replica
    replica = _deployment(ModelReplica).options(
        num_replicas=rc.num_replicas,
        ray_actor_options={"num_cpus": rc.num_cpus, "num_gpus": rc.num_gpus},
        # The engine does admission control (RESOURCE_EXHAUSTED beyond its queue); Ray's own
        # limit only needs room above it for control calls (stats, push, pop, health).
        max_ongoing_requests=rc.engine.max_running + rc.engine.max_waiting + CONTROL_HEADROOM,
    ).bind(raw)
    # One registry replica: Redis holds the state, so a restart loses nothing, and a single
    # controller advances rollouts (compare-and-set would keep two correct, just busier).
    registry = _deployment(Registry).options(num_replicas=1, ray_actor_options={"num_cpus": 0},
                                             max_ongoing_requests=REGISTRY_MAX_ONGOING).bind(raw)
    return _deployment(Router).options(
        num_replicas=config.router.num_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=4 * (rc.engine.max_running + rc.engine.max_waiting) + CONTROL_HEADROOM,
    ).bind(replica, registry, raw)
