"""With no expert selected, our decoder reproduces the transformers model's logits.

Tolerance: `tests.helpers.reorder_atol`, the worst-case rounding of the model's sums in fp32 (in
practice we see 0.0 or a few ulps: the same ops, but kernels may block the sums differently
for other shapes, and do so differently on other CPUs).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from ccoe_common.model import CCoEModel
from ccoe_common.model.kv_cache import KVCache
from tests.conftest import CHECKPOINT_VARIANTS
from tests.helpers import reorder_atol


@pytest.fixture(scope="module")
def loaded(checkpoints):
    out = {}
    for name, path in checkpoints.items():
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        out[name] = (hf, CCoEModel.from_pretrained(path))
    return out


@pytest.mark.parametrize("variant", sorted(CHECKPOINT_VARIANTS))
def test_logits_match_transformers(loaded, variant):
    hf, ours = loaded[variant]
    ids = torch.randint(3, 500, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours.forward(ids, [None] * 3)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= reorder_atol(expected, ours.config, 40)


@pytest.mark.parametrize("variant", ["qwen2-gqa-bias", "llama-mha-bias-tied"])
def test_right_padded_rows_match_transformers(loaded, variant):
    hf, ours = loaded[variant]
    ids = torch.randint(3, 500, (2, 20), generator=torch.Generator().manual_seed(1))
    lens = torch.tensor([20, 9])
    mask = (torch.arange(20)[None] < lens[:, None]).long()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours.forward(ids, [None, None], query_lens=lens)
    for row, n in enumerate(lens.tolist()):
        assert (got[row, :n] - expected[row, :n]).abs().max().item() <= reorder_atol(expected, ours.config, 20)


def test_incremental_decoding_with_cache_matches_full_forward(loaded):
    _, ours = loaded["qwen2-gqa-bias"]
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours.forward(ids, [None, None])
        cache = KVCache(ours.config, num_slots=4, max_seq_len=32, dtype=torch.float32)
        slots = torch.tensor([3, 1])  # any slots, in any order
        # 16-token prefill, then 4-token chunk, then single tokens.
        pieces = [(0, 16), (16, 20), (20, 21), (21, 22), (22, 23), (23, 24)]
        outs = []
        for start, stop in pieces:
            pos = torch.arange(start, stop).expand(2, -1)
            outs.append(ours.forward(ids[:, start:stop], [None, None], positions=pos, cache=cache, slots=slots))
    stepped = torch.cat(outs, dim=1)
    assert (stepped - full).abs().max().item() <= reorder_atol(full, ours.config, 24)


@pytest.mark.parametrize("slots", [[2, 0, 3, 1], [5, 9, 1, 7]], ids=["shuffled-range", "scattered"])
def test_decode_rows_in_any_slot_order_match_full_forward(loaded, slots):
    """Decode rows whose slots form a shuffled range read the cache as one view in slot
    order (queries reordered); scattered slots gather. Both give the full forward's logits."""
    from ccoe_common.model.attention_batch import build_attention_batch

    _, ours = loaded["qwen2-gqa-bias"]
    ids = torch.randint(3, 500, (4, 12), generator=torch.Generator().manual_seed(3))
    lens = [12, 7, 10, 9]  # each row's own length: right-padded prefill, then one decode step
    slot_t = torch.tensor(slots)
    with torch.no_grad():
        cache = KVCache(ours.config, num_slots=10, max_seq_len=16, dtype=torch.float32)
        ours.forward(ids[:, :11], [None] * 4, query_lens=torch.tensor(lens) - 1, cache=cache, slots=slot_t)
        last = torch.tensor([[ids[r, n - 1]] for r, n in enumerate(lens)])
        pos = torch.tensor([[n - 1] for n in lens])
        stepped = ours.forward(last, [None] * 4, positions=pos, cache=cache, slots=slot_t,
                               logits_at=torch.zeros(4, dtype=torch.long))
        cos, sin = ours.backbone.rotary(pos, torch.float32)
        batch = build_attention_batch(pos, torch.ones(4, dtype=torch.long), cos, sin, cache, slot_t)
        for r, n in enumerate(lens):
            full = ours.forward(ids[r:r + 1, :n], [None])[0, -1]
            assert (stepped[r] - full).abs().max().item() <= reorder_atol(full, ours.config, n)
    assert (batch.kv_order is not None) == (sorted(slots) == list(range(min(slots), min(slots) + 4)))


def test_parameter_count_matches_transformers(loaded):
    for hf, ours in loaded.values():
        assert ours.info.parameter_count == sum(p.numel() for p in hf.parameters())


def test_whole_prompts_from_zero_take_the_causal_kernel_with_the_masked_result(loaded, monkeypatch):
    from ccoe_common.model import attention_batch as ab
    from ccoe_common.model import backbone as backbone_module

    _, ours = loaded["qwen2-gqa-bias"]
    pos = torch.arange(6).expand(2, 6)
    cos, sin = ours.backbone.rotary(pos, torch.float32)
    fresh = ab.build_attention_batch(pos, torch.tensor([6, 6]), cos, sin)
    padded = ab.build_attention_batch(pos, torch.tensor([6, 4]), cos, sin)
    later = ab.build_attention_batch(pos + 3, torch.tensor([6, 6]), cos, sin)
    assert fresh.causal and fresh.mask is None
    assert not padded.causal and not later.causal and padded.mask is not None
    cache = KVCache(ours.config, num_slots=2, max_seq_len=16, dtype=torch.float32)
    assert ab.build_attention_batch(pos, torch.tensor([6, 6]), cos, sin, cache, torch.arange(2)).causal

    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        causal = ours.forward(ids, [None, None])
        real = ab.build_attention_batch  # the backbone's copy of the name is the one it calls
        monkeypatch.setattr(
            backbone_module, "build_attention_batch",
            lambda *a, **kw: dataclasses.replace(b := real(*a, **kw), causal=False, mask=_causal_mask(b)))
        masked = ours.forward(ids, [None, None])
    assert (causal - masked).abs().max().item() <= reorder_atol(causal, ours.config, 12)


def _causal_mask(batch) -> torch.Tensor:
    p = batch.positions
    return (p[:, None, :] <= p[:, :, None])[:, None]
