"""Typed errors for expert artifacts and experts. Each names the field, expected and found.

Callers branch on the type (the registry refuses the push) and the edge on `code`
(INVALID_ARGUMENT); people read the message:
    ChecksumMismatch: expert artifact 'file:///a/math': weights_sha256 expected 'ab12…', found '9f00…'
    (the weights file is corrupt or was changed after the manifest was written)

An expert that is not resident is ccoe_common.errors.ExpertNotFound, the same in every layer.
"""

from __future__ import annotations

from typing import Any

from ccoe_common.errors import CCoEError


class ExpertError(CCoEError, ValueError):
    """Base of every refusal to create, load or serve an expert artifact."""

    code = "INVALID_ARGUMENT"

    def __init__(self, subject: str, field: str, expected: Any, found: Any, hint: str = ""):
        self.subject, self.field, self.expected, self.found, self.hint = subject, field, expected, found, hint
        msg = f"{subject}: {field} expected {_short(expected)}, found {_short(found)}"
        super().__init__(f"{msg} ({hint})" if hint else msg)


def _short(value: Any) -> str:
    # Bare words and values are quoted (a name, a hash); descriptions read better without.
    text = value if isinstance(value, str) and " " in value else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


class ArtifactNotFound(ExpertError):
    """A file of the artifact (manifest.json or weights.safetensors) is missing."""


class ManifestMalformed(ExpertError):
    """manifest.json is not JSON, or a field is missing or of the wrong type."""


class UnknownExpertKind(ExpertError):
    """The manifest names an expert kind this build does not know."""


class ChecksumMismatch(ExpertError):
    """The weights' sha256 differs from the manifest's."""


class FingerprintMismatch(ExpertError):
    """The expert was made for a different backbone (config or weights)."""


class ShapeMismatch(ExpertError):
    """A tensor's shape differs from the manifest or from the backbone module it replaces."""


class TensorSetMismatch(ExpertError):
    """The weights hold tensors the manifest or the placement does not list, or lack some."""


class DtypeMismatch(ExpertError):
    """A tensor's dtype differs from the manifest's, or the dtype is not a float type we serve."""


class ParameterCountMismatch(ExpertError):
    """The manifest's parameter_count differs from the tensors it ships."""


class BudgetExceeded(ExpertError):
    """The expert has more parameters than its budget share of the backbone."""


class InvalidPlacement(ExpertError):
    """The expert's layers do not fit the backbone or its kind."""


class ExpertVersionExists(CCoEError, ValueError):
    """That name and version is already resident; push a new version instead."""

    code = "ALREADY_EXISTS"


class WeightsUnreadable(ExpertError):
    """weights.safetensors matches its checksum but is not a readable safetensors file."""
