"""Sampling parameters: validation, and what each one does to the choice."""

from __future__ import annotations

import pytest
import torch

from ccoe_common.engine.params import SamplingParams
from ccoe_common.engine.sampler import RowSampling, make_generator, sample
from ccoe_common.errors import InvalidRequest


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
    specs = [{}, {}, {"logprobs": True}, {"temperature": 0.7, "seed": 5}, {},
             {"temperature": 0.7, "seed": 6, "logprobs": True}]
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


def _freqs(logits: torch.Tensor, n: int, **kw) -> torch.Tensor:
    r = row(seed=11, **kw)
    counts = torch.zeros(logits.shape[-1])
    for _ in range(n):
        counts[sample(logits, [r])[0][0]] += 1
    return counts / n


def test_draws_follow_the_processed_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # temperature 1: the distribution itself
    assert torch.allclose(_freqs(logits, 3000, temperature=1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    # top_p 0.7: 0.5 and 0.3 (the tokens above 0.3 hold only 0.5 < 0.7), renormalised
    assert torch.allclose(_freqs(logits, 3000, temperature=1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]),
                          atol=0.03)
    # top_k 3: the three best, renormalised
    assert torch.allclose(_freqs(logits, 3000, temperature=1.0, top_k=3), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95,
                          atol=0.03)


@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_a_nucleus_wider_than_the_candidates_is_still_exact(top_p, monkeypatch):
    from ccoe_common.engine import sampler

    # 12,000 equally likely tokens hold all but ~1e-9 of the mass. top_p 0.5 keeps 6,000 of them,
    # 0.9 keeps 10,800: far more than the candidates, so the row draws by its nucleus' threshold.
    logits = torch.full((1, 20000), -30.0)
    logits[0, 4000:16000] = 0.0
    nucleus_rows = []
    real = sampler._draw_nucleus

    def spy(probs, top_p, u):
        nucleus_rows.append(probs.shape[0])
        return real(probs, top_p, u)

    monkeypatch.setattr(sampler, "_draw_nucleus", spy)
    drawn = [sample(logits, [row(temperature=1.0, top_p=top_p, seed=s)])[0][0] for s in range(200)]
    assert nucleus_rows == [1] * 200
    assert set(drawn) <= set(range(4000, 16000)) and len(set(drawn)) > 150
    # the draws spread over the nucleus, not only over the first candidates
    assert max(drawn) - min(drawn) > 3000


def _sorted_nucleus(probs: torch.Tensor, top_p: float, slack: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted top-p rule, in float64: (tokens it keeps, tokens it drops), leaving out the
    tokens whose better-ranked mass is within `slack` of top_p (fp32 rounding decides those)."""
    values, ids = probs.sort(descending=True)
    above = values.double().cumsum(0) - values.double()
    kept, dropped = torch.zeros_like(probs, dtype=torch.bool), torch.zeros_like(probs, dtype=torch.bool)
    kept[ids[above < top_p - slack]] = True
    dropped[ids[above >= top_p + slack]] = True
    return kept, dropped


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 8.0])
def test_the_nucleus_threshold_keeps_what_sorting_keeps(scale):
    from ccoe_common.engine.sampler import _nucleus_threshold

    gen = torch.Generator().manual_seed(int(scale * 10))
    probs = torch.softmax(torch.randn(6, 30000, generator=gen) * scale, dim=-1)
    top_p = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
    threshold = _nucleus_threshold(probs.clone(), top_p)
    for r in range(len(top_p)):
        got = probs[r] >= threshold[r]
        kept, dropped = _sorted_nucleus(probs[r], float(top_p[r]))
        assert bool(got[kept].all()) and not bool(got[dropped].any()), f"row {r}, top_p {float(top_p[r])}"
    # and the threshold of one row does not depend on the rows beside it
    for r in range(len(top_p)):
        assert torch.equal(_nucleus_threshold(probs[r:r + 1].clone(), top_p[r:r + 1]), threshold[r:r + 1])


def test_a_top_p_just_below_one_keeps_every_token():
    from ccoe_common.engine.sampler import _nucleus_threshold

    probs = torch.softmax(torch.randn(2, 5000, generator=torch.Generator().manual_seed(3)), dim=-1)
    threshold = _nucleus_threshold(probs, torch.tensor([1.0 - 1e-9, 1.0 - 1e-9]))
    assert bool((probs >= threshold[:, None]).all())


@pytest.mark.parametrize("vocab", [50, 5000])
def test_a_seeded_row_draws_the_same_tokens_alone_or_in_any_batch(vocab):
    # What a row gets may depend only on its logits, parameters and generator: never on how
    # many rows share the step or what they ask for.
    gen = torch.Generator().manual_seed(vocab)
    specs = [{"temperature": 0.8, "seed": 1}, {"temperature": 0.8, "top_p": 0.9, "seed": 2},
             {"temperature": 1.3, "top_k": 40, "seed": 3}, {"temperature": 0.5, "top_k": 20, "top_p": 0.8, "seed": 4},
             {}, {"temperature": 0.9, "seed": 5, "logprobs": True}, {"temperature": 1.0, "top_p": 0.95, "seed": 6},
             {"temperature": 4.0, "top_p": 0.95, "seed": 7}]  # flat: at vocab 5000, a nucleus beyond the candidates
    steps = [(torch.randn(len(specs), vocab, generator=gen) * 3).bfloat16() for _ in range(8)]
    batch_rows = [row(**kw) for kw in specs]
    together = [sample(logits, batch_rows)[0] for logits in steps]
    for i, kw in enumerate(specs):
        alone_row = row(**kw)
        alone = [sample(logits[i:i + 1], [alone_row])[0][0] for logits in steps]
        assert alone == [t[i] for t in together], f"row {i} {kw}"
    # the sampled rows really sample: over 8 steps they do not all repeat one token
    assert len({t[1] for t in together}) > 1


@pytest.mark.parametrize("kw", [{}, {"top_p": 0.9}, {"top_k": 3}])
def test_non_finite_logits_are_named_when_sampling(kw):
    logits = torch.full((1, 10), float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        sample(logits, [row(temperature=0.8, seed=0, **kw)])
