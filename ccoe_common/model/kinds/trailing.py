"""`trailing` experts replace the last l decoder layers whole (CCoE-24 Eq. 5: E_i(E_b(x))).

The shared trunk (layers 0..L-l-1) runs once for every row of a batch whatever its expert;
only the tail differs. Placement must therefore be exactly the last l layers.
"""

from __future__ import annotations

from torch import nn

from ccoe_common.model.config import BackboneConfig
from ccoe_common.model.kinds.base import ExpertKind
from ccoe_common.model.layers import DecoderLayer, LayerParts
from ccoe_common.model.placement import PlacementError


class TrailingKind(ExpertKind):
    name = "trailing"

    def check_layers(self, layers: tuple[int, ...], total: int) -> None:
        super().check_layers(layers, total)
        tail = tuple(range(total - len(layers), total))
        if tuple(layers) != tail:
            raise PlacementError(
                f"a trailing expert must replace the last {len(layers)} layers {list(tail)}, got {list(layers)}; "
                "use the BE strategy or the ffn kind"
            )

    def module_path(self, layer: int) -> str:
        return f"layers.{layer}"

    def build_module(self, config: BackboneConfig, device: str = "meta") -> nn.Module:
        return DecoderLayer(config, device=device)

    def parts(self, module: nn.Module, base: LayerParts) -> LayerParts:
        assert isinstance(module, DecoderLayer)
        return module.parts()
