"""What every expert kind must say: which backbone modules it replaces, and how."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import nn

from ccoe_common.model.config import BackboneConfig
from ccoe_common.model.layers import LayerParts
from ccoe_common.model.placement import PlacementError


class ExpertKind(ABC):
    """One way of carving an expert out of the backbone.

    An expert of this kind replaces the backbone module at `module_path(layer)` for each of
    its layers; its tensors are named exactly like the backbone's parameters under those paths
    (e.g. "layers.3.mlp.gate_proj.weight"), which is what makes shapes checkable.
    """

    name: ClassVar[str]

    def check_layers(self, layers: tuple[int, ...], total: int) -> None:
        """Raise PlacementError when `layers` is not a valid placement for this kind."""
        bad = [i for i in layers if not 0 <= i < total]
        if bad:
            raise PlacementError(f"layer indices {bad} are outside the backbone's 0..{total - 1}")
        if list(layers) != sorted(set(layers)):
            raise PlacementError(f"layers must be sorted and distinct, got {list(layers)}")

    @abstractmethod
    def module_path(self, layer: int) -> str:
        """The backbone submodule this kind replaces at `layer`, e.g. "layers.3.mlp"."""

    @abstractmethod
    def build_module(self, config: BackboneConfig, device: str = "meta") -> nn.Module:
        """An uninitialised module of the replaced type, to load expert weights into."""

    @abstractmethod
    def parts(self, module: nn.Module, base: LayerParts) -> LayerParts:
        """The layer parts to run for a row of this expert, given its module at that layer."""
