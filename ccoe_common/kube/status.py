"""`ccoe cluster status` as data: the RayService's state and its Serve application, the Ray
pods, and which expert versions each model replica holds (from the registry). Built from the
objects the Kubernetes API returns, so it is tested on hand-made objects.

    status = cluster_status(target, rayservice_obj, pod_objs, experts_response, registry_error=None)
    print(format_status(status))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ccoe_common.console import format_table
from ccoe_common.pb import registry_pb2 as pb

RUNNING_APP = "RUNNING"


@dataclass(frozen=True)
class Target:
    context: str  # kubeconfig context, or "in-cluster"
    namespace: str
    release: str


@dataclass(frozen=True)
class AppStatus:
    name: str  # the Serve application, "ccoe"
    status: str  # Ray Serve's: RUNNING, DEPLOYING, DEPLOY_FAILED, UNHEALTHY, ...
    message: str
    deployments: dict[str, str]  # Router/ModelReplica/Registry -> HEALTHY, UPDATING, UNHEALTHY, ...


@dataclass(frozen=True)
class RayServiceStatus:
    name: str
    ready: bool  # KubeRay's Ready condition
    state: str  # e.g. "Running", or the Ready condition's reason
    upgrading: bool  # a second Ray cluster is being prepared (rayClusterConfig changed)
    active_cluster: str | None
    pending_cluster: str | None
    applications: tuple[AppStatus, ...]


@dataclass(frozen=True)
class PodStatus:
    name: str
    role: str  # head or worker
    group: str  # Ray group: headgroup, gpu-workers, ...
    cluster: str  # the RayCluster it belongs to (two during an upgrade)
    phase: str
    ready: bool
    restarts: int
    node: str | None
    gpus: int


@dataclass(frozen=True)
class ReplicaExperts:
    replica_id: str  # e.g. "ModelReplica#ab12cd"
    experts: tuple[str, ...]  # e.g. ("law@2", "sql@1")


@dataclass(frozen=True)
class ClusterStatus:
    target: Target
    rayservice: RayServiceStatus
    pods: tuple[PodStatus, ...]
    replicas: tuple[ReplicaExperts, ...] | None  # None: the registry could not be asked
    registry_error: str | None

    @property
    def healthy(self) -> bool:
        apps_ok = bool(self.rayservice.applications) and all(
            a.status == RUNNING_APP for a in self.rayservice.applications)
        return self.rayservice.ready and apps_ok and self.registry_error is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "healthy": self.healthy}


def rayservice_status(obj: dict[str, Any]) -> RayServiceStatus:
    status = obj.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready_condition = conditions.get("Ready") or {}
    ready = ready_condition.get("status") == "True"
    active = status.get("activeServiceStatus") or {}
    pending = status.get("pendingServiceStatus") or {}
    apps = tuple(
        AppStatus(name, app.get("status", "UNKNOWN"), app.get("message", ""),
                  {d: (s or {}).get("status", "UNKNOWN") for d, s in sorted((app.get("serveDeploymentStatuses")
                                                                              or {}).items())})
        for name, app in sorted((active.get("applicationStatuses") or {}).items()))
    state = status.get("serviceStatus") or ready_condition.get("reason") or ("Ready" if ready else "NotReady")
    upgrading = conditions.get("UpgradeInProgress", {}).get("status") == "True" or bool(pending.get("rayClusterName"))
    return RayServiceStatus(obj["metadata"]["name"], ready, state, upgrading, active.get("rayClusterName") or None,
                            pending.get("rayClusterName") or None, apps)


def pod_status(pod: dict[str, Any]) -> PodStatus:
    labels = pod["metadata"].get("labels") or {}
    status = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    gpus = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        limits = (container.get("resources") or {}).get("limits") or {}
        gpus += sum(int(v) for k, v in limits.items() if k.endswith("/gpu") and str(v).isdigit())
    return PodStatus(
        name=pod["metadata"]["name"], role=labels.get("ray.io/node-type", "?"), group=labels.get("ray.io/group", "?"),
        cluster=labels.get("ray.io/cluster", "?"), phase=status.get("phase", "Unknown"), ready=ready,
        restarts=sum(c.get("restartCount", 0) for c in status.get("containerStatuses") or []),
        node=(pod.get("spec") or {}).get("nodeName"), gpus=gpus)


def replica_experts(experts: pb.ListExpertsResponse) -> tuple[ReplicaExperts, ...]:
    """Who holds what, inverted from the registry's per-version `loaded_on` lists."""
    held: dict[str, list[str]] = {}
    for expert in experts.experts:
        for v in expert.versions:
            for replica in v.loaded_on:
                held.setdefault(replica, []).append(f"{expert.name}@{v.version}")
    return tuple(ReplicaExperts(r, tuple(sorted(names))) for r, names in sorted(held.items()))


def cluster_status(target: Target, rayservice: dict[str, Any], pods: list[dict[str, Any]],
                   experts: pb.ListExpertsResponse | None, registry_error: str | None = None) -> ClusterStatus:
    ordered = sorted((pod_status(p) for p in pods), key=lambda p: (p.role != "head", p.cluster, p.name))
    replicas = replica_experts(experts) if experts is not None else None
    return ClusterStatus(target, rayservice_status(rayservice), tuple(ordered), replicas, registry_error)


def format_status(s: ClusterStatus) -> str:
    rs = s.rayservice
    t = s.target
    lines = [f"RayService {rs.name} (release {t.release}, namespace {t.namespace}, context {t.context}): "
             f"{rs.state}, {'ready' if rs.ready else 'NOT ready'}"
             + (", upgrading to a new Ray cluster" if rs.upgrading else ""),
             f"  Ray cluster: {rs.active_cluster or '-'}" + (f"; new one coming: {rs.pending_cluster}"
                                                             if rs.pending_cluster else "")]
    if not rs.applications:
        lines.append("  Serve: no application reported yet")
    for app in rs.applications:
        deployments = ", ".join(f"{d} {state}" for d, state in app.deployments.items())
        lines.append(f"  Serve application {app.name}: {app.status}" + (f" ({deployments})" if deployments else ""))
        if app.message and app.status != RUNNING_APP:
            lines.append(f"    {app.message.strip().splitlines()[0]}")
    lines.append("")
    if s.pods:
        lines.append(format_table(("pod", "role", "group", "ready", "phase", "restarts", "GPUs", "node"),
                                  [(p.name, p.role, p.group, "yes" if p.ready else "no", p.phase, p.restarts, p.gpus,
                                    p.node or "-") for p in s.pods]))
    else:
        lines.append("no Ray pods")
    lines.append("")
    if s.registry_error is not None:
        lines.append(f"registry: not reached: {s.registry_error}")
    elif not s.replicas:
        lines.append("registry: no replica holds an expert")
    else:
        lines.append(format_table(("replica", "experts loaded (name@version)"),
                                  [(r.replica_id, ", ".join(r.experts)) for r in s.replicas]))
    return "\n".join(lines)
