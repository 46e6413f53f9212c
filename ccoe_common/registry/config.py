"""The registry's settings: the `registry` section of the app config.

    registry: {artifact_store: s3://experts/, heartbeat_ttl_s: 3.0, smoke_prompt: "1+1=",
               allowed_sources: [/data/exports, s3://team/experts], max_upload_bytes: 4294967296}

The limits below bound what one client request can make the registry do (invariant 9); each
refusal names its setting, e.g. `upload of law@1: over registry.max_upload_bytes (8589934592
bytes)`.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ccoe_common.registry.errors import DisallowedLocation
from ccoe_common.registry.sources import parse_location
from ccoe_common.routing.rules import RuleLimits
from ccoe_common.settings import cache_dir

GiB = 1 << 30
# Defaults shared with ArtifactStore and receive_upload, which apply them when no config is given.
DEFAULT_MAX_UPLOAD_BYTES = 8 * GiB  # a 15% expert of a ~26B-parameter bf16 backbone
DEFAULT_STORE_QUOTA_BYTES = 256 * GiB
DEFAULT_UPLOAD_IDLE_TIMEOUT_S = 60.0


def _default_store() -> str:
    return str(cache_dir() / "artifacts")


class RegistryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    artifact_store: str = Field(default_factory=_default_store,
                                description="fsspec URI where the registry keeps every registered version "
                                            "(default: $CCOE_CACHE_DIR/artifacts).")
    heartbeat_ttl_s: float = Field(3.0, gt=0, description="A replica that has not reported for this long is gone.")
    report_interval_s: float = Field(0.5, gt=0, description="How often a replica reports its state.")
    controller_interval_s: float = Field(0.1, gt=0, description="The longest pause of the rollout controller; a "
                                                                "replica's report or a change of the desired "
                                                                "state wakes it at once.")
    resync_s: float = Field(5.0, gt=0, description="Watchers get the full state at least this often.")
    retire_grace_s: float = Field(0.5, ge=0, description="A replica frees a version this long after it "
                                                          "stopped being served (lets routers catch up).")
    smoke_prompt: str = Field("1+1=", min_length=1, description="Prompt of the smoke generation after each load.")
    smoke_tokens: int = Field(1, ge=1, le=64,
                              description="Tokens the smoke generation must produce. One already runs the prompt "
                                          "through every layer, the expert's included, and checks its logits; each "
                                          "more costs one engine step of the loaded fleet.")
    allowed_sources: tuple[str, ...] = Field(
        (), description="Where PushExpert may read artifacts besides the artifact store: absolute paths or URI "
                        "prefixes, e.g. ['/data/exports', 's3://team/experts']. A scheme no entry names (http://, "
                        "say) is refused. Empty: the store only (upload with `ccoe expert push DIR --upload`).")
    allowed_export_prefixes: tuple[str, ...] = Field(
        (), description="Where PopExpert's export_to may write besides the store's _exports/ folder (a bare name "
                        "such as 'law-copy' goes there), e.g. ['/data/exports'].")
    max_upload_bytes: int = Field(
        DEFAULT_MAX_UPLOAD_BYTES, ge=1,
        description="Largest artifact one UploadArtifact may send (manifest and weights together); refused while it "
                    "streams.")
    artifact_store_quota_bytes: int = Field(
        DEFAULT_STORE_QUOTA_BYTES, ge=1,
        description="The artifact store's size past which uploads and pushes are refused (RESOURCE_EXHAUSTED). "
                    "Checked against the store's size when each upload or copy begins plus its own bytes, so uploads "
                    "running at once may overshoot it by their own sizes.")
    upload_idle_timeout_s: float = Field(DEFAULT_UPLOAD_IDLE_TIMEOUT_S, gt=0, le=3600,
                                         description="An upload that sends no chunk for this long is abandoned and "
                                                     "its bytes removed.")
    max_uri_chars: int = Field(2048, ge=16, le=65536, description="Longest uri or export_to a request may give.")
    max_text_chars: int = Field(1024, ge=16, le=65536,
                                description="Longest free text a request may store: who, rollback reasons, replica "
                                            "ids and load-failure reasons.")
    max_table_bytes: int = Field(1 << 20, ge=1024, le=64 << 20,
                                 description="Largest rule table SetRules accepts, in UTF-8 bytes.")
    max_wait_ms: int = Field(600_000, ge=0, description="Longest PopExpert wait_ms (10 minutes by default).")
    max_report_versions: int = Field(4096, ge=1, le=1_000_000,
                                     description="Most loaded versions plus load failures one replica report lists.")
    max_audit_entries: int = Field(1000, ge=1, le=100_000,
                                   description="Most entries one ListAudit returns (a larger limit is lowered).")
    rule_limits: RuleLimits = Field(default_factory=RuleLimits,
                                    description="Size limits of a rule table set through SetRules.")

    @field_validator("artifact_store")
    @classmethod
    def _expand_home(cls, v: str) -> str:
        return os.path.expanduser(v)

    @field_validator("allowed_sources", "allowed_export_prefixes")
    @classmethod
    def _absolute_locations(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        v = tuple(os.path.expanduser(p) for p in v)
        for prefix in v:
            try:
                parse_location(prefix, "prefix")
            except DisallowedLocation as e:
                raise ValueError(str(e)) from e
        return v
