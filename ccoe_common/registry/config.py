"""The registry's settings: the `registry` section of the app config.

    registry: {artifact_store: s3://experts/, heartbeat_ttl_s: 3.0, smoke_prompt: "1+1="}
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ccoe_common.settings import cache_dir


def _default_store() -> str:
    return str(cache_dir() / "artifacts")


class RegistryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    artifact_store: str = Field(default_factory=_default_store,
                                description="fsspec URI where the registry keeps every registered version "
                                            "(default: $CCOE_CACHE_DIR/artifacts).")
    heartbeat_ttl_s: float = Field(3.0, gt=0, description="A replica that has not reported for this long is gone.")
    report_interval_s: float = Field(0.5, gt=0, description="How often a replica reports its state.")
    controller_interval_s: float = Field(0.1, gt=0, description="How often the registry advances rollouts.")
    resync_s: float = Field(5.0, gt=0, description="Watchers get the full state at least this often.")
    retire_grace_s: float = Field(0.5, ge=0, description="A replica frees a version this long after it "
                                                          "stopped being served (lets routers catch up).")
    smoke_prompt: str = Field("1+1=", min_length=1, description="Prompt of the smoke generation after each load.")
    smoke_tokens: int = Field(2, ge=1, le=64, description="Tokens the smoke generation must produce.")

    @field_validator("artifact_store")
    @classmethod
    def _expand_home(cls, v: str) -> str:
        return os.path.expanduser(v)
