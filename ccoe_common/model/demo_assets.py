"""What the demos serve: a tiny backbone made locally and experts carved from it, cached.

The experts are not trained (that is `ccoe train` and `ccoe demo build`): each is a deep copy
of the backbone modules nudged with seeded noise, so that its outputs visibly differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ccoe_common.model import CCoEModel, Placement
from ccoe_common.model.expert import LoadedExpert
from ccoe_common.model.synthetic import make_checkpoint

# Keyword arguments for make_checkpoint: the shape of the demo backbone.
DEMO_SHAPE: dict[str, Any] = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 6,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
# name -> (kind, placement, seed)
DEMO_EXPERTS = {
    "math": ("ffn", Placement(strategy="GL"), 0),
    "sql": ("trailing", Placement(strategy="BE"), 1),
    "law": ("ffn", Placement(strategy="FE"), 2),
}
def demo_backbone(workdir: Path) -> Path:
    """The demo checkpoint, created on first use (about a second)."""
    path = workdir / "backbone"
    if not (path / "config.json").exists():
        make_checkpoint(path, "qwen2", seed=7, init_std=0.08, **DEMO_SHAPE)
    return path


def nudge(expert: LoadedExpert, seed: int, scale: float = 0.05) -> LoadedExpert:
    """Stand-in for training: a seeded perturbation, so the expert's answers differ visibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)
    return expert


def demo_experts(workdir: Path) -> dict[str, str]:
    """Artifacts of the demo experts (created on first use); name -> URI."""
    backbone = demo_backbone(workdir)
    uris = {name: str(workdir / "experts" / name) for name in DEMO_EXPERTS}
    missing = [n for n, u in uris.items() if not (Path(u) / "manifest.json").exists()]
    if missing:
        model = CCoEModel.from_pretrained(backbone)
        for name in missing:
            kind, placement, seed = DEMO_EXPERTS[name]
            expert = nudge(model.carve(name, kind=kind, placement=placement, domains=[name]), seed)
            expert.to_artifact(uris[name], model.info)
    return uris
