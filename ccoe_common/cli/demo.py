"""`ccoe demo core`: the model core end to end, in process, on a tiny backbone made locally.

It creates (once, cached) a small Qwen2-shaped checkpoint with an offline tokenizer, carves
two experts of the two kinds, writes them as artifacts, pushes them back from disk, generates
with each and with the bare backbone, runs one mixed batch, pops one expert with an export,
and checks that the backbone's output never changed.

The demo's experts are untrained, so that it runs in seconds (`ccoe demo` serves trained
ones): each is a deep copy of the backbone modules nudged with seeded noise, so that its
outputs visibly differ.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from ccoe_common.cli import demo_stack, demo_zoo
from ccoe_common.console import add_json_flag, format_table, human_bytes, positive_int, print_json
from ccoe_common.model import CCoEModel, Placement
from ccoe_common.model.demo_assets import demo_backbone, nudge
from ccoe_common.model.generate import greedy_generate
from ccoe_common.settings import load_settings

DEMO_PROMPTS = ("Compute 12 + 7 and", "SELECT name FROM users WHERE")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the demo (plain `ccoe demo`: the demo zoo served by the whole local "
                                    "stack over gRPC, built once and cached)")
    p.add_argument("--workdir", help="the demo zoo's directory (default: $CCOE_CACHE_DIR/zoo, or zoo-quick)")
    p.add_argument("--quick", action="store_true", help="a toy zoo built in seconds instead (smoke runs, CI): "
                                                        "same steps, mostly wrong answers")
    p.add_argument("--per-domain", type=positive_int, default=3, metavar="N",
                   help="held-out problems asked per domain (default 3)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads for the build (default 1)")
    add_json_flag(p)
    p.set_defaults(handler=demo_stack.run)
    kinds = p.add_subparsers(dest="demo", metavar="PART")
    core = kinds.add_parser("core", help="the model core in process: push, generate, mixed batch, pop")
    core.add_argument("--workdir", help="where the demo model is cached (default: $CCOE_CACHE_DIR/demo)")
    core.add_argument("--max-new-tokens", type=int, default=12, help="tokens per generation (default 12)")
    add_json_flag(core)
    core.set_defaults(handler=run)
    demo_zoo.register(kinds)  # build, reproduce: the trained model zoo


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else load_settings().cache_dir / "demo"
    say = (lambda *a: None) if args.json else print
    report: dict[str, Any] = {}

    backbone_dir = demo_backbone(workdir)
    model = CCoEModel.from_pretrained(backbone_dir)
    tok = model.tokenizer
    say(f"backbone: {backbone_dir} ({model.info.parameter_count:,} parameters, "
        f"fingerprint {model.info.fingerprint[:12]}…, budget per expert {model.budget_params:,})")

    def generate(prompt: str, expert: str | None) -> str:
        ids = tok(prompt, add_special_tokens=False).input_ids
        out = greedy_generate(model, ids, args.max_new_tokens, expert=expert)
        return tok.decode(out.token_ids, skip_special_tokens=True)

    baseline = {p: generate(p, None) for p in DEMO_PROMPTS}

    with tempfile.TemporaryDirectory(prefix="ccoe-demo-") as tmp:
        uris = {}
        for seed, (name, kind, placement) in enumerate(
            (("math", "ffn", Placement(strategy="GL")), ("sql", "trailing", Placement(strategy="BE")))
        ):
            expert = model.carve(name, kind=kind, placement=placement, domains=[name])
            nudge(expert, seed)
            uris[name] = f"{tmp}/experts/{name}"
            manifest = expert.to_artifact(uris[name], model.info)
            say(f"wrote artifact {name}@1 ({kind}, layers {manifest.layers}, {manifest.parameter_count:,} parameters, "
                f"sha256 {manifest.weights_sha256[:12]}…)")
        for uri in uris.values():
            say(f"push {model.push(uri)} from {uri}")
        mem = model.memory_report()
        say("\nresident memory:")
        say(format_table(("what", "bytes"), [("backbone", human_bytes(mem.backbone_bytes))]
                         + [(k, human_bytes(v)) for k, v in mem.experts.items()]
                         + [("total", human_bytes(mem.total_bytes))]))
        report["push"] = {"resident": [str(k) for k in model.resident()], "memory": mem.experts,
                          "backbone_bytes": mem.backbone_bytes}

        rows = []
        generations: dict[str, dict[str, str]] = {}
        for prompt in DEMO_PROMPTS:
            generations[prompt] = {"backbone": baseline[prompt]}
            rows.append(("backbone", prompt, baseline[prompt]))
            for name in uris:
                generations[prompt][name] = generate(prompt, name)
                rows.append((name, prompt, generations[prompt][name]))
        say("\ngreedy generations:")
        say(format_table(("route", "prompt", "continuation"), [(r, p, repr(t)) for r, p, t in rows]))
        report["generations"] = generations

        # One forward, three rows on three routes: each row must equal that row run alone.
        ids = torch.tensor([tok(DEMO_PROMPTS[0], add_special_tokens=False).input_ids] * 3)
        selectors = model.resolve([None, "math", "sql"])
        with torch.inference_mode():
            mixed = model.forward(ids, selectors)
            alone = torch.cat([model.forward(ids[i:i + 1], [s]) for i, s in enumerate(selectors)])
        mixed_diff = float((mixed - alone).abs().max())
        say(f"\nmixed batch (backbone, math, sql in one forward): max |logit diff| vs rows alone = {mixed_diff:.2e}")
        report["mixed_batch_max_abs_diff"] = mixed_diff

        export_uri = f"{tmp}/exported/sql"
        popped = model.pop("sql", export_to=export_uri)
        say(f"pop {', '.join(map(str, popped))} (deep copy exported to {export_uri}); "
            f"resident now: {', '.join(map(str, model.resident()))}")
        reloaded = model.load(export_uri)
        say(f"the exported copy loads back as {reloaded.key} ({reloaded.parameter_count:,} parameters)")
        report["pop"] = {"popped": [str(k) for k in popped], "resident": [str(k) for k in model.resident()]}

    unchanged = all(generate(p, None) == baseline[p] for p in DEMO_PROMPTS)
    say(f"backbone output unchanged by push/pop: {unchanged}")
    report["backbone_unchanged"] = unchanged
    if args.json:
        print_json(report)
    return 0 if unchanged else 1
