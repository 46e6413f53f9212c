"""Refusals of the auth layer, each with the gRPC status the caller sees."""

from __future__ import annotations

from ccoe_common.errors import CCoEError


class Unauthenticated(CCoEError):
    """No credential, or one that matches no principal: UNAUTHENTICATED."""

    code = "UNAUTHENTICATED"


class PermissionDenied(CCoEError):
    """A known principal asked for something its roles or tenants do not allow: PERMISSION_DENIED."""

    code = "PERMISSION_DENIED"


class RateLimited(CCoEError):
    """The principal spent its request budget: RESOURCE_EXHAUSTED, retry after `retry_after_s`."""

    code = "RESOURCE_EXHAUSTED"
    retryable = True

    def __init__(self, message: str, retry_after_s: float):
        self.retry_after_s = retry_after_s
        super().__init__(message)


class TokensFileError(CCoEError, ValueError):
    """The tokens file cannot be read or a line of it is malformed; the message names the entry."""

    code = "FAILED_PRECONDITION"
