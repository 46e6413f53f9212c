"""Registry errors: what the control plane refuses, each with the gRPC status it answers with.
An expert or version that is not registered is ccoe_common.errors.ExpertNotFound (NOT_FOUND),
the same error the router and the replicas raise for an expert that is not there."""

from __future__ import annotations

from ccoe_common.errors import CCoEError


class RegistryError(CCoEError):
    code = "INTERNAL"


class RevisionConflict(RegistryError):
    """Someone changed it since you read it. `current` is the revision to re-read and retry from."""

    code = "ABORTED"
    retryable = True

    def __init__(self, what: str, expected: int, current: int):
        self.what, self.expected, self.current = what, expected, current
        super().__init__(f"{what} changed concurrently: you sent revision {expected}, current is {current}; "
                         "re-read and retry")


class StaleVersion(RegistryError):
    code = "FAILED_PRECONDITION"


class RolloutInProgress(RegistryError):
    code = "FAILED_PRECONDITION"


class NothingToRollBack(RegistryError):
    code = "FAILED_PRECONDITION"


class ArtifactRefused(RegistryError):
    """The artifact failed a check (checksum, shapes, fingerprint, budget...): INVALID_ARGUMENT."""

    code = "INVALID_ARGUMENT"


class BadRequest(RegistryError):
    code = "INVALID_ARGUMENT"


class DisallowedLocation(BadRequest):
    """A source URI or export destination outside what `registry.allowed_sources` and
    `registry.allowed_export_prefixes` allow (decided before anything is read)."""


class LimitExceeded(RegistryError):
    """An upload over `registry.max_upload_bytes`, or the artifact store over its quota
    (`registry.artifact_store_quota_bytes`). The message names the limit and the setting."""

    code = "RESOURCE_EXHAUSTED"


class UploadAbandoned(RegistryError):
    """The client went silent for `registry.upload_idle_timeout_s` (DEADLINE_EXCEEDED) or
    cancelled the stream (CANCELLED, set on the instance); what it had sent is removed."""

    code = "DEADLINE_EXCEEDED"

    def __init__(self, message: str, code: str = "DEADLINE_EXCEEDED"):
        self.code = code
        super().__init__(message)


class ExportFailed(RegistryError):
    """The export destination is allowed but cannot be written (permissions, a file in the
    way, a full disk). Nothing was retired."""

    code = "FAILED_PRECONDITION"


class StoreUnavailable(RegistryError):
    """Redis (or the artifact store) cannot be reached; nothing was changed."""

    code = "UNAVAILABLE"
    retryable = True


class NoReplicaToValidate(RegistryError):
    code = "UNAVAILABLE"
    retryable = True
