"""Sampling stays finite for every value validation accepts (issue #15, item 2).

`temperature: 1e-45` (or 1e-38) and `repetition_penalty: 1e-45` with `temperature: 0.7` used
to make a row's probabilities NaN and fail its whole engine step. These tests draw accepted
parameters from the edges of their ranges and logits from several shapes (ordinary, near
fp32's limits, mostly -inf, all tied) and check that a token is always chosen, that it is one
the parameters allow, and that a row gets it alone or in any batch.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccoe_common.engine.params import MIN_TEMPERATURE, SamplingParams
from ccoe_common.engine.sampler import (
    NonFiniteLogits,
    RowSampling,
    _penalize,
    make_generator,
    sample,
)

CPU = torch.device("cpu")
FP32_MAX = torch.finfo(torch.float32).max

TEMPERATURES = [0.0, 1e-46, 1e-45, 1e-38, MIN_TEMPERATURE, 1e-37, 1e-30, 1e-5, 0.7, 1.0, 10.0]
TOP_PS = [1e-46, 1e-45, 1e-38, 1e-6, 0.5, 0.95, 1.0 - 1e-9, 1.0]
TOP_KS = [0, 1, 2, 49, 50, 51, 1024, 1025, 100_000]
PENALTIES = [1e-45, 1e-38, 1e-3, 0.5, 1.0, 1.3, 10.0]
FAMILIES = ["normal", "huge", "huge-negative", "masked", "tied", "extremes"]


def make_logits(family: str, vocab: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """One row [1, V] of finite (or -inf) logits of the given shape."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(vocab, generator=gen)
    if family == "normal":
        x = x * 3
    elif family == "huge":  # near fp32's (and bf16's) largest values
        x = x * 5e37
    elif family == "huge-negative":  # everything far below 0: x / tiny temperature is -inf everywhere
        x = -3e38 + x.abs() * 1e36
    elif family == "masked":  # most tokens forbidden
        keep = torch.rand(vocab, generator=gen) < 0.05
        keep[int(torch.randint(vocab, (1,), generator=gen))] = True
        x = torch.where(keep, x * 3, torch.tensor(float("-inf")))
    elif family == "tied":
        x = torch.zeros(vocab)
        x[: max(2, vocab // 10)] = 1.0
    elif family == "extremes":  # the dtype's largest finite values, both signs
        big = torch.finfo(dtype).max
        x = torch.where(x > 0, torch.tensor(big), torch.tensor(-big))
    return x.to(dtype)[None, :]


def penalized(logits: torch.Tensor, r: RowSampling) -> torch.Tensor:
    y = logits[0].to(torch.float32, copy=True)
    _penalize(y, r)
    return y


def row_for(params: SamplingParams, seen: list[int] | None) -> RowSampling:
    return RowSampling(params, make_generator(params, CPU), None if seen is None else torch.tensor(seen))


@st.composite
def cases(draw):
    vocab = draw(st.sampled_from([50, 3000]))  # 3000: top-p rows can go past the 1024 candidates
    family = draw(st.sampled_from(FAMILIES))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    penalty = draw(st.sampled_from(PENALTIES))
    seen = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=20)) if penalty != 1.0 else None
    params = SamplingParams.create(
        temperature=draw(st.sampled_from(TEMPERATURES)), top_p=draw(st.sampled_from(TOP_PS)),
        top_k=draw(st.sampled_from(TOP_KS)), repetition_penalty=penalty, seed=draw(st.integers(0, 2**63 - 1)),
        logprobs=draw(st.booleans()))
    return make_logits(family, vocab, draw(st.integers(0, 1000)), dtype), params, seen


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_accepted_parameter_set_chooses_an_allowed_token(case):
    logits, params, seen = case
    vocab = logits.shape[-1]
    tokens, lps = sample(logits, [row_for(params, seen)])
    tok = tokens[0]
    assert 0 <= tok < vocab
    pen = penalized(logits, row_for(params, seen))
    assert bool(pen.isfinite().any()) and pen[tok] > float("-inf"), "a forbidden token was chosen"
    if params.greedy:
        assert tok == int(pen.argmax())
    elif params.temperature <= 1e-30:  # every other token is below e^-100 of the best
        assert pen[tok] == pen.max()
    if params.top_k and params.top_k < vocab:
        assert pen[tok] >= torch.topk(pen, params.top_k).values[-1]
    if params.top_p < torch.finfo(torch.float32).tiny:  # nothing but the best token reaches it
        assert pen[tok] == pen.max()
    if params.logprobs:
        assert not math.isnan(lps[0]) and lps[0] <= 0
    else:
        assert lps[0] is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.integers(0, 3))
def test_an_extreme_row_draws_the_same_alone_or_beside_ordinary_rows(case, position):
    logits, params, seen = case
    vocab = logits.shape[-1]
    alone = sample(logits, [row_for(params, seen)])[0][0]
    gen = torch.Generator().manual_seed(vocab)
    neighbours = [SamplingParams.create(), SamplingParams.create(temperature=0.8, seed=1),
                  SamplingParams.create(temperature=0.7, top_p=0.9, seed=2),
                  SamplingParams.create(temperature=1.2, top_k=20, repetition_penalty=1.3, seed=3)]
    batch = torch.cat([(torch.randn(len(neighbours), vocab, generator=gen) * 3).to(logits.dtype)])
    batch = torch.cat([batch[:position], logits, batch[position:]])
    rows = [row_for(p, [1, 2] if p.repetition_penalty != 1.0 else None) for p in neighbours]
    rows.insert(position, row_for(params, seen))
    assert sample(batch, rows)[0][position] == alone


@pytest.mark.parametrize("kw", [
    {"temperature": 1e-45}, {"temperature": 1e-38}, {"temperature": 1e-45, "top_p": 0.9},
    {"temperature": 0.7, "repetition_penalty": 1e-45}, {"temperature": 1e-38, "repetition_penalty": 1e-45},
    {"temperature": 0.7, "repetition_penalty": 1e-45, "top_k": 5},
])
def test_the_values_of_issue_15_choose_a_token(kw):
    """The reported values, on logits like a trained model's (bf16, 151,936 tokens)."""
    gen = torch.Generator().manual_seed(15)
    logits = (torch.randn(3, 151_936, generator=gen) * 3).bfloat16()
    params = SamplingParams.create(seed=5, logprobs=True, **kw)
    seen = torch.arange(0, 151_936, 7)  # a long history, as a penalty sees mid-stream
    tokens, lps = sample(logits, [RowSampling(params, make_generator(params, CPU), seen) for _ in range(3)])
    assert all(0 <= t < 151_936 for t in tokens) and all(math.isfinite(lp) for lp in lps)
    if params.greedy and params.repetition_penalty == 1.0:
        assert tokens == [int(r.float().argmax()) for r in logits]
    if kw.get("repetition_penalty") == 1e-45:  # the best seen token wins outright (ties: any of them)
        assert all(t % 7 == 0 and logits[i, t] == logits[i, seen].max() for i, t in enumerate(tokens))


def test_a_temperature_below_the_least_normal_float_is_greedy():
    assert SamplingParams.create(temperature=1e-45).greedy and SamplingParams.create(temperature=1e-38).greedy
    assert not SamplingParams.create(temperature=MIN_TEMPERATURE).greedy
    assert make_generator(SamplingParams.create(temperature=1e-45, seed=1), CPU) is None


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.8, "seed": 0}, {"temperature": 0.8, "seed": 0, "top_p": 0.9},
                                {"temperature": 0.8, "seed": 0, "top_k": 3}, {"repetition_penalty": 1.5}])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all -inf"])
def test_logits_that_are_not_finite_raise_for_greedy_and_sampled_rows(kw, bad):
    logits = torch.randn(1, 10)
    if bad == "all -inf":
        logits[:] = float("-inf")
    else:
        logits[0, 4] = bad
    r = RowSampling(SamplingParams.create(**kw), None, torch.tensor([1, 4]))
    r.generator = make_generator(r.params, CPU)
    with pytest.raises(NonFiniteLogits, match="not finite"):
        sample(logits, [r])
