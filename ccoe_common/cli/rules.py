"""`ccoe rules test`: which rule fires for a query, and why.

    ccoe rules test "SELECT sum(x) FROM t" --rules rules.yaml --tenant finance
    rule sql-finance -> experts sql, math (fan-out): tenant 'finance' in ['finance']; regex '\\bSELECT\\b'
"""

from __future__ import annotations

import argparse

from ccoe_common.cli.common import UserError, add_json_flag, print_json
from ccoe_common.routing.resolve import RouteQuery, decide
from ccoe_common.routing.rules import RuleTable
from ccoe_common.serving.config import AppConfig


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("rules", help="check and try rule tables")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("test", help="show which rule fires for a query and why")
    p.add_argument("query", help="the request text")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--rules", help="rule table file (YAML/JSON)")
    src.add_argument("--config", help="app config whose rule table to use")
    p.add_argument("--experts", help="comma-separated expert names the table may use (checked when given)")
    p.add_argument("--domain", default="", help="the request's domain tag")
    p.add_argument("--tenant", help="request metadata 'tenant'")
    p.add_argument("--app", help="request metadata 'app'")
    p.add_argument("--expert", help="an explicit expert, as a request would name it")
    p.add_argument("--mode", choices=["AUTO", "RULES", "EXPERT"], default="AUTO", help="routing mode (default AUTO)")
    add_json_flag(p)
    p.set_defaults(handler=test)


def _table(args: argparse.Namespace) -> RuleTable:
    known = set(args.experts.split(",")) if args.experts else None
    if args.rules:
        return RuleTable.from_file(args.rules, known)
    config = AppConfig.load(args.config)
    if config.rules_inline is not None:
        return RuleTable.from_dict(config.rules_inline, known)
    if config.rules is None:
        raise UserError(f"config {args.config} has no rule table (rules or rules_inline)")
    return RuleTable.from_file(config.rules, known)


def test(args: argparse.Namespace) -> int:
    table = _table(args)
    metadata = {k: v for k, v in (("tenant", args.tenant), ("app", args.app)) if v}
    route = decide(RouteQuery(args.query, mode=args.mode, expert=args.expert, domain=args.domain,
                              metadata=metadata), table)
    experts = [n for n, _ in route.experts]
    if args.json:
        print_json({"policy": route.policy, "rule_id": route.rule_id, "reason": route.reason, "experts": experts,
                    "table_version": table.version})
        return 0
    target = ", ".join(experts) or "the bare backbone"
    fan = " (fan-out)" if route.fans_out else ""
    head = f"rule {route.rule_id}" if route.rule_id else route.policy
    print(f"{head} -> {target}{fan}: {route.reason}")
    return 0
