"""The cluster-aware ops CLI end to end without a cluster: a kubeconfig whose context points at
a stand-in API server (tests/unit/kube/apiserver.py) that holds the chart's rendered objects as
KubeRay would run them and port-forwards over the real WebSocket protocol to a real registry
(RegistryService on a real redis-server, behind a real gRPC server)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from urllib.parse import unquote

import grpc
import pytest

from ccoe_common.cli.main import main
from ccoe_common.kube.cluster import Kubeconfig, connect, kubeconfig_paths
from ccoe_common.kube.errors import ClusterError
from ccoe_common.pb import registry_pb2_grpc
from ccoe_common.registry.artifact_store import ArtifactStore
from ccoe_common.registry.config import RegistryConfig
from ccoe_common.registry.redis_server import RedisServer
from ccoe_common.registry.service import RegistryService
from ccoe_common.registry.store import RegistryStore
from tests.unit.charts.chart import render
from tests.unit.kube.apiserver import FakeApiServer
from tests.unit.kube.live import RAY_CLUSTER, live_objects

NS = "serving"
WORKER = f"{RAY_CLUSTER}-gpu-workers-worker-0"


class _RegistryGlue(registry_pb2_grpc.RegistryServicer):
    """The read RPCs the CLI makes here, onto the real RegistryService (as services/registry does)."""

    def __init__(self, service: RegistryService):
        self.service = service

    async def ListExperts(self, request, context):
        return await self.service.list()

    async def GetExpert(self, request, context):
        return await self.service.get(request.name)


@pytest.fixture(scope="module")
def registry_port(tmp_path_factory):
    """A real registry over gRPC with one expert, law@1, loaded on one replica."""
    with RedisServer() as redis_server:
        store = RegistryStore.from_url(redis_server.url)
        store.push_version("law", 1, {"name": "law", "version": 1, "kind": "ffn"}, "file:///artifacts/law/v1",
                           expected_rev=0, who="test")
        store.heartbeat("ModelReplica#w0", {"loaded": [["law", 1]], "healthy": True}, ttl_s=600)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()

        async def start():
            async def validate(uri: str) -> None:
                return None

            artifacts = ArtifactStore(str(tmp_path_factory.mktemp("artifacts")))
            service = RegistryService(store, artifacts, validate, RegistryConfig())
            server = grpc.aio.server()
            registry_pb2_grpc.add_RegistryServicer_to_server(_RegistryGlue(service), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        yield port
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


@pytest.fixture()
def api(registry_port):
    objects = live_objects(render({}), NS)
    forwards = {(o["metadata"]["name"], 9000): registry_port for o in objects if o["kind"] == "Pod"}
    with FakeApiServer(objects, namespaces=(NS,), forwards=forwards) as server:
        yield server


@pytest.fixture()
def kubeconfig(api, tmp_path) -> Path:
    return api.kubeconfig(tmp_path / "config", extra_contexts=("staging",))


def _ccoe(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- through the whole path -------------------------------------------------------------------

def test_a_registry_command_reaches_the_release_through_its_own_port_forward(api, kubeconfig, capsys):
    code, out, err = _ccoe(capsys, "--kubeconfig", str(kubeconfig), "--namespace", NS, "--release", "demo",
                           "expert", "list", "--json")
    assert code == 0, err
    (law,) = json.loads(out)["experts"]
    assert law["name"] == "law" and law["versions"][0]["loaded_on"] == ["ModelReplica#w0"]
    assert api.forwarded >= 2  # the probe, then the command's own connection
    services_query = unquote(next(r for r in api.requests if "/services?" in r))
    assert "labelSelector=app.kubernetes.io/instance=demo,app.kubernetes.io/part-of=ccoe-serve" in services_query
    assert any(f"/pods/{WORKER}/portforward?ports=9000" in r for r in api.requests)


def test_cluster_status_shows_the_rayservice_pods_and_loaded_versions(api, kubeconfig, capsys):
    code, out, err = _ccoe(capsys, "--kubeconfig", str(kubeconfig), "--namespace", NS, "--release", "demo",
                           "cluster", "status", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["healthy"] is True and status["target"] == {"context": "fake", "namespace": NS, "release": "demo"}
    assert status["rayservice"]["applications"][0]["status"] == "RUNNING"
    assert [p["role"] for p in status["pods"]] == ["head", "worker", "worker"]
    assert status["replicas"] == [{"replica_id": "ModelReplica#w0", "experts": ["law@1"]}]
    code, out, _ = _ccoe(capsys, "--kubeconfig", str(kubeconfig), "--namespace", NS, "--release", "demo",
                         "cluster", "status")
    assert code == 0 and "ModelReplica#w0  law@1" in out


def test_the_contexts_namespace_is_the_default(api, tmp_path, capsys):
    config = api.kubeconfig(tmp_path / "with-ns", namespace=NS)
    code, _, err = _ccoe(capsys, "--kubeconfig", str(config), "--release", "demo", "expert", "list", "--json")
    assert code == 0, err


# ---- what is missing is named ----------------------------------------------------------------------

@pytest.mark.parametrize("argv, code, message", [
    (["--namespace", "nope", "--release", "demo", "expert", "list"], 2, "no namespace 'nope' in context 'fake'"),
    (["--namespace", NS, "--release", "other", "expert", "list"], 2,
     "no release 'other' of charts/ccoe in namespace 'serving'"),
    (["--kube-context", "prod", "--namespace", NS, "--release", "demo", "expert", "list"], 2,
     "no context 'prod' in kubeconfig"),
    (["--namespace", NS, "--release", "other", "cluster", "status"], 2,
     "release 'other' has 0 RayServices in namespace 'serving', not one (RayServices there: demo-ccoe)"),
])
def test_missing_things_are_named(kubeconfig, capsys, argv, code, message):
    got, _, err = _ccoe(capsys, "--kubeconfig", str(kubeconfig), *argv)
    assert got == code and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_an_unknown_context_lists_the_ones_there_are(kubeconfig, capsys):
    _, _, err = _ccoe(capsys, "--kubeconfig", str(kubeconfig), "--kube-context", "prod", "--release", "demo",
                      "audit")
    assert "it has: fake, staging" in err


def test_a_forbidden_list_says_so(api, kubeconfig, capsys):
    api.forbidden.add("services")
    code, _, err = _ccoe(capsys, "--kubeconfig", str(kubeconfig), "--namespace", NS, "--release", "demo",
                         "expert", "list")
    assert code == 2 and "refused to let you list Services in namespace 'serving' (context 'fake'): forbidden" in err


def test_no_ready_pod_is_worth_a_retry(registry_port, tmp_path, capsys):
    objects = live_objects(render({}), NS, ready=False)
    with FakeApiServer(objects, namespaces=(NS,)) as api:
        config = api.kubeconfig(tmp_path / "config")
        code, _, err = _ccoe(capsys, "--kubeconfig", str(config), "--namespace", NS, "--release", "demo",
                             "expert", "list")
        assert code == 1 and "has no ready pod behind it" in err
        code, out, _ = _ccoe(capsys, "--kubeconfig", str(config), "--namespace", NS, "--release", "demo",
                             "cluster", "status", "--json")
        assert code == 1 and json.loads(out)["registry_error"].startswith("Service 'demo-ccoe-ops' has no ready pod")


def test_a_refused_port_forward_names_the_pod(registry_port, tmp_path, capsys):
    with FakeApiServer(live_objects(render({}), NS), namespaces=(NS,), forwards={}) as api:
        config = api.kubeconfig(tmp_path / "config")
        code, _, err = _ccoe(capsys, "--kubeconfig", str(config), "--namespace", NS, "--release", "demo",
                             "expert", "list")
    assert code == 1 and f"cannot port-forward to pod '{WORKER}' port 9000 in namespace 'serving'" in err


def test_an_api_server_that_does_not_answer(tmp_path, capsys):
    with FakeApiServer([], namespaces=(NS,)) as api:
        config = api.kubeconfig(tmp_path / "config")
    # The server is gone now: nothing listens at its address.
    code, _, err = _ccoe(capsys, "--kubeconfig", str(config), "--namespace", NS, "--release", "demo",
                         "expert", "list")
    assert code == 1 and f"cannot reach the Kubernetes API server {api.url} of context 'fake'" in err


# ---- kubeconfig ------------------------------------------------------------------------------------

def test_no_kubeconfig_names_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "config"
    code, _, err = _ccoe(capsys, "--kubeconfig", str(missing), "--release", "demo", "expert", "list")
    assert code == 2 and f"no kubeconfig: {missing} does not exist" in err


def test_a_kubeconfig_without_current_context_asks_for_one(tmp_path):
    path = tmp_path / "config"
    path.write_text("apiVersion: v1\nkind: Config\nclusters: []\nusers: []\n"
                    "contexts:\n- name: a\n  context: {cluster: x, user: y}\n")
    with pytest.raises(ClusterError, match=r"has no current context: choose one with --kube-context \(it has: a\)"):
        connect(kubeconfig=str(path))


def test_a_kubeconfig_that_is_not_one(tmp_path):
    path = tmp_path / "config"
    path.write_text("just: [text\n")
    with pytest.raises(ClusterError, match="cannot be read"):
        connect(kubeconfig=str(path))


def test_kubeconfig_lists_merge_like_kubectl(api, tmp_path):
    first = api.kubeconfig(tmp_path / "a")
    second = tmp_path / "b"
    second.write_text(first.read_text().replace("name: fake", "name: other").replace("cluster: fake", "cluster: other")
                      .replace("current-context: fake", "current-context: other"))
    paths = kubeconfig_paths(f"{first}:{tmp_path / 'missing'}:{second}")
    config = Kubeconfig.read(paths)
    assert set(config.contexts) == {"fake", "other"} and config.current == "fake"
    cluster = connect(context="other", namespace=NS, kubeconfig=f"{first}:{second}")
    assert (cluster.context, cluster.namespace, cluster.server) == ("other", NS, api.url)


# ---- flags that do not go together -------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--namespace", NS, "expert", "list"], "--namespace needs --release NAME"),
    (["--release", "demo", "demo", "core"], "--release works with the registry commands"),
    (["--release", "demo", "expert", "list", "--registry", "10.0.0.5:9000"],
     "--registry 10.0.0.5:9000 and --release demo both say where the registry is"),
    (["cluster", "status"], "cluster status needs --release NAME"),
])
def test_flags_that_do_not_go_together(capsys, argv, message):
    code, _, err = _ccoe(capsys, *argv)
    assert code == 2 and message in err
