"""`ccoe bench throughput` end to end on the toy shape with toy workloads: real engines, real
transformers and peft models, real generation. Structure and byte orderings only; no timings
(the machine is shared and a toy shape says nothing about speed).
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from ccoe_common.bench.throughput import BATCH_SYSTEMS, SEQ_SYSTEMS
from ccoe_common.cli.main import main

TOY = ["--shape", "tiny", "--seq-rounds", "1", "--seq-prompt", "8", "--seq-new", "3",
       "--batch-rounds", "1", "--batch-requests", "7", "--batch-prompt", "12", "--batch-new", "3",
       "--hf-requests", "2"]


@pytest.fixture(scope="module")
def report() -> dict:
    # One run (~15 s) serves every test here; capsys is function-scoped, so capture by hand.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["bench", "throughput", *TOY, "--json", "--quiet"])
    assert code == 0
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    assert len(lines) == 1, f"--json must print exactly one line, got {lines!r}"
    return json.loads(lines[0])


@pytest.mark.slow
def test_every_system_measured(report: dict) -> None:
    assert report["shape"] == "tiny"
    assert [r["system"] for r in report["sequential"]] == list(SEQ_SYSTEMS)
    assert [r["system"] for r in report["batched"]] == list(BATCH_SYSTEMS)
    for row in [*report["sequential"], *report["batched"]]:
        assert row["tokens_per_s"] > 0, row
        assert isinstance(row["weight_bytes_per_step"], int) and row["weight_bytes_per_step"] > 0, row


@pytest.mark.slow
def test_every_system_generated_the_same_tokens(report: dict) -> None:
    seq = {r["system"]: r["tokens"] for r in report["sequential"]}
    assert set(seq.values()) == {1 * 5 * 3}, seq  # rounds x domains x new tokens
    bat = {r["system"]: r["tokens"] for r in report["batched"]}
    assert bat.pop("hf_sequential") == 2 * 3
    assert set(bat.values()) == {7 * 3}, bat


@pytest.mark.slow
def test_weight_bytes_ordering(report: dict) -> None:
    b = {r["system"]: r["weight_bytes_per_step"] for r in report["batched"]}
    assert b["ensemble"] > b["ccoe_mixed"] > b["backbone"]
    assert b["hf_sequential"] == b["backbone"]
    assert b["backbone"] < b["peft_lora"] < b["ccoe_mixed"]  # rank-16 adapters are smaller than experts
    # 7 requests over 5 domains: every expert active, and each one within the 15% budget.
    expert = report["model"]["expert_fraction"]
    assert 0 < expert <= 0.15
    assert b["ccoe_mixed"] == pytest.approx(b["backbone"] * (1 + 5 * expert), rel=0.01)
    assert b["ensemble"] == 5 * b["backbone"]
    s = {r["system"]: r["weight_bytes_per_step"] for r in report["sequential"]}
    assert s["ccoe"] == s["backbone"] == s["ensemble"]


@pytest.mark.slow
def test_ratios_reported_against_targets(report: dict) -> None:
    ratios = {r["name"]: r for r in report["ratios"]}
    for name, target in [("A: ccoe / backbone", 0.95), ("A: ccoe / peft_lora", 2.0),
                         ("B: mixing efficiency", 0.90), ("B: ccoe_mixed / ensemble", 2.0),
                         ("B: ccoe_mixed / hf_sequential", 3.0)]:
        assert ratios[name]["target"] == target
        assert ratios[name]["value"] > 0
        assert ratios[name]["passed"] == (ratios[name]["value"] >= target)


@pytest.mark.slow
def test_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "throughput", *TOY, "--seq-new", "2", "--batch-new", "2", "--batch-requests", "5",
                 "--hf-requests", "1", "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    for name in ("ccoe_mixed", "hf_sequential", "peft_lora", "mixing efficiency", "tokens/s"):
        assert name in text


def test_the_baselines_head_on_rows_gives_the_same_logits(qwen2_dir, monkeypatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from ccoe_common.bench.throughput import head_on_rows

    model = AutoModelForCausalLM.from_pretrained(str(qwen2_dir), dtype=torch.bfloat16).eval()
    ids = torch.randint(3, model.config.vocab_size, (3, 9))
    with torch.inference_mode():
        last = model(input_ids=ids, logits_to_keep=1).logits  # the head gets a strided [B, 1, D] slice
        every = model(input_ids=ids).logits
        head_on_rows(model)
        assert torch.equal(model(input_ids=ids, logits_to_keep=1).logits, last)
        assert torch.equal(model(input_ids=ids).logits, every)
        head = model.get_output_embeddings()
        hidden = torch.randn(3, 9, head.in_features, dtype=torch.bfloat16)[:, -1:, :]
        monkeypatch.setattr(torch.nn.Linear, "forward", lambda *a: pytest.fail("the head still takes nn.Linear's path"))
        assert head(hidden).shape == (3, 1, head.out_features)
