"""Pop-and-push expert training (CCoE-25 §3.3): start an expert, train it with the backbone
frozen, write it as a new artifact version.

Two starts, as in the paper:
- a new expert is a deep copy of the backbone modules at its placement (`CCoEModel.carve`),
  so at step 0 it answers exactly like the backbone;
- continual training starts from an existing artifact (`CCoEModel.load` = the "pop" deep
  copy, made off to the side of anything that serves) and writes version + 1 (the "push" is
  then `CCoEModel.push(uri)` or the registry CLI).

    model = CCoEModel.from_pretrained("./zoo/backbone")
    expert = start_expert(model, name="sql", placement=Placement.parse("GL:2"))
    run = train_expert(model, expert, read_records("sql.jsonl", model.tokenizer), None,
                       TrainConfig(steps=300), out_uri="./experts/sql/v1")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ccoe_common.experts.manifest import ExpertManifest
from ccoe_common.model.ccoe import CCoEModel
from ccoe_common.model.expert import LoadedExpert
from ccoe_common.model.placement import Placement
from ccoe_common.training.data import BadLine, Dataset, Example, tokenize_all
from ccoe_common.training.trainer import ExpertTarget, TrainConfig, TrainResult, eval_loss, fit


class EvalSplit(BaseModel):
    """How the eval set is chosen when no eval file is given. Example: EvalSplit(fraction=0.05, max_examples=200)."""

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(0.05, ge=0, lt=1, description="Share of the training records held out for eval loss.")
    max_examples: int = Field(200, ge=0, description="Cap on held-out examples (eval runs every eval_every steps).")


@dataclass
class ExpertRun:
    """The outcome of `train_expert`: the artifact written and how training went."""

    manifest: ExpertManifest
    uri: str
    result: TrainResult
    start_eval_loss: float | None  # the eval loss before the first step (backbone or previous version)
    dropped: list[BadLine]


def start_expert(
    model: CCoEModel,
    *,
    name: str | None = None,
    from_uri: str | None = None,
    kind: str = "ffn",
    placement: Placement | None = None,
    domains: Sequence[str] = (),
    description: str = "",
) -> LoadedExpert:
    """A new expert carved from the backbone, or (from_uri) a deep copy of an existing artifact."""
    if from_uri is not None:
        expert = model.load(from_uri)
        if name is not None and name != expert.name:
            raise ValueError(f"--name {name!r} differs from the artifact's name {expert.name!r} at {from_uri}; "
                             "continual training keeps the name (carve a new expert for a new name)")
        if domains:
            expert.domains = list(domains)
        return expert
    if name is None:
        raise ValueError("a new expert needs a name (or start from an artifact)")
    return model.carve(name, kind=kind, placement=placement, domains=domains, description=description)


def split_eval(examples: list[Example], split: EvalSplit, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministically hold out min(fraction * n, max_examples) examples, at least one train example kept."""
    k = min(int(len(examples) * split.fraction), split.max_examples, max(len(examples) - 1, 0))
    if k == 0:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 7)).tolist()
    held = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def train_expert(
    model: CCoEModel,
    expert: LoadedExpert,
    train_data: Dataset,
    eval_data: Dataset | None,
    config: TrainConfig,
    *,
    out_uri: str,
    version: int | None = None,
    continued_from: str | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    split: EvalSplit | None = None,
    quiet: bool = False,
    save_dtype: torch.dtype | None = None,
    on_step=None,
    score: Callable[[], float] | None = None,
) -> ExpertRun:
    """Train `expert` on `train_data` with the backbone frozen and write it to `out_uri`.

    version: the version written (default: the carved expert's version, or the artifact's
    version + 1 when `continued_from`, the artifact URI it was loaded from, is given). The
    manifest's `training` field records the data hash, steps, losses and hyper-parameters, so
    a version can be traced to what made it. score: see `fit` (the weights kept are those of
    the best score; the zoo passes exact-match accuracy on held-out problems).
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"backbone {model.info.path} has no tokenizer.json; training needs one")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    train_ex, dropped = tokenize_all(train_data.records, tok, config.max_seq_len)
    if eval_data is not None:
        eval_ex, eval_dropped = tokenize_all(eval_data.records, tok, config.max_seq_len)
        dropped += eval_dropped
    else:
        train_ex, eval_ex = split_eval(train_ex, split or EvalSplit(), config.seed)
    if not train_ex:
        raise ValueError(f"no training example fits max_seq_len={config.max_seq_len}")

    started_from = "backbone" if continued_from is None else f"{expert.key} ({continued_from})"
    new_version = version if version is not None else expert.version + (continued_from is not None)
    target = ExpertTarget(model, expert)
    start_eval = eval_loss(target, eval_ex, pad_id, config.eval_batch_size, config.precision) if eval_ex else None
    identity = {"expert": expert.name, "layers": list(expert.layers), "kind": expert.kind.name,
                "data_sha256": train_data.sha256, "backbone": model.info.fingerprint, "version": new_version}
    try:
        result = fit(target, train_ex, config, pad_id=pad_id, eval_examples=eval_ex, run_dir=run_dir,
                     resume=resume, identity=identity, label=f"train {expert.name}@{new_version}", quiet=quiet,
                     on_step=on_step, score=score)
    finally:
        for p in expert.parameters():
            p.requires_grad_(False)
            p.grad = None

    expert.training = {
        "started_from": started_from,
        "data_sha256": train_data.sha256,
        "train_records": len(train_ex),
        "eval_records": len(eval_ex),
        "eval_sha256": eval_data.sha256 if eval_data is not None else None,
        "bad_lines": len(train_data.bad) + (len(eval_data.bad) if eval_data is not None else 0),
        "start_eval_loss": start_eval,
        **result.summary(),
        "config": config.model_dump(mode="json"),
    }
    manifest = expert.to_artifact(out_uri, model.info, version=new_version, dtype=save_dtype)
    return ExpertRun(manifest, out_uri, result, start_eval, dropped)


def training_summary(run: ExpertRun) -> dict[str, Any]:
    """The JSON a CLI prints for a finished run."""
    return {
        "artifact": run.uri, "name": run.manifest.name, "version": run.manifest.version,
        "layers": run.manifest.layers, "parameter_count": run.manifest.parameter_count,
        "start_eval_loss": run.start_eval_loss, **run.result.summary(),
        "dropped": [str(b) for b in run.dropped],
    }
