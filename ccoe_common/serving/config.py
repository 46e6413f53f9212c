"""The one validated configuration of a CCoE Serve application (YAML file or dict).

    backbone: /models/qwen2-0.5b
    experts: [file:///artifacts/math/v1, file:///artifacts/sql/v1]
    rules: /etc/ccoe/rules.yaml
    replica: {num_replicas: 2, num_gpus: 1, engine: {max_running: 64}}

`build_app(config)` (services/app.py) validates it once; raw dicts go no further.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ccoe_common.auth.config import AuthConfig
from ccoe_common.defaults import DEFAULT_BUDGET_FRACTION, DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT
from ccoe_common.engine.engine import EngineConfig
from ccoe_common.engine.params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from ccoe_common.errors import CCoEError
from ccoe_common.registry.config import RegistryConfig
from ccoe_common.telemetry.config import TelemetryConfig


class ConfigError(CCoEError, ValueError):
    """The application config is invalid; the message names the field."""

    code = "INVALID_ARGUMENT"


class ReplicaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_replicas: int = Field(1, ge=1, le=1024, description="ModelReplica processes (one engine each).")
    num_cpus: float = Field(
        0.0, ge=0, description="CPUs Ray reserves per replica (0 lets replicas share a small machine).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (1 on a GPU worker group).")
    device: str | None = Field(None, description="torch device; default cuda when num_gpus > 0, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype.")
    budget_fraction: float = Field(
        DEFAULT_BUDGET_FRACTION, gt=0, le=1, description="Largest expert as a fraction of the backbone.")
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="torch threads per replica; default num_cpus, or when num_cpus is 0 an equal "
                                         "share of the machine's CPUs per replica (Ray alone would give such a "
                                         "replica one thread).")
    engine: EngineConfig = Field(default_factory=EngineConfig)

    @property
    def threads(self) -> int:
        """The torch thread count a replica runs with, e.g. 8 for num_cpus=8."""
        if self.torch_threads is not None:
            return self.torch_threads
        if self.num_cpus >= 1:
            return int(self.num_cpus)
        # Replicas that reserve no CPU share this machine's cores. More OpenMP threads than
        # cores stall at every barrier: 2 replicas of 2 threads each on 2 cores took a pushed
        # version 9.0 s to go live under load, against 3.9 s with 1 thread each (bench rollout).
        return max(1, (os.cpu_count() or 1) // self.num_replicas)


class RouterConfig(BaseModel):
    """The router's settings, with the limits every GenerateRequest is checked against before it
    is routed (INVALID_ARGUMENT naming the field and the setting, e.g. `metadata: 65 keys, over
    router.max_metadata_keys (64)`). They bound what one request costs the router: an 8 MiB
    domain tag and 200,000 metadata keys were accepted before."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_replicas: int = Field(1, ge=1, le=64, description="Router processes.")
    max_prompt_chars: int = Field(200_000, ge=1, description="Longer prompts (all chat messages with their roles, "
                                                             "together) are refused with INVALID_ARGUMENT.")
    max_messages: int = Field(1024, ge=1, le=1_000_000, description="Most chat messages in one request.")
    max_metadata_keys: int = Field(64, ge=0, le=10_000, description="Most keys in a request's metadata map.")
    max_metadata_key_chars: int = Field(128, ge=1, le=65_536, description="Longest metadata key.")
    max_metadata_value_chars: int = Field(4096, ge=1, le=1 << 20, description="Longest metadata value.")
    max_metadata_bytes: int = Field(16_384, ge=1, le=16 << 20,
                                    description="Most UTF-8 bytes in all metadata keys and values together.")
    max_domain_chars: int = Field(128, ge=1, le=65_536, description="Longest domain tag.")
    max_stop_strings: int = Field(MAX_STOP_STRINGS, ge=0, le=MAX_STOP_STRINGS,
                                  description="Most stop strings in one request (the engine allows at most "
                                              f"{MAX_STOP_STRINGS}).")
    max_stop_chars: int = Field(MAX_STOP_STRING_CHARS, ge=1, le=MAX_STOP_STRING_CHARS,
                                description="Longest stop string (the engine allows at most "
                                            f"{MAX_STOP_STRING_CHARS} characters).")
    max_request_id_chars: int = Field(128, ge=1, le=4096, description="Longest request_id.")
    max_fanout: int = Field(4, ge=1, le=16, description="Most experts one rule may consult at once.")
    max_in_flight: int | None = Field(
        None, ge=1, le=1_000_000,
        description="Engine requests one router process has in flight at most (a fanned-out call counts one per "
                    "expert); beyond it a call is refused at once with RESOURCE_EXHAUSTED and retry-after-ms. "
                    "Default: the replicas' capacity, replica.num_replicas x (engine.max_running + "
                    "engine.max_waiting), shared out over router.num_replicas, and at least max_fanout.")
    replica_retries: int = Field(
        2, ge=0, le=8, description="Times a request whose replica died before it sent the caller anything is run "
                                   "again on another replica; after that it fails UNAVAILABLE with retry advice.")
    retry_after_s: float = Field(
        1.0, gt=0, le=3600, description="Retry advice (retry-after-ms) with the router's own refusals: over "
                                        "max_in_flight, or a replica lost mid-request.")
    rules_check_interval_s: float = Field(1.0, gt=0, description="How often the rules file is checked for changes.")


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str = Field(description="transformers checkpoint directory (local path or mounted volume).")
    experts: tuple[str, ...] = Field((), description="Expert artifact URIs every replica loads at start.")
    rules: str | None = Field(None, description="Rule table file (YAML/JSON); reloaded when it changes.")
    rules_inline: dict[str, Any] | None = Field(None, description="Rule table given inline instead of a file.")
    replica: ReplicaConfig = Field(default_factory=ReplicaConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    auth: AuthConfig | None = Field(None, description="Authentication: {mode: token, tokens_file: PATH} or "
                                                       "{mode: none}; see docs/security.md.")
    grpc_port: int = Field(
        DEFAULT_GRPC_PORT, ge=1, le=65535, description="Port of Ray Serve's gRPC proxy (local stack).")
    http_port: int = Field(
        DEFAULT_HTTP_PORT, ge=1, le=65535,
        description="Port of Ray Serve's HTTP proxy: the OpenAI-compatible API under /v1 (local stack).")
    redis_url: str | None = Field(None, description="Registry Redis; none = the local stack starts its own.")

    @model_validator(mode="after")
    def _check_admission(self) -> AppConfig:
        bound, capacity = self.router.max_in_flight, self.replica_capacity
        if bound is None:
            return self
        if bound < self.router.max_fanout:
            raise ValueError(f"router.max_in_flight ({bound}) must be at least router.max_fanout "
                             f"({self.router.max_fanout}): a fanned-out call could never run")
        if bound * self.router.num_replicas > capacity:
            raise ValueError(f"router.max_in_flight ({bound}) x router.num_replicas ({self.router.num_replicas}) "
                             f"is over the replicas' capacity of {capacity} (replica.num_replicas x (engine."
                             f"max_running + engine.max_waiting)): requests past it would queue unbounded in front "
                             f"of the engines")
        return self

    @property
    def replica_capacity(self) -> int:
        """Requests all replicas hold at once: running plus waiting, e.g. 2 x (32 + 256) = 576."""
        engine = self.replica.engine
        return self.replica.num_replicas * (engine.max_running + engine.max_waiting)

    @property
    def admission_bound(self) -> int:
        """Engine requests one router admits at once: router.max_in_flight, or its share of the
        replicas' capacity rounded down (together the routers never exceed it), but at least
        router.max_fanout so that every call the rules allow can run, e.g. 2 x (32 + 256) // 1 = 576."""
        if self.router.max_in_flight is not None:
            return self.router.max_in_flight
        return max(self.router.max_fanout, self.replica_capacity // self.router.num_replicas)

    @field_validator("backbone", "rules")
    @classmethod
    def _expand_home(cls, v: str | None) -> str | None:
        return None if v is None else os.path.expanduser(v)

    @field_validator("experts")
    @classmethod
    def _expand_home_all(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(os.path.expanduser(u) if u.startswith("~") else u for u in v)

    @model_validator(mode="after")
    def _distinct_ports(self) -> AppConfig:
        if self.grpc_port == self.http_port:
            raise ValueError(f"grpc_port and http_port are both {self.grpc_port}; the two proxies need their own")
        return self

    @classmethod
    def load(cls, source: str | Path | dict[str, Any] | AppConfig) -> AppConfig:
        if isinstance(source, AppConfig):
            return source
        if isinstance(source, (str, Path)):
            path = Path(source)
            try:
                data = yaml.safe_load(path.read_text())
            except OSError as e:
                raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
            except yaml.YAMLError as e:
                raise ConfigError(f"config {path} is not valid YAML: {e}") from e
        else:
            data = source
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            if not err["loc"]:  # a rule across sections: its message names the fields
                raise ConfigError(f"config: {err['msg']}") from e
            where = ".".join(map(str, err["loc"]))
            raise ConfigError(f"config field {where}: {err['msg']} (got {err.get('input')!r})") from e
