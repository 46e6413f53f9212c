"""The registry's own immutable copy of every registered expert version; replicas load from here.

A stored version lives at f"{root}/{name}/v{version}", e.g. "s3://ccoe/experts/math/v2", and holds
manifest.json and weights.safetensors like any artifact. Weights are streamed (never held whole in
memory), hashed on the way and checked against the manifest before anything becomes visible at the
destination: they are staged aside, moved into place, and the manifest is written last, so its
presence means "complete". Two pushes of one version racing each other are serialized by the
registry's compare-and-set, not here.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import fsspec
from fsspec import AbstractFileSystem

from ccoe_common.errors import CCoEError
from ccoe_common.experts.artifact import _join, read_manifest
from ccoe_common.experts.errors import ArtifactNotFound, ChecksumMismatch, ManifestMalformed
from ccoe_common.experts.manifest import MANIFEST_FILE, WEIGHTS_FILE, ExpertManifest
from ccoe_common.experts.reference import NAME_RE

CHUNK = 1 << 20
UPLOADS = ".uploads"

ProgressFn = Callable[[int, int], None]
"""(bytes_done, bytes_total); called as chunks move, the last call has done == total."""


@dataclass(frozen=True)
class StoredArtifact:
    uri: str
    name: str
    version: int
    bytes: int
    weights_sha256: str
    manifest: ExpertManifest


class ArtifactConflict(CCoEError):
    """The destination already holds that name@version with different weights. The registry
    answers a push that meets one with ArtifactRefused (INVALID_ARGUMENT)."""

    code = "ALREADY_EXISTS"


def _fs(uri: str) -> tuple[AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def _open_weights(uri: str) -> tuple[IO[bytes], int]:
    fs, path = _fs(_join(uri, WEIGHTS_FILE))
    try:
        return fs.open(path, "rb"), fs.size(path)
    except FileNotFoundError as e:
        raise ArtifactNotFound(f"expert artifact {uri!r}", WEIGHTS_FILE, "a file", "nothing",
                               "the artifact is incomplete or the URI is wrong") from e


def _check_sha(uri: str, manifest: ExpertManifest, found: str) -> None:
    if found != manifest.weights_sha256:
        raise ChecksumMismatch(f"expert artifact {uri!r}", "weights_sha256", manifest.weights_sha256, found,
                               "the weights file is corrupt or was changed after the manifest was written")


def _stored(uri: str, manifest: ExpertManifest) -> StoredArtifact:
    fs, path = _fs(uri)
    size = fs.size(_join(path, WEIGHTS_FILE)) + fs.size(_join(path, MANIFEST_FILE))
    return StoredArtifact(uri, manifest.name, manifest.version, size, manifest.weights_sha256, manifest)


def _existing(dest: str, manifest: ExpertManifest, hint: str) -> StoredArtifact | None:
    """The complete artifact already at `dest` if its weights are these; None if there is none."""
    fs, path = _fs(dest)
    if not fs.exists(_join(path, MANIFEST_FILE)):
        return None
    held = read_manifest(dest)
    if held.weights_sha256 != manifest.weights_sha256:
        raise ArtifactConflict(
            f"{dest!r} already holds {held.name}@{held.version} with weights_sha256 {held.weights_sha256!r}, "
            f"not {manifest.weights_sha256!r} ({hint})")
    return _stored(dest, held)


def _install(dest: str, manifest: ExpertManifest, staged: str, hint: str) -> StoredArtifact:
    """Move verified weights from `staged` (a path on dest's filesystem) into place, manifest last."""
    # Checked again here, not only before copying: another writer may have finished meanwhile.
    if (held := _existing(dest, manifest, hint)) is not None:
        return held
    fs, path = _fs(dest)
    fs.makedirs(path, exist_ok=True)
    fs.mv(staged, _join(path, WEIGHTS_FILE))
    fs.pipe_file(_join(path, MANIFEST_FILE), manifest.model_dump_json(indent=2).encode())
    return _stored(dest, manifest)


def _copy(src: str, dest: str, staged: str, progress: ProgressFn | None, hint: str) -> StoredArtifact:
    """Copy the artifact at `src` to `dest`, streaming the weights through `staged` while hashing."""
    manifest = read_manifest(src)
    report = progress or (lambda done, total: None)
    if (held := _existing(dest, manifest, hint)) is not None:
        report(held.bytes, held.bytes)
        return held
    body_len = len(manifest.model_dump_json(indent=2).encode())
    fs, _ = _fs(dest)
    fs.makedirs(posixpath.dirname(staged), exist_ok=True)
    reader, size = _open_weights(src)
    total, done, sha = size + body_len, 0, hashlib.sha256()
    try:
        with reader, fs.open(staged, "wb") as out:
            while chunk := reader.read(CHUNK):
                sha.update(chunk)
                out.write(chunk)
                done += len(chunk)
                report(done, total)
        _check_sha(src, manifest, sha.hexdigest())
        stored = _install(dest, manifest, staged, hint)
    finally:
        if fs.exists(staged):
            fs.rm(staged)
    report(total, total)
    return stored


class ArtifactStore:
    """Expert versions under one root, e.g. ArtifactStore("s3://ccoe/experts") or ("~/.ccoe/experts")."""

    def __init__(self, root: str):
        if "://" not in root:
            root = os.path.abspath(os.path.expanduser(root))
        self.root = root.rstrip("/")
        self._fs, self._path = _fs(self.root)
        self._fs.makedirs(self._path, exist_ok=True)

    def uri_for(self, name: str, version: int) -> str:
        # Validated here because the name becomes a path: "../x" must never escape the root.
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"expert name {name!r} does not match {NAME_RE.pattern}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"expert {name!r}: version must be an integer >= 1, got {version!r}")
        return f"{self.root}/{name}/v{version}"

    def put(self, src_uri: str, *, progress: ProgressFn | None = None) -> StoredArtifact:
        manifest = read_manifest(src_uri)
        dest = self.uri_for(manifest.name, manifest.version)
        src_fs, src_path = _fs(src_uri)
        if src_fs.protocol == self._fs.protocol and src_path == _fs(dest)[1]:
            self.verify(dest)
            stored = _stored(dest, manifest)
            if progress:
                progress(stored.bytes, stored.bytes)
            return stored
        staging = f"{self._path}/{UPLOADS}/{uuid.uuid4().hex}"
        try:
            return _copy(src_uri, dest, f"{staging}/{WEIGHTS_FILE}", progress,
                         "a stored version never changes: push the new weights as a new version")
        finally:
            if self._fs.exists(staging):
                self._fs.rm(staging, recursive=True)

    def discard(self, name: str, version: int) -> bool:
        """Remove a stored version the registry never registered (a refused or lost push), so
        the same name@version can be pushed again with other weights. True if one was there."""
        dest = _fs(self.uri_for(name, version))[1]
        if not self._fs.exists(dest):
            return False
        self._fs.rm(dest, recursive=True)
        return True

    def begin_upload(self, name: str, version: int) -> Upload:
        return Upload(self, name, version)

    def export(self, src_uri: str, dest_uri: str, *, progress: ProgressFn | None = None) -> StoredArtifact:
        dest_path = _fs(dest_uri)[1]
        # Staged beside dest, not inside it, so a refused copy leaves nothing at dest.
        staged = f"{dest_path}.{uuid.uuid4().hex}.part"
        return _copy(src_uri, dest_uri.rstrip("/"), staged, progress, "export to an empty destination")

    def verify(self, uri: str) -> str:
        manifest = read_manifest(uri)
        reader, _ = _open_weights(uri)
        sha = hashlib.sha256()
        with reader:
            while chunk := reader.read(CHUNK):
                sha.update(chunk)
        _check_sha(uri, manifest, sha.hexdigest())
        return sha.hexdigest()


class Upload:
    """An artifact arriving file by file in chunks (a gRPC client stream), staged until finish()."""

    def __init__(self, store: ArtifactStore, name: str, version: int):
        self.dest = store.uri_for(name, version)
        self.name, self.version = name, version
        self.uri = f"{store.root}/{UPLOADS}/{uuid.uuid4().hex}"
        self.bytes_received = 0
        self._fs, self._path = _fs(self.uri)
        self._fs.makedirs(self._path, exist_ok=True)
        self._files: dict[str, IO[bytes]] = {}
        self._sha = hashlib.sha256()
        self._closed = False

    def write(self, file: str, data: bytes) -> None:
        if file not in (MANIFEST_FILE, WEIGHTS_FILE):
            raise ValueError(f"upload of {self.name}@{self.version}: file {file!r} is not "
                             f"{MANIFEST_FILE!r} or {WEIGHTS_FILE!r}")
        if self._closed:
            raise ValueError(f"upload of {self.name}@{self.version} is already finished or aborted; begin a new one")
        if file not in self._files:
            self._files[file] = self._fs.open(_join(self._path, file), "wb")
        self._files[file].write(data)
        if file == WEIGHTS_FILE:
            self._sha.update(data)
        self.bytes_received += len(data)

    def finish(self) -> StoredArtifact:
        """Check the staged artifact and move it into the store; on error call abort()."""
        self._close_files()
        subject = f"upload of {self.name}@{self.version}"
        manifest = read_manifest(self.uri)
        for field, want, got in (("name", self.name, manifest.name), ("version", self.version, manifest.version)):
            if want != got:
                raise ManifestMalformed(subject, field, want, got, "the manifest must describe the version uploaded")
        if WEIGHTS_FILE not in self._files:
            raise ArtifactNotFound(subject, WEIGHTS_FILE, "a file", "nothing", "send the weights before finishing")
        _check_sha(self.uri, manifest, self._sha.hexdigest())
        stored = _install(self.dest, manifest, _join(self._path, WEIGHTS_FILE),
                          "a stored version never changes: push the new weights as a new version")
        self.abort()
        return stored

    def abort(self) -> None:
        self._close_files()
        if self._fs.exists(self._path):
            self._fs.rm(self._path, recursive=True)

    def _close_files(self) -> None:
        self._closed = True
        for f in self._files.values():
            f.close()
