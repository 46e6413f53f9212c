"""Artifact store: verified streaming copies in, out and by upload, idempotent and immutable."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch

from ccoe_common.experts.artifact import read_artifact, write_artifact
from ccoe_common.experts.errors import ArtifactNotFound, ChecksumMismatch, ManifestMalformed
from ccoe_common.experts.manifest import MANIFEST_FILE, WEIGHTS_FILE, BaseModelRef
from ccoe_common.registry.artifact_store import ArtifactConflict, ArtifactStore

BASE = BaseModelRef(fingerprint="0" * 64, model_type="qwen2", num_layers=2, hidden_size=8, parameter_count=4096)


def make_artifact(uri: str, *, name: str = "math", version: int = 1, seed: int = 0, rows: int = 4) -> str:
    gen = torch.Generator().manual_seed(seed)
    tensors = {"layers.0.mlp.up_proj.weight": torch.randn(rows, 8, generator=gen)}
    write_artifact(uri, tensors, name=name, version=version, kind="ffn", layers=[0], base_model=BASE)
    return uri


def flip_byte(uri: str) -> None:
    fs, path = fsspec.core.url_to_fs(uri.rstrip("/") + "/" + WEIGHTS_FILE)
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0xFF  # the last byte is tensor data, so the file still parses
    fs.pipe_file(path, bytes(data))


def exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def uploads_left(store: ArtifactStore) -> list[str]:
    fs, path = fsspec.core.url_to_fs(store.root + "/.uploads")
    return fs.ls(path) if fs.exists(path) else []


@pytest.fixture()
def mem_root() -> Iterator[str]:
    root = f"memory://ccoe-tests-{uuid.uuid4().hex}"
    yield root
    fs, path = fsspec.core.url_to_fs(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path: Path, mem_root: str) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "store") if request.param == "local" else mem_root + "/store")


@pytest.fixture()
def src(tmp_path: Path) -> str:
    return make_artifact(str(tmp_path / "src" / "math"))


def test_put_copies_and_the_copy_reads_back(store, src):
    stored = store.put(src)
    assert stored.uri == store.uri_for("math", 1) == f"{store.root}/math/v1"
    assert (stored.name, stored.version) == ("math", 1)
    copy = read_artifact(stored.uri)
    up = "layers.0.mlp.up_proj.weight"
    assert torch.equal(copy.tensors[up], read_artifact(src).tensors[up])
    assert stored.weights_sha256 == copy.manifest.weights_sha256 == stored.manifest.weights_sha256
    fs, path = fsspec.core.url_to_fs(stored.uri)
    assert stored.bytes == fs.size(f"{path}/{WEIGHTS_FILE}") + fs.size(f"{path}/{MANIFEST_FILE}")
    assert uploads_left(store) == []


def test_progress_is_monotonic_and_ends_at_total(store, tmp_path):
    big = make_artifact(str(tmp_path / "big"), rows=40_000)  # 1.28 MB of weights: two 1 MiB chunks
    calls: list[tuple[int, int]] = []
    stored = store.put(big, progress=lambda done, total: calls.append((done, total)))
    assert len(calls) >= 3
    assert {total for _, total in calls} == {stored.bytes}
    dones = [done for done, _ in calls]
    assert dones == sorted(dones) and dones[-1] == stored.bytes


def test_corrupted_weights_are_refused_and_nothing_appears(store, src):
    flip_byte(src)
    with pytest.raises(ChecksumMismatch) as e:
        store.put(src)
    assert e.value.field == "weights_sha256" and e.value.expected != e.value.found
    assert not exists(store.uri_for("math", 1)) and not exists(f"{store.root}/math")
    assert uploads_left(store) == []


def test_missing_weights_are_refused_with_artifact_not_found(store, src):
    os.remove(os.path.join(src, WEIGHTS_FILE))
    with pytest.raises(ArtifactNotFound) as e:
        store.put(src)
    assert e.value.field == WEIGHTS_FILE
    assert not exists(store.uri_for("math", 1))


def test_missing_manifest_is_refused_with_artifact_not_found(store, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactNotFound) as e:
        store.put(str(tmp_path / "empty"))
    assert e.value.field == MANIFEST_FILE


def test_re_put_of_the_same_artifact_is_idempotent_and_copies_nothing(tmp_path, src):
    store = ArtifactStore(str(tmp_path / "store"))
    first = store.put(src)
    weights = Path(first.uri) / WEIGHTS_FILE
    before = weights.stat()
    calls: list[tuple[int, int]] = []
    second = store.put(make_artifact(str(tmp_path / "again" / "math")), progress=lambda d, t: calls.append((d, t)))
    after = weights.stat()
    assert second == first
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert calls == [(first.bytes, first.bytes)]


def test_re_put_with_different_weights_is_a_conflict(store, src, tmp_path):
    first = store.put(src)
    other = make_artifact(str(tmp_path / "other" / "math"), seed=1)
    with pytest.raises(ArtifactConflict, match="new version"):
        store.put(other)
    assert store.verify(first.uri) == first.weights_sha256
    assert uploads_left(store) == []


def test_put_of_the_stored_copy_itself_verifies_and_returns_it(store, src):
    first = store.put(src)
    assert store.put(first.uri) == first
    flip_byte(first.uri)
    with pytest.raises(ChecksumMismatch):
        store.put(first.uri)


def test_upload_in_chunks_then_finish_gives_a_readable_artifact(store, src):
    files = {f: Path(src, f).read_bytes() for f in (WEIGHTS_FILE, MANIFEST_FILE)}
    upload = store.begin_upload("math", 1)
    for f, data in files.items():
        for i in range(0, len(data), 50):
            upload.write(f, data[i:i + 50])
    assert upload.bytes_received == sum(len(d) for d in files.values())
    stored = upload.finish()
    assert stored.uri == store.uri_for("math", 1)
    assert read_artifact(stored.uri).manifest.weights_sha256 == read_artifact(src).manifest.weights_sha256
    assert uploads_left(store) == []


def test_upload_with_wrong_name_is_refused_and_abort_cleans_staging(store, src):
    upload = store.begin_upload("law", 1)
    for f in (WEIGHTS_FILE, MANIFEST_FILE):
        upload.write(f, Path(src, f).read_bytes())
    assert len(uploads_left(store)) == 1
    with pytest.raises(ManifestMalformed) as e:
        upload.finish()
    assert (e.value.field, e.value.expected, e.value.found) == ("name", "law", "math")
    assert not exists(store.uri_for("law", 1)) and not exists(store.uri_for("math", 1))
    upload.abort()
    upload.abort()
    assert uploads_left(store) == []


def test_upload_with_corrupt_weights_is_refused(store, src):
    upload = store.begin_upload("math", 1)
    upload.write(WEIGHTS_FILE, Path(src, WEIGHTS_FILE).read_bytes()[:-1] + b"\x00")
    upload.write(MANIFEST_FILE, Path(src, MANIFEST_FILE).read_bytes())
    with pytest.raises(ChecksumMismatch):
        upload.finish()
    upload.abort()
    assert not exists(store.uri_for("math", 1)) and uploads_left(store) == []


def test_upload_rejects_unknown_files_and_bad_keys(store):
    upload = store.begin_upload("math", 1)
    with pytest.raises(ValueError, match="'model.bin'"):
        upload.write("model.bin", b"x")
    upload.abort()
    with pytest.raises(ValueError, match="'Bad Name'"):
        store.begin_upload("Bad Name", 1)
    with pytest.raises(ValueError, match="version"):
        store.begin_upload("math", 0)
    with pytest.raises(ValueError, match=r"'\.\./x'"):
        store.uri_for("../x", 1)


def test_export_to_another_filesystem_works(store, src, tmp_path, mem_root):
    stored = store.put(src)
    dest = str(tmp_path / "out" / "math") if store.root.startswith("memory://") else mem_root + "/out/math"
    exported = store.export(stored.uri, dest)
    assert exported.uri == dest and exported.weights_sha256 == stored.weights_sha256
    assert read_artifact(dest).manifest == stored.manifest
    fs, path = fsspec.core.url_to_fs(dest)
    assert sorted(posix.rsplit("/", 1)[-1] for posix in fs.ls(path, detail=False)) == [MANIFEST_FILE, WEIGHTS_FILE]
    assert fs.ls(path.rsplit("/", 1)[0], detail=False) == [path]  # no staged part file left beside it


def test_export_of_corrupt_copy_leaves_nothing(store, src, tmp_path):
    stored = store.put(src)
    flip_byte(stored.uri)
    with pytest.raises(ChecksumMismatch):
        store.export(stored.uri, str(tmp_path / "out" / "math"))
    assert not (tmp_path / "out" / "math").exists() and list((tmp_path / "out").iterdir()) == []


def test_verify_returns_the_sha_and_detects_corruption(store, src):
    stored = store.put(src)
    assert store.verify(stored.uri) == stored.weights_sha256
    flip_byte(stored.uri)
    with pytest.raises(ChecksumMismatch) as e:
        store.verify(stored.uri)
    assert e.value.expected == stored.weights_sha256 and e.value.found != stored.weights_sha256


def test_root_expands_home_and_is_created(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    store = ArtifactStore("~/experts/")
    assert store.root == str(tmp_path / "experts") and (tmp_path / "experts").is_dir()
