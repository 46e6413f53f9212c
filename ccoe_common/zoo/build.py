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
import sys
import time
from pathlib import Path
from typing import Any

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


def build_zoo(workdir: Path, config: ZooConfig | None = None, *, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Build (or reuse) the zoo in workdir; returns the contents of zoo.json."""
    config = config or ZooConfig()
    if not force and is_built(workdir, config):
        return read_zoo(workdir)  # type: ignore[return-value]
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ZOO_FILE).unlink(missing_ok=True)  # a half-built zoo never looks finished
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    say(f"[1/4] writing data for {', '.join(config.domains)}")
    data = write_domain_data(workdir, config)
    domains = [get_domain(n) for n in config.domains]

    say(f"[2/4] pre-training the backbone ({config.pretrain_steps} steps)")
    t = time.monotonic()
    pre = pretrain_backbone(workdir / "backbone", domains, config, quiet=quiet)
    timings["pretrain_s"] = time.monotonic() - t

    say(f"[3/4] training {len(domains)} experts with the backbone frozen")
    model = CCoEModel.from_pretrained(workdir / "backbone")
    experts: dict[str, Any] = {}
    for name in config.domains:
        t = time.monotonic()
        expert = start_expert(model, name=name, placement=Placement.parse(config.placement), domains=[name],
                              description=get_domain(name).description)
        train = read_records(data[name]["train"], model.tokenizer)
        evals = read_records(data[name]["eval"], model.tokenizer)
        uri = str(workdir / "experts" / name / "v1")
        run = train_expert(model, expert, train, evals, expert_config(config, name), out_uri=uri,
                           run_dir=workdir / "runs" / name, quiet=quiet)
        timings[f"expert_{name}_s"] = time.monotonic() - t
        experts[name] = {"uri": uri, "version": run.manifest.version, "layers": run.manifest.layers,
                         "parameters": run.manifest.parameter_count, "start_eval_loss": run.start_eval_loss,
                         "best_eval_loss": run.result.best_eval_loss}
        say(f"  {name}: layers {run.manifest.layers}, {run.manifest.parameter_count:,} parameters, eval loss "
            f"{run.start_eval_loss:.3f} -> {run.result.best_eval_loss:.3f}")

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
