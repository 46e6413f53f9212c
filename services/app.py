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
# Calls a router serves beside the inference calls it admits: health checks and watches,
# forwarded registry calls, a desired-state watch per `ccoe` client following a rollout.
ROUTER_HEADROOM = 64

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
    bound = config.admission_bound  # engine requests one router admits (ccoe_common/serving/admission.py)
    replica = _deployment(ModelReplica).options(
        num_replicas=rc.num_replicas,
        ray_actor_options={"num_cpus": rc.num_cpus, "num_gpus": rc.num_gpus},
        # Backstops only. The router admits at most the replicas' capacity and the engine refuses
        # beyond its queue (RESOURCE_EXHAUSTED with retry advice); Ray's limit needs room above
        # that for control calls (stats, validate, health). A router's handle queues only while
        # fewer replicas run than configured (one died, its replacement starts), and at most
        # what that router admits.
        max_ongoing_requests=rc.engine.max_running + rc.engine.max_waiting + CONTROL_HEADROOM,
        max_queued_requests=bound,
    ).bind(raw)
    # One registry replica: Redis holds the state, so a restart loses nothing, and a single
    # controller advances rollouts (compare-and-set would keep two correct, just busier).
    registry = _deployment(Registry).options(num_replicas=1, ray_actor_options={"num_cpus": 0},
                                             max_ongoing_requests=REGISTRY_MAX_ONGOING).bind(raw)
    # The router refuses what it cannot admit within milliseconds, with retry advice; Ray's
    # limits sit above its bound, for the calls it does not count (health, registry calls)
    # and for the moment a refusal takes. Ray's own refusals are answered RESOURCE_EXHAUSTED,
    # with the default retry advice added by the proxy-side servicers.
    return _deployment(Router).options(
        num_replicas=config.router.num_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=bound + ROUTER_HEADROOM,
        max_queued_requests=bound + ROUTER_HEADROOM,
    ).bind(replica, registry, raw)
