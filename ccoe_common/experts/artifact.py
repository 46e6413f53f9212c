"""Reading and writing expert artifacts: a folder (any fsspec URI) with manifest.json and
weights.safetensors.

`read_artifact` checks everything the artifact can say about itself (files present, JSON
well-formed, checksum, tensor names, shapes, dtype, parameter count). Whether it fits a
particular backbone (fingerprint, placement, budget) is checked where the backbone is known:
`ccoe_common.model.expert.check_compatible`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import fsspec
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from ccoe_common.defaults import DTYPES
from ccoe_common.experts.errors import (
    ArtifactNotFound,
    ChecksumMismatch,
    DtypeMismatch,
    ManifestMalformed,
    ParameterCountMismatch,
    ShapeMismatch,
    TensorSetMismatch,
    WeightsUnreadable,
)
from ccoe_common.experts.manifest import MANIFEST_FILE, WEIGHTS_FILE, BaseModelRef, ExpertManifest


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")


@dataclass
class ExpertArtifact:
    """An artifact read into memory and checked for self-consistency."""

    uri: str
    manifest: ExpertManifest
    tensors: dict[str, Tensor]


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def _read_bytes(uri: str, name: str) -> bytes:
    path = _join(uri, name)
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise ArtifactNotFound(
            f"expert artifact {uri!r}", name, "a file", "nothing", "the artifact is incomplete or the URI is wrong"
        ) from e


def read_manifest(uri: str) -> ExpertManifest:
    subject = f"expert artifact {uri!r}"
    raw = _read_bytes(uri, MANIFEST_FILE)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestMalformed(subject, MANIFEST_FILE, "a JSON object", f"invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ManifestMalformed(subject, MANIFEST_FILE, "a JSON object", type(data).__name__)
    try:
        return ExpertManifest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or MANIFEST_FILE
        found = err.get("input", "nothing") if err["type"] != "missing" else "nothing"
        raise ManifestMalformed(subject, field, err["msg"], found, f"{len(e.errors())} problem(s) in manifest") from e


def read_artifact(uri: str) -> ExpertArtifact:
    """Read and self-check the artifact at `uri`; raises a typed ExpertError on any mismatch."""
    subject = f"expert artifact {uri!r}"
    manifest = read_manifest(uri)
    data = _read_bytes(uri, WEIGHTS_FILE)
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.weights_sha256:
        raise ChecksumMismatch(
            subject, "weights_sha256", manifest.weights_sha256, digest, "the weights file is corrupt or was changed"
        )
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as e:
        raise WeightsUnreadable(subject, WEIGHTS_FILE, "a safetensors file", str(e)) from e
    check_tensors_match_manifest(subject, manifest, tensors)
    return ExpertArtifact(uri=uri, manifest=manifest, tensors=tensors)


def check_tensors_match_manifest(subject: str, manifest: ExpertManifest, tensors: dict[str, Tensor]) -> None:
    if manifest.dtype not in DTYPES:
        raise DtypeMismatch(subject, "dtype", f"one of {sorted(DTYPES)}", manifest.dtype)
    missing = sorted(set(manifest.tensors) - set(tensors))
    extra = sorted(set(tensors) - set(manifest.tensors))
    if missing or extra:
        raise TensorSetMismatch(subject, "tensors", sorted(manifest.tensors), sorted(tensors),
                                f"missing {missing}, unlisted {extra}")
    for name in sorted(tensors):
        t = tensors[name]
        if list(t.shape) != manifest.tensors[name]:
            raise ShapeMismatch(subject, f"tensors.{name}", manifest.tensors[name], list(t.shape))
        if t.dtype != DTYPES[manifest.dtype]:
            raise DtypeMismatch(subject, f"dtype of {name}", manifest.dtype, str(t.dtype).removeprefix("torch."))
    count = sum(t.numel() for t in tensors.values())
    if count != manifest.parameter_count:
        raise ParameterCountMismatch(subject, "parameter_count", manifest.parameter_count, count)


def _standalone(t: Tensor) -> Tensor:
    # safetensors refuses tensors that share memory, e.g. a model's stacked q/k/v projections
    # (model/fast/packing.py), which are row blocks of one tensor: write a copy of those.
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


def write_artifact(
    uri: str,
    tensors: dict[str, Tensor],
    *,
    name: str,
    version: int,
    kind: str,
    layers: list[int],
    base_model: BaseModelRef,
    domains: list[str] | None = None,
    description: str = "",
    training: dict[str, Any] | None = None,
    created_at: datetime | None = None,
) -> ExpertManifest:
    """Write weights then manifest (the manifest last, so its presence means "complete")."""
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"expert {name!r}: all tensors must share one dtype, found {sorted(map(str, dtypes))}")
    cpu = {k: _standalone(v.detach().to("cpu").contiguous()) for k, v in sorted(tensors.items())}
    data = st_save(cpu)
    fields: dict[str, Any] = {
        "name": name,
        "version": version,
        "kind": kind,
        "layers": list(layers),
        "dtype": dtype_name(dtypes.pop()),
        "tensors": {k: list(v.shape) for k, v in cpu.items()},
        "parameter_count": sum(v.numel() for v in cpu.values()),
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "base_model": base_model,
        "domains": list(domains or []),
        "description": description,
        "training": dict(training or {}),
    }
    if created_at is not None:
        fields["created_at"] = created_at
    manifest = ExpertManifest(**fields)
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(_join(path, WEIGHTS_FILE), data)
    fs.pipe_file(_join(path, MANIFEST_FILE), manifest.model_dump_json(indent=2).encode())
    return manifest
