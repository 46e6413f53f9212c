"""`ccoe cluster status` as data and text, from objects shaped like KubeRay's and the registry's."""

from __future__ import annotations

import json

from ccoe_common.kube.status import Target, cluster_status, format_status, rayservice_status
from ccoe_common.pb import registry_pb2 as pb
from tests.unit.charts.chart import render
from tests.unit.kube.live import RAY_CLUSTER, live_objects

TARGET = Target("prod", "serving", "demo")


def _objects(ready: bool = True):
    objects = live_objects(render({}), "serving", ready=ready)
    (rs,) = [o for o in objects if o["kind"] == "RayService"]
    return rs, [o for o in objects if o["kind"] == "Pod"]


def _experts() -> pb.ListExpertsResponse:
    return pb.ListExpertsResponse(revision=7, experts=[
        pb.ExpertInfo(name="law", serving=2, versions=[
            pb.VersionInfo(version=1, state="retired"),
            pb.VersionInfo(version=2, state="active", loaded_on=["ModelReplica#a", "ModelReplica#b"])]),
        pb.ExpertInfo(name="sql", serving=1, versions=[pb.VersionInfo(version=1, loaded_on=["ModelReplica#a"])]),
    ])


def test_a_ready_release_is_healthy_and_shows_who_holds_what():
    rs, pods = _objects()
    status = cluster_status(TARGET, rs, pods, _experts())
    assert status.healthy
    assert status.rayservice.active_cluster == RAY_CLUSTER and not status.rayservice.upgrading
    (app,) = status.rayservice.applications
    assert app.status == "RUNNING" and app.deployments["ModelReplica"] == "HEALTHY"
    assert [p.role for p in status.pods] == ["head", "worker", "worker"]
    assert [p.gpus for p in status.pods] == [0, 1, 1]
    assert {r.replica_id: r.experts for r in status.replicas} == {
        "ModelReplica#a": ("law@2", "sql@1"), "ModelReplica#b": ("law@2",)}
    text = format_status(status)
    assert "RayService demo-ccoe (release demo, namespace serving, context prod): Running, ready" in text
    assert "Serve application ccoe: RUNNING (ModelReplica HEALTHY, Registry HEALTHY, Router HEALTHY)" in text
    assert "ModelReplica#a  law@2, sql@1" in text
    assert json.loads(json.dumps(status.to_dict()))["healthy"] is True


def test_a_starting_release_is_not_healthy_and_says_why():
    rs, pods = _objects(ready=False)
    status = cluster_status(TARGET, rs, pods, None, "Service 'demo-ccoe-ops' has no ready pod behind it")
    assert not status.healthy and status.replicas is None
    text = format_status(status)
    assert "NOT ready" in text and "Serve application ccoe: DEPLOYING" in text
    assert "registry: not reached: Service 'demo-ccoe-ops' has no ready pod behind it" in text


def test_an_upgrade_shows_the_new_cluster_coming():
    rs, _ = _objects()
    rs["status"]["pendingServiceStatus"] = {"rayClusterName": "demo-ccoe-raycluster-q9w8e"}
    status = rayservice_status(rs)
    assert status.upgrading and status.pending_cluster == "demo-ccoe-raycluster-q9w8e"


def test_a_rayservice_without_status_yet():
    rs, _ = _objects()
    del rs["status"]
    status = cluster_status(TARGET, rs, [], pb.ListExpertsResponse())
    assert not status.healthy
    text = format_status(status)
    assert "Serve: no application reported yet" in text and "no Ray pods" in text
    assert "registry: no replica holds an expert" in text
