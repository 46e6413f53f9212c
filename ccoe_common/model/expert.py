"""An expert's weights in memory, bound to one backbone, and how they are made and checked.

Three ways to get one:
- `carve_expert`: deep-copy the backbone modules at a placement (a new, untrained expert that
  reproduces the backbone exactly);
- `expert_from_artifact`: load a checked artifact onto this backbone;
- `LoadedExpert.to_artifact`: the reverse, a deep copy written out (CCoE's "pop").
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ccoe_common.defaults import DEFAULT_BUDGET_FRACTION
from ccoe_common.experts.artifact import ExpertArtifact, write_artifact
from ccoe_common.experts.errors import (
    BudgetExceeded,
    FingerprintMismatch,
    InvalidPlacement,
    ShapeMismatch,
    TensorSetMismatch,
    UnknownExpertKind,
)
from ccoe_common.experts.manifest import ExpertManifest
from ccoe_common.experts.reference import NAME_RE, ExpertKey
from ccoe_common.model.backbone import Backbone
from ccoe_common.model.checkpoint import BackboneInfo
from ccoe_common.model.kinds import KINDS, ExpertKind, get_kind
from ccoe_common.model.layers import LayerParts, stack_projections
from ccoe_common.model.placement import Placement, PlacementError, strategy_layers


class LoadedExpert:
    """Replacement modules for some backbone layers, on the backbone's device and dtype."""

    def __init__(
        self,
        key: ExpertKey,
        kind: ExpertKind,
        layers: tuple[int, ...],
        modules: dict[int, nn.Module],
        *,
        domains: Iterable[str] = (),
        description: str = "",
        training: dict[str, Any] | None = None,
    ):
        self.key = key
        self.kind = kind
        self.layers = layers
        self.modules = modules  # layer index -> replacement module
        self.domains = list(domains)
        self.description = description
        self.training = dict(training or {})
        self._parts_cache: dict[int, tuple[LayerParts, LayerParts]] = {}

    @property
    def name(self) -> str:
        return self.key.name

    @property
    def version(self) -> int:
        return self.key.version

    def parts_at(self, layer: int, base: LayerParts) -> LayerParts:
        """The modules a row of this expert runs at `layer` (`base` where it replaces nothing)."""
        module = self.modules.get(layer)
        if module is None:
            return base
        cached = self._parts_cache.get(layer)
        if cached is None or cached[0] is not base:
            cached = (base, self.kind.parts(module, base))
            self._parts_cache[layer] = cached
        return cached[1]

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors named like the backbone parameters they replace."""
        out: dict[str, Tensor] = {}
        for layer in self.layers:
            prefix = self.kind.module_path(layer)
            for pname, p in self.modules[layer].named_parameters():
                out[f"{prefix}.{pname}"] = p
        return out

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters()]

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def to_artifact(self, uri: str, info: BackboneInfo, *, version: int | None = None,
                    dtype: torch.dtype | None = None) -> ExpertManifest:
        """Write a deep copy as an artifact (optionally as another version or dtype)."""
        tensors = {k: v.detach().to(dtype or v.dtype) for k, v in self.state_dict().items()}
        return write_artifact(
            uri,
            tensors,
            name=self.name,
            version=version or self.version,
            kind=self.kind.name,
            layers=list(self.layers),
            base_model=info.base_model_ref(),
            domains=self.domains,
            description=self.description,
            training=self.training,
        )


def expected_shapes(backbone: Backbone, kind: ExpertKind, layers: Iterable[int]) -> dict[str, list[int]]:
    """Names and shapes of the backbone parameters an expert of `kind` at `layers` replaces."""
    shapes: dict[str, list[int]] = {}
    for layer in layers:
        prefix = kind.module_path(layer)
        for pname, p in backbone.get_submodule(prefix).named_parameters():
            shapes[f"{prefix}.{pname}"] = list(p.shape)
    return shapes


def budget_params(info: BackboneInfo, fraction: float) -> int:
    return int(info.parameter_count * fraction)


def check_budget(subject: str, params: int, info: BackboneInfo, fraction: float) -> None:
    limit = budget_params(info, fraction)
    if params > limit:
        raise BudgetExceeded(
            subject, "parameter_count", f"<= {limit:,} ({fraction:.0%} of the backbone's {info.parameter_count:,})",
            f"{params:,} parameters", "use fewer layers or raise the budget fraction",
        )


def resolve_layers(
    backbone: Backbone, info: BackboneInfo, kind: ExpertKind, placement: Placement, fraction: float
) -> tuple[int, ...]:
    """The layer indices for `placement`; with no count, the most layers the budget allows."""
    total = info.config.num_layers
    if placement.layers is not None:
        layers = tuple(sorted(placement.layers))
    else:
        count = placement.num_layers
        if count is None:
            per_layer = sum(
                p.numel() for p in backbone.get_submodule(kind.module_path(total - 1)).parameters()
            )
            count = min(total, budget_params(info, fraction) // per_layer)
            if count == 0:
                raise BudgetExceeded(
                    f"a {kind.name} expert", "parameter_count",
                    f"<= {budget_params(info, fraction):,} ({fraction:.0%} of the backbone)",
                    f"{per_layer:,} for a single layer", "raise the budget fraction",
                )
        strategy = "BE" if kind.name == "trailing" and placement.layers is None else placement.strategy
        layers = strategy_layers(strategy, total, count)
    kind.check_layers(layers, total)
    return layers


def carve_expert(
    backbone: Backbone,
    info: BackboneInfo,
    name: str,
    *,
    kind: str = "ffn",
    placement: Placement | None = None,
    version: int = 1,
    budget_fraction: float = DEFAULT_BUDGET_FRACTION,
    domains: Iterable[str] = (),
    description: str = "",
) -> LoadedExpert:
    """A new expert: deep copies of the backbone modules it replaces (so it starts equal)."""
    if not NAME_RE.match(name):
        raise ValueError(f"expert name {name!r} must match {NAME_RE.pattern}")
    k = get_kind(kind)
    layers = resolve_layers(backbone, info, k, placement or Placement(), budget_fraction)
    modules = {i: stack_projections(copy.deepcopy(backbone.get_submodule(k.module_path(i)))) for i in layers}
    expert = LoadedExpert(ExpertKey(name, version), k, layers, modules, domains=domains, description=description)
    check_budget(f"expert {name!r}", expert.parameter_count, info, budget_fraction)
    return expert


def check_compatible(artifact: ExpertArtifact, backbone: Backbone, info: BackboneInfo,
                     budget_fraction: float) -> ExpertKind:
    """Everything about `artifact` that depends on the backbone; returns its kind."""
    m = artifact.manifest
    subject = f"expert artifact {artifact.uri!r} ({m.name}@{m.version})"
    if m.kind not in KINDS:
        raise UnknownExpertKind(subject, "kind", f"one of {sorted(KINDS)}", m.kind)
    if m.base_model.fingerprint != info.fingerprint:
        raise FingerprintMismatch(
            subject, "base_model.fingerprint", info.fingerprint, m.base_model.fingerprint,
            f"the expert was made for another backbone ({m.base_model.model_type}, {m.base_model.num_layers} layers)",
        )
    kind = KINDS[m.kind]
    layers = tuple(m.layers)
    try:
        kind.check_layers(layers, info.config.num_layers)
    except PlacementError as e:
        raise InvalidPlacement(subject, "layers", f"a valid {m.kind} placement", list(layers), str(e)) from e
    want = expected_shapes(backbone, kind, layers)
    if set(want) != set(artifact.tensors):
        missing = sorted(set(want) - set(artifact.tensors))
        extra = sorted(set(artifact.tensors) - set(want))
        raise TensorSetMismatch(subject, "tensors", f"the {len(want)} tensors of layers {list(layers)}",
                                f"{len(artifact.tensors)} tensors", f"missing {missing[:4]}, unexpected {extra[:4]}")
    for name, shape in sorted(want.items()):
        found = list(artifact.tensors[name].shape)
        if found != shape:
            raise ShapeMismatch(subject, f"tensors.{name}", shape, found, "shape of the backbone module it replaces")
    check_budget(subject, m.parameter_count, info, budget_fraction)
    return kind


def expert_from_artifact(artifact: ExpertArtifact, backbone: Backbone, info: BackboneInfo,
                         budget_fraction: float = DEFAULT_BUDGET_FRACTION) -> LoadedExpert:
    """Check `artifact` against the backbone and build its modules on the backbone's device/dtype."""
    kind = check_compatible(artifact, backbone, info, budget_fraction)
    m = artifact.manifest
    modules: dict[int, nn.Module] = {}
    for layer in m.layers:
        prefix = kind.module_path(layer) + "."
        module = kind.build_module(info.config)
        sd = {k[len(prefix):]: v.to(device=backbone.device, dtype=backbone.dtype)
              for k, v in artifact.tensors.items() if k.startswith(prefix)}
        module.load_state_dict(sd, strict=True, assign=True)
        stack_projections(module)
        module.requires_grad_(False)
        modules[layer] = module.eval()
    return LoadedExpert(m.key, kind, tuple(m.layers), modules, domains=m.domains,
                        description=m.description, training=m.training)


__all__ = [
    "LoadedExpert", "carve_expert", "check_compatible",
    "expected_shapes", "expert_from_artifact", "resolve_layers",
]
