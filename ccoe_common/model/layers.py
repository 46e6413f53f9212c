"""Decoder building blocks of the Llama / Qwen2 / Mistral family, in plain PyTorch.

Parameter names match `transformers` (`self_attn.q_proj.weight`, `mlp.gate_proj.weight`, ...)
so a checkpoint's state dict loads without renaming, and an expert's tensors carry the same
names as the backbone modules they replace.

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
from ccoe_common.model.packing import RowStack, stack_rows


_HALF = (torch.bfloat16, torch.float16)


def half_on_cpu(x: Tensor) -> bool:
    """Where the CPU fast paths below apply (measured faster only for bf16/fp16 on the CPU)."""
    # `is_cpu` rather than `device.type`: no device object per call. It runs for every
    # projection; a one-row 150m step without its products went 4.80 -> 4.67 ms.
    return x.dtype in _HALF and x.is_cpu


class Linear(nn.Linear):
    """`nn.Linear` that multiplies a single half-precision row on the CPU with `torch.mv`.

    Decoding one sequence runs every projection on one row. For bf16 weights on the CPU,
    `F.linear` takes such a row through a GEMM kernel that streams the weight about 1.5x
    slower than the matrix-vector kernel (measured on 2 cores: 150 vs 105 us for a 768x2048
    weight, 1.8 vs 1.1 ms for a 32000x768 LM head). In fp32 both run at the same speed, and
    CUDA (not measured here) keeps `F.linear`. Same parameters and state dict as `nn.Linear`.
    """

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def row_product(lin: nn.Linear, x: Tensor) -> Tensor:
    """`lin(x)` for one half-precision row on the CPU, x [in] -> [out]: the same `mv` as
    `linear`, without its checks and reshapes and without nn.Module's call (~5 us a product
    in all; a one-row 150m step makes 110 of them besides the LM head)."""
    return _mv(lin.weight, lin.bias, x)


def _mv(weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    return torch.mv(weight, x) if bias is None else torch.addmv(bias, weight, x)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, with a single half-precision row on the CPU through `torch.mv` (see Linear)."""
    if x.numel() == weight.shape[1] and half_on_cpu(x):
        return _mv(weight, bias, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


# Up to this many rows, half-precision logits on the CPU come from `W @ h^T` (see head_logits).
TRANSPOSED_HEAD_MAX_ROWS = 32


def head_logits(head: nn.Linear, h: Tensor) -> Tensor:
    """The LM head on rows h [M, D] -> logits [M, V].

    For a few half-precision rows on the CPU, `W @ h^T` streams the [V, D] head faster than
    `h @ W^T`. Measured on 2 cores, bf16, head plus the sampler's max over the vocab, for a
    151,936 x 896 head: 13 rows 20.2 vs 12.9 ms, 32 rows 24.6 vs 20.4 ms, 64 rows 36.2 vs
    39.9 ms (slower, hence the limit). A 32,000 x 768 head: 13 rows 5.1 vs 3.0 ms.
    The logits come back as a transposed view; the sampler reads it in place.
    """
    if h.dim() == 2 and 1 < h.shape[0] <= TRANSPOSED_HEAD_MAX_ROWS and head.bias is None and half_on_cpu(h):
        return (head.weight @ h.t()).t()
    return head(h)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(self, x)


def rms_norm(norm: RMSNorm, x: Tensor) -> Tensor:
    """`norm(x)` without the module call (the one-row path calls it 45 times a step)."""
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
    def __init__(self, config: BackboneConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
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
        """Store q, k and v in one tensor (packing.py): one kernel computes all three."""
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

    def forward_row(self, x: Tensor, batch: AttentionBatch, layer: int) -> Tensor:
        """`forward` for one token of one cached sequence (`batch.row`) in half precision on
        the CPU: x [D] -> [D].

        The same kernels on the same values as `forward`, hence the same bits (tested), with
        about half the small ops: no batch or token dimensions to move, products straight to
        `mv` (row_product), and the cache written by slicing at the row's integer slot and
        position instead of through index tensors. See `Backbone._row_layers`.
        """
        row, cache = batch.row, batch.cache
        assert row is not None and cache is not None, "forward_row needs a batch with .row (one cached token)"
        h, g, e = self.num_heads, self.num_kv_heads, self.head_dim
        stacked = None if self._qkv is None else self._qkv.view((self.q_proj, self.k_proj, self.v_proj))
        if stacked is not None:
            qkv = _mv(*stacked, x).view(h + 2 * g, e)
            qk = apply_rotary(qkv[: h + g], row.cos, row.sin)
            q, k, v = qk[:h], qk[h:], qkv[h + g:]
        else:
            q = apply_rotary(row_product(self.q_proj, x).view(h, e), row.cos, row.sin)
            k = apply_rotary(row_product(self.k_proj, x).view(g, e), row.cos, row.sin)
            v = row_product(self.v_proj, x).view(g, e)
        keys, values = cache.write_and_read_row(layer, k, v, row)  # [G, K, E]
        # As in _attend's decode case: the H/G query heads of a key/value head are its rows.
        out = F.scaled_dot_product_attention(q.reshape(1, g, h // g, e), keys[None], values[None])
        return row_product(self.o_proj, out.reshape(h * e))

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
    def __init__(self, config: BackboneConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        kw = {"device": device, "dtype": dtype, "bias": config.mlp_bias}
        self.gate_proj = Linear(d, i, **kw)
        self.up_proj = Linear(d, i, **kw)
        self.down_proj = Linear(i, d, **kw)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if 1 < rows <= TRANSPOSED_MLP_MAX_ROWS and half_on_cpu(x):
            return _transposed_mlp(self, x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def row_mlp(mlp: MLP, x: Tensor) -> Tensor:
    """`mlp(x)` for one half-precision row on the CPU, x [D] -> [D] (see row_product)."""
    return row_product(mlp.down_proj, F.silu(row_product(mlp.gate_proj, x)) * row_product(mlp.up_proj, x))


# Above this many rows the plain MLP is faster again: the transposed GEMMs lose their edge
# and the residual add reads the transposed output with a large stride. Measured on 2 cores,
# bf16, 22 layers of 768x2048 MLPs plus the residual add: 64 rows 18 vs 26 ms (transposed vs
# plain), 256 rows 42 vs 52, 384 rows 67 vs 63, 2048 rows (a prefill step) 399 vs 257.
TRANSPOSED_MLP_MAX_ROWS = 256


def _transposed_mlp(mlp: MLP, x: Tensor) -> Tensor:
    """The same MLP computed on x^T: [D, M] -> [I, M] -> [D, M] (M = rows).

    For several half-precision rows on the CPU, `W @ x^T` (the weight as the row-major left
    operand) runs ~1.8x faster than `x @ W^T` (measured on 2 cores, bf16, 768x2048: 261 vs
    463 us at 64 rows, 119 vs 252 us at 13). The intermediate activations stay transposed, so
    nothing is copied to get there; the result is a transposed view the residual add reads.
    """
    xt = x.reshape(-1, x.shape[-1]).t()  # [D, M]
    gate = _weight_times(mlp.gate_proj, xt)  # [I, M]
    up = _weight_times(mlp.up_proj, xt)
    out = _weight_times(mlp.down_proj, F.silu(gate) * up)  # [D, M]
    return out.t().view(x.shape)


def _weight_times(lin: nn.Linear, xt: Tensor) -> Tensor:
    """lin applied to the columns of xt: [in, M] -> [out, M]."""
    if lin.bias is None:
        return lin.weight @ xt
    return torch.addmm(lin.bias[:, None], lin.weight, xt)


def stack_projections(module: nn.Module) -> nn.Module:
    """Stack q/k/v of every attention inside `module` (packing.py); returns `module`."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.stack()
    return module


class DecoderLayer(nn.Module):
    def __init__(self, config: BackboneConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
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

    input_layernorm: nn.Module
    self_attn: nn.Module
    post_attention_layernorm: nn.Module
    mlp: nn.Module

    def attn_key(self) -> tuple[int, int]:
        return id(self.input_layernorm), id(self.self_attn)

    def mlp_key(self) -> tuple[int, int]:
        return id(self.post_attention_layernorm), id(self.mlp)
