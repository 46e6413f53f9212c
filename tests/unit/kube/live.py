"""What a charts/ccoe release looks like once KubeRay has run it: the chart's rendered objects
plus the pods KubeRay makes from the RayService's templates (with KubeRay's own labels) and
the RayService's status. Built from the real chart, so a chart change that breaks the CLI's
lookups breaks these tests.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.unit.charts.chart import Rendered, ray_pod_templates

RAY_CLUSTER = "demo-ccoe-raycluster-x7k2p"


def _pod(name: str, template: dict[str, Any], namespace: str, role: str, group: str, serving: bool,
         ready: bool = True) -> dict[str, Any]:
    labels = dict(template["metadata"]["labels"])
    labels.update({"ray.io/node-type": role, "ray.io/group": group, "ray.io/cluster": RAY_CLUSTER,
                   "ray.io/is-ray-node": "yes", "ray.io/serve": "true" if serving else "false"})
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {**copy.deepcopy(template["spec"]), "nodeName": f"node-{name[-1]}"},
        "status": {"phase": "Running" if ready else "Pending",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                   "containerStatuses": [{"name": c["name"], "ready": ready, "image": c["image"], "imageID": "",
                                          "restartCount": 1 if role == "worker" else 0, "state": {}}
                                         for c in template["spec"]["containers"]]},
    }


def rayservice_status(ready: bool = True) -> dict[str, Any]:
    return {
        "serviceStatus": "Running" if ready else "",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                        "reason": "NonZeroServeEndpoints" if ready else "Initializing",
                        "message": "", "lastTransitionTime": "2026-12-01T10:00:00Z"},
                       {"type": "UpgradeInProgress", "status": "False", "reason": "NoPendingCluster",
                        "message": "", "lastTransitionTime": "2026-12-01T10:00:00Z"}],
        "activeServiceStatus": {
            "rayClusterName": RAY_CLUSTER,
            "applicationStatuses": {"ccoe": {
                "status": "RUNNING" if ready else "DEPLOYING",
                "serveDeploymentStatuses": {"Router": {"status": "HEALTHY"}, "Registry": {"status": "HEALTHY"},
                                            "ModelReplica": {"status": "HEALTHY" if ready else "UPDATING"}}}},
        },
    }


def live_objects(rendered: Rendered, namespace: str, *, workers: int = 2, ready: bool = True) -> list[dict[str, Any]]:
    objects = []
    for doc in rendered.docs:
        if doc["kind"] in ("Service", "RayService"):
            obj = copy.deepcopy(doc)
            obj["metadata"]["namespace"] = namespace
            if obj["kind"] == "RayService":
                obj["status"] = rayservice_status(ready)
            objects.append(obj)
    templates = ray_pod_templates(rendered)
    objects.append(_pod(f"{RAY_CLUSTER}-head-h", templates.pop("head"), namespace, "head", "headgroup", serving=False))
    ((group, template),) = templates.items()
    for i in range(workers):
        objects.append(_pod(f"{RAY_CLUSTER}-{group}-worker-{i}", template, namespace, "worker", group,
                            serving=True, ready=ready))
    return objects
