"""manifest.json: everything needed to check an expert before its weights touch a backbone.

Example (abridged):
    {"format_version": 1, "name": "math", "version": 2, "kind": "ffn", "layers": [0, 6, 11],
     "dtype": "bfloat16", "tensors": {"layers.0.mlp.up_proj.weight": [2048, 768], ...},
     "parameter_count": 14155776, "weights_sha256": "3f1c...",
     "base_model": {"fingerprint": "9a0e...", "model_type": "qwen2", "num_layers": 12,
                    "hidden_size": 768, "parameter_count": 125829120},
     "domains": ["math"], "created_at": "2026-11-22T17:40:00Z", "training": {"steps": 400}}
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from ccoe_common.experts.reference import NAME_RE, ExpertKey

FORMAT_VERSION: Final = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"


class BaseModelRef(BaseModel):
    """The backbone an expert was carved from. The fingerprint is what must match."""

    model_config = ConfigDict(extra="forbid")

    fingerprint: str = Field(description="sha256 of the backbone's architecture config and stored weights.")
    model_type: str = Field(description="transformers model_type, e.g. 'qwen2'.")
    num_layers: int = Field(ge=1, description="Decoder layers in the backbone.")
    hidden_size: int = Field(ge=1, description="Hidden size of the backbone.")
    parameter_count: int = Field(ge=1, description="Unique parameters of the backbone (tied weights once).")


class ExpertManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = Field(FORMAT_VERSION, description="Artifact format revision.")
    name: str = Field(pattern=NAME_RE.pattern, description="Expert name, e.g. 'math'.")
    version: int = Field(ge=1, description="Version of this expert; a push of a new version increments it.")
    kind: str = Field(description="Expert kind: 'ffn' or 'trailing'.")
    layers: list[int] = Field(min_length=1, description="Decoder layer indices the expert replaces.")
    dtype: str = Field(description="torch dtype name of every tensor, e.g. 'bfloat16'.")
    tensors: dict[str, list[int]] = Field(description="Every tensor's name and shape.")
    parameter_count: int = Field(ge=1, description="Total elements over all tensors.")
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of weights.safetensors.")
    base_model: BaseModelRef
    domains: list[str] = Field(default_factory=list, description="Domains this expert serves, e.g. ['math'].")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    description: str = Field("", description="Free text for people.")
    training: dict[str, Any] = Field(default_factory=dict, description="Free-form training metadata.")

    @property
    def key(self) -> ExpertKey:
        return ExpertKey(self.name, self.version)
