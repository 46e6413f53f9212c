"""Decoder building blocks of the Llama / Qwen2 / Mistral family, in plain PyTorch.

Parameter names match `transformers` (`self_attn.q_proj.weight`, `mlp.gate_proj.weight`, ...)
so a checkpoint's state dict loads without renaming, and an expert's tensors carry the same
names as the backbone modules they replace. The CPU fast paths these layers dispatch to (one
row through `torch.mv`, a transposed MLP, stacked q/k/v) live in `model/fast/`.

Shape legend: B = batch rows, T = query tokens per row, K = key tokens per row,
D = hidden size, H = query heads, G = key/value heads, E = head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccoe_common.model.attention_batch import AttentionBatch
from ccoe_common.model.config import BackboneConfig, RopeConfig
from ccoe_common.model.fast import products
from ccoe_common.model.fast.packing import RowStack, stack_rows
from ccoe_common.model.fast.products import Linear, linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(self, x)


def rms_norm(norm: RMSNorm, x: Tensor) -> Tensor:
    """`norm(x)` without the module call (fast/one_row.py calls it 45 times a step)."""
    # transformers normalises in fp32, casts back, then scales; `F.rms_norm` without a
    # weight does the first two in one kernel (fp32 inside, same bits: tested), which
    # saves ~6 us of small ops per norm when decoding one row.
    return norm.weight * F.rms_norm(x, (x.shape[-1],), eps=norm.eps)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> Tensor:
    """Inverse frequencies [E/2] for the rope variants in SUPPORTED_ROPE_TYPES."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.type == "linear":
        return inv_freq / rope.params["factor"]
    if rope.type == "llama3":
        factor = rope.params["factor"]
        low, high = rope.params["low_freq_factor"], rope.params["high_freq_factor"]
        old_ctx = rope.params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, and the band in between
        # interpolated linearly in 1/wavelength (Llama 3.1's context extension).
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(in_band, blended, scaled)
    return inv_freq


class Rotary(nn.Module):
    inv_freq: Tensor  # [E/2], a buffer: nn.Module's typing would make it Tensor | Module

    def __init__(self, config: BackboneConfig, device: torch.device | str | None = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config.rope, config.head_dim).to(device), persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [B, T] -> (cos, sin) [B, 1, T, E] for `apply_rotary`, computed in fp32.

        sin carries the sign of transformers' rotate_half (its first half negated), so a
        rotation is one roll and two products; the values are bit for bit the same.
        """
        freqs = positions.to(torch.float32)[:, None, :, None] * self.inv_freq.to(positions.device)  # [B, 1, T, E/2]
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, heads, T, E]; cos, sin: [B, 1, T, E] from Rotary. transformers computes
    # x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1); rolling x gives (x2, x1)
    # and the sign sits in sin: the same products, in half the kernels (1 row: 15 -> 7 us).
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: BackboneConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        d, h, g, e = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        kw = {"device": device, "dtype": dtype}
        self.q_proj = Linear(d, h * e, bias=config.qkv_bias, **kw)
        self.k_proj = Linear(d, g * e, bias=config.qkv_bias, **kw)
        self.v_proj = Linear(d, g * e, bias=config.qkv_bias, **kw)
        self.o_proj = Linear(h * e, d, bias=config.o_bias, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = h, g, e
        self._qkv: RowStack | None = None  # set by stack()

    def stack(self) -> None:
        """Store q, k and v in one tensor (fast/packing.py): one kernel computes all three."""
        self._qkv = stack_rows((self.q_proj, self.k_proj, self.v_proj))

    def forward(self, x: Tensor, batch: AttentionBatch, layer: int) -> Tensor:
        b, t, _ = x.shape
        h, g, e = self.num_heads, self.num_kv_heads, self.head_dim
        stacked = None if self._qkv is None else self._qkv.view((self.q_proj, self.k_proj, self.v_proj))
        if stacked is not None:
            qkv = linear(x, *stacked).view(b, t, h + 2 * g, e).transpose(1, 2)  # [B, H+2G, T, E]
            qk = apply_rotary(qkv[:, : h + g], batch.cos, batch.sin)  # q and k heads in one call
            q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + g:]
        else:
            q = self.q_proj(x).view(b, t, h, e).transpose(1, 2)  # [B, H, T, E]
            k = self.k_proj(x).view(b, t, g, e).transpose(1, 2)  # [B, G, T, E]
            v = self.v_proj(x).view(b, t, g, e).transpose(1, 2)
            q = apply_rotary(q, batch.cos, batch.sin)
            k = apply_rotary(k, batch.cos, batch.sin)
        if batch.cache is not None:
            k, v = batch.cache.write_and_read(layer, k, v, batch)  # [B, G, K, E]
        order, mask = batch.attention_order()
        if order is not None:  # the cache returned the rows in slot order
            q = q[order]
        out = self._attend(q, k, v, mask, batch.causal)  # [B, H, T, E]
        if order is not None:
            out = out[batch.kv_unorder]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * e))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool = False) -> Tensor:
        # q: [B, H, T, E]; k, v: [B, G, K, E]; mask: [B, 1, T, K] or None
        b, h, t, e = q.shape
        g = self.num_kv_heads
        if causal:
            # No mask to read, and the kernel skips whole blocks above the diagonal: 16 rows
            # x 12 heads, 2 cores, bf16: 2.08 -> 1.93 ms at 128 tokens, 24.0 -> 21.2 at 512.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=g != h)
        if t == 1 and g != h:
            # Decoding: the H/G query heads that share a key/value head become H/G query rows
            # of that head ([B, G, H/G, E]), all under the row's one mask. Same arithmetic as
            # enable_gqa, in 1/(H/G) as many attention problems: the CPU kernel ran 64 rows
            # x 12 heads over 160 keys in 0.37 instead of 0.59 ms.
            out = F.scaled_dot_product_attention(q.reshape(b, g, h // g, e), k, v, attn_mask=mask)
            return out.reshape(b, h, 1, e)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=g != h)


class MLP(nn.Module):
    def __init__(self, config: BackboneConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        kw = {"device": device, "dtype": dtype}
        self.gate_proj = Linear(d, i, bias=config.mlp_bias, **kw)
        self.up_proj = Linear(d, i, bias=config.mlp_bias, **kw)
        self.down_proj = Linear(i, d, bias=config.mlp_bias, **kw)

    def forward(self, x: Tensor) -> Tensor:
        if products.wants_transposed_mlp(x):
            return products.transposed_mlp(self, x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def stack_projections(module: nn.Module) -> nn.Module:
    """Stack q/k/v of every attention inside `module` (fast/packing.py); returns `module`."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.stack()
    return module


class DecoderLayer(nn.Module):
    def __init__(self, config: BackboneConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.self_attn = Attention(config, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.mlp = MLP(config, device, dtype)

    def parts(self) -> LayerParts:
        return LayerParts(self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp)


@dataclass(frozen=True)
class LayerParts:
    """The four modules one decoder layer runs; an expert swaps in its own for some of them.

    The two halves are keyed separately so rows whose experts differ only in the MLP still
    share one attention call.
    """

    input_layernorm: RMSNorm
    self_attn: Attention
    post_attention_layernorm: RMSNorm
    mlp: MLP

    def attn_key(self) -> tuple[int, int]:
        return id(self.input_layernorm), id(self.self_attn)

    def mlp_key(self) -> tuple[int, int]:
        return id(self.post_attention_layernorm), id(self.mlp)
