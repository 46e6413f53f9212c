"""Greedy generation equals transformers' generate, token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ccoe_common.model import CCoEModel, Placement
from ccoe_common.model.generate import greedy_generate
from tests.helpers import nudge


@pytest.mark.parametrize("variant", ["qwen2-gqa-bias", "llama-mha-bias-tied", "llama-gqa-nobias", "mistral-headdim"])
def test_greedy_equals_transformers_generate(checkpoints, variant):
    path = checkpoints[variant]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = CCoEModel.from_pretrained(path)
    prompt = ours.tokenizer("Compute 12 + 7 and 144 / 12.", add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                               eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
    got = greedy_generate(ours, prompt, 24, stop_token_ids=[2])
    assert got.token_ids == expected
    assert len(set(expected)) > 1  # not one repeated token, so order matters


def test_stops_on_stop_token_and_reports_why(qwen2_dir):
    ours = CCoEModel.from_pretrained(qwen2_dir)
    prompt = [5, 6, 7]
    free = greedy_generate(ours, prompt, 10, stop_token_ids=[])
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    stopped = greedy_generate(ours, prompt, 10, stop_token_ids=[stop_at])
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:first + 1]


def test_expert_generation_is_pinned_to_one_version(deep_qwen2_dir):
    ours = CCoEModel.from_pretrained(deep_qwen2_dir)
    ours.push(nudge(ours.carve("math", placement=Placement(num_layers=2)), 1, scale=0.3))
    prompt = [10, 20, 30, 40]
    on_expert = greedy_generate(ours, prompt, 12, expert="math", stop_token_ids=[])
    on_backbone = greedy_generate(ours, prompt, 12, stop_token_ids=[])
    assert on_expert.token_ids != on_backbone.token_ids


def test_bad_arguments_are_refused(qwen2_dir):
    ours = CCoEModel.from_pretrained(qwen2_dir)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        greedy_generate(ours, [1, 2], 0)
    with pytest.raises(ValueError, match="at least one token"):
        greedy_generate(ours, [], 3)
