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
