"""`ccoe audit`: the registry's last changes, oldest first (who pushed, retired, rolled out,
set rules, and the registry's own rollout steps).

    ccoe audit --limit 20
    time                       who          what      revision  detail
    2026-11-22T18:40:03+01:00  alice@box    push             7  expert=law uri=/var/ccoe/experts/law/v1 version=1
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ccoe_common.cli.registry_ops import add_registry_flags, connect, when
from ccoe_common.console import add_json_flag, format_table, positive_int, print_json

DETAIL_WIDTH = 100  # a table cell; --json has the whole detail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="the registry's audit log: every change, who made it, and when")
    p.add_argument("--limit", type=positive_int, default=50, metavar="N",
                   help="how many of the newest entries (default 50)")
    add_registry_flags(p)
    add_json_flag(p)
    p.set_defaults(handler=audit)


def _detail_cell(detail: dict[str, Any]) -> str:
    text = " ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in detail.items()) or "-"
    return text if len(text) <= DETAIL_WIDTH else text[:DETAIL_WIDTH - 1] + "…"


def audit(args: argparse.Namespace) -> int:
    with connect(args) as client:
        entries = list(reversed(client.audit(args.limit).entries))  # the registry answers newest first
    if args.json:
        print_json({"entries": [{"id": e.id, "at": e.at, "time": when(e.at), "who": e.who, "what": e.what,
                                 "revision": e.revision, "detail": json.loads(e.detail_json or "{}")}
                                for e in entries]})
        return 0
    if not entries:
        print("the audit log is empty")
        return 0
    rows = [(when(e.at), e.who, e.what, e.revision, _detail_cell(json.loads(e.detail_json or "{}")))
            for e in entries]
    print(format_table(("time", "who", "what", "revision", "detail"), rows))
    return 0
