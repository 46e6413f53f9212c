"""The device the static-path tests run on: the CPU here; `scripts/gpu-check.sh` runs the same
files with CCOE_TEST_DEVICE=cuda on a GPU machine."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    name = os.environ.get("CCOE_TEST_DEVICE", "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"CCOE_TEST_DEVICE={name} but torch sees no CUDA device")
    return dev
