#!/usr/bin/env python3
"""Health check of a CCoE Serve container: asks the standard gRPC health service
(grpc.health.v1.Health/Check) on the container's Serve gRPC port, exits 0 when it answers
SERVING and 1 otherwise, with the reason on stderr.

    ccoe-healthcheck --port 9000          # the image's HEALTHCHECK

On Kubernetes the chart's pods are checked by KubeRay's own probes; this is for `docker run`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ccoe-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="where the gRPC proxy listens (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="its port (default 9000)")
    parser.add_argument("--service", default="", help="service name to ask about (default: the server as a whole)")
    parser.add_argument("--timeout", type=float, default=3.0, metavar="S", help="seconds to wait (default 3)")
    args = parser.parse_args(argv)
    address = f"{args.host}:{args.port}"
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"unhealthy: {address}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {address} answers {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
