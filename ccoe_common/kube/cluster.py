"""One cluster as the ops CLI sees it: a kubeconfig context (or the pod's own account inside a
cluster), a namespace, and the Kubernetes API calls the CLI makes there, every failure turned
into a ClusterError that names what is missing.

    cluster = connect(context="prod", namespace="serving")
    with forward_to_ops(cluster, "demo") as address:      # "127.0.0.1:41237"
        RegistryClient(address).list()
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes import client as k8s
from kubernetes.config import ConfigException, incluster_config, kube_config
from kubernetes.stream import portforward

from ccoe_common.kube.errors import ClusterError
from ccoe_common.kube.portforward import Stream, TcpForwarder
from ccoe_common.kube.release import (
    RAY_NODE,
    forward_target,
    ops_service,
    rayservice,
    release_selector,
)

REQUEST_TIMEOUT_S = 15
IN_CLUSTER = "in-cluster"
RAY_GROUP, RAY_VERSION, RAYSERVICES = "ray.io", "v1", "rayservices"


def kubeconfig_paths(kubeconfig: str | None = None) -> list[Path]:
    """The files a kubeconfig is read from: --kubeconfig, else $KUBECONFIG (as the kubernetes
    client read it; may list several), else ~/.kube/config."""
    raw = kubeconfig or kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p]


@dataclass(frozen=True)
class Kubeconfig:
    files: str  # the existing files, joined as KUBECONFIG joins them
    contexts: dict[str, dict[str, Any]]  # name -> its context entry (cluster, user, namespace)
    current: str | None

    @classmethod
    def read(cls, paths: list[Path]) -> Kubeconfig:
        """ClusterError when none of `paths` exists or what is there is not a kubeconfig. Several
        files merge as kubectl merges them: the first file that names a context or sets
        current-context wins."""
        existing = [p for p in paths if p.is_file()]
        if not existing:
            raise ClusterError(f"no kubeconfig: {', '.join(map(str, paths))} does not exist "
                               "(give --kubeconfig PATH or set KUBECONFIG)")
        contexts: dict[str, dict[str, Any]] = {}
        current = None
        for path in existing:
            try:
                data = yaml.safe_load(path.read_text()) or {}
                if not isinstance(data, dict):
                    raise ValueError("not a mapping")
                for entry in data.get("contexts") or []:
                    contexts.setdefault(str(entry["name"]), dict(entry.get("context") or {}))
            except (OSError, yaml.YAMLError, ValueError, TypeError, KeyError) as e:
                raise ClusterError(f"kubeconfig {path} cannot be read: {e}") from e
            current = current or data.get("current-context") or None
        return cls(os.pathsep.join(map(str, existing)), contexts, current)

    def choose(self, context: str | None) -> str:
        """`context`, else the current one; ClusterError naming the contexts there are."""
        have = ", ".join(self.contexts) or "none"
        name = context or self.current
        if name is None:
            raise ClusterError(f"kubeconfig {self.files} has no current context: choose one with --kube-context "
                               f"(it has: {have})")
        if name not in self.contexts:
            raise ClusterError(f"no context '{name}' in kubeconfig {self.files}; it has: {have}")
        return name


@dataclass
class Cluster:
    api: k8s.ApiClient
    context: str
    namespace: str

    @property
    def server(self) -> str:
        return self.api.configuration.host

    # ---- reads -----------------------------------------------------------------------------

    def check_namespace(self) -> None:
        """ClusterError if the namespace does not exist; a user who may not read namespaces passes."""
        try:
            self._call("read the namespace", k8s.CoreV1Api(self.api).read_namespace, self.namespace)
        except ClusterError as e:
            if e.status == 404:
                raise ClusterError(f"no namespace '{self.namespace}' in context '{self.context}' "
                                   f"({self.server})", status=404) from e
            if e.status != 403:
                raise

    def services(self, release: str) -> list[dict[str, Any]]:
        found = self._call("list Services", k8s.CoreV1Api(self.api).list_namespaced_service, self.namespace,
                           label_selector=release_selector(release))
        return self.api.sanitize_for_serialization(found)["items"]

    def pods(self, selector: str) -> list[dict[str, Any]]:
        found = self._call("list pods", k8s.CoreV1Api(self.api).list_namespaced_pod, self.namespace,
                           label_selector=selector)
        return self.api.sanitize_for_serialization(found)["items"]

    def ray_pods(self, release: str) -> list[dict[str, Any]]:
        return self.pods(release_selector(release, **{RAY_NODE: "yes"}))

    def rayservices(self) -> list[dict[str, Any]]:
        """Every RayService in the namespace (the release's is picked by its labels)."""
        try:
            found = self._call("list RayServices", k8s.CustomObjectsApi(self.api).list_namespaced_custom_object,
                               RAY_GROUP, RAY_VERSION, self.namespace, RAYSERVICES)
        except ClusterError as e:
            if e.status == 404:
                raise ClusterError(f"the cluster of context '{self.context}' has no RayService resource "
                                   f"({RAY_GROUP}/{RAY_VERSION}): is the KubeRay operator installed?") from e
            raise
        return found.get("items") or []

    def rayservice(self, release: str) -> dict[str, Any]:
        try:
            return rayservice(self.rayservices(), release, self.namespace)
        except LookupError as e:
            raise ClusterError(str(e)) from e

    # ---- port-forward ------------------------------------------------------------------------

    def pod_stream(self, pod: str, port: int) -> Callable[[], Stream]:
        """A function that opens one port-forward stream to `pod`:`port` (one per connection)."""
        core = k8s.CoreV1Api(self.api)

        def connect() -> Stream:
            try:
                forward = portforward(core.connect_get_namespaced_pod_portforward, pod, self.namespace,
                                      ports=str(port))
            except k8s.ApiException as e:
                reason = (e.reason or str(e)).split("-+-+-")[0].strip()
                raise ClusterError(f"cannot port-forward to pod '{pod}' port {port} in namespace "
                                   f"'{self.namespace}' (context '{self.context}'): {reason}; the user needs "
                                   "create on pods/portforward there", retryable=True) from e
            return forward.socket(port)

        return connect

    # ---- errors ----------------------------------------------------------------------------

    def _call(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, _request_timeout=REQUEST_TIMEOUT_S, **kwargs)
        except k8s.ApiException as e:
            raise api_error(e, what, self) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise ClusterError(f"cannot reach the Kubernetes API server {self.server} of context "
                               f"'{self.context}': {e}", retryable=True) from e


def api_error(e: k8s.ApiException, what: str, cluster: Cluster) -> ClusterError:
    """An API refusal as a ClusterError carrying the HTTP status, e.g. 403 -> "... forbidden ..."."""
    where = f"in namespace '{cluster.namespace}' (context '{cluster.context}')"
    if e.status == 401:
        return ClusterError(f"the Kubernetes API did not accept the credentials of context '{cluster.context}' "
                            f"(expired? log in again) when trying to {what}", status=401)
    if e.status == 403:
        return ClusterError(f"the Kubernetes API refused to let you {what} {where}: forbidden "
                            "(your user lacks that RBAC right)", status=403)
    return ClusterError(f"cannot {what} {where}: HTTP {e.status} {e.reason}",
                        retryable=not e.status or e.status >= 500, status=e.status)


def connect(context: str | None = None, namespace: str | None = None, kubeconfig: str | None = None) -> Cluster:
    """The cluster of `context` (default: the kubeconfig's current one), or of the pod this runs
    in when there is no kubeconfig at all. Raises ClusterError naming what is missing."""
    paths = kubeconfig_paths(kubeconfig)
    if not any(p.is_file() for p in paths) and kubeconfig is None and context is None:
        inside = _in_cluster(namespace)
        if inside is not None:
            return inside
    config = Kubeconfig.read(paths)
    name = config.choose(context)
    configuration = k8s.Configuration()
    try:
        kube_config.load_kube_config(config_file=config.files, context=name, client_configuration=configuration,
                                     persist_config=False)
    except (ConfigException, OSError, ValueError, TypeError, KeyError) as e:
        raise ClusterError(f"context '{name}' of kubeconfig {config.files} cannot be used: {e}") from e
    return Cluster(k8s.ApiClient(configuration), name, namespace or config.contexts[name].get("namespace") or "default")


def _in_cluster(namespace: str | None) -> Cluster | None:
    configuration = k8s.Configuration()
    try:
        incluster_config.load_incluster_config(client_configuration=configuration)
    except ConfigException:
        return None
    own = Path(incluster_config.SERVICE_TOKEN_FILENAME).with_name("namespace")
    fallback = own.read_text().strip() if own.is_file() else "default"
    return Cluster(k8s.ApiClient(configuration), IN_CLUSTER, namespace or fallback)


def close_gracefully(stream: Stream, timeout_s: float = 5.0) -> None:
    """End our side, read what the pod already sent until it ends too, then close: closing with
    unread bytes would reset the connection under the port-forward's own thread."""
    try:
        stream.shutdown(socket.SHUT_WR)
        stream.settimeout(timeout_s)
        while stream.recv(65536):
            pass
    except OSError:
        pass
    finally:
        stream.close()


@contextmanager
def forward_to_ops(cluster: Cluster, release: str) -> Iterator[str]:
    """A local address ("127.0.0.1:PORT") forwarded to the gRPC port of a ready pod behind the
    release's ops Service, for as long as the block runs."""
    cluster.check_namespace()
    try:
        service = ops_service(cluster.services(release), release, cluster.namespace)
    except LookupError as e:
        raise ClusterError(str(e)) from e
    selector = ",".join(f"{k}={v}" for k, v in (service["spec"].get("selector") or {}).items())
    try:
        pod, port = forward_target(service, cluster.pods(selector))
    except LookupError as e:
        raise ClusterError(str(e)) from e
    except RuntimeError as e:
        raise ClusterError(f"{e} (see `ccoe --namespace {cluster.namespace} --release {release} cluster status`)",
                           retryable=True) from e
    connect = cluster.pod_stream(pod, port)
    close_gracefully(connect())  # fail here, with the reason, rather than as a bare UNAVAILABLE later
    with TcpForwarder(connect) as forwarder:
        yield forwarder.address
