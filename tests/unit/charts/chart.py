"""Rendering charts/ccoe with real Helm (helm-python-sdk bundles Helm's Go SDK) and the value
sets the chart tests share.

    rendered = render(VALUE_SETS["cpu-only"])
    rendered.one("RayService")["spec"]["serveConfigV2"]
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "ccoe"
CRD = ROOT / "tests" / "data" / "kuberay" / "ray.io_rayservices.yaml"
KUBE_VERSION = "1.35.0"  # a current Kubernetes for kubernetes-validate and `helm lint`
RELEASE, NAMESPACE = "demo", "serving"

# Each value set is one way people install the chart; every test runs over all of them.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "external-redis": {
        "redis": {"enabled": False,
                  "external": {"url": "rediss://redis.shared.svc:6380/2", "existingSecret": "shared-redis",
                               "passwordKey": "password"}},
    },
    "cpu-only": {
        "gpu": {"enabled": False},
        "replicas": {"count": 2, "cpus": 2},
        "workers": {"replicas": 2, "minReplicas": 1, "maxReplicas": 3,
                    "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}}},
        "rules": {"version": 1, "default": {"expert": None},
                  "rules": [{"id": "sql", "priority": 10, "match": {"regex": [r"\bSELECT\b"]}, "experts": ["sql"]}]},
        "auth": {"mode": "none"},
    },
    "gpu-4-autoscaling": {
        "gpu": {"count": 2, "perReplica": 1},
        "workers": {"replicas": 1, "minReplicas": 1, "maxReplicas": 2, "runtimeClassName": "nvidia",
                    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "replicas": {"count": 4, "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4,
                                                 "config": {"target_ongoing_requests": 32, "downscale_delay_s": 600}}},
        "ray": {"autoscaler": {"enabled": True}},
        "upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade",
                            "clusterUpgradeOptions": {"gatewayClassName": "istio", "stepSizePercent": 5}},
    },
    "object-store": {
        "artifacts": {"type": "objectStore",
                      "objectStore": {"uri": "s3://experts/ccoe/", "existingSecret": "experts-s3"}},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/ccoe"}},
    },
    "networkpolicy-off": {"networkPolicy": {"enabled": False}},
    "servicemonitor-otel": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "otel": {"endpoint": "http://otel-collector.observability:4317"},
        "app": {"telemetry": {"service_name": "ccoe-prod"}},
    },
    "existing-pvc": {
        "artifacts": {"pvc": {"existingClaim": "ccoe-experts"}},
        "model": {"path": "/models/qwen2-7b", "volume": {"existingClaim": "models", "subPath": "qwen2-7b",
                                                          "mountPath": "/models/qwen2-7b"}},
    },
    "app-passthrough": {
        "app": {"experts": ["/var/lib/ccoe/seed/law/v1"],
                "replica": {"dtype": "bfloat16", "engine": {"max_seq_len": 4096, "max_running": 64,
                                                            "max_batched_tokens": 2048}},
                "router": {"max_fanout": 2, "max_prompt_chars": 50000},
                "registry": {"heartbeat_ttl_s": 5.0, "smoke_prompt": "2+2="}},
        "auth": {"existingSecret": "ccoe-tokens", "tokensKey": "tokens",
                 "replicaToken": {"existingSecret": "ccoe-replica"}},
        "ray": {"env": [{"name": "NCCL_DEBUG", "value": "WARN"}]},
        "imagePullSecrets": [{"name": "regcred"}],
    },
}


@dataclass(frozen=True)
class Rendered:
    values: dict[str, Any]
    files: dict[str, str]  # template path -> rendered text
    docs: tuple[dict[str, Any], ...]  # every Kubernetes object, in template order

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.kinds(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
        return found[0]

    def names(self, kind: str) -> set[str]:
        return {d["metadata"]["name"] for d in self.kinds(kind)}

    @property
    def notes(self) -> str:
        return next(text for path, text in self.files.items() if path.endswith("NOTES.txt"))


def render(values: dict[str, Any], *, name: str = RELEASE, namespace: str = NAMESPACE) -> Rendered:
    return _render(yaml.safe_dump(values), name, namespace)


@cache
def _render(values_yaml: str, name: str, namespace: str) -> Rendered:
    values = yaml.safe_load(values_yaml)
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(copy.deepcopy(values), name=name, namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(files.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return Rendered(values, files, tuple(docs))


def render_error(values: dict[str, Any]) -> str:
    """The message Helm refuses these values with (the test fails if it renders)."""
    try:
        with helm.Chart.load(str(CHART)) as chart:
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    except helm.HelmError as e:
        return str(e)
    raise AssertionError(f"the chart rendered values it should refuse: {values}")


def serve_config(rendered: Rendered) -> dict[str, Any]:
    return yaml.safe_load(rendered.one("RayService")["spec"]["serveConfigV2"])


def app_args(rendered: Rendered) -> dict[str, Any]:
    (app,) = serve_config(rendered)["applications"]
    return app["args"]


def ray_pod_templates(rendered: Rendered) -> dict[str, dict[str, Any]]:
    """"head" and each worker group's name -> its pod template."""
    cluster = rendered.one("RayService")["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return out


def pod_specs(rendered: Rendered) -> dict[str, dict[str, Any]]:
    """Every pod spec the release runs: the Ray pods' and the Redis StatefulSet's."""
    out = {f"ray/{k}": t["spec"] for k, t in ray_pod_templates(rendered).items()}
    for sts in rendered.kinds("StatefulSet"):
        out[f"statefulset/{sts['metadata']['name']}"] = sts["spec"]["template"]["spec"]
    return out
