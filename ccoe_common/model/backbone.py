"""The decoder stack, with a forward pass where rows may use different experts.

Rows arrive grouped: each `RowGroup` is a contiguous range of rows that run on one expert
(or on none). At a layer where no group's expert replaces anything, the whole batch runs
through the backbone's modules in one call. At a layer where some experts do, rows are
bucketed by the module they need and each bucket runs once: one call per distinct module,
never one per row. Shared work (embedding, attention of `ffn` experts, final norm, LM head)
always runs once for the whole batch.

Shape legend: B = batch rows, T = tokens per row, D = hidden size, V = vocab.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from ccoe_common.model.attention_batch import AttentionBatch, build_attention_batch
from ccoe_common.model.config import BackboneConfig
from ccoe_common.model.fast import one_row
from ccoe_common.model.fast.products import Linear, half_on_cpu, head_logits
from ccoe_common.model.layers import DecoderLayer, LayerParts, RMSNorm, Rotary

if TYPE_CHECKING:
    from ccoe_common.model.expert import LoadedExpert
    from ccoe_common.model.kv_cache import KVCache


@dataclass(frozen=True)
class RowGroup:
    """Rows `rows` of the batch run on `expert` (None = the bare backbone)."""

    expert: LoadedExpert | None
    rows: slice


log = logging.getLogger(__name__)

_compiled_backbones = 0  # backbones of this process that called compile_layers()


class Backbone(nn.Module):
    def __init__(self, config: BackboneConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, device, dtype) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(config, device="cpu" if device is None or str(device) == "meta" else device)
        self._layer_fn: Callable[[LayerParts, Tensor, AttentionBatch, int], Tensor] = _run_layer
        # One token of one cached sequence runs through fast/one_row.py; False sends it
        # through the batched layers instead (the tests compare the two).
        self.row_path = True

    def decoder_layers(self) -> Iterable[DecoderLayer]:
        """`self.layers` as what it holds (nn.ModuleList is typed as holding any nn.Module)."""
        return cast("Iterable[DecoderLayer]", self.layers)

    def compile_layers(self, mode: str | None = None) -> None:
        """From now on, run each decoder layer whose rows all use the same modules through
        `torch.compile` (Inductor), e.g. `compile_layers()` or `compile_layers("max-autotune")`.

        Layers that mix experts keep the eager bucketed path. Shapes are dynamic, so a new
        batch size or sequence length does not recompile; the first prefill and the first
        decode step each compile once (~15 s on 2 CPU cores). Parameters are inputs of the
        compiled graph, not constants, so every layer and every expert's modules share it.

        Meant for one backbone per process (a replica). Dynamo keeps the compiled variants of
        `_run_layer` per code object, shared by every backbone in the process; with six
        compiled backbones (the throughput benchmark's ccoe engine plus 5 ensemble models) it
        hit its recompile limit (8) and the first engine ran slower than eager (22 vs 35
        tokens/s), so a second compiled backbone logs a warning.
        """
        global _compiled_backbones
        _compiled_backbones += 1
        if _compiled_backbones > 1:
            log.warning("compiling a backbone's layers while %d others in this process are compiled: they share "
                        "dynamo's variants of one function and may run slower than eager past its recompile limit",
                        _compiled_backbones - 1)
        self._layer_fn = torch.compile(_run_layer, dynamic=True, mode=mode)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def attention_batch(
        self,
        positions: Tensor,
        query_lens: Tensor,
        cache: KVCache | None = None,
        slots: Tensor | None = None,
    ) -> AttentionBatch:
        cos, sin = self.rotary(positions, self.dtype)
        return build_attention_batch(positions, query_lens, cos, sin, cache, slots)

    def forward(
        self,
        input_ids: Tensor,
        batch: AttentionBatch,
        groups: Sequence[RowGroup] = (),
        logits_at: Tensor | None = None,
        rows_out: Tensor | None = None,
    ) -> Tensor:
        """input_ids: [B, T] -> logits [B, T, V], or [B, V] at `logits_at` ([B] token index per row).

        rows_out: [B], output row i is batch row rows_out[i] (default: the batch's order). The
        rows are reordered before the LM head, where a row is D wide instead of V.
        """
        h = self.embed_tokens(input_ids)  # [B, T, D]
        fast_row = self.row_path and self._layer_fn is _run_layer and half_on_cpu(h)
        row = one_row.decode_row(batch) if fast_row else None
        if row is not None:
            expert = groups[0].expert if groups else None  # one row: one group
            h = one_row.row_layers(self.decoder_layers(), h.view(-1), row, expert).view(h.shape)
        else:
            experts_present = any(g.expert is not None for g in groups)
            for i, layer in enumerate(self.decoder_layers()):
                if experts_present:
                    h = self._mixed_layer(i, layer, h, batch, groups)
                else:
                    h = self._layer_fn(layer.parts(), h, batch, i)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at]  # [B, D]
        if rows_out is not None:
            h = h[rows_out]
        return head_logits(self.lm_head, self.norm(h))

    def _mixed_layer(self, i: int, layer: DecoderLayer, h: Tensor, batch: AttentionBatch,
                     groups: Sequence[RowGroup]) -> Tensor:
        base = layer.parts()
        parts = [(g.rows, base if g.expert is None else g.expert.parts_at(i, base)) for g in groups]
        first = parts[0][1]
        if all(p is first for _, p in parts):
            # Every row runs the same modules here (the backbone's, or one expert's): one plain
            # layer call, compiled like any uniform layer when compile_layers() is on.
            return self._layer_fn(first, h, batch, i)

        def attn(p: LayerParts, x: Tensor, rows: slice | Tensor) -> Tensor:
            # All rows (an ffn expert shares the backbone's attention): no per-row view needed.
            rows_batch = batch if isinstance(rows, slice) and rows == slice(None) else batch.take(rows)
            return p.self_attn(p.input_layernorm(x), rows_batch, i)

        def mlp(p: LayerParts, x: Tensor, rows: slice | Tensor) -> Tensor:
            return p.mlp(p.post_attention_layernorm(x))

        h = h + _bucketed(h, parts, LayerParts.attn_key, attn)
        return h + _bucketed(h, parts, LayerParts.mlp_key, mlp)


def _run_layer(p: LayerParts, h: Tensor, batch: AttentionBatch, layer: int) -> Tensor:
    h = h + p.self_attn(p.input_layernorm(h), batch, layer)
    return h + p.mlp(p.post_attention_layernorm(h))


def _bucketed(
    h: Tensor,
    parts: list[tuple[slice, LayerParts]],
    key: Callable[[LayerParts], tuple[int, int]],
    run: Callable[[LayerParts, Tensor, slice | Tensor], Tensor],
) -> Tensor:
    """Run each distinct module once over all rows that need it; rows keep their places."""
    buckets: dict[tuple[int, int], tuple[LayerParts, list[slice]]] = {}
    for rows, p in parts:
        buckets.setdefault(key(p), (p, []))[1].append(rows)
    if len(buckets) == 1:
        p, _ = next(iter(buckets.values()))
        return run(p, h, slice(None))
    out = torch.empty_like(h)
    for p, row_slices in buckets.values():
        if len(row_slices) == 1:
            rows = row_slices[0]
            out[rows] = run(p, h[rows], rows)
        else:
            # Non-adjacent groups share this module (e.g. backbone rows and rows of an
            # expert that does not touch this layer): gather them into one call.
            idx = torch.cat([torch.arange(s.start, s.stop, device=h.device) for s in row_slices])
            out[idx] = run(p, h[idx], idx)
    return out
