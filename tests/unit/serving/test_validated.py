"""The expert a replica validated for a push, handed to the rollout that loads the stored copy."""

from __future__ import annotations

import shutil

import pytest

from ccoe_common.experts.artifact import read_manifest
from ccoe_common.model import CCoEModel, Placement
from ccoe_common.serving.validated import ValidatedExperts
from tests.helpers import nudge


@pytest.fixture()
def model(qwen2_dir) -> CCoEModel:
    return CCoEModel.from_pretrained(qwen2_dir)


def test_the_stored_copy_of_the_validated_artifact_gets_the_validated_expert_once(model, tmp_path):
    source, stored = tmp_path / "src" / "math-v2", tmp_path / "store" / "math" / "v2"
    model.carve("math", placement=Placement(num_layers=1), version=2).to_artifact(str(source), model.info)
    shutil.copytree(source, stored)  # what the artifact store holds after its checked copy
    expert = model.load(str(source))
    cache = ValidatedExperts()
    cache.keep(expert, read_manifest(str(source)).weights_sha256)
    assert cache.take(read_manifest(str(stored))) is expert
    assert cache.take(read_manifest(str(stored))) is None  # handed over once: memory is not held twice


def test_other_weights_under_the_same_name_and_version_are_loaded_afresh(model, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    model.carve("math", placement=Placement(num_layers=1), version=2).to_artifact(str(a), model.info)
    nudge(model.carve("math", placement=Placement(num_layers=1), version=2), 5).to_artifact(str(b), model.info)
    cache = ValidatedExperts()
    cache.keep(model.load(str(a)), read_manifest(str(a)).weights_sha256)
    assert read_manifest(str(b)).key == read_manifest(str(a)).key
    assert cache.take(read_manifest(str(b))) is None
    model.carve("math", placement=Placement(num_layers=1), version=3).to_artifact(str(tmp_path / "c"), model.info)
    assert cache.take(read_manifest(str(tmp_path / "c"))) is None  # another version


def test_an_expired_expert_is_let_go(model, tmp_path):
    model.carve("math", placement=Placement(num_layers=1), version=2).to_artifact(str(tmp_path / "a"), model.info)
    cache = ValidatedExperts(ttl_s=-1.0)  # expired as soon as kept
    manifest = read_manifest(str(tmp_path / "a"))
    cache.keep(model.load(str(tmp_path / "a")), manifest.weights_sha256)
    cache.expire()
    assert cache._kept is None and cache.take(manifest) is None
