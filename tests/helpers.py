"""Small helpers shared by tests (kept out of conftest so tests can import them by name)."""

from __future__ import annotations

import torch

from ccoe_common.model.expert import LoadedExpert


def nudge(expert: LoadedExpert, seed: int, scale: float = 0.05) -> LoadedExpert:
    """Perturb an expert's weights (a stand-in for training) so its outputs differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)
    return expert


def reorder_atol(reference: torch.Tensor, config, seq_len: int) -> float:
    """The most two computations of the same logits may differ when only their summation order
    differs (BLAS blocking for another batch shape, stacked vs separate projections, a KV cache
    vs one pass, transformers vs ours), derived from the arithmetic rather than measured on one CPU.

    A sum of n terms rounds by at most n·eps·Σ|terms| (Higham's γ_n: every rounding the same way).
    On the way to a logit the sums are, per layer, the hidden size (q/k/v/o, gate/up), the MLP
    width (down) and the sequence (attention), then the head; Σ|terms| is taken at the logits'
    scale (at least 1: the head sums normalised activations). Typical errors are ~√n·eps, so the
    bound holds on any kernel; it is still orders of magnitude below what a wrong mask, position
    or expert changes. E.g. 16 layers of 64/128, 12 tokens, fp32, logits ≤ 1: 4e-4.
    """
    eps = torch.finfo(reference.dtype).eps
    n = config.num_layers * (2 * config.hidden_size + config.intermediate_size + seq_len) + config.hidden_size
    return n * eps * max(float(reference.abs().max()), 1.0)
