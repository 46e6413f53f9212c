"""The chart's values: every one documented and covered by values.schema.json, the refusals
name the value, and what each value set turns on or off is really there."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from typing import Any

import pytest
import yaml
from ray.serve.config import AutoscalingConfig

from ccoe_common.routing.rules import RuleTable
from ccoe_common.serving.config import AppConfig
from tests.unit.charts.chart import (
    CHART,
    RELEASE,
    ROOT,
    VALUE_SETS,
    app_args,
    ray_pod_templates,
    render,
    render_error,
    serve_config,
)

VALUES_TEXT = (CHART / "values.yaml").read_text()
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


# ---- documentation and schema cover every value --------------------------------------------------

def _documented_keys(text: str) -> tuple[list[str], list[str]]:
    """(every key path in values.yaml, the ones without a `# --` line right above them)."""
    keys, missing, stack, pending = [], [], [], False
    for line in text.splitlines():
        if re.match(r"^\s*# -- \S", line):
            pending = True
            continue
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not m:
            if line.strip() and not line.strip().startswith("#"):
                pending = False
            continue
        depth = len(m.group(1)) // 2
        stack = [*stack[:depth], m.group(2)]
        path = ".".join(stack)
        keys.append(path)
        is_group = line.rstrip().endswith(":")  # a block of further keys, documented one by one
        if not pending and not is_group:
            missing.append(path)
        pending = False
    return keys, missing


def test_every_value_has_a_doc_comment() -> None:
    keys, missing = _documented_keys(VALUES_TEXT)
    assert len(keys) > 80 and missing == []


def test_the_doc_comment_check_can_fail() -> None:
    _, missing = _documented_keys("# -- fine\na: 1\nb:\n  # -- fine\n  c: 2\n  d: 3\n")
    assert missing == ["b.d"]


def _schema_at(path: str) -> dict[str, Any] | None:
    node = SCHEMA
    for part in path.split("."):
        if "$ref" in node:
            node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]]
        props = node.get("properties", {})
        if part in props:
            node = props[part]
        elif node.get("additionalProperties") not in (None, False) or (
                node.get("type") == "object" and "properties" not in node):
            return node  # a free-form map (nodeSelector, app, ...): its keys are the user's
        else:
            return None
    return node


def test_the_schema_covers_and_describes_every_value() -> None:
    keys, _ = _documented_keys(VALUES_TEXT)
    uncovered = [k for k in keys if _schema_at(k) is None]
    undescribed = [k for k in keys if (s := _schema_at(k)) is not None and "description" not in s]
    assert uncovered == [] and undescribed == []
    assert SCHEMA["additionalProperties"] is False


def test_the_schema_refuses_what_values_yaml_does_not_have() -> None:
    values = yaml.safe_load(VALUES_TEXT)

    def walk(schema: dict[str, Any], value: Any, path: str) -> None:
        if "$ref" in schema:
            schema = SCHEMA["definitions"][schema["$ref"].rsplit("/", 1)[1]]
        if isinstance(value, dict) and "properties" in schema:
            assert schema.get("additionalProperties") is False, path
            assert set(value) == set(schema["properties"]), path
            for k, v in value.items():
                walk(schema["properties"][k], v, f"{path}.{k}".lstrip("."))

    walk(SCHEMA, values, "")


# ---- refusals name the value ------------------------------------------------------------------

@pytest.mark.parametrize("values, named", [
    ({"workers": {"replicas": -1}}, "/workers/replicas"),
    ({"replicas": {"count": 0}}, "/replicas/count"),
    ({"gpu": {"enabled": False, "count": 2}}, "/gpu/count"),
    ({"gpu": {"enabled": False, "perReplica": 0.5}}, "/gpu/perReplica"),
    ({"bogus": 1}, "'bogus'"),
    ({"redis": {"password": "hunter2"}}, "'password'"),
    ({"redis": {"enabled": False, "external": {"url": "redis://:hunter2@redis:6379/0", "existingSecret": "r"}}},
     "/redis/external/url"),
    ({"redis": {"enabled": False, "external": {"url": "redis://redis:6379/0"}}}, "existingSecret"),
    ({"artifacts": {"type": "objectStore"}}, "/artifacts/objectStore/uri"),
    ({"upgradeStrategy": {"type": "Recreate"}}, "/upgradeStrategy/type"),
    ({"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade"}, "ray": {"autoscaler": {"enabled": True}}},
     "/upgradeStrategy/clusterUpgradeOptions/gatewayClassName"),
    ({"auth": {"mode": "basic"}}, "/auth/mode"),
    ({"service": {"grpcPort": 70000}}, "/service/grpcPort"),
])
def test_the_schema_refuses_a_bad_value_naming_it(values: dict[str, Any], named: str) -> None:
    assert named in render_error(values)


@pytest.mark.parametrize("values, named", [
    ({"app": {"redis_url": "redis://elsewhere:6379"}}, "app.redis_url is set by the chart from redis."),
    ({"app": {"replica": {"num_gpus": 2}}}, "app.replica.num_gpus is set by the chart from gpu.perReplica"),
    ({"app": {"auth": {"mode": "none"}}}, "app.auth is set by the chart from auth."),
    ({"app": {"registry": {"artifact_store": "/tmp/x"}}}, "app.registry.artifact_store is set by the chart"),
    ({"otel": {"endpoint": "http://otel:4317"}, "app": {"telemetry": {"tracing": "console"}}},
     "app.telemetry.tracing is set by the chart when otel.endpoint is set"),
    ({"replicas": {"count": 3}},
     "replicas.count 3 x gpu.perReplica 1 needs 3 GPUs; workers.maxReplicas 1 x gpu.count 1 gives 1"),
    ({"workers": {"maxReplicas": 3}}, "artifacts.pvc.accessMode"),  # default RWX is fine: must not fail
    ({"workers": {"minReplicas": 3, "maxReplicas": 2, "replicas": 2}},
     "workers.minReplicas (3) is above workers.maxReplicas (2)"),
    ({"workers": {"maxReplicas": 2}, "artifacts": {"pvc": {"accessMode": "ReadWriteOnce"}}},
     "artifacts.pvc.accessMode ReadWriteOnce cannot serve workers.maxReplicas 2"),
    ({"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade",
                          "clusterUpgradeOptions": {"gatewayClassName": "istio"}}},
     "NewClusterWithIncrementalUpgrade needs ray.autoscaler.enabled"),
    ({"gpu": {"enabled": False}, "replicas": {"cpus": 0}}, "replicas.cpus must be above 0 on a CPU-only install"),
    ({"ray": {"env": [{"name": "HF_TOKEN", "value": "hf_abc"}]}}, "ray.env HF_TOKEN: a secret goes in as valueFrom"),
    ({"replicas": {"autoscaling": {"enabled": True, "config": {"max_replicas": 9}}}},
     "replicas.autoscaling.config.max_replicas: use replicas.autoscaling.minReplicas/maxReplicas"),
])
def test_values_that_contradict_each_other_are_refused_naming_them(values: dict[str, Any], named: str) -> None:
    if named == "artifacts.pvc.accessMode":
        render(values)  # the control case: ReadWriteMany serves any number of workers
        return
    assert named in render_error(values)


# ---- what each value set renders -------------------------------------------------------------

def test_default_install_is_gpu_bundled_redis_token_auth() -> None:
    r = render(VALUE_SETS["default"])
    args = app_args(r)
    assert args["auth"] == {"mode": "token", "tokens_file": "/etc/ccoe/auth/tokens.yaml"}
    assert args["redis_url"] == f"redis://{RELEASE}-ccoe-redis.serving.svc:6379/0"
    head, workers = ray_pod_templates(r)["head"], ray_pod_templates(r)["gpu-workers"]
    assert head["spec"]["containers"][0]["image"] == "ccoe-serve:0.1.0-cuda"
    auth = next(v for v in workers["spec"]["volumes"] if v["name"] == "auth")
    assert auth["secret"]["secretName"] == f"{RELEASE}-ccoe-auth"
    assert r.one("RayService")["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert r.one("RayService")["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    assert r.one("PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert f"ccoe --namespace serving --release {RELEASE} expert list" in r.notes


def test_external_redis_runs_no_redis_and_reads_its_password_from_the_named_secret() -> None:
    r = render(VALUE_SETS["external-redis"])
    assert r.kinds("StatefulSet") == [] and f"{RELEASE}-ccoe-redis" not in r.names("Service")
    assert app_args(r)["redis_url"] == "rediss://redis.shared.svc:6380/2"
    assert f"{RELEASE}-ccoe-redis" not in r.names("NetworkPolicy")
    assert "shared-redis (key password)" in r.notes


def test_cpu_only_has_no_gpu_anywhere_and_loads_its_rules_from_the_config_map() -> None:
    r = render(VALUE_SETS["cpu-only"])
    assert "gpu" not in json.dumps(r.one("RayService")["spec"]["rayClusterConfig"]).lower().replace("num-gpus", "")
    (group,) = r.one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu-workers" and group["template"]["spec"]["containers"][0]["image"].endswith("-cpu")
    args = app_args(r)
    assert args["replica"] == {"num_replicas": 2, "num_cpus": 2, "num_gpus": 0}
    assert args["auth"] == {"mode": "none"} and "Authentication is OFF" in r.notes
    assert args["rules"] == "/etc/ccoe/config/rules.yaml"
    rules = r.one("ConfigMap", f"{RELEASE}-ccoe-config")["data"]["rules.yaml"]
    table = RuleTable.from_text(rules, known_experts={"sql"})
    assert table.match("SELECT a FROM t", "", {}).experts == ("sql",)


def test_four_gpu_replicas_autoscale_through_a_serve_override_and_the_ray_autoscaler() -> None:
    r = render(VALUE_SETS["gpu-4-autoscaling"])
    (app,) = serve_config(r)["applications"]
    (override,) = app["deployments"]
    assert override["name"] == "ModelReplica" and override["num_replicas"] == "auto"
    scaling = AutoscalingConfig(**override["autoscaling_config"])
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 32)
    cluster = r.one("RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    spec = group["template"]["spec"]
    assert (group["maxReplicas"], spec["runtimeClassName"]) == (2, "nvidia")
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    strategy = r.one("RayService")["spec"]["upgradeStrategy"]
    assert strategy["type"] == "NewClusterWithIncrementalUpgrade"
    assert strategy["clusterUpgradeOptions"] == {"gatewayClassName": "istio", "maxSurgePercent": 100,
                                                 "stepSizePercent": 5, "intervalSeconds": 30}
    assert {k["kind"] for k in r.docs} >= {"Role", "RoleBinding"}


def test_object_store_artifacts_mount_no_volume_and_take_credentials_from_the_secret() -> None:
    r = render(VALUE_SETS["object-store"])
    assert r.kinds("PersistentVolumeClaim") == []
    assert app_args(r)["registry"]["artifact_store"] == "s3://experts/ccoe/"
    for template in ray_pod_templates(r).values():
        container = template["spec"]["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "experts-s3"}}]
        assert "artifacts" not in {m["name"] for m in container["volumeMounts"]}


def test_service_monitor_and_otel_endpoint() -> None:
    r = render(VALUE_SETS["servicemonitor-otel"])
    monitor = r.one("ServiceMonitor")
    metrics = r.one("Service", f"{RELEASE}-ccoe-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert app_args(r)["telemetry"] == {"tracing": "otlp", "otlp_endpoint": "http://otel-collector.observability:4317",
                                        "service_name": "ccoe-prod"}
    assert render(VALUE_SETS["default"]).kinds("ServiceMonitor") == []


def test_existing_claims_are_used_not_created() -> None:
    r = render(VALUE_SETS["existing-pvc"])
    assert r.kinds("PersistentVolumeClaim") == []
    templates = ray_pod_templates(r)
    for group, template in templates.items():
        claims = {v["name"]: v["persistentVolumeClaim"] for v in template["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims["artifacts"]["claimName"] == "ccoe-experts"
        assert ("model" in claims) is (group != "head")
    mount = next(m for m in templates["gpu-workers"]["spec"]["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": "/models/qwen2-7b", "readOnly": True, "subPath": "qwen2-7b"}


def test_the_app_block_reaches_the_args_and_the_app_config() -> None:
    r = render(VALUE_SETS["app-passthrough"])
    config = AppConfig.load(app_args(r))
    assert config.replica.engine.max_running == 64 and config.replica.dtype == "bfloat16"
    assert config.router.max_fanout == 2 and config.registry.heartbeat_ttl_s == 5.0
    assert config.experts == ("/var/lib/ccoe/seed/law/v1",)
    assert config.auth is not None and config.auth.tokens_file == "/etc/ccoe/auth/tokens"
    assert config.auth.replica_token_file == "/etc/ccoe/replica-auth/replica-token"
    head = ray_pod_templates(r)["head"]["spec"]
    assert head["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in head["containers"][0]["env"]


def test_an_app_key_the_app_does_not_know_fails_the_app_config() -> None:
    # The chart passes `app` through; the app's own model is the judge (here, in the tests).
    r = render({"app": {"replica": {"engine": {"max_runing": 64}}}})
    with pytest.raises(ValueError, match="replica.engine.max_runing"):
        AppConfig.load(app_args(r))


# ---- versions agree -------------------------------------------------------------------------

PYPROJECT = (ROOT / "pyproject.toml").read_text()  # Python 3.10 has no tomllib


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert f'\nversion = "{chart["appVersion"]}"\n' in PYPROJECT


def test_the_charts_ray_version_is_the_one_the_project_pins_and_installs() -> None:
    values = yaml.safe_load(VALUES_TEXT)
    assert re.findall(r'"ray\[serve\]([^"]*)"', PYPROJECT) == [f"=={values['ray']['version']}"]
    assert version("ray") == values["ray"]["version"]


# ---- what a change does (docs/kubernetes.md "What a change does") ----------------------------------

def _parts(values: dict[str, Any]) -> tuple[str, str, str]:
    r = render(values)
    spec = r.one("RayService")["spec"]
    return (spec["serveConfigV2"], json.dumps(spec["rayClusterConfig"], sort_keys=True),
            json.dumps(r.one("ConfigMap", f"{RELEASE}-ccoe-config")["data"], sort_keys=True))


@pytest.mark.parametrize("change, serve, cluster", [
    ({"app": {"router": {"max_fanout": 2}}}, True, False),
    ({"replicas": {"count": 1, "cpus": 3}}, True, False),
    ({"replicas": {"autoscaling": {"enabled": True, "maxReplicas": 1}}}, True, False),
    ({"gpu": {"perReplica": 0.5}}, True, False),
    ({"otel": {"endpoint": "http://otel:4317"}}, True, False),
    ({"model": {"path": "/models/other"}}, True, False),
    ({"rules": {"version": 1, "rules": []}}, True, False),  # once: args gain the rules path
    ({"image": {"tag": "0.1.1-cuda"}}, False, True),
    ({"ray": {"version": "2.60.0", "head": {"resources": {"requests": {"cpu": "3"}}}}}, False, True),
    ({"gpu": {"count": 2}}, False, True),
    ({"auth": {"existingSecret": "other"}}, False, True),
    ({"auth": {"tokensKey": "t.yaml"}}, True, True),
    ({"service": {"grpcPort": 9443}}, True, True),
    ({"metrics": {"podAnnotations": False}}, False, True),
    ({"redis": {"appendfsync": "always"}}, False, False),
    ({"networkPolicy": {"enabled": False}}, False, False),
    ({"helm-chart-bump": True}, False, False),
])
def test_which_values_change_the_serve_config_and_which_the_ray_cluster(change, serve, cluster):
    base = _parts({})
    if "helm-chart-bump" in change:
        changed = _parts({"commonLabels": {"team": "serving"}})  # labels outside the pod templates
    else:
        changed = _parts(change)
    assert (changed[0] != base[0], changed[1] != base[1]) == (serve, cluster)


def test_editing_rules_touches_only_the_config_map():
    before = _parts({"rules": {"version": 1, "rules": []}})
    after = _parts({"rules": {"version": 2, "rules": [{"id": "a", "match": {"keywords": ["x"]}, "experts": ["a"]}]}})
    assert before[:2] == after[:2] and before[2] != after[2]
