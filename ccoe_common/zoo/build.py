"""`ccoe demo build`: everything the demo serves, made locally and cached.

    workdir/
      zoo.json                    what was built, from which config (digest), how long it took
      backbone/                   transformers checkpoint + tokenizer (pre-trained here)
      data/<domain>/{train,eval,test}.jsonl
      experts/<domain>/v1/        one expert artifact per domain (trained, backbone frozen)
      rules.json                  domain -> expert routing table
      runs/<domain>/              metrics.jsonl + checkpoint of each expert run

A workdir whose zoo.json has the same config digest is reused as is.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from ccoe_common.model.ccoe import CCoEModel
from ccoe_common.model.placement import Placement
from ccoe_common.training.data import read_records, write_jsonl
from ccoe_common.training.expert_run import start_expert, train_expert
from ccoe_common.training.trainer import TrainConfig
from ccoe_common.zoo.config import ZooConfig
from ccoe_common.zoo.domains import get_domain
from ccoe_common.zoo.pretrain import pretrain_backbone
from ccoe_common.zoo.rules import write_rules

log = logging.getLogger(__name__)

ZOO_FILE = "zoo.json"
# Test problems use their own seed stream and are excluded from training by instruction text.
TEST_SEED, TRAIN_SEED, EVAL_SEED = 1, 2, 3


def read_zoo(workdir: Path) -> dict[str, Any] | None:
    path = workdir / ZOO_FILE
    return json.loads(path.read_text()) if path.exists() else None


def is_built(workdir: Path, config: ZooConfig) -> bool:
    zoo = read_zoo(workdir)
    return zoo is not None and zoo.get("config_digest") == config.digest()


def write_domain_data(workdir: Path, config: ZooConfig) -> dict[str, dict[str, Path]]:
    """Train/eval/test JSONL per domain; test instructions never appear in train or eval."""
    paths: dict[str, dict[str, Path]] = {}
    for name in config.domains:
        d = get_domain(name)
        test = d.problems(config.test_problems, config.seed * 100 + TEST_SEED)
        held = {p.instruction for p in test}
        evals = d.problems(config.eval_problems, config.seed * 100 + EVAL_SEED, exclude=held)
        train = d.problems(config.train_problems, config.seed * 100 + TRAIN_SEED, exclude=held, distinct=False)
        base = workdir / "data" / name
        paths[name] = {
            "train": write_jsonl(base / "train.jsonl", (p.record() for p in train)),
            "eval": write_jsonl(base / "eval.jsonl", (p.record() for p in evals)),
            "test": write_jsonl(base / "test.jsonl", ({**p.record(), "answer": p.answer} for p in test)),
        }
    return paths


def expert_config(config: ZooConfig, domain: str | None = None) -> TrainConfig:
    steps = config.expert_steps if domain is None else config.steps_for(domain)
    return TrainConfig(steps=steps, batch_size=config.expert_batch_size, lr=config.expert_lr,
                       warmup_steps=max(1, steps // 20), eval_every=max(1, steps // 5),
                       max_seq_len=128, seed=config.seed, log_every=10, precision="fp32")


def _train_one(workdir: Path, config: ZooConfig, name: str, data: dict[str, Path], quiet: bool,
               threads: int | None = None) -> dict[str, Any]:
    """Train one domain's expert on the zoo's backbone; returns its zoo.json entry. Runs in a
    worker process when experts train in parallel, so it loads the backbone itself."""
    if threads is not None:
        torch.set_num_threads(threads)
    t = time.monotonic()
    # A run left by an earlier build (another config) would show in the progress line and its
    # metrics would be appended to; this build's run starts clean.
    shutil.rmtree(workdir / "runs" / name, ignore_errors=True)
    model = CCoEModel.from_pretrained(workdir / "backbone")
    expert = start_expert(model, name=name, placement=Placement.parse(config.placement), domains=[name],
                          description=get_domain(name).description)
    train = read_records(data["train"], model.tokenizer)
    evals = read_records(data["eval"], model.tokenizer)
    uri = str(workdir / "experts" / name / "v1")
    run = train_expert(model, expert, train, evals, expert_config(config, name), out_uri=uri,
                       run_dir=workdir / "runs" / name, quiet=quiet)
    return {"uri": uri, "version": run.manifest.version, "layers": run.manifest.layers,
            "parameters": run.manifest.parameter_count, "start_eval_loss": run.start_eval_loss,
            "best_eval_loss": run.result.best_eval_loss, "seconds": time.monotonic() - t}


def _last_metrics(path: Path) -> dict[str, Any] | None:
    """The newest complete record of a run's metrics.jsonl (its writer may be mid-line)."""
    lines = path.read_text().splitlines() if path.exists() else []
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def _progress(workdir: Path, config: ZooConfig, done: dict[str, Any]) -> str:
    """One line for experts training in other processes, read from their metrics.jsonl."""
    parts = []
    for name in config.domains:
        if name in done:
            parts.append(f"{name} done")
            continue
        last = _last_metrics(workdir / "runs" / name / "metrics.jsonl")
        parts.append(f"{name} {last['step']}/{config.steps_for(name)} loss {last['loss']:.3f}" if last
                     else f"{name} starting")
    return " | ".join(parts)


def expert_workers(config: ZooConfig) -> int:
    """Experts are independent (the backbone is frozen), so each CPU core trains one."""
    return max(1, min(len(config.domains), os.cpu_count() or 1))


def train_experts(workdir: Path, config: ZooConfig, data: dict[str, dict[str, Path]], *, workers: int,
                  quiet: bool, say: Callable[..., None]) -> dict[str, Any]:
    """Every domain's expert: in this process one after another (workers=1), or spread over
    worker processes of one thread each. Same seeds, same data: the artifacts are the same."""
    if workers <= 1:
        return {name: _train_one(workdir, config, name, data[name], quiet) for name in config.domains}
    done: dict[str, Any] = {}
    ctx = multiprocessing.get_context("spawn")  # a forked torch with live threads can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        # Longest first, so the long run starts at once and the short ones share the other cores.
        order = sorted(config.domains, key=config.steps_for, reverse=True)
        futures = {pool.submit(_train_one, workdir, config, n, data[n], True, 1): n for n in order}
        pending = set(futures)
        tty, last_line = sys.stderr.isatty(), 0.0
        while pending:
            finished, pending = wait(pending, timeout=2.0, return_when=FIRST_COMPLETED)
            for f in finished:
                if f.exception() is not None:
                    for other in pending:
                        other.cancel()  # those not started yet; a running one finishes its expert
                    raise RuntimeError(f"training the {futures[f]} expert failed: {f.exception()}") from f.exception()
                done[futures[f]] = f.result()
            # Redrawn in place on a terminal; in a log, a line every 15 s.
            if not quiet and (tty or finished or time.monotonic() - last_line > 15):
                say(("\r  " if tty else "  ") + _progress(workdir, config, done), end="" if tty else "\n")
                last_line = time.monotonic()
    if not quiet and tty:
        say()
    return {name: done[name] for name in config.domains}


def build_zoo(workdir: Path, config: ZooConfig | None = None, *, force: bool = False, quiet: bool = False,
              workers: int | None = None) -> dict[str, Any]:
    """Build (or reuse) the zoo in workdir; returns the contents of zoo.json. workers: processes
    training experts at once (default: one per CPU core, at most one per domain)."""
    config = config or ZooConfig()
    if not force and is_built(workdir, config):
        return read_zoo(workdir)  # type: ignore[return-value]  # is_built() found it just now
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ZOO_FILE).unlink(missing_ok=True)  # a half-built zoo never looks finished
    say = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, file=sys.stderr, flush=True, **k))
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    say(f"[1/4] writing data for {', '.join(config.domains)}")
    data = write_domain_data(workdir, config)
    domains = [get_domain(n) for n in config.domains]

    say(f"[2/4] pre-training the backbone ({config.pretrain_steps} steps)")
    t = time.monotonic()
    pre = pretrain_backbone(workdir / "backbone", domains, config, quiet=quiet)
    timings["pretrain_s"] = time.monotonic() - t

    workers = expert_workers(config) if workers is None else workers
    say(f"[3/4] training {len(domains)} experts with the backbone frozen"
        + (f", {workers} at a time in worker processes" if workers > 1 else ""))
    t = time.monotonic()
    experts = train_experts(workdir, config, data, workers=workers, quiet=quiet, say=say)
    timings["experts_s"] = time.monotonic() - t
    for name, e in experts.items():
        timings[f"expert_{name}_s"] = e.pop("seconds")
        say(f"  {name}: layers {e['layers']}, {e['parameters']:,} parameters, eval loss "
            f"{e['start_eval_loss']:.3f} -> {e['best_eval_loss']:.3f}")
    model = CCoEModel.from_pretrained(workdir / "backbone")

    say("[4/4] writing the rule table")
    rules_path = write_rules(workdir / "rules.json", {n: get_domain(n) for n in config.domains})
    timings["total_s"] = time.monotonic() - t0
    zoo = {
        "config_digest": config.digest(), "config": config.model_dump(mode="json"),
        "backbone": {"path": str(workdir / "backbone"), "parameters": model.info.parameter_count,
                     "fingerprint": model.info.fingerprint, "budget": model.budget_params,
                     "pretrain_final_loss": pre.final_train_loss},
        "experts": experts, "rules": str(rules_path),
        "data": {n: {k: str(v) for k, v in p.items()} for n, p in data.items()}, "timings": timings,
    }
    (workdir / ZOO_FILE).write_text(json.dumps(zoo, indent=2))
    return zoo
