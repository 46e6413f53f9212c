"""Sampling parameters: validation, and what each one does to the choice."""

from __future__ import annotations

import pytest
import torch

from ccoe_common.engine.errors import InvalidRequest
from ccoe_common.engine.params import SamplingParams
from ccoe_common.engine.sampler import RowSampling, make_generator, sample


def row(**kw) -> RowSampling:
    p = SamplingParams.create(**kw)
    return RowSampling(p, make_generator(p, torch.device("cpu")), None)


LOGITS = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])


@pytest.mark.parametrize(("kwargs", "param", "allowed"), [
    ({"temperature": -0.1}, "temperature", "[0, 10]"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"top_k": -1}, "top_k", "[0, 100000]"),
    ({"repetition_penalty": 0}, "repetition_penalty", "(0, 10]"),
    ({"max_new_tokens": 0}, "max_new_tokens", "[1, 1000000]"),
    ({"seed": -5}, "seed", "[0, 2^63)"),
    ({"stop": [""]}, "stop", "non-empty"),
    ({"nucleus": 0.5}, "nucleus", "Extra inputs"),
])
def test_invalid_parameters_name_the_parameter_and_range(kwargs, param, allowed):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams.create(**kwargs)
    assert err.value.param == param and err.value.code == "INVALID_ARGUMENT"
    assert str(err.value).startswith(f"{param}: ") and allowed in str(err.value)
    assert repr(next(iter(kwargs.values()))) in str(err.value) or param == "nucleus"


def test_greedy_takes_argmax_and_reports_raw_logprob():
    tokens, lps = sample(LOGITS, [row(logprobs=True)])
    assert tokens == [1]
    assert lps[0] == pytest.approx(float(torch.log_softmax(LOGITS[0], -1)[1]))


def test_same_seed_same_tokens_other_seed_differs():
    logits = torch.zeros(1, 50)

    def draws(seed: int) -> list[int]:
        r = row(temperature=1.0, seed=seed)
        return [sample(logits, [r])[0][0] for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8) and len(set(draws(7))) > 5


def test_top_k_one_and_tiny_top_p_are_greedy():
    for kw in ({"top_k": 1}, {"top_p": 0.01}):
        r = row(temperature=5.0, seed=0, **kw)
        assert {sample(LOGITS, [r])[0][0] for _ in range(30)} == {1}


def test_top_k_two_only_draws_the_two_best():
    r = row(temperature=10.0, top_k=2, seed=1)
    assert {sample(LOGITS, [r])[0][0] for _ in range(60)} == {1, 2}


def test_repetition_penalty_follows_the_sign_of_the_logit():
    seen = torch.tensor([1, 3])
    p = SamplingParams.create(repetition_penalty=2.0)
    # token 1: 3.0 -> 1.5, below token 2 (2.9); token 3: -1.0 -> -2.0
    assert sample(LOGITS, [RowSampling(p, None, seen)])[0] == [2]


def test_rows_use_their_own_parameters():
    logits = LOGITS.repeat(2, 1)
    tokens, lps = sample(logits, [row(), row(temperature=10.0, top_k=2, seed=3, logprobs=True)])
    assert tokens[0] == 1 and tokens[1] in (1, 2) and lps[0] is None and lps[1] is not None


def test_all_greedy_rows_each_take_their_own_argmax():
    logits = torch.stack([LOGITS[0], LOGITS[0].flip(0), -LOGITS[0]])
    tokens, _ = sample(logits, [row(), row(), row()])
    assert tokens == [int(r.argmax()) for r in logits]


def test_half_precision_logits_choose_as_fp32_does_in_a_mixed_batch():
    # bf16 logits with exact ties (the first maximum wins) and rows that need fp32 (logprobs,
    # sampling) mixed with plain greedy ones: each row as if sampled alone from fp32 logits.
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 1000, generator=gen) * 4).bfloat16()
    logits[1, 10] = logits[1, 20] = logits[1].max() + 1  # a tie: index 10 must win
    specs = [{}, {}, {"logprobs": True}, {"temperature": 0.7, "seed": 5}, {}, {"temperature": 0.7, "seed": 6, "logprobs": True}]
    tokens, lps = sample(logits, [row(**kw) for kw in specs])
    wide = logits.float()
    for i, kw in enumerate(specs):
        alone, alone_lp = sample(wide[i:i + 1], [row(**kw)])
        assert tokens[i] == alone[0], f"row {i}"
        assert (lps[i] is None) == (alone_lp[0] is None)
        if lps[i] is not None:
            assert lps[i] == pytest.approx(alone_lp[0], abs=1e-6)
    assert tokens[1] == 10
    assert tokens[0] == int(wide[0].argmax()) and tokens[4] == int(wide[4].argmax())
