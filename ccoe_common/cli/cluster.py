"""`ccoe cluster status`: a charts/ccoe release on Kubernetes, seen from a laptop.

    ccoe --kube-context prod --namespace serving --release demo cluster status
    RayService demo-ccoe (release demo, namespace serving, context prod): Running, ready
      Ray cluster: demo-ccoe-raycluster-7xk2p
      Serve application ccoe: RUNNING (ModelReplica HEALTHY, Registry HEALTHY, Router HEALTHY)
    ...

Exit 0 when the RayService is ready, its application RUNNING and the registry answered;
1 otherwise (something is starting, upgrading or broken: the output says which).
"""

from __future__ import annotations

import argparse

import grpc

from ccoe_common.cli.registry_ops import token
from ccoe_common.console import UserError, add_json_flag, print_json
from ccoe_common.registry.client import RegistryClient

REGISTRY_TIMEOUT_S = 15.0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("cluster", help="a Helm release of charts/ccoe on Kubernetes (needs --release)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("status", help="the RayService and its Serve application, the Ray pods, and the expert "
                                        "versions each model replica holds")
    p.add_argument("--token-file", metavar="PATH", default=None,
                   help="file holding a token with role admin, to list each replica's experts (default: $CCOE_TOKEN)")
    add_json_flag(p)
    p.set_defaults(handler=status, cluster_command=True)


def status(args: argparse.Namespace) -> int:
    from ccoe_common.kube.cluster import connect, forward_to_ops
    from ccoe_common.kube.errors import ClusterError
    from ccoe_common.kube.status import Target, cluster_status, format_status

    if not args.release:
        raise UserError("cluster status needs --release NAME (the Helm release), e.g. "
                        "`ccoe --namespace serving --release demo cluster status`")
    cluster = connect(args.kube_context, args.namespace, args.kubeconfig)
    cluster.check_namespace()
    rayservice = cluster.rayservice(args.release)
    pods = cluster.ray_pods(args.release)
    experts, registry_error = None, None
    try:
        with forward_to_ops(cluster, args.release) as address, \
                RegistryClient(address, token=token(args), timeout_s=REGISTRY_TIMEOUT_S) as client:
            experts = client.list()
    except ClusterError as e:
        if not e.retryable:
            raise
        registry_error = str(e)
    except grpc.RpcError as e:
        registry_error = f"{e.code().name}: {e.details()}"
    result = cluster_status(Target(cluster.context, cluster.namespace, args.release), rayservice, pods, experts,
                            registry_error)
    if args.json:
        print_json(result.to_dict())
    else:
        print(format_status(result))
    return 0 if result.healthy else 1
