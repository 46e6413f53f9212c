"""Key/value storage: one contiguous slot of `max_seq_len` positions per sequence.

Layout [L, S, G, P, E] (L = layers, S = slots, G = kv heads, P = positions, E = head dim) so a
row's keys for one layer are a contiguous [G, P, E] block that attention reads directly.
Which request owns which slot is the engine's business; this class only stores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ccoe_common.model.attention_batch import AttentionBatch
from ccoe_common.model.config import BackboneConfig


class KVCache:
    def __init__(
        self,
        config: BackboneConfig,
        num_slots: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError(f"KVCache needs num_slots >= 1 and max_seq_len >= 1, got {num_slots} and {max_seq_len}")
        shape = (config.num_layers, num_slots, config.num_kv_heads, max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write_and_read(self, layer: int, k: Tensor, v: Tensor, batch: AttentionBatch) -> tuple[Tensor, Tensor]:
        """Store this forward's keys/values, return each row's keys/values so far.

        k, v: [B, G, T, E] -> [B, G, K, E] with K = batch.key_len; rows in the batch's order,
        or in slot order when `batch.kv_order` is set (the caller reorders its queries).
        """
        slots, rows, cols = batch.slots, batch.write_rows, batch.write_cols
        to_slots, to_pos = batch.write_slots, batch.write_positions
        assert slots is not None and rows is not None, "a batch built with a cache has slots and write rows"
        if k.shape[2] == 1 and len(rows) == k.shape[0]:  # decode: every row writes its only token
            k_new, v_new = k[:, :, 0], v[:, :, 0]
        else:
            k_new, v_new = k[rows, :, cols], v[rows, :, cols]
        # Advanced indices around a slice put the indexed dim first: targets are [N, G, E].
        self.k[layer][to_slots, :, to_pos] = k_new
        self.v[layer][to_slots, :, to_pos] = v_new
        first = batch.contiguous_from
        if first is not None:
            # Slots first, first+1, ...: a view, no copy of the keys and values.
            return (self.k[layer][first:first + len(slots), :, : batch.key_len],
                    self.v[layer][first:first + len(slots), :, : batch.key_len])
        return self.k[layer][slots, :, : batch.key_len], self.v[layer][slots, :, : batch.key_len]
