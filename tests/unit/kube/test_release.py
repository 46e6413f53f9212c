"""Finding a release's ops Service, RayService and a serving pod among Kubernetes objects: the
chart's own rendered objects, as KubeRay would run them."""

from __future__ import annotations

import copy

import pytest

from ccoe_common.kube.release import container_port, forward_target, ops_service, rayservice, release_selector
from tests.unit.charts.chart import VALUE_SETS, render
from tests.unit.kube.live import RAY_CLUSTER, live_objects

NS = "serving"


def _kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.parametrize("value_set", ["default", "cpu-only", "app-passthrough"])
def test_the_ops_service_of_a_rendered_release_is_found_and_forwards_to_a_serving_worker(value_set):
    objects = live_objects(render(VALUE_SETS[value_set]), NS)
    service = ops_service(_kind(objects, "Service"), "demo", NS)
    assert service["metadata"]["name"] == "demo-ccoe-ops"
    pod, port = forward_target(service, _kind(objects, "Pod"))
    assert pod.startswith(f"{RAY_CLUSTER}-") and "-worker-" in pod  # the head is out of the serve path
    assert port == 9000


def test_a_renamed_release_and_another_grpc_port_are_followed():
    rendered = render({"fullnameOverride": "edge", "nameOverride": "llm", "service": {"grpcPort": 9443}},
                      name="prod-1")
    objects = live_objects(rendered, NS)
    service = ops_service(_kind(objects, "Service"), "prod-1", NS)
    assert service["metadata"]["name"] == "edge-ops"
    assert forward_target(service, _kind(objects, "Pod"))[1] == 9443


def test_no_such_release_names_the_release_and_namespace():
    objects = live_objects(render(VALUE_SETS["default"]), NS)
    with pytest.raises(LookupError, match="no release 'other' of charts/ccoe in namespace 'serving'.*helm list -n"):
        ops_service(_kind(objects, "Service"), "other", NS)


def test_a_release_without_its_ops_service_lists_the_services_it_has():
    services = [s for s in _kind(live_objects(render({}), NS), "Service") if not s["metadata"]["name"].endswith("-ops")]
    with pytest.raises(LookupError, match=r"has 0 ops Services .*its Services: demo-ccoe, demo-ccoe-metrics"):
        ops_service(services, "demo", NS)


def test_no_ready_pod_behind_the_service_is_a_retryable_runtime_error():
    objects = live_objects(render({}), NS, ready=False)
    service = ops_service(_kind(objects, "Service"), "demo", NS)
    with pytest.raises(RuntimeError, match=r"no ready pod behind it \(2 selected by .*ray.io/serve=true"):
        forward_target(service, _kind(objects, "Pod"))


def test_a_pod_being_deleted_is_not_chosen():
    objects = live_objects(render({}), NS, workers=2)
    pods = _kind(objects, "Pod")
    first = sorted(p["metadata"]["name"] for p in pods if "-worker-" in p["metadata"]["name"])[0]
    for p in pods:
        if p["metadata"]["name"] == first:
            p["metadata"]["deletionTimestamp"] = "2026-12-01T10:00:00Z"
    pod, _ = forward_target(ops_service(_kind(objects, "Service"), "demo", NS), pods)
    assert pod != first


def test_named_and_numbered_target_ports():
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "ports": [
        {"name": "grpc", "containerPort": 9001}]}]}}
    assert container_port(pod, "grpc") == 9001
    assert container_port(pod, 7000) == 7000 and container_port(pod, "7000") == 7000
    assert container_port(pod, "metrics") is None


def test_the_release_rayservice_is_the_one_labelled_for_it():
    objects = live_objects(render({}), NS)
    other = copy.deepcopy(_kind(objects, "RayService")[0])
    other["metadata"]["name"] = "someone-else"
    other["metadata"]["labels"]["app.kubernetes.io/instance"] = "someone"
    assert rayservice([other, *_kind(objects, "RayService")], "demo", NS)["metadata"]["name"] == "demo-ccoe"
    with pytest.raises(LookupError, match="release 'nope' has 0 RayServices in namespace 'serving'"):
        rayservice([other], "nope", NS)


def test_the_selector_the_cli_sends_matches_the_charts_labels():
    selector = dict(term.split("=") for term in release_selector("demo").split(","))
    for doc in render({}).docs:
        if doc["kind"] in ("Service", "RayService"):
            assert selector.items() <= doc["metadata"]["labels"].items(), doc["metadata"]["name"]
