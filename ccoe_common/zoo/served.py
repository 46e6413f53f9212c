"""The reproduction's "served" column: the zoo's experts pushed through the registry onto the
local stack (real Ray Serve, gRPC and Redis), its rule table set in the registry, and every
test problem sent over gRPC as an app would send it (Alpaca template, no expert named), so
the rules pick the expert.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import yaml

from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.pb import inference_pb2_grpc
from ccoe_common.ports import free_port
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.local_stack import LocalStack
from ccoe_common.zoo.rules import RuleTable as ZooRules

CLIENTS = 8


def routing_table(rules: ZooRules) -> dict[str, Any]:
    """The zoo's rules.json in the router's rule-table format (same order, same keywords)."""
    table: dict[str, Any] = {"version": 1, "rules": [
        {"id": r.id, "match": {"keywords": list(r.keywords)}, "experts": [r.expert]} for r in rules.rules]}
    if rules.fallback:
        table["default"] = {"expert": rules.fallback}
    return table


@contextmanager
def zoo_stack(backbone: str, expert_uris: dict[str, str], rules: ZooRules, *, who: str,
              say: Callable[[str], None] = lambda _: None) -> Iterator[inference_pb2_grpc.InferenceStub]:
    """The local stack on the zoo's backbone, every expert pushed through the registry and
    live, the rule table set there; yields an Inference stub."""
    # the zoo's own folder is a source the registry may read; nothing else is
    sources = [os.path.commonpath(list(expert_uris.values()))] if expert_uris else []
    config = AppConfig.load({"backbone": backbone, "auth": {"mode": "token"},
                             "registry": {"allowed_sources": sources},
                             "replica": {"engine": {"max_running": 16, "max_waiting": 256, "max_seq_len": 512}}})
    with LocalStack(config, grpc_port=free_port(), http_port=free_port()) as stack, stack.registry_client() as registry:
        for name, uri in expert_uris.items():
            pushed = registry.push(uri, who=who)
            done = registry.wait_rollout(name, pushed.rollout.id, timeout_s=300)
            say(f"  pushed {name}@{pushed.expert.version}: live in {done.finished_at - done.started_at:.2f}s")
        registry.set_rules(yaml.safe_dump(routing_table(rules)), who=who)
        channel = stack.inference_channel()
        try:
            stub = inference_pb2_grpc.InferenceStub(channel)
            _wait_for_rules(stub, rules)
            yield stub
        finally:
            channel.close()


def ask(stub: inference_pb2_grpc.InferenceStub, instruction: str, max_new_tokens: int) -> pb.GenerateResponse:
    """As an app would: the instruction in the Alpaca template, no expert named (rules route)."""
    return stub.Generate(pb.GenerateRequest(prompt=instruction, template=pb.ALPACA, max_tokens=max_new_tokens),
                         timeout=600)


def served_answers(backbone: str, expert_uris: dict[str, str], rules: ZooRules,
                   instructions: dict[str, list[str]], max_new_tokens: int,
                   say: Callable[[str], None] = lambda _: None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per domain: the answers through the stack, and which expert the router picked for each."""
    with zoo_stack(backbone, expert_uris, rules, who="demo reproduce", say=say) as stub:

        def one(instruction: str) -> tuple[str, str]:
            r = ask(stub, instruction, max_new_tokens)
            return r.text, (r.route.experts[0].name if r.route.experts else "")

        answers: dict[str, list[str]] = {}
        routed: dict[str, list[str]] = {}
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            for domain, items in instructions.items():
                results = list(pool.map(one, items))
                answers[domain] = [text for text, _ in results]
                routed[domain] = [expert for _, expert in results]
                say(f"  {domain}: {len(items)} requests over gRPC ({time.monotonic() - started:.0f}s)")
    return answers, routed


def routes_to(stub: inference_pb2_grpc.InferenceStub, instruction: str, expert: str, timeout_s: float = 30.0) -> bool:
    """Routers apply a new rule table within moments: wait until `instruction`, asked as an app
    would, routes to `expert`; False if it still does not after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = stub.Generate(pb.GenerateRequest(prompt=instruction, template=pb.ALPACA, max_tokens=1), timeout=60)
        if [e.name for e in r.route.experts] == [expert]:
            return True
        time.sleep(0.1)
    return False


def _wait_for_rules(stub, rules: ZooRules, timeout_s: float = 30.0) -> None:
    rule = rules.rules[0]
    if not routes_to(stub, rule.keywords[0], rule.expert, timeout_s):
        raise TimeoutError(f"the router did not apply the rule table within {timeout_s}s")
