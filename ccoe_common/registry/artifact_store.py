"""The registry's own immutable copy of every registered expert version; replicas load from here.

A stored version lives at f"{root}/{name}/v{version}", e.g. "s3://ccoe/experts/math/v2", and holds
manifest.json and weights.safetensors like any artifact. Weights are streamed (never held whole in
memory), hashed on the way and checked against the manifest before anything becomes visible at the
destination: they are staged aside, moved into place, and the manifest is written last, so its
presence means "complete". Two pushes of one version racing each other are serialized by the
registry's compare-and-set, not here.

The store is bounded (invariant 9): an upload over `max_upload_bytes`, or one that would take
the store past `quota_bytes`, is refused while it streams and its bytes removed. Staging
folders are named by their start time, so one left by a process that died mid-upload is
removed by a later upload once it is a day old.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import fsspec
from fsspec import AbstractFileSystem

from ccoe_common.errors import CCoEError, quote
from ccoe_common.experts.artifact import _join, read_manifest
from ccoe_common.experts.errors import ArtifactNotFound, ChecksumMismatch, ManifestMalformed
from ccoe_common.experts.manifest import MANIFEST_FILE, WEIGHTS_FILE, ExpertManifest
from ccoe_common.experts.reference import NAME_RE
from ccoe_common.registry.config import DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_STORE_QUOTA_BYTES, RegistryConfig
from ccoe_common.registry.errors import BadRequest, LimitExceeded

log = logging.getLogger(__name__)
CHUNK = 1 << 20
UPLOADS = ".uploads"
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few KiB; it is parsed whole, so it is capped on its own
STALE_UPLOAD_S = 24 * 3600  # an upload idle for 60 s is abandoned; a staging folder a day old is a leftover

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


def _check_destination(dest: str) -> None:
    """An export goes to a folder that does not exist yet, is empty, or already holds this very
    artifact (a retried export); anything else there is refused rather than mixed with it."""
    fs, path = _fs(dest)
    if not fs.exists(path) or fs.exists(_join(path, MANIFEST_FILE)):
        return
    if not fs.isdir(path):
        raise ArtifactConflict(f"export_to: {quote(dest)} is a file; give a folder that does not exist yet or is empty")
    if fs.ls(path, detail=False):
        raise ArtifactConflict(f"export_to: {quote(dest)} already holds other files; give a folder that does not "
                               "exist yet or is empty")


def _staging_name() -> str:
    return f"{int(time.time())}-{uuid.uuid4().hex}"


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
    """Expert versions under one root, e.g. ArtifactStore("s3://ccoe/experts") or ("~/.ccoe/experts").
    `max_upload_bytes` bounds one upload and `quota_bytes` the whole store (see from_config)."""

    def __init__(self, root: str, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                 quota_bytes: int = DEFAULT_STORE_QUOTA_BYTES):
        if "://" not in root:
            root = os.path.abspath(os.path.expanduser(root))
        self.root = root.rstrip("/")
        self.max_upload_bytes, self.quota_bytes = max_upload_bytes, quota_bytes
        self._fs, self._path = _fs(self.root)
        self._fs.makedirs(self._path, exist_ok=True)

    @classmethod
    def from_config(cls, config: RegistryConfig) -> ArtifactStore:
        return cls(config.artifact_store, max_upload_bytes=config.max_upload_bytes,
                   quota_bytes=config.artifact_store_quota_bytes)

    def used_bytes(self) -> int:
        """Bytes under the root now, staging included."""
        return int(self._fs.du(self._path, total=True)) if self._fs.exists(self._path) else 0

    def check_quota(self, what: str, used: int, adding: int) -> None:
        """LimitExceeded if `adding` bytes on top of `used` would take the store past its quota."""
        if used + adding > self.quota_bytes:
            raise LimitExceeded(f"{what}: the artifact store would hold {used + adding} bytes, over "
                                f"registry.artifact_store_quota_bytes ({self.quota_bytes} bytes); remove versions "
                                "no longer needed from the store or raise the quota")

    def sweep_uploads(self, older_than_s: float = STALE_UPLOAD_S) -> list[str]:
        """Remove staging folders older than `older_than_s` (left by a process that died mid-upload)."""
        staging = f"{self._path}/{UPLOADS}"
        if not self._fs.exists(staging):
            return []
        removed = []
        for entry in self._fs.ls(staging, detail=False):
            started = posixpath.basename(entry.rstrip("/")).split("-", 1)[0]
            if started.isdigit() and int(started) < time.time() - older_than_s:
                self._fs.rm(entry, recursive=True)
                removed.append(entry)
        if removed:
            log.info("removed %d abandoned staging folder(s) from %s/%s", len(removed), self.root, UPLOADS)
        return removed

    def uri_for(self, name: str, version: int) -> str:
        # Validated here because the name becomes a path: "../x" must never escape the root.
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"expert name {quote(name)} does not match {NAME_RE.pattern}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"expert {quote(name)}: version must be an integer >= 1, got {version!r}")
        return f"{self.root}/{name}/v{version}"

    def put(self, src_uri: str, *, progress: ProgressFn | None = None, enforce_quota: bool = True) -> StoredArtifact:
        """Copy the artifact at `src_uri` in. With `enforce_quota` (pushes) a copy that would
        take the store past its quota is refused; the config's own experts are not."""
        manifest = read_manifest(src_uri)
        dest = self.uri_for(manifest.name, manifest.version)
        src_fs, src_path = _fs(src_uri)
        if src_fs.protocol == self._fs.protocol and src_path == _fs(dest)[1]:
            self.verify(dest)
            stored = _stored(dest, manifest)
            if progress:
                progress(stored.bytes, stored.bytes)
            return stored
        if enforce_quota and not self._fs.exists(_join(_fs(dest)[1], MANIFEST_FILE)):
            weights_fs, weights_path = _fs(_join(src_uri, WEIGHTS_FILE))
            try:
                size = weights_fs.size(weights_path)
            except FileNotFoundError:
                size = 0  # _copy names the missing file
            self.check_quota(f"push of {manifest.name}@{manifest.version}", self.used_bytes(), size)
        staging = f"{self._path}/{UPLOADS}/{_staging_name()}"
        try:
            return _copy(src_uri, dest, f"{staging}/{WEIGHTS_FILE}", progress,
                         "a stored version never changes: push the new weights as a new version")
        finally:
            if self._fs.exists(staging):
                self._fs.rm(staging, recursive=True)

    def stored_key(self, uri: str) -> tuple[str, int] | None:
        """(name, version) if `uri` is where this store keeps a version ("<root>/math/v2"), else None."""
        bases = {self.root}
        if "://" not in self.root:
            bases.add(os.path.realpath(self.root))
        for base in bases:
            if uri.startswith(base + "/"):
                name, _, tail = uri[len(base) + 1:].rstrip("/").partition("/")
                if NAME_RE.fullmatch(name) and len(tail) > 1 and tail[0] == "v" and tail[1:].isdigit() \
                        and tail[1] != "0":
                    return name, int(tail[1:])
        return None

    def discard(self, name: str, version: int) -> bool:
        """Remove a stored version the registry never registered (a refused or lost push), so
        the same name@version can be pushed again with other weights. True if one was there."""
        dest = _fs(self.uri_for(name, version))[1]
        if not self._fs.exists(dest):
            return False
        self._fs.rm(dest, recursive=True)
        return True

    def begin_upload(self, name: str, version: int) -> Upload:
        self.sweep_uploads()
        return Upload(self, name, version)

    def export(self, src_uri: str, dest_uri: str, *, progress: ProgressFn | None = None) -> StoredArtifact:
        """Copy a stored version to `dest_uri` (checked by LocationPolicy first): a folder that
        does not exist yet or is empty; the same artifact already there is left as it is."""
        _check_destination(dest_uri)
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
        self.store = store
        self._used_at_start = store.used_bytes()
        self.uri = f"{store.root}/{UPLOADS}/{_staging_name()}"
        self.bytes_received = 0
        self._file_bytes: dict[str, int] = {}
        self._fs, self._path = _fs(self.uri)
        self._fs.makedirs(self._path, exist_ok=True)
        self._files: dict[str, IO[bytes]] = {}
        self._sha = hashlib.sha256()
        self._closed = False

    def write(self, file: str, data: bytes) -> None:
        if file not in (MANIFEST_FILE, WEIGHTS_FILE):
            raise ValueError(f"upload of {self.name}@{self.version}: file {quote(file)} is not "
                             f"{MANIFEST_FILE!r} or {WEIGHTS_FILE!r}")
        if self._closed:
            raise ValueError(f"upload of {self.name}@{self.version} is already finished or aborted; begin a new one")
        subject = f"upload of {self.name}@{self.version}"
        total = self.bytes_received + len(data)
        # Checked before the bytes are written, so nothing over a limit ever lands in the store.
        if total > self.store.max_upload_bytes:
            raise LimitExceeded(f"{subject}: {total} bytes so far, over registry.max_upload_bytes "
                                f"({self.store.max_upload_bytes} bytes); nothing was stored")
        self.store.check_quota(subject, self._used_at_start, total)
        file_total = self._file_bytes.get(file, 0) + len(data)
        if file == MANIFEST_FILE and file_total > MAX_MANIFEST_BYTES:
            raise BadRequest(f"{subject}: {MANIFEST_FILE} is over {MAX_MANIFEST_BYTES} bytes; a manifest is a "
                             "few KiB of JSON (send the weights as weights.safetensors)")
        self._file_bytes[file] = file_total
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
