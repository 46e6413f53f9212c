"""`ccoe expert push|pop|list|show`: expert versions in the fleet's registry.

    ccoe expert push ./exports/law --upload              # upload, roll out, wait until live
    ccoe expert push s3://ccoe/exports/math/v2 --strategy canary --canary-wait 60
    ccoe expert list
    ccoe expert show law --json
    ccoe expert pop law@1 --export-to s3://ccoe/archive/law/v1 --wait 30
"""

from __future__ import annotations

import argparse
import sys
import time

from ccoe_common.cli.registry_ops import (
    UploadBar,
    add_policy_flags,
    add_registry_flags,
    add_wait_flags,
    connect,
    expert_dict,
    local_or_uri,
    manifest_summary,
    policy_from_args,
    print_rollout,
    replica_summary,
    rollout_dict,
    rollout_headline,
    wait_for_rollout,
    who,
)
from ccoe_common.console import add_json_flag, format_table, human_bytes, print_json
from ccoe_common.experts.artifact import read_manifest
from ccoe_common.experts.reference import ExpertKey
from ccoe_common.pb import registry_pb2 as pb


def register_verbs(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("push", help="register a new expert version in the registry and roll it out")
    p.add_argument("uri", metavar="URI_OR_DIR",
                   help="artifact folder: a URI the registry can read, or (with --upload) a folder here")
    p.add_argument("--upload", action="store_true",
                   help="stream the folder to the registry's artifact store first (for a folder only this "
                        "machine sees)")
    p.add_argument("--register-only", action="store_true", help="register the version without rolling it out")
    p.add_argument("--expected-revision", type=int, default=None, metavar="N",
                   help="the expert's revision you read; refused (ABORTED) if it changed since")
    add_policy_flags(p)
    add_wait_flags(p)
    add_registry_flags(p, who=True)
    add_json_flag(p)
    p.set_defaults(handler=push)

    p = verbs.add_parser("pop", help="retire one version (NAME@VERSION) or every version (NAME) of an expert")
    p.add_argument("ref", metavar="NAME[@VERSION]", help="e.g. law@1, or law for every version")
    p.add_argument("--export-to", metavar="URI", default="",
                   help="copy the newest retired version here first (written by the registry)")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds until no replica holds it; exit 1 if one still does")
    add_registry_flags(p, who=True)
    add_json_flag(p)
    p.set_defaults(handler=pop)

    p = verbs.add_parser("list", help="every registered expert: serving version, versions, rollout, replicas")
    add_registry_flags(p)
    add_json_flag(p)
    p.set_defaults(handler=list_experts)

    p = verbs.add_parser("show", help="one expert's versions (state, URI, replicas, manifest) and rollout")
    p.add_argument("name", help="expert name, e.g. law")
    add_registry_flags(p)
    add_json_flag(p)
    p.set_defaults(handler=show)


def push(args: argparse.Namespace) -> int:
    rollout_policy = policy_from_args(args)
    with connect(args) as client:
        uploaded = None
        uri = args.uri
        if args.upload:
            manifest = read_manifest(args.uri)  # names the expert on the bar, and fails early here
            bar = UploadBar(str(manifest.key))
            try:
                uploaded = client.upload(args.uri, progress=bar.update)
            finally:
                bar.finish()
            uri = uploaded.uri
        elif "://" not in uri:
            uri = local_or_uri(uri)
        started = time.monotonic()
        pushed = client.push(uri, who=who(args), rollout=rollout_policy, expected_revision=args.expected_revision,
                             register_only=args.register_only)
        ref = f"{pushed.expert.name}@{pushed.expert.version}"
        r, code = pushed.rollout, 0
        if not args.register_only and not args.no_wait:
            print(f"pushed {ref} (expert revision {pushed.revision}); rolling out, rollout {r.id}", file=sys.stderr)
            r, code = wait_for_rollout(client, r, args.timeout)
        live_s = round(time.monotonic() - started, 3) if r.state == "done" else None

    if args.json:
        print_json({"expert": pushed.expert.name, "version": pushed.expert.version, "revision": pushed.revision,
                    "stored_uri": pushed.stored_uri,
                    "uploaded": None if uploaded is None else {"uri": uploaded.uri, "bytes": uploaded.bytes,
                                                               "weights_sha256": uploaded.weights_sha256},
                    "rollout": rollout_dict(r), "seconds_to_live": live_s})
        return code
    if uploaded is not None:
        print(f"uploaded {human_bytes(uploaded.bytes)} to {uploaded.uri}")
    if args.register_only:
        print(f"registered {ref} (expert revision {pushed.revision}) at {pushed.stored_uri}; not rolled out: "
              f"`ccoe rollout start {pushed.expert.name} {pushed.expert.version}`")
    elif args.no_wait:
        print(f"pushed {ref} (expert revision {pushed.revision}); {rollout_headline(r)}\n"
              f"follow it: `ccoe rollout status {pushed.expert.name} --watch`")
    elif r.state == "done":
        print(f"{ref} is live {live_s:.1f} s after the push: rollout {r.id}, {replica_summary(r)}")
    else:
        print_rollout(r)
        if r.state == "rolled_back":
            print(f"{ref} was rolled back: {r.reason}", file=sys.stderr)
    return code


def pop(args: argparse.Namespace) -> int:
    name, version = ExpertKey.parse(args.ref)
    export_to = local_or_uri(args.export_to) if args.export_to else ""
    with connect(args) as client:
        popped = client.pop(name, version or 0, who=who(args), export_to=export_to, wait_s=args.wait)
    retired = [f"{e.name}@{e.version}" for e in popped.retired]
    still_held = args.wait > 0 and not popped.drained
    if args.json:
        print_json({"retired": retired, "revision": popped.revision, "exported_to": popped.exported_to or None,
                    "drained": popped.drained if args.wait > 0 else None})
        return 1 if still_held else 0
    print(f"retired {', '.join(retired)} (expert revision {popped.revision})")
    if popped.exported_to:
        print(f"exported to {popped.exported_to}")
    if args.wait > 0:
        print("no replica holds it any more" if popped.drained else
              f"a replica still holds it after {args.wait:g} s (it drains running requests first); "
              f"check `ccoe expert show {name}`", file=sys.stdout if popped.drained else sys.stderr)
    return 1 if still_held else 0


def _versions_cell(e: pb.ExpertInfo) -> str:
    return " ".join(f"v{v.version}:{v.state}" for v in e.versions) or "-"


def _replicas_holding(e: pb.ExpertInfo) -> int:
    return len({rid for v in e.versions for rid in v.loaded_on})


def list_experts(args: argparse.Namespace) -> int:
    with connect(args) as client:
        listed = client.list()
    experts = sorted(listed.experts, key=lambda e: e.name)
    if args.json:
        print_json({"revision": listed.revision, "experts": [expert_dict(e) for e in experts]})
        return 0
    if not experts:
        print(f"no expert registered (registry revision {listed.revision}); add one with `ccoe expert push`")
        return 0
    rows = [(e.name, f"v{e.serving}" if e.serving else "-", f"v{e.latest}", _versions_cell(e),
             e.rollout.state or "-", _replicas_holding(e)) for e in experts]
    print(format_table(("expert", "serving", "latest", "versions", "rollout", "loaded on"), rows))
    print(f"registry revision {listed.revision}")
    return 0


def show(args: argparse.Namespace) -> int:
    with connect(args) as client:
        e = client.get(args.name)
    if args.json:
        print_json(expert_dict(e))
        return 0
    print(f"{e.name}: serving {f'v{e.serving}' if e.serving else 'nothing'}, latest v{e.latest}, "
          f"expert revision {e.revision}")
    rows = []
    for v in e.versions:
        m = manifest_summary(v.manifest_json)
        rows.append((v.version, v.state, ", ".join(v.loaded_on) or "-", m["kind"] or "?",
                     ",".join(map(str, m["layers"] or [])) or "?",
                     f"{m['parameter_count']:,}" if m["parameter_count"] else "?", v.uri))
    print(format_table(("version", "state", "loaded on", "kind", "layers", "parameters", "uri"), rows))
    if e.rollout.id:
        print()
        print_rollout(e.rollout)
    return 0
