"""`ccoe serve --config app.yaml`: the local stack (local Ray, embedded Redis, the gRPC API and
the OpenAI-compatible HTTP API on loopback).

Runs until interrupted (Ctrl-C / SIGTERM), then shuts everything down.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

from ccoe_common.console import add_json_flag, print_json
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.local_stack import LocalStack


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the local stack: Ray Serve gRPC + OpenAI HTTP app, embedded Redis")
    p.add_argument("--config", required=True, help="app config (YAML), see docs/services.md")
    p.add_argument("--port", type=int, help="gRPC port (default: the config's grpc_port)")
    p.add_argument("--http-port", type=int, help="HTTP port of the OpenAI-compatible API (default: the config's "
                                                   "http_port)")
    add_json_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = AppConfig.load(args.config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalStack(config, grpc_port=args.port, http_port=args.http_port) as stack:
        info = {"grpc_address": stack.address, "http_base_url": stack.http_base_url, "redis_url": stack.redis_url,
                "metrics_url": stack.metrics_url,
                "experts": list(config.experts), "replicas": config.replica.num_replicas,
                "auth": config.auth.mode if config.auth else None,
                "admin_token": stack.admin_token, "inference_token": stack.inference_token}
        if args.json:
            print_json(info)
            # From here on only Ray writes; keep it off the JSON stream.
            os.dup2(2, 1)
        else:
            print(f"CCoE Serve is up: gRPC at {stack.address} "
                  "(ccoe.v1.Inference, ccoe.v1.Registry, grpc.health.v1.Health, reflection)")
            print(f"OpenAI-compatible HTTP API at {stack.http_base_url} "
                  "(/chat/completions, /completions, /models; model = auto | backbone | EXPERT[@VERSION])")
            print(f"metrics (Prometheus): {stack.metrics_url}")
            if stack.admin_token:
                print("auth on; tokens minted for this run (they stop working when it stops):")
                print(f"  admin (registry):   export CCOE_TOKEN={stack.admin_token}")
                print(f"  inference (apps):   authorization: Bearer {stack.inference_token}")
                print(f"  e.g. curl {stack.http_base_url}/models -H 'authorization: Bearer {stack.inference_token}'")
                print(f"  e.g. CCOE_TOKEN={stack.admin_token} ccoe expert list --registry {stack.address}")
            else:
                print("auth is OFF (auth.mode none): anyone who reaches the port may change the fleet")
            print(f"registry Redis: {stack.redis_url}; replicas: {config.replica.num_replicas}; Ctrl-C stops")
        stop.wait()
    if not args.json:
        print("stopped")
    return 0
