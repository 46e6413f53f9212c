"""Carving experts, the parameter budget, and the mixed-expert forward."""

from __future__ import annotations

import pytest
import torch

from ccoe_common.experts.errors import BudgetExceeded
from ccoe_common.model import CCoEModel, Placement
from ccoe_common.model.placement import PlacementError
from tests.helpers import nudge, reorder_atol


@pytest.fixture()
def model(deep_qwen2_dir) -> CCoEModel:
    return CCoEModel.from_pretrained(deep_qwen2_dir)


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 380, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("kind", "placement"), [("ffn", Placement(strategy="GL", num_layers=3)),
                                                 ("trailing", Placement(strategy="BE", num_layers=1))])
def test_new_expert_reproduces_backbone_exactly(model, kind, placement):
    model.budget_fraction = 0.5
    model.push(model.carve("copy", kind=kind, placement=placement))
    ids = _ids(2, 16)
    with torch.no_grad():
        assert torch.equal(model.forward(ids, model.resolve(["copy", "copy"])), model.forward(ids, [None, None]))


def test_carved_modules_are_copies_not_views(model):
    expert = model.carve("math", placement=Placement(layers=(2,)))
    nudge(expert, 0)
    assert not torch.equal(expert.modules[2].up_proj.weight, model.backbone.layers[2].mlp.up_proj.weight)


def test_default_layer_count_fills_the_budget(model):
    expert = model.carve("math")
    per_layer = expert.parameter_count // len(expert.layers)
    assert len(expert.layers) == 3
    assert expert.parameter_count <= model.budget_params
    assert expert.parameter_count + per_layer > model.budget_params  # one more layer would not fit
    assert expert.layers == tuple(round(j * 15 / (len(expert.layers) - 1)) for j in range(len(expert.layers)))


def test_over_budget_is_refused_naming_both_numbers(model):
    limit = model.budget_params
    with pytest.raises(BudgetExceeded) as err:
        model.carve("big", placement=Placement(strategy="GL", num_layers=16))
    msg = str(err.value)
    assert f"{limit:,}" in msg and "15%" in msg
    assert f"{16 * 3 * 64 * 128:,}" in msg  # sixteen MLPs of 3 x 64 x 128


def test_trailing_expert_must_be_the_tail(model):
    model.budget_fraction = 0.5
    with pytest.raises(PlacementError, match="last 1 layers"):
        model.carve("bad", kind="trailing", placement=Placement(layers=(3,)))
    assert model.carve("tail", kind="trailing").layers[-1] == 15


def test_mixed_batch_rows_equal_rows_alone(model):
    """Backbone + three experts of different kinds and placements in one forward."""
    model.budget_fraction = 0.5
    for seed, (name, kind, placement) in enumerate([
        ("gl", "ffn", Placement(strategy="GL", num_layers=3)),
        ("fe", "ffn", Placement(strategy="FE", num_layers=2)),
        ("tail", "trailing", Placement(strategy="BE", num_layers=2)),
    ]):
        model.push(nudge(model.carve(name, kind=kind, placement=placement), seed))
    selectors = model.resolve(["tail", None, "gl", "fe", None, "gl", "tail"])  # interleaved on purpose
    lens = torch.tensor([12, 5, 12, 9, 12, 3, 7])
    ids = _ids(len(selectors), 12, seed=3)
    with torch.no_grad():
        mixed = model.forward(ids, selectors, query_lens=lens)
        for row, sel in enumerate(selectors):
            n = int(lens[row])
            alone = model.forward(ids[row:row + 1, :n], [sel])[0]
            # Rows of a mixed batch vs the same rows alone: only the summation order differs.
            assert (mixed[row, :n] - alone).abs().max().item() <= reorder_atol(alone, model.config, n), (row, sel)
        # And the experts really differ from the backbone, so the check above means something.
        bare = model.forward(ids, [None] * len(selectors), query_lens=lens)
    for row, sel in enumerate(selectors):
        differs = not torch.allclose(mixed[row], bare[row], atol=1e-3)
        assert differs == (sel is not None), (row, sel)


def test_mixed_batch_with_kv_cache_matches_full_forward(model):
    model.budget_fraction = 0.5
    model.push(nudge(model.carve("gl", placement=Placement(num_layers=3)), 1))
    model.push(nudge(model.carve("tail", kind="trailing", placement=Placement(num_layers=2)), 2))
    from ccoe_common.model.kv_cache import KVCache

    selectors = model.resolve(["tail", None, "gl"])
    ids = _ids(3, 10, seed=4)
    with torch.no_grad():
        full = model.forward(ids, selectors)
        cache = KVCache(model.config, num_slots=3, max_seq_len=16, dtype=torch.float32)
        slots = torch.tensor([2, 0, 1])
        first = model.forward(ids[:, :7], selectors, cache=cache, slots=slots)
        rest = [model.forward(ids[:, i:i + 1], selectors, positions=torch.full((3, 1), i), cache=cache, slots=slots)
                for i in range(7, 10)]
    assert (torch.cat([first, *rest], dim=1) - full).abs().max().item() <= reorder_atol(full, model.config, 10)


def test_a_second_compiled_backbone_in_one_process_is_warned_about(deep_qwen2_dir, caplog, monkeypatch):
    from ccoe_common.model import backbone as backbone_module

    monkeypatch.setattr(backbone_module, "_compiled_backbones", 0)
    first, second = CCoEModel.from_pretrained(deep_qwen2_dir), CCoEModel.from_pretrained(deep_qwen2_dir)
    with caplog.at_level("WARNING", logger=backbone_module.__name__):
        first.backbone.compile_layers()
        assert not caplog.records
        second.backbone.compile_layers()
    assert len(caplog.records) == 1 and "1 others" in caplog.records[0].getMessage()
