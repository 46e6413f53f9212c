"""`ccoe demo build|zoo|reproduce`: the demo model zoo and the small-scale reproduction.

    ccoe demo build                 # backbone + 3 trained experts + rules.json, cached
    ccoe demo zoo                   # the zoo served: checkable answers over gRPC, routed by rules
    ccoe demo reproduce --json      # {"domains": {"sql": {"backbone": 0.0, "expert": 0.93, ...}, ...}}

Both default to one CPU thread: on a shared 2-core machine, two threads that contend with any
other busy process run training about ten times slower (measured: 5.6 s vs 0.65 s per
pre-training step), while one thread on an idle machine loses well under half. --threads 2 is
the right choice on a machine of your own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ccoe_common.console import UserError, add_json_flag, format_table, positive_int, print_json, stdout_to_stderr
from ccoe_common.settings import load_settings
from ccoe_common.zoo.build import build_zoo, read_zoo
from ccoe_common.zoo.config import ZooConfig
from ccoe_common.zoo.domains import get_domain
from ccoe_common.zoo.evaluate import read_problems
from ccoe_common.zoo.reproduce import MAX_NEW_TOKENS, SERVED_NOTE, reproduce
from ccoe_common.zoo.rules import read_rules
from ccoe_common.zoo.served import ask, zoo_stack

COLUMNS = ("backbone", "expert", "mix", "sequential", "served", "mixed_batch")


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("build", help="build (or reuse) the demo zoo: pre-trained backbone, experts, rules")
    _common(p)
    p.add_argument("--force", action="store_true", help="rebuild even if the cached zoo matches")
    p.set_defaults(handler=run_build)

    p = verbs.add_parser("zoo", help="serve the built zoo (experts pushed through the registry) and check "
                                     "answers to held-out problems over gRPC")
    _common(p)
    p.add_argument("--per-domain", type=positive_int, default=4, metavar="N", help="problems per domain (default 4)")
    p.set_defaults(handler=run_zoo)

    p = verbs.add_parser("reproduce", help="accuracy of backbone / CCoE experts / full fine-tune baselines per domain")
    _common(p)
    p.set_defaults(handler=run_reproduce)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", help="zoo directory (default: $CCOE_CACHE_DIR/zoo)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see `ccoe demo build --help`)")
    add_json_flag(p)


def _setup(args: argparse.Namespace) -> Path:
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be >= 1")
    torch.set_num_threads(args.threads)
    return Path(args.workdir) if args.workdir else load_settings().cache_dir / "zoo"


def run_zoo(args: argparse.Namespace) -> int:
    """Held-out problems of each domain over gRPC, as an app sends them: no expert named, the
    rule table picks one; each answer is checked (sqlite for SQL, the number otherwise)."""
    workdir = _setup(args)
    zoo = read_zoo(workdir)  # whatever zoo is built there (an older config's included)
    if zoo is None:
        raise UserError(f"no demo zoo is built in {workdir}: run `ccoe demo build` first (about 9 minutes on "
                        "2 cores, cached afterwards)")
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say("starting the local stack on the zoo's backbone and pushing its experts through the registry ...")
    rows = []
    uris = {d: e["uri"] for d, e in zoo["experts"].items()}
    with stdout_to_stderr(args.json), zoo_stack(zoo["backbone"]["path"], uris, read_rules(Path(zoo["rules"])),
                                               who="demo zoo", say=say) as stub:
        for domain in zoo["experts"]:
            for problem in read_problems(zoo["data"][domain]["test"], domain)[:args.per_domain]:
                r = ask(stub, problem.instruction, MAX_NEW_TOKENS)
                rows.append({"domain": domain, "question": problem.instruction, "answer": r.text,
                             "expected": problem.output, "correct": get_domain(domain).check(problem, r.text),
                             "experts": [f"{e.name}@{e.version}" for e in r.route.experts],
                             "rule_id": r.route.rule_id})
    if args.json:
        print_json({"answers": rows})
        return 0
    print(format_table(("domain", "question", "answer", "routed to", "correct"),
                       [(r["domain"], r["question"], r["answer"], ", ".join(r["experts"]) or "backbone",
                         "yes" if r["correct"] else f"no (expected {r['expected']})") for r in rows]))
    return 0


def run_build(args: argparse.Namespace) -> int:
    workdir = _setup(args)
    zoo = build_zoo(workdir, ZooConfig(), force=args.force, quiet=args.json)
    if args.json:
        print_json(zoo)
        return 0
    bb = zoo["backbone"]
    print(f"zoo in {workdir} (built in {zoo['timings']['total_s']:.0f}s)")
    print(f"backbone: {bb['path']} ({bb['parameters']:,} parameters, expert budget {bb['budget']:,})")
    print(format_table(("expert", "layers", "params", "eval loss before", "eval loss after", "artifact"),
                       [(f"{n}@{e['version']}", ",".join(map(str, e["layers"])), f"{e['parameters']:,}",
                         f"{e['start_eval_loss']:.3f}", f"{e['best_eval_loss']:.3f}", e["uri"])
                        for n, e in zoo["experts"].items()]))
    print(f"rules: {zoo['rules']}")
    return 0


def run_reproduce(args: argparse.Namespace) -> int:
    workdir = _setup(args)
    report = reproduce(workdir, ZooConfig(), quiet=args.json)
    if args.json:
        print_json(report)
        return 0
    print(format_table(("domain", *COLUMNS, "seq. right after own stage"),
                       [(d, *(f"{a[c]:.1%}" for c in COLUMNS),
                         f"{a['sequential_after_own_stage']:.1%}" if "sequential_after_own_stage" in a else "-")
                        for d, a in report["domains"].items()]))
    iso = report["isolation"]
    print(f"isolation ({iso['domain']}): logits identical after pushing the other experts: "
          f"{iso['after_push_identical']}"
          + (f"; after training and pushing {iso['trained_and_pushed']}: {iso['after_train_and_push_identical']}"
             if "trained_and_pushed" in iso else ""))
    print("routing accuracy of the served rule table: "
          + ", ".join(f"{d} {v:.0%}" for d, v in report["routing_accuracy"].items()))
    print("served answers identical to the expert's own: "
          + ", ".join(f"{d} {v}" for d, v in report["served_equals_expert"].items()))
    print(f"note: {SERVED_NOTE}")
    print(f"({report['seconds']:.0f}s)", file=sys.stderr)
    return 0
