"""The chart rendered by real Helm for every value set: strict lint, every core object valid for
a current Kubernetes, the RayService valid against KubeRay's own CRD, the serve config valid for
Ray Serve and its args for the app, and the security settings the chart promises."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.grpc_servicers import GRPC_SERVICERS
from ccoe_common.serving.local_stack import APP_BUILDER, import_attr
from tests.unit.charts.chart import (
    CHART,
    CRD,
    KUBE_VERSION,
    RELEASE,
    VALUE_SETS,
    Rendered,
    app_args,
    pod_specs,
    ray_pod_templates,
    render,
    serve_config,
)

CUSTOM_KINDS = {"RayService", "ServiceMonitor"}  # not in kubernetes-validate's schemas
SECRET_NAME = re.compile(r"(?i)password|passwd|secret|token|credential|api_?key|auth")


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def value_set(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def rendered(value_set: str) -> Rendered:
    return render(VALUE_SETS[value_set])


# ---- Helm and Kubernetes --------------------------------------------------------------------

def test_lint_is_clean_in_strict_mode(value_set: str) -> None:
    report = helm.lint(str(CHART), VALUE_SETS[value_set], strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_every_core_object_is_valid_for_a_current_kubernetes(rendered: Rendered) -> None:
    for doc in rendered.docs:
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_ray_pod_templates_are_valid_core_pod_templates(rendered: Rendered) -> None:
    # KubeRay builds the Ray pods from these; they must be valid PodTemplateSpecs themselves.
    for group, template in ray_pod_templates(rendered).items():
        obj = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@cache
def _rayservice_validator() -> jsonschema.Draft7Validator:
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _strict(schema: Any) -> Any:
    """The CRD schema as the API server's strict field validation applies it: an object with
    listed properties and no x-kubernetes-preserve-unknown-fields takes no other key."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def test_rayservice_is_valid_against_kuberays_crd(rendered: Rendered) -> None:
    _rayservice_validator().validate(rendered.one("RayService"))


def test_the_crd_check_can_fail() -> None:
    bad = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "x"},
           "spec": {"rayClusterConfig": {"headGroupSpec": {"rayStartParams": {"num-cpus": 0}, "template": {}}},
                    "serveConfigV2": "applications: []", "upgradeStratgy": {"type": "NewCluster"}}}
    errors = {e.message for e in _rayservice_validator().iter_errors(bad)}
    assert any("upgradeStratgy" in m for m in errors), errors
    assert any("0 is not of type 'string'" in m for m in errors), errors


# ---- the serve config and the app config ------------------------------------------------------

def test_serve_config_is_a_valid_ray_serve_config(rendered: Rendered) -> None:
    config = ServeDeploySchema.model_validate(serve_config(rendered))
    (app,) = config.applications
    assert app.import_path == APP_BUILDER
    assert app.route_prefix == "/"  # an app without one is unreachable over gRPC
    assert config.grpc_options.port == rendered.values.get("service", {}).get("grpcPort", 9000)
    assert config.http_options.port == rendered.values.get("service", {}).get("httpPort", 8000)
    assert tuple(config.grpc_options.grpc_servicer_functions) == GRPC_SERVICERS


def test_args_pass_the_apps_own_config_model(rendered: Rendered) -> None:
    config = AppConfig.load(app_args(rendered))
    assert config.grpc_port == serve_config(rendered)["grpc_options"]["port"]
    assert config.http_port == serve_config(rendered)["http_options"]["port"]
    assert config.redis_url is not None and "@" not in config.redis_url.split("//", 1)[1]


def test_the_import_path_imports_the_app_builder(rendered: Rendered) -> None:
    from services.app import build_app

    (app,) = serve_config(rendered)["applications"]
    assert import_attr(app["import_path"]) is build_app
    for path in serve_config(rendered)["grpc_options"]["grpc_servicer_functions"]:
        module, _, attr = path.rpartition(".")
        assert callable(import_attr(f"{module}:{attr}")), path


def test_the_config_map_holds_the_same_app_config_as_the_args(rendered: Rendered) -> None:
    config_map = rendered.one("ConfigMap", f"{RELEASE}-ccoe-config")
    assert yaml.safe_load(config_map["data"]["app.yaml"]) == app_args(rendered)


def test_every_file_the_app_reads_is_mounted_where_it_runs(rendered: Rendered) -> None:
    args = app_args(rendered)
    templates = ray_pod_templates(rendered)

    def mounted(template: dict[str, Any], path: str) -> bool:
        mounts = template["spec"]["containers"][0]["volumeMounts"]
        return any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts)

    every_pod = [p for p in (args.get("rules"), args["auth"].get("tokens_file"),
                             args["auth"].get("replica_token_file")) if p]
    if "://" not in args["registry"]["artifact_store"]:
        every_pod.append(args["registry"]["artifact_store"])
    for path in every_pod:
        assert all(mounted(t, path) for t in templates.values()), path
    model_claim = rendered.values.get("model", {}).get("volume", {}).get("existingClaim")
    if model_claim:
        workers = [t for g, t in templates.items() if g != "head"]
        assert all(mounted(t, args["backbone"]) for t in workers)


# ---- security ---------------------------------------------------------------------------------

def test_the_chart_holds_no_secret(rendered: Rendered) -> None:
    assert rendered.kinds("Secret") == []
    for doc in rendered.docs:
        for env in _env_vars(doc):
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env, f"{doc['kind']} {doc['metadata']['name']}: {env['name']} has a value"
                assert "secretKeyRef" in env["valueFrom"], env
    for config_map in rendered.kinds("ConfigMap"):
        for text in config_map["data"].values():
            assert not re.search(r"(?im)^\s*(requirepass|password|token)\b\s*[:= ]\s*\S", text), text


def test_every_container_runs_as_non_root_without_privileges(rendered: Rendered) -> None:
    for where, spec in pod_specs(rendered).items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, where
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
    cluster = rendered.one("RayService")["spec"]["rayClusterConfig"]
    if cluster["enableInTreeAutoscaling"]:
        sc = cluster["autoscalerOptions"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["capabilities"]["drop"] == ["ALL"]


def test_redis_never_runs_or_is_reached_without_a_password(rendered: Rendered) -> None:
    redis = rendered.values.get("redis", {})
    if redis.get("enabled", True):
        (sts,) = rendered.kinds("StatefulSet")
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert "requirepass" in container["command"][-1] and "$REDIS_PASSWORD" in container["command"][-1]
        conf = rendered.one("ConfigMap", f"{RELEASE}-ccoe-redis-config")["data"]["redis.conf"]
        assert "include /run/redis/auth.conf" in conf and "appendonly yes" in conf
        # Durable registry state (docs/registry.md#durability): fsync at least every second.
        assert f"appendfsync {redis.get('appendfsync', 'everysec')}\n" in conf
    else:
        assert rendered.kinds("StatefulSet") == []
        external = redis["external"]
        ref = {"name": external["existingSecret"], "key": external.get("passwordKey", "redis-password")}
    for template in ray_pod_templates(rendered).values():
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["CCOE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref


def test_network_policies_are_on_by_default_and_keep_ray_and_redis_inside(rendered: Rendered) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in rendered.kinds("NetworkPolicy")}
    if rendered.values.get("networkPolicy", {}).get("enabled", True) is False:
        assert policies == {}
        return
    ray = policies[f"{RELEASE}-ccoe-ray"]
    ray_pods = ray["podSelector"]
    open_rules = [r for r in ray["ingress"] if "ports" not in r]
    # Ray's internal ports (GCS, raylets, object store, workers) only from the release's Ray pods.
    assert open_rules == [{"from": [{"podSelector": ray_pods}]}]
    for rule in ray["ingress"]:
        if "ports" in rule:
            assert {p["port"] for p in rule["ports"]} <= {9000, 8000, 8080, 8265, 52365}
    if rendered.values.get("redis", {}).get("enabled", True):
        redis = policies[f"{RELEASE}-ccoe-redis"]
        assert redis["ingress"] == [{"from": [{"podSelector": ray_pods}], "ports": [{"port": 6379, "protocol": "TCP"}]}]
        assert redis["egress"] == [] and set(redis["policyTypes"]) == {"Ingress", "Egress"}


def test_only_the_head_may_use_the_api_and_rbac_is_minimal(rendered: Rendered) -> None:
    templates = ray_pod_templates(rendered)
    autoscaler = rendered.one("RayService")["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]
    assert templates["head"]["spec"]["automountServiceAccountToken"] is autoscaler
    assert all(t["spec"]["automountServiceAccountToken"] is False for g, t in templates.items() if g != "head")
    assert rendered.one("ServiceAccount")["automountServiceAccountToken"] is False
    roles = rendered.kinds("Role")
    assert rendered.kinds("ClusterRole") == [] and rendered.kinds("ClusterRoleBinding") == []
    if not autoscaler:
        assert roles == []
        return
    (role,) = roles
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert granted <= {("", "pods", v) for v in ("get", "list", "watch", "patch")} | {
        ("", "pods/resize", "patch"), ("ray.io", "rayclusters", "get"), ("ray.io", "rayclusters", "patch")}


# ---- placement, names, selectors ----------------------------------------------------------------

def test_the_head_gets_no_gpu_and_no_replica(rendered: Rendered) -> None:
    cluster = rendered.one("RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    resources = head["template"]["spec"]["containers"][0]["resources"]
    assert not any("gpu" in k for part in resources.values() for k in part)
    gpu = rendered.values.get("gpu", {})
    args = app_args(rendered)
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if gpu.get("enabled", True):
            assert limits["nvidia.com/gpu"] == str(gpu.get("count") or 1)
            assert args["replica"]["num_gpus"] == (gpu.get("perReplica") or 1)
        else:
            assert not any("gpu" in k for k in limits) and args["replica"]["num_gpus"] == 0
            assert args["replica"]["num_cpus"] > 0  # so no replica lands on the head (num-cpus 0)


def test_ray_pod_labels_do_not_change_with_versions(rendered: Rendered) -> None:
    # A label that changes per chart version would make KubeRay replace the whole Ray cluster.
    for template in ray_pod_templates(rendered).values():
        labels = template["metadata"]["labels"]
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels


def test_names_and_labels_fit_kubernetes_limits() -> None:
    long_release = "a-release-name-that-is-long-enough-to-need-cutting-x"
    rendered = render({}, name=long_release)
    for doc in rendered.docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
    names = {d["metadata"]["name"] for d in rendered.docs}
    assert any(n.endswith("-redis") for n in names) and any(n.endswith("-ops") for n in names)


def test_services_reach_named_ports_of_serving_ray_pods(rendered: Rendered) -> None:
    templates = ray_pod_templates(rendered)
    port_names = [{p["name"] for p in t["spec"]["containers"][0]["ports"]} for t in templates.values()]
    for name in (f"{RELEASE}-ccoe", f"{RELEASE}-ccoe-ops"):
        service = rendered.one("Service", name)
        assert service["spec"]["selector"]["ray.io/serve"] == "true"
        assert service["spec"]["selector"]["app.kubernetes.io/instance"] == RELEASE
        for port in service["spec"]["ports"]:
            assert all(port["targetPort"] in names for names in port_names)
    assert rendered.one("Service", f"{RELEASE}-ccoe-ops")["spec"]["type"] == "ClusterIP"


def test_disruption_budgets_select_the_pods_they_protect(rendered: Rendered) -> None:
    budgets = {p["metadata"]["name"]: p["spec"] for p in rendered.kinds("PodDisruptionBudget")}
    workers = budgets[f"{RELEASE}-ccoe-workers"]["selector"]["matchLabels"]
    for group, template in ray_pod_templates(rendered).items():
        matches = workers.items() <= template["metadata"]["labels"].items()
        assert matches is (group != "head"), group
    for sts in rendered.kinds("StatefulSet"):
        redis = budgets[f"{RELEASE}-ccoe-redis"]["selector"]["matchLabels"]
        assert redis.items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def _env_vars(doc: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "env" and isinstance(value, list):
                    found.extend(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return found
