"""What goes wrong between the ops CLI and a cluster, each error naming the missing thing.

    ccoe cluster: error: no context 'prod' in kubeconfig /home/alice/.kube/config; it has: kind-dev, staging
"""

from __future__ import annotations

from ccoe_common.console import UserError


class ClusterError(UserError):
    """A cluster, namespace, release or Service that is not there or not reachable.

    `retryable` is True when waiting may help (the API server did not answer, no pod is ready
    yet): the command exits 1, like an UNAVAILABLE registry, instead of 2. `status` is the
    Kubernetes API's HTTP status when it answered, e.g. 404.
    """

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status
