"""Push/pop in process: versions, isolation, export, and freeing memory."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from ccoe_common.errors import ExpertNotFound
from ccoe_common.experts.errors import ExpertVersionExists
from ccoe_common.experts.reference import ExpertKey
from ccoe_common.model import CCoEModel, Placement
from tests.helpers import nudge, reorder_atol


@pytest.fixture()
def model(deep_qwen2_dir) -> CCoEModel:
    return CCoEModel.from_pretrained(deep_qwen2_dir)


def _ids() -> torch.Tensor:
    return torch.randint(3, 380, (2, 14), generator=torch.Generator().manual_seed(5))


def test_isolation_push_update_pop_of_b_leave_backbone_and_a_bit_identical(model, tmp_path):
    model.push(nudge(model.carve("a", placement=Placement(num_layers=2)), 1))
    ids = _ids()
    with torch.no_grad():
        backbone_before = model.forward(ids, [None, None])
        a_before = model.forward(ids, model.resolve(["a", "a"]))

        def unchanged() -> bool:
            return torch.equal(model.forward(ids, [None, None]), backbone_before) and torch.equal(
                model.forward(ids, model.resolve(["a", "a"])), a_before)

        model.push(nudge(model.carve("b", placement=Placement(strategy="FE", num_layers=2)), 2))
        assert unchanged()
        b_v2 = nudge(model.carve("b", placement=Placement(strategy="FE", num_layers=2), version=2), 3)
        model.push(b_v2)
        assert unchanged()
        model.pop("b")
        assert unchanged()
        # The B rows really did change something (else the checks above prove little).
        model.push(nudge(model.carve("b", placement=Placement(strategy="FE", num_layers=2)), 2))
        assert not torch.equal(model.forward(ids, model.resolve(["b", "b"])), backbone_before)


def test_several_versions_resident_and_selectable(model):
    model.push(nudge(model.carve("law", placement=Placement(num_layers=2)), 1))
    model.push(nudge(model.carve("law", placement=Placement(num_layers=2), version=2), 2))
    assert model.versions_of("law") == [ExpertKey("law", 1), ExpertKey("law", 2)]
    assert model.get("law").key == ExpertKey("law", 2)  # bare name = newest
    ids = _ids()
    with torch.no_grad():
        v1 = model.forward(ids, model.resolve(["law@1", "law@1"]))
        v2 = model.forward(ids, [ExpertKey("law", 2)] * 2)
        both = model.forward(ids, model.resolve(["law@1", "law@2"]))
    assert not torch.equal(v1, v2)
    atol = reorder_atol(v1, model.config, ids.shape[1])  # one batch for both versions vs each alone
    assert (both[0] - v1[0]).abs().max() <= atol and (both[1] - v2[1]).abs().max() <= atol
    assert model.pop("law", 1) == [ExpertKey("law", 1)]
    assert model.resident() == [ExpertKey("law", 2)]


def test_push_of_resident_version_is_refused(model):
    model.push(model.carve("law", placement=Placement(num_layers=1)))
    with pytest.raises(ExpertVersionExists, match="law@1 is already resident; push version 2"):
        model.push(model.carve("law", placement=Placement(num_layers=1)))


def test_unknown_expert_and_version_errors(model):
    with pytest.raises(ExpertNotFound, match="no resident expert named 'nope'"):
        model.forward(_ids(), model.resolve(["nope", None]))
    model.push(model.carve("law", placement=Placement(num_layers=1)))
    with pytest.raises(ExpertNotFound, match=r"no resident version 3; resident versions: \[1\]"):
        model.get("law@3")
    with pytest.raises(ExpertNotFound):
        model.pop("nope")


def test_forward_takes_resolved_versions_only(model):
    model.push(model.carve("law", placement=Placement(num_layers=1)))
    assert model.resolve(["law", None, "law@1"]) == [ExpertKey("law", 1), None, ExpertKey("law", 1)]
    with pytest.raises(TypeError, match=r"got 'law'; resolve names once with model.resolve"):
        model.forward(_ids(), ["law", None])
    with pytest.raises(ExpertNotFound, match=r"expert law@2 is not resident; resident: \['law@1'\]"):
        model.forward(_ids(), [ExpertKey("law", 2), None])


def test_pop_frees_every_tensor_of_the_expert(model):
    before = model.memory_report()
    model.push(model.carve("tmp", placement=Placement(num_layers=2)))
    refs = [weakref.ref(p) for p in model.get("tmp").parameters()]
    assert refs and model.memory_report().total_bytes > before.total_bytes
    with torch.no_grad():
        model.forward(_ids(), model.resolve(["tmp", None]))  # used once, so forward caches would show up too
    model.pop("tmp")
    gc.collect()
    assert all(r() is None for r in refs), "a popped expert's tensors are still referenced"
    assert model.memory_report() == before


def test_pop_with_export_writes_a_pushable_deep_copy(model, tmp_path):
    model.push(nudge(model.carve("sql", placement=Placement(num_layers=2), domains=["sql"]), 4))
    ids = _ids()
    with torch.no_grad():
        original = model.forward(ids, model.resolve(["sql", "sql"]))
    uri = str(tmp_path / "sql-export")
    assert model.pop("sql", export_to=uri) == [ExpertKey("sql", 1)]
    assert model.resident() == []
    copy = model.load(uri)
    assert copy.domains == ["sql"]
    # Train further (here: a nudge) and push back as version 2.
    nudge(copy, 9)
    copy.key = ExpertKey("sql", 2)
    model.push(copy)
    with torch.no_grad():
        retrained = model.forward(ids, model.resolve(["sql", "sql"]))
    assert not torch.equal(retrained, original)
    # The untouched export still reproduces the original exactly.
    model.push(uri)
    with torch.no_grad():
        assert torch.equal(model.forward(ids, model.resolve(["sql@1", "sql@1"])), original)


def test_memory_report_counts_backbone_and_experts(model):
    model.push(model.carve("a", placement=Placement(num_layers=2)))
    report = model.memory_report()
    assert report.backbone_bytes == model.info.parameter_count * 4
    assert report.experts == {"a@1": 2 * 3 * 64 * 128 * 4}
