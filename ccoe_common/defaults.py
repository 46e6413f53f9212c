"""Defaults that several layers share, defined once.

    DTYPES["bfloat16"]          -> torch.bfloat16   (what an artifact's manifest may name)
    DTYPE_CHOICES["auto"]       -> None             (the loader picks float32 on CPU, bfloat16 on CUDA)
    DEFAULT_BUDGET_FRACTION     -> 0.15             (an expert's parameters / the backbone's, CCoE-25)
    DEFAULT_REGISTRY            -> "127.0.0.1:9000" (where `ccoe serve` listens)
"""

from __future__ import annotations

import torch

# The float types we serve and store experts in; the keys are the names manifests and configs use.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a `--dtype` flag or `replica.dtype` accepts: "auto" leaves the choice to the loader.
DTYPE_CHOICES: dict[str, torch.dtype | None] = {"auto": None, **DTYPES}

DEFAULT_BUDGET_FRACTION = 0.15

DEFAULT_GRPC_PORT = 9000
DEFAULT_HTTP_PORT = 8000  # the OpenAI-compatible HTTP API (Ray Serve's HTTP proxy; KubeRay's serve port)
DEFAULT_REGISTRY = f"127.0.0.1:{DEFAULT_GRPC_PORT}"
