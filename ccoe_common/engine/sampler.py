"""Choosing the next token for every row of a step, each row with its own parameters.

Order of processing, as in transformers: repetition penalty, temperature, top-k, top-p, then
a draw from the row's own torch.Generator (seeded per request, so a seeded request gets the
same tokens whatever else shares its batch). Greedy rows take the argmax of the penalised
logits. Log-probabilities are those of the model's raw distribution (before any processing).

Sampled rows are processed together, one tensor op per stage, and draw by inverting their
cumulative distribution with one uniform number from their own generator. What a row gets
depends only on its own logits, parameters and generator: the truncation to top-k / top-p
works on a fixed number of candidates per row, or on the row's whole vocabulary, never on a
size set by other rows.

Every value validation accepts is computed without overflow (params.py states the ranges):
a temperature below 2^-126 decodes greedily (`SamplingParams.greedy`); a repetition penalty
that would push a seen logit past fp32's range is eased for that row and step to the factor
that keeps the largest one finite (the seen logits keep their order); a row whose
logits over the temperature overflow (temperature 1e-30, say) is scaled after subtracting its
maximum, which leaves its most likely tokens at 0 and the rest at or near -inf. Only logits
that are not finite to begin with (NaN, +inf, or every token -inf) raise `NonFiniteLogits`, and
only for the rows that hold them: the engine then samples each row alone to find them.

Shape legend: B = rows, V = vocab, S = sampled rows, C = candidates per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ccoe_common.engine.params import SamplingParams

_FP32_MAX = torch.finfo(torch.float32).max


class NonFiniteLogits(ValueError):
    """A row's logits hold NaN or +inf, or no finite value: no token has a finite positive
    probability. Raised before the row's token is chosen."""


@dataclass
class RowSampling:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    seen: Tensor | None  # token ids seen so far (prompt + output), only with a repetition penalty


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(logits: Tensor, rows: Sequence[RowSampling]) -> tuple[list[int], list[float | None]]:
    """logits: [B, V] -> (token per row, logprob per row or None where not requested)."""
    chosen: list[int] = [0] * len(rows)
    logprobs: list[float | None] = [None] * len(rows)
    plain_greedy = [i for i, r in enumerate(rows) if r.params.greedy and r.params.repetition_penalty == 1.0]
    if plain_greedy:
        # Widening to fp32 is exact and keeps the order, so the argmax in the model's dtype is
        # the fp32 one; skipping the copy matters for a large vocab (2 cores, 64 rows x 151,936
        # bf16 logits: fp32 copy + argmax 22.8 ms, max(dim) on bf16 6.3 ms; max(dim) is also
        # faster than argmax on the CPU, with the same first-maximum tie rule).
        # max propagates NaN and keeps +inf / -inf, so its values tell which rows are not finite.
        best = _take(logits, plain_greedy).max(dim=-1)
        if not bool(best.values.isfinite().all()):
            bad = [plain_greedy[j] for j in (~best.values.isfinite()).nonzero().flatten().tolist()]
            raise NonFiniteLogits(f"the model's logits are not finite (NaN, +inf, or all -inf) in rows {bad}")
        for i, tok in zip(plain_greedy, best.indices.tolist(), strict=True):
            chosen[i] = tok
    greedy = set(plain_greedy)
    others = [i for i in range(len(rows)) if i not in greedy]
    want_lp = [i for i, r in enumerate(rows) if r.params.logprobs]
    need = sorted(set(others).union(want_lp))
    if not need:
        return chosen, logprobs
    # Row-major fp32, whatever the logits' layout: the LM head can hand over a transposed view,
    # and the steps below run along rows (16 x 151,936 sampled at temperature: 12.9 ms on the
    # transposed layout, 2.4 ms row-major).
    wide = _take(logits, need).to(torch.float32, memory_format=torch.contiguous_format)
    at = {i: j for j, i in enumerate(need)}
    raw_lp = torch.log_softmax(wide[[at[i] for i in want_lp]], dim=-1) if want_lp else None
    if others:
        x = _take(wide, [at[i] for i in others])
        if x.data_ptr() == logits.data_ptr():
            x = x.clone()  # the caller's fp32 logits: the steps below work in place
        for j, i in enumerate(others):
            _penalize(x[j], rows[i])
        drawn = [j for j, i in enumerate(others) if not rows[i].params.greedy]
        for j, i in enumerate(others):
            if rows[i].params.greedy:  # greedy with a repetition penalty
                _check_finite(x[j].max())
                chosen[i] = int(x[j].argmax())
        if drawn:
            def penalized(j: int) -> Tensor:
                """Row `drawn[j]`'s penalised fp32 logits, computed again from the caller's logits."""
                i = others[drawn[j]]
                y = logits[i].to(torch.float32, copy=True)
                _penalize(y, rows[i])
                return y

            tokens = _draw(_take(x, drawn), [rows[others[j]] for j in drawn], penalized)
            for j, tok in zip(drawn, tokens, strict=True):
                chosen[others[j]] = tok
    if raw_lp is not None:
        for j, i in enumerate(want_lp):
            logprobs[i] = float(raw_lp[j, chosen[i]])
    return chosen, logprobs


def _take(t: Tensor, index: list[int]) -> Tensor:
    """t's rows at `index`: t itself when that is every row in order, else a copy."""
    return t if index == list(range(t.shape[0])) else t[index]


# Top-k / top-p rows draw from their this-many best tokens (topk(1024) of 151,936: ~0.4 ms a
# row on 2 cores). A top-p row whose candidates do not reach top_p (a flat distribution: a high
# temperature, or random weights) draws by its nucleus' threshold (_draw_nucleus) instead.
CANDIDATES = 1024


def _penalize(x: Tensor, r: RowSampling) -> None:
    p = r.params
    if p.repetition_penalty != 1.0 and r.seen is not None and r.seen.numel():
        seen = r.seen.to(x.device)
        vals = x[seen]
        out = torch.where(vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty)
        if not torch.equal(out.isfinite(), vals.isfinite()):
            out = _penalize_in_range(vals, p.repetition_penalty)
        x[seen] = out


def _penalize_in_range(vals: Tensor, penalty: float) -> Tensor:
    """The penalty for seen logits `vals` that it would push out of fp32's range (3.0 / 1e-45
    is +inf, and would make the row NaN): applied with the nearest factor that keeps the
    largest of them finite, so they stay finite and keep their order. The model's own NaN and
    inf stay as they are."""
    finite = vals.isfinite()
    big = float(vals[finite].abs().max())  # > 0: some finite value overflowed
    up = min(1.0 / penalty, _FP32_MAX / big, _FP32_MAX)  # for positive logits (divided by the penalty)
    down = min(penalty, _FP32_MAX / big)  # for negative ones (multiplied)
    out = torch.where(vals < 0, vals * down, vals * up).clamp_(-_FP32_MAX, _FP32_MAX)  # rounding at the edge
    return torch.where(finite, out, vals)


def _check_finite(top: Tensor) -> None:
    """top: a row's largest logit; NaN, +inf and -inf (every token -inf) mean no token can be chosen."""
    if not bool(top.isfinite().all()):
        raise NonFiniteLogits("no token has a finite positive probability: the model's logits are not finite "
                              "(NaN, +inf, or all -inf)")


def _rescaled(y: Tensor, temperature: float) -> Tensor:
    """One row's penalised logits [V] over `temperature` with its maximum subtracted first, so
    that the division cannot overflow: the most likely tokens are 0, the others below (or -inf)."""
    top = y.amax()
    _check_finite(top)
    return y.sub_(top).div_(temperature)


def _top_k(r: RowSampling, vocab: int) -> int:
    """The row's top-k in effect: 0 when off or not below the vocabulary size."""
    k = r.params.top_k
    return k if k and k < vocab else 0


def _draw(x: Tensor, rows: Sequence[RowSampling], penalized: Callable[[int], Tensor]) -> list[int]:
    """x: [S, V] penalised fp32 logits of rows that sample, modified in place -> one token per row.

    penalized(j): row j's x afresh, for the rare row whose logits over its temperature
    overflow; that row is scaled again by `_rescaled`. Every other row's bits are those of
    x / temperature.
    """
    device = x.device
    vocab = x.shape[-1]
    x.div_(torch.tensor([r.params.temperature for r in rows], device=device)[:, None])

    def redo(j: int) -> Tensor:
        return _rescaled(penalized(j), rows[j].params.temperature)

    # One uniform draw per row and step, from the row's own generator.
    u = torch.stack([torch.rand((), generator=r.generator, device=device) for r in rows])
    tokens = [0] * len(rows)
    plain: list[int] = []
    by_width: dict[int, list[int]] = {}  # top-k / top-p rows by how many candidates they need
    for j, r in enumerate(rows):
        k = _top_k(r, vocab)
        if not k and r.params.top_p >= 1.0:
            plain.append(j)
        else:
            by_width.setdefault(k if k > CANDIDATES else min(CANDIDATES, vocab), []).append(j)
    if plain:
        weights = _take(x, plain)
        top = weights.amax(dim=-1, keepdim=True)
        for n in (~top.isfinite()).nonzero()[:, 0].tolist():  # overflowed (or not finite: redo raises)
            weights[n], top[n] = redo(plain[n]), 0.0
        weights.sub_(top).exp_()  # softmax, short of normalising
        for j, tok in zip(plain, _invert(weights, u[plain]).tolist(), strict=True):
            tokens[j] = tok
    for width, group in by_width.items():
        def redo_in_group(n: int, group: list[int] = group) -> Tensor:
            return redo(group[n])

        drawn = _draw_truncated(x[group], [rows[j] for j in group], u[group], width, redo_in_group)
        for j, tok in zip(group, drawn, strict=True):
            tokens[j] = tok
    return tokens


def _draw_truncated(x: Tensor, rows: Sequence[RowSampling], u: Tensor, width: int,
                    redo: Callable[[int], Tensor]) -> list[int]:
    """Top-k / top-p rows [S, V] drawing among their `width` best tokens -> one token per row.
    redo(n): row n scaled by `_rescaled`, for a row whose best value is not finite."""
    vocab = x.shape[-1]
    device = x.device
    values, ids = torch.topk(x, width, dim=-1)  # [S, C], best first
    overflowed = (~values[:, 0].isfinite()).nonzero()[:, 0].tolist()
    if overflowed:
        for n in overflowed:
            x[n] = redo(n)
        values, ids = torch.topk(x, width, dim=-1)
    top_k = torch.tensor([_top_k(r, vocab) or vocab for r in rows], device=device)
    in_k = torch.arange(width, device=device)[None, :] < top_k[:, None]
    # Probabilities over what top-k leaves: the k best when top-k applies, else the whole row.
    # softmax rather than logsumexp: its per-row kernel gives a row the same bits in any batch,
    # where a reduction may split a lone row across threads.
    has_k = top_k < vocab
    probs = torch.softmax(values.masked_fill(~in_k, float("-inf")), dim=-1)
    whole = [j for j, k in enumerate(has_k.tolist()) if not k]
    if whole:
        whole_probs = torch.softmax(_take(x, whole), dim=-1)  # [W, V]
        probs[whole] = whole_probs.gather(1, ids[whole])
    top_p = torch.tensor([r.params.top_p if r.params.top_p < 1.0 else float("inf") for r in rows], device=device)
    # Drop a token when the tokens ranked above it already reach top_p (the top one stays).
    cum = torch.cumsum(probs, dim=-1)
    keep = (cum - probs) < top_p[:, None]
    keep[:, 0] = True  # also when top_p is below fp32's least value (1e-46 is 0.0 there)
    tokens = ids.gather(1, _invert(probs * keep, u)[:, None]).squeeze(1).tolist()
    # A top-p row whose candidates fall short of top_p has its nucleus outside them: it draws
    # instead by the threshold of its nucleus over its whole vocabulary.
    short = [j for j, s in enumerate(((~has_k) & (cum[:, -1] < top_p)).tolist()) if s]
    if short and width < vocab:
        at = {j: n for n, j in enumerate(whole)}  # short rows have no top-k: all are in `whole`
        drawn = _draw_nucleus(_take(whole_probs, [at[j] for j in short]), top_p[short], u[short])
        for j, tok in zip(short, drawn.tolist(), strict=True):
            tokens[j] = tok
    return tokens


# The nucleus threshold is found 10 bits at a time, from the top: fp32 probabilities are at
# most 1.0 (bits 0x3F800000), so bits 30..20 already fit 10 bits, and the sign bit is 0.
_DIGIT_SHIFTS = (20, 10, 0)
_DIGITS = 1 << 10


def _draw_nucleus(probs: Tensor, top_p: Tensor, u: Tensor) -> Tensor:
    """Top-p rows' probabilities [S, V] (overwritten), for rows whose nucleus is wider than
    their candidates -> one token per row, drawn by inverting the kept mass in vocabulary order."""
    threshold = _nucleus_threshold(probs, top_p)
    return _invert(probs.masked_fill_(probs < threshold[:, None], 0.0), u)


def _nucleus_threshold(probs: Tensor, top_p: Tensor) -> Tensor:
    """The least probability each row's nucleus keeps [S], found without a sort.

    The nucleus is every token whose probability reaches t, the largest t such that the tokens
    at or above it hold top_p: the sorted rule's set (tied tokens at t all stay). Non-negative
    fp32 values order as their bit patterns, so t is found like a radix select: a histogram of
    probability mass over the top 10 bits gives the bucket in which the mass counted from the
    top reaches top_p; the next 10 bits of that bucket's tokens narrow it, the last 10 give t.
    The histograms are filled in vocabulary order, row by row, so a row gets the same bits in
    any batch. Per row of 151,936 on 2 cores: ~2.5 ms, where a sort takes ~5.5.
    """
    rows, vocab, device = probs.shape[0], probs.shape[1], probs.device
    bits = probs.view(torch.int32)
    # First digit over the whole rows.
    top = bits >> _DIGIT_SHIFTS[0]
    hist = torch.zeros(rows, _DIGITS, device=device).scatter_add_(1, top.long(), probs)
    reached = hist.cumsum(-1)[:, -1] >= top_p  # rounding can leave a top_p near 1 unreached: keep all
    above = torch.zeros(rows, device=device)  # mass of the tokens above the current bucket
    digit, above = _bucket_reaching(hist, above, top_p)
    prefix = digit << _DIGIT_SHIFTS[0]  # t's bits found so far
    # The next digits over that bucket's tokens only, as flat arrays in row-major order.
    row, col = (top == digit.to(torch.int32)[:, None]).nonzero(as_tuple=True)
    flat = row * vocab + col
    sel_bits, sel_probs = bits.view(-1)[flat].long(), probs.view(-1)[flat]
    for shift in _DIGIT_SHIFTS[1:]:
        digits = (sel_bits >> shift) & (_DIGITS - 1)
        hist = torch.zeros(rows * _DIGITS, device=device).index_add_(
            0, row * _DIGITS + digits, sel_probs).view(rows, _DIGITS)
        digit, above = _bucket_reaching(hist, above, top_p)
        prefix |= digit << shift
        if shift:
            inside = digits == digit[row]
            row, sel_bits, sel_probs = row[inside], sel_bits[inside], sel_probs[inside]
    return torch.where(reached, prefix, 0).to(torch.int32).view(torch.float32)


def _bucket_reaching(hist: Tensor, above: Tensor, top_p: Tensor) -> tuple[Tensor, Tensor]:
    """The highest bucket of each row's histogram [S, D] whose mass, with everything above it
    (`above` plus the buckets past it), reaches top_p -> (that bucket [S], the new `above`).
    A row that rounding leaves short keeps the whole of its bucket (bucket 0)."""
    at_or_above = torch.cat((hist.flip(-1).cumsum(-1).flip(-1) + above[:, None], above[:, None]), dim=1)
    bucket = ((at_or_above[:, :-1] >= top_p[:, None]).sum(-1) - 1).clamp(min=0)
    return bucket, at_or_above.gather(1, (bucket + 1)[:, None]).squeeze(1)


def _invert(weights: Tensor, u: Tensor) -> Tensor:
    """Index drawn per row of non-negative `weights` [S, N] by the uniforms u [S] in [0, 1)."""
    cdf = torch.cumsum(weights, dim=-1)
    # The first index whose cumulative weight passes u x total: zero-weight entries never win.
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    # u x total can round up to the total itself: such a draw goes to the last entry with weight.
    for j in (drawn >= weights.shape[-1]).nonzero().flatten().tolist():
        live = (weights[j] > 0).nonzero()
        if not live.numel():  # NaN logits make NaN weights, which pass no target
            raise ValueError("no token has a finite positive probability: the model's logits are not finite")
        drawn[j] = int(live.max())
    return drawn
