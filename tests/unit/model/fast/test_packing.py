"""q, k and v stacked in one tensor: same values and names, one kernel, and safe to unstack."""

from __future__ import annotations

import copy

import pytest
import torch

from ccoe_common.experts.artifact import read_artifact
from ccoe_common.experts.reference import ExpertKey
from ccoe_common.model import CCoEModel, Placement
from ccoe_common.model.fast.packing import RowStack
from ccoe_common.model.layers import Attention
from tests.helpers import nudge, reorder_atol


@pytest.fixture()
def model(checkpoints) -> CCoEModel:
    return CCoEModel.from_pretrained(checkpoints["qwen2-gqa-bias"])  # q/k/v have biases


def _attentions(module: torch.nn.Module) -> list[Attention]:
    return [m for m in module.modules() if isinstance(m, Attention)]


def _views(attn: Attention) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    return None if attn._qkv is None else attn._qkv.view((attn.q_proj, attn.k_proj, attn.v_proj))


def _logits(model: CCoEModel, experts: list[ExpertKey | None]) -> torch.Tensor:
    ids = torch.randint(3, 380, (len(experts), 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model.forward(ids, experts)


def test_a_loaded_backbone_is_stacked_with_its_names_and_values(model, checkpoints):
    attn = _attentions(model.backbone)[0]
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr(), "one tensor holds q, k and v"
    with torch.inference_mode():
        weight, bias = _views(attn)
    assert torch.equal(weight, torch.cat([q, k, v]))
    assert torch.equal(bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    names = set(model.backbone.state_dict())
    assert {"layers.0.self_attn.q_proj.weight", "layers.0.self_attn.v_proj.bias"} <= names
    assert not any("qkv" in n for n in names), "stacking adds no parameter"


def test_stacked_and_separate_projections_give_the_same_logits(model):
    calls = []
    for attn in _attentions(model.backbone):
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.register_forward_hook(lambda *a: calls.append(1))
    stacked = _logits(model, [None, None])
    assert calls == [], "stacked q/k/v are one product, not three module calls"
    for attn in _attentions(model.backbone):
        attn._qkv = None  # back to three separate products
    assert (_logits(model, [None, None]) - stacked).abs().max() <= reorder_atol(stacked, model.config, 9)
    assert len(calls) == 3 * len(_attentions(model.backbone))


def test_anything_that_replaces_a_weight_unstacks_and_the_layer_still_works(model):
    want = _logits(model, [None])
    attn = _attentions(model.backbone)[1]
    fresh = {n: p.detach().clone() for n, p in attn.named_parameters()}
    attn.load_state_dict(fresh, assign=True)  # new tensors, same values
    with torch.inference_mode():
        assert _views(attn) is None
    assert (_logits(model, [None]) - want).abs().max() <= reorder_atol(want, model.config, 9)
    model.backbone.to(torch.float64)
    with torch.inference_mode():
        assert all(_views(a) is None for a in _attentions(model.backbone))
    assert _logits(model, [None]).dtype == torch.float64


def test_a_deep_copy_keeps_only_addresses_that_no_longer_match(model):
    attn = _attentions(model.backbone)[0]
    twin = copy.deepcopy(attn)
    assert isinstance(twin._qkv, RowStack) and all(isinstance(p, int) for p in twin._qkv.weights)
    with torch.inference_mode():
        assert _views(twin) is None
    twin.stack()
    with torch.inference_mode():
        assert _views(twin) is not None


def test_training_sees_the_separate_parameters(model):
    attn = _attentions(model.backbone)[0]
    attn.requires_grad_(True)
    assert _views(attn) is None, "grad mode with trainable weights must not use the stacked view"
    with torch.no_grad():
        assert _views(attn) is not None
    ids = torch.randint(3, 380, (1, 6))
    model.forward(ids, [None]).sum().backward()
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_a_trailing_expert_with_stacked_attention_writes_and_reads_back(model, tmp_path):
    model.budget_fraction = 0.5
    expert = nudge(model.carve("tail", kind="trailing", placement=Placement(num_layers=1)), 1)
    with torch.inference_mode():
        assert all(_views(a) is not None for m in expert.modules.values() for a in _attentions(m))
    expert.to_artifact(str(tmp_path / "tail"), model.info)
    stored = read_artifact(str(tmp_path / "tail")).tensors
    for name, value in expert.state_dict().items():
        assert torch.equal(stored[name], value), name
    loaded = model.load(str(tmp_path / "tail"))
    with torch.inference_mode():
        assert all(_views(a) is not None for m in loaded.modules.values() for a in _attentions(m))
