"""`ccoe generate`: one greedy generation, for people and scripts.

    ccoe generate --backbone ./demo/backbone --expert ./demo/experts/math --use math \
        --prompt "Compute 12 + 7" --max-new-tokens 16 --json
    {"token_ids":[...],"text":"..."}
"""

from __future__ import annotations

import argparse

from ccoe_common.cli.common import UserError, add_json_flag, add_model_flags, print_json
from ccoe_common.cli.loading import model_from_args
from ccoe_common.model.generate import greedy_generate


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate greedily from a backbone, optionally on an expert")
    p.add_argument("--backbone", required=True, help="transformers checkpoint directory")
    p.add_argument("--expert", action="append", default=[], metavar="URI",
                   help="expert artifact to push (repeatable; local path or fsspec URI)")
    p.add_argument("--use", metavar="NAME[@VERSION]", help="expert to generate with (default: the bare backbone)")
    p.add_argument("--prompt", required=True, help="prompt text, encoded as is (no chat template)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default 32)")
    add_model_flags(p)
    add_json_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model = model_from_args(args)
    if model.tokenizer is None:
        raise UserError(f"--backbone {args.backbone} has no tokenizer.json; generate needs one to encode the prompt")
    for uri in args.expert:
        model.push(uri)
    if args.use and not args.expert:
        raise UserError(f"--use {args.use} needs the expert's artifact: pass it with --expert URI")
    prompt_ids = model.tokenizer(args.prompt, add_special_tokens=False).input_ids
    if not prompt_ids:
        raise UserError("--prompt encodes to no tokens; give some text")
    result = greedy_generate(model, prompt_ids, args.max_new_tokens, expert=args.use)
    text = model.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    if args.json:
        print_json({"token_ids": result.token_ids, "text": text})
    else:
        used = str(model.get(args.use).key) if args.use else "backbone"
        print(f"[{used}, {len(result.token_ids)} tokens, finish={result.finish_reason}]")
        print(args.prompt + text)
    return 0
