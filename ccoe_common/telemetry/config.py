"""Telemetry settings: the `telemetry` section of the app config.

    telemetry: {tracing: otlp, otlp_endpoint: "http://otel-collector:4317"}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TelemetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tracing: Literal["off", "console", "otlp", "memory"] = Field(
        "off", description="Span exporter: off, console (stderr), otlp (to otlp_endpoint), memory (tests).")
    otlp_endpoint: str = Field("http://localhost:4317", description="OTLP/gRPC collector address.")
    service_name: str = Field("ccoe-serve", description="service.name resource attribute.")

    @field_validator("tracing", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false.
        return "off" if v is False else v
