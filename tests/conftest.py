"""Session fixtures: tiny checkpoints built once per test session (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ccoe_common.serving.ray_auth import enable_ray_token_auth

# Every stack the suite starts runs with Ray's own token auth on, as the product's do; Ray
# fixes its auth mode when first imported, so this comes before any import of ray.
assert enable_ray_token_auth(), "RAY_AUTH_MODE is set to something other than token for the test run"

from ccoe_common.model.synthetic import make_checkpoint  # noqa: E402 - Ray's auth mode is set first

# Every variant the parity requirement names: Qwen2 and Llama, with and without qkv bias,
# GQA and MHA, tied and untied embeddings; plus Mistral (explicit head_dim) and Llama 3 rope.
CHECKPOINT_VARIANTS: dict[str, tuple[str, dict]] = {
    "qwen2-gqa-bias": ("qwen2", {"num_key_value_heads": 2}),
    "qwen2-mha-tied": ("qwen2", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-gqa-nobias": ("llama", {"num_key_value_heads": 2}),
    "llama-mha-bias-tied": ("llama", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True,
                                      "tie_word_embeddings": True}),
    "llama3-rope": ("llama", {"num_key_value_heads": 2, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "mistral-headdim": ("mistral", {"num_key_value_heads": 2, "head_dim": 32}),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        name: make_checkpoint(root / name, arch, seed=i, init_std=0.1, **overrides)
        for i, (name, (arch, overrides)) in enumerate(CHECKPOINT_VARIANTS.items())
    }


@pytest.fixture(scope="session")
def qwen2_dir(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["qwen2-gqa-bias"]


@pytest.fixture(scope="session")
def deep_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sixteen narrow layers, so a 15% budget holds three MLP layers."""
    return make_checkpoint(tmp_path_factory.mktemp("deep") / "qwen2", "qwen2", seed=11, init_std=0.1,
                           num_hidden_layers=16, vocab_size=384, hidden_size=64, intermediate_size=128)
