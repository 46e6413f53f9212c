"""`ccoe rules test`: which rule fires for a query, and why; `ccoe rules get|set`: the rule
table the registry hands to every router.

    ccoe rules test "SELECT sum(x) FROM t" --rules rules.yaml --tenant finance
    rule sql-finance -> experts sql, math (fan-out): tenant 'finance' in ['finance']; regex '\\bSELECT\\b'
    ccoe rules get > rules.yaml && $EDITOR rules.yaml && ccoe rules set rules.yaml --expected-revision 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from ccoe_common.cli.registry_ops import add_registry_flags, connect, who
from ccoe_common.console import UserError, add_json_flag, print_json
from ccoe_common.routing.resolve import RouteQuery, decide
from ccoe_common.routing.rules import Match, Rule, RuleTable, RuleTableSpec
from ccoe_common.serving.config import AppConfig


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("rules", help="check and try rule tables; get and set the registry's")
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

    p = verbs.add_parser("get", help="the registry's rule table (YAML, its revision in a comment on top)")
    add_registry_flags(p)
    add_json_flag(p)
    p.set_defaults(handler=get)

    p = verbs.add_parser("set", help="replace the registry's rule table (every router follows it)")
    p.add_argument("file", help="rule table file (YAML/JSON); checked by the registry against its experts")
    p.add_argument("--expected-revision", type=int, default=None, metavar="N",
                   help="the rules revision you read (`ccoe rules get`); refused (ABORTED) if it changed since")
    add_registry_flags(p, who=True)
    add_json_flag(p)
    p.set_defaults(handler=set_rules)


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


def _table_json(text: str) -> dict | None:
    return json.loads(text) if text else None


def _ordered(d: dict, fields: list[str]) -> dict:
    rank = {name: i for i, name in enumerate(fields)}
    return {k: d[k] for k in sorted(d, key=lambda k: (rank.get(k, len(fields)), k))}


def _spec_order(table: dict) -> dict:
    """The registry answers with sorted keys; people read (and edit) a table in the order its
    schema declares: version, default, rules; each rule's id first. List order is kept."""
    out = _ordered(table, list(RuleTableSpec.model_fields))
    rules = []
    for rule in out.get("rules") or []:
        if isinstance(rule, dict):
            rule = _ordered(rule, list(Rule.model_fields))
            if isinstance(rule.get("match"), dict):
                rule["match"] = _ordered(rule["match"], list(Match.model_fields))
        rules.append(rule)
    if "rules" in out:
        out["rules"] = rules
    return out


def get(args: argparse.Namespace) -> int:
    with connect(args) as client:
        rules = client.get_rules()
    table = _table_json(rules.table_json)
    if args.json:
        print_json({"revision": rules.revision, "table": table})
        return 0
    if table is None:
        print("# the registry holds no rule table (revision 0): routers use the one in their app config")
        return 0
    # The revision as a YAML comment, so the output can be edited and sent back with `rules set`.
    print(f"# rules revision {rules.revision}")
    print(yaml.safe_dump(_spec_order(table), sort_keys=False, allow_unicode=True, default_flow_style=None), end="")
    return 0


def set_rules(args: argparse.Namespace) -> int:
    text = Path(args.file).read_text()
    with connect(args) as client:
        rules = client.set_rules(text, who=who(args), expected_revision=args.expected_revision)
    table = _table_json(rules.table_json) or {}
    if args.json:
        print_json({"revision": rules.revision, "table": table})
        return 0
    count = len(table.get("rules") or [])
    print(f"rules revision {rules.revision}: {count} rule{'' if count == 1 else 's'} from {args.file}")
    return 0
