"""Backbone loading and its fingerprint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ccoe_common.model.checkpoint import load_backbone
from ccoe_common.model.config import BackboneConfigError


def test_fingerprint_is_stable_and_independent_of_runtime_dtype(qwen2_dir):
    _, a = load_backbone(qwen2_dir)
    _, b = load_backbone(qwen2_dir)
    _, c = load_backbone(qwen2_dir, dtype=torch.bfloat16)
    assert a.fingerprint == b.fingerprint == c.fingerprint


def test_fingerprint_changes_with_one_weight(qwen2_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(qwen2_dir, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert load_backbone(copy)[1].fingerprint != load_backbone(qwen2_dir)[1].fingerprint


def test_fingerprint_changes_with_architecture(qwen2_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(qwen2_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(cfg))
    assert load_backbone(copy)[1].fingerprint != load_backbone(qwen2_dir)[1].fingerprint


def test_backbone_is_frozen(qwen2_dir):
    model, _ = load_backbone(qwen2_dir)
    assert not any(p.requires_grad for p in model.parameters())


def test_unsupported_architecture_is_refused(qwen2_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(qwen2_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BackboneConfigError, match="model_type is 'gpt2'; supported: llama, qwen2, mistral"):
        load_backbone(copy)


def test_missing_weights_are_named(qwen2_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(qwen2_dir, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BackboneConfigError, match="lacks tensors \\['norm.weight'\\]"):
        load_backbone(copy)
