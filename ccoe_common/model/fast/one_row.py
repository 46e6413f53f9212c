"""One token of one cached sequence, through every decoder layer on [D] vectors.

A one-row decode step streams every weight once, and the small ops between the products
cost more than their arithmetic: 150m, bf16, 2 cores, the 111 products run back to back take
16.8 ms, the step without them 4.6 ms, yet the whole step took 26-27 ms (each product streams
megabytes through the caches, so the small ops after it run cold). This path runs the same
kernels on the same values as the batched layers (`Backbone`'s `_run_layer`), hence the same
bits (tests/unit/model/fast/test_row_path.py), with about half the small ops: no batch or
token dimensions to move, products straight to `mv`, no module calls, and the token's key and
value written by slicing at the row's integer slot and position instead of through index
tensors. That step went 26.1-27.1 -> 24.1-24.9 ms (3 runs, medians of 14 alternated rounds of
10 steps in one process, rows cycling over the backbone and two experts).

`Backbone.forward` takes it when `decode_row(batch)` finds one, the activations are half
precision on the CPU, and the layers are not compiled.

Shape legend: D = hidden size, H = query heads, G = key/value heads, E = head dim,
K = keys so far, P = positions in a slot.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

from ccoe_common.model.fast.products import mv, row_product
from ccoe_common.model.layers import MLP, Attention, DecoderLayer, apply_rotary, rms_norm

if TYPE_CHECKING:
    from ccoe_common.model.attention_batch import AttentionBatch
    from ccoe_common.model.expert import LoadedExpert
    from ccoe_common.model.kv_cache import KVCache


@dataclass(frozen=True)
class DecodeRow:
    """What attention needs of a one-token, one-sequence cached forward: its cache, and where
    the token goes in it as plain integers."""

    cache: KVCache
    slot: int
    position: int  # of the new token; its keys are the slot's positions 0..position
    cos: Tensor  # [E] rotary tables of that position, as in AttentionBatch
    sin: Tensor


def decode_row(batch: AttentionBatch) -> DecodeRow | None:
    """The batch as a `DecodeRow` when it is exactly one real token of one sequence with a
    KV cache (a decode step of one request), else None."""
    if batch.cache is None or batch.positions.shape != (1, 1) or batch.contiguous_from is None:
        return None
    if batch.write_rows is None or batch.write_rows.numel() != 1:  # a padding-only row writes nothing
        return None
    return DecodeRow(cache=batch.cache, slot=batch.contiguous_from, position=batch.key_len - 1,
                     cos=batch.cos.reshape(-1), sin=batch.sin.reshape(-1))


def row_layers(layers: Iterable[DecoderLayer], h: Tensor, row: DecodeRow, expert: LoadedExpert | None) -> Tensor:
    """Every decoder layer for the row's token, on `expert`'s modules (None: the backbone's):
    h [D] -> [D]."""
    for i, layer in enumerate(layers):
        p = layer.parts() if expert is None else expert.parts_at(i, layer.parts())
        h = h + attention_row(p.self_attn, rms_norm(p.input_layernorm, h), row, i)
        h = h + mlp_row(p.mlp, rms_norm(p.post_attention_layernorm, h))
    return h


def attention_row(attn: Attention, x: Tensor, row: DecodeRow, layer: int) -> Tensor:
    """`attn.forward` for the row's token: x [D] -> [D]."""
    h, g, e = attn.num_heads, attn.num_kv_heads, attn.head_dim
    stacked = None if attn._qkv is None else attn._qkv.view((attn.q_proj, attn.k_proj, attn.v_proj))
    if stacked is not None:
        qkv = mv(*stacked, x).view(h + 2 * g, e)
        qk = apply_rotary(qkv[: h + g], row.cos, row.sin)
        q, k, v = qk[:h], qk[h:], qkv[h + g:]
    else:
        q = apply_rotary(row_product(attn.q_proj, x).view(h, e), row.cos, row.sin)
        k = apply_rotary(row_product(attn.k_proj, x).view(g, e), row.cos, row.sin)
        v = row_product(attn.v_proj, x).view(g, e)
    keys, values = write_and_read_row(row, layer, k, v)  # [G, K, E]
    # As in Attention._attend's decode case: the H/G query heads of a key/value head are its rows.
    out = F.scaled_dot_product_attention(q.reshape(1, g, h // g, e), keys[None], values[None])
    return row_product(attn.o_proj, out.reshape(h * e))


def mlp_row(mlp: MLP, x: Tensor) -> Tensor:
    """`mlp(x)` for the row: x [D] -> [D]."""
    return row_product(mlp.down_proj, F.silu(row_product(mlp.gate_proj, x)) * row_product(mlp.up_proj, x))


def write_and_read_row(row: DecodeRow, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """`KVCache.write_and_read` for the row's new token: k, v [G, E] -> its keys and values
    so far, [G, K, E] views. Plain slicing at the integer slot and position writes the same
    values as the indexed write, with none of its index tensors."""
    keys, values = row.cache.k[layer, row.slot], row.cache.v[layer, row.slot]  # [G, P, E]
    keys[:, row.position] = k
    values[:, row.position] = v
    return keys[:, : row.position + 1], values[:, : row.position + 1]
