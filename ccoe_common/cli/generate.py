"""`ccoe generate`: one generation on the engine, for people and scripts.

    ccoe generate --backbone ./demo/backbone --expert ./demo/experts/math --use math \
        --prompt "Compute 12 + 7" --max-new-tokens 16 --json
    {"token_ids":[...],"text":"..."}

Greedy unless --temperature is given; the output equals the reference greedy decoder's.
"""

from __future__ import annotations

import argparse

from ccoe_common.cli.loading import add_model_flags, model_from_args
from ccoe_common.console import UserError, add_json_flag, print_json
from ccoe_common.engine.engine import Engine, EngineConfig
from ccoe_common.engine.params import GenerationRequest, SamplingParams
from ccoe_common.engine.templates import TEMPLATES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate from a backbone, optionally on an expert")
    p.add_argument("--backbone", required=True, help="transformers checkpoint directory")
    p.add_argument("--expert", action="append", default=[], metavar="URI",
                   help="expert artifact to push (repeatable; local path or fsspec URI)")
    p.add_argument("--use", metavar="NAME[@VERSION]", help="expert to generate with (default: the bare backbone)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--template", choices=[t for t in TEMPLATES if t != "chat"], default="raw",
                   help="raw: the prompt as is (default); alpaca: wrapped as an Alpaca instruction")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_model_flags(p)
    add_json_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    sampling = SamplingParams.create(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop),
    )
    if args.use and not args.expert:
        raise UserError(f"--use {args.use} needs the expert's artifact: pass it with --expert URI")
    model = model_from_args(args)
    if model.tokenizer is None:
        raise UserError(f"--backbone {args.backbone} has no tokenizer.json; generate needs one to encode the prompt")
    for uri in args.expert:
        model.push(uri)
    prompt_len = len(model.tokenizer(args.prompt).input_ids) + 512  # room for a template around it
    config = EngineConfig(max_seq_len=prompt_len + args.max_new_tokens, max_running=1,
                          max_batched_tokens=512, prefill_chunk=512)
    request = GenerationRequest(prompt=args.prompt, template=args.template, expert=args.use, sampling=sampling)
    with Engine(model, config) as engine:
        result = engine.complete_sync(request)
    if args.json:
        print_json({"token_ids": result.token_ids, "text": result.text})
    else:
        used = str(result.expert) if result.expert else "backbone"
        print(f"[{used}, {result.usage.completion_tokens} tokens, finish={result.finish_reason}]")
        print(args.prompt + result.text)
    return 0
