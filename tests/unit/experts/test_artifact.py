"""Artifact format: round trip, and one distinct typed error per kind of mismatch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from ccoe_common.experts import errors as E
from ccoe_common.experts.artifact import read_artifact
from ccoe_common.experts.manifest import MANIFEST_FILE, WEIGHTS_FILE
from ccoe_common.model import CCoEModel, Placement
from ccoe_common.model.synthetic import make_checkpoint
from tests.helpers import nudge


@pytest.fixture(scope="module")
def model(deep_qwen2_dir) -> CCoEModel:
    return CCoEModel.from_pretrained(deep_qwen2_dir)


@pytest.fixture()
def artifact(model, tmp_path) -> Path:
    path = tmp_path / "math"
    expert = nudge(model.carve("math", placement=Placement(num_layers=2), domains=["math"]), 0)
    expert.to_artifact(str(path), model.info)
    return path


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST_FILE).read_text())


def _write_manifest(path: Path, data: dict) -> None:
    (path / MANIFEST_FILE).write_text(json.dumps(data))


def test_round_trip_keeps_every_field(model, artifact):
    a = read_artifact(str(artifact))
    m = a.manifest
    assert (m.name, m.version, m.kind, m.layers, m.dtype) == ("math", 1, "ffn", [0, 15], "float32")
    assert m.domains == ["math"] and m.base_model.fingerprint == model.info.fingerprint
    assert m.parameter_count == sum(t.numel() for t in a.tensors.values()) == 2 * 3 * 64 * 128
    assert set(m.tensors) == {f"layers.{i}.mlp.{p}_proj.weight" for i in (0, 15) for p in ("gate", "up", "down")}
    assert len(m.weights_sha256) == 64 and m.created_at.tzinfo is not None


def test_any_fsspec_uri_works(model):
    uri = "memory://ccoe-tests/experts/law"
    model.carve("law", placement=Placement(num_layers=1)).to_artifact(uri, model.info)
    assert read_artifact(uri).manifest.name == "law"
    assert model.load(uri).key.name == "law"
    fsspec.filesystem("memory").rm("/ccoe-tests", recursive=True)


def _expect(exc_type, field_part: str, *message_parts: str):
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc_type)
            self.info = self.ctx.__enter__()
            return self

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            err = self.info.value
            assert field_part in err.field, (err.field, field_part)
            for part in (field_part, "expected", "found", *message_parts):
                assert part in str(err), (part, str(err))
            return handled

    return Check()


def test_corrupted_weights_give_checksum_mismatch(model, artifact):
    data = bytearray((artifact / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (artifact / WEIGHTS_FILE).write_bytes(bytes(data))
    with _expect(E.ChecksumMismatch, "weights_sha256", _manifest(artifact)["weights_sha256"]):
        model.load(str(artifact))


def test_other_backbone_gives_fingerprint_mismatch(model, tmp_path):
    other_dir = make_checkpoint(tmp_path / "other", "qwen2", seed=99, num_hidden_layers=16, vocab_size=384,
                                hidden_size=64, intermediate_size=128)
    other = CCoEModel.from_pretrained(other_dir)
    uri = str(tmp_path / "foreign")
    other.carve("math", placement=Placement(num_layers=1)).to_artifact(uri, other.info)
    with _expect(E.FingerprintMismatch, "base_model.fingerprint", model.info.fingerprint, other.info.fingerprint):
        model.load(uri)


def test_wrong_shape_vs_backbone_gives_shape_mismatch(model, artifact):
    a = read_artifact(str(artifact))
    name = "layers.0.mlp.up_proj.weight"
    tensors = dict(a.tensors)
    tensors[name] = torch.zeros(64, 64)  # the backbone's up_proj is [128, 64]
    m = a.manifest.model_copy(update={"tensors": {**a.manifest.tensors, name: [64, 64]},
                                      "parameter_count": sum(t.numel() for t in tensors.values())})
    shutil.rmtree(artifact)
    from ccoe_common.experts.artifact import write_artifact

    write_artifact(str(artifact), tensors, name=m.name, version=m.version, kind=m.kind, layers=m.layers,
                   base_model=m.base_model)
    with _expect(E.ShapeMismatch, f"tensors.{name}", "[128, 64]", "[64, 64]"):
        model.load(str(artifact))


def test_shape_differing_from_manifest_gives_shape_mismatch(artifact):
    data = _manifest(artifact)
    name = "layers.0.mlp.up_proj.weight"
    data["tensors"][name] = [128, 65]
    _write_manifest(artifact, data)
    with _expect(E.ShapeMismatch, f"tensors.{name}", "[128, 65]", "[128, 64]"):
        read_artifact(str(artifact))


def test_dtype_differing_from_manifest_gives_dtype_mismatch(artifact):
    data = _manifest(artifact)
    data["dtype"] = "bfloat16"
    _write_manifest(artifact, data)
    with _expect(E.DtypeMismatch, "dtype", "bfloat16", "float32"):
        read_artifact(str(artifact))


def test_unsupported_dtype_name_gives_dtype_mismatch(artifact):
    data = _manifest(artifact)
    data["dtype"] = "int8"
    _write_manifest(artifact, data)
    with _expect(E.DtypeMismatch, "dtype", "int8"):
        read_artifact(str(artifact))


def test_over_budget_gives_budget_exceeded(deep_qwen2_dir, tmp_path):
    generous = CCoEModel.from_pretrained(deep_qwen2_dir, budget_fraction=0.5)
    uri = str(tmp_path / "big")
    generous.carve("big", placement=Placement(num_layers=6)).to_artifact(uri, generous.info)
    strict = CCoEModel.from_pretrained(deep_qwen2_dir)
    with _expect(E.BudgetExceeded, "parameter_count", f"{strict.budget_params:,}", f"{6 * 3 * 64 * 128:,}"):
        strict.load(uri)


def test_unknown_kind(model, artifact):
    data = _manifest(artifact)
    data["kind"] = "lora"
    _write_manifest(artifact, data)
    with _expect(E.UnknownExpertKind, "kind", "'lora'", "ffn", "trailing"):
        model.load(str(artifact))


def test_missing_weights_file(artifact):
    (artifact / WEIGHTS_FILE).unlink()
    with _expect(E.ArtifactNotFound, WEIGHTS_FILE):
        read_artifact(str(artifact))


def test_missing_manifest(artifact):
    (artifact / MANIFEST_FILE).unlink()
    with _expect(E.ArtifactNotFound, MANIFEST_FILE):
        read_artifact(str(artifact))


def test_malformed_json(artifact):
    (artifact / MANIFEST_FILE).write_text('{"name": "math", ')
    with _expect(E.ManifestMalformed, MANIFEST_FILE, "invalid JSON"):
        read_artifact(str(artifact))


def test_missing_field_names_the_field(artifact):
    data = _manifest(artifact)
    del data["weights_sha256"]
    _write_manifest(artifact, data)
    with _expect(E.ManifestMalformed, "weights_sha256", "Field required"):
        read_artifact(str(artifact))


def test_wrong_type_names_the_field(artifact):
    data = _manifest(artifact)
    data["version"] = "two"
    _write_manifest(artifact, data)
    with _expect(E.ManifestMalformed, "version", "'two'"):
        read_artifact(str(artifact))


def test_parameter_count_must_match_tensors(artifact):
    data = _manifest(artifact)
    data["parameter_count"] += 1
    _write_manifest(artifact, data)
    with _expect(E.ParameterCountMismatch, "parameter_count"):
        read_artifact(str(artifact))


def test_unlisted_tensor_gives_tensor_set_mismatch(artifact):
    a = read_artifact(str(artifact))
    tensors = {**a.tensors, "layers.0.mlp.extra": torch.zeros(2)}
    save_file(tensors, str(artifact / WEIGHTS_FILE))
    data = _manifest(artifact)
    import hashlib

    data["weights_sha256"] = hashlib.sha256((artifact / WEIGHTS_FILE).read_bytes()).hexdigest()
    _write_manifest(artifact, data)
    with _expect(E.TensorSetMismatch, "tensors", "layers.0.mlp.extra"):
        read_artifact(str(artifact))


def test_layers_that_do_not_fit_give_invalid_placement(model, artifact):
    data = _manifest(artifact)
    data["layers"] = [0, 99]
    _write_manifest(artifact, data)
    with _expect(E.InvalidPlacement, "layers", "[0, 99]"):
        model.load(str(artifact))


def test_refused_artifact_never_becomes_resident(model, artifact):
    (artifact / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(E.ChecksumMismatch):
        model.push(str(artifact))
    assert model.resident() == []
