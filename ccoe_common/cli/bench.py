"""`ccoe bench ...`: benchmark scripts that print ratios measured side by side in one run."""

from __future__ import annotations

import argparse

from ccoe_common.bench import fuzz, rollout, rules, serve
from ccoe_common.bench.__main__ import add_model_benchmarks


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark (ratios measured side by side in one run)")
    kinds = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    add_model_benchmarks(kinds)
    p = kinds.add_parser("serve", help="served gRPC stack vs the in-process engine: tokens/s, TTFT, ITL")
    serve.add_arguments(p)
    p.set_defaults(handler=serve.run)
    p = kinds.add_parser("rollout", help="push-to-live time of new expert versions under load, 2+ replicas")
    rollout.add_arguments(p)
    p.set_defaults(handler=rollout.run)
    p = kinds.add_parser("fuzz", help="random requests to every gRPC method of a local stack: status histogram")
    fuzz.add_arguments(p)
    p.set_defaults(handler=fuzz.run)
    p = kinds.add_parser("rules", help="one rule regex's matching time: RE2 vs Python's re on ^(a+)+$")
    rules.add_arguments(p)
    p.set_defaults(handler=rules.run)
