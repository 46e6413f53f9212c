"""One token of one cached sequence in half precision on the CPU takes the one-row path
(fast/one_row.py): the same bits as the batched layers, in fewer ops."""

from __future__ import annotations

import pytest
import torch

from ccoe_common.model import CCoEModel, Placement
from ccoe_common.model.attention_batch import build_attention_batch
from ccoe_common.model.fast import one_row
from ccoe_common.model.kv_cache import KVCache
from ccoe_common.model.layers import Attention
from tests.conftest import CHECKPOINT_VARIANTS
from tests.helpers import nudge

PROMPT, STEPS, SLOT = 7, 5, 2


def _decode(model: CCoEModel, expert: str | None, row_path: bool, seed: int = 0) -> tuple[list[torch.Tensor], KVCache]:
    """Prefill a prompt into slot SLOT, then decode STEPS tokens one at a time (greedy)."""
    model.backbone.row_path = row_path
    cache = KVCache(model.config, num_slots=4, max_seq_len=PROMPT + STEPS + 1, dtype=model.backbone.dtype)
    ids = torch.randint(3, 120, (1, PROMPT), generator=torch.Generator().manual_seed(seed))
    slots = torch.tensor([SLOT])
    pinned = model.resolve([expert])
    steps = []
    with torch.inference_mode():
        logits = model.forward(ids, pinned, cache=cache, slots=slots, logits_at=torch.tensor([PROMPT - 1]))
        for i in range(STEPS):
            token = logits.argmax(-1, keepdim=True)
            logits = model.forward(token, pinned, positions=torch.full((1, 1), PROMPT + i), cache=cache,
                                   slots=slots, logits_at=torch.zeros(1, dtype=torch.long))
            steps.append(logits.clone())
    return steps, cache


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the one-row attention (one_row.attention_row) and the batched one (Attention.forward)."""
    owners = {"attention_row": one_row, "forward": Attention}
    calls = dict.fromkeys(owners, 0)
    for name, owner in owners.items():
        original = getattr(owner, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    return calls


def _assert_same_bits(model: CCoEModel, expert: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch)
    batched, batched_cache = _decode(model, expert, row_path=False)
    assert calls["attention_row"] == 0
    layer_calls = calls["forward"]
    row, row_cache = _decode(model, expert, row_path=True)
    layers = model.config.num_layers
    assert calls["attention_row"] == STEPS * layers, "every decode step takes the one-row path at every layer"
    assert calls["forward"] == layer_calls + layers, "only the prefill takes the batched layers"
    for i, (a, b) in enumerate(zip(batched, row, strict=True)):
        assert torch.equal(a, b), f"decode step {i}: logits differ by {(a.float() - b.float()).abs().max()}"
    assert torch.equal(batched_cache.k, row_cache.k) and torch.equal(batched_cache.v, row_cache.v)
    assert row_cache.k[:, SLOT, :, PROMPT + STEPS - 1].abs().sum() > 0, "the last step's keys were written"


@pytest.mark.parametrize("variant", list(CHECKPOINT_VARIANTS))
def test_bf16_decode_of_one_row_has_the_bits_of_the_batched_layers(checkpoints, variant, monkeypatch):
    model = CCoEModel.from_pretrained(checkpoints[variant], dtype=torch.bfloat16)
    _assert_same_bits(model, None, monkeypatch)


@pytest.mark.parametrize(("kind", "placement"), [("ffn", Placement(strategy="GL", num_layers=2)),
                                                 ("trailing", Placement(strategy="BE", num_layers=1))])
def test_an_expert_row_has_the_bits_of_the_batched_layers(checkpoints, kind, placement, monkeypatch):
    model = CCoEModel.from_pretrained(checkpoints["qwen2-gqa-bias"], dtype=torch.bfloat16)
    model.budget_fraction = 0.5
    model.push(nudge(model.carve("x", kind=kind, placement=placement), 3))
    _assert_same_bits(model, "x", monkeypatch)
    bare, _ = _decode(model, None, row_path=True)
    expert, _ = _decode(model, "x", row_path=True)
    assert not torch.equal(bare[0], expert[0]), "the expert's modules were used"


def test_separate_projections_have_the_same_bits(checkpoints, monkeypatch):
    model = CCoEModel.from_pretrained(checkpoints["llama-mha-bias-tied"], dtype=torch.bfloat16)
    for m in model.backbone.modules():
        if isinstance(m, Attention):
            m._qkv = None  # as after anything that gives q, k, v tensors of their own
    _assert_same_bits(model, None, monkeypatch)


def test_other_forwards_keep_the_batched_layers(checkpoints, monkeypatch):
    calls = _count_calls(monkeypatch)
    fp32 = CCoEModel.from_pretrained(checkpoints["qwen2-gqa-bias"])
    _decode(fp32, None, row_path=True)  # the row path is for half precision on the CPU
    bf16 = CCoEModel.from_pretrained(checkpoints["qwen2-gqa-bias"], dtype=torch.bfloat16)
    cache = KVCache(bf16.config, num_slots=2, max_seq_len=8, dtype=torch.bfloat16)
    with torch.inference_mode():
        bf16.forward(torch.tensor([[5], [6]]), [None, None], cache=cache, slots=torch.tensor([0, 1]))  # two rows
        bf16.forward(torch.tensor([[5, 6]]), [None], cache=cache, slots=torch.tensor([0]))  # two tokens
        bf16.forward(torch.tensor([[5]]), [None])  # no cache
    assert calls["attention_row"] == 0 and calls["forward"] > 0


@pytest.mark.parametrize(("position", "query_len", "has_row"), [(5, 1, True), (0, 1, True), (5, 0, False)])
def test_a_batch_names_its_row_only_for_one_real_cached_token(qwen2_dir, position, query_len, has_row):
    model = CCoEModel.from_pretrained(qwen2_dir)
    cache = KVCache(model.config, num_slots=4, max_seq_len=8, dtype=torch.float32)
    positions = torch.full((1, 1), position)
    cos, sin = model.backbone.rotary(positions, torch.float32)
    batch = build_attention_batch(positions, torch.tensor([query_len]), cos, sin, cache, torch.tensor([3]))
    row = one_row.decode_row(batch)
    assert (row is not None) == has_row
    if has_row:
        assert row.cache is cache and (row.slot, row.position) == (3, position)
        assert torch.equal(row.cos, cos.reshape(-1)) and torch.equal(row.sin, sin.reshape(-1))
