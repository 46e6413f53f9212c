"""The expert trainer: the backbone never changes, runs resume exactly, and what it writes is
an artifact the model accepts."""

from __future__ import annotations

import json

import pytest
import torch

from ccoe_common.model import CCoEModel, Placement
from ccoe_common.training.data import IGNORE_INDEX, collate, read_records, tokenize_all
from ccoe_common.training.expert_run import start_expert, train_expert
from ccoe_common.training.trainer import ExpertTarget, FullTarget, TrainConfig, accumulate_gradients, eval_loss, fit

TINY = {"batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_every": 2, "log_every": 1, "max_seq_len": 128}


class Interrupt(Exception):
    pass


def _examples(model, records_file, n=None):
    ds = read_records(records_file, model.tokenizer)
    ex, _ = tokenize_all(ds.records[:n] if n else ds.records, model.tokenizer, 128)
    return ds, ex


def test_backbone_bit_identical_and_gradient_free_after_training(model, records_file, tmp_path):
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    expert = start_expert(model, name="add", placement=Placement.parse("GL:1"))
    expert_before = [p.clone() for p in expert.parameters()]
    seen_backbone_grads = []

    def probe(step, row):
        seen_backbone_grads.extend(n for n, p in model.backbone.named_parameters() if p.grad is not None)

    ds = read_records(records_file, model.tokenizer)
    train_expert(model, expert, ds, None, TrainConfig(steps=3, **TINY), out_uri=str(tmp_path / "add"), on_step=probe,
                 quiet=True)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())
    assert seen_backbone_grads == []
    # ...while the expert did learn.
    assert any(not torch.equal(a, b) for a, b in zip(expert_before, expert.parameters(), strict=True))


def test_output_is_a_valid_artifact_with_training_metadata(model, qwen2_dir, records_file, tmp_path):
    ds = read_records(records_file, model.tokenizer)
    expert = start_expert(model, name="add", placement=Placement.parse("GL:1"), domains=["math"])
    run = train_expert(model, expert, ds, None, TrainConfig(steps=2, **TINY), out_uri=str(tmp_path / "v1"), quiet=True)
    manifest = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    assert manifest["training"]["data_sha256"] == ds.sha256
    assert manifest["training"]["steps"] == 2 and manifest["training"]["started_from"] == "backbone"
    assert manifest["training"]["final_train_loss"] > 0 and manifest["domains"] == ["math"]

    fresh = CCoEModel.from_pretrained(qwen2_dir)
    key = fresh.push(str(tmp_path / "v1"))
    assert str(key) == "add@1"
    # The pushed expert computes what the trained one computed.
    ids = torch.tensor([fresh.tokenizer("Add 1 and 2.").input_ids])
    with torch.no_grad():
        trained = ExpertTarget(model, expert).logits(ids, torch.tensor([ids.shape[1]]))
    assert torch.equal(fresh.forward(ids, fresh.resolve(["add"])), trained)

    # Continual training: pop (load a deep copy), train, push as version 2.
    copy = start_expert(fresh, from_uri=str(tmp_path / "v1"))
    run2 = train_expert(fresh, copy, ds, None, TrainConfig(steps=2, **TINY), out_uri=str(tmp_path / "v2"),
                        continued_from=str(tmp_path / "v1"), quiet=True)
    assert run2.manifest.version == 2 and run.manifest.version == 1
    assert run2.manifest.training["started_from"].startswith("add@1")
    assert str(fresh.push(str(tmp_path / "v2"))) == "add@2"
    # Training the copy did not touch the resident v1.
    assert torch.equal(fresh.forward(ids, fresh.resolve(["add@1"])), trained)


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(qwen2_dir, records_file, tmp_path):
    config = TrainConfig(steps=6, checkpoint_every=3, **TINY)

    def run(run_dir, stop_at=None, resume=False):
        model = CCoEModel.from_pretrained(qwen2_dir)
        expert = model.carve("add", placement=Placement.parse("GL:1"))
        _, ex = _examples(model, records_file)

        def hook(step, row):
            if step == stop_at:
                raise Interrupt

        try:
            result = fit(ExpertTarget(model, expert), ex[:30], config, pad_id=0, eval_examples=ex[30:],
                         run_dir=run_dir, resume=resume, identity={"t": 1}, on_step=hook, quiet=True)
        except Interrupt:
            return None, expert
        return result, expert

    full, expert_full = run(tmp_path / "a")
    assert run(tmp_path / "b", stop_at=4)[0] is None  # dies after step 4; last checkpoint is step 3
    resumed, expert_resumed = run(tmp_path / "b", resume=True)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    for a, b in zip(expert_full.parameters(), expert_resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.best_eval_loss == full.best_eval_loss
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [1, 2, 3, 4, 4, 5, 6]  # step 4 ran twice: once before the crash, once after resume


def test_resume_refuses_another_runs_checkpoint(model, records_file, tmp_path):
    expert = model.carve("add", placement=Placement.parse("GL:1"))
    _, ex = _examples(model, records_file)
    config = TrainConfig(steps=1, **TINY)
    fit(ExpertTarget(model, expert), ex, config, pad_id=0, run_dir=tmp_path, identity={"data": "a"}, quiet=True)
    with pytest.raises(ValueError, match=r"belongs to another run \(differs in \['data'\]\)"):
        fit(ExpertTarget(model, expert), ex, config, pad_id=0, run_dir=tmp_path, resume=True,
            identity={"data": "b"}, quiet=True)


def test_gradient_accumulation_equals_one_big_batch(qwen2_dir, records_file):
    # float64, so the two summation orders (one batch of 8 padded to its longest example vs two
    # of 4 padded to theirs, then added) agree to ~1e-16 of the terms summed on any CPU kernel;
    # the normalisation bug this guards against (dividing by each micro-batch's own response
    # tokens) is off by a factor of about 2.
    model = CCoEModel.from_pretrained(qwen2_dir, dtype=torch.float64)
    target = ExpertTarget(model, model.carve("add", placement=Placement.parse("GL:1")))
    _, ex = _examples(model, records_file)
    batch = ex[:8]

    def gradient(micro_batches):
        for p in target.parameters():
            p.grad = None
        accumulate_gradients(target, [collate(m, 0) for m in micro_batches], "fp32")
        return torch.cat([p.grad.flatten() for p in target.parameters()])

    one_batch, accumulated = gradient([batch]), gradient([batch[:4], batch[4:]])
    # Each element is a sum over examples; |term| per example bounds what the rounding of a
    # reordered sum can change: n float64 roundings per term, n = the longest reduction in the
    # forward and backward (every response token of the step, times the widest layer).
    responses = [sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in batch]
    terms = sum(gradient([[e]]).abs() * n for e, n in zip(batch, responses, strict=True)) / sum(responses)
    n = sum(len(e.input_ids) for e in batch) * max(model.config.hidden_size, model.config.intermediate_size)
    tolerance = n * torch.finfo(torch.float64).eps * terms
    assert (one_batch - accumulated).abs().le(tolerance).all()
    # The bound is tight enough to see the bug: per-micro-batch normalisation doubles the gradient.
    assert not (one_batch - 2 * accumulated).abs().le(tolerance).all()


def test_early_stop_and_best_weights(model, records_file):
    expert = model.carve("add", placement=Placement.parse("GL:1"))
    _, ex = _examples(model, records_file)
    target = ExpertTarget(model, expert)
    # No eval can beat the best by 100 nats: the second eval is the first "no improvement".
    config = TrainConfig(steps=20, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=1, early_stop_patience=1,
                         early_stop_min_delta=100.0, max_seq_len=128)
    result = fit(target, ex[:30], config, pad_id=0, eval_examples=ex[30:], quiet=True)
    assert result.stopped_early and result.steps == 2 and result.best_step == 1
    assert result.final_eval_loss != result.best_eval_loss
    # The best (step 1) weights are restored.
    assert eval_loss(target, ex[30:], 0) == pytest.approx(result.best_eval_loss, abs=1e-6)


def test_a_score_picks_the_weights_kept(model, records_file):
    expert = model.carve("add", placement=Placement.parse("GL:1"))
    _, ex = _examples(model, records_file)
    target = ExpertTarget(model, expert)
    scores, kept = iter([0.25, 0.75, 0.5, 0.75]), {}

    def score():
        kept[len(kept) + 1] = [p.detach().clone() for p in expert.parameters()]
        return next(scores)

    config = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=1, max_seq_len=128)
    result = fit(target, ex[:30], config, pad_id=0, eval_examples=ex[30:], quiet=True, score=score)
    # The highest score wins whatever the eval loss says; a tie keeps the earlier unless its loss is beaten.
    assert result.best_score == 0.75 and result.final_score == 0.75
    assert result.best_step in (2, 4)
    assert all(torch.equal(a, b) for a, b in zip(kept[result.best_step], expert.parameters(), strict=True))
    assert [row["eval_score"] for row in result.history if "eval_score" in row] == [0.25, 0.75, 0.5, 0.75]


def test_full_target_trains_every_parameter(model, records_file):
    import copy

    backbone = copy.deepcopy(model.backbone)
    before = [p.clone() for p in backbone.parameters()]
    _, ex = _examples(model, records_file, 8)
    fit(FullTarget(backbone), ex, TrainConfig(steps=1, batch_size=4, warmup_steps=0, max_seq_len=128), pad_id=0,
        quiet=True)
    changed = [not torch.equal(a, b) for a, b in zip(before, backbone.parameters(), strict=True)]
    assert all(changed)
    assert all(not p.requires_grad for p in model.backbone.parameters())  # the model's own copy stays frozen


def test_bf16_precision_keeps_fp32_master_weights(model, records_file):
    expert = model.carve("add", placement=Placement.parse("GL:1"))
    _, ex = _examples(model, records_file, 8)
    result = fit(ExpertTarget(model, expert), ex, TrainConfig(steps=2, batch_size=4, warmup_steps=1, precision="bf16",
                                                               max_seq_len=128), pad_id=0, quiet=True)
    assert result.final_train_loss is not None and all(p.dtype == torch.float32 for p in expert.parameters())
