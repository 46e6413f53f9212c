"""Finding a charts/ccoe release's objects among Kubernetes objects: pure functions over the
objects as the API returns them (dicts with camelCase keys, like the manifests), so they are
tested on the chart's own rendered manifests without a cluster.

    service = ops_service(services, "demo", "serving")        # the release's ops Service
    pod, port = forward_target(service, pods)                   # a serving pod and its gRPC port
"""

from __future__ import annotations

from typing import Any

# The chart's labels that the CLI relies on (charts/ccoe/templates/_helpers.tpl).
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
PART_OF = "app.kubernetes.io/part-of"
PART_OF_VALUE = "ccoe-serve"
OPS_COMPONENT = "ops"
RAY_NODE = "ray.io/is-ray-node"  # KubeRay's label on every Ray pod

Obj = dict[str, Any]


def release_selector(release: str, **extra: str) -> str:
    """Label selector of a release's objects, e.g. "app.kubernetes.io/instance=demo,...". """
    labels = {INSTANCE: release, PART_OF: PART_OF_VALUE, **extra}
    return ",".join(f"{k}={v}" for k, v in labels.items())


def _labels(obj: Obj) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _name(obj: Obj) -> str:
    return obj["metadata"]["name"]


def of_release(objects: list[Obj], release: str) -> list[Obj]:
    return [o for o in objects if _labels(o).get(INSTANCE) == release and _labels(o).get(PART_OF) == PART_OF_VALUE]


def ops_service(services: list[Obj], release: str, namespace: str) -> Obj:
    """The release's ops Service (component label "ops"); raises LookupError naming what is missing."""
    mine = of_release(services, release)
    if not mine:
        raise LookupError(f"no release '{release}' of charts/ccoe in namespace '{namespace}': no Service has "
                          f"{INSTANCE}={release} and {PART_OF}={PART_OF_VALUE} (`helm list -n {namespace}` "
                          "shows the releases there)")
    ops = [s for s in mine if _labels(s).get(COMPONENT) == OPS_COMPONENT]
    if len(ops) != 1:
        found = ", ".join(sorted(_name(s) for s in mine))
        raise LookupError(f"release '{release}' in namespace '{namespace}' has {len(ops)} ops Services "
                          f"({COMPONENT}={OPS_COMPONENT}), not one; its Services: {found}")
    return ops[0]


def rayservice(items: list[Obj], release: str, namespace: str) -> Obj:
    mine = of_release(items, release)
    if len(mine) != 1:
        names = ", ".join(sorted(_name(o) for o in items)) or "none"
        raise LookupError(f"release '{release}' has {len(mine)} RayServices in namespace '{namespace}', not one "
                          f"(RayServices there: {names})")
    return mine[0]


def selects(selector: dict[str, str], obj: Obj) -> bool:
    return bool(selector) and selector.items() <= _labels(obj).items()


def pod_ready(pod: Obj) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def container_port(pod: Obj, target: int | str) -> int | None:
    """A Service's targetPort on this pod: a number as it is, a name looked up in its containers."""
    if isinstance(target, int):
        return target
    if target.isdigit():
        return int(target)
    for container in pod["spec"]["containers"]:
        for port in container.get("ports") or []:
            if port.get("name") == target:
                return int(port["containerPort"])
    return None


def forward_target(service: Obj, pods: list[Obj], port_name: str = "grpc") -> tuple[str, int]:
    """(pod name, container port) to port-forward to: a ready pod the Service selects.

    Raises LookupError when the Service has no such port, and RuntimeError when no selected pod
    is ready (waiting may help).
    """
    ports = service["spec"].get("ports") or []
    port = next((p for p in ports if p.get("name") == port_name), ports[0] if len(ports) == 1 else None)
    if port is None:
        raise LookupError(f"Service '{_name(service)}' has no port named '{port_name}' "
                          f"(it has: {', '.join(str(p.get('name')) for p in ports) or 'none'})")
    selector = service["spec"].get("selector") or {}
    selected = [p for p in pods if selects(selector, p)]
    ready = sorted((p for p in selected if pod_ready(p)), key=_name)
    for pod in ready:
        target = container_port(pod, port.get("targetPort", port["port"]))
        if target is not None:
            return _name(pod), target
    shown = ",".join(f"{k}={v}" for k, v in selector.items())
    raise RuntimeError(f"Service '{_name(service)}' has no ready pod behind it ({len(selected)} selected by "
                       f"{shown}, none ready with port '{port.get('targetPort', port['port'])}'): the Ray "
                       "cluster may still be starting or its Serve proxies unhealthy")
