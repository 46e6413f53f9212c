"""`ffn` experts replace the MLP of chosen decoder layers (CCoE-25's default, GL placement).

Attention and norms stay the backbone's, so rows of different `ffn` experts share one
attention call per layer and differ only in the MLP.
"""

from __future__ import annotations

from torch import nn

from ccoe_common.model.config import BackboneConfig
from ccoe_common.model.kinds.base import ExpertKind
from ccoe_common.model.layers import MLP, LayerParts


class FfnKind(ExpertKind):
    name = "ffn"

    def module_path(self, layer: int) -> str:
        return f"layers.{layer}.mlp"

    def build_module(self, config: BackboneConfig, device: str = "meta") -> nn.Module:
        return MLP(config, device=device)

    def parts(self, module: nn.Module, base: LayerParts) -> LayerParts:
        assert isinstance(module, MLP)
        return LayerParts(base.input_layernorm, base.self_attn, base.post_attention_layernorm, module)
