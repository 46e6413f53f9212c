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


class StoreUnavailable(RegistryError):
    """Redis (or the artifact store) cannot be reached; nothing was changed."""

    code = "UNAVAILABLE"
    retryable = True


class NoReplicaToValidate(RegistryError):
    code = "UNAVAILABLE"
    retryable = True
