"""Registry errors. Each carries the gRPC status code the registry answers with."""

from __future__ import annotations


class RegistryError(Exception):
    code = "INTERNAL"
    retryable = False


class RevisionConflict(RegistryError):
    """Someone changed it since you read it. `current` is the revision to re-read and retry from."""

    code = "ABORTED"
    retryable = True

    def __init__(self, what: str, expected: int, current: int):
        self.what, self.expected, self.current = what, expected, current
        super().__init__(f"{what} changed concurrently: you sent revision {expected}, current is {current}; "
                         "re-read and retry")

    def __reduce__(self):
        return RevisionConflict, (self.what, self.expected, self.current)


class StaleVersion(RegistryError):
    code = "FAILED_PRECONDITION"


class UnknownExpert(RegistryError):
    code = "NOT_FOUND"


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
