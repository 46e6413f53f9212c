"""The plain layers' own shortcuts: decoding attention with the shared heads folded into query
rows, RMSNorm in one kernel, rotary as one roll (the CPU fast paths: tests/unit/model/fast/)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ccoe_common.model.layers import Attention, RMSNorm, Rotary, apply_rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_rms_norm_has_the_bits_of_the_transformers_formula(dtype, rows):
    torch.manual_seed(rows)
    norm = RMSNorm(96, 1e-6, dtype=dtype)
    torch.nn.init.normal_(norm.weight)
    x = (torch.randn(rows, 96) * torch.logspace(-3, 3, rows)[:, None]).to(dtype)
    x32 = x.to(torch.float32)
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert torch.equal(norm(x), want)


@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_folds_shared_heads_into_query_rows(masked, monkeypatch):
    torch.manual_seed(0)
    config = SimpleNamespace(hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=8, qkv_bias=False, o_bias=False)
    attn = Attention(config)
    b, keys = 5, 11
    q, k, v = torch.randn(b, 6, 1, 8), torch.randn(b, 2, keys, 8), torch.randn(b, 2, keys, 8)
    mask = (torch.arange(keys)[None] < torch.tensor([11, 3, 7, 1, 9])[:, None])[:, None, None, :] if masked else None
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    shapes = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: shapes.append(q.shape) or real(q, *a, **kw))
    got = attn._attend(q, k, v, mask)
    assert shapes == [(b, 2, 3, 8)], "one query row per head of a key/value group"
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_has_the_bits_of_the_transformers_formula(dtype):
    config = SimpleNamespace(rope=SimpleNamespace(type="default", theta=10000.0, params={}), head_dim=16)
    rotary = Rotary(config)
    positions = torch.tensor([[0, 1, 2], [7, 30, 500]])
    x = torch.randn(2, 3, 5, 16).to(dtype).transpose(1, 2)  # [B, heads, T, E] as a strided view
    cos, sin = rotary(positions, dtype)
    freqs = positions.float()[..., None] * rotary.inv_freq
    emb = torch.cat((freqs, freqs), -1)
    ref_cos, ref_sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    rotate_half = torch.cat((-x[..., 8:], x[..., :8]), -1)
    assert torch.equal(apply_rotary(x, cos, sin), x * ref_cos + rotate_half * ref_sin)
