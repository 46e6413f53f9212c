"""`ccoe demo`: the whole product on this machine.

Starts the local stack (local Ray, an embedded redis-server, the Ray Serve app behind its
gRPC proxy) on a tiny demo backbone with two experts, then over real gRPC: sends requests
from several domains and prints each route trace, streams one answer token by token, pushes
a third expert live and uses it, pops it and shows the clear error that follows, and shuts
everything down.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from ccoe_common.cli.common import print_json, stdout_to_stderr
from ccoe_common.cli.demo_assets import demo_backbone, demo_experts, demo_rules
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.pb import inference_pb2_grpc
from ccoe_common.registry.client import RegistryClient
from ccoe_common.registry.redis_server import free_port
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.local_stack import LocalStack
from ccoe_common.settings import load_settings

# (label, request) pairs; each shows a different route.
EXAMPLES: list[tuple[str, dict[str, Any]]] = [
    ("domain tag", dict(prompt="Compute 12 + 7 and", domain="math")),
    ("regex rule", dict(prompt="SELECT name FROM users WHERE age > 30")),
    ("keyword rule", dict(prompt="How many apples are left?")),
    ("no rule: default", dict(prompt="The patient presents with fever")),
    ("fan-out rule", dict(prompt="Total revenue per region", metadata={"app": "audit"})),
    ("explicit expert", dict(prompt="Compute 3 * 4", expert=pb.ExpertRef(name="sql"), routing=pb.EXPERT)),
]


def _trace(route: pb.RouteTrace) -> str:
    experts = ", ".join(f"{e.name}@{e.version}" for e in route.experts) or "backbone"
    rule = f" rule={route.rule_id}" if route.rule_id else ""
    return f"policy={route.policy}{rule} -> {experts} ({route.reason})"


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else load_settings().cache_dir / "demo"
    say = (lambda *a, **k: None) if args.json else print
    report: dict[str, Any] = {"requests": []}
    uris = demo_experts(workdir)
    config = AppConfig.load({
        "backbone": str(demo_backbone(workdir)),
        "experts": [uris["math"], uris["sql"]],
        "rules": str(demo_rules(workdir)),
        "replica": {"engine": {"max_seq_len": 256, "max_running": 8, "max_batched_tokens": 128}},
    })
    say("starting the local stack (Ray, redis-server, Ray Serve gRPC proxy) ...", flush=True)
    t0 = time.monotonic()
    with stdout_to_stderr(args.json), LocalStack(config, grpc_port=free_port()) as stack:
        say(f"up in {time.monotonic() - t0:.1f}s: gRPC {stack.address}, Redis {stack.redis_url}\n")
        report["grpc_address"] = stack.address
        channel = grpc.insecure_channel(stack.address)
        stub = inference_pb2_grpc.InferenceStub(channel)
        n = args.max_new_tokens

        for label, fields in EXAMPLES:
            r = stub.Generate(pb.GenerateRequest(max_tokens=n, **fields), timeout=120)
            say(f"[{label}] {fields['prompt']!r}\n    route: {_trace(r.route)}\n    answer: {r.text!r}")
            for f in r.fanout:
                say(f"    fan-out {f.expert.name}@{f.expert.version}: {f.text!r}")
            report["requests"].append({"label": label, "policy": r.route.policy, "rule_id": r.route.rule_id,
                                       "experts": [f"{e.name}@{e.version}" for e in r.route.experts],
                                       "text": r.text, "tokens": len(r.token_ids), "fanout": len(r.fanout)})

        say("\nstreaming (domain math), token by token:\n    ", end="", flush=True)
        pieces = []
        for msg in stub.GenerateStream(pb.GenerateRequest(prompt="Compute 12 + 7 and", domain="math",
                                                          max_tokens=n), timeout=120):
            pieces.append(msg.text)
            say(f"[{msg.text}]" if msg.text else "[…]", end="", flush=True)
        say(f"  ({len(pieces)} messages)")
        report["stream_messages"] = len(pieces)

        with RegistryClient(stack.address) as registry:
            pushed = registry.push(uris["law"], who="demo")
            key = f"{pushed.expert.name}@{pushed.expert.version}"
            done = registry.wait_rollout("law", pushed.rollout.id, timeout_s=120)
            r = stub.Generate(pb.GenerateRequest(prompt="The court held that", expert=pb.ExpertRef(name="law"),
                                                 routing=pb.EXPERT, max_tokens=n), timeout=120)
            say(f"\nlive push: {key} rolled out to {len(done.replicas)} replica(s) in "
                f"{done.finished_at - done.started_at:.2f}s -> request on law: {_trace(r.route)}\n"
                f"    answer: {r.text!r}")
            popped_msg = registry.pop("law", who="demo", wait_s=30)
            popped = [f"{e.name}@{e.version}" for e in popped_msg.retired]
            try:
                stub.Generate(pb.GenerateRequest(prompt="The court held that", expert=pb.ExpertRef(name="law"),
                                                 routing=pb.EXPERT, max_tokens=n), timeout=120)
                after_pop = "OK (unexpected)"
            except grpc.RpcError as e:
                after_pop = f"{e.code().name}: {e.details()}"
            say(f"live pop: {', '.join(popped)} (drained: {popped_msg.drained}) -> the next request on law "
                f"gets {after_pop}")
            report["push"] = {"pushed": key, "popped": popped, "after_pop": after_pop}
            audit = registry.audit(limit=20).entries
            say(f"audit trail: {', '.join(f'{e.what}' for e in reversed(audit))}")
            report["audit"] = [e.what for e in reversed(audit)]
        channel.close()
        say("\nshutting down ...", flush=True)
    say("done. The experts above are untrained stand-ins; for trained experts giving checkable answers: "
        "`ccoe demo build` (once, about 8 minutes) then `ccoe demo zoo`.")
    if args.json:
        print_json(report)
    ok = after_pop.startswith("NOT_FOUND") and all(r["tokens"] == n for r in report["requests"])
    if not ok:
        print("demo: something did not behave as expected (see above)", file=sys.stderr)
    return 0 if ok else 1
