"""Per-forward attention inputs, computed once and shared by every layer.

Rows are right-padded: row b holds `query_lens[b]` real tokens at positions
`positions[b, :query_lens[b]]`. Without a KV cache the keys are the query tokens themselves
(training, parity checks, one-shot scoring). With a cache each row owns a slot and its keys
are the slot's first `positions[b, 0] + query_lens[b]` entries.

Shape legend: B = batch rows, T = query tokens per row, K = key tokens per row, E = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ccoe_common.model.kv_cache import KVCache


@dataclass(frozen=True, kw_only=True)
class AttentionBatch:
    """Built by `build_attention_batch` (or `take`), only by keyword: most fields are tensors
    derived from the first five, and passed in order two of them are easily swapped."""

    positions: Tensor  # [B, T] absolute position of each query token
    query_lens: Tensor  # [B] real (non-padding) tokens per row
    mask: Tensor | None  # [B, 1, T, K] True where a query may attend to a key; None: all keys
    cos: Tensor  # [B, 1, T, E] rotary tables from layers.Rotary
    sin: Tensor  # [B, 1, T, E] (first half negated: see layers.apply_rotary)
    cache: KVCache | None = None
    slots: Tensor | None = None  # [B] cache slot of each row
    # Flat coordinates of the real tokens, used to write them into the cache: [N] each.
    write_rows: Tensor | None = None
    write_cols: Tensor | None = None
    key_len: int = 0  # K when a cache is used
    # The first slot when the rows' slots are consecutive (s, s+1, ...): reads need no gather.
    contiguous_from: int | None = None
    # Where the real tokens go in the cache, [N] each: computed once, used by every layer.
    write_slots: Tensor | None = None
    write_positions: Tensor | None = None
    # Decode rows whose slots are consecutive once sorted (rows grouped by expert shuffle
    # them): attention reads the cache in slot order and reorders the few query rows
    # instead of gathering every row's keys. kv_order[j] is the row of the j-th slot.
    kv_order: Tensor | None = None
    kv_unorder: Tensor | None = None  # inverse of kv_order
    kv_mask: Tensor | None = None  # mask rows in slot order
    # Every row's queries are positions 0..T-1 and its keys exactly those tokens: plain
    # causal attention, which the kernels run without a mask and without the masked-out
    # half of the work (mask is then None).
    causal: bool = False

    def attention_order(self) -> tuple[Tensor | None, Tensor | None]:
        """(row order the cache read returns, mask in that order); order None = as the rows."""
        if self.kv_order is None:
            return None, self.mask
        return self.kv_order, self.kv_mask

    def take(self, rows: slice | Tensor) -> AttentionBatch:
        """The same inputs restricted to a subset of rows (a slice or an index tensor)."""
        write_rows = write_cols = None
        if self.cache is not None:
            row_ids = torch.arange(self.positions.shape[0], device=self.positions.device)[rows]
            cols = torch.arange(self.positions.shape[1], device=self.positions.device)
            valid = cols[None, :] < self.query_lens[row_ids][:, None]
            write_rows, write_cols = valid.nonzero(as_tuple=True)
        slots = None if self.slots is None else self.slots[rows]
        positions = self.positions[rows]
        return AttentionBatch(
            positions=positions,
            query_lens=self.query_lens[rows],
            mask=None if self.mask is None else self.mask[rows],
            cos=self.cos[rows],
            sin=self.sin[rows],
            cache=self.cache,
            slots=slots,
            write_rows=write_rows,
            write_cols=write_cols,
            key_len=self.key_len,
            contiguous_from=None if slots is None else _consecutive_start(slots),
            write_slots=None if slots is None else slots[write_rows],
            write_positions=None if write_rows is None else positions[write_rows, write_cols],
            causal=self.causal,
        )  # a subset reads by gather or view; only whole decode batches reorder (kv_order)


def build_attention_batch(
    positions: Tensor,
    query_lens: Tensor,
    cos: Tensor,
    sin: Tensor,
    cache: KVCache | None = None,
    slots: Tensor | None = None,
) -> AttentionBatch:
    b, t = positions.shape
    device = positions.device
    cols = torch.arange(t, device=device)
    valid_q = cols[None, :] < query_lens[:, None]  # [B, T]
    # Whole prompts from position 0, no padding (a prefill step of fresh requests, training):
    # the keys are exactly the queries, so the mask would be the plain causal one.
    causal = t > 1 and bool((query_lens == t).all()) and bool((positions == cols).all())
    if cache is None:
        # Keys are this forward's own tokens: causal by position, padding never attended.
        allowed = (positions[:, None, :] <= positions[:, :, None]) & valid_q[:, None, :]
        return AttentionBatch(positions=positions, query_lens=query_lens, mask=None if causal else allowed[:, None],
                              cos=cos, sin=sin, causal=causal)
    if slots is None:
        raise ValueError("a KV cache needs the slot of every row")
    kv_lens = positions[:, 0] + query_lens  # [B] tokens in each slot after this forward
    key_len = int(kv_lens.max())
    if key_len > cache.max_seq_len:
        raise ValueError(f"sequence of {key_len} tokens exceeds the KV cache's max_seq_len={cache.max_seq_len}")
    keys = torch.arange(key_len, device=device)
    allowed = (keys[None, None, :] <= positions[:, :, None]) & (keys[None, None, :] < kv_lens[:, None, None])
    write_rows, write_cols = valid_q.nonzero(as_tuple=True)
    # One sequence decoding one token sees every key in its slot: no mask, and attention
    # takes its unmasked kernel.
    mask = None if causal or (b == 1 and t == 1) else allowed[:, None]
    first = _consecutive_start(slots)
    kv_order = kv_unorder = kv_mask = None
    if first is None and t == 1:
        # Reordering B query rows costs far less than gathering B rows of keys and values.
        sorted_slots, order = slots.sort()
        start = _consecutive_start(sorted_slots)
        if start is not None:
            first, kv_order, kv_unorder = start, order, order.argsort()
            kv_mask = None if mask is None else mask[order]
    return AttentionBatch(
        positions=positions, query_lens=query_lens, mask=mask, cos=cos, sin=sin, cache=cache, slots=slots,
        write_rows=write_rows, write_cols=write_cols, key_len=key_len, contiguous_from=first,
        write_slots=slots[write_rows], write_positions=positions[write_rows, write_cols],
        kv_order=kv_order, kv_unorder=kv_unorder, kv_mask=kv_mask, causal=causal,
    )


def _consecutive_start(slots: Tensor) -> int | None:
    first = int(slots[0])
    if len(slots) == 1:
        return first
    return first if torch.equal(slots, torch.arange(first, first + len(slots), device=slots.device)) else None
