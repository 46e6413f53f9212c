"""Environment variables, read here and nowhere else. All start with CCOE_.

CCOE_CACHE_DIR   where demo models and other generated assets are cached (default ~/.cache/ccoe)
CCOE_LOG_LEVEL   logging level for the ccoe command (default WARNING)
CCOE_DEVICE      default torch device for commands that load a model (default: cuda if present, else cpu)
CCOE_TRACE_DIR   also write finished trace spans as JSON lines into this folder (tests, debugging)
CCOE_REGISTRY    gRPC address of the registry for the ops commands (default 127.0.0.1:9000)
CCOE_TOKEN       bearer token the ccoe command sends (role admin for the registry commands); or --token-file
CCOE_REDIS_PASSWORD  password of the registry's Redis when its URL carries none (on Kubernetes
                 the chart sets it from a Secret, so the password is in no config or command line)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ccoe_common.defaults import DEFAULT_REGISTRY


@dataclass(frozen=True)
class Settings:
    cache_dir: Path
    log_level: str
    device: str
    trace_dir: Path | None
    registry: str = DEFAULT_REGISTRY


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cache_dir() -> Path:
    """CCOE_CACHE_DIR, else ~/.cache/ccoe: demo models, the local registry's artifacts."""
    return Path(os.environ.get("CCOE_CACHE_DIR") or Path.home() / ".cache" / "ccoe")


def redis_password() -> str | None:
    """CCOE_REDIS_PASSWORD, e.g. "3f9c..." from the release's Redis Secret; None when unset or empty."""
    return os.environ.get("CCOE_REDIS_PASSWORD") or None


def token() -> str | None:
    """CCOE_TOKEN, e.g. "ccoe_Yc3..." as `ccoe auth token` printed it; None when unset or empty."""
    return os.environ.get("CCOE_TOKEN", "").strip() or None


def load_settings() -> Settings:
    level = os.environ.get("CCOE_LOG_LEVEL", "WARNING").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"CCOE_LOG_LEVEL={level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    return Settings(
        cache_dir=cache_dir(),
        log_level=level,
        device=os.environ.get("CCOE_DEVICE") or _default_device(),
        trace_dir=Path(os.environ["CCOE_TRACE_DIR"]) if os.environ.get("CCOE_TRACE_DIR") else None,
        registry=os.environ.get("CCOE_REGISTRY") or DEFAULT_REGISTRY,
    )
