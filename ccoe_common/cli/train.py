"""`ccoe train expert|sweep`: train experts with the backbone frozen, and choose their size.

    ccoe train expert --backbone ./bb --name sql --data sql.jsonl --placement GL:2 --steps 300 --out ./experts/sql/v1
    ccoe train expert --backbone ./bb --from ./experts/sql/v1 --data more.jsonl --steps 100 --out ./experts/sql/v2
    ccoe train sweep --backbone ./bb --name sql --data sql.jsonl --layers 1,2,4 --budget 0.5 --steps 200
"""

from __future__ import annotations

import argparse
import math
import sys

from ccoe_common.cli.loading import add_model_flags, model_from_args
from ccoe_common.console import UserError, add_json_flag, format_table, print_json
from ccoe_common.defaults import DEFAULT_BUDGET_FRACTION, DTYPE_CHOICES
from ccoe_common.model.kinds import KINDS
from ccoe_common.model.placement import STRATEGIES, Placement
from ccoe_common.settings import load_settings
from ccoe_common.training.data import DataError, read_records
from ccoe_common.training.expert_run import EvalSplit, start_expert, train_expert, training_summary
from ccoe_common.training.sweep import best_size, rows_as_json, sweep_sizes
from ccoe_common.training.trainer import TrainConfig


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, help="transformers checkpoint directory of the frozen backbone")
    p.add_argument("--data", required=True,
                   help="JSONL training records (Alpaca instruction/input/output or chat messages)")
    p.add_argument("--eval-data", help="JSONL eval records (default: hold out --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.05,
                   help="held-out share when no --eval-data (default 0.05)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="refuse to start when more than this share of lines is bad (default 0.01)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    steps.add_argument("--epochs", type=float, help="passes over the training records")
    p.add_argument("--batch-size", type=int, default=16, help="examples per micro-batch (default 16)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of steps)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm; 0 = off (default 1.0)")
    p.add_argument("--max-seq-len", type=int, default=256, help="truncate examples to this many tokens (default 256)")
    p.add_argument("--eval-every", type=int, default=50, help="eval loss every N steps (default 50)")
    p.add_argument("--patience", type=int, default=0, help="early stop after N evals without improvement; 0 = off")
    p.add_argument("--seed", type=int, default=0, help="sample order seed (default 0)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    p.add_argument("--kind", choices=sorted(KINDS), default="ffn",
                   help="which modules an expert replaces (default ffn)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_FRACTION,
                   help="max expert parameters as a fraction of the backbone (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    add_model_flags(p)
    add_json_flag(p)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train experts with the backbone frozen; choose their size")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("expert", help="train a new expert, or continue one from its artifact (pop -> train -> push)")
    _add_training_flags(p)
    p.add_argument("--name", help="expert name for a new expert, e.g. sql")
    p.add_argument("--from", dest="from_uri", help="continue this expert artifact (writes version + 1 by default)")
    p.add_argument("--placement", default="GL",
                   help="GL|FB|FE|MD|BE[:layers] or 0,5,11 (new experts; default GL, budget-filling)")
    p.add_argument("--domain", action="append", default=[], help="domain the expert serves (repeatable)")
    p.add_argument("--version", type=int, help="version to write (default 1, or the artifact's + 1 with --from)")
    p.add_argument("--out", required=True, help="artifact folder to write (local path or fsspec URI)")
    p.add_argument("--run-dir", help="checkpoints and metrics.jsonl (default $CCOE_CACHE_DIR/runs/NAME-vVERSION)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    p.add_argument("--save-dtype", choices=sorted(k for k in DTYPE_CHOICES if k != "auto"),
                   help="dtype of the written weights (default: the training dtype)")
    p.set_defaults(handler=run_expert)

    p = verbs.add_parser("sweep", help="train one domain at several layer counts; print the performance gain of each")
    _add_training_flags(p)
    p.add_argument("--name", default="sweep", help="name for the experts trained by the sweep (not kept)")
    p.add_argument("--layers", default="1,2,4", help="comma-separated layer counts (default 1,2,4)")
    p.add_argument("--strategy", choices=STRATEGIES, default="GL",
                   help="placement strategy for every size (default GL)")
    p.set_defaults(handler=run_sweep)


def _config(args: argparse.Namespace, n_train: int) -> TrainConfig:
    per_step = args.batch_size * args.grad_accum
    steps = args.steps if args.steps is not None else math.ceil((args.epochs or 1.0) * n_train / per_step)
    if steps < 1:
        raise UserError(f"--steps/--epochs gives {steps} steps; need at least 1")
    warmup = args.warmup if args.warmup is not None else max(1, steps // 20) if steps > 1 else 0
    try:
        return TrainConfig(
            steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup_steps=warmup,
            weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, max_seq_len=args.max_seq_len,
            eval_every=args.eval_every, early_stop_patience=args.patience, seed=args.seed, precision=args.precision,
            **({"checkpoint_every": args.checkpoint_every} if hasattr(args, "checkpoint_every") else {}),
        )
    except ValueError as e:
        raise UserError(f"invalid training flags: {e}") from e


def _read(args: argparse.Namespace, model):
    def read(path: str):
        try:
            ds = read_records(path, model.tokenizer, max_bad_fraction=args.max_bad_fraction)
        except DataError as e:
            raise UserError(str(e)) from e
        for b in ds.bad[:10]:
            print(f"warning: {path} {b} (skipped)", file=sys.stderr)
        if len(ds.bad) > 10:
            print(f"warning: {path}: {len(ds.bad) - 10} more bad lines skipped", file=sys.stderr)
        return ds

    if not 0 <= args.eval_fraction < 1:
        raise UserError(f"--eval-fraction {args.eval_fraction} must be in [0, 1)")
    train = read(args.data)
    return train, (read(args.eval_data) if args.eval_data else None)


def run_expert(args: argparse.Namespace) -> int:
    if args.from_uri is None and args.name is None:
        raise UserError("give --name for a new expert, or --from ARTIFACT to continue one")
    model = model_from_args(args, budget_fraction=args.budget)
    if model.tokenizer is None:
        raise UserError(f"--backbone {args.backbone} has no tokenizer.json; training needs the backbone's tokenizer")
    train, eval_data = _read(args, model)
    config = _config(args, len(train.records))
    expert = start_expert(model, name=args.name, from_uri=args.from_uri, kind=args.kind,
                          placement=Placement.parse(args.placement), domains=args.domain)
    version = args.version or (expert.version + 1 if args.from_uri else 1)
    run_dir = args.run_dir or load_settings().cache_dir / "runs" / f"{expert.name}-v{version}"
    quiet = args.quiet or args.json
    if not quiet:
        print(f"training {expert.name}@{version} ({expert.kind.name}, layers {list(expert.layers)}, "
              f"{expert.parameter_count:,} parameters) on {len(train.records)} records for {config.steps} steps; "
              f"run dir {run_dir}", file=sys.stderr)
    try:
        run = train_expert(model, expert, train, eval_data, config, out_uri=args.out, version=version,
                           continued_from=args.from_uri, run_dir=run_dir, resume=args.resume,
                           split=EvalSplit(fraction=args.eval_fraction), quiet=quiet,
                           save_dtype=DTYPE_CHOICES[args.save_dtype] if args.save_dtype else None)
    except KeyboardInterrupt:
        print(f"\ninterrupted; checkpoint kept in {run_dir}: rerun the same command with --resume", file=sys.stderr)
        return 130
    summary = training_summary(run)
    if args.json:
        print_json(summary)
        return 0
    r = run.result
    print(f"wrote {run.manifest.name}@{run.manifest.version} to {run.uri} "
          f"({run.manifest.parameter_count:,} parameters, layers {run.manifest.layers})")
    print(format_table(("", "value"), [
        ("steps", f"{r.steps}" + (" (early stop)" if r.stopped_early else "")),
        ("tokens", f"{r.tokens:,}"),
        ("eval loss before", "-" if run.start_eval_loss is None else f"{run.start_eval_loss:.4f}"),
        ("eval loss best", "-" if r.best_eval_loss is None else f"{r.best_eval_loss:.4f} (step {r.best_step})"),
        ("train loss final", "-" if r.final_train_loss is None else f"{r.final_train_loss:.4f}"),
        ("seconds", f"{r.seconds:.1f}"),
    ]))
    if r.resumed_from is not None:
        print(f"resumed from step {r.resumed_from}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    try:
        sizes = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError as e:
        raise UserError(f"--layers {args.layers!r} must be comma-separated integers like 1,2,4") from e
    model = model_from_args(args, budget_fraction=args.budget)
    if model.tokenizer is None:
        raise UserError(f"--backbone {args.backbone} has no tokenizer.json; training needs the backbone's tokenizer")
    train, eval_data = _read(args, model)
    config = _config(args, len(train.records))
    rows = sweep_sizes(model, train, eval_data, sizes, name=args.name, kind=args.kind, strategy=args.strategy,
                       config=config, split=EvalSplit(fraction=args.eval_fraction), quiet=args.quiet or args.json)
    best = best_size(rows)
    if args.json:
        print_json({"rows": rows_as_json(rows), "best_layers": best.layers,
                    "metric": "gain_per_million = -(eval_loss_k - eval_loss_prev) / (params_k - params_prev) * 1e6"})
        return 0
    print(format_table(
        ("layers", "placement", "params", "eval loss", "Δ loss", "Δ params", "gain/1M params"),
        [(r.layers if r.layers else "0 (backbone)", ",".join(map(str, r.layer_indices)) or "-", f"{r.parameters:,}",
          f"{r.eval_loss:.4f}", "-" if r.delta_eval_loss is None else f"{r.delta_eval_loss:+.4f}",
          "-" if r.delta_parameters is None else f"{r.delta_parameters:,}",
          "-" if r.gain_per_million is None else f"{r.gain_per_million:.4f}") for r in rows]))
    print(f"highest performance gain −Δε/|Δθ|: {best.layers} layers "
          "(CCoE-24 §4.4 picks the size with the highest gain)")
    return 0
