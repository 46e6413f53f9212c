"""The artifact store is bounded: per-upload size, a store quota, a manifest cap, leftovers
swept; uploads refused, stalled or cancelled leave nothing; exports never mix with other files."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import fsspec
import pytest

from ccoe_common.experts.artifact import read_artifact
from ccoe_common.experts.manifest import MANIFEST_FILE, WEIGHTS_FILE
from ccoe_common.pb import registry_pb2 as pb
from ccoe_common.pb.lenient import Undecodable
from ccoe_common.registry.artifact_store import ArtifactConflict, ArtifactStore
from ccoe_common.registry.config import RegistryConfig
from ccoe_common.registry.errors import BadRequest, LimitExceeded, UploadAbandoned
from ccoe_common.registry.service import receive_upload
from tests.unit.registry.test_artifact_store import make_artifact, uploads_left


@pytest.fixture()
def src(tmp_path: Path) -> str:
    return make_artifact(str(tmp_path / "src" / "math"), rows=1000)  # ~32 KB of weights


def sizes(src: str) -> dict[str, int]:
    return {f: Path(src, f).stat().st_size for f in (WEIGHTS_FILE, MANIFEST_FILE)}


def chunks_of(src: str, size: int = 4096, *, name: str = "math", version: int = 1) -> list[pb.ArtifactChunk]:
    out = []
    for f in (WEIGHTS_FILE, MANIFEST_FILE):
        data = Path(src, f).read_bytes()
        out += [pb.ArtifactChunk(expert=name, version=version, file=f, data=data[i:i + size])
                for i in range(0, len(data), size)]
    return out


async def stream(items: list, *, stall_after: int | None = None) -> AsyncIterator:
    for i, item in enumerate(items):
        if stall_after is not None and i == stall_after:
            await asyncio.sleep(3600)
        yield item


class CancelledStream:
    """Like Ray's gRPCInputStream when the client cancels: the stream just ends, is_cancelled() says why."""

    def __init__(self, items: list) -> None:
        self._items = iter(items)

    def __aiter__(self) -> CancelledStream:
        return self

    async def __anext__(self):
        try:
            return next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None

    def is_cancelled(self) -> bool:
        return True


def test_config_makes_a_bounded_store(tmp_path):
    config = RegistryConfig(artifact_store=str(tmp_path / "s"), max_upload_bytes=10, artifact_store_quota_bytes=20)
    store = ArtifactStore.from_config(config)
    assert (store.root, store.max_upload_bytes, store.quota_bytes) == (str(tmp_path / "s"), 10, 20)
    defaults = RegistryConfig()
    assert (defaults.max_upload_bytes, defaults.artifact_store_quota_bytes) == (8 << 30, 256 << 30)


def test_an_upload_over_the_size_limit_is_refused_before_its_bytes_land(tmp_path, src):
    limit = sizes(src)[WEIGHTS_FILE] // 2
    store = ArtifactStore(str(tmp_path / "store"), max_upload_bytes=limit)
    upload = store.begin_upload("math", 1)
    written = 0
    with pytest.raises(LimitExceeded) as err:
        for chunk in chunks_of(src):
            upload.write(chunk.file, chunk.data)
            written += len(chunk.data)
    assert written <= limit  # the chunk that would cross the limit was never written
    assert err.value.code == "RESOURCE_EXHAUSTED"
    assert f"over registry.max_upload_bytes ({limit} bytes)" in str(err.value)
    upload.abort()
    assert uploads_left(store) == []


def test_an_upload_that_would_fill_the_store_past_its_quota_is_refused(tmp_path, src):
    store = ArtifactStore(str(tmp_path / "store"))
    store.put(src)
    used = store.used_bytes()
    assert used >= sum(sizes(src).values())
    quota = used + sizes(src)[WEIGHTS_FILE] // 2
    bounded = ArtifactStore(store.root, quota_bytes=quota)
    upload = bounded.begin_upload("math", 2)
    with pytest.raises(LimitExceeded) as err:
        for chunk in chunks_of(make_artifact(str(tmp_path / "v2"), version=2, seed=1, rows=1000), version=2):
            upload.write(chunk.file, chunk.data)
    assert f"over registry.artifact_store_quota_bytes ({quota} bytes)" in str(err.value)
    upload.abort()
    assert uploads_left(bounded) == [] and bounded.used_bytes() == used


def test_a_push_copy_obeys_the_quota_but_the_configs_own_experts_do_not(tmp_path, src):
    store = ArtifactStore(str(tmp_path / "store"), quota_bytes=1000)
    with pytest.raises(LimitExceeded, match=r"push of math@1: .* over registry.artifact_store_quota_bytes \(1000"):
        store.put(src)
    assert uploads_left(store) == [] and store.used_bytes() == 0
    stored = store.put(src, enforce_quota=False)
    assert store.put(src).uri == stored.uri  # already stored: nothing to copy, nothing to refuse


def test_a_huge_manifest_is_refused(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    upload = store.begin_upload("math", 1)
    with pytest.raises(BadRequest, match="manifest.json is over 1048576 bytes"):
        for _ in range(300):
            upload.write(MANIFEST_FILE, b"x" * 4096)
    upload.abort()


def test_staging_left_by_a_dead_process_is_swept_once_a_day_old(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    fs, path = fsspec.core.url_to_fs(store.root + "/.uploads")
    old = f"{path}/{int(time.time()) - 2 * 86400}-{uuid.uuid4().hex}"
    fresh = f"{path}/{int(time.time()) - 60}-{uuid.uuid4().hex}"
    for d in (old, fresh):
        fs.makedirs(d)
        fs.pipe_file(f"{d}/{WEIGHTS_FILE}", b"partial")
    upload = store.begin_upload("math", 1)
    left = {p.rsplit("/", 1)[-1] for p in uploads_left(store)}
    assert old.rsplit("/", 1)[-1] not in left and fresh.rsplit("/", 1)[-1] in left
    upload.abort()


def run_upload(store: ArtifactStore, chunks, **kwargs) -> pb.UploadArtifactResponse:
    return asyncio.run(receive_upload(store, chunks, **kwargs))


def test_receive_upload_lands_a_complete_artifact(tmp_path, src):
    store = ArtifactStore(str(tmp_path / "store"))
    response = run_upload(store, stream(chunks_of(src)))
    assert read_artifact(response.uri).manifest.name == "math" and uploads_left(store) == []


@pytest.mark.parametrize("case", ["too-big", "stalled", "cancelled", "undecodable"])
def test_refused_or_abandoned_uploads_leave_nothing_behind(tmp_path, src, case):
    store = ArtifactStore(str(tmp_path / "store"), max_upload_bytes=sizes(src)[WEIGHTS_FILE] // 2)
    chunks = chunks_of(src, 1024)
    if case == "too-big":
        source, error, fragment = stream(chunks), LimitExceeded, "over registry.max_upload_bytes"
    elif case == "stalled":
        source, error, fragment = stream(chunks, stall_after=3), UploadAbandoned, "no chunk for 0.2 s"
    elif case == "cancelled":
        source, error, fragment = CancelledStream(chunks[:3]), UploadAbandoned, "the client cancelled"
    else:
        bad = Undecodable("ccoe.v1.ArtifactChunk", "is not a valid ccoe.v1.ArtifactChunk: truncated")
        source, error = stream([*chunks[:2], bad]), BadRequest
        fragment = "chunk 2: is not a valid ccoe.v1.ArtifactChunk"
    with pytest.raises(error) as err:
        run_upload(store, source, idle_timeout_s=0.2)
    assert fragment in str(err.value)
    assert err.value.code == {"too-big": "RESOURCE_EXHAUSTED", "stalled": "DEADLINE_EXCEEDED",
                              "cancelled": "CANCELLED", "undecodable": "INVALID_ARGUMENT"}[case]
    assert uploads_left(store) == [] and store.used_bytes() == 0


def test_the_store_knows_its_own_version_folders(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    assert store.stored_key(f"{store.root}/math/v12") == ("math", 12)
    assert store.stored_key(f"{store.root}/math/v12/") == ("math", 12)
    for other in (f"{store.root}/math/v0", f"{store.root}/math/v", f"{store.root}/math/v1/x",
                  f"{store.root}/_exports/law", f"{store.root}/_exports/v1", f"{store.root}/Math/v1",
                  f"{store.root}-2/math/v1", "/math/v1"):
        assert store.stored_key(other) is None, other


def test_an_export_never_mixes_with_what_is_already_there(tmp_path, src):
    store = ArtifactStore(str(tmp_path / "store"))
    stored = store.put(src)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(ArtifactConflict, match="already holds other files") as err:
        store.export(stored.uri, str(tmp_path / "occupied"))
    assert err.value.code == "ALREADY_EXISTS" and sorted(p.name for p in (tmp_path / "occupied").iterdir()) == [
        "notes.txt"]
    with pytest.raises(ArtifactConflict, match="is a file"):
        store.export(stored.uri, str(tmp_path / "a-file"))
    (tmp_path / "empty").mkdir()
    assert store.export(stored.uri, str(tmp_path / "empty")).uri == str(tmp_path / "empty")
    assert store.export(stored.uri, str(tmp_path / "empty")).weights_sha256 == stored.weights_sha256  # a retry
