"""A frozen backbone with co-resident experts: push, pop, and one forward for mixed batches.

    model = CCoEModel.from_pretrained("/models/qwen2-0.5b")
    model.push("file:///artifacts/math/v2")          # -> ExpertKey("math", 2)
    logits = model.forward(ids, [ExpertKey("math", 2), None])   # row 0 on math, row 1 bare
    logits = model.forward(ids, model.resolve(["math", None]))  # names resolved once, first
    model.pop("math", export_to="file:///tmp/math-copy")       # deep copy out, then free

Several versions of one expert may be resident together (rollouts pin requests to the
version they started on). Pushing or popping never touches the backbone's tensors or any
other expert's: experts only add modules, and the backbone is never written to.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ccoe_common.defaults import DEFAULT_BUDGET_FRACTION
from ccoe_common.errors import ExpertNotFound
from ccoe_common.experts.artifact import ExpertArtifact, read_artifact
from ccoe_common.experts.errors import ExpertVersionExists
from ccoe_common.experts.manifest import ExpertManifest
from ccoe_common.experts.reference import ExpertKey
from ccoe_common.model.backbone import Backbone, RowGroup
from ccoe_common.model.checkpoint import BackboneInfo, load_backbone, load_tokenizer
from ccoe_common.model.expert import (
    LoadedExpert,
    budget_params,
    carve_expert,
    expert_from_artifact,
)
from ccoe_common.model.kv_cache import KVCache
from ccoe_common.model.placement import Placement

# What a caller may name an expert by: a key, "name" / "name@version", or None for the backbone.
ExpertSelector = ExpertKey | str | None


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of parameters held, e.g. backbone_bytes=251_658_240, experts={"math@1": 37_748_736}."""

    backbone_bytes: int
    experts: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.backbone_bytes + sum(self.experts.values())


class CCoEModel:
    def __init__(self, backbone: Backbone, info: BackboneInfo, tokenizer=None,
                 budget_fraction: float = DEFAULT_BUDGET_FRACTION):
        if not 0 < budget_fraction <= 1:
            raise ValueError(f"budget_fraction must be in (0, 1], got {budget_fraction}")
        self.backbone = backbone
        self.info = info
        self.tokenizer = tokenizer
        self.budget_fraction = budget_fraction
        self._experts: dict[ExpertKey, LoadedExpert] = {}
        self._lock = threading.RLock()
        # Bumped by every push and pop: layouts built from the resident set (the static
        # decode path's stacked MLPs, its CUDA graphs) compare it to know they are stale.
        self.generation = 0

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu",
                        budget_fraction: float = DEFAULT_BUDGET_FRACTION) -> CCoEModel:
        backbone, info = load_backbone(path, dtype=dtype, device=device)
        return cls(backbone, info, load_tokenizer(path), budget_fraction)

    @property
    def config(self):
        return self.info.config

    @property
    def budget_params(self) -> int:
        return budget_params(self.info, self.budget_fraction)

    # ---- experts -------------------------------------------------------------------------

    def carve(self, name: str, *, kind: str = "ffn", placement: Placement | None = None, version: int = 1,
              domains: Sequence[str] = (), description: str = "") -> LoadedExpert:
        """A new, not yet resident expert copied from the backbone (see `carve_expert`)."""
        return carve_expert(self.backbone, self.info, name, kind=kind, placement=placement, version=version,
                            budget_fraction=self.budget_fraction, domains=domains, description=description)

    def load(self, source: ExpertArtifact | str) -> LoadedExpert:
        """Read and check an artifact (URI or already read) into a not yet resident expert.

        This is the slow part of a push; callers that must not stall (the engine) run it off
        their hot path and then `push` the result.
        """
        artifact = read_artifact(source) if isinstance(source, str) else source
        return expert_from_artifact(artifact, self.backbone, self.info, self.budget_fraction)

    def push(self, source: LoadedExpert | ExpertArtifact | str) -> ExpertKey:
        """Make an expert version resident. Refuses a name@version that is already resident."""
        expert = source if isinstance(source, LoadedExpert) else self.load(source)
        with self._lock:
            if expert.key in self._experts:
                raise ExpertVersionExists(f"expert {expert.key} is already resident; push version "
                                          f"{self.latest_version(expert.name) + 1} or pop it first")
            self._experts[expert.key] = expert
            self.generation += 1
        return expert.key

    def pop(self, name: str, version: int | None = None, *, export_to: str | None = None) -> list[ExpertKey]:
        """Remove one version (or all versions) of `name`; with export_to, first write a deep
        copy of that version (or the newest) as an artifact. Returns the removed keys."""
        with self._lock:
            keys = [self._resolve_key(name, version)] if version is not None else self.versions_of(name)
            if not keys:
                raise ExpertNotFound(f"no resident expert named {name!r}; resident: {self._names()}")
            newest = self._experts[keys[-1]]
        if export_to is not None:
            newest.to_artifact(export_to, self.info)  # unlocked: forwards go on meanwhile
        with self._lock:
            keys = [k for k in keys if k in self._experts]
            for key in keys:
                del self._experts[key]
            self.generation += 1
        # Reference counting frees the expert here (tests/unit/model/test_pop_frees_without_gc.py).
        # No gc.collect(): a full collection of a serving process (~400k objects) holds the GIL
        # for 0.2 s idle and seconds on a busy host, stalling every request in the engine.
        del newest
        return keys

    def export(self, selector: ExpertSelector, uri: str, *, version: int | None = None) -> ExpertManifest:
        """Write a deep copy of a resident expert; `version` renumbers the copy."""
        return self.get(selector).to_artifact(uri, self.info, version=version)

    def get(self, selector: ExpertSelector) -> LoadedExpert:
        if selector is None:
            raise ExpertNotFound("no expert selected")
        with self._lock:
            if isinstance(selector, ExpertKey):
                key = self._resolve_key(selector.name, selector.version)
            else:
                name, version = ExpertKey.parse(selector)
                key = self._resolve_key(name, version)
            return self._experts[key]

    def resolve(self, selectors: Sequence[ExpertSelector]) -> list[ExpertKey | None]:
        """The resident version each selector names now, for `forward`: ["math", "sql@1", None]
        -> [ExpertKey("math", 2), ExpertKey("sql", 1), None]. Resolve once per request, not per
        step: "math" means the newest version at the time of the call."""
        return [None if s is None else self.get(s).key for s in selectors]

    def resident(self) -> list[ExpertKey]:
        with self._lock:
            return sorted(self._experts)

    def versions_of(self, name: str) -> list[ExpertKey]:
        with self._lock:
            return sorted(k for k in self._experts if k.name == name)

    def latest_version(self, name: str) -> int:
        versions = self.versions_of(name)
        return versions[-1].version if versions else 0

    def _resolve_key(self, name: str, version: int | None) -> ExpertKey:
        versions = self.versions_of(name)
        if not versions:
            raise ExpertNotFound(f"no resident expert named {name!r}; resident: {self._names()}")
        if version is None:
            return versions[-1]
        key = ExpertKey(name, version)
        if key not in self._experts:
            raise ExpertNotFound(
                f"expert {name!r} has no resident version {version}; resident versions: {[k.version for k in versions]}"
            )
        return key

    def loaded(self, keys: Sequence[ExpertKey | None]) -> list[LoadedExpert | None]:
        """The resident expert of each key (None stays None); ExpertNotFound for one not resident."""
        return self._loaded(keys)

    def resident_experts(self) -> list[LoadedExpert]:
        """Every resident expert version, sorted by key."""
        with self._lock:
            return [self._experts[k] for k in sorted(self._experts)]

    def _loaded(self, keys: Sequence[ExpertKey | None]) -> list[LoadedExpert | None]:
        with self._lock:
            loaded: list[LoadedExpert | None] = []
            for key in keys:
                if key is None:
                    loaded.append(None)
                elif not isinstance(key, ExpertKey):
                    raise TypeError(f"forward takes an ExpertKey or None per row, got {key!r}; "
                                    "resolve names once with model.resolve([...])")
                elif key in self._experts:
                    loaded.append(self._experts[key])
                else:
                    raise ExpertNotFound(f"expert {key} is not resident; resident: "
                                            f"{[str(k) for k in sorted(self._experts)] or '(none)'}")
            return loaded

    def _names(self) -> list[str]:
        return sorted({k.name for k in self._experts}) or ["(none)"]

    def memory_report(self) -> MemoryReport:
        backbone = sum(p.numel() * p.element_size() for p in self.backbone.parameters())
        with self._lock:
            experts = {str(k): e.nbytes for k, e in sorted(self._experts.items())}
        return MemoryReport(backbone, experts)

    # ---- forward -------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        experts: Sequence[ExpertKey | None],
        *,
        query_lens: Tensor | None = None,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        slots: Tensor | None = None,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        """Logits for a batch whose rows may each use a different expert.

        input_ids: [B, T] right-padded; experts: one resident version per row, None for the
        bare backbone (names go through `resolve` first); query_lens: [B] real tokens per row
        (default T); positions: [B, T] (default 0..T-1); logits_at: [B] token index per row to
        return [B, V] instead of [B, T, V].
        """
        b, t = input_ids.shape
        if len(experts) != b:
            raise ValueError(f"got {len(experts)} expert selectors for {b} rows")
        device = self.backbone.device
        input_ids = input_ids.to(device)
        query_lens = torch.full((b,), t, device=device) if query_lens is None else query_lens.to(device)
        if positions is None:
            positions = torch.arange(t, device=device).expand(b, t)
        positions = positions.to(device)
        loaded = self._loaded(experts)

        # Rows of one expert must be adjacent: sort once, run, then restore the caller's order.
        def sort_key(r: int) -> tuple[bool, ExpertKey | None]:
            expert = loaded[r]
            return expert is not None, None if expert is None else expert.key

        order = sorted(range(b), key=sort_key)
        groups: list[RowGroup] = []
        for pos, r in enumerate(order):
            if groups and groups[-1].expert is loaded[r]:
                groups[-1] = RowGroup(loaded[r], slice(groups[-1].rows.start, pos + 1))
            else:
                groups.append(RowGroup(loaded[r], slice(pos, pos + 1)))
        perm = None if order == list(range(b)) else torch.tensor(order, device=device)

        def permuted(x: Tensor) -> Tensor:
            return x if perm is None else x[perm]

        batch = self.backbone.attention_batch(permuted(positions), permuted(query_lens), cache,
                                              None if slots is None else permuted(slots.to(device)))
        # The caller's row r sits at position unperm[r] of the sorted batch.
        unperm = None if perm is None else torch.argsort(perm)
        return self.backbone(permuted(input_ids), batch, groups,
                             None if logits_at is None else permuted(logits_at.to(device)), unperm)
