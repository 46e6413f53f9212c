"""`ccoe rollout status|start|rollback`: an expert's rollout in the registry.

    ccoe rollout status law --watch          # follow it until done or rolled back
    ccoe rollout start law 1 --strategy canary --canary-wait 30
    ccoe rollout rollback law --reason "answers got worse"
"""

from __future__ import annotations

import argparse

from ccoe_common.cli.registry_ops import (
    add_policy_flags,
    add_registry_flags,
    add_wait_flags,
    connect,
    policy_from_args,
    print_rollout,
    rollout_dict,
    rollout_headline,
    wait_for_rollout,
    who,
)
from ccoe_common.console import add_json_flag, print_json
from ccoe_common.pb import registry_pb2 as pb
from ccoe_common.registry.rollout import ACTIVE


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("rollout", help="follow, start or roll back an expert's rollout in the registry")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("status", help="the expert's rollout in progress, or its last one, replica by replica")
    p.add_argument("expert", help="expert name, e.g. law")
    p.add_argument("--watch", action="store_true",
                   help="follow it until it finishes; exit 1 if it is rolled back")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="with --watch: stop following after S seconds (default 600)")
    add_registry_flags(p)
    add_json_flag(p)
    p.set_defaults(handler=status)

    p = verbs.add_parser("start", help="roll out a registered version (e.g. an older one to go back to)")
    p.add_argument("expert", help="expert name, e.g. law")
    p.add_argument("version", type=int, help="a registered, not retired version, e.g. 1")
    add_policy_flags(p)
    add_wait_flags(p)
    add_registry_flags(p, who=True)
    add_json_flag(p)
    p.set_defaults(handler=start)

    p = verbs.add_parser("rollback", help="abort the rollout in progress, or roll the last finished one back")
    p.add_argument("expert", help="expert name, e.g. law")
    p.add_argument("--reason", default="", help="recorded in the rollout and the audit log")
    add_registry_flags(p, who=True)
    add_json_flag(p)
    p.set_defaults(handler=rollback)


def _report(args: argparse.Namespace, r: pb.Rollout, code: int) -> int:
    if args.json:
        print_json(rollout_dict(r))
    else:
        print_rollout(r)
    return code


def status(args: argparse.Namespace) -> int:
    with connect(args) as client:
        r = client.rollout(args.expert)
        code = 0
        if args.watch:
            r, code = wait_for_rollout(client, r, args.timeout)
    return _report(args, r, code)


def start(args: argparse.Namespace) -> int:
    with connect(args) as client:
        r = client.start_rollout(args.expert, args.version, who=who(args), rollout=policy_from_args(args))
        code = 0
        if not args.no_wait:
            r, code = wait_for_rollout(client, r, args.timeout)
    return _report(args, r, code)


def rollback(args: argparse.Namespace) -> int:
    with connect(args) as client:
        r = client.rollback(args.expert, who=who(args), reason=args.reason)
    if args.json:
        print_json(rollout_dict(r))
    elif r.state in ACTIVE:
        # A finished rollout is undone by a new one back to the version it replaced.
        print(f"rolling {r.expert} back to v{r.to_version}: {rollout_headline(r)}\n"
              f"follow it: `ccoe rollout status {r.expert} --watch`")
    else:
        print(f"aborted: {rollout_headline(r)}")
    return 0
