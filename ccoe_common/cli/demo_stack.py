"""`ccoe demo`: the whole product on this machine, with experts that know their domains.

Builds the demo zoo once (a pre-trained backbone and one trained expert per synthetic domain,
cached: `ccoe_common.zoo.build`), starts the local stack on it (local Ray, an embedded
redis-server, the Ray Serve app behind its gRPC proxy) with all experts but the last, then over
real gRPC: asks held-out problems of every domain as an app would (no expert named, the rule
table routes) and checks each answer; pushes the last expert live through the registry with a
new rule table and asks its problems again; streams one answer token by token and asks the same
question through the OpenAI-compatible HTTP API; pops the expert and shows the clear error that
follows; prints the audit trail; shuts everything down.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import torch
import yaml

from ccoe_common.console import format_table, print_json, stdout_to_stderr
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.pb import inference_pb2_grpc
from ccoe_common.ports import free_port
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.local_stack import LocalStack
from ccoe_common.settings import load_settings
from ccoe_common.zoo.build import build_zoo, is_built
from ccoe_common.zoo.config import ZooConfig
from ccoe_common.zoo.domains import Problem, generic, get_domain
from ccoe_common.zoo.evaluate import accuracy, read_problems
from ccoe_common.zoo.reproduce import MAX_NEW_TOKENS
from ccoe_common.zoo.rules import read_rules
from ccoe_common.zoo.served import CLIENTS, ask, routes_to, routing_table


def _trace(route: pb.RouteTrace) -> str:
    experts = ", ".join(f"{e.name}@{e.version}" for e in route.experts) or "backbone"
    rule = f" rule={route.rule_id}" if route.rule_id else ""
    return f"policy={route.policy}{rule} -> {experts}"


def _ask_http(base_url: str, token: str | None, instruction: str) -> dict[str, Any]:
    """The question as an OpenAI client would send it (what `curl` does): model "auto", so the
    rules route it; the `template` extension wraps it as the Alpaca instruction the experts learned."""
    import urllib.request  # only here: the demo's one HTTP call

    body = {"model": "auto", "prompt": instruction, "template": "alpaca", "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0}
    request = urllib.request.Request(f"{base_url}/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json",
                                              **({"authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _row(stub: inference_pb2_grpc.InferenceStub, stage: str, domain: str, question: str, expected: str,
         check: Callable[[str], bool]) -> dict:
    """Ask one question as an app would and record the answer, its route and whether it is right."""
    r = ask(stub, question, MAX_NEW_TOKENS)
    return {"stage": stage, "domain": domain, "question": question, "answer": r.text, "expected": expected,
            "correct": check(r.text), "experts": [f"{e.name}@{e.version}" for e in r.route.experts],
            "rule_id": r.route.rule_id}


def _ask_all(stub: inference_pb2_grpc.InferenceStub, problems: dict[str, list[Problem]], stage: str) -> list[dict]:
    return [_row(stub, stage, domain, p.instruction, p.output, _checker(domain, p))
            for domain, items in problems.items() for p in items]


def _checker(domain: str, problem: Problem) -> Callable[[str], bool]:
    return lambda text: get_domain(domain).check(problem, text)


def _cell(text: str, width: int = 60) -> str:
    """One table cell: an answer may hold newlines (a wrong one often does) and run long."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def _accuracy_over(stub: inference_pb2_grpc.InferenceStub, tests: dict[str, list[Problem]]) -> dict[str, float]:
    """Share of every held-out problem answered right through the stack, per domain."""
    def answer(p: Problem) -> str:
        return ask(stub, p.instruction, MAX_NEW_TOKENS).text

    with ThreadPoolExecutor(CLIENTS) as pool:
        return {d: accuracy(get_domain(d), ps, list(pool.map(answer, ps))) for d, ps in tests.items()}


def _table(rows: list[dict]) -> str:
    return format_table(("domain", "question", "routed to", "answer", "correct"),
                        [(r["domain"], r["question"], ", ".join(r["experts"]) or "backbone", _cell(r["answer"]),
                          "yes" if r["correct"] else f"no (expected {r['expected']})") for r in rows])


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    zoo_config = ZooConfig.quick() if args.quick else ZooConfig()
    workdir = Path(args.workdir) if args.workdir else settings.cache_dir / ("zoo-quick" if args.quick else "zoo")
    say = (lambda *a, **k: None) if args.json else print
    torch.set_num_threads(args.threads)  # see `ccoe demo build --help`: one thread is faster on a busy machine
    if not is_built(workdir, zoo_config):
        print(f"building the demo zoo in {workdir} (once; {'under a minute' if args.quick else 'about 9 minutes'} "
              "on 2 cores, cached afterwards) ...", file=sys.stderr, flush=True)
    zoo = build_zoo(workdir, zoo_config, quiet=args.json)
    uris = {d: e["uri"] for d, e in zoo["experts"].items()}
    *first, live = list(uris)
    full_table = routing_table(read_rules(Path(zoo["rules"])))
    first_table = {**full_table, "rules": [r for r in full_table["rules"] if r["experts"][0] in first]}
    rules_file = workdir / "demo-rules.yaml"
    rules_file.write_text(yaml.safe_dump(first_table))
    (workdir / "rules.yaml").write_text(yaml.safe_dump(full_table))  # examples/demo-app.yaml serves with it
    tests = {d: read_problems(zoo["data"][d]["test"], d) for d in uris}
    problems = {d: ps[:args.per_domain] for d, ps in tests.items()}
    config = AppConfig.load({
        "backbone": zoo["backbone"]["path"], "experts": [uris[d] for d in first], "rules": str(rules_file),
        "replica": {"engine": {"max_seq_len": 512, "max_running": 8, "max_batched_tokens": 256}},
        "auth": {"mode": "token"},
        "registry": {"allowed_sources": [str(workdir)]},  # the live push comes from the zoo
    })
    report: dict[str, Any] = {"zoo": str(workdir), "quick": args.quick}
    say(f"starting the local stack (Ray, redis-server, Ray Serve gRPC proxy) with experts {', '.join(first)} ...",
        flush=True)
    t0 = time.monotonic()
    with stdout_to_stderr(args.json), LocalStack(config, grpc_port=free_port(), http_port=free_port()) as stack:
        say(f"up in {time.monotonic() - t0:.1f}s: gRPC {stack.address}, OpenAI HTTP {stack.http_base_url}, "
            f"Redis {stack.redis_url}")
        say(f"auth on: this run minted an admin token and an inference token (only their hashes are on disk);\n"
            f"  try: CCOE_TOKEN={stack.admin_token} ccoe expert list --registry {stack.address}\n")
        report["grpc_address"] = stack.address
        report["http_base_url"] = stack.http_base_url
        channel = stack.inference_channel()
        stub = inference_pb2_grpc.InferenceStub(channel)

        say(f"held-out problems, sent as an app would (Alpaca template, no expert named); {live} has no expert yet:")
        rows = _ask_all(stub, problems, "before push")
        question, expected = generic.instruction(random.Random(7))
        rows.append(_row(stub, "before push", "generic", question, expected, lambda text: text.strip() == expected))
        say(_table(rows))

        with stack.registry_client() as registry:
            pushed = registry.push(uris[live], who="demo")
            key = f"{pushed.expert.name}@{pushed.expert.version}"
            done = registry.wait_rollout(live, pushed.rollout.id, timeout_s=120)
            registry.set_rules(yaml.safe_dump({**full_table, "version": 2}), who="demo")
            routed = routes_to(stub, problems[live][0].instruction, live)
            say(f"\nlive push: {key} rolled out to {len(done.replicas)} replica(s) in "
                f"{done.finished_at - done.started_at:.2f}s, rule table v2 routes {live} to it; the same problems:")
            after = _ask_all(stub, {live: problems[live]}, "after push")
            say(_table(after))
            rows += after
            t = time.monotonic()
            report["held_out_accuracy"] = _accuracy_over(stub, tests)
            say(f"\nall {sum(map(len, tests.values()))} held-out problems through the stack, {CLIENTS} clients at once "
                f"({time.monotonic() - t:.0f}s): "
                + ", ".join(f"{d} {a:.1%} right" for d, a in report["held_out_accuracy"].items())
                + "\n(`ccoe demo reproduce` sets these beside the bare backbone and full fine-tunes)")

            say(f"\nstreaming ({problems[first[0]][0].instruction!r}), token by token:\n    ", end="", flush=True)
            pieces = []
            for msg in stub.GenerateStream(pb.GenerateRequest(prompt=problems[first[0]][0].instruction,
                                                              template=pb.ALPACA, max_tokens=MAX_NEW_TOKENS),
                                           timeout=120):
                pieces.append(msg)
                say(f"[{msg.text}]" if msg.text else "[…]", end="", flush=True)
            say(f"  ({len(pieces)} messages, {_trace(pieces[0].route)})")
            report["stream_messages"] = len(pieces)

            question = problems[first[0]][0].instruction
            say(f"\nthe same question through the OpenAI-compatible HTTP API ({stack.http_base_url}):\n"
                f"    curl {stack.http_base_url}/completions -H 'authorization: Bearer $TOKEN' "
                f"-H 'content-type: application/json' \\\n"
                f"      -d '{{\"model\": \"auto\", \"prompt\": {json.dumps(question)}, \"template\": \"alpaca\", "
                f"\"max_tokens\": {MAX_NEW_TOKENS}, \"temperature\": 0}}'")
            http = _ask_http(stack.http_base_url, stack.inference_token, question)
            same = http["choices"][0]["text"] == "".join(m.text for m in pieces)
            say(f"    -> model {http['model']!r}: {http['choices'][0]['text']!r} "
                f"({'the same answer as over gRPC' if same else 'DIFFERS from the gRPC answer'}; "
                f"route policy={http['ccoe']['route']['policy']})")
            report["http"] = {"base_url": stack.http_base_url, "model": http["model"],
                              "text": http["choices"][0]["text"], "same_as_grpc": same}

            popped_msg = registry.pop(live, who="demo", wait_s=30)
            popped = [f"{e.name}@{e.version}" for e in popped_msg.retired]
            try:
                ask(stub, problems[live][0].instruction, MAX_NEW_TOKENS)
                after_pop = "OK (unexpected)"
            except grpc.RpcError as e:
                after_pop = f"{e.code().name}: {e.details()}"
            say(f"\nlive pop: {', '.join(popped)} (drained: {popped_msg.drained}) -> the next {live} problem gets "
                f"{after_pop}")
            report["push"] = {"pushed": key, "routed_after_push": routed, "popped": popped, "after_pop": after_pop}
            audit = registry.audit(limit=20).entries
            say(f"audit trail: {', '.join(f'{e.what}' for e in reversed(audit))}")
            report["audit"] = [e.what for e in reversed(audit)]
        channel.close()
        say("\nshutting down ...", flush=True)

    report["answers"] = rows
    accuracy = {}
    for stage in ("before push", "after push"):
        for d in dict.fromkeys(r["domain"] for r in rows if r["stage"] == stage):  # first-seen order
            mine = [r for r in rows if r["stage"] == stage and r["domain"] == d]
            accuracy[f"{d} ({stage})"] = sum(r["correct"] for r in mine) / len(mine)
    report["accuracy"] = accuracy
    say("correct among the problems shown: " + ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items()))
    if args.quick:
        say("(--quick: a toy zoo trained for seconds, so most answers are wrong; run `ccoe demo` for the real one)")
    if args.json:
        print_json(report)
    by_rule = all(r["experts"] == [f"{r['domain']}@1"] for r in rows
                  if r["domain"] in first or r["stage"] == "after push")
    ok = by_rule and routed and after_pop.startswith("NOT_FOUND")
    if not ok:
        print("demo: something did not behave as expected (see above)", file=sys.stderr)
    return 0 if ok else 1
