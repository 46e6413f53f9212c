"""The training loop shared by expert training (backbone frozen) and full fine-tune baselines.

What is trained is a `Target`: the parameters that learn and how a batch becomes logits.
`ExpertTarget` runs the frozen backbone with one expert's modules swapped in (CCoE-25 Eq. 5:
only θ_i learns, θ_b* is read-only); `FullTarget` trains every backbone parameter (the "-mix"
and sequential baselines of the reproduction).

The loop: AdamW, warmup + cosine (`schedule.lr_at`), gradient accumulation with the loss
normalised by the response tokens of the whole optimizer step, gradient clipping, bf16
autocast on GPU, eval loss every N steps with early stopping (best weights restored), a
checkpoint every N steps and on Ctrl-C, and metrics as JSON lines.

Resume is exact on CPU: the sample order is a pure function of (seed, sample index) and the
learning rate a pure function of the step, so a checkpoint needs only the step, the weights,
the optimizer state and the early-stopping counters.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from ccoe_common.model.backbone import Backbone, RowGroup
from ccoe_common.model.ccoe import CCoEModel
from ccoe_common.model.expert import LoadedExpert
from ccoe_common.training.data import IGNORE_INDEX, Example, collate
from ccoe_common.training.schedule import lr_at

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"


class TrainConfig(BaseModel):
    """Hyper-parameters of one run. Example: TrainConfig(steps=300, batch_size=16, lr=1e-3)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1, description="Optimizer steps to run (each = batch_size * grad_accum examples).")
    batch_size: int = Field(16, ge=1, description="Examples per micro-batch (one forward/backward).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-3, gt=0, le=1, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps before the cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this; None = off.")
    max_seq_len: int = Field(256, ge=8, description="Examples are truncated to this many tokens.")
    eval_every: int = Field(50, ge=1, description="Compute the eval loss every this many steps (and at the end).")
    eval_batch_size: int = Field(32, ge=1, description="Examples per eval forward.")
    early_stop_patience: int = Field(0, ge=0, description="Stop after this many evals without improvement; 0 = never.")
    early_stop_min_delta: float = Field(
        1e-3, ge=0, description="An eval loss must beat the best by this much to count.")
    restore_best: bool = Field(True, description="End with the weights of the best eval (when there is an eval set).")
    checkpoint_every: int = Field(100, ge=1, description="Write a resumable checkpoint every this many steps.")
    log_every: int = Field(10, ge=1, description="Write a metrics line every this many steps.")
    seed: int = Field(0, description="Seeds the sample order; same seed + data = same run.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 = autocast with fp32 master weights; auto = bf16 on CUDA, fp32 elsewhere.")

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_steps >= self.steps and self.steps > 1:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be below steps={self.steps}")
        return self


class Target(Protocol):
    """What a run trains: its parameters and how a batch becomes logits."""

    def parameters(self) -> list[nn.Parameter]: ...

    def logits(self, input_ids: Tensor, lens: Tensor) -> Tensor: ...

    @property
    def device(self) -> torch.device: ...


def _full_batch(backbone: Backbone, input_ids: Tensor, lens: Tensor):
    b, t = input_ids.shape
    positions = torch.arange(t, device=backbone.device).expand(b, t)
    return backbone.attention_batch(positions, lens.to(backbone.device))


class ExpertTarget:
    """One expert on a frozen backbone. The expert need not be resident in the model."""

    def __init__(self, model: CCoEModel, expert: LoadedExpert):
        self.model, self.expert = model, expert
        model.backbone.requires_grad_(False)
        for p in expert.parameters():
            p.requires_grad_(True)

    def parameters(self) -> list[nn.Parameter]:
        return self.expert.parameters()

    @property
    def device(self) -> torch.device:
        return self.model.backbone.device

    def logits(self, input_ids: Tensor, lens: Tensor) -> Tensor:
        bb = self.model.backbone
        input_ids = input_ids.to(bb.device)
        group = RowGroup(self.expert, slice(0, input_ids.shape[0]))
        return bb(input_ids, _full_batch(bb, input_ids, lens), [group])


class FullTarget:
    """Every parameter of a backbone learns (the full fine-tune baselines)."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        backbone.requires_grad_(True)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def logits(self, input_ids: Tensor, lens: Tensor) -> Tensor:
        input_ids = input_ids.to(self.backbone.device)
        return self.backbone(input_ids, _full_batch(self.backbone, input_ids, lens))


@dataclass
class TrainResult:
    """What a run did, e.g. steps=300, final_train_loss=0.41, best_eval_loss=0.52."""

    steps: int
    tokens: int
    seconds: float
    final_train_loss: float | None
    final_eval_loss: float | None
    best_eval_loss: float | None
    best_step: int | None
    stopped_early: bool
    resumed_from: int | None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float | None = None  # the `score` of the kept weights, when the run had one
    final_score: float | None = None

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


def sample_index(seed: int, g: int, n: int, _cache: dict = {}) -> int:  # noqa: B006 - a tiny memo
    """The example used at global sample position g: epoch g // n is a seeded permutation."""
    epoch = g // n
    key = (seed, epoch, n)
    perm = _cache.get(key)
    if perm is None:
        if len(_cache) > 64:
            _cache.clear()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen).tolist()
        _cache[key] = perm
    return perm[g % n]


def _loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    # Position t predicts token t+1; only response tokens carry labels. At least fp32 (bf16
    # logits are upcast), never less than the model computes in (fp64 stays fp64).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1).to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _autocast(target: Target, precision: str):
    dev = target.device.type
    use_bf16 = precision == "bf16" or (precision == "auto" and dev == "cuda")
    if use_bf16:
        return torch.autocast(device_type=dev, dtype=torch.bfloat16)
    return torch.autocast(device_type=dev, enabled=False)


@torch.no_grad()
def eval_loss(target: Target, examples: Sequence[Example], pad_id: int, batch_size: int = 32,
              precision: str = "auto") -> float:
    """Mean cross entropy per response token over `examples` (the validation error ε)."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, labels, lens = collate(examples[i:i + batch_size], pad_id)
        with _autocast(target, precision):
            total += float(_loss_sum(target.logits(ids, lens), labels))
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / max(count, 1)


Batch = tuple[Tensor, Tensor, Tensor]  # (input_ids, labels, lens) as `collate` makes them


def accumulate_gradients(target: Target, micro: Sequence[Batch], precision: str = "auto") -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step, adding into `.grad`; returns the
    step's mean loss per response token and the tokens it read.

    The loss is normalised by the response tokens of the whole step, not of each micro-batch,
    so accumulating 4 + 4 examples gives the gradient of one batch of 8.
    """
    step_targets = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels, _ in micro)
    step_loss, tokens = 0.0, 0
    for ids, labels, lens in micro:
        with _autocast(target, precision):
            loss = _loss_sum(target.logits(ids, lens), labels) / max(step_targets, 1)
        loss.backward()
        step_loss += float(loss.detach())
        tokens += int(lens.sum())
    return step_loss, tokens


class _ProgressLine:
    """A progress bar on stderr: redrawn in place on a terminal, one line per log otherwise."""

    def __init__(self, label: str, total: int, quiet: bool):
        self.label, self.total, self.quiet = label, total, quiet
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, tok_s: float, lr: float, eval_loss: float | None, eta: float,
               force: bool = False) -> None:
        if self.quiet or not (self.tty or force):
            return
        width = 20
        filled = int(width * step / self.total)
        ev = f" eval {eval_loss:.3f}" if eval_loss is not None else ""
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} loss {loss:.3f}{ev} "
                f"lr {lr:.1e} {tok_s:,.0f} tok/s eta {eta:.0f}s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.quiet and self.tty:
            print(file=sys.stderr, flush=True)


def _save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, run_dir / CHECKPOINT_FILE)  # a reader never sees half a checkpoint


def fit(
    target: Target,
    train: Sequence[Example],
    config: TrainConfig,
    *,
    pad_id: int,
    eval_examples: Sequence[Example] = (),
    run_dir: str | Path | None = None,
    resume: bool = False,
    identity: dict[str, Any] | None = None,
    label: str = "train",
    quiet: bool = False,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    score: Callable[[], float] | None = None,
) -> TrainResult:
    """Train `target` on `train` for config.steps optimizer steps.

    run_dir holds checkpoint.pt and metrics.jsonl; with resume=True an existing checkpoint is
    continued from its step (refused if `identity` — e.g. the data hash and expert name —
    differs from the one it was written with). on_step(step, metrics) runs after every step
    (tests use it to interrupt a run).

    score: a quality to maximise, measured at every eval next to the eval loss (the zoo passes
    greedy exact-match accuracy on its eval problems). With it, the best weights are those of
    the highest score, the lower eval loss breaking ties: a lower loss does not always mean
    more right answers.
    """
    if not train:
        raise ValueError("no training examples")
    params = target.parameters()
    if not params:
        raise ValueError("the target has no parameters to train")
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and target.device.type == "cuda")
    if use_bf16:
        # fp32 master weights; autocast runs the matmuls in bf16.
        for p in params:
            p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    run_path = Path(run_dir) if run_dir is not None else None
    if run_path is not None:
        run_path.mkdir(parents=True, exist_ok=True)
    identity = dict(identity or {})

    start_step, best_eval, best_step, bad_evals, tokens = 0, math.inf, None, 0, 0
    best_score = -math.inf
    best_params: list[Tensor] | None = None
    resumed_from = None
    if resume and run_path is not None and (run_path / CHECKPOINT_FILE).exists():
        ck = torch.load(run_path / CHECKPOINT_FILE, map_location=target.device, weights_only=False)
        if ck["identity"] != identity:
            diff = sorted(k for k in set(ck["identity"]) | set(identity) if ck["identity"].get(k) != identity.get(k))
            raise ValueError(f"checkpoint in {run_path} belongs to another run (differs in {diff}); "
                             "use another run directory or drop --resume")
        if ck["config"] != config.model_dump(mode="json"):
            raise ValueError(f"checkpoint in {run_path} was written with other hyper-parameters; "
                             "resume with the same flags or start a new run directory")
        with torch.no_grad():
            for p, saved in zip(params, ck["params"], strict=True):
                p.copy_(saved)
        opt.load_state_dict(ck["optimizer"])
        start_step, best_eval, best_step = ck["step"], ck["best_eval"], ck["best_step"]
        bad_evals, tokens, best_params = ck["bad_evals"], ck["tokens"], ck["best_params"]
        best_score = ck.get("best_score", -math.inf)
        resumed_from = start_step
        log.info("resuming %s from step %d", label, start_step)

    def checkpoint(step: int) -> None:
        if run_path is None:
            return
        _save_checkpoint(run_path, {
            "step": step, "params": [p.detach().clone() for p in params], "optimizer": opt.state_dict(),
            "best_eval": best_eval, "best_step": best_step, "bad_evals": bad_evals, "tokens": tokens,
            "best_score": best_score,
            "best_params": best_params, "identity": identity, "config": config.model_dump(mode="json"),
        })

    metrics_file = (run_path / METRICS_FILE).open("a", encoding="utf-8") if run_path is not None else None
    history: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        history.append(row)
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    n = len(train)
    per_step = config.batch_size * config.grad_accum
    bar = _ProgressLine(label, config.steps, quiet)
    t0 = time.monotonic()
    window_loss, window_tokens, window_count, window_start = 0.0, 0, 0, time.monotonic()
    last_train_loss: float | None = None
    last_eval: float | None = None
    last_score: float | None = None
    stopped_early = False
    step = completed = start_step
    try:
        for step in range(start_step, config.steps):
            lr = lr_at(step, base_lr=config.lr, warmup=config.warmup_steps, total=config.steps,
                       min_ratio=config.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            micro = []
            for k in range(config.grad_accum):
                g0 = (step * config.grad_accum + k) * config.batch_size
                picked = [train[sample_index(config.seed, g, n)] for g in range(g0, g0 + config.batch_size)]
                micro.append(collate(picked, pad_id))
            step_loss, step_tokens = accumulate_gradients(target, micro, config.precision)
            tokens += step_tokens
            window_tokens += step_tokens
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = completed = step + 1
            window_loss += step_loss
            window_count += 1

            row: dict[str, Any] | None = None
            if eval_examples and (done % config.eval_every == 0 or done == config.steps):
                last_eval = eval_loss(target, eval_examples, pad_id, config.eval_batch_size, config.precision)
                if score is None:
                    improved = last_eval < best_eval - config.early_stop_min_delta
                else:
                    last_score = score()
                    improved = last_score > best_score or (
                        last_score == best_score and last_eval < best_eval - config.early_stop_min_delta)
                if improved:
                    best_eval, best_step, bad_evals = last_eval, done, 0
                    best_score = -math.inf if last_score is None else last_score
                    if config.restore_best:
                        best_params = [p.detach().clone() for p in params]
                else:
                    bad_evals += 1
                row = {"step": done, "eval_loss": last_eval}
                if last_score is not None:
                    row["eval_score"] = last_score
                if config.early_stop_patience and bad_evals >= config.early_stop_patience:
                    stopped_early = True
            if done % config.log_every == 0 or done == config.steps or stopped_early or row is not None:
                elapsed = max(time.monotonic() - window_start, 1e-9)
                last_train_loss = window_loss / max(window_count, 1)
                tok_s = window_tokens / elapsed
                row = {**(row or {}), "step": done, "loss": last_train_loss, "lr": lr, "tokens_per_s": tok_s,
                       "tokens": tokens, "examples": done * per_step}
                emit(dict(sorted(row.items())))
                eta = (time.monotonic() - t0) / max(done - start_step, 1) * (config.steps - done)
                bar.update(done, last_train_loss, tok_s, lr, last_eval, eta, force=True)
                window_loss, window_tokens, window_count, window_start = 0.0, 0, 0, time.monotonic()
            if done % config.checkpoint_every == 0 or done == config.steps or stopped_early:
                checkpoint(done)
            if on_step is not None:
                on_step(done, row or {"step": done})
            if stopped_early:
                step = done
                break
        else:
            step = config.steps
    except KeyboardInterrupt:
        # Keep what the finished steps learned; the run continues with resume.
        if completed > start_step:
            checkpoint(completed)
        raise
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()

    if config.restore_best and best_params is not None:
        with torch.no_grad():
            for p, best in zip(params, best_params, strict=True):
                p.copy_(best)
    return TrainResult(
        steps=step, tokens=tokens, seconds=time.monotonic() - t0, final_train_loss=last_train_loss,
        final_eval_loss=last_eval, best_eval_loss=None if best_step is None else best_eval, best_step=best_step,
        stopped_early=stopped_early, resumed_from=resumed_from, history=history,
        best_score=None if score is None or best_step is None else best_score, final_score=last_score,
    )
