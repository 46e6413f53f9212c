"""`ccoe expert carve|inspect`: make and check expert artifacts locally; and
`ccoe expert push|pop|list|show` (in expert_registry.py): expert versions in the registry.

    ccoe expert carve --backbone ./bb --name math --kind ffn --placement GL:4 --out ./experts/math
    ccoe expert inspect ./experts/math --backbone ./bb
    ccoe expert push ./experts/math --upload
"""

from __future__ import annotations

import argparse

from ccoe_common.cli import expert_registry
from ccoe_common.cli.loading import add_model_flags, model_from_args
from ccoe_common.console import add_json_flag, format_table, human_bytes, print_json
from ccoe_common.defaults import DEFAULT_BUDGET_FRACTION
from ccoe_common.experts.artifact import read_artifact
from ccoe_common.model.kinds import KINDS
from ccoe_common.model.placement import Placement


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("expert", help="make and check expert artifacts; push, pop, list them in the registry")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("carve", help="write a new (untrained) expert copied from the backbone")
    p.add_argument("--backbone", required=True, help="transformers checkpoint directory")
    p.add_argument("--name", required=True, help="expert name, e.g. math")
    p.add_argument("--kind", choices=sorted(KINDS), default="ffn", help="which modules it replaces (default ffn)")
    p.add_argument("--placement", default="GL",
                   help="GL|FB|FE|MD|BE[:layers] or a layer list like 0,5,11 "
                        "(default GL, as many layers as the budget allows)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_FRACTION,
                   help="max parameters as a fraction of the backbone (default %(default)s)")
    p.add_argument("--version", type=int, default=1, help="version number to write (default 1)")
    p.add_argument("--domain", action="append", default=[], help="domain this expert serves (repeatable)")
    p.add_argument("--out", required=True, help="artifact folder (local path or fsspec URI)")
    add_model_flags(p)
    add_json_flag(p)
    p.set_defaults(handler=carve)

    p = verbs.add_parser("inspect", help="check an artifact (and its fit to a backbone) and print its manifest")
    p.add_argument("uri", help="artifact folder (local path or fsspec URI)")
    p.add_argument("--backbone", help="also check fingerprint, shapes and budget against this checkpoint")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_FRACTION,
                   help="budget fraction to check against (default %(default)s)")
    add_model_flags(p)
    add_json_flag(p)
    p.set_defaults(handler=inspect)

    expert_registry.register_verbs(verbs)


def carve(args: argparse.Namespace) -> int:
    model = model_from_args(args, budget_fraction=args.budget)
    expert = model.carve(args.name, kind=args.kind, placement=Placement.parse(args.placement),
                         version=args.version, domains=args.domain)
    manifest = expert.to_artifact(args.out, model.info)
    if args.json:
        print_json({"uri": args.out, "manifest": manifest.model_dump(mode="json")})
    else:
        share = manifest.parameter_count / model.info.parameter_count
        print(f"wrote {manifest.name}@{manifest.version} to {args.out}: kind {manifest.kind}, "
              f"layers {manifest.layers}, {manifest.parameter_count:,} parameters ({share:.1%} of the backbone), "
              f"{human_bytes(expert.nbytes)}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    artifact = read_artifact(args.uri)
    m = artifact.manifest
    checked = "self-consistent"
    if args.backbone:
        model = model_from_args(args, budget_fraction=args.budget)
        model.load(artifact)
        checked = f"fits backbone {args.backbone}"
    if args.json:
        print_json({"uri": args.uri, "ok": True, "checked": checked, "manifest": m.model_dump(mode="json")})
        return 0
    rows = [("name", m.name), ("version", m.version), ("kind", m.kind), ("layers", m.layers), ("dtype", m.dtype),
            ("parameters", f"{m.parameter_count:,}"), ("sha256", m.weights_sha256[:16] + "…"),
            ("base model", f"{m.base_model.model_type}, {m.base_model.num_layers} layers, "
                           f"fingerprint {m.base_model.fingerprint[:12]}…"),
            ("domains", ", ".join(m.domains) or "-"), ("created", m.created_at.isoformat())]
    print(format_table(("field", "value"), rows))
    print(f"OK: {checked}")
    return 0
